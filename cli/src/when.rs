//! Points in time and ages as users write them on the command line (`--since 7d`,
//! `--until 2025-01-31`, `--older-than 2w`), turned into milliseconds since the epoch, and
//! times printed back (UTC).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A value that is not a time; the message names the flag and shows what works.
#[derive(Debug, thiserror::Error)]
#[error(
    "{flag}: `{value}` is not a time (use an age such as 7d or 2h30m, a date such as 2025-01-31, a UTC time such as 2025-01-31T12:00:00Z, or milliseconds since the epoch)"
)]
pub struct BadTime {
    pub flag: String,
    pub value: String,
}

/// Parses `value` relative to `now_ms`: an age (`7d` = seven days ago), a date (midnight
/// UTC), an RFC 3339 time (UTC when no offset is given), `now`, or epoch milliseconds.
pub fn parse_time(flag: &str, value: &str, now_ms: u64) -> Result<u64, BadTime> {
    let bad = || BadTime {
        flag: flag.to_string(),
        value: value.to_string(),
    };
    let v = value.trim();
    if v.eq_ignore_ascii_case("now") {
        return Ok(now_ms);
    }
    if v.len() >= 12 && v.chars().all(|c| c.is_ascii_digit()) {
        return v.parse().map_err(|_| bad());
    }
    if let Ok(age) = humantime::parse_duration(v) {
        return Ok(now_ms.saturating_sub(age.as_millis() as u64));
    }
    let text = if v.len() == 10 {
        format!("{v}T00:00:00Z")
    } else {
        v.to_string()
    };
    let t = humantime::parse_rfc3339_weak(&text).map_err(|_| bad())?;
    Ok(t.duration_since(UNIX_EPOCH).map_err(|_| bad())?.as_millis() as u64)
}

/// `2025-01-31T12:00:00Z`.
pub fn iso(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `12:00:01.234` (UTC), for transcripts.
pub fn clock(ms: u64) -> String {
    let t = humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
        .to_string();
    // 2025-01-31T12:00:01.234Z
    t.get(11..23).unwrap_or(&t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

    #[test]
    fn ages_dates_and_times_parse() {
        assert_eq!(
            parse_time("--since", "7d", NOW).unwrap(),
            NOW - 7 * 86_400_000
        );
        assert_eq!(
            parse_time("--since", "90m", NOW).unwrap(),
            NOW - 90 * 60_000
        );
        assert_eq!(parse_time("--since", "2026-01-01", NOW).unwrap(), NOW);
        assert_eq!(
            parse_time("--since", "2026-01-01T00:00:01Z", NOW).unwrap(),
            NOW + 1000
        );
        assert_eq!(parse_time("--until", "now", NOW).unwrap(), NOW);
        assert_eq!(parse_time("--until", &NOW.to_string(), 0).unwrap(), NOW);
        let err = parse_time("--since", "yesterday-ish", NOW).unwrap_err();
        assert!(
            err.to_string().starts_with("--since: `yesterday-ish`"),
            "{err}"
        );
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(iso(NOW), "2026-01-01T00:00:00Z");
        assert_eq!(clock(NOW + 1_234), "00:00:01.234");
    }
}
