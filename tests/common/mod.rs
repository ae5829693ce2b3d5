//! Shared test helpers: fixture lookup, the unprivileged test user, and
//! running the `mkt` binary.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// True in CI, where a missing prerequisite is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips (locally, printing why) or fails (in CI) a test that lacks `what`.
/// Returns `None` so callers can `let Some(x) = ... else { return };`.
pub fn unavailable<T>(what: &str) -> Option<T> {
    if in_ci() {
        panic!("prerequisite missing in CI: {what}");
    }
    eprintln!("SKIP: {what}");
    None
}

/// The fixture cache dir: $MKT_TEST_CACHE, else ~/.cache/mkt-test/v1 (what
/// tests/fixtures/prepare.sh writes).
pub fn fixture_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("MKT_TEST_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    base.join("mkt-test/v1")
}

/// A prepared fixture (`rootfs-bookworm`, `linux`, `cloud-kernel`), or a
/// skip/failure naming the command that prepares it.
pub fn fixture(name: &str, marker: &str) -> Option<PathBuf> {
    let p = fixture_cache().join(name);
    if p.join(marker).exists() {
        Some(p)
    } else {
        unavailable(&format!(
            "fixture {} (run tests/fixtures/prepare.sh)",
            p.join(marker).display()
        ))
    }
}

pub fn rootfs() -> Option<PathBuf> {
    fixture("rootfs-bookworm", ".complete")
}

/// A fresh HOME (owned by `user`) whose store holds the fixture rootfs
/// with Debian's cloud kernel under the default recipe's name, with the
/// metadata `mkt rootfs build debian-bookworm` writes: the default path of
/// `run`/`build` without mmdebstrap. The tree is hard-linked (root only:
/// the fixture is root's).
pub fn home_with_default_rootfs(user: Option<&TestUser>) -> Option<tempfile::TempDir> {
    let fixture = rootfs()?;
    let ck = cloud_kernel()?;
    if !nix::unistd::getuid().is_root() {
        return unavailable("root (to link the fixture rootfs into a store)");
    }
    let home = temp_home(user);
    let mut dir = home.path().to_path_buf();
    for part in [".local", "share", "mkt", "rootfs", ".meta"] {
        dir.push(part);
        std::fs::create_dir(&dir).unwrap();
        if let Some(u) = user {
            nix::unistd::chown(&dir, Some(u.uid.into()), Some(u.gid.into())).unwrap();
        }
    }
    let store = dir.parent().unwrap();
    let name = mkt::rootfs::recipe::DEFAULT;
    // `to` (new) as hard links where the fixture and HOME share a file
    // system, else as a copy.
    let copy = |from: &Path, to: &Path| {
        for how in ["-al", "-a"] {
            let st = Command::new("cp").arg(how).arg(from).arg(to).status();
            if st.is_ok_and(|s| s.success()) {
                return;
            }
            let _ = std::fs::remove_dir_all(to);
        }
        panic!("cannot copy {} to {}", from.display(), to.display());
    };
    let tree = store.join(name);
    copy(&fixture, &tree);
    // The recipe's kernel: /boot/vmlinuz-* and its modules.
    std::fs::remove_dir(tree.join("boot")).unwrap();
    copy(&ck.join("root/boot"), &tree.join("boot"));
    copy(&ck.join("root/lib/modules"), &tree.join("usr/lib/modules"));
    let meta = format!(
        r#"{{"name":"{name}","image":"recipe:{name}","reference":"recipe:{name}",
"manifest_digest":"","config_digest":"","platform":"linux/amd64","layers":[],
"pulled":"2026-01-01T00:00:00Z","size":0,"entries":0,"recipe":"{name}","owners":"host"}}"#
    );
    let mpath = dir.join(format!("{name}.json"));
    std::fs::write(&mpath, meta).unwrap();
    if let Some(u) = user {
        nix::unistd::chown(&mpath, Some(u.uid.into()), Some(u.gid.into())).unwrap();
    }
    Some(home)
}

pub fn kernel_tree() -> Option<PathBuf> {
    fixture("linux", "arch/x86/boot/bzImage")
}

pub fn cloud_kernel() -> Option<PathBuf> {
    fixture("cloud-kernel", ".complete")
}

/// The cloud kernel fixture's (image, modules dir, release).
pub fn cloud_image(ck: &Path) -> (PathBuf, PathBuf, String) {
    let image = std::fs::read_dir(ck.join("root/boot"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .unwrap();
    let release = image.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    let modules = ck.join("root/lib/modules").join(&release);
    (image, modules, release)
}

/// A program the test needs on the host.
pub fn program(name: &str) -> Option<PathBuf> {
    mkt::host::which(name).or_else(|| unavailable(&format!("program {name} in PATH")))
}

/// The unprivileged user rootless paths run as when the suite runs as root
/// (.ci/run creates it and sets MKT_TEST_USER). `None` when not root.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// When running as root: the unprivileged test user (required in CI).
/// When not root: `Some(None)` — the current user already is unprivileged.
pub fn unprivileged_user() -> Option<Option<TestUser>> {
    if !nix::unistd::getuid().is_root() {
        return Some(None);
    }
    let Ok(name) = std::env::var("MKT_TEST_USER") else {
        return unavailable("MKT_TEST_USER (an unprivileged user for the rootless tests)");
    };
    let Some(u) = nix::unistd::User::from_name(&name).ok().flatten() else {
        return unavailable(&format!("user {name} (MKT_TEST_USER) does not exist"));
    };
    Some(Some(TestUser {
        name,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        home: u.dir,
    }))
}

/// The mkt binary at a path any user can execute (the build dir may sit
/// under root's 0700 home). One per build of the binary, shared by every
/// test process (nextest runs each test in its own): a copy per process
/// filled /tmp with one 117 MiB binary per test that ran as the test user.
pub fn shared_mkt() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_mkt"));
        let m = std::fs::metadata(bin).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "mkt-test-bin-{}-{}-{}",
            m.ino(),
            m.mtime(),
            m.mtime_nsec()
        ));
        let dst = dir.join("mkt");
        sweep_old_test_bins(&dir);
        if dst.exists() {
            return dst;
        }
        // Made aside and renamed into place, so a test never runs a
        // half-written binary; a process that loses the race uses the
        // winner's. A hard link costs no space; a copy where it cannot be.
        let tmp = tempfile::Builder::new()
            .prefix("mkt-test-bin-tmp-")
            .tempdir()
            .unwrap()
            .keep();
        let part = tmp.join("mkt");
        if std::fs::hard_link(bin, &part).is_err() {
            std::fs::copy(bin, &part).unwrap();
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        assert!(dst.exists(), "no shared mkt binary at {}", dst.display());
        dst
    })
    .clone()
}

/// Each build of mkt leaves its own copy (117 MiB: the link holds the old
/// binary once cargo replaces it), which filled the disk over a day of
/// builds. A process marks the copy it uses (its mtime) and removes those
/// nobody marked for two hours: no test process lives that long.
fn sweep_old_test_bins(mine: &std::path::Path) {
    use std::time::{Duration, SystemTime};
    if let Ok(d) = std::fs::File::open(mine) {
        let _ = d.set_modified(SystemTime::now());
    }
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(2 * 3600));
        let name = e.file_name().to_string_lossy().into_owned();
        if old && name.starts_with("mkt-test-bin-") && e.path() != mine {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `mkt ARGS` as the current user with a private HOME and XDG dirs.
pub fn mkt(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mkt"));
    isolate(&mut c, home, None);
    c
}

/// `mkt ARGS` as the given user (when Some), with HOME = `home`.
pub fn mkt_as(user: Option<&TestUser>, home: &Path) -> Command {
    let Some(u) = user else { return mkt(home) };
    let mut c = Command::new(shared_mkt());
    isolate(&mut c, home, Some(u));
    // std drops root's supplementary groups when it sets the uid.
    c.uid(u.uid).gid(u.gid).env("USER", &u.name);
    c
}

/// A private environment under `home`, with the XDG runtime dir a login
/// would provide (0700, owned by `owner`).
fn isolate(c: &mut Command, home: &Path, owner: Option<&TestUser>) {
    let run = home.join("run");
    if !run.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&run).unwrap();
        if let Some(u) = owner {
            nix::unistd::chown(&run, Some(u.uid.into()), Some(u.gid.into())).unwrap();
        }
    }
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env("LANG", "C.UTF-8");
}

/// A temporary HOME that `user` (when Some) owns.
pub fn temp_home(user: Option<&TestUser>) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("mkt-home-")
        .tempdir()
        .unwrap();
    if let Some(u) = user {
        nix::unistd::chown(d.path(), Some(u.uid.into()), Some(u.gid.into())).unwrap();
    }
    d
}

/// The reason the KVM probe gives on a CPU without vmx/svm (this machine
/// class: a cloud VM without nested virtualisation), word for word.
pub const NO_VMX: &str = "the CPU does not expose vmx/svm (nested virtualisation disabled?)";

/// Whether /proc/cpuinfo's flags include vmx or svm.
pub fn cpu_has_virt() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim() == "flags")
        .any(|(_, f)| f.split_whitespace().any(|w| w == "vmx" || w == "svm"))
}

/// The one line `mkt run` prints about its accelerator, as `user`: `None`
/// when it uses KVM, else `mkt: KVM unusable (WHY), using TCG` with the
/// reason `mkt doctor` gives that user (checked against the CPU flags where
/// they alone decide).
pub fn expected_accel_note(user: Option<&TestUser>) -> Option<String> {
    let home = temp_home(user);
    let o = mkt_as(user, home.path())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let accel = checks.iter().find(|c| c["name"] == "accel").unwrap();
    let detail = accel["detail"].as_str().unwrap();
    if !cpu_has_virt() {
        assert_eq!(detail, format!("KVM unusable ({NO_VMX}), using TCG"));
    }
    match accel["status"].as_str().unwrap() {
        "ok" => {
            assert_eq!(detail, "KVM usable");
            None
        }
        _ => Some(format!("mkt: {detail}")),
    }
}

/// The guest-side health check every boot test runs (issue 13: no speed
/// setting may cost correctness). A POSIX sh one-liner without double
/// quotes, so it also fits in a kernel command line's `init=/bin/sh -- -c "..."`.
/// It prints one `mkt-guest-check nproc=N tainted=T` line and one
/// `mkt-guest-check-bad: LINE` per kernel log line with a warning, BUG,
/// call trace or oops (the `[G]` keeps the pattern from matching itself
/// where the check sits on the kernel command line); dmesg goes through `sudo -n` for a non-root guest
/// user (distribution kernels restrict dmesg). Output goes to stderr
/// (`>&2`); in a raw boot that is the console.
pub const GUEST_CHECK: &str = "{ if dmesg >/dev/null 2>&1; then d=dmesg; else d='sudo -n dmesg'; fi; \
$d >/dev/null || echo mkt-guest-check-bad: dmesg unreadable; \
echo mkt-guest-check nproc=$(nproc) tainted=$(cat /proc/sys/kernel/tainted); \
$d | grep -E 'WARNIN[G]:|BU[G]:|Call Trac[e]|Oop[s]' | sed 's/^/mkt-guest-check-bad: /'; } >&2";

/// `CMD...` wrapped so that the guest check runs first:
/// `sh -c 'CHECK; exec "$@"' sh CMD...` (CMD's own argv and exit status
/// are kept).
pub fn guest_checked<S: AsRef<str>>(cmd: &[S]) -> Vec<String> {
    let mut v = vec![
        "sh".to_string(),
        "-c".into(),
        format!("{GUEST_CHECK}; exec \"$@\""),
        "sh".into(),
    ];
    v.extend(cmd.iter().map(|s| s.as_ref().to_string()));
    v
}

/// Asserts what [`GUEST_CHECK`] printed into `output` (stderr or a
/// console): every one of `cpus` CPUs online, kernel not tainted, no
/// warning/BUG/oops in dmesg. The check lines are then removed, so callers
/// can compare the rest of stderr exactly.
pub fn assert_guest_clean(output: &str, cpus: u32) -> String {
    let line = output
        .lines()
        .find(|l| l.trim_start().starts_with("mkt-guest-check "))
        .unwrap_or_else(|| panic!("the guest check did not run; output:\n{output}"));
    let want = format!("mkt-guest-check nproc={cpus} tainted=0");
    let bad: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("mkt-guest-check-bad:"))
        .collect();
    assert!(
        line.trim() == want && bad.is_empty(),
        "guest not clean: want `{want}`, got `{}`{}\noutput:\n{output}",
        line.trim(),
        bad.iter().map(|b| format!("\n  {b}")).collect::<String>()
    );
    output
        .lines()
        .filter(|l| !l.contains("mkt-guest-check"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A listing of the tree that changes when any file's content, size,
/// mode or mtime changes (hashing every byte of a rootfs would be slow).
pub fn tree_digest(root: &Path) -> Vec<(PathBuf, u64, u32, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let m = e.path().symlink_metadata().unwrap();
            out.push((e.path(), m.size(), m.mode(), m.mtime()));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}
