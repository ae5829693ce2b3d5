//! Locks of the store, so that concurrent mkt processes (of any pid
//! namespace) never delete what another one uses:
//!
//! - a tree is locked shared by everything that uses it (`mkt run` for the
//!   VM's whole life, `mkt build`, `mkt rootfs shell`) and exclusively by
//!   `rootfs rm` and by a `--force` pull or build that replaces it, which
//!   refuse when they cannot have it;
//! - a temp dir (`.tmp-…` of a pull or build, `.rm-…` of a removal) is
//!   locked exclusively by its maker; the stale sweep removes one only when
//!   it can take that lock itself;
//! - `blob_dir/.lock` is held shared by pulls and builds while they use
//!   downloaded blobs and exclusively by `rootfs gc`.
//!
//! All are flock(2) locks on file descriptors opened close-on-exec (std
//! opens every file with O_CLOEXEC). A flock lock belongs to the open file
//! description: children that exec (QEMU, virtiofsd, tar, mmdebstrap) never
//! hold it, and children that only fork (the namespace's init) hold it no
//! longer than mkt itself, as they die with it (PDEATHSIG). So a lock never
//! outlives the mkt process that took it, and a killed mkt's temp dir is
//! free to sweep at once. PIDs are not used: they mean nothing across pid
//! namespaces.

use super::{RootfsError, store_err};
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A held lock; released when dropped.
#[derive(Debug)]
pub(crate) struct Lock(#[allow(dead_code)] Flock<File>);

/// Why a lock could not be had.
pub(crate) enum TryLock {
    Held(Lock),
    /// Another open file description holds a conflicting lock.
    Busy,
}

fn try_lock(file: File, arg: FlockArg) -> std::io::Result<TryLock> {
    match Flock::lock(file, arg) {
        Ok(l) => Ok(TryLock::Held(Lock(l))),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(TryLock::Busy),
        Err((_, e)) => Err(e.into()),
    }
}

/// Tries to lock the directory (or file) `path` exclusively without waiting.
pub(crate) fn try_exclusive(path: &Path) -> std::io::Result<TryLock> {
    try_lock(File::open(path)?, FlockArg::LockExclusiveNonblock)
}

/// The processes holding a flock lock on `path` (from /proc/locks), as
/// `VM NAME (pid N)` when `runtime_dir` has a record of it, else
/// `pid N (command line)`.
pub(crate) fn holders(path: &Path, runtime_dir: Option<&Path>) -> Vec<String> {
    let Ok(m) = std::fs::metadata(path) else {
        return vec![];
    };
    let dev = format!(
        "{:02x}:{:02x}:{}",
        libc::major(m.dev()),
        libc::minor(m.dev()),
        m.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let mut pids: Vec<u32> = locks
        .lines()
        .filter(|l| !l.contains("->"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&dev.as_str()))
                .then(|| f.get(4)?.parse().ok())
                .flatten()
        })
        .filter(|p| *p > 0)
        .collect();
    pids.sort();
    pids.dedup();
    let vms = runtime_dir
        .and_then(|d| crate::instance::records(d).ok())
        .unwrap_or_default();
    pids.into_iter()
        .map(|pid| {
            if let Some(r) = vms.iter().find(|r| r.pid == pid) {
                return format!("VM {} (pid {pid})", r.name);
            }
            let cmd = procfs::process::Process::new(pid as i32)
                .and_then(|p| p.cmdline())
                .map(|args| args.join(" "))
                .unwrap_or_default();
            let mut cmd: String = cmd.chars().take(80).collect();
            if cmd.is_empty() {
                cmd = "?".into();
            }
            format!("pid {pid} ({cmd})")
        })
        .collect()
}

fn who(path: &Path, runtime_dir: Option<&Path>) -> String {
    let h = holders(path, runtime_dir);
    if h.is_empty() {
        "another process".into()
    } else {
        h.join(", ")
    }
}

/// The stored tree `tree` (named `name`), locked shared for as long as it
/// is used. Fails when it is being removed or replaced.
pub(crate) fn tree_shared(tree: &Path, name: &str) -> Result<Lock, RootfsError> {
    let file = File::open(tree).map_err(store_err("open", tree))?;
    let before = file.metadata().map_err(store_err("open", tree))?;
    let lock =
        match try_lock(file, FlockArg::LockSharedNonblock).map_err(store_err("lock", tree))? {
            TryLock::Held(l) => l,
            TryLock::Busy => {
                return Err(RootfsError::Busy {
                    name: name.into(),
                    path: tree.into(),
                });
            }
        };
    // Still the tree at that path (not renamed away before the lock).
    match std::fs::symlink_metadata(tree) {
        Ok(m) if m.ino() == before.ino() && m.dev() == before.dev() => Ok(lock),
        _ => Err(RootfsError::Busy {
            name: name.into(),
            path: tree.into(),
        }),
    }
}

/// For a user of the rootfs `tree` (`mkt run` for the VM's life, `mkt
/// build`): a shared lock when it is a tree of the store, which is made
/// private (0700) if it is not yet. A directory given by path is not
/// locked: mkt never removes those.
pub(crate) fn in_use(
    paths: &crate::config::Paths,
    tree: &Path,
) -> Result<Option<Lock>, RootfsError> {
    let Some(name) = tree
        .parent()
        .filter(|p| *p == paths.rootfs_dir)
        .and_then(|_| tree.file_name())
    else {
        return Ok(None);
    };
    super::tighten(&paths.rootfs_dir)?;
    tree_shared(tree, &name.to_string_lossy()).map(Some)
}

/// The stored tree `tree` locked exclusively (to remove or replace it), or
/// an error naming who uses it.
pub(crate) fn tree_exclusive(
    tree: &Path,
    name: &str,
    runtime_dir: Option<&Path>,
) -> Result<Lock, RootfsError> {
    match try_exclusive(tree).map_err(store_err("lock", tree))? {
        TryLock::Held(l) => Ok(l),
        TryLock::Busy => Err(RootfsError::InUse {
            name: name.into(),
            by: who(tree, runtime_dir),
        }),
    }
}

fn store_lock_path(blob_dir: &Path) -> PathBuf {
    blob_dir.join(".lock")
}

fn open_store_lock(blob_dir: &Path) -> Result<(File, PathBuf), RootfsError> {
    std::fs::create_dir_all(blob_dir).map_err(store_err("create", blob_dir))?;
    let p = store_lock_path(blob_dir);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(store_err("open", &p))?;
    Ok((f, p))
}

/// Held by a pull or build while it downloads and uses blobs. Waits while
/// a gc runs (gc is quick).
pub(crate) fn blobs_shared(blob_dir: &Path) -> Result<Lock, RootfsError> {
    let (f, p) = open_store_lock(blob_dir)?;
    Flock::lock(f, FlockArg::LockShared)
        .map(Lock)
        .map_err(|(_, e)| store_err("lock", &p)(e.into()))
}

/// Held by `rootfs gc`: refused while a pull or build runs.
pub(crate) fn blobs_exclusive(
    blob_dir: &Path,
    runtime_dir: Option<&Path>,
) -> Result<Lock, RootfsError> {
    let (f, p) = open_store_lock(blob_dir)?;
    match try_lock(f, FlockArg::LockExclusiveNonblock).map_err(store_err("lock", &p))? {
        TryLock::Held(l) => Ok(l),
        TryLock::Busy => Err(RootfsError::GcBusy {
            by: who(&p, runtime_dir),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_is_refused_while_shared_is_held_and_names_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("t");
        std::fs::create_dir(&t).unwrap();
        let shared = tree_shared(&t, "t").unwrap();
        let _second = tree_shared(&t, "t").unwrap();
        let e = tree_exclusive(&t, "t", None).unwrap_err().to_string();
        assert!(e.contains("rootfs t is in use by"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(shared);
        drop(_second);
        let ex = tree_exclusive(&t, "t", None).unwrap();
        let e = tree_shared(&t, "t").unwrap_err().to_string();
        assert!(e.contains("being removed or replaced"), "{e}");
        drop(ex);
        tree_shared(&t, "t").unwrap();
    }
}
