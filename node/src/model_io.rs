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
    check_room(path, model).map_err(io)?;
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

/// Free space a model write leaves on its file system, for the small writes beside it (job
/// records, reports) that a model filling the disk to its last byte would make fail.
pub const DISK_RESERVE: u64 = 1 << 20;

/// Refuses a model that does not fit on `path`'s file system with [`DISK_RESERVE`] to spare,
/// before a byte is written: a write that fills the disk and then fails would make every
/// other write there fail meanwhile. Where the free space cannot be read, the write goes
/// ahead (and fails as it would).
fn check_room(path: &Path, model: &FLModel) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(st) = rustix::fs::statvfs(dir) else {
        return Ok(());
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    // The tensors' bytes and a generous allowance for the JSON header.
    let header: u64 = model
        .params
        .iter()
        .map(|(k, t)| k.len() as u64 + 16 * t.shape().len() as u64 + 96)
        .sum();
    let need = model.num_bytes() as u64 + header + 4096;
    if free < need.saturating_add(DISK_RESERVE) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!(
                "No space left on device: the model needs {need} bytes and {DISK_RESERVE} more are kept free, {free} are free"
            ),
        ));
    }
    Ok(())
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
