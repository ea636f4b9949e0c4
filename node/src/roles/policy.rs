//! A site's local policy (`local/` of its kit folder, outside the signed `startup/`, so the
//! site changes it without re-provisioning): who may do what here (`authorization.json`, see
//! [`crate::authz`]), which privacy filters every job passes through (`privacy.json`), and
//! what it gives jobs (`resources.json`). The files are read again for every job deployed,
//! so a new policy applies to the next job without a restart; a node also reads them when
//! it starts, so a malformed file stops it with the file and the key named.
//!
//! `privacy.json` is FLARE's:
//!
//! ```json
//! { "scopes": [ { "name": "public", "properties": {},
//!                 "task_data_filters": [],
//!                 "task_result_filters": [ { "path": "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
//!                                            "args": { "percentile": 10, "gamma": 0.01 } } ] } ],
//!   "default_scope": "public" }
//! ```
//!
//! Federated statistics' cleansers are FLARE's too: top-level `components` (each `id`, `name`
//! or dotted `path`, `args`: `MinCountCleanser`, `AddNoiseToMinMax`, `HistogramBinsCleanser`)
//! that a scope's `StatisticsPrivacyFilter` names in its `result_cleanser_ids`
//! ([`crate::stats`]).
//!
//! A job picks a scope with `scope` in `meta.json`. No `privacy.json` means no control (any
//! scope, no site filters). With one, a job naming an unknown scope, or none where the site
//! has no `default_scope`, is refused at deploy. The scope's filters run before the job's own,
//! on every task (`FilterChains::with_site_scope`), wherever the job's filters run: on a task's
//! model coming in and a result going out, and between sites on every model sent and received.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flare_crypto::ParticipantCert;
use serde::Deserialize;

use crate::authz::{Authorization, AuthzError, Person, Request, Right};
use crate::filters::{FilterSpec, parse_filter_list_with};

use crate::job::JobMeta;

/// Why the policy files could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A policy file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// `authorization.json` is malformed.
    #[error(transparent)]
    Authz(#[from] AuthzError),
}

/// One privacy scope: its filters, site first.
#[derive(Debug, Clone)]
pub struct PrivacyScope {
    /// The scope's name.
    pub name: String,
    /// Filters on task data coming in.
    pub task_data_filters: Vec<FilterSpec>,
    /// Filters on results going out.
    pub task_result_filters: Vec<FilterSpec>,
}

/// `privacy.json`, checked.
#[derive(Debug, Clone)]
pub struct Privacy {
    source: PathBuf,
    scopes: Vec<PrivacyScope>,
    default_scope: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivacyFile {
    #[serde(default)]
    #[allow(dead_code)]
    format_version: Option<serde_json::Value>,
    scopes: Vec<ScopeFile>,
    #[serde(default)]
    default_scope: Option<String>,
    /// Cleanser components, which a scope's `StatisticsPrivacyFilter` names by id.
    #[serde(default)]
    components: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeFile {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    properties: serde_json::Value,
    #[serde(default)]
    task_data_filters: Option<serde_json::Value>,
    #[serde(default)]
    task_result_filters: Option<serde_json::Value>,
}

impl Privacy {
    /// Reads `path`; `None` when there is no file (no privacy control).
    pub fn load(path: &Path) -> Result<Option<Privacy>, PolicyError> {
        let file_err = |reason: String| PolicyError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_err(e.to_string())),
            Ok(t) => t,
        };
        let de = &mut serde_json::Deserializer::from_str(&text);
        let raw: PrivacyFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let at = e.path().to_string();
            file_err(format!("{at}: {}", e.inner()))
        })?;
        let cleansers = match raw.components {
            None => Default::default(),
            Some(v) => crate::stats::config::parse_privacy_components(path, "components", v)
                .map_err(|e| file_err(strip_path(path, &e.to_string())))?,
        };
        let mut scopes: Vec<PrivacyScope> = Vec::new();
        for (i, s) in raw.scopes.into_iter().enumerate() {
            if s.name.is_empty() {
                return Err(file_err(format!("scopes[{i}].name: empty")));
            }
            if scopes.iter().any(|o| o.name == s.name) {
                return Err(file_err(format!(
                    "scopes[{i}].name: scope {:?} is defined twice",
                    s.name
                )));
            }
            let list = |key: &str, v: Option<serde_json::Value>| -> Result<_, PolicyError> {
                match v {
                    None => Ok(Vec::new()),
                    Some(v) => {
                        parse_filter_list_with(path, &format!("scopes[{i}].{key}"), v, &cleansers)
                            .map_err(|e| file_err(strip_path(path, &e.to_string())))
                    }
                }
            };
            scopes.push(PrivacyScope {
                task_data_filters: list("task_data_filters", s.task_data_filters)?,
                task_result_filters: list("task_result_filters", s.task_result_filters)?,
                name: s.name,
            });
        }
        if let Some(d) = &raw.default_scope
            && !scopes.iter().any(|s| &s.name == d)
        {
            return Err(file_err(format!(
                "default_scope: {d:?} is not one of the scopes ({})",
                names(&scopes)
            )));
        }
        Ok(Some(Privacy {
            source: path.to_path_buf(),
            scopes,
            default_scope: raw.default_scope,
        }))
    }

    /// The scope a job with `scope` gets here, or why it is refused.
    pub fn pick(&self, site: &str, scope: Option<&str>) -> Result<&PrivacyScope, String> {
        let name = match (scope, &self.default_scope) {
            (Some(s), _) => s,
            (None, Some(d)) => d.as_str(),
            (None, None) => {
                return Err(format!(
                    "privacy: the job names no scope and {site} has no default_scope in {} (scopes: {})",
                    self.source.display(),
                    names(&self.scopes)
                ));
            }
        };
        self.scopes.iter().find(|s| s.name == name).ok_or_else(|| {
            format!(
                "privacy: the job's scope {name:?} is not one of {site}'s scopes in {} ({})",
                self.source.display(),
                names(&self.scopes)
            )
        })
    }
}

/// The file's name is said once, by [`PolicyError::File`].
fn strip_path(path: &Path, msg: &str) -> String {
    let p = format!("{}: ", path.display());
    msg.strip_prefix(&p).unwrap_or(msg).to_string()
}

fn names(scopes: &[PrivacyScope]) -> String {
    if scopes.is_empty() {
        return "none".into();
    }
    scopes
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads the JSON file `path` into `T`; no file means `T::default()`.
pub(super) fn read<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, PolicyError> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(PolicyError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
        Ok(text) => serde_json::from_str(&text).map_err(|e| PolicyError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// The policy of one site (or of the server, whose `authorization.json` it checks admin
/// commands with).
#[derive(Debug, Clone)]
pub struct SitePolicy {
    /// `authorization.json`.
    pub authz: Authorization,
    /// `privacy.json`, if the site has one.
    pub privacy: Option<Privacy>,
    /// `resources.json`: what the site lends jobs.
    pub resources: super::resources::SiteResources,
}

/// The person behind an admin certificate, or why it is not one.
fn person(cert: &ParticipantCert) -> Result<Person, String> {
    Person::of(cert).ok_or_else(|| format!("{} ({}) is not an admin", cert.name, cert.role))
}

impl SitePolicy {
    /// Reads `authorization.json`, `privacy.json` and `resources.json` from `local_dir`.
    /// A missing authorization file means FLARE's default rules; a missing privacy file, no
    /// privacy control; a missing resources file, one job at a time and no GPU.
    pub fn load(local_dir: &Path) -> Result<SitePolicy, PolicyError> {
        Ok(SitePolicy {
            authz: Authorization::load(&local_dir.join("authorization.json"))?,
            privacy: Privacy::load(&local_dir.join("privacy.json"))?,
            resources: super::resources::SiteResources::load(&local_dir.join("resources.json"))?,
        })
    }

    /// Whether `submitter` may run code its job brings here (FLARE's `byoc` right: the user's
    /// own training program, or a `custom/` folder).
    pub fn check_custom_code(
        &self,
        site: &str,
        site_org: &str,
        submitter: &ParticipantCert,
    ) -> Result<(), String> {
        let user = person(submitter)?;
        self.authz
            .check(
                &Request {
                    user: &user,
                    right: Right::Byoc,
                    command: "byoc",
                    site_org,
                    submitter: None,
                },
                site,
            )
            .map(|_| ())
            .map_err(|e| format!("{e} (the job brings its own code: a ScriptExecutor or custom/)"))
    }

    /// Whether `admin` may abort or delete a job of `submitter` here (`manage_job`).
    pub fn check_manage(
        &self,
        site: &str,
        site_org: &str,
        admin: &ParticipantCert,
        submitter: &ParticipantCert,
        command: &str,
    ) -> Result<(), String> {
        let user = person(admin)?;
        self.authz
            .check(
                &Request {
                    user: &user,
                    right: Right::ManageJob,
                    command,
                    site_org,
                    submitter: Some((&submitter.name, &submitter.org)),
                },
                site,
            )
            .map(|_| ())
    }

    /// Whether this site runs `meta`, submitted by `submitter`: `submit_job` for the
    /// submitter, and the privacy scope (the resources are the site's
    /// [`Ledger`](super::resources::Ledger)'s). On success, the privacy scope the job runs
    /// under (if the site has a `privacy.json`).
    pub fn check(
        &self,
        site: &str,
        site_org: &str,
        submitter: &ParticipantCert,
        meta: &JobMeta,
    ) -> Result<Option<&PrivacyScope>, String> {
        let user = person(submitter)?;
        self.authz.check(
            &Request {
                user: &user,
                right: Right::SubmitJob,
                command: "submit_job",
                site_org,
                submitter: None,
            },
            site,
        )?;
        let scope = match &self.privacy {
            None => None,
            Some(p) => Some(p.pick(site, meta.scope.as_deref())?),
        };
        Ok(scope)
    }
}

/// Runs `chains`' result filters for `task` on a site's own result `model` (the learner's
/// output, before it goes anywhere). A privacy filter that works on weight differences
/// (PercentilePrivacy, SVTPrivacy, LocalDpMod) would pass full weights through untouched, as
/// FLARE's do for other data kinds; here that is refused instead, so nothing leaves the site
/// unprotected because a learner was left on `FULL`.
pub fn filter_own_result(
    chains: &crate::filters::FilterChains,
    task: &str,
    site: &str,
    model: flare_protocols::model::FLModel,
) -> Result<flare_protocols::model::FLModel, String> {
    let needs_diff = chains.diff_only_results_for(task);
    if model.params_type == flare_protocols::model::ParamsType::Full
        && !needs_diff.is_empty()
        && model
            .params
            .keys()
            .any(|k| !k.starts_with(flare_protocols::aggregators::SCAFFOLD_C_DIFF))
    {
        return Err(format!(
            "the task result filters {} of {site} work on weight differences, but the learner returned full weights: set \"params_transfer_type\": \"DIFF\" in the learner's args; nothing was sent",
            needs_diff.join(", ")
        ));
    }
    chains
        .task_result(task, model)
        .map_err(|e| format!("the task result filter of {site} failed: {e}"))
}

/// The scope names of a `privacy.json`, for `admin` and tests.
pub fn scope_names(p: &Privacy) -> BTreeMap<String, (usize, usize)> {
    p.scopes
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                (s.task_data_filters.len(), s.task_result_filters.len()),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn privacy_scopes_pick_and_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "privacy.json",
            r#"{"scopes": [
                {"name": "public", "task_result_filters": [
                    {"path": "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
                     "args": {"percentile": 10, "gamma": 0.01}}]},
                {"name": "private", "properties": {"x": 1}, "task_data_filters": [],
                 "task_result_filters": [{"name": "ExcludeVars", "args": {"exclude_vars": ["fc2.weight"]}}]}
            ], "default_scope": "public"}"#,
        );
        let priv_ = Privacy::load(&p).unwrap().unwrap();
        assert_eq!(
            scope_names(&priv_),
            BTreeMap::from([("private".into(), (0, 1)), ("public".into(), (0, 1))])
        );
        assert_eq!(priv_.pick("site-1", None).unwrap().name, "public");
        assert_eq!(
            priv_.pick("site-1", Some("private")).unwrap().name,
            "private"
        );
        let e = priv_.pick("site-1", Some("secret")).unwrap_err();
        assert!(
            e.contains("\"secret\"") && e.contains("public, private") && e.contains("site-1"),
            "{e}"
        );
        let no_default = write(dir.path(), "p2.json", r#"{"scopes": [{"name": "a"}]}"#);
        let e = Privacy::load(&no_default)
            .unwrap()
            .unwrap()
            .pick("site-2", None)
            .unwrap_err();
        assert!(e.contains("no default_scope"), "{e}");
        assert!(
            Privacy::load(&dir.path().join("none.json"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn malformed_privacy_files_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        for (text, want) in [
            (
                r#"{"scopes": [{"name": "a"}], "default_scope": "b"}"#,
                "default_scope",
            ),
            (
                r#"{"scopes": [{"name": "a"}, {"name": "a"}]}"#,
                "scopes[1].name",
            ),
            (r#"{"scopes": [{"nam": "a"}]}"#, "scopes[0]"),
            (
                r#"{"scopes": [{"name": "a", "task_result_filters": [{"name": "NoSuchFilter"}]}]}"#,
                "scopes[0].task_result_filters[0]",
            ),
            (
                r#"{"scopes": [{"name": "a", "task_result_filters": [{"name": "PercentilePrivacy", "args": {"percentile": 101}}]}]}"#,
                "scopes[0].task_result_filters[0].args.percentile",
            ),
            ("{", "privacy.json"),
        ] {
            let p = write(dir.path(), "privacy.json", text);
            let e = Privacy::load(&p).unwrap_err().to_string();
            assert!(
                e.contains("privacy.json") && e.contains(want),
                "{text}: {e}"
            );
        }
    }
}
