//! A site's data for federated statistics ([`SiteData`]: feature → dataset → values, NaN
//! where one is missing): MNIST's pixel intensities and labels (FLARE's image_stats), and
//! numeric columns of a CSV file (FLARE's df_stats).

use std::path::{Path, PathBuf};

use flare_protocols::stats::SiteData;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::config::CsvStatsArgs;
use crate::data::Dataset;

/// The dataset every value belongs to unless a split says otherwise (FLARE's `train`).
pub const TRAIN: &str = "train";
/// The dataset of the rows a `test_fraction` draws.
pub const TEST: &str = "test";

/// Cells that stand for a missing value (pandas' usual ones, and FLARE's df_stats' `?`).
const MISSING: [&str; 5] = ["", "NA", "NaN", "nan", "?"];

/// Why a site's data could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The CSV is malformed (a row of the wrong length, bad UTF-8).
    #[error("{path}: {reason}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// What the reader said, with the line.
        reason: String,
    },
    /// A feature names no column of the header.
    #[error("{path}: no column {column:?} (the header has {header})")]
    NoColumn {
        /// The file.
        path: PathBuf,
        /// The feature asked for.
        column: String,
        /// The header's columns.
        header: String,
    },
    /// A feature's cell is neither a number nor a missing value.
    #[error("{path}: line {line}, column {column:?}: {value:?} is not a number")]
    NotNumber {
        /// The file.
        path: PathBuf,
        /// The line (1 is the header).
        line: u64,
        /// The column.
        column: String,
        /// The cell, cut to 64 characters.
        value: String,
    },
}

/// Site `index`'s MNIST statistics: `intensity` (every pixel of its images, 0–255) and
/// `label` (0–9), both in dataset `train`; `part` indexes its images in `train`.
pub fn mnist_site(train: &Dataset, part: &[usize]) -> SiteData {
    let mut pixels = Vec::with_capacity(part.len() * crate::data::mnist::PIXELS);
    let mut labels = Vec::with_capacity(part.len());
    for &i in part {
        pixels.extend(train.image(i).iter().map(|&p| f64::from(p)));
        labels.push(f64::from(train.labels[i]));
    }
    let mut d = SiteData::new();
    d.entry("intensity".into())
        .or_default()
        .insert(TRAIN.into(), pixels);
    d.entry("label".into())
        .or_default()
        .insert(TRAIN.into(), labels);
    d
}

/// The `features` columns of the CSV file at `path` (with a header row), in file order, NaN
/// for a missing value.
pub fn read_csv(path: &Path, features: &[String]) -> Result<Vec<Vec<f64>>, DataError> {
    let csv_err = |e: csv::Error| {
        let reason = e.to_string();
        match e.into_kind() {
            csv::ErrorKind::Io(source) => DataError::Io {
                path: path.to_path_buf(),
                source,
            },
            _ => DataError::Csv {
                path: path.to_path_buf(),
                reason,
            },
        }
    };
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(std::io::BufReader::new(file));
    let header = reader.headers().map_err(csv_err)?.clone();
    let columns = features
        .iter()
        .map(|f| {
            header
                .iter()
                .position(|h| h == f)
                .ok_or_else(|| DataError::NoColumn {
                    path: path.to_path_buf(),
                    column: f.clone(),
                    header: header.iter().collect::<Vec<_>>().join(", "),
                })
        })
        .collect::<Result<Vec<usize>, _>>()?;
    let mut out = vec![Vec::new(); features.len()];
    for row in reader.records() {
        let row = row.map_err(csv_err)?;
        let line = row.position().map_or(0, |p| p.line());
        for ((&c, f), col) in columns.iter().zip(features).zip(&mut out) {
            let cell = row.get(c).unwrap_or("");
            let v = if MISSING.contains(&cell) {
                f64::NAN
            } else {
                cell.parse::<f64>().map_err(|_| DataError::NotNumber {
                    path: path.to_path_buf(),
                    line,
                    column: f.clone(),
                    value: cell.chars().take(64).collect(),
                })?
            };
            col.push(v);
        }
    }
    Ok(out)
}

/// Site `index` of `num_sites`'s data from a CSV file: the whole file when `whole` (a file
/// of the site's own), else its contiguous block of rows; then its `test_fraction` of rows
/// in `test`, drawn with `split_seed`, the rest in `train`.
pub fn csv_site(
    path: &Path,
    a: &CsvStatsArgs,
    index: usize,
    num_sites: usize,
    whole: bool,
) -> Result<SiteData, DataError> {
    let columns = read_csv(path, &a.features)?;
    let n = columns.first().map_or(0, Vec::len);
    let rows: Vec<usize> = if whole {
        (0..n).collect()
    } else {
        let sites = num_sites.max(1);
        (index * n / sites..(index + 1) * n / sites).collect()
    };
    let mut shuffled = rows.clone();
    shuffled.shuffle(&mut ChaCha8Rng::seed_from_u64(a.split_seed));
    let n_test = (a.test_fraction * rows.len() as f64).round() as usize;
    let mut test: Vec<usize> = shuffled[..n_test.min(rows.len())].to_vec();
    test.sort_unstable();
    let mut d = SiteData::new();
    for (f, col) in a.features.iter().zip(&columns) {
        let by_ds = d.entry(f.clone()).or_default();
        let train: Vec<f64> = rows
            .iter()
            .filter(|r| test.binary_search(r).is_err())
            .map(|&r| col[r])
            .collect();
        by_ds.insert(TRAIN.into(), train);
        if n_test > 0 {
            by_ds.insert(TEST.into(), test.iter().map(|&r| col[r]).collect());
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(features: &[&str], test_fraction: f64) -> CsvStatsArgs {
        CsvStatsArgs {
            data_path: String::new(),
            features: features.iter().map(|s| s.to_string()).collect(),
            test_fraction,
            split_seed: 3,
        }
    }

    #[test]
    fn csv_columns_are_split_across_sites_by_index() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        let mut text = String::from("a, b ,name\n");
        for i in 0..10 {
            let b = if i == 4 {
                "?".to_string()
            } else {
                format!("{}", i * 2)
            };
            text.push_str(&format!("{i}.5,{b},row{i}\n"));
        }
        std::fs::write(&p, text).unwrap();
        let a = args(&["b", "a"], 0.0);
        let sites: Vec<SiteData> = (0..3)
            .map(|i| csv_site(&p, &a, i, 3, false).unwrap())
            .collect();
        let a_of = |s: &SiteData| s["a"][TRAIN].clone();
        assert_eq!(a_of(&sites[0]), vec![0.5, 1.5, 2.5]);
        assert_eq!(a_of(&sites[1]), vec![3.5, 4.5, 5.5]);
        assert_eq!(a_of(&sites[2]), vec![6.5, 7.5, 8.5, 9.5]);
        assert!(sites[1]["b"][TRAIN][1].is_nan(), "`?` is a missing value");
        let whole = csv_site(&p, &a, 1, 3, true).unwrap();
        assert_eq!(whole["a"][TRAIN].len(), 10);

        let split = csv_site(&p, &args(&["a"], 0.3), 0, 1, false).unwrap();
        let (train, test) = (&split["a"][TRAIN], &split["a"][TEST]);
        assert_eq!((train.len(), test.len()), (7, 3));
        let mut all: Vec<f64> = train.iter().chain(test).copied().collect();
        all.sort_by(f64::total_cmp);
        assert_eq!(all, (0..10).map(|i| i as f64 + 0.5).collect::<Vec<_>>());
        assert_eq!(
            split,
            csv_site(&p, &args(&["a"], 0.3), 0, 1, false).unwrap()
        );
    }

    #[test]
    fn bad_csv_files_name_the_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.csv");
        for (text, feature, want) in [
            (
                "a,b\n1,2\n3,x\n",
                "b",
                "line 3, column \"b\": \"x\" is not a number",
            ),
            ("a,b\n1,2\n", "c", "no column \"c\" (the header has a, b)"),
            ("a,b\n1,2\n3\n", "a", "bad.csv"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = read_csv(&p, &[feature.to_string()])
                .unwrap_err()
                .to_string();
            assert!(e.contains("bad.csv") && e.contains(want), "{text:?}: {e}");
        }
        let e = read_csv(&dir.path().join("none.csv"), &["a".into()]).unwrap_err();
        assert!(e.to_string().contains("none.csv"), "{e}");
    }

    #[test]
    fn mnist_sites_hold_their_pixels_and_labels() {
        let ds = Dataset {
            images: (0..3 * crate::data::mnist::PIXELS)
                .map(|i| (i % 256) as u8)
                .collect(),
            labels: vec![7, 2, 1],
        };
        let d = mnist_site(&ds, &[2, 0]);
        assert_eq!(d["label"][TRAIN], vec![1.0, 7.0]);
        let px = &d["intensity"][TRAIN];
        assert_eq!(px.len(), 2 * crate::data::mnist::PIXELS);
        assert_eq!(px[0], f64::from(ds.image(2)[0]));
    }
}
