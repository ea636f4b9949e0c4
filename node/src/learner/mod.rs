//! Trainers: the [`Learner`] trait every training back-end implements, and the executor that
//! turns a [`Task`] into a [`TaskResult`] through it.
//!
//! Three back-ends implement the trait: the built-in pure-Rust MLP ([`mlp`]), LibTorch
//! (feature `torch`: the CNN of [`cnn`] trained by `torch::TorchCnnLearner`), and the user's
//! own program, an external process speaking the Client API ([`script`], the
//! `ScriptExecutor`). [`synthetic`] is a model of any size for benchmarks.

pub(crate) mod algorithms;
pub mod cnn;
pub mod gemm;
pub mod mlp;
pub mod script;
pub mod synthetic;
#[cfg(feature = "torch")]
pub mod torch;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use flare_protocols::model::{FLModel, META_NUM_SAMPLES, MetaValue, ModelError};
use flare_protocols::shareable::{ReturnCode, Shareable, Task, TaskResult, task_names};

/// Why a learner could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    /// The incoming model does not fit the learner's network.
    #[error("incoming model does not fit: {0}")]
    Incompatible(#[from] ModelError),
    /// The site has no data to train on.
    #[error("no local training data")]
    NoData,
    /// Training diverged (a non-finite loss).
    #[error("training diverged: {0}")]
    Diverged(String),
    /// Anything else the back-end reports.
    #[error("{0}")]
    Backend(String),
}

/// A training back-end: a model goes in, a model with metrics comes out (FLARE's `Learner`).
pub trait Learner: Send {
    /// Trains locally starting from `global` and returns the new weights (full or diff),
    /// with the number of training samples in `meta[NUM_SAMPLES]`.
    fn train(&mut self, global: &FLModel, round: u32) -> Result<FLModel, LearnerError>;

    /// Like [`Learner::train`], given the model to own: a learner that trains in place
    /// overrides it and returns the same buffers, so a task costs no copy of the model.
    fn train_owned(&mut self, global: FLModel, round: u32) -> Result<FLModel, LearnerError> {
        self.train(&global, round)
    }

    /// Measures `model` on the site's validation data (`accuracy`, `loss`, …).
    fn validate(&mut self, model: &FLModel) -> Result<BTreeMap<String, f64>, LearnerError>;

    /// Runs one task. The default validates the incoming model and trains on it (see
    /// [`execute`]); a back-end that decides for itself (the user's program) overrides it.
    fn execute_task(&mut self, task: Task) -> TaskResult {
        run_default(self, task)
    }

    /// A switch that interrupts the learner's running task when the job is aborted, for
    /// back-ends whose tasks can be interrupted.
    fn abort_handle(&self) -> Option<AbortHandle> {
        None
    }

    /// Where the learner logs its metrics; [`execute`] logs the validation of each model the
    /// learner receives there too.
    fn tracker(&self) -> &crate::tracking::Tracker {
        &NO_TRACKER
    }
}

static NO_TRACKER: crate::tracking::Tracker = crate::tracking::Tracker::off_const();

/// Logs the validation metrics of the model a site received in `round` (FLARE's examples'
/// `val_acc_global_model`), step = the round.
fn log_received(learner: &(impl Learner + ?Sized), round: u32, metrics: &BTreeMap<String, f64>) {
    let t = learner.tracker();
    if t.is_on() {
        for (k, v) in metrics {
            t.scalar(&crate::tracking::global_model_tag(k), *v, i64::from(round));
        }
    }
}

/// Tells a learner that its job was stopped at this site (it ended or was aborted); shared
/// between the learner and its site.
#[derive(Clone, Default)]
pub struct AbortHandle {
    flag: Arc<AtomicBool>,
    hook: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortHandle")
            .field("aborted", &self.is_aborted())
            .finish_non_exhaustive()
    }
}

impl AbortHandle {
    /// A handle that also calls `hook` when aborted (to stop what an idle learner holds).
    pub fn with_hook(hook: Arc<dyn Fn() + Send + Sync>) -> Self {
        AbortHandle {
            flag: Arc::default(),
            hook: Some(hook),
        }
    }

    /// Aborts: the running task ends as `TaskAborted`, and so does every later one.
    pub fn abort(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Some(h) = &self.hook {
            h();
        }
    }

    /// Whether [`AbortHandle::abort`] was called.
    pub fn is_aborted(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// Runs `task` on `learner` and wraps the outcome in a result; never panics on bad input.
///
/// For `train`, the incoming global model is validated first and its metrics travel with the
/// trained weights (FLARE's Client API convention), so the controller learns each global
/// model's quality without an extra round trip.
pub fn execute(learner: &mut dyn Learner, task: Task) -> TaskResult {
    learner.execute_task(task)
}

fn run_default<L: Learner + ?Sized>(learner: &mut L, task: Task) -> TaskResult {
    let (task_id, round) = (task.id, task.round);
    let data = match run(learner, task) {
        Ok(model) => Shareable::with_model(Arc::new(model)),
        Err((code, reason)) => Shareable::error(code, reason),
    };
    TaskResult {
        task_id,
        round,
        data,
    }
}

fn run<L: Learner + ?Sized>(learner: &mut L, task: Task) -> Result<FLModel, (ReturnCode, String)> {
    let Some(global) = task.data.model else {
        return Err((
            ReturnCode::ValidationError,
            "the task carries no model".into(),
        ));
    };
    let fail = |e: LearnerError| {
        let code = match e {
            LearnerError::Incompatible(_) => ReturnCode::ValidationError,
            _ => ReturnCode::ExecutionException,
        };
        (code, e.to_string())
    };
    match task.name.as_str() {
        task_names::TRAIN => {
            let metrics = learner.validate(&global).map_err(fail)?;
            log_received(learner, task.round, &metrics);
            // The task's model is this task's alone once it arrived: train in it.
            let mut owned = Arc::try_unwrap(global).unwrap_or_else(|shared| (*shared).clone());
            // What the algorithm tells the learner (FedProx's `mu`) reaches it in the model's
            // metadata, as FLARE's `FLModel.meta`.
            for (k, v) in &task.data.headers {
                if ALGORITHM_META.contains(&k.as_str()) {
                    owned.meta.insert(k.clone(), v.clone());
                }
            }
            let mut out = learner.train_owned(owned, task.round).map_err(fail)?;
            out.metrics = metrics;
            out.current_round = Some(task.round);
            Ok(out)
        }
        task_names::VALIDATE => {
            let metrics = learner.validate(&global).map_err(fail)?;
            log_received(learner, task.round, &metrics);
            let mut out = FLModel {
                metrics,
                ..FLModel::default()
            };
            if let Some(n) = global.meta.get(META_NUM_SAMPLES) {
                out.meta.insert(META_NUM_SAMPLES.into(), n.clone());
            }
            Ok(out)
        }
        other => Err((
            ReturnCode::TaskUnknown,
            format!("no executor for task {other:?}"),
        )),
    }
}

/// Task headers that a learner reads in its model's metadata.
const ALGORITHM_META: &[&str] = &[flare_protocols::aggregators::META_FEDPROX_MU];

/// Shorthand for the sample-count metadata entry.
pub(crate) fn samples_meta(n: usize) -> (String, MetaValue) {
    (META_NUM_SAMPLES.to_string(), MetaValue::Int(n as i64))
}
