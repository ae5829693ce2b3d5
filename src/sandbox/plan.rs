//! The mount sequence as data: [`plan`] turns a [`Layout`] into a list of
//! [`Op`]s, given a [`TreeView`] of the rootfs: pure, so it is unit-tested
//! without privileges. The stored tree is only ever bind-mounted read-only;
//! when a mount point is missing from it (e.g. `/home/you`), the directory
//! above is "shadowed": a tmpfs goes over it and its entries are bound back
//! one by one, so the new mount point can be created in memory.

use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};

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
pub(crate) enum Origin {
    /// A read-only view of this rootfs directory: mount points must exist.
    Rootfs(PathBuf),
    /// A tmpfs of ours: mount points can be created.
    Tmpfs,
    /// A host bind or a special file system: assumed to have what we need.
    Opaque,
}

pub(crate) struct Planner<'a> {
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
                "a directory mount point where the tree has a file replaces the file",
                vec![Mount::bind("/h/x", "/etc/hosts", false)],
                vec![
                    tmpfs("/s/etc"),
                    touch("/s/etc/passwd"),
                    bind("/r/etc/passwd", "/s/etc/passwd", true),
                    Op::Symlink {
                        target: "/run/x".into(),
                        path: "/s/etc/resolv.conf".into(),
                    },
                    mkdir("/s/etc/hosts"),
                    bind("/h/x", "/s/etc/hosts", false),
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

    /// The real view: each kind as it is on disk (a symlink's target
    /// unread, a fifo as Other), and a directory's entries sorted by name.
    #[test]
    fn host_fs_sees_what_is_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir(p.join("d")).unwrap();
        std::fs::write(p.join("f"), "x").unwrap();
        std::os::unix::fs::symlink("d/../f", p.join("l")).unwrap();
        nix::unistd::mkfifo(&p.join("p"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::write(p.join("d/e"), "").unwrap();
        let want = [
            ("d", Kind::Dir),
            ("f", Kind::File),
            ("l", Kind::Symlink("d/../f".into())),
            ("p", Kind::Other),
        ];
        for (name, kind) in &want {
            assert_eq!(HostFs.kind(&p.join(name)), *kind, "{name}");
        }
        assert_eq!(HostFs.kind(&p.join("none")), Kind::Missing);
        let children: Vec<(OsString, Kind)> = want
            .iter()
            .map(|(n, k)| (OsString::from(n), k.clone()))
            .collect();
        assert_eq!(HostFs.children(p), children);
        assert_eq!(
            HostFs.children(&p.join("d")),
            vec![(OsString::from("e"), Kind::File)]
        );
        assert_eq!(HostFs.children(&p.join("none")), vec![]);
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
