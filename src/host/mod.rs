//! What the host can do: one probe per capability, shared by `mkt doctor`,
//! `mkt setup` and the commands that need the capability (run, build).
//!
//! Each probe returns a [`Check`]: ok / missing / unusable, why, and how to fix.

pub mod kvm;
pub mod probe;
pub mod tsc;
pub mod user;

use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// Outcome of one capability probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Missing,
    Unusable,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::Missing => "missing",
            Status::Unusable => "unusable",
        })
    }
}

/// One line of `mkt doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short stable name (`qemu`, `accel`, `userns`, ...), also the JSON key.
    pub name: &'static str,
    pub status: Status,
    /// The version found, or why it is missing/unusable.
    pub detail: String,
    /// How to fix it, when it is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// Whether mkt's rootless core (run, build) needs it; optional features don't.
    pub required: bool,
}

impl Check {
    pub fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
            required: false,
        }
    }

    pub fn bad(
        name: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Check {
            name,
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
            required: false,
        }
    }

    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }
}

/// A host package mkt may need, with the exact install command per distro.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prerequisite {
    /// The program mkt looks for.
    pub program: &'static str,
    /// What it is used for.
    pub purpose: &'static str,
    pub debian: &'static str,
    pub fedora: &'static str,
    pub required: bool,
}

use crate::arch::HOST;

/// Host programs mkt uses, in the order `mkt setup` reports them.
pub(crate) const PREREQUISITES: &[Prerequisite] = &[
    Prerequisite {
        program: HOST.qemu,
        purpose: "boots kernels (mkt run)",
        debian: HOST.qemu_debian,
        fedora: HOST.qemu_fedora,
        required: true,
    },
    Prerequisite {
        program: "newuidmap",
        purpose: "maps subordinate uids for rootless rootfs trees",
        debian: "sudo apt-get install -y uidmap",
        fedora: "sudo dnf install -y shadow-utils",
        required: false,
    },
    Prerequisite {
        program: "virtiofsd",
        purpose: "shares the rootfs over virtiofs (the default rootfs's kernel has no 9p)",
        debian: "sudo apt-get install -y gcc pkg-config libcap-ng-dev libseccomp-dev && cargo install --locked virtiofsd",
        fedora: "sudo dnf install -y virtiofsd",
        required: true,
    },
    Prerequisite {
        program: "ccache",
        purpose: "caches compilations across kernel builds",
        debian: "sudo apt-get install -y ccache",
        fedora: "sudo dnf install -y ccache",
        required: false,
    },
    Prerequisite {
        program: "mmdebstrap",
        purpose: "builds Debian/Ubuntu rootfs recipes (mkt rootfs build, the default rootfs)",
        debian: "sudo apt-get install -y mmdebstrap",
        fedora: "sudo dnf install -y mmdebstrap",
        required: true,
    },
    Prerequisite {
        program: "cpio",
        purpose: "packs the initramfs for distro kernels",
        debian: "sudo apt-get install -y cpio",
        fedora: "sudo dnf install -y cpio",
        required: false,
    },
];

/// Finds `program` in `path` (a `$PATH`-style list), returning the first
/// executable regular file.
pub(crate) fn which_in(program: &str, path: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_executable(&p).then_some(p);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| is_executable(p))
}

/// Finds `program` in this process's `$PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    which_in(program, &std::env::var("PATH").unwrap_or_default())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The prerequisites not found on this host.
pub(crate) fn missing_prerequisites() -> Vec<&'static Prerequisite> {
    PREREQUISITES
        .iter()
        .filter(|p| probe::find_program(p.program).is_none())
        .collect()
}

/// Renders the doctor report as aligned text, one line per capability and
/// an indented `fix:` line under each that is not ok.
pub(crate) fn render_checks(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "{:<8} {:<width$}  {}\n",
            c.status.to_string(),
            c.name,
            c.detail
        ));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("{:<8} {:<width$}  fix: {}\n", "", "", fix));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_in_finds_first_executable() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("tool"), "not executable").unwrap();
        std::fs::write(b.join("tool"), "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(b.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{}:{}", a.display(), b.display());
        assert_eq!(which_in("tool", &path), Some(b.join("tool")));
        assert_eq!(which_in("absent", &path), None);
    }

    #[test]
    fn render_puts_fix_under_failed_checks() {
        let checks = vec![
            Check::ok("qemu", "QEMU 7.2.22"),
            Check::bad(
                "accel",
                Status::Unusable,
                "KVM unusable, using TCG",
                "enable vmx",
            ),
        ];
        let text = render_checks(&checks);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ok       qemu "));
        assert!(lines[1].starts_with("unusable accel"));
        assert!(lines[2].trim_start().starts_with("fix: enable vmx"));
    }

    #[test]
    fn every_prerequisite_has_both_install_commands() {
        for p in PREREQUISITES {
            assert!(p.debian.contains("apt-get install") || p.debian.contains("cargo install"));
            assert!(p.fedora.contains("dnf install"), "{}", p.program);
        }
    }
}
