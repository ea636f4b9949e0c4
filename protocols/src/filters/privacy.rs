//! Privacy filters for what a site sends: FLARE's [`ExcludeVars`], [`PercentilePrivacy`] and
//! [`SvtPrivacy`] (`nvflare.app_common.filters`: `exclude_vars.py`, `percentile_privacy.py`,
//! `svt_privacy.py`) and Flower's local differential privacy, [`LocalDp`]
//! (`flwr.client.mod.LocalDpMod`), with their argument names, defaults and formulas.
//!
//! # What each does
//!
//! - [`ExcludeVars`] drops tensors by exact name or by a regular expression found anywhere in
//!   the name (Python's `re.search`, so `"bias"` excludes `fc.bias`). The aggregator then
//!   averages each tensor over the results that carry it ([`crate::aggregate::FedAvg`]).
//! - [`PercentilePrivacy`] (Shokri & Shmatikov, CCS '15): with `Δ` the diff divided by the
//!   step count, the `percentile`-th percentile of `|Δ|` over every float element is the
//!   cutoff; entries with `|Δ| < cutoff` become 0, the rest are clipped to `±gamma`, and the
//!   step count is multiplied back. Scalars (shape `[]`) pass unchanged.
//! - [`SvtPrivacy`], the sparse vector technique: `c = ceil(fraction · P)` entries of the
//!   `P` float elements are released. The threshold is `tau + Lap(gamma / ε_threshold)`; in
//!   passes over the entries not yet accepted, an entry is accepted when
//!   `|clip(Δ, ±gamma)| + Lap(2·gamma·c / ε_query) ≥ threshold`, until at least `c` are; then
//!   `c` of the accepted are drawn (with replacement unless `replace` is false), each released
//!   as `(clip(Δ, ±gamma) + Lap(2·gamma·c / ε_release)) · steps`, and every other entry is 0.
//!   Without explicit budgets `ε_threshold = ε / (1 + (2c)^(2/3))`, `ε_query = ε −
//!   ε_threshold` (one given: the other is the rest of `epsilon`) and `ε_release = c ·
//!   noise_var`. Each call writes its budget and the filter's running total to the model's
//!   metadata (see below).
//! - [`LocalDp`] (Flower's `LocalDpMod(clipping_norm, sensitivity, epsilon, delta)`): the
//!   whole diff is scaled to an L2 norm of at most `clipping_norm` (one flat norm over every
//!   float element), then Gaussian noise of standard deviation
//!   `sensitivity · sqrt(2 ln(1.25/δ)) / ε` is added to every float element. Flower clips the
//!   update and adds the noise to the weights; on a diff that is the same thing.
//!
//! # Which models
//!
//! The step count is the model's [`META_NUM_STEPS`] (FLARE's `NUM_STEPS_CURRENT_ROUND`), 1
//! when absent; anything but a positive number is refused. [`ExcludeVars`] filters full
//! weights and diffs alike (FLARE's default `data_kinds`), or one kind
//! ([`ExcludeVars::only`]). The other three filter diffs only: a [`ParamsType::Full`] model
//! passes unchanged, as FLARE passes a data kind it does not filter, and
//! [`Filter::diff_only`] says so, so that a node can tell a site whose learner sends full
//! weights. (FLARE's PercentilePrivacy and SVTPrivacy filter `WEIGHTS` too by default; their
//! truncation to `±gamma` destroys full weights, so Flare does not.)
//!
//! Integer tensors (batch-norm counters) pass untouched and take no part in a percentile, a
//! norm or an SVT count. A NaN or infinity in a float tensor is an error naming the filter
//! and the tensor. Results keep each tensor's dtype.
//!
//! # Randomness
//!
//! `protocols` draws no OS randomness: [`SvtPrivacy`] and [`LocalDp`] are built with a
//! 32-byte seed and draw from a ChaCha20 stream kept inside the filter, so successive calls
//! draw fresh noise and the same seed gives the same outputs. Laplace noise is sampled by
//! inversion from 53-bit uniforms, Gaussian noise by Box–Muller. The seed decides the noise:
//! whoever knows it can remove the noise, so it must come from a secure source and stay on
//! the site (the node draws it from the OS when it builds the filter).
//!
//! # SVT metadata
//!
//! FLARE writes two dicts to the DXO meta; Flare's meta holds scalars, so their fields
//! become dotted keys: `svt_privacy_budget.<field>` for this call (`epsilon_total`,
//! `epsilon_threshold`, `epsilon_query`, `epsilon_release`, `n_upload`, `acceptance_passes`,
//! `delta` = 0, `accountant` = `"pure_dp_sum"`, `scope` = `"filter-level"`, `round` when the
//! model knows it, `has_scalar_passthrough`, `note`) and `svt_privacy_accountant.<field>` for
//! the filter's total since it was built (`epsilon_total`, `calls`, `delta`, `accountant`,
//! `scope`, `latest_round`, `note`). Keys of an earlier call are replaced. Integer tensors
//! count as pass-through like scalars (they carry no noise either).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use regex::Regex;

use super::{Filter, FilterError};
use crate::model::{DType, FLModel, META_NUM_STEPS, MetaValue, ParamsType, Tensor};

const EXCLUDE_VARS: &str = "ExcludeVars";
const PERCENTILE: &str = "PercentilePrivacy";
const SVT: &str = "SVTPrivacy";
const LOCAL_DP: &str = "LocalDpMod";

/// Prefix of the metadata keys of one SVT call's privacy budget (FLARE's
/// `svt_privacy_budget` dict): `svt_privacy_budget.epsilon_total` and so on.
pub const META_SVT_BUDGET: &str = "svt_privacy_budget";
/// Prefix of the metadata keys of an SVT filter's cumulative accountant (FLARE's
/// `svt_privacy_accountant` dict).
pub const META_SVT_ACCOUNTANT: &str = "svt_privacy_accountant";
/// The most acceptance passes [`SvtPrivacy`] makes before it gives up: FLARE loops until
/// enough entries are accepted, which with a `tau` far above the query noise is forever.
pub const MAX_SVT_PASSES: u32 = 1000;
/// The largest compiled [`ExcludeVars`] pattern, in bytes (the `regex` crate's size limit).
const MAX_PATTERN_SIZE: usize = 1 << 20;

fn bad_arg(filter: &'static str, arg: &'static str, reason: impl Into<String>) -> FilterError {
    FilterError::BadArgument {
        filter,
        arg,
        reason: reason.into(),
    }
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16)
}

/// Refuses a model with a NaN or infinity in a float tensor, naming the first.
fn check_finite(filter: &'static str, model: &FLModel) -> Result<(), FilterError> {
    for (name, t) in &model.params {
        if !is_float(t.dtype()) {
            continue;
        }
        let mut bad = None;
        t.for_each_f64(|i, v| {
            if bad.is_none() && !v.is_finite() {
                bad = Some(i);
            }
        });
        if let Some(index) = bad {
            return Err(FilterError::NonFinite {
                filter,
                tensor: name.clone(),
                index,
            });
        }
    }
    Ok(())
}

/// The step count a diff is divided by: [`META_NUM_STEPS`], 1 when absent.
fn steps(filter: &'static str, model: &FLModel) -> Result<f64, FilterError> {
    let bad = |reason: String| FilterError::BadMeta {
        filter,
        key: META_NUM_STEPS.into(),
        reason,
    };
    let s = match model.meta.get(META_NUM_STEPS) {
        None => return Ok(1.0),
        Some(MetaValue::Int(n)) => *n as f64,
        Some(MetaValue::Float(f)) => *f,
        Some(other) => return Err(bad(format!("not a number: {other:?}"))),
    };
    if s.is_finite() && s > 0.0 {
        Ok(s)
    } else {
        Err(bad(format!("{s} is not a positive step count")))
    }
}

/// Which tensors [`ExcludeVars`] drops.
#[derive(Debug, Clone)]
pub enum Exclude {
    /// FLARE's `exclude_vars=None` or `""`: nothing.
    Nothing,
    /// A list of names: tensors named exactly so.
    Names(BTreeSet<String>),
    /// A string: tensors whose name the pattern matches anywhere (`re.search`).
    Pattern(Regex),
}

impl PartialEq for Exclude {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Exclude::Nothing, Exclude::Nothing) => true,
            (Exclude::Names(a), Exclude::Names(b)) => a == b,
            (Exclude::Pattern(a), Exclude::Pattern(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

/// Drops tensors from a model (FLARE's `ExcludeVars(exclude_vars=None)`); see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct ExcludeVars {
    exclude: Exclude,
    /// `None`: full weights and diffs (FLARE's default `data_kinds`); else that kind only.
    only: Option<ParamsType>,
}

impl ExcludeVars {
    /// Excludes nothing (FLARE's default).
    pub fn nothing() -> Self {
        ExcludeVars {
            exclude: Exclude::Nothing,
            only: None,
        }
    }

    /// Excludes the tensors named exactly `names`; names the model lacks are ignored.
    pub fn names<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExcludeVars {
            exclude: Exclude::Names(names.into_iter().map(Into::into).collect()),
            only: None,
        }
    }

    /// Excludes the tensors whose name `pattern` matches anywhere, as Python's `re.search`
    /// (anchor it with `^…$` for whole names). An empty pattern excludes nothing, as in FLARE.
    /// The syntax is the `regex` crate's: Python's look-arounds and back-references are
    /// refused, naming `exclude_vars`.
    pub fn pattern(pattern: &str) -> Result<Self, FilterError> {
        if pattern.is_empty() {
            return Ok(ExcludeVars::nothing());
        }
        let re = regex::RegexBuilder::new(pattern)
            .size_limit(MAX_PATTERN_SIZE)
            .build()
            .map_err(|e| bad_arg(EXCLUDE_VARS, "exclude_vars", e.to_string()))?;
        Ok(ExcludeVars {
            exclude: Exclude::Pattern(re),
            only: None,
        })
    }

    /// The same filter, applied to models of `kind` only (FLARE's `data_kinds` of one kind);
    /// others pass unchanged.
    pub fn only(self, kind: ParamsType) -> Self {
        ExcludeVars {
            only: Some(kind),
            ..self
        }
    }

    /// What is excluded.
    pub fn exclude(&self) -> &Exclude {
        &self.exclude
    }

    /// Whether tensor `name` is dropped.
    pub fn excludes(&self, name: &str) -> bool {
        match &self.exclude {
            Exclude::Nothing => false,
            Exclude::Names(names) => names.contains(name),
            Exclude::Pattern(re) => re.is_match(name),
        }
    }
}

impl Default for ExcludeVars {
    fn default() -> Self {
        ExcludeVars::nothing()
    }
}

impl Filter for ExcludeVars {
    fn name(&self) -> &'static str {
        EXCLUDE_VARS
    }

    fn apply(&self, mut model: FLModel) -> Result<FLModel, FilterError> {
        if self.only.is_some_and(|k| k != model.params_type) {
            return Ok(model);
        }
        model.params.retain(|name, _| !self.excludes(name));
        Ok(model)
    }
}

/// Shares only the largest entries of a diff, clipped (FLARE's
/// `PercentilePrivacy(percentile=10, gamma=0.01)`); see the module docs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PercentilePrivacy {
    percentile: f64,
    gamma: f64,
}

impl PercentilePrivacy {
    /// FLARE's default percentile.
    pub const DEFAULT_PERCENTILE: f64 = 10.0;
    /// FLARE's default gamma.
    pub const DEFAULT_GAMMA: f64 = 0.01;

    /// Entries of `|Δ|` below the `percentile`-th percentile (in `[0, 100]`) become 0; the
    /// rest are clipped to `±gamma` (positive). Out of range is an error naming the argument
    /// (FLARE passes the model through unfiltered instead).
    pub fn new(percentile: f64, gamma: f64) -> Result<Self, FilterError> {
        if !(0.0..=100.0).contains(&percentile) {
            return Err(bad_arg(
                PERCENTILE,
                "percentile",
                format!("{percentile} is not in [0, 100]"),
            ));
        }
        if !(gamma.is_finite() && gamma > 0.0) {
            return Err(bad_arg(
                PERCENTILE,
                "gamma",
                format!("{gamma} is not a positive number"),
            ));
        }
        Ok(PercentilePrivacy { percentile, gamma })
    }

    /// The percentile, in `[0, 100]`.
    pub fn percentile(&self) -> f64 {
        self.percentile
    }

    /// The clipping bound.
    pub fn gamma(&self) -> f64 {
        self.gamma
    }
}

impl Default for PercentilePrivacy {
    fn default() -> Self {
        PercentilePrivacy {
            percentile: Self::DEFAULT_PERCENTILE,
            gamma: Self::DEFAULT_GAMMA,
        }
    }
}

/// numpy's `percentile(values, q)` with its default linear interpolation, in f32 as numpy
/// computes it for an f32 array. Reorders `values`, which must not be empty.
fn percentile_linear(values: &mut [f32], q: f64) -> f32 {
    let n = values.len();
    let h = (n - 1) as f64 * q / 100.0;
    let lo = (h.floor() as usize).min(n - 1);
    let t = (h - lo as f64) as f32;
    let (_, a, rest) = values.select_nth_unstable_by(lo, f32::total_cmp);
    let a = *a;
    let b = rest.iter().copied().reduce(f32::min).unwrap_or(a);
    let diff = b - a;
    // numpy's _lerp: from the nearer end, so that t = 1 gives b exactly.
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

impl Filter for PercentilePrivacy {
    fn name(&self) -> &'static str {
        PERCENTILE
    }

    fn diff_only(&self) -> bool {
        true
    }

    fn apply(&self, mut model: FLModel) -> Result<FLModel, FilterError> {
        if model.params_type != ParamsType::Diff {
            return Ok(model);
        }
        // numpy divides an f32 array by the step count in f32, and so does this.
        let steps = steps(PERCENTILE, &model)? as f32;
        check_finite(PERCENTILE, &model)?;
        let floats = || model.params.values().filter(|t| is_float(t.dtype()));
        let mut all = Vec::with_capacity(floats().map(Tensor::numel).sum());
        for t in floats() {
            all.extend(t.to_f32_vec().into_iter().map(|x| (x / steps).abs()));
        }
        if all.is_empty() {
            return Ok(model);
        }
        let cutoff = percentile_linear(&mut all, self.percentile);
        drop(all);
        let gamma = self.gamma as f32;
        let mut out = BTreeMap::new();
        for (name, t) in std::mem::take(&mut model.params) {
            if !is_float(t.dtype()) || t.shape().is_empty() {
                out.insert(name, t);
                continue;
            }
            let values = t.to_f32_vec().into_iter().map(|x| {
                let d = x / steps;
                let kept = if d > -cutoff && d < cutoff {
                    0.0
                } else {
                    d.clamp(-gamma, gamma)
                };
                f64::from(kept * steps)
            });
            let filtered = Tensor::from_f64_like(&t, values);
            out.insert(name, filtered);
        }
        model.params = out;
        Ok(model)
    }
}

/// [`SvtPrivacy`]'s arguments, with FLARE's names and defaults
/// (`SVTPrivacy(fraction=0.1, epsilon=0.1, noise_var=0.1, gamma=1e-5, tau=1e-6,
/// replace=True, epsilon_threshold=None, epsilon_query=None, epsilon_release=None)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SvtArgs {
    /// Share of the float entries released, in `(0, 1]`.
    pub fraction: f64,
    /// Budget of the selection (threshold and queries).
    pub epsilon: f64,
    /// Release budget per released entry when `epsilon_release` is not given.
    pub noise_var: f64,
    /// Clipping bound of `Δ`, and the sensitivity of every noise scale.
    pub gamma: f64,
    /// Base of the noisy threshold.
    pub tau: f64,
    /// Whether the released entries are drawn from the accepted ones with replacement
    /// (then fewer than `c` distinct entries may be released).
    pub replace: bool,
    /// Budget of the threshold noise; when absent, the standard split (or the rest of
    /// `epsilon` after `epsilon_query`).
    pub epsilon_threshold: Option<f64>,
    /// Budget of the query noise; when absent, the rest of `epsilon`.
    pub epsilon_query: Option<f64>,
    /// Total budget of the release noise; when absent, `c · noise_var`.
    pub epsilon_release: Option<f64>,
}

impl Default for SvtArgs {
    fn default() -> Self {
        SvtArgs {
            fraction: 0.1,
            epsilon: 0.1,
            noise_var: 0.1,
            gamma: 1e-5,
            tau: 1e-6,
            replace: true,
            epsilon_threshold: None,
            epsilon_query: None,
            epsilon_release: None,
        }
    }
}

/// numpy's `isclose(a, b)`.
fn isclose(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-8 + 1e-5 * b.abs()
}

impl SvtArgs {
    /// Checks every argument, naming the first that is out of range. FLARE checks the
    /// budgets when the filter first runs; Flare when it is built.
    pub fn check(&self) -> Result<(), FilterError> {
        let positive = |arg: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad_arg(SVT, arg, format!("{v} is not a positive number")))
            }
        };
        if !(self.fraction.is_finite() && self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(bad_arg(
                SVT,
                "fraction",
                format!("{} is not in (0, 1]", self.fraction),
            ));
        }
        positive("epsilon", self.epsilon)?;
        positive("gamma", self.gamma)?;
        if !self.tau.is_finite() {
            return Err(bad_arg(SVT, "tau", format!("{} is not finite", self.tau)));
        }
        if let Some(e) = self.epsilon_threshold {
            positive("epsilon_threshold", e)?;
        }
        if let Some(e) = self.epsilon_query {
            positive("epsilon_query", e)?;
        }
        match (self.epsilon_threshold, self.epsilon_query) {
            (Some(t), Some(q)) if !isclose(t + q, self.epsilon) => {
                return Err(bad_arg(
                    SVT,
                    "epsilon_query",
                    format!(
                        "epsilon_threshold + epsilon_query = {} must equal epsilon ({})",
                        t + q,
                        self.epsilon
                    ),
                ));
            }
            (Some(e), None) | (None, Some(e)) if e >= self.epsilon => {
                let arg = if self.epsilon_threshold.is_some() {
                    "epsilon_threshold"
                } else {
                    "epsilon_query"
                };
                return Err(bad_arg(
                    SVT,
                    arg,
                    format!(
                        "{e} leaves nothing of epsilon ({}) for the other phase",
                        self.epsilon
                    ),
                ));
            }
            _ => {}
        }
        match self.epsilon_release {
            Some(e) => positive("epsilon_release", e),
            None => {
                if self.noise_var.is_finite() && self.noise_var > 0.0 {
                    Ok(())
                } else {
                    Err(bad_arg(
                        SVT,
                        "noise_var",
                        format!(
                            "{} must be positive when epsilon_release is not given",
                            self.noise_var
                        ),
                    ))
                }
            }
        }
    }

    /// The number of entries released of `total`: `min(ceil(total · fraction), total)`.
    pub fn n_upload(&self, total: usize) -> usize {
        ((total as f64 * self.fraction).ceil() as usize).clamp(1, total.max(1))
    }

    /// `(ε_threshold, ε_query)` for `n_upload` released entries.
    pub fn epsilon_split(&self, n_upload: usize) -> (f64, f64) {
        match (self.epsilon_threshold, self.epsilon_query) {
            (Some(t), Some(q)) => (t, q),
            (Some(t), None) => (t, self.epsilon - t),
            (None, Some(q)) => (self.epsilon - q, q),
            (None, None) => {
                // The standard split for non-monotonic queries, 1 : (2c)^(2/3).
                let ratio = (2.0 * n_upload as f64).powf(2.0 / 3.0);
                let t = self.epsilon / (1.0 + ratio);
                (t, self.epsilon - t)
            }
        }
    }

    /// The release budget for `n_upload` released entries.
    pub fn epsilon_release(&self, n_upload: usize) -> f64 {
        self.epsilon_release
            .unwrap_or(n_upload as f64 * self.noise_var)
    }
}

/// The noise stream and the privacy ledger of one [`SvtPrivacy`].
struct SvtState {
    rng: ChaCha20Rng,
    /// Cumulative ε over the calls that released something.
    spent: f64,
    calls: u64,
}

/// The sparse vector technique on a diff (FLARE's `SVTPrivacy`); see the module docs.
///
/// Two filters are equal when their arguments are: their noise streams and ledgers are not
/// compared.
pub struct SvtPrivacy {
    args: SvtArgs,
    state: Mutex<SvtState>,
}

impl std::fmt::Debug for SvtPrivacy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The noise stream stays out of logs: its state undoes the noise.
        f.debug_struct("SvtPrivacy")
            .field("args", &self.args)
            .finish_non_exhaustive()
    }
}

impl PartialEq for SvtPrivacy {
    fn eq(&self, other: &Self) -> bool {
        self.args == other.args
    }
}

/// Locks `m`, taking the state as it is if a panic poisoned it (noise streams and ledgers
/// stay usable: nothing half-written in them breaks an invariant).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One sample of Laplace(0, `b`), by inversion.
fn laplace(rng: &mut ChaCha20Rng, b: f64) -> f64 {
    let bits = rng.next_u64();
    // The top 53 bits give u in (0, 1], the lowest bit the sign.
    let u = ((bits >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let e = -u.ln();
    if bits & 1 == 0 { b * e } else { -b * e }
}

/// Standard normal samples by Box–Muller, two per pair of uniforms.
#[derive(Default)]
struct Gauss {
    spare: Option<f64>,
}

impl Gauss {
    fn sample(&mut self, rng: &mut ChaCha20Rng) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let scale = 1.0 / (1u64 << 53) as f64;
        let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) * scale;
        let u2 = (rng.next_u64() >> 11) as f64 * scale;
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

/// A fixed-size set of entry indices.
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
    }
    fn set(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
}

/// What one SVT call spent, for the metadata.
struct SvtCall {
    epsilon_threshold: f64,
    epsilon_query: f64,
    epsilon_release: f64,
    n_upload: usize,
    passes: u32,
    passthrough: bool,
    round: Option<u32>,
}

impl SvtPrivacy {
    /// An SVT filter with `args`, drawing its noise from ChaCha20 seeded with `seed`.
    pub fn with_seed(args: SvtArgs, seed: [u8; 32]) -> Result<Self, FilterError> {
        args.check()?;
        Ok(SvtPrivacy {
            args,
            state: Mutex::new(SvtState {
                rng: ChaCha20Rng::from_seed(seed),
                spent: 0.0,
                calls: 0,
            }),
        })
    }

    /// The arguments.
    pub fn args(&self) -> &SvtArgs {
        &self.args
    }

    /// The ε spent so far (pure composition: the sum over calls) and the number of calls
    /// that spent it (FLARE's `get_privacy_spent` and the ledger's length).
    pub fn privacy_spent(&self) -> (f64, u64) {
        let st = lock(&self.state);
        (st.spent, st.calls)
    }

    /// Writes the call's budget and the running total to `model.meta`, replacing any keys
    /// of an earlier call.
    fn record(model: &mut FLModel, call: &SvtCall, spent: f64, calls: u64) {
        let budget = format!("{META_SVT_BUDGET}.");
        let accountant = format!("{META_SVT_ACCOUNTANT}.");
        model
            .meta
            .retain(|k, _| !k.starts_with(&budget) && !k.starts_with(&accountant));
        let int = |n: u64| MetaValue::Int(i64::try_from(n).unwrap_or(i64::MAX));
        let total = call.epsilon_threshold + call.epsilon_query + call.epsilon_release;
        let mut put = |prefix: &str, field: &str, v: MetaValue| {
            model.meta.insert(format!("{prefix}{field}"), v);
        };
        for prefix in [&budget, &accountant] {
            put(prefix, "accountant", MetaValue::Text("pure_dp_sum".into()));
            put(prefix, "scope", MetaValue::Text("filter-level".into()));
            put(prefix, "delta", MetaValue::Float(0.0));
        }
        put(&budget, "epsilon_total", MetaValue::Float(total));
        put(
            &budget,
            "epsilon_threshold",
            MetaValue::Float(call.epsilon_threshold),
        );
        put(
            &budget,
            "epsilon_query",
            MetaValue::Float(call.epsilon_query),
        );
        put(
            &budget,
            "epsilon_release",
            MetaValue::Float(call.epsilon_release),
        );
        put(&budget, "n_upload", int(call.n_upload as u64));
        put(&budget, "acceptance_passes", int(u64::from(call.passes)));
        put(
            &budget,
            "has_scalar_passthrough",
            MetaValue::Bool(call.passthrough),
        );
        put(&accountant, "epsilon_total", MetaValue::Float(spent));
        put(&accountant, "calls", int(calls));
        if let Some(r) = call.round {
            put(&budget, "round", int(u64::from(r)));
            put(&accountant, "latest_round", int(u64::from(r)));
        }
        if call.passthrough {
            put(
                &budget,
                "note",
                MetaValue::Text(
                    "scalar passthrough is not noise-protected by the SVT accountant.".into(),
                ),
            );
            put(
                &accountant,
                "note",
                MetaValue::Text(
                    "scalar passthrough is not included in the SVT accountant guarantee.".into(),
                ),
            );
        }
    }
}

impl Filter for SvtPrivacy {
    fn name(&self) -> &'static str {
        SVT
    }

    fn diff_only(&self) -> bool {
        true
    }

    fn apply(&self, mut model: FLModel) -> Result<FLModel, FilterError> {
        if model.params_type != ParamsType::Diff {
            return Ok(model);
        }
        let steps = steps(SVT, &model)?;
        check_finite(SVT, &model)?;
        let a = &self.args;
        let gamma = a.gamma;
        // The entries are the float elements of the tensors in name order, flattened.
        let total: usize = model
            .params
            .values()
            .filter(|t| is_float(t.dtype()))
            .map(Tensor::numel)
            .sum();
        if total == 0 {
            return Ok(model);
        }
        let c = a.n_upload(total);
        let (e_thr, e_query) = a.epsilon_split(c);
        let e_release = a.epsilon_release(c);
        let query_scale = gamma * 2.0 * c as f64 / e_query;
        let release_scale = gamma * 2.0 * c as f64 / e_release;

        let mut st = lock(&self.state);
        let rng = &mut st.rng;
        let threshold = a.tau + laplace(rng, gamma / e_thr);
        let mut accepted = Bits::new(total);
        let mut n_accepted = 0usize;
        let mut passes = 0u32;
        while n_accepted < c {
            if passes == MAX_SVT_PASSES {
                return Err(FilterError::Config {
                    filter: SVT,
                    reason: format!(
                        "{n_accepted} of {c} entries accepted after {MAX_SVT_PASSES} passes: \
                         tau ({}) is too high for the query noise",
                        a.tau
                    ),
                });
            }
            passes += 1;
            let mut base = 0;
            for t in model.params.values().filter(|t| is_float(t.dtype())) {
                t.for_each_f64(|i, x| {
                    let k = base + i;
                    if accepted.get(k) {
                        return;
                    }
                    let response = (x / steps).clamp(-gamma, gamma).abs();
                    if response + laplace(rng, query_scale) >= threshold {
                        accepted.set(k);
                        n_accepted += 1;
                    }
                });
                base += t.numel();
            }
        }

        // c of the accepted entries, uniformly, with or without replacement: the ranks
        // (among the accepted, in order) of those released.
        let mut released = Bits::new(total);
        if a.replace {
            let mut ranks: Vec<usize> = (0..c).map(|_| rng.random_range(0..n_accepted)).collect();
            ranks.sort_unstable();
            ranks.dedup();
            let mut next = ranks.into_iter().peekable();
            for (rank, k) in (0..total).filter(|&k| accepted.get(k)).enumerate() {
                if next.peek() == Some(&rank) {
                    released.set(k);
                    next.next();
                }
            }
        } else {
            // Selection sampling: each accepted entry in turn, with probability
            // (still needed) / (still to see).
            let (mut needed, mut left) = (c, n_accepted);
            for k in (0..total).filter(|&k| accepted.get(k)) {
                if rng.random_range(0..left) < needed {
                    released.set(k);
                    needed -= 1;
                }
                left -= 1;
            }
        }

        let mut passthrough = false;
        let mut base = 0;
        let mut out = BTreeMap::new();
        for (name, t) in std::mem::take(&mut model.params) {
            if !is_float(t.dtype()) {
                passthrough = true;
                out.insert(name, t);
                continue;
            }
            let n = t.numel();
            if t.shape().is_empty() {
                // FLARE counts a scalar as an entry but sends it as it is.
                passthrough = true;
                out.insert(name, t);
                base += n;
                continue;
            }
            let mut values = Vec::with_capacity(n);
            t.for_each_f64(|i, x| {
                values.push(if released.get(base + i) {
                    ((x / steps).clamp(-gamma, gamma) + laplace(rng, release_scale)) * steps
                } else {
                    0.0
                });
            });
            let filtered = Tensor::from_f64_like(&t, values.into_iter());
            out.insert(name, filtered);
            base += n;
        }
        model.params = out;

        st.spent += e_thr + e_query + e_release;
        st.calls += 1;
        let call = SvtCall {
            epsilon_threshold: e_thr,
            epsilon_query: e_query,
            epsilon_release: e_release,
            n_upload: c,
            passes,
            passthrough,
            round: model.current_round,
        };
        SvtPrivacy::record(&mut model, &call, st.spent, st.calls);
        Ok(model)
    }
}

/// [`LocalDp`]'s arguments, with Flower's names (`LocalDpMod(clipping_norm, sensitivity,
/// epsilon, delta)`, all required).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalDpArgs {
    /// The L2 norm the whole diff is scaled down to when it is longer.
    pub clipping_norm: f64,
    /// The sensitivity of the Gaussian mechanism (0: no noise).
    pub sensitivity: f64,
    /// The privacy budget ε.
    pub epsilon: f64,
    /// The failure probability δ, in `(0, 1)`.
    pub delta: f64,
}

impl LocalDpArgs {
    /// Checks every argument, naming the first out of range. Flower accepts ε = 0 and δ = 0,
    /// whose noise is infinite; Flare refuses them, and δ ≥ 1.
    pub fn check(&self) -> Result<(), FilterError> {
        let finite = |arg: &'static str, v: f64, positive: bool| {
            if v.is_finite() && (v > 0.0 || !positive && v == 0.0) {
                Ok(())
            } else {
                let what = if positive { "positive" } else { "non-negative" };
                Err(bad_arg(
                    LOCAL_DP,
                    arg,
                    format!("{v} is not a {what} number"),
                ))
            }
        };
        finite("clipping_norm", self.clipping_norm, true)?;
        finite("sensitivity", self.sensitivity, false)?;
        finite("epsilon", self.epsilon, true)?;
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(bad_arg(
                LOCAL_DP,
                "delta",
                format!("{} is not in (0, 1)", self.delta),
            ));
        }
        Ok(())
    }

    /// The noise's standard deviation, `sensitivity · sqrt(2 ln(1.25/δ)) / ε`.
    pub fn noise_std(&self) -> f64 {
        self.sensitivity * (2.0 * (1.25 / self.delta).ln()).sqrt() / self.epsilon
    }
}

/// Local differential privacy on a diff: clip, then add Gaussian noise (Flower's
/// `LocalDpMod`); see the module docs.
///
/// Two filters are equal when their arguments are: their noise streams are not compared.
pub struct LocalDp {
    args: LocalDpArgs,
    rng: Mutex<ChaCha20Rng>,
}

impl std::fmt::Debug for LocalDp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDp")
            .field("args", &self.args)
            .finish_non_exhaustive()
    }
}

impl PartialEq for LocalDp {
    fn eq(&self, other: &Self) -> bool {
        self.args == other.args
    }
}

impl LocalDp {
    /// A local DP filter with `args`, drawing its noise from ChaCha20 seeded with `seed`.
    pub fn with_seed(args: LocalDpArgs, seed: [u8; 32]) -> Result<Self, FilterError> {
        args.check()?;
        Ok(LocalDp {
            args,
            rng: Mutex::new(ChaCha20Rng::from_seed(seed)),
        })
    }

    /// The arguments.
    pub fn args(&self) -> &LocalDpArgs {
        &self.args
    }
}

impl Filter for LocalDp {
    fn name(&self) -> &'static str {
        LOCAL_DP
    }

    fn diff_only(&self) -> bool {
        true
    }

    fn apply(&self, mut model: FLModel) -> Result<FLModel, FilterError> {
        if model.params_type != ParamsType::Diff {
            return Ok(model);
        }
        check_finite(LOCAL_DP, &model)?;
        let mut squares = 0.0f64;
        for t in model.params.values().filter(|t| is_float(t.dtype())) {
            t.for_each_f64(|_, x| squares += x * x);
        }
        let norm = squares.sqrt();
        // Flower's min(1, clipping_norm / norm); a zero diff stays as it is.
        let scale = if norm > self.args.clipping_norm {
            self.args.clipping_norm / norm
        } else {
            1.0
        };
        let std = self.args.noise_std();
        let mut rng = lock(&self.rng);
        let mut gauss = Gauss::default();
        let mut out = BTreeMap::new();
        for (name, t) in std::mem::take(&mut model.params) {
            if !is_float(t.dtype()) {
                out.insert(name, t);
                continue;
            }
            let mut values = Vec::with_capacity(t.numel());
            t.for_each_f64(|_, x| {
                let noise = if std > 0.0 {
                    std * gauss.sample(&mut rng)
                } else {
                    0.0
                };
                values.push(x * scale + noise);
            });
            let filtered = Tensor::from_f64_like(&t, values.into_iter());
            out.insert(name, filtered);
        }
        model.params = out;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A diff of f32 tensors (shape `[]` when `scalar`), plus an i64 counter `n`.
    fn diff(tensors: &[(&str, &[f32])], steps: Option<i64>) -> FLModel {
        let mut params = BTreeMap::new();
        for (name, v) in tensors {
            let shape = if name.starts_with("scalar") {
                vec![]
            } else {
                vec![v.len()]
            };
            params.insert(name.to_string(), Tensor::from_f32(shape, v).unwrap());
        }
        params.insert("n".into(), Tensor::from_i64(vec![1], &[5]).unwrap());
        let mut m = FLModel::from_params(params);
        m.params_type = ParamsType::Diff;
        if let Some(s) = steps {
            m.meta.insert(META_NUM_STEPS.into(), MetaValue::Int(s));
        }
        m
    }

    fn values(m: &FLModel, name: &str) -> Vec<f32> {
        m.params[name].to_f32_vec()
    }

    fn full(m: &FLModel) -> FLModel {
        FLModel {
            params_type: ParamsType::Full,
            ..m.clone()
        }
    }

    fn seed(b: u8) -> [u8; 32] {
        [b; 32]
    }

    #[test]
    fn exclude_vars_drops_listed_names_and_searches_patterns() {
        let m = diff(
            &[
                ("conv.weight", &[1.0]),
                ("conv.bias", &[2.0]),
                ("fc.weight", &[3.0]),
                ("fc.bias", &[4.0]),
            ],
            None,
        );
        let names = |m: &FLModel| m.params.keys().cloned().collect::<Vec<_>>();
        let out = ExcludeVars::names(["fc.weight", "no.such"])
            .apply(m.clone())
            .unwrap();
        assert_eq!(names(&out), ["conv.bias", "conv.weight", "fc.bias", "n"]);
        // re.search, not re.match: "bias" is found inside "conv.bias".
        let out = ExcludeVars::pattern("bias")
            .unwrap()
            .apply(m.clone())
            .unwrap();
        assert_eq!(names(&out), ["conv.weight", "fc.weight", "n"]);
        let out = ExcludeVars::pattern("^fc\\.")
            .unwrap()
            .apply(m.clone())
            .unwrap();
        assert_eq!(names(&out), ["conv.bias", "conv.weight", "n"]);
        // Full weights too, unless told otherwise; None and "" exclude nothing.
        let out = ExcludeVars::pattern("conv")
            .unwrap()
            .apply(full(&m))
            .unwrap();
        assert_eq!(names(&out), ["fc.bias", "fc.weight", "n"]);
        let diff_only = ExcludeVars::pattern("conv").unwrap().only(ParamsType::Diff);
        assert_eq!(diff_only.apply(full(&m)).unwrap(), full(&m));
        assert_eq!(ExcludeVars::pattern("").unwrap(), ExcludeVars::nothing());
        assert_eq!(ExcludeVars::nothing().apply(m.clone()).unwrap(), m);
        assert!(!ExcludeVars::nothing().diff_only());
        assert!(matches!(
            ExcludeVars::pattern("(unclosed"),
            Err(FilterError::BadArgument {
                filter: "ExcludeVars",
                arg: "exclude_vars",
                ..
            })
        ));
        // Python's look-arounds are not in the regex crate's syntax.
        assert!(ExcludeVars::pattern("(?<=fc)\\.bias").is_err());
    }

    #[test]
    fn percentile_privacy_matches_a_hand_computation() {
        // Steps 2: Δ = a/2 = [0.02, -0.001, 0.0003, -0.15], b/2 = [0.005, 0, -0.025], and the
        // scalar 3.5. |Δ| sorted: 0, 0.0003, 0.001, 0.005, 0.02, 0.025, 0.15, 3.5; the 25th
        // percentile sits at 7 · 0.25 = 1.75: 0.0003 + 0.75 · (0.001 − 0.0003) = 0.000825.
        // Below it → 0; the rest clipped to ±0.01; times 2. numpy (FLARE's code) gives
        // a = [0.02, -0.002, 0, -0.02], b = [0.01, 0, -0.02], scalar 7.
        let m = diff(
            &[
                ("a", &[0.04, -0.002, 0.0006, -0.3]),
                ("b", &[0.01, 0.0, -0.05]),
                ("scalar", &[7.0]),
            ],
            Some(2),
        );
        let f = PercentilePrivacy::new(25.0, 0.01).unwrap();
        assert!(f.diff_only());
        let out = f.apply(m.clone()).unwrap();
        assert_eq!(values(&out, "a"), [0.02, -0.002, 0.0, -0.02]);
        assert_eq!(values(&out, "b"), [0.01, 0.0, -0.02]);
        assert_eq!(values(&out, "scalar"), [7.0]);
        assert_eq!(out.params["n"], m.params["n"]);
        assert_eq!(out.meta, m.meta);
        // The cutoff as numpy computes it, in f32.
        let mut abs = vec![0.02, 0.001, 0.0003, 0.15, 0.005, 0.0, 0.025, 3.5];
        assert_eq!(percentile_linear(&mut abs, 25.0), 0.000_825_000_05);
        // Without the step count Δ is the diff itself: the cutoff is 0.00165, so 0.0006 is
        // still cut, -0.002 kept and the rest clipped to ±0.01 (numpy agrees).
        let mut one = m.clone();
        one.meta.clear();
        let out = f.apply(one).unwrap();
        assert_eq!(values(&out, "a"), [0.01, -0.002, 0.0, -0.01]);
        assert_eq!(values(&out, "b"), [0.01, 0.0, -0.01]);
        // Full weights pass unchanged; so does an empty model.
        assert_eq!(f.apply(full(&m)).unwrap(), full(&m));
        let empty = FLModel {
            params_type: ParamsType::Diff,
            ..FLModel::default()
        };
        assert_eq!(f.apply(empty.clone()).unwrap(), empty);
        assert_eq!(
            PercentilePrivacy::default(),
            PercentilePrivacy::new(10.0, 0.01).unwrap()
        );
    }

    #[test]
    fn percentile_privacy_refuses_bad_arguments_steps_and_values() {
        for (p, g, arg) in [
            (-1.0, 0.01, "percentile"),
            (100.5, 0.01, "percentile"),
            (f64::NAN, 0.01, "percentile"),
            (10.0, 0.0, "gamma"),
            (10.0, f64::INFINITY, "gamma"),
        ] {
            assert!(
                matches!(
                    PercentilePrivacy::new(p, g),
                    Err(FilterError::BadArgument { arg: a, .. }) if a == arg
                ),
                "{p} {g}"
            );
        }
        let f = PercentilePrivacy::default();
        let bad = diff(&[("a", &[1.0, f32::NAN])], None);
        assert_eq!(
            f.apply(bad).unwrap_err(),
            FilterError::NonFinite {
                filter: "PercentilePrivacy",
                tensor: "a".into(),
                index: 1
            }
        );
        let zero_steps = diff(&[("a", &[1.0])], Some(0));
        assert!(matches!(
            f.apply(zero_steps),
            Err(FilterError::BadMeta { key, .. }) if key == META_NUM_STEPS
        ));
    }

    /// 16 entries in two tensors.
    fn sixteen() -> FLModel {
        let a: Vec<f32> = (0..10).map(|i| (i as f32 - 4.5) * 1e-5).collect();
        let b: Vec<f32> = (0..6).map(|i| (i as f32 + 1.0) * -2e-5).collect();
        diff(&[("a", &a), ("b", &b)], Some(1))
    }

    fn nonzero(m: &FLModel) -> usize {
        ["a", "b"]
            .iter()
            .map(|n| values(m, n).iter().filter(|v| **v != 0.0).count())
            .sum()
    }

    fn meta_f(m: &FLModel, key: &str) -> f64 {
        match m.meta.get(key) {
            Some(MetaValue::Float(f)) => *f,
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn svt_releases_exactly_its_budget_and_keeps_a_ledger() {
        let args = SvtArgs {
            fraction: 0.25,
            replace: false,
            ..SvtArgs::default()
        };
        let f = SvtPrivacy::with_seed(args, seed(7)).unwrap();
        assert!(f.diff_only());
        let mut m = sixteen();
        m.current_round = Some(3);
        let first = f.apply(m.clone()).unwrap();
        // c = ceil(16 · 0.25) = 4 entries, each drawn once.
        assert_eq!(nonzero(&first), 4);
        assert_eq!(first.params["n"], m.params["n"]);
        // ε = 0.1 split 1 : (2·4)^(2/3) = 1 : 4, so 0.02 + 0.08; release 4 · 0.1 = 0.4.
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(
            meta_f(&first, "svt_privacy_budget.epsilon_threshold"),
            0.02
        ));
        assert!(close(
            meta_f(&first, "svt_privacy_budget.epsilon_query"),
            0.08
        ));
        assert!(close(
            meta_f(&first, "svt_privacy_budget.epsilon_release"),
            0.4
        ));
        assert!(close(
            meta_f(&first, "svt_privacy_budget.epsilon_total"),
            0.5
        ));
        assert_eq!(first.meta_int("svt_privacy_budget.n_upload"), Some(4));
        assert_eq!(first.meta_int("svt_privacy_budget.round"), Some(3));
        assert_eq!(meta_f(&first, "svt_privacy_budget.delta"), 0.0);
        assert!(close(
            meta_f(&first, "svt_privacy_accountant.epsilon_total"),
            0.5
        ));
        assert_eq!(first.meta_int("svt_privacy_accountant.calls"), Some(1));
        // The i64 counter passed through unprotected, and the ledger says so.
        assert_eq!(
            first.meta.get("svt_privacy_budget.has_scalar_passthrough"),
            Some(&MetaValue::Bool(true))
        );
        // A second call adds to the ledger, replaces the call's keys, and draws new noise.
        let second = f.apply(m.clone()).unwrap();
        assert!(close(
            meta_f(&second, "svt_privacy_accountant.epsilon_total"),
            1.0
        ));
        assert_eq!(second.meta_int("svt_privacy_accountant.calls"), Some(2));
        assert!(close(
            meta_f(&second, "svt_privacy_budget.epsilon_total"),
            0.5
        ));
        assert_ne!(second.params, first.params);
        let again = f.apply(first.clone()).unwrap();
        assert_eq!(again.meta_int("svt_privacy_accountant.calls"), Some(3));
        assert!(f.privacy_spent().0 > 1.49 && f.privacy_spent().1 == 3);
        // The same seed gives the same outputs, call by call.
        let g = SvtPrivacy::with_seed(args, seed(7)).unwrap();
        assert_eq!(g.apply(m.clone()).unwrap(), first);
        assert_eq!(g.apply(m.clone()).unwrap(), second);
        assert_eq!(f, g);
        // With replacement, at most c distinct entries.
        let r = SvtPrivacy::with_seed(
            SvtArgs {
                replace: true,
                ..args
            },
            seed(9),
        )
        .unwrap();
        for _ in 0..20 {
            let n = nonzero(&r.apply(m.clone()).unwrap());
            assert!((1..=4).contains(&n), "{n}");
        }
        // Full weights pass unchanged and spend nothing.
        let h = SvtPrivacy::with_seed(args, seed(1)).unwrap();
        assert_eq!(h.apply(full(&m)).unwrap(), full(&m));
        assert_eq!(h.privacy_spent(), (0.0, 0));
    }

    #[test]
    fn svt_with_every_entry_released_and_no_release_noise_is_the_clipped_diff() {
        // fraction 1 and a threshold far below every response: every entry is accepted in
        // one pass and released; with epsilon_release = 1e12 the Laplace scale is
        // 2 · 0.1 · 4 / 1e12 = 8e-13. Steps 2: Δ = [0.25, -0.02, 0.05, -0.5], clipped to
        // ±0.1: [0.1, -0.02, 0.05, -0.1], times 2: [0.2, -0.04, 0.1, -0.2].
        let args = SvtArgs {
            fraction: 1.0,
            epsilon: 1000.0,
            gamma: 0.1,
            tau: -1.0,
            replace: false,
            epsilon_release: Some(1e12),
            ..SvtArgs::default()
        };
        let f = SvtPrivacy::with_seed(args, seed(3)).unwrap();
        let m = diff(
            &[("a", &[0.5, -0.04, 0.1, -1.0]), ("scalar", &[9.0])],
            Some(2),
        );
        let out = f.apply(m).unwrap();
        for (got, want) in values(&out, "a").iter().zip([0.2f32, -0.04, 0.1, -0.2]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(values(&out, "scalar"), [9.0]);
        assert_eq!(
            out.meta_int("svt_privacy_budget.acceptance_passes"),
            Some(1)
        );
        // 5 entries (the scalar counts), so c = 5.
        assert_eq!(out.meta_int("svt_privacy_budget.n_upload"), Some(5));
        // An unreachable threshold gives up rather than loop forever.
        let stuck = SvtPrivacy::with_seed(
            SvtArgs {
                tau: 1e9,
                ..SvtArgs::default()
            },
            seed(3),
        )
        .unwrap();
        assert!(matches!(
            stuck.apply(sixteen()),
            Err(FilterError::Config {
                filter: "SVTPrivacy",
                ..
            })
        ));
    }

    #[test]
    fn svt_arguments_are_checked_when_built() {
        let d = SvtArgs::default();
        let cases = [
            (SvtArgs { fraction: 0.0, ..d }, "fraction"),
            (SvtArgs { fraction: 1.5, ..d }, "fraction"),
            (SvtArgs { epsilon: 0.0, ..d }, "epsilon"),
            (SvtArgs { gamma: -1.0, ..d }, "gamma"),
            (SvtArgs { tau: f64::NAN, ..d }, "tau"),
            (
                SvtArgs {
                    noise_var: 0.0,
                    ..d
                },
                "noise_var",
            ),
            (
                SvtArgs {
                    epsilon_release: Some(0.0),
                    ..d
                },
                "epsilon_release",
            ),
            (
                SvtArgs {
                    epsilon_threshold: Some(0.05),
                    epsilon_query: Some(0.06),
                    ..d
                },
                "epsilon_query",
            ),
            (
                SvtArgs {
                    epsilon_threshold: Some(0.1),
                    ..d
                },
                "epsilon_threshold",
            ),
        ];
        for (args, arg) in cases {
            assert!(
                matches!(
                    SvtPrivacy::with_seed(args, seed(0)),
                    Err(FilterError::BadArgument { filter: "SVTPrivacy", arg: a, .. }) if a == arg
                ),
                "{args:?} should fail on {arg}"
            );
        }
        // A release budget makes noise_var irrelevant; explicit budgets that add up are kept.
        let ok = SvtArgs {
            noise_var: 0.0,
            epsilon_release: Some(1.0),
            epsilon_threshold: Some(0.04),
            epsilon_query: Some(0.06),
            ..d
        };
        assert!(ok.check().is_ok());
        assert_eq!(ok.epsilon_split(10), (0.04, 0.06));
        let q = SvtArgs {
            epsilon_query: Some(0.07),
            ..d
        };
        let (t, _) = q.epsilon_split(10);
        assert!((t - 0.03).abs() < 1e-12);
        assert_eq!(d.n_upload(16), 2);
        assert_eq!(d.n_upload(3), 1);
    }

    #[test]
    fn local_dp_clips_the_whole_diff_to_the_norm() {
        // Zero sensitivity: no noise. [3] and [4] make a norm of 5, clipped to 1.
        let args = LocalDpArgs {
            clipping_norm: 1.0,
            sensitivity: 0.0,
            epsilon: 1.0,
            delta: 1e-5,
        };
        let f = LocalDp::with_seed(args, seed(5)).unwrap();
        assert!(f.diff_only());
        let m = diff(&[("a", &[3.0]), ("b", &[4.0])], None);
        let out = f.apply(m.clone()).unwrap();
        assert!((values(&out, "a")[0] - 0.6).abs() < 1e-7);
        assert!((values(&out, "b")[0] - 0.8).abs() < 1e-7);
        assert_eq!(out.params["n"], m.params["n"]);
        // A diff within the norm is not scaled.
        let wide = LocalDp::with_seed(
            LocalDpArgs {
                clipping_norm: 10.0,
                ..args
            },
            seed(5),
        )
        .unwrap();
        assert_eq!(wide.apply(m.clone()).unwrap(), m);
        assert_eq!(f.apply(full(&m)).unwrap(), full(&m));
        for (bad, arg) in [
            (
                LocalDpArgs {
                    clipping_norm: 0.0,
                    ..args
                },
                "clipping_norm",
            ),
            (
                LocalDpArgs {
                    sensitivity: -1.0,
                    ..args
                },
                "sensitivity",
            ),
            (
                LocalDpArgs {
                    epsilon: 0.0,
                    ..args
                },
                "epsilon",
            ),
            (LocalDpArgs { delta: 0.0, ..args }, "delta"),
            (LocalDpArgs { delta: 1.0, ..args }, "delta"),
        ] {
            assert!(
                matches!(
                    LocalDp::with_seed(bad, seed(0)),
                    Err(FilterError::BadArgument { filter: "LocalDpMod", arg: a, .. }) if a == arg
                ),
                "{arg}"
            );
        }
    }

    #[test]
    fn local_dp_noise_has_the_gaussian_mechanisms_std() {
        // σ = 1 · sqrt(2 ln(1.25 / 1e-5)) / 2 = sqrt(2 · 11.736) / 2 = 2.4224.
        let args = LocalDpArgs {
            clipping_norm: 1e9,
            sensitivity: 1.0,
            epsilon: 2.0,
            delta: 1e-5,
        };
        assert!(
            (args.noise_std() - 2.422_4).abs() < 1e-4,
            "{}",
            args.noise_std()
        );
        let f = LocalDp::with_seed(args, seed(11)).unwrap();
        let zeros = vec![0.0f32; 100_000];
        let m = diff(&[("a", &zeros)], None);
        let out = f.apply(m.clone()).unwrap();
        let v = values(&out, "a");
        let n = v.len() as f64;
        let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|x| (f64::from(*x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!(
            (var.sqrt() / args.noise_std() - 1.0).abs() < 0.02,
            "std {}",
            var.sqrt()
        );
        // Fresh noise on the next call; the same seed repeats it.
        assert_ne!(f.apply(m.clone()).unwrap(), out);
        assert_eq!(
            LocalDp::with_seed(args, seed(11))
                .unwrap()
                .apply(m)
                .unwrap(),
            out
        );
    }
}
