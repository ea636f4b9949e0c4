//! The admin console (`flare-node admin <cmd> --kit <admin>/startup`): connects to the server
//! with the admin's kit, sends one command, prints the answer as a table (or JSON with
//! `--json`), and exits with a code scripts can use.
//!
//! Everything the console prints goes through [`Console`]: a reader that goes away
//! (`admin list | head -1`) ends the output quietly, as with any Unix tool, never a panic.
//! Object keys are printed in natural order (`2` before `10`, `site-2` before `site-10`), in
//! tables and in JSON alike ([`natural_cmp`]).

use std::cmp::Ordering;
use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Subcommand;
use flare_provision::kit::load_kit;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

use super::{ConnectOptions, connect_with, peer_addrs, start_net};
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
    let (net, _events) = start_net(&kit, false)?;
    let (server, addrs) = peer_addrs(&kit.config.server)?;
    connect_with(&net, server, &addrs, &connect_options()).await?;
    let ask = |req: AdminRequest| {
        let net = net.clone();
        async move { net.request(server, ControlRequest::Admin(req)).await }
    };
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
                if matches!(state.as_str(), "finished" | "failed" | "aborted") {
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
            if let Err(e) = fetch_files(&net, &kit, server, job, &expected, &dir).await {
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
        }
        return Ok(EXIT_OK);
    }
    print_value(out, &cmd, &v, json_out);
    Ok(EXIT_OK)
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

/// Opens a download stream to the server and receives `job`'s files into `dir`.
async fn fetch_files(
    net: &crate::net::NetHandle,
    kit: &flare_provision::kit::Kit,
    server: libp2p::PeerId,
    job: &str,
    expected: &[download::FileEntry],
    dir: &Path,
) -> anyhow::Result<()> {
    let from = net.peers.get(&server).context("the server disconnected")?;
    let sealing = Sealing::new(net.local, kit.identity.sealing.clone());
    let mut stream = net
        .streams
        .clone()
        .open_stream(server, DOWNLOAD_PROTOCOL)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open a download stream: {e}"))?;
    download::request(&mut stream, job).await?;
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    download::receive_files(&mut stream, &sealing, &from, job, expected, dir).await?;
    Ok(())
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
                        let mut row = vec![k.clone(), s(&x["accuracy"]), s(&x["loss"])];
                        if dp {
                            row.push(s(&x["privacy_epsilon"]));
                            row.push(s(&x["privacy_delta"]));
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
                let rows: Vec<Vec<String>> = h
                    .iter()
                    .map(|e| vec![s(&e["at_ms"]), s(&e["state"]), s(&e["note"])])
                    .collect();
                out.line(table(&["AT_MS", "STATE", "NOTE"], &rows));
            }
        }
        _ => out.line(natural_json(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
