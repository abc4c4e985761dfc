//! Per-registration counters. The state machine fills plain [`Counters`]
//! (no atomics, no locks: it is single-threaded); its driver alone publishes
//! them into the shared [`MetricsCell`], read as a [`ConnectorMetrics`]
//! snapshot from any thread. The state is not kept here: the snapshot takes
//! it from the one published copy (the driver's `watch` channel).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
    /// or the answered log's budget was spent: never delivered.
    pub responses_expired: u64,
    /// Answers sent but not yet confirmed that the answered log had to
    /// forget (its budget was spent, typically by a server that does not
    /// ack heartbeats). Exactly-once is lost for these: if the server asks
    /// for one of them again, its handler runs again.
    pub replay_forgotten: u64,
    /// Answers that would have exceeded `max_message_size` and were
    /// replaced by a `HANDLER` error answer that fits.
    pub answers_oversized: u64,
    /// Stream open attempts that failed (dial, TLS, refused).
    pub connect_failures: u64,
    /// The transport's id of the connection the registration's stream is on
    /// (its [`StreamInfo::connection_id`](crate::StreamInfo): a gRPC
    /// channel, a WebSocket socket), so an operator can tell which
    /// registrations share a connection and would fail together (a gRPC
    /// channel that reconnects in place keeps its id). `None`
    /// while it has no open stream (connecting, backing off, stopped), and
    /// in the state machine's own snapshot, which knows no transport.
    pub connection_id: Option<u64>,
    /// The state now.
    pub state: RegistrationState,
}

/// The state machine's counters: plain numbers, copied out by the driver.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) requests_received: u64,
    pub(crate) requests_succeeded: u64,
    pub(crate) requests_failed: u64,
    pub(crate) in_flight: u64,
    pub(crate) total_disconnects: u64,
    pub(crate) successful_reconnects: u64,
    /// Microseconds + 1; 0 means "never measured".
    pub(crate) last_rtt_us: u64,
    pub(crate) protocol_errors: u64,
    pub(crate) responses_redelivered: u64,
    pub(crate) responses_expired: u64,
    pub(crate) replay_forgotten: u64,
    pub(crate) answers_oversized: u64,
    pub(crate) connect_failures: u64,
}

impl Counters {
    pub(crate) fn set_rtt(&mut self, rtt: Duration) {
        let us = rtt.as_micros().min(u64::MAX as u128 - 1) as u64;
        self.last_rtt_us = us + 1;
    }

    pub(crate) fn snapshot(&self, state: RegistrationState) -> ConnectorMetrics {
        let rtt = self.last_rtt_us;
        ConnectorMetrics {
            requests_received: self.requests_received,
            requests_succeeded: self.requests_succeeded,
            requests_failed: self.requests_failed,
            in_flight: self.in_flight,
            total_disconnects: self.total_disconnects,
            successful_reconnects: self.successful_reconnects,
            last_heartbeat_rtt: (rtt > 0).then(|| Duration::from_micros(rtt - 1)),
            protocol_errors: self.protocol_errors,
            responses_redelivered: self.responses_redelivered,
            responses_expired: self.responses_expired,
            replay_forgotten: self.replay_forgotten,
            answers_oversized: self.answers_oversized,
            connect_failures: self.connect_failures,
            connection_id: None,
            state,
        }
    }
}

macro_rules! cell {
    ($($field:ident),* $(,)?) => {
        /// The published counters behind [`ConnectorMetrics`]: written by
        /// one driver, read by anyone.
        #[derive(Debug, Default)]
        pub(crate) struct MetricsCell {
            $(pub(crate) $field: AtomicU64,)*
            /// The open stream's connection id + 1; 0 while there is none.
            /// Not a state-machine counter: the driver alone knows it.
            connection: AtomicU64,
        }

        impl MetricsCell {
            /// Copies `c` in (the driver calls this after the state machine
            /// changed something).
            pub(crate) fn publish(&self, c: &Counters) {
                $(self.$field.store(c.$field, Relaxed);)*
            }

            fn load(&self) -> Counters {
                Counters { $($field: self.$field.load(Relaxed),)* }
            }
        }
    };
}

cell!(
    requests_received,
    requests_succeeded,
    requests_failed,
    in_flight,
    total_disconnects,
    successful_reconnects,
    last_rtt_us,
    protocol_errors,
    responses_redelivered,
    responses_expired,
    replay_forgotten,
    answers_oversized,
    connect_failures,
);

impl MetricsCell {
    /// A snapshot, with `state` (the published one).
    pub(crate) fn snapshot(&self, state: RegistrationState) -> ConnectorMetrics {
        let mut m = self.load().snapshot(state);
        m.connection_id = self.connection.load(Relaxed).checked_sub(1);
        m
    }

    /// Publishes the connection the stream is on (`None`: no open stream).
    pub(crate) fn publish_connection(&self, id: Option<u64>) {
        // An id of u64::MAX cannot be told apart from "none"; no transport
        // counts that far.
        let encoded = id.map_or(0, |id| id.saturating_add(1));
        self.connection.store(encoded, Relaxed);
    }
}
