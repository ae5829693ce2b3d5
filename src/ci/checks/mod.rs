//! Running the checks of one job in the scratch tree, inside the rootfs.
//!
//! Kernel: the W=1, sparse, smatch and clang checks at both revisions
//! (`kernel.rs`). checkpatch runs once, on `git format-patch` of REV.
//! Other projects: checkpatch (a kernel tree's, `--no-tree`) and a warnings
//! build with `mkt build`'s steps.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::findings::{self, Finding};
use super::report::{self, CheckResult, Report, Status};
use super::{CiError, Progress, git, job};
use crate::build::{self, Env, MKT_DIR, Project};
use crate::config::{Config, Paths};
use crate::sandbox::Mount;

mod kernel;
use kernel::{Revisions, kernel};

/// Where scratch trees live: `$XDG_CACHE_HOME/mkt/ci`.
fn cache_dir(paths: &Paths) -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| paths.home.join(".cache"))
        .join("mkt/ci")
}

/// `linux-3f2a...`: one scratch tree per source repository.
fn scratch_name(objects: &Path) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(objects.as_os_str().as_encoded_bytes());
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    let base = objects
        .parent()
        .and_then(|p| {
            // `.../linux/.git/objects` → `linux`; a bare `x.git` → `x.git`.
            if p.file_name()? == ".git" {
                p.parent()?.file_name()
            } else {
                p.file_name()
            }
        })
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "repo".into());
    format!("{base}-{hex}")
}

/// The checker wrapper: appends the checker's output to the file named
/// first, so it is not mixed with make's and the compiler's.
const CHECK_WRAPPER: &str = "#!/bin/sh\n# mkt ci: CHECK=\"sh /tmp/.mkt/check OUT checker\"\nout=$1; shift\nexec \"$@\" >>\"$out\" 2>&1\n";

/// Asks the rootfs which analysers it has.
const PROBE: &str = "for t in sparse smatch clang codespell perl; do command -v $t >/dev/null 2>&1 && echo $t; done; true";

struct Runner<'a> {
    env: Env,
    tree: PathBuf,
    job_dir: PathBuf,
    progress: &'a Progress,
    step: u32,
}

impl Runner<'_> {
    /// Runs `argv` in the tree inside the rootfs: (status, output). The
    /// output also goes to the job's log.
    fn run(&mut self, what: &str, argv: &[String]) -> Result<(i32, String), CiError> {
        self.step += 1;
        let p = self.job_dir.join(format!("step-{:02}.out", self.step));
        let f = fs::File::create(&p).map_err(|e| CiError::Create(p.clone(), e))?;
        let _ = writeln!(
            self.progress.log(),
            "$ {}",
            crate::util::shell::shell_quote(argv)
        );
        let t0 = Instant::now();
        let exit = self.env.run_logged(argv, &f, false)?;
        drop(f);
        let text = fs::read_to_string(&p).unwrap_or_default();
        let _ = self.progress.log().write_all(text.as_bytes());
        self.progress.say(&format!(
            "{what}: exit {} in {:.1}s",
            exit.status,
            t0.elapsed().as_secs_f64()
        ));
        Ok((exit.status, text))
    }
}

/// Runs the job's checks: the report.
pub fn run(
    record: &mut job::Record,
    job_dir: &Path,
    config: &Config,
    paths: &Paths,
    progress: &Progress,
) -> Result<Report, CiError> {
    let t0 = Instant::now();
    let req = record.request.clone();
    let src = git::open(&req.source)?;
    let scratch = cache_dir(paths).join(scratch_name(&src.objects));
    fs::create_dir_all(&scratch).map_err(|e| CiError::Create(scratch.clone(), e))?;
    // One job per scratch tree at a time; the next one waits here.
    let lock_path = scratch.join("lock");
    let lock_file =
        fs::File::create(&lock_path).map_err(|e| CiError::Create(lock_path.clone(), e))?;
    let _lock =
        match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((f, _)) => {
                progress.say("waiting for another job's scratch tree");
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                    .map_err(|(_, e)| CiError::Lock(lock_path.clone(), e))?
            }
        };
    record.state = job::State::Running;
    job::save(job_dir, record)?;

    let tree = scratch.join("tree");
    git::prepare_scratch(&tree, &src)?;
    let commit = record.commit.clone();
    git::checkout(&tree, &commit)?;
    let parent = git::parent(&tree, &commit)?;
    let project = build::discover(&tree)?;
    if let Some(want) = &req.project {
        build::check_wanted(want, &tree, &project)?;
    }
    progress.say(&format!(
        "{} checked out in {} (parent {})",
        project.describe(),
        tree.display(),
        parent.as_deref().map_or("none", |p| &p[..12])
    ));
    let files = git::changed_files(&tree, parent.as_deref(), &commit)?;
    let added = findings::added_lines(&git::diff_u0(&tree, parent.as_deref(), &commit)?);

    // The rootfs, entered as for `mkt build`, with the tree read-write and
    // every object store git may need read-only.
    let bopts = build::BuildOptions::default();
    let mut env = build::prepare_env(&bopts, config, paths, req.rootfs.clone(), tree.clone())?;
    for objects in git::alternates_chain(&src.objects) {
        if !objects.starts_with(&tree) {
            env.layout
                .mounts
                .push(Mount::bind(&objects, &objects, true));
        }
    }
    let wrapper = env.files.join("check");
    fs::write(&wrapper, CHECK_WRAPPER).map_err(|e| CiError::Write(wrapper.clone(), e))?;
    let mut r = Runner {
        env,
        tree: tree.clone(),
        job_dir: job_dir.to_path_buf(),
        progress,
        step: 0,
    };
    let (_, probe) = r.run(
        "probing the rootfs's analysers",
        &["sh".into(), "-c".into(), PROBE.into()],
    )?;
    let have = |t: &str| probe.lines().any(|l| l.trim() == t);

    let mut report = Report {
        job: record.id,
        project: project.describe(),
        source: src.top.display().to_string(),
        rev: req.rev.clone(),
        commit: commit.clone(),
        parent: parent.clone(),
        subject: record.subject.clone(),
        files: files.clone(),
        dirs: vec![],
        kernel_config: String::new(),
        notes: vec![],
        checks: vec![],
        seconds: 0.0,
        exit: 0,
    };
    let mut results: HashMap<&str, CheckResult> = HashMap::new();
    if let Project::Kernel { .. } = project {
        let revs = Revisions {
            commit: &commit,
            parent: parent.as_deref(),
            files: &files,
            added: &added,
        };
        kernel(&mut r, &req, revs, &have, &mut report, &mut results)?;
    } else {
        userspace(
            &mut r,
            &req,
            config,
            &project,
            &commit,
            parent.as_deref(),
            &added,
            &have,
            &mut results,
        )?;
    }
    // checkpatch last: the tree is at REV again.
    let cp = if req.checkpatch {
        checkpatch(&mut r, &req, config, &project, &commit, &have)?
    } else {
        CheckResult::disabled("checkpatch", "--no-checkpatch")
    };
    results.insert("checkpatch", cp);
    report.checks = report::CHECKS
        .iter()
        .map(|c| {
            results
                .remove(c)
                .unwrap_or_else(|| CheckResult::not_run(c, "not attempted"))
        })
        .collect();
    if !req.show_all {
        for c in &mut report.checks {
            c.all.clear();
        }
    }
    report.exit = report::exit_code(&report.checks);
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The findings of one check on both revisions → its result.
fn compare(
    name: &str,
    new: Vec<Finding>,
    old: Option<Vec<Finding>>,
    added: &HashMap<String, Vec<(u32, u32)>>,
    seconds: f64,
) -> CheckResult {
    let new = findings::dedup(new);
    let introduced = match old {
        Some(old) => findings::introduced(&new, &findings::dedup(old), added),
        None => new.clone(),
    };
    CheckResult {
        name: name.into(),
        status: Status::Ran,
        reason: String::new(),
        preexisting: new.len() - introduced.len(),
        new: introduced,
        all: new,
        seconds,
    }
}

#[allow(clippy::too_many_arguments)]
fn userspace(
    r: &mut Runner,
    req: &super::Request,
    _config: &Config,
    project: &Project,
    commit: &str,
    parent: Option<&str>,
    added: &HashMap<String, Vec<(u32, u32)>>,
    _have: &dyn Fn(&str) -> bool,
    results: &mut HashMap<&'static str, CheckResult>,
) -> Result<(), CiError> {
    for name in ["sparse", "smatch", "clang"] {
        results.insert(
            name,
            CheckResult::disabled(name, &format!("kernel only ({} here)", project.name())),
        );
    }
    if !req.warnings {
        results.insert(
            "warnings",
            CheckResult::disabled("warnings", "--no-warnings"),
        );
        return Ok(());
    }
    let tree = r.tree.clone();
    let mut revs: Vec<&str> = parent.into_iter().collect();
    revs.push(commit);
    let mut got: Vec<Vec<Finding>> = Vec::new();
    let t0 = Instant::now();
    for rev in &revs {
        git::checkout(&tree, rev)?;
        // A clean build (ccache keeps it cheap), so every warning shows.
        let input = build::StepInput {
            jobs: r.env.jobs,
            clean: true,
            configured: false,
            ..Default::default()
        };
        let mut out_all = String::new();
        let steps = build::steps(project, &input);
        for (i, build::Step(argv)) in steps.iter().enumerate() {
            let (st, out) = r.run(&format!("{}: {}", &rev[..12], argv.join(" ")), argv)?;
            out_all += &out;
            // A failed clean is harmless; a failed build counts when it
            // says why (compile errors are findings), else it did not run.
            let clean = argv[0] == "rm" || argv.get(1).is_some_and(|a| a == "clean");
            let last = i + 1 == steps.len();
            let explained = last
                && findings::parse_compiler(&out, &tree.to_string_lossy())
                    .iter()
                    .any(|f| f.severity == "error");
            if st != 0 && !clean && !explained {
                results.insert(
                    "warnings",
                    CheckResult::not_run(
                        "warnings",
                        &format!(
                            "`{}` failed: {}",
                            argv.join(" "),
                            build::error_lines(&out).join(" / ")
                        ),
                    ),
                );
                return Ok(());
            }
        }
        // Subdirectory builds name files without their directory.
        let known: Vec<String> = git::git(&tree, &["ls-files"])?
            .lines()
            .map(str::to_string)
            .collect();
        got.push(findings::resolve_paths(
            findings::parse_compiler(&out_all, &tree.to_string_lossy()),
            &known,
        ));
    }
    let new = got.pop().unwrap_or_default();
    let old = got.pop();
    results.insert(
        "warnings",
        compare("warnings", new, old, added, t0.elapsed().as_secs_f64()),
    );
    Ok(())
}

/// checkpatch.pl's command line; pure.
fn checkpatch_argv(
    script: &str,
    no_tree: bool,
    codespell: bool,
    ignore_gerrit: bool,
    patch: &str,
) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "perl".into(),
        script.into(),
        "--show-types".into(),
        "--no-summary".into(),
        "--color=never".into(),
    ];
    if no_tree {
        argv.push("--no-tree".into());
    }
    if codespell {
        argv.push("--codespell".into());
    }
    if ignore_gerrit {
        argv.extend(["--ignore".into(), "GERRIT_CHANGE_ID".into()]);
    }
    argv.push(patch.into());
    argv
}

/// checkpatch.pl on `git format-patch` of REV: every finding is the patch's.
fn checkpatch(
    r: &mut Runner,
    req: &super::Request,
    config: &Config,
    project: &Project,
    commit: &str,
    have: &dyn Fn(&str) -> bool,
) -> Result<CheckResult, CiError> {
    let t0 = Instant::now();
    git::checkout(&r.tree, commit)?;
    if !have("perl") {
        return Ok(CheckResult::not_run(
            "checkpatch",
            "perl is not installed in the rootfs",
        ));
    }
    // The tree's own checkpatch.pl; for other projects, the config's kernel's.
    let (script, no_tree) = if r.tree.join("scripts/checkpatch.pl").is_file() {
        (
            "scripts/checkpatch.pl".to_string(),
            !matches!(project, Project::Kernel { .. }),
        )
    } else if let Some(k) = &config.defaults.kernel
        && let Ok(k) = fs::canonicalize(k)
        && k.join("scripts/checkpatch.pl").is_file()
    {
        r.env.layout.mounts.push(Mount::bind(&k, &k, true));
        (k.join("scripts/checkpatch.pl").display().to_string(), true)
    } else {
        return Ok(CheckResult::not_run(
            "checkpatch",
            "no scripts/checkpatch.pl in the tree, and no kernel tree in the config (defaults.kernel)",
        ));
    };
    let patch = git::format_patch(&r.tree, commit)?;
    let p = r.env.files.join("patch");
    fs::write(&p, &patch).map_err(|e| CiError::Write(p.clone(), e))?;
    let argv = checkpatch_argv(
        &script,
        no_tree,
        have("codespell"),
        req.ignore_gerrit,
        &format!("{MKT_DIR}/patch"),
    );
    let (st, out) = r.run("checkpatch", &argv)?;
    let found = findings::parse_checkpatch(&out);
    if st > 1 || (st == 1 && found.is_empty()) {
        return Ok(CheckResult::not_run(
            "checkpatch",
            &format!(
                "checkpatch.pl exited {st}: {}",
                build::error_lines(&out).join(" / ")
            ),
        ));
    }
    let mut res = compare(
        "checkpatch",
        found,
        None,
        &HashMap::new(),
        t0.elapsed().as_secs_f64(),
    );
    if !have("codespell") {
        res.reason = "without --codespell (codespell is not installed in the rootfs)".into();
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpatch_command_lines() {
        let j = |v: Vec<String>| v.join(" ");
        assert_eq!(
            j(checkpatch_argv(
                "scripts/checkpatch.pl",
                false,
                true,
                true,
                "/p"
            )),
            "perl scripts/checkpatch.pl --show-types --no-summary --color=never --codespell --ignore GERRIT_CHANGE_ID /p"
        );
        assert_eq!(
            j(checkpatch_argv(
                "/k/scripts/checkpatch.pl",
                true,
                false,
                false,
                "/p"
            )),
            "perl /k/scripts/checkpatch.pl --show-types --no-summary --color=never --no-tree /p"
        );
    }

    #[test]
    fn scratch_names() {
        let a = scratch_name(Path::new("/home/u/src/linux/.git/objects"));
        assert!(
            a.starts_with("linux-") && a.len() == "linux-".len() + 16,
            "{a}"
        );
        let b = scratch_name(Path::new("/srv/git/linux.git/objects"));
        assert!(b.starts_with("linux.git-"), "{b}");
        assert_ne!(a, scratch_name(Path::new("/home/v/src/linux/.git/objects")));
    }
}
