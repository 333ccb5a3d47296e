//! The host's TSC frequency, for the guest's `tsc_early_khz=`.
//!
//! Under TCG the guest's time-stamp counter is the host's, so the host rate is exactly
//! what the guest kernel should assume. Linux exports it when it knows it
//! (`tsc_freq_khz`, not present on every kernel); otherwise it is measured once against
//! `CLOCK_MONOTONIC`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where some kernels publish the TSC rate.
const SYSFS_TSC_KHZ: &str = "/sys/devices/system/cpu/cpu0/tsc_freq_khz";
/// How long the calibration measures: long enough that the few tens of nanoseconds
/// between reading the TSC and the clock are a few parts per million, short enough not
/// to show in start-up time.
const CALIBRATION: Duration = Duration::from_millis(25);
/// Plausible TSC rates (100 MHz ..= 20 GHz); anything else means the measurement is wrong
/// and the guest is better off calibrating itself.
const PLAUSIBLE_KHZ: std::ops::RangeInclusive<u64> = 100_000..=20_000_000;

/// The host TSC frequency in kHz, or `None` if it cannot be known (not x86-64, or an
/// implausible measurement). Measured at most once per process.
pub fn host_tsc_khz() -> Option<u64> {
    static CACHE: OnceLock<Option<u64>> = OnceLock::new();
    *CACHE.get_or_init(|| {
        let khz = match std::fs::read_to_string(SYSFS_TSC_KHZ) {
            Ok(text) => parse_sysfs(&text),
            Err(_) => None,
        };
        khz.or_else(calibrate).filter(|k| PLAUSIBLE_KHZ.contains(k))
    })
}

/// Parse the sysfs file (a decimal number and a newline).
fn parse_sysfs(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// kHz from `ticks` TSC ticks counted over `elapsed`, rounded to the nearest kHz.
fn khz_from(ticks: u64, elapsed: Duration) -> Option<u64> {
    let nanos = u64::try_from(elapsed.as_nanos()).ok().filter(|&n| n > 0)?;
    // ticks / (nanos / 1e6) kHz, computed in u128 so a huge tick count cannot overflow.
    let scaled = u128::from(ticks).checked_mul(1_000_000)?;
    let rounded = scaled.checked_add(u128::from(nanos / 2))? / u128::from(nanos);
    u64::try_from(rounded).ok()
}

/// Count TSC ticks across a short sleep.
#[cfg(target_arch = "x86_64")]
fn calibrate() -> Option<u64> {
    use core::arch::x86_64::_rdtsc;
    // SAFETY: RDTSC exists on every x86-64 CPU and only reads a counter.
    let (t0, c0) = (Instant::now(), unsafe { _rdtsc() });
    std::thread::sleep(CALIBRATION);
    // SAFETY: as above.
    let (c1, t1) = (unsafe { _rdtsc() }, Instant::now());
    khz_from(c1.checked_sub(c0)?, t1.duration_since(t0))
}

/// No TSC to measure on other architectures.
#[cfg(not(target_arch = "x86_64"))]
fn calibrate() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn khz_rounds_to_nearest() {
        let elapsed = Duration::from_millis(20);

        let khz = khz_from(41_901_570, elapsed);

        assert_eq!(khz, Some(2_095_079));
    }

    #[test]
    fn khz_of_zero_duration_is_none() {
        assert_eq!(khz_from(1000, Duration::ZERO), None);
    }

    #[test]
    fn khz_of_huge_count_does_not_overflow() {
        assert_eq!(khz_from(u64::MAX, Duration::from_nanos(1)), None);
    }

    #[test]
    fn sysfs_value_is_parsed() {
        assert_eq!(parse_sysfs("2095078\n"), Some(2_095_078));
    }

    #[test]
    fn host_value_is_plausible_and_cached() {
        let first = host_tsc_khz();

        let second = host_tsc_khz();

        assert!(
            first.is_some_and(|k| PLAUSIBLE_KHZ.contains(&k)),
            "{first:?}"
        );
        assert_eq!(first, second);
    }
}
