//! The server's answers, parsed into the rows the pages show. The JSON comes from the network:
//! a missing or odd field becomes `None` or an empty string, never a panic, and every list is
//! capped so a huge answer cannot make a huge page.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde_json::Value;

use crate::roles::admin::natural_cmp;

/// Most rows of any table (sites, jobs, rounds, history), and most runs or tags plotted.
pub const MAX_ROWS: usize = 2000;
/// Most characters of one string shown.
pub const MAX_TEXT: usize = 500;
/// Most points of one plotted series (the server already thins to 500).
pub const MAX_POINTS: usize = 1000;
/// Most plots on a job page.
pub const MAX_PLOTS: usize = 40;
/// Most lines in one plot.
pub const MAX_SERIES: usize = 24;

/// A string field, cut to [`MAX_TEXT`] characters; numbers and booleans as text; `""` else.
pub fn text(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    };
    cut(s)
}

fn cut(s: String) -> String {
    match s.char_indices().nth(MAX_TEXT) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// The server and its sites (`status` without a job).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerView {
    /// The server's name.
    pub name: String,
    /// Its libp2p PeerId.
    pub peer_id: String,
    /// Seconds since it started.
    pub uptime_s: Option<u64>,
    /// Jobs it knows.
    pub jobs: Option<u64>,
    /// Jobs running.
    pub running: Option<u64>,
    /// The connected sites.
    pub sites: Vec<SiteRow>,
    /// Commands it refused lately (for whom and why).
    pub refused: Vec<String>,
}

/// One connected site.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SiteRow {
    /// Site name.
    pub name: String,
    /// Its organization.
    pub org: String,
    /// `direct` or `relayed`.
    pub connection: String,
    /// Where the server sees it.
    pub address: String,
    /// Milliseconds since its last heartbeat (none yet: `None`).
    pub heartbeat_ms_ago: Option<u64>,
    /// The jobs it reports running, `job@round`.
    pub jobs: String,
}

impl ServerView {
    /// Parses `status`'s answer.
    pub fn parse(v: &Value) -> ServerView {
        let sites = v["sites"]
            .as_array()
            .map(|a| a.iter().take(MAX_ROWS).map(SiteRow::parse).collect())
            .unwrap_or_default();
        let refused = v["refused_commands"]
            .as_array()
            .map(|a| {
                a.iter()
                    .take(MAX_ROWS)
                    .map(|r| match r {
                        Value::String(_) => text(r),
                        other => cut(other.to_string()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ServerView {
            name: text(&v["server"]),
            peer_id: text(&v["peer_id"]),
            uptime_s: v["uptime_s"].as_u64(),
            jobs: v["jobs"].as_u64(),
            running: v["running"].as_u64(),
            sites,
            refused,
        }
    }
}

impl SiteRow {
    fn parse(v: &Value) -> SiteRow {
        let jobs = v["jobs"]
            .as_object()
            .map(|m| {
                m.iter()
                    .take(20)
                    .map(|(j, r)| format!("{j}@{}", text(r)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        SiteRow {
            name: text(&v["name"]),
            org: text(&v["org"]),
            connection: text(&v["connection"]),
            address: text(&v["address"]),
            heartbeat_ms_ago: v["last_heartbeat_ms_ago"].as_u64(),
            jobs: cut(jobs),
        }
    }
}

/// One job of `list`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobRow {
    /// Job id (checked before it becomes a link).
    pub id: String,
    /// The name from meta.json.
    pub name: String,
    /// Its state.
    pub state: String,
    /// The round under way.
    pub round: Option<u64>,
    /// The rounds it runs.
    pub num_rounds: Option<u64>,
    /// Who submitted it.
    pub submitter: String,
}

impl JobRow {
    /// Parses `list`'s answer, newest first.
    pub fn parse_list(v: &Value) -> Vec<JobRow> {
        let mut rows: Vec<JobRow> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .rev()
                    .take(MAX_ROWS)
                    .map(|j| JobRow {
                        id: text(&j["id"]),
                        name: text(&j["name"]),
                        state: text(&j["state"]),
                        round: j["round"].as_u64(),
                        num_rounds: j["num_rounds"].as_u64(),
                        submitter: text(&j["submitter"]),
                    })
                    .collect()
            })
            .unwrap_or_default();
        rows.retain(|r| !r.id.is_empty());
        rows
    }
}

/// Whether a job in `state` is over (its page stops refreshing).
pub fn ended(state: &str) -> bool {
    matches!(state, "finished" | "failed" | "aborted")
}

/// One job in detail (`status <job>`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobView {
    /// Job id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Who submitted it.
    pub submitter: String,
    /// State.
    pub state: String,
    /// The round under way.
    pub round: Option<u64>,
    /// The rounds it runs.
    pub num_rounds: Option<u64>,
    /// Each site's state, in natural order.
    pub sites: Vec<(String, String)>,
    /// The global model's metrics per version, in version order.
    pub rounds: Vec<RoundRow>,
    /// The metric names of `rounds` (columns), `accuracy` and `loss` first.
    pub metric_names: Vec<String>,
    /// Whether any round names its aggregator (a swarm job).
    pub swarm: bool,
    /// What happened, oldest first.
    pub history: Vec<HistoryRow>,
    /// The cross-site evaluation, if the job ran one.
    pub cross_site: Option<CrossSite>,
}

/// The global model after `version` rounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundRow {
    /// Version *k*: the global model after *k* rounds.
    pub version: u64,
    /// Metric → value.
    pub metrics: BTreeMap<String, f64>,
    /// The site that aggregated it (swarm), from the history notes.
    pub aggregator: Option<String>,
}

/// One history entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryRow {
    /// Unix milliseconds.
    pub at_ms: Option<u64>,
    /// The state then.
    pub state: String,
    /// What happened.
    pub note: String,
}

/// The cross-site matrix of one metric: rows are where the evaluation ran, columns whose
/// model it evaluated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CrossSite {
    /// The metric shown.
    pub metric: String,
    /// Row names.
    pub evaluators: Vec<String>,
    /// Column names.
    pub models: Vec<String>,
    /// `values[row][column]`.
    pub values: Vec<Vec<Option<f64>>>,
}

impl JobView {
    /// Parses `status <job>`'s answer.
    pub fn parse(v: &Value) -> JobView {
        let history: Vec<HistoryRow> = v["history"]
            .as_array()
            .map(|a| {
                let skip = a.len().saturating_sub(MAX_ROWS);
                a.iter()
                    .skip(skip)
                    .map(|h| HistoryRow {
                        at_ms: h["at_ms"].as_u64(),
                        state: text(&h["state"]),
                        note: text(&h["note"]),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let aggregators = aggregators(&history);
        let mut rounds: Vec<RoundRow> = v["metrics"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, x)| {
                        let version = k.parse::<u64>().ok()?;
                        let metrics = x
                            .as_object()
                            .map(|o| {
                                o.iter()
                                    .take(32)
                                    .filter_map(|(n, v)| Some((cut(n.clone()), v.as_f64()?)))
                                    .collect()
                            })
                            .unwrap_or_default();
                        Some(RoundRow {
                            version,
                            metrics,
                            aggregator: version
                                .checked_sub(1)
                                .and_then(|e| aggregators.get(&e).cloned()),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        rounds.sort_by_key(|r| r.version);
        rounds.truncate(MAX_ROWS);
        let mut metric_names: Vec<String> = rounds
            .iter()
            .flat_map(|r| r.metrics.keys().cloned())
            .collect();
        metric_names.sort_by(|a, b| metric_order(a, b));
        metric_names.dedup();
        metric_names.truncate(12);
        let mut sites: Vec<(String, String)> = v["sites"]
            .as_object()
            .map(|m| {
                m.iter()
                    .take(MAX_ROWS)
                    .map(|(k, s)| (cut(k.clone()), text(s)))
                    .collect()
            })
            .unwrap_or_default();
        sites.sort_by(|a, b| natural_cmp(&a.0, &b.0));
        JobView {
            id: text(&v["id"]),
            name: text(&v["name"]),
            submitter: text(&v["submitter"]),
            state: text(&v["state"]),
            round: v["round"].as_u64(),
            num_rounds: v["num_rounds"].as_u64(),
            sites,
            swarm: !aggregators.is_empty(),
            rounds,
            metric_names,
            history,
            cross_site: CrossSite::parse(&v["cross_site"]),
        }
    }
}

/// `accuracy`, then `loss`, then the rest in natural order.
fn metric_order(a: &str, b: &str) -> Ordering {
    let rank = |s: &str| match s {
        "accuracy" => 0,
        "loss" => 1,
        _ => 2,
    };
    rank(a).cmp(&rank(b)).then_with(|| natural_cmp(a, b))
}

/// Epoch round → the site that aggregated it, from swarm notes such as
/// `epoch 2.0 aggregated by site-3: accepted [...], pruned []; best: …`. The last note of a
/// round wins (a re-elected aggregator's).
pub fn aggregators(history: &[HistoryRow]) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    for h in history {
        if let Some((round, site)) = parse_aggregated(&h.note) {
            out.insert(round, site);
        }
    }
    out
}

/// `epoch R.A aggregated by SITE: …` → (R, SITE); anything else → `None`.
fn parse_aggregated(note: &str) -> Option<(u64, String)> {
    let rest = note.strip_prefix("epoch ")?;
    let (epoch, rest) = rest.split_once(' ')?;
    let round = epoch.split('.').next()?.parse().ok()?;
    let rest = rest.strip_prefix("aggregated by ")?;
    let site = rest.split([':', ' ', ',']).next()?;
    let valid = !site.is_empty()
        && site.len() <= 128
        && site
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    valid.then(|| (round, site.to_string()))
}

impl CrossSite {
    /// The matrix of `accuracy` (or else the first metric found), if there is one.
    pub fn parse(v: &Value) -> Option<CrossSite> {
        let rows = v.as_object()?;
        let mut evaluators: Vec<String> = rows.keys().take(64).cloned().collect();
        evaluators.sort_by(|a, b| natural_cmp(a, b));
        let mut models: Vec<String> = Vec::new();
        let mut metric: Option<String> = None;
        for e in &evaluators {
            for (m, metrics) in rows.get(e).and_then(Value::as_object).into_iter().flatten() {
                if !models.contains(m) && models.len() < 64 {
                    models.push(m.clone());
                }
                if let Some(o) = metrics.as_object() {
                    if o.contains_key("accuracy") {
                        metric = Some("accuracy".into());
                    } else if metric.is_none() {
                        metric = o.keys().next().cloned();
                    }
                }
            }
        }
        let metric = metric?;
        models.sort_by(|a, b| natural_cmp(a, b));
        let values = evaluators
            .iter()
            .map(|e| {
                models
                    .iter()
                    .map(|m| v[e][m][&metric].as_f64().filter(|x| x.is_finite()))
                    .collect()
            })
            .collect();
        Some(CrossSite {
            metric: cut(metric),
            evaluators: evaluators.into_iter().map(cut).collect(),
            models: models.into_iter().map(cut).collect(),
            values,
        })
    }
}

/// A plotted series: its run and its finite `(step, value)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The run (`site-1`, `site-1/loss_train`, `global_model`).
    pub run: String,
    /// Points in step order.
    pub points: Vec<(f64, f64)>,
}

/// One plot: a tag and every run that has it.
#[derive(Debug, Clone, PartialEq)]
pub struct TagPlot {
    /// The tag (`train_loss`, `accuracy`, …).
    pub tag: String,
    /// One series per run that has the tag and at least one finite point.
    pub series: Vec<Series>,
}

/// `Metrics`'s answer (`{"runs": {run: {tag: [[step, value], …]}}}`) as one plot per tag,
/// the global model's tags first. When the job wrote no `global_model` run, its per-version
/// metrics from the record (`rounds`) stand in for it.
pub fn plots(v: &Value, rounds: &[RoundRow]) -> Vec<TagPlot> {
    let mut by_tag: BTreeMap<String, Vec<Series>> = BTreeMap::new();
    let runs = v["runs"].as_object();
    let mut has_global = false;
    for (run, tags) in runs.into_iter().flatten().take(MAX_ROWS) {
        has_global |= run == "global_model";
        for (tag, points) in tags.as_object().into_iter().flatten().take(MAX_ROWS) {
            let mut pts: Vec<(f64, f64)> = points
                .as_array()
                .into_iter()
                .flatten()
                .take(MAX_POINTS)
                .filter_map(|p| {
                    let x = p.get(0)?.as_f64()?;
                    let y = p.get(1)?.as_f64()?;
                    (x.is_finite() && y.is_finite()).then_some((x, y))
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            by_tag.entry(cut(tag.clone())).or_default().push(Series {
                run: cut(run.clone()),
                points: pts,
            });
        }
    }
    if !has_global {
        let mut from_record: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for r in rounds {
            for (m, x) in &r.metrics {
                if x.is_finite() {
                    from_record
                        .entry(m.clone())
                        .or_default()
                        .push((r.version as f64, *x));
                }
            }
        }
        for (tag, points) in from_record {
            by_tag.entry(tag).or_default().push(Series {
                run: "global_model".into(),
                points,
            });
        }
    }
    let mut out: Vec<TagPlot> = by_tag
        .into_iter()
        .map(|(tag, mut series)| {
            series.sort_by(|a, b| run_order(&a.run, &b.run));
            series.truncate(MAX_SERIES);
            TagPlot { tag, series }
        })
        .collect();
    let global_first = |p: &TagPlot| !p.series.iter().any(|s| s.run == "global_model");
    out.sort_by(|a, b| {
        global_first(a)
            .cmp(&global_first(b))
            .then_with(|| metric_order(&a.tag, &b.tag))
    });
    out.truncate(MAX_PLOTS);
    out
}

/// Runs in natural order, the global model last (it is drawn on top).
fn run_order(a: &str, b: &str) -> Ordering {
    (a == "global_model")
        .cmp(&(b == "global_model"))
        .then_with(|| natural_cmp(a, b))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn aggregator_notes_are_parsed_and_others_ignored() {
        let cases: [(&str, Option<(u64, &str)>); 7] = [
            (
                "epoch 2.0 aggregated by site-3: accepted [\"site-1\"], pruned []; best: x",
                Some((2, "site-3")),
            ),
            (
                "epoch 10.1 aggregated by site-12: accepted []",
                Some((10, "site-12")),
            ),
            ("workflow started on site-1", None),
            ("epoch x.0 aggregated by site-1: …", None),
            ("epoch 1.0 aggregated by : accepted", None),
            ("epoch 1.0 aggregated by <script>: accepted", None),
            (
                "site-2: aggregator site-1 replaced by site-3 for epoch 1.1",
                None,
            ),
        ];
        for (note, want) in cases {
            assert_eq!(
                parse_aggregated(note),
                want.map(|(r, s)| (r, s.to_string())),
                "{note}"
            );
        }
    }

    #[test]
    fn a_job_record_becomes_rows() {
        let v = json!({
            "id": "abc-1", "name": "swarm", "submitter": "admin@x", "state": "running",
            "round": 2, "num_rounds": 3,
            "sites": {"site-10": "running", "site-2": "running"},
            "metrics": {
                "0": {"accuracy": 0.1, "loss": 2.3},
                "10": {"accuracy": 0.95},
                "2": {"loss": 0.2, "accuracy": 0.9, "zeta": 1},
                "x": {"accuracy": 1.0},
            },
            "history": [
                {"at_ms": 1, "state": "running", "note": "workflow started on site-1"},
                {"at_ms": 2, "state": "running", "note": "epoch 1.0 aggregated by site-2: accepted []"},
                {"at_ms": 3, "state": "running", "note": "epoch 9.0 aggregated by site-1: accepted []"},
            ],
            "cross_site": {
                "site-2": {"site-1": {"accuracy": 0.8}, "global": {"accuracy": 0.9}},
                "site-1": {"site-1": {"accuracy": 0.7, "loss": 1.0}},
            },
        });
        let j = JobView::parse(&v);
        assert_eq!(j.id, "abc-1");
        assert_eq!(j.sites[0].0, "site-2");
        let versions: Vec<u64> = j.rounds.iter().map(|r| r.version).collect();
        assert_eq!(versions, [0, 2, 10]);
        assert_eq!(j.metric_names, ["accuracy", "loss", "zeta"]);
        assert_eq!(j.rounds[0].aggregator, None);
        assert_eq!(j.rounds[1].aggregator.as_deref(), Some("site-2"));
        assert_eq!(j.rounds[2].aggregator.as_deref(), Some("site-1"));
        assert!(j.swarm);
        let cs = j.cross_site.unwrap();
        assert_eq!(cs.metric, "accuracy");
        assert_eq!(cs.evaluators, ["site-1", "site-2"]);
        assert_eq!(cs.models, ["global", "site-1"]);
        assert_eq!(
            cs.values,
            vec![vec![None, Some(0.7)], vec![Some(0.9), Some(0.8)]]
        );
    }

    #[test]
    fn odd_answers_give_empty_views_not_panics() {
        for v in [
            json!(null),
            json!([]),
            json!("x"),
            json!({"sites": 3, "metrics": [1], "history": {"a": 1}, "cross_site": []}),
            json!({"metrics": {"1": 5}, "cross_site": {"a": 1}, "history": [1, null]}),
        ] {
            let j = JobView::parse(&v);
            assert!(j.cross_site.is_none());
            let _ = ServerView::parse(&v);
            let _ = JobRow::parse_list(&v);
            let _ = plots(&v, &j.rounds);
        }
        assert_eq!(
            text(&json!("é".repeat(MAX_TEXT + 5))).chars().count(),
            MAX_TEXT + 1
        );
    }

    #[test]
    fn metrics_become_one_plot_per_tag_global_first() {
        let v = json!({"job_id": "j", "runs": {
            "site-1": {"train_loss": [[1, 0.5], [2, 0.4]], "empty": []},
            "site-2": {"train_loss": [[2, 0.3], [1, "x"], [1, 0.6]]},
            "global_model": {"accuracy": [[0, 0.1], [1, 0.9]], "loss": [[0, 2.0], [1, f64::NAN]]},
        }});
        let p = plots(&v, &[]);
        let tags: Vec<&str> = p.iter().map(|t| t.tag.as_str()).collect();
        assert_eq!(tags, ["accuracy", "loss", "train_loss"]);
        assert_eq!(p[2].series.len(), 2);
        assert_eq!(p[2].series[1].points, [(1.0, 0.6), (2.0, 0.3)]);
        // Without a global_model run, the record's metrics are plotted instead.
        let rounds = [RoundRow {
            version: 0,
            metrics: [("accuracy".to_string(), 0.1)].into(),
            aggregator: None,
        }];
        let p = plots(&json!({"runs": {}}), &rounds);
        assert_eq!(p[0].tag, "accuracy");
        assert_eq!(p[0].series[0].run, "global_model");
    }
}
