//! MNIST in its original IDX format (optionally gzipped), read without a helper crate: the
//! format is two big-endian headers and raw bytes, and no maintained crate reads it offline.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// Pixels per image (28 × 28).
pub const PIXELS: usize = 28 * 28;
/// Number of classes.
pub const CLASSES: usize = 10;
/// Largest number of items accepted from one IDX file.
const MAX_ITEMS: usize = 1_000_000;

/// Why a data set could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MnistError {
    /// Neither `<name>` nor `<name>.gz` exists in the folder.
    #[error("{dir}: neither {name} nor {name}.gz found")]
    Missing {
        /// The data folder.
        dir: PathBuf,
        /// The file looked for.
        name: String,
    },
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not the IDX file it should be.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Labelled 28×28 grey images.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `len × PIXELS` bytes, row-major.
    pub images: Vec<u8>,
    /// One label in `0..10` per image.
    pub labels: Vec<u8>,
}

fn open(dir: &Path, name: &str) -> Result<(PathBuf, Box<dyn Read>), MnistError> {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MnistError::Io { path, source }
    };
    if plain.is_file() {
        let f = File::open(&plain).map_err(io(&plain))?;
        Ok((plain, Box::new(BufReader::new(f))))
    } else if gz.is_file() {
        let f = File::open(&gz).map_err(io(&gz))?;
        Ok((gz, Box::new(GzDecoder::new(BufReader::new(f)))))
    } else {
        Err(MnistError::Missing {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        })
    }
}

/// Parses one IDX file: checks the magic number and dimensions, returns (dims, payload).
pub fn parse_idx(
    path: &Path,
    mut r: impl Read,
    magic: u32,
    ndims: usize,
) -> Result<(Vec<usize>, Vec<u8>), MnistError> {
    let fmt = |reason: String| MnistError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let mut word = [0u8; 4];
    let mut read_u32 = |r: &mut dyn Read| -> Result<u32, MnistError> {
        r.read_exact(&mut word)
            .map_err(|e| fmt(format!("truncated header: {e}")))?;
        Ok(u32::from_be_bytes(word))
    };
    let m = read_u32(&mut r)?;
    if m != magic {
        return Err(fmt(format!("magic number {m} is not the expected {magic}")));
    }
    let mut dims = Vec::with_capacity(ndims);
    for _ in 0..ndims {
        dims.push(read_u32(&mut r)? as usize);
    }
    if dims[0] > MAX_ITEMS {
        return Err(fmt(format!(
            "{} items exceed the limit of {MAX_ITEMS}",
            dims[0]
        )));
    }
    let len = dims.iter().product::<usize>();
    let mut data = Vec::with_capacity(len);
    r.take(len as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| fmt(e.to_string()))?;
    if data.len() != len {
        return Err(fmt(format!(
            "expected {len} payload bytes, found {}{}",
            data.len().min(len),
            if data.len() > len { " and more" } else { "" }
        )));
    }
    Ok((dims, data))
}

impl Dataset {
    /// Reads `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]` from `dir`.
    pub fn load_mnist_test(dir: &Path) -> Result<Dataset, MnistError> {
        Dataset::load(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    }

    /// Reads an image file and a label file from `dir` and checks they agree.
    pub fn load(dir: &Path, images: &str, labels: &str) -> Result<Dataset, MnistError> {
        let (ipath, ir) = open(dir, images)?;
        let (idims, images) = parse_idx(&ipath, ir, 2051, 3)?;
        if idims[1] != 28 || idims[2] != 28 {
            return Err(MnistError::Format {
                path: ipath,
                reason: format!("images are {}x{}, expected 28x28", idims[1], idims[2]),
            });
        }
        let (lpath, lr) = open(dir, labels)?;
        let (ldims, labels) = parse_idx(&lpath, lr, 2049, 1)?;
        if ldims[0] != idims[0] {
            return Err(MnistError::Format {
                path: lpath,
                reason: format!("{} labels for {} images", ldims[0], idims[0]),
            });
        }
        if let Some(bad) = labels.iter().find(|&&l| usize::from(l) >= CLASSES) {
            return Err(MnistError::Format {
                path: lpath,
                reason: format!("label {bad} is not a digit"),
            });
        }
        Ok(Dataset { images, labels })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of example `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    /// The examples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(indices.len() * PIXELS);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Dataset { images, labels }
    }

    /// Splits into (train, held-out) with `held_out` examples held out, after a shuffle
    /// fixed by `seed`; the same seed always gives the same split.
    pub fn split(&self, held_out: usize, seed: u64) -> (Dataset, Dataset) {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let held_out = held_out.min(self.len());
        let (test, train) = idx.split_at(held_out);
        (self.subset(train), self.subset(test))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn parses_and_rejects_idx() {
        let p = Path::new("x");
        let ok = idx(2049, &[3], &[1, 2, 3]);
        assert_eq!(
            parse_idx(p, ok.as_slice(), 2049, 1).unwrap(),
            (vec![3], vec![1, 2, 3])
        );
        let cases: [(Vec<u8>, &str); 4] = [
            (idx(2051, &[3], &[1, 2, 3]), "magic"),
            (idx(2049, &[4], &[1, 2, 3]), "expected 4 payload bytes"),
            (idx(2049, &[2], &[1, 2, 3]), "and more"),
            (vec![0, 0], "truncated"),
        ];
        for (bytes, want) in cases {
            let err = parse_idx(p, bytes.as_slice(), 2049, 1).unwrap_err();
            assert!(err.to_string().contains(want), "{err} lacks {want}");
        }
        let huge = idx(2049, &[u32::MAX], &[]);
        assert!(
            parse_idx(p, huge.as_slice(), 2049, 1)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
    }

    #[test]
    fn reads_the_vendored_test_set_and_splits_deterministically() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
        let ds = Dataset::load_mnist_test(&dir).unwrap();
        assert_eq!(ds.len(), 10_000);
        assert_eq!(ds.images.len(), 10_000 * PIXELS);
        // The first test label of MNIST is a 7.
        assert_eq!(ds.labels[0], 7);
        let (train, test) = ds.split(2_000, 42);
        assert_eq!((train.len(), test.len()), (8_000, 2_000));
        assert_eq!(ds.split(2_000, 42), (train.clone(), test));
        assert_ne!(ds.split(2_000, 43).0, train);
    }

    #[test]
    fn missing_files_name_the_folder() {
        let err = Dataset::load_mnist_test(Path::new("/nonexistent/mnist")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/mnist"), "{err}");
    }
}
