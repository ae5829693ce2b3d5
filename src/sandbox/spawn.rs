//! Running a command as root of a user namespace with the caller's
//! subordinate ids (for unpacking and serving trees with real owners).

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use super::NsError;
use super::idmap::{Ids, write_maps};
use super::sys::{IgnoreSignals, cstr, die_with, reset_signals};
use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

/// Runs `argv` (a host program, looked up in PATH) in a new user namespace
/// with `ids` mapped, as uid 0 there, and returns its exit status. No other
/// namespace and no pivot: for host tools that must chown into a tree
/// (`tar -x`, `rm -r`, virtiofsd). With [`Ids::Host`] it runs directly.
pub fn run_mapped(argv: &[OsString], ids: &Ids, out: Option<i32>) -> Result<i32, NsError> {
    let child = spawn_mapped(argv, ids, &[], out)?;
    let _ignore = IgnoreSignals::new();
    // A stop signal mkt caught (`rootfs pull` and `build` catch SIGINT,
    // SIGTERM, SIGHUP) is passed on: a child that only the terminal's
    // signals reach would otherwise run to its end after `kill PID`.
    let mut forwarded = false;
    let mut nap = Duration::from_millis(1);
    loop {
        let flags = (!forwarded).then_some(WaitPidFlag::WNOHANG);
        match waitpid(child, flags) {
            Ok(WaitStatus::Exited(_, c)) => return Ok(c),
            Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
            Ok(WaitStatus::StillAlive) => match crate::util::signal::caught() {
                Some(sig) => {
                    if let Ok(sig) = Signal::try_from(sig) {
                        signal_tree(child, sig);
                    }
                    forwarded = true;
                }
                None => {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(50));
                }
            },
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(NsError::Wait(e)),
        }
    }
}

/// Sends `sig` to `root` and every process under it, as a terminal's
/// Ctrl-C reaches them all (mmdebstrap given SIGTERM alone waits for its
/// apt and dpkg to finish first).
pub(crate) fn signal_tree(root: Pid, sig: Signal) {
    let mut children: std::collections::HashMap<i32, Vec<i32>> = Default::default();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut todo = vec![root.as_raw()];
    while let Some(pid) = todo.pop() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
        todo.extend(children.get(&pid).into_iter().flatten());
    }
}

/// Starts `argv` as [`run_mapped`] does and returns its pid at once; it
/// dies with mkt (PDEATHSIG). `keep_fds` stay open in it; `out`, when
/// given, becomes its stdout and stderr (stdin /dev/null).
pub fn spawn_mapped(
    argv: &[OsString],
    ids: &Ids,
    keep_fds: &[i32],
    out: Option<i32>,
) -> Result<Pid, NsError> {
    let argv_c: Vec<CString> = argv.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let prog = argv.first().cloned().unwrap_or_default();
    let candidates: Vec<CString> = if prog.as_bytes().contains(&b'/') {
        vec![cstr(&prog)?]
    } else {
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|d| cstr(d.join(&prog).as_os_str()))
            .collect::<Result<_, _>>()?
    };
    let userns = matches!(ids, Ids::Mapped { .. });
    let (ready_rd, ready_wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(NsError::Pipe)?;
    let (go_rd, go_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(NsError::Pipe)?;
    let mut argv_p: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let parent = nix::unistd::getpid();
    // SAFETY: the child only makes system calls on data prepared above, then
    // execs or _exits.
    match unsafe { nix::unistd::fork() }.map_err(NsError::Fork)? {
        ForkResult::Child => {
            // Only mkt keeps the other ends: if the map helpers fail, its
            // closing `go` must reach this child as end-of-file.
            drop(ready_rd);
            drop(go_wr);
            die_with(parent);
            reset_signals();
            for fd in keep_fds {
                // SAFETY: clearing close-on-exec on an fd the caller passed.
                unsafe { libc::fcntl(*fd, libc::F_SETFD, 0) };
            }
            if let Some(out) = out {
                // SAFETY: plain fd juggling on descriptors this process owns.
                unsafe {
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                    libc::dup2(null, 0);
                    libc::dup2(out, 1);
                    libc::dup2(out, 2);
                }
            }
            if userns {
                if nix::sched::unshare(CloneFlags::CLONE_NEWUSER).is_err() {
                    // SAFETY: see above.
                    unsafe { libc::_exit(126) }
                }
                let _ = nix::unistd::write(&ready_wr, b"u");
                let mut b = [0u8; 1];
                if nix::unistd::read(&go_rd, &mut b) != Ok(1) {
                    // SAFETY: see above.
                    unsafe { libc::_exit(126) }
                }
            }
            for prog in &candidates {
                // SAFETY: NULL-terminated argv of live CStrings; the
                // environment is the caller's.
                unsafe { libc::execv(prog.as_ptr(), argv_p.as_ptr()) };
            }
            // SAFETY: see above.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(ready_wr);
            drop(go_rd);
            if let Ids::Mapped { uids, gids } = ids {
                let mut b = [0u8; 1];
                if nix::unistd::read(&ready_rd, &mut b) != Ok(1) {
                    let _ = waitpid(child, None);
                    return Err(NsError::Setup {
                        step: "unshare(user) for the mapped namespace".into(),
                        source: Errno::EPERM,
                    });
                }
                if let Err(e) = write_maps(child, uids, gids) {
                    drop(go_wr);
                    let _ = waitpid(child, None);
                    return Err(e);
                }
                let _ = nix::unistd::write(&go_wr, b"g");
            }
            Ok(child)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::IdRange;
    use std::time::Duration;

    /// newuidmap refuses a range the caller has no subuid entry for: the
    /// error carries its message (it used to hang: the child kept its own
    /// copy of the "go" pipe's write end and never saw end-of-file).
    #[test]
    fn a_refused_id_map_is_the_helpers_error_not_a_hang() {
        if crate::host::probe::find_program("newuidmap").is_none() {
            eprintln!("SKIP: newuidmap not installed");
            return;
        }
        let bogus = vec![IdRange {
            inside: 0,
            outside: 4_000_000_000,
            count: 1,
        }];
        let ids = Ids::Mapped {
            uids: bogus.clone(),
            gids: bogus,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(run_mapped(&["true".into()], &ids, None));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("run_mapped hung after newuidmap failed");
        match r {
            Err(NsError::MapHelper { helper, detail }) => {
                assert_eq!(helper, "newuidmap");
                assert!(detail.contains("newuidmap"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }
}
