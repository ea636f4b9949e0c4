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
//! Filters work on models in memory. A stored (file-backed) model passes through untouched
//! when no filter applies to its task, and is loaded when one does: a filtered transfer holds
//! the whole model in memory at the filter (the quantized copy and, while it is converted,
//! part of the original).
//!
//! Adding a filter touches one place: a [`FilterSpec`] variant, its typed args, and its arm
//! in [`FilterSpec::parse`].

use std::path::Path;
use std::sync::Arc;

use flare_protocols::filters::{
    Filter, FilterError, ModelDequantizer, ModelQuantizer, QuantizationType,
};
use flare_protocols::model::FLModel;
use flare_protocols::stored::{LoadError, ModelRef};
use serde::Deserialize;

use crate::job::{JobError, invalid, parse_args};

/// The filter names this node knows, for error messages.
const KNOWN: &str = "ModelQuantizer, ModelDequantizer";

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

/// A filter a job can name, with its checked arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterSpec {
    /// `ModelQuantizer` (`nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer`).
    ModelQuantizer(ModelQuantizer),
    /// `ModelDequantizer` (`nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer`).
    ModelDequantizer(ModelDequantizer),
}

impl FilterSpec {
    /// The filter named by an entry at `key` (`task_data_filters[0].filters[1]`).
    fn parse(file: &Path, key: &str, e: FilterEntry) -> Result<FilterSpec, JobError> {
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
        }
    }

    /// The filter's name, as FLARE spells it.
    pub fn name(&self) -> &'static str {
        self.filter().name()
    }
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
        Ok(FilterChains {
            task_data: parse_scopes(file, "task_data_filters", task_data)?,
            task_result: parse_scopes(file, "task_result_filters", task_result)?,
        })
    }

    /// Whether the side names no filter at all.
    pub fn is_empty(&self) -> bool {
        self.task_data.is_empty() && self.task_result.is_empty()
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

fn parse_scopes(file: &Path, list: &str, entries: Vec<ScopeEntry>) -> Result<Vec<Scope>, JobError> {
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
                .map(|(j, f)| FilterSpec::parse(file, &format!("{at}.filters[{j}]"), f))
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
                    {"name": "ExcludeVars"}]}]}),
                "task_data_filters[0].filters[1].name: unknown filter \"ExcludeVars\"",
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
