//! Running the checks of one job in the scratch tree, inside the rootfs.
//!
//! Kernel: per revision (the parent, then REV) the config is made, the
//! touched Kbuild directories are built with W=1 (their objects deleted
//! first, so every warning is printed again; ccache makes that cheap), then
//! checked with `C=2` through a wrapper that appends the checker's output
//! (sparse, smatch) to a file of its own; clang builds in a separate output
//! directory. checkpatch runs once, on `git format-patch` of REV.
//! Other projects: checkpatch (a kernel tree's, `--no-tree`) and a warnings
//! build with `mkt build`'s steps.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::findings::{self, Finding};
use super::report::{self, CheckResult, Report, Status};
use super::{CiError, Progress, git, job, scope};
use crate::build::{self, Env, MKT_DIR, Project};
use crate::config::{Config, Paths};
use crate::sandbox::Mount;

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

    fn make(&self, args: &[&str]) -> Vec<String> {
        let mut v = vec!["make".to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        if self.env.ccache {
            v.push("CC=ccache gcc".into());
        }
        v
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

/// Deletes the objects under the touched directories, so the next build
/// compiles (and warns about) every file again.
fn delete_objects(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => delete_objects(&p),
            Ok(t) if t.is_file() && p.extension().is_some_and(|x| x == "o") => {
                let _ = fs::remove_file(&p);
            }
            _ => {}
        }
    }
}

/// What the generated config depends on: the Kconfig files and config
/// fragments at the checked-out revision, mkt's fragments, the given config.
fn config_stamp(tree: &Path, fragment: &str, user: Option<&Path>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let kconfig = git::git(
        tree,
        &[
            "ls-files",
            "-s",
            "--",
            ":(glob)**/Kconfig*",
            ":(glob)**/*.config",
            ":(glob)scripts/kconfig/**",
        ],
    )
    .unwrap_or_default();
    h.update(kconfig.as_bytes());
    h.update(build::VM_CONFIG.as_bytes());
    h.update(fragment.as_bytes());
    if let Some(u) = user {
        h.update(fs::read(u).unwrap_or_default());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Per-revision outputs of the compile checks.
#[derive(Default)]
struct RevFindings {
    warnings: Option<Vec<Finding>>,
    sparse: Option<Vec<Finding>>,
    smatch: Option<Vec<Finding>>,
    clang: Option<Vec<Finding>>,
    /// Why a check could not run at this revision.
    failed: HashMap<&'static str, String>,
    seconds: HashMap<&'static str, f64>,
}

/// The revisions one kernel job compares and what it found at each.
struct Revisions<'a> {
    commit: &'a str,
    parent: Option<&'a str>,
    files: &'a [String],
    added: &'a HashMap<String, Vec<(u32, u32)>>,
}

/// What stays the same across one kernel job's revisions.
struct KernelJob<'a> {
    req: &'a super::Request,
    tree: PathBuf,
    /// The compile checks to run.
    want: Vec<&'static str>,
    /// `CONFIG_X=y` lines for the options the touched files need.
    fragment: String,
    /// `-jN`.
    j: String,
    /// `dir/` make targets of the touched Kbuild directories.
    targets: Vec<String>,
    dirs: Vec<String>,
    /// Stamps, checker outputs and the clang build (`.mkt-ci` in the tree).
    out_dir: PathBuf,
}

fn kernel(
    r: &mut Runner,
    req: &super::Request,
    revs: Revisions,
    have: &dyn Fn(&str) -> bool,
    report: &mut Report,
    results: &mut HashMap<&'static str, CheckResult>,
) -> Result<(), CiError> {
    let tree = r.tree.clone();
    let has_makefile =
        |d: &str| tree.join(d).join("Makefile").is_file() || tree.join(d).join("Kbuild").is_file();
    let exists = |f: &str| tree.join(f).exists();
    let includers = |inc: &str| git::includers(&tree, revs.commit, inc);
    let sc = scope::scope(revs.files, &has_makefile, &exists, &includers);
    report.dirs = sc.dirs.clone();
    report.notes.extend(sc.notes.clone());

    let want = choose_checks(req, &sc, have, results);
    if want.is_empty() {
        return Ok(());
    }
    let options = config_options(&tree, &sc);
    let fragment: String = options.iter().map(|o| format!("{o}=y\n")).collect();
    let frag_path = r.env.files.join("ci.config");
    fs::write(&frag_path, &fragment).map_err(|e| CiError::Write(frag_path.clone(), e))?;
    report.kernel_config = describe_config(req, &options);
    if let Some(f) = &req.kernel_config {
        let dst = r.env.files.join("user.config");
        fs::copy(f, &dst).map_err(|e| CiError::KernelConfig(f.clone(), e))?;
    }
    let out_dir = tree.join(".mkt-ci");
    fs::create_dir_all(&out_dir).map_err(|e| CiError::Create(out_dir.clone(), e))?;
    let job = KernelJob {
        req,
        want,
        fragment,
        j: format!("-j{}", crate::host::user::usable_cpus()),
        targets: sc.dirs.iter().map(|d| format!("{d}/")).collect(),
        dirs: sc.dirs.clone(),
        out_dir,
        tree,
    };

    let old = match revs.parent {
        Some(p) => Some(job.at_revision(r, "parent", p, report)?),
        None => None,
    };
    let new = job.at_revision(r, "commit", revs.commit, report)?;
    if let Some(note) = not_compiled(&job.tree, &sc.c_files) {
        report.notes.push(note);
    }
    for name in &job.want {
        results.insert(name, judge(name, old.as_ref(), &new, revs.added));
    }
    Ok(())
}

/// The compile checks to run; a result saying why for each of the others.
fn choose_checks(
    req: &super::Request,
    sc: &scope::Scope,
    have: &dyn Fn(&str) -> bool,
    results: &mut HashMap<&'static str, CheckResult>,
) -> Vec<&'static str> {
    let mut want = Vec::new();
    let wanted = [
        ("warnings", req.warnings, "--no-warnings", true),
        ("sparse", req.sparse, "--no-sparse", have("sparse")),
        ("smatch", req.smatch, "--no-smatch", have("smatch")),
        ("clang", req.clang, "--no-clang", have("clang")),
    ];
    for (name, on, flag, installed) in wanted {
        let res = if !on {
            CheckResult::disabled(name, flag)
        } else if sc.dirs.is_empty() {
            CheckResult::disabled(
                name,
                "nothing to compile: the patch touches no Kbuild directory",
            )
        } else if !installed {
            CheckResult::not_run(
                name,
                &format!(
                    "{name} is not installed in the rootfs {}",
                    req.rootfs.display()
                ),
            )
        } else {
            want.push(name);
            continue;
        };
        results.insert(name, res);
    }
    want
}

/// The config options the touched files' and directories' Makefiles name.
fn config_options(tree: &Path, sc: &scope::Scope) -> std::collections::BTreeSet<String> {
    let read_mk = |d: &str| {
        fs::read_to_string(tree.join(d).join("Makefile"))
            .or_else(|_| fs::read_to_string(tree.join(d).join("Kbuild")))
            .ok()
    };
    let mut options = std::collections::BTreeSet::new();
    for f in &sc.c_files {
        options.extend(scope::options_for(f, &read_mk));
    }
    for d in &sc.dirs {
        options.extend(scope::options_for(&format!("{d}/Makefile"), &read_mk));
    }
    options
}

/// The report's line on the kernel config used.
fn describe_config(req: &super::Request, options: &std::collections::BTreeSet<String>) -> String {
    match &req.kernel_config {
        Some(f) => f.display().to_string(),
        None => format!(
            "mkt build's VM config (tinyconfig + kvm_guest.config + configs/vm.config){}",
            if options.is_empty() {
                String::new()
            } else {
                format!(
                    " + {} for the touched files",
                    options.iter().cloned().collect::<Vec<_>>().join(" ")
                )
            }
        ),
    }
}

impl KernelJob<'_> {
    /// Checks out `rev` and runs the wanted checks there.
    fn at_revision(
        &self,
        r: &mut Runner,
        label: &str,
        rev: &str,
        report: &mut Report,
    ) -> Result<RevFindings, CiError> {
        git::checkout(&self.tree, rev)?;
        let mut rf = RevFindings::default();
        let t0 = Instant::now();
        if let Some(why) = self.configure(r, label)? {
            for c in &self.want {
                rf.failed.insert(c, why.clone());
            }
            return Ok(rf);
        }
        if label == "commit" {
            report.notes.extend(self.dropped_note());
        }
        let config_secs = t0.elapsed().as_secs_f64();
        if !self.w1_build(r, label, &mut rf)? {
            return Ok(rf);
        }
        *rf.seconds.entry("warnings").or_default() += config_secs;
        for (name, checker) in [("sparse", "sparse"), ("smatch", "smatch -p=kernel")] {
            if self.want.contains(&name) {
                self.checker(r, label, name, checker, &mut rf)?;
            }
        }
        if self.want.contains(&"clang") {
            self.clang(r, label, &mut rf)?;
        }
        Ok(rf)
    }

    /// Makes `.config` (kept when its inputs did not change); why it failed.
    fn configure(&self, r: &mut Runner, label: &str) -> Result<Option<String>, CiError> {
        // The same inputs as the last config made here: keep it (saves
        // tinyconfig's and olddefconfig's runs, and .config's mtime).
        let stamp = config_stamp(
            &self.tree,
            &self.fragment,
            self.req.kernel_config.as_deref(),
        );
        let stamp_file = self.out_dir.join("config.stamp");
        let fresh = self.tree.join(".config").is_file()
            && fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str());
        let _ = fs::remove_file(&stamp_file);
        if fresh {
            r.progress
                .say(&format!("{label}: kernel config unchanged, kept"));
        } else {
            for argv in self.config_steps(r) {
                let (st, out) = r.run(&format!("{label}: {}", argv[..2].join(" ")), &argv)?;
                if st != 0 {
                    return Ok(Some(format!(
                        "`{}` failed at the {label}: {}",
                        argv.join(" "),
                        build::error_lines(&out).join(" / ")
                    )));
                }
            }
        }
        let _ = fs::write(&stamp_file, &stamp);
        Ok(None)
    }

    /// The given config, else mkt build's VM config plus the fragment.
    fn config_steps(&self, r: &Runner) -> Vec<Vec<String>> {
        if self.req.kernel_config.is_some() {
            return vec![
                vec![
                    "cp".into(),
                    format!("{MKT_DIR}/user.config"),
                    ".config".into(),
                ],
                r.make(&["-s", "olddefconfig"]),
            ];
        }
        vec![
            r.make(&["-s", "tinyconfig"]),
            vec![
                "scripts/kconfig/merge_config.sh".into(),
                "-m".into(),
                ".config".into(),
                "kernel/configs/kvm_guest.config".into(),
                format!("{MKT_DIR}/vm.config"),
                format!("{MKT_DIR}/ci.config"),
            ],
            r.make(&["-s", "olddefconfig"]),
        ]
    }

    /// The note on options olddefconfig dropped from the fragment.
    fn dropped_note(&self) -> Option<String> {
        if self.req.kernel_config.is_some() || self.fragment.is_empty() {
            return None;
        }
        let got = fs::read_to_string(self.tree.join(".config")).unwrap_or_default();
        let dropped = build::dropped_options(&self.fragment, &got);
        if dropped.is_empty() {
            return None;
        }
        let names: Vec<String> = dropped.iter().map(|d| d.0.clone()).collect();
        Some(format!(
            "olddefconfig dropped {} (unmet dependencies): code behind them is not compiled",
            names.join(" ")
        ))
    }

    /// The W=1 build, which also makes the objects sparse and smatch need;
    /// false when it failed (every check then has the reason).
    fn w1_build(&self, r: &mut Runner, label: &str, rf: &mut RevFindings) -> Result<bool, CiError> {
        for d in &self.dirs {
            delete_objects(&self.tree.join(d));
        }
        let t0 = Instant::now();
        let mut args = vec!["-s", "-k", &self.j, "W=1"];
        args.extend(self.targets.iter().map(String::as_str));
        let argv = r.make(&args);
        let what = format!("{label}: make W=1 {}", self.targets.join(" "));
        let (st, out) = r.run(&what, &argv)?;
        let found = findings::parse_compiler(&out, &self.tree.to_string_lossy());
        if st != 0 && !found.iter().any(|f| f.severity == "error") {
            let why = format!(
                "the W=1 build failed at the {label}: {}",
                build::error_lines(&out).join(" / ")
            );
            for c in &self.want {
                rf.failed.insert(c, why.clone());
            }
            return Ok(false);
        }
        rf.warnings = Some(found);
        rf.seconds.insert("warnings", t0.elapsed().as_secs_f64());
        Ok(true)
    }

    /// sparse or smatch through `make C=2`, their output in a file of its own.
    fn checker(
        &self,
        r: &mut Runner,
        label: &str,
        name: &'static str,
        checker: &str,
        rf: &mut RevFindings,
    ) -> Result<(), CiError> {
        let t0 = Instant::now();
        let out_file = self.out_dir.join(format!("{name}-{label}.txt"));
        fs::write(&out_file, "").map_err(|e| CiError::Write(out_file.clone(), e))?;
        let check = format!("CHECK=sh {MKT_DIR}/check {} {checker}", out_file.display());
        let mut args = vec!["-s", "-k", &self.j, "W=1", "C=2", &check];
        args.extend(self.targets.iter().map(String::as_str));
        let argv = r.make(&args);
        let (st, out) = r.run(&format!("{label}: {name} (C=2)"), &argv)?;
        let text = fs::read_to_string(&out_file).unwrap_or_default();
        let _ = writeln!(r.progress.log(), "--- {name} output:\n{text}");
        if st != 0 && text.trim().is_empty() {
            rf.failed.insert(
                name,
                format!(
                    "make C=2 failed at the {label}: {}",
                    build::error_lines(&out).join(" / ")
                ),
            );
            return Ok(());
        }
        let v = findings::parse_compiler(&text, &self.tree.to_string_lossy());
        if name == "sparse" {
            rf.sparse = Some(v);
        } else {
            rf.smatch = Some(v);
        }
        rf.seconds.insert(name, t0.elapsed().as_secs_f64());
        Ok(())
    }

    /// The clang W=1 build, in an output directory of its own.
    fn clang(&self, r: &mut Runner, label: &str, rf: &mut RevFindings) -> Result<(), CiError> {
        let t0 = Instant::now();
        let o = self.out_dir.join("clang");
        fs::create_dir_all(&o).map_err(|e| CiError::Create(o.clone(), e))?;
        let _ = fs::copy(self.tree.join(".config"), o.join(".config"));
        for d in &self.dirs {
            delete_objects(&o.join(d));
        }
        let cc = if r.env.ccache {
            "CC=ccache clang"
        } else {
            "CC=clang"
        };
        let mut cfg = vec![
            "make".to_string(),
            "-s".into(),
            format!("O={}", o.display()),
            cc.into(),
            "olddefconfig".into(),
        ];
        let (st, out) = r.run(&format!("{label}: clang olddefconfig"), &cfg)?;
        if st != 0 {
            rf.failed.insert(
                "clang",
                format!(
                    "clang olddefconfig failed: {}",
                    build::error_lines(&out).join(" / ")
                ),
            );
        } else {
            cfg.truncate(4);
            cfg.extend(["-k".into(), self.j.clone(), "W=1".into()]);
            cfg.extend(self.targets.iter().cloned());
            let (st, out) = r.run(&format!("{label}: clang W=1 build"), &cfg)?;
            let v = findings::parse_compiler(&out, &o.to_string_lossy());
            if st != 0 && !v.iter().any(|f| f.severity == "error") {
                rf.failed.insert(
                    "clang",
                    format!(
                        "the clang build failed at the {label}: {}",
                        build::error_lines(&out).join(" / ")
                    ),
                );
            } else {
                rf.clang = Some(v);
            }
        }
        rf.seconds.insert("clang", t0.elapsed().as_secs_f64());
        Ok(())
    }
}

/// The note on touched files the config did not compile (their objects
/// were deleted before the build: only what it compiled is there).
fn not_compiled(tree: &Path, c_files: &[String]) -> Option<String> {
    let not_built: Vec<&str> = c_files
        .iter()
        .filter(|f| {
            let (d, n) = f.rsplit_once('/').unwrap_or(("", f));
            !tree
                .join(d)
                .join(format!("{}.o", n.trim_end_matches(".c")))
                .exists()
        })
        .map(String::as_str)
        .collect();
    (!not_built.is_empty()).then(|| {
        format!(
            "not compiled by this kernel config, so not analysed: {}",
            not_built.join(" ")
        )
    })
}

/// One check's result: why it could not run (at either revision), else what
/// the commit introduced over its parent.
fn judge(
    name: &'static str,
    old: Option<&RevFindings>,
    new: &RevFindings,
    added: &HashMap<String, Vec<(u32, u32)>>,
) -> CheckResult {
    let why = new
        .failed
        .get(name)
        .or_else(|| old.and_then(|o| o.failed.get(name)));
    if let Some(why) = why {
        return CheckResult::not_run(name, why);
    }
    let pick = |rf: &RevFindings| match name {
        "warnings" => rf.warnings.clone(),
        "sparse" => rf.sparse.clone(),
        "smatch" => rf.smatch.clone(),
        _ => rf.clang.clone(),
    };
    let secs = new.seconds.get(name).copied().unwrap_or(0.0)
        + old
            .and_then(|o| o.seconds.get(name).copied())
            .unwrap_or(0.0);
    compare(
        name,
        pick(new).unwrap_or_default(),
        old.map(|o| pick(o).unwrap_or_default()),
        added,
        secs,
    )
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
            jobs: crate::host::user::usable_cpus(),
            ccache: r.env.ccache,
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
