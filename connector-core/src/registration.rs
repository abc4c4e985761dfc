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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use foldhash::fast::RandomState;
use std::sync::Arc;
use std::time::Duration;

use connector_proto::{
    stream_message::Kind, ApprovalUpdate, ExecuteErrorKind, ExecuteRequest, ExecuteResponse,
    Heartbeat, HeartbeatAck, MetricsReport, PayloadEncoding, RegisterRequest, RegisterResponse,
    RegistrationStatus, RejectReason, StreamMessage,
};
use tokio::time::Instant;

use crate::answered::{AnsweredLog, Known};
use crate::backoff::{Backoff, JitterRng};
use crate::config::{MultiTransportOptions, RegistrationKey, Secret};
use crate::connector::{ConnectorRegistration, ExecuteError, ExecuteOutput};
use crate::metrics::MetricsCell;
use crate::state::{DisconnectCause, RegistrationEvent, RegistrationState, StopReason};
use crate::telemetry::Telemetry;

/// Something the driver must do for the state machine.
#[non_exhaustive]
pub enum Action {
    /// Open a stream and send this `register` message first.
    OpenStream(StreamMessage),
    /// Close the current stream gracefully: send what
    /// [`Registration::poll_transmit`] still yields, half-close, then drop.
    CloseStream,
    /// Drop the current stream at once (it is dead or abandoned).
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
            Self::CloseStream => f.write_str("CloseStream"),
            Self::DropStream => f.write_str("DropStream"),
            Self::Execute(r) => write!(f, "Execute({:?})", r.request_id),
            Self::Abort(id) => write!(f, "Abort({id:?})"),
        }
    }
}

/// Why the stream is going away, when the state machine closes it itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterDrain {
    Reconnect(Duration),
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

/// The timers of a registration; the next deadline is the earliest one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Heartbeat = 0,
    Watchdog = 1,
    Register = 2,
    Backoff = 3,
    BackoffReset = 4,
    Drain = 5,
    MetricsReport = 6,
}

const TIMERS: [Timer; 7] = [
    Timer::Heartbeat,
    Timer::Watchdog,
    Timer::Register,
    Timer::Backoff,
    Timer::BackoffReset,
    Timer::Drain,
    Timer::MetricsReport,
];

#[derive(Debug, Default)]
struct TimerTable([Option<Instant>; 7]);

impl TimerTable {
    fn set(&mut self, t: Timer, at: Instant) {
        self.0[t as usize] = Some(at);
    }
    fn stop(&mut self, t: Timer) {
        self.0[t as usize] = None;
    }
    fn expired(&self, t: Timer, now: Instant) -> bool {
        self.0[t as usize].is_some_and(|at| at <= now)
    }
    fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }
}

/// One request the registration has received and not yet answered.
#[derive(Debug)]
struct Pending {
    received_at: Instant,
    running: bool,
    deadline: Option<(Instant, u64)>,
    /// Set while waiting for a slot.
    request: Option<Box<ExecuteRequest>>,
}

/// Per-registration settings taken from [`MultiTransportOptions`].
#[derive(Debug, Clone)]
struct Settings {
    reconnect: bool,
    connect_timeout: Duration,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    backoff_reset_after: Duration,
    max_concurrent: usize,
    max_queued: usize,
    drain_timeout: Duration,
    metrics_report_interval: Option<Duration>,
    max_message_size: usize,
    max_outbox: usize,
}

/// Responses queued without a heartbeat after them before one is sent early
/// (its ack confirms them, which bounds what must be kept for replay).
/// 32: with the default 100 concurrent executes that keeps at most a few
/// dozen answers per registration in the replay log (measured: 128 kept
/// ~0.8 MiB per busy registration with 4 KiB payloads), for one extra small
/// message per 32 answers.
const EARLY_HEARTBEAT_AFTER: usize = 32;

/// How many heartbeats are remembered for RTT measurement.
const HEARTBEATS_REMEMBERED: usize = 8;

/// The sans-IO state machine of one registration.
#[derive(Debug)]
pub struct Registration {
    key: RegistrationKey,
    template: RegisterRequest,
    auth_token: Secret,
    session_token: Option<Secret>,
    capabilities: HashSet<String>,
    settings: Settings,
    state: RegistrationState,
    state_version: u64,
    has_stream: bool,
    /// The stream got a `register_response` (and is registered).
    ever_approved: bool,
    timers: TimerTable,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    heartbeat_seq: u64,
    heartbeats_sent: VecDeque<(u64, Instant)>,
    backoff: Backoff,
    after_drain: Option<AfterDrain>,
    /// In flight, by request id. foldhash (randomly seeded per process)
    /// instead of SipHash: ids are hashed several times per execute and
    /// SipHash was a tenth of the SDK's per-response cost.
    requests: HashMap<String, Pending, RandomState>,
    queue: VecDeque<String>,
    deadlines: BTreeMap<(Instant, u64), String>,
    deadline_seq: u64,
    running: usize,
    outbox: VecDeque<StreamMessage>,
    answered: AnsweredLog,
    /// Bumped for every stream opened; tags what was sent on which.
    stream_gen: u64,
    /// Responses queued since the last heartbeat; past a threshold a
    /// heartbeat goes out early so its ack confirms them sooner.
    queued_since_heartbeat: usize,
    actions: VecDeque<Action>,
    events: VecDeque<RegistrationEvent>,
    metrics: Arc<MetricsCell>,
    telemetry: Telemetry,
    /// Maps tokio instants to wall-clock milliseconds for heartbeats.
    clock_origin: (Instant, i64),
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
        Self::with_metrics(
            registration,
            options,
            now,
            unix_ms_now,
            Arc::new(MetricsCell::default()),
        )
    }

    pub(crate) fn with_metrics(
        registration: &ConnectorRegistration,
        options: &MultiTransportOptions,
        now: Instant,
        unix_ms_now: i64,
        metrics: Arc<MetricsCell>,
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
        let seed = options.jitter_seed.unwrap_or_else(|| {
            // Spread registrations that fail together: mix the key into a
            // clock-derived seed.
            let mut h: u64 = unix_ms_now as u64 ^ 0xcbf2_9ce4_8422_2325;
            for b in key.to_string().bytes() {
                h = (h ^ b as u64).wrapping_mul(0x1000_0000_01b3);
            }
            h
        });
        let mut key_seed = seed;
        for b in key.to_string().bytes() {
            key_seed = (key_seed ^ b as u64).wrapping_mul(0x1000_0000_01b3);
        }
        Self {
            template,
            auth_token: config.auth_token.clone(),
            session_token: None,
            capabilities: capabilities.into_iter().map(|c| c.id).collect(),
            settings: Settings {
                reconnect: options.reconnect,
                connect_timeout: options.connect_timeout,
                heartbeat_interval: options.heartbeat_interval,
                heartbeat_timeout: options.heartbeat_timeout,
                backoff_reset_after: options.backoff_reset_after,
                max_concurrent: max_concurrent as usize,
                max_queued: options.max_queued_requests,
                drain_timeout: options.drain_timeout,
                metrics_report_interval: options.metrics_report_interval,
                max_message_size: options.max_message_size,
                // Far above what a stream that is read ever holds: every
                // request that can be in flight, plus every kept response.
                max_outbox: options.max_queued_requests
                    + max_concurrent as usize
                    + options.redelivery_capacity
                    + 64,
            },
            state: RegistrationState::Idle,
            state_version: 0,
            has_stream: false,
            ever_approved: false,
            timers: TimerTable::default(),
            heartbeat_interval: options.heartbeat_interval,
            heartbeat_timeout: options.heartbeat_timeout,
            heartbeat_seq: 0,
            heartbeats_sent: VecDeque::with_capacity(HEARTBEATS_REMEMBERED),
            backoff: Backoff::new(
                options.reconnect_delay,
                options.max_backoff,
                options.jitter,
                JitterRng::new(key_seed),
            ),
            after_drain: None,
            requests: HashMap::default(),
            queue: VecDeque::new(),
            deadlines: BTreeMap::new(),
            deadline_seq: 0,
            running: 0,
            outbox: VecDeque::new(),
            answered: AnsweredLog::new(options.redelivery_capacity, options.redelivery_ttl),
            stream_gen: 0,
            queued_since_heartbeat: 0,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            metrics,
            telemetry: Telemetry::new(key.to_string()),
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
        &self.state
    }

    /// Bumped on every state change, so a driver can publish only changes.
    pub fn state_version(&self) -> u64 {
        self.state_version
    }

    /// The next message for the server, if any. Only meaningful while a
    /// stream is open; the driver stops pulling when the stream's queue is full.
    pub fn poll_transmit(&mut self) -> Option<StreamMessage> {
        self.outbox.pop_front()
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
        self.events.pop_front()
    }

    /// When [`Registration::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timers = self.timers.next();
        let request = self.deadlines.keys().next().map(|(at, _)| *at);
        match (timers, request) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The registration's counters now.
    pub fn metrics_snapshot(&self) -> crate::metrics::ConnectorMetrics {
        self.metrics.snapshot()
    }

    /// Requests received and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Handlers running now.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Responses waiting for a stream to be delivered on.
    pub fn undelivered(&self) -> usize {
        self.answered.waiting()
    }

    /// True when the registration stopped and nothing is left to do.
    pub fn is_finished(&self) -> bool {
        self.state.is_stopped() && self.actions.is_empty()
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
        if matches!(self.state, RegistrationState::Idle) {
            self.connect(now);
        }
    }

    /// The stream asked for by [`Action::OpenStream`] is open (and `register`
    /// was sent on it).
    pub fn handle_stream_opened(&mut self, now: Instant) {
        if !matches!(self.state, RegistrationState::Connecting) {
            // Opened after we gave up on it (shutdown): let it go.
            self.actions.push_back(Action::DropStream);
            return;
        }
        self.has_stream = true;
        self.stream_gen += 1;
        self.queued_since_heartbeat = 0;
        self.telemetry.connection_attempt(true);
        self.heartbeat_interval = self.settings.heartbeat_interval;
        self.heartbeat_timeout = self.settings.heartbeat_timeout;
        self.heartbeats_sent.clear();
        self.timers
            .set(Timer::Heartbeat, now + self.heartbeat_interval);
        self.timers
            .set(Timer::Watchdog, now + self.heartbeat_timeout);
        self.timers
            .set(Timer::Register, now + self.settings.connect_timeout);
        self.set_state(RegistrationState::Registering);
        self.events.push_back(RegistrationEvent::Connected);
    }

    /// The stream asked for by [`Action::OpenStream`] could not be opened.
    pub fn handle_open_failed(&mut self, now: Instant, error: &str) {
        if !matches!(self.state, RegistrationState::Connecting) {
            return;
        }
        MetricsCell::inc(&self.metrics.connect_failures);
        self.telemetry.connection_attempt(false);
        self.events.push_back(RegistrationEvent::Disconnected {
            cause: DisconnectCause::OpenFailed(error.to_string()),
        });
        self.after_stream_lost(now, DisconnectCause::OpenFailed(error.to_string()));
    }

    /// The stream ended: `error` is `None` when the server ended it cleanly.
    pub fn handle_stream_closed(&mut self, now: Instant, error: Option<&str>) {
        if !self.has_stream {
            return;
        }
        let cause = match error {
            None => DisconnectCause::ClosedByServer,
            Some(e) => DisconnectCause::Error(e.to_string()),
        };
        self.lose_stream(now, cause, false);
    }

    /// The transport could not make a message out of what the server sent
    /// (a text frame, bytes that are not a `StreamMessage`, an oversized
    /// message). Counted like any protocol error; the transport ends the
    /// stream, which arrives as [`Registration::handle_stream_closed`].
    pub fn handle_malformed(&mut self, _now: Instant, detail: &str) {
        self.protocol_error(detail);
    }

    /// A message from the server.
    pub fn handle_message(&mut self, now: Instant, message: StreamMessage) {
        if !self.has_stream {
            return;
        }
        // Any server message proves the stream alive.
        self.timers
            .set(Timer::Watchdog, now + self.heartbeat_timeout);
        match message.kind {
            Some(Kind::RegisterResponse(r)) => self.on_register_response(now, *r),
            Some(Kind::ApprovalUpdate(u)) => self.on_approval_update(now, *u),
            Some(Kind::HeartbeatAck(a)) => self.on_heartbeat_ack(now, a),
            Some(Kind::ExecuteRequest(r)) => self.on_execute_request(now, r),
            Some(Kind::Cancel(c)) => self.on_cancel(now, &c.request_id),
            Some(Kind::Drain(d)) => {
                let delay = Duration::from_millis(d.reconnect_after_ms as u64);
                let reason = if d.reason.is_empty() {
                    "drain".to_string()
                } else {
                    d.reason
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

    /// A handler finished (successfully or not).
    pub fn handle_execute_done(
        &mut self,
        now: Instant,
        request_id: &str,
        result: Result<ExecuteOutput, ExecuteError>,
    ) {
        let Some(p) = self.requests.get(request_id) else {
            // Already answered (timeout, cancel, drain deadline).
            return;
        };
        if !p.running {
            return;
        }
        let response = match result {
            Ok(out) if out.payload.len() > self.settings.max_message_size => error_response(
                request_id,
                ExecuteError::handler(format!(
                    "result of {} bytes exceeds the {} byte message limit",
                    out.payload.len(),
                    self.settings.max_message_size
                )),
            ),
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
        self.finish_done(now, request_id, response);
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
        while let Some((&(at, seq), _)) = self.deadlines.iter().next() {
            if at > now {
                break;
            }
            if let Some(id) = self.deadlines.remove(&(at, seq)) {
                self.on_request_deadline(now, &id);
            }
        }
        for t in TIMERS {
            if !self.timers.expired(t, now) {
                continue;
            }
            self.timers.stop(t);
            match t {
                Timer::Heartbeat => self.on_heartbeat_timer(now),
                Timer::Watchdog => {
                    if self.has_stream {
                        tracing::warn!(key = %self.key, timeout_ms = self.heartbeat_timeout.as_millis() as u64, "watchdog: no server message in time, reconnecting");
                        self.lose_stream(now, DisconnectCause::Watchdog, true);
                    }
                }
                Timer::Register => {
                    if matches!(self.state, RegistrationState::Registering) {
                        self.lose_stream(now, DisconnectCause::RegisterTimeout, true);
                    }
                }
                Timer::Backoff => {
                    if matches!(self.state, RegistrationState::Backoff { .. }) {
                        self.connect(now);
                    }
                }
                Timer::BackoffReset => {
                    if matches!(self.state, RegistrationState::Active) {
                        self.backoff.reset();
                    }
                }
                Timer::Drain => self.on_drain_deadline(now),
                Timer::MetricsReport => self.on_metrics_timer(now),
            }
        }
    }

    // ------------------------------------------------------------------
    // Internals
    // ------------------------------------------------------------------

    fn set_state(&mut self, state: RegistrationState) {
        if self.state != state {
            let was_active = matches!(self.state, RegistrationState::Active);
            let is_active = matches!(state, RegistrationState::Active);
            if was_active != is_active {
                self.telemetry.active(is_active);
            }
            self.state = state;
            self.state_version += 1;
            self.metrics.set_state(&self.state);
        }
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

    fn connect(&mut self, _now: Instant) {
        self.set_state(RegistrationState::Connecting);
        self.events.push_back(RegistrationEvent::Connecting {
            attempt: self.backoff.attempt(),
        });
        self.actions
            .push_back(Action::OpenStream(self.register_message()));
    }

    fn protocol_error(&mut self, detail: &str) {
        MetricsCell::inc(&self.metrics.protocol_errors);
        self.telemetry.protocol_error();
        tracing::debug!(key = %self.key, detail, "protocol error from server; ignored");
        self.events.push_back(RegistrationEvent::ProtocolError {
            detail: detail.to_string(),
        });
    }

    fn stop_timers_of_stream(&mut self) {
        for t in [
            Timer::Heartbeat,
            Timer::Watchdog,
            Timer::Register,
            Timer::BackoffReset,
            Timer::Drain,
            Timer::MetricsReport,
        ] {
            self.timers.stop(t);
        }
    }

    /// The stream is gone (or given up): responses still queued for it are
    /// kept for the next one; then back off or stop.
    fn lose_stream(&mut self, now: Instant, cause: DisconnectCause, drop_it: bool) {
        self.has_stream = false;
        if drop_it {
            self.actions.push_back(Action::DropStream);
        }
        for m in std::mem::take(&mut self.outbox) {
            if let Some(Kind::ExecuteResponse(r)) = m.kind {
                self.not_sent(now, *r);
            }
        }
        self.stop_timers_of_stream();
        MetricsCell::inc(&self.metrics.total_disconnects);
        self.telemetry.disconnected(&cause);
        tracing::info!(key = %self.key, %cause, in_flight = self.requests.len(), "stream lost");
        self.events.push_back(RegistrationEvent::Disconnected {
            cause: cause.clone(),
        });
        match self.after_drain.take() {
            Some(AfterDrain::Stop(kind)) => self.stop(now, kind.reason()),
            Some(AfterDrain::Reconnect(delay)) => self.back_off(now, Some(delay)),
            None => self.after_stream_lost(now, cause),
        }
    }

    fn after_stream_lost(&mut self, now: Instant, cause: DisconnectCause) {
        if !self.settings.reconnect {
            self.stop(now, StopReason::StreamEnded { cause });
            return;
        }
        match cause {
            DisconnectCause::SessionExpired => self.connect(now),
            _ => self.back_off(now, None),
        }
    }

    fn back_off(&mut self, now: Instant, fixed: Option<Duration>) {
        let delay = match fixed {
            Some(d) => self.backoff.with_jitter(d),
            None => self.backoff.next_delay(),
        };
        self.timers.set(Timer::Backoff, now + delay);
        self.set_state(RegistrationState::Backoff { delay });
        self.events
            .push_back(RegistrationEvent::BackingOff { delay });
    }

    fn stop(&mut self, _now: Instant, reason: StopReason) {
        if self.state.is_stopped() {
            return;
        }
        self.stop_timers_of_stream();
        self.timers.stop(Timer::Backoff);
        // Nothing can deliver what is still running: abort it.
        let ids: Vec<String> = self.requests.keys().cloned().collect();
        if !ids.is_empty() {
            tracing::warn!(key = %self.key, abandoned = ids.len(), "stopping with requests unanswered");
        }
        for id in ids {
            if let Some(p) = self.requests.remove(&id) {
                if p.running {
                    self.actions.push_back(Action::Abort(id));
                }
            }
        }
        self.queue.clear();
        self.deadlines.clear();
        self.running = 0;
        self.metrics
            .in_flight
            .store(0, std::sync::atomic::Ordering::Relaxed);
        if self.has_stream {
            self.has_stream = false;
            self.actions.push_back(Action::CloseStream);
        } else if matches!(self.state, RegistrationState::Connecting) {
            // Abandon the open under way (it may never complete).
            self.actions.push_back(Action::DropStream);
        }
        self.set_state(RegistrationState::Stopped(reason.clone()));
        self.events.push_back(RegistrationEvent::Stopped { reason });
    }

    fn stop_gracefully(&mut self, now: Instant, kind: StopKind) {
        match self.state {
            RegistrationState::Stopped(_) => {}
            RegistrationState::Active | RegistrationState::Draining if self.has_stream => {
                self.begin_drain(now, "shutdown".into(), AfterDrain::Stop(kind));
            }
            RegistrationState::Registering | RegistrationState::PendingApproval => {
                // Nothing in flight on an unapproved stream: close it now.
                self.has_stream = false;
                self.actions.push_back(Action::CloseStream);
                self.stop(now, kind.reason());
            }
            _ => {
                if self.has_stream {
                    self.has_stream = false;
                    self.actions.push_back(Action::CloseStream);
                }
                self.stop(now, kind.reason());
            }
        }
    }

    fn on_register_response(&mut self, now: Instant, r: RegisterResponse) {
        if !matches!(self.state, RegistrationState::Registering) {
            self.protocol_error("register_response outside of registering");
            return;
        }
        self.timers.stop(Timer::Register);
        if r.heartbeat_interval_ms > 0 {
            let interval = Duration::from_millis(r.heartbeat_interval_ms as u64);
            self.heartbeat_interval = interval;
            self.heartbeat_timeout = self.settings.heartbeat_timeout.max(interval * 3 / 2);
            self.timers.set(Timer::Heartbeat, now + interval);
            self.timers
                .set(Timer::Watchdog, now + self.heartbeat_timeout);
        }
        self.on_status(now, r.status, r.session_token, r.reject_reason, r.message);
    }

    fn on_approval_update(&mut self, now: Instant, u: ApprovalUpdate) {
        if !matches!(self.state, RegistrationState::PendingApproval) {
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
        if !session_token.is_empty() {
            self.session_token = Some(Secret::new(session_token));
        }
        match RegistrationStatus::try_from(status) {
            Ok(RegistrationStatus::Approved) => self.on_approved(now),
            Ok(RegistrationStatus::Pending) => {
                self.set_state(RegistrationState::PendingApproval);
                self.events.push_back(RegistrationEvent::PendingApproval);
            }
            Ok(RegistrationStatus::Rejected) => {
                let reason =
                    RejectReason::try_from(reject_reason).unwrap_or(RejectReason::Unspecified);
                self.on_rejected(now, reason, message);
            }
            _ => {
                self.protocol_error("registration status unspecified or unknown");
                // The stream's registration is undefined: start over.
                self.lose_stream(
                    now,
                    DisconnectCause::Error("bad registration status".into()),
                    true,
                );
            }
        }
    }

    fn on_approved(&mut self, now: Instant) {
        let reconnect = self.ever_approved;
        if reconnect {
            MetricsCell::inc(&self.metrics.successful_reconnects);
        }
        self.ever_approved = true;
        self.set_state(RegistrationState::Active);
        self.events
            .push_back(RegistrationEvent::Approved { reconnect });
        self.timers
            .set(Timer::BackoffReset, now + self.settings.backoff_reset_after);
        if let Some(every) = self.settings.metrics_report_interval {
            self.timers.set(Timer::MetricsReport, now + every);
        }
        // Deliver what finished while no stream was up.
        let (kept, expired) = self.answered.take_waiting(now);
        self.metrics
            .responses_expired
            .fetch_add(expired, std::sync::atomic::Ordering::Relaxed);
        for resp in kept {
            MetricsCell::inc(&self.metrics.responses_redelivered);
            self.send_response(now, resp);
        }
        // Work that waited for a slot while down can start now.
        self.start_queued(now);
    }

    fn on_rejected(&mut self, now: Instant, reason: RejectReason, message: String) {
        tracing::warn!(key = %self.key, reason = reason.as_str_name(), %message, "registration rejected");
        self.events.push_back(RegistrationEvent::Rejected {
            reason,
            message: message.clone(),
        });
        match reason {
            RejectReason::SessionExpired => {
                self.session_token = None;
                self.lose_stream(now, DisconnectCause::SessionExpired, false);
                self.actions.push_front(Action::CloseStream);
            }
            RejectReason::Duplicate => {
                self.lose_stream(now, DisconnectCause::Duplicate, false);
                self.actions.push_front(Action::CloseStream);
            }
            _ => {
                self.stop(now, StopReason::Rejected { reason, message });
            }
        }
    }

    fn on_heartbeat_timer(&mut self, now: Instant) {
        if !self.has_stream {
            return;
        }
        self.heartbeat_seq += 1;
        let seq = self.heartbeat_seq;
        if self.heartbeats_sent.len() == HEARTBEATS_REMEMBERED {
            self.heartbeats_sent.pop_front();
        }
        self.heartbeats_sent.push_back((seq, now));
        self.queued_since_heartbeat = 0;
        let since = now.saturating_duration_since(self.clock_origin.0);
        let sent_at_unix_ms = self.clock_origin.1 + since.as_millis() as i64;
        self.push_out(
            now,
            StreamMessage {
                kind: Some(Kind::Heartbeat(Heartbeat {
                    sequence: seq,
                    sent_at_unix_ms,
                })),
            },
        );
        self.timers
            .set(Timer::Heartbeat, now + self.heartbeat_interval);
    }

    fn on_heartbeat_ack(&mut self, now: Instant, ack: HeartbeatAck) {
        // Ordered stream: the server has read everything queued before it.
        self.answered.confirm(self.stream_gen, ack.sequence);
        if let Some(pos) = self
            .heartbeats_sent
            .iter()
            .position(|(s, _)| *s == ack.sequence)
        {
            let (_, sent) = self.heartbeats_sent[pos];
            self.heartbeats_sent.drain(..=pos);
            let rtt = now.saturating_duration_since(sent);
            self.metrics.set_rtt(rtt);
            self.telemetry.heartbeat_rtt(rtt);
        }
        if ack.should_reconnect {
            self.on_drain(now, "server asked to reconnect".into(), Duration::ZERO);
        }
    }

    fn on_metrics_timer(&mut self, now: Instant) {
        if !matches!(self.state, RegistrationState::Active) {
            return;
        }
        let m = self.metrics.snapshot();
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
                        .last_heartbeat_rtt
                        .map(|d| d.as_millis().min(u32::MAX as u128) as u32)
                        .unwrap_or(0),
                }))),
            },
        );
        if let Some(every) = self.settings.metrics_report_interval {
            self.timers.set(Timer::MetricsReport, now + every);
        }
    }

    fn on_drain(&mut self, now: Instant, reason: String, delay: Duration) {
        match self.state {
            RegistrationState::Active => {
                self.begin_drain(now, reason, AfterDrain::Reconnect(delay))
            }
            RegistrationState::Registering | RegistrationState::PendingApproval => {
                // Nothing in flight: go at once.
                self.after_drain = Some(AfterDrain::Reconnect(delay));
                self.events
                    .push_back(RegistrationEvent::Draining { reason });
                self.lose_stream(now, DisconnectCause::Drained, false);
                self.actions.push_front(Action::CloseStream);
            }
            _ => {}
        }
    }

    fn begin_drain(&mut self, now: Instant, reason: String, then: AfterDrain) {
        // A shutdown during a server drain turns the reconnect into a stop.
        let then = match (self.after_drain, then) {
            (Some(AfterDrain::Stop(k)), _) => AfterDrain::Stop(k),
            (_, t) => t,
        };
        self.after_drain = Some(then);
        if !matches!(self.state, RegistrationState::Draining) {
            self.set_state(RegistrationState::Draining);
            self.events
                .push_back(RegistrationEvent::Draining { reason });
            self.timers
                .set(Timer::Drain, now + self.settings.drain_timeout);
            self.timers.stop(Timer::MetricsReport);
            self.timers.stop(Timer::BackoffReset);
        }
        self.maybe_finish_drain(now);
    }

    fn maybe_finish_drain(&mut self, now: Instant) {
        if !matches!(self.state, RegistrationState::Draining) || !self.requests.is_empty() {
            return;
        }
        self.close_after_drain(now);
    }

    fn close_after_drain(&mut self, now: Instant) {
        // Responses still in the outbox go out before the half-close.
        self.has_stream = false;
        self.stop_timers_of_stream();
        self.actions.push_back(Action::CloseStream);
        match self.after_drain.take() {
            Some(AfterDrain::Stop(kind)) => self.stop(now, kind.reason()),
            Some(AfterDrain::Reconnect(delay)) => {
                MetricsCell::inc(&self.metrics.total_disconnects);
                self.telemetry.disconnected(&DisconnectCause::Drained);
                self.events.push_back(RegistrationEvent::Disconnected {
                    cause: DisconnectCause::Drained,
                });
                if self.settings.reconnect {
                    self.back_off(now, Some(delay));
                } else {
                    self.stop(
                        now,
                        StopReason::StreamEnded {
                            cause: DisconnectCause::Drained,
                        },
                    );
                }
            }
            None => self.back_off(now, None),
        }
    }

    fn on_drain_deadline(&mut self, now: Instant) {
        if !matches!(self.state, RegistrationState::Draining) {
            return;
        }
        let ids: Vec<String> = self.requests.keys().cloned().collect();
        tracing::warn!(key = %self.key, unanswered = ids.len(), "drain timeout: cancelling what is still in flight");
        for id in ids {
            self.finish(
                now,
                &id,
                error_response(
                    &id,
                    ExecuteError::new(ExecuteErrorKind::Cancelled, "drain timeout"),
                ),
            );
        }
        // Answering the last request already closed the stream; otherwise
        // (nothing was in flight) close it now.
        if matches!(self.state, RegistrationState::Draining) {
            self.close_after_drain(now);
        }
    }

    fn on_execute_request(&mut self, now: Instant, req: Box<ExecuteRequest>) {
        if req.request_id.is_empty() {
            self.protocol_error("execute_request without request_id");
            return;
        }
        if self.requests.contains_key(&req.request_id) {
            // The first one will be answered; a second answer would break
            // "exactly one response per request_id".
            self.protocol_error("duplicate request_id while the first is in flight");
            return;
        }
        match self.answered.known(&req.request_id) {
            Some(Known::SentOn(stream)) if stream != self.stream_gen => {
                // Asked again after a reconnect: the answer may have died
                // with the old stream. Replay it; the handler does not run twice.
                if let Some(resp) = self.answered.replay(&req.request_id) {
                    tracing::debug!(key = %self.key, request_id = %req.request_id, "replaying a response that may have been lost");
                    MetricsCell::inc(&self.metrics.responses_redelivered);
                    self.send_response(now, resp);
                }
                return;
            }
            Some(_) => {
                // Already answered on this stream, or waiting to be: the
                // one answer is on its way.
                tracing::debug!(key = %self.key, request_id = %req.request_id, "request asked again while its answer is on its way; ignored");
                return;
            }
            None => {}
        }
        MetricsCell::inc(&self.metrics.requests_received);
        let id = req.request_id.clone();
        let refuse = match self.state {
            RegistrationState::Active => None,
            RegistrationState::Draining => Some("draining: not taking new work"),
            _ => {
                self.protocol_error("execute_request before approval");
                Some("registration is not approved on this stream")
            }
        };
        if let Some(why) = refuse {
            self.respond_now(
                &id,
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
                &id,
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
                    &id,
                    ExecuteError::bad_payload(format!("payload is not valid JSON: {e}")),
                    now,
                );
                return;
            }
        }
        let running = self.running < self.settings.max_concurrent;
        if !running && self.queue.len() >= self.settings.max_queued {
            self.respond_now(
                &id,
                ExecuteError::new(
                    ExecuteErrorKind::Overloaded,
                    format!(
                        "{} requests already wait for a slot",
                        self.settings.max_queued
                    ),
                ),
                now,
            );
            return;
        }
        let deadline = (req.timeout_ms > 0).then(|| {
            self.deadline_seq += 1;
            let at = (
                now + Duration::from_millis(req.timeout_ms as u64),
                self.deadline_seq,
            );
            self.deadlines.insert(at, id.clone());
            at
        });
        self.metrics
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if running {
            self.running += 1;
            self.requests.insert(
                id,
                Pending {
                    received_at: now,
                    running: true,
                    deadline,
                    request: None,
                },
            );
            self.actions.push_back(Action::Execute(req));
        } else {
            self.queue.push_back(id.clone());
            self.requests.insert(
                id,
                Pending {
                    received_at: now,
                    running: false,
                    deadline,
                    request: Some(req),
                },
            );
        }
    }

    fn on_cancel(&mut self, now: Instant, request_id: &str) {
        if !self.requests.contains_key(request_id) {
            tracing::debug!(key = %self.key, request_id, "cancel for a request not in flight; ignored");
            return;
        }
        self.finish(
            now,
            request_id,
            error_response(
                request_id,
                ExecuteError::new(ExecuteErrorKind::Cancelled, "cancelled by server"),
            ),
        );
    }

    fn on_request_deadline(&mut self, now: Instant, request_id: &str) {
        if self.requests.contains_key(request_id) {
            self.finish(
                now,
                request_id,
                error_response(
                    request_id,
                    ExecuteError::new(ExecuteErrorKind::Timeout, "timeout_ms passed"),
                ),
            );
        }
    }

    /// Answers a request that never took a slot.
    fn respond_now(&mut self, request_id: &str, error: ExecuteError, now: Instant) {
        MetricsCell::inc(&self.metrics.requests_failed);
        let resp = error_response(request_id, error);
        self.telemetry
            .executed(false, resp.error_kind, Duration::ZERO);
        self.send_response(now, resp);
    }

    /// Answers a request whose handler is still running (cancel, deadline,
    /// drain): the handler is aborted.
    fn finish(&mut self, now: Instant, request_id: &str, response: ExecuteResponse) {
        self.finish_with(now, request_id, response, true);
    }

    /// Answers a request whose handler has returned: nothing to abort.
    fn finish_done(&mut self, now: Instant, request_id: &str, response: ExecuteResponse) {
        self.finish_with(now, request_id, response, false);
    }

    /// The one place a request in flight gets its response: it leaves the
    /// table here, so a second response cannot be made.
    fn finish_with(
        &mut self,
        now: Instant,
        request_id: &str,
        mut response: ExecuteResponse,
        abort: bool,
    ) {
        let Some((id, p)) = self.requests.remove_entry(request_id) else {
            return;
        };
        if response.request_id.is_empty() {
            response.request_id = id;
        }
        self.metrics
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(at) = p.deadline {
            self.deadlines.remove(&at);
        }
        if p.running {
            self.running -= 1;
            if abort {
                self.actions
                    .push_back(Action::Abort(request_id.to_string()));
            }
        } else {
            self.queue.retain(|id| id != request_id);
        }
        let took = now.saturating_duration_since(p.received_at);
        response.duration_ms = took.as_millis() as u64;
        self.telemetry
            .executed(response.success, response.error_kind, took);
        if response.success {
            MetricsCell::inc(&self.metrics.requests_succeeded);
        } else {
            MetricsCell::inc(&self.metrics.requests_failed);
        }
        self.send_response(now, response);
        self.start_queued(now);
        self.maybe_finish_drain(now);
    }

    fn send_response(&mut self, now: Instant, response: ExecuteResponse) {
        let deliverable = self.has_stream
            && matches!(
                self.state,
                RegistrationState::Active | RegistrationState::Draining
            );
        if deliverable {
            // The next heartbeat queued goes out after this response; its
            // ack confirms the response was read.
            let tag = self.heartbeat_seq + 1;
            let dropped = self.answered.sent(now, &response, self.stream_gen, tag);
            self.count_dropped(dropped);
            self.push_out(
                now,
                StreamMessage {
                    kind: Some(Kind::ExecuteResponse(Box::new(response))),
                },
            );
            self.queued_since_heartbeat += 1;
            if self.queued_since_heartbeat >= EARLY_HEARTBEAT_AFTER && self.has_stream {
                self.on_heartbeat_timer(now);
            }
        } else {
            self.keep_for_redelivery(now, response);
        }
    }

    /// Queues a message for the stream. A stream whose queue keeps growing
    /// is not being read by the server: rather than buffer without limit,
    /// give it up (responses move to the bounded redelivery buffer).
    fn push_out(&mut self, now: Instant, message: StreamMessage) {
        self.outbox.push_back(message);
        if self.outbox.len() > self.settings.max_outbox && self.has_stream {
            tracing::warn!(key = %self.key, queued = self.outbox.len(), "server is not reading this stream; dropping it");
            self.lose_stream(now, DisconnectCause::OutboundStalled, true);
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

    fn count_dropped(&mut self, dropped: u64) {
        if dropped > 0 {
            tracing::warn!(key = %self.key, dropped, "undelivered responses dropped (redelivery capacity or TTL)");
            self.metrics
                .responses_expired
                .fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn start_queued(&mut self, _now: Instant) {
        // Accepted work runs whether or not a stream is up: its response
        // is kept for the next stream if this one is gone.
        if self.state.is_stopped() {
            return;
        }
        while self.running < self.settings.max_concurrent {
            let Some(id) = self.queue.pop_front() else {
                break;
            };
            let Some(p) = self.requests.get_mut(&id) else {
                continue;
            };
            let Some(req) = p.request.take() else {
                continue;
            };
            p.running = true;
            self.running += 1;
            self.actions.push_back(Action::Execute(req));
        }
    }
}

fn error_response(request_id: &str, error: ExecuteError) -> ExecuteResponse {
    ExecuteResponse {
        request_id: request_id.to_string(),
        success: false,
        payload: Default::default(),
        encoding: PayloadEncoding::Unspecified as i32,
        error: error.message,
        duration_ms: 0,
        error_kind: error.kind as i32,
    }
}
