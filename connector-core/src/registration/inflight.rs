//! The requests a registration has received and not yet answered.
//!
//! Each one is a [`Slot`]: `Queued` (waiting for a concurrency slot, the
//! request kept) or `Running` (its handler started). The wait queue is
//! *lazily skipped*: a queued request that is cancelled or times out leaves
//! the table in O(1) and its ticket in the queue goes stale; stale tickets
//! are skipped when the queue is popped, and compacted away once they
//! outnumber the live ones (amortised O(1)), so a cancel flood costs
//! constant time per cancel and bounded memory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use connector_proto::ExecuteRequest;
use foldhash::fast::RandomState;
use tokio::time::Instant;

/// Where a request in flight is.
#[derive(Debug)]
pub(super) enum Slot {
    /// Waiting for a slot; `ticket` matches its place in the queue.
    Queued {
        request: Box<ExecuteRequest>,
        ticket: u64,
        bytes: usize,
    },
    /// Its handler runs.
    Running,
}

#[derive(Debug)]
struct Entry {
    received_at: Instant,
    deadline: Option<(Instant, u64)>,
    slot: Slot,
}

/// What a request that left the table was.
#[derive(Debug)]
pub(super) struct Left {
    /// The table's copy of the id, handed back so the answer can carry it
    /// without another allocation.
    pub(super) id: Arc<str>,
    pub(super) received_at: Instant,
    pub(super) was_running: bool,
}

/// The in-flight table. foldhash (randomly seeded per process) instead of
/// SipHash: ids are hashed several times per execute and SipHash was a
/// tenth of the SDK's per-response cost. Ids are `Arc<str>`: the one copy
/// made when a request arrives is shared with the driver (which needs it
/// to report the handler's result) and the answered log (which keeps it
/// until the answer is confirmed), one allocation per request instead of
/// three.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    map: HashMap<Arc<str>, Entry, RandomState>,
    queue: VecDeque<(u64, Arc<str>)>,
    next_ticket: u64,
    queued: usize,
    queued_bytes: usize,
    running: usize,
    deadlines: BTreeMap<(Instant, u64), Arc<str>>,
    deadline_seq: u64,
}

/// The bytes a queued request costs (what the server chose to send).
pub(super) fn request_bytes(r: &ExecuteRequest) -> usize {
    128 + r.request_id.len()
        + r.capability_id.len()
        + r.payload.len()
        + r.context
            .iter()
            .map(|(k, v)| k.len() + v.len() + 48)
            .sum::<usize>()
}

impl InFlight {
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
    pub(super) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub(super) fn running(&self) -> usize {
        self.running
    }
    pub(super) fn queued(&self) -> usize {
        self.queued
    }
    pub(super) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }
    pub(super) fn contains(&self, id: &str) -> bool {
        self.map.contains_key(id)
    }
    /// The table's shared copy of `id`.
    pub(super) fn shared_id(&self, id: &str) -> Option<Arc<str>> {
        self.map.get_key_value(id).map(|(k, _)| Arc::clone(k))
    }
    #[cfg(test)]
    pub(super) fn is_running(&self, id: &str) -> bool {
        matches!(
            self.map.get(id),
            Some(Entry {
                slot: Slot::Running,
                ..
            })
        )
    }
    /// Length of the wait queue, stale tickets included (tests: bounded).
    #[cfg(test)]
    pub(super) fn queue_len(&self) -> usize {
        self.queue.len()
    }

    fn deadline(
        &mut self,
        id: &Arc<str>,
        now: Instant,
        timeout: Option<Duration>,
    ) -> Option<(Instant, u64)> {
        timeout.map(|t| {
            self.deadline_seq += 1;
            let at = (now + t, self.deadline_seq);
            self.deadlines.insert(at, Arc::clone(id));
            at
        })
    }

    /// A request whose handler starts now.
    pub(super) fn insert_running(&mut self, id: Arc<str>, now: Instant, timeout: Option<Duration>) {
        let deadline = self.deadline(&id, now, timeout);
        self.running += 1;
        self.map.insert(
            id,
            Entry {
                received_at: now,
                deadline,
                slot: Slot::Running,
            },
        );
    }

    /// A request that waits for a slot.
    pub(super) fn insert_queued(
        &mut self,
        request: Box<ExecuteRequest>,
        now: Instant,
        timeout: Option<Duration>,
    ) {
        let id: Arc<str> = Arc::from(request.request_id.as_str());
        let deadline = self.deadline(&id, now, timeout);
        let bytes = request_bytes(&request);
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.queue.push_back((ticket, Arc::clone(&id)));
        self.queued += 1;
        self.queued_bytes += bytes;
        self.map.insert(
            id,
            Entry {
                received_at: now,
                deadline,
                slot: Slot::Queued {
                    request,
                    ticket,
                    bytes,
                },
            },
        );
        self.compact();
    }

    /// Takes `id` out of the table, wherever it is: O(1) (plus the
    /// deadline's O(log n)), for a queued request too.
    pub(super) fn remove(&mut self, id: &str) -> Option<Left> {
        let (id, e) = self.map.remove_entry(id)?;
        if let Some(at) = e.deadline {
            self.deadlines.remove(&at);
        }
        let was_running = match e.slot {
            Slot::Running => {
                self.running -= 1;
                true
            }
            Slot::Queued { bytes, .. } => {
                self.queued -= 1;
                self.queued_bytes -= bytes;
                self.compact();
                false
            }
        };
        Some(Left {
            id,
            received_at: e.received_at,
            was_running,
        })
    }

    /// Takes `id` out of the table if its handler runs (one lookup; a
    /// queued request of that id stays).
    pub(super) fn remove_running(&mut self, id: &str) -> Option<Left> {
        let (id, e) = self.map.remove_entry(id)?;
        if !matches!(e.slot, Slot::Running) {
            // Rare: a handler of an earlier request with this id finished
            // after its answer while the id waits again. Put it back.
            self.map.insert(id, e);
            return None;
        }
        if let Some(at) = e.deadline {
            self.deadlines.remove(&at);
        }
        self.running -= 1;
        Some(Left {
            id,
            received_at: e.received_at,
            was_running: true,
        })
    }

    /// The oldest queued request, now marked running; stale tickets are
    /// skipped.
    pub(super) fn start_next(&mut self) -> Option<Box<ExecuteRequest>> {
        while let Some((ticket, id)) = self.queue.pop_front() {
            let Some(e) = self.map.get_mut(&id) else {
                continue;
            };
            match &e.slot {
                Slot::Queued { ticket: t, .. } if *t == ticket => {}
                _ => continue,
            }
            let Slot::Queued { request, bytes, .. } = std::mem::replace(&mut e.slot, Slot::Running)
            else {
                continue;
            };
            self.queued -= 1;
            self.queued_bytes -= bytes;
            self.running += 1;
            return Some(request);
        }
        None
    }

    fn compact(&mut self) {
        if self.queue.len() <= 2 * self.queued + 64 {
            return;
        }
        let map = &self.map;
        self.queue.retain(|(ticket, id)| {
            matches!(map.get(id), Some(Entry { slot: Slot::Queued { ticket: t, .. }, .. }) if t == ticket)
        });
    }

    /// The earliest request deadline.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.keys().next().map(|(at, _)| *at)
    }

    /// The id of a request whose deadline is at or before `now` (its
    /// deadline is cleared; the request stays until answered).
    pub(super) fn pop_expired(&mut self, now: Instant) -> Option<Arc<str>> {
        let (&(at, seq), _) = self.deadlines.iter().next()?;
        if at > now {
            return None;
        }
        let id = self.deadlines.remove(&(at, seq))?;
        if let Some(e) = self.map.get_mut(&id) {
            e.deadline = None;
        }
        Some(id)
    }

    /// Every id in flight (drain timeout).
    pub(super) fn ids(&self) -> Vec<String> {
        self.map.keys().map(|k| k.to_string()).collect()
    }

    /// Empties the table; returns the ids whose handlers ran (to abort).
    pub(super) fn clear(&mut self) -> Vec<String> {
        let running = self
            .map
            .drain()
            .filter(|(_, e)| matches!(e.slot, Slot::Running))
            .map(|(id, _)| id.to_string())
            .collect();
        self.queue.clear();
        self.deadlines.clear();
        self.queued = 0;
        self.queued_bytes = 0;
        self.running = 0;
        running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str) -> Box<ExecuteRequest> {
        Box::new(ExecuteRequest {
            request_id: id.into(),
            ..Default::default()
        })
    }

    #[test]
    fn cancelling_queued_requests_is_constant_time_and_memory_stays_bounded() {
        // A cancel flood on a full queue: every request is queued then
        // cancelled. Nothing is scanned (no retain per cancel) and the
        // stale tickets are compacted away.
        let now = Instant::now();
        let mut t = InFlight::default();
        t.insert_running(Arc::from("busy"), now, None);
        for i in 0..100_000 {
            let id = format!("q{i}");
            t.insert_queued(req(&id), now, Some(Duration::from_secs(1)));
            assert!(t.remove(&id).is_some());
            assert!(t.queue_len() <= 2 * t.queued() + 67, "{}", t.queue_len());
        }
        assert_eq!(t.queued(), 0);
        assert_eq!(t.queued_bytes(), 0);
        assert_eq!(t.next_deadline(), None);
        assert!(t.start_next().is_none());
    }

    #[test]
    fn queued_requests_start_in_order_skipping_cancelled_ones() {
        let now = Instant::now();
        let mut t = InFlight::default();
        for id in ["a", "b", "c"] {
            t.insert_queued(req(id), now, None);
        }
        t.remove("b");
        assert_eq!(t.start_next().map(|r| r.request_id), Some("a".into()));
        assert!(t.is_running("a"));
        assert_eq!(t.start_next().map(|r| r.request_id), Some("c".into()));
        assert!(t.start_next().is_none());
        assert_eq!((t.running(), t.queued()), (2, 0));
    }
}
