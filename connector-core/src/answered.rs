//! What happened to each response after it was made: the bookkeeping behind
//! "every `execute_request` gets exactly one response" across reconnects.
//!
//! The protocol has no acknowledgement for responses, but the stream is
//! ordered: when the server acknowledges heartbeat `k`, it has read every
//! message queued before that heartbeat. So a response is
//!
//! - **waiting**: made while no stream could carry it; sent on the next
//!   stream once the registration is approved again;
//! - **sent, unconfirmed**: queued on stream `g` after heartbeat `tag - 1`;
//!   confirmed (and forgotten) when heartbeat `tag` is acknowledged on `g`;
//! - **maybe lost**: still unconfirmed when stream `g` died. It is *not*
//!   resent on its own (the server may well have read it); if the server
//!   asks again with the same `request_id` on a later stream, the kept
//!   response is replayed instead of running the handler a second time.
//!
//! Everything is bounded by an entry budget, a byte budget and a TTL, the
//! unconfirmed part included (a server that never acks heartbeats cannot
//! grow it). Dropping a waiting response is counted by the caller as
//! expired; dropping an unconfirmed one as a forgotten replay (the
//! exactly-once guarantee for that request is gone).

use std::collections::hash_map::Entry as MapEntry;

use foldhash::fast::RandomState;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use connector_proto::ExecuteResponse;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Waiting,
    Sent { stream: u64, tag: u64 },
}

#[derive(Debug)]
struct Entry {
    response: ExecuteResponse,
    place: Place,
    expires: Instant,
    seq: u64,
}

/// The kept responses of one registration.
#[derive(Debug)]
pub(crate) struct AnsweredLog {
    /// Keyed by request id; the id is shared (one allocation) with the two
    /// queues below, since every response passes through here.
    entries: HashMap<Arc<str>, Entry, RandomState>,
    /// (seq, expiry, id) in insertion order, for TTL and capacity eviction.
    /// Stale triples (the entry was removed or re-inserted) are skipped. The
    /// expiry is here too so the TTL check on every insert needs no lookup.
    order: VecDeque<(u64, Instant, Arc<str>)>,
    /// (stream, tag, seq, id) in the order responses were queued.
    unconfirmed: VecDeque<(u64, u64, u64, Arc<str>)>,
    waiting: usize,
    next_seq: u64,
    capacity: usize,
    max_bytes: usize,
    /// Bytes accounted for the live entries (see [`entry_bytes`]).
    bytes: usize,
    ttl: Duration,
}

/// What had to go to make room (or by TTL).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// Answers that were never sent: lost.
    pub(crate) waiting: u64,
    /// Answers sent but unconfirmed: a repeat of their id runs again.
    pub(crate) unconfirmed: u64,
}

impl Dropped {
    fn add(&mut self, place: Place) {
        match place {
            Place::Waiting => self.waiting += 1,
            Place::Sent { .. } => self.unconfirmed += 1,
        }
    }
}

impl std::ops::AddAssign for Dropped {
    fn add_assign(&mut self, o: Self) {
        self.waiting += o.waiting;
        self.unconfirmed += o.unconfirmed;
    }
}

/// Per-entry bookkeeping beyond its strings: the entry, its map slot and
/// its places in the two queues (measured on 64-bit, rounded up).
const ENTRY_OVERHEAD: usize = 160;

/// The bytes one kept answer costs.
fn entry_bytes(id: &str, r: &ExecuteResponse) -> usize {
    ENTRY_OVERHEAD + id.len() + r.payload.len() + r.error.len()
}

/// What the log knows of a request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    Waiting,
    SentOn(u64),
}

impl AnsweredLog {
    pub(crate) fn new(capacity: usize, max_bytes: usize, ttl: Duration) -> Self {
        Self {
            entries: HashMap::default(),
            order: VecDeque::new(),
            unconfirmed: VecDeque::new(),
            waiting: 0,
            next_seq: 0,
            capacity,
            max_bytes,
            bytes: 0,
            ttl,
        }
    }

    /// Bytes accounted for what is kept now (the budget's measure).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries kept now, waiting or unconfirmed.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Length of the bookkeeping queues (for tests: they stay bounded too).
    #[cfg(test)]
    pub(crate) fn queue_lens(&self) -> (usize, usize) {
        (self.order.len(), self.unconfirmed.len())
    }

    /// Responses waiting for a stream.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting
    }

    pub(crate) fn known(&self, id: &str) -> Option<Known> {
        self.entries.get(id).map(|e| match e.place {
            Place::Waiting => Known::Waiting,
            Place::Sent { stream, .. } => Known::SentOn(stream),
        })
    }

    /// Keeps a response no stream can carry now. Returns how many waiting
    /// responses were dropped to make room (or by TTL).
    pub(crate) fn keep_waiting(&mut self, now: Instant, mut response: ExecuteResponse) -> Dropped {
        let id = std::mem::take(&mut response.request_id);
        self.insert(now, Arc::from(id), response, Place::Waiting)
    }

    /// Records a response queued on `stream` before heartbeat `tag`.
    #[cfg(test)]
    pub(crate) fn sent(
        &mut self,
        now: Instant,
        response: &ExecuteResponse,
        stream: u64,
        tag: u64,
    ) -> Dropped {
        let id = Arc::from(response.request_id.as_str());
        self.sent_with_id(now, response, id, stream, tag)
    }

    /// [`AnsweredLog::sent`] with the id already shared (the in-flight
    /// table's copy): keeping the answer allocates nothing.
    pub(crate) fn sent_with_id(
        &mut self,
        now: Instant,
        response: &ExecuteResponse,
        id: Arc<str>,
        stream: u64,
        tag: u64,
    ) -> Dropped {
        if self.capacity == 0 {
            // Replay is off: nothing to keep, nothing to copy.
            return self.expire(now);
        }
        self.insert(now, id, without_id(response), Place::Sent { stream, tag })
    }

    /// `response` is kept without its id (the map key holds it), so keeping
    /// a copy of a response costs no allocation; `with_id` puts it back.
    fn insert(
        &mut self,
        now: Instant,
        id: Arc<str>,
        response: ExecuteResponse,
        place: Place,
    ) -> Dropped {
        let mut dropped = self.expire(now);
        let cost = entry_bytes(&id, &response);
        if self.capacity == 0 || cost > self.max_bytes {
            // Nothing kept (replay off, or an answer larger than the whole
            // budget): it is gone as soon as it is made.
            if let Some(old) = self.entries.remove(&*id) {
                self.forget(&id, &old);
            }
            dropped.add(place);
            return dropped;
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        self.bytes += cost;
        let expires = match self.entries.entry(Arc::clone(&id)) {
            MapEntry::Occupied(mut slot) => {
                let old = slot.get_mut();
                if old.place == Place::Waiting {
                    self.waiting -= 1;
                }
                self.bytes -= entry_bytes(&id, &old.response);
                let expires = old.expires;
                *old = Entry {
                    response,
                    place,
                    expires,
                    seq,
                };
                expires
            }
            MapEntry::Vacant(slot) => {
                let expires = now + self.ttl;
                slot.insert(Entry {
                    response,
                    place,
                    expires,
                    seq,
                });
                expires
            }
        };
        match place {
            Place::Waiting => self.waiting += 1,
            Place::Sent { stream, tag } => {
                self.unconfirmed
                    .push_back((stream, tag, seq, Arc::clone(&id)))
            }
        }
        self.order.push_back((seq, expires, id));
        while self.entries.len() > self.capacity || self.bytes > self.max_bytes {
            match self.pop_oldest() {
                Some(place) => dropped.add(place),
                None => break,
            }
        }
        self.compact_unconfirmed();
        dropped
    }

    /// Accounting for an entry that left the map.
    fn forget(&mut self, id: &str, e: &Entry) {
        self.bytes -= entry_bytes(id, &e.response);
        if e.place == Place::Waiting {
            self.waiting -= 1;
        }
    }

    /// Removes the oldest live entry; returns where it was.
    fn pop_oldest(&mut self) -> Option<Place> {
        while let Some((seq, _, id)) = self.order.pop_front() {
            if let MapEntry::Occupied(slot) = self.entries.entry(Arc::clone(&id)) {
                if slot.get().seq != seq {
                    continue;
                }
                let e = slot.remove();
                self.forget(&id, &e);
                return Some(e.place);
            }
        }
        None
    }

    /// The unconfirmed queue keeps a triple per answer sent until a
    /// confirmation passes it; entries evicted by the budget (a server
    /// that never acks) leave their triple behind. Past twice the live
    /// entries, the stale triples go (amortised O(1) per insert), so the
    /// queue is bounded by the same budget as the entries.
    fn compact_unconfirmed(&mut self) {
        if self.unconfirmed.len() <= 2 * self.entries.len() + 64 {
            return;
        }
        let entries = &self.entries;
        self.unconfirmed.retain(|(s, tag, seq, id)| {
            entries.get(id).is_some_and(|e| {
                e.seq == *seq
                    && e.place
                        == (Place::Sent {
                            stream: *s,
                            tag: *tag,
                        })
            })
        });
    }

    /// Drops entries past their TTL.
    pub(crate) fn expire(&mut self, now: Instant) -> Dropped {
        let mut dropped = Dropped::default();
        while let Some((seq, expires, id)) = self.order.front() {
            if *expires > now {
                // Expiries grow along the queue, except behind a replayed
                // response (it keeps its first expiry): such an entry can
                // outlive its TTL until the ones ahead of it expire, at most
                // one more TTL. Stale triples are trimmed by `trim_stale`
                // after confirmations, so they do not pile up here.
                break;
            }
            let live = self.entries.get(id).is_some_and(|e| e.seq == *seq);
            match live {
                true => {
                    if let Some(place) = self.pop_oldest() {
                        dropped.add(place);
                    }
                }
                false => {
                    self.order.pop_front();
                }
            }
        }
        dropped
    }

    /// Pops triples at the front of `order` whose entry is gone (confirmed
    /// or taken): one lookup each, once per confirmation batch rather than
    /// on every insert.
    fn trim_stale(&mut self) {
        while let Some((seq, _, id)) = self.order.front() {
            if self.entries.get(id).is_some_and(|e| e.seq == *seq) {
                break;
            }
            self.order.pop_front();
        }
    }

    /// Heartbeat `upto` was acknowledged on `stream`: everything queued
    /// before it arrived.
    pub(crate) fn confirm(&mut self, stream: u64, upto: u64) {
        while let Some(&(s, tag, _, _)) = self.unconfirmed.front() {
            if s == stream && tag > upto {
                break;
            }
            let Some((s, tag, seq, id)) = self.unconfirmed.pop_front() else {
                break;
            };
            if s != stream {
                // A dead stream's unconfirmed entries stay as "maybe lost";
                // only their place in this queue goes.
                continue;
            }
            if let MapEntry::Occupied(slot) = self.entries.entry(Arc::clone(&id)) {
                let e = slot.get();
                if e.seq == seq && e.place == (Place::Sent { stream: s, tag }) {
                    let e = slot.remove();
                    self.bytes -= entry_bytes(&id, &e.response);
                    // In the steady state answers are confirmed in the order
                    // they were kept: drop its triple now, without a lookup.
                    if self
                        .order
                        .front()
                        .is_some_and(|(front, _, _)| *front == seq)
                    {
                        self.order.pop_front();
                    }
                }
            }
        }
        self.trim_stale();
    }

    /// A response queued on a stream but never handed to it: waiting again.
    pub(crate) fn unsent(&mut self, id: &str) {
        if let Some(e) = self.entries.get_mut(id) {
            if e.place != Place::Waiting {
                e.place = Place::Waiting;
                self.waiting += 1;
            }
        }
    }

    /// Takes every waiting response, oldest first, dropping expired ones;
    /// returns them and how many expired.
    pub(crate) fn take_waiting(&mut self, now: Instant) -> (Vec<ExecuteResponse>, Dropped) {
        let expired = self.expire(now);
        if self.waiting == 0 {
            return (Vec::new(), expired);
        }
        let mut out = Vec::with_capacity(self.waiting);
        for (seq, _, id) in &self.order {
            if let MapEntry::Occupied(slot) = self.entries.entry(Arc::clone(id)) {
                if slot.get().seq == *seq && slot.get().place == Place::Waiting {
                    let e = slot.remove();
                    self.bytes -= entry_bytes(id, &e.response);
                    out.push(with_id(e.response, id));
                }
            }
        }
        self.waiting = 0;
        self.trim_stale();
        (out, expired)
    }

    /// The kept response for a request the server asked for again.
    pub(crate) fn replay(&self, id: &str) -> Option<ExecuteResponse> {
        self.entries
            .get(id)
            .map(|e| with_id(without_id(&e.response), id))
    }
}

/// A copy of `r` without its request id: no string is copied (the error
/// text is empty on success, the payload is shared).
fn without_id(r: &ExecuteResponse) -> ExecuteResponse {
    ExecuteResponse {
        request_id: String::new(),
        success: r.success,
        payload: r.payload.clone(),
        encoding: r.encoding,
        error: r.error.clone(),
        duration_ms: r.duration_ms,
        error_kind: r.error_kind,
    }
}

fn with_id(mut r: ExecuteResponse, id: &str) -> ExecuteResponse {
    r.request_id = id.to_string();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(id: &str) -> ExecuteResponse {
        ExecuteResponse {
            request_id: id.into(),
            success: true,
            ..Default::default()
        }
    }

    #[test]
    fn confirmation_forgets_what_the_server_read() {
        let now = Instant::now();
        let mut log = AnsweredLog::new(100, 1 << 20, Duration::from_secs(60));
        log.sent(now, &resp("a"), 1, 1);
        log.sent(now, &resp("b"), 1, 2);
        log.confirm(1, 1);
        assert_eq!(log.known("a"), None);
        assert_eq!(log.known("b"), Some(Known::SentOn(1)));
        log.confirm(1, 2);
        assert_eq!(log.known("b"), None);
    }

    #[test]
    fn unconfirmed_of_a_dead_stream_stay_for_replay() {
        let now = Instant::now();
        let mut log = AnsweredLog::new(100, 1 << 20, Duration::from_secs(60));
        log.sent(now, &resp("a"), 1, 1);
        log.sent(now, &resp("b"), 2, 1);
        log.confirm(2, 1);
        assert_eq!(log.known("a"), Some(Known::SentOn(1)));
        assert_eq!(log.known("b"), None);
        assert_eq!(log.replay("a").map(|r| r.request_id), Some("a".into()));
    }

    #[test]
    fn waiting_responses_come_back_in_order_and_expire() {
        let now = Instant::now();
        let mut log = AnsweredLog::new(100, 1 << 20, Duration::from_secs(1));
        log.keep_waiting(now, resp("a"));
        log.keep_waiting(now + Duration::from_millis(500), resp("b"));
        let (out, expired) = log.take_waiting(now + Duration::from_millis(1200));
        assert_eq!(expired.waiting, 1);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].request_id, "b");
        assert_eq!(log.waiting(), 0);
    }

    #[test]
    fn capacity_is_a_hard_bound_and_drops_are_counted() {
        let now = Instant::now();
        let mut log = AnsweredLog::new(3, 1 << 20, Duration::from_secs(60));
        let mut dropped = 0;
        for i in 0..10 {
            dropped += log.keep_waiting(now, resp(&format!("r{i}"))).waiting;
            assert!(log.entries.len() <= 3);
        }
        assert_eq!(dropped, 7);
        assert_eq!(log.waiting(), 3);
        let (out, _) = log.take_waiting(now);
        let ids: Vec<_> = out.into_iter().map(|r| r.request_id).collect();
        assert_eq!(ids, vec!["r7", "r8", "r9"]);
    }

    #[test]
    fn unsent_goes_back_to_waiting() {
        let now = Instant::now();
        let mut log = AnsweredLog::new(10, 1 << 20, Duration::from_secs(60));
        log.sent(now, &resp("a"), 1, 1);
        log.unsent("a");
        assert_eq!(log.known("a"), Some(Known::Waiting));
        assert_eq!(log.waiting(), 1);
    }

    #[test]
    fn confirmed_responses_leave_nothing_behind() {
        // A busy stream: ten thousand answers confirmed in batches of 32.
        // The bookkeeping queues must not keep a trace of each one for a
        // whole TTL.
        let now = Instant::now();
        let mut log = AnsweredLog::new(1024, 1 << 20, Duration::from_secs(300));
        for batch in 0..(10_000 / 32) {
            for i in 0..32 {
                log.sent(now, &resp(&format!("r{batch}-{i}")), 1, batch + 1);
            }
            log.confirm(1, batch + 1);
            assert!(log.entries.is_empty());
            assert!(log.order.is_empty(), "order holds {}", log.order.len());
            assert!(log.unconfirmed.is_empty());
        }
    }

    #[test]
    fn a_server_that_never_acks_cannot_grow_the_log_past_its_byte_budget() {
        // 24 000 answers with 16 KiB ids, never confirmed: the bytes
        // accounted stay under the budget, the bookkeeping queues stay
        // bounded, and every forgotten unconfirmed answer is counted.
        let now = Instant::now();
        let budget = 4 << 20;
        let mut log = AnsweredLog::new(100_000, budget, Duration::from_secs(3600));
        let mut forgotten = 0;
        for i in 0..24_000u64 {
            let id = format!("{i:016}{}", "x".repeat(16 * 1024));
            let d = log.sent(now, &resp(&id), 1, 1);
            assert_eq!(d.waiting, 0);
            forgotten += d.unconfirmed;
            assert!(log.bytes() <= budget, "{} > {budget}", log.bytes());
            let (order, unconfirmed) = log.queue_lens();
            assert!(order <= 2 * log.len() + 64 + 1, "order {order}");
            assert!(
                unconfirmed <= 2 * log.len() + 64 + 1,
                "unconfirmed {unconfirmed}"
            );
        }
        let kept = log.len() as u64;
        assert!(kept > 100 && kept < 300, "kept {kept}");
        assert_eq!(forgotten + kept, 24_000);
        // Entries are exactly accounted: forgetting everything leaves 0.
        log.confirm(1, 1);
        assert_eq!(log.bytes(), 0);
        assert_eq!(log.len(), 0);
    }

    #[test]
    fn an_answer_larger_than_the_budget_is_not_kept_and_is_counted() {
        let now = Instant::now();
        let mut log = AnsweredLog::new(10, 2048, Duration::from_secs(60));
        let big = ExecuteResponse {
            request_id: "big".into(),
            payload: vec![0u8; 4096].into(),
            ..Default::default()
        };
        assert_eq!(log.keep_waiting(now, big).waiting, 1);
        assert_eq!(log.waiting(), 0);
        assert_eq!(log.bytes(), 0);
    }
}
