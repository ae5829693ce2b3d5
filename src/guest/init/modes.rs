//! What PID 1 ends with: the command (exec mode) or a login shell.

use crate::console::{find_port, follow_winsize, open_port, quiet_console, set_winsize};
use crate::ops::Plan;
use crate::plan::{Exit, User};
use crate::power::SESSION;
use crate::sys::{fail, ioctl, log, poweroff, setsid};
use std::io::{self, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

const TIOCSCTTY: u64 = 0x540E;

pub fn user_env(cmd: &mut Command, user: &Option<User>) {
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env(
            "TERM",
            std::env::var("TERM").unwrap_or_else(|_| "linux".into()),
        )
        .env("LANG", "C.UTF-8");
    if let Some(u) = user {
        cmd.uid(u.uid).gid(u.gid);
        cmd.env("HOME", &u.home)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name);
    } else {
        cmd.env("HOME", "/root")
            .env("USER", "root")
            .env("LOGNAME", "root");
    }
}

/// Exec mode: run the command as the user with stdout/stderr on their own
/// virtio-serial ports, then report the exit status on the status port.
pub fn run_exec(p: &Plan) -> ! {
    let (Some(out), Some(err), Some(mut status)) = (
        open_port("mkt.stdout"),
        open_port("mkt.stderr"),
        open_port("mkt.status"),
    ) else {
        fail("virtio-serial ports mkt.stdout/mkt.stderr/mkt.status not found");
    };
    let code = if p.exec.is_empty() {
        0
    } else {
        let mut cmd = Command::new(&p.exec[0]);
        cmd.args(&p.exec[1..]);
        user_env(&mut cmd, &p.user);
        let cwd = p
            .cwd
            .clone()
            .filter(|d| Path::new(d).is_dir())
            .or_else(|| p.user.as_ref().map(|u| u.home.clone()))
            .unwrap_or_else(|| "/".into());
        cmd.current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err.try_clone().expect("dup")));
        // SAFETY: setsid is async-signal-safe; the child gets its own session.
        unsafe {
            cmd.pre_exec(|| {
                setsid();
                Ok(())
            });
        }
        let status = cmd.status();
        if let Err(e) = &status {
            let _ = writeln!(&err, "mkt: cannot run {}: {e}", p.exec[0]);
        }
        exit_code(&status)
    };
    let _ = write!(status, "{}", Exit(code).encode());
    drop(status);
    poweroff()
}

/// The command's exit status as a shell gives it: 128 + N when signal N
/// killed it, 127 when it was not found, 126 when it could not run.
pub fn exit_code(status: &io::Result<ExitStatus>) -> i32 {
    match status {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 127,
        Err(_) => 126,
    }
}

/// Shell mode: a login shell of the user on the console, power off after.
pub fn run_shell(p: &Plan) -> ! {
    let shell = "/bin/bash";
    let shell = if Path::new(shell).exists() {
        shell
    } else {
        "/bin/sh"
    };
    let mut cmd = Command::new(shell);
    cmd.arg("-l");
    user_env(&mut cmd, &p.user);
    if let Some(t) = &p.term {
        if !t.term.is_empty() {
            cmd.env("TERM", &t.term);
        }
        if t.rows > 0 && t.cols > 0 {
            set_winsize(t.rows, t.cols);
        }
    }
    // The host sends the terminal's new size after each resize; setting it
    // on the console sends the shell's foreground job SIGWINCH.
    if let Some(port) = find_port(crate::plan::WINSIZE_PORT) {
        std::thread::spawn(move || follow_winsize(&port));
    }
    quiet_console();
    if let Some(u) = &p.user {
        cmd.current_dir(&u.home);
    }
    // SAFETY: setsid and ioctl are async-signal-safe; the console becomes
    // the shell's controlling terminal so job control and Ctrl-C work.
    unsafe {
        cmd.pre_exec(|| {
            setsid();
            ioctl(0, TIOCSCTTY, 1);
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(mut child) => {
            SESSION.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
            let _ = child.wait();
        }
        Err(e) => log(&format!("cannot start {shell}: {e}")),
    }
    poweroff()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> i32 {
        exit_code(&Command::new("sh").args(["-c", script]).status())
    }

    #[test]
    fn exit_status_is_the_commands_code() {
        assert_eq!(sh("exit 0"), 0);
        assert_eq!(sh("exit 3"), 3);
        assert_eq!(sh("exit 255"), 255);
    }

    #[test]
    fn a_command_killed_by_signal_n_gives_128_plus_n() {
        assert_eq!(sh("kill -KILL $$"), 137);
        assert_eq!(sh("kill -TERM $$"), 143);
        assert_eq!(sh("kill -SEGV $$"), 139);
    }

    #[test]
    fn a_missing_command_gives_127_and_one_that_cannot_run_126() {
        let missing = Command::new("/nonexistent/mkt-no-such-command").status();
        assert_eq!(exit_code(&missing), 127);
        let dir = std::env::temp_dir().join(format!("mkt-init-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Not executable (even root needs an x bit), and a directory.
        let file = dir.join("not-executable");
        std::fs::write(&file, "#!/bin/sh\n").unwrap();
        assert_eq!(exit_code(&Command::new(&file).status()), 126);
        assert_eq!(exit_code(&Command::new(&dir).status()), 126);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
