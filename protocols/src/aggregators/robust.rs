//! Byzantine-robust aggregation rules, after Flower's `FedMedian`, `FedTrimmedAvg`, `Krum`,
//! `MultiKrum` and `Bulyan`. They need every result of a round at once (a median or a Krum
//! score cannot be streamed), so they work on the results' values as `f64` rows: one row per
//! result, one column per coordinate of a tensor.
//!
//! Coordinate rules (median, trimmed mean, Bulyan's second step) are unweighted, as in
//! Flower. Krum's selection is unweighted; MultiKrum averages the selected results weighted
//! by their aggregation weight, as Flower's `aggregate_krum` does.

/// Why a robust rule cannot aggregate this round's results.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RobustError {
    /// Bulyan's resilience condition `n >= 4f + 3` does not hold.
    #[error(
        "Bulyan with num_malicious_nodes = {f} needs at least {needed} results (4f + 3), got {n}"
    )]
    BulyanTooFew {
        /// Results in the round.
        n: usize,
        /// Malicious results tolerated.
        f: usize,
        /// `4f + 3`.
        needed: usize,
    },
    /// The trimmed mean would cut every result.
    #[error(
        "trimmed mean with beta = {beta} cuts {cut} results from each end of {n}: nothing is left"
    )]
    TrimsEverything {
        /// Results in the round.
        n: usize,
        /// The fraction cut from each tail.
        beta: f64,
        /// Results cut from each tail.
        cut: usize,
    },
    /// MultiKrum was asked to keep more results than the round has.
    #[error("MultiKrum keeps {keep} results, but the round has {n}")]
    KeepsTooMany {
        /// Results in the round.
        n: usize,
        /// Results to keep.
        keep: usize,
    },
}

/// The median of `v` (sorted in place); the mean of the two middle values for an even count,
/// as numpy's `median`. `v` must not be empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Results cut from each tail by a trimmed mean of `n` values with fraction `beta`
/// (Flower's `int(beta * n)`).
pub fn trim_count(n: usize, beta: f64) -> Result<usize, RobustError> {
    let cut = (beta * n as f64).floor() as usize;
    if 2 * cut >= n {
        return Err(RobustError::TrimsEverything { n, beta, cut });
    }
    Ok(cut)
}

/// The mean of `v` (sorted in place) without its `cut` smallest and `cut` largest values.
pub fn trimmed_mean(v: &mut [f64], cut: usize) -> f64 {
    v.sort_by(f64::total_cmp);
    let kept = &v[cut..v.len() - cut];
    kept.iter().sum::<f64>() / kept.len() as f64
}

/// The mean of the `beta` values of `v` closest to its median (Bulyan's second step).
pub fn mean_closest_to_median(v: &mut [f64], beta: usize) -> f64 {
    let m = median(v);
    v.sort_by(|a, b| (a - m).abs().total_cmp(&(b - m).abs()));
    let kept = &v[..beta.clamp(1, v.len())];
    kept.iter().sum::<f64>() / kept.len() as f64
}

/// Krum scores from the squared pairwise distances `d` (`d[i][j]`, symmetric): result `i`'s
/// score is the sum of its distances to its `max(1, n - f - 2)` nearest other results.
pub fn krum_scores(d: &[Vec<f64>], f: usize) -> Vec<f64> {
    let n = d.len();
    let closest = n.saturating_sub(f + 2).max(1);
    (0..n)
        .map(|i| {
            let mut others: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d[i][j]).collect();
            others.sort_by(f64::total_cmp);
            others.iter().take(closest).sum()
        })
        .collect()
}

/// The indices of the `keep` lowest Krum scores among the results `among` (ties go to the
/// lower index), computed on the distances between those results only.
pub fn krum_select(d: &[Vec<f64>], among: &[usize], f: usize, keep: usize) -> Vec<usize> {
    let sub: Vec<Vec<f64>> = among
        .iter()
        .map(|&i| among.iter().map(|&j| d[i][j]).collect())
        .collect();
    let scores = krum_scores(&sub, f);
    let mut order: Vec<usize> = (0..among.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.into_iter().take(keep).map(|k| among[k]).collect()
}

/// Bulyan's selection: `n - 2f` results, each the Krum choice among those not yet chosen.
pub fn bulyan_select(d: &[Vec<f64>], f: usize) -> Result<Vec<usize>, RobustError> {
    let n = d.len();
    let needed = 4 * f + 3;
    if n < needed {
        return Err(RobustError::BulyanTooFew { n, f, needed });
    }
    let mut left: Vec<usize> = (0..n).collect();
    let mut chosen = Vec::with_capacity(n - 2 * f);
    while chosen.len() < n - 2 * f {
        let pick = krum_select(d, &left, f, 1)[0];
        left.retain(|&i| i != pick);
        chosen.push(pick);
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dist(points: &[f64]) -> Vec<Vec<f64>> {
        points
            .iter()
            .map(|a| points.iter().map(|b| (a - b) * (a - b)).collect())
            .collect()
    }

    #[test]
    fn the_median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, -1.0, 10.0]), 3.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 100.0]), 3.5);
    }

    #[test]
    fn the_trimmed_mean_cuts_each_tail() {
        // beta 0.2 of 5 cuts one from each end: mean of 2, 3, 4.
        let cut = trim_count(5, 0.2).unwrap();
        assert_eq!(cut, 1);
        assert_eq!(trimmed_mean(&mut [100.0, 2.0, 3.0, 4.0, -50.0], cut), 3.0);
        assert_eq!(
            trim_count(4, 0.5),
            Err(RobustError::TrimsEverything {
                n: 4,
                beta: 0.5,
                cut: 2
            })
        );
    }

    #[test]
    fn krum_scores_sum_the_nearest_distances() {
        // Points 0, 1, 2, 10 with f = 1: each sums its n - f - 2 = 1 nearest squared distance.
        let d = dist(&[0.0, 1.0, 2.0, 10.0]);
        assert_eq!(krum_scores(&d, 1), vec![1.0, 1.0, 1.0, 64.0]);
        // f = 0: the two nearest.
        assert_eq!(krum_scores(&d, 0), vec![5.0, 2.0, 5.0, 145.0]);
        assert_eq!(krum_select(&d, &[0, 1, 2, 3], 0, 1), vec![1]);
        assert_eq!(krum_select(&d, &[0, 1, 2, 3], 0, 3), vec![1, 0, 2]);
    }

    #[test]
    fn bulyan_refuses_too_few_results_and_drops_the_outlier() {
        let d = dist(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1000.0]);
        assert_eq!(
            bulyan_select(
                &d[..6].iter().map(|r| r[..6].to_vec()).collect::<Vec<_>>(),
                1
            ),
            Err(RobustError::BulyanTooFew {
                n: 6,
                f: 1,
                needed: 7
            })
        );
        let chosen = bulyan_select(&d, 1).unwrap();
        assert_eq!(chosen.len(), 5);
        assert!(!chosen.contains(&6), "{chosen:?}");
        // Of 1, 2, 3, 4, 5 (median 3), the beta = 5 - 2 = 3 closest are 2, 3, 4.
        assert_eq!(
            mean_closest_to_median(&mut [1.0, 2.0, 3.0, 4.0, 5.0], 3),
            3.0
        );
    }
}
