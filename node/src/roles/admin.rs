//! The admin console (`flare-node admin <cmd> --kit <admin>/startup`): connects to the server
//! with the admin's kit, sends one command, prints the answer as a table (or JSON with
//! `--json`), and exits with a code scripts can use. Tables show metrics to four decimals and
//! times as local time ([`crate::display`]); JSON keeps the raw values.
//!
//! Everything the console prints goes through [`Console`]: a reader that goes away
//! (`admin list | head -1`) ends the output quietly, as with any Unix tool, never a panic.
//! Object keys are printed in natural order (`2` before `10`, `site-2` before `site-10`), in
//! tables and in JSON alike ([`natural_cmp`]).

use std::cmp::Ordering;
use std::fmt::Display;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Subcommand;
use flare_provision::kit::load_kit;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

use super::{ConnectOptions, connect_with, peer_addrs, start_net};
use crate::display::{self, cell};
use crate::net::bulk::Sealing;
use crate::net::download;
use crate::net::protocol::{AdminRequest, ControlRequest, ControlResponse, DOWNLOAD_PROTOCOL};

/// Exit code: the command succeeded.
pub const EXIT_OK: i32 = 0;
/// Exit code: the server refused or failed the command.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: the kit is invalid or the server cannot be reached.
pub const EXIT_UNREACHABLE: i32 = 3;

/// Admin commands.
#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// Sign a job folder with the admin key and submit it.
    Submit {
        /// The job folder.
        job_dir: PathBuf,
    },
    /// List all jobs.
    List,
    /// The server and its sites, or one job in detail.
    Status {
        /// A job id.
        job: Option<String>,
    },
    /// Stop a job.
    Abort {
        /// Job id.
        job: String,
    },
    /// Fetch a finished job's results into the admin's transfer folder.
    Download {
        /// Job id.
        job: String,
        /// Where to put the files [default: <admin>/transfer/<job>].
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Remove a job that is not running.
    Delete {
        /// Job id.
        job: String,
    },
    /// Submit a copy of a job.
    Clone {
        /// Job id.
        job: String,
    },
    /// Connected sites and how they are connected.
    Sites,
    /// Wait until a job is finished, failed or aborted (exit 0 only if finished).
    Wait {
        /// Job id.
        job: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

/// How the console reaches the server: dial rounds a second apart, five failed ones in a row
/// (nothing listens: about 5 s, time for a server that is just starting) and it gives up; a
/// server that refuses the kit (or whose certificate the kit refuses) is reported at once.
fn connect_options() -> ConnectOptions {
    ConnectOptions {
        timeout: Duration::from_secs(15),
        redial: Duration::from_secs(1),
        give_up_after_failed_rounds: Some(5),
    }
}

/// The console's standard output. A closed reader (`BrokenPipe`) stops the output quietly;
/// another write error is reported once on stderr. Nothing here panics.
#[derive(Debug)]
pub struct Console {
    closed: bool,
}

impl Console {
    /// Standard output.
    pub fn stdout() -> Self {
        Console { closed: false }
    }

    /// Prints one line (or several, if `text` has newlines).
    pub fn line(&mut self, text: impl Display) {
        if self.closed {
            return;
        }
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
            self.closed = true;
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                err_line(format_args!("error: cannot write the output: {e}"));
            }
        }
    }
}

/// Prints a line on stderr; a closed stderr is ignored.
fn err_line(text: impl Display) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Runs one admin command; returns the process exit code.
pub async fn run(kit_dir: &Path, cmd: AdminCommand, json_out: bool) -> i32 {
    let mut out = Console::stdout();
    match run_inner(kit_dir, cmd, json_out, &mut out).await {
        Ok(code) => code,
        Err(e) => {
            err_line(format_args!("error: {e:#}"));
            EXIT_UNREACHABLE
        }
    }
}

async fn run_inner(
    kit_dir: &Path,
    cmd: AdminCommand,
    json_out: bool,
    out: &mut Console,
) -> anyhow::Result<i32> {
    let kit = load_kit(kit_dir, SystemTime::now())
        .with_context(|| format!("admin kit {}", kit_dir.display()))?;
    // A job folder is checked and signed before the server is contacted.
    let bundle = match &cmd {
        AdminCommand::Submit { job_dir } => {
            match crate::jobpack::pack(job_dir, &kit.identity.signing) {
                Ok(b) => Some(b),
                Err(e) => {
                    err_line(format_args!("error: job folder {}: {e}", job_dir.display()));
                    return Ok(EXIT_FAILED);
                }
            }
        }
        _ => None,
    };
    let session = AdminSession::connect_kit(kit).await?;
    let ask = |req: AdminRequest| session.request(req);
    let kit = &session.kit;
    let transfer = kit
        .participant_dir()
        .map(|d| d.join("transfer"))
        .unwrap_or_else(|| PathBuf::from("transfer"));
    let req = match &cmd {
        AdminCommand::Submit { .. } => match bundle {
            Some(b) => AdminRequest::Submit(b),
            None => anyhow::bail!("no job bundle"),
        },
        AdminCommand::List => AdminRequest::List,
        AdminCommand::Status { job } => AdminRequest::Status { job: job.clone() },
        AdminCommand::Abort { job } => AdminRequest::Abort { job: job.clone() },
        AdminCommand::Download { job, .. } => AdminRequest::Download { job: job.clone() },
        AdminCommand::Delete { job } => AdminRequest::Delete { job: job.clone() },
        AdminCommand::Clone { job } => AdminRequest::Clone { job: job.clone() },
        AdminCommand::Sites => AdminRequest::Sites,
        AdminCommand::Wait { job, timeout } => {
            let start = Instant::now();
            let mut progress = (!json_out).then(|| Progress::new(std::io::stderr().is_terminal()));
            loop {
                let resp = ask(AdminRequest::Status {
                    job: Some(job.clone()),
                })
                .await?;
                let (v, _) = match unpack(resp) {
                    Ok(x) => x,
                    Err(reason) => {
                        err_line(format_args!("error: {reason}"));
                        return Ok(EXIT_FAILED);
                    }
                };
                let state = v["state"].as_str().unwrap_or("").to_string();
                if let Some(p) = &mut progress {
                    p.show(&v, start.elapsed(), out);
                }
                if matches!(state.as_str(), "finished" | "failed" | "aborted") {
                    if let Some(p) = progress.take() {
                        p.finish();
                    }
                    print_value(out, &cmd, &v, json_out);
                    return Ok(if state == "finished" {
                        EXIT_OK
                    } else {
                        EXIT_FAILED
                    });
                }
                if start.elapsed() > Duration::from_secs(*timeout) {
                    err_line(format_args!(
                        "error: job {job} is still {state} after {timeout} s"
                    ));
                    return Ok(EXIT_FAILED);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let resp = ask(req).await?;
    let (v, files) = match unpack(resp) {
        Ok(x) => x,
        Err(reason) => {
            err_line(format_args!("error: {reason}"));
            return Ok(EXIT_FAILED);
        }
    };
    if let AdminCommand::Download { job, output } = &cmd {
        let dir = output.clone().unwrap_or_else(|| transfer.join(job));
        let names: Vec<String> = if v.get("stream").is_some() {
            // Today's servers list the files and stream them, sealed, over a download stream.
            let expected = listed_files(&v)?;
            if let Err(e) = session.fetch_files(job, &expected, &dir).await {
                err_line(format_args!("error: download of {job}: {e:#}"));
                return Ok(EXIT_FAILED);
            }
            expected.into_iter().map(|e| e.name).collect()
        } else {
            // Older servers send the files inline.
            for (rel, bytes) in &files {
                if !download::safe_name(rel) {
                    anyhow::bail!("the server sent a file with an unsafe path {rel:?}");
                }
                let p = dir.join(rel);
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| parent.display().to_string())?;
                }
                std::fs::write(&p, bytes).with_context(|| p.display().to_string())?;
            }
            files.keys().cloned().collect()
        };
        if json_out {
            out.line(serde_json::json!({"job_id": job, "dir": dir, "files": names}));
        } else {
            out.line(format_args!(
                "downloaded {} files of job {job} into {}",
                names.len(),
                dir.display()
            ));
            for f in &names {
                out.line(format_args!("  {}", dir.join(f).display()));
            }
            // A statistics job's result: its table too.
            for f in names.iter().filter(|f| f.ends_with(".json")) {
                if let Some(stats) = crate::stats::read_output(&dir.join(f)) {
                    out.line(format_args!("statistics ({f}):"));
                    for l in crate::stats::format_table(&stats).lines() {
                        out.line(l);
                    }
                }
            }
        }
        return Ok(EXIT_OK);
    }
    print_value(out, &cmd, &v, json_out);
    Ok(EXIT_OK)
}

/// An admin's connection to its server, with the admin's identity: what the console and the
/// dashboard (`crate::dashboard`) send their commands through. The server checks each command
/// against its `authorization.json` for this admin, whoever drives the session.
#[derive(Debug)]
pub struct AdminSession {
    kit: flare_provision::kit::Kit,
    net: crate::net::NetHandle,
    server: libp2p::PeerId,
    addrs: Vec<libp2p::Multiaddr>,
}

impl AdminSession {
    /// Loads and checks the admin kit at `kit_dir`, then connects to its server.
    pub async fn connect(kit_dir: &Path) -> anyhow::Result<Self> {
        let kit = load_kit(kit_dir, SystemTime::now())
            .with_context(|| format!("admin kit {}", kit_dir.display()))?;
        Self::connect_kit(kit).await
    }

    async fn connect_kit(kit: flare_provision::kit::Kit) -> anyhow::Result<Self> {
        let (net, _events) = start_net(&kit, false)?;
        let (server, addrs) = peer_addrs(&kit.config.server)?;
        connect_with(&net, server, &addrs, &connect_options()).await?;
        Ok(AdminSession {
            kit,
            net,
            server,
            addrs,
        })
    }

    /// The admin's kit.
    pub fn kit(&self) -> &flare_provision::kit::Kit {
        &self.kit
    }

    /// Sends one admin command and returns the raw answer; a lost connection is dialled
    /// again once (a restarted server) before the error is returned.
    pub async fn request(&self, req: AdminRequest) -> anyhow::Result<ControlResponse> {
        match self
            .net
            .request(self.server, ControlRequest::Admin(req.clone()))
            .await
        {
            Ok(r) => Ok(r),
            Err(first) => {
                if self.net.peers.get(&self.server).is_some() {
                    return Err(first.into());
                }
                connect_with(&self.net, self.server, &self.addrs, &connect_options()).await?;
                Ok(self
                    .net
                    .request(self.server, ControlRequest::Admin(req))
                    .await?)
            }
        }
    }

    /// Sends one admin command: the answer's JSON, or the server's refusal (`Ok(Err(why))`).
    pub async fn ask(&self, req: AdminRequest) -> anyhow::Result<Result<Value, String>> {
        Ok(unpack(self.request(req).await?).map(|(v, _)| v))
    }

    /// Downloads a finished job's result files into `dir`; the names of the files, or the
    /// server's refusal.
    pub async fn download(
        &self,
        job: &str,
        dir: &Path,
    ) -> anyhow::Result<Result<Vec<String>, String>> {
        let v = match self.ask(AdminRequest::Download { job: job.into() }).await? {
            Ok(v) => v,
            Err(why) => return Ok(Err(why)),
        };
        let expected = listed_files(&v)?;
        self.fetch_files(job, &expected, dir).await?;
        Ok(Ok(expected.into_iter().map(|e| e.name).collect()))
    }

    /// Opens a download stream to the server and receives `job`'s files into `dir`.
    async fn fetch_files(
        &self,
        job: &str,
        expected: &[download::FileEntry],
        dir: &Path,
    ) -> anyhow::Result<()> {
        let from = self
            .net
            .peers
            .get(&self.server)
            .context("the server disconnected")?;
        let sealing = Sealing::new(self.net.local, self.kit.identity.sealing.clone());
        let mut stream = self
            .net
            .streams
            .clone()
            .open_stream(self.server, DOWNLOAD_PROTOCOL)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open a download stream: {e}"))?;
        download::request(&mut stream, job).await?;
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        download::receive_files(&mut stream, &sealing, &from, job, expected, dir).await?;
        Ok(())
    }
}

/// Where a job stands, read off its status for `admin wait`: the round done, the rounds in
/// all, who aggregated the last one (swarm), and the last global accuracy.
#[derive(Debug, Clone, PartialEq)]
struct Standing {
    round: u64,
    num_rounds: Option<u64>,
    aggregator: Option<String>,
    accuracy: Option<f64>,
}

impl Standing {
    fn of(v: &Value) -> Option<Standing> {
        let round = v["round"].as_u64()?;
        let aggregator = v["history"].as_array().and_then(|h| {
            h.iter().rev().find_map(|e| {
                let note = e["note"].as_str()?;
                let at = note.find("aggregated by ")? + "aggregated by ".len();
                Some(note[at..].split([':', ' ', ',']).next()?.to_string())
            })
        });
        let accuracy = v["metrics"].as_object().and_then(|m| {
            m.iter()
                .filter_map(|(k, x)| Some((k.parse::<u64>().ok()?, x["accuracy"].as_f64()?)))
                .max_by_key(|(k, _)| *k)
                .map(|(_, a)| a)
        });
        Some(Standing {
            round,
            num_rounds: v["num_rounds"].as_u64(),
            aggregator,
            accuracy,
        })
    }

    /// `round 3/5 · aggregated by site-2 · accuracy 0.9312`.
    fn detail(&self) -> String {
        let mut s = match self.num_rounds {
            Some(n) => format!("round {}/{n}", self.round),
            None => format!("round {}", self.round),
        };
        if let Some(a) = &self.aggregator {
            s.push_str(&format!(" · aggregated by {a}"));
        }
        if let Some(a) = self.accuracy {
            s.push_str(&format!(" · accuracy {a:.4}"));
        }
        s
    }

    /// Seconds left, from the pace so far.
    fn eta(&self, elapsed: Duration) -> Option<Duration> {
        let n = self.num_rounds?;
        (self.round > 0 && n >= self.round)
            .then(|| elapsed.mul_f64((n - self.round) as f64 / self.round as f64))
    }
}

/// `admin wait`'s progress: a live bar on a terminal (stderr), one line per new round when
/// the output is a pipe (stdout, before the final table).
#[derive(Debug)]
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last: Option<Standing>,
}

impl Progress {
    fn new(terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {msg} (ETA {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Progress { bar, last: None }
    }

    fn show(&mut self, v: &Value, elapsed: Duration, out: &mut Console) {
        let Some(now) = Standing::of(v) else {
            if let Some(b) = &self.bar {
                b.set_message(s(&v["state"]));
            }
            return;
        };
        match &self.bar {
            Some(b) => {
                if let Some(n) = now.num_rounds {
                    b.set_length(n);
                }
                b.set_position(now.round);
                b.set_message(now.detail());
            }
            None => {
                if self.last.as_ref().is_none_or(|l| l.round != now.round) {
                    let eta = now
                        .eta(elapsed)
                        .map(|d| format!(", ETA {:.0} s", d.as_secs_f64()))
                        .unwrap_or_default();
                    out.line(format_args!(
                        "{} (elapsed {:.1} s{eta})",
                        now.detail(),
                        elapsed.as_secs_f64()
                    ));
                }
            }
        }
        self.last = Some(now);
    }

    fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// The file list of a `download` answer: `files` (names) and `sizes`, in the same order.
fn listed_files(v: &Value) -> anyhow::Result<Vec<download::FileEntry>> {
    let names = v["files"]
        .as_array()
        .context("download answer without files")?;
    let sizes = v["sizes"]
        .as_array()
        .context("download answer without sizes")?;
    anyhow::ensure!(
        names.len() == sizes.len(),
        "download answer: files and sizes differ"
    );
    names
        .iter()
        .zip(sizes)
        .map(|(n, s)| {
            let name = n.as_str().context("download answer: bad file name")?;
            anyhow::ensure!(
                download::safe_name(name),
                "the server sent a file with an unsafe path {name:?}"
            );
            Ok(download::FileEntry {
                name: name.to_string(),
                size: s.as_u64().context("download answer: bad size")?,
            })
        })
        .collect()
}

type Files = std::collections::BTreeMap<String, serde_bytes::ByteBuf>;

fn unpack(resp: ControlResponse) -> Result<(Value, Files), String> {
    match resp {
        ControlResponse::Admin { json, files } => {
            let v = serde_json::from_str(&json)
                .map_err(|e| format!("bad answer from the server: {e}"))?;
            Ok((v, files))
        }
        ControlResponse::Error { reason } | ControlResponse::Refused { reason } => Err(reason),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.clone()));
    }
    out
}

fn sites_table(sites: &Value) -> String {
    let rows: Vec<Vec<String>> = sites
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    vec![
                        s(&x["name"]),
                        s(&x["org"]),
                        s(&x["connection"]),
                        s(&x["address"]),
                        s(&x["last_heartbeat_ms_ago"]),
                        duplicates(&x["duplicates"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "SITE",
            "ORG",
            "CONNECTION",
            "ADDRESS",
            "HEARTBEAT_MS_AGO",
            "REFUSED_DUPLICATES",
        ],
        &rows,
    )
}

/// A job's history: when (local time, and since the job was submitted), the state, why. The
/// raw Unix milliseconds stay in `--json`.
fn history_table(submitted_ms: Option<u64>, history: &[Value]) -> String {
    let start = submitted_ms.or_else(|| history.first().and_then(|e| e["at_ms"].as_u64()));
    let rows: Vec<Vec<String>> = history
        .iter()
        .map(|e| {
            let (time, since) = match (e["at_ms"].as_u64(), start) {
                (Some(at), Some(start)) => (display::local_time(at), display::since(start, at)),
                (Some(at), None) => (display::local_time(at), "-".into()),
                (None, _) => ("-".into(), "-".into()),
            };
            vec![time, since, s(&e["state"]), s(&e["note"])]
        })
        .collect();
    table(&["TIME", "SINCE_SUBMIT", "STATE", "NOTE"], &rows)
}

/// The refused second processes of a site: how many, the last one's address and age.
fn duplicates(d: &Value) -> String {
    match d["count"].as_u64() {
        Some(n) if n > 0 => format!(
            "{n} (last from {}, {} ms ago)",
            s(&d["address"]),
            s(&d["last_ms_ago"])
        ),
        _ => "-".into(),
    }
}

/// Natural order of object keys: runs of digits compare as numbers (`2` < `10`,
/// `site-2` < `site-10`), the rest as text.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let b = s.as_bytes();
        for i in 1..=b.len() {
            if i == b.len() || b[i].is_ascii_digit() != b[start].is_ascii_digit() {
                out.push((b[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, xa), (db, xb)) in ca.iter().zip(&cb) {
        let o = if *da && *db {
            let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            xa.cmp(xb)
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    ca.len().cmp(&cb.len()).then_with(|| a.cmp(b))
}

/// A JSON value serialized with its object keys in [`natural_cmp`] order (serde_json's map
/// keeps keys sorted as strings).
struct Natural<'a>(&'a Value);

impl Serialize for Natural<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort_by(|a, b| natural_cmp(a, b));
                let mut map = ser.serialize_map(Some(keys.len()))?;
                for k in keys {
                    map.serialize_entry(k, &Natural(&m[k]))?;
                }
                map.end()
            }
            Value::Array(a) => {
                let mut seq = ser.serialize_seq(Some(a.len()))?;
                for x in a {
                    seq.serialize_element(&Natural(x))?;
                }
                seq.end()
            }
            other => other.serialize(ser),
        }
    }
}

/// `v` as compact JSON, keys in natural order.
fn natural_json(v: &Value) -> String {
    serde_json::to_string(&Natural(v)).unwrap_or_else(|_| v.to_string())
}

/// An object's entries in natural key order.
fn natural_entries(m: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut e: Vec<(&String, &Value)> = m.iter().collect();
    e.sort_by(|a, b| natural_cmp(a.0, b.0));
    e
}

fn print_value(out: &mut Console, cmd: &AdminCommand, v: &Value, json_out: bool) {
    if json_out {
        out.line(natural_json(v));
        return;
    }
    match cmd {
        AdminCommand::List => {
            let rows: Vec<Vec<String>> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|j| {
                            vec![
                                s(&j["id"]),
                                s(&j["name"]),
                                s(&j["state"]),
                                s(&j["round"]),
                                s(&j["submitter"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.line(table(
                &["JOB", "NAME", "STATE", "ROUND", "SUBMITTER"],
                &rows,
            ));
        }
        AdminCommand::Sites => out.line(sites_table(v)),
        AdminCommand::Status { job: None } => {
            out.line(format_args!(
                "server {} ({}), up {} s, {} jobs ({} running), relay circuits {} opened / {} closed",
                s(&v["server"]),
                s(&v["peer_id"]),
                s(&v["uptime_s"]),
                s(&v["jobs"]),
                s(&v["running"]),
                s(&v["relay_circuits_opened"]),
                s(&v["relay_circuits_closed"])
            ));
            out.line(sites_table(&v["sites"]));
        }
        AdminCommand::Status { job: Some(_) } | AdminCommand::Wait { .. } => {
            out.line(format_args!(
                "job {} ({}): {}, round {}",
                s(&v["id"]),
                s(&v["name"]),
                s(&v["state"]),
                s(&v["round"])
            ));
            if let Some(sites) = v["sites"].as_object() {
                let rows: Vec<Vec<String>> = natural_entries(sites)
                    .into_iter()
                    .map(|(k, x)| vec![k.clone(), s(x)])
                    .collect();
                out.line(table(&["SITE", "STATE"], &rows));
            }
            if let Some(m) = v["metrics"].as_object() {
                // A differentially private run also shows the privacy spent per version.
                let dp = m.values().any(|x| x.get("privacy_epsilon").is_some());
                let rows: Vec<Vec<String>> = natural_entries(m)
                    .into_iter()
                    .map(|(k, x)| {
                        let mut row = vec![k.clone(), cell(&x["accuracy"]), cell(&x["loss"])];
                        if dp {
                            row.push(cell(&x["privacy_epsilon"]));
                            row.push(cell(&x["privacy_delta"]));
                        }
                        row
                    })
                    .collect();
                if dp {
                    out.line(table(
                        &["VERSION", "ACCURACY", "LOSS", "EPSILON", "DELTA"],
                        &rows,
                    ));
                } else {
                    out.line(table(&["VERSION", "ACCURACY", "LOSS"], &rows));
                }
            }
            if let Some(h) = v["history"].as_array() {
                out.line(history_table(v["submitted_ms"].as_u64(), h));
            }
        }
        _ => out.line(natural_json(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_reads_the_round_the_aggregator_and_the_accuracy() {
        let v: Value = serde_json::from_str(
            r#"{"state": "running", "round": 2, "num_rounds": 5,
                "metrics": {"0": {"accuracy": 0.1}, "2": {"accuracy": 0.93}, "10": {"loss": 1.0}},
                "history": [{"note": "epoch 0.0 aggregated by site-3: accepted [], pruned []"},
                            {"note": "epoch 1.0 aggregated by site-12: accepted [], pruned []"},
                            {"note": "site-2 left"}]}"#,
        )
        .unwrap();
        let st = Standing::of(&v).unwrap();
        assert_eq!(
            st.detail(),
            "round 2/5 · aggregated by site-12 · accuracy 0.9300"
        );
        assert_eq!(
            st.eta(Duration::from_secs(10)),
            Some(Duration::from_secs(15))
        );
        assert!(Standing::of(&serde_json::json!({"state": "submitted"})).is_none());
        let sag: Value = serde_json::from_str(r#"{"round": 0, "metrics": {}}"#).unwrap();
        let st = Standing::of(&sag).unwrap();
        assert_eq!(
            (st.detail(), st.eta(Duration::from_secs(3))),
            ("round 0".into(), None)
        );
    }

    #[test]
    fn history_shows_local_times_and_time_since_submit_not_milliseconds() {
        let h: Vec<Value> = serde_json::from_str(
            r#"[{"at_ms": 1709210096789, "state": "submitted", "note": "by admin"},
                {"at_ms": 1709210109089, "state": "running", "note": "started"},
                {"state": "running", "note": "no time"}]"#,
        )
        .unwrap();
        let t = history_table(Some(1_709_210_096_789), &h);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["TIME", "SINCE_SUBMIT", "STATE", "NOTE"]
        );
        let first = display::local_time(1_709_210_096_789);
        assert!(lines[1].starts_with(&format!("{first}  +0.0s ")), "{t}");
        let second = display::local_time(1_709_210_109_089);
        assert!(lines[2].starts_with(&format!("{second}  +12.3s")), "{t}");
        assert!(lines[3].starts_with("-  "), "{t}");
        assert!(!t.contains("17092"), "{t}");
        // Without submitted_ms (an older server), the first entry is the start.
        let t = history_table(None, &h);
        assert!(t.lines().nth(2).unwrap().contains("+12.3s"), "{t}");
    }

    #[test]
    fn natural_order_counts_digits_as_numbers() {
        let mut keys = vec![
            "10", "2", "1", "0", "11", "site-10", "site-2", "best", "007",
        ];
        keys.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            keys,
            [
                "0", "1", "2", "007", "10", "11", "best", "site-2", "site-10"
            ]
        );
    }

    #[test]
    fn json_keys_come_out_in_natural_order() {
        let v: Value = serde_json::from_str(r#"{"m":{"10":1,"2":2,"1":{"b":1,"a":2}}}"#).unwrap();
        assert_eq!(
            natural_json(&v),
            r#"{"m":{"1":{"a":2,"b":1},"2":2,"10":1}}"#
        );
    }
}
