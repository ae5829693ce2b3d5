//! `mkt rootfs build RECIPE`: a tree from a recipe, made in a temp dir of
//! the store and renamed into place only when every step worked.
//!
//! Base: a suite is bootstrapped by mmdebstrap into a tarball cached under
//! the blob dir by the recipe's base key (an unchanged recipe reuses it),
//! then extracted with the host's tar as root of a user namespace that maps
//! the user's subordinate ids, so the tree keeps its real owners (shifted:
//! 0 is the user). An image base is pulled like `mkt rootfs pull`. The
//! recipe's packages (image bases), files and setup commands then run inside
//! the tree as its root, in the same kind of namespace, with the host network.

use super::recipe::{self, Found, Recipe};
use super::{Meta, Owners, RootfsError, TempTree, store_err};
use crate::config::Paths;
use crate::sandbox::{self, Ids, Layout, Mount, Output, What};
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// `mkt rootfs build`'s options.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// A recipe name or a path to a recipe file.
    pub recipe: String,
    pub name: Option<String>,
    pub force: bool,
    pub quiet: bool,
    /// Stream the steps' output instead of only logging it.
    pub verbose: bool,
}

/// A finished build.
#[derive(Debug)]
pub struct Built {
    pub path: PathBuf,
    pub meta: Meta,
    pub log: PathBuf,
    pub reused_base: bool,
}

/// Where the user's own recipes live.
pub(crate) fn user_recipes(paths: &Paths) -> PathBuf {
    paths
        .config_file
        .parent()
        .map(|d| d.join("recipes"))
        .unwrap_or_else(|| PathBuf::from("recipes"))
}

struct Log {
    path: PathBuf,
    file: std::fs::File,
    quiet: bool,
    started: Instant,
    name: String,
}

impl Log {
    /// The command line a step runs, in the log before its output.
    fn command(&mut self, argv: &[OsString]) {
        let words: Vec<_> = argv.iter().map(|a| a.to_string_lossy()).collect();
        let _ = writeln!(self.file, "$ {}", words.join(" "));
    }

    fn status(&mut self, msg: &str) {
        let _ = writeln!(self.file, "=== {msg}");
        if !self.quiet {
            eprintln!(
                "mkt: rootfs {}: {msg} [{:.0}s]",
                self.name,
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// A failed step: its last lines from the log, and the log's path.
    fn failed(&self, step: &str, status: i32) -> RootfsError {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().collect();
        let tail = tail[tail.len().saturating_sub(12)..].join("\n  ");
        RootfsError::Step {
            name: self.name.clone(),
            step: step.into(),
            status,
            tail,
            log: self.path.clone(),
        }
    }
}

/// Builds the recipe into the store.
pub fn build(
    paths: &Paths,
    opts: &BuildOptions,
    cancel: &AtomicBool,
) -> Result<Built, RootfsError> {
    let found = recipe::find(&opts.recipe, &user_recipes(paths))?;
    let name = opts.name.clone().unwrap_or_else(|| found.name.clone());
    super::check_name(&name)?;
    let store = &paths.rootfs_dir;
    super::ensure_store(paths)?;
    std::fs::create_dir_all(&paths.blob_dir).map_err(store_err("create", &paths.blob_dir))?;
    // Keeps `rootfs gc` off the base tarball and layers until the tree is stored.
    let _blobs = super::lock::blobs_shared(&paths.blob_dir)?;
    super::sweep_stale(store);
    let target = store.join(&name);
    if target.symlink_metadata().is_ok() && !opts.force {
        return Err(RootfsError::Exists { name, path: target });
    }
    let ids = Ids::for_owners().map_err(|source| RootfsError::Owners {
        name: name.clone(),
        source,
    })?;
    let (log_path, file) = crate::util::fs::open_log(&paths.logs_dir.join("rootfs"), &name)
        .map_err(RootfsError::Log)?;
    let mut log = Log {
        path: log_path,
        file,
        quiet: opts.quiet,
        started: Instant::now(),
        name: name.clone(),
    };
    log.status(&format!(
        "building from {} (log: {})",
        found.origin,
        log.path.display()
    ));
    let r = &found.recipe;
    let (temp, reused_base) = if r.base.suite.is_some() {
        suite_base(paths, &found, &ids, &mut log, opts)?
    } else {
        image_base(paths, &found, &name, &mut log, opts, cancel)?
    };
    let tree = temp.0.clone().expect("temp dir");
    steps(&tree, r, &ids, &mut log, opts)?;
    let (size, entries) = super::tree_size(&tree);
    let now = crate::util::time::rfc3339_now();
    let meta = Meta {
        name: name.clone(),
        image: format!("recipe:{}", found.name),
        reference: found.origin.clone(),
        manifest_digest: r.digest(),
        index_digest: None,
        config_digest: format!("sha256:{}", r.base_key()),
        platform: "linux/amd64".into(),
        layers: vec![],
        created: Some(now.clone()),
        pulled: now,
        size,
        entries,
        recipe: Some(found.name.clone()),
        owners: Owners::of(&ids),
    };
    super::commit(paths, &name, temp, &meta, opts.force)?;
    log.status(&format!(
        "ready at {} ({})",
        target.display(),
        super::human(size)
    ));
    Ok(Built {
        path: target,
        meta,
        log: log.path,
        reused_base,
    })
}

/// The cached mmdebstrap tarball for the recipe's base (made when missing),
/// extracted into a new temp dir of the store.
fn suite_base(
    paths: &Paths,
    found: &Found,
    ids: &Ids,
    log: &mut Log,
    opts: &BuildOptions,
) -> Result<(TempTree, bool), RootfsError> {
    let r = &found.recipe;
    let cache = paths.blob_dir.join("recipes");
    std::fs::create_dir_all(&cache).map_err(store_err("create", &cache))?;
    let tar = cache.join(format!("{}.tar", r.base_key()));
    let reused = tar.is_file();
    if reused {
        log.status(&format!("reusing the cached base {}", tar.display()));
    } else {
        let bin = crate::host::probe::find_program("mmdebstrap").ok_or(RootfsError::Missing {
            program: "mmdebstrap",
            package: "mmdebstrap",
        })?;
        let mode = if *ids == Ids::Host { "root" } else { "unshare" };
        let part = cache.join(format!(
            "{}.tar.{}.partial",
            r.base_key(),
            std::process::id()
        ));
        // apt's and dpkg's own lines (--verbose) in the C locale: what the
        // progress line counts (packages, bytes) and what the log keeps.
        let mut argv: Vec<OsString> = vec![
            "env".into(),
            "LC_ALL=C.UTF-8".into(),
            bin.into(),
            "--verbose".into(),
        ];
        argv.extend(
            r.mmdebstrap_args(mode, &part)
                .into_iter()
                .map(OsString::from),
        );
        log.status(&format!(
            "bootstrapping {} with mmdebstrap --mode={mode} ({} packages)",
            r.base.suite.as_deref().unwrap_or(""),
            r.packages.len()
        ));
        // mmdebstrap maps the subordinate ids itself in unshare mode.
        let status = if opts.verbose {
            run_logged(&argv, &Ids::Host, log, true)?
        } else {
            run_with_progress(&argv, log, opts.quiet)?
        };
        if status != 0 {
            let _ = std::fs::remove_file(&part);
            return Err(log.failed("mmdebstrap", status));
        }
        std::fs::rename(&part, &tar).map_err(store_err("store the base tarball at", &tar))?;
    }
    let temp = super::new_temp(&paths.rootfs_dir, "tmp", &found.name)?;
    let dir = temp.0.clone().expect("temp dir");
    log.status("unpacking the base");
    let argv: Vec<OsString> = [
        "tar",
        "--extract",
        "--numeric-owner",
        "--same-permissions",
        "--same-owner",
        "--xattrs",
        "--xattrs-include=user.*",
        "--xattrs-include=security.capability",
        // Device nodes cannot be made in a user namespace; the guest and
        // `mkt build` have their own /dev.
        "--exclude=./dev/*",
        "--file",
    ]
    .iter()
    .map(OsString::from)
    .chain([tar.clone().into(), "--directory".into(), dir.clone().into()])
    .collect();
    let status = run_logged(&argv, ids, log, opts.verbose)?;
    if status != 0 {
        return Err(log.failed("tar --extract of the base", status));
    }
    Ok((temp, reused))
}

/// The recipe's image, pulled into a temp dir of the store.
fn image_base(
    paths: &Paths,
    found: &Found,
    name: &str,
    log: &mut Log,
    opts: &BuildOptions,
    cancel: &AtomicBool,
) -> Result<(TempTree, bool), RootfsError> {
    let image = found.recipe.base.image.clone().expect("image base");
    log.status(&format!("pulling {image}"));
    let u = super::pull_unpacked(
        paths,
        &super::PullOptions {
            image,
            name: Some(name.into()),
            platform: "linux/amd64".into(),
            insecure: false,
            force: true,
            quiet: opts.quiet,
            owners: super::OwnersChoice::Auto,
        },
        cancel,
    )?;
    Ok((u.temp, u.downloaded == 0))
}

/// Runs a host program with its output in the log (and on stderr with -v).
fn run_logged(
    argv: &[OsString],
    ids: &Ids,
    log: &mut Log,
    verbose: bool,
) -> Result<i32, RootfsError> {
    log.command(argv);
    let out = (!verbose).then(|| log.file.as_raw_fd());
    sandbox::run_mapped(argv, ids, out).map_err(|source| RootfsError::Enter {
        name: log.name.clone(),
        source,
    })
}

/// Runs mmdebstrap with its output in the log, and what it is doing on
/// stderr: a status line redrawn in place on a terminal (step, packages,
/// bytes), else one line a step.
fn run_with_progress(argv: &[OsString], log: &mut Log, quiet: bool) -> Result<i32, RootfsError> {
    use std::io::IsTerminal;
    log.command(argv);
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| store_err("create a pipe for", &log.path)(std::io::Error::from(e)))?;
    let file = log
        .file
        .try_clone()
        .map_err(store_err("write", &log.path))?;
    let display = if quiet {
        Display::Quiet
    } else if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {prefix}{wide_msg} [{elapsed}]")
                .expect("valid template"),
        );
        bar.set_prefix(format!("mkt: rootfs {}: ", log.name));
        bar.set_message(Progress::default().to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Display::Bar(bar)
    } else {
        Display::Lines {
            name: log.name.clone(),
            started: log.started,
        }
    };
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        follow(rd, file, display);
        let _ = done_tx.send(());
    });
    let status = sandbox::run_mapped(argv, &Ids::Host, Some(wr.as_raw_fd()));
    // mmdebstrap has exited: with our end closed the reader sees EOF, unless
    // a daemon it started still holds the pipe; then it is not waited for.
    drop(wr);
    let _ = done.recv_timeout(std::time::Duration::from_secs(5));
    status.map_err(|source| RootfsError::Enter {
        name: log.name.clone(),
        source,
    })
}

/// Where the progress goes.
enum Display {
    Quiet,
    Bar(indicatif::ProgressBar),
    Lines { name: String, started: Instant },
}

/// Copies mmdebstrap's output to the log, line by line, and shows it.
fn follow(rd: std::os::fd::OwnedFd, mut file: std::fs::File, display: Display) {
    use std::io::BufRead;
    let mut progress = Progress::default();
    let mut lines = std::io::BufReader::new(std::fs::File::from(rd));
    let mut line = Vec::new();
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let _ = file.write_all(&line);
        let text = String::from_utf8_lossy(&line);
        let step_before = progress.step.clone();
        if !progress.feed(text.trim_end()) {
            continue;
        }
        match &display {
            Display::Quiet => {}
            Display::Bar(bar) => bar.set_message(progress.to_string()),
            Display::Lines { name, started } => {
                if progress.step != step_before {
                    eprintln!(
                        "mkt: rootfs {name}: mmdebstrap: {} [{:.0}s]",
                        progress.step,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
    if let Display::Bar(bar) = display {
        bar.finish_and_clear();
    }
}

/// What mmdebstrap (with --verbose, in the C locale) is doing, from its
/// output: its `I:` steps, apt's plan (`N newly installed`, `Need to get`)
/// and `Get:` lines with their sizes, and dpkg's `Setting up` lines. The
/// download counts are those of the current apt run (mmdebstrap runs apt
/// more than once).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Progress {
    /// mmdebstrap's current step, e.g. `downloading packages with apt`.
    pub step: String,
    /// Packages the current apt run installs.
    pub planned: u64,
    /// Bytes the current apt run downloads.
    pub to_download: u64,
    pub downloaded: u64,
    pub downloaded_bytes: u64,
    /// Packages dpkg has set up in this step.
    pub set_up: u64,
}

impl Progress {
    /// Takes one line of output; true when it changed something.
    pub fn feed(&mut self, line: &str) -> bool {
        if let Some(info) = line.strip_prefix("I: ") {
            // Steps end in "..."; the other lines are remarks (the chosen
            // format, the temp dir, "done").
            let Some(step) = info.trim_end().strip_suffix("...") else {
                return false;
            };
            self.step = step.trim().to_string();
            // A new step: no apt run yet (apt-get update's Get: lines are
            // index files, not packages).
            self.set_up = 0;
            self.planned = 0;
            self.to_download = 0;
            self.downloaded = 0;
            self.downloaded_bytes = 0;
            return true;
        }
        if line.starts_with("Get:") && self.planned > 0 {
            // Get:12 http://deb.debian.org/debian bookworm/main amd64 libc6 amd64 2.36-9 [2757 kB]
            self.downloaded += 1;
            if let Some(size) = line
                .rsplit_once('[')
                .and_then(|(_, s)| s.strip_suffix(']'))
                .and_then(parse_size)
            {
                self.downloaded_bytes += size;
            }
            return true;
        }
        if let Some(rest) = line.strip_prefix("Need to get ") {
            // Need to get 80.5 MB of archives.  /  Need to get 0 B/1234 kB of archives.
            let size = rest.split(" of archives").next().unwrap_or("");
            if let Some(b) = parse_size(size.split('/').next().unwrap_or(size)) {
                self.to_download = b;
                return true;
            }
            return false;
        }
        if line.starts_with("Setting up ") {
            self.set_up += 1;
            return true;
        }
        // 0 upgraded, 123 newly installed, 0 to remove and 0 not upgraded.
        if let Some((_, rest)) = line.split_once(" upgraded, ")
            && let Some((n, _)) = rest.split_once(" newly installed")
            && let Ok(n) = n.trim().parse::<u64>()
        {
            // A new apt run: its own plan and downloads.
            self.planned = n;
            self.to_download = 0;
            self.downloaded = 0;
            self.downloaded_bytes = 0;
            return true;
        }
        false
    }
}

/// The status line: short enough for an 80-column terminal, so the counts
/// are not cut off (`downloading packages 3/69 (2.7 MiB/28.3 MiB)`).
impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let step = self
            .step
            .trim_end_matches(" with apt")
            .trim_end_matches(" inside the chroot");
        f.write_str(if step.is_empty() {
            "starting mmdebstrap"
        } else {
            step
        })?;
        if self.downloaded > 0 {
            write!(f, " {}", self.downloaded)?;
            if self.planned >= self.downloaded {
                write!(f, "/{}", self.planned)?;
            }
            write!(f, " ({}", super::human(self.downloaded_bytes))?;
            if self.to_download >= self.downloaded_bytes && self.to_download > 0 {
                write!(f, "/{}", super::human(self.to_download))?;
            }
            f.write_str(")")?;
        }
        if self.set_up > 0 {
            write!(f, ", {} set up", self.set_up)?;
        }
        Ok(())
    }
}

/// apt's sizes: `2757 kB`, `1,234 B`, `80.5 MB` (SI units, as apt prints).
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let (num, unit) = s.trim().split_once(' ')?;
    let num: f64 = num.replace(',', "").parse().ok()?;
    let mult = match unit.trim() {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return None,
    };
    Some((num * mult).round() as u64)
}

/// The shell script the steps run as, inside the tree.
pub(crate) fn steps_script(r: &Recipe, install: Option<&str>) -> String {
    let mut s = String::from(
        "set -e\n\
         # The host's resolver while the steps run; the tree's own afterwards.\n\
         if [ -e /etc/resolv.conf ] || [ -L /etc/resolv.conf ]; then \
         cp -P /etc/resolv.conf /.mkt-recipe/resolv.orig; fi\n\
         rm -f /etc/resolv.conf\n\
         cat /.mkt-recipe/resolv.host > /etc/resolv.conf\n\
         restore() { rm -f /etc/resolv.conf; \
         if [ -e /.mkt-recipe/resolv.orig ] || [ -L /.mkt-recipe/resolv.orig ]; then \
         cp -P /.mkt-recipe/resolv.orig /etc/resolv.conf; fi; }\n\
         trap restore EXIT\n",
    );
    if let Some(cmd) = install {
        s.push_str(&format!("echo '=== installing packages'\n{cmd}\n"));
    }
    for (i, path) in r.files.keys().enumerate() {
        let q = crate::util::shell::quote_word(path);
        s.push_str(&format!(
            "mkdir -p \"$(dirname {q})\"\nrm -f {q}\ncat /.mkt-recipe/files/{i} > {q}\nchmod 0644 {q}\n"
        ));
    }
    for cmd in &r.setup {
        s.push_str(&format!(
            "echo {}\n{cmd}\n",
            crate::util::shell::quote_word(&format!("=== {cmd}"))
        ));
    }
    s
}

/// chmod -R a+rwX of a small directory mkt made.
fn open_up(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            open_up(&e.path())?;
        } else {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o666))?;
        }
    }
    Ok(())
}

/// Which package manager an image tree has.
fn package_manager(tree: &Path) -> Option<&'static str> {
    ["dnf", "yum", "apt-get", "apk", "zypper"]
        .into_iter()
        .find(|pm| {
            ["usr/bin", "bin", "usr/sbin", "sbin"]
                .iter()
                .any(|d| tree.join(d).join(pm).symlink_metadata().is_ok())
        })
}

/// Packages (image bases), files and setup commands, inside the tree.
fn steps(
    tree: &Path,
    r: &Recipe,
    ids: &Ids,
    log: &mut Log,
    opts: &BuildOptions,
) -> Result<(), RootfsError> {
    let install = match r.install_command(package_manager(tree)) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(reason)) => {
            return Err(RootfsError::Image {
                image: r.base.image.clone().unwrap_or_default(),
                reason,
            });
        }
    };
    if install.is_none() && r.files.is_empty() && r.setup.is_empty() {
        return Ok(());
    }
    // The recipe's inputs, bound at /.mkt-recipe (the mount point is made
    // in the tree, whose root directory belongs to the caller).
    let work = tempfile::Builder::new()
        .prefix("mkt-recipe-")
        .tempdir()
        .map_err(store_err(
            "create a temporary directory in",
            &std::env::temp_dir(),
        ))?;
    let input = work.path().join("in");
    let files = input.join("files");
    std::fs::create_dir_all(&files).map_err(store_err("create", &files))?;
    for (i, content) in r.files.values().enumerate() {
        let p = files.join(i.to_string());
        std::fs::write(&p, content).map_err(store_err("write", &p))?;
    }
    let resolv = std::fs::read("/etc/resolv.conf").unwrap_or_default();
    let p = input.join("resolv.host");
    std::fs::write(&p, resolv).map_err(store_err("write", &p))?;
    let script = steps_script(r, install.as_deref());
    let p = input.join("steps.sh");
    std::fs::write(&p, &script).map_err(store_err("write", &p))?;
    // Usable by the namespace's root, whichever host id that is.
    open_up(&input).map_err(store_err("set the modes of", &input))?;
    let point = tree.join(".mkt-recipe");
    std::fs::create_dir(&point).map_err(store_err("create", &point))?;
    let staging = work.path().join("root");
    std::fs::create_dir(&staging).map_err(store_err("create", &staging))?;
    log.status(&format!(
        "running the recipe's steps in the tree ({} files, {} setup commands{})",
        r.files.len(),
        r.setup.len(),
        if install.is_some() { ", packages" } else { "" }
    ));
    let spec = sandbox::Spec {
        layout: Layout {
            rootfs: tree.to_path_buf(),
            staging,
            mounts: vec![
                Mount::new("/proc", What::Proc),
                Mount::new("/dev", What::Dev),
                Mount::new("/tmp", What::Tmpfs),
                Mount::bind(&input, "/.mkt-recipe", false),
            ],
            writable: true,
        },
        hostname: "mkt-rootfs".into(),
        cwd: "/".into(),
        argv: vec!["/bin/sh".into(), "/.mkt-recipe/steps.sh".into()],
        env: [
            (
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ),
            ("HOME", "/root"),
            ("LANG", "C.UTF-8"),
            ("DEBIAN_FRONTEND", "noninteractive"),
            ("TERM", "dumb"),
        ]
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect(),
        ids: ids.clone(),
    };
    let out_fd: std::os::fd::OwnedFd = log
        .file
        .try_clone()
        .map_err(store_err("write", &log.path))?
        .into();
    let out = if opts.verbose {
        Output::Inherit
    } else {
        Output::To(&out_fd)
    };
    let exit = sandbox::run(&spec, &sandbox::HostFs, out);
    let _ = std::fs::remove_dir(&point);
    let exit = exit.map_err(|source| RootfsError::Enter {
        name: log.name.clone(),
        source,
    })?;
    if exit.status != 0 {
        return Err(log.failed("the recipe's steps", exit.status));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines of a real `mmdebstrap --verbose --variant=essential bookworm`
    /// run (mmdebstrap 1.3.5, C locale), in order, shortened.
    const MMDEBSTRAP: &str = "\
I: chroot architecture amd64 is equal to the host's architecture
I: finding correct signed-by value...
I: running apt-get update...
Get:1 http://deb.debian.org/debian bookworm InRelease [151 kB]
Get:2 http://deb.debian.org/debian bookworm/main amd64 Packages [8790 kB]
Fetched 8941 kB in 2s (3590 kB/s)
I: downloading packages with apt...
Reading package lists...
0 upgraded, 69 newly installed, 0 to remove and 0 not upgraded.
Need to get 29.7 MB of archives.
After this operation, 139 MB of additional disk space will be used.
Get:1 http://deb.debian.org/debian bookworm/main amd64 gcc-12-base amd64 12.2.0-14+deb12u1 [37.6 kB]
Get:2 http://deb.debian.org/debian bookworm/main amd64 libc6 amd64 2.36-9+deb12u14 [2759 kB]
Get:3 http://deb.debian.org/debian bookworm/main amd64 libgcc-s1 amd64 12.2.0-14+deb12u1 [49.9 kB]
";

    #[test]
    fn progress_follows_mmdebstrap_steps_packages_and_bytes() {
        let mut p = Progress::default();
        assert_eq!(p.to_string(), "starting mmdebstrap");
        let mut seen = Vec::new();
        for line in MMDEBSTRAP.lines() {
            if p.feed(line) {
                seen.push(p.to_string());
            }
        }
        // apt-get update's index files are not packages.
        assert!(
            seen.contains(&"running apt-get update".to_string()),
            "{seen:#?}"
        );
        assert!(
            !seen
                .iter()
                .any(|s| s.starts_with("running apt-get update:")),
            "{seen:#?}"
        );
        assert_eq!(p.step, "downloading packages with apt");
        assert_eq!((p.planned, p.to_download), (69, 29_700_000));
        assert_eq!(
            (p.downloaded, p.downloaded_bytes),
            (3, 37_600 + 2_759_000 + 49_900)
        );
        assert_eq!(
            p.to_string(),
            "downloading packages 3/69 (2.7 MiB/28.3 MiB)"
        );
        for line in [
            "Fetched 29.7 MB in 0s (114 MB/s)",
            "I: installing essential packages...",
            "I: done",
            "Unpacking gcc-12-base:amd64 (12.2.0-14+deb12u1) ...",
            "Setting up gcc-12-base:amd64 (12.2.0-14+deb12u1) ...",
            "Setting up libc-bin (2.36-9+deb12u14) ...",
        ] {
            p.feed(line);
        }
        assert_eq!(p.to_string(), "installing essential packages, 2 set up");
        assert!(!p.feed("Reading package lists..."));
        assert!(!p.feed("I: automatically chosen format: tar"));
        assert!(p.feed("I: creating tarball..."));
        assert_eq!(p.to_string(), "creating tarball");
    }

    #[test]
    fn apt_sizes_parse() {
        assert_eq!(parse_size("2759 kB"), Some(2_759_000));
        assert_eq!(parse_size("1,234 B"), Some(1234));
        assert_eq!(parse_size("29.7 MB"), Some(29_700_000));
        assert_eq!(parse_size("1.5 GB"), Some(1_500_000_000));
        assert_eq!(parse_size("0 B"), Some(0));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("3 parsecs"), None);
    }
}
