//! The project CA and participant certificates: issue with rcgen, verify the chain with
//! rustls-webpki, then read the fields with x509-parser and check PeerId, role and CA dates.
//!
//! Regions (tiered federations): a certificate may name the region its participant belongs to
//! (`eu`, or `eu.de` for a region nested in `eu`). The tier-1 server and its direct members
//! have none. A hub serves one region and always carries it: it is the server of that region
//! and a member of the parent region (none for `eu`, `eu` for `eu.de`). [`check_region`] is
//! the admission rule every network endpoint applies: a node living in region `local` admits
//! peers of `local` and hubs whose region's parent is `local`, nothing else. So a hub's
//! certificate is scoped to its region: it can serve only its own region and join only the
//! parent region, and it never passes as a site (its role is [`Role::Hub`]).

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p_identity::PeerId;
use pkcs8::der::asn1::{OctetStringRef, Utf8StringRef};
use pkcs8::der::{Decode, Encode};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, PublicKeyData, SerialNumber,
    SigningKey,
};
use ring::signature::Ed25519KeyPair;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use webpki::{EndEntityCert, KeyUsage, anchor_from_trusted_cert};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::identity::{KeyError, SealingPublicKey, SigningPublicKey, SigningSecret};
use crate::oid;

/// The largest certificate or PEM text accepted from outside (bytes).
pub const MAX_CERT_LEN: usize = 64 * 1024;

/// Why a certificate could not be issued or was rejected.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The signature does not verify: the certificate was forged or its bytes were altered.
    #[error("bad certificate signature (forged or tampered)")]
    BadSignature(#[source] webpki::Error),
    /// The certificate's validity period has ended.
    #[error("certificate expired")]
    Expired(#[source] webpki::Error),
    /// The certificate's validity period has not begun.
    #[error("certificate not yet valid")]
    NotYetValid(#[source] webpki::Error),
    /// The certificate was not issued by this project's root CA.
    #[error("certificate issued by an unknown CA")]
    UnknownIssuer(#[source] webpki::Error),
    /// The chain verifier rejected the certificate for another reason.
    #[error("certificate rejected: {0}")]
    Rejected(#[source] webpki::Error),
    /// The certificate's key is not the key of the connection's PeerId.
    #[error("certificate key belongs to {actual}, not to peer {expected}")]
    PeerIdMismatch {
        /// The PeerId the transport authenticated.
        expected: Box<PeerId>,
        /// The PeerId of the key in the certificate.
        actual: Box<PeerId>,
    },
    /// The certificate's role is not one allowed here.
    #[error("certificate role {actual} is not allowed here (expected one of {expected:?})")]
    WrongRole {
        /// The roles that were allowed.
        expected: Vec<RoleKind>,
        /// The role in the certificate.
        actual: Role,
    },
    /// A region name breaks the naming rules, or a role's region rule is broken (a hub needs a
    /// region, the server has none); found when issuing a certificate.
    #[error("bad region: {0}")]
    BadRegion(String),
    /// The peer's region does not let it in where this node lives (see [`check_region`]).
    #[error(
        "{peer} ({role}, region {}) is not admitted in region {}: a node admits members of its own region and hubs of the regions directly below it",
        region_text(.peer_region.as_deref()),
        region_text(.local.as_deref())
    )]
    WrongRegion {
        /// The peer's name (CN).
        peer: String,
        /// The peer's role.
        role: Role,
        /// The peer's region.
        peer_region: Option<String>,
        /// The region of the node that refused it.
        local: Option<String>,
    },
    /// The root CA certificate's own validity period has ended.
    #[error("root CA certificate expired")]
    CaExpired,
    /// The root CA certificate's own validity period has not begun.
    #[error("root CA certificate not yet valid")]
    CaNotYetValid,
    /// The bytes are not a well-formed certificate of the shape Flare issues.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// A key could not be used.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// rcgen failed to build the certificate.
    #[error("could not build certificate: {0}")]
    Build(#[from] rcgen::Error),
}

/// What a participant does in the federation; carried in the certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The light server: job lifecycle, admin access, relay.
    Server,
    /// A training site.
    Client,
    /// A relay-only node.
    Relay,
    /// A person who submits and manages jobs, with their rights.
    Admin(AdminRole),
    /// The hub of a region (tiered federations): the server of its region downward, a member
    /// of the parent region upward. Its certificate always names its region.
    Hub,
}

/// The rights of an admin (FLARE's admin roles).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdminRole {
    /// All rights in the project.
    ProjectAdmin,
    /// Rights over the sites of their own org.
    OrgAdmin,
    /// Submits and manages their own jobs.
    Lead,
    /// Read-only.
    Member,
}

/// A role without the admin's rights, for "which roles may do this" checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RoleKind {
    /// [`Role::Server`].
    Server,
    /// [`Role::Client`].
    Client,
    /// [`Role::Relay`].
    Relay,
    /// Any [`Role::Admin`].
    Admin,
    /// [`Role::Hub`].
    Hub,
}

impl AdminRole {
    /// The name used in project.yml and certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::ProjectAdmin => "project_admin",
            AdminRole::OrgAdmin => "org_admin",
            AdminRole::Lead => "lead",
            AdminRole::Member => "member",
        }
    }
}

impl FromStr for AdminRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "project_admin" => AdminRole::ProjectAdmin,
            "org_admin" => AdminRole::OrgAdmin,
            "lead" => AdminRole::Lead,
            "member" => AdminRole::Member,
            other => {
                return Err(format!(
                    "unknown admin role {other:?} (expected project_admin, org_admin, lead or member)"
                ));
            }
        })
    }
}

impl Role {
    /// The role without admin rights.
    pub fn kind(self) -> RoleKind {
        match self {
            Role::Server => RoleKind::Server,
            Role::Client => RoleKind::Client,
            Role::Relay => RoleKind::Relay,
            Role::Admin(_) => RoleKind::Admin,
            Role::Hub => RoleKind::Hub,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Server => f.write_str("server"),
            Role::Client => f.write_str("client"),
            Role::Relay => f.write_str("relay"),
            Role::Admin(r) => write!(f, "admin:{}", r.as_str()),
            Role::Hub => f.write_str("hub"),
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "server" => Ok(Role::Server),
            "client" => Ok(Role::Client),
            "relay" => Ok(Role::Relay),
            "hub" => Ok(Role::Hub),
            _ => match s.strip_prefix("admin:") {
                Some(rights) => rights.parse().map(Role::Admin),
                None => Err(format!("unknown role {s:?}")),
            },
        }
    }
}

impl serde::Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The longest component of a region name (bytes).
pub const MAX_REGION_COMPONENT: usize = 32;
/// The most components of a region name (`eu.de` has two).
pub const MAX_REGION_DEPTH: usize = 8;

/// Checks a region name: components of 1 to [`MAX_REGION_COMPONENT`] bytes of `[a-z0-9-]`,
/// joined by `.` for nesting (`eu`, `eu.de`), at most [`MAX_REGION_DEPTH`] of them.
pub fn check_region_name(region: &str) -> Result<(), CertError> {
    let bad = |problem: &str| Err(CertError::BadRegion(format!("{region:?}: {problem}")));
    if region.split('.').count() > MAX_REGION_DEPTH {
        return bad(&format!("at most {MAX_REGION_DEPTH} dotted components"));
    }
    for part in region.split('.') {
        if part.is_empty() || part.len() > MAX_REGION_COMPONENT {
            return bad(&format!(
                "each dotted component must be 1 to {MAX_REGION_COMPONENT} bytes"
            ));
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad("only a-z, 0-9 and '-' are allowed, components joined by '.'");
        }
    }
    Ok(())
}

/// The region directly above `region`: `None` (tier 1) for `eu`, `Some("eu")` for `eu.de`.
pub fn region_parent(region: &str) -> Option<&str> {
    region.rsplit_once('.').map(|(parent, _)| parent)
}

/// Checks the region a certificate of `role` carries: a valid name, present for a hub,
/// absent for the server.
fn check_role_region(role: Role, region: Option<&str>) -> Result<(), CertError> {
    match (role, region) {
        (Role::Hub, None) => Err(CertError::BadRegion(
            "a hub certificate must name the region it serves".into(),
        )),
        (Role::Server, Some(r)) => Err(CertError::BadRegion(format!(
            "{r:?}: the server certificate has no region (the tier-1 server serves the whole federation)"
        ))),
        (_, Some(r)) => check_region_name(r),
        (_, None) => Ok(()),
    }
}

fn region_text(region: Option<&str>) -> String {
    match region {
        Some(r) => format!("{r:?}"),
        None => "none (tier 1)".into(),
    }
}

/// Whether a node living in region `local` (`None`: tier 1) admits `peer`.
///
/// Yes when the peer belongs to the same region, or when it is a [`Role::Hub`] whose region's
/// parent is `local` (the hub of a region directly below, joining as a member). Everything
/// else is refused with [`CertError::WrongRegion`]: the tier-1 server admits hubs `eu`, `us`
/// and region-less members; a site of `eu` admits its hub, other `eu` sites and admins, but
/// not a `us` site, not hub `us`, and not the tier-1 server.
pub fn check_region(local: Option<&str>, peer: &ParticipantCert) -> Result<(), CertError> {
    let theirs = peer.region.as_deref();
    let hub_from_below = peer.role == Role::Hub && theirs.map(region_parent) == Some(local);
    if theirs == local || hub_from_below {
        Ok(())
    } else {
        Err(CertError::WrongRegion {
            peer: peer.name.clone(),
            role: peer.role,
            peer_region: peer.region.clone(),
            local: local.map(str::to_string),
        })
    }
}

/// An Ed25519 secret in the shape rcgen signs with.
struct RcgenSigner {
    pair: Ed25519KeyPair,
    public: SigningPublicKey,
}

impl RcgenSigner {
    fn new(secret: &SigningSecret) -> Result<Self, KeyError> {
        Ok(Self {
            pair: secret.ring_keypair()?,
            public: secret.public()?,
        })
    }
}

impl PublicKeyData for RcgenSigner {
    fn der_bytes(&self) -> &[u8] {
        self.public.as_bytes()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

impl SigningKey for RcgenSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.pair.sign(msg).as_ref().to_vec())
    }
}

impl PublicKeyData for SigningPublicKey {
    fn der_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// Makes a positive 16-byte serial with no leading zero byte from random bytes handed in.
fn serial(bytes: [u8; 16]) -> SerialNumber {
    let mut b = bytes;
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

/// What the root CA certificate says.
#[derive(Clone, Debug)]
pub struct CaParams {
    /// The CA's common name, e.g. the project name.
    pub common_name: String,
    /// The org that runs the project.
    pub org: Option<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Random bytes for the serial number.
    pub serial: [u8; 16],
}

/// What a participant certificate says.
#[derive(Clone, Debug)]
pub struct ParticipantCertParams {
    /// The participant's unique name (CN).
    pub name: String,
    /// The participant's org (O).
    pub org: String,
    /// The participant's role.
    pub role: Role,
    /// The region the participant belongs to (a hub: the region it serves); `None` for the
    /// tier-1 server and its direct members. Required for a hub, refused for the server.
    pub region: Option<String>,
    /// The participant's Ed25519 key (its libp2p identity).
    pub signing_public: SigningPublicKey,
    /// The participant's x25519 sealing key.
    pub sealing_public: SealingPublicKey,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Random bytes for the serial number.
    pub serial: [u8; 16],
}

/// A certificate in both encodings.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// DER bytes.
    pub der: Vec<u8>,
    /// PEM text, label `CERTIFICATE`.
    pub pem: String,
}

/// The project root CA with its secret key: issues participant certificates.
#[derive(Debug)]
pub struct CertificateAuthority {
    secret: SigningSecret,
    cert: IssuedCert,
}

impl CertificateAuthority {
    /// Makes a new self-signed root CA certificate for `secret`.
    pub fn create(secret: SigningSecret, params: &CaParams) -> Result<Self, CertError> {
        let mut cp = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, params.common_name.as_str());
        if let Some(org) = &params.org {
            dn.push(DnType::OrganizationName, org.as_str());
        }
        cp.distinguished_name = dn;
        cp.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        cp.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        cp.not_before = params.not_before;
        cp.not_after = params.not_after;
        cp.serial_number = Some(serial(params.serial));
        let signer = RcgenSigner::new(&secret)?;
        let cert = cp.self_signed(&signer)?;
        Ok(Self {
            secret,
            cert: IssuedCert {
                der: cert.der().to_vec(),
                pem: cert.pem(),
            },
        })
    }

    /// Reloads a CA from its certificate PEM and secret key (for a later provisioning run).
    pub fn from_pem(cert_pem: &str, secret: SigningSecret) -> Result<Self, CertError> {
        let der = pem_to_der(cert_pem)?;
        let parsed = parse_strict(&der)?;
        if !parsed.is_ca() {
            return Err(CertError::Malformed("not a CA certificate".into()));
        }
        let public = ed25519_spki(&parsed)?;
        if public != secret.public()? {
            return Err(CertError::Key(KeyError::PublicKeyMismatch));
        }
        Ok(Self {
            secret,
            cert: IssuedCert {
                der,
                pem: cert_pem.to_string(),
            },
        })
    }

    /// The CA certificate.
    pub fn cert(&self) -> &IssuedCert {
        &self.cert
    }

    /// The CA's secret key (signs kits).
    pub fn secret(&self) -> &SigningSecret {
        &self.secret
    }

    /// Issues a participant certificate. The region must fit the role (see
    /// [`ParticipantCertParams::region`]) and be a valid name ([`check_region_name`]).
    pub fn issue(&self, p: &ParticipantCertParams) -> Result<IssuedCert, CertError> {
        check_role_region(p.role, p.region.as_deref())?;
        let role = p.role.to_string();
        let mut extensions = vec![
            utf8_extension(oid::ROLE_EXT, &role)?,
            octet_extension(oid::SEALING_KEY_EXT, p.sealing_public.as_bytes())?,
        ];
        if let Some(region) = &p.region {
            extensions.push(utf8_extension(oid::REGION_EXT, region)?);
        }
        self.sign(p, extensions)
    }

    /// Signs a participant certificate with exactly these Flare extensions (unchecked: tests
    /// use it to make malformed ones).
    fn sign(
        &self,
        p: &ParticipantCertParams,
        extensions: Vec<CustomExtension>,
    ) -> Result<IssuedCert, CertError> {
        let signer = RcgenSigner::new(&self.secret)?;
        let issuer =
            Issuer::from_ca_cert_der(&CertificateDer::from(self.cert.der.as_slice()), signer)?;
        let mut cp = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, p.name.as_str());
        dn.push(DnType::OrganizationName, p.org.as_str());
        cp.distinguished_name = dn;
        cp.is_ca = IsCa::ExplicitNoCa;
        cp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        cp.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        cp.use_authority_key_identifier_extension = true;
        cp.not_before = p.not_before;
        cp.not_after = p.not_after;
        cp.serial_number = Some(serial(p.serial));
        cp.custom_extensions = extensions;
        let cert = cp.signed_by(&p.signing_public, &issuer)?;
        Ok(IssuedCert {
            der: cert.der().to_vec(),
            pem: cert.pem(),
        })
    }
}

/// A non-critical extension holding a UTF8String.
fn utf8_extension(oid: &[u64], text: &str) -> Result<CustomExtension, CertError> {
    let der = Utf8StringRef::new(text)
        .and_then(|s| s.to_der())
        .map_err(|e| CertError::Malformed(e.to_string()))?;
    let mut ext = CustomExtension::from_oid_content(oid, der);
    ext.set_criticality(false);
    Ok(ext)
}

/// A non-critical extension holding an OCTET STRING.
fn octet_extension(oid: &[u64], bytes: &[u8]) -> Result<CustomExtension, CertError> {
    let der = OctetStringRef::new(bytes)
        .and_then(|s| s.to_der())
        .map_err(|e| CertError::Malformed(e.to_string()))?;
    let mut ext = CustomExtension::from_oid_content(oid, der);
    ext.set_criticality(false);
    Ok(ext)
}

/// A participant certificate that chains to the root CA, with its fields read.
#[derive(Clone, Debug)]
pub struct ParticipantCert {
    /// The participant's name (CN).
    pub name: String,
    /// The participant's org (O).
    pub org: String,
    /// The participant's role.
    pub role: Role,
    /// The participant's region (a hub: the region it serves); `None`: tier 1. Checked like
    /// [`ParticipantCertParams::region`] when read.
    pub region: Option<String>,
    /// The Ed25519 key in the certificate.
    pub signing_public: SigningPublicKey,
    /// The PeerId of that key.
    pub peer_id: PeerId,
    /// The x25519 key to seal messages to this participant.
    pub sealing_public: SealingPublicKey,
    /// Start of validity (Unix seconds).
    pub not_before: i64,
    /// End of validity (Unix seconds).
    pub not_after: i64,
    /// The serial number bytes.
    pub serial: Vec<u8>,
    /// The DER bytes, to hand to peers.
    pub der: Vec<u8>,
}

impl ParticipantCert {
    /// Checks that this certificate's key is the key of `peer`.
    pub fn check_peer_id(&self, peer: &PeerId) -> Result<(), CertError> {
        if &self.peer_id == peer {
            Ok(())
        } else {
            Err(CertError::PeerIdMismatch {
                expected: Box::new(*peer),
                actual: Box::new(self.peer_id),
            })
        }
    }

    /// Checks that this certificate's role is one of `allowed`.
    pub fn check_role(&self, allowed: &[RoleKind]) -> Result<(), CertError> {
        if allowed.contains(&self.role.kind()) {
            Ok(())
        } else {
            Err(CertError::WrongRole {
                expected: allowed.to_vec(),
                actual: self.role,
            })
        }
    }
}

/// The project root CA as a trust anchor (no secret): verifies participant certificates.
#[derive(Clone, Debug)]
pub struct RootCa {
    der: Vec<u8>,
    public: SigningPublicKey,
    name: String,
    not_before: i64,
    not_after: i64,
}

fn unix(now: SystemTime) -> i64 {
    match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

impl RootCa {
    /// Reads `rootCA.pem` and checks the CA's own validity period at `now`.
    pub fn from_pem(pem: &str, now: SystemTime) -> Result<Self, CertError> {
        Self::from_der(&pem_to_der(pem)?, now)
    }

    /// Reads a DER root CA certificate and checks the CA's own validity period at `now`.
    pub fn from_der(der: &[u8], now: SystemTime) -> Result<Self, CertError> {
        let parsed = parse_strict(der)?;
        if !parsed.is_ca() {
            return Err(CertError::Malformed("root certificate is not a CA".into()));
        }
        let public = ed25519_spki(&parsed)?;
        // The trust anchor must be self-signed by its own key.
        let tbs = parsed.tbs_certificate.as_ref();
        if !public.verify(tbs, &parsed.signature_value.data) {
            return Err(CertError::Malformed(
                "root CA self-signature does not verify".into(),
            ));
        }
        let t = unix(now);
        if t < parsed.validity().not_before.timestamp() {
            return Err(CertError::CaNotYetValid);
        }
        if t > parsed.validity().not_after.timestamp() {
            return Err(CertError::CaExpired);
        }
        let name = first_attr(parsed.subject().iter_common_name()).unwrap_or_default();
        // webpki must accept it as an anchor too.
        let cd = CertificateDer::from(der);
        anchor_from_trusted_cert(&cd).map_err(|e| CertError::Malformed(e.to_string()))?;
        Ok(Self {
            der: der.to_vec(),
            public,
            name,
            not_before: parsed.validity().not_before.timestamp(),
            not_after: parsed.validity().not_after.timestamp(),
        })
    }

    /// The CA's public key (verifies kit signatures).
    pub fn public_key(&self) -> &SigningPublicKey {
        &self.public
    }

    /// The CA's common name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Start of the CA's validity (Unix seconds).
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// End of the CA's validity (Unix seconds); no participant certificate outlives it.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// Verifies a participant certificate (chain, validity at `now`, shape) and reads it.
    pub fn verify(&self, cert_der: &[u8], now: SystemTime) -> Result<ParticipantCert, CertError> {
        if cert_der.len() > MAX_CERT_LEN {
            return Err(CertError::Malformed("certificate too large".into()));
        }
        let cert = CertificateDer::from(cert_der);
        let ee = EndEntityCert::try_from(&cert).map_err(map_webpki)?;
        let ca = CertificateDer::from(self.der.as_slice());
        let anchors = [anchor_from_trusted_cert(&ca).map_err(map_webpki)?];
        let time = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
        ee.verify_for_usage(
            &[webpki::ring::ED25519],
            &anchors,
            &[],
            time,
            KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(map_webpki)?;
        read_participant(cert_der)
    }

    /// Verifies a certificate a peer presented on a connection: chain, validity, that its key
    /// is `peer`, and that its role is one of `roles`.
    pub fn verify_peer(
        &self,
        cert_der: &[u8],
        now: SystemTime,
        peer: &PeerId,
        roles: &[RoleKind],
    ) -> Result<ParticipantCert, CertError> {
        let cert = self.verify(cert_der, now)?;
        cert.check_peer_id(peer)?;
        cert.check_role(roles)?;
        Ok(cert)
    }
}

fn map_webpki(e: webpki::Error) -> CertError {
    use webpki::Error as E;
    match e {
        E::InvalidSignatureForPublicKey | E::SignatureAlgorithmMismatch => {
            CertError::BadSignature(e)
        }
        E::CertExpired { .. } => CertError::Expired(e),
        E::CertNotValidYet { .. } => CertError::NotYetValid(e),
        E::UnknownIssuer => CertError::UnknownIssuer(e),
        E::BadDer | E::BadDerTime | E::TrailingData(_) | E::MalformedExtensions => {
            CertError::Malformed(e.to_string())
        }
        other => CertError::Rejected(other),
    }
}

/// Decodes one PEM `CERTIFICATE` block.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, CertError> {
    if pem.len() > MAX_CERT_LEN * 2 {
        return Err(CertError::Malformed("PEM too large".into()));
    }
    let (label, der) = pkcs8::der::pem::decode_vec(pem.trim().as_bytes())
        .map_err(|e| CertError::Malformed(e.to_string()))?;
    if label != "CERTIFICATE" {
        return Err(CertError::Malformed(format!(
            "expected a CERTIFICATE PEM block, found {label:?}"
        )));
    }
    Ok(der)
}

fn parse_strict(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::Malformed(
            "trailing bytes after certificate".into(),
        ));
    }
    Ok(cert)
}

fn ed25519_spki(cert: &X509Certificate<'_>) -> Result<SigningPublicKey, CertError> {
    let spki = cert.public_key();
    if spki.algorithm.algorithm.to_id_string() != "1.3.101.112" {
        return Err(CertError::Malformed("subject key is not Ed25519".into()));
    }
    if spki.algorithm.parameters.is_some() {
        return Err(CertError::Malformed(
            "Ed25519 key with algorithm parameters".into(),
        ));
    }
    let raw: &[u8] = &spki.subject_public_key.data;
    let arr: [u8; 32] = raw
        .try_into()
        .map_err(|_| CertError::Malformed("Ed25519 key is not 32 bytes".into()))?;
    Ok(SigningPublicKey::from_bytes(arr))
}

fn first_attr<'a, 'b: 'a>(
    mut it: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'b>>,
) -> Option<String> {
    it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
}

/// Reads the Flare fields of a certificate whose chain was already verified.
fn read_participant(der: &[u8]) -> Result<ParticipantCert, CertError> {
    let cert = parse_strict(der)?;
    let signing_public = ed25519_spki(&cert)?;
    let name = first_attr(cert.subject().iter_common_name())
        .ok_or_else(|| CertError::Malformed("no common name".into()))?;
    let org = first_attr(cert.subject().iter_organization())
        .ok_or_else(|| CertError::Malformed("no organization".into()))?;
    let role_oid = oid::dotted(oid::ROLE_EXT);
    let seal_oid = oid::dotted(oid::SEALING_KEY_EXT);
    let region_oid = oid::dotted(oid::REGION_EXT);
    let mut role = None;
    let mut sealing = None;
    let mut region: Option<String> = None;
    for ext in cert.extensions() {
        let id = ext.oid.to_id_string();
        if id == role_oid {
            if role.is_some() {
                return Err(CertError::Malformed("duplicate role extension".into()));
            }
            let s = Utf8StringRef::from_der(ext.value)
                .map_err(|e| CertError::Malformed(format!("role extension: {e}")))?;
            let r: Role = s
                .as_str()
                .parse()
                .map_err(|e: String| CertError::Malformed(e))?;
            role = Some(r);
        } else if id == seal_oid {
            if sealing.is_some() {
                return Err(CertError::Malformed(
                    "duplicate sealing key extension".into(),
                ));
            }
            let os = <&OctetStringRef>::from_der(ext.value)
                .map_err(|e| CertError::Malformed(format!("sealing key extension: {e}")))?;
            let arr: [u8; 32] = os
                .as_bytes()
                .try_into()
                .map_err(|_| CertError::Malformed("sealing key is not 32 bytes".into()))?;
            sealing = Some(SealingPublicKey::from_bytes(arr));
        } else if id == region_oid {
            if region.is_some() {
                return Err(CertError::Malformed("duplicate region extension".into()));
            }
            let s = Utf8StringRef::from_der(ext.value)
                .map_err(|e| CertError::Malformed(format!("region extension: {e}")))?;
            region = Some(s.as_str().to_string());
        }
    }
    let role = role.ok_or_else(|| CertError::Malformed("no role extension".into()))?;
    let sealing_public =
        sealing.ok_or_else(|| CertError::Malformed("no sealing key extension".into()))?;
    check_role_region(role, region.as_deref())
        .map_err(|e| CertError::Malformed(format!("region extension: {e}")))?;
    let peer_id = signing_public.peer_id()?;
    Ok(ParticipantCert {
        name,
        org,
        role,
        region,
        signing_public,
        peer_id,
        sealing_public,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: cert.raw_serial().to_vec(),
        der: der.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use ring::rand::SystemRandom;

    use super::*;
    use crate::identity::Identity;

    /// 2030-01-01, so the tests do not depend on the clock.
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_893_456_000)
    }

    fn at(days: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_893_456_000 + days * 86_400).unwrap()
    }

    struct Fixture {
        ca: CertificateAuthority,
        root: RootCa,
        id: Identity,
    }

    fn fixture() -> &'static Fixture {
        use std::sync::OnceLock;
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let rng = SystemRandom::new();
            let ca = CertificateAuthority::create(
                SigningSecret::generate(&rng).unwrap(),
                &CaParams {
                    common_name: "proj".into(),
                    org: None,
                    not_before: at(-10),
                    not_after: at(3650),
                    serial: [7; 16],
                },
            )
            .unwrap();
            let root = RootCa::from_der(&ca.cert().der, now()).unwrap();
            Fixture {
                ca,
                root,
                id: Identity::generate(&rng).unwrap(),
            }
        })
    }

    fn params(name: &str, role: Role, region: Option<&str>) -> ParticipantCertParams {
        let f = fixture();
        ParticipantCertParams {
            name: name.into(),
            org: "org".into(),
            role,
            region: region.map(str::to_string),
            signing_public: f.id.signing.public().unwrap(),
            sealing_public: f.id.sealing.public(),
            not_before: at(-1),
            not_after: at(30),
            serial: [9; 16],
        }
    }

    /// A real certificate, issued and read back.
    fn cert(name: &str, role: Role, region: Option<&str>) -> ParticipantCert {
        let f = fixture();
        let issued = f.ca.issue(&params(name, role, region)).unwrap();
        f.root.verify(&issued.der, now()).unwrap()
    }

    /// A certificate signed by the CA with these raw region extension contents (none: no
    /// region extension), read back.
    fn with_region_ext(role: Role, contents: &[&[u8]]) -> Result<ParticipantCert, CertError> {
        let f = fixture();
        let p = params("p", role, None);
        let mut exts = vec![
            utf8_extension(oid::ROLE_EXT, &role.to_string()).unwrap(),
            octet_extension(oid::SEALING_KEY_EXT, p.sealing_public.as_bytes()).unwrap(),
        ];
        for c in contents {
            let mut e = CustomExtension::from_oid_content(oid::REGION_EXT, c.to_vec());
            e.set_criticality(false);
            exts.push(e);
        }
        let issued = f.ca.sign(&p, exts).unwrap();
        f.root.verify(&issued.der, now())
    }

    fn utf8(s: &str) -> Vec<u8> {
        Utf8StringRef::new(s).unwrap().to_der().unwrap()
    }

    #[test]
    fn hub_role_round_trips() {
        assert_eq!("hub".parse::<Role>().unwrap(), Role::Hub);
        assert_eq!(Role::Hub.to_string(), "hub");
        assert_eq!(Role::Hub.kind(), RoleKind::Hub);
        let c = cert("eu", Role::Hub, Some("eu"));
        assert_eq!((c.role, c.region.as_deref()), (Role::Hub, Some("eu")));
        let c = cert("site-1", Role::Client, Some("eu.de"));
        assert_eq!(c.region.as_deref(), Some("eu.de"));
        let c = cert("site-1", Role::Client, None);
        assert_eq!(c.region, None);
    }

    #[test]
    fn region_names() {
        for ok in [
            "eu",
            "eu.de",
            "a",
            "us-east-1",
            &"x".repeat(32),
            "a.b.c.d.e.f.g.h",
        ] {
            check_region_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "EU",
            "eu.",
            ".eu",
            "eu..de",
            "eu de",
            "eu_de",
            "eu/de",
            "é",
            &"x".repeat(33),
            "a.b.c.d.e.f.g.h.i",
        ] {
            assert!(
                matches!(check_region_name(bad), Err(CertError::BadRegion(_))),
                "{bad:?} was accepted"
            );
        }
        assert_eq!(region_parent("eu"), None);
        assert_eq!(region_parent("eu.de"), Some("eu"));
        assert_eq!(region_parent("eu.de.by"), Some("eu.de"));
    }

    #[test]
    fn issuing_checks_the_region_against_the_role() {
        let f = fixture();
        for (role, region) in [
            (Role::Hub, None),
            (Role::Server, Some("eu")),
            (Role::Client, Some("EU")),
            (Role::Hub, Some("eu..de")),
            (Role::Admin(AdminRole::Lead), Some("")),
        ] {
            let err = f.ca.issue(&params("p", role, region)).unwrap_err();
            assert!(
                matches!(err, CertError::BadRegion(_)),
                "{role} {region:?}: {err}"
            );
        }
    }

    #[test]
    fn malformed_region_extensions_are_refused() {
        let not_utf8 = OctetStringRef::new(b"eu").unwrap().to_der().unwrap();
        let cases: &[(Role, &[&[u8]])] = &[
            (Role::Client, &[&not_utf8]),
            (Role::Client, &[b"\x0c\x05eu"]),
            (Role::Client, &[b""]),
            (Role::Client, &[&utf8("EU")]),
            (Role::Client, &[&utf8("eu"), &utf8("us")]),
            (Role::Server, &[&utf8("eu")]),
            (Role::Hub, &[]),
        ];
        for (role, contents) in cases {
            let err = with_region_ext(*role, contents).unwrap_err();
            assert!(
                matches!(err, CertError::Malformed(_)),
                "{role} {contents:?}: {err}"
            );
        }
        // The same path accepts a well-formed one, so the cases above fail for their flaw.
        let ok = with_region_ext(Role::Hub, &[&utf8("eu")]).unwrap();
        assert_eq!(ok.region.as_deref(), Some("eu"));
    }

    /// Every case of the admission rule, with real certificates.
    #[test]
    fn region_admission() {
        let admin = Role::Admin(AdminRole::ProjectAdmin);
        let tier1_server = cert("server", Role::Server, None);
        let tier1_site = cert("site-0", Role::Client, None);
        let tier1_admin = cert("admin", admin, None);
        let hub_eu = cert("eu", Role::Hub, Some("eu"));
        let hub_us = cert("us", Role::Hub, Some("us"));
        let hub_eu_de = cert("eu.de", Role::Hub, Some("eu.de"));
        let eu_site = cert("site-1", Role::Client, Some("eu"));
        let eu_admin = cert("admin@eu", admin, Some("eu"));
        let us_site = cert("site-1", Role::Client, Some("us"));
        let de_site = cert("site-1", Role::Client, Some("eu.de"));

        // The tier-1 server: hubs eu and us, region-less sites and admins.
        for peer in [&hub_eu, &hub_us, &tier1_site, &tier1_admin] {
            check_region(None, peer).unwrap_or_else(|e| panic!("tier 1: {e}"));
        }
        // ... but no region's members and no hub of a deeper region.
        for peer in [&eu_site, &eu_admin, &us_site, &hub_eu_de, &de_site] {
            assert!(
                check_region(None, peer).is_err(),
                "tier 1 admitted {}",
                peer.name
            );
        }
        // A node of region eu: its hub, eu sites and admins, the hub of eu.de below.
        for peer in [&hub_eu, &eu_site, &eu_admin, &hub_eu_de] {
            check_region(Some("eu"), peer).unwrap_or_else(|e| panic!("eu: {e}"));
        }
        // ... not a us site, not hub us, not the tier-1 server, its sites or admins, and
        // not a site of eu.de.
        for peer in [
            &us_site,
            &hub_us,
            &tier1_server,
            &tier1_site,
            &tier1_admin,
            &de_site,
        ] {
            let err = check_region(Some("eu"), peer).unwrap_err();
            match &err {
                CertError::WrongRegion {
                    peer: name, local, ..
                } => {
                    assert_eq!(name, &peer.name);
                    assert_eq!(local.as_deref(), Some("eu"));
                }
                other => panic!("{other}"),
            }
        }
        // The message names the peer, its region and ours.
        let text = check_region(Some("us"), &hub_eu).unwrap_err().to_string();
        assert!(text.contains("eu (hub, region \"eu\")"), "{text}");
        assert!(text.contains("in region \"us\""), "{text}");
        let text = check_region(Some("eu"), &tier1_server)
            .unwrap_err()
            .to_string();
        assert!(text.contains("region none (tier 1)"), "{text}");

        // A hub of eu can never pass as a site: its role is Hub, whatever a check by role
        // would want.
        assert_eq!(hub_eu.role.kind(), RoleKind::Hub);
        assert!(hub_eu.check_role(&[RoleKind::Client]).is_err());
        // The hub's own downward endpoint (region eu) admits it as its region's member, its
        // upward one (region none) as a hub from below, and no other region does.
        check_region(Some("eu"), &hub_eu).unwrap();
        check_region(None, &hub_eu).unwrap();
        assert!(check_region(Some("eu.de"), &hub_eu).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        /// Random region extension bytes never panic the reader; whatever is accepted is a
        /// valid region.
        #[test]
        fn random_region_extensions_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            match with_region_ext(Role::Client, &[&bytes]) {
                Ok(c) => {
                    let r = c.region.unwrap();
                    prop_assert!(check_region_name(&r).is_ok());
                }
                Err(e) => prop_assert!(matches!(e, CertError::Malformed(_)), "{}", e),
            }
        }

        /// A region either is refused when issuing or round-trips.
        #[test]
        fn random_regions_round_trip_or_are_refused(region in "[a-zA-Z0-9._ -]{0,40}") {
            let f = fixture();
            match f.ca.issue(&params("p", Role::Client, Some(&region))) {
                Ok(issued) => {
                    prop_assert!(check_region_name(&region).is_ok());
                    let c = f.root.verify(&issued.der, now()).unwrap();
                    prop_assert_eq!(c.region.as_deref(), Some(region.as_str()));
                }
                Err(e) => {
                    prop_assert!(check_region_name(&region).is_err());
                    prop_assert!(matches!(e, CertError::BadRegion(_)), "{}", e);
                }
            }
        }
    }
}
