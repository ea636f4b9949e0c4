//! Secure aggregation in scatter-and-gather: each training round runs a SecAgg+ round
//! ([`crate::secagg`]) with the server as its aggregator.
//!
//! The key stages travel as [`SECAGG_TASK`] tasks whose [`SECAGG_HEADER`] carries the
//! message (their results carry the answer the same way); stage 3's shares ride on the
//! `train` task itself, and the site answers it with its masked input
//! ([`crate::secagg::masked_model`]) instead of its model. The round's usual rules then
//! decide when no more results are taken (`min_clients`, `wait_time_after_min_received`, the
//! task timeout); the survivors are asked for the unmasking shares, and the new global
//! model is the old one plus the unmasked weighted mean of the updates. A SecAgg abort (too
//! few live neighbours, or unmasking shares missing at the stage deadline) aborts the run,
//! as a round short of `min_clients` does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{DropReason, Event, Output, Phase, ScatterGather};
use crate::aggregators::RoundAgg;
use crate::model::FLModel;
use crate::secagg::{
    AggOutput, SECAGG_HEADER, SECAGG_TASK, SecAggAggregator, SecAggArgs, SecAggError, ToAggregator,
    ToClient, Unmasked, from_headers, take_masked_input, to_header, update_len,
};
use crate::shareable::{ReturnCode, Shareable, Task, TaskId, TaskResult, task_names};
use crate::stored::ModelRef;
use crate::time::Time;

/// A run's secure-aggregation settings and the current round's state.
#[derive(Debug)]
pub(super) struct SagSecAgg {
    args: SecAggArgs,
    /// The run's name in every round's context (the job id).
    run: String,
    /// The run's draws: each round's graph seed and context nonce.
    seed: u64,
    round: Option<SecAggAggregator>,
    /// Key-stage and unmasking tasks sent, by id, with their site.
    tasks: BTreeMap<TaskId, String>,
    /// The inputs are closed and the survivors are unmasking.
    pub(super) unmasking: bool,
    /// Unmasking tasks still out when the round's sum came out: their answers are late.
    late: std::collections::BTreeSet<TaskId>,
}

/// Each round's seeds from the run's.
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    crate::workflows::ccwf::splitmix64(
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.rotate_left(32),
    )
}

impl ScatterGather {
    /// The controller with secure aggregation: the server learns each round's weighted mean
    /// update and nothing of any one site's. `run` names the run in every key derivation
    /// (the job id), `seed` draws the neighbour graphs and must differ between a run and its
    /// resumption. FedAvg, FedProx and DP-FedAvg are supported (the caller checks
    /// [`crate::aggregators::Aggregator::supports_secure`]); under DP-FedAvg the sites clip
    /// and the noise is added once, to the unmasked mean.
    pub fn with_secagg(
        mut self,
        args: SecAggArgs,
        run: impl Into<String>,
        seed: u64,
    ) -> Result<Self, SecAggError> {
        args.resolve(self.clients.len())?;
        self.secagg = Some(SagSecAgg {
            args,
            run: run.into(),
            seed,
            round: None,
            tasks: BTreeMap::new(),
            unmasking: false,
            late: std::collections::BTreeSet::new(),
        });
        Ok(self)
    }

    /// Starts a training round's SecAgg round; the train tasks go out with stage 3.
    pub(super) fn secagg_begin(&mut self, now: Time) {
        let len = update_len(&self.task_model.tensors());
        let (round, next_task, n) = (self.round, self.next_task, self.clients.len());
        let clip = match self.aggregator.secure_clip(&self.global) {
            Ok(c) => c,
            Err(e) => return self.abort_round(format!("secure aggregation: {e}")),
        };
        let Some(sa) = self.secagg.as_mut() else {
            return;
        };
        let started = sa.args.resolve(n).and_then(|mut params| {
            params.dp = clip;
            let nonce = mix(sa.seed, u64::from(round), next_task);
            let context = format!("{}/round-{round}/{nonce:016x}", sa.run);
            SecAggAggregator::new(
                params,
                &self.clients,
                context,
                len,
                mix(sa.seed, u64::from(round), !next_task),
                Duration::from_secs_f64(sa.args.stage_timeout),
                now,
            )
        });
        sa.tasks.clear();
        sa.unmasking = false;
        self.agg = RoundAgg::default();
        match started {
            Ok(a) => {
                sa.round = Some(a);
                self.secagg_pump(now);
            }
            Err(e) => self.abort_round(format!("secure aggregation: {e}")),
        }
    }

    fn abort_round(&mut self, reason: String) {
        self.emit(Event::Aborted {
            round: self.round,
            reason: format!("round {}: {reason}", self.round),
        });
        self.phase = Phase::Done;
        if let Some(sa) = self.secagg.as_mut() {
            sa.round = None;
        }
    }

    /// Turns the SecAgg round's outputs into tasks and events.
    pub(super) fn secagg_pump(&mut self, now: Time) {
        loop {
            let Some(out) = self
                .secagg
                .as_mut()
                .and_then(|sa| sa.round.as_mut())
                .and_then(SecAggAggregator::poll_output)
            else {
                return;
            };
            match out {
                AggOutput::Send { to, msg } => self.secagg_send(to, &msg),
                AggOutput::Done(u) => return self.secagg_done(now, u),
                AggOutput::Aborted { reason } => {
                    return self.abort_round(format!("secure aggregation: {reason}"));
                }
            }
        }
    }

    fn secagg_send(&mut self, to: String, msg: &ToClient) {
        let header = match to_header(msg) {
            Ok(h) => h,
            Err(e) => return self.abort_round(e.to_string()),
        };
        let id = TaskId(self.next_task);
        self.next_task += 1;
        let mut data =
            Shareable::default().with_total_rounds(self.cfg.start_round + self.cfg.num_rounds);
        data.headers.insert(SECAGG_HEADER.to_string(), header);
        let train = matches!(msg, ToClient::Shares { .. });
        let (name, model) = if train {
            data.headers.extend(self.aggregator.task_meta());
            self.asked.insert(to.clone(), id);
            (task_names::TRAIN, self.task_model.clone())
        } else {
            if let Some(sa) = self.secagg.as_mut() {
                sa.tasks.insert(id, to.clone());
            }
            (SECAGG_TASK, ModelRef::from(FLModel::default()))
        };
        let task = Task {
            id,
            name: name.to_string(),
            round: self.round,
            data,
        };
        self.out.push_back(Output::Send { to, task, model });
    }

    /// Whether `result` answers one of this round's key-stage or unmasking tasks.
    pub(super) fn secagg_claims(&self, result: &TaskResult) -> bool {
        self.secagg.as_ref().is_some_and(|sa| {
            sa.late.contains(&result.task_id)
                || (self.phase == Phase::Train && sa.tasks.contains_key(&result.task_id))
        })
    }

    /// Takes the answer to a key-stage or unmasking task.
    pub(super) fn secagg_result(&mut self, now: Time, from: &str, result: TaskResult) {
        let Some(sa) = self.secagg.as_mut() else {
            return;
        };
        if sa.late.remove(&result.task_id) {
            return; // the sum was out before this unmasking answer came
        }
        if sa.tasks.get(&result.task_id).map(String::as_str) != Some(from) {
            let reason = DropReason::NotAsked;
            return self.emit(Event::ResultDropped {
                client: from.to_string(),
                task_id: result.task_id,
                reason,
            });
        }
        sa.tasks.remove(&result.task_id);
        let handled = if result.data.return_code != ReturnCode::Ok {
            Err(result
                .data
                .error_reason()
                .unwrap_or("the site reported an error")
                .to_string())
        } else {
            match from_headers::<ToAggregator>(&result.data.headers) {
                Ok(Some(msg)) => match sa.round.as_mut() {
                    Some(r) => r.handle(from, msg, now).map_err(|e| e.to_string()),
                    None => Err("no secure aggregation round is running".into()),
                },
                Ok(None) => Err("the answer carries no secagg message".into()),
                Err(e) => Err(e.to_string()),
            }
        };
        if let Err(reason) = handled {
            self.emit(Event::ResultExcluded {
                round: self.round,
                client: from.to_string(),
                code: result.data.return_code,
                reason: format!("secure aggregation: {reason}"),
            });
        }
        self.secagg_pump(now);
    }

    /// Adds a train result's masked input to the round's sum, and its metrics (of the model
    /// the site got) to the round's measurements with weight 1: its sample count is secret.
    pub(super) fn secagg_input(&mut self, from: &str, model: &ModelRef) -> Result<f64, String> {
        let Some(round) = self.secagg.as_mut().and_then(|sa| sa.round.as_mut()) else {
            return Err("no secure aggregation round is running".into());
        };
        take_masked_input(round, &mut self.agg, from, model).map(|()| 1.0)
    }

    /// No more masked inputs: the survivors are asked to unmask.
    pub(super) fn secagg_close(&mut self, now: Time) {
        let Some(sa) = self.secagg.as_mut() else {
            return;
        };
        sa.unmasking = true;
        if let Some(r) = sa.round.as_mut() {
            r.close_inputs(now);
        }
        self.asked.clear();
        self.answered.clear();
        self.aggregate_at = None;
        self.secagg_pump(now);
    }

    /// The SecAgg round's deadline, while one runs.
    pub(super) fn secagg_timeout(&self) -> Option<Time> {
        self.secagg
            .as_ref()
            .and_then(|sa| sa.round.as_ref())
            .and_then(SecAggAggregator::poll_timeout)
    }

    /// Passes the time to the SecAgg round.
    pub(super) fn secagg_tick(&mut self, now: Time) {
        if let Some(r) = self.secagg.as_mut().and_then(|sa| sa.round.as_mut()) {
            r.handle_timeout(now);
        }
        self.secagg_pump(now);
    }

    /// Whether a training round is unmasking (its inputs are closed).
    pub(super) fn unmasking(&self) -> bool {
        self.secagg.as_ref().is_some_and(|sa| sa.unmasking)
    }

    fn secagg_done(&mut self, now: Time, u: Unmasked) {
        if let Some(sa) = self.secagg.as_mut() {
            sa.round = None;
            sa.unmasking = false;
            sa.late = std::mem::take(&mut sa.tasks).into_keys().collect();
        }
        let next = self.aggregator.finish_secure(&self.global, &u);
        let mut model = match next {
            Ok(m) => m,
            Err(e) => return self.abort_round(format!("secure aggregation: {e}")),
        };
        model.current_round = Some(self.round);
        model.total_rounds = Some(self.cfg.start_round + self.cfg.num_rounds);
        self.global = ModelRef::Memory(Arc::new(model));
        self.emit(Event::RoundAggregated {
            round: self.round,
            model: self.global.clone(),
            accepted: u.survivors.len(),
            weight: u.total_weight,
        });
        self.next_phase(now);
    }
}
