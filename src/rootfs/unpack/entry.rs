//! Applying one tar entry: reading its header and PAX records into an
//! [`Item`], creating its parent directories, then the entry itself by its
//! type (directory, file, device, symlink, hardlink).

use super::meta::{host_file_mode, record_owner};
use super::{DirMeta, Fail, Item, Record, Unpacker, escape, io_fail, makedev, shown};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, UtimensatFlags, fchmod, fstatat, futimens, mkdirat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{linkat, symlinkat};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The normalised components of an entry name: `./a//b/` → `a/b`.
/// Absolute names and `..` are refused.
pub(super) fn normalize(raw: &[u8]) -> Result<PathBuf, String> {
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

impl Unpacker {
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

    /// Applies one entry: the tree's root, a whiteout, or a file of any
    /// type in its (possibly new) parent directory.
    pub(super) fn apply(
        &mut self,
        it: Item,
        data: &mut dyn Read,
        touched: &mut HashSet<PathBuf>,
        cancel: &AtomicBool,
    ) -> Result<(), Fail> {
        use tar::EntryType as T;
        let Some(file_name) = it.rel.file_name().map(|n| n.to_os_string()) else {
            // The archive's root entry ("./") describes the tree's root.
            return self.apply_root(&it);
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
        let (pfd, name) = (pfd.as_fd(), file_name.as_os_str());
        match it.kind {
            T::Directory => self.make_dir(pfd, name, &it),
            T::Regular | T::Continuous | T::GNUSparse | T::Char | T::Block | T::Fifo => {
                self.make_file(pfd, name, &it, data, cancel)
            }
            T::Symlink => self.make_symlink(pfd, name, &it),
            T::Link => self.make_hardlink(pfd, name, &it),
            other => Err(Fail::Refuse(format!("unsupported entry type {other:?}"))),
        }
    }

    /// The root entry: the tree's root directory's owner, mode and time.
    fn apply_root(&mut self, it: &Item) -> Result<(), Fail> {
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
        Ok(())
    }

    /// A directory, kept if one is there; its mode and time come last.
    fn make_dir(&mut self, pfd: BorrowedFd, name: &OsStr, it: &Item) -> Result<(), Fail> {
        if !self.remove_existing(pfd, name, true)? {
            mkdirat(pfd, name, Mode::from_bits_truncate(0o700))
                .map_err(io_fail("create the directory"))?;
        }
        let fd = openat(
            pfd,
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
        Ok(())
    }

    /// A regular file with its content, or a device node or FIFO (made
    /// with mknod in real mode where allowed, else a file with its record).
    fn make_file(
        &mut self,
        pfd: BorrowedFd,
        name: &OsStr,
        it: &Item,
        data: &mut dyn Read,
        cancel: &AtomicBool,
    ) -> Result<(), Fail> {
        use tar::EntryType as T;
        let special = matches!(it.kind, T::Char | T::Block | T::Fifo);
        if !special {
            // Before anything is written: a sparse file's holes are
            // written out as zeros.
            self.reserve(it.size)?;
        }
        self.remove_existing(pfd, name, false)?;
        if special && self.record == Record::Real && self.mknod(pfd, name, it)? {
            return Ok(());
        }
        let fd = openat(
            pfd,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
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
        Ok(())
    }

    /// A symlink; its xattrs cannot be kept (reported as skipped).
    fn make_symlink(&mut self, pfd: BorrowedFd, name: &OsStr, it: &Item) -> Result<(), Fail> {
        let target = it.link.clone().unwrap_or_default();
        if target.is_empty() {
            return Err(Fail::Refuse("symlink with an empty target".into()));
        }
        self.remove_existing(pfd, name, false)?;
        symlinkat(OsStr::from_bytes(&target), pfd, name).map_err(io_fail("create the symlink"))?;
        if self.record == Record::Real {
            self.chown_at(pfd, name, it)?;
        }
        let t = TimeSpec::new(it.mtime, 0);
        utimensat(pfd, name, &t, &t, UtimensatFlags::NoFollowSymlink)
            .map_err(io_fail("set the symlink's time"))?;
        for (k, _) in &it.xattrs {
            self.stats
                .skipped_xattrs
                .push(format!("{} (on a symlink)", escape(k.as_bytes())));
        }
        Ok(())
    }

    /// A hardlink to an existing non-directory of the tree.
    fn make_hardlink(&mut self, pfd: BorrowedFd, name: &OsStr, it: &Item) -> Result<(), Fail> {
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
        self.remove_existing(pfd, name, false)?;
        linkat(tfd.as_fd(), tname, pfd, name, AtFlags::empty())
            .map_err(io_fail("create the hardlink"))?;
        Ok(())
    }
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
    // Zeros are skipped, not written: a GNU sparse entry reads as its
    // apparent size with the holes as zeros, and writing them would take
    // that much disk. The file is new, so a hole reads back as zeros.
    let mut hole_at_end = false;
    loop {
        let k = match data.read(&mut buf) {
            Ok(0) => {
                if hole_at_end {
                    out.set_len(n).map_err(|e| Fail::Io("write the file", e))?;
                }
                return Ok(n);
            }
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Fail::Read(e)),
        };
        if n + k as u64 > size {
            return Err(Fail::Read(io::Error::other(format!(
                "the entry holds more than the {size} bytes its header says"
            ))));
        }
        hole_at_end = buf[..k].iter().all(|b| *b == 0);
        if hole_at_end {
            out.seek(io::SeekFrom::Current(k as i64))
        } else {
            out.write_all(&buf[..k]).map(|()| 0)
        }
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

pub(super) fn read_item<R: Read>(entry: &mut tar::Entry<R>, raw: &[u8]) -> Result<Item, Fail> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::unpack::testutil::*;
    use crate::rootfs::unpack::{UnpackError, XATTR_GID, XATTR_MODE, XATTR_UID};
    use tar::EntryType as T;

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
    fn the_root_entry_describes_the_root_and_can_only_be_a_directory() {
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let mut root = header(T::Directory, "./", 0o750);
        root.set_uid(7);
        root.set_mtime(1_000_000);
        unpack(&mut u, &pack(vec![(root, b"")])).unwrap();
        u.finish().unwrap();
        assert_eq!(perms(d.path()), 0o750);
        assert_eq!(mtime_of(d.path()), 1_000_000);
        assert_eq!(getx32(d.path(), XATTR_UID), Some(7));
        assert_eq!(getx32(d.path(), XATTR_MODE), Some(libc::S_IFDIR | 0o750));
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = unpack(&mut u, &pack(vec![(header(T::Regular, "./", 0o644), b"x")])).unwrap_err();
        assert_eq!(
            e,
            "layer sha256:t: refused entry \"./\": the tree's root can only be a directory"
        );
    }

    #[test]
    fn paths_and_hardlinks_through_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let lower = pack(vec![
            (header(T::Regular, "f", 0o644), b"x"),
            (header(T::Directory, "dir/", 0o755), b""),
        ]);
        unpack(&mut u, &lower).unwrap();
        let notdir = "goes through something that is not a directory";
        for (h, want) in [
            (
                header(T::Regular, "f/x", 0o644),
                format!("its path {notdir}"),
            ),
            (
                header(T::Regular, "f/.wh..wh..opq", 0o644),
                format!("its directory {notdir}"),
            ),
            (
                header(T::Regular, "f/.wh.x", 0o644),
                format!("its directory {notdir}"),
            ),
            (
                link(T::Link, "h", "f/x"),
                format!("its hardlink target {notdir}"),
            ),
            (link(T::Link, "h", "dir"), "hardlink to a directory".into()),
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
        let layer = pack(vec![(
            header(tar::EntryType::Regular, "f", 0o644),
            b"content",
        )]);
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

    /// PAX owners are read as PAX times are, as a decimal number whose
    /// fraction is dropped (the tar crate itself takes only integers).
    #[test]
    fn pax_owners_with_a_fraction_are_read_too() {
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        add(
            &mut b,
            owned(T::Regular, "f", 0o644, 1, 2),
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
