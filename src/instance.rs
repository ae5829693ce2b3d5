//! Per-run state on the host: a private directory under the runtime dir
//! holding the run's sockets, generated guest files, initramfs and console
//! log. It is locked (a POSIX record lock, held by the mkt process alone)
//! for as long as mkt runs, removed when the run ends, and a directory
//! whose lock nobody holds is left over from a killed mkt: any later run
//! removes it. Its name is the VM's, unique among the running VMs.

use crate::guest::plan::SshdReport;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What `mkt ssh` (and later `mkt ps`) need to know of a running VM,
/// stored as instance.json in its run directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub name: String,
    pub pid: u32,
    pub ssh_port: Option<u16>,
    pub user: String,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// Seconds since the epoch.
    pub started: u64,
    /// QEMU's QMP socket, for `mkt stop`.
    #[serde(default)]
    pub qmp: Option<PathBuf>,
    /// The guest says when its sshd listens (see [`ssh_state`]): `mkt ssh`
    /// waits for that instead of connecting early.
    #[serde(default)]
    pub ssh_reports_ready: bool,
    /// The run directory the record was read from (not stored).
    #[serde(skip)]
    pub dir: PathBuf,
}

/// The file in a run directory holding what the guest said of its sshd.
pub(crate) const SSH_STATE: &str = "ssh-state";

/// What the guest has said of its sshd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SshState {
    /// Nothing yet: still booting.
    Starting,
    Ready,
    /// It did not start; the guest's words.
    Failed(String),
}

/// What the guest of `r` has said of its sshd (written by its mkt run).
pub(crate) fn ssh_state(r: &Record) -> SshState {
    match fs::read_to_string(r.dir.join(SSH_STATE)) {
        Ok(s) => match SshdReport::decode(s.trim()) {
            Some(SshdReport::Ready) => SshState::Ready,
            Some(SshdReport::Failed(why)) => SshState::Failed(why),
            None => SshState::Failed(s.trim().to_string()),
        },
        Err(_) => SshState::Starting,
    }
}

/// Records the guest's line about its sshd, whole or not at all (a reader
/// never sees half of it).
pub(crate) fn set_ssh_state(run_dir: &Path, line: &str) -> io::Result<()> {
    crate::util::fs::write_atomic(
        &run_dir.join(SSH_STATE),
        format!("{}\n", line.trim()).as_bytes(),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("cannot write instance record {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create run directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock run directory {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the run directories in {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "refusing to use {path}: {reason} (another user may have made it first; have it removed, or set XDG_RUNTIME_DIR)"
    )]
    Unsafe { path: PathBuf, reason: String },
}

/// A run's directory; removed on drop unless kept.
#[derive(Debug)]
pub(crate) struct RunDir {
    path: PathBuf,
    name: String,
    keep: bool,
    /// Holds the run's lock (see [`whole_file`]); never closed before the end.
    _lock: File,
}

/// Where the runs live inside the runtime dir.
pub(crate) fn runs_dir(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("runs")
}

/// Run directories this process holds the lock of. A POSIX lock is dropped
/// when its owner closes *any* descriptor of the file, so this process
/// must never open its own lock file again.
static HELD: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn held(dir: &Path) -> bool {
    HELD.lock()
        .map(|h| h.iter().any(|d| d == dir))
        .unwrap_or(false)
}

/// The run lock: a POSIX record lock (fcntl F_SETLK) on the whole file. It
/// belongs to the mkt process, not to the open file: a child forked but
/// not yet exec'd (virtiofsd, QEMU) never holds it, unlike a flock or OFD
/// lock, which such a child shares until exec, or for good if it misses
/// its PDEATHSIG. So it is free the moment mkt dies, and F_GETLK names its
/// holder's pid.
fn whole_file(kind: libc::c_short) -> libc::flock {
    // SAFETY: flock is a plain C struct; all zeroes is a valid value.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l
}

/// Takes the run lock on `f` (opened for writing); false when another
/// process holds it.
fn try_lock(f: &File) -> io::Result<bool> {
    use nix::fcntl::{FcntlArg, fcntl};
    match fcntl(
        f,
        FcntlArg::F_SETLK(&whole_file(libc::F_WRLCK as libc::c_short)),
    ) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The pid of the process holding the run lock on `f`, if any.
fn lock_holder(f: &File) -> io::Result<Option<u32>> {
    use nix::fcntl::{FcntlArg, fcntl};
    let mut l = whole_file(libc::F_WRLCK as libc::c_short);
    fcntl(f, FcntlArg::F_GETLK(&mut l))?;
    Ok((l.l_type != libc::F_UNLCK as libc::c_short).then_some(l.l_pid as u32))
}

/// Why `meta` (of `path`, from lstat) is not ours to trust, if it is not:
/// the runtime dir may be /tmp/mkt-$UID, where another user can plant
/// directories and records. `private`: no access at all for others.
fn untrusted(meta: &fs::Metadata, dir: bool, private: bool) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Some("it is a symbolic link".into());
    }
    if dir && !ft.is_dir() {
        return Some("it is not a directory".into());
    }
    if !dir && !ft.is_file() {
        return Some("it is not a regular file".into());
    }
    if meta.uid() != me {
        return Some(format!("it is owned by uid {}, not uid {me}", meta.uid()));
    }
    let mask = if private { 0o077 } else { 0o022 };
    if meta.mode() & mask != 0 {
        return Some(format!(
            "its mode {:o} lets other users {}",
            meta.mode() & 0o7777,
            if private { "in" } else { "change it" }
        ));
    }
    None
}

fn check_dir(path: &Path, private: bool) -> Result<bool, InstanceError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(InstanceError::Read {
            path: path.into(),
            source,
        }),
        Ok(m) => match untrusted(&m, true, private) {
            Some(reason) => Err(InstanceError::Unsafe {
                path: path.into(),
                reason,
            }),
            None => Ok(true),
        },
    }
}

/// The runs directory, after checking it and the runtime dir are ours and
/// closed to others; None when there is none yet.
fn checked_runs(runtime_dir: &Path) -> Result<Option<PathBuf>, InstanceError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !check_dir(runtime_dir, true)? {
        return Ok(None);
    }
    let runs = runs_dir(runtime_dir);
    // Older mkt made the runs dir 0755: tighten ours (the runtime dir
    // above it is private, so nobody else can have swapped it).
    if let Ok(m) = fs::symlink_metadata(&runs)
        && m.is_dir()
        && m.uid() == nix::unistd::geteuid().as_raw()
        && m.mode() & 0o077 != 0
    {
        let _ = fs::set_permissions(&runs, fs::Permissions::from_mode(0o700));
    }
    Ok(check_dir(&runs, true)?.then_some(runs))
}

/// The run directories, each checked; others are skipped with a warning.
fn run_dirs(runtime_dir: &Path) -> Result<Vec<PathBuf>, InstanceError> {
    let Some(runs) = checked_runs(runtime_dir)? else {
        return Ok(Vec::new());
    };
    let entries = fs::read_dir(&runs).map_err(|source| InstanceError::Read {
        path: runs.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let dir = e.path();
        match fs::symlink_metadata(&dir) {
            Ok(m) => match untrusted(&m, true, true) {
                None => out.push(dir),
                Some(why) => tracing::warn!("ignoring {}: {why}", dir.display()),
            },
            Err(e) => tracing::warn!("ignoring {}: {e}", dir.display()),
        }
    }
    out.sort();
    Ok(out)
}

/// Opens a file of a run directory that must be ours: no symlink followed,
/// a regular file owned by us and writable by nobody else.
fn open_owned(path: &Path, write: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    match untrusted(&f.metadata()?, false, false) {
        Some(why) => Err(io::Error::new(io::ErrorKind::PermissionDenied, why)),
        None => Ok(f),
    }
}

/// The pid of the mkt that runs in `dir`, if one does.
pub fn holder(dir: &Path) -> Option<u32> {
    if held(dir) {
        return Some(std::process::id());
    }
    let f = open_owned(&dir.join("lock"), false).ok()?;
    lock_holder(&f).ok().flatten()
}

/// Creates the lock file of `dir` already locked: an unnamed file
/// (O_TMPFILE) is locked, then linked in as `lock`, so that no sweep ever
/// sees the lock file of a starting run unlocked.
fn create_lock(dir: &Path) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("lock");
    let tmp = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    let (f, named) = match tmp {
        Ok(f) => (f, false),
        // No O_TMPFILE on this file system: create, then lock.
        Err(_) => (
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?,
            true,
        ),
    };
    if !try_lock(&f)? {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "locked by another process",
        ));
    }
    if !named {
        use std::os::unix::ffi::OsStrExt;
        let from = std::ffi::CString::new(format!("/proc/self/fd/{}", f.as_raw_fd()))
            .map_err(io::Error::other)?;
        let to = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: two NUL-terminated paths that live across the call.
        let rc = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(f)
}

impl RunDir {
    /// Creates `<runtime>/runs/<name>` (mode 0700) and locks it. The name is
    /// unique among the run directories: `base` when free (`base-1` first
    /// when `numbered`), else the next free `base-N`.
    pub fn create(runtime_dir: &Path, base: &str, numbered: bool) -> Result<RunDir, InstanceError> {
        use std::os::unix::fs::DirBuilderExt;
        let runs = runs_dir(runtime_dir);
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| InstanceError::Create { path, source }
        };
        check_dir(runtime_dir, true)?;
        match fs::DirBuilder::new().mode(0o700).create(&runs) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(err(&runs)(e)),
            _ => {}
        }
        checked_runs(runtime_dir)?;
        // `base`, `base-2`, ... for a setup; `base-1`, `base-2`, ... when
        // numbered. mkdir is atomic: of two runs starting at once, one gets
        // a name and the other takes the next.
        let mut n = if numbered { 1 } else { 0 };
        let (name, path) = loop {
            let name = match n {
                0 => base.to_string(),
                n => format!("{base}-{n}"),
            };
            let path = runs.join(&name);
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => break (name, path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 100_000 => {}
                Err(e) => return Err(err(&path)(e)),
            }
            n = if n == 0 { 2 } else { n + 1 };
        };
        let lock = create_lock(&path).map_err(|source| {
            let _ = fs::remove_dir_all(&path);
            InstanceError::Lock {
                path: path.clone(),
                source,
            }
        })?;
        if let Ok(mut h) = HELD.lock() {
            h.push(path.clone());
        }
        Ok(RunDir {
            path,
            name,
            keep: false,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The VM's name: unique among the running VMs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes the instance record atomically (temp file + rename), so a
    /// reader never sees half of it.
    pub fn write_record(&self, r: &Record) -> Result<(), InstanceError> {
        let path = self.path.join("instance.json");
        let err = |source| InstanceError::Record {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(r).map_err(|e| err(io::Error::other(e)))?;
        crate::util::fs::write_atomic(&path, &text).map_err(err)
    }

    /// Keep the directory after the run (for --keep).
    pub fn keep(&mut self) {
        self.keep = true;
        let _ = File::create(self.path.join("keep"));
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
        if let Ok(mut h) = HELD.lock() {
            h.retain(|d| d != &self.path);
        }
    }
}

/// Removes run directories whose lock no live mkt holds; returns them.
/// Only directories and files that are ours are touched (the sweep runs
/// as root). `recover` first undoes what the dead run changed outside its
/// directory (vm's: VFIO bindings, taps); while it fails, the directory
/// stays for a run that can.
pub(crate) fn clean_stale(
    runtime_dir: &Path,
    recover: impl Fn(&Path) -> Result<(), String>,
) -> Result<Vec<PathBuf>, InstanceError> {
    let mut removed = Vec::new();
    for dir in run_dirs(runtime_dir)? {
        // Kept dirs have no lock holder either, so they are marked and
        // skipped; ours is live.
        if held(&dir) || dir.join("keep").exists() {
            continue;
        }
        let Ok(f) = open_owned(&dir.join("lock"), true) else {
            continue;
        };
        // Locked by a running mkt: leave it.
        if let Ok(true) = try_lock(&f) {
            // A dead run's VFIO bindings and tap go first; if that fails
            // (say, not root), the record stays for a run that can.
            if let Err(e) = recover(&dir) {
                tracing::warn!("run directory {} left over: {e}", dir.display());
                continue;
            }
            if fs::remove_dir_all(&dir).is_ok() {
                removed.push(dir);
            }
        }
        // Closing `f` drops the lock.
    }
    Ok(removed)
}

/// The records of running VMs, read only (`vm::running` sweeps stale
/// run directories first): only records in our own directories, whose
/// recorded pid is the process that holds the run's lock.
pub fn records(runtime_dir: &Path) -> Result<Vec<Record>, InstanceError> {
    let mut out = Vec::new();
    for dir in run_dirs(runtime_dir)? {
        let Some(pid) = holder(&dir) else {
            continue;
        };
        let Ok(text) = open_owned(&dir.join("instance.json"), false).and_then(|mut f| {
            let mut s = Vec::new();
            io::Read::read_to_end(&mut f, &mut s).map(|_| s)
        }) else {
            continue;
        };
        let Ok(mut r) = serde_json::from_slice::<Record>(&text) else {
            continue;
        };
        if r.pid != pid {
            tracing::warn!(
                "ignoring {}: it names pid {} but pid {pid} runs it",
                dir.display(),
                r.pid
            );
            continue;
        }
        r.dir = dir;
        out.push(r);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Whether a run called `name` is starting: its directory is locked by a
/// live mkt run that has not written its record yet.
pub fn starting(runtime_dir: &Path, name: &str) -> bool {
    let dir = runs_dir(runtime_dir).join(name);
    !dir.join("instance.json").exists() && holder(&dir).is_some()
}

/// Whether the VM of `r` still runs: its mkt still holds the lock.
pub fn running(r: &Record) -> bool {
    holder(&r.dir) == Some(r.pid)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn no_recover(_: &Path) -> Result<(), String> {
        Ok(())
    }

    /// What `vm::running` does, without vm's recovery.
    fn list(runtime_dir: &Path) -> Result<Vec<Record>, InstanceError> {
        clean_stale(runtime_dir, no_recover)?;
        records(runtime_dir)
    }
    use std::os::unix::fs::PermissionsExt;

    /// A runtime dir as `Paths::ensure_runtime_dir` makes it.
    pub(crate) fn runtime() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    fn private_dir(path: &Path) {
        fs::create_dir_all(path).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).unwrap();
    }

    /// A run directory as a killed mkt leaves it: a lock nobody holds.
    pub(crate) fn dead_run(rt: &Path, name: &str) -> PathBuf {
        let dir = runs_dir(rt).join(name);
        private_dir(&runs_dir(rt));
        private_dir(&dir);
        File::create(dir.join("lock")).unwrap();
        dir
    }

    fn record(name: &str, pid: u32) -> Record {
        Record {
            name: name.into(),
            pid,
            ssh_port: Some(2222),
            user: "dev".into(),
            kernel: "/k".into(),
            rootfs: "/r".into(),
            started: 1,
            qmp: None,
            ssh_reports_ready: false,
            dir: PathBuf::new(),
        }
    }

    #[test]
    fn the_guests_word_on_sshd_is_read_back() {
        let d = tempfile::tempdir().unwrap();
        let r = Record {
            dir: d.path().into(),
            ..record("t", 1)
        };
        assert_eq!(ssh_state(&r), SshState::Starting);
        set_ssh_state(
            d.path(),
            "sshd failed: nothing listens on port 22 after 5s\n",
        )
        .unwrap();
        assert_eq!(
            ssh_state(&r),
            SshState::Failed("nothing listens on port 22 after 5s".into())
        );
        set_ssh_state(d.path(), "sshd ready").unwrap();
        assert_eq!(ssh_state(&r), SshState::Ready);
        // Written aside and renamed: no temp file stays.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn run_dir_is_private_locked_and_removed() {
        let rt = runtime();
        let d = RunDir::create(rt.path(), "t", false).unwrap();
        let path = d.path().to_path_buf();
        assert_eq!(path, runs_dir(rt.path()).join("t"));
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(holder(&path), Some(std::process::id()));
        // Locked without a record yet: starting (`mkt ssh NAME` waits).
        assert!(starting(rt.path(), "t"));
        assert!(!starting(rt.path(), "other"));
        d.write_record(&record("t", std::process::id())).unwrap();
        assert!(!starting(rt.path(), "t"));
        let dead = dead_run(rt.path(), "gone");
        assert!(!starting(rt.path(), "gone") && dead.exists());
        fs::remove_dir_all(&dead).unwrap();
        // A live run is not stale.
        assert!(clean_stale(rt.path(), no_recover).unwrap().is_empty());
        assert!(path.exists());
        drop(d);
        assert!(!path.exists());
    }

    #[test]
    fn names_are_unique_among_running_vms() {
        let rt = runtime();
        let a = RunDir::create(rt.path(), "run", true).unwrap();
        let b = RunDir::create(rt.path(), "run", true).unwrap();
        let c = RunDir::create(rt.path(), "cx5", false).unwrap();
        let d = RunDir::create(rt.path(), "cx5", false).unwrap();
        assert_eq!(
            [a.name(), b.name(), c.name(), d.name()],
            ["run-1", "run-2", "cx5", "cx5-2"]
        );
        drop(a);
        let e = RunDir::create(rt.path(), "run", true).unwrap();
        assert_eq!(e.name(), "run-1");
    }

    #[test]
    fn stale_dirs_of_dead_runs_are_removed_kept_ones_stay() {
        let rt = runtime();
        let dead = dead_run(rt.path(), "dead-1");
        let kept = dead_run(rt.path(), "kept-2");
        File::create(kept.join("keep")).unwrap();
        let removed = clean_stale(rt.path(), no_recover).unwrap();
        assert_eq!(removed, vec![dead]);
        assert!(kept.exists());
    }

    /// The race of issue 12 item 5: a child mkt forked but that has not
    /// exec'd yet (or missed its PDEATHSIG) outlives a kill -9 of mkt. With
    /// a flock the child kept the dead run's lock and the sweep skipped
    /// the directory; the run lock belongs to mkt alone.
    #[test]
    fn a_forked_child_does_not_keep_a_dead_runs_lock() {
        use nix::unistd::{ForkResult, fork};
        let rt = runtime();
        let (rd, wr) = nix::unistd::pipe().unwrap();
        private_dir(&runs_dir(rt.path()));
        // SAFETY: the child and grandchild only create the run dir, fork,
        // write to a pipe, pause and _exit.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                // What RunDir::create does, without its mutex: another test
                // thread may have held it at the fork.
                let dir = runs_dir(rt.path()).join("run-1");
                let made =
                    std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
                        .create(&dir)
                        .and_then(|_| create_lock(&dir));
                // SAFETY: as above.
                match unsafe { fork() } {
                    Ok(ForkResult::Child) => loop {
                        nix::unistd::pause();
                    },
                    Ok(ForkResult::Parent { child }) => {
                        let _ = nix::unistd::write(&wr, &child.as_raw().to_ne_bytes());
                    }
                    Err(_) => {}
                }
                std::mem::forget(made);
                // SAFETY: dies like a killed mkt: no destructors.
                unsafe { libc::_exit(0) }
            }
            ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap();
                let mut b = [0u8; 4];
                assert_eq!(nix::unistd::read(&rd, &mut b), Ok(4));
                let orphan = nix::unistd::Pid::from_raw(i32::from_ne_bytes(b));
                let dir = runs_dir(rt.path()).join("run-1");
                let (holder, swept) = (holder(&dir), clean_stale(rt.path(), no_recover).unwrap());
                let _ = nix::sys::signal::kill(orphan, nix::sys::signal::Signal::SIGKILL);
                assert_eq!(holder, None);
                assert_eq!(swept, vec![dir]);
            }
        }
    }

    #[test]
    fn records_of_live_runs_are_listed() {
        let rt = runtime();
        let d = RunDir::create(rt.path(), "cx5", false).unwrap();
        let r = record("cx5", std::process::id());
        d.write_record(&r).unwrap();
        let listed = list(rt.path()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].dir, d.path());
        assert_eq!(
            listed[0],
            Record {
                dir: d.path().into(),
                ..r
            }
        );
        assert!(running(&listed[0]));
        // A record naming another pid than the lock holder's is not ours
        // to signal.
        d.write_record(&record("cx5", 1)).unwrap();
        assert!(list(rt.path()).unwrap().is_empty());
        drop(d);
        assert!(list(rt.path()).unwrap().is_empty());
    }

    /// /tmp/mkt-$UID may have been made by another user: neither it nor
    /// anything in it is trusted unless it is ours and closed to others.
    #[test]
    fn planted_runtime_dirs_and_records_are_refused() {
        let rt = runtime();
        let d = RunDir::create(rt.path(), "run", true).unwrap();
        d.write_record(&record("run-1", std::process::id()))
            .unwrap();
        assert_eq!(list(rt.path()).unwrap().len(), 1);

        // Open to others: refused, naming the directory.
        fs::set_permissions(rt.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        let err = list(rt.path()).unwrap_err().to_string();
        assert!(err.contains(&rt.path().display().to_string()), "{err}");
        assert!(clean_stale(rt.path(), no_recover).is_err());
        fs::set_permissions(rt.path(), fs::Permissions::from_mode(0o700)).unwrap();

        // A record that is a symlink (to a file someone else controls) or
        // a run dir that is a symlink is ignored.
        let rec = d.path().join("instance.json");
        let elsewhere = rt.path().join("elsewhere.json");
        fs::rename(&rec, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &rec).unwrap();
        assert!(list(rt.path()).unwrap().is_empty());
        fs::remove_file(&rec).unwrap();
        fs::rename(&elsewhere, &rec).unwrap();
        let other = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(other.path(), runs_dir(rt.path()).join("x-1")).unwrap();
        assert_eq!(list(rt.path()).unwrap().len(), 1);

        // Owned by another user (needs root to set up).
        if nix::unistd::geteuid().is_root() {
            let alien = runtime();
            private_dir(&runs_dir(alien.path()));
            nix::unistd::chown(alien.path(), Some(1234.into()), None).unwrap();
            let err = list(alien.path()).unwrap_err().to_string();
            assert!(err.contains("owned by uid 1234"), "{err}");
            // A dead run dir of another owner is not swept (as root the
            // sweep would restore VFIO bindings and delete taps).
            nix::unistd::chown(alien.path(), Some(0.into()), None).unwrap();
            let planted = dead_run(alien.path(), "run-7");
            nix::unistd::chown(&planted, Some(1234.into()), None).unwrap();
            assert!(clean_stale(alien.path(), no_recover).unwrap().is_empty());
            assert!(planted.exists());
        }
        drop(d);
    }

    #[test]
    fn kept_run_dir_survives_drop() {
        let rt = runtime();
        let mut d = RunDir::create(rt.path(), "k", false).unwrap();
        d.keep();
        let path = d.path().to_path_buf();
        drop(d);
        assert!(path.exists());
    }
}
