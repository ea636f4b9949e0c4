//! The aggregation algorithms a job can name, as one family: how a round's results become
//! one model ([`Rule`]), what the server does with it ([`ServerOpt`]), SCAFFOLD's control
//! variates, and what the tasks carry to the learners (FedProx's `mu`).
//!
//! A workflow holds one [`Aggregator`] for the run and opens a [`RoundAgg`] for each round:
//! [`Aggregator::round`], then [`RoundAgg::add_ref`] per result, then
//! [`Aggregator::finish`].
//!
//! **State lives in the global model.** A server optimizer's moments (`fedopt_m.<param>`,
//! `fedopt_v.<param>`, the step count `fedopt_steps`) and SCAFFOLD's global control
//! (`scaffold_c_global.<param>`) are tensors of the global model, so whoever holds the model
//! takes the next step exactly where the last one stopped: the server in scatter-and-gather
//! (also after a restart, from its snapshot), and each round's new aggregator in a swarm,
//! where the model (and so the state) travels sealed in the `Learn`. The learners are sent
//! [`task_view`]: the moments stay with the aggregators, SCAFFOLD's control goes along.
//! Results are compared with [`weights`], the global model without its state.
//!
//! - [`Rule::Mean`] is the streaming [`FedAvg`]: memory holds one accumulator.
//! - The robust rules ([`robust`]) keep every accepted result of the round (in memory) until
//!   the round ends, since a median or a Krum score needs all of them. Each result is still
//!   checked by a `FedAvg` as it arrives, so the same results are refused with the same
//!   errors, and the round's metrics are the same weighted mean. They refuse partials (a
//!   hub's weighted sums), whose median means nothing.
//! - FedProx is FedAvg on the server; its `mu` goes to the learners in the task's headers,
//!   which the node copies into the model's metadata under [`META_FEDPROX_MU`], where FLARE
//!   puts it.
//! - SCAFFOLD (Karimireddy et al., option II): the global control starts at zero for every
//!   f32 weight ([`Aggregator::prepare`]); each learner returns its weights and its control
//!   change `scaffold_c_diff.<param>`; the server averages both with the same weights and
//!   sets `c += |S|/N · mean(Δc)`, the paper's rule for partial participation (`N` the run's
//!   clients, `|S|` the results taken). FLARE adds `mean(Δc)` (no `|S|/N`), which is the
//!   same only when every client answers; FLARE also weighs by `NUM_STEPS_CURRENT_ROUND`,
//!   where Flare takes the run's weight (the sample count when a result gives it).
//! - DP-FedAvg ([`dp`], [`AggregatorSpec::dp`]): each update clipped, the clipped updates
//!   averaged with equal weights, Gaussian noise added, the privacy spent accounted; its
//!   clipping norm, round count and spent RDP are state in the global model (`dp_clip_norm`,
//!   `dp_rounds`, `dp_rdp`). It composes with the plain mean only.

pub mod dp;
pub mod robust;
pub mod server_opt;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::aggregate::{AggregateError, FedAvg, partial_weight};
use crate::dp::DpSpec;
use crate::model::{DType, FLModel, MetaValue, ModelError, ParamsType, Tensor};
use crate::stored::{ModelRef, check_layout};

use crate::secagg::{DpClip, Unmasked};
pub use dp::{DP_CLIP_NORM, DP_RDP, DP_ROUNDS, DpState, METRIC_CLIP, METRIC_DELTA, METRIC_EPSILON};
pub use robust::RobustError;
pub use server_opt::{Cosine, OptState, ServerOpt};

/// Metadata key of FedProx's proximal coefficient in the model a task carries (FLARE's
/// `AlgorithmConstants.FEDPROX_MU`).
pub const META_FEDPROX_MU: &str = "fedprox_mu";

/// Name prefix of SCAFFOLD's global control variate in a task's model: tensor
/// `scaffold_c_global.<param>` has the shape of `<param>` (FLARE's meta key
/// `scaffold_c_global`, carried here as tensors so it streams and travels with the model).
pub const SCAFFOLD_C_GLOBAL: &str = "scaffold_c_global.";

/// Name prefix of a SCAFFOLD client's control change in its result: tensor
/// `scaffold_c_diff.<param>` is `c_local_new − c_local` for `<param>` (FLARE's
/// `scaffold_c_diff`).
pub const SCAFFOLD_C_DIFF: &str = "scaffold_c_diff.";

/// How a round's results are combined.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Rule {
    /// The weighted mean (FedAvg), streaming.
    #[default]
    Mean,
    /// The coordinate-wise median (unweighted).
    Median,
    /// The coordinate-wise mean without the `beta` fraction at each tail (unweighted).
    TrimmedMean {
        /// Fraction cut from each tail, in `[0, 0.5)`.
        beta: f64,
    },
    /// Krum (`keep` 1) or MultiKrum: the `keep` results with the lowest Krum scores,
    /// averaged by weight.
    Krum {
        /// Malicious results tolerated (`f`).
        malicious: usize,
        /// Results kept.
        keep: usize,
    },
    /// Bulyan: `n − 2f` results picked by Krum one at a time, then per coordinate the mean
    /// of the `n − 4f` values closest to their median. Needs `n ≥ 4f + 3`.
    Bulyan {
        /// Malicious results tolerated (`f`).
        malicious: usize,
    },
}

/// Name prefix of a server optimizer's first moment (or momentum buffer) in the global
/// model: tensor `fedopt_m.<param>`.
pub const FEDOPT_M: &str = "fedopt_m.";

/// Name prefix of a server optimizer's second moment in the global model:
/// `fedopt_v.<param>`.
pub const FEDOPT_V: &str = "fedopt_v.";

/// Name of the server optimizer's step count in the global model: an i64 tensor of one
/// value (a tensor, not metadata, so it survives every file and transfer the model does).
pub const FEDOPT_STEPS: &str = "fedopt_steps";

/// Whether tensor `name` is an algorithm's state carried in the global model (a server
/// optimizer's moments, SCAFFOLD's global control, DP-FedAvg's clipping norm, round count
/// and spent RDP) or a SCAFFOLD client's control change, rather than a weight of the model.
pub fn is_state(name: &str) -> bool {
    name == FEDOPT_STEPS
        || dp::is_dp_state(name)
        || [FEDOPT_M, FEDOPT_V, SCAFFOLD_C_GLOBAL, SCAFFOLD_C_DIFF]
            .iter()
            .any(|p| name.starts_with(p))
}

/// The weights of `model`, without the algorithm state it carries ([`is_state`]).
pub fn weights(model: &ModelRef) -> Result<ModelRef, ModelError> {
    model.select(|n| (!is_state(n)).then(|| n.to_string()), None)
}

/// The tensors of `model` under `prefix`, named without it, as full weights.
pub fn under(model: &ModelRef, prefix: &str) -> Result<ModelRef, ModelError> {
    model.select(
        |n| n.strip_prefix(prefix).map(str::to_string),
        Some(ParamsType::Full),
    )
}

/// What a learner needs of the global model: everything but a server optimizer's and
/// DP-FedAvg's state, which only aggregators read.
pub fn task_view(model: &ModelRef) -> Result<ModelRef, ModelError> {
    model.select(
        |n| {
            let opt = n == FEDOPT_STEPS
                || n.starts_with(FEDOPT_M)
                || n.starts_with(FEDOPT_V)
                || dp::is_dp_state(n);
            (!opt).then(|| n.to_string())
        },
        None,
    )
}

/// An aggregation algorithm, as a job names it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AggregatorSpec {
    /// How results are combined.
    pub rule: Rule,
    /// The server optimizer applied to the combination, if any.
    pub opt: Option<ServerOpt>,
    /// FedProx's `mu`, sent to the learners.
    pub fedprox_mu: Option<f64>,
    /// SCAFFOLD: the global control travels with the model and the learners correct their
    /// steps with it.
    pub scaffold: bool,
    /// Central DP-FedAvg on the plain mean ([`crate::dp`]).
    pub dp: Option<DpSpec>,
}

impl AggregatorSpec {
    /// Whether the algorithm keeps state from round to round (a server optimizer's moments,
    /// SCAFFOLD's control, DP-FedAvg's clipping norm and accounting), carried in the global
    /// model.
    pub fn is_stateful(&self) -> bool {
        self.opt.is_some() || self.scaffold || self.dp.is_some()
    }

    /// Why DP-FedAvg cannot be combined with the rest of this algorithm, if it cannot: its
    /// clipping and noise bound what one client changes in the *mean*, which a robust rule's
    /// selection, a server optimizer's moments (fed by the noisy mean they would amplify and
    /// carry) or SCAFFOLD's unclipped, unnoised control variates do not respect.
    pub fn dp_conflict(&self) -> Option<&'static str> {
        self.dp?;
        if self.rule != Rule::Mean {
            Some(
                "DP-FedAvg clips and noises the plain mean; a robust rule (median, trimmed mean, Krum, Bulyan) cannot take its place",
            )
        } else if self.opt.is_some() {
            Some(
                "DP-FedAvg composes with the plain mean (FedAvg) only, not with a server optimizer",
            )
        } else if self.scaffold {
            Some(
                "DP-FedAvg composes with the plain mean (FedAvg) only: SCAFFOLD's control variates would go unclipped and unnoised",
            )
        } else {
            None
        }
    }
}

/// A run's aggregator. Its state from round to round lives in the global model (tensors
/// under [`FEDOPT_M`], [`FEDOPT_V`] and [`SCAFFOLD_C_GLOBAL`], the step count in
/// [`FEDOPT_STEPS`]), so whoever holds the model can take the next step: the server in
/// scatter-and-gather, a swarm's next aggregator, or a server restarted from its snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Aggregator {
    spec: AggregatorSpec,
    /// Clients of the run (SCAFFOLD's `N` in `c += |S|/N · mean(Δc)`); 0: as many as
    /// answered (FLARE's rule).
    clients: usize,
}

impl Aggregator {
    /// A fresh aggregator for `spec`.
    pub fn new(spec: AggregatorSpec) -> Self {
        Aggregator { spec, clients: 0 }
    }

    /// The aggregator for a run of `clients` clients (SCAFFOLD's partial participation).
    pub fn for_clients(mut self, clients: usize) -> Self {
        self.clients = clients;
        self
    }

    /// The algorithm.
    pub fn spec(&self) -> &AggregatorSpec {
        &self.spec
    }

    /// The initial global model with the state the algorithm needs from the first round:
    /// SCAFFOLD's global control, zero, for every f32 weight. A model that has it already
    /// is returned as it is.
    pub fn prepare(&self, global: ModelRef) -> Result<ModelRef, AggregateError> {
        if !self.spec.scaffold
            || global
                .tensors()
                .iter()
                .any(|t| t.name.starts_with(SCAFFOLD_C_GLOBAL))
        {
            return Ok(global);
        }
        let mut m = Arc::unwrap_or_clone(
            global
                .load()
                .map_err(|e| AggregateError::Poisoned(e.to_string()))?,
        );
        let zeros: Vec<(String, Tensor)> = m
            .params
            .iter()
            .filter(|(n, t)| !is_state(n) && t.dtype() == DType::F32)
            .map(|(n, t)| {
                Tensor::zeros(DType::F32, t.shape().to_vec())
                    .map(|z| (format!("{SCAFFOLD_C_GLOBAL}{n}"), z))
            })
            .collect::<Result<_, _>>()?;
        m.params.extend(zeros);
        Ok(ModelRef::from(m))
    }

    /// The accumulator of one round.
    pub fn round(&self) -> RoundAgg {
        let combine = match self.spec.rule {
            Rule::Mean => Combine::Mean(FedAvg::new()),
            rule => Combine::Kept {
                rule,
                check: FedAvg::complete(),
                kept: Vec::new(),
            },
        };
        RoundAgg {
            combine,
            controls: self.spec.scaffold.then(FedAvg::new),
            reference: None,
            dp: self.spec.dp.map(dp::DpRound::new),
        }
    }

    /// What a task carries to the learners besides its model (FedProx's `mu`).
    pub fn task_meta(&self) -> Vec<(String, MetaValue)> {
        self.spec
            .fedprox_mu
            .map(|mu| (META_FEDPROX_MU.to_string(), MetaValue::Float(mu)))
            .into_iter()
            .collect()
    }

    /// Whether secure aggregation can run this algorithm: it reveals only the sum, which is
    /// all FedAvg, FedProx and DP-FedAvg use.
    pub fn supports_secure(&self) -> bool {
        self.spec.rule == Rule::Mean && self.spec.opt.is_none() && !self.spec.scaffold
    }

    /// What the sites of a securely aggregated round do to their update for this algorithm:
    /// DP-FedAvg's clipping to the round's `C` (from `global`'s state), or nothing.
    pub fn secure_clip(&self, global: &ModelRef) -> Result<Option<DpClip>, AggregateError> {
        let Some(spec) = &self.spec.dp else {
            return Ok(None);
        };
        Ok(Some(DpClip {
            clip_norm: dp::round_clip(spec, global)?,
            count_unclipped: matches!(spec.clipping, crate::dp::Clipping::Adaptive(_)),
        }))
    }

    /// The next global model from a securely aggregated round's unmasked mean update and the
    /// current `global`: the old weights plus the mean, or, under DP-FedAvg, the mean of the
    /// sites' clipped updates with the noise added once and the privacy accounted
    /// ([`dp::secure_step`]).
    pub fn finish_secure(
        &self,
        global: &ModelRef,
        u: &Unmasked,
    ) -> Result<FLModel, AggregateError> {
        let base = weights(global)?
            .load()
            .map_err(|e| AggregateError::Poisoned(e.to_string()))?;
        match &self.spec.dp {
            None => crate::secagg::apply_update(&base, &u.mean)
                .map_err(|e| AggregateError::Poisoned(e.to_string())),
            Some(spec) => {
                let m = u.survivors.len();
                let unclipped = u.unclipped.unwrap_or(m as f64);
                dp::secure_step(spec, global, &base, &u.mean, m, unclipped, self.clients)
            }
        }
    }

    /// The next global model from the round's results and the current `global`, with the
    /// algorithm's state moved one step.
    pub fn finish(&self, agg: RoundAgg, global: &ModelRef) -> Result<FLModel, AggregateError> {
        let base = weights(global)?;
        let answered = agg.count();
        if let Some(why) = self.spec.dp_conflict() {
            return Err(AggregateError::Model(ModelError::Incompatible {
                name: "aggregator".into(),
                reason: why.into(),
            }));
        }
        let combined = match (agg.dp, agg.combine) {
            (Some(dp), Combine::Mean(f)) => return dp.finish(f, global, &base, self.clients),
            (_, c) => c,
        };
        let mut next = match combined {
            Combine::Mean(f) => f.finish_ref(&base)?,
            Combine::Kept { rule, check, kept } => {
                if check.count() == 0 {
                    return Err(AggregateError::Empty);
                }
                combine(rule, &kept, &base)?
            }
        };
        if let Some(opt) = self.spec.opt {
            let mut state = OptState {
                steps: steps_of(global)?,
                m: state_vectors(global, FEDOPT_M)?,
                v: state_vectors(global, FEDOPT_V)?,
            };
            optimize(opt, &mut state, &base, &mut next)?;
            for (prefix, map) in [(FEDOPT_M, state.m), (FEDOPT_V, state.v)] {
                for (name, values) in map {
                    let shape = next.params.get(&name).map(|t| t.shape().to_vec());
                    if let Some(shape) = shape {
                        let t = Tensor::from_f32(shape, &values)?;
                        next.params.insert(format!("{prefix}{name}"), t);
                    }
                }
            }
            let steps = i64::try_from(state.steps).unwrap_or(i64::MAX);
            next.params
                .insert(FEDOPT_STEPS.into(), Tensor::from_i64(vec![1], &[steps])?);
        }
        if let Some(controls) = agg.controls {
            let c_global = under(global, SCAFFOLD_C_GLOBAL)?;
            let mean_diff = controls.finish_ref(&c_global)?;
            // The paper's c += |S|/N · mean(Δc); FLARE adds the mean (|S| = N).
            let share = if self.clients == 0 {
                1.0
            } else {
                answered as f64 / self.clients as f64
            };
            let c_global = c_global
                .load()
                .map_err(|e| AggregateError::Poisoned(e.to_string()))?;
            for (name, c) in &c_global.params {
                let Some(d) = mean_diff.params.get(name) else {
                    continue;
                };
                let mut out = Vec::with_capacity(c.numel());
                let mut diffs = Vec::with_capacity(d.numel());
                d.for_each_f64(|_, x| diffs.push(x));
                c.for_each_f64(|k, x| out.push(x + share * diffs.get(k).copied().unwrap_or(0.0)));
                next.params.insert(
                    format!("{SCAFFOLD_C_GLOBAL}{name}"),
                    Tensor::from_f64_like(c, out.into_iter()),
                );
            }
        }
        Ok(next)
    }
}

/// The server optimizer's steps so far, from the global model (0 without the tensor).
fn steps_of(model: &ModelRef) -> Result<u64, AggregateError> {
    let view = model.select(|n| (n == FEDOPT_STEPS).then(|| n.to_string()), None)?;
    let loaded = view
        .load()
        .map_err(|e| AggregateError::Poisoned(e.to_string()))?;
    let Some(t) = loaded.params.get(FEDOPT_STEPS) else {
        return Ok(0);
    };
    let mut steps = None;
    t.for_each_f64(|_, v| steps = Some(v));
    match steps {
        Some(v) if t.numel() == 1 && v >= 0.0 && v.fract() == 0.0 => Ok(v as u64),
        _ => Err(AggregateError::Model(ModelError::Incompatible {
            name: FEDOPT_STEPS.into(),
            reason: "not one whole, non-negative step count".into(),
        })),
    }
}

/// A state tensor family of `model` as f32 vectors by weight name.
fn state_vectors(
    model: &ModelRef,
    prefix: &str,
) -> Result<BTreeMap<String, Vec<f32>>, AggregateError> {
    let view = under(model, prefix)?
        .load()
        .map_err(|e| AggregateError::Poisoned(e.to_string()))?;
    Ok(view
        .params
        .iter()
        .map(|(n, t)| (n.clone(), t.to_f32_vec()))
        .collect())
}

/// How one round's results are combined.
#[derive(Debug)]
enum Combine {
    /// A streaming FedAvg.
    Mean(FedAvg),
    /// Results kept for a robust rule, each checked by `check` on arrival.
    Kept {
        rule: Rule,
        /// Checks each result and averages the metrics.
        check: FedAvg,
        /// The accepted results and their weights.
        kept: Vec<(Arc<FLModel>, f64)>,
    },
}

/// One round's accumulator.
#[derive(Debug)]
pub struct RoundAgg {
    combine: Combine,
    /// SCAFFOLD: the mean of the clients' control changes, weighted as their models.
    controls: Option<FedAvg>,
    /// The last reference model with its views (weights, SCAFFOLD control), made once a
    /// round rather than once a result.
    reference: Option<(ModelRef, ModelRef, ModelRef)>,
    /// DP-FedAvg: the clipping beside the mean, which then weighs results by their clipping
    /// factors (see [`dp`]).
    dp: Option<dp::DpRound>,
}

impl Default for RoundAgg {
    fn default() -> Self {
        RoundAgg {
            combine: Combine::Mean(FedAvg::new()),
            controls: None,
            reference: None,
            dp: None,
        }
    }
}

impl RoundAgg {
    fn check(&self) -> &FedAvg {
        match &self.combine {
            Combine::Mean(f) | Combine::Kept { check: f, .. } => f,
        }
    }

    /// Results accepted so far.
    pub fn count(&self) -> usize {
        self.check().count()
    }

    /// Sum of their weights.
    pub fn total_weight(&self) -> f64 {
        match &self.dp {
            Some(dp) => dp.total_weight(),
            None => self.check().total_weight(),
        }
    }

    /// The weighted mean of their metrics.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        match &self.dp {
            Some(dp) => dp.metrics(),
            None => self.check().metrics(),
        }
    }

    /// [`RoundAgg::add_ref`] for models in memory. A plain FedAvg round of models without
    /// algorithm state folds them in place, as [`FedAvg::add`] does, without a copy.
    pub fn add(
        &mut self,
        reference: &FLModel,
        result: &FLModel,
        weight: f64,
    ) -> Result<(), AggregateError> {
        let stateless = |m: &FLModel| !m.params.keys().any(|n| is_state(n));
        if let (Combine::Mean(f), None, None) = (&mut self.combine, &self.controls, &self.dp)
            && stateless(reference)
            && stateless(result)
        {
            return f.add(reference, result, weight);
        }
        self.add_ref(
            &ModelRef::from(reference.clone()),
            &ModelRef::from(result.clone()),
            weight,
        )
    }

    /// Checks `result` against `reference` (the global model it was trained from, with the
    /// algorithm's state) and takes it with `weight`. On error nothing changes.
    pub fn add_ref(
        &mut self,
        reference: &ModelRef,
        result: &ModelRef,
        weight: f64,
    ) -> Result<(), AggregateError> {
        let ref_w = match &self.reference {
            Some((r, w, _)) if r.same(reference) => w.clone(),
            _ => {
                let w = weights(reference)?;
                let c = under(reference, SCAFFOLD_C_GLOBAL)?;
                self.reference = Some((reference.clone(), w.clone(), c));
                w
            }
        };
        let res_w = weights(result)?;
        // SCAFFOLD's part is checked whole first, so that a bad control cannot leave the
        // weights taken and the control not.
        let controls = match &self.controls {
            None => None,
            Some(_) => {
                let c_ref = match &self.reference {
                    Some((_, _, c)) => c.clone(),
                    None => under(reference, SCAFFOLD_C_GLOBAL)?,
                };
                let c_res = under(result, SCAFFOLD_C_DIFF)?;
                if c_res.tensors().is_empty() {
                    return Err(AggregateError::Model(ModelError::Incompatible {
                        name: format!("{SCAFFOLD_C_DIFF}*"),
                        reason: "a SCAFFOLD result carries its control change; does the learner implement SCAFFOLD?".into(),
                    }));
                }
                let renamed = |e: ModelError| match e {
                    ModelError::Incompatible { name, reason } => ModelError::Incompatible {
                        name: format!("{SCAFFOLD_C_DIFF}{name}"),
                        reason,
                    },
                    e => e,
                };
                check_layout(&c_ref.tensors(), &c_res.tensors()).map_err(renamed)?;
                let finite = c_res.for_each_chunk(|_, info, _, bytes| {
                    let all = info.dtype != DType::F32
                        || bytes
                            .chunks_exact(4)
                            .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite());
                    if all {
                        Ok(())
                    } else {
                        Err(AggregateError::NonFinite(format!(
                            "{SCAFFOLD_C_DIFF}{}",
                            info.name
                        )))
                    }
                });
                finite?;
                Some((c_ref, c_res))
            }
        };
        match &mut self.combine {
            Combine::Mean(f) => match &mut self.dp {
                Some(dp) => dp.add(f, reference, &ref_w, &res_w, weight)?,
                None => f.add_ref(&ref_w, &res_w, weight)?,
            },
            Combine::Kept { check, kept, .. } => {
                if partial_weight(result).is_some() {
                    return Err(AggregateError::PartialToRobust);
                }
                let model = res_w
                    .load()
                    .map_err(|e| AggregateError::Poisoned(e.to_string()))?;
                check.add_ref(&ref_w, &res_w, weight)?;
                kept.push((model, weight));
            }
        }
        if let (Some(acc), Some((c_ref, c_res))) = (&mut self.controls, controls) {
            acc.add_ref(&c_ref, &c_res, weight)?;
        }
        Ok(())
    }
}

/// The tensors of the kept results, as f64 rows (one per result).
fn rows(kept: &[(Arc<FLModel>, f64)], name: &str) -> Result<Vec<Vec<f64>>, AggregateError> {
    kept.iter()
        .map(|(m, _)| {
            let t = m.params.get(name).ok_or_else(|| ModelError::Incompatible {
                name: name.to_string(),
                reason: "not in the results".into(),
            })?;
            let mut v = Vec::with_capacity(t.numel());
            t.for_each_f64(|_, x| v.push(x));
            Ok(v)
        })
        .collect()
}

/// The robust combination of the kept results: full weights (a diff is added to `global`).
fn combine(
    rule: Rule,
    kept: &[(Arc<FLModel>, f64)],
    global: &ModelRef,
) -> Result<FLModel, AggregateError> {
    let n = kept.len();
    let base = global
        .load()
        .map_err(|e| AggregateError::Poisoned(e.to_string()))?;
    let diff = kept[0].0.params_type == ParamsType::Diff;
    // Krum-like rules pick results from distances over the whole model first.
    let picked: Option<Vec<usize>> = match rule {
        Rule::Krum { malicious, .. } | Rule::Bulyan { malicious } => {
            let mut d = vec![vec![0.0f64; n]; n];
            for name in base.params.keys() {
                let r = rows(kept, name)?;
                for i in 0..n {
                    for j in i + 1..n {
                        let s: f64 = r[i].iter().zip(&r[j]).map(|(a, b)| (a - b) * (a - b)).sum();
                        d[i][j] += s;
                        d[j][i] += s;
                    }
                }
            }
            Some(match rule {
                Rule::Krum { keep, .. } => {
                    if keep == 0 || keep > n {
                        return Err(RobustError::KeepsTooMany { n, keep }.into());
                    }
                    let all: Vec<usize> = (0..n).collect();
                    robust::krum_select(&d, &all, malicious, keep)
                }
                _ => robust::bulyan_select(&d, malicious)?,
            })
        }
        _ => None,
    };
    let cut = match rule {
        Rule::TrimmedMean { beta } => robust::trim_count(n, beta)?,
        _ => 0,
    };
    let mut params = BTreeMap::new();
    for (name, like) in &base.params {
        let r = rows(kept, name)?;
        let len = like.numel();
        if let Some(bad) = r.iter().find(|row| row.len() != len) {
            return Err(ModelError::Incompatible {
                name: name.clone(),
                reason: format!(
                    "{} values in a result, {len} in the global model",
                    bad.len()
                ),
            }
            .into());
        }
        let mut col = Vec::with_capacity(n);
        let mut values = Vec::with_capacity(len);
        for k in 0..len {
            let v = match (&rule, &picked) {
                (Rule::Krum { .. }, Some(p)) => {
                    let w: f64 = p.iter().map(|&i| kept[i].1).sum();
                    p.iter().map(|&i| kept[i].1 * r[i][k]).sum::<f64>() / w
                }
                (Rule::Bulyan { malicious }, Some(p)) => {
                    col.clear();
                    col.extend(p.iter().map(|&i| r[i][k]));
                    robust::mean_closest_to_median(&mut col, p.len() - 2 * malicious)
                }
                (Rule::TrimmedMean { .. }, _) => {
                    col.clear();
                    col.extend(r.iter().map(|row| row[k]));
                    robust::trimmed_mean(&mut col, cut)
                }
                _ => {
                    col.clear();
                    col.extend(r.iter().map(|row| row[k]));
                    robust::median(&mut col)
                }
            };
            values.push(v);
        }
        if diff {
            like.for_each_f64(|k, x| values[k] += x);
        }
        params.insert(
            name.clone(),
            Tensor::from_f64_like(like, values.into_iter()),
        );
    }
    Ok(FLModel {
        params,
        params_type: ParamsType::Full,
        ..FLModel::default()
    })
}

/// Moves `combined` from the aggregate to the optimizer's step from `global`, in place.
fn optimize(
    opt: ServerOpt,
    state: &mut OptState,
    global: &ModelRef,
    combined: &mut FLModel,
) -> Result<(), AggregateError> {
    let step = opt.step(state);
    global.for_each_chunk(|_, info, at, bytes| -> Result<(), AggregateError> {
        if info.dtype != DType::F32 {
            return Ok(());
        }
        let Some(t) = combined.params.get_mut(&info.name) else {
            return Ok(());
        };
        let numel = t.numel();
        let m = state
            .m
            .entry(info.name.clone())
            .or_insert_with(|| vec![0.0; numel]);
        // SGD keeps one buffer; the adaptive rules two.
        let mut v = if matches!(opt, ServerOpt::Sgd { .. }) {
            None
        } else {
            Some(
                state
                    .v
                    .entry(info.name.clone())
                    .or_insert_with(|| vec![0.0; numel]),
            )
        };
        let mut scratch = 0.0f32;
        let first = at / 4;
        let Some(dst) = t.bytes_mut().get_mut(at..at + bytes.len()) else {
            return Ok(());
        };
        for (k, (a, w)) in dst
            .chunks_exact_mut(4)
            .zip(bytes.chunks_exact(4))
            .enumerate()
        {
            let vk = match v.as_deref_mut() {
                Some(v) => v.get_mut(first + k),
                None => Some(&mut scratch),
            };
            let (Some(mk), Some(vk)) = (m.get_mut(first + k), vk) else {
                continue;
            };
            let wf = f32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            let af = f32::from_le_bytes([a[0], a[1], a[2], a[3]]);
            a.copy_from_slice(&step.apply(wf, af, mk, vk).to_le_bytes());
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests;
