//! The aggregator components a server config can name, each with its typed arguments, and
//! what they become: a [`flare_protocols::aggregators::AggregatorSpec`]. Adding an
//! algorithm means a variant here and its rule in `protocols/src/aggregators`.
//!
//! Names and defaults follow FLARE where FLARE has the algorithm (`FedAvg`, `FedProx` with
//! `mu` 0.01, `FedOpt`: SGD with lr 1.0, momentum 0.6 and a cosine schedule down to 0.9
//! over the run's rounds) and Flower for the rest (`FedAvgM`, `FedAdam`, `FedYogi`,
//! `FedAdagrad` with τ = 1e-3; `FedMedian`, `FedTrimmedAvg` with β = 0.2, `Krum`,
//! `MultiKrum`, `Bulyan`). `Scaffold` (FLARE's `ScaffoldController`) takes no arguments:
//! the learners must implement its client side (the built-in MLP and CNN do).

use std::path::Path;

use flare_protocols::aggregators::{AggregatorSpec, Cosine, Rule, ServerOpt};
use serde::Deserialize;

use crate::job::{JobError, invalid, parse_args};

/// The names [`parse`] knows, for error messages.
pub const KNOWN: &str = "FedAvg, FedProx, FedOpt, FedAvgM, FedAdam, FedYogi, FedAdagrad, Scaffold, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FedProxArgs {
    /// The proximal coefficient (Flower's `proximal_mu`).
    #[serde(default = "fedprox_mu", alias = "proximal_mu")]
    mu: f64,
}

fn fedprox_mu() -> f64 {
    0.01
}

/// The learning-rate schedule of `FedOpt`.
#[derive(Debug, Deserialize, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Schedule {
    /// torch's `CosineAnnealingLR`.
    #[default]
    Cosine,
    /// A constant learning rate.
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FedOptArgs {
    #[serde(default = "one")]
    lr: f64,
    #[serde(default = "fedopt_momentum")]
    momentum: f64,
    #[serde(default)]
    schedule: Schedule,
    /// Rounds of the cosine's half period; the job's `num_rounds` when absent.
    #[serde(default)]
    t_max: Option<u32>,
    #[serde(default = "fedopt_eta_min")]
    eta_min: f64,
}

fn one() -> f64 {
    1.0
}
fn fedopt_momentum() -> f64 {
    0.6
}
fn fedopt_eta_min() -> f64 {
    0.9
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FedAvgMArgs {
    #[serde(default = "one")]
    server_learning_rate: f64,
    #[serde(default)]
    server_momentum: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdaptiveArgs {
    eta: Option<f64>,
    beta_1: Option<f64>,
    beta_2: Option<f64>,
    #[serde(default = "tau")]
    tau: f64,
}

fn tau() -> f64 {
    1e-3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrimmedArgs {
    #[serde(default = "trim_beta")]
    beta: f64,
}

fn trim_beta() -> f64 {
    0.2
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KrumArgs {
    #[serde(default)]
    num_malicious_nodes: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MultiKrumArgs {
    #[serde(default)]
    num_malicious_nodes: usize,
    #[serde(default = "select_one")]
    num_nodes_to_select: usize,
}

fn select_one() -> usize {
    1
}

/// The aggregator component `name` with `args`, at `key` (`components[1]`) of `file`, for a
/// run of `num_rounds` rounds (FedOpt's schedule spans them by default).
pub fn parse(
    file: &Path,
    key: &str,
    name: &str,
    args: serde_json::Value,
    num_rounds: u32,
) -> Result<AggregatorSpec, JobError> {
    let at = |field: &str| format!("{key}.args.{field}");
    // A number that must be finite and in a range.
    let check = |field: &str, v: f64, ok: bool, what: &str| {
        if v.is_finite() && ok {
            Ok(v)
        } else {
            Err(invalid(file, at(field), format!("{v} is not {what}")))
        }
    };
    let rule = |rule| AggregatorSpec {
        rule,
        ..AggregatorSpec::default()
    };
    let opt = |opt| AggregatorSpec {
        opt: Some(opt),
        ..AggregatorSpec::default()
    };
    Ok(match name {
        "FedAvg" => {
            let _: NoArgs = parse_args(file, key, args)?;
            AggregatorSpec::default()
        }
        "FedProx" => {
            let a: FedProxArgs = parse_args(file, key, args)?;
            check("mu", a.mu, a.mu >= 0.0, "a coefficient >= 0")?;
            AggregatorSpec {
                fedprox_mu: Some(a.mu),
                ..AggregatorSpec::default()
            }
        }
        "FedOpt" => {
            let a: FedOptArgs = parse_args(file, key, args)?;
            check("lr", a.lr, a.lr > 0.0, "a learning rate > 0")?;
            check(
                "momentum",
                a.momentum,
                (0.0..1.0).contains(&a.momentum),
                "a momentum in [0, 1)",
            )?;
            check(
                "eta_min",
                a.eta_min,
                a.eta_min >= 0.0,
                "a learning rate >= 0",
            )?;
            if a.t_max == Some(0) {
                return Err(invalid(file, at("t_max"), "must be at least 1"));
            }
            let cosine = (a.schedule == Schedule::Cosine).then(|| Cosine {
                t_max: a.t_max.unwrap_or(num_rounds).max(1),
                eta_min: a.eta_min,
            });
            opt(ServerOpt::Sgd {
                lr: a.lr,
                momentum: a.momentum,
                cosine,
            })
        }
        "FedAvgM" => {
            let a: FedAvgMArgs = parse_args(file, key, args)?;
            let lr = a.server_learning_rate;
            check("server_learning_rate", lr, lr > 0.0, "a learning rate > 0")?;
            let m = a.server_momentum;
            check(
                "server_momentum",
                m,
                (0.0..1.0).contains(&m),
                "a momentum in [0, 1)",
            )?;
            opt(ServerOpt::Sgd {
                lr,
                momentum: m,
                cosine: None,
            })
        }
        "FedAdam" | "FedYogi" | "FedAdagrad" => {
            let a: AdaptiveArgs = parse_args(file, key, args)?;
            let (eta0, b1) = match name {
                "FedYogi" => (0.01, 0.9),
                "FedAdam" => (0.1, 0.9),
                _ => (0.1, 0.0),
            };
            let eta = check(
                "eta",
                a.eta.unwrap_or(eta0),
                a.eta.unwrap_or(eta0) > 0.0,
                "a learning rate > 0",
            )?;
            let beta = |field: &str, v: f64| check(field, v, (0.0..1.0).contains(&v), "in [0, 1)");
            let beta_1 = beta("beta_1", a.beta_1.unwrap_or(b1))?;
            let tau = check("tau", a.tau, a.tau > 0.0, "a positive adaptivity")?;
            if name == "FedAdagrad" {
                if a.beta_2.is_some() {
                    return Err(invalid(file, at("beta_2"), "FedAdagrad has no beta_2"));
                }
                opt(ServerOpt::Adagrad { eta, beta_1, tau })
            } else {
                let beta_2 = beta("beta_2", a.beta_2.unwrap_or(0.99))?;
                if name == "FedAdam" {
                    opt(ServerOpt::Adam {
                        eta,
                        beta_1,
                        beta_2,
                        tau,
                    })
                } else {
                    opt(ServerOpt::Yogi {
                        eta,
                        beta_1,
                        beta_2,
                        tau,
                    })
                }
            }
        }
        "Scaffold" => {
            let _: NoArgs = parse_args(file, key, args)?;
            AggregatorSpec {
                scaffold: true,
                ..AggregatorSpec::default()
            }
        }
        "FedMedian" => {
            let _: NoArgs = parse_args(file, key, args)?;
            rule(Rule::Median)
        }
        "FedTrimmedAvg" => {
            let a: TrimmedArgs = parse_args(file, key, args)?;
            check(
                "beta",
                a.beta,
                (0.0..0.5).contains(&a.beta),
                "a fraction in [0, 0.5)",
            )?;
            rule(Rule::TrimmedMean { beta: a.beta })
        }
        "Krum" => {
            let a: KrumArgs = parse_args(file, key, args)?;
            rule(Rule::Krum {
                malicious: a.num_malicious_nodes,
                keep: 1,
            })
        }
        "MultiKrum" => {
            let a: MultiKrumArgs = parse_args(file, key, args)?;
            if a.num_nodes_to_select == 0 {
                return Err(invalid(
                    file,
                    at("num_nodes_to_select"),
                    "must be at least 1",
                ));
            }
            rule(Rule::Krum {
                malicious: a.num_malicious_nodes,
                keep: a.num_nodes_to_select,
            })
        }
        "Bulyan" => {
            let a: KrumArgs = parse_args(file, key, args)?;
            rule(Rule::Bulyan {
                malicious: a.num_malicious_nodes,
            })
        }
        other => {
            return Err(invalid(
                file,
                format!("{key}.name"),
                format!("unknown aggregator {other:?} (known: {KNOWN})"),
            ));
        }
    })
}

/// Refuses, at `key` of `file`, an aggregator that needs at least `needed` results a round
/// when the run can have at most `max` (Bulyan's `4f + 3`, MultiKrum's selection).
pub fn check_clients(
    file: &Path,
    key: &str,
    spec: &AggregatorSpec,
    max: usize,
) -> Result<(), JobError> {
    let need = match spec.rule {
        Rule::Bulyan { malicious } => Some((
            4 * malicious + 3,
            format!(
                "Bulyan with num_malicious_nodes = {malicious} needs at least {} results a round (4f + 3)",
                4 * malicious + 3
            ),
        )),
        Rule::Krum { keep, .. } if keep > 1 => {
            Some((keep, format!("MultiKrum selects {keep} results a round")))
        }
        _ => None,
    };
    match need {
        Some((n, why)) if max < n => Err(invalid(
            file,
            key,
            format!("{why}, but the run has at most {max} sites"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn p(name: &str, args: serde_json::Value) -> Result<AggregatorSpec, String> {
        parse(Path::new("cfg.json"), "components[1]", name, args, 10).map_err(|e| e.to_string())
    }

    #[test]
    fn every_name_parses_with_its_defaults() {
        assert_eq!(p("FedAvg", json!({})).unwrap(), AggregatorSpec::default());
        assert_eq!(p("FedProx", json!({})).unwrap().fedprox_mu, Some(0.01));
        assert_eq!(
            p("FedProx", json!({"proximal_mu": 1.0}))
                .unwrap()
                .fedprox_mu,
            Some(1.0)
        );
        assert_eq!(
            p("FedOpt", json!({})).unwrap().opt,
            Some(ServerOpt::Sgd {
                lr: 1.0,
                momentum: 0.6,
                cosine: Some(Cosine {
                    t_max: 10,
                    eta_min: 0.9
                })
            })
        );
        assert_eq!(
            p("FedOpt", json!({"schedule": "none", "momentum": 0.0}))
                .unwrap()
                .opt,
            Some(ServerOpt::Sgd {
                lr: 1.0,
                momentum: 0.0,
                cosine: None
            })
        );
        assert_eq!(
            p("FedAdam", json!({})).unwrap().opt,
            Some(ServerOpt::Adam {
                eta: 0.1,
                beta_1: 0.9,
                beta_2: 0.99,
                tau: 1e-3
            })
        );
        assert_eq!(
            p("FedYogi", json!({})).unwrap().opt,
            Some(ServerOpt::Yogi {
                eta: 0.01,
                beta_1: 0.9,
                beta_2: 0.99,
                tau: 1e-3
            })
        );
        assert_eq!(
            p("FedAdagrad", json!({})).unwrap().opt,
            Some(ServerOpt::Adagrad {
                eta: 0.1,
                beta_1: 0.0,
                tau: 1e-3
            })
        );
        assert_eq!(
            p("FedTrimmedAvg", json!({})).unwrap().rule,
            Rule::TrimmedMean { beta: 0.2 }
        );
        assert_eq!(
            p(
                "MultiKrum",
                json!({"num_malicious_nodes": 1, "num_nodes_to_select": 3})
            )
            .unwrap()
            .rule,
            Rule::Krum {
                malicious: 1,
                keep: 3
            }
        );
        assert_eq!(p("FedMedian", json!({})).unwrap().rule, Rule::Median);
        assert_eq!(
            p("Bulyan", json!({"num_malicious_nodes": 2})).unwrap().rule,
            Rule::Bulyan { malicious: 2 }
        );
    }

    #[test]
    fn bad_arguments_name_the_file_and_key() {
        let e = p("FedProx", json!({"mu": -1.0})).unwrap_err();
        assert!(
            e.contains("cfg.json") && e.contains("components[1].args.mu"),
            "{e}"
        );
        let e = p("FedAdam", json!({"beta_1": 1.5})).unwrap_err();
        assert!(e.contains("components[1].args.beta_1"), "{e}");
        let e = p("FedTrimmedAvg", json!({"beta": 0.5})).unwrap_err();
        assert!(e.contains("components[1].args.beta"), "{e}");
        let e = p("Krum", json!({"f": 1})).unwrap_err();
        assert!(
            e.contains("components[1].args") && e.contains("unknown field"),
            "{e}"
        );
        let e = p("FedAdagrad", json!({"beta_2": 0.9})).unwrap_err();
        assert!(e.contains("components[1].args.beta_2"), "{e}");
        let e = p("Scaffold2", json!({})).unwrap_err();
        assert!(
            e.contains("components[1].name") && e.contains("known: FedAvg"),
            "{e}"
        );
    }

    #[test]
    fn bulyan_and_multikrum_need_enough_sites() {
        let f = Path::new("cfg.json");
        let bulyan = p("Bulyan", json!({"num_malicious_nodes": 1})).unwrap();
        let e = check_clients(f, "components[1]", &bulyan, 6)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs at least 7") && e.contains("at most 6"),
            "{e}"
        );
        assert!(check_clients(f, "components[1]", &bulyan, 7).is_ok());
        let multi = p("MultiKrum", json!({"num_nodes_to_select": 4})).unwrap();
        assert!(check_clients(f, "components[1]", &multi, 3).is_err());
    }
}
