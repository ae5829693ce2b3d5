//! The first real boot: QEMU (TCG) boots the fixture kernel tree's bzImage
//! with the fixture rootfs as a read-only 9p root and a one-line init, as
//! the current user and (when the suite runs as root) as the unprivileged
//! test user. Proves the machine can boot guests; `mkt run` tests build on it.

mod common;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARKER: &str = "MKT-BOOT-OK";
const CPUS: u32 = 2;

struct Boot {
    status: std::process::ExitStatus,
    console: String,
}

fn boot(bzimage: &Path, rootfs: &Path, user: Option<&common::TestUser>) -> Boot {
    let qemu = mkt::host::probe::find_program("qemu-system-x86_64").unwrap();
    // The init runs the shared guest check, prints the marker and the
    // release, then powers off through ACPI (sysrq o): a clean power-off
    // ends QEMU with status 0. It then waits with a builtin reading the
    // console: an external `sleep` raced the power-off, which shuts the 9p
    // root down (exec failed with EIO, init exited, the kernel panicked).
    let init = format!(
        "mount -t proc proc /proc; {}; echo {MARKER} $(uname -r); echo o > /proc/sysrq-trigger; \
         while :; do read x; done",
        common::GUEST_CHECK
    );
    assert!(!init.contains('"'), "the init must fit in one quoted word");
    let append = format!(
        "console=ttyS0 root=/dev/root rootfstype=9p rootflags=trans=virtio,version=9p2000.L,cache=loose ro \
         panic=-1 i8042.noaux quiet init=/bin/sh -- -c \"{init}\""
    );
    let mut cmd = Command::new(qemu);
    // The default profile's machine, with more than one CPU: the guest
    // check proves both come up.
    cmd.args([
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-m",
        "512",
        "-smp",
        &CPUS.to_string(),
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args(["-serial", "stdio"])
    .arg("-kernel")
    .arg(bzimage)
    .args(["-append", &append])
    .arg("-fsdev")
    .arg(format!(
        "local,id=root,path={},security_model=none,readonly=on",
        rootfs.display()
    ))
    .args(["-device", "virtio-9p-pci,fsdev=root,mount_tag=/dev/root"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(u) = user {
        cmd.uid(u.uid).gid(u.gid);
    }
    let mut child = cmd.spawn().expect("spawn qemu");
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        out.read_to_end(&mut s).ok();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            let s = child.wait().unwrap();
            let console = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
            panic!("guest did not power off within 180 s ({s}); console:\n{console}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    let console = String::from_utf8_lossy(&reader.join().unwrap()).into_owned() + &err;
    Boot { status, console }
}

fn assert_clean_boot(b: &Boot, release: &str) {
    let line = b
        .console
        .lines()
        .find(|l| l.starts_with(MARKER))
        .unwrap_or_else(|| panic!("no {MARKER} on the console:\n{}", b.console));
    assert!(
        line.contains(release),
        "marker line {line:?} lacks release {release}"
    );
    assert!(
        b.console.contains("reboot: Power down"),
        "no clean power-off:\n{}",
        b.console
    );
    assert!(
        b.status.success(),
        "qemu exited {}:\n{}",
        b.status,
        b.console
    );
    common::assert_guest_clean(&b.console, CPUS);
}

fn release_of(tree: &Path) -> String {
    std::fs::read_to_string(tree.join("include/config/kernel.release"))
        .expect("kernel.release in the fixture tree")
        .trim()
        .to_string()
}

#[test]
fn fixture_kernel_boots_fixture_rootfs_over_9p() {
    let (Some(tree), Some(rootfs), Some(_)) = (
        common::kernel_tree(),
        common::rootfs(),
        common::program("qemu-system-x86_64"),
    ) else {
        return;
    };
    let b = boot(&tree.join("arch/x86/boot/bzImage"), &rootfs, None);
    assert_clean_boot(&b, &release_of(&tree));
}

#[test]
fn fixture_kernel_boots_as_unprivileged_user() {
    let (Some(tree), Some(rootfs), Some(user)) = (
        common::kernel_tree(),
        common::rootfs(),
        common::unprivileged_user(),
    ) else {
        return;
    };
    if user.is_none() {
        // Already unprivileged: the test above covers it.
        eprintln!("SKIP: not root; the other boot test already runs unprivileged");
        return;
    }
    let b = boot(&tree.join("arch/x86/boot/bzImage"), &rootfs, user.as_ref());
    assert_clean_boot(&b, &release_of(&tree));
}
