//! `mkt run`: resolve the kernel and rootfs, generate the guest files and
//! initramfs into a private run directory, start QEMU, relay the command's
//! output and exit status, and tear everything down whatever happens.

mod cmdline;
mod control;
mod error;
pub mod net;
mod prepare;
pub mod qemu;
mod qmp;
mod request;
mod script;
mod ssh;
mod supervise;
pub mod vfio;
mod virtiofsd;

use crate::config::{Config, Paths};
use crate::guest;
use crate::guest::plan::{READY_PORT, WINSIZE_PORT};
use crate::instance::{self, RunDir};
pub use control::{running_vms, stop};
pub use error::RunError;
use error::stderr_tail;
use prepare::{Prepared, ensure_disk, host_sysfs, prepare, write_run_files};
use qemu::{Console, Net};
pub use request::RunOptions;
use script::check_boot_script;
pub use ssh::ssh;
use ssh::{relay_ready, ssh_with_stdin};
use std::io::{self, Read};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Instant;
use supervise::{relay, relay_winsize, spawn_qemu, unblock, wait_qemu};
use virtiofsd::{Daemons, start_virtiofsd};

/// Runs a guest; returns mkt's exit status (the command's in exec mode).
pub fn run(opts: &RunOptions, config: &Config, paths: &Paths) -> anyhow::Result<i32> {
    paths.ensure_runtime_dir()?;
    for stale in control::clean_stale(&paths.runtime_dir)? {
        tracing::info!("removed stale run directory {}", stale.display());
    }
    if let Some(status) = attach_to_running(opts, paths)? {
        return Ok(status);
    }
    // An unnamed VM is `run-N`, a setup's `SETUP` (`SETUP-N` with --new):
    // unique, so that ssh and stop never pick one of several.
    let mut run_dir = RunDir::create(
        &paths.runtime_dir,
        opts.setup.as_deref().unwrap_or("run"),
        opts.setup.is_none(),
    )
    .map_err(RunError::RunDir)?;
    let name = run_dir.name().to_string();
    let mut prepared = prepare(opts, config, paths, run_dir.path())?;
    if let (Some(port), false) = (prepared.spec.gdb_port, opts.quiet) {
        eprintln!("{}", gdb_note(&prepared.spec, port));
    }
    if opts.dry_run {
        print_dry_run(&prepared);
        return Ok(0);
    }
    // Held for the VM's whole life: `rootfs rm` refuses a tree in use.
    let _tree_in_use = crate::rootfs::lock::in_use(paths, &prepared.rootfs)?;
    if let (Some(note), false) = (&prepared.accel_note, opts.quiet) {
        eprintln!("mkt: {note}");
    }
    write_run_files(&prepared, run_dir.path())?;
    if opts.keep {
        run_dir.keep();
        if !opts.quiet {
            eprintln!(
                "mkt: keeping the run directory {}",
                run_dir.path().display()
            );
        }
    }
    // From here on a stop signal ends the run through its cleanup.
    let stop = crate::util::signal::StopPipe::new().map_err(RunError::Signals)?;
    let _pipe = crate::util::signal::KeepOnClosedPipe::new();
    // The privileged steps: checked up front, undone when the run ends
    // (these guards drop before run_dir), and after kill -9 by the next
    // run's sweep of stale run directories.
    let (_vfio, tap) = host_devices(&mut prepared, run_dir.path(), opts.quiet)?;
    let argv = qemu::command_line(&prepared.spec);

    let mut relays = Vec::new();
    for port in &prepared.spec.ports {
        let l = UnixListener::bind(&port.socket)
            .map_err(|e| RunError::Listen(port.socket.clone(), e))?;
        relays.push((port.name.clone(), l));
    }
    // The store exists before the file servers start, so they can show it
    // read-only (else a guest could make it, with trees of its own).
    std::fs::create_dir_all(&paths.rootfs_dir)
        .map_err(|e| RunError::Write(paths.rootfs_dir.clone(), e))?;
    let store = std::fs::canonicalize(&paths.rootfs_dir).unwrap_or(paths.rootfs_dir.clone());
    let _daemons = match &prepared.virtiofsd {
        Some(bin) => start_virtiofsd(
            bin,
            &prepared.spec.shares,
            run_dir.path(),
            prepared.root_ids.as_ref(),
            &store,
        )?,
        None => Daemons(Vec::new(), Vec::new()),
    };
    let started = Instant::now();
    let mut child = spawn_qemu(
        &argv,
        prepared.exec,
        tap.as_ref().map(|t| t.fd()),
        qemu_confinement(&prepared, &store),
    )?;
    let ssh_port = match &prepared.spec.net {
        Net::User { ssh_port } => *ssh_port,
        _ => None,
    };
    run_dir.write_record(&instance::Record {
        name: name.clone(),
        pid: std::process::id(),
        ssh_port,
        user: prepared.user.clone(),
        kernel: prepared.spec.kernel.clone(),
        rootfs: prepared.rootfs.clone(),
        started: crate::util::time::epoch_secs(),
        qmp: Some(prepared.spec.qmp.clone()),
        ssh_reports_ready: prepared.ssh_reports_ready,
        dir: PathBuf::new(),
    })?;
    if let (Some(port), false) = (ssh_port, opts.quiet || prepared.exec) {
        eprintln!("mkt: ssh on 127.0.0.1:{port} (`mkt ssh {name}`)");
    }
    let mut qemu_err = child.stderr.take().expect("piped stderr");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = qemu_err.read_to_string(&mut s);
        s
    });
    let mut handles = Vec::new();
    for (name, l) in relays {
        if name == WINSIZE_PORT {
            relay_winsize(l);
            continue;
        }
        if name == READY_PORT {
            relay_ready(l, run_dir.path().to_path_buf());
            continue;
        }
        let h = match name.as_str() {
            "mkt.stdout" => relay(l, io::stdout()),
            "mkt.stderr" => relay(l, io::stderr()),
            _ => relay(l, io::sink()),
        };
        handles.push((name, h));
    }

    let sockets: Vec<PathBuf> = prepared
        .spec
        .ports
        .iter()
        .map(|p| p.socket.clone())
        .collect();
    let status = wait_qemu(&mut child, &stop, &sockets)?;
    tracing::info!("QEMU ran {:.2?} and exited {status}", started.elapsed());
    unblock(&sockets);
    let mut exit_line = String::new();
    for (name, h) in handles {
        let kept = h.join().unwrap_or_default();
        if name == "mkt.status" {
            exit_line = String::from_utf8_lossy(&kept).into_owned();
        }
    }
    let qemu_stderr = err_thread.join().unwrap_or_default();
    Ok(outcome(&prepared, status, &exit_line, &qemu_stderr)?)
}

/// As MKT did: running a setup that already runs attaches to it over ssh
/// (its status is the ssh command's), unless `--new` or `--dry-run`.
fn attach_to_running(opts: &RunOptions, paths: &Paths) -> anyhow::Result<Option<i32>> {
    let (Some(setup), false, false) = (&opts.setup, opts.new, opts.dry_run) else {
        return Ok(None);
    };
    let Some(rec) = control::running_vms(&paths.runtime_dir)?
        .into_iter()
        .find(|r| &r.name == setup)
    else {
        return Ok(None);
    };
    if rec.ssh_port.is_none() {
        anyhow::bail!(
            "{setup} is already running (pid {}) without SSH (a command run, --net none, or no sshd in its rootfs); use --new for another VM",
            rec.pid
        );
    }
    if !opts.quiet {
        eprintln!(
            "mkt: {setup} is already running (pid {}): attaching over ssh (--new starts another)",
            rec.pid
        );
    }
    if opts.reload && opts.command.is_empty() {
        let status = ssh(paths, Some(setup), &reload_command(&[]), opts.quiet)?;
        if status != 0 {
            return Ok(Some(status));
        }
    } else if opts.reload {
        return ssh(
            paths,
            Some(setup),
            &reload_command(&opts.command),
            opts.quiet,
        )
        .map(Some);
    }
    ssh(paths, Some(setup), &opts.command, opts.quiet).map(Some)
}

/// `--reload`: the guest tool's `modules-reload` (its report on stderr, so
/// stdout is CMD's alone), then CMD word for word; the reload's status
/// when it fails, else CMD's.
fn reload_command(command: &[String]) -> Vec<String> {
    let reload = format!("{} modules-reload", crate::guest::GUEST_TOOL);
    if command.is_empty() {
        return vec!["sh".into(), "-c".into(), format!("{reload} >&2")];
    }
    let mut v = vec![
        "sh".to_string(),
        "-c".into(),
        format!("{reload} >&2 || exit; exec \"$@\""),
        "mkt-reload".into(),
    ];
    v.extend(command.iter().cloned());
    v
}

/// Where gdb connects, and whether vmlinux's symbols line up.
fn gdb_note(spec: &qemu::VmSpec, port: u16) -> String {
    let kaslr = if qemu::cmdline(spec).split(' ').any(|w| w == "nokaslr") {
        "with nokaslr, so vmlinux's symbols line up"
    } else {
        "with KASLR, as --append asked: vmlinux's symbols will not line up"
    };
    format!(
        "mkt: gdb stub on 127.0.0.1:{port}; the kernel boots {kaslr} (gdb vmlinux -ex 'target remote :{port}')"
    )
}

/// `--dry-run`: the QEMU command line and the generated guest files.
fn print_dry_run(prepared: &Prepared) {
    let argv = qemu::command_line(&prepared.spec);
    println!("{}", crate::util::shell::shell_quote(&argv));
    println!("# generated guest files (packed into the initramfs's /mkt):");
    for f in &prepared.files.files {
        println!(
            "#   {}{}",
            f.name,
            f.dest
                .as_ref()
                .map(|d| format!(" -> {d}"))
                .unwrap_or_default()
        );
    }
}

/// The host devices the VM gets: PCI functions bound to vfio-pci, the NVMe
/// disk file, and a tap (QEMU gets its fd); the guards undo them.
fn host_devices(
    prepared: &mut Prepared,
    run_dir: &Path,
    quiet: bool,
) -> Result<(Option<crate::vm::vfio::Binding>, Option<net::Tap>), RunError> {
    if matches!(prepared.spec.net, Net::Tap { .. }) {
        net::check_privilege(&prepared.net_mode)?;
    }
    let vfio = if prepared.spec.pci.is_empty() {
        None
    } else {
        let sys = host_sysfs();
        let devices = sys.check(&prepared.spec.pci)?;
        sys.check_privilege(&devices)?;
        Some(sys.bind(&devices, &run_dir.join(crate::vm::vfio::STATE_FILE))?)
    };
    if let (Some(n), Some(mib)) = (&prepared.spec.nvme, prepared.nvme_mib) {
        ensure_disk(&n.path, mib)?;
    }
    let Net::Tap { mac, .. } = &prepared.spec.net else {
        return Ok((vfio, None));
    };
    let bridge = match &prepared.net_mode {
        net::Mode::Bridge(b) => Some(b.as_str()),
        _ => None,
    };
    let tap = net::Tap::create(&format!("mkt{}", std::process::id()), bridge, run_dir)?;
    // The tap exists and QEMU gets its fd: nothing else needs the
    // capability (the kernel deletes the tap with the last fd).
    net::drop_net_admin();
    if !quiet && !prepared.exec {
        eprintln!(
            "mkt: guest NIC {mac} on tap {}{}",
            tap.name,
            bridge
                .map(|b| format!(" in bridge {b}"))
                .unwrap_or_default()
        );
    }
    prepared.spec.net = Net::Tap {
        fd: Some(tap.fd()),
        mac: mac.clone(),
    };
    Ok((vfio, Some(tap)))
}

/// What QEMU itself may reach: when it serves 9p shares, only those.
fn qemu_confinement(prepared: &Prepared, store: &Path) -> crate::confine::Confinement {
    let nine_p: Vec<&Path> = prepared
        .spec
        .shares
        .iter()
        .filter(|s| s.virtiofsd.is_none())
        .map(|s| s.path.as_path())
        .collect();
    if nine_p.is_empty() {
        return crate::confine::Confinement::default();
    }
    // Not root, the store is hidden in a user namespace that maps only
    // the caller's ids: QEMU then serves the root tree too, and a tree
    // the caller does not own (root's, `--rootfs /`) would lose its
    // owners (no set-uid sudo): such a run goes without that.
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::geteuid();
    let foreign = !uid.is_root()
        && std::fs::metadata(&prepared.rootfs).is_ok_and(|m| m.uid() != uid.as_raw());
    if foreign {
        tracing::warn!(
            "9p as a normal user on {} (not yours): the rootfs store is not hidden from the guest (virtiofs hides it)",
            prepared.rootfs.display()
        );
    }
    let c = crate::confine::Confinement::new(&nine_p, (!foreign).then_some(store));
    if matches!(prepared.spec.net, Net::BridgeHelper { .. }) {
        c.keeping_setid_exec()
    } else {
        c
    }
}

/// The run's status: the guest command's (exec mode), else 0 when QEMU
/// ended well; a failing boot script is reported, not left for the log to hide.
fn outcome(
    prepared: &Prepared,
    status: std::process::ExitStatus,
    exit_line: &str,
    qemu_stderr: &str,
) -> Result<i32, RunError> {
    if !prepared.exec {
        if status.success() {
            return Ok(0);
        }
        // QEMU's own error (a bad --qemu-arg, a device it lacks): its
        // stderr was piped away from the console, so say it here.
        return Err(RunError::QemuFailed {
            status,
            stderr: qemu_stderr.into(),
        });
    }
    let log = match &prepared.spec.console {
        Console::Log(p) => p.clone(),
        Console::Interactive => PathBuf::new(),
    };
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    if let Some(line) = console
        .lines()
        .find(|l| l.contains("mkt-init: boot script") && l.contains("FAILED"))
    {
        eprintln!(
            "mkt: warning: {} (console log: {})",
            line.trim_start_matches("mkt-init: "),
            log.display()
        );
    }
    if let Some(guest::plan::Exit(code)) = guest::plan::Exit::decode(exit_line) {
        return Ok(code);
    }
    Err(RunError::NoStatus {
        qemu: format!("QEMU {status}{}", stderr_tail(qemu_stderr)),
        console,
        log,
    })
}

/// `mkt test`: the setup's test script as the user, in the running VM of
/// the setup (over ssh) or in a fresh command-mode boot; TEST PASSED/FAILED.
pub fn test(
    config: &Config,
    paths: &Paths,
    setup: Option<String>,
    script: Option<PathBuf>,
    quiet: bool,
) -> anyhow::Result<i32> {
    let name = setup
        .or_else(|| config.defaults.setup.clone())
        .ok_or_else(|| {
            anyhow::anyhow!("no setup: name one, or set defaults.setup in the config")
        })?;
    let s = config
        .setups
        .get(&name)
        .ok_or_else(|| RunError::NoSetup(name.clone(), String::new()))?;
    let script = script.or_else(|| s.test.clone()).ok_or_else(|| {
        anyhow::anyhow!("setup {name:?} has no `test` script in the config (or pass --script FILE)")
    })?;
    check_boot_script(&script).map_err(|e| match e {
        RunError::BootScript(p, why) => anyhow::anyhow!("test script {}: {why}", p.display()),
        e => e.into(),
    })?;
    let script = std::fs::canonicalize(&script)?;
    let command = vec![script.display().to_string()];
    let running = control::running_vms(&paths.runtime_dir)?
        .into_iter()
        .any(|r| r.name == name && r.ssh_port.is_some());
    let code = if running {
        // The script's directory need not be shared with the running VM:
        // its content goes over ssh's stdin into a temp file there.
        let file = std::fs::File::open(&script)?;
        ssh_with_stdin(
            paths,
            Some(&name),
            &remote_script_command(&script),
            Some(file),
            quiet,
        )?
    } else {
        let opts = RunOptions {
            setup: Some(name.clone()),
            command,
            // The script must be visible in the guest at its host path.
            dirs: script.parent().map(Path::to_path_buf).into_iter().collect(),
            quiet,
            ..RunOptions::default()
        };
        run(&opts, config, paths)?
    };
    if code == 0 {
        println!("TEST PASSED ({name}: {})", script.display());
        Ok(0)
    } else {
        println!("TEST FAILED ({name}: {} exited {code})", script.display());
        Ok(1)
    }
}

/// The guest command that saves its stdin as the script (same file name)
/// in a temp dir, runs it with stdin from /dev/null, and exits with its status.
pub(crate) fn remote_script_command(script: &Path) -> Vec<String> {
    let name = script
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "test".into());
    let body = "d=$(mktemp -d) || exit 125; f=\"$d/$1\"; \
                if cat > \"$f\" && chmod 755 \"$f\"; then \"$f\" < /dev/null; s=$?; else s=125; fi; \
                rm -rf \"$d\"; exit $s";
    vec![
        "sh".into(),
        "-c".into(),
        body.into(),
        "mkt-test".into(),
        name,
    ]
}

#[cfg(test)]
mod tests {

    #[test]
    fn reload_runs_the_guest_tool_then_the_command_word_for_word() {
        let cmd: Vec<String> = ["printf", "%s|", "a  b", "$HOME"].map(String::from).into();
        assert_eq!(
            reload_command(&cmd),
            [
                "sh",
                "-c",
                "/usr/local/bin/mkt modules-reload >&2 || exit; exec \"$@\"",
                "mkt-reload",
                "printf",
                "%s|",
                "a  b",
                "$HOME"
            ]
        );
        assert_eq!(
            reload_command(&[]),
            ["sh", "-c", "/usr/local/bin/mkt modules-reload >&2"]
        );
    }

    use super::cmdline::{gdb_nokaslr, tsc_word};
    use super::error::last_lines;
    use super::prepare::*;
    use super::script::check_boot_script;
    use super::*;
    use crate::config::InitMode;
    use crate::guest::{FsKind, Mode};
    use crate::vm::qemu::Profile;

    #[test]
    fn interactive_default_is_the_shell_when_the_tree_has_one() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("lib/systemd")).unwrap();
        std::fs::write(r.join("lib/systemd/systemd"), "").unwrap();
        // systemd only: the tree's init.
        assert_eq!(interactive_mode(None, r), Mode::Systemd);
        std::fs::create_dir_all(r.join("bin")).unwrap();
        std::fs::write(r.join("bin/sh"), "").unwrap();
        assert_eq!(interactive_mode(None, r), Mode::Shell);
        assert_eq!(interactive_mode(Some(InitMode::Systemd), r), Mode::Systemd);
        assert_eq!(interactive_mode(Some(InitMode::Shell), r), Mode::Shell);
    }

    #[test]
    fn boot_modules_are_only_the_chosen_file_systems_and_bus() {
        use qemu::Bus;
        for bus in [Bus::Pci, Bus::Mmio] {
            let v = boot_module_names(FsKind::Virtiofs, bus);
            let p = boot_module_names(FsKind::NineP, bus);
            for m in ["virtio_pci", "virtio_console", "virtio_net", "overlay"] {
                assert!(v.contains(&m) && p.contains(&m), "{m}");
            }
            assert!(v.contains(&"virtiofs"));
            assert!(!v.contains(&"9p") && !v.contains(&"9pnet_virtio"), "{v:?}");
            assert!(p.contains(&"9p") && p.contains(&"9pnet_virtio"));
            assert!(!p.contains(&"virtiofs"), "{p:?}");
            // microvm's devices are virtio-mmio; q35's are all PCI.
            assert_eq!(v.contains(&"virtio_mmio"), bus == Bus::Mmio, "{bus:?}");
            assert_eq!(p.contains(&"virtio_mmio"), bus == Bus::Mmio, "{bus:?}");
        }
    }

    #[test]
    fn generated_paths_go_through_the_trees_relative_first_link() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("usr/lib/modules")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        std::os::unix::fs::symlink("/usr/bin", r.join("bin")).unwrap();
        std::os::unix::fs::symlink("../x", r.join("up")).unwrap();
        let f = |p: &str| through_tree_link(r, Path::new(p));
        assert_eq!(
            f("/lib/modules/6.1/kernel/a.ko"),
            Path::new("/usr/lib/modules/6.1/kernel/a.ko")
        );
        assert_eq!(f("/lib"), Path::new("/usr/lib"));
        // Real directories, absolute or upward links, missing names: as given.
        assert_eq!(f("/etc/passwd"), Path::new("/etc/passwd"));
        assert_eq!(f("/bin/x"), Path::new("/bin/x"));
        assert_eq!(f("/up/x"), Path::new("/up/x"));
        assert_eq!(f("/nope/x"), Path::new("/nope/x"));
        assert_eq!(f("relative/x"), Path::new("relative/x"));
    }

    #[test]
    fn a_disk_image_that_cannot_be_made_is_not_left_behind() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("nvme/run.img");
        // 2^44 MiB is more than any file can be.
        let e = ensure_disk(&img, 1 << 44).unwrap_err().to_string();
        assert!(e.contains("run.img"), "{e}");
        assert!(!img.exists(), "an empty image was left");
        // An existing image is never removed, even when growing it fails.
        ensure_disk(&img, 1).unwrap();
        assert!(ensure_disk(&img, 1 << 44).is_err());
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    }

    #[test]
    fn microvm_under_tcg_gets_the_host_tsc_frequency() {
        use crate::host::kvm::Accel;
        let load = |n: &str| Profile::load(n, None).unwrap();
        let w = |ws: &[&str]| ws.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // (profile, accelerator, --append, host TSC kHz, word mkt adds)
        type Case = (
            &'static str,
            Accel,
            &'static [&'static str],
            Option<u64>,
            Option<&'static str>,
        );
        let cases: &[Case] = &[
            (
                "microvm",
                Accel::Tcg,
                &[],
                Some(2596000),
                Some("tsc_early_khz=2596000"),
            ),
            // KVM has kvmclock; other machines have HPET and the PM timer.
            ("microvm", Accel::Kvm, &[], Some(2596000), None),
            ("default", Accel::Tcg, &[], Some(2596000), None),
            ("iommu", Accel::Tcg, &[], Some(2596000), None),
            // The user's own value wins; one after `--` is init's, not the kernel's.
            (
                "microvm",
                Accel::Tcg,
                &["tsc_early_khz=1"],
                Some(2596000),
                None,
            ),
            (
                "microvm",
                Accel::Tcg,
                &["--", "tsc_early_khz=1"],
                Some(7),
                Some("tsc_early_khz=7"),
            ),
            // Not measurable: nothing added (the kernel calibrates as it can).
            ("microvm", Accel::Tcg, &[], None, None),
        ];
        for (name, accel, append, host, want) in cases {
            let got = tsc_word(&load(name), accel, &w(append), || *host);
            assert_eq!(got.as_deref(), *want, "{name} {accel:?} {append:?}");
        }
    }

    #[test]
    fn gdb_adds_nokaslr_before_init_words_unless_asked_otherwise() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["console=ttyS0"], &["console=ttyS0", "nokaslr"]),
            (&["a", "--", "x"], &["a", "nokaslr", "--", "x"]),
            (&["kaslr"], &["kaslr"]),
            (&["nokaslr", "b"], &["nokaslr", "b"]),
            // After `--` it is init's word, not the kernel's.
            (&["--", "kaslr"], &["nokaslr", "--", "kaslr"]),
        ];
        for (given, want) in cases {
            let mut a: Vec<String> = given.iter().map(|s| s.to_string()).collect();
            gdb_nokaslr(&mut a);
            assert_eq!(a, *want, "{given:?}");
        }
    }

    #[test]
    fn boot_script_must_be_executable_with_shebang() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("boot.sh");
        std::fs::write(&s, "echo hi\n").unwrap();
        let e = check_boot_script(&s).unwrap_err().to_string();
        assert!(e.contains("not an executable"), "{e}");
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_boot_script(&s).unwrap_err().to_string();
        assert!(e.contains("#!"), "{e}");
        std::fs::write(&s, "#!/bin/sh\necho hi\n").unwrap();
        check_boot_script(&s).unwrap();
    }

    #[test]
    fn last_lines_quotes_the_panic() {
        let console = "a\nb\nKernel panic - not syncing: No init found\nc\n";
        let s = last_lines(console);
        assert!(
            s.starts_with("\nKernel panic - not syncing: No init found"),
            "{s}"
        );
        assert!(s.contains("last console lines:\na\nb"));
    }
}
