//! `mkt build`'s fast path for a kernel tree: when the only sources that
//! changed since mkt's last successful build of the tree are modules' own
//! `.c` files, make just those modules (`make M.ko`: their objects,
//! modpost, the final link) instead of walking the whole tree.
//!
//! Wrong is worse than slow, so the fast path is taken only when it can be
//! shown to be enough, and checked afterwards:
//! - the record: every file of the tree (inode, size, mtime, ctime) as the
//!   last successful build left it, taken after that build; files that are
//!   not kbuild outputs and changed while it ran are left out, so they
//!   count as changed next time (an edit during a build is never trusted);
//! - before: every difference from the record must be a modified `.c`
//!   file whose object belongs to a module in `modules.order` (compiled
//!   with `-DMODULE`) and that no other object includes; anything else
//!   (a header, a Makefile, Kconfig, .config, an added or removed file,
//!   an output someone else rebuilt) means a full build;
//! - after: the files `make M.ko` changed must be those modules' own
//!   outputs, and their exported symbols unchanged; `make M.ko` rewrites
//!   `modules.order` and `Module.symvers` for just those modules, so both
//!   are put back. Anything else, or a failed make, means a full build.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One file's identity: a change to its content or metadata changes one
/// of these (ctime cannot be set from user space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime: i128,
    pub(crate) ctime: i128,
}

impl Stat {
    /// A file the record does not vouch for: it compares as changed.
    pub(crate) const UNKNOWN: Stat = Stat {
        ino: 0,
        size: 0,
        mtime: 0,
        ctime: 0,
    };

    fn of(m: &fs::Metadata) -> Stat {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stat {
            ino: m.ino(),
            size: m.size(),
            mtime: ns(m.mtime(), m.mtime_nsec()),
            ctime: ns(m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Relative path → stat, for every non-directory under the tree.
pub(crate) type Files = HashMap<String, Stat>;

/// What the last successful build left.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Record {
    /// What the build depends on besides the files (rootfs, user, host).
    pub(crate) key: String,
    pub(crate) files: Files,
    /// `.c` files some object includes besides its own source.
    pub(crate) included_c: BTreeSet<String>,
}

const MAGIC: &str = "mkt fast-build record v1";

impl Record {
    pub(crate) fn to_text(&self) -> String {
        use std::fmt::Write;
        // One buffer, no string per line: ~90k files in a kernel tree.
        let mut s = String::with_capacity(self.files.len() * 96);
        let _ = writeln!(s, "{MAGIC}\nkey {}", self.key);
        for c in &self.included_c {
            let _ = writeln!(s, "include {c}");
        }
        // In the map's order: sorting 90k paths costs more than it helps.
        for (p, st) in &self.files {
            let _ = writeln!(s, "f {} {} {} {} {p}", st.ino, st.size, st.mtime, st.ctime);
        }
        s
    }

    /// `None` for anything but a whole record of this version.
    pub(crate) fn parse(text: &str) -> Option<Record> {
        let mut lines = text.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let key = lines.next()?.strip_prefix("key ")?.to_string();
        let mut r = Record {
            key,
            ..Default::default()
        };
        for l in lines {
            if let Some(c) = l.strip_prefix("include ") {
                r.included_c.insert(c.to_string());
                continue;
            }
            let mut w = l.strip_prefix("f ")?.splitn(5, ' ');
            let mut num = || w.next()?.parse::<i128>().ok();
            let (ino, size, mtime, ctime) = (num()?, num()?, num()?, num()?);
            let path = w.next()?.to_string();
            let st = Stat {
                ino: u64::try_from(ino).ok()?,
                size: u64::try_from(size).ok()?,
                mtime,
                ctime,
            };
            r.files.insert(path, st);
        }
        Some(r)
    }
}

/// Editors' swap, backup and lock files: never part of a build.
pub(crate) fn ignorable(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let swap = name.starts_with('.') && [".swp", ".swo", ".swx"].iter().any(|e| name.ends_with(e));
    swap || name.ends_with('~')
        || name.starts_with(".#")
        || (name.starts_with('#') && name.ends_with('#'))
        || name == "4913"
}

/// Directories at the top of the tree that no in-tree build reads.
const SKIPPED: [&str; 2] = [".git", ".mkt-ci"];

/// Every non-directory under `tree` (symlinks not followed), by as many
/// threads as CPUs (two here: the walk is most of a fast build's own time).
pub(crate) fn walk(tree: &Path) -> io::Result<Files> {
    walk_inner(tree, None).map(|(files, _)| files)
}

/// [`walk`], with every directory watched from the moment it is read (the
/// watches are set up by the walk's threads, for free beside its I/O);
/// no [`Watch`] when the kernel refuses one (too many watches).
pub(crate) fn walk_and_watch(tree: &Path) -> io::Result<(Files, Option<Watch>)> {
    use nix::sys::inotify::{InitFlags, Inotify};
    let fd = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok();
    let (files, dirs) = walk_inner(tree, fd.as_ref())?;
    Ok((files, fd.zip(dirs).map(|(fd, dirs)| Watch { fd, dirs })))
}

type Watched = HashMap<nix::sys::inotify::WatchDescriptor, String>;

fn walk_inner(
    tree: &Path,
    watch: Option<&nix::sys::inotify::Inotify>,
) -> io::Result<(Files, Option<Watched>)> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let queue = Mutex::new(vec![(tree.to_path_buf(), String::new())]);
    let busy = AtomicUsize::new(0);
    let unwatched = AtomicBool::new(watch.is_none());
    let threads = crate::host::user::usable_cpus().clamp(1, 4) as usize;
    let worker = || -> io::Result<(Files, Watched)> {
        let mut files = Files::new();
        let mut watched = Watched::new();
        loop {
            let next = {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                let next = q.pop();
                if next.is_some() {
                    busy.fetch_add(1, Ordering::SeqCst);
                }
                next
            };
            let Some((dir, rel)) = next else {
                if busy.load(Ordering::SeqCst) == 0 {
                    return Ok((files, watched));
                }
                std::thread::yield_now();
                continue;
            };
            if let (Some(fd), false) = (watch, unwatched.load(Ordering::Relaxed)) {
                match fd.add_watch(&dir, WATCHED) {
                    Ok(wd) => {
                        watched.insert(wd, rel.clone());
                    }
                    Err(_) => unwatched.store(true, Ordering::Relaxed),
                }
            }
            let found = walk_dir(&dir, &rel, &mut files);
            if let Ok(subdirs) = &found {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                q.extend(subdirs.iter().cloned());
            }
            busy.fetch_sub(1, Ordering::SeqCst);
            if let Err(e) = found {
                // The others stop when the queue runs dry; this error wins.
                queue.lock().unwrap_or_else(|e| e.into_inner()).clear();
                return Err(e);
            }
        }
    };
    let results: Vec<io::Result<(Files, Watched)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(worker)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("walk panicked")))
            })
            .collect()
    });
    let mut all = Files::new();
    let mut dirs = Watched::new();
    for r in results {
        let (f, d) = r?;
        all.extend(f);
        dirs.extend(d);
    }
    let watched = (!unwatched.load(Ordering::Relaxed)).then_some(dirs);
    Ok((all, watched))
}

/// What a watch reports: anything that changes a file or the directory's
/// entries.
const WATCHED: nix::sys::inotify::AddWatchFlags = {
    use nix::sys::inotify::AddWatchFlags as F;
    F::IN_MODIFY
        .union(F::IN_ATTRIB)
        .union(F::IN_CLOSE_WRITE)
        .union(F::IN_CREATE)
        .union(F::IN_DELETE)
        .union(F::IN_MOVED_FROM)
        .union(F::IN_MOVED_TO)
        .union(F::IN_DELETE_SELF)
        .union(F::IN_MOVE_SELF)
        .union(F::IN_DONT_FOLLOW)
        .union(F::IN_ONLYDIR)
};

/// The tree's directories watched (inotify) while the modules' make runs:
/// what it wrote, without stat-ing all ~90k files again afterwards.
pub(crate) struct Watch {
    fd: nix::sys::inotify::Inotify,
    dirs: Watched,
}

impl Watch {
    /// The paths written since the walk; `None` when that cannot be
    /// known from the events (a lost event, a watched directory moved or
    /// removed, a new directory still there): then the tree is walked
    /// again. A directory made and removed meanwhile (kbuild's `.tmp_PID`
    /// for compiler probes) leaves nothing to record.
    pub(crate) fn written(self) -> Option<BTreeSet<String>> {
        use nix::sys::inotify::AddWatchFlags as F;
        let mut out = BTreeSet::new();
        let mut made = BTreeSet::new();
        loop {
            let events = match self.fd.read_events() {
                Ok(e) => e,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(_) => return None,
            };
            for e in events {
                // A lost event (IN_Q_OVERFLOW, on no watch) and a watched
                // directory's own (moved, removed, its watch dropped: no
                // name) mean walking again.
                let dir = self.dirs.get(&e.wd)?;
                let name = e.name.and_then(|n| n.into_string().ok())?;
                let path = if dir.is_empty() {
                    name
                } else {
                    format!("{dir}/{name}")
                };
                if e.mask.contains(F::IN_ISDIR) {
                    match e.mask & (F::IN_CREATE | F::IN_DELETE) {
                        F::IN_CREATE => made.insert(path),
                        F::IN_DELETE if made.remove(&path) => true,
                        // A directory moved, or one of the tree's removed.
                        _ => return None,
                    };
                } else if !ignorable(&path) {
                    out.insert(path);
                }
            }
        }
        // Files in a directory made and removed meanwhile went with it.
        made.is_empty().then_some(out)
    }
}

/// One directory's entries: files into `files`, subdirectories returned.
fn walk_dir(dir: &Path, rel: &str, files: &mut Files) -> io::Result<Vec<(PathBuf, String)>> {
    let mut subdirs = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let Ok(name) = e.file_name().into_string() else {
            // A name that is not UTF-8 cannot be recorded: no record.
            return Err(io::Error::new(io::ErrorKind::InvalidData, "non-UTF-8 name"));
        };
        if name.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "newline in a name",
            ));
        }
        if rel.is_empty() && SKIPPED.contains(&name.as_str()) {
            continue;
        }
        let path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let m = e.metadata()?;
        if m.is_dir() {
            subdirs.push((e.path(), path));
        } else if !ignorable(&path) {
            files.insert(path, Stat::of(&m));
        }
    }
    Ok(subdirs)
}

/// A kbuild output: a target with its command file (`.NAME.cmd` beside
/// it), a command or dependency file, a symlink, or a generated file kbuild
/// writes without a command file (modpost's `.mod.c`, link-vmlinux's
/// System.map, filechk's headers).
pub(crate) fn is_output(path: &str, files: &Files, symlink: bool) -> bool {
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (format!("{d}/"), n),
        None => (String::new(), path),
    };
    symlink
        || name.ends_with(".cmd")
        || name.ends_with(".d")
        || name.ends_with(".mod.c")
        || files.contains_key(&format!("{dir}.{name}.cmd"))
        || ["include/generated/", "include/config/", "usr/include/"]
            .iter()
            .any(|p| path.starts_with(p))
        || (path.starts_with("arch/") && path.contains("/include/generated/"))
        || [
            ".version",
            "System.map",
            "modules.builtin",
            "modules.builtin.modinfo",
        ]
        .contains(&path)
}

/// The record of a build that started at `start` (ctime, ns, a margin
/// below the build's first write): files that are not outputs and changed
/// since are recorded as unknown, so they count as changed next time.
pub(crate) fn record_of(
    key: String,
    tree: &Path,
    mut files: Files,
    start: i128,
    included_c: BTreeSet<String>,
) -> Record {
    let changed: Vec<String> = files
        .iter()
        .filter(|(_, st)| st.ctime >= start)
        .map(|(p, _)| p.clone())
        .collect();
    for p in changed {
        let symlink = tree
            .join(&p)
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink());
        if !is_output(&p, &files, symlink) {
            files.insert(p, Stat::UNKNOWN);
        }
    }
    Record {
        key,
        files,
        included_c,
    }
}

/// `.c` files named in objects' dependency lists other than as the
/// object's own source (`#include "foo.c"`): reads every `.*.o.cmd`.
pub(crate) fn included_c(tree: &Path, files: &Files) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for p in files.keys() {
        let name = p.rsplit('/').next().unwrap_or(p);
        if !(name.starts_with('.') && name.ends_with(".o.cmd")) {
            continue;
        }
        let Ok(text) = fs::read_to_string(tree.join(p)) else {
            continue;
        };
        out.extend(cmd_included_c(&text));
    }
    out
}

/// One `.cmd` file's `.c` dependencies besides `source_…`.
pub(crate) fn cmd_included_c(text: &str) -> Vec<String> {
    let source = text.lines().find_map(|l| {
        l.strip_prefix("source_")?
            .split_once(":=")
            .map(|x| x.1.trim())
    });
    text.lines()
        .skip_while(|l| !l.starts_with("deps_"))
        .skip(1)
        .take_while(|l| l.starts_with(' ') && !l.trim().is_empty())
        .map(|l| l.trim().trim_end_matches('\\').trim())
        .filter(|w| w.ends_with(".c") && Some(*w) != source)
        .map(|w| w.trim_start_matches("./").to_string())
        .collect()
}

/// The tree's modules: `modules.order` entries (`d/n.ko`) with the
/// objects their `.mod` files list.
pub(crate) fn modules(tree: &Path) -> io::Result<Vec<(String, Vec<String>)>> {
    let order = fs::read_to_string(tree.join("modules.order"))?;
    let mut out = Vec::new();
    for ko in order.lines().filter(|l| !l.is_empty()) {
        let stem = ko.strip_suffix(".ko").unwrap_or(ko);
        let objs = fs::read_to_string(tree.join(format!("{stem}.mod")))?;
        out.push((
            ko.to_string(),
            objs.split_whitespace().map(str::to_string).collect(),
        ));
    }
    Ok(out)
}

/// Why the fast path does not apply, or the modules to make.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Nothing changed since the recorded build.
    UpToDate,
    /// These modules (`d/n.ko`), for these changed sources.
    Modules {
        kos: Vec<String>,
        sources: Vec<String>,
    },
    Full(String),
}

/// Compares the tree with the record (pure but for reading the changed
/// sources' `.cmd` files through `cmd`).
pub(crate) fn plan(
    record: &Record,
    now: &Files,
    key: &str,
    modules: &[(String, Vec<String>)],
    cmd: impl Fn(&str) -> Option<String>,
) -> Plan {
    if record.key != key {
        return Plan::Full("the rootfs, user or host differs from the last build's".into());
    }
    let mut sources = Vec::new();
    for (p, st) in now {
        match record.files.get(p) {
            None => return Plan::Full(format!("{p} is new")),
            Some(old) if old != st => sources.push(p.clone()),
            Some(_) => {}
        }
    }
    if let Some(p) = record.files.keys().find(|p| !now.contains_key(*p)) {
        return Plan::Full(format!("{p} was removed"));
    }
    if sources.is_empty() {
        return Plan::UpToDate;
    }
    sources.sort();
    let mut kos = BTreeSet::new();
    for src in &sources {
        let Some(stem) = src.strip_suffix(".c") else {
            return Plan::Full(format!("{src} changed (not a module's C source)"));
        };
        if record.included_c.contains(src) {
            return Plan::Full(format!("{src} changed and another object includes it"));
        }
        let obj = format!("{stem}.o");
        let Some((ko, _)) = modules.iter().find(|(_, objs)| objs.contains(&obj)) else {
            return Plan::Full(format!("{src} changed and {obj} is not part of a module"));
        };
        let (dir, name) = obj.rsplit_once('/').unwrap_or(("", &obj));
        let cmd_file = if dir.is_empty() {
            format!(".{name}.cmd")
        } else {
            format!("{dir}/.{name}.cmd")
        };
        let compiled_as_module = cmd(&cmd_file).is_some_and(|t| {
            t.lines()
                .next()
                .is_some_and(|l| l.starts_with("cmd_") && l.contains(" -DMODULE "))
        });
        if !compiled_as_module {
            return Plan::Full(format!(
                "{src} changed and {obj} was not compiled as a module"
            ));
        }
        kos.insert(ko.clone());
    }
    Plan::Modules {
        kos: kos.into_iter().collect(),
        sources,
    }
}

/// `make -o TARGET` for what the modules' make would only re-check:
/// objtool (tools/ did not change) and `prepare` (what it generates comes
/// from the config, sources and toolchain, all unchanged) — unless the
/// kernel release names the git state (`CONFIG_LOCALVERSION_AUTO` in a git
/// tree: editing a module makes it `-dirty`), which `prepare` must see.
/// Saves ~0.3 s of a ~1 s make here.
pub(crate) fn skipped_targets(tree: &Path) -> Vec<String> {
    let mut v = vec!["-o".to_string(), "tools/objtool".to_string()];
    let auto = fs::read_to_string(tree.join(".config"))
        .map(|c| c.lines().any(|l| l == "CONFIG_LOCALVERSION_AUTO=y"))
        .unwrap_or(true);
    if !(auto && tree.join(".git").exists()) {
        v.extend(["-o".to_string(), "prepare".to_string()]);
    }
    v
}

/// The files `make KOS` may write for these modules: their objects, the
/// module's link stages, each with its command file.
pub(crate) fn allowed_outputs(
    kos: &[String],
    modules: &[(String, Vec<String>)],
) -> HashSet<String> {
    let with_cmd = |p: &str| -> [String; 2] {
        let cmd = match p.rsplit_once('/') {
            Some((d, n)) => format!("{d}/.{n}.cmd"),
            None => format!(".{p}.cmd"),
        };
        [p.to_string(), cmd]
    };
    let mut out = HashSet::new();
    for ko in kos {
        let stem = ko.strip_suffix(".ko").unwrap_or(ko);
        for s in ["o", "mod", "mod.c", "mod.o", "ko"] {
            out.extend(with_cmd(&format!("{stem}.{s}")));
        }
        let objs = modules.iter().find(|(k, _)| k == ko).map(|(_, o)| o);
        for o in objs.into_iter().flatten() {
            out.extend(with_cmd(o));
        }
    }
    out
}

/// Files every make writes, whatever changed (prepare's syscall check).
const ALWAYS_WRITTEN: [&str; 1] = [".missing-syscalls.d"];

/// Files kbuild rewrites for the modules made; mkt puts them back.
pub(crate) const RESTORED: [&str; 3] = ["modules.order", "Module.symvers", ".Module.symvers.cmd"];

/// After `make KOS`: the first file that changed beyond what those modules
/// own (and the sources that started it), if any.
pub(crate) fn unexpected_change(
    record: &Record,
    now: &Files,
    sources: &[String],
    allowed: &HashSet<String>,
) -> Option<String> {
    let expected = |p: &str| {
        allowed.contains(p)
            || sources.iter().any(|s| s == p)
            || RESTORED.contains(&p)
            || ALWAYS_WRITTEN.contains(&p)
    };
    let changed = now
        .iter()
        .filter(|(p, st)| record.files.get(*p) != Some(st))
        .map(|(p, _)| p.clone());
    let removed = record
        .files
        .keys()
        .filter(|p| !now.contains_key(*p))
        .cloned();
    let mut bad: Vec<String> = changed.chain(removed).filter(|p| !expected(p)).collect();
    bad.sort();
    bad.into_iter().next()
}

/// `Module.symvers` lines of the modules `kos` (by their path without
/// `.ko`, modpost's third column).
pub(crate) fn exports_of(symvers: &str, kos: &[String]) -> BTreeSet<String> {
    let stems: HashSet<&str> = kos
        .iter()
        .map(|k| k.strip_suffix(".ko").unwrap_or(k))
        .collect();
    symvers
        .lines()
        .filter(|l| l.split('\t').nth(2).is_some_and(|m| stems.contains(m)))
        .map(str::to_string)
        .collect()
}

/// Writes the record whole or not at all.
pub(crate) fn write_record(path: &Path, record: &Record) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    crate::util::fs::write_atomic(path, record.to_text().as_bytes())
}

/// Where the record of `tree` lives (mkt's state, not the tree).
pub(crate) fn record_path(state_dir: &Path, tree: &Path) -> PathBuf {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let h = sha2::Sha256::digest(tree.as_os_str().as_bytes());
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    let name = tree
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    state_dir.join("builds").join(format!("{name}-{hex}"))
}

/// The files [`RESTORED`] as they were before `make KOS`.
pub(crate) struct Saved(Vec<(PathBuf, Option<Vec<u8>>)>);

impl Saved {
    pub(crate) fn take(tree: &Path) -> Saved {
        Saved(
            RESTORED
                .iter()
                .map(|n| {
                    let p = tree.join(n);
                    let old = fs::read(&p).ok();
                    (p, old)
                })
                .collect(),
        )
    }

    pub(crate) fn text(&self, name: &str) -> String {
        self.0
            .iter()
            .find(|(p, _)| p.ends_with(name))
            .and_then(|(_, o)| o.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    }

    /// Puts each file's content back.
    pub(crate) fn restore(&self) -> io::Result<()> {
        for (p, old) in &self.0 {
            let Some(bytes) = old else { continue };
            if fs::read(p).ok().as_ref() != Some(bytes) {
                fs::write(p, bytes)?;
            }
        }
        Ok(())
    }
}

/// The `modules.order` files from the modules' directories up to the top,
/// deepest first, then `Module.symvers`: the chain a full build rewrites
/// after a module's object changed (same content here).
pub(crate) fn order_chain(kos: &[String]) -> Vec<String> {
    let mut dirs = BTreeSet::new();
    for ko in kos {
        let mut d = ko.as_str();
        while let Some((parent, _)) = d.rsplit_once('/') {
            dirs.insert(parent.to_string());
            d = parent;
        }
    }
    let mut dirs: Vec<String> = dirs.into_iter().collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
    let mut out: Vec<String> = dirs.iter().map(|d| format!("{d}/modules.order")).collect();
    out.extend(["modules.order".to_string(), "Module.symvers".to_string()]);
    out
}

/// Dates the chain now, as a full build leaves it: make then finds every
/// file newer than what it was made from.
pub(crate) fn touch_chain(tree: &Path, kos: &[String]) -> io::Result<()> {
    let now = std::time::SystemTime::now();
    for p in order_chain(kos) {
        match fs::File::options().write(true).open(tree.join(&p)) {
            Ok(f) => f.set_times(fs::FileTimes::new().set_modified(now))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Updates one file's entry after mkt changed it.
pub(crate) fn restat(tree: &Path, path: &str, files: &mut Files) {
    match fs::symlink_metadata(tree.join(path)) {
        Ok(m) => {
            files.insert(path.to_string(), Stat::of(&m));
        }
        Err(_) => {
            files.remove(path);
        }
    }
}

/// Now on the tree's file system's clock (a file made and removed there:
/// a file server's clock may differ from ours), less a margin for the
/// coarse clock file times come from; our clock less 2 s if that fails.
pub(crate) fn start_time(tree: &Path) -> i128 {
    let probe = tempfile::Builder::new()
        .prefix(".mkt-clock-")
        .tempfile_in(tree)
        .and_then(|f| f.as_file().metadata());
    if let Ok(m) = probe {
        return Stat::of(&m).ctime - 100_000_000;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_nanos() as i128 - 2_000_000_000
}

/// The record of `tree` after a successful build that started at `start`.
pub(crate) fn take_record(tree: &Path, key: &str, start: i128) -> io::Result<Record> {
    let files = walk(tree)?;
    let included = included_c(tree, &files);
    Ok(record_of(key.to_string(), tree, files, start, included))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(n: u64) -> Stat {
        Stat {
            ino: n,
            size: n,
            mtime: i128::from(n),
            ctime: i128::from(n),
        }
    }

    fn files(list: &[(&str, u64)]) -> Files {
        list.iter().map(|(p, n)| (p.to_string(), st(*n))).collect()
    }

    fn dummy_modules() -> Vec<(String, Vec<String>)> {
        vec![
            (
                "drivers/net/dummy.ko".into(),
                vec!["drivers/net/dummy.o".into()],
            ),
            (
                "fs/x/x.ko".into(),
                vec!["fs/x/a.o".into(), "fs/x/b.o".into()],
            ),
        ]
    }

    const MODULE_CMD: &str = "cmd_drivers/net/dummy.o := gcc -Wp,-MMD -DMODULE -c -o x\n";
    const BUILTIN_CMD: &str = "cmd_drivers/net/dummy.o := gcc -Wp,-MMD -c -o x\n";

    fn tree_files() -> Files {
        files(&[
            ("drivers/net/dummy.c", 1),
            ("drivers/net/dummy.o", 2),
            ("drivers/net/.dummy.o.cmd", 3),
            ("fs/x/a.c", 4),
            ("fs/x/b.c", 5),
            ("fs/x/.a.o.cmd", 6),
            ("fs/x/.b.o.cmd", 7),
            ("include/linux/x.h", 8),
            ("kernel/fork.c", 9),
            ("Makefile", 10),
        ])
    }

    fn record() -> Record {
        Record {
            key: "k".into(),
            files: tree_files(),
            included_c: ["fs/x/b.c".to_string()].into(),
        }
    }

    fn plan_of(now: &Files, key: &str, cmd: &'static str) -> Plan {
        plan(&record(), now, key, &dummy_modules(), |p| {
            p.ends_with(".cmd").then(|| cmd.to_string())
        })
    }

    #[test]
    fn only_modules_own_sources_take_the_fast_path() {
        let base = tree_files();
        assert_eq!(plan_of(&base, "k", MODULE_CMD), Plan::UpToDate);
        let with = |p: &str, s: Option<Stat>| {
            let mut f = base.clone();
            match s {
                Some(s) => f.insert(p.to_string(), s),
                None => f.remove(p),
            };
            f
        };
        assert_eq!(
            plan_of(&with("drivers/net/dummy.c", Some(st(99))), "k", MODULE_CMD),
            Plan::Modules {
                kos: vec!["drivers/net/dummy.ko".into()],
                sources: vec!["drivers/net/dummy.c".into()],
            }
        );
        // A part of a composite module: the module's .ko.
        assert_eq!(
            plan_of(&with("fs/x/a.c", Some(st(99))), "k", MODULE_CMD),
            Plan::Modules {
                kos: vec!["fs/x/x.ko".into()],
                sources: vec!["fs/x/a.c".into()],
            }
        );
        // Every other case is a full build, with its reason.
        let full = |p: Plan, want: &str| match p {
            Plan::Full(why) => assert!(why.contains(want), "{why} / {want}"),
            other => panic!("{other:?}, wanted a full build: {want}"),
        };
        let changed = Some(st(99));
        full(plan_of(&base, "other", MODULE_CMD), "rootfs, user or host");
        full(
            plan_of(&with("include/linux/x.h", changed), "k", MODULE_CMD),
            "x.h changed",
        );
        full(
            plan_of(&with("Makefile", changed), "k", MODULE_CMD),
            "Makefile changed",
        );
        full(
            plan_of(&with("kernel/fork.c", changed), "k", MODULE_CMD),
            "not part of a module",
        );
        full(
            plan_of(&with("fs/x/b.c", changed), "k", MODULE_CMD),
            "another object includes it",
        );
        full(
            plan_of(&with("drivers/net/new.c", changed), "k", MODULE_CMD),
            "new.c is new",
        );
        full(
            plan_of(&with("include/linux/x.h", None), "k", MODULE_CMD),
            "x.h was removed",
        );
        full(
            plan_of(&with("drivers/net/dummy.c", changed), "k", BUILTIN_CMD),
            "not compiled as a module",
        );
        // An output someone else rebuilt (a plain make) is a change too.
        full(
            plan_of(&with("drivers/net/dummy.o", changed), "k", MODULE_CMD),
            "dummy.o changed",
        );
        // A file the record does not vouch for is changed.
        let mut r = record();
        r.files.insert("drivers/net/dummy.c".into(), Stat::UNKNOWN);
        let p = plan(&r, &base, "k", &dummy_modules(), |_| {
            Some(MODULE_CMD.into())
        });
        assert!(matches!(p, Plan::Modules { .. }), "{p:?}");
    }

    #[test]
    fn after_make_only_the_modules_outputs_may_change() {
        let kos = vec!["fs/x/x.ko".to_string()];
        let allowed = allowed_outputs(&kos, &dummy_modules());
        for p in [
            "fs/x/x.ko",
            "fs/x/.x.ko.cmd",
            "fs/x/x.mod.c",
            "fs/x/x.mod.o",
            "fs/x/.x.mod.o.cmd",
            "fs/x/x.o",
            "fs/x/a.o",
            "fs/x/.a.o.cmd",
            "fs/x/b.o",
        ] {
            assert!(allowed.contains(p), "{p}");
        }
        assert!(!allowed.contains("drivers/net/dummy.o"));
        let sources = vec!["fs/x/a.c".to_string()];
        let r = record();
        let mut now = r.files.clone();
        for p in [
            "fs/x/a.c",
            "fs/x/.a.o.cmd",
            "fs/x/x.ko",
            "modules.order",
            ".missing-syscalls.d",
        ] {
            now.insert(p.into(), st(100));
        }
        assert_eq!(unexpected_change(&r, &now, &sources, &allowed), None);
        let mut bad = now.clone();
        bad.insert("include/generated/utsrelease.h".into(), st(100));
        assert_eq!(
            unexpected_change(&r, &bad, &sources, &allowed).as_deref(),
            Some("include/generated/utsrelease.h")
        );
        let mut gone = now;
        gone.remove("kernel/fork.c");
        assert_eq!(
            unexpected_change(&r, &gone, &sources, &allowed).as_deref(),
            Some("kernel/fork.c")
        );
    }

    #[test]
    fn record_round_trip_and_what_it_vouches_for() {
        let r = record();
        assert_eq!(Record::parse(&r.to_text()), Some(r));
        assert_eq!(Record::parse("something else\n"), None);
        assert_eq!(Record::parse(&format!("{MAGIC}\nkey k\nf 1 2 x\n")), None);

        let f = files(&[
            ("drivers/net/dummy.c", 1),
            ("drivers/net/dummy.o", 50),
            ("drivers/net/.dummy.o.cmd", 50),
            ("include/generated/autoconf.h", 50),
            ("vmlinux", 50),
            (".vmlinux.cmd", 50),
            ("drivers/net/edited-during.c", 50),
            ("old.c", 3),
        ]);
        let t = tempfile::tempdir().unwrap();
        let r = record_of("k".into(), t.path(), f, 10, BTreeSet::new());
        // Outputs written during the build are kept; a source written then
        // is not vouched for; older files are kept as they are.
        assert_eq!(r.files["drivers/net/dummy.o"], st(50));
        assert_eq!(r.files["vmlinux"], st(50));
        assert_eq!(r.files["include/generated/autoconf.h"], st(50));
        assert_eq!(r.files["drivers/net/edited-during.c"], Stat::UNKNOWN);
        assert_eq!(r.files["old.c"], st(3));
    }

    #[test]
    fn prepare_is_skipped_unless_the_release_names_the_git_state() {
        let t = tempfile::tempdir().unwrap();
        let both = ["-o", "tools/objtool", "-o", "prepare"];
        fs::write(t.path().join(".config"), "CONFIG_LOCALVERSION_AUTO=y\n").unwrap();
        assert_eq!(skipped_targets(t.path()), both);
        fs::create_dir(t.path().join(".git")).unwrap();
        assert_eq!(skipped_targets(t.path()), ["-o", "tools/objtool"]);
        fs::write(
            t.path().join(".config"),
            "# CONFIG_LOCALVERSION_AUTO is not set\n",
        )
        .unwrap();
        assert_eq!(skipped_targets(t.path()), both);
        fs::remove_file(t.path().join(".config")).unwrap();
        assert_eq!(skipped_targets(t.path()), ["-o", "tools/objtool"]);
    }

    #[test]
    fn the_watch_names_what_was_written_or_says_walk_again() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::write(r.join("a/b/x.c"), "1").unwrap();
        fs::write(r.join("top"), "1").unwrap();
        let (files, watch) = walk_and_watch(r).unwrap();
        assert_eq!(files.len(), 2);
        fs::write(r.join("a/b/x.o"), "o").unwrap();
        fs::write(r.join("top"), "2").unwrap();
        fs::write(r.join("a/.x.c.swp"), "editor").unwrap();
        // A directory made and removed meanwhile (kbuild's .tmp_PID).
        fs::create_dir(r.join(".tmp_1")).unwrap();
        fs::write(r.join(".tmp_1/probe"), "").unwrap();
        fs::remove_dir_all(r.join(".tmp_1")).unwrap();
        let written = watch.unwrap().written().unwrap();
        assert_eq!(written.into_iter().collect::<Vec<_>>(), ["a/b/x.o", "top"]);
        // A new directory that stays, or one of the tree's removed: walk.
        let (_, watch) = walk_and_watch(r).unwrap();
        fs::create_dir(r.join("a/new")).unwrap();
        assert_eq!(watch.unwrap().written(), None);
        let (_, watch) = walk_and_watch(r).unwrap();
        fs::remove_dir_all(r.join("a/b")).unwrap();
        assert_eq!(watch.unwrap().written(), None);
    }

    #[test]
    fn stat_times_are_nanoseconds_since_the_epoch() {
        let t = tempfile::tempdir().unwrap();
        let f = fs::File::create(t.path().join("f")).unwrap();
        let when = std::time::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123_456_789);
        f.set_modified(when).unwrap();
        let st = Stat::of(&f.metadata().unwrap());
        assert_eq!(st.mtime, 1_700_000_000_123_456_789);
        assert!(st.ctime > 1_700_000_000_123_456_789 && st.ino > 0);
    }

    #[test]
    fn a_lost_event_or_a_moved_tree_means_walking_again() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("tree");
        fs::create_dir_all(r.join("a")).unwrap();
        fs::write(r.join("a/x.c"), "1").unwrap();
        // More events than the kernel queues (16384 by default): overflow.
        let (_, watch) = walk_and_watch(&r).unwrap();
        for i in 0..7000 {
            fs::write(r.join(format!("a/f{i}")), "x").unwrap();
        }
        let w = watch.unwrap().written();
        assert!(
            w.is_none(),
            "no overflow: {} paths",
            w.map_or(0, |w| w.len())
        );
        // The tree itself moved, or removed.
        let (_, watch) = walk_and_watch(&r).unwrap();
        fs::rename(&r, t.path().join("moved")).unwrap();
        assert_eq!(watch.unwrap().written(), None);
        let (_, watch) = walk_and_watch(&t.path().join("moved")).unwrap();
        fs::remove_dir_all(t.path().join("moved")).unwrap();
        assert_eq!(watch.unwrap().written(), None);
    }

    #[test]
    fn modules_and_included_sources_are_read_from_the_tree() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("d/x")).unwrap();
        fs::write(r.join("modules.order"), "d/a.ko\n\nd/x/b.ko\n").unwrap();
        fs::write(r.join("d/a.mod"), "d/a.o\n").unwrap();
        fs::write(r.join("d/x/b.mod"), "d/x/p.o d/x/q.o\n").unwrap();
        assert_eq!(
            modules(r).unwrap(),
            [
                ("d/a.ko".to_string(), vec!["d/a.o".to_string()]),
                (
                    "d/x/b.ko".to_string(),
                    vec!["d/x/p.o".to_string(), "d/x/q.o".to_string()]
                ),
            ]
        );
        let deps = |c: &str| format!("source_o := d/a.c\n\ndeps_o := \\\n  {c} \\\n\n");
        fs::write(r.join("d/.a.o.cmd"), deps("lib/inc.c")).unwrap();
        // Only objects' command files (`.NAME.o.cmd`) are read.
        fs::write(r.join("d/a.o.cmd"), deps("lib/not-a-cmd.c")).unwrap();
        fs::write(r.join("d/.a.mod.cmd"), deps("lib/not-an-object.c")).unwrap();
        let files = walk(r).unwrap();
        assert_eq!(files.len(), 6);
        assert_eq!(
            included_c(r, &files).into_iter().collect::<Vec<_>>(),
            ["lib/inc.c"]
        );
    }

    #[test]
    fn what_mkt_puts_back_dates_and_records_after_the_modules_make() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("d/x")).unwrap();
        for (p, text) in [
            ("modules.order", "d/x/m.ko\n"),
            ("Module.symvers", "0x0\ts\td/x/m\tEXPORT_SYMBOL\t\n"),
            ("d/x/modules.order", "d/x/m.ko\n"),
        ] {
            fs::write(r.join(p), text).unwrap();
        }
        // What kbuild's single-module make does to them: rewrite, remove.
        let saved = Saved::take(r);
        assert_eq!(
            saved.text("Module.symvers"),
            "0x0\ts\td/x/m\tEXPORT_SYMBOL\t\n"
        );
        assert_eq!(saved.text(".Module.symvers.cmd"), "");
        fs::remove_file(r.join("modules.order")).unwrap();
        fs::write(r.join("Module.symvers"), "partial\n").unwrap();
        saved.restore().unwrap();
        assert_eq!(
            fs::read_to_string(r.join("modules.order")).unwrap(),
            "d/x/m.ko\n"
        );
        assert!(
            fs::read_to_string(r.join("Module.symvers"))
                .unwrap()
                .starts_with("0x0")
        );
        assert!(!r.join(".Module.symvers.cmd").exists());

        // The chain dated deepest first, each no older than what it is made
        // of; missing links (d/modules.order) are skipped.
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        for p in ["modules.order", "Module.symvers", "d/x/modules.order"] {
            fs::File::options()
                .write(true)
                .open(r.join(p))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        touch_chain(r, &["d/x/m.ko".into()]).unwrap();
        let mtime = |p: &str| fs::metadata(r.join(p)).unwrap().modified().unwrap();
        assert!(mtime("d/x/modules.order") > old);
        assert!(mtime("modules.order") >= mtime("d/x/modules.order"));
        assert!(mtime("Module.symvers") >= mtime("modules.order"));
        // A link that cannot be dated is an error, not skipped.
        fs::create_dir(r.join("d/modules.order")).unwrap();
        assert!(touch_chain(r, &["d/x/m.ko".into()]).is_err());
        fs::remove_dir(r.join("d/modules.order")).unwrap();

        let mut files = walk(r).unwrap();
        fs::write(r.join("d/new"), "n").unwrap();
        fs::remove_file(r.join("d/x/modules.order")).unwrap();
        restat(r, "d/new", &mut files);
        restat(r, "d/x/modules.order", &mut files);
        assert_eq!(files, walk(r).unwrap());

        // The record: written where the tree's path says, read back whole.
        let state = r.join("state");
        let file = record_path(&state, Path::new("/src/linux"));
        assert!(file.starts_with(state.join("builds")), "{}", file.display());
        assert!(
            file.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("linux-")
        );
        assert_ne!(file, record_path(&state, Path::new("/other/linux")));
        // Files just written (after the start) are not vouched for.
        let rec = take_record(r, "k", start_time(r)).unwrap();
        assert_eq!(rec.files["d/new"], Stat::UNKNOWN);
        let rec = take_record(r, "k", i128::MAX).unwrap();
        assert_eq!(rec.files, walk(r).unwrap());
        write_record(&file, &rec).unwrap();
        assert_eq!(
            Record::parse(&fs::read_to_string(&file).unwrap()),
            Some(rec)
        );
    }

    #[test]
    fn the_start_is_the_file_systems_clock_less_a_margin() {
        let t = tempfile::tempdir().unwrap();
        let start = start_time(t.path());
        fs::write(t.path().join("after"), "").unwrap();
        let after = Stat::of(&fs::metadata(t.path().join("after")).unwrap()).ctime;
        // A file written after the start is newer by about the margin.
        let ahead = after - start;
        assert!((50_000_000..5_000_000_000).contains(&ahead), "{ahead}");
        // No probe possible (no such dir): our clock, less 2 s.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        let fallback = now - start_time(&t.path().join("gone"));
        assert!(
            (1_900_000_000..3_000_000_000).contains(&fallback),
            "{fallback}"
        );
    }

    #[test]
    fn small_pieces() {
        for p in ["a/.x.c.swp", "a/x.c~", "a/.#x.c", "a/#x.c#", "a/4913"] {
            assert!(ignorable(p), "{p}");
        }
        assert!(!ignorable("a/x.c") && !ignorable("a/.x.o.cmd"));
        assert!(!ignorable("a/x#") && !ignorable("a/#x") && !ignorable("a/x.swp"));
        let cmd = "cmd_a/x.o := gcc -c\n\nsource_a/x.o := a/x.c\n\ndeps_a/x.o := \\\n  include/linux/kconfig.h \\\n    $(wildcard include/config/FOO) \\\n  a/x.c \\\n  lib/inflate.c \\\n\na/x.o: $(deps_a/x.o)\n\n$(deps_a/x.o):\n";
        assert_eq!(cmd_included_c(cmd), ["lib/inflate.c"]);
        // The list ends at the first line that is not an indented word.
        let cmd = "deps_x := \\\n  a/b.c \\\nlate.c\n";
        assert_eq!(cmd_included_c(cmd), ["a/b.c"]);
        let cmd = "deps_x := \\\n  a/b.c \\\n  \n  late.c \\\n";
        assert_eq!(cmd_included_c(cmd), ["a/b.c"]);
        assert_eq!(
            order_chain(&["drivers/net/dummy.ko".into(), "drivers/x.ko".into()]),
            [
                "drivers/net/modules.order",
                "drivers/modules.order",
                "modules.order",
                "Module.symvers"
            ]
        );
        let symvers =
            "0x0\tfoo\tdrivers/net/dummy\tEXPORT_SYMBOL\t\n0x0\tbar\tvmlinux\tEXPORT_SYMBOL\t\n";
        assert_eq!(
            exports_of(symvers, &["drivers/net/dummy.ko".into()]),
            ["0x0\tfoo\tdrivers/net/dummy\tEXPORT_SYMBOL\t".to_string()].into()
        );
        let f = files(&[("a/x.o", 1), ("a/.x.o.cmd", 1)]);
        assert!(is_output("a/x.o", &f, false));
        assert!(is_output("a/.x.o.cmd", &f, false));
        assert!(!is_output("a/x.c", &f, false));
        assert!(is_output("a/x.mod.c", &f, false));
        assert!(is_output("a/link", &f, true));
        assert!(is_output("arch/x86/include/generated/asm/x.h", &f, false));
        assert!(!is_output("arch/x86/kernel/x.c", &f, false));
        assert!(!is_output("drivers/include/generated/x.h", &f, false));
    }
}
