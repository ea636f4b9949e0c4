//! Provisioning: a checked [`Project`] → `workspace/<project>/prod_NN/` with one signed
//! startup kit per participant, zips and a `docker-compose.yml`. The root CA lives in
//! `workspace/<project>/state/` (never in a kit) and is reused by later runs.
//!
//! Layout of `prod_NN/`: `<name>/` and `<name>.zip` for the server and the other
//! participants without a region; one folder per region, `<region>/`, holding its hub's kit
//! (`<region>/<region>/`, a hub being named after its region), its sites' and admins'
//! (`<region>/<name>/`) and their zips; `docker-compose.yml`. Region folders never collide
//! with kit folders: hub names are unique in the project.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use flare_crypto::folder::{FolderError, Purpose, write_folder_signature};
use flare_crypto::{
    CaParams, CertError, CertificateAuthority, Identity, KeyError, ParticipantCertParams, Role,
    RootCa, SigningSecret,
};
use ring::rand::SecureRandom;
use time::OffsetDateTime;

use crate::config::{
    NODE_CONFIG_VERSION, NodeConfig, PeerAddr, default_authorization, default_privacy,
    default_resources,
};
use crate::kit::{
    ADMIN_SCRIPT, CERT_FILE, KEY_FILE, NODE_CONFIG_FILE, ROOT_CA_FILE, SEALING_KEY_FILE,
    START_SCRIPT, STOP_SCRIPT,
};
use crate::project::{Participant, Project};

/// The folder under `workspace/<project>/` that keeps the root CA between runs.
pub const STATE_DIR: &str = "state";
/// The root CA's secret key in the state folder (mode 0600).
pub const CA_KEY_FILE: &str = "rootCA.key";
/// How long a new root CA lasts (days).
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// The most `prod_NN` folders.
const MAX_PROD: u32 = 9999;

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// A file or folder could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A key could not be made or read.
    #[error("{path}: {source}")]
    Key {
        /// The key file, or the participant.
        path: PathBuf,
        /// The cause.
        #[source]
        source: KeyError,
    },
    /// A certificate could not be made, or the stored root CA is unusable.
    #[error("certificate: {0}")]
    Cert(#[from] CertError),
    /// A kit could not be signed.
    #[error("signing kit: {0}")]
    Sign(#[from] FolderError),
    /// A zip could not be written.
    #[error("{path}: {source}")]
    Zip {
        /// The zip file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: zip::result::ZipError,
    },
    /// Every `prod_NN` number is taken.
    #[error("{0}: no free prod_NN folder number")]
    NoProdNumber(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a provisioning run made.
#[derive(Clone, Debug)]
pub struct ProvisionOutput {
    /// `workspace/<project>/prod_NN`.
    pub prod_dir: PathBuf,
    /// Each participant's name and folder (holding `startup/`, `local/`, `transfer/`):
    /// `prod_NN/<name>`, or `prod_NN/<region>/<name>` for a region's members and hubs.
    pub kits: Vec<(String, PathBuf)>,
    /// The zips written.
    pub zips: Vec<PathBuf>,
    /// The compose file written.
    pub docker_compose: Option<PathBuf>,
    /// Whether the root CA was made in this run (false: reused from `state/`).
    pub new_ca: bool,
}

/// Writes a file that only its owner may read.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), ProvisionError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(contents).map_err(io_err(path))
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), ProvisionError> {
    fs::write(path, contents).map_err(io_err(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    Ok(())
}

fn random16(rng: &dyn SecureRandom) -> Result<[u8; 16], ProvisionError> {
    let mut b = [0u8; 16];
    rng.fill(&mut b).map_err(|_| ProvisionError::Key {
        path: PathBuf::from("<random source>"),
        source: KeyError::Random,
    })?;
    Ok(b)
}

/// Loads the root CA from `state/`, or makes and stores a new one.
fn root_ca(
    project: &Project,
    state: &Path,
    now: OffsetDateTime,
    rng: &dyn SecureRandom,
) -> Result<(CertificateAuthority, bool), ProvisionError> {
    let cert_path = state.join(ROOT_CA_FILE);
    let key_path = state.join(CA_KEY_FILE);
    if cert_path.exists() {
        let pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem =
            zeroize::Zeroizing::new(fs::read_to_string(&key_path).map_err(io_err(&key_path))?);
        let key =
            SigningSecret::from_pkcs8_pem(&key_pem).map_err(|source| ProvisionError::Key {
                path: key_path.clone(),
                source,
            })?;
        // The stored CA must still be valid.
        RootCa::from_pem(&pem, to_system(now))?;
        return Ok((CertificateAuthority::from_pem(&pem, key)?, false));
    }
    fs::create_dir_all(state).map_err(io_err(state))?;
    let key = SigningSecret::generate(rng).map_err(|source| ProvisionError::Key {
        path: key_path.clone(),
        source,
    })?;
    let org = project.server().map(|s| s.org.clone());
    let ca = CertificateAuthority::create(
        key,
        &CaParams {
            common_name: project.name.clone(),
            org,
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(CA_VALIDITY_DAYS),
            serial: random16(rng)?,
        },
    )?;
    let key_pem = ca
        .secret()
        .to_pkcs8_pem()
        .map_err(|source| ProvisionError::Key {
            path: key_path.clone(),
            source,
        })?;
    write_secret_file(&key_path, key_pem.as_bytes())?;
    write_file(&cert_path, ca.cert().pem.as_bytes(), 0o644)?;
    Ok((ca, true))
}

fn to_system(t: OffsetDateTime) -> SystemTime {
    let secs = t.unix_timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

/// The next free `prod_NN` number under `project_dir`.
fn next_prod(project_dir: &Path) -> Result<u32, ProvisionError> {
    let mut next = 0;
    if project_dir.exists() {
        for entry in fs::read_dir(project_dir).map_err(io_err(project_dir))? {
            let entry = entry.map_err(io_err(project_dir))?;
            let name = entry.file_name();
            let Some(n) = name.to_str().and_then(|s| s.strip_prefix("prod_")) else {
                continue;
            };
            if let Ok(n) = n.parse::<u32>() {
                next = next.max(n + 1);
            }
        }
    }
    if next > MAX_PROD {
        return Err(ProvisionError::NoProdNumber(project_dir.to_path_buf()));
    }
    Ok(next)
}

/// A multiaddr for a host name or IP literal and a port.
pub fn multiaddr(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => format!("/ip4/{ip}/tcp/{port}"),
        Ok(IpAddr::V6(ip)) => format!("/ip6/{ip}/tcp/{port}"),
        Err(_) => format!("/dns/{host}/tcp/{port}"),
    }
}

fn listen_addr(p: &Participant, port: u16) -> String {
    multiaddr(&p.listen_host.to_string(), port)
}

fn node_config(project: &Project, p: &Participant, ids: &[(PathBuf, String)]) -> NodeConfig {
    let addr_of = |q: &Participant, admin: bool| -> PeerAddr {
        let port = if admin {
            q.admin_port.unwrap_or(q.port)
        } else {
            q.port
        };
        PeerAddr {
            name: q.name.clone(),
            peer_id: ids
                .iter()
                .find(|(dir, _)| *dir == q.kit_dir())
                .map(|(_, id)| id.clone())
                .unwrap_or_default(),
            addrs: q.host_names.iter().map(|h| multiaddr(h, port)).collect(),
        }
    };
    let nobody = || PeerAddr {
        name: String::new(),
        peer_id: String::new(),
        addrs: vec![],
    };
    // The node this one connects to: the server, or for a region's members its hub.
    let upstream = |admin: bool| {
        project
            .upstream(p)
            .map_or_else(nobody, |u| addr_of(u, admin))
    };
    // Relays for a member of the tier-1 server: relay nodes, then the server. A region's
    // members fall back to their hub only, which runs its region's relay.
    let relays = || -> Vec<PeerAddr> {
        match project.upstream(p) {
            Some(u) if u.role == Role::Hub => vec![addr_of(u, false)],
            _ => {
                let mut relays: Vec<PeerAddr> = project
                    .participants
                    .iter()
                    .filter(|r| r.role == Role::Relay)
                    .map(|r| addr_of(r, false))
                    .collect();
                relays.extend(project.server().map(|s| addr_of(s, false)));
                relays
            }
        }
    };
    let own_listen = || {
        let mut listen = vec![listen_addr(p, p.port)];
        if let Some(a) = p.admin_port.filter(|a| *a != p.port) {
            listen.push(listen_addr(p, a));
        }
        listen
    };
    let mut advertise = Vec::new();
    let (listen, server, relays) = match p.role {
        Role::Server => (own_listen(), addr_of(p, false), vec![]),
        Role::Relay => (vec![listen_addr(p, p.port)], upstream(false), vec![]),
        Role::Client => (vec![listen_addr(p, p.port)], upstream(false), relays()),
        Role::Hub => {
            advertise = addr_of(p, false).addrs;
            (own_listen(), upstream(false), relays())
        }
        Role::Admin(_) => (vec![], upstream(true), vec![]),
    };
    NodeConfig {
        format_version: NODE_CONFIG_VERSION,
        project: project.name.clone(),
        name: p.name.clone(),
        org: p.org.clone(),
        role: p.role,
        region: p.region.clone(),
        listen,
        server,
        relays,
        advertise,
    }
}

const START_SH: &str = r#"#!/usr/bin/env sh
# Starts this Flare node in the background. Set FLARE_NODE to use another binary.
DIR="$(cd "$(dirname "$0")/.." && pwd)"
FLARE_NODE="${FLARE_NODE:-flare-node}"
if [ -f "$DIR/node.pid" ] && kill -0 "$(cat "$DIR/node.pid")" 2>/dev/null; then
  echo "already running (pid $(cat "$DIR/node.pid"))"; exit 1
fi
nohup "$FLARE_NODE" --kit "$DIR/startup" >>"$DIR/log.txt" 2>&1 &
echo $! > "$DIR/node.pid"
echo "started $(basename "$DIR") (pid $!), log: $DIR/log.txt"
"#;

const STOP_SH: &str = r#"#!/usr/bin/env sh
# Stops the Flare node started by start.sh.
DIR="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -f "$DIR/node.pid" ]; then echo "not running (no node.pid)"; exit 0; fi
PID="$(cat "$DIR/node.pid")"
kill "$PID" 2>/dev/null && echo "stopped $(basename "$DIR") (pid $PID)"
rm -f "$DIR/node.pid"
"#;

const FL_ADMIN_SH: &str = r#"#!/usr/bin/env sh
# The Flare admin console for this admin kit, e.g. `fl_admin.sh list`.
DIR="$(cd "$(dirname "$0")/.." && pwd)"
FLARE_NODE="${FLARE_NODE:-flare-node}"
exec "$FLARE_NODE" admin --kit "$DIR/startup" "$@"
"#;

/// Writes one participant's folder (startup/, local/, transfer/) and signs startup/.
#[allow(clippy::too_many_arguments)]
fn write_kit(
    dir: &Path,
    ca: &CertificateAuthority,
    p: &Participant,
    id: &Identity,
    config: &NodeConfig,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
    rng: &dyn SecureRandom,
) -> Result<(), ProvisionError> {
    let startup = dir.join("startup");
    let local = dir.join("local");
    let transfer = dir.join("transfer");
    for d in [&startup, &local, &transfer] {
        fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let key_err = |source| ProvisionError::Key {
        path: PathBuf::from(&p.name),
        source,
    };
    let cert = ca.issue(&ParticipantCertParams {
        name: p.name.clone(),
        org: p.org.clone(),
        role: p.role,
        region: p.region.clone(),
        signing_public: id.signing.public().map_err(key_err)?,
        sealing_public: id.sealing.public(),
        not_before: now - time::Duration::hours(1),
        not_after,
        serial: random16(rng)?,
    })?;
    write_file(&startup.join(ROOT_CA_FILE), ca.cert().pem.as_bytes(), 0o644)?;
    write_file(&startup.join(CERT_FILE), cert.pem.as_bytes(), 0o644)?;
    write_secret_file(
        &startup.join(KEY_FILE),
        id.signing.to_pkcs8_pem().map_err(key_err)?.as_bytes(),
    )?;
    write_secret_file(
        &startup.join(SEALING_KEY_FILE),
        id.sealing.to_pkcs8_pem().map_err(key_err)?.as_bytes(),
    )?;
    let json = |v: &serde_json::Value| {
        let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
        s.push('\n');
        s
    };
    let cfg = serde_json::to_value(config).unwrap_or_default();
    write_file(
        &startup.join(NODE_CONFIG_FILE),
        json(&cfg).as_bytes(),
        0o644,
    )?;
    match p.role {
        Role::Admin(_) => write_file(&startup.join(ADMIN_SCRIPT), FL_ADMIN_SH.as_bytes(), 0o755)?,
        _ => {
            write_file(&startup.join(START_SCRIPT), START_SH.as_bytes(), 0o755)?;
            write_file(&startup.join(STOP_SCRIPT), STOP_SH.as_bytes(), 0o755)?;
        }
    }
    write_file(
        &local.join("authorization.json"),
        json(&default_authorization()).as_bytes(),
        0o644,
    )?;
    write_file(
        &local.join(crate::config::PRIVACY_SAMPLE),
        json(&default_privacy()).as_bytes(),
        0o644,
    )?;
    write_file(
        &local.join("resources.json"),
        json(&default_resources(
            matches!(p.role, Role::Server | Role::Hub),
            matches!(p.role, Role::Client | Role::Hub),
        ))
        .as_bytes(),
        0o644,
    )?;
    write_folder_signature(&startup, Purpose::Kit, ca.secret())?;
    Ok(())
}

fn docker_compose(project: &Project, image: &str) -> String {
    let mut s = format!(
        "# Runs every node of project {:?} on this host (host networking, as the kits name\n\
         # 127.0.0.1/host names). Build or pull the image first. Generated by flare-node provision.\n\
         services:\n",
        project.name
    );
    for p in project
        .participants
        .iter()
        .filter(|p| !matches!(p.role, Role::Admin(_)))
    {
        let n = p.service_name();
        let d = p.kit_dir();
        let d = d.display();
        s.push_str(&format!(
            "  {n}:\n    image: \"{image}\"\n    container_name: \"{n}\"\n    network_mode: host\n    \
             volumes:\n      - \"./{d}:/workspace/{d}\"\n    working_dir: \"/workspace/{d}\"\n    \
             command: [\"flare-node\", \"--kit\", \"/workspace/{d}/startup\"]\n    restart: unless-stopped\n"
        ));
    }
    s
}

fn zip_dir(src: &Path, name: &str, out: &Path) -> Result<(), ProvisionError> {
    let zerr = |source| ProvisionError::Zip {
        path: out.to_path_buf(),
        source,
    };
    let file = fs::File::create(out).map_err(io_err(out))?;
    let mut zw = zip::ZipWriter::new(file);
    fn add(
        zw: &mut zip::ZipWriter<fs::File>,
        dir: &Path,
        prefix: &str,
        out: &Path,
    ) -> Result<(), ProvisionError> {
        let zerr = |source| ProvisionError::Zip {
            path: out.to_path_buf(),
            source,
        };
        let mut entries: Vec<_> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .collect::<Result<_, _>>()
            .map_err(io_err(dir))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = format!("{prefix}/{}", e.file_name().to_string_lossy());
            let meta = e.metadata().map_err(io_err(&path))?;
            #[cfg(unix)]
            let mode = {
                use std::os::unix::fs::PermissionsExt;
                meta.permissions().mode() & 0o777
            };
            #[cfg(not(unix))]
            let mode = 0o644;
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .unix_permissions(mode);
            if meta.is_dir() {
                zw.add_directory(rel.as_str(), opts).map_err(zerr)?;
                add(zw, &path, &rel, out)?;
            } else {
                zw.start_file(rel.as_str(), opts).map_err(zerr)?;
                let bytes = fs::read(&path).map_err(io_err(&path))?;
                zw.write_all(&bytes).map_err(io_err(out))?;
            }
        }
        Ok(())
    }
    zw.add_directory(name, zip::write::SimpleFileOptions::default())
        .map_err(zerr)?;
    add(&mut zw, src, name, out)?;
    zw.finish().map_err(zerr)?;
    Ok(())
}

/// [`provision`] at the current time with the OS random source (for the CLI).
pub fn provision_now(
    project: &Project,
    workspace: &Path,
) -> Result<ProvisionOutput, ProvisionError> {
    provision(
        project,
        workspace,
        OffsetDateTime::now_utc(),
        &ring::rand::SystemRandom::new(),
    )
}

/// Provisions `project` into `workspace/<project>/prod_NN` (the next free NN).
///
/// `now` sets certificate dates; `rng` makes keys and serials. Builds into a hidden folder and
/// renames it into place at the end, so a failed run leaves no half-made `prod_NN`.
pub fn provision(
    project: &Project,
    workspace: &Path,
    now: OffsetDateTime,
    rng: &dyn SecureRandom,
) -> Result<ProvisionOutput, ProvisionError> {
    let project_dir = workspace.join(&project.name);
    fs::create_dir_all(&project_dir).map_err(io_err(&project_dir))?;
    let (ca, new_ca) = root_ca(project, &project_dir.join(STATE_DIR), now, rng)?;
    let root = RootCa::from_pem(&ca.cert().pem, to_system(now))?;
    let ca_end = OffsetDateTime::from_unix_timestamp(root.not_after())
        .unwrap_or(now + time::Duration::days(1));
    let not_after =
        (now + time::Duration::days(i64::from(project.builders.validity_days))).min(ca_end);

    let n = next_prod(&project_dir)?;
    let prod_name = format!("prod_{n:02}");
    let prod_dir = project_dir.join(&prod_name);
    let tmp = project_dir.join(format!(".{prod_name}.partial"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;

    let mut ids = Vec::with_capacity(project.participants.len());
    for p in &project.participants {
        let id = Identity::generate(rng).map_err(|source| ProvisionError::Key {
            path: PathBuf::from(&p.name),
            source,
        })?;
        ids.push(id);
    }
    // PeerIds by kit folder, which is unique where names are only unique per region.
    let names: Vec<(PathBuf, String)> = project
        .participants
        .iter()
        .zip(&ids)
        .map(|(p, id)| {
            let pid = id.peer_id().map(|x| x.to_string()).unwrap_or_default();
            (p.kit_dir(), pid)
        })
        .collect();
    let mut kits = Vec::new();
    for (p, id) in project.participants.iter().zip(&ids) {
        let cfg = node_config(project, p, &names);
        write_kit(
            &tmp.join(p.kit_dir()),
            &ca,
            p,
            id,
            &cfg,
            now,
            not_after,
            rng,
        )?;
        kits.push((p.name.clone(), prod_dir.join(p.kit_dir())));
    }
    let mut compose = None;
    if let Some(image) = &project.builders.docker_compose {
        let path = tmp.join("docker-compose.yml");
        write_file(&path, docker_compose(project, image).as_bytes(), 0o644)?;
        compose = Some(prod_dir.join("docker-compose.yml"));
    }
    let mut zips = Vec::new();
    if project.builders.zip {
        for p in &project.participants {
            let out = tmp.join(p.zip_path());
            zip_dir(&tmp.join(p.kit_dir()), &p.name, &out)?;
            zips.push(prod_dir.join(p.zip_path()));
        }
    }
    // rename(2) refuses a non-empty target, so an existing prod_NN is never overwritten.
    fs::rename(&tmp, &prod_dir).map_err(io_err(&prod_dir))?;
    tracing::info!(prod_dir = %prod_dir.display(), participants = kits.len(), new_ca, "provisioned");
    Ok(ProvisionOutput {
        prod_dir,
        kits,
        zips,
        docker_compose: compose,
        new_ca,
    })
}
