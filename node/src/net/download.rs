//! Result downloads: a finished job's files streamed from the server to an admin over a
//! `/flare/download/1.0.0` stream, sealed end to end like every bulk transfer, so neither side
//! holds more than a chunk of a file in memory, whatever its size.
//!
//! The admin first asks over the control channel (`AdminRequest::Download`); the server checks
//! the job and answers with the file list (names and sizes). The admin then opens a download
//! stream and writes a length-prefixed CBOR [`DownloadRequest`]. The server checks again that
//! the peer is an admin and the job finished, and sends one sealed stream (route: the job,
//! workflow `admin`, kind `download`): a [`TransferMeta`] whose body lists the files
//! ([`FileEntry`]), then each file's bytes followed by the SHA-256 of those bytes. The admin
//! writes each file to a temporary name beside its destination, checks its size and digest,
//! renames it into place, and acknowledges the stream.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flare_protocols::codec::{decode, encode};
use flare_protocols::shareable::ReturnCode;
use futures::{AsyncReadExt, AsyncWriteExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use super::PeerInfo;
use super::bulk::{BulkError, CHUNK, Route, SealedReader, Sealing, TransferMeta, start_stream};

/// Workflow name bound into download streams.
pub const WORKFLOW: &str = "admin";
/// Message kind bound into download streams.
pub const KIND: &str = "download";
/// Largest download request (bytes).
const MAX_REQUEST: usize = 4 << 10;
/// Largest file list (CBOR bytes).
const MAX_LIST: usize = 4 << 20;

/// What the admin writes on a download stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadRequest {
    /// Job id.
    pub job: String,
}

/// One file of a download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the job's result folder, `/`-separated.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// The regular files under `dir`, sorted by name, with their paths and sizes. Symbolic links
/// and special files are skipped.
pub fn list_files(dir: &Path) -> std::io::Result<Vec<(FileEntry, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d == dir => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            let ty = e.file_type()?;
            let p = e.path();
            if ty.is_dir() {
                stack.push(p);
            } else if ty.is_file() {
                let rel = p
                    .strip_prefix(dir)
                    .map_err(std::io::Error::other)?
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                let size = e.metadata()?.len();
                out.push((FileEntry { name: rel, size }, p));
            }
        }
    }
    out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    Ok(out)
}

/// Whether `name` is a safe relative path: no empty, `.` or `..` components, not absolute, no
/// backslash or NUL.
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains(['\\', '\0'])
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

async fn write_small<W: futures::AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> Result<(), BulkError> {
    let len = u32::try_from(bytes.len()).map_err(|_| BulkError::Malformed("too large".into()))?;
    let mut buf = len.to_be_bytes().to_vec();
    buf.extend_from_slice(bytes);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Admin side: asks for `job`'s files on a freshly opened download stream.
pub async fn request<S: futures::AsyncWrite + Unpin>(
    stream: &mut S,
    job: &str,
) -> Result<(), BulkError> {
    let req = DownloadRequest { job: job.into() };
    let bytes = encode(&req, MAX_REQUEST).map_err(|e| BulkError::Malformed(e.to_string()))?;
    write_small(stream, &bytes).await
}

/// Server side: reads the request of a download stream.
pub async fn read_request<S: futures::AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<DownloadRequest, BulkError> {
    let read = async {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await?;
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_REQUEST {
            return Err(BulkError::Malformed(format!(
                "download request of {n} bytes exceeds {MAX_REQUEST}"
            )));
        }
        let mut buf = vec![0u8; n];
        stream.read_exact(&mut buf).await?;
        decode(&buf, MAX_REQUEST).map_err(|e| BulkError::Malformed(e.to_string()))
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .map_err(|_| BulkError::Stalled(std::time::Duration::from_secs(30)))?
}

/// Server side: seals `files` (names and paths, from [`list_files`]) to `to`; returns the
/// bytes written once the admin acknowledged them. A file whose size changed since it was
/// listed fails the transfer.
pub async fn send_files<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    to: &PeerInfo,
    job: &str,
    files: &[(FileEntry, PathBuf)],
) -> Result<u64, BulkError> {
    let list: Vec<FileEntry> = files.iter().map(|(e, _)| e.clone()).collect();
    let body = encode(&list, MAX_LIST).map_err(|e| BulkError::Malformed(e.to_string()))?;
    let meta = TransferMeta {
        task_id: 0,
        task_name: KIND.into(),
        round: 0,
        return_code: ReturnCode::Ok,
        headers: BTreeMap::new(),
        skeleton: None,
        body: Some(serde_bytes::ByteBuf::from(body)),
        resume: None,
    };
    let route = Route {
        job: job.into(),
        workflow: WORKFLOW.into(),
        round: 0,
        kind: KIND.into(),
    };
    let header = sealing.header(to, &route);
    let mut w = start_stream(stream, sealing, header, &to.cert.sealing_public, &meta).await?;
    let mut buf = vec![0u8; CHUNK];
    for (entry, path) in files {
        let mut f = tokio::fs::File::open(path).await?;
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut left = entry.size;
        while left > 0 {
            let want = left.min(CHUNK as u64) as usize;
            let n = f.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(BulkError::Malformed(format!(
                    "{} shrank while it was sent",
                    entry.name
                )));
            }
            digest.update(&buf[..n]);
            w.push(&buf[..n]).await?;
            left -= n as u64;
        }
        if f.read(&mut buf[..1]).await? != 0 {
            return Err(BulkError::Malformed(format!(
                "{} grew while it was sent",
                entry.name
            )));
        }
        w.push(digest.finish().as_ref()).await?;
    }
    w.finish().await
}

/// A file being received: where it goes, its temporary name, and what is left of it.
struct Incoming {
    entry: FileEntry,
    dest: PathBuf,
    temp: PathBuf,
    file: std::fs::File,
    left: u64,
    digest: ring::digest::Context,
    /// Bytes of the trailing digest received so far.
    trailer: Vec<u8>,
}

/// Removes temporary files left by a failed download.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Admin side: receives the files of `job` from the server `from` into `dir`. The file list
/// in the stream must be `expected` (what the server listed over the control channel). Each
/// file is written to a hidden temporary name beside its destination and renamed into place
/// once its size and SHA-256 check out. Returns the bytes read from the stream.
pub async fn receive_files<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    from: &PeerInfo,
    job: &str,
    expected: &[FileEntry],
    dir: &Path,
) -> Result<u64, BulkError> {
    let mut reader = SealedReader::open(stream, sealing, from).await?;
    let h = reader.header();
    if h.job != job || h.workflow != WORKFLOW || h.kind != KIND {
        return Err(BulkError::Malformed(format!(
            "expected the download of {job}, got {}/{}/{}",
            h.job, h.workflow, h.kind
        )));
    }
    let mut prefix: Vec<u8> = Vec::new();
    let mut list: Option<Vec<FileEntry>> = None;
    let mut next = 0usize;
    let mut current: Option<Incoming> = None;
    let mut cleanup = Cleanup(Vec::new());
    let mut done: Vec<(PathBuf, PathBuf)> = Vec::new();
    while let Some(mut data) = reader.next().await? {
        while !data.is_empty() {
            let Some(files) = &list else {
                // The meta: a u32 length, then CBOR.
                let need = if prefix.len() < 4 {
                    4 - prefix.len()
                } else {
                    let len =
                        u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
                    if len > MAX_LIST + 1024 {
                        return Err(BulkError::Malformed(format!(
                            "download meta of {len} bytes"
                        )));
                    }
                    4 + len - prefix.len()
                };
                let take = need.min(data.len());
                prefix.extend_from_slice(&data[..take]);
                data = &data[take..];
                if prefix.len() > 4 && take == need {
                    let meta: TransferMeta = decode(&prefix[4..], MAX_LIST + 1024)
                        .map_err(|e| BulkError::Malformed(e.to_string()))?;
                    let body = meta.body.ok_or_else(|| {
                        BulkError::Malformed("download without a file list".into())
                    })?;
                    let got: Vec<FileEntry> =
                        decode(&body, MAX_LIST).map_err(|e| BulkError::Malformed(e.to_string()))?;
                    if got != expected {
                        return Err(BulkError::Malformed(
                            "the streamed file list differs from the one the server gave".into(),
                        ));
                    }
                    if let Some(bad) = got.iter().find(|e| !safe_name(&e.name)) {
                        return Err(BulkError::Malformed(format!(
                            "the server sent a file with an unsafe path {:?}",
                            bad.name
                        )));
                    }
                    list = Some(got);
                }
                continue;
            };
            let inc = match current.as_mut() {
                Some(inc) => inc,
                None => {
                    let Some(entry) = files.get(next) else {
                        return Err(BulkError::Malformed(
                            "more bytes than the file list declares".into(),
                        ));
                    };
                    next += 1;
                    let dest = dir.join(&entry.name);
                    let parent = dest.parent().unwrap_or(dir);
                    std::fs::create_dir_all(parent)?;
                    let base = dest
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let temp = parent.join(format!(".{base}.partial"));
                    let file = std::fs::File::create(&temp)?;
                    cleanup.0.push(temp.clone());
                    current.insert(Incoming {
                        left: entry.size,
                        entry: entry.clone(),
                        dest,
                        temp,
                        file,
                        digest: ring::digest::Context::new(&ring::digest::SHA256),
                        trailer: Vec::new(),
                    })
                }
            };
            if inc.left > 0 {
                let take = inc.left.min(data.len() as u64) as usize;
                std::io::Write::write_all(&mut inc.file, &data[..take])?;
                inc.digest.update(&data[..take]);
                inc.left -= take as u64;
                data = &data[take..];
                continue;
            }
            let take = (32 - inc.trailer.len()).min(data.len());
            inc.trailer.extend_from_slice(&data[..take]);
            data = &data[take..];
            if inc.trailer.len() == 32 {
                let inc = current
                    .take()
                    .ok_or(BulkError::Malformed("no file".into()))?;
                let digest = inc.digest.finish();
                if digest.as_ref() != inc.trailer.as_slice() {
                    return Err(BulkError::Malformed(format!(
                        "{}: SHA-256 mismatch",
                        inc.entry.name
                    )));
                }
                inc.file.sync_all()?;
                done.push((inc.temp, inc.dest));
            }
        }
    }
    // An empty last file still needs its digest, and so does every file the list names.
    let complete = list.as_ref().is_some_and(|l| next == l.len()) && current.is_none();
    let declared = list.as_ref().map_or(0, Vec::len);
    if !complete || done.len() != declared {
        return Err(BulkError::Malformed(
            "the download ended before its last file".into(),
        ));
    }
    for (temp, dest) in &done {
        std::fs::rename(temp, dest)?;
    }
    cleanup.0.clear();
    reader.acknowledge().await
}

#[cfg(test)]
mod tests {
    use flare_crypto::{Identity, Role};
    use futures::io::Cursor;

    use super::*;

    fn info(id: &Identity) -> PeerInfo {
        crate::net::test_peer_info(id, Role::Server)
    }

    struct Setup {
        server: Identity,
        admin: Identity,
        src: tempfile::TempDir,
        files: Vec<(FileEntry, PathBuf)>,
        wire: Vec<u8>,
    }

    /// Seals the files of a small result folder (one of them over a chunk) into bytes.
    fn setup(rt: &tokio::runtime::Runtime) -> Setup {
        let rng = ring::rand::SystemRandom::new();
        let (server, admin) = (
            Identity::generate(&rng).unwrap(),
            Identity::generate(&rng).unwrap(),
        );
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("models")).unwrap();
        let big: Vec<u8> = (0..CHUNK + 12345).map(|i| (i % 253) as u8).collect();
        std::fs::write(src.path().join("models/big.safetensors"), &big).unwrap();
        std::fs::write(src.path().join("empty"), b"").unwrap();
        std::fs::write(src.path().join("metrics.json"), b"{\"a\": 1}").unwrap();
        let files = list_files(src.path()).unwrap();
        let sealing = Sealing::new(server.peer_id().unwrap(), server.sealing.clone());
        let mut out = Cursor::new(Vec::new());
        // Nobody acknowledges a cursor: the bytes are all written before that fails.
        let sent = rt.block_on(send_files(
            &mut out,
            &sealing,
            &info(&admin),
            "job-1",
            &files,
        ));
        assert!(
            matches!(sent, Err(BulkError::NotAcknowledged(_))),
            "{sent:?}"
        );
        Setup {
            server,
            admin,
            src,
            files,
            wire: out.into_inner(),
        }
    }

    fn receive(
        rt: &tokio::runtime::Runtime,
        s: &Setup,
        wire: Vec<u8>,
        job: &str,
        expected: &[FileEntry],
        dir: &Path,
    ) -> Result<u64, BulkError> {
        let sealing = Sealing::new(s.admin.peer_id().unwrap(), s.admin.sealing.clone());
        let mut stream = Cursor::new(wire);
        rt.block_on(receive_files(
            &mut stream,
            &sealing,
            &info(&s.server),
            job,
            expected,
            dir,
        ))
    }

    fn entries(s: &Setup) -> Vec<FileEntry> {
        s.files.iter().map(|(e, _)| e.clone()).collect()
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = list_files(dir)
            .unwrap()
            .into_iter()
            .map(|(e, _)| e.name)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn files_round_trip_and_every_failure_leaves_nothing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = setup(&rt);
        let expected = entries(&s);
        assert_eq!(expected.len(), 3);

        let out = tempfile::tempdir().unwrap();
        receive(&rt, &s, s.wire.clone(), "job-1", &expected, out.path()).unwrap();
        for (e, p) in &s.files {
            assert_eq!(
                std::fs::read(out.path().join(&e.name)).unwrap(),
                std::fs::read(p).unwrap()
            );
        }
        assert_eq!(names_in(out.path()), names_in(s.src.path()));

        let fails = |wire: Vec<u8>, job: &str, expected: &[FileEntry]| {
            let out = tempfile::tempdir().unwrap();
            let r = receive(&rt, &s, wire, job, expected, out.path());
            assert!(r.is_err());
            assert!(
                names_in(out.path()).is_empty(),
                "{:?}",
                names_in(out.path())
            );
        };
        // A flipped bit anywhere after the header, a cut stream, another job, another list.
        for at in [200, s.wire.len() / 2, s.wire.len() - 3] {
            let mut bad = s.wire.clone();
            bad[at] ^= 0x40;
            fails(bad, "job-1", &expected);
        }
        for cut in [0, 100, s.wire.len() / 2, s.wire.len() - 1] {
            fails(s.wire[..cut].to_vec(), "job-1", &expected);
        }
        fails(s.wire.clone(), "job-2", &expected);
        let mut other = expected.clone();
        other[0].size += 1;
        fails(s.wire.clone(), "job-1", &other);
        // The same stream twice is a replay for the same receiver.
        let sealing = Sealing::new(s.admin.peer_id().unwrap(), s.admin.sealing.clone());
        let out = tempfile::tempdir().unwrap();
        for (i, wire) in [s.wire.clone(), s.wire.clone()].into_iter().enumerate() {
            let mut stream = Cursor::new(wire);
            let r = rt.block_on(receive_files(
                &mut stream,
                &sealing,
                &info(&s.server),
                "job-1",
                &expected,
                out.path(),
            ));
            assert_eq!(r.is_ok(), i == 0, "{r:?}");
        }
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a", "models/round-001.safetensors", "a/b/c"] {
            assert!(safe_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a\\b",
            "a\0",
        ] {
            assert!(!safe_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn lists_files_recursively_and_sorted() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("models")).unwrap();
        std::fs::write(d.path().join("metrics.json"), b"{}").unwrap();
        std::fs::write(d.path().join("models/r1"), vec![0u8; 10]).unwrap();
        let got: Vec<FileEntry> = list_files(d.path())
            .unwrap()
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        assert_eq!(
            got,
            vec![
                FileEntry {
                    name: "metrics.json".into(),
                    size: 2
                },
                FileEntry {
                    name: "models/r1".into(),
                    size: 10
                },
            ]
        );
        assert!(list_files(&d.path().join("missing")).unwrap().is_empty());
    }
}
