//! The content-addressed blob cache (`blob_dir/sha256/<hex>`), shared by all
//! trees. A blob gets its final name only after its digest was verified; a
//! download in progress lives in `<hex>.partial` and is resumed with a Range
//! request (a server answering 200 instead of 206 makes it start over).

use super::OciError;
use super::registry::Registry;
use indicatif::ProgressBar;
use nix::fcntl::{Flock, FlockArg};
use reqwest::StatusCode;
use reqwest::header::CONTENT_RANGE;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub struct BlobStore {
    dir: PathBuf,
}

/// How a download went, for the summary and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fetched {
    /// Bytes transferred now (0 when the blob was cached).
    pub downloaded: u64,
    /// Bytes a partial download already had and a 206 answer continued.
    pub resumed_from: u64,
    /// The server ignored a Range request and the download started over.
    pub restarted: bool,
}

impl BlobStore {
    pub fn new(dir: &Path) -> Self {
        BlobStore { dir: dir.into() }
    }

    fn hex(digest: &str) -> &str {
        digest.strip_prefix("sha256:").unwrap_or(digest)
    }

    /// Where the verified blob `digest` lives (whether present or not).
    pub fn path(&self, digest: &str) -> PathBuf {
        self.dir.join("sha256").join(Self::hex(digest))
    }

    /// Where an unfinished download of `digest` lives.
    pub fn partial_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("sha256")
            .join(format!("{}.partial", Self::hex(digest)))
    }

    /// The cached blob, when it is there with the expected size.
    pub fn cached(&self, digest: &str, size: u64) -> Option<PathBuf> {
        let p = self.path(digest);
        std::fs::metadata(&p)
            .ok()
            .filter(|m| m.len() == size)
            .map(|_| p)
    }

    /// Makes sure the verified blob `digest` of `size` bytes is cached,
    /// downloading (or resuming) it from `reg`. `digest` must have been
    /// validated (it becomes a file name).
    pub fn fetch(
        &self,
        reg: &Registry,
        digest: &str,
        size: u64,
        progress: &ProgressBar,
        cancel: &AtomicBool,
    ) -> Result<(PathBuf, Fetched), OciError> {
        super::reference::check_digest(digest).map_err(|reason| OciError::Blob {
            registry: reg.registry.clone(),
            digest: digest.into(),
            reason,
        })?;
        if let Some(p) = self.cached(digest, size) {
            progress.set_position(size);
            return Ok((p, Fetched::default()));
        }
        let cache_err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| OciError::Cache { op, path, source }
        };
        let dir = self.dir.join("sha256");
        std::fs::create_dir_all(&dir).map_err(cache_err("create", &dir))?;
        let partial = self.partial_path(digest);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(cache_err("open", &partial))?;
        // Another mkt downloading the same blob: wait for it, then reuse.
        let mut file = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| cache_err("lock", &partial)(e.into()))?;
        if let Some(p) = self.cached(digest, size) {
            progress.set_position(size);
            return Ok((p, Fetched::default()));
        }
        let result =
            download(reg, digest, size, &mut file, progress, cancel).map_err(|e| match e {
                DownloadError::Oci(e) => e,
                DownloadError::Io(source) => OciError::Cache {
                    op: "write",
                    path: partial.clone(),
                    source,
                },
            });
        match result {
            Ok(fetched) => {
                let done = self.path(digest);
                std::fs::rename(&partial, &done).map_err(cache_err("rename", &partial))?;
                Ok((done, fetched))
            }
            Err(e) => {
                // Wrong bytes are worthless; a short read is kept for resuming.
                if matches!(e, OciError::DigestMismatch { .. } | OciError::Blob { .. }) {
                    let _ = std::fs::remove_file(&partial);
                }
                Err(e)
            }
        }
    }
}

enum DownloadError {
    Oci(OciError),
    Io(std::io::Error),
}

impl From<std::io::Error> for DownloadError {
    fn from(e: std::io::Error) -> Self {
        DownloadError::Io(e)
    }
}

impl From<OciError> for DownloadError {
    fn from(e: OciError) -> Self {
        DownloadError::Oci(e)
    }
}

/// `bytes N-…/…` → N.
fn range_start(resp: &reqwest::blocking::Response) -> Option<u64> {
    let v = resp.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    rest.split('-').next()?.trim().parse().ok()
}

fn download(
    reg: &Registry,
    digest: &str,
    size: u64,
    file: &mut File,
    progress: &ProgressBar,
    cancel: &AtomicBool,
) -> Result<Fetched, DownloadError> {
    let mut fetched = Fetched::default();
    let blob_err = |reason: String| OciError::Blob {
        registry: reg.registry.clone(),
        digest: digest.into(),
        reason,
    };
    let mut have = file.metadata()?.len();
    if have > size {
        file.set_len(0)?;
        have = 0;
    }
    // The bytes already here (all `have` of them: the file is locked)
    // count towards the digest.
    let mut hasher = Sha256::new();
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let mut tries = 0;
    while have < size {
        tries += 1;
        let resp = reg.blob(digest, have)?;
        let status = resp.status();
        let start_over = match status {
            StatusCode::PARTIAL_CONTENT if have > 0 && range_start(&resp) == Some(have) => {
                tracing::debug!("blob {digest}: resumed at byte {have} of {size} (HTTP 206)");
                fetched.resumed_from = have;
                false
            }
            StatusCode::OK => {
                if have > 0 {
                    tracing::debug!(
                        "blob {digest}: the server ignored Range (HTTP 200); starting over"
                    );
                    fetched.restarted = true;
                }
                true
            }
            StatusCode::RANGE_NOT_SATISFIABLE if tries == 1 => {
                file.set_len(0)?;
                have = 0;
                hasher = Sha256::new();
                continue;
            }
            s => {
                return Err(blob_err(format!(
                    "unexpected HTTP {} to a request from byte {have}",
                    s.as_u16()
                ))
                .into());
            }
        };
        if start_over {
            file.set_len(0)?;
            have = 0;
            hasher = Sha256::new();
        }
        file.seek(SeekFrom::Start(have))?;
        progress.set_position(have);
        let mut resp = resp;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(OciError::Interrupted.into());
            }
            let n = match resp.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(OciError::BlobRead {
                        registry: reg.registry.clone(),
                        digest: digest.into(),
                        source,
                    }
                    .into());
                }
            };
            if have + n as u64 > size {
                return Err(blob_err(format!(
                    "the registry sent more than the {size} bytes the manifest says"
                ))
                .into());
            }
            file.write_all(&buf[..n])?;
            hasher.update(&buf[..n]);
            have += n as u64;
            fetched.downloaded += n as u64;
            progress.set_position(have);
        }
        if have < size {
            return Err(OciError::BlobRead {
                registry: reg.registry.clone(),
                digest: digest.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the transfer ended after {have} of {size} bytes"),
                ),
            }
            .into());
        }
    }
    let got = super::hex(&hasher.finalize());
    if format!("sha256:{got}") != digest {
        return Err(OciError::DigestMismatch {
            registry: reg.registry.clone(),
            digest: digest.into(),
            got,
        }
        .into());
    }
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::test_http::{self, response};
    use std::sync::mpsc;

    /// A one-blob HTTP server: answers each request with `respond(range
    /// start)`, and reports each request's range start.
    fn serve(
        n: usize,
        respond: impl Fn(Option<u64>) -> Vec<u8> + Send + 'static,
    ) -> (String, mpsc::Receiver<Option<u64>>) {
        let (port, rx) =
            test_http::serve(n, move |r, _| (r.range_start(), respond(r.range_start())));
        (format!("http://127.0.0.1:{port}"), rx)
    }

    fn setup(
        content: &[u8],
        partial: usize,
        base: &str,
    ) -> (tempfile::TempDir, BlobStore, Registry, String) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let digest = crate::oci::sha256_digest(content);
        std::fs::create_dir_all(dir.path().join("sha256")).unwrap();
        if partial > 0 {
            std::fs::write(store.partial_path(&digest), &content[..partial]).unwrap();
        }
        let reg = Registry::with_base(base, "test-registry", "x/y", None, vec![]).unwrap();
        (dir, store, reg, digest)
    }

    const BLOB: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

    #[test]
    fn resumes_with_range_when_the_server_honours_it() {
        let (base, rx) = serve(1, |start| {
            let s = start.unwrap() as usize;
            response(
                "206 Partial Content",
                &format!(
                    "Content-Range: bytes {s}-{}/{}\r\n",
                    BLOB.len() - 1,
                    BLOB.len()
                ),
                &BLOB[s..],
            )
        });
        let (_d, store, reg, digest) = setup(BLOB, 10, &base);
        let (path, f) = fetch_all(&store, &reg, &digest).unwrap();
        assert_eq!(rx.recv().unwrap(), Some(10));
        assert_eq!(
            f,
            Fetched {
                downloaded: 26,
                resumed_from: 10,
                restarted: false
            }
        );
        assert_eq!(std::fs::read(path).unwrap(), BLOB);
        assert!(!store.partial_path(&digest).exists());
    }

    #[test]
    fn a_server_ignoring_range_still_ends_correct() {
        let (base, rx) = serve(1, |_| response("200 OK", "", BLOB));
        let (_d, store, reg, digest) = setup(BLOB, 20, &base);
        let (path, f) = fetch_all(&store, &reg, &digest).unwrap();
        assert_eq!(rx.recv().unwrap(), Some(20), "a Range request was made");
        assert!(f.restarted);
        assert_eq!(f.downloaded, BLOB.len() as u64);
        assert_eq!(std::fs::read(path).unwrap(), BLOB);
    }

    #[test]
    fn a_short_transfer_keeps_the_partial_and_a_second_fetch_completes_it() {
        // The server promises the whole blob but closes after 15 bytes.
        let (base, rx) = serve(2, |start| match start {
            None => {
                let mut v = response("200 OK", "", BLOB);
                v.truncate(v.len() - (BLOB.len() - 15));
                v
            }
            Some(s) => response(
                "206 Partial Content",
                &format!(
                    "Content-Range: bytes {s}-{}/{}\r\n",
                    BLOB.len() - 1,
                    BLOB.len()
                ),
                &BLOB[s as usize..],
            ),
        });
        let (_d, store, reg, digest) = setup(BLOB, 0, &base);
        let size = BLOB.len() as u64;
        let e = fetch_all(&store, &reg, &digest).unwrap_err();
        assert!(matches!(e, OciError::BlobRead { .. }), "{e:?}");
        assert!(e.to_string().contains(&digest), "{e}");
        // The read error itself (hyper's incomplete body), not retried into
        // another request or our own end-of-transfer message.
        let source = std::error::Error::source(&e).unwrap();
        let io = source.downcast_ref::<std::io::Error>().unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::Other, "{io:?}");
        assert_eq!(
            std::fs::metadata(store.partial_path(&digest))
                .unwrap()
                .len(),
            15
        );
        assert!(store.cached(&digest, size).is_none());
        let (_, f) = fetch_all(&store, &reg, &digest).unwrap();
        assert_eq!((rx.recv().unwrap(), rx.recv().unwrap()), (None, Some(15)));
        assert_eq!(f.resumed_from, 15);
        assert_eq!(std::fs::read(store.path(&digest)).unwrap(), BLOB);
    }

    #[test]
    fn wrong_content_is_an_error_naming_the_digest_and_is_discarded() {
        let (base, _rx) = serve(1, |_| {
            response("200 OK", "", b"not the blob you want, friend!!!!!!!")
        });
        let (_d, store, reg, digest) = setup(BLOB, 0, &base);
        let e = fetch_all(&store, &reg, &digest).unwrap_err();
        assert!(matches!(e, OciError::DigestMismatch { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&digest) && msg.contains("test-registry"),
            "{msg}"
        );
        assert!(!store.partial_path(&digest).exists());
        assert!(!store.path(&digest).exists());
    }

    #[test]
    fn too_many_bytes_are_refused() {
        let mut long = BLOB.to_vec();
        long.extend_from_slice(b"extra");
        let (base, _rx) = serve(1, move |_| response("200 OK", "", &long));
        let (_d, store, reg, digest) = setup(BLOB, 0, &base);
        let e = fetch_all(&store, &reg, &digest).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        assert!(!store.partial_path(&digest).exists());
    }

    fn fetch_all(
        store: &BlobStore,
        reg: &Registry,
        digest: &str,
    ) -> Result<(PathBuf, Fetched), OciError> {
        let size = BLOB.len() as u64;
        store.fetch(
            reg,
            digest,
            size,
            &ProgressBar::hidden(),
            &AtomicBool::new(false),
        )
    }

    #[test]
    fn blobs_are_named_by_their_hex_digest() {
        let store = BlobStore::new(Path::new("/cache"));
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            store.path(&d),
            Path::new("/cache/sha256").join("ab".repeat(32))
        );
        assert_eq!(
            store.partial_path(&d),
            Path::new("/cache/sha256").join(format!("{}.partial", "ab".repeat(32)))
        );
    }

    #[test]
    fn a_cached_blob_of_the_right_size_is_not_fetched_again() {
        // The server answers one request only: a second fetch must not ask.
        let (base, rx) = serve(1, |_| response("200 OK", "", BLOB));
        let (_d, store, reg, digest) = setup(BLOB, 0, &base);
        let (first, f) = fetch_all(&store, &reg, &digest).unwrap();
        assert_eq!(f.downloaded, BLOB.len() as u64);
        assert!(!f.restarted && f.resumed_from == 0, "{f:?}");
        assert_eq!(
            store.cached(&digest, BLOB.len() as u64),
            Some(first.clone())
        );
        assert_eq!(store.cached(&digest, BLOB.len() as u64 + 1), None);
        let (again, f) = fetch_all(&store, &reg, &digest).unwrap();
        assert_eq!((again, f), (first, Fetched::default()));
        assert_eq!(rx.recv().unwrap(), None);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_partial_longer_than_the_blob_starts_over() {
        let (base, rx) = serve(1, |_| response("200 OK", "", BLOB));
        let (_d, store, reg, digest) = setup(BLOB, 0, &base);
        let mut long = BLOB.to_vec();
        long.extend_from_slice(b"junk");
        std::fs::write(store.partial_path(&digest), long).unwrap();
        let (path, f) = fetch_all(&store, &reg, &digest).unwrap();
        assert_eq!(rx.recv().unwrap(), None, "no Range after a bad partial");
        assert_eq!(f.downloaded, BLOB.len() as u64);
        assert_eq!(std::fs::read(path).unwrap(), BLOB);
    }

    #[test]
    fn a_complete_partial_is_verified_and_kept_without_a_request() {
        // mkt stopped between the last byte and the rename: no server needed.
        let (base, _rx) = serve(0, |_| Vec::new());
        let (_d, store, reg, digest) = setup(BLOB, BLOB.len(), &base);
        let (path, f) = fetch_all(&store, &reg, &digest).unwrap();
        assert_eq!(f, Fetched::default());
        assert_eq!(std::fs::read(path).unwrap(), BLOB);
    }

    fn partial_content(from: u64) -> Vec<u8> {
        let s = from as usize;
        response(
            "206 Partial Content",
            &format!(
                "Content-Range: bytes {s}-{}/{}\r\n",
                BLOB.len() - 1,
                BLOB.len()
            ),
            &BLOB[s..],
        )
    }

    #[test]
    fn a_range_the_server_cannot_satisfy_starts_over_once() {
        // 416 to the first ranged request: start from byte 0, once.
        let (base, rx) = serve(2, |start| match start {
            Some(_) => response("416 Range Not Satisfiable", "", b""),
            None => response("200 OK", "", BLOB),
        });
        let (_d, store, reg, digest) = setup(BLOB, 20, &base);
        let (path, _) = fetch_all(&store, &reg, &digest).unwrap();
        assert_eq!((rx.recv().unwrap(), rx.recv().unwrap()), (Some(20), None));
        assert_eq!(std::fs::read(path).unwrap(), BLOB);
        // A second 416 (to a request from byte 0) is an error, not a loop.
        let (base, _rx) = serve(2, |_| response("416 Range Not Satisfiable", "", b""));
        let (_d, store, reg, digest) = setup(BLOB, 20, &base);
        let e = fetch_all(&store, &reg, &digest).unwrap_err();
        assert!(
            e.to_string()
                .contains("unexpected HTTP 416 to a request from byte 0"),
            "{e}"
        );
    }

    #[test]
    fn a_206_from_another_byte_or_unasked_is_refused() {
        for (partial, from) in [(20, 10), (0, 0)] {
            let (base, _rx) = serve(1, move |_| partial_content(from));
            let (_d, store, reg, digest) = setup(BLOB, partial, &base);
            let e = fetch_all(&store, &reg, &digest).unwrap_err();
            assert!(
                e.to_string().contains(&format!(
                    "unexpected HTTP 206 to a request from byte {partial}"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn a_body_cut_short_without_a_length_is_an_error_naming_the_bytes() {
        // No Content-Length: the end of the connection ends the body.
        let (base, _rx) = serve(1, |_| {
            let mut v = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
            v.extend_from_slice(&BLOB[..15]);
            v
        });
        let (_d, store, reg, digest) = setup(BLOB, 0, &base);
        let e = fetch_all(&store, &reg, &digest).unwrap_err();
        assert!(matches!(e, OciError::BlobRead { .. }), "{e:?}");
        let chain = format!("{:?}", e);
        assert!(
            chain.contains("the transfer ended after 15 of 36 bytes"),
            "{chain}"
        );
    }
}
