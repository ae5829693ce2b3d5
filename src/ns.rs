//! Entering a rootfs tree without root: a user namespace that maps only the
//! caller's own uid/gid (so every file a build writes belongs to the caller),
//! plus mount, pid, uts and ipc namespaces, and `pivot_root` into the tree.
//!
//! The mount sequence is data: [`plan`] turns a [`Layout`] into a list of
//! [`Op`]s (pure, given a [`TreeView`] of the rootfs, so it is unit-tested
//! without privileges), and a small executor carries the ops out in the
//! child. The stored tree is only ever bind-mounted read-only; when a mount
//! point is missing from it (e.g. `/home/you`), the directory above is
//! "shadowed": a tmpfs goes over it and its entries are bound back one by
//! one, so the new mount point can be created in memory.
//!
//! Process layout: mkt forks C1, which unshares the namespaces and writes its
//! own id maps; C1 forks C2, PID 1 of the new pid namespace, which mounts
//! (a new /proc needs a process inside the pid namespace), pivots, forks the
//! command (C3) and reaps until it exits. C3 reports the moment it execs
//! (or why it could not get there) over a close-on-exec pipe.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

/// What a path is in the rootfs, as the planner needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink(PathBuf),
    /// Device nodes, sockets, fifos: skipped when a directory is shadowed.
    Other,
    Missing,
}

/// Read access to the rootfs for the planner; a fake in the tests.
pub trait TreeView {
    /// The kind of `path` itself (symlinks are not followed).
    fn kind(&self, path: &Path) -> Kind;
    /// The entries of directory `dir`, sorted by name.
    fn children(&self, dir: &Path) -> Vec<(OsString, Kind)>;
}

/// The real file system.
pub struct HostFs;

impl TreeView for HostFs {
    fn kind(&self, path: &Path) -> Kind {
        match std::fs::symlink_metadata(path) {
            Err(_) => Kind::Missing,
            Ok(m) if m.is_dir() => Kind::Dir,
            Ok(m) if m.is_file() => Kind::File,
            Ok(m) if m.file_type().is_symlink() => std::fs::read_link(path)
                .map(Kind::Symlink)
                .unwrap_or(Kind::Other),
            Ok(_) => Kind::Other,
        }
    }

    fn children(&self, dir: &Path) -> Vec<(OsString, Kind)> {
        let mut v: Vec<(OsString, Kind)> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| (e.file_name(), self.kind(&e.path())))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// One thing mounted inside the tree, at `dst` (an absolute path inside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub dst: PathBuf,
    pub what: What,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// A host directory (`dir`) or file, read-only or read-write.
    Bind { src: PathBuf, dir: bool, ro: bool },
    /// An empty, writable tmpfs.
    Tmpfs,
    /// A new procfs for the new pid namespace.
    Proc,
    /// A minimal /dev: a tmpfs with the host's harmless character devices
    /// bound in, a private devpts, /dev/shm and the usual symlinks.
    Dev,
}

impl Mount {
    pub fn bind(src: impl Into<PathBuf>, dst: impl Into<PathBuf>, ro: bool) -> Mount {
        Mount {
            dst: dst.into(),
            what: What::Bind {
                src: src.into(),
                dir: true,
                ro,
            },
        }
    }
    pub fn bind_file(src: impl Into<PathBuf>, dst: impl Into<PathBuf>) -> Mount {
        Mount {
            dst: dst.into(),
            what: What::Bind {
                src: src.into(),
                dir: false,
                ro: true,
            },
        }
    }
    pub fn new(dst: impl Into<PathBuf>, what: What) -> Mount {
        Mount {
            dst: dst.into(),
            what,
        }
    }
}

/// The root file system of the namespace: the stored tree plus mounts.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The rootfs directory on the host: only ever a bind source.
    pub rootfs: PathBuf,
    /// An empty host directory where the new root is assembled (the rootfs
    /// bound there read-only) and then pivoted into. Separate from the
    /// rootfs so that shadowing never hides a bind source.
    pub staging: PathBuf,
    pub mounts: Vec<Mount>,
    /// Bind the tree read-write (recipe steps, `mkt rootfs shell --rw`);
    /// builds only ever see it read-only.
    pub writable: bool,
}

/// The host devices a build may use, bound into the private /dev.
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// One step of the mount sequence; paths are host paths (before the pivot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Stop our mounts propagating back to the host (and vice versa).
    MakeRprivate,
    Bind {
        src: PathBuf,
        dst: PathBuf,
        ro: bool,
    },
    Tmpfs {
        dst: PathBuf,
    },
    Proc {
        dst: PathBuf,
    },
    Devpts {
        dst: PathBuf,
    },
    /// A directory in a tmpfs of ours (EEXIST is fine).
    Mkdir {
        path: PathBuf,
    },
    /// An empty file in a tmpfs of ours, as a file mount point.
    Touch {
        path: PathBuf,
    },
    Symlink {
        target: PathBuf,
        path: PathBuf,
    },
    /// Make `dst` the root and detach the old one.
    PivotRoot {
        new_root: PathBuf,
    },
    /// Put the tree's idmapped mount (made by mkt, [`Ids::Shifted`]) over
    /// the tree's own path, so that every bind from it below is idmapped.
    AttachIdmapped {
        dst: PathBuf,
    },
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::MakeRprivate => write!(f, "mount --make-rprivate /"),
            Op::Bind { src, dst, ro } => write!(
                f,
                "bind {} on {}{}",
                src.display(),
                dst.display(),
                if *ro { " read-only" } else { "" }
            ),
            Op::Tmpfs { dst } => write!(f, "mount tmpfs on {}", dst.display()),
            Op::Proc { dst } => write!(f, "mount proc on {}", dst.display()),
            Op::Devpts { dst } => write!(f, "mount devpts on {}", dst.display()),
            Op::Mkdir { path } => write!(f, "mkdir {}", path.display()),
            Op::Touch { path } => write!(f, "create {}", path.display()),
            Op::Symlink { target, path } => {
                write!(f, "symlink {} -> {}", path.display(), target.display())
            }
            Op::PivotRoot { new_root } => write!(f, "pivot_root into {}", new_root.display()),
            Op::AttachIdmapped { dst } => {
                write!(f, "mount the idmapped tree on {}", dst.display())
            }
        }
    }
}

/// Where a mounted subtree comes from, for the planner's bookkeeping.
#[derive(Debug, Clone)]
enum Origin {
    /// A read-only view of this rootfs directory: mount points must exist.
    Rootfs(PathBuf),
    /// A tmpfs of ours: mount points can be created.
    Tmpfs,
    /// A host bind or a special file system: assumed to have what we need.
    Opaque,
}

struct Planner<'a> {
    view: &'a dyn TreeView,
    staging: PathBuf,
    /// (path inside, origin), in mount order.
    mounts: Vec<(PathBuf, Origin)>,
    ops: Vec<Op>,
}

/// The mount sequence for `layout`: pure, given the view of the rootfs.
/// Mounts are ordered by depth (stable), so `/home/you` comes before
/// `/home/you/src/linux`.
pub fn plan(layout: &Layout, view: &dyn TreeView) -> Vec<Op> {
    let mut p = Planner {
        view,
        staging: layout.staging.clone(),
        mounts: vec![(PathBuf::from("/"), Origin::Rootfs(layout.rootfs.clone()))],
        ops: vec![
            Op::MakeRprivate,
            Op::Bind {
                src: layout.rootfs.clone(),
                dst: layout.staging.clone(),
                ro: !layout.writable,
            },
        ],
    };
    let mut mounts: Vec<&Mount> = layout.mounts.iter().collect();
    mounts.sort_by_key(|m| m.dst.components().count());
    for m in mounts {
        let dir = !matches!(m.what, What::Bind { dir: false, .. });
        p.ensure(&m.dst, dir);
        p.mount(m);
    }
    p.ops.push(Op::PivotRoot {
        new_root: layout.staging.clone(),
    });
    p.ops
}

impl Planner<'_> {
    fn host(&self, inside: &Path) -> PathBuf {
        self.staging
            .join(inside.strip_prefix("/").unwrap_or(inside))
    }

    /// The deepest mount containing `inside`.
    fn covering(&self, inside: &Path) -> (PathBuf, Origin) {
        self.mounts
            .iter()
            .rev()
            .find(|(p, _)| inside.starts_with(p))
            .cloned()
            .expect("/ is always mounted")
    }

    /// Makes sure mount point `inside` exists (a directory if `dir`).
    fn ensure(&mut self, inside: &Path, dir: bool) {
        let (prefix, origin) = self.covering(inside);
        let rel: Vec<&OsStr> = inside
            .strip_prefix(&prefix)
            .unwrap_or(Path::new(""))
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s),
                _ => None,
            })
            .collect();
        match origin {
            Origin::Opaque => {}
            Origin::Tmpfs => {
                let mut cur = prefix.clone();
                for (i, c) in rel.iter().enumerate() {
                    cur.push(c);
                    let last = i + 1 == rel.len();
                    let path = self.host(&cur);
                    self.ops.push(if last && !dir {
                        Op::Touch { path }
                    } else {
                        Op::Mkdir { path }
                    });
                }
            }
            Origin::Rootfs(base) => {
                // The first component that is not what we need: a missing
                // entry, a symlink (which could point anywhere, even out of
                // the tree), or the wrong kind at the end.
                let mut cur = base.clone();
                for (i, c) in rel.iter().enumerate() {
                    cur.push(c);
                    let last = i + 1 == rel.len();
                    let ok = match self.view.kind(&cur) {
                        Kind::Dir => !last || dir,
                        Kind::File => last && !dir,
                        _ => false,
                    };
                    if !ok {
                        let mut parent = prefix.clone();
                        parent.extend(&rel[..i]);
                        let mut parent_src = base.clone();
                        parent_src.extend(&rel[..i]);
                        self.shadow(&parent, &parent_src, c);
                        self.ensure(inside, dir);
                        return;
                    }
                }
            }
        }
    }

    /// Puts a tmpfs over `inside` and binds back (read-only) every entry of
    /// the rootfs directory `src` except `except`, which is then made anew.
    fn shadow(&mut self, inside: &Path, src: &Path, except: &OsStr) {
        self.ops.push(Op::Tmpfs {
            dst: self.host(inside),
        });
        self.mounts.push((inside.to_path_buf(), Origin::Tmpfs));
        for (name, kind) in self.view.children(src) {
            if name == except {
                continue;
            }
            let child = inside.join(&name);
            let path = self.host(&child);
            let from = src.join(&name);
            match kind {
                Kind::Dir => {
                    self.ops.push(Op::Mkdir { path: path.clone() });
                    self.ops.push(Op::Bind {
                        src: from.clone(),
                        dst: path,
                        ro: true,
                    });
                    self.mounts.push((child, Origin::Rootfs(from)));
                }
                Kind::File => {
                    self.ops.push(Op::Touch { path: path.clone() });
                    self.ops.push(Op::Bind {
                        src: from,
                        dst: path,
                        ro: true,
                    });
                }
                Kind::Symlink(target) => self.ops.push(Op::Symlink { target, path }),
                Kind::Other | Kind::Missing => {}
            }
        }
    }

    fn mount(&mut self, m: &Mount) {
        let dst = self.host(&m.dst);
        match &m.what {
            What::Bind { src, ro, dir } => {
                self.ops.push(Op::Bind {
                    src: src.clone(),
                    dst,
                    ro: *ro,
                });
                if *dir {
                    self.mounts.push((m.dst.clone(), Origin::Opaque));
                }
            }
            What::Tmpfs => {
                self.ops.push(Op::Tmpfs { dst });
                self.mounts.push((m.dst.clone(), Origin::Tmpfs));
            }
            What::Proc => {
                self.ops.push(Op::Proc { dst });
                self.mounts.push((m.dst.clone(), Origin::Opaque));
            }
            What::Dev => {
                self.ops.push(Op::Tmpfs { dst: dst.clone() });
                for d in DEVICES {
                    self.ops.push(Op::Touch { path: dst.join(d) });
                    self.ops.push(Op::Bind {
                        src: Path::new("/dev").join(d),
                        dst: dst.join(d),
                        ro: false,
                    });
                }
                for (dir, op) in [
                    (
                        "pts",
                        Op::Devpts {
                            dst: dst.join("pts"),
                        },
                    ),
                    (
                        "shm",
                        Op::Tmpfs {
                            dst: dst.join("shm"),
                        },
                    ),
                ] {
                    self.ops.push(Op::Mkdir {
                        path: dst.join(dir),
                    });
                    self.ops.push(op);
                }
                for (name, target) in [
                    ("ptmx", "pts/ptmx"),
                    ("fd", "/proc/self/fd"),
                    ("stdin", "/proc/self/fd/0"),
                    ("stdout", "/proc/self/fd/1"),
                    ("stderr", "/proc/self/fd/2"),
                ] {
                    self.ops.push(Op::Symlink {
                        target: target.into(),
                        path: dst.join(name),
                    });
                }
                self.mounts.push((m.dst.clone(), Origin::Opaque));
            }
        }
    }
}

/// Why entering the tree or running the command failed.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("path {0:?} contains a NUL byte")]
    Nul(OsString),
    #[error("cannot create a pipe")]
    Pipe(#[source] Errno),
    #[error("cannot fork")]
    Fork(#[source] Errno),
    #[error("cannot wait for the namespace's init")]
    Wait(#[source] Errno),
    #[error("entering the rootfs failed at: {step}")]
    Setup {
        step: String,
        #[source]
        source: Errno,
    },
    #[error("cannot run {program:?} inside the rootfs")]
    Exec {
        program: OsString,
        #[source]
        source: Errno,
    },
    #[error("the namespace's init ended without reporting (status {0})")]
    Vanished(i32),
    #[error("{helper} failed to map the subordinate ids: {detail}")]
    MapHelper {
        helper: &'static str,
        detail: String,
    },
    #[error(
        "cannot {step} for a user namespace (root enters a tree through an idmapped mount: \
         Linux 5.12 or later, and a file system that supports it, like ext4, xfs, btrfs or tmpfs)"
    )]
    Idmap {
        step: String,
        #[source]
        source: Errno,
    },
}

/// A command to run inside a [`Layout`].
#[derive(Debug, Clone)]
pub struct Spec {
    pub layout: Layout,
    pub hostname: String,
    /// The working directory inside the tree.
    pub cwd: PathBuf,
    /// argv; argv[0] is looked up in the PATH given in `env`.
    pub argv: Vec<OsString>,
    /// The whole environment of the command.
    pub env: Vec<(OsString, OsString)>,
    /// Whose ids exist inside.
    pub ids: Ids,
}

/// The user namespace's id maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ids {
    /// Only the caller's own uid/gid, mapped to themselves: every file the
    /// command writes belongs to the caller (builds).
    Own,
    /// The caller is uid/gid 0 inside and its subordinate ranges are 1..:
    /// a package manager can chown (recipe steps as a normal user).
    /// Written by the setuid newuidmap/newgidmap helpers.
    Mapped {
        uids: Vec<IdRange>,
        gids: Vec<IdRange>,
    },
    /// No user namespace: the host's ids (the caller is root).
    Host,
    /// Root's way into an image's tree without the host's root: the command
    /// runs as root of a user namespace whose ids are the host's
    /// `base..base+count` (so it has no capability outside it, and no host
    /// root's file or sysctl rights), and the tree is mounted idmapped, so
    /// that on-disk id n shows (and is written) as n inside. Every mount is
    /// made by host root before the command leaves it, in namespaces owned
    /// by the initial user namespace, so the command can change none.
    Shifted { base: u32, count: u32 },
}

/// One line of a uid_map/gid_map: `inside outside count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// Why the caller cannot own a tree's ids.
#[derive(Debug, thiserror::Error)]
pub enum IdsError {
    #[error(
        "{user} has no subordinate {kind} range in {file}, which a rootless package install needs \
         (to chown files to the image's users); ask an admin to run: \
         sudo usermod --add-subuids {r} --add-subgids {r} {user}",
        r = crate::host::probe::suggested_subid_range()
    )]
    NoRange {
        user: String,
        kind: &'static str,
        file: &'static str,
    },
    #[error("{0} not found: install it (Debian: uidmap, Fedora: shadow-utils)")]
    NoHelper(&'static str),
}

impl Ids {
    /// The ids a tree needs its owners kept with: the host's for root, else
    /// 0 = the caller plus the caller's first subordinate range as 1...
    pub fn for_owners() -> Result<Ids, IdsError> {
        let uid = nix::unistd::geteuid();
        if uid.is_root() {
            return Ok(Ids::Host);
        }
        let gid = nix::unistd::getegid().as_raw();
        let user = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        let read = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
        let range = |file: &'static str, kind: &'static str| {
            crate::host::probe::subid_ranges(&read(file), &user, uid.as_raw())
                .into_iter()
                .find(|(_, c)| *c >= 1)
                .map(|(s, c)| (s as u32, c.min(u32::MAX as u64 - 1) as u32))
                .ok_or_else(|| IdsError::NoRange {
                    user: user.clone(),
                    kind,
                    file,
                })
        };
        let (us, uc) = range("/etc/subuid", "uid")?;
        let (gs, gc) = range("/etc/subgid", "gid")?;
        for h in ["newuidmap", "newgidmap"] {
            if crate::host::probe::find_program(h).is_none() {
                return Err(IdsError::NoHelper(h));
            }
        }
        let map = |own: u32, start: u32, count: u32| {
            vec![
                IdRange {
                    inside: 0,
                    outside: own,
                    count: 1,
                },
                IdRange {
                    inside: 1,
                    outside: start,
                    count,
                },
            ]
        };
        Ok(Ids::Mapped {
            uids: map(uid.as_raw(), us, uc),
            gids: map(gid, gs, gc),
        })
    }

    /// [`Ids::Shifted`] for root: root's first subordinate range when it
    /// has one, else systemd's "foreign" range (0x7FFE0000, 65536 ids),
    /// which no host user has.
    pub fn shifted_for_root() -> Ids {
        let text = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
        let range = crate::host::probe::subid_ranges(&text, "root", 0)
            .into_iter()
            .find(|(s, c)| *c >= 65536 && *s > 0 && *s + *c <= u32::MAX as u64);
        match range {
            Some((s, _)) => Ids::Shifted {
                base: s as u32,
                count: 65536,
            },
            None => Ids::Shifted {
                base: 0x7FFE_0000,
                count: 65536,
            },
        }
    }

    /// The host uid that `inside` is, under this mapping.
    pub fn host_uid(&self, inside: u32) -> Option<u32> {
        match self {
            Ids::Host | Ids::Shifted { .. } => Some(inside),
            Ids::Own => None,
            Ids::Mapped { uids, .. } => outside(uids, inside),
        }
    }
}

fn outside(map: &[IdRange], inside: u32) -> Option<u32> {
    map.iter()
        .find(|r| inside >= r.inside && inside - r.inside < r.count)
        .map(|r| r.outside + (inside - r.inside))
}

/// Runs newuidmap/newgidmap for `pid` (which has just unshared its user
/// namespace); the setuid helpers check the ranges against /etc/sub[ug]id.
fn write_maps(pid: Pid, uids: &[IdRange], gids: &[IdRange]) -> Result<(), NsError> {
    for (helper, map) in [("newuidmap", uids), ("newgidmap", gids)] {
        let mut cmd = std::process::Command::new(helper);
        cmd.arg(pid.to_string());
        for r in map {
            cmd.args([
                r.inside.to_string(),
                r.outside.to_string(),
                r.count.to_string(),
            ]);
        }
        let out = cmd.output().map_err(|e| NsError::MapHelper {
            helper,
            detail: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(NsError::MapHelper {
                helper,
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    Ok(())
}

/// Runs `argv` (a host program, looked up in PATH) in a new user namespace
/// with `ids` mapped, as uid 0 there, and returns its exit status. No other
/// namespace and no pivot: for host tools that must chown into a tree
/// (`tar -x`, `rm -r`, virtiofsd). With [`Ids::Host`] it runs directly.
pub fn run_mapped(argv: &[OsString], ids: &Ids, out: Option<i32>) -> Result<i32, NsError> {
    let child = spawn_mapped(argv, ids, &[], out)?;
    let _ignore = IgnoreSignals::new();
    // A stop signal mkt caught (`rootfs pull` and `build` catch SIGINT,
    // SIGTERM, SIGHUP) is passed on: a child that only the terminal's
    // signals reach would otherwise run to its end after `kill PID`.
    let mut forwarded = false;
    let mut nap = Duration::from_millis(1);
    loop {
        let flags = (!forwarded).then_some(WaitPidFlag::WNOHANG);
        match waitpid(child, flags) {
            Ok(WaitStatus::Exited(_, c)) => return Ok(c),
            Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
            Ok(WaitStatus::StillAlive) => match crate::interrupt::caught() {
                Some(sig) => {
                    if let Ok(sig) = Signal::try_from(sig) {
                        signal_tree(child, sig);
                    }
                    forwarded = true;
                }
                None => {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(50));
                }
            },
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(NsError::Wait(e)),
        }
    }
}

/// Sends `sig` to `root` and every process under it, as a terminal's
/// Ctrl-C reaches them all (mmdebstrap given SIGTERM alone waits for its
/// apt and dpkg to finish first).
fn signal_tree(root: Pid, sig: Signal) {
    let mut children: std::collections::HashMap<i32, Vec<i32>> = Default::default();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut todo = vec![root.as_raw()];
    while let Some(pid) = todo.pop() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
        todo.extend(children.get(&pid).into_iter().flatten());
    }
}

/// Starts `argv` as [`run_mapped`] does and returns its pid at once; it
/// dies with mkt (PDEATHSIG). `keep_fds` stay open in it; `out`, when
/// given, becomes its stdout and stderr (stdin /dev/null).
pub fn spawn_mapped(
    argv: &[OsString],
    ids: &Ids,
    keep_fds: &[i32],
    out: Option<i32>,
) -> Result<Pid, NsError> {
    let argv_c: Vec<CString> = argv.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let prog = argv.first().cloned().unwrap_or_default();
    let candidates: Vec<CString> = if prog.as_bytes().contains(&b'/') {
        vec![cstr(&prog)?]
    } else {
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|d| cstr(d.join(&prog).as_os_str()))
            .collect::<Result<_, _>>()?
    };
    let userns = matches!(ids, Ids::Mapped { .. });
    let (ready_rd, ready_wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(NsError::Pipe)?;
    let (go_rd, go_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(NsError::Pipe)?;
    let mut argv_p: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let parent = nix::unistd::getpid();
    // SAFETY: the child only makes system calls on data prepared above, then
    // execs or _exits.
    match unsafe { nix::unistd::fork() }.map_err(NsError::Fork)? {
        ForkResult::Child => {
            // Only mkt keeps the other ends: if the map helpers fail, its
            // closing `go` must reach this child as end-of-file.
            drop(ready_rd);
            drop(go_wr);
            die_with(parent);
            reset_signals();
            for fd in keep_fds {
                // SAFETY: clearing close-on-exec on an fd the caller passed.
                unsafe { libc::fcntl(*fd, libc::F_SETFD, 0) };
            }
            if let Some(out) = out {
                // SAFETY: plain fd juggling on descriptors this process owns.
                unsafe {
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                    libc::dup2(null, 0);
                    libc::dup2(out, 1);
                    libc::dup2(out, 2);
                }
            }
            if userns {
                if nix::sched::unshare(CloneFlags::CLONE_NEWUSER).is_err() {
                    // SAFETY: see above.
                    unsafe { libc::_exit(126) }
                }
                let _ = nix::unistd::write(&ready_wr, b"u");
                let mut b = [0u8; 1];
                if nix::unistd::read(&go_rd, &mut b) != Ok(1) {
                    // SAFETY: see above.
                    unsafe { libc::_exit(126) }
                }
            }
            for prog in &candidates {
                // SAFETY: NULL-terminated argv of live CStrings; the
                // environment is the caller's.
                unsafe { libc::execv(prog.as_ptr(), argv_p.as_ptr()) };
            }
            // SAFETY: see above.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(ready_wr);
            drop(go_rd);
            if let Ids::Mapped { uids, gids } = ids {
                let mut b = [0u8; 1];
                if nix::unistd::read(&ready_rd, &mut b) != Ok(1) {
                    let _ = waitpid(child, None);
                    return Err(NsError::Setup {
                        step: "unshare(user) for the mapped namespace".into(),
                        source: Errno::EPERM,
                    });
                }
                if let Err(e) = write_maps(child, uids, gids) {
                    drop(go_wr);
                    let _ = waitpid(child, None);
                    return Err(e);
                }
                let _ = nix::unistd::write(&go_wr, b"g");
            }
            Ok(child)
        }
    }
}

// From <linux/mount.h> (libc exports them only in newer versions).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached copy of the mount of `tree`, idmapped so that on-disk id n
/// is host id `base + n` (n inside a namespace mapping `0 base count`).
/// Needs host root: the file system's superblock belongs to the initial
/// user namespace.
fn idmapped_tree(tree: &Path, base: u32, count: u32) -> Result<OwnedFd, NsError> {
    use std::os::fd::FromRawFd;
    let err = |step: &str| {
        let step = step.to_string();
        move |source| NsError::Idmap { step, source }
    };
    let path = cstr(tree.as_os_str())?;
    // A user namespace with the map, only to name it: a child that
    // unshares one and waits for end-of-file on `go`.
    let (ready_rd, ready_wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(NsError::Pipe)?;
    let (go_rd, go_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(NsError::Pipe)?;
    // SAFETY: the child only makes system calls, then _exits.
    let child = match unsafe { nix::unistd::fork() }.map_err(NsError::Fork)? {
        ForkResult::Child => {
            drop(ready_rd);
            drop(go_wr);
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            if nix::sched::unshare(CloneFlags::CLONE_NEWUSER).is_ok() {
                let _ = nix::unistd::write(&ready_wr, b"u");
                let mut b = [0u8; 1];
                let _ = nix::unistd::read(&go_rd, &mut b);
            }
            // SAFETY: see run().
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(ready_wr);
    drop(go_rd);
    let made = (|| {
        let mut b = [0u8; 1];
        if nix::unistd::read(&ready_rd, &mut b) != Ok(1) {
            return Err(err("create a user namespace")(Errno::EPERM));
        }
        let map = format!("0 {base} {count}\n");
        for f in ["uid_map", "gid_map"] {
            write_file(&format!("/proc/{child}/{f}"), map.as_bytes())
                .map_err(err(&format!("write the {f} of the idmap namespace")))?;
        }
        let userns = nix::fcntl::open(
            format!("/proc/{child}/ns/user").as_str(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err("open the idmap namespace"))?;
        // SAFETY: open_tree(2) with a NUL-terminated path; the result is a
        // new fd we own.
        let raw = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                path.as_ptr(),
                OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint,
            )
        };
        let raw =
            Errno::result(raw).map_err(err(&format!("clone the mount of {}", tree.display())))?;
        // SAFETY: open_tree returned a new file descriptor.
        let mnt = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        };
        // SAFETY: mount_setattr(2) on our detached mount with a struct of
        // the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                mnt.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        Errno::result(r).map_err(err(&format!("mount {} idmapped", tree.display())))?;
        Ok(mnt)
    })();
    drop(go_wr);
    let _ = waitpid(child, None);
    made
}

/// Where the command's output goes.
pub enum Output<'a> {
    /// The caller's stdin, stdout and stderr (for an interactive shell).
    Inherit,
    /// stdout and stderr both to this file or pipe; stdin from /dev/null.
    To(&'a OwnedFd),
}

/// How the command ended, and how long entering took.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// The exit status, or 128 + the signal that killed it.
    pub status: i32,
    /// From the first fork to the command's exec.
    pub enter: Duration,
}

// Step numbers C1..C3 report on the pipe; op i is OP_BASE + i.
const STEP_UNSHARE: u32 = 1;
const STEP_SETGROUPS: u32 = 2;
const STEP_UID_MAP: u32 = 3;
const STEP_GID_MAP: u32 = 4;
const STEP_FORK: u32 = 5;
const STEP_HOSTNAME: u32 = 6;
const STEP_CHDIR: u32 = 7;
const STEP_STDIO: u32 = 8;
const STEP_EXEC: u32 = 9;
const STEP_USERNS: u32 = 10;
const STEP_USERNS_IDS: u32 = 11;
const OP_BASE: u32 = 1000;
const MSG_OK: u32 = 0;
const MSG_ERR: u32 = 1;

/// Everything the children need, converted before the fork so that they
/// only make system calls.
struct Prepared {
    ops: Vec<(Op, PreparedOp)>,
    ids: Ids,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    hostname: OsString,
    cwd: CString,
    /// argv[0] resolved against each PATH entry (absolute paths: itself).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    env: Vec<CString>,
}

enum PreparedOp {
    MakeRprivate,
    Bind(CString, CString, bool),
    Tmpfs(CString),
    Proc(CString),
    Devpts(CString),
    Mkdir(CString),
    Touch(CString),
    Symlink(CString, CString),
    PivotRoot(CString),
    /// The detached idmapped mount's fd, and where it goes.
    AttachIdmapped(i32, CString),
}

fn cstr(s: &OsStr) -> Result<CString, NsError> {
    CString::new(s.as_bytes()).map_err(|_| NsError::Nul(s.to_owned()))
}

fn prepare(spec: &Spec, ops: Vec<Op>, tree_fd: i32) -> Result<Prepared, NsError> {
    let p = |p: &Path| cstr(p.as_os_str());
    let ops = ops
        .into_iter()
        .map(|op| {
            let prepared = match &op {
                Op::MakeRprivate => PreparedOp::MakeRprivate,
                Op::Bind { src, dst, ro } => PreparedOp::Bind(p(src)?, p(dst)?, *ro),
                Op::Tmpfs { dst } => PreparedOp::Tmpfs(p(dst)?),
                Op::Proc { dst } => PreparedOp::Proc(p(dst)?),
                Op::Devpts { dst } => PreparedOp::Devpts(p(dst)?),
                Op::Mkdir { path } => PreparedOp::Mkdir(p(path)?),
                Op::Touch { path } => PreparedOp::Touch(p(path)?),
                Op::Symlink { target, path } => PreparedOp::Symlink(p(target)?, p(path)?),
                Op::PivotRoot { new_root } => PreparedOp::PivotRoot(p(new_root)?),
                Op::AttachIdmapped { dst } => PreparedOp::AttachIdmapped(tree_fd, p(dst)?),
            };
            Ok((op, prepared))
        })
        .collect::<Result<Vec<_>, NsError>>()?;
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let prog = spec.argv.first().cloned().unwrap_or_default();
    let path_var = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "/usr/bin:/bin".into());
    let candidates = if prog.as_bytes().contains(&b'/') {
        vec![cstr(&prog)?]
    } else {
        std::env::split_paths(&path_var)
            .map(|d| cstr(d.join(&prog).as_os_str()))
            .collect::<Result<_, _>>()?
    };
    Ok(Prepared {
        ops,
        ids: spec.ids.clone(),
        uid_map: format!("{uid} {uid} 1\n").into_bytes(),
        gid_map: format!("{gid} {gid} 1\n").into_bytes(),
        hostname: spec.hostname.clone().into(),
        cwd: p(&spec.cwd)?,
        candidates,
        argv: spec
            .argv
            .iter()
            .map(|a| cstr(a))
            .collect::<Result<_, _>>()?,
        env: spec
            .env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.clone();
                kv.push("=");
                kv.push(v);
                cstr(&kv)
            })
            .collect::<Result<_, _>>()?,
    })
}

fn now_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Enters the tree and runs the command; returns when it has exited.
pub fn run(spec: &Spec, view: &dyn TreeView, out: Output<'_>) -> Result<Exit, NsError> {
    let mut ops = plan(&spec.layout, view);
    // Root's idmapped view of the tree, made here (it needs host root) and
    // attached by C2 over the tree's path before anything binds from it.
    let idmapped = match spec.ids {
        Ids::Shifted { base, count } => {
            ops.insert(
                1,
                Op::AttachIdmapped {
                    dst: spec.layout.rootfs.clone(),
                },
            );
            Some(idmapped_tree(&spec.layout.rootfs, base, count)?)
        }
        _ => None,
    };
    let prep = prepare(spec, ops, idmapped.as_ref().map_or(-1, |f| f.as_raw_fd()))?;
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(NsError::Pipe)?;
    let out_fd = match out {
        Output::Inherit => None,
        Output::To(fd) => Some(fd.as_raw_fd()),
    };
    // For Ids::Mapped: C1 says "unshared" on `ready`, mkt runs the map
    // helpers on it and says "go".
    let (ready_rd, ready_wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(NsError::Pipe)?;
    let (go_rd, go_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(NsError::Pipe)?;
    let sync = (ready_wr.as_raw_fd(), go_rd.as_raw_fd());
    let t0 = now_ns();
    let parent = nix::unistd::getpid();
    // SAFETY: the child only makes system calls on data prepared above
    // (glibc's fork also keeps malloc usable in the child), then exits with
    // _exit, never returning into the caller's code.
    let c1 = match unsafe { nix::unistd::fork() }.map_err(NsError::Fork)? {
        ForkResult::Child => {
            die_with(parent);
            // C1 keeps only its own ends: a copy of `go`'s write end here
            // would make it wait forever when the map helpers fail.
            drop(rd);
            drop(ready_rd);
            drop(go_wr);
            let code = child1(&prep, wr.as_raw_fd(), out_fd, sync);
            // SAFETY: _exit skips atexit handlers and destructors that belong
            // to the parent's copy of the process state.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(wr);
    drop(ready_wr);
    drop(go_rd);
    if let Ids::Mapped { uids, gids } = &prep.ids {
        let mut b = [0u8; 1];
        // No byte: C1 failed to unshare and reports it below.
        if nix::unistd::read(&ready_rd, &mut b) == Ok(1) {
            if let Err(e) = write_maps(c1, uids, gids) {
                drop(go_wr);
                let _ = waitpid(c1, None);
                return Err(e);
            }
            let _ = nix::unistd::write(&go_wr, b"g");
        }
    }
    drop(go_wr);
    drop(ready_rd);
    // While the command runs, terminal signals are for it, not for mkt.
    let _ignore = IgnoreSignals::new();
    let read_msg = || {
        let mut msg = [0u8; 16];
        let mut got = 0;
        while got < msg.len() {
            match nix::unistd::read(&rd, &mut msg[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        (got == msg.len()).then_some(msg)
    };
    // The OK message (sent just before exec), then either end-of-file (the
    // exec worked) or the exec's error.
    let first = read_msg();
    let second = first
        .filter(|m| m[0..4] == MSG_OK.to_ne_bytes())
        .and_then(|_| read_msg());
    drop(rd);
    let status = loop {
        match waitpid(c1, None) {
            Ok(WaitStatus::Exited(_, c)) => break c,
            Ok(WaitStatus::Signaled(_, s, _)) => break 128 + s as i32,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(NsError::Wait(e)),
        }
    };
    let Some(msg) = first else {
        return Err(NsError::Vanished(status));
    };
    let field = |m: &[u8; 16], r: std::ops::Range<usize>| -> [u8; 4] { m[r].try_into().unwrap() };
    for m in [Some(msg), second].into_iter().flatten() {
        if u32::from_ne_bytes(field(&m, 0..4)) == MSG_ERR {
            let step = u32::from_ne_bytes(field(&m, 4..8));
            let errno = Errno::from_raw(i32::from_ne_bytes(field(&m, 8..12)));
            return Err(step_error(step, errno, &prep, spec));
        }
    }
    let at = u64::from_ne_bytes(msg[8..16].try_into().unwrap());
    Ok(Exit {
        status,
        enter: Duration::from_nanos(at.saturating_sub(t0)),
    })
}

fn step_error(step: u32, source: Errno, prep: &Prepared, spec: &Spec) -> NsError {
    let step = match step {
        STEP_EXEC => {
            return NsError::Exec {
                program: spec.argv.first().cloned().unwrap_or_default(),
                source,
            };
        }
        STEP_UNSHARE => {
            "unshare(user, mount, pid, uts, ipc) (user namespaces disabled? `mkt doctor` checks)"
                .to_string()
        }
        STEP_SETGROUPS => "write /proc/self/setgroups".into(),
        STEP_USERNS => "unshare(user) for the command".into(),
        STEP_USERNS_IDS => "become root of the command's user namespace".into(),
        STEP_UID_MAP => "write /proc/self/uid_map".into(),
        STEP_GID_MAP => "write /proc/self/gid_map".into(),
        STEP_FORK => "fork inside the namespace".into(),
        STEP_HOSTNAME => "sethostname".into(),
        STEP_CHDIR => format!("chdir {}", spec.cwd.display()),
        STEP_STDIO => "redirect stdio".into(),
        n => prep
            .ops
            .get(n.wrapping_sub(OP_BASE) as usize)
            .map(|(op, _)| op.to_string())
            .unwrap_or_else(|| format!("step {n}")),
    };
    NsError::Setup { step, source }
}

/// Ignores SIGINT/SIGQUIT in mkt while a child runs (like system(3)); the
/// child resets them. Restored on drop. A handler of mkt's own (`rootfs
/// pull`/`build` stop cleanly on Ctrl-C) stays: mkt must learn of the
/// interrupt to exit 130.
struct IgnoreSignals(Vec<(Signal, nix::sys::signal::SigAction)>);

impl IgnoreSignals {
    fn new() -> Self {
        use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
        let ign = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
        let mut old = Vec::new();
        for s in [Signal::SIGINT, Signal::SIGQUIT] {
            // SAFETY: installing SIG_IGN runs no code in signal context.
            if let Ok(prev) = unsafe { sigaction(s, &ign) } {
                if matches!(
                    prev.handler(),
                    SigHandler::Handler(_) | SigHandler::SigAction(_)
                ) {
                    // SAFETY: puts back the handler that was installed.
                    let _ = unsafe { sigaction(s, &prev) };
                } else {
                    old.push((s, prev));
                }
            }
        }
        IgnoreSignals(old)
    }
}

impl Drop for IgnoreSignals {
    fn drop(&mut self) {
        for (s, prev) in &self.0 {
            // SAFETY: restores the handler that was installed before.
            unsafe {
                let _ = nix::sys::signal::sigaction(*s, prev);
            }
        }
    }
}

fn report(fd: i32, kind: u32, step: u32, errno: i32, at: u64) {
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&kind.to_ne_bytes());
    msg[4..8].copy_from_slice(&step.to_ne_bytes());
    if kind == MSG_ERR {
        msg[8..12].copy_from_slice(&errno.to_ne_bytes());
    } else {
        msg[8..16].copy_from_slice(&at.to_ne_bytes());
    }
    // SAFETY: writing a stack buffer to a pipe we own; 16 bytes < PIPE_BUF,
    // so the message arrives whole.
    unsafe {
        libc::write(fd, msg.as_ptr().cast(), msg.len());
    }
}

/// Reports a failed step and returns the exit code for it.
fn fail(fd: i32, step: u32, e: Errno) -> i32 {
    report(fd, MSG_ERR, step, e as i32, 0);
    127
}

fn write_file(path: &str, data: &[u8]) -> Result<(), Errno> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    f.write_all(data)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

/// In a forked child: SIGKILL when the parent (`parent`) dies. A parent
/// killed between the fork and the prctl never sends it, so the child
/// checks it still has that parent afterwards, and else ends at once
/// rather than live on as an orphan.
fn die_with(parent: Pid) {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid() != parent {
        // SAFETY: _exit is async-signal-safe and runs none of the parent's
        // atexit handlers.
        unsafe { libc::_exit(1) }
    }
}

fn reset_signals() {
    use nix::sys::signal::{SigHandler, signal};
    for s in [Signal::SIGINT, Signal::SIGQUIT] {
        // SAFETY: restoring the default disposition runs no code.
        unsafe {
            let _ = signal(s, SigHandler::SigDfl);
        }
    }
}

/// C1: new namespaces, own id maps, then the pid namespace's init.
fn child1(p: &Prepared, fd: i32, out: Option<i32>, (ready, go): (i32, i32)) -> i32 {
    reset_signals();
    // Die with mkt: an orphaned build is never wanted.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    // Shifted: the user namespace comes last, in C3 (see command()).
    if !matches!(p.ids, Ids::Host | Ids::Shifted { .. }) {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    if let Err(e) = nix::sched::unshare(flags) {
        return fail(fd, STEP_UNSHARE, e);
    }
    match p.ids {
        Ids::Host | Ids::Shifted { .. } => {}
        Ids::Mapped { .. } => {
            // SAFETY: one-byte reads and writes on pipes this process owns.
            let ok = unsafe {
                let b = [b'u'];
                let mut g = [0u8];
                libc::write(ready, b.as_ptr().cast(), 1) == 1
                    && libc::read(go, g.as_mut_ptr().cast(), 1) == 1
            };
            if !ok {
                return fail(fd, STEP_UID_MAP, Errno::EPERM);
            }
        }
        Ids::Own => {
            // An unprivileged process may map only its own ids, and only
            // after giving up setgroups(2) (which could drop a group that
            // denies access).
            if let Err(e) = write_file("/proc/self/setgroups", b"deny") {
                return fail(fd, STEP_SETGROUPS, e);
            }
            if let Err(e) = write_file("/proc/self/uid_map", &p.uid_map) {
                return fail(fd, STEP_UID_MAP, e);
            }
            if let Err(e) = write_file("/proc/self/gid_map", &p.gid_map) {
                return fail(fd, STEP_GID_MAP, e);
            }
        }
    }
    // C2 cannot check getppid() after its prctl (its parent is outside its
    // pid namespace: always 0), so it watches a pipe whose only write end
    // C1 keeps: hung up means C1 died before C2 asked for PDEATHSIG.
    let (alive_rd, alive_wr) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return fail(fd, STEP_FORK, e),
    };
    // unshare(CLONE_NEWPID) applies to children only: C2 is PID 1.
    // SAFETY: as for the first fork; C2 ends with _exit.
    match unsafe { nix::unistd::fork() } {
        Err(e) => fail(fd, STEP_FORK, e),
        Ok(ForkResult::Child) => {
            drop(alive_wr);
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            let mut pfd = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&alive_rd),
                nix::poll::PollFlags::POLLIN,
            )];
            if nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO) != Ok(0) {
                // SAFETY: see run().
                unsafe { libc::_exit(1) }
            }
            let code = init(p, fd, out);
            // SAFETY: see run().
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            // SAFETY: closing C1's copy of the report pipe, so that mkt sees
            // end-of-file once the command has exec'd.
            unsafe {
                libc::close(fd);
            }
            wait_exit(child)
        }
    }
}

fn wait_exit(pid: Pid) -> i32 {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, c)) => return c,
            Ok(WaitStatus::Signaled(_, s, _)) => return 128 + s as i32,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return 127,
        }
    }
}

/// C2, PID 1: mounts, pivots, runs the command and reaps every orphan.
fn init(p: &Prepared, fd: i32, out: Option<i32>) -> i32 {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if let Err(e) = nix::unistd::sethostname(&p.hostname) {
        return fail(fd, STEP_HOSTNAME, e);
    }
    for (i, (_, op)) in p.ops.iter().enumerate() {
        if let Err(e) = execute(op) {
            return fail(fd, OP_BASE + i as u32, e);
        }
    }
    // Shifted: C3 says "unshared" on `ready`, C2 (still host root) writes
    // its id maps and says "go".
    let sync = match p.ids {
        Ids::Shifted { .. } => {
            let pipes = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .and_then(|a| Ok((a, nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)));
            match pipes {
                Ok(x) => Some(x),
                Err(e) => return fail(fd, STEP_FORK, e),
            }
        }
        _ => None,
    };
    // SAFETY: C3 only makes system calls and ends in exec or _exit.
    let cmd = match unsafe { nix::unistd::fork() } {
        Err(e) => return fail(fd, STEP_FORK, e),
        Ok(ForkResult::Child) => {
            // Only C2 keeps the other ends (see spawn_mapped).
            let sync = sync.map(|((ready_rd, ready_wr), (go_rd, go_wr))| {
                drop(ready_rd);
                drop(go_wr);
                (ready_wr, go_rd)
            });
            let code = command(p, fd, out, sync.as_ref());
            // SAFETY: see run().
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    if let (Some(((ready_rd, ready_wr), (go_rd, go_wr))), Ids::Shifted { base, count }) =
        (sync, &p.ids)
    {
        drop(ready_wr);
        drop(go_rd);
        let mut b = [0u8; 1];
        if nix::unistd::read(&ready_rd, &mut b) == Ok(1) {
            let map = format!("0 {base} {count}\n");
            let mut r = write_file(&format!("/proc/{cmd}/uid_map"), map.as_bytes())
                .map_err(|e| (STEP_UID_MAP, e));
            if r.is_ok() {
                r = write_file(&format!("/proc/{cmd}/gid_map"), map.as_bytes())
                    .map_err(|e| (STEP_GID_MAP, e));
            }
            match r {
                Ok(()) => {
                    let _ = nix::unistd::write(&go_wr, b"g");
                }
                // C3 sees end-of-file on `go` and exits.
                Err((step, e)) => {
                    fail(fd, step, e);
                }
            }
        }
        drop(go_wr);
    }
    // SAFETY: closing our copy of the report pipe (C3 holds its own), so
    // mkt sees end-of-file once C3 has exec'd.
    unsafe {
        libc::close(fd);
    }
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(pid, c)) if pid == cmd => return c,
            Ok(WaitStatus::Signaled(pid, s, _)) if pid == cmd => return 128 + s as i32,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return 127,
        }
    }
}

/// C3: the command, in the working directory, with the prepared env.
/// With `sync` (Ids::Shifted), first root of a user namespace of its own.
fn command(p: &Prepared, fd: i32, out: Option<i32>, sync: Option<&(OwnedFd, OwnedFd)>) -> i32 {
    if let Some((ready, go)) = sync {
        if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWUSER) {
            return fail(fd, STEP_USERNS, e);
        }
        let _ = nix::unistd::write(ready, b"u");
        let mut b = [0u8; 1];
        if nix::unistd::read(go, &mut b) != Ok(1) {
            // C2 reported why.
            return 127;
        }
        // Become the namespace's root (host `base`): host root's ids,
        // groups included, are gone.
        let root_u = nix::unistd::Uid::from_raw(0);
        let root_g = nix::unistd::Gid::from_raw(0);
        let r = nix::unistd::setgroups(&[])
            .and_then(|_| nix::unistd::setresgid(root_g, root_g, root_g))
            .and_then(|_| nix::unistd::setresuid(root_u, root_u, root_u));
        if let Err(e) = r {
            return fail(fd, STEP_USERNS_IDS, e);
        }
    }
    if let Err(e) = nix::unistd::chdir(p.cwd.as_c_str()) {
        return fail(fd, STEP_CHDIR, e);
    }
    if let Some(out) = out {
        // SAFETY: plain fd juggling on descriptors this process owns.
        let ok = unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
            null >= 0
                && libc::dup2(null, 0) >= 0
                && libc::dup2(out, 1) >= 0
                && libc::dup2(out, 2) >= 0
        };
        if !ok {
            return fail(fd, STEP_STDIO, Errno::last());
        }
    }
    let mut argv: Vec<*const libc::c_char> = p.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = p.env.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    report(fd, MSG_OK, 0, 0, now_ns());
    let mut last = Errno::ENOENT;
    for prog in &p.candidates {
        // SAFETY: argv and envp are NULL-terminated arrays of pointers to
        // CStrings that outlive the call; execve only returns on failure.
        unsafe {
            libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr());
        }
        let e = Errno::last();
        if e != Errno::ENOENT && e != Errno::ENOTDIR {
            last = e;
        }
    }
    // A second message after the OK one: exec failed (a successful exec
    // closes the pipe instead).
    fail(fd, STEP_EXEC, last)
}

fn execute(op: &PreparedOp) -> Result<(), Errno> {
    use nix::mount::mount;
    let none: Option<&str> = None;
    match op {
        PreparedOp::MakeRprivate => {
            mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        }
        PreparedOp::Bind(src, dst, ro) => {
            mount(
                Some(src.as_c_str()),
                dst.as_c_str(),
                none,
                MsFlags::MS_BIND,
                none,
            )?;
            if *ro {
                // A remount in a user namespace must keep the flags the
                // source mount has locked (nosuid, nodev, ...).
                let st = nix::sys::statvfs::statvfs(dst.as_c_str())?;
                let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                use nix::sys::statvfs::FsFlags as F;
                for (f, m) in [
                    (F::ST_NOSUID, MsFlags::MS_NOSUID),
                    (F::ST_NODEV, MsFlags::MS_NODEV),
                    (F::ST_NOEXEC, MsFlags::MS_NOEXEC),
                    (F::ST_NOATIME, MsFlags::MS_NOATIME),
                    (F::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
                    (F::ST_RELATIME, MsFlags::MS_RELATIME),
                ] {
                    if st.flags().contains(f) {
                        flags |= m;
                    }
                }
                mount(none, dst.as_c_str(), none, flags, none)?;
            }
            Ok(())
        }
        PreparedOp::Tmpfs(dst) => mount(
            Some("tmpfs"),
            dst.as_c_str(),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        PreparedOp::Proc(dst) => mount(
            Some("proc"),
            dst.as_c_str(),
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            none,
        ),
        PreparedOp::Devpts(dst) => mount(
            Some("devpts"),
            dst.as_c_str(),
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=620"),
        ),
        PreparedOp::Mkdir(path) => {
            match nix::unistd::mkdir(path.as_c_str(), Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => Ok(()),
                Err(e) => Err(e),
            }
        }
        PreparedOp::Touch(path) => {
            let fd = nix::fcntl::open(
                path.as_c_str(),
                nix::fcntl::OFlag::O_CREAT
                    | nix::fcntl::OFlag::O_WRONLY
                    | nix::fcntl::OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )?;
            drop(fd);
            Ok(())
        }
        PreparedOp::Symlink(target, path) => std::os::unix::fs::symlink(
            OsStr::from_bytes(target.as_bytes()),
            OsStr::from_bytes(path.as_bytes()),
        )
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
        PreparedOp::AttachIdmapped(fd, dst) => {
            // SAFETY: move_mount(2) with a valid fd and NUL-terminated paths.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_move_mount,
                    *fd,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    dst.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                )
            };
            Errno::result(r).map(drop)
        }
        PreparedOp::PivotRoot(new_root) => {
            // pivot_root(".", ".") stacks the old root on the new one; a
            // lazy unmount of "." then drops it, so the read-only tree needs
            // no directory for the old root.
            nix::unistd::chdir(new_root.as_c_str())?;
            nix::unistd::pivot_root(".", ".")?;
            nix::mount::umount2(".", MntFlags::MNT_DETACH)?;
            nix::unistd::chdir("/")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A rootfs as a map of host paths to kinds.
    struct Fake(BTreeMap<PathBuf, Kind>);

    impl Fake {
        fn new(entries: &[(&str, Kind)]) -> Fake {
            Fake(
                entries
                    .iter()
                    .map(|(p, k)| (PathBuf::from(p), k.clone()))
                    .collect(),
            )
        }
    }

    impl TreeView for Fake {
        fn kind(&self, path: &Path) -> Kind {
            if path == Path::new("/r") {
                return Kind::Dir;
            }
            self.0.get(path).cloned().unwrap_or(Kind::Missing)
        }
        fn children(&self, dir: &Path) -> Vec<(OsString, Kind)> {
            self.0
                .iter()
                .filter(|(p, _)| p.parent() == Some(dir))
                .map(|(p, k)| (p.file_name().unwrap().to_owned(), k.clone()))
                .collect()
        }
    }

    fn bind(src: &str, dst: &str, ro: bool) -> Op {
        Op::Bind {
            src: src.into(),
            dst: dst.into(),
            ro,
        }
    }
    fn mkdir(p: &str) -> Op {
        Op::Mkdir { path: p.into() }
    }
    fn touch(p: &str) -> Op {
        Op::Touch { path: p.into() }
    }
    fn tmpfs(p: &str) -> Op {
        Op::Tmpfs { dst: p.into() }
    }

    fn debian() -> Fake {
        Fake::new(&[
            ("/r/etc", Kind::Dir),
            ("/r/etc/passwd", Kind::File),
            ("/r/etc/resolv.conf", Kind::Symlink("/run/x".into())),
            ("/r/etc/hosts", Kind::File),
            ("/r/home", Kind::Dir),
            ("/r/home/debian", Kind::Dir),
            ("/r/tmp", Kind::Dir),
            ("/r/proc", Kind::Dir),
            ("/r/usr", Kind::Dir),
            ("/r/bin", Kind::Symlink("usr/bin".into())),
        ])
    }

    /// Each case: the mounts asked for, and the ops expected between the
    /// rootfs bind and the pivot.
    #[test]
    fn plan_table() {
        let cases: Vec<(&str, Vec<Mount>, Vec<Op>)> = vec![
            ("nothing to mount", vec![], vec![]),
            (
                "existing mount points are used as they are",
                vec![
                    Mount::new("/proc", What::Proc),
                    Mount::new("/tmp", What::Tmpfs),
                    Mount::bind_file("/t/passwd", "/etc/passwd"),
                ],
                vec![
                    Op::Proc {
                        dst: "/s/proc".into(),
                    },
                    tmpfs("/s/tmp"),
                    bind("/t/passwd", "/s/etc/passwd", true),
                ],
            ),
            (
                "a source tree under /tmp is created in the tmpfs, parents first",
                vec![
                    Mount::bind("/tmp/a/linux", "/tmp/a/linux", false),
                    Mount::new("/tmp", What::Tmpfs),
                ],
                vec![
                    tmpfs("/s/tmp"),
                    mkdir("/s/tmp/a"),
                    mkdir("/s/tmp/a/linux"),
                    bind("/tmp/a/linux", "/s/tmp/a/linux", false),
                ],
            ),
            (
                "a missing home shadows /home and binds its entries back",
                vec![
                    Mount::bind("/home/u", "/home/u", true),
                    Mount::bind("/home/u/src/linux", "/home/u/src/linux", false),
                ],
                vec![
                    tmpfs("/s/home"),
                    mkdir("/s/home/debian"),
                    bind("/r/home/debian", "/s/home/debian", true),
                    mkdir("/s/home/u"),
                    bind("/home/u", "/s/home/u", true),
                    bind("/home/u/src/linux", "/s/home/u/src/linux", false),
                ],
            ),
            (
                "a symlinked file mount point is replaced, never followed",
                vec![Mount::bind_file("/etc/resolv.conf", "/etc/resolv.conf")],
                vec![
                    tmpfs("/s/etc"),
                    touch("/s/etc/hosts"),
                    bind("/r/etc/hosts", "/s/etc/hosts", true),
                    touch("/s/etc/passwd"),
                    bind("/r/etc/passwd", "/s/etc/passwd", true),
                    touch("/s/etc/resolv.conf"),
                    bind("/etc/resolv.conf", "/s/etc/resolv.conf", true),
                ],
            ),
            (
                "a path through a symlink shadows the root itself",
                vec![Mount::bind("/bin/x", "/bin/x", false)],
                vec![
                    tmpfs("/s"),
                    mkdir("/s/etc"),
                    bind("/r/etc", "/s/etc", true),
                    mkdir("/s/home"),
                    bind("/r/home", "/s/home", true),
                    mkdir("/s/proc"),
                    bind("/r/proc", "/s/proc", true),
                    mkdir("/s/tmp"),
                    bind("/r/tmp", "/s/tmp", true),
                    mkdir("/s/usr"),
                    bind("/r/usr", "/s/usr", true),
                    mkdir("/s/bin"),
                    mkdir("/s/bin/x"),
                    bind("/bin/x", "/s/bin/x", false),
                ],
            ),
            (
                "a second target in a shadowed dir reuses the tmpfs",
                vec![
                    Mount::bind("/home/a", "/home/a", true),
                    Mount::bind("/home/b", "/home/b", false),
                ],
                vec![
                    tmpfs("/s/home"),
                    mkdir("/s/home/debian"),
                    bind("/r/home/debian", "/s/home/debian", true),
                    mkdir("/s/home/a"),
                    bind("/home/a", "/s/home/a", true),
                    mkdir("/s/home/b"),
                    bind("/home/b", "/s/home/b", false),
                ],
            ),
        ];
        let view = debian();
        for (name, mounts, want) in cases {
            let ops = plan(
                &Layout {
                    rootfs: "/r".into(),
                    staging: "/s".into(),
                    mounts,
                    writable: false,
                },
                &view,
            );
            assert_eq!(ops[0], Op::MakeRprivate, "{name}");
            assert_eq!(ops[1], bind("/r", "/s", true), "{name}");
            assert_eq!(
                ops.last(),
                Some(&Op::PivotRoot {
                    new_root: "/s".into()
                }),
                "{name}"
            );
            assert_eq!(ops[2..ops.len() - 1], want[..], "{name}");
        }
    }

    #[test]
    fn dev_is_a_tmpfs_with_host_devices_and_private_ptys() {
        let ops = plan(
            &Layout {
                rootfs: "/r".into(),
                staging: "/s".into(),
                mounts: vec![Mount::new("/dev", What::Dev)],
                writable: false,
            },
            &Fake::new(&[("/r/dev", Kind::Dir)]),
        );
        assert_eq!(ops[2], tmpfs("/s/dev"));
        assert!(ops.contains(&bind("/dev/null", "/s/dev/null", false)));
        assert!(ops.contains(&bind("/dev/tty", "/s/dev/tty", false)));
        assert!(ops.contains(&Op::Devpts {
            dst: "/s/dev/pts".into()
        }));
        assert!(ops.contains(&Op::Symlink {
            target: "pts/ptmx".into(),
            path: "/s/dev/ptmx".into()
        }));
    }

    /// newuidmap refuses a range the caller has no subuid entry for: the
    /// error carries its message (it used to hang: the child kept its own
    /// copy of the "go" pipe's write end and never saw end-of-file).
    #[test]
    fn a_refused_id_map_is_the_helpers_error_not_a_hang() {
        if crate::host::probe::find_program("newuidmap").is_none() {
            eprintln!("SKIP: newuidmap not installed");
            return;
        }
        let bogus = vec![IdRange {
            inside: 0,
            outside: 4_000_000_000,
            count: 1,
        }];
        let ids = Ids::Mapped {
            uids: bogus.clone(),
            gids: bogus,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(run_mapped(&["true".into()], &ids, None));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("run_mapped hung after newuidmap failed");
        match r {
            Err(NsError::MapHelper { helper, detail }) => {
                assert_eq!(helper, "newuidmap");
                assert!(detail.contains("newuidmap"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ops_name_themselves_for_errors() {
        assert_eq!(
            bind("/a", "/s/a", true).to_string(),
            "bind /a on /s/a read-only"
        );
        assert_eq!(tmpfs("/s/tmp").to_string(), "mount tmpfs on /s/tmp");
    }
}
