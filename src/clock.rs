//! The clock every time decision reads.
//!
//! Wall time ([`now`], unix seconds) is the system's clock, moved by two things tests use:
//! - `SMSDROP_CLOCK_FILE` may name a file holding a number of seconds: the clock then runs that
//!   far ahead, read again at each look. Integration tests move time forward this way (a day, a
//!   year) without sleeping; the packaged service never sets it, and `serve` warns at start when
//!   it is set.
//! - tokio's clock, when a unit test pauses and advances it (`tokio::time::pause`,
//!   `tokio::time::advance`): [`now`] moves with it. Outside such a test tokio's clock is the
//!   system's monotonic clock and adds nothing.
//!
//! Durations and deadlines inside the process (retries, back-off, windows) are measured on
//! `tokio::time::Instant`, which the same pause moves.

/// The variable that names the skew file.
pub const SKEW_VAR: &str = "SMSDROP_CLOCK_FILE";

/// Unix seconds, now (plus the test skew, if any).
pub fn now() -> i64 {
    jiff::Timestamp::now()
        .as_second()
        .saturating_add(skew())
        .saturating_add(paused_ahead())
}

/// Unix milliseconds, now, moved as [`now`] is: for times kept to the millisecond (audit entries,
/// incoming messages, sends remembered for reply matching).
pub fn now_ms() -> i64 {
    jiff::Timestamp::now()
        .as_millisecond()
        .saturating_add(skew().saturating_add(paused_ahead()).saturating_mul(1000))
}

/// [`now`] as a timestamp.
pub fn timestamp() -> jiff::Timestamp {
    jiff::Timestamp::from_second(now()).unwrap_or_else(|_| jiff::Timestamp::now())
}

/// Seconds the clock runs ahead of the system's.
pub fn skew() -> i64 {
    std::env::var_os(SKEW_VAR)
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| text.trim().parse::<i64>().ok())
        .unwrap_or(0)
}

/// Whole seconds tokio's clock has been advanced past the system's monotonic clock: only ever
/// more than zero while a test has paused it. (Read first, tokio's clock is never ahead
/// otherwise.)
fn paused_ahead() -> i64 {
    let tokio_now = tokio::time::Instant::now().into_std();
    let real_now = std::time::Instant::now();
    tokio_now
        .checked_duration_since(real_now)
        .map(|ahead| ((ahead.as_millis() + 500) / 1000) as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn wall_time_follows_a_paused_clock_moved_forward() {
        let before = super::now();
        tokio::time::advance(Duration::from_secs(86_400)).await;
        let after = super::now();
        assert!((86_400..=86_401).contains(&(after - before)), "{before} then {after}");
    }

    #[test]
    fn without_a_paused_clock_nothing_is_added() {
        assert_eq!(super::paused_ahead(), 0);
    }
}
