//! The `mkt build` command: options, the source and rootfs it uses, the
//! steps run with a log, and what it reports.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    BuildError, MKT_DIR, PROJECT_NAMES, Project, Step, StepInput, VM_CONFIG, check_wanted,
    discover, prepare_env, steps,
};
use crate::config::{Config, Paths};
use crate::sandbox;

/// `mkt build`'s options, as parsed from the command line.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub project: Option<String>,
    pub rootfs: Option<String>,
    pub dir: Option<PathBuf>,
    pub clean: bool,
    pub shell: bool,
    pub kconfig: bool,
    pub dirs: Vec<PathBuf>,
    /// A shell script run instead of the project's steps (project custom).
    pub recipe: Option<PathBuf>,
    /// `--with-kernel-headers[=TREE]`: `Some(None)` = the config's kernel.
    pub kernel_headers: Option<Option<PathBuf>>,
    pub args: Vec<String>,
    pub quiet: bool,
    pub verbose: bool,
}

pub(crate) fn resolve_src(opts: &BuildOptions, config: &Config) -> Result<PathBuf, BuildError> {
    let from_config = |p: &str| match p {
        "kernel" | "linux" => config.defaults.kernel.clone(),
        "rdma-core" => config.defaults.rdma_core.clone(),
        "iproute2" => config.defaults.iproute2.clone(),
        _ => None,
    };
    let dir = opts
        .dir
        .clone()
        .or_else(|| opts.project.as_deref().and_then(from_config))
        .unwrap_or_else(|| PathBuf::from("."));
    let c = fs::canonicalize(&dir).map_err(|e| BuildError::NoDir(dir.clone(), e))?;
    if !c.is_dir() {
        return Err(BuildError::NoDir(
            dir,
            io::Error::from(io::ErrorKind::NotADirectory),
        ));
    }
    Ok(c)
}

/// The rootfs `build` and `ci` enter: `--rootfs`, else the default
/// setup's, else the config's, else the default recipe's tree (built on
/// first use).
pub(crate) fn rootfs_for(
    flag: Option<&str>,
    config: &Config,
    paths: &Paths,
    quiet: bool,
    verbose: bool,
) -> Result<PathBuf, BuildError> {
    use crate::rootfs::resolve;
    let wanted = resolve::wanted(flag, resolve::default_setup(config), config);
    let first = resolve::FirstUse {
        dry_run: false,
        quiet,
        verbose,
    };
    Ok(resolve::resolve(paths, &wanted, first)?.path(paths))
}

fn newer(a: &Path, b: &Path) -> bool {
    let m = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    match (m(a), m(b)) {
        (Some(a), Some(b)) => a > b,
        (Some(_), None) => true,
        _ => false,
    }
}

/// `mkt build`: the exit status (0 built, 1 failed; with --shell, the
/// shell's).
pub fn build(opts: &BuildOptions, config: &Config, paths: &Paths) -> anyhow::Result<i32> {
    if let Some(p) = &opts.project
        && !PROJECT_NAMES.contains(&p.as_str())
    {
        return Err(BuildError::UnknownProject(p.clone()).into());
    }
    if opts.project.as_deref() == Some("custom") && opts.recipe.is_none() {
        return Err(BuildError::NoRecipe.into());
    }
    let src = resolve_src(opts, config)?;
    let project = match discover(&src) {
        Ok(p) => Some(p),
        // A recipe (`custom` or no PROJECT) or a shell needs no known project.
        Err(_) if opts.recipe.is_some() || (opts.shell && opts.project.is_none()) => None,
        Err(e) => return Err(e.into()),
    };
    if let (Some(want), Some(found)) = (&opts.project, &project)
        && opts.recipe.is_none()
    {
        check_wanted(want, &src, found)?;
    }
    let rootfs = rootfs_for(
        opts.rootfs.as_deref(),
        config,
        paths,
        opts.quiet,
        opts.verbose,
    )?;
    // `rootfs rm` refuses the tree while this build uses it.
    let _tree_in_use = crate::rootfs::lock::in_use(paths, &rootfs)?;
    let env = prepare_env(opts, config, paths, rootfs, src)?;

    if opts.shell {
        return Ok(shell(&env, opts)?);
    }
    let jobs = env.jobs;
    let mut env = env;
    let (name, what, steps) = what_to_run(opts, &mut env, project)?;
    let (log_path, mut log) = crate::util::fs::open_log(&paths.logs_dir.join("build"), name)
        .map_err(|e| BuildError::Create(e.path, e.source))?;
    let say = |s: &str| {
        if !opts.quiet {
            eprintln!("mkt: {s}");
        }
    };
    let t0 = Instant::now();
    let src = env.src.clone();
    let failed = |argv: &[String], status: i32| {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        eprintln!(
            "mkt: building {} in {} failed after {:.1}s: `{}` exited with status {}",
            what,
            src.display(),
            t0.elapsed().as_secs_f64(),
            argv.join(" "),
            status
        );
        if !opts.verbose {
            for l in error_lines(&text) {
                eprintln!("  {l}");
            }
        }
        eprintln!("mkt: log: {}", log_path.display());
        // Stopped by Ctrl-C or SIGTERM/SIGHUP: exit as the shell reports it.
        Ok(if stopped_by_signal(status) { status } else { 1 })
    };
    if let Some(tree) = headers_tree(opts, config)?
        && let Err(status) = env.install_headers(&tree, &mut log, opts.verbose)?
    {
        return failed(&["make".into(), "headers".into()], status);
    }
    // The kernel's plain `make -jN`: mkt's record of its last build may
    // show that only modules' sources changed (see fast.rs).
    let tracked = name == "linux"
        && opts.kernel_headers.is_none()
        && opts.args.is_empty()
        && steps.len() == 1;
    let record_file = super::fast::record_path(&paths.state_dir, &env.src);
    let key = fast_key(&env);
    let mut how = String::new();
    let mut enter = Duration::ZERO;
    if tracked {
        match fast_path(
            &env,
            &record_file,
            &key,
            &steps[0].0,
            &mut log,
            opts.verbose,
        )? {
            Fast::Done(h, entered) => {
                enter = entered;
                if h.is_empty() {
                    say(&format!(
                        "{} in {} is up to date: nothing changed since mkt's last build ({:.1}s; log: {})",
                        what,
                        env.src.display(),
                        t0.elapsed().as_secs_f64(),
                        log_path.display()
                    ));
                    return Ok(0);
                }
                how = h;
            }
            Fast::Failed(argv, status) => return failed(&argv, status),
            Fast::Full(reason) => {
                let _ = writeln!(log, "mkt: building the whole tree: {reason}");
                tracing::info!("building the whole tree: {reason}");
            }
        }
    }
    if how.is_empty() {
        let _ = fs::remove_file(&record_file);
    }
    let start = super::fast::start_time(&env.src);
    for (i, Step(argv)) in steps.iter().enumerate().filter(|_| how.is_empty()) {
        let _ = writeln!(log, "$ {}", crate::util::shell::shell_quote(argv));
        let exit = env.run_logged(argv, &log, opts.verbose)?;
        enter = enter.max(exit.enter);
        tracing::info!("{} entered in {:?}", argv.join(" "), exit.enter);
        if exit.status != 0 {
            return failed(argv, exit.status);
        }
        // After olddefconfig of a generated config: what did not survive.
        if i > 0 && steps[i - 1].0[0].ends_with("merge_config.sh") {
            let cfg = env.src.join(".config");
            let result = fs::read_to_string(&cfg).map_err(|e| BuildError::Read(cfg, e))?;
            let report = kconfig_report(VM_CONFIG, &result);
            let _ = writeln!(log, "mkt: {report}");
            say(&report);
        }
    }
    if tracked && how.is_empty() {
        let r = super::fast::take_record(&env.src, &key, start);
        save_record(&record_file, r, &mut log);
    }
    say(&format!(
        "built {}{} in {} in {:.1}s (-j{}{}, entered in {:.1} ms; log: {})",
        what,
        how,
        env.src.display(),
        t0.elapsed().as_secs_f64(),
        jobs,
        if env.ccache { ", ccache" } else { "" },
        enter.as_secs_f64() * 1000.0,
        log_path.display()
    ));
    Ok(0)
}

/// `--shell`: the shell's exit status.
fn shell(env: &super::Env, opts: &BuildOptions) -> Result<i32, BuildError> {
    let mut argv = vec![env.shell.clone()];
    argv.extend(opts.args.iter().cloned());
    let exit = sandbox::run(&env.spec(&argv), &sandbox::HostFs, sandbox::Output::Inherit)
        .map_err(|e| BuildError::Enter(env.rootfs.clone(), argv.join(" "), e))?;
    tracing::info!("entered the rootfs in {:?}", exit.enter);
    Ok(exit.status)
}

/// `--with-kernel-headers[=TREE]`: the kernel tree, checked.
fn headers_tree(opts: &BuildOptions, config: &Config) -> Result<Option<PathBuf>, BuildError> {
    let Some(tree) = &opts.kernel_headers else {
        return Ok(None);
    };
    let tree = tree
        .clone()
        .or_else(|| config.defaults.kernel.clone())
        .ok_or(BuildError::NoHeadersTree)?;
    let tree = fs::canonicalize(&tree).map_err(|e| BuildError::NoDir(tree.clone(), e))?;
    if let found @ (Project::RdmaCore | Project::Iproute2 | Project::Qemu) = discover(&tree)? {
        check_wanted("kernel", &tree, &found)?;
    }
    Ok(Some(tree))
}

/// The project's steps, or the recipe's one: (name, description, steps).
fn what_to_run(
    opts: &BuildOptions,
    env: &mut super::Env,
    project: Option<Project>,
) -> Result<(&'static str, String, Vec<Step>), BuildError> {
    Ok(if let Some(recipe) = &opts.recipe {
        // The recipe runs with `sh -e`, from a copy mkt shows at /tmp/.mkt.
        let dst = env.files.join("recipe");
        fs::copy(recipe, &dst).map_err(|e| BuildError::Recipe(recipe.clone(), e))?;
        env.add_recipe_vars();
        let mut argv = vec![
            "/bin/sh".to_string(),
            "-e".into(),
            format!("{MKT_DIR}/recipe"),
        ];
        argv.extend(opts.args.iter().cloned());
        let what = format!("custom (recipe {})", recipe.display());
        ("custom", what, vec![Step(argv)])
    } else {
        let project = project.expect("discovered above");
        let is_kernel = matches!(project, Project::Kernel { .. });
        let input = StepInput {
            jobs: env.jobs,
            clean: opts.clean,
            kconfig: is_kernel && (opts.kconfig || !env.src.join(".config").exists()),
            olddefconfig: is_kernel
                && newer(
                    &env.src.join(".config"),
                    &env.src.join("include/config/auto.conf"),
                ),
            configured: match project {
                Project::Iproute2 => env.src.join("config.mk").exists(),
                _ => env.src.join("build/build.ninja").exists(),
            },
            args: opts.args.clone(),
        };
        (project.name(), project.describe(), steps(&project, &input))
    })
}

/// What the build depends on outside the tree: a different one means a
/// full build (the rootfs's compiler, the user and host kbuild records).
fn fast_key(env: &super::Env) -> String {
    let ctime = |p: &Path| fs::metadata(p).map(|m| (m.ino(), m.ctime(), m.ctime_nsec()));
    format!(
        "rootfs={} {:?} gcc={:?} user={} host={}",
        env.rootfs.display(),
        ctime(&env.rootfs),
        ctime(&env.rootfs.join("usr/bin/gcc")),
        crate::host::user::current().name,
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    )
}

enum Fast {
    /// Built the modules (the status line's words), or nothing to do ("").
    Done(String, Duration),
    Failed(Vec<String>, i32),
    Full(String),
}

/// The fast path (see fast.rs): `make -jN KOS` when only modules' own
/// sources changed, checked afterwards; `Full(why)` whenever it cannot be
/// sure.
fn fast_path(
    env: &super::Env,
    record_file: &Path,
    key: &str,
    make: &[String],
    log: &mut fs::File,
    verbose: bool,
) -> Result<Fast, BuildError> {
    use super::fast::{self, Plan};
    let tree = &env.src;
    let t = Instant::now();
    let Some(record) = fs::read_to_string(record_file)
        .ok()
        .and_then(|t| fast::Record::parse(&t))
    else {
        return Ok(Fast::Full("no record of a successful build by mkt".into()));
    };
    let (now, watch) = fast::walk_and_watch(tree).map_err(|e| BuildError::Read(tree.clone(), e))?;
    tracing::debug!(
        "fast path: record read and tree walked in {:?}",
        t.elapsed()
    );
    let modules = fast::modules(tree).unwrap_or_default();
    let plan = fast::plan(&record, &now, key, &modules, |p| {
        fs::read_to_string(tree.join(p)).ok()
    });
    let (kos, sources) = match plan {
        Plan::UpToDate => return Ok(Fast::Done(String::new(), Duration::ZERO)),
        Plan::Full(why) => return Ok(Fast::Full(why)),
        Plan::Modules { kos, sources } => (kos, sources),
    };
    let start = fast::start_time(tree);
    let saved = fast::Saved::take(tree);
    let mut argv = make.to_vec();
    argv.extend(fast::skipped_targets(tree));
    argv.extend(kos.iter().cloned());
    let _ = writeln!(
        log,
        "mkt: only modules' sources changed ({}): making just those modules",
        sources.join(" ")
    );
    let _ = writeln!(log, "$ {}", crate::util::shell::shell_quote(&argv));
    let t = Instant::now();
    tracing::debug!("fast path: watching: {}", watch.is_some());
    // The changed sources miss the cache: ccache's depend mode misses
    // without running the preprocessor first (~0.1 s a file here).
    let exit = env.run_logged_with(&argv, &[("CCACHE_DEPEND", "1")], log, verbose)?;
    tracing::debug!("fast path: make in {:?}", t.elapsed());
    let symvers = fs::read_to_string(tree.join("Module.symvers")).unwrap_or_default();
    saved
        .restore()
        .map_err(|e| BuildError::Write(tree.join("modules.order"), e))?;
    if stopped_by_signal(exit.status) {
        return Ok(Fast::Failed(argv, exit.status));
    }
    if exit.status != 0 {
        return Ok(Fast::Full(format!(
            "`{}` exited with status {}",
            argv.join(" "),
            exit.status
        )));
    }
    if fast::exports_of(&symvers, &kos) != fast::exports_of(&saved.text("Module.symvers"), &kos) {
        return Ok(Fast::Full(format!(
            "the exports of {} changed",
            kos.join(" ")
        )));
    }
    let t = Instant::now();
    // What the make wrote, from the watch (else walk the tree again).
    let after = match watch.and_then(fast::Watch::written) {
        Some(written) => {
            tracing::debug!("fast path: the make wrote {} files", written.len());
            let mut after = now;
            for p in &written {
                fast::restat(tree, p, &mut after);
            }
            after
        }
        None => fast::walk(tree).map_err(|e| BuildError::Read(tree.clone(), e))?,
    };
    tracing::debug!("fast path: checked in {:?}", t.elapsed());
    let allowed = fast::allowed_outputs(&kos, &modules);
    if let Some(p) = fast::unexpected_change(&record, &after, &sources, &allowed) {
        return Ok(Fast::Full(format!("making the modules changed {p}")));
    }
    fast::touch_chain(tree, &kos).map_err(|e| BuildError::Write(tree.join("modules.order"), e))?;
    // The record from this walk: only the files touched since need a look.
    let mut files = after;
    let touched = fast::order_chain(&kos)
        .into_iter()
        .chain(fast::RESTORED.map(String::from));
    for p in touched {
        fast::restat(tree, &p, &mut files);
    }
    let mut included = record.included_c.clone();
    for p in allowed.iter().filter(|p| p.ends_with(".o.cmd")) {
        if let Ok(text) = fs::read_to_string(tree.join(p)) {
            included.extend(fast::cmd_included_c(&text));
        }
    }
    let r = fast::record_of(key.to_string(), tree, files, start, included);
    save_record(record_file, Ok(r), log);
    tracing::debug!("fast path: recorded in {:?}", t.elapsed());
    let names: Vec<&str> = kos
        .iter()
        .map(|k| k.rsplit('/').next().unwrap_or(k))
        .collect();
    Ok(Fast::Done(
        format!(" (modules only: {})", names.join(", ")),
        exit.enter,
    ))
}

/// A step's status when Ctrl-C or SIGTERM/SIGHUP stopped it (as the shell
/// reports it: 128 + N).
fn stopped_by_signal(status: i32) -> bool {
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]
        .map(|s| 128 + s)
        .contains(&status)
}

/// Writes the record of a successful build; a failure only costs the
/// next build its fast path.
fn save_record(file: &Path, record: io::Result<super::fast::Record>, log: &mut fs::File) {
    if let Err(e) = record.and_then(|r| super::fast::write_record(file, &r)) {
        let _ = writeln!(log, "mkt: no record of this build for the next one: {e}");
    }
}

/// A config fragment's assignments: name → value (`None` = "is not set").
pub fn parse_config(text: &str) -> Vec<(String, Option<String>)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if let Some(rest) = l.strip_prefix("# ") {
                let name = rest.strip_suffix(" is not set")?;
                return name
                    .starts_with("CONFIG_")
                    .then(|| (name.to_string(), None));
            }
            let (k, v) = l.split_once('=')?;
            k.starts_with("CONFIG_")
                .then(|| (k.to_string(), Some(v.to_string())))
        })
        .collect()
}

/// The fragment's options that the resulting .config does not have as
/// asked: (name, asked, got). "n" and "not set" are the same.
pub fn dropped_options(
    fragment: &str,
    result: &str,
) -> Vec<(String, Option<String>, Option<String>)> {
    let got: std::collections::HashMap<String, Option<String>> =
        parse_config(result).into_iter().collect();
    let norm = |v: Option<&String>| v.filter(|v| v.as_str() != "n").cloned();
    parse_config(fragment)
        .into_iter()
        .filter_map(|(name, want)| {
            let have = norm(got.get(&name).and_then(|v| v.as_ref()));
            let want = norm(want.as_ref());
            (have != want).then_some((name, want, have))
        })
        .collect()
}

fn show_value(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "not set".into())
}

/// The one-line report on the generated config.
pub fn kconfig_report(fragment: &str, result: &str) -> String {
    let asked = parse_config(fragment).len();
    let dropped = dropped_options(fragment, result);
    if dropped.is_empty() {
        return format!("kconfig: generated .config; all {asked} options of mkt's fragment kept");
    }
    let list: Vec<String> = dropped
        .iter()
        .map(|(n, w, h)| format!("{n}={} (got {})", show_value(w), show_value(h)))
        .collect();
    format!(
        "kconfig: generated .config; {} of {asked} options of mkt's fragment did not survive olddefconfig: {}",
        dropped.len(),
        list.join(", ")
    )
}

/// The lines worth showing from a failed build's log: compiler and make
/// errors (the last 15), else the last 20 lines.
pub fn error_lines(log: &str) -> Vec<&str> {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("error:") || l.contains("Error ") || l.contains("*** "))
        .collect();
    let (pick, n) = if errors.is_empty() {
        (log.lines().collect::<Vec<_>>(), 20)
    } else {
        (errors, 15)
    };
    pick[pick.len().saturating_sub(n)..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kconfig_report_names_dropped_options() {
        let frag = "CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=y\n# comment\n";
        let result = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\n# CONFIG_D is not set\n";
        let d = dropped_options(frag, result);
        assert_eq!(
            d.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            ["CONFIG_B", "CONFIG_C", "CONFIG_D"]
        );
        let r = kconfig_report(frag, result);
        assert!(r.contains("3 of 4"), "{r}");
        assert!(r.contains("CONFIG_B=m (got y)"), "{r}");
        assert!(r.contains("CONFIG_C=not set (got y)"), "{r}");
        assert!(kconfig_report("CONFIG_A=y\n", "CONFIG_A=y\n").contains("all 1"));
        // The embedded fragment parses.
        assert!(parse_config(VM_CONFIG).len() > 50);
    }

    #[test]
    fn error_lines_prefer_errors() {
        let log = "CC a.o\ndrivers/x.c:3:1: error: expected ';'\nmake[2]: *** [x.o] Error 1\nmake: *** [all] Error 2\n";
        assert_eq!(
            error_lines(log),
            [
                "drivers/x.c:3:1: error: expected ';'",
                "make[2]: *** [x.o] Error 1",
                "make: *** [all] Error 2"
            ]
        );
        let plain: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let got = error_lines(&plain);
        assert_eq!(got.len(), 20);
        assert_eq!(got[0], "line 11");
    }
}
