//! Conversion between [`FLModel`] and the safetensors format, so PyTorch users can
//! `safetensors.torch.load_file` what Flare writes, and Flare can read what they save.
//!
//! Only the byte layout lives here; reading and writing files is the caller's business
//! (`safetensors::serialize_to_file` streams tensors through [`Tensor`]'s `View`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::model::{DType, FLModel, ModelError, ParamsType, Tensor};

/// Metadata key under which the params type is stored.
pub const META_PARAMS_TYPE: &str = "flare.params_type";
/// Metadata key under which the round is stored.
pub const META_ROUND: &str = "flare.round";
/// Prefix of metadata keys that carry metrics (`flare.metric.accuracy`).
pub const META_METRIC_PREFIX: &str = "flare.metric.";

fn to_st(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I8 => Dtype::I8,
        DType::U32 => Dtype::U32,
    }
}

impl View for &Tensor {
    fn dtype(&self) -> Dtype {
        to_st(Tensor::dtype(self))
    }
    fn shape(&self) -> &[usize] {
        Tensor::shape(self)
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.bytes())
    }
    fn data_len(&self) -> usize {
        self.bytes().len()
    }
}

/// The safetensors header metadata Flare writes for `model`: params type, round and metrics.
pub fn metadata(model: &FLModel) -> HashMap<String, String> {
    let mut m = HashMap::new();
    let pt = match model.params_type {
        ParamsType::Full => "full",
        ParamsType::Diff => "diff",
    };
    m.insert(META_PARAMS_TYPE.to_string(), pt.to_string());
    if let Some(r) = model.current_round {
        m.insert(META_ROUND.to_string(), r.to_string());
    }
    for (k, v) in &model.metrics {
        m.insert(format!("{META_METRIC_PREFIX}{k}"), v.to_string());
    }
    m
}

/// Encodes `model` as a safetensors byte buffer (use for small models; large ones go
/// straight to a file with `safetensors::serialize_to_file`).
pub fn to_bytes(model: &FLModel) -> Result<Vec<u8>, ModelError> {
    safetensors::serialize(
        model.params.iter().map(|(k, v)| (k.as_str(), v)),
        Some(metadata(model)),
    )
    .map_err(|e| ModelError::Safetensors(e.to_string()))
}

/// Params type, round and metrics from a safetensors header's metadata (what
/// [`metadata`] writes).
pub fn read_metadata(
    meta: &HashMap<String, String>,
) -> (ParamsType, Option<u32>, BTreeMap<String, f64>) {
    let params_type = if meta.get(META_PARAMS_TYPE).map(String::as_str) == Some("diff") {
        ParamsType::Diff
    } else {
        ParamsType::Full
    };
    let round = meta.get(META_ROUND).and_then(|r| r.parse().ok());
    let mut metrics = BTreeMap::new();
    for (k, v) in meta {
        if let (Some(name), Ok(v)) = (k.strip_prefix(META_METRIC_PREFIX), v.parse::<f64>()) {
            metrics.insert(name.to_string(), v);
        }
    }
    (params_type, round, metrics)
}

/// Decodes a safetensors buffer into a model, refusing dtypes Flare does not carry.
pub fn from_bytes(bytes: &[u8]) -> Result<FLModel, ModelError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors(e.to_string()))?;
    let mut params = BTreeMap::new();
    for (name, view) in st.iter() {
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::I64 => DType::I64,
            Dtype::I8 => DType::I8,
            Dtype::U32 => DType::U32,
            other => {
                return Err(ModelError::UnsupportedDType {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let t = Tensor::from_bytes(dtype, view.shape().to_vec(), view.data().to_vec()).map_err(
            |e| match e {
                ModelError::LengthMismatch {
                    len, shape, dtype, ..
                } => ModelError::LengthMismatch {
                    name: name.to_string(),
                    len,
                    shape,
                    dtype,
                },
                other => other,
            },
        )?;
        params.insert(name.to_string(), t);
    }
    let mut model = FLModel::from_params(params);
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Safetensors(e.to_string()))?;
    if let Some(meta) = header.metadata() {
        (model.params_type, model.current_round, model.metrics) = read_metadata(meta);
    }
    model.check_names()?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn round_trip_keeps_names_shapes_dtypes_and_metrics() {
        let mut m = FLModel::from_params(BTreeMap::from([
            (
                "fc1.weight".to_string(),
                Tensor::from_f32(vec![2, 3], &[1., 2., 3., 4., 5., 6.]).unwrap(),
            ),
            (
                "bn.num_batches_tracked".to_string(),
                Tensor::from_i64(vec![], &[42]).unwrap(),
            ),
            (
                "half".to_string(),
                Tensor::zeros(DType::BF16, vec![4]).unwrap(),
            ),
        ]));
        m.metrics.insert("accuracy".into(), 0.875);
        m.current_round = Some(3);
        let bytes = to_bytes(&m).unwrap();
        let back = from_bytes(&bytes).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let raw: Vec<u8> = vec![1, 2];
        let view = safetensors::tensor::TensorView::new(Dtype::U8, vec![2], &raw).unwrap();
        let bytes = safetensors::serialize([("bytes", view)], None).unwrap();
        let err = from_bytes(&bytes).unwrap_err();
        assert!(matches!(err, ModelError::UnsupportedDType { ref name, .. } if name == "bytes"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = from_bytes(&bytes);
        }

        #[test]
        fn header_mutations_never_panic(at in 0usize..64, x in any::<u8>()) {
            let m = FLModel::from_params(BTreeMap::from([(
                "w".to_string(),
                Tensor::from_f32(vec![3], &[1., 2., 3.]).unwrap(),
            )]));
            let mut bytes = to_bytes(&m).unwrap();
            let i = at % bytes.len();
            bytes[i] ^= x;
            let _ = from_bytes(&bytes);
        }
    }
}
