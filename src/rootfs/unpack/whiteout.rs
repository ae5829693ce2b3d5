//! What an upper layer takes away from lower ones: whiteouts, opaque
//! directories, and whatever an entry replaces.

use super::remove::{list_dir, remove_at};
use super::{Fail, Unpacker, io_fail};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

impl Unpacker {
    /// `.wh.NAME` removes NAME of lower layers; `.wh..wh..opq` empties its
    /// directory of everything lower layers put there.
    pub(super) fn whiteout(
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
    pub(super) fn remove_existing(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::unpack::testutil::*;
    use tar::EntryType as T;

    #[test]
    fn whiteouts_of_nothing_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let lower = pack(vec![(header(T::Regular, "d/f", 0o644), b"x")]);
        unpack(&mut u, &lower).unwrap();
        for name in ["d/.wh.", "d/.wh..", "d/.wh..."] {
            let e = unpack(&mut u, &pack(vec![(header(T::Regular, name, 0o644), b"")]));
            assert_eq!(
                e.unwrap_err(),
                format!("layer sha256:t: refused entry \"{name}\": whiteout of nothing")
            );
        }
        assert_eq!(std::fs::read(d.path().join("d/f")).unwrap(), b"x");
    }

    #[test]
    fn an_opaque_whiteout_keeps_what_its_own_layer_wrote_before_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let mut u = Unpacker::new(p).unwrap();
        let lower = pack(vec![
            (header(T::Regular, "d/sub/old", 0o644), b"o"),
            (header(T::Regular, "d/lower", 0o644), b"l"),
            (header(T::Regular, "d/f", 0o644), b"1"),
        ]);
        unpack(&mut u, &lower).unwrap();
        let upper = pack(vec![
            (header(T::Regular, "d/sub/new", 0o644), b"n"),
            (header(T::Regular, "d/f", 0o644), b"2"),
            (header(T::Regular, "d/.wh..wh..opq", 0o644), b""),
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
}
