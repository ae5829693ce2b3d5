//! Removing a tree whatever its directories' modes, never following a
//! symlink and with one directory open at a time.

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub(super) fn list_dir(fd: BorrowedFd) -> Result<Vec<std::ffi::OsString>, Errno> {
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
pub(super) fn remove_at(dirfd: BorrowedFd, name: &OsStr) -> io::Result<()> {
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
    use crate::rootfs::unpack::testutil::*;

    /// Runs `f` on a thread without the capabilities that let root ignore
    /// file modes and owners (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH,
    /// CAP_FOWNER): capabilities are per thread.
    fn as_plain_owner<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        without_caps((1 << 1) | (1 << 2) | (1 << 3), f)
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
}
