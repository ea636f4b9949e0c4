//! CBOR encoding of wire types with explicit size limits.
//!
//! Decoding refuses input larger than the limit before reading it, refuses trailing bytes,
//! and relies on cbor4ii's depth limit and capped pre-allocation, so hostile bytes yield an
//! error rather than a panic or an allocation the sender chose.

use cbor4ii::core::dec::Read as _;
use cbor4ii::core::utils::SliceReader;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Default cap for control messages (tasks without models, status, acks): 1 MiB.
pub const MAX_CONTROL_MESSAGE: usize = 1 << 20;
/// Default cap for a message that carries a whole model in one piece: 1 GiB. Larger models
/// stream in chunks instead.
pub const MAX_MODEL_MESSAGE: usize = 1 << 30;

/// Why encoding or decoding failed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The encoded value would exceed the limit.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Actual or encoded size.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The bytes are not valid CBOR for the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Valid CBOR was followed by extra bytes.
    #[error("malformed message: {0} trailing bytes")]
    Trailing(usize),
    /// The value could not be serialized.
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// Encodes `value` as CBOR, failing if the result exceeds `limit` bytes.
pub fn encode<T: Serialize>(value: &T, limit: usize) -> Result<Vec<u8>, CodecError> {
    let bytes =
        cbor4ii::serde::to_vec(Vec::new(), value).map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

/// Decodes one CBOR value of type `T` that must fill `bytes` exactly.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, CodecError> {
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    let mut de = cbor4ii::serde::Deserializer::new(SliceReader::new(bytes));
    let value = T::deserialize(&mut de).map_err(|e| CodecError::Malformed(e.to_string()))?;
    let mut rest = de.into_inner();
    let left = match rest.fill(usize::MAX) {
        Ok(r) => r.as_ref().len(),
        Err(never) => match never {},
    };
    if left != 0 {
        return Err(CodecError::Trailing(left));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::model::{DType, FLModel, MetaValue, ParamsType, Tensor};
    use crate::shareable::{ReturnCode, Shareable, Task, TaskId, TaskResult};

    fn dtype() -> impl Strategy<Value = DType> {
        prop_oneof![
            Just(DType::F32),
            Just(DType::F16),
            Just(DType::BF16),
            Just(DType::I64)
        ]
    }

    fn tensor() -> impl Strategy<Value = Tensor> {
        (dtype(), prop::collection::vec(0usize..4, 0..3)).prop_flat_map(|(dt, shape)| {
            let n: usize = shape.iter().product();
            prop::collection::vec(any::<u8>(), n * dt.size())
                .prop_map(move |data| Tensor::from_bytes(dt, shape.clone(), data).unwrap())
        })
    }

    fn model() -> impl Strategy<Value = FLModel> {
        (
            prop::collection::btree_map("[a-z.]{1,12}", tensor(), 0..4),
            prop::bool::ANY,
            prop::collection::btree_map("[a-z]{1,6}", -1e6f64..1e6, 0..3),
            prop::collection::btree_map("[A-Z_]{1,8}", any::<i64>(), 0..3),
            prop::option::of(any::<u32>()),
        )
            .prop_map(|(params, diff, metrics, meta, round)| FLModel {
                params,
                params_type: if diff {
                    ParamsType::Diff
                } else {
                    ParamsType::Full
                },
                metrics,
                meta: meta
                    .into_iter()
                    .map(|(k, v)| (k, MetaValue::Int(v)))
                    .collect::<BTreeMap<_, _>>(),
                current_round: round,
                total_rounds: None,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn task_round_trips(m in model(), id in any::<u64>(), round in any::<u32>()) {
            let task = Task {
                id: TaskId(id),
                name: "train".into(),
                round,
                data: Shareable::with_model(Arc::new(m)),
            };
            let bytes = encode(&task, MAX_MODEL_MESSAGE).unwrap();
            let back: Task = decode(&bytes, MAX_MODEL_MESSAGE).unwrap();
            prop_assert_eq!(back, task);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Task>(&bytes, MAX_CONTROL_MESSAGE);
            let _ = decode::<TaskResult>(&bytes, MAX_CONTROL_MESSAGE);
            let _ = decode::<FLModel>(&bytes, MAX_CONTROL_MESSAGE);
        }

        #[test]
        fn mutated_messages_never_panic(m in model(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut bytes = encode(&Shareable::with_model(Arc::new(m)), MAX_MODEL_MESSAGE).unwrap();
            for (at, x) in flips {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] ^= x;
                }
            }
            // Whatever decodes must be internally consistent.
            if let Ok(s) = decode::<Shareable>(&bytes, MAX_MODEL_MESSAGE) {
                for t in s.model.iter().flat_map(|m| m.params.values()) {
                    prop_assert_eq!(t.bytes().len(), t.numel() * t.dtype().size());
                }
            }
        }
    }

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        let r = decode::<Task>(&vec![0u8; 2048], 1024);
        assert!(matches!(
            r,
            Err(CodecError::TooLarge {
                size: 2048,
                limit: 1024
            })
        ));
        let t = Tensor::zeros(DType::F32, vec![1024]).unwrap();
        let r = encode(&t, 1024);
        assert!(matches!(r, Err(CodecError::TooLarge { limit: 1024, .. })));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&TaskId(7), 64).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<TaskId>(&bytes, 64),
            Err(CodecError::Trailing(1))
        ));
    }

    #[test]
    fn tensor_with_lying_length_is_refused() {
        #[derive(serde::Serialize)]
        struct Raw {
            dtype: DType,
            shape: Vec<usize>,
            #[serde(with = "serde_bytes")]
            data: Vec<u8>,
        }
        let raw = Raw {
            dtype: DType::F32,
            shape: vec![4],
            data: vec![0; 8],
        };
        let bytes = encode(&raw, 1024).unwrap();
        let err = decode::<Tensor>(&bytes, 1024).unwrap_err();
        assert!(err.to_string().contains("do not match shape"), "{err}");
    }

    #[test]
    fn deep_nesting_is_an_error() {
        // 10,000 nested one-element arrays.
        let mut bytes = vec![0x81u8; 10_000];
        bytes.push(0x00);
        assert!(decode::<MetaValue>(&bytes, MAX_CONTROL_MESSAGE).is_err());
        let r = decode::<ReturnCode>(&bytes, MAX_CONTROL_MESSAGE);
        assert!(r.is_err());
    }
}
