//! The server's metric writers: one [`JobSink`] per running job, opened when the job starts
//! and closed (flushed, MLflow runs finished) when it ends, before the job reads as ended, so
//! a download finds every record. Sites' batches arrive as `ControlRequest::Metrics`
//! (acknowledged once written); the global model's metrics per round come from the workflow
//! drivers; `admin metrics` (the dashboard's plots) reads the TensorBoard files back.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::job::{Job, WorkflowSpec};
use crate::tracking::config::DEFAULT_TB_FOLDER;
use crate::tracking::sink::{Accepted, JobSink, read_runs};
use crate::tracking::{MetricRecord, now_ms};

/// Points per series `admin metrics` returns at most.
pub(crate) const MAX_POINTS: usize = 500;

/// The open sinks, by job.
#[derive(Debug, Default)]
pub(crate) struct Tracking {
    sinks: Mutex<HashMap<String, Arc<Mutex<JobSink>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The rounds a job's workflow runs (for `admin wait`'s progress).
pub(crate) fn num_rounds(job: &Job) -> u32 {
    match &job.server.workflow {
        WorkflowSpec::ScatterAndGather => job.server.sag.num_rounds,
        WorkflowSpec::Swarm(a) => a.num_rounds,
        WorkflowSpec::Cyclic(a) => a.num_rounds,
        WorkflowSpec::Statistics(s) => s.passes(),
    }
}

impl Tracking {
    /// Opens the writers `job` asks for under `result_dir`; a failure is logged and the job
    /// runs without them.
    pub(crate) fn open(&self, id: &str, job: &Job, result_dir: &Path) {
        match JobSink::open(
            result_dir,
            &job.server.tracking,
            id,
            &job.meta.name,
            now_ms(),
        ) {
            Ok(Some(sink)) => {
                lock(&self.sinks).insert(id.to_string(), Arc::new(Mutex::new(sink)));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "cannot open the job's metric writers; metrics are not written");
            }
        }
    }

    fn sink(&self, id: &str) -> Option<Arc<Mutex<JobSink>>> {
        lock(&self.sinks).get(id).cloned()
    }

    /// Writes a site's batch; the error is the site's answer.
    pub(crate) fn accept(
        &self,
        id: &str,
        site: &str,
        stream: u64,
        seq: u64,
        records: &[MetricRecord],
    ) -> Result<Accepted, String> {
        let sink = self.sink(id).ok_or_else(|| {
            format!("job {id} does not collect metrics here (ended, or tracking is off)")
        })?;
        let mut s = lock(&sink);
        s.accept(site, stream, seq, records).map_err(|e| {
            tracing::warn!(job = %id, %site, error = %e, "metrics refused");
            e.to_string()
        })
    }

    /// Writes the global model's metrics of `version`.
    pub(crate) fn global(&self, id: &str, version: u32, metrics: &BTreeMap<String, f64>) {
        if let Some(sink) = self.sink(id) {
            if let Err(e) = lock(&sink).global(version, metrics, now_ms()) {
                tracing::warn!(job = %id, error = %e, "cannot write the global model's metrics");
            }
        }
    }

    /// Flushes and closes a job's writers.
    pub(crate) fn close(&self, id: &str) {
        let sink = lock(&self.sinks).remove(id);
        if let Some(sink) = sink {
            if let Err(e) = lock(&sink).finish(now_ms()) {
                tracing::warn!(job = %id, error = %e, "cannot finish the job's metric files");
            }
        }
    }

    /// `admin metrics`: every TensorBoard run of the job (site, child runs, the global model)
    /// as tag → `[[step, value], …]`, at most [`MAX_POINTS`] points a series. The folder is
    /// the open sink's; an ended job's is read from its stored config (`job_dir`).
    pub(crate) fn series(&self, id: &str, result_dir: &Path, job_dir: &Path) -> serde_json::Value {
        let open = self.sink(id).and_then(|sink| {
            let mut s = lock(&sink);
            let _ = s.flush();
            s.tb_root().map(Path::to_path_buf)
        });
        let tb_root = open.unwrap_or_else(|| {
            let folder = Job::load(job_dir)
                .ok()
                .and_then(|j| j.server.tracking.tensorboard)
                .unwrap_or_else(|| DEFAULT_TB_FOLDER.into());
            result_dir.join(folder)
        });
        match read_runs(&tb_root, MAX_POINTS) {
            Ok(runs) => json!({"job_id": id, "runs": runs}),
            Err(e) => json!({"job_id": id, "runs": {}, "error": e.to_string()}),
        }
    }
}
