//! The envelope around a model (FLARE's Shareable/DXO) and the task types that carry it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{FLModel, MetaValue};

/// Outcome of a task as the executing site reports it (FLARE's `ReturnCode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReturnCode {
    /// The task ran and produced a result.
    #[default]
    Ok,
    /// The executor failed while running the task.
    ExecutionException,
    /// The site has no executor for this task name.
    TaskUnknown,
    /// The task was aborted before it finished.
    TaskAborted,
    /// The task ran past its time limit and was stopped.
    TaskTimeout,
    /// The incoming data did not validate (for example an incompatible model).
    ValidationError,
    /// The site refused the task (for example by its privacy policy).
    Refused,
}

/// Well-known header: a human-readable reason that accompanies an error return code.
pub const HEADER_ERROR: &str = "error";
/// Well-known task header: the planned number of rounds (FLARE's `total_rounds`).
pub const HEADER_TOTAL_ROUNDS: &str = "total_rounds";

/// What a task carries or a site returns: headers, a return code and an optional model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Shareable {
    /// Free-form headers (FLARE's Shareable headers).
    #[serde(default)]
    pub headers: BTreeMap<String, MetaValue>,
    /// The outcome; `Ok` for tasks going out.
    #[serde(default)]
    pub return_code: ReturnCode,
    /// The model (the DXO payload). Shared, so a task sent to many sites is not copied.
    #[serde(default)]
    pub model: Option<Arc<FLModel>>,
}

impl Shareable {
    /// A successful shareable carrying `model`.
    pub fn with_model(model: impl Into<Arc<FLModel>>) -> Self {
        Shareable {
            model: Some(model.into()),
            ..Shareable::default()
        }
    }

    /// Adds the [`HEADER_TOTAL_ROUNDS`] header.
    pub fn with_total_rounds(mut self, n: u32) -> Self {
        self.headers.insert(
            HEADER_TOTAL_ROUNDS.to_string(),
            MetaValue::Int(i64::from(n)),
        );
        self
    }

    /// An error shareable with a reason in the [`HEADER_ERROR`] header.
    pub fn error(code: ReturnCode, reason: impl Into<String>) -> Self {
        Shareable {
            headers: BTreeMap::from([(HEADER_ERROR.to_string(), MetaValue::Text(reason.into()))]),
            return_code: code,
            model: None,
        }
    }

    /// The reason given with an error, if any.
    pub fn error_reason(&self) -> Option<&str> {
        match self.headers.get(HEADER_ERROR) {
            Some(MetaValue::Text(s)) => Some(s),
            _ => None,
        }
    }
}

/// Identifies one task instance; a result names the task it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(pub u64);

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task-{}", self.0)
    }
}

/// Well-known task names (FLARE's `AppConstants.TASK_*`).
pub mod task_names {
    /// Train on local data, starting from the carried global model.
    pub const TRAIN: &str = "train";
    /// Validate the carried model on local data and return metrics.
    pub const VALIDATE: &str = "validate";
}

/// A unit of work sent to one site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Unique per controller run.
    pub id: TaskId,
    /// What to do, for example [`task_names::TRAIN`].
    pub name: String,
    /// The round the task belongs to.
    pub round: u32,
    /// The payload.
    pub data: Shareable,
}

/// A site's answer to a [`Task`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task this answers.
    pub task_id: TaskId,
    /// The round of that task, as the site understood it.
    pub round: u32,
    /// The result; its return code says whether it succeeded.
    pub data: Shareable,
}
