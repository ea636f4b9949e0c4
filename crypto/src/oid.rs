//! The one place that names Flare's private OID arc for certificate extensions.
//!
//! Arc: `1.3.6.1.4.1.59237.1` (`iso.org.dod.internet.private.enterprise.<flare>.certext`).
//! The enterprise number is a placeholder that is not registered with IANA; register one before
//! certificates leave a test federation. Both extensions are non-critical, so generic X.509
//! tools still accept Flare certificates.
//!
//! | OID | content | meaning |
//! | --- | --- | --- |
//! | `1.3.6.1.4.1.59237.1.1` | UTF8String | the participant role, e.g. `client`, `admin:project_admin` |
//! | `1.3.6.1.4.1.59237.1.2` | OCTET STRING (32 bytes) | the participant's x25519 sealing public key |

/// The arc under which every Flare extension lives.
pub const FLARE_CERT_EXT_ARC: &[u64] = &[1, 3, 6, 1, 4, 1, 59237, 1];
/// The role extension (UTF8String).
pub const ROLE_EXT: &[u64] = &[1, 3, 6, 1, 4, 1, 59237, 1, 1];
/// The x25519 sealing public key extension (OCTET STRING of 32 bytes).
pub const SEALING_KEY_EXT: &[u64] = &[1, 3, 6, 1, 4, 1, 59237, 1, 2];

/// Dotted string form, for comparing with parsed OIDs.
pub(crate) fn dotted(oid: &[u64]) -> String {
    oid.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}
