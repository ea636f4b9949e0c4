//! `flare-node poc start|stop`: runs the participants of a `poc prepare`d workspace as
//! background processes, and ends exactly those processes again.
//!
//! Each node runs as `<bin> --kit <participant>/startup` in its own process group, with
//! stdout and stderr appended to `<participant>/log.txt` and its pid in
//! `<participant>/node.pid`, the same files the kit's `start.sh`/`stop.sh` use. Before a
//! signal is sent, `/proc/<pid>/cmdline` must show that kit's `--kit` argument, so a pid that
//! the OS handed to an unrelated process is never signalled.
//!
//! Kits are `prod_NN/<name>/` and, in a tiered POC, `prod_NN/<region>/<name>/` (a region's
//! hub, sites and admins); a participant is named by that path relative to `prod_NN`
//! (`server`, `region-1/region-1`, `region-1/site-2`). The server starts first, then the
//! hubs, then everyone else.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flare_crypto::RoleKind;
use flare_provision::NodeConfig;
use flare_provision::kit::NODE_CONFIG_FILE;
use flare_provision::poc::POC_PROJECT;

/// The pid file in a participant's folder.
pub const PID_FILE: &str = "node.pid";
/// The log file in a participant's folder.
pub const LOG_FILE: &str = "log.txt";
/// How long `stop` waits after SIGTERM before it sends SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Why POC processes could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum PocRunError {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The folder has no provisioned POC project.
    #[error("no {POC_PROJECT}/prod_NN under {0}; run `flare-node poc prepare` first")]
    NotPrepared(PathBuf),
    /// A participant's `node.json` does not parse.
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A participant already runs; nothing was started.
    #[error("{name} is already running (pid {pid}); run `flare-node poc stop` first")]
    AlreadyRunning {
        /// The participant.
        name: String,
        /// Its pid.
        pid: u32,
    },
    /// A node could not be started; the nodes started before it were stopped again.
    #[error("could not start {name} with {bin}: {source}")]
    Spawn {
        /// The participant.
        name: String,
        /// The binary.
        bin: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A signal could not be sent.
    #[error("could not signal {name} (pid {pid}): {reason}")]
    Signal {
        /// The participant.
        name: String,
        /// Its pid.
        pid: u32,
        /// What `kill` said.
        reason: String,
    },
    /// A node was still alive after SIGKILL.
    #[error("{name} (pid {pid}) did not exit")]
    StillRunning {
        /// The participant.
        name: String,
        /// Its pid.
        pid: u32,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PocRunError + '_ {
    move |source| PocRunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One participant folder of a provisioned POC that runs a node (not an admin).
#[derive(Debug, Clone)]
struct Participant {
    /// Its folder relative to `prod_NN`, unique where names repeat across regions.
    name: String,
    dir: PathBuf,
    kind: RoleKind,
}

impl Participant {
    fn kit(&self) -> PathBuf {
        self.dir.join("startup")
    }
    fn pid_file(&self) -> PathBuf {
        self.dir.join(PID_FILE)
    }
}

/// The `prod_NN` folders of the POC project, newest first.
fn prod_dirs(poc_dir: &Path) -> Result<Vec<PathBuf>, PocRunError> {
    let project = poc_dir.join(POC_PROJECT);
    let entries = match fs::read_dir(&project) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PocRunError::NotPrepared(poc_dir.to_path_buf()));
        }
        Err(e) => return Err(io(&project)(e)),
    };
    let mut prods = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(&project))?;
        let name = entry.file_name();
        let n = name
            .to_str()
            .and_then(|s| s.strip_prefix("prod_"))
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(n) = n.filter(|_| entry.path().is_dir()) {
            prods.push((n, entry.path()));
        }
    }
    prods.sort_by_key(|p| std::cmp::Reverse(p.0));
    if prods.is_empty() {
        return Err(PocRunError::NotPrepared(poc_dir.to_path_buf()));
    }
    Ok(prods.into_iter().map(|(_, p)| p).collect())
}

/// The participants of one `prod_NN` that run a node: the server first, then the hubs, then
/// the others, each group by folder; admins are left out. Looks in `prod_NN/<name>/` and in
/// the region folders `prod_NN/<region>/<name>/`.
fn participants(prod: &Path) -> Result<Vec<Participant>, PocRunError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(prod).map_err(io(prod))? {
        let entry = entry.map_err(io(prod))?;
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if holds_kit(&dir) {
            out.extend(node_participant(&dir, name)?);
            continue;
        }
        // A region folder: its hub's, sites' and admins' kits.
        for inner in fs::read_dir(&dir).map_err(io(&dir))? {
            let inner = inner.map_err(io(&dir))?;
            if holds_kit(&inner.path()) {
                let label = format!("{name}/{}", inner.file_name().to_string_lossy());
                out.extend(node_participant(&inner.path(), label)?);
            }
        }
    }
    let rank = |k: RoleKind| match k {
        RoleKind::Server => 0,
        RoleKind::Hub => 1,
        _ => 2,
    };
    out.sort_by(|a, b| (rank(a.kind), &a.name).cmp(&(rank(b.kind), &b.name)));
    Ok(out)
}

/// Whether `dir` is a participant folder (it holds `startup/node.json`).
fn holds_kit(dir: &Path) -> bool {
    dir.join("startup").join(NODE_CONFIG_FILE).is_file()
}

/// The participant whose kit is in `dir`, named `name`, unless it is an admin's.
fn node_participant(dir: &Path, name: String) -> Result<Option<Participant>, PocRunError> {
    let config = dir.join("startup").join(NODE_CONFIG_FILE);
    let text = fs::read(&config).map_err(io(&config))?;
    let node: NodeConfig = serde_json::from_slice(&text).map_err(|source| PocRunError::Config {
        path: config.clone(),
        source,
    })?;
    let kind = node.role.kind();
    Ok((kind != RoleKind::Admin).then(|| Participant {
        name,
        dir: dir.to_path_buf(),
        kind,
    }))
}

/// Starts the server, then the hubs, then every other non-admin participant of the newest
/// `prod_NN` under `poc_dir`, as `<bin> --kit <participant>/startup` in the background.
/// Refuses (starting nothing) if one already runs. Returns the names (folders relative to
/// `prod_NN`) and pids, in start order.
pub fn start(poc_dir: &Path, bin: &Path) -> Result<Vec<(String, u32)>, PocRunError> {
    let poc_dir = fs::canonicalize(poc_dir).map_err(io(poc_dir))?;
    let prods = prod_dirs(&poc_dir)?;
    let Some(prod) = prods.first() else {
        return Err(PocRunError::NotPrepared(poc_dir));
    };
    let all = participants(prod)?;
    // Check every pid file before starting anything, so a refusal starts nothing.
    for p in &all {
        match read_pid(&p.pid_file())? {
            Some(pid) if runs_kit(pid, &p.kit()) => {
                return Err(PocRunError::AlreadyRunning {
                    name: p.name.clone(),
                    pid,
                });
            }
            Some(pid) => {
                tracing::info!(participant = %p.name, pid, "removing a stale pid file");
                remove_pid_file(&p.pid_file())?;
            }
            None => {}
        }
    }
    let mut started: Vec<(Participant, u32)> = Vec::new();
    for p in &all {
        match spawn(p, bin) {
            Ok(pid) => started.push((p.clone(), pid)),
            Err(e) => {
                for (q, pid) in started.iter().rev() {
                    if let Err(e2) = end(q, *pid, STOP_GRACE) {
                        tracing::warn!(participant = %q.name, error = %e2, "could not stop");
                    }
                    let _ = fs::remove_file(q.pid_file());
                }
                return Err(e);
            }
        }
    }
    Ok(started.into_iter().map(|(p, pid)| (p.name, pid)).collect())
}

fn spawn(p: &Participant, bin: &Path) -> Result<u32, PocRunError> {
    use std::os::unix::process::CommandExt;
    let log_path = p.dir.join(LOG_FILE);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(&log_path))?;
    let err = log.try_clone().map_err(io(&log_path))?;
    let spawn_err = |source| PocRunError::Spawn {
        name: p.name.clone(),
        bin: bin.to_path_buf(),
        source,
    };
    let mut cmd = Command::new(bin);
    // Jobs name their data relative to where they were written: a node started here finds
    // it from the folder `poc start` ran in, unless FLARE_DATA_ROOT says otherwise.
    if std::env::var_os("FLARE_DATA_ROOT").is_none()
        && let Ok(cwd) = std::env::current_dir()
    {
        cmd.env("FLARE_DATA_ROOT", cwd);
    }
    let child = cmd
        .arg("--kit")
        .arg(p.kit())
        .current_dir(&p.dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(spawn_err)?;
    let pid = child.id();
    // The child is not waited for: it outlives this process, as with `start.sh`.
    drop(child);
    // Until the child has exec'd, /proc shows this process's command line, and a `stop`
    // right now would take the pid file for stale; wait for the exec (briefly).
    let deadline = Instant::now() + Duration::from_secs(2);
    while is_alive(pid) && !runs_kit(pid, &p.kit()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid_file = p.pid_file();
    let tmp = pid_file.with_extension("pid.tmp");
    fs::write(&tmp, format!("{pid}\n")).map_err(io(&tmp))?;
    fs::rename(&tmp, &pid_file).map_err(io(&pid_file))?;
    Ok(pid)
}

/// What [`stop_detailed`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// Nodes that were running and were stopped: name, pid.
    pub stopped: Vec<(String, u32)>,
    /// Of those, the ones that needed SIGKILL.
    pub killed: Vec<String>,
    /// Pid files removed without signalling anything: name, pid (none if unreadable). The
    /// process had exited, or the pid now belongs to another program.
    pub stale: Vec<(String, Option<u32>)>,
}

/// Stops every node that `start` (or a kit's `start.sh`) started under `poc_dir`, waiting
/// [`STOP_GRACE`] after SIGTERM before SIGKILL. Returns what was stopped; stale pid files
/// are removed and logged.
pub fn stop(poc_dir: &Path) -> Result<Vec<(String, u32)>, PocRunError> {
    let report = stop_detailed(poc_dir, STOP_GRACE)?;
    for (name, pid) in &report.stale {
        tracing::info!(participant = %name, ?pid, "removed a stale pid file");
    }
    Ok(report.stopped)
}

/// [`stop`] with its full report and a chosen grace period.
pub fn stop_detailed(poc_dir: &Path, grace: Duration) -> Result<StopReport, PocRunError> {
    let poc_dir = fs::canonicalize(poc_dir).map_err(io(poc_dir))?;
    let mut report = StopReport::default();
    for prod in prod_dirs(&poc_dir)? {
        for p in participants(&prod)? {
            let pid_file = p.pid_file();
            if !pid_file.exists() {
                continue;
            }
            match read_pid(&pid_file)? {
                Some(pid) if runs_kit(pid, &p.kit()) => {
                    if end(&p, pid, grace)? {
                        report.killed.push(p.name.clone());
                    }
                    report.stopped.push((p.name.clone(), pid));
                }
                pid => report.stale.push((p.name.clone(), pid)),
            }
            remove_pid_file(&pid_file)?;
        }
    }
    Ok(report)
}

/// Reads a pid file; `None` if it is absent or does not hold a plausible pid.
fn read_pid(path: &Path) -> Result<Option<u32>, PocRunError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().parse::<u32>().ok().filter(|&p| p > 1)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

fn remove_pid_file(path: &Path) -> Result<(), PocRunError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// State letter and process group of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Whether a process runs (a zombie has exited and only waits to be reaped).
pub fn is_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X' | 'x'))
}

/// Whether `pid` is a live process whose command line holds `--kit <kit>`.
fn runs_kit(pid: u32, kit: &Path) -> bool {
    if !is_alive(pid) {
        return false;
    }
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
    let want = kit.as_os_str().as_encoded_bytes();
    let canon = fs::canonicalize(kit).ok();
    args.windows(2).any(|w| {
        w[0] == b"--kit"
            && (w[1] == want
                || std::str::from_utf8(w[1])
                    .ok()
                    .and_then(|s| fs::canonicalize(s).ok())
                    .is_some_and(|c| Some(c) == canon))
    })
}

/// Sends `signal` to the node's process group when it leads one (as `start` arranges), so
/// anything it spawned ends too; otherwise to the process.
fn signal(p: &Participant, pid: u32, signal: &str) -> Result<(), PocRunError> {
    let target = match proc_stat(pid) {
        Some((_, pgrp)) if pgrp == pid => format!("-{pid}"),
        Some(_) => pid.to_string(),
        None => return Ok(()),
    };
    let out = Command::new("kill")
        .args(["-s", signal, "--", &target])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PocRunError::Signal {
            name: p.name.clone(),
            pid,
            reason: format!("running kill: {e}"),
        })?;
    if !out.status.success() && is_alive(pid) {
        return Err(PocRunError::Signal {
            name: p.name.clone(),
            pid,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn wait_exit(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if !is_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, up to `grace` for the node to exit, then SIGKILL. Returns whether SIGKILL was
/// needed.
fn end(p: &Participant, pid: u32, grace: Duration) -> Result<bool, PocRunError> {
    signal(p, pid, "TERM")?;
    if wait_exit(pid, grace) {
        return Ok(false);
    }
    signal(p, pid, "KILL")?;
    if wait_exit(pid, Duration::from_secs(5)) {
        Ok(true)
    } else {
        Err(PocRunError::StillRunning {
            name: p.name.clone(),
            pid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_provision::poc::{PocOptions, prepare_now};
    use std::os::unix::fs::PermissionsExt;

    struct Poc {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        bin: PathBuf,
    }

    impl Drop for Poc {
        /// A failing test must not leave its fake nodes running.
        fn drop(&mut self) {
            let _ = stop_detailed(&self.dir, Duration::from_millis(200));
        }
    }

    /// A POC with 2 sites and a fake node: a script that takes `--kit X` and waits;
    /// `ignore_term` makes it (and its children) ignore SIGTERM.
    fn poc(ignore_term: bool) -> Poc {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("poc");
        prepare_now(&PocOptions {
            workspace: dir.clone(),
            clients: 2,
            base_port: None,
        })
        .unwrap();
        let bin = tmp.path().join("flare-node");
        let trap = if ignore_term { "trap '' TERM" } else { "" };
        fs::write(
            &bin,
            format!(
                "#!/bin/sh\n[ \"$1\" = --kit ] || exit 2\n{trap}\necho \"fake node for $2\"\n\
                 while :; do sleep 1; done\n"
            ),
        )
        .unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        Poc {
            _tmp: tmp,
            dir,
            bin,
        }
    }

    /// Waits until every started fake node has printed its line (so its trap is set).
    fn wait_started(poc: &Poc, started: &[(String, u32)]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, _) in started {
            let log = prod(poc).join(name).join(LOG_FILE);
            while !fs::read_to_string(&log).is_ok_and(|l| l.contains("fake node for")) {
                assert!(Instant::now() < deadline, "{name} did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn prod(poc: &Poc) -> PathBuf {
        poc.dir.join(POC_PROJECT).join("prod_00")
    }

    #[test]
    fn start_then_stop_ends_exactly_those() {
        let poc = poc(false);
        let started = start(&poc.dir, &poc.bin).unwrap();
        let names: Vec<&str> = started.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["server", "site-1", "site-2"]);
        for (name, pid) in &started {
            let pid_file = prod(&poc).join(name).join(PID_FILE);
            assert_eq!(
                fs::read_to_string(pid_file).unwrap().trim(),
                pid.to_string()
            );
            assert!(
                runs_kit(*pid, &prod(&poc).join(name).join("startup")),
                "{name}"
            );
        }
        assert!(!prod(&poc).join("admin@nvidia.com").join(PID_FILE).exists());
        wait_started(&poc, &started);

        // Starting twice is refused and starts nothing.
        let err = start(&poc.dir, &poc.bin).unwrap_err();
        assert!(
            matches!(&err, PocRunError::AlreadyRunning { name, .. } if name == "server"),
            "{err}"
        );

        // An unrelated process that took a site's pid file is never signalled.
        let mut other = Command::new("sleep").arg("300").spawn().unwrap();
        let site2 = prod(&poc).join("site-2");
        let site2_pid = started[2].1;
        fs::write(site2.join(PID_FILE), other.id().to_string()).unwrap();

        let report = stop_detailed(&poc.dir, Duration::from_secs(5)).unwrap();
        assert_eq!(report.stopped, started[..2].to_vec());
        assert!(report.killed.is_empty());
        assert_eq!(report.stale, [("site-2".to_owned(), Some(other.id()))]);
        for (_, pid) in &started[..2] {
            assert!(!is_alive(*pid), "{pid}");
        }
        assert!(is_alive(other.id()));
        other.kill().unwrap();
        other.wait().unwrap();
        for name in ["server", "site-1", "site-2"] {
            assert!(!prod(&poc).join(name).join(PID_FILE).exists());
        }
        // The log holds the node's output.
        let log = fs::read_to_string(prod(&poc).join("site-1").join(LOG_FILE)).unwrap();
        assert!(log.contains("fake node for"), "{log}");

        // site-2's node lost its pid file; end it through a rewritten one.
        fs::write(site2.join(PID_FILE), site2_pid.to_string()).unwrap();
        assert_eq!(stop(&poc.dir).unwrap(), [("site-2".to_owned(), site2_pid)]);
        assert!(!is_alive(site2_pid));
    }

    /// A tiered POC: the server, then both hubs, then the regions' sites, each as `--kit`
    /// of its own folder; admins are not started; `stop` ends them all.
    #[test]
    fn tiered_start_runs_server_then_hubs_then_sites() {
        let mut poc = poc(false);
        // The same fake node, over a tiered workspace instead.
        let tiered = poc._tmp.path().join("tiered");
        flare_provision::poc::prepare_tiered_now(
            &PocOptions {
                workspace: tiered.clone(),
                clients: 2,
                base_port: None,
            },
            2,
        )
        .unwrap();
        poc.dir = tiered;
        let started = start(&poc.dir, &poc.bin).unwrap();
        let names: Vec<&str> = started.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "server",
                "region-1/region-1",
                "region-2/region-2",
                "region-1/site-1",
                "region-1/site-2",
                "region-2/site-1",
                "region-2/site-2",
            ]
        );
        for (name, pid) in &started {
            let kit = prod(&poc).join(name).join("startup");
            assert!(runs_kit(*pid, &kit), "{name}");
            assert!(prod(&poc).join(name).join(PID_FILE).is_file(), "{name}");
        }
        for admin in ["admin@nvidia.com", "region-1/admin@region-1"] {
            assert!(!prod(&poc).join(admin).join(PID_FILE).exists(), "{admin}");
        }
        wait_started(&poc, &started);
        let report = stop_detailed(&poc.dir, Duration::from_secs(5)).unwrap();
        assert_eq!(report.stopped, started);
        for (_, pid) in &started {
            assert!(!is_alive(*pid), "{pid}");
        }
    }

    #[test]
    fn stale_pid_files_are_cleaned() {
        let poc = poc(false);
        let server = prod(&poc).join("server");
        // A pid that no process has (above the kernel's pid_max), and garbage.
        fs::write(server.join(PID_FILE), "4194305\n").unwrap();
        fs::write(prod(&poc).join("site-1").join(PID_FILE), "not a pid").unwrap();
        let report = stop_detailed(&poc.dir, Duration::from_secs(1)).unwrap();
        assert!(report.stopped.is_empty());
        assert_eq!(
            report.stale,
            [
                ("server".to_owned(), Some(4_194_305)),
                ("site-1".to_owned(), None)
            ]
        );
        assert!(!server.join(PID_FILE).exists());
        // start also replaces a stale pid file.
        fs::write(server.join(PID_FILE), "4194305\n").unwrap();
        let started = start(&poc.dir, &poc.bin).unwrap();
        assert_eq!(started.len(), 3);
        assert_eq!(stop(&poc.dir).unwrap(), started);
    }

    #[test]
    fn a_node_that_ignores_sigterm_is_killed() {
        let poc = poc(true);
        let started = start(&poc.dir, &poc.bin).unwrap();
        wait_started(&poc, &started);
        let report = stop_detailed(&poc.dir, Duration::from_millis(300)).unwrap();
        assert_eq!(report.stopped, started);
        assert_eq!(report.killed, ["server", "site-1", "site-2"]);
        for (_, pid) in &started {
            assert!(!is_alive(*pid));
        }
    }

    #[test]
    fn unprepared_folder_and_missing_binary() {
        let tmp = tempfile::tempdir().unwrap();
        let err = start(tmp.path(), Path::new("/bin/true")).unwrap_err();
        assert!(matches!(err, PocRunError::NotPrepared(_)), "{err}");
        let poc = poc(false);
        let err = start(&poc.dir, &poc.dir.join("no-such-binary")).unwrap_err();
        assert!(
            matches!(&err, PocRunError::Spawn { name, .. } if name == "server"),
            "{err}"
        );
        for name in ["server", "site-1", "site-2"] {
            assert!(!prod(&poc).join(name).join(PID_FILE).exists());
        }
    }
}
