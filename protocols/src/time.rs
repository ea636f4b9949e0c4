//! Time as the sans-IO state machines see it: a point handed in by the driver.

use std::ops::Add;
use std::time::Duration;

/// A point in time, measured from an epoch the driver chooses (a real clock's start, or a
/// simulation's virtual zero). State machines compare and add these; they never read a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(Duration);

impl Time {
    /// The epoch.
    pub const ZERO: Time = Time(Duration::ZERO);

    /// The point `d` after the epoch.
    pub fn from_duration(d: Duration) -> Self {
        Time(d)
    }

    /// The point `ms` milliseconds after the epoch.
    pub fn from_millis(ms: u64) -> Self {
        Time(Duration::from_millis(ms))
    }

    /// Time since the epoch.
    pub fn since_epoch(self) -> Duration {
        self.0
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Time) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(self.0.saturating_add(d))
    }
}
