//! Time as the participant uses it: the `createdAt` text of new headers and the `madeAt` stamp
//! of its writes. The clock itself is an input (`now`, epoch milliseconds).
//!
//! The stamp exists because permissions are checked at a transaction's own `madeAt`: a server
//! whose clock lags the human who added it would otherwise write at a time when it was not yet a
//! member, and those writes would be invalid forever (docs/protocols/cojson-participant.md §11).

use thiserror::Error;

/// The largest time a JavaScript `Date` can hold (±8.64e15 ms); cojson cannot read beyond it.
pub const MAX_JS_DATE_MS: u64 = 8_640_000_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("time {0} ms is beyond what a JavaScript Date can represent")]
pub struct TimeOutOfRange(pub u64);

/// `new Date(ms).toISOString()`: `YYYY-MM-DDTHH:MM:SS.mmmZ` (years past 9999 as `+YYYYYY`).
pub fn iso_timestamp(ms: u64) -> Result<String, TimeOutOfRange> {
    if ms > MAX_JS_DATE_MS {
        return Err(TimeOutOfRange(ms));
    }
    let days = ms / 86_400_000;
    let in_day = ms % 86_400_000;
    let (year, month, day) = civil_from_days(days);
    let (h, m, s, milli) = (in_day / 3_600_000, in_day / 60_000 % 60, in_day / 1000 % 60, in_day % 1000);
    let year = if year <= 9999 { format!("{year:04}") } else { format!("+{year:06}") };
    Ok(format!("{year}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z"))
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The `madeAt` of a new write: `now`, but never before a transaction another session already
/// wrote in the target CoValue or its owner group (plus one millisecond, so it sorts after it),
/// and never before our own session's previous transaction in the target (which keeps our own
/// order; equal values are ordered by index). Our current session does not push the stamp: a
/// role we granted ourselves at `t` already holds at `t`.
pub fn stamp(now: u64, newest_other: Option<u64>, newest_own: Option<u64>) -> u64 {
    let after_others = newest_other.map_or(0, |t| t.saturating_add(1));
    now.max(after_others).max(newest_own.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_like_javascript() {
        assert_eq!(iso_timestamp(0).unwrap(), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_timestamp(1_767_225_600_000).unwrap(), "2026-01-01T00:00:00.000Z");
        assert_eq!(iso_timestamp(1_767_225_900_001).unwrap(), "2026-01-01T00:05:00.001Z");
        assert_eq!(iso_timestamp(951_782_400_000).unwrap(), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso_timestamp(253_402_300_799_999).unwrap(), "9999-12-31T23:59:59.999Z");
        assert_eq!(iso_timestamp(253_402_300_800_000).unwrap(), "+010000-01-01T00:00:00.000Z");
        assert_eq!(iso_timestamp(MAX_JS_DATE_MS).unwrap(), "+275760-09-13T00:00:00.000Z");
        assert_eq!(iso_timestamp(MAX_JS_DATE_MS + 1), Err(TimeOutOfRange(MAX_JS_DATE_MS + 1)));
    }

    #[test]
    fn stamp_rules() {
        assert_eq!(stamp(100, None, None), 100);
        assert_eq!(stamp(100, Some(99), Some(100)), 100);
        assert_eq!(stamp(100, Some(100), None), 101, "after another session's write");
        assert_eq!(stamp(100, Some(150), None), 151, "a lagging clock still writes after the grant");
        assert_eq!(stamp(100, None, Some(120)), 120, "own order kept, not pushed");
        assert_eq!(stamp(100, Some(u64::MAX), None), u64::MAX);
    }
}
