//! The protocol side of the bench servers, shared by the gRPC and the
//! WebSocket front-ends so both transports are served by the same logic.
//!
//! It is deliberately minimal (the thing measured is the *client*): every
//! `register` is answered `APPROVED`, heartbeats are acked, and in
//! throughput mode each approved stream keeps a fixed window of
//! `execute_request`s outstanding. Request ids are unique (a client may
//! ignore an id it has just answered, as a redelivery) and name their
//! window slot: slot `s` carries ids `s, s + W, s + 2W, …`. A response, in
//! whatever order it comes, frees exactly one slot, whose send time gives
//! the latency, and the slot is refilled at once with the next id.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connector_proto::{Kind, StreamMessage};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::sys::unix_us;
use crate::wire::{approved, execute, heartbeat_ack};

/// Latency histograms are sharded by stream so the two server threads do
/// not contend on one lock; merged when a measurement ends.
const SHARDS: usize = 16;

/// Counters and histograms of one bench server process.
#[derive(Debug)]
pub(crate) struct ServerShared {
    /// Requests kept outstanding per approved stream (0: idle server).
    window: usize,
    payload: Vec<u8>,
    /// Registrations approved, ever.
    pub(crate) approved: AtomicUsize,
    /// Approved streams still open.
    pub(crate) active: AtomicUsize,
    /// Live TCP connections (or sockets).
    pub(crate) connections: AtomicUsize,
    /// Connections accepted, ever.
    pub(crate) accepted: AtomicUsize,
    /// Unix µs of the first `register` (0: none yet).
    first_register_us: AtomicU64,
    /// Unix µs of the latest approval.
    last_approval_us: AtomicU64,
    /// Responses received, ever.
    responses: AtomicU64,
    /// Responses with `success = false`, ever.
    failures: AtomicU64,
    /// Responses whose id was not an outstanding slot.
    unexpected: AtomicU64,
    recording: std::sync::atomic::AtomicBool,
    next_shard: AtomicUsize,
    histograms: Vec<Mutex<Histogram<u64>>>,
}

impl ServerShared {
    /// Shared state for a server pushing `window` requests of `payload_size`
    /// bytes per stream (`window = 0`: no executes).
    pub(crate) fn new(window: usize, payload_size: usize) -> Arc<Self> {
        let histograms = (0..SHARDS)
            .map(|_| {
                // 1 µs .. 60 s at 3 significant figures.
                Mutex::new(
                    Histogram::new_with_bounds(1, 60_000_000, 3)
                        .unwrap_or_else(|e| panic!("histogram bounds: {e}")),
                )
            })
            .collect();
        Arc::new(Self {
            window,
            payload: crate::wire::json_payload(payload_size.max(8)),
            approved: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            first_register_us: AtomicU64::new(0),
            last_approval_us: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            recording: std::sync::atomic::AtomicBool::new(false),
            next_shard: AtomicUsize::new(0),
            histograms,
        })
    }

    /// Requests kept outstanding per approved stream.
    pub(crate) fn window(&self) -> usize {
        self.window
    }

    /// A connection guard: counts the connection until dropped.
    pub(crate) fn connection(self: &Arc<Self>) -> ConnGuard {
        self.connections.fetch_add(1, Relaxed);
        self.accepted.fetch_add(1, Relaxed);
        ConnGuard(Arc::clone(self))
    }

    /// The state of one new stream.
    pub(crate) fn session(self: &Arc<Self>) -> Session {
        let shard = self.next_shard.fetch_add(1, Relaxed) % SHARDS;
        Session {
            shared: Arc::clone(self),
            shard,
            sent_at: Vec::new(),
            approved: false,
        }
    }

    /// The `count` report.
    pub(crate) fn count(&self) -> Value {
        let first = self.first_register_us.load(Relaxed);
        let last = self.last_approval_us.load(Relaxed);
        json!({
            "approved": self.approved.load(Relaxed),
            "active": self.active.load(Relaxed),
            "connections": self.connections.load(Relaxed),
            "accepted": self.accepted.load(Relaxed),
            "first_register_unix_us": first,
            "last_approval_unix_us": last,
            "register_span_secs": if first > 0 && last >= first { (last - first) as f64 / 1e6 } else { 0.0 },
        })
    }

    /// Measures for `secs`: responses per second and latency percentiles
    /// over exactly that interval.
    pub(crate) async fn measure(&self, secs: f64) -> Value {
        for h in &self.histograms {
            lock(h).reset();
        }
        let failures0 = self.failures.load(Relaxed);
        let count0 = self.responses.load(Relaxed);
        let t0 = Instant::now();
        self.recording.store(true, Relaxed);
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        self.recording.store(false, Relaxed);
        let elapsed = t0.elapsed().as_secs_f64();
        let count = self.responses.load(Relaxed) - count0;
        let failures = self.failures.load(Relaxed) - failures0;
        let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .unwrap_or_else(|e| panic!("histogram bounds: {e}"));
        for h in &self.histograms {
            // Same bounds: `add` cannot fail.
            let _ = merged.add(&*lock(h));
        }
        let q = |p: f64| merged.value_at_quantile(p);
        json!({
            "responses": count,
            "failures": failures,
            "unexpected": self.unexpected.load(Relaxed),
            "secs": elapsed,
            "rps": count as f64 / elapsed,
            "samples": merged.len(),
            "p50_us": q(0.50),
            "p90_us": q(0.90),
            "p99_us": q(0.99),
            "p999_us": q(0.999),
            "max_us": merged.max(),
            "mean_us": merged.mean(),
            "active": self.active.load(Relaxed),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts one live connection.
#[derive(Debug)]
pub(crate) struct ConnGuard(Arc<ServerShared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

/// One stream's server-side state.
#[derive(Debug)]
pub(crate) struct Session {
    shared: Arc<ServerShared>,
    shard: usize,
    /// Send time of the request in each window slot.
    sent_at: Vec<Instant>,
    approved: bool,
}

impl Session {
    /// Handles one client message, pushing the answers onto `out`.
    pub(crate) fn on_message(&mut self, m: StreamMessage, out: &mut Vec<StreamMessage>) {
        let s = &self.shared;
        match m.kind {
            Some(Kind::Register(r)) => {
                let now = unix_us();
                let _ = s
                    .first_register_us
                    .compare_exchange(0, now, Relaxed, Relaxed);
                out.push(approved(&r));
                if !self.approved {
                    self.approved = true;
                    s.active.fetch_add(1, Relaxed);
                }
                s.approved.fetch_add(1, Relaxed);
                s.last_approval_us.fetch_max(unix_us(), Relaxed);
                if self.sent_at.is_empty() {
                    let now = Instant::now();
                    for slot in 0..s.window {
                        self.sent_at.push(now);
                        out.push(execute(slot as u64, &s.payload));
                    }
                }
            }
            Some(Kind::Heartbeat(h)) => out.push(heartbeat_ack(&h)),
            Some(Kind::ExecuteResponse(r)) => {
                let window = self.sent_at.len();
                let Some(id) = r.request_id.parse::<u64>().ok().filter(|_| window > 0) else {
                    s.unexpected.fetch_add(1, Relaxed);
                    return;
                };
                let slot = (id % window as u64) as usize;
                s.responses.fetch_add(1, Relaxed);
                if !r.success {
                    s.failures.fetch_add(1, Relaxed);
                }
                let now = Instant::now();
                if s.recording.load(Relaxed) {
                    let us = now.duration_since(self.sent_at[slot]).as_micros() as u64;
                    lock(&s.histograms[self.shard]).saturating_record(us.max(1));
                }
                self.sent_at[slot] = now;
                out.push(execute(id + window as u64, &s.payload));
            }
            _ => {}
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.approved {
            self.shared.active.fetch_sub(1, Relaxed);
        }
    }
}
