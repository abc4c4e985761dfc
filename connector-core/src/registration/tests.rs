//! State-machine tests on synthetic instants: no runtime, no sockets, no
//! sleeping. Each test drives [`Registration`] as a transcript.

use std::time::Duration;

use async_trait::async_trait;
use connector_proto::{
    stream_message::Kind, ApprovalUpdate, CancelRequest, Capability, Drain, ExecuteErrorKind,
    ExecuteRequest, ExecuteResponse, Heartbeat, HeartbeatAck, PayloadEncoding, RegisterRequest,
    RegisterResponse, RegistrationStatus, RejectReason, StreamMessage,
};
use tokio::time::Instant;

use crate::{
    Action, BaseConnector, ConnectorConfig, ConnectorRegistration, DisconnectCause, ExecuteContext,
    ExecuteError, ExecuteOutput, MultiTransportOptions, MultiTransportOptionsBuilder, Registration,
    RegistrationEvent, RegistrationState, StopReason,
};

struct Echo;

#[async_trait]
impl BaseConnector for Echo {
    fn capabilities(&self) -> Vec<Capability> {
        ["echo", "sleep"]
            .into_iter()
            .map(|id| Capability {
                id: id.into(),
                ..Default::default()
            })
            .collect()
    }
    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        Ok(ExecuteOutput::json_bytes(ctx.payload))
    }
}

const HB: Duration = Duration::from_secs(30);
const WD: Duration = Duration::from_secs(45);
/// The message every [`rejected`] answer carries.
const REJECTION: &str = "rejected by the test";

fn options() -> MultiTransportOptions {
    MultiTransportOptions::builder("grpc://127.0.0.1:1")
        .jitter_seed(Some(7))
        .max_concurrent_requests(2)
        .metrics_report_interval(None)
        .build()
        .expect("valid options")
}

fn config(instance: &str) -> ConnectorConfig {
    ConnectorConfig::builder("t", "echo", instance)
        .auth_token("secret-auth")
        .build()
        .expect("valid config")
}

// What the scripted server sends.

/// A `register_response` with `status` and nothing else.
fn answer(status: RegistrationStatus) -> Kind {
    Kind::RegisterResponse(Box::new(RegisterResponse {
        status: status as i32,
        ..Default::default()
    }))
}

fn approved() -> Kind {
    answer(RegistrationStatus::Approved)
}

fn pending() -> Kind {
    answer(RegistrationStatus::Pending)
}

/// A rejection with reason code `code` (maybe one the SDK does not know)
/// and the message [`REJECTION`].
fn rejected_code(code: i32) -> Kind {
    Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Rejected as i32,
        reject_reason: code,
        message: REJECTION.into(),
        ..Default::default()
    }))
}

fn rejected(reason: RejectReason) -> Kind {
    rejected_code(reason as i32)
}

/// An `approval_update` with the session token `tok`.
fn approval_update(status: RegistrationStatus, reject_reason: RejectReason) -> Kind {
    Kind::ApprovalUpdate(Box::new(ApprovalUpdate {
        status: status as i32,
        session_token: "tok".into(),
        message: REJECTION.into(),
        reject_reason: reject_reason as i32,
    }))
}

/// The `approval_update` that approves a pending registration.
fn approved_later() -> Kind {
    approval_update(RegistrationStatus::Approved, RejectReason::Unspecified)
}

fn drain(reason: &str, reconnect_after_ms: u32) -> Kind {
    Kind::Drain(Box::new(Drain {
        reason: reason.into(),
        reconnect_after_ms,
    }))
}

fn ack(sequence: u64) -> Kind {
    Kind::HeartbeatAck(Box::new(HeartbeatAck {
        sequence,
        ..Default::default()
    }))
}

/// A heartbeat ack asking the connector to reconnect.
fn reconnect_hint() -> Kind {
    Kind::HeartbeatAck(Box::new(HeartbeatAck {
        should_reconnect: true,
        ..Default::default()
    }))
}

fn cancel(id: &str) -> Kind {
    Kind::Cancel(Box::new(CancelRequest {
        request_id: id.into(),
    }))
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// A scripted harness: the test plays the driver and the server.
struct H {
    sm: Registration,
    now: Instant,
    sent: Vec<StreamMessage>,
    actions: Vec<Action>,
    events: Vec<RegistrationEvent>,
}

impl H {
    fn new() -> Self {
        Self::with(options())
    }

    fn with(options: MultiTransportOptions) -> Self {
        Self::build(config("i1"), &options)
    }

    /// [`H::new`], approved ([`H::approve`]).
    fn active() -> Self {
        let mut h = Self::new();
        h.approve();
        h
    }

    /// [`H::new`], opened and answered `PENDING`.
    fn pending() -> Self {
        let mut h = Self::new();
        h.open();
        h.recv(pending());
        assert_eq!(h.sm.state(), &RegistrationState::PendingApproval);
        h
    }

    /// [`H::tuned`], approved ([`H::approve`]).
    fn active_tuned(
        tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
    ) -> Self {
        let mut h = Self::tuned(tune);
        h.approve();
        h
    }

    /// [`options`] changed by `tune`.
    fn tuned(
        tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
    ) -> Self {
        Self::with(tune(options().to_builder()).build().expect("valid options"))
    }

    fn build(config: ConnectorConfig, options: &MultiTransportOptions) -> Self {
        let reg = ConnectorRegistration::new(config, Echo);
        let now = Instant::now();
        Self {
            sm: Registration::new(&reg, options, now, 1_000_000),
            now,
            sent: Vec::new(),
            actions: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Collects actions, sent messages and events, as a driver does.
    fn pump(&mut self) {
        self.collect(true);
    }

    /// Collects actions and events, and the sent messages only when
    /// `read` (the server reads its stream).
    fn collect(&mut self, read: bool) {
        while let Some(a) = self.sm.poll_action() {
            self.actions.push(a);
        }
        if read {
            while let Some(m) = self.sm.poll_transmit() {
                self.sent.push(m);
            }
        }
        while let Some(e) = self.sm.poll_event() {
            self.events.push(e);
        }
    }

    /// Moves the clock forward, firing every timer on the way at its own
    /// deadline (as a driver would).
    fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        while let Some(at) = self.sm.poll_timeout() {
            if at > target {
                break;
            }
            self.now = at;
            self.sm.handle_timeout(at);
            self.pump();
        }
        self.now = target;
        self.pump();
    }

    fn recv(&mut self, kind: Kind) {
        self.deliver(kind, true);
    }

    /// The server sends `kind`; then [`H::collect`].
    fn deliver(&mut self, kind: Kind, read: bool) {
        self.sm
            .handle_message(self.now, StreamMessage { kind: Some(kind) });
        self.collect(read);
    }

    fn take_actions(&mut self) -> Vec<Action> {
        self.pump();
        std::mem::take(&mut self.actions)
    }

    fn take_sent(&mut self) -> Vec<StreamMessage> {
        self.pump();
        std::mem::take(&mut self.sent)
    }

    /// What `pick` takes from the messages sent since the last look (the
    /// rest dropped).
    fn sent_of<T>(&mut self, pick: impl Fn(Kind) -> Option<T>) -> Vec<T> {
        self.take_sent()
            .into_iter()
            .filter_map(|m| m.kind.and_then(&pick))
            .collect()
    }

    fn responses(&mut self) -> Vec<ExecuteResponse> {
        self.sent_of(|k| match k {
            Kind::ExecuteResponse(r) => Some(*r),
            _ => None,
        })
    }

    /// The one response sent since the last look (other messages dropped).
    fn response(&mut self) -> ExecuteResponse {
        let mut r = self.responses();
        assert_eq!(r.len(), 1, "exactly one response: {r:?}");
        r.remove(0)
    }

    /// The one response sent since the last look: the `kind` error answer
    /// for `id`.
    fn error_answer(&mut self, id: &str, kind: ExecuteErrorKind) -> ExecuteResponse {
        let r = self.response();
        assert_eq!(
            (r.request_id.as_str(), r.error_kind),
            (id, kind as i32),
            "{r:?}"
        );
        assert!(!r.success, "{r:?}");
        r
    }

    fn beats(&mut self) -> Vec<Heartbeat> {
        self.sent_of(|k| match k {
            Kind::Heartbeat(hb) => Some(*hb),
            _ => None,
        })
    }

    /// The registers opened since the last look (other actions dropped).
    fn registers(&mut self) -> Vec<RegisterRequest> {
        self.take_actions()
            .iter()
            .filter_map(|a| register_of(a).cloned())
            .collect()
    }

    /// Whether the actions since the last look close the stream gracefully
    /// (other actions dropped).
    fn closes(&mut self) -> bool {
        self.take_actions()
            .iter()
            .any(|a| matches!(a, Action::CloseStream))
    }

    /// Whether the stream was ever lost for `cause`.
    fn disconnected(&self, cause: &DisconnectCause) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, RegistrationEvent::Disconnected { cause: c } if c == cause))
    }

    /// `handle_start`, and the actions it asks for.
    fn start(&mut self) -> Vec<Action> {
        self.sm.handle_start(self.now);
        self.take_actions()
    }

    /// Start and open the stream, `register` not answered yet.
    fn open(&mut self) {
        self.start();
        self.sm.handle_stream_opened(self.now);
        self.pump();
    }

    /// The driver opened the stream; the server answers `answer`.
    fn reopen(&mut self, answer: Kind) {
        self.sm.handle_stream_opened(self.now);
        self.recv(answer);
    }

    /// Start, open, and approve with the session token `sess-1`; forgets
    /// what that asked for and sent.
    fn approve(&mut self) {
        self.open();
        self.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
            status: RegistrationStatus::Approved as i32,
            session_token: "sess-1".into(),
            ..Default::default()
        })));
        assert_eq!(self.sm.state(), &RegistrationState::Active);
        self.take_actions();
        self.take_sent();
    }

    /// After a lost stream: the backoff passes, one register goes out and
    /// is approved.
    fn reconnect(&mut self) {
        self.advance(Duration::from_secs(2));
        assert_eq!(self.registers().len(), 1);
        self.reopen(approved());
        assert_eq!(self.sm.state(), &RegistrationState::Active);
    }

    fn execute(&mut self, id: &str, capability: &str, payload: &[u8], timeout_ms: u32) {
        self.recv(Kind::ExecuteRequest(Box::new(ExecuteRequest {
            request_id: id.into(),
            payload: payload.to_vec().into(),
            encoding: PayloadEncoding::Json as i32,
            capability_id: capability.into(),
            timeout_ms,
            ..Default::default()
        })));
    }

    /// An `echo` request with payload `{}` and no deadline.
    fn echo(&mut self, id: &str) {
        self.execute(id, "echo", b"{}", 0);
    }

    fn done(&mut self, id: &str, result: Result<ExecuteOutput, ExecuteError>) {
        self.sm.handle_execute_done(self.now, id, result);
    }

    /// The handler of `id` returns `{}`.
    fn done_ok(&mut self, id: &str) {
        self.done(id, Ok(ExecuteOutput::json_bytes(&b"{}"[..])));
    }

    fn sm_metrics(&self) -> crate::ConnectorMetrics {
        self.sm.metrics_snapshot()
    }

    fn delay(&self) -> Duration {
        match self.sm.state() {
            RegistrationState::Backoff { delay } => *delay,
            other => panic!("not backing off: {other:?}"),
        }
    }
}

fn register_of(action: &Action) -> Option<&RegisterRequest> {
    match action {
        Action::OpenStream(StreamMessage {
            kind: Some(Kind::Register(r)),
        }) => Some(r),
        _ => None,
    }
}

fn executes(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Execute(r) => Some(r.request_id.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn start_opens_a_stream_with_register_first() {
    let mut h = H::new();
    let actions = h.start();
    let reg = register_of(&actions[0]).expect("first action opens a stream with register");
    assert_eq!(
        (
            reg.tenant_id.as_str(),
            reg.connector_type.as_str(),
            reg.instance_id.as_str()
        ),
        ("t", "echo", "i1")
    );
    assert_eq!(reg.auth_token, "secret-auth");
    assert_eq!(reg.session_token, "");
    assert_eq!(reg.max_concurrent_requests, 2);
    assert_eq!(reg.capabilities.len(), 2);
    assert_eq!(h.sm.state(), &RegistrationState::Connecting);
}

#[test]
fn watchdog_fires_at_the_timeout_and_not_before() {
    let mut h = H::active();
    h.advance(WD - Duration::from_millis(1));
    assert_eq!(h.sm.state(), &RegistrationState::Active);
    h.advance(Duration::from_millis(1));
    assert!(matches!(h.sm.state(), RegistrationState::Backoff { .. }));
    assert!(h.disconnected(&DisconnectCause::Watchdog));
    assert!(h.actions.iter().any(|a| matches!(a, Action::DropStream)));
}

#[test]
fn any_server_message_feeds_the_watchdog() {
    let mut h = H::active();
    h.advance(Duration::from_secs(40));
    h.echo("r1");
    h.advance(Duration::from_secs(40));
    assert_eq!(h.sm.state(), &RegistrationState::Active);
    h.advance(Duration::from_secs(5));
    assert!(matches!(h.sm.state(), RegistrationState::Backoff { .. }));
}

#[test]
fn twenty_intervals_with_acks_never_disconnect() {
    let mut h = H::active();
    // The first beat is at this registration's phase within the interval.
    let first = h.sm.next_heartbeat_at().expect("heartbeat armed");
    assert!(first > h.now && first <= h.now + HB);
    for round in 0..20u64 {
        // Land exactly on each heartbeat: the previous round spent 20 ms.
        h.advance(if round == 0 {
            first - h.now
        } else {
            HB - Duration::from_millis(20)
        });
        let beats = h.beats();
        assert_eq!(beats.len(), 1, "round {round}");
        let hb = beats[0];
        assert_eq!(hb.sequence, round + 1);
        h.advance(Duration::from_millis(20));
        h.recv(Kind::HeartbeatAck(Box::new(HeartbeatAck {
            sequence: hb.sequence,
            sent_at_unix_ms: hb.sent_at_unix_ms,
            should_reconnect: false,
        })));
    }
    assert_eq!(h.sm.state(), &RegistrationState::Active);
    assert!(!h
        .events
        .iter()
        .any(|e| matches!(e, RegistrationEvent::Disconnected { .. })));
    let m = h.sm_metrics();
    assert_eq!(m.last_heartbeat_rtt, Some(Duration::from_millis(20)));
    assert_eq!(m.total_disconnects, 0);
}

#[test]
fn heartbeats_start_when_the_stream_opens_even_while_pending() {
    let mut h = H::pending();
    h.advance(HB);
    assert_eq!(h.beats().len(), 1);
}

#[test]
fn pending_then_approved_then_execute() {
    let mut h = H::pending();
    // Pending may last longer than the connect timeout: no register timeout.
    h.advance(Duration::from_secs(20));
    assert_eq!(h.sm.state(), &RegistrationState::PendingApproval);
    h.recv(approved_later());
    assert_eq!(h.sm.state(), &RegistrationState::Active);
    assert!(h.sm.has_session_token());
}

#[test]
fn pending_then_rejected_stops_for_good() {
    let mut h = H::pending();
    h.take_actions();
    h.recv(approval_update(
        RegistrationStatus::Rejected,
        RejectReason::Denied,
    ));
    assert!(matches!(
        h.sm.state(),
        RegistrationState::Stopped(StopReason::Rejected {
            reason: RejectReason::Denied,
            ..
        })
    ));
    // Its one last action closes the stream; then nothing is left to do.
    assert_eq!(format!("{:?}", h.take_actions()), "[CloseStream]");
    assert!(h.sm.is_finished());
    assert!(h.sm.poll_timeout().is_none(), "no timer left armed");
}

#[test]
fn final_reject_reasons_stop_the_registration() {
    for reason in [
        RejectReason::Denied,
        RejectReason::InvalidCredentials,
        RejectReason::InvalidRequest,
    ] {
        let mut h = H::new();
        h.open();
        h.recv(rejected(reason));
        match h.sm.state() {
            RegistrationState::Stopped(StopReason::Rejected { reason: r, message }) => {
                assert_eq!(*r, reason);
                assert_eq!(message, REJECTION);
            }
            other => panic!("{reason:?}: {other:?}"),
        }
        assert!(h.closes());
        // No reconnect is ever scheduled.
        h.advance(Duration::from_secs(3600));
        assert!(h.registers().is_empty());
    }
}

#[test]
fn session_expired_drops_token_and_registers_again_at_once() {
    let mut h = H::active();
    // Lose the stream, come back with the token.
    h.sm.handle_stream_closed(h.now, None);
    h.advance(Duration::from_secs(2));
    let reg = h.registers();
    assert_eq!(reg.len(), 1, "reconnect after backoff");
    assert_eq!(reg[0].session_token, "sess-1", "session token reused");
    h.reopen(rejected(RejectReason::SessionExpired));
    let actions = h.take_actions();
    assert!(matches!(actions[0], Action::CloseStream));
    let reg: Vec<_> = actions.iter().filter_map(register_of).collect();
    assert_eq!(reg.len(), 1, "registers again at once, without backoff");
    assert_eq!(reg[0].session_token, "", "expired token dropped");
    assert_eq!(reg[0].auth_token, "secret-auth");
}

#[test]
fn duplicate_backs_off_and_retries() {
    let mut h = H::new();
    h.open();
    h.recv(rejected(RejectReason::Duplicate));
    assert!(matches!(h.sm.state(), RegistrationState::Backoff { .. }));
    h.advance(Duration::from_secs(2));
    assert_eq!(h.registers().len(), 1);
}

#[test]
fn backoff_grows_and_is_capped_across_failures() {
    let mut h = H::tuned(|o| o.max_backoff(Duration::from_secs(4)));
    h.sm.handle_start(h.now);
    let mut delays = Vec::new();
    for _ in 0..8 {
        h.take_actions();
        h.sm.handle_open_failed(h.now, "refused");
        delays.push(h.delay());
        h.advance(h.delay());
        assert_eq!(h.sm.state(), &RegistrationState::Connecting);
    }
    assert!(delays[0] >= Duration::from_millis(500) && delays[0] <= Duration::from_secs(1));
    assert!(delays[2] >= Duration::from_secs(2));
    assert!(delays.iter().all(|d| *d <= Duration::from_secs(4)));
    assert_eq!(*delays.last().expect("one"), Duration::from_secs(4));
}

#[test]
fn backoff_resets_only_after_a_healthy_while() {
    let mut h = H::new();
    h.sm.handle_start(h.now);
    for _ in 0..4 {
        h.take_actions();
        h.sm.handle_open_failed(h.now, "refused");
        h.advance(Duration::from_secs(10));
    }
    // A short-lived approval does not reset it.
    h.reopen(approved());
    h.advance(Duration::from_secs(1));
    h.sm.handle_stream_closed(h.now, Some("reset"));
    assert!(h.delay() >= Duration::from_secs(8), "{:?}", h.delay());
    // A long healthy stream does.
    h.advance(Duration::from_secs(20));
    h.reopen(approved());
    h.advance(Duration::from_secs(11));
    h.sm.handle_stream_closed(h.now, Some("reset"));
    assert!(h.delay() <= Duration::from_secs(1), "{:?}", h.delay());
}

#[test]
fn register_timeout_reconnects() {
    let mut h = H::new();
    h.open();
    h.advance(Duration::from_secs(10));
    assert!(matches!(h.sm.state(), RegistrationState::Backoff { .. }));
    assert!(h.disconnected(&DisconnectCause::RegisterTimeout));
}

#[test]
fn execute_success_bad_payload_and_unknown_capability() {
    let mut h = H::active();
    h.execute("ok", "echo", br#"{"a":1}"#, 0);
    h.execute("bad", "echo", b"{not json", 0);
    h.execute("unknown", "nope", b"{}", 0);
    assert_eq!(executes(&h.take_actions()), vec!["ok"]);
    let responses = h.responses();
    assert_eq!(responses.len(), 2);
    assert_eq!(responses[0].request_id, "bad");
    assert_eq!(responses[0].error_kind, ExecuteErrorKind::BadPayload as i32);
    assert_eq!(responses[1].request_id, "unknown");
    assert_eq!(
        responses[1].error_kind,
        ExecuteErrorKind::UnknownCapability as i32
    );
    h.done("ok", Ok(ExecuteOutput::json_bytes(&br#"{"a":1}"#[..])));
    let r = h.response();
    assert!(r.success);
    assert_eq!(r.payload, &br#"{"a":1}"#[..]);
    let m = h.sm_metrics();
    assert_eq!(
        (m.requests_received, m.requests_succeeded, m.requests_failed),
        (3, 1, 2)
    );
}

#[test]
fn handler_error_is_reported_with_its_kind() {
    let mut h = H::active();
    h.echo("f");
    h.take_actions();
    h.done("f", Err(ExecuteError::handler("boom")));
    let r = h.error_answer("f", ExecuteErrorKind::Handler);
    assert_eq!(r.error, "boom");
}

#[test]
fn concurrency_bound_queues_excess_and_never_drops_it() {
    let mut h = H::new(); // max 2 concurrent
    h.approve();
    let ids = ids("r", 5);
    for id in &ids {
        h.echo(id);
    }
    assert_eq!(executes(&h.take_actions()), vec!["r0", "r1"]);
    assert_eq!(h.sm.in_flight(), 5);
    assert_eq!(h.sm.running(), 2);
    // Each answer frees a slot the next queued request takes, until the
    // queue is empty.
    let mut running = Vec::new();
    for id in &ids {
        h.done_ok(id);
        running.push(h.sm.running());
    }
    assert_eq!(running, vec![2, 2, 2, 1, 0]);
    let started = executes(&h.take_actions());
    assert_eq!(
        started,
        vec!["r2", "r3", "r4"],
        "queued work starts in order"
    );
    let answered: Vec<_> = h.responses().into_iter().map(|r| r.request_id).collect();
    assert_eq!(answered, ids);
    assert_eq!(h.sm.in_flight(), 0);
}

#[test]
fn queue_limit_answers_overloaded() {
    let mut h = H::active_tuned(|o| o.max_concurrent_requests(1).max_queued_requests(1));
    for id in ["a", "b", "c"] {
        h.echo(id);
    }
    h.error_answer("c", ExecuteErrorKind::Overloaded);
}

#[test]
fn exactly_one_response_under_timeout() {
    let mut h = H::active();
    h.execute("slow", "sleep", b"{}", 100);
    assert_eq!(executes(&h.take_actions()), vec!["slow"]);
    h.advance(Duration::from_millis(99));
    assert!(h.responses().is_empty());
    h.advance(Duration::from_millis(1));
    h.error_answer("slow", ExecuteErrorKind::Timeout);
    assert!(h
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::Abort(id) if id == "slow")));
    // The handler finishing late changes nothing.
    h.done_ok("slow");
    assert!(h.responses().is_empty());
}

#[test]
fn exactly_one_response_under_cancel_and_unknown_cancel_is_ignored() {
    let mut h = H::active();
    h.execute("c1", "sleep", b"{}", 0);
    h.recv(cancel("c1"));
    h.recv(cancel("never-sent"));
    h.done("c1", Err(ExecuteError::handler("late")));
    h.error_answer("c1", ExecuteErrorKind::Cancelled);
    assert_eq!(h.sm_metrics().protocol_errors, 0);
}

#[test]
fn duplicate_request_id_in_flight_is_counted_not_answered_twice() {
    let mut h = H::active();
    h.echo("d");
    h.echo("d");
    assert_eq!(executes(&h.take_actions()), vec!["d"]);
    assert_eq!(h.sm_metrics().protocol_errors, 1);
    h.done_ok("d");
    let r = h.response();
    assert!(r.success && r.request_id == "d", "{r:?}");
}

#[test]
fn response_finished_while_down_is_redelivered_after_reregistering() {
    let mut h = H::active();
    h.echo("x");
    h.take_actions();
    h.sm.handle_stream_closed(h.now, Some("connection reset"));
    h.done_ok("x");
    assert!(h.responses().is_empty(), "no stream: nothing sent");
    assert_eq!(h.sm.undelivered(), 1);
    h.advance(Duration::from_secs(2));
    h.sm.handle_stream_opened(h.now);
    assert!(
        h.responses().is_empty(),
        "not before the registration is approved"
    );
    h.recv(approved());
    let r = h.response();
    assert_eq!(r.request_id, "x");
    let m = h.sm_metrics();
    assert_eq!((m.responses_redelivered, m.successful_reconnects), (1, 1));
}

#[test]
fn redelivery_respects_its_ttl() {
    let mut h = H::active_tuned(|o| {
        o.redelivery_ttl(Duration::from_secs(1))
            .reconnect_delay(Duration::from_secs(5))
            .max_backoff(Duration::from_secs(5))
            .jitter(Duration::ZERO)
    });
    h.echo("x");
    h.sm.handle_stream_closed(h.now, None);
    h.done_ok("x");
    h.advance(Duration::from_secs(5));
    h.reopen(approved());
    assert!(h.responses().is_empty());
    assert_eq!(h.sm_metrics().responses_expired, 1);
}

#[test]
fn drain_finishes_in_flight_then_reconnects_after_the_delay() {
    let mut h = H::active();
    h.echo("a");
    h.take_actions();
    h.recv(drain("deploy", 3000));
    assert_eq!(h.sm.state(), &RegistrationState::Draining);
    // New work is refused while draining, with a response.
    h.echo("late");
    h.error_answer("late", ExecuteErrorKind::Overloaded);
    assert!(!h.closes());
    h.done_ok("a");
    // The response is queued before the close, so a graceful close sends it.
    assert_eq!(
        h.sm.poll_transmit()
            .map(|m| matches!(m.kind, Some(Kind::ExecuteResponse(_)))),
        Some(true)
    );
    assert!(h.closes());
    let delay = h.delay();
    assert!(
        delay >= Duration::from_secs(3) && delay <= Duration::from_millis(3500),
        "{delay:?}"
    );
    h.advance(Duration::from_millis(3500));
    assert_eq!(h.registers().len(), 1);
}

#[test]
fn should_reconnect_drains_like_drain() {
    let mut h = H::active();
    // A stream that stayed healthy (past backoff_reset_after).
    h.advance(Duration::from_secs(11));
    h.recv(reconnect_hint());
    // Nothing in flight: closes at once and backs off by jitter only.
    assert!(h.closes());
    assert!(h.delay() <= Duration::from_millis(500), "{:?}", h.delay());
}

#[test]
fn drain_timeout_cancels_what_is_left() {
    let mut h = H::active_tuned(|o| o.drain_timeout(Duration::from_secs(5)));
    h.execute("stuck", "sleep", b"{}", 0);
    h.take_actions();
    h.sm.handle_shutdown(h.now);
    assert_eq!(h.sm.state(), &RegistrationState::Draining);
    h.advance(Duration::from_secs(5));
    h.error_answer("stuck", ExecuteErrorKind::Cancelled);
    assert_eq!(
        h.sm.state(),
        &RegistrationState::Stopped(StopReason::Shutdown)
    );
}

#[test]
fn shutdown_during_backoff_stops_at_once() {
    let mut h = H::new();
    h.sm.handle_start(h.now);
    h.sm.handle_open_failed(h.now, "refused");
    h.sm.handle_shutdown(h.now);
    assert_eq!(
        h.sm.state(),
        &RegistrationState::Stopped(StopReason::Shutdown)
    );
    assert!(h.sm.poll_timeout().is_none(), "no timer left armed");
}

#[test]
fn no_reconnect_stops_when_the_stream_ends() {
    let mut h = H::active_tuned(|o| o.reconnect(false));
    h.sm.handle_stream_closed(h.now, None);
    assert!(matches!(
        h.sm.state(),
        RegistrationState::Stopped(StopReason::StreamEnded { .. })
    ));
}

#[test]
fn unexpected_messages_are_counted_and_ignored() {
    let mut h = H::new();
    h.open();
    h.echo("early");
    let r = h.responses();
    assert!(
        r.is_empty(),
        "not deliverable before approval; kept instead"
    );
    h.recv(approved_later());
    h.sm.handle_message(h.now, StreamMessage { kind: None });
    h.recv(Kind::Heartbeat(Box::default()));
    assert_eq!(h.sm.state(), &RegistrationState::Registering);
    h.recv(approved());
    h.recv(approved());
    assert_eq!(h.sm.state(), &RegistrationState::Active);
    // early execute, approval while registering, no kind, heartbeat from
    // server, second register_response.
    assert_eq!(h.sm_metrics().protocol_errors, 5);
    // The early request got its one (OVERLOADED) answer once approved.
    h.error_answer("early", ExecuteErrorKind::Overloaded);
}

/// Opens and approves with the server's wish for a heartbeat interval.
fn approved_with_interval(h: &mut H, heartbeat_interval_ms: u32) {
    h.open();
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        heartbeat_interval_ms,
        ..Default::default()
    })));
}

#[test]
fn server_heartbeat_interval_is_honoured() {
    let mut h = H::new();
    approved_with_interval(&mut h, 5_000);
    h.take_sent();
    h.advance(Duration::from_secs(5));
    assert_eq!(h.beats().len(), 1);
}

#[test]
fn debug_output_never_shows_tokens() {
    let h = H::active();
    let dump = format!("{:?}", h.sm);
    assert!(!dump.contains("secret-auth"), "{dump}");
    assert!(!dump.contains("sess-1"), "{dump}");
}

#[test]
fn a_server_that_does_not_read_cannot_grow_the_outbox_without_bound() {
    let mut h = H::active_tuned(|o| {
        o.max_concurrent_requests(1).limits(
            crate::Limits::default()
                .queued_requests(2)
                .answered_entries(4)
                .outbox_messages(71),
        )
    });
    // The driver never pulls: the stream's queue is full. Requests keep
    // coming and are answered at once (bad payload), piling up.
    for i in 0..200 {
        h.recv_unread(Kind::ExecuteRequest(Box::new(ExecuteRequest {
            request_id: format!("r{i}"),
            payload: b"{".to_vec().into(),
            encoding: PayloadEncoding::Json as i32,
            ..Default::default()
        })));
        assert!(h.sm.undelivered() <= 4);
    }
    assert!(h.disconnected(&DisconnectCause::OutboundStalled));
    assert!(
        h.sm_metrics().responses_expired > 0,
        "what was dropped is counted"
    );
}

#[test]
fn a_request_asked_again_after_a_reconnect_replays_the_unconfirmed_answer() {
    let mut h = H::active();
    h.echo("x");
    h.take_actions();
    h.done("x", Ok(ExecuteOutput::json_bytes(&b"{\"v\":1}"[..])));
    assert_eq!(h.responses().len(), 1, "sent once");
    // The connection dies before the server acknowledged a later heartbeat.
    h.sm.handle_stream_closed(h.now, Some("reset"));
    h.reconnect();
    assert!(h.responses().is_empty(), "not resent on its own");
    h.echo("x");
    assert!(
        executes(&h.take_actions()).is_empty(),
        "the handler does not run twice"
    );
    let r = h.response();
    assert_eq!(r.payload, &b"{\"v\":1}"[..]);
    // Asked a third time on the same stream: the answer is on its way.
    h.echo("x");
    assert!(h.responses().is_empty());
    assert!(executes(&h.take_actions()).is_empty());
}

#[test]
fn an_acknowledged_heartbeat_confirms_earlier_answers() {
    let mut h = H::active();
    h.echo("x");
    h.take_actions();
    h.done_ok("x");
    h.take_sent();
    h.advance(HB);
    let beats = h.beats();
    assert_eq!(beats.len(), 1);
    h.recv(ack(beats[0].sequence));
    h.sm.handle_stream_closed(h.now, Some("reset"));
    h.reconnect();
    // The server read the answer, so the id is free: a new request.
    h.echo("x");
    assert_eq!(executes(&h.take_actions()), vec!["x"]);
}

/// `n` echo requests, all running, answered with `output`; returns, in
/// order, whether each message sent after the first answer is a heartbeat.
fn answer_many(n: usize, output: impl Fn() -> ExecuteOutput) -> Vec<bool> {
    let mut h = H::active_tuned(|o| o.max_concurrent_requests(1000));
    let ids = ids("r", n);
    for id in &ids {
        h.echo(id);
    }
    assert_eq!(executes(&h.take_actions()), ids);
    for id in &ids {
        h.done(id, Ok(output()));
    }
    h.take_sent()
        .iter()
        .map(|m| matches!(m.kind, Some(Kind::Heartbeat(_))))
        .collect()
}

#[test]
fn many_answers_without_a_heartbeat_ask_for_an_early_ack() {
    let kinds = answer_many(70, || ExecuteOutput::json_bytes(&b"{}"[..]));
    // An early heartbeat after every 32 answers.
    let beats: Vec<usize> = (0..kinds.len()).filter(|&i| kinds[i]).collect();
    assert_eq!(beats, vec![32, 65], "{kinds:?}");
    assert_eq!(kinds.len(), 72);
}

#[test]
fn large_answers_ask_for_an_early_ack_by_bytes() {
    // 20 answers of 4 KiB: a heartbeat after every 8 (32 KiB), not 32.
    let big = format!("\"{}\"", "x".repeat(4094));
    let kinds = answer_many(20, || ExecuteOutput::json_bytes(big.clone().into_bytes()));
    let beats: Vec<usize> = (0..kinds.len()).filter(|&i| kinds[i]).collect();
    assert_eq!(beats, vec![8, 17], "{kinds:?}");
    assert_eq!(kinds.len(), 22);
}

// ----------------------------------------------------------------------
// A server that is buggy or hostile (issue 11): one test per behaviour.
// ----------------------------------------------------------------------

impl H {
    /// Collects actions and events but, as a driver whose stream is not
    /// read, leaves the outbox alone.
    fn pump_unread(&mut self) {
        self.collect(false);
    }

    /// [`H::recv`] on a stream the server does not read.
    fn recv_unread(&mut self, kind: Kind) {
        self.deliver(kind, false);
    }

    /// Plays a server that answers every `OpenStream` by opening it and
    /// sending `answer`, for `total` of synthetic time; returns how many
    /// registers went out.
    fn serve_for(&mut self, total: Duration, answer: impl Fn() -> Kind) -> usize {
        let end = self.now + total;
        let mut registers = 0;
        loop {
            let opens = self.registers().len();
            if opens > 0 {
                registers += opens;
                self.reopen(answer());
                continue;
            }
            match self.sm.poll_timeout() {
                Some(at) if at <= end => self.advance(at - self.now),
                _ => break,
            }
        }
        registers
    }
}

#[test]
fn hostile_heartbeat_interval_of_1ms_is_clamped_to_one_second() {
    let mut h = H::new();
    approved_with_interval(&mut h, 1);
    let mut beats = 0;
    for _ in 0..3000 {
        h.advance(Duration::from_millis(1));
        for hb in h.beats() {
            beats += 1;
            h.recv(ack(hb.sequence));
        }
    }
    // 3 s at the 1 s floor: at most one beat per second (plus the phase).
    assert!((2..=3).contains(&beats), "{beats} heartbeats in 3 s");
    assert_eq!(h.sm.state(), &RegistrationState::Active);
    // And the other end of the range: a 49-day wish is 5 minutes.
    let mut h = H::new();
    approved_with_interval(&mut h, u32::MAX);
    let next = h.sm.next_heartbeat_at().expect("armed");
    assert!(next <= h.now + super::MAX_SERVER_HEARTBEAT_INTERVAL);
}

#[test]
fn hostile_rejections_forever_escalate_the_backoff() {
    // The server rejects every register, and hands out a session token
    // with each rejection to bait an immediate retry.
    for reason in [RejectReason::SessionExpired, RejectReason::Duplicate] {
        let mut h = H::new();
        h.sm.handle_start(h.now);
        let registers = h.serve_for(Duration::from_secs(60), || {
            Kind::RegisterResponse(Box::new(RegisterResponse {
                status: RegistrationStatus::Rejected as i32,
                reject_reason: reason as i32,
                session_token: "bait".into(),
                ..Default::default()
            }))
        });
        // 0.5 + 1 + 2 + 4 + 8 + 16 + 32 s: about 8 attempts in a minute.
        assert!(
            (5..=10).contains(&registers),
            "{reason:?}: {registers} registers in 60 s"
        );
        assert!(
            !h.sm.has_session_token(),
            "{reason:?}: a token sent with a rejection is not kept"
        );
        assert!(
            h.delay() >= Duration::from_secs(16),
            "{reason:?}: {:?}",
            h.delay()
        );
    }
}

#[test]
fn session_expired_gets_one_immediate_retry_then_backs_off() {
    let mut h = H::active();
    h.sm.handle_stream_closed(h.now, None);
    h.advance(Duration::from_secs(2));
    assert_eq!(h.registers().len(), 1);
    h.reopen(rejected(RejectReason::SessionExpired));
    let reg = h.registers();
    assert_eq!(reg.len(), 1, "immediate retry");
    assert_eq!(reg[0].session_token, "");
    h.reopen(rejected(RejectReason::SessionExpired));
    assert!(h.registers().is_empty());
    assert!(h.delay() >= Duration::from_millis(500));
}

#[test]
fn hostile_unknown_and_unspecified_reject_reasons_retry_with_backoff() {
    for code in [99, 0] {
        let mut h = H::new();
        h.open();
        h.recv(rejected_code(code));
        let first = h.delay();
        assert!(
            first >= Duration::from_millis(500),
            "code {code}: {first:?}"
        );
        // Retried, and a second one escalates.
        h.advance(first);
        assert_eq!(h.registers().len(), 1, "code {code}");
        h.reopen(rejected_code(code));
        assert!(h.delay() >= Duration::from_secs(1), "code {code}");
    }
}

#[test]
fn hostile_drain_delay_is_clamped_to_max_backoff() {
    // Healthy stream and fresh stream alike.
    for healthy in [true, false] {
        let mut h = H::tuned(|o| o.max_backoff(Duration::from_secs(2)));
        h.approve();
        if healthy {
            h.advance(Duration::from_secs(11));
        }
        h.recv(drain("bye", u32::MAX));
        assert!(h.delay() <= Duration::from_secs(2), "{:?}", h.delay());
        h.advance(Duration::from_secs(2));
        assert_eq!(h.registers().len(), 1);
    }
}

#[test]
fn drains_on_streams_that_never_stay_healthy_escalate_the_backoff() {
    // Approve, drain at once with reconnect_after_ms = 0, again and again.
    let mut h = H::new();
    h.sm.handle_start(h.now);
    let mut delays = Vec::new();
    for _ in 0..6 {
        assert_eq!(h.serve_for(Duration::ZERO, approved), 1);
        h.recv(drain("", 0));
        delays.push(h.delay());
        h.advance(h.delay());
    }
    assert!(delays[5] >= Duration::from_secs(16), "{delays:?}");
    // should_reconnect on an unhealthy stream too.
    assert_eq!(h.serve_for(Duration::ZERO, approved), 1);
    h.recv(reconnect_hint());
    assert!(h.delay() >= Duration::from_secs(32), "{:?}", h.delay());
}

#[test]
fn hostile_reject_text_is_sanitized_before_events_and_stop_reasons() {
    let mut h = H::new();
    h.open();
    let evil = format!(
        "denied\n2026-01-01T00:00:00Z  INFO forged line\x1b[2J\x1b]0;owned\x07{}",
        "x".repeat(10_000)
    );
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Rejected as i32,
        reject_reason: RejectReason::Denied as i32,
        message: evil,
        ..Default::default()
    })));
    let RegistrationState::Stopped(StopReason::Rejected { message, .. }) = h.sm.state() else {
        panic!("{:?}", h.sm.state());
    };
    for text in [message.clone(), h.sm.state().to_string()] {
        assert!(!text.contains('\n') && !text.contains('\x1b') && !text.contains('\x07'));
        assert!(text.chars().count() < 400, "capped: {}", text.len());
    }
    let in_event = h
        .events
        .iter()
        .find_map(|e| match e {
            RegistrationEvent::Rejected { message, .. } => Some(message.clone()),
            _ => None,
        })
        .expect("rejected event");
    assert_eq!(&in_event, message);
    // A drain reason too.
    let mut h = H::active();
    h.recv(drain("bye\nFORGED", 0));
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, RegistrationEvent::Draining { reason } if reason == "bye\\nFORGED")));
}

#[test]
fn hostile_request_timeout_is_clamped() {
    let mut h = H::active();
    h.execute("r", "echo", b"{}", u32::MAX);
    let at = h.sm.inflight.next_deadline().expect("deadline");
    assert_eq!(at, h.now + super::MAX_REQUEST_TIMEOUT);
}

#[test]
fn hostile_long_request_id_is_answered_and_never_stored() {
    let mut h = H::active();
    let id = "i".repeat(16 * 1024);
    h.echo(&id);
    assert!(
        executes(&h.take_actions()).is_empty(),
        "the handler does not run"
    );
    let r = h.response();
    assert_eq!(r.request_id, id, "the answer carries the id to be matched");
    assert_eq!(r.error_kind, ExecuteErrorKind::BadPayload as i32);
    assert!(r.error.len() < 200);
    assert_eq!(h.sm.in_flight(), 0);
    assert_eq!(h.sm.held_bytes(), (0, 0, 0), "nothing kept");
}

#[test]
fn hostile_never_acking_server_with_long_ids_cannot_grow_memory() {
    // Never acks heartbeats; 24 000 requests, unknown capability. With
    // 16 KiB ids they are refused unstored; with ids just under the limit
    // the answered log (unconfirmed part included) stays in its budget.
    let budget = 2 << 20;
    for id_len in [16 * 1024, 1000] {
        let mut h = H::tuned(|o| {
            o.limits(
                crate::Limits::default()
                    .answered_bytes(budget)
                    .answered_entries(100_000),
            )
        });
        h.approve();
        let mut answered = 0;
        let mut peak = 0;
        for i in 0..24_000 {
            let id = format!("{i:08}{}", "x".repeat(id_len - 8));
            h.execute(&id, "no-such-capability", b"{}", 0);
            answered += h.responses().len();
            let (outbox, queued, log) = h.sm.held_bytes();
            assert_eq!((outbox, queued), (0, 0));
            peak = peak.max(log);
            assert!(log <= budget, "{log} > {budget}");
            if i % 3000 == 0 {
                h.advance(Duration::from_secs(10));
                h.take_sent();
            }
        }
        assert_eq!(answered, 24_000, "every request answered once");
        let m = h.sm_metrics();
        if id_len > 1024 {
            assert_eq!(peak, 0);
            assert_eq!(m.replay_forgotten, 0);
        } else {
            assert!(peak > budget / 2, "the log was used: {peak}");
            assert!(m.replay_forgotten > 20_000, "{}", m.replay_forgotten);
        }
    }
}

#[test]
fn hostile_megabyte_capability_id_gets_a_small_answer_without_debug_escapes() {
    let mut h = H::active();
    let cap: String = "\u{1}".repeat(1 << 20);
    h.execute("r1", &cap, b"{}", 0);
    let r = h.error_answer("r1", ExecuteErrorKind::UnknownCapability);
    assert!(r.error.len() < 2048, "{} bytes", r.error.len());
    assert!(
        r.error.contains("\\u{1}"),
        "sanitized, not Debug: {}",
        &r.error[..80]
    );
    assert!(!r.error.contains('\u{1}'));
}

#[test]
fn an_answer_over_max_message_size_is_replaced_by_one_that_fits() {
    let mut h = H::active_tuned(|o| o.max_message_size(64 * 1024));
    h.echo("big");
    h.echo("loud");
    h.take_actions();
    h.done("big", Ok(ExecuteOutput::raw(vec![7u8; 100 * 1024])));
    h.done("loud", Err(ExecuteError::handler("e".repeat(200 * 1024))));
    let r = h.responses();
    assert_eq!(r.len(), 2);
    for a in &r {
        assert!(super::answers::wire_size(a) <= 64 * 1024);
        assert!(!a.success);
        assert!(a.payload.is_empty());
        assert_eq!(a.error_kind, ExecuteErrorKind::Handler as i32);
        assert!(a.error.starts_with("answer of "), "{}", &a.error[..60]);
    }
    assert_eq!(r[0].request_id, "big");
    assert_eq!(r[1].request_id, "loud");
    assert_eq!(h.sm_metrics().answers_oversized, 2);
}

#[test]
fn a_request_read_while_the_stream_closes_is_answered_on_the_next_stream() {
    let mut h = H::active();
    h.recv(drain("", 0));
    assert!(h.closes());
    // The driver lingers on the old stream and reads one more request.
    h.sm.handle_closing_request(
        h.now,
        &ExecuteRequest {
            request_id: "late".into(),
            ..Default::default()
        },
    );
    assert!(h.responses().is_empty(), "no stream to carry it now");
    assert_eq!(h.sm.undelivered(), 1);
    h.reconnect();
    h.error_answer("late", ExecuteErrorKind::Overloaded);
}

#[test]
fn a_cancel_flood_on_queued_requests_answers_each_once() {
    let mut h = H::active_tuned(|o| o.max_concurrent_requests(1));
    h.echo("busy");
    assert_eq!(executes(&h.take_actions()), vec!["busy"]);
    let queued = ids("q", 5000);
    for id in &queued {
        h.echo(id);
    }
    for id in &queued {
        h.recv(cancel(id));
    }
    let r = h.responses();
    assert_eq!(r.len(), 5000);
    assert!(r
        .iter()
        .all(|a| a.error_kind == ExecuteErrorKind::Cancelled as i32));
    assert_eq!(h.sm.in_flight(), 1);
    assert!(h.sm.inflight.queue_len() <= 67);
    // The running one finishes; nothing cancelled starts.
    h.done_ok("busy");
    assert!(executes(&h.take_actions()).is_empty());
}

#[test]
fn queued_request_bytes_are_budgeted() {
    let mut h = H::active_tuned(|o| {
        o.max_concurrent_requests(1)
            .limits(crate::Limits::default().queued_bytes(64 * 1024))
    });
    let payload = format!("\"{}\"", "p".repeat(10 * 1024));
    for id in ids("r", 20) {
        h.execute(&id, "echo", payload.as_bytes(), 0);
        assert!(h.sm.held_bytes().1 <= 64 * 1024);
    }
    let overloaded = h
        .responses()
        .iter()
        .filter(|a| a.error_kind == ExecuteErrorKind::Overloaded as i32)
        .count();
    // 1 running + 6 queued of ~10 KiB fit in 64 KiB.
    assert_eq!(overloaded, 20 - 1 - 6);
}

#[test]
fn the_outbox_byte_budget_drops_a_stream_that_is_not_read() {
    let mut h = H::active_tuned(|o| o.limits(crate::Limits::default().outbox_bytes(256 * 1024)));
    for id in ids("r", 100) {
        // The driver never pulls from the outbox.
        h.recv_unread(Kind::ExecuteRequest(Box::new(ExecuteRequest {
            request_id: id.clone(),
            ..Default::default()
        })));
        h.done(&id, Ok(ExecuteOutput::raw(vec![0u8; 16 * 1024])));
        h.pump_unread();
        assert!(h.sm.held_bytes().0 <= 256 * 1024 + 17 * 1024);
    }
    assert!(h.disconnected(&DisconnectCause::OutboundStalled));
}

#[test]
fn heartbeat_phase_is_seeded_per_registration_and_deterministic() {
    let first_beat = |instance: &str| {
        let mut h = H::build(config(instance), &options());
        h.open();
        h.sm.next_heartbeat_at().expect("armed") - h.now
    };
    assert_eq!(first_beat("a"), first_beat("a"));
    let phases: std::collections::BTreeSet<_> =
        ids("i", 20).iter().map(|i| first_beat(i)).collect();
    assert_eq!(phases.len(), 20);
    assert!(phases.iter().all(|d| *d <= HB));
}

#[test]
fn hostile_ack_for_a_heartbeat_never_sent_confirms_nothing() {
    let mut h = H::active();
    h.echo("x");
    h.take_actions();
    h.done_ok("x");
    h.take_sent();
    let errors = h.sm_metrics().protocol_errors;
    h.recv(ack(u64::MAX));
    assert_eq!(h.sm_metrics().protocol_errors, errors + 1);
    // The answer is still kept for replay: the server never read a
    // heartbeat after it.
    h.sm.handle_stream_closed(h.now, Some("reset"));
    h.reconnect();
    h.echo("x");
    assert!(
        executes(&h.take_actions()).is_empty(),
        "replayed, not run again"
    );
    assert_eq!(h.responses().len(), 1);
}

#[test]
fn transport_error_text_is_sanitized() {
    let mut h = H::active();
    h.sm.handle_stream_closed(
        h.now,
        Some("status: Unavailable, message: \"x\nFORGED\x1b[2J\""),
    );
    h.pump();
    let cause = h
        .events
        .iter()
        .find_map(|e| match e {
            RegistrationEvent::Disconnected { cause } => Some(cause.to_string()),
            _ => None,
        })
        .expect("disconnected");
    assert!(!cause.contains('\n') && !cause.contains('\x1b'), "{cause}");
}

// ----------------------------------------------------------------------
// Token sources: the machine asks (`FetchToken`), the test answers.
// ----------------------------------------------------------------------

impl H {
    /// A registration whose auth token comes from a token source; started,
    /// with the first `FetchToken` asked for and taken.
    fn fetching_token() -> Self {
        let config = ConnectorConfig::builder("t", "echo", "i1")
            .token_source(std::sync::Arc::new(crate::FixedToken::new("unused")))
            .build()
            .expect("valid config");
        let mut h = Self::build(config, &options());
        let actions = h.start();
        assert!(asks_for_token(&actions), "{actions:?}");
        assert!(actions.iter().all(|a| register_of(a).is_none()));
        h
    }

    /// Answers the pending `FetchToken` with `token`; returns the register sent.
    fn give_token(&mut self, token: &str) -> RegisterRequest {
        self.sm
            .handle_token(self.now, Ok(crate::Secret::new(token)));
        let mut reg = self.registers();
        assert_eq!(reg.len(), 1, "a token opens the stream");
        reg.remove(0)
    }
}

fn asks_for_token(actions: &[Action]) -> bool {
    actions.iter().any(|a| matches!(a, Action::FetchToken))
}

#[test]
fn a_token_source_is_asked_before_every_register() {
    let mut h = H::fetching_token();
    assert_eq!(h.sm.state(), &RegistrationState::Connecting);
    assert_eq!(h.give_token("tok-1").auth_token, "tok-1");
    h.reopen(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        session_token: "sess-1".into(),
        ..Default::default()
    })));
    // Lost stream: the reconnect asks again and carries the new token
    // beside the session token.
    h.sm.handle_stream_closed(h.now, None);
    h.advance(Duration::from_secs(2));
    assert!(asks_for_token(&h.take_actions()));
    let reg = h.give_token("tok-2");
    assert_eq!(
        (reg.auth_token.as_str(), reg.session_token.as_str()),
        ("tok-2", "sess-1")
    );
    // SESSION_EXPIRED: asked again at once, no session token.
    h.reopen(rejected(RejectReason::SessionExpired));
    assert!(asks_for_token(&h.take_actions()));
    let reg = h.give_token("tok-3");
    assert_eq!(
        (reg.auth_token.as_str(), reg.session_token.as_str()),
        ("tok-3", "")
    );
}

#[test]
fn a_token_source_error_backs_off_with_a_clear_cause() {
    let mut h = H::fetching_token();
    h.sm.handle_token(h.now, Err("token file /x: cannot read: not found"));
    h.pump();
    assert!(
        matches!(h.sm.state(), RegistrationState::Backoff { .. }),
        "{:?}",
        h.sm.state()
    );
    let token_failure = |h: &H, why: &str| {
        h.events.iter().any(|e| matches!(e,
            RegistrationEvent::Disconnected { cause: DisconnectCause::Token(w) } if w.contains(why)
        ))
    };
    assert!(token_failure(&h, "cannot read"), "{:?}", h.events);
    assert_eq!(h.sm_metrics().connect_failures, 1);
    h.advance(Duration::from_secs(2));
    assert!(
        asks_for_token(&h.take_actions()),
        "asks again after the backoff"
    );
    // A source that never answers: the connect timeout makes it a failure.
    h.advance(Duration::from_secs(60));
    let actions = h.take_actions();
    assert!(
        actions.iter().any(|a| matches!(a, Action::DropStream)),
        "{actions:?}"
    );
    assert!(token_failure(&h, "did not answer"), "{:?}", h.events);
}

#[test]
fn invalid_credentials_is_retried_once_with_a_newer_token() {
    let mut h = H::fetching_token();
    h.give_token("old");
    h.reopen(rejected(RejectReason::InvalidCredentials));
    let actions = h.take_actions();
    assert!(matches!(actions[0], Action::CloseStream), "{actions:?}");
    assert!(asks_for_token(&actions), "rechecks the source at once");
    assert_eq!(h.give_token("new").auth_token, "new");
    // Rejected again: the contract's rule applies (stop), even with yet
    // another token in the source.
    h.reopen(rejected(RejectReason::InvalidCredentials));
    assert!(
        matches!(
            h.sm.state(),
            RegistrationState::Stopped(StopReason::Rejected {
                reason: RejectReason::InvalidCredentials,
                ..
            })
        ),
        "{:?}",
        h.sm.state()
    );
    assert!(!asks_for_token(&h.take_actions()));
}

#[test]
fn invalid_credentials_with_an_unchanged_token_stops() {
    let mut h = H::fetching_token();
    h.give_token("same");
    h.reopen(rejected(RejectReason::InvalidCredentials));
    assert!(asks_for_token(&h.take_actions()));
    h.sm.handle_token(h.now, Ok(crate::Secret::new("same")));
    assert!(h.registers().is_empty());
    match h.sm.state() {
        RegistrationState::Stopped(StopReason::Rejected { reason, message }) => {
            assert_eq!(*reason, RejectReason::InvalidCredentials);
            assert_eq!(message, REJECTION);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn shutdown_while_fetching_a_token_stops_and_drops_the_fetch() {
    let mut h = H::fetching_token();
    h.sm.handle_shutdown(h.now);
    let actions = h.take_actions();
    assert!(
        actions.iter().any(|a| matches!(a, Action::DropStream)),
        "{actions:?}"
    );
    assert!(h.sm.is_finished());
    // A late answer is moot.
    h.sm.handle_token(h.now, Ok(crate::Secret::new("late")));
    assert!(h.take_actions().is_empty());
}

#[test]
fn a_registration_without_a_source_never_asks() {
    let mut h = H::new();
    let actions = h.start();
    assert!(!asks_for_token(&actions));
    assert_eq!(
        register_of(&actions[0]).expect("register").auth_token,
        "secret-auth"
    );
}
