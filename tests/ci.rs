//! `mkt ci` end to end, as the unprivileged test user when the suite runs
//! as root (CI): a repository borrowing the objects of the fixture
//! repository (Debian's linux-source-6.1, one commit), a sparse checkout of
//! drivers/net as the developer's working tree, and commits made here:
//!
//! - C0 adds pre-existing warnings (sparse and W=1) to drivers/net/dummy.c,
//! - C1 adds a file without SPDX tag and with a long line (checkpatch),
//! - C2 adds an address-space mismatch (sparse) and a set-but-unused
//!   variable (W=1) to dummy.c, above C0's code (which moves down),
//! - C3 rewords a comment (clean).
//!
//! One scratch tree serves every run, as it would for a developer.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::TestUser;
use serde_json::Value;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `sh -ec SCRIPT` in `dir` as the test user: its stdout.
fn sh_as(user: Option<&TestUser>, dir: &Path, script: &str) -> String {
    let mut c = Command::new("sh");
    c.args(["-ec", script]).current_dir(dir);
    if let Some(u) = user {
        c.uid(u.uid).gid(u.gid).env("HOME", &u.home);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{script}: {}", text(&o.stderr));
    text(&o.stdout)
}

fn ci(user: Option<&TestUser>, home: &Path, repo: &Path, args: &[&str]) -> Output {
    let mut c = common::mkt_as(user, home);
    c.arg("ci").args(args).current_dir(repo);
    c.output().expect("spawn mkt")
}

/// The commits, made with the developer's tools in the working tree.
const COMMITS: &str = r#"
export GIT_AUTHOR_DATE=2024-02-01T00:00:00Z GIT_COMMITTER_DATE=2024-02-01T00:00:00Z
cat >> drivers/net/dummy.c <<'EOF'

static int __maybe_unused mkt_ci_old(int __user *uptr)
{
	int *kptr = uptr;
	int old_seen;

	old_seen = 0;
	return *kptr;
}
EOF
git commit -q -a -s -m 'net: dummy: pre-existing warnings' -m 'Warnings that the next commits must not be blamed for.'
git rev-parse HEAD > ../c0

cat > drivers/net/mkt_ci_new.c <<'EOF'
/* A new file without a licence tag. */
static const char mkt_ci_text[] = "this line is much too long for the kernel's coding style, which wants fewer than one hundred columns";
EOF
git add -f drivers/net/mkt_ci_new.c
git commit -q -s -m 'net: add mkt_ci_new.c' -m 'A file checkpatch objects to.'
git rev-parse HEAD > ../c1

awk '{ print } /^static int numdummies = 1;$/ {
  print ""
  print "static int __maybe_unused mkt_ci_peek(int __user *uptr)"
  print "{"
  print "\tint *kptr = uptr;"
  print "\tint seen;"
  print ""
  print "\tseen = 0;"
  print "\treturn *kptr;"
  print "}"
}' drivers/net/dummy.c > ../dummy.c && cp ../dummy.c drivers/net/dummy.c
git commit -q -a -s -m 'net: dummy: add mkt_ci_peek' -m 'Reads a user pointer as a kernel one and sets a variable it never uses.'
git rev-parse HEAD > ../c2

sed -i 's|/\* dummy.c: a dummy net driver|/* dummy.c: a dummy network driver|' drivers/net/dummy.c
git commit -q -a -s -m 'net: dummy: reword the first comment' -m 'Network, not net.' \
    -m 'Change-Id: I0123456789abcdef0123456789abcdef01234567'
git rev-parse HEAD > ../c3
"#;

fn new_findings(report: &Value, check: &str) -> Vec<Value> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == check)
        .unwrap_or_else(|| panic!("no check {check} in {report}"))["new"]
        .as_array()
        .unwrap()
        .clone()
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
}

#[test]
fn kernel_commits_report_exactly_what_they_introduce() {
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    if !rootfs.join("usr/bin/sparse").exists() {
        common::unavailable::<()>(
            "sparse in the fixture rootfs (tests/fixtures/prepare.sh analysers)",
        );
        return;
    }
    let Some(fixture) = common::fixture("ci-repo.git", ".complete") else {
        return;
    };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let user = user.as_ref();
    let home = common::temp_home(user);
    let work = common::temp_home(user);
    let w = work.path();
    // The developer's repository: borrows the fixture's objects, a sparse
    // checkout of drivers/net (a clone's working tree, without the wait).
    let base = text(
        &Command::new("git")
            .args(["-c", "safe.directory=*", "--git-dir"])
            .arg(&fixture)
            .args(["rev-parse", "master"])
            .output()
            .unwrap()
            .stdout,
    );
    sh_as(
        user,
        w,
        &format!(
            "git init -q -b master linux; cd linux
             echo {f}/objects > .git/objects/info/alternates
             git update-ref refs/heads/master {b}
             git sparse-checkout set drivers/net; git checkout -q master
             git config user.name 'Mkt Test'; git config user.email mkt@example.invalid
             {COMMITS}",
            f = fixture.display(),
            b = base.trim()
        ),
    );
    let repo = w.join("linux");
    let rev = |n: &str| {
        std::fs::read_to_string(w.join(n))
            .unwrap()
            .trim()
            .to_string()
    };
    let (c1, c2, c3) = (rev("c1"), rev("c2"), rev("c3"));
    let r = rootfs.to_str().unwrap();
    let quiet = ["--rootfs", r, "--no-smatch", "--no-clang"];

    // C2 in the background; the developer edits dummy.c meanwhile.
    let t0 = Instant::now();
    let mut args = vec!["--rev", &c2];
    args.extend(quiet);
    let o = ci(user, home.path(), &repo, &args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "not in the background"
    );
    let id = text(&o.stdout).trim().to_string();
    assert!(id.parse::<u64>().is_ok(), "job id: {id:?}");
    let dummy = repo.join("drivers/net/dummy.c");
    let edit = "\nstatic int __maybe_unused mkt_ci_edit(void)\n{\n\tint edited;\n\n\tedited = 1;\n\treturn 0;\n}\n";
    let mut content = std::fs::read_to_string(&dummy).unwrap();
    content.push_str(edit);
    sh_as(
        user,
        w,
        &format!("cat >> {} <<'EOF'\n{edit}\nEOF", dummy.display()),
    );
    let report = loop {
        let o = ci(user, home.path(), &repo, &["--status", &id, "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}{}", text(&o.stdout), text(&o.stderr)));
        match v["job"]["state"].as_str().unwrap() {
            "done" => break v["report"].clone(),
            "failed" => {
                let log = ci(user, home.path(), &repo, &["--log", &id]);
                panic!("job failed: {v}\n{}", text(&log.stdout));
            }
            _ => {}
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1200),
            "job {id} too slow"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    eprintln!(
        "background run on C2 (first, with the scratch checkout): {:?}",
        t0.elapsed()
    );
    let log = ci(user, home.path(), &repo, &["--log", &id]);
    let log = text(&log.stdout);
    assert!(log.contains("make W=1 drivers/net/"), "{log}");
    // Exactly C2's two findings: not C0's (moved down by C2), not the edit.
    let sparse = new_findings(&report, "sparse");
    assert_eq!(sparse.len(), 1, "{report:#}");
    assert_eq!(sparse[0]["file"], "drivers/net/dummy.c");
    assert_eq!(sparse[0]["line"], 50);
    assert!(
        sparse[0]["message"]
            .as_str()
            .unwrap()
            .contains("different address spaces"),
        "{report:#}"
    );
    let warnings = new_findings(&report, "warnings");
    assert_eq!(warnings.len(), 1, "{report:#}");
    let msg = warnings[0]["message"].as_str().unwrap();
    assert!(
        msg.contains("seen") && msg.contains("-Wunused-but-set-variable"),
        "{msg}"
    );
    assert!(!msg.contains("old_seen"), "{msg}");
    assert_eq!(warnings[0]["line"], 51);
    for c in ["sparse", "warnings"] {
        assert_eq!(check(&report, c)["preexisting"], 1, "{c}: {report:#}");
    }
    assert!(new_findings(&report, "checkpatch").is_empty(), "{report:#}");
    assert_eq!(report["dirs"], serde_json::json!(["drivers/net"]));
    assert_eq!(report["exit"], 1);
    assert!(!report.to_string().contains("mkt_ci_edit") && !report.to_string().contains("edited"));
    // The working tree: the edit still there, nothing else changed.
    assert_eq!(
        std::fs::read_to_string(&dummy).unwrap(),
        format!("{content}\n")
    );
    let st = sh_as(user, &repo, "git status --porcelain; git rev-parse HEAD");
    assert_eq!(st, format!(" M drivers/net/dummy.c\n{c3}\n"));
    // The human view of the same job exits with the job's status.
    let o = ci(user, home.path(), &repo, &["--status", &id]);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o.stdout);
    assert!(
        out.contains("sparse: 1 new; 1 pre-existing not shown"),
        "{out}"
    );
    assert!(out.contains("smatch: disabled (--no-smatch)"), "{out}");

    // C1, in the foreground, with a JUnit file: checkpatch's findings only.
    let junit = w.join("c1.xml");
    let t0 = Instant::now();
    let mut args = vec!["--rev", &c1, "--wait", "--json", "--junit"];
    let junit_s = junit.to_str().unwrap();
    args.push(junit_s);
    args.extend(quiet);
    let o = ci(user, home.path(), &repo, &args);
    eprintln!("C1: {:?}", t0.elapsed());
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut kinds: Vec<String> = new_findings(&report, "checkpatch")
        .iter()
        .map(|f| f["kind"].as_str().unwrap().to_string())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["FILE_PATH_CHANGES", "LONG_LINE", "SPDX_LICENSE_TAG"],
        "{report:#}"
    );
    for c in ["sparse", "warnings"] {
        assert!(new_findings(&report, c).is_empty(), "{c}: {report:#}");
        assert_eq!(check(&report, c)["status"], "ran");
    }
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("not analysed: drivers/net/mkt_ci_new.c"),
        "{notes}"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("failures=\"1\" errors=\"0\" skipped=\"2\""),
        "{xml}"
    );
    assert!(xml.contains("LONG_LINE"), "{xml}");

    // C3, clean: exit 0; --show-all lists what is already there.
    let t0 = Instant::now();
    let mut args = vec!["--rev", &c3, "--wait", "--show-all"];
    args.extend(quiet);
    let o = ci(user, home.path(), &repo, &args);
    eprintln!("C3: {:?}", t0.elapsed());
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", text(&o.stderr));
    assert!(out.contains("result: no new findings (exit 0"), "{out}");
    assert!(out.contains("sparse: nothing new; 2 pre-existing"), "{out}");
    assert!(
        out.contains("old drivers/net/dummy.c:51: warning: variable"),
        "{out}"
    );

    // smatch and clang are not in the fixture rootfs: "not run", exit 2
    // (3 with the gerrit Change-Id checkpatch now reports).
    let o = ci(
        user,
        home.path(),
        &repo,
        &[
            "--rev",
            &c3,
            "--wait",
            "--rootfs",
            r,
            "--no-sparse",
            "--no-warnings",
            "--no-ignore-gerrit",
        ],
    );
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(3), "{out}{}", text(&o.stderr));
    assert!(out.contains("checkpatch: 1 new"), "{out}");
    assert!(out.contains("GERRIT_CHANGE_ID"), "{out}");
    assert!(
        out.contains("smatch: NOT RUN (smatch is not installed in the rootfs"),
        "{out}"
    );
    assert!(
        out.contains("clang: NOT RUN (clang is not installed in the rootfs"),
        "{out}"
    );
    assert!(
        out.contains("1 new finding; not run: smatch, clang (exit 3"),
        "{out}"
    );

    // Every job is listed.
    let o = ci(user, home.path(), &repo, &["--status"]);
    assert_eq!(text(&o.stdout).lines().count(), 4, "{}", text(&o.stdout));

    // --kernel-config FILE: the job analyses with that config (copied to
    // .config, then olddefconfig) and names it; one without CONFIG_DUMMY
    // leaves the touched dummy.c uncompiled, which the report says.
    let Some(tree) = common::kernel_tree() else {
        return;
    };
    let no_dummy: String = std::fs::read_to_string(tree.join(".config"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("CONFIG_DUMMY="))
        .map(|l| format!("{l}\n"))
        .collect();
    let kcfg = home.path().join("no-dummy.config");
    std::fs::write(&kcfg, no_dummy).unwrap();
    let t0 = Instant::now();
    let o = ci(
        user,
        home.path(),
        &repo,
        &[
            "--rev",
            &c3,
            "--wait",
            "--json",
            "--rootfs",
            r,
            "--kernel-config",
            kcfg.to_str().unwrap(),
            "--no-checkpatch",
            "--no-sparse",
            "--no-smatch",
            "--no-clang",
        ],
    );
    eprintln!("C3 with --kernel-config: {:?}", t0.elapsed());
    let report: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&o.stdout), text(&o.stderr)));
    assert_eq!(o.status.code(), Some(0), "{report:#}");
    assert_eq!(
        report["kernel_config"],
        kcfg.to_str().unwrap(),
        "{report:#}"
    );
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("not analysed: drivers/net/dummy.c"),
        "{notes}"
    );
}

#[test]
fn errors_name_what_is_wrong() {
    let home = tempfile::tempdir().unwrap();
    let o = ci(None, home.path(), home.path(), &["--status", "42"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("no job 42"), "{}", text(&o.stderr));
    // Not a repository.
    let o = ci(None, home.path(), home.path(), &["--rootfs", "/", "--wait"]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.contains("is not a git repository"), "{err}");
    // A bad revision, in a repository.
    let repo = home.path().join("r");
    std::fs::create_dir(&repo).unwrap();
    assert!(
        Command::new("git")
            .args(["init", "-q"])
            .current_dir(&repo)
            .status()
            .unwrap()
            .success()
    );
    let o = ci(
        None,
        home.path(),
        &repo,
        &["--rootfs", "/", "--rev", "nope"],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.contains("\"nope\" is not a commit"), "{err}");
}

/// iproute2 (a small stand-in with its shape): the warnings build with
/// `mkt build`'s steps on both revisions, checkpatch from the config's
/// kernel tree (`--no-tree`), the kernel-only checks disabled.
#[test]
fn iproute2_commit_gets_a_warnings_build_and_checkpatch() {
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    let Some(kernel) = common::kernel_tree() else {
        return;
    };
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let user = user.as_ref();
    let home = common::temp_home(user);
    let work = common::temp_home(user);
    let cfg = home.path().join(".config/mkt");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.toml"),
        format!("[defaults]\nkernel = \"{}\"\n", kernel.display()),
    )
    .unwrap();
    if let Some(u) = user {
        sh_as(
            None,
            home.path(),
            &format!("chown -R {}:{} .config", u.uid, u.gid),
        );
    }
    sh_as(
        user,
        work.path(),
        r#"mkdir iproute2; cd iproute2; git init -q -b main
        git config user.name 'Mkt Test'; git config user.email mkt@example.invalid
        mkdir ip
        printf '#!/bin/sh\necho CONFIGURED=1 > config.mk\n' > configure; chmod +x configure
        printf 'CC ?= cc\nall:\n\t$(CC) -Wall -c ip/ip.c -o ip/ip.o\nclean:\n\trm -f ip/*.o config.mk\n' > Makefile
        printf 'config.mk\n*.o\n' > .gitignore
        printf '// SPDX-License-Identifier: GPL-2.0\nint main(void)\n{\n\tint old;\n\n\treturn 0;\n}\n' > ip/ip.c
        git add -A; git commit -q -s -m 'ip: base' -m 'With a pre-existing warning.'
        sed -i 's/^\tint old;$/\tint fresh;\n\tint old;/' ip/ip.c
        git commit -q -a -s -m 'ip: add a variable' -m 'Never used.'"#,
    );
    let repo = work.path().join("iproute2");
    let o = ci(
        user,
        home.path(),
        &repo,
        &[
            "iproute2",
            "--wait",
            "--json",
            "--rootfs",
            rootfs.to_str().unwrap(),
        ],
    );
    let report: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&o.stdout), text(&o.stderr)));
    assert_eq!(o.status.code(), Some(1), "{report:#}");
    let w = new_findings(&report, "warnings");
    assert_eq!(w.len(), 1, "{report:#}");
    assert_eq!(w[0]["file"], "ip/ip.c");
    assert_eq!(w[0]["line"], 4);
    assert!(
        w[0]["message"].as_str().unwrap().contains("fresh"),
        "{report:#}"
    );
    assert_eq!(check(&report, "warnings")["preexisting"], 1);
    assert_eq!(check(&report, "checkpatch")["status"], "ran", "{report:#}");
    for c in ["sparse", "smatch", "clang"] {
        assert_eq!(check(&report, c)["status"], "disabled", "{report:#}");
    }
    assert_eq!(report["project"], "iproute2");

    // JOBS: a job waits (`queued`) while another holds the scratch tree;
    // one whose process disappears shows as `failed`, and `--status ID`
    // exits 2 for it. The test holds the tree's lock as a job would.
    let scratch: Vec<_> = std::fs::read_dir(home.path().join(".cache/mkt/ci"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("lock").exists())
        .collect();
    assert_eq!(scratch.len(), 1, "{scratch:?}");
    let held = nix::fcntl::Flock::lock(
        std::fs::File::open(scratch[0].join("lock")).unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .map_err(|(_, e)| e)
    .unwrap();
    let o = ci(
        user,
        home.path(),
        &repo,
        &["iproute2", "--rootfs", rootfs.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let id = text(&o.stdout).trim().to_string();
    let log = home
        .path()
        .join(format!(".local/state/mkt/logs/ci/{id}.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("waiting for another job's scratch tree")
    {
        assert!(Instant::now() < deadline, "the job never waited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = ci(user, home.path(), &repo, &["--status", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("  queued ("),
        "{}",
        text(&o.stdout)
    );
    let o = ci(user, home.path(), &repo, &["--status", &id, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["job"]["state"], "queued", "{v:#}");
    let pid = nix::unistd::Pid::from_raw(v["job"]["pid"].as_i64().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    while nix::sys::signal::kill(pid, None).is_ok() {
        assert!(Instant::now() < deadline, "the job outlived SIGKILL");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held);
    let o = ci(user, home.path(), &repo, &["--status", &id]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains(&format!(
            "failed: the job's process ({pid}) ended without finishing"
        )),
        "{out}"
    );
    let o = ci(user, home.path(), &repo, &["--status"]);
    assert!(
        text(&o.stdout)
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{id} ")) && l.contains("failed: ")),
        "{}",
        text(&o.stdout)
    );
}
