//! Running QEMU: the console and ports relayed, its exit (or a signal to
//! mkt) waited for.

use super::error::RunError;
use crate::util::signal::StopPipe;
use signal_hook::consts::SIGWINCH;
use signal_hook::iterator::Signals;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

/// Accepts QEMU's connection on `listener`, then sends the terminal's
/// `rows cols` after each resize (SIGWINCH; one before QEMU connects is
/// kept) until QEMU goes. Detached: it has nothing to hand back.
pub(crate) fn relay_winsize(listener: UnixListener) {
    let Ok(mut resized) =
        Signals::new([SIGWINCH]).inspect_err(|e| tracing::warn!("cannot catch SIGWINCH: {e}"))
    else {
        return;
    };
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        for _ in resized.forever() {
            if let Some(t) = host_terminal().filter(|t| t.rows > 0 && t.cols > 0)
                && writeln!(s, "{} {}", t.rows, t.cols).is_err()
            {
                return;
            }
        }
    });
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

/// Waits for QEMU to exit; a stop signal to mkt kills it and ends the run.
/// One poll(2) sleeps on both, QEMU's pidfd and the signals' pipe: no
/// timer wakes mkt, and it learns of either at once.
pub(crate) fn wait_qemu(
    child: &mut Child,
    stop: &StopPipe,
    sockets: &[PathBuf],
) -> Result<ExitStatus, RunError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use rustix::process::{Pid, PidfdFlags, pidfd_open};
    let waiting = RunError::Wait;
    let exited = pidfd_open(Pid::from_child(child), PidfdFlags::empty()).ok();
    // Without a pidfd (Linux before 5.3), QEMU is looked at every 20 ms.
    let timeout = match exited {
        Some(_) => PollTimeout::NONE,
        None => PollTimeout::from(20u8),
    };
    loop {
        if let Some(s) = child.try_wait().map_err(waiting)? {
            return Ok(s);
        }
        if let Some(sig) = crate::util::signal::caught() {
            let _ = child.kill();
            let _ = child.wait();
            unblock(sockets);
            return Err(RunError::Interrupted(sig));
        }
        let mut fds = vec![PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        fds.extend(
            exited
                .iter()
                .map(|p| PollFd::new(p.as_fd(), PollFlags::POLLIN)),
        );
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(waiting(e.into())),
        }
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
        (Some(libc::EPERM | libc::EINVAL | libc::ENOSPC), true) => {
            RunError::SpawnConfined(argv[0].clone(), e)
        }
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
