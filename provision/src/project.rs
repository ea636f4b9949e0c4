//! `project.yml`: parsing and validation into a checked [`Project`]. Every error names the
//! field it is about, as a path such as `participants[2].fed_learn_port`.
//!
//! Tiered federations: a participant of `type: hub` serves the region named like it (`eu`)
//! and is a member of the parent region (none for `eu`: the tier-1 server's; `eu` for a hub
//! `eu.de`, which needs hub `eu`). Sites and admins with `region: eu` belong to hub `eu`'s
//! region. Names are unique per region; the server's and hubs' names are unique in the whole
//! project. Kits go to `prod_NN/[<region>/]<name>/` ([`Participant::kit_dir`]).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use flare_crypto::{AdminRole, Role, check_region_name, region_parent};
use serde::Deserialize;

/// The only `api_version` understood.
pub const API_VERSION: u32 = 3;
/// The peer-to-peer port of a server when none is given.
pub const DEFAULT_FED_LEARN_PORT: u16 = 8002;
/// The admin port of a server when none is given.
pub const DEFAULT_ADMIN_PORT: u16 = 8003;
/// How long participant certificates last when `certs.args.validity_days` is absent.
pub const DEFAULT_VALIDITY_DAYS: u32 = 360;
/// The commented sample that `provision` offers to write.
pub const SAMPLE_PROJECT_YML: &str = include_str!("sample_project.yml");

/// Why a project.yml was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not fit the schema (unknown field, unknown participant type, wrong type).
    #[error("{field}: {source}")]
    Schema {
        /// Where in the file.
        field: String,
        /// The parser's message.
        #[source]
        source: serde_yaml::Error,
    },
    /// Two participants have the same name.
    #[error("{field}: duplicate participant name {name:?}")]
    DuplicateName {
        /// The second occurrence.
        field: String,
        /// The name.
        name: String,
    },
    /// No participant has type `server`.
    #[error("{field}: no participant of type server (exactly one is needed)")]
    MissingServer {
        /// Always `participants`.
        field: String,
    },
    /// A port is out of range or missing where one is needed.
    #[error("{field}: bad port {value} ({problem})")]
    BadPort {
        /// The port field.
        field: String,
        /// The value given.
        value: i64,
        /// What is wrong.
        problem: &'static str,
    },
    /// Any other invalid value.
    #[error("{field}: {problem}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        problem: String,
    },
}

impl ProjectError {
    /// The field the error is about.
    pub fn field(&self) -> &str {
        match self {
            ProjectError::Io { .. } => "",
            ProjectError::Schema { field, .. }
            | ProjectError::DuplicateName { field, .. }
            | ProjectError::MissingServer { field }
            | ProjectError::BadPort { field, .. }
            | ProjectError::Invalid { field, .. } => field,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProject {
    api_version: u32,
    name: String,
    #[serde(default)]
    description: String,
    participants: Vec<RawParticipant>,
    #[serde(default)]
    builders: Option<Vec<RawBuilder>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParticipant {
    name: String,
    #[serde(rename = "type")]
    kind: ParticipantType,
    org: String,
    #[serde(default)]
    host_names: Vec<String>,
    #[serde(default)]
    listen_host: Option<String>,
    #[serde(default)]
    fed_learn_port: Option<i64>,
    #[serde(default)]
    admin_port: Option<i64>,
    #[serde(default)]
    port: Option<i64>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    region: Option<String>,
}

/// The participant types of project.yml.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParticipantType {
    /// The server.
    Server,
    /// A training site.
    Client,
    /// An admin (a person).
    Admin,
    /// A relay-only node.
    Relay,
    /// The hub of a region (tiered federations): its region's server, a member upward.
    Hub,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawBuilder {
    Name(String),
    Full {
        path: String,
        #[serde(default)]
        args: serde_yaml::Mapping,
    },
}

/// One checked participant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Participant {
    /// Unique name: certificate CN and kit folder name.
    pub name: String,
    /// Org: certificate O.
    pub org: String,
    /// Role, with admin rights for admins.
    pub role: Role,
    /// Names or addresses others dial (server and relays); first preferred.
    pub host_names: Vec<String>,
    /// The address to listen on (default `0.0.0.0`).
    pub listen_host: IpAddr,
    /// The peer-to-peer port (0: any free port; always set for server and relays).
    pub port: u16,
    /// The admin port (server and hubs only; may equal `port`).
    pub admin_port: Option<u16>,
    /// The region the participant belongs to; a hub's is the region it serves, its own name.
    /// `None`: a direct member of the tier-1 server (and the server itself).
    pub region: Option<String>,
}

impl Participant {
    /// The participant's folder under `prod_NN/`: `<name>` without a region,
    /// `<region>/<name>` with one (so a hub's kit is `<region>/<region>`, beside its region's
    /// sites and admins).
    pub fn kit_dir(&self) -> PathBuf {
        match &self.region {
            Some(r) => Path::new(r).join(&self.name),
            None => PathBuf::from(&self.name),
        }
    }

    /// Its zip beside the kit folder: `[<region>/]<name>.zip`.
    pub fn zip_path(&self) -> PathBuf {
        let zip = format!("{}.zip", self.name);
        match &self.region {
            Some(r) => Path::new(r).join(zip),
            None => PathBuf::from(zip),
        }
    }

    /// Its docker-compose service name: `<name>`, or `<name>.<region>` for a region's member
    /// (a hub is `<name>`: hub names are unique in the project).
    pub fn service_name(&self) -> String {
        match (&self.region, self.role) {
            (Some(r), role) if role != Role::Hub => format!("{}.{r}", self.name),
            _ => self.name.clone(),
        }
    }
}

/// The optional outputs and their settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Builders {
    /// Participant certificate lifetime in days.
    pub validity_days: u32,
    /// Write `docker-compose.yml`, with this image.
    pub docker_compose: Option<String>,
    /// Write one zip per participant.
    pub zip: bool,
}

impl Default for Builders {
    fn default() -> Self {
        Self {
            validity_days: DEFAULT_VALIDITY_DAYS,
            docker_compose: Some("flare-node:latest".into()),
            zip: true,
        }
    }
}

/// A checked project.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Project {
    /// The project name (a folder name).
    pub name: String,
    /// Free text.
    pub description: String,
    /// Everyone, in file order.
    pub participants: Vec<Participant>,
    /// What to build.
    pub builders: Builders,
}

impl Project {
    /// The one server.
    pub fn server(&self) -> Option<&Participant> {
        self.participants.iter().find(|p| p.role == Role::Server)
    }

    /// The hub that serves `region`.
    pub fn hub(&self, region: &str) -> Option<&Participant> {
        self.participants
            .iter()
            .find(|p| p.role == Role::Hub && p.region.as_deref() == Some(region))
    }

    /// The node `p` connects to: the server for a participant without a region, its hub for
    /// a region's site or admin, and for a hub the hub of the parent region (the server for a
    /// top-level one). `None` for the server itself.
    pub fn upstream(&self, p: &Participant) -> Option<&Participant> {
        let region = match (p.role, p.region.as_deref()) {
            (Role::Server, _) => return None,
            (Role::Hub, Some(r)) => region_parent(r),
            (_, r) => r,
        };
        match region {
            Some(r) => self.hub(r),
            None => self.server(),
        }
    }

    /// Reads and checks a project.yml file.
    pub fn load(path: &Path) -> Result<Self, ProjectError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProjectError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks project.yml text.
    pub fn parse(text: &str) -> Result<Self, ProjectError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let raw: RawProject = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            ProjectError::Schema {
                field,
                source: e.into_inner(),
            }
        })?;
        validate(raw)
    }
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ProjectError {
    ProjectError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A name that is safe as a folder name, a certificate CN and a docker service key.
fn check_name(field: &str, name: &str, allow_at: bool) -> Result<(), ProjectError> {
    if name.is_empty() || name.len() > 64 {
        return Err(invalid(field, "must be 1 to 64 characters"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(invalid(field, "must not start with '.' or '-'"));
    }
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".zip") || lower == "docker-compose.yml" {
        return Err(invalid(
            field,
            format!(
                "{name:?} is reserved: its folder would collide with the zips or docker-compose.yml beside the kits"
            ),
        ));
    }
    let ok = name.chars().all(|c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || (allow_at && c == '@')
    });
    if !ok {
        return Err(invalid(
            field,
            format!(
                "{name:?}: only letters, digits, '.', '_', '-'{} are allowed",
                if allow_at { ", '@'" } else { "" }
            ),
        ));
    }
    Ok(())
}

fn check_port(field: String, value: i64, allow_zero: bool) -> Result<u16, ProjectError> {
    match u16::try_from(value) {
        Ok(0) if !allow_zero => Err(ProjectError::BadPort {
            field,
            value,
            problem: "a fixed port from 1 to 65535 is needed here",
        }),
        Ok(p) => Ok(p),
        Err(_) => Err(ProjectError::BadPort {
            field,
            value,
            problem: "ports are 0 to 65535",
        }),
    }
}

fn validate(raw: RawProject) -> Result<Project, ProjectError> {
    if raw.api_version != API_VERSION {
        return Err(invalid(
            "api_version",
            format!(
                "unsupported version {} (expected {API_VERSION})",
                raw.api_version
            ),
        ));
    }
    check_name("name", &raw.name, false)?;
    if raw.participants.is_empty() {
        return Err(invalid("participants", "no participants"));
    }
    let mut names = Names::default();
    let mut participants = Vec::with_capacity(raw.participants.len());
    let mut server_at: Option<usize> = None;
    for (i, p) in raw.participants.into_iter().enumerate() {
        let f = |name: &str| format!("participants[{i}].{name}");
        check_name(&f("name"), &p.name, p.kind == ParticipantType::Admin)?;
        let region = participant_region(i, &p)?;
        names.add(i, &p.name, region.as_deref(), p.kind)?;
        if p.org.trim().is_empty() {
            return Err(invalid(f("org"), "must not be empty"));
        }
        if p.org.len() > 64 {
            return Err(invalid(f("org"), "must be at most 64 characters"));
        }
        for (k, h) in p.host_names.iter().enumerate() {
            let bad = h.is_empty()
                || h.len() > 253
                || h.chars()
                    .any(|c| c.is_whitespace() || c == '/' || c.is_control());
            if bad {
                return Err(invalid(
                    format!("participants[{i}].host_names[{k}]"),
                    format!("bad host name {h:?}"),
                ));
            }
        }
        let listen_host: IpAddr = match &p.listen_host {
            None => IpAddr::from([0, 0, 0, 0]),
            Some(h) => h
                .parse()
                .map_err(|_| invalid(f("listen_host"), format!("{h:?} is not an IP address")))?,
        };
        if p.role.is_some() && p.kind != ParticipantType::Admin {
            return Err(invalid(f("role"), "only admins have a role"));
        }
        if p.port.is_some() && p.fed_learn_port.is_some() {
            return Err(invalid(
                f("port"),
                "give either port or fed_learn_port, not both",
            ));
        }
        let (port_field, port_value) = match (p.fed_learn_port, p.port) {
            (Some(v), _) => (f("fed_learn_port"), Some(v)),
            (None, Some(v)) => (f("port"), Some(v)),
            (None, None) => (f("port"), None),
        };
        let participant = match p.kind {
            ParticipantType::Server => {
                if let Some(j) = server_at {
                    return Err(invalid(
                        f("type"),
                        format!(
                            "a second server (participants[{j}] is the server); Flare has one server per project"
                        ),
                    ));
                }
                server_at = Some(i);
                let port = check_port(
                    port_field,
                    port_value.unwrap_or(i64::from(DEFAULT_FED_LEARN_PORT)),
                    false,
                )?;
                let admin_port = match (p.admin_port, p.port) {
                    (Some(v), _) => check_port(f("admin_port"), v, false)?,
                    (None, Some(_)) => port,
                    (None, None) => DEFAULT_ADMIN_PORT,
                };
                let host_names = if p.host_names.is_empty() {
                    vec![p.name.clone()]
                } else {
                    p.host_names
                };
                Participant {
                    name: p.name,
                    org: p.org,
                    role: Role::Server,
                    host_names,
                    listen_host,
                    port,
                    admin_port: Some(admin_port),
                    region: None,
                }
            }
            ParticipantType::Hub => {
                // Like the server: its region's sites and admins connect to it.
                let port = check_port(
                    port_field,
                    port_value.unwrap_or(i64::from(DEFAULT_FED_LEARN_PORT)),
                    false,
                )?;
                let admin_port = match (p.admin_port, p.port) {
                    (Some(v), _) => check_port(f("admin_port"), v, false)?,
                    (None, Some(_)) => port,
                    (None, None) => DEFAULT_ADMIN_PORT,
                };
                let host_names = if p.host_names.is_empty() {
                    vec![p.name.clone()]
                } else {
                    p.host_names
                };
                Participant {
                    name: p.name,
                    org: p.org,
                    role: Role::Hub,
                    host_names,
                    listen_host,
                    port,
                    admin_port: Some(admin_port),
                    region,
                }
            }
            ParticipantType::Relay => {
                let v = port_value.ok_or_else(|| ProjectError::BadPort {
                    field: f("port"),
                    value: 0,
                    problem: "a relay needs a port",
                })?;
                let port = check_port(port_field, v, false)?;
                if p.admin_port.is_some() {
                    return Err(invalid(
                        f("admin_port"),
                        "only the server and hubs have an admin port",
                    ));
                }
                let host_names = if p.host_names.is_empty() {
                    vec![p.name.clone()]
                } else {
                    p.host_names
                };
                Participant {
                    name: p.name,
                    org: p.org,
                    role: Role::Relay,
                    host_names,
                    listen_host,
                    port,
                    admin_port: None,
                    region: None,
                }
            }
            ParticipantType::Client => {
                if p.admin_port.is_some() {
                    return Err(invalid(
                        f("admin_port"),
                        "only the server and hubs have an admin port",
                    ));
                }
                let port = match port_value {
                    Some(v) => check_port(port_field, v, true)?,
                    None => 0,
                };
                Participant {
                    name: p.name,
                    org: p.org,
                    role: Role::Client,
                    host_names: p.host_names,
                    listen_host,
                    port,
                    admin_port: None,
                    region,
                }
            }
            ParticipantType::Admin => {
                if port_value.is_some() || p.admin_port.is_some() {
                    return Err(invalid(port_field, "admins do not listen on a port"));
                }
                let role = p.role.ok_or_else(|| {
                    invalid(
                        f("role"),
                        "admins need a role: project_admin, org_admin, lead or member",
                    )
                })?;
                let rights: AdminRole = role.parse().map_err(|e: String| invalid(f("role"), e))?;
                Participant {
                    name: p.name,
                    org: p.org,
                    role: Role::Admin(rights),
                    host_names: p.host_names,
                    listen_host,
                    port: 0,
                    admin_port: None,
                    region,
                }
            }
        };
        participants.push(participant);
    }
    if server_at.is_none() {
        return Err(ProjectError::MissingServer {
            field: "participants".into(),
        });
    }
    check_hubs_exist(&participants)?;
    let builders = match raw.builders {
        None => Builders::default(),
        Some(list) => parse_builders(list)?,
    };
    if builders.docker_compose.is_some() {
        check_service_names(&participants)?;
    }
    Ok(Project {
        name: raw.name,
        description: raw.description,
        participants,
        builders,
    })
}

/// The region of participant `i` from its type and `region` field, checked as a name: a hub's
/// is its own name, the server and relays have none.
fn participant_region(i: usize, p: &RawParticipant) -> Result<Option<String>, ProjectError> {
    let f = |name: &str| format!("participants[{i}].{name}");
    match p.kind {
        ParticipantType::Hub => {
            if let Some(r) = &p.region
                && r != &p.name
            {
                return Err(invalid(
                    f("region"),
                    format!(
                        "a hub's region is its name: write region: {} or leave region out (not {r:?})",
                        p.name
                    ),
                ));
            }
            check_region_name(&p.name).map_err(|e| {
                invalid(
                    f("name"),
                    format!("a hub is named after the region it serves: {e}"),
                )
            })?;
            Ok(Some(p.name.clone()))
        }
        ParticipantType::Server if p.region.is_some() => Err(invalid(
            f("region"),
            "the server has no region: it serves the whole federation (give regions to hubs, sites and admins)",
        )),
        ParticipantType::Relay if p.region.is_some() => Err(invalid(
            f("region"),
            "relays in a region are not supported yet (a region's hub relays for it)",
        )),
        _ => match &p.region {
            Some(r) => {
                check_region_name(r).map_err(|e| invalid(f("region"), e.to_string()))?;
                Ok(Some(r.clone()))
            }
            None => Ok(None),
        },
    }
}

/// The names seen so far: unique per region, and the server's and hubs' in the whole
/// project (they are members upward and servers downward).
#[derive(Default)]
struct Names {
    /// Every name (lowercase) and where it first appears.
    all: HashMap<String, usize>,
    /// Server and hub names (lowercase) and where.
    global: HashMap<String, usize>,
    /// (region, lowercase name) pairs.
    per_region: HashSet<(Option<String>, String)>,
}

impl Names {
    fn add(
        &mut self,
        i: usize,
        name: &str,
        region: Option<&str>,
        kind: ParticipantType,
    ) -> Result<(), ProjectError> {
        let field = format!("participants[{i}].name");
        let key = name.to_ascii_lowercase();
        let global = matches!(kind, ParticipantType::Server | ParticipantType::Hub);
        let clash = if global {
            self.all.get(&key)
        } else {
            self.global.get(&key)
        };
        if let Some(j) = clash {
            return Err(invalid(
                field,
                format!(
                    "{name:?} is also participants[{j}]; the server's and hubs' names are unique in the whole project"
                ),
            ));
        }
        let regional = (region.map(str::to_string), key.clone());
        if !self.per_region.insert(regional) {
            return Err(ProjectError::DuplicateName {
                field,
                name: name.to_string(),
            });
        }
        self.all.entry(key.clone()).or_insert(i);
        if global {
            self.global.insert(key, i);
        }
        Ok(())
    }
}

/// Every region named by a site, an admin or a nested hub has a hub.
fn check_hubs_exist(participants: &[Participant]) -> Result<(), ProjectError> {
    let hubs: HashSet<&str> = participants
        .iter()
        .filter(|p| p.role == Role::Hub)
        .filter_map(|p| p.region.as_deref())
        .collect();
    for (i, p) in participants.iter().enumerate() {
        match (p.role, p.region.as_deref()) {
            (Role::Hub, Some(r)) => {
                if let Some(parent) = region_parent(r)
                    && !hubs.contains(parent)
                {
                    return Err(invalid(
                        format!("participants[{i}].name"),
                        format!(
                            "hub {r:?} serves a region inside {parent:?}, but no hub serves {parent:?} (add a participant of type hub named {parent})"
                        ),
                    ));
                }
            }
            (_, Some(r)) if !hubs.contains(r) => {
                return Err(invalid(
                    format!("participants[{i}].region"),
                    format!("no hub serves region {r:?} (add a participant of type hub named {r})"),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// docker-compose service names (`<name>` or `<name>.<region>`) do not collide.
fn check_service_names(participants: &[Participant]) -> Result<(), ProjectError> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, p) in participants.iter().enumerate() {
        if matches!(p.role, Role::Admin(_)) {
            continue;
        }
        let service = p.service_name().to_ascii_lowercase();
        if let Some(j) = seen.insert(service.clone(), i) {
            return Err(invalid(
                format!("participants[{i}].name"),
                format!(
                    "its docker-compose service name {service:?} is taken by participants[{j}]; rename one"
                ),
            ));
        }
    }
    Ok(())
}

fn parse_builders(list: Vec<RawBuilder>) -> Result<Builders, ProjectError> {
    let mut b = Builders {
        validity_days: DEFAULT_VALIDITY_DAYS,
        docker_compose: None,
        zip: false,
    };
    let mut required = [
        ("workspace", false),
        ("static_files", false),
        ("certs", false),
        ("signature", false),
    ];
    for (i, item) in list.into_iter().enumerate() {
        let (name, args) = match item {
            RawBuilder::Name(n) => (n, serde_yaml::Mapping::new()),
            RawBuilder::Full { path, args } => (path, args),
        };
        let field = format!("builders[{i}]");
        // Accept FLARE's class paths too, e.g. nvflare.lighter.impl.cert.CertBuilder.
        let key = match name.as_str() {
            "workspace" | "nvflare.lighter.impl.workspace.WorkspaceBuilder" => "workspace",
            "static_files" | "static" | "nvflare.lighter.impl.static_file.StaticFileBuilder" => {
                "static_files"
            }
            "certs" | "cert" | "nvflare.lighter.impl.cert.CertBuilder" => "certs",
            "signature" | "nvflare.lighter.impl.signature.SignatureBuilder" => "signature",
            "docker_compose" | "docker-compose" | "nvflare.lighter.impl.docker.DockerBuilder" => {
                "docker_compose"
            }
            "zip" => "zip",
            other => {
                return Err(invalid(
                    format!("{field}.path"),
                    format!("unknown builder {other:?}"),
                ));
            }
        };
        let mut arg_keys: Vec<String> = args
            .keys()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect();
        arg_keys.sort();
        let allowed: &[&str] = match key {
            "certs" => &["validity_days"],
            "docker_compose" => &["base_image"],
            _ => &[],
        };
        if let Some(bad) = arg_keys.iter().find(|k| !allowed.contains(&k.as_str())) {
            return Err(invalid(
                format!("{field}.args.{bad}"),
                format!("unknown argument for builder {key}"),
            ));
        }
        match key {
            "certs" => {
                if let Some(v) = args.get("validity_days") {
                    let days = v
                        .as_u64()
                        .filter(|d| (1..=36500).contains(d))
                        .ok_or_else(|| {
                            invalid(
                                format!("{field}.args.validity_days"),
                                "must be a whole number of days from 1 to 36500",
                            )
                        })?;
                    b.validity_days = days as u32;
                }
            }
            "docker_compose" => {
                let image = match args.get("base_image") {
                    None => "flare-node:latest".to_string(),
                    Some(v) => v
                        .as_str()
                        .filter(|s| {
                            !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c == '"')
                        })
                        .ok_or_else(|| {
                            invalid(format!("{field}.args.base_image"), "must be an image name")
                        })?
                        .to_string(),
                };
                b.docker_compose = Some(image);
            }
            "zip" => b.zip = true,
            _ => {}
        }
        for r in required.iter_mut() {
            if r.0 == key {
                r.1 = true;
            }
        }
    }
    if let Some((missing, _)) = required.iter().find(|r| !r.1) {
        return Err(invalid(
            "builders",
            format!("the {missing} builder is required"),
        ));
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_parses() {
        let p = Project::parse(SAMPLE_PROJECT_YML).unwrap();
        assert_eq!(p.name, "example_project");
        assert_eq!(p.participants.len(), 4);
        let s = p.server().unwrap();
        assert_eq!((s.port, s.admin_port), (8002, Some(8003)));
        assert_eq!(p.participants[2].port, 9102);
        assert_eq!(p.participants[3].role, Role::Admin(AdminRole::ProjectAdmin));
        assert!(p.builders.zip);
        assert_eq!(p.builders.validity_days, 360);
    }

    /// Each broken project names the field at fault.
    #[test]
    fn invalid_projects_name_the_field() {
        let base = "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n";
        let cases: &[(&str, &str)] = &[
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n  - {name: s, type: client, org: o}\n",
                "participants[1].name",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n  - {name: c, type: worker, org: o}\n",
                "participants[1].type",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: c, type: client, org: o}\n",
                "participants",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o, fed_learn_port: 70000}\n",
                "participants[0].fed_learn_port",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o, admin_port: 0}\n",
                "participants[0].admin_port",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n  - {name: c, type: client, org: o, port: -1}\n",
                "participants[1].port",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n  - {name: a@x.com, type: admin, org: o}\n",
                "participants[1].role",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n  - {name: a@x.com, type: admin, org: o, role: king}\n",
                "participants[1].role",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n  - {name: ../evil, type: client, org: o}\n",
                "participants[1].name",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n  - {name: c, type: client, org: ''}\n",
                "participants[1].org",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n  - {name: s2, type: server, org: o}\n",
                "participants[1].type",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o, colour: red}\n",
                "participants[0]",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n  - {name: r, type: relay, org: o}\n",
                "participants[1].port",
            ),
            (
                "api_version: 2\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n",
                "api_version",
            ),
            (
                "api_version: 3\nname: 'a b'\nparticipants:\n  - {name: s, type: server, org: o}\n",
                "name",
            ),
            (
                "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o, host_names: ['a b']}\n",
                "participants[0].host_names[0]",
            ),
            (
                &format!("{base}builders: [workspace, certs, signature]\n"),
                "builders",
            ),
            (
                &format!("{base}builders: [workspace, static_files, certs, signature, teleport]\n"),
                "builders[4].path",
            ),
            (
                &format!(
                    "{base}builders:\n  - workspace\n  - static_files\n  - signature\n  - path: certs\n    args: {{validity_days: 0}}\n"
                ),
                "builders[3].args.validity_days",
            ),
        ];
        for (yml, field) in cases {
            let err = Project::parse(yml).expect_err(yml);
            assert!(
                err.field().starts_with(field),
                "expected field {field}, got {:?} ({err}) for\n{yml}",
                err.field()
            );
            assert!(err.to_string().starts_with(err.field()), "{err}");
        }
        Project::parse(base).unwrap();
    }

    /// The sample's commented hub example, uncommented, is a valid tiered project.
    #[test]
    fn sample_hub_example_parses() {
        let mut inside = false;
        let mut text = String::new();
        for line in SAMPLE_PROJECT_YML.lines() {
            if line.contains("--- hub example ---") {
                inside = true;
            } else if line.contains("--- end of hub example ---") {
                inside = false;
            } else if inside {
                text.push_str("  ");
                text.push_str(line.trim_start().trim_start_matches("# "));
                text.push('\n');
                continue;
            }
            text.push_str(line);
            text.push('\n');
        }
        let p = Project::parse(&text).unwrap();
        assert_eq!(p.participants.len(), 7);
        let hub = p.hub("eu").unwrap();
        assert_eq!((hub.port, hub.admin_port), (8102, Some(8103)));
        assert_eq!(hub.kit_dir(), Path::new("eu/eu"));
        // site-1 exists twice: without a region and in eu.
        let eu_site = &p.participants[5];
        assert_eq!(eu_site.name, "site-1");
        assert_eq!(eu_site.region.as_deref(), Some("eu"));
        assert_eq!(eu_site.kit_dir(), Path::new("eu/site-1"));
        assert_eq!(p.upstream(eu_site).unwrap().name, "eu");
        assert_eq!(p.upstream(hub).unwrap().name, "server1");
        assert_eq!(p.participants[6].role, Role::Admin(AdminRole::Lead));
    }

    const TIERED: &str =
        "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n";

    /// A tiered project: the base above plus these participant lines.
    fn tiered(lines: &[&str]) -> String {
        let mut s = TIERED.to_string();
        for l in lines {
            s.push_str("  - ");
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    #[test]
    fn regions_hubs_and_names() {
        let p = Project::parse(&tiered(&[
            "{name: eu, type: hub, org: o, fed_learn_port: 9000, admin_port: 9001}",
            "{name: us, type: hub, org: o, region: us}",
            "{name: eu.de, type: hub, org: o}",
            "{name: site-1, type: client, org: o}",
            "{name: site-1, type: client, org: o, region: eu}",
            "{name: site-1, type: client, org: o, region: us}",
            "{name: site-1, type: client, org: o, region: eu.de}",
            "{name: a@x, type: admin, org: o, role: lead, region: eu}",
            "{name: a@x, type: admin, org: o, role: lead}",
        ]))
        .unwrap();
        let by = |i: usize| &p.participants[i];
        assert_eq!(by(1).role, Role::Hub);
        assert_eq!(by(1).region.as_deref(), Some("eu"));
        assert_eq!((by(1).port, by(1).admin_port), (9000, Some(9001)));
        assert_eq!((by(2).port, by(2).admin_port), (8002, Some(8003)));
        assert_eq!(by(2).host_names, ["us"]);
        assert_eq!(by(3).kit_dir(), Path::new("eu.de/eu.de"));
        assert_eq!(by(4).kit_dir(), Path::new("site-1"));
        assert_eq!(by(5).kit_dir(), Path::new("eu/site-1"));
        assert_eq!(by(5).service_name(), "site-1.eu");
        assert_eq!(by(1).service_name(), "eu");
        assert_eq!(by(5).zip_path(), Path::new("eu/site-1.zip"));
        let up = |i: usize| p.upstream(by(i)).map(|u| u.name.as_str());
        assert_eq!(up(0), None);
        assert_eq!(up(1), Some("s"));
        assert_eq!(up(3), Some("eu"));
        assert_eq!(up(4), Some("s"));
        assert_eq!(up(5), Some("eu"));
        assert_eq!(up(6), Some("us"));
        assert_eq!(up(7), Some("eu.de"));
        assert_eq!(up(8), Some("eu"));
        assert_eq!(up(9), Some("s"));
    }

    /// Each broken tiered project names the field at fault and says what is wrong.
    #[test]
    fn invalid_tiered_projects_name_the_field() {
        let cases: &[(&[&str], &str, &str)] = &[
            (
                &["{name: c, type: client, org: o, region: eu}"],
                "participants[1].region",
                "no hub serves region \"eu\"",
            ),
            (
                &["{name: c, type: client, org: o, region: EU}"],
                "participants[1].region",
                "only a-z",
            ),
            (
                &[
                    "{name: eu, type: hub, org: o}",
                    "{name: c, type: client, org: o, region: 'eu..x'}",
                ],
                "participants[2].region",
                "1 to 32 bytes",
            ),
            (
                &["{name: a@x, type: admin, org: o, role: lead, region: ''}"],
                "participants[1].region",
                "bad region",
            ),
            (
                &["{name: eu, type: hub, org: o, region: us}"],
                "participants[1].region",
                "a hub's region is its name",
            ),
            (
                &["{name: EU, type: hub, org: o}"],
                "participants[1].name",
                "named after the region",
            ),
            (
                &["{name: eu.de, type: hub, org: o}"],
                "participants[1].name",
                "no hub serves \"eu\"",
            ),
            (
                &[
                    "{name: eu, type: hub, org: o}",
                    "{name: c, type: client, org: o, region: eu}",
                    "{name: c, type: client, org: o, region: eu}",
                ],
                "participants[3].name",
                "duplicate participant name",
            ),
            (
                &[
                    "{name: c, type: client, org: o}",
                    "{name: c, type: hub, org: o}",
                ],
                "participants[2].name",
                "unique in the whole project",
            ),
            (
                &[
                    "{name: eu, type: hub, org: o}",
                    "{name: eu, type: client, org: o}",
                ],
                "participants[2].name",
                "unique in the whole project",
            ),
            (
                &[
                    "{name: eu, type: hub, org: o}",
                    "{name: s, type: client, org: o, region: eu}",
                ],
                "participants[2].name",
                "unique in the whole project",
            ),
            (
                &[
                    "{name: eu, type: hub, org: o}",
                    "{name: eu, type: hub, org: o}",
                ],
                "participants[2].name",
                "unique in the whole project",
            ),
            (
                &["{name: r, type: relay, org: o, port: 9, region: eu}"],
                "participants[1].region",
                "not supported yet",
            ),
            (
                &["{name: eu, type: hub, org: o, fed_learn_port: 0}"],
                "participants[1].fed_learn_port",
                "fixed port",
            ),
            (
                &[
                    "{name: eu, type: hub, org: o}",
                    "{name: c.eu, type: client, org: o}",
                    "{name: c, type: client, org: o, region: eu}",
                ],
                "participants[3].name",
                "docker-compose service name",
            ),
            (
                &["{name: c, type: client, org: o, admin_port: 9}"],
                "participants[1].admin_port",
                "server and hubs",
            ),
            (
                &["{name: x.zip, type: client, org: o}"],
                "participants[1].name",
                "reserved",
            ),
        ];
        for (lines, field, says) in cases {
            let yml = tiered(lines);
            let err = Project::parse(&yml).expect_err(&yml);
            assert_eq!(err.field(), *field, "{err} for\n{yml}");
            assert!(err.to_string().contains(says), "{err} for\n{yml}");
        }
        let server_region = "api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o, region: eu}\n";
        let err = Project::parse(server_region).unwrap_err();
        assert_eq!(err.field(), "participants[0].region", "{err}");
        assert!(
            err.to_string().contains("the server has no region"),
            "{err}"
        );
    }

    #[test]
    fn examples_copy_is_the_sample() {
        let ex = include_str!("../../examples/project.yml");
        assert_eq!(ex, SAMPLE_PROJECT_YML);
    }
}
