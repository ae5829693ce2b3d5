//! Unpacking OCI layers into a directory as a normal user, safely.
//!
//! Every path is resolved with `openat2(RESOLVE_BENEATH)` from the target's
//! file descriptor, so no entry can create, change or follow anything outside
//! the target: absolute names and `..` are refused outright, and a symlink
//! that would lead out (absolute, or climbing above the root) makes the
//! entry that goes through it fail. Symlinks that stay inside (`bin ->
//! usr/bin`) may be written through. The final component is never followed.
//!
//! What a normal user cannot create is recorded in QEMU's 9p `mapped-xattr`
//! format (hw/9pfs/9p-local.c): `user.virtfs.uid`, `.gid`, `.mode` (u32
//! little-endian, `mode` with the file-type bits), `.rdev` (u64 LE, glibc
//! `dev_t` encoding). Device nodes and FIFOs become empty regular files
//! carrying those. Symlinks cannot carry `user.*` xattrs on Linux, so their
//! (rarely meaningful) owner is not recorded.
//!
//! On the host every file is readable by its owner and every directory
//! readable and searchable (so the user, QEMU and `rm` can always walk the
//! tree); setuid/setgid/sticky bits exist only in the xattrs. Directory
//! modes and times are applied after all layers, deepest first, so mode-000
//! and read-only directories can be filled first.

mod entry;
mod limits;
mod meta;
mod remove;
#[cfg(test)]
mod testutil;
mod whiteout;

pub use meta::{XATTR_GID, XATTR_MODE, XATTR_RDEV, XATTR_UID, makedev};
pub use remove::remove_tree;

use entry::read_item;
use limits::RecordCap;
use meta::record_owner;
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, fchmod, futimens};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// One entry, as read from the tar header and its PAX records.
pub(super) struct Item {
    pub(super) rel: PathBuf,
    pub(super) kind: tar::EntryType,
    /// Bytes of content; a sparse file's apparent size.
    pub(super) size: u64,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mode: u32,
    pub(super) mtime: i64,
    pub(super) link: Option<Vec<u8>>,
    pub(super) rdev: Option<u64>,
    pub(super) xattrs: Vec<(String, Vec<u8>)>,
}

/// Why unpacking failed. Every variant names the layer (its digest) and,
/// where there is one, the entry.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {layer}: refused entry {entry}: {reason}")]
    Refused {
        layer: String,
        entry: String,
        reason: String,
    },
    #[error("layer {layer}: cannot read the layer's tar stream{}", entry_note(.entry))]
    Read {
        layer: String,
        entry: Option<String>,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: cannot {op} for entry {entry} under {}", .root.display())]
    Write {
        layer: String,
        entry: String,
        op: &'static str,
        root: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "layer {layer}: entry {entry} ({}) would take the {scope} past the limit of {} of file content per {scope} (`{scope}` in the config's [limits])",
        crate::oci::show_limit(*.size), crate::oci::show_limit(*.limit)
    )]
    TooLarge {
        layer: String,
        entry: String,
        /// `layer` or `image`: which limit.
        scope: &'static str,
        size: u64,
        limit: u64,
    },
    #[error(
        "layer {layer}: the cached blob's digest is sha256:{got}; it was removed from the cache, pull again"
    )]
    Digest { layer: String, got: String },
    #[error("cannot open layer blob {}", .path.display())]
    Blob {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot prepare unpack target {}", .path.display())]
    Target {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the file system of {} does not support user extended attributes (needed to record owners and modes; tmpfs before Linux 6.6 lacks them)",
        .path.display()
    )]
    NoUserXattrs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the final modes and times under {}", .root.display())]
    Finish {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("interrupted")]
    Interrupted,
}

fn entry_note(e: &Option<String>) -> String {
    e.as_ref()
        .map(|e| format!(" (at entry {e})"))
        .unwrap_or_default()
}

/// Layer-given bytes (a name) for messages: control and format characters
/// (escape sequences, bidi overrides), `"` and `\` escaped as Rust does,
/// bytes that are not UTF-8 as `\xNN`.
pub(crate) fn escape(raw: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(raw.len());
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\'' => out.push(c),
                c => out.extend(c.escape_debug()),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// [`escape`]d and quoted: `"usr/bin/\u{1b}[2J"`.
pub fn shown(raw: &[u8]) -> String {
    format!("\"{}\"", escape(raw))
}

/// What an unpack did, for the summary and the tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Xattrs that could not be kept (`security.*`, `trusted.*`, on
    /// symlinks), their names [`escape`]d.
    pub skipped_xattrs: Vec<String>,
    /// Real mode: entries whose owner has no id here (kept as root's).
    pub unmapped_owners: u64,
    /// Real mode: device nodes that could not be created, kept as files
    /// with their xattr record.
    pub devices_as_files: u64,
}

#[derive(Debug, Clone, Copy)]
struct DirMeta {
    host_mode: u32,
    mtime: Option<i64>,
}

/// How owners, setuid bits and devices are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// In QEMU's mapped-xattr attributes (a normal user).
    Xattrs,
    /// For real: chown, full modes, mknod (root, or root of a user
    /// namespace mapping the image's ids; devices it may not create are
    /// kept as xattr-carrying files as in `Xattrs`).
    Real,
}

/// Unpacks layers, in order, into one target directory.
pub(crate) struct Unpacker {
    root: OwnedFd,
    root_path: PathBuf,
    dirs: HashMap<PathBuf, DirMeta>,
    record: Record,
    /// Bytes of file content one layer, and all layers, may write.
    max_layer: u64,
    max_image: u64,
    /// Bytes of file content the current layer wrote so far.
    layer_bytes: u64,
    pub stats: Stats,
}

/// Where an error happened, filled in as an entry is processed.
struct Ctx<'a> {
    layer: &'a str,
    entry: &'a str,
    root: &'a Path,
}

enum Fail {
    Refuse(String),
    /// (scope, entry size, limit)
    TooLarge(&'static str, u64, u64),
    Io(&'static str, io::Error),
    Read(io::Error),
    NoXattrs(io::Error),
    Interrupted,
}

impl Ctx<'_> {
    fn err(&self, f: Fail) -> UnpackError {
        match f {
            Fail::Refuse(reason) => UnpackError::Refused {
                layer: self.layer.into(),
                entry: self.entry.into(),
                reason,
            },
            Fail::TooLarge(scope, size, limit) => UnpackError::TooLarge {
                layer: self.layer.into(),
                entry: self.entry.into(),
                scope,
                size,
                limit,
            },
            Fail::Io(op, source) => UnpackError::Write {
                layer: self.layer.into(),
                entry: self.entry.into(),
                op,
                root: self.root.into(),
                source,
            },
            Fail::Read(source) => UnpackError::Read {
                layer: self.layer.into(),
                entry: Some(self.entry.into()),
                source,
            },
            Fail::NoXattrs(source) => UnpackError::NoUserXattrs {
                path: self.root.into(),
                source,
            },
            Fail::Interrupted => UnpackError::Interrupted,
        }
    }
}

fn io_fail(op: &'static str) -> impl Fn(Errno) -> Fail {
    move |e| Fail::Io(op, io::Error::from(e))
}

/// A reader that hashes and counts what passes through.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl Unpacker {
    /// Prepares to unpack into `target`, an existing empty directory, owners
    /// recorded in xattrs (the tests' shorthand for [`Unpacker::with_record`]).
    #[cfg(test)]
    pub(crate) fn new(target: &Path) -> Result<Self, UnpackError> {
        Self::with_record(target, Record::Xattrs)
    }

    /// As [`Unpacker::new`], keeping owners as `record` says.
    pub fn with_record(target: &Path, record: Record) -> Result<Self, UnpackError> {
        let terr = |source: io::Error| UnpackError::Target {
            path: target.into(),
            source,
        };
        let root = nix::fcntl::open(
            target,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| terr(e.into()))?;
        // Fail early, before any download is wasted, on a file system
        // without user xattrs.
        let probe = match record {
            Record::Xattrs => record_owner(root.as_fd(), 0, 0, libc::S_IFDIR | 0o755, None),
            Record::Real => Ok(()),
        };
        probe.map_err(|f| match f {
            Fail::NoXattrs(source) => UnpackError::NoUserXattrs {
                path: target.into(),
                source,
            },
            Fail::Io(_, e) => terr(e),
            _ => terr(io::Error::other("unexpected")),
        })?;
        let mut dirs = HashMap::new();
        dirs.insert(
            PathBuf::new(),
            DirMeta {
                host_mode: 0o755,
                mtime: None,
            },
        );
        Ok(Unpacker {
            root,
            root_path: target.into(),
            dirs,
            record,
            max_layer: crate::oci::Limits::default().layer,
            max_image: crate::oci::Limits::default().image,
            layer_bytes: 0,
            stats: Stats::default(),
        })
    }

    /// Opens `rel` beneath the root; symlinks inside the tree are followed,
    /// ones leading out fail with EXDEV.
    fn open_beneath(&self, rel: &Path, flags: OFlag) -> Result<OwnedFd, Errno> {
        let path: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        loop {
            match openat2(self.root.as_fd(), path, how) {
                // A concurrent rename can make the kernel ask for a retry.
                Err(Errno::EAGAIN) => continue,
                r => return r,
            }
        }
    }

    fn resolve_fail(e: Errno, what: &str) -> Fail {
        match e {
            Errno::EXDEV => {
                Fail::Refuse(format!("{what} leads outside the tree through a symlink"))
            }
            Errno::ELOOP => Fail::Refuse(format!("{what} goes through too many symlinks")),
            Errno::ENOTDIR => Fail::Refuse(format!(
                "{what} goes through something that is not a directory"
            )),
            e => Fail::Io("open the parent directory", e.into()),
        }
    }

    /// Unpacks the layer blob at `blob` (gzip, zstd or plain tar, sniffed),
    /// verifying on the way that its bytes still have the digest `layer`.
    pub fn unpack_layer(
        &mut self,
        blob: &Path,
        layer: &str,
        cancel: &AtomicBool,
    ) -> Result<(), UnpackError> {
        let file = std::fs::File::open(blob).map_err(|source| UnpackError::Blob {
            path: blob.into(),
            source,
        })?;
        let mut raw = BufReader::with_capacity(
            256 << 10,
            Hashing {
                inner: file,
                hasher: Sha256::new(),
            },
        );
        let read_err = |source: io::Error| UnpackError::Read {
            layer: layer.into(),
            entry: None,
            source,
        };
        let head = raw.fill_buf().map_err(read_err)?.to_vec();
        let result = (|| {
            let reader: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
                Box::new(flate2::read::MultiGzDecoder::new(&mut raw))
            } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                Box::new(zstd::Decoder::with_buffer(&mut raw).map_err(read_err)?)
            } else {
                Box::new(&mut raw)
            };
            let mut decoded = BufReader::with_capacity(256 << 10, reader);
            self.unpack_tar(&mut decoded, layer, cancel)?;
            // The end of the archive may leave padding or compressed bytes.
            io::copy(&mut decoded, &mut io::sink()).map_err(read_err)?;
            Ok(())
        })();
        // Hash to the end even after a failure: a corrupt cached blob is
        // reported (and dropped) as such, not as a broken layer.
        let drained = io::copy(&mut raw, &mut io::sink());
        let got = crate::oci::hex(&raw.into_inner().hasher.finalize());
        if format!("sha256:{got}") != layer && !matches!(result, Err(UnpackError::Interrupted)) {
            let _ = std::fs::remove_file(blob);
            return Err(UnpackError::Digest {
                layer: layer.into(),
                got,
            });
        }
        result?;
        drained.map_err(read_err)?;
        Ok(())
    }

    /// Unpacks one uncompressed tar stream as the layer `layer`.
    pub fn unpack_tar<R: Read>(
        &mut self,
        r: R,
        layer: &str,
        cancel: &AtomicBool,
    ) -> Result<(), UnpackError> {
        let mut archive = tar::Archive::new(RecordCap::new(r));
        let root = self.root_path.clone();
        let read_err = |entry: Option<String>, source: io::Error| UnpackError::Read {
            layer: layer.into(),
            entry,
            source,
        };
        // Paths this layer wrote: its whiteouts apply only to lower layers.
        let mut touched: HashSet<PathBuf> = HashSet::new();
        let mut last: Option<String> = None;
        self.layer_bytes = 0;
        for entry in archive.entries().map_err(|e| read_err(None, e))? {
            if cancel.load(Ordering::Relaxed) {
                return Err(UnpackError::Interrupted);
            }
            let mut entry = entry.map_err(|e| read_err(last.clone(), e))?;
            if entry.header().entry_type() == tar::EntryType::XGlobalHeader {
                // Defaults for the entries that follow (a comment, a
                // commit id from `git archive`); Docker and containerd
                // ignore them too.
                continue;
            }
            let raw = entry.path_bytes().into_owned();
            let name = shown(&raw);
            let ctx = Ctx {
                layer,
                entry: &name,
                root: &root,
            };
            let item = read_item(&mut entry, &raw).map_err(|f| ctx.err(f))?;
            self.stats.entries += 1;
            self.apply(item, &mut entry, &mut touched, cancel)
                .map_err(|f| ctx.err(f))?;
            last = Some(name);
        }
        Ok(())
    }

    /// Applies the directories' final modes and times, deepest first.
    pub fn finish(self) -> Result<Stats, UnpackError> {
        let mut dirs: Vec<(&PathBuf, &DirMeta)> = self.dirs.iter().collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        let ferr = |e: Errno| UnpackError::Finish {
            root: self.root_path.clone(),
            source: e.into(),
        };
        for (rel, meta) in dirs {
            let fd = match self.open_beneath(
                rel,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            ) {
                Ok(fd) => fd,
                // Removed or replaced by a later layer.
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::EXDEV) => continue,
                Err(e) => return Err(ferr(e)),
            };
            fchmod(fd.as_fd(), Mode::from_bits_truncate(meta.host_mode)).map_err(ferr)?;
            if let Some(m) = meta.mtime {
                let t = TimeSpec::new(m, 0);
                futimens(fd.as_fd(), &t, &t).map_err(ferr)?;
            }
        }
        Ok(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::unpack::testutil::*;
    use tar::EntryType as T;

    #[test]
    fn layers_apply_in_order_and_escapes_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let (target, outside) = (d.path().join("t"), d.path().join("out"));
        std::fs::create_dir_all(&target).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let no = AtomicBool::new(false);
        let mut u = Unpacker::new(&target).unwrap();
        let one = pack(vec![
            (header(T::Directory, "d/", 0o755), b""),
            (header(T::Regular, "d/old", 0o644), b"o"),
            (header(T::Regular, "keep", 0o644), b"k"),
            (link(T::Symlink, "lib", "d"), b""),
        ]);
        u.unpack_tar(one.as_slice(), "sha256:one", &no).unwrap();
        let two = pack(vec![
            (header(T::Regular, "d/.wh..wh..opq", 0o644), b""),
            (header(T::Regular, "lib/new", 0o644), b"n"),
            (link(T::Link, "keep2", "keep"), b""),
        ]);
        u.unpack_tar(two.as_slice(), "sha256:two", &no).unwrap();
        let out = outside.to_str().unwrap();
        let bad = pack(vec![
            (link(T::Symlink, "esc", out), b""),
            (header(T::Regular, "esc/pwned", 0o644), b"x"),
        ]);
        let e = u
            .unpack_tar(bad.as_slice(), "sha256:bad", &no)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "layer sha256:bad: refused entry \"esc/pwned\": its path leads outside the tree through a symlink"
        );
        u.finish().unwrap();
        assert!(!target.join("d/old").exists());
        assert_eq!(std::fs::read_to_string(target.join("d/new")).unwrap(), "n");
        assert_eq!(std::fs::read_to_string(target.join("keep2")).unwrap(), "k");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        remove_tree(&target).unwrap();
        assert!(!target.exists());
    }

    #[test]
    fn pax_global_headers_are_ignored_as_docker_does() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        let records = b"52 comment=c0ffee0000000000000000000000000000000000\n";
        h.set_path("pax_global_header").unwrap();
        h.set_entry_type(tar::EntryType::XGlobalHeader);
        h.set_size(records.len() as u64);
        h.set_cksum();
        b.append(&h, &records[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("a").unwrap();
        h.set_mode(0o644);
        h.set_size(1);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let layer = b.into_inner().unwrap();
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        u.unpack_tar(
            layer.as_slice(),
            "sha256:git-archive",
            &AtomicBool::new(false),
        )
        .unwrap();
        let stats = u.finish().unwrap();
        assert_eq!(stats.entries, 1);
        assert_eq!(std::fs::read(d.path().join("a")).unwrap(), b"x");
        assert!(!d.path().join("pax_global_header").exists());
    }

    #[test]
    fn names_in_messages_are_escaped() {
        assert_eq!(
            shown(b"a\x1b[2J\r\xff\xe2\x80\xaeb\"c'd"),
            r#""a\u{1b}[2J\r\xff\u{202e}b\"c'd""#
        );
        let d = tempfile::tempdir().unwrap();
        let no = AtomicBool::new(false);
        let mut u = Unpacker::new(d.path()).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        // An xattr on a symlink is skipped, and reported.
        b.append_pax_extensions([("SCHILY.xattr.user.\x1b]0;pwned\x07", &b"v"[..])])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("l").unwrap();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_link_name("a").unwrap();
        h.set_size(0);
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
        u.unpack_tar(b.into_inner().unwrap().as_slice(), "sha256:x", &no)
            .unwrap();
        assert_eq!(
            u.stats.skipped_xattrs,
            [r"user.\u{1b}]0;pwned\u{7} (on a symlink)"]
        );
        let bad = {
            let mut h = tar::Header::new_ustar();
            let name = b"bad\xff\x1b[2J/../x";
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_size(0);
            h.set_cksum();
            let mut b = tar::Builder::new(Vec::new());
            b.append(&h, io::empty()).unwrap();
            b.into_inner().unwrap()
        };
        let e = u
            .unpack_tar(bad.as_slice(), "sha256:x", &no)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            r#"layer sha256:x: refused entry "bad\xff\u{1b}[2J/../x": path has a `..` component"#
        );
    }

    #[test]
    fn later_layers_replace_entries_and_finish_leaves_replaced_directories() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let mut u = Unpacker::new(p).unwrap();
        let mut x = header(T::Directory, "x/", 0o755);
        x.set_mtime(5000);
        let lower = pack(vec![
            (header(T::Regular, "file", 0o644), b"f"),
            (x, b""),
            (header(T::Regular, "keep/f", 0o644), b"k"),
            (header(T::Regular, "e/g/h", 0o644), b"e"),
        ]);
        unpack(&mut u, &lower).unwrap();
        let mut x = header(T::Regular, "x", 0o600);
        x.set_mtime(7000);
        let upper = pack(vec![
            (header(T::Directory, "file/", 0o755), b""),
            (x, b"now a file"),
            (header(T::Directory, "keep/", 0o755), b""),
            (header(T::Regular, "e", 0o644), b"was a tree"),
        ]);
        unpack(&mut u, &upper).unwrap();
        u.finish().unwrap();
        assert!(p.join("file").is_dir());
        assert_eq!(std::fs::read(p.join("keep/f")).unwrap(), b"k");
        assert_eq!(std::fs::read(p.join("e")).unwrap(), b"was a tree");
        assert_eq!(std::fs::read(p.join("x")).unwrap(), b"now a file");
        // The directory x's mode and time are not applied to the file.
        assert_eq!(perms(&p.join("x")), 0o600);
        assert_eq!(mtime_of(&p.join("x")), 7000);
    }

    #[test]
    fn a_cached_blob_without_its_digest_is_removed_unless_interrupted() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("t");
        std::fs::create_dir(&target).unwrap();
        let (blob, _) = zero_layer(d.path(), &[("a", 10)]);
        let wrong = format!("sha256:{}", "0".repeat(64));
        let mut u = Unpacker::new(&target).unwrap();
        let e = u
            .unpack_layer(&blob, &wrong, &AtomicBool::new(true))
            .unwrap_err();
        assert!(matches!(e, UnpackError::Interrupted), "{e:?}");
        assert!(blob.exists());
        let e = u
            .unpack_layer(&blob, &wrong, &AtomicBool::new(false))
            .unwrap_err();
        assert!(matches!(e, UnpackError::Digest { .. }), "{e:?}");
        assert!(!blob.exists());
    }

    #[test]
    fn a_target_must_be_a_directory_with_user_xattrs() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("file");
        std::fs::write(&file, "").unwrap();
        for record in [Record::Xattrs, Record::Real] {
            let e = Unpacker::with_record(&file, record).err().unwrap();
            assert!(
                matches!(&e, UnpackError::Target { source, .. } if source.raw_os_error() == Some(libc::ENOTDIR)),
                "{e:?}"
            );
        }
        // sysfs has no user xattrs.
        let e = Unpacker::new(Path::new("/sys")).err().unwrap();
        assert!(matches!(e, UnpackError::NoUserXattrs { .. }), "{e:?}");
        assert!(Unpacker::with_record(Path::new("/sys"), Record::Real).is_ok());
        // procfs refuses them outright: the error says why.
        let e = Unpacker::new(Path::new("/proc/self")).err().unwrap();
        assert!(
            matches!(&e, UnpackError::Target { source, .. } if source.raw_os_error() == Some(libc::EPERM)),
            "{e:?}"
        );
    }
}
