//! What a guest can and cannot do, end to end with real boots (TCG): the
//! devices a program expects (/dev/pts, /dev/shm), SSH into a shell-mode
//! guest running exactly the argv given, `mkt test` and `mkt
//! modules-reload` against a running VM, and the limits of shared
//! directories (no set-id files or device nodes planted on the host, the
//! rootfs store out of the guest's reach). As root and, where the path
//! differs, as the unprivileged test user.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The rootfs fixture and `--kernel ... [--modules ...]` for a kernel with
/// virtiofs: Debian's cloud kernel (the default path's kind of kernel).
fn cloud() -> Option<(PathBuf, Vec<String>)> {
    let rootfs = common::rootfs()?;
    common::program("qemu-system-x86_64")?;
    if mkt::host::probe::find_program("virtiofsd").is_none() {
        return common::unavailable("virtiofsd (cargo install virtiofsd)");
    }
    let ck = common::cloud_kernel()?;
    let (image, modules, _) = common::cloud_image(&ck);
    let args = vec![
        "--kernel".into(),
        image.display().to_string(),
        "--modules".into(),
        modules.display().to_string(),
    ];
    Some((rootfs, args))
}

/// The rootfs fixture and the fixture kernel tree (it has 9p).
fn tree() -> Option<(PathBuf, Vec<String>)> {
    let rootfs = common::rootfs()?;
    common::program("qemu-system-x86_64")?;
    let tree = common::kernel_tree()?;
    Some((rootfs, vec!["--kernel".into(), tree.display().to_string()]))
}

fn chown_to(p: &Path, user: Option<&common::TestUser>) {
    if let Some(u) = user {
        nix::unistd::chown(p, Some(u.uid.into()), Some(u.gid.into())).unwrap();
    }
}

fn write_file(p: &Path, body: &str, mode: u32, user: Option<&common::TestUser>) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, body).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    chown_to(p, user);
}

/// `mkt run --rootfs ROOTFS KERNEL_ARGS EXTRA -- sh -c SCRIPT` in `home`,
/// after the shared guest check (every CPU, no taint, no warning), which is
/// asserted here and taken out of the stderr returned.
fn run_sh(
    user: Option<&common::TestUser>,
    home: &Path,
    rootfs: &Path,
    kernel: &[String],
    extra: &[&str],
    script: &str,
) -> Output {
    let mut o = common::mkt_as(user, home)
        .arg("run")
        .arg("--rootfs")
        .arg(rootfs)
        .args(kernel)
        .args(extra)
        .arg("--")
        .args(common::guest_checked(&["sh", "-c", script]))
        .current_dir(home)
        .output()
        .expect("spawn mkt");
    let err = text(&o.stderr);
    o.stderr = common::assert_guest_clean(&err, host_cpus()).into_bytes();
    o
}

/// The CPUs a VM gets by default (mkt gives it the host's).
fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// The user the guest runs commands as.
fn users() -> Vec<Option<common::TestUser>> {
    let mut v = vec![None];
    if let Some(Some(u)) = common::unprivileged_user() {
        v.push(Some(u));
    }
    v
}

#[test]
fn command_mode_has_ptys_shared_memory_and_a_root_shadow_shadow() {
    let Some((rootfs, kernel)) = cloud() else {
        return;
    };
    for user in users() {
        let user = user.as_ref();
        let home = common::temp_home(user);
        // A pty (sudo's use_pty, script, ssh -t) needs /dev/pts; Python's
        // multiprocessing needs /dev/shm for its semaphores.
        let script = "stat -c %U:%G:%a /etc/shadow; \
            script -qc 'tty > /tmp/tty; sudo -n id -u > /tmp/id' /dev/null > /dev/null; \
            cut -c1-9 /tmp/tty; cat /tmp/id; \
            python3 -c 'import multiprocessing as m; print(m.Pool(2).map(abs, [-1, -2]))'";
        let o = run_sh(user, home.path(), &rootfs, &kernel, &[], script);
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        assert_eq!(o.status.code(), Some(0), "{out}{err}");
        assert_eq!(out, "root:shadow:640\n/dev/pts/\n0\n[1, 2]\n", "{err}");
    }
}

/// Regular files with a set-id bit and device nodes under `dir`.
fn planted(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.path().symlink_metadata().unwrap();
            let kind = m.mode() & libc::S_IFMT;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.mode() & 0o6000 != 0 || kind == libc::S_IFCHR || kind == libc::S_IFBLK {
                found.push(format!("{} {:o}", e.path().display(), m.mode()));
            }
        }
    }
    found
}

/// The guest's root tries every way to leave a set-id file or a device
/// node in the shared home and a --dir share: set-uid root when mkt runs
/// as root, set-uid to the user otherwise (another local user could run it).
fn no_planting(rootfs: &Path, kernel: &[String], fs: Option<&str>) {
    for user in users() {
        let user = user.as_ref();
        let home = common::temp_home(user);
        let dir = tempfile::tempdir().unwrap();
        chown_to(dir.path(), user);
        let d = dir.path().display().to_string();
        let h = home.path().display();
        let script = format!(
            "sudo -n sh -c 'for at in {h} {d}; do cd $at || exit 9; \
             cp /bin/true t; chmod u+s t; chmod g+s t; chmod 6755 t; \
             install -m 4755 /bin/true u; \
             mknod c c 1 3; mknod b b 7 0; mknod p p; \
             mkdir sd; chmod g+s sd; cp -p /usr/bin/sudo .; \
             done'; echo done"
        );
        let mut extra = vec!["--dir", d.as_str()];
        if let Some(fs) = fs {
            extra.extend(["--fs", fs]);
        }
        let o = run_sh(user, home.path(), rootfs, kernel, &extra, &script);
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        assert_eq!(out, "done\n", "{err}");
        for at in [home.path(), dir.path()] {
            let bad = planted(at);
            assert!(bad.is_empty(), "planted on the host: {bad:?}\n{err}");
            // The harmless parts still work: files, modes, fifos (QEMU's
            // 9p makes none, with or without mkt's filter: ENXIO).
            assert!(at.join("t").is_file(), "{err}");
            assert_eq!(
                std::fs::metadata(at.join("t")).unwrap().mode() & 0o7777,
                0o755
            );
            if fs != Some("9p") {
                let kind = std::fs::symlink_metadata(at.join("p")).unwrap().mode() & libc::S_IFMT;
                assert_eq!(kind, libc::S_IFIFO, "{err}");
            }
        }
    }
}

#[test]
fn guest_cannot_plant_setid_files_or_devices_over_virtiofs() {
    let Some((rootfs, kernel)) = cloud() else {
        return;
    };
    no_planting(&rootfs, &kernel, None);
}

#[test]
fn guest_cannot_plant_setid_files_or_devices_over_9p() {
    let Some((rootfs, kernel)) = tree() else {
        return;
    };
    no_planting(&rootfs, &kernel, Some("9p"));
}

/// The guest (as the user and with sudo) tries to change a stored tree
/// under the shared home, and to move the store away and put its own in
/// place; the host's store stays as it was.
fn store_out_of_reach(
    rootfs: &Path,
    kernel: &[String],
    fs: Option<&str>,
    users: Vec<Option<common::TestUser>>,
) {
    for user in users {
        let user = user.as_ref();
        let home = common::temp_home(user);
        let store = home.path().join(".local/share/mkt/rootfs");
        let tree = store.join("victim");
        write_file(&tree.join("etc/os-release"), "ID=victim\n", 0o644, user);
        for d in [
            home.path().join(".local"),
            home.path().join(".local/share"),
            home.path().join(".local/share/mkt"),
            store.clone(),
            tree.clone(),
            tree.join("etc"),
        ] {
            chown_to(&d, user);
        }
        let before = common::tree_digest(&store);
        let s = store.display().to_string();
        let script = format!(
            "echo x > {s}/victim/etc/os-release; touch {s}/victim/new; rm -rf {s}/victim/etc; \
             sudo sh -c 'echo x > {s}/victim/etc/os-release; touch {s}/victim/new; rm -rf {s}/victim/etc'; \
             for m in {s} $HOME/.local/share/mkt $HOME/.local/share $HOME/.local; do mv $m $m.moved; done; \
             sudo mv $HOME/.local $HOME/.local.moved; \
             echo home-writable > $HOME/ok; echo done"
        );
        let mut extra = vec![];
        if let Some(fs) = fs {
            extra.extend(["--fs", fs]);
        }
        let o = run_sh(user, home.path(), rootfs, kernel, &extra, &script);
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        assert_eq!(out, "done\n", "{err}");
        assert!(
            before == common::tree_digest(&store),
            "the guest changed the store:\n{err}"
        );
        assert_eq!(
            std::fs::read_to_string(home.path().join("ok")).unwrap(),
            "home-writable\n"
        );
    }
}

#[test]
fn guest_cannot_change_the_rootfs_store_over_virtiofs() {
    let Some((rootfs, kernel)) = cloud() else {
        return;
    };
    store_out_of_reach(&rootfs, &kernel, None, users());
}

#[test]
fn guest_cannot_change_the_rootfs_store_over_9p() {
    let Some((rootfs, kernel)) = tree() else {
        return;
    };
    // As root only: over 9p a normal user's QEMU hides the store only for
    // a tree of its own, and the fixture tree is root's.
    store_out_of_reach(&rootfs, &kernel, Some("9p"), vec![None]);
}

#[test]
fn an_ssh_port_is_advertised_only_with_an_sshd() {
    let Some((rootfs, kernel)) = cloud() else {
        return;
    };
    let home = common::temp_home(None);
    let bare = tempfile::tempdir().unwrap();
    let dry = |r: &Path| {
        let o = common::mkt(home.path())
            .arg("run")
            .arg("--rootfs")
            .arg(r)
            .args(&kernel)
            .args(["--init", "shell", "--dry-run"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stdout)
    };
    assert!(dry(&rootfs).contains("hostfwd=tcp:127.0.0.1:"));
    let out = dry(bare.path());
    assert!(!out.contains("hostfwd"), "{out}");
}

/// `mkt ARGS` with the config, as `user`.
fn mkt_cfg(user: Option<&common::TestUser>, home: &Path, cfg: &Path, args: &[&str]) -> Output {
    common::mkt_as(user, home)
        .args(args)
        .env("MKT_CONFIG", cfg)
        .current_dir(home)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn shell_mode_serves_ssh_running_the_exact_argv_tests_and_the_guest_tool() {
    let Some((rootfs, kernel)) = cloud() else {
        return;
    };
    shell_mode_case(&rootfs, &kernel, None);
}

#[test]
fn shell_mode_serves_ssh_running_the_exact_argv_tests_and_the_guest_tool_rootless() {
    let Some((rootfs, kernel)) = cloud() else {
        return;
    };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    if user.is_none() {
        eprintln!("SKIP: not root; the other shell-mode test already runs unprivileged");
        return;
    }
    shell_mode_case(&rootfs, &kernel, user.as_ref());
}

fn shell_mode_case(rootfs: &Path, kernel: &[String], user: Option<&common::TestUser>) {
    let home = common::temp_home(user);
    // The host's own `mkt` first on the guest's PATH (the home is shared),
    // as a ~/.bashrc that puts ~/bin first does.
    write_file(
        &home.path().join("bin/mkt"),
        "#!/bin/sh\necho HOST-MKT-RAN\nexit 0\n",
        0o755,
        user,
    );
    chown_to(&home.path().join("bin"), user);
    write_file(
        &home.path().join(".bashrc"),
        "PATH=$HOME/bin:$PATH\n",
        0o644,
        user,
    );
    // Test scripts in a directory the VM does not share.
    let scripts = tempfile::tempdir().unwrap();
    std::fs::set_permissions(scripts.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ok = scripts.path().join("ok.sh");
    write_file(
        &ok,
        "#!/bin/sh\necho checking $(hostname) in $0\n",
        0o755,
        user,
    );
    let bad = scripts.path().join("bad.sh");
    write_file(&bad, "#!/bin/sh\necho broken >&2\nexit 3\n", 0o755, user);
    let cfg = home.path().join("mkt.toml");
    write_file(
        &cfg,
        &format!(
            "[setup.sh1]\nrootfs = \"{}\"\nkernel = \"{}\"\ntest = \"{}\"\n",
            rootfs.display(),
            kernel[1],
            ok.display()
        ),
        0o644,
        user,
    );
    let mut vm = common::mkt_as(user, home.path())
        .args(["run", "sh1", "--init", "shell"])
        .args(&kernel[2..])
        .env("MKT_CONFIG", &cfg)
        .current_dir(home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(vm.stderr.take().unwrap());
    let mut port_line = String::new();
    use std::io::BufRead;
    while stderr.read_line(&mut port_line).unwrap() > 0 && !port_line.contains("ssh on") {}
    // Everything runs before the asserts, so the VM is stopped whatever fails.
    // At once, while the guest still boots: `mkt ssh` waits for the guest to
    // say its sshd listens (no retry loop here). With the guest check.
    let mut first_args = vec!["ssh", "sh1", "--"];
    let checked = common::guest_checked(&["true"]);
    first_args.extend(checked.iter().map(String::as_str));
    let first = mkt_cfg(user, home.path(), &cfg, &first_args);
    let exit3 = mkt_cfg(
        user,
        home.path(),
        &cfg,
        &["ssh", "sh1", "--", "sh", "-c", "exit 3"],
    );
    let words = mkt_cfg(
        user,
        home.path(),
        &cfg,
        &[
            "ssh", "sh1", "--", "printf", "%s|", "a  b", "$HOME", "it's", "", "*", "A=1",
        ],
    );
    let attach = mkt_cfg(
        user,
        home.path(),
        &cfg,
        &["run", "sh1", "--", "sh", "-c", "echo attached; exit 4"],
    );
    let passed = mkt_cfg(user, home.path(), &cfg, &["test", "sh1"]);
    let failed = mkt_cfg(
        user,
        home.path(),
        &cfg,
        &["test", "sh1", "--script", bad.to_str().unwrap()],
    );
    let reload = mkt_cfg(user, home.path(), &cfg, &["modules-reload", "sh1"]);
    let sudo = mkt_cfg(
        user,
        home.path(),
        &cfg,
        &["ssh", "sh1", "--", "sudo", "-n", "id", "-un"],
    );
    let ps = mkt_cfg(user, home.path(), &cfg, &["ps", "--json"]);
    let stop = mkt_cfg(user, home.path(), &cfg, &["stop", "sh1", "--force"]);
    let _ = vm.wait();

    assert!(port_line.contains("ssh on 127.0.0.1:"), "{port_line}");
    assert!(
        first.status.success(),
        "the first mkt ssh, right after the port was advertised: {}",
        text(&first.stderr)
    );
    common::assert_guest_clean(&text(&first.stderr), host_cpus());
    assert_eq!(exit3.status.code(), Some(3), "{}", text(&exit3.stderr));
    assert_eq!(text(&words.stdout), "a  b|$HOME|it's||*|A=1|");
    assert_eq!(attach.status.code(), Some(4), "{}", text(&attach.stderr));
    assert_eq!(text(&attach.stdout), "attached\n");
    let out = text(&passed.stdout);
    assert_eq!(
        passed.status.code(),
        Some(0),
        "{out}{}",
        text(&passed.stderr)
    );
    assert!(
        out.contains("checking sh1 in ") && out.contains("/ok.sh\n") && out.contains("TEST PASSED"),
        "{out}"
    );
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        text(&failed.stdout).contains("TEST FAILED") && text(&failed.stdout).contains("exited 3"),
        "{}",
        text(&failed.stdout)
    );
    assert!(text(&failed.stderr).contains("broken"));
    // The guest's own tool ran (a distro kernel has no tree modules to
    // reload), not the host's mkt from the shared home.
    let (rout, rerr) = (text(&reload.stdout), text(&reload.stderr));
    assert!(!rout.contains("HOST-MKT-RAN"), "{rout}");
    assert!(
        rerr.contains("/etc/mkt/modules.boot missing"),
        "{rout}{rerr}"
    );
    assert_eq!(text(&sudo.stdout), "root\n", "{}", text(&sudo.stderr));
    let ps: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    let port: u64 = port_line
        .trim()
        .rsplit(':')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ps[0]["ssh_port"], port, "{ps}");
    assert!(stop.status.success(), "{}", text(&stop.stderr));
}

#[test]
fn sudo_on_the_shell_mode_console_gets_a_pty() {
    let Some((rootfs, kernel)) = cloud() else {
        return;
    };
    for user in users() {
        let user = user.as_ref();
        let home = common::temp_home(user);
        let mut vm = common::mkt_as(user, home.path())
            .arg("run")
            .arg("--rootfs")
            .arg(&rootfs)
            .args(&kernel)
            .args(["--init", "shell", "--net", "none"])
            .current_dir(home.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Typed on the serial console once the shell's prompt shows; the
        // shell's exit powers the guest off.
        let console = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut out = vm.stdout.take().unwrap();
        let sink = console.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut stdin = vm.stdin.take();
        while vm.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = vm.kill();
                break;
            }
            if stdin.is_some() && text(&console.lock().unwrap()).contains("@mkt:") {
                use std::io::Write;
                let mut s = stdin.take().unwrap();
                s.write_all(b"sudo -n id -u > $HOME/console-sudo 2>&1; exit\n")
                    .unwrap();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let o = vm.wait_with_output().unwrap();
        reader.join().unwrap();
        let got = std::fs::read_to_string(home.path().join("console-sudo")).unwrap_or_default();
        assert_eq!(
            got,
            "0\n",
            "console:\n{}{}",
            text(&console.lock().unwrap()),
            text(&o.stderr)
        );
    }
}

/// What a console session saw: the console bytes, `mkt ssh -- true`'s
/// result (when the VM advertised a port), and the file the typed keys wrote.
struct Session {
    console: String,
    ssh: Option<Output>,
    file: String,
}

/// Starts `vm` (an interactive `mkt run`) on a pty of `rows`x`cols` with
/// TERM=xterm-256color, as a terminal user would; waits for `prompt` on the
/// console, tries `mkt ssh -- true` (through `ssh`) when a port shows, then
/// types `keys` (which must end the VM) and reads back `file`.
/// Keys to type on the console: once `after` (when given) is a non-empty
/// file, with the terminal first resized to `resize` (when given).
struct Step<'a> {
    after: Option<&'a Path>,
    resize: Option<(u16, u16)>,
    keys: &'a str,
}

fn console_session(
    mut vm: std::process::Command,
    prompt: &str,
    steps: &[Step],
    ssh: impl Fn() -> Output,
    file: &Path,
) -> Session {
    use std::io::{BufRead, Write};
    let ws = nix::pty::Winsize {
        ws_row: 37,
        ws_col: 111,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid and ioctl are async-signal-safe. The pty becomes mkt's
    // controlling terminal, as a terminal emulator's is: resizes send SIGWINCH.
    unsafe {
        vm.pre_exec(|| {
            nix::unistd::setsid()?;
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = vm
        .env("TERM", "xterm-256color")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(slave);
    let master = std::fs::File::from(pty.master);
    let console = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = console.clone();
    let mut reader_end = master.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // EIO once the VM (the last holder of the slave) is gone.
        while let Ok(n) = std::io::Read::read(&mut reader_end, &mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let stderr = child.stderr.take().unwrap();
    let port = std::sync::Arc::new(std::sync::Mutex::new(false));
    let seen = port.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("ssh on 127.0.0.1:") {
                *seen.lock().unwrap() = true;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(200);
    let mut ssh_result = None;
    let mut next = 0;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        if ssh_result.is_none() && *port.lock().unwrap() {
            // Once, as soon as the port shows: `mkt ssh` waits for the
            // guest's sshd itself.
            ssh_result = Some(ssh());
        }
        let at_prompt = text(&console.lock().unwrap()).contains(prompt);
        if let Some(step) = steps.get(next)
            && at_prompt
            && (ssh_result.is_some() || !*port.lock().unwrap())
            && step
                .after
                .is_none_or(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
        {
            if let Some((rows, cols)) = step.resize {
                let ws = nix::pty::Winsize {
                    ws_row: rows,
                    ws_col: cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                use std::os::fd::AsRawFd;
                // SAFETY: the master fd is open and ws is a valid struct winsize.
                let r = unsafe { nix::libc::ioctl(master.as_raw_fd(), nix::libc::TIOCSWINSZ, &ws) };
                assert_eq!(r, 0, "resize the pty");
            }
            (&master).write_all(step.keys.as_bytes()).unwrap();
            next += 1;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // An interactive session that ended (not killed at the deadline)
    // exits 0 (docs/run.md, EXIT STATUS).
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "the interactive session's exit status: {status:?}; console:\n{}",
        text(&console.lock().unwrap())
    );
    // The reader ends when QEMU (the slave's last holder) is gone.
    let wait = Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() && Instant::now() < wait {
        std::thread::sleep(Duration::from_millis(100));
    }
    let console = text(&console.lock().unwrap());
    Session {
        console,
        ssh: ssh_result,
        file: std::fs::read_to_string(file).unwrap_or_default(),
    }
}

/// `mkt run` with no flags on the default tree: mkt's init brings up a
/// shell as the user on the console, with the host terminal's TERM and
/// size, a quiet console (dmesg keeps everything), and the tree's sshd.
fn default_interactive_case(user: Option<&common::TestUser>) {
    let Some(home) = common::home_with_default_rootfs(user) else {
        return;
    };
    let out = home.path().join("console-out");
    let first = home.path().join("console-size");
    // The size at start, then (after the host terminal is resized to 40x100)
    // the new size once it has come through, within 30 s.
    let keys = "{ id -un; cat ~/console-size; echo $TERM; cut -f1 /proc/sys/kernel/printk; \
                sudo -n dmesg | grep -c 'Linux version'; systemctl is-system-running; \
                for i in $(seq 150); do [ \"$(stty size)\" = '40 100' ] && break; sleep 0.2; done; \
                stty size; } > ~/console-out 2>&1; exit\n";
    let steps = [
        Step {
            after: None,
            resize: None,
            keys: "stty size > ~/console-size\n",
        },
        Step {
            after: Some(&first),
            resize: Some((40, 100)),
            keys,
        },
    ];
    let mut vm = common::mkt_as(user, home.path());
    vm.arg("run").current_dir(home.path());
    let h = home.path().to_path_buf();
    let s = console_session(
        vm,
        "@mkt:",
        &steps,
        || {
            common::mkt_as(user, &h)
                .args(["ssh", "--"])
                .args(common::guest_checked(&["true"]))
                .stdin(Stdio::null())
                .output()
                .unwrap()
        },
        &out,
    );
    let name = user.map_or("root".to_string(), |u| u.name.clone());
    let ssh = s.ssh.as_ref().expect("no SSH port advertised");
    assert!(
        ssh.status.success(),
        "mkt ssh -- true, right after the port was advertised: {}",
        text(&ssh.stderr)
    );
    common::assert_guest_clean(&text(&ssh.stderr), host_cpus());
    let lines: Vec<&str> = s.file.lines().collect();
    assert_eq!(
        lines.get(..5),
        Some(&[name.as_str(), "37 111", "xterm-256color", "4", "1"][..]),
        "{}\nconsole:\n{}",
        s.file,
        s.console
    );
    // No systemd: mkt's init is PID 1.
    assert_ne!(lines.get(5), Some(&"running"), "{}", s.file);
    // The host terminal's resize reached the console.
    assert_eq!(lines.get(6), Some(&"40 100"), "{}", s.file);
}

#[test]
fn default_interactive_mode_is_a_shell_with_the_host_terminal_and_ssh() {
    default_interactive_case(None);
}

#[test]
fn default_interactive_mode_is_a_shell_with_the_host_terminal_and_ssh_rootless() {
    let Some(Some(user)) = common::unprivileged_user() else {
        eprintln!("SKIP: no unprivileged test user");
        return;
    };
    default_interactive_case(Some(&user));
}

/// `--init systemd` on a tree whose recipe enabled a getty on hvc0 (every
/// shipped recipe does; QEMU has no hvc0): at the prompt systemd has no job
/// left waiting (no dev-hvc0.device), the terminal came through, and no
/// per-boot host key generation is set to run. Root only: the tree is the
/// fixture under an overlay with the recipe's symlink.
#[test]
fn systemd_mode_waits_for_no_console_it_lacks() {
    let Some((rootfs, kernel)) = tree() else {
        return;
    };
    let Some(tree) = with_hvc0_getty(&rootfs) else {
        return;
    };
    let merged = tree.merged.clone();
    let home = common::temp_home(None);
    let out = home.path().join("console-out");
    let keys = "{ systemctl list-jobs --no-pager; systemctl show -p LoadState serial-getty@hvc0.service; \
                stty size; echo $TERM; } > ~/console-out 2>&1; systemctl poweroff\n";
    let mut vm = common::mkt(home.path());
    vm.arg("run")
        .arg("--rootfs")
        .arg(&merged)
        .args(&kernel)
        .args(["--init", "systemd", "--net", "none"])
        .current_dir(home.path());
    let steps = [Step {
        after: None,
        resize: None,
        keys,
    }];
    let s = console_session(
        vm,
        "@mkt:",
        &steps,
        || unreachable!("--net none has no SSH port"),
        &out,
    );
    drop(tree);
    assert!(
        s.file.contains("No jobs running."),
        "{}\nconsole:\n{}",
        s.file,
        s.console
    );
    assert!(s.file.contains("LoadState=masked"), "{}", s.file);
    assert!(s.file.contains("37 111\nxterm-256color\n"), "{}", s.file);
}

/// The fixture rootfs under an overlay whose upper layer `fill` writes;
/// unmounted when dropped. Root only: None (SKIP, or a failure in CI) else.
struct Overlay {
    _work: tempfile::TempDir,
    merged: PathBuf,
}

impl Overlay {
    fn new(rootfs: &Path, fill: impl FnOnce(&Path)) -> Option<Overlay> {
        if !nix::unistd::getuid().is_root() {
            return common::unavailable("root (to overlay the fixture rootfs)");
        }
        let work = tempfile::tempdir().unwrap();
        let (upper, wdir, merged) = (
            work.path().join("upper"),
            work.path().join("work"),
            work.path().join("tree"),
        );
        for d in [&upper, &wdir, &merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        fill(&upper);
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            rootfs.display(),
            upper.display(),
            wdir.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(opts.as_str()),
        )
        .unwrap();
        Some(Overlay {
            _work: work,
            merged,
        })
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.merged, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The fixture rootfs with a getty enabled on hvc0, as every shipped recipe
/// has it (QEMU has no hvc0).
fn with_hvc0_getty(rootfs: &Path) -> Option<Overlay> {
    Overlay::new(rootfs, |upper| {
        let wants = upper.join("etc/systemd/system/getty.target.wants");
        std::fs::create_dir_all(&wants).unwrap();
        std::os::unix::fs::symlink(
            "/lib/systemd/system/serial-getty@.service",
            wants.join("serial-getty@hvc0.service"),
        )
        .unwrap();
    })
}

/// Starts an interactive `mkt run` (stdin closed) and returns it once it has
/// advertised its SSH port, with that stderr line.
fn start_with_ssh(mut vm: std::process::Command) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = vm
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let mut all = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        all.push_str(&line);
        if line.contains("ssh on 127.0.0.1:") {
            break;
        }
        line.clear();
    }
    // Keep draining, so mkt never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    assert!(line.contains("ssh on"), "no SSH port advertised:\n{all}");
    (child, line)
}

/// A tree whose sshd does not start: the first `mkt ssh` says so, naming
/// the cause, instead of waiting out its limit or failing as a bare
/// connection error (exit 255). Root only (an overlay of the fixture).
#[test]
fn mkt_ssh_says_when_the_guests_sshd_did_not_start() {
    let Some((rootfs, kernel)) = cloud() else {
        return;
    };
    let Some(tree) = Overlay::new(&rootfs, |upper| {
        write_file(
            &upper.join("usr/sbin/sshd"),
            "#!/bin/sh\necho sshd broken by the test >&2\nexit 1\n",
            0o755,
            None,
        );
    }) else {
        return;
    };
    let home = common::temp_home(None);
    let mut vm = common::mkt(home.path());
    vm.arg("run")
        .arg("--rootfs")
        .arg(&tree.merged)
        .args(&kernel)
        .args(["--init", "shell"])
        .current_dir(home.path());
    let (mut vm, _) = start_with_ssh(vm);
    let t0 = Instant::now();
    let o = common::mkt(home.path())
        .args(["ssh", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = t0.elapsed();
    let stop = common::mkt(home.path())
        .args(["stop", "--force"])
        .output()
        .unwrap();
    let _ = vm.wait();
    drop(tree);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("did not start") && err.contains("nothing listens on port 22"),
        "{err}"
    );
    assert!(took < Duration::from_secs(100), "took {took:?}: {err}");
    assert!(stop.status.success(), "{}", text(&stop.stderr));
}

/// `--init systemd` (the tree's systemd, its ssh.service): the first `mkt
/// ssh`, made as soon as the port is advertised, gets in (mkt waits for a
/// unit that says sshd listens); the boot script ran once multi-user was
/// reached, with no 90 s console wait before it; every CPU, no taint, no
/// warning. The fixture tree's recipe-style getty on hvc0 is added, as
/// every shipped recipe has it. Root only (an overlay of the fixture).
#[test]
fn systemd_mode_answers_ssh_at_once_and_runs_the_boot_script_on_time() {
    let Some((rootfs, kernel)) = cloud() else {
        return;
    };
    let Some(tree) = with_hvc0_getty(&rootfs) else {
        return;
    };
    let home = common::temp_home(None);
    let script = home.path().join("boot.sh");
    write_file(
        &script,
        "#!/bin/sh\ncut -d' ' -f1 /proc/uptime >> boot-script-uptime\n",
        0o755,
        None,
    );
    let mut vm = common::mkt(home.path());
    vm.arg("run")
        .arg("--rootfs")
        .arg(&tree.merged)
        .args(&kernel)
        .args(["--init", "systemd", "--boot-script"])
        .arg(&script)
        .current_dir(home.path());
    let (mut vm, _) = start_with_ssh(vm);
    let wait_script = "for i in $(seq 600); do [ -s ~/boot-script-uptime ] && break; sleep 0.2; done; \
                       cat ~/boot-script-uptime; systemctl is-active mkt-ssh-ready.service";
    let mut cmd = vec!["ssh", "--"];
    let checked = common::guest_checked(&["sh", "-c", wait_script]);
    cmd.extend(checked.iter().map(String::as_str));
    let o = common::mkt(home.path())
        .args(&cmd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stop = common::mkt(home.path())
        .args(["stop", "--force"])
        .output()
        .unwrap();
    let _ = vm.wait();
    drop(tree);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    common::assert_guest_clean(&err, host_cpus());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "the boot script ran once: {out}");
    let uptime: f64 = lines[0].parse().unwrap();
    // A console unit waiting for dev-hvc0.device holds the boot 90 s.
    assert!(uptime < 80.0, "boot script ran at {uptime} s of uptime");
    assert_eq!(lines[1], "active", "{out}");
    assert!(stop.status.success(), "{}", text(&stop.stderr));
}
