//! A learner for benchmarks and scale tests: a model of any size whose "training" moves every
//! weight by a site-specific step, touching each byte once, so the measured cost is the
//! framework's and not a network's.

use std::collections::BTreeMap;

use flare_protocols::model::{DType, FLModel, ModelError, Tensor};
use serde::Deserialize;

use super::{Learner, LearnerError, samples_meta};

/// Arguments of the synthetic learner and of its model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticArgs {
    /// Number of f32 parameters.
    pub num_params: usize,
    /// Parameters per tensor; the model is cut into `ceil(num_params / tensor_size)` tensors.
    pub tensor_size: usize,
    /// Samples each site claims, for FedAvg weights.
    pub samples: usize,
}

impl Default for SyntheticArgs {
    fn default() -> Self {
        SyntheticArgs {
            num_params: 10,
            tensor_size: 1 << 24,
            samples: 100,
        }
    }
}

impl SyntheticArgs {
    /// The initial model: zeros, cut into tensors named `layer.NNNN`.
    pub fn init(&self) -> Result<FLModel, ModelError> {
        let size = self.tensor_size.max(1);
        let mut params = BTreeMap::new();
        let mut left = self.num_params;
        let mut i = 0;
        while left > 0 {
            let n = left.min(size);
            params.insert(format!("layer.{i:04}"), Tensor::zeros(DType::F32, vec![n])?);
            left -= n;
            i += 1;
        }
        Ok(FLModel::from_params(params))
    }
}

/// The synthetic learner of one site.
#[derive(Debug)]
pub struct SyntheticLearner {
    args: SyntheticArgs,
    step: f32,
}

impl SyntheticLearner {
    /// The learner of site number `index` (its step is `index + 1`).
    pub fn new(args: SyntheticArgs, index: usize) -> Self {
        SyntheticLearner {
            args,
            step: (index % 1024) as f32 + 1.0,
        }
    }
}

impl Learner for SyntheticLearner {
    fn train(&mut self, global: &FLModel, round: u32) -> Result<FLModel, LearnerError> {
        self.train_owned(global.clone(), round)
    }

    /// Moves every weight by the site's step where it lies.
    fn train_owned(&mut self, global: FLModel, _round: u32) -> Result<FLModel, LearnerError> {
        let mut params = global.params;
        for (name, t) in &mut params {
            if t.dtype() != DType::F32 {
                return Err(ModelError::Incompatible {
                    name: name.clone(),
                    reason: "synthetic learner takes F32 tensors".into(),
                }
                .into());
            }
            for c in t.bytes_mut().chunks_exact_mut(4) {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) + self.step;
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        let mut m = FLModel::from_params(params);
        let (k, v) = samples_meta(self.args.samples);
        m.meta.insert(k, v);
        Ok(m)
    }

    fn validate(&mut self, model: &FLModel) -> Result<BTreeMap<String, f64>, LearnerError> {
        // The first value of the first tensor: cheap, and it tracks the aggregate exactly.
        let first = model
            .params
            .values()
            .next()
            .and_then(|t| t.bytes().get(..4))
            .map_or(0.0, |c| {
                f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            });
        Ok(BTreeMap::from([("value".to_string(), first)]))
    }
}
