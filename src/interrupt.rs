//! How mkt's process answers signals, in one place: a closed stdout ends
//! it quietly (as it ends `cat`), and a command stopped by SIGINT, SIGTERM
//! or SIGHUP exits 128 + the signal, as shells report it.

use nix::sys::signal::{SigHandler, Signal, signal};
use std::sync::atomic::{AtomicI32, Ordering};

static CAUGHT: AtomicI32 = AtomicI32::new(0);

/// Records that signal `sig` asked mkt to stop. Async-signal-safe: the
/// commands' handlers call it.
pub fn note(sig: i32) {
    CAUGHT.store(sig, Ordering::SeqCst);
}

/// The signal that stopped the command, if one did.
pub fn caught() -> Option<i32> {
    match CAUGHT.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The exit status of a command that failed: 128 + the signal that
/// interrupted it, else 1.
pub fn failure_status() -> i32 {
    caught().map_or(1, |s| 128 + s)
}

/// Rust starts with SIGPIPE ignored, so every print to a closed pipe
/// (`mkt ps | true`) was an EPIPE error and `println!` panicked (exit 101).
/// With the default action mkt ends there, like any Unix filter.
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL runs no code of ours in signal context.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// While a VM runs, mkt must outlive a closed stdout to tear the VM down:
/// SIGPIPE is ignored (the output relay stops at EPIPE) until this drops.
pub struct KeepOnClosedPipe(());

impl KeepOnClosedPipe {
    pub fn new() -> KeepOnClosedPipe {
        // SAFETY: SIG_IGN runs no code of ours in signal context.
        let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
        KeepOnClosedPipe(())
    }
}

impl Default for KeepOnClosedPipe {
    fn default() -> Self {
        KeepOnClosedPipe::new()
    }
}

impl Drop for KeepOnClosedPipe {
    fn drop(&mut self) {
        default_sigpipe();
    }
}
