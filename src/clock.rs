//! The clock retention decisions read.
//!
//! It is the system's clock, unless `SMSDROP_CLOCK_FILE` names a file holding a number of
//! seconds: the clock then runs that far ahead, read again at each look. Tests move time
//! forward this way (a day, a year) without sleeping; the packaged service never sets it, and
//! `serve` warns at start when it is set.

/// The variable that names the skew file.
pub const SKEW_VAR: &str = "SMSDROP_CLOCK_FILE";

/// Unix seconds, now (plus the test skew, if any).
pub fn now() -> i64 {
    jiff::Timestamp::now().as_second().saturating_add(skew())
}

/// Seconds the clock runs ahead of the system's.
pub fn skew() -> i64 {
    std::env::var_os(SKEW_VAR)
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| text.trim().parse::<i64>().ok())
        .unwrap_or(0)
}
