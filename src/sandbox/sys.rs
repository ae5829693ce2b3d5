//! The small syscall helpers the sandbox's processes share (async-signal-safe
//! where a forked child uses them).

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;

use super::NsError;
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

pub(crate) fn cstr(s: &OsStr) -> Result<CString, NsError> {
    CString::new(s.as_bytes()).map_err(|_| NsError::Nul(s.to_owned()))
}

pub(crate) fn write_file(path: &str, data: &[u8]) -> Result<(), Errno> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    f.write_all(data)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

/// In a forked child: SIGKILL when the parent (`parent`) dies. A parent
/// killed between the fork and the prctl never sends it, so the child
/// checks it still has that parent afterwards, and else ends at once
/// rather than live on as an orphan.
pub(crate) fn die_with(parent: Pid) {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid() != parent {
        // SAFETY: _exit is async-signal-safe and runs none of the parent's
        // atexit handlers.
        unsafe { libc::_exit(1) }
    }
}

pub(crate) fn reset_signals() {
    use nix::sys::signal::{SigHandler, signal};
    for s in [Signal::SIGINT, Signal::SIGQUIT] {
        // SAFETY: restoring the default disposition runs no code.
        unsafe {
            let _ = signal(s, SigHandler::SigDfl);
        }
    }
}

/// Ignores SIGINT/SIGQUIT in mkt while a child runs (like system(3)); the
/// child resets them. Restored on drop. A handler of mkt's own (`rootfs
/// pull`/`build` stop cleanly on Ctrl-C) stays: mkt must learn of the
/// interrupt to exit 130.
pub(crate) struct IgnoreSignals(Vec<(Signal, nix::sys::signal::SigAction)>);

impl IgnoreSignals {
    pub(crate) fn new() -> Self {
        use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
        let ign = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
        let mut old = Vec::new();
        for s in [Signal::SIGINT, Signal::SIGQUIT] {
            // SAFETY: installing SIG_IGN runs no code in signal context.
            if let Ok(prev) = unsafe { sigaction(s, &ign) } {
                if matches!(
                    prev.handler(),
                    SigHandler::Handler(_) | SigHandler::SigAction(_)
                ) {
                    // SAFETY: puts back the handler that was installed.
                    let _ = unsafe { sigaction(s, &prev) };
                } else {
                    old.push((s, prev));
                }
            }
        }
        IgnoreSignals(old)
    }
}

impl Drop for IgnoreSignals {
    fn drop(&mut self) {
        for (s, prev) in &self.0 {
            // SAFETY: restores the handler that was installed before.
            unsafe {
                let _ = nix::sys::signal::sigaction(*s, prev);
            }
        }
    }
}
