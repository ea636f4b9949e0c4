//! A site's metric sender: drains one job's [`MetricQueue`] to the server in acknowledged
//! batches (see [`crate::tracking`] for the rules). One task per job, one batch in flight.
//!
//! - A batch holds at most [`MAX_BATCH`] records and about [`BATCH_BYTES`] of keys and text.
//! - The server away (no answer): the batch stays queued and is tried again every second,
//!   for as long as the job runs here.
//! - The server refuses the batch (the job ended there, or a record breaks its limits): it is
//!   tried again a few times a second apart (a server that has just come back refuses until
//!   it watches the job again), then dropped with a warning.
//! - Stopped (the job ended here): what is queued gets [`STOP_FLUSH`] to go, then the task
//!   ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::watch;

use crate::net::NetHandle;
use crate::net::protocol::{ControlRequest, ControlResponse};
use crate::tracking::{MAX_BATCH, MetricQueue, MetricRecord, MetricValue};

/// About how many bytes of keys and text one batch carries (well under the control
/// protocol's request cap).
pub const BATCH_BYTES: usize = 1 << 20;
/// How long queued records may take to go once the job ended here.
pub const STOP_FLUSH: Duration = Duration::from_secs(5);
/// How many refusals (a second apart) a batch gets before it is dropped.
const REFUSALS_KEPT: u32 = 10;
/// How long the sender waits for records before it looks at its stop switch again.
const IDLE: Duration = Duration::from_millis(250);

/// The size a record takes in a batch, roughly (keys, text, numbers).
fn weight(r: &MetricRecord) -> usize {
    32 + r.key.len()
        + match &r.value {
            MetricValue::Scalar(_) => 9,
            MetricValue::Scalars(m) => m.keys().map(|k| k.len() + 9).sum(),
            MetricValue::Text(t) | MetricValue::Param(t) | MetricValue::Tag(t) => t.len(),
        }
}

/// The first records of `batch` that fit [`BATCH_BYTES`] (at least one).
fn fit(mut batch: Vec<MetricRecord>) -> Vec<MetricRecord> {
    let mut total = 0;
    let keep = batch
        .iter()
        .position(|r| {
            total += weight(r);
            total > BATCH_BYTES
        })
        .unwrap_or(batch.len())
        .max(1);
    batch.truncate(keep);
    batch
}

/// Starts the sender of `job`'s queue; it ends when `stop` turns true and the queue is sent
/// (or [`STOP_FLUSH`] passed).
pub fn spawn_sender(
    net: NetHandle,
    server: PeerId,
    job: String,
    queue: Arc<MetricQueue>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut refusals = 0u32;
        let mut stopped_at: Option<Instant> = None;
        loop {
            if stopped_at.is_none() && *stop.borrow() {
                stopped_at = Some(Instant::now());
            }
            if let Some(at) = stopped_at {
                if queue.is_empty() || at.elapsed() > STOP_FLUSH {
                    if !queue.is_empty() {
                        tracing::warn!(%job, left = queue.len(), "job ended here; unsent metric records dropped");
                    }
                    return;
                }
            }
            let Some((seq, batch)) = queue.peek(MAX_BATCH) else {
                tokio::select! {
                    () = queue.wait_for_records(IDLE) => {}
                    _ = stop.changed() => {}
                }
                continue;
            };
            let batch = fit(batch);
            let n = batch.len();
            let req = ControlRequest::Metrics {
                job: job.clone(),
                stream: queue.stream(),
                seq,
                records: batch,
            };
            match net.request(server, req).await {
                Ok(ControlResponse::Ok) => {
                    queue.ack(seq, n);
                    refusals = 0;
                }
                Ok(other) if refusals < REFUSALS_KEPT => {
                    refusals += 1;
                    tracing::debug!(%job, answer = ?other, "metrics refused; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Ok(other) => {
                    tracing::warn!(%job, answer = ?other, records = n, "metrics refused; dropped");
                    queue.ack(seq, n);
                    refusals = 0;
                }
                Err(e) => {
                    tracing::debug!(%job, error = %e, queued = queue.len(), "server away; metrics kept");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fit_the_byte_budget_and_never_go_empty() {
        let small: Vec<MetricRecord> = (0..100)
            .map(|i| MetricRecord::scalar("loss", 1.0, Some(i)))
            .collect();
        assert_eq!(fit(small).len(), 100);
        let big: Vec<MetricRecord> = (0..200)
            .map(|i| MetricRecord {
                key: "t".into(),
                value: MetricValue::Text("x".repeat(64 << 10)),
                step: Some(i),
                wall_ms: 0,
            })
            .collect();
        let n = fit(big).len();
        assert!(n > 1 && n * (64 << 10) <= BATCH_BYTES, "{n}");
        let huge = vec![MetricRecord {
            key: "t".into(),
            value: MetricValue::Text("x".repeat(BATCH_BYTES * 2)),
            step: None,
            wall_ms: 0,
        }];
        assert_eq!(fit(huge).len(), 1);
    }
}
