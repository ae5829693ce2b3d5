//! Decides whether KVM is *really* usable, not merely present.
//!
//! `/dev/kvm` existing proves little: on a cloud VM with broken nested
//! virtualisation the device is there, opens fine, answers
//! `KVM_GET_API_VERSION`, and then every guest hangs. So the probe walks the
//! whole path a QEMU guest would take and stops at the first failure:
//!
//! 1. the device node exists;
//! 2. this process can open it read-write;
//! 3. the CPU flags in `/proc/cpuinfo` include `vmx` or `svm`;
//! 4. `KVM_GET_API_VERSION` is 12;
//! 5. a five-byte real-mode test guest (`mov al, 0x42; out 0x10, al; hlt`)
//!    actually runs: it must report the `out` and then halt within
//!    [`GUEST_TIMEOUT`].
//!
//! Step 5 runs in a helper process, mkt itself re-executed as
//! `mkt kvm-test-guest DEV` ([`test_guest_main`]), which prints its verdict
//! as one JSON line; the probe kills it at the timeout, so an ioctl that
//! never returns cannot wedge mkt. (A fresh process, not a fork of mkt,
//! which may have threads.) The KVM ioctls are rust-vmm's `kvm-ioctls`.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// The accelerator QEMU is started with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The value for QEMU's `-accel` option.
    pub fn qemu_arg(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Whether KVM is usable, why (or why not), and how to fix it. Also the
/// test guest helper's report (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvmProbe {
    pub usable: bool,
    /// What worked, or the first thing that failed.
    pub reason: String,
    /// How to fix it, when there is a known fix.
    pub fix: Option<String>,
}

impl KvmProbe {
    fn unusable(reason: impl Into<String>, fix: Option<&str>) -> Self {
        KvmProbe {
            usable: false,
            reason: reason.into(),
            fix: fix.map(str::to_owned),
        }
    }
}

/// How long the test guest may take to reach its `hlt`.
pub(crate) const GUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The hidden subcommand that runs the test guest ([`test_guest_main`]).
pub(crate) const HELPER_SUBCOMMAND: &str = "kvm-test-guest";

const FIX_LOAD_MODULE: &str = "load kvm_intel or kvm_amd, or enable virtualisation in the BIOS";
const FIX_FIRMWARE: &str =
    "enable virtualisation (Intel VT-x / AMD-V) in the firmware (BIOS/UEFI) setup";
const FIX_NESTED: &str =
    "enable nested virtualisation on the host hypervisor (expose vmx/svm to this VM), or use TCG";
const REASON_NO_VMX: &str = "the CPU does not expose vmx/svm (nested virtualisation disabled?)";
const REASON_TIMEOUT: &str = "a test guest did not run within 2 s (broken nested virtualisation?)";
const KVM_API_VERSION: i32 = 12;

/// Probes this machine: `/proc/cpuinfo` and `/dev/kvm`, the test guest in
/// `/proc/self/exe kvm-test-guest`, so only for the mkt binary (tests use
/// [`probe_using`] with mkt's path). Takes at most about [`GUEST_TIMEOUT`]
/// plus a second.
pub fn probe() -> KvmProbe {
    probe_using(Path::new("/proc/self/exe"))
}

/// [`probe`] with the test guest run by the mkt binary at `mkt`.
pub fn probe_using(mkt: &Path) -> KvmProbe {
    let dev = Path::new("/dev/kvm");
    let result = match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(cpuinfo) => probe_with(&cpuinfo, dev, || helper_command(mkt, dev)),
        Err(e) => KvmProbe::unusable(format!("cannot read /proc/cpuinfo: {e}"), None),
    };
    tracing::debug!(?result, "KVM probe");
    result
}

/// The command that runs the test guest on `dev`: `MKT kvm-test-guest DEV`.
pub fn helper_command(mkt: &Path, dev: &Path) -> Command {
    let mut cmd = Command::new(mkt);
    cmd.arg(HELPER_SUBCOMMAND).arg(dev);
    cmd
}

/// The probe proper, with the CPU flags, the device path and the test
/// guest's command (see [`helper_command`]) injected.
pub fn probe_with(cpuinfo: &str, dev: &Path, helper: impl FnOnce() -> Command) -> KvmProbe {
    // 1. The CPU exposes hardware virtualisation. Checked first: without it
    //    nothing about /dev/kvm (its module, its group) can help.
    if !cfg!(target_arch = "x86_64") {
        return KvmProbe::unusable("the KVM probe only supports x86_64 hosts", None);
    }
    if !cpu_has_virt(cpuinfo) {
        // In a VM (the `hypervisor` flag) the host hypervisor hides it;
        // on bare metal the firmware has it switched off.
        let fix = if cpu_has_flag(cpuinfo, "hypervisor") {
            FIX_NESTED
        } else {
            FIX_FIRMWARE
        };
        return KvmProbe::unusable(REASON_NO_VMX, Some(fix));
    }

    // 2. The device node exists. An error here (say, an unreadable parent
    //    directory) is left for the open below to explain precisely.
    if let Ok(false) = dev.try_exists() {
        return KvmProbe::unusable(
            format!("{} does not exist", dev.display()),
            Some(FIX_LOAD_MODULE),
        );
    }

    // 3. It opens read-write (with O_CLOEXEC).
    let kvm = match open(dev) {
        Ok(kvm) => kvm,
        Err(e) => {
            let fix = match e {
                Errno::EACCES | Errno::EPERM => Some(access_fix(dev)),
                Errno::ENXIO | Errno::ENODEV => Some(FIX_LOAD_MODULE.to_owned()),
                _ => None,
            };
            return KvmProbe::unusable(
                format!("{} is not accessible: {}", dev.display(), errno_text(e)),
                fix.as_deref(),
            );
        }
    };

    // 4. The API version is the stable one. kvm-ioctls returns the raw
    //    result, -1 with errno set on failure (a regular file, as in the
    //    tests, answers ENOTTY).
    match kvm.get_api_version() {
        KVM_API_VERSION => {}
        -1 => {
            let e = Errno::last();
            return KvmProbe::unusable(ioctl_failed("KVM_GET_API_VERSION", e), None);
        }
        v => {
            return KvmProbe::unusable(
                format!("KVM_GET_API_VERSION returned {v}, expected {KVM_API_VERSION}"),
                None,
            );
        }
    }
    drop(kvm);

    // 5. A real guest runs.
    run_test_guest(helper())
}

/// Opens `dev` read-write as kvm-ioctls' `Kvm`.
fn open(dev: &Path) -> Result<Kvm, Errno> {
    let path = CString::new(dev.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    Kvm::new_with_path(path).map_err(|e| Errno::from_raw(e.errno()))
}

/// Picks the accelerator, probing (`probe`) only when the choice depends on
/// it: `--accel tcg` never does. The message, if any, is one line for the
/// user: why KVM is not used although it was wanted or would have been
/// preferred.
pub(crate) fn choose(
    requested: Option<Accel>,
    probe: impl FnOnce() -> KvmProbe,
) -> (Accel, Option<String>) {
    if requested == Some(Accel::Tcg) {
        return (Accel::Tcg, None);
    }
    let probe = probe();
    match requested {
        _ if probe.usable => (Accel::Kvm, None),
        Some(_) => (
            Accel::Tcg,
            Some(format!(
                "KVM was requested but cannot be used ({}), using TCG instead",
                probe.reason
            )),
        ),
        None => (
            Accel::Tcg,
            Some(format!("KVM unusable ({}), using TCG", probe.reason)),
        ),
    }
}

/// Whether a `flags` line of `/proc/cpuinfo` lists `vmx` or `svm`. Only the
/// key `flags` counts (not `vmx flags`), and only whole words.
fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpu_has_flag(cpuinfo, "vmx") || cpu_has_flag(cpuinfo, "svm")
}

fn cpu_has_flag(cpuinfo: &str, flag: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == flag))
}

/// How to get access to `dev`, from its owner, group and mode: joining its
/// group only helps when the group may read and write it.
fn access_fix(dev: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(dev) else {
        return format!("give your user read-write access to {}", dev.display());
    };
    let group = nix::unistd::Group::from_gid(m.gid().into())
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| m.gid().to_string());
    access_fix_for(dev, m.mode(), &group)
}

fn access_fix_for(dev: &Path, mode: u32, group: &str) -> String {
    if mode & 0o060 == 0o060 && group != "root" {
        format!(
            "add yourself to the {group} group: sudo usermod -aG {group} $USER (then log in again)"
        )
    } else {
        format!(
            "{} is mode {:04o}, group {group}, which no group of users can open: make it 0660 group kvm (a udev rule KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\"), then sudo usermod -aG kvm $USER and log in again",
            dev.display(),
            mode & 0o7777
        )
    }
}

/// The C library's message for `e`, e.g. "Permission denied" (nix's own
/// table has older wordings such as "Not a typewriter" for ENOTTY).
fn errno_text(e: Errno) -> String {
    io_error_text(&std::io::Error::from_raw_os_error(e as i32))
}

/// An I/O error's message without std's " (os error N)" suffix.
fn io_error_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

fn ioctl_failed(name: &str, e: Errno) -> String {
    format!("{name} failed: {} ({e:?})", errno_text(e))
}

/// Runs the test guest's process `helper` and waits up to [`GUEST_TIMEOUT`]
/// for its verdict, killing it then.
fn run_test_guest(mut helper: Command) -> KvmProbe {
    let failed = |what: &str, e: std::io::Error| {
        KvmProbe::unusable(
            format!("{what} for the KVM test failed: {}", io_error_text(&e)),
            None,
        )
    };
    // One pipe for stdout and stderr: the verdict, or why there is none.
    let (rd, wr) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return failed("pipe", e),
    };
    let wr2 = match wr.try_clone() {
        Ok(w) => w,
        Err(e) => return failed("pipe", e),
    };
    helper.stdin(Stdio::null()).stdout(wr).stderr(wr2);
    let parent = nix::unistd::getpid();
    // SAFETY: runs between fork and exec, so it must be async-signal-safe:
    // prctl and getppid are plain system calls, and nothing allocates (the
    // error is a raw OS error). PR_SET_PDEATHSIG (kept across exec) makes the
    // kernel kill the helper if mkt dies first, so a hung guest cannot
    // outlive mkt; the getppid check closes the race where mkt died before.
    unsafe {
        helper.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let child = helper.spawn();
    drop(helper); // our copies of the write end: the helper's exit is EOF
    let child = match child {
        Ok(c) => c,
        Err(e) => return failed("starting the process", e),
    };
    let mut out = Vec::new();
    match read_to_eof(&rd, &mut out, Instant::now() + GUEST_TIMEOUT) {
        Ok(true) => {
            let status = reap(child, false);
            let out = String::from_utf8_lossy(&out);
            let verdict = out.lines().rev().find_map(|l| serde_json::from_str(l).ok());
            verdict.unwrap_or_else(|| {
                let last = out
                    .lines()
                    .last()
                    .map(|l| format!(": {l}"))
                    .unwrap_or_default();
                KvmProbe::unusable(
                    format!("the KVM test process died without reporting ({status}){last}"),
                    None,
                )
            })
        }
        Ok(false) => {
            reap(child, true);
            KvmProbe::unusable(REASON_TIMEOUT, Some(FIX_NESTED))
        }
        Err(e) => {
            reap(child, true);
            KvmProbe::unusable(
                format!("reading the KVM test result failed: {}", errno_text(e)),
                None,
            )
        }
    }
}

/// Reads `rd` into `out` until EOF (true) or `deadline` (false).
fn read_to_eof(rd: impl AsFd, out: &mut Vec<u8>, deadline: Instant) -> Result<bool, Errno> {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        // Round up so that a sub-millisecond remainder still waits.
        let timeout =
            PollTimeout::try_from(left + Duration::from_micros(999)).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(rd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => return Ok(false),
            Ok(_) => match nix::unistd::read(rd.as_fd(), &mut buf) {
                Ok(0) => return Ok(true),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return Err(e),
            },
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reaps the helper, SIGKILLing it first if asked. A vCPU can sit in an
/// uninterruptible ioctl on a broken host, so this waits at most a second
/// and then leaves the reaping to a detached thread, which cannot keep mkt
/// from exiting. Returns a description of how the helper ended.
fn reap(mut child: Child, kill_first: bool) -> String {
    if kill_first {
        let _ = child.kill();
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Ok(None) => {
                let _ = std::thread::Builder::new()
                    .name("kvm-probe-reaper".into())
                    .spawn(move || child.wait());
                return "it did not exit after SIGKILL".to_owned();
            }
            Err(e) => return format!("waiting for it failed: {}", io_error_text(&e)),
        }
    }
}

/// `mkt kvm-test-guest DEV`: runs the test guest on DEV and prints the
/// verdict, a [`KvmProbe`], as one JSON line. The exit status.
pub(crate) fn test_guest_main(dev: &Path) -> i32 {
    helper_main(dev, &GUEST_CODE)
}

fn helper_main(dev: &Path, code: &[u8]) -> i32 {
    let verdict = match run_guest(dev, code) {
        Ok(reason) => KvmProbe {
            usable: true,
            reason,
            fix: None,
        },
        Err((reason, fix)) => KvmProbe::unusable(reason, fix),
    };
    let line = serde_json::to_string(&verdict).unwrap_or_default();
    match writeln!(std::io::stdout(), "{line}") {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// `mov al, 0x42; out 0x10, al; hlt`, loaded at guest physical address 0.
const GUEST_CODE: [u8; 5] = [0xb0, 0x42, 0xe6, 0x10, 0xf4];
const GUEST_PORT: u16 = 0x10;
const GUEST_VALUE: u8 = 0x42;
/// Exits tolerated before giving up (EINTR retries count too).
const MAX_EXITS: u32 = 16;

type Failure = (String, Option<&'static str>);

/// Creates a VM with one page of memory holding `code`, one vCPU in real
/// mode at address 0, and runs it until `hlt`. Ok carries a success
/// description, Err a reason and fix.
#[cfg(target_arch = "x86_64")]
fn run_guest(dev: &Path, code: &[u8]) -> Result<String, Failure> {
    use kvm_ioctls::VcpuExit;
    let fail = |ioctl: &'static str| {
        move |e: kvm_ioctls::Error| (ioctl_failed(ioctl, Errno::from_raw(e.errno())), None)
    };
    let kvm = open(dev).map_err(|e| (ioctl_failed("opening the KVM device", e), None))?;
    /// The guest's memory: one page, page-aligned as KVM requires.
    #[repr(C, align(4096))]
    struct Page([u8; 4096]);
    // Declared before the VM, so it is freed after it.
    let mut mem = Box::new(Page([0; 4096]));
    let n = code.len().min(mem.0.len());
    mem.0[..n].copy_from_slice(&code[..n]);
    let vm = kvm.create_vm().map_err(fail("KVM_CREATE_VM"))?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem.0.len() as u64,
        userspace_addr: mem.0.as_mut_ptr() as u64,
    };
    // SAFETY: the region is `mem`, a live heap page that is neither moved
    // nor freed while the VM exists (it is dropped after `vm`), and the
    // guest may write it: nothing else reads it meanwhile.
    unsafe { vm.set_user_memory_region(region) }.map_err(fail("KVM_SET_USER_MEMORY_REGION"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(fail("KVM_CREATE_VCPU"))?;

    // Real mode, code segment at 0: execution starts at physical address 0.
    let mut sregs = vcpu.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(fail("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: 0,
        rflags: 2, // bit 1 is reserved and must be set
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(fail("KVM_SET_REGS"))?;

    let mut saw_io = false;
    for _ in 0..MAX_EXITS {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port != GUEST_PORT || data != [GUEST_VALUE] || saw_io {
                    return Err((
                        format!(
                            "the test guest made an unexpected I/O exit (out to port 0x{port:x}, data {data:02x?})"
                        ),
                        None,
                    ));
                }
                saw_io = true;
            }
            Ok(VcpuExit::Hlt) => {
                let regs = vcpu.get_regs().map_err(fail("KVM_GET_REGS"))?;
                // hlt is the last byte of the program, so rip is past it.
                if regs.rip != code.len() as u64 || regs.rax & 0xff != u64::from(GUEST_VALUE) {
                    return Err((
                        format!(
                            "the test guest halted in an unexpected state (rip 0x{:x}, rax 0x{:x})",
                            regs.rip, regs.rax
                        ),
                        Some(FIX_NESTED),
                    ));
                }
                return Ok(if saw_io {
                    format!(
                        "KVM works (a test guest wrote 0x{GUEST_VALUE:x} to port 0x{GUEST_PORT:x} and halted)"
                    )
                } else {
                    "KVM works (a test guest ran and halted)".to_owned()
                });
            }
            Ok(other) => {
                return Err((
                    format!("the test guest stopped with unexpected exit {other:?}"),
                    Some(FIX_NESTED),
                ));
            }
            Err(e) if matches!(Errno::from_raw(e.errno()), Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => return Err(fail("KVM_RUN")(e)),
        }
    }
    Err((
        format!("the test guest did not halt after {MAX_EXITS} exits"),
        Some(FIX_NESTED),
    ))
}

#[cfg(not(target_arch = "x86_64"))]
fn run_guest(_dev: &Path, _code: &[u8]) -> Result<String, Failure> {
    Err(("the KVM probe only supports x86_64 hosts".to_owned(), None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const CPUINFO_NO_VIRT: &str = "processor\t: 0\n\
        vendor_id\t: GenuineIntel\n\
        flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep hypervisor lahf_lm\n\
        vmx flags\t: vnmi preemption_timer\n\
        bugs\t\t: spectre_v1 spectre_v2\n\n";
    const CPUINFO_VMX: &str = "processor\t: 0\nflags\t\t: fpu vme vmx sse2\n\n";
    const CPUINFO_SVM: &str = "processor\t: 0\nflags\t\t: fpu svm lm\n\n";

    #[test]
    fn cpu_flags_are_parsed_as_whole_words_of_the_flags_line() {
        assert!(cpu_has_virt(CPUINFO_VMX));
        assert!(cpu_has_virt(CPUINFO_SVM));
        assert!(!cpu_has_virt(CPUINFO_NO_VIRT));
        assert!(!cpu_has_virt("flags : vmxe svmx\n"));
        assert!(!cpu_has_virt("vmx flags : vmx\n"));
        assert!(!cpu_has_virt(""));
    }

    #[test]
    fn missing_device_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        let p = probe_with(CPUINFO_VMX, &dev, no_helper);
        assert!(!p.usable);
        assert_eq!(p.reason, format!("{} does not exist", dev.display()));
        assert_eq!(p.fix.as_deref(), Some(FIX_LOAD_MODULE));
    }

    #[test]
    fn unopenable_device_names_the_errno() {
        let dir = tempfile::tempdir().unwrap();
        // Opening a directory read-write fails with EISDIR, even for root.
        let p = probe_with(CPUINFO_VMX, dir.path(), no_helper);
        assert!(!p.usable);
        assert_eq!(
            p.reason,
            format!("{} is not accessible: Is a directory", dir.path().display())
        );
    }

    #[test]
    fn cpu_without_vmx_or_svm_is_unusable() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let p = probe_with(CPUINFO_NO_VIRT, file.path(), no_helper);
        assert!(!p.usable);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(p.reason, REASON_NO_VMX);
            assert_eq!(p.fix.as_deref(), Some(FIX_NESTED));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn no_vmx_is_the_cause_reported_whatever_dev_kvm_is() {
        // Neither loading a module nor joining a group fixes a CPU without
        // vmx/svm: that is the cause named, with its own fix.
        let dir = tempfile::tempdir().unwrap();
        let p = probe_with(CPUINFO_NO_VIRT, &dir.path().join("kvm"), no_helper);
        assert_eq!(p.reason, REASON_NO_VMX);
        assert_eq!(p.fix.as_deref(), Some(FIX_NESTED));
        let bare_metal = "processor\t: 0\nflags\t\t: fpu vme sse2\n\n";
        let p = probe_with(bare_metal, &dir.path().join("kvm"), no_helper);
        assert_eq!(p.fix.as_deref(), Some(FIX_FIRMWARE));
    }

    #[test]
    fn access_advice_follows_the_device_group_and_mode() {
        let dev = Path::new("/dev/kvm");
        let f = access_fix_for(dev, 0o20660, "kvm");
        assert!(f.starts_with("add yourself to the kvm group"), "{f}");
        // 0600 root:root: joining a group cannot help.
        let f = access_fix_for(dev, 0o20600, "root");
        assert!(!f.starts_with("add yourself"), "{f}");
        assert!(f.contains("mode 0600, group root"), "{f}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn failed_ioctl_names_the_ioctl_and_errno() {
        // A regular file passes steps 1-3 and then fails the first ioctl.
        let file = tempfile::NamedTempFile::new().unwrap();
        let p = probe_with(CPUINFO_VMX, file.path(), no_helper);
        assert!(!p.usable);
        assert_eq!(
            p.reason,
            "KVM_GET_API_VERSION failed: Inappropriate ioctl for device (ENOTTY)"
        );
    }

    /// For probes that stop before the test guest.
    fn no_helper() -> Command {
        unreachable!("the probe should have stopped before the test guest")
    }

    #[test]
    fn choose_table() {
        let ok = KvmProbe {
            usable: true,
            reason: "KVM works".into(),
            fix: None,
        };
        let bad = KvmProbe::unusable(REASON_NO_VMX, Some(FIX_NESTED));
        let fallback = format!("KVM unusable ({REASON_NO_VMX}), using TCG");
        let refused =
            format!("KVM was requested but cannot be used ({REASON_NO_VMX}), using TCG instead");
        let cases: [(Option<Accel>, &KvmProbe, Accel, Option<&str>); 4] = [
            (None, &ok, Accel::Kvm, None),
            (None, &bad, Accel::Tcg, Some(&fallback)),
            (Some(Accel::Kvm), &ok, Accel::Kvm, None),
            (Some(Accel::Kvm), &bad, Accel::Tcg, Some(&refused)),
        ];
        for (requested, probe, accel, msg) in cases {
            let got = choose(requested.clone(), || probe.clone());
            assert_eq!(
                got,
                (accel, msg.map(str::to_owned)),
                "{requested:?} {probe:?}"
            );
            if let Some(line) = got.1 {
                assert!(!line.contains('\n'));
            }
        }
        // --accel tcg: TCG, without probing.
        let got = choose(Some(Accel::Tcg), || panic!("probed for --accel tcg"));
        assert_eq!(got, (Accel::Tcg, None));
        assert_eq!(Accel::Kvm.qemu_arg(), "kvm");
        assert_eq!(Accel::Tcg.qemu_arg(), "tcg");
    }

    /// Runs `f` on a thread and fails if it takes longer than `limit`. The
    /// thread is left behind on timeout, which the test harness tolerates.
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .unwrap_or_else(|_| panic!("did not return within {limit:?}"))
    }

    /// The test binary is not mkt, so the tests' test guest runs in this
    /// binary re-executed to run only [`helper_process`], told by these
    /// variables to be the helper: the device and the guest code in hex.
    const HELPER_DEV: &str = "MKT_TEST_KVM_HELPER_DEV";
    const HELPER_CODE: &str = "MKT_TEST_KVM_HELPER_CODE";

    fn test_helper(code: &[u8]) -> Command {
        let hex: Vec<String> = code.iter().map(|b| format!("{b:02x}")).collect();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "host::kvm::tests::helper_process", "--nocapture"])
            .env(HELPER_DEV, "/dev/kvm")
            .env(HELPER_CODE, hex.join(","));
        cmd
    }

    /// Not a test: in [`test_helper`]'s process, the test guest's helper
    /// ([`helper_main`] with the given code); elsewhere nothing.
    #[test]
    fn helper_process() {
        let Ok(dev) = std::env::var(HELPER_DEV) else {
            return;
        };
        let code: Vec<u8> = std::env::var(HELPER_CODE)
            .unwrap()
            .split(',')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        std::process::exit(helper_main(Path::new(&dev), &code));
    }

    #[test]
    fn real_probe_returns_promptly() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let start = Instant::now();
        let p = within(Duration::from_secs(5), move || {
            probe_with(&cpuinfo, Path::new("/dev/kvm"), || test_helper(&GUEST_CODE))
        });
        println!("probe = {p:?} after {:?}", start.elapsed());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if !cpu_has_virt(&cpuinfo) {
            assert!(!p.usable, "{p:?}");
        }
    }

    /// A helper that ends without a verdict: its status and last line.
    #[test]
    fn helper_without_a_verdict_is_reported() {
        let mut sh = Command::new("/bin/sh");
        sh.args(["-c", "echo '{}'; echo oops >&2; exit 3"]);
        let p = run_test_guest(sh);
        assert_eq!(
            p,
            KvmProbe::unusable(
                "the KVM test process died without reporting (exit status: 3): oops",
                None
            )
        );
        let p = run_test_guest(Command::new("/no/such/mkt"));
        assert_eq!(
            p.reason,
            "starting the process for the KVM test failed: No such file or directory"
        );
    }

    /// Whether /dev/kvm opens read-write, else a skip; in CI (`CI=true`),
    /// whose machines have /dev/kvm (it may not run guests), a failure: a
    /// missing prerequisite must not pass as a skip there.
    fn dev_kvm() -> bool {
        match open(Path::new("/dev/kvm")) {
            Ok(_) => true,
            Err(e) => {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
                assert!(!ci, "prerequisite missing in CI: /dev/kvm ({e})");
                println!("SKIP: /dev/kvm not accessible ({e})");
                false
            }
        }
    }

    /// Exercises step 5 on the real /dev/kvm even when step 3 would stop the
    /// probe first: the helper is bounded and reports a verdict.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn real_test_guest_is_bounded() {
        if !dev_kvm() {
            return;
        }
        let start = Instant::now();
        let p = within(Duration::from_secs(5), || {
            run_test_guest(test_helper(&GUEST_CODE))
        });
        println!("run_test_guest() = {p:?} after {:?}", start.elapsed());
        assert!(!p.reason.contains("KVM test process"), "{p:?}");
    }

    /// A guest that spins forever (`jmp $`) must be killed at the timeout.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn spinning_test_guest_times_out() {
        if !dev_kvm() {
            return;
        }
        let start = Instant::now();
        let p = within(Duration::from_secs(6), || {
            run_test_guest(test_helper(&[0xeb, 0xfe]))
        });
        let took = start.elapsed();
        println!("spinning guest: {p:?} after {took:?}");
        assert_eq!(p, KvmProbe::unusable(REASON_TIMEOUT, Some(FIX_NESTED)));
        // Killed, not waited for (that would take reap's extra second).
        assert!(took >= GUEST_TIMEOUT, "{took:?}");
        assert!(took < GUEST_TIMEOUT + Duration::from_secs(1), "{took:?}");
    }
}
