//! The statistics a job asks for, in FLARE's `statistic_configs` shape:
//!
//! ```json
//! {"count": {}, "sum": {}, "mean": {}, "min": {}, "max": {}, "var": {}, "stddev": {},
//!  "histogram": {"*": {"bins": 20}, "Age": {"bins": 10, "range": [0, 120]}}}
//! ```
//!
//! Every statistic but `histogram` takes `{}`. A histogram entry names a feature, or `*` for
//! every feature without an entry of its own; `bins` is required, `range` optional (without
//! it the range is the global noised min and max). A feature with neither its own entry nor
//! `*` gets no histogram (FLARE's controller fails on it; Flare leaves it out). Unknown keys,
//! here and inside the entries, are refused; so is `quantile` (or FLARE's older
//! `percentile`), with a message saying it is not supported yet.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::Statistic;

/// The most bins a histogram may have: the server and every site allocate this many
/// counters per feature and dataset.
pub const MAX_BINS: u32 = 10_000;

/// The histogram key that applies to every feature without an entry of its own.
const DEFAULT_FEATURE: &str = "*";

/// One histogram entry: FLARE's `{"bins": 10, "range": [0, 120]}`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistogramConfig {
    /// Number of buckets of equal width.
    pub bins: u32,
    /// `[low, high]`; `None` uses the global (noised) min and max of the first pass.
    pub range: Option<(f64, f64)>,
}

/// The statistics a job asks for, checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawConfig", into = "RawConfig")]
pub struct StatsConfig {
    stats: BTreeSet<Statistic>,
    /// Feature (or `*`) → histogram entry; empty unless `histogram` is asked for.
    histogram: BTreeMap<String, HistogramConfig>,
}

/// Why a statistics config was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// No statistic is named.
    #[error(
        "no statistic configured: name at least one of count, failure_count, sum, mean, min, max, var, stddev, histogram"
    )]
    Empty,
    /// `quantile` (or `percentile`) was asked for.
    #[error(
        "`{0}` is not supported yet (FLARE computes it by merging TDigests, which Flare does not implement); remove it from the statistic configs"
    )]
    QuantileUnsupported(&'static str),
    /// `histogram` names no feature and no `*`.
    #[error("histogram needs at least one entry: a feature name or \"*\" with {{\"bins\": N}}")]
    HistogramEmpty,
    /// A histogram entry has zero bins or more than [`MAX_BINS`].
    #[error("histogram entry {feature:?}: bins is {bins}, it must be between 1 and {MAX_BINS}")]
    Bins {
        /// The feature, or `*`.
        feature: String,
        /// The bins asked for.
        bins: u64,
    },
    /// A histogram range is not two finite numbers, low below high.
    #[error(
        "histogram entry {feature:?}: range [{low}, {high}] must be two finite numbers, low below high"
    )]
    Range {
        /// The feature, or `*`.
        feature: String,
        /// The range's low end.
        low: f64,
        /// The range's high end.
        high: f64,
    },
}

/// A statistic that takes no arguments: `{}` and nothing else.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHistogram {
    bins: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    range: Option<[f64; 2]>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    count: Option<NoArgs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure_count: Option<NoArgs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sum: Option<NoArgs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mean: Option<NoArgs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min: Option<NoArgs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max: Option<NoArgs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    var: Option<NoArgs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stddev: Option<NoArgs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    histogram: Option<BTreeMap<String, RawHistogram>>,
    /// Accepted by the parser only to be refused with a clear message.
    #[serde(default, skip_serializing)]
    quantile: Option<IgnoredAny>,
    /// FLARE's older name for `quantile`, refused the same way.
    #[serde(default, skip_serializing)]
    percentile: Option<IgnoredAny>,
}

impl TryFrom<RawConfig> for StatsConfig {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        if raw.quantile.is_some() {
            return Err(ConfigError::QuantileUnsupported("quantile"));
        }
        if raw.percentile.is_some() {
            return Err(ConfigError::QuantileUnsupported("percentile"));
        }
        let flags = [
            (raw.count.is_some(), Statistic::Count),
            (raw.failure_count.is_some(), Statistic::FailureCount),
            (raw.sum.is_some(), Statistic::Sum),
            (raw.mean.is_some(), Statistic::Mean),
            (raw.min.is_some(), Statistic::Min),
            (raw.max.is_some(), Statistic::Max),
            (raw.var.is_some(), Statistic::Var),
            (raw.stddev.is_some(), Statistic::Stddev),
            (raw.histogram.is_some(), Statistic::Histogram),
        ];
        let stats: BTreeSet<Statistic> = flags
            .into_iter()
            .filter_map(|(on, s)| on.then_some(s))
            .collect();
        if stats.is_empty() {
            return Err(ConfigError::Empty);
        }
        let mut histogram = BTreeMap::new();
        if let Some(entries) = raw.histogram {
            if entries.is_empty() {
                return Err(ConfigError::HistogramEmpty);
            }
            for (feature, e) in entries {
                if e.bins == 0 || e.bins > u64::from(MAX_BINS) {
                    return Err(ConfigError::Bins {
                        feature,
                        bins: e.bins,
                    });
                }
                let range = match e.range {
                    None => None,
                    Some([low, high]) => {
                        // A finite width implies finite ends.
                        if !(low < high && (high - low).is_finite()) {
                            return Err(ConfigError::Range { feature, low, high });
                        }
                        Some((low, high))
                    }
                };
                let bins = u32::try_from(e.bins).unwrap_or(MAX_BINS);
                histogram.insert(feature, HistogramConfig { bins, range });
            }
        }
        Ok(StatsConfig { stats, histogram })
    }
}

impl From<StatsConfig> for RawConfig {
    fn from(c: StatsConfig) -> RawConfig {
        let on = |s| c.stats.contains(&s).then_some(NoArgs {});
        RawConfig {
            count: on(Statistic::Count),
            failure_count: on(Statistic::FailureCount),
            sum: on(Statistic::Sum),
            mean: on(Statistic::Mean),
            min: on(Statistic::Min),
            max: on(Statistic::Max),
            var: on(Statistic::Var),
            stddev: on(Statistic::Stddev),
            histogram: c.stats.contains(&Statistic::Histogram).then(|| {
                c.histogram
                    .iter()
                    .map(|(f, h)| {
                        (
                            f.clone(),
                            RawHistogram {
                                bins: u64::from(h.bins),
                                range: h.range.map(|(l, u)| [l, u]),
                            },
                        )
                    })
                    .collect()
            }),
            quantile: None,
            percentile: None,
        }
    }
}

impl StatsConfig {
    /// Whether the job asks for `s`.
    pub fn wants(&self, s: Statistic) -> bool {
        self.stats.contains(&s)
    }

    /// The statistics asked for, in output order.
    pub fn statistics(&self) -> impl Iterator<Item = Statistic> + '_ {
        self.stats.iter().copied()
    }

    /// The histogram entry that applies to `feature`: its own, else `*`, else none.
    pub fn histogram_for(&self, feature: &str) -> Option<&HistogramConfig> {
        if !self.wants(Statistic::Histogram) {
            return None;
        }
        self.histogram
            .get(feature)
            .or_else(|| self.histogram.get(DEFAULT_FEATURE))
    }

    /// Whether sites send their sums: for sum itself, and for mean, var and stddev, which
    /// derive from it.
    pub fn needs_sum(&self) -> bool {
        [
            Statistic::Sum,
            Statistic::Mean,
            Statistic::Var,
            Statistic::Stddev,
        ]
        .into_iter()
        .any(|s| self.wants(s))
    }

    /// Whether the second pass is needed (var, stddev or histogram).
    pub fn needs_second_pass(&self) -> bool {
        self.needs_variance() || self.wants(Statistic::Histogram)
    }

    /// Whether var or stddev is asked for.
    pub fn needs_variance(&self) -> bool {
        self.wants(Statistic::Var) || self.wants(Statistic::Stddev)
    }

    /// Whether sites send `feature`'s min and max: when min or max is asked for, or its
    /// histogram has no configured range. A histogram with a range needs none, so a site
    /// shares no extremes for it.
    pub fn needs_min_max(&self, feature: &str) -> bool {
        self.wants(Statistic::Min)
            || self.wants(Statistic::Max)
            || self
                .histogram_for(feature)
                .is_some_and(|h| h.range.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<StatsConfig, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn flare_example_parses() {
        let c = parse(
            r#"{"count":{},"sum":{},"mean":{},"min":{},"max":{},"var":{},"stddev":{},
                "histogram":{"*":{"bins":20},"Age":{"bins":10,"range":[0,120]}}}"#,
        )
        .unwrap();
        for s in Statistic::ALL {
            assert_eq!(c.wants(s), s != Statistic::FailureCount, "{s}");
        }
        assert_eq!(
            c.histogram_for("Age"),
            Some(&HistogramConfig {
                bins: 10,
                range: Some((0.0, 120.0))
            })
        );
        assert_eq!(
            c.histogram_for("fnlwgt"),
            Some(&HistogramConfig {
                bins: 20,
                range: None
            })
        );
        assert!(c.needs_min_max("Age"), "min and max are asked for");
        assert!(c.needs_second_pass());
    }

    #[test]
    fn round_trips_through_cbor() {
        let c = parse(r#"{"count":{},"histogram":{"Age":{"bins":10,"range":[0,120]}}}"#).unwrap();
        let bytes = crate::codec::encode(&c, 1 << 16).unwrap();
        let back: StatsConfig = crate::codec::decode(&bytes, 1 << 16).unwrap();
        assert_eq!(back, c);
        assert!(
            !c.needs_min_max("Age"),
            "a ranged histogram needs no extremes"
        );
        assert!(c.histogram_for("Other").is_none(), "no `*` entry");
        assert!(!c.needs_sum());
    }

    #[test]
    fn refusals_say_why() {
        let cases = [
            (r#"{}"#, "no statistic configured"),
            (
                r#"{"count":{},"quantile":{"*":[25,50]}}"#,
                "`quantile` is not supported yet",
            ),
            (
                r#"{"percentile":{"*":[25]}}"#,
                "`percentile` is not supported yet",
            ),
            (r#"{"median":{}}"#, "unknown field `median`"),
            (r#"{"count":{"x":1}}"#, "unknown field `x`"),
            (r#"{"histogram":{}}"#, "at least one entry"),
            (r#"{"histogram":{"*":{"bins":0}}}"#, "bins is 0"),
            (r#"{"histogram":{"*":{"bins":20000}}}"#, "bins is 20000"),
            (
                r#"{"histogram":{"*":{"range":[0,1]}}}"#,
                "missing field `bins`",
            ),
            (
                r#"{"histogram":{"a":{"bins":2,"range":[5,1]}}}"#,
                "range [5, 1]",
            ),
            (
                r#"{"histogram":{"a":{"bins":2,"range":[0,1],"width":3}}}"#,
                "unknown field `width`",
            ),
        ];
        for (json, want) in cases {
            let err = parse(json).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
    }
}
