//! Experiment tracking: the metrics a site's learner logs (training loss per epoch, the
//! validation of every model it receives, the user program's `SummaryWriter` calls) on their way
//! to the writers on the server (FLARE's `analytix_log_stats` events and its receivers).
//!
//! - [`Tracker`] is what a learner logs through: a handle on its job's [`MetricQueue`], or off.
//!   Logging never blocks training: the queue holds [`MAX_QUEUED`] records and drops the
//!   oldest beyond that, counting them.
//! - A site drains its queue in batches of at most [`MAX_BATCH`] records (`roles::metrics`),
//!   one batch in flight at a time, each acknowledged by the server before it leaves the queue;
//!   batches carry the queue's random `stream` and the sequence number of their first record,
//!   so the server drops a batch it already wrote (its acknowledgement was lost) and a
//!   restarted site's new queue is a new stream. While the server is away the queue keeps
//!   them, in order. Before a site sends a training result it waits (bounded) until what its
//!   learner logged so far is acknowledged, so the downloaded job holds every record of every
//!   round.
//! - [`sink::JobSink`] writes what arrives: TensorBoard event files ([`tb`]), one run per site
//!   under `<job result>/tb_events/<site>/`, plus the global model's metrics per round under
//!   `global_model`; and, when the job asks, MLflow's file store ([`mlflow`]) under
//!   `<job result>/mlruns/`. The server and the simulator write through the same sink.
//! - [`config`]: which writers a job asks for (the server config's `TBAnalyticsReceiver` and
//!   `MLflowReceiver` components, FLARE's names).

pub mod config;
pub mod mlflow;
pub mod sink;
pub mod tb;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Most records a site's queue holds for one job; the oldest are dropped (and counted) beyond.
pub const MAX_QUEUED: usize = 200_000;
/// Most records in one batch on the wire.
pub const MAX_BATCH: usize = 4096;
/// Longest metric key (tag), in bytes.
pub const MAX_KEY: usize = 256;
/// Most values in one `add_scalars` record.
pub const MAX_SCALARS: usize = 64;
/// Longest text (`add_text`, a parameter or a tag value), in bytes.
pub const MAX_TEXT: usize = 64 << 10;

/// One value a learner logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetricValue {
    /// A number (`add_scalar`, `log_metric`).
    Scalar(f64),
    /// Numbers under one main tag (`add_scalars`).
    Scalars(BTreeMap<String, f64>),
    /// Text (`add_text`).
    Text(String),
    /// An MLflow parameter (`log_param`).
    Param(String),
    /// An MLflow tag (`set_tag`).
    Tag(String),
}

/// One logged record: key, value, step and when (Unix ms, at the site).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    /// The tag (`train_loss`, `val_acc_global_model`, …).
    pub key: String,
    /// The value.
    pub value: MetricValue,
    /// The step it belongs to; TensorBoard reads a missing one as 0.
    #[serde(default)]
    pub step: Option<i64>,
    /// When it was logged (Unix milliseconds).
    pub wall_ms: u64,
}

/// A record that breaks the limits above.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    /// An empty key, one too long, or one with control characters.
    #[error("metric key {0:?}: must be 1 to {MAX_KEY} bytes without control characters")]
    Key(String),
    /// Too many values in one `add_scalars`.
    #[error("metric {key:?}: {n} values, at most {MAX_SCALARS}")]
    TooManyScalars {
        /// The key.
        key: String,
        /// How many.
        n: usize,
    },
    /// Text too long.
    #[error("metric {key:?}: {n} bytes of text, at most {MAX_TEXT}")]
    TextTooLong {
        /// The key.
        key: String,
        /// How long.
        n: usize,
    },
    /// A batch of too many records.
    #[error("a batch of {0} metric records, at most {MAX_BATCH}")]
    BatchTooLarge(usize),
}

fn check_key(key: &str) -> Result<(), RecordError> {
    if key.is_empty() || key.len() > MAX_KEY || key.chars().any(char::is_control) {
        return Err(RecordError::Key(key.chars().take(MAX_KEY).collect()));
    }
    Ok(())
}

impl MetricRecord {
    /// A scalar logged now.
    pub fn scalar(key: impl Into<String>, value: f64, step: Option<i64>) -> Self {
        MetricRecord {
            key: key.into(),
            value: MetricValue::Scalar(value),
            step,
            wall_ms: now_ms(),
        }
    }

    /// Checks the record against the limits (what arrives from a site or a user program is
    /// untrusted).
    pub fn check(&self) -> Result<(), RecordError> {
        check_key(&self.key)?;
        let text = |t: &str| {
            if t.len() > MAX_TEXT {
                Err(RecordError::TextTooLong {
                    key: self.key.clone(),
                    n: t.len(),
                })
            } else {
                Ok(())
            }
        };
        match &self.value {
            MetricValue::Scalar(_) => Ok(()),
            MetricValue::Scalars(m) => {
                if m.len() > MAX_SCALARS {
                    return Err(RecordError::TooManyScalars {
                        key: self.key.clone(),
                        n: m.len(),
                    });
                }
                m.keys().try_for_each(|k| check_key(k))
            }
            MetricValue::Text(t) | MetricValue::Param(t) | MetricValue::Tag(t) => text(t),
        }
    }
}

/// Checks a whole batch (size and every record).
pub fn check_batch(records: &[MetricRecord]) -> Result<(), RecordError> {
    if records.len() > MAX_BATCH {
        return Err(RecordError::BatchTooLarge(records.len()));
    }
    records.iter().try_for_each(MetricRecord::check)
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Default)]
struct QueueState {
    records: VecDeque<MetricRecord>,
    /// Sequence number of `records[0]`.
    front_seq: u64,
    /// Records ever pushed (the sequence number of the next one).
    pushed: u64,
    /// Records dropped because the queue was full.
    dropped: u64,
}

/// A job's metrics at a site, waiting to be sent: bounded, in order, each record with a
/// sequence number. See the module doc.
#[derive(Debug)]
pub struct MetricQueue {
    state: Mutex<QueueState>,
    cap: usize,
    stream: u64,
    /// Wakes the sender when records arrive.
    wake: tokio::sync::Notify,
    /// The sequence number below which every record is acknowledged.
    acked: tokio::sync::watch::Sender<u64>,
    warned: AtomicBool,
}

impl MetricQueue {
    /// An empty queue of at most [`MAX_QUEUED`] records; `stream` tells it apart from the
    /// queues of earlier processes of the same site (draw it at random).
    pub fn new(stream: u64) -> Arc<Self> {
        Self::with_capacity(stream, MAX_QUEUED)
    }

    /// An empty queue of at most `cap` records.
    pub fn with_capacity(stream: u64, cap: usize) -> Arc<Self> {
        Arc::new(MetricQueue {
            state: Mutex::default(),
            cap: cap.max(1),
            stream,
            wake: tokio::sync::Notify::new(),
            acked: tokio::sync::watch::channel(0).0,
            warned: AtomicBool::new(false),
        })
    }

    /// The queue's stream id.
    pub fn stream(&self) -> u64 {
        self.stream
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends a record; when full, the oldest record is dropped.
    pub fn push(&self, record: MetricRecord) {
        {
            let mut s = self.lock();
            if s.records.len() >= self.cap {
                s.records.pop_front();
                s.front_seq += 1;
                s.dropped += 1;
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        cap = self.cap,
                        "the metrics queue is full (the server is away or slow): dropping the oldest records"
                    );
                }
                let acked = *self.acked.borrow();
                self.acked.send_replace(s.front_seq.max(acked));
            }
            s.records.push_back(record);
            s.pushed += 1;
        }
        self.wake.notify_one();
    }

    /// The oldest `max` records not yet acknowledged, with the sequence number of the first.
    pub fn peek(&self, max: usize) -> Option<(u64, Vec<MetricRecord>)> {
        let s = self.lock();
        if s.records.is_empty() {
            return None;
        }
        Some((s.front_seq, s.records.iter().take(max).cloned().collect()))
    }

    /// Acknowledges `n` records from sequence number `seq` on (they leave the queue).
    pub fn ack(&self, seq: u64, n: usize) {
        let mut s = self.lock();
        let end = seq + n as u64;
        if end > s.front_seq {
            let k = ((end - s.front_seq) as usize).min(s.records.len());
            s.records.drain(..k);
            s.front_seq += k as u64;
        }
        self.acked.send_replace(s.front_seq);
    }

    /// Takes every queued record at once (the simulator writes them itself).
    pub fn take_all(&self) -> Vec<MetricRecord> {
        let mut s = self.lock();
        let n = s.records.len();
        s.front_seq += n as u64;
        let out: Vec<MetricRecord> = s.records.drain(..).collect();
        self.acked.send_replace(s.front_seq);
        out
    }

    /// Records pushed so far, and dropped so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.pushed, s.dropped)
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until a record arrives (or `timeout` passes).
    pub async fn wait_for_records(&self, timeout: Duration) {
        if !self.is_empty() {
            return;
        }
        let _ = tokio::time::timeout(timeout, self.wake.notified()).await;
    }

    /// Waits, at most `timeout`, until every record pushed before the call is acknowledged;
    /// whether they were.
    pub async fn flushed(&self, timeout: Duration) -> bool {
        let target = self.lock().pushed;
        let mut rx = self.acked.subscribe();
        self.wake.notify_one();
        tokio::time::timeout(timeout, rx.wait_for(|&a| a >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// What a learner logs through: its job's queue, or nothing (tracking off, tests).
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    queue: Option<Arc<MetricQueue>>,
}

impl Tracker {
    /// A tracker that logs nothing.
    pub fn off() -> Self {
        Tracker::default()
    }

    /// A tracker that logs nothing, as a constant.
    pub const fn off_const() -> Self {
        Tracker { queue: None }
    }

    /// A tracker feeding `queue`.
    pub fn to_queue(queue: Arc<MetricQueue>) -> Self {
        Tracker { queue: Some(queue) }
    }

    /// Whether records go anywhere.
    pub fn is_on(&self) -> bool {
        self.queue.is_some()
    }

    /// The queue, when on.
    pub fn queue(&self) -> Option<&Arc<MetricQueue>> {
        self.queue.as_ref()
    }

    /// Logs a record.
    pub fn record(&self, record: MetricRecord) {
        if let Some(q) = &self.queue {
            q.push(record);
        }
    }

    /// Logs a scalar (`add_scalar(key, value, step)`).
    pub fn scalar(&self, key: &str, value: f64, step: i64) {
        if self.queue.is_some() {
            self.record(MetricRecord::scalar(key, value, Some(step)));
        }
    }
}

/// The TensorBoard tag of the validation metric `key` of a model a site received
/// (FLARE's examples' `val_acc_global_model`).
pub fn global_model_tag(key: &str) -> String {
    match key {
        "accuracy" => "val_acc_global_model".into(),
        other => format!("val_{other}_global_model"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: i64) -> MetricRecord {
        MetricRecord::scalar("loss", i as f64, Some(i))
    }

    #[test]
    fn a_batch_leaves_the_queue_only_when_acknowledged() {
        let q = MetricQueue::new(7);
        for i in 0..10 {
            q.push(rec(i));
        }
        let (seq, b) = q.peek(4).expect("records");
        assert_eq!((seq, b.len()), (0, 4));
        // Not acknowledged: the same batch again.
        assert_eq!(q.peek(4).expect("records").1, b);
        q.ack(seq, b.len());
        let (seq, b) = q.peek(100).expect("records");
        assert_eq!((seq, b.len()), (4, 6));
        assert_eq!(b[0].step, Some(4));
        // A repeated acknowledgement changes nothing.
        q.ack(0, 4);
        assert_eq!(q.len(), 6);
        q.ack(seq, b.len());
        assert!(q.is_empty());
        assert_eq!(q.counts(), (10, 0));
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_them() {
        let q = MetricQueue::with_capacity(1, 3);
        for i in 0..5 {
            q.push(rec(i));
        }
        let (seq, b) = q.peek(10).expect("records");
        assert_eq!(seq, 2);
        assert_eq!(
            b.iter().map(|r| r.step).collect::<Vec<_>>(),
            [Some(2), Some(3), Some(4)]
        );
        assert_eq!(q.counts(), (5, 2));
        // An acknowledgement of a batch that partly fell off the front drains the rest.
        q.ack(1, 3);
        assert_eq!(q.len(), 1);
    }

    #[tokio::test]
    async fn flushed_waits_for_the_acknowledgement() {
        let q = MetricQueue::new(1);
        assert!(
            q.flushed(Duration::from_millis(10)).await,
            "empty is flushed"
        );
        q.push(rec(0));
        assert!(!q.flushed(Duration::from_millis(20)).await);
        let q2 = Arc::clone(&q);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            q2.ack(0, 1);
        });
        assert!(q.flushed(Duration::from_secs(5)).await);
    }

    #[test]
    fn records_are_checked() {
        assert!(rec(1).check().is_ok());
        let mut r = rec(1);
        r.key = String::new();
        assert!(matches!(r.check(), Err(RecordError::Key(_))));
        r.key = "a\nb".into();
        assert!(r.check().is_err());
        r.key = "x".repeat(MAX_KEY + 1);
        assert!(r.check().is_err());
        r.key = "ok".into();
        r.value = MetricValue::Scalars((0..=MAX_SCALARS).map(|i| (i.to_string(), 0.0)).collect());
        assert!(matches!(
            r.check(),
            Err(RecordError::TooManyScalars { n, .. }) if n == MAX_SCALARS + 1
        ));
        r.value = MetricValue::Text("t".repeat(MAX_TEXT + 1));
        assert!(r.check().is_err());
        assert!(matches!(
            check_batch(&vec![rec(0); MAX_BATCH + 1]),
            Err(RecordError::BatchTooLarge(_))
        ));
    }

    #[test]
    fn tracker_off_logs_nothing_and_on_logs_in_order() {
        Tracker::off().scalar("x", 1.0, 0);
        let q = MetricQueue::new(0);
        let t = Tracker::to_queue(Arc::clone(&q));
        for i in 0..3 {
            t.scalar("x", i as f64, i);
        }
        let all = q.take_all();
        assert_eq!(
            all.iter().map(|r| r.step).collect::<Vec<_>>(),
            [Some(0), Some(1), Some(2)]
        );
        assert_eq!(global_model_tag("accuracy"), "val_acc_global_model");
        assert_eq!(global_model_tag("loss"), "val_loss_global_model");
    }
}
