//! Limits on the processes that serve host directories to a guest
//! (virtiofsd, and QEMU itself for 9p). The guest drives their file
//! operations, so what they may do on the host is what the guest may do:
//!
//! - A guest could plant set-id files (set-uid root when mkt runs as root),
//!   device nodes or file capabilities in a shared directory for any local
//!   user to use. A seccomp filter refuses those operations (virtiofsd has
//!   no option for it: it chmods with its own credentials; and QEMU's 9p
//!   passes xattrs through).
//! - The rootfs store usually lies inside the shared home: the servers get
//!   a private mount namespace in which the store is read-only (and every
//!   directory between the share and the store a mount point, so the guest
//!   cannot rename the store away and put another in its place).
//!
//! Everything here is prepared before fork; [`Confinement::enter`] runs
//! between fork and exec and makes only system calls.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What one server process gets; cheap to clone into a `pre_exec` closure.
#[derive(Debug, Clone, Default)]
pub(crate) struct Confinement {
    filter: Option<Vec<libc::sock_filter>>,
    /// Not root: the filter needs no_new_privs.
    no_new_privs: bool,
    /// Directories made mount points (outermost first), then shown read-only.
    pins: Vec<CString>,
    readonly: Vec<CString>,
    /// For a caller that is not root: the `uid_map`/`gid_map` lines of a
    /// user namespace that maps only the caller's own ids.
    maps: Option<(Vec<u8>, Vec<u8>)>,
}

impl Confinement {
    /// For a server of `shares`: the filter, and the store (when given)
    /// read-only when it lies inside one of the shares.
    pub fn new(shares: &[&Path], store: Option<&Path>) -> Self {
        let root = nix::unistd::geteuid().is_root();
        let mut c = Confinement {
            filter: Some(no_setid_filter()),
            no_new_privs: !root,
            ..Confinement::default()
        };
        let Some(store) = store else { return c };
        // Compared as the kernel resolves them ($HOME may be a symlink).
        let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let store = real(store);
        let shares: Vec<PathBuf> = shares.iter().map(|s| real(s)).collect();
        let store = store.as_path();
        let Some(share) = shares
            .iter()
            .filter(|s| store.starts_with(s) && store != s.as_path())
            .min_by_key(|s| s.components().count())
        else {
            return c;
        };
        let cstr = |p: &Path| CString::new(p.as_os_str().as_bytes()).ok();
        // The directories strictly between the share and the store, outermost first.
        let mut between: Vec<PathBuf> = store
            .ancestors()
            .skip(1)
            .take_while(|a| a.starts_with(share) && *a != share.as_path())
            .map(Path::to_path_buf)
            .collect();
        between.reverse();
        c.pins = between.iter().filter_map(|p| cstr(p)).collect();
        c.readonly = cstr(store).into_iter().collect();
        if !root {
            let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
            c.maps = Some((
                format!("{uid} {uid} 1\n").into_bytes(),
                format!("{gid} {gid} 1\n").into_bytes(),
            ));
        }
        c
    }

    /// For a process that must be able to run a set-uid helper (QEMU with
    /// qemu-bridge-helper): when not root, both no_new_privs and a user
    /// namespace would void the helper's set-uid bit, so neither is used.
    pub fn keeping_setid_exec(self) -> Self {
        if self.no_new_privs {
            Confinement::default()
        } else {
            self
        }
    }

    /// Whether there is anything to do.
    pub fn is_empty(&self) -> bool {
        self.filter.is_none() && self.readonly.is_empty()
    }

    /// Applies the confinement to the calling process: meant for the child
    /// between fork and exec (system calls only, no allocation).
    pub fn enter(&self) -> io::Result<()> {
        if !self.readonly.is_empty() {
            self.private_mounts()?;
        }
        if let Some(filter) = &self.filter {
            if self.no_new_privs
                // SAFETY: a plain prctl call with integer arguments.
                && unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0
            {
                return Err(io::Error::last_os_error());
            }
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: prog points to a valid filter that outlives the call
            // (root has CAP_SYS_ADMIN: no no_new_privs needed, so a set-id
            // helper QEMU runs keeps working).
            if unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn private_mounts(&self) -> io::Result<()> {
        use nix::mount::{MsFlags, mount};
        use nix::sched::{CloneFlags, unshare};
        let err = |e: nix::Error| io::Error::from(e);
        match &self.maps {
            Some((uid_map, gid_map)) => {
                unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS).map_err(err)?;
                write_file(c"/proc/self/setgroups", b"deny")?;
                write_file(c"/proc/self/uid_map", uid_map)?;
                write_file(c"/proc/self/gid_map", gid_map)?;
            }
            None => unshare(CloneFlags::CLONE_NEWNS).map_err(err)?,
        }
        // Nothing done here may reach the host's mount namespace.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(err)?;
        let bind = |p: &CString| {
            mount(
                Some(p.as_c_str()),
                p.as_c_str(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
        };
        for p in &self.pins {
            bind(p).map_err(err)?;
        }
        for p in &self.readonly {
            bind(p).map_err(err)?;
            crate::util::mount::remount_read_only(p.as_c_str()).map_err(err)?;
        }
        Ok(())
    }
}

fn write_file(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: a valid path; the fd is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: data is valid for data.len() bytes; fd is ours.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let e = io::Error::last_os_error();
    // SAFETY: fd is ours and not used after.
    unsafe { libc::close(fd) };
    if n != data.len() as isize {
        return Err(e);
    }
    Ok(())
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SETID: u32 = libc::S_ISUID | libc::S_ISGID;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

const LD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const AND: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// The low 32 bits of system call argument `i` (x86_64 is little-endian).
fn arg(i: u32) -> u32 {
    16 + 8 * i
}

fn errno(e: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA)
}

/// A seccomp filter refusing (EPERM) set-uid/set-gid modes in chmod, in
/// creating opens and in mknod, device nodes in mknod, and (EOPNOTSUPP)
/// setting extended attributes, which carry file capabilities. openat2
/// gets ENOSYS: its mode sits behind a pointer a filter cannot read, and
/// its callers fall back to openat. Everything else is allowed.
pub(crate) fn no_setid_filter() -> Vec<libc::sock_filter> {
    let allow = stmt(RET, libc::SECCOMP_RET_ALLOW);
    let eperm = stmt(RET, errno(libc::EPERM));
    let mut f = vec![
        stmt(LD, 4),
        jump(JEQ, AUDIT_ARCH_X86_64, 1, 0),
        allow,
        stmt(LD, 0),
    ];
    // Each block starts with `jeq nr`, skipping the rest of the block when
    // the number differs; A still holds the number then.
    let mut block = |nr: i64, body: Vec<libc::sock_filter>| {
        f.push(jump(JEQ, nr as u32, 0, body.len() as u8));
        f.extend(body);
    };
    // chmod-like: deny when the mode (argument m) has a set-id bit.
    for (nr, m) in [
        (libc::SYS_chmod, 1),
        (libc::SYS_fchmod, 1),
        (libc::SYS_fchmodat, 2),
        (libc::SYS_fchmodat2, 2),
        (libc::SYS_creat, 1),
    ] {
        block(
            nr,
            vec![stmt(LD, arg(m)), jump(JSET, SETID, 0, 1), eperm, allow],
        );
    }
    // open-like: the mode only counts with O_CREAT or O_TMPFILE.
    let create = (libc::O_CREAT | libc::O_TMPFILE) as u32 & !(libc::O_DIRECTORY as u32);
    for (nr, fl, m) in [(libc::SYS_open, 1, 2), (libc::SYS_openat, 2, 3)] {
        block(
            nr,
            vec![
                stmt(LD, arg(fl)),
                jump(JSET, create, 0, 3),
                stmt(LD, arg(m)),
                jump(JSET, SETID, 0, 1),
                eperm,
                allow,
            ],
        );
    }
    // mknod-like: no set-id bits, no character or block devices.
    for (nr, m) in [(libc::SYS_mknod, 1), (libc::SYS_mknodat, 2)] {
        block(
            nr,
            vec![
                stmt(LD, arg(m)),
                jump(JSET, SETID, 4, 0),
                stmt(AND, libc::S_IFMT),
                jump(JEQ, libc::S_IFCHR, 2, 0),
                jump(JEQ, libc::S_IFBLK, 1, 0),
                allow,
                eperm,
            ],
        );
    }
    for nr in [
        libc::SYS_setxattr,
        libc::SYS_lsetxattr,
        libc::SYS_fsetxattr,
        463, // setxattrat (Linux 6.13)
    ] {
        block(nr, vec![stmt(RET, errno(libc::EOPNOTSUPP))]);
    }
    block(libc::SYS_openat2, vec![stmt(RET, errno(libc::ENOSYS))]);
    f.push(allow);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Runs `check` in a forked child under the filter; its exit code.
    fn under_filter(check: impl FnOnce() -> i32) -> i32 {
        let filter = no_setid_filter();
        // SAFETY: the child only makes system calls and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let prog = libc::sock_fprog {
                    len: filter.len() as u16,
                    filter: filter.as_ptr() as *mut _,
                };
                // SAFETY: plain prctl calls with valid arguments.
                let ok = unsafe {
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                        && libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) == 0
                };
                let code = if ok { check() } else { 99 };
                // SAFETY: leaving the forked child without running destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                match nix::sys::wait::waitpid(child, None).unwrap() {
                    nix::sys::wait::WaitStatus::Exited(_, c) => c,
                    s => panic!("{s:?}"),
                }
            }
        }
    }

    #[test]
    fn filter_refuses_setid_modes_devices_and_xattrs_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().to_path_buf();
        std::fs::write(p.join("f"), "x").unwrap();
        let code = under_filter(move || {
            let f = p.join("f");
            let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error());
            let mode = |m| std::fs::set_permissions(&f, std::fs::Permissions::from_mode(m));
            if errno(mode(0o4755)) != Some(libc::EPERM) {
                return 1;
            }
            if errno(mode(0o2755)) != Some(libc::EPERM) {
                return 2;
            }
            if mode(0o755).is_err() || mode(0o1777).is_err() {
                return 3;
            }
            use std::os::unix::fs::OpenOptionsExt;
            let create = |name: &str, m: u32| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .mode(m)
                    .open(p.join(name))
                    .map(drop)
            };
            if errno(create("s", 0o4755)) != Some(libc::EPERM) || p.join("s").exists() {
                return 4;
            }
            if create("plain", 0o755).is_err() {
                return 5;
            }
            let mknod = |name: &str, kind, m| {
                nix::sys::stat::mknod(
                    &p.join(name),
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(m),
                    nix::sys::stat::makedev(1, 3),
                )
            };
            use nix::sys::stat::SFlag;
            if mknod("c", SFlag::S_IFCHR, 0o666) != Err(nix::Error::EPERM) {
                return 6;
            }
            if mknod("b", SFlag::S_IFBLK, 0o666) != Err(nix::Error::EPERM) {
                return 7;
            }
            if mknod("fifo", SFlag::S_IFIFO, 0o644).is_err() {
                return 8;
            }
            let name = c"user.x";
            let path = CString::new(p.join("f").as_os_str().as_bytes()).unwrap();
            // SAFETY: valid strings and a 1-byte value.
            let r =
                unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), c"v".as_ptr().cast(), 1, 0) };
            if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EOPNOTSUPP) {
                return 9;
            }
            // Plain opens and reads still work.
            if std::fs::read(p.join("f")).is_err() {
                return 10;
            }
            0
        });
        assert_eq!(code, 0, "step {code} of the check failed");
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(d.path().join("f")).unwrap().mode();
        assert_eq!(m & 0o7777, 0o1777);
    }

    #[test]
    fn store_inside_a_share_is_pinned_and_read_only() {
        let c = Confinement::new(
            &[Path::new("/home/u"), Path::new("/srv/k")],
            Some(Path::new("/home/u/.local/share/mkt/rootfs")),
        );
        let names: Vec<_> = c.pins.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "/home/u/.local",
                "/home/u/.local/share",
                "/home/u/.local/share/mkt"
            ]
        );
        assert_eq!(
            c.readonly,
            [CString::new("/home/u/.local/share/mkt/rootfs").unwrap()]
        );
        // Not inside any share: nothing to hide.
        let c = Confinement::new(
            &[Path::new("/srv/k")],
            Some(Path::new("/home/u/.local/share/mkt/rootfs")),
        );
        assert!(c.readonly.is_empty() && c.pins.is_empty() && c.maps.is_none());
    }
}
