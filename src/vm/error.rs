//! Why `mkt run` (and the VM commands) failed: each variant names what.

use crate::guest;
use crate::instance;
use crate::vm::net;
use crate::vm::qemu;
use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--virt {virt}: the kernel lacks {option} (build it with {option}=m)")]
    NoSoftRdma { virt: String, option: &'static str },
    #[error(transparent)]
    Rootfs(#[from] crate::rootfs::resolve::ResolveError),
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    #[error("cannot serve {} with its owners", .0.display())]
    Owners(PathBuf, #[source] crate::sandbox::IdsError),
    #[error("kernel tree {0}")]
    Modules(PathBuf, #[source] guest::modules::ModulesError),
    #[error("the kernel needs module {name} to boot, and {dir} does not have it")]
    MissingBootModule { name: String, dir: PathBuf },
    #[error("--boot-script {0}: {1}")]
    BootScript(PathBuf, String),
    #[error("setup {0:?} is not in the config{1}")]
    NoSetup(String, String),
    #[error("--profile")]
    Profile(#[source] qemu::ProfileError),
    #[error("cannot prepare the run directory")]
    RunDir(#[source] instance::InstanceError),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] io::Error),
    #[error("cannot start {0}")]
    Spawn(PathBuf, #[source] io::Error),
    #[error("cannot wait for QEMU")]
    Wait(#[source] io::Error),
    #[error(
        "cannot start {0} confined for its 9p shares (a private mount namespace, a user namespace when not root, keeps the rootfs store read-only)"
    )]
    SpawnConfined(String, #[source] io::Error),
    #[error("cannot {what} in {}", .dir.display())]
    SshKeys {
        what: String,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ssh-keygen not found (install openssh-client)")]
    NoSshKeygen,
    #[error("ssh-keygen failed: {0}")]
    SshKeygen(String),
    #[error("cannot build the initramfs")]
    Initramfs(#[source] io::Error),
    #[error("--dir {}", .0.display())]
    Dir(PathBuf, #[source] io::Error),
    #[error("cannot find a free port")]
    FreePort(#[source] io::Error),
    #[error("cannot catch signals")]
    Signals(#[source] io::Error),
    #[error("cannot listen on {}", .0.display())]
    Listen(PathBuf, #[source] io::Error),
    /// `nine_p`: the kernel can mount 9p, so `--fs 9p` is a way out.
    #[error("virtiofs needs virtiofsd, which is not installed (see `mkt doctor`; ./install.sh installs it){}",
        if *.nine_p { ", or use --fs 9p" } else { "; this kernel has no 9p, so virtiofs is the only way to share the rootfs" })]
    NoVirtiofsd { nine_p: bool },
    #[error("virtiofsd for {0} did not start: {1}")]
    Virtiofsd(PathBuf, String),
    #[error("QEMU is not installed ({} not found; see `mkt doctor`)", crate::arch::HOST.qemu)]
    NoQemu,
    #[error("the guest ended without reporting the command's exit status ({qemu}){}\nconsole log: {}", last_lines(.console), .log.display())]
    NoStatus {
        qemu: String,
        console: String,
        log: PathBuf,
    },
    #[error(
        "the kernel command line would be {len} bytes, but {} takes at most {limit}: shorten --append (the kernel would cut it, and the guest hang)", .kernel.display()
    )]
    CmdlineTooLong {
        len: usize,
        limit: usize,
        kernel: PathBuf,
    },
    /// QEMU's own error (a bad --qemu-arg, a device it lacks), with the
    /// last lines of its stderr.
    #[error("QEMU {status}{}", stderr_tail(.stderr))]
    QemuFailed {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("interrupted by signal {0}")]
    Interrupted(i32),
    #[error("{0}: {1}")]
    Invalid(String, String),
    #[error(transparent)]
    Vfio(#[from] crate::vm::vfio::VfioError),
    #[error(transparent)]
    Net(#[from] net::NetError),
}

pub(crate) fn last_lines(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    let tail = &lines[lines.len().saturating_sub(25)..];
    let panic = lines.iter().find(|l| l.contains("Kernel panic"));
    let mut s = String::new();
    if let Some(p) = panic {
        s += &format!("\n{}", p.trim());
    }
    if !tail.is_empty() {
        s += "\nlast console lines:\n";
        s += &tail.join("\n");
    }
    s
}

/// `: ` and the last lines of QEMU's stderr, or nothing when it is empty.
pub(crate) fn stderr_tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.trim().lines().collect();
    match lines.len() {
        0 => String::new(),
        n => format!(": {}", lines[n.saturating_sub(20)..].join("\n")),
    }
}
