//! The first steps a person takes: `./install.sh`, `mkt doctor`, and what
//! `mkt run` says when a piece is missing. As root and as the unprivileged
//! test user, with a fresh HOME.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A PATH with the system's programs but none of /usr/local or ~/.cargo
/// (where virtiofsd and cargo live on the test machines).
const SYSTEM_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// `bash install.sh ARGS` with a clean environment: `path` as PATH.
fn install_sh(user: Option<&common::TestUser>, home: &Path, path: &str, args: &[&str]) -> Output {
    let mut c = Command::new("bash");
    c.arg(repo().join("install.sh"))
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env("HOME", home)
        .current_dir(home);
    if let Some(u) = user {
        use std::os::unix::process::CommandExt;
        c.uid(u.uid).gid(u.gid);
    }
    c.output().expect("run install.sh")
}

/// A directory holding only a `cargo` that does nothing: `--dry-run` only
/// looks for cargo, it never runs it.
fn fake_cargo_dir(user: Option<&common::TestUser>) -> tempfile::TempDir {
    let d = common::temp_home(user);
    std::os::unix::fs::symlink("/bin/true", d.path().join("cargo")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn install_sh_without_cargo_says_how_to_get_rustup_and_installs_nothing() {
    for user in [None, common::unprivileged_user().flatten()] {
        let home = common::temp_home(user.as_ref());
        let o = install_sh(user.as_ref(), home.path(), SYSTEM_PATH, &[]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{}{err}", text(&o.stdout));
        assert!(err.contains("cargo not found"), "{err}");
        assert!(err.contains("https://sh.rustup.rs"), "{err}");
        // It stopped before apt: nothing was installed half-way.
        assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    }
}

#[test]
fn install_sh_installs_virtiofsd_and_the_main_jobs_packages() {
    // As root: apt without sudo, virtiofsd to /usr/local (on every user's PATH).
    let home = common::temp_home(None);
    let cargo = fake_cargo_dir(None);
    let path = format!("{}:{SYSTEM_PATH}", cargo.path().display());
    let o = install_sh(None, home.path(), &path, &["--dry-run"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}", text(&o.stderr));
    let apt = out
        .lines()
        .find(|l| l.contains("apt-get install"))
        .unwrap_or_else(|| panic!("no apt-get install in:\n{out}"));
    let is_root = nix::unistd::getuid().is_root();
    for pkg in [
        "qemu-system-x86",
        "uidmap",
        "mmdebstrap",
        "libcap-ng-dev",
        "libseccomp-dev",
    ] {
        assert!(apt.split_whitespace().any(|w| w == pkg), "{pkg}: {apt}");
    }
    let virtiofsd = if is_root {
        "cargo install --locked --root /usr/local virtiofsd"
    } else {
        "cargo install --locked virtiofsd"
    };
    assert!(out.lines().any(|l| l == virtiofsd), "{out}");
    assert!(out.contains("cargo install --locked --path ."), "{out}");
    let tail: Vec<&str> = out.lines().rev().take(2).collect();
    assert!(
        tail[1].ends_with("mkt setup") && tail[0].ends_with("mkt doctor"),
        "{out}"
    );

    // As a normal user: apt through sudo, virtiofsd into ~/.cargo/bin.
    if let Some(Some(u)) = common::unprivileged_user() {
        let home = common::temp_home(Some(&u));
        let cargo = fake_cargo_dir(Some(&u));
        let path = format!("{}:{SYSTEM_PATH}", cargo.path().display());
        let o = install_sh(Some(&u), home.path(), &path, &["--dry-run"]);
        let out = text(&o.stdout);
        assert!(o.status.success(), "{out}{}", text(&o.stderr));
        assert!(
            out.contains("sudo env DEBIAN_FRONTEND=noninteractive apt-get install"),
            "{out}"
        );
        assert!(
            out.lines().any(|l| l == "cargo install --locked virtiofsd"),
            "{out}"
        );
    }

    // virtiofsd already there (where mkt finds it): not built again.
    let bin = common::temp_home(None);
    std::os::unix::fs::symlink("/bin/true", bin.path().join("virtiofsd")).unwrap();
    let path = format!(
        "{}:{}:{SYSTEM_PATH}",
        cargo.path().display(),
        bin.path().display()
    );
    let o = install_sh(None, home.path(), &path, &["--dry-run", "--deps-only"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}", text(&o.stderr));
    assert!(
        !out.contains("virtiofsd") && !out.contains("libseccomp-dev"),
        "{out}"
    );
    assert!(
        !out.contains("--path ."),
        "--deps-only installs no mkt: {out}"
    );
}

/// `mkt doctor --json` as `user` with `path` as PATH: (exit code, checks).
fn doctor(
    user: Option<&common::TestUser>,
    home: &Path,
    path: Option<&str>,
    args: &[&str],
) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let mut c = common::mkt_as(user, home);
    c.args(["doctor", "--json"]).args(args);
    if let Some(p) = path {
        c.env("PATH", p);
    }
    let o = c.output().expect("run mkt doctor");
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&o.stdout), text(&o.stderr)));
    (o.status.code(), checks, text(&o.stderr))
}

fn check<'a>(checks: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

fn users() -> Vec<Option<common::TestUser>> {
    let mut v = vec![None];
    if let Some(Some(u)) = common::unprivileged_user() {
        v.push(Some(u));
    }
    v
}

#[test]
fn doctor_calls_virtiofsd_required_for_the_default_rootfs() {
    if Path::new("/usr/libexec/virtiofsd").exists() || Path::new("/usr/lib/virtiofsd").exists() {
        eprintln!("SKIP: a system virtiofsd outside PATH cannot be hidden");
        return;
    }
    for user in users() {
        let home = common::temp_home(user.as_ref());
        let (code, checks, err) = doctor(user.as_ref(), home.path(), Some(SYSTEM_PATH), &[]);
        let v = check(&checks, "virtiofsd");
        assert_eq!(v["status"], "missing", "{v}");
        assert_eq!(v["required"], true, "{v}");
        assert!(v["detail"].as_str().unwrap().contains("no 9p"), "{v}");
        assert!(
            v["fix"]
                .as_str()
                .unwrap()
                .contains("cargo install --locked virtiofsd"),
            "{v}"
        );
        assert_eq!(code, Some(1), "a required check failed: {err}");
    }
}

#[test]
fn doctor_fails_on_a_bad_config_naming_file_and_key() {
    for user in users() {
        let home = common::temp_home(user.as_ref());
        let dir = home.path().join(".config/mkt");
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            "[defaults]\nrootfs = \"debian-bookworm\"\nbogus = 1\n",
        )
        .unwrap();
        if let Some(u) = &user {
            for p in [home.path().join(".config"), dir.clone(), cfg.clone()] {
                nix::unistd::chown(&p, Some(u.uid.into()), Some(u.gid.into())).unwrap();
            }
        }
        // The default config file, as every command finds it.
        let (code, checks, _) = doctor(user.as_ref(), home.path(), None, &[]);
        let c = check(&checks, "config");
        assert_eq!(c["status"], "unusable", "{c}");
        let detail = c["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("{}:3:1", cfg.display())),
            "{detail}"
        );
        assert!(detail.contains("`bogus`"), "{detail}");
        assert_eq!(code, Some(1));

        // A good one passes; no config at all passes too.
        std::fs::write(&cfg, "[defaults]\nrootfs = \"debian-bookworm\"\n").unwrap();
        let (_, checks, _) = doctor(user.as_ref(), home.path(), None, &[]);
        assert_eq!(check(&checks, "config")["status"], "ok");
        let empty = common::temp_home(user.as_ref());
        let (_, checks, _) = doctor(user.as_ref(), empty.path(), None, &[]);
        assert_eq!(check(&checks, "config")["status"], "ok");
    }
    // --config names the file to check (and it must exist).
    let home = common::temp_home(None);
    let absent = home.path().join("absent.toml");
    let (code, checks, _) = doctor(
        None,
        home.path(),
        None,
        &["--config", absent.to_str().unwrap()],
    );
    let c = check(&checks, "config");
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .contains(absent.to_str().unwrap()),
        "{c}"
    );
    assert_eq!(code, Some(1));
}

/// (start, count) of every range in /etc/subuid and /etc/subgid.
fn subid_ranges_in_use() -> Vec<(u64, u64)> {
    ["/etc/subuid", "/etc/subgid"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    Some((f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn doctor_subid_advice_is_a_range_no_other_user_has() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("SKIP: needs root (a user without subordinate ids)");
        return;
    }
    let uid_text = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
    if uid_text
        .lines()
        .any(|l| l.starts_with("root:") || l.starts_with("0:"))
    {
        eprintln!("SKIP: root has a subordinate range here");
        return;
    }
    let home = common::temp_home(None);
    let (_, checks, _) = doctor(None, home.path(), None, &[]);
    let c = check(&checks, "subids");
    assert_eq!(c["status"], "missing", "{c}");
    let fix = c["fix"].as_str().unwrap();
    let range = fix
        .split_whitespace()
        .skip_while(|w| *w != "--add-subuids")
        .nth(1)
        .unwrap_or_else(|| panic!("{fix}"));
    let (a, b) = range.split_once('-').unwrap();
    let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
    assert_eq!(b - a + 1, 65536, "{fix}");
    for (s, n) in subid_ranges_in_use() {
        assert!(b < s || a >= s + n, "{fix} overlaps {s}+{n} in use");
    }
    assert!(fix.contains(&format!("--add-subgids {range}")), "{fix}");
}

#[test]
fn doctor_kvm_advice_matches_the_cause() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let has_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if has_virt {
        eprintln!("SKIP: this CPU exposes vmx/svm (the unit tests cover the advice)");
        return;
    }
    for user in users() {
        let home = common::temp_home(user.as_ref());
        let (_, checks, _) = doctor(user.as_ref(), home.path(), None, &[]);
        let c = check(&checks, "accel");
        let (detail, fix) = (
            c["detail"].as_str().unwrap(),
            c["fix"].as_str().unwrap_or(""),
        );
        assert!(detail.contains("vmx/svm"), "the cause is the CPU: {c}");
        assert!(!fix.contains("group") && !fix.contains("kvm_intel"), "{c}");
    }
}

/// `mkt run --dry-run` without virtiofsd: the error names what to install,
/// and suggests `--fs 9p` only for a kernel that has 9p.
#[test]
fn missing_virtiofsd_suggests_9p_only_when_the_kernel_has_it() {
    let (Some(rootfs), Some(ck)) = (common::rootfs(), common::cloud_kernel()) else {
        return;
    };
    if common::program("qemu-system-x86_64").is_none() {
        return;
    }
    if Path::new("/usr/libexec/virtiofsd").exists() || Path::new("/usr/lib/virtiofsd").exists() {
        eprintln!("SKIP: a system virtiofsd outside PATH cannot be hidden");
        return;
    }
    let (image, modules, _) = common::cloud_image(&ck);
    let arg = |p: &PathBuf| p.to_str().unwrap().to_string();
    // Debian's cloud kernel (the default rootfs's) has no 9p.
    let no_9p = [
        "--rootfs".into(),
        arg(&rootfs),
        "--kernel".into(),
        arg(&image),
        "--modules".into(),
        arg(&modules),
    ];
    for user in users() {
        let home = common::temp_home(user.as_ref());
        let o = common::mkt_as(user.as_ref(), home.path())
            .arg("run")
            .args(&no_9p)
            .args(["--dry-run", "--", "true"])
            .env("PATH", SYSTEM_PATH)
            .current_dir(home.path())
            .output()
            .unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("virtiofsd") && err.contains("install.sh"),
            "{err}"
        );
        assert!(!err.contains("--fs 9p"), "this kernel has no 9p: {err}");
        assert!(err.contains("no 9p"), "{err}");
    }
    // A kernel with 9p, virtiofs asked for: --fs 9p is a real way out.
    let Some(tree) = common::kernel_tree() else {
        return;
    };
    let home = common::temp_home(None);
    let o = common::mkt(home.path())
        .arg("run")
        .args(["--rootfs", &arg(&rootfs), "--kernel", &arg(&tree)])
        .args(["--fs", "virtiofs", "--dry-run", "--", "true"])
        .env("PATH", SYSTEM_PATH)
        .current_dir(home.path())
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("or use --fs 9p"), "{err}");
}

/// A small recipe (Debian's essential set and one package): a real
/// mmdebstrap run of about a minute.
const TINY_RECIPE: &str = r#"description = "progress test: essential + iproute2"
packages = ["iproute2"]
[base]
suite = "bookworm"
variant = "essential"
mirror = "http://deb.debian.org/debian"
components = ["main"]
"#;

/// `mkt rootfs build` of [`TINY_RECIPE`] in a fresh HOME as `user`, on a
/// terminal (through script(1)) or not: (exit code, what stderr showed).
fn build_tiny(user: Option<&common::TestUser>, tty: bool) -> (Option<i32>, String) {
    let home = common::temp_home(user);
    let recipe = home.path().join("tiny.toml");
    std::fs::write(&recipe, TINY_RECIPE).unwrap();
    if let Some(u) = user {
        nix::unistd::chown(&recipe, Some(u.uid.into()), Some(u.gid.into())).unwrap();
    }
    let mkt_args = [
        "rootfs",
        "build",
        recipe.to_str().unwrap(),
        "--name",
        "tiny",
    ];
    let mut c = common::mkt_as(user, home.path());
    let o = if tty {
        // script runs the command on a new pty; the typescript is what the
        // terminal got.
        let typescript = home.path().join("typescript");
        let bin = c.get_program().to_owned();
        let cmd = std::iter::once(bin.to_str().unwrap())
            .chain(mkt_args)
            .collect::<Vec<_>>()
            .join(" ");
        let mut s = Command::new("script");
        s.args(["-qec", &cmd])
            .arg(&typescript)
            .envs(c.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .env("TERM", "xterm")
            .env("COLUMNS", "120")
            .current_dir(home.path());
        if let Some(u) = user {
            use std::os::unix::process::CommandExt;
            s.uid(u.uid).gid(u.gid);
        }
        let o = s.output().expect("run script");
        let seen = std::fs::read_to_string(&typescript).unwrap_or_default();
        return (o.status.code(), seen);
    } else {
        c.args(mkt_args).current_dir(home.path()).output().unwrap()
    };
    (o.status.code(), text(&o.stderr))
}

#[test]
fn rootfs_build_shows_mmdebstrap_progress_on_a_tty() {
    if common::program("mmdebstrap").is_none() || common::program("script").is_none() {
        return;
    }
    // The rootless path a person takes (mmdebstrap --mode=unshare).
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let (code, seen) = build_tiny(user.as_ref(), true);
    assert_eq!(code, Some(0), "{seen}");
    // One status line, redrawn in place, with the step, packages and bytes:
    // `downloading packages 3/69 (2.7 MiB/28.3 MiB)`.
    let counts = seen
        .split("mkt: rootfs tiny: downloading packages ")
        .skip(1)
        .any(|rest| {
            rest.split_once('/')
                .is_some_and(|(n, rest)| n.parse::<u32>().is_ok() && rest.contains(" MiB/"))
        });
    assert!(counts, "no package and byte counts: {seen}");
    assert!(seen.contains("installing essential packages"), "{seen}");
    assert!(seen.contains(" set up"), "{seen}");
    assert!(seen.contains("\r\x1b[2K"), "redrawn in place: {seen:?}");
    assert!(seen.contains("mkt: rootfs tiny: ready at"), "{seen}");
}

#[test]
fn rootfs_build_without_a_tty_prints_one_line_per_mmdebstrap_step() {
    if common::program("mmdebstrap").is_none() {
        return;
    }
    let (code, err) = build_tiny(None, false);
    assert_eq!(code, Some(0), "{err}");
    for step in [
        "running apt-get update",
        "downloading packages with apt",
        "installing essential packages",
    ] {
        let line = format!("mkt: rootfs tiny: mmdebstrap: {step} [");
        assert_eq!(err.matches(&line).count(), 1, "{line}: {err}");
    }
    assert!(
        !err.contains('\x1b') && !err.contains('\r'),
        "no terminal codes: {err:?}"
    );
    // The remarks between steps are in the log only.
    assert!(!err.contains("chosen format"), "{err}");
}

/// Whether a process runs whose command line names `needle` (here the
/// test's HOME, which mmdebstrap's tarball path is under).
fn process_naming(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
    })
}

/// SIGTERM (`kill PID`, as root: mmdebstrap --mode=root) or Ctrl-C (SIGINT
/// to the terminal's process group, as the user: --mode=unshare) while
/// `mkt rootfs build` bootstraps: mkt stops mmdebstrap and all it started
/// within seconds, exits 143 or 130, and stores nothing (no tree, no temp
/// dir, no base tarball).
#[test]
fn an_interrupted_rootfs_build_exits_143_or_130_and_stores_nothing() {
    use nix::sys::signal::Signal;
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};
    if common::program("mmdebstrap").is_none() {
        return;
    }
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    for (user, sig) in [(None, Signal::SIGTERM), (user.as_ref(), Signal::SIGINT)] {
        let home = common::temp_home(user);
        let h = home.path();
        let recipe = h.join("tiny.toml");
        std::fs::write(&recipe, TINY_RECIPE).unwrap();
        if let Some(u) = user {
            nix::unistd::chown(&recipe, Some(u.uid.into()), Some(u.gid.into())).unwrap();
        }
        let mut child = common::mkt_as(user, h)
            .args(["rootfs", "build"])
            .arg(&recipe)
            .args(["--name", "tiny"])
            .current_dir(h)
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Once mmdebstrap downloads (apt and its helpers run under it).
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        while !seen.contains("mmdebstrap: downloading packages") {
            let mut line = String::new();
            if err.read_line(&mut line).unwrap() == 0 {
                panic!("{sig}: the build ended first:\n{seen}");
            }
            seen += &line;
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let t0 = Instant::now();
        if sig == Signal::SIGINT {
            nix::sys::signal::killpg(pid, sig).unwrap();
        } else {
            nix::sys::signal::kill(pid, sig).unwrap();
        }
        let deadline = t0 + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{sig}: mkt rootfs build still runs after 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = t0.elapsed();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(128 + sig as i32), "{sig}: {seen}{rest}");
        assert!(took < Duration::from_secs(15), "{sig}: took {took:?}");
        let store = h.join(".local/share/mkt/rootfs");
        let left: Vec<_> = std::fs::read_dir(&store)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != ".meta")
            .collect();
        assert!(left.is_empty(), "{sig}: left in the store: {left:?}");
        let bases: Vec<_> = std::fs::read_dir(h.join(".local/share/mkt/blobs/recipes"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(bases.is_empty(), "{sig}: base tarballs: {bases:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_naming(h.to_str().unwrap()) {
            assert!(Instant::now() < deadline, "{sig}: mmdebstrap outlived mkt");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
