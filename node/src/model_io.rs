//! Models on disk as safetensors files, written atomically (temporary file, then rename), so a
//! crash or a full disk never leaves a half-written model under the final name.

use std::path::{Path, PathBuf};

use flare_protocols::model::{FLModel, ModelError};
use flare_protocols::safetensors_io;

/// Why a model file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The contents are not a model Flare can use.
    #[error("{path}: {source}")]
    Model {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: ModelError,
    },
}

/// Writes `model` to `path` as safetensors, streaming tensors to disk.
pub fn write(path: &Path, model: &FLModel) -> Result<(), ModelFileError> {
    let io = |source| ModelFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("safetensors.tmp");
    let result = safetensors::serialize_to_file(
        model.params.iter().map(|(k, v)| (k.as_str(), v)),
        Some(safetensors_io::metadata(model)),
        &tmp,
    );
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(std::io::Error::other(e.to_string())));
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads a safetensors file into a model.
pub fn read(path: &Path) -> Result<FLModel, ModelFileError> {
    let bytes = std::fs::read(path).map_err(|source| ModelFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    safetensors_io::from_bytes(&bytes).map_err(|source| ModelFileError::Model {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use flare_protocols::model::Tensor;

    use super::*;

    #[test]
    fn round_trip_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let m = FLModel::from_params(BTreeMap::from([(
            "w".to_string(),
            Tensor::from_f32(vec![2], &[1.0, 2.0]).unwrap(),
        )]));
        write(&p, &m).unwrap();
        assert_eq!(read(&p).unwrap(), m);
        assert!(!dir.path().join("m.safetensors.tmp").exists());
        std::fs::write(&p, b"garbage").unwrap();
        let err = read(&p).unwrap_err().to_string();
        assert!(err.contains("m.safetensors"), "{err}");
        let err = write(&dir.path().join("no/such/dir/m.safetensors"), &m).unwrap_err();
        assert!(err.to_string().contains("no/such/dir"), "{err}");
    }
}
