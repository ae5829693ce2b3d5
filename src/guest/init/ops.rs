//! The plan as the init reads it, and its operations carried out.

use crate::mounts::{do_mount, mount_share};
use crate::sys::{c, chown};
use std::fs::{self};
use std::io::{self};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

/// Undoes the plan's escaping of tab, newline and backslash in fields.
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(ch) = it.next() {
        if ch == '\\' {
            match it.next() {
                Some('t') => out.push('\t'),
                Some('n') => out.push('\n'),
                Some(o) => out.push(o),
                None => out.push('\\'),
            }
        } else {
            out.push(ch);
        }
    }
    out
}

#[derive(Default)]
pub struct Plan {
    pub mode: String,
    pub root_kind: String,
    pub root_tag: String,
    pub ops: Vec<Vec<String>>,
    pub user: Option<(String, u32, u32, String)>,
    pub cwd: Option<String>,
    pub hostname: Option<String>,
    pub exec: Vec<String>,
    pub setup: Option<String>,
    pub boot: Option<String>,
    /// The tree's sshd, started by the init (shell mode).
    pub sshd: Option<String>,
    /// The host terminal: TERM, rows, cols (0: unknown).
    pub term: Option<(String, u16, u16)>,
    pub net: Option<(String, String, String, String)>,
    /// (device, hostname, timeout in seconds): configure the device by DHCP.
    pub dhcp: Option<(String, String, u64)>,
}

pub fn parse_plan(text: &str) -> Plan {
    let mut p = Plan {
        mode: "exec".into(),
        root_kind: "9p".into(),
        root_tag: "root".into(),
        ..Plan::default()
    };
    for line in text.lines() {
        let f: Vec<String> = line.split('\t').map(unescape).collect();
        let n = |i: usize| f.get(i).cloned().unwrap_or_default();
        match f[0].as_str() {
            "" => {}
            c if c.starts_with('#') => {}
            "mode" => p.mode = n(1),
            "root" => (p.root_kind, p.root_tag) = (n(1), n(2)),
            "user" => {
                p.user = Some((
                    n(1),
                    n(2).parse().unwrap_or(0),
                    n(3).parse().unwrap_or(0),
                    n(4),
                ))
            }
            "cwd" => p.cwd = Some(n(1)),
            "hostname" => p.hostname = Some(n(1)),
            "exec" => p.exec = f[1..].to_vec(),
            "setup" => p.setup = Some(n(1)),
            "boot" => p.boot = Some(n(1)),
            "sshd" => p.sshd = Some(n(1)),
            "term" => p.term = Some((n(1), n(2).parse().unwrap_or(0), n(3).parse().unwrap_or(0))),
            "net" => p.net = Some((n(1), n(2), n(3), n(4))),
            "dhcp" => p.dhcp = Some((n(1), n(2), n(3).parse().unwrap_or(30))),
            _ => p.ops.push(f),
        }
    }
    p
}

/// Carries out one plan operation, with paths relative to the new root.
pub fn apply(op: &[String], root: &str) -> io::Result<()> {
    let at = |p: &str| format!("{root}{p}");
    let arg = |i: usize| op.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        "share" => mount_share(arg(4), arg(1), &at(arg(2)), arg(3) == "ro", true),
        "mkdir" => {
            fs::create_dir_all(at(arg(1)))?;
            let mode = u32::from_str_radix(arg(2), 8).unwrap_or(0o755);
            fs::set_permissions(at(arg(1)), fs::Permissions::from_mode(mode))
        }
        "symlink" => {
            let link = at(arg(2));
            if let Some(parent) = Path::new(&link).parent() {
                fs::create_dir_all(parent)?;
            }
            let _ = fs::remove_file(&link);
            symlink(arg(1), &link)
        }
        "file" => {
            let dst = at(arg(2));
            if let Some(parent) = Path::new(&dst).parent() {
                fs::create_dir_all(parent)?;
            }
            let _ = fs::remove_file(&dst);
            fs::copy(format!("/mkt/{}", arg(1)), &dst)?;
            let mode = u32::from_str_radix(arg(3), 8).unwrap_or(0o644);
            fs::set_permissions(&dst, fs::Permissions::from_mode(mode))?;
            let (uid, gid) = (arg(4).parse().unwrap_or(0), arg(5).parse().unwrap_or(0));
            let p = c(&dst);
            // SAFETY: p is a valid NUL-terminated path.
            if unsafe { chown(p.as_ptr(), uid, gid) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
        "tmpfs" => do_mount("tmpfs", &at(arg(1)), "tmpfs", 0, "mode=0755"),
        // mkt inside the guest is this same static binary.
        "install-self" => {
            let dst = at(arg(1));
            if let Some(parent) = Path::new(&dst).parent() {
                fs::create_dir_all(parent)?;
            }
            fs::copy("/init", &dst)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))
        }
        other => Err(io::Error::other(format!(
            "unknown plan operation {other:?}"
        ))),
    }
}
