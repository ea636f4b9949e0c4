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
//!
//! Central differential privacy (DP-FedAvg, [`flare_protocols::dp`]) has Flower's names and
//! arguments: `DifferentialPrivacyServerSideFixedClipping` (alias `DPFedAvgFixed`:
//! `noise_multiplier`, `clipping_norm` or `clip_norm`) and
//! `DifferentialPrivacyServerSideAdaptiveClipping` (alias `DPFedAvgAdaptive`:
//! `noise_multiplier`, `initial_clipping_norm` 0.1, `target_clipped_quantile` 0.5,
//! `clip_norm_lr` 0.2, `clipped_count_stddev` (default `num_sampled_clients/20` when that is
//! given, else a twentieth of each round's results), and the legacy aliases
//! `init_clip_norm`, `clip_norm_target_quantile`). Both take `target_delta` (1e-5), the `δ`
//! at which the spent `ε` is reported every round, and may name `target_epsilon` (with
//! `num_rounds`, the job's rounds by default) instead of `noise_multiplier`: the multiplier
//! is then solved for as Opacus's `make_private_with_epsilon` does, assuming every client
//! in every round (sampling rate 1). Flower's `strategy` (the wrapped aggregator, `FedAvg`
//! by default, as a name or `{name, args}`) may only be FedAvg or FedProx: DP clips and
//! noises the plain mean. Each node that loads the job draws its own secret noise seed from
//! the OS random source, never from the job (see [`flare_protocols::dp`] for why).

use std::path::Path;

use flare_protocols::aggregators::{AggregatorSpec, Cosine, Rule, ServerOpt};
use flare_protocols::dp::accountant::get_noise_multiplier;
use flare_protocols::dp::{AdaptiveClipping, Clipping, DpSpec, NoiseSeed, adaptive_model_noise};
use serde::Deserialize;

use crate::job::{JobError, invalid, parse_args};

/// The names [`parse`] knows, for error messages.
pub const KNOWN: &str = "FedAvg, FedProx, FedOpt, FedAvgM, FedAdam, FedYogi, FedAdagrad, Scaffold, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, DifferentialPrivacyServerSideFixedClipping (DPFedAvgFixed), DifferentialPrivacyServerSideAdaptiveClipping (DPFedAvgAdaptive)";

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

/// What both DP aggregators take besides their clipping.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DpFixedArgs {
    /// `z`; or `target_epsilon` instead.
    noise_multiplier: Option<f64>,
    #[serde(alias = "clip_norm")]
    clipping_norm: f64,
    #[serde(default = "target_delta")]
    target_delta: f64,
    target_epsilon: Option<f64>,
    num_rounds: Option<u32>,
    /// Flower's wrapped strategy.
    strategy: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DpAdaptiveArgs {
    noise_multiplier: Option<f64>,
    /// Flower's; here only the default of `clipped_count_stddev`.
    num_sampled_clients: Option<usize>,
    #[serde(default = "initial_clipping_norm", alias = "init_clip_norm")]
    initial_clipping_norm: f64,
    #[serde(
        default = "target_clipped_quantile",
        alias = "clip_norm_target_quantile"
    )]
    target_clipped_quantile: f64,
    #[serde(default = "clip_norm_lr")]
    clip_norm_lr: f64,
    clipped_count_stddev: Option<f64>,
    #[serde(default = "target_delta")]
    target_delta: f64,
    target_epsilon: Option<f64>,
    num_rounds: Option<u32>,
    strategy: Option<serde_json::Value>,
}

fn target_delta() -> f64 {
    1e-5
}
fn initial_clipping_norm() -> f64 {
    AdaptiveClipping::DEFAULT.initial_norm
}
fn target_clipped_quantile() -> f64 {
    AdaptiveClipping::DEFAULT.target_quantile
}
fn clip_norm_lr() -> f64 {
    AdaptiveClipping::DEFAULT.lr
}

/// The privacy budget of a DP aggregator: a noise multiplier, or a target `ε` to solve for.
struct Budget {
    noise_multiplier: Option<f64>,
    target_delta: f64,
    target_epsilon: Option<f64>,
    num_rounds: Option<u32>,
}

/// The noise multiplier of `b` at `key` of `file`, for a run of `job_rounds` rounds.
fn noise_multiplier(file: &Path, key: &str, b: &Budget, job_rounds: u32) -> Result<f64, JobError> {
    let at = |field: &str| format!("{key}.args.{field}");
    let d = b.target_delta;
    if !(d > 0.0 && d < 1.0) {
        return Err(invalid(
            file,
            at("target_delta"),
            format!("{d} is not in (0, 1)"),
        ));
    }
    match (b.noise_multiplier, b.target_epsilon) {
        (Some(_), Some(_)) => Err(invalid(
            file,
            at("target_epsilon"),
            "give noise_multiplier or target_epsilon, not both",
        )),
        (None, None) => Err(invalid(
            file,
            at("noise_multiplier"),
            "missing: DP needs noise_multiplier, or target_epsilon (with num_rounds) to solve for it",
        )),
        (Some(z), None) => {
            if b.num_rounds.is_some() {
                return Err(invalid(
                    file,
                    at("num_rounds"),
                    "only with target_epsilon (it is the rounds the budget is spread over)",
                ));
            }
            if z.is_finite() && z > 0.0 {
                Ok(z)
            } else {
                Err(invalid(
                    file,
                    at("noise_multiplier"),
                    format!(
                        "{z} is not a noise multiplier > 0 (without noise there is no privacy: use FedAvg)"
                    ),
                ))
            }
        }
        (None, Some(eps)) => {
            let rounds = b.num_rounds.unwrap_or(job_rounds);
            if rounds == 0 {
                return Err(invalid(file, at("num_rounds"), "must be at least 1"));
            }
            get_noise_multiplier(eps, d, 1.0, u64::from(rounds))
                .map_err(|e| invalid(file, at("target_epsilon"), e.to_string()))
        }
    }
}

/// A fresh secret noise seed from the OS random source.
fn noise_seed(file: &Path, key: &str) -> Result<NoiseSeed, JobError> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut seed = [0u8; 32];
    SystemRandom::new().fill(&mut seed).map_err(|_| {
        invalid(
            file,
            key,
            "cannot draw the DP noise seed from the OS random source",
        )
    })?;
    Ok(NoiseSeed(seed))
}

/// The aggregator Flower's `strategy` argument names (FedAvg when absent), which DP wraps.
fn wrapped(
    file: &Path,
    key: &str,
    strategy: Option<serde_json::Value>,
    num_rounds: u32,
    dp: DpSpec,
) -> Result<AggregatorSpec, JobError> {
    let at = format!("{key}.args.strategy");
    let (name, args) = match strategy {
        None => ("FedAvg".to_string(), serde_json::json!({})),
        Some(serde_json::Value::String(name)) => (name, serde_json::json!({})),
        Some(serde_json::Value::Object(mut o)) => {
            let name = match o.remove("name") {
                Some(serde_json::Value::String(n)) => n,
                _ => {
                    return Err(invalid(
                        file,
                        format!("{at}.name"),
                        "missing: the wrapped aggregator's name",
                    ));
                }
            };
            let args = o.remove("args").unwrap_or_else(|| serde_json::json!({}));
            if let Some(k) = o.keys().next() {
                return Err(invalid(
                    file,
                    format!("{at}.{k}"),
                    "unknown field (expected name, args)",
                ));
            }
            (name, args)
        }
        Some(_) => {
            return Err(invalid(file, at, "an aggregator name, or {name, args}"));
        }
    };
    let inner = parse(file, &at, &name, args, num_rounds)?;
    if inner.dp.is_some() {
        return Err(invalid(file, at, "DP cannot wrap DP"));
    }
    let spec = AggregatorSpec {
        dp: Some(dp),
        ..inner
    };
    match spec.dp_conflict() {
        Some(why) => Err(invalid(
            file,
            at,
            format!("{name}: {why} (use FedAvg or FedProx)"),
        )),
        None => Ok(spec),
    }
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
        "DifferentialPrivacyServerSideFixedClipping" | "DPFedAvgFixed" => {
            let a: DpFixedArgs = parse_args(file, key, args)?;
            let c = a.clipping_norm;
            check("clipping_norm", c, c > 0.0, "a clipping norm > 0")?;
            let budget = Budget {
                noise_multiplier: a.noise_multiplier,
                target_delta: a.target_delta,
                target_epsilon: a.target_epsilon,
                num_rounds: a.num_rounds,
            };
            let dp = DpSpec {
                noise_multiplier: noise_multiplier(file, key, &budget, num_rounds)?,
                clipping: Clipping::Fixed { norm: c },
                target_delta: a.target_delta,
                noise_seed: noise_seed(file, key)?,
            };
            wrapped(file, key, a.strategy, num_rounds, dp)?
        }
        "DifferentialPrivacyServerSideAdaptiveClipping" | "DPFedAvgAdaptive" => {
            let a: DpAdaptiveArgs = parse_args(file, key, args)?;
            let c = a.initial_clipping_norm;
            check("initial_clipping_norm", c, c > 0.0, "a clipping norm > 0")?;
            let g = a.target_clipped_quantile;
            check(
                "target_clipped_quantile",
                g,
                (0.0..=1.0).contains(&g),
                "a fraction in [0, 1]",
            )?;
            let lr = a.clip_norm_lr;
            check("clip_norm_lr", lr, lr > 0.0, "a learning rate > 0")?;
            if a.num_sampled_clients == Some(0) {
                return Err(invalid(
                    file,
                    at("num_sampled_clients"),
                    "must be at least 1",
                ));
            }
            let count_stddev = match a.clipped_count_stddev {
                Some(s) => Some(check(
                    "clipped_count_stddev",
                    s,
                    s > 0.0,
                    "a standard deviation > 0",
                )?),
                None => a.num_sampled_clients.map(|n| n as f64 / 20.0),
            };
            let budget = Budget {
                noise_multiplier: a.noise_multiplier,
                target_delta: a.target_delta,
                target_epsilon: a.target_epsilon,
                num_rounds: a.num_rounds,
            };
            let z = noise_multiplier(file, key, &budget, num_rounds)?;
            if let Some(s) = count_stddev {
                adaptive_model_noise(z, s)
                    .map_err(|e| invalid(file, at("noise_multiplier"), e.to_string()))?;
            }
            let dp = DpSpec {
                noise_multiplier: z,
                clipping: Clipping::Adaptive(AdaptiveClipping {
                    initial_norm: c,
                    target_quantile: g,
                    lr,
                    count_stddev,
                }),
                target_delta: a.target_delta,
                noise_seed: noise_seed(file, key)?,
            };
            wrapped(file, key, a.strategy, num_rounds, dp)?
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
    // Adaptive clipping's count noise defaults to m/20 of the round's m results: it must
    // leave the model some of the budget, z < 2σ_b, with every site answering at least.
    let need = need.or_else(|| match spec.dp?.clipping {
        Clipping::Adaptive(a) if a.count_stddev.is_none() => {
            let z = spec.dp?.noise_multiplier;
            let n = (10.0 * z).floor() as usize + 1;
            Some((
                n,
                format!(
                    "adaptive clipping with noise_multiplier {z} and clipped_count_stddev = m/20 needs more than 10 × {z} results a round (set clipped_count_stddev or num_sampled_clients)"
                ),
            ))
        }
        _ => None,
    });
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

    fn dp_of(spec: &AggregatorSpec) -> DpSpec {
        spec.dp.expect("a DP spec")
    }

    #[test]
    fn dp_names_parse_with_flowers_arguments_and_defaults() {
        for name in [
            "DifferentialPrivacyServerSideFixedClipping",
            "DPFedAvgFixed",
        ] {
            let spec = p(name, json!({"noise_multiplier": 1.1, "clipping_norm": 0.5})).unwrap();
            let dp = dp_of(&spec);
            assert_eq!(dp.noise_multiplier, 1.1);
            assert_eq!(dp.clipping, Clipping::Fixed { norm: 0.5 });
            assert_eq!(dp.target_delta, 1e-5);
            assert_eq!(spec.rule, Rule::Mean);
            assert_eq!(spec.opt, None);
        }
        let legacy = p(
            "DPFedAvgFixed",
            json!({"noise_multiplier": 1.0, "clip_norm": 2.0}),
        )
        .unwrap();
        assert_eq!(dp_of(&legacy).clipping, Clipping::Fixed { norm: 2.0 });
        for name in [
            "DifferentialPrivacyServerSideAdaptiveClipping",
            "DPFedAvgAdaptive",
        ] {
            let dp = dp_of(&p(name, json!({"noise_multiplier": 0.5})).unwrap());
            assert_eq!(dp.clipping, Clipping::Adaptive(AdaptiveClipping::DEFAULT));
        }
        let dp = dp_of(
            &p(
                "DPFedAvgAdaptive",
                json!({"noise_multiplier": 0.5, "num_sampled_clients": 40, "init_clip_norm": 1.0,
                       "clip_norm_target_quantile": 0.8, "clip_norm_lr": 0.1, "target_delta": 1e-6}),
            )
            .unwrap(),
        );
        assert_eq!(
            dp.clipping,
            Clipping::Adaptive(AdaptiveClipping {
                initial_norm: 1.0,
                target_quantile: 0.8,
                lr: 0.1,
                count_stddev: Some(2.0),
            })
        );
        assert_eq!(dp.target_delta, 1e-6);
        // FedProx's server side is FedAvg: DP wraps it, and its mu still goes to the learners.
        let prox = p(
            "DPFedAvgFixed",
            json!({"noise_multiplier": 1.0, "clipping_norm": 1.0,
                   "strategy": {"name": "FedProx", "args": {"mu": 0.1}}}),
        )
        .unwrap();
        assert_eq!(prox.fedprox_mu, Some(0.1));
        assert!(prox.dp.is_some());
    }

    #[test]
    fn a_target_epsilon_is_solved_for_like_opacus() {
        // Opacus 1.6.0: get_noise_multiplier(target_epsilon=8, target_delta=1e-5,
        // sample_rate=1, steps=30) = 3.49609375.
        let dp = dp_of(
            &p(
                "DPFedAvgFixed",
                json!({"target_epsilon": 8.0, "num_rounds": 30, "clipping_norm": 1.0}),
            )
            .unwrap(),
        );
        assert_eq!(dp.noise_multiplier, 3.49609375);
        // num_rounds defaults to the job's (10 here).
        let ten = dp_of(
            &p(
                "DPFedAvgFixed",
                json!({"target_epsilon": 8.0, "clipping_norm": 1.0}),
            )
            .unwrap(),
        );
        let (eps, _) =
            flare_protocols::dp::accountant::epsilon(ten.noise_multiplier, 1.0, 10, 1e-5).unwrap();
        assert!(eps <= 8.0 && eps > 7.99, "{eps}");
    }

    #[test]
    fn every_job_load_draws_its_own_secret_seed() {
        let args = json!({"noise_multiplier": 1.0, "clipping_norm": 1.0});
        let a = dp_of(&p("DPFedAvgFixed", args.clone()).unwrap());
        let b = dp_of(&p("DPFedAvgFixed", args).unwrap());
        assert_ne!(a.noise_seed, b.noise_seed);
        assert!(!format!("{a:?}").contains(&format!("{:?}", a.noise_seed.0)));
    }

    #[test]
    fn bad_dp_arguments_name_the_file_and_key() {
        let cases = [
            (
                "DPFedAvgFixed",
                json!({"clipping_norm": 1.0}),
                "components[1].args.noise_multiplier",
            ),
            (
                "DPFedAvgFixed",
                json!({"noise_multiplier": 0.0, "clipping_norm": 1.0}),
                "components[1].args.noise_multiplier",
            ),
            (
                "DPFedAvgFixed",
                json!({"noise_multiplier": 1.0}),
                "components[1].args",
            ),
            (
                "DPFedAvgFixed",
                json!({"noise_multiplier": 1.0, "clipping_norm": -1.0}),
                "components[1].args.clipping_norm",
            ),
            (
                "DPFedAvgFixed",
                json!({"noise_multiplier": 1.0, "clipping_norm": 1.0, "target_delta": 1.0}),
                "components[1].args.target_delta",
            ),
            (
                "DPFedAvgFixed",
                json!({"noise_multiplier": 1.0, "clipping_norm": 1.0, "target_epsilon": 1.0}),
                "components[1].args.target_epsilon",
            ),
            (
                "DPFedAvgFixed",
                json!({"noise_multiplier": 1.0, "clipping_norm": 1.0, "num_rounds": 5}),
                "components[1].args.num_rounds",
            ),
            (
                "DPFedAvgFixed",
                json!({"target_epsilon": 1e-9, "clipping_norm": 1.0}),
                "components[1].args.target_epsilon",
            ),
            (
                "DPFedAvgFixed",
                json!({"noise_multiplier": 1.0, "clipping_norm": 1.0, "num_sampled_clients": 5}),
                "components[1].args",
            ),
            (
                "DPFedAvgAdaptive",
                json!({"noise_multiplier": 1.0, "target_clipped_quantile": 1.5}),
                "components[1].args.target_clipped_quantile",
            ),
            (
                "DPFedAvgAdaptive",
                json!({"noise_multiplier": 1.0, "clip_norm_lr": 0.0}),
                "components[1].args.clip_norm_lr",
            ),
            // Flower's check: z must be below 2σ_b (σ_b = 10/20 here).
            (
                "DPFedAvgAdaptive",
                json!({"noise_multiplier": 1.0, "num_sampled_clients": 10}),
                "components[1].args.noise_multiplier",
            ),
            (
                "DPFedAvgAdaptive",
                json!({"noise_multiplier": 1.0, "clipped_count_stddev": 0.4}),
                "components[1].args.noise_multiplier",
            ),
        ];
        for (name, args, key) in cases {
            let e = p(name, args.clone()).unwrap_err();
            assert!(
                e.contains("cfg.json") && e.contains(key),
                "{name} {args}: {e}"
            );
        }
    }

    #[test]
    fn dp_composes_with_the_plain_mean_only() {
        for (strategy, why) in [
            (json!("FedOpt"), "server optimizer"),
            (
                json!({"name": "FedAdam", "args": {"eta": 0.01}}),
                "server optimizer",
            ),
            (json!("Scaffold"), "SCAFFOLD"),
            (json!("FedMedian"), "robust rule"),
            (json!({"name": "Krum"}), "robust rule"),
            (
                json!({"name": "DPFedAvgFixed", "args": {"noise_multiplier": 1.0, "clipping_norm": 1.0}}),
                "DP cannot wrap DP",
            ),
        ] {
            let e = p(
                "DifferentialPrivacyServerSideFixedClipping",
                json!({"noise_multiplier": 1.0, "clipping_norm": 1.0, "strategy": strategy}),
            )
            .unwrap_err();
            assert!(
                e.contains("components[1].args.strategy") && e.contains(why),
                "{strategy}: {e}"
            );
        }
        let e = p(
            "DPFedAvgFixed",
            json!({"noise_multiplier": 1.0, "clipping_norm": 1.0, "strategy": {"name": "FedProx", "args": {"mu": -1.0}}}),
        )
        .unwrap_err();
        assert!(e.contains("components[1].args.strategy.args.mu"), "{e}");
    }

    #[test]
    fn adaptive_clipping_by_default_needs_enough_sites_for_its_count_noise() {
        let f = Path::new("cfg.json");
        let spec = p("DPFedAvgAdaptive", json!({"noise_multiplier": 2.0})).unwrap();
        let e = check_clients(f, "components[1]", &spec, 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("more than 10 × 2 results") && e.contains("at most 20"),
            "{e}"
        );
        assert!(check_clients(f, "components[1]", &spec, 21).is_ok());
        let fixed = p(
            "DPFedAvgAdaptive",
            json!({"noise_multiplier": 2.0, "clipped_count_stddev": 2.0}),
        )
        .unwrap();
        assert!(check_clients(f, "components[1]", &fixed, 2).is_ok());
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
