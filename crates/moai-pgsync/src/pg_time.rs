//! Postgres timestamps (µs since 2000-01-01 UTC) to RFC 3339 text.
//!
//! The wire protocol shows `commit_time` as ISO text; doing the civil-date arithmetic here keeps
//! the core free of a date crate and of clocks.

/// Seconds from 1970-01-01 to 2000-01-01.
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// `2026-11-22T03:04:05.123Z` (millisecond precision, as `commit_time` in docs/pgsync-protocol.md
/// §4). Values outside years 0..=9999 are clamped to those bounds rather than producing a
/// malformed string.
pub fn to_rfc3339(pg_micros: i64) -> String {
    let unix_ms = (pg_micros.div_euclid(1000)).saturating_add(PG_EPOCH_UNIX_SECS * 1000);
    // 0000-01-01 and 9999-12-31T23:59:59.999 in unix milliseconds.
    let unix_ms = unix_ms.clamp(-62_167_219_200_000, 253_402_300_799_999);
    let days = unix_ms.div_euclid(86_400_000);
    let ms_of_day = unix_ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's well-known algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_known_instants() {
        assert_eq!(to_rfc3339(0), "2000-01-01T00:00:00.000Z");
        // 2026-11-22T03:04:05.123456Z = unix 1795316645.123456
        let pg = (1_795_316_645 - PG_EPOCH_UNIX_SECS) * 1_000_000 + 123_456;
        assert_eq!(to_rfc3339(pg), "2026-11-22T03:04:05.123Z");
        // Leap day and pre-2000 values.
        let leap = (951_782_400 - PG_EPOCH_UNIX_SECS) * 1_000_000; // 2000-02-29
        assert_eq!(to_rfc3339(leap), "2000-02-29T00:00:00.000Z");
        assert_eq!(to_rfc3339(-1), "1999-12-31T23:59:59.999Z");
    }

    #[test]
    fn extremes_do_not_panic_and_stay_well_formed() {
        assert_eq!(to_rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(to_rfc3339(i64::MIN), "0000-01-01T00:00:00.000Z");
    }
}
