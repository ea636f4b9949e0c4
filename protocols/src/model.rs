//! The model that travels between sites: named tensors with shape and dtype (`FLModel`).
//!
//! Tensors keep their raw little-endian bytes, so a model moves between sites and into
//! safetensors files without conversion. Every constructor checks that the bytes match the
//! shape and dtype, so inner code never sees a tensor whose length disagrees with its shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Element type of a tensor. The names follow safetensors and PyTorch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit signed integer (for example batch-norm counters).
    I64,
    /// 8-bit signed integer: the codes of a blockwise 8-bit quantized tensor
    /// (see `filters::quantize`). Never averaged.
    I8,
    /// 32-bit unsigned integer: a secure-aggregation masked input (see `secagg`). Never
    /// averaged.
    U32,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::I8 => 1,
            DType::U32 => 4,
        }
    }

    /// The safetensors name of this dtype.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I8 => "I8",
            DType::U32 => "U32",
        }
    }
}

/// Why a tensor or model was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// The byte length does not match `shape` × dtype size.
    #[error("tensor {name:?}: {len} bytes do not match shape {shape:?} of {dtype:?}")]
    LengthMismatch {
        /// Tensor name (empty when the tensor has no name yet).
        name: String,
        /// Length of the data in bytes.
        len: usize,
        /// Declared shape.
        shape: Vec<usize>,
        /// Declared dtype.
        dtype: DType,
    },
    /// The element count of the shape overflows `usize`.
    #[error("tensor {name:?}: shape {shape:?} is too large")]
    ShapeOverflow {
        /// Tensor name.
        name: String,
        /// Declared shape.
        shape: Vec<usize>,
    },
    /// Two models that must agree do not have the same tensor names, shapes or dtypes.
    #[error("models do not match at tensor {name:?}: {reason}")]
    Incompatible {
        /// The first tensor where they differ.
        name: String,
        /// What differs.
        reason: String,
    },
    /// A tensor name is empty or longer than [`MAX_NAME_LEN`].
    #[error("tensor name {0:?} is empty or too long")]
    BadName(String),
    /// The safetensors bytes could not be read.
    #[error("safetensors: {0}")]
    Safetensors(String),
    /// The safetensors file holds a dtype Flare does not carry.
    #[error("tensor {name:?}: unsupported dtype {dtype}")]
    UnsupportedDType {
        /// Tensor name.
        name: String,
        /// The dtype as safetensors names it.
        dtype: String,
    },
}

/// Longest tensor name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// A dense tensor: shape, dtype and little-endian bytes whose length always matches them.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawTensor", into = "RawTensor")]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// The unchecked wire form of a [`Tensor`].
#[derive(Serialize, Deserialize)]
struct RawTensor {
    dtype: DType,
    shape: Vec<usize>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

impl TryFrom<RawTensor> for Tensor {
    type Error = ModelError;
    fn try_from(raw: RawTensor) -> Result<Self, ModelError> {
        Tensor::from_bytes(raw.dtype, raw.shape, raw.data)
    }
}

impl From<Tensor> for RawTensor {
    fn from(t: Tensor) -> Self {
        RawTensor {
            dtype: t.dtype,
            shape: t.shape,
            data: t.data,
        }
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Number of elements of `shape`, or `None` on overflow.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    /// A tensor from raw little-endian bytes; fails when the length does not match.
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Self, ModelError> {
        let expected = numel(&shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| ModelError::ShapeOverflow {
                name: String::new(),
                shape: shape.clone(),
            })?;
        if expected != data.len() {
            return Err(ModelError::LengthMismatch {
                name: String::new(),
                len: data.len(),
                shape,
                dtype,
            });
        }
        Ok(Tensor { dtype, shape, data })
    }

    /// An f32 tensor; fails when `values.len()` does not match `shape`.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Self, ModelError> {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Tensor::from_bytes(DType::F32, shape, data)
    }

    /// An i64 tensor; fails when `values.len()` does not match `shape`.
    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Result<Self, ModelError> {
        let mut data = Vec::with_capacity(values.len() * 8);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Tensor::from_bytes(DType::I64, shape, data)
    }

    /// A tensor of zeros.
    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Result<Self, ModelError> {
        let len = numel(&shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| ModelError::ShapeOverflow {
                name: String::new(),
                shape: shape.clone(),
            })?;
        Tensor::from_bytes(dtype, shape, vec![0; len])
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape (row-major).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// Raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The raw bytes, to change in place (their length, and so the shape, stays).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Consumes the tensor and returns its bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }

    /// Element `i` widened to f64 (integers convert exactly up to 2^53).
    ///
    /// # Panics
    /// Never for `i < self.numel()`; callers iterate within that bound.
    fn get_f64(&self, i: usize) -> f64 {
        let b = &self.data;
        match self.dtype {
            DType::F32 => {
                let o = i * 4;
                f64::from(f32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]))
            }
            DType::F16 => {
                let o = i * 2;
                f64::from(half::f16::from_le_bytes([b[o], b[o + 1]]))
            }
            DType::BF16 => {
                let o = i * 2;
                f64::from(half::bf16::from_le_bytes([b[o], b[o + 1]]))
            }
            DType::I64 => {
                let o = i * 8;
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[o..o + 8]);
                i64::from_le_bytes(a) as f64
            }
            DType::I8 => f64::from(b[i] as i8),
            DType::U32 => {
                let o = i * 4;
                f64::from(u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]))
            }
        }
    }

    /// All elements widened to f32 (i64 values beyond 2^24 lose precision).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        if self.dtype == DType::F32 {
            return self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
        }
        (0..self.numel()).map(|i| self.get_f64(i) as f32).collect()
    }

    /// Calls `f(index, value)` for every element, widened to f64, without allocating.
    pub fn for_each_f64(&self, mut f: impl FnMut(usize, f64)) {
        if self.dtype == DType::F32 {
            for (i, c) in self.data.chunks_exact(4).enumerate() {
                f(i, f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            }
            return;
        }
        for i in 0..self.numel() {
            f(i, self.get_f64(i));
        }
    }

    /// A tensor of this dtype and shape whose elements are `values` narrowed from f64.
    /// Integer tensors round to the nearest integer.
    pub fn from_f64_like(like: &Tensor, values: impl Iterator<Item = f64>) -> Tensor {
        let dtype = like.dtype;
        let mut data = Vec::with_capacity(like.data.len());
        for v in values {
            match dtype {
                DType::F32 => data.extend_from_slice(&(v as f32).to_le_bytes()),
                DType::F16 => data.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
                DType::BF16 => data.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
                DType::I64 => data.extend_from_slice(&(v.round() as i64).to_le_bytes()),
                DType::I8 => data.extend_from_slice(&(v.round() as i8).to_le_bytes()),
                DType::U32 => data.extend_from_slice(&(v.round() as u32).to_le_bytes()),
            }
        }
        Tensor {
            dtype,
            shape: like.shape.clone(),
            data,
        }
    }
}

/// Whether a model carries full weights or the difference to the global model it started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamsType {
    /// Complete weights.
    #[default]
    Full,
    /// Local weights minus the received global weights.
    Diff,
}

/// A small metadata value (FLARE's meta dict holds such scalars).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetaValue {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Text(String),
}

/// Metadata key for the number of local training steps behind a result (FLARE's
/// `NUM_STEPS_CURRENT_ROUND`); FedAvg uses it as the weight when no sample count is given.
pub const META_NUM_STEPS: &str = "NUM_STEPS_CURRENT_ROUND";
/// Metadata key for the number of training samples behind a result.
pub const META_NUM_SAMPLES: &str = "NUM_SAMPLES";

/// The model that moves between sites: parameters by name, plus metrics and metadata.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FLModel {
    /// Tensors by name; names sort, so encoding is deterministic.
    pub params: BTreeMap<String, Tensor>,
    /// Full weights or a diff.
    #[serde(default)]
    pub params_type: ParamsType,
    /// Metrics reported with the model (for example `accuracy`, `loss`).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Metadata such as [`META_NUM_STEPS`].
    #[serde(default)]
    pub meta: BTreeMap<String, MetaValue>,
    /// The round this model belongs to, when known.
    #[serde(default)]
    pub current_round: Option<u32>,
    /// The planned number of rounds, when known.
    #[serde(default)]
    pub total_rounds: Option<u32>,
}

impl FLModel {
    /// A model with full weights and nothing else.
    pub fn from_params(params: BTreeMap<String, Tensor>) -> Self {
        FLModel {
            params,
            ..FLModel::default()
        }
    }

    /// Total number of parameters over all tensors.
    pub fn num_params(&self) -> usize {
        self.params.values().map(Tensor::numel).sum()
    }

    /// Total size of all tensors in bytes.
    pub fn num_bytes(&self) -> usize {
        self.params.values().map(|t| t.bytes().len()).sum()
    }

    /// An integer metadata value, if present and integral.
    pub fn meta_int(&self, key: &str) -> Option<i64> {
        match self.meta.get(key)? {
            MetaValue::Int(v) => Some(*v),
            MetaValue::Float(f) if f.fract() == 0.0 => Some(*f as i64),
            _ => None,
        }
    }

    /// Checks that `other` has the same tensor names, shapes and dtypes as `self`.
    pub fn check_compatible(&self, other: &FLModel) -> Result<(), ModelError> {
        for (name, t) in &self.params {
            let Some(o) = other.params.get(name) else {
                return Err(ModelError::Incompatible {
                    name: name.clone(),
                    reason: "missing".into(),
                });
            };
            if o.shape() != t.shape() || o.dtype() != t.dtype() {
                return Err(ModelError::Incompatible {
                    name: name.clone(),
                    reason: format!(
                        "expected {:?} {:?}, got {:?} {:?}",
                        t.dtype(),
                        t.shape(),
                        o.dtype(),
                        o.shape()
                    ),
                });
            }
        }
        if let Some(extra) = other.params.keys().find(|k| !self.params.contains_key(*k)) {
            return Err(ModelError::Incompatible {
                name: extra.clone(),
                reason: "unexpected tensor".into(),
            });
        }
        Ok(())
    }

    /// Checks every tensor name (non-empty, at most [`MAX_NAME_LEN`] bytes).
    pub fn check_names(&self) -> Result<(), ModelError> {
        match self
            .params
            .keys()
            .find(|k| k.is_empty() || k.len() > MAX_NAME_LEN)
        {
            Some(bad) => Err(ModelError::BadName(bad.clone())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_must_match_shape() {
        assert!(Tensor::from_bytes(DType::F32, vec![2, 3], vec![0; 24]).is_ok());
        assert!(matches!(
            Tensor::from_bytes(DType::F32, vec![2, 3], vec![0; 23]),
            Err(ModelError::LengthMismatch { len: 23, .. })
        ));
        assert!(matches!(
            Tensor::from_bytes(DType::I64, vec![usize::MAX, 2], vec![]),
            Err(ModelError::ShapeOverflow { .. })
        ));
    }

    #[test]
    fn widening_reads_every_dtype() {
        let f16 = Tensor::from_f64_like(
            &Tensor::zeros(DType::F16, vec![2]).unwrap(),
            [1.5, -2.0].into_iter(),
        );
        assert_eq!(f16.to_f32_vec(), vec![1.5, -2.0]);
        let bf = Tensor::from_f64_like(
            &Tensor::zeros(DType::BF16, vec![1]).unwrap(),
            [0.25].into_iter(),
        );
        assert_eq!(bf.to_f32_vec(), vec![0.25]);
        let i = Tensor::from_i64(vec![2], &[7, -3]).unwrap();
        assert_eq!(i.to_f32_vec(), vec![7.0, -3.0]);
    }

    #[test]
    fn compatibility_names_the_first_difference() {
        let a = FLModel::from_params(BTreeMap::from([(
            "w".to_string(),
            Tensor::from_f32(vec![2], &[1.0, 2.0]).unwrap(),
        )]));
        let mut b = a.clone();
        assert!(a.check_compatible(&b).is_ok());
        b.params.insert(
            "w".into(),
            Tensor::from_f32(vec![1, 2], &[1.0, 2.0]).unwrap(),
        );
        let err = a.check_compatible(&b).unwrap_err();
        assert!(matches!(err, ModelError::Incompatible { ref name, .. } if name == "w"));
        b.params
            .insert("x".into(), Tensor::zeros(DType::F32, vec![1]).unwrap());
        b.params
            .insert("w".into(), Tensor::from_f32(vec![2], &[1.0, 2.0]).unwrap());
        assert!(matches!(
            a.check_compatible(&b),
            Err(ModelError::Incompatible { ref name, .. }) if name == "x"
        ));
    }
}
