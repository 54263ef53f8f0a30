//! RFC 3339 timestamps as ARP services write them (UTC, microseconds, `Z`).

use std::time::SystemTime;

/// The current time, e.g. `2026-11-21T12:00:00.123456Z`.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Parses an RFC 3339 timestamp (as written by [`rfc3339`] or with an offset of `Z`).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}
