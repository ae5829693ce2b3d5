//! A rootless OCI registry client: references, credentials, manifests, and a
//! digest-verified, content-addressed blob cache with resumable downloads.

pub mod auth;
pub mod blobs;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod resolve;

pub use blobs::BlobStore;
pub use reference::Reference;
pub use registry::Registry;

use std::path::PathBuf;

/// Size limits of a pull, so a hostile or broken image cannot fill the disk
/// or the memory: a 2 KiB layer can hold a sparse file of terabytes, a
/// 4 MiB gzip 4 GiB of zeros. Set in the config's `[limits]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A manifest or index, read into memory (real ones are a few KiB).
    pub manifest: u64,
    /// The image config, read into memory (real ones are a few KiB, with
    /// a long history some 100 KiB).
    pub config: u64,
    /// Bytes of file content one layer may write (sparse files count by
    /// their apparent size, as they are written out in full).
    pub layer: u64,
    /// Bytes of file content all layers of an image may write together.
    pub image: u64,
}

impl Default for Limits {
    /// Far above real images: a Fedora or Debian tree with the kernel's
    /// build tools is 2-4 GiB, the largest common images (CUDA and ML
    /// toolkits) 10-20 GiB with single layers up to about 10 GiB.
    fn default() -> Self {
        Limits {
            manifest: 4 << 20,
            config: 8 << 20,
            layer: 16 << 30,
            image: 32 << 30,
        }
    }
}

/// A limit for messages: `16 GiB`, `512 KiB`, `1000 bytes`.
pub(crate) fn show_limit(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// `12.3 MiB`.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Why talking to a registry or the blob cache failed.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("cannot read registry credentials")]
    AuthFile(#[source] auth::AuthFileError),
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("cannot reach registry {registry} ({url})")]
    Request {
        registry: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry {registry} answered HTTP {status} for {what}{detail}")]
    Status {
        registry: String,
        what: String,
        status: u16,
        detail: String,
    },
    #[error("registry {registry} denied access to {repository}: {hint}")]
    Unauthorized {
        registry: String,
        repository: String,
        hint: String,
    },
    #[error("cannot get a token from {realm} for registry {registry}{detail}")]
    Token {
        realm: String,
        registry: String,
        detail: String,
        #[source]
        source: Option<reqwest::Error>,
    },
    #[error("manifest {reference} of {image}: {reason}")]
    Manifest {
        image: String,
        reference: String,
        reason: String,
    },
    #[error("blob {digest} from {registry}: {reason}")]
    Blob {
        registry: String,
        digest: String,
        reason: String,
    },
    #[error(
        "blob {digest} from {registry}: the content's digest is sha256:{got}, not {digest}; the download was discarded"
    )]
    DigestMismatch {
        registry: String,
        digest: String,
        got: String,
    },
    #[error(
        "cannot read blob {digest} from {registry} (partial download kept, run again to resume)"
    )]
    BlobRead {
        registry: String,
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {op} blob cache file {}", .path.display())]
    Cache {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted")]
    Interrupted,
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex(&sha2::Sha256::digest(bytes)))
}

/// The HTTP server of the unit tests of `blobs` and `registry`.
#[cfg(test)]
mod test_http;
