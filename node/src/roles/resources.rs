//! What a site gives jobs, what the server runs at once, and the site's ledger of what it has
//! given (FLARE's `GPUResourceManager` and the scheduler's `max_jobs`).
//!
//! A site's `local/resources.json`:
//!
//! ```json
//! { "format_version": 1, "gpus": [0, 1], "mem_per_gpu_in_GiB": 24, "max_concurrent_jobs": 2 }
//! ```
//!
//! `gpus` lists the CUDA device numbers the site lends (`num_of_gpus: N` means `0..N`);
//! `mem_per_gpu_in_GiB` is each one's memory (0: not accounted, so a GPU goes to one job
//! whole). FLARE's layout, a `components` entry whose `path` ends in `GPUResourceManager` with
//! `num_of_gpus` and `mem_per_gpu_in_GiB` in its `args`, is read too. No file: four jobs at
//! once and no GPU. The server's file holds `max_jobs`, the jobs it runs at once (4).
//!
//! A job asks per site in `meta.json`'s `resource_spec` (`{"site-1": {"num_of_gpus": 1,
//! "mem_per_gpu_in_GiB": 8}}`, or `"@ALL"` for every site without its own entry). The
//! [`Ledger`] reserves at deploy and frees when the site stops the job (it ended, was
//! aborted, or the server found the site still holding it); a site that restarts starts with
//! an empty ledger. A job that asks more than the site has when idle gets a
//! [`Shortfall::Never`], which the server turns into a refusal at submit; one that only has to
//! wait gets [`Shortfall::Now`] with what it waits for.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::policy::PolicyError;
use crate::job::JobMeta;

/// What a site lends jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteResources {
    /// Jobs it runs at once.
    pub max_concurrent_jobs: usize,
    /// The CUDA device numbers it lends.
    pub gpus: Vec<u32>,
    /// Each GPU's memory in GiB; 0 when not accounted.
    pub mem_per_gpu_gib: f64,
}

impl Default for SiteResources {
    fn default() -> Self {
        SiteResources {
            max_concurrent_jobs: 4,
            gpus: Vec::new(),
            mem_per_gpu_gib: 0.0,
        }
    }
}

/// The server's scheduling limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerResources {
    /// Jobs deployed or running at once.
    pub max_jobs: usize,
}

impl Default for ServerResources {
    fn default() -> Self {
        ServerResources { max_jobs: 4 }
    }
}

/// The most GPUs a site lists or a job asks for.
const MAX_GPUS: u32 = 1024;

#[derive(Debug, Default, Deserialize)]
struct File {
    #[serde(default)]
    #[allow(dead_code)]
    format_version: Option<serde_json::Value>,
    max_concurrent_jobs: Option<usize>,
    max_jobs: Option<usize>,
    num_of_gpus: Option<u32>,
    gpus: Option<Vec<u32>>,
    #[serde(rename = "mem_per_gpu_in_GiB")]
    mem_per_gpu_in_gib: Option<f64>,
    #[serde(default)]
    components: Vec<Component>,
}

#[derive(Debug, Deserialize)]
struct Component {
    #[serde(default)]
    path: String,
    #[serde(default)]
    args: serde_json::Map<String, serde_json::Value>,
}

impl SiteResources {
    /// Reads a site's `resources.json` (`path`); no file means the defaults.
    pub fn load(path: &Path) -> Result<SiteResources, PolicyError> {
        let f: File = super::policy::read(path)?;
        let err = |reason: String| PolicyError::File {
            path: path.display().to_string(),
            reason,
        };
        let mut num = f.num_of_gpus;
        let mut mem = f.mem_per_gpu_in_gib;
        // FLARE's layout: the GPU resource manager's arguments.
        for c in f
            .components
            .iter()
            .filter(|c| c.path.ends_with("GPUResourceManager"))
        {
            let arg = |k: &str| c.args.get(k).filter(|v| !v.is_null());
            if let Some(v) = arg("num_of_gpus") {
                num = Some(
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| {
                            err(format!(
                                "components: {}: args.num_of_gpus must be a whole number, not {v}",
                                c.path
                            ))
                        })?,
                );
            }
            if let Some(v) = arg("mem_per_gpu_in_GiB") {
                mem = Some(v.as_f64().ok_or_else(|| {
                    err(format!(
                        "components: {}: args.mem_per_gpu_in_GiB must be a number, not {v}",
                        c.path
                    ))
                })?);
            }
        }
        let gpus = match (f.gpus, num) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "gpus and num_of_gpus both given: list the devices in gpus, or count them in num_of_gpus"
                        .into(),
                ));
            }
            (Some(mut g), None) => {
                let n = g.len();
                g.sort_unstable();
                g.dedup();
                if g.len() != n {
                    return Err(err("gpus: a device is listed twice".into()));
                }
                g
            }
            (None, Some(n)) => (0..n.min(MAX_GPUS)).collect(),
            (None, None) => Vec::new(),
        };
        if gpus.len() > MAX_GPUS as usize || num.is_some_and(|n| n > MAX_GPUS) {
            return Err(err(format!("gpus: at most {MAX_GPUS}")));
        }
        let mem_per_gpu_gib = mem.unwrap_or(0.0);
        if !mem_per_gpu_gib.is_finite() || mem_per_gpu_gib < 0.0 {
            return Err(err(format!(
                "mem_per_gpu_in_GiB must be 0 or more, not {mem_per_gpu_gib}"
            )));
        }
        Ok(SiteResources {
            max_concurrent_jobs: f.max_concurrent_jobs.unwrap_or(4),
            gpus,
            mem_per_gpu_gib,
        })
    }
}

impl ServerResources {
    /// Reads the server's `resources.json` (`path`); no file means the defaults.
    pub fn load(path: &Path) -> Result<ServerResources, PolicyError> {
        let f: File = super::policy::read(path)?;
        match f.max_jobs {
            Some(0) => Err(PolicyError::File {
                path: path.display().to_string(),
                reason: "max_jobs must be 1 or more".into(),
            }),
            Some(max_jobs) => Ok(ServerResources { max_jobs }),
            None => Ok(ServerResources::default()),
        }
    }
}

/// What a job asks of one site (`resource_spec` in `meta.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceAsk {
    /// GPUs.
    #[serde(default)]
    pub num_of_gpus: u32,
    /// GiB on each of them; 0 takes each GPU whole.
    #[serde(default, rename = "mem_per_gpu_in_GiB")]
    pub mem_per_gpu_gib: f64,
}

impl ResourceAsk {
    /// What `meta` asks of `site`: its own entry, else `@ALL`'s, else nothing.
    pub fn of(meta: &JobMeta, site: &str) -> ResourceAsk {
        meta.resource_spec
            .get(site)
            .or_else(|| meta.resource_spec.get("@ALL"))
            .copied()
            .unwrap_or_default()
    }

    /// Whether the ask is sane (a job's `meta.json` is checked with it at load).
    pub fn check(&self) -> Result<(), String> {
        if self.num_of_gpus > MAX_GPUS {
            return Err(format!("num_of_gpus: at most {MAX_GPUS}"));
        }
        if !self.mem_per_gpu_gib.is_finite() || self.mem_per_gpu_gib < 0.0 {
            return Err(format!(
                "mem_per_gpu_in_GiB must be 0 or more, not {}",
                self.mem_per_gpu_gib
            ));
        }
        Ok(())
    }
}

/// Why a site cannot run a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Shortfall {
    /// Not now: what it waits for.
    Now(String),
    /// Never, not even when idle.
    Never(String),
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shortfall::Now(s) | Shortfall::Never(s) => f.write_str(s),
        }
    }
}

/// One GPU given to a job: its device number and the GiB taken (`None`: the whole GPU).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Grant {
    gpu: u32,
    gib: Option<f64>,
}

/// What a site has given the jobs it holds.
#[derive(Debug, Default)]
pub struct Ledger {
    jobs: BTreeMap<String, Vec<Grant>>,
}

impl Ledger {
    /// Whether `ask` fits beside what is given now; the grants it would get.
    fn place(&self, res: &SiteResources, ask: &ResourceAsk) -> Result<Vec<Grant>, Shortfall> {
        let n = ask.num_of_gpus as usize;
        if n > res.gpus.len() {
            return Err(Shortfall::Never(format!(
                "the job asks for {n} GPUs, this site has {}",
                res.gpus.len()
            )));
        }
        let shared = res.mem_per_gpu_gib > 0.0 && ask.mem_per_gpu_gib > 0.0;
        if res.mem_per_gpu_gib > 0.0 && ask.mem_per_gpu_gib > res.mem_per_gpu_gib {
            return Err(Shortfall::Never(format!(
                "the job asks for {} GiB on each GPU, this site's have {}",
                ask.mem_per_gpu_gib, res.mem_per_gpu_gib
            )));
        }
        if res.max_concurrent_jobs == 0 {
            return Err(Shortfall::Never(
                "this site runs no jobs (max_concurrent_jobs 0)".into(),
            ));
        }
        if self.jobs.len() >= res.max_concurrent_jobs {
            return Err(Shortfall::Now(format!(
                "{} jobs run here (max_concurrent_jobs {})",
                self.jobs.len(),
                res.max_concurrent_jobs
            )));
        }
        let mut grants = Vec::with_capacity(n);
        for &gpu in &res.gpus {
            if grants.len() == n {
                break;
            }
            let taken: Vec<Option<f64>> = self
                .jobs
                .values()
                .flatten()
                .filter(|g| g.gpu == gpu)
                .map(|g| g.gib)
                .collect();
            if shared {
                if taken.iter().any(Option::is_none) {
                    continue;
                }
                let used: f64 = taken.iter().flatten().sum();
                if res.mem_per_gpu_gib - used >= ask.mem_per_gpu_gib {
                    grants.push(Grant {
                        gpu,
                        gib: Some(ask.mem_per_gpu_gib),
                    });
                }
            } else if taken.is_empty() {
                grants.push(Grant { gpu, gib: None });
            }
        }
        if grants.len() < n {
            let what = if shared {
                format!("{n} GPUs with {} GiB free", ask.mem_per_gpu_gib)
            } else {
                format!("{n} free GPUs")
            };
            return Err(Shortfall::Now(format!(
                "{what}: {} of this site's {} are free enough, the rest are given to other jobs",
                grants.len(),
                res.gpus.len()
            )));
        }
        Ok(grants)
    }

    /// Whether `ask` could be given now, without giving it.
    pub fn check(&self, res: &SiteResources, ask: &ResourceAsk) -> Result<(), Shortfall> {
        self.place(res, ask).map(|_| ())
    }

    /// Gives `job` what it asks, and returns its GPUs' device numbers. A job already given
    /// keeps what it has.
    pub fn reserve(
        &mut self,
        job: &str,
        res: &SiteResources,
        ask: &ResourceAsk,
    ) -> Result<Vec<u32>, Shortfall> {
        if let Some(g) = self.jobs.get(job) {
            return Ok(g.iter().map(|g| g.gpu).collect());
        }
        let grants = self.place(res, ask)?;
        let gpus = grants.iter().map(|g| g.gpu).collect();
        self.jobs.insert(job.to_string(), grants);
        Ok(gpus)
    }

    /// Takes back what `job` was given.
    pub fn free(&mut self, job: &str) {
        self.jobs.remove(job);
    }

    /// The jobs holding resources here.
    pub fn held(&self) -> usize {
        self.jobs.len()
    }
}

/// `CUDA_VISIBLE_DEVICES` for a job given `gpus` (empty: no GPU visible).
pub fn cuda_visible_devices(gpus: &[u32]) -> String {
    gpus.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(gpus: &[u32], mem: f64, max: usize) -> SiteResources {
        SiteResources {
            max_concurrent_jobs: max,
            gpus: gpus.to_vec(),
            mem_per_gpu_gib: mem,
        }
    }

    fn ask(n: u32, gib: f64) -> ResourceAsk {
        ResourceAsk {
            num_of_gpus: n,
            mem_per_gpu_gib: gib,
        }
    }

    #[test]
    fn whole_gpus_go_to_one_job_each_and_come_back_when_freed() {
        let res = site(&[0, 3], 0.0, 4);
        let mut l = Ledger::default();
        assert_eq!(l.reserve("a", &res, &ask(1, 0.0)), Ok(vec![0]));
        assert_eq!(l.reserve("b", &res, &ask(1, 0.0)), Ok(vec![3]));
        let Err(Shortfall::Now(why)) = l.reserve("c", &res, &ask(1, 0.0)) else {
            panic!("a third job got a GPU");
        };
        assert!(why.contains("1 free GPUs: 0 of this site's 2"), "{why}");
        // A job without GPUs still runs beside them.
        assert_eq!(l.reserve("d", &res, &ask(0, 0.0)), Ok(vec![]));
        l.free("a");
        assert_eq!(l.reserve("c", &res, &ask(1, 0.0)), Ok(vec![0]));
        // Asking again changes nothing.
        assert_eq!(l.reserve("c", &res, &ask(2, 0.0)), Ok(vec![0]));
        assert_eq!(l.held(), 3);
    }

    #[test]
    fn gpu_memory_is_shared_between_jobs_up_to_each_gpus_size() {
        let res = site(&[0], 24.0, 4);
        let mut l = Ledger::default();
        assert_eq!(l.reserve("a", &res, &ask(1, 16.0)), Ok(vec![0]));
        assert!(matches!(
            l.reserve("b", &res, &ask(1, 16.0)),
            Err(Shortfall::Now(_))
        ));
        assert_eq!(l.reserve("c", &res, &ask(1, 8.0)), Ok(vec![0]));
        // A whole-GPU ask waits while the GPU is shared.
        assert!(matches!(
            l.reserve("d", &res, &ask(1, 0.0)),
            Err(Shortfall::Now(_))
        ));
        assert_eq!(
            l.check(&res, &ask(1, 32.0)),
            Err(Shortfall::Never(
                "the job asks for 32 GiB on each GPU, this site's have 24".into()
            ))
        );
    }

    #[test]
    fn asks_beyond_the_site_are_never_and_a_full_site_is_not_now() {
        let res = site(&[0, 1], 0.0, 1);
        let mut l = Ledger::default();
        assert_eq!(
            l.check(&res, &ask(3, 0.0)),
            Err(Shortfall::Never(
                "the job asks for 3 GPUs, this site has 2".into()
            ))
        );
        l.reserve("a", &res, &ask(0, 0.0)).unwrap();
        assert_eq!(
            l.check(&res, &ask(0, 0.0)),
            Err(Shortfall::Now(
                "1 jobs run here (max_concurrent_jobs 1)".into()
            ))
        );
        // Never wins over not now: the job would wait forever.
        assert!(matches!(
            l.check(&res, &ask(3, 0.0)),
            Err(Shortfall::Never(_))
        ));
    }

    #[test]
    fn resources_files_are_read_in_both_layouts_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("resources.json");
        assert_eq!(SiteResources::load(&p).unwrap(), SiteResources::default());
        assert_eq!(ServerResources::load(&p).unwrap().max_jobs, 4);
        std::fs::write(
            &p,
            r#"{"gpus": [2, 0], "mem_per_gpu_in_GiB": 16, "max_concurrent_jobs": 3, "max_jobs": 2}"#,
        )
        .unwrap();
        assert_eq!(SiteResources::load(&p).unwrap(), site(&[0, 2], 16.0, 3));
        assert_eq!(ServerResources::load(&p).unwrap().max_jobs, 2);
        std::fs::write(
            &p,
            r#"{"format_version": 2, "components": [{"id": "resource_manager",
                "path": "nvflare.app_common.resource_managers.gpu_resource_manager.GPUResourceManager",
                "args": {"num_of_gpus": 2, "mem_per_gpu_in_GiB": 8}}]}"#,
        )
        .unwrap();
        assert_eq!(SiteResources::load(&p).unwrap(), site(&[0, 1], 8.0, 4));
        for (text, says) in [
            (r#"{"gpus": [0], "num_of_gpus": 1}"#, "both given"),
            (r#"{"gpus": [1, 1]}"#, "listed twice"),
            (r#"{"mem_per_gpu_in_GiB": -1}"#, "mem_per_gpu_in_GiB"),
            (r#"{"max_concurrent_jobs": "two"}"#, "invalid type"),
            (
                r#"{"components": [{"path": "x.GPUResourceManager", "args": {"num_of_gpus": 1.5}}]}"#,
                "args.num_of_gpus",
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = SiteResources::load(&p).unwrap_err().to_string();
            assert!(
                e.contains("resources.json") && e.contains(says),
                "{text}: {e}"
            );
        }
        std::fs::write(&p, r#"{"max_jobs": 0}"#).unwrap();
        let e = ServerResources::load(&p).unwrap_err().to_string();
        assert!(e.contains("max_jobs must be 1"), "{e}");
    }

    #[test]
    fn cuda_visible_devices_lists_the_given_gpus() {
        assert_eq!(cuda_visible_devices(&[0, 3]), "0,3");
        assert_eq!(cuda_visible_devices(&[]), "");
    }
}
