//! `mkt build` end to end: the fixture rootfs entered rootless, a copy of the
//! fixture kernel tree rebuilt after a one-file change, a compile error, the
//! generated VM config, and project discovery. The rootless cases run as the
//! unprivileged test user when the suite runs as root (CI).

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use common::TestUser;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn build_as(user: Option<&TestUser>, home: &Path, dir: &Path, args: &[&str]) -> Output {
    let mut c = common::mkt_as(user, home);
    c.arg("build").args(args).current_dir(dir);
    c.output().expect("spawn mkt")
}

/// A command run as the test user (when Some), failing the test on error.
fn sh_as(user: Option<&TestUser>, script: &str) {
    let mut c = Command::new("sh");
    c.args(["-ec", script]);
    if let Some(u) = user {
        c.uid(u.uid).gid(u.gid);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{script}: {}", text(&o.stderr));
}

/// A temporary directory the test user owns.
fn user_dir(user: Option<&TestUser>, prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    if let Some(u) = user {
        nix::unistd::chown(d.path(), Some(u.uid.into()), Some(u.gid.into())).unwrap();
    }
    d
}

fn uid_of(user: Option<&TestUser>) -> u32 {
    user.map_or_else(|| nix::unistd::getuid().as_raw(), |u| u.uid)
}

/// Path, size, mtime and mode of every entry under `root`'s /etc and the top.
fn digest(root: &Path) -> Vec<(PathBuf, u64, i64, u32)> {
    let mut v = Vec::new();
    for dir in [root.to_path_buf(), root.join("etc"), root.join("usr")] {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let m = e.path().symlink_metadata().unwrap();
            v.push((e.path(), m.size(), m.mtime(), m.mode()));
        }
    }
    v.sort();
    v
}

/// A copy of the built fixture tree made by the user in a temp dir (the
/// dir, the tree). cp -a keeps the mtimes, so make sees an up-to-date tree;
/// objtool's build records absolute paths: relocated, as if the tree had
/// been built here (prepare.sh builds in linux.tmp). Ends 0.2 s after the
/// copy: mkt's build record does not vouch for files changed just before
/// a build starts.
fn copy_fixture_tree(
    user: Option<&TestUser>,
    fixture: &Path,
    prefix: &str,
) -> (tempfile::TempDir, PathBuf) {
    let work = user_dir(user, prefix);
    let tree = work.path().join("linux");
    let (fx, t) = (fixture.display(), tree.display());
    sh_as(
        user,
        &format!(
            "cp -a {fx} {t}; cd {t}; grep -rlI --include='.*.cmd' --include='*.d' {fx} tools \
             | xargs -r sed -i 's#{fx}.tmp#{t}#g; s#{fx}/#{t}/#g'; sleep 0.2"
        ),
    );
    (work, tree)
}

/// (a) + (c): a copy of the built fixture tree, one driver file changed,
/// rebuilt as the unprivileged user; then a syntax error fails the build.
#[test]
fn one_file_rebuild_as_the_user_then_a_compile_error() {
    let Some(fixture) = common::kernel_tree() else {
        return;
    };
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let user = user.as_ref();
    let home = common::temp_home(user);
    let (_work, tree) = copy_fixture_tree(user, &fixture, "mkt-build-tree-");
    let dummy = tree.join("drivers/net/dummy.c");
    let marker = tree.join(".mkt-test-marker");
    sh_as(
        user,
        &format!(
            "touch {m}; echo 'static const char mkt_marker[] __used = \"mkt-build-marker-1\";' >> {d}",
            m = marker.display(),
            d = dummy.display()
        ),
    );
    std::thread::sleep(std::time::Duration::from_millis(20));

    let r = rootfs.to_str().unwrap();
    let before = digest(&rootfs);
    let t0 = Instant::now();
    let o = build_as(user, home.path(), &tree, &["--rootfs", r]);
    let wall = t0.elapsed();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "stderr: {err}{}", log_tail(&err));
    eprintln!("one-file rebuild (with the first relink): {wall:?}\n{err}");
    let status = err
        .lines()
        .find(|l| l.contains("built linux"))
        .unwrap_or("");
    assert!(status.contains(&tree.display().to_string()), "{err}");
    assert!(status.contains("log: "), "{err}");
    let ko = std::fs::read(tree.join("drivers/net/dummy.ko")).unwrap();
    assert!(
        ko.windows(18).any(|w| w == b"mkt-build-marker-1"),
        "dummy.ko lacks the new string"
    );
    // Every file the build wrote (and the whole copy) belongs to the user.
    let uid = uid_of(user);
    let find = Command::new("find")
        .arg(&tree)
        .args([
            "-newer",
            marker.to_str().unwrap(),
            "-type",
            "f",
            "-printf",
            "%U %p\n",
        ])
        .output()
        .unwrap();
    let changed = text(&find.stdout);
    assert!(changed.contains("dummy.ko"), "{changed}");
    let foreign: Vec<&str> = changed
        .lines()
        .filter(|l| !l.starts_with(&format!("{uid} ")))
        .collect();
    assert!(foreign.is_empty(), "not owned by {uid}: {foreign:?}");
    assert_eq!(digest(&rootfs), before, "the stored rootfs changed");

    // The rebuilt module loads in a guest booted from the rebuilt tree.
    let o = common::mkt_as(user, home.path())
        .args(["run", "--rootfs", r, "--kernel"])
        .arg(&tree)
        .args([
            "--",
            "sh",
            "-c",
            "sudo modprobe dummy && grep -c '^dummy ' /proc/modules && \
             grep -c mkt-build-marker-1 /lib/modules/$(uname -r)/kernel/drivers/net/dummy.ko",
        ])
        .output()
        .unwrap();
    assert_eq!(text(&o.stdout), "1\n1\n", "{}", text(&o.stderr));

    // --with-kernel-headers: user space sees this tree's uapi headers (a
    // new one here) in /usr/include, for that run only.
    sh_as(
        user,
        &format!(
            "echo '#define MKT_UAPI_TEST 1' > {}/include/uapi/linux/mkt_uapi_test.h",
            tree.display()
        ),
    );
    let ip = user_dir(user, "mkt-iproute2-hdr-");
    sh_as(
        user,
        &format!(
            "cd {}; mkdir ip; printf '#!/bin/sh\\ntouch config.mk\\n' > configure; chmod +x configure; \
             printf 'all:\\n\\tgrep -q MKT_UAPI_TEST /usr/include/linux/mkt_uapi_test.h\\n' > Makefile",
            ip.path().display()
        ),
    );
    let headers = format!("--with-kernel-headers={}", tree.display());
    let o = build_as(user, home.path(), ip.path(), &["--rootfs", r, &headers]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = build_as(user, home.path(), ip.path(), &["--rootfs", r]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert_eq!(digest(&rootfs), before, "the stored rootfs changed");

    // (c) A syntax error: exit 1, the error line and the log path.
    sh_as(
        user,
        &format!("echo 'static int mkt_broken = ;' >> {}", dummy.display()),
    );
    let o = build_as(user, home.path(), &tree, &["--rootfs", r]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.lines()
            .any(|l| l.contains("drivers/net/dummy.c") && l.contains("error:")),
        "{err}"
    );
    let log = err
        .lines()
        .find_map(|l| l.strip_prefix("mkt: log: "))
        .unwrap_or_else(|| panic!("no log path in: {err}"));
    let log_text = std::fs::read_to_string(log).unwrap();
    assert!(log_text.contains("mkt_broken"), "{log_text}");
}

/// (f) The minimal VM config generated in a fresh, unconfigured tree,
/// inside the rootfs: the fragment's key options survive, the report is
/// printed. `-- olddefconfig` makes the build step a no-op.
#[test]
fn kconfig_is_generated_in_an_unconfigured_tree() {
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    let tarball = Path::new("/usr/src/linux-source-6.1.tar.xz");
    if !tarball.exists() {
        common::unavailable::<()>(
            "/usr/src/linux-source-6.1.tar.xz (apt install linux-source-6.1)",
        );
        return;
    }
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let user = user.as_ref();
    let home = common::temp_home(user);
    let work = user_dir(user, "mkt-kconfig-");
    let tree = work.path().join("linux");
    sh_as(
        user,
        &format!(
            "mkdir {t}; tar -xf {x} -C {t} --strip-components=1",
            t = tree.display(),
            x = tarball.display()
        ),
    );
    let t0 = Instant::now();
    let o = build_as(
        user,
        home.path(),
        &tree,
        &["--rootfs", rootfs.to_str().unwrap(), "--", "olddefconfig"],
    );
    let err = text(&o.stderr);
    eprintln!("config generation: {:?}\n{err}", t0.elapsed());
    assert_eq!(o.status.code(), Some(0), "stderr: {err}{}", log_tail(&err));
    let config = std::fs::read_to_string(tree.join(".config")).unwrap();
    for want in ["CONFIG_9P_FS=y", "CONFIG_DUMMY=m", "CONFIG_VIRTIO_PCI=y"] {
        assert!(config.lines().any(|l| l == want), "{want} missing");
    }
    assert!(
        err.contains("kconfig: generated .config;") && err.contains("options of mkt's fragment"),
        "{err}"
    );
    let meta = std::fs::metadata(tree.join(".config")).unwrap();
    assert_eq!(meta.uid(), uid_of(user));
    // --kconfig generates it again over an existing .config (~16 s here).
    let edited = config.replace("CONFIG_DUMMY=m", "# CONFIG_DUMMY is not set");
    std::fs::write(tree.join(".config"), edited).unwrap();
    let o = build_as(
        user,
        home.path(),
        &tree,
        &[
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--kconfig",
            "--",
            "olddefconfig",
        ],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "stderr: {err}{}", log_tail(&err));
    assert!(err.contains("kconfig: generated .config;"), "{err}");
    let config = std::fs::read_to_string(tree.join(".config")).unwrap();
    assert!(
        config.lines().any(|l| l == "CONFIG_DUMMY=m"),
        "not regenerated"
    );
}

/// (d) The namespace through the library, as the current user: own uid
/// mapped to itself, a PID 1, the rootfs visible and read-only, entry in
/// milliseconds.
#[test]
fn library_enters_the_rootfs_as_the_caller() {
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    use mkt::sandbox::{Layout, Mount, Output as NsOut, Spec, What};
    let staging = tempfile::tempdir().unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    let spec = Spec {
        layout: Layout {
            rootfs: rootfs.clone(),
            staging: staging.path().to_path_buf(),
            mounts: vec![
                Mount::new("/proc", What::Proc),
                Mount::new("/dev", What::Dev),
                Mount::new("/tmp", What::Tmpfs),
            ],
            writable: false,
        },
        hostname: "mkt-test".into(),
        cwd: "/".into(),
        argv: vec![
            "sh".into(),
            "-c".into(),
            "id -u; cat /proc/self/uid_map; hostname; cat /proc/1/status | grep ^Pid; ls /; \
             touch /usr/mkt-x 2>/dev/null && echo WRITABLE; echo ok > /tmp/x && cat /tmp/x"
                .into(),
        ],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ids: mkt::sandbox::Ids::Own,
    };
    let before = digest(&rootfs);
    let fd: std::os::fd::OwnedFd = out.reopen().unwrap().into();
    let exit = mkt::sandbox::run(&spec, &mkt::sandbox::HostFs, NsOut::To(&fd)).unwrap();
    let got = std::fs::read_to_string(out.path()).unwrap();
    assert_eq!(exit.status, 0, "{got}");
    let uid = nix::unistd::getuid().as_raw();
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines[0], uid.to_string(), "{got}");
    let map: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(map, [uid.to_string(), uid.to_string(), "1".into()], "{got}");
    assert_eq!(lines[2], "mkt-test");
    assert!(lines[3].starts_with("Pid:\t1"), "{got}");
    for top in ["usr", "etc", "bin"] {
        assert!(lines.contains(&top), "{top} not in / : {got}");
    }
    assert!(!got.contains("WRITABLE"), "the rootfs is writable: {got}");
    assert!(got.ends_with("ok\n"), "{got}");
    assert!(!rootfs.join("usr/mkt-x").exists());
    assert_eq!(digest(&rootfs), before, "the stored rootfs changed");
    // A failed mount is reported by name, with the errno as its cause.
    let mut bad = spec.clone();
    bad.layout
        .mounts
        .push(Mount::bind("/nonexistent-mkt", "/tmp/x", true));
    let e = mkt::sandbox::run(&bad, &mkt::sandbox::HostFs, NsOut::To(&fd)).unwrap_err();
    assert!(
        e.to_string()
            .contains("failed at: bind /nonexistent-mkt on "),
        "{e}"
    );
    assert!(std::error::Error::source(&e).is_some());
    // A missing program is an error naming it, not a silent 127.
    let mut missing = spec.clone();
    missing.argv = vec!["no-such-program".into()];
    let e = mkt::sandbox::run(&missing, &mkt::sandbox::HostFs, NsOut::To(&fd)).unwrap_err();
    assert!(matches!(e, mkt::sandbox::NsError::Exec { .. }), "{e:?}");
    assert!(e.to_string().contains("no-such-program"), "{e}");
    eprintln!("entered in {:?}", exit.enter);
    assert!(
        exit.enter.as_millis() < 1000,
        "entering took {:?}",
        exit.enter
    );
}

/// (d) The same through the binary as the unprivileged user: `--shell --
/// -c CMD` runs in the build environment, with a passwd entry and the home.
#[test]
fn shell_runs_as_the_user_with_a_passwd_entry() {
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let user = user.as_ref();
    let home = common::temp_home(user);
    let passwd_before = std::fs::read(rootfs.join("etc/passwd")).unwrap();
    let o = build_as(
        user,
        home.path(),
        home.path(),
        &[
            "--shell",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--",
            "-c",
            "id -u; whoami; pwd; echo $HOME; cat /proc/1/status | grep ^Pid",
        ],
    );
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", text(&o.stderr));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], uid_of(user).to_string());
    let name = user.map_or_else(
        || {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .unwrap()
                .unwrap()
                .name
        },
        |u| u.name.clone(),
    );
    assert_eq!(lines[1], name);
    // The cwd is a read-write bind (the "source tree"), the same path.
    assert_eq!(lines[2], home.path().to_str().unwrap());
    assert_eq!(lines[3], home.path().to_str().unwrap());
    assert!(lines[4].starts_with("Pid:\t1"), "{out}");
    assert_eq!(
        std::fs::read(rootfs.join("etc/passwd")).unwrap(),
        passwd_before
    );
    // The shell's exit status is mkt's.
    let o = build_as(
        user,
        home.path(),
        home.path(),
        &[
            "--shell",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--",
            "-c",
            "exit 7",
        ],
    );
    assert_eq!(o.status.code(), Some(7));
}

/// (b) A directory that is no project: the message says what was looked
/// for; exit 1. Needs no fixture.
#[test]
fn an_empty_directory_is_not_a_project() {
    let home = common::temp_home(None);
    let empty = tempfile::tempdir().unwrap();
    let o = build_as(
        None,
        home.path(),
        empty.path(),
        &["--rootfs", "/nonexistent"],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no project found in"), "{err}");
    for what in ["Linux kernel", "rdma-core", "iproute2", "QEMU", "Kbuild"] {
        assert!(err.contains(what), "{what} not named: {err}");
    }
    // A named project that the directory is not.
    let o = build_as(
        None,
        home.path(),
        empty.path(),
        &["qemu", "-C", "/nonexistent"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("/nonexistent"));
}

fn write_exec(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// (b) An iproute2-like tree is recognised and built with its steps
/// (configure once, then make) inside the rootfs.
#[test]
fn an_iproute2_like_tree_is_configured_and_built() {
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let user = user.as_ref();
    let home = common::temp_home(user);
    let tree = user_dir(user, "mkt-iproute2-");
    let t = tree.path();
    std::fs::create_dir(t.join("ip")).unwrap();
    write_exec(
        &t.join("configure"),
        "#!/bin/sh\necho \"configured=$(id -u)\" > config.mk\n",
    );
    std::fs::write(
        t.join("Makefile"),
        "all:\n\techo \"built $(MAKEFLAGS) $(CC) $$(command -v gcc) $(EXTRA)\" > ip/ip.out\n\
         \tif [ -n \"$(SHARED)\" ]; then cat $(SHARED)/in > ip/shared.out; fi\n\
         clean:\n\techo cleaned > cleaned.txt\n",
    )
    .unwrap();
    if let Some(u) = user {
        sh_as(
            None,
            &format!("chown -R {}:{} {}", u.uid, u.gid, t.display()),
        );
    }
    let r = rootfs.to_str().unwrap();
    let o = build_as(
        user,
        home.path(),
        t,
        &["iproute2", "--rootfs", r, "--", "EXTRA=x"],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}{}", log_tail(&err));
    assert!(err.contains("built iproute2"), "{err}");
    let uid = uid_of(user);
    assert_eq!(
        std::fs::read_to_string(t.join("config.mk")).unwrap(),
        format!("configured={uid}\n")
    );
    let out = std::fs::read_to_string(t.join("ip/ip.out")).unwrap();
    // make's own CC; gcc is ccache's masquerade link (PATH), so the
    // command lines are the ones a plain make records.
    assert!(out.contains(" cc /usr/lib/ccache/gcc x"), "{out}");
    assert_eq!(std::fs::metadata(t.join("ip/ip.out")).unwrap().uid(), uid);
    assert!(!t.join("cleaned.txt").exists(), "cleaned without --clean");
    // A host directory is seen only when bound with --dir; --clean runs
    // the project's clean first.
    let shared = user_dir(user, "mkt-shared-");
    std::fs::write(shared.path().join("in"), "from the host\n").unwrap();
    let s = format!("SHARED={}", shared.path().display());
    let o = build_as(user, home.path(), t, &["iproute2", "--rootfs", r, "--", &s]);
    let d = shared.path().to_str().unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let log = err.split("mkt: log: ").nth(1).unwrap().trim();
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains(&format!("{d}/in: No such file")), "{log}");
    let o = build_as(
        user,
        home.path(),
        t,
        &["iproute2", "--rootfs", r, "--clean", "--dir", d, "--", &s],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(t.join("cleaned.txt")).unwrap(),
        "cleaned\n"
    );
    assert_eq!(
        std::fs::read_to_string(t.join("ip/shared.out")).unwrap(),
        "from the host\n"
    );
    // Naming another project than the tree is an error.
    let o = build_as(user, home.path(), t, &["qemu", "--rootfs", r]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("is not a qemu tree"),
        "{}",
        text(&o.stderr)
    );
}

/// (e) The mount plan for the real fixture rootfs: a home missing from the
/// tree shadows /home, and nothing is ever mounted read-write from it.
#[test]
fn mount_plan_on_the_fixture_rootfs() {
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    use mkt::sandbox::{Layout, Mount, Op};
    let layout = Layout {
        rootfs: rootfs.clone(),
        staging: "/stage".into(),
        mounts: vec![
            Mount::bind("/home/nobody-here", "/home/nobody-here", true),
            Mount::bind("/home/nobody-here/src", "/home/nobody-here/src", false),
        ],
        writable: false,
    };
    let ops = mkt::sandbox::plan(&layout, &mkt::sandbox::HostFs);
    assert!(ops.contains(&Op::Tmpfs {
        dst: "/stage/home".into()
    }));
    assert!(ops.contains(&Op::Mkdir {
        path: "/stage/home/nobody-here".into()
    }));
    for op in &ops {
        if let Op::Bind { src, ro, .. } = op
            && src.starts_with(&rootfs)
        {
            assert!(ro, "{op}");
        }
    }
}

/// A custom project: --recipe runs the script in the tree with MKT_JOBS and
/// the make args as "$@"; `custom` without a recipe is an error.
#[test]
fn a_recipe_runs_in_the_tree_as_the_user() {
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let user = user.as_ref();
    let home = common::temp_home(user);
    let tree = user_dir(user, "mkt-recipe-");
    let t = tree.path();
    let recipe = t.join("recipe.sh");
    std::fs::write(
        &recipe,
        "echo \"jobs=$MKT_JOBS uid=$(id -u) cc=${CC-unset} gcc=$(command -v gcc) args=$*\" > out.txt\n",
    )
    .unwrap();
    let r = rootfs.to_str().unwrap();
    let rec = recipe.to_str().unwrap();
    let o = build_as(
        user,
        home.path(),
        t,
        &["--recipe", rec, "--rootfs", r, "--", "a", "b"],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}{}", log_tail(&err));
    assert!(err.contains("built custom (recipe "), "{err}");
    let out = std::fs::read_to_string(t.join("out.txt")).unwrap();
    let uid = uid_of(user);
    assert!(out.starts_with("jobs="), "{out}");
    assert!(
        out.contains(&format!(
            " uid={uid} cc=unset gcc=/usr/lib/ccache/gcc args=a b"
        )),
        "{out}"
    );
    assert_eq!(std::fs::metadata(t.join("out.txt")).unwrap().uid(), uid);
    // A failing recipe is a failed build.
    std::fs::write(&recipe, "echo 'recipe: error: broken'\nfalse\necho never\n").unwrap();
    let o = build_as(user, home.path(), t, &["--recipe", rec, "--rootfs", r]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("recipe: error: broken"),
        "{}",
        text(&o.stderr)
    );
    let o = build_as(user, home.path(), t, &["custom", "--rootfs", r]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("needs --recipe"),
        "{}",
        text(&o.stderr)
    );
}

/// The foundation's fixture kernel is configured and built by `mkt build`
/// itself (tests/fixtures/prepare.sh): Debian's linux-source-6.1 with no
/// .config, so mkt generated tinyconfig + kvm_guest.config + its fragment;
/// every boot test in tests/run.rs and tests/boot.rs boots this bzImage.
/// The recorded build is checked against what the current code does: the
/// tree is discovered as a kernel, the logged commands are the current
/// `steps()` for a fresh tree, and the current fragment's report on the
/// fixture's .config is the one logged (a fragment changed since the
/// fixture was built, or a report that reads .config wrongly, fails here).
#[test]
fn fixture_kernel_was_configured_and_built_by_mkt_build() {
    use mkt::build::{Project, StepInput};
    let Some(tree) = common::kernel_tree() else {
        return;
    };
    let log = std::fs::read_to_string(tree.join(".mkt-build.log"))
        .unwrap_or_else(|e| panic!("{}/.mkt-build.log: {e}", tree.display()));
    let project = mkt::build::discover(&tree).unwrap();
    assert!(
        matches!(&project, Project::Kernel { version } if version.starts_with("6.1.")),
        "{project:?}"
    );
    let lines: Vec<&str> = log.lines().filter_map(|l| l.strip_prefix("$ ")).collect();
    // The job count is the building machine's; the rest is the plan.
    let jobs: u32 = lines
        .iter()
        .find_map(|l| l.strip_prefix("make -j"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no make -jN in {lines:?}"));
    let fresh = StepInput {
        jobs,
        kconfig: true,
        ..Default::default()
    };
    let want: Vec<String> = mkt::build::steps(&project, &fresh)
        .into_iter()
        .map(|s| mkt::util::shell::shell_quote(&s.0))
        .collect();
    assert_eq!(lines, want, "the fixture was not built as mkt builds now");
    let config = std::fs::read_to_string(tree.join(".config")).unwrap();
    let report = mkt::build::kconfig_report(mkt::build::VM_CONFIG, &config);
    assert!(
        log.lines().any(|l| l == format!("mkt: {report}")),
        "the current fragment's report on the fixture's .config is not the logged one: {report}"
    );
    assert!(
        mkt::build::dropped_options(mkt::build::VM_CONFIG, &config).is_empty(),
        "{report}"
    );
    for opt in ["CONFIG_VIRTIO_FS=y", "CONFIG_9P_FS=y", "CONFIG_DUMMY=m"] {
        assert!(config.lines().any(|l| l == opt), "{opt}");
    }
    assert!(tree.join("arch/x86/boot/bzImage").is_file());
    assert!(tree.join("drivers/net/dummy.ko").is_file());
}

/// `mkt build custom --recipe FILE` (docs/build.md's form) in a directory
/// that is no known project, with no --rootfs: the default rootfs from the
/// store, as the first `mkt run` leaves it. As root and as the user.
#[test]
fn custom_recipe_with_the_default_rootfs_in_a_plain_directory() {
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    for user in [None, user.as_ref()] {
        let Some(home) = common::home_with_default_rootfs(user) else {
            return;
        };
        let work = user_dir(user, "mkt-custom-");
        let t = work.path();
        std::fs::write(t.join("hello.c"), "int main(void) { return 0; }\n").unwrap();
        std::fs::write(t.join("build.sh"), "cc -o hello hello.c\n").unwrap();
        let o = build_as(user, home.path(), t, &["custom", "--recipe", "build.sh"]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{err}{}", log_tail(&err));
        assert!(err.contains("built custom (recipe "), "{err}");
        let hello = std::fs::metadata(t.join("hello")).unwrap();
        assert_eq!(hello.uid(), uid_of(user));
        // Without PROJECT, the same.
        let o = build_as(user, home.path(), t, &["--recipe", "build.sh"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    }
}

/// Ctrl-C during a build (SIGINT to the terminal's process group) stops
/// it, and mkt exits 130 as a shell reports it, not 1; SIGTERM (`kill`)
/// gives 143 and SIGHUP (the terminal closed) 129, as a shell reports them
/// (mkt catches neither: it ends by the signal). The recipe's command does
/// not outlive mkt.
#[test]
fn ctrl_c_stops_a_build_with_status_130() {
    use nix::sys::signal::Signal;
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    for (user, sig) in [
        (None, Signal::SIGINT),
        (user.as_ref(), Signal::SIGINT),
        (user.as_ref(), Signal::SIGTERM),
        (None, Signal::SIGHUP),
    ] {
        let home = common::temp_home(user);
        let work = user_dir(user, "mkt-ctrl-c-");
        let t = work.path();
        std::fs::write(t.join("build.sh"), "touch started\nsleep 6007\n").unwrap();
        let mut c = common::mkt_as(user, home.path());
        c.args(["build", "--recipe", "build.sh", "--rootfs"])
            .arg(&rootfs)
            .current_dir(t)
            .process_group(0)
            .stderr(std::process::Stdio::piped());
        let child = c.spawn().unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(120);
        while !(t.join("started").exists() && sleeping_6007()) {
            assert!(Instant::now() < deadline, "the recipe never started");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        if sig == Signal::SIGINT {
            // Ctrl-C: the terminal signals the whole foreground group.
            nix::sys::signal::killpg(pid, sig).unwrap();
        } else {
            nix::sys::signal::kill(pid, sig).unwrap();
        }
        let o = child.wait_with_output().unwrap();
        use std::os::unix::process::ExitStatusExt;
        let shell_status = o.status.code().or(o.status.signal().map(|s| 128 + s));
        assert_eq!(
            shell_status,
            Some(128 + sig as i32),
            "{sig}: {:?} {}",
            o.status,
            text(&o.stderr)
        );
        if sig == Signal::SIGINT {
            assert_eq!(o.status.code(), Some(130), "mkt exits itself after Ctrl-C");
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while sleeping_6007() {
            assert!(
                Instant::now() < deadline,
                "{sig}: the recipe's sleep outlived mkt"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Whether a `sleep 6007` (the recipe's, above) runs on this host.
fn sleeping_6007() -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x006007\x00"))
}

/// The last lines of the build log that mkt's stderr names ("mkt: log:
/// PATH"): a failed build's cause is often above the lines mkt shows, and
/// the log goes with the test's temp dir.
fn log_tail(err: &str) -> String {
    let Some(path) = err.lines().find_map(|l| l.split("log: ").nth(1)) else {
        return String::new();
    };
    let path = path.trim().trim_end_matches(')');
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(60)..].join("\n");
    format!("\n--- the last lines of {path}:\n{tail}")
}

/// A command run as the test user (when Some): its stdout and stderr.
fn sh_out(user: Option<&TestUser>, script: &str) -> String {
    let mut c = Command::new("sh");
    c.args(["-ec", script]);
    if let Some(u) = user {
        c.uid(u.uid).gid(u.gid);
    }
    let o = c.output().unwrap();
    let out = format!("{}{}", text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{script}: {out}");
    out
}

/// kbuild's lines for work done (a no-op make prints none of them).
fn kbuild_work(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| {
            let w = l.split_whitespace().next().unwrap_or("");
            [
                "CC", "LD", "AR", "MODPOST", "GEN", "AS", "HOSTCC", "OBJCOPY",
            ]
            .contains(&w)
        })
        .collect()
}

/// Issue 16: `mkt build` and a plain `make` on the host are interchangeable
/// (ccache through PATH leaves kbuild's command lines alone); a change to a
/// module's own source makes just that module, and the result is what a
/// full build gives (a plain make after it has nothing to do); every other
/// change builds the whole tree and says why. As the unprivileged user.
#[test]
fn module_changes_take_the_fast_path_and_anything_else_the_whole_tree() {
    let Some(fixture) = common::kernel_tree() else {
        return;
    };
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    if common::program("make").is_none() || common::program("gcc").is_none() {
        return;
    }
    let user = user.as_ref();
    let home = common::temp_home(user);
    let (_work, tree) = copy_fixture_tree(user, &fixture, "mkt-fast-tree-");
    let t = tree.display();
    let r = rootfs.to_str().unwrap().to_string();
    // One mkt build: (status line, log text).
    let build = || {
        let o = build_as(user, home.path(), &tree, &["--rootfs", &r]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "stderr: {err}{}", log_tail(&err));
        let log = err
            .lines()
            .find_map(|l| l.split("log: ").nth(1))
            .map(|p| std::fs::read_to_string(p.trim_end_matches(')')).unwrap())
            .unwrap_or_default();
        (err, log)
    };
    let host_make = || sh_out(user, &format!("cd {t}; make -j2"));
    let append = |file: &str, line: &str| {
        sh_as(user, &format!("cd {t}; echo '{line}' >> {file}"));
        // Past the record's margin for edits made during a build.
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let whole_tree = |(err, log): (String, String), why: &str| {
        assert!(!err.contains("modules only"), "{err}");
        assert!(
            log.lines()
                .any(|l| l.starts_with("mkt: building the whole tree: ") && l.contains(why)),
            "wanted the whole tree because {why}; log:\n{log}"
        );
    };

    // The first build of the copy: no record yet, a whole (no-op) build.
    whole_tree(build(), "no record");
    // Plain make on the host after mkt build: nothing to do.
    let out = host_make();
    assert_eq!(kbuild_work(&out), Vec::<&str>::new(), "{out}");
    // mkt build after the host's make: that make rewrote outputs, so the
    // whole tree again, and nothing to compile either.
    let (err, log) = build();
    assert_eq!(kbuild_work(&log), Vec::<&str>::new(), "{log}");
    whole_tree((err, log), "changed");
    // Nothing changed since: no make at all.
    let (err, _) = build();
    assert!(err.contains("is up to date: nothing changed"), "{err}");

    // A module's own source: just that module.
    append(
        "drivers/net/dummy.c",
        "static const char mkt_fast[] __used = \"mkt-fast-marker-1\";",
    );
    let (err, log) = build();
    assert!(err.contains("(modules only: dummy.ko)"), "{err}\n{log}");
    let ko = std::fs::read(tree.join("drivers/net/dummy.ko")).unwrap();
    assert!(ko.windows(17).any(|w| w == b"mkt-fast-marker-1"));
    assert_eq!(
        std::fs::read_to_string(tree.join("modules.order")).unwrap(),
        std::fs::read_to_string(fixture.join("modules.order")).unwrap()
    );
    assert_eq!(
        std::fs::read(tree.join("Module.symvers")).unwrap(),
        std::fs::read(fixture.join("Module.symvers")).unwrap()
    );
    // ... and what a full build would give: a plain make has nothing to do.
    let out = host_make();
    assert_eq!(kbuild_work(&out), Vec::<&str>::new(), "{out}");
    build();

    // Everything else: the whole tree, with the reason, and the change in.
    append(
        "drivers/net/loopback.c",
        "static const char mkt_builtin[] __used = \"mkt-builtin-marker\";",
    );
    whole_tree(
        build(),
        "drivers/net/loopback.c changed and drivers/net/loopback.o is not part of a module",
    );
    let vmlinux = std::fs::read(tree.join("vmlinux")).unwrap();
    assert!(vmlinux.windows(18).any(|w| w == b"mkt-builtin-marker"));
    append("include/linux/if_tun.h", "/* mkt */");
    whole_tree(
        build(),
        "include/linux/if_tun.h changed (not a module's C source)",
    );
    append("drivers/net/Makefile", "# mkt");
    whole_tree(build(), "drivers/net/Makefile changed");
    sh_as(user, &format!("cd {t}; rm README"));
    whole_tree(build(), "README was removed");
    sh_as(
        user,
        &format!("cd {t}; touch drivers/net/mkt-new.c; sleep 0.2"),
    );
    whole_tree(build(), "drivers/net/mkt-new.c is new");
    // A module's source and a header together: the whole tree.
    append("drivers/net/dummy.c", "/* mkt 2 */");
    append("include/linux/if_tun.h", "/* mkt 2 */");
    whole_tree(build(), "if_tun.h changed");
    // A failed build leaves no record: the next one is whole.
    append("drivers/net/dummy.c", "static int mkt_broken = ;");
    let o = build_as(user, home.path(), &tree, &["--rootfs", &r]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    sh_as(user, &format!("cd {t}; sed -i '$d' drivers/net/dummy.c"));
    whole_tree(build(), "no record");
    // And after all that, mkt's tree is still what make makes.
    let out = host_make();
    assert_eq!(kbuild_work(&out), Vec::<&str>::new(), "{out}");
}

/// Issue 16's warm loop, as the unprivileged user: a VM of a setup runs
/// from a copy of the kernel tree (`mkt ssh` called the moment it starts);
/// a module changes; `mkt build` makes just
/// that module; `mkt run SETUP --reload -- CMD` reloads it in the running
/// VM and runs CMD there, word for word, with CMD's exit status; no reboot.
#[test]
fn warm_loop_build_reload_and_test_in_the_running_vm() {
    use std::io::BufRead;
    use std::process::Stdio;
    let Some(fixture) = common::kernel_tree() else {
        return;
    };
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let user = user.as_ref();
    let home = common::temp_home(user);
    let (_work, tree) = copy_fixture_tree(user, &fixture, "mkt-warm-tree-");
    let t = tree.display();
    let cfg = home.path().join("mkt.toml");
    std::fs::write(
        &cfg,
        format!(
            "[setup.warm]\nrootfs = \"{}\"\nkernel = \"{t}\"\n",
            rootfs.display()
        ),
    )
    .unwrap();
    let mkt = |args: &[&str]| {
        common::mkt_as(user, home.path())
            .args(args)
            .env("MKT_CONFIG", &cfg)
            .current_dir(&tree)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = mkt(&["build", "--rootfs", rootfs.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let mut vm = common::mkt_as(user, home.path())
        .args(["run", "warm", "--init", "shell"])
        .env("MKT_CONFIG", &cfg)
        .current_dir(home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // At once, as a script would: `mkt ssh` waits for the starting VM's
    // record, then for its sshd. Everything runs before the asserts, so
    // the VM is stopped whatever fails.
    let load = mkt(&["ssh", "warm", "--", "sudo", "modprobe", "dummy"]);
    let mut stderr = std::io::BufReader::new(vm.stderr.take().unwrap());
    let mut port_line = String::new();
    while stderr.read_line(&mut port_line).unwrap() > 0 && !port_line.contains("ssh on") {}
    sh_as(
        user,
        &format!("cd {t}; echo 'MODULE_VERSION(\"mkt-warm-1\");' >> drivers/net/dummy.c"),
    );
    let rebuilt = mkt(&["build", "--rootfs", rootfs.to_str().unwrap()]);
    let script = "printf '%s|' \"$@\"; cat /sys/module/dummy/version; exit 7";
    let reload = mkt(&[
        "run", "warm", "--reload", "--", "sh", "-c", script, "sh", "a  b", "$HOME",
    ]);
    let again = mkt(&["run", "warm", "--reload", "--", "true"]);
    let stop = mkt(&["stop", "warm", "--force"]);
    let _ = vm.wait();

    assert!(port_line.contains("ssh on 127.0.0.1:"), "{port_line}");
    assert_eq!(load.status.code(), Some(0), "{}", text(&load.stderr));
    let err = text(&rebuilt.stderr);
    assert_eq!(rebuilt.status.code(), Some(0), "{err}");
    let log = err
        .lines()
        .find_map(|l| l.split("log: ").nth(1))
        .and_then(|p| std::fs::read_to_string(p.trim_end_matches(')')).ok())
        .unwrap_or_default();
    assert!(err.contains("(modules only: dummy.ko)"), "{err}{log}");
    assert_eq!(
        reload.status.code(),
        Some(7),
        "{}{}",
        text(&reload.stdout),
        text(&reload.stderr)
    );
    assert_eq!(text(&reload.stdout), "a  b|$HOME|mkt-warm-1\n");
    assert!(
        text(&reload.stderr).contains("reloaded: dummy"),
        "{}",
        text(&reload.stderr)
    );
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("no modules changed"),
        "{}",
        text(&again.stderr)
    );
    assert!(stop.status.success(), "{}", text(&stop.stderr));
}
