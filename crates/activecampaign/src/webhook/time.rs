//! ActiveCampaign dates → UTC instants and Segment timestamp strings.
//!
//! `date_time` in a webhook is ISO-8601 with the account's UTC offset
//! (`2024-02-28T07:04:13-06:00`); other ActiveCampaign dates are naive
//! (`2024-02-28 04:36:09`), date-only (`2024-03-07`) or all zeros
//! (`0000-00-00 00:00:00`).
//!
//! Invariants:
//! - An offset, when present, is always applied: the result is the same instant in UTC.
//! - A naive date-time is read as UTC ([`parse_date_time`]) or in a given offset
//!   ([`parse_date_time_in`], the API's account time zone); a bare date as midnight there.
//! - Zero dates, empty strings, garbage and instants outside 1970-01-01 ..= 9999-12-31
//!   give `None` (the caller then omits `timestamp`, and ingest uses the receive time).
//! - [`segment_timestamp`] always renders `YYYY-MM-DDTHH:MM:SS.mmmZ`.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc};

/// Date-time layouts carrying an offset, tried after RFC 3339.
const WITH_OFFSET: [&str; 2] = ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"];
/// Naive date-time layouts, read as UTC.
const NAIVE: [&str; 4] = [
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
];

/// Parses an ActiveCampaign date into a UTC instant; see the module docs for the
/// accepted forms. Never panics.
pub fn parse_date_time(raw: &str) -> Option<DateTime<Utc>> {
    parse_date_time_in(raw, FixedOffset::east_opt(0)?)
}

/// [`parse_date_time`], reading naive date-times and bare dates in `zone` (the
/// account's UTC offset) instead of UTC. An offset in the text still wins.
pub fn parse_date_time_in(raw: &str, zone: FixedOffset) -> Option<DateTime<Utc>> {
    let s = raw.trim();
    if s.is_empty() || s.len() > 64 || s.starts_with("0000-00-00") {
        return None;
    }
    let parsed = DateTime::parse_from_rfc3339(s)
        .ok()
        .or_else(|| {
            WITH_OFFSET
                .iter()
                .find_map(|f| DateTime::parse_from_str(s, f).ok())
        })
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| {
            NAIVE
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
                .or_else(|| {
                    NaiveDate::parse_from_str(s, "%Y-%m-%d")
                        .ok()
                        .and_then(|d| d.and_hms_opt(0, 0, 0))
                })
                .and_then(|t| zone.from_local_datetime(&t).single())
                .map(|t| t.with_timezone(&Utc))
        })?;
    let lo = Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).single()?;
    let hi = Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).single()?;
    (lo..=hi).contains(&parsed).then_some(parsed)
}

/// Renders an instant the way Segment does: UTC, milliseconds, `Z`.
pub fn segment_timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Option<String> {
        parse_date_time(s).map(segment_timestamp)
    }

    #[test]
    fn applies_negative_offset() {
        assert_eq!(
            ts("2024-02-28T07:04:13-06:00").as_deref(),
            Some("2024-02-28T13:04:13.000Z")
        );
    }

    #[test]
    fn applies_half_hour_positive_offset() {
        assert_eq!(
            ts("2024-02-28T07:04:13+05:30").as_deref(),
            Some("2024-02-28T01:34:13.000Z")
        );
    }

    #[test]
    fn keeps_z_and_fraction() {
        assert_eq!(
            ts("2024-02-28T07:04:13.25Z").as_deref(),
            Some("2024-02-28T07:04:13.250Z")
        );
    }

    #[test]
    fn accepts_offset_without_colon_and_space_separator() {
        assert_eq!(
            ts("2024-02-28T07:04:13-0600").as_deref(),
            Some("2024-02-28T13:04:13.000Z")
        );
        assert_eq!(
            ts("2024-02-28 07:04:13-06:00").as_deref(),
            Some("2024-02-28T13:04:13.000Z")
        );
    }

    #[test]
    fn crosses_midnight_and_year() {
        assert_eq!(
            ts("2023-12-31T20:30:00-05:00").as_deref(),
            Some("2024-01-01T01:30:00.000Z")
        );
    }

    #[test]
    fn reads_naive_as_utc() {
        assert_eq!(
            ts("2024-02-28 04:36:09").as_deref(),
            Some("2024-02-28T04:36:09.000Z")
        );
        assert_eq!(
            ts("2024-02-28T04:36:09").as_deref(),
            Some("2024-02-28T04:36:09.000Z")
        );
        assert_eq!(
            ts(" 2024-03-07 ").as_deref(),
            Some("2024-03-07T00:00:00.000Z")
        );
    }

    #[test]
    fn reads_naive_in_the_account_offset_but_keeps_explicit_offsets() {
        let cdt = FixedOffset::west_opt(5 * 3600).unwrap();
        let at = |s: &str| parse_date_time_in(s, cdt).map(segment_timestamp);
        assert_eq!(
            at("2024-02-28 04:36:09").as_deref(),
            Some("2024-02-28T09:36:09.000Z")
        );
        assert_eq!(
            at("2024-03-07").as_deref(),
            Some("2024-03-07T05:00:00.000Z")
        );
        assert_eq!(
            at("2024-02-28T04:36:09+00:00").as_deref(),
            Some("2024-02-28T04:36:09.000Z")
        );
        assert_eq!(at("0000-00-00 00:00:00"), None);
        assert_eq!(at("0000-00-00"), None);
    }

    #[test]
    fn rejects_zero_empty_and_garbage() {
        for s in [
            "",
            "   ",
            "0000-00-00 00:00:00",
            "0000-00-00",
            "yesterday",
            "2024-13-01T00:00:00Z",
            "2024-02-30 10:00:00",
            "1969-12-31T23:59:59Z",
            "1700000000",
        ] {
            assert_eq!(ts(s), None, "{s:?} should not parse");
        }
    }
}
