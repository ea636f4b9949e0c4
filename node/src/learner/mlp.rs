//! The built-in trainer: a one-hidden-layer MLP classifier for MNIST in pure Rust
//! (ReLU, softmax cross-entropy, mini-batch SGD). It needs nothing installed.
//!
//! Parameters use PyTorch's `nn.Linear` names and layouts (`fc1.weight` is `[hidden, 784]`),
//! so a model saved as safetensors loads into
//! `nn.Sequential`-free `class Net: fc1 = Linear(784, h); fc2 = Linear(h, 10)` by name.
//!
//! # FedProx and SCAFFOLD
//!
//! The learner reads the server's algorithm from the global model it is given, as FLARE's
//! learners do; the LibTorch learner (`super::torch`) honours both the same way, through the
//! helpers of `super::algorithms`.
//!
//! - **FedProx.** `meta["fedprox_mu"]` (`mu`, [`META_FEDPROX_MU`](flare_protocols::aggregators::META_FEDPROX_MU)) adds
//!   `(mu/2)·Σ‖w − w_global‖²` to every batch's loss (FLARE's `PTFedProxLoss`), with
//!   `w_global` the weights as received: each SGD step adds `mu·(w − w_global)` to the
//!   gradient. `mu` absent or 0 trains by the very same arithmetic as plain SGD; a negative
//!   or non-finite `mu` is refused. The reported `train_loss` is the cross-entropy alone
//!   (FLARE's examples log the sum).
//! - **SCAFFOLD** (option II of Karimireddy et al., FLARE's `PTScaffoldHelper`). Tensors
//!   `scaffold_c_global.<p>` ([`SCAFFOLD_C_GLOBAL`](flare_protocols::aggregators::SCAFFOLD_C_GLOBAL)), one per parameter `<p>` with its shape,
//!   are the server's control `c`. The [`MlpLearner`] keeps the site's control `c_i` (zeros
//!   at first) between the rounds of its job. After each of the round's `K` SGD steps the
//!   weights move by `−lr·(c − c_i)`; after the round `c_i⁺ = c_i − c + (w_global − w)/(K·lr)`.
//!   The result carries the weights, `scaffold_c_diff.<p>` = `c_i⁺ − c_i`
//!   ([`SCAFFOLD_C_DIFF`]) and `NUM_STEPS_CURRENT_ROUND` = `K`, and `c_i` becomes `c_i⁺`.
//!   Without `scaffold_c_global.*` tensors nothing of this happens.
//!
//! # Full weights or differences
//!
//! The learner arg `params_transfer_type` (FLARE's Client API name) chooses what a train
//! result carries: `FULL` (the default) the trained weights, `DIFF` the trained weights
//! minus the weights received (`params_type` [`ParamsType::Diff`]), which is what FLARE's
//! privacy filters (`PercentilePrivacy`, `SVTPrivacy`) and local differential privacy work
//! on. Every tensor of the network is sent as a difference, as FLARE's
//! `numerical_params_diff` does for each key of the received `state_dict`: a network with
//! buffers (BatchNorm's running statistics) would send their change too, and the
//! aggregator, which adds the mean change to the global model, would end on the mean of the
//! sites' statistics, as with full weights. SCAFFOLD's `scaffold_c_diff.*` are already
//! changes and go out as they are; FedProx only shapes the training. The aggregators take
//! diffs ([`flare_protocols::aggregate`]); workflows that pass a site's result on as the next
//! site's model (cyclic) need `FULL`.
//!
//! Control tensors are not weights: loading a model, to train or to validate, skips every
//! name under the two SCAFFOLD prefixes, while any other tensor the network lacks is still
//! refused as the sign of a wrong model. A missing, extra, misshaped or non-finite control
//! is refused naming the tensor, before anything (weights, `c_i`, the shuffle) changes.
//!
//! Where Flare differs from FLARE: FLARE ships `c` as a dict in the task's metadata, Flare
//! as tensors beside the weights (see `flare_protocols::aggregators`); FLARE divides by the
//! scheduler's current lr, Flare (which has no scheduler) by the configured one; `c_i` is
//! kept in memory in both, so a restarted node starts again from zeros.

use std::collections::BTreeMap;
use std::sync::Arc;

use flare_protocols::aggregators::SCAFFOLD_C_DIFF;
use flare_protocols::model::{
    DType, FLModel, META_NUM_STEPS, MetaValue, ModelError, ParamsType, Tensor,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use super::algorithms::{
    check_scaffold_lr, fedprox_mu, is_control, scaffold_c_global, scaffold_c_new,
};
use super::gemm::{Mat, sgemm};
use super::script::TransferType;
use super::{Learner, LearnerError, samples_meta};
use crate::data::Dataset;
use crate::data::mnist::{CLASSES, PIXELS};
use crate::tracking::Tracker;

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

/// The parameters' names, in the order of [`Mlp::params`] and [`Mlp::shapes`].
const NAMES: [&str; 4] = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];

/// One value per element of each parameter, in [`NAMES`] order: SCAFFOLD's controls.
type Controls = [Vec<f32>; 4];

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

    /// Reads the weights from a model, checking names, shapes and dtypes. SCAFFOLD's control
    /// tensors (`scaffold_c_global.*`, `scaffold_c_diff.*`) are skipped; any other tensor
    /// the network lacks is refused.
    pub fn from_model(model: &FLModel, hidden: usize) -> Result<Mlp, ModelError> {
        let [s1, s2, s3, s4] = Mlp::shapes(hidden);
        let m = Mlp {
            hidden,
            w1: get(model, NAMES[0], &s1)?,
            b1: get(model, NAMES[1], &s2)?,
            w2: get(model, NAMES[2], &s3)?,
            b2: get(model, NAMES[3], &s4)?,
        };
        if let Some(extra) = model
            .params
            .keys()
            .find(|k| !NAMES.contains(&k.as_str()) && !is_control(k))
        {
            return Err(ModelError::Incompatible {
                name: extra.clone(),
                reason: "unexpected tensor".into(),
            });
        }
        Ok(m)
    }

    /// The weights as a model with full parameters.
    pub fn to_model(&self) -> FLModel {
        let params = NAMES
            .iter()
            .zip(Mlp::shapes(self.hidden))
            .zip(self.params())
            .map(|((name, shape), v)| {
                let t = Tensor::from_f32(shape, v).expect("shapes are built from the same sizes");
                (name.to_string(), t)
            })
            .collect();
        FLModel::from_params(params)
    }

    /// These weights minus `base`'s (a network of the same size), as a model of
    /// [`ParamsType::Diff`].
    pub fn diff_model(&self, base: &Mlp) -> FLModel {
        let params = NAMES
            .iter()
            .zip(Mlp::shapes(self.hidden))
            .zip(self.params().into_iter().zip(base.params()))
            .map(|((name, shape), (w, b))| {
                let d: Vec<f32> = w.iter().zip(b).map(|(w, b)| w - b).collect();
                let t = Tensor::from_f32(shape, &d).expect("shapes are built from the same sizes");
                (name.to_string(), t)
            })
            .collect();
        FLModel {
            params_type: ParamsType::Diff,
            ..FLModel::from_params(params)
        }
    }

    /// The parameters' shapes for `hidden` units, in [`NAMES`] order.
    fn shapes(hidden: usize) -> [Vec<usize>; 4] {
        [
            vec![hidden, PIXELS],
            vec![hidden],
            vec![CLASSES, hidden],
            vec![CLASSES],
        ]
    }

    /// The parameters' values, in [`NAMES`] order.
    fn params(&self) -> [&[f32]; 4] {
        [&self.w1, &self.b1, &self.w2, &self.b2]
    }

    /// The parameters' values to update, in [`NAMES`] order.
    fn params_mut(&mut self) -> [&mut [f32]; 4] {
        [&mut self.w1, &mut self.b1, &mut self.w2, &mut self.b2]
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

    /// One SGD step on a batch, with FedProx's term when `prox` is given; returns the
    /// batch's summed cross-entropy loss (without the proximal term).
    fn step(&mut self, x: &[f32], y: &[u8], lr: f32, prox: Option<&Prox<'_>>) -> f32 {
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
        // FedProx: the gradient of (mu/2)·‖w − w_global‖² is mu·(w − w_global), taken at the
        // weights the batch's gradient was taken at (every gradient is computed by now).
        if let Some(prox) = prox {
            let k = lr * prox.mu;
            for (w, g) in self.params_mut().into_iter().zip(prox.global.params()) {
                for (w, g) in w.iter_mut().zip(g) {
                    *w -= k * (*w - g);
                }
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
        self.train_with(
            data,
            indices,
            hyper,
            rng,
            &RoundTerms::default(),
            &mut |_, _, _| {},
        )
        .map(|(loss, _)| loss)
    }

    /// [`Mlp::train`] with what the round's FL algorithm adds; returns the mean loss of the
    /// last epoch and the number of SGD steps taken, and calls `epoch_done` after each epoch
    /// with its mean loss and its samples per second.
    fn train_with(
        &mut self,
        data: &Dataset,
        indices: &[usize],
        hyper: &MlpHyper,
        rng: &mut ChaCha8Rng,
        terms: &RoundTerms<'_>,
        epoch_done: &mut dyn FnMut(usize, f64, f64),
    ) -> Result<(f64, usize), LearnerError> {
        if indices.is_empty() {
            return Err(LearnerError::NoData);
        }
        let mut order = indices.to_vec();
        let mut x = Vec::new();
        let mut y = Vec::new();
        let mut last = 0.0;
        let mut steps = 0;
        for epoch in 0..hyper.epochs.max(1) {
            let started = std::time::Instant::now();
            order.shuffle(rng);
            let mut total = 0.0f64;
            for batch in order.chunks(hyper.batch_size.max(1)) {
                normalize_into(data, batch, &mut x);
                y.clear();
                y.extend(batch.iter().map(|&i| data.labels[i]));
                total += f64::from(self.step(&x, &y, hyper.lr, terms.prox.as_ref()));
                if let Some(correction) = terms.scaffold {
                    for (w, d) in self.params_mut().into_iter().zip(correction) {
                        for (w, d) in w.iter_mut().zip(d) {
                            *w -= d;
                        }
                    }
                }
                steps += 1;
            }
            last = total / order.len() as f64;
            if !last.is_finite() {
                return Err(LearnerError::Diverged(format!("loss is {last}")));
            }
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            epoch_done(epoch, last, order.len() as f64 / secs);
        }
        Ok((last, steps))
    }
}

/// FedProx's proximal term in a round: its weight and the weights it pulls towards.
#[derive(Debug)]
struct Prox<'a> {
    /// `mu` (positive).
    mu: f32,
    /// The global model as received, frozen for the round.
    global: &'a Mlp,
}

/// What an FL algorithm adds to a round of local SGD; the default adds nothing.
#[derive(Debug, Default)]
struct RoundTerms<'a> {
    /// FedProx's pull towards the global weights.
    prox: Option<Prox<'a>>,
    /// SCAFFOLD's correction `lr·(c − c_i)`, subtracted from the weights after every step
    /// (constant over the round, so computed once).
    scaffold: Option<&'a Controls>,
}

/// SCAFFOLD's global control for the MLP's parameters, `None` without SCAFFOLD.
fn read_c_global(
    global: &FLModel,
    hidden: usize,
    lr: f32,
) -> Result<Option<Controls>, LearnerError> {
    let shapes = Mlp::shapes(hidden);
    let params: Vec<(&str, &[usize])> = NAMES
        .iter()
        .zip(&shapes)
        .map(|(n, s)| (*n, s.as_slice()))
        .collect();
    let Some(tensors) = scaffold_c_global(global, &params)? else {
        return Ok(None);
    };
    check_scaffold_lr(f64::from(lr))?;
    let mut c = Controls::default();
    for (c, t) in c.iter_mut().zip(tensors) {
        *c = t.to_f32_vec();
    }
    Ok(Some(c))
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
    /// SCAFFOLD's local control `c_i`, in [`NAMES`] order: `None` (zeros) until a SCAFFOLD
    /// round succeeds, then what the last one left. It lives as long as the learner, which is
    /// the rounds of one job at this site.
    c_local: Option<Controls>,
    /// Whether train results carry the weights or their change (`params_transfer_type`).
    transfer: TransferType,
    /// Where the learner logs its metrics.
    tracker: Tracker,
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
            c_local: None,
            transfer: TransferType::Full,
            tracker: Tracker::off(),
        }
    }

    /// A learner whose train results are `transfer`: the trained weights (`FULL`, the
    /// default) or the trained minus the received weights (`DIFF`); see the module doc.
    pub fn with_params_transfer(mut self, transfer: TransferType) -> Self {
        self.transfer = transfer;
        self
    }

    /// A learner that logs its metrics to `tracker`.
    pub fn with_tracker(mut self, tracker: Tracker) -> Self {
        self.tracker = tracker;
        self
    }

    /// Number of local training examples.
    pub fn num_samples(&self) -> usize {
        self.indices.len()
    }
}

impl Learner for MlpLearner {
    fn train(&mut self, global: &FLModel, round: u32) -> Result<FLModel, LearnerError> {
        let (hidden, lr) = (self.hyper.hidden, self.hyper.lr);
        let mut net = Mlp::from_model(global, hidden)?;
        let mu = fedprox_mu(global)?;
        let c_global = read_c_global(global, hidden, lr)?;
        let zeros;
        let c_local = match (&c_global, &self.c_local) {
            (None, _) => None,
            (Some(_), Some(c)) => Some(c),
            (Some(_), None) => {
                zeros = Mlp::shapes(hidden).map(|s| vec![0.0; s.iter().product()]);
                Some(&zeros)
            }
        };
        // SCAFFOLD's per-step correction lr·(c − c_i), computed as FLARE's helper does.
        let correction = c_global.as_ref().zip(c_local).map(|(cg, cl)| {
            let mut d = Controls::default();
            for ((d, cg), cl) in d.iter_mut().zip(cg).zip(cl) {
                *d = cg.iter().zip(cl).map(|(g, l)| lr * (g - l)).collect();
            }
            d
        });
        let diff = self.transfer == TransferType::Diff;
        // The weights as received: FedProx's anchor, SCAFFOLD's w_global, DIFF's base.
        let start = (mu.is_some() || c_global.is_some() || diff).then(|| net.clone());
        let terms = RoundTerms {
            prox: mu.zip(start.as_ref()).map(|(mu, global)| Prox {
                mu: mu as f32,
                global,
            }),
            scaffold: correction.as_ref(),
        };
        let tracker = &self.tracker;
        let epochs = self.hyper.epochs.max(1) as i64;
        let (loss, steps) = net.train_with(
            &self.train,
            &self.indices,
            &self.hyper,
            &mut self.rng,
            &terms,
            &mut |epoch, loss, samples_per_sec| {
                log_epoch(
                    tracker,
                    i64::from(round) * epochs + epoch as i64,
                    loss,
                    f64::from(lr),
                    samples_per_sec,
                );
            },
        )?;
        let mut out = match &start {
            Some(start) if diff => net.diff_model(start),
            _ => net.to_model(),
        };
        if let (Some(cg), Some(cl), Some(start)) = (&c_global, c_local, &start) {
            let k_lr = steps as f64 * f64::from(lr);
            let mut c_new = Controls::default();
            for (p, name) in NAMES.iter().enumerate() {
                c_new[p] = scaffold_c_new(
                    name,
                    &cl[p],
                    &cg[p],
                    start.params()[p],
                    net.params()[p],
                    k_lr,
                )?;
            }
            for ((name, shape), (new, old)) in NAMES
                .iter()
                .zip(Mlp::shapes(hidden))
                .zip(c_new.iter().zip(cl))
            {
                let diff: Vec<f32> = new.iter().zip(old).map(|(n, o)| n - o).collect();
                let t = Tensor::from_f32(shape, &diff).map_err(LearnerError::Incompatible)?;
                out.params.insert(format!("{SCAFFOLD_C_DIFF}{name}"), t);
            }
            out.meta
                .insert(META_NUM_STEPS.into(), MetaValue::Int(steps as i64));
            self.c_local = Some(c_new);
        }
        let (k, v) = samples_meta(self.indices.len());
        out.meta.insert(k, v);
        out.meta.insert("train_loss".into(), MetaValue::Float(loss));
        Ok(out)
    }

    fn validate(&mut self, model: &FLModel) -> Result<BTreeMap<String, f64>, LearnerError> {
        let net = Mlp::from_model(model, self.hyper.hidden)?;
        Ok(net.evaluate(&self.validation))
    }

    fn tracker(&self) -> &Tracker {
        &self.tracker
    }
}

/// What the built-in learners log after each local epoch (`step`: the site's epochs so far,
/// round × epochs + epoch): FLARE's examples' `train_loss` and `learning_rate`, and the
/// epoch's `samples_per_sec`.
pub(crate) fn log_epoch(tracker: &Tracker, step: i64, loss: f64, lr: f64, samples_per_sec: f64) {
    tracker.scalar("train_loss", loss, step);
    tracker.scalar("learning_rate", lr, step);
    tracker.scalar("samples_per_sec", samples_per_sec, step);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use flare_protocols::aggregators::{META_FEDPROX_MU, SCAFFOLD_C_GLOBAL};

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

    /// FedProx's term by its definition, `(mu/2)·Σ‖w − w_global‖²`, in f64.
    fn prox_term(net: &Mlp, global: &Mlp, mu: f64) -> f64 {
        let sq: f64 = net
            .params()
            .iter()
            .zip(global.params())
            .flat_map(|(w, g)| w.iter().zip(g))
            .map(|(w, g)| (f64::from(*w) - f64::from(*g)).powi(2))
            .sum();
        mu / 2.0 * sq
    }

    /// Checks one weight of each layer of `net`'s SGD step against a numeric derivative of
    /// the batch's mean loss, plus FedProx's term when `prox` is given.
    fn check_gradient(net: &Mlp, prox: Option<&Prox<'_>>) {
        let (train, _) = mnist();
        let idx: Vec<usize> = (0..4).collect();
        let mut x = Vec::new();
        normalize_into(&train, &idx, &mut x);
        let y: Vec<u8> = idx.iter().map(|&i| train.labels[i]).collect();
        let loss = |n: &Mlp| -> f64 {
            let (_, p) = n.forward(&x, 4);
            let ce = p
                .chunks_exact(CLASSES)
                .zip(&y)
                .map(|(r, &l)| -f64::from(r[usize::from(l)]).ln())
                .sum::<f64>()
                / 4.0;
            ce + prox.map_or(0.0, |p| prox_term(n, p.global, f64::from(p.mu)))
        };
        let lr = 1e-3;
        let mut stepped = net.clone();
        stepped.step(&x, &y, lr, prox);
        for (which, i) in [(0, 300usize), (2, 7), (1, 2), (3, 5)] {
            let g = (net.params()[which][i] - stepped.params()[which][i]) / lr;
            let eps = 1e-2;
            let mut plus = net.clone();
            let mut minus = net.clone();
            plus.params_mut()[which][i] += eps;
            minus.params_mut()[which][i] -= eps;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * f64::from(eps));
            assert!(
                (f64::from(g) - numeric).abs() < 2e-3 + 0.05 * numeric.abs(),
                "{}[{i}]: analytic {g}, numeric {numeric}",
                NAMES[which]
            );
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        check_gradient(&Mlp::init(6, 3), None);
    }

    #[test]
    fn fedprox_term_and_gradient_match_hand_and_finite_differences() {
        let net = Mlp::init(6, 3);
        // The reference term, by hand: two weights off by 0.5 and 1.
        let mut near = net.clone();
        near.w1[10] += 0.5;
        near.b2[3] -= 1.0;
        let term = prox_term(&net, &near, 0.4);
        assert!((term - 0.2 * (0.25 + 1.0)).abs() < 1e-6, "{term}");
        // The step's gradient against the numeric one of cross-entropy + term, with a global
        // model far enough away that the term dominates some of the four checked weights.
        let far = Mlp::init(6, 4);
        let prox = Prox {
            mu: 0.7,
            global: &far,
        };
        check_gradient(&net, Some(&prox));
        // And the step really added mu·(w − w_global): compare with the plain step.
        let (train, _) = mnist();
        let idx: Vec<usize> = (0..4).collect();
        let mut x = Vec::new();
        normalize_into(&train, &idx, &mut x);
        let y: Vec<u8> = idx.iter().map(|&i| train.labels[i]).collect();
        let (mut plain, mut proxed) = (net.clone(), net.clone());
        plain.step(&x, &y, 1e-2, None);
        proxed.step(&x, &y, 1e-2, Some(&prox));
        for (p, name) in NAMES.iter().enumerate() {
            let (w, g) = (net.params()[p], far.params()[p]);
            let (a, b) = (plain.params()[p], proxed.params()[p]);
            for i in 0..w.len() {
                let want = 1e-2 * 0.7 * (w[i] - g[i]);
                let got = a[i] - b[i];
                assert!((got - want).abs() < 1e-6, "{name}[{i}]: {got} != {want}");
            }
        }
    }

    /// A small site: 320 training examples, 16 hidden units, 10 SGD steps a round.
    fn small_site(train: &Arc<Dataset>, test: &Arc<Dataset>) -> MlpLearner {
        let hyper = MlpHyper {
            hidden: 16,
            lr: 0.1,
            batch_size: 32,
            epochs: 1,
            seed: 7,
        };
        MlpLearner::new(
            hyper,
            Arc::clone(train),
            (0..320).collect(),
            Arc::clone(test),
            1,
        )
    }

    fn small_data() -> (Arc<Dataset>, Arc<Dataset>) {
        let (train, test) = mnist();
        (Arc::new(train), Arc::new(test))
    }

    fn with_meta(model: &FLModel, key: &str, v: MetaValue) -> FLModel {
        let mut m = model.clone();
        m.meta.insert(key.into(), v);
        m
    }

    /// The L2 distance between the weights of two models.
    fn distance(a: &FLModel, b: &FLModel) -> f64 {
        NAMES
            .iter()
            .flat_map(|n| {
                a.params[*n]
                    .to_f32_vec()
                    .into_iter()
                    .zip(b.params[*n].to_f32_vec())
            })
            .map(|(x, y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn fedprox_mu_zero_or_absent_trains_exactly_as_plain_sgd() {
        let (train, test) = small_data();
        let global = Mlp::init(16, 0).to_model();
        let fresh = small_site(&train, &test);
        let mut net = Mlp::init(16, 0);
        net.train(&train, &fresh.indices, &fresh.hyper, &mut fresh.rng.clone())
            .unwrap();
        let plain = small_site(&train, &test).train(&global, 0).unwrap();
        assert_eq!(plain.params, net.to_model().params);
        for mu in [MetaValue::Float(0.0), MetaValue::Int(0)] {
            let g = with_meta(&global, META_FEDPROX_MU, mu.clone());
            let out = small_site(&train, &test).train(&g, 0).unwrap();
            assert_eq!(out.params, plain.params, "{mu:?}");
            assert_eq!(out.meta, plain.meta, "{mu:?}");
        }
    }

    #[test]
    fn fedprox_keeps_the_model_closer_to_the_global_one() {
        let (train, test) = small_data();
        let global = Mlp::init(16, 0).to_model();
        let plain = small_site(&train, &test).train(&global, 0).unwrap();
        let g = with_meta(&global, META_FEDPROX_MU, MetaValue::Float(1.0));
        let prox = small_site(&train, &test).train(&g, 0).unwrap();
        let (d_plain, d_prox) = (distance(&plain, &global), distance(&prox, &global));
        assert!(
            d_prox > 0.0 && d_prox < 0.95 * d_plain,
            "mu 1: {d_prox}, mu 0: {d_plain}"
        );
    }

    #[test]
    fn fedprox_refuses_a_negative_or_non_finite_mu() {
        let (train, test) = small_data();
        let global = Mlp::init(16, 0).to_model();
        for mu in [
            MetaValue::Float(-0.1),
            MetaValue::Int(-1),
            MetaValue::Float(f64::NAN),
            MetaValue::Float(f64::INFINITY),
            MetaValue::Text("0.1".into()),
        ] {
            let mut site = small_site(&train, &test);
            let err = site
                .train(&with_meta(&global, META_FEDPROX_MU, mu.clone()), 0)
                .unwrap_err()
                .to_string();
            assert!(err.contains("\"fedprox_mu\""), "{mu:?}: {err}");
        }
    }

    /// `model` with SCAFFOLD's global control `c` (in [`NAMES`] order) added.
    fn with_c_global(model: &FLModel, c: &Controls) -> FLModel {
        let mut m = model.clone();
        let hidden = m.params["fc1.bias"].shape()[0];
        for ((name, shape), v) in NAMES.iter().zip(Mlp::shapes(hidden)).zip(c) {
            m.params.insert(
                format!("{SCAFFOLD_C_GLOBAL}{name}"),
                Tensor::from_f32(shape, v).unwrap(),
            );
        }
        m
    }

    fn zero_controls(hidden: usize) -> Controls {
        Mlp::shapes(hidden).map(|s| vec![0.0; s.iter().product()])
    }

    /// Asserts `got ≈ want` element-wise, relative to the magnitude of `want`.
    fn assert_close(what: &str, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{what}[{i}]: {g} != {w}"
            );
        }
    }

    /// `(w_global − w)/(K·lr)` of parameter `p`, the first-round control in f64.
    fn drift(start: &Mlp, end: &Mlp, p: usize, k_lr: f64) -> Vec<f64> {
        start.params()[p]
            .iter()
            .zip(end.params()[p])
            .map(|(s, e)| (f64::from(*s) - f64::from(*e)) / k_lr)
            .collect()
    }

    #[test]
    fn scaffold_first_round_trains_as_plain_and_reports_the_drift() {
        let (train, test) = small_data();
        let global = Mlp::init(16, 0).to_model();
        let plain = small_site(&train, &test).train(&global, 0).unwrap();
        let mut site = small_site(&train, &test);
        let out = site
            .train(&with_c_global(&global, &zero_controls(16)), 0)
            .unwrap();
        let names: Vec<String> = out.params.keys().cloned().collect();
        let mut want: Vec<String> = NAMES
            .iter()
            .flat_map(|n| [n.to_string(), format!("{SCAFFOLD_C_DIFF}{n}")])
            .collect();
        want.sort();
        assert_eq!(names, want, "weights and c_diff, no c_global");
        for n in NAMES {
            assert_eq!(out.params[n], plain.params[n], "{n}");
        }
        assert_eq!(out.meta.get(META_NUM_STEPS), Some(&MetaValue::Int(10)));
        assert_eq!(plain.meta.get(META_NUM_STEPS), None);
        let (start, end) = (Mlp::init(16, 0), Mlp::from_model(&out, 16).unwrap());
        let c_local = site.c_local.as_ref().unwrap();
        for (p, n) in NAMES.iter().enumerate() {
            let diff = out.params[&format!("{SCAFFOLD_C_DIFF}{n}")].to_f32_vec();
            let want = drift(&start, &end, p, 10.0 * 0.1);
            assert!(want.iter().any(|v| v.abs() > 1e-3), "{n} did not move");
            assert_close(n, &diff, &want);
            assert_eq!(c_local[p], diff, "c_local = 0 + c_diff for {n}");
        }
    }

    #[test]
    fn scaffold_second_round_uses_the_stored_local_control() {
        let (train, test) = small_data();
        let mut site = small_site(&train, &test);
        let first = site
            .train(
                &with_c_global(&Mlp::init(16, 0).to_model(), &zero_controls(16)),
                0,
            )
            .unwrap();
        let c1 = site.c_local.clone().unwrap();
        let start = Mlp::from_model(&first, 16).unwrap();
        let c_global: Controls = Mlp::shapes(16).map(|s| {
            (0..s.iter().product())
                .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
                .collect()
        });
        let rng = site.rng.clone();
        let out = site
            .train(&with_c_global(&start.to_model(), &c_global), 1)
            .unwrap();
        let end = Mlp::from_model(&out, 16).unwrap();
        // The same round by hand, with the correction lr·(c − c_i) of the stored c_i ...
        let by_hand = |c_local: &Controls| {
            let mut correction = Controls::default();
            for ((d, g), l) in correction.iter_mut().zip(&c_global).zip(c_local) {
                *d = g.iter().zip(l).map(|(g, l)| 0.1 * (g - l)).collect();
            }
            let terms = RoundTerms {
                prox: None,
                scaffold: Some(&correction),
            };
            let mut net = start.clone();
            let (_, k) = net
                .train_with(
                    &train,
                    &site.indices,
                    &site.hyper,
                    &mut rng.clone(),
                    &terms,
                    &mut |_, _, _| {},
                )
                .unwrap();
            assert_eq!(k, 10);
            net
        };
        assert_eq!(end, by_hand(&c1));
        // ... which a learner that forgot c_i would not have matched.
        assert_ne!(end, by_hand(&zero_controls(16)));
        // c_diff = c_i⁺ − c_i = −c + (w_global − w)/(K·lr): not the first round's formula.
        let c2 = site.c_local.as_ref().unwrap();
        for (p, n) in NAMES.iter().enumerate() {
            let diff = out.params[&format!("{SCAFFOLD_C_DIFF}{n}")].to_f32_vec();
            let first_formula = drift(&start, &end, p, 1.0);
            let want: Vec<f64> = first_formula
                .iter()
                .zip(&c_global[p])
                .map(|(d, g)| d - f64::from(*g))
                .collect();
            assert_close(n, &diff, &want);
            let off = diff
                .iter()
                .zip(&first_formula)
                .map(|(d, f)| (f64::from(*d) - f).abs())
                .fold(0.0, f64::max);
            assert!(off > 0.02, "{n}: c_diff ignores c_global ({off})");
            let sum: Vec<f64> = c1[p]
                .iter()
                .zip(&diff)
                .map(|(a, b)| f64::from(*a) + f64::from(*b))
                .collect();
            assert_close(n, &c2[p], &sum);
        }
    }

    #[test]
    fn scaffold_refuses_bad_controls_naming_them() {
        let (train, test) = small_data();
        let global = with_c_global(&Mlp::init(16, 0).to_model(), &zero_controls(16));
        let edit = |f: &dyn Fn(&mut BTreeMap<String, Tensor>)| {
            let mut m = global.clone();
            f(&mut m.params);
            m
        };
        let cases = [
            (
                edit(&|p| {
                    p.remove("scaffold_c_global.fc2.bias");
                }),
                "\"scaffold_c_global.fc2.bias\": missing",
            ),
            (
                edit(&|p| {
                    p.insert(
                        "scaffold_c_global.fc3.weight".into(),
                        Tensor::zeros(DType::F32, vec![1]).unwrap(),
                    );
                }),
                "\"scaffold_c_global.fc3.weight\": unexpected",
            ),
            (
                edit(&|p| {
                    p.insert(
                        "scaffold_c_global.fc1.bias".into(),
                        Tensor::zeros(DType::F32, vec![17]).unwrap(),
                    );
                }),
                "\"scaffold_c_global.fc1.bias\": SCAFFOLD control: expected F32 [16], got F32 [17]",
            ),
            (
                edit(&|p| {
                    p.insert(
                        "scaffold_c_global.fc2.bias".into(),
                        Tensor::zeros(DType::F16, vec![10]).unwrap(),
                    );
                }),
                "\"scaffold_c_global.fc2.bias\": SCAFFOLD control: expected F32 [10], got F16",
            ),
            (
                edit(&|p| {
                    let mut v = vec![0.0; 10];
                    v[4] = f32::NAN;
                    p.insert(
                        "scaffold_c_global.fc2.bias".into(),
                        Tensor::from_f32(vec![10], &v).unwrap(),
                    );
                }),
                "\"scaffold_c_global.fc2.bias\": SCAFFOLD control holds a non-finite value",
            ),
        ];
        for (bad, want) in cases {
            let mut site = small_site(&train, &test);
            let rng = site.rng.clone();
            let err = site.train(&bad, 0).unwrap_err();
            assert!(matches!(err, LearnerError::Incompatible(_)), "{err}");
            assert!(err.to_string().contains(want), "{err} lacks {want}");
            assert!(
                site.c_local.is_none() && site.rng == rng,
                "{want}: state moved"
            );
        }
        let mut site = small_site(&train, &test);
        site.hyper.lr = 0.0;
        let err = site.train(&global, 0).unwrap_err().to_string();
        assert!(err.contains("SCAFFOLD needs a positive"), "{err}");
    }

    #[test]
    fn control_tensors_are_not_weights() {
        let (train, test) = small_data();
        let plain = Mlp::init(16, 0).to_model();
        let mut both = with_c_global(&plain, &zero_controls(16));
        both.params.insert(
            format!("{SCAFFOLD_C_DIFF}fc1.bias"),
            Tensor::zeros(DType::F32, vec![16]).unwrap(),
        );
        assert_eq!(
            Mlp::from_model(&both, 16).unwrap(),
            Mlp::from_model(&plain, 16).unwrap()
        );
        let mut site = small_site(&train, &test);
        assert_eq!(
            site.validate(&both).unwrap(),
            site.validate(&plain).unwrap()
        );
    }

    #[test]
    fn diff_transfer_plus_the_received_model_is_the_full_result() {
        let (train, test) = small_data();
        let g0 = Mlp::init(16, 0).to_model();
        let c_global: Controls = Mlp::shapes(16).map(|s| {
            (0..s.iter().product())
                .map(|i| ((i % 5) as f32 - 2.0) * 0.01)
                .collect()
        });
        let cases = [
            ("plain", g0.clone()),
            (
                "fedprox",
                with_meta(&g0, META_FEDPROX_MU, MetaValue::Float(0.5)),
            ),
            ("scaffold", with_c_global(&g0, &c_global)),
        ];
        for (what, mut global) in cases {
            let mut full = small_site(&train, &test);
            let mut diff = small_site(&train, &test).with_params_transfer(TransferType::Diff);
            // Two rounds, so that SCAFFOLD's second one runs on the stored c_i.
            for round in 0..2 {
                let f = full.train(&global, round).unwrap();
                let d = diff.train(&global, round).unwrap();
                assert_eq!(f.params_type, ParamsType::Full, "{what}");
                assert_eq!(d.params_type, ParamsType::Diff, "{what}");
                assert!(d.params.keys().eq(f.params.keys()), "{what}");
                assert_eq!(d.meta, f.meta, "{what}");
                for (name, t) in &d.params {
                    let (d, f) = (t.to_f32_vec(), f.params[name].to_f32_vec());
                    if name.starts_with(SCAFFOLD_C_DIFF) {
                        // Control changes go out as they are.
                        assert_eq!(d, f, "{what} round {round}: {name}");
                        continue;
                    }
                    let g = global.params[name].to_f32_vec();
                    assert!(d.iter().any(|v| v.abs() > 1e-4), "{what}: {name} moved");
                    for (i, ((d, g), f)) in d.iter().zip(&g).zip(&f).enumerate() {
                        assert!(
                            (d + g - f).abs() <= 1e-6,
                            "{what} round {round}: {name}[{i}]: {d} + {g} != {f}"
                        );
                    }
                }
                // The next round starts from the full result, with the same algorithm state.
                for n in NAMES {
                    global.params.insert(n.to_string(), f.params[n].clone());
                }
            }
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
