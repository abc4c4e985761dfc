//! The registration state machine: the whole protocol of one registration,
//! with no IO and no clock of its own.
//!
//! Inputs are `handle_*(now, …)` calls; outputs are pulled with
//! [`Registration::poll_transmit`] (messages for the server),
//! [`Registration::poll_action`] (things the driver must do: open or close a
//! stream, start or abort a handler), [`Registration::poll_event`] (what
//! happened, for logs and live state) and [`Registration::poll_timeout`] (the
//! next instant at which [`Registration::handle_timeout`] must be called).
//! Being deterministic, it is tested with synthetic instants, and the gRPC and
//! WebSocket transports share every line of it.
//!
//! # Phases
//!
//! The real state is a private [`Phase`] whose variants carry their data
//! (the stream's identity and health live inside the phases that have a
//! stream); the public [`RegistrationState`] is derived from it.
//!
//! ```text
//!            start                  opened                APPROVED
//!   Idle ───────────▶ Connecting ──────────▶ Registering ─────────────▶ Active
//!                        ▲   │ open failed       │  PENDING               │  │ drain /
//!                        │   ▼                   ▼          APPROVED      │  │ should_reconnect
//!                        │ Backoff ◀──────── Pending ───────────────────▶ │  ▼
//!                        └──timer── ▲  ◀── stream ends (any phase with     │ Draining
//!                                   │      a stream): end_stream()  ◀─────┘──┘ last answer /
//!                                   └──────────────────────────────────────── drain timer
//!   any ── shutdown / remove / final reject ──▶ Stopped
//! ```
//!
//! A registration with a [`crate::TokenSource`] passes through
//! `Authorizing` before every `Connecting` (`Idle`/`Backoff` ──▶
//! Authorizing ──token──▶ Connecting): the driver fetches the token, the
//! machine stays synchronous. It looks like `Connecting` from outside.
//!
//! Transition table (phase × input → next phase; actions). "fail" means the
//! attempt counts as failed: the backoff escalates (`next_delay`). Every
//! exit from a phase with a stream goes through the one `end_stream` path.
//!
//! | phase | input | next | actions |
//! |---|---|---|---|
//! | Idle | start | Connecting | `OpenStream(register)` |
//! | Idle, Backoff, (any "Connecting" below) | start, backoff timer, with a token source | Authorizing | `FetchToken`, register timer (connect timeout) |
//! | Authorizing | token | Connecting | `OpenStream(register)` with that token |
//! | Authorizing | token error, register timer | Backoff (fail), cause `Token` | `DropStream` on the timer |
//! | Authorizing (recheck) | a token other than the rejected one | Connecting (credentials retry) | `OpenStream` with it |
//! | Authorizing (recheck) | the same token, an error, register timer | Stopped (`INVALID_CREDENTIALS`) | |
//! | Authorizing | shutdown / remove | Stopped | `DropStream` |
//! | Connecting | opened | Registering | heartbeat at this registration's phase, watchdog, register timer |
//! | Connecting | open failed | Backoff (fail) | |
//! | Connecting | shutdown / remove | Stopped | `DropStream` |
//! | Registering | `APPROVED` | Active | deliver waiting answers, start queued work |
//! | Registering | `PENDING` | Pending | |
//! | Registering | register timer | Backoff (fail) | `DropStream` |
//! | Registering, Pending | `REJECTED SESSION_EXPIRED`, register carried a session token | Connecting | `CloseStream`, `OpenStream` without the token |
//! | Registering, Pending | `REJECTED SESSION_EXPIRED` without a token, `DUPLICATE`, unknown or unspecified reason | Backoff (fail) | `CloseStream` |
//! | Registering, Pending | `REJECTED INVALID_CREDENTIALS`, token source, not a credentials retry | Authorizing (recheck) | `CloseStream`, `FetchToken` |
//! | Registering, Pending | `REJECTED DENIED / INVALID_CREDENTIALS / INVALID_REQUEST` (otherwise) | Stopped | `CloseStream` |
//! | Registering, Pending | status unknown | Backoff (fail) | `DropStream` |
//! | Registering, Pending | drain, `should_reconnect` | Backoff (fail, at least `reconnect_after`) | `CloseStream` |
//! | Pending | `APPROVED` | Active | as above |
//! | Active | `execute_request` | Active | `Execute`, queue, or an error answer |
//! | Active | backoff-reset timer | Active (stream healthy) | backoff reset |
//! | Active | drain, `should_reconnect` | Draining (reconnect after `reconnect_after` if healthy, else fail) | |
//! | Active, Draining | shutdown / remove | Draining (then stop) | |
//! | Draining | last answer made, drain timer | Backoff, or Stopped | `CloseStream` (answers left in the outbox go first) |
//! | any with a stream | stream closed / failed, watchdog, outbox over budget | Backoff (fail), or Stopped when reconnect is off | `DropStream` when we give it up |
//! | Backoff | backoff timer | Connecting | `OpenStream` |
//! | Idle, Backoff, Registering, Pending | shutdown / remove | Stopped | `CloseStream` if a stream |
//!
//! Requests that arrive on a stream the driver is still closing (its
//! linger) come back through [`Registration::handle_closing_request`] and
//! get an `OVERLOADED` answer, delivered on the next stream.

mod answers;
mod heartbeat;
mod inflight;
#[cfg(test)]
mod tests;
mod timers;

pub use heartbeat::{MAX_SERVER_HEARTBEAT_INTERVAL, MIN_SERVER_HEARTBEAT_INTERVAL};

use std::collections::HashSet;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use connector_proto::{
    stream_message::Kind, ApprovalUpdate, ExecuteErrorKind, ExecuteRequest, ExecuteResponse,
    Heartbeat, HeartbeatAck, MetricsReport, PayloadEncoding, RegisterRequest, RegisterResponse,
    RegistrationStatus, RejectReason, StreamMessage,
};
use prost::Message as _;
use tokio::time::Instant;

use crate::answered::{AnsweredLog, Dropped, Known};
use crate::backoff::{Backoff, JitterRng};
use crate::config::{Limits, MultiTransportOptions, RegistrationKey, Secret};
use crate::connector::{ConnectorRegistration, ExecuteError, ExecuteOutput};
use crate::metrics::{ConnectorMetrics, Counters};
use crate::state::{DisconnectCause, RegistrationEvent, RegistrationState, StopReason};
use crate::telemetry::Telemetry;
use crate::text::{sanitize_text, MAX_PEER_TEXT_CHARS};

use answers::{error_response, fit, Fit};
use heartbeat::Heartbeats;
use inflight::{request_bytes, InFlight, Left};
use timers::{Timer, TimerTable};

/// The longest `timeout_ms` of a request that is honoured as given; a
/// longer one is clamped to this (24 h).
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Something the driver must do for the state machine.
#[non_exhaustive]
pub enum Action {
    /// Open a stream and send this `register` message first.
    OpenStream(StreamMessage),
    /// Ask the registration's [`crate::TokenSource`] for the auth token
    /// and hand the answer to [`Registration::handle_token`] (only for a
    /// registration configured with a token source, before each `register`).
    FetchToken,
    /// Close the current stream gracefully: send what
    /// [`Registration::poll_transmit`] yields now (those messages belong to
    /// it), half-close, then drop.
    CloseStream,
    /// Drop the current stream at once (it is dead or abandoned), and any
    /// open or token fetch under way.
    DropStream,
    /// Run the handler for this request.
    Execute(Box<ExecuteRequest>),
    /// Abort the handler of this request (its response was already made).
    Abort(String),
}

impl std::fmt::Debug for Action {
    // Manual: `OpenStream` carries the auth token, which must never be printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OpenStream(_) => f.write_str("OpenStream(<register>)"),
            Self::FetchToken => f.write_str("FetchToken"),
            Self::CloseStream => f.write_str("CloseStream"),
            Self::DropStream => f.write_str("DropStream"),
            Self::Execute(r) => write!(
                f,
                "Execute({:?})",
                sanitize_text(&r.request_id, MAX_PEER_TEXT_CHARS)
            ),
            Self::Abort(id) => write!(f, "Abort({:?})", sanitize_text(id, MAX_PEER_TEXT_CHARS)),
        }
    }
}

/// One open stream, as the phases that have one see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stream {
    /// Bumped for every stream opened; tags what was sent on which.
    gen: u64,
    /// Its `register` carried a session token (so a `SESSION_EXPIRED`
    /// earns one immediate retry without it).
    with_session: bool,
    /// It stayed Active for `backoff_reset_after` (the backoff was reset).
    healthy: bool,
    /// Its `register` is the one retry with a newer token after an
    /// `INVALID_CREDENTIALS` (a second one stops the registration).
    credentials_retry: bool,
}

/// What happens once a drain is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterDrain {
    /// Reconnect after `after` (clamped); `failed`: the stream was not
    /// healthy, so the attempt also counts as failed.
    Reconnect {
        after: Duration,
        failed: bool,
    },
    Stop(StopKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopKind {
    Shutdown,
    Removed,
}

impl StopKind {
    fn reason(self) -> StopReason {
        match self {
            Self::Shutdown => StopReason::Shutdown,
            Self::Removed => StopReason::Removed,
        }
    }
}

/// The real state of a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Idle,
    /// Waiting for the token source's answer before a `register`.
    /// `recheck`: after an `INVALID_CREDENTIALS` (the server's message):
    /// only a token different from the one rejected is tried.
    Authorizing {
        recheck: Option<String>,
    },
    /// An open is under way; `with_session`: its register carries a token;
    /// `credentials_retry`: see [`Stream::credentials_retry`].
    Connecting {
        with_session: bool,
        credentials_retry: bool,
    },
    Registering(Stream),
    Pending(Stream),
    Active(Stream),
    Draining(Stream, AfterDrain),
    Backoff {
        delay: Duration,
    },
    Stopped(StopReason),
}

impl Phase {
    fn stream(&self) -> Option<Stream> {
        match self {
            Self::Registering(s) | Self::Pending(s) | Self::Active(s) | Self::Draining(s, _) => {
                Some(*s)
            }
            _ => None,
        }
    }

    fn view(&self) -> RegistrationState {
        match self {
            Self::Idle => RegistrationState::Idle,
            Self::Authorizing { .. } | Self::Connecting { .. } => RegistrationState::Connecting,
            Self::Registering(_) => RegistrationState::Registering,
            Self::Pending(_) => RegistrationState::PendingApproval,
            Self::Active(_) => RegistrationState::Active,
            Self::Draining(..) => RegistrationState::Draining,
            Self::Backoff { delay } => RegistrationState::Backoff { delay: *delay },
            Self::Stopped(r) => RegistrationState::Stopped(r.clone()),
        }
    }
}

/// How a stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// It is already gone (closed or failed under us).
    Gone,
    /// Close it gracefully (what is queued goes first).
    Close,
    /// Drop it at once (dead or abandoned).
    Drop,
}

/// What follows the end of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Then {
    /// A failed attempt: back off, escalating.
    Fail,
    /// A failed attempt that waits at least this long.
    FailAtLeast(Duration),
    /// Reconnect after this (the server's wish, clamped, plus jitter).
    After(Duration),
    /// Register again at once, without the session token.
    Now,
    /// Ask the token source again at once after an `INVALID_CREDENTIALS`
    /// (the server's message, for the stop if the token did not change).
    Recheck(String),
    Stop(StopReason),
}

/// Per-registration settings taken from [`MultiTransportOptions`].
#[derive(Debug, Clone)]
struct Settings {
    reconnect: bool,
    /// A [`crate::TokenSource`] gives the auth token before every register.
    token_source: bool,
    connect_timeout: Duration,
    backoff_reset_after: Duration,
    max_backoff: Duration,
    max_concurrent: usize,
    drain_timeout: Duration,
    metrics_report_interval: Option<Duration>,
    max_message_size: usize,
    limits: Limits,
}

/// Responses queued without a heartbeat after them before one is sent early
/// (its ack confirms them, which bounds what must be kept for replay).
/// 32: with the default 100 concurrent executes that keeps at most a few
/// dozen answers per registration in the replay log (measured: 128 kept
/// ~0.8 MiB per busy registration with 4 KiB payloads), for one extra small
/// message per 32 answers.
const EARLY_HEARTBEAT_AFTER: usize = 32;

/// Payload bytes of responses queued without a heartbeat after them before
/// one is sent early, whatever their count: the replay log holds what was
/// sent since the last acked heartbeat, so with large answers a count alone
/// let it hold 32 × the payload per registration and more (4 KiB echo at
/// N = 1000: client RSS 2.5× the raw client's). 32 KiB is 8 answers of
/// 4 KiB per heartbeat, a 20-byte message per 32 KiB sent.
const EARLY_HEARTBEAT_BYTES: usize = 32 * 1024;

/// The sans-IO state machine of one registration.
#[derive(Debug)]
pub struct Registration {
    key: RegistrationKey,
    template: RegisterRequest,
    auth_token: Secret,
    session_token: Option<Secret>,
    capabilities: HashSet<String>,
    settings: Settings,
    phase: Phase,
    /// The public view of `phase`, derived on every change (so `state()`
    /// can lend it).
    view: RegistrationState,
    state_version: u64,
    streams_opened: u64,
    /// Approvals so far (the next one is a reconnect when this is > 0).
    approvals: u64,
    timers: TimerTable,
    heartbeats: Heartbeats,
    backoff: Backoff,
    inflight: InFlight,
    /// Messages for the stream, with their encoded size (computed once).
    outbox: VecDeque<(StreamMessage, usize)>,
    outbox_bytes: usize,
    answered: AnsweredLog,
    /// Responses queued since the last heartbeat; past a threshold a
    /// heartbeat goes out early so its ack confirms them sooner.
    queued_since_heartbeat: usize,
    /// Payload bytes of those responses.
    bytes_since_heartbeat: usize,
    actions: VecDeque<Action>,
    events: VecDeque<RegistrationEvent>,
    counters: Counters,
    telemetry: Telemetry,
    /// Maps tokio instants to wall-clock milliseconds for heartbeats.
    clock_origin: (Instant, i64),
}

fn mix(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x1000_0000_01b3);
    }
    h
}

impl Registration {
    /// A state machine for `registration` with `options`, at `now`, where
    /// `unix_ms_now` is the wall clock at `now` (only used to fill
    /// `sent_at_unix_ms` in heartbeats).
    pub fn new(
        registration: &ConnectorRegistration,
        options: &MultiTransportOptions,
        now: Instant,
        unix_ms_now: i64,
    ) -> Self {
        let config = registration.config();
        let connector = registration.connector();
        let key = config.key.clone();
        let max_concurrent = config
            .max_concurrent_requests
            .unwrap_or(options.max_concurrent_requests)
            .max(1);
        let capabilities = connector.capabilities();
        let template = RegisterRequest {
            tenant_id: key.tenant_id().to_string(),
            connector_type: key.connector_type().to_string(),
            instance_id: key.instance_id().to_string(),
            version: connector.version().to_string(),
            auth_token: String::new(),
            session_token: String::new(),
            display_name: config.display_name.clone(),
            tags: config.tags.clone(),
            metadata: config
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            behavior: connector.behavior() as i32,
            max_concurrent_requests: max_concurrent,
            capabilities: capabilities.clone(),
        };
        let key_bytes = key.to_string();
        // Spread registrations that fail together: mix the key into a
        // clock-derived seed (or the injected one, in tests).
        let seed = options.jitter_seed.unwrap_or_else(|| {
            mix(
                unix_ms_now as u64 ^ 0xcbf2_9ce4_8422_2325,
                key_bytes.as_bytes(),
            )
        });
        let key_seed = mix(seed, key_bytes.as_bytes());
        // The heartbeat phase: its own draw, so it does not shift the
        // backoff's sequence.
        let phase = (JitterRng::new(key_seed ^ 0x6865_6172_7462_6561).next_u64() >> 32) as u32;
        Self {
            template,
            auth_token: config.auth_token.clone(),
            session_token: None,
            capabilities: capabilities.into_iter().map(|c| c.id).collect(),
            settings: Settings {
                reconnect: options.reconnect,
                token_source: config.token_source.is_some(),
                connect_timeout: options.connect_timeout,
                backoff_reset_after: options.backoff_reset_after,
                max_backoff: options.max_backoff,
                max_concurrent: max_concurrent as usize,
                drain_timeout: options.drain_timeout,
                metrics_report_interval: options.metrics_report_interval,
                max_message_size: options.max_message_size,
                limits: options.limits.clone(),
            },
            phase: Phase::Idle,
            view: RegistrationState::Idle,
            state_version: 0,
            streams_opened: 0,
            approvals: 0,
            timers: TimerTable::default(),
            heartbeats: Heartbeats::new(
                options.heartbeat_interval,
                options.heartbeat_timeout,
                phase,
            ),
            backoff: Backoff::new(
                options.reconnect_delay,
                options.max_backoff,
                options.jitter,
                JitterRng::new(key_seed),
            ),
            inflight: InFlight::default(),
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            answered: AnsweredLog::new(
                options.limits.answered_entries,
                options.limits.answered_bytes,
                options.redelivery_ttl,
            ),
            queued_since_heartbeat: 0,
            bytes_since_heartbeat: 0,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
            telemetry: Telemetry::new(key_bytes),
            clock_origin: (now, unix_ms_now),
            key,
        }
    }

    // ------------------------------------------------------------------
    // Outputs
    // ------------------------------------------------------------------

    /// The registration's key.
    pub fn key(&self) -> &RegistrationKey {
        &self.key
    }

    /// The state now.
    pub fn state(&self) -> &RegistrationState {
        &self.view
    }

    /// Bumped on every state change, so a driver can publish only changes.
    pub fn state_version(&self) -> u64 {
        self.state_version
    }

    /// The next message for the server, if any. Only meaningful while a
    /// stream is open; the driver stops pulling when the stream's queue is full.
    pub fn poll_transmit(&mut self) -> Option<StreamMessage> {
        let (m, size) = self.outbox.pop_front()?;
        self.outbox_bytes = self.outbox_bytes.saturating_sub(size);
        Some(m)
    }

    /// Whether [`Registration::poll_transmit`] would yield a message.
    pub fn has_transmit(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<RegistrationEvent> {
        let event = self.events.pop_front();
        if event.is_none() && self.events.capacity() > 0 {
            // Events come in rare bursts (a state change, an error): once
            // they are read the queue's room goes too, so the tens of
            // thousands of registrations a process may host do not each
            // keep 160 bytes for their next one.
            self.events = VecDeque::new();
        }
        event
    }

    /// When [`Registration::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.timers.next(), self.inflight.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The registration's counters now.
    pub fn metrics_snapshot(&self) -> ConnectorMetrics {
        self.counters().snapshot(self.view.clone())
    }

    /// The plain counters, for the driver to publish.
    pub(crate) fn counters(&self) -> Counters {
        let mut c = self.counters;
        c.in_flight = self.inflight.len() as u64;
        c
    }

    /// The in-flight table's shared copy of a running request's id (the
    /// driver keeps it to report the handler's result, without a copy).
    pub(crate) fn shared_request_id(&self, id: &str) -> Option<Arc<str>> {
        self.inflight.shared_id(id)
    }

    /// Requests received and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Handlers running now.
    pub fn running(&self) -> usize {
        self.inflight.running()
    }

    /// Responses waiting for a stream to be delivered on.
    pub fn undelivered(&self) -> usize {
        self.answered.waiting()
    }

    /// Bytes the registration holds for the server now, by budget:
    /// `(outbox, queued requests, answered log)`. What [`Limits`] bounds.
    pub fn held_bytes(&self) -> (usize, usize, usize) {
        (
            self.outbox_bytes,
            self.inflight.queued_bytes(),
            self.answered.bytes(),
        )
    }

    /// True when the registration stopped and nothing is left to do.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Stopped(_)) && self.actions.is_empty()
    }

    /// The session token the server issued, if any (kept for reconnects).
    pub fn has_session_token(&self) -> bool {
        self.session_token.is_some()
    }

    // ------------------------------------------------------------------
    // Inputs
    // ------------------------------------------------------------------

    /// Starts the registration: the first connection attempt.
    pub fn handle_start(&mut self, now: Instant) {
        if self.phase == Phase::Idle {
            self.connect(now);
        }
    }

    /// The stream asked for by [`Action::OpenStream`] is open (and `register`
    /// was sent on it).
    pub fn handle_stream_opened(&mut self, now: Instant) {
        let Phase::Connecting {
            with_session,
            credentials_retry,
        } = self.phase
        else {
            // Opened after we gave up on it (shutdown): let it go.
            self.actions.push_back(Action::DropStream);
            return;
        };
        self.streams_opened += 1;
        self.queued_since_heartbeat = 0;
        self.bytes_since_heartbeat = 0;
        self.telemetry.connection_attempt(true);
        let first = self.heartbeats.stream_opened(now);
        self.timers.set(Timer::Heartbeat, first);
        self.timers
            .set(Timer::Watchdog, now + self.heartbeats.timeout);
        self.timers
            .set(Timer::Register, now + self.settings.connect_timeout);
        self.enter(Phase::Registering(Stream {
            gen: self.streams_opened,
            with_session,
            healthy: false,
            credentials_retry,
        }));
        self.events.push_back(RegistrationEvent::Connected);
    }

    /// The stream asked for by [`Action::OpenStream`] could not be opened.
    pub fn handle_open_failed(&mut self, now: Instant, error: &str) {
        if !matches!(self.phase, Phase::Connecting { .. }) {
            return;
        }
        self.counters.connect_failures += 1;
        self.telemetry.connection_attempt(false);
        // Transport errors can carry server text (a gRPC status message,
        // an HTTP reason): sanitized like any.
        let cause =
            DisconnectCause::OpenFailed(sanitize_text(error, MAX_PEER_TEXT_CHARS).into_owned());
        self.events.push_back(RegistrationEvent::Disconnected {
            cause: cause.clone(),
        });
        self.after_stream(now, Some(cause), Then::Fail);
    }

    /// The answer of the token source asked for by [`Action::FetchToken`].
    /// A token opens the stream with it; an error is a failed attempt
    /// (backoff), reported as [`DisconnectCause::Token`]. After an
    /// `INVALID_CREDENTIALS`, a token equal to the rejected one (or an
    /// error) stops the registration with that rejection, as the contract
    /// says for `INVALID_CREDENTIALS`.
    pub fn handle_token(&mut self, now: Instant, token: Result<Secret, &str>) {
        let Phase::Authorizing { recheck } = &mut self.phase else {
            // Asked for before a shutdown: moot.
            return;
        };
        let recheck = recheck.take();
        self.timers.stop(Timer::Register);
        match (token, recheck) {
            (Ok(token), None) => {
                self.auth_token = token;
                self.open_stream(false);
            }
            (Ok(token), Some(_)) if token != self.auth_token => {
                tracing::info!(key = %self.key, "INVALID_CREDENTIALS: the token source has a newer token; registering once more with it");
                self.auth_token = token;
                self.open_stream(true);
            }
            (_, Some(message)) => self.stop(
                now,
                StopReason::Rejected {
                    reason: RejectReason::InvalidCredentials,
                    message,
                },
            ),
            (Err(error), None) => {
                self.counters.connect_failures += 1;
                self.telemetry.connection_attempt(false);
                let error = sanitize_text(error, MAX_PEER_TEXT_CHARS).into_owned();
                tracing::warn!(key = %self.key, %error, "auth token source failed; backing off");
                let cause = DisconnectCause::Token(error);
                self.events.push_back(RegistrationEvent::Disconnected {
                    cause: cause.clone(),
                });
                self.after_stream(now, Some(cause), Then::Fail);
            }
        }
    }

    /// The stream ended: `error` is `None` when the server ended it cleanly.
    pub fn handle_stream_closed(&mut self, now: Instant, error: Option<&str>) {
        let cause = match error {
            None => DisconnectCause::ClosedByServer,
            Some(e) => DisconnectCause::Error(sanitize_text(e, MAX_PEER_TEXT_CHARS).into_owned()),
        };
        let then = self.then_after_loss();
        self.end_stream(now, How::Gone, Some(cause), then);
    }

    /// The transport could not make a message out of what the server sent
    /// (a text frame, bytes that are not a `StreamMessage`, an oversized
    /// message). Counted like any protocol error; the transport ends the
    /// stream, which arrives as [`Registration::handle_stream_closed`].
    pub fn handle_malformed(&mut self, _now: Instant, detail: &str) {
        self.protocol_error(&sanitize_text(detail, MAX_PEER_TEXT_CHARS));
    }

    /// A message from the server.
    pub fn handle_message(&mut self, now: Instant, message: StreamMessage) {
        if self.phase.stream().is_none() {
            // Read from a stream this machine already ended (the driver
            // drains what was ready in one batch): a request still gets
            // its answer, the rest is moot.
            if let Some(Kind::ExecuteRequest(r)) = &message.kind {
                self.handle_closing_request(now, r);
            }
            return;
        }
        // Any server message proves the stream alive.
        self.timers
            .set(Timer::Watchdog, now + self.heartbeats.timeout);
        match message.kind {
            Some(Kind::RegisterResponse(r)) => self.on_register_response(now, *r),
            Some(Kind::ApprovalUpdate(u)) => self.on_approval_update(now, *u),
            Some(Kind::HeartbeatAck(a)) => self.on_heartbeat_ack(now, *a),
            Some(Kind::ExecuteRequest(r)) => self.on_execute_request(now, r),
            Some(Kind::Cancel(c)) => self.on_cancel(now, &c.request_id),
            Some(Kind::Drain(d)) => {
                let delay = Duration::from_millis(d.reconnect_after_ms as u64);
                let reason = if d.reason.is_empty() {
                    "drain".to_string()
                } else {
                    sanitize_text(&d.reason, MAX_PEER_TEXT_CHARS).into_owned()
                };
                self.on_drain(now, reason, delay)
            }
            Some(
                Kind::Register(_)
                | Kind::Heartbeat(_)
                | Kind::ExecuteResponse(_)
                | Kind::MetricsReport(_),
            ) => self.protocol_error("a client-to-server message came from the server"),
            None => self.protocol_error("a message with no known kind (unknown oneof field?)"),
        }
    }

    /// An `execute_request` read from a stream the driver is closing (after
    /// [`Action::CloseStream`], during its linger): it cannot be taken, and
    /// its answer cannot go on that stream. It gets an `OVERLOADED` answer,
    /// kept for the next stream like any answer made while none is up.
    pub fn handle_closing_request(&mut self, now: Instant, request: &ExecuteRequest) {
        let id = request.request_id.as_str();
        if id.is_empty()
            || id.len() > self.settings.limits.max_request_id_len
            || self.inflight.contains(id)
            || self.answered.known(id).is_some()
        {
            // Unanswerable, or already answered / on its way.
            return;
        }
        self.counters.requests_received += 1;
        if let Phase::Stopped(_) = self.phase {
            // No stream will ever come: the answer cannot be delivered.
            self.counters.requests_failed += 1;
            self.counters.responses_expired += 1;
            tracing::warn!(key = %self.key, request_id = %sanitize_text(id, MAX_PEER_TEXT_CHARS), "request arrived while the last stream closed; no stream left to answer it");
            return;
        }
        self.respond_now(
            id,
            ExecuteError::new(
                ExecuteErrorKind::Overloaded,
                "the stream was closing: not taking new work",
            ),
            now,
        );
    }

    /// A handler finished (successfully or not).
    pub fn handle_execute_done(
        &mut self,
        now: Instant,
        request_id: &str,
        result: Result<ExecuteOutput, ExecuteError>,
    ) {
        let Some(left) = self.inflight.remove_running(request_id) else {
            // Already answered (timeout, cancel, drain deadline).
            return;
        };
        let response = match result {
            Ok(out) => ExecuteResponse {
                // Filled in by `finish` with the table's own copy of the id.
                request_id: String::new(),
                success: true,
                payload: out.payload,
                encoding: out.encoding as i32,
                error: String::new(),
                duration_ms: 0,
                error_kind: ExecuteErrorKind::Unspecified as i32,
            },
            Err(e) => error_response(request_id, e),
        };
        self.finish_left(now, left, response, false);
    }

    /// Graceful shutdown of the runner: no new work, in-flight requests are
    /// answered (bounded by the drain timeout), the stream closes, stop.
    pub fn handle_shutdown(&mut self, now: Instant) {
        self.stop_gracefully(now, StopKind::Shutdown);
    }

    /// The registration is removed from its runner: as a shutdown of this
    /// one registration.
    pub fn handle_remove(&mut self, now: Instant) {
        self.stop_gracefully(now, StopKind::Removed);
    }

    /// A message the driver took with [`Registration::poll_transmit`] could
    /// not be sent (the stream went away): responses are kept for the next
    /// stream, anything else is dropped.
    pub fn handle_unsent(&mut self, now: Instant, message: StreamMessage) {
        if let Some(Kind::ExecuteResponse(r)) = message.kind {
            self.not_sent(now, *r);
        }
    }

    /// Fires every timer whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Request deadlines first: their responses must leave before a
        // stream is torn down below.
        while let Some(id) = self.inflight.pop_expired(now) {
            self.finish(
                now,
                &id,
                error_response(
                    &id,
                    ExecuteError::new(ExecuteErrorKind::Timeout, "timeout_ms passed"),
                ),
                true,
            );
        }
        for t in Timer::ALL {
            if !self.timers.expired(t, now) {
                continue;
            }
            self.timers.stop(t);
            match t {
                Timer::Heartbeat => self.send_heartbeat(now, true),
                Timer::Watchdog => {
                    if self.phase.stream().is_some() {
                        tracing::warn!(key = %self.key, timeout_ms = self.heartbeats.timeout.as_millis() as u64, "watchdog: no server message in time, reconnecting");
                        let then = self.then_after_loss();
                        self.end_stream(now, How::Drop, Some(DisconnectCause::Watchdog), then);
                    }
                }
                Timer::Register => {
                    if matches!(self.phase, Phase::Authorizing { .. }) {
                        self.actions.push_back(Action::DropStream);
                        self.handle_token(
                            now,
                            Err("the token source did not answer within the connect timeout"),
                        );
                    } else if matches!(self.phase, Phase::Registering(_)) {
                        let then = self.then_after_loss();
                        self.end_stream(
                            now,
                            How::Drop,
                            Some(DisconnectCause::RegisterTimeout),
                            then,
                        );
                    }
                }
                Timer::Backoff => {
                    if matches!(self.phase, Phase::Backoff { .. }) {
                        self.connect(now);
                    }
                }
                Timer::BackoffReset => {
                    if let Phase::Active(s) = &mut self.phase {
                        s.healthy = true;
                        self.backoff.reset();
                    }
                }
                Timer::Drain => self.on_drain_deadline(now),
                Timer::MetricsReport => self.on_metrics_timer(now),
            }
        }
    }

    // ------------------------------------------------------------------
    // Phases
    // ------------------------------------------------------------------

    fn enter(&mut self, phase: Phase) {
        let view = phase.view();
        self.phase = phase;
        if self.view != view {
            let was_active = matches!(self.view, RegistrationState::Active);
            let is_active = matches!(view, RegistrationState::Active);
            if was_active != is_active {
                self.telemetry.active(is_active);
            }
            self.view = view;
            self.state_version += 1;
        }
    }

    /// What follows a stream lost to the network or the server: a failed
    /// attempt, unless a drain already decided.
    fn then_after_loss(&self) -> Then {
        match &self.phase {
            Phase::Draining(_, AfterDrain::Stop(kind)) => Then::Stop(kind.reason()),
            Phase::Draining(_, AfterDrain::Reconnect { after, failed }) => {
                drain_then(*after, *failed)
            }
            _ => Then::Fail,
        }
    }

    /// The one exit of a phase with a stream. Answers still queued for it
    /// are kept for the next stream (or, with [`How::Close`], left for the
    /// driver to flush first); the stream's timers stop; then `then`.
    /// `cause`: `None` when we end it deliberately to stop (no disconnect
    /// is counted).
    fn end_stream(&mut self, now: Instant, how: How, cause: Option<DisconnectCause>, then: Then) {
        let Some(stream) = self.phase.stream() else {
            return;
        };
        // What this stream did not confirm is maybe lost from here on.
        self.answered.stream_ended();
        match how {
            How::Gone => self.requeue_outbox(now),
            How::Drop => {
                self.requeue_outbox(now);
                self.actions.push_back(Action::DropStream);
            }
            How::Close => self.actions.push_back(Action::CloseStream),
        }
        for t in Timer::OF_STREAM {
            self.timers.stop(t);
        }
        self.heartbeats.stop();
        if let Some(cause) = &cause {
            self.counters.total_disconnects += 1;
            self.telemetry.disconnected(cause);
            tracing::info!(key = %self.key, %cause, stream = stream.gen, in_flight = self.inflight.len(), "stream ended");
            self.events.push_back(RegistrationEvent::Disconnected {
                cause: cause.clone(),
            });
        }
        // Leave the stream's phase before deciding what is next.
        self.phase = Phase::Idle;
        self.after_stream(now, cause, then);
    }

    /// After a stream (or an attempt to open one) ended.
    fn after_stream(&mut self, now: Instant, cause: Option<DisconnectCause>, then: Then) {
        let then = match (then, cause) {
            (Then::Stop(r), _) => Then::Stop(r),
            (_, Some(cause)) if !self.settings.reconnect => {
                Then::Stop(StopReason::StreamEnded { cause })
            }
            (t, _) => t,
        };
        match then {
            Then::Stop(reason) => self.stop(now, reason),
            Then::Now => self.connect(now),
            Then::Recheck(message) => {
                self.events.push_back(RegistrationEvent::Connecting {
                    attempt: self.backoff.attempt(),
                });
                self.authorize(now, Some(message));
            }
            Then::Fail => {
                let d = self.backoff.next_delay();
                self.back_off(now, d)
            }
            Then::FailAtLeast(at_least) => {
                let d = self.backoff.next_delay().max(self.clamp_wait(at_least));
                self.back_off(now, d)
            }
            Then::After(d) => {
                let d = self.backoff.with_jitter(self.clamp_wait(d));
                self.back_off(now, d)
            }
        }
    }

    /// A wait the server asked for, clamped to the backoff cap.
    fn clamp_wait(&self, d: Duration) -> Duration {
        d.min(self.settings.max_backoff)
    }

    fn requeue_outbox(&mut self, now: Instant) {
        self.outbox_bytes = 0;
        for (m, _) in std::mem::take(&mut self.outbox) {
            if let Some(Kind::ExecuteResponse(r)) = m.kind {
                self.not_sent(now, *r);
            }
        }
    }

    fn back_off(&mut self, now: Instant, delay: Duration) {
        self.timers.set(Timer::Backoff, now + delay);
        self.enter(Phase::Backoff { delay });
        self.events
            .push_back(RegistrationEvent::BackingOff { delay });
    }

    fn register_message(&self) -> StreamMessage {
        let mut reg = self.template.clone();
        reg.auth_token = self.auth_token.expose().to_string();
        if let Some(t) = &self.session_token {
            reg.session_token = t.expose().to_string();
        }
        StreamMessage {
            kind: Some(Kind::Register(Box::new(reg))),
        }
    }

    fn connect(&mut self, now: Instant) {
        self.events.push_back(RegistrationEvent::Connecting {
            attempt: self.backoff.attempt(),
        });
        if self.settings.token_source {
            self.authorize(now, None);
        } else {
            self.open_stream(false);
        }
    }

    /// Asks the driver for a token (bounded by the connect timeout).
    fn authorize(&mut self, now: Instant, recheck: Option<String>) {
        self.enter(Phase::Authorizing { recheck });
        self.timers
            .set(Timer::Register, now + self.settings.connect_timeout);
        self.actions.push_back(Action::FetchToken);
    }

    fn open_stream(&mut self, credentials_retry: bool) {
        self.enter(Phase::Connecting {
            with_session: self.session_token.is_some(),
            credentials_retry,
        });
        self.actions
            .push_back(Action::OpenStream(self.register_message()));
    }

    fn protocol_error(&mut self, detail: &str) {
        self.counters.protocol_errors += 1;
        self.telemetry.protocol_error();
        tracing::debug!(key = %self.key, detail, "protocol error from server; ignored");
        self.events.push_back(RegistrationEvent::ProtocolError {
            detail: detail.to_string(),
        });
    }

    /// Stops for good. Called with no stream in the phase (a stream is
    /// ended through `end_stream` first).
    fn stop(&mut self, _now: Instant, reason: StopReason) {
        if matches!(self.phase, Phase::Stopped(_)) {
            return;
        }
        for t in Timer::ALL {
            self.timers.stop(t);
        }
        // Nothing can deliver what is still running: abort it.
        if !self.inflight.is_empty() {
            tracing::warn!(key = %self.key, abandoned = self.inflight.len(), "stopping with requests unanswered");
        }
        for id in self.inflight.clear() {
            self.actions.push_back(Action::Abort(id));
        }
        if matches!(
            self.phase,
            Phase::Connecting { .. } | Phase::Authorizing { .. }
        ) {
            // Abandon the open (or token fetch) under way (it may never
            // complete).
            self.actions.push_back(Action::DropStream);
        }
        self.enter(Phase::Stopped(reason.clone()));
        self.events.push_back(RegistrationEvent::Stopped { reason });
    }

    fn stop_gracefully(&mut self, now: Instant, kind: StopKind) {
        match self.phase {
            Phase::Stopped(_) => {}
            Phase::Active(_) | Phase::Draining(..) => {
                self.begin_drain(now, "shutdown".into(), AfterDrain::Stop(kind));
            }
            Phase::Registering(_) | Phase::Pending(_) => {
                // Nothing in flight on an unapproved stream: close it now.
                self.end_stream(now, How::Close, None, Then::Stop(kind.reason()));
            }
            _ => self.stop(now, kind.reason()),
        }
    }

    // ------------------------------------------------------------------
    // Registration
    // ------------------------------------------------------------------

    fn on_register_response(&mut self, now: Instant, r: RegisterResponse) {
        if !matches!(self.phase, Phase::Registering(_)) {
            self.protocol_error("register_response outside of registering");
            return;
        }
        self.timers.stop(Timer::Register);
        if let Some(interval) = heartbeat::server_interval(r.heartbeat_interval_ms) {
            if interval.as_millis() != r.heartbeat_interval_ms as u128 {
                tracing::warn!(key = %self.key, asked_ms = r.heartbeat_interval_ms, used_ms = interval.as_millis() as u64, "server heartbeat interval out of range; clamped");
            }
            let first = self.heartbeats.server_wish(now, interval);
            self.timers.set(Timer::Heartbeat, first);
            self.timers
                .set(Timer::Watchdog, now + self.heartbeats.timeout);
        }
        self.on_status(now, r.status, r.session_token, r.reject_reason, r.message);
    }

    fn on_approval_update(&mut self, now: Instant, u: ApprovalUpdate) {
        if !matches!(self.phase, Phase::Pending(_)) {
            self.protocol_error("approval_update while not pending");
            return;
        }
        self.on_status(now, u.status, u.session_token, u.reject_reason, u.message);
    }

    fn on_status(
        &mut self,
        now: Instant,
        status: i32,
        session_token: String,
        reject_reason: i32,
        message: String,
    ) {
        let Some(stream) = self.phase.stream() else {
            return;
        };
        let status = RegistrationStatus::try_from(status);
        // A token comes with an approval or a pending answer; one sent with
        // a rejection is ignored (a server that rejects SESSION_EXPIRED and
        // hands out a token each time would otherwise earn an immediate
        // retry forever).
        if !session_token.is_empty()
            && matches!(
                status,
                Ok(RegistrationStatus::Approved | RegistrationStatus::Pending)
            )
        {
            self.session_token = Some(Secret::new(session_token));
        }
        match status {
            Ok(RegistrationStatus::Approved) => self.on_approved(now, stream),
            Ok(RegistrationStatus::Pending) => {
                self.enter(Phase::Pending(stream));
                self.events.push_back(RegistrationEvent::PendingApproval);
            }
            Ok(RegistrationStatus::Rejected) => {
                let message = sanitize_text(&message, MAX_PEER_TEXT_CHARS).into_owned();
                self.on_rejected(now, stream, reject_reason, message);
            }
            _ => {
                self.protocol_error("registration status unspecified or unknown");
                // The stream's registration is undefined: start over.
                self.end_stream(
                    now,
                    How::Drop,
                    Some(DisconnectCause::Error("bad registration status".into())),
                    Then::Fail,
                );
            }
        }
    }

    fn on_approved(&mut self, now: Instant, stream: Stream) {
        let reconnect = self.approvals > 0;
        if reconnect {
            self.counters.successful_reconnects += 1;
        }
        self.approvals += 1;
        self.enter(Phase::Active(stream));
        self.events
            .push_back(RegistrationEvent::Approved { reconnect });
        self.timers
            .set(Timer::BackoffReset, now + self.settings.backoff_reset_after);
        if let Some(every) = self.settings.metrics_report_interval {
            self.timers.set(Timer::MetricsReport, now + every);
        }
        // Deliver what finished while no stream was up.
        let (kept, expired) = self.answered.take_waiting(now);
        self.count_dropped(expired);
        for resp in kept {
            self.counters.responses_redelivered += 1;
            self.send_response(now, resp);
        }
        // Work that waited for a slot while down can start now.
        self.start_queued(now);
    }

    fn on_rejected(&mut self, now: Instant, stream: Stream, reason: i32, message: String) {
        let known = RejectReason::try_from(reason).ok();
        let shown = known.unwrap_or(RejectReason::Unspecified);
        tracing::warn!(key = %self.key, reason = shown.as_str_name(), code = reason, %message, "registration rejected");
        self.events.push_back(RegistrationEvent::Rejected {
            reason: shown,
            message: message.clone(),
        });
        match known {
            Some(RejectReason::SessionExpired) => {
                self.session_token = None;
                // One immediate retry, without the token, for a register
                // that carried one; a further one is a failed attempt.
                let then = if stream.with_session {
                    Then::Now
                } else {
                    Then::Fail
                };
                self.end_stream(now, How::Close, Some(DisconnectCause::SessionExpired), then);
            }
            // The source may have rotated the token since it was read: one
            // more register if it now gives a different one.
            Some(RejectReason::InvalidCredentials)
                if self.settings.token_source && !stream.credentials_retry =>
            {
                self.end_stream(now, How::Close, None, Then::Recheck(message));
            }
            Some(
                reason @ (RejectReason::Denied
                | RejectReason::InvalidCredentials
                | RejectReason::InvalidRequest),
            ) => {
                self.end_stream(
                    now,
                    How::Close,
                    None,
                    Then::Stop(StopReason::Rejected { reason, message }),
                );
            }
            Some(RejectReason::Duplicate) => {
                self.end_stream(
                    now,
                    How::Close,
                    Some(DisconnectCause::Duplicate),
                    Then::Fail,
                );
            }
            // Unknown or unspecified: retryable with backoff, never fatal
            // (a newer server may have reasons we do not know).
            _ => {
                self.end_stream(
                    now,
                    How::Close,
                    Some(DisconnectCause::Error(format!(
                        "rejected with reason {reason}"
                    ))),
                    Then::Fail,
                );
            }
        }
    }

    // ------------------------------------------------------------------
    // Heartbeats, metrics, drain
    // ------------------------------------------------------------------

    fn send_heartbeat(&mut self, now: Instant, regular: bool) {
        if self.phase.stream().is_none() {
            return;
        }
        let sequence = self.heartbeats.beat(now, regular);
        if regular {
            if let Some(at) = self.heartbeats.next_due {
                self.timers.set(Timer::Heartbeat, at);
            }
        }
        self.queued_since_heartbeat = 0;
        self.bytes_since_heartbeat = 0;
        let since = now.saturating_duration_since(self.clock_origin.0);
        let sent_at_unix_ms = self.clock_origin.1 + since.as_millis() as i64;
        self.push_out(
            now,
            StreamMessage {
                kind: Some(Kind::Heartbeat(Box::new(Heartbeat {
                    sequence,
                    sent_at_unix_ms,
                }))),
            },
        );
    }

    fn on_heartbeat_ack(&mut self, now: Instant, ack: HeartbeatAck) {
        let Some(stream) = self.phase.stream() else {
            return;
        };
        if ack.sequence > self.heartbeats.seq {
            // An ack for a heartbeat never sent would confirm answers the
            // server may not have read: not taken.
            self.protocol_error("heartbeat_ack for a heartbeat never sent");
            return;
        }
        // Ordered stream: the server has read everything queued before it.
        self.answered.confirm(stream.gen, ack.sequence);
        if let Some(rtt) = self.heartbeats.acked(now, ack.sequence) {
            self.counters.set_rtt(rtt);
            self.telemetry.heartbeat_rtt(rtt);
        }
        if ack.should_reconnect {
            self.on_drain(now, "server asked to reconnect".into(), Duration::ZERO);
        }
    }

    fn on_metrics_timer(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Active(_)) {
            return;
        }
        let m = self.counters();
        self.push_out(
            now,
            StreamMessage {
                kind: Some(Kind::MetricsReport(Box::new(MetricsReport {
                    requests_received: m.requests_received,
                    requests_succeeded: m.requests_succeeded,
                    requests_failed: m.requests_failed,
                    in_flight: m.in_flight.min(u32::MAX as u64) as u32,
                    total_disconnects: m.total_disconnects,
                    successful_reconnects: m.successful_reconnects,
                    last_heartbeat_rtt_ms: m
                        .last_rtt_us
                        .checked_sub(1)
                        .map(|us| (us / 1000).min(u32::MAX as u64) as u32)
                        .unwrap_or(0),
                }))),
            },
        );
        if let Some(every) = self.settings.metrics_report_interval {
            self.timers.set(Timer::MetricsReport, now + every);
        }
    }

    fn on_drain(&mut self, now: Instant, reason: String, delay: Duration) {
        match self.phase {
            Phase::Active(s) => self.begin_drain(
                now,
                reason,
                AfterDrain::Reconnect {
                    after: delay,
                    failed: !s.healthy,
                },
            ),
            Phase::Registering(_) | Phase::Pending(_) => {
                // Nothing in flight: go at once. The stream never became
                // healthy: a failed attempt.
                self.events
                    .push_back(RegistrationEvent::Draining { reason });
                self.end_stream(
                    now,
                    How::Close,
                    Some(DisconnectCause::Drained),
                    Then::FailAtLeast(delay),
                );
            }
            _ => {}
        }
    }

    fn begin_drain(&mut self, now: Instant, reason: String, then: AfterDrain) {
        let Some(stream) = self.phase.stream() else {
            return;
        };
        match &mut self.phase {
            Phase::Draining(_, current) => {
                // A shutdown during a server drain turns the reconnect
                // into a stop; nothing turns a stop back.
                if matches!(then, AfterDrain::Stop(_)) {
                    *current = then;
                }
            }
            _ => {
                self.enter(Phase::Draining(stream, then));
                self.events
                    .push_back(RegistrationEvent::Draining { reason });
                self.timers
                    .set(Timer::Drain, now + self.settings.drain_timeout);
                self.timers.stop(Timer::MetricsReport);
                self.timers.stop(Timer::BackoffReset);
            }
        }
        self.maybe_finish_drain(now);
    }

    fn maybe_finish_drain(&mut self, now: Instant) {
        if let Phase::Draining(_, then) = &self.phase {
            if self.inflight.is_empty() {
                let then = *then;
                self.finish_drain(now, then);
            }
        }
    }

    fn finish_drain(&mut self, now: Instant, then: AfterDrain) {
        match then {
            AfterDrain::Stop(kind) => {
                self.end_stream(now, How::Close, None, Then::Stop(kind.reason()))
            }
            AfterDrain::Reconnect { after, failed } => self.end_stream(
                now,
                How::Close,
                Some(DisconnectCause::Drained),
                drain_then(after, failed),
            ),
        }
    }

    fn on_drain_deadline(&mut self, now: Instant) {
        let Phase::Draining(..) = self.phase else {
            return;
        };
        let ids = self.inflight.ids();
        tracing::warn!(key = %self.key, unanswered = ids.len(), "drain timeout: cancelling what is still in flight");
        for id in ids {
            self.finish(
                now,
                &id,
                error_response(
                    &id,
                    ExecuteError::new(ExecuteErrorKind::Cancelled, "drain timeout"),
                ),
                true,
            );
        }
        // Answering the last request already closed the stream; otherwise
        // (nothing was in flight) close it now.
        if let Phase::Draining(_, then) = self.phase {
            self.finish_drain(now, then);
        }
    }

    // ------------------------------------------------------------------
    // Executes
    // ------------------------------------------------------------------

    fn on_execute_request(&mut self, now: Instant, req: Box<ExecuteRequest>) {
        let Some(stream) = self.phase.stream() else {
            return;
        };
        if req.request_id.is_empty() {
            self.protocol_error("execute_request without request_id");
            return;
        }
        let limit = self.settings.limits.max_request_id_len;
        if req.request_id.len() > limit {
            self.refuse_long_id(now, &req.request_id, limit);
            return;
        }
        if self.inflight.contains(&req.request_id) {
            // The first one will be answered; a second answer would break
            // "exactly one response per request_id".
            self.protocol_error("duplicate request_id while the first is in flight");
            return;
        }
        match self.answered.known(&req.request_id) {
            Some(Known::SentOn(gen)) if gen != stream.gen => {
                // Asked again after a reconnect: the answer may have died
                // with the old stream. Replay it; the handler does not run twice.
                if let Some(resp) = self.answered.replay(&req.request_id) {
                    tracing::debug!(key = %self.key, request_id = %sanitize_text(&req.request_id, MAX_PEER_TEXT_CHARS), "replaying a response that may have been lost");
                    self.counters.responses_redelivered += 1;
                    self.send_response(now, resp);
                }
                return;
            }
            Some(_) => {
                // Already answered on this stream, or waiting to be: the
                // one answer is on its way.
                tracing::debug!(key = %self.key, request_id = %sanitize_text(&req.request_id, MAX_PEER_TEXT_CHARS), "request asked again while its answer is on its way; ignored");
                return;
            }
            None => {}
        }
        self.counters.requests_received += 1;
        let id = req.request_id.as_str();
        let refuse = match self.phase {
            Phase::Active(_) => None,
            Phase::Draining(..) => Some("draining: not taking new work"),
            _ => {
                self.protocol_error("execute_request before approval");
                Some("registration is not approved on this stream")
            }
        };
        if let Some(why) = refuse {
            self.respond_now(
                id,
                ExecuteError::new(ExecuteErrorKind::Overloaded, why),
                now,
            );
            return;
        }
        if !req.capability_id.is_empty()
            && !self.capabilities.is_empty()
            && !self.capabilities.contains(&req.capability_id)
        {
            self.respond_now(
                id,
                ExecuteError::unknown_capability(&req.capability_id),
                now,
            );
            return;
        }
        let encoding =
            PayloadEncoding::try_from(req.encoding).unwrap_or(PayloadEncoding::Unspecified);
        if encoding == PayloadEncoding::Json {
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&req.payload) {
                self.respond_now(
                    id,
                    ExecuteError::bad_payload(format!("payload is not valid JSON: {e}")),
                    now,
                );
                return;
            }
        }
        let timeout = (req.timeout_ms > 0)
            .then(|| Duration::from_millis(req.timeout_ms as u64).min(MAX_REQUEST_TIMEOUT));
        let running = self.inflight.running() < self.settings.max_concurrent;
        if running {
            self.inflight.insert_running(Arc::from(id), now, timeout);
            self.actions.push_back(Action::Execute(req));
            return;
        }
        let limits = &self.settings.limits;
        let full = self.inflight.queued() >= limits.queued_requests;
        let bytes = request_bytes(&req);
        if full || self.inflight.queued_bytes() + bytes > limits.queued_bytes {
            let why = if full {
                format!(
                    "{} requests already wait for a slot",
                    limits.queued_requests
                )
            } else {
                format!(
                    "the requests waiting for a slot already hold {} of {} bytes",
                    self.inflight.queued_bytes(),
                    limits.queued_bytes
                )
            };
            self.respond_now(
                id,
                ExecuteError::new(ExecuteErrorKind::Overloaded, why),
                now,
            );
            return;
        }
        self.inflight.insert_queued(req, now, timeout);
    }

    /// A request id over the limit: a `BAD_PAYLOAD` answer carrying the id
    /// as received (the server needs it to match), never stored.
    fn refuse_long_id(&mut self, now: Instant, id: &str, limit: usize) {
        self.counters.requests_received += 1;
        self.counters.requests_failed += 1;
        tracing::warn!(key = %self.key, len = id.len(), limit, request_id = %sanitize_text(id, 64), "request_id over the length limit; answered BAD_PAYLOAD, not stored");
        let resp = error_response(
            id,
            ExecuteError::bad_payload(format!(
                "request_id of {} bytes exceeds the limit of {limit} bytes",
                id.len()
            )),
        );
        self.telemetry
            .executed(false, resp.error_kind, Duration::ZERO);
        if self.phase.stream().is_none() {
            return;
        }
        if let Some((resp, size)) = self.fit_answer(resp) {
            self.push_out_sized(now, answers::message(resp), size);
        }
    }

    fn on_cancel(&mut self, now: Instant, request_id: &str) {
        if !self.inflight.contains(request_id) {
            tracing::debug!(key = %self.key, request_id = %sanitize_text(request_id, MAX_PEER_TEXT_CHARS), "cancel for a request not in flight; ignored");
            return;
        }
        self.finish(
            now,
            request_id,
            error_response(
                request_id,
                ExecuteError::new(ExecuteErrorKind::Cancelled, "cancelled by server"),
            ),
            true,
        );
    }

    /// Answers a request that never took a slot.
    fn respond_now(&mut self, request_id: &str, error: ExecuteError, now: Instant) {
        self.counters.requests_failed += 1;
        let resp = error_response(request_id, error);
        self.telemetry
            .executed(false, resp.error_kind, Duration::ZERO);
        self.send_response(now, resp);
    }

    /// The one place a request in flight gets its response: it leaves the
    /// table here, so a second response cannot be made. `abort`: its
    /// handler may still run (cancel, deadline, drain) and is aborted.
    fn finish(&mut self, now: Instant, request_id: &str, response: ExecuteResponse, abort: bool) {
        let Some(left) = self.inflight.remove(request_id) else {
            return;
        };
        self.finish_left(now, left, response, abort);
    }

    /// [`Registration::finish`] of a request already taken from the table.
    fn finish_left(
        &mut self,
        now: Instant,
        left: Left,
        mut response: ExecuteResponse,
        abort: bool,
    ) {
        if response.request_id.is_empty() {
            // `String::from(&str)`, not `to_string()`: `Arc<str>` has no
            // `ToString` fast path and goes through the formatter.
            response.request_id = String::from(&*left.id);
        }
        if left.was_running && abort {
            self.actions
                .push_back(Action::Abort(String::from(&*left.id)));
        }
        let took = now.saturating_duration_since(left.received_at);
        response.duration_ms = took.as_millis() as u64;
        self.telemetry
            .executed(response.success, response.error_kind, took);
        if response.success {
            self.counters.requests_succeeded += 1;
        } else {
            self.counters.requests_failed += 1;
        }
        self.send_response_with_id(now, response, Some(left.id));
        self.start_queued(now);
        self.maybe_finish_drain(now);
    }

    /// `r`, or the error answer that replaces it when it would not fit in
    /// a message, with its size on the wire; `None` when nothing with its
    /// id fits.
    fn fit_answer(&mut self, r: ExecuteResponse) -> Option<(ExecuteResponse, usize)> {
        match fit(r, self.settings.max_message_size) {
            Fit::AsIs { answer, size } => Some((answer, size)),
            Fit::Replaced { answer, was, size } => {
                self.counters.answers_oversized += 1;
                tracing::warn!(key = %self.key, request_id = %sanitize_text(&answer.request_id, MAX_PEER_TEXT_CHARS), bytes = was, limit = self.settings.max_message_size, "answer exceeds max_message_size; replaced by a HANDLER error answer");
                Some((answer, size))
            }
            Fit::Impossible => {
                self.protocol_error("request_id too long to answer within max_message_size");
                None
            }
        }
    }

    fn send_response(&mut self, now: Instant, response: ExecuteResponse) {
        self.send_response_with_id(now, response, None);
    }

    /// [`Registration::send_response`]; `id` is the in-flight table's
    /// shared copy of the request id when there is one, so keeping the
    /// answer for replay copies no string.
    fn send_response_with_id(
        &mut self,
        now: Instant,
        response: ExecuteResponse,
        id: Option<Arc<str>>,
    ) {
        let Some((response, size)) = self.fit_answer(response) else {
            return;
        };
        let stream = match self.phase {
            Phase::Active(s) | Phase::Draining(s, _) => Some(s),
            _ => None,
        };
        let Some(stream) = stream else {
            self.keep_for_redelivery(now, response);
            return;
        };
        // The next heartbeat queued goes out after this response; its ack
        // confirms the response was read.
        let tag = self.heartbeats.seq + 1;
        let id = id.unwrap_or_else(|| Arc::from(response.request_id.as_str()));
        let dropped = self
            .answered
            .sent_with_id(now, &response, id, stream.gen, tag);
        self.count_dropped(dropped);
        self.bytes_since_heartbeat += response.payload.len() + response.error.len();
        self.push_out_sized(now, answers::message(response), size);
        self.queued_since_heartbeat += 1;
        if self.queued_since_heartbeat >= EARLY_HEARTBEAT_AFTER
            || self.bytes_since_heartbeat >= EARLY_HEARTBEAT_BYTES
        {
            self.send_heartbeat(now, false);
        }
    }

    /// Queues a message for the stream. A stream whose queue keeps growing
    /// past its budget (entries or bytes) is not being read by the server:
    /// rather than buffer without limit, give it up (answers move to the
    /// bounded answered log).
    fn push_out(&mut self, now: Instant, message: StreamMessage) {
        let size = message.encoded_len();
        self.push_out_sized(now, message, size);
    }

    /// [`Registration::push_out`] of a message whose encoded size is known.
    fn push_out_sized(&mut self, now: Instant, message: StreamMessage, size: usize) {
        self.outbox_bytes += size;
        self.outbox.push_back((message, size));
        let limits = &self.settings.limits;
        if (self.outbox.len() > limits.outbox_messages || self.outbox_bytes > limits.outbox_bytes)
            && self.phase.stream().is_some()
        {
            tracing::warn!(key = %self.key, queued = self.outbox.len(), bytes = self.outbox_bytes, "server is not reading this stream; dropping it");
            let then = self.then_after_loss();
            self.end_stream(now, How::Drop, Some(DisconnectCause::OutboundStalled), then);
        }
    }

    fn keep_for_redelivery(&mut self, now: Instant, response: ExecuteResponse) {
        let dropped = self.answered.keep_waiting(now, response);
        self.count_dropped(dropped);
    }

    /// A response queued on a stream that went away before taking it.
    fn not_sent(&mut self, now: Instant, response: ExecuteResponse) {
        match self.answered.known(&response.request_id) {
            Some(_) => self.answered.unsent(&response.request_id),
            None => self.keep_for_redelivery(now, response),
        }
    }

    fn count_dropped(&mut self, dropped: Dropped) {
        if dropped.waiting > 0 {
            tracing::warn!(key = %self.key, dropped = dropped.waiting, "undelivered responses dropped (answered log budget or TTL)");
            self.counters.responses_expired += dropped.waiting;
        }
        if dropped.unconfirmed > 0 {
            tracing::debug!(key = %self.key, forgotten = dropped.unconfirmed, "unconfirmed answers forgotten (answered log budget): exactly-once lost for them");
            self.counters.replay_forgotten += dropped.unconfirmed;
        }
    }

    fn start_queued(&mut self, _now: Instant) {
        // Accepted work runs whether or not a stream is up: its response
        // is kept for the next stream if this one is gone.
        if matches!(self.phase, Phase::Stopped(_)) {
            return;
        }
        while self.inflight.running() < self.settings.max_concurrent {
            let Some(req) = self.inflight.start_next() else {
                break;
            };
            self.actions.push_back(Action::Execute(req));
        }
    }

    /// The next regular heartbeat (tests).
    #[cfg(test)]
    pub(crate) fn next_heartbeat_at(&self) -> Option<Instant> {
        self.timers.get(Timer::Heartbeat)
    }
}

/// What follows a drain once it is over.
fn drain_then(after: Duration, failed: bool) -> Then {
    if failed {
        Then::FailAtLeast(after)
    } else {
        Then::After(after)
    }
}
