//! The transport-agnostic server engine: the server side of the
//! `connector.v1` wire contract, plus the handle a test drives it with.
//!
//! Front-ends (in-memory, gRPC, WebSocket) only move [`StreamMessage`]s in
//! and out of [`TestServer::serve_stream`]; every protocol rule, every
//! counter and the event log live here, once, so a test written against one
//! transport means the same thing on another.
//!
//! All state sits behind one `std::sync::Mutex` that is never held across an
//! `.await`; every change bumps a `watch` channel so [`TestServer::wait_until`]
//! wakes on the event itself instead of polling.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use connector_proto::{
    ApprovalUpdate, CancelRequest, Drain, ExecuteRequest, ExecuteResponse, HeartbeatAck, Kind,
    RegisterRequest, RegisterResponse, RegistrationStatus, RejectReason, StreamMessage,
};
use futures_util::FutureExt as _;
use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use connector_core::RegistrationKey;

use crate::error::TestkitError;
use crate::memory::MemoryMux;

/// What the server answers to a `register`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApprovalPolicy {
    /// `APPROVED` at once (the default).
    Approve,
    /// `PENDING`: the stream stays open until [`TestServer::approve`] or
    /// [`TestServer::reject`]. A register carrying a session token this
    /// server issued skips this and is approved at once, as the contract's
    /// reconnect rule asks.
    Pending,
    /// `REJECTED` with this reason, every time; the server then ends the
    /// stream.
    Reject(RejectReason),
    /// `REJECTED` with this reason for the first register of a key, then
    /// `APPROVED`: exercises the client's retry paths (`SESSION_EXPIRED`,
    /// `DUPLICATE`). Setting the policy again re-arms the one rejection.
    RejectOnce(RejectReason),
}

/// Where a stream comes from, as a front-end tells the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionMeta {
    /// The front-end's connection id (unique per engine when taken from
    /// [`TestServer::allocate_connection_id`]).
    pub connection_id: u64,
    /// The peer address (a placeholder for the in-memory mux).
    pub peer: SocketAddr,
    /// `"memory"`, `"grpc"` or `"ws"`.
    pub transport: &'static str,
}

impl ConnectionMeta {
    /// Meta for a stream on connection `connection_id` from `peer`.
    pub fn new(connection_id: u64, peer: SocketAddr, transport: &'static str) -> Self {
        Self {
            connection_id,
            peer,
            transport,
        }
    }
}

/// A live (open) stream that has registered.
#[derive(Clone)]
#[non_exhaustive]
pub struct RegistrationInfo {
    /// `tenant.type.instance`.
    pub key: String,
    /// The engine's id of the stream.
    pub stream_id: u64,
    /// The connection carrying it.
    pub connection_id: u64,
    /// The peer address.
    pub peer: SocketAddr,
    /// `"memory"`, `"grpc"` or `"ws"`.
    pub transport: &'static str,
    /// Current status (`PENDING`, `APPROVED`; rejected streams are closed).
    pub status: RegistrationStatus,
    /// The last register message of that stream.
    pub register: RegisterRequest,
}

impl fmt::Debug for RegistrationInfo {
    // Hand-written so the auth and session tokens of `register` never end
    // up in a test log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistrationInfo")
            .field("key", &self.key)
            .field("stream_id", &self.stream_id)
            .field("connection_id", &self.connection_id)
            .field("peer", &self.peer)
            .field("transport", &self.transport)
            .field("status", &self.status)
            .field("version", &self.register.version)
            .finish_non_exhaustive()
    }
}

/// A snapshot of the engine's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Streams handed to [`TestServer::serve_stream`].
    pub streams_opened: u64,
    /// `register` messages received (all streams, including repeats).
    pub registers: u64,
    /// `heartbeat` messages received.
    pub heartbeats: u64,
    /// `execute_request`s sent.
    pub executes_sent: u64,
    /// `execute_response`s received (including duplicates and unknowns).
    pub responses_received: u64,
    /// Responses for a `request_id` that had already been answered.
    pub duplicate_responses: u64,
    /// Responses for a `request_id` this server never sent to that key.
    pub unknown_responses: u64,
    /// Requests sent and not answered yet; 0 at the end of a test means no
    /// request was lost.
    pub outstanding: u64,
    /// `execute_request`s sent again after their key registered on a new
    /// stream while their answer was still missing.
    pub executes_resent: u64,
    /// `metrics_report` messages received.
    pub metrics_reports: u64,
    /// Every protocol violation seen, in order, as a human-readable line.
    pub protocol_errors: Vec<String>,
    /// Times a key was approved while another stream of the same key was
    /// still live and approved (a client that leaks or duplicates streams).
    pub duplicate_active: u64,
}

/// Why a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCause {
    /// The client ended its half of the stream.
    ClientClosed,
    /// The server ended it ([`TestServer::close_stream`], a rejection, a
    /// protocol error).
    Server,
    /// The client stopped reading (its receiving half was dropped).
    PeerGone,
    /// The transport reported an error (connection killed, reset, bad frame).
    Error(String),
}

/// One entry of the engine's event log (see [`TestServer::events`]).
///
/// Heartbeats are only counted (in [`ServerStats`]), not logged, so a long
/// test does not grow the log without bound.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A front-end handed the engine a new stream (no key yet: it comes with
    /// the first message).
    #[non_exhaustive]
    StreamOpened {
        /// When.
        at: Instant,
        /// Engine stream id.
        stream_id: u64,
        /// Carrying connection.
        connection_id: u64,
        /// Transport name.
        transport: &'static str,
    },
    /// A `register` arrived.
    #[non_exhaustive]
    Registered {
        /// When.
        at: Instant,
        /// `tenant.type.instance` as sent (even when invalid).
        key: String,
        /// Engine stream id.
        stream_id: u64,
        /// Carrying connection.
        connection_id: u64,
        /// Whether it carried a session token this server had issued.
        resumed: bool,
    },
    /// The registration was answered `PENDING`.
    #[non_exhaustive]
    Pending {
        /// When.
        at: Instant,
        /// Key.
        key: String,
        /// Engine stream id.
        stream_id: u64,
    },
    /// The registration became `APPROVED` (in the register response or an
    /// approval update).
    #[non_exhaustive]
    Approved {
        /// When.
        at: Instant,
        /// Key.
        key: String,
        /// Engine stream id.
        stream_id: u64,
    },
    /// The registration was `REJECTED`.
    #[non_exhaustive]
    Rejected {
        /// When.
        at: Instant,
        /// Key.
        key: String,
        /// Engine stream id.
        stream_id: u64,
        /// Why.
        reason: RejectReason,
    },
    /// An `execute_request` was sent.
    #[non_exhaustive]
    ExecuteSent {
        /// When.
        at: Instant,
        /// Key.
        key: String,
        /// Stream it went out on.
        stream_id: u64,
        /// Its id.
        request_id: String,
    },
    /// An `execute_response` arrived for an outstanding request.
    #[non_exhaustive]
    ExecuteAnswered {
        /// When.
        at: Instant,
        /// Key.
        key: String,
        /// Stream it came in on (may differ from the one the request used).
        stream_id: u64,
        /// Its id.
        request_id: String,
        /// The response's `success`.
        success: bool,
    },
    /// A `cancel` was sent.
    #[non_exhaustive]
    CancelSent {
        /// When.
        at: Instant,
        /// Key.
        key: String,
        /// The cancelled request.
        request_id: String,
    },
    /// A `drain` was sent.
    #[non_exhaustive]
    DrainSent {
        /// When.
        at: Instant,
        /// Key.
        key: String,
        /// Stream it went out on.
        stream_id: u64,
    },
    /// A protocol violation (also in [`ServerStats::protocol_errors`]).
    #[non_exhaustive]
    ProtocolError {
        /// When.
        at: Instant,
        /// Engine stream id, when the violation belongs to one.
        stream_id: Option<u64>,
        /// What happened.
        message: String,
    },
    /// A stream ended.
    #[non_exhaustive]
    StreamClosed {
        /// When.
        at: Instant,
        /// Key, if it had registered.
        key: Option<String>,
        /// Engine stream id.
        stream_id: u64,
        /// Carrying connection.
        connection_id: u64,
        /// Why it ended.
        cause: CloseCause,
    },
}

impl ServerEvent {
    /// When the event happened (tokio time, so paused-time tests see
    /// virtual instants).
    pub fn at(&self) -> Instant {
        match self {
            Self::StreamOpened { at, .. }
            | Self::Registered { at, .. }
            | Self::Pending { at, .. }
            | Self::Approved { at, .. }
            | Self::Rejected { at, .. }
            | Self::ExecuteSent { at, .. }
            | Self::ExecuteAnswered { at, .. }
            | Self::CancelSent { at, .. }
            | Self::DrainSent { at, .. }
            | Self::ProtocolError { at, .. }
            | Self::StreamClosed { at, .. } => *at,
        }
    }

    /// The registration key the event is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Registered { key, .. }
            | Self::Pending { key, .. }
            | Self::Approved { key, .. }
            | Self::Rejected { key, .. }
            | Self::ExecuteSent { key, .. }
            | Self::ExecuteAnswered { key, .. }
            | Self::CancelSent { key, .. }
            | Self::DrainSent { key, .. } => Some(key),
            Self::StreamClosed { key, .. } => key.as_deref(),
            Self::StreamOpened { .. } | Self::ProtocolError { .. } => None,
        }
    }
}

/// The answer to an execute sent with [`TestServer::send_execute`]: a future
/// that resolves when the response arrives on any stream of the key.
///
/// Dropping it does not forget the request: it stays in
/// [`ServerStats::outstanding`] until the client answers, because what is
/// being tested is the client's exactly-once delivery, not the test's
/// patience.
#[derive(Debug)]
#[must_use = "a PendingExecute does nothing unless awaited"]
pub struct PendingExecute {
    request_id: String,
    rx: oneshot::Receiver<ExecuteResponse>,
}

impl PendingExecute {
    /// The request's id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Awaits the response for at most `timeout`.
    pub async fn wait(self, timeout: Duration) -> Result<ExecuteResponse, TestkitError> {
        let what = format!("the response to execute `{}`", self.request_id);
        match tokio::time::timeout(timeout, self).await {
            Ok(r) => r,
            Err(_) => Err(TestkitError::Timeout { what }),
        }
    }
}

impl Future for PendingExecute {
    type Output = Result<ExecuteResponse, TestkitError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The sender is only dropped when the engine itself is gone or the
        // same request id was sent again (which replaces this waiter).
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.map_err(|_| TestkitError::StreamClosed))
    }
}

/// An in-process control-plane server for tests: the engine plus the handle
/// to drive it. Cheap to clone; all clones share one server.
///
/// Put it behind a front-end ([`TestServer::memory_mux`],
/// [`crate::GrpcTestServer`], [`crate::WsTestServer`]), then steer it
/// (approve, reject, execute, inject faults) and assert on
/// [`TestServer::stats`] and [`TestServer::events`].
#[derive(Clone)]
pub struct TestServer {
    inner: Arc<Inner>,
}

impl fmt::Debug for TestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("TestServer")
            .field("live_streams", &st.streams.len())
            .field("stats", &st.stats)
            .finish_non_exhaustive()
    }
}

impl Default for TestServer {
    fn default() -> Self {
        Self::new()
    }
}

struct Inner {
    state: Mutex<State>,
    /// Bumped on every state change; `wait_until` waits on it.
    changed: watch::Sender<u64>,
    next_connection_id: AtomicU64,
}

enum Cmd {
    // Boxed: a `StreamMessage` is ~270 bytes and most commands are small.
    Send(Box<StreamMessage>),
    Close,
}

struct StreamEntry {
    conn: ConnectionMeta,
    key: Option<String>,
    register: Option<RegisterRequest>,
    status: RegistrationStatus,
    cmd: mpsc::UnboundedSender<Cmd>,
    /// The server asked the stream to close: no longer live for anything.
    closing: bool,
}

impl StreamEntry {
    fn live(&self) -> bool {
        !self.closing
    }

    fn send(&self, msg: StreamMessage) -> bool {
        self.cmd.send(Cmd::Send(Box::new(msg))).is_ok()
    }
}

enum ExecSlot {
    Pending(Option<oneshot::Sender<ExecuteResponse>>),
    Answered,
}

struct State {
    default_policy: ApprovalPolicy,
    policies: HashMap<String, ApprovalPolicy>,
    /// Keys whose `RejectOnce` rejection was spent.
    rejected_once: HashSet<String>,
    heartbeat_interval_ms: u32,
    ack_heartbeats: bool,
    reconnect_on_next_ack: HashSet<String>,
    /// Session token per key: issued once, reused for every later approval.
    tokens: HashMap<String, String>,
    streams: HashMap<u64, StreamEntry>,
    next_stream_id: u64,
    execs: HashMap<String, HashMap<String, ExecSlot>>,
    /// Unanswered requests per key, with the stream each was last sent on,
    /// for resending after the key registers again.
    unanswered: HashMap<String, HashMap<String, (u64, ExecuteRequest)>>,
    resend_on_reconnect: bool,
    /// The test said it provokes client protocol errors
    /// ([`TestServer::expect_protocol_errors`]): they no longer fail calls.
    protocol_errors_expected: bool,
    stats: ServerStats,
    events: Vec<ServerEvent>,
}

impl State {
    /// The stream of `key` a server action targets: the newest live one
    /// (optionally only among approved ones).
    fn current_stream(&self, key: &str, approved_only: bool) -> Option<u64> {
        self.streams
            .iter()
            .filter(|(_, s)| s.live() && s.key.as_deref() == Some(key))
            .filter(|(_, s)| !approved_only || s.status == RegistrationStatus::Approved)
            .map(|(id, _)| *id)
            .max()
    }

    /// Fails when the client broke the protocol and the test did not say it
    /// expects that: every steering call and wait goes through here, so a
    /// client bug fails the test at its next step instead of sitting in a
    /// list nobody reads.
    fn strict(&self) -> Result<(), TestkitError> {
        if self.protocol_errors_expected {
            return Ok(());
        }
        let mut errors = self.stats.protocol_errors.clone();
        if self.stats.duplicate_responses > 0 {
            errors.push(format!(
                "{} duplicate execute_response(s) (a request answered twice)",
                self.stats.duplicate_responses
            ));
        }
        if self.stats.unknown_responses > 0 {
            errors.push(format!(
                "{} execute_response(s) for a request_id never sent to that key",
                self.stats.unknown_responses
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TestkitError::ClientProtocolErrors(errors))
        }
    }

    /// The newest live `PENDING` stream of `key`.
    fn pending_stream(&self, key: &str) -> Result<u64, TestkitError> {
        self.strict()?;
        self.streams
            .iter()
            .filter(|(_, s)| {
                s.live() && s.key.as_deref() == Some(key) && s.status == RegistrationStatus::Pending
            })
            .map(|(id, _)| *id)
            .max()
            .ok_or_else(|| TestkitError::NotPending(key.to_string()))
    }

    /// [`State::current_stream`], after the strictness check, as a `Result`.
    fn target(&self, key: &str, approved_only: bool) -> Result<u64, TestkitError> {
        self.strict()?;
        self.current_stream(key, approved_only)
            .ok_or_else(|| TestkitError::NoSuchRegistration(key.to_string()))
    }

    /// [`State::send`] as a `Result`: the stream's task may be gone.
    fn send_to(&mut self, stream_id: u64, msg: StreamMessage) -> Result<(), TestkitError> {
        if self.send(stream_id, msg) {
            Ok(())
        } else {
            Err(TestkitError::StreamClosed)
        }
    }

    fn protocol_error(&mut self, stream_id: Option<u64>, message: String) {
        tracing::warn!(stream_id, "testkit server: protocol error: {message}");
        let line = match stream_id {
            Some(id) => {
                let key = self
                    .streams
                    .get(&id)
                    .and_then(|s| s.key.clone())
                    .unwrap_or_else(|| "unregistered".to_string());
                format!("stream {id} ({key}): {message}")
            }
            None => message.clone(),
        };
        self.stats.protocol_errors.push(line);
        self.events.push(ServerEvent::ProtocolError {
            at: Instant::now(),
            stream_id,
            message,
        });
    }

    fn token_for(&mut self, key: &str) -> String {
        let n = self.tokens.len() + 1;
        self.tokens
            .entry(key.to_string())
            .or_insert_with(|| format!("testkit-session-{n:06}"))
            .clone()
    }

    /// Marks `stream_id` approved, counting a duplicate when another live
    /// approved stream of the key exists; returns the session token.
    fn mark_approved(&mut self, stream_id: u64, key: &str) -> String {
        let dup = self.streams.iter().any(|(id, s)| {
            *id != stream_id
                && s.live()
                && s.key.as_deref() == Some(key)
                && s.status == RegistrationStatus::Approved
        });
        if dup {
            self.stats.duplicate_active += 1;
        }
        if let Some(s) = self.streams.get_mut(&stream_id) {
            s.status = RegistrationStatus::Approved;
        }
        self.events.push(ServerEvent::Approved {
            at: Instant::now(),
            key: key.to_string(),
            stream_id,
        });
        self.token_for(key)
    }

    /// After `key` was approved on `stream_id`: asks again for every answer
    /// still missing from its earlier streams (the answer may have died with
    /// them). A client replays a kept answer rather than running it twice.
    fn resend_unanswered(&mut self, stream_id: u64, key: &str) {
        if !self.resend_on_reconnect {
            return;
        }
        let Some(reqs) = self.unanswered.get_mut(key) else {
            return;
        };
        let mut resend = Vec::new();
        for (sent_on, req) in reqs.values_mut() {
            if *sent_on != stream_id {
                *sent_on = stream_id;
                resend.push(req.clone());
            }
        }
        for req in resend {
            self.stats.executes_resent += 1;
            self.send(stream_id, msg(Kind::ExecuteRequest(Box::new(req))));
        }
    }

    fn close(&mut self, stream_id: u64) {
        if let Some(s) = self.streams.get_mut(&stream_id) {
            s.closing = true;
            let _ = s.cmd.send(Cmd::Close);
        }
    }

    fn send(&mut self, stream_id: u64, msg: StreamMessage) -> bool {
        self.streams
            .get(&stream_id)
            .is_some_and(|s| s.live() && s.send(msg))
    }

    fn outstanding(&self) -> u64 {
        self.execs
            .values()
            .flat_map(|m| m.values())
            .filter(|s| matches!(s, ExecSlot::Pending(_)))
            .count() as u64
    }
}

fn msg(kind: Kind) -> StreamMessage {
    StreamMessage { kind: Some(kind) }
}

fn validate(r: &RegisterRequest) -> Result<(), String> {
    for (field, value) in [
        ("tenant_id", &r.tenant_id),
        ("connector_type", &r.connector_type),
        ("instance_id", &r.instance_id),
    ] {
        connector_core::validate_identifier(field, value).map_err(|e| e.to_string())?;
    }
    Ok(())
}

impl TestServer {
    /// A server whose default policy is [`ApprovalPolicy::Approve`], with no
    /// heartbeat interval of its own (0) and heartbeat acks on.
    pub fn new() -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    default_policy: ApprovalPolicy::Approve,
                    policies: HashMap::new(),
                    rejected_once: HashSet::new(),
                    heartbeat_interval_ms: 0,
                    ack_heartbeats: true,
                    reconnect_on_next_ack: HashSet::new(),
                    tokens: HashMap::new(),
                    streams: HashMap::new(),
                    next_stream_id: 1,
                    execs: HashMap::new(),
                    unanswered: HashMap::new(),
                    resend_on_reconnect: true,
                    protocol_errors_expected: false,
                    stats: ServerStats::default(),
                    events: Vec::new(),
                }),
                changed,
                next_connection_id: AtomicU64::new(1),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock (in a test assertion callback, say)
        // must not turn every later call into a second, confusing panic.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the state and wakes every `wait_until`.
    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.lock());
        self.inner.changed.send_modify(|v| *v = v.wrapping_add(1));
        r
    }

    /// A fresh connection id, unique across all front-ends of this engine,
    /// so `connection_id`s in [`TestServer::registrations`] never collide.
    pub fn allocate_connection_id(&self) -> u64 {
        self.inner
            .next_connection_id
            .fetch_add(1, Ordering::Relaxed)
    }

    /// The policy for keys without one of their own.
    pub fn set_policy(&self, p: ApprovalPolicy) {
        self.update(|st| {
            st.rejected_once.clear();
            st.default_policy = p;
        });
    }

    /// The policy for `key` (`tenant.type.instance`), overriding the default.
    pub fn set_policy_for(&self, key: &RegistrationKey, p: ApprovalPolicy) {
        let key = key.to_string();
        let key = key.as_str();
        self.update(|st| {
            st.rejected_once.remove(key);
            st.policies.insert(key.to_string(), p);
        });
    }

    /// Whether requests still unanswered when a key's stream died are sent
    /// again once the key is approved on a new stream (default on, as a
    /// control plane that wants every request answered would do). A client
    /// that kept the answer replays it; one that had not got it runs it.
    pub fn set_resend_on_reconnect(&self, on: bool) {
        self.update(|st| st.resend_on_reconnect = on);
    }

    /// The `heartbeat_interval_ms` sent in every register response (0: the
    /// client keeps its own).
    pub fn set_heartbeat_interval_ms(&self, ms: u32) {
        self.update(|st| st.heartbeat_interval_ms = ms);
    }

    /// Approves the newest live `PENDING` stream of `key` with an
    /// `approval_update` carrying the session token. Fails with
    /// [`TestkitError::NotPending`] if there is none.
    pub fn approve(&self, key: &RegistrationKey) -> Result<(), TestkitError> {
        let key = key.to_string();
        let key = key.as_str();
        self.update(|st| {
            let id = st.pending_stream(key)?;
            let token = st.mark_approved(id, key);
            let sent = st.send_to(
                id,
                msg(Kind::ApprovalUpdate(Box::new(ApprovalUpdate {
                    status: RegistrationStatus::Approved as i32,
                    session_token: token,
                    message: "approved by the test".to_string(),
                    reject_reason: RejectReason::Unspecified as i32,
                }))),
            );
            st.resend_unanswered(id, key);
            sent
        })
    }

    /// Rejects the newest live `PENDING` stream of `key` with an
    /// `approval_update`, then ends that stream. Fails with
    /// [`TestkitError::NotPending`] if there is none.
    pub fn reject(
        &self,
        key: &RegistrationKey,
        reason: RejectReason,
        message: &str,
    ) -> Result<(), TestkitError> {
        let key = key.to_string();
        let key = key.as_str();
        self.update(|st| {
            let id = st.pending_stream(key)?;
            if let Some(s) = st.streams.get_mut(&id) {
                s.status = RegistrationStatus::Rejected;
            }
            st.events.push(ServerEvent::Rejected {
                at: Instant::now(),
                key: key.to_string(),
                stream_id: id,
                reason,
            });
            let sent = st.send_to(
                id,
                msg(Kind::ApprovalUpdate(Box::new(ApprovalUpdate {
                    status: RegistrationStatus::Rejected as i32,
                    session_token: String::new(),
                    message: message.to_string(),
                    reject_reason: reason as i32,
                }))),
            );
            st.close(id);
            sent
        })
    }

    /// Live streams that have registered, sorted by key (then stream id).
    pub fn registrations(&self) -> Vec<RegistrationInfo> {
        let st = self.lock();
        let mut v: Vec<RegistrationInfo> = st
            .streams
            .iter()
            .filter(|(_, s)| s.live())
            .filter_map(|(id, s)| {
                Some(RegistrationInfo {
                    key: s.key.clone()?,
                    stream_id: *id,
                    connection_id: s.conn.connection_id,
                    peer: s.conn.peer,
                    transport: s.conn.transport,
                    status: s.status,
                    register: s.register.clone()?,
                })
            })
            .collect();
        v.sort_by(|a, b| (&a.key, a.stream_id).cmp(&(&b.key, b.stream_id)));
        v
    }

    /// Keys with a live `APPROVED` stream, sorted, each once.
    pub fn active_keys(&self) -> Vec<RegistrationKey> {
        let st = self.lock();
        let mut keys: Vec<RegistrationKey> = st
            .streams
            .values()
            .filter(|s| s.live() && s.status == RegistrationStatus::Approved)
            // The engine approves only keys that parse (it answers a
            // register with invalid identifiers `INVALID_REQUEST`).
            .filter_map(|s| s.key.as_deref()?.parse().ok())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Waits until at least `n` distinct keys are live and approved.
    pub async fn wait_for_active(&self, n: usize, timeout: Duration) -> Result<(), TestkitError> {
        self.wait_until(timeout, |s| s.active_keys().len() >= n)
            .await
            .map_err(|e| match e {
                TestkitError::Timeout { .. } => TestkitError::Timeout {
                    what: format!(
                        "{n} active registrations; active now: {:?}",
                        self.active_keys()
                    ),
                },
                other => other,
            })
    }

    /// Waits until `cond` holds. `cond` is checked now and again after every
    /// change of the engine's state (message handled, stream opened or
    /// closed, test action), never on a timer.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&TestServer) -> bool,
    ) -> Result<(), TestkitError> {
        let deadline = Instant::now() + timeout;
        let mut rx = self.inner.changed.subscribe();
        loop {
            // Mark the current version seen *before* checking, so a change
            // that lands between the check and the wait still wakes us.
            rx.borrow_and_update();
            self.lock().strict()?;
            if cond(self) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self`, so it cannot be dropped here;
                // treat it like a timeout rather than spin.
                Ok(Err(_)) | Err(_) => {
                    self.lock().strict()?;
                    return if cond(self) {
                        Ok(())
                    } else {
                        Err(TestkitError::Timeout {
                            what: format!("a condition on the test server (after {timeout:?})"),
                        })
                    };
                }
            }
        }
    }

    /// Sends `req` on the key's newest live approved stream and waits for
    /// its response, which may arrive on any stream of the key (a client
    /// may deliver it over its next stream after a reconnect). Unbounded:
    /// wrap it in a timeout, or use [`PendingExecute::wait`].
    pub async fn execute(
        &self,
        key: &RegistrationKey,
        req: ExecuteRequest,
    ) -> Result<ExecuteResponse, TestkitError> {
        self.send_execute(key, req)?.await
    }

    /// Sends `req` like [`TestServer::execute`] and returns at once with a
    /// handle to await the response. Fails with `NoSuchRegistration` when
    /// the key has no live approved stream, and with `Protocol` when
    /// `req.request_id` is already outstanding for the key.
    pub fn send_execute(
        &self,
        key: &RegistrationKey,
        req: ExecuteRequest,
    ) -> Result<PendingExecute, TestkitError> {
        let key = key.to_string();
        let key = key.as_str();
        self.update(|st| {
            let id = st.target(key, true)?;
            let request_id = req.request_id.clone();
            let slots = st.execs.entry(key.to_string()).or_default();
            if matches!(slots.get(&request_id), Some(ExecSlot::Pending(_))) {
                return Err(TestkitError::Protocol(format!(
                    "request_id `{request_id}` is already outstanding for `{key}`; use a fresh id"
                )));
            }
            let (tx, rx) = oneshot::channel();
            slots.insert(request_id.clone(), ExecSlot::Pending(Some(tx)));
            st.unanswered
                .entry(key.to_string())
                .or_default()
                .insert(request_id.clone(), (id, req.clone()));
            if !st.send(id, msg(Kind::ExecuteRequest(Box::new(req)))) {
                // The stream's task is gone; it is being torn down.
                if let Some(slots) = st.execs.get_mut(key) {
                    slots.remove(&request_id);
                }
                if let Some(reqs) = st.unanswered.get_mut(key) {
                    reqs.remove(&request_id);
                }
                return Err(TestkitError::NoSuchRegistration(key.to_string()));
            }
            st.stats.executes_sent += 1;
            st.stats.outstanding = st.outstanding();
            st.events.push(ServerEvent::ExecuteSent {
                at: Instant::now(),
                key: key.to_string(),
                stream_id: id,
                request_id: request_id.clone(),
            });
            Ok(PendingExecute { request_id, rx })
        })
    }

    /// Sends `cancel` for `request_id` on the key's newest live approved
    /// stream.
    pub fn cancel(&self, key: &RegistrationKey, request_id: &str) -> Result<(), TestkitError> {
        let key = key.to_string();
        let key = key.as_str();
        self.update(|st| {
            let id = st.target(key, true)?;
            st.send_to(
                id,
                msg(Kind::Cancel(Box::new(CancelRequest {
                    request_id: request_id.to_string(),
                }))),
            )?;
            st.events.push(ServerEvent::CancelSent {
                at: Instant::now(),
                key: key.to_string(),
                request_id: request_id.to_string(),
            });
            Ok(())
        })
    }

    /// Fault injection: sends any message (a second register response, an
    /// unknown execute id, …) on the key's newest live stream, whatever its
    /// status. Not tracked as an execute.
    pub fn send_raw(&self, key: &RegistrationKey, msg: StreamMessage) -> Result<(), TestkitError> {
        let key = key.to_string();
        let key = key.as_str();
        self.update(|st| {
            let id = st.target(key, false)?;
            st.send_to(id, msg)
        })
    }

    /// Ends the key's newest live stream cleanly (after the messages queued
    /// before it).
    pub fn close_stream(&self, key: &RegistrationKey) -> Result<(), TestkitError> {
        let key = key.to_string();
        let key = key.as_str();
        self.update(|st| {
            let id = st.target(key, false)?;
            st.close(id);
            Ok(())
        })
    }

    /// Ends every live stream; returns how many.
    pub fn close_all_streams(&self) -> usize {
        self.update(|st| {
            let ids: Vec<u64> = st
                .streams
                .iter()
                .filter(|(_, s)| s.live())
                .map(|(id, _)| *id)
                .collect();
            for id in &ids {
                st.close(*id);
            }
            ids.len()
        })
    }

    /// Turns heartbeat acks on (default) or off for all keys, to trip the
    /// client's watchdog. Heartbeats are still counted while off.
    pub fn set_ack_heartbeats(&self, on: bool) {
        self.update(|st| st.ack_heartbeats = on);
    }

    /// Sends `drain` on the key's newest live stream.
    pub fn drain(
        &self,
        key: &RegistrationKey,
        reason: &str,
        reconnect_after_ms: u32,
    ) -> Result<(), TestkitError> {
        let key = key.to_string();
        let key = key.as_str();
        self.update(|st| {
            let id = st.target(key, false)?;
            st.send_to(
                id,
                msg(Kind::Drain(Box::new(Drain {
                    reason: reason.to_string(),
                    reconnect_after_ms,
                }))),
            )?;
            st.events.push(ServerEvent::DrainSent {
                at: Instant::now(),
                key: key.to_string(),
                stream_id: id,
            });
            Ok(())
        })
    }

    /// Makes the next `heartbeat_ack` for `key` carry
    /// `should_reconnect = true`. Fails (and arms nothing) if the key has no
    /// live stream.
    pub fn ack_should_reconnect(&self, key: &RegistrationKey) -> Result<(), TestkitError> {
        let key = key.to_string();
        let key = key.as_str();
        self.update(|st| {
            st.target(key, false)?;
            st.reconnect_on_next_ack.insert(key.to_string());
            Ok(())
        })
    }

    /// Says this test provokes client protocol errors on purpose (it plays
    /// a broken client, or sends frames a client must reject and report):
    /// from now on they are only recorded, in [`ServerStats::protocol_errors`]
    /// and the event log, instead of failing the next call.
    ///
    /// Without it, the engine is strict: once a client has broken the
    /// protocol (a message out of order, a duplicate or unknown answer, an
    /// undecodable frame), every steering call and wait returns
    /// [`TestkitError::ClientProtocolErrors`], and so does
    /// [`TestServer::verify`].
    pub fn expect_protocol_errors(&self) {
        self.update(|st| st.protocol_errors_expected = true);
    }

    /// Fails with [`TestkitError::ClientProtocolErrors`] if a client broke
    /// the protocol and the test did not expect it. Call it at the end of a
    /// test: an error after the last steering call is seen here.
    pub fn verify(&self) -> Result<(), TestkitError> {
        self.lock().strict()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ServerStats {
        let st = self.lock();
        let mut s = st.stats.clone();
        s.outstanding = st.outstanding();
        s
    }

    /// The event log so far, oldest first.
    pub fn events(&self) -> Vec<ServerEvent> {
        self.lock().events.clone()
    }

    /// The event log so far, oldest first, leaving it empty: for a server
    /// that runs for hours (the `testkit-server` binary), whose log would
    /// otherwise grow with every execute. Counters are kept.
    pub fn take_events(&self) -> Vec<ServerEvent> {
        std::mem::take(&mut self.lock().events)
    }

    /// Forgets the ids of executes already answered (kept so that a second
    /// answer counts as [`ServerStats::duplicate_responses`]; after this it
    /// counts as [`ServerStats::unknown_responses`], still a failure).
    /// Outstanding requests are kept. For long runs, like
    /// [`TestServer::take_events`].
    pub fn forget_answered(&self) {
        self.update(|st| {
            for slots in st.execs.values_mut() {
                slots.retain(|_, slot| matches!(slot, ExecSlot::Pending(_)));
            }
            st.execs.retain(|_, slots| !slots.is_empty());
        });
    }

    /// An in-memory [`connector_core::StreamMux`] over this engine (a new
    /// mux with its own fault knobs on each call).
    pub fn memory_mux(&self) -> MemoryMux {
        MemoryMux::new(self.clone())
    }

    /// Records a protocol violation a front-end detected below the message
    /// level (a text WebSocket frame, an undecodable frame).
    pub(crate) fn record_protocol_error(&self, message: String) {
        self.update(|st| st.protocol_error(None, message));
    }

    /// The connection id of the key's newest live stream (front-ends use it
    /// to reach the socket under a registration).
    pub(crate) fn connection_of(&self, key: &str) -> Option<u64> {
        let st = self.lock();
        let id = st.current_stream(key, false)?;
        st.streams.get(&id).map(|s| s.conn.connection_id)
    }

    /// Serves one stream until it ends: the client half-closes, the
    /// transport reports an error, or the server closes it. Front-ends call
    /// this for every accepted stream.
    ///
    /// The engine reads `inbound` and writes replies into `outbound`;
    /// dropping `outbound` is how the engine ends the stream. Inbound is
    /// never left unread while an outbound message waits for capacity, so a
    /// client that writes before it reads cannot deadlock the pair.
    pub async fn serve_stream<S>(
        &self,
        conn: ConnectionMeta,
        mut inbound: S,
        outbound: mpsc::Sender<StreamMessage>,
    ) where
        S: Stream<Item = Result<StreamMessage, String>> + Send + Unpin,
    {
        let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel();
        let connection_id = conn.connection_id;
        let stream_id = self.update(|st| {
            let id = st.next_stream_id;
            st.next_stream_id += 1;
            st.stats.streams_opened += 1;
            st.events.push(ServerEvent::StreamOpened {
                at: Instant::now(),
                stream_id: id,
                connection_id,
                transport: conn.transport,
            });
            st.streams.insert(
                id,
                StreamEntry {
                    conn,
                    key: None,
                    register: None,
                    status: RegistrationStatus::Unspecified,
                    cmd: cmd_tx,
                    closing: false,
                },
            );
            id
        });
        tracing::debug!(stream_id, connection_id, "testkit server: stream opened");

        // One message waiting for outbound capacity at most; while it waits,
        // no further command is taken but inbound keeps being read.
        let mut pending: Option<StreamMessage> = None;
        let cause = loop {
            tokio::select! {
                permit = outbound.reserve(), if pending.is_some() => match permit {
                    Ok(permit) => {
                        if let Some(m) = pending.take() {
                            permit.send(m);
                        }
                    }
                    Err(_) => {
                        while let Some(Some(Ok(m))) = inbound.next().now_or_never() {
                            self.on_message(stream_id, m);
                        }
                        break CloseCause::PeerGone;
                    }
                },
                cmd = cmd_rx.recv(), if pending.is_none() => match cmd {
                    Some(Cmd::Send(m)) => pending = Some(*m),
                    Some(Cmd::Close) | None => break CloseCause::Server,
                },
                _ = outbound.closed(), if pending.is_none() => {
                    // The front-end's writer is gone; what the client sent
                    // before it closed may still be buffered: take it.
                    while let Some(Some(Ok(m))) = inbound.next().now_or_never() {
                        self.on_message(stream_id, m);
                    }
                    break CloseCause::PeerGone;
                }
                item = inbound.next() => match item {
                    Some(Ok(m)) => self.on_message(stream_id, m),
                    Some(Err(e)) => break CloseCause::Error(e),
                    None => break CloseCause::ClientClosed,
                },
            }
        };

        if cause == CloseCause::ClientClosed {
            // Best effort: hand over what was already queued (a client that
            // half-closed may still read), without waiting for capacity.
            let queued =
                pending
                    .into_iter()
                    .chain(std::iter::from_fn(|| match cmd_rx.try_recv() {
                        Ok(Cmd::Send(m)) => Some(*m),
                        _ => None,
                    }));
            for m in queued {
                if outbound.try_send(m).is_err() {
                    break;
                }
            }
        }
        drop(outbound);

        self.update(|st| {
            let entry = st.streams.remove(&stream_id);
            let key = entry.and_then(|e| e.key);
            tracing::debug!(stream_id, ?key, ?cause, "testkit server: stream closed");
            st.events.push(ServerEvent::StreamClosed {
                at: Instant::now(),
                key,
                stream_id,
                connection_id,
                cause,
            });
        });
    }

    fn on_message(&self, stream_id: u64, m: StreamMessage) {
        self.update(|st| {
            let Some(entry) = st.streams.get(&stream_id) else {
                return;
            };
            let registered = entry.register.is_some();
            let key = entry.key.clone();
            match (m.kind, registered, key) {
                (Some(Kind::Register(r)), false, _) => Self::on_register(st, stream_id, *r),
                (Some(Kind::Register(r)), true, _) => {
                    st.stats.registers += 1;
                    if let Some(s) = st.streams.get_mut(&stream_id) {
                        s.register = Some(*r);
                    }
                    st.protocol_error(
                        Some(stream_id),
                        "second register on one stream (ignored, not answered)".to_string(),
                    );
                }
                (kind, false, _) => {
                    st.protocol_error(
                        Some(stream_id),
                        format!(
                            "first message was {}, not register; closing the stream",
                            kind.as_ref()
                                .map_or("empty message (no kind set)", Kind::name)
                        ),
                    );
                    st.close(stream_id);
                }
                (Some(Kind::Heartbeat(hb)), true, key) => {
                    st.stats.heartbeats += 1;
                    if st.ack_heartbeats {
                        let should_reconnect = key
                            .as_deref()
                            .is_some_and(|k| st.reconnect_on_next_ack.remove(k));
                        st.send(
                            stream_id,
                            msg(Kind::HeartbeatAck(Box::new(HeartbeatAck {
                                sequence: hb.sequence,
                                sent_at_unix_ms: hb.sent_at_unix_ms,
                                should_reconnect,
                            }))),
                        );
                    }
                }
                (Some(Kind::ExecuteResponse(resp)), true, Some(key)) => {
                    Self::on_response(st, stream_id, &key, *resp)
                }
                (Some(Kind::MetricsReport(_)), true, _) => st.stats.metrics_reports += 1,
                (kind, true, _) => st.protocol_error(
                    Some(stream_id),
                    format!(
                        "unexpected {} from the client",
                        kind.as_ref()
                            .map_or("empty message (no kind set)", Kind::name)
                    ),
                ),
            }
        });
    }

    fn on_register(st: &mut State, stream_id: u64, r: RegisterRequest) {
        st.stats.registers += 1;
        let key = format!("{}.{}.{}", r.tenant_id, r.connector_type, r.instance_id);
        let resumed = !r.session_token.is_empty()
            && st.tokens.get(&key).is_some_and(|t| *t == r.session_token);
        let connection_id = match st.streams.get_mut(&stream_id) {
            Some(s) => {
                s.key = Some(key.clone());
                s.register = Some(r.clone());
                s.conn.connection_id
            }
            None => return,
        };
        st.events.push(ServerEvent::Registered {
            at: Instant::now(),
            key: key.clone(),
            stream_id,
            connection_id,
            resumed,
        });

        let decision = match validate(&r) {
            Err(why) => Err((RejectReason::InvalidRequest, why)),
            Ok(()) => {
                let policy = st.policies.get(&key).unwrap_or(&st.default_policy).clone();
                match policy {
                    ApprovalPolicy::Approve => Ok(RegistrationStatus::Approved),
                    ApprovalPolicy::Pending if resumed => Ok(RegistrationStatus::Approved),
                    ApprovalPolicy::Pending => Ok(RegistrationStatus::Pending),
                    ApprovalPolicy::Reject(reason) => {
                        Err((reason, "rejected by the test's policy".to_string()))
                    }
                    ApprovalPolicy::RejectOnce(reason) => {
                        if st.rejected_once.insert(key.clone()) {
                            Err((reason, "rejected once by the test's policy".to_string()))
                        } else {
                            Ok(RegistrationStatus::Approved)
                        }
                    }
                }
            }
        };

        let mut resp = RegisterResponse {
            status: RegistrationStatus::Unspecified as i32,
            session_token: String::new(),
            address: key.clone(),
            message: String::new(),
            reject_reason: RejectReason::Unspecified as i32,
            heartbeat_interval_ms: st.heartbeat_interval_ms,
        };
        let close = match decision {
            Ok(RegistrationStatus::Approved) => {
                resp.status = RegistrationStatus::Approved as i32;
                resp.session_token = st.mark_approved(stream_id, &key);
                resp.message = "approved".to_string();
                false
            }
            Ok(_) => {
                if let Some(s) = st.streams.get_mut(&stream_id) {
                    s.status = RegistrationStatus::Pending;
                }
                st.events.push(ServerEvent::Pending {
                    at: Instant::now(),
                    key: key.clone(),
                    stream_id,
                });
                resp.status = RegistrationStatus::Pending as i32;
                resp.message = "waiting for approval".to_string();
                false
            }
            Err((reason, why)) => {
                if let Some(s) = st.streams.get_mut(&stream_id) {
                    s.status = RegistrationStatus::Rejected;
                }
                st.events.push(ServerEvent::Rejected {
                    at: Instant::now(),
                    key: key.clone(),
                    stream_id,
                    reason,
                });
                resp.status = RegistrationStatus::Rejected as i32;
                resp.reject_reason = reason as i32;
                resp.message = why;
                true
            }
        };
        let approved = resp.status == RegistrationStatus::Approved as i32;
        st.send(stream_id, msg(Kind::RegisterResponse(Box::new(resp))));
        if approved {
            st.resend_unanswered(stream_id, &key);
        }
        if close {
            st.close(stream_id);
        }
    }

    fn on_response(st: &mut State, stream_id: u64, key: &str, resp: ExecuteResponse) {
        st.stats.responses_received += 1;
        let request_id = resp.request_id.clone();
        let success = resp.success;
        if let Some(reqs) = st.unanswered.get_mut(key) {
            reqs.remove(&request_id);
        }
        let slot = st.execs.get_mut(key).and_then(|m| m.get_mut(&request_id));
        match slot {
            Some(slot @ ExecSlot::Pending(_)) => {
                if let ExecSlot::Pending(Some(tx)) = std::mem::replace(slot, ExecSlot::Answered) {
                    // The waiter may have been dropped; the answer still counts.
                    let _ = tx.send(resp);
                }
                st.events.push(ServerEvent::ExecuteAnswered {
                    at: Instant::now(),
                    key: key.to_string(),
                    stream_id,
                    request_id,
                    success,
                });
            }
            Some(ExecSlot::Answered) => {
                st.stats.duplicate_responses += 1;
                tracing::warn!(
                    key,
                    request_id,
                    "testkit server: duplicate execute_response"
                );
            }
            None => {
                st.stats.unknown_responses += 1;
                tracing::warn!(
                    key,
                    request_id,
                    "testkit server: execute_response for an unknown id"
                );
            }
        }
        st.stats.outstanding = st.outstanding();
    }
}
