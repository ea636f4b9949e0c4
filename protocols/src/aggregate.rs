//! Weighted federated averaging (FedAvg) that streams: each result is folded into one running
//! accumulator as it arrives and can be dropped at once, so memory holds one accumulator, not
//! N models.
//!
//! f32 tensors keep a running weighted *mean* in f32 (`m += w/W · (x − m)`) rather than a
//! running sum: its rounding error grows with the number of results, not with the size of
//! the sum, and it needs no second buffer at the end. Other dtypes sum in f64.
//!
//! **Per tensor.** A result may carry a subset of the global model's tensors (what FLARE's
//! `ExcludeVars` leaves of it), as FLARE's weighted aggregation takes it: each tensor is the
//! weighted mean over the results that carry it (its own total weight), and a tensor no
//! result carries keeps the base model's value, for full weights and diffs alike. A tensor
//! the global model lacks, or of another shape or dtype, is still refused.
//! [`FedAvg::complete`] refuses a result that lacks a tensor, for the robust rules, whose
//! medians and distances need every tensor from every result.

use std::collections::BTreeMap;

use crate::model::{
    DType, FLModel, META_NUM_SAMPLES, META_NUM_STEPS, MetaValue, ModelError, ParamsType, Tensor,
    numel,
};
use crate::stored::{ModelRef, SourceError, TensorInfo, layout_of, memory_chunks};

/// Why a result could not be aggregated.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    /// The result's tensors do not match the global model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The result lacks a tensor of the global model, and this aggregator needs all of them.
    #[error(
        "result lacks tensor {0:?}: this aggregator needs every tensor of the global model \
         (only FedAvg averages results that exclude some, as ExcludeVars leaves them)"
    )]
    Missing(String),
    /// The weight is zero, negative or not finite.
    #[error("invalid aggregation weight {0}")]
    BadWeight(f64),
    /// A tensor holds NaN or infinity.
    #[error("tensor {0:?} holds a non-finite value")]
    NonFinite(String),
    /// Results disagree on whether they carry full weights or diffs.
    #[error("result carries {got:?} parameters but earlier results carried {expected:?}")]
    MixedParamsType {
        /// What the first result carried.
        expected: ParamsType,
        /// What this result carries.
        got: ParamsType,
    },
    /// A tensor holds 8-bit quantization codes, which must be dequantized, not averaged.
    #[error("tensor {0:?} holds int8 quantization codes: dequantize the model before aggregating")]
    Quantized(String),
    /// A robust rule was given a partial (a hub's weighted sum), whose median means nothing.
    #[error("a robust aggregator cannot take a region's partial aggregate")]
    PartialToRobust,
    /// A robust rule cannot aggregate this round's results.
    #[error(transparent)]
    Robust(#[from] crate::aggregators::RobustError),
    /// `finish` was called before any result was added.
    #[error("no results to aggregate")]
    Empty,
    /// A stored result or base could not be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A stored result failed to read while it was being folded in: the aggregate is lost.
    #[error("the aggregate is lost: {0}")]
    Poisoned(String),
}

/// The aggregation weight of a result: a partial's total weight ([`META_PARTIAL_WEIGHT`]), else
/// its sample count, else its step count, else 1.
pub fn weight_of(model: &FLModel) -> f64 {
    weight_in(&model.meta)
}

/// [`weight_of`] for a model in memory or stored.
pub fn weight_of_ref(model: &ModelRef) -> f64 {
    weight_in(model.meta())
}

fn weight_in(meta: &BTreeMap<String, MetaValue>) -> f64 {
    if let Some(w) = partial_weight_in(meta) {
        return w;
    }
    let int = |k: &str| match meta.get(k) {
        Some(MetaValue::Int(v)) => Some(*v as f64),
        Some(MetaValue::Float(f)) if f.fract() == 0.0 => Some(*f),
        _ => None,
    };
    int(META_NUM_SAMPLES)
        .or_else(|| int(META_NUM_STEPS))
        .unwrap_or(1.0)
}

/// Metadata key that marks a model as a *partial*: its tensors are the weighted sum
/// `Σ wᵢ·xᵢ` of the models behind it (not their mean), and the value is their total weight
/// `Σ wᵢ`. Partials merge: folding one into [`FedAvg`] with its weight counts it as the
/// models behind it would have counted, so a tier that aggregates partials gives the same
/// model as one aggregation over every site.
pub const META_PARTIAL_WEIGHT: &str = "flare.partial.weight";
/// Metadata key of a partial's sample count (the `NUM_SAMPLES` of the models behind it).
pub const META_PARTIAL_SAMPLES: &str = "flare.partial.samples";
/// Metadata key of how many results a partial sums.
pub const META_PARTIAL_COUNT: &str = "flare.partial.count";

fn partial_weight_in(meta: &BTreeMap<String, MetaValue>) -> Option<f64> {
    match meta.get(META_PARTIAL_WEIGHT)? {
        MetaValue::Float(w) => Some(*w),
        MetaValue::Int(w) => Some(*w as f64),
        // A marker that is not a number is not a weight: such a result is refused.
        _ => Some(f64::NAN),
    }
}

/// The total weight of a partial, or `None` for an ordinary model.
pub fn partial_weight(model: &ModelRef) -> Option<f64> {
    partial_weight_in(model.meta())
}

/// Why a partial could not be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PartialError {
    /// The weight is zero, negative or not finite.
    #[error("invalid partial weight {0}")]
    BadWeight(f64),
    /// A half-precision tensor cannot hold a weighted sum without overflowing.
    #[error("tensor {name:?} is {dtype:?}: a partial's weighted sum needs f32 or i64 tensors")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: DType,
    },
    /// A tensor could not be rebuilt.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The partial of `mean`, the weighted mean of `count` results whose weights add up to
/// `weight` and whose sample counts add up to `samples`: every tensor times `weight`, marked
/// with [`META_PARTIAL_WEIGHT`], [`META_PARTIAL_SAMPLES`] and [`META_PARTIAL_COUNT`]. Metrics
/// stay the weighted means they are (they merge with the same weight).
pub fn to_partial(
    mut mean: FLModel,
    weight: f64,
    samples: i64,
    count: usize,
) -> Result<FLModel, PartialError> {
    if !(weight.is_finite() && weight > 0.0) {
        return Err(PartialError::BadWeight(weight));
    }
    for (name, t) in std::mem::take(&mut mean.params) {
        let scaled = match t.dtype() {
            DType::F32 => {
                let v: Vec<f32> = t
                    .to_f32_vec()
                    .iter()
                    .map(|x| (f64::from(*x) * weight) as f32)
                    .collect();
                Tensor::from_f32(t.shape().to_vec(), &v)?
            }
            DType::I64 => {
                Tensor::from_f64_like(&t, widened(&t).into_iter().map(|x| (x * weight).round()))
            }
            dtype => return Err(PartialError::Dtype { name, dtype }),
        };
        mean.params.insert(name, scaled);
    }
    mean.meta
        .insert(META_PARTIAL_WEIGHT.into(), MetaValue::Float(weight));
    mean.meta
        .insert(META_PARTIAL_SAMPLES.into(), MetaValue::Int(samples));
    mean.meta.insert(
        META_PARTIAL_COUNT.into(),
        MetaValue::Int(i64::try_from(count).unwrap_or(i64::MAX)),
    );
    mean.meta.remove(META_NUM_SAMPLES);
    mean.meta.remove(META_NUM_STEPS);
    Ok(mean)
}

fn widened(t: &Tensor) -> Vec<f64> {
    let mut out = Vec::with_capacity(t.numel());
    widen(t.dtype(), 0, t.bytes(), |_, v| out.push(v));
    out
}

/// Running weighted sum of one tensor.
#[derive(Debug)]
enum Acc {
    /// The running weighted mean as little-endian f32 bytes, so finishing reuses the buffer
    /// as the tensor.
    F32Mean(Vec<u8>),
    /// f64 sums, for f16/bf16/i64 tensors.
    Wide(Vec<f64>),
}

/// One tensor's accumulator and the weight of the results that carried the tensor.
#[derive(Debug)]
struct Slot {
    acc: Acc,
    weight: f64,
}

/// Streaming weighted average of models whose tensors are the global model's (all of them or,
/// unless [`FedAvg::complete`], some), tensor by tensor.
#[derive(Debug, Default)]
pub struct FedAvg {
    sums: BTreeMap<String, Slot>,
    /// Every result must carry every tensor of its reference.
    complete: bool,
    total_weight: f64,
    count: usize,
    params_type: Option<ParamsType>,
    metric_sums: BTreeMap<String, (f64, f64)>,
    /// A stored result failed to read half-way through folding: the sums are unusable.
    poisoned: Option<String>,
}

fn read_f32(c: &[u8]) -> f32 {
    f32::from_le_bytes([c[0], c[1], c[2], c[3]])
}

/// Whether `dtype` holds floats (which must be finite to be averaged).
fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Calls `f(element_index, value)` for the elements of `bytes`, whole elements of `dtype`
/// that start at element `first`.
fn widen(dtype: DType, first: usize, bytes: &[u8], mut f: impl FnMut(usize, f64)) {
    match dtype {
        DType::F32 => {
            for (i, c) in bytes.chunks_exact(4).enumerate() {
                f(first + i, f64::from(read_f32(c)));
            }
        }
        DType::F16 => {
            for (i, c) in bytes.chunks_exact(2).enumerate() {
                f(first + i, f64::from(half::f16::from_le_bytes([c[0], c[1]])));
            }
        }
        DType::BF16 => {
            for (i, c) in bytes.chunks_exact(2).enumerate() {
                f(
                    first + i,
                    f64::from(half::bf16::from_le_bytes([c[0], c[1]])),
                );
            }
        }
        DType::I64 => {
            for (i, c) in bytes.chunks_exact(8).enumerate() {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f(first + i, i64::from_le_bytes(a) as f64);
            }
        }
        DType::I8 => {
            for (i, c) in bytes.iter().enumerate() {
                f(first + i, f64::from(*c as i8));
            }
        }
        DType::U32 => {
            for (i, c) in bytes.chunks_exact(4).enumerate() {
                f(
                    first + i,
                    f64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
        }
    }
}

/// Appends `v` narrowed to `dtype` (integers round to the nearest).
fn narrow(dtype: DType, v: f64, out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
        DType::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
        DType::I64 => out.extend_from_slice(&(v.round() as i64).to_le_bytes()),
        DType::I8 => out.push(v.round().clamp(-128.0, 127.0) as i8 as u8),
        DType::U32 => out.extend_from_slice(&(v.round() as u32).to_le_bytes()),
    }
}

/// A model to read from: borrowed in memory, or a [`ModelRef`].
#[derive(Clone, Copy)]
enum Src<'a> {
    Mem(&'a FLModel),
    Ref(&'a ModelRef),
}

impl Src<'_> {
    fn tensors(&self) -> Vec<TensorInfo> {
        match self {
            Src::Mem(m) => layout_of(m),
            Src::Ref(r) => r.tensors(),
        }
    }

    fn params_type(&self) -> ParamsType {
        match self {
            Src::Mem(m) => m.params_type,
            Src::Ref(r) => r.params_type(),
        }
    }

    fn partial_weight(&self) -> Option<f64> {
        match self {
            Src::Mem(m) => partial_weight_in(&m.meta),
            Src::Ref(r) => partial_weight_in(r.meta()),
        }
    }

    fn metrics(&self) -> &BTreeMap<String, f64> {
        match self {
            Src::Mem(m) => &m.metrics,
            Src::Ref(r) => r.metrics(),
        }
    }

    fn chunks<E: From<SourceError>>(
        &self,
        mut f: impl FnMut(&TensorInfo, usize, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        match self {
            Src::Mem(m) => memory_chunks(m, |_, info, at, b| f(info, at, b)),
            Src::Ref(r) => r.for_each_chunk(|_, info, at, b| f(info, at, b)),
        }
    }
}

/// Checks a result's tensors against its reference's: each one the reference has, with the
/// same shape and dtype, and when `complete` every one of the reference's.
fn check_tensors(
    reference: &[TensorInfo],
    result: &[TensorInfo],
    complete: bool,
) -> Result<(), AggregateError> {
    let by_name: BTreeMap<&str, &TensorInfo> =
        reference.iter().map(|t| (t.name.as_str(), t)).collect();
    for t in result {
        let Some(r) = by_name.get(t.name.as_str()) else {
            return Err(ModelError::Incompatible {
                name: t.name.clone(),
                reason: "unexpected tensor".into(),
            }
            .into());
        };
        if r.shape != t.shape || r.dtype != t.dtype {
            return Err(ModelError::Incompatible {
                name: t.name.clone(),
                reason: format!(
                    "expected {:?} {:?}, got {:?} {:?}",
                    r.dtype, r.shape, t.dtype, t.shape
                ),
            }
            .into());
        }
    }
    if complete {
        let names: std::collections::BTreeSet<&str> =
            result.iter().map(|t| t.name.as_str()).collect();
        if let Some(missing) = reference.iter().find(|t| !names.contains(t.name.as_str())) {
            return Err(AggregateError::Missing(missing.name.clone()));
        }
    }
    Ok(())
}

impl FedAvg {
    /// An empty aggregator that averages each tensor over the results that carry it.
    pub fn new() -> Self {
        FedAvg::default()
    }

    /// An empty aggregator that refuses a result lacking any tensor of its reference
    /// ([`AggregateError::Missing`]): the check of the robust rules.
    pub fn complete() -> Self {
        FedAvg {
            complete: true,
            ..FedAvg::default()
        }
    }

    /// Number of results folded in so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Sum of the weights folded in so far.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// Checks `result` against `reference` (the global model it was trained from) and folds it
    /// in with `weight`. On error nothing is changed.
    pub fn add(
        &mut self,
        reference: &FLModel,
        result: &FLModel,
        weight: f64,
    ) -> Result<(), AggregateError> {
        self.add_src(Src::Mem(reference), Src::Mem(result), weight)
    }

    /// Like [`FedAvg::add`] for models in memory or stored. A stored result is read twice, a
    /// chunk at a time: once to check it (nothing changes when it is refused), once to fold
    /// it in. Should the second read fail, the aggregate is lost ([`AggregateError::Poisoned`]
    /// from then on).
    pub fn add_ref(
        &mut self,
        reference: &ModelRef,
        result: &ModelRef,
        weight: f64,
    ) -> Result<(), AggregateError> {
        self.add_src(Src::Ref(reference), Src::Ref(result), weight)
    }

    fn add_src(
        &mut self,
        reference: Src<'_>,
        result: Src<'_>,
        weight: f64,
    ) -> Result<(), AggregateError> {
        if let Some(p) = &self.poisoned {
            return Err(AggregateError::Poisoned(p.clone()));
        }
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::BadWeight(weight));
        }
        let layout = result.tensors();
        if let Some(t) = layout
            .iter()
            .find(|t| matches!(t.dtype, DType::I8 | DType::U32))
        {
            return Err(AggregateError::Quantized(t.name.clone()));
        }
        check_tensors(&reference.tensors(), &layout, self.complete)?;
        let params_type = result.params_type();
        if let Some(expected) = self.params_type
            && expected != params_type
        {
            return Err(AggregateError::MixedParamsType {
                expected,
                got: params_type,
            });
        }
        result.chunks(|info, _, bytes| {
            let mut finite = true;
            if is_float(info.dtype) {
                widen(info.dtype, 0, bytes, |_, v| finite &= v.is_finite());
            }
            if finite {
                Ok(())
            } else {
                Err(AggregateError::NonFinite(info.name.clone()))
            }
        })?;
        // A partial carries Σ wᵢ·xᵢ: divided by its own weight it is the mean it stands for.
        let scale = match result.partial_weight() {
            None => 1.0,
            Some(w) if w.is_finite() && w > 0.0 => 1.0 / w,
            Some(w) => return Err(AggregateError::BadWeight(w)),
        };
        self.params_type = Some(params_type);
        let scale32 = scale as f32;
        for t in &layout {
            self.sums.entry(t.name.clone()).or_insert_with(|| Slot {
                acc: match t.dtype {
                    DType::F32 => Acc::F32Mean(vec![0; t.byte_len().unwrap_or(0)]),
                    _ => Acc::Wide(vec![0.0; numel(&t.shape).unwrap_or(0)]),
                },
                weight: 0.0,
            });
        }
        let sums = &mut self.sums;
        let folded = result.chunks(|info, at, bytes| -> Result<(), AggregateError> {
            let Some(slot) = sums.get_mut(&info.name) else {
                return Ok(());
            };
            // This result's share of the tensor's mean over the results that carried it.
            let share = (weight / (slot.weight + weight)) as f32;
            match &mut slot.acc {
                Acc::F32Mean(mean) => {
                    let Some(dst) = mean.get_mut(at..at + bytes.len()) else {
                        return Ok(());
                    };
                    for (m, x) in dst.chunks_exact_mut(4).zip(bytes.chunks_exact(4)) {
                        let old = read_f32(m);
                        let v = old + share * (read_f32(x) * scale32 - old);
                        m.copy_from_slice(&v.to_le_bytes());
                    }
                }
                Acc::Wide(sum) => widen(info.dtype, at / info.dtype.size(), bytes, |i, v| {
                    if let Some(s) = sum.get_mut(i) {
                        *s += weight * scale * v;
                    }
                }),
            }
            Ok(())
        });
        if let Err(e) = folded {
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        for t in &layout {
            if let Some(slot) = self.sums.get_mut(&t.name) {
                slot.weight += weight;
            }
        }
        for (k, v) in result.metrics() {
            if v.is_finite() {
                let e = self.metric_sums.entry(k.clone()).or_insert((0.0, 0.0));
                e.0 += weight * v;
                e.1 += weight;
            }
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
    }

    /// The weighted average of the metrics reported with the results; a metric counts only
    /// the results that reported it.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        self.metric_sums
            .iter()
            .map(|(k, (sum, w))| (k.clone(), sum / w))
            .collect()
    }

    /// The new global model: the weighted average of full weights, or `base` plus the
    /// weighted average of diffs, tensor by tensor over the results that carried it; a tensor
    /// no result carried is `base`'s. Tensors keep the dtype of `base`.
    pub fn finish(self, base: &FLModel) -> Result<FLModel, AggregateError> {
        self.finish_src(Src::Mem(base))
    }

    /// Like [`FedAvg::finish`] with a base in memory or stored (read a chunk at a time). An f32
    /// tensor's running mean becomes the new tensor in place: finishing allocates nothing
    /// for it.
    pub fn finish_ref(self, base: &ModelRef) -> Result<FLModel, AggregateError> {
        self.finish_src(Src::Ref(base))
    }

    fn finish_src(mut self, base: Src<'_>) -> Result<FLModel, AggregateError> {
        if let Some(p) = self.poisoned {
            return Err(AggregateError::Poisoned(p));
        }
        if self.count == 0 {
            return Err(AggregateError::Empty);
        }
        let diff = self.params_type == Some(ParamsType::Diff);
        let layout = base.tensors();
        if let Some(name) = self
            .sums
            .keys()
            .find(|n| !layout.iter().any(|t| &t.name == *n))
        {
            return Err(ModelError::Incompatible {
                name: name.clone(),
                reason: "missing in base".into(),
            }
            .into());
        }
        let mut params = BTreeMap::new();
        let sums = &mut self.sums;
        // The tensor being built from a wide sum (or an f32 mean onto another dtype), or
        // copied from the base when no result carried it.
        let mut out: Vec<u8> = Vec::new();
        base.chunks(|info, at, bytes| -> Result<(), AggregateError> {
            let len = info.byte_len().unwrap_or(0);
            let last = at + bytes.len() == len;
            let Some(slot) = sums.get_mut(&info.name) else {
                if at == 0 {
                    out = Vec::with_capacity(len);
                }
                out.extend_from_slice(bytes);
                if last {
                    params.insert(
                        info.name.clone(),
                        Tensor::from_bytes(
                            info.dtype,
                            info.shape.clone(),
                            std::mem::take(&mut out),
                        )?,
                    );
                }
                return Ok(());
            };
            let total = slot.weight;
            let first = at / info.dtype.size();
            match &mut slot.acc {
                Acc::F32Mean(mean) if info.dtype == DType::F32 => {
                    if diff && let Some(dst) = mean.get_mut(at..at + bytes.len()) {
                        for (m, x) in dst.chunks_exact_mut(4).zip(bytes.chunks_exact(4)) {
                            let v = read_f32(m) + read_f32(x);
                            m.copy_from_slice(&v.to_le_bytes());
                        }
                    }
                }
                Acc::F32Mean(mean) => {
                    if at == 0 {
                        out = Vec::with_capacity(len);
                    }
                    widen(info.dtype, first, bytes, |i, x| {
                        let m = mean.get(i * 4..i * 4 + 4).map_or(0.0, read_f32);
                        narrow(
                            info.dtype,
                            f64::from(m) + if diff { x } else { 0.0 },
                            &mut out,
                        );
                    });
                }
                Acc::Wide(sum) => {
                    if at == 0 {
                        out = Vec::with_capacity(len);
                    }
                    widen(info.dtype, first, bytes, |i, x| {
                        let s = sum.get(i).copied().unwrap_or(0.0);
                        narrow(info.dtype, s / total + if diff { x } else { 0.0 }, &mut out);
                    });
                }
            }
            if last {
                let data = match sums.remove(&info.name) {
                    Some(Slot {
                        acc: Acc::F32Mean(mean),
                        ..
                    }) if info.dtype == DType::F32 => mean,
                    _ => std::mem::take(&mut out),
                };
                params.insert(
                    info.name.clone(),
                    Tensor::from_bytes(info.dtype, info.shape.clone(), data)?,
                );
            }
            Ok(())
        })?;
        Ok(FLModel {
            params,
            params_type: ParamsType::Full,
            ..FLModel::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MetaValue;

    fn model(w: &[f32], b: &[i64], samples: i64) -> FLModel {
        let mut m = FLModel::from_params(BTreeMap::from([
            ("w".to_string(), Tensor::from_f32(vec![w.len()], w).unwrap()),
            ("n".to_string(), Tensor::from_i64(vec![b.len()], b).unwrap()),
        ]));
        m.meta
            .insert(META_NUM_SAMPLES.into(), MetaValue::Int(samples));
        m
    }

    fn f32s(m: &FLModel, name: &str) -> Vec<f32> {
        m.params[name].to_f32_vec()
    }

    /// FedAvg of `group`, as the partial its tier would send up.
    fn partial_of(group: &[&FLModel], base: &FLModel) -> FLModel {
        let mut agg = FedAvg::new();
        for m in group {
            agg.add(base, m, weight_of(m)).unwrap();
        }
        let (w, n) = (agg.total_weight(), agg.count());
        let samples = group.iter().map(|m| weight_of(m) as i64).sum();
        to_partial(agg.finish(base).unwrap(), w, samples, n).unwrap()
    }

    #[test]
    fn partials_merge_into_the_flat_average_and_not_one_to_one() {
        let base = model(&[0.0, 0.0], &[0], 1);
        let sites = [
            model(&[1.0, -2.0], &[10], 10),
            model(&[3.0, 0.5], &[20], 100),
            model(&[-1.0, 4.0], &[30], 1000),
            model(&[7.0, 1.0], &[40], 10),
            model(&[0.25, 2.0], &[50], 100),
            model(&[2.0, -3.0], &[60], 100),
        ];
        let mut flat = FedAvg::new();
        for m in &sites {
            flat.add(&base, m, weight_of(m)).unwrap();
        }
        let flat = flat.finish(&base).unwrap();
        let eu = partial_of(&[&sites[0], &sites[1], &sites[2]], &base);
        let us = partial_of(&[&sites[3], &sites[4], &sites[5]], &base);
        assert_eq!(weight_of(&eu), 1110.0);
        assert_eq!(eu.meta_int(META_PARTIAL_SAMPLES), Some(1110));
        assert_eq!(eu.meta_int(META_PARTIAL_COUNT), Some(3));
        // The tensors are sums, not means: eu's w[0] is 10·1 + 100·3 + 1000·(−1).
        assert!((f32s(&eu, "w")[0] - (-690.0)).abs() < 1e-3);
        let mut top = FedAvg::new();
        for p in [&eu, &us] {
            top.add(&base, p, weight_of(p)).unwrap();
        }
        let tiered = top.finish(&base).unwrap();
        for (a, b) in f32s(&tiered, "w").iter().zip(f32s(&flat, "w")) {
            assert!(((a - b) / b).abs() < 1e-6, "{a} vs {b}");
        }
        // A nested tier: a partial of partials merges the same way.
        let nested = partial_of(&[&eu, &us], &base);
        assert_eq!(weight_of(&nested), 1320.0);
        let mut again = FedAvg::new();
        again.add(&base, &nested, weight_of(&nested)).unwrap();
        let again = again.finish(&base).unwrap();
        for (a, b) in f32s(&again, "w").iter().zip(f32s(&flat, "w")) {
            assert!(((a - b) / b).abs() < 1e-6, "{a} vs {b}");
        }
        // Regions counted 1:1 (FLARE's hub: bare means, weight 1) give another model.
        let mean = |p: &FLModel| {
            let mut m = FLModel::from_params(p.params.clone());
            let w = weight_of(p) as f32;
            m.params.insert(
                "w".into(),
                Tensor::from_f32(
                    vec![2],
                    &f32s(p, "w").iter().map(|x| x / w).collect::<Vec<_>>(),
                )
                .unwrap(),
            );
            m
        };
        let mut one_to_one = FedAvg::new();
        for p in [&eu, &us] {
            one_to_one.add(&base, &mean(p), 1.0).unwrap();
        }
        let wrong = one_to_one.finish(&base).unwrap();
        assert!((f32s(&wrong, "w")[0] - f32s(&flat, "w")[0]).abs() > 0.1);
    }

    #[test]
    fn partials_refuse_half_precision_and_bad_weights() {
        let half = FLModel::from_params(BTreeMap::from([(
            "h".to_string(),
            Tensor::zeros(DType::F16, vec![2]).unwrap(),
        )]));
        assert!(matches!(
            to_partial(half, 3.0, 3, 1),
            Err(PartialError::Dtype { .. })
        ));
        let base = model(&[0.0, 0.0], &[0], 1);
        assert_eq!(
            to_partial(base.clone(), 0.0, 0, 1),
            Err(PartialError::BadWeight(0.0))
        );
        let mut forged = model(&[1.0, 1.0], &[1], 1);
        forged
            .meta
            .insert(META_PARTIAL_WEIGHT.into(), MetaValue::Text("lots".into()));
        let mut agg = FedAvg::new();
        assert!(matches!(
            agg.add(&base, &forged, weight_of(&forged)),
            Err(AggregateError::BadWeight(_))
        ));
        assert_eq!(agg.count(), 0);
    }

    #[test]
    fn weighted_average_is_exact_for_known_inputs() {
        let base = model(&[0.0, 0.0], &[0], 1);
        let mut agg = FedAvg::new();
        let a = model(&[1.0, 2.0], &[10], 1);
        let b = model(&[5.0, 6.0], &[30], 3);
        agg.add(&base, &a, weight_of(&a)).unwrap();
        agg.add(&base, &b, weight_of(&b)).unwrap();
        assert_eq!(agg.count(), 2);
        assert_eq!(agg.total_weight(), 4.0);
        let out = agg.finish(&base).unwrap();
        // (1*1 + 3*5)/4 = 4, (1*2 + 3*6)/4 = 5, (10 + 90)/4 = 25.
        assert_eq!(f32s(&out, "w"), vec![4.0, 5.0]);
        assert_eq!(out.params["n"].to_f32_vec(), vec![25.0]);
        assert_eq!(out.params["n"].dtype(), DType::I64);
    }

    #[test]
    fn equal_weights_give_the_plain_mean_for_every_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::I64] {
            let mk = |vals: [f64; 3]| {
                let like = Tensor::zeros(dtype, vec![3]).unwrap();
                FLModel::from_params(BTreeMap::from([(
                    "t".to_string(),
                    Tensor::from_f64_like(&like, vals.into_iter()),
                )]))
            };
            let base = mk([0.0; 3]);
            let mut agg = FedAvg::new();
            agg.add(&base, &mk([2.0, 4.0, -8.0]), 1.0).unwrap();
            agg.add(&base, &mk([4.0, 8.0, 0.0]), 1.0).unwrap();
            let out = agg.finish(&base).unwrap();
            assert_eq!(out.params["t"].dtype(), dtype);
            assert_eq!(
                out.params["t"].to_f32_vec(),
                vec![3.0, 6.0, -4.0],
                "{dtype:?}"
            );
        }
    }

    #[test]
    fn diffs_are_added_to_the_base() {
        let base = model(&[10.0, 20.0], &[100], 1);
        let mut d1 = model(&[1.0, -1.0], &[2], 1);
        d1.params_type = ParamsType::Diff;
        let mut d2 = model(&[3.0, 1.0], &[4], 1);
        d2.params_type = ParamsType::Diff;
        let mut agg = FedAvg::new();
        agg.add(&base, &d1, 1.0).unwrap();
        agg.add(&base, &d2, 1.0).unwrap();
        let out = agg.finish(&base).unwrap();
        assert_eq!(f32s(&out, "w"), vec![12.0, 20.0]);
        assert_eq!(out.params["n"].to_f32_vec(), vec![103.0]);
        assert_eq!(out.params_type, ParamsType::Full);
    }

    #[test]
    fn bad_results_are_refused_and_change_nothing() {
        let base = model(&[0.0, 0.0], &[0], 1);
        let mut agg = FedAvg::new();
        agg.add(&base, &model(&[2.0, 2.0], &[2], 1), 1.0).unwrap();
        let wrong_shape = model(&[1.0], &[1], 1);
        assert!(matches!(
            agg.add(&base, &wrong_shape, 1.0),
            Err(AggregateError::Model(ModelError::Incompatible { .. }))
        ));
        assert!(matches!(
            agg.add(&base, &model(&[f32::NAN, 1.0], &[1], 1), 1.0),
            Err(AggregateError::NonFinite(ref n)) if n == "w"
        ));
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                agg.add(&base, &model(&[1.0, 1.0], &[1], 1), w),
                Err(AggregateError::BadWeight(_))
            ));
        }
        let mut diff = model(&[1.0, 1.0], &[1], 1);
        diff.params_type = ParamsType::Diff;
        assert!(matches!(
            agg.add(&base, &diff, 1.0),
            Err(AggregateError::MixedParamsType { .. })
        ));
        assert_eq!(agg.count(), 1);
        assert_eq!(f32s(&agg.finish(&base).unwrap(), "w"), vec![2.0, 2.0]);
    }

    /// A model of the named f32 tensors (and `n`, i64, when given).
    fn some(tensors: &[(&str, &[f32])], n: Option<i64>, kind: ParamsType) -> FLModel {
        let mut m = FLModel::from_params(
            tensors
                .iter()
                .map(|(name, v)| {
                    (
                        name.to_string(),
                        Tensor::from_f32(vec![v.len()], v).unwrap(),
                    )
                })
                .collect(),
        );
        if let Some(n) = n {
            m.params
                .insert("n".into(), Tensor::from_i64(vec![1], &[n]).unwrap());
        }
        m.params_type = kind;
        m
    }

    #[test]
    fn partial_results_are_averaged_per_tensor_and_the_rest_keeps_the_base() {
        let full = ParamsType::Full;
        let base = some(&[("w", &[0.0, 0.0]), ("z", &[7.5])], Some(0), full);
        let a = some(&[("w", &[1.0, 2.0])], Some(10), full);
        let b = some(&[("w", &[5.0, 6.0])], None, full);
        let c = some(&[], Some(40), full);
        let mut agg = FedAvg::new();
        agg.add(&base, &a, 1.0).unwrap();
        agg.add(&base, &b, 3.0).unwrap();
        agg.add(&base, &c, 2.0).unwrap();
        assert_eq!(agg.count(), 3);
        assert_eq!(agg.total_weight(), 6.0);
        let out = agg.finish(&base).unwrap();
        // w over a and b: (1·1 + 3·5)/4, (1·2 + 3·6)/4; n over a and c: (1·10 + 2·40)/3;
        // z, which nobody sent, is the base's.
        assert_eq!(f32s(&out, "w"), vec![4.0, 5.0]);
        assert_eq!(out.params["n"].to_f32_vec(), vec![30.0]);
        assert_eq!(out.params["z"], base.params["z"]);
        // The same from stored models.
        let mut st = FedAvg::new();
        let sbase = stored(&base);
        for (m, w) in [(&a, 1.0), (&b, 3.0), (&c, 2.0)] {
            st.add_ref(&sbase, &stored(m), w).unwrap();
        }
        assert_eq!(st.finish_ref(&sbase).unwrap(), out);
    }

    #[test]
    fn partial_diffs_add_their_per_tensor_mean_to_the_base() {
        let diff = ParamsType::Diff;
        let base = some(
            &[("w", &[10.0, 20.0]), ("z", &[7.5])],
            Some(100),
            ParamsType::Full,
        );
        let a = some(&[("w", &[1.0, -1.0])], Some(2), diff);
        let b = some(&[("w", &[3.0, 1.0])], None, diff);
        let mut agg = FedAvg::new();
        agg.add(&base, &a, 1.0).unwrap();
        agg.add(&base, &b, 1.0).unwrap();
        let out = agg.finish(&base).unwrap();
        assert_eq!(f32s(&out, "w"), vec![12.0, 20.0]);
        // n from a alone: 100 + 2; z from nobody: 7.5 + 0.
        assert_eq!(out.params["n"].to_f32_vec(), vec![102.0]);
        assert_eq!(f32s(&out, "z"), vec![7.5]);
        assert_eq!(out.params_type, ParamsType::Full);
    }

    #[test]
    fn a_complete_fedavg_refuses_a_partial_result_and_both_refuse_strangers() {
        let base = model(&[0.0, 0.0], &[0], 1);
        let partial = some(&[("w", &[1.0, 1.0])], None, ParamsType::Full);
        let mut robust = FedAvg::complete();
        assert_eq!(
            robust.add(&base, &partial, 1.0),
            Err(AggregateError::Missing("n".into()))
        );
        assert!(
            AggregateError::Missing("n".into())
                .to_string()
                .contains("lacks tensor \"n\"")
        );
        assert_eq!(robust.count(), 0);
        robust
            .add(&base, &model(&[1.0, 1.0], &[1], 1), 1.0)
            .unwrap();
        // A tensor the global model lacks, or of another shape, is refused either way.
        for mut agg in [FedAvg::new(), FedAvg::complete()] {
            let extra = some(
                &[("w", &[1.0, 1.0]), ("x", &[1.0])],
                Some(1),
                ParamsType::Full,
            );
            assert!(matches!(
                agg.add(&base, &extra, 1.0),
                Err(AggregateError::Model(ModelError::Incompatible { ref name, .. })) if name == "x"
            ));
            let short = some(&[("w", &[1.0])], None, ParamsType::Full);
            assert!(matches!(
                agg.add(&base, &short, 1.0),
                Err(AggregateError::Model(ModelError::Incompatible { ref name, .. })) if name == "w"
            ));
            assert_eq!(agg.count(), 0);
        }
    }

    #[test]
    fn metrics_are_weighted_by_the_results_that_report_them() {
        let base = model(&[0.0], &[0], 1);
        let mut a = model(&[0.0], &[0], 1);
        a.metrics.insert("accuracy".into(), 0.5);
        let mut b = model(&[0.0], &[0], 3);
        b.metrics.insert("accuracy".into(), 0.9);
        b.metrics.insert("loss".into(), 2.0);
        let mut agg = FedAvg::new();
        agg.add(&base, &a, weight_of(&a)).unwrap();
        agg.add(&base, &b, weight_of(&b)).unwrap();
        let m = agg.metrics();
        assert!((m["accuracy"] - 0.8).abs() < 1e-12);
        assert_eq!(m["loss"], 2.0);
    }

    #[test]
    fn weight_prefers_samples_then_steps() {
        let mut m = FLModel::default();
        assert_eq!(weight_of(&m), 1.0);
        m.meta.insert(META_NUM_STEPS.into(), MetaValue::Int(7));
        assert_eq!(weight_of(&m), 7.0);
        m.meta.insert(META_NUM_SAMPLES.into(), MetaValue::Int(70));
        assert_eq!(weight_of(&m), 70.0);
    }

    #[test]
    fn finishing_empty_is_an_error() {
        assert_eq!(
            FedAvg::new().finish(&FLModel::default()).unwrap_err(),
            AggregateError::Empty
        );
    }

    fn stored(m: &FLModel) -> ModelRef {
        ModelRef::Stored(std::sync::Arc::new(
            crate::stored::StoredModel::from_memory(m),
        ))
    }

    #[test]
    fn stored_results_and_base_aggregate_like_memory_ones() {
        for diff in [false, true] {
            let base = model(&[10.0, 20.0], &[100], 1);
            let mut a = model(&[1.0, -1.0], &[2], 1);
            let mut b = model(&[3.0, 1.0], &[4], 3);
            if diff {
                a.params_type = ParamsType::Diff;
                b.params_type = ParamsType::Diff;
            }
            let mut mem = FedAvg::new();
            mem.add(&base, &a, 1.0).unwrap();
            mem.add(&base, &b, 3.0).unwrap();
            let want = mem.finish(&base).unwrap();
            let mut st = FedAvg::new();
            let sbase = stored(&base);
            st.add_ref(&sbase, &stored(&a), 1.0).unwrap();
            st.add_ref(&sbase, &ModelRef::from(b.clone()), 3.0).unwrap();
            assert_eq!(st.finish_ref(&sbase).unwrap(), want, "diff {diff}");
        }
    }

    #[test]
    fn a_stored_result_with_a_late_nan_changes_nothing() {
        let base = model(&[0.0, 0.0], &[0], 1);
        let sbase = stored(&base);
        let mut agg = FedAvg::new();
        agg.add_ref(&sbase, &stored(&model(&[2.0, 2.0], &[2], 1)), 1.0)
            .unwrap();
        let bad = stored(&model(&[1.0, f32::INFINITY], &[1], 1));
        assert!(matches!(
            agg.add_ref(&sbase, &bad, 1.0),
            Err(AggregateError::NonFinite(ref n)) if n == "w"
        ));
        assert_eq!(agg.count(), 1);
        assert_eq!(f32s(&agg.finish_ref(&sbase).unwrap(), "w"), vec![2.0, 2.0]);
    }

    #[test]
    fn a_source_that_fails_while_folding_loses_the_aggregate_loudly() {
        #[derive(Debug)]
        struct FailsSecondTime(std::sync::atomic::AtomicUsize);
        impl crate::stored::TensorSource for FailsSecondTime {
            fn read_at(&self, _: usize, _: u64, buf: &mut [u8]) -> Result<(), String> {
                if self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 1 {
                    return Err("disk gone".into());
                }
                buf.fill(0);
                Ok(())
            }
        }
        let base = FLModel::from_params(BTreeMap::from([(
            "w".to_string(),
            Tensor::zeros(DType::F32, vec![2]).unwrap(),
        )]));
        let src = crate::stored::StoredModel::new(
            ModelRef::from(base.clone()).tensors(),
            std::sync::Arc::new(FailsSecondTime(Default::default())),
        )
        .unwrap();
        let mut agg = FedAvg::new();
        let r = agg.add_ref(
            &ModelRef::from(base.clone()),
            &ModelRef::Stored(std::sync::Arc::new(src)),
            1.0,
        );
        assert!(matches!(r, Err(AggregateError::Source(_))), "{r:?}");
        assert!(matches!(
            agg.finish(&base),
            Err(AggregateError::Poisoned(ref why)) if why.contains("disk gone")
        ));
    }
}
