//! `mkt build`: builds a source tree inside a rootfs entered with
//! namespaces ([`crate::sandbox`]): project discovery, per-project steps, the
//! minimal VM kernel config, ccache, `-j` from the CPUs really available,
//! silent output with a log, user-owned outputs.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{Config, Paths};
use crate::sandbox::{self, Layout, Mount, What};

/// mkt's VM kernel fragment, merged over tinyconfig + kvm_guest.config.
pub const VM_CONFIG: &str = include_str!("../configs/vm.config");

/// Where mkt's generated files appear inside the tree.
pub(crate) const MKT_DIR: &str = "/tmp/.mkt";

/// What a source tree is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Project {
    /// A Linux kernel tree, with its Makefile version (e.g. `6.1.192`).
    Kernel {
        version: String,
    },
    RdmaCore,
    Iproute2,
    Qemu,
}

impl Project {
    /// The name used in logs and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Project::Kernel { .. } => "linux",
            Project::RdmaCore => "rdma-core",
            Project::Iproute2 => "iproute2",
            Project::Qemu => "qemu",
        }
    }

    /// `linux 6.1.192`, `iproute2`, ...
    pub fn describe(&self) -> String {
        match self {
            Project::Kernel { version } => format!("linux {version}"),
            p => p.name().to_string(),
        }
    }
}

/// The PROJECT argument's accepted names.
pub const PROJECT_NAMES: [&str; 6] = ["kernel", "linux", "rdma-core", "iproute2", "qemu", "custom"];

const LOOKED_FOR: &str = "a Linux kernel (Kbuild, a Makefile with VERSION and PATCHLEVEL, arch/), \
rdma-core (CMakeLists.txt with project(rdma-core)), iproute2 (ip/ and configure), \
QEMU (configure, meson.build and qemu-options.hx)";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no project found in {0}: looked for {LOOKED_FOR}")]
    NotAProject(PathBuf),
    #[error("{dir} is not a {want} tree: it looks like {found}")]
    WrongProject {
        dir: PathBuf,
        want: String,
        found: String,
    },
    #[error("unknown project {0:?} (known: {known})", known = PROJECT_NAMES.join(", "))]
    UnknownProject(String),
    #[error("--with-kernel-headers: no kernel tree given and no kernel in the config")]
    NoHeadersTree,
    #[error("project custom needs --recipe FILE")]
    NoRecipe,
    #[error("--recipe {0}: cannot read it")]
    Recipe(PathBuf, #[source] io::Error),
    #[error("-C {0}: not a directory")]
    NoDir(PathBuf, #[source] io::Error),
    #[error("--dir {0}: not a directory")]
    BadDir(PathBuf),
    #[error(transparent)]
    Rootfs(#[from] crate::rootfs::resolve::ResolveError),
    #[error("cannot create {0}")]
    Create(PathBuf, #[source] io::Error),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] io::Error),
    #[error("cannot enter the rootfs {0} to run {1}")]
    Enter(PathBuf, String, #[source] sandbox::NsError),
}

fn is_file(p: &Path) -> bool {
    p.is_file()
}

/// Recognises the tree in `dir`, or says what was looked for.
pub fn discover(dir: &Path) -> Result<Project, BuildError> {
    let f = |n: &str| dir.join(n);
    if is_file(&f("Kbuild"))
        && f("arch").is_dir()
        && let Some(version) = fs::read_to_string(f("Makefile"))
            .ok()
            .and_then(|mk| kernel_version(&mk))
    {
        return Ok(Project::Kernel { version });
    }
    if let Ok(cm) = fs::read_to_string(f("CMakeLists.txt")) {
        let cm = cm.to_ascii_lowercase().replace(' ', "");
        if cm.contains("project(rdma-core") {
            return Ok(Project::RdmaCore);
        }
    }
    if is_file(&f("configure")) && is_file(&f("meson.build")) && is_file(&f("qemu-options.hx")) {
        return Ok(Project::Qemu);
    }
    if is_file(&f("configure")) && f("ip").is_dir() {
        return Ok(Project::Iproute2);
    }
    Err(BuildError::NotAProject(dir.to_path_buf()))
}

/// `6.1.192` from the kernel Makefile's VERSION, PATCHLEVEL, SUBLEVEL and
/// EXTRAVERSION; `None` without VERSION and PATCHLEVEL.
pub fn kernel_version(makefile: &str) -> Option<String> {
    let var = |name: &str| {
        makefile.lines().take(20).find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let (v, p) = (var("VERSION")?, var("PATCHLEVEL")?);
    let mut s = format!("{v}.{p}");
    if let Some(sub) = var("SUBLEVEL").filter(|s| !s.is_empty()) {
        s = format!("{s}.{sub}");
    }
    if let Some(extra) = var("EXTRAVERSION") {
        s.push_str(&extra);
    }
    Some(s)
}

/// One command run inside the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step(pub Vec<String>);

impl Step {
    fn new<S: AsRef<str>>(argv: &[S]) -> Step {
        Step(argv.iter().map(|s| s.as_ref().to_string()).collect())
    }
}

/// What the steps depend on besides the project.
#[derive(Debug, Clone, Default)]
pub struct StepInput {
    pub jobs: u32,
    pub ccache: bool,
    pub clean: bool,
    /// Generate the VM kernel config first.
    pub kconfig: bool,
    /// Kernel: `.config` is newer than `include/config/auto.conf`.
    pub olddefconfig: bool,
    /// The build system was configured already (iproute2 config.mk,
    /// rdma-core/QEMU build/build.ninja).
    pub configured: bool,
    /// `-- ARGS`: given to make (or ninja).
    pub args: Vec<String>,
}

/// The commands that build `project`; pure.
pub fn steps(project: &Project, i: &StepInput) -> Vec<Step> {
    let j = format!("-j{}", i.jobs);
    let cc: Vec<String> = if i.ccache {
        vec!["CC=ccache gcc".into()]
    } else {
        vec![]
    };
    let make = |extra: &[&str]| {
        let mut v = vec!["make".to_string()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend(cc.iter().cloned());
        Step(v)
    };
    let mut s = Vec::new();
    match project {
        Project::Kernel { .. } => {
            if i.clean {
                s.push(make(&["clean"]));
            }
            if i.kconfig {
                s.push(make(&["tinyconfig"]));
                s.push(Step::new(&[
                    "scripts/kconfig/merge_config.sh",
                    "-m",
                    ".config",
                    "kernel/configs/kvm_guest.config",
                    &format!("{MKT_DIR}/vm.config"),
                ]));
                s.push(make(&["olddefconfig"]));
            } else if i.olddefconfig {
                s.push(make(&["olddefconfig"]));
            }
            let mut m = make(&[&j]);
            m.0.extend(i.args.iter().cloned());
            s.push(m);
        }
        Project::Iproute2 => {
            if i.clean {
                s.push(make(&["clean"]));
            }
            if !i.configured {
                s.push(Step::new(&["./configure"]));
            }
            let mut m = make(&[&j]);
            m.0.extend(i.args.iter().cloned());
            s.push(m);
        }
        Project::RdmaCore | Project::Qemu => {
            if i.clean {
                s.push(Step::new(&["rm", "-rf", "build"]));
            }
            if i.clean || !i.configured {
                s.push(if *project == Project::Qemu {
                    Step::new(&["./configure", "--target-list=x86_64-softmmu"])
                } else {
                    // build.sh runs cmake and a first ninja.
                    Step::new(&["./build.sh"])
                });
            }
            let mut n = Step::new(&["ninja", "-C", "build", &j]);
            n.0.extend(i.args.iter().cloned());
            s.push(n);
        }
    }
    s
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

/// Removes this user's `mkt-build-PID-*` work dirs whose mkt is gone: a
/// build killed by a signal has no chance to remove its own.
pub fn sweep_work_dirs(tmp: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = fs::read_dir(tmp) else { return };
    let me = nix::unistd::geteuid().as_raw();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("mkt-build-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let mine = e.metadata().is_ok_and(|m| m.uid() == me && m.is_dir());
        if mine && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!("removing {} left by a killed mkt build", e.path().display());
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

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

/// Everything needed to enter the rootfs for one source tree (also used
/// by `mkt ci`).
pub(crate) struct Env {
    pub(crate) rootfs: PathBuf,
    pub(crate) src: PathBuf,
    pub(crate) layout: Layout,
    pub(crate) env: Vec<(OsString, OsString)>,
    shell: String,
    pub(crate) ccache: bool,
    /// Host directory shown read-only at [`MKT_DIR`] inside.
    pub(crate) files: PathBuf,
    /// Holds the generated passwd/group/vm.config and the staging dir.
    _work: tempfile::TempDir,
}

pub(crate) fn prepare_env(
    opts: &BuildOptions,
    config: &Config,
    paths: &Paths,
    rootfs: PathBuf,
    src: PathBuf,
) -> Result<Env, BuildError> {
    // The same user `mkt run` recreates in guests, with the home mkt uses.
    let mut user = crate::guest::GuestUser::of(crate::host::user::current());
    user.home = paths.home.clone();
    user.shell = ["/bin/bash", "/bin/sh"]
        .into_iter()
        .find(|s| rootfs.join(&s[1..]).exists())
        .unwrap_or("/bin/sh")
        .to_string();
    let (name, home, shell) = (user.name.clone(), user.home.clone(), user.shell.clone());

    sweep_work_dirs(&std::env::temp_dir());
    let work = tempfile::Builder::new()
        .prefix(&format!("mkt-build-{}-", std::process::id()))
        .tempdir()
        .map_err(|e| BuildError::Create(std::env::temp_dir(), e))?;
    let files = work.path().join("files");
    let staging = work.path().join("root");
    for d in [&files, &staging] {
        fs::create_dir(d).map_err(|e| BuildError::Create(d.clone(), e))?;
    }
    let write = |n: &str, text: &str| -> Result<PathBuf, BuildError> {
        let p = files.join(n);
        fs::write(&p, text).map_err(|e| BuildError::Write(p.clone(), e))?;
        Ok(p)
    };
    let base = |n: &str| fs::read_to_string(rootfs.join("etc").join(n)).unwrap_or_default();
    let passwd = write(
        "passwd",
        &crate::guest::passwd_with_user(&base("passwd"), &user),
    )?;
    let groupf = write(
        "group",
        &crate::guest::group_with_user(&base("group"), &user),
    )?;
    write("vm.config", VM_CONFIG)?;

    let mut mounts = vec![
        Mount::new("/proc", What::Proc),
        Mount::new("/dev", What::Dev),
        Mount::new("/tmp", What::Tmpfs),
        Mount::bind_file(&passwd, "/etc/passwd"),
        Mount::bind_file(&groupf, "/etc/group"),
        Mount::bind(&files, MKT_DIR, true),
    ];
    if Path::new("/etc/resolv.conf").exists() {
        mounts.push(Mount::bind_file("/etc/resolv.conf", "/etc/resolv.conf"));
    }
    if home.is_dir() && home != Path::new("/") {
        mounts.push(Mount::bind(&home, &home, true));
    }
    let ccache = rootfs.join("usr/bin/ccache").exists();
    let mut env: Vec<(OsString, OsString)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), home.clone().into()),
        ("USER".into(), name.clone().into()),
        ("LOGNAME".into(), name.into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("SHELL".into(), shell.clone().into()),
    ];
    if let Some(term) = std::env::var_os("TERM") {
        env.push(("TERM".into(), term));
    }
    if ccache {
        let d = &paths.ccache_dir;
        fs::create_dir_all(d).map_err(|e| BuildError::Create(d.clone(), e))?;
        mounts.push(Mount::bind(d, d, false));
        env.push(("CCACHE_DIR".into(), d.clone().into()));
    }
    let mut extra: Vec<PathBuf> = Vec::new();
    for d in config.defaults.dirs.iter().chain(&opts.dirs) {
        let c = fs::canonicalize(d).map_err(|_| BuildError::BadDir(d.clone()))?;
        if !c.is_dir() {
            return Err(BuildError::BadDir(d.clone()));
        }
        extra.push(c);
    }
    extra.push(src.clone());
    for d in extra {
        // One mount per path: the last (read-write) bind wins.
        mounts.retain(|m| m.dst != d);
        mounts.push(Mount::bind(&d, &d, false));
    }
    Ok(Env {
        layout: Layout {
            rootfs: rootfs.clone(),
            staging,
            mounts,
            writable: false,
        },
        rootfs,
        src,
        env,
        shell,
        ccache,
        files,
        _work: work,
    })
}

impl Env {
    /// `make headers` in kernel `tree` (the uapi headers, made in its
    /// usr/include; `headers_install` would need rsync in the rootfs), then
    /// binds those directories over the rootfs's /usr/include ones for the
    /// following steps. `Err(status)` when make fails.
    fn install_headers(
        &mut self,
        tree: &Path,
        log: &mut fs::File,
        stream: bool,
    ) -> Result<Result<(), i32>, BuildError> {
        let saved = (self.layout.mounts.clone(), self.src.clone());
        self.layout.mounts.push(Mount::bind(tree, tree, false));
        self.src = tree.to_path_buf();
        let argv = vec!["make".to_string(), "-s".into(), "headers".into()];
        let _ = writeln!(log, "$ cd {}; {}", tree.display(), argv.join(" "));
        let r = self.run_logged(&argv, log, stream);
        (self.layout.mounts, self.src) = saved;
        let status = r?.status;
        if status != 0 {
            return Ok(Err(status));
        }
        let include = tree.join("usr/include");
        let rd = fs::read_dir(&include).map_err(|e| BuildError::Read(include.clone(), e))?;
        let multiarch = Path::new("/usr/include/x86_64-linux-gnu/asm");
        let mut dirs: Vec<_> = rd
            .flatten()
            .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.file_name())
            .collect();
        dirs.sort();
        for name in dirs {
            let dst = if name == "asm"
                && self
                    .rootfs
                    .join("usr/include/x86_64-linux-gnu/asm")
                    .is_dir()
            {
                multiarch.to_path_buf()
            } else {
                Path::new("/usr/include").join(&name)
            };
            self.layout
                .mounts
                .push(Mount::bind(include.join(&name), dst, true));
        }
        Ok(Ok(()))
    }

    pub(crate) fn spec(&self, argv: &[String]) -> sandbox::Spec {
        sandbox::Spec {
            layout: self.layout.clone(),
            // The host's name: kbuild bakes `hostname` into the kernel
            // (compile.h), so builds inside and outside mkt stay identical.
            hostname: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "mkt".into()),
            cwd: self.src.clone(),
            argv: argv.iter().map(OsString::from).collect(),
            env: self.env.clone(),
            ids: sandbox::Ids::Own,
        }
    }

    /// Runs one step with its output appended to `log` (and copied to
    /// stderr when `stream`).
    pub(crate) fn run_logged(
        &self,
        argv: &[String],
        log: &fs::File,
        stream: bool,
    ) -> Result<sandbox::Exit, BuildError> {
        let enter_err = |e| BuildError::Enter(self.rootfs.clone(), argv.join(" "), e);
        if !stream {
            let fd: OwnedFd = log
                .try_clone()
                .map_err(|e| BuildError::Write(PathBuf::from("log"), e))?
                .into();
            return sandbox::run(&self.spec(argv), &sandbox::HostFs, sandbox::Output::To(&fd))
                .map_err(enter_err);
        }
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| BuildError::Create(PathBuf::from("pipe"), e.into()))?;
        let mut log_w = log
            .try_clone()
            .map_err(|e| BuildError::Write(PathBuf::from("log"), e))?;
        let tee = std::thread::spawn(move || {
            let mut r = fs::File::from(rd);
            let mut buf = [0u8; 16384];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = log_w.write_all(&buf[..n]);
                let _ = io::stderr().write_all(&buf[..n]);
            }
        });
        let r = sandbox::run(&self.spec(argv), &sandbox::HostFs, sandbox::Output::To(&wr));
        drop(wr);
        let _ = tee.join();
        r.map_err(enter_err)
    }
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

pub(crate) fn check_wanted(want: &str, dir: &Path, found: &Project) -> Result<(), BuildError> {
    let ok = match want {
        "kernel" | "linux" => matches!(found, Project::Kernel { .. }),
        w => w == found.name(),
    };
    if ok {
        Ok(())
    } else {
        Err(BuildError::WrongProject {
            dir: dir.into(),
            want: want.into(),
            found: found.describe(),
        })
    }
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
        let mut argv = vec![env.shell.clone()];
        argv.extend(opts.args.iter().cloned());
        let exit = sandbox::run(&env.spec(&argv), &sandbox::HostFs, sandbox::Output::Inherit)
            .map_err(|e| BuildError::Enter(env.rootfs.clone(), argv.join(" "), e))?;
        tracing::info!("entered the rootfs in {:?}", exit.enter);
        return Ok(exit.status);
    }
    let jobs = crate::host::user::usable_cpus();
    let mut env = env;
    let (name, what, steps) = if let Some(recipe) = &opts.recipe {
        // The recipe runs with `sh -e`, from a copy mkt shows at /tmp/.mkt.
        let dst = env.files.join("recipe");
        fs::copy(recipe, &dst).map_err(|e| BuildError::Recipe(recipe.clone(), e))?;
        env.env.push(("MKT_JOBS".into(), jobs.to_string().into()));
        if env.ccache {
            env.env.push(("CC".into(), "ccache gcc".into()));
        }
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
            jobs,
            ccache: env.ccache,
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
    };
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
        let by_signal = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP].map(|s| 128 + s);
        Ok(if by_signal.contains(&status) {
            status
        } else {
            1
        })
    };
    if let Some(tree) = &opts.kernel_headers {
        let tree = tree
            .clone()
            .or_else(|| config.defaults.kernel.clone())
            .ok_or(BuildError::NoHeadersTree)?;
        let tree = fs::canonicalize(&tree).map_err(|e| BuildError::NoDir(tree.clone(), e))?;
        if let found @ (Project::RdmaCore | Project::Iproute2 | Project::Qemu) = discover(&tree)? {
            check_wanted("kernel", &tree, &found)?;
        }
        if let Err(status) = env.install_headers(&tree, &mut log, opts.verbose)? {
            return failed(&["make".into(), "headers".into()], status);
        }
    }
    let mut enter = Duration::ZERO;
    for (i, Step(argv)) in steps.iter().enumerate() {
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
    say(&format!(
        "built {} in {} in {:.1}s (-j{}{}, entered in {:.1} ms; log: {})",
        what,
        env.src.display(),
        t0.elapsed().as_secs_f64(),
        jobs,
        if env.ccache { ", ccache" } else { "" },
        enter.as_secs_f64() * 1000.0,
        log_path.display()
    ));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)], dirs: &[&str]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for d in dirs {
            fs::create_dir_all(t.path().join(d)).unwrap();
        }
        for (f, text) in files {
            fs::write(t.path().join(f), text).unwrap();
        }
        t
    }

    #[test]
    fn discovery_table() {
        let mk = "# SPDX\nVERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION = -rc1\n";
        type Case<'a> = (
            &'a str,
            Vec<(&'a str, &'a str)>,
            Vec<&'a str>,
            Option<Project>,
        );
        let cases: Vec<Case> = vec![
            (
                "kernel",
                vec![("Kbuild", ""), ("Makefile", mk)],
                vec!["arch"],
                Some(Project::Kernel {
                    version: "6.1.192-rc1".into(),
                }),
            ),
            (
                "kernel without arch/",
                vec![("Kbuild", ""), ("Makefile", mk)],
                vec![],
                None,
            ),
            (
                "rdma-core",
                vec![(
                    "CMakeLists.txt",
                    "cmake_minimum_required(VERSION 3)\nproject(rdma-core C)\n",
                )],
                vec![],
                Some(Project::RdmaCore),
            ),
            (
                "rdma-core, upper case",
                vec![("CMakeLists.txt", "PROJECT (RDMA-CORE C)\n")],
                vec![],
                Some(Project::RdmaCore),
            ),
            (
                "other cmake",
                vec![("CMakeLists.txt", "project(foo)\n")],
                vec![],
                None,
            ),
            (
                "iproute2",
                vec![("configure", "")],
                vec!["ip"],
                Some(Project::Iproute2),
            ),
            (
                "qemu",
                vec![
                    ("configure", ""),
                    ("meson.build", ""),
                    ("qemu-options.hx", ""),
                ],
                vec![],
                Some(Project::Qemu),
            ),
            ("empty", vec![], vec![], None),
        ];
        for (name, files, dirs, want) in cases {
            let t = tree(&files, &dirs);
            match (discover(t.path()), want) {
                (Ok(p), Some(w)) => assert_eq!(p, w, "{name}"),
                (Err(e), None) => {
                    let msg = e.to_string();
                    assert!(msg.contains("looked for a Linux kernel"), "{name}: {msg}");
                    assert!(msg.contains("rdma-core") && msg.contains("QEMU"), "{msg}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn kernel_steps() {
        let k = Project::Kernel {
            version: "6.1".into(),
        };
        let base = StepInput {
            jobs: 4,
            ccache: true,
            ..Default::default()
        };
        let argv = |s: Vec<Step>| s.into_iter().map(|s| s.0.join(" ")).collect::<Vec<_>>();
        assert_eq!(argv(steps(&k, &base)), ["make -j4 CC=ccache gcc"]);
        let fresh = StepInput {
            kconfig: true,
            args: vec!["W=1".into()],
            ..base.clone()
        };
        assert_eq!(
            argv(steps(&k, &fresh)),
            [
                "make tinyconfig CC=ccache gcc",
                "scripts/kconfig/merge_config.sh -m .config kernel/configs/kvm_guest.config /tmp/.mkt/vm.config",
                "make olddefconfig CC=ccache gcc",
                "make -j4 CC=ccache gcc W=1",
            ]
        );
        let stale = StepInput {
            olddefconfig: true,
            clean: true,
            ccache: false,
            ..base.clone()
        };
        assert_eq!(
            argv(steps(&k, &stale)),
            ["make clean", "make olddefconfig", "make -j4"]
        );
        assert_eq!(
            argv(steps(&Project::Iproute2, &base)),
            ["./configure", "make -j4 CC=ccache gcc"]
        );
        let configured = StepInput {
            configured: true,
            ..base
        };
        assert_eq!(
            argv(steps(&Project::Qemu, &configured)),
            ["ninja -C build -j4"]
        );
        assert_eq!(
            argv(steps(&Project::RdmaCore, &StepInput::default())),
            ["./build.sh", "ninja -C build -j0"]
        );
    }

    #[test]
    fn work_dirs_of_dead_builds_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        // A pid that cannot be running (above pid_max's ceiling).
        let dead = tmp.path().join("mkt-build-4194304-abc");
        let live = tmp
            .path()
            .join(format!("mkt-build-{}-abc", std::process::id()));
        let other = tmp.path().join("mkt-build-x");
        for d in [&dead, &live, &other] {
            fs::create_dir_all(d.join("root")).unwrap();
        }
        sweep_work_dirs(tmp.path());
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
    }

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
