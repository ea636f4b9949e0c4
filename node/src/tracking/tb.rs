//! TensorBoard event files: a writer for scalars and text, and a checked reader.
//!
//! A file is a sequence of TFRecord records, each
//! `u64 len (LE) | u32 masked_crc32c(len bytes) | data | u32 masked_crc32c(data)`, where the
//! CRC is CRC-32C (Castagnoli) and the mask is `rotr(crc, 15) + 0xA282EAD8`. Each record's
//! data is one protobuf `tensorflow.Event`; the first is `Event{wall_time, file_version:
//! "brain.Event:2"}`. The messages below are the parts of `event.proto`, `summary.proto` and
//! `tensor.proto` that we write and read, with the same field numbers, encoded by prost's
//! derive (no build script, no protoc). Fields we do not model are skipped when decoding.
//!
//! The file name is `events.out.tfevents.<10-digit unix secs>.<hostname>.<pid>.<uid>`, as
//! TensorBoard's own writer names it; TensorBoard picks up any file whose name holds
//! `tfevents`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;

/// The `file_version` of the first record, which TensorBoard checks.
pub const FILE_VERSION: &str = "brain.Event:2";

/// The largest record `read_events` accepts. Scalar and text events are a few hundred bytes;
/// the cap keeps a corrupt length from asking for gigabytes.
pub const MAX_RECORD_LEN: u64 = 64 << 20;

/// `tensorflow.DataType` values we use.
pub mod dtype {
    /// `DT_FLOAT`: 32-bit float.
    pub const FLOAT: i32 = 1;
    /// `DT_DOUBLE`: 64-bit float.
    pub const DOUBLE: i32 = 2;
    /// `DT_STRING`: byte strings, in `TensorProto.string_val`.
    pub const STRING: i32 = 7;
}

/// `tensorflow.DataClass` values we use (`SummaryMetadata.data_class`).
pub mod data_class {
    /// `DATA_CLASS_SCALAR`.
    pub const SCALAR: i32 = 1;
    /// `DATA_CLASS_TENSOR`.
    pub const TENSOR: i32 = 2;
}

/// `tensorflow.Event`: one record of an event file.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// The global step (TensorBoard reads a missing step as 0).
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// What the event carries.
    #[prost(oneof = "What", tags = "3, 4, 5")]
    pub what: Option<What>,
}

/// `Event.what`: the oneof of an event's payload (the variants we model).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// The first record of a file: [`FILE_VERSION`].
    #[prost(string, tag = "3")]
    FileVersion(String),
    /// A serialized GraphDef (read only so that such events decode).
    #[prost(bytes = "vec", tag = "4")]
    GraphDef(Vec<u8>),
    /// Summary values: scalars, text, ...
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    /// The values, each with its tag.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, Message)]
pub struct Value {
    /// The series this value belongs to, e.g. `val_acc_global_model`.
    #[prost(string, tag = "1")]
    pub tag: String,
    /// Which plugin reads the value; writers may send it only with a tag's first value.
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    /// The value itself.
    #[prost(oneof = "ValueKind", tags = "2, 8")]
    pub value: Option<ValueKind>,
}

/// `Summary.Value.value`: the oneof of a value's payload (the variants we model).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ValueKind {
    /// A scalar in the legacy form, which TensorBoard's scalars dashboard reads.
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    /// A tensor, read by the plugin that `metadata` names.
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

/// `tensorflow.SummaryMetadata`.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    /// The plugin that owns the value.
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
    /// A display name.
    #[prost(string, tag = "2")]
    pub display_name: String,
    /// A description (Markdown).
    #[prost(string, tag = "3")]
    pub summary_description: String,
    /// A [`data_class`] value.
    #[prost(int32, tag = "4")]
    pub data_class: i32,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    /// `scalars`, `text`, ...
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    /// Plugin-specific bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `tensorflow.TensorProto` (the fields for float, double and string tensors).
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// A [`dtype`] value.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    /// The shape; no dimensions for a scalar.
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShapeProto>,
    /// The values as raw little-endian bytes, an alternative to the typed lists.
    #[prost(bytes = "vec", tag = "4")]
    pub tensor_content: Vec<u8>,
    /// `DT_FLOAT` values.
    #[prost(float, repeated, tag = "5")]
    pub float_val: Vec<f32>,
    /// `DT_DOUBLE` values.
    #[prost(double, repeated, tag = "6")]
    pub double_val: Vec<f64>,
    /// `DT_STRING` values.
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    /// The dimensions, outermost first.
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<TensorShapeDim>,
}

/// `tensorflow.TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeDim {
    /// The size of the dimension.
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// What can go wrong writing or reading event files. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TbError {
    /// A file or folder could not be created, written or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file ends inside a record.
    #[error("{}: record {index} at byte {offset}: truncated ({have} of {need} bytes)", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The record's index, from 0.
        index: usize,
        /// The record's first byte.
        offset: u64,
        /// The bytes the record needs.
        need: u64,
        /// The bytes left in the file.
        have: u64,
    },
    /// A record's length does not match its CRC.
    #[error("{}: record {index} at byte {offset}: length CRC mismatch", path.display())]
    LengthCrc {
        /// The file.
        path: PathBuf,
        /// The record's index, from 0.
        index: usize,
        /// The record's first byte.
        offset: u64,
    },
    /// A record's data does not match its CRC.
    #[error("{}: record {index} at byte {offset}: data CRC mismatch", path.display())]
    DataCrc {
        /// The file.
        path: PathBuf,
        /// The record's index, from 0.
        index: usize,
        /// The record's first byte.
        offset: u64,
    },
    /// A record is longer than [`MAX_RECORD_LEN`].
    #[error("{}: record {index} at byte {offset}: length {len} over the {MAX_RECORD_LEN}-byte cap", path.display())]
    TooLong {
        /// The file.
        path: PathBuf,
        /// The record's index, from 0.
        index: usize,
        /// The record's first byte.
        offset: u64,
        /// The length the record claims.
        len: u64,
    },
    /// A record's data is not a valid `Event`.
    #[error("{}: record {index} at byte {offset}: bad Event: {source}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// The record's index, from 0.
        index: usize,
        /// The record's first byte.
        offset: u64,
        /// What protobuf decoding found.
        source: prost::DecodeError,
    },
}

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// The TFRecord checksum: CRC-32C of `data`, rotated right by 15 bits, plus `0xA282EAD8`.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    CRC32C
        .checksum(data)
        .rotate_right(15)
        .wrapping_add(0xA282_EAD8)
}

/// One TFRecord record around `data`.
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Tells writers of one process apart when they start in the same second.
static NEXT_UID: AtomicU64 = AtomicU64::new(0);

/// This machine's name for event-file names: `uname` nodename, else `/etc/hostname`, else
/// `localhost`; characters other than `[A-Za-z0-9._-]` become `_`.
fn hostname() -> String {
    let uts = rustix::system::uname();
    let mut name = uts.nodename().to_string_lossy().trim().to_string();
    if name.is_empty() {
        name = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
    }
    if name.is_empty() {
        name = "localhost".to_string();
    }
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes one TensorBoard event file. Records go through a `BufWriter`: [`flush`](Self::flush)
/// hands them to the OS (no fsync), and so does drop.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` (and its parents) and a new event file in it, named after `wall_time`
    /// (seconds since the Unix epoch), and writes the file-version record.
    pub fn create(dir: &Path, wall_time: f64) -> Result<EventWriter, TbError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TbError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        // `as` saturates: NaN and negative times give 0.
        let secs = wall_time.floor() as u64;
        let host = hostname();
        let pid = std::process::id();
        let mut attempt = 0;
        let (path, file) = loop {
            let uid = NEXT_UID.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("events.out.tfevents.{secs:010}.{host}.{pid}.{uid}"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                // A file left by an earlier process with our pid: take the next uid.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 64 => {
                    attempt += 1;
                }
                Err(e) => return Err(io(&path)(e)),
            }
        };
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        writer.write_event(&Event {
            wall_time,
            step: 0,
            what: Some(What::FileVersion(FILE_VERSION.to_string())),
        })?;
        Ok(writer)
    }

    /// Appends one event as a record.
    pub fn write_event(&mut self, event: &Event) -> Result<(), TbError> {
        let record = frame(&event.encode_to_vec());
        self.out.write_all(&record).map_err(|source| TbError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Appends the scalar `value` (stored as `f32` in `simple_value`) of series `tag` at
    /// `step`.
    pub fn add_scalar(
        &mut self,
        tag: &str,
        value: f64,
        step: i64,
        wall_time: f64,
    ) -> Result<(), TbError> {
        self.write_value(
            Value {
                tag: tag.to_string(),
                metadata: None,
                value: Some(ValueKind::SimpleValue(value as f32)),
            },
            step,
            wall_time,
        )
    }

    /// Appends `text` (Markdown) under `tag` at `step`, as the string tensor that
    /// TensorBoard's text plugin reads.
    pub fn add_text(
        &mut self,
        tag: &str,
        text: &str,
        step: i64,
        wall_time: f64,
    ) -> Result<(), TbError> {
        self.write_value(
            Value {
                tag: tag.to_string(),
                metadata: Some(SummaryMetadata {
                    plugin_data: Some(PluginData {
                        plugin_name: "text".to_string(),
                        content: Vec::new(),
                    }),
                    data_class: data_class::TENSOR,
                    ..SummaryMetadata::default()
                }),
                value: Some(ValueKind::Tensor(TensorProto {
                    dtype: dtype::STRING,
                    tensor_shape: Some(TensorShapeProto::default()),
                    string_val: vec![text.as_bytes().to_vec()],
                    ..TensorProto::default()
                })),
            },
            step,
            wall_time,
        )
    }

    fn write_value(&mut self, value: Value, step: i64, wall_time: f64) -> Result<(), TbError> {
        self.write_event(&Event {
            wall_time,
            step,
            what: Some(What::Summary(Summary { value: vec![value] })),
        })
    }

    /// Hands the buffered records to the OS (no fsync).
    pub fn flush(&mut self) -> Result<(), TbError> {
        self.out.flush().map_err(|source| TbError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every event of the file at `path`, checking both CRCs of each record. Any damage,
/// including a file that ends inside a record, is an error naming the record.
pub fn read_events(path: &Path) -> Result<Vec<Event>, TbError> {
    let data = std::fs::read(path).map_err(|source| TbError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_events(&data, path, false)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Decodes the records of `data` (the contents of `path`). With `partial_tail_ok`, a last
/// record cut short (a writer still at work) ends the file instead of failing it.
fn parse_events(data: &[u8], path: &Path, partial_tail_ok: bool) -> Result<Vec<Event>, TbError> {
    let mut events = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        let index = events.len();
        let offset = off as u64;
        let rest = &data[off..];
        let truncated = |need: u64| TbError::Truncated {
            path: path.to_path_buf(),
            index,
            offset,
            need,
            have: rest.len() as u64,
        };
        if rest.len() < 12 {
            if partial_tail_ok {
                break;
            }
            return Err(truncated(12));
        }
        if masked_crc32c(&rest[..8]) != le_u32(&rest[8..12]) {
            return Err(TbError::LengthCrc {
                path: path.to_path_buf(),
                index,
                offset,
            });
        }
        let len = le_u64(rest);
        if len > MAX_RECORD_LEN {
            return Err(TbError::TooLong {
                path: path.to_path_buf(),
                index,
                offset,
                len,
            });
        }
        // Both fit in usize: len is capped at 64 MiB.
        let need = 12 + len as usize + 4;
        if rest.len() < need {
            if partial_tail_ok {
                break;
            }
            return Err(truncated(need as u64));
        }
        let body = &rest[12..need - 4];
        if masked_crc32c(body) != le_u32(&rest[need - 4..need]) {
            return Err(TbError::DataCrc {
                path: path.to_path_buf(),
                index,
                offset,
            });
        }
        let event = Event::decode(body).map_err(|source| TbError::Decode {
            path: path.to_path_buf(),
            index,
            offset,
            source,
        })?;
        events.push(event);
        off += need;
    }
    Ok(events)
}

/// The one number in a float or double tensor of one element, as `f32`.
fn tensor_scalar(t: &TensorProto) -> Option<f32> {
    let elements = t
        .tensor_shape
        .as_ref()
        .map_or(1, |s| s.dim.iter().map(|d| d.size).product::<i64>());
    if elements != 1 {
        return None;
    }
    match t.dtype {
        dtype::FLOAT => t.float_val.first().copied().or_else(|| {
            let b: [u8; 4] = t.tensor_content.as_slice().try_into().ok()?;
            Some(f32::from_le_bytes(b))
        }),
        dtype::DOUBLE => t.double_val.first().map(|&v| v as f32).or_else(|| {
            let b: [u8; 8] = t.tensor_content.as_slice().try_into().ok()?;
            Some(f64::from_le_bytes(b) as f32)
        }),
        _ => None,
    }
}

/// The scalars among `events`, in file order, as `(tag, step, value)`: legacy
/// `simple_value`s, and one-element float or double tensors of tags whose plugin is
/// `scalars` (writers may name the plugin only with a tag's first value; a tensor of a tag
/// with no plugin named yet counts too).
pub fn scalars(events: &[Event]) -> Vec<(String, i64, f32)> {
    let mut plugins: HashMap<&str, &str> = HashMap::new();
    let mut out = Vec::new();
    for event in events {
        let Some(What::Summary(summary)) = &event.what else {
            continue;
        };
        for v in &summary.value {
            let plugin = v
                .metadata
                .as_ref()
                .and_then(|m| m.plugin_data.as_ref())
                .map(|p| p.plugin_name.as_str())
                .filter(|p| !p.is_empty());
            if let Some(p) = plugin {
                plugins.insert(&v.tag, p);
            }
            let value = match &v.value {
                Some(ValueKind::SimpleValue(x)) => Some(*x),
                Some(ValueKind::Tensor(t)) => match plugins.get(v.tag.as_str()) {
                    None | Some(&"scalars") => tensor_scalar(t),
                    Some(_) => None,
                },
                None => None,
            };
            if let Some(x) = value {
                out.push((v.tag.clone(), event.step, x));
            }
        }
    }
    out
}

/// Scalar series by tag, each `(step, value)` in file order.
pub type TagSeries = BTreeMap<String, Vec<(i64, f32)>>;

/// The scalars of every `events.out.tfevents.*` file directly in `dir`, files in name order
/// and each file in record order, by tag: `(step, value)`. A last record cut short (a writer
/// still at work) is left out; any other damage is an error.
pub fn read_dir_scalars(dir: &Path) -> Result<TagSeries, TbError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TbError::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let is_events = name
            .to_str()
            .is_some_and(|n| n.starts_with("events.out.tfevents."));
        if is_events && entry.file_type().map_err(io(&entry.path()))?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    let mut by_tag = TagSeries::new();
    for path in files {
        let data = std::fs::read(&path).map_err(io(&path))?;
        let events = parse_events(&data, &path, true)?;
        for (tag, step, value) in scalars(&events) {
            by_tag.entry(tag).or_default().push((step, value));
        }
    }
    Ok(by_tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scalar_series(dir: &Path) -> Vec<(&'static str, i64, f64)> {
        let series = vec![
            ("train_loss", 0, 2.5),
            ("train_loss", 1, 1.25),
            ("val_acc_global_model", 1, 0.0),
            ("train_loss", 2, -0.125),
            ("val_acc_global_model", 2, 0.875),
        ];
        let mut w = EventWriter::create(dir, 1_700_000_000.25).expect("create");
        for &(tag, step, value) in &series {
            w.add_scalar(tag, value, step, 1_700_000_001.0 + step as f64)
                .expect("add");
        }
        w.flush().expect("flush");
        series
    }

    fn one_file(dir: &Path) -> PathBuf {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files.remove(0)
    }

    #[test]
    fn masked_crc_of_known_inputs() {
        // CRC-32C check value of "123456789" (Castagnoli), and TensorBoard's
        // masked_crc32c of the same bytes and of the empty string.
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
        assert_eq!(masked_crc32c(b""), 0xA282_EAD8);
    }

    #[test]
    fn records_match_tensorboards_bytes() {
        // Made by tensorboard 2.21's protos and RecordWriter.
        let scalar = Event {
            wall_time: 1.5,
            step: 3,
            what: Some(What::Summary(Summary {
                value: vec![Value {
                    tag: "loss".into(),
                    metadata: None,
                    value: Some(ValueKind::SimpleValue(0.25)),
                }],
            })),
        };
        assert_eq!(
            hex::encode(frame(&scalar.encode_to_vec())),
            "1a00000000000000129bd82d09000000000000f83f10032a0d0a0b0a046c6f7373150000803ed054b255"
        );
        let version = Event {
            wall_time: 1.5,
            step: 0,
            what: Some(What::FileVersion(FILE_VERSION.into())),
        };
        assert_eq!(
            hex::encode(frame(&version.encode_to_vec())),
            "1800000000000000a37f4b2209000000000000f83f1a0d627261696e2e4576656e743a322a28646c"
        );
    }

    #[test]
    fn scalars_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let series = scalar_series(dir.path());
        let events = read_events(&one_file(dir.path())).expect("read");
        assert_eq!(events.len(), series.len() + 1);
        assert_eq!(events[0].wall_time, 1_700_000_000.25);
        assert_eq!(events[0].what, Some(What::FileVersion(FILE_VERSION.into())));
        assert_eq!(events[1].wall_time, 1_700_000_001.0);
        let got = scalars(&events);
        let want: Vec<_> = series
            .iter()
            .map(|&(t, s, v)| (t.to_string(), s, v as f32))
            .collect();
        assert_eq!(got, want);

        let by_tag = read_dir_scalars(dir.path()).expect("dir");
        assert_eq!(
            by_tag["val_acc_global_model"],
            vec![(1, 0.0), (2, 0.875f32)]
        );
        assert_eq!(by_tag["train_loss"].len(), 3);
    }

    #[test]
    fn file_name_has_tensorboards_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = EventWriter::create(dir.path(), 1_700_000_000.9).expect("a");
        let b = EventWriter::create(dir.path(), 1_700_000_000.9).expect("b");
        assert_ne!(a.path(), b.path());
        for w in [&a, &b] {
            let name = w.path().file_name().and_then(|n| n.to_str()).expect("name");
            let rest = name.strip_prefix("events.out.tfevents.").expect(name);
            let (secs, tail) = rest.split_at(10);
            assert_eq!(secs, "1700000000");
            assert!(secs.bytes().all(|b| b.is_ascii_digit()), "{name}");
            let tail = tail.strip_prefix('.').expect(name);
            let parts: Vec<&str> = tail.rsplitn(3, '.').collect();
            assert_eq!(parts.len(), 3, "{name}");
            assert!(!parts[2].is_empty(), "{name}");
            assert_eq!(parts[1], std::process::id().to_string());
        }
        let nested = dir.path().join("tb_events/site-1");
        let w = EventWriter::create(&nested, 0.0).expect("nested");
        assert!(w.path().starts_with(&nested));
        let name = w.path().file_name().and_then(|n| n.to_str()).expect("name");
        assert!(
            name.starts_with("events.out.tfevents.0000000000."),
            "{name}"
        );
    }

    #[test]
    fn drop_flushes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = {
            let mut w = EventWriter::create(dir.path(), 1.0).expect("create");
            w.add_scalar("x", 1.0, 7, 2.0).expect("add");
            w.path().to_path_buf()
        };
        let events = read_events(&path).expect("read");
        assert_eq!(scalars(&events), vec![("x".to_string(), 7, 1.0)]);
    }

    #[test]
    fn text_is_a_string_tensor_of_the_text_plugin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = EventWriter::create(dir.path(), 1.0).expect("create");
        w.add_text("notes", "round *3* done", 3, 2.0).expect("text");
        w.add_scalar("loss", 0.5, 3, 2.0).expect("scalar");
        drop(w);
        let events = read_events(&one_file(dir.path())).expect("read");
        let Some(What::Summary(s)) = &events[1].what else {
            panic!("{:?}", events[1]);
        };
        let v = &s.value[0];
        let plugin = v.metadata.as_ref().and_then(|m| m.plugin_data.as_ref());
        assert_eq!(plugin.map(|p| p.plugin_name.as_str()), Some("text"));
        let Some(ValueKind::Tensor(t)) = &v.value else {
            panic!("{v:?}");
        };
        assert_eq!(t.dtype, dtype::STRING);
        assert_eq!(t.tensor_shape, Some(TensorShapeProto::default()));
        assert_eq!(t.string_val, vec![b"round *3* done".to_vec()]);
        // Text is not a scalar.
        assert_eq!(scalars(&events), vec![("loss".to_string(), 3, 0.5)]);
    }

    #[test]
    fn tensor_scalars_are_read() {
        let tensor = |dtype, content: Vec<u8>, float_val, double_val| TensorProto {
            dtype,
            tensor_shape: Some(TensorShapeProto::default()),
            tensor_content: content,
            float_val,
            double_val,
            ..TensorProto::default()
        };
        let value = |tag: &str, plugin: Option<&str>, t| Value {
            tag: tag.into(),
            metadata: plugin.map(|p| SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: p.into(),
                    content: Vec::new(),
                }),
                ..SummaryMetadata::default()
            }),
            value: Some(ValueKind::Tensor(t)),
        };
        let event = |step, v| Event {
            wall_time: 0.0,
            step,
            what: Some(What::Summary(Summary { value: vec![v] })),
        };
        let events = vec![
            event(
                1,
                value(
                    "a",
                    Some("scalars"),
                    tensor(dtype::FLOAT, vec![], vec![1.5], vec![]),
                ),
            ),
            // Metadata only on the first value of a tag.
            event(
                2,
                value(
                    "a",
                    None,
                    tensor(dtype::FLOAT, 2.5f32.to_le_bytes().to_vec(), vec![], vec![]),
                ),
            ),
            event(
                3,
                value(
                    "b",
                    Some("scalars"),
                    tensor(dtype::DOUBLE, vec![], vec![], vec![0.25]),
                ),
            ),
            event(
                4,
                value(
                    "b",
                    None,
                    tensor(
                        dtype::DOUBLE,
                        0.75f64.to_le_bytes().to_vec(),
                        vec![],
                        vec![],
                    ),
                ),
            ),
            // Another plugin's float tensor is not a scalar.
            event(
                5,
                value(
                    "h",
                    Some("histograms"),
                    tensor(dtype::FLOAT, vec![], vec![9.0], vec![]),
                ),
            ),
            event(
                6,
                value("h", None, tensor(dtype::FLOAT, vec![], vec![9.0], vec![])),
            ),
        ];
        assert_eq!(
            scalars(&events),
            vec![
                ("a".to_string(), 1, 1.5),
                ("a".to_string(), 2, 2.5),
                ("b".to_string(), 3, 0.25),
                ("b".to_string(), 4, 0.75),
            ]
        );
    }

    fn valid_file() -> Vec<u8> {
        let dir = tempfile::tempdir().expect("tempdir");
        scalar_series(dir.path());
        std::fs::read(one_file(dir.path())).expect("read")
    }

    /// The byte offsets at which the records of `data` start.
    fn record_offsets(data: &[u8]) -> Vec<usize> {
        let mut offs = Vec::new();
        let mut off = 0;
        while off < data.len() {
            offs.push(off);
            off += 16 + le_u64(&data[off..]) as usize;
        }
        offs
    }

    #[test]
    fn damage_is_an_error_naming_the_record() {
        let good = valid_file();
        let offs = record_offsets(&good);
        assert_eq!(offs.len(), 6);
        let p = Path::new("/x/events.out.tfevents.1");

        // A flipped byte in the data of record 2.
        let mut bad = good.clone();
        bad[offs[2] + 14] ^= 0x01;
        let err = parse_events(&bad, p, false).expect_err("data flip");
        assert!(
            matches!(err, TbError::DataCrc { index: 2, offset, .. } if offset == offs[2] as u64),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with(&format!(
                "/x/events.out.tfevents.1: record 2 at byte {}",
                offs[2]
            )),
            "{err}"
        );

        // A flipped byte in the length of record 3.
        let mut bad = good.clone();
        bad[offs[3]] ^= 0x04;
        let err = parse_events(&bad, p, false).expect_err("length flip");
        assert!(
            matches!(err, TbError::LengthCrc { index: 3, .. }),
            "{err:?}"
        );

        // A flipped byte in the data CRC of record 1.
        let mut bad = good.clone();
        bad[offs[2] - 1] ^= 0x80;
        let err = parse_events(&bad, p, false).expect_err("crc flip");
        assert!(matches!(err, TbError::DataCrc { index: 1, .. }), "{err:?}");

        // A length past the cap, with a valid length CRC.
        let mut bad = good[..offs[1]].to_vec();
        let len = (MAX_RECORD_LEN + 1).to_le_bytes();
        bad.extend_from_slice(&len);
        bad.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        bad.extend_from_slice(&[0; 32]);
        let err = parse_events(&bad, p, false).expect_err("too long");
        assert!(matches!(err, TbError::TooLong { index: 1, .. }), "{err:?}");

        // Valid framing around bytes that are no Event.
        let mut bad = good[..offs[1]].to_vec();
        bad.extend_from_slice(&frame(&[0xff, 0xff, 0xff]));
        let err = parse_events(&bad, p, false).expect_err("decode");
        assert!(matches!(err, TbError::Decode { index: 1, .. }), "{err:?}");
    }

    #[test]
    fn truncated_file_is_an_error() {
        let good = valid_file();
        let offs = record_offsets(&good);
        let p = Path::new("t");
        for cut in [offs[4] + 5, offs[4] + 12, offs[4] + 20, offs[5] - 1] {
            let err = parse_events(&good[..cut], p, false).expect_err("truncated");
            assert!(
                matches!(err, TbError::Truncated { index: 4, .. }),
                "{cut}: {err:?}"
            );
            // A reader of a file still being written stops before the partial record.
            let events = parse_events(&good[..cut], p, true).expect("partial tail");
            assert_eq!(events.len(), 4);
        }
        // Cut at a record boundary: fine.
        assert_eq!(
            parse_events(&good[..offs[4]], p, false).expect("cut").len(),
            4
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.out.tfevents.1");
        std::fs::write(&path, &good[..good.len() - 3]).expect("write");
        let err = read_events(&path).expect_err("truncated file");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        assert!(err.to_string().contains("record 5"), "{err}");
    }

    #[test]
    fn read_dir_takes_event_files_in_name_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, step, value) in [
            ("events.out.tfevents.2", 2, 2.0),
            ("events.out.tfevents.1", 1, 1.0),
        ] {
            let mut data = frame(
                &Event {
                    wall_time: 1.0,
                    step: 0,
                    what: Some(What::FileVersion(FILE_VERSION.into())),
                }
                .encode_to_vec(),
            );
            let ev = Event {
                wall_time: 1.0,
                step,
                what: Some(What::Summary(Summary {
                    value: vec![Value {
                        tag: "m".into(),
                        metadata: None,
                        value: Some(ValueKind::SimpleValue(value)),
                    }],
                })),
            };
            data.extend_from_slice(&frame(&ev.encode_to_vec()));
            std::fs::write(dir.path().join(name), data).expect("write");
        }
        std::fs::write(dir.path().join("notes.txt"), b"not events").expect("write");
        std::fs::create_dir(dir.path().join("events.out.tfevents.0.dir")).expect("mkdir");
        let by_tag = read_dir_scalars(dir.path()).expect("dir");
        assert_eq!(by_tag.len(), 1);
        assert_eq!(by_tag["m"], vec![(1, 1.0), (2, 2.0)]);

        let err = read_dir_scalars(&dir.path().join("missing")).expect_err("missing");
        assert!(matches!(err, TbError::Io { .. }), "{err:?}");
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_events(&data, Path::new("r"), false);
            let _ = parse_events(&data, Path::new("r"), true);
        }

        #[test]
        fn mutated_files_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut data = valid_file();
            for (at, byte) in edits {
                let i = at.index(data.len());
                data[i] = byte;
            }
            let cut = cut.index(data.len() + 1);
            let _ = parse_events(&data[..cut], Path::new("m"), false);
            let _ = parse_events(&data[..cut], Path::new("m"), true);
        }

        #[test]
        fn mutated_length_fields_are_errors(record in 0usize..6, byte in 0usize..12, flip in 1u8..=255) {
            let mut data = valid_file();
            let offs = record_offsets(&data);
            data[offs[record] + byte] ^= flip;
            let err = parse_events(&data, Path::new("m"), false);
            prop_assert!(err.is_err());
        }
    }

    /// TensorBoard's own reader (EventAccumulator) sees what we wrote. Runs when
    /// `FLARE_TB_PYTHON` names a Python with `tensorboard` installed.
    #[test]
    fn tensorboard_reads_our_files() {
        let Some(python) = std::env::var_os("FLARE_TB_PYTHON") else {
            eprintln!(
                "tensorboard_reads_our_files: FLARE_TB_PYTHON unset, skipping the Python check"
            );
            return;
        };
        let logdir = tempfile::tempdir().expect("tempdir");
        let mut want: BTreeMap<String, BTreeMap<String, Vec<(i64, f32)>>> = BTreeMap::new();
        for (site, scale) in [("site-1", 1.0), ("site-2", -3.0)] {
            let mut w =
                EventWriter::create(&logdir.path().join(site), 1_700_000_000.0).expect("create");
            for step in 0..5i64 {
                let loss = scale * (1.0 / (step as f64 + 1.0));
                let acc = 0.1 * step as f64;
                w.add_scalar("train_loss", loss, step, 1_700_000_000.0 + step as f64)
                    .expect("add");
                w.add_scalar(
                    "val_acc_global_model",
                    acc,
                    step,
                    1_700_000_000.0 + step as f64,
                )
                .expect("add");
                let run = want.entry(site.to_string()).or_default();
                run.entry("train_loss".into())
                    .or_default()
                    .push((step, loss as f32));
                run.entry("val_acc_global_model".into())
                    .or_default()
                    .push((step, acc as f32));
            }
            w.add_text("notes", "hello *tb*", 4, 1_700_000_005.0)
                .expect("text");
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/tb_read.py");
        let out = std::process::Command::new(python)
            .arg(&script)
            .arg(logdir.path())
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        for (site, tags) in &want {
            for (tag, points) in tags {
                let series = got[site][tag]
                    .as_array()
                    .unwrap_or_else(|| panic!("{site}/{tag}: {got}"));
                let series: Vec<(i64, f32)> = series
                    .iter()
                    .map(|p| {
                        (
                            p[0].as_i64().expect("step"),
                            p[1].as_f64().expect("value") as f32,
                        )
                    })
                    .collect();
                assert_eq!(&series, points, "{site}/{tag}");
            }
            assert_eq!(
                got[site]["notes"],
                serde_json::json!([[4, "hello *tb*"]]),
                "{site}"
            );
        }
    }
}
