//! Exit statuses: every status a page's EXIT STATUS section promises has a
//! test that asserts it ([`STATUSES`] maps each to its test, and
//! `every_documented_exit_status_has_a_test` keeps the map in step with
//! docs/), plus the tests no other file had: what the guest init reports
//! for a command killed by a signal, not found, or not executable, and
//! usage errors of every subcommand.

mod common;

use std::path::Path;
use std::process::Output;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `mkt run -- CMD` in command mode passes on what the guest init saw:
/// 128+N for a command killed by signal N (SIGKILL: 137), 127 for a command
/// that does not exist, 126 for one that cannot be executed, as shells
/// report them. Three boots (one status each), as the unprivileged user;
/// two of them also check `--accel`: `tcg` says nothing of KVM, `kvm` on a
/// host where KVM is unusable says so and why, in one line.
#[test]
fn guest_command_killed_missing_or_not_executable_gives_137_127_126() {
    let Some(tree) = common::kernel_tree() else {
        return;
    };
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    if common::program("qemu-system-x86_64").is_none() {
        return;
    }
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let user = user.as_ref();
    let home = common::temp_home(user);
    let accel_note = common::expected_accel_note(user);
    let boot = |accel: &str, cmd: &[&str]| -> (Output, String) {
        let o = common::mkt_as(user, home.path())
            .args(["run", "--accel", accel, "--cpus", "2", "--rootfs"])
            .arg(&rootfs)
            .arg("--kernel")
            .arg(&tree)
            .arg("--")
            .args(cmd)
            .current_dir(home.path())
            .output()
            .expect("spawn mkt");
        let err = text(&o.stderr);
        (o, err)
    };

    // The check runs first, then `exec`s the shell that kills itself: the
    // init's own child dies of SIGKILL (a shell in between would turn the
    // signal into an exit status of its own).
    let (o, err) = boot(
        "tcg",
        &common::guest_checked(&["sh", "-c", "echo out; kill -9 $$"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(o.status.code(), Some(137), "{err}");
    assert_eq!(text(&o.stdout), "out\n");
    let rest = common::assert_guest_clean(&err, 2);
    assert!(!rest.contains("mkt: error"), "{rest}");
    assert!(!rest.contains("KVM"), "--accel tcg: {rest}");

    // The init execs the command itself, so no shell says 127 for it.
    let (o, err) = boot("kvm", &["/no/such/command", "arg"]);
    assert_eq!(o.status.code(), Some(127), "{err}");
    let kvm: Vec<&str> = err.lines().filter(|l| l.contains("KVM")).collect();
    match accel_note
        .as_deref()
        .and_then(|n| n.strip_prefix("mkt: KVM unusable ("))
    {
        Some(why) => {
            let why = why.strip_suffix("), using TCG").unwrap();
            let want =
                format!("mkt: KVM was requested but cannot be used ({why}), using TCG instead");
            assert_eq!(kvm, [want.as_str()], "{err}");
        }
        None => assert!(kvm.is_empty(), "{err}"),
    }
    assert!(
        err.lines().any(
            |l| l == "mkt: cannot run /no/such/command: No such file or directory (os error 2)"
        ),
        "{err}"
    );

    // A file without execute permission: EACCES.
    let (o, err) = boot("tcg", &["/etc/passwd"]);
    assert_eq!(o.status.code(), Some(126), "{err}");
    assert!(
        err.lines()
            .any(|l| l == "mkt: cannot run /etc/passwd: Permission denied (os error 13)"),
        "{err}"
    );
}

/// Usage errors exit 2, for every subcommand (also nested ones such as
/// `rootfs pull`), and name the bad flag; `completions` with an unknown
/// shell is one too.
#[test]
fn every_subcommand_exits_2_on_a_usage_error() {
    use clap::CommandFactory;
    let home = tempfile::tempdir().unwrap();
    let mut paths: Vec<Vec<String>> = Vec::new();
    fn walk(c: &clap::Command, path: Vec<String>, out: &mut Vec<Vec<String>>) {
        for s in c.get_subcommands().filter(|s| !s.is_hide_set()) {
            let mut p = path.clone();
            p.push(s.get_name().to_string());
            out.push(p.clone());
            walk(s, p, out);
        }
    }
    walk(&mkt::cli::Cli::command(), Vec::new(), &mut paths);
    assert!(paths.len() > 10, "{paths:?}");
    for p in &paths {
        let o = common::mkt(home.path())
            .args(p)
            .arg("--no-such-flag")
            .output()
            .unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{p:?}: {err}");
        assert!(err.contains("--no-such-flag"), "{p:?}: {err}");
    }
    let o = common::mkt(home.path())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("tcsh"), "{err}");
}

/// `mkt man --out DIR` exits 1 naming DIR when it cannot be written.
#[test]
fn man_exits_1_when_its_directory_cannot_be_written() {
    let home = tempfile::tempdir().unwrap();
    // A regular file where the directory should be: not writable even by root.
    let file = home.path().join("file");
    std::fs::write(&file, "").unwrap();
    let dir = file.join("man");
    let o = common::mkt(home.path())
        .args(["man", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.starts_with("mkt: error: "), "{err}");
    assert!(err.contains(&dir.display().to_string()), "{err}");
}

/// `mkt doctor` exits 1 when a required check fails (no QEMU on PATH), 0
/// otherwise (the other doctor tests check the status matches the report).
#[test]
fn doctor_exits_1_when_a_required_check_fails() {
    let home = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let o = common::mkt(home.path())
        .args(["doctor", "--json"])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}{}", text(&o.stderr));
    let checks: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let qemu = checks.iter().find(|c| c["name"] == "qemu").unwrap();
    assert_eq!(qemu["status"], "missing", "{qemu}");
    assert_eq!(qemu["required"], true, "{qemu}");
}

/// `mkt ssh` and `mkt stop` exit 1 when no VM (of that name) runs, naming
/// what is missing; `mkt stop --all` with none running is done: 0.
#[test]
fn ssh_and_stop_exit_1_without_a_vm_and_stop_all_0() {
    let home = tempfile::tempdir().unwrap();
    for (args, want) in [
        (
            &["ssh", "--", "true"][..],
            "mkt: error: no VM is running (start one with `mkt run`)",
        ),
        (
            &["ssh", "vm1", "--", "true"],
            "mkt: error: no running VM named \"vm1\" (running: none)",
        ),
        (&["stop"], "mkt: error: no VM is running"),
        (
            &["stop", "vm1"],
            "mkt: error: no running VM named \"vm1\" (running: none)",
        ),
    ] {
        let o = common::mkt(home.path()).args(args).output().unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim_end(), want, "{args:?}");
    }
    let o = common::mkt(home.path())
        .args(["stop", "--all"])
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(err, "mkt: no VM is running; nothing to stop\n");
}

/// `git ...` in `dir`, which must succeed.
fn git(dir: &Path, args: &[&str]) {
    let o = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=Mkt Test",
            "-c",
            "user.email=mkt@example.invalid",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "git {args:?}: {}", text(&o.stderr));
}

/// `mkt ci --wait` on an iproute2-like commit (a small stand-in with its
/// shape): 2 when a check cannot run (checkpatch, with no kernel tree in
/// the config) and nothing is new; 0 once that check is turned off
/// (`--no-checkpatch`). The repository is named by `-C`.
#[test]
fn ci_exits_2_when_a_check_cannot_run_and_0_without_it() {
    let Some(rootfs) = common::rootfs() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("iproute2");
    std::fs::create_dir_all(repo.join("ip")).unwrap();
    let write = |p: &str, s: &str| std::fs::write(repo.join(p), s).unwrap();
    write("configure", "#!/bin/sh\necho CONFIGURED=1 > config.mk\n");
    std::process::Command::new("chmod")
        .args(["+x"])
        .arg(repo.join("configure"))
        .status()
        .unwrap();
    write(
        "Makefile",
        "CC ?= cc\nall:\n\t$(CC) -Wall -c ip/ip.c -o ip/ip.o\nclean:\n\trm -f ip/*.o config.mk\n",
    );
    write(".gitignore", "config.mk\n*.o\n");
    let c = "// SPDX-License-Identifier: GPL-2.0\nint main(void)\n{\n\treturn 0;\n}\n";
    write("ip/ip.c", c);
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-s", "-m", "ip: base"]);
    write("ip/ip.c", &c.replace("return 0", "return 1"));
    git(
        &repo,
        &[
            "commit",
            "-q",
            "-a",
            "-s",
            "-m",
            "ip: return 1",
            "-m",
            "Clean.",
        ],
    );
    let ci = |extra: &[&str]| {
        let o = common::mkt(home.path())
            .args(["ci", "iproute2", "--wait", "-C"])
            .arg(&repo)
            .arg("--rootfs")
            .arg(&rootfs)
            .args(extra)
            .current_dir(home.path())
            .output()
            .unwrap();
        (o.status.code(), text(&o.stdout), text(&o.stderr))
    };
    let (code, out, err) = ci(&[]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.contains("checkpatch: NOT RUN ("), "{out}");
    assert!(out.contains("warnings: nothing new"), "{out}");
    assert!(
        out.contains("result: no new findings; not run: checkpatch (exit 2"),
        "{out}"
    );
    let (code, out, err) = ci(&["--no-checkpatch"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("checkpatch: disabled (--no-checkpatch)"),
        "{out}"
    );
    assert!(out.contains("result: no new findings (exit 0"), "{out}");
}

/// A background `mkt ci` exits 0 printing the job's id; `--status ID` is 0
/// while the job is queued (its scratch tree held by another job: here the
/// test) and, once the job has failed, 2.
#[test]
fn ci_status_is_0_while_a_job_waits_and_2_once_it_failed() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("r");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    git(&repo, &["commit", "-q", "--allow-empty", "-m", "x"]);
    // No project in the tree: the job fails once it runs.
    let submit = || {
        let o = common::mkt(home.path())
            .args(["ci", "--rootfs", "/"])
            .current_dir(&repo)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        text(&o.stdout).trim().to_string()
    };
    let status = |id: &str| {
        let o = common::mkt(home.path())
            .args(["ci", "--status", id])
            .current_dir(&repo)
            .output()
            .unwrap();
        (o.status.code(), text(&o.stdout), text(&o.stderr))
    };
    let wait_failed = |id: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let (code, out, err) = status(id);
            if out.contains("failed: ") {
                return (code, out, err);
            }
            assert!(std::time::Instant::now() < deadline, "{out}{err}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    // The first job makes the scratch tree (and its lock) and fails.
    let first = submit();
    assert_eq!(first, "1");
    let (code, out, err) = wait_failed(&first);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.contains("no project found in"), "{out}");
    // With the scratch tree's lock held, the next job waits: queued, 0.
    let locks: Vec<_> = std::fs::read_dir(home.path().join(".cache/mkt/ci"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("lock"))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(locks.len(), 1, "{locks:?}");
    let held = nix::fcntl::Flock::lock(
        std::fs::File::open(&locks[0]).unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .unwrap_or_else(|_| panic!("{} is held", locks[0].display()));
    let second = submit();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (code, out, err) = status(&second);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(" queued ("), "{out}");
    drop(held);
    let (code, out, err) = wait_failed(&second);
    assert_eq!(code, Some(2), "{out}{err}");
}

/// Every exit status a command's page promises (docs/CMD.md, "## EXIT
/// STATUS"), what it means, and the test that asserts it (`FILE::TEST`, a
/// file under tests/ or `src/...` for a unit test). A new promise in docs/
/// fails `every_documented_exit_status_has_a_test` until a row names its test.
/// The "pass" rows are statuses passed on from another program; a test
/// written `untested: WHY` is a promise no test checks yet, and why.
#[rustfmt::skip]
const STATUSES: &[(&str, &str, &str, &str)] = &[
    // (command, status, meaning, test)
    ("build", "0", "built", "build.rs::one_file_rebuild_as_the_user_then_a_compile_error"),
    ("build", "1", "a step fails", "build.rs::one_file_rebuild_as_the_user_then_a_compile_error"),
    ("build", "1", "no project", "build.rs::an_empty_directory_is_not_a_project"),
    ("build", "2", "usage error", "exit.rs::every_subcommand_exits_2_on_a_usage_error"),
    ("build", "130", "Ctrl-C", "build.rs::ctrl_c_stops_a_build_with_status_130"),
    ("build", "143", "SIGTERM", "build.rs::ctrl_c_stops_a_build_with_status_130"),
    ("build", "129", "SIGHUP", "build.rs::ctrl_c_stops_a_build_with_status_130"),
    ("build", "pass", "--shell: the shell's status", "build.rs::shell_runs_as_the_user_with_a_passwd_entry"),
    ("ci", "0", "nothing new", "ci.rs::kernel_commits_report_exactly_what_they_introduce"),
    ("ci", "1", "new findings", "ci.rs::kernel_commits_report_exactly_what_they_introduce"),
    ("ci", "1", "not a repository, unknown revision", "ci.rs::errors_name_what_is_wrong"),
    ("ci", "1", "new findings (iproute2)", "ci.rs::iproute2_commit_gets_a_warnings_build_and_checkpatch"),
    ("ci", "0", "--no-checkpatch: every enabled check ran", "exit.rs::ci_exits_2_when_a_check_cannot_run_and_0_without_it"),
    ("ci", "2", "a check could not run", "exit.rs::ci_exits_2_when_a_check_cannot_run_and_0_without_it"),
    ("ci", "3", "findings and a check not run", "ci.rs::kernel_commits_report_exactly_what_they_introduce"),
    ("ci", "0", "submitting; --status ID while the job waits", "exit.rs::ci_status_is_0_while_a_job_waits_and_2_once_it_failed"),
    ("ci", "2", "--status ID of a failed job", "exit.rs::ci_status_is_0_while_a_job_waits_and_2_once_it_failed"),
    ("completions", "0", "written", "cli.rs::completions_for_each_shell"),
    ("completions", "2", "unknown shell", "exit.rs::every_subcommand_exits_2_on_a_usage_error"),
    ("doctor", "0", "required checks ok", "cli.rs::doctor_reports_every_capability"),
    ("doctor", "1", "a required check fails", "exit.rs::doctor_exits_1_when_a_required_check_fails"),
    ("doctor", "1", "bad config", "setup.rs::doctor_fails_on_a_bad_config_naming_file_and_key"),
    ("man", "0", "written", "cli.rs::man_pages_render_for_every_subcommand"),
    ("man", "1", "DIR cannot be written", "exit.rs::man_exits_1_when_its_directory_cannot_be_written"),
    ("modules-reload", "0", "reloaded", "run.rs::modules_reload_reloads_exactly_the_rebuilt_module"),
    ("modules-reload", "1", "a module in use", "run.rs::modules_reload_all_a_module_in_use_and_one_that_fails_to_load"),
    ("rootfs", "0", "pulled, listed, removed", "rootfs.rs::pull_list_rm"),
    ("rootfs", "1", "bad reference, registry error", "rootfs.rs::bad_arguments_are_clear_errors"),
    ("rootfs", "1", "digest mismatch", "rootfs.rs::resume_digest_mismatch_and_second_pull"),
    ("rootfs", "1", "a tree in use", "rootfs.rs::rm_refuses_a_tree_in_use"),
    ("rootfs", "1", "gc during a pull", "rootfs.rs::gc_and_the_stale_sweep_spare_a_running_pull"),
    ("rootfs", "2", "usage error", "exit.rs::every_subcommand_exits_2_on_a_usage_error"),
    ("rootfs", "130", "Ctrl-C during a pull", "rootfs.rs::an_interrupted_pull_exits_130_or_143_and_stores_nothing"),
    ("rootfs", "143", "SIGTERM during a pull", "rootfs.rs::an_interrupted_pull_exits_130_or_143_and_stores_nothing"),
    ("rootfs", "129", "SIGHUP during a pull", "rootfs.rs::an_interrupted_pull_exits_130_or_143_and_stores_nothing"),
    ("rootfs", "143", "SIGTERM during a build", "setup.rs::an_interrupted_rootfs_build_exits_143_or_130_and_stores_nothing"),
    ("rootfs", "130", "Ctrl-C during a build", "setup.rs::an_interrupted_rootfs_build_exits_143_or_130_and_stores_nothing"),
    ("rootfs", "pass", "shell: the command's status", "cli.rs::rootfs_shell_without_a_name_enters_the_default_tree"),
    ("run", "pass", "CMD's status", "run.rs::exec_mode_streams_stdout_stderr_and_exit_code"),
    ("run", "128", "128+N: CMD killed by signal N", "exit.rs::guest_command_killed_missing_or_not_executable_gives_137_127_126"),
    ("run", "127", "CMD not found", "exit.rs::guest_command_killed_missing_or_not_executable_gives_137_127_126"),
    ("run", "126", "CMD not executable", "exit.rs::guest_command_killed_missing_or_not_executable_gives_137_127_126"),
    ("run", "0", "after an interactive session", "guest.rs::console_session"),
    ("run", "1", "bad input", "run.rs::bad_inputs_name_the_flag_or_value"),
    ("run", "1", "boot failure, panic", "run.rs::a_kernel_panic_is_an_error_quoting_the_panic"),
    ("run", "2", "usage error", "cli.rs::zero_cpus_is_refused_on_the_command_line_as_in_the_config"),
    ("run", "130", "SIGINT", "run.rs::an_interrupted_run_exits_130_or_143_and_leaves_no_vm"),
    ("run", "143", "SIGTERM", "run.rs::an_interrupted_run_exits_130_or_143_and_leaves_no_vm"),
    ("run", "129", "SIGHUP", "run.rs::an_interrupted_run_exits_130_or_143_and_leaves_no_vm"),
    ("setup", "0", "in place", "cli.rs::setup_creates_dirs_and_keeps_existing_config"),
    ("setup", "1", "invalid config", "cli.rs::bad_config_names_file_line_and_key_with_cause_chain"),
    ("ssh", "pass", "CMD's status", "guest.rs::shell_mode_case"),
    ("ssh", "255", "ssh cannot connect", "run.rs::keep_ssh_port_new_sighup_and_ctrl_a_x"),
    ("ssh", "1", "no such VM", "exit.rs::ssh_and_stop_exit_1_without_a_vm_and_stop_all_0"),
    ("ssh", "1", "its sshd did not start", "guest.rs::mkt_ssh_says_when_the_guests_sshd_did_not_start"),
    ("stop", "0", "stopped", "run.rs::ps_lists_a_running_vm_and_stop_ends_it_cleanly"),
    ("stop", "0", "none running (with --all)", "exit.rs::ssh_and_stop_exit_1_without_a_vm_and_stop_all_0"),
    ("stop", "1", "no VM of that name, none", "exit.rs::ssh_and_stop_exit_1_without_a_vm_and_stop_all_0"),
    ("stop", "1", "several run", "run.rs::two_interactive_runs_at_once_get_different_ssh_ports"),
    ("test", "0", "the script exits 0", "run.rs::mkt_test_passes_and_fails_with_the_scripts_status"),
    ("test", "1", "the script fails", "run.rs::mkt_test_passes_and_fails_with_the_scripts_status"),
];

/// The numbers in each page's EXIT STATUS section.
fn documented() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for e in std::fs::read_dir(root.join("docs")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(cmd) = name.strip_suffix(".md") else {
            continue;
        };
        let t = std::fs::read_to_string(e.path()).unwrap();
        let Some((_, rest)) = t.split_once("## EXIT STATUS\n") else {
            continue;
        };
        let section = rest.split("\n#").next().unwrap();
        for w in section.split(|c: char| !c.is_ascii_digit()) {
            if !w.is_empty() {
                let s = (cmd.to_string(), w.to_string());
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_documented_exit_status_has_a_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let documented = documented();
    assert!(
        documented.contains(&("run".into(), "130".into())),
        "{documented:?}"
    );
    let mut missing = Vec::new();
    for (cmd, status) in &documented {
        if !STATUSES.iter().any(|r| r.0 == cmd && r.1 == status) {
            missing.push(format!("{cmd} {status}"));
        }
    }
    assert!(
        missing.is_empty(),
        "documented exit statuses with no row (and test) in STATUSES: {missing:?}"
    );
    for (cmd, status, what, test) in STATUSES {
        assert!(
            *status == "pass" || documented.contains(&(cmd.to_string(), status.to_string())),
            "STATUSES row `{cmd} {status}` ({what}) is no longer in docs/{cmd}.md"
        );
        if let Some(why) = test.strip_prefix("untested: ") {
            assert!(
                !why.trim().is_empty(),
                "{cmd} {status}: say why it is untested"
            );
            eprintln!("UNTESTED: {cmd} {status} ({what}): {why}");
            continue;
        }
        let (file, func) = test
            .split_once("::")
            .unwrap_or_else(|| panic!("{cmd} {status}: {test:?} is not FILE::TEST"));
        let path = if file.starts_with("src/") {
            root.join(file)
        } else {
            root.join("tests").join(file)
        };
        let src = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{cmd} {status}: {}: {e}", path.display()));
        assert!(
            src.contains(&format!("fn {func}(")),
            "{cmd} {status} ({what}): no fn {func} in {}",
            path.display()
        );
    }
}
