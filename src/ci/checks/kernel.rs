//! The kernel job's compile checks: per revision (the parent, then REV)
//! the config is made, the touched Kbuild directories are built with W=1
//! (their objects deleted first, so every warning is printed again; ccache
//! makes that cheap), then checked with `C=2` through a wrapper that
//! appends the checker's output (sparse, smatch) to a file of its own;
//! clang builds in a separate output directory. Each check's findings at
//! REV are compared with the parent's.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{Runner, compare};
use crate::build::{self, MKT_DIR};
use crate::ci::findings::{self, Finding};
use crate::ci::report::{CheckResult, Report};
use crate::ci::{CiError, Request, git, scope};

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
pub(super) struct Revisions<'a> {
    pub(super) commit: &'a str,
    pub(super) parent: Option<&'a str>,
    pub(super) files: &'a [String],
    pub(super) added: &'a HashMap<String, Vec<(u32, u32)>>,
}

/// What stays the same across one kernel job's revisions.
struct KernelJob<'a> {
    req: &'a Request,
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

pub(super) fn kernel(
    r: &mut Runner,
    req: &Request,
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
        j: format!("-j{}", r.env.jobs),
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
    req: &Request,
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
fn describe_config(req: &Request, options: &std::collections::BTreeSet<String>) -> String {
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
            for argv in self.config_steps() {
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
    fn config_steps(&self) -> Vec<Vec<String>> {
        if self.req.kernel_config.is_some() {
            return vec![
                vec![
                    "cp".into(),
                    format!("{MKT_DIR}/user.config"),
                    ".config".into(),
                ],
                build::make_argv(&["-s", "olddefconfig"]),
            ];
        }
        vec![
            build::make_argv(&["-s", "tinyconfig"]),
            vec![
                "scripts/kconfig/merge_config.sh".into(),
                "-m".into(),
                ".config".into(),
                "kernel/configs/kvm_guest.config".into(),
                format!("{MKT_DIR}/vm.config"),
                format!("{MKT_DIR}/ci.config"),
            ],
            build::make_argv(&["-s", "olddefconfig"]),
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
        let argv = build::make_argv(&args);
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
        let argv = build::make_argv(&args);
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
        let mut cfg = vec![
            "make".to_string(),
            "-s".into(),
            format!("O={}", o.display()),
            "CC=clang".into(),
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
