//! `flare-node bench secagg`: what secure aggregation (SecAgg+) costs across real node
//! processes, against the goal of issue 17: at most 2× the bytes a site sends and 1.5× the
//! seconds a round takes, for 8 sites and models of 1e6 and 1e7 parameters, measured in one
//! run. (`cargo run --release -p flare-protocols --example bench_secagg` measures the
//! protocol's compute in one process; this measures the whole system.)
//!
//! What runs: for each model size and each workflow (scatter-and-gather, swarm), the
//! synthetic FedAvg job of [`crate::bench::write_synthetic_job`] without and with
//! `secure_aggregation` ([`crate::bench::synthetic_secagg_args`]), alternating: off, on for
//! the first pair, on, off for the second, … so that the drift of a shared machine hits both
//! alike. Each job runs on a POC federation of its own ([`Federation`]: a server and the site
//! processes, from a throw-away project on this machine), after a small unmeasured warm-up
//! job of the same workflow (the first connections, the first job on every process). A
//! federation of its own, because a swarm's sites go on uploading their final models to the
//! server after the job has ended (see `run_one`): on shared processes, that traffic would
//! land in the next job's bytes and compete with it for the CPU.
//!
//! What is measured, and why so:
//! - **Seconds per round**: the gaps between the server's `round aggregated` log lines
//!   (logged once a round in both workflows: the server's own aggregation, or a swarm
//!   aggregator's report), pooled over the jobs of a setting, median. A job's first round
//!   is left out: it also carries the job's deployment, its start on every process and the
//!   first model download, which secure aggregation does not change.
//! - **Bytes sent per site per round**: measured, not computed: the TCP payload bytes each
//!   site process sent (the kernel's per-socket `bytes_sent`, read with `ss`; noise and yamux
//!   framing and the sealed models included, TCP/IP headers not), from the first to the last
//!   `round aggregated` over the rounds between, averaged over the sites (in swarm the
//!   epoch's aggregator sends the new model to every trainer, so sites differ; min and max
//!   are kept). A socket that closed mid-job would lose its last bytes; the JSON counts them.
//!   A round's end is a moment, but the bytes around it are not: a swarm aggregator reports
//!   its round to the server and starts sending the new model at once, and the report takes
//!   its time to arrive, so part of that broadcast can fall either side of a boundary; the
//!   error at the first and at the last end cancels on average and shrinks with more rounds,
//!   but it needs rounds much longer than a report's way (at 1e5 parameters a swarm round
//!   is shorter than that, and the per-round bytes mean nothing). The bytes of the whole
//!   job over its rounds, which need no boundaries, are kept beside them as a check.
//! - **CPU seconds** each process used a round (`/proc/<pid>/stat`): what the work costs
//!   whatever else shares the machine's cores.
//! - **Where a scatter-and-gather round's time goes**: one site ([`LOGGED_SITE`]) logs each
//!   task it receives; the gaps between them time the SecAgg+ stages ([`site_stages`]).
//!
//! It writes `processes.md` (the table, the machine and the command on top) and
//! `processes.json` (every job's measurements) into the output folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use serde_json::{Value, json};

use crate::bench_net::{FedavgBench, Federation, JobRun, LOGGED_SITE, median, write_fedavg_job};

/// A workflow the benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workflow {
    /// The server aggregates.
    ScatterAndGather,
    /// A site aggregates each epoch.
    Swarm,
}

impl Workflow {
    /// Its name in the table and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Workflow::ScatterAndGather => "scatter-and-gather",
            Workflow::Swarm => "swarm",
        }
    }
}

impl std::str::FromStr for Workflow {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "scatter-and-gather" | "sag" => Ok(Workflow::ScatterAndGather),
            "swarm" => Ok(Workflow::Swarm),
            _ => Err(format!(
                "unknown workflow {s:?} (known: scatter-and-gather or sag, swarm)"
            )),
        }
    }
}

/// One `flare-node bench secagg` run.
#[derive(Debug, Clone)]
pub struct SecAggBench {
    /// Model sizes (f32 parameters).
    pub params: Vec<usize>,
    /// Site processes.
    pub clients: usize,
    /// Rounds of each measured job (the first is left out of the round times).
    pub rounds: u32,
    /// Pairs of jobs (without and with SecAgg+) per setting.
    pub repeats: u32,
    /// The workflows.
    pub workflows: Vec<Workflow>,
    /// Where processes.md and processes.json go.
    pub out: PathBuf,
    /// The command line, for the report.
    pub command: String,
}

/// One measured job.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    /// The workflow.
    pub workflow: Workflow,
    /// Model parameters.
    pub params: usize,
    /// With secure aggregation.
    pub secagg: bool,
    /// Its place in the setting's sequence (0 first).
    pub order: usize,
    /// Its `secure_aggregation` settings.
    pub secure_aggregation: Option<Value>,
    /// What it measured.
    pub run: JobRun,
    /// Scatter-and-gather: the seconds between the tasks [`LOGGED_SITE`] received, by
    /// stage, each round after the first ([`site_stages`]).
    pub site_stages: BTreeMap<String, Vec<f64>>,
}

/// One side (plain or SecAgg+) of a setting.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Side {
    /// Median seconds of a round after the first, pooled over the jobs.
    pub round_s: Option<f64>,
    /// The pooled round times it is the median of.
    pub rounds_pooled: Vec<f64>,
    /// Seconds from submission to the first round's end, mean over the jobs.
    pub first_round_s: Option<f64>,
    /// TCP bytes a site sent a round (after the first), mean over sites and jobs.
    pub site_bytes: Option<f64>,
    /// The least and most any site sent a round (mean over jobs).
    pub site_bytes_min: Option<f64>,
    /// See `site_bytes_min`.
    pub site_bytes_max: Option<f64>,
    /// TCP bytes the server sent a round (after the first), mean over jobs.
    pub server_bytes: Option<f64>,
    /// TCP bytes a site sent over the whole job (submission to end: the job's start, and
    /// its end: in swarm the final model to every site and its upload to the server) over
    /// its rounds, mean over sites and jobs: a check on `site_bytes` that needs no round
    /// boundaries.
    pub site_bytes_whole_job: Option<f64>,
    /// CPU seconds a site process used a round (after the first), mean over sites and jobs:
    /// the cost of its work whatever else shares the machine.
    pub site_cpu_s: Option<f64>,
    /// CPU seconds the server process used a round (after the first), mean over jobs.
    pub server_cpu_s: Option<f64>,
    /// Sockets of any process that closed during the jobs (their last bytes are missing).
    pub sockets_closed: usize,
    /// Scatter-and-gather: [`JobResult::site_stages`] pooled over the jobs, median.
    pub site_stages: BTreeMap<String, f64>,
}

/// One row of the table: a workflow and a model size, plain against SecAgg+.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The workflow.
    pub workflow: Workflow,
    /// Model parameters.
    pub params: usize,
    /// Sites.
    pub sites: usize,
    /// Without secure aggregation.
    pub plain: Side,
    /// With it.
    pub secagg: Side,
    /// SecAgg+ round time over plain.
    pub time_ratio: Option<f64>,
    /// SecAgg+ site bytes over plain.
    pub bytes_ratio: Option<f64>,
    /// Why the setting is incomplete, if it is.
    pub error: Option<String>,
}

/// What the whole run measured.
#[derive(Debug, Clone, Serialize)]
pub struct SecAggStudy {
    /// The machine, in words.
    pub machine: String,
    /// The 1-minute load average when the run started and when it ended: on a shared
    /// machine, what else ran.
    pub load_average: [Option<f64>; 2],
    /// The command line.
    pub command: String,
    /// Rounds per job.
    pub rounds: u32,
    /// Pairs per setting.
    pub repeats: u32,
    /// The table.
    pub rows: Vec<Row>,
    /// Every measured job, in the order run.
    pub jobs: Vec<JobResult>,
    /// Wall seconds of the whole run.
    pub seconds: f64,
}

/// Runs every setting, writes processes.md and processes.json into `b.out`, and returns
/// the study. A setting whose jobs fail is reported with its error; the others still run.
pub fn run_study(b: &SecAggBench) -> anyhow::Result<SecAggStudy> {
    anyhow::ensure!(
        b.rounds >= 2,
        "--rounds must be at least 2 (the first is left out)"
    );
    anyhow::ensure!(b.repeats >= 1, "--repeats must be at least 1");
    anyhow::ensure!(
        b.clients >= 2,
        "--clients must be at least 2 for secure aggregation"
    );
    let started = Instant::now();
    let load_before = load_average();
    let mut rows = Vec::new();
    let mut jobs = Vec::new();
    let settings = b.params.len() * b.workflows.len();
    let mut n = 0;
    for &params in &b.params {
        for &workflow in &b.workflows {
            n += 1;
            eprintln!(
                "[{n}/{settings}] {} with {params} parameters, {} sites: starting the federation",
                workflow.as_str(),
                b.clients
            );
            let mut mine = Vec::new();
            let error = run_setting(b, workflow, params, &mut mine)
                .err()
                .map(|e| format!("{e:#}"));
            if let Some(e) = &error {
                eprintln!("  failed: {e}");
            }
            let row = summarize(workflow, params, b.clients, &mine, error);
            eprintln!(
                "  s/round {} → {} ({}), bytes/site/round {} → {} ({})",
                fmt_s(row.plain.round_s),
                fmt_s(row.secagg.round_s),
                fmt_ratio(row.time_ratio),
                fmt_bytes(row.plain.site_bytes),
                fmt_bytes(row.secagg.site_bytes),
                fmt_ratio(row.bytes_ratio),
            );
            rows.push(row);
            jobs.extend(mine);
        }
    }
    let study = SecAggStudy {
        machine: machine(),
        load_average: [load_before, load_average()],
        command: b.command.clone(),
        rounds: b.rounds,
        repeats: b.repeats,
        rows,
        jobs,
        seconds: started.elapsed().as_secs_f64(),
    };
    write(&b.out, &study)?;
    Ok(study)
}

/// One setting: the alternating pairs, each job on a fresh, warmed-up federation.
fn run_setting(
    b: &SecAggBench,
    workflow: Workflow,
    params: usize,
    out: &mut Vec<JobResult>,
) -> anyhow::Result<()> {
    let mut order = 0;
    for pair in 0..b.repeats {
        let sides = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for secagg in sides {
            eprintln!(
                "  job {}/{}: {}",
                order + 1,
                2 * b.repeats,
                if secagg { "SecAgg+" } else { "plain" }
            );
            let r = run_one(b, workflow, params, secagg, order)
                .with_context(|| format!("job {order} (secagg {secagg})"))?;
            eprintln!(
                "  {}: s/round {}, bytes/site/round {}",
                if secagg { "SecAgg+" } else { "plain" },
                fmt_s(median(&r.run.round_s)),
                fmt_bytes(mean(
                    &r.run
                        .processes
                        .iter()
                        .flatten()
                        .filter(|p| p.process != "server")
                        .map(|p| p.per_round_after_first)
                        .collect::<Vec<_>>()
                )),
            );
            out.push(r);
            order += 1;
        }
    }
    Ok(())
}

/// One measured job on a federation of its own. A swarm's sites go on uploading their final
/// and best models to the server for a while after the job has ended (the server refuses
/// each upload of an ended job only once it has read it, and each site tries again, 40 MB
/// each time at 1e7 parameters), so a second job on the same processes would count that
/// traffic, and compete with it for the CPU: the processes end with the job instead.
fn run_one(
    b: &SecAggBench,
    workflow: Workflow,
    params: usize,
    secagg: bool,
    order: usize,
) -> anyhow::Result<JobResult> {
    let fed = Federation::start(b.clients).context("cannot start the federation")?;
    let job = |secagg: bool, params: usize, rounds: u32| FedavgBench {
        params,
        clients: b.clients,
        rounds,
        progress_every: 1,
        quantize: None,
        swarm: workflow == Workflow::Swarm,
        secagg,
    };
    let scratch = fed.scratch();
    // The warm-up: a small model, one round, secure aggregation on so its code paths are
    // warm too (the first connections, the first job on every process). Not measured.
    let warm = scratch.join("warm-up");
    write_fedavg_job(&warm, &job(true, 1000, 1))?;
    fed.run_job(&warm, 1, 0).context("the warm-up job")?;
    let dir = scratch.join("job");
    let args = write_fedavg_job(&dir, &job(secagg, params, b.rounds))?;
    let run = fed.run_job(&dir, b.rounds, 1)?;
    anyhow::ensure!(
        run.rounds_seen >= b.rounds as usize,
        "the server logged {} rounds of {}",
        run.rounds_seen,
        b.rounds
    );
    if let Some(e) = &run.bytes_error {
        anyhow::bail!("bytes sent could not be measured: {e}");
    }
    let site_stages = match (workflow, fed.site_log()) {
        (Workflow::ScatterAndGather, Some(log)) => {
            let text = std::fs::read_to_string(&log)
                .with_context(|| format!("cannot read {}", log.display()))?;
            site_stages(&text, &run.job_id)
        }
        _ => BTreeMap::new(),
    };
    Ok(JobResult {
        workflow,
        params,
        secagg,
        order,
        secure_aggregation: args,
        run,
        site_stages,
    })
}

/// Seconds into the day of a `fmt` log line's timestamp (`2026-01-01T20:56:01.123456Z …`).
fn log_seconds(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let time = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut hms = time.splitn(3, ':');
    let h: f64 = hms.next()?.parse().ok()?;
    let m: f64 = hms.next()?.parse().ok()?;
    let s: f64 = hms.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The seconds between the tasks a site received for job `job`, from its log's `task
/// received` lines (logged once the task's model is in), keyed `from → to` and listed for
/// each round after the first. A SecAgg+ round's tasks are `secagg` (setup), `secagg`
/// (neighbour keys), `train` (with the shares; the site answers with its masked input) and
/// `secagg` (unmask); they are named so: `setup`, `keys`, `train`, `unmask`.
pub fn site_stages(log: &str, job: &str) -> BTreeMap<String, Vec<f64>> {
    let mut events: Vec<(f64, u32, String)> = Vec::new();
    let mut secagg_in_round = (u32::MAX, 0, false);
    let mut last_t = None;
    let mut wrap = 0.0;
    for line in log.lines().filter(|l| l.contains("task received")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|t| t.strip_prefix(name)?.strip_prefix('='))
        };
        if field("job") != Some(job) {
            continue;
        }
        let (Some(task), Some(round), Some(t)) = (
            field("task"),
            field("round").and_then(|r| r.parse::<u32>().ok()),
            log_seconds(line),
        ) else {
            continue;
        };
        // Past midnight the clock starts again.
        if last_t.is_some_and(|l| t + wrap < l) {
            wrap += 86_400.0;
        }
        let t = t + wrap;
        last_t = Some(t);
        if secagg_in_round.0 != round {
            secagg_in_round = (round, 0, false);
        }
        let label = match task {
            "secagg" if secagg_in_round.2 => "unmask".to_string(),
            "secagg" => {
                secagg_in_round.1 += 1;
                if secagg_in_round.1 == 1 {
                    "setup"
                } else {
                    "keys"
                }
                .to_string()
            }
            "train" => {
                secagg_in_round.2 = true;
                "train".to_string()
            }
            other => other.to_string(),
        };
        events.push((t, round, label));
    }
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for w in events.windows(2) {
        let ((t0, round, a), (t1, _, b)) = (&w[0], &w[1]);
        if *round >= 1 {
            out.entry(format!("{a} → {b}")).or_default().push(t1 - t0);
        }
    }
    out
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn side(jobs: &[&JobResult]) -> Side {
    let rounds_pooled: Vec<f64> = jobs
        .iter()
        .flat_map(|j| j.run.round_s.iter().copied())
        .collect();
    let firsts: Vec<f64> = jobs.iter().filter_map(|j| j.run.first_round_s).collect();
    let mut site_mean = Vec::new();
    let mut site_min = Vec::new();
    let mut site_max = Vec::new();
    let mut server = Vec::new();
    let mut sockets_closed = 0;
    let mut site_cpu = Vec::new();
    let mut server_cpu = Vec::new();
    let mut site_whole = Vec::new();
    for j in jobs {
        let Some(bytes) = &j.run.processes else {
            continue;
        };
        let sites: Vec<f64> = bytes
            .iter()
            .filter(|p| p.process != "server")
            .map(|p| p.per_round_after_first)
            .collect();
        if let Some(m) = mean(&sites) {
            site_mean.push(m);
        }
        let whole: Vec<f64> = bytes
            .iter()
            .filter(|p| p.process != "server")
            .map(|p| p.total as f64 / f64::from(j.run.rounds.max(1)))
            .collect();
        if let Some(m) = mean(&whole) {
            site_whole.push(m);
        }
        if let Some(m) = sites.iter().copied().reduce(f64::min) {
            site_min.push(m);
        }
        if let Some(m) = sites.iter().copied().reduce(f64::max) {
            site_max.push(m);
        }
        server.extend(
            bytes
                .iter()
                .filter(|p| p.process == "server")
                .map(|p| p.per_round_after_first),
        );
        sockets_closed += bytes.iter().map(|p| p.sockets_closed).sum::<usize>();
        let cpu: Vec<f64> = bytes
            .iter()
            .filter(|p| p.process != "server")
            .map(|p| p.cpu_s_per_round_after_first)
            .collect();
        if let Some(m) = mean(&cpu) {
            site_cpu.push(m);
        }
        server_cpu.extend(
            bytes
                .iter()
                .filter(|p| p.process == "server")
                .map(|p| p.cpu_s_per_round_after_first),
        );
    }
    let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for j in jobs {
        for (k, v) in &j.site_stages {
            stages.entry(k.clone()).or_default().extend(v);
        }
    }
    Side {
        site_stages: stages
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), median(v)?)))
            .collect(),
        round_s: median(&rounds_pooled),
        rounds_pooled,
        first_round_s: mean(&firsts),
        site_bytes: mean(&site_mean),
        site_bytes_min: mean(&site_min),
        site_bytes_max: mean(&site_max),
        server_bytes: mean(&server),
        site_cpu_s: mean(&site_cpu),
        site_bytes_whole_job: mean(&site_whole),
        server_cpu_s: mean(&server_cpu),
        sockets_closed,
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn summarize(
    workflow: Workflow,
    params: usize,
    sites: usize,
    jobs: &[JobResult],
    error: Option<String>,
) -> Row {
    let of = |secagg: bool| -> Vec<&JobResult> {
        jobs.iter()
            .filter(|j| j.workflow == workflow && j.params == params && j.secagg == secagg)
            .collect()
    };
    let plain = side(&of(false));
    let secagg = side(&of(true));
    Row {
        workflow,
        params,
        sites,
        time_ratio: ratio(secagg.round_s, plain.round_s),
        bytes_ratio: ratio(secagg.site_bytes, plain.site_bytes),
        plain,
        secagg,
        error,
    }
}

fn fmt_s(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.3}"))
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}×"))
}

fn fmt_bytes(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.0}", v.round()))
}

fn fmt_params(p: usize) -> String {
    if p >= 1024 && p.is_power_of_two() {
        return format!("2^{}", p.trailing_zeros());
    }
    let (mut m, mut e) = (p, 0);
    while m >= 10 && m % 10 == 0 {
        m /= 10;
        e += 1;
    }
    if m == 1 && e > 0 {
        format!("1e{e}")
    } else {
        p.to_string()
    }
}

/// The CPU, its cores, the memory and the kernel, from `/proc`.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, v)| v.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or("?".to_string(), |kib| format!("{:.0}", kib / 1048576.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {mem_gib} GiB memory, Linux {}",
        kernel.trim()
    )
}

/// The 1-minute load average now (what else the machine is running).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The table of `s` in Markdown, with what was run on top.
pub fn format_table(s: &SecAggStudy) -> String {
    let mut t = String::new();
    t.push_str("# Secure aggregation (SecAgg+) across node processes\n\n");
    let load = |l: Option<f64>| l.map_or("?".into(), |l| format!("{l:.1}"));
    t.push_str(&format!(
        "Machine: {} (1-minute load average {} at the start, {} at the end: other work ran \
         beside it; compare the ratios within this run, not the seconds with other runs).\n\n",
        s.machine,
        load(s.load_average[0]),
        load(s.load_average[1]),
    ));
    t.push_str(&format!(
        "Command: `{}` ({:.0} s).\n\n",
        s.command, s.seconds
    ));
    t.push_str(&format!(
        "The synthetic FedAvg job of {} rounds without and with `secure_aggregation`, \
         alternating ({} pair(s): off, on, then on, off, …), each job on a POC federation of \
         its own on this machine (one server process and the site processes, warmed up by one \
         small unmeasured job). **s/round**: median gap between the server's `round aggregated` lines, \
         the first round of every job left out (it carries the job's deployment and start). \
         **bytes/site**: TCP payload bytes a site process sent a round, *measured* from the \
         kernel's per-socket counters (`ss`, `bytes_sent`: noise and yamux framing and the \
         sealed models included, TCP/IP headers not), from the first to the last round's end, \
         mean over the sites. The issue's goal: at most 2× the bytes and 1.5× the round time.\n\n",
        s.rounds, s.repeats
    ));
    t.push_str("| workflow | params | sites | s/round plain | s/round SecAgg+ | ratio | bytes/site plain | bytes/site SecAgg+ | ratio |\n");
    t.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in &s.rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.workflow.as_str(),
            fmt_params(r.params),
            r.sites,
            fmt_s(r.plain.round_s),
            fmt_s(r.secagg.round_s),
            fmt_ratio(r.time_ratio),
            fmt_bytes(r.plain.site_bytes),
            fmt_bytes(r.secagg.site_bytes),
            fmt_ratio(r.bytes_ratio),
        ));
    }
    t.push_str(
        "\nDetails (plain → SecAgg+): the first round from submission (left out above), \
         the CPU seconds a site process and the server process used a round (user and \
         system, from `/proc/<pid>/stat`, rounds after the first: the work itself, whatever \
         else shares the cores), the least and most a site sent a round, what a site sent \
         over the whole job over its rounds (no round boundaries needed; the job's start and \
         end included), the server's bytes a round, the round times pooled.\n\n",
    );
    t.push_str("| workflow | params | first round s | CPU s/round a site | CPU s/round server | site bytes min–max | site bytes, whole job / rounds | server bytes/round | round times s |\n");
    t.push_str("|---|---|---|---|---|---|---|---|---|\n");
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for r in &s.rows {
        t.push_str(&format!(
            "| {} | {} | {} → {} | {} → {} | {} → {} | {}–{} → {}–{} | {} → {} ({}) | {} → {} | [{}] → [{}] |\n",
            r.workflow.as_str(),
            fmt_params(r.params),
            fmt_s(r.plain.first_round_s),
            fmt_s(r.secagg.first_round_s),
            fmt_s(r.plain.site_cpu_s),
            fmt_s(r.secagg.site_cpu_s),
            fmt_s(r.plain.server_cpu_s),
            fmt_s(r.secagg.server_cpu_s),
            fmt_bytes(r.plain.site_bytes_min),
            fmt_bytes(r.plain.site_bytes_max),
            fmt_bytes(r.secagg.site_bytes_min),
            fmt_bytes(r.secagg.site_bytes_max),
            fmt_bytes(r.plain.site_bytes_whole_job),
            fmt_bytes(r.secagg.site_bytes_whole_job),
            fmt_ratio(ratio(r.secagg.site_bytes_whole_job, r.plain.site_bytes_whole_job)),
            fmt_bytes(r.plain.server_bytes),
            fmt_bytes(r.secagg.server_bytes),
            list(&r.plain.rounds_pooled),
            list(&r.secagg.rounds_pooled),
        ));
    }
    let staged: Vec<&Row> = s
        .rows
        .iter()
        .filter(|r| !r.plain.site_stages.is_empty() || !r.secagg.site_stages.is_empty())
        .collect();
    if !staged.is_empty() {
        t.push_str(&format!(
            "\nWhere a scatter-and-gather round's time goes, as {LOGGED_SITE} saw it: seconds \
             from each task it received (once the task's model was in) to the next, median \
             over the rounds after the first. SecAgg+: `setup` and `keys` are the key stages, \
             `train → unmask` is every site's training, masking and upload of its masked \
             input, `unmask → setup` is the unmasking, the new global model and the next \
             round's start.\n\n"
        ));
        let stages = |m: &BTreeMap<String, f64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v:.3}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        for r in staged {
            t.push_str(&format!(
                "- {}: plain: {}. SecAgg+: {}.\n",
                fmt_params(r.params),
                stages(&r.plain.site_stages),
                stages(&r.secagg.site_stages),
            ));
        }
    }
    let closed: usize = s
        .rows
        .iter()
        .map(|r| r.plain.sockets_closed + r.secagg.sockets_closed)
        .sum();
    if closed > 0 {
        t.push_str(&format!(
            "\n{closed} socket(s) closed during measured jobs: what each sent after its last \
             sample (every 250 ms and at each round's end) is not counted.\n"
        ));
    }
    for r in s.rows.iter().filter(|r| r.error.is_some()) {
        t.push_str(&format!(
            "\n{} with {} parameters did not complete: {}\n",
            r.workflow.as_str(),
            fmt_params(r.params),
            r.error.as_deref().unwrap_or_default()
        ));
    }
    t
}

fn write(out: &Path, s: &SecAggStudy) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let md = out.join("processes.md");
    std::fs::write(&md, format_table(s))
        .with_context(|| format!("cannot write {}", md.display()))?;
    let js = out.join("processes.json");
    let v: Value = json!(s);
    std::fs::write(&js, serde_json::to_vec_pretty(&v)?)
        .with_context(|| format!("cannot write {}", js.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflows_parse_by_either_name() {
        assert_eq!("sag".parse(), Ok(Workflow::ScatterAndGather));
        assert_eq!("scatter-and-gather".parse(), Ok(Workflow::ScatterAndGather));
        assert_eq!("swarm".parse(), Ok(Workflow::Swarm));
        assert!("cyclic".parse::<Workflow>().is_err());
    }

    #[test]
    fn model_sizes_print_as_powers() {
        assert_eq!(fmt_params(1_000_000), "1e6");
        assert_eq!(fmt_params(10_000_000), "1e7");
        assert_eq!(fmt_params(1 << 20), "2^20");
        assert_eq!(fmt_params(1234), "1234");
    }

    #[test]
    fn a_site_log_gives_the_stages_of_each_round_after_the_first() {
        let line = |t: &str, job: &str, task: &str, round: u32| {
            format!(
                "2026-01-01T{t}Z  INFO flare_node::roles::client: task received job={job} task={task} round={round}\n"
            )
        };
        let mut log = String::new();
        for (t, task, round) in [
            ("10:00:00.0", "secagg", 0),
            ("10:00:00.1", "secagg", 0),
            ("10:00:00.2", "train", 0),
            ("10:00:01.0", "secagg", 0),
            ("10:00:02.0", "secagg", 1),
            ("10:00:02.5", "secagg", 1),
            ("10:00:03.0", "train", 1),
            ("10:00:05.0", "secagg", 1),
            ("10:00:05.5", "secagg", 2),
        ] {
            log.push_str(&line(t, "j1", task, round));
        }
        log.push_str(&line("10:00:04.0", "other", "train", 1));
        log.push_str("garbage line\n");
        let s = site_stages(&log, "j1");
        let close = |k: &str, want: &[f64]| {
            let got = &s[k];
            assert_eq!(got.len(), want.len(), "{k}: {got:?}");
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-9, "{k}: {got:?}");
            }
        };
        close("setup → keys", &[0.5]);
        close("keys → train", &[0.5]);
        close("train → unmask", &[2.0]);
        close("unmask → setup", &[0.5]);
        assert_eq!(s.len(), 4, "{s:?}");
        assert!(site_stages(&log, "nothing").is_empty());
    }

    #[test]
    fn ratios_need_both_sides() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
    }
}
