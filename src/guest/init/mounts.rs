//! Mounting: the shares, the overlay root, /dev extras, the switch of root.

use crate::plan::FsKind;
use crate::sys::{c, chroot, log, mount};
use std::fs;
use std::io;

pub const MS_RDONLY: u64 = 1;
pub const MS_MOVE: u64 = 8192;

pub fn do_mount(src: &str, target: &str, fstype: &str, flags: u64, data: &str) -> io::Result<()> {
    let _ = fs::create_dir_all(target);
    let (s, t, f, d) = (c(src), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        mount(
            s.as_ptr(),
            t.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                f.as_ptr()
            },
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                d.as_ptr()
            },
        )
    };
    if r == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(
            e.kind(),
            format!("mount {src} on {target} ({fstype} {data}): {e}"),
        ))
    }
}

/// `coherent`: the host may change the files while the guest runs (home,
/// the kernel tree being rebuilt), so 9p must not cache them loosely. The
/// stored rootfs never changes: it gets the fast, loose cache.
pub fn mount_share(
    kind: FsKind,
    tag: &str,
    target: &str,
    ro: bool,
    coherent: bool,
) -> io::Result<()> {
    let flags = if ro { MS_RDONLY } else { 0 };
    if kind == FsKind::Virtiofs {
        // virtiofsd's --cache decides coherency on the host side.
        do_mount(tag, target, "virtiofs", flags, "")
    } else {
        let cache = if coherent { "mmap" } else { "loose" };
        do_mount(
            tag,
            target,
            "9p",
            flags,
            &format!("trans=virtio,version=9p2000.L,cache={cache},msize=512000"),
        )
    }
}

pub const MS_NOSUID: u64 = 2;
pub const MS_NODEV: u64 = 4;
pub const MS_NOEXEC: u64 = 8;

/// The gid of the tty group in an /etc/group text (5, Debian's, without).
pub fn tty_gid(group: &str) -> u32 {
    group
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"tty")).then(|| f.get(2)?.parse::<u32>().ok())?
        })
        .unwrap_or(5)
}

/// /dev/pts (ptys: sudo's use_pty, ssh sessions, script) and /dev/shm
/// (POSIX shared memory: Python multiprocessing), which devtmpfs lacks;
/// systemd leaves mounts it finds in place.
pub fn mount_dev_extras() {
    // The tree's tty group owns the ptys, as udev/systemd would set it.
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    let tty = tty_gid(&group);
    let pts = format!("gid={tty},mode=620,ptmxmode=666");
    for (src, dst, fstype, flags, data) in [
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MS_NOSUID | MS_NOEXEC,
            pts.as_str(),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            "mode=1777",
        ),
    ] {
        if let Err(e) = do_mount(src, dst, fstype, flags, data) {
            log(&e.to_string());
        }
    }
}

/// Moves the new root over / (the initramfs cannot be pivot_root'ed).
pub fn switch_root(root: &str) -> io::Result<()> {
    for m in ["/proc", "/sys", "/dev"] {
        do_mount(m, &format!("{root}{m}"), "", MS_MOVE, "")?;
    }
    std::env::set_current_dir(root)?;
    do_mount(".", "/", "", MS_MOVE, "")?;
    let dot = c(".");
    // SAFETY: dot is a valid path; PID 1 runs as root.
    if unsafe { chroot(dot.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptys_belong_to_the_trees_tty_group() {
        assert_eq!(tty_gid("root:x:0:\ntty:x:7:\nttyx:x:9:\n"), 7);
        assert_eq!(tty_gid("root:x:0:\nttyS:x:9:\n"), 5);
        assert_eq!(tty_gid("tty:x:bad:\n"), 5);
        assert_eq!(tty_gid(""), 5);
    }
}
