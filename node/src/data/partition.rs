//! Seeded partitions of a training set across sites: uniform, geometric, or label-skewed by
//! Dirichlet(α) with FLARE's algorithm.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

/// The fewest samples a site may hold after a Dirichlet split (FLARE's `min_size < 10`).
pub const DIRICHLET_MIN_SITE_SIZE: usize = 10;

/// How many whole Dirichlet splits are drawn before giving up on
/// [`DIRICHLET_MIN_SITE_SIZE`]; FLARE has no cap and loops forever instead.
pub const DIRICHLET_MAX_DRAWS: usize = 1000;

/// How to split a training set across sites.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Partition {
    /// Shuffled, then cut into near-equal parts.
    #[default]
    Uniform,
    /// Label skew by FLARE's Dirichlet split (`cifar10_data_split.py`, from FedMA): small α
    /// gives sites few classes, large α approaches uniform.
    ///
    /// For each class k in turn: shuffle the class's indices, draw `p ~ Dir(α·1_sites)`, zero
    /// `p_j` for every site that already holds at least `N / sites` samples (the *balance
    /// rule*), renormalise, and cut the class at `floor(cumsum(p) · n_k)`. The whole split is
    /// drawn again until every site holds at least [`DIRICHLET_MIN_SITE_SIZE`] samples.
    ///
    /// The algorithm is FLARE's; the random stream is ours: ChaCha8 seeded from `seed`, with
    /// Dir(α) sampled as normalised Gamma(α, 1) draws. numpy's Mersenne Twister cannot be
    /// reproduced, so the same α and seed give a different split than FLARE's `seed=0`, with the
    /// same distribution. Where FLARE is undefined or unbounded we differ, deliberately:
    /// - when every eligible site's share underflows to 0 (FLARE divides 0 by 0), the class is
    ///   shared equally among the eligible sites, so the balance rule still holds;
    /// - cut points after the last site with a positive share are the class size exactly, so
    ///   a site the balance rule excluded never picks up a sample through rounding in `cumsum`;
    /// - after [`DIRICHLET_MAX_DRAWS`] failed draws, or at once when there are fewer than
    ///   `DIRICHLET_MIN_SITE_SIZE · sites` samples, the split is an error, not an endless loop;
    /// - each site's indices are returned sorted (FLARE shuffles them).
    ///
    /// Classes are `0..=max(label)`, like FLARE's `range(K)`.
    Dirichlet {
        /// Concentration; must be positive.
        alpha: f64,
    },
    /// Shuffled, then cut into parts of very unequal size: site `i`'s share is proportional to
    /// `ratio^(i mod period)` (with ratio 10 and period 3, sizes go 1 : 10 : 100 and repeat),
    /// for tests and studies of weighting.
    Geometric {
        /// Size ratio between neighbouring sites of a period; must be positive.
        ratio: f64,
        /// Sites per period; must be at least 1.
        period: u32,
    },
}

/// Why a partition could not be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PartitionError {
    /// No sites to partition across.
    #[error("cannot partition across 0 sites")]
    NoSites,
    /// α is not a positive finite number.
    #[error("dirichlet alpha must be positive, got {0}")]
    BadAlpha(f64),
    /// The geometric ratio is not positive or the period is zero.
    #[error(
        "geometric partition needs a positive ratio and a period of at least 1, got ratio {ratio} and period {period}"
    )]
    BadGeometric {
        /// The ratio.
        ratio: f64,
        /// The period.
        period: u32,
    },
    /// Too few samples for every site to get the Dirichlet split's minimum, whatever the draw.
    #[error(
        "dirichlet partition needs at least {min} samples per site: {samples} samples cannot cover {sites} sites"
    )]
    TooFewSamples {
        /// Samples in the training set.
        samples: usize,
        /// Sites asked for.
        sites: usize,
        /// The minimum per site, [`DIRICHLET_MIN_SITE_SIZE`].
        min: usize,
    },
    /// No Dirichlet draw within the cap gave every site the minimum: α is too small for this
    /// many sites and classes (with α → 0 each class goes to about one site, so fewer classes
    /// than sites cannot work).
    #[error(
        "dirichlet partition (alpha {alpha}) could not give each of {sites} sites at least {min} samples (of {samples}) in {draws} draws; use a larger alpha or fewer sites"
    )]
    MinSizeNotReached {
        /// The concentration asked for.
        alpha: f64,
        /// Samples in the training set.
        samples: usize,
        /// Sites asked for.
        sites: usize,
        /// The minimum per site, [`DIRICHLET_MIN_SITE_SIZE`].
        min: usize,
        /// Whole splits drawn, [`DIRICHLET_MAX_DRAWS`].
        draws: usize,
    },
}

impl Partition {
    /// The indices of `labels` that each of `sites` sites receives; every index goes to exactly
    /// one site, and the same seed always gives the same result. Geometric and Dirichlet parts
    /// are sorted; a Dirichlet split also fails when it cannot give every site
    /// [`DIRICHLET_MIN_SITE_SIZE`] samples.
    pub fn split(
        self,
        labels: &[u8],
        sites: usize,
        seed: u64,
    ) -> Result<Vec<Vec<usize>>, PartitionError> {
        if sites == 0 {
            return Err(PartitionError::NoSites);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut parts = vec![Vec::new(); sites];
        match self {
            Partition::Uniform => {
                let mut idx: Vec<usize> = (0..labels.len()).collect();
                idx.shuffle(&mut rng);
                for (k, i) in idx.into_iter().enumerate() {
                    parts[k % sites].push(i);
                }
            }
            Partition::Geometric { ratio, period } => {
                if !(ratio.is_finite() && ratio > 0.0) || period == 0 {
                    return Err(PartitionError::BadGeometric { ratio, period });
                }
                let mut idx: Vec<usize> = (0..labels.len()).collect();
                idx.shuffle(&mut rng);
                let shares: Vec<f64> = (0..sites)
                    .map(|i| ratio.powi((i % period as usize) as i32))
                    .collect();
                let total: f64 = shares.iter().sum();
                let (mut start, mut acc) = (0usize, 0.0);
                for (s, share) in shares.iter().enumerate() {
                    acc += share;
                    let end = if s + 1 == sites {
                        idx.len()
                    } else {
                        ((acc / total) * idx.len() as f64).round() as usize
                    }
                    .clamp(start, idx.len());
                    parts[s] = idx[start..end].to_vec();
                    parts[s].sort_unstable();
                    start = end;
                }
            }
            Partition::Dirichlet { alpha } => {
                parts = dirichlet(labels, sites, alpha, &mut rng)?;
            }
        }
        Ok(parts)
    }
}

/// FLARE's Dirichlet split (see [`Partition::Dirichlet`]): whole splits are drawn until every
/// site holds at least [`DIRICHLET_MIN_SITE_SIZE`] samples, at most [`DIRICHLET_MAX_DRAWS`]
/// times.
fn dirichlet(
    labels: &[u8],
    sites: usize,
    alpha: f64,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(PartitionError::BadAlpha(alpha));
    }
    let gamma = Gamma::new(alpha, 1.0).map_err(|_| PartitionError::BadAlpha(alpha))?;
    let samples = labels.len();
    if samples < sites.saturating_mul(DIRICHLET_MIN_SITE_SIZE) {
        return Err(PartitionError::TooFewSamples {
            samples,
            sites,
            min: DIRICHLET_MIN_SITE_SIZE,
        });
    }
    // np.where(labels == k) for every class, in index order.
    let classes = labels
        .iter()
        .map(|&l| usize::from(l) + 1)
        .max()
        .unwrap_or(0);
    let mut by_class = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[usize::from(l)].push(i);
    }
    for _ in 0..DIRICHLET_MAX_DRAWS {
        let parts = dirichlet_draw(&by_class, samples, sites, &gamma, rng);
        if parts.iter().all(|p| p.len() >= DIRICHLET_MIN_SITE_SIZE) {
            return Ok(parts);
        }
    }
    Err(PartitionError::MinSizeNotReached {
        alpha,
        samples,
        sites,
        min: DIRICHLET_MIN_SITE_SIZE,
        draws: DIRICHLET_MAX_DRAWS,
    })
}

/// One pass of FLARE's `while min_size < 10` loop: every class is shuffled and cut across
/// the sites by a fresh Dir(α) draw under the balance rule. Each site's indices come back
/// sorted.
fn dirichlet_draw(
    by_class: &[Vec<usize>],
    samples: usize,
    sites: usize,
    gamma: &Gamma<f64>,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let mut parts: Vec<Vec<usize>> = vec![Vec::new(); sites];
    let mut idx = Vec::new();
    let mut draws = vec![0.0; sites];
    let mut open = vec![false; sites];
    for class in by_class {
        idx.clone_from(class);
        idx.shuffle(rng);
        for d in &mut draws {
            *d = gamma.sample(rng);
        }
        // The balance rule, `len(idx_j) < N / num_sites`, in exact integer arithmetic.
        for (o, site) in open.iter_mut().zip(&parts) {
            *o = (site.len() as u128) * (sites as u128) < samples as u128;
        }
        let p = shares(&draws, &open);
        let mut start = 0;
        for (site, end) in parts.iter_mut().zip(cut_ends(&p, idx.len())) {
            site.extend_from_slice(&idx[start..end]);
            start = end;
        }
    }
    for site in &mut parts {
        site.sort_unstable();
    }
    parts
}

/// Every site's share of a class: the Gamma `draws` normalised (a Dir(α) draw), zeroed where
/// the site is not `open` under the balance rule, and normalised again.
///
/// When every open site's share is 0 (its draws underflowed; FLARE would divide 0 by 0), the
/// open sites share equally, so the balance rule still holds. Some site is open whenever
/// samples remain to be placed, since the sites then hold fewer than N together; if none is
/// (the class must be empty), all sites share equally.
fn shares(draws: &[f64], open: &[bool]) -> Vec<f64> {
    let total: f64 = draws.iter().sum();
    let mut p: Vec<f64> = draws
        .iter()
        .zip(open)
        .map(|(d, &o)| if o { d / total } else { 0.0 })
        .collect();
    let kept: f64 = p.iter().sum();
    if kept > 0.0 && kept.is_finite() {
        p.iter_mut().for_each(|pj| *pj /= kept);
    } else {
        let count = open.iter().filter(|&&o| o).count();
        for (pj, &o) in p.iter_mut().zip(open) {
            *pj = match count {
                0 => 1.0 / open.len() as f64,
                _ if o => 1.0 / count as f64,
                _ => 0.0,
            };
        }
    }
    p
}

/// Where each site's slice of a shuffled class of `n` ends: `floor(cumsum(p) · n)`, FLARE's
/// cut points, except that from the last site with a positive share on it is `n` exactly, so
/// rounding in the sum never hands a zero-share site a sample. The last site always ends at
/// `n` (np.split's final piece), so no sample is ever lost.
fn cut_ends(p: &[f64], n: usize) -> Vec<usize> {
    let last = p
        .iter()
        .rposition(|&pj| pj > 0.0)
        .unwrap_or(p.len().saturating_sub(1));
    let (mut prev, mut acc) = (0, 0.0);
    p.iter()
        .enumerate()
        .map(|(j, pj)| {
            acc += pj;
            prev = if j >= last {
                n
            } else {
                ((acc * n as f64) as usize).clamp(prev, n)
            };
            prev
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;
    use rand::Rng;

    use super::*;
    use crate::data::{Dataset, label_histogram};

    fn labels() -> Vec<u8> {
        (0..1000).map(|i| (i % 10) as u8).collect()
    }

    /// `per_class[k]` samples of class k, interleaved.
    fn labels_with(per_class: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        for round in 0..per_class.iter().copied().max().unwrap_or(0) {
            for (k, &n) in per_class.iter().enumerate() {
                if round < n {
                    out.push(k as u8);
                }
            }
        }
        out
    }

    fn assert_cover(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    /// The bound the balance rule guarantees: a site receives samples of class k only while
    /// it holds fewer than N/sites, so it ends below N/sites plus the largest class.
    fn assert_balanced(labels: &[u8], parts: &[Vec<usize>]) {
        let n = labels.len();
        let largest = label_histogram(labels, &(0..n).collect::<Vec<_>>(), 0)
            .into_iter()
            .max()
            .unwrap_or(0);
        let sites = parts.len();
        for p in parts {
            assert!(
                p.len() * sites < n + sites * largest,
                "site of {} > {n}/{sites} + {largest}",
                p.len()
            );
        }
    }

    fn dirichlet(alpha: f64, labels: &[u8], sites: usize, seed: u64) -> Vec<Vec<usize>> {
        let parts = Partition::Dirichlet { alpha }
            .split(labels, sites, seed)
            .unwrap();
        assert_cover(&parts, labels.len());
        assert!(parts.iter().all(|p| p.is_sorted()));
        parts
    }

    /// Share of a site's samples in its `top` largest classes.
    fn top_share(labels: &[u8], part: &[usize], top: usize) -> f64 {
        let mut h = label_histogram(labels, part, 0);
        h.sort_unstable_by(|a, b| b.cmp(a));
        h.iter().take(top).sum::<usize>() as f64 / part.len() as f64
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// With at least as many classes as sites and 20+ samples a site, FLARE's split always
        /// succeeds (none of 18,000 random cases failed when this was written); with fewer
        /// classes than sites a small α cannot work, see `too_few_samples_is_an_error_not_a_hang`.
        #[test]
        fn dirichlet_is_a_seeded_partition_with_a_minimum_size(
            alpha in 0.05f64..=10.0,
            sites in 2usize..=12,
            extra_classes in 0usize..=10,
            per_site in 20usize..=60,
            label_seed: u64,
            seed: u64,
        ) {
            let classes = sites + extra_classes;
            let mut rng = ChaCha8Rng::seed_from_u64(label_seed);
            let labels: Vec<u8> =
                (0..sites * per_site).map(|_| rng.random_range(0..classes) as u8).collect();
            let parts = dirichlet(alpha, &labels, sites, seed);
            prop_assert_eq!(parts.len(), sites);
            prop_assert!(parts.iter().all(|p| p.len() >= DIRICHLET_MIN_SITE_SIZE));
            assert_balanced(&labels, &parts);
            prop_assert_eq!(&parts, &dirichlet(alpha, &labels, sites, seed));
        }
    }

    #[test]
    fn large_alpha_gives_near_uniform_class_histograms() {
        let l = labels_with(&[500; 10]);
        for seed in 0..5 {
            for p in dirichlet(100.0, &l, 8, seed) {
                let mean = p.len() as f64 / 10.0;
                for c in label_histogram(&l, &p, 10) {
                    assert!(
                        (c as f64 - mean).abs() <= 0.4 * mean,
                        "seed {seed}: class count {c}, site mean {mean}"
                    );
                }
                assert!(top_share(&l, &p, 3) < 0.4);
            }
        }
    }

    #[test]
    fn small_alpha_leaves_sites_dominated_by_few_classes() {
        let l = labels_with(&[500; 10]);
        for seed in 0..10 {
            let parts = dirichlet(0.1, &l, 8, seed);
            let dominated = parts.iter().filter(|p| top_share(&l, p, 3) >= 0.8).count();
            assert!(dominated >= 6, "seed {seed}: only {dominated} of 8 sites");
        }
    }

    #[test]
    fn the_balance_rule_bounds_site_sizes() {
        // Unequal classes and a small α: without the rule a site would often collect several
        // whole classes.
        let l = labels_with(&[100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]);
        let mut biggest = 0;
        for seed in 0..50 {
            let parts = dirichlet(0.05, &l, 8, seed);
            assert_balanced(&l, &parts);
            biggest = biggest.max(parts.iter().map(Vec::len).max().unwrap_or(0));
        }
        // The rule caps sites softly: some do exceed N/sites, so the check above is not idle.
        assert!(biggest > l.len() / 8, "{biggest}");
    }

    #[test]
    fn too_few_samples_is_an_error_not_a_hang() {
        let few = labels_with(&[20; 6]);
        assert_eq!(
            Partition::Dirichlet { alpha: 0.5 }.split(&few, 13, 1),
            Err(PartitionError::TooFewSamples {
                samples: 120,
                sites: 13,
                min: DIRICHLET_MIN_SITE_SIZE
            })
        );
        assert!(matches!(
            Partition::Dirichlet { alpha: 0.5 }.split(&[], 1, 1),
            Err(PartitionError::TooFewSamples { samples: 0, .. })
        ));
        // Enough samples in total, but one class and a tiny α: each draw gives nearly all of
        // it to one site, so the capped redraws run out.
        let one_class = vec![0u8; 1000];
        let err = Partition::Dirichlet { alpha: 0.05 }
            .split(&one_class, 12, 1)
            .unwrap_err();
        assert!(
            matches!(
                err,
                PartitionError::MinSizeNotReached {
                    draws: DIRICHLET_MAX_DRAWS,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("at least 10"), "{err}");
    }

    #[test]
    fn splits_the_vendored_mnist_as_the_example_jobs_do() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
        let (train, _) = Dataset::load_mnist_test(&dir).unwrap().split(2_000, 0);
        for (alpha, sites) in [(0.5, 4), (0.1, 8), (1.0, 8)] {
            let parts = dirichlet(alpha, &train.labels, sites, 0);
            assert!(parts.iter().all(|p| p.len() >= DIRICHLET_MIN_SITE_SIZE));
            assert_balanced(&train.labels, &parts);
        }
    }

    #[test]
    fn shares_zero_full_sites_and_fall_back_to_equal_open_shares() {
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        let p = shares(&[1.0, 5.0, 2.0], &[true, false, true]);
        assert!(close(&p, &[1.0 / 3.0, 0.0, 2.0 / 3.0]), "{p:?}");
        // The open sites' draws underflowed: they share equally, the full site gets nothing.
        assert_eq!(
            shares(&[0.0, 0.0, 5.0], &[true, true, false]),
            [0.5, 0.5, 0.0]
        );
        // Every draw underflowed (0 / 0 in FLARE).
        assert_eq!(shares(&[0.0, 0.0], &[false, true]), [0.0, 1.0]);
        // No open site: only for an empty class.
        assert_eq!(shares(&[1.0, 3.0], &[false, false]), [0.5, 0.5]);
    }

    #[test]
    fn cut_points_floor_the_cumulative_shares_and_skip_zero_shares() {
        assert_eq!(cut_ends(&[0.25, 0.0, 0.5, 0.25], 10), [2, 2, 7, 10]);
        // These shares sum to 0.9999999999999999: FLARE's floor(cumsum · 10) would give the
        // last, zero-share site one sample.
        let p = [
            0.9414746821824703,
            0.03194898747681001,
            0.02657633034071963,
            0.0,
        ];
        assert!(p.iter().sum::<f64>() < 1.0);
        assert_eq!(cut_ends(&p, 10), [9, 9, 10, 10]);
        assert_eq!(cut_ends(&[0.5, 0.5], 0), [0, 0]);
        assert_eq!(cut_ends(&[0.0, 0.0], 5), [0, 5]);
    }

    #[test]
    fn geometric_sizes_follow_the_ratio_and_cover_everything() {
        let p = Partition::Geometric {
            ratio: 10.0,
            period: 3,
        };
        let parts = p.split(&labels(), 6, 1).unwrap();
        assert_cover(&parts, 1000);
        let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![5, 45, 450, 5, 45, 450]);
        let bad = Partition::Geometric {
            ratio: 0.0,
            period: 3,
        };
        assert!(matches!(
            bad.split(&labels(), 2, 0),
            Err(PartitionError::BadGeometric { .. })
        ));
    }

    #[test]
    fn uniform_is_balanced_and_covers_everything() {
        let parts = Partition::Uniform.split(&labels(), 3, 7).unwrap();
        assert_cover(&parts, 1000);
        let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![334, 333, 333]);
        assert_eq!(parts, Partition::Uniform.split(&labels(), 3, 7).unwrap());
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert_eq!(
            Partition::Uniform.split(&labels(), 0, 1),
            Err(PartitionError::NoSites)
        );
        for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                Partition::Dirichlet { alpha }.split(&labels(), 2, 1),
                Err(PartitionError::BadAlpha(_))
            ));
        }
    }
}
