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

/// Largest safetensors header read (the format's own limit).
const MAX_HEADER: u64 = 100 << 20;

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum HeaderEntry {
    Tensor {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: [u64; 2],
    },
    Metadata(#[allow(dead_code)] serde_json::Value),
}

/// Reads the tensors of a safetensors file, each straight into its own buffer: the file is
/// never held whole in memory beside them, so reading a model costs one copy of it. The
/// header's metadata is not read (the Client API passes it in its messages).
pub fn read_streaming(
    path: &Path,
) -> Result<std::collections::BTreeMap<String, flare_protocols::model::Tensor>, ModelFileError> {
    use flare_protocols::model::{DType, Tensor};
    use std::io::{Read, Seek, SeekFrom};
    let io = |source| ModelFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason: String| ModelFileError::Model {
        path: path.to_path_buf(),
        source: ModelError::Safetensors(reason),
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(io)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n + 8 > size {
        return Err(bad(format!("a header of {n} bytes in a file of {size}")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let entries: std::collections::BTreeMap<String, HeaderEntry> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let data_start = 8 + n;
    let data_len = size - data_start;
    let mut tensors: Vec<(String, DType, Vec<usize>, u64, u64)> = Vec::new();
    for (name, e) in entries {
        match e {
            HeaderEntry::Tensor {
                dtype,
                shape,
                data_offsets: [b, end],
            } => {
                let dt = match dtype.as_str() {
                    "F32" => DType::F32,
                    "F16" => DType::F16,
                    "BF16" => DType::BF16,
                    "I64" => DType::I64,
                    other => {
                        return Err(ModelFileError::Model {
                            path: path.to_path_buf(),
                            source: ModelError::UnsupportedDType {
                                name,
                                dtype: other.to_string(),
                            },
                        });
                    }
                };
                if b > end || end > data_len {
                    return Err(bad(format!(
                        "tensor {name:?}: offsets {b}..{end} outside the {data_len} data bytes"
                    )));
                }
                tensors.push((name, dt, shape, b, end));
            }
            HeaderEntry::Metadata(_) if name == "__metadata__" => {}
            HeaderEntry::Metadata(_) => {
                return Err(bad(format!("header entry {name:?} is not a tensor")));
            }
        }
    }
    tensors.sort_by_key(|t| t.3);
    let mut params = std::collections::BTreeMap::new();
    let mut at = data_start;
    for (name, dtype, shape, b, end) in tensors {
        let want = flare_protocols::model::numel(&shape).and_then(|n| n.checked_mul(dtype.size()));
        if want != Some((end - b) as usize) {
            return Err(bad(format!(
                "tensor {name:?}: {} bytes for shape {shape:?} {dtype:?}",
                end - b
            )));
        }
        if data_start + b != at {
            f.seek(SeekFrom::Start(data_start + b)).map_err(io)?;
        }
        let mut data = vec![0u8; (end - b) as usize];
        f.read_exact(&mut data).map_err(io)?;
        at = data_start + end;
        let t = Tensor::from_bytes(dtype, shape, data).map_err(|source| ModelFileError::Model {
            path: path.to_path_buf(),
            source,
        })?;
        params.insert(name, t);
    }
    let model = FLModel::from_params(params);
    model
        .check_names()
        .map_err(|source| ModelFileError::Model {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(model.params)
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
        assert_eq!(read_streaming(&p).unwrap(), m.params);
        std::fs::write(&p, b"garbage").unwrap();
        let err = read_streaming(&p).unwrap_err().to_string();
        assert!(err.contains("m.safetensors"), "{err}");
        let err = read(&p).unwrap_err().to_string();
        assert!(err.contains("m.safetensors"), "{err}");
        let err = write(&dir.path().join("no/such/dir/m.safetensors"), &m).unwrap_err();
        assert!(err.to_string().contains("no/such/dir"), "{err}");
    }
}
