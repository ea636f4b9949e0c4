//! Which metric writers a job asks for: the receiver components of its server config, with
//! FLARE's names and arguments.
//!
//! - `TBAnalyticsReceiver` (`tb_folder`, default `tb_events`; FLARE's `events` is accepted
//!   and ignored): TensorBoard event files under `<job result>/<tb_folder>/<site>/`.
//! - `MLflowReceiver` (`kw_args`: `experiment_name` "FLARE FL Experiment", `run_name`,
//!   `experiment_tags`, `run_tags`; `tracking_uri` must be left out: the file store under
//!   `<job result>/mlruns/` is what gets written and downloaded; `artifact_location` and
//!   `buffer_flush_time` are accepted and ignored): one MLflow run per site, named as FLARE
//!   names them (`<site>-<job id[:6]>-<job name>[-<run_name>]`).
//!
//! A job that names neither gets TensorBoard (our choice: every job has curves to look at and
//! a dashboard to plot). The server config's top-level `"stream_metrics": false` turns the
//! whole pipeline off for a job: the sites' learners log nothing and nothing is written (the
//! global model's metrics still reach `admin status`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::job::{JobError, invalid, parse_args};

/// The receiver component names.
pub const RECEIVERS: [&str; 2] = ["TBAnalyticsReceiver", "MLflowReceiver"];

/// A job's tracking settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackingConfig {
    /// Whether the sites stream metrics at all.
    pub stream: bool,
    /// TensorBoard's folder under the job's result (`tb_events`).
    pub tensorboard: Option<String>,
    /// MLflow's file store.
    pub mlflow: Option<MlflowArgs>,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            stream: true,
            tensorboard: Some(DEFAULT_TB_FOLDER.into()),
            mlflow: None,
        }
    }
}

impl TrackingConfig {
    /// Tracking off.
    pub fn off() -> Self {
        TrackingConfig {
            stream: false,
            tensorboard: None,
            mlflow: None,
        }
    }

    /// Whether anything is written.
    pub fn is_on(&self) -> bool {
        self.stream && (self.tensorboard.is_some() || self.mlflow.is_some())
    }
}

/// TensorBoard's default folder.
pub const DEFAULT_TB_FOLDER: &str = "tb_events";

/// `MLflowReceiver`'s `kw_args`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlflowArgs {
    /// The experiment.
    #[serde(default = "default_experiment")]
    pub experiment_name: String,
    /// Appended to each site's run name.
    #[serde(default)]
    pub run_name: Option<String>,
    /// Tags set on the experiment's runs (FLARE sets them on the experiment; the file store
    /// keeps them per run).
    #[serde(default)]
    pub experiment_tags: BTreeMap<String, String>,
    /// Tags set on every run.
    #[serde(default)]
    pub run_tags: BTreeMap<String, String>,
}

fn default_experiment() -> String {
    "FLARE FL Experiment".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TbArgs {
    #[serde(default = "default_tb_folder")]
    tb_folder: String,
    #[serde(default)]
    #[allow(dead_code)]
    events: Option<serde_json::Value>,
}

fn default_tb_folder() -> String {
    DEFAULT_TB_FOLDER.into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MlflowReceiverArgs {
    #[serde(default)]
    tracking_uri: Option<String>,
    #[serde(default)]
    kw_args: Option<MlflowArgs>,
    #[serde(default)]
    #[allow(dead_code)]
    artifact_location: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    buffer_flush_time: Option<f64>,
    #[serde(default)]
    #[allow(dead_code)]
    events: Option<serde_json::Value>,
}

/// Builds a job's tracking settings from its receiver components (`(index, name, args)` of
/// each component whose name is in [`RECEIVERS`]) and its `stream_metrics` key.
pub fn parse(
    file: &Path,
    receivers: &[(usize, &str, serde_json::Value)],
    stream_metrics: Option<bool>,
) -> Result<TrackingConfig, JobError> {
    if stream_metrics == Some(false) {
        return Ok(TrackingConfig::off());
    }
    if receivers.is_empty() {
        return Ok(TrackingConfig::default());
    }
    let mut out = TrackingConfig {
        stream: true,
        tensorboard: None,
        mlflow: None,
    };
    for (i, name, args) in receivers {
        let key = format!("components[{i}]");
        match *name {
            "TBAnalyticsReceiver" => {
                let a: TbArgs = parse_args(file, &key, args.clone())?;
                if !crate::net::download::safe_name(&a.tb_folder) || a.tb_folder.contains('/') {
                    return Err(invalid(
                        file,
                        format!("{key}.args.tb_folder"),
                        format!(
                            "{:?} must be one plain folder name inside the job's result",
                            a.tb_folder
                        ),
                    ));
                }
                if out.tensorboard.replace(a.tb_folder).is_some() {
                    return Err(invalid(file, key, "a second TBAnalyticsReceiver"));
                }
            }
            "MLflowReceiver" => {
                let a: MlflowReceiverArgs = parse_args(file, &key, args.clone())?;
                if let Some(uri) = a.tracking_uri {
                    return Err(invalid(
                        file,
                        format!("{key}.args.tracking_uri"),
                        format!(
                            "{uri:?}: Flare writes MLflow's file store under the job's result (mlruns/, downloaded with it); leave tracking_uri out"
                        ),
                    ));
                }
                let kw = a.kw_args.unwrap_or(MlflowArgs {
                    experiment_name: default_experiment(),
                    run_name: None,
                    experiment_tags: BTreeMap::new(),
                    run_tags: BTreeMap::new(),
                });
                if kw.experiment_name.trim().is_empty() {
                    return Err(invalid(
                        file,
                        format!("{key}.args.kw_args.experiment_name"),
                        "must not be empty",
                    ));
                }
                if out.mlflow.replace(kw).is_some() {
                    return Err(invalid(file, key, "a second MLflowReceiver"));
                }
            }
            other => {
                return Err(invalid(
                    file,
                    format!("{key}.name"),
                    format!("{other:?} is not a metrics receiver"),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(
        r: &[(usize, &str, serde_json::Value)],
        s: Option<bool>,
    ) -> Result<TrackingConfig, String> {
        parse(Path::new("config_fed_server.json"), r, s).map_err(|e| e.to_string())
    }

    #[test]
    fn no_receiver_means_tensorboard_and_stream_false_means_off() {
        assert_eq!(p(&[], None).unwrap(), TrackingConfig::default());
        assert!(TrackingConfig::default().is_on());
        let off = p(&[(0, "TBAnalyticsReceiver", json!({}))], Some(false)).unwrap();
        assert!(!off.is_on());
    }

    #[test]
    fn receivers_take_flare_arguments() {
        let c = p(
            &[
                (3, "TBAnalyticsReceiver", json!({"tb_folder": "tb", "events": ["fed.analytix_log_stats"]})),
                (4, "MLflowReceiver", json!({"kw_args": {"experiment_name": "e", "run_name": "r", "run_tags": {"a": "b"}}, "buffer_flush_time": 1})),
            ],
            None,
        )
        .unwrap();
        assert_eq!(c.tensorboard.as_deref(), Some("tb"));
        let m = c.mlflow.unwrap();
        assert_eq!(
            (m.experiment_name.as_str(), m.run_name.as_deref()),
            ("e", Some("r"))
        );
        // MLflow alone: no TensorBoard.
        let c = p(&[(0, "MLflowReceiver", json!({}))], None).unwrap();
        assert!(c.tensorboard.is_none());
        assert_eq!(c.mlflow.unwrap().experiment_name, "FLARE FL Experiment");
    }

    #[test]
    fn bad_receivers_name_the_key() {
        let e = p(
            &[(2, "TBAnalyticsReceiver", json!({"tb_folder": "../x"}))],
            None,
        )
        .unwrap_err();
        assert!(e.contains("components[2].args.tb_folder"), "{e}");
        let e = p(
            &[(1, "MLflowReceiver", json!({"tracking_uri": "http://x"}))],
            None,
        )
        .unwrap_err();
        assert!(e.contains("components[1].args.tracking_uri"), "{e}");
        let e = p(&[(1, "TBAnalyticsReceiver", json!({"tb_fold": "x"}))], None).unwrap_err();
        assert!(e.contains("components[1].args"), "{e}");
    }
}
