//! A site's side of secure aggregation, shared by the site process and the simulator: it
//! answers the key-stage and unmasking tasks with the site's [`SecAggClient`], and turns a
//! `train` result into the site's masked input (its update against the model it trained
//! from, quantized and masked), so that only the sum of the sites' updates is ever revealed.
//! The site's own privacy filters run on its result before the update is taken.
//!
//! In a swarm the site's workflow state machine masks its update itself
//! (`flare_protocols::workflows::swarm::secagg`); the node hands it [`os_seed`].

use std::sync::{Arc, Mutex};

use flare_protocols::model::FLModel;
use flare_protocols::secagg::{
    SECAGG_HEADER, SECAGG_TASK, SecAggClient, ToClient, flat_update, from_headers, masked_model,
    to_header,
};
use flare_protocols::shareable::{ReturnCode, Shareable, Task, TaskResult, task_names};
use ring::rand::{SecureRandom, SystemRandom};

/// 32 bytes from the OS: a site's secret randomness for its SecAgg keys and masks.
pub fn os_seed() -> anyhow::Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| anyhow::anyhow!("the OS random source failed"))?;
    Ok(seed)
}

/// One site's SecAgg state for one job: the round in progress, if any.
#[derive(Debug, Default)]
pub struct SiteSecAgg {
    round: Mutex<Option<SecAggClient>>,
}

fn refused(task: &Task, reason: String) -> TaskResult {
    TaskResult {
        task_id: task.id,
        round: task.round,
        data: Shareable::error(ReturnCode::ExecutionException, reason),
    }
}

impl SiteSecAgg {
    /// Runs `task` for `site` of job `job`: a [`SECAGG_TASK`] is answered here, a `train`
    /// task with shares runs `train` (the learner and the site's result filters) and answers
    /// with the masked input, and any other task goes to `train` unchanged.
    pub fn run_task(
        &self,
        site: &str,
        job: &str,
        mut task: Task,
        train: impl FnOnce(Task) -> TaskResult,
    ) -> TaskResult {
        let msg = match from_headers::<ToClient>(&task.data.headers) {
            Ok(m) => m,
            Err(e) => return refused(&task, format!("{site}: {e}")),
        };
        task.data.headers.remove(SECAGG_HEADER);
        let Some(msg) = msg else {
            return train(task);
        };
        if task.name == SECAGG_TASK {
            return self.answer(site, job, &task, &msg);
        }
        if task.name != task_names::TRAIN || !matches!(msg, ToClient::Shares { .. }) {
            return refused(
                &task,
                format!("{site}: a secagg message on a {} task", task.name),
            );
        }
        if let Err(e) = self.with_round(|c| c.handle(&msg)) {
            return refused(&task, format!("{site}: {e}"));
        }
        let Some(global) = task.data.model.clone() else {
            return refused(&task, format!("{site}: the train task carries no model"));
        };
        let (id, round) = (task.id, task.round);
        let result = train(task);
        if result.data.return_code != ReturnCode::Ok {
            return result;
        }
        match self.mask(&global, &result) {
            Ok(model) => TaskResult {
                task_id: id,
                round,
                data: Shareable::with_model(model),
            },
            Err(e) => TaskResult {
                task_id: id,
                round,
                data: Shareable::error(ReturnCode::ExecutionException, format!("{site}: {e}")),
            },
        }
    }

    fn with_round<T>(
        &self,
        f: impl FnOnce(&mut SecAggClient) -> Result<T, flare_protocols::secagg::SecAggError>,
    ) -> anyhow::Result<T> {
        let mut g = self
            .round
            .lock()
            .map_err(|_| anyhow::anyhow!("secure aggregation state poisoned"))?;
        let c = g
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no secure aggregation round was set up here"))?;
        Ok(f(c)?)
    }

    fn answer(&self, site: &str, job: &str, task: &Task, msg: &ToClient) -> TaskResult {
        let reply = (|| -> anyhow::Result<_> {
            if let ToClient::Setup { context, .. } = msg {
                // A new round: its context must name this job and round.
                let prefix = format!("{job}/round-{}/", task.round);
                anyhow::ensure!(
                    context.starts_with(&prefix),
                    "setup for {context:?}, not for {prefix}…"
                );
                let c = SecAggClient::new(site, context.clone(), os_seed()?);
                *self
                    .round
                    .lock()
                    .map_err(|_| anyhow::anyhow!("secure aggregation state poisoned"))? = Some(c);
            }
            let reply = self.with_round(|c| c.handle(msg))?;
            if matches!(msg, ToClient::Unmask { .. }) {
                if let Ok(mut g) = self.round.lock() {
                    *g = None;
                }
            }
            reply.ok_or_else(|| anyhow::anyhow!("the message has no answer"))
        })();
        match reply.and_then(|r| Ok(to_header(&r)?)) {
            Ok(h) => {
                let mut data = Shareable::default();
                data.headers.insert(SECAGG_HEADER.to_string(), h);
                TaskResult {
                    task_id: task.id,
                    round: task.round,
                    data,
                }
            }
            Err(e) => refused(task, format!("{site}: secure aggregation: {e:#}")),
        }
    }

    /// The masked input for `result`, trained from `global`.
    fn mask(&self, global: &Arc<FLModel>, result: &TaskResult) -> anyhow::Result<FLModel> {
        let local = result
            .data
            .model
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the result carries no model"))?;
        let update = flat_update(global, local)?;
        let samples = flare_protocols::aggregate::weight_of(local);
        let masked = self.with_round(|c| c.mask(update.into_iter(), samples))?;
        Ok(masked_model(&masked, local.metrics.clone()))
    }
}
