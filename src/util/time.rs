//! Wall-clock time as mkt records and shows it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the epoch (0 if the clock is before it).
pub(crate) fn epoch_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds since the epoch as RFC 3339 UTC: `2026-11-29T10:37:51Z`.
pub(crate) fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Now, as `2026-11-29T10:37:51Z`.
pub(crate) fn rfc3339_now() -> String {
    rfc3339(epoch_secs())
}

/// Now as `YYYYmmdd-HHMMSS` (UTC), for log file names.
pub(crate) fn compact_now() -> String {
    compact(epoch_secs())
}

fn compact(secs: u64) -> String {
    // "YYYY-mm-ddTHH:MM:SSZ" -> "YYYYmmdd-HHMMSS"
    let t = rfc3339(secs);
    format!(
        "{}{}{}-{}{}{}",
        &t[0..4],
        &t[5..7],
        &t[8..10],
        &t[11..13],
        &t[14..16],
        &t[17..19]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(compact(1_795_000_000), "20261118-110640");
    }

    #[test]
    fn now_is_now() {
        let before = epoch_secs();
        let t = rfc3339_now();
        assert!(t.ends_with('Z') && t.len() == 20, "{t}");
        assert!(rfc3339_now() >= rfc3339(before));
    }
}
