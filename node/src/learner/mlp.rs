//! The built-in trainer: a one-hidden-layer MLP classifier for MNIST in pure Rust
//! (ReLU, softmax cross-entropy, mini-batch SGD). It needs nothing installed.
//!
//! Parameters use PyTorch's `nn.Linear` names and layouts (`fc1.weight` is `[hidden, 784]`),
//! so a model saved as safetensors loads into
//! `nn.Sequential`-free `class Net: fc1 = Linear(784, h); fc2 = Linear(h, 10)` by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use flare_protocols::model::{DType, FLModel, ModelError, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use super::gemm::{Mat, sgemm};
use super::{Learner, LearnerError, samples_meta};
use crate::data::Dataset;
use crate::data::mnist::{CLASSES, PIXELS};

const MEAN: f32 = 0.1307;
const STD: f32 = 0.3081;

/// Hyper-parameters of the MLP learner, as written in `config_fed_client.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MlpHyper {
    /// Hidden units.
    pub hidden: usize,
    /// SGD learning rate.
    pub lr: f32,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Local epochs per round.
    pub epochs: usize,
    /// Seed of the per-site shuffle of training examples.
    pub seed: u64,
}

impl Default for MlpHyper {
    fn default() -> Self {
        MlpHyper {
            hidden: 64,
            lr: 0.1,
            batch_size: 32,
            epochs: 1,
            seed: 0,
        }
    }
}

/// The network's weights in plain vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    hidden: usize,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

fn get(model: &FLModel, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
    let t = model
        .params
        .get(name)
        .ok_or_else(|| ModelError::Incompatible {
            name: name.to_string(),
            reason: "missing".into(),
        })?;
    if t.shape() != shape || t.dtype() != DType::F32 {
        return Err(ModelError::Incompatible {
            name: name.to_string(),
            reason: format!(
                "expected F32 {shape:?}, got {:?} {:?}",
                t.dtype(),
                t.shape()
            ),
        });
    }
    Ok(t.to_f32_vec())
}

impl Mlp {
    /// Fresh weights drawn like PyTorch's `nn.Linear` default: U(-1/√fan_in, 1/√fan_in).
    pub fn init(hidden: usize, seed: u64) -> Mlp {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut draw = |n: usize, fan_in: usize| -> Vec<f32> {
            let b = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.random_range(-b..b)).collect()
        };
        Mlp {
            hidden,
            w1: draw(hidden * PIXELS, PIXELS),
            b1: draw(hidden, PIXELS),
            w2: draw(CLASSES * hidden, hidden),
            b2: draw(CLASSES, hidden),
        }
    }

    /// Reads the weights from a model, checking names, shapes and dtypes.
    pub fn from_model(model: &FLModel, hidden: usize) -> Result<Mlp, ModelError> {
        let m = Mlp {
            hidden,
            w1: get(model, "fc1.weight", &[hidden, PIXELS])?,
            b1: get(model, "fc1.bias", &[hidden])?,
            w2: get(model, "fc2.weight", &[CLASSES, hidden])?,
            b2: get(model, "fc2.bias", &[CLASSES])?,
        };
        if model.params.len() != 4 {
            return Err(ModelError::Incompatible {
                name: model
                    .params
                    .keys()
                    .find(|k| !k.starts_with("fc1.") && !k.starts_with("fc2."))
                    .cloned()
                    .unwrap_or_default(),
                reason: "unexpected tensor".into(),
            });
        }
        Ok(m)
    }

    /// The weights as a model with full parameters.
    pub fn to_model(&self) -> FLModel {
        let t = |shape: Vec<usize>, v: &[f32]| {
            Tensor::from_f32(shape, v).expect("shapes are built from the same sizes")
        };
        FLModel::from_params(BTreeMap::from([
            (
                "fc1.weight".to_string(),
                t(vec![self.hidden, PIXELS], &self.w1),
            ),
            ("fc1.bias".to_string(), t(vec![self.hidden], &self.b1)),
            (
                "fc2.weight".to_string(),
                t(vec![CLASSES, self.hidden], &self.w2),
            ),
            ("fc2.bias".to_string(), t(vec![CLASSES], &self.b2)),
        ]))
    }

    /// Forward pass of `b` normalized images `x` (`b × 784`): returns hidden pre-activations
    /// (`b × hidden`) and softmax probabilities (`b × 10`).
    fn forward(&self, x: &[f32], b: usize) -> (Vec<f32>, Vec<f32>) {
        let h = self.hidden;
        let mut pre = vec![0.0; b * h];
        for row in pre.chunks_exact_mut(h) {
            row.copy_from_slice(&self.b1);
        }
        sgemm(
            1.0,
            Mat::rows(x, b, PIXELS),
            Mat::transposed(&self.w1, h, PIXELS),
            1.0,
            &mut pre,
        );
        let act: Vec<f32> = pre.iter().map(|v| v.max(0.0)).collect();
        let mut z = vec![0.0; b * CLASSES];
        for row in z.chunks_exact_mut(CLASSES) {
            row.copy_from_slice(&self.b2);
        }
        sgemm(
            1.0,
            Mat::rows(&act, b, h),
            Mat::transposed(&self.w2, CLASSES, h),
            1.0,
            &mut z,
        );
        for row in z.chunks_exact_mut(CLASSES) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v /= sum;
            }
        }
        (pre, z)
    }

    /// One SGD step on a batch; returns the batch's summed cross-entropy loss.
    fn step(&mut self, x: &[f32], y: &[u8], lr: f32) -> f32 {
        let b = y.len();
        let h = self.hidden;
        let (pre, mut p) = self.forward(x, b);
        let mut loss = 0.0;
        // dZ = (p - onehot) / b, in place.
        for (row, &label) in p.chunks_exact_mut(CLASSES).zip(y) {
            loss -= row[usize::from(label)].max(1e-12).ln();
            row[usize::from(label)] -= 1.0;
            for v in row.iter_mut() {
                *v /= b as f32;
            }
        }
        let dz = p;
        let act: Vec<f32> = pre.iter().map(|v| v.max(0.0)).collect();
        // dA = dZ · W2, masked by ReLU' → dH.
        let mut dh = vec![0.0; b * h];
        sgemm(
            1.0,
            Mat::rows(&dz, b, CLASSES),
            Mat::rows(&self.w2, CLASSES, h),
            0.0,
            &mut dh,
        );
        for (d, p) in dh.iter_mut().zip(&pre) {
            if *p <= 0.0 {
                *d = 0.0;
            }
        }
        // W2 -= lr · dZᵀ · A ; b2 -= lr · Σ dZ
        sgemm(
            -lr,
            Mat::transposed(&dz, b, CLASSES),
            Mat::rows(&act, b, h),
            1.0,
            &mut self.w2,
        );
        for row in dz.chunks_exact(CLASSES) {
            for (bb, d) in self.b2.iter_mut().zip(row) {
                *bb -= lr * d;
            }
        }
        // W1 -= lr · dHᵀ · X ; b1 -= lr · Σ dH
        sgemm(
            -lr,
            Mat::transposed(&dh, b, h),
            Mat::rows(x, b, PIXELS),
            1.0,
            &mut self.w1,
        );
        for row in dh.chunks_exact(h) {
            for (bb, d) in self.b1.iter_mut().zip(row) {
                *bb -= lr * d;
            }
        }
        loss
    }

    /// Accuracy and mean loss on `data`.
    pub fn evaluate(&self, data: &Dataset) -> BTreeMap<String, f64> {
        let mut correct = 0usize;
        let mut loss = 0.0f64;
        let idx: Vec<usize> = (0..data.len()).collect();
        let mut x = Vec::new();
        for chunk in idx.chunks(500) {
            normalize_into(data, chunk, &mut x);
            let (_, p) = self.forward(&x, chunk.len());
            for (row, &i) in p.chunks_exact(CLASSES).zip(chunk) {
                let label = usize::from(data.labels[i]);
                loss -= f64::from(row[label].max(1e-12)).ln();
                let best = row
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |acc, (k, &v)| if v > acc.1 { (k, v) } else { acc },
                    )
                    .0;
                correct += usize::from(best == label);
            }
        }
        let n = data.len().max(1) as f64;
        BTreeMap::from([
            ("accuracy".to_string(), correct as f64 / n),
            ("loss".to_string(), loss / n),
        ])
    }

    /// Trains for `epochs` over the examples `indices` of `data`, shuffled by `rng`;
    /// returns the mean loss of the last epoch.
    pub fn train(
        &mut self,
        data: &Dataset,
        indices: &[usize],
        hyper: &MlpHyper,
        rng: &mut ChaCha8Rng,
    ) -> Result<f64, LearnerError> {
        if indices.is_empty() {
            return Err(LearnerError::NoData);
        }
        let mut order = indices.to_vec();
        let mut x = Vec::new();
        let mut y = Vec::new();
        let mut last = 0.0;
        for _ in 0..hyper.epochs.max(1) {
            order.shuffle(rng);
            let mut total = 0.0f64;
            for batch in order.chunks(hyper.batch_size.max(1)) {
                normalize_into(data, batch, &mut x);
                y.clear();
                y.extend(batch.iter().map(|&i| data.labels[i]));
                total += f64::from(self.step(&x, &y, hyper.lr));
            }
            last = total / order.len() as f64;
            if !last.is_finite() {
                return Err(LearnerError::Diverged(format!("loss is {last}")));
            }
        }
        Ok(last)
    }
}

/// Writes the normalized pixels of examples `idx` into `out` (`idx.len() × 784`).
fn normalize_into(data: &Dataset, idx: &[usize], out: &mut Vec<f32>) {
    out.clear();
    for &i in idx {
        out.extend(
            data.image(i)
                .iter()
                .map(|&p| (f32::from(p) / 255.0 - MEAN) / STD),
        );
    }
}

/// A site's MLP learner: its share of the training set and the validation set.
#[derive(Debug)]
pub struct MlpLearner {
    hyper: MlpHyper,
    train: Arc<Dataset>,
    indices: Vec<usize>,
    validation: Arc<Dataset>,
    rng: ChaCha8Rng,
}

impl MlpLearner {
    /// A learner that trains on `train[indices]` and validates on `validation`.
    pub fn new(
        hyper: MlpHyper,
        train: Arc<Dataset>,
        indices: Vec<usize>,
        validation: Arc<Dataset>,
        site_seed: u64,
    ) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(hyper.seed ^ site_seed.rotate_left(17));
        MlpLearner {
            hyper,
            train,
            indices,
            validation,
            rng,
        }
    }

    /// Number of local training examples.
    pub fn num_samples(&self) -> usize {
        self.indices.len()
    }
}

impl Learner for MlpLearner {
    fn train(&mut self, global: &FLModel, _round: u32) -> Result<FLModel, LearnerError> {
        let mut net = Mlp::from_model(global, self.hyper.hidden)?;
        let loss = net.train(&self.train, &self.indices, &self.hyper, &mut self.rng)?;
        let mut out = net.to_model();
        let (k, v) = samples_meta(self.indices.len());
        out.meta.insert(k, v);
        out.meta.insert(
            "train_loss".into(),
            flare_protocols::model::MetaValue::Float(loss),
        );
        Ok(out)
    }

    fn validate(&mut self, model: &FLModel) -> Result<BTreeMap<String, f64>, LearnerError> {
        let net = Mlp::from_model(model, self.hyper.hidden)?;
        Ok(net.evaluate(&self.validation))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn mnist() -> (Dataset, Dataset) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
        Dataset::load_mnist_test(&dir).unwrap().split(2_000, 0)
    }

    #[test]
    fn model_round_trip_and_shape_checks() {
        let net = Mlp::init(8, 1);
        let m = net.to_model();
        assert_eq!(Mlp::from_model(&m, 8).unwrap(), net);
        let err = Mlp::from_model(&m, 16).unwrap_err();
        assert!(err.to_string().contains("fc1.weight"), "{err}");
        let mut extra = m.clone();
        extra
            .params
            .insert("other".into(), Tensor::zeros(DType::F32, vec![1]).unwrap());
        assert!(
            Mlp::from_model(&extra, 8)
                .unwrap_err()
                .to_string()
                .contains("other")
        );
    }

    #[test]
    fn gradient_matches_finite_differences() {
        // Check one weight of each layer against a numeric derivative of the batch loss.
        let (train, _) = mnist();
        let net = Mlp::init(6, 3);
        let idx: Vec<usize> = (0..4).collect();
        let mut x = Vec::new();
        normalize_into(&train, &idx, &mut x);
        let y: Vec<u8> = idx.iter().map(|&i| train.labels[i]).collect();
        let loss = |n: &Mlp| -> f64 {
            let (_, p) = n.forward(&x, 4);
            p.chunks_exact(CLASSES)
                .zip(&y)
                .map(|(r, &l)| -f64::from(r[usize::from(l)]).ln())
                .sum::<f64>()
                / 4.0
        };
        let lr = 1e-3;
        let mut stepped = net.clone();
        stepped.step(&x, &y, lr);
        for (which, i) in [("w1", 300usize), ("w2", 7), ("b1", 2), ("b2", 5)] {
            let grad_analytic = |a: &Mlp, b: &Mlp| -> f32 {
                let (va, vb) = match which {
                    "w1" => (a.w1[i], b.w1[i]),
                    "w2" => (a.w2[i], b.w2[i]),
                    "b1" => (a.b1[i], b.b1[i]),
                    _ => (a.b2[i], b.b2[i]),
                };
                (va - vb) / lr
            };
            let g = grad_analytic(&net, &stepped);
            let eps = 1e-2;
            let mut plus = net.clone();
            let mut minus = net.clone();
            let (p, m) = match which {
                "w1" => (&mut plus.w1[i], &mut minus.w1[i]),
                "w2" => (&mut plus.w2[i], &mut minus.w2[i]),
                "b1" => (&mut plus.b1[i], &mut minus.b1[i]),
                _ => (&mut plus.b2[i], &mut minus.b2[i]),
            };
            *p += eps;
            *m -= eps;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * f64::from(eps));
            assert!(
                (f64::from(g) - numeric).abs() < 2e-3 + 0.05 * numeric.abs(),
                "{which}[{i}]: analytic {g}, numeric {numeric}"
            );
        }
    }

    #[test]
    fn centralized_training_reaches_90_percent() {
        let (train, test) = mnist();
        let hyper = MlpHyper {
            epochs: 3,
            ..MlpHyper::default()
        };
        let mut net = Mlp::init(hyper.hidden, 0);
        let before = net.evaluate(&test)["accuracy"];
        let idx: Vec<usize> = (0..train.len()).collect();
        net.train(&train, &idx, &hyper, &mut ChaCha8Rng::seed_from_u64(0))
            .unwrap();
        let acc = net.evaluate(&test)["accuracy"];
        assert!(before < 0.3, "untrained accuracy {before}");
        assert!(acc >= 0.90, "held-out accuracy {acc}");
    }

    #[test]
    fn an_empty_site_refuses_to_train() {
        let (train, test) = mnist();
        let mut l = MlpLearner::new(
            MlpHyper::default(),
            Arc::new(train),
            vec![],
            Arc::new(test),
            0,
        );
        let global = Mlp::init(64, 0).to_model();
        assert!(matches!(l.train(&global, 0), Err(LearnerError::NoData)));
    }
}
