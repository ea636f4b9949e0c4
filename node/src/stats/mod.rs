//! Federated statistics on the node: FLARE's `StatisticsController` / `StatisticsExecutor`
//! jobs, over the pure core in [`flare_protocols::stats`] and
//! [`flare_protocols::workflows::statistics`].
//!
//! - The server (`roles/server/stats.rs`) and the simulator drive the same sans-IO
//!   `StatisticsController`: two `fed_stats` tasks to every site over the ordinary task
//!   transport (the payload rides the task's headers, no model), then
//!   [`write_results`]: the JSON in FLARE's layout at the writer's `output_path` in the job's
//!   result folder and one histogram SVG per feature beside it ([`plot`]).
//! - A site's executor is [`StatsExecutor`], a [`Learner`] that answers `fed_stats` tasks
//!   over its [`SiteData`] ([`data`]: MNIST pixel intensities and labels, or CSV columns).
//!   It computes the raw answer; the cleansers run after it as FLARE's do, in the site's
//!   task result filters: a [`StatisticsPrivacyFilter`] (from the site's `privacy.json`
//!   scope first, then the job's own) cleanses the payload before it leaves
//!   ([`cleanse_result`]). A result that cannot be cleansed leaves as an error, never raw.
//! - [`config`] parses the configs; [`format_table`] is what the CLI prints.

pub mod config;
pub mod data;
pub mod plot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flare_protocols::filters::{Filter, FilterError};
use flare_protocols::model::{FLModel, MetaValue};
use flare_protocols::shareable::{ReturnCode, Shareable, Task, TaskResult};
use flare_protocols::stats::wire::{self, HEADER_STATS_DATA};
use flare_protocols::stats::{
    Cleanser, FeatureMap, FirstPass, GLOBAL, Pass, SecondPass, SiteData, StatValue, Statistic,
    StatsError, StatsOutput,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::filters::FilterChains;
use crate::learner::{Learner, LearnerError};

pub use config::{StatsSource, StatsWorkflow};

/// A site's `StatisticsExecutor`: answers `fed_stats` tasks over the site's data, without
/// cleansing (the site's [`StatisticsPrivacyFilter`]s do that on the way out).
#[derive(Debug)]
pub struct StatsExecutor {
    data: SiteData,
}

impl StatsExecutor {
    /// The executor of a site holding `data`.
    pub fn new(data: SiteData) -> Self {
        StatsExecutor { data }
    }
}

const NOT_A_TRAINER: &str =
    "a StatisticsExecutor answers fed_stats tasks; it has no model to train or validate";

impl Learner for StatsExecutor {
    fn train(&mut self, _: &FLModel, _: u32) -> Result<FLModel, LearnerError> {
        Err(LearnerError::Backend(NOT_A_TRAINER.into()))
    }

    fn validate(&mut self, _: &FLModel) -> Result<BTreeMap<String, f64>, LearnerError> {
        Err(LearnerError::Backend(NOT_A_TRAINER.into()))
    }

    fn execute_task(&mut self, task: Task) -> TaskResult {
        // No cleanser here, so nothing is drawn from this generator.
        let mut unused = ChaCha20Rng::seed_from_u64(0);
        flare_protocols::stats::site::execute(&task, &self.data, &[], &mut unused)
    }
}

/// FLARE's `StatisticsPrivacyFilter`: the cleansers its `result_cleanser_ids` name, in
/// order, run on a statistics result going out. On models it does nothing (FLARE's filter
/// passes other data kinds through), so a privacy scope may hold it for every job.
#[derive(Debug)]
pub struct StatisticsPrivacyFilter {
    cleansers: Vec<Cleanser>,
    /// `AddNoiseToMinMax`'s draws, seeded from the OS when the filter is built.
    rng: Mutex<ChaCha20Rng>,
}

impl PartialEq for StatisticsPrivacyFilter {
    fn eq(&self, other: &Self) -> bool {
        self.cleansers == other.cleansers
    }
}

impl StatisticsPrivacyFilter {
    /// The filter running `cleansers`, its noise drawn from a stream seeded with `seed`.
    pub fn new(cleansers: Vec<Cleanser>, seed: [u8; 32]) -> Self {
        StatisticsPrivacyFilter {
            cleansers,
            rng: Mutex::new(ChaCha20Rng::from_seed(seed)),
        }
    }

    /// The cleansers, in order.
    pub fn cleansers(&self) -> &[Cleanser] {
        &self.cleansers
    }

    /// Cleanses a statistics payload in place (its pass named by its header).
    fn cleanse(&self, data: &mut Shareable) -> Result<(), StatsError> {
        let mut rng = self
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let clean = match wire::pass_of(data)? {
            Pass::First => {
                let mut s: FeatureMap<FirstPass> = wire::from_shareable(data, Pass::First)?;
                for c in &self.cleansers {
                    c.apply_first(&mut s, &mut *rng);
                }
                wire::to_shareable(Pass::First, &s)?
            }
            Pass::Second => {
                let mut s: FeatureMap<SecondPass> = wire::from_shareable(data, Pass::Second)?;
                for c in &self.cleansers {
                    c.apply_second(&mut s);
                }
                wire::to_shareable(Pass::Second, &s)?
            }
        };
        if let Some(v) = clean.headers.get(HEADER_STATS_DATA) {
            data.headers
                .insert(HEADER_STATS_DATA.to_string(), v.clone());
        }
        Ok(())
    }
}

impl Filter for StatisticsPrivacyFilter {
    fn name(&self) -> &'static str {
        "StatisticsPrivacyFilter"
    }

    fn apply(&self, model: FLModel) -> Result<FLModel, FilterError> {
        Ok(model)
    }
}

/// Runs the [`StatisticsPrivacyFilter`]s of `chains` that cover `task` on `result` (a site's
/// own statistics answer, before it leaves `site`). Results that are errors or carry no
/// statistics pass unchanged; one that cannot be cleansed becomes an error result, so no
/// raw statistics leave the site.
pub fn cleanse_result(chains: &FilterChains, task: &str, site: &str, result: &mut TaskResult) {
    let filters = chains.statistics_filters(task);
    let is_stats = matches!(
        result.data.headers.get(wire::HEADER_STATS_TASK),
        Some(MetaValue::Text(_))
    );
    if filters.is_empty() || result.data.return_code != ReturnCode::Ok || !is_stats {
        return;
    }
    for f in filters {
        if let Err(e) = f.cleanse(&mut result.data) {
            tracing::error!(%site, %task, error = %e, "statistics cleanser failed; nothing is sent");
            result.data = Shareable::error(
                ReturnCode::ExecutionException,
                format!("the StatisticsPrivacyFilter of {site} failed: {e}"),
            );
            return;
        }
    }
}

/// Why the statistics files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StatsFileError {
    /// A file or folder could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error("histogram of {feature:?}: {reason}")]
    Plot {
        /// The feature.
        feature: String,
        /// Why.
        reason: String,
    },
}

/// What [`write_results`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StatsFiles {
    /// The statistics in FLARE's JSON layout.
    pub json: PathBuf,
    /// One histogram SVG per feature that has a global histogram.
    pub plots: Vec<PathBuf>,
}

/// A file-name stem for `feature`: its letters, digits, `-`, `_` and `.`, others as `_`, at
/// most 80 characters (feature names come from the sites' data).
fn file_stem(feature: &str) -> String {
    let s: String = feature
        .chars()
        .take(80)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("_{s}")
    } else {
        s
    }
}

/// Writes `output` as JSON to `dir/output_path` and beside it `histogram_<feature>.svg` for
/// every feature with a histogram.
pub fn write_results(
    dir: &Path,
    output_path: &Path,
    output: &StatsOutput,
) -> Result<StatsFiles, StatsFileError> {
    let json = dir.join(output_path);
    let folder = json.parent().unwrap_or(dir).to_path_buf();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StatsFileError::Io { path, source }
    };
    std::fs::create_dir_all(&folder).map_err(io(&folder))?;
    let text = serde_json::to_vec_pretty(output).map_err(|e| StatsFileError::Io {
        path: json.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&json, text).map_err(io(&json))?;
    let mut plots = Vec::new();
    let mut taken = std::collections::BTreeSet::new();
    for (feature, stats) in &output.0 {
        let Some(by_site) = stats.get(&Statistic::Histogram) else {
            continue;
        };
        let mut hists = plot::FeatureHistograms::new();
        for (site, by_ds) in by_site {
            for (dataset, v) in by_ds {
                if let StatValue::Histogram(h) = v {
                    hists
                        .entry(dataset.clone())
                        .or_default()
                        .insert(site.clone(), h.clone());
                }
            }
        }
        if hists.is_empty() {
            continue;
        }
        let svg = plot::histogram_svg(feature, &hists).map_err(|reason| StatsFileError::Plot {
            feature: feature.clone(),
            reason,
        })?;
        let stem = file_stem(feature);
        let mut name = format!("histogram_{stem}.svg");
        let mut k = 2;
        while !taken.insert(name.clone()) {
            name = format!("histogram_{stem}-{k}.svg");
            k += 1;
        }
        let path = folder.join(name);
        std::fs::write(&path, svg).map_err(io(&path))?;
        plots.push(path);
    }
    Ok(StatsFiles { json, plots })
}

fn number(v: Option<&StatValue>) -> String {
    match v {
        Some(StatValue::Int(n)) => n.to_string(),
        // Fixed decimals as every table; a noised minimum of -0 reads 0.
        Some(StatValue::Float(x)) => crate::display::metric(if *x == 0.0 { 0.0 } else { *x }),
        _ => "-".into(),
    }
}

/// The statistics as a table: a row per feature, dataset and site (then `Global`), with
/// count, mean, stddev, min and max (`-` where not computed or not shared).
pub fn format_table(output: &StatsOutput) -> String {
    const STATS: [Statistic; 5] = [
        Statistic::Count,
        Statistic::Mean,
        Statistic::Stddev,
        Statistic::Min,
        Statistic::Max,
    ];
    let mut rows: Vec<[String; 8]> = vec![[
        "feature".into(),
        "dataset".into(),
        "site".into(),
        "count".into(),
        "mean".into(),
        "stddev".into(),
        "min".into(),
        "max".into(),
    ]];
    for (feature, stats) in &output.0 {
        // Every (dataset, site) any statistic names, sites in order and Global last.
        let mut keys: Vec<(String, String)> = stats
            .values()
            .flat_map(|by_site| {
                by_site.iter().flat_map(|(site, by_ds)| {
                    by_ds.keys().map(move |ds| (ds.clone(), site.clone()))
                })
            })
            .collect();
        keys.sort_by(|a, b| {
            (&a.0, a.1 == GLOBAL)
                .cmp(&(&b.0, b.1 == GLOBAL))
                .then_with(|| crate::roles::admin::natural_cmp(&a.1, &b.1))
        });
        keys.dedup();
        for (dataset, site) in keys {
            let cell = |s: Statistic| number(output.get(feature, s, &site, &dataset));
            rows.push([
                feature.clone(),
                dataset.clone(),
                site.clone(),
                cell(STATS[0]),
                cell(STATS[1]),
                cell(STATS[2]),
                cell(STATS[3]),
                cell(STATS[4]),
            ]);
        }
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (v, w))| {
                if c < 3 {
                    format!("{v:<w$}")
                } else {
                    format!("{v:>w$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The statistics in a JSON file, if it holds FLARE's statistics layout (for `admin
/// download`, which prints the table of a statistics file it fetched); files over 64 MiB are
/// not read.
pub fn read_output(path: &Path) -> Option<StatsOutput> {
    let len = std::fs::metadata(path).ok()?.len();
    if len > 64 << 20 {
        return None;
    }
    let out: StatsOutput = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let has_count = out
        .0
        .values()
        .any(|stats| stats.contains_key(&Statistic::Count));
    has_count.then_some(out)
}

#[cfg(test)]
mod tests {
    use flare_protocols::shareable::TaskId;
    use flare_protocols::stats::{MinCountCleanser, StatsConfig};

    use super::*;

    fn site_data(n_a: usize, n_b: usize) -> SiteData {
        SiteData::from([
            (
                "a".to_string(),
                BTreeMap::from([("train".to_string(), (0..n_a).map(|i| i as f64).collect())]),
            ),
            (
                "b".to_string(),
                BTreeMap::from([("train".to_string(), (0..n_b).map(|i| i as f64).collect())]),
            ),
        ])
    }

    #[test]
    fn the_filter_cleanses_what_the_executor_answered() {
        let config: StatsConfig =
            serde_json::from_str(r#"{"count":{},"mean":{},"max":{}}"#).unwrap();
        let task = wire::task(TaskId(1), Pass::First, &config).unwrap();
        let mut exec = StatsExecutor::new(site_data(20, 5));
        let mut result = exec.execute_task(task);
        let raw: FeatureMap<FirstPass> = wire::from_shareable(&result.data, Pass::First).unwrap();
        assert_eq!(raw["b"]["train"].count, 5, "the executor does not cleanse");

        let f = StatisticsPrivacyFilter::new(vec![MinCountCleanser::new(10).into()], [7; 32]);
        let chains = FilterChains::default().with_site_scope(
            Vec::new(),
            vec![crate::filters::FilterSpec::StatisticsPrivacy(
                std::sync::Arc::new(f),
            )],
        );
        cleanse_result(&chains, "fed_stats", "site-1", &mut result);
        let clean: FeatureMap<FirstPass> = wire::from_shareable(&result.data, Pass::First).unwrap();
        assert!(!clean.contains_key("b"), "b has 5 values, fewer than 10");
        assert_eq!(clean["a"]["train"].count, 20);

        // A payload the filter cannot read leaves as an error, not as it was.
        result.data.headers.insert(
            HEADER_STATS_DATA.to_string(),
            MetaValue::Text("zz".to_string()),
        );
        cleanse_result(&chains, "fed_stats", "site-1", &mut result);
        assert_eq!(result.data.return_code, ReturnCode::ExecutionException);
        assert!(!result.data.headers.contains_key(HEADER_STATS_DATA));
    }

    #[test]
    fn the_table_lists_sites_then_global() {
        let out: StatsOutput = serde_json::from_value(serde_json::json!({
            "a": {
                "count": {"site-10": {"train": 3}, "site-2": {"train": 4}, "Global": {"train": 7}},
                "mean": {"site-2": {"train": 1.5}, "Global": {"train": 2.25}}
            }
        }))
        .unwrap();
        let t = format_table(&out);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("feature"), "{t}");
        assert!(
            lines[1].contains("site-2") && lines[1].contains("1.5"),
            "{t}"
        );
        assert!(
            lines[2].contains("site-10") && lines[2].contains(" - "),
            "{t}"
        );
        assert!(
            lines[3].contains("Global") && lines[3].contains("2.25"),
            "{t}"
        );
    }

    #[test]
    fn results_and_plots_are_written_with_safe_names() {
        let dir = tempfile::tempdir().unwrap();
        let out: StatsOutput = serde_json::from_value(serde_json::json!({
            "../x y": {
                "count": {"Global": {"train": 2}},
                "histogram": {"Global": {"train": [[0.0, 1.0, 1], [1.0, 2.0, 1]]}}
            },
            "c": {"count": {"Global": {"train": 2}}}
        }))
        .unwrap();
        let files = write_results(dir.path(), Path::new("stats/s.json"), &out).unwrap();
        assert_eq!(files.json, dir.path().join("stats/s.json"));
        assert_eq!(
            files.plots,
            vec![dir.path().join("stats/histogram__.._x_y.svg")]
        );
        assert_eq!(read_output(&files.json), Some(out));
        let not_stats = dir.path().join("m.json");
        std::fs::write(&not_stats, r#"{"1": {"accuracy": 0.9}}"#).unwrap();
        assert_eq!(read_output(&not_stats), None);
    }
}
