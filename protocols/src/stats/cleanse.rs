//! A site's privacy cleansers (FLARE's `StatisticsPrivacyCleanser`s, run by its
//! `StatisticsPrivacyFilter` in the order of `result_cleanser_ids`), applied to the site's
//! answer before it leaves:
//!
//! - [`MinCountCleanser`] (`min_count`): a feature's dataset with fewer than `min_count`
//!   values that are numbers (FLARE's `count − failure_count`; Flare's `count` already leaves
//!   the failures out) is dropped from the answer entirely, in both passes, so the site
//!   shares nothing about it, not even its count. (FLARE's cleanser keeps the count; Flare
//!   drops it too, so the global count and the global sum cover the same rows.)
//! - [`AddNoiseToMinMax`] (`min_noise_level`, `max_noise_level`): draws r ~ U(lo, hi) for
//!   every min and every max and moves it outward: min·(1 − r) if min > 0, min·(1 + r) if
//!   min < 0, −(1 − r)·1e-5 if min = 0; max·(1 + r) if max > 0, max·(1 − r) if max < 0,
//!   (1 + r)·1e-5 if max = 0. The noised range contains the true one.
//! - [`HistogramBinsCleanser`] (`max_bins_percent`): a histogram survives only with
//!   bins < round(count·max_bins_percent/100) (Python's round, half to even); otherwise that
//!   histogram alone is dropped.
//!
//! FLARE's classes take these arguments without defaults; the defaults here are the values
//! of FLARE's statistics job recipe and samples (10, 0.1–0.3, 10 %). Randomness is handed in.

use std::collections::BTreeMap;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::wire::{FeatureMap, FirstPass, SecondPass};

/// Why a cleanser's arguments were refused (FLARE's `validate_inputs`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CleanserError {
    /// Noise levels outside [0, 1], or min above max.
    #[error(
        "noise levels ({min}, {max}) must lie in [0, 1] with min_noise_level <= max_noise_level"
    )]
    NoiseLevel {
        /// `min_noise_level`.
        min: f64,
        /// `max_noise_level`.
        max: f64,
    },
    /// `max_bins_percent` outside [0, 100].
    #[error("max_bins_percent {0} is not within [0, 100]")]
    BinsPercent(f64),
}

/// Drops a feature's dataset with fewer than `min_count` values (FLARE's `MinCountCleanser`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinCountCleanser {
    /// The fewest values a site shares statistics of.
    #[serde(default = "default_min_count")]
    pub min_count: u64,
}

fn default_min_count() -> u64 {
    10
}

impl Default for MinCountCleanser {
    fn default() -> Self {
        MinCountCleanser {
            min_count: default_min_count(),
        }
    }
}

impl MinCountCleanser {
    /// The cleanser with `min_count`.
    pub fn new(min_count: u64) -> Self {
        MinCountCleanser { min_count }
    }

    fn keeps(&self, count: u64) -> bool {
        count >= self.min_count
    }
}

/// Moves min and max outward by a random fraction (FLARE's `AddNoiseToMinMax`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawNoise", into = "RawNoise")]
pub struct AddNoiseToMinMax {
    min_noise_level: f64,
    max_noise_level: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNoise {
    #[serde(default = "default_min_noise")]
    min_noise_level: f64,
    #[serde(default = "default_max_noise")]
    max_noise_level: f64,
}

fn default_min_noise() -> f64 {
    0.1
}

fn default_max_noise() -> f64 {
    0.3
}

impl TryFrom<RawNoise> for AddNoiseToMinMax {
    type Error = CleanserError;
    fn try_from(r: RawNoise) -> Result<Self, CleanserError> {
        AddNoiseToMinMax::new(r.min_noise_level, r.max_noise_level)
    }
}

impl From<AddNoiseToMinMax> for RawNoise {
    fn from(n: AddNoiseToMinMax) -> RawNoise {
        RawNoise {
            min_noise_level: n.min_noise_level,
            max_noise_level: n.max_noise_level,
        }
    }
}

impl Default for AddNoiseToMinMax {
    fn default() -> Self {
        AddNoiseToMinMax {
            min_noise_level: default_min_noise(),
            max_noise_level: default_max_noise(),
        }
    }
}

impl AddNoiseToMinMax {
    /// The cleanser drawing r ~ U(`min_noise_level`, `max_noise_level`); both in [0, 1].
    pub fn new(min_noise_level: f64, max_noise_level: f64) -> Result<Self, CleanserError> {
        let ok = |v: f64| (0.0..=1.0).contains(&v);
        if !(ok(min_noise_level) && ok(max_noise_level) && min_noise_level <= max_noise_level) {
            return Err(CleanserError::NoiseLevel {
                min: min_noise_level,
                max: max_noise_level,
            });
        }
        Ok(AddNoiseToMinMax {
            min_noise_level,
            max_noise_level,
        })
    }

    fn draw<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        rng.random_range(self.min_noise_level..=self.max_noise_level)
    }

    /// FLARE's `_get_min_value`: `min` moved down by the fraction `r`.
    pub fn noised_min(min: f64, r: f64) -> f64 {
        if min == 0.0 {
            -(1.0 - r) * 1e-5
        } else if min > 0.0 {
            min * (1.0 - r)
        } else {
            min * (1.0 + r)
        }
    }

    /// FLARE's `_get_max_value`: `max` moved up by the fraction `r`.
    pub fn noised_max(max: f64, r: f64) -> f64 {
        if max == 0.0 {
            (1.0 + r) * 1e-5
        } else if max > 0.0 {
            max * (1.0 + r)
        } else {
            max * (1.0 - r)
        }
    }
}

/// Drops a histogram with too many bins for the data behind it (FLARE's
/// `HistogramBinsCleanser`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawBins", into = "RawBins")]
pub struct HistogramBinsCleanser {
    max_bins_percent: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBins {
    #[serde(default = "default_bins_percent")]
    max_bins_percent: f64,
}

fn default_bins_percent() -> f64 {
    10.0
}

impl TryFrom<RawBins> for HistogramBinsCleanser {
    type Error = CleanserError;
    fn try_from(r: RawBins) -> Result<Self, CleanserError> {
        HistogramBinsCleanser::new(r.max_bins_percent)
    }
}

impl From<HistogramBinsCleanser> for RawBins {
    fn from(c: HistogramBinsCleanser) -> RawBins {
        RawBins {
            max_bins_percent: c.max_bins_percent,
        }
    }
}

impl Default for HistogramBinsCleanser {
    fn default() -> Self {
        HistogramBinsCleanser {
            max_bins_percent: default_bins_percent(),
        }
    }
}

impl HistogramBinsCleanser {
    /// The cleanser allowing bins < round(count·`max_bins_percent`/100); in [0, 100].
    pub fn new(max_bins_percent: f64) -> Result<Self, CleanserError> {
        if !(0.0..=100.0).contains(&max_bins_percent) {
            return Err(CleanserError::BinsPercent(max_bins_percent));
        }
        Ok(HistogramBinsCleanser { max_bins_percent })
    }

    /// The number of bins a histogram of `count` values must stay below.
    pub fn limit(&self, count: u64) -> f64 {
        (count as f64 * self.max_bins_percent / 100.0).round_ties_even()
    }
}

/// One cleanser of a site's privacy policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cleanser {
    /// FLARE's `MinCountCleanser`.
    MinCount(MinCountCleanser),
    /// FLARE's `AddNoiseToMinMax`.
    AddNoiseToMinMax(AddNoiseToMinMax),
    /// FLARE's `HistogramBinsCleanser`.
    HistogramBins(HistogramBinsCleanser),
}

impl From<MinCountCleanser> for Cleanser {
    fn from(c: MinCountCleanser) -> Self {
        Cleanser::MinCount(c)
    }
}

impl From<AddNoiseToMinMax> for Cleanser {
    fn from(c: AddNoiseToMinMax) -> Self {
        Cleanser::AddNoiseToMinMax(c)
    }
}

impl From<HistogramBinsCleanser> for Cleanser {
    fn from(c: HistogramBinsCleanser) -> Self {
        Cleanser::HistogramBins(c)
    }
}

/// Removes the entries `keep` refuses, and features left without datasets.
fn retain<T>(stats: &mut FeatureMap<T>, mut keep: impl FnMut(&T) -> bool) {
    for by_ds in stats.values_mut() {
        by_ds.retain(|_, v| keep(v));
    }
    stats.retain(|_, by_ds| !by_ds.is_empty());
}

impl Cleanser {
    /// FLARE's name for this cleanser's class.
    pub fn name(&self) -> &'static str {
        match self {
            Cleanser::MinCount(_) => "MinCountCleanser",
            Cleanser::AddNoiseToMinMax(_) => "AddNoiseToMinMax",
            Cleanser::HistogramBins(_) => "HistogramBinsCleanser",
        }
    }

    /// Cleanses a first-pass answer.
    pub fn apply_first<R: Rng + ?Sized>(&self, stats: &mut FeatureMap<FirstPass>, rng: &mut R) {
        match self {
            Cleanser::MinCount(c) => retain(stats, |s| c.keeps(s.count)),
            Cleanser::AddNoiseToMinMax(n) => {
                for s in stats.values_mut().flat_map(BTreeMap::values_mut) {
                    if let Some(min) = s.min.as_mut() {
                        *min = AddNoiseToMinMax::noised_min(*min, n.draw(rng));
                    }
                    if let Some(max) = s.max.as_mut() {
                        *max = AddNoiseToMinMax::noised_max(*max, n.draw(rng));
                    }
                }
            }
            Cleanser::HistogramBins(_) => {}
        }
    }

    /// Cleanses a second-pass answer.
    pub fn apply_second(&self, stats: &mut FeatureMap<SecondPass>) {
        match self {
            Cleanser::MinCount(c) => retain(stats, |s| c.keeps(s.count)),
            Cleanser::AddNoiseToMinMax(_) => {}
            Cleanser::HistogramBins(c) => {
                for s in stats.values_mut().flat_map(BTreeMap::values_mut) {
                    if s.histogram
                        .as_ref()
                        .is_some_and(|h| h.len() as f64 >= c.limit(s.count))
                    {
                        s.histogram = None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn first(count: u64, min: f64, max: f64) -> FirstPass {
        FirstPass {
            count,
            failure_count: 1,
            sum: Some(0.0),
            min: Some(min),
            max: Some(max),
        }
    }

    #[test]
    fn min_count_drops_the_dataset_and_the_empty_feature() {
        let mut stats: FeatureMap<FirstPass> = BTreeMap::from([
            (
                "a".to_string(),
                BTreeMap::from([
                    ("train".to_string(), first(10, 0.0, 1.0)),
                    ("test".to_string(), first(9, 0.0, 1.0)),
                ]),
            ),
            (
                "b".to_string(),
                BTreeMap::from([("train".to_string(), first(3, 0.0, 1.0))]),
            ),
        ]);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        Cleanser::from(MinCountCleanser::new(10)).apply_first(&mut stats, &mut rng);
        assert_eq!(stats.len(), 1);
        assert_eq!(stats["a"].keys().collect::<Vec<_>>(), ["train"]);
    }

    #[test]
    fn noise_follows_flare_and_widens_the_range() {
        let cases = [
            (5.0, 0.2, 4.0, 6.0),
            (-5.0, 0.2, -6.0, -4.0),
            (0.0, 0.2, -0.8e-5, 1.2e-5),
        ];
        for (v, r, lo, hi) in cases {
            assert!(
                (AddNoiseToMinMax::noised_min(v, r) - lo).abs() < 1e-12,
                "{v}"
            );
            assert!(
                (AddNoiseToMinMax::noised_max(v, r) - hi).abs() < 1e-12,
                "{v}"
            );
        }
        let noise = AddNoiseToMinMax::new(0.1, 0.3).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (min, max) in [
            (1.0, 2.0),
            (-3.0, -1.0),
            (-2.0, 5.0),
            (0.0, 0.0),
            (0.0, 4.0),
        ] {
            let mut stats: FeatureMap<FirstPass> = BTreeMap::from([(
                "f".to_string(),
                BTreeMap::from([("d".to_string(), first(100, min, max))]),
            )]);
            Cleanser::from(noise).apply_first(&mut stats, &mut rng);
            let s = stats["f"]["d"];
            let (nmin, nmax) = (s.min.unwrap(), s.max.unwrap());
            assert!(
                nmin < min && nmax > max,
                "[{min}, {max}] -> [{nmin}, {nmax}]"
            );
            // Within the noise levels: at most 30 % further out, at least 10 %.
            if min != 0.0 {
                let r = ((nmin - min) / min).abs();
                assert!((0.1..=0.3).contains(&r), "{r}");
            }
        }
    }

    #[test]
    fn bins_limit_is_python_round_of_the_percentage() {
        let c = HistogramBinsCleanser::new(10.0).unwrap();
        assert_eq!(c.limit(100), 10.0);
        assert_eq!(c.limit(205), 20.0, "20.5 rounds half to even");
        assert_eq!(c.limit(215), 22.0, "21.5 rounds half to even");
        let second = |count, bins: usize| SecondPass {
            count,
            failure_count: 0,
            sum_sq_dev: Some(1.0),
            histogram: Some(vec![0; bins]),
        };
        let mut stats: FeatureMap<SecondPass> = BTreeMap::from([(
            "f".to_string(),
            BTreeMap::from([
                ("small".to_string(), second(100, 10)),
                ("big".to_string(), second(101, 9)),
            ]),
        )]);
        Cleanser::from(c).apply_second(&mut stats);
        assert_eq!(
            stats["f"]["small"].histogram, None,
            "10 bins is not below 10"
        );
        assert_eq!(
            stats["f"]["small"].sum_sq_dev,
            Some(1.0),
            "only the histogram goes"
        );
        assert!(stats["f"]["big"].histogram.is_some());
    }

    #[test]
    fn arguments_are_checked() {
        assert!(AddNoiseToMinMax::new(0.3, 0.1).is_err());
        assert!(AddNoiseToMinMax::new(-0.1, 0.1).is_err());
        assert!(AddNoiseToMinMax::new(0.2, 0.2).is_ok());
        assert!(HistogramBinsCleanser::new(101.0).is_err());
        assert!(HistogramBinsCleanser::new(f64::NAN).is_err());
        let n: AddNoiseToMinMax = serde_json::from_str(r#"{"max_noise_level": 0.5}"#).unwrap();
        assert_eq!(n, AddNoiseToMinMax::new(0.1, 0.5).unwrap());
        let e = serde_json::from_str::<AddNoiseToMinMax>(r#"{"min_noise_level": 2}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must lie in [0, 1]"), "{e}");
        let e = serde_json::from_str::<MinCountCleanser>(r#"{"min_cnt": 2}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        let m: MinCountCleanser = serde_json::from_str("{}").unwrap();
        assert_eq!(m.min_count, 10);
    }
}
