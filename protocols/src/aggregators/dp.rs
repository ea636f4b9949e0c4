//! DP-FedAvg as an aggregator: each result's update clipped, the clipped updates averaged
//! with equal weights, Gaussian noise added, `(ε, δ)` accounted (the mechanism and its
//! reasons are in [`crate::dp`]).
//!
//! **Streaming.** The round keeps one [`FedAvg`] accumulator, as plain FedAvg does: a result
//! whose update has norm `‖Δᵢ‖` is folded with weight `sᵢ = min(1, C/‖Δᵢ‖)`, so the
//! accumulator holds `x̄ = Σ sᵢ xᵢ / S` (`S = Σ sᵢ`) and the mean clipped update is
//! `(S/m)(x̄ − g)`. Each result is read once more than under FedAvg (for its norm), and the
//! global model's weights are held in memory for the round (to subtract them).
//!
//! **State in the global model**, like a server optimizer's: `dp_clip_norm` (f32\[1\], the
//! `C` of the next round, which adaptive clipping moves), `dp_rounds` (i64\[1\], DP rounds
//! so far, also the noise stream's id) and `dp_rdp` (f32\[151\], the RDP spent so far at each
//! order of [`DEFAULT_ALPHAS`]: summing it round by round composes rounds whose sampling
//! rates differ). A model without them starts from round 0 and the configured `C`. They are
//! stripped from what learners get and from a run's results, and they are what lets a
//! swarm's next aggregator (or a restarted server) go on where the last one stopped.
//!
//! **Metrics.** The new global model's `metrics` carry [`METRIC_EPSILON`] and
//! [`METRIC_DELTA`] (the privacy spent to make it) and [`METRIC_CLIP`] (the `C` its round
//! clipped to); the workflows report a model version's own metrics with the trainers'
//! measurements of it.
//!
//! Only float tensors are clipped and noised. An integer tensor (a batch-norm counter) is
//! neither: the new global model keeps the old one's value, so results cannot leak through
//! it.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::aggregate::{AggregateError, FedAvg, partial_weight};
use crate::dp::accountant::{DEFAULT_ALPHAS, compute_rdp, privacy_spent};
use crate::dp::{
    Clipping, DpSpec, Gaussian, adaptive_model_noise, clip_scale, next_clip_norm, noise_rng,
};
use crate::model::{DType, FLModel, ModelError, ParamsType, Tensor};
use crate::stored::{ModelRef, check_layout};

/// Name of the clipping norm of the next round in the global model: f32\[1\].
pub const DP_CLIP_NORM: &str = "dp_clip_norm";
/// Name of the count of DP rounds so far in the global model: i64\[1\].
pub const DP_ROUNDS: &str = "dp_rounds";
/// Name of the RDP spent so far, at each order of [`DEFAULT_ALPHAS`], in the global model:
/// f32\[151\].
pub const DP_RDP: &str = "dp_rdp";

/// Metric of a DP model: the `ε` spent to make it, at [`METRIC_DELTA`].
pub const METRIC_EPSILON: &str = "privacy_epsilon";
/// Metric of a DP model: the `δ` its `ε` is stated at.
pub const METRIC_DELTA: &str = "privacy_delta";
/// Metric of a DP model: the clipping norm of the round that made it.
pub const METRIC_CLIP: &str = "dp_clipping_norm";

/// Whether `name` is DP state carried in the global model.
pub fn is_dp_state(name: &str) -> bool {
    matches!(name, DP_CLIP_NORM | DP_ROUNDS | DP_RDP)
}

/// The DP state a global model carries.
#[derive(Debug, Clone, PartialEq)]
pub struct DpState {
    /// The clipping norm for the next round; `None` before the first (the configured one).
    pub clip: Option<f64>,
    /// DP rounds aggregated so far.
    pub rounds: u64,
    /// RDP spent so far at each order of [`DEFAULT_ALPHAS`] (zeros before the first round).
    pub rdp: Vec<f64>,
}

fn bad_state(name: &str, reason: &str) -> AggregateError {
    AggregateError::Model(ModelError::Incompatible {
        name: name.into(),
        reason: reason.into(),
    })
}

impl DpState {
    /// The state in `model`; a model without it is at its start. Malformed state (a wrong
    /// dtype or length, a clipping norm that is not positive, a negative count or RDP) is
    /// refused: it may come from a peer.
    pub fn of(model: &ModelRef) -> Result<DpState, AggregateError> {
        let view = model.select(|n| is_dp_state(n).then(|| n.to_string()), None)?;
        let loaded = view
            .load()
            .map_err(|e| AggregateError::Poisoned(e.to_string()))?;
        let p = &loaded.params;
        let clip = match p.get(DP_CLIP_NORM) {
            None => None,
            Some(t) if t.dtype() == DType::F32 && t.numel() == 1 => {
                let c = f64::from(t.to_f32_vec()[0]);
                if !(c.is_finite() && c > 0.0) {
                    return Err(bad_state(DP_CLIP_NORM, "not a positive clipping norm"));
                }
                Some(c)
            }
            Some(_) => return Err(bad_state(DP_CLIP_NORM, "not one f32 value")),
        };
        let rounds = match p.get(DP_ROUNDS) {
            None => 0,
            Some(t) if t.dtype() == DType::I64 && t.numel() == 1 => {
                let mut r = 0.0;
                t.for_each_f64(|_, v| r = v);
                if r < 0.0 {
                    return Err(bad_state(DP_ROUNDS, "a negative round count"));
                }
                r as u64
            }
            Some(_) => return Err(bad_state(DP_ROUNDS, "not one i64 value")),
        };
        let rdp = match p.get(DP_RDP) {
            None => vec![0.0; DEFAULT_ALPHAS.len()],
            Some(t) if t.dtype() == DType::F32 && t.numel() == DEFAULT_ALPHAS.len() => {
                let v: Vec<f64> = t.to_f32_vec().into_iter().map(f64::from).collect();
                if v.iter().any(|x| x.is_nan() || *x < 0.0) {
                    return Err(bad_state(DP_RDP, "a negative or NaN RDP value"));
                }
                v
            }
            Some(_) => {
                return Err(bad_state(
                    DP_RDP,
                    "not the f32 RDP curve over the accountant's 151 orders",
                ));
            }
        };
        Ok(DpState { clip, rounds, rdp })
    }
}

/// Calls `f` with each element of `bytes`, whole elements of a float `dtype`.
fn floats(dtype: DType, bytes: &[u8], mut f: impl FnMut(usize, f64)) {
    match dtype {
        DType::F32 => {
            for (i, c) in bytes.chunks_exact(4).enumerate() {
                f(i, f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            }
        }
        DType::F16 => {
            for (i, c) in bytes.chunks_exact(2).enumerate() {
                f(i, f64::from(half::f16::from_le_bytes([c[0], c[1]])));
            }
        }
        DType::BF16 => {
            for (i, c) in bytes.chunks_exact(2).enumerate() {
                f(i, f64::from(half::bf16::from_le_bytes([c[0], c[1]])));
            }
        }
        DType::I64 | DType::I8 | DType::U32 => {}
    }
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// The L2 norm of `result − global` (of `result` when it is a diff) over the float tensors,
/// read a chunk at a time. NaN when the result holds a non-finite value (the accumulator
/// refuses it next).
fn update_norm(global: &FLModel, result: &ModelRef) -> Result<f64, AggregateError> {
    let diff = result.params_type() == ParamsType::Diff;
    let mut sq = 0.0f64;
    result.for_each_chunk(|_, info, at, bytes| -> Result<(), AggregateError> {
        if !is_float(info.dtype) {
            return Ok(());
        }
        let g = global
            .params
            .get(&info.name)
            .filter(|g| g.dtype() == info.dtype)
            .and_then(|g| g.bytes().get(at..at + bytes.len()))
            .ok_or_else(|| bad_state(&info.name, "does not match the global model"))?;
        let mut base = Vec::with_capacity(bytes.len() / info.dtype.size());
        if !diff {
            floats(info.dtype, g, |_, x| base.push(x));
        }
        floats(info.dtype, bytes, |i, x| {
            let d = x - base.get(i).copied().unwrap_or(0.0);
            sq += d * d;
        });
        Ok(())
    })?;
    Ok(sq.sqrt())
}

/// One round of DP-FedAvg beside its [`FedAvg`] accumulator.
#[derive(Debug)]
pub(super) struct DpRound {
    spec: DpSpec,
    /// The model results are clipped against, its weights in memory, and the round's `C`.
    reference: Option<(ModelRef, Arc<FLModel>, f64)>,
    /// `S = Σ sᵢ`.
    scale_sum: f64,
    /// Results whose update was within `C`.
    unclipped: usize,
    /// The results' own weights (sample counts), for the reports.
    weight_sum: f64,
    /// The metrics' weighted sums and weights (by the results' own weights, as FedAvg's).
    metric_sums: BTreeMap<String, (f64, f64)>,
}

impl DpRound {
    pub(super) fn new(spec: DpSpec) -> Self {
        DpRound {
            spec,
            reference: None,
            scale_sum: 0.0,
            unclipped: 0,
            weight_sum: 0.0,
            metric_sums: BTreeMap::new(),
        }
    }

    /// The results' own weights, summed.
    pub(super) fn total_weight(&self) -> f64 {
        self.weight_sum
    }

    /// The weighted mean of the results' metrics.
    pub(super) fn metrics(&self) -> BTreeMap<String, f64> {
        self.metric_sums
            .iter()
            .map(|(k, (s, w))| (k.clone(), s / w))
            .collect()
    }

    /// Clips `result` (its weights `res_w`) against `reference` (its weights `ref_w`) and
    /// folds it into `acc`. On error nothing changes.
    pub(super) fn add(
        &mut self,
        acc: &mut FedAvg,
        reference: &ModelRef,
        ref_w: &ModelRef,
        res_w: &ModelRef,
        weight: f64,
    ) -> Result<(), AggregateError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::BadWeight(weight));
        }
        if partial_weight(res_w).is_some() {
            return Err(bad_state(
                crate::aggregate::META_PARTIAL_WEIGHT,
                "DP-FedAvg clips each client's update: a region's partial sum cannot be clipped",
            ));
        }
        let (global, clip) = match &self.reference {
            Some((r, g, c)) if r.same(reference) => (Arc::clone(g), *c),
            _ => {
                let clip = DpState::of(reference)?
                    .clip
                    .unwrap_or(self.spec.initial_clip());
                let g = ref_w
                    .load()
                    .map_err(|e| AggregateError::Poisoned(e.to_string()))?;
                self.reference = Some((reference.clone(), Arc::clone(&g), clip));
                (g, clip)
            }
        };
        check_layout(&ref_w.tensors(), &res_w.tensors())?;
        let norm = update_norm(&global, res_w)?;
        // A non-finite result is folded with weight 1 only to be refused by the accumulator.
        let scale = if norm.is_finite() {
            clip_scale(norm, clip)
        } else {
            1.0
        };
        acc.add_ref(ref_w, res_w, scale)?;
        self.scale_sum += scale;
        self.unclipped += usize::from(norm <= clip);
        self.weight_sum += weight;
        for (k, v) in res_w.metrics() {
            if v.is_finite() {
                let e = self.metric_sums.entry(k.clone()).or_insert((0.0, 0.0));
                e.0 += weight * v;
                e.1 += weight;
            }
        }
        Ok(())
    }

    /// The next global model from `acc` (the `sᵢ`-weighted mean), `global` (with its DP
    /// state) and `base` (its weights), for a run of `clients` clients (0: unknown).
    pub(super) fn finish(
        self,
        acc: FedAvg,
        global: &ModelRef,
        base: &ModelRef,
        clients: usize,
    ) -> Result<FLModel, AggregateError> {
        let m = acc.count();
        let state = DpState::of(global)?;
        let mean = acc.finish_ref(base)?;
        let (g, clip) = match self.reference {
            Some((r, g, c)) if r.same(global) => (g, c),
            _ => (
                base.load()
                    .map_err(|e| AggregateError::Poisoned(e.to_string()))?,
                state.clip.unwrap_or(self.spec.initial_clip()),
            ),
        };
        let shrink = self.scale_sum / m as f64;
        noisy_step(
            &self.spec,
            &state,
            &g,
            clip,
            &mean,
            shrink,
            m,
            self.unclipped as f64,
            clients,
        )
    }
}

/// The round's `C`: the global model's, or the configured one before the first round.
pub fn round_clip(spec: &DpSpec, global: &ModelRef) -> Result<f64, AggregateError> {
    Ok(DpState::of(global)?.clip.unwrap_or(spec.initial_clip()))
}

/// DP-FedAvg's step on a securely aggregated round ([`crate::secagg`]): each of the `m`
/// survivors clipped its update to the round's `C` ([`round_clip`]) before masking, with
/// weight 1, so `mean` is `Σ sᵢΔᵢ / m`, the mean clipped update, and `unclipped` the number
/// of updates within `C` (adaptive clipping; `m` otherwise). The noise, the next `C` and
/// the accounting are those of [`DpRound::finish`]: the noise is added once, to the sum the
/// aggregator learns. `global` carries the DP state, `weights` is its model without it.
pub fn secure_step(
    spec: &DpSpec,
    global: &ModelRef,
    weights: &FLModel,
    mean: &[f32],
    m: usize,
    unclipped: f64,
    clients: usize,
) -> Result<FLModel, AggregateError> {
    if m == 0 {
        return Err(AggregateError::Model(ModelError::Incompatible {
            name: "secure aggregation".into(),
            reason: "no survivors".into(),
        }));
    }
    let state = DpState::of(global)?;
    let clip = round_clip(spec, global)?;
    let x = crate::secagg::apply_update(weights, mean)
        .map_err(|e| bad_state("secure aggregation", &e.to_string()))?;
    noisy_step(spec, &state, weights, clip, &x, 1.0, m, unclipped, clients)
}

/// The noisy new global model from `mean` (the clipped results' mean, as a model) and `g`
/// (the old weights): `g + shrink·(mean − g) + N(0, (z·C/m)²)` per float value, with the next
/// `C`, the DP state moved one round and the privacy spent. `unclipped` is the number of
/// results within `C`.
#[allow(clippy::too_many_arguments)] // the mechanism's inputs, each named where it is used
fn noisy_step(
    spec: &DpSpec,
    state: &DpState,
    g: &FLModel,
    clip: f64,
    mean: &FLModel,
    shrink: f64,
    m: usize,
    unclipped: f64,
    clients: usize,
) -> Result<FLModel, AggregateError> {
    let mf = m as f64;
    let z = spec.noise_multiplier;
    let mut noise = Gaussian::new(noise_rng(&spec.noise_seed, state.rounds));
    // Adaptive clipping: the noisy count first (its draw comes first in the stream), then
    // the model's share of the noise. When this round has too few results to afford
    // the count's noise, it does not adapt and the model takes all of `z`.
    let (z_model, next_clip) = match spec.clipping {
        Clipping::Fixed { .. } => (z, clip),
        Clipping::Adaptive(a) => {
            let sigma_b = a.count_stddev_for(m);
            match adaptive_model_noise(z, sigma_b) {
                Ok(z_model) => {
                    let noisy = (unclipped + sigma_b * noise.sample()) / mf;
                    let c = next_clip_norm(clip, noisy, a.target_quantile, a.lr);
                    (z_model, c)
                }
                Err(e) => {
                    tracing::warn!(round = state.rounds, results = m, %e, "adaptive clipping skips this round");
                    (z, clip)
                }
            }
        }
    };
    let std = z_model * clip / mf;
    let mut params = BTreeMap::new();
    for (name, x) in &mean.params {
        let old = g
            .params
            .get(name)
            .ok_or_else(|| bad_state(name, "not in the global model"))?;
        let mut next = |gi: f64, xi: f64| gi + shrink * (xi - gi) + std * noise.sample();
        let t = match old.dtype() {
            DType::F32 => {
                let mut out = Vec::with_capacity(old.bytes().len());
                for (a, b) in old.bytes().chunks_exact(4).zip(x.bytes().chunks_exact(4)) {
                    let gi = f32::from_le_bytes([a[0], a[1], a[2], a[3]]);
                    let xi = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    let v = next(f64::from(gi), f64::from(xi)) as f32;
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Tensor::from_bytes(DType::F32, old.shape().to_vec(), out)?
            }
            DType::F16 | DType::BF16 => {
                let mut xs = Vec::with_capacity(x.numel());
                x.for_each_f64(|_, v| xs.push(v));
                let mut out = Vec::with_capacity(old.numel());
                old.for_each_f64(|i, gi| out.push(next(gi, xs.get(i).copied().unwrap_or(gi))));
                Tensor::from_f64_like(old, out.into_iter())
            }
            DType::I64 | DType::I8 | DType::U32 => old.clone(),
        };
        params.insert(name.clone(), t);
    }
    // Accounting: one more step of the sampled Gaussian mechanism at q = m/N.
    let q = if clients == 0 {
        1.0
    } else {
        (mf / clients as f64).min(1.0)
    };
    let step =
        compute_rdp(q, z, 1, &DEFAULT_ALPHAS).map_err(|e| bad_state(DP_RDP, &e.to_string()))?;
    let rdp: Vec<f64> = state.rdp.iter().zip(step).map(|(a, b)| a + b).collect();
    let (eps, _) = privacy_spent(&DEFAULT_ALPHAS, &rdp, spec.target_delta)
        .map_err(|e| bad_state(DP_RDP, &e.to_string()))?;
    // f32 state: an RDP too large for f32 is no privacy either way.
    let rdp32: Vec<f32> = rdp.iter().map(|x| (*x as f32).min(f32::MAX)).collect();
    params.insert(
        DP_CLIP_NORM.into(),
        Tensor::from_f32(vec![1], &[next_clip as f32])?,
    );
    params.insert(
        DP_ROUNDS.into(),
        Tensor::from_i64(
            vec![1],
            &[i64::try_from(state.rounds + 1).unwrap_or(i64::MAX)],
        )?,
    );
    params.insert(DP_RDP.into(), Tensor::from_f32(vec![rdp32.len()], &rdp32)?);
    let metrics = BTreeMap::from([
        (METRIC_EPSILON.to_string(), eps),
        (METRIC_DELTA.to_string(), spec.target_delta),
        (METRIC_CLIP.to_string(), clip),
    ]);
    Ok(FLModel {
        params,
        params_type: ParamsType::Full,
        metrics,
        ..FLModel::default()
    })
}
