//! Full disks, made real: a small tmpfs mounted over the server's job store or a site's job
//! folder, filled by the test. Mounting needs root; as another user these tests say why and
//! skip (CI runs them as root).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

/// A tmpfs of `size` bytes mounted at `dir`, unmounted (lazily) on drop; `fill` takes its
/// free space, and a `keep_full` thread takes back what others free.
struct Tmpfs {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    filler: Option<std::thread::JoinHandle<()>>,
}

impl Tmpfs {
    fn mount(dir: &Path, size: u64) -> Option<Tmpfs> {
        let uid = Command::new("id").arg("-u").output().unwrap();
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", dir.display());
        Some(Tmpfs {
            dir: dir.to_path_buf(),
            stop: Arc::new(AtomicBool::new(false)),
            filler: None,
        })
    }

    fn filler_path(&self) -> PathBuf {
        self.dir.join("filler")
    }

    /// Fills the file system but for about `leave` bytes.
    fn fill(&self, leave: u64) {
        let out = Command::new("stat")
            .args(["-f", "-c", "%a %S"])
            .arg(&self.dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(|x| x.parse::<u64>().unwrap());
        let free = it.next().unwrap() * it.next().unwrap();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler_path())
            .unwrap();
        let _ = f.write_all(&vec![0u8; free.saturating_sub(leave) as usize]);
    }

    /// Keeps the file system full until dropped: space that frees up is taken again.
    fn keep_full(&mut self) {
        let (stop, path) = (Arc::clone(&self.stop), self.filler_path());
        self.filler = Some(std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            let page = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                while f.write_all(&page).is_ok() {}
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }

    /// Frees what `fill` and `keep_full` took.
    fn free(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.filler.take() {
            t.join().unwrap();
        }
        self.stop.store(false, Ordering::Relaxed);
        let _ = std::fs::remove_file(self.filler_path());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        self.free();
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Finding 3: with the server's disk full, the result clients' `global_final` uploads failed
/// and only the server's log said so; the job stayed `running` forever. Now a model that could
/// not be stored is an event in the job's history and is not acknowledged, so the site sends
/// it again: once there is room, the job finishes; with the disk still full, it fails with the
/// reason once every site has finished.
#[test]
fn a_full_disk_at_the_server_is_reported_retried_and_fails_the_job() {
    let mut f = Federation::prepare(2, 18_850);
    let Some(mut disk) = Tmpfs::mount(&f.prod.join("server/store"), 8 << 20) else {
        return;
    };
    f.start("server");
    f.start("site-1");
    f.start("site-2");
    f.wait_sites(2);
    // Room for records and job folders (128 KB), none for a 200 KB model.
    disk.fill(128 << 10);
    let src = root().join("examples/swarm-mnist");
    let job = f.submit(src.to_str().unwrap());
    let st = f.wait_status(
        &job,
        "no word of the failed store",
        Duration::from_secs(120),
        |st| {
            history_notes(st)
                .iter()
                .any(|n| n.contains("could not store global_final"))
        },
    );
    let note = history_notes(&st)
        .into_iter()
        .find(|n| n.contains("could not store global_final"))
        .unwrap();
    assert!(note.contains("No space left on device"), "{note}");
    assert_eq!(st["state"], "running");
    // Room again: the site's next try is stored and the job finishes.
    disk.free();
    let st = f.wait_status(&job, "the retried upload", Duration::from_secs(120), ended);
    assert_eq!(st["state"], "finished", "{st}");
    let dl = f.admin_json(&["download", &job]);
    assert!(
        Path::new(dl["dir"].as_str().unwrap())
            .join("global_final.safetensors")
            .is_file()
    );

    // Full for good: the job fails, naming the disk, instead of running forever.
    disk.fill(128 << 10);
    let job = f.submit(src.to_str().unwrap());
    let st = f.wait_status(&job, "the job never ended", Duration::from_secs(180), ended);
    assert_eq!(st["state"], "failed", "{st}");
    let last = history_notes(&st).last().cloned().unwrap();
    assert!(
        last.contains("final model was not stored") && last.contains("No space left on device"),
        "{last}"
    );
}

/// Finding 4: a site whose disk was full saved none of its models, yet the job ended with it
/// `finished`, and a stale `local.safetensors` from an early round stayed to be measured by
/// the cross-site evaluation. Now each failed save is in the job's history and the site's
/// state, the stale file is removed (so the evaluation reports the model missing instead of
/// measuring the wrong one), and a deploy onto a full disk is refused as the disk's fault.
#[test]
fn a_full_disk_at_a_site_reaches_the_job_and_leaves_no_stale_model() {
    let mut f = Federation::prepare(2, 18_900);
    let jobs = f.prod.join("site-2/jobs");
    let Some(mut disk) = Tmpfs::mount(&jobs, 4 << 20) else {
        return;
    };
    f.start("server");
    f.start("site-1");
    f.start("site-2");
    f.wait_sites(2);
    let tmp = tempfile::tempdir().unwrap();
    let src = example_copy(tmp.path(), "swarm-cse-mnist", 5, 8, 2);
    let job = f.submit(src.to_str().unwrap());
    // Once site-2 has saved its first model, its disk fills up and stays full.
    let local = jobs.join(&job).join("models/local.safetensors");
    let started = Instant::now();
    while !local.is_file() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{}",
            f.log("site-2")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    disk.fill(0);
    disk.keep_full();
    let st = f.wait_status(&job, "the job never ended", Duration::from_secs(180), ended);
    assert_eq!(st["state"], "finished", "{st}");
    let notes = history_notes(&st);
    let failed_save = notes
        .iter()
        .find(|n| n.starts_with("site-2 could not save its local model"))
        .unwrap_or_else(|| panic!("{notes:#?}"));
    assert!(
        failed_save.contains("No space left on device"),
        "{failed_save}"
    );
    let s2 = st["sites"]["site-2"].as_str().unwrap();
    assert!(
        s2.contains("could not save") && s2.contains("local"),
        "{st}"
    );
    // No stale model: site-2 holds no local model, and the evaluation says it is missing
    // rather than measuring round 0's.
    assert!(!local.exists(), "a stale local model was left");
    assert!(
        st["cross_site"]["site-1"].get("site-2").is_none(),
        "site-2's model was measured: {st}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("site-1 could not evaluate site-2")),
        "{notes:#?}"
    );

    // A deploy onto the full disk is refused, labelled as the disk.
    let job = f.submit(job_copy(tmp.path(), 1, 0).to_str().unwrap());
    let st = f.wait_status(&job, "the deploy", Duration::from_secs(60), ended);
    let s2 = st["sites"]["site-2"].as_str().unwrap();
    assert!(
        s2.contains("the disk is full at site-2") && !s2.contains("job signature"),
        "{st}"
    );
    disk.free();
}
