//! Job folders in FLARE's layout, and the registry of built-in components they name.
//!
//! ```text
//! my-job/
//!   meta.json                       name, min_clients, mandatory_clients, deploy_map
//!   app/config/config_fed_server.json   workflows + components (model, aggregator, persistor)
//!   app/config/config_fed_client.json   executors (the learner and the tasks it serves)
//! ```
//! Config files may also be YAML (`.yml`/`.yaml`). Every error names the file and the key.
//!
//! A job comes from an admin and reaches the server and every site, so what it can make a
//! node allocate is bounded, not only the bytes it ships: `meta.json` is at most
//! [`MAX_META_BYTES`] and each config file [`MAX_CONFIG_BYTES`] (checked on the open file
//! before it is read), the deploy map names at most [`MAX_APPS`] apps and [`MAX_DEPLOY_NAMES`]
//! sites in all, `mandatory_clients` at most [`MAX_DEPLOY_NAMES`], and every site name is at
//! most [`MAX_SITE_NAME`] bytes (a site name is a certificate CN). Names past a limit are
//! counted, not stored, so the error can say how many there were.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use flare_protocols::aggregators::AggregatorSpec;
use flare_protocols::model::FLModel;
use flare_protocols::secagg::SecAggArgs;
use flare_protocols::workflows::cse::CseArgs;
use flare_protocols::workflows::cyclic::CyclicArgs;
use flare_protocols::workflows::scatter_gather::SagConfig;
use flare_protocols::workflows::swarm::SwarmArgs;
use flare_protocols::workflows::tiered::{self, TieredArgs};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::data::{Dataset, Partition};
use crate::filters::{FilterChains, ScopeEntry};
use crate::learner::Learner;
use crate::learner::cnn::{self, CnnHyper, DeviceSpec, OptimizerKind};
use crate::learner::mlp::{Mlp, MlpHyper, MlpLearner};
use crate::learner::script::{ScriptArgs, ScriptLearner, ScriptSite, TransferType};
use crate::learner::synthetic::{SyntheticArgs, SyntheticLearner};
use crate::stats::{StatsSource, StatsWorkflow};

/// Why a job could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is larger than its cap; nothing of it was read.
    #[error("{path}: {len} bytes, at most {limit}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The cap for that file.
        limit: u64,
    },
    /// A file is malformed or a key has a bad value.
    #[error("{file}: {key}: {reason}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The key, as a path such as `workflows[0].args.num_rounds` (`.` for the whole file).
        key: String,
        /// What is wrong.
        reason: String,
    },
}

pub(crate) fn invalid(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> JobError {
    JobError::Invalid {
        file: file.to_path_buf(),
        key: key.into(),
        reason: reason.into(),
    }
}

/// The largest `meta.json` read (bytes). A few thousand site names fit many times over.
pub const MAX_META_BYTES: u64 = 1 << 20;
/// The largest server or client config file read (bytes).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// The most app folders a deploy map may name.
pub const MAX_APPS: usize = 64;
/// The most site names a deploy map may hold in all its apps, and the most
/// `mandatory_clients`. FLARE federations have at most a few thousand sites.
pub const MAX_DEPLOY_NAMES: usize = 4096;
/// The longest site name (bytes): it is a certificate CN, which X.509 caps at 64.
pub const MAX_SITE_NAME: usize = 64;
/// The longest job name and app folder name (bytes).
pub const MAX_NAME: usize = 255;

/// Reads a file of at most `limit` bytes as UTF-8. The length is checked on the open file
/// before anything is read, and the read stops at the cap whatever the file claims.
fn read_capped(path: &Path, limit: u64) -> Result<String, JobError> {
    use std::io::Read;
    let io = |source| JobError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len > limit {
        return Err(JobError::TooLarge {
            path: path.to_path_buf(),
            len,
            limit,
        });
    }
    let mut text = String::new();
    f.take(limit + 1).read_to_string(&mut text).map_err(io)?;
    if text.len() as u64 > limit {
        return Err(JobError::TooLarge {
            path: path.to_path_buf(),
            len: text.len() as u64,
            limit,
        });
    }
    Ok(text)
}

/// Parses JSON or YAML (by extension) into `T`, naming the failing key; refuses a file over
/// `limit` bytes before reading it.
fn parse_file<T: DeserializeOwned>(path: &Path, limit: u64) -> Result<T, JobError> {
    let text = read_capped(path, limit)?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yml" | "yaml")
    );
    let located = |key: String, reason: String| {
        let key = if key.is_empty() || key == "?" {
            ".".into()
        } else {
            key
        };
        invalid(path, key, reason)
    };
    if yaml {
        let de = serde_yaml::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| located(e.path().to_string(), e.inner().to_string()))
    } else {
        let mut de = serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(&mut de)
            .map_err(|e| located(e.path().to_string(), e.inner().to_string()))
    }
}

/// Parses a component's `args` into `T`, naming `key.args.<field>` on error.
pub(crate) fn parse_args<T: DeserializeOwned>(
    file: &Path,
    key: &str,
    args: serde_json::Value,
) -> Result<T, JobError> {
    serde_path_to_error::deserialize(args).map_err(|e| {
        let inner = e.path().to_string();
        let at = if inner.is_empty() || inner == "." {
            format!("{key}.args")
        } else {
            format!("{key}.args.{inner}")
        };
        invalid(file, at, e.inner().to_string())
    })
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobMeta {
    /// Job name.
    pub name: String,
    /// Clients needed to run the job.
    #[serde(default = "one")]
    pub min_clients: usize,
    /// Clients that must take part (at most [`MAX_DEPLOY_NAMES`]).
    #[serde(default, deserialize_with = "bounded::mandatory_clients")]
    pub mandatory_clients: Vec<String>,
    /// App folder → sites it deploys to (`@ALL`, `server`, or site names); at most
    /// [`MAX_APPS`] apps and [`MAX_DEPLOY_NAMES`] names in all.
    #[serde(deserialize_with = "bounded::deploy_map")]
    pub deploy_map: BTreeMap<String, Vec<String>>,
    /// What the job needs of each site (or `@ALL`): GPUs and their memory, which the
    /// server's scheduler waits for ([`crate::roles::resources`]).
    #[serde(default)]
    pub resource_spec: BTreeMap<String, crate::roles::resources::ResourceAsk>,
    /// The privacy scope the job asks of each site (FLARE's `scope`): a name in the site's
    /// `local/privacy.json`; none means the site's `default_scope`.
    #[serde(default)]
    pub scope: Option<String>,
}

fn one() -> usize {
    1
}

/// Deserializers for the lists in `meta.json` that stop storing at their limits: past a limit
/// the rest is only counted (as [`serde::de::IgnoredAny`]), so a million names cost no more
/// memory than the limit, and the error says how many there were.
mod bounded {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::Deserializer;
    use serde::de::{Error, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use super::{MAX_APPS, MAX_DEPLOY_NAMES, MAX_NAME, MAX_SITE_NAME};

    /// Reads a list of site names into `out` while `out` stays within `max` in all (counting
    /// `counted` too); returns how many names the list held.
    fn names<'de, A: SeqAccess<'de>>(
        mut seq: A,
        out: &mut Vec<String>,
        counted: &mut usize,
        max: usize,
    ) -> Result<(), A::Error> {
        loop {
            if *counted < max {
                let Some(name) = seq.next_element::<String>()? else {
                    return Ok(());
                };
                if name.len() > MAX_SITE_NAME {
                    return Err(A::Error::custom(format!(
                        "site name of {} bytes, at most {MAX_SITE_NAME}",
                        name.len()
                    )));
                }
                out.push(name);
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            *counted += 1;
        }
    }

    struct Names;

    impl<'de> Visitor<'de> for Names {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of site names")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            let mut n = 0;
            names(seq, &mut out, &mut n, MAX_DEPLOY_NAMES)?;
            if n > MAX_DEPLOY_NAMES {
                return Err(A::Error::custom(format!(
                    "{n} names, at most {MAX_DEPLOY_NAMES}"
                )));
            }
            Ok(out)
        }
    }

    /// `mandatory_clients`: at most [`MAX_DEPLOY_NAMES`] names of at most [`MAX_SITE_NAME`]
    /// bytes.
    pub(super) fn mandatory_clients<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<String>, D::Error> {
        d.deserialize_seq(Names)
    }

    /// One app's list of names, sharing the deploy map's count.
    struct AppNames<'a> {
        counted: &'a mut usize,
    }

    impl<'de> serde::de::DeserializeSeed<'de> for AppNames<'_> {
        type Value = Vec<String>;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<String>, D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for AppNames<'_> {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of site names")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            names(seq, &mut out, self.counted, MAX_DEPLOY_NAMES)?;
            Ok(out)
        }
    }

    struct DeployMap;

    impl<'de> Visitor<'de> for DeployMap {
        type Value = BTreeMap<String, Vec<String>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of app folder to site names")
        }

        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<BTreeMap<String, Vec<String>>, A::Error> {
            let mut out = BTreeMap::new();
            let mut names = 0usize;
            let mut apps = 0usize;
            while let Some(app) = map.next_key::<String>()? {
                apps += 1;
                if apps > MAX_APPS {
                    // Count the rest without keeping it.
                    map.next_value::<IgnoredAny>()?;
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {
                        apps += 1;
                    }
                    return Err(A::Error::custom(format!("{apps} apps, at most {MAX_APPS}")));
                }
                if app.len() > MAX_NAME {
                    return Err(A::Error::custom(format!(
                        "app folder name of {} bytes, at most {MAX_NAME}",
                        app.len()
                    )));
                }
                let sites = map.next_value_seed(AppNames {
                    counted: &mut names,
                })?;
                out.insert(app, sites);
            }
            if names > MAX_DEPLOY_NAMES {
                return Err(A::Error::custom(format!(
                    "{names} names, at most {MAX_DEPLOY_NAMES}"
                )));
            }
            Ok(out)
        }
    }

    /// `deploy_map`: at most [`MAX_APPS`] apps and [`MAX_DEPLOY_NAMES`] names in all.
    pub(super) fn deploy_map<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<String>>, D::Error> {
        d.deserialize_map(DeployMap)
    }
}

/// A `{ "id", "name", "args" }` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComponentEntry {
    #[serde(default)]
    id: String,
    name: String,
    #[serde(default = "empty_args")]
    args: serde_json::Value,
}

pub(crate) fn empty_args() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    #[serde(default)]
    format_version: Option<u32>,
    workflows: Vec<ComponentEntry>,
    #[serde(default)]
    components: Vec<ComponentEntry>,
    #[serde(default)]
    task_data_filters: Vec<ScopeEntry>,
    #[serde(default)]
    task_result_filters: Vec<ScopeEntry>,
    /// `false` turns metric streaming off for the job ([`crate::tracking::config`]).
    #[serde(default)]
    stream_metrics: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    #[serde(default)]
    format_version: Option<u32>,
    executors: Vec<ExecutorEntry>,
    #[serde(default)]
    components: Vec<ComponentEntry>,
    #[serde(default)]
    task_data_filters: Vec<ScopeEntry>,
    #[serde(default)]
    task_result_filters: Vec<ScopeEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecutorEntry {
    tasks: Vec<String>,
    executor: ComponentEntry,
}

/// Arguments of the `ScatterAndGather` workflow (FLARE's names; durations in seconds).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SagArgs {
    num_rounds: u32,
    #[serde(default)]
    start_round: u32,
    #[serde(default = "one")]
    min_clients: usize,
    #[serde(default = "default_wait")]
    wait_time_after_min_received: f64,
    #[serde(default = "default_timeout", alias = "train_timeout")]
    task_timeout: f64,
    #[serde(default = "yes")]
    validate_final: bool,
    #[serde(default = "model_id")]
    model_id: String,
    #[serde(default = "aggregator_id")]
    aggregator_id: String,
    #[serde(default = "persistor_id")]
    persistor_id: String,
    /// SecAgg+ settings: the server learns only each round's sum (`crate::secagg`).
    #[serde(default)]
    secure_aggregation: Option<SecAggArgs>,
}

fn default_wait() -> f64 {
    10.0
}
fn default_timeout() -> f64 {
    600.0
}
fn yes() -> bool {
    true
}
fn model_id() -> String {
    "model".into()
}
fn aggregator_id() -> String {
    "aggregator".into()
}
fn persistor_id() -> String {
    "persistor".into()
}

/// Where the initial global model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A fresh MNIST MLP (`MnistMlp`).
    MnistMlp {
        /// Hidden units.
        hidden: usize,
        /// Initialization seed.
        seed: u64,
    },
    /// A fresh MNIST CNN (`MnistCnn`), initialized in pure Rust like PyTorch's defaults.
    MnistCnn {
        /// Initialization seed.
        seed: u64,
    },
    /// A synthetic model of a given size (`SyntheticModel`).
    Synthetic(SyntheticArgs),
    /// Weights from a safetensors file (`SafetensorsModel`).
    File(PathBuf),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MnistMlpModelArgs {
    #[serde(default = "hidden")]
    hidden: usize,
    #[serde(default)]
    seed: u64,
}

fn hidden() -> usize {
    64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MnistCnnModelArgs {
    #[serde(default)]
    seed: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModelArgs {
    path: PathBuf,
}

/// How the server persists global models (`SafetensorsPersistor`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersistorConfig {
    /// Write every round's global model, not only the final one.
    pub save_every_round: bool,
}

impl Default for PersistorConfig {
    fn default() -> Self {
        PersistorConfig {
            save_every_round: true,
        }
    }
}

/// Which workflow a job runs.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkflowSpec {
    /// Server-controlled FedAvg (`ScatterAndGather`); settings in [`ServerApp::sag`].
    ScatterAndGather,
    /// Client-controlled swarm learning (`Swarm`, FLARE's `SwarmServerController`).
    Swarm(Box<SwarmArgs>),
    /// Client-controlled cyclic weight transfer (`Cyclic`, FLARE's
    /// `CyclicServerController`).
    Cyclic(Box<CyclicArgs>),
    /// Federated statistics (FLARE's `StatisticsController`, [`crate::stats`]).
    Statistics(Box<StatsWorkflow>),
}

impl WorkflowSpec {
    /// The workflow's name as bound into sealed transfers.
    pub fn wire_name(&self) -> &'static str {
        match self {
            WorkflowSpec::ScatterAndGather => "scatter_and_gather",
            WorkflowSpec::Swarm(_) => SWARM_WIRE_NAME,
            WorkflowSpec::Cyclic(_) => "cyclic",
            WorkflowSpec::Statistics(_) => "statistics",
        }
    }

    /// Whether the clients run the workflow (the server only configures, starts and watches).
    pub fn client_controlled(&self) -> bool {
        matches!(self, WorkflowSpec::Swarm(_) | WorkflowSpec::Cyclic(_))
    }
}

/// The workflow name a cross-site evaluation binds into sealed transfers.
pub const CSE_WIRE_NAME: &str = "cross_site_eval";
/// The wire name of a swarm, bound into its sealed peer messages (also a tiered job's region
/// swarm).
pub const SWARM_WIRE_NAME: &str = "swarm";

/// The server side of an app: the workflow and its components.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerApp {
    /// The workflow the job runs.
    pub workflow: WorkflowSpec,
    /// A client-side cross-site evaluation run after a client-controlled workflow
    /// (`CrossSiteEval`, FLARE's `CrossSiteEvalServerController`, as the second workflow).
    pub evaluation: Option<CseArgs>,
    /// A tiered job's arguments (`TieredScatterAndGather`): tier 1 runs `sag` over the
    /// regions' hubs, and each hub runs its region's rounds with these.
    pub tiered: Option<TieredArgs>,
    /// Scatter-and-gather settings (the defaults when the workflow is another one).
    pub sag: SagConfig,
    /// The initial model; none for a workflow that trains nothing (`StatisticsController`).
    pub model: Option<ModelSource>,
    /// Persistence settings.
    pub persistor: PersistorConfig,
    /// Filters on tasks going out and results coming in (`task_data_filters`,
    /// `task_result_filters`).
    pub filters: FilterChains,
    /// The aggregation algorithm (the `aggregator` component, [`crate::aggregators`]).
    pub aggregator: AggregatorSpec,
    /// Which metric writers the job asks for (its receiver components,
    /// [`crate::tracking::config`]).
    pub tracking: crate::tracking::config::TrackingConfig,
    /// Secure aggregation (the `secure_aggregation` argument of ScatterAndGather or Swarm).
    pub secagg: Option<SecAggArgs>,
}

/// The clients a workflow's arguments can be checked against before deploy: the ones they
/// name, and `at_least` stand-ins (no site can be named so) for the sites the job will find.
fn stand_in_clients<'a>(named: impl Iterator<Item = &'a String>, at_least: usize) -> Vec<String> {
    let mut clients: Vec<String> = named.cloned().collect();
    clients.extend((0..at_least.max(1)).map(|i| format!("\u{0}site-{i}")));
    clients.sort();
    clients.dedup();
    clients
}

fn seconds(file: &Path, key: &str, v: f64) -> Result<Duration, JobError> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| invalid(file, key, format!("{v} is not a valid number of seconds")))
}

/// The server app of a `StatisticsController` job: the controller and its writer, and
/// nothing else (no model, no second workflow, no server filters: statistics tasks and
/// results carry no model, and the cleansers run at the sites).
fn statistics_app(
    file: &Path,
    f: &ServerFile,
    wf: &ComponentEntry,
    second: bool,
) -> Result<ServerApp, JobError> {
    if second {
        return Err(invalid(
            file,
            "workflows[1]",
            "StatisticsController runs alone: no second workflow",
        ));
    }
    let comps: Vec<crate::stats::config::ComponentRef<'_>> = f
        .components
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.id.as_str(), c.name.as_str(), &c.args))
        .collect();
    let (stats, wi) =
        crate::stats::config::parse_workflow(file, "workflows[0]", wf.args.clone(), &comps)?;
    if let Some((i, c)) = f.components.iter().enumerate().find(|(i, _)| *i != wi) {
        return Err(invalid(
            file,
            format!("components[{i}]"),
            format!(
                "component {:?} ({}) is not used by the StatisticsController",
                c.id, c.name
            ),
        ));
    }
    for (list, empty) in [
        ("task_data_filters", f.task_data_filters.is_empty()),
        ("task_result_filters", f.task_result_filters.is_empty()),
    ] {
        if !empty {
            return Err(invalid(
                file,
                list,
                "statistics tasks and results carry no model for the server's filters: cleanse at the sites (StatisticsPrivacyFilter)",
            ));
        }
    }
    let sag = SagConfig {
        num_rounds: stats.passes(),
        start_round: 0,
        min_clients: stats.controller.min_clients.unwrap_or(1),
        wait_time_after_min_received: stats.controller.wait_time_after_min_received,
        task_timeout: stats.controller.result_wait_timeout,
        validate_final: false,
    };
    Ok(ServerApp {
        workflow: WorkflowSpec::Statistics(Box::new(stats)),
        evaluation: None,
        tiered: None,
        sag,
        model: None,
        persistor: PersistorConfig::default(),
        filters: FilterChains::default(),
        aggregator: AggregatorSpec::default(),
        tracking: crate::tracking::config::TrackingConfig::off(),
        secagg: None,
    })
}

impl ServerApp {
    /// Loads `<app>/config/config_fed_server.{json,yml,yaml}`.
    pub fn load(app_dir: &Path) -> Result<ServerApp, JobError> {
        let file = config_file(app_dir, "config_fed_server")?;
        let f: ServerFile = parse_file(&file, MAX_CONFIG_BYTES)?;
        check_format(&file, f.format_version)?;
        let (wf, evaluation) = match f.workflows.as_slice() {
            [wf] => (wf, None),
            [wf, eval] => (wf, Some(eval)),
            _ => {
                return Err(invalid(
                    &file,
                    "workflows",
                    format!(
                        "one workflow, or a client-controlled one followed by CrossSiteEval, is supported; found {}",
                        f.workflows.len()
                    ),
                ));
            }
        };
        if wf.name == "StatisticsController" {
            return statistics_app(&file, &f, wf, evaluation.is_some());
        }
        let mut tiered = None;
        let (workflow, a) = match wf.name.as_str() {
            "ScatterAndGather" => (
                WorkflowSpec::ScatterAndGather,
                parse_args::<SagArgs>(&file, "workflows[0]", wf.args.clone())?,
            ),
            "Swarm" | "SwarmServerController" => {
                let x: SwarmArgs = parse_args(&file, "workflows[0]", wf.args.clone())?;
                // Check what needs no client list now; the rest is checked at deploy.
                let named = x
                    .train_clients
                    .iter()
                    .chain(&x.aggr_clients)
                    .chain(&x.result_clients)
                    .chain(&x.starting_client);
                x.to_config(&stand_in_clients(named, x.min_clients), 0)
                    .map_err(|e| invalid(&file, "workflows[0].args", e.to_string()))?;
                let sag = SagArgs {
                    num_rounds: x.num_rounds,
                    start_round: x.start_round,
                    min_clients: x.min_clients,
                    wait_time_after_min_received: x.wait_time_after_min_resps_received,
                    task_timeout: x.learn_task_timeout,
                    validate_final: true,
                    model_id: model_id(),
                    aggregator_id: aggregator_id(),
                    persistor_id: persistor_id(),
                    secure_aggregation: x.secure_aggregation,
                };
                (WorkflowSpec::Swarm(Box::new(x)), sag)
            }
            "Cyclic" | "CyclicServerController" => {
                let x: CyclicArgs = parse_args(&file, "workflows[0]", wf.args.clone())?;
                // Check what needs no client list now; the rest is checked at deploy.
                let named = x.result_clients.iter().chain(&x.starting_client);
                x.to_config(&stand_in_clients(named, 1), 0)
                    .map_err(|e| invalid(&file, "workflows[0].args", e.to_string()))?;
                let sag = SagArgs {
                    num_rounds: x.num_rounds,
                    start_round: x.start_round,
                    min_clients: 1,
                    wait_time_after_min_received: 0.0,
                    task_timeout: x.learn_task_timeout,
                    validate_final: false,
                    model_id: model_id(),
                    aggregator_id: aggregator_id(),
                    persistor_id: persistor_id(),
                    secure_aggregation: None,
                };
                (WorkflowSpec::Cyclic(Box::new(x)), sag)
            }
            tiered::WORKFLOW_NAME => {
                // Tier 1 runs scatter-and-gather over the regions' hubs; each hub reads the
                // rest of these arguments.
                let x: TieredArgs = parse_args(&file, "workflows[0]", wf.args.clone())?;
                x.validate()
                    .map_err(|e| invalid(&file, "workflows[0].args", e.to_string()))?;
                let top = x.top_config();
                let sag = SagArgs {
                    num_rounds: x.num_rounds,
                    start_round: 0,
                    min_clients: x.min_regions,
                    wait_time_after_min_received: x.wait_time_after_min_received,
                    task_timeout: top.task_timeout.as_secs_f64(),
                    validate_final: x.validate_final,
                    model_id: x.model_id.clone(),
                    aggregator_id: x.aggregator_id.clone(),
                    persistor_id: x.persistor_id.clone(),
                    secure_aggregation: None,
                };
                tiered = Some(x);
                (WorkflowSpec::ScatterAndGather, sag)
            }
            other => {
                return Err(invalid(
                    &file,
                    "workflows[0].name",
                    format!(
                        "unknown workflow {other:?} (known: ScatterAndGather, Swarm, Cyclic, TieredScatterAndGather, StatisticsController; CrossSiteEval as the second)"
                    ),
                ));
            }
        };
        let evaluation = match evaluation {
            None => None,
            Some(e) => {
                if !matches!(
                    e.name.as_str(),
                    "CrossSiteEval" | "CrossSiteEvalServerController"
                ) {
                    return Err(invalid(
                        &file,
                        "workflows[1].name",
                        format!(
                            "unknown second workflow {:?} (known: CrossSiteEval)",
                            e.name
                        ),
                    ));
                }
                if !workflow.client_controlled() {
                    return Err(invalid(
                        &file,
                        "workflows[1]",
                        "CrossSiteEval runs after a client-controlled workflow (Swarm or Cyclic), not after ScatterAndGather",
                    ));
                }
                let x: CseArgs = parse_args(&file, "workflows[1]", e.args.clone())?;
                let named = x
                    .evaluators
                    .iter()
                    .chain(&x.evaluatees)
                    .chain(&x.global_model_client);
                x.to_config(&stand_in_clients(named, 1), 0, None)
                    .map_err(|e| invalid(&file, "workflows[1].args", e.to_string()))?;
                Some(x)
            }
        };
        let sag = SagConfig {
            num_rounds: a.num_rounds,
            start_round: a.start_round,
            min_clients: a.min_clients,
            wait_time_after_min_received: seconds(
                &file,
                "workflows[0].args.wait_time_after_min_received",
                a.wait_time_after_min_received,
            )?,
            task_timeout: seconds(&file, "workflows[0].args.task_timeout", a.task_timeout)?,
            validate_final: a.validate_final,
        };
        if sag.num_rounds == 0 {
            return Err(invalid(
                &file,
                "workflows[0].args.num_rounds",
                "must be at least 1",
            ));
        }
        if sag.task_timeout.is_zero() {
            return Err(invalid(
                &file,
                "workflows[0].args.task_timeout",
                "must be positive",
            ));
        }
        let mut seen = BTreeMap::new();
        for (i, c) in f.components.iter().enumerate() {
            if seen.insert(c.id.as_str(), i).is_some() {
                return Err(invalid(
                    &file,
                    format!("components[{i}].id"),
                    format!("duplicate id {:?}", c.id),
                ));
            }
        }
        let find = |id: &str, arg: &str| {
            seen.get(id).map(|&i| (i, &f.components[i])).ok_or_else(|| {
                invalid(
                    &file,
                    format!("workflows[0].args.{arg}"),
                    format!("no component with id {id:?}"),
                )
            })
        };
        let (mi, m) = find(&a.model_id, "model_id")?;
        let key = format!("components[{mi}]");
        let model = match m.name.as_str() {
            "MnistMlp" => {
                let x: MnistMlpModelArgs = parse_args(&file, &key, m.args.clone())?;
                ModelSource::MnistMlp {
                    hidden: x.hidden,
                    seed: x.seed,
                }
            }
            "MnistCnn" => {
                let x: MnistCnnModelArgs = parse_args(&file, &key, m.args.clone())?;
                ModelSource::MnistCnn { seed: x.seed }
            }
            "SyntheticModel" => ModelSource::Synthetic(parse_args(&file, &key, m.args.clone())?),
            "SafetensorsModel" => {
                let x: FileModelArgs = parse_args(&file, &key, m.args.clone())?;
                ModelSource::File(app_dir.join(x.path))
            }
            other => {
                return Err(invalid(
                    &file,
                    format!("{key}.name"),
                    format!(
                        "unknown model {other:?} (known: MnistMlp, MnistCnn, SyntheticModel, SafetensorsModel)"
                    ),
                ));
            }
        };
        let (ai, agg) = find(&a.aggregator_id, "aggregator_id")?;
        let key = format!("components[{ai}]");
        let aggregator =
            crate::aggregators::parse(&file, &key, &agg.name, agg.args.clone(), sag.num_rounds)?;
        let refuse = |why: String| Err(invalid(&file, format!("{key}.name"), why));
        match &workflow {
            _ if aggregator == AggregatorSpec::default() => {}
            WorkflowSpec::Cyclic(_) => {
                return refuse(format!(
                    "{} aggregates, and a Cyclic run has nothing to aggregate (the model goes site to site): use FedAvg",
                    agg.name
                ));
            }
            _ if tiered.is_some() => {
                return refuse(format!(
                    "{} is not supported in a TieredScatterAndGather job yet (regions send partial sums, which only FedAvg combines): use FedAvg",
                    agg.name
                ));
            }
            _ => {}
        }
        if let Some(sa) = &a.secure_aggregation {
            let key = "workflows[0].args.secure_aggregation";
            if let Err(e) = sa.check() {
                let field = match &e {
                    flare_protocols::secagg::SecAggError::Config { field, .. } => {
                        format!("{key}.{field}")
                    }
                    _ => key.to_string(),
                };
                return Err(invalid(&file, field, e.to_string()));
            }
            if !flare_protocols::aggregators::Aggregator::new(aggregator).supports_secure() {
                return refuse(format!(
                    "{} needs each site's own update, and secure aggregation reveals only the sum: use FedAvg, FedProx or a DifferentialPrivacy aggregator with secure_aggregation",
                    agg.name
                ));
            }
            if tiered.is_some() {
                return Err(invalid(
                    &file,
                    key,
                    "secure aggregation is not supported in a TieredScatterAndGather job yet",
                ));
            }
        }
        let persistor = match seen.get(a.persistor_id.as_str()) {
            None => PersistorConfig::default(),
            Some(&pi) => {
                let p = &f.components[pi];
                if p.name != "SafetensorsPersistor" {
                    return Err(invalid(
                        &file,
                        format!("components[{pi}].name"),
                        format!(
                            "unknown persistor {:?} (known: SafetensorsPersistor)",
                            p.name
                        ),
                    ));
                }
                parse_args(&file, &format!("components[{pi}]"), p.args.clone())?
            }
        };
        let receivers: Vec<(usize, &str, serde_json::Value)> = f
            .components
            .iter()
            .enumerate()
            .filter(|(_, c)| crate::tracking::config::RECEIVERS.contains(&c.name.as_str()))
            .map(|(i, c)| (i, c.name.as_str(), c.args.clone()))
            .collect();
        let tracking = crate::tracking::config::parse(&file, &receivers, f.stream_metrics)?;
        if let Some((i, c)) = f.components.iter().enumerate().find(|(_, c)| {
            ![&a.model_id, &a.aggregator_id, &a.persistor_id].contains(&&c.id)
                && !crate::tracking::config::RECEIVERS.contains(&c.name.as_str())
        }) {
            return Err(invalid(
                &file,
                format!("components[{i}]"),
                format!(
                    "component {:?} ({}) is not used by any workflow",
                    c.id, c.name
                ),
            ));
        }
        let filters = FilterChains::parse(&file, f.task_data_filters, f.task_result_filters)?;
        if a.secure_aggregation.is_some() && filters.has_results() {
            return Err(invalid(
                &file,
                "task_result_filters",
                "with secure_aggregation the server gets only masked inputs, which no filter can read: filter on the sites, whose result filters run before their update is masked",
            ));
        }
        Ok(ServerApp {
            workflow,
            evaluation,
            tiered,
            sag,
            model: Some(model),
            persistor,
            filters,
            aggregator,
            tracking,
            secagg: a.secure_aggregation,
        })
    }

    /// Builds the initial global model.
    pub fn initial_model(&self) -> anyhow::Result<FLModel> {
        Ok(match &self.model {
            Some(ModelSource::MnistMlp { hidden, seed }) => Mlp::init(*hidden, *seed).to_model(),
            Some(ModelSource::MnistCnn { seed }) => cnn::init(*seed),
            Some(ModelSource::Synthetic(a)) => a.init()?,
            Some(ModelSource::File(path)) => crate::model_io::read(path)?,
            None => anyhow::bail!(
                "the job's workflow ({}) has no model",
                self.workflow.wire_name()
            ),
        })
    }
}

/// Arguments of `MnistMlpLearner`: where the data is, how it is split and partitioned, and
/// the training hyper-parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MnistLearnerArgs {
    /// Folder with the MNIST IDX files; relative paths start at the job folder.
    pub data_dir: PathBuf,
    /// Examples held out for validation (the rest is partitioned across sites).
    #[serde(default = "held_out")]
    pub held_out: usize,
    /// Seed of the train/held-out split.
    #[serde(default)]
    pub split_seed: u64,
    /// How the training part is divided across sites.
    #[serde(default)]
    pub partition: Partition,
    /// Seed of the partition.
    #[serde(default)]
    pub partition_seed: u64,
    /// Hidden units.
    #[serde(default = "hidden")]
    pub hidden: usize,
    /// Learning rate.
    #[serde(default = "lr")]
    pub lr: f32,
    /// Mini-batch size.
    #[serde(default = "batch")]
    pub batch_size: usize,
    /// Local epochs per round.
    #[serde(default = "one")]
    pub epochs: usize,
    /// Shuffle seed.
    #[serde(default)]
    pub seed: u64,
    /// `FULL` (the trained weights) or `DIFF` (trained minus received, what FLARE's privacy
    /// filters need): FLARE's Client API `params_transfer_type`.
    #[serde(default)]
    pub params_transfer_type: TransferType,
}

/// Arguments of `TorchCnnLearner` (feature `torch`): the data as for `MnistMlpLearner`, and
/// the CNN's training settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorchCnnArgs {
    /// Folder with the MNIST IDX files; relative paths start at the job folder.
    pub data_dir: PathBuf,
    /// Examples held out for validation (the rest is partitioned across sites).
    #[serde(default = "held_out")]
    pub held_out: usize,
    /// Seed of the train/held-out split.
    #[serde(default)]
    pub split_seed: u64,
    /// How the training part is divided across sites.
    #[serde(default)]
    pub partition: Partition,
    /// Seed of the partition.
    #[serde(default)]
    pub partition_seed: u64,
    /// Mini-batch size.
    #[serde(default = "cnn_batch")]
    pub batch_size: usize,
    /// Local epochs per round.
    #[serde(default = "one")]
    pub epochs: usize,
    /// Learning rate.
    #[serde(default = "cnn_lr")]
    pub lr: f64,
    /// `sgd`, `adam` or `adadelta`.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Dropout while training.
    #[serde(default = "yes")]
    pub dropout: bool,
    /// Seed of the shuffle and of dropout.
    #[serde(default)]
    pub seed: u64,
    /// `FULL` or `DIFF`, as for `MnistMlpLearner`.
    #[serde(default)]
    pub params_transfer_type: TransferType,
}

fn cnn_batch() -> usize {
    64
}
fn cnn_lr() -> f64 {
    1e-3
}

impl TorchCnnArgs {
    /// The training settings.
    pub fn hyper(&self) -> CnnHyper {
        CnnHyper {
            lr: self.lr,
            batch_size: self.batch_size,
            epochs: self.epochs,
            optimizer: self.optimizer,
            dropout: self.dropout,
            seed: self.seed,
        }
    }
}

fn held_out() -> usize {
    2000
}
fn lr() -> f32 {
    0.1
}
fn batch() -> usize {
    32
}

/// Which learner a client app runs.
#[derive(Debug, Clone, PartialEq)]
pub enum LearnerSpec {
    /// The built-in MNIST MLP.
    MnistMlp(MnistLearnerArgs),
    /// The LibTorch MNIST CNN (feature `torch`).
    TorchCnn(TorchCnnArgs),
    /// The synthetic benchmark learner.
    Synthetic(SyntheticArgs),
    /// The user's own program (`ScriptExecutor`, FLARE's `ClientAPILauncherExecutor`).
    Script(ScriptArgs),
    /// FLARE's `StatisticsExecutor` over its `generator_id` data source ([`crate::stats`]).
    Statistics {
        /// The source's index in the config's `components`.
        component: usize,
        /// The data source.
        source: StatsSource,
    },
}

/// Who a learner is for: the site, the job, and a folder of the site's for the job.
#[derive(Debug, Clone, Copy)]
pub struct LearnerSite<'a> {
    /// The site's name.
    pub site: &'a str,
    /// The job id.
    pub job_id: &'a str,
    /// A folder of this site for this job (the user's program keeps its socket and exchange
    /// files under it).
    pub work_dir: &'a Path,
    /// Where the learner logs its metrics ([`crate::tracking`]).
    pub tracker: &'a crate::tracking::Tracker,
    /// The GPUs the site reserved for the job (`None`: the site lends no GPUs, so the
    /// learner's own device setting stands).
    pub gpus: Option<&'a [u32]>,
}

/// The file in a site's job folder (the simulator's: `<workspace>/<site>/`) that holds its
/// label histogram; the simulator also writes every site's, as `label_histograms.json`, in
/// its outputs.
pub const LABEL_HISTOGRAM_FILE: &str = "label_histogram.json";

/// The client side of an app: which tasks it serves, with which learner.
#[derive(Debug)]
pub struct ClientApp {
    /// Task names the executor serves.
    pub tasks: Vec<String>,
    /// The learner.
    pub learner: LearnerSpec,
    /// The app folder.
    pub app_dir: PathBuf,
    /// Filters on tasks coming in and results going out (`task_data_filters`,
    /// `task_result_filters`).
    pub filters: FilterChains,
    file: PathBuf,
    /// MNIST train part, held-out part and the partition, loaded once for all sites.
    mnist: OnceLock<Result<MnistShared, String>>,
}

#[derive(Debug)]
struct MnistShared {
    train: Arc<Dataset>,
    held_out: Arc<Dataset>,
    parts: BTreeMap<usize, Vec<Vec<usize>>>,
}

impl ClientApp {
    /// Loads `<app>/config/config_fed_client.{json,yml,yaml}`.
    pub fn load(app_dir: &Path) -> Result<ClientApp, JobError> {
        let file = config_file(app_dir, "config_fed_client")?;
        let f: ClientFile = parse_file(&file, MAX_CONFIG_BYTES)?;
        check_format(&file, f.format_version)?;
        // Client components are statistics' data sources and cleansers.
        let comps: Vec<crate::stats::config::ComponentRef<'_>> = f
            .components
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.id.as_str(), c.name.as_str(), &c.args))
            .collect();
        let components = crate::stats::config::parse_components(&file, &comps)?;
        let [e] = f.executors.as_slice() else {
            return Err(invalid(
                &file,
                "executors",
                format!(
                    "exactly one executor is supported, found {}",
                    f.executors.len()
                ),
            ));
        };
        if e.tasks.is_empty() {
            return Err(invalid(&file, "executors[0].tasks", "lists no task"));
        }
        let key = "executors[0].executor";
        let learner = match e.executor.name.as_str() {
            "MnistMlpLearner" => {
                let mut a: MnistLearnerArgs = parse_args(&file, key, e.executor.args.clone())?;
                let job_dir = app_dir.parent().unwrap_or(app_dir);
                a.data_dir = resolve_data_dir(job_dir, &a.data_dir);
                if a.batch_size == 0 || a.hidden == 0 || !(a.lr.is_finite() && a.lr > 0.0) {
                    return Err(invalid(
                        &file,
                        format!("{key}.args"),
                        "hidden, batch_size and lr must be positive",
                    ));
                }
                LearnerSpec::MnistMlp(a)
            }
            "TorchCnnLearner" if cfg!(not(feature = "torch")) => {
                return Err(invalid(
                    &file,
                    format!("{key}.name"),
                    "TorchCnnLearner needs LibTorch, but this flare-node was built without the `torch` feature (rebuild with `--features torch`)",
                ));
            }
            "TorchCnnLearner" => {
                let mut a: TorchCnnArgs = parse_args(&file, key, e.executor.args.clone())?;
                a.data_dir = data_dir(&file, key, app_dir, &a.data_dir)?;
                if a.batch_size == 0 || a.epochs == 0 || !(a.lr.is_finite() && a.lr > 0.0) {
                    return Err(invalid(
                        &file,
                        format!("{key}.args"),
                        "batch_size, epochs and lr must be positive",
                    ));
                }
                LearnerSpec::TorchCnn(a)
            }
            "SyntheticLearner" => {
                LearnerSpec::Synthetic(parse_args(&file, key, e.executor.args.clone())?)
            }
            "ScriptExecutor" | "ClientAPILauncherExecutor" => {
                let a: ScriptArgs = parse_args(&file, key, e.executor.args.clone())?;
                a.check()
                    .map_err(|(arg, why)| invalid(&file, format!("{key}.args.{arg}"), why))?;
                LearnerSpec::Script(a)
            }
            "StatisticsExecutor" => {
                let (component, mut source) = crate::stats::config::executor_source(
                    &file,
                    key,
                    e.executor.args.clone(),
                    &components,
                )?;
                if let StatsSource::Mnist(a) = &mut source {
                    let job_dir = app_dir.parent().unwrap_or(app_dir);
                    a.data_dir = resolve_data_dir(job_dir, &a.data_dir);
                }
                LearnerSpec::Statistics { component, source }
            }
            other => {
                return Err(invalid(
                    &file,
                    format!("{key}.name"),
                    format!(
                        "unknown executor {other:?} (known: MnistMlpLearner, TorchCnnLearner, SyntheticLearner, ScriptExecutor, StatisticsExecutor)"
                    ),
                ));
            }
        };
        if let Some((_, (i, _))) = components
            .generators
            .iter()
            .find(|(_, (i, _))| !matches!(&learner, LearnerSpec::Statistics { component, .. } if component == i))
        {
            return Err(invalid(
                &file,
                format!("components[{i}]"),
                "a statistics data source that no StatisticsExecutor names (generator_id)",
            ));
        }
        let filters = FilterChains::parse_with(
            &file,
            f.task_data_filters,
            f.task_result_filters,
            &components.cleansers,
        )?;
        Ok(ClientApp {
            tasks: e.tasks.clone(),
            learner,
            app_dir: app_dir.to_path_buf(),
            filters,
            file,
            mnist: OnceLock::new(),
        })
    }

    fn mnist(&self, a: DataArgs<'_>, num_sites: usize) -> Result<&MnistShared, JobError> {
        let shared = self.mnist.get_or_init(|| {
            let ds = Dataset::load_mnist_test(a.data_dir).map_err(|e| e.to_string())?;
            let (train, held_out) = ds.split(a.held_out, a.split_seed);
            let parts = a
                .partition
                .split(&train.labels, num_sites, a.partition_seed)
                .map_err(|e| e.to_string())?;
            Ok(MnistShared {
                train: Arc::new(train),
                held_out: Arc::new(held_out),
                parts: BTreeMap::from([(num_sites, parts)]),
            })
        });
        match shared {
            Ok(s) if s.parts.contains_key(&num_sites) => Ok(s),
            Ok(_) => Err(invalid(
                &self.file,
                self.data_key("partition"),
                "the partition was made for another number of sites",
            )),
            Err(reason) => Err(invalid(
                &self.file,
                self.data_key("data_dir"),
                reason.clone(),
            )),
        }
    }

    /// The key of the data source's `arg`: the executor's, or a `StatisticsExecutor`'s
    /// generator component's.
    fn data_key(&self, arg: &str) -> String {
        match &self.learner {
            LearnerSpec::Statistics { component, .. } => {
                format!("components[{component}].args.{arg}")
            }
            _ => format!("executors[0].executor.args.{arg}"),
        }
    }

    /// Whether the app runs code the job brings (FLARE's BYOC): a `ScriptExecutor`, or a
    /// `custom/` folder.
    pub fn runs_custom_code(&self) -> bool {
        matches!(self.learner, LearnerSpec::Script(_)) || self.app_dir.join("custom").exists()
    }

    /// Where the MNIST learners' data comes from (none for other learners).
    fn data_args(&self) -> Option<DataArgs<'_>> {
        let (data_dir, held_out, split_seed, partition, partition_seed) = match &self.learner {
            LearnerSpec::MnistMlp(a) => (
                &a.data_dir,
                a.held_out,
                a.split_seed,
                &a.partition,
                a.partition_seed,
            ),
            LearnerSpec::TorchCnn(a) => (
                &a.data_dir,
                a.held_out,
                a.split_seed,
                &a.partition,
                a.partition_seed,
            ),
            LearnerSpec::Statistics {
                source: StatsSource::Mnist(a),
                ..
            } => (&a.data_dir, 0, 0, &a.partition, a.partition_seed),
            _ => return None,
        };
        Some(DataArgs {
            data_dir,
            held_out,
            split_seed,
            partition,
            partition_seed,
        })
    }

    /// The label histogram (samples per class) of the training part of site number `index`
    /// out of `num_sites`, for the learners that read MNIST; `None` for the others.
    pub fn label_histogram(
        &self,
        index: usize,
        num_sites: usize,
    ) -> Option<Result<Vec<usize>, JobError>> {
        let a = self.data_args()?;
        Some(self.mnist(a, num_sites).map(|s| {
            let part = s.parts[&num_sites]
                .get(index)
                .map_or(&[][..], Vec::as_slice);
            crate::data::label_histogram(&s.train.labels, part, 10)
        }))
    }

    /// Writes site `site`'s label histogram to `<work_dir>/label_histogram.json`
    /// (`{"site-1": [count of class 0, …]}`); a failure to write is logged, not fatal.
    fn write_label_histogram(&self, index: usize, num_sites: usize, site: &LearnerSite<'_>) {
        let Some(Ok(h)) = self.label_histogram(index, num_sites) else {
            return;
        };
        let one = crate::data::LabelHistograms(BTreeMap::from([(site.site.to_string(), h)]));
        let path = site.work_dir.join(LABEL_HISTOGRAM_FILE);
        let written = std::fs::create_dir_all(site.work_dir)
            .and_then(|()| std::fs::write(&path, serde_json::to_vec(&one).unwrap_or_default()));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the label histogram");
        }
    }

    /// The learner of site number `index` (0-based) out of `num_sites`.
    pub fn make_learner(
        &self,
        index: usize,
        num_sites: usize,
        site: LearnerSite<'_>,
    ) -> Result<Box<dyn Learner>, JobError> {
        self.write_label_histogram(index, num_sites, &site);
        Ok(match &self.learner {
            LearnerSpec::MnistMlp(a) => {
                let s = self.mnist(
                    DataArgs {
                        data_dir: &a.data_dir,
                        held_out: a.held_out,
                        split_seed: a.split_seed,
                        partition: &a.partition,
                        partition_seed: a.partition_seed,
                    },
                    num_sites,
                )?;
                let hyper = MlpHyper {
                    hidden: a.hidden,
                    lr: a.lr,
                    batch_size: a.batch_size,
                    epochs: a.epochs,
                    seed: a.seed,
                };
                Box::new(
                    MlpLearner::new(
                        hyper,
                        Arc::clone(&s.train),
                        s.parts[&num_sites][index].clone(),
                        Arc::clone(&s.held_out),
                        index as u64,
                    )
                    .with_params_transfer(a.params_transfer_type)
                    .with_tracker(site.tracker.clone()),
                )
            }
            LearnerSpec::TorchCnn(a) => self.torch_learner(a, index, num_sites, &site)?,
            LearnerSpec::Synthetic(a) => Box::new(SyntheticLearner::new(a.clone(), index)),
            LearnerSpec::Statistics { component, source } => {
                Box::new(self.stats_executor(*component, source, index, num_sites, site.site)?)
            }
            LearnerSpec::Script(a) => Box::new(ScriptLearner::new(
                a.clone(),
                ScriptSite {
                    app_dir: self.app_dir.clone(),
                    work_dir: site.work_dir.to_path_buf(),
                    job_id: site.job_id.to_string(),
                    site_name: site.site.to_string(),
                    tasks: self.tasks.clone(),
                    tracker: site.tracker.clone(),
                    gpus: site.gpus.map(<[u32]>::to_vec),
                },
            )),
        })
    }

    /// Site `index`'s `StatisticsExecutor`, its data read now: an unreadable file is the
    /// deploy's error, naming the config file and the source's key.
    fn stats_executor(
        &self,
        component: usize,
        source: &StatsSource,
        index: usize,
        num_sites: usize,
        site: &str,
    ) -> Result<crate::stats::StatsExecutor, JobError> {
        let data = match source {
            StatsSource::Mnist(a) => {
                let s = self.mnist(
                    DataArgs {
                        data_dir: &a.data_dir,
                        held_out: 0,
                        split_seed: 0,
                        partition: &a.partition,
                        partition_seed: a.partition_seed,
                    },
                    num_sites,
                )?;
                let part = s.parts[&num_sites]
                    .get(index)
                    .map_or(&[][..], Vec::as_slice);
                crate::stats::data::mnist_site(&s.train, part)
            }
            StatsSource::Csv(a) => {
                let job_dir = self.app_dir.parent().unwrap_or(&self.app_dir);
                let own = a.data_path.contains("{site}");
                let path =
                    resolve_data_file(job_dir, Path::new(&a.data_path.replace("{site}", site)));
                crate::stats::data::csv_site(&path, a, index, num_sites, own).map_err(|e| {
                    invalid(
                        &self.file,
                        format!("components[{component}].args.data_path"),
                        e.to_string(),
                    )
                })?
            }
        };
        Ok(crate::stats::StatsExecutor::new(data))
    }

    #[cfg(feature = "torch")]
    fn torch_learner(
        &self,
        a: &TorchCnnArgs,
        index: usize,
        num_sites: usize,
        site: &LearnerSite<'_>,
    ) -> Result<Box<dyn Learner>, JobError> {
        let device = a
            .device
            .within(site.gpus)
            .map_err(|e| invalid(&self.file, "executors[0].executor.args.device", e))?;
        let s = self.mnist(
            DataArgs {
                data_dir: &a.data_dir,
                held_out: a.held_out,
                split_seed: a.split_seed,
                partition: &a.partition,
                partition_seed: a.partition_seed,
            },
            num_sites,
        )?;
        let learner = crate::learner::torch::TorchCnnLearner::new(
            a.hyper(),
            device,
            &s.train,
            &s.parts[&num_sites][index],
            &s.held_out,
            index,
        )
        .map_err(|e| {
            invalid(
                &self.file,
                "executors[0].executor.args.device",
                e.to_string(),
            )
        })?;
        Ok(Box::new(
            learner
                .with_params_transfer(a.params_transfer_type)
                .with_tracker(site.tracker.clone()),
        ))
    }

    #[cfg(not(feature = "torch"))]
    fn torch_learner(
        &self,
        _: &TorchCnnArgs,
        _: usize,
        _: usize,
        _: &LearnerSite<'_>,
    ) -> Result<Box<dyn Learner>, JobError> {
        Err(invalid(
            &self.file,
            "executors[0].executor.name",
            "TorchCnnLearner needs LibTorch, but this flare-node was built without the `torch` feature",
        ))
    }
}

/// Where a learner's MNIST data comes from and how it is split.
#[derive(Debug, Clone, Copy)]
struct DataArgs<'a> {
    data_dir: &'a Path,
    held_out: usize,
    split_seed: u64,
    partition: &'a Partition,
    partition_seed: u64,
}

/// Resolves a learner's `data_dir` (see [`resolve_data_dir`]). Whether it exists is checked
/// where the data is read: at the site, not where the job is submitted.
fn data_dir(_file: &Path, _key: &str, app_dir: &Path, dir: &Path) -> Result<PathBuf, JobError> {
    let job_dir = app_dir.parent().unwrap_or(app_dir);
    Ok(resolve_data_dir(job_dir, dir))
}

/// Where a relative `data_dir` points: the job folder first (the simulator runs jobs in
/// place); then, for a job deployed to a site's workspace, `$FLARE_DATA_ROOT` and the working
/// directory, with the path's leading `..` components dropped. The first that exists wins;
/// otherwise the job-relative path, so the error names what the job asked for.
pub fn resolve_data_dir(job_dir: &Path, data_dir: &Path) -> PathBuf {
    resolve_data(job_dir, data_dir, Path::is_dir)
}

/// [`resolve_data_dir`] for a data file (a `CsvStats`'s `data_path`).
pub fn resolve_data_file(job_dir: &Path, path: &Path) -> PathBuf {
    resolve_data(job_dir, path, Path::is_file)
}

fn resolve_data(job_dir: &Path, data_dir: &Path, exists: fn(&Path) -> bool) -> PathBuf {
    if data_dir.is_absolute() {
        return data_dir.to_path_buf();
    }
    let in_job = job_dir.join(data_dir);
    if exists(&in_job) {
        return in_job;
    }
    let tail: PathBuf = data_dir
        .components()
        .skip_while(|c| {
            matches!(
                c,
                std::path::Component::ParentDir | std::path::Component::CurDir
            )
        })
        .collect();
    let roots = std::env::var_os("FLARE_DATA_ROOT")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::current_dir().ok());
    for root in roots {
        let p = root.join(&tail);
        if exists(&p) {
            return p;
        }
    }
    in_job
}

fn check_format(file: &Path, v: Option<u32>) -> Result<(), JobError> {
    match v {
        None | Some(2) => Ok(()),
        Some(other) => Err(invalid(
            file,
            "format_version",
            format!("version {other} is not supported (use 2)"),
        )),
    }
}

fn config_file(app_dir: &Path, stem: &str) -> Result<PathBuf, JobError> {
    let dir = app_dir.join("config");
    for ext in ["json", "yml", "yaml"] {
        let p = dir.join(format!("{stem}.{ext}"));
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(JobError::Io {
        path: dir.join(format!("{stem}.json")),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such file (.json, .yml or .yaml)",
        ),
    })
}

/// A loaded job: its meta and the apps of the server and the clients.
#[derive(Debug)]
pub struct Job {
    /// The job folder.
    pub dir: PathBuf,
    /// `meta.json`.
    pub meta: JobMeta,
    /// The server's app.
    pub server: ServerApp,
    /// Client apps by app folder name.
    pub client_apps: BTreeMap<String, ClientApp>,
    /// App folder name for each entry of the deploy map (`@ALL` or a site name).
    deploy: Vec<(String, String)>,
}

impl Job {
    /// Loads and checks a whole job folder.
    pub fn load(dir: &Path) -> Result<Job, JobError> {
        let meta_path = dir.join("meta.json");
        let meta: JobMeta = parse_file(&meta_path, MAX_META_BYTES)?;
        if meta.name.trim().is_empty() {
            return Err(invalid(&meta_path, "name", "must not be empty"));
        }
        if meta.name.len() > MAX_NAME {
            return Err(invalid(
                &meta_path,
                "name",
                format!("{} bytes, at most {MAX_NAME}", meta.name.len()),
            ));
        }
        if meta.min_clients == 0 {
            return Err(invalid(&meta_path, "min_clients", "must be at least 1"));
        }
        if meta.deploy_map.is_empty() {
            return Err(invalid(&meta_path, "deploy_map", "deploys no app"));
        }
        for (site, ask) in &meta.resource_spec {
            ask.check()
                .map_err(|e| invalid(&meta_path, format!("resource_spec.{site}"), e))?;
        }
        let mut server = None;
        let mut client_apps = BTreeMap::new();
        for (app, sites) in &meta.deploy_map {
            let app_dir = dir.join(app);
            if !app_dir.is_dir() {
                return Err(invalid(
                    &meta_path,
                    format!("deploy_map.{app}"),
                    format!("app folder {} does not exist", app_dir.display()),
                ));
            }
            for site in sites {
                if site == "server" || site == "@ALL" {
                    if server.is_some() {
                        return Err(invalid(
                            &meta_path,
                            format!("deploy_map.{app}"),
                            "the server is deployed more than one app",
                        ));
                    }
                    server = Some(ServerApp::load(&app_dir)?);
                }
                if site != "server" && !client_apps.contains_key(app) {
                    client_apps.insert(app.clone(), ClientApp::load(&app_dir)?);
                }
            }
        }
        let server = server.ok_or_else(|| {
            invalid(
                &meta_path,
                "deploy_map",
                "no app is deployed to the server (use \"server\" or \"@ALL\")",
            )
        })?;
        if client_apps.is_empty() {
            return Err(invalid(
                &meta_path,
                "deploy_map",
                "no app is deployed to any client",
            ));
        }
        if server.secagg.is_some() && matches!(server.workflow, WorkflowSpec::Swarm(_)) {
            // Between swarm sites a submission is a masked input: a filter on the models a
            // site sends or receives would read or change it.
            if let Some(app) = client_apps.values().find(|a| !a.filters.is_empty()) {
                let field = if app.filters.has_results() {
                    "task_result_filters"
                } else {
                    "task_data_filters"
                };
                return Err(invalid(
                    &app.file,
                    field,
                    "a Swarm job with secure_aggregation sends masked inputs between sites, which no filter can read: use the site's privacy scope, whose filters run on its result before it is masked",
                ));
            }
        }
        let deploy = deploy_entries(&meta.deploy_map, &client_apps);
        Ok(Job {
            dir: dir.to_path_buf(),
            meta,
            server,
            client_apps,
            deploy,
        })
    }

    /// The client app deployed to `site`: its own entry first, then `@ALL`.
    ///
    /// In a tiered federation sites are named by region path (`eu.site-2`): an entry names a
    /// site (`eu.site-2`) or a whole region (`eu`), and the nearest one wins. A region's hub
    /// (`eu`) takes the job when an entry names the region or a site in it.
    pub fn app_for(&self, site: &str) -> Option<&ClientApp> {
        let by = |who: &str| {
            self.deploy
                .iter()
                .find(|(s, _)| s == who)
                .and_then(|(_, app)| self.client_apps.get(app))
        };
        let mut path = site;
        loop {
            if let Some(app) = by(path) {
                return Some(app);
            }
            match path.rfind('.') {
                Some(i) => path = &path[..i],
                None => break,
            }
        }
        let inside = format!("{site}.");
        self.deploy
            .iter()
            .find(|(s, _)| s.starts_with(&inside))
            .and_then(|(_, app)| self.client_apps.get(app))
            .or_else(|| by("@ALL"))
    }

    /// Replaces the deploy map (a hub's derived one, in its region's names) and what
    /// [`Job::app_for`] reads from it. Entries naming an app the job has no client app for
    /// are dropped: a derived map only narrows the submitted one.
    pub fn set_deploy_map(&mut self, map: BTreeMap<String, Vec<String>>) {
        self.deploy = deploy_entries(&map, &self.client_apps);
        self.meta.deploy_map = map;
    }

    /// Whether the job deploys to `site` (a site, or a region's hub that [`Job::app_for`]
    /// reaches through an entry inside its region).
    pub fn deploys_to(&self, site: &str) -> bool {
        self.app_for(site).is_some()
    }
}

/// The app folder for each client entry of `map` (`@ALL` or a site name; not `server`), in
/// the map's order, for the apps in `client_apps`.
fn deploy_entries(
    map: &BTreeMap<String, Vec<String>>,
    client_apps: &BTreeMap<String, ClientApp>,
) -> Vec<(String, String)> {
    map.iter()
        .filter(|(app, _)| client_apps.contains_key(*app))
        .flat_map(|(app, sites)| {
            sites
                .iter()
                .filter(|s| *s != "server")
                .map(move |s| (s.clone(), app.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    fn test_site(f: &Fixture) -> LearnerSite<'_> {
        LearnerSite {
            site: "site-1",
            job_id: "j",
            work_dir: f.dir.path(),
            tracker: &OFF,
            gpus: None,
        }
    }

    static OFF: crate::tracking::Tracker = crate::tracking::Tracker::off_const();

    fn script_client(args: &str) -> String {
        format!(
            r#"{{"executors": [{{"tasks": ["train", "validate"],
               "executor": {{"name": "ClientAPILauncherExecutor", "args": {args}}}}}]}}"#
        )
    }

    #[test]
    fn the_script_executor_is_configured_and_checked() {
        let f = Fixture::new();
        f.write(
            "app/config/config_fed_client.json",
            &script_client(r#"{"command": ["python3", "-u", "custom/train.py"], "params_transfer_type": "DIFF", "task_timeout": 60}"#),
        );
        let job = Job::load(f.dir.path()).unwrap();
        let app = job.app_for("site-1").unwrap();
        let LearnerSpec::Script(a) = &app.learner else {
            panic!("not a script: {:?}", app.learner)
        };
        assert_eq!(a.command[2], "custom/train.py");
        assert_eq!(
            a.params_transfer_type,
            crate::learner::script::TransferType::Diff
        );
        assert_eq!(
            (a.task_timeout, a.heartbeat_timeout, a.stop_grace_period),
            (60.0, 30.0, 10.0)
        );
        assert!(a.launch_once);
        assert!(app.runs_custom_code());
        for (args, key) in [
            (r#"{"command": []}"#, "executors[0].executor.args.command"),
            (
                r#"{"command": ["x"], "task_timeout": -1}"#,
                "executors[0].executor.args.task_timeout",
            ),
            (
                r#"{"command": ["x"], "heartbeat_interval": 40}"#,
                "executors[0].executor.args.heartbeat_interval",
            ),
            (
                r#"{"command": ["x"], "params_transfer_type": "HALF"}"#,
                "executors[0].executor.args",
            ),
            (
                r#"{"command": ["x"], "env": {"FLARE_CLIENT_TOKEN": "t"}}"#,
                "executors[0].executor.args.env.FLARE_CLIENT_TOKEN",
            ),
            (
                r#"{"command": ["x"], "colour": 1}"#,
                "executors[0].executor.args",
            ),
            (
                r#"{"command": "python3 train.py"}"#,
                "executors[0].executor.args.command",
            ),
        ] {
            f.write("app/config/config_fed_client.json", &script_client(args));
            let err = Job::load(f.dir.path()).unwrap_err().to_string();
            assert!(
                err.contains("config_fed_client.json") && err.contains(key),
                "{args}: {err}"
            );
        }
    }

    const SERVER: &str = r#"{
      "format_version": 2,
      "workflows": [{"id": "sag", "name": "ScatterAndGather",
                      "args": {"num_rounds": 2, "min_clients": 2}}],
      "components": [
        {"id": "model", "name": "MnistMlp", "args": {"hidden": 16}},
        {"id": "aggregator", "name": "FedAvg", "args": {}},
        {"id": "persistor", "name": "SafetensorsPersistor", "args": {"save_every_round": false}}
      ]
    }"#;

    fn client(data: &str) -> String {
        format!(
            r#"{{"format_version": 2, "executors": [{{"tasks": ["train", "validate"],
               "executor": {{"name": "MnistMlpLearner", "args": {{"data_dir": "{data}", "hidden": 16}}}}}}]}}"#
        )
    }

    impl Fixture {
        fn new() -> Fixture {
            let f = Fixture {
                dir: tempfile::tempdir().unwrap(),
            };
            let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
            f.write(
                "meta.json",
                r#"{"name": "t", "min_clients": 2, "deploy_map": {"app": ["@ALL"]}}"#,
            );
            f.write("app/config/config_fed_server.json", SERVER);
            f.write(
                "app/config/config_fed_client.json",
                &client(&data.display().to_string()),
            );
            f
        }
        fn write(&self, rel: &str, text: &str) {
            let p = self.dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        fn err(&self) -> String {
            Job::load(self.dir.path()).unwrap_err().to_string()
        }
    }

    /// A meta.json deploying the app to the server and `n` sites named `site-<i>` padded to
    /// `len` bytes.
    fn meta_with_sites(n: usize, len: usize) -> String {
        let mut names = vec!["\"server\"".to_string()];
        names.extend((0..n).map(|i| format!("\"{:0>len$}\"", format!("site-{i}"))));
        format!(
            r#"{{"name": "t", "deploy_map": {{"app": [{}]}}}}"#,
            names.join(",")
        )
    }

    #[test]
    fn resource_spec_is_typed_and_its_errors_name_the_site_and_key() {
        let f = Fixture::new();
        f.write(
            "meta.json",
            r#"{"name": "t", "deploy_map": {"app": ["@ALL"]},
                "resource_spec": {"@ALL": {"num_of_gpus": 1}, "site-2": {"num_of_gpus": 2, "mem_per_gpu_in_GiB": 8}}}"#,
        );
        let job = Job::load(f.dir.path()).unwrap();
        let ask = crate::roles::resources::ResourceAsk::of;
        assert_eq!(ask(&job.meta, "site-1").num_of_gpus, 1);
        assert_eq!(ask(&job.meta, "site-2").mem_per_gpu_gib, 8.0);
        for (spec, says) in [
            (
                r#"{"site-1": {"gpus": 1}}"#,
                "resource_spec.site-1.gpus: unknown field `gpus`",
            ),
            (
                r#"{"site-1": {"num_of_gpus": -1}}"#,
                "resource_spec.site-1.num_of_gpus",
            ),
            (
                r#"{"@ALL": {"mem_per_gpu_in_GiB": -2}}"#,
                "resource_spec.@ALL: mem_per_gpu_in_GiB must be 0 or more",
            ),
        ] {
            f.write(
                "meta.json",
                &format!(
                    r#"{{"name": "t", "deploy_map": {{"app": ["@ALL"]}}, "resource_spec": {spec}}}"#
                ),
            );
            let e = f.err();
            assert!(e.contains("meta.json") && e.contains(says), "{spec}: {e}");
        }
    }

    #[test]
    fn what_a_job_can_make_a_node_allocate_is_bounded() {
        // The largest deploy map allowed loads: every name at the longest allowed.
        let f = Fixture::new();
        f.write(
            "meta.json",
            &meta_with_sites(MAX_DEPLOY_NAMES - 1, MAX_SITE_NAME),
        );
        let job = Job::load(f.dir.path()).unwrap();
        assert_eq!(job.meta.deploy_map["app"].len(), MAX_DEPLOY_NAMES);

        let many_apps = format!(
            r#"{{"name": "t", "deploy_map": {{{}}}}}"#,
            (0..100)
                .map(|i| format!(r#""app{i}": ["@ALL"]"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        let mandatory = format!(
            r#"{{"name": "t", "mandatory_clients": [{}], "deploy_map": {{"app": ["@ALL"]}}}}"#,
            (0..5000)
                .map(|i| format!("\"s{i}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        let cases = [
            (
                // Just under the byte cap: names are counted past the limit, not kept.
                format!(
                    r#"{{"name": "t", "deploy_map": {{"app": ["server", {}]}}}}"#,
                    (0..100_000)
                        .map(|i| format!("\"{i}\""))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                format!("meta.json: deploy_map: 100001 names, at most {MAX_DEPLOY_NAMES}"),
            ),
            (
                meta_with_sites(MAX_DEPLOY_NAMES, 1),
                format!("meta.json: deploy_map: 4097 names, at most {MAX_DEPLOY_NAMES}"),
            ),
            (
                meta_with_sites(2, MAX_SITE_NAME + 1),
                format!(
                    "meta.json: deploy_map.app: site name of 65 bytes, at most {MAX_SITE_NAME}"
                ),
            ),
            (
                many_apps,
                format!("meta.json: deploy_map: 100 apps, at most {MAX_APPS}"),
            ),
            (
                mandatory,
                format!("meta.json: mandatory_clients: 5000 names, at most {MAX_DEPLOY_NAMES}"),
            ),
            (
                format!(
                    r#"{{"name": "{}", "deploy_map": {{"app": ["@ALL"]}}}}"#,
                    "n".repeat(300)
                ),
                format!("meta.json: name: 300 bytes, at most {MAX_NAME}"),
            ),
        ];
        for (text, want) in cases {
            let f = Fixture::new();
            f.write("meta.json", &text);
            let err = f.err();
            assert!(err.contains(&want), "{err:?} lacks {want:?}");
        }
    }

    #[test]
    fn oversized_files_are_refused_by_their_length() {
        for (file, limit) in [
            ("meta.json", MAX_META_BYTES),
            ("app/config/config_fed_server.json", MAX_CONFIG_BYTES),
            ("app/config/config_fed_client.json", MAX_CONFIG_BYTES),
        ] {
            let f = Fixture::new();
            // A sparse file: its length says too large, and no byte of it is read.
            let path = f.dir.path().join(file);
            std::fs::File::create(&path)
                .unwrap()
                .set_len(limit + 1)
                .unwrap();
            let err = Job::load(f.dir.path()).unwrap_err();
            assert!(
                matches!(&err, JobError::TooLarge { path: p, len, limit: l }
                    if *p == path && *len == limit + 1 && *l == limit),
                "{err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(file) && msg.contains(&format!("at most {limit}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_good_job_loads() {
        let f = Fixture::new();
        let job = Job::load(f.dir.path()).unwrap();
        assert_eq!(job.server.sag.num_rounds, 2);
        assert_eq!(
            job.server.sag.wait_time_after_min_received,
            Duration::from_secs(10)
        );
        assert!(!job.server.persistor.save_every_round);
        assert_eq!(
            job.server.model.clone().unwrap(),
            ModelSource::MnistMlp {
                hidden: 16,
                seed: 0
            }
        );
        assert!(job.app_for("site-7").is_some());
        let l = job
            .app_for("site-1")
            .unwrap()
            .make_learner(0, 2, test_site(&f));
        assert!(l.is_ok());
    }

    #[test]
    fn a_deploy_map_entry_inside_a_region_reaches_its_hub() {
        let f = Fixture::new();
        f.write(
            "meta.json",
            r#"{"name": "t", "deploy_map": {"app": ["server", "us", "eu.site-2"]}}"#,
        );
        let job = Job::load(f.dir.path()).unwrap();
        // The named site, the hub of its region, and every site of a named region.
        for who in ["eu.site-2", "eu", "us", "us.site-1"] {
            assert!(job.deploys_to(who), "{who}");
        }
        // Not a sibling site, a region whose name only starts alike, or a plain site.
        for who in ["eu.site-1", "eu-west", "e", "site-2"] {
            assert!(!job.deploys_to(who), "{who}");
        }
    }

    #[test]
    fn a_replaced_deploy_map_is_the_one_app_for_reads() {
        let f = Fixture::new();
        f.write(
            "meta.json",
            r#"{"name": "t", "deploy_map": {"app": ["server", "eu.site-1", "eu.site-2"]}}"#,
        );
        let mut job = Job::load(f.dir.path()).unwrap();
        assert!(!job.deploys_to("site-1"));
        // A hub of `eu` names its sites without the region.
        job.set_deploy_map(BTreeMap::from([(
            "app".to_string(),
            vec!["server".to_string(), "site-1".to_string()],
        )]));
        assert!(job.deploys_to("site-1"));
        assert!(!job.deploys_to("site-2"));
        assert!(!job.deploys_to("eu.site-1"), "the submitted map is gone");
        assert!(!job.deploys_to("server"));
        // An app the job does not have deploys nowhere.
        job.set_deploy_map(BTreeMap::from([(
            "other".to_string(),
            vec!["site-2".to_string()],
        )]));
        assert!(!job.deploys_to("site-2"));
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "app/config/config_fed_server.json",
                SERVER.replace("\"num_rounds\": 2", "\"num_rounds\": \"two\""),
                "config_fed_server.json: workflows[0].args.num_rounds: invalid type",
            ),
            (
                "app/config/config_fed_server.json",
                SERVER.replace("ScatterAndGather", "Scatter"),
                "workflows[0].name: unknown workflow \"Scatter\"",
            ),
            (
                "app/config/config_fed_server.json",
                SERVER.replace("\"hidden\": 16", "\"hiddn\": 16"),
                "components[0].args.hiddn: unknown field",
            ),
            (
                "app/config/config_fed_server.json",
                SERVER.replace("\"FedAvg\"", "\"FedNova\""),
                "components[1].name: unknown aggregator \"FedNova\"",
            ),
            (
                "app/config/config_fed_server.json",
                SERVER.replace("\"id\": \"model\"", "\"id\": \"net\""),
                "workflows[0].args.model_id: no component with id \"model\"",
            ),
            (
                "app/config/config_fed_server.json",
                SERVER.replace(
                    "\"min_clients\": 2}",
                    "\"min_clients\": 2, \"task_timeout\": -1}",
                ),
                "workflows[0].args.task_timeout",
            ),
            (
                "app/config/config_fed_client.json",
                client("x").replace("MnistMlpLearner", "Nope"),
                "executors[0].executor.name: unknown executor \"Nope\"",
            ),
            (
                "app/config/config_fed_client.json",
                "{ not json".into(),
                "config_fed_client.json: .: key must be a string",
            ),
            (
                "meta.json",
                r#"{"name": "t", "deploy_map": {"missing": ["@ALL"]}}"#.into(),
                "meta.json: deploy_map.missing: app folder",
            ),
            (
                "meta.json",
                r#"{"name": "t", "deploy_map": {"app": ["site-1"]}}"#.into(),
                "meta.json: deploy_map: no app is deployed to the server",
            ),
            (
                "meta.json",
                r#"{"name": "t", "min_clients": 0, "deploy_map": {"app": ["@ALL"]}}"#.into(),
                "meta.json: min_clients: must be at least 1",
            ),
        ];
        for (file, text, want) in cases {
            let f = Fixture::new();
            f.write(file, &text);
            let err = f.err();
            assert!(err.contains(want), "for {file}: {err:?} lacks {want:?}");
        }
    }

    fn torch_client(data: &str, extra: &str) -> String {
        format!(
            r#"{{"executors": [{{"tasks": ["train", "validate"],
               "executor": {{"name": "TorchCnnLearner", "args": {{"data_dir": "{data}"{extra}}}}}}}]}}"#
        )
    }

    #[test]
    fn the_cnn_model_and_learner_are_configured() {
        let f = Fixture::new();
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
        let data = data.display().to_string();
        f.write(
            "app/config/config_fed_server.json",
            &SERVER.replace(
                r#""name": "MnistMlp", "args": {"hidden": 16}"#,
                r#""name": "MnistCnn", "args": {"seed": 7}"#,
            ),
        );
        f.write(
            "app/config/config_fed_client.json",
            &torch_client(
                &data,
                r#", "device": "cpu", "optimizer": "adadelta", "lr": 1.0"#,
            ),
        );
        let loaded = Job::load(f.dir.path());
        if cfg!(feature = "torch") {
            let job = loaded.unwrap();
            assert_eq!(job.server.model, Some(ModelSource::MnistCnn { seed: 7 }));
            assert_eq!(job.server.initial_model().unwrap(), cnn::init(7));
            let LearnerSpec::TorchCnn(a) = &job.app_for("site-1").unwrap().learner else {
                panic!("not the torch learner");
            };
            assert_eq!(a.device, DeviceSpec::Cpu);
            assert_eq!(a.optimizer, OptimizerKind::Adadelta);
            assert_eq!((a.batch_size, a.epochs), (64, 1));
        } else {
            let err = loaded.unwrap_err().to_string();
            assert!(
                err.contains("config_fed_client.json: executors[0].executor.name")
                    && err.contains("built without the `torch` feature"),
                "{err}"
            );
        }
        for (extra, want) in [
            (
                r#", "device": "gpu""#,
                "executors[0].executor.args.device: unknown device \"gpu\"",
            ),
            (
                r#", "optimizer": "lbfgs""#,
                "executors[0].executor.args.optimizer: unknown variant `lbfgs`",
            ),
            (
                r#", "lr": 0"#,
                "executors[0].executor.args: batch_size, epochs and lr must be positive",
            ),
        ] {
            f.write(
                "app/config/config_fed_client.json",
                &torch_client(&data, extra),
            );
            let err = f.err();
            if cfg!(feature = "torch") {
                assert!(err.contains(want), "{err:?} lacks {want:?}");
            } else {
                assert!(err.contains("built without the `torch` feature"), "{err}");
            }
        }
    }

    #[test]
    fn missing_data_is_reported_when_a_site_builds_its_learner() {
        // The data lives at the sites: an admin submits without it, a site names the key.
        let f = Fixture::new();
        f.write(
            "app/config/config_fed_client.json",
            &client("/nonexistent/mnist"),
        );
        let job = Job::load(f.dir.path()).unwrap();
        let err = match job
            .app_for("site-1")
            .unwrap()
            .make_learner(0, 2, test_site(&f))
        {
            Err(e) => e.to_string(),
            Ok(_) => panic!("learner built without data"),
        };
        assert!(
            err.contains("executors[0].executor.args.data_dir: /nonexistent/mnist"),
            "{err}"
        );
    }

    #[test]
    fn yaml_configs_are_accepted() {
        let f = Fixture::new();
        std::fs::remove_file(f.dir.path().join("app/config/config_fed_server.json")).unwrap();
        f.write(
            "app/config/config_fed_server.yml",
            "format_version: 2\nworkflows:\n  - id: sag\n    name: ScatterAndGather\n    args: {num_rounds: 3, min_clients: 1}\ncomponents:\n  - {id: model, name: SyntheticModel, args: {num_params: 10}}\n  - {id: aggregator, name: FedAvg}\n",
        );
        let job = Job::load(f.dir.path()).unwrap();
        assert_eq!(job.server.sag.num_rounds, 3);
        assert_eq!(job.server.initial_model().unwrap().num_params(), 10);
        f.write(
            "app/config/config_fed_server.yml",
            "workflows:\n  - id: sag\n    name: ScatterAndGather\n    args: {num_rounds: x}\n",
        );
        assert!(
            f.err()
                .contains("config_fed_server.yml: workflows[0].args.num_rounds"),
            "{}",
            f.err()
        );
    }

    #[test]
    fn cyclic_and_cross_site_evaluation_configs() {
        let f = Fixture::new();
        let server = |workflows: &str| {
            SERVER.replace(
                r#"[{"id": "sag", "name": "ScatterAndGather",
                      "args": {"num_rounds": 2, "min_clients": 2}}]"#,
                workflows,
            )
        };
        let path = "app/config/config_fed_server.json";
        f.write(
            path,
            &server(
                r#"[{"name": "Cyclic", "args": {"num_rounds": 3, "cyclic_order": "random"}},
                    {"name": "CrossSiteEval", "args": {"eval_task_timeout": 5}}]"#,
            ),
        );
        let job = Job::load(f.dir.path()).unwrap();
        let WorkflowSpec::Cyclic(args) = &job.server.workflow else {
            panic!("{:?}", job.server.workflow);
        };
        assert_eq!(args.num_rounds, 3);
        assert_eq!(
            args.cyclic_order,
            flare_protocols::workflows::cyclic::CyclicOrder::Random
        );
        assert_eq!(
            job.server.evaluation.as_ref().unwrap().eval_task_timeout,
            5.0
        );

        let cases = [
            (
                r#"[{"name": "Cyclic", "args": {"num_rounds": 0}}]"#,
                "workflows[0].args: ",
            ),
            (
                r#"[{"name": "Cyclic", "args": {"num_rounds": 2, "learn_task_timeout": 100, "progress_timeout": 50}}]"#,
                "workflows[0].args: ",
            ),
            (
                r#"[{"name": "Cyclic", "args": {"num_rounds": 2, "order": "sideways"}}]"#,
                "workflows[0].args.order",
            ),
            (
                r#"[{"name": "ScatterAndGather", "args": {"num_rounds": 2}}, {"name": "CrossSiteEval"}]"#,
                "workflows[1]: CrossSiteEval runs after a client-controlled workflow",
            ),
            (
                r#"[{"name": "Swarm", "args": {"num_rounds": 2}}, {"name": "Cyclic", "args": {"num_rounds": 2}}]"#,
                "workflows[1].name: unknown second workflow \"Cyclic\"",
            ),
            (
                r#"[{"name": "Swarm", "args": {"num_rounds": 2}}, {"name": "CrossSiteEval", "args": {"eval_task_timeout": -1}}]"#,
                "workflows[1].args: ",
            ),
            (
                r#"[{"name": "Swarm", "args": {"num_rounds": 2}}, {"name": "CrossSiteEval", "args": {"evaluator": ["a"]}}]"#,
                "workflows[1].args.evaluator: unknown field `evaluator`",
            ),
            (
                r#"[{"name": "Swarm", "args": {"num_rounds": 2}}, {"name": "CrossSiteEval"}, {"name": "CrossSiteEval"}]"#,
                "workflows: one workflow, or a client-controlled one followed by CrossSiteEval",
            ),
        ];
        for (workflows, want) in cases {
            f.write(path, &server(workflows));
            let err = f.err();
            assert!(
                err.contains(&format!("config_fed_server.json: {want}")),
                "{workflows}: {err}"
            );
        }
    }
}
