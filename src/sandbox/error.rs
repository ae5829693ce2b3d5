//! Why entering or running in a sandbox failed: each variant names the step.

use nix::errno::Errno;
use std::ffi::OsString;

/// Why entering the tree or running the command failed.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("path {0:?} contains a NUL byte")]
    Nul(OsString),
    #[error("cannot create a pipe")]
    Pipe(#[source] Errno),
    #[error("cannot fork")]
    Fork(#[source] Errno),
    #[error("cannot wait for the namespace's init")]
    Wait(#[source] Errno),
    #[error("entering the rootfs failed at: {step}")]
    Setup {
        step: String,
        #[source]
        source: Errno,
    },
    #[error("cannot run {program:?} inside the rootfs")]
    Exec {
        program: OsString,
        #[source]
        source: Errno,
    },
    #[error("the namespace's init ended without reporting (status {0})")]
    Vanished(i32),
    #[error("{helper} failed to map the subordinate ids: {detail}")]
    MapHelper {
        helper: &'static str,
        detail: String,
    },
    #[error(
        "cannot {step} for a user namespace (root enters a tree through an idmapped mount: \
         Linux 5.12 or later, and a file system that supports it, like ext4, xfs, btrfs or tmpfs)"
    )]
    Idmap {
        step: String,
        #[source]
        source: Errno,
    },
}
