//! Models as the Client API exchanges them: safetensors files, read into an owned [`Model`] of
//! named tensors and written back with `safetensors::serialize_to_file`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, View};

/// `F32`: 32-bit float.
pub const F32: &str = "F32";
/// `F16`: 16-bit IEEE float.
pub const F16: &str = "F16";
/// `BF16`: 16-bit brain float.
pub const BF16: &str = "BF16";
/// `I64`: 64-bit signed integer.
pub const I64: &str = "I64";

/// Why a model could not be read, written or computed with.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be read or written.
    #[error("model file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The bytes are not a safetensors file, or safetensors refused the tensors.
    #[error("model file {path}: {source}")]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// What safetensors said.
        source: SafeTensorError,
    },
    /// The file is not a safetensors file this reader takes.
    #[error("model file {path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A dtype name safetensors does not know.
    #[error("tensor {name}: unknown dtype {dtype:?}")]
    UnknownDtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// The data length does not match the dtype and shape.
    #[error("tensor {name}: {len} bytes of data, its {dtype} shape {shape:?} needs {expected}")]
    DataLength {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The bytes it has.
        len: usize,
        /// The bytes its shape needs.
        expected: usize,
    },
    /// Two models that should hold the same tensors do not.
    #[error("tensor {name}: {what}")]
    Mismatch {
        /// The tensor.
        name: String,
        /// How they differ.
        what: String,
    },
}

/// One tensor: little-endian, C-order bytes, as in a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorData {
    /// The safetensors dtype name: `F32`, `F16`, `BF16`, `I64` (the ones Flare models hold) or
    /// any other safetensors knows.
    pub dtype: String,
    /// The dimensions.
    pub shape: Vec<usize>,
    /// The elements' bytes.
    pub data: Vec<u8>,
}

impl TensorData {
    /// An `F32` tensor of `values`.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> TensorData {
        TensorData {
            dtype: F32.into(),
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// A tensor of `dtype` (`F32`, `F16` or `BF16`) holding `values`, rounded to the dtype;
    /// `None` for another dtype.
    pub fn from_f32_as(dtype: &str, shape: Vec<usize>, values: &[f32]) -> Option<TensorData> {
        let data = match dtype {
            F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            BF16 => values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => return None,
        };
        Some(TensorData {
            dtype: dtype.into(),
            shape,
            data,
        })
    }

    /// An `I64` tensor of `values`.
    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> TensorData {
        TensorData {
            dtype: I64.into(),
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The number of elements its shape holds.
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the dtype is `F32`, `F16` or `BF16`.
    pub fn is_float(&self) -> bool {
        matches!(self.dtype.as_str(), F32 | F16 | BF16)
    }

    /// The elements as `f32` (`F32`, `F16`, `BF16`); `None` for another dtype.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        match self.dtype.as_str() {
            F32 => Some(
                self.data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            F16 => Some(
                self.data
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            BF16 => Some(
                self.data
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The elements of an `I64` tensor; `None` for another dtype.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        (self.dtype == I64).then(|| {
            self.data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect()
        })
    }

    /// Applies `f` to every element of a float tensor (computing in `f32`, rounding back to
    /// the dtype); `false`, with the tensor unchanged, for another dtype.
    pub fn map_f32(&mut self, f: impl Fn(f32) -> f32) -> bool {
        let Some(values) = self.to_f32() else {
            return false;
        };
        let mapped: Vec<f32> = values.into_iter().map(f).collect();
        match TensorData::from_f32_as(&self.dtype, std::mem::take(&mut self.shape), &mapped) {
            Some(t) => {
                *self = t;
                true
            }
            None => false,
        }
    }

    fn safetensors_dtype(&self, name: &str) -> Result<Dtype, ModelError> {
        serde_json::from_value(serde_json::Value::String(self.dtype.clone())).map_err(|_| {
            ModelError::UnknownDtype {
                name: name.into(),
                dtype: self.dtype.clone(),
            }
        })
    }

    /// Checks that the dtype is known and the data fits the shape.
    fn check(&self, name: &str) -> Result<Dtype, ModelError> {
        let dtype = self.safetensors_dtype(name)?;
        let bits = self
            .shape
            .iter()
            .try_fold(dtype.bitsize(), |n, d| n.checked_mul(*d));
        let expected = bits.map(|b| b.div_ceil(8));
        if expected != Some(self.data.len()) {
            return Err(ModelError::DataLength {
                name: name.into(),
                dtype: self.dtype.clone(),
                shape: self.shape.clone(),
                len: self.data.len(),
                expected: expected.unwrap_or(usize::MAX),
            });
        }
        Ok(dtype)
    }
}

/// A tensor checked for writing: its safetensors dtype resolved.
struct Checked<'a> {
    dtype: Dtype,
    tensor: &'a TensorData,
}

impl View for Checked<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.tensor.data)
    }

    fn data_len(&self) -> usize {
        self.tensor.data.len()
    }
}

/// A model: tensors by name, in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// The tensors.
    pub tensors: BTreeMap<String, TensorData>,
}

impl Model {
    /// Reads a safetensors file.
    pub fn load(path: &Path) -> Result<Model, ModelError> {
        use std::io::{Read, Seek, SeekFrom};
        let io = |source| ModelError::Io {
            path: path.into(),
            source,
        };
        let bad = |reason: String| ModelError::Malformed {
            path: path.into(),
            reason,
        };
        // Each tensor is read straight into its own buffer: the file is never held whole
        // beside them.
        let mut f = std::fs::File::open(path).map_err(io)?;
        let size = f.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(io)?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 || n + 8 > size {
            return Err(bad(format!("a header of {n} bytes in a file of {size}")));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(io)?;
        let meta: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
        let data_len = size - 8 - n;
        let mut tensors = BTreeMap::new();
        let infos = meta.tensors();
        let mut order: Vec<_> = infos.iter().collect();
        order.sort_by_key(|(_, i)| i.data_offsets.0);
        for (name, info) in order {
            let (b, e) = info.data_offsets;
            if b > e || e as u64 > data_len {
                return Err(bad(format!(
                    "tensor {name}: offsets {b}..{e} outside the data"
                )));
            }
            let want = info
                .shape
                .iter()
                .try_fold(info.dtype.bitsize(), |a, &d| a.checked_mul(d));
            if want != Some((e - b) * 8) {
                return Err(bad(format!(
                    "tensor {name}: {} bytes for {:?} {:?}",
                    e - b,
                    info.dtype,
                    info.shape
                )));
            }
            f.seek(SeekFrom::Start(8 + n + b as u64)).map_err(io)?;
            let mut data = vec![0u8; e - b];
            f.read_exact(&mut data).map_err(io)?;
            tensors.insert(
                name.clone(),
                TensorData {
                    dtype: info.dtype.to_string(),
                    shape: info.shape.clone(),
                    data,
                },
            );
        }
        Ok(Model { tensors })
    }

    /// Reads the bytes of a safetensors file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Model, SafeTensorError> {
        let st = SafeTensors::deserialize(bytes)?;
        let tensors = st
            .iter()
            .map(|(name, view)| {
                (
                    name.to_owned(),
                    TensorData {
                        dtype: view.dtype().to_string(),
                        shape: view.shape().to_vec(),
                        data: view.data().to_vec(),
                    },
                )
            })
            .collect();
        Ok(Model { tensors })
    }

    /// Writes the model as a safetensors file at `path` (replacing one there).
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let checked = self.checked()?;
        safetensors::serialize_to_file(checked, None, path).map_err(|source| {
            ModelError::SafeTensors {
                path: path.into(),
                source,
            }
        })
    }

    /// The model as the bytes of a safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let checked = self.checked()?;
        safetensors::serialize(checked, None).map_err(|source| ModelError::SafeTensors {
            path: PathBuf::new(),
            source,
        })
    }

    fn checked(&self) -> Result<Vec<(&str, Checked<'_>)>, ModelError> {
        self.tensors
            .iter()
            .map(|(name, tensor)| {
                let dtype = tensor.check(name)?;
                Ok((name.as_str(), Checked { dtype, tensor }))
            })
            .collect()
    }

    /// This model minus `base`, tensor by tensor (what a `DIFF` result carries): both must
    /// hold the same names, dtypes and shapes. Floats are subtracted in `f32` and rounded to
    /// their dtype, `I64` with wrapping; other dtypes are refused.
    pub fn diff(&self, base: &Model) -> Result<Model, ModelError> {
        let mismatch = |name: &str, what: String| ModelError::Mismatch {
            name: name.into(),
            what,
        };
        if let Some(name) = base.tensors.keys().find(|n| !self.tensors.contains_key(*n)) {
            return Err(mismatch(name, "missing from the trained model".into()));
        }
        let mut tensors = BTreeMap::new();
        for (name, t) in &self.tensors {
            let b = base
                .tensors
                .get(name)
                .ok_or_else(|| mismatch(name, "not in the task's model".into()))?;
            if t.dtype != b.dtype || t.shape != b.shape {
                return Err(mismatch(
                    name,
                    format!(
                        "{} {:?} here, {} {:?} in the task's model",
                        t.dtype, t.shape, b.dtype, b.shape
                    ),
                ));
            }
            t.check(name)?;
            b.check(name)?;
            let d = if let (Some(x), Some(y)) = (t.to_f32(), b.to_f32()) {
                let v: Vec<f32> = x.iter().zip(&y).map(|(x, y)| x - y).collect();
                TensorData::from_f32_as(&t.dtype, t.shape.clone(), &v)
            } else if let (Some(x), Some(y)) = (t.to_i64(), b.to_i64()) {
                let v: Vec<i64> = x.iter().zip(&y).map(|(x, y)| x.wrapping_sub(*y)).collect();
                Some(TensorData::from_i64(t.shape.clone(), &v))
            } else {
                None
            };
            let d = d.ok_or_else(|| mismatch(name, format!("no difference of {}", t.dtype)))?;
            tensors.insert(name.clone(), d);
        }
        Ok(Model { tensors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Model {
        let mut m = Model::default();
        m.tensors.insert(
            "w".into(),
            TensorData::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]),
        );
        m.tensors.insert(
            "h".into(),
            TensorData::from_f32_as(BF16, vec![3], &[0.5, -1.0, 2.0]).unwrap(),
        );
        m.tensors.insert(
            "f".into(),
            TensorData::from_f32_as(F16, vec![1], &[0.25]).unwrap(),
        );
        m.tensors
            .insert("n".into(), TensorData::from_i64(vec![2], &[7, -3]));
        m
    }

    #[test]
    fn a_model_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let m = sample();
        m.save(&path).unwrap();
        assert_eq!(Model::load(&path).unwrap(), m);
        assert_eq!(Model::from_bytes(&m.to_bytes().unwrap()).unwrap(), m);
    }

    #[test]
    fn diff_subtracts_per_dtype() {
        let base = sample();
        let mut trained = base.clone();
        for t in trained.tensors.values_mut() {
            t.map_f32(|v| v + 0.5);
        }
        let d = trained.diff(&base).unwrap();
        assert_eq!(d.tensors["w"].to_f32().unwrap(), vec![0.5; 4]);
        assert_eq!(d.tensors["h"].to_f32().unwrap(), vec![0.5; 3]);
        assert_eq!(d.tensors["h"].dtype, BF16);
        assert_eq!(d.tensors["f"].to_f32().unwrap(), vec![0.5]);
        assert_eq!(d.tensors["n"].to_i64().unwrap(), vec![0, 0]);
    }

    #[test]
    fn bad_models_are_errors() {
        let base = sample();
        let mut other = base.clone();
        other
            .tensors
            .insert("w".into(), TensorData::from_f32(vec![4], &[0.0; 4]));
        assert!(matches!(
            other.diff(&base),
            Err(ModelError::Mismatch { .. })
        ));
        other.tensors.remove("w");
        assert!(matches!(
            other.diff(&base),
            Err(ModelError::Mismatch { .. })
        ));

        let mut short = Model::default();
        short
            .tensors
            .insert("x".into(), TensorData::from_f32(vec![3], &[1.0]));
        let err = short.to_bytes().unwrap_err();
        assert!(
            matches!(err, ModelError::DataLength { expected: 12, .. }),
            "{err}"
        );
        short.tensors.insert(
            "x".into(),
            TensorData {
                dtype: "Q7".into(),
                shape: vec![],
                data: vec![],
            },
        );
        assert!(matches!(
            short.to_bytes(),
            Err(ModelError::UnknownDtype { .. })
        ));
        assert!(Model::from_bytes(b"not safetensors").is_err());
    }
}
