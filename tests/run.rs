//! `mkt run` end to end: real QEMU (TCG) booting the fixture kernel tree and
//! Debian's cloud kernel on the fixture rootfs. The rootless cases run as the
//! unprivileged test user when the suite runs as root (CI).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

struct Fx {
    tree: PathBuf,
    rootfs: PathBuf,
    release: String,
}

impl Fx {
    /// `--rootfs ROOTFS --kernel TREE` then `rest`.
    fn args<'a>(&'a self, rest: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec![
            "--rootfs",
            self.rootfs.to_str().unwrap(),
            "--kernel",
            self.tree.to_str().unwrap(),
        ];
        a.extend_from_slice(rest);
        a
    }
}

fn fixtures() -> Option<Fx> {
    let tree = common::kernel_tree()?;
    let rootfs = common::rootfs()?;
    common::program("qemu-system-x86_64")?;
    let release = std::fs::read_to_string(tree.join("include/config/kernel.release"))
        .unwrap()
        .trim()
        .to_string();
    Some(Fx {
        tree,
        rootfs,
        release,
    })
}

fn run_as(user: Option<&common::TestUser>, home: &Path, args: &[&str]) -> Output {
    let mut c = common::mkt_as(user, home);
    c.arg("run").args(args).current_dir(home);
    c.output().expect("spawn mkt")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `fs`: None for mkt's default (virtiofs when virtiofsd exists), else --fs.
fn exec_case(user: Option<&common::TestUser>, fs: Option<&str>) {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(user);
    let mut args = vec!["--cpus", "2"];
    if let Some(fs) = fs {
        args.extend(["--fs", fs]);
    }
    let cmd = common::guest_checked(&["sh", "-c", "uname -r; echo err >&2; exit 7"]);
    args.push("--");
    args.extend(cmd.iter().map(String::as_str));
    let o = run_as(user, home.path(), &fx.args(&args));
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(7), "stdout:\n{out}\nstderr:\n{err}");
    common::assert_guest_clean(&err, 2);
    assert_eq!(out, format!("{}\n", fx.release));
    assert!(err.lines().any(|l| l == "err"), "{err}");
    // One line says which accelerator and why, as doctor says it (TCG on
    // this machine class), and none when KVM is used.
    let accel: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("KVM") || l.contains("TCG"))
        .collect();
    match common::expected_accel_note(user) {
        Some(note) => assert_eq!(accel, [note.as_str()], "{err}"),
        None => assert!(accel.is_empty(), "{err}"),
    }
    // Nothing left behind in the runtime dir.
    let runs = home.path().join("run/mkt/runs");
    let left: Vec<_> = std::fs::read_dir(&runs)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn exec_mode_streams_stdout_stderr_and_exit_code() {
    exec_case(None, Some("9p"));
}

#[test]
fn exec_mode_works_rootless() {
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    if user.is_none() {
        eprintln!("SKIP: not root; the other exec test already runs unprivileged");
        return;
    }
    exec_case(user.as_ref(), None);
}

#[test]
fn home_is_shared_rw_and_the_stored_tree_never_changes() {
    let Some(fx) = fixtures() else { return };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let user = user.as_ref();
    let home = common::temp_home(user);
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(home.path().join("data.bin"), &data).unwrap();
    if let Some(u) = user {
        nix::unistd::chown(
            &home.path().join("data.bin"),
            Some(u.uid.into()),
            Some(u.gid.into()),
        )
        .unwrap();
    }
    let before = common::tree_digest(&fx.rootfs);
    let script = "cat data.bin; echo guest > from-guest.txt; \
        sudo sh -c 'echo x > /etc/mkt-test; echo y > /usr/bin/mkt-test; rm -f /etc/hostname; touch /etc/passwd' >&2; \
        test -f /etc/mkt-test && echo etc-written >&2";
    let o = run_as(user, home.path(), &fx.args(&["--", "sh", "-c", script]));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        o.stdout == data,
        "1 MiB of output differs ({} bytes back)",
        o.stdout.len()
    );
    assert!(
        err.contains("etc-written"),
        "guest root could not write /etc: {err}"
    );
    let f = home.path().join("from-guest.txt");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "guest\n");
    let want_uid = user
        .map(|u| u.uid)
        .unwrap_or_else(|| nix::unistd::getuid().as_raw());
    assert_eq!(std::fs::metadata(&f).unwrap().uid(), want_uid);
    assert!(
        before == common::tree_digest(&fx.rootfs),
        "the stored rootfs changed"
    );
}

#[test]
fn modules_of_the_tree_load_with_modprobe() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let o = run_as(
        None,
        home.path(),
        &fx.args(&[
            "--",
            "sh",
            "-c",
            "sudo modprobe dummy && grep -c '^dummy ' /proc/modules && ls -l /lib/modules/$(uname -r)/kernel/drivers/net/dummy.ko && test -e /boot/System.map-$(uname -r)",
        ]),
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.starts_with("1\n"), "{out}");
    assert!(
        out.contains(&format!("-> {}/drivers/net/dummy.ko", fx.tree.display())),
        "{out}"
    );
}

#[test]
fn distro_cloud_kernel_boots_over_virtiofs() {
    let Some(fx) = fixtures() else { return };
    let Some(ck) = common::cloud_kernel() else {
        return;
    };
    if mkt::host::probe::find_program("virtiofsd").is_none() {
        return common::unavailable("virtiofsd (cargo install virtiofsd)").unwrap_or(());
    }
    let (_, _, release) = common::cloud_image(&ck);
    let out = clean_boot(&fx, Kernel::Cloud(&ck), &[], &["uname", "-r"]);
    assert_eq!(out, format!("{release}\n"));
}

/// Which fixture kernel a clean-boot case boots.
#[derive(Clone, Copy, Debug)]
enum Kernel<'a> {
    /// The fixture tree (mkt's VM config: virtio built in, no virtio-mmio).
    Tree,
    /// Debian's cloud kernel (virtio as modules, loaded from the initramfs).
    Cloud(&'a Path),
}

/// Boots `kernel` with `flags` and 2 CPUs, runs `cmd` behind the shared
/// guest check (every CPU, untainted, no warning in dmesg) and returns its
/// stdout; fails on any other outcome.
fn clean_boot(fx: &Fx, kernel: Kernel, flags: &[&str], cmd: &[&str]) -> String {
    clean_boot_as(None, fx, kernel, flags, cmd)
}

/// [`clean_boot`] as `user` (None: the current user).
fn clean_boot_as(
    user: Option<&common::TestUser>,
    fx: &Fx,
    kernel: Kernel,
    flags: &[&str],
    cmd: &[&str],
) -> String {
    let home = common::temp_home(user);
    let mut args: Vec<String> = vec!["--rootfs".into(), fx.rootfs.display().to_string()];
    match kernel {
        Kernel::Tree => args.extend(["--kernel".into(), fx.tree.display().to_string()]),
        Kernel::Cloud(ck) => {
            let (image, modules, _) = common::cloud_image(ck);
            args.extend([
                "--kernel".into(),
                image.display().to_string(),
                "--modules".into(),
                modules.display().to_string(),
            ]);
        }
    }
    args.extend(["--cpus", "2"].iter().chain(flags).map(|s| s.to_string()));
    args.push("--".into());
    args.extend(common::guest_checked(cmd));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_as(user, home.path(), &args);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{kernel:?} {flags:?}: stdout:\n{out}\nstderr:\n{err}"
    );
    common::assert_guest_clean(&err, 2);
    out
}

/// Both fixture kernels, on every transport each has (the cloud kernel has
/// no 9p), with `flags`: each boot passes the shared guest check.
fn clean_on_both_kernels(flags: &[&str]) {
    let Some(fx) = fixtures() else { return };
    let Some(ck) = common::cloud_kernel() else {
        return;
    };
    if mkt::host::probe::find_program("virtiofsd").is_none() {
        return common::unavailable("virtiofsd (cargo install virtiofsd)").unwrap_or(());
    }
    for (kernel, fs) in [
        (Kernel::Tree, "9p"),
        (Kernel::Tree, "virtiofs"),
        (Kernel::Cloud(&ck), "virtiofs"),
    ] {
        let flags: Vec<&str> = ["--fs", fs].iter().chain(flags).copied().collect();
        clean_boot(&fx, kernel, &flags, &["true"]);
    }
}

/// MKT's usual `panic_on_warn=1`: a boot that warns would panic.
#[test]
fn panic_on_warn_boots_both_kernels_clean() {
    clean_on_both_kernels(&["--append", "panic_on_warn=1"]);
}

/// The opt-in `debug` profile (MKT's debug command line).
#[test]
fn debug_profile_boots_both_kernels_clean() {
    clean_on_both_kernels(&["--profile", "debug"]);
    let Some(fx) = fixtures() else { return };
    let out = clean_boot(
        &fx,
        Kernel::Tree,
        &["--fs", "9p", "--profile", "debug"],
        &["cat", "/proc/cmdline"],
    );
    for w in ["panic_on_warn=1", "ignore_loglevel", "earlyprintk="] {
        assert!(out.contains(w), "{w} missing from {out}");
    }
}

#[test]
fn iommu_profile_boots_both_kernels_clean() {
    clean_on_both_kernels(&["--profile", "iommu"]);
}

/// microvm under TCG: the cloud kernel (virtio_mmio as a module) boots
/// clean over virtiofs; the fixture tree (no CONFIG_VIRTIO_MMIO) is
/// refused before anything starts, naming the option.
#[test]
fn microvm_boots_both_kernels_clean_and_refuses_a_kernel_without_virtio_mmio() {
    let Some(fx) = fixtures() else { return };
    let Some(ck) = common::cloud_kernel() else {
        return;
    };
    if mkt::host::probe::find_program("virtiofsd").is_none() {
        return common::unavailable("virtiofsd (cargo install virtiofsd)").unwrap_or(());
    }
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let (_, _, release) = common::cloud_image(&ck);
    // Twice (the boot used to hang whenever the PIT calibration failed):
    // as the current user and, when that is root, as the unprivileged one.
    for user in [None, user.as_ref()] {
        let out = clean_boot_as(
            user,
            &fx,
            Kernel::Cloud(&ck),
            &["--profile", "microvm"],
            &[
                "sh",
                "-c",
                "uname -r; test -d /sys/bus/platform/drivers/virtio-mmio",
            ],
        );
        assert!(out.starts_with(&format!("{release}\n")), "{out}");
    }
    // mkt's own VM config has it: the fixture tree boots on microvm too.
    let config = std::fs::read_to_string(fx.tree.join(".config")).unwrap();
    assert!(
        config.lines().any(|l| l == "CONFIG_VIRTIO_MMIO=y"),
        "configs/vm.config lost CONFIG_VIRTIO_MMIO"
    );
    let out = clean_boot_as(
        None,
        &fx,
        Kernel::Tree,
        &["--profile", "microvm"],
        &[
            "sh",
            "-c",
            "uname -r; test -d /sys/bus/platform/drivers/virtio-mmio",
        ],
    );
    assert_eq!(out, format!("{}\n", fx.release));
    // A kernel without it is refused before booting, naming the option.
    let lacking = tempfile::tempdir().unwrap();
    let boot = lacking.path().join("arch/x86/boot");
    std::fs::create_dir_all(&boot).unwrap();
    std::fs::copy(fx.tree.join("arch/x86/boot/bzImage"), boot.join("bzImage")).unwrap();
    let release = lacking.path().join("include/config");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::copy(
        fx.tree.join("include/config/kernel.release"),
        release.join("kernel.release"),
    )
    .unwrap();
    std::fs::write(
        lacking.path().join(".config"),
        config.replace(
            "CONFIG_VIRTIO_MMIO=y\n",
            "# CONFIG_VIRTIO_MMIO is not set\n",
        ),
    )
    .unwrap();
    let home = common::temp_home(None);
    let rootfs = fx.rootfs.display().to_string();
    let kernel = lacking.path().display().to_string();
    let o = run_as(
        None,
        home.path(),
        &[
            "--rootfs",
            &rootfs,
            "--kernel",
            &kernel,
            "--profile",
            "microvm",
            "--",
            "true",
        ],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--profile microvm") && err.contains("CONFIG_VIRTIO_MMIO"),
        "{err}"
    );
}

/// --gdbserver boots the kernel with nokaslr (so vmlinux's symbols line
/// up) and says so; an explicit `kaslr` is kept, with a warning.
#[test]
fn gdbserver_adds_nokaslr_and_says_so() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let o = run_as(
        None,
        home.path(),
        &fx.args(&["--dry-run", "--gdbserver", "1234", "--", "true"]),
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{err}");
    let cmdline = out
        .split("-append '")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .unwrap_or_else(|| panic!("no -append in {out}"));
    assert!(cmdline.split(' ').any(|w| w == "nokaslr"), "{cmdline}");
    assert!(out.contains("-gdb tcp:127.0.0.1:1234"), "{out}");
    assert!(
        err.contains("gdb stub on 127.0.0.1:1234") && err.contains("nokaslr"),
        "{err}"
    );
    let o = run_as(
        None,
        home.path(),
        &fx.args(&[
            "--dry-run",
            "--gdbserver",
            "1234",
            "--append",
            "kaslr",
            "--",
            "true",
        ]),
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(!out.contains("nokaslr"), "{out}");
    assert!(err.contains("will not line up"), "{err}");
}

#[test]
fn a_kernel_panic_is_an_error_quoting_the_panic() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let o = run_as(
        None,
        home.path(),
        &fx.args(&["--append", "rdinit=/nonexistent", "--", "true"]),
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("without reporting the command's exit status"),
        "{err}"
    );
    assert!(err.contains("Kernel panic"), "{err}");
}

#[test]
fn two_runs_at_once_both_succeed() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let spawn = |n: &str| {
        let mut c = common::mkt(home.path());
        c.arg("run").args(fx.args(&["--", "echo", n]));
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    let (a, b) = (spawn("one"), spawn("two"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(text(&a.stdout), "one\n", "{}", text(&a.stderr));
    assert_eq!(text(&b.stdout), "two\n", "{}", text(&b.stderr));
}

#[test]
fn two_interactive_runs_at_once_get_different_ssh_ports() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let spawn = || {
        let mut c = common::mkt(home.path());
        c.arg("run").args(fx.args(&["--init", "shell"]));
        c.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    let port_of = |vm: &mut std::process::Child| -> u16 {
        use std::io::BufRead;
        let mut err = std::io::BufReader::new(vm.stderr.take().unwrap());
        let mut line = String::new();
        while err.read_line(&mut line).unwrap() > 0 {
            if let Some(rest) = line.split("ssh on 127.0.0.1:").nth(1) {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
        panic!("no ssh line: {line}");
    };
    let (mut a, mut b) = (spawn(), spawn());
    let (pa, pb) = (port_of(&mut a), port_of(&mut b));
    assert_ne!(pa, pb);
    let ps = common::mkt(home.path())
        .args(["ps", "--json"])
        .output()
        .unwrap();
    let ps: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    let mut ports: Vec<u64> = ps
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ssh_port"].as_u64().unwrap())
        .collect();
    ports.sort();
    let mut want = vec![u64::from(pa), u64::from(pb)];
    want.sort();
    assert_eq!(ports, want, "{ps}");
    // Two unnamed VMs have two names, and `run` names neither: ssh and
    // stop refuse it, listing both, instead of picking one.
    let names: Vec<&str> = ps
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["run-1", "run-2"], "{ps}");
    for args in [
        &["ssh", "run", "--", "true"][..],
        &["stop", "run", "--force"],
    ] {
        let o = common::mkt(home.path()).args(args).output().unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("ambiguous") && err.contains("run-1") && err.contains("run-2"),
            "{args:?}: {err}"
        );
    }
    // Without a name (and without --all): several run, exit 1 listing both.
    for args in [&["ssh", "--", "true"][..], &["stop"]] {
        let o = common::mkt(home.path()).args(args).output().unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("several VMs are running") && err.contains("run-1, run-2"),
            "{args:?}: {err}"
        );
    }
    let o = common::mkt(home.path())
        .args(["stop", "--all", "--force"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    a.wait().unwrap();
    b.wait().unwrap();
    let left: Vec<_> = std::fs::read_dir(home.path().join("run/mkt/runs"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `--accel tcg` gives TCG (`-cpu max`) whatever the host has; `--accel
/// kvm` gives KVM (`-cpu host`) where it is usable, else TCG. (Where KVM is
/// unusable both are the default's choice: exit.rs's guest boots check the
/// line `--accel kvm` prints then.) Only `--accel kvm` probes KVM (the
/// probe's debug line): `--accel tcg` needs no probe.
#[test]
fn accel_flag_picks_the_accelerator() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let kvm = if common::expected_accel_note(None).is_none() {
        "-accel kvm -cpu host"
    } else {
        "-accel tcg -cpu max"
    };
    for (accel, want) in [("tcg", "-accel tcg -cpu max"), ("kvm", kvm)] {
        let o = run_as(
            None,
            home.path(),
            &fx.args(&["-vv", "--accel", accel, "--dry-run", "--", "true"]),
        );
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        assert_eq!(o.status.code(), Some(0), "{err}");
        let line = out.lines().next().unwrap();
        assert!(line.contains(want), "--accel {accel}: {line}");
        assert_eq!(line.matches("-accel ").count(), 1, "{line}");
        let probed = err.lines().any(|l| l.contains("KVM probe"));
        assert_eq!(probed, accel == "kvm", "--accel {accel}: {err}");
    }
}

#[test]
fn bad_inputs_name_the_flag_or_value() {
    let home = common::temp_home(None);
    let o = run_as(
        None,
        home.path(),
        &["--rootfs", "no-such-rootfs", "--", "true"],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("\"no-such-rootfs\""), "{err}");
    let o = run_as(
        None,
        home.path(),
        &["--rootfs", "/", "--kernel", "/nonexistent", "--", "true"],
    );
    assert!(
        text(&o.stderr).contains("--kernel /nonexistent"),
        "{}",
        text(&o.stderr)
    );
    let o = run_as(
        None,
        home.path(),
        &["--rootfs", "/", "--mem", "lots", "--", "true"],
    );
    assert!(
        text(&o.stderr).contains("--mem \"lots\""),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn dry_run_prints_qemu_command_and_generated_files() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let o = run_as(None, home.path(), &fx.args(&["--dry-run", "--", "true"]));
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        out.starts_with(
            &mkt::host::probe::find_program("qemu-system-x86_64")
                .unwrap()
                .display()
                .to_string()
        ),
        "{out}"
    );
    assert!(out.contains("-kernel"), "{out}");
    assert!(out.contains("passwd -> /etc/passwd"), "{out}");
    // The default transport: virtiofs when virtiofsd is there, else 9p.
    if mkt::host::probe::find_program("virtiofsd").is_some() {
        assert!(
            out.contains("vhost-user-fs-pci") && !out.contains("virtio-9p"),
            "{out}"
        );
    } else {
        assert!(out.contains("virtio-9p-pci"), "{out}");
    }
}

#[test]
fn interactive_systemd_boot_serves_ssh_and_cleans_up_on_sigterm() {
    let Some(fx) = fixtures() else { return };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let user = user.as_ref();
    let home = common::temp_home(user);
    let cfg = home.path().join("mkt.toml");
    std::fs::write(
        &cfg,
        format!(
            "[setup.cx5]\nrootfs = \"{}\"\nkernel = \"{}\"\n",
            fx.rootfs.display(),
            fx.tree.display()
        ),
    )
    .unwrap();
    let mut c = common::mkt_as(user, home.path());
    // systemd mode: the default shell would end at stdin's EOF.
    c.args(["run", "cx5", "--init", "systemd"])
        .env("MKT_CONFIG", &cfg)
        .current_dir(home.path());
    c.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut vm = c.spawn().unwrap();
    let mut stderr = std::io::BufReader::new(vm.stderr.take().unwrap());
    let mut port_line = String::new();
    use std::io::BufRead;
    while stderr.read_line(&mut port_line).unwrap() > 0 && !port_line.contains("ssh on") {}
    assert!(port_line.contains("ssh on 127.0.0.1:"), "{port_line}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let ok = loop {
        let o = common::mkt_as(user, home.path())
            .args([
                "ssh",
                "cx5",
                "--",
                "sh",
                "-c",
                "hostname; id -un; test -w $HOME",
            ])
            .env("MKT_CONFIG", &cfg)
            .output()
            .unwrap();
        if o.status.success() {
            break Some(o);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    };
    // Running the same setup again attaches to it instead of booting.
    let attach = common::mkt_as(user, home.path())
        .args(["run", "cx5", "--", "hostname"])
        .env("MKT_CONFIG", &cfg)
        .output()
        .unwrap();
    let ps = common::mkt_as(user, home.path())
        .args(["ps", "--json"])
        .output()
        .unwrap();
    let reload = common::mkt_as(user, home.path())
        .args(["modules-reload", "cx5"])
        .env("MKT_CONFIG", &cfg)
        .output()
        .unwrap();
    let run_dirs = home.path().join("run/mkt/runs");
    let live: Vec<_> = std::fs::read_dir(&run_dirs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = vm.wait().unwrap();
    let o = ok.expect("sshd did not answer within 180 s");
    let want_user = user.map(|u| u.name.clone()).unwrap_or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::getuid())
            .unwrap()
            .unwrap()
            .name
    });
    assert_eq!(text(&o.stdout), format!("cx5\n{want_user}\n"));
    assert_eq!(text(&attach.stdout), "cx5\n", "{}", text(&attach.stderr));
    assert!(
        text(&attach.stderr).contains("already running"),
        "{}",
        text(&attach.stderr)
    );
    let ps: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    let port = port_line.trim().rsplit(':').next().unwrap();
    let port: u64 = port.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(ps[0]["name"], "cx5", "{ps}");
    assert_eq!(ps[0]["ssh_port"], port, "{ps}");
    assert_eq!(
        text(&reload.stdout),
        "no modules changed\n",
        "{}",
        text(&reload.stderr)
    );
    assert!(!status.success(), "mkt reports the signal");
    assert_eq!(live.len(), 1, "{live:?}");
    assert!(!live[0].exists(), "run dir left behind");
    // QEMU died with mkt: nothing still uses the run directory.
    let procs = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok());
    let needle = live[0].display().to_string();
    assert!(
        !procs
            .into_iter()
            .any(|c| String::from_utf8_lossy(&c).contains(&needle)),
        "a process of the run survived"
    );
}

fn processes_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

#[test]
fn kill_9_leaves_no_qemu_and_the_next_run_cleans_up() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let args = fx.args(&[]);
    let mut vm = common::mkt(home.path())
        .arg("run")
        .args(&args)
        .args(["--", "sleep", "600"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let runs = home.path().join("run/mkt/runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let dir = loop {
        let found = std::fs::read_dir(&runs)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .find(|p| p.join("instance.json").exists())
            })
            .ok()
            .flatten();
        if let Some(d) = found {
            break d;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no instance record appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        !processes_mentioning(&dir.display().to_string()).is_empty(),
        "QEMU is not running"
    );
    vm.kill().unwrap(); // SIGKILL: mkt gets no chance to clean up
    vm.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !processes_mentioning(&dir.display().to_string()).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU outlived mkt's kill -9"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        dir.exists(),
        "the killed run's directory is still there until the next run"
    );
    let ps = common::mkt(home.path())
        .args(["ps", "--json"])
        .output()
        .unwrap();
    assert_eq!(text(&ps.stdout).trim(), "[]", "mkt ps shows a ghost");
    let o = common::mkt(home.path())
        .arg("run")
        .args(&args)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        !dir.exists(),
        "the next run did not remove the stale run directory"
    );
}

/// `mkt stop` powers the guest off through ACPI (not a forced quit after
/// its timeout): the guest's command sees the shutdown (a SIGTERM, which
/// it traps, printing and exiting 7, and mkt run reports that status), and
/// the stop takes far less than the --timeout that a forced quit waits out.
#[test]
fn ps_lists_a_running_vm_and_stop_ends_it_cleanly() {
    use std::io::BufRead;
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let mut vm = common::mkt(home.path())
        .arg("run")
        .args(fx.args(&[
            "--",
            "sh",
            "-c",
            "trap 'echo stopped-by-acpi >&2; exit 7' TERM; echo ready; sleep 600 & wait",
        ]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let listed = loop {
        let o = common::mkt(home.path())
            .args(["ps", "--json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if v.as_array().is_some_and(|a| !a.is_empty()) {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mkt ps never listed the VM"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // Unnamed VMs are numbered; `run` finds the only one.
    assert_eq!(listed[0]["name"], "run-1");
    assert_eq!(listed[0]["pid"], vm.id());
    // Stop once the command runs (its trap is set).
    let mut out = std::io::BufReader::new(vm.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let t0 = std::time::Instant::now();
    let o = common::mkt(home.path())
        .args(["stop", "run", "--timeout", "20"])
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "stopped run-1\n");
    let run = vm.wait_with_output().unwrap();
    let err = text(&run.stderr);
    assert!(
        err.contains("stopped-by-acpi"),
        "the guest saw no shutdown: {err}"
    );
    assert_eq!(run.status.code(), Some(7), "{err}");
    assert!(
        took < std::time::Duration::from_secs(15),
        "stop took {took:?}: the guest did not power off by itself"
    );
    let runs = home.path().join("run/mkt/runs");
    let left: Vec<_> = std::fs::read_dir(&runs).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let o = common::mkt(home.path()).args(["stop"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("no VM is running"));
    // --all with none running: nothing to do, and it says so.
    let o = common::mkt(home.path())
        .args(["stop", "--all"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("no VM is running"),
        "{}",
        text(&o.stderr)
    );
}

fn write_script(dir: &Path, name: &str, body: &str, user: Option<&common::TestUser>) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    if let Some(u) = user {
        nix::unistd::chown(&p, Some(u.uid.into()), Some(u.gid.into())).unwrap();
    }
    p
}

#[test]
fn mkt_test_passes_and_fails_with_the_scripts_status() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let ok = write_script(
        home.path(),
        "ok.sh",
        "#!/bin/sh\necho checking $(hostname)\n",
        None,
    );
    let bad = write_script(
        home.path(),
        "bad.sh",
        "#!/bin/sh\necho broken >&2\nexit 3\n",
        None,
    );
    let cfg = home.path().join("mkt.toml");
    std::fs::write(
        &cfg,
        format!(
            "[setup.t1]\nrootfs = \"{r}\"\nkernel = \"{k}\"\ntest = \"{ok}\"\n\n[setup.t2]\nrootfs = \"{r}\"\nkernel = \"{k}\"\ntest = \"{bad}\"\n",
            r = fx.rootfs.display(),
            k = fx.tree.display(),
            ok = ok.display(),
            bad = bad.display()
        ),
    )
    .unwrap();
    let o = common::mkt(home.path())
        .args(["test", "t1"])
        .env("MKT_CONFIG", &cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("checking t1\n") && out.contains("TEST PASSED"),
        "{out}"
    );
    let o = common::mkt(home.path())
        .args(["test", "t2"])
        .env("MKT_CONFIG", &cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stdout).contains("TEST FAILED"),
        "{}",
        text(&o.stdout)
    );
    assert!(text(&o.stdout).contains("exited 3"), "{}", text(&o.stdout));
    assert!(text(&o.stderr).contains("broken"), "{}", text(&o.stderr));
}

#[test]
fn boot_script_output_lands_in_the_run_log_and_failures_are_reported() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let good = write_script(
        home.path(),
        "good.sh",
        "#!/bin/sh\necho boot-script-ran-as $(id -un)\n",
        None,
    );
    let bad = write_script(home.path(), "bad.sh", "#!/bin/sh\nexit 4\n", None);
    for (script, want) in [(&good, "boot script: ok"), (&bad, "FAILED")] {
        let o = common::mkt(home.path())
            .arg("run")
            .args(fx.args(&["--boot-script", script.to_str().unwrap(), "--", "true"]))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        let logs = home.path().join(".local/state/mkt/logs/run");
        let newest = std::fs::read_dir(&logs)
            .unwrap()
            .flatten()
            .max_by_key(|e| e.metadata().unwrap().modified().unwrap())
            .unwrap()
            .path();
        let log = std::fs::read_to_string(&newest).unwrap();
        assert!(
            log.contains(want),
            "{want:?} not in {}:\n{log}",
            newest.display()
        );
        if want == "boot script: ok" {
            assert!(log.contains("boot-script-ran-as "), "{log}");
            assert!(!text(&o.stderr).contains("warning"), "{}", text(&o.stderr));
        } else {
            // Reported on stderr too, with the log's path.
            let err = text(&o.stderr);
            assert!(
                err.contains("mkt: warning: boot script") && err.contains("FAILED"),
                "{err}"
            );
            assert!(err.contains(&newest.display().to_string()), "{err}");
        }
    }
    // Checked before boot: not executable.
    let plain = home.path().join("plain.sh");
    std::fs::write(&plain, "echo hi\n").unwrap();
    let o = common::mkt(home.path())
        .arg("run")
        .args(fx.args(&["--boot-script", plain.to_str().unwrap(), "--", "true"]))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("--boot-script"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn modules_reload_reloads_exactly_the_rebuilt_module() {
    let Some(fx) = fixtures() else { return };
    let Some(_) = common::program("make") else {
        return;
    };
    let home = common::temp_home(None);
    // A private copy of the built tree: the rebuild must not touch the fixture.
    let work = tempfile::Builder::new()
        .prefix("mkt-tree-")
        .tempdir()
        .unwrap();
    let tree = work.path().join("linux");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&fx.tree)
        .arg(&tree)
        .status()
        .unwrap();
    assert!(cp.success());
    let go = home.path().join("go");
    let script = format!(
        "sudo modprobe dummy && (cat /sys/module/dummy/version 2>/dev/null || echo v-none); \
         mkt modules-reload; echo ready; \
         while [ ! -e {go} ]; do sleep 0.2; done; \
         mkt modules-reload && cat /sys/module/dummy/version && mkt modules-reload",
        go = go.display()
    );
    let mut vm = common::mkt(home.path())
        .args(["run", "--rootfs", fx.rootfs.to_str().unwrap(), "--kernel"])
        .arg(&tree)
        .args(["--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(vm.stdout.take().unwrap());
    let mut seen = String::new();
    use std::io::BufRead;
    while !seen.contains("ready\n") {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let o = vm.wait_with_output().unwrap();
            panic!("guest ended early:\n{seen}\n{}", text(&o.stderr));
        }
        seen += &line;
    }
    // Rebuild only dummy.ko, with a version the loaded module will show.
    let src = tree.join("drivers/net/dummy.c");
    let c = std::fs::read_to_string(&src).unwrap();
    std::fs::write(&src, format!("{c}\nMODULE_VERSION(\"mkt-2\");\n")).unwrap();
    let make = std::process::Command::new("make")
        .arg("-C")
        .arg(&tree)
        .args(["-s", "drivers/net/dummy.ko"])
        .output()
        .unwrap();
    assert!(make.status.success(), "{}", text(&make.stderr));
    std::fs::write(&go, "").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = vm.wait().unwrap();
    let all = seen + &rest;
    assert!(status.success(), "{all}");
    assert_eq!(
        all,
        "v-none\nno modules changed\nready\nreloaded: dummy\nmkt-2\nno modules changed\n"
    );
}

/// `mkt modules-reload --all` reloads the loaded modules of the tree that
/// did not change; it exits 1 when a module is in use (tun, held by an open
/// /dev/net/tun), leaving every module loaded, and when a module cannot be
/// loaded again (its file replaced by garbage: a bind mount in the guest,
/// so the fixture tree stays as it is). No rebuild, so no copy of the tree.
#[test]
fn modules_reload_all_a_module_in_use_and_one_that_fails_to_load() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let script = "loaded() { for m in dummy tun; do test -d /sys/module/$m && printf '%s ' $m; done; echo; }; \
         sudo modprobe dummy; sudo modprobe tun; \
         mkt modules-reload; echo rc=$?; \
         sudo sh -c 'exec 3<>/dev/net/tun; echo $$ > /tmp/held; exec sleep 600' & \
         until [ -s /tmp/held ]; do sleep 0.1; done; \
         mkt modules-reload --all 2>&1; echo rc=$?; loaded; \
         sudo kill $(cat /tmp/held); wait; \
         r=$(mkt modules-reload --all); echo rc=$?; echo $r | tr ' ' '\\n' | sort | tr '\\n' ' '; echo; loaded; \
         t=$(readlink -f \"$(modinfo -n dummy)\"); echo garbage > /tmp/bad.ko; \
         sudo mount --bind /tmp/bad.ko \"$t\" && mkt modules-reload 2>&1; echo rc=$?";
    let o = run_as(None, home.path(), &fx.args(&["--", "sh", "-c", script]));
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["no modules changed", "rc=0"], "{out}");
    // tun in use: refused, exit 1, and both modules are still loaded
    // (whatever was unloaded before tun was loaded back).
    let busy = 2 + lines[2..]
        .iter()
        .position(|l| l.starts_with("rc="))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        lines[2..busy]
            .iter()
            .any(|l| l.starts_with("mkt: cannot unload tun: ")
                && l.ends_with("(in use); nothing more is unloaded")),
        "{out}"
    );
    assert_eq!(lines[busy..busy + 2], ["rc=1", "dummy tun "], "{out}");
    // Released: both reloaded.
    assert_eq!(
        lines[busy + 2..busy + 5],
        ["rc=0", "dummy reloaded: tun ", "dummy tun "],
        "{out}"
    );
    assert!(
        lines[busy + 5].starts_with("mkt: cannot load ") && lines[busy + 5].contains("dummy.ko"),
        "{out}"
    );
    assert_eq!(lines[busy + 6..], ["rc=1"], "{out}");
}

/// A closed stdout (`mkt run --dry-run | head` after head exited) ends
/// the dry run like `cat`, never with a panic (exit 101).
fn dry_run_into_a_closed_pipe(user: Option<&common::TestUser>, home: &Path) {
    use std::os::unix::process::ExitStatusExt;
    let (rd, wr) = nix::unistd::pipe().unwrap();
    drop(rd);
    let o = common::mkt_as(user, home)
        .args([
            "run",
            "--rootfs",
            "debian-bookworm",
            "--dry-run",
            "--",
            "true",
        ])
        .current_dir(home)
        .stdout(std::process::Stdio::from(wr))
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        o.status.signal() == Some(libc::SIGPIPE) || o.status.success(),
        "{:?}: {err}",
        o.status
    );
}

/// The README's first command, twice, with no flag: the default rootfs is
/// found in the store each time (it used to be rebuilt: "rootfs
/// debian-bookworm already exists"), --dry-run finds it too ("not built
/// yet"), as root and as the unprivileged user. The store holds the
/// fixture tree with the cloud kernel, as the first run leaves it.
#[test]
fn default_rootfs_comes_from_the_store_on_every_run() {
    let Some(_) = common::program("qemu-system-x86_64") else {
        return;
    };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    for user in [None, user.as_ref()] {
        let Some(home) = common::home_with_default_rootfs(user) else {
            return;
        };
        let h = home.path();
        let tree = h.join(".local/share/mkt/rootfs/debian-bookworm");
        for round in 1..=2 {
            let o = run_as(user, h, &["--", "uname", "-a"]);
            let (out, err) = (text(&o.stdout), text(&o.stderr));
            assert_eq!(o.status.code(), Some(0), "run {round}:\n{out}\n{err}");
            assert!(out.contains("-cloud-amd64"), "run {round}: {out}");
            assert!(!err.contains("building it from its recipe"), "{err}");
        }
        let o = run_as(user, h, &["--dry-run", "--", "true"]);
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
        assert!(out.contains(&tree.display().to_string()), "{out}");
    }
}

#[test]
fn dry_run_into_a_closed_pipe_does_not_panic() {
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    for user in [None, user.as_ref()] {
        let Some(home) = common::home_with_default_rootfs(user) else {
            return;
        };
        dry_run_into_a_closed_pipe(user, home.path());
    }
}

/// SIGINT (Ctrl-C), SIGTERM or SIGHUP while `mkt run` boots: mkt tears the
/// VM down and exits 130, 143 or 129, as shells report an interrupted
/// command (not 1).
#[test]
fn an_interrupted_run_exits_130_or_143_and_leaves_no_vm() {
    let Some(_) = common::program("qemu-system-x86_64") else {
        return;
    };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    for (user, sig) in [
        (None, nix::sys::signal::Signal::SIGINT),
        (user.as_ref(), nix::sys::signal::Signal::SIGTERM),
        (None, nix::sys::signal::Signal::SIGHUP),
    ] {
        let Some(home) = common::home_with_default_rootfs(user) else {
            return;
        };
        let h = home.path();
        let mut vm = common::mkt_as(user, h)
            .args(["run", "--rootfs", "debian-bookworm", "--", "sleep", "600"])
            .current_dir(h)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Listed by `mkt ps` once QEMU runs (mkt's handlers are in place).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let o = common::mkt_as(user, h)
                .args(["ps", "--json"])
                .output()
                .unwrap();
            let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            if list.as_array().is_some_and(|a| !a.is_empty()) {
                break;
            }
            assert!(vm.try_wait().unwrap().is_none(), "mkt run ended early");
            assert!(std::time::Instant::now() < deadline, "no VM listed");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let pid = nix::unistd::Pid::from_raw(vm.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
        let o = vm.wait_with_output().unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(128 + sig as i32), "{sig}: {err}");
        assert!(err.contains("interrupted"), "{err}");
        let o = common::mkt_as(user, h)
            .args(["ps", "--json"])
            .output()
            .unwrap();
        let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(list, serde_json::json!([]), "a VM is left");
    }
}

/// The pids and command lines of the processes whose command line
/// mentions `needle`.
fn pids_mentioning(needle: &str) -> Vec<(i32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let c = std::fs::read(e.path().join("cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(needle).then_some((pid, c))
        })
        .collect()
}

/// Busy loops on every CPU while alive, as on a busy CI machine.
struct Load(Vec<std::process::Child>);

impl Load {
    fn new() -> Load {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        Load(
            (0..n)
                .map(|_| {
                    std::process::Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .unwrap()
                })
                .collect(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (polling without sleeping, to catch the moment) until a file of
/// a run directory under `runs` ends with `suffix`; false after 90 s.
fn wait_for_run_file(runs: &Path, prefix: &str, suffix: &str) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while std::time::Instant::now() < deadline {
        let found = std::fs::read_dir(runs)
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| {
                std::fs::read_dir(d.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|f| {
                        let n = f.file_name();
                        let n = n.to_string_lossy();
                        n.starts_with(prefix) && n.ends_with(suffix)
                    })
            });
        if found {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

/// Issue 12 item 5: a `kill -9` of `mkt run` anywhere in its start-up, on
/// a loaded machine, as root and as the unprivileged user. The next mkt
/// sweeps the dead run's directory at once (no child of the run may still
/// hold its lock), and no virtiofsd or QEMU of the run survives it (not
/// even one forked just before the kill, before it asked for PDEATHSIG).
/// The kills land right as virtiofsd is forked (its log appears), right as
/// QEMU is (the last socket appears), and after varied delays.
#[test]
fn kill_9_during_start_up_leaves_no_orphan_and_no_stale_run_dir() {
    let Some(fx) = fixtures() else { return };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let users: Vec<Option<&common::TestUser>> = match &user {
        Some(u) => vec![None, Some(u)],
        None => vec![None],
    };
    let homes: Vec<tempfile::TempDir> = users.iter().map(|u| common::temp_home(*u)).collect();
    let _load = Load::new();
    let mut failures = Vec::new();
    let mut orphans = Vec::new();
    for i in 0..20 {
        let (user, home) = (users[i % users.len()], homes[i % homes.len()].path());
        let runs = home.join("run/mkt/runs");
        let mut vm = common::mkt_as(user, home)
            .arg("run")
            .args(fx.args(&["--", "sleep", "600"]))
            .current_dir(home)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let when = match i % 4 {
            0 | 1 => {
                wait_for_run_file(&runs, "virtiofsd-", ".log");
                "virtiofsd forked"
            }
            2 => {
                // Written right after QEMU is forked.
                wait_for_run_file(&runs, "instance", ".json");
                "QEMU forked"
            }
            _ => {
                std::thread::sleep(std::time::Duration::from_millis(i as u64 * 137 % 2000));
                "after a delay"
            }
        };
        vm.kill().unwrap();
        vm.wait().unwrap();
        eprintln!("kill {i} ({when}, {:?})", user.map(|u| &u.name));
        let ps = common::mkt_as(user, home)
            .args(["ps", "--json"])
            .output()
            .unwrap();
        let left: Vec<_> = std::fs::read_dir(&runs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        if text(&ps.stdout).trim() != "[]" || !left.is_empty() {
            failures.push(format!(
                "kill {i} ({when}): stale run dir kept by the next mkt: {left:?} {}",
                text(&ps.stderr)
            ));
            // Let it go before the next round.
            std::thread::sleep(std::time::Duration::from_secs(1));
            let _ = common::mkt_as(user, home).args(["ps"]).output();
        }
        let needle = runs.display().to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let alive = pids_mentioning(&needle);
            if alive.is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                failures.push(format!("kill {i} ({when}): orphans {alive:?}"));
                orphans.extend(alive.into_iter().map(|(p, _)| p));
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    for p in orphans {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Issue 12 item 7: a kernel command line longer than the kernel takes
/// (cmdline_size in its bzImage header, 2047 bytes on x86) boots to an
/// empty console; mkt refuses it up front, counting every word it adds.
#[test]
fn an_append_longer_than_the_kernel_takes_is_refused() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let long = format!("x={}", "a".repeat(2040));
    let o = run_as(
        None,
        home.path(),
        &fx.args(&["--append", &long, "--", "true"]),
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("kernel command line") && err.contains("at most 2047"),
        "{err}"
    );
    assert!(err.contains("--append"), "{err}");
    // Nothing started, nothing left.
    let left: Vec<_> = std::fs::read_dir(home.path().join("run/mkt/runs"))
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // A long one that fits is fine.
    let fits = format!("x={}", "a".repeat(1500));
    let o = run_as(
        None,
        home.path(),
        &fx.args(&["--dry-run", "--append", &fits, "--", "true"]),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
}

/// Issue 12 item 8: in interactive mode QEMU's own error (here a device it
/// does not know) reached nobody: mkt exited 1 without a word.
#[test]
fn interactive_run_prints_qemus_own_error() {
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let o = common::mkt(home.path())
        .arg("run")
        .args(fx.args(&["--qemu-arg=-device", "--qemu-arg=no-such-device-xyz"]))
        .current_dir(home.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no-such-device-xyz"), "{err}");
    assert!(err.contains("QEMU exit status: 1"), "{err}");
}

/// Issue 12 item 24: with XDG_RUNTIME_DIR unset the runtime dir is
/// /tmp/mkt-$UID, which another user can make first and fill with records.
/// Root's `mkt stop --all` then signalled the recorded pid (any process);
/// now ps, stop and ssh refuse a runtime dir that is not theirs.
#[test]
fn a_runtime_dir_planted_by_another_user_is_refused() {
    let Some(Some(other)) = common::unprivileged_user() else {
        eprintln!("SKIP: needs root and the unprivileged test user");
        return;
    };
    let home = common::temp_home(None);
    // What the other user planted: a run dir with a record naming a
    // process of ours, and a lock they hold.
    let rt = home.path().join("run/mkt");
    let run = rt.join("runs/run-1");
    std::fs::create_dir_all(&run).unwrap();
    let mut victim = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    std::fs::write(
        run.join("instance.json"),
        format!(
            r#"{{"name":"run-1","pid":{},"ssh_port":null,"user":"x","kernel":"/k","rootfs":"/r","started":1,"qmp":null}}"#,
            victim.id()
        ),
    )
    .unwrap();
    let lock = std::fs::File::create(run.join("lock")).unwrap();
    let _flock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let l = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    let posix = std::fs::OpenOptions::new()
        .write(true)
        .open(run.join("lock"))
        .unwrap();
    nix::fcntl::fcntl(&posix, nix::fcntl::FcntlArg::F_SETLK(&l)).unwrap();
    for p in [
        home.path().join("run"),
        rt.clone(),
        rt.join("runs"),
        run.clone(),
    ] {
        nix::unistd::chown(&p, Some(other.uid.into()), Some(other.gid.into())).unwrap();
    }
    let outs: Vec<_> = [
        vec!["stop", "--all", "--force"],
        vec!["ps"],
        vec!["ssh", "run-1"],
    ]
    .iter()
    .map(|a| common::mkt(home.path()).args(a).output().unwrap())
    .collect();
    let alive = victim.try_wait().unwrap().is_none();
    let _ = victim.kill();
    let _ = victim.wait();
    assert!(alive, "mkt stop killed a process it does not own");
    for o in outs {
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&home.path().join("run").display().to_string())
                && err.contains(&format!("owned by uid {}", other.uid)),
            "{err}"
        );
    }
}

/// One interactive VM for several documented behaviours:
/// - `--ssh-port N` forwards exactly N to the guest's sshd (its banner
///   answers there), printed and recorded for `mkt ps`;
/// - `mkt ssh` exits 255 (ssh's) when ssh cannot connect: the guest's sshd
///   killed from the console;
/// - `--keep` says where the run directory is and keeps it (generated guest
///   files, initramfs) after the run, also from the next mkt's sweep;
/// - `--new` boots a second VM of a running setup (`SETUP-2`) instead of
///   attaching to it;
/// - cleanup: Ctrl-A X on its console quits that second one (exit 0 after
///   an interactive session) and leaves none of its processes and no run
///   directory; SIGHUP (a closed terminal) ends the first with 129 and
///   leaves none of its processes (its directory is kept, as asked);
/// - `mkt stop` of a shell-mode VM is an ACPI power-off its init acts on.
#[test]
fn keep_ssh_port_new_sighup_and_ctrl_a_x() {
    use std::io::{BufRead, Read, Write};
    let Some(fx) = fixtures() else { return };
    let home = common::temp_home(None);
    let h = home.path();
    let cfg = h.join("mkt.toml");
    std::fs::write(
        &cfg,
        format!(
            "[setup.kp]\nrootfs = \"{}\"\nkernel = \"{}\"\n",
            fx.rootfs.display(),
            fx.tree.display()
        ),
    )
    .unwrap();
    let mkt = |args: &[&str]| {
        let mut c = common::mkt(h);
        c.args(args).env("MKT_CONFIG", &cfg).current_dir(h);
        c
    };
    let ps = || -> Vec<serde_json::Value> {
        let o = mkt(&["ps", "--json"]).output().unwrap();
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_s = port.to_string();
    let mut a = mkt(&[
        "run",
        "kp",
        "--init",
        "shell",
        "--keep",
        "--ssh-port",
        &port_s,
    ])
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut err = std::io::BufReader::new(a.stderr.take().unwrap());
    let mut said = String::new();
    let mut line = String::new();
    while !said.contains("ssh on") {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            let _ = a.kill();
            panic!("mkt run ended: {said}");
        }
        said += &line;
    }
    // Drained from now on, so mkt never blocks on a full pipe.
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    assert!(
        said.contains(&format!("ssh on 127.0.0.1:{port} ")),
        "{said}"
    );
    let kept = said
        .lines()
        .find_map(|l| l.strip_prefix("mkt: keeping the run directory "))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("--keep said nothing: {said}"));
    assert_eq!(kept, h.join("run/mkt/runs/kp"));
    let vms = ps();
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(vms[0]["ssh_port"], port, "{vms:?}");
    // The guest's sshd answers on that very port.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let banner = loop {
        let got = std::net::TcpStream::connect(("127.0.0.1", port))
            .and_then(|mut s| {
                s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
                let mut b = [0u8; 8];
                s.read_exact(&mut b)?;
                Ok(b)
            })
            .ok();
        match got {
            Some(b) if &b == b"SSH-2.0-" => break Some(b),
            _ if std::time::Instant::now() > deadline => break None,
            _ => std::thread::sleep(std::time::Duration::from_millis(500)),
        }
    };
    // `mkt ssh` passes on ssh's 255 when ssh cannot connect (the guest's
    // sshd killed from the console), where mkt's own failures are 1.
    let mut a_console = a.stdin.take().unwrap();
    a_console.write_all(b"pkill -x sshd\n").unwrap();
    a_console.flush().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let sshd_gone = loop {
        let answers = std::net::TcpStream::connect(("127.0.0.1", port))
            .and_then(|mut s| {
                s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
                let mut b = [0u8; 8];
                s.read_exact(&mut b)
            })
            .is_ok();
        if !answers || std::time::Instant::now() > deadline {
            break !answers;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    let no_sshd = mkt(&["ssh", "kp", "--", "true"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    // --new: a second VM of the running setup, not an attach.
    let mut b = mkt(&["run", "kp", "--new", "--init", "shell"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let b_err = b.stderr.take().unwrap();
    let b_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::BufReader::new(b_err).read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let both = loop {
        let vms = ps();
        if vms.len() == 2 || std::time::Instant::now() > deadline || b.try_wait().unwrap().is_some()
        {
            break vms;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    if both.len() != 2 {
        let _ = b.kill();
        let _ = a.kill();
        let _ = (b.wait(), a.wait());
        panic!("--new did not start a second VM: {both:?}");
    }
    let second = h.join("run/mkt/runs/kp-2");
    // Let QEMU start reading its console.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let b_procs = processes_mentioning(&second.display().to_string());
    // Ctrl-A X on its console: QEMU quits, mkt cleans up.
    let mut stdin = b.stdin.take().unwrap();
    stdin.write_all(b"\x01x").unwrap();
    stdin.flush().unwrap();
    let b_status = wait_or_kill(&mut b, 60);
    // Before any other mkt runs: the next one would sweep a dead run's dir.
    let b_dir_left = second.exists();
    drop(stdin);
    let b_err = b_err.join().unwrap();
    let b_left = processes_mentioning(&second.display().to_string());
    let after_b = ps();
    // `mkt stop` of a shell-mode VM: the init acts on the ACPI power button
    // (the shell gets SIGHUP), well before the forced quit's timeout.
    let mut c = mkt(&["run", "kp", "--new", "--init", "shell"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let c_console = c.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let c_out = std::thread::spawn(move || {
        let mut con = std::io::BufReader::new(c_console);
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        let mut told = false;
        while let Ok(n) = con.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if !told && String::from_utf8_lossy(&all).contains("@kp:") {
                let _ = tx.send(());
                told = true;
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let prompt = rx.recv_timeout(std::time::Duration::from_secs(120)).is_ok();
    let t0 = std::time::Instant::now();
    let c_stop = mkt(&["stop", "kp-2", "--timeout", "20"]).output().unwrap();
    let c_took = t0.elapsed();
    let c_status = wait_or_kill(&mut c, 60);
    let c_console = c_out.join().unwrap();
    // SIGHUP (the terminal closed) to the first.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let a_status = wait_or_kill(&mut a, 60);
    drop(a_console);
    let a_err = rest.join().unwrap();
    let a_left = processes_mentioning(&kept.display().to_string());
    let after_a = ps();

    assert!(banner.is_some(), "no sshd banner on 127.0.0.1:{port}");
    assert!(sshd_gone, "the guest's sshd still answers after pkill");
    assert_eq!(
        no_sshd.status.code(),
        Some(255),
        "{}",
        text(&no_sshd.stderr)
    );
    let mut names: Vec<&str> = both.iter().map(|v| v["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["kp", "kp-2"], "{both:?}\n{b_err}");
    assert!(!b_procs.is_empty(), "the second VM's QEMU was not seen");
    assert!(!b_err.contains("attaching"), "{b_err}");
    assert_eq!(b_status, Some(0), "Ctrl-A X: {b_err}");
    assert!(b_left.is_empty(), "left after Ctrl-A X: {b_left:?}");
    assert!(!b_dir_left, "Ctrl-A X left the run directory");
    assert_eq!(after_b.len(), 1, "{after_b:?}");
    assert!(
        prompt,
        "no shell prompt on the third VM's console: {c_console}"
    );
    assert!(c_stop.status.success(), "{}", text(&c_stop.stderr));
    assert!(
        c_console.contains("mkt-init: ACPI power button: stopping")
            && !c_console.contains("still running after 5 s"),
        "the shell did not end on the power button: {c_console}"
    );
    assert!(
        c_took < std::time::Duration::from_secs(15),
        "stop took {c_took:?}: the guest did not power off by itself"
    );
    assert_eq!(c_status, Some(0), "{c_console}");
    assert_eq!(a_status, Some(129), "SIGHUP: {said}{a_err}");
    assert!(a_left.is_empty(), "left after SIGHUP: {a_left:?}");
    assert!(after_a.is_empty(), "{after_a:?}");
    // Kept, with what --keep promises, past the next mkt's sweep.
    let o = mkt(&["run", "--dry-run", "kp"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(kept.join("initrd").is_file(), "{kept:?}");
    let guest: Vec<_> = std::fs::read_dir(kept.join("guest"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(!guest.is_empty(), "no generated guest files kept");
}

/// The child's exit code once it ends; killed (and `None`) after `secs`.
fn wait_or_kill(c: &mut std::process::Child, secs: u64) -> Option<i32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
