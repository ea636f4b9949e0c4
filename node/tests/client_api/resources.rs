//! Sites that lend GPUs (`local/resources.json`): each job's program sees only the GPUs its
//! site reserved for it (`CUDA_VISIBLE_DEVICES`), a job whose GPUs are taken waits with the
//! reason, and one asking more than a site has is refused at submit. No GPU is needed: the
//! sites lend device numbers, and the program prints what it was given.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::common::{Federation, ended, history_notes};
use super::{Sites, job, sag};

/// A job of `rounds` slow rounds asking `gpus` GPUs of every site; its program prints the
/// GPUs it sees before it starts.
fn gpu_job(dir: &std::path::Path, name: &str, rounds: u32, gpus: u32) -> std::path::PathBuf {
    let sites = Sites {
        per_site: &[],
        default: "\"$T\" --mode slow --sleep 1",
    };
    let job = job(dir, name, &sag(rounds, 120), &sites, "");
    let run = job.join("app/custom/run.sh");
    let script = std::fs::read_to_string(&run).unwrap();
    std::fs::write(
        &run,
        format!("echo \"{name} sees GPUs [${{CUDA_VISIBLE_DEVICES-unset}}]\"\n{script}"),
    )
    .unwrap();
    let meta = job.join("meta.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    m["resource_spec"] = serde_json::json!({ "@ALL": { "num_of_gpus": gpus } });
    std::fs::write(&meta, serde_json::to_vec(&m).unwrap()).unwrap();
    job
}

#[test]
fn jobs_get_only_their_reserved_gpus_and_wait_for_taken_ones() {
    let mut f = Federation::prepare(2, 28_200);
    for s in ["site-1", "site-2"] {
        std::fs::write(
            f.prod.join(s).join("local/resources.json"),
            r#"{"format_version": 1, "gpus": [0, 1], "max_concurrent_jobs": 4}"#,
        )
        .unwrap();
    }
    f.start("server");
    f.start("site-1");
    f.start("site-2");
    f.wait_sites(2);
    let tmp = tempfile::tempdir().unwrap();

    // More GPUs than a site has: refused at submit, naming the site.
    let too_big = gpu_job(tmp.path(), "three", 1, 3);
    let out = f.admin(&["submit", too_big.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("site-1: the job asks for 3 GPUs, this site has 2"),
        "{text}"
    );
    assert_eq!(f.admin_json(&["list"]).as_array().unwrap().len(), 0);

    // Both GPUs to the first job; the second waits for one, then gets GPU 0.
    let a = f.submit(gpu_job(tmp.path(), "both", 4, 2).to_str().unwrap());
    let b = f.submit(gpu_job(tmp.path(), "one", 1, 1).to_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = f.admin_json(&["status", &b]);
        if history_notes(&st).iter().any(|n| {
            n.starts_with("waiting for resources: site-")
                && n.contains("1 free GPUs: 0 of this site's 2")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "{st}\n{}", f.log_tails(20));
        std::thread::sleep(Duration::from_millis(100));
    }
    for id in [&a, &b] {
        let st = f.wait_status(id, "the job did not end", Duration::from_secs(120), ended);
        assert_eq!(st["state"], "finished", "{st}\n{}", f.log_tails(20));
    }
    for s in ["site-1", "site-2"] {
        let log = f.log(s);
        assert!(log.contains("both sees GPUs [0,1]"), "{s}:\n{log}");
        assert!(log.contains("one sees GPUs [0]"), "{s}:\n{log}");
    }
}
