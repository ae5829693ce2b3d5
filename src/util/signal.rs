//! How mkt's process answers signals, in one place (signal-hook's handlers,
//! so no code of ours runs in signal context): a closed stdout ends it
//! quietly (as it ends `cat`), and a command stopped by SIGINT, SIGTERM or
//! SIGHUP exits 128 + the signal, as shells report it.

use nix::sys::signal::{SigHandler, Signal, signal};
use signal_hook::SigId;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The signals that ask mkt to stop.
const STOP: [i32; 3] = [SIGINT, SIGTERM, SIGHUP];

static CAUGHT: AtomicUsize = AtomicUsize::new(0);

/// From the first call on, each stop signal is recorded for [`caught`].
/// Registered before any other action, so it is set when they run.
fn record_stops() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for sig in STOP {
            let r = signal_hook::flag::register_usize(sig, &CAUGHT, sig as usize);
            warn_unless_caught(sig, r);
        }
    });
}

/// A stop signal that cannot be caught (not known to happen) keeps its
/// default action: mkt says so and goes on.
fn warn_unless_caught(sig: i32, r: io::Result<SigId>) {
    if let Err(e) = r {
        tracing::warn!("cannot catch signal {sig}: {e}");
    }
}

/// The signal that stopped the command, if one did.
pub fn caught() -> Option<i32> {
    match CAUGHT.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s as i32),
    }
}

/// The exit status of a command that failed: 128 + the signal that
/// interrupted it, else 1.
pub fn failure_status() -> i32 {
    caught().map_or(1, |s| 128 + s)
}

/// `mkt rootfs pull/build`: a flag the first stop signal sets, for the
/// work to stop cleanly; a second one kills at once (the default action:
/// the next pull sweeps what is left).
pub(crate) fn stop_flag() -> &'static AtomicBool {
    static STOPPED: AtomicBool = AtomicBool::new(false);
    static ONCE: Once = Once::new();
    record_stops();
    ONCE.call_once(|| {
        for sig in STOP {
            // The default goes first: it acts only once the flag is set.
            let r = signal_hook::flag::register_conditional_default(sig, &STOPPED)
                .and_then(|_| signal_hook::flag::register(sig, &STOPPED));
            warn_unless_caught(sig, r);
        }
    });
    &STOPPED
}

/// `mkt run`: an fd that turns readable at a stop signal ([`caught`] says
/// which), for a poll(2) that also waits for QEMU. Only a wake-up: a
/// signal caught before it existed is in [`caught`] alone. The handlers go
/// when it drops.
pub(crate) struct StopPipe {
    read: UnixStream,
    ids: Vec<SigId>,
}

impl StopPipe {
    pub(crate) fn new() -> io::Result<StopPipe> {
        record_stops();
        let (read, write) = UnixStream::pair()?;
        let mut pipe = StopPipe {
            read,
            ids: Vec::new(),
        };
        for sig in STOP {
            let id = signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
            pipe.ids.push(id);
        }
        Ok(pipe)
    }
}

impl AsFd for StopPipe {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

impl Drop for StopPipe {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
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
pub(crate) struct KeepOnClosedPipe(());

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
