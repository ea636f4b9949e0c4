//! Per-site label histograms of a partition, written as `label_histograms.json` so a run
//! records how skewed its sites' data were (FLARE writes the same counts to its split's
//! `summary.txt`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Label counts per site, keyed by site name; the contents of `label_histograms.json`.
///
/// Serialised as a plain JSON object, `{"site-1": [c0, c1, ...], "site-2": [...]}`, where
/// `c_k` counts the site's samples of class `k`. Unlike FLARE's sparse `{site: {class:
/// count}}`, every list is dense and has one entry per class of the whole training set, so
/// the lists line up and a missing class reads as 0. Keys are in string order ("site-10"
/// sorts before "site-2").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LabelHistograms(pub BTreeMap<String, Vec<usize>>);

/// How many of `indices` carry each label: entry `k` counts label `k`.
///
/// The result has `classes` entries, more if some label is `classes` or above (no sample is
/// dropped). Indices past the end of `labels` name no sample and are skipped.
pub fn label_histogram(labels: &[u8], indices: &[usize], classes: usize) -> Vec<usize> {
    let mut counts = vec![0; classes];
    for label in indices.iter().filter_map(|&i| labels.get(i)) {
        let k = usize::from(*label);
        if k >= counts.len() {
            counts.resize(k + 1, 0);
        }
        counts[k] += 1;
    }
    counts
}

/// The label histogram of every site of a partition (the output of
/// [`Partition::split`](super::Partition::split) over the same `labels`).
///
/// `names[i]` names `parts[i]`; a part without a name is called `site-{i+1}`, FLARE's and the
/// simulator's naming, so `&[]` names them all that way. Names beyond the parts are ignored.
/// Every histogram has one entry per class `0..=max(labels)`.
pub fn site_histograms(labels: &[u8], parts: &[Vec<usize>], names: &[String]) -> LabelHistograms {
    let classes = labels
        .iter()
        .map(|&l| usize::from(l) + 1)
        .max()
        .unwrap_or(0);
    LabelHistograms(
        parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let name = names
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("site-{}", i + 1));
                (name, label_histogram(labels, part, classes))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_labels_of_the_given_indices() {
        let labels = [0, 1, 1, 2, 2, 2, 4];
        assert_eq!(
            label_histogram(&labels, &[1, 2, 3, 6], 5),
            vec![0, 2, 1, 0, 1]
        );
        assert_eq!(label_histogram(&labels, &[], 3), vec![0, 0, 0]);
        // A label past `classes` grows the histogram; an index past the labels is skipped.
        assert_eq!(label_histogram(&labels, &[6, 99], 2), vec![0, 0, 0, 0, 1]);
    }

    #[test]
    fn site_histograms_serialise_as_named_dense_lists() {
        let labels = [0, 1, 1, 2, 0, 0];
        let parts = vec![vec![0, 4, 5], vec![1, 2], vec![3]];
        let names = vec!["alpha".to_string(), "beta".to_string()];
        let h = site_histograms(&labels, &parts, &names);
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"alpha":[3,0,0],"beta":[0,2,0],"site-3":[0,0,1]}"#
        );
        let back: LabelHistograms =
            serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
        assert_eq!(back, h);
        let default = site_histograms(&labels, &parts, &[]);
        assert_eq!(
            default.0.keys().collect::<Vec<_>>(),
            ["site-1", "site-2", "site-3"]
        );
    }
}
