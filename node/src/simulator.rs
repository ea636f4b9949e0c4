//! The simulator (`flare-node simulate`): the server's controller and every client in one
//! process, over an in-memory transport, driving the same sans-IO state machine as the node.
//!
//! One thread runs the controller; `threads` workers run client tasks. Tasks wait in a bounded
//! queue and results come back over a rendezvous channel, so at most `threads + 1` trained
//! models exist at once however many clients there are, and the global model is shared with
//! every task rather than copied.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flare_protocols::aggregators::Aggregator;
use flare_protocols::shareable::{ReturnCode, Shareable, Task, TaskId, TaskResult, task_names};
use flare_protocols::stored::ModelRef;
use flare_protocols::time::Time;
use flare_protocols::workflows::scatter_gather::{Event, Output, ScatterGather};
use flare_protocols::workflows::statistics::{self, StatisticsController};
use indicatif::{ProgressBar, ProgressStyle};

use flare_protocols::workflows::ccwf::{
    Action, ClientWorkflow, Input, ModelSlot, Outcome, ReportEvent,
};
use flare_protocols::workflows::cse::{CseClient, CseMsg};
use flare_protocols::workflows::cyclic::{CyclicClient, CyclicMsg};
use flare_protocols::workflows::swarm::{SwarmClient, SwarmMsg};

use crate::filters::{TaskDataOnce, wire_bytes};
use crate::job::{ClientApp, Job, LearnerSite, WorkflowSpec};
use crate::learner::{Learner, execute};

/// How to run a simulation.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The job folder.
    pub job_dir: PathBuf,
    /// Number of simulated clients (`site-1` … `site-N`).
    pub clients: usize,
    /// Where models and metrics go.
    pub workspace: PathBuf,
    /// Worker threads that run client tasks.
    pub threads: usize,
    /// Show a progress bar and per-round lines on stderr.
    pub progress: bool,
}

/// One round as it happened.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RoundReport {
    /// Round number.
    pub round: u32,
    /// Results aggregated.
    pub accepted: usize,
    /// Wall time from the round's start to its aggregation.
    pub seconds: f64,
}

/// What a simulation produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimReport {
    /// Job name.
    pub job: String,
    /// Rounds in order.
    pub rounds: Vec<RoundReport>,
    /// Metrics per global model version (0 = initial, k = after k rounds).
    pub metrics: BTreeMap<u32, BTreeMap<String, f64>>,
    /// Where the final model was written (empty for a statistics job, which has none).
    #[serde(skip_serializing_if = "path_is_empty")]
    pub final_model: PathBuf,
    /// Where the per-round models were written (empty when not saved).
    pub round_models: Vec<PathBuf>,
    /// Where the metrics JSON was written.
    pub metrics_file: PathBuf,
    /// Cross-site evaluation: evaluator → model (a site, or `global`) → metrics; empty when
    /// the job runs none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cross_site: CrossSite,
    /// Cross-site evaluations that could not be done: evaluator → model → why.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cross_site_failed: BTreeMap<String, BTreeMap<String, String>>,
    /// Bytes of the task models sent to the sites (tensor bytes after the server's task data
    /// filters: what the wire carries); in a client-controlled workflow, of the models sent
    /// from site to site (after the sender's task result filters).
    pub model_bytes_to_sites: u64,
    /// Bytes of the result models sent back (after the sites' task result filters).
    pub model_bytes_from_sites: u64,
    /// Total wall time in seconds.
    pub seconds: f64,
    /// A statistics job's outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statistics: Option<StatsReport>,
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// What a statistics job produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatsReport {
    /// The sites whose data the statistics cover.
    pub sites: Vec<String>,
    /// The files written.
    #[serde(flatten)]
    pub files: crate::stats::StatsFiles,
    /// The statistics, in FLARE's JSON layout (as in the file).
    pub output: flare_protocols::stats::StatsOutput,
}

/// Cross-site evaluation metrics: evaluator → model → metric → value.
pub type CrossSite = BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>;

/// The workflow being simulated.
enum Ctrl {
    Sag(Box<ScatterGather>),
    Swarm {
        clients: Vec<SwarmClient>,
        first: String,
        initial: ModelRef,
    },
    Cyclic {
        clients: Vec<CyclicClient>,
    },
    Stats(Box<StatisticsController>),
}

/// What a client-controlled run left behind.
#[derive(Default)]
struct CcwfRun {
    rounds: Vec<RoundReport>,
    metrics: BTreeMap<u32, BTreeMap<String, f64>>,
    round_models: Vec<PathBuf>,
    /// Per client: its own last trained model, the best and the final global model.
    locals: Vec<Option<ModelRef>>,
    bests: Vec<Option<ModelRef>>,
    finals: Vec<Option<ModelRef>>,
    cross_site: CrossSite,
    cross_site_failed: BTreeMap<String, BTreeMap<String, String>>,
    /// The first failure a client reported.
    failure: Option<String>,
    /// Model bytes on the virtual wire, to the sites and back (scatter-and-gather).
    bytes_to_sites: u64,
    bytes_from_sites: u64,
    /// The task the sites' filters are chosen by for models between them (`train`, then
    /// `validate` in the cross-site evaluation).
    filter_task: &'static str,
}

/// Every site's label histogram (`{"site-1": [count of class 0, …], …}`), for the learners
/// that read MNIST; nothing is written when no site has one.
fn write_label_histograms(
    apps: &[&ClientApp],
    names: &[String],
    path: &Path,
) -> anyhow::Result<()> {
    let mut all = BTreeMap::new();
    for (i, (app, name)) in apps.iter().zip(names).enumerate() {
        if let Some(h) = app.label_histogram(i, names.len()) {
            all.insert(name.clone(), h?);
        }
    }
    if all.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_vec_pretty(&crate::data::LabelHistograms(all))?;
    std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))
}

/// A run's seed for the clients' shared draws, from the job's name or id (FNV-1a).
pub fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A client task handed to a worker.
/// A task for a client: its index, the task, and the model it carries (loaded by the worker,
/// so a stored model is read where it is trained, once).
type Work = (usize, Task, Option<ModelRef>);
/// Global models of at least this size are kept in a file between rounds and read by each
/// task (smaller ones stay in memory).
pub const FILE_BACKED_BYTES: u64 = 64 << 20;
/// The file (in the output folder, removed at the end) that holds a large global model.
const GLOBAL_SCRATCH: &str = ".global.safetensors";

/// A worker's answer: client index, and the result or a failure to build the learner.
/// Whether the task held the [`LargeSlot`], which the driver gives back once it has taken
/// the result in.
type Done = (usize, Result<TaskResult, String>, bool);

/// The one slot for a file-backed (large) model in memory, in a worker or in the driver's
/// hands: a worker takes it before it reads the task's model and the driver gives it back
/// once it has folded the result, so a run of a large model holds the aggregate and one
/// model, whatever `--threads` says.
#[derive(Debug, Default)]
struct LargeSlot {
    busy: Mutex<bool>,
    freed: std::sync::Condvar,
}

impl LargeSlot {
    fn take(&self) {
        let Ok(mut busy) = self.busy.lock() else {
            return;
        };
        while *busy {
            busy = match self.freed.wait(busy) {
                Ok(b) => b,
                Err(_) => return,
            };
        }
        *busy = true;
    }

    fn give(&self) {
        if let Ok(mut busy) = self.busy.lock() {
            *busy = false;
        }
        self.freed.notify_one();
    }
}

/// Runs a job to completion and returns its report.
pub fn run(opts: &SimOptions) -> anyhow::Result<SimReport> {
    let started = Instant::now();
    let job = Job::load(&opts.job_dir)?;
    if opts.clients == 0 {
        bail!("-n must be at least 1");
    }
    if opts.clients < job.meta.min_clients {
        bail!(
            "{}: min_clients is {} but only {} clients are simulated",
            opts.job_dir.join("meta.json").display(),
            job.meta.min_clients,
            opts.clients
        );
    }
    let names: Vec<String> = (1..=opts.clients).map(|i| format!("site-{i}")).collect();
    for m in &job.meta.mandatory_clients {
        if !names.contains(m) {
            bail!("mandatory client {m:?} is not among the simulated sites");
        }
    }
    let apps: Vec<&ClientApp> = names
        .iter()
        .map(|n| {
            job.app_for(n)
                .with_context(|| format!("deploy_map deploys no app to {n}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let initial = || job.server.initial_model();
    crate::aggregators::check_clients(
        &opts.job_dir,
        "aggregator",
        &job.server.aggregator,
        opts.clients,
    )?;
    let aggregator = Aggregator::new(job.server.aggregator);
    let mut ctrl = match &job.server.workflow {
        WorkflowSpec::ScatterAndGather => {
            let mut c = ScatterGather::new(job.server.sag.clone(), names.clone(), initial()?)
                .with_context(|| format!("{}: workflow settings", opts.job_dir.display()))?
                .with_aggregator(aggregator.clone())
                .with_context(|| format!("{}: the initial model", opts.job_dir.display()))?;
            if let Some(args) = &job.server.secagg {
                c = c
                    .with_secagg(*args, "simulate_job", crate::roles::instance_id()?)
                    .with_context(|| format!("{}: secure_aggregation", opts.job_dir.display()))?;
            }
            Ctrl::Sag(Box::new(c))
        }
        WorkflowSpec::Swarm(args) => {
            let cfg = args
                .to_config(&names, seed_of(&job.meta.name))
                .with_context(|| format!("{}: swarm settings", opts.job_dir.display()))?;
            let clients = names
                .iter()
                .map(|n| -> anyhow::Result<SwarmClient> {
                    let c = SwarmClient::new(cfg.clone(), n.as_str())?
                        .with_aggregator(aggregator.clone());
                    Ok(match &job.server.secagg {
                        Some(a) => c
                            .with_secagg(*a, "simulate_job", crate::secagg::os_seed()?)
                            .with_context(|| {
                                format!("{}: secure_aggregation", opts.job_dir.display())
                            })?,
                        None => c,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let first = args
                .starting_client
                .clone()
                .unwrap_or_else(|| cfg.aggr_clients[0].clone());
            Ctrl::Swarm {
                clients,
                first,
                initial: ModelRef::from(initial()?),
            }
        }
        WorkflowSpec::Cyclic(args) => {
            let cfg = args
                .to_config(&names, seed_of(&job.meta.name))
                .with_context(|| format!("{}: cyclic settings", opts.job_dir.display()))?;
            let starting = cfg.starting_client.clone().unwrap_or(names[0].clone());
            let initial = ModelRef::from(initial()?);
            let clients = names
                .iter()
                .map(|n| {
                    let init = (*n == starting).then(|| initial.clone());
                    CyclicClient::new(cfg.clone(), n.as_str(), init)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ctrl::Cyclic { clients }
        }
        WorkflowSpec::Statistics(wf) => Ctrl::Stats(Box::new(
            StatisticsController::new(wf.controller.clone(), names.clone())
                .with_context(|| format!("{}: StatisticsController", opts.job_dir.display()))?,
        )),
    };

    let out_dir = opts.workspace.join("server").join("simulate_job");
    let models_dir = out_dir.join("models");
    std::fs::create_dir_all(&models_dir)
        .with_context(|| format!("cannot create {}", models_dir.display()))?;
    write_label_histograms(&apps, &names, &out_dir.join("label_histograms.json"))?;

    let threads = opts.threads.max(1);
    let (work_tx, work_rx) = sync_channel::<Work>(threads);
    let (done_tx, done_rx) = sync_channel::<Done>(0);
    let work_rx = Arc::new(Mutex::new(work_rx));
    let learners: Vec<Mutex<Option<Box<dyn Learner>>>> =
        (0..opts.clients).map(|_| Mutex::new(None)).collect();
    let num_sites = opts.clients;
    let tracking = SimTracking::open(&job, &out_dir, names.len())?;
    let large = LargeSlot::default();
    let secagg: Vec<crate::secagg::SiteSecAgg> =
        (0..opts.clients).map(|_| Default::default()).collect();

    let report = std::thread::scope(|scope| {
        for _ in 0..threads {
            let work_rx = Arc::clone(&work_rx);
            let done_tx = done_tx.clone();
            let learners = &learners;
            let sites = Sites {
                apps: &apps,
                names: &names,
                workspace: &opts.workspace,
                num_sites,
                tracking: &tracking,
                secagg: &secagg,
            };
            let large = &large;
            scope.spawn(move || worker(&work_rx, &done_tx, learners, sites, large));
        }
        drop(done_tx);
        let driver = Driver {
            opts,
            job: &job,
            names: &names,
            started,
            models_dir: &models_dir,
            out_dir: &out_dir,
            large: &large,
        };
        let r = match &mut ctrl {
            Ctrl::Sag(c) => driver.drive(c, &work_tx, &done_rx),
            Ctrl::Swarm {
                clients,
                first,
                initial,
            } => {
                let start = Input::Message {
                    from: "server".into(),
                    msg: SwarmMsg::Start,
                    model: Some(initial.clone()),
                };
                let starts = vec![(driver.index(first)?, start)];
                let versions = job.server.sag.num_rounds;
                driver.run_ccwf(clients, starts, versions, &work_tx, &done_rx)
            }
            Ctrl::Cyclic { clients } => {
                let starts = (0..clients.len())
                    .map(|i| {
                        let start = Input::Message {
                            from: "server".into(),
                            msg: CyclicMsg::Start,
                            model: None,
                        };
                        (i, start)
                    })
                    .collect();
                let versions = job.server.sag.num_rounds * names.len() as u32;
                driver.run_ccwf(clients, starts, versions, &work_tx, &done_rx)
            }
            Ctrl::Stats(c) => driver.drive_stats(c, &work_tx, &done_rx),
        };
        // Close both channels before the scope joins the workers: a worker blocked sending
        // a result nobody will read (the drive stopped on an error) then returns.
        drop(work_tx);
        drop(done_rx);
        r
    })?;
    tracking.finish(&names, &report.metrics);
    Ok(report)
}

/// The simulator's metric writers: each simulated site logs into its own queue, which the
/// worker that ran its task drains into the job's [`JobSink`] (under the run's output folder,
/// as the server writes under a job's result); the global model's metrics per round are
/// written at the end.
#[derive(Debug)]
struct SimTracking {
    trackers: Vec<crate::tracking::Tracker>,
    sink: Mutex<Option<crate::tracking::sink::JobSink>>,
}

impl SimTracking {
    fn open(job: &Job, out_dir: &Path, sites: usize) -> anyhow::Result<Self> {
        let sink = crate::tracking::sink::JobSink::open(
            out_dir,
            &job.server.tracking,
            "simulate_job",
            &job.meta.name,
            crate::tracking::now_ms(),
        )?;
        let trackers = (0..sites)
            .map(|i| match &sink {
                Some(_) => {
                    crate::tracking::Tracker::to_queue(crate::tracking::MetricQueue::new(i as u64))
                }
                None => crate::tracking::Tracker::off(),
            })
            .collect();
        Ok(SimTracking {
            trackers,
            sink: Mutex::new(sink),
        })
    }

    /// Writes what site `i` logged so far.
    fn drain(&self, i: usize, name: &str) {
        let Some(q) = self.trackers.get(i).and_then(|t| t.queue()) else {
            return;
        };
        let records = q.take_all();
        if records.is_empty() {
            return;
        }
        if let Ok(mut sink) = self.sink.lock()
            && let Some(sink) = sink.as_mut()
            && let Err(e) = sink.write_all(name, &records)
        {
            tracing::warn!(site = %name, error = %e, "cannot write the site's metrics");
        }
    }

    /// Writes what is left, the global model's metrics, and closes the files.
    fn finish(&self, names: &[String], global: &BTreeMap<u32, BTreeMap<String, f64>>) {
        for (i, n) in names.iter().enumerate() {
            self.drain(i, n);
        }
        if let Ok(mut sink) = self.sink.lock()
            && let Some(sink) = sink.as_mut()
        {
            let now = crate::tracking::now_ms();
            for (v, m) in global {
                if let Err(e) = sink.global(*v, m, now) {
                    tracing::warn!(error = %e, "cannot write the global model's metrics");
                }
            }
            if let Err(e) = sink.finish(now) {
                tracing::warn!(error = %e, "cannot finish the metric files");
            }
        }
    }
}

/// Hands queued work to the workers, as much as the bounded queue takes.
fn hand_out(pending: &mut VecDeque<Work>, work_tx: &SyncSender<Work>) -> anyhow::Result<()> {
    while let Some(w) = pending.pop_front() {
        match work_tx.try_send(w) {
            Ok(()) => {}
            Err(TrySendError::Full(w)) => {
                pending.push_front(w);
                break;
            }
            Err(TrySendError::Disconnected(_)) => bail!("all simulator workers stopped"),
        }
    }
    Ok(())
}

/// What a worker needs to make a site's learner.
#[derive(Debug, Clone, Copy)]
struct Sites<'a> {
    apps: &'a [&'a ClientApp],
    names: &'a [String],
    workspace: &'a Path,
    num_sites: usize,
    tracking: &'a SimTracking,
    /// Each site's secure-aggregation state.
    secagg: &'a [crate::secagg::SiteSecAgg],
}

fn worker(
    work_rx: &Mutex<Receiver<Work>>,
    done_tx: &SyncSender<Done>,
    learners: &[Mutex<Option<Box<dyn Learner>>>],
    sites: Sites<'_>,
    large: &LargeSlot,
) {
    loop {
        let next = match work_rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((i, mut task, model)) = next else {
            return;
        };
        let held = matches!(model, Some(ModelRef::Stored(_)));
        if held {
            large.take();
        }
        match model.map(|m| m.load()).transpose() {
            Ok(Some(m)) => task.data.model = Some(m),
            Ok(None) => {}
            Err(e) => {
                let _ = done_tx.send((i, Err(format!("the task's model: {e}")), held));
                continue;
            }
        }
        let outcome = match learners[i].lock() {
            Ok(mut slot) => {
                if slot.is_none() {
                    let work_dir = sites.workspace.join(&sites.names[i]);
                    let site = LearnerSite {
                        site: &sites.names[i],
                        job_id: "simulate_job",
                        work_dir: &work_dir,
                        tracker: &sites.tracking.trackers[i],
                        gpus: None,
                    };
                    match sites.apps[i].make_learner(i, sites.num_sites, site) {
                        Ok(l) => *slot = Some(l),
                        Err(e) => {
                            let _ = done_tx.send((i, Err(e.to_string()), held));
                            continue;
                        }
                    }
                }
                match slot.as_mut() {
                    Some(l) => Ok(sites.secagg[i].run_task(
                        &sites.names[i],
                        "simulate_job",
                        task,
                        |task| execute(l.as_mut(), task),
                    )),
                    None => Err("learner missing".to_string()),
                }
            }
            Err(_) => Err("a previous task of this client panicked".to_string()),
        };
        sites.tracking.drain(i, &sites.names[i]);
        if done_tx.send((i, outcome, held)).is_err() {
            return;
        }
    }
}

struct Driver<'a> {
    opts: &'a SimOptions,
    job: &'a Job,
    names: &'a [String],
    started: Instant,
    models_dir: &'a Path,
    out_dir: &'a Path,
    large: &'a LargeSlot,
}

impl Driver<'_> {
    fn now(&self) -> Time {
        Time::from_duration(self.started.elapsed())
    }

    fn drive(
        &self,
        ctrl: &mut ScatterGather,
        work_tx: &SyncSender<Work>,
        done_rx: &Receiver<Done>,
    ) -> anyhow::Result<SimReport> {
        let total_rounds = self.job.server.sag.num_rounds;
        let bar = self.progress_bar(total_rounds);
        let mut pending: VecDeque<Work> = VecDeque::new();
        let mut rounds = Vec::new();
        let mut metrics = BTreeMap::new();
        let mut round_models = Vec::new();
        let mut round_start = Instant::now();
        let mut outcome: Option<Result<ModelRef, String>> = None;
        // The job's four filter points, as across processes (see `crate::filters`).
        let mut filtered = TaskDataOnce::default();
        let mut asked: Vec<Option<(TaskId, String)>> = vec![None; self.names.len()];
        let (mut bytes_to_sites, mut bytes_from_sites) = (0u64, 0u64);
        // The last result excluded, named in the outcome if the run aborts.
        let mut excluded: Option<String> = None;
        if ctrl.global().num_bytes() >= FILE_BACKED_BYTES {
            let p = self.out_dir.join(GLOBAL_SCRATCH);
            crate::model_io::write_ref(&p, ctrl.global())?;
            ctrl.replace_global(ModelRef::Stored(Arc::new(crate::model_io::open(&p)?)))?;
        }
        ctrl.start(self.now());
        loop {
            while let Some(out) = ctrl.poll_output() {
                match out {
                    Output::Send { to, task, model } => {
                        let i = self.index(&to)?;
                        asked[i] = Some((task.id, task.name.clone()));
                        match self.send_filtered(&mut filtered, i, &task.name, model) {
                            Ok((model, bytes)) => {
                                bytes_to_sites += bytes;
                                pending.push_back((i, task, Some(model)));
                            }
                            Err(reason) => {
                                tracing::error!(client = %to, task = %task.name, %reason, "task filter failed");
                                let failed = TaskResult {
                                    task_id: task.id,
                                    round: task.round,
                                    data: Shareable::error(ReturnCode::ExecutionException, reason),
                                };
                                ctrl.handle_result(self.now(), &to, failed);
                            }
                        }
                    }
                    Output::Event(e) => match e {
                        Event::RoundStarted { round, clients } => {
                            round_start = Instant::now();
                            if let Some(b) = &bar {
                                b.set_length(clients as u64);
                                b.set_position(0);
                                b.set_prefix(format!(
                                    "round {}/{}",
                                    round + 1 - self.job.server.sag.start_round,
                                    total_rounds
                                ));
                            }
                        }
                        Event::ResultAccepted { answered, .. } => {
                            if let Some(b) = &bar {
                                b.set_position(answered as u64);
                            }
                        }
                        Event::ResultExcluded {
                            round,
                            client,
                            reason,
                            ..
                        } => {
                            tracing::warn!(round, %client, %reason, "result excluded");
                            excluded = Some(format!("{client}: {reason}"));
                        }
                        Event::ResultDropped { client, reason, .. } => {
                            tracing::warn!(%client, ?reason, "result dropped");
                        }
                        Event::TimedOut { round, clients } => {
                            tracing::warn!(round, ?clients, "clients timed out");
                        }
                        Event::ModelEvaluated {
                            version,
                            metrics: m,
                        } => {
                            metrics.insert(version, m);
                        }
                        Event::RoundAggregated {
                            round,
                            model,
                            accepted,
                            ..
                        } => {
                            let seconds = round_start.elapsed().as_secs_f64();
                            rounds.push(RoundReport {
                                round,
                                accepted,
                                seconds,
                            });
                            let line = format!(
                                "round {}/{}: {accepted}/{} clients aggregated in {seconds:.2} s (elapsed {:.1} s)",
                                round + 1 - self.job.server.sag.start_round,
                                total_rounds,
                                self.names.len(),
                                self.started.elapsed().as_secs_f64()
                            );
                            match &bar {
                                Some(b) => b.println(line),
                                None if self.opts.progress => eprintln!("{line}"),
                                None => {}
                            }
                            let p = if self.job.server.persistor.save_every_round {
                                let p = self
                                    .models_dir
                                    .join(format!("round-{round:03}.safetensors"));
                                crate::model_io::write_ref(&p, &model)?;
                                round_models.push(p.clone());
                                Some(p)
                            } else if model.num_bytes() >= FILE_BACKED_BYTES {
                                let p = self.out_dir.join(GLOBAL_SCRATCH);
                                crate::model_io::write_ref(&p, &model)?;
                                Some(p)
                            } else {
                                None
                            };
                            drop(model);
                            // A large global model is read from its file by each task, so
                            // the run holds the aggregate and the models being trained only.
                            if let Some(p) = p
                                && ctrl.global().num_bytes() >= FILE_BACKED_BYTES
                            {
                                let stored = crate::model_io::open(&p)?;
                                ctrl.replace_global(ModelRef::Stored(Arc::new(stored)))?;
                            }
                        }
                        Event::Finished { model } => outcome = Some(Ok(model)),
                        Event::Aborted { reason, .. } => {
                            let reason = match &excluded {
                                Some(x) => format!("{reason} (last result excluded: {x})"),
                                None => reason,
                            };
                            outcome = Some(Err(reason));
                        }
                    },
                }
            }
            if ctrl.is_done() {
                break;
            }
            hand_out(&mut pending, work_tx)?;
            let wait = match ctrl.poll_timeout() {
                Some(at) => at.saturating_since(self.now()),
                None => Duration::from_secs(1),
            };
            // Wake up at least every 50 ms while work waits for room in the queue.
            let wait = if pending.is_empty() {
                wait
            } else {
                wait.min(Duration::from_millis(50))
            };
            match done_rx.recv_timeout(wait) {
                Ok((i, Ok(result), held)) => {
                    let task = asked[i]
                        .as_ref()
                        .filter(|(id, _)| *id == result.task_id)
                        .map(|(_, name)| name.as_str());
                    let result = self.receive_filtered(i, task, result, &mut bytes_from_sites);
                    ctrl.handle_result(self.now(), &self.names[i], result);
                    if held {
                        self.large.give();
                    }
                }
                Ok((i, Err(e), _)) => bail!("{}: {e}", self.names[i]),
                Err(RecvTimeoutError::Timeout) => {
                    let now = self.now();
                    if ctrl.poll_timeout().is_some_and(|t| t <= now) {
                        ctrl.handle_timeout(now);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => bail!("all simulator workers stopped"),
            }
        }
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let outcome = outcome.ok_or_else(|| "the controller stopped without an outcome".into());
        let run = CcwfRun {
            rounds,
            metrics,
            round_models,
            bytes_to_sites,
            bytes_from_sites,
            ..CcwfRun::default()
        };
        self.write_report(run, outcome)
    }

    /// Runs a statistics job: the controller here, each site's `fed_stats` tasks on the
    /// workers, each answer through the site's cleansers (its job's
    /// `StatisticsPrivacyFilter`s) on its virtual way back; then the statistics file and plots
    /// in the output folder, where the writer's `output_path` says.
    fn drive_stats(
        &self,
        ctrl: &mut StatisticsController,
        work_tx: &SyncSender<Work>,
        done_rx: &Receiver<Done>,
    ) -> anyhow::Result<SimReport> {
        let WorkflowSpec::Statistics(wf) = &self.job.server.workflow else {
            bail!("not a statistics job");
        };
        let mut pending: VecDeque<Work> = VecDeque::new();
        let mut asked: Vec<Option<String>> = vec![None; self.names.len()];
        let mut outcome: Option<
            Result<(flare_protocols::stats::StatsOutput, Vec<String>), String>,
        > = None;
        let mut excluded: Option<String> = None;
        let say = |line: String| {
            if self.opts.progress {
                eprintln!("{line}");
            }
        };
        ctrl.start(self.now());
        loop {
            while let Some(out) = ctrl.poll_output() {
                match out {
                    statistics::Output::Send { to, task } => {
                        let i = self.index(&to)?;
                        asked[i] = Some(task.name.clone());
                        pending.push_back((i, task, None));
                    }
                    statistics::Output::Event(e) => match e {
                        statistics::Event::PassStarted { pass, clients } => {
                            say(format!("{pass}: asking {clients} sites"));
                        }
                        statistics::Event::ResultAccepted {
                            pass,
                            client,
                            answered,
                            asked,
                        } => say(format!("{pass}: {client} answered ({answered}/{asked})")),
                        statistics::Event::ResultDropped { client, reason, .. } => {
                            tracing::warn!(%client, ?reason, "result dropped");
                        }
                        statistics::Event::SiteExcluded {
                            pass,
                            client,
                            reason,
                            ..
                        } => {
                            tracing::warn!(%pass, %client, %reason, "site left out");
                            excluded = Some(format!("{client}: {reason}"));
                        }
                        statistics::Event::NoAnswer { pass, clients } => {
                            tracing::warn!(%pass, ?clients, "sites did not answer");
                        }
                        statistics::Event::Finished { output, sites } => {
                            outcome = Some(Ok((output, sites)));
                        }
                        statistics::Event::Aborted { reason, .. } => {
                            outcome = Some(Err(match &excluded {
                                Some(x) => format!("{reason} (last site left out: {x})"),
                                None => reason,
                            }));
                        }
                    },
                }
            }
            if ctrl.is_done() {
                break;
            }
            hand_out(&mut pending, work_tx)?;
            let wait = match ctrl.poll_timeout() {
                Some(at) => at.saturating_since(self.now()),
                None => Duration::from_secs(1),
            };
            let wait = if pending.is_empty() {
                wait
            } else {
                wait.min(Duration::from_millis(50))
            };
            match done_rx.recv_timeout(wait) {
                Ok((i, Ok(mut result), _)) => {
                    let site = &self.names[i];
                    if let (Some(task), Some(app)) = (&asked[i], self.job.app_for(site)) {
                        crate::stats::cleanse_result(&app.filters, task, site, &mut result);
                    }
                    ctrl.handle_result(self.now(), site, result);
                }
                Ok((i, Err(e), _)) => bail!("{}: {e}", self.names[i]),
                Err(RecvTimeoutError::Timeout) => {
                    let now = self.now();
                    if ctrl.poll_timeout().is_some_and(|t| t <= now) {
                        ctrl.handle_timeout(now);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => bail!("all simulator workers stopped"),
            }
        }
        let (output, sites) = match outcome {
            Some(Ok(x)) => x,
            Some(Err(reason)) => bail!("the job aborted: {reason}"),
            None => bail!("the controller stopped without an outcome"),
        };
        let files = crate::stats::write_results(self.out_dir, &wf.output_path, &output)?;
        let metrics_file = self.out_dir.join("metrics.json");
        let report = SimReport {
            job: self.job.meta.name.clone(),
            rounds: Vec::new(),
            metrics: BTreeMap::new(),
            final_model: PathBuf::new(),
            round_models: Vec::new(),
            metrics_file: metrics_file.clone(),
            cross_site: CrossSite::new(),
            cross_site_failed: BTreeMap::new(),
            model_bytes_to_sites: 0,
            model_bytes_from_sites: 0,
            seconds: self.started.elapsed().as_secs_f64(),
            statistics: Some(StatsReport {
                sites,
                files,
                output,
            }),
        };
        std::fs::write(&metrics_file, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", metrics_file.display()))?;
        Ok(report)
    }

    /// A model on its virtual way from client `i` to client `j`: `i`'s task result filters,
    /// its bytes on the wire, then `j`'s task data filters (a model to itself passes through
    /// neither and counts no bytes, as a site's messages to itself never leave it).
    fn peer_filtered(
        &self,
        i: usize,
        j: usize,
        task: &str,
        model: ModelRef,
    ) -> Result<(ModelRef, u64), String> {
        if i == j {
            return Ok((model, 0));
        }
        let model = match self.job.app_for(&self.names[i]) {
            Some(app) => app
                .filters
                .task_result_ref(task, model)
                .map_err(|e| format!("the task result filter of {} failed: {e}", self.names[i]))?,
            None => model,
        };
        let bytes = model.num_bytes();
        Ok((self.site_data_filtered(j, task, model)?, bytes))
    }

    /// A model arriving at client `i` through its task data filters; a failure names them.
    fn site_data_filtered(
        &self,
        i: usize,
        task: &str,
        model: ModelRef,
    ) -> Result<ModelRef, String> {
        match self.job.app_for(&self.names[i]) {
            Some(app) => app
                .filters
                .task_data_ref(task, model)
                .map_err(|e| format!("the task data filter of {} failed: {e}", self.names[i])),
            None => Ok(model),
        }
    }

    /// A task's model on its virtual way to client `i`: the server's task data filters (once
    /// per model), its bytes on the wire, then the site's task data filters. A filter's
    /// failure is the reason, naming the filter and the side.
    fn send_filtered(
        &self,
        once: &mut TaskDataOnce,
        i: usize,
        task: &str,
        model: ModelRef,
    ) -> Result<(ModelRef, u64), String> {
        let model = once
            .task_data(&self.job.server.filters, task, model)
            .map_err(|e| {
                format!(
                    "the server's task data filter for {} failed: {e}",
                    self.names[i]
                )
            })?;
        let bytes = model.num_bytes();
        Ok((self.site_data_filtered(i, task, model)?, bytes))
    }

    /// Client `i`'s result on its virtual way back: the site's task result filters, its
    /// bytes on the wire, then the server's task result filters. A failing filter makes it
    /// an error result naming the filter and the site.
    fn receive_filtered(
        &self,
        i: usize,
        task: Option<&str>,
        mut result: TaskResult,
        bytes: &mut u64,
    ) -> TaskResult {
        let site = &self.names[i];
        let (Some(task), true) = (task, result.data.return_code == ReturnCode::Ok) else {
            return result;
        };
        let Some(m) = result.data.model.take() else {
            return result;
        };
        let mut m = Arc::unwrap_or_clone(m);
        if let Some(app) = self.job.app_for(site) {
            match app.filters.task_result(task, m) {
                Ok(f) => m = f,
                Err(e) => {
                    result.data = Shareable::error(
                        ReturnCode::ExecutionException,
                        format!("the task result filter of {site} failed: {e}"),
                    );
                    return result;
                }
            }
        }
        *bytes += wire_bytes(&m);
        match self.job.server.filters.task_result(task, m) {
            Ok(m) => result.data.model = Some(Arc::new(m)),
            Err(e) => {
                result.data = Shareable::error(
                    ReturnCode::ExecutionException,
                    format!("the server's task result filter failed on the result of {site}: {e}"),
                );
            }
        }
        result
    }

    /// Writes `metrics.json`, the cross-site evaluation (`cross_site_val/cross_val_results.json`)
    /// when there is one and, when the run ended with a model, `global_final.safetensors`.
    fn write_report(
        &self,
        run: CcwfRun,
        outcome: Result<Result<ModelRef, String>, String>,
    ) -> anyhow::Result<SimReport> {
        let _ = std::fs::remove_file(self.out_dir.join(GLOBAL_SCRATCH));
        let metrics_file = self.out_dir.join("metrics.json");
        let final_model = self.out_dir.join("global_final.safetensors");
        let report = SimReport {
            job: self.job.meta.name.clone(),
            rounds: run.rounds,
            metrics: run.metrics,
            final_model: final_model.clone(),
            round_models: run.round_models,
            metrics_file: metrics_file.clone(),
            cross_site: run.cross_site,
            cross_site_failed: run.cross_site_failed,
            model_bytes_to_sites: run.bytes_to_sites,
            model_bytes_from_sites: run.bytes_from_sites,
            seconds: self.started.elapsed().as_secs_f64(),
            statistics: None,
        };
        if !report.cross_site.is_empty() || !report.cross_site_failed.is_empty() {
            let dir = self.out_dir.join("cross_site_val");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let file = dir.join("cross_val_results.json");
            std::fs::write(&file, serde_json::to_vec_pretty(&report.cross_site)?)
                .with_context(|| format!("cannot write {}", file.display()))?;
        }
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(&metrics_file, json)
            .with_context(|| format!("cannot write {}", metrics_file.display()))?;
        match outcome {
            Ok(Ok(model)) => {
                crate::model_io::write_ref(&final_model, &model)?;
                Ok(report)
            }
            Ok(Err(reason)) => bail!("the job aborted: {reason}"),
            Err(missing) => bail!("{missing}"),
        }
    }

    /// Runs a client-controlled workflow (then the job's cross-site evaluation, if any) and
    /// writes the report. `versions` global model versions count as rounds.
    fn run_ccwf<W: ClientWorkflow>(
        &self,
        clients: &mut [W],
        starts: Vec<(usize, Input<W::Msg>)>,
        versions: u32,
        work_tx: &SyncSender<Work>,
        done_rx: &Receiver<Done>,
    ) -> anyhow::Result<SimReport> {
        let mut run = CcwfRun {
            locals: vec![None; clients.len()],
            bests: vec![None; clients.len()],
            finals: vec![None; clients.len()],
            filter_task: task_names::TRAIN,
            ..CcwfRun::default()
        };
        self.drive_ccwf(clients, starts, versions, &mut run, work_tx, done_rx)?;
        let final_model = run.finals.iter().flatten().next().cloned();
        if let (None, Some(args), Some(_)) =
            (&run.failure, &self.job.server.evaluation, &final_model)
        {
            // The global model evaluated: the best one, or the final one without a best.
            let holder = run
                .bests
                .iter()
                .position(Option::is_some)
                .or_else(|| run.finals.iter().position(Option::is_some));
            let global = holder.and_then(|h| run.bests[h].clone().or(run.finals[h].clone()));
            let cfg = args
                .to_config(
                    self.names,
                    seed_of(&self.job.meta.name),
                    holder.map(|h| self.names[h].clone()),
                )
                .with_context(|| {
                    format!("{}: CrossSiteEval settings", self.opts.job_dir.display())
                })?;
            let mut evaluators = self
                .names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let g = (cfg.global_model_client.as_deref() == Some(n.as_str()))
                        .then(|| global.clone())
                        .flatten();
                    CseClient::new(cfg.clone(), n, run.locals[i].clone(), g)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let starts = (0..evaluators.len())
                .map(|i| {
                    let start = Input::Message {
                        from: "server".into(),
                        msg: CseMsg::Start,
                        model: None,
                    };
                    (i, start)
                })
                .collect();
            run.filter_task = task_names::VALIDATE;
            self.drive_ccwf(&mut evaluators, starts, 0, &mut run, work_tx, done_rx)?;
        }
        let outcome = match run.failure.take() {
            Some(reason) => Ok(Err(reason)),
            None => final_model
                .map(Ok)
                .ok_or_else(|| "no result client received the final model".into()),
        };
        self.write_report(run, outcome)
    }

    /// Drives client workflows to the end: every client's state machine in this thread,
    /// messages over an in-memory queue, tasks on the workers.
    fn drive_ccwf<W: ClientWorkflow>(
        &self,
        clients: &mut [W],
        starts: Vec<(usize, Input<W::Msg>)>,
        versions: u32,
        run: &mut CcwfRun,
        work_tx: &SyncSender<Work>,
        done_rx: &Receiver<Done>,
    ) -> anyhow::Result<()> {
        let start_round = self.job.server.sag.start_round;
        let mut inbox: VecDeque<(usize, Input<W::Msg>)> = starts.into();
        let mut pending: VecDeque<Work> = VecDeque::new();
        let mut round_start = Instant::now();
        let mut finished: Vec<bool> = vec![false; clients.len()];
        loop {
            // Deliver every queued input, then collect what the clients ask for.
            while let Some((i, input)) = inbox.pop_front() {
                clients[i].handle(self.now(), input);
            }
            for (i, c) in clients.iter_mut().enumerate() {
                while let Some(a) = c.poll_action() {
                    match a {
                        Action::Send { to, msg, model } => {
                            let from = self.names[i].clone();
                            let j = self.index(&to)?;
                            match model.map(|m| self.peer_filtered(i, j, run.filter_task, m)) {
                                None => inbox.push_back((
                                    j,
                                    Input::Message {
                                        from,
                                        msg,
                                        model: None,
                                    },
                                )),
                                Some(Ok((m, bytes))) => {
                                    run.bytes_to_sites += bytes;
                                    inbox.push_back((
                                        j,
                                        Input::Message {
                                            from,
                                            msg,
                                            model: Some(m),
                                        },
                                    ))
                                }
                                // As across processes: the message is lost, with the reason.
                                Some(Err(e)) => eprintln!("{e}; message dropped"),
                            }
                        }
                        Action::RunTask { task, model } => pending.push_back((i, task, model)),
                        Action::Report(r) => match r.event {
                            ReportEvent::Aggregated {
                                accepted,
                                version,
                                metrics: m,
                                ..
                            } => {
                                if !m.is_empty() {
                                    run.metrics.insert(version, m);
                                }
                                if version < versions {
                                    let seconds = round_start.elapsed().as_secs_f64();
                                    round_start = Instant::now();
                                    if self.opts.progress {
                                        eprintln!(
                                            "round {}/{versions}: {}/{} clients aggregated by {} in {seconds:.2} s (elapsed {:.1} s)",
                                            version + 1,
                                            accepted.len(),
                                            self.names.len(),
                                            self.names[i],
                                            self.started.elapsed().as_secs_f64()
                                        );
                                    }
                                    run.rounds.push(RoundReport {
                                        round: start_round + version,
                                        accepted: accepted.len(),
                                        seconds,
                                    });
                                }
                            }
                            ReportEvent::Evaluated { model, metrics } => {
                                run.cross_site
                                    .entry(self.names[i].clone())
                                    .or_default()
                                    .insert(model, metrics);
                            }
                            ReportEvent::EvaluationFailed { model, reason } => {
                                run.cross_site_failed
                                    .entry(self.names[i].clone())
                                    .or_default()
                                    .insert(model, reason);
                            }
                            ReportEvent::Finished(Outcome::Failed { reason }) => {
                                finished[i] = true;
                                run.failure
                                    .get_or_insert(format!("{}: {reason}", self.names[i]));
                            }
                            ReportEvent::Finished(Outcome::Completed { .. }) => finished[i] = true,
                            _ => {}
                        },
                        Action::Persist { slot, model } => {
                            let dir = self
                                .opts
                                .workspace
                                .join(&self.names[i])
                                .join("simulate_job");
                            std::fs::create_dir_all(&dir)
                                .with_context(|| format!("cannot create {}", dir.display()))?;
                            let p = dir.join(format!("{}.safetensors", slot.file_stem()));
                            // As on a site: a large model is held as the file just written.
                            let model = match crate::model_io::write_held(&p, &model)? {
                                Some(s) => {
                                    let stored = ModelRef::Stored(Arc::new(s));
                                    c.replace_model(&model, &stored);
                                    stored
                                }
                                None => model,
                            };
                            match slot {
                                ModelSlot::Round(_)
                                    if self.job.server.persistor.save_every_round =>
                                {
                                    let q = self
                                        .models_dir
                                        .join(format!("{}.safetensors", slot.file_stem()));
                                    crate::model_io::write_ref(&q, &model)?;
                                    run.round_models.push(q);
                                }
                                ModelSlot::Round(_) => {}
                                ModelSlot::Final => run.finals[i] = Some(model),
                                ModelSlot::Best => run.bests[i] = Some(model),
                                ModelSlot::Local => run.locals[i] = Some(model),
                            }
                        }
                        Action::Finished(_) => {}
                    }
                }
            }
            if !inbox.is_empty() {
                continue;
            }
            if finished.iter().all(|f| *f) {
                return Ok(());
            }
            hand_out(&mut pending, work_tx)?;
            let next = clients.iter().filter_map(|c| c.poll_timeout()).min();
            let wait = next.map_or(Duration::from_secs(1), |t| t.saturating_since(self.now()));
            let wait = if pending.is_empty() {
                wait
            } else {
                wait.min(Duration::from_millis(50))
            };
            match done_rx.recv_timeout(wait) {
                Ok((i, Ok(result), held)) => {
                    if held {
                        self.large.give();
                    }
                    inbox.push_back((i, Input::TaskDone(result, None)));
                }
                Ok((i, Err(e), _)) => bail!("{}: {e}", self.names[i]),
                Err(RecvTimeoutError::Timeout) => {
                    let now = self.now();
                    for c in clients.iter_mut() {
                        if c.poll_timeout().is_some_and(|t| t <= now) {
                            c.handle_timeout(now);
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => bail!("all simulator workers stopped"),
            }
        }
    }

    fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.names
            .iter()
            .position(|n| n == name)
            .with_context(|| format!("the controller addressed an unknown client {name}"))
    }

    fn progress_bar(&self, rounds: u32) -> Option<ProgressBar> {
        if !self.opts.progress || !std::io::stderr().is_terminal() {
            return None;
        }
        let b = ProgressBar::new(self.names.len() as u64);
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {pos}/{len} clients done, elapsed {elapsed}",
        )
        .ok()?
        .progress_chars("=> ");
        b.set_style(style);
        b.set_prefix(format!("round 1/{rounds}"));
        Some(b)
    }
}

/// The per-version metrics as a table, one row per global model version; for a statistics
/// job, the statistics' table ([`crate::stats::format_table`]).
pub fn format_table(report: &SimReport) -> String {
    if let Some(st) = &report.statistics {
        return crate::stats::format_table(&st.output);
    }
    let mut keys: Vec<&String> = report.metrics.values().flat_map(|m| m.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut s = format!("{:>6} {:>8} {:>9}", "round", "clients", "seconds");
    for k in &keys {
        s.push_str(&format!(" {k:>10}"));
    }
    s.push('\n');
    for (version, m) in &report.metrics {
        let (clients, secs) = match version
            .checked_sub(1)
            .and_then(|i| report.rounds.get(i as usize))
        {
            Some(r) => (r.accepted.to_string(), format!("{:.2}", r.seconds)),
            None => ("-".to_string(), "-".to_string()),
        };
        let label = if *version == 0 {
            "init".to_string()
        } else {
            version.to_string()
        };
        s.push_str(&format!("{label:>6} {clients:>8} {secs:>9}"));
        for k in &keys {
            match m.get(*k) {
                Some(v) => s.push_str(&format!(" {:>10}", crate::display::metric(*v))),
                None => s.push_str(&format!(" {:>10}", "-")),
            }
        }
        s.push('\n');
    }
    let (down, up) = (report.model_bytes_to_sites, report.model_bytes_from_sites);
    if down + up > 0 {
        s.push_str(&format!(
            "model bytes sent: {} ({} to sites, {} back)\n",
            down + up,
            down,
            up
        ));
    }
    s
}

/// A cross-site evaluation as a matrix of `key` (e.g. accuracy): one row per evaluator, one
/// column per model; `-` where the evaluation is missing.
pub fn format_cross_site(cross: &CrossSite, key: &str) -> String {
    let mut models: Vec<&String> = cross.values().flat_map(|m| m.keys()).collect();
    models.sort();
    models.dedup();
    let mut s = format!("{:>12}", format!("{key} of"));
    for m in &models {
        s.push_str(&format!(" {m:>10}"));
    }
    s.push('\n');
    for (evaluator, row) in cross {
        s.push_str(&format!("{:>12}", format!("at {evaluator}")));
        for m in &models {
            match row.get(*m).and_then(|x| x.get(key)) {
                Some(v) => s.push_str(&format!(" {:>10}", crate::display::metric(*v))),
                None => s.push_str(&format!(" {:>10}", "-")),
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A learner that cannot be built on any site (a bad partition) must end the run with
    /// that error, not leave workers blocked on results nobody reads.
    #[test]
    fn a_learner_that_cannot_be_built_fails_the_run_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("job");
        crate::bench::write_synthetic_job(&job, 10, 3, 1).unwrap();
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
        let client = serde_json::json!({"executors": [{"tasks": ["train", "validate"],
            "executor": {"name": "MnistMlpLearner", "args": {"data_dir": data,
                "partition": {"kind": "dirichlet", "alpha": -1.0}}}}]});
        std::fs::write(
            job.join("app/config/config_fed_client.json"),
            client.to_string(),
        )
        .unwrap();
        let (tx, rx) = sync_channel(1);
        let ws = dir.path().join("ws");
        std::thread::spawn(move || {
            let r = run(&SimOptions {
                job_dir: job,
                clients: 3,
                workspace: ws,
                threads: 3,
                progress: false,
            });
            let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
        });
        let err = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the simulator hung")
            .unwrap_err();
        assert!(err.contains("alpha"), "{err}");
    }
}
