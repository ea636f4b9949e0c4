//! The cryptography of SecAgg+ secure aggregation (Bonawitz et al. 2017, Bell et al. 2020):
//! x25519 key agreement, pairwise and self masks expanded with ChaCha20, Shamir secret sharing
//! of mask seeds and agreement secrets, and AES-256-GCM for the shares sent to neighbours. The
//! protocol itself (rounds, who talks to whom, dropouts) lives in a sans-IO state machine
//! elsewhere; this module has no state.
//!
//! Key agreement: `x25519(secret, peer)`, refused when non-contributory, then HKDF-SHA256 with
//! salt `flare/secagg/v1` and the caller's context as info, to 32 bytes.
//!
//! Masks: the ChaCha20 keystream of a 32-byte key (`rand_chacha::ChaCha20Rng::from_seed`),
//! read as little-endian `u32` words, added or subtracted mod 2^32 word by word.
//!
//! Shamir sharing is over GF(2^8) (AES polynomial `x^8 + x^4 + x^3 + x + 1`), byte by byte, and
//! is written here by hand rather than taken from the `sharks` crate: sharks 0.5 is unmaintained
//! since 2021, pins rand 0.8 while this workspace uses rand 0.9, and does not zeroize its
//! polynomial coefficients. The field needs a hundred lines, which the tests below pin down.
//! Multiplication is a carry-less multiply with a fixed eight-step loop and inversion a fixed
//! chain of multiplications, so no table is indexed by secret data.
//!
//! Like the rest of this crate, nothing here reads the clock or the OS random source. Shamir
//! coefficients and share nonces come from a `rand_core::CryptoRng` handed in rather than
//! ring's sealed `SecureRandom`, so the protocol's deterministic simulations can seed them
//! (a site seeds its ChaCha20 generator from the OS).

use std::fmt;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{CryptoRng, RngCore, SeedableRng};
use ring::hkdf;
use ring::rand::SecureRandom;
use zeroize::{Zeroize, Zeroizing};

const KDF_SALT: &[u8] = b"flare/secagg/v1";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Why a SecAgg cryptographic operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecAggCryptoError {
    /// The random source handed in failed.
    #[error("the random source failed")]
    Random,
    /// The x25519 result was all zero (the peer key is of low order).
    #[error("non-contributory x25519 key")]
    NonContributory,
    /// The threshold is zero or larger than the number of shares.
    #[error("threshold {threshold} is not in 1..={shares}")]
    Threshold {
        /// The threshold asked for.
        threshold: usize,
        /// The number of shares.
        shares: usize,
    },
    /// Two shares have the same x coordinate, or one has x = 0.
    #[error("share x coordinates must be distinct and non-zero")]
    BadX,
    /// Fewer shares than the threshold.
    #[error("{have} shares, {need} needed")]
    TooFewShares {
        /// The shares given.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// The shares do not all have the same length.
    #[error("shares differ in length")]
    ShareLength,
    /// A sealed share was malformed, tampered with, or sealed under another key or aad.
    #[error("share ciphertext did not open")]
    Open,
    /// HKDF failed.
    #[error("key derivation failed")]
    Kdf,
}

/// An x25519 secret for SecAgg key agreement; wiped on drop, prints as `AgreementSecret(..)`.
pub struct AgreementSecret(x25519_dalek::StaticSecret);

impl fmt::Debug for AgreementSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgreementSecret(..)")
    }
}

impl AgreementSecret {
    /// Makes a new secret from the random source handed in.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, SecAggCryptoError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill(bytes.as_mut())
            .map_err(|_| SecAggCryptoError::Random)?;
        Ok(Self(x25519_dalek::StaticSecret::from(*bytes)))
    }

    /// Wraps 32 raw bytes, e.g. a dropped site's secret rebuilt from shares.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(x25519_dalek::StaticSecret::from(bytes))
    }

    /// The raw 32 bytes (to be secret-shared).
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&self.0).to_bytes()
    }

    /// x25519 with `peer`, refusing a non-contributory (all-zero) result, then HKDF-SHA256
    /// (salt `flare/secagg/v1`, info = `context`) to 32 bytes. Symmetric:
    /// `a.agree(B, c) == b.agree(A, c)`.
    pub fn agree(
        &self,
        peer: &[u8; 32],
        context: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, SecAggCryptoError> {
        let shared = self.0.diffie_hellman(&x25519_dalek::PublicKey::from(*peer));
        if !shared.was_contributory() {
            return Err(SecAggCryptoError::NonContributory);
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(shared.as_bytes());
        let mut out = Zeroizing::new([0u8; 32]);
        prk.expand(&[context], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(out.as_mut()))
            .map_err(|_| SecAggCryptoError::Kdf)?;
        Ok(out)
    }
}

/// Whether [`apply_mask`] adds or subtracts the keystream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    /// Add, wrapping mod 2^32.
    Plus,
    /// Subtract, wrapping mod 2^32.
    Minus,
}

/// Words of keystream made per block.
const MASK_BLOCK: usize = 256;

/// Adds (`Plus`) or subtracts (`Minus`), wrapping mod 2^32, the ChaCha20 keystream of `key`
/// (`ChaCha20Rng::from_seed(*key)`, the words `next_u32` would give, in order) to `data`.
pub fn apply_mask(key: &[u8; 32], sign: Sign, data: &mut [u32]) {
    let mut rng = ChaCha20Rng::from_seed(*key);
    let mut buf = Zeroizing::new([0u8; MASK_BLOCK * 4]);
    for chunk in data.chunks_mut(MASK_BLOCK) {
        // Whole words only, so the byte stream stays aligned with `next_u32`.
        let stream = &mut buf[..chunk.len() * 4];
        rng.fill_bytes(stream);
        let words = chunk
            .iter_mut()
            .zip(stream.chunks_exact(4))
            .map(|(w, k)| (w, u32::from_le_bytes([k[0], k[1], k[2], k[3]])));
        match sign {
            Sign::Plus => words.for_each(|(w, k)| *w = w.wrapping_add(k)),
            Sign::Minus => words.for_each(|(w, k)| *w = w.wrapping_sub(k)),
        }
    }
}

/// Multiplication in GF(2^8) mod `0x11b`, without branches or tables.
const fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    let mut i = 0;
    while i < 8 {
        p ^= a & (b & 1).wrapping_neg();
        let carry = (a >> 7).wrapping_neg();
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
        i += 1;
    }
    p
}

/// The inverse in GF(2^8) as `a^254` (so `gf_inv(0) == 0`), by a fixed chain.
const fn gf_inv(a: u8) -> u8 {
    let mut x = a;
    let mut r = 1u8;
    let mut i = 0;
    while i < 7 {
        x = gf_mul(x, x); // a^2, a^4, ..., a^128
        r = gf_mul(r, x); // a^(2 + 4 + ... + 128) = a^254
        i += 1;
    }
    r
}

/// One Shamir share: its x coordinate (non-zero) and one y byte per secret byte. `y` is wiped
/// on drop; prints as `Share { x, len }`.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    /// The x coordinate, non-zero.
    pub x: u8,
    /// The polynomial values at `x`, one per secret byte.
    pub y: Vec<u8>,
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("x", &self.x)
            .field("len", &self.y.len())
            .finish()
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.y.zeroize();
    }
}

/// Errors unless every x is non-zero and no two are equal.
fn check_xs(xs: impl Iterator<Item = u8>) -> Result<(), SecAggCryptoError> {
    let mut seen = [false; 256];
    for x in xs {
        if x == 0 || seen[usize::from(x)] {
            return Err(SecAggCryptoError::BadX);
        }
        seen[usize::from(x)] = true;
    }
    Ok(())
}

/// Splits `secret` into one share per entry of `xs` (distinct, non-zero), any `threshold` of
/// which rebuild it. The random coefficients come from `rng` and are wiped after use.
pub fn split(
    secret: &[u8],
    threshold: usize,
    xs: &[u8],
    rng: &mut dyn CryptoRng,
) -> Result<Vec<Share>, SecAggCryptoError> {
    if threshold == 0 || threshold > xs.len() {
        return Err(SecAggCryptoError::Threshold {
            threshold,
            shares: xs.len(),
        });
    }
    check_xs(xs.iter().copied())?;
    let degree = threshold - 1;
    // coeffs[i * degree + j] is the coefficient of x^(j + 1) for secret byte i.
    let mut coeffs = Zeroizing::new(vec![0u8; secret.len() * degree]);
    rng.fill_bytes(&mut coeffs);
    Ok(xs
        .iter()
        .map(|&x| {
            let y = secret
                .iter()
                .enumerate()
                .map(|(i, &s)| {
                    // Horner: ((a_d x + a_{d-1}) x + ...) x + s.
                    let poly = &coeffs[i * degree..(i + 1) * degree];
                    poly.iter().rev().fold(0u8, |acc, &c| gf_mul(acc ^ c, x)) ^ s
                })
                .collect();
            Share { x, y }
        })
        .collect())
}

/// Rebuilds the secret by Lagrange interpolation at 0 from the first `threshold` of `shares`.
///
/// Every share given must have a non-zero x distinct from the others and the same length, and
/// there must be at least `threshold` of them.
pub fn combine(
    shares: &[Share],
    threshold: usize,
) -> Result<Zeroizing<Vec<u8>>, SecAggCryptoError> {
    if threshold == 0 {
        return Err(SecAggCryptoError::Threshold {
            threshold,
            shares: shares.len(),
        });
    }
    if shares.len() < threshold {
        return Err(SecAggCryptoError::TooFewShares {
            have: shares.len(),
            need: threshold,
        });
    }
    check_xs(shares.iter().map(|s| s.x))?;
    let len = shares[0].y.len();
    if shares.iter().any(|s| s.y.len() != len) {
        return Err(SecAggCryptoError::ShareLength);
    }
    let used = &shares[..threshold];
    let mut secret = Zeroizing::new(vec![0u8; len]);
    for (i, share) in used.iter().enumerate() {
        // l_i(0) = prod_{j != i} x_j / (x_j - x_i); subtraction is XOR in GF(2^8).
        let (num, den) = used
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .fold((1u8, 1u8), |(n, d), (_, o)| {
                (gf_mul(n, o.x), gf_mul(d, o.x ^ share.x))
            });
        let basis = gf_mul(num, gf_inv(den));
        for (s, &y) in secret.iter_mut().zip(&share.y) {
            *s ^= gf_mul(basis, y);
        }
    }
    Ok(secret)
}

/// AES-256-GCM under `key` with a fresh random 12-byte nonce (prefixed to the output) and `aad`
/// bound: the shares one site encrypts for a neighbour under their agreed key.
pub fn seal_share(
    key: &[u8; 32],
    aad: &[u8],
    plaintext: &[u8],
    rng: &mut dyn CryptoRng,
) -> Result<Vec<u8>, SecAggCryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    // AES-GCM refuses only plaintexts past 64 GiB, never a share; report it as unopenable.
    let payload = Payload {
        msg: plaintext,
        aad,
    };
    let ct = Aes256Gcm::new(key.into())
        .encrypt((&nonce).into(), payload)
        .map_err(|_| SecAggCryptoError::Open)?;
    Ok([&nonce[..], &ct].concat())
}

/// Opens what [`seal_share`] made; any malformed, short or tampered input, or a wrong key or
/// `aad`, gives [`SecAggCryptoError::Open`].
pub fn open_share(
    key: &[u8; 32],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SecAggCryptoError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(SecAggCryptoError::Open);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(nonce);
    Aes256Gcm::new(key.into())
        .decrypt((&n).into(), Payload { msg: ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| SecAggCryptoError::Open)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::SecAggCryptoError as E;
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use ring::rand::SystemRandom;

    /// A source that gives `byte` every time, to fix Shamir's coefficients.
    struct Fixed(u8);
    impl RngCore for Fixed {
        fn next_u32(&mut self) -> u32 {
            u32::from_ne_bytes([self.0; 4])
        }
        fn next_u64(&mut self) -> u64 {
            u64::from_ne_bytes([self.0; 8])
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            dst.fill(self.0);
        }
    }
    impl CryptoRng for Fixed {}

    fn fixed(byte: u8) -> Fixed {
        Fixed(byte)
    }

    /// A ChaCha20 stream seeded from the OS.
    fn os_rng() -> ChaCha20Rng {
        ChaCha20Rng::from_seed(random_bytes::<32>())
    }

    fn random_bytes<const N: usize>() -> [u8; N] {
        let mut v = [0u8; N];
        SystemRandom::new().fill(&mut v).unwrap();
        v
    }

    #[test]
    fn gf_known_values() {
        assert_eq!(gf_mul(0x53, 0xca), 0x01); // FIPS-197 inverse pair
        assert_eq!(gf_mul(0x57, 0x83), 0xc1); // FIPS-197 section 4.2
        assert_eq!(gf_mul(0x57, 0x13), 0xfe);
        assert_eq!(gf_mul(0x02, 0x80), 0x1b);
        assert_eq!((gf_inv(0x53), gf_inv(1), gf_inv(0)), (0xca, 1, 0));
        for a in 0..=255u8 {
            assert_eq!((gf_mul(a, 0), gf_mul(a, 1)), (0, a));
            for b in [0x02, 0x1b, 0x8d, 0xff] {
                assert_eq!(gf_mul(a, b), gf_mul(b, a));
            }
            assert!(a == 0 || gf_mul(a, gf_inv(a)) == 1, "a = {a:#x}");
        }
    }

    #[test]
    fn split_combine_every_subset() {
        for n in 5..=8usize {
            let xs: Vec<u8> = (1..=n as u8).map(|i| i.wrapping_mul(37)).collect();
            for t in 1..=5usize {
                let secret = random_bytes::<32>();
                let shares = split(&secret, t, &xs, &mut os_rng()).unwrap();
                assert_eq!(shares.len(), n);
                for mask in 0u32..(1 << n) {
                    let subset: Vec<Share> = (0..n)
                        .filter(|i| mask & (1 << i) != 0)
                        .map(|i| shares[i].clone())
                        .collect();
                    if subset.len() == t {
                        assert_eq!(*combine(&subset, t).unwrap(), secret, "n={n} t={t}");
                    } else if subset.len() + 1 == t && t > 1 {
                        assert_ne!(*combine(&subset, t - 1).unwrap(), secret, "n={n} t={t}");
                    }
                }
                let reversed: Vec<Share> = shares.iter().rev().cloned().collect();
                assert_eq!(*combine(&reversed, t).unwrap(), secret);
            }
        }
    }

    #[test]
    fn split_by_hand() {
        // Every coefficient is 0x57: with t = 2, y(x) = s ^ 0x57·x; with t = 3 add 0x57·x².
        let s = [0x00, 0x42, 0xff];
        let shares = split(&s, 2, &[1, 2, 0x83], &mut fixed(0x57)).unwrap();
        for sh in &shares {
            let expect: Vec<u8> = s.iter().map(|&b| b ^ gf_mul(0x57, sh.x)).collect();
            assert_eq!(sh.y, expect);
        }
        assert_eq!(shares[2].y[0], 0xc1);
        let shares = split(&s, 3, &[2, 3, 4], &mut fixed(0x57)).unwrap();
        for sh in &shares {
            let a = gf_mul(0x57, sh.x) ^ gf_mul(0x57, gf_mul(sh.x, sh.x));
            assert_eq!(sh.y, s.iter().map(|&b| b ^ a).collect::<Vec<_>>());
        }
        assert_eq!(*combine(&shares, 3).unwrap(), s);
        let shares = split(&s, 1, &[9], &mut fixed(0x57)).unwrap(); // t = 1: y is the secret
        assert_eq!(shares[0].y, s);
        assert_eq!(format!("{:?}", shares[0]), "Share { x: 9, len: 3 }");
    }

    #[test]
    fn split_and_combine_errors() {
        let rng = &mut os_rng();
        let thr = |threshold, shares| E::Threshold { threshold, shares };
        assert_eq!(split(b"k", 0, &[1, 2, 3], rng), Err(thr(0, 3)));
        assert_eq!(split(b"k", 4, &[1, 2, 3], rng), Err(thr(4, 3)));
        assert_eq!(split(b"k", 2, &[1, 2, 1], rng), Err(E::BadX));
        assert_eq!(split(b"k", 2, &[1, 0, 3], rng), Err(E::BadX));

        let shares = split(b"secret", 2, &[1, 2, 3], rng).unwrap();
        let changed = |f: &dyn Fn(&mut Vec<Share>)| {
            let mut v = shares.clone();
            f(&mut v);
            combine(&v, 2)
        };
        assert_eq!(changed(&|v| v[1].x = 1), Err(E::BadX));
        assert_eq!(changed(&|v| v[2].x = 0), Err(E::BadX));
        assert_eq!(changed(&|v| v[1].y.truncate(5)), Err(E::ShareLength));
        assert_eq!(
            changed(&|v| v.truncate(1)),
            Err(E::TooFewShares { have: 1, need: 2 })
        );
        assert_eq!(combine(&shares, 0), Err(thr(0, 3)));
    }

    #[test]
    fn agreement() {
        let rng = SystemRandom::new();
        let a = AgreementSecret::generate(&rng).unwrap();
        let b = AgreementSecret::generate(&rng).unwrap();
        let c = AgreementSecret::generate(&rng).unwrap();
        let ab = a.agree(&b.public(), b"round 1").unwrap();
        assert_eq!(*ab, *b.agree(&a.public(), b"round 1").unwrap());
        assert_ne!(*ab, *a.agree(&b.public(), b"round 2").unwrap());
        assert_ne!(*ab, *a.agree(&c.public(), b"round 1").unwrap());
        assert_eq!(a.agree(&[0u8; 32], b"round 1"), Err(E::NonContributory));
        assert_eq!(
            AgreementSecret::from_bytes(*a.to_bytes()).public(),
            a.public()
        );
        assert_eq!(format!("{a:?}"), "AgreementSecret(..)");
        // A secret rebuilt from shares agrees like the original.
        let shares = split(a.to_bytes().as_ref(), 3, &[1, 2, 3, 4], &mut os_rng()).unwrap();
        let rebuilt: [u8; 32] = combine(&shares[1..], 3).unwrap()[..].try_into().unwrap();
        let a2 = AgreementSecret::from_bytes(rebuilt);
        assert_eq!(*a2.agree(&b.public(), b"round 1").unwrap(), *ab);
    }

    #[test]
    fn mask_matches_chacha_and_cancels() {
        let key = random_bytes::<32>();
        let n = 3 * MASK_BLOCK + 17; // not a whole number of blocks, to cover the tail
        let mut masked = vec![0u32; n];
        apply_mask(&key, Sign::Plus, &mut masked);
        let mut rng = ChaCha20Rng::from_seed(key);
        let expect: Vec<u32> = (0..n).map(|_| rng.next_u32()).collect();
        assert_eq!(masked, expect);

        let data: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
        let mut v = data.clone();
        apply_mask(&key, Sign::Plus, &mut v);
        assert_ne!(v, data);
        apply_mask(&key, Sign::Minus, &mut v);
        assert_eq!(v, data);
        apply_mask(&key, Sign::Minus, &mut masked);
        assert!(masked.iter().all(|&w| w == 0));
    }

    #[test]
    fn mask_uses_every_key_byte() {
        let stream = |key: &[u8; 32]| {
            let mut v = vec![0u32; 64];
            apply_mask(key, Sign::Plus, &mut v);
            v
        };
        let key = [7u8; 32];
        for i in [0, 15, 16, 31] {
            let mut other = key;
            other[i] ^= 1;
            assert_ne!(stream(&key), stream(&other), "byte {i}");
        }
    }

    #[test]
    fn share_seal_round_trip_and_tamper() {
        let (rng, key, aad) = (&mut os_rng(), [3u8; 32], b"from a to b");
        let sealed = seal_share(&key, aad, b"share bytes", rng).unwrap();
        assert_eq!(sealed.len(), NONCE_LEN + 11 + TAG_LEN);
        assert_eq!(&open_share(&key, aad, &sealed).unwrap()[..], b"share bytes");
        assert_ne!(sealed, seal_share(&key, aad, b"share bytes", rng).unwrap());
        assert_eq!(open_share(&[4u8; 32], aad, &sealed), Err(E::Open));
        assert_eq!(open_share(&key, b"from a to c", &sealed), Err(E::Open));
        for bit in 0..sealed.len() * 8 {
            let mut t = sealed.clone();
            t[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(open_share(&key, aad, &t), Err(E::Open), "bit {bit}");
        }
        for len in 0..=NONCE_LEN + TAG_LEN {
            assert_eq!(open_share(&key, aad, &sealed[..len]), Err(E::Open));
        }
        let empty = seal_share(&key, b"", b"", rng).unwrap();
        assert!(open_share(&key, b"", &empty).unwrap().is_empty());
    }

    proptest! {
        #[test]
        fn open_share_never_panics(
            key in any::<[u8; 32]>(), aad in vec(any::<u8>(), 0..16), sealed in vec(any::<u8>(), 0..80),
        ) {
            prop_assert_eq!(open_share(&key, &aad, &sealed), Err(E::Open));
        }

        #[test]
        fn combine_never_panics(
            raw in vec((any::<u8>(), vec(any::<u8>(), 0..6)), 0..8), threshold in 0usize..10,
        ) {
            let shares: Vec<Share> = raw.into_iter().map(|(x, y)| Share { x, y }).collect();
            if let Ok(secret) = combine(&shares, threshold) {
                prop_assert_eq!(secret.len(), shares[0].y.len());
            }
        }
    }
}
