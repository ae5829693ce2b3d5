//! The C library calls the init makes (std has no wrapper for them), and
//! the ways it logs, fails and powers off.

use std::ffi::CString;
use std::io::{self, Write};

unsafe extern "C" {
    pub fn mount(
        src: *const i8,
        target: *const i8,
        fstype: *const i8,
        flags: u64,
        data: *const i8,
    ) -> i32;
    pub fn chroot(path: *const i8) -> i32;
    pub fn sethostname(name: *const u8, len: usize) -> i32;
    pub fn reboot(cmd: i32) -> i32;
    pub fn sync();
    pub fn syscall(n: i64, ...) -> i64;
    pub fn setsid() -> i32;
    pub fn ioctl(fd: i32, req: u64, ...) -> i32;
    pub fn chown(path: *const i8, uid: u32, gid: u32) -> i32;
    pub fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    pub fn close(fd: i32) -> i32;
    pub fn setsockopt(fd: i32, level: i32, name: i32, val: *const u8, len: u32) -> i32;
    pub fn kill(pid: i32, sig: i32) -> i32;
}
pub const RB_POWER_OFF: i32 = 0x4321fedc;

/// The syscall numbers libc has no wrapper for, per architecture (the
/// init is built for the host's, as the guest is: src/arch.rs).
#[cfg(target_arch = "x86_64")]
pub mod nr {
    pub const FINIT_MODULE: i64 = 313;
    pub const DELETE_MODULE: i64 = 176;
}

pub fn log(msg: &str) {
    // The console is the serial line: the host shows it on failure.
    let _ = writeln!(io::stderr(), "mkt-init: {msg}");
}

pub fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

pub fn poweroff() -> ! {
    // SAFETY: sync and reboot take no pointers; PID 1 may power off.
    unsafe {
        sync();
        reboot(RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

pub fn fail(msg: &str) -> ! {
    log(msg);
    log("cannot continue; powering off");
    poweroff()
}
