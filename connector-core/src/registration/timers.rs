//! Timers as data (quinn-proto's `connection/timer.rs`): an enum of kinds
//! and a table of deadlines; the next timeout is the earliest one.

use tokio::time::Instant;

/// The timers of a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    Heartbeat = 0,
    Watchdog = 1,
    Register = 2,
    Backoff = 3,
    BackoffReset = 4,
    Drain = 5,
    MetricsReport = 6,
}

impl Timer {
    pub(super) const ALL: [Timer; 7] = [
        Timer::Heartbeat,
        Timer::Watchdog,
        Timer::Register,
        Timer::Backoff,
        Timer::BackoffReset,
        Timer::Drain,
        Timer::MetricsReport,
    ];

    /// The timers that belong to one stream: they stop when it ends.
    pub(super) const OF_STREAM: [Timer; 6] = [
        Timer::Heartbeat,
        Timer::Watchdog,
        Timer::Register,
        Timer::BackoffReset,
        Timer::Drain,
        Timer::MetricsReport,
    ];
}

#[derive(Debug, Default)]
pub(super) struct TimerTable([Option<Instant>; 7]);

impl TimerTable {
    pub(super) fn set(&mut self, t: Timer, at: Instant) {
        self.0[t as usize] = Some(at);
    }
    pub(super) fn stop(&mut self, t: Timer) {
        self.0[t as usize] = None;
    }
    #[cfg(test)]
    pub(super) fn get(&self, t: Timer) -> Option<Instant> {
        self.0[t as usize]
    }
    pub(super) fn expired(&self, t: Timer, now: Instant) -> bool {
        self.0[t as usize].is_some_and(|at| at <= now)
    }
    pub(super) fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }
}
