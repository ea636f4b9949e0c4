//! The user's program as a process: started in a process group of its own, its output read
//! line by line into the site's log (the last stderr lines kept for error reports), and its
//! whole group stopped with SIGTERM, a grace period, then SIGKILL.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group, test_kill_process_group};

/// Lines of stderr kept for the error report.
pub const STDERR_TAIL: usize = 50;
/// Longest line logged as one; longer ones are cut into pieces of this size.
const MAX_LINE: usize = 8 << 10;

/// A running program.
#[derive(Debug)]
pub struct Program {
    child: Child,
    pgid: Option<Pid>,
    /// The last lines of its stderr.
    tail: Arc<Mutex<VecDeque<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Program {
    /// Starts `argv` in `cwd` with `env` added, stdout and stderr logged under `job`.
    pub fn spawn(
        argv: &[String],
        cwd: &Path,
        env: &BTreeMap<String, String>,
        job: &str,
    ) -> std::io::Result<Program> {
        let (first, rest) = argv
            .split_first()
            .ok_or_else(|| std::io::Error::other("the command is empty"))?;
        // A relative program path with a slash is the app folder's, like the arguments.
        let program = if first.contains('/') && Path::new(first).is_relative() {
            cwd.join(first).into_os_string()
        } else {
            first.into()
        };
        let mut child = Command::new(&program)
            .args(rest)
            .current_dir(cwd)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {first:?}: {e}")))?;
        let pid = child.id();
        let pgid = Pid::from_raw(pid as i32);
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let job = job.to_string();
            readers.push(std::thread::spawn(move || {
                read_lines(out, |line| {
                    tracing::info!(target: "flare::program", %job, pid, stream = "stdout", "{line}");
                });
            }));
        }
        if let Some(err) = child.stderr.take() {
            let (job, tail) = (job.to_string(), Arc::clone(&tail));
            readers.push(std::thread::spawn(move || {
                read_lines(err, |line| {
                    tracing::info!(target: "flare::program", %job, pid, stream = "stderr", "{line}");
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == STDERR_TAIL {
                            t.pop_front();
                        }
                        t.push_back(line.to_string());
                    }
                });
            }));
        }
        Ok(Program {
            child,
            pgid,
            tail,
            readers,
            status: None,
        })
    }

    /// The program's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `limit` for the program to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What it printed to stderr last, one line each (after its output has been read to the
    /// end, when it has exited).
    pub fn stderr_tail(&mut self) -> String {
        if self.status.is_some() {
            // The readers end at EOF, soon after the exit (unless a grandchild holds the pipe).
            let until = Instant::now() + Duration::from_millis(500);
            while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// A one-line account of how it ended, with its last stderr lines.
    pub fn exit_report(&mut self, status: ExitStatus) -> String {
        let tail = self.stderr_tail();
        let how = describe(status);
        if tail.is_empty() {
            format!(
                "the program (pid {}) {how}; it wrote nothing to stderr",
                self.pid()
            )
        } else {
            format!(
                "the program (pid {}) {how}; the last lines of its stderr:\n{tail}",
                self.pid()
            )
        }
    }

    /// Whether any process of its group is still alive.
    pub fn group_alive(&self) -> bool {
        self.pgid
            .is_some_and(|g| test_kill_process_group(g).is_ok())
    }

    /// Ends the whole group: SIGTERM, up to `grace` for it to go, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        let Some(pgid) = self.pgid else { return };
        if self.group_alive() {
            let _ = kill_process_group(pgid, Signal::TERM);
            let until = Instant::now() + grace;
            while Instant::now() < until {
                let _ = self.exited();
                if !self.group_alive() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.group_alive() {
                tracing::warn!(
                    pid = self.pid(),
                    "the program's group outlived SIGTERM; killing it"
                );
                let _ = kill_process_group(pgid, Signal::KILL);
            }
        }
        let _ = self.wait_exit(Duration::from_secs(5));
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid
            && test_kill_process_group(pgid).is_ok()
        {
            let _ = kill_process_group(pgid, Signal::KILL);
        }
        let _ = self.child.try_wait();
    }
}

/// How a process ended, in words.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => format!("ended ({status})"),
    }
}

/// Calls `f` with every line of `r` (without its newline, lossily decoded, cut at
/// [`MAX_LINE`] bytes) until EOF.
fn read_lines(r: impl Read, mut f: impl FnMut(&str)) {
    let mut r = BufReader::with_capacity(64 << 10, r);
    let mut line: Vec<u8> = Vec::with_capacity(256);
    loop {
        let (used, end_of_line) = match r.fill_buf() {
            Ok([]) => break,
            Ok(buf) => {
                let room = MAX_LINE - line.len();
                match buf.iter().take(room).position(|&b| b == b'\n') {
                    Some(i) => {
                        line.extend_from_slice(&buf[..i]);
                        (i + 1, true)
                    }
                    None => {
                        let n = buf.len().min(room);
                        line.extend_from_slice(&buf[..n]);
                        (n, line.len() == MAX_LINE)
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        r.consume(used);
        if end_of_line {
            f(String::from_utf8_lossy(&line).trim_end_matches('\r'));
            line.clear();
        }
    }
    if !line.is_empty() {
        f(&String::from_utf8_lossy(&line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_and_kept() {
        let long = "x".repeat(MAX_LINE + 10);
        let text = format!("a\r\nb\n{long}\nlast");
        let mut got = Vec::new();
        read_lines(text.as_bytes(), |l| got.push(l.to_string()));
        assert_eq!(
            got.len(),
            5,
            "{:?}",
            got.iter().map(|l| l.len()).collect::<Vec<_>>()
        );
        assert_eq!((got[0].as_str(), got[1].as_str()), ("a", "b"));
        assert_eq!(got[2].len(), MAX_LINE);
        assert_eq!(got[3].len(), 10);
        assert_eq!(got[4], "last");
    }

    #[test]
    fn a_group_is_stopped_whole_and_exits_are_described() {
        let dir = tempfile::tempdir().unwrap();
        let argv: Vec<String> = ["sh", "-c", "sleep 60 & echo started >&2; wait"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut p = Program::spawn(&argv, dir.path(), &BTreeMap::new(), "j").unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while p.stderr_tail().is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(p.group_alive());
        p.stop(Duration::from_secs(2));
        assert!(!p.group_alive(), "the sleep outlived the stop");
        let status = p.exited().unwrap();
        assert!(
            p.exit_report(status).contains("started"),
            "{}",
            p.exit_report(status)
        );

        let argv: Vec<String> = ["sh", "-c", "echo boom >&2; exit 3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut p = Program::spawn(&argv, dir.path(), &BTreeMap::new(), "j").unwrap();
        let status = p.wait_exit(Duration::from_secs(5)).unwrap();
        let report = p.exit_report(status);
        assert!(
            report.contains("exited with code 3") && report.ends_with("boom"),
            "{report}"
        );
    }
}
