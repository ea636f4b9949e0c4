//! Weighted federated averaging (FedAvg) that streams: each result is folded into one running
//! accumulator as it arrives and can be dropped at once, so memory holds one accumulator, not
//! N models.
//!
//! f32 tensors keep a running weighted *mean* in f32 (`m += w/W · (x − m)`) rather than a
//! running sum: its rounding error grows with the number of results, not with the size of
//! the sum, and it needs no second buffer at the end. Other dtypes sum in f64.

use std::collections::BTreeMap;

use crate::model::{
    DType, FLModel, META_NUM_SAMPLES, META_NUM_STEPS, ModelError, ParamsType, Tensor,
};

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
}

/// The aggregation weight of a result: its sample count, else its step count, else 1.
pub fn weight_of(model: &FLModel) -> f64 {
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
}

fn read_f32(c: &[u8]) -> f32 {
    f32::from_le_bytes([c[0], c[1], c[2], c[3]])
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
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::BadWeight(weight));
        }
        if let Some((name, _)) = result.params.iter().find(|(_, t)| t.dtype() == DType::I8) {
            return Err(AggregateError::Quantized(name.clone()));
        }
        reference.check_compatible(result)?;
        if let Some(expected) = self.params_type
            && expected != result.params_type
        {
            return Err(AggregateError::MixedParamsType {
                expected,
                got: result.params_type,
            });
        }
        for (name, t) in &result.params {
            if matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
                let mut finite = true;
                t.for_each_f64(|_, v| finite &= v.is_finite());
                if !finite {
                    return Err(AggregateError::NonFinite(name.clone()));
                }
            }
        }
        self.params_type = Some(result.params_type);
        // This result's share of the mean over everything folded in so far.
        let share = (weight / (self.total_weight + weight)) as f32;
        for (name, t) in &result.params {
            let acc = self
                .sums
                .entry(name.clone())
                .or_insert_with(|| match t.dtype() {
                    DType::F32 => Acc::F32Mean(vec![0; t.bytes().len()]),
                    _ => Acc::Wide(vec![0.0; t.numel()]),
                });
            match acc {
                Acc::F32Mean(mean) => {
                    for (m, x) in mean.chunks_exact_mut(4).zip(t.bytes().chunks_exact(4)) {
                        let old = read_f32(m);
                        let v = old + share * (read_f32(x) - old);
                        m.copy_from_slice(&v.to_le_bytes());
                    }
                }
                Acc::Wide(sum) => t.for_each_f64(|i, v| sum[i] += weight * v),
            }
        }
        for (k, v) in &result.metrics {
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
        if self.count == 0 {
            return Err(AggregateError::Empty);
        }
        let total = self.total_weight;
        let diff = self.params_type == Some(ParamsType::Diff);
        let mut params = BTreeMap::new();
        for (name, acc) in self.sums {
            let Some(b) = base.params.get(&name) else {
                return Err(ModelError::Incompatible {
                    name,
                    reason: "missing in base".into(),
                }
                .into());
            };
            let t = match acc {
                Acc::F32Mean(mut mean) if b.dtype() == DType::F32 => {
                    if diff {
                        for (m, x) in mean.chunks_exact_mut(4).zip(b.bytes().chunks_exact(4)) {
                            let v = read_f32(m) + read_f32(x);
                            m.copy_from_slice(&v.to_le_bytes());
                        }
                    }
                    Tensor::from_bytes(DType::F32, b.shape().to_vec(), mean)?
                }
                Acc::F32Mean(mean) => {
                    let mut base_vals = Vec::with_capacity(b.numel());
                    b.for_each_f64(|_, v| base_vals.push(v));
                    let vals = mean
                        .chunks_exact(4)
                        .zip(base_vals)
                        .map(|(m, x)| f64::from(read_f32(m)) + if diff { x } else { 0.0 });
                    Tensor::from_f64_like(b, vals)
                }
                Acc::Wide(sum) => {
                    let mut base_vals = Vec::with_capacity(b.numel());
                    b.for_each_f64(|_, v| base_vals.push(v));
                    let vals = sum
                        .into_iter()
                        .zip(base_vals)
                        .map(|(s, x)| s / total + if diff { x } else { 0.0 });
                    Tensor::from_f64_like(b, vals)
                }
            };
            params.insert(name, t);
        }
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
}
