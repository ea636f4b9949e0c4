//! The server's job store on disk: every submitted job, its status history and its results,
//! kept so that they survive a server restart.
//!
//! ```text
//! <root>/jobs/<job_id>/record.json    the JobRecord but its history and metrics (written
//!                                     atomically: temp, fsync, rename)
//! <root>/jobs/<job_id>/history.jsonl  the history, one StatusEntry a line (fsynced appends)
//! <root>/jobs/<job_id>/metrics.jsonl  the metrics, one {"version", "metrics"} a line; a later
//!                                     line for a version replaces an earlier one
//! <root>/jobs/<job_id>/job/           the unpacked job folder, admin signature verified
//! <root>/jobs/<job_id>/result/        the final model and metrics
//! ```
//!
//! What a job gains every round (a history line, a version's metrics) is appended, never
//! rewritten, so a round costs the same at round 5,000 as at round 5: `record.json` stays a
//! few hundred bytes, and the per-round methods ([`JobStore::set_round`],
//! [`JobStore::add_metrics`], [`JobStore::push_history`]) change the record in memory in
//! place rather than cloning it. A write is acknowledged only after its fsync; a crash in the
//! middle of an append leaves a torn last line, which [`JobStore::open`] cuts off (it was
//! never acknowledged). Records from before the line files (history and metrics inside
//! `record.json`) still load, and are moved into line files on open.
//!
//! A job folder appears under `jobs/` only complete: it is built as `jobs/.<id>.partial` and
//! renamed into place, and deleted by renaming it to `jobs/.<id>.deleting` first. Folders
//! whose names start with `.` are leftovers of a crash and are removed by [`JobStore::open`].
//!
//! Job ids come from admins and so are untrusted: every method checks one (lowercase ASCII
//! letters, digits and `-`, at most [`MAX_ID_LEN`] bytes) before it touches the file system.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use flare_crypto::SigningPublicKey;
use flare_crypto::folder::SIGNATURE_FILE;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::job::{Job, JobError};
use crate::jobpack::{FolderFiles, JobPackError, unpack_verified};
use crate::net::protocol::JobBundle;

/// The file holding a job's [`JobRecord`] (all but its history and metrics).
pub const RECORD_FILE: &str = "record.json";
/// The file holding a job's history, one [`StatusEntry`] a line.
pub const HISTORY_FILE: &str = "history.jsonl";
/// The file holding a job's metrics, one `{"version": v, "metrics": {...}}` a line.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The job folder inside a job's store folder.
pub const JOB_DIR: &str = "job";
/// The result folder inside a job's store folder.
pub const RESULT_DIR: &str = "result";
/// The longest job id accepted.
pub const MAX_ID_LEN: usize = 64;
/// The largest record.json read (bytes); records are small, this bounds a corrupt one.
const MAX_RECORD_LEN: u64 = 16 << 20;
/// The largest history or metrics line file read (bytes): a million rounds of a few metrics
/// fit; this bounds a corrupt one.
const MAX_LINES_LEN: u64 = 256 << 20;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Stored, waiting for its sites.
    Submitted,
    /// Sent to its sites, not yet running.
    Dispatched,
    /// Rounds are under way.
    Running,
    /// Completed; results are in `result/`.
    Finished,
    /// Stopped by an error.
    Failed,
    /// Stopped by an admin.
    Aborted,
}

impl JobState {
    /// The name used in records and tables (`submitted`, `running`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Submitted => "submitted",
            JobState::Dispatched => "dispatched",
            JobState::Running => "running",
            JobState::Finished => "finished",
            JobState::Failed => "failed",
            JobState::Aborted => "aborted",
        }
    }

    /// Whether the job holds sites now (it may not be deleted).
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Dispatched | JobState::Running)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a job's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusEntry {
    /// When (Unix milliseconds).
    pub at_ms: u64,
    /// The state entered.
    pub state: JobState,
    /// Why, for people reading `status`.
    pub note: String,
}

/// Everything the server knows about one job; `record.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job id (also its folder name).
    pub id: String,
    /// The name from `meta.json`.
    pub name: String,
    /// Who submitted it (the admin's certificate name).
    pub submitter: String,
    /// When it was submitted (Unix milliseconds); `list` sorts by it.
    pub submitted_ms: u64,
    /// The current state.
    pub state: JobState,
    /// Every state entered, oldest first, so a restart does not lose what happened.
    /// On disk in [`HISTORY_FILE`], not in `record.json`.
    #[serde(default)]
    pub history: Vec<StatusEntry>,
    /// The round under way, once rounds have started.
    pub round: Option<u32>,
    /// Site → its latest state or refusal reason, for `status`.
    pub sites: BTreeMap<String, String>,
    /// Round → metric name → value, as reported by validation. On disk in
    /// [`METRICS_FILE`], not in `record.json`.
    #[serde(default)]
    pub metrics: BTreeMap<u32, BTreeMap<String, f64>>,
    /// Cross-site evaluation: evaluator → model (a site, or `global`) → metric → value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cross_site: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// The stage of a client-controlled job: 0 its training workflow, 1 its cross-site
    /// evaluation.
    #[serde(default)]
    pub stage: u32,
    /// The site holding the global model the cross-site evaluation measures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_holder: Option<String>,
    /// What a submitted job is waiting for (sites not connected), shown by `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Scatter-and-gather: the last round whose aggregated model is persisted, from which a
    /// restarted server resumes the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_round: Option<u32>,
    /// The rounds the job's workflow runs, once it started (for progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_rounds: Option<u32>,
}

impl JobRecord {
    /// A new record in state `submitted`, its history starting with `note`.
    fn submitted(id: String, name: String, submitter: String, now_ms: u64, note: String) -> Self {
        JobRecord {
            id,
            name,
            submitter,
            submitted_ms: now_ms,
            state: JobState::Submitted,
            history: vec![StatusEntry {
                at_ms: now_ms,
                state: JobState::Submitted,
                note,
            }],
            round: None,
            sites: BTreeMap::new(),
            metrics: BTreeMap::new(),
            cross_site: BTreeMap::new(),
            stage: 0,
            global_holder: None,
            waiting: None,
            snapshot_round: None,
            num_rounds: None,
        }
    }
}

/// One line of [`METRICS_FILE`], as written.
#[derive(Serialize)]
struct MetricsLine<'a> {
    version: u32,
    metrics: &'a BTreeMap<String, f64>,
}

/// One line of [`METRICS_FILE`], as read: JSON has no NaN, so a NaN metric was written as
/// `null`; it is dropped rather than making the whole record unreadable.
#[derive(Deserialize)]
struct MetricsLineIn {
    version: u32,
    metrics: BTreeMap<String, Option<f64>>,
}

/// A `jobs/` entry that [`JobStore::open`] could not load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedRecord {
    /// The record file (or job folder).
    pub path: PathBuf,
    /// Why it was skipped.
    pub reason: String,
}

/// Why a job store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or folder could not be read, written or removed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A job id is not one this store could have made.
    #[error("invalid job id {0:?} (lowercase letters, digits and '-', at most 64)")]
    BadId(String),
    /// No job has this id.
    #[error("no job {0}")]
    NotFound(String),
    /// A job with this id exists already.
    #[error("job {0} exists already")]
    Exists(String),
    /// The job is dispatched or running, so it cannot be deleted.
    #[error("job {id} is {state}; abort it first")]
    Active {
        /// The job id.
        id: String,
        /// Its state.
        state: JobState,
    },
    /// The submitted bundle was refused (bad path, bad signature, too large).
    #[error(transparent)]
    Bundle(#[from] JobPackError),
    /// The submitted job does not load (bad `meta.json` or config).
    #[error("invalid job: {0}")]
    Job(#[from] JobError),
    /// A record could not be encoded (a bug).
    #[error("{path}: {source}")]
    Encode {
        /// The record file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The OS random source failed.
    #[error("no randomness for a job id")]
    Random,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks an untrusted job id; only such an id is ever joined onto a path.
fn check_id(id: &str) -> Result<&str, StoreError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(id)
    } else {
        Err(StoreError::BadId(id.chars().take(80).collect()))
    }
}

/// A new job id: the submission time in milliseconds as 12 hex digits (so ids sort by time)
/// and 4 random hex digits, e.g. `0193a1b2c3d4-9f0e`.
fn new_id(now_ms: u64, rng: &dyn SecureRandom) -> Result<String, StoreError> {
    let mut r = [0u8; 2];
    rng.fill(&mut r).map_err(|_| StoreError::Random)?;
    Ok(format!("{now_ms:012x}-{}", hex::encode(r)))
}

/// The jobs of one server, on disk under a root folder.
#[derive(Debug)]
pub struct JobStore {
    jobs_dir: PathBuf,
    /// Every loaded record by id; the lock also serialises writes to the folders.
    records: Mutex<BTreeMap<String, JobRecord>>,
    skipped: Vec<SkippedRecord>,
    rng: SystemRandom,
}

impl JobStore {
    /// Opens (or creates) the store under `root` and loads every record. A record that does
    /// not parse is skipped and reported by [`JobStore::skipped`] (and logged), not fatal.
    pub fn open(root: &Path) -> Result<JobStore, StoreError> {
        let jobs_dir = root.join("jobs");
        fs::create_dir_all(&jobs_dir).map_err(io(&jobs_dir))?;
        let mut records = BTreeMap::new();
        let mut skipped = Vec::new();
        for entry in fs::read_dir(&jobs_dir).map_err(io(&jobs_dir))? {
            let entry = entry.map_err(io(&jobs_dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                // A submit, clone or delete that a crash interrupted.
                tracing::warn!(path = %path.display(), "removing an unfinished job folder");
                fs::remove_dir_all(&path).map_err(io(&path))?;
                continue;
            }
            let mut skip = |path: PathBuf, reason: String| {
                tracing::warn!(path = %path.display(), %reason, "skipping a job record");
                skipped.push(SkippedRecord { path, reason });
            };
            if check_id(&name).is_err() || !path.is_dir() {
                skip(path, "not a job folder".into());
                continue;
            }
            let file = path.join(RECORD_FILE);
            match load_job(&path) {
                Ok(r) if r.id == name => {
                    records.insert(r.id.clone(), r);
                }
                Ok(r) => skip(file, format!("the record is for job {:?}", r.id)),
                Err((file, reason)) => skip(file, reason),
            }
        }
        Ok(JobStore {
            jobs_dir,
            records: Mutex::new(records),
            skipped,
            rng: SystemRandom::new(),
        })
    }

    /// A fresh file name in the spool folder (`jobs/.spool`, emptied whenever the store
    /// opens, like every dot folder there): where results land as they arrive.
    pub fn spool_file(&self) -> Result<PathBuf, StoreError> {
        let dir = self.jobs_dir.join(".spool");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut b = [0u8; 12];
        self.rng.fill(&mut b).map_err(|_| StoreError::Io {
            path: dir.clone(),
            source: std::io::Error::other("no randomness for a spool name"),
        })?;
        Ok(dir.join(format!("{}.safetensors", hex::encode(b))))
    }

    /// The entries that [`JobStore::open`] skipped, with the reason.
    pub fn skipped(&self) -> &[SkippedRecord] {
        &self.skipped
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, JobRecord>> {
        // Records on disk are replaced atomically, so the map is usable after a panic.
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.jobs_dir.join(id)
    }

    /// The job folder of a job (`jobs/<id>/job`). The id is not checked here; methods that
    /// take ids from admins check them.
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.dir(id).join(JOB_DIR)
    }

    /// The result folder of a job (`jobs/<id>/result`).
    pub fn result_dir(&self, id: &str) -> PathBuf {
        self.dir(id).join(RESULT_DIR)
    }

    /// An unused id and its partial folder (created), under the lock.
    fn reserve(
        &self,
        records: &BTreeMap<String, JobRecord>,
        now_ms: u64,
    ) -> Result<(String, PathBuf), StoreError> {
        for _ in 0..64 {
            let id = new_id(now_ms, &self.rng)?;
            if records.contains_key(&id) || self.dir(&id).exists() {
                continue;
            }
            let partial = self.jobs_dir.join(format!(".{id}.partial"));
            if partial.exists() {
                fs::remove_dir_all(&partial).map_err(io(&partial))?;
            }
            fs::create_dir(&partial).map_err(io(&partial))?;
            return Ok((id, partial));
        }
        Err(StoreError::Random)
    }

    /// Finishes a partial job folder: result folder, record and its line files, rename into
    /// place.
    fn commit(&self, partial: &Path, record: &mut JobRecord) -> Result<(), StoreError> {
        let result = partial.join(RESULT_DIR);
        fs::create_dir(&result).map_err(io(&result))?;
        rewrite_lines(&partial.join(HISTORY_FILE), history_lines(&record.history))?;
        rewrite_lines(&partial.join(METRICS_FILE), metrics_lines(&record.metrics))?;
        write_head(&partial.join(RECORD_FILE), record)?;
        let dest = self.dir(&record.id);
        fs::rename(partial, &dest).map_err(io(&dest))?;
        sync_dir(&self.jobs_dir)
    }

    /// Stores a submitted job: verifies the admin's signature while unpacking it, checks that
    /// it loads, and records it as [`JobState::Submitted`].
    pub fn submit(
        &self,
        bundle: &JobBundle,
        submitter: &str,
        admin_key: &SigningPublicKey,
        now_ms: u64,
    ) -> Result<JobRecord, StoreError> {
        self.submit_with(None, bundle, submitter, admin_key, now_ms)
    }

    /// Like [`JobStore::submit`] under a given id: a job a hub runs in its region keeps tier
    /// 1's id. A job that exists already is refused.
    pub fn submit_as(
        &self,
        id: &str,
        bundle: &JobBundle,
        submitter: &str,
        admin_key: &SigningPublicKey,
        now_ms: u64,
    ) -> Result<JobRecord, StoreError> {
        self.submit_with(Some(id), bundle, submitter, admin_key, now_ms)
    }

    fn submit_with(
        &self,
        given: Option<&str>,
        bundle: &JobBundle,
        submitter: &str,
        admin_key: &SigningPublicKey,
        now_ms: u64,
    ) -> Result<JobRecord, StoreError> {
        let mut records = self.lock();
        let (id, partial) = match given {
            None => self.reserve(&records, now_ms)?,
            Some(id) => {
                let id = check_id(id)?.to_owned();
                if records.contains_key(&id) || self.dir(&id).exists() {
                    return Err(StoreError::Exists(id));
                }
                let partial = self.jobs_dir.join(format!(".{id}.partial"));
                if partial.exists() {
                    fs::remove_dir_all(&partial).map_err(io(&partial))?;
                }
                fs::create_dir(&partial).map_err(io(&partial))?;
                (id, partial)
            }
        };
        let done = (|| {
            let job_dir = partial.join(JOB_DIR);
            unpack_verified(bundle, &job_dir, admin_key)?;
            let (name, note) = job_name(&job_dir)?;
            let mut record =
                JobRecord::submitted(id.clone(), name, submitter.to_owned(), now_ms, note);
            self.commit(&partial, &mut record)?;
            Ok(record)
        })();
        match done {
            Ok(record) => {
                records.insert(id, record.clone());
                Ok(record)
            }
            Err(e) => {
                remove_quietly(&partial);
                Err(e)
            }
        }
    }

    /// The ids of the jobs in `state`, oldest submission first, without copying records (the
    /// scheduler asks every second).
    pub fn ids_in_state(&self, state: JobState) -> Vec<String> {
        let records = self.lock();
        let mut ids: Vec<(u64, &String)> = records
            .values()
            .filter(|r| r.state == state)
            .map(|r| (r.submitted_ms, &r.id))
            .collect();
        ids.sort();
        ids.into_iter().map(|(_, id)| id.clone()).collect()
    }

    /// One job's state, without copying its record (a site's heartbeat asks for each job it
    /// holds).
    pub fn state(&self, id: &str) -> Result<JobState, StoreError> {
        let id = check_id(id)?;
        self.lock()
            .get(id)
            .map(|r| r.state)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    /// Every job, oldest submission first.
    pub fn list(&self) -> Vec<JobRecord> {
        let mut all: Vec<JobRecord> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| (a.submitted_ms, &a.id).cmp(&(b.submitted_ms, &b.id)));
        all
    }

    /// One job.
    pub fn get(&self, id: &str) -> Result<JobRecord, StoreError> {
        let id = check_id(id)?;
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    /// One job's record as the JSON `admin status` shows, encoded under the lock: no copy of
    /// the record and no `serde_json::Value` tree (a long job's metrics made each status
    /// answer, which `admin wait` asks for every 500 ms, allocate about 1 KB a round).
    pub fn record_json(&self, id: &str) -> Result<String, StoreError> {
        let id = check_id(id)?;
        let records = self.lock();
        let record = records
            .get(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        serde_json::to_string(record).map_err(|source| StoreError::Encode {
            path: self.dir(id).join(RECORD_FILE),
            source,
        })
    }

    /// Changes a record with `f` and writes it; the id cannot be changed. On a failed write
    /// the stored record stays as it was.
    pub fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut JobRecord),
    ) -> Result<JobRecord, StoreError> {
        let id = check_id(id)?;
        let mut records = self.lock();
        let mut record = records
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        f(&mut record);
        record.id = id.to_owned();
        let old = records
            .get(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        persist(&self.dir(id), old, &mut record)?;
        records.insert(id.to_owned(), record.clone());
        Ok(record)
    }

    /// Sets the round under way: `record.json` is rewritten (it is small), the record in
    /// memory changed in place. On a failed write the record stays as it was.
    pub fn set_round(&self, id: &str, round: u32) -> Result<(), StoreError> {
        let id = check_id(id)?;
        let file = self.dir(id).join(RECORD_FILE);
        let mut records = self.lock();
        let record = records
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        if record.round == Some(round) {
            return Ok(());
        }
        let before = record.round.replace(round);
        if let Err(e) = write_head(&file, record) {
            record.round = before;
            return Err(e);
        }
        Ok(())
    }

    /// Scatter-and-gather: the global model after `round` is persisted, so a resume starts
    /// at `round + 1`, and `round + 1` rounds are done. Changed in place like
    /// [`JobStore::set_round`]; on a failed write the record stays as it was.
    pub fn set_snapshot(&self, id: &str, round: u32) -> Result<(), StoreError> {
        let id = check_id(id)?;
        let file = self.dir(id).join(RECORD_FILE);
        let mut records = self.lock();
        let record = records
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let before = (record.snapshot_round, record.round);
        record.snapshot_round = Some(round);
        record.round = Some(round.saturating_add(1));
        if let Err(e) = write_head(&file, record) {
            (record.snapshot_round, record.round) = before;
            return Err(e);
        }
        Ok(())
    }

    /// Records the metrics of a model version (replacing earlier ones for that version): one
    /// appended line, nothing rewritten, nothing cloned.
    pub fn add_metrics(
        &self,
        id: &str,
        version: u32,
        metrics: BTreeMap<String, f64>,
    ) -> Result<(), StoreError> {
        let id = check_id(id)?;
        let file = self.dir(id).join(METRICS_FILE);
        let mut records = self.lock();
        let record = records
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        append_lines(&file, metrics_lines(std::iter::once((&version, &metrics))))?;
        record.metrics.insert(version, metrics);
        Ok(())
    }

    /// Appends a note to the job's history in its current state: one appended line.
    pub fn push_history(&self, id: &str, note: String, now_ms: u64) -> Result<(), StoreError> {
        let id = check_id(id)?;
        let file = self.dir(id).join(HISTORY_FILE);
        let mut records = self.lock();
        let record = records
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let entry = StatusEntry {
            at_ms: now_ms,
            state: record.state,
            note,
        };
        append_lines(&file, history_lines(std::slice::from_ref(&entry)))?;
        record.history.push(entry);
        Ok(())
    }

    /// Moves a job to `state` and appends the step to its history.
    pub fn set_state(
        &self,
        id: &str,
        state: JobState,
        note: &str,
        now_ms: u64,
    ) -> Result<JobRecord, StoreError> {
        self.update(id, |r| {
            r.state = state;
            r.history.push(StatusEntry {
                at_ms: now_ms,
                state,
                note: note.to_owned(),
            });
        })
    }

    /// Removes a job with its folder and results; refuses a dispatched or running job.
    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        let id = check_id(id)?;
        let mut records = self.lock();
        let record = records
            .get(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        if record.state.is_active() {
            return Err(StoreError::Active {
                id: id.to_owned(),
                state: record.state,
            });
        }
        // Rename first, so a crash never leaves a job without its record or files.
        let gone = self.jobs_dir.join(format!(".{id}.deleting"));
        let dir = self.dir(id);
        fs::rename(&dir, &gone).map_err(io(&dir))?;
        records.remove(id);
        fs::remove_dir_all(&gone).map_err(io(&gone))?;
        Ok(())
    }

    /// Submits a copy of a job under a new id: the same (signed) job folder, no results,
    /// state [`JobState::Submitted`].
    pub fn clone_job(&self, id: &str, now_ms: u64) -> Result<JobRecord, StoreError> {
        let id = check_id(id)?;
        let mut records = self.lock();
        let (name, submitter) = records
            .get(id)
            .map(|r| (r.name.clone(), r.submitter.clone()))
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let (new, partial) = self.reserve(&records, now_ms)?;
        let done = (|| {
            copy_tree(&self.job_dir(id), &partial.join(JOB_DIR))?;
            let mut record = JobRecord::submitted(
                new.clone(),
                name.clone(),
                submitter.clone(),
                now_ms,
                format!("cloned from {id}"),
            );
            self.commit(&partial, &mut record)?;
            Ok(record)
        })();
        match done {
            Ok(record) => {
                records.insert(new, record.clone());
                Ok(record)
            }
            Err(e) => {
                remove_quietly(&partial);
                Err(e)
            }
        }
    }

    /// The stored job as the admin sent it: its files and the admin's `signature.json`, so
    /// each site verifies the admin's signature itself.
    pub fn read_bundle_for_deploy(&self, id: &str) -> Result<JobBundle, StoreError> {
        let id = check_id(id)?;
        if !self.lock().contains_key(id) {
            return Err(StoreError::NotFound(id.to_owned()));
        }
        let dir = self.job_dir(id);
        let mut read = FolderFiles::read(&dir)?;
        let signature = read
            .files
            .remove(SIGNATURE_FILE)
            .ok_or_else(|| StoreError::Io {
                path: dir.join(SIGNATURE_FILE),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "missing"),
            })?;
        Ok(JobBundle {
            files: read.files,
            signature: ByteBuf::from(signature.into_vec()),
        })
    }
}

/// The job's name, after checking that it loads. A client data folder that is missing on the
/// server is not an error here: data is site-local, and each site checks its own.
/// The job's name: the job must load, except for site-local things such as data folders,
/// which only the sites check.
fn job_name(job_dir: &Path) -> Result<(String, String), StoreError> {
    let job = Job::load(job_dir)?;
    Ok((job.meta.name, "submitted".to_owned()))
}

fn read_record(file: &Path) -> Result<JobRecord, String> {
    let meta = fs::metadata(file).map_err(|e| e.to_string())?;
    if meta.len() > MAX_RECORD_LEN {
        return Err("record too large".into());
    }
    let bytes = fs::read(file).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// Loads a job folder's record with its history and metrics lines. A record whose history
/// or metrics are still inside `record.json` (an older store) has them moved into line files;
/// where a line file exists it is the whole truth, and anything left inside `record.json` is
/// from a move that a crash interrupted. An error names the file.
fn load_job(dir: &Path) -> Result<JobRecord, (PathBuf, String)> {
    let file = dir.join(RECORD_FILE);
    let mut record = read_record(&file).map_err(|e| (file.clone(), e))?;
    let mut moved = false;
    let hist = dir.join(HISTORY_FILE);
    match read_lines(&hist).map_err(|e| (hist.clone(), e))? {
        Some(lines) => {
            record.history = lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    serde_json::from_slice(l)
                        .map_err(|e| (hist.clone(), format!("line {}: {e}", i + 1)))
                })
                .collect::<Result<_, _>>()?;
        }
        None if record.history.is_empty() => {}
        None => {
            rewrite_lines(&hist, history_lines(&record.history))
                .map_err(|e| (hist, e.to_string()))?;
            moved = true;
        }
    }
    let metrics = dir.join(METRICS_FILE);
    match read_lines(&metrics).map_err(|e| (metrics.clone(), e))? {
        Some(lines) => {
            record.metrics.clear();
            for (i, l) in lines.iter().enumerate() {
                let line: MetricsLineIn = serde_json::from_slice(l)
                    .map_err(|e| (metrics.clone(), format!("line {}: {e}", i + 1)))?;
                let values = line
                    .metrics
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v?)))
                    .collect();
                record.metrics.insert(line.version, values);
            }
        }
        None if record.metrics.is_empty() => {}
        None => {
            rewrite_lines(&metrics, metrics_lines(&record.metrics))
                .map_err(|e| (metrics, e.to_string()))?;
            moved = true;
        }
    }
    if moved {
        write_head(&file, &mut record).map_err(|e| (file, e.to_string()))?;
    }
    Ok(record)
}

/// The complete lines of a line file, or `None` if there is none. A torn last line (a crash
/// during an append, never acknowledged) is cut off the file, so later appends start on a
/// line of their own.
fn read_lines(file: &Path) -> Result<Option<Vec<Vec<u8>>>, String> {
    let meta = match fs::metadata(file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if meta.len() > MAX_LINES_LEN {
        return Err(format!("{} bytes, at most {MAX_LINES_LEN}", meta.len()));
    }
    let bytes = fs::read(file).map_err(|e| e.to_string())?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        tracing::warn!(path = %file.display(), bytes = bytes.len() - complete, "cutting off a torn last line");
        fs::OpenOptions::new()
            .write(true)
            .open(file)
            .and_then(|f| {
                f.set_len(complete as u64)?;
                f.sync_all()
            })
            .map_err(|e| e.to_string())?;
    }
    Ok(Some(
        bytes[..complete]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect(),
    ))
}

/// History entries as JSON lines.
fn history_lines(entries: &[StatusEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        // A StatusEntry always encodes (strings, numbers, an enum).
        if serde_json::to_writer(&mut out, e).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

/// Metrics as JSON lines, one per version.
fn metrics_lines<'a>(
    metrics: impl IntoIterator<Item = (&'a u32, &'a BTreeMap<String, f64>)>,
) -> Vec<u8> {
    let mut out = Vec::new();
    for (&version, metrics) in metrics {
        // String keys and f64 values always encode (NaN becomes null).
        if serde_json::to_writer(&mut out, &MetricsLine { version, metrics }).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

/// Appends whole lines to a line file and fsyncs it (and its folder, if the file is new).
/// Returns the file's previous length, so a caller can undo the append. On a failed write the
/// file is cut back to that length.
fn append_lines(file: &Path, bytes: Vec<u8>) -> Result<u64, StoreError> {
    let existed = file.exists();
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map_err(io(file))?;
    let before = f.metadata().map_err(io(file))?.len();
    if bytes.is_empty() {
        return Ok(before);
    }
    if let Err(e) = f.write_all(&bytes).and_then(|()| f.sync_data()) {
        let _ = f.set_len(before);
        return Err(StoreError::Io {
            path: file.to_path_buf(),
            source: e,
        });
    }
    if !existed && let Some(dir) = file.parent() {
        sync_dir(dir)?;
    }
    Ok(before)
}

/// Replaces a line file atomically (temporary file, fsync, rename, fsync of the folder).
fn rewrite_lines(file: &Path, bytes: Vec<u8>) -> Result<(), StoreError> {
    replace_file(file, &bytes)
}

/// Writes what changed from `old` to `new` into the job folder `dir`: appended history and
/// metrics lines where `new` only adds to `old` (a rewrite of the line file otherwise), then
/// `record.json`. If `record.json` cannot be written the appends are cut off again, so the
/// job on disk stays as it was.
fn persist(dir: &Path, old: &JobRecord, new: &mut JobRecord) -> Result<(), StoreError> {
    let hist = dir.join(HISTORY_FILE);
    let metrics = dir.join(METRICS_FILE);
    let mut undo: Vec<(PathBuf, Option<u64>, Vec<u8>)> = Vec::new();
    let n = old.history.len();
    if new.history.len() >= n && new.history[..n] == old.history[..] {
        if new.history.len() > n {
            let before = append_lines(&hist, history_lines(&new.history[n..]))?;
            undo.push((hist, Some(before), Vec::new()));
        }
    } else {
        rewrite_lines(&hist, history_lines(&new.history))?;
        undo.push((hist, None, history_lines(&old.history)));
    }
    let done = if old.metrics.keys().all(|k| new.metrics.contains_key(k)) {
        let changed = new
            .metrics
            .iter()
            .filter(|(k, v)| old.metrics.get(k) != Some(v));
        let bytes = metrics_lines(changed);
        if bytes.is_empty() {
            Ok(())
        } else {
            append_lines(&metrics, bytes).map(|before| {
                undo.push((metrics, Some(before), Vec::new()));
            })
        }
    } else {
        rewrite_lines(&metrics, metrics_lines(&new.metrics)).map(|()| {
            undo.push((metrics, None, metrics_lines(&old.metrics)));
        })
    };
    let done = done.and_then(|()| write_head(&dir.join(RECORD_FILE), new));
    if done.is_err() {
        for (file, len, old_bytes) in undo {
            let _ = match len {
                Some(len) => fs::OpenOptions::new()
                    .write(true)
                    .open(&file)
                    .and_then(|f| f.set_len(len)),
                None => replace_file(&file, &old_bytes).map_err(std::io::Error::other),
            };
        }
    }
    done
}

/// Writes `record.json`: the record without its history and metrics (those are in their line
/// files), taken out for the encoding and put back, so nothing is copied.
fn write_head(file: &Path, record: &mut JobRecord) -> Result<(), StoreError> {
    let history = std::mem::take(&mut record.history);
    let metrics = std::mem::take(&mut record.metrics);
    let bytes = serde_json::to_vec_pretty(record);
    record.history = history;
    record.metrics = metrics;
    let bytes = bytes.map_err(|source| StoreError::Encode {
        path: file.to_path_buf(),
        source,
    })?;
    replace_file(file, &bytes)
}

/// Replaces a file atomically: a temporary file, fsync, rename, fsync of the folder. Every
/// error names the file.
fn replace_file(file: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, file)
    })();
    if let Err(source) = written {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::Io {
            path: file.to_path_buf(),
            source,
        });
    }
    if let Some(dir) = file.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Copies a stored job folder (regular files and folders only).
fn copy_tree(from: &Path, to: &Path) -> Result<(), StoreError> {
    fs::create_dir(to).map_err(io(to))?;
    for entry in fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let ty = entry.file_type().map_err(io(&src))?;
        if ty.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ty.is_file() {
            fs::copy(&src, &dst).map_err(io(&src))?;
        } else {
            return Err(StoreError::Io {
                path: src,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a regular file or folder",
                ),
            });
        }
    }
    Ok(())
}

fn remove_quietly(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %dir.display(), error = %e, "could not remove a partial job folder");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobpack::{pack, tests::write_job};
    use flare_crypto::SigningSecret;

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        key: SigningSecret,
        bundle: JobBundle,
    }

    impl Fixture {
        fn new() -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            let job = tmp.path().join("job-src");
            write_job(&job);
            let key = SigningSecret::generate(&SystemRandom::new()).unwrap();
            let bundle = pack(&job, &key).unwrap();
            let root = tmp.path().join("store");
            Fixture {
                _tmp: tmp,
                root,
                key,
                bundle,
            }
        }

        fn open(&self) -> JobStore {
            JobStore::open(&self.root).unwrap()
        }

        /// The fixture's bundle with the file `rel` taken from the job folder `dir`, signed
        /// again over `dir` by the same admin: a bundle the admin's own checks would refuse.
        fn resigned(&self, dir: &Path, rel: &str) -> JobBundle {
            let sig = flare_crypto::folder::sign_folder(
                dir,
                flare_crypto::folder::Purpose::Job,
                &self.key,
            )
            .unwrap();
            let mut bad = self.bundle.clone();
            bad.files
                .insert(rel.into(), ByteBuf::from(fs::read(dir.join(rel)).unwrap()));
            bad.signature = ByteBuf::from(serde_json::to_vec(&sig).unwrap());
            bad
        }

        fn submit(&self, store: &JobStore, now: u64) -> JobRecord {
            store
                .submit(&self.bundle, "admin@x", &self.key.public().unwrap(), now)
                .unwrap()
        }
    }

    #[test]
    fn records_and_history_survive_a_restart() {
        let f = Fixture::new();
        let store = f.open();
        let a = f.submit(&store, 2_000);
        let b = f.submit(&store, 1_000);
        assert_ne!(a.id, b.id);
        assert_eq!(a.name, "packed");
        assert_eq!(a.state, JobState::Submitted);
        assert!(store.job_dir(&a.id).join("meta.json").is_file());
        assert!(store.result_dir(&a.id).is_dir());
        store
            .set_state(&a.id, JobState::Running, "3 sites", 2_500)
            .unwrap();
        store
            .update(&a.id, |r| {
                r.round = Some(1);
                r.sites.insert("site-1".into(), "running".into());
                r.metrics
                    .entry(1)
                    .or_default()
                    .insert("accuracy".into(), 0.5);
                r.id = "hijack".into();
            })
            .unwrap();
        drop(store);

        let store = f.open();
        assert!(store.skipped().is_empty());
        let list = store.list();
        assert_eq!(
            list.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            [b.id.as_str(), a.id.as_str()]
        );
        let a2 = store.get(&a.id).unwrap();
        assert_eq!(a2.state, JobState::Running);
        assert_eq!(a2.round, Some(1));
        assert_eq!(a2.sites["site-1"], "running");
        assert_eq!(a2.metrics[&1]["accuracy"], 0.5);
        assert_eq!(
            a2.history.iter().map(|h| h.state).collect::<Vec<_>>(),
            [JobState::Submitted, JobState::Running]
        );
        assert_eq!(a2.history[1].note, "3 sites");
        let err = store.get("0000000000aa-0000").unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound(id) if id == "0000000000aa-0000"),
            "{err}"
        );
    }

    fn job_file(f: &Fixture, id: &str, name: &str) -> PathBuf {
        f.root.join("jobs").join(id).join(name)
    }

    #[test]
    fn per_round_writes_append_and_the_record_file_stays_the_same_size() {
        let f = Fixture::new();
        let store = f.open();
        let a = f.submit(&store, 1);
        store
            .set_state(&a.id, JobState::Running, "2 sites", 2)
            .unwrap();
        let record = job_file(&f, &a.id, RECORD_FILE);
        let metrics = job_file(&f, &a.id, METRICS_FILE);
        let mut at_20 = (0, 0);
        for round in 1..=200u32 {
            store.set_round(&a.id, round).unwrap();
            let m = BTreeMap::from([("accuracy".to_string(), f64::from(round) / 1000.0)]);
            store.add_metrics(&a.id, round, m).unwrap();
            if round == 20 {
                at_20 = (
                    fs::metadata(&record).unwrap().len(),
                    fs::metadata(&metrics).unwrap().len(),
                );
            }
        }
        let record_len = fs::metadata(&record).unwrap().len();
        assert!(
            record_len.abs_diff(at_20.0) <= 2,
            "{} then {record_len}",
            at_20.0
        );
        // The metrics file grew by appends only: about a line a round.
        let line = at_20.1 / 20;
        let metrics_len = fs::metadata(&metrics).unwrap().len();
        assert!(metrics_len <= at_20.1 + 180 * (line + 2), "{metrics_len}");
        store.push_history(&a.id, "a note".into(), 3).unwrap();
        // A version measured again replaces its metrics.
        store
            .add_metrics(&a.id, 7, BTreeMap::from([("accuracy".into(), 0.9)]))
            .unwrap();
        let before = store.get(&a.id).unwrap();
        drop(store);
        let store = f.open();
        let after = store.get(&a.id).unwrap();
        assert_eq!(after, before);
        assert_eq!(after.round, Some(200));
        assert_eq!(after.metrics.len(), 200);
        assert_eq!(after.metrics[&7]["accuracy"], 0.9);
        assert_eq!(after.metrics[&150]["accuracy"], 0.15);
        assert_eq!(after.history.last().unwrap().note, "a note");
        assert_eq!(after.history.last().unwrap().state, JobState::Running);
        // record.json holds neither.
        let head: serde_json::Value = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
        assert_eq!(head["metrics"], serde_json::json!({}));
        assert_eq!(head["history"], serde_json::json!([]));
        assert_eq!(head["round"], 200);
    }

    #[test]
    fn update_writes_any_change_and_a_restart_sees_it() {
        let f = Fixture::new();
        let store = f.open();
        let a = f.submit(&store, 1);
        store.set_state(&a.id, JobState::Running, "x", 2).unwrap();
        store
            .update(&a.id, |r| {
                r.metrics.insert(1, BTreeMap::from([("loss".into(), 1.0)]));
                r.metrics.insert(2, BTreeMap::from([("loss".into(), 0.5)]));
            })
            .unwrap();
        // Not an append: an entry rewritten and a version removed.
        let changed = store
            .update(&a.id, |r| {
                r.history[0].note = "rewritten".into();
                r.metrics.remove(&1);
                r.sites.insert("site-1".into(), "round 2".into());
            })
            .unwrap();
        drop(store);
        let store = f.open();
        assert_eq!(store.get(&a.id).unwrap(), changed);
        assert_eq!(changed.history[0].note, "rewritten");
        assert_eq!(changed.metrics.keys().collect::<Vec<_>>(), [&2]);
    }

    #[test]
    fn records_from_before_the_line_files_load_and_move() {
        let f = Fixture::new();
        let store = f.open();
        let a = f.submit(&store, 1);
        let mut old = store
            .update(&a.id, |r| {
                r.state = JobState::Finished;
                r.round = Some(3);
                r.metrics
                    .insert(3, BTreeMap::from([("accuracy".into(), 0.75)]));
                r.history.push(StatusEntry {
                    at_ms: 9,
                    state: JobState::Finished,
                    note: "finished".into(),
                });
            })
            .unwrap();
        drop(store);
        // The old layout: everything in record.json, no line files.
        old.id = a.id.clone();
        fs::write(
            job_file(&f, &a.id, RECORD_FILE),
            serde_json::to_vec_pretty(&old).unwrap(),
        )
        .unwrap();
        fs::remove_file(job_file(&f, &a.id, HISTORY_FILE)).unwrap();
        fs::remove_file(job_file(&f, &a.id, METRICS_FILE)).unwrap();
        let store = f.open();
        assert!(store.skipped().is_empty(), "{:?}", store.skipped());
        assert_eq!(store.get(&a.id).unwrap(), old);
        assert!(job_file(&f, &a.id, HISTORY_FILE).is_file());
        drop(store);
        let head: serde_json::Value =
            serde_json::from_slice(&fs::read(job_file(&f, &a.id, RECORD_FILE)).unwrap()).unwrap();
        assert_eq!(head["history"], serde_json::json!([]));
        let store = f.open();
        assert_eq!(store.get(&a.id).unwrap(), old);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_appends_go_on() {
        let f = Fixture::new();
        let store = f.open();
        let a = f.submit(&store, 1);
        store
            .add_metrics(&a.id, 1, BTreeMap::from([("loss".into(), 1.0)]))
            .unwrap();
        drop(store);
        // A crash in the middle of the next append (never acknowledged).
        let metrics = job_file(&f, &a.id, METRICS_FILE);
        let mut file = fs::OpenOptions::new().append(true).open(&metrics).unwrap();
        file.write_all(br#"{"version": 2, "metr"#).unwrap();
        drop(file);
        let store = f.open();
        assert!(store.skipped().is_empty(), "{:?}", store.skipped());
        assert_eq!(store.get(&a.id).unwrap().metrics.len(), 1);
        store
            .add_metrics(&a.id, 2, BTreeMap::from([("loss".into(), 0.5)]))
            .unwrap();
        drop(store);
        let store = f.open();
        let r = store.get(&a.id).unwrap();
        assert_eq!(r.metrics[&1]["loss"], 1.0);
        assert_eq!(r.metrics[&2]["loss"], 0.5);
        // A broken line in the middle is a corrupt record, named with its line.
        drop(store);
        let text = fs::read_to_string(&metrics).unwrap();
        fs::write(&metrics, format!("nonsense\n{text}")).unwrap();
        let store = f.open();
        assert_eq!(store.skipped().len(), 1);
        assert_eq!(store.skipped()[0].path, metrics);
        assert!(store.skipped()[0].reason.contains("line 1"));
    }

    #[test]
    fn the_status_json_is_the_record() {
        let f = Fixture::new();
        let store = f.open();
        let a = f.submit(&store, 1);
        store
            .add_metrics(&a.id, 10, BTreeMap::from([("loss".into(), 0.25)]))
            .unwrap();
        store
            .add_metrics(&a.id, 9, BTreeMap::from([("loss".into(), 0.5)]))
            .unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&store.record_json(&a.id).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!(store.get(&a.id).unwrap()));
        assert_eq!(json["metrics"]["10"]["loss"], 0.25);
        assert!(matches!(
            store.record_json("0000000000aa-0000"),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn the_scheduler_lists_ids_by_state() {
        let f = Fixture::new();
        let store = f.open();
        let a = f.submit(&store, 2);
        let b = f.submit(&store, 1);
        let c = f.submit(&store, 3);
        store.set_state(&c.id, JobState::Running, "", 4).unwrap();
        assert_eq!(store.ids_in_state(JobState::Submitted), [b.id, a.id]);
        assert_eq!(store.ids_in_state(JobState::Running), [c.id]);
    }

    #[test]
    fn a_job_the_admin_should_have_refused_is_refused_by_the_store() {
        // The admin refuses such a job; a changed admin console may not.
        let f = Fixture::new();
        let tmp = tempfile::tempdir().unwrap();
        write_job(tmp.path());
        let names: Vec<String> = (0..5000).map(|i| format!("\"s{i}\"")).collect();
        fs::write(
            tmp.path().join("meta.json"),
            format!(
                r#"{{"name": "big", "deploy_map": {{"app": ["server", {}]}}}}"#,
                names.join(",")
            ),
        )
        .unwrap();
        let bad = f.resigned(tmp.path(), "meta.json");
        let store = f.open();
        let err = store
            .submit(&bad, "x", &f.key.public().unwrap(), 1)
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Job(_))
                && err
                    .to_string()
                    .contains("meta.json: deploy_map: 5001 names, at most"),
            "{err}"
        );
        assert!(store.list().is_empty());
    }

    #[test]
    fn ids_are_sortable_and_safe() {
        let rng = SystemRandom::new();
        let a = new_id(0x0193_a1b2_c3d4, &rng).unwrap();
        assert!(a.starts_with("0193a1b2c3d4-") && a.len() == 17, "{a}");
        assert!(new_id(1, &rng).unwrap() < new_id(0x10, &rng).unwrap());
        check_id(&a).unwrap();
    }

    #[test]
    fn site_local_data_folder_is_not_required_on_the_server() {
        // hello-fedavg names its data relative to the repository; the store is elsewhere.
        let f = Fixture::new();
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello-fedavg");
        let bundle = pack(&example, &f.key).unwrap();
        let store = f.open();
        let r = store
            .submit(&bundle, "admin@x", &f.key.public().unwrap(), 5)
            .unwrap();
        assert_eq!(r.name, "hello-fedavg");
        assert_eq!(r.history[0].note, "submitted");
    }

    #[test]
    fn deploy_bundle_is_what_the_admin_sent() {
        let f = Fixture::new();
        let store = f.open();
        let a = f.submit(&store, 1);
        let bundle = store.read_bundle_for_deploy(&a.id).unwrap();
        assert_eq!(bundle, f.bundle);
        // A site can verify it with the admin's key.
        let site = f.root.join("site-copy");
        unpack_verified(&bundle, &site, &f.key.public().unwrap()).unwrap();
    }

    #[test]
    fn delete_and_clone_rules() {
        let f = Fixture::new();
        let store = f.open();
        let a = f.submit(&store, 1);
        store.set_state(&a.id, JobState::Running, "", 2).unwrap();
        let err = store.delete(&a.id).unwrap_err();
        assert!(matches!(err, StoreError::Active { .. }), "{err}");
        store.set_state(&a.id, JobState::Dispatched, "", 3).unwrap();
        assert!(matches!(
            store.delete(&a.id),
            Err(StoreError::Active { .. })
        ));

        fs::write(store.result_dir(&a.id).join("model.safetensors"), b"m").unwrap();
        let c = store.clone_job(&a.id, 10).unwrap();
        assert_ne!(c.id, a.id);
        assert_eq!(c.state, JobState::Submitted);
        assert_eq!(c.name, a.name);
        assert_eq!(c.history.len(), 1);
        assert!(c.history[0].note.contains(&a.id));
        assert!(
            fs::read_dir(store.result_dir(&c.id))
                .unwrap()
                .next()
                .is_none()
        );
        assert_eq!(
            store.read_bundle_for_deploy(&c.id).unwrap(),
            store.read_bundle_for_deploy(&a.id).unwrap()
        );

        store
            .set_state(&a.id, JobState::Aborted, "by admin", 11)
            .unwrap();
        store.delete(&a.id).unwrap();
        assert!(!f.root.join("jobs").join(&a.id).exists());
        assert!(matches!(store.get(&a.id), Err(StoreError::NotFound(_))));
        assert!(matches!(store.delete(&a.id), Err(StoreError::NotFound(_))));
        assert!(matches!(
            store.clone_job(&a.id, 12),
            Err(StoreError::NotFound(_))
        ));
        drop(store);
        let store = f.open();
        assert_eq!(
            store.list().iter().map(|r| &r.id).collect::<Vec<_>>(),
            [&c.id]
        );
    }

    #[test]
    fn bad_submissions_leave_nothing() {
        let f = Fixture::new();
        let store = f.open();
        let other = SigningSecret::generate(&SystemRandom::new()).unwrap();
        let err = store
            .submit(&f.bundle, "x", &other.public().unwrap(), 1)
            .unwrap_err();
        assert!(matches!(err, StoreError::Bundle(_)), "{err}");
        // A bundle signed by the admin whose job does not load.
        let tmp = tempfile::tempdir().unwrap();
        write_job(tmp.path());
        fs::write(
            tmp.path().join("app/config/config_fed_server.json"),
            r#"{"format_version": 2, "workflows": [], "components": []}"#,
        )
        .unwrap();
        let bad = f.resigned(tmp.path(), "app/config/config_fed_server.json");
        let err = store
            .submit(&bad, "x", &f.key.public().unwrap(), 1)
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Job(_)) && err.to_string().contains("config_fed_server"),
            "{err}"
        );
        assert!(store.list().is_empty());
        assert_eq!(fs::read_dir(f.root.join("jobs")).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_records_are_skipped_and_named() {
        let f = Fixture::new();
        let store = f.open();
        let a = f.submit(&store, 1);
        let b = f.submit(&store, 2);
        drop(store);
        let broken = f.root.join("jobs").join(&b.id).join(RECORD_FILE);
        fs::write(&broken, b"{\"id\": tru").unwrap();
        fs::create_dir(f.root.join("jobs/NotAnId")).unwrap();
        fs::create_dir(f.root.join("jobs/.0000-0000.partial")).unwrap();
        let store = f.open();
        assert_eq!(store.list().len(), 1);
        assert_eq!(store.list()[0].id, a.id);
        let skipped = store.skipped();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped.iter().any(|s| s.path == broken));
        assert!(skipped.iter().any(|s| s.path.ends_with("NotAnId")));
        assert!(!f.root.join("jobs/.0000-0000.partial").exists());
    }

    #[test]
    fn hostile_ids_are_refused() {
        let f = Fixture::new();
        let store = f.open();
        let long = "a".repeat(MAX_ID_LEN + 1);
        for id in [
            "",
            "..",
            "../jobs",
            "a/b",
            "/etc",
            "A",
            "a b",
            "a\0",
            "-rf",
            ".hidden",
            "é",
            long.as_str(),
        ] {
            assert!(matches!(store.get(id), Err(StoreError::BadId(_))), "{id:?}");
            assert!(matches!(store.delete(id), Err(StoreError::BadId(_))));
            assert!(matches!(store.clone_job(id, 1), Err(StoreError::BadId(_))));
            assert!(matches!(
                store.update(id, |_| {}),
                Err(StoreError::BadId(_))
            ));
            assert!(matches!(
                store.read_bundle_for_deploy(id),
                Err(StoreError::BadId(_))
            ));
        }
    }

    #[test]
    fn failed_write_names_the_file_and_keeps_the_record() {
        let f = Fixture::new();
        let store = f.open();
        let a = f.submit(&store, 1);
        let file = f.root.join("jobs").join(&a.id).join(RECORD_FILE);
        // The temporary file cannot be created (even by root): a folder has its name.
        fs::create_dir(file.with_extension("json.tmp")).unwrap();
        let err = store
            .set_state(&a.id, JobState::Failed, "x", 2)
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Io { path, .. } if *path == file),
            "{err}"
        );
        assert_eq!(store.get(&a.id).unwrap().state, JobState::Submitted);
        let store = f.open();
        assert_eq!(store.get(&a.id).unwrap().state, JobState::Submitted);
        // The history line appended before record.json failed was cut off again.
        assert_eq!(store.get(&a.id).unwrap().history.len(), 1);
    }

    #[test]
    fn read_only_folder_gives_an_error_naming_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let f = Fixture::new();
        let store = f.open();
        let a = f.submit(&store, 1);
        let dir = f.root.join("jobs").join(&a.id);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).unwrap();
        // Root ignores permissions; then there is nothing to test.
        let probe = dir.join("probe");
        let moot = fs::write(&probe, b"").is_ok();
        let result = store.set_state(&a.id, JobState::Failed, "x", 2);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        if moot {
            eprintln!("running as root: the read-only check is moot");
            return;
        }
        let err = result.unwrap_err();
        assert!(
            err.to_string()
                .contains(&dir.join(RECORD_FILE).display().to_string()),
            "{err}"
        );
        assert_eq!(store.get(&a.id).unwrap().state, JobState::Submitted);
        let store = f.open();
        assert_eq!(store.get(&a.id).unwrap().state, JobState::Submitted);
    }
}
