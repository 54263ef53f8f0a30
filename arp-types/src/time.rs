//! RFC 3339 timestamps as ARP services write them (UTC, microseconds, `Z`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The current time, e.g. `2026-11-21T12:00:00.123456Z`.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// `t` as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC, microseconds), the form
/// `humantime::format_rfc3339_micros` writes.
///
/// Every execution result carries two of these, so they are written straight
/// into a 27-byte buffer rather than through `fmt`. A time outside the years
/// 1970–9999 (a clock gone wrong) is written as the nearest end of that range
/// rather than panicking as humantime does.
pub fn rfc3339(t: SystemTime) -> String {
    let since_epoch = match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() < MAX_SECS => d,
        Ok(_) => Duration::new(MAX_SECS - 1, 999_999_999),
        Err(_) => Duration::ZERO,
    };
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut out[0..4], u64::from(year));
    put_digits(&mut out[5..7], u64::from(month));
    put_digits(&mut out[8..10], u64::from(day));
    put_digits(&mut out[11..13], of_day / 3600);
    put_digits(&mut out[14..16], of_day % 3600 / 60);
    put_digits(&mut out[17..19], of_day % 60);
    put_digits(&mut out[20..26], u64::from(since_epoch.subsec_micros()));
    // Only ASCII digits were written over an ASCII template.
    String::from_utf8(out.to_vec()).expect("ASCII")
}

/// 10000-01-01T00:00:00Z: the first second with a five-digit year.
const MAX_SECS: u64 = 253_402_300_800;

/// Writes `value`'s last `out.len()` decimal digits into `out`, zero-padded.
fn put_digits(out: &mut [u8], mut value: u64) {
    for b in out.iter_mut().rev() {
        *b = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (day 0),
/// after Howard Hinnant's `civil_from_days`: eras of 400 years, and years that
/// start on March 1 so the leap day is the last day of its year.
fn civil_from_days(days: u64) -> (u32, u32, u32) {
    // 719_468 days from 0000-03-01 to 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year as u32, month as u32, day as u32)
}

/// Parses an RFC 3339 timestamp (as written by [`rfc3339`] or with an offset of `Z`).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn humantime(t: SystemTime) -> String {
        humantime::format_rfc3339_micros(t).to_string()
    }

    #[test]
    fn agrees_with_humantime_on_edges_of_days_months_and_leap_years() {
        let days = [
            0u64,      // 1970-01-01
            58,        // 1970-02-28
            59,        // 1970-03-01
            789,       // 1972-02-29
            790,       // 1972-03-01
            10_956,    // 1999-12-31
            10_957,    // 2000-01-01
            11_016,    // 2000-02-29 (a leap year divisible by 400)
            47_540,    // 2100-02-28
            47_541,    // 2100-03-01 (2100 is no leap year)
            2_932_896, // 9999-12-31
        ];
        for day in days {
            for of_day in [0u64, 1, 59, 3_599, 43_200, 86_399] {
                for micros in [0u32, 1, 999_999] {
                    let t = UNIX_EPOCH
                        + Duration::from_secs(day * 86_400 + of_day)
                        + Duration::from_micros(u64::from(micros));
                    assert_eq!(rfc3339(t), humantime(t), "day {day} second {of_day}");
                }
            }
        }
    }

    #[test]
    fn agrees_with_humantime_across_the_range() {
        // A fixed walk up to the year 9999 with a stride of about 90 days
        // and an odd number of nanoseconds, so it lands on varied days,
        // months and sub-microsecond remainders (which must round down).
        let mut nanos: u128 = 0;
        let end = u128::from(MAX_SECS) * 1_000_000_000;
        while nanos < end {
            let secs = (nanos / 1_000_000_000) as u64;
            let t = UNIX_EPOCH + Duration::new(secs, (nanos % 1_000_000_000) as u32);
            assert_eq!(rfc3339(t), humantime(t));
            nanos += 7_777_777_777_777_777; // ~90 days and a bit
        }
        let now = SystemTime::now();
        assert_eq!(rfc3339(now), humantime(now));
    }

    #[test]
    fn times_outside_the_four_digit_years_are_clamped_not_a_panic() {
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00.000000Z");
        let last = UNIX_EPOCH + Duration::from_secs(MAX_SECS - 1);
        assert_eq!(rfc3339(last), "9999-12-31T23:59:59.000000Z");
        let after = UNIX_EPOCH + Duration::from_secs(MAX_SECS + 86_400);
        assert_eq!(rfc3339(after), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn round_trips_through_the_parser() {
        let t = UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456);
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
    }
}
