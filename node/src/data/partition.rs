//! Seeded partitions of a training set across sites: uniform, or label-skewed by
//! Dirichlet(α) as in the federated-learning literature.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

/// How to split a training set across sites.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Partition {
    /// Shuffled, then cut into near-equal parts.
    #[default]
    Uniform,
    /// For each class, the share of every site is drawn from Dirichlet(α): small α gives
    /// sites few classes, large α approaches uniform.
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
}

impl Partition {
    /// The indices of `labels` that each of `sites` sites receives; every index goes to exactly
    /// one site, and the same seed always gives the same result.
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
                let gamma = Gamma::new(alpha, 1.0).map_err(|_| PartitionError::BadAlpha(alpha))?;
                if !(alpha.is_finite() && alpha > 0.0) {
                    return Err(PartitionError::BadAlpha(alpha));
                }
                let classes = labels
                    .iter()
                    .map(|&l| usize::from(l) + 1)
                    .max()
                    .unwrap_or(0);
                for class in 0..classes {
                    let mut idx: Vec<usize> = (0..labels.len())
                        .filter(|&i| usize::from(labels[i]) == class)
                        .collect();
                    idx.shuffle(&mut rng);
                    let draws: Vec<f64> = (0..sites).map(|_| gamma.sample(&mut rng)).collect();
                    let total: f64 = draws.iter().sum();
                    // Cumulative cut points; the last site takes the rounding remainder.
                    let mut start = 0usize;
                    let mut acc = 0.0;
                    for (s, d) in draws.iter().enumerate() {
                        acc += d;
                        let end = if s + 1 == sites || total <= 0.0 {
                            idx.len()
                        } else {
                            ((acc / total) * idx.len() as f64).round() as usize
                        }
                        .clamp(start, idx.len());
                        parts[s].extend_from_slice(&idx[start..end]);
                        start = end;
                    }
                }
                for p in &mut parts {
                    p.sort_unstable();
                }
            }
        }
        Ok(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<u8> {
        (0..1000).map(|i| (i % 10) as u8).collect()
    }

    fn assert_cover(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
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
    fn small_alpha_skews_labels() {
        let l = labels();
        let skewed = Partition::Dirichlet { alpha: 0.1 }.split(&l, 5, 1).unwrap();
        let even = Partition::Dirichlet { alpha: 1000.0 }
            .split(&l, 5, 1)
            .unwrap();
        assert_cover(&skewed, 1000);
        assert_cover(&even, 1000);
        // Count, per site, how many classes hold at least 10% of that class's examples.
        let classes_present = |parts: &[Vec<usize>]| -> usize {
            parts
                .iter()
                .map(|p| {
                    (0..10u8)
                        .filter(|c| p.iter().filter(|&&i| l[i] == *c).count() >= 10)
                        .count()
                })
                .sum()
        };
        assert_eq!(classes_present(&even), 50);
        assert!(
            classes_present(&skewed) < 30,
            "{}",
            classes_present(&skewed)
        );
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert_eq!(
            Partition::Uniform.split(&labels(), 0, 1),
            Err(PartitionError::NoSites)
        );
        for alpha in [0.0, -1.0, f64::NAN] {
            assert!(matches!(
                Partition::Dirichlet { alpha }.split(&labels(), 2, 1),
                Err(PartitionError::BadAlpha(_))
            ));
        }
    }
}
