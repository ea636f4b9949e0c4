//! Federated authorization: FLARE's `local/authorization.json`, read by the server and by
//! every site, each with its own file.
//!
//! ```json
//! { "format_version": "1.0",
//!   "permissions": {
//!     "project_admin": "any",
//!     "lead": { "submit_job": "any", "manage_job": "n:submitter", "view": "any" },
//!     "member": { "view": "any" } } }
//! ```
//!
//! A role maps to one condition for every right, or to an object of conditions by right (or
//! by command: `"abort_job": "none"` overrides the `manage_job` category for that command).
//! A condition is a string or a list of strings, any of which allows:
//! - `any`, `none`;
//! - `o:site`: the user's org is this site's org;
//! - `o:submitter`: the user's org is the job submitter's; `n:submitter`: the user is the job
//!   submitter (for `submit_job`, the user is the submitter);
//! - `o:<org>`, `n:<name>`: a named org or person (the `O:`/`N:` prefixes are case-blind).
//!
//! Evaluation is FLARE's: the rule for the command if the role names it, else the rule for
//! its right (category), else refused. A role the file does not name has no rights. A file
//! that is missing means [`Authorization::flare_default`] (FLARE's
//! `authorization.json.default`); a file that does not parse, names an unknown role, right or
//! condition, is an error naming the file and the key: it never means "allow all".
//!
//! Where it is checked: the server checks every admin command against its own file
//! (`roles/server.rs`); each site checks `submit_job` (and `byoc` for a job that brings its
//! own code) when a job is deployed to it, and `manage_job` when an admin's abort reaches it
//! (`roles/client.rs`). The files are read again for each decision, so a new file applies
//! to the next command or job without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flare_crypto::{AdminRole, ParticipantCert, Role};

/// A right (FLARE's rights and command categories).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Right {
    /// Submit a job (and, at a site, run it).
    SubmitJob,
    /// Clone a job.
    CloneJob,
    /// Abort or delete a job.
    ManageJob,
    /// Download a job's results.
    DownloadJob,
    /// List jobs, status, sites.
    View,
    /// Operate the system (no command of Flare's needs it yet).
    Operate,
    /// Shell commands (Flare has none; accepted so FLARE's files load).
    ShellCommands,
    /// Run code the job brings (a user's script, `custom/`).
    Byoc,
}

impl Right {
    const ALL: [Right; 8] = [
        Right::SubmitJob,
        Right::CloneJob,
        Right::ManageJob,
        Right::DownloadJob,
        Right::View,
        Right::Operate,
        Right::ShellCommands,
        Right::Byoc,
    ];

    /// The name in `authorization.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Right::SubmitJob => "submit_job",
            Right::CloneJob => "clone_job",
            Right::ManageJob => "manage_job",
            Right::DownloadJob => "download_job",
            Right::View => "view",
            Right::Operate => "operate",
            Right::ShellCommands => "shell_commands",
            Right::Byoc => "byoc",
        }
    }

    fn parse(s: &str) -> Option<Right> {
        Right::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// FLARE's admin command names, with the right each falls under. A role's object may name a
/// command to override its right's rule.
const COMMANDS: &[(&str, Right)] = &[
    ("abort_job", Right::ManageJob),
    ("delete_job", Right::ManageJob),
    ("abort", Right::ManageJob),
    ("start_app", Right::ManageJob),
    ("delete_workspace", Right::ManageJob),
    ("configure_job_log", Right::ManageJob),
    ("list_jobs", Right::View),
    ("check_status", Right::View),
    ("get_job_meta", Right::View),
    ("show_stats", Right::View),
    ("show_errors", Right::View),
    ("reset_errors", Right::View),
    ("sys_info", Right::Operate),
    ("restart", Right::Operate),
    ("shutdown", Right::Operate),
    ("remove_client", Right::Operate),
    ("set_timeout", Right::Operate),
    ("call", Right::Operate),
    ("configure_site_log", Right::Operate),
    ("cat", Right::ShellCommands),
    ("grep", Right::ShellCommands),
    ("head", Right::ShellCommands),
    ("ls", Right::ShellCommands),
    ("pwd", Right::ShellCommands),
    ("tail", Right::ShellCommands),
];

/// One term of a condition.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Any,
    None,
    SiteOrg,
    SubmitterOrg,
    Submitter,
    Org(String),
    Name(String),
}

impl Term {
    fn parse(s: &str) -> Option<Term> {
        match s {
            "any" => return Some(Term::Any),
            "none" => return Some(Term::None),
            _ => {}
        }
        let (kind, arg) = s.split_once(':')?;
        if arg.is_empty() {
            return None;
        }
        match (kind.to_ascii_lowercase().as_str(), arg) {
            ("o", "site") => Some(Term::SiteOrg),
            ("o", "submitter") => Some(Term::SubmitterOrg),
            ("n", "submitter") => Some(Term::Submitter),
            ("n", "site") => None,
            ("o", org) => Some(Term::Org(org.to_string())),
            ("n", name) => Some(Term::Name(name.to_string())),
            _ => None,
        }
    }
}

/// A condition as written (kept for messages) and its terms.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    text: String,
    terms: Vec<Term>,
}

/// The rules of one role.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RoleRules {
    /// One condition for every right and command.
    All(Condition),
    /// By right or command name.
    By(BTreeMap<String, Condition>),
}

/// Why an authorization file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// The file could not be read.
    #[error("{path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file does not say what it must; `key` names the place.
    #[error("{path}: {key}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// The key at fault (`permissions.lead.manage_job`).
        key: String,
        /// Why.
        reason: String,
    },
}

/// A person an authorization decision is about: an admin's name, org and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// The certificate's name.
    pub name: String,
    /// The certificate's org.
    pub org: String,
    /// The admin role.
    pub role: AdminRole,
}

impl Person {
    /// The person of an admin certificate; `None` for any other role.
    pub fn of(cert: &ParticipantCert) -> Option<Person> {
        match cert.role {
            Role::Admin(role) => Some(Person {
                name: cert.name.clone(),
                org: cert.org.clone(),
                role,
            }),
            _ => None,
        }
    }
}

/// What a decision is about: the user, the command, the site deciding, and the job's
/// submitter where there is a job.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Who asks.
    pub user: &'a Person,
    /// The right the command needs.
    pub right: Right,
    /// FLARE's name of the command (`abort_job`), which a role may name to override the
    /// right's rule.
    pub command: &'a str,
    /// The deciding site's org.
    pub site_org: &'a str,
    /// The job's submitter (name, org); `None` where there is no job yet (for `submit_job`
    /// the user is the submitter).
    pub submitter: Option<(&'a str, &'a str)>,
}

/// The outcome, with the rule that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// The rule applied: `permissions.lead.manage_job = "n:submitter"`, or why there was none.
    pub rule: String,
}

/// A parsed `authorization.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// The file it came from (`None`: the built-in default).
    source: Option<PathBuf>,
    roles: BTreeMap<AdminRole, RoleRules>,
}

const ROLES: [AdminRole; 4] = [
    AdminRole::ProjectAdmin,
    AdminRole::OrgAdmin,
    AdminRole::Lead,
    AdminRole::Member,
];

impl Authorization {
    /// FLARE's `authorization.json.default`, which provisioning writes into every kit.
    pub fn default_json() -> serde_json::Value {
        flare_provision::config::default_authorization()
    }

    /// [`Authorization::default_json`], parsed.
    pub fn flare_default() -> Authorization {
        // The built-in value parses: a unit test holds it to that.
        Authorization::from_value(Path::new("<default>"), Authorization::default_json())
            .unwrap_or(Authorization {
                source: None,
                roles: BTreeMap::new(),
            })
            .without_source()
    }

    fn without_source(mut self) -> Self {
        self.source = None;
        self
    }

    /// Reads `path`; a missing file is [`Authorization::flare_default`].
    pub fn load(path: &Path) -> Result<Authorization, AuthzError> {
        let text = match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Authorization::flare_default());
            }
            Err(e) => {
                return Err(AuthzError::Read {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                });
            }
            Ok(t) => t,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| AuthzError::Read {
                path: path.display().to_string(),
                reason: format!("not JSON: {e}"),
            })?;
        Authorization::from_value(path, value)
    }

    /// Checks `value` as read from `path`.
    pub fn from_value(path: &Path, value: serde_json::Value) -> Result<Authorization, AuthzError> {
        let bad = |key: String, reason: String| AuthzError::Invalid {
            path: path.display().to_string(),
            key,
            reason,
        };
        let serde_json::Value::Object(top) = value else {
            return Err(bad("(top)".into(), "must be an object".into()));
        };
        let mut permissions = None;
        for (k, v) in top {
            match k.as_str() {
                "format_version" => {
                    if !(v.is_string() || v.is_number()) {
                        return Err(bad(k, "must be a string or a number".into()));
                    }
                }
                "permissions" => permissions = Some(v),
                _ => {
                    return Err(bad(
                        k,
                        "unknown key (known: format_version, permissions)".into(),
                    ));
                }
            }
        }
        let Some(permissions) = permissions else {
            return Err(bad("permissions".into(), "missing".into()));
        };
        let serde_json::Value::Object(permissions) = permissions else {
            return Err(bad(
                "permissions".into(),
                "must be an object of roles".into(),
            ));
        };
        let mut roles = BTreeMap::new();
        for (role_name, rules) in permissions {
            let key = format!("permissions.{role_name}");
            let Some(role) = ROLES.into_iter().find(|r| r.as_str() == role_name) else {
                return Err(bad(
                    key,
                    "unknown role (known: project_admin, org_admin, lead, member)".into(),
                ));
            };
            let parsed = match rules {
                serde_json::Value::Object(by) => {
                    let mut m = BTreeMap::new();
                    for (right, cond) in by {
                        let key = format!("{key}.{right}");
                        if Right::parse(&right).is_none()
                            && !COMMANDS.iter().any(|(c, _)| *c == right)
                        {
                            return Err(bad(
                                key,
                                "unknown right or command (rights: submit_job, clone_job, manage_job, download_job, view, operate, shell_commands, byoc)".into(),
                            ));
                        }
                        m.insert(right, condition(&cond).map_err(|r| bad(key, r))?);
                    }
                    RoleRules::By(m)
                }
                other => RoleRules::All(condition(&other).map_err(|r| bad(key, r))?),
            };
            roles.insert(role, parsed);
        }
        Ok(Authorization {
            source: Some(path.to_path_buf()),
            roles,
        })
    }

    /// Where the rules came from, for messages.
    pub fn source(&self) -> String {
        match &self.source {
            Some(p) => p.display().to_string(),
            None => "the built-in default (FLARE's authorization.json.default)".into(),
        }
    }

    /// Decides `req`.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let role = req.user.role.as_str();
        let found = match self.roles.get(&req.user.role) {
            None => None,
            Some(RoleRules::All(c)) => Some((format!("permissions.{role}"), c)),
            Some(RoleRules::By(m)) => m
                .get(req.command)
                .map(|c| (format!("permissions.{role}.{}", req.command), c))
                .or_else(|| {
                    m.get(req.right.as_str())
                        .map(|c| (format!("permissions.{role}.{}", req.right.as_str()), c))
                }),
        };
        let Some((key, cond)) = found else {
            return Decision {
                allowed: false,
                rule: format!(
                    "no rule for {role}'s {} in {} (what is not granted is refused)",
                    req.right.as_str(),
                    self.source()
                ),
            };
        };
        // For a job not yet submitted, the user is its submitter.
        let (sub_name, sub_org) = req
            .submitter
            .unwrap_or((req.user.name.as_str(), req.user.org.as_str()));
        let allowed = cond.terms.iter().any(|t| match t {
            Term::Any => true,
            Term::None => false,
            Term::SiteOrg => req.user.org == req.site_org,
            Term::SubmitterOrg => req.user.org == sub_org,
            Term::Submitter => req.user.name == sub_name,
            Term::Org(o) => &req.user.org == o,
            Term::Name(n) => &req.user.name == n,
        });
        Decision {
            allowed,
            rule: format!("{key} = {:?} in {}", cond.text, self.source()),
        }
    }

    /// [`Authorization::decide`] as a result: the refusal says who, what, and the rule.
    pub fn check(&self, req: &Request<'_>, site: &str) -> Result<Decision, String> {
        let d = self.decide(req);
        if d.allowed {
            return Ok(d);
        }
        let whose = match req.submitter {
            Some((name, org)) => format!(" on a job of {name} ({org})"),
            None => String::new(),
        };
        Err(format!(
            "authorization: {site} refuses {} ({}) to {} of org {} (role {}){whose}: {}",
            req.right.as_str(),
            req.command,
            req.user.name,
            req.user.org,
            req.user.role.as_str(),
            d.rule
        ))
    }
}

fn condition(v: &serde_json::Value) -> Result<Condition, String> {
    let texts: Vec<&str> = match v {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Bool(true) => vec!["any"],
        serde_json::Value::Bool(false) => vec!["none"],
        serde_json::Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().ok_or("a list of conditions holds only strings"))
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(
                "a condition is a string (any, none, o:site, o:submitter, n:submitter, o:<org>, n:<name>) or a non-empty list of them".into(),
            );
        }
    };
    let terms = texts
        .iter()
        .map(|t| {
            Term::parse(t.trim()).ok_or_else(|| {
                format!("unknown condition {t:?} (any, none, o:site, o:submitter, n:submitter, o:<org>, n:<name>)")
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Condition {
        text: texts.join(" | "),
        terms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(name: &str, org: &str, role: AdminRole) -> Person {
        Person {
            name: name.into(),
            org: org.into(),
            role,
        }
    }

    fn req<'a>(
        user: &'a Person,
        right: Right,
        command: &'a str,
        submitter: Option<(&'a str, &'a str)>,
    ) -> Request<'a> {
        Request {
            user,
            right,
            command,
            site_org: "hospital-a",
            submitter,
        }
    }

    #[test]
    fn the_default_is_flares() {
        let a = Authorization::flare_default();
        assert_eq!(a.roles.len(), 4);
        let lead = person("lead@a", "hospital-a", AdminRole::Lead);
        let member = person("m@a", "hospital-a", AdminRole::Member);
        let org_admin = person("oa@b", "hospital-b", AdminRole::OrgAdmin);
        let pa = person("pa", "nvidia", AdminRole::ProjectAdmin);
        assert!(
            a.decide(&req(&lead, Right::SubmitJob, "submit_job", None))
                .allowed
        );
        assert!(
            !a.decide(&req(&member, Right::SubmitJob, "submit_job", None))
                .allowed
        );
        assert!(
            a.decide(&req(&member, Right::View, "list_jobs", None))
                .allowed
        );
        // A lead manages only their own jobs (n:submitter).
        assert!(
            a.decide(&req(
                &lead,
                Right::ManageJob,
                "abort_job",
                Some(("lead@a", "hospital-a"))
            ))
            .allowed
        );
        assert!(
            !a.decide(&req(
                &lead,
                Right::ManageJob,
                "abort_job",
                Some(("other@a", "hospital-a"))
            ))
            .allowed
        );
        // An org admin manages jobs of its org's people (o:submitter), and may not submit.
        assert!(
            a.decide(&req(
                &org_admin,
                Right::ManageJob,
                "abort_job",
                Some(("x@b", "hospital-b"))
            ))
            .allowed
        );
        assert!(
            !a.decide(&req(
                &org_admin,
                Right::ManageJob,
                "abort_job",
                Some(("x@a", "hospital-a"))
            ))
            .allowed
        );
        assert!(
            !a.decide(&req(&org_admin, Right::SubmitJob, "submit_job", None))
                .allowed
        );
        // operate is o:site for a lead: only in the deciding site's org.
        assert!(
            a.decide(&req(&lead, Right::Operate, "sys_info", None))
                .allowed
        );
        assert!(
            !a.decide(&req(&org_admin, Right::Operate, "sys_info", None))
                .allowed
        );
        assert!(
            a.decide(&req(&pa, Right::ManageJob, "delete_job", Some(("x", "y"))))
                .allowed
        );
    }

    fn parse(v: serde_json::Value) -> Result<Authorization, AuthzError> {
        Authorization::from_value(Path::new("local/authorization.json"), v)
    }

    #[test]
    fn commands_override_their_right_and_lists_allow_any_term() {
        let a = parse(serde_json::json!({
            "format_version": "1.0",
            "permissions": {
                "lead": {
                    "manage_job": "any",
                    "delete_job": "none",
                    "submit_job": ["o:site", "N:carol", "O:partner"]
                }
            }
        }))
        .unwrap();
        let lead = person("lead@x", "elsewhere", AdminRole::Lead);
        assert!(
            a.decide(&req(&lead, Right::ManageJob, "abort_job", Some(("z", "z"))))
                .allowed
        );
        let d = a.decide(&req(
            &lead,
            Right::ManageJob,
            "delete_job",
            Some(("z", "z")),
        ));
        assert!(!d.allowed);
        assert!(d.rule.contains("permissions.lead.delete_job"), "{}", d.rule);
        assert!(
            !a.decide(&req(&lead, Right::SubmitJob, "submit_job", None))
                .allowed
        );
        let carol = person("carol", "elsewhere", AdminRole::Lead);
        assert!(
            a.decide(&req(&carol, Right::SubmitJob, "submit_job", None))
                .allowed
        );
        let partner = person("p", "partner", AdminRole::Lead);
        assert!(
            a.decide(&req(&partner, Right::SubmitJob, "submit_job", None))
                .allowed
        );
        let local = person("l", "hospital-a", AdminRole::Lead);
        assert!(
            a.decide(&req(&local, Right::SubmitJob, "submit_job", None))
                .allowed
        );
        // A right the role's object does not name, and a role not named, are refused.
        assert!(
            !a.decide(&req(&lead, Right::View, "list_jobs", None))
                .allowed
        );
        let member = person("m", "hospital-a", AdminRole::Member);
        let d = a.decide(&req(&member, Right::View, "list_jobs", None));
        assert!(!d.allowed);
        assert!(d.rule.contains("no rule"), "{}", d.rule);
    }

    #[test]
    fn refusals_name_the_right_the_role_and_the_rule() {
        let a = Authorization::flare_default();
        let lead = person("lead@a", "hospital-a", AdminRole::Lead);
        let e = a
            .check(
                &req(
                    &lead,
                    Right::ManageJob,
                    "abort_job",
                    Some(("b", "hospital-b")),
                ),
                "server",
            )
            .unwrap_err();
        for part in [
            "manage_job",
            "lead@a",
            "role lead",
            "permissions.lead.manage_job",
            "n:submitter",
            "job of b",
        ] {
            assert!(e.contains(part), "{part:?} missing from {e}");
        }
    }

    #[test]
    fn malformed_files_name_the_key_and_never_allow_all() {
        for (v, key) in [
            (serde_json::json!([]), "(top)"),
            (serde_json::json!({"format_version": "1.0"}), "permissions"),
            (
                serde_json::json!({"permissions": {"admin": "any"}}),
                "permissions.admin",
            ),
            (
                serde_json::json!({"permissions": {"lead": {"submit": "any"}}}),
                "permissions.lead.submit",
            ),
            (
                serde_json::json!({"permissions": {"lead": {"submit_job": "everyone"}}}),
                "permissions.lead.submit_job",
            ),
            (
                serde_json::json!({"permissions": {"lead": {"submit_job": 3}}}),
                "permissions.lead.submit_job",
            ),
            (
                serde_json::json!({"permissions": {"member": "o:"}}),
                "permissions.member",
            ),
            (
                serde_json::json!({"permissions": {}, "allow_all": true}),
                "allow_all",
            ),
        ] {
            match parse(v.clone()) {
                Err(AuthzError::Invalid { key: k, path, .. }) => {
                    assert_eq!(k, key, "{v}");
                    assert_eq!(path, "local/authorization.json");
                }
                other => panic!("{v}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_missing_file_is_the_default_and_a_broken_one_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorization.json");
        assert_eq!(
            Authorization::load(&path).unwrap(),
            Authorization::flare_default()
        );
        std::fs::write(&path, "{ not json").unwrap();
        let e = Authorization::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("authorization.json") && e.contains("not JSON"),
            "{e}"
        );
    }
}
