//! An MLflow file store (the `mlruns` folder that MLflow's `FileStore` reads, so that
//! `mlflow ui --backend-store-uri ./mlruns` shows the runs).
//!
//! Layout, as MLflow writes it:
//!
//! ```text
//! mlruns/.trash/
//! mlruns/0/meta.yaml                      the "Default" experiment
//! mlruns/<exp_id>/meta.yaml               artifact_location, creation_time, experiment_id,
//!                                         last_update_time, lifecycle_stage, name
//! mlruns/<exp_id>/<run_id>/meta.yaml      run info; status is an int (1 RUNNING, 3 FINISHED)
//! mlruns/<exp_id>/<run_id>/metrics/<key>  lines "<timestamp_ms> <value> <step>"
//! mlruns/<exp_id>/<run_id>/params/<key>   the raw value
//! mlruns/<exp_id>/<run_id>/tags/<key>     the raw value; tags/mlflow.runName names the run
//! mlruns/<exp_id>/<run_id>/artifacts/
//! ```
//!
//! A key with `/` is a nested path, as in MLflow. Experiment ids are numeric strings; run ids
//! are 32 hex characters derived from the experiment and run names, so a run is the same run
//! after a restart.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_yaml::{Mapping, Value};

/// The file of an experiment's or run's metadata.
const META: &str = "meta.yaml";
/// Where MLflow moves deleted experiments.
const TRASH: &str = ".trash";
/// Folders of an experiment that are not runs.
const EXPERIMENT_FOLDERS: [&str; 3] = ["tags", "datasets", "traces"];
/// The tag that names a run.
const RUN_NAME_TAG: &str = "mlflow.runName";
/// `RunStatus.RUNNING`.
const STATUS_RUNNING: u8 = 1;
/// `RunStatus.FINISHED`.
const STATUS_FINISHED: u8 = 3;
/// `SourceType.LOCAL`, which MLflow's file store always writes.
const SOURCE_LOCAL: u8 = 4;
/// MLflow's longest metric, param or tag key.
const MAX_KEY_LEN: usize = 250;

/// What can go wrong with the store. Each variant names the file or folder.
#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    /// A file or folder could not be created, written or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A `meta.yaml` is not YAML, or could not be written as YAML.
    #[error("{}: {source}", path.display())]
    Yaml {
        /// The file.
        path: PathBuf,
        /// The YAML error.
        source: serde_yaml::Error,
    },
    /// A `meta.yaml` lacks a field we need.
    #[error("{}: {reason}", path.display())]
    BadMeta {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A metric, param or tag key that MLflow would refuse or that would leave its folder.
    #[error("{}: bad key {key:?}: {reason}", path.display())]
    BadKey {
        /// The folder the key would be a file in.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An empty experiment or run name.
    #[error("{}: empty {what} name", path.display())]
    EmptyName {
        /// The folder it would go in.
        path: PathBuf,
        /// `experiment` or `run`.
        what: &'static str,
    },
    /// The experiment or run of that name was deleted (moved to `.trash` or marked
    /// `deleted`); MLflow refuses to reuse the name until it is removed for good.
    #[error("{}: {what} {name:?} is deleted", path.display())]
    Deleted {
        /// Its folder.
        path: PathBuf,
        /// `experiment` or `run`.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// A run id that this store has no run for.
    #[error("{}: no run {run_id}", path.display())]
    UnknownRun {
        /// The experiment's folder.
        path: PathBuf,
        /// The run id.
        run_id: String,
    },
}

/// A run's id: 32 lowercase hex characters (or, for a run MLflow itself made, its id).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(String);

impl RunId {
    /// The id as MLflow shows it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `meta.yaml` of an experiment, in MLflow's field order (sorted, as `yaml.safe_dump` writes).
#[derive(Serialize)]
struct ExperimentMeta<'a> {
    artifact_location: String,
    creation_time: u64,
    experiment_id: &'a str,
    last_update_time: u64,
    lifecycle_stage: &'a str,
    name: &'a str,
}

/// `meta.yaml` of a run, in MLflow's field order.
#[derive(Serialize)]
struct RunMeta<'a> {
    artifact_uri: String,
    end_time: Option<u64>,
    entry_point_name: &'a str,
    experiment_id: &'a str,
    lifecycle_stage: &'a str,
    run_id: &'a str,
    run_name: &'a str,
    run_uuid: &'a str,
    source_name: &'a str,
    source_type: u8,
    source_version: &'a str,
    start_time: u64,
    status: u8,
    /// Always empty: kept for old MLflow versions, which read tags from here.
    tags: Vec<String>,
    user_id: &'a str,
}

/// One experiment of an MLflow file store, and its runs. Every call writes through to the
/// files (metric lines are appended with one write each), so nothing is lost on a crash
/// and MLflow sees the data at once.
#[derive(Debug)]
pub struct MlflowStore {
    /// The `mlruns` folder, absolute (artifact URIs are `file://` URIs of it).
    root: PathBuf,
    experiment_id: String,
    experiment_name: String,
    /// Runs found or made so far, by name.
    runs: HashMap<String, RunId>,
    /// Ids of runs known to have a folder here.
    known: HashSet<RunId>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MlflowError + '_ {
    move |source| MlflowError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `file://` URI of an absolute path, percent-encoding all but unreserved bytes and `/`.
fn file_uri(path: &Path) -> String {
    let mut uri = String::from("file://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            uri.push(char::from(b));
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri
}

/// Writes `data` to `path` through a temporary file and a rename, so that a reader never sees
/// half a `meta.yaml`.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), MlflowError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn write_yaml<T: Serialize>(path: &Path, value: &T) -> Result<(), MlflowError> {
    let text = serde_yaml::to_string(value).map_err(|source| MlflowError::Yaml {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, text.as_bytes())
}

fn read_yaml(path: &Path) -> Result<Mapping, MlflowError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_yaml::from_str(&text).map_err(|source| MlflowError::Yaml {
        path: path.to_path_buf(),
        source,
    })
}

/// A string field of a `meta.yaml` (numbers are read as their text, as MLflow casts legacy
/// integer ids).
fn field(meta: &Mapping, key: &str) -> Option<String> {
    match meta.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether `meta` is marked deleted (a missing stage means active, as in MLflow).
fn is_deleted(meta: &Mapping) -> bool {
    field(meta, "lifecycle_stage").as_deref() == Some("deleted")
}

/// The subfolders of `dir` whose names are UTF-8, sorted.
fn subdirs(dir: &Path) -> Result<Vec<String>, MlflowError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        if !entry.file_type().map_err(io_err(dir))?.is_dir() {
            continue;
        }
        if let Ok(name) = entry.file_name().into_string() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `id` is a run id MLflow accepts (`[A-Za-z0-9][\w-]{0,255}`), which also keeps it
/// a single path component.
fn valid_run_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.len() <= 256
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Checks a metric, param or tag key that will become a file under `dir`: MLflow's
/// characters (alphanumerics, `_ - . : /` and space), `/` only between non-empty components
/// that are not `.` or `..`.
fn check_key(dir: &Path, key: &str) -> Result<(), MlflowError> {
    let bad = |reason| {
        Err(MlflowError::BadKey {
            path: dir.to_path_buf(),
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > MAX_KEY_LEN {
        return bad("longer than 250 bytes");
    }
    if key.contains('\0') {
        return bad("contains NUL");
    }
    if key.contains('\\') {
        return bad("contains a backslash");
    }
    if key.starts_with('/') {
        return bad("is an absolute path");
    }
    if let Some(c) = key
        .chars()
        .find(|&c| !(c.is_alphanumeric() || "_-.:/ ".contains(c)))
    {
        return if c.is_control() {
            bad("contains a control character")
        } else {
            bad("contains a character MLflow refuses (allowed: alphanumerics, _ - . : / space)")
        };
    }
    for part in key.split('/') {
        if part.is_empty() {
            return bad("has an empty path component");
        }
        if part == "." || part == ".." {
            return bad("has a '.' or '..' path component");
        }
    }
    Ok(())
}

impl MlflowStore {
    /// Opens the store at `root` (an `mlruns` folder, created with the Default experiment
    /// and `.trash` when missing) and the experiment `experiment_name`: the existing one of
    /// that name, else a new one with the next free numeric id, created at `now_ms`
    /// (milliseconds since the Unix epoch).
    pub fn open(root: &Path, experiment_name: &str, now_ms: u64) -> Result<Self, MlflowError> {
        std::fs::create_dir_all(root).map_err(io_err(root))?;
        let root = std::fs::canonicalize(root).map_err(io_err(root))?;
        if experiment_name.is_empty() {
            return Err(MlflowError::EmptyName {
                path: root,
                what: "experiment",
            });
        }
        let trash = root.join(TRASH);
        std::fs::create_dir_all(&trash).map_err(io_err(&trash))?;

        let active = Self::experiments(&root)?;
        let deleted = Self::experiments(&trash)?;
        let mut store = MlflowStore {
            root,
            experiment_id: String::new(),
            experiment_name: experiment_name.to_string(),
            runs: HashMap::new(),
            known: HashSet::new(),
        };
        if !active.iter().chain(&deleted).any(|(id, _)| id == "0") {
            store.create_experiment("0", "Default", now_ms)?;
        }
        let active = Self::experiments(&store.root)?;
        if let Some((id, _)) = active.iter().find(|(_, name)| name == experiment_name) {
            store.experiment_id = id.clone();
            return Ok(store);
        }
        if let Some((id, _)) = deleted.iter().find(|(_, name)| name == experiment_name) {
            return Err(MlflowError::Deleted {
                path: trash.join(id),
                what: "experiment",
                name: experiment_name.to_string(),
            });
        }
        let next = active
            .iter()
            .chain(&deleted)
            .filter_map(|(id, _)| id.parse::<u64>().ok())
            .max()
            .map_or(1, |m| m.saturating_add(1));
        let id = next.to_string();
        store.create_experiment(&id, experiment_name, now_ms)?;
        store.experiment_id = id;
        Ok(store)
    }

    /// `(id, name)` of the experiments in `dir` with a readable `meta.yaml`; others are
    /// skipped with a warning, as MLflow does.
    fn experiments(dir: &Path) -> Result<Vec<(String, String)>, MlflowError> {
        let mut out = Vec::new();
        for id in subdirs(dir)? {
            if id == TRASH {
                continue;
            }
            let path = dir.join(&id).join(META);
            if !path.is_file() {
                continue;
            }
            match read_yaml(&path).map(|meta| field(&meta, "name")) {
                Ok(Some(name)) => out.push((id, name)),
                Ok(None) => tracing::warn!(path = %path.display(), "experiment without a name"),
                Err(e) => tracing::warn!(error = %e, "unreadable experiment"),
            }
        }
        Ok(out)
    }

    fn create_experiment(&self, id: &str, name: &str, now_ms: u64) -> Result<(), MlflowError> {
        let dir = self.root.join(id);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        write_yaml(
            &dir.join(META),
            &ExperimentMeta {
                artifact_location: file_uri(&dir),
                creation_time: now_ms,
                experiment_id: id,
                last_update_time: now_ms,
                lifecycle_stage: "active",
                name,
            },
        )
    }

    /// The `mlruns` folder (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The experiment's id, a numeric string.
    pub fn experiment_id(&self) -> &str {
        &self.experiment_id
    }

    /// The experiment's name.
    pub fn experiment_name(&self) -> &str {
        &self.experiment_name
    }

    /// The experiment's folder.
    fn experiment_dir(&self) -> PathBuf {
        self.root.join(&self.experiment_id)
    }

    /// The folder of `run` (whether or not it exists).
    pub fn run_dir(&self, run: &RunId) -> PathBuf {
        self.experiment_dir().join(&run.0)
    }

    /// The run named `run_name`: the existing one (by `run_name` in its `meta.yaml` or its
    /// `mlflow.runName` tag), else a new one, RUNNING, started at `now_ms`. The same name
    /// gives the same run, also after reopening the store.
    pub fn run(&mut self, run_name: &str, now_ms: u64) -> Result<RunId, MlflowError> {
        if let Some(id) = self.runs.get(run_name) {
            return Ok(id.clone());
        }
        let exp_dir = self.experiment_dir();
        if run_name.is_empty() {
            return Err(MlflowError::EmptyName {
                path: exp_dir,
                what: "run",
            });
        }
        let id = match self.find_run(run_name)? {
            Some(id) => id,
            None => self.create_run(run_name, now_ms)?,
        };
        self.known.insert(id.clone());
        self.runs.insert(run_name.to_string(), id.clone());
        Ok(id)
    }

    /// The active run of this name already in the experiment's folder.
    fn find_run(&self, run_name: &str) -> Result<Option<RunId>, MlflowError> {
        let exp_dir = self.experiment_dir();
        for id in subdirs(&exp_dir)? {
            if EXPERIMENT_FOLDERS.contains(&id.as_str()) || !valid_run_id(&id) {
                continue;
            }
            let dir = exp_dir.join(&id);
            let meta_path = dir.join(META);
            if !meta_path.is_file() {
                continue;
            }
            let meta = match read_yaml(&meta_path) {
                Ok(meta) => meta,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable run");
                    continue;
                }
            };
            if is_deleted(&meta) {
                continue;
            }
            let name = match field(&meta, "run_name").filter(|n| !n.is_empty()) {
                Some(name) => Some(name),
                None => std::fs::read_to_string(dir.join("tags").join(RUN_NAME_TAG)).ok(),
            };
            if name.as_deref() == Some(run_name) {
                return Ok(Some(RunId(id)));
            }
        }
        Ok(None)
    }

    /// 32 hex characters of SHA-256 over the experiment and run names.
    fn derive_run_id(&self, run_name: &str) -> RunId {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"flare-mlflow-run\0");
        ctx.update(self.experiment_name.as_bytes());
        ctx.update(b"\0");
        ctx.update(run_name.as_bytes());
        RunId(hex::encode(&ctx.finish().as_ref()[..16]))
    }

    fn create_run(&self, run_name: &str, now_ms: u64) -> Result<RunId, MlflowError> {
        let id = self.derive_run_id(run_name);
        let dir = self.run_dir(&id);
        let meta_path = dir.join(META);
        if meta_path.is_file() {
            // Not found by name: a deleted run, or one renamed by hand.
            return Err(MlflowError::Deleted {
                path: dir,
                what: "run",
                name: run_name.to_string(),
            });
        }
        for sub in ["metrics", "params", "tags", "artifacts"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let artifact_uri = format!("{}/{}/artifacts", file_uri(&self.experiment_dir()), id.0);
        write_yaml(
            &meta_path,
            &RunMeta {
                artifact_uri,
                end_time: None,
                entry_point_name: "",
                experiment_id: &self.experiment_id,
                lifecycle_stage: "active",
                run_id: &id.0,
                run_name,
                run_uuid: &id.0,
                source_name: "",
                source_type: SOURCE_LOCAL,
                source_version: "",
                start_time: now_ms,
                status: STATUS_RUNNING,
                tags: Vec::new(),
                user_id: "flare",
            },
        )?;
        let tag = dir.join("tags").join(RUN_NAME_TAG);
        std::fs::write(&tag, run_name).map_err(io_err(&tag))?;
        Ok(id)
    }

    /// The folder of `run`, checked to hold a run.
    fn existing_run_dir(&mut self, run: &RunId) -> Result<PathBuf, MlflowError> {
        let dir = self.run_dir(run);
        if !self.known.contains(run) {
            if !valid_run_id(&run.0) || !dir.join(META).is_file() {
                return Err(MlflowError::UnknownRun {
                    path: self.experiment_dir(),
                    run_id: run.0.clone(),
                });
            }
            self.known.insert(run.clone());
        }
        Ok(dir)
    }

    /// The file for `key` under `run`'s `folder` (`metrics`, `params` or `tags`), with its
    /// parent folders made.
    fn key_file(&mut self, run: &RunId, folder: &str, key: &str) -> Result<PathBuf, MlflowError> {
        let dir = self.existing_run_dir(run)?.join(folder);
        check_key(&dir, key)?;
        let path = dir.join(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        Ok(path)
    }

    /// Appends `"<ts_ms> <value> <step>"` to the metric `key` of `run`. A `/` in the key
    /// nests folders, as in MLflow.
    pub fn log_metric(
        &mut self,
        run: &RunId,
        key: &str,
        value: f64,
        step: i64,
        ts_ms: u64,
    ) -> Result<(), MlflowError> {
        let path = self.key_file(run, "metrics", key)?;
        // `{:?}` keeps a decimal point or exponent and writes NaN and inf, all of which
        // Python's float() reads.
        let line = format!("{ts_ms} {value:?} {step}\n");
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(line.as_bytes()).map_err(io_err(&path))
    }

    /// Sets the param `key` of `run` to `value`.
    pub fn log_param(&mut self, run: &RunId, key: &str, value: &str) -> Result<(), MlflowError> {
        let path = self.key_file(run, "params", key)?;
        write_atomic(&path, value.as_bytes())
    }

    /// Sets the tag `key` of `run` to `value`.
    pub fn set_tag(&mut self, run: &RunId, key: &str, value: &str) -> Result<(), MlflowError> {
        let path = self.key_file(run, "tags", key)?;
        write_atomic(&path, value.as_bytes())
    }

    /// Marks `run` FINISHED, ended at `now_ms`. Fields of its `meta.yaml` that we do not
    /// write (from another MLflow version) are kept.
    pub fn finish(&mut self, run: &RunId, now_ms: u64) -> Result<(), MlflowError> {
        let path = self.existing_run_dir(run)?.join(META);
        let mut meta = read_yaml(&path)?;
        if field(&meta, "run_id").is_none() && field(&meta, "run_uuid").is_none() {
            return Err(MlflowError::BadMeta {
                path,
                reason: "no run_id".to_string(),
            });
        }
        meta.insert("status".into(), Value::from(STATUS_FINISHED));
        meta.insert("end_time".into(), Value::from(now_ms));
        write_yaml(&path, &meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(path: &Path) -> Mapping {
        read_yaml(path).expect("meta")
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn layout_and_line_format() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("job/mlruns");
        let mut store = MlflowStore::open(&root, "FLARE FL Experiment", 1_000).expect("open");
        let root = std::fs::canonicalize(&root).expect("canon");
        assert_eq!(store.root(), root);
        assert_eq!(store.experiment_id(), "1");
        assert!(root.join(".trash").is_dir());

        let default = meta(&root.join("0/meta.yaml"));
        assert_eq!(field(&default, "name").as_deref(), Some("Default"));
        assert_eq!(field(&default, "experiment_id").as_deref(), Some("0"));
        let exp = meta(&root.join("1/meta.yaml"));
        assert_eq!(field(&exp, "name").as_deref(), Some("FLARE FL Experiment"));
        assert_eq!(field(&exp, "lifecycle_stage").as_deref(), Some("active"));
        assert_eq!(exp.get("experiment_id"), Some(&Value::from("1")));
        assert_eq!(exp.get("creation_time"), Some(&Value::from(1_000u64)));
        assert_eq!(exp.get("last_update_time"), Some(&Value::from(1_000u64)));
        assert_eq!(
            field(&exp, "artifact_location"),
            Some(format!("file://{}/1", root.display()))
        );

        let run = store.run("site-1", 2_000).expect("run");
        assert_eq!(run.as_str().len(), 32);
        assert!(run.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        let dir = root.join("1").join(run.as_str());
        assert_eq!(store.run_dir(&run), dir);
        for sub in ["metrics", "params", "tags", "artifacts"] {
            assert!(dir.join(sub).is_dir(), "{sub}");
        }
        let m = meta(&dir.join("meta.yaml"));
        let want = [
            ("run_id", Value::from(run.as_str())),
            ("run_uuid", Value::from(run.as_str())),
            ("run_name", Value::from("site-1")),
            ("experiment_id", Value::from("1")),
            ("lifecycle_stage", Value::from("active")),
            ("status", Value::from(1)),
            ("source_type", Value::from(4)),
            ("start_time", Value::from(2_000u64)),
            ("end_time", Value::Null),
            ("tags", Value::Sequence(vec![])),
            ("source_name", Value::from("")),
            ("entry_point_name", Value::from("")),
            ("source_version", Value::from("")),
            ("user_id", Value::from("flare")),
            (
                "artifact_uri",
                Value::from(format!("file://{}/1/{run}/artifacts", root.display())),
            ),
        ];
        for (k, v) in want {
            assert_eq!(m.get(k), Some(&v), "{k}");
        }
        assert_eq!(m.len(), 15);
        assert_eq!(read(&dir.join("tags/mlflow.runName")), "site-1");

        store
            .log_metric(&run, "train_loss", 0.5, 1, 3_000)
            .expect("m");
        store
            .log_metric(&run, "train_loss", 1.0, 2, 4_000)
            .expect("m");
        store
            .log_metric(&run, "train_loss", f64::NAN, 3, 5_000)
            .expect("m");
        store
            .log_metric(&run, "val/acc global", 1e-7, -1, 6_000)
            .expect("m");
        assert_eq!(
            read(&dir.join("metrics/train_loss")),
            "3000 0.5 1\n4000 1.0 2\n5000 NaN 3\n"
        );
        assert_eq!(read(&dir.join("metrics/val/acc global")), "6000 1e-7 -1\n");

        store.log_param(&run, "lr", "0.01").expect("p");
        store.log_param(&run, "lr", "0.02").expect("p");
        store.set_tag(&run, "flare.site", "site-1").expect("t");
        assert_eq!(read(&dir.join("params/lr")), "0.02");
        assert_eq!(read(&dir.join("tags/flare.site")), "site-1");

        store.finish(&run, 9_000).expect("finish");
        let m = meta(&dir.join("meta.yaml"));
        assert_eq!(m.get("status"), Some(&Value::from(3)));
        assert_eq!(m.get("end_time"), Some(&Value::from(9_000u64)));
        assert_eq!(m.get("run_name"), Some(&Value::from("site-1")));
        assert!(!dir.join("meta.yaml.tmp").exists());
    }

    #[test]
    fn reopen_finds_the_same_experiment_and_run() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("mlruns");
        let (run1, run2) = {
            let mut store = MlflowStore::open(&root, "exp", 1).expect("open");
            let a = store.run("site-1", 1).expect("a");
            let b = store.run("site-2", 1).expect("b");
            assert_ne!(a, b);
            assert_eq!(store.run("site-1", 5).expect("again"), a);
            store.log_metric(&a, "m", 1.0, 1, 10).expect("m");
            (a, b)
        };
        let mut store = MlflowStore::open(&root, "exp", 99).expect("reopen");
        assert_eq!(store.experiment_id(), "1");
        assert_eq!(store.run("site-2", 99).expect("b"), run2);
        assert_eq!(store.run("site-1", 99).expect("a"), run1);
        store.log_metric(&run1, "m", 2.0, 2, 20).expect("m");
        let dir = store.run_dir(&run1);
        assert_eq!(read(&dir.join("metrics/m")), "10 1.0 1\n20 2.0 2\n");
        // Reopening keeps the start time.
        let m = meta(&dir.join("meta.yaml"));
        assert_eq!(m.get("start_time"), Some(&Value::from(1u64)));

        // A second experiment takes the next id; the same run name is another run there.
        let mut other = MlflowStore::open(&root, "exp 2", 100).expect("other");
        assert_eq!(other.experiment_id(), "2");
        let c = other.run("site-1", 100).expect("c");
        assert_ne!(c, run1);
        // And "Default" is experiment 0.
        let default = MlflowStore::open(&root, "Default", 100).expect("default");
        assert_eq!(default.experiment_id(), "0");
        let names: Vec<String> = subdirs(&store.root).expect("ls");
        assert_eq!(names, vec![".trash", "0", "1", "2"]);
    }

    #[test]
    fn finds_runs_made_by_mlflow() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("mlruns");
        let mut store = MlflowStore::open(&root, "exp", 1).expect("open");
        let exp = store.root().join("1");
        // Named in meta.yaml (MLflow >= 2), with a random id and an extra field.
        let a = exp.join("0123456789abcdef0123456789abcdef");
        std::fs::create_dir_all(&a).expect("mkdir");
        std::fs::write(
            a.join("meta.yaml"),
            "run_id: 0123456789abcdef0123456789abcdef\nrun_name: by-meta\nstatus: 1\nextra: kept\n",
        )
        .expect("write");
        // Named only by its tag (older MLflow).
        let b = exp.join("fedcba9876543210fedcba9876543210");
        std::fs::create_dir_all(b.join("tags")).expect("mkdir");
        std::fs::write(
            b.join("meta.yaml"),
            "run_uuid: fedcba9876543210fedcba9876543210\n",
        )
        .expect("write");
        std::fs::write(b.join("tags/mlflow.runName"), "by-tag").expect("write");
        // A deleted run of the same name is passed over.
        let c = exp.join("00000000000000000000000000000000");
        std::fs::create_dir_all(&c).expect("mkdir");
        std::fs::write(
            c.join("meta.yaml"),
            "run_name: by-meta\nlifecycle_stage: deleted\n",
        )
        .expect("write");

        let ra = store.run("by-meta", 2).expect("a");
        assert_eq!(ra.as_str(), "0123456789abcdef0123456789abcdef");
        let rb = store.run("by-tag", 2).expect("b");
        assert_eq!(rb.as_str(), "fedcba9876543210fedcba9876543210");
        store.finish(&ra, 7).expect("finish");
        let m = meta(&a.join("meta.yaml"));
        assert_eq!(m.get("extra"), Some(&Value::from("kept")));
        assert_eq!(m.get("status"), Some(&Value::from(3)));
    }

    #[test]
    fn deleted_experiment_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("mlruns");
        let id = MlflowStore::open(&root, "gone", 1)
            .expect("open")
            .experiment_id()
            .to_string();
        std::fs::rename(root.join(&id), root.join(".trash").join(&id)).expect("trash");
        let err = MlflowStore::open(&root, "gone", 2).expect_err("deleted");
        assert!(
            matches!(
                err,
                MlflowError::Deleted {
                    what: "experiment",
                    ..
                }
            ),
            "{err:?}"
        );
        // Ids of trashed experiments are not reused.
        let next = MlflowStore::open(&root, "new", 3).expect("new");
        assert_eq!(next.experiment_id(), "2");
    }

    #[test]
    fn bad_keys_and_names_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("mlruns");
        let mut store = MlflowStore::open(&root, "exp", 1).expect("open");
        let run = store.run("site-1", 1).expect("run");
        for key in [
            "",
            "/etc/passwd",
            "..",
            ".",
            "a/../../b",
            "a/./b",
            "a//b",
            "a/",
            "a\\b",
            "a\0b",
            "a\nb",
            "a%b",
            &"k".repeat(251),
        ] {
            let err = store.log_metric(&run, key, 1.0, 1, 1).expect_err(key);
            assert!(
                matches!(err, MlflowError::BadKey { .. }),
                "{key:?}: {err:?}"
            );
            assert!(err.to_string().contains("metrics"), "{err}");
            let err = store.log_param(&run, key, "v").expect_err(key);
            assert!(
                matches!(err, MlflowError::BadKey { .. }),
                "{key:?}: {err:?}"
            );
            let err = store.set_tag(&run, key, "v").expect_err(key);
            assert!(
                matches!(err, MlflowError::BadKey { .. }),
                "{key:?}: {err:?}"
            );
        }
        // Nothing escaped the run's folders.
        let names: Vec<String> = subdirs(store.root()).expect("ls");
        assert_eq!(names, vec![".trash", "0", "1"]);
        assert!(!tmp.path().join("b").exists());
        // These are fine.
        for key in [
            "a.b",
            "a-b_c",
            "x/y/z",
            "with space",
            "ns:key",
            "k".repeat(250).as_str(),
        ] {
            store.log_metric(&run, key, 1.0, 1, 1).expect(key);
        }

        let err = store.run("", 1).expect_err("empty run");
        assert!(
            matches!(err, MlflowError::EmptyName { what: "run", .. }),
            "{err:?}"
        );
        let err = MlflowStore::open(&root, "", 1).expect_err("empty exp");
        assert!(
            matches!(
                err,
                MlflowError::EmptyName {
                    what: "experiment",
                    ..
                }
            ),
            "{err:?}"
        );

        // A run of another store is unknown here.
        let mut other = MlflowStore::open(&tmp.path().join("other"), "exp", 1).expect("other");
        let stranger = other.run("site-9", 1).expect("stranger");
        let err = store
            .log_metric(&stranger, "m", 1.0, 1, 1)
            .expect_err("unknown");
        assert!(matches!(err, MlflowError::UnknownRun { .. }), "{err:?}");
        let err = store.finish(&stranger, 1).expect_err("unknown");
        assert!(matches!(err, MlflowError::UnknownRun { .. }), "{err:?}");
    }

    #[test]
    fn file_uris_escape_odd_bytes() {
        assert_eq!(file_uri(Path::new("/a b/c%d/e")), "file:///a%20b/c%25d/e");
        assert_eq!(file_uri(Path::new("/x-y_z.~/1")), "file:///x-y_z.~/1");
    }

    /// MLflow's own client reads the store. Runs when `FLARE_MLFLOW_PYTHON` names a Python
    /// with `mlflow` (or `mlflow-skinny`) installed.
    #[test]
    fn mlflow_reads_our_store() {
        let Some(python) = std::env::var_os("FLARE_MLFLOW_PYTHON") else {
            eprintln!(
                "mlflow_reads_our_store: FLARE_MLFLOW_PYTHON unset, skipping the Python check"
            );
            return;
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("mlruns");
        let mut store = MlflowStore::open(&root, "FLARE FL Experiment", 1_000).expect("open");
        let run = store.run("site-1", 1_000).expect("run");
        store
            .log_metric(&run, "train_loss", 0.5, 1, 2_000)
            .expect("m");
        store
            .log_metric(&run, "train_loss", 0.25, 2, 3_000)
            .expect("m");
        store
            .log_metric(&run, "val/acc", 0.75, 2, 3_000)
            .expect("m");
        store.log_param(&run, "lr", "0.01").expect("p");
        store.set_tag(&run, "site", "site-1").expect("t");
        store.finish(&run, 4_000).expect("finish");
        let script = r#"
import json, sys, warnings
warnings.simplefilter("ignore")
from mlflow.tracking import MlflowClient
c = MlflowClient(tracking_uri="file://" + sys.argv[1])
e = c.get_experiment_by_name("FLARE FL Experiment")
runs = c.search_runs([e.experiment_id])
r = runs[0]
print(json.dumps({
  "experiment_id": e.experiment_id, "n_runs": len(runs), "run_id": r.info.run_id,
  "run_name": r.info.run_name, "status": r.info.status, "end_time": r.info.end_time,
  "params": r.data.params, "tags": {k: v for k, v in r.data.tags.items() if k == "site"},
  "metrics": r.data.metrics,
  "history": [[m.timestamp, m.value, m.step] for m in c.get_metric_history(r.info.run_id, "train_loss")],
}))
"#;
        let out = std::process::Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(store.root())
            // MLflow >= 3.7 refuses the file store unless asked.
            .env("MLFLOW_ALLOW_FILE_STORE", "true")
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(
            got,
            serde_json::json!({
                "experiment_id": "1", "n_runs": 1, "run_id": run.as_str(),
                "run_name": "site-1", "status": "FINISHED", "end_time": 4000,
                "params": {"lr": "0.01"}, "tags": {"site": "site-1"},
                "metrics": {"train_loss": 0.25, "val/acc": 0.75},
                "history": [[2000, 0.5, 1], [3000, 0.25, 2]],
            })
        );
    }
}
