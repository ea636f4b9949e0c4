//! `flare-node bench client-api`: what running the user's program out of process costs.
//!
//! The same training runs twice on one synthetic model: in process (`SyntheticLearner`, which
//! adds 1.0 to every weight) and through the `ScriptExecutor` with `flare-test-trainer --mode
//! add --delta 1` (the same arithmetic in another process, over the Client API). Reported:
//! the median task time of each and their difference (the round overhead of the external
//! process), where the time of a task goes (the node writing the task's file, the program's
//! part, the node reading the result's file; the program's read and train times from its
//! result's meta, and its write as the rest of its part), and the node's peak RSS in each phase against the model's size.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use flare_protocols::model::FLModel;
use flare_protocols::shareable::{ReturnCode, Shareable, Task, TaskId, task_names};
use serde_json::json;

use crate::learner::Learner;
use crate::learner::script::{ScriptArgs, ScriptLearner, ScriptSite};
use crate::learner::synthetic::{SyntheticArgs, SyntheticLearner};

/// One `bench client-api` run.
#[derive(Debug, Clone)]
pub struct ClientApiBench {
    /// f32 parameters in the model.
    pub params: usize,
    /// Elements per tensor.
    pub tensor_size: usize,
    /// Train tasks timed in each phase (after one untimed task).
    pub tasks: usize,
    /// The `flare-test-trainer` binary.
    pub trainer: PathBuf,
    /// Where the exchange files go (a tmpfs or a local disk).
    pub work_dir: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The process's resident and peak resident memory in MiB (`/proc/self/status`).
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak RSS to the current RSS (Linux `clear_refs` 5).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn task(id: u64, global: &Arc<FLModel>) -> Task {
    Task {
        id: TaskId(id),
        name: task_names::TRAIN.into(),
        round: id as u32,
        data: Shareable::with_model(Arc::clone(global)),
    }
}

fn check(learner: &mut dyn Learner, task: &Task, global: &FLModel) -> anyhow::Result<FLModel> {
    let r = learner.execute_task(task.clone());
    if r.data.return_code != ReturnCode::Ok {
        anyhow::bail!(
            "task failed: {}",
            r.data.error_reason().unwrap_or("no reason")
        );
    }
    let m = r.data.model.context("the result carries no model")?;
    // The training adds 1.0 to every weight: check a few.
    for (name, t) in m.params.iter().take(2) {
        let g = &global.params[name];
        let (a, b) = (t.to_f32_vec(), g.to_f32_vec());
        anyhow::ensure!(
            a.first()
                .zip(b.first())
                .is_some_and(|(x, y)| (x - y - 1.0).abs() < 1e-6),
            "{name}: the result is not the model plus 1"
        );
    }
    Ok(Arc::try_unwrap(m).unwrap_or_else(|a| (*a).clone()))
}

fn meta_f64(m: &FLModel, key: &str) -> Option<f64> {
    match m.meta.get(key)? {
        flare_protocols::model::MetaValue::Float(f) => Some(*f),
        flare_protocols::model::MetaValue::Int(i) => Some(*i as f64),
        _ => None,
    }
}

/// Runs the benchmark; returns its report as JSON.
pub fn run(b: &ClientApiBench) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        b.trainer.is_file(),
        "{}: no such trainer (build it with `cargo build --release -p flare-client`)",
        b.trainer.display()
    );
    let tmp = tempfile::tempdir()?;
    let work: &Path = b.work_dir.as_deref().unwrap_or(tmp.path());
    let args = SyntheticArgs {
        num_params: b.params,
        tensor_size: b.tensor_size,
        samples: 1,
    };
    let global = Arc::new(args.init()?);
    let model_mib = global.num_bytes() as f64 / (1 << 20) as f64;
    let (base_rss, _) = rss_mib();

    // In process.
    let mut inproc = SyntheticLearner::new(args.clone(), 0);
    check(&mut inproc, &task(0, &global), &global)?;
    reset_peak();
    let mut inproc_s = Vec::new();
    for i in 1..=b.tasks {
        let t = Instant::now();
        drop(check(&mut inproc, &task(i as u64, &global), &global)?);
        inproc_s.push(t.elapsed().as_secs_f64());
    }
    let (_, inproc_peak) = rss_mib();

    // Out of process.
    let app = work.join("app");
    std::fs::create_dir_all(&app)?;
    let script = ScriptArgs {
        command: vec![
            b.trainer.display().to_string(),
            "--mode".into(),
            "add".into(),
            "--delta".into(),
            "1".into(),
            "--forget-trained".into(),
        ],
        launch_once: true,
        params_transfer_type: Default::default(),
        params_format: "numpy".into(),
        train_with_evaluation: true,
        task_timeout: 600.0,
        heartbeat_timeout: 60.0,
        heartbeat_interval: 5.0,
        launch_timeout: 60.0,
        stop_grace_period: 5.0,
        env: Default::default(),
    };
    let mut ext = ScriptLearner::new(
        script,
        ScriptSite {
            app_dir: app,
            work_dir: work.to_path_buf(),
            job_id: "bench".into(),
            site_name: "site-1".into(),
            tasks: vec![task_names::TRAIN.into()],
            tracker: crate::tracking::Tracker::off(),
            gpus: None,
        },
    );
    let t = Instant::now();
    check(&mut ext, &task(0, &global), &global)?;
    let first_s = t.elapsed().as_secs_f64();
    reset_peak();
    let (mut ext_s, mut write_s, mut program_s, mut read_s) = (vec![], vec![], vec![], vec![]);
    let (mut p_read, mut p_train, mut p_write) = (vec![], vec![], vec![]);
    for i in 1..=b.tasks {
        let t = Instant::now();
        let m = check(&mut ext, &task(i as u64, &global), &global)?;
        ext_s.push(t.elapsed().as_secs_f64());
        let h = ext.handoff();
        write_s.push(h.write_s);
        program_s.push(h.program_s);
        read_s.push(h.read_s);
        let (pr, pt) = (
            meta_f64(&m, "trainer.read_s").unwrap_or(f64::NAN),
            meta_f64(&m, "trainer.train_s").unwrap_or(f64::NAN),
        );
        p_read.push(pr);
        p_train.push(pt);
        // The program's write is the rest of its part (with the two messages' latency).
        p_write.push(h.program_s - pr - pt);
    }
    let (_, ext_peak) = rss_mib();
    drop(ext);

    let (m_in, m_ext) = (median(inproc_s), median(ext_s));
    let (w, r) = (median(write_s), median(read_s));
    let (pr, pw) = (median(p_read), median(p_write));
    Ok(json!({
        "params": b.params,
        "model_mib": model_mib,
        "tasks": b.tasks,
        "in_process_task_s": m_in,
        "script_task_s": m_ext,
        "overhead_per_task_ms": (m_ext - m_in) * 1e3,
        "script_first_task_s (with the launch)": first_s,
        "node_write_task_file_s": w,
        "program_part_s": median(program_s),
        "node_read_result_file_s": r,
        "program_read_s": pr,
        "program_train_s": median(p_train),
        "program_write_and_messages_s": pw,
        "handoff_to_program_s (node write + program read)": w + pr,
        "handoff_to_node_s (program write + node read)": pw + r,
        "node_rss_before_mib": base_rss,
        "node_peak_rss_in_process_mib": inproc_peak,
        "node_peak_rss_script_mib": ext_peak,
        "node_peak_rss_in_process_per_model": inproc_peak / model_mib,
        "node_peak_rss_script_per_model": ext_peak / model_mib,
    }))
}
