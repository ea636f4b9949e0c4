//! The one place that names Flare's private OID arc for certificate extensions.
//!
//! Arc: `1.3.6.1.4.1.59237.1` (`iso.org.dod.internet.private.enterprise.<flare>.certext`).
//! The enterprise number is a placeholder that is not registered with IANA; register one before
//! certificates leave a test federation. All extensions are non-critical, so generic X.509
//! tools still accept Flare certificates.
//!
//! | OID | content | meaning |
//! | --- | --- | --- |
//! | `1.3.6.1.4.1.59237.1.1` | UTF8String | the participant role, e.g. `client`, `admin:project_admin` |
//! | `1.3.6.1.4.1.59237.1.2` | OCTET STRING (32 bytes) | the participant's x25519 sealing public key |
//! | `1.3.6.1.4.1.59237.1.3` | UTF8String | the participant's region, e.g. `eu`, `eu.de` (absent: tier 1) |

/// The arc under which every Flare extension lives.
pub const FLARE_CERT_EXT_ARC: &[u64] = &[1, 3, 6, 1, 4, 1, 59237, 1];
/// The role extension (UTF8String).
pub const ROLE_EXT: &[u64] = &[1, 3, 6, 1, 4, 1, 59237, 1, 1];
/// The x25519 sealing public key extension (OCTET STRING of 32 bytes).
pub const SEALING_KEY_EXT: &[u64] = &[1, 3, 6, 1, 4, 1, 59237, 1, 2];
/// The region extension (UTF8String): the regional federation a participant belongs to; a
/// hub's region is the one it serves. Absent for the tier-1 server and its direct members.
pub const REGION_EXT: &[u64] = &[1, 3, 6, 1, 4, 1, 59237, 1, 3];

/// Dotted string form, for comparing with parsed OIDs.
pub(crate) fn dotted(oid: &[u64]) -> String {
    oid.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}
