//! The result as FLARE's `JsonStatsFileWriter` writes it:
//! `{feature: {stat: {site | "Global": {dataset: value}}}}`, a count an integer, a histogram
//! a list of `[low, high, count]`, every other number rounded to `precision` decimals
//! (FLARE's default 4) as Python's `round` does. Only the statistics the config asks for
//! appear. Serializing [`StatsOutput`] with serde_json gives the file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::config::StatsConfig;
use super::merge::{Bucket, StatsResult, Values};
use super::{GLOBAL, Statistic};

/// One value of the output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StatValue {
    /// `count` and `failure_count`.
    Int(u64),
    /// sum, mean, min, max, var, stddev, rounded.
    Float(f64),
    /// `[[low, high, count], …]`, edges rounded.
    Histogram(Vec<Bucket>),
}

/// Feature → statistic → site or `"Global"` → dataset → value.
pub type OutputMap =
    BTreeMap<String, BTreeMap<Statistic, BTreeMap<String, BTreeMap<String, StatValue>>>>;

/// The statistics in FLARE's JSON layout.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StatsOutput(pub OutputMap);

/// `x` rounded to `precision` decimals, as Python's `round(x, precision)`: the decimal
/// nearest to the binary value (Rust's formatting is exact, as Python's rounding is).
pub fn round_to(x: f64, precision: u32) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{:.*}", precision as usize, x).parse().unwrap_or(x)
}

fn value(stat: Statistic, v: &Values, precision: u32) -> Option<StatValue> {
    let float = |x: Option<f64>| x.map(|x| StatValue::Float(round_to(x, precision)));
    match stat {
        Statistic::Count => Some(StatValue::Int(v.count)),
        Statistic::FailureCount => Some(StatValue::Int(v.failure_count)),
        Statistic::Sum => float(v.sum),
        Statistic::Mean => float(v.mean),
        Statistic::Min => float(v.min),
        Statistic::Max => float(v.max),
        Statistic::Var => float(v.var),
        Statistic::Stddev => float(v.stddev),
        Statistic::Histogram => v.histogram.as_ref().map(|h| {
            StatValue::Histogram(
                h.iter()
                    .map(|b| Bucket {
                        low: round_to(b.low, precision),
                        high: round_to(b.high, precision),
                        count: b.count,
                    })
                    .collect(),
            )
        }),
    }
}

impl StatsOutput {
    /// The output of `result` for the statistics `config` asks for, rounded to `precision`.
    pub fn new(config: &StatsConfig, result: &StatsResult, precision: u32) -> StatsOutput {
        let mut out = OutputMap::new();
        let columns = result
            .sites
            .iter()
            .map(|(s, m)| (s.as_str(), m))
            .chain(std::iter::once((GLOBAL, &result.global)));
        for (column, stats) in columns {
            for (feature, by_ds) in stats {
                for (dataset, v) in by_ds {
                    for stat in config.statistics() {
                        if let Some(val) = value(stat, v, precision) {
                            out.entry(feature.clone())
                                .or_default()
                                .entry(stat)
                                .or_default()
                                .entry(column.to_string())
                                .or_default()
                                .insert(dataset.clone(), val);
                        }
                    }
                }
            }
        }
        StatsOutput(out)
    }

    /// One value: `feature`'s `stat` at `site` (or [`GLOBAL`]) for `dataset`.
    pub fn get(
        &self,
        feature: &str,
        stat: Statistic,
        site: &str,
        dataset: &str,
    ) -> Option<&StatValue> {
        self.0.get(feature)?.get(&stat)?.get(site)?.get(dataset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::FeatureMap;

    #[test]
    fn rounds_like_python() {
        assert_eq!(round_to(38.619_149, 4), 38.6191);
        assert_eq!(round_to(2.675, 2), 2.67, "2.675 is 2.67499999… in binary");
        assert_eq!(round_to(-1.234_56, 4), -1.2346);
        assert_eq!(round_to(1e300, 4), 1e300);
        assert_eq!(round_to(12.0, 0), 12.0);
    }

    #[test]
    fn writes_flares_layout() {
        let config: StatsConfig =
            serde_json::from_str(r#"{"count":{},"mean":{},"histogram":{"*":{"bins":2}}}"#).unwrap();
        let v = Values {
            count: 3,
            failure_count: 1,
            sum: Some(7.0),
            mean: Some(7.0 / 3.0),
            histogram: Some(vec![
                Bucket {
                    low: 0.0,
                    high: 1.5,
                    count: 1,
                },
                Bucket {
                    low: 1.5,
                    high: 3.0,
                    count: 2,
                },
            ]),
            ..Values::default()
        };
        let map: FeatureMap<Values> = BTreeMap::from([(
            "Age".to_string(),
            BTreeMap::from([("train".to_string(), v)]),
        )]);
        let result = StatsResult {
            sites: BTreeMap::from([("site-1".to_string(), map.clone())]),
            global: map,
        };
        let out = StatsOutput::new(&config, &result, 4);
        let json = serde_json::to_value(&out).unwrap();
        let want = serde_json::json!({
            "Age": {
                "count": {"site-1": {"train": 3}, "Global": {"train": 3}},
                "mean": {"site-1": {"train": 2.3333}, "Global": {"train": 2.3333}},
                "histogram": {
                    "site-1": {"train": [[0.0, 1.5, 1], [1.5, 3.0, 2]]},
                    "Global": {"train": [[0.0, 1.5, 1], [1.5, 3.0, 2]]}
                }
            }
        });
        assert_eq!(json, want);
        let back: StatsOutput = serde_json::from_value(json).unwrap();
        assert_eq!(back, out);
        assert_eq!(
            out.get("Age", Statistic::Count, GLOBAL, "train"),
            Some(&StatValue::Int(3))
        );
    }
}
