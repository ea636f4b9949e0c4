//! The real `flare-node provision` and `flare-node poc` binary.

use std::path::Path;
use std::process::{Command, Output};
use std::time::SystemTime;

use flare_provision::load_kit;

fn flare(args: &[&str], cwd: &Path) -> Output {
    Command::new(flare_node::node_bin())
        .args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run flare-node")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn provision_writes_a_sample_then_kits() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No project.yml: a sample is written, and the run fails with a clear message.
    let o = flare(&["provision", "-p", "project.yml", "-w", "ws"], dir.path());
    assert!(!o.status.success());
    assert!(
        text(&o).contains("sample was written to project.yml"),
        "{}",
        text(&o)
    );
    assert!(dir.path().join("project.yml").is_file());
    // With it, kits are made and load.
    let o = flare(&["provision", "-p", "project.yml", "-w", "ws"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let prod = dir.path().join("ws/example_project/prod_00");
    let kit = load_kit(&prod.join("site-1/startup"), SystemTime::now()).expect("kit loads");
    assert_eq!(kit.name(), "site-1");
    // Again: prod_01.
    let o = flare(&["provision", "-p", "project.yml", "-w", "ws"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        dir.path()
            .join("ws/example_project/prod_01/server1/startup/signature.json")
            .is_file()
    );
}

#[test]
fn invalid_project_names_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("p.yml"),
        "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o, fed_learn_port: 99999}\n",
    )
    .expect("write");
    let o = flare(&["provision", "-p", "p.yml"], dir.path());
    assert!(!o.status.success());
    assert!(
        text(&o).contains("participants[0].fed_learn_port"),
        "{}",
        text(&o)
    );
}

#[test]
fn poc_prepare_and_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ws = dir.path().join("poc");
    let ws_s = ws.to_str().expect("utf-8 path");
    let o = flare(&["poc", "prepare", "-n", "2", "-w", ws_s], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let prod = ws.join("example_project/prod_00");
    for name in ["server", "site-1", "site-2", "admin@nvidia.com"] {
        load_kit(&prod.join(name).join("startup"), SystemTime::now()).expect(name);
    }
    let o = flare(&["poc", "prepare", "-n", "2", "-w", ws_s], dir.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("poc clean"), "{}", text(&o));
    let o = flare(&["poc", "clean", "-w", ws_s], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(!ws.exists());
}

#[test]
fn poc_prepare_with_regions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ws = dir.path().join("poc");
    let ws_s = ws.to_str().expect("utf-8 path");
    let o = flare(
        &["poc", "prepare", "--regions", "2", "-n", "3", "-w", ws_s],
        dir.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let prod = ws.join("example_project/prod_00");
    let mut kits = vec!["server".to_string(), "admin@nvidia.com".to_string()];
    for r in ["region-1", "region-2"] {
        kits.push(format!("{r}/{r}"));
        kits.push(format!("{r}/admin@{r}"));
        for i in 1..=3 {
            kits.push(format!("{r}/site-{i}"));
        }
    }
    for rel in &kits {
        let kit = load_kit(&prod.join(rel).join("startup"), SystemTime::now()).expect(rel);
        assert!(
            text(&o).contains(&prod.join(rel).display().to_string()),
            "{rel}"
        );
        let region = rel.split_once('/').map(|(r, _)| r);
        assert_eq!(kit.config.region.as_deref(), region, "{rel}");
    }
    let o = flare(
        &["poc", "prepare", "--regions", "0", "-w", "other"],
        dir.path(),
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("1 to 10 regions"), "{}", text(&o));
}
