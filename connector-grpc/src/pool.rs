//! Slot accounting for the channel pool, with no IO and no clock.
//!
//! [`Pool`] is a plain struct: which channels exist, how many streams each
//! carries, how many it may carry, and how healthy it is. The async mux
//! ([`crate::mux`]) keeps one behind a `std::sync::Mutex` that is never held
//! across an `.await`, and turns its answers into dials and opens. Every
//! rule about capacity lives here, so it is tested without a network.
//!
//! The rules:
//!
//! * A stream *reserves* a slot before it is opened, and a slot is only
//!   handed out while `streams < effective_cap`, so the count never
//!   overshoots the cap. The slot is released when the stream is dropped
//!   ([`Slot`] does it on `Drop`).
//! * A channel's effective cap is the least of the configured
//!   `max_streams_per_channel`, a limit learned from stalls, and the
//!   server's `SETTINGS_MAX_CONCURRENT_STREAMS` as read off the wire
//!   ([`PeerSettings`]; a dial waits for it, one round trip). Until that is
//!   known (a server slow to send SETTINGS), [`INITIAL_MAX_SEND_STREAMS`]
//!   applies until the channel has seen a response.
//! * A reservation made before the server's SETTINGS arrived may find the
//!   channel over its cap once they did ([`Pool::over_cap`]): the opener
//!   gives the slot back and tries elsewhere instead of letting h2 queue.
//! * A *stall* (a stream that got no response headers in time on a channel
//!   that already carries established streams) means the server's limit is
//!   below our cap and h2 queued the stream: the fallback for a limit the
//!   settings did not tell (not sent in time, or lowered later). The
//!   channel's cap drops to its established streams, and the pool
//!   remembers that limit for channels dialled later.
//! * [`FAILURE_THRESHOLD`] consecutive failures on a channel drop it from
//!   the pool (a rebuild: later opens dial a fresh one). Streams already on
//!   it keep running until they end.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use connector_core::{ConnectionStats, MuxStats};

use crate::settings::PeerSettings;

/// The number of concurrent streams hyper's h2 client assumes a server
/// allows before the server's SETTINGS frame arrives. Opening more than
/// this on a brand-new connection would queue them in h2.
pub(crate) const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// Consecutive failures (failed opens, streams dying with a transport
/// error) after which a channel is dropped from the pool.
pub(crate) const FAILURE_THRESHOLD: u32 = 3;

/// One channel of the pool. `C` is the handle streams are opened on (a
/// tonic `Channel`; `()` in tests).
#[derive(Debug)]
struct Entry<C> {
    id: u64,
    channel: C,
    /// Reserved slots: streams opening or open.
    streams: usize,
    /// Of those, streams that received their response headers.
    established: usize,
    /// The cap without the pre-SETTINGS limit: the configured cap, lowered
    /// by a learned server limit.
    cap: usize,
    /// A response arrived on this channel, so the server's SETTINGS did too.
    settings_seen: bool,
    /// What the server's SETTINGS said, once read.
    settings: Arc<PeerSettings>,
    /// Failures since the last success.
    failures: u32,
}

impl<C> Entry<C> {
    fn effective_cap(&self) -> usize {
        match self.settings.max_streams() {
            // A server limit of 0 ("no streams for now") still gets one
            // stream: h2 queues it, and it ends as a plain timeout rather
            // than the pool dialling channel after channel.
            Some(server) => self.cap.min(server.max(1)),
            None if self.settings_seen => self.cap,
            None => self.cap.min(INITIAL_MAX_SEND_STREAMS),
        }
    }

    fn has_room(&self) -> bool {
        self.streams < self.effective_cap()
    }
}

/// A reserved slot, as the pool hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reservation<C> {
    /// The channel the slot is on.
    pub(crate) channel_id: u64,
    /// A handle to open the stream on.
    pub(crate) channel: C,
}

/// What a failure did to its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureOutcome {
    /// Counted; the channel stays.
    Counted(u32),
    /// The threshold was reached and the channel left the pool.
    Dropped,
    /// The channel had already left the pool.
    Gone,
}

/// The pool's state. See the module docs for the rules.
#[derive(Debug)]
pub(crate) struct Pool<C> {
    max_streams: usize,
    learned_limit: Option<usize>,
    channels: Vec<Entry<C>>,
    next_id: u64,
    closed: bool,
    dials_succeeded: u64,
    dials_failed: u64,
    rebuilds: u64,
}

impl<C: Clone> Pool<C> {
    /// An empty pool whose channels carry at most `max_streams` streams
    /// (at least 1).
    pub(crate) fn new(max_streams: usize) -> Self {
        Self {
            max_streams: max_streams.max(1),
            learned_limit: None,
            channels: Vec::new(),
            next_id: 1,
            closed: false,
            dials_succeeded: 0,
            dials_failed: 0,
            rebuilds: 0,
        }
    }

    /// True once [`Pool::close`] ran.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// True when the pool has at least one channel.
    pub(crate) fn has_channels(&self) -> bool {
        !self.channels.is_empty()
    }

    /// The server limit learned from stalls, if any.
    #[cfg(test)]
    pub(crate) fn learned_limit(&self) -> Option<usize> {
        self.learned_limit
    }

    /// How many streams a channel dialled now will take, as far as the
    /// pool can tell: the cap, lowered to a learned limit and to the newest
    /// channel's server limit (the same server will likely say the same;
    /// a dial waits for the server's SETTINGS, so hyper's assumption before
    /// them does not apply). Dials for waiting opens are sized with it: an
    /// estimate too high costs a later dial, never an extra connection.
    pub(crate) fn new_channel_room(&self) -> usize {
        let mut room = self.max_streams;
        if let Some(limit) = self.learned_limit {
            room = room.min(limit);
        }
        if let Some(server) = self.channels.last().and_then(|e| e.settings.max_streams()) {
            room = room.min(server);
        }
        room.max(1)
    }

    /// Reserves a slot on the oldest channel with room (packing streams
    /// keeps the number of connections minimal). `None` when every channel
    /// is full, or the pool is closed.
    pub(crate) fn try_reserve(&mut self) -> Option<Reservation<C>> {
        if self.closed {
            return None;
        }
        let entry = self.channels.iter_mut().find(|e| e.has_room())?;
        entry.streams += 1;
        Some(Reservation {
            channel_id: entry.id,
            channel: entry.channel.clone(),
        })
    }

    /// Adds a freshly dialled channel and counts the dial. Its cap is the
    /// configured cap, lowered to the learned server limit. Returns its id,
    /// or `None` (and drops the channel) when the pool is closed.
    pub(crate) fn add_channel(&mut self, channel: C, settings: Arc<PeerSettings>) -> Option<u64> {
        if self.closed {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.dials_succeeded += 1;
        let cap = match self.learned_limit {
            Some(limit) => self.max_streams.min(limit),
            None => self.max_streams,
        };
        self.channels.push(Entry {
            id,
            channel,
            streams: 0,
            established: 0,
            cap,
            settings_seen: false,
            settings,
            failures: 0,
        });
        Some(id)
    }

    /// [`Pool::add_channel`] and a slot on it, in one step, so the dialler
    /// cannot lose the channel it dialled to the waiters it dialled for.
    pub(crate) fn add_channel_and_reserve(
        &mut self,
        channel: C,
        settings: Arc<PeerSettings>,
    ) -> Option<Reservation<C>> {
        let id = self.add_channel(channel, settings)?;
        let entry = self.channels.iter_mut().find(|e| e.id == id)?;
        // A new channel's cap is at least 1, so there is always room.
        if !entry.has_room() {
            return None;
        }
        entry.streams += 1;
        Some(Reservation {
            channel_id: id,
            channel: entry.channel.clone(),
        })
    }

    /// True when `channel_id` carries more reservations than its cap
    /// allows (its server's SETTINGS arrived after they were made, or
    /// lowered the limit). The caller gives its slot back, so of the slots
    /// that ask, exactly the excess leaves.
    pub(crate) fn over_cap(&self, channel_id: u64) -> bool {
        self.channels
            .iter()
            .find(|e| e.id == channel_id)
            .is_some_and(|e| e.streams > e.effective_cap())
    }

    /// Counts a dial that failed.
    pub(crate) fn dial_failed(&mut self) {
        self.dials_failed += 1;
    }

    /// A stream on `channel_id` received its response headers: the channel
    /// works (failures reset) and has seen the server's SETTINGS.
    pub(crate) fn mark_established(&mut self, channel_id: u64) {
        if let Some(e) = self.entry_mut(channel_id) {
            e.established += 1;
            e.settings_seen = true;
            e.failures = 0;
        }
    }

    /// Frees a slot. `established` says whether the stream had been marked
    /// established. A channel that left the pool is ignored.
    pub(crate) fn release(&mut self, channel_id: u64, established: bool) {
        if let Some(e) = self.entry_mut(channel_id) {
            e.streams = e.streams.saturating_sub(1);
            if established {
                e.established = e.established.saturating_sub(1);
            }
        }
    }

    /// A stream on `channel_id` got no response headers in time. When the
    /// channel carries established streams, the server is queueing streams
    /// past its limit: lowers the channel's cap to its established streams,
    /// remembers that limit for new channels and returns the new cap (the
    /// caller releases its slot and retries elsewhere). `None` when the
    /// channel carries no established stream (then it is a plain timeout).
    pub(crate) fn stalled(&mut self, channel_id: u64) -> Option<usize> {
        let e = self.entry_mut(channel_id)?;
        if e.established == 0 {
            return None;
        }
        let limit = e.established;
        e.cap = e.cap.min(limit);
        let cap = e.cap;
        // The latest measurement wins: each is a lower bound of the server's
        // limit taken when our h2 had reached it, and a channel dialled with
        // too high a cap only costs one more stall.
        self.learned_limit = Some(limit);
        Some(cap)
    }

    /// The server refused a stream on `channel_id` (h2 `REFUSED_STREAM`,
    /// typically because streams went out before its SETTINGS arrived): the
    /// channel has now seen those SETTINGS. The cap is not lowered: the
    /// refusal races with the response headers of the streams the server
    /// accepted, so the established count is no measure of the limit yet.
    /// The retry is queued by h2 and caught as a stall, which measures it.
    pub(crate) fn refused(&mut self, channel_id: u64) {
        if let Some(e) = self.entry_mut(channel_id) {
            e.settings_seen = true;
        }
    }

    /// Counts a failure on `channel_id`; at [`FAILURE_THRESHOLD`] the
    /// channel leaves the pool and a rebuild is counted.
    pub(crate) fn record_failure(&mut self, channel_id: u64) -> FailureOutcome {
        let Some(pos) = self.channels.iter().position(|e| e.id == channel_id) else {
            return FailureOutcome::Gone;
        };
        let e = &mut self.channels[pos];
        e.failures += 1;
        if e.failures < FAILURE_THRESHOLD {
            return FailureOutcome::Counted(e.failures);
        }
        self.channels.remove(pos);
        self.rebuilds += 1;
        FailureOutcome::Dropped
    }

    /// Closes the pool: no more reservations or channels. Returns the
    /// channels so the caller decides where they are dropped.
    pub(crate) fn close(&mut self) -> Vec<C> {
        self.closed = true;
        self.channels.drain(..).map(|e| e.channel).collect()
    }

    /// One entry per channel: id, streams, effective cap.
    pub(crate) fn channel_stats(&self) -> Vec<ConnectionStats> {
        self.channels
            .iter()
            .map(|e| ConnectionStats::new(e.id, e.streams, e.effective_cap()))
            .collect()
    }

    /// The whole snapshot.
    pub(crate) fn stats(&self) -> MuxStats {
        let mut s = MuxStats::default();
        s.connections = self.channel_stats();
        s.dials_succeeded = self.dials_succeeded;
        s.dials_failed = self.dials_failed;
        s.rebuilds = self.rebuilds;
        s
    }

    fn entry_mut(&mut self, channel_id: u64) -> Option<&mut Entry<C>> {
        self.channels.iter_mut().find(|e| e.id == channel_id)
    }
}

/// A pool shared between the mux and the streams' slot guards.
pub(crate) type SharedPool<C> = Arc<Mutex<Pool<C>>>;

/// Locks the pool (or the mux's dial counters). A panic while the lock
/// was held cannot leave the counters half-updated (every method finishes
/// its update before it can panic), so a poisoned lock is still usable.
pub(crate) fn lock<T>(state: &Mutex<T>) -> MutexGuard<'_, T> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A reserved slot that frees itself when dropped, however the stream
/// ended (or never started).
#[derive(Debug)]
pub(crate) struct Slot<C: Clone> {
    pool: SharedPool<C>,
    channel_id: u64,
    established: bool,
}

impl<C: Clone> Slot<C> {
    /// Reserves a slot on a channel with room, or `None`.
    pub(crate) fn try_reserve(pool: &SharedPool<C>) -> Option<(Self, C)> {
        let r = lock(pool).try_reserve()?;
        Some((Self::adopt(pool, r.channel_id), r.channel))
    }

    /// Takes ownership of a slot the pool already counted.
    pub(crate) fn adopt(pool: &SharedPool<C>, channel_id: u64) -> Self {
        Self {
            pool: Arc::clone(pool),
            channel_id,
            established: false,
        }
    }

    /// The channel the slot is on.
    pub(crate) fn channel_id(&self) -> u64 {
        self.channel_id
    }

    /// The stream got its response headers.
    pub(crate) fn mark_established(&mut self) {
        if !self.established {
            self.established = true;
            lock(&self.pool).mark_established(self.channel_id);
        }
    }

    /// Counts a failure against the slot's channel.
    pub(crate) fn record_failure(&self) -> FailureOutcome {
        lock(&self.pool).record_failure(self.channel_id)
    }

    /// Reports a stall on the slot's channel (see [`Pool::stalled`]).
    pub(crate) fn stalled(&self) -> Option<usize> {
        lock(&self.pool).stalled(self.channel_id)
    }

    /// True when the slot's channel is over its cap (see
    /// [`Pool::over_cap`]).
    pub(crate) fn over_cap(&self) -> bool {
        lock(&self.pool).over_cap(self.channel_id)
    }

    /// Reports a refused stream on the slot's channel (see
    /// [`Pool::refused`]).
    pub(crate) fn refused(&self) {
        lock(&self.pool).refused(self.channel_id);
    }
}

impl<C: Clone> Drop for Slot<C> {
    fn drop(&mut self) {
        lock(&self.pool).release(self.channel_id, self.established);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(max: usize) -> SharedPool<()> {
        Arc::new(Mutex::new(Pool::new(max)))
    }

    /// Adds a channel whose server settings are not known yet.
    fn open(pool: &mut Pool<()>) -> u64 {
        pool.add_channel((), PeerSettings::new())
            .expect("open pool")
    }

    /// Settings as the server's first SETTINGS frame gave them.
    fn settings(max_concurrent_streams: Option<u32>) -> Arc<PeerSettings> {
        let settings = PeerSettings::new();
        settings.apply(max_concurrent_streams);
        settings
    }

    /// Makes `n` reservations, each of which must land on channel `on`.
    fn reserve_on(pool: &mut Pool<()>, on: u64, n: usize) {
        for i in 0..n {
            assert_eq!(
                pool.try_reserve().map(|r| r.channel_id),
                Some(on),
                "reservation {i}"
            );
        }
    }

    fn streams(pool: &Pool<()>) -> Vec<(u64, usize, usize)> {
        pool.channel_stats()
            .iter()
            .map(|c| (c.id, c.streams, c.capacity))
            .collect()
    }

    #[test]
    fn a_new_channels_room_is_the_cap_lowered_by_what_the_server_said() {
        // Nothing known: the configured cap (a dial waits for SETTINGS, so
        // hyper's 100 before them is not a limit on what it will carry).
        let mut pool = Pool::<()>::new(200);
        assert_eq!(pool.new_channel_room(), 200);
        // A server that set no limit leaves the cap.
        pool.add_channel((), settings(None)).expect("open pool");
        assert_eq!(pool.new_channel_room(), 200);
        // The newest channel's server limit is the estimate ...
        pool.add_channel((), settings(Some(5))).expect("open pool");
        assert_eq!(pool.new_channel_room(), 5);
        // ... and a server limit of 0 still counts one stream.
        pool.add_channel((), settings(Some(0))).expect("open pool");
        assert_eq!(pool.new_channel_room(), 1);
        // A limit learned from a stall lowers it too.
        let mut pool = Pool::<()>::new(80);
        let id = open(&mut pool);
        reserve_on(&mut pool, id, 3);
        pool.mark_established(id);
        pool.mark_established(id);
        assert_eq!(pool.stalled(id), Some(2));
        assert_eq!(pool.new_channel_room(), 2);
    }

    #[test]
    fn empty_pool_has_no_room() {
        let mut pool = Pool::<()>::new(10);
        assert!(pool.try_reserve().is_none());
        assert!(!pool.has_channels());
    }

    #[test]
    fn reserve_fills_channels_in_order_and_never_overshoots() {
        let mut pool = Pool::new(3);
        let a = open(&mut pool);
        reserve_on(&mut pool, a, 3);
        assert!(pool.try_reserve().is_none(), "channel a is full");
        let b = pool
            .add_channel_and_reserve((), PeerSettings::new())
            .expect("open pool");
        assert_eq!(b.channel_id, a + 1);
        assert_eq!(streams(&pool), vec![(a, 3, 3), (b.channel_id, 1, 3)]);
        // A freed slot on the older channel is reused first.
        pool.release(a, false);
        reserve_on(&mut pool, a, 1);
        assert_eq!(pool.stats().dials_succeeded, 2);
    }

    #[test]
    fn new_channel_is_limited_to_hyper_initial_streams_until_a_response() {
        let mut pool = Pool::new(250);
        let a = open(&mut pool);
        reserve_on(&mut pool, a, INITIAL_MAX_SEND_STREAMS);
        assert!(pool.try_reserve().is_none(), "100 before SETTINGS");
        assert_eq!(streams(&pool), vec![(a, 100, 100)]);
        pool.mark_established(a);
        assert_eq!(streams(&pool), vec![(a, 100, 250)]);
        reserve_on(&mut pool, a, 1);
    }

    #[test]
    fn stall_lowers_cap_to_established_and_new_channels_inherit_it() {
        let mut pool = Pool::new(80);
        let a = open(&mut pool);
        reserve_on(&mut pool, a, 12);
        for _ in 0..5 {
            pool.mark_established(a);
        }
        // The seven queued streams each report the stall; idempotent.
        for _ in 0..7 {
            assert_eq!(pool.stalled(a), Some(5));
        }
        assert_eq!(pool.learned_limit(), Some(5));
        for _ in 0..7 {
            pool.release(a, false);
        }
        assert_eq!(streams(&pool), vec![(a, 5, 5)]);
        assert!(pool.try_reserve().is_none(), "a is at its learned limit");
        let b = open(&mut pool);
        assert_eq!(streams(&pool)[1], (b, 0, 5));
        // A stream ending on `a` makes room for exactly one more.
        pool.release(a, true);
        reserve_on(&mut pool, a, 1);
        reserve_on(&mut pool, b, 1);
    }

    #[test]
    fn the_servers_settings_set_the_cap_and_late_ones_push_the_excess_out() {
        let mut pool = Pool::new(80);
        // Read before the channel is added (the dial waits for them).
        let a = pool.add_channel((), settings(Some(5))).expect("open pool");
        assert_eq!(streams(&pool), vec![(a, 0, 5)]);
        reserve_on(&mut pool, a, 5);
        assert!(pool.try_reserve().is_none(), "5 is the server's limit");
        assert!(!pool.over_cap(a));

        // Arriving after 12 reservations: the 7 over the limit give back.
        let late = PeerSettings::new();
        let b = pool.add_channel((), Arc::clone(&late)).expect("open pool");
        reserve_on(&mut pool, b, 12);
        late.apply(Some(5));
        let mut gave_back = 0;
        for _ in 0..12 {
            if pool.over_cap(b) {
                pool.release(b, false);
                gave_back += 1;
            }
        }
        assert_eq!(gave_back, 7);
        assert_eq!(streams(&pool)[1], (b, 5, 5));

        // No parameter in the first SETTINGS: only our own cap applies.
        let c = pool.add_channel((), settings(None)).expect("open pool");
        assert_eq!(streams(&pool)[2], (c, 0, 80));
        // A limit of 0 still leaves one slot (a queued open times out).
        let d = pool.add_channel((), settings(Some(0))).expect("open pool");
        assert_eq!(streams(&pool)[3], (d, 0, 1));
        assert_eq!(pool.learned_limit(), None, "settings are not stalls");
    }

    #[test]
    fn stall_without_established_streams_is_not_a_limit() {
        let mut pool = Pool::new(80);
        let a = open(&mut pool);
        reserve_on(&mut pool, a, 1);
        assert_eq!(pool.stalled(a), None);
        assert_eq!(pool.learned_limit(), None);
        assert_eq!(streams(&pool), vec![(a, 1, 80)]);
    }

    #[test]
    fn refused_stream_marks_settings_seen_but_keeps_the_cap() {
        let mut pool = Pool::new(250);
        let a = open(&mut pool);
        assert_eq!(streams(&pool), vec![(a, 0, 100)]);
        pool.refused(a);
        assert_eq!(streams(&pool), vec![(a, 0, 250)]);
        reserve_on(&mut pool, a, 1);
        pool.mark_established(a);
        pool.refused(a);
        assert_eq!(streams(&pool), vec![(a, 1, 250)], "a refusal is no measure");
        assert_eq!(pool.learned_limit(), None);
    }

    #[test]
    fn stall_never_raises_a_cap_and_the_latest_measurement_is_learned() {
        let mut pool = Pool::new(80);
        let a = open(&mut pool);
        let z = open(&mut pool);
        for _ in 0..10 {
            reserve_on(&mut pool, a, 1);
            pool.mark_established(a);
        }
        assert_eq!(pool.stalled(a), Some(10));
        for _ in 0..10 {
            pool.release(a, true);
        }
        for _ in 0..3 {
            reserve_on(&mut pool, a, 1);
            pool.mark_established(a);
        }
        assert_eq!(pool.stalled(a), Some(3));
        assert_eq!(pool.learned_limit(), Some(3));
        // `z` was dialled before anything was learned and measures 5: new
        // channels take 5, `a` keeps its own 3.
        for _ in 0..5 {
            reserve_on(&mut pool, z, 1);
            pool.mark_established(z);
        }
        assert_eq!(pool.stalled(z), Some(5));
        assert_eq!(pool.learned_limit(), Some(5));
        let b = open(&mut pool);
        let caps: Vec<_> = pool
            .channel_stats()
            .iter()
            .map(|c| (c.id, c.capacity))
            .collect();
        assert_eq!(caps, vec![(a, 3), (z, 5), (b, 5)]);
    }

    #[test]
    fn failures_drop_the_channel_at_the_threshold_and_success_resets_them() {
        let mut pool = Pool::new(10);
        let a = open(&mut pool);
        assert_eq!(pool.record_failure(a), FailureOutcome::Counted(1));
        assert_eq!(pool.record_failure(a), FailureOutcome::Counted(2));
        pool.mark_established(a);
        assert_eq!(pool.record_failure(a), FailureOutcome::Counted(1));
        assert_eq!(pool.record_failure(a), FailureOutcome::Counted(2));
        assert_eq!(pool.record_failure(a), FailureOutcome::Dropped);
        assert_eq!(pool.record_failure(a), FailureOutcome::Gone);
        assert!(!pool.has_channels());
        assert_eq!(pool.stats().rebuilds, 1);
        // Releasing a slot of a dropped channel is harmless.
        pool.release(a, true);
        // The next channel gets a fresh id.
        let b = open(&mut pool);
        assert_ne!(a, b);
    }

    #[test]
    fn closed_pool_refuses_everything() {
        let mut pool = Pool::new(10);
        open(&mut pool);
        pool.dial_failed();
        assert_eq!(pool.close().len(), 1);
        assert!(pool.is_closed());
        assert!(pool.try_reserve().is_none());
        assert!(pool.add_channel((), PeerSettings::new()).is_none());
        assert!(pool
            .add_channel_and_reserve((), PeerSettings::new())
            .is_none());
        let stats = pool.stats();
        assert_eq!(stats.open_connections(), 0);
        assert_eq!((stats.dials_succeeded, stats.dials_failed), (1, 1));
    }

    #[test]
    fn slot_releases_on_drop_and_remembers_establishment() {
        let pool = shared(2);
        lock(&pool).add_channel((), PeerSettings::new());
        let (mut s1, ()) = Slot::try_reserve(&pool).expect("room");
        let (s2, ()) = Slot::try_reserve(&pool).expect("room");
        assert!(Slot::try_reserve(&pool).is_none());
        s1.mark_established();
        s1.mark_established(); // idempotent
        let id = s1.channel_id();
        assert_eq!(lock(&pool).stalled(id), Some(1));
        drop(s2);
        // cap is 1 now, one stream still there.
        assert!(Slot::try_reserve(&pool).is_none());
        drop(s1);
        assert_eq!(lock(&pool).channel_stats()[0].streams, 0);
        let (s3, ()) = Slot::try_reserve(&pool).expect("room");
        assert!(Slot::try_reserve(&pool).is_none());
        drop(s3);
    }

    /// Many tasks on a multi-threaded runtime reserve, hold, mark, stall and
    /// release at once; no snapshot may ever show a channel over its cap,
    /// and every slot comes back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_reserve_release_never_overshoots() {
        const CAP: usize = 7;
        let pool = shared(CAP);
        for _ in 0..3 {
            lock(&pool).add_channel((), PeerSettings::new());
        }
        let mut tasks = Vec::new();
        for t in 0..64u64 {
            let pool = Arc::clone(&pool);
            tasks.push(tokio::spawn(async move {
                let mut got = 0u32;
                for i in 0..500u64 {
                    let Some((mut slot, ())) = Slot::try_reserve(&pool) else {
                        tokio::task::yield_now().await;
                        continue;
                    };
                    got += 1;
                    {
                        // Channel 3's cap is lowered under its streams by
                        // stalls, so only the others are checked here.
                        let p = lock(&pool);
                        for c in p.channel_stats().iter().filter(|c| c.id != 3) {
                            assert!(c.streams <= c.capacity, "overshoot: {c:?}");
                        }
                    }
                    if (t + i) % 3 == 0 {
                        slot.mark_established();
                    }
                    if slot.channel_id() == 3 && (t * 31 + i) % 97 == 0 {
                        // Occasionally lower a cap, as a stall would.
                        let _ = slot.stalled();
                    }
                    tokio::task::yield_now().await;
                    drop(slot);
                }
                got
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("task panicked");
        }
        assert!(total > 0);
        let p = lock(&pool);
        assert_eq!(p.channel_stats()[0].capacity, CAP);
        for c in p.channel_stats() {
            assert_eq!(c.streams, 0, "leaked slot: {c:?}");
        }
        assert!(p.channels.iter().all(|e| e.established == 0));
    }
}
