//! The site's side (FLARE's `StatisticsExecutor` with a `Statistics` generator): its data,
//! the two passes' local statistics, and [`execute`], which the node calls with a
//! `fed_stats` task, the site's data and its cleansers.
//!
//! A value counts when it is a finite number; NaN (a missing value, FLARE's `None`) and ±∞
//! count as failures (`failure_count`) and take part in nothing else.

use rand::Rng;

use super::cleanse::Cleanser;
use super::config::StatsConfig;
use super::wire::{self, FeatureMap, FirstPass, SecondPass, SecondRequest, StatsError, invalid};
use super::{Pass, TASK_FED_STATS, compensated_sum};
use crate::shareable::{ReturnCode, Shareable, Task, TaskResult};

/// A site's data: feature → dataset (`train`, `test`, …) → its values, NaN where one is
/// missing.
pub type SiteData = FeatureMap<Vec<f64>>;

fn finite(values: &[f64]) -> impl Iterator<Item = f64> + '_ {
    values.iter().copied().filter(|v| v.is_finite())
}

/// The first pass before cleansing: count, failure count, and the sum, min and max the
/// config needs.
pub fn first_pass(
    config: &StatsConfig,
    data: &SiteData,
) -> Result<FeatureMap<FirstPass>, StatsError> {
    let mut out = FeatureMap::new();
    for (feature, by_ds) in data {
        let min_max = config.needs_min_max(feature);
        for (dataset, values) in by_ds {
            let count = finite(values).count() as u64;
            let sum = config.needs_sum().then(|| compensated_sum(finite(values)));
            if sum.is_some_and(|s| !s.is_finite()) {
                return Err(invalid(feature, dataset, "the sum overflows"));
            }
            let (min, max) = if min_max && count > 0 {
                let min = finite(values).fold(f64::INFINITY, f64::min);
                let max = finite(values).fold(f64::NEG_INFINITY, f64::max);
                (Some(min), Some(max))
            } else {
                (None, None)
            };
            out.entry(feature.clone())
                .or_insert_with(Default::default)
                .insert(
                    dataset.clone(),
                    FirstPass {
                        count,
                        failure_count: values.len() as u64 - count,
                        sum,
                        min,
                        max,
                    },
                );
        }
    }
    Ok(out)
}

/// The second pass before cleansing: Σ(x − global mean)² where the request carries the
/// dataset's global mean, and the histogram where it carries the feature's buckets.
pub fn second_pass(
    req: &SecondRequest,
    data: &SiteData,
) -> Result<FeatureMap<SecondPass>, StatsError> {
    req.check()?;
    let mut out = FeatureMap::new();
    for (feature, by_ds) in data {
        let means = req.means.get(feature);
        let spec = req.histograms.get(feature);
        for (dataset, values) in by_ds {
            let mean = means.and_then(|m| m.get(dataset)).copied();
            if mean.is_none() && spec.is_none() {
                continue;
            }
            let sum_sq_dev =
                mean.map(|m| compensated_sum(finite(values).map(|x| (x - m) * (x - m))));
            if sum_sq_dev.is_some_and(|s| !s.is_finite()) {
                return Err(invalid(feature, dataset, "the sum of squares overflows"));
            }
            let histogram = spec.map(|spec| {
                let mut counts = vec![0u64; spec.bins as usize];
                for x in finite(values) {
                    if let Some(i) = spec.bucket(x) {
                        counts[i as usize] += 1;
                    }
                }
                counts
            });
            let count = finite(values).count() as u64;
            out.entry(feature.clone())
                .or_insert_with(Default::default)
                .insert(
                    dataset.clone(),
                    SecondPass {
                        count,
                        failure_count: values.len() as u64 - count,
                        sum_sq_dev,
                        histogram,
                    },
                );
        }
    }
    Ok(out)
}

/// Runs one `fed_stats` task over `data`, the site's `cleansers` applied in order, and
/// returns the result to send back. Never panics: a task it cannot read gets an error result
/// (`TaskUnknown` for another task name, `ValidationError` for a bad request,
/// `ExecutionException` when the data cannot be summed or the answer is too large).
pub fn execute<R: Rng + ?Sized>(
    task: &Task,
    data: &SiteData,
    cleansers: &[Cleanser],
    rng: &mut R,
) -> TaskResult {
    let data_out = answer(task, data, cleansers, rng);
    TaskResult {
        task_id: task.id,
        round: task.round,
        data: data_out.unwrap_or_else(|(code, e)| Shareable::error(code, e.to_string())),
    }
}

fn answer<R: Rng + ?Sized>(
    task: &Task,
    data: &SiteData,
    cleansers: &[Cleanser],
    rng: &mut R,
) -> Result<Shareable, (ReturnCode, StatsError)> {
    let refused = |e| (ReturnCode::ValidationError, e);
    let failed = |e| (ReturnCode::ExecutionException, e);
    if task.name != TASK_FED_STATS {
        return Err((
            ReturnCode::TaskUnknown,
            StatsError::NotStatsTask(task.name.chars().take(64).collect()),
        ));
    }
    match wire::pass_of(&task.data).map_err(refused)? {
        Pass::First => {
            let config: StatsConfig =
                wire::from_shareable(&task.data, Pass::First).map_err(refused)?;
            let mut stats = first_pass(&config, data).map_err(failed)?;
            for c in cleansers {
                c.apply_first(&mut stats, rng);
            }
            wire::to_shareable(Pass::First, &stats).map_err(failed)
        }
        Pass::Second => {
            let req: SecondRequest =
                wire::from_shareable(&task.data, Pass::Second).map_err(refused)?;
            req.check().map_err(refused)?;
            let mut stats = second_pass(&req, data).map_err(failed)?;
            for c in cleansers {
                c.apply_second(&mut stats);
            }
            wire::to_shareable(Pass::Second, &stats).map_err(failed)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::shareable::TaskId;
    use crate::stats::wire::HistogramSpec;

    fn data() -> SiteData {
        BTreeMap::from([(
            "Age".to_string(),
            BTreeMap::from([(
                "train".to_string(),
                vec![20.0, f64::NAN, 30.0, 40.0, f64::INFINITY, 50.0],
            )]),
        )])
    }

    fn config(json: &str) -> StatsConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn first_pass_counts_failures_apart() {
        let c = config(r#"{"count":{},"mean":{},"min":{}}"#);
        let s = first_pass(&c, &data()).unwrap()["Age"]["train"];
        assert_eq!(
            s,
            FirstPass {
                count: 4,
                failure_count: 2,
                sum: Some(140.0),
                min: Some(20.0),
                max: Some(50.0)
            }
        );
        let only_count = config(r#"{"count":{}}"#);
        let s = first_pass(&only_count, &data()).unwrap()["Age"]["train"];
        assert_eq!(
            (s.sum, s.min, s.max),
            (None, None, None),
            "nothing not needed"
        );
    }

    #[test]
    fn second_pass_sums_squares_and_buckets() {
        let req = SecondRequest {
            means: BTreeMap::from([(
                "Age".to_string(),
                BTreeMap::from([("train".to_string(), 35.0)]),
            )]),
            histograms: BTreeMap::from([(
                "Age".to_string(),
                HistogramSpec {
                    bins: 3,
                    low: 20.0,
                    high: 50.0,
                },
            )]),
        };
        let s = &second_pass(&req, &data()).unwrap()["Age"]["train"];
        assert_eq!(s.sum_sq_dev, Some(225.0 + 25.0 + 25.0 + 225.0));
        assert_eq!(
            s.histogram.as_deref(),
            Some(&[1, 1, 2][..]),
            "50 falls in the closed last bucket"
        );
        assert_eq!((s.count, s.failure_count), (4, 2));
    }

    #[test]
    fn execute_answers_errors_without_panicking() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut task = wire::task(TaskId(3), Pass::First, &config(r#"{"count":{}}"#)).unwrap();
        let ok = execute(&task, &data(), &[], &mut rng);
        assert_eq!(ok.data.return_code, ReturnCode::Ok);
        assert_eq!((ok.task_id, ok.round), (TaskId(3), 0));
        let stats: FeatureMap<FirstPass> = wire::from_shareable(&ok.data, Pass::First).unwrap();
        assert_eq!(stats["Age"]["train"].count, 4);

        task.data.headers.remove(wire::HEADER_STATS_DATA);
        let bad = execute(&task, &data(), &[], &mut rng);
        assert_eq!(bad.data.return_code, ReturnCode::ValidationError);
        assert!(bad.data.error_reason().unwrap().contains("fed_stats_data"));

        task.name = "train".into();
        let other = execute(&task, &data(), &[], &mut rng);
        assert_eq!(other.data.return_code, ReturnCode::TaskUnknown);

        let bad_spec = SecondRequest {
            means: BTreeMap::new(),
            histograms: BTreeMap::from([(
                "Age".to_string(),
                HistogramSpec {
                    bins: 0,
                    low: 0.0,
                    high: 1.0,
                },
            )]),
        };
        let task = wire::task(TaskId(4), Pass::Second, &bad_spec).unwrap();
        let refused = execute(&task, &data(), &[], &mut rng);
        assert_eq!(refused.data.return_code, ReturnCode::ValidationError);
    }
}
