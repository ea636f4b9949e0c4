//! The statistics parts of job configs and of a site's `privacy.json`, in FLARE's shapes.
//!
//! Server (`config_fed_server.json`):
//!
//! ```json
//! "workflows": [{ "id": "fed_stats_controller", "name": "StatisticsController",
//!                 "args": { "statistic_configs": { "count": {}, "mean": {},
//!                                                  "histogram": { "*": { "bins": 20 } } },
//!                           "writer_id": "stats_writer" } }],
//! "components": [{ "id": "stats_writer", "name": "JsonStatsFileWriter",
//!                  "args": { "output_path": "statistics.json" } }]
//! ```
//!
//! Client (`config_fed_client.json`): the `StatisticsExecutor` names its data source by
//! `generator_id`, a component (`MnistImageStats` or `CsvStats`); cleansers are components
//! too (`MinCountCleanser`, `AddNoiseToMinMax`, `HistogramBinsCleanser`), named by a
//! `StatisticsPrivacyFilter`'s `result_cleanser_ids` in the job's or the site's
//! `task_result_filters`. A site's `privacy.json` lists its cleansers in a top-level
//! `components` list, each named by `name` or FLARE's dotted `path`.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use flare_protocols::stats::{
    AddNoiseToMinMax, Cleanser, HistogramBinsCleanser, MinCountCleanser, StatsConfig,
};
use flare_protocols::workflows::statistics::{MAX_PRECISION, StatsControllerConfig};
use serde::Deserialize;

use crate::data::Partition;
use crate::job::{JobError, invalid, parse_args};

/// The server's statistics run: FLARE's `StatisticsController` arguments and where its
/// `JsonStatsFileWriter` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsWorkflow {
    /// The controller's settings.
    pub controller: StatsControllerConfig,
    /// The statistics file, relative to the job's result folder (the histogram plots go
    /// beside it).
    pub output_path: PathBuf,
}

impl StatsWorkflow {
    /// How many passes the run makes: 2 when it asks for var, stddev or histograms.
    pub fn passes(&self) -> u32 {
        if self.controller.statistic_configs.needs_second_pass() {
            2
        } else {
            1
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControllerArgs {
    statistic_configs: StatsConfig,
    writer_id: String,
    #[serde(default = "one")]
    wait_time_after_min_received: f64,
    #[serde(default = "ten")]
    result_wait_timeout: f64,
    #[serde(default = "four")]
    precision: u32,
    #[serde(default)]
    min_clients: Option<usize>,
    /// FLARE's optional handshake task; accepted for FLARE's configs, and not sent (a Flare
    /// site reads the config from the first pass's task).
    #[serde(default)]
    #[allow(dead_code)]
    enable_pre_run_task: Option<bool>,
}

fn one() -> f64 {
    1.0
}
fn ten() -> f64 {
    10.0
}
fn four() -> u32 {
    4
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriterArgs {
    output_path: String,
    /// FLARE's JSON encoder class; the layout is always FLARE's.
    #[serde(default)]
    #[allow(dead_code)]
    json_encoder_path: Option<String>,
}

/// A component as the configs list it: index, id, name and args.
pub(crate) type ComponentRef<'a> = (usize, &'a str, &'a str, &'a serde_json::Value);

fn seconds(file: &Path, key: &str, v: f64) -> Result<Duration, JobError> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| invalid(file, key, format!("{v} is not a valid number of seconds")))
}

/// Parses the `StatisticsController` at `key` (`workflows[0]`) and its writer among
/// `components`. Returns the workflow and the writer's index.
pub(crate) fn parse_workflow(
    file: &Path,
    key: &str,
    args: serde_json::Value,
    components: &[ComponentRef<'_>],
) -> Result<(StatsWorkflow, usize), JobError> {
    let a: ControllerArgs = parse_args(file, key, args)?;
    let at = |arg: &str| format!("{key}.args.{arg}");
    let wait = seconds(
        file,
        &at("wait_time_after_min_received"),
        a.wait_time_after_min_received,
    )?;
    let timeout = seconds(file, &at("result_wait_timeout"), a.result_wait_timeout)?;
    if timeout.is_zero() {
        return Err(invalid(file, at("result_wait_timeout"), "must be positive"));
    }
    if a.precision > MAX_PRECISION {
        return Err(invalid(
            file,
            at("precision"),
            format!("{} is above {MAX_PRECISION}", a.precision),
        ));
    }
    if a.min_clients == Some(0) {
        return Err(invalid(file, at("min_clients"), "must be at least 1"));
    }
    let Some(&(wi, _, name, wargs)) = components.iter().find(|c| c.1 == a.writer_id) else {
        return Err(invalid(
            file,
            at("writer_id"),
            format!("no component with id {:?}", a.writer_id),
        ));
    };
    let wkey = format!("components[{wi}]");
    if name != "JsonStatsFileWriter" {
        return Err(invalid(
            file,
            format!("{wkey}.name"),
            format!("unknown statistics writer {name:?} (known: JsonStatsFileWriter)"),
        ));
    }
    let w: WriterArgs = parse_args(file, &wkey, wargs.clone())?;
    let output_path = PathBuf::from(&w.output_path);
    let inside = output_path
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if w.output_path.is_empty() || !inside || output_path.extension().is_none_or(|e| e != "json") {
        return Err(invalid(
            file,
            format!("{wkey}.args.output_path"),
            format!(
                "{:?} must be a relative path to a .json file inside the job's result folder (no `..`, not absolute)",
                w.output_path
            ),
        ));
    }
    let controller = StatsControllerConfig {
        statistic_configs: a.statistic_configs,
        min_clients: a.min_clients,
        wait_time_after_min_received: wait,
        result_wait_timeout: timeout,
        precision: a.precision,
    };
    Ok((
        StatsWorkflow {
            controller,
            output_path,
        },
        wi,
    ))
}

/// Where a site's statistics come from: the `generator_id` component of its
/// `StatisticsExecutor`.
#[derive(Debug, Clone, PartialEq)]
pub enum StatsSource {
    /// `MnistImageStats`: the site's share of MNIST, its pixel intensities and labels.
    Mnist(MnistStatsArgs),
    /// `CsvStats`: columns of a CSV file.
    Csv(CsvStatsArgs),
}

/// Arguments of `MnistImageStats` (FLARE's image_stats on MNIST): the site's part of the
/// MNIST test set, as the MNIST learners partition it (without a held-out part).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MnistStatsArgs {
    /// Folder with the MNIST IDX files; relative paths start at the job folder.
    pub data_dir: PathBuf,
    /// How the images are divided across sites.
    #[serde(default)]
    pub partition: Partition,
    /// Seed of the partition.
    #[serde(default)]
    pub partition_seed: u64,
}

/// Arguments of `CsvStats` (FLARE's df_stats): numeric columns of a CSV file with a header.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvStatsArgs {
    /// The CSV file; relative paths start at the job folder. With `{site}` in it, each site
    /// reads a file of its own, whole; without, the rows are divided across the sites in
    /// contiguous blocks by site index (site `i` of `n` gets rows `[i·N/n, (i+1)·N/n)`).
    pub data_path: String,
    /// The columns that are features; each value a number, or empty, `NA`, `NaN` or `?` for
    /// a missing one (counted in `failure_count`).
    pub features: Vec<String>,
    /// The share of a site's rows in dataset `test` (drawn with `split_seed`); the rest are
    /// `train`. 0 (the default): every row is `train`.
    #[serde(default)]
    pub test_fraction: f64,
    /// Seed of the train/test draw.
    #[serde(default)]
    pub split_seed: u64,
}

/// The statistics components of a client config.
#[derive(Debug, Default)]
pub(crate) struct Components {
    /// Data sources by id, with their index.
    pub(crate) generators: BTreeMap<String, (usize, StatsSource)>,
    /// Cleansers by id.
    pub(crate) cleansers: BTreeMap<String, Cleanser>,
}

/// The known component names, for error messages.
const KNOWN: &str =
    "MnistImageStats, CsvStats, MinCountCleanser, AddNoiseToMinMax, HistogramBinsCleanser";

fn cleanser(
    file: &Path,
    key: &str,
    name: &str,
    args: &serde_json::Value,
) -> Result<Option<Cleanser>, JobError> {
    Ok(Some(match name {
        "MinCountCleanser" => {
            Cleanser::from(parse_args::<MinCountCleanser>(file, key, args.clone())?)
        }
        "AddNoiseToMinMax" => {
            Cleanser::from(parse_args::<AddNoiseToMinMax>(file, key, args.clone())?)
        }
        "HistogramBinsCleanser" => Cleanser::from(parse_args::<HistogramBinsCleanser>(
            file,
            key,
            args.clone(),
        )?),
        _ => return Ok(None),
    }))
}

/// Parses a client config's `components`: data sources and cleansers, ids unique.
pub(crate) fn parse_components(
    file: &Path,
    components: &[ComponentRef<'_>],
) -> Result<Components, JobError> {
    let mut out = Components::default();
    for &(i, id, name, args) in components {
        let key = format!("components[{i}]");
        if id.is_empty() {
            return Err(invalid(
                file,
                format!("{key}.id"),
                "a component needs an id",
            ));
        }
        if out.generators.contains_key(id) || out.cleansers.contains_key(id) {
            return Err(invalid(
                file,
                format!("{key}.id"),
                format!("duplicate id {id:?}"),
            ));
        }
        if let Some(c) = cleanser(file, &key, name, args)? {
            out.cleansers.insert(id.to_string(), c);
            continue;
        }
        let source = match name {
            "MnistImageStats" => StatsSource::Mnist(parse_args(file, &key, args.clone())?),
            "CsvStats" => {
                let a: CsvStatsArgs = parse_args(file, &key, args.clone())?;
                check_csv(file, &key, &a)?;
                StatsSource::Csv(a)
            }
            other => {
                return Err(invalid(
                    file,
                    format!("{key}.name"),
                    format!("unknown client component {other:?} (known: {KNOWN})"),
                ));
            }
        };
        out.generators.insert(id.to_string(), (i, source));
    }
    Ok(out)
}

fn check_csv(file: &Path, key: &str, a: &CsvStatsArgs) -> Result<(), JobError> {
    if a.data_path.is_empty() {
        return Err(invalid(file, format!("{key}.args.data_path"), "is empty"));
    }
    if a.features.is_empty() {
        return Err(invalid(
            file,
            format!("{key}.args.features"),
            "names no column",
        ));
    }
    for (j, f) in a.features.iter().enumerate() {
        if f.is_empty() || a.features[..j].contains(f) {
            return Err(invalid(
                file,
                format!("{key}.args.features[{j}]"),
                format!("{f:?} is empty or named twice"),
            ));
        }
    }
    if !(0.0..1.0).contains(&a.test_fraction) {
        return Err(invalid(
            file,
            format!("{key}.args.test_fraction"),
            format!("{} is not in [0, 1)", a.test_fraction),
        ));
    }
    Ok(())
}

/// `StatisticsExecutor`'s args.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecutorArgs {
    generator_id: String,
    /// FLARE's optional precision of the site's own numbers; the server rounds the output.
    #[serde(default)]
    #[allow(dead_code)]
    precision: Option<u32>,
}

/// The data source a `StatisticsExecutor` at `key` names among `components`, with its
/// index there.
pub(crate) fn executor_source(
    file: &Path,
    key: &str,
    args: serde_json::Value,
    components: &Components,
) -> Result<(usize, StatsSource), JobError> {
    let a: ExecutorArgs = parse_args(file, key, args)?;
    match components.generators.get(&a.generator_id) {
        Some((i, s)) => Ok((*i, s.clone())),
        None => Err(invalid(
            file,
            format!("{key}.args.generator_id"),
            format!(
                "no MnistImageStats or CsvStats component with id {:?}",
                a.generator_id
            ),
        )),
    }
}

/// One component of `privacy.json`: FLARE's `{ "id", "path" | "name", "args" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivacyComponent {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default = "crate::job::empty_args")]
    args: serde_json::Value,
}

/// Parses `privacy.json`'s top-level `components` (cleansers only) at `key`.
pub(crate) fn parse_privacy_components(
    file: &Path,
    key: &str,
    value: serde_json::Value,
) -> Result<BTreeMap<String, Cleanser>, JobError> {
    let entries: Vec<PrivacyComponent> = serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let at = if inner.is_empty() || inner == "." {
            key.to_string()
        } else if inner.starts_with('[') {
            format!("{key}{inner}")
        } else {
            format!("{key}.{inner}")
        };
        invalid(file, at, e.inner().to_string())
    })?;
    let mut out = BTreeMap::new();
    for (i, c) in entries.into_iter().enumerate() {
        let at = format!("{key}[{i}]");
        let from_path = c
            .path
            .as_deref()
            .map(|p| p.rsplit('.').next().unwrap_or(p).to_string());
        let name = match (c.name, from_path) {
            (Some(n), Some(p)) if n != p => {
                return Err(invalid(
                    file,
                    format!("{at}.name"),
                    format!("{n:?} disagrees with the path's class {p:?}"),
                ));
            }
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => {
                return Err(invalid(file, at, "names no class (give `name` or `path`)"));
            }
        };
        if c.id.is_empty() || out.contains_key(&c.id) {
            return Err(invalid(
                file,
                format!("{at}.id"),
                format!("{:?} is empty or used twice", c.id),
            ));
        }
        match cleanser(file, &at, &name, &c.args)? {
            Some(cl) => {
                out.insert(c.id, cl);
            }
            None => {
                return Err(invalid(
                    file,
                    format!("{at}.name"),
                    format!(
                        "unknown component {name:?}: privacy.json components are statistics cleansers (MinCountCleanser, AddNoiseToMinMax, HistogramBinsCleanser)"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(
        v: &[(&'static str, &'static str, serde_json::Value)],
    ) -> Vec<(String, String, serde_json::Value)> {
        v.iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.clone()))
            .collect()
    }

    fn parse(
        comps: &[(String, String, serde_json::Value)],
        args: serde_json::Value,
    ) -> Result<(StatsWorkflow, usize), String> {
        let r: Vec<ComponentRef<'_>> = comps
            .iter()
            .enumerate()
            .map(|(i, (id, name, a))| (i, id.as_str(), name.as_str(), a))
            .collect();
        parse_workflow(Path::new("srv.json"), "workflows[0]", args, &r).map_err(|e| e.to_string())
    }

    #[test]
    fn the_controller_and_its_writer_parse_with_flares_defaults() {
        let comps = refs(&[(
            "w",
            "JsonStatsFileWriter",
            serde_json::json!({"output_path": "statistics/s.json", "json_encoder_path": "x.Y"}),
        )]);
        let (wf, wi) = parse(
            &comps,
            serde_json::json!({"statistic_configs": {"count": {}, "stddev": {}}, "writer_id": "w"}),
        )
        .unwrap();
        assert_eq!(wi, 0);
        assert_eq!(wf.output_path, PathBuf::from("statistics/s.json"));
        assert_eq!(wf.controller.precision, 4);
        assert_eq!(wf.controller.result_wait_timeout, Duration::from_secs(10));
        assert_eq!(
            wf.controller.wait_time_after_min_received,
            Duration::from_secs(1)
        );
        assert_eq!(wf.controller.min_clients, None);
        assert_eq!(wf.passes(), 2);
    }

    #[test]
    fn bad_settings_name_the_key() {
        let writer = |path: &str| {
            refs(&[(
                "w",
                "JsonStatsFileWriter",
                serde_json::json!({ "output_path": path }),
            )])
        };
        let ok = writer("s.json");
        let cases = [
            (
                ok.clone(),
                serde_json::json!({"statistic_configs": {"histogram": {"*": {"bins": 0}}}, "writer_id": "w"}),
                "workflows[0].args.statistic_configs",
            ),
            (
                ok.clone(),
                serde_json::json!({"statistic_configs": {"count": {}}, "writer_id": "nope"}),
                "workflows[0].args.writer_id",
            ),
            (
                ok.clone(),
                serde_json::json!({"statistic_configs": {"count": {}}, "writer_id": "w", "precision": 16}),
                "workflows[0].args.precision",
            ),
            (
                ok.clone(),
                serde_json::json!({"statistic_configs": {"count": {}}, "writer_id": "w", "result_wait_timeout": 0}),
                "workflows[0].args.result_wait_timeout",
            ),
            (
                ok,
                serde_json::json!({"statistic_configs": {"count": {}}, "writer_id": "w", "rounds": 2}),
                "workflows[0].args",
            ),
            (
                writer("../escape.json"),
                serde_json::json!({"statistic_configs": {"count": {}}, "writer_id": "w"}),
                "components[0].args.output_path",
            ),
            (
                writer("/abs.json"),
                serde_json::json!({"statistic_configs": {"count": {}}, "writer_id": "w"}),
                "components[0].args.output_path",
            ),
        ];
        for (comps, args, key) in cases {
            let e = parse(&comps, args.clone()).unwrap_err();
            assert!(e.contains("srv.json") && e.contains(key), "{args}: {e}");
        }
    }

    #[test]
    fn privacy_components_take_a_name_or_flares_path() {
        let file = Path::new("privacy.json");
        let got = parse_privacy_components(
            file,
            "components",
            serde_json::json!([
                {"id": "a", "path": "nvflare.app_common.statistics.min_count_cleanser.MinCountCleanser",
                 "args": {"min_count": 20}},
                {"id": "b", "name": "AddNoiseToMinMax"},
                {"id": "c", "name": "HistogramBinsCleanser", "args": {"max_bins_percent": 5}}
            ]),
        )
        .unwrap();
        assert_eq!(got["a"], Cleanser::from(MinCountCleanser::new(20)));
        assert_eq!(got["b"], Cleanser::from(AddNoiseToMinMax::default()));
        assert_eq!(
            got["c"],
            Cleanser::from(HistogramBinsCleanser::new(5.0).unwrap())
        );
        for (v, key) in [
            (
                serde_json::json!([{"id": "a", "name": "ExcludeVars"}]),
                "components[0].name",
            ),
            (
                serde_json::json!([{"id": "a", "name": "AddNoiseToMinMax", "args": {"min_noise_level": 2}}]),
                "components[0]",
            ),
            (
                serde_json::json!([{"id": "a", "name": "MinCountCleanser"}, {"id": "a", "name": "MinCountCleanser"}]),
                "components[1].id",
            ),
            (serde_json::json!([{"id": "a"}]), "components[0]"),
        ] {
            let e = parse_privacy_components(file, "components", v.clone())
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{v}: {e}");
        }
    }
}
