//! What travels between the controller and the sites, and how it rides a [`Task`] or a
//! [`crate::TaskResult`]: the `fed_stats_task` header names the pass (FLARE's
//! `STATISTICS_TASK_KEY`), the `fed_stats_data` header carries the payload as hex-encoded
//! CBOR (a shareable's headers have no bytes value; FLARE puts `fobs.dumps(...)` bytes in its
//! DXO the same way), at most [`MAX_STATS_PAYLOAD`] bytes before hex.
//!
//! | pass | task payload | result payload |
//! | --- | --- | --- |
//! | first | [`super::StatsConfig`] | [`FeatureMap`]`<`[`FirstPass`]`>` |
//! | second | [`SecondRequest`] | [`FeatureMap`]`<`[`SecondPass`]`>` |

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::config::MAX_BINS;
use super::{Pass, TASK_FED_STATS};
use crate::codec::{self, CodecError};
use crate::model::MetaValue;
use crate::shareable::{Shareable, Task, TaskId};

/// The header naming the pass (FLARE's `StatisticsConstants.STATISTICS_TASK_KEY`).
pub const HEADER_STATS_TASK: &str = "fed_stats_task";
/// The header carrying the payload, hex-encoded CBOR.
pub const HEADER_STATS_DATA: &str = "fed_stats_data";
/// The largest payload, in CBOR bytes (twice that in hex): with the rest of a task it stays
/// under the node's 1 MiB control-message cap.
pub const MAX_STATS_PAYLOAD: usize = 384 * 1024;
/// The longest feature or dataset name accepted from a peer, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// Feature → dataset → `T`, the layout of every payload.
pub type FeatureMap<T> = BTreeMap<String, BTreeMap<String, T>>;

/// A site's first-pass answer for one feature of one dataset.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirstPass {
    /// Values that are numbers.
    pub count: u64,
    /// Values that are not (FLARE's `failure_count`).
    pub failure_count: u64,
    /// Σ of the values, when the job asks for sum, mean, var or stddev.
    #[serde(default)]
    pub sum: Option<f64>,
    /// The smallest value (noised by [`super::AddNoiseToMinMax`]), when the job needs it
    /// and `count` > 0.
    #[serde(default)]
    pub min: Option<f64>,
    /// The largest value, likewise.
    #[serde(default)]
    pub max: Option<f64>,
}

/// A site's second-pass answer for one feature of one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondPass {
    /// The same count as the first pass (FLARE sends it every pass for the cleansers); the
    /// server checks that the data did not change between passes.
    pub count: u64,
    /// The same failure count as the first pass.
    pub failure_count: u64,
    /// Σ(x − global mean)², when the request carries this dataset's global mean.
    #[serde(default)]
    pub sum_sq_dev: Option<f64>,
    /// Bucket counts over the request's bins, unless a cleanser dropped the histogram.
    #[serde(default)]
    pub histogram: Option<Vec<u64>>,
}

/// A histogram's buckets, the same for every site and dataset of a feature.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistogramSpec {
    /// Number of buckets of equal width.
    pub bins: u32,
    /// The low end of the first bucket.
    pub low: f64,
    /// The high end of the last bucket (included in it, as numpy's).
    pub high: f64,
}

impl HistogramSpec {
    /// The low edge of bucket `i`, or the range's high end for `i == bins`.
    pub fn edge(&self, i: u32) -> f64 {
        if i >= self.bins {
            self.high
        } else {
            self.low + f64::from(i) * ((self.high - self.low) / f64::from(self.bins))
        }
    }

    /// The bucket `x` falls in, numpy's rule: `[edge(i), edge(i+1))`, the last bucket closed;
    /// `None` outside the range.
    pub fn bucket(&self, x: f64) -> Option<u32> {
        if self.bins == 0 || !(x >= self.low && x <= self.high) {
            return None;
        }
        let scaled = (x - self.low) / (self.high - self.low) * f64::from(self.bins);
        let mut i = (scaled as u32).min(self.bins - 1);
        // The division may round across an edge: trust the edges the output shows.
        if i > 0 && x < self.edge(i) {
            i -= 1;
        } else if i + 1 < self.bins && x >= self.edge(i + 1) {
            i += 1;
        }
        Some(i)
    }

    /// Checks a spec that arrived from a peer.
    pub fn check(&self) -> Result<(), String> {
        if self.bins == 0 || self.bins > MAX_BINS {
            return Err(format!("bins is {}, not 1..={MAX_BINS}", self.bins));
        }
        // A finite width implies finite ends.
        if !(self.low < self.high && (self.high - self.low).is_finite()) {
            return Err(format!("range [{}, {}] is not usable", self.low, self.high));
        }
        Ok(())
    }
}

/// The second pass's task payload: what the first pass made global.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondRequest {
    /// Global mean per feature and dataset, when var or stddev is asked for.
    #[serde(default)]
    pub means: FeatureMap<f64>,
    /// Each histogram's buckets, per feature.
    #[serde(default)]
    pub histograms: BTreeMap<String, HistogramSpec>,
}

impl SecondRequest {
    /// Checks a request that arrived from the server.
    pub fn check(&self) -> Result<(), StatsError> {
        for (feature, by_ds) in &self.means {
            for (dataset, m) in by_ds {
                if !m.is_finite() {
                    return Err(invalid(feature, dataset, format!("global mean {m}")));
                }
            }
        }
        for (feature, spec) in &self.histograms {
            spec.check().map_err(|r| invalid(feature, "*", r))?;
        }
        Ok(())
    }
}

/// Why a task or a result could not be read or was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatsError {
    /// The task is not `fed_stats`.
    #[error("task {0:?} is not a statistics task")]
    NotStatsTask(String),
    /// A header is absent or not text.
    #[error("header {0} is missing or not text")]
    MissingHeader(&'static str),
    /// The `fed_stats_task` header names no pass.
    #[error("fed_stats_task {0:?} names no pass")]
    UnknownPass(String),
    /// The `fed_stats_task` header names the other pass.
    #[error("expected {expected}, got {found:?}")]
    WrongPass {
        /// The pass this side is in.
        expected: Pass,
        /// What the header says.
        found: String,
    },
    /// The payload is larger than [`MAX_STATS_PAYLOAD`].
    #[error("payload of {size} bytes exceeds {MAX_STATS_PAYLOAD}")]
    TooLarge {
        /// Its size in CBOR bytes.
        size: usize,
    },
    /// The payload is not hex.
    #[error("payload is not hex")]
    NotHex,
    /// The payload is not CBOR of the expected shape.
    #[error("payload: {0}")]
    Codec(String),
    /// A value is impossible or inconsistent.
    #[error("{feature}/{dataset}: {reason}")]
    Invalid {
        /// The feature.
        feature: String,
        /// The dataset (`*` for a whole feature).
        dataset: String,
        /// What is wrong.
        reason: String,
    },
}

impl From<CodecError> for StatsError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::TooLarge { size, .. } => StatsError::TooLarge { size },
            other => StatsError::Codec(other.to_string()),
        }
    }
}

pub(crate) fn invalid(feature: &str, dataset: &str, reason: impl Into<String>) -> StatsError {
    StatsError::Invalid {
        feature: feature.to_string(),
        dataset: dataset.to_string(),
        reason: reason.into(),
    }
}

/// A shareable carrying `payload` for `pass`.
pub fn to_shareable<T: Serialize>(pass: Pass, payload: &T) -> Result<Shareable, StatsError> {
    let bytes = codec::encode(payload, MAX_STATS_PAYLOAD)?;
    let mut s = Shareable::default();
    s.headers.insert(
        HEADER_STATS_TASK.to_string(),
        MetaValue::Text(pass.as_str().to_string()),
    );
    s.headers.insert(
        HEADER_STATS_DATA.to_string(),
        MetaValue::Text(hex::encode(bytes)),
    );
    Ok(s)
}

fn text<'a>(s: &'a Shareable, header: &'static str) -> Result<&'a str, StatsError> {
    match s.headers.get(header) {
        Some(MetaValue::Text(t)) => Ok(t),
        _ => Err(StatsError::MissingHeader(header)),
    }
}

/// The pass a shareable's `fed_stats_task` header names.
pub fn pass_of(s: &Shareable) -> Result<Pass, StatsError> {
    let name = text(s, HEADER_STATS_TASK)?;
    Pass::from_header(name).ok_or_else(|| StatsError::UnknownPass(name.chars().take(64).collect()))
}

/// The payload of a shareable that must belong to `pass`.
pub fn from_shareable<T: DeserializeOwned>(s: &Shareable, pass: Pass) -> Result<T, StatsError> {
    let found = text(s, HEADER_STATS_TASK)?;
    if found != pass.as_str() {
        return Err(StatsError::WrongPass {
            expected: pass,
            found: found.chars().take(64).collect(),
        });
    }
    let data = text(s, HEADER_STATS_DATA)?;
    if data.len() > 2 * MAX_STATS_PAYLOAD {
        return Err(StatsError::TooLarge {
            size: data.len() / 2,
        });
    }
    let bytes = hex::decode(data).map_err(|_| StatsError::NotHex)?;
    Ok(codec::decode(&bytes, MAX_STATS_PAYLOAD)?)
}

/// The task of `pass` with `payload`, numbered `id`.
pub fn task<T: Serialize>(id: TaskId, pass: Pass, payload: &T) -> Result<Task, StatsError> {
    Ok(Task {
        id,
        name: TASK_FED_STATS.to_string(),
        round: pass.round(),
        data: to_shareable(pass, payload)?,
    })
}

/// Checks the names of a payload from a peer: non-empty, at most [`MAX_NAME_LEN`] bytes.
pub(crate) fn check_names<T>(map: &FeatureMap<T>) -> Result<(), StatsError> {
    for (feature, by_ds) in map {
        if feature.is_empty() || feature.len() > MAX_NAME_LEN {
            return Err(invalid(
                &feature.chars().take(64).collect::<String>(),
                "*",
                "feature name is empty or too long",
            ));
        }
        for dataset in by_ds.keys() {
            if dataset.is_empty() || dataset.len() > MAX_NAME_LEN {
                return Err(invalid(
                    feature,
                    &dataset.chars().take(64).collect::<String>(),
                    "dataset name is empty or too long",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_numpy() {
        let spec = HistogramSpec {
            bins: 4,
            low: 0.0,
            high: 1.0,
        };
        let got: Vec<Option<u32>> = [-0.1, 0.0, 0.2499, 0.25, 0.5, 0.99, 1.0, 1.01, f64::NAN]
            .into_iter()
            .map(|x| spec.bucket(x))
            .collect();
        assert_eq!(
            got,
            [
                None,
                Some(0),
                Some(0),
                Some(1),
                Some(2),
                Some(3),
                Some(3),
                None,
                None
            ]
        );
        // Every x lands in the bucket whose edges contain it.
        let spec = HistogramSpec {
            bins: 7,
            low: -3.3,
            high: 10.1,
        };
        for k in 0..=10_000 {
            let x = -3.3 + 13.4 * f64::from(k) / 10_000.0;
            if let Some(i) = spec.bucket(x) {
                assert!(x >= spec.edge(i), "{x} below bucket {i}");
                assert!(
                    x < spec.edge(i + 1) || i + 1 == spec.bins,
                    "{x} above bucket {i}"
                );
            }
        }
    }

    #[test]
    fn payload_round_trip_and_refusals() {
        let req = SecondRequest {
            means: BTreeMap::from([(
                "Age".to_string(),
                BTreeMap::from([("train".to_string(), 38.5)]),
            )]),
            histograms: BTreeMap::from([(
                "Age".to_string(),
                HistogramSpec {
                    bins: 10,
                    low: 0.0,
                    high: 120.0,
                },
            )]),
        };
        let s = to_shareable(Pass::Second, &req).unwrap();
        assert_eq!(pass_of(&s).unwrap(), Pass::Second);
        let back: SecondRequest = from_shareable(&s, Pass::Second).unwrap();
        assert_eq!(back, req);
        assert!(matches!(
            from_shareable::<SecondRequest>(&s, Pass::First),
            Err(StatsError::WrongPass { .. })
        ));
        let mut bad = s.clone();
        bad.headers.insert(
            HEADER_STATS_DATA.to_string(),
            MetaValue::Text("zz".to_string()),
        );
        assert_eq!(
            from_shareable::<SecondRequest>(&bad, Pass::Second),
            Err(StatsError::NotHex)
        );
        bad.headers.insert(
            HEADER_STATS_DATA.to_string(),
            MetaValue::Text("00".repeat(MAX_STATS_PAYLOAD + 1)),
        );
        assert!(matches!(
            from_shareable::<SecondRequest>(&bad, Pass::Second),
            Err(StatsError::TooLarge { .. })
        ));
        bad.headers.remove(HEADER_STATS_DATA);
        assert_eq!(
            from_shareable::<SecondRequest>(&bad, Pass::Second),
            Err(StatsError::MissingHeader(HEADER_STATS_DATA))
        );
    }
}
