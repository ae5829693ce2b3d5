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

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, UtimensatFlags, fchmod, fstatat, futimens, mkdirat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{UnlinkatFlags, linkat, symlinkat, unlinkat};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub const XATTR_UID: &str = "user.virtfs.uid";
pub const XATTR_GID: &str = "user.virtfs.gid";
pub const XATTR_MODE: &str = "user.virtfs.mode";
pub const XATTR_RDEV: &str = "user.virtfs.rdev";

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
pub fn escape(raw: &[u8]) -> String {
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
pub struct Stats {
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
pub struct Unpacker {
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

/// The normalised components of an entry name: `./a//b/` → `a/b`.
/// Absolute names and `..` are refused.
pub fn normalize(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    let mut out = PathBuf::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path has a `..` component".into()),
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok(out)
}

/// glibc's `makedev` encoding, which QEMU stores in `user.virtfs.rdev`.
pub fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}

fn fsetxattr(fd: BorrowedFd, name: &str, value: &[u8]) -> io::Result<()> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid fd, NUL-terminated name, and a buffer of value.len() bytes.
    let r = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            c.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP))
}

/// Owner, group, full mode (with type bits) and device number, as QEMU's
/// mapped-xattr security model reads them.
fn record_owner(
    fd: BorrowedFd,
    uid: u32,
    gid: u32,
    mode: u32,
    rdev: Option<u64>,
) -> Result<(), Fail> {
    let set = |name, v: &[u8]| {
        fsetxattr(fd, name, v).map_err(|e| {
            if is_unsupported(&e) {
                Fail::NoXattrs(e)
            } else {
                Fail::Io("record the owner in xattrs", e)
            }
        })
    };
    set(XATTR_UID, &uid.to_le_bytes())?;
    set(XATTR_GID, &gid.to_le_bytes())?;
    set(XATTR_MODE, &mode.to_le_bytes())?;
    if let Some(r) = rdev {
        set(XATTR_RDEV, &r.to_le_bytes())?;
    }
    Ok(())
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

/// PAX and GNU long-name records larger than this are refused, as Go's
/// archive/tar (hence Docker) refuses them: the tar crate reads them into
/// memory whole, so a few KiB of gzip could take GiB of memory.
pub const MAX_TAR_RECORDS: u64 = 1 << 20;

/// Passes a tar stream through, following its headers (as the tar crate
/// reads them) to refuse oversized PAX and long-name records before the
/// tar crate reads them. A stream it cannot follow (a bad checksum, which
/// the tar crate reports itself) is no longer checked.
struct RecordCap<R> {
    inner: R,
    state: Track,
    block: [u8; 512],
    filled: usize,
    /// The records of the last PAX header, while they apply.
    pax: Option<Vec<u8>>,
}

#[derive(Clone, Copy)]
enum Track {
    /// Reading a header block.
    Header,
    /// Skipping content and padding.
    Skip(u64),
    /// Keeping a PAX header's records, then skipping its padding.
    Pax { left: u64, pad: u64 },
    /// Reading GNU sparse extension blocks, then skipping `data`.
    SparseExt { data: u64 },
    /// The end of the archive, or a stream it cannot follow.
    Off,
}

fn padded(n: u64) -> u64 {
    n.div_ceil(512).saturating_mul(512)
}

impl<R: Read> RecordCap<R> {
    fn new(inner: R) -> Self {
        RecordCap {
            inner,
            state: Track::Header,
            block: [0; 512],
            filled: 0,
            pax: None,
        }
    }

    /// The state after the header in `self.block`.
    fn header(&mut self) -> io::Result<Track> {
        use tar::EntryType as T;
        if self.block.iter().all(|b| *b == 0) {
            return Ok(Track::Off);
        }
        let h = tar::Header::from_byte_slice(&self.block);
        let sum: u32 = self.block[..148]
            .iter()
            .chain(&self.block[156..])
            .map(|b| u32::from(*b))
            .sum::<u32>()
            + 8 * 32;
        let Ok(size) = h.entry_size() else {
            return Ok(Track::Off);
        };
        if h.cksum().ok() != Some(sum) {
            return Ok(Track::Off);
        }
        let kind = h.entry_type();
        let recognized = h.as_gnu().is_some() || h.as_ustar().is_some();
        let special = kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink();
        if special && recognized && size > MAX_TAR_RECORDS {
            return Err(io::Error::other(format!(
                "a {} record of {size} bytes, more than the {} mkt (like Docker) reads",
                match kind {
                    T::XHeader => "PAX",
                    T::XGlobalHeader => "PAX global",
                    _ => "GNU long name",
                },
                crate::oci::show_limit(MAX_TAR_RECORDS)
            )));
        }
        if special {
            if kind.is_pax_local_extensions() && recognized {
                self.pax = Some(Vec::new());
                return Ok(Track::Pax {
                    left: size,
                    pad: padded(size) - size,
                });
            }
            if !(recognized && (kind.is_gnu_longname() || kind.is_gnu_longlink())) {
                // An entry of its own, which the PAX records went to.
                self.pax = None;
            }
            return Ok(Track::Skip(padded(size)));
        }
        // As the tar crate does: a PAX size wins over the header's.
        let pax = self.pax.take();
        let size = pax
            .as_deref()
            .and_then(|p| {
                tar::PaxExtensions::new(p)
                    .filter_map(Result::ok)
                    .find(|e| e.key_bytes() == b"size")
                    .map(|e| {
                        std::str::from_utf8(e.value_bytes())
                            .ok()?
                            .parse::<u64>()
                            .ok()
                    })
            })
            .flatten()
            .unwrap_or(size);
        if kind.is_gnu_sparse() && h.as_gnu().is_some_and(|g| g.is_extended()) {
            return Ok(Track::SparseExt { data: padded(size) });
        }
        Ok(Track::Skip(padded(size)))
    }

    /// Follows the stream through `buf`.
    fn follow(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.state {
                Track::Off => return Ok(()),
                Track::Skip(n) => {
                    let k = n.min(buf.len() as u64);
                    buf = &buf[k as usize..];
                    self.state = if n == k {
                        Track::Header
                    } else {
                        Track::Skip(n - k)
                    };
                }
                Track::Pax { left, pad } => {
                    let k = left.min(buf.len() as u64) as usize;
                    if let Some(p) = &mut self.pax {
                        p.extend_from_slice(&buf[..k]);
                    }
                    buf = &buf[k..];
                    self.state = if left == k as u64 {
                        if pad == 0 {
                            Track::Header
                        } else {
                            Track::Skip(pad)
                        }
                    } else {
                        Track::Pax {
                            left: left - k as u64,
                            pad,
                        }
                    };
                }
                Track::Header | Track::SparseExt { .. } => {
                    let k = (512 - self.filled).min(buf.len());
                    self.block[self.filled..self.filled + k].copy_from_slice(&buf[..k]);
                    self.filled += k;
                    buf = &buf[k..];
                    if self.filled < 512 {
                        continue;
                    }
                    self.filled = 0;
                    self.state = match self.state {
                        Track::SparseExt { data } if self.block[504] != 0 => {
                            Track::SparseExt { data }
                        }
                        Track::SparseExt { data: 0 } => Track::Header,
                        Track::SparseExt { data } => Track::Skip(data),
                        _ => self.header()?,
                    };
                    if let Track::Skip(0) = self.state {
                        self.state = Track::Header;
                    }
                }
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for RecordCap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.follow(&buf[..n])?;
        Ok(n)
    }
}

/// One entry, as read from the tar header and its PAX records.
struct Item {
    rel: PathBuf,
    kind: tar::EntryType,
    /// Bytes of content; a sparse file's apparent size.
    size: u64,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
    link: Option<Vec<u8>>,
    rdev: Option<u64>,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Unpacker {
    /// Prepares to unpack into `target`, an existing empty directory.
    pub fn new(target: &Path) -> Result<Self, UnpackError> {
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

    /// The bytes of file content one layer, and all layers together, may
    /// write; an entry that would go past either fails the unpack before
    /// it is written.
    pub fn set_limits(&mut self, layer: u64, image: u64) {
        self.max_layer = layer;
        self.max_image = image;
    }

    /// Reserves `size` bytes of the layer's and the image's budgets.
    fn reserve(&mut self, size: u64) -> Result<(), Fail> {
        if self.layer_bytes.saturating_add(size) > self.max_layer {
            return Err(Fail::TooLarge("layer", size, self.max_layer));
        }
        if self.stats.bytes.saturating_add(size) > self.max_image {
            return Err(Fail::TooLarge("image", size, self.max_image));
        }
        self.layer_bytes += size;
        self.stats.bytes += size;
        Ok(())
    }

    /// Keeps the entry's owner (and, for `Xattrs`, its full mode and
    /// device number) on the open file `fd`.
    fn own(
        &mut self,
        fd: BorrowedFd,
        uid: u32,
        gid: u32,
        mode: u32,
        rdev: Option<u64>,
    ) -> Result<(), Fail> {
        match self.record {
            Record::Xattrs => record_owner(fd, uid, gid, mode, rdev),
            Record::Real => match nix::unistd::fchown(fd, Some(uid.into()), Some(gid.into())) {
                Ok(()) => Ok(()),
                // An id the user namespace does not map.
                Err(Errno::EINVAL) => {
                    self.stats.unmapped_owners += 1;
                    Ok(())
                }
                Err(e) => Err(Fail::Io("set the owner", e.into())),
            },
        }
    }

    /// The mode a file gets on the host.
    fn file_mode(&self, mode: u32) -> u32 {
        match self.record {
            Record::Xattrs => host_file_mode(mode),
            Record::Real => mode & 0o7777,
        }
    }

    /// The mode a directory gets on the host (applied last).
    fn dir_mode(&self, mode: u32) -> u32 {
        match self.record {
            Record::Xattrs => host_dir_mode(mode),
            Record::Real => mode & 0o7777,
        }
    }

    /// Real mode: the owner of `name` in `pfd` (never following it); an id
    /// the user namespace does not map leaves it root's, counted.
    fn chown_at(&mut self, pfd: BorrowedFd, name: &OsStr, it: &Item) -> Result<(), Fail> {
        match nix::unistd::fchownat(
            pfd,
            name,
            Some(it.uid.into()),
            Some(it.gid.into()),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(()) => Ok(()),
            Err(Errno::EINVAL) => {
                self.stats.unmapped_owners += 1;
                Ok(())
            }
            Err(e) => Err(Fail::Io("set the owner", e.into())),
        }
    }

    /// Real mode: a device node or FIFO made with mknod. False when this
    /// process may not (devices in a user namespace).
    fn mknod(&mut self, pfd: BorrowedFd, name: &OsStr, it: &Item) -> Result<bool, Fail> {
        use tar::EntryType as T;
        let kind = match it.kind {
            T::Char => nix::sys::stat::SFlag::S_IFCHR,
            T::Block => nix::sys::stat::SFlag::S_IFBLK,
            _ => nix::sys::stat::SFlag::S_IFIFO,
        };
        let perm = Mode::from_bits_truncate(it.mode & 0o7777);
        match nix::sys::stat::mknodat(pfd, name, kind, perm, it.rdev.unwrap_or(0) as _) {
            Ok(()) => {}
            Err(Errno::EPERM) if kind != nix::sys::stat::SFlag::S_IFIFO => {
                self.stats.devices_as_files += 1;
                return Ok(false);
            }
            Err(e) => return Err(Fail::Io("create the device node", e.into())),
        }
        self.chown_at(pfd, name, it)?;
        // mknod applied the umask; the node was just made, not a symlink.
        nix::sys::stat::fchmodat(
            pfd,
            name,
            perm,
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(io_fail("set the node's mode"))?;
        let t = TimeSpec::new(it.mtime, 0);
        utimensat(pfd, name, &t, &t, UtimensatFlags::NoFollowSymlink)
            .map_err(io_fail("set the node's time"))?;
        Ok(true)
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

    /// The directory that will hold `rel`, creating missing ancestors (as
    /// root-owned 0755 directories, as Docker does).
    fn parent_dir(&mut self, rel: &Path) -> Result<OwnedFd, Fail> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
        match self.open_beneath(parent, flags) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(Self::resolve_fail(e, "its path")),
        }
        let mut cur = PathBuf::new();
        let mut cur_fd = self
            .open_beneath(&cur, flags)
            .map_err(io_fail("open the root"))?;
        for comp in parent.components() {
            let next = cur.join(comp);
            cur_fd = match self.open_beneath(&next, flags) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    mkdirat(
                        cur_fd.as_fd(),
                        comp.as_os_str(),
                        Mode::from_bits_truncate(0o700),
                    )
                    .map_err(io_fail("create a parent directory"))?;
                    let fd = openat(
                        cur_fd.as_fd(),
                        comp.as_os_str(),
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(io_fail("open a new parent directory"))?;
                    self.own(fd.as_fd(), 0, 0, libc::S_IFDIR | 0o755, None)?;
                    self.dirs.insert(
                        next.clone(),
                        DirMeta {
                            host_mode: 0o755,
                            mtime: None,
                        },
                    );
                    self.open_beneath(&next, flags)
                        .map_err(|e| Self::resolve_fail(e, "its path"))?
                }
                Err(e) => return Err(Self::resolve_fail(e, "its path")),
            };
            cur = next;
        }
        Ok(cur_fd)
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

    #[allow(clippy::too_many_lines)] // still to be split (the structure issue)
    fn apply(
        &mut self,
        it: Item,
        data: &mut dyn Read,
        touched: &mut HashSet<PathBuf>,
        cancel: &AtomicBool,
    ) -> Result<(), Fail> {
        use tar::EntryType as T;
        let Some(file_name) = it.rel.file_name().map(|n| n.to_os_string()) else {
            // The archive's root entry ("./") describes the tree's root.
            if !it.kind.is_dir() {
                return Err(Fail::Refuse(
                    "the tree's root can only be a directory".into(),
                ));
            }
            let root = self
                .root
                .try_clone()
                .map_err(|e| Fail::Io("open the root", e))?;
            self.own(root.as_fd(), it.uid, it.gid, libc::S_IFDIR | it.mode, None)?;
            let host_mode = self.dir_mode(it.mode);
            self.dirs.insert(
                PathBuf::new(),
                DirMeta {
                    host_mode,
                    mtime: Some(it.mtime),
                },
            );
            return Ok(());
        };
        let name_bytes = file_name.as_bytes();
        if let Some(victim) = name_bytes.strip_prefix(b".wh.") {
            return self.whiteout(&it.rel, victim, touched);
        }
        let mut p = it.rel.as_path();
        while let Some(parent) = p.parent() {
            touched.insert(parent.to_path_buf());
            p = parent;
        }
        touched.insert(it.rel.clone());
        let pfd = self.parent_dir(&it.rel)?;
        let name = file_name.as_os_str();
        match it.kind {
            T::Directory => {
                if !self.remove_existing(pfd.as_fd(), name, true)? {
                    mkdirat(pfd.as_fd(), name, Mode::from_bits_truncate(0o700))
                        .map_err(io_fail("create the directory"))?;
                }
                let fd = openat(
                    pfd.as_fd(),
                    name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io_fail("open the directory"))?;
                self.own(fd.as_fd(), it.uid, it.gid, libc::S_IFDIR | it.mode, None)?;
                self.set_xattrs(fd.as_fd(), &it.xattrs)?;
                let host_mode = self.dir_mode(it.mode);
                self.dirs.insert(
                    it.rel.clone(),
                    DirMeta {
                        host_mode,
                        mtime: Some(it.mtime),
                    },
                );
            }
            T::Regular | T::Continuous | T::GNUSparse | T::Char | T::Block | T::Fifo => {
                let special = matches!(it.kind, T::Char | T::Block | T::Fifo);
                if !special {
                    // Before anything is written: a sparse file's holes are
                    // written out as zeros.
                    self.reserve(it.size)?;
                }
                self.remove_existing(pfd.as_fd(), name, false)?;
                if special && self.record == Record::Real && self.mknod(pfd.as_fd(), name, &it)? {
                    return Ok(());
                }
                let fd = openat(
                    pfd.as_fd(),
                    name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(io_fail("create the file"))?;
                let mut f = std::fs::File::from(fd);
                let type_bits = match it.kind {
                    T::Char => libc::S_IFCHR,
                    T::Block => libc::S_IFBLK,
                    T::Fifo => libc::S_IFIFO,
                    _ => {
                        copy_data(data, &mut f, it.size, cancel)?;
                        libc::S_IFREG
                    }
                };
                if special {
                    // A device kept as a file: its record says what it is.
                    record_owner(f.as_fd(), it.uid, it.gid, type_bits | it.mode, it.rdev)?;
                }
                self.own(f.as_fd(), it.uid, it.gid, type_bits | it.mode, it.rdev)?;
                self.set_xattrs(f.as_fd(), &it.xattrs)?;
                // After the chown, which clears setuid bits.
                let host_mode = if special {
                    host_file_mode(it.mode)
                } else {
                    self.file_mode(it.mode)
                };
                fchmod(f.as_fd(), Mode::from_bits_truncate(host_mode))
                    .map_err(io_fail("set the file's mode"))?;
                let t = TimeSpec::new(it.mtime, 0);
                futimens(f.as_fd(), &t, &t).map_err(io_fail("set the file's time"))?;
            }
            T::Symlink => {
                let target = it.link.clone().unwrap_or_default();
                if target.is_empty() {
                    return Err(Fail::Refuse("symlink with an empty target".into()));
                }
                self.remove_existing(pfd.as_fd(), name, false)?;
                symlinkat(OsStr::from_bytes(&target), pfd.as_fd(), name)
                    .map_err(io_fail("create the symlink"))?;
                if self.record == Record::Real {
                    self.chown_at(pfd.as_fd(), name, &it)?;
                }
                let t = TimeSpec::new(it.mtime, 0);
                utimensat(pfd.as_fd(), name, &t, &t, UtimensatFlags::NoFollowSymlink)
                    .map_err(io_fail("set the symlink's time"))?;
                for (k, _) in &it.xattrs {
                    self.stats
                        .skipped_xattrs
                        .push(format!("{} (on a symlink)", escape(k.as_bytes())));
                }
            }
            T::Link => {
                let raw = it.link.clone().unwrap_or_default();
                let target = normalize(&raw)
                    .map_err(|r| Fail::Refuse(format!("hardlink target {}: {r}", shown(&raw))))?;
                let tname = target
                    .file_name()
                    .ok_or_else(|| Fail::Refuse("hardlink to the tree's root".into()))?;
                if target == it.rel {
                    return Ok(());
                }
                let tparent = target.parent().unwrap_or(Path::new(""));
                let tfd = self
                    .open_beneath(tparent, OFlag::O_PATH | OFlag::O_DIRECTORY)
                    .map_err(|e| match e {
                        Errno::ENOENT => Fail::Refuse(format!(
                            "hardlink target {} does not exist",
                            shown(target.as_os_str().as_bytes())
                        )),
                        e => Self::resolve_fail(e, "its hardlink target"),
                    })?;
                match fstatat(tfd.as_fd(), tname, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                        return Err(Fail::Refuse("hardlink to a directory".into()));
                    }
                    Ok(_) => {}
                    Err(Errno::ENOENT) => {
                        return Err(Fail::Refuse(format!(
                            "hardlink target {} does not exist",
                            shown(target.as_os_str().as_bytes())
                        )));
                    }
                    Err(e) => return Err(Fail::Io("inspect the hardlink target", e.into())),
                }
                self.remove_existing(pfd.as_fd(), name, false)?;
                linkat(tfd.as_fd(), tname, pfd.as_fd(), name, AtFlags::empty())
                    .map_err(io_fail("create the hardlink"))?;
            }
            other => {
                return Err(Fail::Refuse(format!("unsupported entry type {other:?}")));
            }
        }
        Ok(())
    }

    /// `.wh.NAME` removes NAME of lower layers; `.wh..wh..opq` empties its
    /// directory of everything lower layers put there.
    fn whiteout(
        &mut self,
        rel: &Path,
        victim: &[u8],
        touched: &HashSet<PathBuf>,
    ) -> Result<(), Fail> {
        let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if victim == b".wh..opq" {
            let fd = match self.open_beneath(&dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => return Ok(()),
                Err(e) => return Err(Self::resolve_fail(e, "its directory")),
            };
            return self.clear_lower(fd, &dir, touched);
        }
        if victim.starts_with(b".wh.") {
            // Other aufs bookkeeping (.wh..wh.plnk, ...): not content.
            return Ok(());
        }
        if victim.is_empty() || victim == b"." || victim == b".." {
            return Err(Fail::Refuse("whiteout of nothing".into()));
        }
        let victim = OsStr::from_bytes(victim);
        if touched.contains(&dir.join(victim)) {
            return Ok(());
        }
        let pfd = match self.open_beneath(&dir, OFlag::O_PATH | OFlag::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(Self::resolve_fail(e, "its directory")),
        };
        self.remove_existing(pfd.as_fd(), victim, false)?;
        Ok(())
    }

    fn clear_lower(
        &mut self,
        dirfd: OwnedFd,
        rel: &Path,
        touched: &HashSet<PathBuf>,
    ) -> Result<(), Fail> {
        let names =
            list_dir(dirfd.as_fd()).map_err(|e| Fail::Io("list the directory", e.into()))?;
        for n in names {
            let child = rel.join(&n);
            if !touched.contains(&child) {
                self.remove_existing(dirfd.as_fd(), &n, false)?;
                continue;
            }
            let st = fstatat(dirfd.as_fd(), n.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(io_fail("inspect an entry"))?;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                let fd = openat(
                    dirfd.as_fd(),
                    n.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io_fail("open a directory"))?;
                self.clear_lower(fd, &child, touched)?;
            }
        }
        Ok(())
    }

    /// Removes whatever is at `name` (never following it); an existing
    /// directory is kept when `keep_dir`. True when a directory was kept.
    fn remove_existing(
        &mut self,
        dirfd: BorrowedFd,
        name: &OsStr,
        keep_dir: bool,
    ) -> Result<bool, Fail> {
        match fstatat(dirfd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(Fail::Io("inspect the existing entry", e.into())),
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                if keep_dir {
                    return Ok(true);
                }
                remove_at(dirfd, name).map_err(|e| Fail::Io("remove the existing directory", e))?;
                Ok(false)
            }
            Ok(_) => {
                unlinkat(dirfd, name, UnlinkatFlags::NoRemoveDir)
                    .map_err(io_fail("remove the existing entry"))?;
                Ok(false)
            }
        }
    }

    fn set_xattrs(&mut self, fd: BorrowedFd, xattrs: &[(String, Vec<u8>)]) -> Result<(), Fail> {
        for (k, v) in xattrs {
            let name = if k.starts_with("user.virtfs.") {
                // Only mkt writes the ownership records.
                self.stats.skipped_xattrs.push(escape(k.as_bytes()));
                continue;
            } else if k.starts_with("user.") {
                k.clone()
            } else if self.record == Record::Real
                && (k == "security.capability" || k.starts_with("system.posix_acl_"))
            {
                // Root (of the namespace) can set these for real.
                k.clone()
            } else if k == "system.posix_acl_access" || k == "system.posix_acl_default" {
                // Where QEMU's mapped-xattr model keeps ACLs.
                format!("user.virtfs.{k}")
            } else {
                self.stats.skipped_xattrs.push(escape(k.as_bytes()));
                continue;
            };
            match fsetxattr(fd, &name, v) {
                Ok(()) => {}
                // A capability or ACL this kernel or namespace refuses
                // (malformed, or for ids it does not map): skipped, like
                // what a normal user cannot set.
                Err(e) if !name.starts_with("user.") => {
                    tracing::debug!("cannot set {name}: {e}");
                    self.stats.skipped_xattrs.push(escape(k.as_bytes()));
                }
                Err(e) => return Err(Fail::Io("set an extended attribute", e)),
            }
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

fn host_file_mode(mode: u32) -> u32 {
    (mode & 0o777) | 0o400
}

fn host_dir_mode(mode: u32) -> u32 {
    (mode & 0o777) | 0o500
}

/// Copies the entry's content, at most the `size` its header announced
/// (and [`Unpacker::reserve`]d).
fn copy_data(
    data: &mut dyn Read,
    out: &mut std::fs::File,
    size: u64,
    cancel: &AtomicBool,
) -> Result<u64, Fail> {
    let mut buf = [0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        let k = match data.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Fail::Read(e)),
        };
        if n + k as u64 > size {
            return Err(Fail::Read(io::Error::other(format!(
                "the entry holds more than the {size} bytes its header says"
            ))));
        }
        out.write_all(&buf[..k])
            .map_err(|e| Fail::Io("write the file", e))?;
        n += k as u64;
        if cancel.load(Ordering::Relaxed) {
            return Err(Fail::Interrupted);
        }
    }
}

fn pax_number(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    // mtime may carry a fraction: "1700000000.123".
    s.split('.').next()?.parse().ok()
}

fn read_item<R: Read>(entry: &mut tar::Entry<R>, raw: &[u8]) -> Result<Item, Fail> {
    let rel = normalize(raw).map_err(Fail::Refuse)?;
    let h = entry.header().clone();
    let kind = h.entry_type();
    let num = |r: io::Result<u64>| r.map_err(Fail::Read);
    // An empty numeric field is 0 (as Go's archive/tar, hence Docker, reads it).
    let blank = |f: &[u8]| f.iter().all(|b| *b == 0 || *b == b' ');
    let old = h.as_old();
    let field = |f: &[u8], r: io::Result<u64>| if blank(f) { Ok(0) } else { num(r) };
    let mut uid = field(&old.uid, h.uid())? as u32;
    let mut gid = field(&old.gid, h.gid())? as u32;
    let mode = field(&old.mode, h.mode().map(u64::from))? as u32 & 0o7777;
    let mut mtime = field(&old.mtime, h.mtime())? as i64;
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(Fail::Read)? {
        for ext in pax {
            let ext = ext.map_err(Fail::Read)?;
            let key = ext.key_bytes();
            let v = ext.value_bytes();
            match key {
                b"uid" => uid = pax_number(v).unwrap_or(uid as i64) as u32,
                b"gid" => gid = pax_number(v).unwrap_or(gid as i64) as u32,
                b"mtime" => mtime = pax_number(v).unwrap_or(mtime),
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        xattrs.push((String::from_utf8_lossy(name).into_owned(), v.to_vec()));
                    }
                }
            }
        }
    }
    let link = entry.link_name_bytes().map(|l| l.into_owned());
    let size = entry.size();
    let rdev = match kind {
        tar::EntryType::Char | tar::EntryType::Block => Some(makedev(
            num(h.device_major().map(|m| u64::from(m.unwrap_or(0))))?,
            num(h.device_minor().map(|m| u64::from(m.unwrap_or(0))))?,
        )),
        _ => None,
    };
    Ok(Item {
        rel,
        kind,
        size,
        uid,
        gid,
        mode,
        mtime,
        link,
        rdev,
        xattrs,
    })
}

fn list_dir(fd: BorrowedFd) -> Result<Vec<std::ffi::OsString>, Errno> {
    let dup = fd
        .try_clone_to_owned()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))?;
    let mut dir = nix::dir::Dir::from_fd(dup)?;
    let mut names = Vec::new();
    for e in dir.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(names)
}

/// Removes `name` in `dirfd` and everything below it, never following
/// symlinks and making read-only or mode-000 directories writable first.
/// Iterative, with one directory open at a time (it climbs back with
/// `..`, checked against the inode it came from), so a tree of any depth
/// is removed within any open-file limit.
fn remove_at(dirfd: BorrowedFd, name: &OsStr) -> io::Result<()> {
    use std::ffi::OsString;
    /// Opens directory `name` in `dir` (made rwx for us first), removes
    /// its non-directories and returns it with its subdirectories' names.
    fn enter(dir: BorrowedFd, name: &OsStr) -> io::Result<(OwnedFd, Vec<OsString>)> {
        let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if st.st_mode & 0o700 != 0o700 {
            nix::sys::stat::fchmodat(
                dir,
                name,
                Mode::from_bits_truncate(0o700),
                // Checked to be a directory; Linux cannot chmod a symlink.
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )?;
        }
        let fd = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut subdirs = Vec::new();
        for n in list_dir(fd.as_fd())? {
            let st = fstatat(fd.as_fd(), n.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                subdirs.push(n);
            } else {
                unlinkat(fd.as_fd(), n.as_os_str(), UnlinkatFlags::NoRemoveDir)?;
            }
        }
        Ok((fd, subdirs))
    }
    let st = fstatat(dirfd, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Ok(unlinkat(dirfd, name, UnlinkatFlags::NoRemoveDir)?);
    }
    let (mut cur, subdirs) = enter(dirfd, name)?;
    // Per level below the top: (its name, its inode); and what is left to
    // visit in each open level.
    let mut path: Vec<(OsString, (u64, u64))> = Vec::new();
    let mut todo: Vec<Vec<OsString>> = vec![subdirs];
    loop {
        if let Some(sub) = todo.last_mut().and_then(|t| t.pop()) {
            let (fd, subdirs) = enter(cur.as_fd(), &sub)?;
            let st = nix::sys::stat::fstat(fd.as_fd())?;
            path.push((sub, (st.st_dev, st.st_ino)));
            todo.push(subdirs);
            cur = fd;
            continue;
        }
        todo.pop();
        let Some((done, id)) = path.pop() else {
            break;
        };
        let up = openat(
            cur.as_fd(),
            "..",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // `..` is where we came from unless the tree was moved meanwhile.
        let st = fstatat(up.as_fd(), done.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if (st.st_dev, st.st_ino) != id {
            return Err(io::Error::other(format!(
                "{} moved while being removed",
                done.to_string_lossy()
            )));
        }
        unlinkat(up.as_fd(), done.as_os_str(), UnlinkatFlags::RemoveDir)?;
        cur = up;
    }
    drop(cur);
    Ok(unlinkat(dirfd, name, UnlinkatFlags::RemoveDir)?)
}

/// Removes the tree at `path` (which must not be a symlink) with everything
/// in it, whatever its directories' modes. A missing path is fine.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no file name"));
    };
    let pfd = nix::fcntl::open(
        parent,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    match remove_at(pfd.as_fd(), name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_or_refused() {
        for (raw, want) in [
            ("./a//b/", Some("a/b")),
            ("a", Some("a")),
            ("./", Some("")),
            ("a/./b", Some("a/b")),
        ] {
            assert_eq!(
                normalize(raw.as_bytes()).ok(),
                want.map(PathBuf::from),
                "{raw}"
            );
        }
        assert_eq!(normalize(b"/etc/passwd").unwrap_err(), "absolute path");
        for raw in ["../x", "a/../b", "a/.."] {
            assert!(
                normalize(raw.as_bytes()).unwrap_err().contains(".."),
                "{raw}"
            );
        }
    }

    #[test]
    fn device_numbers_use_glibcs_encoding() {
        assert_eq!(makedev(1, 3), 0x103);
        assert_eq!(makedev(8, 17), 0x811);
        assert_eq!(makedev(259, 0x12345), 0x1231_0345);
        assert_eq!(makedev(0x12345, 7), libc::makedev(0x12345, 7));
    }

    fn tar_of(entries: &[(tar::EntryType, &str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (kind, name, link_or_data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(*kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            let data: &[u8] = if kind.is_symlink() || kind.is_hard_link() {
                old.linkname[..link_or_data.len()].copy_from_slice(link_or_data.as_bytes());
                b""
            } else {
                link_or_data.as_bytes()
            };
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn layers_apply_in_order_and_escapes_are_refused() {
        use tar::EntryType as T;
        let d = tempfile::tempdir().unwrap();
        let (target, outside) = (d.path().join("t"), d.path().join("out"));
        std::fs::create_dir_all(&target).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let no = AtomicBool::new(false);
        let mut u = Unpacker::new(&target).unwrap();
        let one = tar_of(&[
            (T::Directory, "d/", ""),
            (T::Regular, "d/old", "o"),
            (T::Regular, "keep", "k"),
            (T::Symlink, "lib", "d"),
        ]);
        u.unpack_tar(one.as_slice(), "sha256:one", &no).unwrap();
        let two = tar_of(&[
            (T::Regular, "d/.wh..wh..opq", ""),
            (T::Regular, "lib/new", "n"),
            (T::Link, "keep2", "keep"),
        ]);
        u.unpack_tar(two.as_slice(), "sha256:two", &no).unwrap();
        let out = outside.to_str().unwrap();
        let bad = tar_of(&[(T::Symlink, "esc", out), (T::Regular, "esc/pwned", "x")]);
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

    /// A layer whose only entry is a GNU sparse file of `apparent` bytes
    /// holding one 512-byte block of data at its end.
    fn sparse_tar(apparent: u64) -> Vec<u8> {
        // Base-256, as GNU tar writes numbers too big for octal.
        let num = |n: u64| {
            let mut f = [0u8; 12];
            f[4..].copy_from_slice(&n.to_be_bytes());
            f[0] = 0x80;
            f
        };
        let mut h = tar::Header::new_gnu();
        h.set_path("sparse").unwrap();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_size(512);
        let g = h.as_gnu_mut().unwrap();
        g.realsize = num(apparent);
        g.sparse[0].offset = num(apparent - 512);
        g.sparse[0].numbytes = num(512);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(&[b'x'; 512]);
        out.extend_from_slice(&[0; 1024]);
        out
    }

    #[test]
    fn a_sparse_file_counts_by_its_apparent_size_and_nothing_is_written() {
        let d = tempfile::tempdir().unwrap();
        let no = AtomicBool::new(false);
        // 1 TiB from a 2 KiB layer: over the default per-layer limit.
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = u
            .unpack_tar(sparse_tar(1 << 40).as_slice(), "sha256:sparse", &no)
            .unwrap_err();
        assert!(
            matches!(e, UnpackError::TooLarge { scope: "layer", .. }),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "layer sha256:sparse: entry \"sparse\" (1 TiB) would take the layer past the limit of 16 GiB of file content per layer (`layer` in the config's [limits])"
        );
        assert!(!d.path().join("sparse").exists(), "refused before writing");
        // Under a limit it fits, it is written at its apparent size.
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        u.set_limits(1 << 20, 1 << 20);
        u.unpack_tar(sparse_tar(64 << 10).as_slice(), "sha256:small", &no)
            .unwrap();
        assert_eq!(u.finish().unwrap().bytes, 64 << 10);
        let m = std::fs::metadata(d.path().join("sparse")).unwrap();
        assert_eq!(m.len(), 64 << 10);
    }

    /// A gzip layer blob of `files` (name, size) of zeros, in `dir`;
    /// returns its path and digest.
    fn zero_layer(dir: &Path, files: &[(&str, usize)]) -> (PathBuf, String) {
        let mut b = tar::Builder::new(Vec::new());
        for (name, size) in files {
            let mut h = tar::Header::new_ustar();
            h.set_path(name).unwrap();
            h.set_mode(0o644);
            h.set_size(*size as u64);
            h.set_cksum();
            b.append(&h, io::repeat(0).take(*size as u64)).unwrap();
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&b.into_inner().unwrap()).unwrap();
        let blob = gz.finish().unwrap();
        let digest = crate::oci::sha256_digest(&blob);
        let path = dir.join(&digest[7..]);
        std::fs::write(&path, blob).unwrap();
        (path, digest)
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_layer_limit_naming_layer_and_limit() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("t");
        std::fs::create_dir(&target).unwrap();
        let no = AtomicBool::new(false);
        // 8 MiB of zeros in a few KiB of gzip.
        let (blob, digest) = zero_layer(d.path(), &[("small", 1000), ("zeros", 8 << 20)]);
        assert!(std::fs::metadata(&blob).unwrap().len() < 64 << 10);
        let mut u = Unpacker::new(&target).unwrap();
        u.set_limits(1 << 20, 4 << 20);
        let e = u.unpack_layer(&blob, &digest, &no).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "layer {digest}: entry \"zeros\" (8 MiB) would take the layer past the limit of 1 MiB of file content per layer (`layer` in the config's [limits])"
            )
        );
        assert!(!target.join("zeros").exists());
        assert!(blob.exists(), "a good blob stays cached");
    }

    #[test]
    fn the_image_limit_counts_all_layers() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("t");
        std::fs::create_dir(&target).unwrap();
        let no = AtomicBool::new(false);
        let (b1, d1) = zero_layer(d.path(), &[("one", 600 << 10)]);
        let (b2, d2) = zero_layer(d.path(), &[("two", 600 << 10)]);
        let mut u = Unpacker::new(&target).unwrap();
        u.set_limits(1 << 20, 1 << 20);
        u.unpack_layer(&b1, &d1, &no).unwrap();
        let e = u.unpack_layer(&b2, &d2, &no).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "layer {d2}: entry \"two\" (600 KiB) would take the image past the limit of 1 MiB of file content per image (`image` in the config's [limits])"
            )
        );
        // The same layer again is fine for the layer limit alone.
        let mut u = Unpacker::new(&target).unwrap();
        u.set_limits(1 << 20, 2 << 20);
        u.unpack_layer(&b2, &d2, &no).unwrap();
        u.unpack_layer(&b1, &d1, &no).unwrap();
        assert_eq!(u.finish().unwrap().bytes, 1200 << 10);
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
    fn oversized_pax_and_long_name_records_are_refused_before_reading_them() {
        let no = AtomicBool::new(false);
        let file = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        };
        // 2 MiB of PAX records; as gzip, a few KiB (4 GiB would be 4 MiB).
        let mut b = tar::Builder::new(Vec::new());
        file(&mut b, "first", b"1");
        b.append_pax_extensions([("comment", &vec![b'x'; 2 << 20][..])])
            .unwrap();
        file(&mut b, "second", b"2");
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = u
            .unpack_tar(b.into_inner().unwrap().as_slice(), "sha256:pax", &no)
            .unwrap_err();
        let UnpackError::Read {
            layer,
            entry,
            source,
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(
            (layer.as_str(), entry.as_deref()),
            ("sha256:pax", Some("\"first\""))
        );
        assert!(
            source.to_string().starts_with("a PAX record of 20971")
                && source
                    .to_string()
                    .ends_with("more than the 1 MiB mkt (like Docker) reads"),
            "{source}"
        );
        assert!(!d.path().join("second").exists());

        // A 2 MiB GNU long name.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(0);
        b.append_data(&mut h, "a/".repeat(1 << 20) + "f", io::empty())
            .unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = u
            .unpack_tar(b.into_inner().unwrap().as_slice(), "sha256:long", &no)
            .unwrap_err();
        assert!(
            format!("{:?}", e).contains("a GNU long name record of 2097"),
            "{e:?}"
        );
    }

    #[test]
    fn record_checks_follow_pax_sizes_and_pass_real_layers() {
        let no = AtomicBool::new(false);
        // A PAX size (as Go writes for files over 8 GiB) wins over the
        // header's 0: the check must skip 1000 bytes, then see the next
        // header.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", &b"1000"[..])]).unwrap();
        let mut out = b.into_inner().unwrap();
        out.truncate(out.len() - 1024);
        let mut h = tar::Header::new_ustar();
        h.set_path("big").unwrap();
        h.set_mode(0o644);
        h.set_size(0);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&[b'd'; 1000]);
        out.resize(out.len().div_ceil(512) * 512, 0);
        let mut b = tar::Builder::new(out);
        b.append_pax_extensions([("comment", &vec![b'x'; 2 << 20][..])])
            .unwrap();
        let layer = b.into_inner().unwrap();
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = u.unpack_tar(layer.as_slice(), "sha256:s", &no).unwrap_err();
        assert!(format!("{e:?}").contains("a PAX record of"), "{e:?}");
        assert_eq!(std::fs::read(d.path().join("big")).unwrap(), [b'd'; 1000]);

        // Ordinary records, long names and sparse files pass.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("SCHILY.xattr.user.x", &b"v"[..])])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(3);
        let long = "d/".repeat(100) + "f";
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let mut layer = b.into_inner().unwrap();
        layer.truncate(layer.len() - 1024);
        layer.extend_from_slice(&sparse_tar(8 << 10));
        let mut u = Unpacker::new(d.path()).unwrap();
        u.unpack_tar(layer.as_slice(), "sha256:ok", &no).unwrap();
        assert_eq!(std::fs::read(d.path().join(&long)).unwrap(), b"abc");
        assert_eq!(
            std::fs::metadata(d.path().join("sparse")).unwrap().len(),
            8 << 10
        );

        // A sparse file with an extension block of its map: skipped too.
        let oct = |n: u64| {
            let mut f = [0u8; 12];
            f[..11].copy_from_slice(format!("{n:011o}").as_bytes());
            f
        };
        let mut h = tar::Header::new_gnu();
        h.set_path("ext").unwrap();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_size(5 * 512);
        let g = h.as_gnu_mut().unwrap();
        g.realsize = oct(4608);
        for i in 0..4 {
            g.sparse[i].offset = oct(i as u64 * 1024);
            g.sparse[i].numbytes = oct(512);
        }
        g.isextended[0] = 1;
        h.set_cksum();
        let mut ext = tar::GnuExtSparseHeader::new();
        ext.sparse[0].offset = oct(4096);
        ext.sparse[0].numbytes = oct(512);
        let mut layer = h.as_bytes().to_vec();
        layer.extend_from_slice(ext.as_bytes());
        layer.extend_from_slice(&[b's'; 5 * 512]);
        let mut b = tar::Builder::new(layer);
        b.append_pax_extensions([("comment", &vec![b'x'; 2 << 20][..])])
            .unwrap();
        let layer = b.into_inner().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = u.unpack_tar(layer.as_slice(), "sha256:e", &no).unwrap_err();
        assert!(format!("{e:?}").contains("a PAX record of"), "{e:?}");
        assert_eq!(std::fs::metadata(d.path().join("ext")).unwrap().len(), 4608);
    }

    /// A ustar header of `kind` named `name` (copied as is, so `.wh..`
    /// stays), with `mode`, owner 0 and time 0.
    fn hdr(kind: tar::EntryType, name: &str, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h
    }

    fn link_hdr(kind: tar::EntryType, name: &str, target: &str) -> tar::Header {
        let mut h = hdr(kind, name, 0o777);
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h
    }

    /// A tar stream of the headers with their content.
    fn pack(entries: Vec<(tar::Header, &[u8])>) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (mut h, data) in entries {
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn unpack(u: &mut Unpacker, layer: &[u8]) -> Result<(), String> {
        u.unpack_tar(layer, "sha256:t", &AtomicBool::new(false))
            .map_err(|e| e.to_string())
    }

    /// The value of xattr `name` of `p` (not following it), as a u32 or u64.
    fn xattr_num(p: &Path, name: &str) -> Option<u64> {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        let mut buf = [0u8; 8];
        // SAFETY: NUL-terminated strings, a buffer of buf.len() bytes.
        let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), 8) };
        match r {
            4 => Some(u32::from_le_bytes(buf[..4].try_into().unwrap()).into()),
            8 => Some(u64::from_le_bytes(buf)),
            _ => None,
        }
    }

    fn mode_of(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(p).unwrap().permissions().mode()
    }

    fn mtime_of(p: &Path) -> i64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(p).unwrap().mtime()
    }

    #[test]
    fn the_root_entry_describes_the_root_and_can_only_be_a_directory() {
        use tar::EntryType as T;
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let mut root = hdr(T::Directory, "./", 0o750);
        root.set_uid(7);
        root.set_mtime(1_000_000);
        unpack(&mut u, &pack(vec![(root, b"")])).unwrap();
        u.finish().unwrap();
        assert_eq!(mode_of(d.path()) & 0o7777, 0o750);
        assert_eq!(mtime_of(d.path()), 1_000_000);
        assert_eq!(xattr_num(d.path(), XATTR_UID), Some(7));
        assert_eq!(
            xattr_num(d.path(), XATTR_MODE),
            Some(u64::from(libc::S_IFDIR | 0o750))
        );
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = unpack(&mut u, &pack(vec![(hdr(T::Regular, "./", 0o644), b"x")])).unwrap_err();
        assert_eq!(
            e,
            "layer sha256:t: refused entry \"./\": the tree's root can only be a directory"
        );
    }

    #[test]
    fn xattr_records_carry_the_file_type_and_devices_become_files() {
        use std::os::unix::fs::FileTypeExt;
        use tar::EntryType as T;
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let mut u = Unpacker::new(p).unwrap();
        let dev = |kind, name, major, minor| {
            let mut h = hdr(kind, name, 0o640);
            h.set_uid(5);
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
            h
        };
        let layer = pack(vec![
            (hdr(T::Directory, "d/", 0o751), b""),
            (hdr(T::Regular, "a/f", 0o644), b"data"),
            (dev(T::Char, "c", 1, 3), b""),
            (dev(T::Block, "b", 8, 17), b""),
            (dev(T::Fifo, "p", 0, 0), b""),
        ]);
        unpack(&mut u, &layer).unwrap();
        u.finish().unwrap();
        let mode = |name: &str| xattr_num(&p.join(name), XATTR_MODE);
        assert_eq!(mode("d"), Some(u64::from(libc::S_IFDIR | 0o751)));
        // A parent no entry names: root's, 0755, as Docker makes it.
        assert_eq!(mode("a"), Some(u64::from(libc::S_IFDIR | 0o755)));
        assert_eq!(mode("a/f"), Some(u64::from(libc::S_IFREG | 0o644)));
        assert!(std::fs::symlink_metadata(p.join("a/f")).unwrap().is_file());
        assert_eq!(std::fs::read(p.join("a/f")).unwrap(), b"data");
        for (name, bits, rdev) in [
            ("c", libc::S_IFCHR, Some(makedev(1, 3))),
            ("b", libc::S_IFBLK, Some(makedev(8, 17))),
            ("p", libc::S_IFIFO, None),
        ] {
            let m = std::fs::symlink_metadata(p.join(name)).unwrap();
            assert!(m.is_file() && !m.file_type().is_fifo(), "{name}: {m:?}");
            assert_eq!(mode(name), Some(u64::from(bits | 0o640)), "{name}");
            assert_eq!(xattr_num(&p.join(name), XATTR_UID), Some(5), "{name}");
            assert_eq!(xattr_num(&p.join(name), XATTR_RDEV), rdev, "{name}");
            assert_eq!(mode_of(&p.join(name)) & 0o7777, 0o640, "{name}");
        }
    }

    #[test]
    fn real_mode_makes_device_nodes_and_owns_symlinks() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        use tar::EntryType as T;
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let mut dev = hdr(T::Char, "c", 0o620);
        dev.set_device_major(1).unwrap();
        dev.set_device_minor(3).unwrap();
        let mut sym = link_hdr(T::Symlink, "l", "f");
        sym.set_uid(1234);
        let layer = pack(vec![
            (hdr(T::Regular, "f", 0o644), b"data"),
            (dev, b""),
            (hdr(T::Fifo, "p", 0o600), b""),
            (sym, b""),
        ]);
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let mut u = Unpacker::with_record(p, Record::Real).unwrap();
        unpack(&mut u, &layer).unwrap();
        u.finish().unwrap();
        let meta = |n: &str| std::fs::symlink_metadata(p.join(n)).unwrap();
        assert!(meta("f").is_file());
        assert_eq!(std::fs::read(p.join("f")).unwrap(), b"data");
        assert!(meta("p").file_type().is_fifo());
        assert_eq!(meta("l").uid(), 1234);
        if made_as_node(&meta("c")) {
            assert_eq!(meta("c").rdev(), libc::makedev(1, 3));
        }
        // Recorded in xattrs, a symlink keeps the unpacker's owner.
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        unpack(&mut u, &layer).unwrap();
        let l = std::fs::symlink_metadata(d.path().join("l")).unwrap();
        assert_eq!(l.uid(), nix::unistd::geteuid().as_raw());
    }

    /// A device node where mknod is allowed (root outside a user
    /// namespace); a file carrying its record otherwise.
    fn made_as_node(m: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_char_device() || !m.is_file()
    }

    #[test]
    fn whiteouts_of_nothing_are_refused() {
        use tar::EntryType as T;
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let lower = pack(vec![(hdr(T::Regular, "d/f", 0o644), b"x")]);
        unpack(&mut u, &lower).unwrap();
        for name in ["d/.wh.", "d/.wh..", "d/.wh..."] {
            let e = unpack(&mut u, &pack(vec![(hdr(T::Regular, name, 0o644), b"")]));
            assert_eq!(
                e.unwrap_err(),
                format!("layer sha256:t: refused entry \"{name}\": whiteout of nothing")
            );
        }
        assert_eq!(std::fs::read(d.path().join("d/f")).unwrap(), b"x");
    }

    #[test]
    fn paths_and_hardlinks_through_files_are_refused() {
        use tar::EntryType as T;
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let lower = pack(vec![
            (hdr(T::Regular, "f", 0o644), b"x"),
            (hdr(T::Directory, "dir/", 0o755), b""),
        ]);
        unpack(&mut u, &lower).unwrap();
        let notdir = "goes through something that is not a directory";
        for (h, want) in [
            (hdr(T::Regular, "f/x", 0o644), format!("its path {notdir}")),
            (
                hdr(T::Regular, "f/.wh..wh..opq", 0o644),
                format!("its directory {notdir}"),
            ),
            (
                hdr(T::Regular, "f/.wh.x", 0o644),
                format!("its directory {notdir}"),
            ),
            (
                link_hdr(T::Link, "h", "f/x"),
                format!("its hardlink target {notdir}"),
            ),
            (
                link_hdr(T::Link, "h", "dir"),
                "hardlink to a directory".into(),
            ),
        ] {
            let name = String::from_utf8_lossy(&h.path_bytes()).into_owned();
            let e = unpack(&mut u, &pack(vec![(h, b"")])).unwrap_err();
            assert_eq!(
                e,
                format!("layer sha256:t: refused entry \"{name}\": {want}")
            );
        }
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"x");
        assert!(!d.path().join("h").exists());
    }

    #[test]
    fn later_layers_replace_entries_and_finish_leaves_replaced_directories() {
        use tar::EntryType as T;
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let mut u = Unpacker::new(p).unwrap();
        let mut x = hdr(T::Directory, "x/", 0o755);
        x.set_mtime(5000);
        let lower = pack(vec![
            (hdr(T::Regular, "file", 0o644), b"f"),
            (x, b""),
            (hdr(T::Regular, "keep/f", 0o644), b"k"),
            (hdr(T::Regular, "e/g/h", 0o644), b"e"),
        ]);
        unpack(&mut u, &lower).unwrap();
        let mut x = hdr(T::Regular, "x", 0o600);
        x.set_mtime(7000);
        let upper = pack(vec![
            (hdr(T::Directory, "file/", 0o755), b""),
            (x, b"now a file"),
            (hdr(T::Directory, "keep/", 0o755), b""),
            (hdr(T::Regular, "e", 0o644), b"was a tree"),
        ]);
        unpack(&mut u, &upper).unwrap();
        u.finish().unwrap();
        assert!(p.join("file").is_dir());
        assert_eq!(std::fs::read(p.join("keep/f")).unwrap(), b"k");
        assert_eq!(std::fs::read(p.join("e")).unwrap(), b"was a tree");
        assert_eq!(std::fs::read(p.join("x")).unwrap(), b"now a file");
        // The directory x's mode and time are not applied to the file.
        assert_eq!(mode_of(&p.join("x")) & 0o7777, 0o600);
        assert_eq!(mtime_of(&p.join("x")), 7000);
    }

    #[test]
    fn an_opaque_whiteout_keeps_what_its_own_layer_wrote_before_it() {
        use tar::EntryType as T;
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let mut u = Unpacker::new(p).unwrap();
        let lower = pack(vec![
            (hdr(T::Regular, "d/sub/old", 0o644), b"o"),
            (hdr(T::Regular, "d/lower", 0o644), b"l"),
            (hdr(T::Regular, "d/f", 0o644), b"1"),
        ]);
        unpack(&mut u, &lower).unwrap();
        let upper = pack(vec![
            (hdr(T::Regular, "d/sub/new", 0o644), b"n"),
            (hdr(T::Regular, "d/f", 0o644), b"2"),
            (hdr(T::Regular, "d/.wh..wh..opq", 0o644), b""),
        ]);
        unpack(&mut u, &upper).unwrap();
        let mut names: Vec<_> = walk(p);
        names.sort();
        assert_eq!(names, ["d", "d/f", "d/sub", "d/sub/new"]);
        assert_eq!(std::fs::read(p.join("d/f")).unwrap(), b"2");
    }

    /// Every path under `root`, relative.
    fn walk(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(dir) = todo.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let path = e.unwrap().path();
                out.push(path.strip_prefix(root).unwrap().display().to_string());
                if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                    todo.push(path);
                }
            }
        }
        out
    }

    #[test]
    fn the_limits_are_inclusive_and_count_every_entry_of_a_layer() {
        use tar::EntryType as T;
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        u.set_limits(1000, 1500);
        let file = |name: &'static str, data: &'static [u8]| (hdr(T::Regular, name, 0o644), data);
        // Exactly the layer limit, then exactly the image limit.
        unpack(
            &mut u,
            &pack(vec![file("a", &[1; 600]), file("b", &[2; 400])]),
        )
        .unwrap();
        unpack(&mut u, &pack(vec![file("c", &[3; 500])])).unwrap();
        let e = unpack(&mut u, &pack(vec![file("e", b"1")])).unwrap_err();
        assert!(e.contains("would take the image past the limit"), "{e}");
        let mut u = Unpacker::new(d.path()).unwrap();
        u.set_limits(1000, 10_000);
        let e = unpack(
            &mut u,
            &pack(vec![file("a", &[1; 600]), file("b", &[2; 600])]),
        );
        assert_eq!(
            e.unwrap_err(),
            "layer sha256:t: entry \"b\" (600 bytes) would take the layer past the limit of 1000 bytes of file content per layer (`layer` in the config's [limits])"
        );
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

    /// A reader of `data` failing once, with `kind`, at offset `at`.
    struct FailOnce {
        data: Vec<u8>,
        pos: usize,
        at: usize,
        kind: Option<io::ErrorKind>,
    }

    impl Read for FailOnce {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.pos == self.at
                && let Some(kind) = self.kind.take()
            {
                return Err(io::Error::new(kind, "injected"));
            }
            let end = if self.pos < self.at {
                self.at
            } else {
                self.data.len()
            };
            let n = buf.len().min(end - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn an_interrupted_read_is_retried_and_other_read_errors_fail() {
        let layer = pack(vec![(hdr(tar::EntryType::Regular, "f", 0o644), b"content")]);
        let no = AtomicBool::new(false);
        for kind in [io::ErrorKind::Interrupted, io::ErrorKind::Other] {
            let d = tempfile::tempdir().unwrap();
            let mut u = Unpacker::new(d.path()).unwrap();
            // In the middle of f's content.
            let r = FailOnce {
                data: layer.clone(),
                pos: 0,
                at: 515,
                kind: Some(kind),
            };
            let res = u.unpack_tar(r, "sha256:t", &no);
            if kind == io::ErrorKind::Interrupted {
                res.unwrap();
                assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"content");
            } else {
                let e = res.unwrap_err();
                assert!(
                    matches!(&e, UnpackError::Read { entry: Some(n), .. } if n == "\"f\""),
                    "{e:?}"
                );
            }
        }
    }

    /// Runs `f` on a thread without the capabilities that let root ignore
    /// file modes and owners (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH,
    /// CAP_FOWNER): capabilities are per thread.
    fn as_plain_owner<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        without_caps((1 << 1) | (1 << 2) | (1 << 3), f)
    }

    /// Runs `f` on a thread whose effective capabilities lack `mask`.
    fn without_caps<T: Send>(mask: u32, f: impl FnOnce() -> T + Send) -> T {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Default, Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut h = Header {
                    version: 0x2008_0522,
                    pid: 0,
                };
                let mut data = [Data::default(); 2];
                // SAFETY: a v3 header and two data structs, for this thread.
                let r = unsafe { libc::syscall(libc::SYS_capget, &raw mut h, data.as_mut_ptr()) };
                assert_eq!(r, 0);
                data[0].effective &= !mask;
                // SAFETY: as above.
                let r = unsafe { libc::syscall(libc::SYS_capset, &raw mut h, data.as_ptr()) };
                assert_eq!(r, 0);
                f()
            })
            .join()
            .unwrap()
        })
    }

    #[test]
    fn remove_tree_opens_up_modes_only_where_needed_and_reports_failures() {
        use std::os::unix::fs::PermissionsExt;
        let set_mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        };
        let d = tempfile::tempdir().unwrap();
        // Ours, but mode 000 and read-only below.
        let t = d.path().join("t");
        std::fs::create_dir_all(t.join("a/b")).unwrap();
        std::fs::write(t.join("a/b/f"), "x").unwrap();
        set_mode(&t.join("a/b"), 0o500);
        set_mode(&t.join("a"), 0o000);
        // Someone else's, open to all: usable as it is (a chmod would fail).
        let o = d.path().join("o");
        std::fs::create_dir_all(o.join("theirs")).unwrap();
        std::os::unix::fs::chown(o.join("theirs"), Some(1000), Some(1000)).unwrap();
        set_mode(&o.join("theirs"), 0o777);
        // Reached through a directory we may search but not read.
        let p = d.path().join("p");
        std::fs::create_dir_all(p.join("t")).unwrap();
        set_mode(&p, 0o300);
        // Someone else's, not writable by us: its file cannot go.
        let q = d.path().join("q");
        std::fs::create_dir_all(&q).unwrap();
        std::fs::write(q.join("f"), "x").unwrap();
        std::os::unix::fs::chown(&q, Some(1000), Some(1000)).unwrap();
        set_mode(&q, 0o755);
        as_plain_owner(|| {
            remove_tree(&t).unwrap();
            remove_tree(&o).unwrap();
            remove_tree(&p.join("t")).unwrap();
            let e = remove_tree(&q).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            remove_tree(&d.path().join("missing")).unwrap();
        });
        assert!(!t.exists() && !o.exists() && !p.join("t").exists());
        assert!(q.join("f").exists());
    }

    #[test]
    fn real_mode_keeps_a_device_it_may_not_make_as_a_file_with_its_record() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        use tar::EntryType as T;
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let mut dev = hdr(T::Block, "b", 0o640);
        dev.set_uid(6);
        dev.set_device_major(8).unwrap();
        dev.set_device_minor(17).unwrap();
        let layer = pack(vec![(dev, b"")]);
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        // Without CAP_MKNOD, as in a user namespace.
        let stats = without_caps(1 << 27, || {
            let mut u = Unpacker::with_record(p, Record::Real).unwrap();
            unpack(&mut u, &layer).unwrap();
            u.finish().unwrap()
        });
        assert_eq!(stats.devices_as_files, 1);
        let b = p.join("b");
        let m = std::fs::symlink_metadata(&b).unwrap();
        assert!(m.is_file() && !m.file_type().is_block_device());
        assert_eq!(m.uid(), 6);
        assert_eq!(
            xattr_num(&b, XATTR_MODE),
            Some(u64::from(libc::S_IFBLK | 0o640))
        );
        assert_eq!(xattr_num(&b, XATTR_UID), Some(6));
        assert_eq!(xattr_num(&b, XATTR_RDEV), Some(makedev(8, 17)));
    }
}

#[cfg(test)]
mod entry_tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use tar::EntryType as T;

    static NO: AtomicBool = AtomicBool::new(false);

    /// One entry's header (ustar: it has device numbers), not yet summed.
    fn header(kind: T, name: &str, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_000_000);
        h.set_size(size);
        h
    }

    /// Appends `h` with `data`, after PAX records `pax` when there are any.
    fn add(b: &mut tar::Builder<Vec<u8>>, mut h: tar::Header, data: &[u8], pax: &[(&str, &[u8])]) {
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().copied()).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn device(kind: T, name: &str, mode: u32, gid: u64, major: u32, minor: u32) -> tar::Header {
        let mut h = header(kind, name, mode, 0, gid, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h
    }

    fn getx(path: &Path, name: &str) -> Option<Vec<u8>> {
        let p = CString::new(path.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        let mut buf = [0u8; 256];
        // SAFETY: NUL-terminated strings and a buffer of buf.len() bytes.
        let r =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        (r >= 0).then(|| buf[..r as usize].to_vec())
    }

    fn getx32(path: &Path, name: &str) -> Option<u32> {
        getx(path, name).map(|v| u32::from_le_bytes(v.try_into().unwrap()))
    }

    /// (uid, gid, mode) recorded in QEMU's xattrs, and rdev if any.
    fn record(path: &Path) -> (Option<u32>, Option<u32>, Option<u32>, Option<u64>) {
        (
            getx32(path, XATTR_UID),
            getx32(path, XATTR_GID),
            getx32(path, XATTR_MODE),
            getx(path, XATTR_RDEV).map(|v| u64::from_le_bytes(v.try_into().unwrap())),
        )
    }

    fn perms(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn xattrs_keep_owners_full_modes_and_devices_and_the_host_modes_stay_readable() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path();
        let mut u = Unpacker::new(t).unwrap();
        // The probe leaves the root recorded as root's 0755 directory.
        assert_eq!(
            record(t),
            (Some(0), Some(0), Some(libc::S_IFDIR | 0o755), None)
        );
        let mut b = tar::Builder::new(Vec::new());
        add(
            &mut b,
            header(T::Directory, "d", 0o1750, 1000, 100, 0),
            b"",
            &[],
        );
        // Type bits in the mode field (some tars write them) are dropped;
        // PAX owners and time win over the header's.
        add(
            &mut b,
            header(T::Regular, "d/f", 0o104640, 1, 2, 2),
            b"hi",
            &[
                ("uid", b"70000"),
                ("gid", b"80000"),
                ("mtime", b"1700000000.5"),
            ],
        );
        add(&mut b, device(T::Char, "c", 0o620, 5, 1, 3), b"", &[]);
        add(&mut b, device(T::Block, "b", 0o660, 6, 8, 17), b"", &[]);
        add(&mut b, header(T::Fifo, "p", 0o644, 7, 8, 0), b"", &[]);
        // Blank numeric fields read as 0, as Go's archive/tar reads them.
        let mut h = header(T::Regular, "blank", 0o644, 9, 9, 0);
        let old = h.as_old_mut();
        for f in [
            &mut old.uid[..],
            &mut old.gid,
            &mut old.mode,
            &mut old.mtime,
        ] {
            f.fill(0);
        }
        add(&mut b, h, b"", &[]);
        u.unpack_tar(b.into_inner().unwrap().as_slice(), "sha256:x", &NO)
            .unwrap();
        let stats = u.finish().unwrap();
        assert_eq!((stats.entries, stats.bytes), (6, 2));

        let dir = t.join("d");
        assert_eq!(
            record(&dir),
            (Some(1000), Some(100), Some(libc::S_IFDIR | 0o1750), None)
        );
        assert_eq!(perms(&dir), 0o750);
        let f = dir.join("f");
        assert_eq!(
            record(&f),
            (Some(70000), Some(80000), Some(libc::S_IFREG | 0o4640), None)
        );
        assert_eq!(perms(&f), 0o640);
        assert_eq!(std::fs::metadata(&f).unwrap().mtime(), 1_700_000_000);
        assert_eq!(std::fs::read(&f).unwrap(), b"hi");
        for (name, kind, mode, gid, rdev) in [
            ("c", libc::S_IFCHR, 0o620, 5, 0x103),
            ("b", libc::S_IFBLK, 0o660, 6, 0x811),
        ] {
            let p = t.join(name);
            assert_eq!(
                record(&p),
                (Some(0), Some(gid), Some(kind | mode), Some(rdev)),
                "{name}"
            );
            let m = std::fs::symlink_metadata(&p).unwrap();
            assert!(m.file_type().is_file() && m.len() == 0, "{name}");
            assert_eq!(m.mode() & 0o7777, mode, "{name}");
            assert_eq!(m.mtime(), 1_000_000, "{name}");
        }
        let p = t.join("p");
        assert_eq!(
            record(&p),
            (Some(7), Some(8), Some(libc::S_IFIFO | 0o644), None)
        );
        assert!(std::fs::symlink_metadata(&p).unwrap().file_type().is_file());
        let blank = t.join("blank");
        assert_eq!(
            record(&blank),
            (Some(0), Some(0), Some(libc::S_IFREG), None)
        );
        assert_eq!(perms(&blank), 0o400);
        assert_eq!(std::fs::metadata(&blank).unwrap().mtime(), 0);
    }

    /// A valid `security.capability` (v2): cap_net_bind_service permitted.
    fn capability() -> Vec<u8> {
        let mut v = 0x0200_0000u32.to_le_bytes().to_vec();
        for w in [1u32 << 10, 0, 0, 0] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v
    }

    #[test]
    fn xattrs_mode_keeps_user_attributes_and_acls_and_skips_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let cap = capability();
        let mut b = tar::Builder::new(Vec::new());
        add(
            &mut b,
            header(T::Regular, "f", 0o644, 1, 1, 0),
            b"",
            &[
                ("SCHILY.xattr.user.virtfs.uid", &7u32.to_le_bytes()),
                ("SCHILY.xattr.user.note", b"n"),
                ("SCHILY.xattr.security.capability", &cap),
                ("SCHILY.xattr.system.posix_acl_access", b"acl-a"),
                ("SCHILY.xattr.system.posix_acl_default", b"acl-d"),
                ("SCHILY.xattr.trusted.mkt", b"t"),
            ],
        );
        add(
            &mut b,
            header(T::Directory, "d", 0o755, 1, 1, 0),
            b"",
            &[("SCHILY.xattr.user.dir", b"dv")],
        );
        u.unpack_tar(b.into_inner().unwrap().as_slice(), "sha256:x", &NO)
            .unwrap();
        assert_eq!(
            u.stats.skipped_xattrs,
            ["user.virtfs.uid", "security.capability", "trusted.mkt"]
        );
        let f = d.path().join("f");
        assert_eq!(
            getx32(&f, XATTR_UID),
            Some(1),
            "mkt's record, not the layer's"
        );
        assert_eq!(getx(&f, "user.note").as_deref(), Some(&b"n"[..]));
        assert_eq!(getx(&f, "security.capability"), None);
        assert_eq!(getx(&f, "trusted.mkt"), None);
        assert_eq!(
            getx(&f, "user.virtfs.system.posix_acl_access").as_deref(),
            Some(&b"acl-a"[..])
        );
        assert_eq!(
            getx(&f, "user.virtfs.system.posix_acl_default").as_deref(),
            Some(&b"acl-d"[..])
        );
        assert_eq!(
            getx(&d.path().join("d"), "user.dir").as_deref(),
            Some(&b"dv"[..])
        );

        // A user attribute the file system refuses (a name over 255
        // bytes) fails the unpack.
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("SCHILY.xattr.user.{}", "x".repeat(300));
        add(
            &mut b,
            header(T::Regular, "g", 0o644, 1, 1, 0),
            b"",
            &[(long.as_str(), b"v")],
        );
        let e = u
            .unpack_tar(b.into_inner().unwrap().as_slice(), "sha256:y", &NO)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("layer sha256:y: cannot set an extended attribute for entry \"g\""),
            "{e}"
        );
    }

    #[test]
    fn real_mode_sets_owners_modes_devices_and_capabilities() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path();
        let mut u = Unpacker::with_record(t, Record::Real).unwrap();
        assert_eq!(getx(t, XATTR_UID), None, "no probe for real owners");
        let cap = capability();
        let mut b = tar::Builder::new(Vec::new());
        add(
            &mut b,
            header(T::Directory, "d", 0o1750, 1000, 100, 0),
            b"",
            &[],
        );
        add(
            &mut b,
            header(T::Regular, "f", 0o4750, 1000, 100, 1),
            b"x",
            &[
                ("SCHILY.xattr.security.capability", &cap),
                ("SCHILY.xattr.trusted.mkt", b"t"),
                ("SCHILY.xattr.user.note", b"n"),
            ],
        );
        // A capability the kernel refuses is skipped, not fatal.
        add(
            &mut b,
            header(T::Regular, "badcap", 0o755, 0, 0, 0),
            b"",
            &[("SCHILY.xattr.security.capability", b"bad")],
        );
        add(&mut b, device(T::Char, "null", 0o620, 5, 1, 3), b"", &[]);
        add(&mut b, device(T::Block, "loop", 0o660, 6, 7, 0), b"", &[]);
        add(&mut b, header(T::Fifo, "p", 0o666, 1001, 1002, 0), b"", &[]);
        let mut h = header(T::Symlink, "l", 0o777, 1003, 1004, 0);
        h.set_link_name("f").unwrap();
        add(&mut b, h, b"", &[]);
        u.unpack_tar(b.into_inner().unwrap().as_slice(), "sha256:x", &NO)
            .unwrap();
        let stats = u.finish().unwrap();
        assert_eq!(stats.skipped_xattrs, ["trusted.mkt", "security.capability"]);
        assert_eq!((stats.unmapped_owners, stats.devices_as_files), (0, 0));

        let meta = |n: &str| std::fs::symlink_metadata(t.join(n)).unwrap();
        let owner = |n: &str| (meta(n).uid(), meta(n).gid());
        assert_eq!(owner("d"), (1000, 100));
        assert_eq!(perms(&t.join("d")), 0o1750);
        assert_eq!(owner("f"), (1000, 100));
        assert_eq!(perms(&t.join("f")), 0o4750, "setuid kept after the chown");
        assert_eq!(getx(&t.join("f"), "security.capability"), Some(cap));
        assert_eq!(getx(&t.join("f"), "trusted.mkt"), None);
        assert_eq!(getx(&t.join("f"), "user.note").as_deref(), Some(&b"n"[..]));
        assert_eq!(record(&t.join("f")), (None, None, None, None));
        assert_eq!(getx(&t.join("badcap"), "security.capability"), None);

        let null = meta("null");
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), libc::makedev(1, 3));
        assert_eq!(
            (null.mode() & 0o7777, null.gid(), null.mtime()),
            (0o620, 5, 1_000_000)
        );
        let lp = meta("loop");
        assert!(lp.file_type().is_block_device());
        assert_eq!(lp.rdev(), libc::makedev(7, 0));
        assert_eq!((lp.mode() & 0o7777, lp.gid()), (0o660, 6));
        let p = meta("p");
        assert!(p.file_type().is_fifo());
        assert_eq!(
            (p.mode() & 0o7777, owner("p"), p.mtime()),
            (0o666, (1001, 1002), 1_000_000),
            "the umask undone"
        );
        assert!(meta("l").file_type().is_symlink());
        assert_eq!(owner("l"), (1003, 1004));
        assert_eq!(owner("f"), (1000, 100), "the symlink's target untouched");
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

    /// `prefix` (entries, no end blocks) then a PAX record too big to read.
    fn then_big_pax(prefix: Vec<u8>) -> Vec<u8> {
        let mut b = tar::Builder::new(prefix);
        b.append_pax_extensions([("comment", &vec![b'x'; 2 << 20][..])])
            .unwrap();
        b.into_inner().unwrap()
    }

    fn without_end(mut layer: Vec<u8>) -> Vec<u8> {
        layer.truncate(layer.len() - 1024);
        layer
    }

    /// A reader handing out at most `n` bytes at a time.
    struct Chunks<'a>(&'a [u8], usize);

    impl Read for Chunks<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let k = self.1.min(buf.len()).min(self.0.len());
            buf[..k].copy_from_slice(&self.0[..k]);
            self.0 = &self.0[k..];
            Ok(k)
        }
    }

    fn refused(layer: &[u8], chunk: usize) -> String {
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = u
            .unpack_tar(Chunks(layer, chunk), "sha256:r", &NO)
            .unwrap_err();
        let UnpackError::Read { source, .. } = &e else {
            panic!("{e:?}")
        };
        assert!(source.to_string().starts_with("a PAX record of"), "{e:?}");
        e.to_string()
    }

    #[test]
    fn read_errors_name_the_entry_they_follow() {
        let mut b = tar::Builder::new(Vec::new());
        add(
            &mut b,
            header(T::Regular, "first", 0o644, 0, 0, 1),
            b"1",
            &[],
        );
        let layer = then_big_pax(without_end(b.into_inner().unwrap()));
        assert_eq!(
            refused(&layer, usize::MAX),
            "layer sha256:r: cannot read the layer's tar stream (at entry \"first\")"
        );
        assert_eq!(
            refused(&then_big_pax(Vec::new()), usize::MAX),
            "layer sha256:r: cannot read the layer's tar stream"
        );
    }

    #[test]
    fn record_checks_follow_streams_read_in_small_pieces() {
        // PAX records, headers and content split across reads.
        let mut b = tar::Builder::new(Vec::new());
        add(
            &mut b,
            header(T::Regular, "a", 0o644, 0, 0, 700),
            &[b'a'; 700],
            &[("SCHILY.xattr.user.k", &[b'v'; 600][..])],
        );
        let layer = then_big_pax(without_end(b.into_inner().unwrap()));
        for chunk in [1, 7, 100, 511, 513] {
            refused(&layer, chunk);
        }
        // A record of exactly the limit is read.
        let mut b = tar::Builder::new(Vec::new());
        let value = vec![b'x'; (MAX_TAR_RECORDS - 17) as usize];
        add(
            &mut b,
            header(T::Regular, "a", 0o644, 0, 0, 1),
            b"a",
            &[("comment", &value)],
        );
        let layer = b.into_inner().unwrap();
        assert_eq!(&layer[124..135], b"00004000000", "a record of 1 MiB");
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        u.unpack_tar(layer.as_slice(), "sha256:max", &NO).unwrap();
        assert_eq!(std::fs::read(d.path().join("a")).unwrap(), b"a");
    }

    #[test]
    fn pax_records_go_to_the_entry_after_long_names_and_not_past_a_global_header() {
        let pax_size = |b: &mut tar::Builder<Vec<u8>>| {
            b.append_pax_extensions([("size", &b"1000"[..])]).unwrap();
        };
        // PAX records, a GNU long name, then the entry they describe.
        let mut b = tar::Builder::new(Vec::new());
        pax_size(&mut b);
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(0);
        let long = "n".repeat(150);
        let mut data = vec![b'd'; 1000];
        data.resize(1024, 0);
        // The builder writes the long name, then the header (size 0), then
        // the 1000 bytes the PAX size gives it.
        b.append_data(&mut h, &long, io::empty()).unwrap();
        let mut layer = without_end(b.into_inner().unwrap());
        layer.extend_from_slice(&data);
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        u.unpack_tar(
            Chunks(&[layer.clone(), vec![0; 1024]].concat(), 512),
            "sha256:l",
            &NO,
        )
        .unwrap();
        assert_eq!(std::fs::read(d.path().join(&long)).unwrap(), [b'd'; 1000]);
        refused(&then_big_pax(layer), 512);

        // PAX records, then a global header (which takes them), then an
        // entry of its own size.
        let mut b = tar::Builder::new(Vec::new());
        pax_size(&mut b);
        let mut h = tar::Header::new_ustar();
        h.set_path("pax_global_header").unwrap();
        h.set_entry_type(T::XGlobalHeader);
        h.set_size(12);
        h.set_cksum();
        b.append(&h, &b"12 comment=\n"[..]).unwrap();
        add(
            &mut b,
            header(T::Regular, "empty", 0o644, 0, 0, 0),
            b"",
            &[],
        );
        refused(&then_big_pax(without_end(b.into_inner().unwrap())), 512);
    }

    /// A GNU sparse file's header: `blocks` of data (all at its end) and
    /// `ext` extension blocks of its map (with no more entries in them).
    fn sparse(name: &str, blocks: u64, ext: usize) -> Vec<u8> {
        let oct = |n: u64| {
            let mut f = [0u8; 12];
            f[..11].copy_from_slice(format!("{n:011o}").as_bytes());
            f
        };
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_entry_type(T::GNUSparse);
        h.set_mode(0o644);
        h.set_size(blocks * 512);
        let g = h.as_gnu_mut().unwrap();
        g.realsize = oct(8192 + blocks * 512);
        g.sparse[0].offset = oct(8192);
        g.sparse[0].numbytes = oct(blocks * 512);
        g.isextended[0] = u8::from(ext > 0);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        for i in 0..ext {
            let mut e = tar::GnuExtSparseHeader::new();
            e.isextended[0] = u8::from(i + 1 < ext);
            out.extend_from_slice(e.as_bytes());
        }
        out.extend(std::iter::repeat_n(b's', blocks as usize * 512));
        out
    }

    #[test]
    fn record_checks_follow_sparse_files_with_and_without_map_extensions() {
        for (blocks, ext) in [(1, 0), (2, 2), (0, 1)] {
            let layer = then_big_pax(sparse("s", blocks, ext));
            refused(&layer, 512);
            refused(&layer, usize::MAX);
            let d = tempfile::tempdir().unwrap();
            let mut u = Unpacker::new(d.path()).unwrap();
            let ok = [sparse("s", blocks, ext), vec![0; 1024]].concat();
            u.unpack_tar(ok.as_slice(), "sha256:s", &NO).unwrap();
            let m = std::fs::metadata(d.path().join("s")).unwrap();
            assert_eq!(m.len(), 8192 + blocks * 512, "{blocks} {ext}");
        }
    }

    /// Real mode as root of a user namespace mapping only root: owners it
    /// does not map stay root's and devices become files, both counted.
    #[test]
    fn real_mode_in_a_user_namespace_counts_unmapped_owners_and_devices() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().to_path_buf();
        let mut b = tar::Builder::new(Vec::new());
        add(&mut b, header(T::Regular, "f", 0o644, 1000, 0, 0), b"", &[]);
        add(&mut b, header(T::Fifo, "p", 0o640, 1000, 0, 0), b"", &[]);
        let mut h = header(T::Symlink, "l", 0o777, 1000, 0, 0);
        h.set_link_name("f").unwrap();
        add(&mut b, h, b"", &[]);
        add(&mut b, device(T::Char, "null", 0o620, 0, 1, 3), b"", &[]);
        let layer = b.into_inner().unwrap();
        let run = || -> Result<Stats, String> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)
                .map_err(|e| e.to_string())?;
            for (f, v) in [
                ("setgroups", "deny"),
                ("uid_map", "0 0 1"),
                ("gid_map", "0 0 1"),
            ] {
                std::fs::write(format!("/proc/self/{f}"), v).map_err(|e| format!("{f}: {e}"))?;
            }
            let mut u = Unpacker::with_record(&t, Record::Real).map_err(|e| e.to_string())?;
            u.unpack_tar(layer.as_slice(), "sha256:ns", &NO)
                .map_err(|e| e.to_string())?;
            u.finish().map_err(|e| e.to_string())
        };
        // SAFETY: the child only makes system calls and allocates (glibc's
        // fork leaves malloc usable), then leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // A panic must not unwind into the test harness's copy.
                let code = match std::panic::catch_unwind(run) {
                    Ok(Ok(s)) if (s.unmapped_owners, s.devices_as_files) == (3, 1) => 0,
                    Ok(Ok(s)) => {
                        eprintln!("{s:?}");
                        1
                    }
                    Ok(Err(e)) => {
                        eprintln!("{e}");
                        2
                    }
                    Err(_) => 3,
                };
                // SAFETY: ends the child without running the parent's
                // destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    st,
                    nix::sys::wait::WaitStatus::Exited(child, 0),
                    "see the child's message above"
                );
            }
        }
        let meta = |n: &str| std::fs::symlink_metadata(t.join(n)).unwrap();
        for n in ["f", "p", "l", "null"] {
            assert_eq!(meta(n).uid(), 0, "{n}");
        }
        assert!(meta("p").file_type().is_fifo());
        assert!(meta("l").file_type().is_symlink());
        let null = meta("null");
        assert!(null.file_type().is_file());
        assert_eq!(
            record(&t.join("null")),
            (Some(0), Some(0), Some(libc::S_IFCHR | 0o620), Some(0x103))
        );
        assert_eq!(null.mode() & 0o7777, 0o620);
    }

    /// A FIFO mknod refuses (in an immutable directory) fails the unpack
    /// there; only devices fall back to files.
    #[test]
    fn a_fifo_mknod_refuses_is_an_error() {
        const FS_IMMUTABLE_FL: libc::c_long = 0x10;
        let d = tempfile::tempdir().unwrap();
        let imm = d.path().join("imm");
        std::fs::create_dir(&imm).unwrap();
        let dir = std::fs::File::open(&imm).unwrap();
        let set = |on: bool| {
            let mut flags: libc::c_long = 0;
            // SAFETY: an open directory and a c_long for the flags.
            unsafe {
                assert_eq!(
                    libc::ioctl(dir.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags),
                    0
                );
                flags = if on {
                    flags | FS_IMMUTABLE_FL
                } else {
                    flags & !FS_IMMUTABLE_FL
                };
                assert_eq!(
                    libc::ioctl(dir.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags),
                    0
                );
            }
        };
        let mut b = tar::Builder::new(Vec::new());
        add(&mut b, header(T::Fifo, "imm/p", 0o644, 0, 0, 0), b"", &[]);
        let layer = b.into_inner().unwrap();
        let mut u = Unpacker::with_record(d.path(), Record::Real).unwrap();
        set(true);
        let e = u.unpack_tar(layer.as_slice(), "sha256:i", &NO);
        set(false);
        let e = e.unwrap_err().to_string();
        assert!(
            e.starts_with("layer sha256:i: cannot create the device node for entry \"imm/p\""),
            "{e}"
        );
        assert_eq!(u.stats.devices_as_files, 0);
    }

    /// An old-style header can hold no zero byte at all (fields ended by
    /// spaces): it is a header, not the end of the archive.
    #[test]
    fn record_checks_follow_a_header_without_zero_bytes() {
        let mut block = [b'x'; 512];
        block[..100].fill(b'a');
        for (at, field) in [
            (100, &b"0000644 "[..]),
            (108, b"0000000 "),
            (116, b"0000000 "),
            (124, b"00000000001 "),
            (136, b"00000000000 "),
        ] {
            block[at..at + field.len()].copy_from_slice(field);
        }
        block[156] = b'0';
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|b| u32::from(*b)).sum();
        block[148..156].copy_from_slice(format!("{sum:07o} ").as_bytes());
        assert!(!block.contains(&0));
        let mut layer = block.to_vec();
        layer.push(b'1');
        layer.resize(1024, 0);
        refused(&then_big_pax(layer.clone()), 512);
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        layer.resize(2048, 0);
        u.unpack_tar(layer.as_slice(), "sha256:v7", &NO).unwrap();
        assert_eq!(std::fs::read(d.path().join("a".repeat(100))).unwrap(), b"1");
    }

    /// The record checks see the same stream however it is split, even
    /// when a read ends inside a header and the next one goes past it.
    #[test]
    fn record_checks_follow_any_split_of_the_stream() {
        let mut b = tar::Builder::new(Vec::new());
        add(
            &mut b,
            header(T::Regular, "a", 0o644, 0, 0, 700),
            &[b'a'; 700],
            &[],
        );
        let layer = then_big_pax(without_end(b.into_inner().unwrap()));
        for first in [1, 100, 511] {
            let mut cap = RecordCap::new(io::empty());
            cap.follow(&layer[..first]).unwrap();
            let e = cap.follow(&layer[first..]).unwrap_err();
            assert!(e.to_string().starts_with("a PAX record of"), "{first}: {e}");
        }
    }

    /// PAX owners are read as PAX times are, as a decimal number whose
    /// fraction is dropped (the tar crate itself takes only integers).
    #[test]
    fn pax_owners_with_a_fraction_are_read_too() {
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        add(
            &mut b,
            header(T::Regular, "f", 0o644, 1, 2, 0),
            b"",
            &[("uid", b"70000.0"), ("gid", b"80000.0")],
        );
        u.unpack_tar(b.into_inner().unwrap().as_slice(), "sha256:x", &NO)
            .unwrap();
        let f = d.path().join("f");
        assert_eq!(
            (getx32(&f, XATTR_UID), getx32(&f, XATTR_GID)),
            (Some(70000), Some(80000))
        );
    }
}
