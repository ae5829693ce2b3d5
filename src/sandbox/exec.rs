//! Carrying a plan out: mkt forks C1, which unshares the namespaces and
//! writes its own id maps; C1 forks C2, PID 1 of the new pid namespace,
//! which mounts (a new /proc needs a process inside the pid namespace),
//! pivots, forks the command (C3) and reaps until it exits. C3 reports the
//! moment it execs (or why it could not get there) over a close-on-exec pipe.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::NsError;
use super::idmap::{Ids, MOVE_MOUNT_F_EMPTY_PATH, idmapped_tree, write_maps};
use super::plan::{Layout, Op, TreeView, plan};
use super::sys::{IgnoreSignals, cstr, die_with, reset_signals, write_file};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

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
pub(crate) const STEP_UNSHARE: u32 = 1;
pub(crate) const STEP_SETGROUPS: u32 = 2;
pub(crate) const STEP_UID_MAP: u32 = 3;
pub(crate) const STEP_GID_MAP: u32 = 4;
pub(crate) const STEP_FORK: u32 = 5;
pub(crate) const STEP_HOSTNAME: u32 = 6;
pub(crate) const STEP_CHDIR: u32 = 7;
pub(crate) const STEP_STDIO: u32 = 8;
pub(crate) const STEP_EXEC: u32 = 9;
pub(crate) const STEP_USERNS: u32 = 10;
pub(crate) const STEP_USERNS_IDS: u32 = 11;
pub(crate) const OP_BASE: u32 = 1000;
pub(crate) const MSG_OK: u32 = 0;
pub(crate) const MSG_ERR: u32 = 1;

/// Everything the children need, converted before the fork so that they
/// only make system calls.
pub(crate) struct Prepared {
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

pub(crate) enum PreparedOp {
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

pub(crate) fn prepare(spec: &Spec, ops: Vec<Op>, tree_fd: i32) -> Result<Prepared, NsError> {
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

pub(crate) fn now_ns() -> u64 {
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

pub(crate) fn step_error(step: u32, source: Errno, prep: &Prepared, spec: &Spec) -> NsError {
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

pub(crate) fn report(fd: i32, kind: u32, step: u32, errno: i32, at: u64) {
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
pub(crate) fn fail(fd: i32, step: u32, e: Errno) -> i32 {
    report(fd, MSG_ERR, step, e as i32, 0);
    127
}

/// C1: new namespaces, own id maps, then the pid namespace's init.
pub(crate) fn child1(p: &Prepared, fd: i32, out: Option<i32>, (ready, go): (i32, i32)) -> i32 {
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

pub(crate) fn wait_exit(pid: Pid) -> i32 {
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
pub(crate) fn init(p: &Prepared, fd: i32, out: Option<i32>) -> i32 {
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
pub(crate) fn command(
    p: &Prepared,
    fd: i32,
    out: Option<i32>,
    sync: Option<&(OwnedFd, OwnedFd)>,
) -> i32 {
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

pub(crate) fn execute(op: &PreparedOp) -> Result<(), Errno> {
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
                crate::util::mount::remount_read_only(dst.as_c_str())?;
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
