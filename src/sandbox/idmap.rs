//! Id maps: the caller's own ids, or the caller's subordinate ranges for a
//! tree whose files keep their owners; written for a child, or applied to a
//! tree with an id-mapped mount.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use super::NsError;
use super::sys::{cstr, write_file};
use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid};

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
        let ids = owners_in(
            &user,
            uid.as_raw(),
            gid,
            &read("/etc/subuid"),
            &read("/etc/subgid"),
        )?;
        for h in ["newuidmap", "newgidmap"] {
            if crate::host::probe::find_program(h).is_none() {
                return Err(IdsError::NoHelper(h));
            }
        }
        Ok(ids)
    }

    /// [`Ids::Shifted`] for root: root's first subordinate range when it
    /// has one, else systemd's "foreign" range (0x7FFE0000, 65536 ids),
    /// which no host user has.
    pub fn shifted_for_root() -> Ids {
        shifted_in(&std::fs::read_to_string("/etc/subuid").unwrap_or_default())
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

/// [`Ids::for_owners`] for a user who is not root, given the texts of
/// /etc/subuid and /etc/subgid (the helpers not yet checked).
fn owners_in(user: &str, uid: u32, gid: u32, subuid: &str, subgid: &str) -> Result<Ids, IdsError> {
    let range = |text: &str, file: &'static str, kind: &'static str| {
        crate::host::probe::subid_ranges(text, user, uid)
            .into_iter()
            .find(|(_, c)| *c >= 1)
            .map(|(s, c)| (s as u32, c.min(u32::MAX as u64 - 1) as u32))
            .ok_or_else(|| IdsError::NoRange {
                user: user.to_string(),
                kind,
                file,
            })
    };
    let (us, uc) = range(subuid, "/etc/subuid", "uid")?;
    let (gs, gc) = range(subgid, "/etc/subgid", "gid")?;
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
        uids: map(uid, us, uc),
        gids: map(gid, gs, gc),
    })
}

/// [`Ids::shifted_for_root`], given the text of /etc/subuid.
fn shifted_in(subuid: &str) -> Ids {
    let range = crate::host::probe::subid_ranges(subuid, "root", 0)
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

pub(crate) fn outside(map: &[IdRange], inside: u32) -> Option<u32> {
    map.iter()
        .find(|r| inside >= r.inside && inside - r.inside < r.count)
        .map(|r| r.outside + (inside - r.inside))
}

/// Runs newuidmap/newgidmap for `pid` (which has just unshared its user
/// namespace); the setuid helpers check the ranges against /etc/sub[ug]id.
pub(crate) fn write_maps(pid: Pid, uids: &[IdRange], gids: &[IdRange]) -> Result<(), NsError> {
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

// From <linux/mount.h> (libc exports them only in newer versions).
pub(crate) const OPEN_TREE_CLONE: libc::c_uint = 1;
pub(crate) const AT_RECURSIVE: libc::c_uint = 0x8000;
pub(crate) const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
pub(crate) const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
pub(crate) struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached copy of the mount of `tree`, idmapped so that on-disk id n
/// is host id `base + n` (n inside a namespace mapping `0 base count`).
/// Needs host root: the file system's superblock belongs to the initial
/// user namespace.
pub(crate) fn idmapped_tree(tree: &Path, base: u32, count: u32) -> Result<OwnedFd, NsError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn r(inside: u32, outside: u32, count: u32) -> IdRange {
        IdRange {
            inside,
            outside,
            count,
        }
    }

    /// 0 is the caller, 1.. the first range with ids in it (by name or
    /// uid); a count too big for a map is cut to fit after the 0 line.
    #[test]
    fn owners_get_their_first_nonempty_subordinate_ranges() {
        let subuid = "alice:50000:0\nbob:70000:65536\n1000:100000:65536\nalice:300000:65536\n";
        let subgid = "alice:200000:1\n";
        assert_eq!(
            owners_in("alice", 1000, 1001, subuid, subgid).unwrap(),
            Ids::Mapped {
                uids: vec![r(0, 1000, 1), r(1, 100000, 65536)],
                gids: vec![r(0, 1001, 1), r(1, 200000, 1)],
            }
        );
        let huge = "alice:100000:4294967296\n";
        assert_eq!(
            owners_in("alice", 1000, 1000, huge, huge).unwrap(),
            Ids::Mapped {
                uids: vec![r(0, 1000, 1), r(1, 100000, u32::MAX - 1)],
                gids: vec![r(0, 1000, 1), r(1, 100000, u32::MAX - 1)],
            }
        );
    }

    #[test]
    fn owners_without_a_range_are_told_which_file_lacks_it() {
        let e = owners_in(
            "alice",
            1000,
            1000,
            "alice:100000:65536\n",
            "alice:200000:0\n",
        )
        .unwrap_err();
        assert!(
            matches!(&e, IdsError::NoRange { user, kind: "gid", file: "/etc/subgid" } if user == "alice"),
            "{e:?}"
        );
        let e = owners_in("alice", 1000, 1000, "bob:100000:65536\n", "").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("alice has no subordinate uid range in /etc/subuid"),
            "{e}"
        );
    }

    /// Root's first range of at least 65536 ids that starts above 0 and
    /// ends within the 32-bit ids, else systemd's foreign range.
    #[test]
    fn root_is_shifted_into_its_first_usable_range() {
        let shifted = |base| Ids::Shifted { base, count: 65536 };
        let foreign = shifted(0x7FFE_0000);
        for (subuid, want) in [
            ("", foreign.clone()),
            ("root:100000:65536\n", shifted(100000)),
            ("root:100000:1000000\n", shifted(100000)),
            ("0:100000:65536\n", shifted(100000)),
            ("alice:100000:65536\n", foreign.clone()),
            ("root:100000:65535\n", foreign.clone()),
            ("root:0:65536\n", foreign.clone()),
            ("root:1:65536\n", shifted(1)),
            // The last ids: the range ends at u32::MAX, or one past it.
            ("root:4294901759:65536\n", shifted(4294901759)),
            ("root:4294901760:65536\n", foreign.clone()),
            (
                "root:0:65536\nroot:100000:10\nroot:4294901760:65536\nroot:200000:65536\nroot:300000:65536\n",
                shifted(200000),
            ),
        ] {
            assert_eq!(shifted_in(subuid), want, "{subuid:?}");
        }
    }

    #[test]
    fn host_uid_follows_the_map() {
        let mapped = Ids::Mapped {
            uids: vec![r(0, 1000, 1), r(1, 100000, 65536)],
            gids: vec![r(0, 2000, 1)],
        };
        for (inside, want) in [
            (0, Some(1000)),
            (1, Some(100000)),
            (5, Some(100004)),
            (65536, Some(165535)),
            (65537, None),
        ] {
            assert_eq!(mapped.host_uid(inside), want, "{inside}");
        }
        // A range that does not start at 0 or 1.
        let mapped = Ids::Mapped {
            uids: vec![r(10, 500, 10)],
            gids: vec![],
        };
        for (inside, want) in [(9, None), (10, Some(500)), (12, Some(502)), (20, None)] {
            assert_eq!(mapped.host_uid(inside), want, "{inside}");
        }
        assert_eq!(Ids::Host.host_uid(7), Some(7));
        assert_eq!(
            Ids::Shifted {
                base: 100000,
                count: 65536
            }
            .host_uid(7),
            Some(7)
        );
        assert_eq!(Ids::Own.host_uid(7), None);
    }
}
