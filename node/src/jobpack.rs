//! Job folders in transit: [`pack`] turns an admin's job folder into a signed [`JobBundle`],
//! and [`unpack_verified`] turns an untrusted bundle back into a folder whose admin signature
//! has been checked against the files actually written.
//!
//! The signature is the crypto crate's folder signature (`signature.json`, purpose
//! [`Purpose::Job`]); a bundle carries it beside the files, so any node can re-verify the
//! admin's signature itself, however many hops the bundle took.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flare_crypto::folder::{
    FolderError, MAX_DEPTH, Purpose, SIGNATURE_FILE, SignatureFile, sign_folder, verify_folder,
};
use flare_crypto::{SigningPublicKey, SigningSecret};
use ring::digest::{SHA256, digest};
use serde_bytes::ByteBuf;

use crate::job::{Job, JobError};
use crate::net::protocol::{JobBundle, MAX_CONTROL_REQUEST};

/// The most files a job bundle may carry.
pub const MAX_JOB_FILES: usize = 1_000;
/// The bundle's payload (file contents, paths and the signature) must stay below this, so the
/// bundle fits in one control request with room for the envelope.
pub const MAX_JOB_BYTES: u64 = (MAX_CONTROL_REQUEST - 64 * 1024) as u64;
/// The longest path component accepted in a bundle (bytes), as most file systems allow.
pub const MAX_COMPONENT_LEN: usize = 255;

/// Why a job folder could not be packed or a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobPackError {
    /// A file or folder could not be read, written or removed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The job folder does not load (bad `meta.json` or config); the message names the file
    /// and the key.
    #[error("invalid job: {0}")]
    Job(#[from] JobError),
    /// The job folder holds something that cannot be sent: a symlink, a special file, a
    /// name that is not UTF-8, a `signature.json` of its own, or folders nested too deep.
    #[error("cannot pack {path}: {reason}")]
    Unsupported {
        /// The entry.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// The job has more files than a bundle may carry.
    #[error("the job has more than {cap} files")]
    TooManyFiles {
        /// [`MAX_JOB_FILES`].
        cap: usize,
    },
    /// The job is larger than a bundle may be.
    #[error(
        "the job is {size} bytes or more (files, paths and signature); the cap is below {cap} bytes"
    )]
    TooLarge {
        /// The size reached when packing stopped (at least this much).
        size: u64,
        /// [`MAX_JOB_BYTES`].
        cap: u64,
    },
    /// A file changed while it was being packed (its bytes differ from what was signed).
    #[error("{0} changed while the job was being packed; try again")]
    ChangedWhilePacking(String),
    /// A path in a bundle is not a safe relative path.
    #[error("bad path {path:?} in job bundle: {reason}")]
    BadPath {
        /// The path as received (escaped when printed).
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two paths in a bundle name the same file.
    #[error("duplicate path {0:?} in job bundle")]
    DuplicatePath(String),
    /// The destination folder already exists; unpacking never writes into an existing one.
    #[error("{0} already exists")]
    DestExists(PathBuf),
    /// Signing failed, or the admin's signature does not match the files (the message names
    /// the first file added, removed or changed).
    #[error("job signature: {0}")]
    Signature(#[source] FolderError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JobPackError + '_ {
    move |source| JobPackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every regular file under a folder, by `/`-separated relative path, read under the caps.
#[derive(Debug, Default)]
pub(crate) struct FolderFiles {
    /// Relative path → contents.
    pub(crate) files: BTreeMap<String, ByteBuf>,
    /// Bytes counted so far against [`MAX_JOB_BYTES`] (contents and paths).
    pub(crate) size: u64,
}

impl FolderFiles {
    /// Reads every file under `dir`; symlinks and special files are errors that name them.
    pub(crate) fn read(dir: &Path) -> Result<FolderFiles, JobPackError> {
        let mut out = FolderFiles::default();
        out.walk(dir, "", 0)?;
        Ok(out)
    }

    /// Adds `extra` bytes to the size, failing past the cap.
    pub(crate) fn charge(&mut self, extra: u64) -> Result<(), JobPackError> {
        self.size = self.size.saturating_add(extra);
        if self.size >= MAX_JOB_BYTES {
            return Err(JobPackError::TooLarge {
                size: self.size,
                cap: MAX_JOB_BYTES,
            });
        }
        Ok(())
    }

    fn walk(&mut self, dir: &Path, prefix: &str, depth: usize) -> Result<(), JobPackError> {
        if depth > MAX_DEPTH {
            return Err(JobPackError::Unsupported {
                path: dir.to_path_buf(),
                reason: "folders nest too deep",
            });
        }
        let mut entries = Vec::new();
        for entry in fs::read_dir(dir).map_err(io(dir))? {
            entries.push(entry.map_err(io(dir))?);
        }
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let Ok(name) = entry.file_name().into_string() else {
                return Err(JobPackError::Unsupported {
                    path,
                    reason: "file name is not UTF-8",
                });
            };
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let ty = entry.file_type().map_err(io(&path))?;
            if ty.is_dir() {
                self.walk(&path, &rel, depth + 1)?;
            } else if ty.is_file() {
                if self.files.len() >= MAX_JOB_FILES {
                    return Err(JobPackError::TooManyFiles { cap: MAX_JOB_FILES });
                }
                self.charge(rel.len() as u64)?;
                let bytes = self.read_capped(&path)?;
                self.files.insert(rel, ByteBuf::from(bytes));
            } else if ty.is_symlink() {
                return Err(JobPackError::Unsupported {
                    path,
                    reason: "symlinks are not sent; copy the file into the job folder",
                });
            } else {
                return Err(JobPackError::Unsupported {
                    path,
                    reason: "not a regular file or folder",
                });
            }
        }
        Ok(())
    }

    /// Reads one file, charging its length; never reads past the cap.
    fn read_capped(&mut self, path: &Path) -> Result<Vec<u8>, JobPackError> {
        let f = fs::File::open(path).map_err(io(path))?;
        let room = MAX_JOB_BYTES.saturating_sub(self.size);
        // Refuse a file that cannot fit before reading any of it.
        let len = f.metadata().map_err(io(path))?.len();
        if len >= room {
            return Err(JobPackError::TooLarge {
                size: self.size.saturating_add(len),
                cap: MAX_JOB_BYTES,
            });
        }
        let mut bytes = Vec::new();
        f.take(room).read_to_end(&mut bytes).map_err(io(path))?;
        self.charge(bytes.len() as u64)?;
        Ok(bytes)
    }
}

/// Packs a job folder for submission: checks that it loads as a job, reads every file, and
/// signs the folder with the admin's key. Nothing is written into `job_dir`.
pub fn pack(job_dir: &Path, admin: &SigningSecret) -> Result<JobBundle, JobPackError> {
    Job::load(job_dir)?;
    let mut read = FolderFiles::read(job_dir)?;
    if read.files.contains_key(SIGNATURE_FILE) {
        return Err(JobPackError::Unsupported {
            path: job_dir.join(SIGNATURE_FILE),
            reason: "the name is reserved for the job signature; remove or rename the file",
        });
    }
    let sig = sign_folder(job_dir, Purpose::Job, admin).map_err(JobPackError::Signature)?;
    // The signature was made over the files as they were when signing; make sure they are
    // the bytes in the bundle, or the server would refuse the job with a confusing reason.
    for (path, bytes) in &read.files {
        let hash = hex::encode(digest(&SHA256, bytes));
        if sig.files.get(path) != Some(&hash) {
            return Err(JobPackError::ChangedWhilePacking(path.clone()));
        }
    }
    if let Some(extra) = sig.files.keys().find(|p| !read.files.contains_key(*p)) {
        return Err(JobPackError::ChangedWhilePacking(extra.clone()));
    }
    let signature = serde_json::to_vec_pretty(&sig)
        .map_err(|e| JobPackError::Signature(FolderError::Malformed(e.to_string())))?;
    read.charge(signature.len() as u64)?;
    Ok(JobBundle {
        files: read.files,
        signature: ByteBuf::from(signature),
    })
}

/// Checks one bundle path and returns its components.
fn check_path(path: &str) -> Result<Vec<&str>, JobPackError> {
    let bad = |reason| JobPackError::BadPath {
        path: path.to_owned(),
        reason,
    };
    if path.is_empty() {
        return Err(bad("empty path"));
    }
    if path.contains('\0') {
        return Err(bad("contains NUL"));
    }
    if path.contains('\\') {
        return Err(bad("contains a backslash"));
    }
    if path.starts_with('/') {
        return Err(bad("absolute path"));
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() > MAX_DEPTH + 1 {
        return Err(bad("folders nest too deep"));
    }
    for c in &parts {
        match *c {
            "" => return Err(bad("empty path component")),
            "." | ".." => return Err(bad("`.` or `..` component")),
            c if c.len() > MAX_COMPONENT_LEN => return Err(bad("path component over 255 bytes")),
            _ => {}
        }
    }
    if path == SIGNATURE_FILE {
        return Err(bad(
            "signature.json travels beside the files, not among them",
        ));
    }
    Ok(parts)
}

/// Checks every path of an untrusted bundle and its size, before anything is written.
fn check_bundle(bundle: &JobBundle) -> Result<(), JobPackError> {
    if bundle.files.len() > MAX_JOB_FILES {
        return Err(JobPackError::TooManyFiles { cap: MAX_JOB_FILES });
    }
    let mut size = bundle.signature.len() as u64;
    let mut files: BTreeMap<Vec<&str>, &str> = BTreeMap::new();
    for (path, bytes) in &bundle.files {
        let parts = check_path(path)?;
        size = size.saturating_add(path.len() as u64 + bytes.len() as u64);
        if files.insert(parts, path).is_some() {
            return Err(JobPackError::DuplicatePath(path.clone()));
        }
    }
    if size >= MAX_JOB_BYTES {
        return Err(JobPackError::TooLarge {
            size,
            cap: MAX_JOB_BYTES,
        });
    }
    // A file may not also be a folder of another file ("a" and "a/b").
    let mut prev: Option<&Vec<&str>> = None;
    for parts in files.keys() {
        if let Some(p) = prev.filter(|p| parts.len() > p.len() && parts[..p.len()] == p[..]) {
            return Err(JobPackError::DuplicatePath(p.join("/")));
        }
        prev = Some(parts);
    }
    // The signature must at least parse before any file is written.
    SignatureFile::parse(&bundle.signature).map_err(JobPackError::Signature)?;
    Ok(())
}

/// Writes an untrusted bundle into a new folder `dest` and verifies the admin's signature over
/// the files written. On any failure `dest` is removed, so no half-written or unverified job
/// stays on disk.
pub fn unpack_verified(
    bundle: &JobBundle,
    dest: &Path,
    admin_key: &SigningPublicKey,
) -> Result<(), JobPackError> {
    check_bundle(bundle)?;
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    match fs::create_dir(dest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(JobPackError::DestExists(dest.to_path_buf()));
        }
        Err(e) => return Err(io(dest)(e)),
    }
    let result = write_and_verify(bundle, dest, admin_key);
    if result.is_err() {
        if let Err(e) = fs::remove_dir_all(dest) {
            tracing::warn!(dest = %dest.display(), error = %e, "could not remove a refused job folder");
        }
    }
    result
}

fn write_and_verify(
    bundle: &JobBundle,
    dest: &Path,
    admin_key: &SigningPublicKey,
) -> Result<(), JobPackError> {
    for (rel, bytes) in &bundle.files {
        let path = dest.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        write_new(&path, bytes)?;
    }
    write_new(&dest.join(SIGNATURE_FILE), &bundle.signature)?;
    verify_folder(dest, Purpose::Job, admin_key).map_err(JobPackError::Signature)?;
    Ok(())
}

/// Creates a file that must not exist yet and writes `bytes` into it.
pub(crate) fn write_new(path: &Path, bytes: &[u8]) -> Result<(), JobPackError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use ring::rand::SystemRandom;

    fn key() -> SigningSecret {
        SigningSecret::generate(&SystemRandom::new()).unwrap()
    }

    /// A valid job folder (synthetic learner, so no data folder is needed).
    pub(crate) fn write_job(dir: &Path) {
        let w = |rel: &str, text: &str| {
            let p = dir.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        };
        w(
            "meta.json",
            r#"{"name": "packed", "min_clients": 2, "deploy_map": {"app": ["@ALL"]}}"#,
        );
        w(
            "app/config/config_fed_server.json",
            r#"{"format_version": 2,
              "workflows": [{"id": "sag", "name": "ScatterAndGather",
                             "args": {"num_rounds": 2, "min_clients": 2}}],
              "components": [
                {"id": "model", "name": "MnistMlp", "args": {"hidden": 16}},
                {"id": "aggregator", "name": "FedAvg", "args": {}},
                {"id": "persistor", "name": "SafetensorsPersistor", "args": {"save_every_round": false}}
              ]}"#,
        );
        w(
            "app/config/config_fed_client.json",
            r#"{"format_version": 2, "executors": [{"tasks": ["train"],
               "executor": {"name": "SyntheticLearner", "args": {"num_params": 10}}}]}"#,
        );
        w("app/custom/notes.bin", "\u{0}\u{1}binary");
    }

    fn packed() -> (tempfile::TempDir, SigningSecret, JobBundle) {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("job");
        write_job(&job);
        let k = key();
        let bundle = pack(&job, &k).unwrap();
        (dir, k, bundle)
    }

    #[test]
    fn round_trip_keeps_bytes_and_loads() {
        let (dir, k, bundle) = packed();
        assert!(!dir.path().join("job").join(SIGNATURE_FILE).exists());
        assert_eq!(
            bundle.files.keys().collect::<Vec<_>>(),
            [
                "app/config/config_fed_client.json",
                "app/config/config_fed_server.json",
                "app/custom/notes.bin",
                "meta.json"
            ]
        );
        let dest = dir.path().join("out");
        unpack_verified(&bundle, &dest, &k.public().unwrap()).unwrap();
        for (rel, bytes) in &bundle.files {
            assert_eq!(fs::read(dest.join(rel)).unwrap(), bytes.as_slice(), "{rel}");
            assert_eq!(
                fs::read(dir.path().join("job").join(rel)).unwrap(),
                bytes.as_slice()
            );
        }
        let job = Job::load(&dest).unwrap();
        assert_eq!(job.meta.name, "packed");
        // Into an existing folder: refused, and the folder is left alone.
        let err = unpack_verified(&bundle, &dest, &k.public().unwrap()).unwrap_err();
        assert!(matches!(err, JobPackError::DestExists(_)), "{err}");
        assert!(dest.join("meta.json").exists());
    }

    #[test]
    fn pack_rejects_bad_job_with_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        write_job(dir.path());
        fs::write(
            dir.path().join("meta.json"),
            r#"{"name": "x", "min_clients": 0, "deploy_map": {"app": ["@ALL"]}}"#,
        )
        .unwrap();
        let err = pack(dir.path(), &key()).unwrap_err().to_string();
        assert!(
            err.contains("meta.json") && err.contains("min_clients"),
            "{err}"
        );
    }

    #[test]
    fn pack_refuses_symlinks_special_files_and_signature() {
        let dir = tempfile::tempdir().unwrap();
        write_job(dir.path());
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("app/link")).unwrap();
        let err = pack(dir.path(), &key()).unwrap_err();
        assert!(
            matches!(&err, JobPackError::Unsupported { path, .. } if path.ends_with("app/link")),
            "{err}"
        );
        fs::remove_file(dir.path().join("app/link")).unwrap();

        let fifo = dir.path().join("app/fifo");
        let ok = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            let err = pack(dir.path(), &key()).unwrap_err();
            assert!(
                matches!(&err, JobPackError::Unsupported { path, .. } if path.ends_with("app/fifo")),
                "{err}"
            );
            fs::remove_file(&fifo).unwrap();
        }

        fs::write(dir.path().join(SIGNATURE_FILE), "{}").unwrap();
        let err = pack(dir.path(), &key()).unwrap_err();
        assert!(err.to_string().contains(SIGNATURE_FILE), "{err}");
    }

    #[test]
    fn pack_caps_files_and_size() {
        let dir = tempfile::tempdir().unwrap();
        write_job(dir.path());
        fs::write(
            dir.path().join("app/big.bin"),
            vec![0u8; MAX_JOB_BYTES as usize],
        )
        .unwrap();
        let err = pack(dir.path(), &key()).unwrap_err();
        assert!(
            matches!(
                err,
                JobPackError::TooLarge {
                    cap: MAX_JOB_BYTES,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&MAX_JOB_BYTES.to_string()));
        fs::remove_file(dir.path().join("app/big.bin")).unwrap();

        let many = dir.path().join("app/many");
        fs::create_dir(&many).unwrap();
        for i in 0..MAX_JOB_FILES {
            fs::write(many.join(i.to_string()), b"x").unwrap();
        }
        let err = pack(dir.path(), &key()).unwrap_err();
        assert!(matches!(err, JobPackError::TooManyFiles { .. }), "{err}");
    }

    fn with_path(bundle: &JobBundle, path: &str) -> JobBundle {
        let mut b = bundle.clone();
        b.files
            .insert(path.to_owned(), ByteBuf::from(b"x".to_vec()));
        b
    }

    #[test]
    fn hostile_paths_are_refused_and_nothing_is_written() {
        let (dir, k, bundle) = packed();
        let long = "a".repeat(256);
        let cases: &[(&str, &str)] = &[
            ("/etc/evil", "absolute"),
            ("../evil", "`..`"),
            ("app/../../evil", "`..`"),
            ("./meta2.json", "`.`"),
            ("app//x", "empty path component"),
            ("app/", "empty path component"),
            ("", "empty path"),
            ("app\\..\\evil", "backslash"),
            ("app/x\0y", "NUL"),
            (&long, "255 bytes"),
            (SIGNATURE_FILE, "signature.json"),
        ];
        for (i, (path, reason)) in cases.iter().enumerate() {
            let dest = dir.path().join(format!("out{i}"));
            let err = unpack_verified(&with_path(&bundle, path), &dest, &k.public().unwrap())
                .unwrap_err();
            assert!(
                matches!(&err, JobPackError::BadPath { .. }) && err.to_string().contains(reason),
                "{path:?}: {err}"
            );
            assert!(!dest.exists(), "{path:?}");
        }
        assert!(!dir.path().join("evil").exists());
        // A file that is also a folder of another file.
        let dest = dir.path().join("dup");
        let err = unpack_verified(
            &with_path(&bundle, "meta.json/inner"),
            &dest,
            &k.public().unwrap(),
        )
        .unwrap_err();
        assert!(matches!(err, JobPackError::DuplicatePath(_)), "{err}");
        assert!(!dest.exists());
    }

    #[test]
    fn tampering_is_named_and_leaves_nothing() {
        let (dir, k, bundle) = packed();
        let pk = k.public().unwrap();
        let check = |b: &JobBundle, key: &SigningPublicKey, want: &str| {
            let dest = dir.path().join("out");
            let err = unpack_verified(b, &dest, key).unwrap_err();
            assert!(
                matches!(err, JobPackError::Signature(_)) && err.to_string().contains(want),
                "want {want:?}: {err}"
            );
            assert!(!dest.exists());
        };
        let mut b = bundle.clone();
        if let Some(f) = b.files.get_mut("app/custom/notes.bin") {
            f[0] ^= 1;
        }
        check(&b, &pk, "changed: app/custom/notes.bin");

        check(
            &with_path(&bundle, "app/extra.py"),
            &pk,
            "added after signing: app/extra.py",
        );

        let mut b = bundle.clone();
        b.files.remove("meta.json");
        check(&b, &pk, "removed: meta.json");

        check(&bundle, &key().public().unwrap(), "not by the trusted key");

        let mut b = bundle.clone();
        b.signature = ByteBuf::from(b"{not json".to_vec());
        check(&b, &pk, "malformed");

        // A signature string flipped inside valid JSON.
        let mut sig: SignatureFile = serde_json::from_slice(&bundle.signature).unwrap();
        let flipped = if sig.signature.starts_with('0') {
            "1"
        } else {
            "0"
        };
        sig.signature.replace_range(0..1, flipped);
        let mut b = bundle.clone();
        b.signature = ByteBuf::from(serde_json::to_vec(&sig).unwrap());
        check(&b, &pk, "bad signature");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_bundles_never_panic(
            files in proptest::collection::btree_map(
                "[a-z./\\\\\0]{0,12}", proptest::collection::vec(any::<u8>(), 0..16), 0..6),
            signature in proptest::collection::vec(any::<u8>(), 0..64),
            json_sig in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let signature = if json_sig {
                format!(r#"{{"version":1,"purpose":"job","algorithm":"ed25519","signer":"{}","files":{{}},"signature":"{}"}}"#,
                    hex::encode(&signature), hex::encode(&signature)).into_bytes()
            } else {
                signature
            };
            let bundle = JobBundle {
                files: files.into_iter().map(|(k, v)| (k, ByteBuf::from(v))).collect(),
                signature: ByteBuf::from(signature),
            };
            let dest = dir.path().join("out");
            let r = unpack_verified(&bundle, &dest, &key().public().unwrap());
            prop_assert!(r.is_err());
            prop_assert!(!dest.exists());
            // Nothing escaped the destination.
            let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
            prop_assert!(left.is_empty());
        }
    }
}
