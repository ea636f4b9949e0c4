//! Folder signatures for startup kits and jobs: a manifest of the SHA-256 of every file
//! (relative paths, sorted), signed with Ed25519, stored as `signature.json` in the folder.
//!
//! The signature covers a canonical byte string, not the JSON text: a domain label naming the
//! purpose, then each path (length-prefixed) and its digest, in path order. This module reads
//! files (that is its job) but never the clock or the random source.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

use crate::identity::{KeyError, SigningPublicKey, SigningSecret};

/// The file that holds a folder's signature; it is not part of its own manifest.
pub const SIGNATURE_FILE: &str = "signature.json";
/// The largest `signature.json` accepted (bytes).
pub const MAX_SIGNATURE_FILE_LEN: u64 = 4 * 1024 * 1024;
/// The most files a signed folder may hold.
pub const MAX_FILES: usize = 100_000;
/// The most directory levels a signed folder may nest.
pub const MAX_DEPTH: usize = 32;

/// What a folder signature is for; each has its own domain-separation label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// A startup kit, signed by the root CA key.
    Kit,
    /// A job folder, signed by the submitting admin's key.
    Job,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Kit => b"flare/kit-signature/v1",
            Purpose::Job => b"flare/job-signature/v1",
        }
    }
}

/// Why a folder could not be signed or its signature was rejected.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The folder has no `signature.json`.
    #[error("no {SIGNATURE_FILE} in {0}")]
    Unsigned(PathBuf),
    /// `signature.json` is not valid.
    #[error("malformed {SIGNATURE_FILE}: {0}")]
    Malformed(String),
    /// The signature was made for another purpose (a job signature on a kit, say).
    #[error("signature is for a {found:?}, expected a {expected:?}")]
    WrongPurpose {
        /// What was asked for.
        expected: Purpose,
        /// What the file says.
        found: Purpose,
    },
    /// The signature was made by another key than the trusted one.
    #[error("signed by {found}, not by the trusted key {expected}")]
    WrongSigner {
        /// The trusted key (hex).
        expected: String,
        /// The key named in the file (hex).
        found: String,
    },
    /// The signature does not verify over the manifest in the file.
    #[error("bad signature over the manifest (signature.json was altered or forged)")]
    BadSignature,
    /// A file was added after signing.
    #[error("file added after signing: {0}")]
    FileAdded(String),
    /// A signed file is missing.
    #[error("signed file removed: {0}")]
    FileRemoved(String),
    /// A signed file's content changed.
    #[error("signed file changed: {0}")]
    FileChanged(String),
    /// The folder holds something that cannot be signed (a symlink, a non-UTF-8 name, too many
    /// files, too deep).
    #[error("cannot sign {path}: {reason}")]
    Unsupported {
        /// The entry.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// The signing key could not be used.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The SHA-256 of every file in a folder, by relative `/`-separated path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    /// Relative path → SHA-256.
    pub files: BTreeMap<String, [u8; 32]>,
}

impl Manifest {
    /// Hashes every regular file under `dir` except the top-level `signature.json`.
    pub fn of_folder(dir: &Path) -> Result<Self, FolderError> {
        let mut files = BTreeMap::new();
        walk(dir, "", 0, &mut files)?;
        Ok(Self { files })
    }

    /// The bytes that are signed.
    fn signing_bytes(&self, purpose: Purpose) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.files.len() * 96);
        out.extend_from_slice(purpose.label());
        out.push(0);
        out.extend_from_slice(&(self.files.len() as u64).to_be_bytes());
        for (path, digest) in &self.files {
            out.extend_from_slice(&(path.len() as u64).to_be_bytes());
            out.extend_from_slice(path.as_bytes());
            out.extend_from_slice(digest);
        }
        out
    }

    /// The first difference from `signed` to `actual`, in path order.
    fn first_difference(signed: &Self, actual: &Self) -> Option<FolderError> {
        let mut a = signed.files.iter().peekable();
        let mut b = actual.files.iter().peekable();
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => return None,
                (Some((p, _)), None) => return Some(FolderError::FileRemoved((*p).clone())),
                (None, Some((p, _))) => return Some(FolderError::FileAdded((*p).clone())),
                (Some((pa, da)), Some((pb, db))) => match pa.cmp(pb) {
                    std::cmp::Ordering::Less => {
                        return Some(FolderError::FileRemoved((*pa).clone()));
                    }
                    std::cmp::Ordering::Greater => {
                        return Some(FolderError::FileAdded((*pb).clone()));
                    }
                    std::cmp::Ordering::Equal => {
                        if da != db {
                            return Some(FolderError::FileChanged((*pa).clone()));
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
    }
}

fn walk(
    dir: &Path,
    prefix: &str,
    depth: usize,
    files: &mut BTreeMap<String, [u8; 32]>,
) -> Result<(), FolderError> {
    if depth > MAX_DEPTH {
        return Err(FolderError::Unsupported {
            path: dir.to_path_buf(),
            reason: "folders nest too deep",
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FolderError::Io { path, source }
    };
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| FolderError::Unsupported {
                path: path.clone(),
                reason: "file name is not UTF-8",
            })?;
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if depth == 0 && rel == SIGNATURE_FILE {
            continue;
        }
        let ty = entry.file_type().map_err(io(&path))?;
        if ty.is_dir() {
            walk(&path, &rel, depth + 1, files)?;
        } else if ty.is_file() {
            if files.len() >= MAX_FILES {
                return Err(FolderError::Unsupported {
                    path,
                    reason: "too many files",
                });
            }
            files.insert(rel, hash_file(&path)?);
        } else {
            return Err(FolderError::Unsupported {
                path,
                reason: "not a regular file or folder (symlinks are not signed)",
            });
        }
    }
    Ok(())
}

fn hash_file(path: &Path) -> Result<[u8; 32], FolderError> {
    let err = |source| FolderError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::File::open(path).map_err(err)?;
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// The content of `signature.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// Format version; 1.
    pub version: u32,
    /// What the folder is.
    pub purpose: Purpose,
    /// Always `ed25519`.
    pub algorithm: String,
    /// The signer's Ed25519 public key, hex.
    pub signer: String,
    /// Relative path → SHA-256, hex.
    pub files: BTreeMap<String, String>,
    /// The Ed25519 signature over the canonical manifest bytes, hex.
    pub signature: String,
}

impl SignatureFile {
    /// Parses untrusted `signature.json` bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, FolderError> {
        if bytes.len() as u64 > MAX_SIGNATURE_FILE_LEN {
            return Err(FolderError::Malformed("file too large".into()));
        }
        let file: Self =
            serde_json::from_slice(bytes).map_err(|e| FolderError::Malformed(e.to_string()))?;
        if file.version != 1 {
            return Err(FolderError::Malformed(format!(
                "unsupported version {}",
                file.version
            )));
        }
        if file.algorithm != "ed25519" {
            return Err(FolderError::Malformed(format!(
                "unsupported algorithm {:?}",
                file.algorithm
            )));
        }
        Ok(file)
    }

    /// The manifest in the file, with every path and digest checked.
    pub fn manifest(&self) -> Result<Manifest, FolderError> {
        let mut files = BTreeMap::new();
        for (path, digest) in &self.files {
            check_rel_path(path)?;
            let d = decode_fixed::<32>(digest, "digest")?;
            files.insert(path.clone(), d);
        }
        Ok(Manifest { files })
    }
}

fn decode_fixed<const N: usize>(s: &str, what: &str) -> Result<[u8; N], FolderError> {
    let v = hex::decode(s).map_err(|e| FolderError::Malformed(format!("{what}: {e}")))?;
    v.try_into()
        .map_err(|_| FolderError::Malformed(format!("{what}: expected {N} bytes")))
}

fn check_rel_path(path: &str) -> Result<(), FolderError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path.contains('\0')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(FolderError::Malformed(format!("bad path {path:?}")));
    }
    Ok(())
}

/// Signs every file under `dir` and returns the `signature.json` content (not written).
pub fn sign_folder(
    dir: &Path,
    purpose: Purpose,
    signer: &SigningSecret,
) -> Result<SignatureFile, FolderError> {
    let manifest = Manifest::of_folder(dir)?;
    let signature = signer.sign(&manifest.signing_bytes(purpose))?;
    Ok(SignatureFile {
        version: 1,
        purpose,
        algorithm: "ed25519".into(),
        signer: hex::encode(signer.public()?.as_bytes()),
        files: manifest
            .files
            .iter()
            .map(|(p, d)| (p.clone(), hex::encode(d)))
            .collect(),
        signature: hex::encode(signature),
    })
}

/// Signs every file under `dir` and writes `dir/signature.json`.
pub fn write_folder_signature(
    dir: &Path,
    purpose: Purpose,
    signer: &SigningSecret,
) -> Result<SignatureFile, FolderError> {
    let file = sign_folder(dir, purpose, signer)?;
    let text =
        serde_json::to_vec_pretty(&file).map_err(|e| FolderError::Malformed(e.to_string()))?;
    let path = dir.join(SIGNATURE_FILE);
    fs::write(&path, text).map_err(|source| FolderError::Io { path, source })?;
    Ok(file)
}

/// Verifies `dir/signature.json` against `trusted` and against the files now in `dir`.
///
/// Returns the verified manifest, or names the first file (in path order) that was added,
/// removed or changed.
pub fn verify_folder(
    dir: &Path,
    purpose: Purpose,
    trusted: &SigningPublicKey,
) -> Result<Manifest, FolderError> {
    let path = dir.join(SIGNATURE_FILE);
    let bytes = match fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FolderError::Unsigned(dir.to_path_buf()));
        }
        Err(source) => return Err(FolderError::Io { path, source }),
        Ok(m) if m.len() > MAX_SIGNATURE_FILE_LEN => {
            return Err(FolderError::Malformed("file too large".into()));
        }
        Ok(_) => fs::read(&path).map_err(|source| FolderError::Io {
            path: path.clone(),
            source,
        })?,
    };
    let file = SignatureFile::parse(&bytes)?;
    let signed = verify_signature_file(&file, purpose, trusted)?;
    let actual = Manifest::of_folder(dir)?;
    match Manifest::first_difference(&signed, &actual) {
        Some(e) => Err(e),
        None => Ok(signed),
    }
}

/// Checks a parsed `signature.json` (purpose, signer, signature) without reading the folder.
pub fn verify_signature_file(
    file: &SignatureFile,
    purpose: Purpose,
    trusted: &SigningPublicKey,
) -> Result<Manifest, FolderError> {
    if file.purpose != purpose {
        return Err(FolderError::WrongPurpose {
            expected: purpose,
            found: file.purpose,
        });
    }
    let expected = hex::encode(trusted.as_bytes());
    if !file.signer.eq_ignore_ascii_case(&expected) {
        return Err(FolderError::WrongSigner {
            expected,
            found: file.signer.clone(),
        });
    }
    let signature = decode_fixed::<64>(&file.signature, "signature")?;
    let manifest = file.manifest()?;
    if !trusted.verify(&manifest.signing_bytes(purpose), &signature) {
        return Err(FolderError::BadSignature);
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn setup() -> (tempfile::TempDir, SigningSecret) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("a.txt"), b"alpha").unwrap();
        fs::write(dir.path().join("sub/b.txt"), b"beta").unwrap();
        fs::write(dir.path().join("sub/c.txt"), b"gamma").unwrap();
        let key = SigningSecret::generate(&SystemRandom::new()).unwrap();
        write_folder_signature(dir.path(), Purpose::Kit, &key).unwrap();
        (dir, key)
    }

    fn verify(dir: &tempfile::TempDir, key: &SigningSecret) -> Result<Manifest, FolderError> {
        verify_folder(dir.path(), Purpose::Kit, &key.public().unwrap())
    }

    #[test]
    fn untouched_folder_verifies() {
        let (dir, key) = setup();
        assert_eq!(verify(&dir, &key).unwrap().files.len(), 3);
    }

    #[test]
    fn each_change_is_named() {
        let (dir, key) = setup();
        fs::write(dir.path().join("sub/b.txt"), b"BETA").unwrap();
        assert!(matches!(verify(&dir, &key), Err(FolderError::FileChanged(p)) if p == "sub/b.txt"));

        let (dir, key) = setup();
        fs::write(dir.path().join("sub/a2.txt"), b"new").unwrap();
        assert!(matches!(verify(&dir, &key), Err(FolderError::FileAdded(p)) if p == "sub/a2.txt"));

        let (dir, key) = setup();
        fs::remove_file(dir.path().join("sub/c.txt")).unwrap();
        assert!(matches!(verify(&dir, &key), Err(FolderError::FileRemoved(p)) if p == "sub/c.txt"));
    }

    #[test]
    fn other_signer_purpose_and_forgery_rejected() {
        let (dir, key) = setup();
        let other = SigningSecret::generate(&SystemRandom::new()).unwrap();
        assert!(matches!(
            verify(&dir, &other),
            Err(FolderError::WrongSigner { .. })
        ));
        assert!(matches!(
            verify_folder(dir.path(), Purpose::Job, &key.public().unwrap()),
            Err(FolderError::WrongPurpose { .. })
        ));
        // Re-hash a changed file into signature.json without re-signing.
        fs::write(dir.path().join("a.txt"), b"evil").unwrap();
        let p = dir.path().join(SIGNATURE_FILE);
        let mut sf = SignatureFile::parse(&fs::read(&p).unwrap()).unwrap();
        sf.files.insert(
            "a.txt".into(),
            hex::encode(ring::digest::digest(&SHA256, b"evil")),
        );
        fs::write(&p, serde_json::to_vec(&sf).unwrap()).unwrap();
        assert!(matches!(verify(&dir, &key), Err(FolderError::BadSignature)));
        fs::remove_file(&p).unwrap();
        assert!(matches!(verify(&dir, &key), Err(FolderError::Unsigned(_))));
    }

    #[test]
    fn bad_paths_in_manifest_rejected() {
        for bad in ["../x", "/etc/passwd", "a//b", "a/./b", ""] {
            assert!(check_rel_path(bad).is_err(), "{bad}");
        }
        assert!(check_rel_path("a/b.txt").is_ok());
    }
}
