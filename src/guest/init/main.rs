//! mkt's guest init: PID 1 of every `mkt run` guest, packed as /init into
//! the initramfs mkt generates. Built by build.rs as a static binary with
//! rustc alone (std, no crates), because it must run before any root file
//! system (and its libc) is mounted.
//!
//! It does the fixed steps itself: mount /proc, /sys, /dev; load the modules
//! packed in /modules (distro kernels); read the run's plan and files from
//! /mkt (also packed into the initramfs); mount the rootfs share read-only under a tmpfs overlay (the
//! stored tree is never written); carry out the plan (shares, links, files);
//! switch root; then run the command (exec mode), systemd, or a shell.
//! Everything run-specific comes from the plan, which the host generates
//! and tests as a file; its format is src/guest/plan.rs, shared with the
//! host.
//!
//! The pure parts are unit-tested on the host: Cargo.toml's `init` test
//! target compiles this crate with the test harness (whose own main
//! replaces `main`; the libc calls link against the host's glibc).

// As in src/lib.rs (its length in clippy.toml).
#![warn(clippy::too_many_lines)]

mod console;
mod modes;
mod modules;
mod mounts;
mod net;
mod ops;
// The host's half of the protocol (encoding) is unused here.
#[allow(dead_code)]
#[path = "../plan.rs"]
mod plan;
mod power;
mod sys;

use crate::console::{report_sshd, start_sshd};
use crate::modes::{run_exec, run_shell, user_env};
use crate::modules::{load_modules, modules_reload};
use crate::mounts::{do_mount, mount_dev_extras, mount_share, switch_root};
use crate::net::{dhcp, ifup};
use crate::ops::{Plan, apply};
use crate::plan::Mode;
use crate::power::watch_power_button;
use crate::sys::{fail, log, sethostname};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

fn main() {
    if std::process::id() != 1 {
        let args: Vec<String> = std::env::args().collect();
        match args.get(1).map(String::as_str) {
            Some("modules-reload") => std::process::exit(modules_reload(&args[2..])),
            // systemd mode's mkt-ssh-ready.service, once ssh.service started.
            Some("ssh-ready") if args.len() == 2 => {
                report_sshd(std::time::Duration::from_secs(30));
                std::process::exit(0)
            }
            _ => {}
        }
        eprintln!(
            "usage: mkt modules-reload [--all] | mkt ssh-ready  (mkt's guest side; PID 1 of mkt guests)"
        );
        std::process::exit(2);
    }
    for (src, dst, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        if let Err(e) = do_mount(src, dst, fstype, 0, "") {
            log(&e.to_string());
        }
    }
    load_modules();
    let mut text = String::new();
    if let Err(e) = File::open("/mkt/plan").and_then(|mut f| f.read_to_string(&mut text)) {
        fail(&format!("reading /mkt/plan: {e}"));
    }
    let plan = match plan::decode(&text) {
        Ok(ops) => Plan::from_ops(ops),
        Err(e) => fail(&format!("/mkt/plan: {e}")),
    };

    // The stored tree, read-only, under a tmpfs overlay: the run's writes
    // live in guest memory and vanish with it.
    let root = "/newroot";
    let steps = || -> io::Result<()> {
        mount_share(plan.root_kind, &plan.root_tag, "/lower", true, false)?;
        do_mount("tmpfs", "/rw", "tmpfs", 0, "mode=0755")?;
        fs::create_dir_all("/rw/upper")?;
        fs::create_dir_all("/rw/work")?;
        do_mount(
            "overlay",
            root,
            "overlay",
            0,
            "lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work",
        )
    };
    if let Err(e) = steps() {
        fail(&e.to_string());
    }
    for op in &plan.steps {
        if let Err(e) = apply(op, root) {
            fail(&format!("plan step {}: {e}", op.fields().join(" ")));
        }
    }
    if let Some(h) = &plan.hostname {
        // SAFETY: the pointer and length describe h's bytes.
        unsafe { sethostname(h.as_ptr(), h.len()) };
    }
    if let Err(e) = switch_root(root) {
        fail(&format!("switch root: {e}"));
    }
    mount_dev_extras();
    if let Err(e) = ifup("lo", None) {
        log(&e.to_string());
    }
    if let Some((dev, ip, mask, gw)) = &plan.net
        && let Err(e) = ifup(dev, Some((ip, mask, gw)))
    {
        log(&e.to_string());
    }
    if let Some((dev, host, timeout)) = &plan.dhcp {
        match dhcp(dev, host, *timeout) {
            Ok(done) => log(&done),
            Err(e) => log(&format!("DHCP on {dev} FAILED: {e}")),
        }
    }
    if let Some(setup) = &plan.setup {
        match Command::new("/bin/sh").arg(setup).status() {
            Ok(s) if s.success() => {}
            Ok(s) => log(&format!("{setup} failed: {s}")),
            Err(e) => log(&format!("cannot run {setup}: {e}")),
        }
    }
    if let Some(sshd) = plan.sshd.clone() {
        // Beside the boot: the shell's prompt does not wait for sshd, and
        // the host hears when sshd listens.
        std::thread::spawn(move || {
            start_sshd(&sshd);
            report_sshd(std::time::Duration::from_secs(5));
        });
    }
    // systemd handles the power button itself (logind).
    if plan.mode != Mode::Systemd {
        std::thread::spawn(watch_power_button);
    }
    // The boot script runs as the user before the command or shell (systemd
    // mode runs it from a unit instead); its output goes to the console.
    if let (Some(script), false) = (&plan.boot, plan.mode == Mode::Systemd) {
        let mut cmd = Command::new(script);
        user_env(&mut cmd, &plan.user);
        if let Some(u) = &plan.user {
            cmd.current_dir(&u.home);
        }
        match cmd.stdin(Stdio::null()).status() {
            Ok(s) if s.success() => log("boot script: ok"),
            Ok(s) => log(&format!("boot script {script} FAILED: {s}")),
            Err(e) => log(&format!("boot script {script} FAILED: cannot run: {e}")),
        }
    }
    match plan.mode {
        Mode::Exec => run_exec(&plan),
        Mode::Shell => run_shell(&plan),
        Mode::Systemd => {
            let e = Command::new("/sbin/init").exec();
            fail(&format!("cannot exec /sbin/init: {e}"))
        }
    }
}
