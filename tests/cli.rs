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

fn doctor_json(user: Option<&common::TestUser>) -> Vec<serde_json::Value> {
    let home = common::temp_home(user);
    let (o, out, err) = run(common::mkt_as(user, home.path()).args(["doctor", "--json"]));
    assert!(o.status.code().is_some(), "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
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

#[test]
fn doctor_says_tcg_and_why_when_kvm_is_broken() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let has_virt = cpuinfo.split_whitespace().any(|w| w == "vmx" || w == "svm");
    let home = tempfile::tempdir().unwrap();
    let (_, out, _) = run(common::mkt(home.path()).arg("doctor"));
    let line = out
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("accel"))
        .unwrap_or_else(|| panic!("no accel line:\n{out}"));
    if !has_virt || !Path::new("/dev/kvm").exists() {
        // This machine class: /dev/kvm present, nested virtualisation broken.
        assert!(line.starts_with("unusable"), "{line}");
        assert!(line.contains("KVM unusable"), "{line}");
        assert!(line.contains("using TCG"), "{line}");
        assert!(line.contains('('), "the reason is given: {line}");
    }
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
/// long options, so the docs cannot drift from --help unnoticed.
#[test]
fn docs_cover_every_subcommand_and_flag() {
    use clap::CommandFactory;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cmd = mkt::cli::Cli::command();
    for sub in cmd.get_subcommands() {
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
    for sub in cmd.get_subcommands() {
        assert!(
            readme.contains(&format!("mkt {}", sub.get_name())),
            "README's table lacks {}",
            sub.get_name()
        );
    }
}
