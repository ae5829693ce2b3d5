//! The kernel command line: mkt's words, the user's, and the checks that it
//! fits and means what the run needs.

use super::error::RunError;
use super::request::RunOptions;
use crate::host::{self, kvm};
use crate::vm::qemu::{self, Profile, VmSpec};
use std::io::Read;

/// The kernel's command line: the console, mkt's words, the user's.
pub(crate) fn kernel_words(
    opts: &RunOptions,
    exec: bool,
    profile: &Profile,
    accel: &kvm::Accel,
) -> Vec<String> {
    let console = format!("console={}", crate::arch::HOST.console);
    let mut append = vec![console, "panic=-1".into()];
    if exec && !opts.verbose {
        // Less serial output: under TCG every console byte costs time.
        append.push("quiet".into());
    }
    append.extend(opts.append.iter().cloned());
    if opts.gdb_port.is_some() {
        gdb_nokaslr(&mut append);
    }
    if let Some(w) = tsc_word(profile, accel, &append, host::tsc::khz) {
        append.insert(kernel_words_end(&append), w);
    }
    append
}

/// Where the kernel's words end: at a `--` (init's words follow), else the end.
pub(crate) fn kernel_words_end(append: &[String]) -> usize {
    append
        .iter()
        .position(|w| w == "--")
        .unwrap_or(append.len())
}

/// `tsc_early_khz=<host TSC>` for microvm under TCG: microvm has no HPET
/// and no ACPI PM timer, so when the kernel's quick PIT calibration fails
/// (often, on a loaded host) it has no TSC frequency and hangs calibrating
/// the delay loop. Under TCG the guest TSC is the host's, so the host's
/// frequency is right. Not when --append already sets it.
pub(crate) fn tsc_word(
    profile: &Profile,
    accel: &kvm::Accel,
    append: &[String],
    host_khz: impl FnOnce() -> Option<u64>,
) -> Option<String> {
    let microvm = profile.machine.split(',').next() == Some("microvm");
    if !microvm || *accel != kvm::Accel::Tcg {
        return None;
    }
    if append[..kernel_words_end(append)]
        .iter()
        .any(|w| w.starts_with("tsc_early_khz="))
    {
        return None;
    }
    host_khz().map(|k| format!("tsc_early_khz={k}"))
}

/// With the gdb stub, the kernel boots with `nokaslr` (before any `--`, so
/// the kernel reads it), so that vmlinux's symbol addresses are the running
/// kernel's; an explicit `kaslr`/`nokaslr` in --append is left alone.
pub(crate) fn gdb_nokaslr(append: &mut Vec<String>) {
    let kernel_words = kernel_words_end(append);
    if !append[..kernel_words]
        .iter()
        .any(|w| w == "kaslr" || w == "nokaslr")
    {
        append.insert(kernel_words, "nokaslr".into());
    }
}

/// Refuses a kernel command line longer than the kernel takes: QEMU would
/// boot it cut short (or not at all), with nothing on the console.
pub(crate) fn check_cmdline(spec: &VmSpec) -> Result<(), RunError> {
    let mut head = Vec::with_capacity(0x240);
    if let Ok(f) = std::fs::File::open(&spec.kernel) {
        let _ = f.take(0x240).read_to_end(&mut head);
    }
    let (len, limit) = (qemu::cmdline(spec).len(), qemu::cmdline_limit(&head));
    if len > limit {
        return Err(RunError::CmdlineTooLong {
            len,
            limit,
            kernel: spec.kernel.clone(),
        });
    }
    Ok(())
}
