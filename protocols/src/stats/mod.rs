//! Federated statistics (FLARE's `StatisticsController` and `StatisticsExecutor`): global
//! count, sum, mean, min, max, variance, standard deviation and histograms of every site's data,
//! computed without pooling it, behind each site's privacy cleansers.
//!
//! # The method
//!
//! Every site holds, per feature and dataset (`train`, `test`, …), a column of numbers
//! ([`SiteData`]). The server's controller asks every site twice (FLARE's task `fed_stats`,
//! its `fed_stats_task` header saying the pass):
//!
//! 1. `fed_stats_1st_statistics` ([`Pass::First`]): each site answers, per feature and
//!    dataset, `count` (the values that are numbers), `failure_count` (NaN, missing or
//!    infinite values), `sum`, and its `min` and `max` ([`FirstPass`]). The server merges
//!    them: global count and sum are sums, global mean = Σsum / Σcount, global min and max the
//!    extremes of the sites' (noised) values. Mean is derived, never sent.
//! 2. `fed_stats_2nd_statistics` ([`Pass::Second`]), sent with the global means and every
//!    histogram's bins and range ([`SecondRequest`]): each site answers Σ(x − global mean)²
//!    and its histogram counts ([`SecondPass`]). The server sums them: global variance =
//!    Σ_sites Σ(x − ḡ)² / (global count − 1) (ddof 1), stddev = √var, the global histogram
//!    the bucket-wise sum.
//!
//! A histogram whose range the config does not give uses the global (noised) min and max of
//! the first pass, taken over all sites *and all datasets* as FLARE does, so a feature's
//! buckets are the same in `train` and `test`.
//!
//! # Privacy
//!
//! Before a site answers, its cleansers (FLARE's `StatisticsPrivacyFilter` with the
//! `result_cleanser_ids` of its `privacy.json`) run in order over the answer ([`Cleanser`]):
//! [`MinCountCleanser`] drops a feature's dataset with too few values, [`AddNoiseToMinMax`]
//! moves min and max outward by a random fraction, [`HistogramBinsCleanser`] drops a
//! histogram with too many bins for the data behind it.
//!
//! # The pieces and FLARE's names
//!
//! | Flare | FLARE |
//! | --- | --- |
//! | [`StatsConfig`] | `statistic_configs` |
//! | [`site::execute`] over [`SiteData`] | `StatisticsExecutor` + a `Statistics` generator |
//! | [`Cleanser`] | `StatisticsPrivacyCleanser`s of `StatisticsPrivacyFilter` |
//! | [`merge`] | `numeric_stats.get_global_stats` and the controller's combination |
//! | [`StatsOutput`] | what `JsonStatsFileWriter` writes |
//! | `workflows::statistics::StatisticsController` | `StatisticsController` |
//!
//! The payloads travel in the task's and result's headers ([`wire`]): FLARE puts
//! `fobs.dumps(...)` bytes in its DXO; Flare puts CBOR, hex-encoded, in the
//! `fed_stats_data` header, so the tasks and results ride the node's ordinary task transport.
//!
//! Quantiles (FLARE's `quantile`, merged TDigests) are not implemented yet: a config that
//! asks for them is refused with a message saying so.

mod cleanse;
mod config;
pub mod merge;
mod output;
pub mod site;
pub mod wire;

use serde::{Deserialize, Serialize};

pub use cleanse::{
    AddNoiseToMinMax, Cleanser, CleanserError, HistogramBinsCleanser, MinCountCleanser,
};
pub use config::{ConfigError, HistogramConfig, MAX_BINS, StatsConfig};
pub use merge::{Bucket, StatsResult, Values};
pub use output::{OutputMap, StatValue, StatsOutput, round_to};
pub use site::SiteData;
pub use wire::{FeatureMap, FirstPass, HistogramSpec, SecondPass, SecondRequest, StatsError};

/// FLARE's task name for both passes (`StatisticsConstants.FED_STATS_TASK`).
pub const TASK_FED_STATS: &str = "fed_stats";

/// The key of the global column in the output (FLARE's `StatisticsConstants.GLOBAL`); no
/// site may carry this name.
pub const GLOBAL: &str = "Global";

/// One statistic, named as FLARE names it in configs and output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    /// Values that are numbers.
    Count,
    /// Values that are not (NaN, missing, infinite).
    FailureCount,
    /// Sum of the values.
    Sum,
    /// Sum / count.
    Mean,
    /// Smallest value (noised when the site says so).
    Min,
    /// Largest value (noised when the site says so).
    Max,
    /// Sample variance (ddof 1).
    Var,
    /// √var.
    Stddev,
    /// Bucket counts over bins of equal width.
    Histogram,
}

impl Statistic {
    /// Every statistic, in output order.
    pub const ALL: [Statistic; 9] = [
        Statistic::Count,
        Statistic::FailureCount,
        Statistic::Sum,
        Statistic::Mean,
        Statistic::Min,
        Statistic::Max,
        Statistic::Var,
        Statistic::Stddev,
        Statistic::Histogram,
    ];

    /// FLARE's name (`count`, `failure_count`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Statistic::Count => "count",
            Statistic::FailureCount => "failure_count",
            Statistic::Sum => "sum",
            Statistic::Mean => "mean",
            Statistic::Min => "min",
            Statistic::Max => "max",
            Statistic::Var => "var",
            Statistic::Stddev => "stddev",
            Statistic::Histogram => "histogram",
        }
    }
}

impl std::fmt::Display for Statistic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which of the two passes a task or result belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pass {
    /// Count, failure count, sum, min, max.
    First,
    /// Σ(x − global mean)² and histograms.
    Second,
}

impl Pass {
    /// The value of the `fed_stats_task` header (FLARE's `STATS_1st_STATISTICS` and
    /// `STATS_2nd_STATISTICS`).
    pub fn as_str(self) -> &'static str {
        match self {
            Pass::First => "fed_stats_1st_statistics",
            Pass::Second => "fed_stats_2nd_statistics",
        }
    }

    /// The pass a `fed_stats_task` header names.
    pub fn from_header(s: &str) -> Option<Pass> {
        [Pass::First, Pass::Second]
            .into_iter()
            .find(|p| p.as_str() == s)
    }

    /// The task's `round`: 0 for the first pass, 1 for the second.
    pub fn round(self) -> u32 {
        match self {
            Pass::First => 0,
            Pass::Second => 1,
        }
    }
}

impl std::fmt::Display for Pass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Σ of `values` with Neumaier's compensation, so a site's sum does not depend on the order
/// of its rows more than it must.
pub(crate) fn compensated_sum(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut sum = 0.0f64;
    let mut c = 0.0f64;
    for v in values {
        let t = sum + v;
        if sum.abs() >= v.abs() {
            c += (sum - t) + v;
        } else {
            c += (v - t) + sum;
        }
        sum = t;
    }
    sum + c
}
