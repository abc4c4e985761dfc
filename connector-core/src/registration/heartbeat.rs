//! Heartbeats and the watchdog's period, and the clamps on what the server
//! may ask of them.
//!
//! Each registration draws a *phase* once, from its seeded RNG: a fraction
//! of the interval. The first heartbeat of every stream goes out at
//! `opened + phase × interval`, and later ones on the same grid
//! (`+ interval` each), so N registrations opened together do not beat
//! together forever (Buildkite agents saw exactly that). Early heartbeats
//! (sent to confirm a batch of answers) do not move the grid.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The shortest heartbeat interval a server may ask for. A server's
/// `heartbeat_interval_ms = 1` would otherwise make every registration a
/// hot loop.
pub const MIN_SERVER_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// The longest heartbeat interval a server may ask for (the watchdog
/// follows it, so a longer one would hide dead streams for longer).
pub const MAX_SERVER_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(300);

/// How many heartbeats are remembered for RTT measurement.
const REMEMBERED: usize = 8;

/// `heartbeat_interval_ms` from the wire, clamped (0: keep our own).
pub(super) fn server_interval(ms: u32) -> Option<Duration> {
    (ms > 0).then(|| {
        Duration::from_millis(ms as u64)
            .clamp(MIN_SERVER_HEARTBEAT_INTERVAL, MAX_SERVER_HEARTBEAT_INTERVAL)
    })
}

#[derive(Debug)]
pub(super) struct Heartbeats {
    default_interval: Duration,
    default_timeout: Duration,
    pub(super) interval: Duration,
    pub(super) timeout: Duration,
    /// The phase, as a fraction of the interval in 1/2^32.
    phase: u32,
    /// The next regular heartbeat (the grid).
    pub(super) next_due: Option<Instant>,
    pub(super) seq: u64,
    sent: VecDeque<(u64, Instant)>,
}

impl Heartbeats {
    pub(super) fn new(interval: Duration, timeout: Duration, phase: u32) -> Self {
        Self {
            default_interval: interval,
            default_timeout: timeout,
            interval,
            timeout,
            phase,
            next_due: None,
            seq: 0,
            // Grown on the first heartbeat: an idle registration rarely
            // has more than one unacknowledged, so most never reach
            // `REMEMBERED`.
            sent: VecDeque::new(),
        }
    }

    fn offset(&self) -> Duration {
        let nanos = self.interval.as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(((nanos as u128 * self.phase as u128) >> 32) as u64)
    }

    /// A stream opened at `now`: back to our own interval, first beat at
    /// the phase.
    pub(super) fn stream_opened(&mut self, now: Instant) -> Instant {
        self.interval = self.default_interval;
        self.timeout = self.default_timeout;
        self.sent.clear();
        let at = now + self.offset();
        self.next_due = Some(at);
        at
    }

    /// The server asked for `interval` (already clamped) at `now`: the
    /// watchdog follows (never shorter than 1.5 intervals), the grid
    /// restarts at the phase.
    pub(super) fn server_wish(&mut self, now: Instant, interval: Duration) -> Instant {
        self.interval = interval;
        self.timeout = self.default_timeout.max(interval * 3 / 2);
        let at = now + self.offset();
        self.next_due = Some(at);
        at
    }

    /// A heartbeat goes out at `now`; returns its sequence number.
    /// `regular`: it is the grid's beat (the grid moves on by one interval).
    pub(super) fn beat(&mut self, now: Instant, regular: bool) -> u64 {
        self.seq += 1;
        if self.sent.len() == REMEMBERED {
            self.sent.pop_front();
        }
        self.sent.push_back((self.seq, now));
        if regular {
            let next = self.next_due.unwrap_or(now) + self.interval;
            // Never catch up with a burst after a long pause.
            self.next_due = Some(if next <= now {
                now + self.interval
            } else {
                next
            });
        }
        self.seq
    }

    /// An ack for `seq` at `now`: the round trip, if it was remembered.
    pub(super) fn acked(&mut self, now: Instant, seq: u64) -> Option<Duration> {
        let pos = self.sent.iter().position(|(s, _)| *s == seq)?;
        let (_, sent) = self.sent[pos];
        self.sent.drain(..=pos);
        Some(now.saturating_duration_since(sent))
    }

    pub(super) fn stop(&mut self) {
        self.next_due = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_interval_is_clamped_to_the_documented_range() {
        assert_eq!(server_interval(0), None);
        assert_eq!(server_interval(1), Some(MIN_SERVER_HEARTBEAT_INTERVAL));
        assert_eq!(server_interval(5_000), Some(Duration::from_secs(5)));
        assert_eq!(
            server_interval(u32::MAX),
            Some(MAX_SERVER_HEARTBEAT_INTERVAL)
        );
    }

    #[test]
    fn the_phase_places_the_first_beat_and_the_grid_keeps_it() {
        let now = Instant::now();
        let mut h = Heartbeats::new(
            Duration::from_secs(10),
            Duration::from_secs(15),
            u32::MAX / 4,
        );
        let first = h.stream_opened(now);
        let offset = first - now;
        assert!(
            offset > Duration::from_millis(2_499) && offset <= Duration::from_millis(2_500),
            "{offset:?}"
        );
        h.beat(first, true);
        // An early beat does not move the grid.
        h.beat(first + Duration::from_secs(3), false);
        assert_eq!(h.next_due, Some(first + Duration::from_secs(10)));
    }
}
