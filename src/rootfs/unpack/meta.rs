//! Owners, modes, extended attributes and device nodes: kept for real
//! (`Record::Real`) or in QEMU's mapped-xattr records (`Record::Xattrs`).

use super::{Fail, Item, Record, Unpacker, escape, io_fail};
use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{Mode, UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

pub const XATTR_UID: &str = "user.virtfs.uid";
pub const XATTR_GID: &str = "user.virtfs.gid";
pub const XATTR_MODE: &str = "user.virtfs.mode";
pub const XATTR_RDEV: &str = "user.virtfs.rdev";

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
pub(super) fn record_owner(
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

impl Unpacker {
    /// Keeps the entry's owner (and, for `Xattrs`, its full mode and
    /// device number) on the open file `fd`.
    pub(super) fn own(
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
    pub(super) fn file_mode(&self, mode: u32) -> u32 {
        match self.record {
            Record::Xattrs => host_file_mode(mode),
            Record::Real => mode & 0o7777,
        }
    }

    /// The mode a directory gets on the host (applied last).
    pub(super) fn dir_mode(&self, mode: u32) -> u32 {
        match self.record {
            Record::Xattrs => host_dir_mode(mode),
            Record::Real => mode & 0o7777,
        }
    }

    /// Real mode: the owner of `name` in `pfd` (never following it); an id
    /// the user namespace does not map leaves it root's, counted.
    pub(super) fn chown_at(
        &mut self,
        pfd: BorrowedFd,
        name: &OsStr,
        it: &Item,
    ) -> Result<(), Fail> {
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
    pub(super) fn mknod(&mut self, pfd: BorrowedFd, name: &OsStr, it: &Item) -> Result<bool, Fail> {
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

    pub(super) fn set_xattrs(
        &mut self,
        fd: BorrowedFd,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<(), Fail> {
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
}

pub(super) fn host_file_mode(mode: u32) -> u32 {
    (mode & 0o777) | 0o400
}

fn host_dir_mode(mode: u32) -> u32 {
    (mode & 0o777) | 0o500
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::unpack::Stats;
    use crate::rootfs::unpack::testutil::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use tar::EntryType as T;

    #[test]
    fn device_numbers_use_glibcs_encoding() {
        assert_eq!(makedev(1, 3), 0x103);
        assert_eq!(makedev(8, 17), 0x811);
        assert_eq!(makedev(259, 0x12345), 0x1231_0345);
        assert_eq!(makedev(0x12345, 7), libc::makedev(0x12345, 7));
    }

    #[test]
    fn xattr_records_carry_the_file_type_and_devices_become_files() {
        use std::os::unix::fs::FileTypeExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let mut u = Unpacker::new(p).unwrap();
        let dev = |kind, name, major, minor| {
            let mut h = device(kind, name, 0o640, 0, major, minor);
            h.set_uid(5);
            h
        };
        let layer = pack(vec![
            (header(T::Directory, "d/", 0o751), b""),
            (header(T::Regular, "a/f", 0o644), b"data"),
            (dev(T::Char, "c", 1, 3), b""),
            (dev(T::Block, "b", 8, 17), b""),
            (dev(T::Fifo, "p", 0, 0), b""),
        ]);
        unpack(&mut u, &layer).unwrap();
        u.finish().unwrap();
        let mode = |name: &str| getx32(&p.join(name), XATTR_MODE);
        assert_eq!(mode("d"), Some(libc::S_IFDIR | 0o751));
        // A parent no entry names: root's, 0755, as Docker makes it.
        assert_eq!(mode("a"), Some(libc::S_IFDIR | 0o755));
        assert_eq!(mode("a/f"), Some(libc::S_IFREG | 0o644));
        assert!(std::fs::symlink_metadata(p.join("a/f")).unwrap().is_file());
        assert_eq!(std::fs::read(p.join("a/f")).unwrap(), b"data");
        for (name, bits, rdev) in [
            ("c", libc::S_IFCHR, Some(makedev(1, 3))),
            ("b", libc::S_IFBLK, Some(makedev(8, 17))),
            ("p", libc::S_IFIFO, None),
        ] {
            let m = std::fs::symlink_metadata(p.join(name)).unwrap();
            assert!(m.is_file() && !m.file_type().is_fifo(), "{name}: {m:?}");
            assert_eq!(mode(name), Some(bits | 0o640), "{name}");
            assert_eq!(getx32(&p.join(name), XATTR_UID), Some(5), "{name}");
            assert_eq!(getx64(&p.join(name), XATTR_RDEV), rdev, "{name}");
            assert_eq!(perms(&p.join(name)), 0o640, "{name}");
        }
    }

    #[test]
    fn real_mode_makes_device_nodes_and_owns_symlinks() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dev = device(T::Char, "c", 0o620, 0, 1, 3);
        let mut sym = link(T::Symlink, "l", "f");
        sym.set_uid(1234);
        let layer = pack(vec![
            (header(T::Regular, "f", 0o644), b"data"),
            (dev, b""),
            (header(T::Fifo, "p", 0o600), b""),
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
    fn real_mode_keeps_a_device_it_may_not_make_as_a_file_with_its_record() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let mut dev = device(T::Block, "b", 0o640, 0, 8, 17);
        dev.set_uid(6);
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
        assert_eq!(getx32(&b, XATTR_MODE), Some(libc::S_IFBLK | 0o640));
        assert_eq!(getx32(&b, XATTR_UID), Some(6));
        assert_eq!(getx64(&b, XATTR_RDEV), Some(makedev(8, 17)));
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
            owned(T::Directory, "d", 0o1750, 1000, 100),
            b"",
            &[],
        );
        // Type bits in the mode field (some tars write them) are dropped;
        // PAX owners and time win over the header's.
        add(
            &mut b,
            owned(T::Regular, "d/f", 0o104640, 1, 2),
            b"hi",
            &[
                ("uid", b"70000"),
                ("gid", b"80000"),
                ("mtime", b"1700000000.5"),
            ],
        );
        add(&mut b, device(T::Char, "c", 0o620, 5, 1, 3), b"", &[]);
        add(&mut b, device(T::Block, "b", 0o660, 6, 8, 17), b"", &[]);
        add(&mut b, owned(T::Fifo, "p", 0o644, 7, 8), b"", &[]);
        // Blank numeric fields read as 0, as Go's archive/tar reads them.
        let mut h = owned(T::Regular, "blank", 0o644, 9, 9);
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
            owned(T::Regular, "f", 0o644, 1, 1),
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
            owned(T::Directory, "d", 0o755, 1, 1),
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
            owned(T::Regular, "g", 0o644, 1, 1),
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
            owned(T::Directory, "d", 0o1750, 1000, 100),
            b"",
            &[],
        );
        add(
            &mut b,
            owned(T::Regular, "f", 0o4750, 1000, 100),
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
            header(T::Regular, "badcap", 0o755),
            b"",
            &[("SCHILY.xattr.security.capability", b"bad")],
        );
        add(&mut b, device(T::Char, "null", 0o620, 5, 1, 3), b"", &[]);
        add(&mut b, device(T::Block, "loop", 0o660, 6, 7, 0), b"", &[]);
        add(&mut b, owned(T::Fifo, "p", 0o666, 1001, 1002), b"", &[]);
        let mut h = owned(T::Symlink, "l", 0o777, 1003, 1004);
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

    /// Real mode as root of a user namespace mapping only root: owners it
    /// does not map stay root's and devices become files, both counted.
    #[test]
    fn real_mode_in_a_user_namespace_counts_unmapped_owners_and_devices() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().to_path_buf();
        let mut b = tar::Builder::new(Vec::new());
        add(&mut b, owned(T::Regular, "f", 0o644, 1000, 0), b"", &[]);
        add(&mut b, owned(T::Fifo, "p", 0o640, 1000, 0), b"", &[]);
        let mut h = owned(T::Symlink, "l", 0o777, 1000, 0);
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
        add(&mut b, header(T::Fifo, "imm/p", 0o644), b"", &[]);
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
}
