//! Weighted federated averaging (FedAvg) that streams: each result is folded into one running
//! accumulator as it arrives and can be dropped at once, so memory holds one accumulator, not
//! N models.
//!
//! f32 tensors keep a running weighted *mean* in f32 (`m += w/W · (x − m)`) rather than a
//! running sum: its rounding error grows with the number of results, not with the size of
//! the sum, and it needs no second buffer at the end. Other dtypes sum in f64.

use std::collections::BTreeMap;

use crate::model::{
    DType, FLModel, META_NUM_SAMPLES, META_NUM_STEPS, ModelError, ParamsType, Tensor, numel,
};
use crate::stored::{ModelRef, SourceError, TensorInfo, check_layout, layout_of, memory_chunks};

/// Why a result could not be aggregated.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    /// The result's tensors do not match the global model.
    #[error(transparent)]
    Model(#[from] ModelError),
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

/// The aggregation weight of a result: its sample count, else its step count, else 1.
pub fn weight_of(model: &FLModel) -> f64 {
    model
        .meta_int(META_NUM_SAMPLES)
        .or_else(|| model.meta_int(META_NUM_STEPS))
        .map_or(1.0, |n| n as f64)
}

/// [`weight_of`] for a model in memory or stored.
pub fn weight_of_ref(model: &ModelRef) -> f64 {
    model
        .meta_int(META_NUM_SAMPLES)
        .or_else(|| model.meta_int(META_NUM_STEPS))
        .map_or(1.0, |n| n as f64)
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

/// Streaming weighted average of models with identical tensor names, shapes and dtypes.
#[derive(Debug, Default)]
pub struct FedAvg {
    sums: BTreeMap<String, Acc>,
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

impl FedAvg {
    /// An empty aggregator.
    pub fn new() -> Self {
        FedAvg::default()
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
        if let Some(t) = layout.iter().find(|t| t.dtype == DType::I8) {
            return Err(AggregateError::Quantized(t.name.clone()));
        }
        check_layout(&reference.tensors(), &layout)?;
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
        self.params_type = Some(params_type);
        // This result's share of the mean over everything folded in so far.
        let share = (weight / (self.total_weight + weight)) as f32;
        for t in &layout {
            self.sums
                .entry(t.name.clone())
                .or_insert_with(|| match t.dtype {
                    DType::F32 => Acc::F32Mean(vec![0; t.byte_len().unwrap_or(0)]),
                    _ => Acc::Wide(vec![0.0; numel(&t.shape).unwrap_or(0)]),
                });
        }
        let sums = &mut self.sums;
        let folded = result.chunks(|info, at, bytes| -> Result<(), AggregateError> {
            let Some(acc) = sums.get_mut(&info.name) else {
                return Ok(());
            };
            match acc {
                Acc::F32Mean(mean) => {
                    let Some(dst) = mean.get_mut(at..at + bytes.len()) else {
                        return Ok(());
                    };
                    for (m, x) in dst.chunks_exact_mut(4).zip(bytes.chunks_exact(4)) {
                        let old = read_f32(m);
                        let v = old + share * (read_f32(x) - old);
                        m.copy_from_slice(&v.to_le_bytes());
                    }
                }
                Acc::Wide(sum) => widen(info.dtype, at / info.dtype.size(), bytes, |i, v| {
                    if let Some(s) = sum.get_mut(i) {
                        *s += weight * v;
                    }
                }),
            }
            Ok(())
        });
        if let Err(e) = folded {
            self.poisoned = Some(e.to_string());
            return Err(e);
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
    /// weighted average of diffs. Tensors keep the dtype of `base`.
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
        let total = self.total_weight;
        let diff = self.params_type == Some(ParamsType::Diff);
        let layout = base.tensors();
        if let Some(t) = layout.iter().find(|t| !self.sums.contains_key(&t.name)) {
            return Err(ModelError::Incompatible {
                name: t.name.clone(),
                reason: "not in the results".into(),
            }
            .into());
        }
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
        // The tensor being built from a wide sum (or an f32 mean onto another dtype).
        let mut out: Vec<u8> = Vec::new();
        base.chunks(|info, at, bytes| -> Result<(), AggregateError> {
            let len = info.byte_len().unwrap_or(0);
            let last = at + bytes.len() == len;
            let Some(acc) = sums.get_mut(&info.name) else {
                return Ok(());
            };
            let first = at / info.dtype.size();
            match acc {
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
                    Some(Acc::F32Mean(mean)) if info.dtype == DType::F32 => mean,
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
