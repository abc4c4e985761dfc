//! Host-wide pacing of reconnects, so a server restart is not answered by
//! every registration of the host in the same second.
//!
//! Per-registration jitter spreads retries over `jitter` (500 ms by
//! default); that is enough for a handful of registrations but not for ten
//! thousand, which would all re-register within one second of a restart.
//! The runner therefore shares one [`ReconnectPacer`] among its
//! registrations: a token bucket (GCRA form) that lets a burst of reconnects
//! through at once and spaces the rest at a steady rate. The first connect
//! of a registration is never paced (start-up and `add` stay as fast as the
//! transport allows); only the reconnects that follow a lost stream or a
//! failed attempt are.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket handing out reconnect slots.
#[derive(Debug)]
pub(crate) struct ReconnectPacer {
    /// Time between two slots once the burst is spent.
    interval: Duration,
    /// How far ahead of now slots may be handed out without waiting.
    burst_window: Duration,
    /// The theoretical arrival time of the next slot (GCRA's TAT).
    next: Mutex<Option<Instant>>,
}

impl ReconnectPacer {
    /// A pacer for `rate` reconnects per second with bursts of `burst`;
    /// `None` when `rate` is 0 (unpaced).
    pub(crate) fn new(rate: u32, burst: u32) -> Option<Self> {
        if rate == 0 {
            return None;
        }
        let interval = Duration::from_secs(1) / rate;
        Some(Self {
            interval,
            burst_window: interval * (burst.max(1) - 1),
            next: Mutex::new(None),
        })
    }

    /// Reserves the next slot and returns when it may be used (`now` when
    /// the burst has room). A caller that gives up before its slot loses it;
    /// that only makes later callers' slots a little later.
    pub(crate) fn reserve(&self, now: Instant) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let tat = next.map_or(now, |t| t.max(now));
        *next = Some(tat + self.interval);
        // Slots within the burst window of now go at once.
        let allowed = tat.checked_sub(self.burst_window).unwrap_or(now);
        allowed.max(now)
    }

    /// Waits for a slot.
    pub(crate) async fn admit(&self) {
        let at = self.reserve(Instant::now());
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rate_is_unpaced() {
        assert!(ReconnectPacer::new(0, 10).is_none());
    }

    #[test]
    fn a_burst_goes_at_once_then_slots_are_spaced() {
        let pacer = ReconnectPacer::new(100, 5).expect("paced");
        let now = Instant::now();
        let slots: Vec<Duration> = (0..8).map(|_| pacer.reserve(now) - now).collect();
        // Five at once, then one every 10 ms.
        assert_eq!(&slots[..5], &[Duration::ZERO; 5]);
        assert_eq!(slots[5], Duration::from_millis(10));
        assert_eq!(slots[6], Duration::from_millis(20));
        assert_eq!(slots[7], Duration::from_millis(30));
    }

    #[test]
    fn the_bucket_refills_with_time() {
        let pacer = ReconnectPacer::new(100, 2).expect("paced");
        let t0 = Instant::now();
        for _ in 0..10 {
            pacer.reserve(t0);
        }
        // Ten reserved at t0 end at t0 + 100 ms; a second later the bucket is
        // full again.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(pacer.reserve(later), later);
        assert_eq!(pacer.reserve(later), later);
        assert_eq!(pacer.reserve(later), later + Duration::from_millis(10));
    }

    #[test]
    fn no_second_gets_more_than_rate_plus_burst() {
        let (rate, burst) = (2_000u32, 200u32);
        let pacer = ReconnectPacer::new(rate, burst).expect("paced");
        let t0 = Instant::now();
        let mut per_second = std::collections::BTreeMap::<u64, u32>::new();
        for _ in 0..10_000 {
            let at = pacer.reserve(t0);
            *per_second.entry((at - t0).as_secs()).or_default() += 1;
        }
        let max = per_second.values().copied().max().unwrap_or(0);
        assert!(max <= rate + burst, "{per_second:?}");
        // 10 000 at 2 000/s after a burst of 200: the last one ~4.9 s later.
        assert_eq!(per_second.keys().last(), Some(&4));
    }

    #[tokio::test(start_paused = true)]
    async fn admit_waits_for_the_slot() {
        let pacer = ReconnectPacer::new(10, 1).expect("paced");
        let t0 = Instant::now();
        pacer.admit().await;
        assert_eq!(Instant::now(), t0);
        pacer.admit().await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(100));
    }
}
