//! What PID 1 ends with: the command (exec mode) or a login shell.

use crate::console::{find_port, follow_winsize, open_port, quiet_console, set_winsize};
use crate::ops::Plan;
use crate::power::SESSION;
use crate::sys::{fail, ioctl, log, poweroff, setsid};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

const TIOCSCTTY: u64 = 0x540E;

pub fn user_env(cmd: &mut Command, user: &Option<(String, u32, u32, String)>) {
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
    if let Some((name, uid, gid, home)) = user {
        cmd.uid(*uid).gid(*gid);
        cmd.env("HOME", home).env("USER", name).env("LOGNAME", name);
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
            .or_else(|| p.user.as_ref().map(|u| u.3.clone()))
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
        match cmd.status() {
            Ok(s) => s.code().unwrap_or_else(|| {
                use std::os::unix::process::ExitStatusExt;
                128 + s.signal().unwrap_or(0)
            }),
            Err(e) => {
                let _ = writeln!(&err, "mkt: cannot run {}: {e}", p.exec[0]);
                if e.kind() == io::ErrorKind::NotFound {
                    127
                } else {
                    126
                }
            }
        }
    };
    let _ = writeln!(status, "EXIT {code}");
    drop(status);
    poweroff()
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
    if let Some((term, rows, cols)) = &p.term {
        if !term.is_empty() {
            cmd.env("TERM", term);
        }
        if *rows > 0 && *cols > 0 {
            set_winsize(*rows, *cols);
        }
    }
    // The host sends the terminal's new size after each resize; setting it
    // on the console sends the shell's foreground job SIGWINCH.
    if let Some(port) = find_port("mkt.winsize") {
        std::thread::spawn(move || follow_winsize(&port));
    }
    quiet_console();
    if let Some(u) = &p.user {
        cmd.current_dir(&u.3);
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
