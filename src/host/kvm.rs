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
//! Step 5 runs in a forked child process that reports over a pipe, so an
//! ioctl that never returns can be killed instead of wedging mkt.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pipe2};

/// The accelerator QEMU is started with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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

/// Whether KVM is usable, why (or why not), and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(2);

const FIX_LOAD_MODULE: &str = "load kvm_intel or kvm_amd, or enable virtualisation in the BIOS";
const FIX_FIRMWARE: &str =
    "enable virtualisation (Intel VT-x / AMD-V) in the firmware (BIOS/UEFI) setup";
const FIX_NESTED: &str =
    "enable nested virtualisation on the host hypervisor (expose vmx/svm to this VM), or use TCG";
const REASON_NO_VMX: &str = "the CPU does not expose vmx/svm (nested virtualisation disabled?)";
const REASON_TIMEOUT: &str = "a test guest did not run within 2 s (broken nested virtualisation?)";

/// Probes this machine: `/proc/cpuinfo` and `/dev/kvm`. Takes at most
/// about [`GUEST_TIMEOUT`] plus a second.
pub fn probe() -> KvmProbe {
    let result = match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(cpuinfo) => probe_with(&cpuinfo, Path::new("/dev/kvm")),
        Err(e) => KvmProbe::unusable(format!("cannot read /proc/cpuinfo: {e}"), None),
    };
    tracing::debug!(?result, "KVM probe");
    result
}

/// The probe proper, with the CPU flags and the device path injected.
pub fn probe_with(cpuinfo: &str, dev: &Path) -> KvmProbe {
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

    // 3. It opens read-write (std opens with O_CLOEXEC).
    let kvm = match OpenOptions::new().read(true).write(true).open(dev) {
        Ok(f) => f,
        Err(e) => {
            let fix = match e.raw_os_error().map(Errno::from_raw) {
                Some(Errno::EACCES | Errno::EPERM) => Some(access_fix(dev)),
                Some(Errno::ENXIO | Errno::ENODEV) => Some(FIX_LOAD_MODULE.to_owned()),
                _ => None,
            };
            let why = io_error_text(&e);
            return KvmProbe::unusable(
                format!("{} is not accessible: {why}", dev.display()),
                fix.as_deref(),
            );
        }
    };

    // 4. The API version is the stable one.
    // SAFETY: `kvm` is an open file descriptor owned by this function; the
    // request takes no pointer argument (it must be 0), so no memory is
    // touched. (A regular file, as in the tests, just answers ENOTTY.)
    match unsafe { sys::kvm_get_api_version(kvm.as_raw_fd(), 0) } {
        Ok(sys::KVM_API_VERSION) => {}
        Ok(v) => {
            return KvmProbe::unusable(
                format!(
                    "KVM_GET_API_VERSION returned {v}, expected {}",
                    sys::KVM_API_VERSION
                ),
                None,
            );
        }
        Err(e) => return KvmProbe::unusable(ioctl_failed("KVM_GET_API_VERSION", e), None),
    }

    // 5. A real guest runs.
    match run_test_guest(&kvm, &GUEST_CODE) {
        Ok(detail) => KvmProbe {
            usable: true,
            reason: detail,
            fix: None,
        },
        Err((reason, fix)) => KvmProbe::unusable(reason, fix),
    }
}

/// Picks the accelerator. The message, if any, is one line for the user:
/// why KVM is not used although it was wanted or would have been preferred.
pub fn choose(requested: Option<Accel>, probe: &KvmProbe) -> (Accel, Option<String>) {
    match requested {
        Some(Accel::Tcg) => (Accel::Tcg, None),
        _ if probe.usable => (Accel::Kvm, None),
        Some(Accel::Kvm) => (
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

/// Runs the test guest `code` (normally [`GUEST_CODE`]) in a forked child
/// and waits up to [`GUEST_TIMEOUT`] for its report. Ok carries a success
/// description, Err a reason and fix.
fn run_test_guest(kvm: &File, code: &[u8]) -> Result<String, (String, Option<&'static str>)> {
    let (rd, wr) = pipe2(OFlag::O_CLOEXEC).map_err(|e| {
        (
            format!("pipe for the KVM test failed: {}", errno_text(e)),
            None,
        )
    })?;
    let parent = std::process::id();
    let kvm_fd = kvm.as_raw_fd();

    // SAFETY: mkt may have other threads, so after fork the child may only use
    // async-signal-safe functions. `child_main` is written for that: it only
    // makes raw system calls (prctl, getppid, ioctl, mmap, write, _exit), never
    // allocates, locks or panics, and never returns. The parent branch is
    // ordinary code.
    match unsafe { fork() } {
        Err(e) => Err((
            format!("fork for the KVM test failed: {}", errno_text(e)),
            None,
        )),
        Ok(ForkResult::Child) => child_main(kvm_fd, code, wr.as_raw_fd(), parent),
        Ok(ForkResult::Parent { child }) => {
            drop(wr); // so that the child's death shows up as EOF
            let mut buf = [0u8; Report::LEN];
            let outcome = read_report(&rd, &mut buf, Instant::now() + GUEST_TIMEOUT);
            match outcome {
                ReadOutcome::Report => {
                    reap(child, false);
                    Report::decode(&buf).describe()
                }
                ReadOutcome::Timeout => {
                    reap(child, true);
                    Err((REASON_TIMEOUT.to_owned(), Some(FIX_NESTED)))
                }
                ReadOutcome::Eof => {
                    let status = reap(child, true);
                    Err((
                        format!("the KVM test process died without reporting ({status})"),
                        None,
                    ))
                }
                ReadOutcome::Error(e) => {
                    reap(child, true);
                    Err((
                        format!("reading the KVM test result failed: {}", errno_text(e)),
                        None,
                    ))
                }
            }
        }
    }
}

enum ReadOutcome {
    Report,
    Timeout,
    Eof,
    Error(Errno),
}

fn read_report(rd: impl AsFd, buf: &mut [u8], deadline: Instant) -> ReadOutcome {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return ReadOutcome::Timeout;
        }
        // Round up so that a sub-millisecond remainder still waits.
        let timeout =
            PollTimeout::try_from(left + Duration::from_micros(999)).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(rd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => return ReadOutcome::Timeout,
            Ok(_) => match nix::unistd::read(rd.as_fd(), &mut buf[got..]) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(n) => got += n,
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return ReadOutcome::Error(e),
            },
            Err(Errno::EINTR) => {}
            Err(e) => return ReadOutcome::Error(e),
        }
    }
    ReadOutcome::Report
}

/// Reaps the child, SIGKILLing it first if asked. A vCPU thread can sit in
/// an uninterruptible ioctl on a broken host, so this waits at most a second
/// and then leaves the reaping to a detached thread, which cannot keep the
/// process from exiting. Returns a description of how the child ended.
fn reap(child: Pid, kill_first: bool) -> String {
    if kill_first {
        let _ = kill(child, Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(WaitStatus::StillAlive) => {
                let _ = std::thread::Builder::new()
                    .name("kvm-probe-reaper".into())
                    .spawn(move || {
                        let _ = waitpid(child, None);
                    });
                return "it did not exit after SIGKILL".to_owned();
            }
            Ok(WaitStatus::Exited(_, code)) => return format!("exit status {code}"),
            Ok(WaitStatus::Signaled(_, sig, _)) => return format!("killed by {sig}"),
            Ok(other) => return format!("{other:?}"),
            Err(Errno::EINTR) => {}
            Err(e) => return format!("waitpid failed: {}", errno_text(e)),
        }
    }
}

/// The forked child: runs the guest, writes one [`Report`], exits.
fn child_main(kvm: RawFd, code: &[u8], out: RawFd, parent: u32) -> ! {
    // SAFETY: prctl and getppid are async-signal-safe system calls with plain
    // integer arguments. PR_SET_PDEATHSIG makes the kernel kill this child if
    // the parent dies first, so a hung guest cannot outlive mkt; the getppid
    // check closes the race where the parent died before the prctl.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if u32::try_from(libc::getppid()).ok() != Some(parent) {
            libc::_exit(1);
        }
    }
    let bytes = run_guest(kvm, code).encode();
    // SAFETY: `bytes` is a live stack array and `out` the pipe's write end,
    // inherited across fork and owned by nothing else in this process. The
    // report is smaller than PIPE_BUF, so the write is atomic. `_exit` skips
    // atexit handlers and stdio flushing, which would not be fork-safe.
    unsafe {
        libc::write(out, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(0)
    }
}

/// Where the child got to, in a fixed-size, allocation-free form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Report {
    stage: Stage,
    /// errno of the failed call, 0 if none.
    errno: i32,
    /// Stage-specific detail (size, exit reason, packed I/O exit, rip).
    a: u64,
    /// Stage-specific detail (I/O value, rax).
    b: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Stage {
    /// The guest did `out 0x10, 0x42` and then `hlt`.
    Ran = 0,
    /// The guest reached `hlt` without the I/O exit being seen.
    Halted = 1,
    CreateVm = 10,
    MmapGuest = 11,
    SetUserMemoryRegion = 12,
    GetVcpuMmapSize = 13,
    VcpuMmapTooSmall = 14,
    CreateVcpu = 15,
    MmapRun = 16,
    GetSregs = 17,
    SetSregs = 18,
    SetRegs = 19,
    Run = 20,
    GetRegs = 21,
    UnexpectedIo = 30,
    UnexpectedExit = 31,
    UnexpectedState = 32,
    TooManyExits = 33,
    Garbled = 255,
}

impl Stage {
    const ALL: [Stage; 19] = [
        Stage::Ran,
        Stage::Halted,
        Stage::CreateVm,
        Stage::MmapGuest,
        Stage::SetUserMemoryRegion,
        Stage::GetVcpuMmapSize,
        Stage::VcpuMmapTooSmall,
        Stage::CreateVcpu,
        Stage::MmapRun,
        Stage::GetSregs,
        Stage::SetSregs,
        Stage::SetRegs,
        Stage::Run,
        Stage::GetRegs,
        Stage::UnexpectedIo,
        Stage::UnexpectedExit,
        Stage::UnexpectedState,
        Stage::TooManyExits,
        Stage::Garbled,
    ];

    fn from_u8(v: u8) -> Stage {
        Stage::ALL
            .into_iter()
            .find(|s| *s as u8 == v)
            .unwrap_or(Stage::Garbled)
    }
}

impl Report {
    const LEN: usize = 24;

    fn new(stage: Stage) -> Self {
        Report {
            stage,
            errno: 0,
            a: 0,
            b: 0,
        }
    }

    fn failed(stage: Stage, e: Errno) -> Self {
        Report {
            errno: e as i32,
            ..Report::new(stage)
        }
    }

    fn with(stage: Stage, a: u64, b: u64) -> Self {
        Report {
            a,
            b,
            ..Report::new(stage)
        }
    }

    fn encode(&self) -> [u8; Report::LEN] {
        let mut out = [0u8; Report::LEN];
        out[0] = self.stage as u8;
        out[4..8].copy_from_slice(&self.errno.to_ne_bytes());
        out[8..16].copy_from_slice(&self.a.to_ne_bytes());
        out[16..24].copy_from_slice(&self.b.to_ne_bytes());
        out
    }

    fn decode(buf: &[u8; Report::LEN]) -> Self {
        let word = |r: std::ops::Range<usize>| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&buf[r]);
            u64::from_ne_bytes(w)
        };
        Report {
            stage: Stage::from_u8(buf[0]),
            errno: i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]),
            a: word(8..16),
            b: word(16..24),
        }
    }

    /// Turns the report into the probe's success text or failure reason.
    fn describe(&self) -> Result<String, (String, Option<&'static str>)> {
        let errno = Errno::from_raw(self.errno);
        let fail = |ioctl: &str| Err((ioctl_failed(ioctl, errno), None));
        match self.stage {
            Stage::Ran => Ok(format!(
                "KVM works (a test guest wrote 0x{:x} to port 0x{:x} and halted)",
                GUEST_VALUE, GUEST_PORT
            )),
            Stage::Halted => Ok("KVM works (a test guest ran and halted)".to_owned()),
            Stage::CreateVm => fail("KVM_CREATE_VM"),
            Stage::MmapGuest => Err((
                format!(
                    "mmap of the test guest's memory failed: {} ({errno:?})",
                    errno_text(errno)
                ),
                None,
            )),
            Stage::SetUserMemoryRegion => fail("KVM_SET_USER_MEMORY_REGION"),
            Stage::GetVcpuMmapSize => fail("KVM_GET_VCPU_MMAP_SIZE"),
            Stage::VcpuMmapTooSmall => Err((
                format!(
                    "KVM_GET_VCPU_MMAP_SIZE returned {}, smaller than struct kvm_run",
                    self.a
                ),
                None,
            )),
            Stage::CreateVcpu => fail("KVM_CREATE_VCPU"),
            Stage::MmapRun => Err((
                format!(
                    "mmap of the vCPU's kvm_run area failed: {} ({errno:?})",
                    errno_text(errno)
                ),
                None,
            )),
            Stage::GetSregs => fail("KVM_GET_SREGS"),
            Stage::SetSregs => fail("KVM_SET_SREGS"),
            Stage::SetRegs => fail("KVM_SET_REGS"),
            Stage::Run => fail("KVM_RUN"),
            Stage::GetRegs => fail("KVM_GET_REGS"),
            Stage::UnexpectedIo => {
                let (dir, size, port, count) = unpack_io(self.a);
                Err((
                    format!(
                        "the test guest made an unexpected I/O exit \
                         (direction {dir}, size {size}, port 0x{port:x}, count {count}, value 0x{:x})",
                        self.b
                    ),
                    None,
                ))
            }
            Stage::UnexpectedExit => Err((
                format!(
                    "the test guest stopped with unexpected exit reason {} ({})",
                    exit_reason_name(self.a),
                    self.a
                ),
                Some(FIX_NESTED),
            )),
            Stage::UnexpectedState => Err((
                format!(
                    "the test guest halted in an unexpected state (rip 0x{:x}, rax 0x{:x})",
                    self.a, self.b
                ),
                Some(FIX_NESTED),
            )),
            Stage::TooManyExits => Err((
                format!("the test guest did not halt after {MAX_EXITS} exits"),
                Some(FIX_NESTED),
            )),
            Stage::Garbled => Err((
                "the KVM test process sent a garbled report".to_owned(),
                None,
            )),
        }
    }
}

/// `mov al, 0x42; out 0x10, al; hlt`, loaded at guest physical address 0.
const GUEST_CODE: [u8; 5] = [0xb0, 0x42, 0xe6, 0x10, 0xf4];
const GUEST_PORT: u16 = 0x10;
const GUEST_VALUE: u8 = 0x42;
const GUEST_MEM_SIZE: usize = 0x1000;
/// Exits tolerated before giving up (EINTR retries count too).
const MAX_EXITS: u32 = 16;

fn pack_io(io: &sys::KvmRunExitIo) -> u64 {
    u64::from(io.direction)
        | u64::from(io.size) << 8
        | u64::from(io.port) << 16
        | u64::from(io.count) << 32
}

fn unpack_io(a: u64) -> (u8, u8, u16, u32) {
    (
        (a & 0xff) as u8,
        (a >> 8 & 0xff) as u8,
        (a >> 16 & 0xffff) as u16,
        (a >> 32) as u32,
    )
}

fn exit_reason_name(reason: u64) -> &'static str {
    match reason {
        0 => "KVM_EXIT_UNKNOWN",
        1 => "KVM_EXIT_EXCEPTION",
        2 => "KVM_EXIT_IO",
        3 => "KVM_EXIT_HYPERCALL",
        4 => "KVM_EXIT_DEBUG",
        5 => "KVM_EXIT_HLT",
        6 => "KVM_EXIT_MMIO",
        7 => "KVM_EXIT_IRQ_WINDOW_OPEN",
        8 => "KVM_EXIT_SHUTDOWN",
        9 => "KVM_EXIT_FAIL_ENTRY",
        10 => "KVM_EXIT_INTR",
        17 => "KVM_EXIT_INTERNAL_ERROR",
        _ => "an unknown exit",
    }
}

/// Creates a VM with one page of memory holding `code`, one vCPU in
/// real mode at address 0, and runs it until `hlt`. Runs in the forked child,
/// so it must stay async-signal-safe: raw system calls only, no allocation,
/// no panics. File descriptors and mappings are left for `_exit` to release.
fn run_guest(kvm: RawFd, code: &[u8]) -> Report {
    // SAFETY: `kvm` is an open /dev/kvm descriptor; the argument is the
    // machine type (0 = default), no memory is passed.
    let vm = match unsafe { sys::kvm_create_vm(kvm, 0) } {
        Ok(fd) => fd,
        Err(e) => return Report::failed(Stage::CreateVm, e),
    };

    // SAFETY: a fresh private anonymous mapping; no existing memory is
    // affected, and the result is checked against MAP_FAILED.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            GUEST_MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Report::failed(Stage::MmapGuest, Errno::last());
    }
    // SAFETY: `mem` is a fresh writable mapping of GUEST_MEM_SIZE bytes, at
    // most that many bytes are copied, and it cannot overlap `code`.
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            mem.cast::<u8>(),
            code.len().min(GUEST_MEM_SIZE),
        );
    }

    let region = sys::KvmUserspaceMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: GUEST_MEM_SIZE as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: `region` is a valid, initialised struct that outlives the call;
    // the memory it describes stays mapped for the rest of this process.
    if let Err(e) = unsafe { sys::kvm_set_user_memory_region(vm, &region) } {
        return Report::failed(Stage::SetUserMemoryRegion, e);
    }

    // SAFETY: no pointer argument; the kernel requires it to be 0.
    let run_size = match unsafe { sys::kvm_get_vcpu_mmap_size(kvm, 0) } {
        Ok(n) => n as usize,
        Err(e) => return Report::failed(Stage::GetVcpuMmapSize, e),
    };
    if run_size < std::mem::size_of::<sys::KvmRun>() {
        return Report::with(Stage::VcpuMmapTooSmall, run_size as u64, 0);
    }

    // SAFETY: the argument is the vCPU id, an integer; no memory is passed.
    let vcpu = match unsafe { sys::kvm_create_vcpu(vm, 0) } {
        Ok(fd) => fd,
        Err(e) => return Report::failed(Stage::CreateVcpu, e),
    };

    // SAFETY: maps the vCPU's kvm_run area as the KVM API prescribes (shared,
    // offset 0, the size KVM_GET_VCPU_MMAP_SIZE reported); checked below.
    let run = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            run_size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            vcpu,
            0,
        )
    };
    if run == libc::MAP_FAILED {
        return Report::failed(Stage::MmapRun, Errno::last());
    }
    let run = run.cast::<sys::KvmRun>();

    // Real mode, code segment at 0: execution starts at physical address 0.
    let mut sregs = sys::KvmSregs::default();
    // SAFETY: `sregs` is a properly sized and aligned struct the kernel fills.
    if let Err(e) = unsafe { sys::kvm_get_sregs(vcpu, &mut sregs) } {
        return Report::failed(Stage::GetSregs, e);
    }
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    // SAFETY: `sregs` is valid and initialised (read back from the kernel).
    if let Err(e) = unsafe { sys::kvm_set_sregs(vcpu, &sregs) } {
        return Report::failed(Stage::SetSregs, e);
    }
    let regs = sys::KvmRegs {
        rip: 0,
        rflags: 2, // bit 1 is reserved and must be set
        ..Default::default()
    };
    // SAFETY: `regs` is a valid, initialised struct that outlives the call.
    if let Err(e) = unsafe { sys::kvm_set_regs(vcpu, &regs) } {
        return Report::failed(Stage::SetRegs, e);
    }

    let mut saw_io = false;
    for _ in 0..MAX_EXITS {
        // SAFETY: `vcpu` is a vCPU descriptor whose kvm_run area is mapped;
        // the argument must be 0 and no other memory is passed.
        match unsafe { sys::kvm_run(vcpu, 0) } {
            Ok(_) => {}
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(e) => return Report::failed(Stage::Run, e),
        }
        // SAFETY: `run` points to a live mapping of at least
        // size_of::<KvmRun>() bytes (checked above), page-aligned, which the
        // kernel updates only while KVM_RUN is in progress; volatile reads
        // keep the compiler from caching fields across runs.
        let exit_reason = unsafe { (&raw const (*run).exit_reason).read_volatile() };
        match exit_reason {
            sys::KVM_EXIT_IO => {
                // SAFETY: as above; for KVM_EXIT_IO the union holds `io`.
                let io = unsafe { (&raw const (*run).io).read_volatile() };
                // The data byte lives in the same mapping at data_offset;
                // check it is inside before reading it.
                let in_bounds = usize::try_from(io.data_offset)
                    .ok()
                    .filter(|off| *off < run_size);
                let value = match in_bounds {
                    // SAFETY: `off` is within the `run_size`-byte mapping.
                    Some(off) => unsafe { run.cast::<u8>().add(off).read_volatile() },
                    None => return Report::with(Stage::UnexpectedIo, pack_io(&io), u64::MAX),
                };
                let expected = io.direction == sys::KVM_EXIT_IO_OUT
                    && io.size == 1
                    && io.port == GUEST_PORT
                    && io.count == 1
                    && value == GUEST_VALUE;
                if !expected || saw_io {
                    return Report::with(Stage::UnexpectedIo, pack_io(&io), u64::from(value));
                }
                saw_io = true;
            }
            sys::KVM_EXIT_HLT => {
                let mut regs = sys::KvmRegs::default();
                // SAFETY: `regs` is a properly sized struct the kernel fills.
                if let Err(e) = unsafe { sys::kvm_get_regs(vcpu, &mut regs) } {
                    return Report::failed(Stage::GetRegs, e);
                }
                // hlt is the last byte of the program, so rip is past it.
                let rip_ok = regs.rip == code.len() as u64;
                let al_ok = regs.rax & 0xff == u64::from(GUEST_VALUE);
                if !rip_ok || !al_ok {
                    return Report::with(Stage::UnexpectedState, regs.rip, regs.rax);
                }
                let stage = if saw_io { Stage::Ran } else { Stage::Halted };
                return Report::new(stage);
            }
            other => return Report::with(Stage::UnexpectedExit, u64::from(other), 0),
        }
    }
    Report::new(Stage::TooManyExits)
}

/// The KVM ABI subset the probe needs (x86_64 layouts, from linux/kvm.h).
mod sys {
    pub const KVMIO: u8 = 0xAE;
    pub const KVM_API_VERSION: i32 = 12;
    pub const KVM_EXIT_IO: u32 = 2;
    pub const KVM_EXIT_HLT: u32 = 5;
    pub const KVM_EXIT_IO_OUT: u8 = 1;

    // The `_IO` requests below take an integer argument, and for
    // KVM_GET_API_VERSION, KVM_GET_VCPU_MMAP_SIZE and KVM_RUN the kernel
    // rejects anything but 0 with EINVAL. nix's `ioctl_none!` passes no third
    // argument at all (leaving a garbage register), so these use
    // `ioctl_write_int_bad!` with the `_IO` request code and pass 0
    // explicitly (or the machine type / vCPU id).
    nix::ioctl_write_int_bad!(kvm_get_api_version, nix::request_code_none!(KVMIO, 0x00));
    nix::ioctl_write_int_bad!(kvm_create_vm, nix::request_code_none!(KVMIO, 0x01));
    nix::ioctl_write_int_bad!(kvm_get_vcpu_mmap_size, nix::request_code_none!(KVMIO, 0x04));
    nix::ioctl_write_int_bad!(kvm_create_vcpu, nix::request_code_none!(KVMIO, 0x41));
    nix::ioctl_write_ptr!(
        kvm_set_user_memory_region,
        KVMIO,
        0x46,
        KvmUserspaceMemoryRegion
    );
    nix::ioctl_write_int_bad!(kvm_run, nix::request_code_none!(KVMIO, 0x80));
    nix::ioctl_read!(kvm_get_regs, KVMIO, 0x81, KvmRegs);
    nix::ioctl_write_ptr!(kvm_set_regs, KVMIO, 0x82, KvmRegs);
    nix::ioctl_read!(kvm_get_sregs, KVMIO, 0x83, KvmSregs);
    nix::ioctl_write_ptr!(kvm_set_sregs, KVMIO, 0x84, KvmSregs);

    /// struct kvm_userspace_memory_region
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct KvmUserspaceMemoryRegion {
        pub slot: u32,
        pub flags: u32,
        pub guest_phys_addr: u64,
        pub memory_size: u64,
        pub userspace_addr: u64,
    }

    /// struct kvm_regs (x86)
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct KvmRegs {
        pub rax: u64,
        pub rbx: u64,
        pub rcx: u64,
        pub rdx: u64,
        pub rsi: u64,
        pub rdi: u64,
        pub rsp: u64,
        pub rbp: u64,
        pub r8: u64,
        pub r9: u64,
        pub r10: u64,
        pub r11: u64,
        pub r12: u64,
        pub r13: u64,
        pub r14: u64,
        pub r15: u64,
        pub rip: u64,
        pub rflags: u64,
    }

    /// struct kvm_segment
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct KvmSegment {
        pub base: u64,
        pub limit: u32,
        pub selector: u16,
        pub type_: u8,
        pub present: u8,
        pub dpl: u8,
        pub db: u8,
        pub s: u8,
        pub l: u8,
        pub g: u8,
        pub avl: u8,
        pub unusable: u8,
        pub padding: u8,
    }

    /// struct kvm_dtable
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct KvmDtable {
        pub base: u64,
        pub limit: u16,
        pub padding: [u16; 3],
    }

    /// struct kvm_sregs (x86); KVM_NR_INTERRUPTS is 256.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct KvmSregs {
        pub cs: KvmSegment,
        pub ds: KvmSegment,
        pub es: KvmSegment,
        pub fs: KvmSegment,
        pub gs: KvmSegment,
        pub ss: KvmSegment,
        pub tr: KvmSegment,
        pub ldt: KvmSegment,
        pub gdt: KvmDtable,
        pub idt: KvmDtable,
        pub cr0: u64,
        pub cr2: u64,
        pub cr3: u64,
        pub cr4: u64,
        pub cr8: u64,
        pub efer: u64,
        pub apic_base: u64,
        pub interrupt_bitmap: [u64; 4],
    }

    /// The `io` member of kvm_run's exit union (KVM_EXIT_IO).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct KvmRunExitIo {
        pub direction: u8,
        pub size: u8,
        pub port: u16,
        pub count: u32,
        /// Offset of the data from the start of kvm_run.
        pub data_offset: u64,
    }

    /// The head of struct kvm_run, up to the only union member used here.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct KvmRun {
        pub request_interrupt_window: u8,
        pub immediate_exit: u8,
        pub padding1: [u8; 6],
        pub exit_reason: u32,
        pub ready_for_interrupt_injection: u8,
        pub if_flag: u8,
        pub flags: u16,
        pub cr8: u64,
        pub apic_base: u64,
        pub io: KvmRunExitIo,
    }

    // The ioctl numbers encode these sizes, so a layout slip would turn into
    // ENOTTY or memory corruption; pin them to the kernel's.
    const _: () = assert!(std::mem::size_of::<KvmUserspaceMemoryRegion>() == 32);
    const _: () = assert!(std::mem::size_of::<KvmRegs>() == 144);
    const _: () = assert!(std::mem::size_of::<KvmSegment>() == 24);
    const _: () = assert!(std::mem::size_of::<KvmDtable>() == 16);
    const _: () = assert!(std::mem::size_of::<KvmSregs>() == 312);
    const _: () = assert!(std::mem::offset_of!(KvmRun, exit_reason) == 8);
    const _: () = assert!(std::mem::offset_of!(KvmRun, io) == 32);
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
        let p = probe_with(CPUINFO_VMX, &dev);
        assert!(!p.usable);
        assert_eq!(p.reason, format!("{} does not exist", dev.display()));
        assert_eq!(p.fix.as_deref(), Some(FIX_LOAD_MODULE));
    }

    #[test]
    fn unopenable_device_names_the_errno() {
        let dir = tempfile::tempdir().unwrap();
        // Opening a directory read-write fails with EISDIR, even for root.
        let p = probe_with(CPUINFO_VMX, dir.path());
        assert!(!p.usable);
        assert_eq!(
            p.reason,
            format!("{} is not accessible: Is a directory", dir.path().display())
        );
    }

    #[test]
    fn cpu_without_vmx_or_svm_is_unusable() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let p = probe_with(CPUINFO_NO_VIRT, file.path());
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
        let p = probe_with(CPUINFO_NO_VIRT, &dir.path().join("kvm"));
        assert_eq!(p.reason, REASON_NO_VMX);
        assert_eq!(p.fix.as_deref(), Some(FIX_NESTED));
        let bare_metal = "processor\t: 0\nflags\t\t: fpu vme sse2\n\n";
        let p = probe_with(bare_metal, &dir.path().join("kvm"));
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
        let p = probe_with(CPUINFO_VMX, file.path());
        assert!(!p.usable);
        assert_eq!(
            p.reason,
            "KVM_GET_API_VERSION failed: Inappropriate ioctl for device (ENOTTY)"
        );
    }

    #[test]
    fn request_codes_match_linux_kvm_h() {
        use std::mem::size_of;
        use sys::*;
        assert_eq!(nix::request_code_none!(KVMIO, 0x00), 0xae00);
        assert_eq!(nix::request_code_none!(KVMIO, 0x80), 0xae80);
        assert_eq!(
            nix::request_code_write!(KVMIO, 0x46, size_of::<KvmUserspaceMemoryRegion>()),
            0x4020_ae46
        );
        assert_eq!(
            nix::request_code_read!(KVMIO, 0x81, size_of::<KvmRegs>()),
            0x8090_ae81
        );
        assert_eq!(
            nix::request_code_write!(KVMIO, 0x82, size_of::<KvmRegs>()),
            0x4090_ae82
        );
        assert_eq!(
            nix::request_code_read!(KVMIO, 0x83, size_of::<KvmSregs>()),
            0x8138_ae83
        );
        assert_eq!(
            nix::request_code_write!(KVMIO, 0x84, size_of::<KvmSregs>()),
            0x4138_ae84
        );
    }

    #[test]
    fn report_round_trips_and_describes() {
        let r = Report {
            stage: Stage::UnexpectedIo,
            errno: 22,
            a: pack_io(&sys::KvmRunExitIo {
                direction: 1,
                size: 2,
                port: 0x3f8,
                count: 1,
                data_offset: 4096,
            }),
            b: 0x41,
        };
        assert_eq!(Report::decode(&r.encode()), r);
        assert_eq!(unpack_io(r.a), (1, 2, 0x3f8, 1));
        for s in Stage::ALL {
            assert_eq!(Stage::from_u8(s as u8), s);
        }
        assert_eq!(Stage::from_u8(200), Stage::Garbled);

        let run = Report::failed(Stage::Run, Errno::EINVAL).describe();
        assert_eq!(
            run,
            Err(("KVM_RUN failed: Invalid argument (EINVAL)".to_owned(), None))
        );
        assert!(Report::new(Stage::Ran).describe().is_ok());
        let exit = Report::with(Stage::UnexpectedExit, 9, 0)
            .describe()
            .unwrap_err();
        assert!(exit.0.contains("KVM_EXIT_FAIL_ENTRY (9)"), "{}", exit.0);
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
        let cases: [(Option<Accel>, &KvmProbe, Accel, Option<&str>); 6] = [
            (None, &ok, Accel::Kvm, None),
            (None, &bad, Accel::Tcg, Some(&fallback)),
            (Some(Accel::Kvm), &ok, Accel::Kvm, None),
            (Some(Accel::Kvm), &bad, Accel::Tcg, Some(&refused)),
            (Some(Accel::Tcg), &ok, Accel::Tcg, None),
            (Some(Accel::Tcg), &bad, Accel::Tcg, None),
        ];
        for (requested, probe, accel, msg) in cases {
            let got = choose(requested.clone(), probe);
            assert_eq!(
                got,
                (accel, msg.map(str::to_owned)),
                "{requested:?} {probe:?}"
            );
            if let Some(line) = got.1 {
                assert!(!line.contains('\n'));
            }
        }
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

    #[test]
    fn real_probe_returns_promptly() {
        let start = Instant::now();
        let p = within(Duration::from_secs(5), probe);
        println!("probe() = {p:?} after {:?}", start.elapsed());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if !cpu_has_virt(&cpuinfo) {
            assert!(!p.usable, "{p:?}");
        }
    }

    /// /dev/kvm opened read-write, or a skip; in CI (`CI=true`), whose
    /// machines have /dev/kvm (it may not run guests), a failure: a missing
    /// prerequisite must not pass as a skip there.
    fn dev_kvm() -> Option<File> {
        match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            Ok(f) => Some(f),
            Err(e) => {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
                assert!(!ci, "prerequisite missing in CI: /dev/kvm ({e})");
                println!("SKIP: /dev/kvm not accessible ({e})");
                None
            }
        }
    }

    /// Exercises step 5 on the real /dev/kvm even when step 3 would stop the
    /// probe first, to check that the child process is always bounded.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn real_test_guest_is_bounded() {
        let Some(kvm) = dev_kvm() else { return };
        let start = Instant::now();
        let r = within(Duration::from_secs(5), move || {
            run_test_guest(&kvm, &GUEST_CODE)
        });
        println!("run_test_guest() = {r:?} after {:?}", start.elapsed());
    }

    /// A guest that spins forever (`jmp $`) must be killed at the timeout.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn spinning_test_guest_times_out() {
        let Some(kvm) = dev_kvm() else { return };
        let start = Instant::now();
        let r = within(Duration::from_secs(6), move || {
            run_test_guest(&kvm, &[0xeb, 0xfe])
        });
        let took = start.elapsed();
        println!("spinning guest: {r:?} after {took:?}");
        assert_eq!(r, Err((REASON_TIMEOUT.to_owned(), Some(FIX_NESTED))));
        assert!(took >= GUEST_TIMEOUT, "{took:?}");
    }
}
