//! The aggregator's side of a SecAgg+ round.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use flare_crypto::secagg::{self as sc, AgreementSecret, Sign};

use super::client::to_share;
use super::{
    Params, PublicKeys, SecAggError, ShareOf, ToAggregator, ToClient, dequantize_sum,
    neighbourhoods, pair_info, pair_sign, protocol,
};
use crate::time::Time;

/// What the aggregator asks the driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum AggOutput {
    /// Deliver `msg` to site `to`. A [`ToClient::Shares`] is the site's signal to train and
    /// upload its masked input.
    Send {
        /// The site.
        to: String,
        /// The message.
        msg: ToClient,
    },
    /// The round's sum is out.
    Done(Unmasked),
    /// The round cannot finish; nothing of it is revealed.
    Aborted {
        /// Why, naming the site or stage.
        reason: String,
    },
}

/// The unmasked result of a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Unmasked {
    /// Sites whose input is in the sum.
    pub survivors: Vec<String>,
    /// Sites that shared keys but whose input did not arrive (their masks were removed).
    pub dropped: Vec<String>,
    /// The sum of the survivors' weights, in samples (`Σ w_i · max_weight`).
    pub total_weight: f64,
    /// The weighted mean of the survivors' updates, `Σ w_i x_i / Σ w_i`.
    pub mean: Vec<f32>,
    /// Under DP-FedAvg with adaptive clipping ([`crate::secagg::DpClip`]): how many of the
    /// survivors' updates were within `C` (the indicator's mean times the survivors).
    pub unclipped: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Keys,
    Shares,
    Inputs,
    Unmask,
    Done,
}

/// The aggregator of one SecAgg+ round: it routes keys and encrypted shares between the
/// sites, sums their masked inputs as they arrive (holding one running sum, never an
/// input), and removes the masks from the shares the survivors return.
#[derive(Debug)]
pub struct SecAggAggregator {
    context: String,
    params: Params,
    participants: Vec<String>,
    hoods: BTreeMap<String, Vec<String>>,
    stage: Stage,
    stage_timeout: Duration,
    deadline: Option<Time>,
    len: usize,
    /// U1: advertised keys.
    keys: BTreeMap<String, PublicKeys>,
    /// U2: encrypted shares, by sender then receiver.
    shares: BTreeMap<String, BTreeMap<String, serde_bytes::ByteBuf>>,
    /// U3: sites whose masked input is in `sum`.
    inputs: BTreeSet<String>,
    sum: Vec<u32>,
    /// Sites asked to unmask, and those that answered.
    asked: BTreeSet<String>,
    answered: BTreeSet<String>,
    b_shares: BTreeMap<String, Vec<ShareOf>>,
    s_shares: BTreeMap<String, Vec<ShareOf>>,
    /// Whose self-mask seed and whose mask secret were rebuilt (never both for one site).
    rebuilt_b: BTreeSet<String>,
    rebuilt_s: BTreeSet<String>,
    out: VecDeque<AggOutput>,
}

impl SecAggAggregator {
    /// A round among `participants` (sorted and deduplicated here) over updates of `len`
    /// values, bound to `context`, with the ring drawn from `graph_seed`. It sends
    /// [`ToClient::Setup`] to everyone at once.
    pub fn new(
        params: Params,
        participants: &[String],
        context: impl Into<String>,
        len: usize,
        graph_seed: u64,
        stage_timeout: Duration,
        now: Time,
    ) -> Result<Self, SecAggError> {
        let mut participants = participants.to_vec();
        participants.sort();
        participants.dedup();
        let k = usize::from(params.num_shares);
        if participants.len() < 2 || k > participants.len() || usize::from(params.threshold) > k {
            return Err(protocol(format!(
                "{}-of-{k} shares among {} sites",
                params.threshold,
                participants.len()
            )));
        }
        let context = context.into();
        let hoods = neighbourhoods(&participants, k, graph_seed);
        // The within-C indicator rides as one more value.
        let len = len + usize::from(params.dp.is_some_and(|d| d.count_unclipped));
        let mut a = SecAggAggregator {
            context: context.clone(),
            params,
            participants: participants.clone(),
            hoods,
            stage: Stage::Keys,
            stage_timeout,
            deadline: Some(now + stage_timeout),
            len,
            keys: BTreeMap::new(),
            shares: BTreeMap::new(),
            inputs: BTreeSet::new(),
            sum: Vec::new(),
            asked: BTreeSet::new(),
            answered: BTreeSet::new(),
            b_shares: BTreeMap::new(),
            s_shares: BTreeMap::new(),
            rebuilt_b: BTreeSet::new(),
            rebuilt_s: BTreeSet::new(),
            out: VecDeque::new(),
        };
        for p in &participants {
            a.out.push_back(AggOutput::Send {
                to: p.clone(),
                msg: ToClient::Setup {
                    context: context.clone(),
                    participants: participants.clone(),
                    graph_seed,
                    params,
                },
            });
        }
        Ok(a)
    }

    /// The next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<AggOutput> {
        self.out.pop_front()
    }

    /// When the driver must call [`SecAggAggregator::handle_timeout`]; none while the
    /// masked inputs come in (the workflow closes that stage with
    /// [`SecAggAggregator::close_inputs`]).
    pub fn poll_timeout(&self) -> Option<Time> {
        self.deadline
    }

    /// Whether the round is over (done or aborted).
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Whether masked inputs are being taken.
    pub fn taking_inputs(&self) -> bool {
        self.stage == Stage::Inputs
    }

    /// The sites a masked input is expected from (U2): those that shared keys.
    pub fn expected_inputs(&self) -> BTreeSet<String> {
        self.shares.keys().cloned().collect()
    }

    /// Whether `site` is one of the round's participants.
    pub fn is_participant(&self, site: &str) -> bool {
        self.participants.iter().any(|p| p == site)
    }

    /// Whether a masked input is expected from `site` (it shared its keys).
    pub fn expects_input(&self, site: &str) -> bool {
        self.shares.contains_key(site)
    }

    /// The sites whose masked input is in the sum so far.
    pub fn inputs(&self) -> &BTreeSet<String> {
        &self.inputs
    }

    /// Sites whose self-mask seed, and sites whose mask secret, were rebuilt.
    pub fn rebuilt(&self) -> (&BTreeSet<String>, &BTreeSet<String>) {
        (&self.rebuilt_b, &self.rebuilt_s)
    }

    /// The running sum of masked inputs: all the aggregator ever holds of them.
    pub fn masked_sum(&self) -> &[u32] {
        &self.sum
    }

    fn k(&self) -> usize {
        usize::from(self.params.threshold)
    }

    fn abort(&mut self, reason: String) {
        self.stage = Stage::Done;
        self.deadline = None;
        self.sum = Vec::new();
        self.out.push_back(AggOutput::Aborted { reason });
    }

    /// Takes a message of site `from`. A message that does not fit the stage or the round is
    /// refused with the reason and changes nothing.
    pub fn handle(&mut self, from: &str, msg: ToAggregator, now: Time) -> Result<(), SecAggError> {
        if !self.hoods.contains_key(from) {
            return Err(protocol(format!("{from} is not in this round")));
        }
        match (self.stage, msg) {
            (Stage::Keys, ToAggregator::Keys(k)) => {
                if self.keys.contains_key(from) {
                    return Err(protocol(format!("{from} sent its keys twice")));
                }
                self.keys.insert(from.to_string(), k);
                if self.keys.len() == self.participants.len() {
                    self.close_keys(now);
                }
                Ok(())
            }
            (Stage::Shares, ToAggregator::Shares { shares }) => {
                if !self.keys.contains_key(from) || self.shares.contains_key(from) {
                    return Err(protocol(format!("shares from {from} out of turn")));
                }
                let hood = &self.hoods[from];
                if let Some(bad) = shares
                    .keys()
                    .find(|to| *to == from || !hood.contains(to) || !self.keys.contains_key(*to))
                {
                    return Err(protocol(format!(
                        "{from} addressed a share to {bad}, not a live neighbour"
                    )));
                }
                self.shares.insert(from.to_string(), shares);
                if self.shares.len() == self.keys.len() {
                    self.close_shares(now);
                }
                Ok(())
            }
            (Stage::Unmask, ToAggregator::Unmask { b, s }) => {
                if !self.asked.contains(from) || self.answered.contains(from) {
                    return Err(protocol(format!("unmask shares from {from} out of turn")));
                }
                let hood = &self.hoods[from];
                let dropped = self.dropped();
                for owner in b.keys() {
                    if !self.inputs.contains(owner) || !hood.contains(owner) {
                        return Err(protocol(format!(
                            "{from} sent a self-mask share of {owner}, not a surviving neighbour"
                        )));
                    }
                }
                for owner in s.keys() {
                    if !dropped.contains(owner) || !hood.contains(owner) {
                        return Err(protocol(format!(
                            "{from} sent a key share of {owner}, not a dropped neighbour"
                        )));
                    }
                }
                if b.values().chain(s.values()).any(|sh| sh.y.len() != 32) {
                    return Err(protocol(format!("{from} sent a share of the wrong size")));
                }
                self.answered.insert(from.to_string());
                for (owner, sh) in b {
                    self.b_shares.entry(owner).or_default().push(sh);
                }
                for (owner, sh) in s {
                    self.s_shares.entry(owner).or_default().push(sh);
                }
                if self.can_unmask() {
                    self.finish();
                }
                Ok(())
            }
            (stage, msg) => Err(protocol(format!(
                "{} from {from} in stage {stage:?}",
                match msg {
                    ToAggregator::Keys(_) => "keys",
                    ToAggregator::Shares { .. } => "shares",
                    ToAggregator::Unmask { .. } => "unmask shares",
                }
            ))),
        }
    }

    /// The stage's deadline passed: go on without the silent sites (or abort the unmasking).
    pub fn handle_timeout(&mut self, now: Time) {
        if self.deadline.is_none_or(|d| now < d) {
            return;
        }
        match self.stage {
            Stage::Keys => self.close_keys(now),
            Stage::Shares => self.close_shares(now),
            Stage::Unmask => {
                let missing = self.missing_shares();
                self.abort(format!(
                    "unmasking timed out: {missing}; answered {:?} of {:?}",
                    self.answered, self.asked
                ));
            }
            Stage::Inputs | Stage::Done => {}
        }
    }

    /// The first site whose neighbourhood has fewer than `t` members in `live`.
    fn short_hood(&self, sites: &BTreeSet<String>, live: &BTreeSet<String>) -> Option<String> {
        sites.iter().find_map(|s| {
            let n = self.hoods[s].iter().filter(|h| live.contains(*h)).count();
            (n < self.k())
                .then(|| format!("{s} has {n} live in its neighbourhood, {} needed", self.k()))
        })
    }

    fn close_keys(&mut self, now: Time) {
        let live: BTreeSet<String> = self.keys.keys().cloned().collect();
        if let Some(reason) = self.short_hood(&live, &live) {
            return self.abort(format!("after key advertisement: {reason}"));
        }
        for site in &live {
            let keys = self.hoods[site]
                .iter()
                .filter(|h| *h != site)
                .filter_map(|h| self.keys.get(h).map(|k| (h.clone(), *k)))
                .collect();
            self.out.push_back(AggOutput::Send {
                to: site.clone(),
                msg: ToClient::NeighbourKeys { keys },
            });
        }
        self.stage = Stage::Shares;
        self.deadline = Some(now + self.stage_timeout);
    }

    fn close_shares(&mut self, _now: Time) {
        let live: BTreeSet<String> = self.shares.keys().cloned().collect();
        if let Some(reason) = self.short_hood(&live, &live) {
            return self.abort(format!("after share exchange: {reason}"));
        }
        for site in &live {
            let shares = self
                .shares
                .iter()
                .filter_map(|(from, to)| to.get(site).map(|c| (from.clone(), c.clone())))
                .collect();
            self.out.push_back(AggOutput::Send {
                to: site.clone(),
                msg: ToClient::Shares { shares },
            });
        }
        self.stage = Stage::Inputs;
        self.deadline = None;
        self.sum = vec![0; self.len + 1];
    }

    /// Adds site `from`'s masked input (`len + 1` words) to the running sum.
    pub fn add_input(&mut self, from: &str, masked: &[u32]) -> Result<(), SecAggError> {
        if self.stage != Stage::Inputs {
            return Err(protocol(format!(
                "a masked input from {from} in stage {:?}",
                self.stage
            )));
        }
        if !self.shares.contains_key(from) || self.inputs.contains(from) {
            return Err(protocol(format!("a masked input from {from} out of turn")));
        }
        if masked.len() != self.sum.len() {
            return Err(protocol(format!(
                "{from}'s masked input has {} values, {} expected",
                masked.len(),
                self.sum.len()
            )));
        }
        for (s, m) in self.sum.iter_mut().zip(masked) {
            *s = s.wrapping_add(*m);
        }
        self.inputs.insert(from.to_string());
        Ok(())
    }

    fn dropped(&self) -> BTreeSet<String> {
        self.shares
            .keys()
            .filter(|s| !self.inputs.contains(*s))
            .cloned()
            .collect()
    }

    /// No more masked inputs: ask the survivors for the shares that remove the masks, or
    /// abort when too few arrived to hide any one of them or to rebuild what is needed.
    pub fn close_inputs(&mut self, now: Time) {
        if self.stage != Stage::Inputs {
            return;
        }
        if self.inputs.len() < self.k().max(2) {
            return self.abort(format!(
                "only {} masked inputs arrived ({:?}); at least {} are needed",
                self.inputs.len(),
                self.inputs,
                self.k().max(2)
            ));
        }
        let dropped = self.dropped();
        let mut owners = self.inputs.clone();
        owners.extend(dropped.iter().cloned());
        if let Some(reason) = self.short_hood(&owners, &self.inputs) {
            return self.abort(format!("after the masked inputs: {reason}"));
        }
        for site in self.inputs.clone() {
            let hood = &self.hoods[&site];
            // Only the neighbours whose shares this site holds: those that shared with it.
            let holds = |n: &String| {
                *n == site || self.shares.get(n).is_some_and(|to| to.contains_key(&site))
            };
            let survivors = hood
                .iter()
                .filter(|n| self.inputs.contains(*n) && holds(n))
                .cloned()
                .collect();
            let gone = hood
                .iter()
                .filter(|n| dropped.contains(*n) && holds(n))
                .cloned()
                .collect();
            self.out.push_back(AggOutput::Send {
                to: site.clone(),
                msg: ToClient::Unmask {
                    survivors,
                    dropped: gone,
                },
            });
            self.asked.insert(site);
        }
        self.stage = Stage::Unmask;
        self.deadline = Some(now + self.stage_timeout);
    }

    fn missing_shares(&self) -> String {
        let t = self.k();
        let have = |m: &BTreeMap<String, Vec<ShareOf>>, s: &String| m.get(s).map_or(0, Vec::len);
        if let Some(s) = self.inputs.iter().find(|s| have(&self.b_shares, s) < t) {
            return format!(
                "{} of {t} shares of {s}'s self-mask seed",
                have(&self.b_shares, s)
            );
        }
        if let Some(s) = self.dropped().iter().find(|s| have(&self.s_shares, s) < t) {
            return format!(
                "{} of {t} shares of dropped {s}'s mask key",
                have(&self.s_shares, s)
            );
        }
        "nothing missing".into()
    }

    fn can_unmask(&self) -> bool {
        let t = self.k();
        self.inputs
            .iter()
            .all(|s| self.b_shares.get(s).is_some_and(|v| v.len() >= t))
            && self
                .dropped()
                .iter()
                .all(|s| self.s_shares.get(s).is_some_and(|v| v.len() >= t))
    }

    fn finish(&mut self) {
        match self.unmask() {
            Ok(u) => {
                self.stage = Stage::Done;
                self.deadline = None;
                self.out.push_back(AggOutput::Done(u));
            }
            Err(e) => self.abort(e.to_string()),
        }
    }

    fn unmask(&mut self) -> Result<Unmasked, SecAggError> {
        let t = self.k();
        let mut sum = std::mem::take(&mut self.sum);
        for site in self.inputs.clone() {
            if self.rebuilt_s.contains(&site) {
                return Err(protocol(format!("{site}'s mask key was rebuilt already")));
            }
            let shares: Vec<_> = self.b_shares[&site].iter().map(to_share).collect();
            let b = sc::combine(&shares, t)?;
            let seed: [u8; 32] = b[..]
                .try_into()
                .map_err(|_| protocol(format!("{site}'s self-mask seed has the wrong size")))?;
            let seed = zeroize::Zeroizing::new(seed);
            self.rebuilt_b.insert(site.clone());
            sc::apply_mask(&seed, Sign::Minus, &mut sum);
        }
        let dropped = self.dropped();
        for site in &dropped {
            if self.rebuilt_b.contains(site) {
                return Err(protocol(format!(
                    "{site}'s self-mask seed was rebuilt already"
                )));
            }
            let shares: Vec<_> = self.s_shares[site].iter().map(to_share).collect();
            let bytes = sc::combine(&shares, t)?;
            let raw: [u8; 32] = bytes[..]
                .try_into()
                .map_err(|_| protocol(format!("{site}'s mask key has the wrong size")))?;
            let secret = AgreementSecret::from_bytes(raw);
            if secret.public() != self.keys[site].s {
                return Err(protocol(format!(
                    "the shares of {site}'s mask key rebuild a key it never advertised"
                )));
            }
            self.rebuilt_s.insert(site.clone());
            // Each survivor that shared with `site` masked with it: take that mask back out.
            for survivor in &self.inputs {
                let paired = self.hoods[site].contains(survivor)
                    && self.shares[site].contains_key(survivor)
                    && self.shares[survivor].contains_key(site);
                if !paired {
                    continue;
                }
                let key = secret.agree(
                    &self.keys[survivor].s,
                    &pair_info(&self.context, "mask", survivor, site),
                )?;
                let undo = match pair_sign(survivor, site) {
                    Sign::Plus => Sign::Minus,
                    Sign::Minus => Sign::Plus,
                };
                sc::apply_mask(&key, undo, &mut sum);
            }
        }
        let m = self.params.modulus_range;
        let n = self.inputs.len();
        let (clip, levels) = (self.params.clipping_range, self.params.quantization_range);
        let q = |v: u32| u64::from(v) & (m - 1);
        let w = dequantize_sum(q(sum[0]), n, clip, levels);
        if w.is_nan() || w <= 0.0 {
            return Err(protocol(format!("the unmasked total weight is {w}")));
        }
        let mut mean: Vec<f64> = sum[1..]
            .iter()
            .map(|v| dequantize_sum(q(*v), n, clip, levels) / w)
            .collect();
        let unclipped = if self.params.dp.is_some_and(|d| d.count_unclipped) {
            mean.pop().map(|f| (f * n as f64).clamp(0.0, n as f64))
        } else {
            None
        };
        Ok(Unmasked {
            survivors: self.inputs.iter().cloned().collect(),
            dropped: dropped.into_iter().collect(),
            total_weight: w * self.params.max_weight,
            mean: mean.into_iter().map(|x| x as f32).collect(),
            unclipped,
        })
    }
}
