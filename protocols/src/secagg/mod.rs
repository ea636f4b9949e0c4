//! Secure aggregation (SecAgg+, Bell et al. CCS'20, after Bonawitz et al. CCS'17) as two
//! sans-IO state machines: [`SecAggClient`] at each site and [`SecAggAggregator`] at whoever
//! aggregates the round (the server in scatter-and-gather, a peer in swarm). The aggregator
//! learns the weighted sum of the sites' updates and nothing about any one of them.
//!
//! A round, for participants `P` with neighbour graph `N` (a shuffled ring, each site joined
//! to the `num_shares - 1` nearest sites around it, so `num_shares = |P|` is the complete
//! graph of the original SecAgg):
//! 1. **Setup.** The aggregator sends [`ToClient::Setup`] (the context, `P`, the graph seed
//!    and the parameters). Each site makes two x25519 secrets, `c` (to encrypt shares) and
//!    `s` (to agree pairwise masks), and a 32-byte self-mask seed `b`, and answers
//!    [`ToAggregator::Keys`]. `U1` is the sites that answered.
//! 2. **Share keys.** Each site gets its neighbours' public keys ([`ToClient::NeighbourKeys`]),
//!    splits `b` and `s` into t-of-k Shamir shares (one per member of its neighbourhood,
//!    itself included) and returns each neighbour's share encrypted under the key it agrees
//!    with that neighbour's `c` ([`ToAggregator::Shares`]). `U2` is the sites that did.
//! 3. **Masked input.** Each site gets the shares addressed to it ([`ToClient::Shares`]), then
//!    uploads `y = q + PRG(b) + Σ± PRG(s_ij) mod 2^32` ([`SecAggClient::mask`]): `q` is its
//!    quantized `[w, w·Δ]` (the weight `w = samples / max_weight` is masked too, so the
//!    weighted mean comes out), and the pairwise masks with every neighbour in `U2` cancel
//!    in the sum. `U3` is the sites whose input arrived.
//! 4. **Unmask.** Each site in `U3` is told which neighbours survived and which dropped
//!    ([`ToClient::Unmask`]) and returns its shares of the survivors' `b` and of the dropped
//!    sites' `s` ([`ToAggregator::Unmask`]). With `t` shares per site the aggregator rebuilds
//!    them, subtracts every survivor's self-mask and the pairwise masks that survivors still
//!    hold with dropped sites, and dequantizes the sum.
//!
//! Rules:
//! - For one site the aggregator rebuilds `b` (it survived) or `s` (it dropped), never both:
//!   a site that is asked for both, or for a site outside its neighbourhood, refuses.
//! - A site whose neighbourhood has fewer than `t` live members (itself included) at any
//!   stage makes the round abort with a reason that names it; the workflow decides what
//!   happens next.
//! - Masks come from a ChaCha20 stream keyed with all 32 bytes of the seed or agreed key
//!   (Flower folds its keys to 32 bits); pairwise keys are x25519 + HKDF-SHA256 bound to the
//!   round's context, so no key serves two rounds.
//!
//! Everything random comes from a seed handed in; the cryptography is `flare_crypto::secagg`.

mod aggregator;
mod client;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

pub use aggregator::{AggOutput, SecAggAggregator, Unmasked};
pub use client::SecAggClient;

/// SecAgg+ settings, Flower's names and defaults. `num_shares` and `reconstruction_threshold`
/// are counts when above 1 and fractions (of the participants, and of the shares) otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggArgs {
    /// Shares each secret is split into: the neighbourhood's size, the site included.
    #[serde(default = "default_num_shares")]
    pub num_shares: f64,
    /// Shares that rebuild a secret.
    #[serde(default = "default_threshold")]
    pub reconstruction_threshold: f64,
    /// Sample count that maps to weight 1; larger counts are clipped to 1.
    #[serde(default = "default_max_weight")]
    pub max_weight: f64,
    /// Each weighted update value is clipped to ±this before quantization.
    #[serde(default = "default_clipping_range")]
    pub clipping_range: f64,
    /// Quantization levels.
    #[serde(default = "default_quantization_range")]
    pub quantization_range: u64,
    /// The modulus of the masked sums (a power of two, at most 2^32).
    #[serde(default = "default_modulus_range")]
    pub modulus_range: u64,
    /// Seconds the aggregator waits for each key stage before it goes on without the silent.
    #[serde(default = "default_stage_timeout")]
    pub stage_timeout: f64,
}

fn default_num_shares() -> f64 {
    1.0
}
fn default_threshold() -> f64 {
    0.5
}
fn default_max_weight() -> f64 {
    1000.0
}
fn default_clipping_range() -> f64 {
    8.0
}
fn default_quantization_range() -> u64 {
    1 << 22
}
fn default_modulus_range() -> u64 {
    1 << 32
}
fn default_stage_timeout() -> f64 {
    60.0
}

impl Default for SecAggArgs {
    fn default() -> Self {
        SecAggArgs {
            num_shares: default_num_shares(),
            reconstruction_threshold: default_threshold(),
            max_weight: default_max_weight(),
            clipping_range: default_clipping_range(),
            quantization_range: default_quantization_range(),
            modulus_range: default_modulus_range(),
            stage_timeout: default_stage_timeout(),
        }
    }
}

/// The parameters of one round, resolved for its participants; sent in [`ToClient::Setup`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Neighbourhood size `k`, the site included.
    pub num_shares: u16,
    /// Shares `t` that rebuild a secret.
    pub threshold: u16,
    /// Sample count of weight 1.
    pub max_weight: f64,
    /// Clip of each weighted value.
    pub clipping_range: f64,
    /// Quantization levels.
    pub quantization_range: u64,
    /// Modulus of the sums.
    pub modulus_range: u64,
    /// DP-FedAvg's site-side clipping, when the run composes secure aggregation with
    /// central DP ([`crate::aggregators::Aggregator::finish_secure`]).
    #[serde(default)]
    pub dp: Option<DpClip>,
}

/// What a site does to its update for DP-FedAvg under secure aggregation: the aggregator
/// cannot clip an update it never sees, so each site clips its own to `clip_norm` (L2) and
/// takes weight 1 (DP-FedAvg averages with equal weights); with `count_unclipped` it also
/// adds one value, 1 if its update was within `clip_norm` and 0 if not, so the unmasked
/// mean carries the fraction adaptive clipping needs, and nothing of which site it was.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpClip {
    /// The round's clipping norm `C`.
    pub clip_norm: f64,
    /// Whether the sites add the within-`C` indicator (adaptive clipping).
    pub count_unclipped: bool,
}

/// Why SecAgg settings, a message or a round were refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SecAggError {
    /// A setting is out of range.
    #[error("secure aggregation: {field}: {reason}")]
    Config {
        /// The argument's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A message came at the wrong stage, from the wrong site, or does not fit the round.
    #[error("secure aggregation: {0}")]
    Protocol(String),
    /// The cryptography failed (a share did not open, a key was degenerate).
    #[error("secure aggregation: {0}")]
    Crypto(String),
}

fn config(field: &'static str, reason: impl Into<String>) -> SecAggError {
    SecAggError::Config {
        field,
        reason: reason.into(),
    }
}

fn protocol(reason: impl Into<String>) -> SecAggError {
    SecAggError::Protocol(reason.into())
}

impl From<flare_crypto::secagg::SecAggCryptoError> for SecAggError {
    fn from(e: flare_crypto::secagg::SecAggCryptoError) -> Self {
        SecAggError::Crypto(e.to_string())
    }
}

impl SecAggArgs {
    /// Checks the settings that do not depend on the participants.
    pub fn check(&self) -> Result<(), SecAggError> {
        if !(self.num_shares.is_finite() && self.num_shares > 0.0) {
            return Err(config("num_shares", "must be a positive count or fraction"));
        }
        if self.num_shares > 1.0 && self.num_shares.fract() != 0.0 {
            return Err(config("num_shares", "above 1 it must be a whole count"));
        }
        if !(self.reconstruction_threshold.is_finite() && self.reconstruction_threshold > 0.0) {
            return Err(config(
                "reconstruction_threshold",
                "must be a positive count or fraction",
            ));
        }
        if self.reconstruction_threshold > 1.0 && self.reconstruction_threshold.fract() != 0.0 {
            return Err(config(
                "reconstruction_threshold",
                "above 1 it must be a whole count",
            ));
        }
        if !(self.max_weight.is_finite() && self.max_weight > 0.0) {
            return Err(config("max_weight", "must be positive"));
        }
        if !(self.clipping_range.is_finite() && self.clipping_range > 0.0) {
            return Err(config("clipping_range", "must be positive"));
        }
        if !self.modulus_range.is_power_of_two() || self.modulus_range > 1 << 32 {
            return Err(config(
                "modulus_range",
                format!("{} is not a power of two up to 2^32", self.modulus_range),
            ));
        }
        if self.quantization_range < 2 || self.quantization_range >= self.modulus_range {
            return Err(config(
                "quantization_range",
                format!(
                    "{} must be at least 2 and below modulus_range {}",
                    self.quantization_range, self.modulus_range
                ),
            ));
        }
        if !(self.stage_timeout.is_finite() && self.stage_timeout > 0.0) {
            return Err(config("stage_timeout", "must be positive"));
        }
        Ok(())
    }

    /// The round's parameters for `n` participants (Flower's rules: a fraction of shares is
    /// rounded and made odd, and two or fewer means everyone; the threshold is at least 2).
    /// A count of shares is made odd too, unless it is everyone, so the ring of
    /// neighbourhoods is symmetric.
    pub fn resolve(&self, n: usize) -> Result<Params, SecAggError> {
        self.check()?;
        if n < 2 {
            return Err(config(
                "participants",
                format!("{n} site(s): secure aggregation needs at least 2"),
            ));
        }
        let most = (self.modulus_range / self.quantization_range) as usize;
        if n > most {
            return Err(config(
                "participants",
                format!(
                    "{n} sites overflow modulus_range / quantization_range = {most} in the sum"
                ),
            ));
        }
        let mut k = if self.num_shares <= 1.0 {
            let mut k = (self.num_shares * n as f64).round() as usize;
            if k % 2 == 0 {
                k += 1;
            }
            if k <= 2 { n } else { k }
        } else {
            self.num_shares as usize
        };
        if k < 2 {
            return Err(config("num_shares", format!("{k} is below 2")));
        }
        // An even neighbourhood smaller than everyone would not be symmetric on the ring
        // (a site would get shares from a neighbour whose keys it never got): made odd.
        if k % 2 == 0 && k < n {
            k += 1;
        }
        k = k.min(n);
        if k > 255 {
            return Err(config(
                "num_shares",
                format!("{k} shares: at most 255 (shares are over GF(256))"),
            ));
        }
        let t = if self.reconstruction_threshold <= 1.0 {
            ((self.reconstruction_threshold * k as f64).round() as usize).max(2)
        } else {
            self.reconstruction_threshold as usize
        };
        if t > k {
            return Err(config(
                "reconstruction_threshold",
                format!("{t} is above the {k} shares"),
            ));
        }
        Ok(Params {
            num_shares: k as u16,
            threshold: t as u16,
            max_weight: self.max_weight,
            clipping_range: self.clipping_range,
            quantization_range: self.quantization_range,
            modulus_range: self.modulus_range,
            dp: None,
        })
    }
}

/// A site's two public keys: `c` encrypts shares, `s` agrees masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeys {
    /// Share-encryption key.
    pub c: [u8; 32],
    /// Mask-agreement key.
    pub s: [u8; 32],
}

/// Aggregator → site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToClient {
    /// Stage 1: the round's context, participants, graph seed and parameters.
    Setup {
        /// Binds keys and ciphertexts to one round (job, round, attempt).
        context: String,
        /// Every participant, sorted.
        participants: Vec<String>,
        /// Seed of the shuffled ring.
        graph_seed: u64,
        /// The parameters.
        params: Params,
    },
    /// Stage 2: the public keys of the neighbours that advertised them.
    NeighbourKeys {
        /// By neighbour.
        keys: BTreeMap<String, PublicKeys>,
    },
    /// Stage 3: the encrypted shares neighbours made for this site, by sender.
    Shares {
        /// By sender.
        shares: BTreeMap<String, serde_bytes::ByteBuf>,
    },
    /// Stage 4: which of this site's neighbours' inputs arrived.
    Unmask {
        /// Neighbours (this site included) whose masked input arrived.
        survivors: Vec<String>,
        /// Neighbours that shared keys but whose input did not arrive.
        dropped: Vec<String>,
    },
}

/// Site → aggregator (the masked input travels apart, as a model: see
/// [`SecAggClient::mask`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToAggregator {
    /// Stage 1: this site's public keys.
    Keys(PublicKeys),
    /// Stage 2: encrypted shares, by receiving neighbour.
    Shares {
        /// By receiver.
        shares: BTreeMap<String, serde_bytes::ByteBuf>,
    },
    /// Stage 4: shares of survivors' self-mask seeds and of dropped sites' mask secrets.
    Unmask {
        /// Share of `b` of each survivor, by survivor.
        b: BTreeMap<String, ShareOf>,
        /// Share of `s` of each dropped neighbour, by neighbour.
        s: BTreeMap<String, ShareOf>,
    },
}

/// One Shamir share in a message.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareOf {
    /// Its x coordinate.
    pub x: u8,
    /// Its y bytes.
    #[serde(with = "serde_bytes")]
    pub y: Vec<u8>,
}

impl std::fmt::Debug for ShareOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShareOf(x={}, {} bytes)", self.x, self.y.len())
    }
}

/// Adds a submitted masked input (a [`masked_model`]) to `round`'s sum, and its metrics (of
/// the model the site received) to `measured` with weight 1: its sample count is secret.
/// The workflows' one way of taking a masked input.
pub(crate) fn take_masked_input(
    round: &mut SecAggAggregator,
    measured: &mut crate::aggregators::RoundAgg,
    from: &str,
    model: &crate::stored::ModelRef,
) -> Result<(), String> {
    let loaded = model.load().map_err(|e| e.to_string())?;
    let words = masked_input(&loaded).map_err(|e| e.to_string())?;
    drop(loaded);
    round.add_input(from, &words).map_err(|e| e.to_string())?;
    let metrics_only = crate::FLModel {
        metrics: model.metrics().clone(),
        ..crate::FLModel::default()
    };
    measured
        .add(&crate::FLModel::default(), &metrics_only, 1.0)
        .map_err(|e| e.to_string())
}

/// Largest SecAgg control message (keys, shares, unmask lists): 1 MiB, as for control.
pub const MAX_SECAGG_MESSAGE: usize = crate::codec::MAX_CONTROL_MESSAGE;

/// The neighbourhood of every participant (itself included, sorted): a ring shuffled by
/// `seed`, each site joined to the `(k - 1) / 2` sites on each side (and one more on one
/// side when `k` is even); `k >= n` is the complete graph.
pub fn neighbourhoods(
    participants: &[String],
    k: usize,
    seed: u64,
) -> BTreeMap<String, Vec<String>> {
    let n = participants.len();
    let mut ring: Vec<&String> = participants.iter().collect();
    ring.sort();
    ring.shuffle(&mut ChaCha20Rng::seed_from_u64(seed));
    let k = k.min(n);
    let left = k.saturating_sub(1) / 2;
    let right = k.saturating_sub(1) - left;
    let mut out = BTreeMap::new();
    for (pos, me) in ring.iter().enumerate() {
        let mut hood: Vec<String> = Vec::with_capacity(k);
        for d in 0..=left {
            hood.push(ring[(pos + n - d % n) % n].clone());
        }
        for d in 1..=right {
            hood.push(ring[(pos + d) % n].clone());
        }
        hood.sort();
        hood.dedup();
        out.insert((*me).clone(), hood);
    }
    out
}

/// Quantizes `x` (already weighted) after clipping to ±`clip`: `(x + clip)·scale` with
/// `scale = (levels - 1) / (2·clip)`, rounded up with probability equal to its fraction
/// (`u` uniform in [0, 1)), so the rounding is unbiased.
pub fn quantize(x: f64, clip: f64, levels: u64, u: f64) -> u32 {
    let scale = (levels - 1) as f64 / (2.0 * clip);
    let v = (x.clamp(-clip, clip) + clip) * scale;
    let floor = v.floor();
    let q = if u < v - floor { floor + 1.0 } else { floor };
    q.clamp(0.0, (levels - 1) as f64) as u32
}

/// The real sum of `n` quantized values whose quantized sum is `q` (see [`quantize`]).
pub fn dequantize_sum(q: u64, n: usize, clip: f64, levels: u64) -> f64 {
    let scale = (levels - 1) as f64 / (2.0 * clip);
    q as f64 / scale - n as f64 * clip
}

/// The width of one quantization step: the most one value's rounding can move it.
pub fn quantization_step(clip: f64, levels: u64) -> f64 {
    2.0 * clip / (levels - 1) as f64
}

/// The additional data of a share ciphertext: context, sender, receiver.
fn share_aad(context: &str, from: &str, to: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(context.len() + from.len() + to.len() + 24);
    for part in [context, from, to] {
        aad.extend_from_slice(&(part.len() as u64).to_le_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    aad
}

/// The HKDF info of a pairwise key between `a` and `b` (order-free) for `purpose`.
fn pair_info(context: &str, purpose: &str, a: &str, b: &str) -> Vec<u8> {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut info = Vec::new();
    for part in [purpose, context, lo, hi] {
        info.extend_from_slice(&(part.len() as u64).to_le_bytes());
        info.extend_from_slice(part.as_bytes());
    }
    info
}

/// The sign of `me`'s pairwise mask with `other`: the lower name adds, the higher subtracts.
fn pair_sign(me: &str, other: &str) -> flare_crypto::secagg::Sign {
    if me < other {
        flare_crypto::secagg::Sign::Plus
    } else {
        flare_crypto::secagg::Sign::Minus
    }
}

/// The x coordinate of `holder`'s share of `owner`'s secrets: its place in `owner`'s sorted
/// neighbourhood, from 1.
fn share_x(hood: &[String], holder: &str) -> Option<u8> {
    hood.iter()
        .position(|h| h == holder)
        .and_then(|i| u8::try_from(i + 1).ok())
}

/// Name of the tasks that carry the key stages and the unmasking in scatter-and-gather.
pub const SECAGG_TASK: &str = "secagg";
/// Header of a task or result that carries a SecAgg message (hex of its CBOR).
pub const SECAGG_HEADER: &str = "secagg";
/// The tensor of a result model that holds a site's masked input.
pub const MASKED_TENSOR: &str = "secagg.masked";

/// `msg` as a header value.
pub fn to_header<T: Serialize>(msg: &T) -> Result<crate::MetaValue, SecAggError> {
    let bytes = crate::codec::encode(msg, MAX_SECAGG_MESSAGE)
        .map_err(|e| protocol(format!("cannot encode a message: {e}")))?;
    Ok(crate::MetaValue::Text(hex::encode(bytes)))
}

/// The SecAgg message in `headers`, if there is one.
pub fn from_headers<T: serde::de::DeserializeOwned>(
    headers: &BTreeMap<String, crate::MetaValue>,
) -> Result<Option<T>, SecAggError> {
    let Some(v) = headers.get(SECAGG_HEADER) else {
        return Ok(None);
    };
    let crate::MetaValue::Text(text) = v else {
        return Err(protocol("the secagg header is not text"));
    };
    if text.len() > 2 * MAX_SECAGG_MESSAGE {
        return Err(protocol("the secagg header is too large"));
    }
    let bytes = hex::decode(text).map_err(|e| protocol(format!("the secagg header: {e}")))?;
    crate::codec::decode(&bytes, MAX_SECAGG_MESSAGE)
        .map(Some)
        .map_err(|e| protocol(format!("the secagg header: {e}")))
}

fn is_float(d: crate::DType) -> bool {
    matches!(
        d,
        crate::DType::F32 | crate::DType::F16 | crate::DType::BF16
    )
}

/// How many values an update of `model` has: the elements of its float tensors (integer
/// tensors such as batch-norm counters are not aggregated, as in FedAvg).
pub fn update_len(layout: &[crate::stored::TensorInfo]) -> usize {
    layout
        .iter()
        .filter(|t| is_float(t.dtype))
        .map(|t| crate::model::numel(&t.shape).unwrap_or(0))
        .sum()
}

/// `local - global` over the float tensors of `global`, in name order: the update a site
/// masks. A tensor missing from `local` (a privacy filter removed it) counts as unchanged.
pub fn flat_update(
    global: &crate::FLModel,
    local: &crate::FLModel,
) -> Result<Vec<f32>, SecAggError> {
    let mut out = Vec::new();
    for (name, g) in global.params.iter().filter(|(_, t)| is_float(t.dtype())) {
        match local.params.get(name) {
            None => out.extend(std::iter::repeat_n(0.0, g.numel())),
            Some(l) if l.shape() != g.shape() => {
                return Err(protocol(format!(
                    "tensor {name}: shape {:?} in the result, {:?} in the global model",
                    l.shape(),
                    g.shape()
                )));
            }
            Some(l) => {
                let (gv, lv) = (g.to_f32_vec(), l.to_f32_vec());
                out.extend(lv.iter().zip(&gv).map(|(a, b)| a - b));
            }
        }
    }
    Ok(out)
}

/// `global` plus `mean` (an update in [`flat_update`]'s order) on its float tensors.
pub fn apply_update(global: &crate::FLModel, mean: &[f32]) -> Result<crate::FLModel, SecAggError> {
    let mut out = crate::FLModel {
        params: BTreeMap::new(),
        params_type: global.params_type,
        metrics: BTreeMap::new(),
        meta: BTreeMap::new(),
        current_round: global.current_round,
        total_rounds: global.total_rounds,
    };
    let mut at = 0usize;
    for (name, g) in &global.params {
        if !is_float(g.dtype()) {
            out.params.insert(name.clone(), g.clone());
            continue;
        }
        let n = g.numel();
        let Some(d) = mean.get(at..at + n) else {
            return Err(protocol(format!(
                "the unmasked update has {} values, the model more",
                mean.len()
            )));
        };
        at += n;
        let mut values = Vec::with_capacity(n);
        g.for_each_f64(|i, v| values.push(v + f64::from(d[i])));
        out.params.insert(
            name.clone(),
            crate::Tensor::from_f64_like(g, values.into_iter()),
        );
    }
    if at != mean.len() {
        return Err(protocol(format!(
            "the unmasked update has {} values, the model {at}",
            mean.len()
        )));
    }
    Ok(out)
}

/// A result model that carries `masked` (and the site's `metrics` of the model it got).
pub fn masked_model(masked: &[u32], metrics: BTreeMap<String, f64>) -> crate::FLModel {
    let mut data = Vec::with_capacity(masked.len() * 4);
    for v in masked {
        data.extend_from_slice(&v.to_le_bytes());
    }
    let mut m = crate::FLModel::default();
    if let Ok(t) = crate::Tensor::from_bytes(crate::DType::U32, vec![masked.len()], data) {
        m.params.insert(MASKED_TENSOR.to_string(), t);
    }
    m.metrics = metrics;
    m
}

/// The masked input a result model carries.
pub fn masked_input(model: &crate::FLModel) -> Result<Vec<u32>, SecAggError> {
    let t = model
        .params
        .get(MASKED_TENSOR)
        .filter(|t| t.dtype() == crate::DType::U32 && model.params.len() == 1)
        .ok_or_else(|| {
            protocol(format!(
                "the result is not a masked input (one U32 tensor {MASKED_TENSOR})"
            ))
        })?;
    Ok(t.bytes()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}
