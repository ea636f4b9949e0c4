//! The tiered simulator: `flare-node simulate <job> --regions R -n N` runs a
//! `TieredScatterAndGather` job in one process, with R regions of N sites each.
//!
//! It drives the same state machines as the nodes: tier 1's `ScatterGather` over the regions'
//! hubs, and for each global task a region `ScatterGather` over that region's sites watched by
//! a `RegionRound`, which turns the region's end into the partial (or the validation metrics)
//! the hub sends up. Regions run one after another; a region's site tasks run on `threads`
//! workers. Site `region-r.site-j` is site number `(r − 1)·N + (j − 1)` of `R·N` for its
//! learner, so its data is what site `site-{(r − 1)·N + j}` of a flat `simulate -n R·N` gets:
//! with `local_rounds: 1` both runs give the same model.
//!
//! Memory: the learners of every site (their data), the tier-1 global model, the region's
//! model and at most `threads` models in training; results are folded as they arrive.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use flare_node::job::{ClientApp, Job, LearnerSite};
use flare_node::learner::{Learner, execute};
use flare_protocols::shareable::{ReturnCode, Shareable, Task, TaskResult};
use flare_protocols::stored::ModelRef;
use flare_protocols::time::Time;
use flare_protocols::workflows::ccwf::{
    Action, ClientWorkflow, Epoch, Input, ModelSlot, ReportEvent,
};
use flare_protocols::workflows::scatter_gather::{Event, Output, ScatterGather};
use flare_protocols::workflows::swarm::{SwarmClient, SwarmMsg};
use flare_protocols::workflows::tiered::{RegionRound, TieredArgs};
use serde::Serialize;

/// How to run a tiered simulation.
#[derive(Debug, Clone)]
pub struct TieredSimOptions {
    /// The job folder.
    pub job_dir: PathBuf,
    /// Regions (`region-1` … `region-R`).
    pub regions: usize,
    /// Sites per region (`region-r.site-1` … `region-r.site-N`).
    pub sites_per_region: usize,
    /// Where models and metrics go.
    pub workspace: PathBuf,
    /// Worker threads for site tasks.
    pub threads: usize,
    /// A line per global round on stderr.
    pub progress: bool,
}

/// One global round as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct GlobalRound {
    /// The global round.
    pub round: u32,
    /// Region partials folded into it.
    pub regions: usize,
    /// Sites whose results went into those partials (in the regions' last local round).
    pub sites: usize,
    /// Each region's weight (its partial's total weight; absent when it sent none).
    pub weights: BTreeMap<String, f64>,
    /// Wall seconds from the round's start to its aggregation.
    pub seconds: f64,
}

/// What a tiered simulation produced.
#[derive(Debug, Clone, Serialize)]
pub struct TieredReport {
    /// Job name.
    pub job: String,
    /// Regions simulated.
    pub regions: usize,
    /// Sites in all.
    pub sites: usize,
    /// Global rounds in order.
    pub rounds: Vec<GlobalRound>,
    /// Metrics per global model version (0 = initial), weighted over every site.
    pub metrics: BTreeMap<u32, BTreeMap<String, f64>>,
    /// Sites whose last task carried the final global model (every site, when the job
    /// validates it).
    pub sites_on_final_model: usize,
    /// Tensor bytes between tier 1 and the hubs (tasks down, partials up).
    pub bytes_tier1: u64,
    /// Tensor bytes between the hubs and their sites.
    pub bytes_regions: u64,
    /// The final global model.
    pub final_model: PathBuf,
    /// This report as JSON.
    pub metrics_file: PathBuf,
    /// Peak resident memory of the process in MiB.
    pub peak_rss_mib: Option<f64>,
    /// Wall seconds in all.
    pub seconds: f64,
}

type Work = (usize, Task, ModelRef);
type Done = (usize, TaskResult);

/// Runs the job; the report is also written to `<workspace>/server/simulate_job/metrics.json`.
pub fn run(opts: &TieredSimOptions) -> anyhow::Result<TieredReport> {
    let started = Instant::now();
    let job = Job::load(&opts.job_dir)?;
    let config = opts.job_dir.join("app/config/config_fed_server.json");
    let Some(args) = job.server.tiered.clone() else {
        bail!(
            "{}: --regions needs a TieredScatterAndGather job (this one runs {})",
            config.display(),
            job.server.workflow.wire_name()
        );
    };
    if opts.regions == 0 || opts.sites_per_region == 0 {
        bail!("--regions and -n must be at least 1");
    }
    if opts.regions < args.min_regions {
        bail!(
            "{}: min_regions is {} but only {} regions are simulated",
            config.display(),
            args.min_regions,
            opts.regions
        );
    }
    let hubs: Vec<String> = (1..=opts.regions).map(|r| format!("region-{r}")).collect();
    let mut names = Vec::new();
    for hub in &hubs {
        for j in 1..=opts.sites_per_region {
            names.push(format!("{hub}.site-{j}"));
        }
    }
    let apps: Vec<&ClientApp> = names
        .iter()
        .map(|n| {
            job.app_for(n)
                .with_context(|| format!("deploy_map deploys no app to {n}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let out_dir = opts.workspace.join("server").join("simulate_job");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let top = ScatterGather::new(
        job.server.sag.clone(),
        hubs.clone(),
        job.server.initial_model()?,
    )
    .with_context(|| format!("{}: workflow settings", config.display()))?;

    let threads = opts.threads.max(1);
    let (work_tx, work_rx) = sync_channel::<Work>(threads);
    // Results never wait: at most one region's tasks are out at a time.
    let (done_tx, done_rx) = sync_channel::<Done>(opts.sites_per_region);
    let work_rx = Arc::new(Mutex::new(work_rx));
    let learners: Vec<Mutex<Option<Box<dyn Learner>>>> =
        names.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (rx, tx) = (Arc::clone(&work_rx), done_tx.clone());
            let (learners, apps, names) = (&learners, &apps, &names);
            let ws = &opts.workspace;
            scope.spawn(move || worker(&rx, &tx, learners, apps, names, ws));
        }
        drop(done_tx);
        let mut sim = Sim {
            args: &args,
            opts,
            names: &names,
            work: work_tx,
            done: done_rx,
            started,
            weights: vec![1.0; hubs.len()],
            last_task: vec![None; names.len()],
            bytes_tier1: 0,
            bytes_regions: 0,
        };
        let r = sim.drive(top, &hubs, &job, &out_dir);
        // Close the work channel so the workers return before the scope joins them.
        drop(sim);
        r
    })
}

fn worker(
    work: &Mutex<Receiver<Work>>,
    done: &SyncSender<Done>,
    learners: &[Mutex<Option<Box<dyn Learner>>>],
    apps: &[&ClientApp],
    names: &[String],
    workspace: &std::path::Path,
) {
    loop {
        let next = match work.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((i, mut task, model)) = next else {
            return;
        };
        let (id, round) = (task.id, task.round);
        let outcome = model
            .load()
            .map_err(|e| format!("the task's model: {e}"))
            .and_then(|m| {
                task.data.model = Some(m);
                let mut slot = learners[i]
                    .lock()
                    .map_err(|_| "a previous task of this site panicked".to_string())?;
                if slot.is_none() {
                    let work_dir = workspace.join(&names[i]);
                    let site = LearnerSite {
                        site: &names[i],
                        job_id: "simulate_job",
                        work_dir: &work_dir,
                        tracker: &flare_node::tracking::Tracker::off(),
                        gpus: None,
                    };
                    *slot = Some(
                        apps[i]
                            .make_learner(i, names.len(), site)
                            .map_err(|e| e.to_string())?,
                    );
                }
                let learner = slot.as_mut().ok_or("learner missing")?;
                Ok(execute(learner.as_mut(), task))
            })
            .unwrap_or_else(|e| TaskResult {
                task_id: id,
                round,
                data: Shareable::error(ReturnCode::ExecutionException, e),
            });
        if done.send((i, outcome)).is_err() {
            return;
        }
    }
}

struct Sim<'a> {
    args: &'a TieredArgs,
    opts: &'a TieredSimOptions,
    names: &'a [String],
    work: SyncSender<Work>,
    done: Receiver<Done>,
    started: Instant,
    /// Each region's weight in its last training round, for its validation answer.
    weights: Vec<f64>,
    /// Per site: the name and round of the last task it got.
    last_task: Vec<Option<(String, u32)>>,
    bytes_tier1: u64,
    bytes_regions: u64,
}

/// Tensor bytes of a result's model (0 without one).
fn result_bytes(result: &TaskResult) -> u64 {
    result.data.model.as_ref().map_or(0, |m| {
        m.params.values().map(|t| t.bytes().len() as u64).sum()
    })
}

fn tensor_bytes(m: &ModelRef) -> u64 {
    m.tensors()
        .iter()
        .map(|t| t.byte_len().unwrap_or(0) as u64)
        .sum()
}

impl Sim<'_> {
    fn now(&self) -> Time {
        Time::from_duration(self.started.elapsed())
    }

    fn drive(
        &mut self,
        mut top: ScatterGather,
        hubs: &[String],
        job: &Job,
        out_dir: &std::path::Path,
    ) -> anyhow::Result<TieredReport> {
        let mut rounds = Vec::new();
        let mut metrics = BTreeMap::new();
        let mut round_start = Instant::now();
        let mut sites_in_round = 0;
        let mut weights = BTreeMap::new();
        let mut outcome = None;
        top.start(self.now());
        loop {
            let mut sends = Vec::new();
            while let Some(out) = top.poll_output() {
                match out {
                    Output::Send { to, task, model } => sends.push((to, task, model)),
                    Output::Event(e) => match e {
                        Event::RoundStarted { .. } => {
                            round_start = Instant::now();
                            sites_in_round = 0;
                        }
                        Event::ResultAccepted { client, weight, .. } => {
                            weights.insert(client, weight);
                        }
                        Event::ModelEvaluated {
                            version,
                            metrics: m,
                        } => {
                            metrics.insert(version, m);
                        }
                        Event::RoundAggregated {
                            round, accepted, ..
                        } => {
                            let seconds = round_start.elapsed().as_secs_f64();
                            if self.opts.progress {
                                eprintln!(
                                    "global round {round}: {accepted} regions, {sites_in_round} sites, {seconds:.2} s"
                                );
                            }
                            rounds.push(GlobalRound {
                                round,
                                regions: accepted,
                                sites: sites_in_round,
                                weights: std::mem::take(&mut weights),
                                seconds,
                            });
                        }
                        Event::Finished { model } => outcome = Some(Ok(model)),
                        Event::Aborted { round, reason } => {
                            outcome = Some(Err(format!("global round {round}: {reason}")))
                        }
                        Event::ResultExcluded { client, reason, .. } => {
                            if self.opts.progress {
                                eprintln!("{client}: {reason}");
                            }
                        }
                        Event::ResultDropped { .. } | Event::TimedOut { .. } => {}
                    },
                }
            }
            if top.is_done() {
                break;
            }
            for (hub, task, model) in sends {
                let r = hubs.iter().position(|h| *h == hub).unwrap_or(0);
                self.bytes_tier1 += tensor_bytes(&model);
                let (result, sites) = self.region(r, task, model)?;
                self.bytes_tier1 += result_bytes(&result);
                sites_in_round += sites;
                top.handle_result(self.now(), &hub, result);
            }
            if let Some(at) = top.poll_timeout()
                && at <= self.now()
            {
                top.handle_timeout(self.now());
            }
        }
        let final_model = out_dir.join("global_final.safetensors");
        let metrics_file = out_dir.join("metrics.json");
        let last = self
            .last_task
            .iter()
            .flatten()
            .max_by_key(|(_, r)| *r)
            .cloned();
        let report = TieredReport {
            job: job.meta.name.clone(),
            regions: hubs.len(),
            sites: self.names.len(),
            rounds,
            metrics,
            sites_on_final_model: self
                .last_task
                .iter()
                .filter(|t| t.is_some() && **t == last && self.args.validate_final)
                .count(),
            bytes_tier1: self.bytes_tier1,
            bytes_regions: self.bytes_regions,
            final_model: final_model.clone(),
            metrics_file: metrics_file.clone(),
            peak_rss_mib: flare_node::bench::peak_rss_mib(),
            seconds: self.started.elapsed().as_secs_f64(),
        };
        std::fs::write(&metrics_file, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", metrics_file.display()))?;
        match outcome {
            Some(Ok(model)) => {
                flare_node::model_io::write_ref(&final_model, &model)?;
                Ok(report)
            }
            Some(Err(reason)) => bail!("the job aborted: {reason}"),
            None => bail!("the run ended without a result"),
        }
    }

    /// Runs region `r`'s answer to one global task: its local rounds (or its validation) over
    /// its sites. Returns the answer for tier 1 and how many sites the last round folded.
    fn region(
        &mut self,
        r: usize,
        task: Task,
        global: ModelRef,
    ) -> anyhow::Result<(TaskResult, usize)> {
        let n = self.opts.sites_per_region;
        let first = r * n;
        let sites: Vec<String> = self.names[first..first + n].to_vec();
        let validate = task.name == flare_protocols::shareable::task_names::VALIDATE;
        let mut watch = RegionRound::new(self.args, self.weights[r]);
        if self.args.region_swarm() && !validate {
            let folded = self.region_swarm(first, &sites, task.round, global, &mut watch)?;
            return Ok((self.answer(r, &task, validate, watch), folded));
        }
        let mut c = self
            .args
            .region_controller(task.round, validate, sites.clone(), global)?;
        let mut folded = 0;
        c.start(self.now());
        loop {
            while let Some(out) = c.poll_output() {
                match out {
                    Output::Send { to, task, model } => {
                        let i = first + sites.iter().position(|s| *s == to).unwrap_or(0);
                        self.bytes_regions += tensor_bytes(&model);
                        self.last_task[i] = Some((task.name.clone(), task.round));
                        self.work
                            .send((i, task, model))
                            .context("the workers stopped")?;
                    }
                    Output::Event(e) => {
                        if let Event::RoundAggregated { accepted, .. } = &e {
                            folded = *accepted;
                        }
                        watch.observe(&e);
                    }
                }
            }
            if c.is_done() {
                break;
            }
            let wait = c
                .poll_timeout()
                .map(|at| at.saturating_since(self.now()))
                .unwrap_or(std::time::Duration::from_secs(1));
            match self.done.recv_timeout(wait) {
                Ok((i, result)) => {
                    self.bytes_regions += result_bytes(&result);
                    c.handle_result(self.now(), &self.names[i], result);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => c.handle_timeout(self.now()),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the workers stopped")
                }
            }
        }
        Ok((self.answer(r, &task, validate, watch), folded))
    }

    /// Region `r`'s answer to `task` from what its run showed `watch`.
    fn answer(&mut self, r: usize, task: &Task, validate: bool, watch: RegionRound) -> TaskResult {
        if let Some(w) = watch.weight() {
            self.weights[r] = w;
        }
        let answer = if validate {
            watch.into_validation()
        } else {
            watch.into_partial()
        };
        let data = match answer {
            Ok(m) => Shareable::with_model(m),
            Err(e) => Shareable::error(ReturnCode::ExecutionException, e.to_string()),
        };
        TaskResult {
            task_id: task.id,
            round: task.round,
            data,
        }
    }

    /// A swarm region's global round: one `SwarmClient` per site of the region (sites
    /// `first..`), as the sites run them, started on the round's first aggregator with
    /// `global` as the hub starts it; messages are delivered in order, each site's tasks
    /// run one at a time on the workers, and the reports and the first final model a result
    /// site persists go to `watch`, as they reach the hub. Returns how many results the
    /// swarm's last round folded.
    fn region_swarm(
        &mut self,
        first: usize,
        sites: &[String],
        global_round: u32,
        global: ModelRef,
        watch: &mut RegionRound,
    ) -> anyhow::Result<usize> {
        let seed = flare_node::simulator::seed_of("simulate_job");
        let cfg = self.args.region_swarm_config(global_round, sites, seed)?;
        let index = |name: &str| sites.iter().position(|s| s == name);
        let mut clients: Vec<SwarmClient> = sites
            .iter()
            .map(|s| SwarmClient::new(cfg.clone(), s.clone()))
            .collect::<Result<_, _>>()?;
        let mut inbox: VecDeque<(usize, Input<SwarmMsg>)> = VecDeque::new();
        let mut tasks: Vec<VecDeque<(Task, Option<ModelRef>)>> = vec![VecDeque::new(); sites.len()];
        let mut busy = vec![false; sites.len()];
        let starter = index(cfg.aggregator(Epoch::new(cfg.start_round, 0))).unwrap_or(0);
        self.bytes_regions += tensor_bytes(&global);
        inbox.push_back((
            starter,
            Input::Message {
                from: "hub".into(),
                msg: SwarmMsg::Start,
                model: Some(global),
            },
        ));
        let last_round = cfg.end_round().saturating_sub(1);
        let mut folded = 0;
        let mut have_final = false;
        loop {
            let now = self.now();
            // Deliver what is queued and carry out what it asks, until both are empty.
            loop {
                while let Some((i, input)) = inbox.pop_front() {
                    clients[i].handle(now, input);
                }
                let mut acted = false;
                for i in 0..clients.len() {
                    while let Some(action) = clients[i].poll_action() {
                        acted = true;
                        match action {
                            Action::Send { to, msg, model } => {
                                let j = index(&to).with_context(|| {
                                    format!("a message to {to}, not in the region")
                                })?;
                                if let Some(m) = &model {
                                    self.bytes_regions += tensor_bytes(m);
                                }
                                let from = sites[i].clone();
                                inbox.push_back((j, Input::Message { from, msg, model }));
                            }
                            Action::RunTask { task, model } => tasks[i].push_back((task, model)),
                            Action::Report(report) => {
                                if let ReportEvent::Aggregated {
                                    accepted, version, ..
                                } = &report.event
                                    && *version < cfg.num_rounds
                                {
                                    folded = accepted.len();
                                }
                                watch.observe_report(&report);
                            }
                            Action::Persist { slot, model } => {
                                if slot == ModelSlot::Final
                                    && !have_final
                                    && cfg.result_clients.contains(&sites[i])
                                {
                                    let m = model.load()?;
                                    if m.current_round == Some(last_round) {
                                        have_final = true;
                                        watch.finished(model);
                                    }
                                }
                            }
                            Action::Finished(_) => {}
                        }
                    }
                }
                if !acted && inbox.is_empty() {
                    break;
                }
            }
            for i in 0..sites.len() {
                if !busy[i]
                    && let Some((task, model)) = tasks[i].pop_front()
                {
                    let model = model.context("a swarm task without its model")?;
                    busy[i] = true;
                    self.work
                        .send((first + i, task, model))
                        .context("the workers stopped")?;
                }
            }
            if (have_final && watch.swarm_done()) || watch.swarm_failed() {
                return Ok(folded);
            }
            if clients.iter().all(|c| c.is_done()) {
                bail!("the region's swarm ended without a final model");
            }
            let wait = clients
                .iter()
                .filter_map(|c| c.poll_timeout())
                .min()
                .map(|at| at.saturating_since(self.now()))
                .unwrap_or(std::time::Duration::from_secs(1));
            match self.done.recv_timeout(wait) {
                Ok((g, result)) => {
                    let i = g - first;
                    busy[i] = false;
                    self.bytes_regions += result_bytes(&result);
                    inbox.push_back((i, Input::TaskDone(result, None)));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let now = self.now();
                    // What they ask is carried out at the top of the loop.
                    for c in &mut clients {
                        if c.poll_timeout().is_some_and(|t| t <= now) {
                            c.handle_timeout(now);
                        }
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the workers stopped")
                }
            }
        }
    }
}

/// The report as a table for the terminal.
pub fn format_table(r: &TieredReport) -> String {
    let mut s = format!(
        "{}: {} regions, {} sites, {:.1} s, peak RSS {}\n",
        r.job,
        r.regions,
        r.sites,
        r.seconds,
        r.peak_rss_mib
            .map_or("?".to_string(), |m| format!("{m:.0} MiB"))
    );
    s.push_str("round  regions  sites  seconds\n");
    for g in &r.rounds {
        s.push_str(&format!(
            "{:>5}  {:>7}  {:>5}  {:>7.2}\n",
            g.round, g.regions, g.sites, g.seconds
        ));
    }
    for (v, m) in &r.metrics {
        let line: Vec<String> = m
            .iter()
            .map(|(k, x)| format!("{k} {}", flare_node::display::metric(*x)))
            .collect();
        s.push_str(&format!("version {v}: {}\n", line.join(", ")));
    }
    s.push_str(&format!(
        "tier-1 model bytes {}, region model bytes {}, sites on the final model {}/{}\nfinal model: {}\n",
        r.bytes_tier1,
        r.bytes_regions,
        r.sites_on_final_model,
        r.sites,
        r.final_model.display()
    ));
    s
}
