//! Per-registration counters: cheap atomics written by the state machine,
//! read as a [`ConnectorMetrics`] snapshot from any thread.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use crate::state::RegistrationState;

/// A point-in-time copy of one registration's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectorMetrics {
    /// `execute_request`s received (including ones answered at once with an
    /// error such as `BAD_PAYLOAD`).
    pub requests_received: u64,
    /// Requests answered with `success = true`.
    pub requests_succeeded: u64,
    /// Requests answered with `success = false` (any error kind).
    pub requests_failed: u64,
    /// Requests received and not yet answered (running or waiting for a slot).
    pub in_flight: u64,
    /// Streams lost after they had opened.
    pub total_disconnects: u64,
    /// Approvals after an earlier approved stream was lost.
    pub successful_reconnects: u64,
    /// Round trip of the last acknowledged heartbeat.
    pub last_heartbeat_rtt: Option<Duration>,
    /// Malformed or unexpected messages from the server.
    pub protocol_errors: u64,
    /// Responses kept while the stream was down and delivered on a later one.
    pub responses_redelivered: u64,
    /// Responses dropped because they waited longer than the redelivery TTL
    /// or the redelivery buffer was full.
    pub responses_expired: u64,
    /// Stream open attempts that failed (dial, TLS, refused).
    pub connect_failures: u64,
    /// The state now.
    pub state: RegistrationState,
}

/// The live counters behind [`ConnectorMetrics`].
#[derive(Debug)]
pub(crate) struct MetricsCell {
    pub(crate) requests_received: AtomicU64,
    pub(crate) requests_succeeded: AtomicU64,
    pub(crate) requests_failed: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) total_disconnects: AtomicU64,
    pub(crate) successful_reconnects: AtomicU64,
    /// Microseconds + 1; 0 means "never measured".
    pub(crate) last_rtt_us: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) responses_redelivered: AtomicU64,
    pub(crate) responses_expired: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) state: Mutex<RegistrationState>,
}

impl Default for MetricsCell {
    fn default() -> Self {
        Self {
            requests_received: AtomicU64::new(0),
            requests_succeeded: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            total_disconnects: AtomicU64::new(0),
            successful_reconnects: AtomicU64::new(0),
            last_rtt_us: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            responses_redelivered: AtomicU64::new(0),
            responses_expired: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            state: Mutex::new(RegistrationState::Idle),
        }
    }
}

impl MetricsCell {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn set_rtt(&self, rtt: Duration) {
        let us = rtt.as_micros().min(u64::MAX as u128 - 1) as u64;
        self.last_rtt_us.store(us + 1, Relaxed);
    }

    pub(crate) fn set_state(&self, state: &RegistrationState) {
        if let Ok(mut s) = self.state.lock() {
            *s = state.clone();
        }
    }

    pub(crate) fn snapshot(&self) -> ConnectorMetrics {
        let rtt = self.last_rtt_us.load(Relaxed);
        ConnectorMetrics {
            requests_received: self.requests_received.load(Relaxed),
            requests_succeeded: self.requests_succeeded.load(Relaxed),
            requests_failed: self.requests_failed.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            total_disconnects: self.total_disconnects.load(Relaxed),
            successful_reconnects: self.successful_reconnects.load(Relaxed),
            last_heartbeat_rtt: (rtt > 0).then(|| Duration::from_micros(rtt - 1)),
            protocol_errors: self.protocol_errors.load(Relaxed),
            responses_redelivered: self.responses_redelivered.load(Relaxed),
            responses_expired: self.responses_expired.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            state: self
                .state
                .lock()
                .map(|s| s.clone())
                .unwrap_or(RegistrationState::Idle),
        }
    }
}
