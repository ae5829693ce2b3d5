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
use crate::ns::{self, Ids, Layout, Mount, Output, What};
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
pub fn user_recipes(paths: &Paths) -> PathBuf {
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
    for d in [
        store.clone(),
        store.join(super::META_DIR),
        paths.blob_dir.clone(),
    ] {
        std::fs::create_dir_all(&d).map_err(store_err("create", &d))?;
    }
    super::sweep_stale(store);
    let target = store.join(&name);
    if target.symlink_metadata().is_ok() && !opts.force {
        return Err(RootfsError::Exists { name, path: target });
    }
    let ids = Ids::for_owners().map_err(|source| RootfsError::Owners {
        name: name.clone(),
        source,
    })?;
    let (log_path, file) = crate::build::open_log(&paths.logs_dir.join("rootfs"), &name)
        .map_err(|e| RootfsError::Log(Box::new(e)))?;
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
    let now = super::rfc3339_now();
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
        let mut argv: Vec<OsString> = vec![bin.into()];
        if opts.verbose {
            argv.push("--verbose".into());
        }
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
        let status = run_logged(&argv, &Ids::Host, log, opts.verbose)?;
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
    let _ = writeln!(
        log.file,
        "$ {}",
        argv.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = (!verbose).then(|| log.file.as_raw_fd());
    ns::run_mapped(argv, ids, out).map_err(|source| RootfsError::Enter {
        name: log.name.clone(),
        source,
    })
}

/// The shell script the steps run as, inside the tree.
pub fn steps_script(r: &Recipe, install: Option<&str>) -> String {
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
        let q = crate::qemu::quote_word(path);
        s.push_str(&format!(
            "mkdir -p \"$(dirname {q})\"\nrm -f {q}\ncat /.mkt-recipe/files/{i} > {q}\nchmod 0644 {q}\n"
        ));
    }
    for cmd in &r.setup {
        s.push_str(&format!(
            "echo {}\n{cmd}\n",
            crate::qemu::quote_word(&format!("=== {cmd}"))
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
    let spec = ns::Spec {
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
    let exit = ns::run(&spec, &ns::HostFs, out);
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
