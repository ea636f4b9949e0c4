//! The writers of one job's metrics: TensorBoard event files and, when asked, MLflow's file
//! store, fed by the sites' batches (on the server) or by the simulated sites' queues (in the
//! simulator). See the module doc of [`crate::tracking`].
//!
//! Layout under the job's result folder:
//! - `<tb_folder>/<site>/events.out.tfevents.*`: one TensorBoard run per site;
//!   `add_scalars(main, {k: v})` goes to the child run `<site>/<main>_<k>` under the tag
//!   `main`, as PyTorch's writer and FLARE's receiver do (`/` in `main` becomes `_`).
//! - `<tb_folder>/global_model/`: the global model's metrics per round (`accuracy`, `loss`,
//!   DP's `privacy_epsilon`), step = the model version.
//! - `mlruns/<experiment>/<run>/metrics/<key>`: one MLflow run per site, and one for the
//!   global model.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::config::TrackingConfig;
use super::mlflow::{MlflowError, MlflowStore, RunId};
use super::tb::{EventWriter, TbError};
use super::{MetricRecord, MetricValue, RecordError, check_batch};

/// The TensorBoard run (and MLflow run suffix) of the global model's metrics.
pub const GLOBAL_RUN: &str = "global_model";
/// Most records one site may have written for one job; later ones are dropped, with one
/// warning (a site cannot fill the server's disk through its metrics).
pub const MAX_RECORDS_PER_SITE: u64 = 5_000_000;
/// Most TensorBoard runs (files) one job keeps open.
const MAX_RUNS: usize = 4096;

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A record breaks the limits.
    #[error("site {site}: {source}")]
    Record {
        /// The sending site.
        site: String,
        /// What is wrong.
        source: RecordError,
    },
    /// A site or run name that cannot be a folder.
    #[error("{0:?} cannot name a metrics run")]
    RunName(String),
    /// TensorBoard's writer failed.
    #[error(transparent)]
    Tb(#[from] TbError),
    /// MLflow's writer failed.
    #[error(transparent)]
    Mlflow(#[from] MlflowError),
    /// Too many runs.
    #[error("more than {MAX_RUNS} metrics runs in one job")]
    TooManyRuns,
}

/// What became of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Written.
    Written(usize),
    /// Already written before (its acknowledgement was lost): nothing written.
    Duplicate,
}

struct SiteStream {
    stream: u64,
    next_seq: u64,
    written: u64,
    warned: bool,
}

/// One job's writers.
pub struct JobSink {
    config: TrackingConfig,
    tb_root: Option<PathBuf>,
    tb: HashMap<String, EventWriter>,
    mlflow: Option<(MlflowStore, HashMap<String, RunId>)>,
    streams: HashMap<String, SiteStream>,
    job_id: String,
    job_name: String,
}

impl std::fmt::Debug for JobSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSink")
            .field("tb_root", &self.tb_root)
            .field("runs", &self.tb.len())
            .finish_non_exhaustive()
    }
}

/// `key` with the characters MLflow refuses in metric, param and tag names (it takes
/// alphanumerics, `_ - . : /` and space) replaced by `_`, and empty or dot-only path
/// components dropped.
fn mlflow_key(key: &str) -> String {
    let clean: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-.:/ ".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let parts: Vec<&str> = clean
        .split('/')
        .filter(|p| !p.is_empty() && !p.chars().all(|c| c == '.'))
        .collect();
    let joined = parts.join("/");
    if joined.is_empty() {
        "_".into()
    } else {
        joined.chars().take(250).collect()
    }
}

fn safe_run(name: &str) -> Result<(), SinkError> {
    if crate::net::download::safe_name(name) && !name.contains('/') && name.len() <= 128 {
        Ok(())
    } else {
        Err(SinkError::RunName(name.into()))
    }
}

impl JobSink {
    /// The writers `config` asks for, under `result_dir`; `None` when tracking is off. Files
    /// are created when the first record of a run arrives.
    pub fn open(
        result_dir: &Path,
        config: &TrackingConfig,
        job_id: &str,
        job_name: &str,
        now_ms: u64,
    ) -> Result<Option<JobSink>, SinkError> {
        if !config.is_on() {
            return Ok(None);
        }
        let mlflow = match &config.mlflow {
            Some(m) => Some((
                MlflowStore::open(&result_dir.join("mlruns"), &m.experiment_name, now_ms)?,
                HashMap::new(),
            )),
            None => None,
        };
        Ok(Some(JobSink {
            config: config.clone(),
            tb_root: config.tensorboard.as_ref().map(|f| result_dir.join(f)),
            tb: HashMap::new(),
            mlflow,
            streams: HashMap::new(),
            job_id: job_id.into(),
            job_name: job_name.into(),
        }))
    }

    /// The TensorBoard folder (`<result>/tb_events`), when TensorBoard is on.
    pub fn tb_root(&self) -> Option<&Path> {
        self.tb_root.as_deref()
    }

    /// Writes a site's batch: `records` from sequence number `seq` of the site's queue
    /// `stream`. A batch already written (same stream, `seq` behind what was written) is
    /// acknowledged without writing it again; a new stream (a restarted site) starts over.
    pub fn accept(
        &mut self,
        site: &str,
        stream: u64,
        seq: u64,
        records: &[MetricRecord],
    ) -> Result<Accepted, SinkError> {
        safe_run(site)?;
        check_batch(records).map_err(|source| SinkError::Record {
            site: site.into(),
            source,
        })?;
        let s = self.streams.entry(site.into()).or_insert(SiteStream {
            stream,
            next_seq: 0,
            written: 0,
            warned: false,
        });
        if s.stream != stream {
            s.stream = stream;
            s.next_seq = 0;
        }
        let end = seq + records.len() as u64;
        if end <= s.next_seq && !records.is_empty() {
            return Ok(Accepted::Duplicate);
        }
        // Records the site dropped (its queue was full) leave a gap: start after it. Records
        // of this batch already written are skipped.
        let skip = s.next_seq.saturating_sub(seq) as usize;
        s.next_seq = end;
        let room = MAX_RECORDS_PER_SITE.saturating_sub(s.written);
        let fresh = &records[skip.min(records.len())..];
        let take = fresh.len().min(room as usize);
        s.written += take as u64;
        if take < fresh.len() && !s.warned {
            s.warned = true;
            tracing::warn!(job = %self.job_id, %site, cap = MAX_RECORDS_PER_SITE, "the site logged more metric records than a job keeps; dropping the rest");
        }
        for r in &fresh[..take] {
            self.write(site, r)?;
        }
        self.flush()?;
        Ok(Accepted::Written(take))
    }

    /// Writes the records of a simulated site (no stream, no duplicates).
    pub fn write_all(&mut self, site: &str, records: &[MetricRecord]) -> Result<(), SinkError> {
        safe_run(site)?;
        for chunk in records.chunks(super::MAX_BATCH) {
            check_batch(chunk).map_err(|source| SinkError::Record {
                site: site.into(),
                source,
            })?;
            for r in chunk {
                self.write(site, r)?;
            }
        }
        self.flush()
    }

    /// Writes the global model's metrics of `version` (its round).
    pub fn global(
        &mut self,
        version: u32,
        metrics: &BTreeMap<String, f64>,
        now_ms: u64,
    ) -> Result<(), SinkError> {
        for (k, v) in metrics {
            if super::check_key(k).is_err() {
                continue;
            }
            let r = MetricRecord {
                key: k.clone(),
                value: MetricValue::Scalar(*v),
                step: Some(i64::from(version)),
                wall_ms: now_ms,
            };
            self.write(GLOBAL_RUN, &r)?;
        }
        self.flush()
    }

    fn tb_writer(&mut self, run: &str, wall: f64) -> Result<Option<&mut EventWriter>, SinkError> {
        let Some(root) = &self.tb_root else {
            return Ok(None);
        };
        if !self.tb.contains_key(run) {
            if self.tb.len() >= MAX_RUNS {
                return Err(SinkError::TooManyRuns);
            }
            let w = EventWriter::create(&root.join(run), wall)?;
            self.tb.insert(run.to_string(), w);
        }
        Ok(self.tb.get_mut(run))
    }

    fn mlflow_run(&mut self, site: &str, now_ms: u64) -> Result<Option<RunId>, SinkError> {
        let Some((store, runs)) = &mut self.mlflow else {
            return Ok(None);
        };
        if let Some(r) = runs.get(site) {
            return Ok(Some(r.clone()));
        }
        let Some(args) = &self.config.mlflow else {
            return Ok(None);
        };
        // FLARE's run names: <site>-<job id[:6]>-<job name>[-<run_name>].
        let short: String = self.job_id.chars().take(6).collect();
        let mut name = format!("{site}-{short}-{}", self.job_name);
        if let Some(r) = &args.run_name {
            name = format!("{name}-{r}");
        }
        let id = store.run(&name, now_ms)?;
        for (k, v) in args.experiment_tags.iter().chain(&args.run_tags) {
            store.set_tag(&id, k, v)?;
        }
        store.set_tag(&id, "site", site)?;
        runs.insert(site.to_string(), id.clone());
        Ok(Some(id))
    }

    fn write(&mut self, site: &str, r: &MetricRecord) -> Result<(), SinkError> {
        let wall = r.wall_ms as f64 / 1000.0;
        let step = r.step.unwrap_or(0);
        match &r.value {
            MetricValue::Scalar(v) => {
                if let Some(w) = self.tb_writer(site, wall)? {
                    w.add_scalar(&r.key, *v, step, wall)?;
                }
                if let Some(id) = self.mlflow_run(site, r.wall_ms)? {
                    if let Some((store, _)) = &mut self.mlflow {
                        store.log_metric(&id, &mlflow_key(&r.key), *v, step, r.wall_ms)?;
                    }
                }
            }
            MetricValue::Scalars(m) => {
                let main = r.key.replace('/', "_");
                for (k, v) in m {
                    let child = format!("{site}/{main}_{}", k.replace('/', "_"));
                    if let Some(w) = self.tb_writer(&child, wall)? {
                        w.add_scalar(&r.key, *v, step, wall)?;
                    }
                    if let Some(id) = self.mlflow_run(site, r.wall_ms)? {
                        if let Some((store, _)) = &mut self.mlflow {
                            store.log_metric(
                                &id,
                                &mlflow_key(&format!("{}/{k}", r.key)),
                                *v,
                                step,
                                r.wall_ms,
                            )?;
                        }
                    }
                }
            }
            MetricValue::Text(t) => {
                if let Some(w) = self.tb_writer(site, wall)? {
                    w.add_text(&r.key, t, step, wall)?;
                }
            }
            MetricValue::Param(v) => {
                if let Some(id) = self.mlflow_run(site, r.wall_ms)? {
                    if let Some((store, _)) = &mut self.mlflow {
                        store.log_param(&id, &mlflow_key(&r.key), v)?;
                    }
                }
            }
            MetricValue::Tag(v) => {
                if let Some(id) = self.mlflow_run(site, r.wall_ms)? {
                    if let Some((store, _)) = &mut self.mlflow {
                        store.set_tag(&id, &mlflow_key(&r.key), v)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Flushes every open file.
    pub fn flush(&mut self) -> Result<(), SinkError> {
        for w in self.tb.values_mut() {
            w.flush()?;
        }
        Ok(())
    }

    /// Flushes and marks the MLflow runs finished (the job ended).
    pub fn finish(&mut self, now_ms: u64) -> Result<(), SinkError> {
        self.flush()?;
        if let Some((store, runs)) = &mut self.mlflow {
            for id in runs.values() {
                store.finish(id, now_ms)?;
            }
        }
        Ok(())
    }
}

/// Run → tag → `[(step, value)]`.
pub type Runs = BTreeMap<String, BTreeMap<String, Vec<(i64, f32)>>>;

/// Reads every TensorBoard run under `tb_root` (`<site>` and `<site>/<child>` folders) into
/// run → tag → `[(step, value)]`, each series thinned to at most `max_points` evenly spaced
/// points (the last kept) for plotting.
pub fn read_runs(tb_root: &Path, max_points: usize) -> Result<Runs, TbError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(tb_root.to_path_buf(), String::new())];
    while let Some((dir, name)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(TbError::Io { path: dir, source }),
        };
        let mut has_events = false;
        for e in entries.flatten() {
            let p = e.path();
            let file_name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() && name.matches('/').count() < 1 {
                let child = if name.is_empty() {
                    file_name
                } else {
                    format!("{name}/{file_name}")
                };
                stack.push((p, child));
            } else if file_name.starts_with("events.out.tfevents.") {
                has_events = true;
            }
        }
        if has_events && !name.is_empty() {
            let mut series = super::tb::read_dir_scalars(&dir)?;
            for v in series.values_mut() {
                thin(v, max_points);
            }
            out.insert(name, series);
        }
    }
    Ok(out)
}

/// Keeps at most `max` points of `v`, evenly spaced, the last one included.
pub fn thin<T: Copy>(v: &mut Vec<T>, max: usize) {
    let n = v.len();
    if n <= max || max < 2 {
        return;
    }
    let kept: Vec<T> = (0..max).map(|i| v[i * (n - 1) / (max - 1)]).collect();
    *v = kept;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracking::config::MlflowArgs;

    fn rec(key: &str, v: f64, step: i64) -> MetricRecord {
        MetricRecord {
            key: key.into(),
            value: MetricValue::Scalar(v),
            step: Some(step),
            wall_ms: 1_700_000_000_000 + step as u64,
        }
    }

    #[test]
    fn batches_are_written_once_in_order_and_a_new_stream_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = JobSink::open(dir.path(), &TrackingConfig::default(), "abc", "job", 0)
            .unwrap()
            .unwrap();
        let batch: Vec<MetricRecord> = (0..10).map(|i| rec("loss", i as f64, i)).collect();
        assert_eq!(
            s.accept("site-1", 9, 0, &batch[..6]).unwrap(),
            Accepted::Written(6)
        );
        // The acknowledgement was lost: the same batch again, then one overlapping it.
        assert_eq!(
            s.accept("site-1", 9, 0, &batch[..6]).unwrap(),
            Accepted::Duplicate
        );
        assert_eq!(
            s.accept("site-1", 9, 4, &batch[4..]).unwrap(),
            Accepted::Written(4)
        );
        // A restarted site: a new stream from 0.
        assert_eq!(
            s.accept("site-1", 10, 0, &[rec("loss", 99.0, 10)]).unwrap(),
            Accepted::Written(1)
        );
        s.global(1, &BTreeMap::from([("accuracy".to_string(), 0.5)]), 0)
            .unwrap();
        let runs = read_runs(&dir.path().join("tb_events"), 1000).unwrap();
        let loss: Vec<(i64, f32)> = runs["site-1"]["loss"].clone();
        assert_eq!(loss.len(), 11);
        assert_eq!(
            loss.iter().map(|p| p.0).collect::<Vec<_>>(),
            (0..11).collect::<Vec<_>>()
        );
        assert_eq!(runs[GLOBAL_RUN]["accuracy"], [(1, 0.5)]);
    }

    #[test]
    fn scalars_go_to_child_runs_and_mlflow_gets_one_run_per_site() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TrackingConfig {
            stream: true,
            tensorboard: Some("tb".into()),
            mlflow: Some(MlflowArgs {
                experiment_name: "exp".into(),
                run_name: None,
                experiment_tags: BTreeMap::new(),
                run_tags: BTreeMap::new(),
            }),
        };
        let mut s = JobSink::open(dir.path(), &cfg, "abcdef123", "hello", 0)
            .unwrap()
            .unwrap();
        let r = MetricRecord {
            key: "loss/x".into(),
            value: MetricValue::Scalars(BTreeMap::from([
                ("train".into(), 1.0),
                ("val".into(), 2.0),
            ])),
            step: Some(3),
            wall_ms: 5,
        };
        s.accept("site-2", 1, 0, &[r, rec("acc", 0.25, 1)]).unwrap();
        s.finish(10).unwrap();
        let runs = read_runs(&dir.path().join("tb"), 100).unwrap();
        assert_eq!(runs["site-2/loss_x_train"]["loss/x"], [(3, 1.0)]);
        assert_eq!(runs["site-2/loss_x_val"]["loss/x"], [(3, 2.0)]);
        assert_eq!(runs["site-2"]["acc"], [(1, 0.25)]);
        // One MLflow run, named as FLARE names it, with the metric lines.
        let exp = std::fs::read_dir(dir.path().join("mlruns"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("meta.yaml").is_file() && !p.ends_with("0"))
            .expect("the experiment folder");
        let run = std::fs::read_dir(&exp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.is_dir())
            .expect("a run");
        let name = std::fs::read_to_string(run.join("tags/mlflow.runName")).unwrap();
        assert_eq!(name, "site-2-abcdef-hello");
        let acc = std::fs::read_to_string(run.join("metrics/acc")).unwrap();
        assert_eq!(acc.trim(), "1700000000001 0.25 1");
    }

    #[test]
    fn bad_input_is_refused_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = JobSink::open(dir.path(), &TrackingConfig::default(), "a", "j", 0)
            .unwrap()
            .unwrap();
        assert!(matches!(
            s.accept("../x", 1, 0, &[rec("a", 1.0, 0)]),
            Err(SinkError::RunName(_))
        ));
        let mut bad = rec("a", 1.0, 0);
        bad.key = String::new();
        let e = s.accept("site-1", 1, 0, &[bad]).unwrap_err();
        assert!(e.to_string().contains("site-1"), "{e}");
        assert!(
            read_runs(&dir.path().join("tb_events"), 10)
                .unwrap()
                .is_empty()
        );
        assert!(
            JobSink::open(dir.path(), &TrackingConfig::off(), "a", "j", 0)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn mlflow_keys_lose_what_mlflow_refuses() {
        assert_eq!(mlflow_key("loss/train"), "loss/train");
        assert_eq!(
            mlflow_key("acc (%)#1"),
            "acc (_)_1".replace(['(', ')'], "_")
        );
        assert_eq!(mlflow_key("../a//b/."), "a/b");
        assert_eq!(mlflow_key("%%"), "__");
        assert_eq!(mlflow_key("/"), "_");
    }

    #[test]
    fn thinning_keeps_the_ends() {
        let mut v: Vec<i32> = (0..1000).collect();
        thin(&mut v, 11);
        assert_eq!(v.len(), 11);
        assert_eq!((v[0], v[10]), (0, 999));
        let mut short = vec![1, 2];
        thin(&mut short, 11);
        assert_eq!(short, [1, 2]);
    }
}
