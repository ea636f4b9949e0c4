//! Models on disk as safetensors files, written atomically (temporary file, then rename), so a
//! crash or a full disk never leaves a half-written model under the final name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flare_protocols::model::{DType, FLModel, ModelError, Tensor};
use flare_protocols::safetensors_io;
use flare_protocols::stored::{
    LoadError, ModelRef, SourceError, StoredModel, TensorInfo, TensorSource,
};

impl From<SourceError> for ModelFileError {
    fn from(e: SourceError) -> ModelFileError {
        ModelFileError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        }
    }
}

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
    // The tensors' bytes and a generous allowance for the JSON header.
    let header: u64 = model
        .params
        .iter()
        .map(|(k, t)| k.len() as u64 + 16 * t.shape().len() as u64 + 96)
        .sum();
    check_room_for(path, model.num_bytes() as u64 + header + 4096)
}

/// Refuses a write of `need` bytes to `path` that would leave less than [`DISK_RESERVE`].
pub fn check_room_for(path: &Path, need: u64) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(st) = rustix::fs::statvfs(dir) else {
        return Ok(());
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
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

/// Reads a safetensors file into a model, each tensor straight into its own buffer: one copy
/// of the model in memory, never the file beside it.
pub fn read(path: &Path) -> Result<FLModel, ModelFileError> {
    let stored = open(path)?;
    let model = ModelRef::Stored(Arc::new(stored))
        .load()
        .map_err(|e| match e {
            LoadError::Source(s) => ModelFileError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(s.to_string()),
            },
            LoadError::Model(source) => ModelFileError::Model {
                path: path.to_path_buf(),
                source,
            },
        })?;
    Ok(Arc::unwrap_or_clone(model))
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
    Metadata(std::collections::HashMap<String, String>),
}

/// The tensors of a safetensors file, read through positional reads: a [`TensorSource`]
/// that holds the file open (so it stays readable if its name is removed) and, for a spooled
/// transfer, removes it once the last reference is gone.
#[derive(Debug)]
pub struct FileSource {
    file: std::fs::File,
    path: PathBuf,
    /// Each tensor's first byte in the file, in [`StoredModel::tensors`] order.
    starts: Vec<u64>,
    remove_on_drop: bool,
}

impl TensorSource for FileSource {
    fn read_at(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let start = self.starts.get(index).ok_or("no such tensor")?;
        self.file
            .read_exact_at(buf, start + offset)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

impl Drop for FileSource {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Opens a safetensors file as a stored model: its header is read and checked (dtypes, shapes
/// against offsets, offsets inside the file, no overlaps), its tensors are not.
pub fn open(path: &Path) -> Result<StoredModel, ModelFileError> {
    open_with(path, false)
}

/// Like [`open`], and the file is removed when the model is dropped (a spooled result).
pub fn open_spooled(path: &Path) -> Result<StoredModel, ModelFileError> {
    open_with(path, true)
}

fn open_with(path: &Path, remove_on_drop: bool) -> Result<StoredModel, ModelFileError> {
    use std::io::Read;
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
    let entries: BTreeMap<String, HeaderEntry> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let data_start = 8 + n;
    let data_len = size - data_start;
    let mut tensors = Vec::new();
    let mut starts = Vec::new();
    let mut spans = Vec::new();
    let mut metadata = None;
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
                    "I8" => DType::I8,
                    "U32" => DType::U32,
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
                let info = TensorInfo {
                    name,
                    dtype: dt,
                    shape,
                };
                if info.byte_len().map(|l| l as u64) != Some(end - b) {
                    return Err(bad(format!(
                        "tensor {:?}: {} bytes for shape {:?} {:?}",
                        info.name,
                        end - b,
                        info.shape,
                        info.dtype
                    )));
                }
                spans.push((b, end, info.name.clone()));
                starts.push(data_start + b);
                tensors.push(info);
            }
            HeaderEntry::Metadata(m) if name == "__metadata__" => metadata = Some(m),
            HeaderEntry::Metadata(_) => {
                return Err(bad(format!("header entry {name:?} is not a tensor")));
            }
        }
    }
    spans.sort();
    if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(bad(format!(
            "tensors {:?} and {:?} overlap",
            w[0].2, w[1].2
        )));
    }
    let source = Arc::new(FileSource {
        file: f,
        path: path.to_path_buf(),
        starts,
        remove_on_drop,
    });
    let mut stored = StoredModel::new(tensors, source).map_err(|source| ModelFileError::Model {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(meta) = metadata {
        let (params_type, round, metrics) = safetensors_io::read_metadata(&meta);
        stored.params_type = params_type;
        stored.current_round = round;
        stored.metrics = metrics;
    }
    Ok(stored)
}

/// Reads the tensors of a safetensors file, each straight into its own buffer (the header's
/// metadata is not read: the Client API passes it in its messages).
pub fn read_streaming(path: &Path) -> Result<BTreeMap<String, Tensor>, ModelFileError> {
    Ok(read(path)?.params)
}

/// Writes a safetensors file whose header is made from `tensors` and `metadata` and whose
/// tensor bytes the caller pushes, in `tensors` order, through [`SpoolWriter::push`]: how a
/// transfer is spooled to disk as it arrives, and how a stored model is copied.
#[derive(Debug)]
pub struct SpoolWriter {
    out: std::io::BufWriter<std::fs::File>,
    tmp: PathBuf,
    path: PathBuf,
    left: u64,
}

impl SpoolWriter {
    /// Creates `path` (under a temporary name until [`SpoolWriter::finish`]) with the header
    /// for `tensors`, once the disk has room for all of it.
    pub fn create(
        path: &Path,
        tensors: &[TensorInfo],
        metadata: &std::collections::HashMap<String, String>,
    ) -> Result<SpoolWriter, ModelFileError> {
        use std::io::Write;
        let io = |source| ModelFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        // The bytes come in `tensors` order, so the header's offsets must follow it.
        if tensors.windows(2).any(|w| w[0].name >= w[1].name) {
            return Err(io(std::io::Error::other(
                "tensors are not in name order, or repeat",
            )));
        }
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!(metadata));
        let mut at = 0u64;
        for t in tensors {
            let len = t.byte_len().ok_or_else(|| {
                io(std::io::Error::other(format!(
                    "tensor {:?} is too large",
                    t.name
                )))
            })? as u64;
            header.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": t.dtype.as_str(),
                    "shape": t.shape,
                    "data_offsets": [at, at + len],
                }),
            );
            at += len;
        }
        let mut json = serde_json::to_vec(&header).map_err(|e| io(std::io::Error::other(e)))?;
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        check_room_for(path, at + json.len() as u64 + 8).map_err(io)?;
        let tmp = path.with_extension("safetensors.partial");
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let written = out
            .write_all(&(json.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&json));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(SpoolWriter {
            out,
            tmp,
            path: path.to_path_buf(),
            left: at,
        })
    }

    /// Appends tensor bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ModelFileError> {
        use std::io::Write;
        if bytes.len() as u64 > self.left {
            return Err(self.fail(std::io::Error::other("more bytes than the header declares")));
        }
        self.left -= bytes.len() as u64;
        self.out.write_all(bytes).map_err(|e| self.fail(e))
    }

    fn fail(&self, source: std::io::Error) -> ModelFileError {
        let _ = std::fs::remove_file(&self.tmp);
        ModelFileError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Flushes the file and gives it its name; every declared byte must have been pushed.
    pub fn finish(mut self) -> Result<PathBuf, ModelFileError> {
        use std::io::Write;
        if self.left != 0 {
            return Err(self.fail(std::io::Error::other(format!(
                "{} bytes short of the header",
                self.left
            ))));
        }
        self.out.flush().map_err(|e| self.fail(e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| self.fail(e))?;
        Ok(self.path.clone())
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        // Unfinished: the partial file goes (a finished one was renamed away).
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// A model at least this large is held as a file rather than in memory where a driver can
/// choose (a site's task results and persisted globals, the simulator's global model).
pub const FILE_BACKED_BYTES: u64 = 64 << 20;

/// Writes `model` to `path` and opens the file as a stored model that carries everything of
/// `model` but its tensors (metadata the file format does not keep included). With
/// `spooled`, the file goes when the stored model is dropped.
pub fn write_stored(
    path: &Path,
    model: &FLModel,
    spooled: bool,
) -> Result<StoredModel, ModelFileError> {
    write(path, model)?;
    let mut s = open_with(path, spooled)?;
    s.params_type = model.params_type;
    s.metrics = model.metrics.clone();
    s.meta = model.meta.clone();
    s.current_round = model.current_round;
    s.total_rounds = model.total_rounds;
    Ok(s)
}

/// Writes `model` to `path` (creating its folder); a model in memory of at least
/// [`FILE_BACKED_BYTES`] is opened again as the file just written and returned, so that its
/// holder can let the memory copy go.
pub fn write_held(path: &Path, model: &ModelRef) -> Result<Option<StoredModel>, ModelFileError> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|source| ModelFileError::Io {
            path: d.to_path_buf(),
            source,
        })?;
    }
    match model.in_memory() {
        Some(m) if m.num_bytes() as u64 >= FILE_BACKED_BYTES => {
            write_stored(path, m, false).map(Some)
        }
        _ => write_ref(path, model).map(|()| None),
    }
}

/// Fresh file names in one folder, for models spooled to disk; the folder is emptied when
/// the spool is made (what an earlier process left there has no owner).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    next: std::sync::atomic::AtomicU64,
}

impl Spool {
    /// A spool in `dir`, emptied.
    pub fn new(dir: PathBuf) -> Spool {
        let _ = std::fs::remove_dir_all(&dir);
        Spool {
            dir,
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A file name not handed out before.
    pub fn file(&self) -> Result<PathBuf, ModelFileError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| ModelFileError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.dir.join(format!("{n}.safetensors")))
    }

    /// `model` as a file in this spool when it is at least [`FILE_BACKED_BYTES`], else
    /// in memory as it is. The file goes when the stored model is dropped.
    pub fn hold(&self, model: Arc<FLModel>) -> Result<ModelRef, ModelFileError> {
        if (model.num_bytes() as u64) < FILE_BACKED_BYTES {
            return Ok(ModelRef::Memory(model));
        }
        let s = write_stored(&self.file()?, &model, true)?;
        Ok(ModelRef::Stored(Arc::new(s)))
    }
}

/// Writes `model` (in memory, or stored and copied a chunk at a time) to `path`.
pub fn write_ref(path: &Path, model: &ModelRef) -> Result<(), ModelFileError> {
    let stored = match model {
        ModelRef::Memory(m) => return write(path, m),
        ModelRef::Stored(s) => s,
    };
    let like = FLModel {
        params_type: stored.params_type,
        metrics: stored.metrics.clone(),
        current_round: stored.current_round,
        ..FLModel::default()
    };
    let mut w = SpoolWriter::create(path, &stored.tensors, &safetensors_io::metadata(&like))?;
    model.for_each_chunk(|_, _, _, bytes| -> Result<(), ModelFileError> { w.push(bytes) })?;
    w.finish().map(|_| ())
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

    #[test]
    fn a_spooled_file_opens_as_the_model_and_a_short_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = FLModel::from_params(BTreeMap::from([
            (
                "a".to_string(),
                Tensor::from_f32(vec![3], &[1.0, 2.0, 3.0]).unwrap(),
            ),
            ("b".to_string(), Tensor::from_i64(vec![1], &[9]).unwrap()),
        ]));
        m.metrics.insert("accuracy".into(), 0.25);
        let r = ModelRef::from(m.clone());
        let p = dir.path().join("s.safetensors");
        let mut w = SpoolWriter::create(&p, &r.tensors(), &safetensors_io::metadata(&m)).unwrap();
        for t in m.params.values() {
            // Pieces of any size.
            for piece in t.bytes().chunks(5) {
                w.push(piece).unwrap();
            }
        }
        w.finish().unwrap();
        let stored = open_spooled(&p).unwrap();
        assert_eq!(stored.metrics, m.metrics);
        let loaded = ModelRef::Stored(Arc::new(stored));
        assert_eq!(*loaded.load().unwrap(), m);
        // A stored model copies out chunk by chunk, and the spool goes with its last user.
        let copy = dir.path().join("c.safetensors");
        write_ref(&copy, &loaded).unwrap();
        assert_eq!(read(&copy).unwrap(), m);
        drop(loaded);
        assert!(!p.exists());

        let short = dir.path().join("short.safetensors");
        let mut w = SpoolWriter::create(&short, &r.tensors(), &Default::default()).unwrap();
        w.push(&[0; 4]).unwrap();
        assert!(w.push(&[0; 100]).is_err());
        assert!(w.finish().unwrap_err().to_string().contains("short"));
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("c.safetensors")]);
    }
}
