//! Time as an argument: the `Clock` every operation reads once and passes down.
//!
//! Business code never calls `Utc::now()`. The service runs on a [`SystemClock`] in production
//! and on a [`ManualClock`] in tests and demos, where ops move time forward explicitly
//! (`POST /api/v1/ops/clock/advance`) so that weeks of schedules run in milliseconds.

use chrono::{DateTime, SubsecRound, Utc};
use std::sync::Mutex;

/// A source of "now". Read it once per operation and pass the instant down.
pub trait Clock: Send + Sync {
    /// The current instant, truncated to microseconds (the precision of stored instants).
    fn now(&self) -> DateTime<Utc>;

    /// The manual clock behind this clock, if time here only moves when told to.
    fn as_manual(&self) -> Option<&ManualClock> {
        None
    }
}

/// Wall-clock time of the machine.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        // The one place in the service that reads the system clock.
        Utc::now().trunc_subsecs(6)
    }
}

/// A clock that stands still until it is advanced; it never moves backwards.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
}

/// Returned when asked to move a manual clock backwards.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the clock is at {now} and cannot move back to {requested}")]
pub struct ClockWentBackwards {
    pub now: DateTime<Utc>,
    pub requested: DateTime<Utc>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Mutex::new(start.trunc_subsecs(6)),
        }
    }

    /// Moves the clock to `to`; equal is a no-op, earlier is refused and changes nothing.
    pub fn set(&self, to: DateTime<Utc>) -> Result<(), ClockWentBackwards> {
        let to = to.trunc_subsecs(6);
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        if to < *now {
            return Err(ClockWentBackwards {
                now: *now,
                requested: to,
            });
        }
        *now = to;
        Ok(())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn as_manual(&self) -> Option<&ManualClock> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn manual_clock_moves_forward_only() {
        let start = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let clock = ManualClock::new(start);
        assert_eq!(clock.now(), start);
        let later = start + chrono::Duration::days(30);
        clock.set(later).unwrap();
        assert_eq!(clock.now(), later);
        clock.set(later).unwrap();
        let err = clock.set(start).unwrap_err();
        assert_eq!(err.requested, start);
        assert_eq!(clock.now(), later, "a refused move changes nothing");
    }

    #[test]
    fn system_clock_is_not_manual() {
        assert!(SystemClock.as_manual().is_none());
        assert!(ManualClock::new(Utc::now()).as_manual().is_some());
    }
}
