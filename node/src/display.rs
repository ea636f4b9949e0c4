//! How the command-line tools show numbers and times to people, in tables: metrics with a
//! fixed number of decimals, history times in local time with the time since the job was
//! submitted. `--json` output never goes through here; it keeps the raw values.

use serde_json::Value;
use time::{OffsetDateTime, UtcOffset};

/// Decimals of a metric in a table.
pub const METRIC_DECIMALS: usize = 4;

/// A metric for a table: `0.9370` for `0.9370000000000002`. A value that would show as zero
/// at [`METRIC_DECIMALS`] but is not (DP's δ = 1e-5) keeps four significant digits in
/// scientific notation (`1.000e-5`), so it does not read as `0.0000`.
pub fn metric(x: f64) -> String {
    let smallest = 0.5 * 10f64.powi(-(METRIC_DECIMALS as i32));
    if x != 0.0 && x.abs() < smallest {
        format!("{x:.3e}")
    } else {
        format!("{x:.METRIC_DECIMALS$}")
    }
}

/// A JSON value for a table: a float as [`metric`], an integer as it is, a string without
/// quotes, a missing value as `-`.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_f64() => n.as_f64().map_or_else(|| n.to_string(), metric),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Unix milliseconds as the local time, `2026-12-06 23:41:05`; where the local offset cannot
/// be found, as UTC, saying so: `2026-12-06 22:41:05 UTC`.
pub fn local_time(ms: u64) -> String {
    let at = at(ms);
    clock(at, UtcOffset::local_offset_at(at).ok())
}

/// `at` in the zone `offset` (`None`: UTC, marked ` UTC`), to the second.
fn clock(at: OffsetDateTime, offset: Option<UtcOffset>) -> String {
    let t = at.to_offset(offset.unwrap_or(UtcOffset::UTC));
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}{}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        if offset.is_some() { "" } else { " UTC" }
    )
}

fn at(ms: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The time from `start_ms` to `ms`: `+12.3s` under a minute, `+4m05s` under an hour, then
/// `+2h03m09s` (to the nearest second). A time before the start (another clock) shows as
/// `+0.0s`.
pub fn since(start_ms: u64, ms: u64) -> String {
    let d = ms.saturating_sub(start_ms);
    // 59.95 s and more would print as `+60.0s`.
    if d < 59_950 {
        return format!("+{:.1}s", d as f64 / 1000.0);
    }
    let s = (d + 500) / 1000;
    if s < 3600 {
        format!("+{}m{:02}s", s / 60, s % 60)
    } else {
        format!("+{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn metrics_show_four_decimals_and_integers_stay_integers() {
        for (v, shown) in [
            (json!(0.9370000000000002), "0.9370"),
            (json!(0.16072039520415957), "0.1607"),
            (json!(2.31567717370979), "2.3157"),
            (json!(1.0), "1.0000"),
            (json!(0.0), "0.0000"),
            (json!(-0.5), "-0.5000"),
            (json!(1e-5), "1.000e-5"),
            (json!(-2.5e-7), "-2.500e-7"),
            (json!(0.00006), "0.0001"),
            (json!(0.00004), "4.000e-5"),
            (json!(12345.678901), "12345.6789"),
            (json!(3), "3"),
            (json!(-7), "-7"),
            (json!(u64::MAX), "18446744073709551615"),
            (json!("site-1"), "site-1"),
            (Value::Null, "-"),
        ] {
            assert_eq!(cell(&v), shown, "{v}");
        }
    }

    #[test]
    fn times_show_the_clock_in_a_zone_or_utc() {
        // 2024-02-29 12:34:56.789 UTC.
        let t = at(1_709_210_096_789);
        assert_eq!(clock(t, None), "2024-02-29 12:34:56 UTC");
        let ist = UtcOffset::from_hms(5, 30, 0).unwrap();
        assert_eq!(clock(t, Some(ist)), "2024-02-29 18:04:56");
        let west = UtcOffset::from_hms(-13, 0, 0).unwrap();
        assert_eq!(clock(t, Some(west)), "2024-02-28 23:34:56");
        assert_eq!(clock(at(0), Some(UtcOffset::UTC)), "1970-01-01 00:00:00");
    }

    #[test]
    fn time_since_submit_grows_units() {
        for (start, ms, shown) in [
            (1_000, 1_000, "+0.0s"),
            (1_000, 13_300, "+12.3s"),
            (0, 59_949, "+59.9s"),
            (0, 59_950, "+1m00s"),
            (0, 245_400, "+4m05s"),
            (0, 245_500, "+4m06s"),
            (0, 7_389_000, "+2h03m09s"),
            (5_000, 1_000, "+0.0s"),
        ] {
            assert_eq!(since(start, ms), shown, "{start} → {ms}");
        }
    }
}
