//! The admin console (`flare-node admin <cmd> --kit <admin>/startup`): connects to the server
//! with the admin's kit, sends one command, prints the answer as a table (or JSON with
//! `--json`), and exits with a code scripts can use.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Subcommand;
use flare_provision::kit::load_kit;
use serde_json::Value;

use super::{connect, peer_addrs, start_net};
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

/// Runs one admin command; returns the process exit code.
pub async fn run(kit_dir: &Path, cmd: AdminCommand, json_out: bool) -> i32 {
    match run_inner(kit_dir, cmd, json_out).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_UNREACHABLE
        }
    }
}

async fn run_inner(kit_dir: &Path, cmd: AdminCommand, json_out: bool) -> anyhow::Result<i32> {
    let kit = load_kit(kit_dir, SystemTime::now())
        .with_context(|| format!("admin kit {}", kit_dir.display()))?;
    // A job folder is checked and signed before the server is contacted.
    let bundle = match &cmd {
        AdminCommand::Submit { job_dir } => {
            match crate::jobpack::pack(job_dir, &kit.identity.signing) {
                Ok(b) => Some(b),
                Err(e) => {
                    eprintln!("error: job folder {}: {e}", job_dir.display());
                    return Ok(EXIT_FAILED);
                }
            }
        }
        _ => None,
    };
    let (net, _events) = start_net(&kit, false)?;
    let (server, addrs) = peer_addrs(&kit.config.server)?;
    connect(&net, server, &addrs, Duration::from_secs(15)).await?;
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
                        eprintln!("error: {reason}");
                        return Ok(EXIT_FAILED);
                    }
                };
                let state = v["state"].as_str().unwrap_or("").to_string();
                if matches!(state.as_str(), "finished" | "failed" | "aborted") {
                    print_value(&cmd, &v, json_out);
                    return Ok(if state == "finished" {
                        EXIT_OK
                    } else {
                        EXIT_FAILED
                    });
                }
                if start.elapsed() > Duration::from_secs(*timeout) {
                    eprintln!("error: job {job} is still {state} after {timeout} s");
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
            eprintln!("error: {reason}");
            return Ok(EXIT_FAILED);
        }
    };
    if let AdminCommand::Download { job, output } = &cmd {
        let dir = output.clone().unwrap_or_else(|| transfer.join(job));
        let names: Vec<String> = if v.get("stream").is_some() {
            // Today's servers list the files and stream them, sealed, over a download stream.
            let expected = listed_files(&v)?;
            if let Err(e) = fetch_files(&net, &kit, server, job, &expected, &dir).await {
                eprintln!("error: download of {job}: {e:#}");
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
            println!(
                "{}",
                serde_json::json!({"job_id": job, "dir": dir, "files": names})
            );
        } else {
            println!(
                "downloaded {} files of job {job} into {}",
                names.len(),
                dir.display()
            );
            for f in &names {
                println!("  {}", dir.join(f).display());
            }
        }
        return Ok(EXIT_OK);
    }
    print_value(&cmd, &v, json_out);
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
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &["SITE", "ORG", "CONNECTION", "ADDRESS", "HEARTBEAT_MS_AGO"],
        &rows,
    )
}

fn print_value(cmd: &AdminCommand, v: &Value, json_out: bool) {
    if json_out {
        println!("{v}");
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
            println!(
                "{}",
                table(&["JOB", "NAME", "STATE", "ROUND", "SUBMITTER"], &rows)
            );
        }
        AdminCommand::Sites => println!("{}", sites_table(v)),
        AdminCommand::Status { job: None } => {
            println!(
                "server {} ({}), up {} s, {} jobs ({} running), relay circuits {} opened / {} closed",
                s(&v["server"]),
                s(&v["peer_id"]),
                s(&v["uptime_s"]),
                s(&v["jobs"]),
                s(&v["running"]),
                s(&v["relay_circuits_opened"]),
                s(&v["relay_circuits_closed"])
            );
            println!("{}", sites_table(&v["sites"]));
        }
        AdminCommand::Status { job: Some(_) } | AdminCommand::Wait { .. } => {
            println!(
                "job {} ({}): {}, round {}",
                s(&v["id"]),
                s(&v["name"]),
                s(&v["state"]),
                s(&v["round"])
            );
            if let Some(sites) = v["sites"].as_object() {
                let rows: Vec<Vec<String>> =
                    sites.iter().map(|(k, x)| vec![k.clone(), s(x)]).collect();
                println!("{}", table(&["SITE", "STATE"], &rows));
            }
            if let Some(m) = v["metrics"].as_object() {
                let rows: Vec<Vec<String>> = m
                    .iter()
                    .map(|(k, x)| vec![k.clone(), s(&x["accuracy"]), s(&x["loss"])])
                    .collect();
                println!("{}", table(&["VERSION", "ACCURACY", "LOSS"], &rows));
            }
            if let Some(h) = v["history"].as_array() {
                let rows: Vec<Vec<String>> = h
                    .iter()
                    .map(|e| vec![s(&e["at_ms"]), s(&e["state"]), s(&e["note"])])
                    .collect();
                println!("{}", table(&["AT_MS", "STATE", "NOTE"], &rows));
            }
        }
        _ => println!("{v}"),
    }
}
