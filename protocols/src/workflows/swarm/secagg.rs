//! Secure aggregation in swarm: each training epoch's aggregator is a peer, and with
//! [`SwarmClient::with_secagg`] it learns only the weighted mean of the trainers' updates.
//!
//! - **Aggregator.** When it opens its epoch's gathering, it starts a SecAgg+ round
//!   ([`SecAggAggregator`]) among the epoch's expected trainers, so the key stages run while
//!   they train. Its messages travel as [`SwarmMsg::SecAggToClient`], the answers as
//!   [`SwarmMsg::SecAggToAggregator`]. Trainers are granted a submission only once the shares
//!   are out (the round takes inputs), and only those the round still expects.
//! - **Trainer.** It answers the key stages with a [`SecAggClient`] of its own for the epoch
//!   (its randomness drawn from the seed the driver handed in), and on its grant submits its
//!   masked input ([`masked_model`]: its update against the epoch's global model, with its
//!   sample count, quantized and masked) instead of its model. A `Setup` that comes before
//!   the `Learn` of its epoch is kept (a few at most) and taken up with the epoch.
//! - **Closing.** The swarm's own rules close the inputs (every expected trainer in, the
//!   quorum wait, the timeout); fewer than `min_clients` inputs fail the run as without
//!   secure aggregation. The survivors unmask, and the new global model is the old one plus
//!   the unmasked weighted mean update. A trainer that dropped after its keys were shared is
//!   recovered from its neighbours' shares.
//! - **Abort.** A SecAgg+ round that aborts (a site short of live neighbours, too few inputs,
//!   unmasking shares missing at the stage deadline) moves the round to its next attempt,
//!   with the next aggregator, as a dead aggregator does; trainers keep their result and
//!   mask it again for the new round. After `2 ×` the aggregator candidates' attempts the run
//!   fails.
//!
//! The trainers' metrics (those of the global model they received) are averaged with weight
//! 1 each: a trainer's sample count is masked too.

use std::collections::VecDeque;
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::{Cached, Gather, SwarmClient, SwarmMsg};
use crate::aggregate::weight_of;
use crate::aggregators::task_view;
use crate::secagg::{
    AggOutput, SecAggAggregator, SecAggArgs, SecAggClient, SecAggError, ToAggregator, ToClient,
    Unmasked, flat_update, masked_model, take_masked_input, update_len,
};
use crate::stored::ModelRef;
use crate::time::Time;
use crate::workflows::ccwf::{Epoch, ReportEvent};

/// `Setup` messages kept for epochs this client has not reached yet.
const EARLY_SETUPS: usize = 4;

/// A run's secure-aggregation settings and this client's side of it.
pub struct SwarmSecAgg {
    args: SecAggArgs,
    /// The run's name in every round's context (the job id).
    run: String,
    /// This client's randomness: its SecAgg keys as a trainer, the round nonces and graph
    /// seeds as an aggregator.
    rng: ChaCha20Rng,
    /// Trainer: the SecAgg+ client of an epoch.
    client: Option<(Epoch, SecAggClient)>,
    /// Trainer: the masked input made for an epoch, sent again if the grant repeats.
    masked: Option<(Epoch, ModelRef)>,
    /// `Setup`s that came before their epoch: (aggregator, epoch, message).
    early: VecDeque<(String, Epoch, ToClient)>,
}

impl std::fmt::Debug for SwarmSecAgg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwarmSecAgg")
            .field("args", &self.args)
            .field("run", &self.run)
            .field("client", &self.client)
            .field("early", &self.early.len())
            .finish_non_exhaustive()
    }
}

impl SwarmSecAgg {
    pub(super) fn replace_model(&mut self, was: &ModelRef, now: &ModelRef) {
        if let Some((_, m)) = &mut self.masked
            && m.same(was)
        {
            *m = now.clone();
        }
    }
}

/// The start of every context of `epoch`'s rounds in run `run`.
fn context_prefix(run: &str, epoch: Epoch) -> String {
    format!("{run}/round-{}.{}/", epoch.round, epoch.attempt)
}

/// Adds a submitted masked input to `g`'s SecAgg+ round, and its metrics (of the model the
/// trainer received) to the epoch's measurements with weight 1.
pub(super) fn add_input(g: &mut Gather, from: &str, model: &ModelRef) -> Result<(), String> {
    let sa = g
        .secagg
        .as_mut()
        .ok_or("no secure aggregation round is running")?;
    take_masked_input(sa, &mut g.fedavg, from, model)
}

impl SwarmClient {
    /// The client with secure aggregation: each training epoch's aggregator learns only the
    /// weighted mean update. `run` names the run in every key derivation (the job id), and
    /// `seed` is this client's secret randomness (from the OS in a node; every client's
    /// differs). Every client of a run must use the same `args`. FedAvg, FedProx and
    /// DP-FedAvg are supported (the caller checks
    /// [`crate::aggregators::Aggregator::supports_secure`]); under DP-FedAvg the trainers clip
    /// and the aggregator adds the noise once, to the unmasked mean.
    pub fn with_secagg(
        mut self,
        args: SecAggArgs,
        run: impl Into<String>,
        seed: [u8; 32],
    ) -> Result<Self, SecAggError> {
        args.resolve(self.cfg.train_clients.len())?;
        self.secagg = Some(SwarmSecAgg {
            args,
            run: run.into(),
            rng: ChaCha20Rng::from_seed(seed),
            client: None,
            masked: None,
            early: VecDeque::new(),
        });
        Ok(self)
    }

    /// Aggregator: starts the epoch's SecAgg+ round among the trainers it expects.
    pub(super) fn secagg_begin(&mut self, now: Time) {
        let Some(global) = self.global.clone() else {
            return;
        };
        // The trainers' view: the weights, without the algorithm's state.
        let len = task_view(&global).map(|v| update_len(&v.tensors()));
        let clip = self.aggregator.secure_clip(&global);
        let (Some(sa), Some(g)) = (self.secagg.as_mut(), self.gather.as_mut()) else {
            return;
        };
        // Every trainer not known to be down, a pruned one too: it may be back.
        let participants: Vec<String> = self
            .cfg
            .train_clients
            .iter()
            .filter(|c| !self.down.contains(*c))
            .cloned()
            .collect();
        let (nonce, graph_seed) = (sa.rng.next_u64(), sa.rng.next_u64());
        let context = format!("{}{nonce:016x}", context_prefix(&sa.run, g.epoch));
        let (len, clip) = match (len, clip) {
            (Ok(l), Ok(c)) => (l, c),
            (Err(e), _) => return self.abort_run(now, format!("secure aggregation: {e}")),
            (_, Err(e)) => return self.abort_run(now, format!("secure aggregation: {e}")),
        };
        let started = sa.args.resolve(participants.len()).and_then(|mut params| {
            params.dp = clip;
            SecAggAggregator::new(
                params,
                &participants,
                context,
                len,
                graph_seed,
                Duration::from_secs_f64(sa.args.stage_timeout),
                now,
            )
        });
        match started {
            Ok(a) => {
                g.secagg = Some(a);
                self.secagg_pump(now);
            }
            Err(e) => {
                // Too few trainers for the settings: another attempt has no more.
                let reason = format!(
                    "round {}: secure aggregation among {participants:?}: {e}",
                    g.epoch.round
                );
                self.aggregated.insert(g.epoch);
                self.abort_run(now, reason);
            }
        }
    }

    /// Aggregator: carries out what the SecAgg+ round asks for.
    fn secagg_pump(&mut self, now: Time) {
        loop {
            let Some(g) = self.gather.as_mut() else {
                return;
            };
            let epoch = g.epoch;
            let Some(out) = g.secagg.as_mut().and_then(SecAggAggregator::poll_output) else {
                break;
            };
            match out {
                AggOutput::Send { to, msg } => {
                    self.send(&to, SwarmMsg::SecAggToClient { epoch, msg }, None);
                }
                AggOutput::Done(u) => return self.secagg_done(now, u),
                AggOutput::Aborted { reason } => return self.secagg_abort(now, reason),
            }
        }
        // Trainers that were ready while the key stages ran are granted once inputs are taken.
        self.grant_next(now);
    }

    /// Aggregator: passes the time to the SecAgg+ round.
    pub(super) fn secagg_tick(&mut self, now: Time) {
        if let Some(sa) = self.gather.as_mut().and_then(|g| g.secagg.as_mut()) {
            sa.handle_timeout(now);
            self.secagg_pump(now);
        }
    }

    /// Aggregator: a trainer's answer to a key stage or to the unmasking.
    pub(super) fn secagg_to_aggregator(
        &mut self,
        now: Time,
        from: &str,
        epoch: Epoch,
        msg: ToAggregator,
    ) {
        let Some(g) = self.gather.as_mut() else {
            return;
        };
        if g.epoch != epoch {
            return;
        }
        let Some(sa) = g.secagg.as_mut() else {
            return;
        };
        if let Err(e) = sa.handle(from, msg, now) {
            tracing::warn!(peer = from, %epoch, error = %e, "secure aggregation answer refused");
        }
        self.secagg_pump(now);
        self.check_gather(now);
    }

    /// Aggregator: no more masked inputs; the survivors are asked to unmask. Fewer than
    /// `min_clients` inputs fail the run, as without secure aggregation.
    pub(super) fn secagg_close(&mut self, now: Time) {
        let Some(g) = self.gather.as_ref() else {
            return;
        };
        if g.unmasking {
            return;
        }
        let epoch = g.epoch;
        if let Some(reason) = self.short_of_min(g) {
            self.aggregated.insert(epoch);
            return self.abort_run(now, reason);
        }
        let Some(g) = self.gather.as_mut() else {
            return;
        };
        let Some(sa) = g.secagg.as_mut() else {
            return;
        };
        if !sa.taking_inputs() {
            let reason = "the round closed before its key stages ended".to_string();
            return self.secagg_abort(now, reason);
        }
        g.unmasking = true;
        g.granted.clear();
        g.queue.clear();
        sa.close_inputs(now);
        self.aggregated.insert(epoch);
        self.secagg_pump(now);
    }

    /// Aggregator: the sum is unmasked; the epoch ends with the new global model.
    fn secagg_done(&mut self, now: Time, u: Unmasked) {
        let Some(g) = self.gather.take() else {
            return;
        };
        let Some(global) = self.global.clone() else {
            return;
        };
        let next = self.aggregator.finish_secure(&global, &u);
        match next {
            Ok(mut m) => {
                let (survivors, dropped) = (u.survivors, u.dropped);
                self.report(now, ReportEvent::Unmasked { survivors, dropped });
                m.current_round = Some(g.epoch.round);
                let metrics = g.fedavg.metrics();
                let next = Some(ModelRef::from(m));
                self.conclude(now, g.epoch, &g.accepted, metrics, next, u.total_weight);
            }
            Err(e) => {
                let reason = format!("round {}: secure aggregation: {e}", g.epoch.round);
                self.abort_run(now, reason);
            }
        }
    }

    /// Aggregator: the SecAgg+ round aborted; the round goes to its next attempt.
    fn secagg_abort(&mut self, now: Time, reason: String) {
        let Some(g) = self.gather.take() else {
            return;
        };
        self.aggregated.insert(g.epoch);
        let reason = format!("round {}: secure aggregation: {reason}", g.epoch.round);
        let tries = 2 * u32::try_from(self.cfg.aggr_clients.len()).unwrap_or(u32::MAX);
        if g.epoch.attempt.saturating_add(1) >= tries {
            return self.abort_run(now, format!("{reason} (after {tries} attempts)"));
        }
        let next = self.next_attempt();
        let successor = self.cfg.aggregator(next).to_string();
        self.report(
            now,
            ReportEvent::Retried {
                reason,
                next: successor,
            },
        );
        let Some(global) = self.global.clone() else {
            return;
        };
        let (members, best, v) = (self.members.clone(), self.best.clone(), self.validate_only);
        let learn = SwarmMsg::Learn {
            epoch: next,
            members: members.clone(),
            best: best.clone(),
            validate_only: v,
        };
        for c in self.cfg.clients.clone() {
            if c != self.me {
                self.send(&c, learn.clone(), Some(global.clone()));
            }
        }
        self.adopt(now, next, global, members, best, v);
    }

    /// Trainer: a message of an epoch's SecAgg+ round from its aggregator.
    pub(super) fn secagg_to_client(&mut self, now: Time, from: &str, epoch: Epoch, msg: ToClient) {
        if self.cfg.aggregator(epoch) != from || !self.is_trainer() {
            return;
        }
        let Some(sa) = self.secagg.as_mut() else {
            return;
        };
        if !self.started || epoch > self.epoch {
            if matches!(msg, ToClient::Setup { .. }) {
                if sa.early.len() == EARLY_SETUPS {
                    sa.early.pop_front();
                }
                sa.early.push_back((from.to_string(), epoch, msg));
            }
            return;
        }
        if epoch < self.epoch || self.validate_only {
            return;
        }
        if let ToClient::Setup { context, .. } = &msg {
            if !context.starts_with(&context_prefix(&sa.run, epoch)) {
                tracing::warn!(peer = from, %epoch, context, "secure aggregation setup for another round refused");
                return;
            }
            if sa.client.as_ref().is_some_and(|(e, _)| *e == epoch) {
                return; // a duplicate
            }
            let mut seed = [0u8; 32];
            sa.rng.fill_bytes(&mut seed);
            sa.client = Some((epoch, SecAggClient::new(&self.me, context.clone(), seed)));
        }
        let Some((e, c)) = sa.client.as_mut() else {
            return;
        };
        if *e != epoch {
            return;
        }
        match c.handle(&msg) {
            Ok(Some(reply)) => {
                let msg = SwarmMsg::SecAggToAggregator { epoch, msg: reply };
                self.send(from, msg, None);
            }
            Ok(None) => {
                tracing::info!(aggregator = from, %epoch, "secure aggregation: the neighbours' shares are in");
                // The shares are in: a trainer already granted sends at once.
                if self.ready_at.is_some() && !self.granted {
                    self.ready(now);
                }
            }
            Err(e) => {
                tracing::warn!(peer = from, %epoch, error = %e, "secure aggregation message refused");
            }
        }
    }

    /// Trainer: takes up the `Setup`s that came early for the epoch just adopted.
    pub(super) fn take_up_early_secagg(&mut self, now: Time) {
        let epoch = self.epoch;
        let Some(sa) = self.secagg.as_mut() else {
            return;
        };
        let early = std::mem::take(&mut sa.early);
        for (from, e, msg) in early {
            if e == epoch {
                self.secagg_to_client(now, &from, e, msg);
            } else if e > epoch
                && let Some(sa) = self.secagg.as_mut()
            {
                sa.early.push_back((from, e, msg));
            }
        }
    }

    /// Trainer: the masked input of `cached` for `epoch`, or none while this client does not
    /// hold its neighbours' shares yet.
    pub(super) fn secagg_masked(
        &mut self,
        epoch: Epoch,
        cached: &Cached,
    ) -> Option<Result<ModelRef, String>> {
        let global = self.global.clone()?;
        let sa = self.secagg.as_mut()?;
        if let Some((e, m)) = &sa.masked
            && *e == epoch
        {
            return Some(Ok(m.clone()));
        }
        let (e, c) = sa.client.as_mut()?;
        if *e != epoch || !c.ready() {
            return None;
        }
        let masked = (|| -> Result<ModelRef, String> {
            let local = cached
                .model
                .as_ref()
                .ok_or("the result carries no model")?
                .load()
                .map_err(|e| e.to_string())?;
            let g = task_view(&global)
                .map_err(|e| e.to_string())?
                .load()
                .map_err(|e| e.to_string())?;
            let update = flat_update(&g, &local).map_err(|e| e.to_string())?;
            drop(g);
            let words = c
                .mask(update.into_iter(), weight_of(&local))
                .map_err(|e| e.to_string())?;
            Ok(ModelRef::from(masked_model(&words, local.metrics.clone())))
        })();
        if let Ok(m) = &masked {
            sa.masked = Some((epoch, m.clone()));
        }
        Some(masked.map_err(|e| format!("secure aggregation: {e}")))
    }
}
