//! The plan as the init reads it, and its steps carried out.

use crate::mounts::mount_share;
use crate::plan::{FsKind, Mode, Op, Terminal, User};
use crate::sys::{c, chown};
use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

/// The plan's operations, gathered: settings, and the steps carried out in
/// the new root before the switch.
pub struct Plan {
    pub mode: Mode,
    pub root_kind: FsKind,
    pub root_tag: String,
    /// Share, Symlink, File and InstallSelf, in the plan's order.
    pub steps: Vec<Op>,
    pub user: Option<User>,
    pub cwd: Option<String>,
    pub hostname: Option<String>,
    pub exec: Vec<String>,
    pub setup: Option<String>,
    pub boot: Option<String>,
    /// The tree's sshd, started by the init (shell mode).
    pub sshd: Option<String>,
    pub term: Option<Terminal>,
    /// (device, address, netmask, gateway).
    pub net: Option<(String, String, String, String)>,
    /// (device, hostname, timeout in seconds): configure the device by DHCP.
    pub dhcp: Option<(String, String, u64)>,
}

impl Plan {
    pub fn from_ops(ops: Vec<Op>) -> Plan {
        let mut p = Plan {
            mode: Mode::Exec,
            root_kind: FsKind::NineP,
            root_tag: "root".into(),
            steps: Vec::new(),
            user: None,
            cwd: None,
            hostname: None,
            exec: Vec::new(),
            setup: None,
            boot: None,
            sshd: None,
            term: None,
            net: None,
            dhcp: None,
        };
        for op in ops {
            match op {
                Op::Mode(m) => p.mode = m,
                Op::Root { kind, tag } => (p.root_kind, p.root_tag) = (kind, tag),
                Op::User(u) => p.user = Some(u),
                Op::Hostname(h) => p.hostname = Some(h),
                Op::Boot(s) => p.boot = Some(s),
                Op::Term(t) => p.term = Some(t),
                Op::Cwd(d) => p.cwd = Some(d),
                Op::Sshd(s) => p.sshd = Some(s),
                Op::Dhcp { dev, host, timeout } => p.dhcp = Some((dev, host, timeout.into())),
                Op::Net {
                    dev,
                    addr,
                    mask,
                    gateway,
                } => p.net = Some((dev, addr, mask, gateway)),
                Op::Setup(s) => p.setup = Some(s),
                Op::Exec(argv) => p.exec = argv,
                step @ (Op::Share { .. }
                | Op::Symlink { .. }
                | Op::File { .. }
                | Op::InstallSelf(_)) => p.steps.push(step),
            }
        }
        p
    }
}

/// Creates the parent directory of `path`.
fn parent_dir(path: &str) -> io::Result<()> {
    match Path::new(path).parent() {
        Some(parent) => fs::create_dir_all(parent),
        None => Ok(()),
    }
}

/// Carries out one plan step, with paths relative to the new root.
pub fn apply(op: &Op, root: &str) -> io::Result<()> {
    let at = |p: &str| format!("{root}{p}");
    match op {
        Op::Share {
            tag,
            path,
            readonly,
            kind,
        } => mount_share(*kind, tag, &at(path), *readonly, true),
        Op::Symlink { target, link } => {
            let link = at(link);
            parent_dir(&link)?;
            let _ = fs::remove_file(&link);
            symlink(target, &link)
        }
        Op::File {
            name,
            dest,
            mode,
            uid,
            gid,
        } => {
            let dst = at(dest);
            parent_dir(&dst)?;
            let _ = fs::remove_file(&dst);
            fs::copy(format!("/mkt/{name}"), &dst)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(*mode))?;
            let p = c(&dst);
            // SAFETY: p is a valid NUL-terminated path.
            if unsafe { chown(p.as_ptr(), *uid, *gid) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
        // mkt inside the guest is this same static binary.
        Op::InstallSelf(dest) => {
            let dst = at(dest);
            parent_dir(&dst)?;
            fs::copy("/init", &dst)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))
        }
        other => Err(io::Error::other(format!(
            "{:?} is no step",
            other.fields()[0]
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_gathered_and_steps_kept_in_order() {
        let text = "# plan\nmode\tshell\nroot\tvirtiofs\trootfs\nuser\tdev\t1000\t1000\t/home/dev\n\
                    symlink\t/a\t/b\nshare\tm0\t/home/dev\trw\t9p\ndhcp\teth0\tcx5\t7\n\
                    install-self\t/usr/local/bin/mkt\nexec\tsh\t-c\tx\n";
        let p = Plan::from_ops(crate::plan::decode(text).unwrap());
        assert_eq!(p.mode, Mode::Shell);
        assert_eq!(
            (p.root_kind, p.root_tag.as_str()),
            (FsKind::Virtiofs, "rootfs")
        );
        assert_eq!(p.user.unwrap().home, "/home/dev");
        assert_eq!(p.dhcp, Some(("eth0".into(), "cx5".into(), 7)));
        assert_eq!(p.exec, ["sh", "-c", "x"]);
        let kinds: Vec<String> = p.steps.iter().map(|s| s.fields()[0].clone()).collect();
        assert_eq!(kinds, ["symlink", "share", "install-self"]);
        // No mode or root line: exec mode on the 9p share "root".
        let p = Plan::from_ops(vec![]);
        assert_eq!(
            (p.mode, p.root_kind, p.root_tag.as_str()),
            (Mode::Exec, FsKind::NineP, "root")
        );
        assert!(p.net.is_none() && p.sshd.is_none() && p.exec.is_empty());
    }

    #[test]
    fn a_symlink_step_replaces_what_is_there_under_the_root() {
        let root = std::env::temp_dir().join(format!("mkt-init-ops-{}", std::process::id()));
        let r = root.to_str().unwrap();
        let link = |target: &str| Op::Symlink {
            target: target.into(),
            link: "/etc/x/y".into(),
        };
        apply(&link("/dev/null"), r).unwrap();
        apply(&link("/other"), r).unwrap();
        assert_eq!(
            fs::read_link(root.join("etc/x/y")).unwrap(),
            Path::new("/other")
        );
        let e = apply(&Op::Cwd("/".into()), r).unwrap_err();
        assert_eq!(e.to_string(), "\"cwd\" is no step");
        fs::remove_dir_all(&root).unwrap();
    }
}
