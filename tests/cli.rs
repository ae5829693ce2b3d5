//! The `mkt` binary end to end: exit codes, error chains, setup, doctor,
//! completions, man pages, and the docs staying in step with --help.

mod common;

use std::path::Path;
use std::process::Output;

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn run(c: &mut std::process::Command) -> (Output, String, String) {
    let o = c.output().expect("run mkt");
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    (o, out, err)
}

#[test]
fn usage_error_exits_2_and_names_the_flag() {
    let home = tempfile::tempdir().unwrap();
    let (o, _, err) = run(common::mkt(home.path()).args(["doctor", "--no-such-flag"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("--no-such-flag"), "{err}");
}

#[test]
fn help_and_version_exit_0() {
    let home = tempfile::tempdir().unwrap();
    let (o, out, _) = run(common::mkt(home.path()).arg("--help"));
    assert_eq!(o.status.code(), Some(0));
    for sub in ["setup", "doctor", "completions", "man"] {
        assert!(out.contains(sub), "--help lacks {sub}");
    }
    let (o, out, _) = run(common::mkt(home.path()).arg("--version"));
    assert!(o.status.success());
    assert!(out.starts_with("mkt "));
}

#[test]
fn bad_config_names_file_line_and_key_with_cause_chain() {
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[defaults]\nsrc = \"~/src\"\n\n[setup.cx5]\ncpu = 4\n",
    )
    .unwrap();
    let (o, _, err) = run(common::mkt(home.path())
        .args(["setup", "--config"])
        .arg(&cfg));
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.starts_with("mkt: error: "), "{err}");
    assert!(err.contains(&format!("{}:5:1", cfg.display())), "{err}");
    assert!(err.contains("`cpu`"), "{err}");
    // Nothing was created from a bad config.
    assert!(!home.path().join(".local/share/mkt").exists());
}

#[test]
fn missing_config_named_by_flag_or_env_is_an_error() {
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join("absent.toml");
    let (o, _, err) = run(common::mkt(home.path())
        .arg("setup")
        .env("MKT_CONFIG", &cfg));
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains(&cfg.display().to_string()), "{err}");
    assert!(err.contains("caused by:"), "the io cause is printed: {err}");
}

fn assert_setup_works(user: Option<&common::TestUser>) {
    let home = common::temp_home(user);
    let h = home.path();
    let (o, out, err) = run(common::mkt_as(user, h).arg("setup"));
    assert!(o.status.success(), "{out}{err}");
    let cfg = h.join(".config/mkt/config.toml");
    assert!(cfg.is_file(), "{out}");
    for d in [
        ".local/share/mkt/rootfs",
        ".local/share/mkt/blobs",
        ".local/state/mkt/logs/build",
        ".local/state/mkt/logs/ci",
        ".local/state/mkt/logs/run",
        ".local/state/mkt/logs/rootfs",
    ] {
        assert!(h.join(d).is_dir(), "{d} missing after setup");
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let run_dir = std::fs::metadata(h.join("run/mkt")).unwrap();
    assert_eq!(run_dir.permissions().mode() & 0o777, 0o700);
    if let Some(u) = user {
        assert_eq!(std::fs::metadata(&cfg).unwrap().uid(), u.uid);
        assert_eq!(run_dir.uid(), u.uid);
    }

    // An existing config is kept unless --force.
    std::fs::write(&cfg, "# mine\n").unwrap();
    let (o, out, _) = run(common::mkt_as(user, h).arg("setup"));
    assert!(o.status.success());
    assert!(out.contains("kept"), "{out}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "# mine\n");
    let (o, _, _) = run(common::mkt_as(user, h).args(["setup", "--force"]));
    assert!(o.status.success());
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        mkt::config::starter_config()
    );
}

#[test]
fn setup_creates_dirs_and_keeps_existing_config() {
    assert_setup_works(None);
}

#[test]
fn setup_works_as_unprivileged_user() {
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    if user.is_none() {
        eprintln!("SKIP: not root; the other setup test already runs unprivileged");
        return;
    }
    assert_setup_works(user.as_ref());
}

#[test]
fn setup_lists_missing_prerequisites_with_install_commands() {
    let home = tempfile::tempdir().unwrap();
    // An empty PATH: every prerequisite is missing.
    let empty = tempfile::tempdir().unwrap();
    let (o, out, err) = run(common::mkt(home.path())
        .arg("setup")
        .env("PATH", empty.path()));
    assert!(o.status.success(), "{err}");
    assert!(out.contains("qemu-system-x86_64 [required]"), "{out}");
    assert!(
        out.contains("sudo apt-get install -y qemu-system-x86"),
        "{out}"
    );
    assert!(
        out.contains("sudo dnf install -y qemu-system-x86-core"),
        "{out}"
    );
}

/// `mkt doctor --json` as `user`; its exit status must be what the report
/// says: 1 when a required check is not ok, else 0.
fn doctor_json(user: Option<&common::TestUser>) -> Vec<serde_json::Value> {
    let home = common::temp_home(user);
    let (o, out, err) = run(common::mkt_as(user, home.path()).args(["doctor", "--json"]));
    let checks: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"));
    let failed: Vec<&serde_json::Value> = checks
        .iter()
        .filter(|c| c["required"] == true && c["status"] != "ok")
        .collect();
    let want = if failed.is_empty() { 0 } else { 1 };
    assert_eq!(
        o.status.code(),
        Some(want),
        "required checks not ok: {failed:?}\n{err}"
    );
    checks
}

fn check<'a>(checks: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

#[test]
fn doctor_reports_every_capability() {
    let checks = doctor_json(None);
    for name in [
        "qemu",
        "accel",
        "userns",
        "subids",
        "overlay",
        "virtiofsd",
        "ccache",
        "iommu",
        "vfio-pci",
        "bridge",
    ] {
        let c = check(&checks, name);
        let status = c["status"].as_str().unwrap();
        assert!(["ok", "missing", "unusable"].contains(&status), "{c}");
        if status != "ok" {
            assert!(
                c["fix"].is_string(),
                "{name} is {status} without a fix: {c}"
            );
        }
    }
}

/// doctor's accel line says which accelerator and why, word for word:
/// from the CPU flags where they decide (this machine class), else from
/// the device node or the probe's verdict.
#[test]
fn doctor_says_which_accelerator_and_why() {
    let home = tempfile::tempdir().unwrap();
    let (_, out, _) = run(common::mkt(home.path()).arg("doctor"));
    let line = out
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("accel"))
        .unwrap_or_else(|| panic!("no accel line:\n{out}"));
    let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
    let probe = mkt::host::kvm::probe_using(Path::new(env!("CARGO_BIN_EXE_mkt")));
    let want = if !common::cpu_has_virt() {
        format!(
            "unusable accel KVM unusable ({}), using TCG",
            common::NO_VMX
        )
    } else if !Path::new("/dev/kvm").exists() {
        "unusable accel KVM unusable (/dev/kvm does not exist), using TCG".to_string()
    } else if probe.usable {
        "ok accel KVM usable".to_string()
    } else {
        format!("unusable accel KVM unusable ({}), using TCG", probe.reason)
    };
    assert_eq!(line, want, "{out}");
}

/// The probe's test guest runs in mkt itself (`mkt kvm-test-guest DEV`,
/// hidden): on a real /dev/kvm (steps 1-4 passed with a CPU said to have
/// vmx, whatever this one has) the helper reports a verdict in time.
#[test]
fn kvm_test_guest_runs_in_mkt() {
    let dev = Path::new("/dev/kvm");
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        common::unavailable::<()>(&format!("/dev/kvm read-write ({e})"));
        return;
    }
    let mkt = Path::new(env!("CARGO_BIN_EXE_mkt"));
    let start = std::time::Instant::now();
    let p = mkt::host::kvm::probe_with("flags : vmx\n", dev, || {
        mkt::host::kvm::helper_command(mkt, dev)
    });
    let took = start.elapsed();
    assert!(took < std::time::Duration::from_secs(4), "{took:?}");
    assert!(!p.reason.contains("KVM test process"), "{p:?}");
}

#[test]
fn doctor_as_unprivileged_user_finds_user_namespaces() {
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let checks = doctor_json(user.as_ref());
    assert_eq!(check(&checks, "userns")["status"], "ok");
    assert_eq!(check(&checks, "qemu")["status"], "ok");
}

#[test]
fn completions_for_each_shell() {
    let home = tempfile::tempdir().unwrap();
    for (shell, needle) in [
        ("bash", "_mkt"),
        ("zsh", "#compdef mkt"),
        ("fish", "complete -c mkt"),
    ] {
        let (o, out, _) = run(common::mkt(home.path()).args(["completions", shell]));
        assert!(o.status.success());
        assert!(out.contains(needle), "{shell}: {out}");
        assert!(
            out.contains("doctor"),
            "{shell} completion lacks subcommands"
        );
    }
}

#[test]
fn man_pages_render_for_every_subcommand() {
    let home = tempfile::tempdir().unwrap();
    let (o, out, _) = run(common::mkt(home.path()).arg("man"));
    assert!(o.status.success());
    assert!(out.contains(".TH mkt 1"), "{out}");
    let dir = home.path().join("man");
    let (o, _, err) = run(common::mkt(home.path()).args(["man", "--out"]).arg(&dir));
    assert!(o.status.success(), "{err}");
    for page in [
        "mkt",
        "mkt-setup",
        "mkt-doctor",
        "mkt-completions",
        "mkt-man",
    ] {
        let t = std::fs::read_to_string(dir.join(format!("{page}.1"))).unwrap();
        assert!(t.contains(".TH"), "{page}");
    }
}

/// docs/<command>.md exists for every subcommand and mentions each of its
/// long options, so the docs cannot drift from --help unnoticed. (Hidden,
/// internal subcommands such as `kvm-test-guest` are no user's business.)
#[test]
fn docs_cover_every_subcommand_and_flag() {
    use clap::CommandFactory;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cmd = mkt::cli::Cli::command();
    let public = || cmd.get_subcommands().filter(|s| !s.is_hide_set());
    for sub in public() {
        let page = root.join(format!("docs/{}.md", sub.get_name()));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        for arg in sub.get_arguments() {
            if let Some(long) = arg.get_long() {
                if ["help", "version", "verbose", "quiet", "config"].contains(&long) {
                    continue;
                }
                assert!(
                    text.contains(&format!("--{long}")),
                    "{} does not document --{long}",
                    page.display()
                );
            }
        }
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for sub in public() {
        assert!(
            readme.contains(&format!("mkt {}", sub.get_name())),
            "README's table lacks {}",
            sub.get_name()
        );
    }
}

/// `mkt ARGS` with stdout a pipe whose reader is already gone (`| head`
/// that has exited): every write fails with EPIPE.
fn with_closed_stdout(c: &mut std::process::Command) -> (Output, String) {
    let (rd, wr) = nix::unistd::pipe().unwrap();
    drop(rd);
    let o = c
        .stdout(std::process::Stdio::from(wr))
        .output()
        .expect("run mkt");
    let err = text(&o.stderr);
    (o, err)
}

/// Ends as `cat` does on a closed pipe: by SIGPIPE, or done before
/// writing; never a panic (exit 101).
fn assert_quiet_on_closed_pipe(what: &str, o: &Output, err: &str) {
    use std::os::unix::process::ExitStatusExt;
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(
        o.status.signal() == Some(libc::SIGPIPE) || o.status.code() == Some(0),
        "{what}: {:?}\n{err}",
        o.status
    );
}

#[test]
fn a_closed_stdout_ends_mkt_quietly_without_a_panic() {
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    for user in [None, user.as_ref()] {
        let home = common::temp_home(user);
        let h = home.path();
        // A tree in the store for `rootfs path` and `rootfs list`.
        let (o, _, err) = run(common::mkt_as(user, h).arg("setup"));
        assert!(o.status.success(), "{err}");
        let tree = h.join(".local/share/mkt/rootfs/t1");
        std::fs::create_dir(&tree).unwrap();
        if let Some(u) = user {
            nix::unistd::chown(&tree, Some(u.uid.into()), Some(u.gid.into())).unwrap();
        }
        for args in [
            &["ps"][..],
            &["ps", "--json"],
            &["rootfs", "path", "t1"],
            &["rootfs", "list"],
            &["completions", "bash"],
            &["man"],
        ] {
            let (o, err) = with_closed_stdout(common::mkt_as(user, h).args(args));
            assert_quiet_on_closed_pipe(&args.join(" "), &o, &err);
        }
    }
}

/// `--cpus 0` is refused on the command line, for the same reason and in
/// the same words as `cpus = 0` in the config (one parser for both).
#[test]
fn zero_cpus_is_refused_on_the_command_line_as_in_the_config() {
    let home = tempfile::tempdir().unwrap();
    let (o, out, err) = run(common::mkt(home.path()).args([
        "run",
        "--cpus",
        "0",
        "--rootfs",
        "/nonexistent/rootfs",
        "--dry-run",
        "--",
        "true",
    ]));
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    assert!(err.contains("--cpus"), "{err}");
    assert!(err.contains("a guest needs at least one CPU"), "{err}");
    assert!(!out.contains("-smp"), "{out}");
    let cfg = home.path().join("c.toml");
    std::fs::write(&cfg, "[setup.a]\ncpus = 0\n").unwrap();
    let (o, _, err) = run(common::mkt(home.path())
        .args(["run", "a", "--dry-run", "--config"])
        .arg(&cfg));
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("a guest needs at least one CPU"), "{err}");
}

/// `mkt man --out DIR` writes every page its pages refer to (down to
/// mkt-rootfs-pull(1)), and no page of a hidden command.
#[test]
fn man_out_writes_every_page_the_pages_refer_to() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("man");
    let (o, _, err) = run(common::mkt(home.path()).args(["man", "--out"]).arg(&dir));
    assert!(o.status.success(), "{err}");
    let mut referred = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let t = std::fs::read_to_string(e.path())
            .unwrap()
            .replace("\\-", "-");
        for (i, _) in t.match_indices("(1)") {
            let start = t[..i]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .map_or(0, |p| p + 1);
            if t[start..i].starts_with("mkt") {
                referred.insert(t[start..i].to_string());
            }
        }
    }
    assert!(referred.contains("mkt-rootfs-pull"), "{referred:?}");
    for page in &referred {
        assert!(
            dir.join(format!("{page}.1")).is_file(),
            "{page}(1) is referred to but not written"
        );
    }
    for page in ["mkt-rootfs-pull", "mkt-rootfs-shell", "mkt-run"] {
        assert!(dir.join(format!("{page}.1")).is_file(), "{page}");
    }
    assert!(!dir.join("mkt-rootfs-unpack-layers.1").exists());
    assert!(!dir.join("mkt-kvm-test-guest.1").exists());
}

#[test]
fn completions_offer_no_internal_command_or_flag() {
    let home = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (o, out, _) = run(common::mkt(home.path()).args(["completions", shell]));
        assert!(o.status.success());
        for internal in ["unpack-layers", "run-job", "kvm-test-guest"] {
            assert!(!out.contains(internal), "{shell} offers {internal}");
        }
        for public in ["pull", "rootfs", "dry-run"] {
            assert!(out.contains(public), "{shell} lacks {public}");
        }
    }
}

/// `mkt run --help`: its own options, then the global ones apart; --rootfs
/// says its default. `mkt run uname` (no `--`) says where the command goes.
#[test]
fn run_help_and_a_command_without_double_dash() {
    let home = tempfile::tempdir().unwrap();
    let (o, out, _) = run(common::mkt(home.path()).args(["run", "--help"]));
    assert!(o.status.success());
    let (own, global) = out
        .split_once("Global options:")
        .unwrap_or_else(|| panic!("no Global options heading:\n{out}"));
    assert!(
        !own.contains("--verbose") && !own.contains("--config"),
        "{own}"
    );
    assert!(
        global.contains("--verbose") && global.contains("--config"),
        "{global}"
    );
    let rootfs: String = own
        .split("--rootfs")
        .nth(1)
        .unwrap()
        .split("--kernel")
        .next()
        .unwrap()
        .into();
    assert!(
        rootfs.contains("default") && rootfs.contains("debian-bookworm"),
        "{rootfs}"
    );
    let (o, _, err) = run(common::mkt(home.path()).args(["run", "uname"]));
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("mkt run -- uname"), "{err}");
}

/// `rootfs list --json`: one object per tree, each key once.
#[test]
fn rootfs_list_json_names_each_key_once() {
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join(".local/share/mkt/rootfs");
    std::fs::create_dir_all(store.join(".meta")).unwrap();
    std::fs::create_dir(store.join("t1")).unwrap();
    std::fs::write(
        store.join(".meta/t1.json"),
        r#"{"name":"t1","image":"x:1","reference":"docker.io/library/x:1",
"manifest_digest":"sha256:1","config_digest":"sha256:2","platform":"linux/amd64",
"layers":[],"pulled":"2026-01-01T00:00:00Z","size":1,"entries":1}"#,
    )
    .unwrap();
    let (o, out, err) = run(common::mkt(home.path()).args(["rootfs", "list", "--json"]));
    assert!(o.status.success(), "{err}");
    for key in ["\"name\"", "\"path\"", "\"image\""] {
        assert_eq!(out.matches(key).count(), 1, "{key} in {out}");
    }
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "t1");
    assert_eq!(v[0]["path"], store.join("t1").to_str().unwrap());
}

/// `--rootfs NAME` is a name in the store, whatever the current directory
/// holds; the store's internals are not names; a directory is a path.
#[test]
fn rootfs_names_are_store_names_and_directories_are_paths() {
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    for user in [None, user.as_ref()] {
        let home = common::temp_home(user);
        let h = home.path();
        let (o, _, err) = run(common::mkt_as(user, h).arg("setup"));
        assert!(o.status.success(), "{err}");
        let store = h.join(".local/share/mkt/rootfs");
        for d in [store.join("deb"), h.join("deb"), h.join("mine")] {
            std::fs::create_dir(&d).unwrap();
            if let Some(u) = user {
                nix::unistd::chown(&d, Some(u.uid.into()), Some(u.gid.into())).unwrap();
            }
        }
        let dry = |rootfs: &str| {
            let (o, _, err) = run(common::mkt_as(user, h)
                .args(["run", "--dry-run", "--rootfs", rootfs, "--", "true"])
                .current_dir(h));
            assert_eq!(o.status.code(), Some(1), "{rootfs}: {err}");
            err
        };
        // Both trees are empty, so the kernel lookup names the tree used.
        let err = dry("deb");
        assert!(
            err.contains(&format!("{}/boot", store.join("deb").display())),
            "the stored deb, not ./deb: {err}"
        );
        let err = dry("./deb");
        assert!(
            err.contains(&format!("{}/boot", h.join("deb").display())),
            "{err}"
        );
        for internal in ["", ".meta", ".."] {
            let err = dry(internal);
            assert!(
                err.contains("is not a name in the store"),
                "{internal:?}: {err}"
            );
        }
        let err = dry("mine");
        assert!(
            err.contains("no rootfs \"mine\" in") && err.contains("write ./mine"),
            "{err}"
        );
    }
}

/// Log lines (-vv) into a pipe or a file carry no colour codes.
#[test]
fn no_colour_codes_when_stderr_is_not_a_terminal() {
    let home = tempfile::tempdir().unwrap();
    let (_, _, err) = run(common::mkt(home.path()).args(["-vv", "doctor"]));
    assert!(err.contains("DEBUG"), "a debug line is logged: {err}");
    assert!(!err.contains('\u{1b}'), "colour codes: {err:?}");
}

/// `mkt rootfs shell` with no NAME enters the default rootfs (the rule of
/// `mkt run`), found in the store.
#[test]
fn rootfs_shell_without_a_name_enters_the_default_tree() {
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    for user in [None, user.as_ref()] {
        let Some(home) = common::home_with_default_rootfs(user) else {
            return;
        };
        let (o, out, err) = run(common::mkt_as(user, home.path()).args([
            "rootfs",
            "shell",
            "--",
            "cat",
            "/etc/debian_version",
        ]));
        assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
        assert!(out.starts_with("12."), "{out}");
        // The command's exit status is mkt's.
        let (o, out, err) =
            run(common::mkt_as(user, home.path())
                .args(["rootfs", "shell", "--", "sh", "-c", "exit 7"]));
        assert_eq!(o.status.code(), Some(7), "{out}\n{err}");
    }
}
