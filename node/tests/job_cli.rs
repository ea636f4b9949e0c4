//! `flare-node job`: templates make jobs that load, variables land where they are named, bad
//! ones are refused naming the template, the file and the key, and a job made from a template
//! runs to the end in a POC federation after the library's submit.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use flare_node::job::Job;
use flare_node::job_cli::{self, ConfigEdits, CreateOptions};
use serde_json::Value;

fn templates() -> PathBuf {
    common::root().join("job_templates")
}

fn edits(file: &str, sets: &[&str]) -> ConfigEdits {
    ConfigEdits {
        file: file.into(),
        sets: sets.iter().map(|s| s.to_string()).collect(),
    }
}

fn options(job_dir: &Path, template: &str, edits: Vec<ConfigEdits>) -> CreateOptions {
    CreateOptions {
        job_dir: job_dir.to_path_buf(),
        template: template.into(),
        templates_dir: Some(templates()),
        edits,
        ..CreateOptions::default()
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The refusal of `create`, checked to leave nothing behind in `dir`.
fn refused(dir: &Path, opts: &CreateOptions) -> String {
    let before = entries(dir);
    let e = match job_cli::create(opts) {
        Ok(c) => panic!("created {}", c.job_dir.display()),
        Err(e) => format!("{e:#}"),
    };
    assert_eq!(entries(dir), before, "a refused create left files: {e}");
    e
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{p:?} missing from: {msg}");
    }
}

#[test]
fn every_template_is_listed_and_creates_a_job_that_loads() {
    let list = job_cli::list_templates(&templates()).unwrap();
    let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "cyclic",
            "sag",
            "sag_pt",
            "swarm",
            "swarm_cse",
            "tiered_sag"
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    for t in &list {
        assert!(t.problem.is_none(), "{}: {:?}", t.name, t.problem);
        assert!(t.description.len() > 10, "{}: {}", t.name, t.description);
        let job_dir = dir.path().join(format!("my-{}", t.name));
        let created = job_cli::create(&options(&job_dir, &t.name, vec![])).unwrap();
        assert_eq!(created.template, format!("job_templates/{}", t.name));
        let job = Job::load(&job_dir).unwrap_or_else(|e| panic!("{}: {e}", t.name));
        assert_eq!(job.meta.name, format!("my-{}", t.name));
        assert!(!job_dir.join("info.md").exists());
    }
    let by = |n: &str| list.iter().find(|t| t.name == n).unwrap();
    assert_eq!(by("sag").controller, "server");
    assert_eq!(by("swarm").controller, "client");
    assert_eq!(by("swarm_cse").workflows, ["Swarm", "CrossSiteEval"]);
    assert_eq!(by("sag_pt").executor, "ScriptExecutor");
    assert_eq!(by("tiered_sag").workflows, ["TieredScatterAndGather"]);
}

#[test]
fn the_templates_folder_is_found_from_the_working_directory() {
    // Tests run in node/: the repository's job_templates/ is one folder up.
    let found = job_cli::templates_dir(None).unwrap();
    assert_eq!(
        found.canonicalize().unwrap(),
        templates().canonicalize().unwrap()
    );
    let e = job_cli::templates_dir(Some(Path::new("/nonexistent/templates"))).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/templates"), "{e}");
}

#[test]
fn variables_set_by_path_and_by_leaf_land_in_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let job_dir = dir.path().join("fedavg");
    let created = job_cli::create(&options(
        &job_dir,
        "sag",
        vec![
            edits(
                "config_fed_server.json",
                &[
                    "workflows[0].args.num_rounds=3",
                    "components[1].name=FedProx",
                ],
            ),
            edits(
                "config_fed_client.json",
                &[
                    "epochs=1",
                    "lr=0.05",
                    r#"partition={"kind": "dirichlet", "alpha": 0.5}"#,
                    r#"tasks=["train", "validate"]"#,
                ],
            ),
            // FLARE's file name, the stem, and a top-level key by its name.
            edits("config_fed_server.conf", &["task_timeout=300"]),
            edits("meta", &["min_clients=3"]),
        ],
    ))
    .unwrap();
    let keys: Vec<&str> = created.changes.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "workflows[0].args.num_rounds",
            "components[1].name",
            "executors[0].executor.args.epochs",
            "executors[0].executor.args.lr",
            "executors[0].executor.args.partition",
            "executors[0].tasks",
            "workflows[0].args.task_timeout",
            "min_clients",
        ]
    );
    let config = job_dir.join("app/config");
    let server = read_json(&config.join("config_fed_server.json"));
    assert_eq!(server["workflows"][0]["args"]["num_rounds"], 3);
    assert_eq!(server["workflows"][0]["args"]["task_timeout"], 300);
    assert_eq!(server["components"][1]["name"], "FedProx");
    let client = read_json(&config.join("config_fed_client.json"));
    let args = &client["executors"][0]["executor"]["args"];
    assert_eq!(args["epochs"], 1);
    assert_eq!(args["lr"], 0.05);
    assert_eq!(args["partition"]["kind"], "dirichlet");
    assert_eq!(args["partition"]["alpha"], 0.5);
    assert_eq!(read_json(&job_dir.join("meta.json"))["min_clients"], 3);

    // Only the values changed: the rest of each file keeps the template's text.
    let text = std::fs::read_to_string(config.join("config_fed_client.json")).unwrap();
    let template =
        std::fs::read_to_string(templates().join("sag/app/config/config_fed_client.json")).unwrap();
    let changed: Vec<(&str, &str)> = text
        .lines()
        .zip(template.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(text.lines().count(), template.lines().count());
    assert_eq!(changed.len(), 3, "{changed:?}"); // epochs, lr, partition
    assert!(text.contains(r#""tasks": ["train", "validate"]"#), "{text}");

    let job = Job::load(&job_dir).unwrap();
    assert_eq!(job.meta.min_clients, 3);
    assert_eq!(job.server.sag.num_rounds, 3);
}

#[test]
fn bad_keys_and_values_name_the_template_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let job_dir = dir.path().join("job");

    let e = refused(
        dir.path(),
        &options(
            &job_dir,
            "swarm",
            vec![edits(
                "config_fed_server.json",
                &["workflows[0].args.num_roundz=3"],
            )],
        ),
    );
    assert_eq!(
        e,
        "job_templates/swarm: config_fed_server.json: workflows[0].args.num_roundz: no such key (did you mean num_rounds?)"
    );

    let e = refused(
        dir.path(),
        &options(
            &job_dir,
            "sag",
            vec![edits("config_fed_client.json", &["epoch=1"])],
        ),
    );
    assert_names(
        &e,
        &[
            "job_templates/sag",
            "config_fed_client.json",
            "epoch",
            "no such key",
            "did you mean epochs?",
        ],
    );

    // Both workflows of swarm_cse have a progress_timeout.
    let e = refused(
        dir.path(),
        &options(
            &job_dir,
            "swarm_cse",
            vec![edits("config_fed_server.json", &["progress_timeout=900"])],
        ),
    );
    assert_names(
        &e,
        &[
            "job_templates/swarm_cse: config_fed_server.json: progress_timeout: ambiguous",
            "workflows[0].args.progress_timeout",
            "workflows[1].args.progress_timeout",
        ],
    );

    // A value of the wrong type, caught by Job::load with the key's full path.
    let e = refused(
        dir.path(),
        &options(
            &job_dir,
            "sag",
            vec![edits("config_fed_server.json", &["num_rounds=two"])],
        ),
    );
    assert_names(
        &e,
        &[
            "job_templates/sag: config_fed_server.json: workflows[0].args.num_rounds:",
            "invalid type",
            "two",
        ],
    );
    let e = refused(
        dir.path(),
        &options(
            &job_dir,
            "cyclic",
            vec![edits("config_fed_client.json", &["lr=-1"])],
        ),
    );
    assert_names(
        &e,
        &[
            "job_templates/cyclic: config_fed_client.json: executors[0].executor.args",
            "lr must be positive",
        ],
    );

    // No such file, no KEY=VALUE, no such template.
    let e = refused(
        dir.path(),
        &options(
            &job_dir,
            "sag",
            vec![edits("config_fed_srever.json", &["num_rounds=2"])],
        ),
    );
    assert_names(
        &e,
        &[
            "job_templates/sag: config_fed_srever.json: no such config file",
            "config_fed_server.json",
        ],
    );
    let e = refused(
        dir.path(),
        &options(
            &job_dir,
            "sag",
            vec![edits("config_fed_server.json", &["num_rounds"])],
        ),
    );
    assert_names(&e, &["config_fed_server.json", "expected KEY=VALUE"]);
    let e = refused(dir.path(), &options(&job_dir, "swarn", vec![]));
    assert_names(
        &e,
        &["no template \"swarn\"", "did you mean swarm?", "sag_pt"],
    );
}

#[test]
fn an_existing_job_folder_is_replaced_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let job_dir = dir.path().join("job");
    job_cli::create(&options(&job_dir, "sag", vec![])).unwrap();
    let e = refused(dir.path(), &options(&job_dir, "swarm", vec![]));
    assert_names(&e, &["exists", "--force"]);
    let mut opts = options(&job_dir, "swarm", vec![]);
    opts.force = true;
    job_cli::create(&opts).unwrap();
    assert_eq!(
        read_json(&job_dir.join("app/config/config_fed_server.json"))["workflows"][0]["name"],
        "Swarm"
    );
    assert_eq!(entries(dir.path()), ["job"]);

    // --force does not replace a folder that is not a job.
    let other = dir.path().join("notes");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("todo.txt"), "keep me").unwrap();
    let mut opts = options(&other, "sag", vec![]);
    opts.force = true;
    let e = refused(dir.path(), &opts);
    assert_names(&e, &["not a job folder"]);
    assert!(other.join("todo.txt").exists());

    // Nor the templates themselves.
    let mut opts = options(&templates().join("sag"), "sag", vec![]);
    opts.force = true;
    let e = format!("{:#}", job_cli::create(&opts).unwrap_err());
    assert_names(&e, &["overwrite the template"]);
}

#[test]
fn a_script_goes_into_the_client_api_template_only() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("my_train.py");
    std::fs::write(&script, "import flare_client as flare\n").unwrap();
    let job_dir = dir.path().join("pt");
    let mut opts = options(
        &job_dir,
        "sag_pt",
        vec![edits(
            "config_fed_client.json",
            &["params_transfer_type=DIFF"],
        )],
    );
    opts.script = Some(script.clone());
    opts.script_args = vec!["--epochs".into(), "3".into()];
    job_cli::create(&opts).unwrap();
    let custom = job_dir.join("app/custom");
    assert_eq!(
        std::fs::read_to_string(custom.join("my_train.py")).unwrap(),
        "import flare_client as flare\n"
    );
    assert!(!custom.join("train.py").exists());
    let client = read_json(&job_dir.join("app/config/config_fed_client.json"));
    let args = &client["executors"][0]["executor"]["args"];
    assert_eq!(
        args["command"],
        serde_json::json!(["python3", "-u", "custom/my_train.py", "--epochs", "3"])
    );
    assert_eq!(args["params_transfer_type"], "DIFF");
    Job::load(&job_dir).unwrap();

    let mut opts = options(&dir.path().join("mlp"), "swarm", vec![]);
    opts.script = Some(script);
    let e = refused(dir.path(), &opts);
    assert_names(
        &e,
        &[
            "job_templates/swarm: --script needs a Client API template",
            "sag_pt",
            "MnistMlpLearner",
        ],
    );
}

#[test]
fn show_variables_lists_every_leaf_with_its_value() {
    let dir = tempfile::tempdir().unwrap();
    let job_dir = dir.path().join("fedavg");
    job_cli::create(&options(
        &job_dir,
        "sag",
        vec![edits("config_fed_server.json", &["num_rounds=7"])],
    ))
    .unwrap();
    let vars = job_cli::show_variables(&job_dir).unwrap();
    let find = |file: &str, key: &str| {
        vars.iter()
            .find(|v| v.file == file && v.key == key)
            .unwrap_or_else(|| panic!("{file} {key} not in {vars:#?}"))
    };
    let n = find("config_fed_server.json", "workflows[0].args.num_rounds");
    assert_eq!(n.value, 7);
    assert_eq!(n.component.as_deref(), Some("ScatterAndGather"));
    let e = find(
        "config_fed_client.json",
        "executors[0].executor.args.epochs",
    );
    assert_eq!(e.value, 2);
    assert_eq!(e.component.as_deref(), Some("MnistMlpLearner"));
    assert_eq!(
        find("config_fed_client.json", "executors[0].tasks").value,
        serde_json::json!(["train", "validate"])
    );
    assert_eq!(
        find(
            "config_fed_client.json",
            "executors[0].executor.args.partition.kind"
        )
        .value,
        "uniform"
    );
    assert_eq!(find("meta.json", "name").value, "fedavg");
    assert_eq!(
        find("config_fed_server.json", "components[1].args").value,
        serde_json::json!({})
    );
    // Files in order (meta, server, client), keys in the files' order; no list items.
    assert_eq!(vars[0].file, "meta.json");
    assert!(vars.iter().all(|v| !v.key.ends_with(']')), "{vars:#?}");
    let files: Vec<&str> = vars.iter().map(|v| v.file.as_str()).collect();
    let first_client = files
        .iter()
        .position(|f| *f == "config_fed_client.json")
        .unwrap();
    assert!(
        files[first_client..]
            .iter()
            .all(|f| *f == "config_fed_client.json")
    );

    let e = job_cli::show_variables(dir.path()).unwrap_err();
    assert!(e.to_string().contains("not a job folder"), "{e}");
}

/// The loop a user runs: create from the scatter-and-gather template with 2 rounds of 1
/// epoch, submit with the library to a POC federation of two sites, wait until it finishes.
#[test]
fn a_job_from_each_template_runs_in_a_poc_federation() {
    let bin = common::bin();
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build --release -p flare-hub)",
        bin.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let f = common::Federation::running(3, 27_600);
    let kit = f.prod.join("admin@nvidia.com").join("startup");
    // The loop of the README, through the binary as a user runs it. sag_pt needs PyTorch
    // (scripts/test-torch.sh runs hello-pt, its job) and tiered_sag a hub (hub/tests runs hub-mnist).
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(args)
            .current_dir(common::root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "flare-node {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let mut ids = Vec::new();
    for template in ["sag", "swarm", "cyclic", "swarm_cse"] {
        let job_dir = dir.path().join(template);
        let job = job_dir.to_str().unwrap();
        run(&[
            "job",
            "create",
            "-j",
            job,
            "-w",
            template,
            "-f",
            "config_fed_server.json",
            "num_rounds=2",
            "-f",
            "config_fed_client.json",
            "epochs=1",
        ]);
        let out = run(&["job", "submit", "-j", job, "--kit", kit.to_str().unwrap()]);
        // stdout holds the job id alone (the hint goes to stderr), for `id=$(…)`.
        let id = out.trim().to_string();
        assert!(!id.is_empty() && !id.contains(' '), "{template}: {out:?}");
        ids.push((template, id));
    }
    for (template, id) in &ids {
        let out = f.admin(&["wait", id, "--timeout", "300"]);
        let st: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert!(
            out.status.success() && st["state"] == "finished",
            "{template}: job {id} did not finish: {st}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            f.log_tails(30)
        );
    }

    // A kit that does not load is reported before anything is sent.
    let job_dir = dir.path().join("sag");
    let e = job_cli::submit(&job_dir, Path::new("/nonexistent/startup")).unwrap_err();
    assert!(
        format!("{e:#}").contains("admin kit /nonexistent/startup"),
        "{e:#}"
    );
}
