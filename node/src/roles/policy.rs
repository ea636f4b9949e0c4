//! A site's local policy (`local/` of its kit folder): who may run jobs here and with what
//! resources. A site checks it before accepting a deployed job and says why it refuses.

use std::collections::BTreeMap;
use std::path::Path;

use flare_crypto::{ParticipantCert, Role};
use serde::Deserialize;

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
}

#[derive(Debug, Clone, Deserialize, Default)]
struct Authorization {
    #[serde(default)]
    permissions: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct Resources {
    #[serde(default = "one")]
    max_concurrent_jobs: usize,
    #[serde(default)]
    num_of_gpus: u64,
}

fn one() -> usize {
    1
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            max_concurrent_jobs: 1,
            num_of_gpus: 0,
        }
    }
}

/// The policy of one site.
#[derive(Debug, Clone, Default)]
pub struct SitePolicy {
    auth: Authorization,
    resources: Resources,
}

fn read<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, PolicyError> {
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

impl SitePolicy {
    /// Reads `authorization.json` and `resources.json` from `local_dir`; missing files mean
    /// the defaults (anyone with a project certificate, one job at a time, no GPU).
    pub fn load(local_dir: &Path) -> Result<SitePolicy, PolicyError> {
        Ok(SitePolicy {
            auth: read(&local_dir.join("authorization.json"))?,
            resources: read(&local_dir.join("resources.json"))?,
        })
    }

    /// The rule for `right` of `role` (FLARE's `authorization.json`: a role maps to one rule
    /// for every right, or to an object of rules by right; a right it does not name is
    /// `none`), and whether it allows `submitter`; `None` when the file sets no permissions.
    fn rule(
        &self,
        right: &str,
        role: &str,
        submitter: &ParticipantCert,
        site_org: &str,
    ) -> Option<(String, bool)> {
        if self.auth.permissions.is_empty() {
            return None;
        }
        let rule = match self.auth.permissions.get(role) {
            None => "none".to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Object(m)) => m
                .get(right)
                .and_then(|v| v.as_str())
                .unwrap_or("none")
                .to_string(),
            Some(_) => "none".to_string(),
        };
        let allowed = match rule.as_str() {
            "any" => true,
            "o:site" | "o:submitter" => submitter.org == site_org,
            _ => false,
        };
        Some((rule, allowed))
    }

    /// Whether `submitter` may run code its job brings here (FLARE's `byoc` right: the user's
    /// own training program, or a `custom/` folder).
    pub fn check_custom_code(
        &self,
        site: &str,
        site_org: &str,
        submitter: &ParticipantCert,
    ) -> Result<(), String> {
        let Role::Admin(admin_role) = submitter.role else {
            return Err(format!("submitter {} is not an admin", submitter.name));
        };
        match self.rule("byoc", admin_role.as_str(), submitter, site_org) {
            Some((rule, false)) => Err(format!(
                "authorization: the job brings its own code (a ScriptExecutor or custom/), and role {} of {} may not run custom code on {site} (byoc rule {rule:?} in local/authorization.json)",
                admin_role.as_str(),
                submitter.name
            )),
            _ => Ok(()),
        }
    }

    /// Whether this site runs `meta`, submitted by `submitter`, while `running` jobs run here.
    pub fn check(
        &self,
        site: &str,
        site_org: &str,
        submitter: &ParticipantCert,
        meta: &JobMeta,
        running: usize,
    ) -> Result<(), String> {
        let Role::Admin(admin_role) = submitter.role else {
            return Err(format!("submitter {} is not an admin", submitter.name));
        };
        if let Some((rule, allowed)) =
            self.rule("submit_job", admin_role.as_str(), submitter, site_org)
        {
            if !allowed {
                return Err(format!(
                    "authorization: role {} of {} may not submit jobs to {site} (rule {rule:?})",
                    admin_role.as_str(),
                    submitter.name
                ));
            }
        }
        if running >= self.resources.max_concurrent_jobs {
            return Err(format!(
                "resources: {running} jobs already run here (max_concurrent_jobs {})",
                self.resources.max_concurrent_jobs
            ));
        }
        let gpus = meta
            .resource_spec
            .get(site)
            .or_else(|| meta.resource_spec.get("@ALL"))
            .and_then(|v| v.get("num_of_gpus"))
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if gpus > self.resources.num_of_gpus {
            return Err(format!(
                "resources: the job asks for {gpus} GPUs, this site has {}",
                self.resources.num_of_gpus
            ));
        }
        Ok(())
    }
}
