//! Time for decisions: the wall clock as tokio's clock moves it. It reads the system time
//! once, then advances with `tokio::time::Instant`, so `tokio::time::pause()` and
//! `advance()` move it in tests, and a decision that takes a [`Now`] is tested without
//! sleeping.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::model::now_unix_ms;

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    unix_ms_at_start: u64,
    start: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            unix_ms_at_start: now_unix_ms(),
            start: Instant::now(),
        }
    }

    pub fn now(&self) -> Now {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        Now(self.unix_ms_at_start.saturating_add(elapsed))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// One moment, in Unix milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Now(pub u64);

impl Now {
    pub fn unix_ms(self) -> u64 {
        self.0
    }

    /// Marathon's timestamp form: RFC 3339 with milliseconds.
    pub fn rfc3339(self) -> String {
        let at = UNIX_EPOCH + Duration::from_millis(self.0);
        humantime::format_rfc3339_millis(at).to_string()
    }

    /// How long ago an RFC 3339 timestamp was; `None` if it does not parse, zero if it is
    /// later than now.
    pub fn since(self, rfc3339: &str) -> Option<Duration> {
        let then = humantime::parse_rfc3339(rfc3339).ok()?;
        let then_ms = then.duration_since(UNIX_EPOCH).ok()?.as_millis();
        let then_ms = u64::try_from(then_ms).ok()?;
        Some(Duration::from_millis(self.0.saturating_sub(then_ms)))
    }

    pub fn after(self, d: Duration) -> Now {
        Now(self
            .0
            .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }
}

impl From<SystemTime> for Now {
    fn from(t: SystemTime) -> Self {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or_default();
        Now(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_clock_follows_paused_time() {
        let clock = Clock::new();
        let t0 = clock.now();
        tokio::time::advance(Duration::from_secs(90)).await;
        let t1 = clock.now();
        assert_eq!(t1.unix_ms() - t0.unix_ms(), 90_000);
        assert_eq!(t1.since(&t0.rfc3339()), Some(Duration::from_secs(90)));
        assert_eq!(t0.since(&t1.rfc3339()), Some(Duration::ZERO));
        assert_eq!(t0.after(Duration::from_secs(90)), t1);
    }
}
