//! A site's side of a SecAgg+ round.

use std::collections::{BTreeMap, BTreeSet};

use flare_crypto::secagg::{self as sc, AgreementSecret, Share};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use zeroize::Zeroizing;

use super::{
    Params, PublicKeys, SecAggError, ShareOf, ToAggregator, ToClient, neighbourhoods, pair_info,
    pair_sign, protocol, quantize, share_aad, share_x,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    New,
    Advertised,
    Shared,
    Ready,
    Masked,
    Done,
}

/// The shares this site holds of one neighbour's secrets.
struct Held {
    x: u8,
    b: Zeroizing<Vec<u8>>,
    s: Zeroizing<Vec<u8>>,
}

/// One site's SecAgg+ state for one round. Every random choice (keys, the self-mask seed,
/// Shamir coefficients, nonces, stochastic rounding) comes from the seed handed to
/// [`SecAggClient::new`].
pub struct SecAggClient {
    me: String,
    context: String,
    rng: ChaCha20Rng,
    stage: Stage,
    params: Option<Params>,
    /// This site's neighbourhood, itself included, sorted.
    hood: Vec<String>,
    c: Option<AgreementSecret>,
    s: Option<AgreementSecret>,
    b: Zeroizing<[u8; 32]>,
    /// Neighbours' public keys from stage 2.
    keys: BTreeMap<String, PublicKeys>,
    /// Shares held, by owner (this site's own included).
    held: BTreeMap<String, Held>,
}

impl std::fmt::Debug for SecAggClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggClient")
            .field("me", &self.me)
            .field("context", &self.context)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

impl SecAggClient {
    /// A site `me` for the round `context` (the workflow checks the aggregator names the same
    /// round), drawing its randomness from `seed`.
    pub fn new(me: impl Into<String>, context: impl Into<String>, seed: [u8; 32]) -> Self {
        SecAggClient {
            me: me.into(),
            context: context.into(),
            rng: ChaCha20Rng::from_seed(seed),
            stage: Stage::New,
            params: None,
            hood: Vec::new(),
            c: None,
            s: None,
            b: Zeroizing::new([0; 32]),
            keys: BTreeMap::new(),
            held: BTreeMap::new(),
        }
    }

    /// The round's parameters, once set up.
    pub fn params(&self) -> Option<&Params> {
        self.params.as_ref()
    }

    /// Answers a message of the aggregator; stage 3's [`ToClient::Shares`] has no answer
    /// (the site trains, then calls [`SecAggClient::mask`]).
    pub fn handle(&mut self, msg: &ToClient) -> Result<Option<ToAggregator>, SecAggError> {
        match msg {
            ToClient::Setup {
                context,
                participants,
                graph_seed,
                params,
            } => self
                .setup(context, participants, *graph_seed, params)
                .map(Some),
            ToClient::NeighbourKeys { keys } => self.share_keys(keys).map(Some),
            ToClient::Shares { shares } => self.receive_shares(shares).map(|()| None),
            ToClient::Unmask { survivors, dropped } => self.unmask(survivors, dropped).map(Some),
        }
    }

    fn expect(&self, stage: Stage, what: &str) -> Result<(), SecAggError> {
        if self.stage == stage {
            Ok(())
        } else {
            Err(protocol(format!(
                "{what} arrived at {} in stage {:?}",
                self.me, self.stage
            )))
        }
    }

    fn setup(
        &mut self,
        context: &str,
        participants: &[String],
        graph_seed: u64,
        params: &Params,
    ) -> Result<ToAggregator, SecAggError> {
        self.expect(Stage::New, "setup")?;
        if context != self.context {
            return Err(protocol(format!(
                "setup for {context:?} reached {} in round {:?}",
                self.me, self.context
            )));
        }
        let mut sorted = participants.to_vec();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != participants.len() {
            return Err(protocol("setup lists a participant twice"));
        }
        if !sorted.contains(&self.me) {
            return Err(protocol(format!("setup does not list {}", self.me)));
        }
        let k = usize::from(params.num_shares);
        let t = usize::from(params.threshold);
        if t < 2 || t > k || k > sorted.len() || k > 255 {
            return Err(protocol(format!(
                "setup asks for {t}-of-{k} shares among {} sites",
                sorted.len()
            )));
        }
        if !params.modulus_range.is_power_of_two()
            || params.modulus_range > 1 << 32
            || params.quantization_range < 2
            || params.quantization_range >= params.modulus_range
            || !(params.clipping_range.is_finite() && params.clipping_range > 0.0)
            || !(params.max_weight.is_finite() && params.max_weight > 0.0)
            || params
                .dp
                .is_some_and(|d| !(d.clip_norm.is_finite() && d.clip_norm > 0.0))
            || sorted.len() as u64 > params.modulus_range / params.quantization_range
        {
            return Err(protocol(format!("setup parameters do not fit: {params:?}")));
        }
        let hoods = neighbourhoods(&sorted, k, graph_seed);
        self.hood = hoods.get(&self.me).cloned().unwrap_or_default();
        let mut key = Zeroizing::new([0u8; 32]);
        self.rng.fill(&mut key[..]);
        let c = AgreementSecret::from_bytes(*key);
        self.rng.fill(&mut key[..]);
        let s = AgreementSecret::from_bytes(*key);
        self.rng.fill(&mut self.b[..]);
        let keys = PublicKeys {
            c: c.public(),
            s: s.public(),
        };
        self.c = Some(c);
        self.s = Some(s);
        self.params = Some(*params);
        self.stage = Stage::Advertised;
        Ok(ToAggregator::Keys(keys))
    }

    fn threshold(&self) -> usize {
        self.params.map_or(usize::MAX, |p| usize::from(p.threshold))
    }

    fn share_keys(
        &mut self,
        keys: &BTreeMap<String, PublicKeys>,
    ) -> Result<ToAggregator, SecAggError> {
        self.expect(Stage::Advertised, "neighbour keys")?;
        if let Some(stranger) = keys
            .keys()
            .find(|n| !self.hood.contains(n) || **n == self.me)
        {
            return Err(protocol(format!(
                "keys of {stranger}, not a neighbour of {}",
                self.me
            )));
        }
        // Bonawitz et al.: every advertised key must be distinct.
        let mut seen = BTreeSet::new();
        let own = [self.c.as_ref(), self.s.as_ref()];
        for k in own.into_iter().flatten() {
            seen.insert(k.public());
        }
        for (n, k) in keys {
            if !seen.insert(k.c) || !seen.insert(k.s) {
                return Err(protocol(format!("{n} advertised a key seen before")));
            }
        }
        if keys.len() + 1 < self.threshold() {
            return Err(protocol(format!(
                "{} has {} live neighbours, {} needed",
                self.me,
                keys.len() + 1,
                self.threshold()
            )));
        }
        let (Some(c), Some(s)) = (&self.c, &self.s) else {
            return Err(protocol("keys were not made"));
        };
        // Shares go to the live members of the neighbourhood; x is the holder's place in it.
        let mut holders: Vec<&String> = keys.keys().collect();
        holders.push(&self.me);
        let xs: Vec<u8> = holders
            .iter()
            .map(|h| share_x(&self.hood, h).ok_or_else(|| protocol("holder outside the hood")))
            .collect::<Result<_, _>>()?;
        let t = self.threshold();
        let b_shares = sc::split(&self.b[..], t, &xs, &mut self.rng)?;
        let s_bytes = s.to_bytes();
        let s_shares = sc::split(&s_bytes[..], t, &xs, &mut self.rng)?;
        let mut out = BTreeMap::new();
        for ((holder, b), sh) in holders.iter().zip(b_shares).zip(s_shares) {
            if **holder == self.me {
                self.held.insert(
                    self.me.clone(),
                    Held {
                        x: b.x,
                        b: Zeroizing::new(b.y.clone()),
                        s: Zeroizing::new(sh.y.clone()),
                    },
                );
                continue;
            }
            let pk = &keys[*holder];
            let key = c.agree(&pk.c, &pair_info(&self.context, "share", &self.me, holder))?;
            let mut plain = Zeroizing::new(Vec::with_capacity(1 + b.y.len() + sh.y.len()));
            plain.push(b.x);
            plain.extend_from_slice(&b.y);
            plain.extend_from_slice(&sh.y);
            let sealed = sc::seal_share(
                &key,
                &share_aad(&self.context, &self.me, holder),
                &plain,
                &mut self.rng,
            )?;
            out.insert((*holder).clone(), serde_bytes::ByteBuf::from(sealed));
        }
        self.keys = keys.clone();
        self.stage = Stage::Shared;
        Ok(ToAggregator::Shares { shares: out })
    }

    fn receive_shares(
        &mut self,
        shares: &BTreeMap<String, serde_bytes::ByteBuf>,
    ) -> Result<(), SecAggError> {
        self.expect(Stage::Shared, "shares")?;
        let Some(c) = &self.c else {
            return Err(protocol("keys were not made"));
        };
        let mut held = BTreeMap::new();
        for (from, sealed) in shares {
            let Some(pk) = self.keys.get(from) else {
                return Err(protocol(format!(
                    "a share from {from}, whose keys {} never got",
                    self.me
                )));
            };
            let key = c.agree(&pk.c, &pair_info(&self.context, "share", from, &self.me))?;
            let plain = sc::open_share(&key, &share_aad(&self.context, from, &self.me), sealed)
                .map_err(|e| SecAggError::Crypto(format!("share from {from}: {e}")))?;
            if plain.len() != 65 {
                return Err(protocol(format!(
                    "share from {from} holds {} bytes",
                    plain.len()
                )));
            }
            held.insert(
                from.clone(),
                Held {
                    x: plain[0],
                    b: Zeroizing::new(plain[1..33].to_vec()),
                    s: Zeroizing::new(plain[33..65].to_vec()),
                },
            );
        }
        if held.len() + 1 < self.threshold() {
            return Err(protocol(format!(
                "{} got shares from {} neighbours, {} needed",
                self.me,
                held.len(),
                self.threshold().saturating_sub(1)
            )));
        }
        self.held.extend(held);
        self.stage = Stage::Ready;
        Ok(())
    }

    /// Whether the site has its neighbours' shares and may upload a masked input.
    pub fn ready(&self) -> bool {
        self.stage == Stage::Ready
    }

    /// This site's masked input: `[w, w·x_1, …, w·x_n]` quantized, where
    /// `w = min(samples / max_weight, 1)`, plus its self-mask and its pairwise masks with
    /// every neighbour whose shares it got. `update` is the site's update (its model minus
    /// the global model it trained from), in the order the aggregator expects. Under
    /// DP-FedAvg ([`Params::dp`]) the update is first clipped to `C`, `w` is 1, and the
    /// within-`C` indicator is appended when asked for.
    pub fn mask(
        &mut self,
        update: impl ExactSizeIterator<Item = f32>,
        samples: f64,
    ) -> Result<Vec<u32>, SecAggError> {
        self.expect(Stage::Ready, "a masked input")?;
        let Some(p) = self.params else {
            return Err(protocol("no parameters"));
        };
        let Some(s) = &self.s else {
            return Err(protocol("keys were not made"));
        };
        if !(samples.is_finite() && samples > 0.0) {
            return Err(protocol(format!("weight {samples} is not positive")));
        }
        // In place when `update` is a vector's iterator.
        let mut update: Vec<f32> = update.collect();
        if update.iter().any(|x| !x.is_finite()) {
            return Err(protocol("the update holds a non-finite value"));
        }
        let mut w = (samples / p.max_weight).min(1.0);
        if let Some(dp) = p.dp {
            let norm = update
                .iter()
                .map(|x| f64::from(*x) * f64::from(*x))
                .sum::<f64>()
                .sqrt();
            let scale = crate::dp::clip_scale(norm, dp.clip_norm);
            if scale < 1.0 {
                for x in &mut update {
                    *x = (f64::from(*x) * scale) as f32;
                }
            }
            if dp.count_unclipped {
                update.push(if norm <= dp.clip_norm { 1.0 } else { 0.0 });
            }
            w = 1.0;
        }
        let mut out = Vec::with_capacity(update.len() + 1);
        let u: f64 = self.rng.random();
        out.push(quantize(w, p.clipping_range, p.quantization_range, u));
        for x in update {
            let u: f64 = self.rng.random();
            out.push(quantize(
                w * f64::from(x),
                p.clipping_range,
                p.quantization_range,
                u,
            ));
        }
        sc::apply_mask(&self.b, sc::Sign::Plus, &mut out);
        for (n, pk) in &self.keys {
            if !self.held.contains_key(n) {
                continue; // it did not share: it is not in U2, so no mask with it
            }
            let key = s.agree(&pk.s, &pair_info(&self.context, "mask", &self.me, n))?;
            sc::apply_mask(&key, pair_sign(&self.me, n), &mut out);
        }
        if p.modulus_range < 1 << 32 {
            let m = (p.modulus_range - 1) as u32;
            for v in &mut out {
                *v &= m;
            }
        }
        self.stage = Stage::Masked;
        Ok(out)
    }

    fn unmask(
        &mut self,
        survivors: &[String],
        dropped: &[String],
    ) -> Result<ToAggregator, SecAggError> {
        self.expect(Stage::Masked, "an unmask request")?;
        let alive: BTreeSet<&String> = survivors.iter().collect();
        let gone: BTreeSet<&String> = dropped.iter().collect();
        if let Some(both) = alive.intersection(&gone).next() {
            return Err(protocol(format!(
                "{both} is named both survivor and dropped: its input would be exposed"
            )));
        }
        if !alive.contains(&self.me) {
            return Err(protocol(format!(
                "{} uploaded but is not named a survivor",
                self.me
            )));
        }
        for n in alive.iter().chain(gone.iter()) {
            if !self.held.contains_key(*n) {
                return Err(protocol(format!(
                    "{} holds no share of {n}, named in the unmask request",
                    self.me
                )));
            }
        }
        if alive.len() < self.threshold() {
            return Err(protocol(format!(
                "only {} of {}'s neighbourhood survived, {} needed",
                alive.len(),
                self.me,
                self.threshold()
            )));
        }
        let take = |set: &BTreeSet<&String>, b: bool| -> BTreeMap<String, ShareOf> {
            set.iter()
                .filter_map(|n| {
                    self.held.get(*n).map(|h| {
                        let y = if b { &h.b } else { &h.s };
                        (
                            (*n).clone(),
                            ShareOf {
                                x: h.x,
                                y: y.to_vec(),
                            },
                        )
                    })
                })
                .collect()
        };
        let out = ToAggregator::Unmask {
            b: take(&alive, true),
            s: take(&gone, false),
        };
        // One answer per round: a second request could name the other set.
        self.held.clear();
        self.stage = Stage::Done;
        Ok(out)
    }
}

/// A share as the crypto layer takes it.
pub(super) fn to_share(s: &ShareOf) -> Share {
    Share {
        x: s.x,
        y: s.y.clone(),
    }
}
