//! Mount helpers shared by the sandbox and the confined file servers.

use nix::mount::{MsFlags, mount};
use nix::sys::statvfs::{FsFlags, statvfs};
use std::ffi::CStr;

/// Remounts the bind mount at `path` read-only. In a user namespace the
/// remount must keep the flags the kernel locked on the source (nosuid,
/// nodev, noexec and the atime ones), or it fails with EPERM. Makes no
/// allocation: it runs in forked children.
pub(crate) fn remount_read_only(path: &CStr) -> nix::Result<()> {
    let have = statvfs(path)?.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (locked, keep) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if have.contains(locked) {
            flags |= keep;
        }
    }
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
}
