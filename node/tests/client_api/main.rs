//! The Client API across real processes: `flare-node` sites run the user's program
//! (`flare-test-trainer`, the Rust client of `clients/rust`, so no Python is needed) through
//! the `ScriptExecutor`. Each fault the issue names has a test here that fails without the
//! behaviour:
//!
//! | fault | behaviour proved | test |
//! | --- | --- | --- |
//! | training through the program | FedAvg of the program's results, weighted by `NUM_STEPS_CURRENT_ROUND`, FULL and DIFF, on the POC federation and in the simulator (one process per site) | `sag::the_program_trains_and_its_steps_weigh_the_average` |
//! | the program crashes: `exit 3`, a panic, or an exit before it connects | the task fails at once (the round ends long before `task_timeout`), the site's state and the history show the exit code and the last stderr lines; the other site's results carry the run | `sag::a_crashing_program_fails_its_task_at_once_with_its_stderr` |
//! | the program hangs (busy, or silent) | its whole process group (a child `sleep` included) is gone after `task_timeout` or `heartbeat_timeout`, the task reported as timed out | `sag::a_hung_program_is_stopped_with_its_group_and_reported_timed_out` |
//! | malformed message, wrong-shaped model, a file outside the exchange folder | the task fails with the reason; the site goes on to run the next job | `sag::bad_messages_and_models_fail_the_task_and_the_site_goes_on` |
//! | megabytes on stdout | the rounds complete; the output is in the site's log, with the job and the pid | `sag::a_program_printing_megabytes_still_trains_and_its_output_is_logged` |
//! | `admin abort`, a killed `flare-node` | no process of the program is left | `sag::abort_and_a_killed_node_leave_no_program_behind` |
//! | a site forbids custom code | the job is refused there, the reason in `admin status` | `sag::a_site_that_forbids_custom_code_refuses_the_job` |
//! | in swarm, a site's program crashes | the site is pruned like a dead trainer, the run finishes | `swarm::a_swarm_prunes_the_site_whose_program_crashed` |
//! | the site lends GPUs | the program sees only those its job reserved (`CUDA_VISIBLE_DEVICES`); a job whose GPUs are taken waits, one asking more than a site has is refused at submit | `resources::jobs_get_only_their_reserved_gpus_and_wait_for_taken_ones` |
//!
//! The Python client (`clients/python`) runs the same way in `tests/python/test_hello_pt.py`
//! (simulator and POC, scatter-and-gather and swarm) and against a mock node in
//! `tests/python/test_client_api.py`.

#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod resources;
mod sag;
mod swarm;
mod tracking;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The test trainer, built beside `flare-node` (`cargo build --release -p flare-client`).
pub(crate) fn trainer() -> PathBuf {
    let t = common::bin().with_file_name("flare-test-trainer");
    assert!(
        t.is_file(),
        "{} is missing: build it with `cargo build --release -p flare-client`",
        t.display()
    );
    t
}

/// How each site runs the trainer: a shell line per site (`$T` is the trainer), the rest
/// `default`.
pub(crate) struct Sites<'a> {
    pub(crate) per_site: &'a [(&'a str, &'a str)],
    pub(crate) default: &'a str,
}

/// A job whose sites run `flare-test-trainer` through `custom/run.sh`, on a synthetic model
/// of `params` zeros. `workflow` is the server's workflow entry; `executor_args` extra
/// ScriptExecutor arguments (JSON members, without braces).
pub(crate) fn job(
    dir: &Path,
    name: &str,
    workflow: &str,
    sites: &Sites<'_>,
    executor_args: &str,
) -> PathBuf {
    let job = dir.join(name);
    std::fs::create_dir_all(job.join("app/config")).unwrap();
    std::fs::create_dir_all(job.join("app/custom")).unwrap();
    std::fs::write(
        job.join("meta.json"),
        format!(r#"{{"name": "{name}", "min_clients": 1, "deploy_map": {{"app": ["@ALL"]}}}}"#),
    )
    .unwrap();
    std::fs::write(
        job.join("app/config/config_fed_server.json"),
        format!(
            r#"{{"format_version": 2, "workflows": [{workflow}],
              "components": [
                {{"id": "model", "name": "SyntheticModel", "args": {{"num_params": 1000, "tensor_size": 600}}}},
                {{"id": "aggregator", "name": "FedAvg", "args": {{}}}},
                {{"id": "persistor", "name": "SafetensorsPersistor", "args": {{"save_every_round": true}}}}]}}"#
        ),
    )
    .unwrap();
    let sep = if executor_args.is_empty() { "" } else { ", " };
    std::fs::write(
        job.join("app/config/config_fed_client.json"),
        format!(
            r#"{{"format_version": 2, "executors": [{{"tasks": ["train", "validate", "submit_model"],
              "executor": {{"name": "ScriptExecutor", "args": {{"command": ["sh", "custom/run.sh"]{sep}{executor_args}}}}}}}]}}"#
        ),
    )
    .unwrap();
    let mut script = format!(
        "T='{}'\ncase \"$FLARE_SITE_NAME\" in\n",
        trainer().display()
    );
    for (site, line) in sites.per_site {
        script.push_str(&format!("  {site}) exec {line} ;;\n"));
    }
    script.push_str(&format!("  *) exec {} ;;\nesac\n", sites.default));
    std::fs::write(job.join("app/custom/run.sh"), script).unwrap();
    job
}

/// A scatter-and-gather workflow entry.
pub(crate) fn sag(rounds: u32, task_timeout: u32) -> String {
    format!(
        r#"{{"id": "sag", "name": "ScatterAndGather", "args": {{"num_rounds": {rounds}, "min_clients": 1,
           "wait_time_after_min_received": 20, "task_timeout": {task_timeout}}}}}"#
    )
}

/// Whether a process with this pid lives (a zombie counts as gone).
pub(crate) fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The pids a trainer wrote to its `--pid-file`, once it has.
pub(crate) fn pids(file: &Path, at_least: usize, timeout: Duration) -> Vec<u32> {
    let started = Instant::now();
    loop {
        let pids: Vec<u32> = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.len() >= at_least {
            return pids;
        }
        assert!(
            started.elapsed() < timeout,
            "{} holds {pids:?}, fewer than {at_least} pids",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until none of `pids` lives; fails after `timeout` naming those left.
pub(crate) fn gone(pids: &[u32], timeout: Duration, what: &str) {
    let started = Instant::now();
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: processes {left:?} are still alive after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the job `dir` in the simulator with 3 sites (and `extra` arguments) in `ws`.
pub(crate) fn simulate(dir: &Path, ws: &Path, extra: &[&str]) {
    let out = std::process::Command::new(common::bin())
        .args([
            "simulate",
            dir.to_str().unwrap(),
            "-n",
            "3",
            "--quiet",
            "-w",
        ])
        .arg(ws)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first f32 of every tensor of a safetensors file.
pub(crate) fn first_values(path: &Path) -> Vec<f32> {
    let m = flare_node::model_io::read(path).unwrap();
    m.params.values().map(|t| t.to_f32_vec()[0]).collect()
}
