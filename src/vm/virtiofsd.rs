//! virtiofsd, one per virtiofs share, started together and confined.

use super::error::RunError;
use super::supervise::die_with;
use crate::vm::qemu::Share;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Helper processes that must not outlive the run.
pub(crate) struct Daemons(pub(crate) Vec<Child>, pub(crate) Vec<nix::unistd::Pid>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in &self.1 {
            let _ = nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(*pid, None);
        }
    }
}

/// The virtiofsd arguments for one share (rootless: no sandbox needs root).
pub(crate) fn virtiofsd_args(share: &Share) -> Vec<String> {
    let Some(socket) = &share.virtiofsd else {
        return Vec::new();
    };
    let mut a = vec![
        format!("--socket-path={}", socket.display()),
        format!("--shared-dir={}", share.path.display()),
        // Only the stored rootfs is never changed behind the guest's back;
        // home and the kernel tree must show the host's edits and rebuilds.
        format!(
            "--cache={}",
            if share.tag == "root" {
                "always"
            } else {
                "auto"
            }
        ),
        "--sandbox=none".to_string(),
        // Run as root, virtiofsd keeps a set of capabilities: not those to
        // make device nodes or set file capabilities for the guest (the
        // set-id modes it could still set are crate::confine's filter's job).
        "--modcaps=-mknod:-setfcap".to_string(),
    ];
    if share.readonly {
        a.push("--readonly".into());
    }
    a
}

/// A started virtiofsd whose socket may not exist yet.
pub(crate) struct Starting<'a> {
    share: &'a Share,
    socket: &'a Path,
    log: PathBuf,
    /// Spawned with a Command (an index into Daemons.0), else a mapped pid.
    proc: Result<usize, nix::unistd::Pid>,
}

/// Starts a virtiofsd per virtiofs share, all at once, then waits for all
/// their sockets (QEMU connects at start-up: they must exist first). One
/// after another, each waited for, cost ~7 ms per share.
pub(crate) fn start_virtiofsd(
    bin: &Path,
    shares: &[Share],
    run_dir: &Path,
    root_ids: Option<&crate::sandbox::Ids>,
    store: &Path,
) -> Result<Daemons, RunError> {
    let mut daemons = Daemons(Vec::new(), Vec::new());
    let mut started = Vec::new();
    for share in shares {
        let Some(socket) = &share.virtiofsd else {
            continue;
        };
        let log = run_dir.join(format!("virtiofsd-{}.log", share.tag));
        let log_file = std::fs::File::create(&log).map_err(|e| RunError::Write(log.clone(), e))?;
        if let (Some(ids), "root") = (root_ids, share.tag.as_str()) {
            use std::os::fd::AsRawFd;
            let argv: Vec<std::ffi::OsString> = std::iter::once(bin.as_os_str().to_owned())
                .chain(virtiofsd_args(share).into_iter().map(Into::into))
                .collect();
            let pid = crate::sandbox::spawn_mapped(&argv, ids, &[], Some(log_file.as_raw_fd()))
                .map_err(|e| RunError::Virtiofsd(share.path.clone(), e.to_string()))?;
            daemons.1.push(pid);
            started.push(Starting {
                share,
                socket,
                log,
                proc: Err(pid),
            });
            continue;
        }
        let mut cmd = Command::new(bin);
        cmd.args(virtiofsd_args(share))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // The guest drives this virtiofsd's file operations: see crate::confine.
        let confine = crate::confine::Confinement::new(&[share.path.as_path()], Some(store));
        let die = die_with(std::process::id());
        // SAFETY: prctl, getppid, and confine's system calls on data
        // prepared before fork, are async-signal-safe; virtiofsd dies with mkt.
        unsafe {
            cmd.pre_exec(move || {
                die()?;
                confine.enter()
            });
        }
        let child = cmd.spawn().map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM | libc::EINVAL | libc::ENOSPC) => RunError::Virtiofsd(
                share.path.clone(),
                format!(
                    "cannot confine it (a private mount namespace, a user namespace when not root, keeps the rootfs store read-only): {e}"
                ),
            ),
            _ => RunError::Spawn(bin.into(), e),
        })?;
        daemons.0.push(child);
        started.push(Starting {
            share,
            socket,
            log,
            proc: Ok(daemons.0.len() - 1),
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for s in &started {
        while !s.socket.exists() {
            let exited = match s.proc {
                Ok(i) => daemons.0[i]
                    .try_wait()
                    .ok()
                    .flatten()
                    .map(|status| format!("{status}: ")),
                Err(pid) => {
                    match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                        Ok(
                            nix::sys::wait::WaitStatus::Exited(..)
                            | nix::sys::wait::WaitStatus::Signaled(..),
                        ) => {
                            // Reaped: Drop must not signal a pid that may be reused.
                            daemons.1.retain(|p| *p != pid);
                            Some(String::new())
                        }
                        _ => None,
                    }
                }
            };
            if let Some(status) = exited {
                let err = std::fs::read_to_string(&s.log).unwrap_or_default();
                return Err(RunError::Virtiofsd(
                    s.share.path.clone(),
                    format!("{status}{}", err.trim()),
                ));
            }
            if Instant::now() > deadline {
                return Err(RunError::Virtiofsd(
                    s.share.path.clone(),
                    "no socket after 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(daemons)
}
