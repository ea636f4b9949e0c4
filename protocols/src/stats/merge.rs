//! The server's side (FLARE's `numeric_stats.get_global_stats` and the controller's
//! combination): checks every site's answer, builds the second pass's request from the
//! first, and merges the answers into per-site and global statistics ([`StatsResult`]).
//!
//! Global values are those of the sites that answered *both* passes (when there are two):
//! count and sum add up, mean = Σsum / Σcount, min and max are the extremes of the sites'
//! noised values for that dataset (FLARE writes the extremes over all datasets under each),
//! a histogram the bucket-wise sum. The variance is exact for the pooled data
//! of those sites even when a site dropped out between the passes: the sites sent
//! S = Σ(x − ḡ)² around the mean ḡ of the *first* pass's sites, and for the remaining rows,
//! with N values and mean m, Σ(x − m)² = S − N·(m − ḡ)², so var = (S − N(m − ḡ)²)/(N − 1).
//! (FLARE's sites divide by the first pass's global count − 1 themselves, which a dropout
//! makes wrong.) A site's own var and stddev come from the same identity with its own count
//! and mean, where FLARE's per-site `var` is the site's share of the global sum.
//!
//! FLARE rounds every intermediate sum to `precision`; Flare computes in full precision and
//! rounds only the output ([`super::StatsOutput`]).
//!
//! Checks on an answer (anything else excludes the site): names non-empty and at most
//! [`super::wire::MAX_NAME_LEN`] bytes; counts at most 2⁵³; sum, min, max, Σ(x − ḡ)² finite
//! and present exactly when the job needs them; min ≤ max and the mean between them;
//! Σ(x − ḡ)² ≥ N·(m − ḡ)² (a sum of squares cannot be smaller); the second pass's counts the
//! first's; a histogram of the requested bins whose counts add up to at most the count.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::config::StatsConfig;
use super::wire::{
    FeatureMap, FirstPass, HistogramSpec, SecondPass, SecondRequest, StatsError, check_names,
    invalid,
};

/// The largest count a site may report: beyond it f64 sums stop being exact.
pub const MAX_COUNT: u64 = 1 << 53;

/// One histogram bucket, written `[low, high, count]` (FLARE's `Bin`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "(f64, f64, u64)", into = "(f64, f64, u64)")]
pub struct Bucket {
    /// Its low edge (included).
    pub low: f64,
    /// Its high edge (excluded, but for the last bucket).
    pub high: f64,
    /// Values in it.
    pub count: u64,
}

impl From<(f64, f64, u64)> for Bucket {
    fn from((low, high, count): (f64, f64, u64)) -> Self {
        Bucket { low, high, count }
    }
}

impl From<Bucket> for (f64, f64, u64) {
    fn from(b: Bucket) -> Self {
        (b.low, b.high, b.count)
    }
}

/// Every statistic of one feature of one dataset, for one site or the global column; what
/// the job did not need is `None`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Values {
    /// Values that are numbers.
    pub count: u64,
    /// Values that are not.
    pub failure_count: u64,
    /// Σ values.
    pub sum: Option<f64>,
    /// sum / count.
    pub mean: Option<f64>,
    /// The (noised) minimum.
    pub min: Option<f64>,
    /// The (noised) maximum.
    pub max: Option<f64>,
    /// Sample variance, ddof 1.
    pub var: Option<f64>,
    /// √var.
    pub stddev: Option<f64>,
    /// The histogram, unless a cleanser dropped it.
    pub histogram: Option<Vec<Bucket>>,
}

/// The merged statistics, in full precision.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StatsResult {
    /// Each included site's own statistics.
    pub sites: BTreeMap<String, FeatureMap<Values>>,
    /// The global column.
    pub global: FeatureMap<Values>,
}

fn tolerance(a: f64, b: f64) -> f64 {
    1e-9 * a.abs().max(b.abs()).max(f64::MIN_POSITIVE)
}

/// Checks a site's first-pass answer against the job's config.
pub fn check_first(config: &StatsConfig, stats: &FeatureMap<FirstPass>) -> Result<(), StatsError> {
    check_names(stats)?;
    for (feature, by_ds) in stats {
        let min_max = config.needs_min_max(feature);
        for (dataset, s) in by_ds {
            let bad = |reason: String| Err(invalid(feature, dataset, reason));
            if s.count > MAX_COUNT || s.failure_count > MAX_COUNT {
                return bad(format!(
                    "count {} / failure_count {}",
                    s.count, s.failure_count
                ));
            }
            match (config.needs_sum(), s.sum) {
                (true, None) => return bad("sum is missing".into()),
                (false, Some(_)) => return bad("sum was not asked for".into()),
                (true, Some(sum)) if !sum.is_finite() => return bad(format!("sum {sum}")),
                (true, Some(sum)) if s.count == 0 && sum != 0.0 => {
                    return bad(format!("sum {sum} of no values"));
                }
                _ => {}
            }
            let want_extremes = min_max && s.count > 0;
            match (want_extremes, s.min, s.max) {
                (false, None, None) => {}
                (false, _, _) => return bad("min/max were not asked for".into()),
                (true, Some(min), Some(max)) => {
                    if !(min.is_finite() && max.is_finite() && min <= max) {
                        return bad(format!("min {min}, max {max}"));
                    }
                    if let Some(sum) = s.sum {
                        let mean = sum / s.count as f64;
                        let tol = tolerance(min, max);
                        if !(mean >= min - tol && mean <= max + tol) {
                            return bad(format!("mean {mean} outside [{min}, {max}]"));
                        }
                    }
                }
                (true, _, _) => return bad("min or max is missing".into()),
            }
        }
    }
    Ok(())
}

/// Checks a site's second-pass answer against its own first-pass answer and the request.
pub fn check_second(
    req: &SecondRequest,
    first: &FeatureMap<FirstPass>,
    second: &FeatureMap<SecondPass>,
) -> Result<(), StatsError> {
    check_names(second)?;
    for (feature, by_ds) in second {
        for (dataset, s) in by_ds {
            let bad = |reason: String| Err(invalid(feature, dataset, reason));
            let Some(f) = first.get(feature).and_then(|m| m.get(dataset)) else {
                return bad("not in the site's first-pass answer".into());
            };
            if (s.count, s.failure_count) != (f.count, f.failure_count) {
                return bad(format!(
                    "counts {}/{} differ from the first pass's {}/{}: the data changed",
                    s.count, s.failure_count, f.count, f.failure_count
                ));
            }
            let mean = req.means.get(feature).and_then(|m| m.get(dataset));
            match (mean, s.sum_sq_dev) {
                (None, Some(_)) => return bad("Σ(x − mean)² was not asked for".into()),
                (Some(_), None) => {} // caught below, with the entries missing entirely
                (None, None) => {}
                (Some(&g), Some(ssd)) => {
                    if !(ssd.is_finite() && ssd >= 0.0) {
                        return bad(format!("Σ(x − mean)² = {ssd}"));
                    }
                    if let (Some(sum), true) = (f.sum, f.count > 0) {
                        let n = f.count as f64;
                        let shift = n * (sum / n - g) * (sum / n - g);
                        if ssd < shift - 1e-6 * ssd.max(shift) - f64::MIN_POSITIVE {
                            return bad(format!(
                                "Σ(x − mean)² = {ssd} is below N·(m − ḡ)² = {shift}"
                            ));
                        }
                    }
                }
            }
            if let Some(h) = &s.histogram {
                let Some(spec) = req.histograms.get(feature) else {
                    return bad("histogram was not asked for".into());
                };
                if h.len() != spec.bins as usize {
                    return bad(format!("{} buckets, {} asked for", h.len(), spec.bins));
                }
                let total = h.iter().fold(0u64, |a, &c| a.saturating_add(c));
                if total > s.count {
                    return bad(format!("histogram holds {total} of {} values", s.count));
                }
            }
        }
    }
    // Every dataset the request gave a mean for must come back with its Σ(x − ḡ)².
    for (feature, by_ds) in first {
        for dataset in by_ds.keys() {
            let asked = req
                .means
                .get(feature)
                .is_some_and(|m| m.contains_key(dataset));
            let answered = second
                .get(feature)
                .and_then(|m| m.get(dataset))
                .is_some_and(|s| s.sum_sq_dev.is_some());
            if asked && !answered {
                return Err(invalid(feature, dataset, "Σ(x − mean)² is missing"));
            }
        }
    }
    Ok(())
}

/// Per feature and dataset: (count, sum) over the sites.
fn totals(firsts: &BTreeMap<String, FeatureMap<FirstPass>>) -> FeatureMap<(u64, f64)> {
    let mut t: FeatureMap<(u64, f64)> = FeatureMap::new();
    for stats in firsts.values() {
        for (feature, by_ds) in stats {
            for (dataset, s) in by_ds {
                let e = t
                    .entry(feature.clone())
                    .or_default()
                    .entry(dataset.clone())
                    .or_default();
                e.0 = e.0.saturating_add(s.count);
                e.1 += s.sum.unwrap_or(0.0);
            }
        }
    }
    t
}

/// The second pass's request from the accepted first-pass answers: the global mean of every
/// feature and dataset with values (when var or stddev is asked for) and every histogram's
/// buckets. A histogram without a configured range spans the global noised min and max over
/// all sites and datasets (one value: ±0.5 around it, as numpy); a feature no site sent
/// extremes for gets none.
pub fn second_request(
    config: &StatsConfig,
    firsts: &BTreeMap<String, FeatureMap<FirstPass>>,
) -> SecondRequest {
    let mut req = SecondRequest::default();
    for (feature, by_ds) in totals(firsts) {
        if config.needs_variance() {
            let means: BTreeMap<String, f64> = by_ds
                .iter()
                .filter(|(_, (n, _))| *n > 0)
                .map(|(ds, (n, sum))| (ds.clone(), sum / *n as f64))
                .collect();
            if !means.is_empty() {
                req.means.insert(feature.clone(), means);
            }
        }
        let Some(h) = config.histogram_for(&feature) else {
            continue;
        };
        let range = h.range.or_else(|| {
            let extremes = firsts
                .values()
                .filter_map(|s| s.get(&feature))
                .flat_map(BTreeMap::values)
                .filter_map(|s| s.min.zip(s.max));
            extremes.reduce(|(a, b), (c, d)| (a.min(c), b.max(d)))
        });
        let Some((low, high)) = range else { continue };
        let (low, high) = if low == high {
            (low - 0.5, high + 0.5)
        } else {
            (low, high)
        };
        let spec = HistogramSpec {
            bins: h.bins,
            low,
            high,
        };
        if spec.check().is_ok() {
            req.histograms.insert(feature, spec);
        }
    }
    req
}

fn buckets(spec: &HistogramSpec, counts: &[u64]) -> Vec<Bucket> {
    (0..spec.bins)
        .zip(counts)
        .map(|(i, &count)| Bucket {
            low: spec.edge(i),
            high: spec.edge(i + 1),
            count,
        })
        .collect()
}

/// Sample variance of values whose Σ(x − ḡ)² is `ssd`, with `n` values summing to `sum`.
fn variance(ssd: f64, n: u64, sum: f64, g: f64) -> Option<f64> {
    if n < 2 {
        return None;
    }
    let nf = n as f64;
    let m = sum / nf;
    Some(((ssd - nf * (m - g) * (m - g)) / (nf - 1.0)).max(0.0))
}

/// Merges checked answers: `firsts` of the included sites, and with two passes the request
/// and their `seconds`.
pub fn combine(
    firsts: &BTreeMap<String, FeatureMap<FirstPass>>,
    second: Option<(&SecondRequest, &BTreeMap<String, FeatureMap<SecondPass>>)>,
) -> StatsResult {
    let mut result = StatsResult::default();
    let empty = BTreeMap::new();
    let default_req = SecondRequest::default();
    let (req, seconds) = second.unwrap_or((&default_req, &empty));
    // Per feature and dataset, the sums the global variance needs: Σssd, N, Σx.
    let mut var_parts: FeatureMap<(f64, u64, f64)> = FeatureMap::new();
    let mut hist_parts: FeatureMap<Vec<u64>> = FeatureMap::new();

    for (site, stats) in firsts {
        let mut own: FeatureMap<Values> = FeatureMap::new();
        for (feature, by_ds) in stats {
            for (dataset, f) in by_ds {
                let s2 = seconds
                    .get(site)
                    .and_then(|s| s.get(feature))
                    .and_then(|m| m.get(dataset));
                let g = req.means.get(feature).and_then(|m| m.get(dataset)).copied();
                let mut v = Values {
                    count: f.count,
                    failure_count: f.failure_count,
                    sum: f.sum,
                    mean: f.sum.filter(|_| f.count > 0).map(|s| s / f.count as f64),
                    min: f.min,
                    max: f.max,
                    ..Values::default()
                };
                if let (Some(ssd), Some(g)) = (s2.and_then(|s| s.sum_sq_dev), g) {
                    let sum = f.sum.unwrap_or(0.0);
                    v.var = variance(ssd, f.count, sum, g);
                    v.stddev = v.var.map(f64::sqrt);
                    let e = var_parts
                        .entry(feature.clone())
                        .or_default()
                        .entry(dataset.clone())
                        .or_default();
                    e.0 += ssd;
                    e.1 = e.1.saturating_add(f.count);
                    e.2 += sum;
                }
                if let (Some(h), Some(spec)) = (
                    s2.and_then(|s| s.histogram.as_ref()),
                    req.histograms.get(feature),
                ) {
                    v.histogram = Some(buckets(spec, h));
                    let acc = hist_parts
                        .entry(feature.clone())
                        .or_default()
                        .entry(dataset.clone())
                        .or_insert_with(|| vec![0; h.len()]);
                    for (a, c) in acc.iter_mut().zip(h) {
                        *a = a.saturating_add(*c);
                    }
                }
                own.entry(feature.clone())
                    .or_default()
                    .insert(dataset.clone(), v);
            }
        }
        result.sites.insert(site.clone(), own);
    }

    for site in result.sites.values() {
        for (feature, by_ds) in site {
            for (dataset, v) in by_ds {
                let g = result
                    .global
                    .entry(feature.clone())
                    .or_default()
                    .entry(dataset.clone())
                    .or_default();
                g.count = g.count.saturating_add(v.count);
                g.failure_count = g.failure_count.saturating_add(v.failure_count);
                if let Some(s) = v.sum {
                    g.sum = Some(g.sum.unwrap_or(0.0) + s);
                }
                g.min = match (g.min, v.min) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                g.max = match (g.max, v.max) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
        }
    }
    for (feature, by_ds) in result.global.iter_mut() {
        for (dataset, g) in by_ds.iter_mut() {
            g.mean = g.sum.filter(|_| g.count > 0).map(|s| s / g.count as f64);
            let mean0 = req.means.get(feature).and_then(|m| m.get(dataset));
            let parts = var_parts.get(feature).and_then(|m| m.get(dataset));
            if let (Some(&g0), Some(&(ssd, n, sum))) = (mean0, parts) {
                g.var = variance(ssd, n, sum, g0);
                g.stddev = g.var.map(f64::sqrt);
            }
            if let (Some(spec), Some(counts)) = (
                req.histograms.get(feature),
                hist_parts.get(feature).and_then(|m| m.get(dataset)),
            ) {
                g.histogram = Some(buckets(spec, counts));
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change to an answer, and what the refusal must say.
    type Mutation<T> = (fn(&mut T), &'static str);

    fn config() -> StatsConfig {
        serde_json::from_str(r#"{"count":{},"mean":{},"var":{},"histogram":{"*":{"bins":4}}}"#)
            .unwrap()
    }

    fn one<T>(v: T) -> FeatureMap<T> {
        BTreeMap::from([("f".to_string(), BTreeMap::from([("train".to_string(), v)]))])
    }

    /// Values 1, 2, 3, 4 and one NaN.
    fn first() -> FirstPass {
        FirstPass {
            count: 4,
            failure_count: 1,
            sum: Some(10.0),
            min: Some(1.0),
            max: Some(4.0),
        }
    }

    fn request() -> SecondRequest {
        SecondRequest {
            means: one(2.0),
            histograms: BTreeMap::from([(
                "f".to_string(),
                HistogramSpec {
                    bins: 4,
                    low: 0.0,
                    high: 4.0,
                },
            )]),
        }
    }

    /// Around the global mean 2: Σ(x − 2)² = 1 + 0 + 1 + 4.
    fn second() -> SecondPass {
        SecondPass {
            count: 4,
            failure_count: 1,
            sum_sq_dev: Some(6.0),
            histogram: Some(vec![0, 1, 1, 2]),
        }
    }

    #[test]
    fn first_pass_checks_say_why() {
        assert_eq!(check_first(&config(), &one(first())), Ok(()));
        let cases: [Mutation<FirstPass>; 8] = [
            (|s| s.count = MAX_COUNT + 1, "count"),
            (|s| s.sum = None, "sum is missing"),
            (|s| s.sum = Some(f64::NAN), "sum NaN"),
            (|s| s.min = None, "min or max is missing"),
            (|s| s.max = Some(0.5), "min 1, max 0.5"),
            (|s| s.sum = Some(100.0), "mean 25 outside [1, 4]"),
            (|s| s.max = Some(f64::INFINITY), "max inf"),
            (
                |s| {
                    s.count = 0;
                    s.sum = Some(0.0);
                },
                "min/max were not asked for",
            ),
        ];
        for (mutate, want) in cases {
            let mut s = first();
            mutate(&mut s);
            let err = check_first(&config(), &one(s)).unwrap_err().to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
        let mut named = one(first());
        named.insert(String::new(), BTreeMap::new());
        assert!(check_first(&config(), &named).is_err());
    }

    #[test]
    fn second_pass_checks_say_why() {
        let (req, f) = (request(), one(first()));
        assert_eq!(check_second(&req, &f, &one(second())), Ok(()));
        let cases: [Mutation<SecondPass>; 6] = [
            (|s| s.count = 5, "the data changed"),
            (|s| s.sum_sq_dev = Some(-1.0), "Σ(x − mean)² = -1"),
            // The site's own mean is 2.5: Σ(x − 2)² ≥ 4·0.5² = 1.
            (|s| s.sum_sq_dev = Some(0.5), "below N·(m − ḡ)²"),
            (|s| s.sum_sq_dev = None, "Σ(x − mean)² is missing"),
            (|s| s.histogram = Some(vec![1; 5]), "5 buckets, 4 asked for"),
            (|s| s.histogram = Some(vec![3, 3, 0, 0]), "holds 6 of 4"),
        ];
        for (mutate, want) in cases {
            let mut s = second();
            mutate(&mut s);
            let err = check_second(&req, &f, &one(s)).unwrap_err().to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
        let mut extra = one(second());
        extra.insert("g".into(), BTreeMap::from([("train".into(), second())]));
        let err = check_second(&req, &f, &extra).unwrap_err().to_string();
        assert!(err.contains("not in the site's first-pass answer"), "{err}");
        let mut dropped = second();
        dropped.histogram = None;
        assert_eq!(
            check_second(&req, &f, &one(dropped)),
            Ok(()),
            "a cleansed histogram"
        );
    }

    #[test]
    fn the_request_spans_the_noised_extremes_of_every_site_and_dataset() {
        let mut a = one(first());
        a.get_mut("f").unwrap().insert(
            "test".into(),
            FirstPass {
                min: Some(-3.0),
                max: Some(1.0),
                sum: Some(-2.0),
                ..first()
            },
        );
        let b = one(FirstPass {
            max: Some(9.0),
            sum: Some(20.0),
            ..first()
        });
        let firsts = BTreeMap::from([("a".to_string(), a), ("b".to_string(), b)]);
        let req = second_request(&config(), &firsts);
        assert_eq!(
            req.histograms["f"],
            HistogramSpec {
                bins: 4,
                low: -3.0,
                high: 9.0
            }
        );
        assert_eq!(req.means["f"]["train"], 30.0 / 8.0);
        assert_eq!(req.means["f"]["test"], -0.5);
        // One value everywhere: ±0.5 around it, as numpy.
        let flat = one(FirstPass {
            min: Some(2.0),
            max: Some(2.0),
            sum: Some(8.0),
            ..first()
        });
        let req = second_request(&config(), &BTreeMap::from([("a".to_string(), flat)]));
        assert_eq!(
            (req.histograms["f"].low, req.histograms["f"].high),
            (1.5, 2.5)
        );
    }

    #[test]
    fn the_variance_is_exact_for_the_sites_that_remain() {
        // Three sites; the means go out over all three, the third drops out.
        let data = [vec![1.0, 2.0, 6.0], vec![10.0, 11.0], vec![100.0, 300.0]];
        let all: Vec<f64> = data.iter().flatten().copied().collect();
        let g = all.iter().sum::<f64>() / all.len() as f64;
        let mut firsts = BTreeMap::new();
        let mut seconds = BTreeMap::new();
        for (i, xs) in data.iter().enumerate().take(2) {
            let n = xs.len() as u64;
            let sum: f64 = xs.iter().sum();
            firsts.insert(
                format!("s{i}"),
                one(FirstPass {
                    count: n,
                    failure_count: 0,
                    sum: Some(sum),
                    min: None,
                    max: None,
                }),
            );
            seconds.insert(
                format!("s{i}"),
                one(SecondPass {
                    count: n,
                    failure_count: 0,
                    sum_sq_dev: Some(xs.iter().map(|x| (x - g) * (x - g)).sum()),
                    histogram: None,
                }),
            );
        }
        let req = SecondRequest {
            means: one(g),
            histograms: BTreeMap::new(),
        };
        let r = combine(&firsts, Some((&req, &seconds)));
        let kept = [1.0, 2.0, 6.0, 10.0, 11.0];
        let m = kept.iter().sum::<f64>() / 5.0;
        let var = kept.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / 4.0;
        let got = r.global["f"]["train"].var.unwrap();
        assert!((got - var).abs() <= 1e-9 * var, "{got} vs {var}");
        assert_eq!(r.global["f"]["train"].count, 5);
        // A site's own variance: 1, 2, 6 has mean 3 and var (4 + 1 + 9) / 2.
        let own = r.sites["s0"]["f"]["train"].var.unwrap();
        assert!((own - 7.0).abs() <= 1e-9, "{own}");
    }
}
