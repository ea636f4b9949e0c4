//! Reduced-precision transfer: [`ModelQuantizer`] narrows a model's float tensors before it
//! is sent and [`ModelDequantizer`] widens them back on arrival, with FLARE's names and
//! semantics (`nvflare.app_opt.pt.quantization.ModelQuantizer(quantization_type=...)` and
//! `ModelDequantizer()`).
//!
//! # Quantization types
//!
//! FLARE's strings, parsed case-insensitively by [`QuantizationType::from_str`]:
//!
//! | string                 | what happens to a tensor                   | bytes per f32 element |
//! |------------------------|--------------------------------------------|-----------------------|
//! | `float16` (or `fp16`)  | F32 → F16, round to nearest even           | 2                     |
//! | `bfloat16` (or `bf16`) | F32 → BF16, round to nearest even          | 2                     |
//! | `blockwise8`           | F32/F16/BF16 → I8 codes + F32 absmax/block | 1 + 4 / block size    |
//!
//! float16 and bfloat16 convert only F32 tensors: F16, BF16 and integer tensors pass
//! untouched. blockwise8 converts every float tensor; integer tensors (I64 counters, I8)
//! pass untouched.
//!
//! blockwise8 is absmax quantization over blocks of [`DEFAULT_BLOCK_SIZE`] (64) consecutive
//! elements (row-major, the last block may be short), like the blockwise 8-bit quantization of
//! bitsandbytes that FLARE uses: per block `absmax = max |x|`, and each element becomes
//! `round_ties_even(x / absmax · 127)`, an int8 in [-127, 127] (0 for an all-zero block).
//! Dequantizing gives `code · absmax / 127`, so the error is at most half a step,
//! `absmax / 254`, per element. The code is linear; bitsandbytes looks `x / absmax` up in a
//! 256-entry code table instead, so the bytes are not interchangeable with FLARE's.
//!
//! # On the wire
//!
//! A quantized model is an ordinary [`FLModel`]; only names and metadata say that it is
//! quantized:
//!
//! - meta [`META_QUANTIZATION`] (`flare.quantization`) = `"float16"`, `"bfloat16"` or
//!   `"blockwise8"`: the model-level marker. A model without it is not quantized.
//! - meta [`META_BLOCK_SIZE`] (`flare.quantization.block_size`) = the block size (an integer),
//!   for blockwise8 only.
//! - meta [`META_ORIGINAL_DTYPE_PREFIX`]`<name>` (`flare.quant.<name>`) = the original dtype of
//!   every tensor that was converted: `"f32"`, `"f16"` or `"bf16"`. Tensors that passed
//!   untouched have no entry.
//! - blockwise8 only: tensor `<name>` holds the I8 codes in the original shape, and tensor
//!   `<name>`[`ABSMAX_SUFFIX`] (`<name>#absmax`) the per-block scales, F32 of shape
//!   `[ceil(numel / block size)]`.
//!
//! The scale tensors cannot collide with a model's own tensors: `#` never appears in the
//! state-dict keys of a PyTorch module (dotted attribute names), and the quantizer refuses a
//! model that already holds a tensor whose name ends in [`ABSMAX_SUFFIX`], or that already
//! carries any of the metadata keys above. FLARE itself keeps the quantization state in the
//! meta dict as arrays; Flare's meta holds scalars only, hence the extra tensors.
//!
//! The dequantizer treats what it receives as untrusted: a missing or mis-sized scale tensor,
//! a dtype that disagrees with the metadata, a code of -128, a negative or non-finite scale,
//! an unknown marker or a missing block size is an error naming the tensor or key, never a
//! panic. Tensors that were F32 always come back as F32, so aggregation on the receiver
//! accumulates in f32 as before; [`crate::aggregate::FedAvg`] refuses I8 codes outright.
//!
//! # Not done yet
//!
//! FLARE also offers 4-bit quantization (`float4`, `normfloat4`, bitsandbytes' FP4/NF4);
//! Flare does not, yet.

use std::collections::BTreeMap;
use std::str::FromStr;

use half::{bf16, f16};

use super::{Filter, FilterError};
use crate::model::{DType, FLModel, MAX_NAME_LEN, MetaValue, Tensor};

/// Meta key of the model-level marker: the [`QuantizationType`] as FLARE spells it.
pub const META_QUANTIZATION: &str = "flare.quantization";
/// Meta key of the blockwise8 block size.
pub const META_BLOCK_SIZE: &str = "flare.quantization.block_size";
/// Prefix of the per-tensor meta keys that record a converted tensor's original dtype
/// (`flare.quant.fc1.weight` = `"f32"`).
pub const META_ORIGINAL_DTYPE_PREFIX: &str = "flare.quant.";
/// Suffix of the tensor that carries a blockwise8 tensor's per-block scales.
pub const ABSMAX_SUFFIX: &str = "#absmax";
/// The blockwise8 block size unless configured otherwise: one f32 scale per 64 codes, so
/// 1/16 byte of overhead per element.
pub const DEFAULT_BLOCK_SIZE: usize = 64;

const QUANTIZER: &str = "ModelQuantizer";
const DEQUANTIZER: &str = "ModelDequantizer";

/// How [`ModelQuantizer`] narrows a model, with FLARE's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantizationType {
    /// IEEE half precision (`"float16"`, `"fp16"`).
    Float16,
    /// bfloat16 (`"bfloat16"`, `"bf16"`).
    BFloat16,
    /// 8-bit blockwise absmax codes plus an f32 scale per block (`"blockwise8"`).
    Blockwise8,
}

impl QuantizationType {
    /// FLARE's canonical name, as written to [`META_QUANTIZATION`].
    pub fn as_str(self) -> &'static str {
        match self {
            QuantizationType::Float16 => "float16",
            QuantizationType::BFloat16 => "bfloat16",
            QuantizationType::Blockwise8 => "blockwise8",
        }
    }
}

impl std::fmt::Display for QuantizationType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QuantizationType {
    type Err = FilterError;

    /// Parses FLARE's names and aliases, ignoring case; anything else is
    /// [`FilterError::UnknownQuantizationType`], whose message lists the accepted names.
    fn from_str(s: &str) -> Result<Self, FilterError> {
        let is = |name: &str| s.eq_ignore_ascii_case(name);
        if is("float16") || is("fp16") {
            Ok(QuantizationType::Float16)
        } else if is("bfloat16") || is("bf16") {
            Ok(QuantizationType::BFloat16)
        } else if is("blockwise8") {
            Ok(QuantizationType::Blockwise8)
        } else {
            Err(FilterError::UnknownQuantizationType(s.to_string()))
        }
    }
}

/// Narrows a model's float tensors for transfer (FLARE's `ModelQuantizer`); see the module
/// docs for what each type does and what goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelQuantizer {
    /// What to narrow to.
    pub quantization_type: QuantizationType,
    /// Elements per block for blockwise8 (ignored otherwise); must not be zero.
    pub block_size: usize,
}

impl ModelQuantizer {
    /// A quantizer of `quantization_type` with the [`DEFAULT_BLOCK_SIZE`].
    pub fn new(quantization_type: QuantizationType) -> Self {
        ModelQuantizer {
            quantization_type,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }

    /// The same quantizer with another blockwise8 block size.
    pub fn with_block_size(self, block_size: usize) -> Self {
        ModelQuantizer { block_size, ..self }
    }

    /// Refuses models the quantized format cannot represent unambiguously: already quantized,
    /// carrying reserved meta keys, or with tensor names that clash with scale tensors.
    fn check(&self, model: &FLModel) -> Result<(), FilterError> {
        if self.quantization_type == QuantizationType::Blockwise8 && self.block_size == 0 {
            return Err(FilterError::Config {
                filter: QUANTIZER,
                reason: "block_size must be at least 1".into(),
            });
        }
        if model.meta.contains_key(META_QUANTIZATION) {
            return Err(FilterError::BadMeta {
                filter: QUANTIZER,
                key: META_QUANTIZATION.into(),
                reason: "the model is already quantized".into(),
            });
        }
        if let Some(key) = model.meta.keys().find(|k| is_reserved_key(k)) {
            return Err(FilterError::BadMeta {
                filter: QUANTIZER,
                key: key.clone(),
                reason: "key is reserved for quantization metadata".into(),
            });
        }
        for (name, t) in &model.params {
            if name.ends_with(ABSMAX_SUFFIX) {
                return Err(FilterError::NameClash {
                    filter: QUANTIZER,
                    tensor: name.clone(),
                    reason: format!("name ends in {ABSMAX_SUFFIX:?}, reserved for scale tensors"),
                });
            }
            if self.quantization_type == QuantizationType::Blockwise8
                && is_float(t.dtype())
                && name.len() + ABSMAX_SUFFIX.len() > MAX_NAME_LEN
            {
                return Err(FilterError::NameClash {
                    filter: QUANTIZER,
                    tensor: name.clone(),
                    reason: format!(
                        "name too long for its scale tensor (at most {} bytes)",
                        MAX_NAME_LEN - ABSMAX_SUFFIX.len()
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Filter for ModelQuantizer {
    fn name(&self) -> &'static str {
        QUANTIZER
    }

    /// Quantizes every tensor the type applies to, one at a time, in place where the
    /// narrower data fits the original buffer. Refuses NaN, infinity and values beyond the
    /// narrow type's range, naming the tensor.
    fn apply(&self, mut model: FLModel) -> Result<FLModel, FilterError> {
        self.check(&model)?;
        let qt = self.quantization_type;
        let params = std::mem::take(&mut model.params);
        let mut out = BTreeMap::new();
        for (name, t) in params {
            let original = t.dtype();
            let converted = match (qt, original) {
                (QuantizationType::Float16, DType::F32) => narrow(&name, t, DType::F16)?,
                (QuantizationType::BFloat16, DType::F32) => narrow(&name, t, DType::BF16)?,
                (QuantizationType::Blockwise8, DType::F32 | DType::F16 | DType::BF16) => {
                    let (codes, scales) = blockwise8(&name, t, self.block_size)?;
                    out.insert(format!("{name}{ABSMAX_SUFFIX}"), scales);
                    codes
                }
                _ => {
                    out.insert(name, t);
                    continue;
                }
            };
            model.meta.insert(
                format!("{META_ORIGINAL_DTYPE_PREFIX}{name}"),
                MetaValue::Text(dtype_tag(original).into()),
            );
            out.insert(name, converted);
        }
        model.params = out;
        model.meta.insert(
            META_QUANTIZATION.into(),
            MetaValue::Text(qt.as_str().into()),
        );
        if qt == QuantizationType::Blockwise8 {
            // A block size beyond i64::MAX means one block per tensor, as i64::MAX does.
            model.meta.insert(
                META_BLOCK_SIZE.into(),
                MetaValue::Int(i64::try_from(self.block_size).unwrap_or(i64::MAX)),
            );
        }
        Ok(model)
    }
}

/// Restores a model quantized by [`ModelQuantizer`] (FLARE's `ModelDequantizer`): every
/// converted tensor returns to its recorded dtype, and the scale tensors and quantization
/// meta keys are removed. A model without the [`META_QUANTIZATION`] marker passes unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelDequantizer;

impl ModelDequantizer {
    /// A dequantizer.
    pub fn new() -> Self {
        ModelDequantizer
    }
}

impl Filter for ModelDequantizer {
    fn name(&self) -> &'static str {
        DEQUANTIZER
    }

    fn apply(&self, mut model: FLModel) -> Result<FLModel, FilterError> {
        let Some(marker) = model.meta.get(META_QUANTIZATION) else {
            return Ok(model);
        };
        let qt = match marker {
            MetaValue::Text(s) => s
                .parse()
                .map_err(|_| bad_meta(META_QUANTIZATION, format!("unknown quantization {s:?}")))?,
            other => {
                return Err(bad_meta(
                    META_QUANTIZATION,
                    format!("not a string: {other:?}"),
                ));
            }
        };
        let block_size = match (qt, model.meta.get(META_BLOCK_SIZE)) {
            (QuantizationType::Blockwise8, Some(MetaValue::Int(n))) => usize::try_from(*n)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| bad_meta(META_BLOCK_SIZE, format!("{n} is not a block size")))?,
            (QuantizationType::Blockwise8, Some(other)) => {
                return Err(bad_meta(
                    META_BLOCK_SIZE,
                    format!("not an integer: {other:?}"),
                ));
            }
            (QuantizationType::Blockwise8, None) => {
                return Err(bad_meta(META_BLOCK_SIZE, "missing for blockwise8".into()));
            }
            _ => 0,
        };
        let mut recorded = Vec::new();
        for (key, value) in &model.meta {
            let Some(name) = key.strip_prefix(META_ORIGINAL_DTYPE_PREFIX) else {
                continue;
            };
            let original = match value {
                MetaValue::Text(tag) => parse_dtype_tag(tag),
                _ => None,
            };
            let allowed = match qt {
                QuantizationType::Float16 | QuantizationType::BFloat16 => {
                    matches!(original, Some(DType::F32))
                }
                QuantizationType::Blockwise8 => original.is_some_and(is_float),
            };
            let (Some(original), true) = (original, allowed) else {
                return Err(malformed(
                    name,
                    format!("{key:?} = {value:?} is not a dtype {qt} converts from"),
                ));
            };
            if name.ends_with(ABSMAX_SUFFIX) {
                return Err(malformed(
                    name,
                    "a scale tensor recorded as quantized".into(),
                ));
            }
            recorded.push((name.to_string(), original));
        }
        model.meta.retain(|k, _| !is_reserved_key(k));

        let mut params = std::mem::take(&mut model.params);
        let mut out = BTreeMap::new();
        for (name, original) in recorded {
            let Some(t) = params.remove(&name) else {
                return Err(malformed(&name, "recorded as quantized but missing".into()));
            };
            let restored = match qt {
                QuantizationType::Float16 => widen(&name, t, DType::F16)?,
                QuantizationType::BFloat16 => widen(&name, t, DType::BF16)?,
                QuantizationType::Blockwise8 => {
                    let scale_name = format!("{name}{ABSMAX_SUFFIX}");
                    let Some(scales) = params.remove(&scale_name) else {
                        return Err(malformed(
                            &name,
                            format!("scale tensor {scale_name:?} missing"),
                        ));
                    };
                    dequantize_blockwise8(&name, t, &scales, block_size, original)?
                }
            };
            out.insert(name, restored);
        }
        for (name, t) in params {
            if name.ends_with(ABSMAX_SUFFIX) {
                return Err(malformed(
                    &name,
                    "scale tensor without a quantized tensor".into(),
                ));
            }
            out.insert(name, t);
        }
        model.params = out;
        Ok(model)
    }
}

/// Whether `key` is one of the meta keys this module writes.
fn is_reserved_key(key: &str) -> bool {
    key == META_QUANTIZATION
        || key == META_BLOCK_SIZE
        || key.starts_with(META_ORIGINAL_DTYPE_PREFIX)
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16)
}

/// The tag under which an original dtype is recorded (serde's lowercase name).
fn dtype_tag(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::I64 => "i64",
        DType::I8 => "i8",
        DType::U32 => "u32",
    }
}

fn parse_dtype_tag(tag: &str) -> Option<DType> {
    [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I8,
        DType::U32,
    ]
    .into_iter()
    .find(|&d| dtype_tag(d) == tag)
}

fn bad_meta(key: &str, reason: String) -> FilterError {
    FilterError::BadMeta {
        filter: DEQUANTIZER,
        key: key.to_string(),
        reason,
    }
}

fn malformed(tensor: &str, reason: String) -> FilterError {
    FilterError::Malformed {
        filter: DEQUANTIZER,
        tensor: tensor.to_string(),
        reason,
    }
}

/// Element `i` of a float tensor's bytes, widened to f32. `i` must be in bounds.
fn read_float(dtype: DType, data: &[u8], i: usize) -> f32 {
    match dtype {
        DType::F16 => f16::from_le_bytes([data[2 * i], data[2 * i + 1]]).to_f32(),
        DType::BF16 => bf16::from_le_bytes([data[2 * i], data[2 * i + 1]]).to_f32(),
        _ => {
            let o = 4 * i;
            f32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]])
        }
    }
}

/// `bytes` with `dtype` and `shape` as a tensor; the lengths always agree by construction,
/// the error is reported rather than assumed away.
fn rebuild(
    filter: &'static str,
    name: &str,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
) -> Result<Tensor, FilterError> {
    Tensor::from_bytes(dtype, shape, bytes).map_err(|e| FilterError::Malformed {
        filter,
        tensor: name.to_string(),
        reason: e.to_string(),
    })
}

/// An F32 tensor narrowed to F16 or BF16 (round to nearest even), written over its own
/// buffer: element `i`'s two bytes go to `2i`, which only ever overwrites elements already
/// read.
fn narrow(name: &str, t: Tensor, to: DType) -> Result<Tensor, FilterError> {
    let shape = t.shape().to_vec();
    let mut data = t.into_bytes();
    let n = data.len() / 4;
    for i in 0..n {
        let x = read_float(DType::F32, &data, i);
        if !x.is_finite() {
            return Err(FilterError::NonFinite {
                filter: QUANTIZER,
                tensor: name.to_string(),
                index: i,
            });
        }
        let (bytes, finite) = if to == DType::F16 {
            let h = f16::from_f32(x);
            (h.to_le_bytes(), h.is_finite())
        } else {
            let h = bf16::from_f32(x);
            (h.to_le_bytes(), h.is_finite())
        };
        if !finite {
            return Err(FilterError::Overflow {
                filter: QUANTIZER,
                tensor: name.to_string(),
                index: i,
                value: x,
                dtype: to,
            });
        }
        data[2 * i..2 * i + 2].copy_from_slice(&bytes);
    }
    data.truncate(2 * n);
    data.shrink_to_fit();
    rebuild(QUANTIZER, name, to, shape, data)
}

/// An F16 or BF16 tensor (as the marker says) widened back to F32.
fn widen(name: &str, t: Tensor, from: DType) -> Result<Tensor, FilterError> {
    if t.dtype() != from {
        return Err(malformed(
            name,
            format!("holds {:?}, expected {from:?}", t.dtype()),
        ));
    }
    let shape = t.shape().to_vec();
    let mut data = Vec::with_capacity(t.numel() * 4);
    for i in 0..t.numel() {
        data.extend_from_slice(&read_float(from, t.bytes(), i).to_le_bytes());
    }
    drop(t);
    rebuild(DEQUANTIZER, name, DType::F32, shape, data)
}

/// A float tensor as blockwise8 I8 codes (same shape) and F32 per-block absmax scales.
///
/// The codes are written over the tensor's own buffer: code `i` goes to byte `i`, and
/// element `j` of the original lies at bytes `size·j..`, with `size ≥ 2`, so a write only
/// ever lands on elements already read (each block is read once for its absmax, then again
/// for its codes, and the writes so far all lie before the block).
fn blockwise8(name: &str, t: Tensor, block_size: usize) -> Result<(Tensor, Tensor), FilterError> {
    let dtype = t.dtype();
    let shape = t.shape().to_vec();
    let mut data = t.into_bytes();
    let n = data.len() / dtype.size();
    let mut scales = Vec::with_capacity(n.div_ceil(block_size));
    let mut start = 0;
    while start < n {
        let end = start + block_size.min(n - start);
        let mut absmax = 0.0f32;
        for i in start..end {
            let x = read_float(dtype, &data, i);
            if !x.is_finite() {
                return Err(FilterError::NonFinite {
                    filter: QUANTIZER,
                    tensor: name.to_string(),
                    index: i,
                });
            }
            absmax = absmax.max(x.abs());
        }
        // In f64, so a subnormal absmax neither overflows 127 / absmax nor loses the codes.
        let k = if absmax > 0.0 {
            127.0 / f64::from(absmax)
        } else {
            0.0
        };
        for i in start..end {
            let x = f64::from(read_float(dtype, &data, i));
            // |x| <= absmax, so the code lies in [-127, 127]; the cast saturates regardless.
            let code = (x * k).round_ties_even().clamp(-127.0, 127.0) as i8;
            data[i] = code.to_le_bytes()[0];
        }
        scales.push(absmax);
        start = end;
    }
    data.truncate(n);
    data.shrink_to_fit();
    let codes = rebuild(QUANTIZER, name, DType::I8, shape, data)?;
    let scales =
        Tensor::from_f32(vec![scales.len()], &scales).map_err(|e| FilterError::Malformed {
            filter: QUANTIZER,
            tensor: name.to_string(),
            reason: e.to_string(),
        })?;
    Ok((codes, scales))
}

/// Blockwise8 codes and scales back to `original` (F32, F16 or BF16), checking everything a
/// forged model could get wrong.
fn dequantize_blockwise8(
    name: &str,
    codes: Tensor,
    scales: &Tensor,
    block_size: usize,
    original: DType,
) -> Result<Tensor, FilterError> {
    if codes.dtype() != DType::I8 {
        return Err(malformed(
            name,
            format!("holds {:?}, expected I8 codes", codes.dtype()),
        ));
    }
    let n = codes.numel();
    let blocks = n.div_ceil(block_size);
    if scales.dtype() != DType::F32 || scales.numel() != blocks {
        return Err(malformed(
            name,
            format!(
                "scale tensor is {:?} {:?}, expected F32 [{blocks}] for {n} elements in blocks of {block_size}",
                scales.dtype(),
                scales.shape()
            ),
        ));
    }
    let shape = codes.shape().to_vec();
    let mut data = Vec::with_capacity(n * original.size());
    for (b, block) in codes.bytes().chunks(block_size).enumerate() {
        let absmax = read_float(DType::F32, scales.bytes(), b);
        if !(absmax.is_finite() && absmax >= 0.0) {
            return Err(malformed(
                name,
                format!("scale {absmax} of block {b} is not a finite absmax"),
            ));
        }
        let step = f64::from(absmax) / 127.0;
        for (j, &byte) in block.iter().enumerate() {
            let code = i8::from_le_bytes([byte]);
            if code == i8::MIN {
                return Err(malformed(
                    name,
                    format!(
                        "code -128 at element {} is out of range",
                        b * block_size + j
                    ),
                ));
            }
            let x = (f64::from(code) * step) as f32;
            match original {
                DType::F16 => {
                    let h = f16::from_f32(x);
                    if !h.is_finite() {
                        return Err(malformed(name, format!("scale {absmax} overflows F16")));
                    }
                    data.extend_from_slice(&h.to_le_bytes());
                }
                DType::BF16 => {
                    let h = bf16::from_f32(x);
                    if !h.is_finite() {
                        return Err(malformed(name, format!("scale {absmax} overflows BF16")));
                    }
                    data.extend_from_slice(&h.to_le_bytes());
                }
                _ => data.extend_from_slice(&x.to_le_bytes()),
            }
        }
    }
    drop(codes);
    rebuild(DEQUANTIZER, name, original, shape, data)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::aggregate::{AggregateError, FedAvg};
    use crate::model::ParamsType;

    fn f32_model(tensors: &[(&str, Vec<f32>)]) -> FLModel {
        FLModel::from_params(
            tensors
                .iter()
                .map(|(n, v)| (n.to_string(), Tensor::from_f32(vec![v.len()], v).unwrap()))
                .collect(),
        )
    }

    fn quantize(qt: QuantizationType, m: FLModel) -> Result<FLModel, FilterError> {
        ModelQuantizer::new(qt).apply(m)
    }

    fn round_trip(q: ModelQuantizer, m: FLModel) -> FLModel {
        ModelDequantizer.apply(q.apply(m).unwrap()).unwrap()
    }

    fn text(s: &str) -> MetaValue {
        MetaValue::Text(s.into())
    }

    const ALL: [QuantizationType; 3] = [
        QuantizationType::Float16,
        QuantizationType::BFloat16,
        QuantizationType::Blockwise8,
    ];

    #[test]
    fn parses_flare_names_and_aliases_ignoring_case() {
        for (s, qt) in [
            ("float16", QuantizationType::Float16),
            ("FP16", QuantizationType::Float16),
            ("fp16", QuantizationType::Float16),
            ("BFloat16", QuantizationType::BFloat16),
            ("bf16", QuantizationType::BFloat16),
            ("blockwise8", QuantizationType::Blockwise8),
            ("BLOCKWISE8", QuantizationType::Blockwise8),
        ] {
            assert_eq!(s.parse::<QuantizationType>().unwrap(), qt, "{s}");
        }
        for qt in ALL {
            assert_eq!(qt.as_str().parse::<QuantizationType>().unwrap(), qt);
            assert_eq!(qt.to_string(), qt.as_str());
        }
    }

    #[test]
    fn unknown_type_lists_the_accepted_ones() {
        let err = "float4".parse::<QuantizationType>().unwrap_err();
        assert_eq!(err, FilterError::UnknownQuantizationType("float4".into()));
        let msg = err.to_string();
        for name in [
            "float16",
            "fp16",
            "bfloat16",
            "bf16",
            "blockwise8",
            "\"float4\"",
        ] {
            assert!(msg.contains(name), "{msg}");
        }
    }

    #[test]
    fn half_types_round_to_nearest_even() {
        // Exact ties between two neighbours go to the one with an even mantissa.
        let e16 = 2f32.powi(-11);
        let e8 = 2f32.powi(-8);
        let m = f32_model(&[("w", vec![1.0 + e16, 1.0 + 3.0 * e16, -(1.0 + e16)])]);
        let h = quantize(QuantizationType::Float16, m).unwrap();
        assert_eq!(h.params["w"].dtype(), DType::F16);
        assert_eq!(h.params["w"].to_f32_vec(), vec![1.0, 1.0 + 4.0 * e16, -1.0]);
        let m = f32_model(&[("w", vec![1.0 + e8, 1.0 + 3.0 * e8])]);
        let b = quantize(QuantizationType::BFloat16, m).unwrap();
        assert_eq!(b.params["w"].dtype(), DType::BF16);
        assert_eq!(b.params["w"].to_f32_vec(), vec![1.0, 1.0 + 4.0 * e8]);
    }

    /// An f32 tensor, an i64 counter, and tensors already in f16 and bf16.
    fn mixed_model() -> FLModel {
        let mut m = f32_model(&[("fc.weight", (0..100).map(|i| i as f32 * 0.1).collect())]);
        m.params.insert(
            "bn.num_batches_tracked".into(),
            Tensor::from_i64(vec![], &[i64::MAX - 1]).unwrap(),
        );
        let like = Tensor::zeros(DType::F16, vec![3]).unwrap();
        m.params.insert(
            "h".into(),
            Tensor::from_f64_like(&like, [0.5, -1.0, 2.0].into_iter()),
        );
        let like = Tensor::zeros(DType::BF16, vec![2]).unwrap();
        m.params.insert(
            "b".into(),
            Tensor::from_f64_like(&like, [0.25, -4.0].into_iter()),
        );
        m.params_type = ParamsType::Diff;
        m.metrics.insert("loss".into(), 0.5);
        m.meta.insert("NUM_SAMPLES".into(), MetaValue::Int(10));
        m.current_round = Some(2);
        m.total_rounds = Some(5);
        m
    }

    #[test]
    fn half_types_halve_f32_bytes_and_leave_the_rest_untouched() {
        for (qt, dtype) in [
            (QuantizationType::Float16, DType::F16),
            (QuantizationType::BFloat16, DType::BF16),
        ] {
            let m = mixed_model();
            let q = quantize(qt, m.clone()).unwrap();
            // 100 f32 → 200 bytes; 8 + 6 + 4 bytes untouched.
            assert_eq!(m.num_bytes(), 400 + 8 + 6 + 4);
            assert_eq!(q.num_bytes(), 200 + 8 + 6 + 4);
            assert_eq!(q.params["fc.weight"].dtype(), dtype);
            for untouched in ["bn.num_batches_tracked", "h", "b"] {
                assert_eq!(q.params[untouched], m.params[untouched], "{qt} {untouched}");
            }
            assert_eq!(q.meta[META_QUANTIZATION], text(qt.as_str()));
            assert_eq!(q.meta["flare.quant.fc.weight"], text("f32"));
            assert!(!q.meta.contains_key("flare.quant.h"));
            assert!(!q.meta.contains_key(META_BLOCK_SIZE));
            assert_eq!(q.params.len(), m.params.len());

            let back = ModelDequantizer.apply(q).unwrap();
            assert_eq!(back.params["fc.weight"].dtype(), DType::F32);
            // Everything but the rounded tensor comes back exactly.
            let mut expected = m.clone();
            expected
                .params
                .insert("fc.weight".into(), back.params["fc.weight"].clone());
            assert_eq!(back, expected);
        }
    }

    #[test]
    fn blockwise8_codes_scales_and_meta_are_as_documented() {
        let m = f32_model(&[("w", vec![1.0, -0.5, 0.25, 0.0, 2.0, -2.0])]);
        let q = ModelQuantizer::new(QuantizationType::Blockwise8)
            .with_block_size(4)
            .apply(m)
            .unwrap();
        let codes = &q.params["w"];
        assert_eq!(codes.dtype(), DType::I8);
        assert_eq!(codes.shape(), &[6]);
        // -63.5 and 31.75 round to -64 and 32; the second block is [2, -2] → ±127.
        assert_eq!(
            codes.bytes().iter().map(|&b| b as i8).collect::<Vec<_>>(),
            vec![127, -64, 32, 0, 127, -127]
        );
        let scales = &q.params["w#absmax"];
        assert_eq!(scales.dtype(), DType::F32);
        assert_eq!(scales.shape(), &[2]);
        assert_eq!(scales.to_f32_vec(), vec![1.0, 2.0]);
        assert_eq!(q.meta[META_QUANTIZATION], text("blockwise8"));
        assert_eq!(q.meta[META_BLOCK_SIZE], MetaValue::Int(4));
        assert_eq!(q.meta["flare.quant.w"], text("f32"));
        assert_eq!(q.meta.len(), 3);

        let back = ModelDequantizer.apply(q).unwrap();
        assert_eq!(back.params.keys().collect::<Vec<_>>(), vec!["w"]);
        assert!(back.meta.is_empty());
        let w = back.params["w"].to_f32_vec();
        assert_eq!(w[0], 1.0);
        assert_eq!(w[4..], [2.0, -2.0]);
        assert!((w[1] + 0.5).abs() <= 1.0 / 254.0);
    }

    #[test]
    fn blockwise8_bytes_are_one_code_plus_a_scale_per_block() {
        // 1000 elements: 1000 codes + 16 scales of 4 bytes, against 4000 bytes.
        let m = f32_model(&[("w", vec![0.5; 1000]), ("v", vec![1.0; 64])]);
        assert_eq!(m.num_bytes(), 4000 + 256);
        let q = quantize(QuantizationType::Blockwise8, m.clone()).unwrap();
        assert_eq!(q.num_bytes(), 1000 + 16 * 4 + 64 + 4);
        let q = ModelQuantizer::new(QuantizationType::Blockwise8)
            .with_block_size(256)
            .apply(m)
            .unwrap();
        assert_eq!(q.num_bytes(), 1000 + 4 * 4 + 64 + 4);
    }

    #[test]
    fn blockwise8_restores_f16_and_bf16_to_their_dtype_and_passes_integers() {
        let m = mixed_model();
        let q = quantize(QuantizationType::Blockwise8, m.clone()).unwrap();
        for name in ["fc.weight", "h", "b"] {
            assert_eq!(q.params[name].dtype(), DType::I8, "{name}");
            assert!(q.params.contains_key(&format!("{name}#absmax")));
        }
        assert_eq!(q.meta["flare.quant.h"], text("f16"));
        assert_eq!(q.meta["flare.quant.b"], text("bf16"));
        assert_eq!(
            q.params["bn.num_batches_tracked"],
            m.params["bn.num_batches_tracked"]
        );
        let back = ModelDequantizer.apply(q).unwrap();
        assert_eq!(back.params.len(), m.params.len());
        assert!(!back.meta.contains_key(META_QUANTIZATION));
        for (name, t) in &m.params {
            assert_eq!(back.params[name].dtype(), t.dtype(), "{name}");
            assert_eq!(back.params[name].shape(), t.shape(), "{name}");
        }
        // code · absmax / 127, rounded to the tensor's own dtype: 0.5 of absmax 2 is code 32
        // (31.75), 32 · 2 / 127 = 0.50394 → f16 0.50390625; -1 is -63.5 → -64 → -1.0078125.
        assert_eq!(
            back.params["h"].to_f32_vec(),
            vec![0.503_906_25, -1.007_812_5, 2.0]
        );
        assert_eq!(back.params["b"].to_f32_vec(), vec![129.0 / 512.0, -4.0]);
        assert_eq!(
            back.params["bn.num_batches_tracked"].to_f32_vec(),
            vec![(i64::MAX - 1) as f32]
        );
        assert_eq!(back.metrics, m.metrics);
        assert_eq!(back.meta, m.meta);
        assert_eq!(
            (back.params_type, back.current_round, back.total_rounds),
            (ParamsType::Diff, Some(2), Some(5))
        );
    }

    #[test]
    fn empty_tensors_and_all_zero_blocks_round_trip() {
        for qt in ALL {
            let mut m = f32_model(&[("empty", vec![]), ("zeros", vec![0.0; 130])]);
            m.params.insert(
                "empty2d".into(),
                Tensor::zeros(DType::F32, vec![0, 7]).unwrap(),
            );
            let back = round_trip(ModelQuantizer::new(qt), m.clone());
            assert_eq!(back, m, "{qt}");
        }
        let q = quantize(
            QuantizationType::Blockwise8,
            f32_model(&[("empty", vec![]), ("zeros", vec![0.0; 130])]),
        )
        .unwrap();
        assert_eq!(q.params["empty#absmax"].numel(), 0);
        assert_eq!(q.params["zeros#absmax"].to_f32_vec(), vec![0.0; 3]);
    }

    #[test]
    fn non_finite_input_is_refused_naming_the_tensor() {
        for qt in ALL {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let m = f32_model(&[("ok", vec![1.0]), ("conv.bias", vec![1.0, 2.0, bad])]);
                let err = quantize(qt, m).unwrap_err();
                assert_eq!(
                    err,
                    FilterError::NonFinite {
                        filter: "ModelQuantizer",
                        tensor: "conv.bias".into(),
                        index: 2
                    },
                    "{qt} {bad}"
                );
                assert!(err.to_string().contains("ModelQuantizer"));
                assert!(err.to_string().contains("conv.bias"));
            }
        }
        let like = Tensor::zeros(DType::F16, vec![1]).unwrap();
        let mut m = FLModel::default();
        m.params.insert(
            "h".into(),
            Tensor::from_f64_like(&like, [f64::NAN].into_iter()),
        );
        assert!(matches!(
            quantize(QuantizationType::Blockwise8, m),
            Err(FilterError::NonFinite { ref tensor, .. }) if tensor == "h"
        ));
    }

    #[test]
    fn values_beyond_the_narrow_range_are_refused() {
        let m = f32_model(&[("w", vec![65504.0, 70000.0])]);
        assert!(matches!(
            quantize(QuantizationType::Float16, m.clone()),
            Err(FilterError::Overflow { ref tensor, index: 1, dtype: DType::F16, .. }) if tensor == "w"
        ));
        // bfloat16 has f32's range, short of the last rounding step.
        assert!(quantize(QuantizationType::BFloat16, m).is_ok());
        let m = f32_model(&[("w", vec![f32::MAX])]);
        assert!(matches!(
            quantize(QuantizationType::BFloat16, m.clone()),
            Err(FilterError::Overflow {
                dtype: DType::BF16,
                ..
            })
        ));
        let back = round_trip(ModelQuantizer::new(QuantizationType::Blockwise8), m);
        assert_eq!(back.params["w"].to_f32_vec(), vec![f32::MAX]);
    }

    #[test]
    fn quantizer_refuses_clashing_names_and_requantizing() {
        for qt in ALL {
            let m = f32_model(&[("w", vec![1.0]), ("w#absmax", vec![1.0])]);
            assert!(matches!(
                quantize(qt, m),
                Err(FilterError::NameClash { ref tensor, .. }) if tensor == "w#absmax"
            ));
            let q = quantize(qt, f32_model(&[("w", vec![1.0])])).unwrap();
            assert!(matches!(
                quantize(qt, q),
                Err(FilterError::BadMeta { ref key, .. }) if key == META_QUANTIZATION
            ));
            let mut m = f32_model(&[("w", vec![1.0])]);
            m.meta.insert("flare.quant.w".into(), text("f32"));
            assert!(matches!(
                quantize(qt, m),
                Err(FilterError::BadMeta { ref key, .. }) if key == "flare.quant.w"
            ));
        }
        let long = "x".repeat(MAX_NAME_LEN - ABSMAX_SUFFIX.len() + 1);
        let m = f32_model(&[(long.as_str(), vec![1.0])]);
        assert!(quantize(QuantizationType::Float16, m.clone()).is_ok());
        assert!(matches!(
            quantize(QuantizationType::Blockwise8, m),
            Err(FilterError::NameClash { ref tensor, .. }) if *tensor == long
        ));
        let ok = "x".repeat(MAX_NAME_LEN - ABSMAX_SUFFIX.len());
        let q = quantize(
            QuantizationType::Blockwise8,
            f32_model(&[(ok.as_str(), vec![1.0])]),
        );
        assert!(q.unwrap().check_names().is_ok());
    }

    #[test]
    fn block_size_zero_is_refused() {
        let q = ModelQuantizer::new(QuantizationType::Blockwise8).with_block_size(0);
        assert!(matches!(
            q.apply(f32_model(&[("w", vec![1.0])])),
            Err(FilterError::Config {
                filter: "ModelQuantizer",
                ..
            })
        ));
        // The block size means nothing to the other types.
        let q = ModelQuantizer::new(QuantizationType::Float16).with_block_size(0);
        assert!(q.apply(f32_model(&[("w", vec![1.0])])).is_ok());
    }

    #[test]
    fn huge_block_sizes_make_one_block_per_tensor() {
        let m = f32_model(&[("w", vec![1.0, -3.0, 0.5])]);
        for bs in [3, 4, usize::MAX] {
            let q = ModelQuantizer::new(QuantizationType::Blockwise8)
                .with_block_size(bs)
                .apply(m.clone())
                .unwrap();
            assert_eq!(q.params["w#absmax"].to_f32_vec(), vec![3.0]);
            let back = ModelDequantizer.apply(q).unwrap();
            assert_eq!(back.params["w"].to_f32_vec()[1], -3.0);
        }
    }

    #[test]
    fn dequantizing_an_unmarked_model_changes_nothing() {
        let m = mixed_model();
        assert_eq!(ModelDequantizer.apply(m.clone()).unwrap(), m);
        // Even stray per-tensor keys: without the marker the model is not quantized.
        let mut m = f32_model(&[("w", vec![1.0])]);
        m.meta.insert("flare.quant.w".into(), text("f16"));
        assert_eq!(ModelDequantizer.apply(m.clone()).unwrap(), m);
    }

    /// A blockwise8-quantized model of `w` (5 elements, blocks of 2) and `v`.
    fn quantized_blockwise() -> FLModel {
        ModelQuantizer::new(QuantizationType::Blockwise8)
            .with_block_size(2)
            .apply(f32_model(&[
                ("w", vec![1.0, 2.0, 3.0, 4.0, 5.0]),
                ("v", vec![1.0]),
            ]))
            .unwrap()
    }

    /// The message of a dequantizer `Malformed` error at tensor `name`.
    fn malformed_at(r: Result<FLModel, FilterError>, name: &str) -> String {
        let err = r.unwrap_err();
        let FilterError::Malformed { filter, tensor, .. } = &err else {
            panic!("expected Malformed at {name:?}, got {err:?}");
        };
        assert_eq!(
            (*filter, tensor.as_str()),
            ("ModelDequantizer", name),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.starts_with("ModelDequantizer: tensor"), "{msg}");
        msg
    }

    fn bad_meta_at(r: Result<FLModel, FilterError>, key: &str) {
        assert!(
            matches!(r, Err(FilterError::BadMeta { key: ref k, filter: "ModelDequantizer", .. }) if k == key),
            "{r:?}"
        );
    }

    #[test]
    fn dequantizer_names_what_is_inconsistent() {
        let d = |m: FLModel| ModelDequantizer.apply(m);

        let mut m = quantized_blockwise();
        m.params.remove("w#absmax");
        let msg = malformed_at(d(m), "w");
        assert!(msg.contains("w#absmax") && msg.contains("missing"), "{msg}");

        let mut m = quantized_blockwise();
        m.params.insert(
            "w#absmax".into(),
            Tensor::from_f32(vec![2], &[1.0, 1.0]).unwrap(),
        );
        let msg = malformed_at(d(m), "w");
        assert!(msg.contains("expected F32 [3]"), "{msg}");

        let mut m = quantized_blockwise();
        m.params.insert(
            "w#absmax".into(),
            Tensor::zeros(DType::F16, vec![3]).unwrap(),
        );
        malformed_at(d(m), "w");

        let mut m = quantized_blockwise();
        m.params.insert(
            "w#absmax".into(),
            Tensor::from_f32(vec![3], &[1.0, -1.0, 1.0]).unwrap(),
        );
        malformed_at(d(m), "w");

        let mut m = quantized_blockwise();
        m.params.insert(
            "w#absmax".into(),
            Tensor::from_f32(vec![3], &[1.0, f32::NAN, 1.0]).unwrap(),
        );
        malformed_at(d(m), "w");

        let mut m = quantized_blockwise();
        m.params.insert(
            "w".into(),
            Tensor::from_bytes(DType::I8, vec![5], vec![0, 0, 0x80, 0, 0]).unwrap(),
        );
        let msg = malformed_at(d(m), "w");
        assert!(msg.contains("-128 at element 2"), "{msg}");

        let mut m = quantized_blockwise();
        m.params
            .insert("w".into(), Tensor::from_f32(vec![5], &[0.0; 5]).unwrap());
        malformed_at(d(m), "w");

        let mut m = quantized_blockwise();
        m.params.remove("w");
        malformed_at(d(m), "w");

        let mut m = quantized_blockwise();
        m.meta.remove("flare.quant.w");
        malformed_at(d(m), "w#absmax");

        let mut m = quantized_blockwise();
        m.meta.insert("flare.quant.w".into(), text("i64"));
        malformed_at(d(m), "w");

        let mut m = quantized_blockwise();
        m.meta.insert("flare.quant.w".into(), MetaValue::Int(1));
        malformed_at(d(m), "w");

        let mut m = quantized_blockwise();
        m.meta.insert("flare.quant.v#absmax".into(), text("f32"));
        malformed_at(d(m), "v#absmax");

        // Scales that a F16 tensor cannot hold.
        let like = Tensor::zeros(DType::F16, vec![1]).unwrap();
        let mut m = FLModel::default();
        m.params
            .insert("h".into(), Tensor::from_f64_like(&like, [1.0].into_iter()));
        let mut m = quantize(QuantizationType::Blockwise8, m).unwrap();
        m.params.insert(
            "h#absmax".into(),
            Tensor::from_f32(vec![1], &[1e6]).unwrap(),
        );
        malformed_at(d(m), "h");

        let mut m = quantized_blockwise();
        m.meta.insert(META_QUANTIZATION.into(), text("normfloat4"));
        bad_meta_at(d(m), META_QUANTIZATION);

        let mut m = quantized_blockwise();
        m.meta
            .insert(META_QUANTIZATION.into(), MetaValue::Bool(true));
        bad_meta_at(d(m), META_QUANTIZATION);

        for bs in [MetaValue::Int(0), MetaValue::Int(-2), text("64")] {
            let mut m = quantized_blockwise();
            m.meta.insert(META_BLOCK_SIZE.into(), bs);
            bad_meta_at(d(m), META_BLOCK_SIZE);
        }
        let mut m = quantized_blockwise();
        m.meta.remove(META_BLOCK_SIZE);
        bad_meta_at(d(m), META_BLOCK_SIZE);

        // A half-precision model whose tensor is not the marker's dtype.
        let mut m = quantize(QuantizationType::Float16, f32_model(&[("w", vec![1.0])])).unwrap();
        m.meta.insert(META_QUANTIZATION.into(), text("bfloat16"));
        let msg = malformed_at(d(m), "w");
        assert!(msg.contains("expected BF16"), "{msg}");
        let mut m = quantize(QuantizationType::Float16, f32_model(&[("w", vec![1.0])])).unwrap();
        m.meta.insert("flare.quant.w".into(), text("f16"));
        malformed_at(d(m), "w");
    }

    #[test]
    fn fedavg_refuses_codes_and_averages_dequantized_results() {
        let global = f32_model(&[("w", vec![0.0; 4])]);
        let q = quantize(
            QuantizationType::Blockwise8,
            f32_model(&[("w", vec![1.0; 4])]),
        )
        .unwrap();
        let mut agg = FedAvg::new();
        let err = agg.add(&global, &q, 1.0).unwrap_err();
        assert_eq!(err, AggregateError::Quantized("w".into()));
        assert!(err.to_string().contains("dequantize"), "{err}");
        // Even against a reference of codes: codes are never averaged.
        assert_eq!(
            agg.add(&q, &q, 1.0).unwrap_err(),
            AggregateError::Quantized("w".into())
        );
        assert_eq!(agg.count(), 0);

        let a = ModelDequantizer.apply(q).unwrap();
        let b = round_trip(
            ModelQuantizer::new(QuantizationType::Float16),
            f32_model(&[("w", vec![3.0; 4])]),
        );
        agg.add(&global, &a, 1.0).unwrap();
        agg.add(&global, &b, 1.0).unwrap();
        let out = agg.finish(&global).unwrap();
        assert_eq!(out.params["w"].dtype(), DType::F32);
        assert_eq!(out.params["w"].to_f32_vec(), vec![2.0; 4]);
    }

    #[test]
    fn filters_chain_as_trait_objects() {
        let chain: Vec<Box<dyn Filter>> = vec![
            Box::new(ModelQuantizer::new(QuantizationType::BFloat16)),
            Box::new(ModelDequantizer::new()),
        ];
        assert_eq!(chain[0].name(), "ModelQuantizer");
        assert_eq!(chain[1].name(), "ModelDequantizer");
        let m = f32_model(&[("w", vec![0.5, 1.5])]);
        let out = chain.iter().try_fold(m.clone(), |m, f| f.apply(m)).unwrap();
        assert_eq!(out, m);
    }

    /// A finite f32 `m · 2^e` with `m` in [1, 2), of either sign.
    fn normal(exp: std::ops::RangeInclusive<i32>) -> impl Strategy<Value = f32> {
        (any::<bool>(), 0u32..(1 << 23), exp).prop_map(|(neg, mantissa, e)| {
            let x = f32::from_bits((((127 + e) as u32) << 23) | mantissa);
            if neg { -x } else { x }
        })
    }

    fn finite() -> impl Strategy<Value = f32> {
        prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO
    }

    fn max_rel_error(qt: QuantizationType, values: &[f32]) -> f64 {
        let back = round_trip(
            ModelQuantizer::new(qt),
            f32_model(&[("w", values.to_vec())]),
        );
        assert_eq!(back.params["w"].dtype(), DType::F32);
        values
            .iter()
            .zip(back.params["w"].to_f32_vec())
            .map(|(&x, y)| ((f64::from(y) - f64::from(x)) / f64::from(x)).abs())
            .fold(0.0, f64::max)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn float16_relative_error_is_at_most_2_pow_minus_11(
            // float16's normal range: 2^-14 up to 65504.
            values in prop::collection::vec(
                normal(-14..=15).prop_filter("f16 range", |x| x.abs() <= 65504.0),
                0..200,
            ),
        ) {
            prop_assert!(max_rel_error(QuantizationType::Float16, &values) <= 2f64.powi(-11));
        }

        #[test]
        fn bfloat16_relative_error_is_at_most_2_pow_minus_8(
            values in prop::collection::vec(normal(-126..=126), 0..200),
        ) {
            prop_assert!(max_rel_error(QuantizationType::BFloat16, &values) <= 2f64.powi(-8));
        }

        #[test]
        fn blockwise8_error_is_at_most_half_a_step_per_block(
            values in prop::collection::vec(finite(), 0..300),
            block_size in 1usize..100,
        ) {
            let q = ModelQuantizer::new(QuantizationType::Blockwise8).with_block_size(block_size);
            let m = f32_model(&[("w", values.clone())]);
            let quantized = q.apply(m).unwrap();
            let blocks = values.len().div_ceil(block_size);
            prop_assert_eq!(quantized.num_bytes(), values.len() + 4 * blocks);
            let back = ModelDequantizer.apply(quantized).unwrap();
            let got = back.params["w"].to_f32_vec();
            for (block, restored) in values.chunks(block_size).zip(got.chunks(block_size)) {
                let absmax = block.iter().fold(0f64, |a, &x| a.max(f64::from(x).abs()));
                // Half a step, plus the last f32 rounding of the result (relative, or
                // absolute in the subnormal range).
                let bound = absmax / 127.0 / 2.0 + absmax * 2f64.powi(-23) + 2f64.powi(-149);
                for (&x, &y) in block.iter().zip(restored) {
                    let err = (f64::from(y) - f64::from(x)).abs();
                    prop_assert!(err <= bound, "x {x} y {y} err {err} bound {bound}");
                    prop_assert!(f64::from(y).abs() <= absmax);
                }
            }
        }

        #[test]
        fn half_types_halve_the_bytes_of_any_f32_model(
            lens in prop::collection::vec(0usize..50, 0..6),
            bf in any::<bool>(),
        ) {
            let qt = if bf { QuantizationType::BFloat16 } else { QuantizationType::Float16 };
            let tensors: Vec<(String, Vec<f32>)> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| (format!("t{i}"), vec![0.5; n]))
                .collect();
            let m = FLModel::from_params(tensors.iter().map(|(n, v)| {
                (n.clone(), Tensor::from_f32(vec![v.len()], v).unwrap())
            }).collect());
            let bytes = m.num_bytes();
            prop_assert_eq!(quantize(qt, m).unwrap().num_bytes() * 2, bytes);
        }

        #[test]
        fn forged_quantized_models_never_panic(
            qt in prop::sample::select(ALL.to_vec()),
            block_size in 1usize..8,
            edits in prop::collection::vec(edit(), 1..5),
        ) {
            let mut m = ModelQuantizer::new(qt).with_block_size(block_size).apply(f32_model(&[
                ("w", vec![1.0, -2.0, 3.5, 0.0, 7.0, 1e-3, -1e3]),
                ("v", vec![]),
            ])).unwrap();
            for e in edits {
                e.apply_to(&mut m);
            }
            // Either answer is fine; a panic is not.
            let _ = ModelDequantizer.apply(m);
        }
    }

    /// One random corruption of a quantized model.
    #[derive(Debug, Clone)]
    enum Edit {
        RemoveMeta(usize),
        SetMeta(usize, MetaValue),
        AddMeta(String, MetaValue),
        RemoveTensor(usize),
        ReplaceTensor(usize, DType, Vec<usize>, Vec<u8>),
        AddTensor(String, DType, usize),
    }

    impl Edit {
        fn apply_to(self, m: &mut FLModel) {
            let meta_key =
                |m: &FLModel, i: usize| m.meta.keys().nth(i % m.meta.len().max(1)).cloned();
            let tensor =
                |m: &FLModel, i: usize| m.params.keys().nth(i % m.params.len().max(1)).cloned();
            match self {
                Edit::RemoveMeta(i) => {
                    if let Some(k) = meta_key(m, i) {
                        m.meta.remove(&k);
                    }
                }
                Edit::SetMeta(i, v) => {
                    if let Some(k) = meta_key(m, i) {
                        m.meta.insert(k, v);
                    }
                }
                Edit::AddMeta(k, v) => {
                    m.meta.insert(k, v);
                }
                Edit::RemoveTensor(i) => {
                    if let Some(k) = tensor(m, i) {
                        m.params.remove(&k);
                    }
                }
                Edit::ReplaceTensor(i, dtype, shape, fill) => {
                    if let Some(k) = tensor(m, i) {
                        let n = shape.iter().product::<usize>() * dtype.size();
                        let data = fill.iter().copied().cycle().take(n).collect::<Vec<_>>();
                        let data = if data.len() == n { data } else { vec![0; n] };
                        m.params
                            .insert(k, Tensor::from_bytes(dtype, shape, data).unwrap());
                    }
                }
                Edit::AddTensor(name, dtype, n) => {
                    m.params
                        .insert(name, Tensor::zeros(dtype, vec![n]).unwrap());
                }
            }
        }
    }

    fn meta_value() -> impl Strategy<Value = MetaValue> {
        prop_oneof![
            any::<bool>().prop_map(MetaValue::Bool),
            prop_oneof![
                Just(0i64),
                Just(-1),
                Just(i64::MAX),
                Just(i64::MIN),
                1i64..10
            ]
            .prop_map(MetaValue::Int),
            any::<f64>().prop_map(MetaValue::Float),
            prop::sample::select(vec![
                "f32",
                "f16",
                "bf16",
                "i64",
                "i8",
                "float16",
                "bfloat16",
                "blockwise8",
                "fp4",
                "",
            ])
            .prop_map(|s| MetaValue::Text(s.into())),
        ]
    }

    fn dtype() -> impl Strategy<Value = DType> {
        prop::sample::select(vec![
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::I64,
            DType::I8,
        ])
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let names = prop::sample::select(vec![
            "w",
            "v",
            "w#absmax",
            "v#absmax",
            "x#absmax",
            "flare.quant.w",
            "flare.quant.x",
            "flare.quant.w#absmax",
            "flare.quantization",
            "flare.quantization.block_size",
        ])
        .prop_map(String::from);
        prop_oneof![
            any::<usize>().prop_map(Edit::RemoveMeta),
            (any::<usize>(), meta_value()).prop_map(|(i, v)| Edit::SetMeta(i, v)),
            (names.clone(), meta_value()).prop_map(|(k, v)| Edit::AddMeta(k, v)),
            any::<usize>().prop_map(Edit::RemoveTensor),
            (
                any::<usize>(),
                dtype(),
                prop::collection::vec(0usize..9, 0..3),
                prop::collection::vec(any::<u8>(), 1..16),
            )
                .prop_map(|(i, d, s, f)| Edit::ReplaceTensor(i, d, s, f)),
            (names, dtype(), 0usize..9).prop_map(|(k, d, n)| Edit::AddTensor(k, d, n)),
        ]
    }
}
