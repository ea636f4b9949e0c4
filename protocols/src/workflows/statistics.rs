//! Federated statistics (FLARE's `StatisticsController`) as a sans-IO state machine; the
//! method, the cleansers and the output layout are in [`crate::stats`].
//!
//! Two passes, each a `fed_stats` task to every site with the `fed_stats_task` header naming
//! the pass (`fed_stats_1st_statistics`, then `fed_stats_2nd_statistics` with the global
//! means and histogram ranges the first made). FLARE's optional handshake task
//! `fed_stats_pre_run` is not sent (FLARE's `enable_pre_run_task = False`): a Flare site
//! reads the config from the first pass's task and needs no preparation. When the job asks
//! for nothing of the second pass (var, stddev, histogram), the run ends after the first.
//!
//! A pass ends when every site asked has answered; or `wait_time_after_min_received` after
//! the `min_clients`-th accepted answer; or `result_wait_timeout` after the pass began
//! (FLARE waits for `min_clients` without limit and then up to `result_wait_timeout` for the
//! rest; a sans-IO machine needs a deadline, so here it bounds the whole pass). With fewer
//! than `min_clients` accepted answers, or as soon as too few sites are left to reach it, the
//! run aborts.
//!
//! Rules:
//! - a result of an earlier pass (late), a duplicate, or one from a site that was not asked
//!   is dropped;
//! - an error result, or one that cannot be read or fails the checks of
//!   [`crate::stats::merge`], excludes the site with the reason; FLARE aborts the job on most
//!   site errors, Flare goes on without the site while `min_clients` can still be met;
//! - only the sites accepted in the first pass are asked in the second, and only the sites
//!   accepted in both appear in the output, global column included: a site that drops out
//!   between the passes is left out entirely, and the global statistics (variance included,
//!   see [`crate::stats::merge`]) are exactly those of the remaining sites' data.
//!
//! The driver calls [`StatisticsController::start`], feeds
//! [`StatisticsController::handle_result`] and [`StatisticsController::handle_timeout`] with
//! the current [`Time`], and drains [`StatisticsController::poll_output`];
//! [`StatisticsController::poll_timeout`] says when to call back. The outcome is
//! [`Event::Finished`]'s [`StatsOutput`], what FLARE's `JsonStatsFileWriter` writes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

pub use super::scatter_gather::DropReason;
use crate::shareable::{ReturnCode, Task, TaskId, TaskResult};
use crate::stats::merge::{self, StatsResult};
use crate::stats::wire::{self, FeatureMap, FirstPass, SecondPass, SecondRequest};
use crate::stats::{GLOBAL, Pass, StatsConfig, StatsOutput};
use crate::time::Time;

/// The most decimals the output may be rounded to.
pub const MAX_PRECISION: u32 = 15;

/// Settings of a statistics run (FLARE's `StatisticsController` arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct StatsControllerConfig {
    /// The statistics to compute (FLARE's `statistic_configs`).
    pub statistic_configs: StatsConfig,
    /// Accepted answers each pass needs; `None` (FLARE's default) means every site.
    pub min_clients: Option<usize>,
    /// How long a pass waits for more answers once `min_clients` are in (FLARE: 1 s).
    pub wait_time_after_min_received: Duration,
    /// How long a pass waits in all (FLARE: 10 s).
    pub result_wait_timeout: Duration,
    /// Decimals of the output (FLARE: 4).
    pub precision: u32,
}

impl StatsControllerConfig {
    /// `statistic_configs` with FLARE's defaults for the rest.
    pub fn new(statistic_configs: StatsConfig) -> Self {
        StatsControllerConfig {
            statistic_configs,
            min_clients: None,
            wait_time_after_min_received: Duration::from_secs(1),
            result_wait_timeout: Duration::from_secs(10),
            precision: 4,
        }
    }
}

/// Why a statistics run's settings were refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StatsControllerError {
    /// `min_clients` is zero or larger than the number of sites.
    #[error("min_clients is {min} but {available} sites take part")]
    MinClients {
        /// The configured minimum.
        min: usize,
        /// How many sites take part.
        available: usize,
    },
    /// `result_wait_timeout` is zero.
    #[error("result_wait_timeout must be positive")]
    NoTimeout,
    /// The same site appears twice.
    #[error("site {0:?} is listed twice")]
    DuplicateClient(String),
    /// A site is called `Global`, the output's global column.
    #[error("no site may be called {GLOBAL:?}: the output's global column has that name")]
    ReservedName,
    /// `precision` is above [`MAX_PRECISION`].
    #[error("precision {0} is above {MAX_PRECISION}")]
    Precision(u32),
}

/// Something the driver should log, show or persist.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A pass began.
    PassStarted {
        /// The pass.
        pass: Pass,
        /// How many sites got its task.
        clients: usize,
    },
    /// A site's answer was accepted.
    ResultAccepted {
        /// The pass.
        pass: Pass,
        /// Who sent it.
        client: String,
        /// Sites that have answered this pass so far (accepted or not).
        answered: usize,
        /// Sites asked this pass.
        asked: usize,
    },
    /// A result was dropped unread.
    ResultDropped {
        /// Who sent it.
        client: String,
        /// The task it named.
        task_id: TaskId,
        /// Why.
        reason: DropReason,
    },
    /// A site is left out of the run: it reported an error or sent an answer that cannot be
    /// used.
    SiteExcluded {
        /// The pass.
        pass: Pass,
        /// The site.
        client: String,
        /// Its return code.
        code: ReturnCode,
        /// Why.
        reason: String,
    },
    /// These sites had not answered when the pass ended, and are left out.
    NoAnswer {
        /// The pass.
        pass: Pass,
        /// The silent sites.
        clients: Vec<String>,
    },
    /// The run finished.
    Finished {
        /// The statistics in FLARE's JSON layout.
        output: StatsOutput,
        /// The sites whose data they cover.
        sites: Vec<String>,
    },
    /// The run stopped without a result.
    Aborted {
        /// The pass it stopped in.
        pass: Pass,
        /// Why.
        reason: String,
    },
}

/// What the controller asks the driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Deliver `task` to site `to` (it carries no model).
    Send {
        /// Site name.
        to: String,
        /// The `fed_stats` task.
        task: Task,
    },
    /// Report an event.
    Event(Event),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Running(Pass),
    Done,
}

/// The statistics controller.
#[derive(Debug)]
pub struct StatisticsController {
    cfg: StatsControllerConfig,
    clients: Vec<String>,
    min_clients: usize,
    phase: Phase,
    next_task: u64,
    /// Task sent to each site in the current pass.
    asked: BTreeMap<String, TaskId>,
    answered: BTreeSet<String>,
    /// Accepted first-pass answers.
    firsts: BTreeMap<String, FeatureMap<FirstPass>>,
    /// Accepted second-pass answers.
    seconds: BTreeMap<String, FeatureMap<SecondPass>>,
    /// What the second pass's tasks carry.
    request: Option<SecondRequest>,
    /// When the current pass gives up on silent sites.
    deadline: Time,
    /// When to close the pass now that `min_clients` answers are in.
    close_at: Option<Time>,
    result: Option<StatsResult>,
    out: VecDeque<Output>,
}

impl StatisticsController {
    /// A controller for `clients`.
    pub fn new(
        cfg: StatsControllerConfig,
        clients: Vec<String>,
    ) -> Result<Self, StatsControllerError> {
        let min_clients = cfg.min_clients.unwrap_or(clients.len());
        if min_clients == 0 || min_clients > clients.len() {
            return Err(StatsControllerError::MinClients {
                min: min_clients,
                available: clients.len(),
            });
        }
        if cfg.result_wait_timeout.is_zero() {
            return Err(StatsControllerError::NoTimeout);
        }
        if cfg.precision > MAX_PRECISION {
            return Err(StatsControllerError::Precision(cfg.precision));
        }
        let mut seen = BTreeSet::new();
        if let Some(dup) = clients.iter().find(|c| !seen.insert(c.as_str())) {
            return Err(StatsControllerError::DuplicateClient(dup.clone()));
        }
        if seen.contains(GLOBAL) {
            return Err(StatsControllerError::ReservedName);
        }
        Ok(StatisticsController {
            cfg,
            clients,
            min_clients,
            phase: Phase::Idle,
            next_task: 0,
            asked: BTreeMap::new(),
            answered: BTreeSet::new(),
            firsts: BTreeMap::new(),
            seconds: BTreeMap::new(),
            request: None,
            deadline: Time::ZERO,
            close_at: None,
            result: None,
            out: VecDeque::new(),
        })
    }

    /// Sends the first pass's tasks.
    pub fn start(&mut self, now: Time) {
        if self.phase != Phase::Idle {
            return;
        }
        let config = self.cfg.statistic_configs.clone();
        let sites = self.clients.clone();
        self.begin(now, Pass::First, sites, &config);
    }

    /// Whether the run has finished or aborted.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The pass under way, if any.
    pub fn pass(&self) -> Option<Pass> {
        match self.phase {
            Phase::Running(p) => Some(p),
            _ => None,
        }
    }

    /// The merged statistics in full precision, once finished.
    pub fn result(&self) -> Option<&StatsResult> {
        self.result.as_ref()
    }

    /// What the second pass's tasks carry, once the first pass is merged.
    pub fn second_request(&self) -> Option<&SecondRequest> {
        self.request.as_ref()
    }

    /// The next thing for the driver to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When the driver must call [`StatisticsController::handle_timeout`] next, if ever.
    pub fn poll_timeout(&self) -> Option<Time> {
        match self.phase {
            Phase::Running(_) => Some(match self.close_at {
                Some(at) => at.min(self.deadline),
                None => self.deadline,
            }),
            Phase::Idle | Phase::Done => None,
        }
    }

    fn emit(&mut self, e: Event) {
        self.out.push_back(Output::Event(e));
    }

    fn abort(&mut self, pass: Pass, reason: String) {
        self.emit(Event::Aborted { pass, reason });
        self.phase = Phase::Done;
        self.asked.clear();
    }

    fn begin<T: serde::Serialize>(
        &mut self,
        now: Time,
        pass: Pass,
        sites: Vec<String>,
        payload: &T,
    ) {
        self.phase = Phase::Running(pass);
        self.asked.clear();
        self.answered.clear();
        self.close_at = None;
        self.deadline = now + self.cfg.result_wait_timeout;
        // One encoding for every site: the payload is the same.
        let template = match wire::task(TaskId(0), pass, payload) {
            Ok(t) => t,
            Err(e) => return self.abort(pass, format!("cannot build the {pass} task: {e}")),
        };
        self.emit(Event::PassStarted {
            pass,
            clients: sites.len(),
        });
        for site in sites {
            let id = TaskId(self.next_task);
            self.next_task += 1;
            self.asked.insert(site.clone(), id);
            let mut task = template.clone();
            task.id = id;
            self.out.push_back(Output::Send { to: site, task });
        }
    }

    fn accepted(&self, pass: Pass) -> usize {
        match pass {
            Pass::First => self.firsts.len(),
            Pass::Second => self.seconds.len(),
        }
    }

    /// Takes a site's answer.
    pub fn handle_result(&mut self, now: Time, from: &str, result: TaskResult) {
        let Phase::Running(pass) = self.phase else {
            return self.drop_result(from, result.task_id, DropReason::Late);
        };
        let reason = match self.asked.get(from).copied() {
            _ if result.round < pass.round() => Some(DropReason::Late),
            None => Some(DropReason::NotAsked),
            Some(id) if id != result.task_id || result.round != pass.round() => {
                Some(DropReason::Late)
            }
            Some(_) if self.answered.contains(from) => Some(DropReason::Duplicate),
            Some(_) => None,
        };
        if let Some(reason) = reason {
            return self.drop_result(from, result.task_id, reason);
        }
        self.answered.insert(from.to_string());
        let code = result.data.return_code;
        match self.read(pass, from, &result) {
            Ok(()) => {
                self.emit(Event::ResultAccepted {
                    pass,
                    client: from.to_string(),
                    answered: self.answered.len(),
                    asked: self.asked.len(),
                });
                if self.accepted(pass) == self.min_clients {
                    self.close_at = Some(now + self.cfg.wait_time_after_min_received);
                }
            }
            Err(reason) => self.emit(Event::SiteExcluded {
                pass,
                client: from.to_string(),
                code,
                reason,
            }),
        }
        let outstanding = self.asked.len() - self.answered.len();
        if outstanding == 0
            || self.close_at.is_some_and(|at| at <= now)
            || self.accepted(pass) + outstanding < self.min_clients
        {
            self.close(now);
        }
    }

    fn drop_result(&mut self, from: &str, task_id: TaskId, reason: DropReason) {
        self.emit(Event::ResultDropped {
            client: from.to_string(),
            task_id,
            reason,
        });
    }

    /// Reads and checks an answer; on success it is kept for the merge.
    fn read(&mut self, pass: Pass, from: &str, result: &TaskResult) -> Result<(), String> {
        if result.data.return_code != ReturnCode::Ok {
            return Err(result
                .data
                .error_reason()
                .unwrap_or("the site reported an error")
                .chars()
                .take(1024)
                .collect());
        }
        match pass {
            Pass::First => {
                let stats: FeatureMap<FirstPass> =
                    wire::from_shareable(&result.data, pass).map_err(|e| e.to_string())?;
                merge::check_first(&self.cfg.statistic_configs, &stats)
                    .map_err(|e| e.to_string())?;
                self.firsts.insert(from.to_string(), stats);
            }
            Pass::Second => {
                let stats: FeatureMap<SecondPass> =
                    wire::from_shareable(&result.data, pass).map_err(|e| e.to_string())?;
                let (Some(req), Some(first)) = (&self.request, self.firsts.get(from)) else {
                    return Err("no first-pass answer to go with it".into());
                };
                merge::check_second(req, first, &stats).map_err(|e| e.to_string())?;
                self.seconds.insert(from.to_string(), stats);
            }
        }
        Ok(())
    }

    /// Call when [`StatisticsController::poll_timeout`]'s time has come.
    pub fn handle_timeout(&mut self, now: Time) {
        if !matches!(self.phase, Phase::Running(_)) {
            return;
        }
        if now >= self.deadline || self.close_at.is_some_and(|at| at <= now) {
            self.close(now);
        }
    }

    fn close(&mut self, now: Time) {
        let Phase::Running(pass) = self.phase else {
            return;
        };
        let silent: Vec<String> = self
            .asked
            .keys()
            .filter(|c| !self.answered.contains(*c))
            .cloned()
            .collect();
        if !silent.is_empty() {
            self.emit(Event::NoAnswer {
                pass,
                clients: silent,
            });
        }
        let accepted = self.accepted(pass);
        if accepted < self.min_clients {
            return self.abort(
                pass,
                format!(
                    "{pass}: {accepted} accepted answers, min_clients is {}",
                    self.min_clients
                ),
            );
        }
        let config = &self.cfg.statistic_configs;
        match pass {
            Pass::First if config.needs_second_pass() => {
                let req = merge::second_request(config, &self.firsts);
                let sites: Vec<String> = self.firsts.keys().cloned().collect();
                self.request = Some(req.clone());
                self.begin(now, Pass::Second, sites, &req);
            }
            Pass::First => {
                let result = merge::combine(&self.firsts, None);
                self.finish(result);
            }
            Pass::Second => {
                let seconds = &self.seconds;
                self.firsts.retain(|site, _| seconds.contains_key(site));
                let req = self.request.clone().unwrap_or_default();
                let result = merge::combine(&self.firsts, Some((&req, &self.seconds)));
                self.finish(result);
            }
        }
    }

    fn finish(&mut self, result: StatsResult) {
        let output = StatsOutput::new(&self.cfg.statistic_configs, &result, self.cfg.precision);
        let sites = result.sites.keys().cloned().collect();
        self.result = Some(result);
        self.phase = Phase::Done;
        self.asked.clear();
        self.emit(Event::Finished { output, sites });
    }
}
