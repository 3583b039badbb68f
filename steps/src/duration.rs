//! Durations in workflow files are human strings: `500ms`, `30s`, `5m`, `1h 30m`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses a human duration (humantime syntax).
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?} ({e}); use e.g. \"500ms\", \"30s\", \"5m\", \"1h\""))
}

/// Serde helper for a required duration field.
pub fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// Serde helper for an optional duration field.
pub fn de_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(text) => parse(&text).map(Some).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_human_durations() {
        assert_eq!(super::parse("1h 30m").unwrap().as_secs(), 5400);
        assert_eq!(super::parse("250ms").unwrap().as_millis(), 250);
        assert!(super::parse("soon").unwrap_err().contains("soon"));
    }
}
