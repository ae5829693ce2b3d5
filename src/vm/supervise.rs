//! Running QEMU: signals, the console and ports relayed, its exit watched.

use super::error::RunError;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

pub(crate) static SIGNALLED: AtomicI32 = AtomicI32::new(0);

/// Set by SIGWINCH: the host terminal was resized.
pub(crate) static RESIZED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

pub(crate) extern "C" fn on_winch(_: i32) {
    RESIZED.store(true, Ordering::SeqCst);
}

/// Accepts QEMU's connection on `listener`, then sends the terminal's
/// `rows cols` after each resize until QEMU goes. Detached: it has nothing
/// to hand back.
pub(crate) fn relay_winsize(listener: UnixListener) {
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        loop {
            if RESIZED.swap(false, Ordering::SeqCst)
                && let Some(t) = host_terminal().filter(|t| t.rows > 0 && t.cols > 0)
                && writeln!(s, "{} {}", t.rows, t.cols).is_err()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

pub(crate) extern "C" fn on_signal(sig: i32) {
    SIGNALLED.store(sig, Ordering::SeqCst);
    crate::interrupt::note(sig);
}

pub(crate) fn install_signal_handlers() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let _ = sigaction(s, &act);
        }
    }
    let winch = SigAction::new(
        SigHandler::Handler(on_winch),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: as above: the handler only stores to an atomic.
    unsafe {
        let _ = sigaction(Signal::SIGWINCH, &winch);
    }
}

/// Accepts QEMU's connection on `listener` and copies it to `sink`.
pub(crate) fn relay(
    listener: UnixListener,
    mut sink: impl Write + Send + 'static,
) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let Ok((mut s, _)) = listener.accept() else {
            return kept;
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let _ = sink.flush();
                    if kept.len() < 4096 {
                        kept.extend_from_slice(&buf[..n]);
                    }
                }
            }
        }
        kept
    })
}

/// Kills QEMU if the relay threads are still blocked in accept after QEMU
/// died: connecting to each listener unblocks them.
pub(crate) fn unblock(sockets: &[PathBuf]) {
    for s in sockets {
        let _ = UnixStream::connect(s);
    }
}

/// Waits for a child to exit without reaping it, at most a given time: a
/// pidfd wakes the caller the moment QEMU exits (a plain sleep between
/// polls cost up to its whole length at the end of every run).
pub(crate) struct ExitWatch(Option<std::os::fd::OwnedFd>);

impl ExitWatch {
    pub(crate) fn new(pid: u32) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd
        // (or -1 on kernels before 5.3: then the caller just sleeps).
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        // SAFETY: a non-negative result is a new fd that nothing else owns.
        ExitWatch((fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }))
    }

    pub(crate) fn wait(&self, most: Duration) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        match &self.0 {
            Some(fd) => {
                let ms = u16::try_from(most.as_millis()).unwrap_or(u16::MAX);
                // A signal interrupts it (EINTR): the caller checks for that.
                let _ = poll(
                    &mut [PollFd::new(fd.as_fd(), PollFlags::POLLIN)],
                    PollTimeout::from(ms),
                );
            }
            None => std::thread::sleep(most),
        }
    }
}

/// `: ` and the last lines of QEMU's stderr, or nothing when it is empty.
pub(crate) fn stderr_tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.trim().lines().collect();
    match lines.len() {
        0 => String::new(),
        n => format!(": {}", lines[n.saturating_sub(20)..].join("\n")),
    }
}

/// For a child's pre_exec: SIGKILL when mkt (pid `parent`) dies. A kill
/// -9 of mkt between the fork and the prctl would never reach the child,
/// which would live on as an orphan: hence the parent check after it.
pub(crate) fn die_with(parent: u32) -> impl Fn() -> io::Result<()> + Send + Sync + 'static {
    move || {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(io::Error::from)?;
        if nix::unistd::getppid().as_raw() as u32 != parent {
            // SAFETY: _exit is async-signal-safe and skips the parent's
            // atexit handlers.
            unsafe { libc::_exit(1) }
        }
        Ok(())
    }
}

pub(crate) fn spawn_qemu(
    argv: &[String],
    exec: bool,
    keep_fd: Option<i32>,
    confine: crate::confine::Confinement,
) -> Result<Child, RunError> {
    let confined = !confine.is_empty();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    if exec {
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
    }
    cmd.stderr(Stdio::piped());
    // QEMU dies with mkt even on kill -9, and inherits the tap fd (`fd=N`
    // names it).
    let die = die_with(std::process::id());
    // SAFETY: prctl, getppid and fcntl are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            die()?;
            if let Some(fd) = keep_fd
                && libc::fcntl(fd, libc::F_SETFD, 0) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // QEMU serves 9p shares itself (crate::confine says why).
            confine.enter()
        });
    }
    cmd.spawn().map_err(|e| match (e.raw_os_error(), confined) {
        (Some(libc::EPERM | libc::EINVAL | libc::ENOSPC), true) => RunError::Io(
            format!(
                "cannot start {} confined for its 9p shares (a private mount namespace, a user namespace when not root, keeps the rootfs store read-only)",
                argv[0]
            ),
            e,
        ),
        _ => RunError::Spawn(argv[0].clone().into(), e),
    })
}

nix::ioctl_read_bad!(tiocgwinsz, nix::libc::TIOCGWINSZ, nix::pty::Winsize);

/// The terminal on stdin (QEMU's console): its TERM and size, for the
/// guest's console. None when stdin is no terminal.
pub(crate) fn host_terminal() -> Option<crate::guest::Terminal> {
    let stdin = io::stdin();
    if !nix::unistd::isatty(&stdin).unwrap_or(false) {
        return None;
    }
    let mut ws = nix::pty::Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: fd 0 is open (a tty) and ws is a valid struct winsize.
    let _ = unsafe { tiocgwinsz(0, &mut ws) };
    Some(crate::guest::Terminal {
        term: std::env::var("TERM").unwrap_or_default(),
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}
