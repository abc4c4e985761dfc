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
use hashbrown::HashTable;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use connector_proto::ExecuteResponse;
use tokio::time::Instant;

/// Where an answer kept off the current stream's ring is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Waiting,
    /// Sent on `stream`, which died before confirming it: maybe lost.
    Lost {
        stream: u64,
    },
}

#[derive(Debug)]
struct Entry {
    response: ExecuteResponse,
    place: Place,
    expires: Instant,
    seq: u64,
}

/// An answer sent on the current stream and not confirmed yet.
#[derive(Debug)]
struct Sent {
    /// The heartbeat whose ack confirms it.
    tag: u64,
    /// `id`'s hash in `ring_index`, kept so that confirming an answer,
    /// long after it was made, neither hashes nor compares its id.
    hash: u64,
    id: Arc<str>,
    response: ExecuteResponse,
    expires: Instant,
}

/// The kept responses of one registration, once it has kept any (see
/// [`AnsweredLog`]).
///
/// Answers sent on the current stream are the hot path (every response
/// passes through): they go to `ring`, in the order queued, which is the
/// order the server confirms them in, so a confirmation pops from its
/// front. Only an index from id to place is kept beside it, for the
/// "asked again" check. When the stream dies the ring's answers move to
/// `entries` as maybe lost; answers made with no stream wait there too.
#[derive(Debug)]
struct Kept {
    /// Waiting and maybe-lost answers, keyed by request id (shared, one
    /// allocation, with `order`).
    entries: HashMap<Arc<str>, Entry, RandomState>,
    /// (seq, expiry, id) of `entries` in insertion order, for TTL and
    /// capacity eviction. Stale triples (the entry was removed or
    /// re-inserted) are skipped. The expiry is here too so the TTL check
    /// on every insert needs no lookup.
    order: VecDeque<(u64, Instant, Arc<str>)>,
    waiting: usize,
    next_seq: u64,
    /// The current stream's unconfirmed answers; `ring[i]` has position
    /// `ring_head + i`.
    ring: VecDeque<Sent>,
    ring_head: u64,
    /// The stream the ring belongs to.
    ring_stream: u64,
    /// Position in the ring of each id in it, hashed with `hasher`. A
    /// table of positions rather than a map keyed by id: a confirmation
    /// removes its entry by stored hash and position, without reading the
    /// id's string (at a thousand busy registrations that string and the
    /// map slot are long out of cache by the time the heartbeat ack comes
    /// back, and the keyed remove was 8 % of the per-response cost).
    ring_index: HashTable<u64>,
    hasher: RandomState,
    capacity: usize,
    max_bytes: usize,
    /// Bytes accounted for everything kept (see [`entry_bytes`]).
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
            Place::Lost { .. } => self.unconfirmed += 1,
        }
    }
}

impl std::ops::AddAssign for Dropped {
    fn add_assign(&mut self, o: Self) {
        self.waiting += o.waiting;
        self.unconfirmed += o.unconfirmed;
    }
}

/// Per-entry bookkeeping beyond its strings: the entry, its index or map
/// slot and its queue place (measured on 64-bit, rounded up).
const ENTRY_OVERHEAD: usize = 160;

/// The bytes one kept answer costs.
fn entry_bytes(id: &str, r: &ExecuteResponse) -> usize {
    ENTRY_OVERHEAD + id.len() + r.payload.len() + r.error.len()
}

/// The kept responses of one registration. The bookkeeping (maps, queues,
/// counters: ~230 bytes) is allocated with the first answer kept: an idle
/// registration, most of a large fleet's, carries a pointer and its
/// budget, not empty tables.
#[derive(Debug)]
pub(crate) struct AnsweredLog {
    kept: Option<Box<Kept>>,
    capacity: usize,
    max_bytes: usize,
    ttl: Duration,
}

impl AnsweredLog {
    pub(crate) fn new(capacity: usize, max_bytes: usize, ttl: Duration) -> Self {
        Self {
            kept: None,
            capacity,
            max_bytes,
            ttl,
        }
    }

    fn kept_mut(&mut self) -> &mut Kept {
        let (capacity, max_bytes, ttl) = (self.capacity, self.max_bytes, self.ttl);
        self.kept
            .get_or_insert_with(|| Box::new(Kept::new(capacity, max_bytes, ttl)))
    }

    /// Bytes accounted for what is kept now (the budget's measure).
    pub(crate) fn bytes(&self) -> usize {
        self.kept.as_ref().map_or(0, |k| k.bytes)
    }

    /// Entries kept now, waiting or unconfirmed.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.kept.as_ref().map_or(0, |k| k.len())
    }

    /// Length of the bookkeeping queue and the index (for tests: they
    /// stay bounded too).
    #[cfg(test)]
    pub(crate) fn queue_lens(&self) -> (usize, usize) {
        self.kept
            .as_ref()
            .map_or((0, 0), |k| (k.order.len(), k.ring_index.len()))
    }

    /// Responses waiting for a stream.
    pub(crate) fn waiting(&self) -> usize {
        self.kept.as_ref().map_or(0, |k| k.waiting)
    }

    pub(crate) fn known(&self, id: &str) -> Option<Known> {
        self.kept.as_ref()?.known(id)
    }

    /// Keeps a response no stream can carry now. Returns how many waiting
    /// responses were dropped to make room (or by TTL).
    pub(crate) fn keep_waiting(&mut self, now: Instant, response: ExecuteResponse) -> Dropped {
        self.kept_mut().keep_waiting(now, response)
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
    /// table's copy): keeping the answer allocates nothing (beyond the
    /// ring's and the index's amortised growth).
    pub(crate) fn sent_with_id(
        &mut self,
        now: Instant,
        response: &ExecuteResponse,
        id: Arc<str>,
        stream: u64,
        tag: u64,
    ) -> Dropped {
        if self.capacity == 0 {
            // Replay is off: nothing to keep, nothing to copy, nothing to
            // allocate.
            return self.expire(now);
        }
        self.kept_mut().push_sent(now, response, id, (stream, tag))
    }

    /// The current stream is gone: what it did not confirm is maybe lost.
    pub(crate) fn stream_ended(&mut self) {
        if let Some(k) = &mut self.kept {
            k.stream_ended();
        }
    }

    /// Drops entries past their TTL.
    pub(crate) fn expire(&mut self, now: Instant) -> Dropped {
        self.kept
            .as_mut()
            .map_or_else(Dropped::default, |k| k.expire(now))
    }

    /// Forgets the answers of `stream` queued before heartbeat `upto`: the
    /// server has read them.
    pub(crate) fn confirm(&mut self, stream: u64, upto: u64) {
        if let Some(k) = &mut self.kept {
            k.confirm(stream, upto);
        }
    }

    /// A response queued on a stream but never handed to it: waiting again.
    pub(crate) fn unsent(&mut self, id: &str) {
        if let Some(k) = &mut self.kept {
            k.unsent(id);
        }
    }

    /// Takes every waiting response, oldest first, dropping expired ones;
    /// returns them and how many expired.
    pub(crate) fn take_waiting(&mut self, now: Instant) -> (Vec<ExecuteResponse>, Dropped) {
        match &mut self.kept {
            Some(k) => k.take_waiting(now),
            None => (Vec::new(), Dropped::default()),
        }
    }

    /// The kept response for a request the server asked for again.
    pub(crate) fn replay(&self, id: &str) -> Option<ExecuteResponse> {
        self.kept.as_ref()?.replay(id)
    }
}

/// What the log knows of a request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    Waiting,
    SentOn(u64),
}

impl Kept {
    fn new(capacity: usize, max_bytes: usize, ttl: Duration) -> Self {
        Self {
            entries: HashMap::default(),
            order: VecDeque::new(),
            waiting: 0,
            next_seq: 0,
            ring: VecDeque::new(),
            ring_head: 0,
            ring_stream: 0,
            ring_index: HashTable::new(),
            hasher: RandomState::default(),
            capacity,
            max_bytes,
            bytes: 0,
            ttl,
        }
    }

    /// Entries kept now, waiting or unconfirmed.
    fn len(&self) -> usize {
        self.entries.len() + self.ring.len()
    }

    fn known(&self, id: &str) -> Option<Known> {
        if self.ring_position(id).is_some() {
            return Some(Known::SentOn(self.ring_stream));
        }
        self.entries.get(id).map(|e| match e.place {
            Place::Waiting => Known::Waiting,
            Place::Lost { stream } => Known::SentOn(stream),
        })
    }

    /// Keeps a response no stream can carry now. Returns how many waiting
    /// responses were dropped to make room (or by TTL).
    fn keep_waiting(&mut self, now: Instant, mut response: ExecuteResponse) -> Dropped {
        let id = std::mem::take(&mut response.request_id);
        self.insert(now, Arc::from(id), response, Place::Waiting)
    }

    /// [`AnsweredLog::sent_with_id`] once replay is known to be on: the
    /// answer goes to the ring, sent on `stream` before heartbeat `tag`.
    fn push_sent(
        &mut self,
        now: Instant,
        response: &ExecuteResponse,
        id: Arc<str>,
        (stream, tag): (u64, u64),
    ) -> Dropped {
        if stream != self.ring_stream {
            self.stream_ended();
            self.ring_stream = stream;
        }
        let mut dropped = self.expire(now);
        let mut response = without_id(response);
        response.payload = compact(std::mem::take(&mut response.payload));
        let mut expires = now + self.ttl;
        // A replayed answer leaves the maybe-lost entries (it keeps its
        // first expiry, so replays cannot keep it forever).
        if !self.entries.is_empty() {
            if let Some(old) = self.entries.remove(&*id) {
                self.forget(&id, &old);
                expires = old.expires.min(expires);
            }
        }
        let cost = entry_bytes(&id, &response);
        if cost > self.max_bytes {
            // An answer larger than the whole budget is gone as soon as it
            // is made.
            dropped.unconfirmed += 1;
            return dropped;
        }
        let pos = self.ring_head + self.ring.len() as u64;
        let hash = self.hasher.hash_one(&*id);
        self.ring.push_back(Sent {
            tag,
            hash,
            id,
            response,
            expires,
        });
        // An id already in the ring (not reachable through the state
        // machine) keeps its older answer unindexed: the index points at
        // the newer one, and the older is popped without touching it (see
        // `pop_ring`).
        let (ring, head) = (&self.ring, self.ring_head);
        let at = |p: u64| &ring[(p - head) as usize];
        let id = &*at(pos).id;
        match self
            .ring_index
            .entry(hash, |&p| *at(p).id == *id, |&p| at(p).hash)
        {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = pos,
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(pos);
            }
        }
        self.bytes += cost;
        self.enforce_budget(&mut dropped);
        dropped
    }

    /// The current stream is gone: what it did not confirm is maybe lost.
    fn stream_ended(&mut self) {
        if self.ring.is_empty() {
            return;
        }
        let stream = self.ring_stream;
        self.ring_index.clear();
        self.ring_head += self.ring.len() as u64;
        for s in std::mem::take(&mut self.ring) {
            self.next_seq += 1;
            let seq = self.next_seq;
            let entry = Entry {
                response: s.response,
                place: Place::Lost { stream },
                expires: s.expires,
                seq,
            };
            // Costs move with the answers: `bytes` is unchanged, unless a
            // duplicate id replaces an older entry.
            if let Some(old) = self.entries.insert(Arc::clone(&s.id), entry) {
                self.forget(&s.id, &old);
            }
            self.order.push_back((seq, s.expires, s.id));
        }
        self.compact_order();
    }

    /// Pops the ring's oldest answer.
    fn pop_ring(&mut self) -> Option<Sent> {
        let s = self.ring.pop_front()?;
        let pos = self.ring_head;
        self.ring_head += 1;
        // A later copy of the same id owns the index entry, if any: then
        // nothing here matches `pos`.
        if let Ok(e) = self.ring_index.find_entry(s.hash, |&p| p == pos) {
            e.remove();
        }
        self.bytes -= entry_bytes(&s.id, &s.response);
        Some(s)
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
        if place == Place::Waiting {
            self.waiting += 1;
        }
        self.order.push_back((seq, expires, id));
        self.enforce_budget(&mut dropped);
        self.compact_order();
        dropped
    }

    /// Past the entry or byte budget, the oldest go: maybe-lost and
    /// waiting answers first, then the ring's oldest.
    fn enforce_budget(&mut self, dropped: &mut Dropped) {
        while self.len() > self.capacity || self.bytes > self.max_bytes {
            if let Some(place) = self.pop_oldest() {
                dropped.add(place);
            } else if self.pop_ring().is_some() {
                dropped.unconfirmed += 1;
            } else {
                break;
            }
        }
    }

    /// Accounting for an entry that left the map.
    fn forget(&mut self, id: &str, e: &Entry) {
        self.bytes -= entry_bytes(id, &e.response);
        if e.place == Place::Waiting {
            self.waiting -= 1;
        }
    }

    /// Removes the oldest live entry of the map; returns where it was.
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

    /// Entries removed from the middle of the map (taken, replayed) leave
    /// their triple in `order`. Past twice the live entries, the stale
    /// triples go (amortised O(1) per insert), so the queue is bounded by
    /// the same budget as the entries.
    fn compact_order(&mut self) {
        if self.order.len() <= 2 * self.entries.len() + 64 {
            return;
        }
        let entries = &self.entries;
        self.order
            .retain(|(seq, _, id)| entries.get(id).is_some_and(|e| e.seq == *seq));
    }

    /// Drops entries past their TTL.
    fn expire(&mut self, now: Instant) -> Dropped {
        let mut dropped = Dropped::default();
        while self.ring.front().is_some_and(|s| s.expires <= now) {
            // Unconfirmed for a whole TTL: a server that does not ack.
            if self.pop_ring().is_some() {
                dropped.unconfirmed += 1;
            }
        }
        while let Some((seq, expires, id)) = self.order.front() {
            if *expires > now {
                // Expiries grow along the queue, except behind a replayed
                // response (it keeps its first expiry): such an entry can
                // outlive its TTL until the ones ahead of it expire, at most
                // one more TTL.
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

    /// Pops triples at the front of `order` whose entry is gone (taken):
    /// one lookup each.
    fn trim_stale(&mut self) {
        while let Some((seq, _, id)) = self.order.front() {
            if self.entries.get(id).is_some_and(|e| e.seq == *seq) {
                break;
            }
            self.order.pop_front();
        }
    }

    /// Heartbeat `upto` was acknowledged on `stream`: everything queued
    /// on it before that heartbeat arrived. In the steady state this pops
    /// the ring's front, one index removal per answer.
    fn confirm(&mut self, stream: u64, upto: u64) {
        if stream != self.ring_stream {
            return;
        }
        while self.ring.front().is_some_and(|s| s.tag <= upto) {
            self.pop_ring();
        }
    }

    /// A response queued on a stream but never handed to it: waiting again.
    /// (One the current stream carries again, after a replay, stays.)
    fn unsent(&mut self, id: &str) {
        if let Some(e) = self.entries.get_mut(id) {
            if e.place != Place::Waiting {
                e.place = Place::Waiting;
                self.waiting += 1;
            }
        }
    }

    /// Takes every waiting response, oldest first, dropping expired ones;
    /// returns them and how many expired.
    fn take_waiting(&mut self, now: Instant) -> (Vec<ExecuteResponse>, Dropped) {
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

    /// The ring's (indexed, so newest) answer for `id`.
    fn ring_position(&self, id: &str) -> Option<&Sent> {
        if self.ring.is_empty() {
            return None;
        }
        let hash = self.hasher.hash_one(id);
        let head = self.ring_head;
        let at = |p: u64| {
            p.checked_sub(head)
                .and_then(|i| self.ring.get(usize::try_from(i).ok()?))
        };
        let pos = *self
            .ring_index
            .find(hash, |&p| at(p).is_some_and(|s| &*s.id == id))?;
        at(pos)
    }

    /// The kept response for a request the server asked for again.
    fn replay(&self, id: &str) -> Option<ExecuteResponse> {
        if let Some(s) = self.ring_position(id) {
            return Some(with_id(without_id(&s.response), id));
        }
        self.entries
            .get(id)
            .map(|e| with_id(without_id(&e.response), id))
    }
}

/// Payloads from this size on are copied when kept (see [`compact`]).
const COMPACT_FROM: usize = 1024;

/// A payload as the log keeps it. An echoed payload is a slice of the
/// transport's receive buffer (tonic decodes `bytes` fields without a
/// copy), and keeping the slice keeps that whole buffer: with 4 KiB
/// answers, each kept answer held 8 KiB and more of receive buffers until
/// its heartbeat was acknowledged. A large payload is copied to a buffer
/// of its own (one copy, small next to encoding it); a small one stays
/// shared, where a copy would cost more than it frees.
fn compact(payload: bytes::Bytes) -> bytes::Bytes {
    if payload.len() < COMPACT_FROM {
        return payload;
    }
    bytes::Bytes::copy_from_slice(&payload)
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

    /// The bookkeeping of a log that has kept something.
    fn kept(log: &AnsweredLog) -> &Kept {
        log.kept.as_deref().expect("the log has kept an answer")
    }

    fn resp(id: &str) -> ExecuteResponse {
        ExecuteResponse {
            request_id: id.into(),
            success: true,
            ..Default::default()
        }
    }

    /// Now, and a log of `entries` entries, 1 MiB and a TTL of `ttl_secs`.
    fn start(entries: usize, ttl_secs: u64) -> (Instant, AnsweredLog) {
        let log = AnsweredLog::new(entries, 1 << 20, Duration::from_secs(ttl_secs));
        (Instant::now(), log)
    }

    #[test]
    fn a_log_that_kept_nothing_allocates_nothing() {
        let (now, mut log) = start(100, 60);
        assert_eq!(log.known("a"), None);
        assert_eq!(log.expire(now), Dropped::default());
        log.confirm(1, 5);
        log.stream_ended();
        log.unsent("a");
        assert_eq!(log.take_waiting(now).0.len(), 0);
        assert_eq!(log.replay("a"), None);
        assert!(log.kept.is_none(), "reads and no-ops allocate nothing");
        // Replay off: an answer is not kept, and nothing is allocated for it.
        let mut off = AnsweredLog::new(0, 1 << 20, Duration::from_secs(60));
        assert_eq!(off.sent(now, &resp("a"), 1, 1), Dropped::default());
        assert!(off.kept.is_none());
        // The first answer kept allocates the bookkeeping.
        log.sent(now, &resp("a"), 1, 1);
        assert_eq!(log.known("a"), Some(Known::SentOn(1)));
        assert!(std::mem::size_of::<AnsweredLog>() <= 48);
    }

    #[test]
    fn confirmation_forgets_what_the_server_read() {
        let (now, mut log) = start(100, 60);
        log.sent(now, &resp("a"), 1, 1);
        log.sent(now, &resp("b"), 1, 2);
        log.confirm(1, 1);
        assert_eq!(log.known("a"), None);
        assert_eq!(log.known("b"), Some(Known::SentOn(1)));
        log.confirm(1, 2);
        assert_eq!(log.known("b"), None);
    }

    #[test]
    fn an_id_sent_twice_on_a_stream_stays_known_until_its_newer_answer_is_confirmed() {
        // Not reachable through the state machine, but the index must not
        // lose the newer copy when the older one is confirmed.
        let (now, mut log) = start(100, 60);
        let mut older = resp("a");
        older.payload = bytes::Bytes::from_static(b"1");
        let mut newer = resp("a");
        newer.payload = bytes::Bytes::from_static(b"2");
        log.sent(now, &older, 1, 1);
        log.sent(now, &newer, 1, 2);
        assert_eq!(log.queue_lens().1, 1, "one index entry, for the newer");
        log.confirm(1, 1);
        assert_eq!(log.known("a"), Some(Known::SentOn(1)));
        assert_eq!(
            log.replay("a").map(|r| r.payload),
            Some(bytes::Bytes::from_static(b"2"))
        );
        log.confirm(1, 2);
        assert_eq!(log.known("a"), None);
        assert_eq!(log.queue_lens(), (0, 0));
        assert_eq!(log.bytes(), 0);
    }

    #[test]
    fn unconfirmed_of_a_dead_stream_stay_for_replay() {
        let (now, mut log) = start(100, 60);
        log.sent(now, &resp("a"), 1, 1);
        log.sent(now, &resp("b"), 2, 1);
        log.confirm(2, 1);
        assert_eq!(log.known("a"), Some(Known::SentOn(1)));
        assert_eq!(log.known("b"), None);
        assert_eq!(log.replay("a").map(|r| r.request_id), Some("a".into()));
    }

    #[test]
    fn a_replayed_answer_moves_to_the_new_stream_and_is_confirmed_there() {
        let (now, mut log) = start(100, 60);
        log.sent(now, &resp("a"), 1, 1);
        log.sent(now, &resp("b"), 1, 1);
        log.stream_ended();
        assert_eq!(log.known("a"), Some(Known::SentOn(1)));
        let again = log.replay("a").expect("kept");
        log.sent(now, &again, 2, 1);
        assert_eq!(log.known("a"), Some(Known::SentOn(2)));
        assert_eq!(log.len(), 2);
        log.confirm(2, 1);
        assert_eq!(log.known("a"), None);
        // "b" was not asked again: still maybe lost on stream 1.
        assert_eq!(log.known("b"), Some(Known::SentOn(1)));
        assert_eq!(log.len(), 1);
    }

    #[test]
    fn unconfirmed_answers_expire_by_ttl_and_are_counted() {
        let (now, mut log) = start(100, 1);
        log.sent(now, &resp("a"), 1, 1);
        let d = log.sent(now + Duration::from_secs(2), &resp("b"), 1, 1);
        assert_eq!(d.unconfirmed, 1);
        assert_eq!(log.known("a"), None);
        assert_eq!(log.len(), 1);
    }

    #[test]
    fn waiting_responses_come_back_in_order_and_expire() {
        let (now, mut log) = start(100, 1);
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
        let (now, mut log) = start(3, 60);
        let mut dropped = 0;
        for i in 0..10 {
            dropped += log.keep_waiting(now, resp(&format!("r{i}"))).waiting;
            assert!(kept(&log).entries.len() <= 3);
        }
        assert_eq!(dropped, 7);
        assert_eq!(log.waiting(), 3);
        let (out, _) = log.take_waiting(now);
        let ids: Vec<_> = out.into_iter().map(|r| r.request_id).collect();
        assert_eq!(ids, vec!["r7", "r8", "r9"]);
    }

    #[test]
    fn unsent_goes_back_to_waiting() {
        let (now, mut log) = start(10, 60);
        log.sent(now, &resp("a"), 1, 1);
        log.stream_ended();
        log.unsent("a");
        assert_eq!(log.known("a"), Some(Known::Waiting));
        assert_eq!(log.waiting(), 1);
    }

    #[test]
    fn confirmed_responses_leave_nothing_behind() {
        // A busy stream: ten thousand answers confirmed in batches of 32.
        // The bookkeeping queues must not keep a trace of each one for a
        // whole TTL.
        let (now, mut log) = start(1024, 300);
        for batch in 0..(10_000 / 32) {
            for i in 0..32 {
                log.sent(now, &resp(&format!("r{batch}-{i}")), 1, batch + 1);
            }
            log.confirm(1, batch + 1);
            assert!(kept(&log).entries.is_empty());
            assert!(
                kept(&log).order.is_empty(),
                "order holds {}",
                kept(&log).order.len()
            );
            assert!(kept(&log).ring.is_empty());
            assert!(kept(&log).ring_index.is_empty());
            assert_eq!(log.bytes(), 0);
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
            let (order, index) = log.queue_lens();
            assert!(order <= 2 * log.len() + 64 + 1, "order {order}");
            assert!(index <= log.len(), "index {index}");
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
