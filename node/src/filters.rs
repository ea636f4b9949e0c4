//! The filters a job names (`task_data_filters`, `task_result_filters`), in FLARE's config
//! shape, in both `config_fed_server.json` and `config_fed_client.json`:
//!
//! ```json
//! "task_data_filters":   [ { "tasks": ["train"], "filters": [
//!     { "name": "ModelQuantizer", "args": { "quantization_type": "blockwise8" } } ] } ],
//! "task_result_filters": [ { "tasks": ["*"], "filters": [
//!     { "path": "nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer" } ] } ]
//! ```
//!
//! A filter is named by `name`, or by FLARE's dotted class `path` (its last segment is the
//! name); `"tasks": ["*"]` covers every task. Entries that cover a task run in the order they
//! are written. FLARE's semantics: on the server, the data filters run on a task's model on
//! its way out to a site and the result filters on a result's model as it comes in; on a
//! site, the data filters run on a task's model as it comes in (before the learner) and the
//! result filters on the result's model going out. The usual quantized job is therefore
//! server data = `ModelQuantizer`, site data = `ModelDequantizer`, site result =
//! `ModelQuantizer`, server result = `ModelDequantizer`: FedAvg accumulates in f32 and refuses
//! a quantized result that reaches it unconverted.
//!
//! # Filters
//!
//! | name (last segment of `path`) | FLARE/Flower path | args (defaults) |
//! |---|---|---|
//! | `ModelQuantizer` | `nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer` | `quantization_type` (`"float16"`), `block_size` (64, Flare's) |
//! | `ModelDequantizer` | `nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer` | none |
//! | `ExcludeVars` | `nvflare.app_common.filters.exclude_vars.ExcludeVars` | `exclude_vars` (null; a list of names or a regex string), `data_kinds` |
//! | `PercentilePrivacy` | `nvflare.app_common.filters.percentile_privacy.PercentilePrivacy` | `percentile` (10), `gamma` (0.01), `data_kinds` |
//! | `SVTPrivacy` | `nvflare.app_common.filters.svt_privacy.SVTPrivacy` | `fraction` (0.1), `epsilon` (0.1), `noise_var` (0.1), `gamma` (1e-5), `tau` (1e-6), `replace` (true), `epsilon_threshold`, `epsilon_query`, `epsilon_release` (null), `data_kinds` |
//! | `LocalDpMod` | `flwr.client.mod.LocalDpMod` | `clipping_norm`, `sensitivity`, `epsilon`, `delta` (all required) |
//! | `StatisticsPrivacyFilter` | `nvflare.app_common.filters.statistics_privacy_filter.StatisticsPrivacyFilter` | `result_cleanser_ids` (required): ids of cleanser components of the same file ([`crate::stats`]) |
//!
//! What the privacy filters compute is in [`flare_protocols::filters::privacy`]. Unknown
//! args are refused, naming the key. `data_kinds` is FLARE's list of `"WEIGHTS"` and
//! `"WEIGHT_DIFF"` (default: both). ExcludeVars honours it; PercentilePrivacy, SVTPrivacy
//! and LocalDpMod filter `WEIGHT_DIFF` results only (full weights pass unchanged, see
//! [`FilterChains::diff_only_results`]), so a `data_kinds` that names `"WEIGHTS"` is refused
//! rather than silently not applied. SVTPrivacy and LocalDpMod draw their noise from a
//! ChaCha20 stream whose seed the node takes from the OS when it builds the filter: one
//! stream (and one SVT privacy ledger) per filter as written in the config, shared by clones
//! of the [`FilterSpec`].
//!
//! # A site's privacy scope
//!
//! A site's privacy policy (FLARE's `local/privacy.json`) names filters of its own, in flat
//! lists ([`parse_filter_list`]). [`FilterChains::with_site_scope`] puts them before the
//! job's, for every task, as FLARE's `apply_filters` runs the scope's filters before the
//! job's: a site's `PercentilePrivacy` sees the diff before a job's `ModelQuantizer` narrows
//! it.
//!
//! Filters work on models in memory. A stored (file-backed) model passes through untouched
//! when no filter applies to its task, and is loaded when one does: a filtered transfer holds
//! the whole model in memory at the filter (the quantized copy and, while it is converted,
//! part of the original).
//!
//! Adding a filter touches one place: a [`FilterSpec`] variant, its typed args, and its arm
//! in [`FilterSpec::parse`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use flare_protocols::filters::{
    ExcludeVars, Filter, FilterError, LocalDp, LocalDpArgs, ModelDequantizer, ModelQuantizer,
    PercentilePrivacy, QuantizationType, SvtArgs, SvtPrivacy,
};
use flare_protocols::model::{FLModel, ParamsType};
use flare_protocols::stored::{LoadError, ModelRef};
use serde::Deserialize;

use crate::job::{JobError, invalid, parse_args};

/// The filter names this node knows, for error messages.
const KNOWN: &str = "ModelQuantizer, ModelDequantizer, ExcludeVars, PercentilePrivacy, SVTPrivacy, LocalDpMod, StatisticsPrivacyFilter";

/// Cleanser components by id, which a `StatisticsPrivacyFilter` names.
pub(crate) type Cleansers = BTreeMap<String, flare_protocols::stats::Cleanser>;

/// `StatisticsPrivacyFilter`'s args (FLARE's).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsPrivacyArgs {
    result_cleanser_ids: Vec<String>,
}

/// One `{ "tasks": [...], "filters": [...] }` entry as written in a config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScopeEntry {
    tasks: Vec<String>,
    filters: Vec<FilterEntry>,
}

/// One filter as written: FLARE's component shape.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterEntry {
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default = "crate::job::empty_args")]
    args: serde_json::Value,
}

/// `ModelQuantizer`'s args (FLARE's name; `block_size` is Flare's, for blockwise8).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuantizerArgs {
    /// FLARE's default is float16.
    #[serde(default = "float16")]
    quantization_type: String,
    #[serde(default = "block_size")]
    block_size: usize,
}

fn float16() -> String {
    "float16".into()
}

fn block_size() -> usize {
    flare_protocols::filters::quantize::DEFAULT_BLOCK_SIZE
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// `ExcludeVars`' args. `exclude_vars` is read by hand: null, a regex string, or a list of
/// names, and anything else is refused (FLARE ignores it and excludes nothing).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExcludeVarsArgs {
    #[serde(default)]
    exclude_vars: serde_json::Value,
    #[serde(default)]
    data_kinds: Option<Vec<String>>,
}

/// `PercentilePrivacy`'s args, FLARE's defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PercentileArgs {
    #[serde(default = "percentile")]
    percentile: f64,
    #[serde(default = "percentile_gamma")]
    gamma: f64,
    #[serde(default)]
    data_kinds: Option<Vec<String>>,
}

fn percentile() -> f64 {
    PercentilePrivacy::DEFAULT_PERCENTILE
}

fn percentile_gamma() -> f64 {
    PercentilePrivacy::DEFAULT_GAMMA
}

/// `SVTPrivacy`'s args; absent ones take FLARE's defaults ([`SvtArgs::default`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SvtConfig {
    fraction: Option<f64>,
    epsilon: Option<f64>,
    noise_var: Option<f64>,
    gamma: Option<f64>,
    tau: Option<f64>,
    replace: Option<bool>,
    epsilon_threshold: Option<f64>,
    epsilon_query: Option<f64>,
    epsilon_release: Option<f64>,
    data_kinds: Option<Vec<String>>,
}

/// `LocalDpMod`'s args: Flower gives none a default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalDpConfig {
    clipping_norm: f64,
    sensitivity: f64,
    epsilon: f64,
    delta: f64,
}

/// A filter's `data_kinds` (FLARE's `DataKind` strings): `None` for both kinds (also when
/// absent or empty, FLARE's default), else the one kind listed.
fn data_kinds(
    file: &Path,
    key: &str,
    kinds: Option<Vec<String>>,
) -> Result<Option<ParamsType>, JobError> {
    let (mut weights, mut diff) = (false, false);
    for (i, k) in kinds.iter().flatten().enumerate() {
        match k.as_str() {
            "WEIGHTS" => weights = true,
            "WEIGHT_DIFF" => diff = true,
            other => {
                return Err(invalid(
                    file,
                    format!("{key}.args.data_kinds[{i}]"),
                    format!("unsupported data kind {other:?} (WEIGHTS or WEIGHT_DIFF)"),
                ));
            }
        }
    }
    Ok(match (weights, diff) {
        (true, false) => Some(ParamsType::Full),
        (false, true) => Some(ParamsType::Diff),
        _ => None,
    })
}

/// Refuses a `data_kinds` that asks a diff-only filter to filter full weights.
fn diff_kinds_only(
    file: &Path,
    key: &str,
    name: &str,
    kinds: Option<Vec<String>>,
) -> Result<(), JobError> {
    let explicit = kinds.as_ref().is_some_and(|k| !k.is_empty());
    match data_kinds(file, key, kinds)? {
        Some(ParamsType::Diff) => Ok(()),
        None if !explicit => Ok(()),
        _ => Err(invalid(
            file,
            format!("{key}.args.data_kinds"),
            format!(
                "Flare applies {name} to WEIGHT_DIFF results only (full weights pass unchanged); \
                 list [\"WEIGHT_DIFF\"] or leave it out"
            ),
        )),
    }
}

/// A protocol filter's refusal of its arguments, at the key of the argument it names.
fn bad_args(file: &Path, key: &str, e: FilterError) -> JobError {
    match e {
        FilterError::BadArgument { arg, reason, .. } => {
            invalid(file, format!("{key}.args.{arg}"), reason)
        }
        e => invalid(file, format!("{key}.args"), e.to_string()),
    }
}

/// A 32-byte noise seed from the OS, for a filter at `key`.
fn os_seed(file: &Path, key: &str) -> Result<[u8; 32], JobError> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| invalid(file, key, "the OS random generator failed"))?;
    Ok(seed)
}

/// `ExcludeVars` from its parsed args.
fn exclude_vars(file: &Path, key: &str, a: ExcludeVarsArgs) -> Result<ExcludeVars, JobError> {
    let at = format!("{key}.args.exclude_vars");
    let f = match a.exclude_vars {
        serde_json::Value::Null => ExcludeVars::nothing(),
        serde_json::Value::String(p) => {
            ExcludeVars::pattern(&p).map_err(|e| bad_args(file, key, e))?
        }
        serde_json::Value::Array(items) => {
            let mut names = Vec::with_capacity(items.len());
            for (i, v) in items.into_iter().enumerate() {
                match v {
                    serde_json::Value::String(n) => names.push(n),
                    other => {
                        return Err(invalid(
                            file,
                            format!("{at}[{i}]"),
                            format!("a tensor name must be a string, not {other}"),
                        ));
                    }
                }
            }
            ExcludeVars::names(names)
        }
        other => {
            return Err(invalid(
                file,
                at,
                format!("expected a list of tensor names or a regex string, not {other}"),
            ));
        }
    };
    Ok(match data_kinds(file, key, a.data_kinds)? {
        Some(kind) => f.only(kind),
        None => f,
    })
}

/// A filter a job or a site's privacy policy can name, with its checked arguments. Two specs
/// are equal when configured alike; a clone of an SVT or local DP filter shares its noise
/// stream (and SVT ledger) with the original.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterSpec {
    /// `ModelQuantizer` (`nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer`).
    ModelQuantizer(ModelQuantizer),
    /// `ModelDequantizer` (`nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer`).
    ModelDequantizer(ModelDequantizer),
    /// `ExcludeVars` (`nvflare.app_common.filters.exclude_vars.ExcludeVars`).
    ExcludeVars(ExcludeVars),
    /// `PercentilePrivacy` (`nvflare.app_common.filters.percentile_privacy.PercentilePrivacy`).
    PercentilePrivacy(PercentilePrivacy),
    /// `SVTPrivacy` (`nvflare.app_common.filters.svt_privacy.SVTPrivacy`).
    SvtPrivacy(Arc<SvtPrivacy>),
    /// `LocalDpMod` (Flower's `flwr.client.mod.LocalDpMod`).
    LocalDp(Arc<LocalDp>),
    /// `StatisticsPrivacyFilter`: cleansers on statistics results; models pass unchanged.
    StatisticsPrivacy(Arc<crate::stats::StatisticsPrivacyFilter>),
}

impl FilterSpec {
    /// The filter named by an entry at `key` (`task_data_filters[0].filters[1]`); a
    /// `StatisticsPrivacyFilter` names its cleansers among `cleansers`.
    fn parse(
        file: &Path,
        key: &str,
        e: FilterEntry,
        cleansers: &Cleansers,
    ) -> Result<FilterSpec, JobError> {
        let from_path = e
            .path
            .as_deref()
            .map(|p| p.rsplit('.').next().unwrap_or(p).to_string());
        let name = match (e.name, from_path) {
            (Some(n), Some(p)) if n != p => {
                return Err(invalid(
                    file,
                    format!("{key}.name"),
                    format!("{n:?} disagrees with the path's class {p:?}"),
                ));
            }
            (Some(n), _) => n,
            (None, Some(p)) => p,
            (None, None) => {
                return Err(invalid(
                    file,
                    key,
                    "names no filter (give `name` or `path`)",
                ));
            }
        };
        let name_key = if e.path.is_some() { "path" } else { "name" };
        match name.as_str() {
            "ModelQuantizer" => {
                let a: QuantizerArgs = parse_args(file, key, e.args)?;
                let qt: QuantizationType = a.quantization_type.parse().map_err(|err| {
                    invalid(
                        file,
                        format!("{key}.args.quantization_type"),
                        format!("{err}"),
                    )
                })?;
                if a.block_size == 0 {
                    return Err(invalid(
                        file,
                        format!("{key}.args.block_size"),
                        "must be at least 1",
                    ));
                }
                Ok(FilterSpec::ModelQuantizer(
                    ModelQuantizer::new(qt).with_block_size(a.block_size),
                ))
            }
            "ModelDequantizer" => {
                let NoArgs {} = parse_args(file, key, e.args)?;
                Ok(FilterSpec::ModelDequantizer(ModelDequantizer::new()))
            }
            "ExcludeVars" => {
                let a: ExcludeVarsArgs = parse_args(file, key, e.args)?;
                Ok(FilterSpec::ExcludeVars(exclude_vars(file, key, a)?))
            }
            "PercentilePrivacy" => {
                let a: PercentileArgs = parse_args(file, key, e.args)?;
                diff_kinds_only(file, key, &name, a.data_kinds)?;
                let f = PercentilePrivacy::new(a.percentile, a.gamma)
                    .map_err(|e| bad_args(file, key, e))?;
                Ok(FilterSpec::PercentilePrivacy(f))
            }
            "SVTPrivacy" => {
                let a: SvtConfig = parse_args(file, key, e.args)?;
                diff_kinds_only(file, key, &name, a.data_kinds)?;
                let d = SvtArgs::default();
                let args = SvtArgs {
                    fraction: a.fraction.unwrap_or(d.fraction),
                    epsilon: a.epsilon.unwrap_or(d.epsilon),
                    noise_var: a.noise_var.unwrap_or(d.noise_var),
                    gamma: a.gamma.unwrap_or(d.gamma),
                    tau: a.tau.unwrap_or(d.tau),
                    replace: a.replace.unwrap_or(d.replace),
                    epsilon_threshold: a.epsilon_threshold,
                    epsilon_query: a.epsilon_query,
                    epsilon_release: a.epsilon_release,
                };
                args.check().map_err(|e| bad_args(file, key, e))?;
                let f = SvtPrivacy::with_seed(args, os_seed(file, key)?)
                    .map_err(|e| bad_args(file, key, e))?;
                Ok(FilterSpec::SvtPrivacy(Arc::new(f)))
            }
            "LocalDpMod" => {
                let a: LocalDpConfig = parse_args(file, key, e.args)?;
                let args = LocalDpArgs {
                    clipping_norm: a.clipping_norm,
                    sensitivity: a.sensitivity,
                    epsilon: a.epsilon,
                    delta: a.delta,
                };
                args.check().map_err(|e| bad_args(file, key, e))?;
                let f = LocalDp::with_seed(args, os_seed(file, key)?)
                    .map_err(|e| bad_args(file, key, e))?;
                Ok(FilterSpec::LocalDp(Arc::new(f)))
            }
            "StatisticsPrivacyFilter" => {
                let a: StatsPrivacyArgs = parse_args(file, key, e.args)?;
                let known = || {
                    if cleansers.is_empty() {
                        "none".to_string()
                    } else {
                        cleansers.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                };
                let list = a
                    .result_cleanser_ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        cleansers.get(id).copied().ok_or_else(|| {
                            invalid(
                                file,
                                format!("{key}.args.result_cleanser_ids[{i}]"),
                                format!(
                                    "no cleanser component with id {id:?} in this file (cleansers: {})",
                                    known()
                                ),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let f = crate::stats::StatisticsPrivacyFilter::new(list, os_seed(file, key)?);
                Ok(FilterSpec::StatisticsPrivacy(Arc::new(f)))
            }
            other => Err(invalid(
                file,
                format!("{key}.{name_key}"),
                format!("unknown filter {other:?} (known: {KNOWN})"),
            )),
        }
    }

    fn filter(&self) -> &dyn Filter {
        match self {
            FilterSpec::ModelQuantizer(f) => f,
            FilterSpec::ModelDequantizer(f) => f,
            FilterSpec::ExcludeVars(f) => f,
            FilterSpec::PercentilePrivacy(f) => f,
            FilterSpec::SvtPrivacy(f) => f.as_ref(),
            FilterSpec::LocalDp(f) => f.as_ref(),
            FilterSpec::StatisticsPrivacy(f) => f.as_ref(),
        }
    }

    /// The filter's name, as FLARE spells it.
    pub fn name(&self) -> &'static str {
        self.filter().name()
    }

    /// Whether the filter transforms diffs only and passes full weights unchanged
    /// ([`Filter::diff_only`]).
    pub fn diff_only(&self) -> bool {
        self.filter().diff_only()
    }
}

/// Parses a flat list of filters at `key` of `file`, as a site's privacy policy writes them
/// (FLARE's `local/privacy.json`: `"task_result_filters": [{"path": "...", "args": {...}}]`,
/// no `tasks` wrapper). Errors name the entry's key, such as
/// `scopes[0].task_result_filters[1].args.percentile`.
pub fn parse_filter_list(
    file: &Path,
    key: &str,
    value: serde_json::Value,
) -> Result<Vec<FilterSpec>, JobError> {
    parse_filter_list_with(file, key, value, &Cleansers::new())
}

/// [`parse_filter_list`], with the cleanser components a `StatisticsPrivacyFilter` may name
/// (a `privacy.json`'s `components`).
pub(crate) fn parse_filter_list_with(
    file: &Path,
    key: &str,
    value: serde_json::Value,
    cleansers: &Cleansers,
) -> Result<Vec<FilterSpec>, JobError> {
    let entries: Vec<FilterEntry> = serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let at = if inner.is_empty() || inner == "." {
            key.to_string()
        } else if inner.starts_with('[') {
            format!("{key}{inner}")
        } else {
            format!("{key}.{inner}")
        };
        invalid(file, at, e.inner().to_string())
    })?;
    entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| FilterSpec::parse(file, &format!("{key}[{i}]"), e, cleansers))
        .collect()
}

/// Which tasks an entry covers.
#[derive(Debug, Clone, PartialEq)]
enum Tasks {
    /// `"*"`.
    All,
    /// The names listed.
    Named(Vec<String>),
}

/// The filters of one entry and the tasks they cover.
#[derive(Debug, Clone, PartialEq)]
struct Scope {
    tasks: Tasks,
    filters: Vec<FilterSpec>,
}

impl Scope {
    fn covers(&self, task: &str) -> bool {
        match &self.tasks {
            Tasks::All => true,
            Tasks::Named(names) => names.iter().any(|n| n == task),
        }
    }
}

/// Why a filter could not run on a [`ModelRef`].
#[derive(Debug, thiserror::Error)]
pub enum FilterRefError {
    /// The stored model could not be read for the filter.
    #[error("{filter}: reading the model: {source}")]
    Load {
        /// The first filter that applies.
        filter: &'static str,
        /// The cause.
        source: LoadError,
    },
    /// A filter refused the model (its message names the filter).
    #[error(transparent)]
    Filter(#[from] FilterError),
}

/// A side's filter chains: what runs on task data and on task results, by task name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FilterChains {
    task_data: Vec<Scope>,
    task_result: Vec<Scope>,
}

impl FilterChains {
    /// Checks the two lists of a config `file`, naming the key of anything wrong.
    pub(crate) fn parse(
        file: &Path,
        task_data: Vec<ScopeEntry>,
        task_result: Vec<ScopeEntry>,
    ) -> Result<FilterChains, JobError> {
        FilterChains::parse_with(file, task_data, task_result, &Cleansers::new())
    }

    /// [`FilterChains::parse`], with the file's cleanser components, which a
    /// `StatisticsPrivacyFilter` names.
    pub(crate) fn parse_with(
        file: &Path,
        task_data: Vec<ScopeEntry>,
        task_result: Vec<ScopeEntry>,
        cleansers: &Cleansers,
    ) -> Result<FilterChains, JobError> {
        Ok(FilterChains {
            task_data: parse_scopes(file, "task_data_filters", task_data, cleansers)?,
            task_result: parse_scopes(file, "task_result_filters", task_result, cleansers)?,
        })
    }

    /// The `StatisticsPrivacyFilter`s among the result filters that cover `task`, in order
    /// (a site's scope first).
    pub fn statistics_filters<'a>(
        &'a self,
        task: &'a str,
    ) -> Vec<&'a crate::stats::StatisticsPrivacyFilter> {
        chain(&self.task_result, task)
            .filter_map(|f| match f {
                FilterSpec::StatisticsPrivacy(s) => Some(s.as_ref()),
                _ => None,
            })
            .collect()
    }

    /// The chains with a site's own filters (its privacy scope) in front: `data` before the
    /// job's task data filters and `result` before its task result filters, for every task,
    /// as FLARE runs a scope's filters before the job's.
    pub fn with_site_scope(mut self, data: Vec<FilterSpec>, result: Vec<FilterSpec>) -> Self {
        for (scopes, filters) in [(&mut self.task_data, data), (&mut self.task_result, result)] {
            if !filters.is_empty() {
                scopes.insert(
                    0,
                    Scope {
                        tasks: Tasks::All,
                        filters,
                    },
                );
            }
        }
        self
    }

    /// Whether the side names no filter at all.
    pub fn is_empty(&self) -> bool {
        self.task_data.is_empty() && self.task_result.is_empty()
    }

    /// Whether the side names a result filter, for any task.
    pub fn has_results(&self) -> bool {
        !self.task_result.is_empty()
    }

    /// The result filters, for any task, that transform diffs only and pass full weights
    /// unchanged (PercentilePrivacy, SVTPrivacy, LocalDpMod), by name, each once: a site
    /// whose learner sends full weights gets no protection from them.
    pub fn diff_only_results(&self) -> Vec<&'static str> {
        names_once(self.task_result.iter().flat_map(|s| s.filters.iter()))
    }

    /// [`FilterChains::diff_only_results`] among the result filters that cover `task`.
    pub fn diff_only_results_for(&self, task: &str) -> Vec<&'static str> {
        names_once(chain(&self.task_result, task))
    }

    /// Whether a data filter applies to `task`.
    pub fn has_task_data(&self, task: &str) -> bool {
        chain(&self.task_data, task).next().is_some()
    }

    /// Whether a result filter applies to `task`.
    pub fn has_task_result(&self, task: &str) -> bool {
        chain(&self.task_result, task).next().is_some()
    }

    /// Runs the data filters that cover `task` on `model`, in order.
    pub fn task_data(&self, task: &str, model: FLModel) -> Result<FLModel, FilterError> {
        run(&self.task_data, task, model)
    }

    /// Runs the result filters that cover `task` on `model`, in order.
    pub fn task_result(&self, task: &str, model: FLModel) -> Result<FLModel, FilterError> {
        run(&self.task_result, task, model)
    }

    /// [`FilterChains::task_data`] on a model in memory or stored: `model` itself when no
    /// filter covers `task` (a stored one is not read); otherwise the filtered model, in
    /// memory.
    pub fn task_data_ref(&self, task: &str, model: ModelRef) -> Result<ModelRef, FilterRefError> {
        run_ref(&self.task_data, task, model)
    }

    /// [`FilterChains::task_result`] on a model in memory or stored, like
    /// [`FilterChains::task_data_ref`].
    pub fn task_result_ref(&self, task: &str, model: ModelRef) -> Result<ModelRef, FilterRefError> {
        run_ref(&self.task_result, task, model)
    }
}

/// The names of the diff-only filters of `filters`, each once, in order.
fn names_once<'a>(filters: impl Iterator<Item = &'a FilterSpec>) -> Vec<&'static str> {
    let mut names = Vec::new();
    for f in filters.filter(|f| f.diff_only()) {
        if !names.contains(&f.name()) {
            names.push(f.name());
        }
    }
    names
}

fn parse_scopes(
    file: &Path,
    list: &str,
    entries: Vec<ScopeEntry>,
    cleansers: &Cleansers,
) -> Result<Vec<Scope>, JobError> {
    entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let at = format!("{list}[{i}]");
            if e.tasks.is_empty() {
                return Err(invalid(file, format!("{at}.tasks"), "lists no task"));
            }
            if let Some(j) = e.tasks.iter().position(|t| t.is_empty()) {
                return Err(invalid(file, format!("{at}.tasks[{j}]"), "empty task name"));
            }
            let tasks = if e.tasks.iter().any(|t| t == "*") {
                Tasks::All
            } else {
                Tasks::Named(e.tasks)
            };
            if e.filters.is_empty() {
                return Err(invalid(file, format!("{at}.filters"), "lists no filter"));
            }
            let filters = e
                .filters
                .into_iter()
                .enumerate()
                .map(|(j, f)| FilterSpec::parse(file, &format!("{at}.filters[{j}]"), f, cleansers))
                .collect::<Result<_, _>>()?;
            Ok(Scope { tasks, filters })
        })
        .collect()
}

fn chain<'a>(scopes: &'a [Scope], task: &'a str) -> impl Iterator<Item = &'a FilterSpec> + 'a {
    scopes
        .iter()
        .filter(move |s| s.covers(task))
        .flat_map(|s| s.filters.iter())
}

fn run(scopes: &[Scope], task: &str, mut model: FLModel) -> Result<FLModel, FilterError> {
    for f in chain(scopes, task) {
        model = f.filter().apply(model)?;
    }
    Ok(model)
}

fn run_ref(scopes: &[Scope], task: &str, model: ModelRef) -> Result<ModelRef, FilterRefError> {
    let Some(first) = chain(scopes, task).next() else {
        return Ok(model);
    };
    let loaded = model.load().map_err(|source| FilterRefError::Load {
        filter: first.name(),
        source,
    })?;
    drop(model);
    // The only holder (a model just received) gives its tensors up; a shared one is copied.
    let owned = Arc::unwrap_or_clone(loaded);
    Ok(ModelRef::from(run(scopes, task, owned)?))
}

/// Runs a side's task data filters on each task's model once, however many sites the model
/// goes to: a round sends one global model to every site, and the last model filtered (its
/// source, task name and outcome) is kept until another one comes.
#[derive(Debug, Default)]
pub struct TaskDataOnce {
    last: Option<(String, ModelRef, Result<ModelRef, String>)>,
}

impl TaskDataOnce {
    /// The model `task` carries out once `chains`' data filters ran on it (itself when none
    /// applies), or why a filter refused it.
    pub fn task_data(
        &mut self,
        chains: &FilterChains,
        task: &str,
        model: ModelRef,
    ) -> Result<ModelRef, String> {
        if !chains.has_task_data(task) {
            return Ok(model);
        }
        if let Some((t, source, outcome)) = &self.last
            && t == task
            && same_model(source, &model)
        {
            return outcome.clone();
        }
        // The previous model filtered goes before this one is made.
        self.last = None;
        let outcome = chains
            .task_data_ref(task, model.clone())
            .map_err(|e| e.to_string());
        self.last = Some((task.to_string(), model, outcome.clone()));
        outcome
    }
}

/// Whether `a` and `b` are the same shared model, without comparing tensors.
fn same_model(a: &ModelRef, b: &ModelRef) -> bool {
    match (a, b) {
        (ModelRef::Memory(a), ModelRef::Memory(b)) => Arc::ptr_eq(a, b),
        (ModelRef::Stored(a), ModelRef::Stored(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// The bytes a model's tensors take on the wire (headers aside).
pub fn wire_bytes(model: &FLModel) -> u64 {
    model.params.values().map(|t| t.bytes().len() as u64).sum()
}

/// Adds the four filters of a quantized scatter-and-gather transfer to the JSON configs of
/// the app at `app_dir` (server data and site result `ModelQuantizer` of `quantization_type`,
/// site data and server result `ModelDequantizer`), for every task. Used by `bench` and by
/// tests; a user writes them in the job (see `examples/hello-fedavg-quantized`).
pub fn write_quantized_filters(
    app_dir: &Path,
    quantization_type: QuantizationType,
) -> Result<(), std::io::Error> {
    let quantize = serde_json::json!([{ "tasks": ["*"], "filters": [
        { "name": "ModelQuantizer", "args": { "quantization_type": quantization_type.as_str() } }
    ] }]);
    let dequantize = serde_json::json!([{ "tasks": ["*"], "filters": [
        { "name": "ModelDequantizer", "args": {} }
    ] }]);
    for (stem, data, result) in [
        ("config_fed_server", &quantize, &dequantize),
        ("config_fed_client", &dequantize, &quantize),
    ] {
        let path = app_dir.join("config").join(format!("{stem}.json"));
        let text = std::fs::read(&path)?;
        let mut v: serde_json::Value = serde_json::from_slice(&text)?;
        let obj = v.as_object_mut().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: not a JSON object", path.display()),
            )
        })?;
        obj.insert("task_data_filters".into(), data.clone());
        obj.insert("task_result_filters".into(), result.clone());
        std::fs::write(&path, serde_json::to_vec_pretty(&v)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_protocols::model::Tensor;
    use std::collections::BTreeMap;

    fn parse_json(server: bool, v: serde_json::Value) -> Result<FilterChains, String> {
        #[derive(Deserialize)]
        struct Lists {
            #[serde(default)]
            task_data_filters: Vec<ScopeEntry>,
            #[serde(default)]
            task_result_filters: Vec<ScopeEntry>,
        }
        let file = if server {
            Path::new("config_fed_server.json")
        } else {
            Path::new("config_fed_client.json")
        };
        let l: Lists = serde_json::from_value(v).map_err(|e| e.to_string())?;
        FilterChains::parse(file, l.task_data_filters, l.task_result_filters)
            .map_err(|e| e.to_string())
    }

    fn model() -> FLModel {
        let values: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) / 7.0).collect();
        FLModel::from_params(BTreeMap::from([(
            "w".to_string(),
            Tensor::from_f32(vec![300], &values).unwrap(),
        )]))
    }

    #[test]
    fn name_and_path_forms_and_star_are_accepted() {
        let c = parse_json(
            true,
            serde_json::json!({
                "task_data_filters": [{"tasks": ["train"], "filters": [
                    {"name": "ModelQuantizer", "args": {"quantization_type": "blockwise8", "block_size": 32}}]}],
                "task_result_filters": [{"tasks": ["*"], "filters": [
                    {"path": "nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer"}]}]
            }),
        )
        .unwrap();
        assert!(!c.is_empty());
        assert_eq!(
            c.task_data[0].filters,
            vec![FilterSpec::ModelQuantizer(
                ModelQuantizer::new(QuantizationType::Blockwise8).with_block_size(32)
            )]
        );
        assert!(c.has_task_data("train"));
        assert!(!c.has_task_data("validate"));
        assert!(c.has_task_result("validate"));
        assert!(c.has_task_result("anything"));
        // FLARE's default type is float16.
        let c = parse_json(
            false,
            serde_json::json!({"task_result_filters": [{"tasks": ["train"], "filters": [
                {"path": "nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer", "args": {}}]}]}),
        )
        .unwrap();
        assert_eq!(
            c.task_result[0].filters,
            vec![FilterSpec::ModelQuantizer(ModelQuantizer::new(
                QuantizationType::Float16
            ))]
        );
        assert!(parse_json(true, serde_json::json!({})).unwrap().is_empty());
    }

    #[test]
    fn bad_configs_name_the_file_and_key() {
        let cases = [
            (
                serde_json::json!({"task_data_filters": [{"tasks": ["train"], "filters": [
                    {"name": "ModelQuantizer", "args": {"quantization_type": "blockwise8"}},
                    {"name": "HEModelEncryptor"}]}]}),
                "task_data_filters[0].filters[1].name: unknown filter \"HEModelEncryptor\"",
            ),
            (
                serde_json::json!({"task_result_filters": [{"tasks": ["train"], "filters": [
                    {"path": "nvflare.app_common.filters.Nope"}]}]}),
                "task_result_filters[0].filters[0].path: unknown filter \"Nope\"",
            ),
            (
                serde_json::json!({"task_data_filters": [{"tasks": [], "filters": [
                    {"name": "ModelDequantizer"}]}]}),
                "task_data_filters[0].tasks: lists no task",
            ),
            (
                serde_json::json!({"task_data_filters": [{"tasks": ["train"], "filters": []}]}),
                "task_data_filters[0].filters: lists no filter",
            ),
            (
                serde_json::json!({"task_data_filters": [{"tasks": ["train"], "filters": [
                    {"name": "ModelQuantizer", "args": {"quantization_type": "int3"}}]}]}),
                "task_data_filters[0].filters[0].args.quantization_type: ModelQuantizer: unknown quantization_type \"int3\"",
            ),
            (
                serde_json::json!({"task_data_filters": [{"tasks": ["train"], "filters": [
                    {"name": "ModelQuantizer", "args": {"quantization_type": "blockwise8", "block_size": 0}}]}]}),
                "task_data_filters[0].filters[0].args.block_size: must be at least 1",
            ),
            (
                serde_json::json!({"task_data_filters": [{"tasks": ["train"], "filters": [
                    {"name": "ModelQuantizer", "args": {"bits": 4}}]}]}),
                "task_data_filters[0].filters[0].args.bits: unknown field `bits`",
            ),
            (
                serde_json::json!({"task_result_filters": [{"tasks": ["train"], "filters": [
                    {"name": "ModelDequantizer", "args": {"x": 1}}]}]}),
                "task_result_filters[0].filters[0].args.x: unknown field `x`",
            ),
            (
                serde_json::json!({"task_result_filters": [{"tasks": ["train"], "filters": [
                    {"args": {}}]}]}),
                "task_result_filters[0].filters[0]: names no filter",
            ),
            (
                serde_json::json!({"task_result_filters": [{"tasks": ["train"], "filters": [
                    {"name": "ModelQuantizer", "path": "a.b.ModelDequantizer"}]}]}),
                "task_result_filters[0].filters[0].name: \"ModelQuantizer\" disagrees",
            ),
        ];
        for (server, (v, want)) in [true, false].into_iter().cycle().zip(cases) {
            let err = parse_json(server, v).unwrap_err();
            let file = if server {
                "config_fed_server.json"
            } else {
                "config_fed_client.json"
            };
            assert!(
                err.starts_with(&format!("{file}: {want}")),
                "{err:?} should start with {file}: {want}"
            );
        }
    }

    fn result_filters(v: serde_json::Value) -> Result<Vec<FilterSpec>, String> {
        let c = parse_json(
            false,
            serde_json::json!({"task_result_filters": [{"tasks": ["train"], "filters": v}]}),
        )?;
        Ok(c.task_result[0].filters.clone())
    }

    fn diff_model() -> FLModel {
        let mut m = model();
        m.params_type = ParamsType::Diff;
        m
    }

    #[test]
    fn privacy_filters_parse_by_name_and_path_with_flare_defaults() {
        let got = result_filters(serde_json::json!([
            {"path": "nvflare.app_common.filters.exclude_vars.ExcludeVars",
             "args": {"exclude_vars": ["fc.weight", "fc.bias"]}},
            {"name": "ExcludeVars", "args": {"exclude_vars": "bias$", "data_kinds": ["WEIGHT_DIFF"]}},
            {"name": "ExcludeVars"},
            {"path": "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy"},
            {"name": "PercentilePrivacy", "args": {"percentile": 20, "gamma": 0.5, "data_kinds": ["WEIGHT_DIFF"]}},
            {"path": "nvflare.app_common.filters.svt_privacy.SVTPrivacy", "args": {}},
            {"name": "SVTPrivacy", "args": {"fraction": 0.5, "replace": false, "epsilon_release": 2.0}},
            {"path": "flwr.client.mod.LocalDpMod",
             "args": {"clipping_norm": 1.0, "sensitivity": 0.5, "epsilon": 2, "delta": 1e-5}}
        ]))
        .unwrap();
        let seed = [0u8; 32];
        let svt =
            |a: SvtArgs| FilterSpec::SvtPrivacy(Arc::new(SvtPrivacy::with_seed(a, seed).unwrap()));
        let want = vec![
            FilterSpec::ExcludeVars(ExcludeVars::names(["fc.weight", "fc.bias"])),
            FilterSpec::ExcludeVars(
                ExcludeVars::pattern("bias$")
                    .unwrap()
                    .only(ParamsType::Diff),
            ),
            FilterSpec::ExcludeVars(ExcludeVars::nothing()),
            FilterSpec::PercentilePrivacy(PercentilePrivacy::default()),
            FilterSpec::PercentilePrivacy(PercentilePrivacy::new(20.0, 0.5).unwrap()),
            svt(SvtArgs::default()),
            svt(SvtArgs {
                fraction: 0.5,
                replace: false,
                epsilon_release: Some(2.0),
                ..SvtArgs::default()
            }),
            FilterSpec::LocalDp(Arc::new(
                LocalDp::with_seed(
                    LocalDpArgs {
                        clipping_norm: 1.0,
                        sensitivity: 0.5,
                        epsilon: 2.0,
                        delta: 1e-5,
                    },
                    seed,
                )
                .unwrap(),
            )),
        ];
        assert_eq!(got, want);
        let diff_only: Vec<bool> = got.iter().map(FilterSpec::diff_only).collect();
        assert_eq!(
            diff_only,
            [false, false, false, true, true, true, true, true]
        );
        // Each SVT or local DP filter has its own OS seed: two alike draw different noise.
        let twins = result_filters(serde_json::json!([
            {"name": "LocalDpMod", "args": {"clipping_norm": 1e9, "sensitivity": 1, "epsilon": 1, "delta": 1e-5}},
            {"name": "LocalDpMod", "args": {"clipping_norm": 1e9, "sensitivity": 1, "epsilon": 1, "delta": 1e-5}}
        ]))
        .unwrap();
        assert_eq!(twins[0], twins[1]);
        let m = diff_model();
        assert_ne!(
            twins[0].filter().apply(m.clone()).unwrap(),
            twins[1].filter().apply(m).unwrap()
        );
    }

    #[test]
    fn bad_privacy_args_name_the_key() {
        let cases = [
            (
                serde_json::json!([{"name": "PercentilePrivacy", "args": {"percentil": 5}}]),
                "task_result_filters[0].filters[0].args.percentil: unknown field `percentil`",
            ),
            (
                serde_json::json!([{"name": "ExcludeVars"},
                    {"name": "PercentilePrivacy", "args": {"percentile": 101}}]),
                "task_result_filters[0].filters[1].args.percentile: 101 is not in [0, 100]",
            ),
            (
                serde_json::json!([{"name": "PercentilePrivacy", "args": {"gamma": -1}}]),
                "task_result_filters[0].filters[0].args.gamma: -1 is not a positive number",
            ),
            (
                serde_json::json!([{"name": "PercentilePrivacy", "args": {"data_kinds": ["WEIGHTS", "WEIGHT_DIFF"]}}]),
                "task_result_filters[0].filters[0].args.data_kinds: Flare applies PercentilePrivacy to WEIGHT_DIFF results only",
            ),
            (
                serde_json::json!([{"name": "SVTPrivacy", "args": {"data_kinds": ["METRICS"]}}]),
                "task_result_filters[0].filters[0].args.data_kinds[0]: unsupported data kind \"METRICS\"",
            ),
            (
                serde_json::json!([{"name": "SVTPrivacy", "args": {"fraction": 0}}]),
                "task_result_filters[0].filters[0].args.fraction: 0 is not in (0, 1]",
            ),
            (
                serde_json::json!([{"name": "SVTPrivacy", "args": {"epsilon_threshold": 0.05, "epsilon_query": 0.5}}]),
                "task_result_filters[0].filters[0].args.epsilon_query: epsilon_threshold + epsilon_query",
            ),
            (
                serde_json::json!([{"name": "SVTPrivacy", "args": {"replace": "yes"}}]),
                "task_result_filters[0].filters[0].args.replace: invalid type",
            ),
            (
                serde_json::json!([{"name": "ExcludeVars", "args": {"exclude_vars": 3}}]),
                "task_result_filters[0].filters[0].args.exclude_vars: expected a list of tensor names or a regex string",
            ),
            (
                serde_json::json!([{"name": "ExcludeVars", "args": {"exclude_vars": ["a", 1]}}]),
                "task_result_filters[0].filters[0].args.exclude_vars[1]: a tensor name must be a string",
            ),
            (
                serde_json::json!([{"name": "ExcludeVars", "args": {"exclude_vars": "(a"}}]),
                "task_result_filters[0].filters[0].args.exclude_vars: regex parse error",
            ),
            (
                serde_json::json!([{"name": "LocalDpMod", "args": {"clipping_norm": 1, "sensitivity": 1, "epsilon": 1}}]),
                "task_result_filters[0].filters[0].args: missing field `delta`",
            ),
            (
                serde_json::json!([{"name": "LocalDpMod", "args": {"clipping_norm": 1, "sensitivity": 1, "epsilon": 1, "delta": 2}}]),
                "task_result_filters[0].filters[0].args.delta: 2 is not in (0, 1)",
            ),
        ];
        for (v, want) in cases {
            let err = result_filters(v).unwrap_err();
            let want = format!("config_fed_client.json: {want}");
            assert!(err.starts_with(&want), "{err:?} should start with {want}");
        }
    }

    #[test]
    fn a_sites_list_parses_flat_and_goes_before_the_jobs_filters() {
        let file = Path::new("local/privacy.json");
        let key = "scopes[0].task_result_filters";
        let site = parse_filter_list(
            file,
            key,
            serde_json::json!([
                {"path": "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
                 "args": {"percentile": 10, "gamma": 0.01}},
                {"name": "ExcludeVars", "args": {"exclude_vars": "^skip"}}
            ]),
        )
        .unwrap();
        assert_eq!(
            site.iter().map(FilterSpec::name).collect::<Vec<_>>(),
            ["PercentilePrivacy", "ExcludeVars"]
        );
        assert_eq!(
            parse_filter_list(file, key, serde_json::json!([])).unwrap(),
            []
        );
        for (v, want) in [
            (
                serde_json::json!([{"name": "ExcludeVars"},
                    {"name": "PercentilePrivacy", "args": {"percentile": -3}}]),
                "local/privacy.json: scopes[0].task_result_filters[1].args.percentile: -3 is not in [0, 100]",
            ),
            (
                serde_json::json!([{"name": "ExcludeVars", "direction": "out"}]),
                "local/privacy.json: scopes[0].task_result_filters[0].direction: unknown field `direction`",
            ),
            (
                serde_json::json!({"name": "ExcludeVars"}),
                "local/privacy.json: scopes[0].task_result_filters: invalid type: map",
            ),
            (
                serde_json::json!([{"name": "Nope"}]),
                "local/privacy.json: scopes[0].task_result_filters[0].name: unknown filter \"Nope\"",
            ),
        ] {
            let err = parse_filter_list(file, key, v).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want}");
        }

        // The job quantizes its train results; the site's privacy filters run first, on
        // every task, and the job's after them.
        let job = parse_json(
            false,
            serde_json::json!({
                "task_data_filters": [{"tasks": ["train"], "filters": [{"name": "ModelDequantizer"}]}],
                "task_result_filters": [{"tasks": ["train"], "filters": [
                    {"name": "ModelQuantizer", "args": {"quantization_type": "float16"}}]}]
            }),
        )
        .unwrap();
        assert!(job.diff_only_results().is_empty());
        let data = parse_filter_list(
            file,
            "scopes[0].task_data_filters",
            serde_json::json!([{"name": "ExcludeVars"}]),
        )
        .unwrap();
        let chains = job.with_site_scope(data, site);
        let names = |scopes: &[Scope], task: &str| {
            chain(scopes, task)
                .map(FilterSpec::name)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&chains.task_result, "train"),
            ["PercentilePrivacy", "ExcludeVars", "ModelQuantizer"]
        );
        assert_eq!(
            names(&chains.task_result, "validate"),
            ["PercentilePrivacy", "ExcludeVars"]
        );
        assert_eq!(
            names(&chains.task_data, "train"),
            ["ExcludeVars", "ModelDequantizer"]
        );
        assert_eq!(chains.diff_only_results(), ["PercentilePrivacy"]);
        assert_eq!(
            chains.diff_only_results_for("submit_model"),
            ["PercentilePrivacy"]
        );
        // A diff is cut and clipped before it is quantized, and `skip*` tensors dropped.
        let mut m = diff_model();
        m.params.insert("skip.me".into(), m.params["w"].clone());
        let out = chains.task_result("train", m).unwrap();
        assert_eq!(out.params.keys().collect::<Vec<_>>(), ["w"]);
        assert_eq!(out.params["w"].dtype(), flare_protocols::model::DType::F16);
        let w = out.params["w"].to_f32_vec();
        assert!(w.iter().all(|x| x.abs() <= 0.0101), "{w:?}");
        // |w| = k/7 for k = 0 (once), 1..=149 (twice), 150; with skip.me's copy, the 10th
        // percentile of the 600 is 15/7, so the 29 entries with k < 15 are cut.
        assert_eq!(w.iter().filter(|x| **x == 0.0).count(), 29);
        // Empty site lists leave the job's chains as they were.
        let same = chains.clone().with_site_scope(vec![], vec![]);
        assert_eq!(same, chains);
    }

    #[test]
    fn chains_apply_by_task_and_refs_pass_through_untouched() {
        let server = parse_json(
            true,
            serde_json::json!({
                "task_data_filters": [{"tasks": ["train"], "filters": [
                    {"name": "ModelQuantizer", "args": {"quantization_type": "blockwise8"}}]}],
                "task_result_filters": [{"tasks": ["train"], "filters": [{"name": "ModelDequantizer"}]}]
            }),
        )
        .unwrap();
        let m = model();
        let f32_bytes = wire_bytes(&m);
        let q = server.task_data("train", m.clone()).unwrap();
        // 300 codes and ceil(300 / 64) = 5 scales.
        assert_eq!(wire_bytes(&q), 300 + 5 * 4);
        assert!(wire_bytes(&q) < f32_bytes / 3);
        let back = server.task_result("train", q).unwrap();
        let (a, b) = (m.params["w"].to_f32_vec(), back.params["w"].to_f32_vec());
        assert!(
            a.iter()
                .zip(&b)
                .all(|(x, y)| (x - y).abs() <= 150.0 / 7.0 / 254.0 + 1e-6)
        );
        // Another task is not filtered, and a ref passes as it is (the same Arc).
        assert_eq!(server.task_data("validate", m.clone()).unwrap(), m);
        let shared = Arc::new(m);
        let r = server
            .task_data_ref("validate", ModelRef::Memory(Arc::clone(&shared)))
            .unwrap();
        assert!(Arc::ptr_eq(r.in_memory().unwrap(), &shared));
        let r = server
            .task_data_ref("train", ModelRef::Memory(Arc::clone(&shared)))
            .unwrap();
        assert_eq!(r.num_bytes(), 320);
        // Quantizing twice is refused, naming the filter.
        let err = server.task_data_ref("train", r).unwrap_err().to_string();
        assert!(err.starts_with("ModelQuantizer: "), "{err}");
    }

    #[test]
    fn a_job_loads_its_filters_and_names_the_real_file() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("job");
        crate::bench::write_synthetic_job(&job, 10, 2, 1).unwrap();
        write_quantized_filters(&job.join("app"), QuantizationType::BFloat16).unwrap();
        let j = crate::job::Job::load(&job).unwrap();
        let q = FilterSpec::ModelQuantizer(ModelQuantizer::new(QuantizationType::BFloat16));
        let d = FilterSpec::ModelDequantizer(ModelDequantizer);
        assert_eq!(j.server.filters.task_data[0].filters, vec![q.clone()]);
        assert_eq!(j.server.filters.task_result[0].filters, vec![d.clone()]);
        let site = j.app_for("site-1").unwrap();
        assert_eq!(site.filters.task_data[0].filters, vec![d]);
        assert_eq!(site.filters.task_result[0].filters, vec![q]);
        // A bad name in the client file names that file and the key.
        let path = job.join("app/config/config_fed_client.json");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("ModelDequantizer", "ModelDecompressor")).unwrap();
        let err = crate::job::Job::load(&job).unwrap_err().to_string();
        assert!(
            err.contains("config_fed_client.json: task_data_filters[0].filters[0].name: unknown filter \"ModelDecompressor\""),
            "{err}"
        );
        // An unknown key in an entry is refused by the file's own parser, with its path.
        std::fs::write(&path, text.replace("\"filters\"", "\"filter\"")).unwrap();
        let err = crate::job::Job::load(&job).unwrap_err().to_string();
        assert!(
            err.contains("config_fed_client.json: task_data_filters[0]"),
            "{err}"
        );
    }
}
