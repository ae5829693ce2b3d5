//! The host's TSC frequency. Under TCG on an x86_64 host, QEMU's guest TSC
//! is the host's TSC, so this is the guest's TSC frequency too: a guest
//! without a reference clock (microvm has no HPET, no ACPI PM timer, and its
//! PIT calibration fails under load) is told it with `tsc_early_khz=`.

use std::time::{Duration, Instant};

/// The host TSC frequency in kHz, measured against the monotonic clock
/// (median of three 5 ms samples, ~2 ms of error at worst under load is
/// well within the 1% the kernel's delays need). `None` on other
/// architectures or when the samples make no sense.
pub(crate) fn khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut samples: Vec<u64> = (0..3)
            .filter_map(|_| sample(Duration::from_millis(5)))
            .collect();
        samples.sort_unstable();
        samples.get(samples.len() / 2).copied()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

#[cfg(target_arch = "x86_64")]
fn sample(wait: Duration) -> Option<u64> {
    let rdtsc = || {
        // SAFETY: RDTSC exists on every x86_64 CPU and only reads a counter.
        #[allow(unused_unsafe)]
        unsafe {
            core::arch::x86_64::_rdtsc()
        }
    };
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(wait);
    let (c1, t1) = (rdtsc(), Instant::now());
    let nanos = t1.duration_since(t0).as_nanos() as u64;
    let khz = c1.checked_sub(c0)?.checked_mul(1_000_000)? / nanos.max(1);
    // A TSC below 100 MHz or above 20 GHz is a broken sample.
    (100_000..20_000_000).contains(&khz).then_some(khz)
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn measures_a_plausible_frequency_twice_alike() {
        let (a, b) = (super::khz().unwrap(), super::khz().unwrap());
        assert!((100_000..20_000_000).contains(&a), "{a}");
        // Two measurements agree within 5% even on a loaded machine.
        assert!(a.abs_diff(b) * 20 < a, "{a} vs {b}");
    }
}
