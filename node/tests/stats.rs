//! Federated statistics end to end: `examples/stats-mnist` and `examples/stats-csv` in the
//! simulator (the global statistics against the pooled data computed here: count and mean
//! exact where every sum is exact, variance within 1e-9 relative, histograms bucket for
//! bucket), on a POC federation of real processes (the download holds statistics.json and
//! its plots, and `admin download` prints the table), a site whose `privacy.json` cleanser
//! drops a feature it has too few values of (it shares nothing about that feature, and the
//! rest of its data still counts), and bad configs refused with the file and the key.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Federation, bin, root};
use flare_node::data::Dataset;
use serde_json::Value;

/// The POC federation's port base.
const PORT: u16 = 27_700;

/// A copy of `examples/<name>` in `dir`; `edit` changes its server and client configs.
fn example_copy(dir: &Path, name: &str, edit: impl FnOnce(&mut Value, &mut Value)) -> PathBuf {
    let src = root().join("examples").join(name);
    let job = dir.join(name);
    std::fs::create_dir_all(job.join("app/config")).unwrap();
    std::fs::copy(src.join("meta.json"), job.join("meta.json")).unwrap();
    let read = |f: &str| -> Value {
        serde_json::from_slice(&std::fs::read(src.join("app/config").join(f)).unwrap()).unwrap()
    };
    let (mut server, mut client) = (
        read("config_fed_server.json"),
        read("config_fed_client.json"),
    );
    // The examples' data paths (`../../data/...`) are found from the working directory, the
    // repository's root: make them absolute for the copy.
    for c in client["components"].as_array_mut().unwrap() {
        for key in ["data_dir", "data_path"] {
            if let Some(p) = c["args"][key].as_str() {
                let tail: PathBuf = Path::new(p)
                    .components()
                    .skip_while(|c| matches!(c, Component::ParentDir | Component::CurDir))
                    .collect();
                c["args"][key] = Value::from(root().join(tail).to_str().unwrap());
            }
        }
    }
    edit(&mut server, &mut client);
    for (f, v) in [
        ("config_fed_server.json", &server),
        ("config_fed_client.json", &client),
    ] {
        std::fs::write(
            job.join("app/config").join(f),
            serde_json::to_vec_pretty(v).unwrap(),
        )
        .unwrap();
    }
    job
}

/// Full precision in the output, so the comparisons below are not with rounded numbers.
fn full_precision(server: &mut Value, _: &mut Value) {
    server["workflows"][0]["args"]["precision"] = Value::from(15);
}

/// `flare-node simulator <job> -n <n>`: its stdout, or the failure with stderr.
fn simulate(job: &Path, n: usize, ws: &Path, json: bool) -> Result<String, String> {
    let mut cmd = Command::new(bin());
    cmd.arg("simulator")
        .arg(job)
        .args(["-n", &n.to_string(), "--quiet", "-w"])
        .arg(ws)
        .current_dir(root());
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Count, mean and sample variance (ddof 1) of `v`, the variance in two passes.
fn moments(v: &[f64]) -> (u64, f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (v.len() as u64, mean, var)
}

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs()
}

fn global<'a>(stats: &'a Value, feature: &str, stat: &str) -> &'a Value {
    &stats[feature][stat]["Global"]["train"]
}

/// Checks a run's global statistics of `feature` against `pooled`; `exact_mean` where every
/// sum of the data is exact in f64 (integers), else within 1e-12 relative (decimal fractions
/// summed in another order round differently in the last place).
fn check_feature(stats: &Value, feature: &str, pooled: &[f64], exact_mean: bool) {
    let (n, mean, var) = moments(pooled);
    assert_eq!(
        global(stats, feature, "count").as_u64(),
        Some(n),
        "{feature}"
    );
    let got_mean = global(stats, feature, "mean").as_f64().unwrap();
    if exact_mean {
        let want = flare_protocols::stats::round_to(mean, 15);
        assert_eq!(got_mean, want, "{feature}: mean");
    } else {
        assert!(
            close(got_mean, mean, 1e-12),
            "{feature}: mean {got_mean} vs {mean}"
        );
    }
    let got_var = global(stats, feature, "var").as_f64().unwrap();
    assert!(
        close(got_var, var, 1e-9),
        "{feature}: var {got_var} vs {var}"
    );
    let sd = global(stats, feature, "stddev").as_f64().unwrap();
    assert!(close(sd, var.sqrt(), 1e-9), "{feature}: stddev {sd}");
    // The noised extremes contain the true ones.
    let lo = pooled.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = pooled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert!(
        global(stats, feature, "min").as_f64().unwrap() <= lo,
        "{feature}: min"
    );
    assert!(
        global(stats, feature, "max").as_f64().unwrap() >= hi,
        "{feature}: max"
    );
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn the_simulator_matches_the_pooled_mnist() {
    let dir = tempfile::tempdir().unwrap();
    let job = example_copy(dir.path(), "stats-mnist", full_precision);
    let report: Value =
        serde_json::from_str(&simulate(&job, 3, &dir.path().join("ws"), true).unwrap()).unwrap();
    let st = &report["statistics"];
    assert_eq!(
        st["sites"],
        serde_json::json!(["site-1", "site-2", "site-3"])
    );
    let stats = read_json(Path::new(st["json"].as_str().unwrap()));
    assert_eq!(
        stats, st["output"],
        "the report carries the file's statistics"
    );

    let ds = Dataset::load_mnist_test(&root().join("data/mnist")).unwrap();
    let pixels: Vec<f64> = ds.images.iter().map(|&p| f64::from(p)).collect();
    let labels: Vec<f64> = ds.labels.iter().map(|&l| f64::from(l)).collect();
    check_feature(&stats, "intensity", &pixels, true);
    check_feature(&stats, "label", &labels, true);
    // 256 buckets of width 1 over [0, 256]: bucket k holds the pixels of value k.
    let mut want = vec![0u64; 256];
    for &p in &ds.images {
        want[usize::from(p)] += 1;
    }
    let got: Vec<u64> = global(&stats, "intensity", "histogram")
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[2].as_u64().unwrap())
        .collect();
    assert_eq!(got, want);
    // Each site's counts add up to the global one; sites differ (a Dirichlet split).
    let site_counts: Vec<u64> = (1..=3)
        .map(|i| {
            stats["label"]["count"][format!("site-{i}")]["train"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(site_counts.iter().sum::<u64>(), 10_000);
    let plots: Vec<&str> = st["plots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(plots.len(), 2, "{plots:?}");
    for p in plots {
        let svg = std::fs::read_to_string(p).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("site-3"), "{p}");
    }
}

#[test]
fn the_shipped_examples_run_in_the_simulator_and_print_a_table() {
    let dir = tempfile::tempdir().unwrap();
    for (example, features) in [
        ("stats-mnist", &["intensity", "label"][..]),
        (
            "stats-csv",
            &["petal_length", "petal_width", "sepal_length", "sepal_width"][..],
        ),
    ] {
        let ws = dir.path().join(example);
        let out = simulate(&root().join("examples").join(example), 3, &ws, false).unwrap();
        let header = out.lines().next().unwrap();
        assert!(
            header.starts_with("feature") && header.contains("stddev"),
            "{out}"
        );
        assert!(!out.contains("final model:"), "{out}");
        let folder = ws.join("server/simulate_job");
        assert!(
            out.contains(&format!(
                "statistics:    {}",
                folder.join("statistics.json").display()
            )),
            "{out}"
        );
        for f in features {
            // Rows for the three sites and Global, and its plot.
            let rows = out.lines().filter(|l| l.starts_with(f)).count();
            assert_eq!(rows, 4, "{f}: {out}");
            assert!(folder.join(format!("histogram_{f}.svg")).is_file(), "{f}");
        }
    }
}

#[test]
fn the_simulator_matches_the_pooled_iris_on_any_number_of_sites() {
    let dir = tempfile::tempdir().unwrap();
    let job = example_copy(dir.path(), "stats-csv", full_precision);
    let features = ["sepal_length", "sepal_width", "petal_length", "petal_width"].map(String::from);
    let columns =
        flare_node::stats::data::read_csv(&root().join("data/iris/iris.csv"), &features).unwrap();
    for n in [2, 3] {
        let report: Value = serde_json::from_str(
            &simulate(&job, n, &dir.path().join(format!("ws{n}")), true).unwrap(),
        )
        .unwrap();
        let stats = &report["statistics"]["output"];
        for (f, col) in features.iter().zip(&columns) {
            check_feature(stats, f, col, false);
        }
        let sites = stats["sepal_length"]["count"].as_object().unwrap().len();
        assert_eq!(sites, n + 1, "every site and Global");
    }
}

#[test]
fn bad_configs_are_refused_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    type Edit = fn(&mut Value, &mut Value);
    let cases: [(&str, Edit, &[&str]); 4] = [
        (
            "bins",
            |s, _| {
                s["workflows"][0]["args"]["statistic_configs"]["histogram"] =
                    serde_json::json!({"*": {"bins": 0}});
            },
            &[
                "config_fed_server.json",
                "workflows[0].args.statistic_configs",
                "bins is 0",
            ],
        ),
        (
            "cleanser",
            |_, c| {
                c["task_result_filters"][0]["filters"][0]["args"]["result_cleanser_ids"][2] =
                    Value::from("no_such_cleanser");
            },
            &[
                "config_fed_client.json",
                "task_result_filters[0].filters[0].args.result_cleanser_ids[2]",
                "no_such_cleanser",
            ],
        ),
        (
            "column",
            |_, c| {
                c["components"][0]["args"]["features"][1] = Value::from("petal_area");
            },
            &[
                "config_fed_client.json",
                "components[0].args.data_path",
                "no column \"petal_area\"",
            ],
        ),
        (
            "noise",
            |_, c| {
                c["components"][2]["args"]["max_noise_level"] = Value::from(1.5);
            },
            &[
                "config_fed_client.json",
                "components[2].args",
                "noise levels",
            ],
        ),
    ];
    for (name, edit, wants) in cases {
        let case_dir = dir.path().join(name);
        let job = example_copy(&case_dir, "stats-csv", edit);
        let err = simulate(&job, 3, &case_dir.join("ws"), true).unwrap_err();
        for w in wants {
            assert!(err.contains(w), "{name}: {w:?} not in {err}");
        }
    }
}

/// A CSV of 30 rows, split 10/10/10 across three sites: `a` everywhere, `b` in every row of
/// sites 1 and 3 but only 2 of site 2's.
fn sparse_csv(path: &Path) {
    let mut text = String::from("a,b\n");
    for i in 0..30 {
        let b = if (10..20).contains(&i) && i % 4 != 0 {
            String::new()
        } else {
            (100 + i).to_string()
        };
        text.push_str(&format!("{i},{b}\n"));
    }
    std::fs::write(path, text).unwrap();
}

/// Site 2's privacy policy: FLARE's layout, a cleanser component that its default scope's
/// StatisticsPrivacyFilter names.
const PRIVACY: &str = r#"{
  "scopes": [
    {"name": "public", "properties": {},
     "task_result_filters": [
       {"name": "StatisticsPrivacyFilter", "args": {"result_cleanser_ids": ["min_count_cleanser"]}}
     ]}
  ],
  "default_scope": "public",
  "components": [
    {"id": "min_count_cleanser",
     "path": "nvflare.app_common.statistics.min_count_cleanser.MinCountCleanser",
     "args": {"min_count": 10}}
  ]
}"#;

fn download(f: &Federation, job: &str) -> PathBuf {
    let dl = f.admin_json(&["download", job]);
    PathBuf::from(dl["dir"].as_str().unwrap())
}

#[test]
fn a_poc_federation_runs_the_csv_example_and_a_site_below_min_count_shares_nothing() {
    let mut f = Federation::prepare(3, PORT);
    std::fs::write(f.prod.join("site-2/local/privacy.json"), PRIVACY).unwrap();
    f.start("server");
    for i in 1..=3 {
        f.start(&format!("site-{i}"));
    }
    f.wait_sites(3);
    let finished = |st: &Value| common::ended(st);
    let limit = Duration::from_secs(180);

    // The example as shipped: every site's 50 rows count.
    let id = f.submit(root().join("examples/stats-csv").to_str().unwrap());
    let st = f.wait_status(&id, "stats-csv did not end", limit, finished);
    assert_eq!(st["state"], "finished", "{st}\n{}", f.log_tails(30));
    let out = Command::new(bin())
        .arg("admin")
        .arg("--kit")
        .arg(f.prod.join("admin@nvidia.com/startup"))
        .args(["download", &id])
        .current_dir(root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("statistics (statistics.json):"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("petal_length") && l.contains("Global") && l.contains(" 150 ")),
        "{text}"
    );
    let dir = download(&f, &id);
    let stats = read_json(&dir.join("statistics.json"));
    for feature in ["sepal_length", "sepal_width", "petal_length", "petal_width"] {
        assert_eq!(
            global(&stats, feature, "count").as_u64(),
            Some(150),
            "{feature}"
        );
        assert!(
            dir.join(format!("histogram_{feature}.svg")).is_file(),
            "{feature}"
        );
    }
    assert_eq!(stats["sepal_length"]["count"]["site-2"]["train"], 50);

    // A job whose feature `b` site 2 holds only 2 values of: its privacy.json drops it.
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("sparse.csv");
    sparse_csv(&csv);
    let job = example_copy(tmp.path(), "stats-csv", |s, c| {
        s["workflows"][0]["args"]["statistic_configs"] = serde_json::json!({
            "count": {}, "mean": {}, "min": {}, "max": {}, "var": {}, "histogram": {"*": {"bins": 2}}
        });
        c["task_result_filters"] = serde_json::json!([]);
        c["components"] = serde_json::json!([{
            "id": "iris_stats", "name": "CsvStats",
            "args": {"data_path": csv.to_str().unwrap(), "features": ["a", "b"]}
        }]);
    });
    let id = f.submit(job.to_str().unwrap());
    let st = f.wait_status(&id, "the sparse job did not end", limit, finished);
    assert_eq!(st["state"], "finished", "{st}\n{}", f.log_tails(30));
    let stats = read_json(&download(&f, &id).join("statistics.json"));
    for (stat, by_site) in stats["b"].as_object().unwrap() {
        let sites: Vec<&String> = by_site.as_object().unwrap().keys().collect();
        assert_eq!(sites, ["Global", "site-1", "site-3"], "b/{stat}");
    }
    // What site 2 keeps back is missing from the global numbers too; the rest counts.
    let b: Vec<f64> = (0..10).chain(20..30).map(|i| f64::from(100 + i)).collect();
    let (n, mean, var) = moments(&b);
    assert_eq!(global(&stats, "b", "count").as_u64(), Some(n));
    assert_eq!(
        global(&stats, "b", "mean").as_f64(),
        Some(flare_protocols::stats::round_to(mean, 4))
    );
    assert!(close(
        global(&stats, "b", "var").as_f64().unwrap(),
        var,
        1e-4
    ));
    assert_eq!(stats["a"]["count"]["site-2"]["train"], 10);
    assert_eq!(global(&stats, "a", "count").as_u64(), Some(30));
    let hist: u64 = global(&stats, "b", "histogram")
        .as_array()
        .unwrap()
        .iter()
        .map(|bucket| bucket[2].as_u64().unwrap())
        .sum();
    assert_eq!(hist, 20);
}
