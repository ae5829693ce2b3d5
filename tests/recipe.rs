//! `mkt rootfs build`: real recipes bootstrapped from Debian's mirror with
//! mmdebstrap, steps run in the tree, then booted under `mkt run`.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Output;

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn first_subuid(user: &str, uid: u32) -> Option<u32> {
    let t = std::fs::read_to_string("/etc/subuid").ok()?;
    mkt::host::probe::subid_ranges(&t, user, uid)
        .first()
        .map(|(s, _)| *s as u32)
}

/// A small recipe: minbase + sudo, a file, a user made by a setup step.
const MINI: &str = r#"
description = "mkt test: minbase with sudo"
packages = ["sudo"]
setup = ["useradd -m -u 1234 alice", "echo made-by-setup > /etc/mkt-setup"]
[base]
suite = "bookworm"
mirror = "http://deb.debian.org/debian"
variant = "minbase"
[files]
"/etc/mkt-test" = "hello from the recipe\n"
"#;

fn store_dirs(home: &Path) -> Vec<String> {
    let store = home.join(".local/share/mkt/rootfs");
    let mut v: Vec<String> = std::fs::read_dir(&store)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".meta")
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// As the unprivileged user (with a subuid range): the tree keeps the
/// image's real owners shifted by the subuids, the guest sees them (setuid
/// sudo works), a rebuild reuses the cached base, a failing step stores
/// nothing, and rm/gc clean up files the user does not own on the host.
#[test]
fn rootless_recipe_keeps_real_owners_boots_and_cleans_up() {
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let (Some(kernel), Some(_)) = (common::kernel_tree(), common::program("mmdebstrap")) else {
        return;
    };
    let (name, uid) = match &user {
        Some(u) => (u.name.clone(), u.uid),
        None => (
            std::env::var("USER").unwrap_or_default(),
            nix::unistd::getuid().as_raw(),
        ),
    };
    let Some(sub) = first_subuid(&name, uid) else {
        common::unavailable::<()>(&format!("a subuid range for {name} in /etc/subuid"));
        return;
    };
    let home = common::temp_home(user.as_ref());
    let recipe = home.path().join("mini.toml");
    std::fs::write(&recipe, MINI).unwrap();
    let mkt = || common::mkt_as(user.as_ref(), home.path());

    let o = mkt()
        .args(["rootfs", "build"])
        .arg(&recipe)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("rootfs mini ready at"), "{out}");
    assert!(
        err.contains("bootstrapping bookworm with mmdebstrap --mode=unshare"),
        "{err}"
    );

    // Listed with its recipe and owner form; `path` prints the tree.
    let o = mkt().args(["rootfs", "list", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let entry = &list.as_array().unwrap()[0];
    assert_eq!(entry["name"], "mini");
    assert_eq!(entry["recipe"], "mini");
    assert_eq!(entry["owners"], "mapped");
    let o = mkt().args(["rootfs", "path", "mini"]).output().unwrap();
    let tree = std::path::PathBuf::from(text(&o).0.trim());
    assert_eq!(tree, home.path().join(".local/share/mkt/rootfs/mini"));

    // On the host: root's files are the user's, alice's a subuid's; modes
    // (setuid) are real.
    let sudo = std::fs::metadata(tree.join("usr/bin/sudo")).unwrap();
    assert_eq!((sudo.uid(), sudo.mode() & 0o7777), (uid, 0o4755));
    let alice = std::fs::metadata(tree.join("home/alice")).unwrap();
    assert_eq!(alice.uid(), sub + 1233);
    assert_eq!(
        std::fs::read_to_string(tree.join("etc/mkt-test")).unwrap(),
        "hello from the recipe\n"
    );

    // `shell`: root inside, real owners, read-only by default.
    let o = mkt()
        .args(["rootfs", "shell", "mini", "--"])
        .args([
            "sh",
            "-c",
            "id -u; stat -c '%u %a' /usr/bin/sudo; stat -c %u /home/alice; cat /etc/mkt-setup; \
             touch /x 2>/dev/null && echo WRITABLE || echo READONLY",
        ])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(out, "0\n0 4755\n1234\nmade-by-setup\nREADONLY\n");

    // The guest sees the real owners, and sudo (setuid root) works.
    let o = mkt()
        .args(["run", "--rootfs", "mini", "--kernel"])
        .arg(&kernel)
        .args([
            "--",
            "sh",
            "-c",
            "stat -c '%u %a' /usr/bin/sudo /etc/sudoers; stat -c %u /home/alice; sudo -n id -u",
        ])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(out, "0 4755\n0 440\n1234\n0\n", "{err}");

    // An unchanged base is reused.
    let o = mkt()
        .args(["rootfs", "build", "--force"])
        .arg(&recipe)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("cached base reused"), "{out}");

    // A failing step: its status, last lines and log; nothing stored.
    let bad = home.path().join("bad.toml");
    std::fs::write(
        &bad,
        MINI.replace("setup = [", "setup = [\"echo about-to-fail; exit 3\", "),
    )
    .unwrap();
    let o = mkt().args(["rootfs", "build"]).arg(&bad).output().unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("building rootfs bad failed: the recipe's steps exited with status 3"),
        "{err}"
    );
    assert!(
        err.contains("about-to-fail") && err.contains("log: "),
        "{err}"
    );
    assert_eq!(store_dirs(home.path()), ["mini"]);

    // rm removes files owned by subuids; gc then drops the cached base.
    let o = mkt().args(["rootfs", "rm", "mini"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(store_dirs(home.path()).is_empty());
    let o = mkt().args(["rootfs", "gc"]).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.starts_with("removed 1 unused blobs"), "{out}");
}

/// With no --rootfs and no config, `mkt run -- CMD` builds the default
/// recipe (Debian with its cloud kernel) and boots it: the README's
/// main-job command on a machine with nothing else set up.
#[test]
fn default_recipe_builds_on_first_run_and_boots_its_own_kernel() {
    let (Some(_), Some(_)) = (
        common::program("mmdebstrap"),
        common::program("qemu-system-x86_64"),
    ) else {
        return;
    };
    if !nix::unistd::getuid().is_root()
        && first_subuid(
            &std::env::var("USER").unwrap_or_default(),
            nix::unistd::getuid().as_raw(),
        )
        .is_none()
    {
        common::unavailable::<()>("root or a subuid range to build the default recipe");
        return;
    }
    let home = common::temp_home(None);
    let o = common::mkt(home.path())
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "uname -r; id -un; systemctl --version | head -1",
        ])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        err.contains("no rootfs debian-bookworm in") && err.contains("building it from its recipe"),
        "{err}"
    );
    let mut lines = out.lines();
    let release = lines.next().unwrap_or_default();
    assert!(release.ends_with("-cloud-amd64"), "{out}");
    assert!(lines.next().is_some_and(|u| !u.is_empty()));
    assert!(
        lines.next().unwrap_or_default().starts_with("systemd 252"),
        "{out}"
    );
    let o = common::mkt(home.path())
        .args(["rootfs", "list"])
        .output()
        .unwrap();
    let (out, _) = text(&o);
    assert!(
        out.contains("debian-bookworm  recipe:debian-bookworm"),
        "{out}"
    );

    // The recipe carries iproute2's build dependencies (MKT's support
    // image): Debian's iproute2 source is discovered and built in it.
    let Some(curl) = common::program("curl") else {
        return;
    };
    let src = home.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let st = std::process::Command::new(curl)
        .args(["-fsSL", "-o"])
        .arg(src.join("iproute2.tar.xz"))
        .arg("http://deb.debian.org/debian/pool/main/i/iproute2/iproute2_6.1.0.orig.tar.xz")
        .status()
        .unwrap();
    assert!(st.success(), "download iproute2's source from Debian");
    let st = std::process::Command::new("tar")
        .arg("-xf")
        .arg(src.join("iproute2.tar.xz"))
        .arg("-C")
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let tree = src.join("iproute2-6.1.0");
    let o = common::mkt(home.path())
        .args(["build", "--rootfs", "debian-bookworm", "-C"])
        .arg(&tree)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(err.contains("iproute2"), "{err}");
    let ip = tree.join("ip/ip");
    let meta = std::fs::metadata(&ip).unwrap();
    assert_eq!(meta.uid(), nix::unistd::getuid().as_raw());
    let o = std::process::Command::new(&ip).arg("-V").output().unwrap();
    assert!(text(&o).0.contains("ip utility"), "{}", text(&o).0);
}

/// A user with neither root nor a subuid range is told how to get one.
#[test]
fn no_subuid_range_is_a_clear_error() {
    if !nix::unistd::getuid().is_root() {
        // Locally the current user usually has a range; CI runs as root.
        common::unavailable::<()>("root (to run as `nobody`, who has no subuid range)");
        return;
    }
    let nobody = common::TestUser {
        name: "nobody".into(),
        uid: 65534,
        gid: 65534,
        home: "/nonexistent".into(),
    };
    let home = common::temp_home(Some(&nobody));
    let recipe = home.path().join("mini.toml");
    std::fs::write(&recipe, MINI).unwrap();
    let o = common::mkt_as(Some(&nobody), home.path())
        .args(["rootfs", "build"])
        .arg(&recipe)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot build rootfs mini as this user"),
        "{err}"
    );
    // The advice names a range no other user has (not a fixed 100000-165535,
    // which mkt-ci has here).
    let r = mkt::host::probe::suggested_subid_range();
    assert!(
        err.contains("nobody has no subordinate uid range in /etc/subuid")
            && err.contains(&format!(
                "sudo usermod --add-subuids {r} --add-subgids {r} nobody"
            )),
        "{err}"
    );
    assert!(store_dirs(home.path()).is_empty());
}
