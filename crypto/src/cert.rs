//! The project CA and participant certificates: issue with rcgen, verify the chain with
//! rustls-webpki, then read the fields with x509-parser and check PeerId, role and CA dates.

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
}

/// The rights of an admin (FLARE's admin roles).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

    /// Issues a participant certificate.
    pub fn issue(&self, p: &ParticipantCertParams) -> Result<IssuedCert, CertError> {
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
        let role = p.role.to_string();
        let role_der = Utf8StringRef::new(&role)
            .and_then(|s| s.to_der())
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        let seal_der = OctetStringRef::new(p.sealing_public.as_bytes())
            .and_then(|s| s.to_der())
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        let mut role_ext = CustomExtension::from_oid_content(oid::ROLE_EXT, role_der);
        role_ext.set_criticality(false);
        let mut seal_ext = CustomExtension::from_oid_content(oid::SEALING_KEY_EXT, seal_der);
        seal_ext.set_criticality(false);
        cp.custom_extensions = vec![role_ext, seal_ext];
        let cert = cp.signed_by(&p.signing_public, &issuer)?;
        Ok(IssuedCert {
            der: cert.der().to_vec(),
            pem: cert.pem(),
        })
    }
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
    let mut role = None;
    let mut sealing = None;
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
        }
    }
    let role = role.ok_or_else(|| CertError::Malformed("no role extension".into()))?;
    let sealing_public =
        sealing.ok_or_else(|| CertError::Malformed("no sealing key extension".into()))?;
    let peer_id = signing_public.peer_id()?;
    Ok(ParticipantCert {
        name,
        org,
        role,
        signing_public,
        peer_id,
        sealing_public,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: cert.raw_serial().to_vec(),
        der: der.to_vec(),
    })
}
