//! Participant identities: the Ed25519 signing key (which is also the libp2p identity, so the
//! PeerId follows from the certificate) and the x25519 sealing key, with PKCS#8 PEM encoding.

use std::fmt;

use libp2p_identity::PeerId;
use pkcs8::der::asn1::OctetStringRef;
use pkcs8::der::pem::LineEnding;
use pkcs8::der::{Decode, Encode, SecretDocument};
use pkcs8::{EncodePrivateKey, ObjectIdentifier, PrivateKeyInfoRef};
use ring::rand::SecureRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use zeroize::Zeroizing;

/// RFC 8410 algorithm identifier of Ed25519 keys.
pub const ED25519_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
/// RFC 8410 algorithm identifier of X25519 keys.
pub const X25519_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.110");

/// The PEM label of an unencrypted PKCS#8 private key.
const PKCS8_LABEL: &str = "PRIVATE KEY";

/// Why a key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The PEM or DER around the key is malformed.
    #[error("malformed PKCS#8 key: {0}")]
    Malformed(#[source] pkcs8::der::Error),
    /// The PEM block is not a `PRIVATE KEY`.
    #[error("expected a PEM block labelled PRIVATE KEY, found {0:?}")]
    WrongLabel(String),
    /// The key is for another algorithm than the one asked for.
    #[error("expected a key with algorithm {expected}, found {found}")]
    WrongAlgorithm {
        /// The algorithm OID asked for.
        expected: ObjectIdentifier,
        /// The algorithm OID in the file.
        found: ObjectIdentifier,
    },
    /// RFC 8410 keys carry no algorithm parameters; this one does.
    #[error("unexpected algorithm parameters in an RFC 8410 key")]
    UnexpectedParameters,
    /// The private key is not 32 bytes long.
    #[error("expected a 32-byte private key, found {0} bytes")]
    BadLength(usize),
    /// A PKCS#8 v2 file carries a public key that does not belong to its private key.
    #[error("the public key in the file does not match its private key")]
    PublicKeyMismatch,
    /// The public key bytes are not a valid Ed25519 point.
    #[error("invalid Ed25519 public key: {0}")]
    InvalidPublicKey(#[source] libp2p_identity::DecodingError),
    /// ring refused the key material.
    #[error("the crypto library rejected the key: {0}")]
    Rejected(String),
    /// The random source handed in failed.
    #[error("the random source failed")]
    Random,
}

/// Fills a fresh secret buffer from the random source handed in.
pub(crate) fn random_secret(rng: &dyn SecureRandom) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rng.fill(bytes.as_mut()).map_err(|_| KeyError::Random)?;
    Ok(bytes)
}

/// The Ed25519 secret key (its 32-byte seed) of a participant or of the root CA.
///
/// Wiped on drop; prints as `SecretKey(..)`.
#[derive(Clone)]
pub struct SigningSecret(Zeroizing<[u8; 32]>);

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SigningSecret {
    /// Wraps an existing 32-byte seed.
    pub fn from_seed(seed: Zeroizing<[u8; 32]>) -> Self {
        Self(seed)
    }

    /// Makes a new key from the random source handed in.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        random_secret(rng).map(Self)
    }

    pub(crate) fn ring_keypair(&self) -> Result<Ed25519KeyPair, KeyError> {
        Ed25519KeyPair::from_seed_unchecked(self.0.as_ref())
            .map_err(|e| KeyError::Rejected(e.to_string()))
    }

    /// The matching public key.
    pub fn public(&self) -> Result<SigningPublicKey, KeyError> {
        let pair = self.ring_keypair()?;
        let mut out = [0u8; 32];
        out.copy_from_slice(pair.public_key().as_ref());
        Ok(SigningPublicKey(out))
    }

    /// Signs `msg` (Ed25519, deterministic).
    pub fn sign(&self, msg: &[u8]) -> Result<[u8; 64], KeyError> {
        let pair = self.ring_keypair()?;
        let mut out = [0u8; 64];
        out.copy_from_slice(pair.sign(msg).as_ref());
        Ok(out)
    }

    /// The same key as a libp2p identity keypair, for the swarm.
    pub fn to_libp2p(&self) -> Result<libp2p_identity::Keypair, KeyError> {
        // `ed25519_from_bytes` wipes the buffer it is given, so hand it a copy.
        let mut copy = Zeroizing::new(*self.0);
        libp2p_identity::Keypair::ed25519_from_bytes(copy.as_mut())
            .map_err(KeyError::InvalidPublicKey)
    }

    /// The PeerId of this key.
    pub fn peer_id(&self) -> Result<PeerId, KeyError> {
        self.public()?.peer_id()
    }

    /// PKCS#8 v1 PEM (RFC 8410), label `PRIVATE KEY`.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        encode_pkcs8_pem(ED25519_OID, &self.0)
    }

    /// Reads a PKCS#8 PEM Ed25519 key (v1, or v2 whose public key must match).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let (seed, public) = decode_pkcs8_pem(pem, ED25519_OID)?;
        let secret = Self(seed);
        if let Some(public) = public {
            if public != secret.public()?.0 {
                return Err(KeyError::PublicKeyMismatch);
            }
        }
        Ok(secret)
    }
}

/// An Ed25519 public key: a participant's identity, or the root CA's signing key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SigningPublicKey(pub(crate) [u8; 32]);

impl fmt::Debug for SigningPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningPublicKey({})", hex::encode(self.0))
    }
}

impl SigningPublicKey {
    /// Wraps 32 raw bytes (not checked until used).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The libp2p PeerId that belongs to this key.
    pub fn peer_id(&self) -> Result<PeerId, KeyError> {
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0)
            .map_err(KeyError::InvalidPublicKey)?;
        Ok(libp2p_identity::PublicKey::from(key).to_peer_id())
    }

    /// Checks an Ed25519 signature; `false` for any failure.
    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(msg, signature)
            .is_ok()
    }
}

/// The x25519 secret key a participant opens sealed messages with.
///
/// Wiped on drop; prints as `SecretKey(..)`.
#[derive(Clone)]
pub struct SealingSecret(Zeroizing<[u8; 32]>);

impl fmt::Debug for SealingSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SealingSecret {
    /// Wraps an existing 32-byte secret.
    pub fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> Self {
        Self(bytes)
    }

    /// Makes a new key from the random source handed in.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        random_secret(rng).map(Self)
    }

    pub(crate) fn to_dalek(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(*self.0)
    }

    /// The matching public key.
    pub fn public(&self) -> SealingPublicKey {
        SealingPublicKey(x25519_dalek::PublicKey::from(&self.to_dalek()).to_bytes())
    }

    /// PKCS#8 v1 PEM (RFC 8410), label `PRIVATE KEY`.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        encode_pkcs8_pem(X25519_OID, &self.0)
    }

    /// Reads a PKCS#8 PEM X25519 key (v1, or v2 whose public key must match).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let (bytes, public) = decode_pkcs8_pem(pem, X25519_OID)?;
        let secret = Self(bytes);
        if let Some(public) = public {
            if public != secret.public().0 {
                return Err(KeyError::PublicKeyMismatch);
            }
        }
        Ok(secret)
    }
}

/// An x25519 public key that messages are sealed to; carried in the participant certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SealingPublicKey(pub(crate) [u8; 32]);

impl fmt::Debug for SealingPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealingPublicKey({})", hex::encode(self.0))
    }
}

impl SealingPublicKey {
    /// Wraps 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Both secret keys of one participant.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The Ed25519 key: libp2p identity, certificate subject key, job signing key.
    pub signing: SigningSecret,
    /// The x25519 key that sealed messages to this participant are opened with.
    pub sealing: SealingSecret,
}

impl Identity {
    /// Makes both keys from the random source handed in.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        Ok(Self {
            signing: SigningSecret::generate(rng)?,
            sealing: SealingSecret::generate(rng)?,
        })
    }

    /// The PeerId of the signing key.
    pub fn peer_id(&self) -> Result<PeerId, KeyError> {
        self.signing.peer_id()
    }
}

fn encode_pkcs8_pem(
    oid: ObjectIdentifier,
    secret: &[u8; 32],
) -> Result<Zeroizing<String>, KeyError> {
    let inner = Zeroizing::new(
        OctetStringRef::new(secret)
            .and_then(|s| s.to_der())
            .map_err(KeyError::Malformed)?,
    );
    let info = PrivateKeyInfoRef::new(
        pkcs8::AlgorithmIdentifierRef {
            oid,
            parameters: None,
        },
        OctetStringRef::new(&inner).map_err(KeyError::Malformed)?,
    );
    info.to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Malformed(pkcs8_to_der_error(e)))
}

fn pkcs8_to_der_error(e: pkcs8::Error) -> pkcs8::der::Error {
    match e {
        pkcs8::Error::Asn1(e) => e,
        _ => pkcs8::der::Error::from(pkcs8::der::ErrorKind::Failed),
    }
}

/// Returns the 32-byte private key and, for PKCS#8 v2, the public key in the file.
#[allow(clippy::type_complexity)]
fn decode_pkcs8_pem(
    pem: &str,
    oid: ObjectIdentifier,
) -> Result<(Zeroizing<[u8; 32]>, Option<[u8; 32]>), KeyError> {
    let (label, doc) = SecretDocument::from_pem(pem).map_err(KeyError::Malformed)?;
    if label != PKCS8_LABEL {
        return Err(KeyError::WrongLabel(label.to_string()));
    }
    let info = PrivateKeyInfoRef::from_der(doc.as_bytes()).map_err(KeyError::Malformed)?;
    if info.algorithm.oid != oid {
        return Err(KeyError::WrongAlgorithm {
            expected: oid,
            found: info.algorithm.oid,
        });
    }
    if info.algorithm.parameters.is_some() {
        return Err(KeyError::UnexpectedParameters);
    }
    let inner: &OctetStringRef = info
        .private_key
        .decode_into()
        .map_err(KeyError::Malformed)?;
    let bytes = inner.as_bytes();
    if bytes.len() != 32 {
        return Err(KeyError::BadLength(bytes.len()));
    }
    let mut secret = Zeroizing::new([0u8; 32]);
    secret.copy_from_slice(bytes);
    let public = match info.public_key {
        None => None,
        Some(bits) => {
            let raw = bits.as_bytes().ok_or(KeyError::BadLength(0))?;
            let arr: [u8; 32] = raw.try_into().map_err(|_| KeyError::BadLength(raw.len()))?;
            Some(arr)
        }
    };
    Ok((secret, public))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    #[test]
    fn pem_round_trip_and_peer_id() {
        let rng = SystemRandom::new();
        let id = Identity::generate(&rng).unwrap();
        let pem = id.signing.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let back = SigningSecret::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.public().unwrap(), id.signing.public().unwrap());
        assert_eq!(
            id.signing.to_libp2p().unwrap().public().to_peer_id(),
            id.peer_id().unwrap()
        );
        let spem = id.sealing.to_pkcs8_pem().unwrap();
        let sback = SealingSecret::from_pkcs8_pem(&spem).unwrap();
        assert_eq!(sback.public(), id.sealing.public());
        // An X25519 file is not an Ed25519 key.
        assert!(matches!(
            SigningSecret::from_pkcs8_pem(&spem),
            Err(KeyError::WrongAlgorithm { .. })
        ));
    }

    #[test]
    fn secrets_print_redacted() {
        let rng = SystemRandom::new();
        let id = Identity::generate(&rng).unwrap();
        let s = format!("{id:?}");
        assert!(s.contains("SecretKey(..)"));
        assert!(!s.contains(&hex::encode(*id.signing.0)));
    }

    #[test]
    fn known_rfc8410_layout() {
        // RFC 8410 section 10.3 example key.
        let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
        let key = SigningSecret::from_pkcs8_pem(pem).unwrap();
        assert_eq!(key.to_pkcs8_pem().unwrap().as_str(), pem);
        assert_eq!(
            hex::encode(key.public().unwrap().0),
            "19bf44096984cdfe8541bac167dc3b96c85086aa30b6b6cb0c5c38ad703166e1"
        );
    }

    #[test]
    fn signatures_verify() {
        let rng = SystemRandom::new();
        let key = SigningSecret::generate(&rng).unwrap();
        let sig = key.sign(b"hello").unwrap();
        assert!(key.public().unwrap().verify(b"hello", &sig));
        assert!(!key.public().unwrap().verify(b"hellO", &sig));
    }
}
