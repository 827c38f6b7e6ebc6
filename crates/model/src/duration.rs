//! The one duration syntax of every Tributary setting: a number and a unit, `500ms`,
//! `90s`, `15m`, `36h`, `7d` (decimals allowed: `1.5s`).
//!
//! Invariants:
//! - A bare number (`36`) is refused, in TOML and in the environment alike: every
//!   setting used to read a bare number in its own unit (hours, milliseconds,
//!   seconds), so a unit-less value is ambiguous and never guessed. Legacy settings
//!   whose name carries the unit (`retention_hours`, `TRIBUTARY_WAREHOUSE_INTERVAL_MS`)
//!   are translated by the server's config loader before they reach this parser.
//! - Negative, empty, non-finite or overflowing values are refused.
//! - [`format`] writes what [`parse`] reads: `parse(&format(d)) == Ok(d)` for whole
//!   milliseconds.
//!
//! Use [`deserialize`] (or the module with `#[serde(with = "tributary_model::duration")]`)
//! on any `std::time::Duration` field.

use std::time::Duration;

/// A value that is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// No unit after the number.
    #[error(
        "{0:?} has no unit: write it with one of ms, s, m, h, d (e.g. 500ms, 90s, 15m, 36h, 7d)"
    )]
    NoUnit(String),
    /// An unknown unit.
    #[error("{0:?} has an unknown unit: use ms, s, m, h or d (e.g. 500ms, 90s, 15m, 36h, 7d)")]
    BadUnit(String),
    /// The number part does not parse, is negative or too large.
    #[error("{0:?} is not a duration (e.g. 500ms, 90s, 15m, 36h, 7d)")]
    Invalid(String),
}

/// Parses `500ms`, `90s`, `15m`, `36h`, `7d` (and decimals such as `1.5s`).
pub fn parse(value: &str) -> Result<Duration, DurationError> {
    let v = value.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = (&v[..split], v[split..].trim());
    if num.is_empty() || !num.bytes().any(|b| b.is_ascii_digit()) {
        return Err(DurationError::Invalid(value.to_string()));
    }
    let secs_per_unit = match unit {
        "" => return Err(DurationError::NoUnit(value.to_string())),
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(DurationError::BadUnit(value.to_string())),
    };
    // Whole numbers stay exact; decimals go through f64.
    if let Ok(n) = num.parse::<u64>() {
        let d = match unit {
            "ms" => Some(Duration::from_millis(n)),
            _ => n.checked_mul(secs_per_unit as u64).map(Duration::from_secs),
        };
        return d.ok_or_else(|| DurationError::Invalid(value.to_string()));
    }
    let n: f64 = num
        .parse()
        .map_err(|_| DurationError::Invalid(value.to_string()))?;
    Duration::try_from_secs_f64(n * secs_per_unit)
        .map_err(|_| DurationError::Invalid(value.to_string()))
}

/// Writes a duration in the largest unit that represents it exactly (`36h`, `90s`,
/// `1500ms`).
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    for (unit, per) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// Serde deserializer for a `Duration` field: a string in the syntax of [`parse`].
/// A bare TOML/JSON number is refused with the same message as a unit-less string.
pub fn deserialize<'de, D>(deserializer: D) -> Result<Duration, D::Error>
where
    D: serde::Deserializer<'de>,
{
    deserializer.deserialize_any(DurationVisitor)
}

/// Serde serializer for a `Duration` field, in the syntax of [`format`].
pub fn serialize<S>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error>
where
    S: serde::Serializer,
{
    serializer.serialize_str(&format(*d))
}

struct DurationVisitor;

impl serde::de::Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a duration with a unit, e.g. \"500ms\", \"90s\", \"15m\", \"36h\", \"7d\"")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
        Err(E::custom(DurationError::NoUnit(v.to_string())))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
        Err(E::custom(DurationError::NoUnit(v.to_string())))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Duration, E> {
        Err(E::custom(DurationError::NoUnit(v.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse("36h"), Ok(Duration::from_secs(36 * 3600)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse(" 1.5s "), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("2 h"), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn bare_numbers_and_garbage_are_refused() {
        assert!(matches!(parse("36"), Err(DurationError::NoUnit(_))));
        assert!(matches!(parse("0"), Err(DurationError::NoUnit(_))));
        assert!(matches!(parse("3w"), Err(DurationError::BadUnit(_))));
        assert!(matches!(parse("-1s"), Err(DurationError::Invalid(_))));
        assert!(matches!(parse(""), Err(DurationError::Invalid(_))));
        assert!(matches!(parse("s"), Err(DurationError::Invalid(_))));
        assert!(matches!(parse("1.2.3s"), Err(DurationError::Invalid(_))));
        assert!(matches!(
            parse("99999999999999999999d"),
            Err(DurationError::Invalid(_))
        ));
        assert!(parse("36").unwrap_err().to_string().contains("no unit"));
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::from_millis(1500),
            Duration::from_secs(90),
            Duration::from_secs(36 * 3600),
            Duration::from_secs(7 * 86_400),
            Duration::ZERO,
        ] {
            assert_eq!(parse(&format(d)), Ok(d), "{}", format(d));
        }
        assert_eq!(format(Duration::from_secs(36 * 3600)), "36h");
        assert_eq!(format(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn serde_reads_strings_and_refuses_numbers() {
        #[derive(serde::Deserialize)]
        struct S {
            #[serde(with = "super")]
            d: Duration,
        }
        let s: S = serde_json::from_str(r#"{"d":"36h"}"#).unwrap();
        assert_eq!(s.d, Duration::from_secs(36 * 3600));
        let e = serde_json::from_str::<S>(r#"{"d":36}"#).err().unwrap();
        assert!(e.to_string().contains("no unit"), "{e}");
    }
}
