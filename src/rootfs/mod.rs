//! mkt's rootfs store: `rootfs_dir/NAME/` trees pulled from OCI images, with
//! their metadata in `rootfs_dir/.meta/NAME.json`.
//!
//! A pull unpacks into `rootfs_dir/.tmp-PID-NAME-XXXXXX` and renames it into
//! place only when every layer is in, so an interrupted or failed pull never
//! shows up as a tree. Temp dirs nobody holds the lock of (their mkt was
//! killed) are swept by the next pull, list or rm; see [`lock`].
//!
//! The store holds images' setuid-root files and device nodes: it is kept
//! mode 0700, so no other local user reaches any tree in it.

pub mod builder;
pub mod lock;
mod pull;
pub mod recipe;
pub mod resolve;
pub mod unpack;

pub use pull::pull;
pub(crate) use pull::pull_unpacked;

use crate::config::Paths;
use crate::oci::{self, OciError};
use crate::rootfs::unpack::UnpackError;
use indicatif::{MultiProgress, ProgressDrawTarget};
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

const META_DIR: &str = ".meta";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(
        "invalid rootfs name {0:?}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error(transparent)]
    Reference(#[from] oci::reference::ReferenceError),
    #[error("invalid --platform: {0}")]
    Platform(String),
    #[error("rootfs {name} already exists at {} (--force replaces it)", .path.display())]
    Exists { name: String, path: PathBuf },
    #[error("no rootfs named {name} in {} (have: {known})", .store.display())]
    NotFound {
        name: String,
        store: PathBuf,
        known: String,
    },
    #[error("cannot pull {image}")]
    Pull {
        image: String,
        #[source]
        source: Box<OciError>,
    },
    #[error("cannot pull {image}: {reason}")]
    Image { image: String, reason: String },
    #[error("cannot unpack {image} into {}", .path.display())]
    Unpack {
        image: String,
        path: PathBuf,
        #[source]
        source: Box<UnpackError>,
    },
    #[error("cannot {op} {}", .path.display())]
    Store {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Recipe(#[from] recipe::RecipeError),
    #[error(
        "cannot unpack {image}: the unpack in your user namespace exited with status {status} (its error is above)"
    )]
    MappedUnpack { image: String, status: i32 },
    #[error("cannot build rootfs {name} as this user")]
    Owners {
        name: String,
        #[source]
        source: crate::sandbox::IdsError,
    },
    #[error("cannot open the build log")]
    Log(#[source] crate::util::fs::CreateError),
    #[error("{program} is not installed (Debian/Ubuntu: apt install {package})")]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    #[error("cannot enter the tree of rootfs {name}")]
    Enter {
        name: String,
        #[source]
        source: crate::sandbox::NsError,
    },
    #[error(
        "building rootfs {name} failed: {step} exited with status {status}; nothing was stored\n  {tail}\nlog: {}",
        .log.display()
    )]
    Step {
        name: String,
        step: String,
        status: i32,
        tail: String,
        log: PathBuf,
    },
    #[error("rootfs {name} is in use by {by}; stop it first (`mkt stop`) or wait for it to end")]
    InUse { name: String, by: String },
    #[error("rootfs {name} is being removed or replaced ({})", .path.display())]
    Busy { name: String, path: PathBuf },
    #[error(
        "cannot gc while a pull or build uses the blob cache ({by}); run it again when that ends"
    )]
    GcBusy { by: String },
    #[error("cannot write rootfs metadata {}", .path.display())]
    Meta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub(crate) fn store_err(
    op: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Store { op, path, source }
}

/// What `mkt rootfs list` shows, kept in `.meta/NAME.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub name: String,
    /// The image as the user wrote it.
    pub image: String,
    /// Normalised: `docker.io/library/fedora:41`.
    pub reference: String,
    /// Digest of the image manifest unpacked (the platform's, for an index).
    pub manifest_digest: String,
    /// Digest of the index it was chosen from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<String>,
    pub config_digest: String,
    pub platform: String,
    pub layers: Vec<String>,
    /// The image's own creation time (from its config), if it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// When mkt pulled it (UTC, RFC 3339).
    pub pulled: String,
    /// Bytes of file content in the tree (hardlinked files counted once).
    pub size: u64,
    /// Paths in the tree.
    pub entries: u64,
    /// The recipe it was built from (`mkt rootfs build`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<String>,
    /// How the tree keeps its files' owners.
    #[serde(default)]
    pub owners: Owners,
}

/// How a stored tree keeps the image's owners, modes and devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owners {
    /// In QEMU's `user.virtfs.*` xattrs; the host files are the user's.
    #[default]
    Xattrs,
    /// Real owners: made by root.
    Host,
    /// Real owners shifted by the user's subordinate ids (0 is the user,
    /// 1.. the first subuid range): made in a user namespace.
    Mapped,
}

impl Owners {
    pub fn of(ids: &crate::sandbox::Ids) -> Owners {
        match ids {
            crate::sandbox::Ids::Host | crate::sandbox::Ids::Shifted { .. } => Owners::Host,
            crate::sandbox::Ids::Mapped { .. } => Owners::Mapped,
            crate::sandbox::Ids::Own => Owners::Xattrs,
        }
    }
}

/// The metadata of the stored tree `name`, if mkt made it.
pub fn meta(paths: &Paths, name: &str) -> Option<Meta> {
    std::fs::read(meta_path(paths, name))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// `mkt rootfs pull`'s options.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub image: String,
    pub name: Option<String>,
    pub platform: String,
    pub insecure: bool,
    pub force: bool,
    pub quiet: bool,
    pub owners: OwnersChoice,
}

/// `--owners`: how a pull keeps the image's owners.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OwnersChoice {
    /// Real owners when root or with a subuid range, else xattrs.
    #[default]
    Auto,
    /// Always in `user.virtfs.*` xattrs.
    Xattrs,
    /// Real owners, or an error saying how to get a subuid range.
    Real,
}

/// Where and how a pull unpacks.
enum How {
    /// In this process.
    Here(unpack::Record, Owners),
    /// In `mkt rootfs unpack-layers`, run as root of a user namespace with
    /// the user's subordinate ids, after the downloads.
    Mapped(crate::sandbox::Ids),
}

fn how(choice: OwnersChoice, name: &str) -> Result<How, RootfsError> {
    use crate::sandbox::Ids;
    if choice == OwnersChoice::Xattrs {
        return Ok(How::Here(unpack::Record::Xattrs, Owners::Xattrs));
    }
    match Ids::for_owners() {
        Ok(Ids::Host) => Ok(How::Here(unpack::Record::Real, Owners::Host)),
        Ok(ids) => Ok(How::Mapped(ids)),
        Err(e) if choice == OwnersChoice::Real => Err(RootfsError::Owners {
            name: name.into(),
            source: e,
        }),
        Err(_) => Ok(How::Here(unpack::Record::Xattrs, Owners::Xattrs)),
    }
}

/// A finished pull.
#[derive(Debug)]
pub struct Pulled {
    pub path: PathBuf,
    pub meta: Meta,
    pub downloaded: u64,
    pub skipped_xattrs: Vec<String>,
}

/// Store names: safe as one path component, never hidden.
pub(crate) fn check_name(name: &str) -> Result<(), RootfsError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RootfsError::BadName(name.into()))
    }
}

pub(crate) fn meta_path(paths: &Paths, name: &str) -> PathBuf {
    paths.rootfs_dir.join(META_DIR).join(format!("{name}.json"))
}

/// Removes `.tmp-…` and `.rm-…` dirs whose lock nobody holds: their mkt
/// ended without cleaning up (killed), in whatever pid namespace it ran.
pub(crate) fn sweep_stale(store: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(rd) = std::fs::read_dir(store) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(".tmp-") || name.starts_with(".rm-"))
            || !e.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let p = e.path();
        let mut tried = lock::try_exclusive(&p);
        if matches!(&tried, Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied) {
            // An image's mode-000 root: ours to open up (it is deleted).
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700));
            tried = lock::try_exclusive(&p);
        }
        if let Ok(lock::TryLock::Held(_held)) = tried {
            tracing::info!("removing {} left by an interrupted mkt", p.display());
            if let Err(err) = remove_any(&p) {
                tracing::warn!("cannot remove {}: {err}", p.display());
            }
        }
    }
}

/// A directory of the store, locked by this process, removed (whatever its
/// modes) when dropped unless kept.
pub(crate) struct TempTree(
    pub(crate) Option<PathBuf>,
    // Held, never read.
    #[allow(dead_code)] Option<lock::Lock>,
);

impl Drop for TempTree {
    fn drop(&mut self) {
        // Removed while still locked; the lock (field 1) drops after this.
        if let Some(p) = self.0.take()
            && let Err(e) = remove_any(&p)
        {
            tracing::warn!("cannot remove {}: {e}", p.display());
        }
    }
}

pub(crate) fn new_temp(store: &Path, kind: &str, name: &str) -> Result<TempTree, RootfsError> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{kind}-{}-{name}-", std::process::id()))
            .tempdir_in(store)
            .map_err(store_err("create a temporary directory in", store))?
            .keep();
        // A sweep in another process may see the new dir before it is
        // locked: if it won, the dir is gone (or going); take a new one.
        if let Ok(lock::TryLock::Held(l)) = lock::try_exclusive(&dir)
            && std::fs::symlink_metadata(&dir).is_ok_and(|m| m.nlink() > 0)
        {
            return Ok(TempTree(Some(dir), Some(l)));
        }
    }
}

/// Creates the store (and its metadata dir) mode 0700, and tightens an
/// existing store to 0700: it keeps images' setuid-root files and device
/// nodes, which no other local user may reach. mkt's own helpers (the
/// guest's virtiofsd, a user namespace's root) are this user, or root.
pub(crate) fn ensure_store(paths: &Paths) -> Result<(), RootfsError> {
    use std::os::unix::fs::DirBuilderExt;
    let store = &paths.rootfs_dir;
    if let Some(parent) = store.parent() {
        std::fs::create_dir_all(parent).map_err(store_err("create", parent))?;
    }
    for d in [store.clone(), store.join(META_DIR)] {
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(store_err("create", &d)(e)),
        }
    }
    tighten(store)
}

/// Makes an existing store mode 0700 (a no-op when it is, or is not ours;
/// a store that is a symlink to a directory has that directory tightened).
pub(crate) fn tighten(store: &Path) -> Result<(), RootfsError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match std::fs::metadata(store) {
        Ok(m)
            if m.is_dir()
                && m.mode() & 0o077 != 0
                && m.uid() == nix::unistd::geteuid().as_raw() =>
        {
            std::fs::set_permissions(store, std::fs::Permissions::from_mode(0o700))
                .map_err(store_err("make private (chmod 0700)", store))
        }
        _ => Ok(()),
    }
}

pub(crate) fn bars(quiet: bool) -> MultiProgress {
    if quiet || !std::io::stderr().is_terminal() {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    } else {
        MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
    }
}

pub fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// Moves the finished tree into place (swapping out an old one with
/// --force) and writes its metadata.
pub(crate) fn commit(
    paths: &Paths,
    name: &str,
    mut temp: TempTree,
    meta: &Meta,
    force: bool,
) -> Result<(), RootfsError> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    let store = &paths.rootfs_dir;
    let target = store.join(name);
    let temp_path = temp.0.clone().expect("temp dir");
    let mpath = meta_path(paths, name);
    let mtmp = mpath.with_extension(format!("json.{}", std::process::id()));
    let text = serde_json::to_vec_pretty(meta).map_err(|source| RootfsError::Meta {
        path: mpath.clone(),
        source,
    })?;
    let exists = target.symlink_metadata().is_ok();
    // The tree being replaced must not be in use; locked until it is gone.
    let _old = if exists && force {
        Some(lock::tree_exclusive(
            &target,
            name,
            Some(&paths.runtime_dir),
        )?)
    } else {
        None
    };
    std::fs::write(&mtmp, text).map_err(store_err("write", &mtmp))?;
    let flags = if exists && force {
        RenameFlags::RENAME_EXCHANGE
    } else {
        RenameFlags::RENAME_NOREPLACE
    };
    match renameat2(AT_FDCWD, &temp_path, AT_FDCWD, &target, flags) {
        Ok(()) => {}
        Err(e) => {
            let _ = std::fs::remove_file(&mtmp);
            if e == nix::errno::Errno::EEXIST {
                return Err(RootfsError::Exists {
                    name: name.into(),
                    path: target,
                });
            }
            return Err(store_err("move the unpacked tree to", &target)(e.into()));
        }
    }
    if !(exists && force) {
        // Nothing to clean: the temp dir is the tree now.
        temp.0 = None;
    }
    std::fs::rename(&mtmp, &mpath).map_err(store_err("write", &mpath))?;
    // With --force, `temp` now holds the old tree; dropping it removes it
    // (while `_old` still locks it against the sweep).
    drop(temp);
    Ok(())
}

/// One row of `mkt rootfs list`.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub path: PathBuf,
    /// `None` for a directory mkt did not pull (no metadata).
    pub meta: Option<Meta>,
}

/// `--json`: the metadata's fields with `name` and `path`, each key once
/// (a flattened [`Meta`] would repeat its own `name`).
impl Serialize for Listed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let mut obj = match &self.meta {
            Some(m) => match serde_json::to_value(m).map_err(S::Error::custom)? {
                serde_json::Value::Object(o) => o,
                _ => serde_json::Map::new(),
            },
            None => serde_json::Map::new(),
        };
        obj.insert("name".into(), self.name.clone().into());
        obj.insert("path".into(), self.path.to_string_lossy().into());
        obj.serialize(s)
    }
}

/// The trees in the store, sorted by name.
pub fn list(paths: &Paths) -> Result<Vec<Listed>, RootfsError> {
    let store = &paths.rootfs_dir;
    tighten(store)?;
    sweep_stale(store);
    let rd = match std::fs::read_dir(store) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(store_err("read", store)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(store_err("read", store))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let meta = std::fs::read(meta_path(paths, &name))
            .ok()
            .and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
        out.push(Listed {
            path: e.path(),
            name,
            meta,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes the tree `name` and its metadata. The tree disappears from the
/// store at once (renamed away), then is deleted.
pub fn remove(paths: &Paths, name: &str) -> Result<PathBuf, RootfsError> {
    let store = &paths.rootfs_dir;
    sweep_stale(store);
    let target = stored(paths, name)?;
    // Refused while a VM, build or shell uses it; the lock stays on the
    // tree (the inode) until it is deleted, so no sweep races the removal.
    let _in_use = lock::tree_exclusive(&target, name, Some(&paths.runtime_dir))?;
    let grave = new_temp(store, "rm", name)?;
    let grave_path = grave.0.clone().expect("temp dir");
    // Over the empty temp dir: atomic, and the name is free at once.
    std::fs::rename(&target, &grave_path).map_err(store_err("remove", &target))?;
    let m = meta_path(paths, name);
    match std::fs::remove_file(&m) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(store_err("remove", &m)(e));
        }
        _ => {}
    }
    let mut grave = grave;
    let p = grave.0.take().expect("temp dir");
    remove_any(&p).map_err(store_err("remove", &p))?;
    Ok(target)
}

/// Removes a tree whatever its owners: a tree with subordinate-id owners
/// (built in a user namespace) is removed from inside such a namespace.
pub(crate) fn remove_any(path: &Path) -> std::io::Result<()> {
    match unpack::remove_tree(path) {
        Ok(()) => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EPERM) =>
        {
            let Ok(ids @ crate::sandbox::Ids::Mapped { .. }) = crate::sandbox::Ids::for_owners()
            else {
                return Err(e);
            };
            let argv = ["rm", "-rf", "--one-file-system", "--"]
                .map(std::ffi::OsString::from)
                .into_iter()
                .chain([path.as_os_str().to_owned()])
                .collect::<Vec<_>>();
            match crate::sandbox::run_mapped(&argv, &ids, None) {
                Ok(0) => Ok(()),
                Ok(s) => Err(std::io::Error::other(format!("rm -rf exited with {s}"))),
                Err(ne) => Err(std::io::Error::other(ne)),
            }
        }
        Err(e) => Err(e),
    }
}

/// Bytes of regular files (each inode once) and number of paths under `root`.
pub(crate) fn tree_size(root: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            entries += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && (m.nlink() == 1 || seen.insert(m.ino())) {
                bytes += m.len();
            }
        }
    }
    (bytes, entries)
}

pub use crate::oci::human;

/// The directory of the stored tree `name`, or a clear error.
pub fn stored(paths: &Paths, name: &str) -> Result<PathBuf, RootfsError> {
    check_name(name)?;
    tighten(&paths.rootfs_dir)?;
    let p = paths.rootfs_dir.join(name);
    if p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        return Ok(p);
    }
    let known: Vec<String> = list(paths)?.into_iter().map(|l| l.name).collect();
    Err(RootfsError::NotFound {
        name: name.into(),
        store: paths.rootfs_dir.clone(),
        known: if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        },
    })
}

/// `mkt rootfs shell`: the tree entered as its root (its real owners when
/// it keeps them), /proc, /dev and /tmp of its own, the host network.
pub fn shell(paths: &Paths, name: &str, rw: bool, command: &[String]) -> Result<i32, RootfsError> {
    use crate::sandbox::{Ids, Layout, Mount, Spec, What};
    let tree = stored(paths, name)?;
    let _in_use = lock::tree_shared(&tree, name)?;
    let ids = match meta(paths, name).map(|m| m.owners) {
        // Root gets a user namespace too: image code must not have the
        // host's root (its files keep their owners through an idmapped mount).
        _ if nix::unistd::geteuid().is_root() => Ids::shifted_for_root(),
        Some(Owners::Host | Owners::Mapped) => {
            Ids::for_owners().map_err(|source| RootfsError::Owners {
                name: name.into(),
                source,
            })?
        }
        _ => Ids::Own,
    };
    let staging = crate::util::fs::work_dir("mkt-shell").map_err(store_err(
        "create a temporary directory in",
        &std::env::temp_dir(),
    ))?;
    let argv: Vec<std::ffi::OsString> = if command.is_empty() {
        vec!["/bin/sh".into(), "-l".into()]
    } else {
        command.iter().map(Into::into).collect()
    };
    let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), "/root".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    if let Some(t) = std::env::var_os("TERM") {
        env.push(("TERM".into(), t));
    }
    let spec = Spec {
        layout: Layout {
            rootfs: tree,
            staging: staging.path().to_path_buf(),
            mounts: vec![
                Mount::new("/proc", What::Proc),
                Mount::new("/dev", What::Dev),
                Mount::new("/tmp", What::Tmpfs),
            ],
            writable: rw,
        },
        hostname: name.into(),
        cwd: "/".into(),
        argv,
        env,
        ids,
    };
    let exit = crate::sandbox::run(
        &spec,
        &crate::sandbox::HostFs,
        crate::sandbox::Output::Inherit,
    )
    .map_err(|source| RootfsError::Enter {
        name: name.into(),
        source,
    })?;
    Ok(exit.status)
}

/// `mkt rootfs gc`: removes blobs (and recipe base tarballs, and partial
/// downloads) that no stored tree's metadata names. (files, bytes) freed.
pub fn gc(paths: &Paths) -> Result<(u64, u64), RootfsError> {
    use std::collections::HashSet;
    // No pull or build is between downloading a blob and storing the tree
    // that names it.
    let _excl = lock::blobs_exclusive(&paths.blob_dir, Some(&paths.runtime_dir))?;
    let mut keep: HashSet<String> = HashSet::new();
    for l in list(paths)? {
        if let Some(m) = l.meta {
            for d in m.layers.iter().chain([&m.config_digest]) {
                keep.insert(d.strip_prefix("sha256:").unwrap_or(d).to_string());
            }
        }
    }
    let (mut files, mut bytes) = (0, 0);
    for (sub, suffix) in [("sha256", ""), ("recipes", ".tar")] {
        let dir = paths.blob_dir.join(sub);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.strip_suffix(suffix).unwrap_or(&name);
            if keep.contains(hex) {
                continue;
            }
            // A partial download someone still writes (it is locked) stays.
            if name.contains(".partial")
                && !matches!(lock::try_exclusive(&e.path()), Ok(lock::TryLock::Held(_)))
            {
                continue;
            }
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(e.path()).map_err(store_err("remove", &e.path()))?;
            files += 1;
            bytes += size;
        }
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["fedora-41", "a", "b.t_1", "9x"] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".tmp-x", "-x", "a/b", "..", "a b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn time_and_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }

    #[test]
    fn sweeps_only_temp_dirs_nobody_holds_the_lock_of() {
        let d = tempfile::tempdir().unwrap();
        // The pid in a name means nothing (pid 1 is alive, here or in
        // another pid namespace): only the lock counts.
        let dead = d.path().join(".tmp-1-x-abc");
        let grave = d.path().join(".rm-1-x-abc");
        let tree = d.path().join("x");
        for p in [&dead, &grave, &tree] {
            std::fs::create_dir(p).unwrap();
        }
        let mine = new_temp(d.path(), "tmp", "x").unwrap();
        // A read-only dir inside is no obstacle.
        std::fs::create_dir(dead.join("ro")).unwrap();
        std::fs::write(dead.join("ro/f"), "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dead.join("ro"), std::fs::Permissions::from_mode(0o500)).unwrap();
        sweep_stale(d.path());
        let kept = mine.0.clone().unwrap();
        assert!(
            !dead.exists() && !grave.exists(),
            "unlocked temp dirs swept"
        );
        assert!(
            kept.exists() && tree.exists(),
            "a locked temp dir and a tree stay"
        );
        drop(mine);
        assert!(!kept.exists());
    }

    #[test]
    fn a_deep_tree_is_removed_with_few_open_files() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("deep");
        // Made with *at calls: a path this deep is longer than PATH_MAX.
        std::fs::create_dir(&top).unwrap();
        let mut cur = std::fs::File::open(&top).unwrap();
        use std::os::fd::AsFd;
        for _ in 0..1500 {
            nix::sys::stat::mkdirat(
                cur.as_fd(),
                "d",
                nix::sys::stat::Mode::from_bits_truncate(0o555),
            )
            .unwrap();
            nix::sys::stat::mkdirat(
                cur.as_fd(),
                "e",
                nix::sys::stat::Mode::from_bits_truncate(0o700),
            )
            .unwrap();
            let fd = nix::fcntl::openat(
                cur.as_fd(),
                "d",
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap();
            cur = std::fs::File::from(fd);
        }
        drop(cur);
        // More levels than a normal user's 1024 open files (the process
        // limit is not lowered here: other tests share this process).
        remove_any(&top).unwrap();
        assert!(!top.exists());
    }
}
