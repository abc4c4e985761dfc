//! State-machine tests on synthetic instants: no runtime, no sockets, no
//! sleeping. Each test drives [`Registration`] as a transcript.

use std::time::Duration;

use async_trait::async_trait;
use connector_proto::{
    stream_message::Kind, ApprovalUpdate, CancelRequest, Capability, Drain, ExecuteErrorKind,
    ExecuteRequest, ExecuteResponse, HeartbeatAck, PayloadEncoding, RegisterResponse,
    RegistrationStatus, RejectReason, StreamMessage,
};
use tokio::time::Instant;

use crate::{
    Action, BaseConnector, ConnectorConfig, ConnectorRegistration, DisconnectCause, ExecuteContext,
    ExecuteError, ExecuteOutput, MultiTransportOptions, Registration, RegistrationEvent,
    RegistrationState, StopReason,
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

fn options() -> MultiTransportOptions {
    MultiTransportOptions::builder("grpc://127.0.0.1:1")
        .jitter_seed(Some(7))
        .max_concurrent_requests(2)
        .metrics_report_interval(None)
        .build()
        .expect("valid options")
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
        let config = ConnectorConfig::builder("t", "echo", "i1")
            .auth_token("secret-auth")
            .build()
            .expect("valid config");
        let reg = ConnectorRegistration::new(config, Echo);
        let now = Instant::now();
        Self {
            sm: Registration::new(&reg, &options, now, 1_000_000),
            now,
            sent: Vec::new(),
            actions: Vec::new(),
            events: Vec::new(),
        }
    }

    fn pump(&mut self) {
        while let Some(a) = self.sm.poll_action() {
            self.actions.push(a);
        }
        while let Some(m) = self.sm.poll_transmit() {
            self.sent.push(m);
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
        self.sm
            .handle_message(self.now, StreamMessage { kind: Some(kind) });
        self.pump();
    }

    fn take_actions(&mut self) -> Vec<Action> {
        self.pump();
        std::mem::take(&mut self.actions)
    }

    fn take_sent(&mut self) -> Vec<StreamMessage> {
        self.pump();
        std::mem::take(&mut self.sent)
    }

    fn responses(&mut self) -> Vec<ExecuteResponse> {
        self.take_sent()
            .into_iter()
            .filter_map(|m| match m.kind {
                Some(Kind::ExecuteResponse(r)) => Some(*r),
                _ => None,
            })
            .collect()
    }

    /// Start, open, and answer `register` with `status`.
    fn open(&mut self) {
        self.sm.handle_start(self.now);
        self.pump();
        self.sm.handle_stream_opened(self.now);
        self.pump();
    }

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
}

fn register_of(action: &Action) -> Option<&connector_proto::RegisterRequest> {
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
    h.sm.handle_start(h.now);
    let actions = h.take_actions();
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
    let mut h = H::new();
    h.approve();
    h.advance(WD - Duration::from_millis(1));
    assert_eq!(h.sm.state(), &RegistrationState::Active);
    h.advance(Duration::from_millis(1));
    assert!(matches!(h.sm.state(), RegistrationState::Backoff { .. }));
    assert!(h.events.iter().any(|e| matches!(
        e,
        RegistrationEvent::Disconnected {
            cause: DisconnectCause::Watchdog
        }
    )));
    assert!(h.actions.iter().any(|a| matches!(a, Action::DropStream)));
}

#[test]
fn any_server_message_feeds_the_watchdog() {
    let mut h = H::new();
    h.approve();
    h.advance(Duration::from_secs(40));
    h.execute("r1", "echo", b"{}", 0);
    h.advance(Duration::from_secs(40));
    assert_eq!(h.sm.state(), &RegistrationState::Active);
    h.advance(Duration::from_secs(5));
    assert!(matches!(h.sm.state(), RegistrationState::Backoff { .. }));
}

#[test]
fn twenty_intervals_with_acks_never_disconnect() {
    let mut h = H::new();
    h.approve();
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
        let sent = h.take_sent();
        let hb = sent
            .iter()
            .find_map(|m| match &m.kind {
                Some(Kind::Heartbeat(hb)) => Some(*hb),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no heartbeat in round {round}"));
        assert_eq!(hb.sequence, round + 1);
        h.advance(Duration::from_millis(20));
        h.recv(Kind::HeartbeatAck(HeartbeatAck {
            sequence: hb.sequence,
            sent_at_unix_ms: hb.sent_at_unix_ms,
            should_reconnect: false,
        }));
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

impl H {
    fn sm_metrics(&self) -> crate::ConnectorMetrics {
        self.sm.metrics_snapshot()
    }
}

#[test]
fn heartbeats_start_when_the_stream_opens_even_while_pending() {
    let mut h = H::new();
    h.open();
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Pending as i32,
        ..Default::default()
    })));
    assert_eq!(h.sm.state(), &RegistrationState::PendingApproval);
    h.advance(HB);
    assert!(h
        .take_sent()
        .iter()
        .any(|m| matches!(m.kind, Some(Kind::Heartbeat(_)))));
}

#[test]
fn pending_then_approved_then_execute() {
    let mut h = H::new();
    h.open();
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Pending as i32,
        ..Default::default()
    })));
    assert_eq!(h.sm.state(), &RegistrationState::PendingApproval);
    // Pending may last longer than the connect timeout: no register timeout.
    h.advance(Duration::from_secs(20));
    assert_eq!(h.sm.state(), &RegistrationState::PendingApproval);
    h.recv(Kind::ApprovalUpdate(Box::new(ApprovalUpdate {
        status: RegistrationStatus::Approved as i32,
        session_token: "tok".into(),
        ..Default::default()
    })));
    assert_eq!(h.sm.state(), &RegistrationState::Active);
    assert!(h.sm.has_session_token());
}

#[test]
fn pending_then_rejected_stops_for_good() {
    let mut h = H::new();
    h.open();
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Pending as i32,
        ..Default::default()
    })));
    h.recv(Kind::ApprovalUpdate(Box::new(ApprovalUpdate {
        status: RegistrationStatus::Rejected as i32,
        reject_reason: RejectReason::Denied as i32,
        message: "no".into(),
        ..Default::default()
    })));
    assert!(matches!(
        h.sm.state(),
        RegistrationState::Stopped(StopReason::Rejected {
            reason: RejectReason::Denied,
            ..
        })
    ));
    assert!(h.sm.is_finished() || !h.take_actions().is_empty());
}

fn reject(h: &mut H, reason: RejectReason) {
    h.open();
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Rejected as i32,
        reject_reason: reason as i32,
        message: "test".into(),
        ..Default::default()
    })));
}

#[test]
fn final_reject_reasons_stop_the_registration() {
    for reason in [
        RejectReason::Denied,
        RejectReason::InvalidCredentials,
        RejectReason::InvalidRequest,
    ] {
        let mut h = H::new();
        reject(&mut h, reason);
        match h.sm.state() {
            RegistrationState::Stopped(StopReason::Rejected { reason: r, message }) => {
                assert_eq!(*r, reason);
                assert_eq!(message, "test");
            }
            other => panic!("{reason:?}: {other:?}"),
        }
        let actions = h.take_actions();
        assert!(actions.iter().any(|a| matches!(a, Action::CloseStream)));
        // No reconnect is ever scheduled.
        h.advance(Duration::from_secs(3600));
        assert!(h.take_actions().iter().all(|a| register_of(a).is_none()));
    }
}

#[test]
fn session_expired_drops_token_and_registers_again_at_once() {
    let mut h = H::new();
    h.approve();
    // Lose the stream, come back with the token.
    h.sm.handle_stream_closed(h.now, None);
    h.advance(Duration::from_secs(2));
    let actions = h.take_actions();
    let reg = actions
        .iter()
        .find_map(register_of)
        .expect("reconnect after backoff");
    assert_eq!(reg.session_token, "sess-1", "session token reused");
    h.sm.handle_stream_opened(h.now);
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Rejected as i32,
        reject_reason: RejectReason::SessionExpired as i32,
        ..Default::default()
    })));
    let actions = h.take_actions();
    assert!(matches!(actions[0], Action::CloseStream));
    let reg = actions
        .iter()
        .find_map(register_of)
        .expect("registers again at once, without backoff");
    assert_eq!(reg.session_token, "", "expired token dropped");
    assert_eq!(reg.auth_token, "secret-auth");
}

#[test]
fn duplicate_backs_off_and_retries() {
    let mut h = H::new();
    reject(&mut h, RejectReason::Duplicate);
    assert!(matches!(h.sm.state(), RegistrationState::Backoff { .. }));
    h.advance(Duration::from_secs(2));
    assert!(h.take_actions().iter().any(|a| register_of(a).is_some()));
}

#[test]
fn backoff_grows_and_is_capped_across_failures() {
    let mut h = H::with(
        options()
            .to_builder()
            .max_backoff(Duration::from_secs(4))
            .build()
            .expect("valid"),
    );
    h.sm.handle_start(h.now);
    let mut delays = Vec::new();
    for _ in 0..8 {
        h.take_actions();
        h.sm.handle_open_failed(h.now, "refused");
        match h.sm.state() {
            RegistrationState::Backoff { delay } => delays.push(*delay),
            other => panic!("{other:?}"),
        }
        let d = *delays.last().expect("one");
        h.advance(d);
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
    h.sm.handle_stream_opened(h.now);
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        ..Default::default()
    })));
    h.advance(Duration::from_secs(1));
    h.sm.handle_stream_closed(h.now, Some("reset"));
    match h.sm.state() {
        RegistrationState::Backoff { delay } => assert!(*delay >= Duration::from_secs(8)),
        other => panic!("{other:?}"),
    }
    // A long healthy stream does.
    h.advance(Duration::from_secs(20));
    h.sm.handle_stream_opened(h.now);
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        ..Default::default()
    })));
    h.advance(Duration::from_secs(11));
    h.sm.handle_stream_closed(h.now, Some("reset"));
    match h.sm.state() {
        RegistrationState::Backoff { delay } => assert!(*delay <= Duration::from_secs(1)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn register_timeout_reconnects() {
    let mut h = H::new();
    h.open();
    h.advance(Duration::from_secs(10));
    assert!(matches!(h.sm.state(), RegistrationState::Backoff { .. }));
    assert!(h.events.iter().any(|e| matches!(
        e,
        RegistrationEvent::Disconnected {
            cause: DisconnectCause::RegisterTimeout
        }
    )));
}

#[test]
fn execute_success_bad_payload_and_unknown_capability() {
    let mut h = H::new();
    h.approve();
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
    h.sm.handle_execute_done(
        h.now,
        "ok",
        Ok(ExecuteOutput::json_bytes(&br#"{"a":1}"#[..])),
    );
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert!(r[0].success);
    assert_eq!(r[0].payload, &br#"{"a":1}"#[..]);
    let m = h.sm_metrics();
    assert_eq!(
        (m.requests_received, m.requests_succeeded, m.requests_failed),
        (3, 1, 2)
    );
}

#[test]
fn handler_error_is_reported_with_its_kind() {
    let mut h = H::new();
    h.approve();
    h.execute("f", "echo", b"{}", 0);
    h.take_actions();
    h.sm.handle_execute_done(h.now, "f", Err(ExecuteError::handler("boom")));
    let r = h.responses();
    assert_eq!(r[0].error_kind, ExecuteErrorKind::Handler as i32);
    assert_eq!(r[0].error, "boom");
    assert!(!r[0].success);
}

#[test]
fn concurrency_bound_queues_excess_and_never_drops_it() {
    let mut h = H::new(); // max 2 concurrent
    h.approve();
    for i in 0..5 {
        h.execute(&format!("r{i}"), "echo", b"{}", 0);
    }
    assert_eq!(executes(&h.take_actions()), vec!["r0", "r1"]);
    assert_eq!(h.sm.in_flight(), 5);
    assert_eq!(h.sm.running(), 2);
    for i in 0..5 {
        h.sm.handle_execute_done(
            h.now,
            &format!("r{i}"),
            Ok(ExecuteOutput::json_bytes(&b"{}"[..])),
        );
        assert!(h.sm.running() <= 2);
    }
    let started = executes(&h.take_actions());
    assert_eq!(
        started,
        vec!["r2", "r3", "r4"],
        "queued work starts in order"
    );
    let ids: Vec<_> = h.responses().into_iter().map(|r| r.request_id).collect();
    assert_eq!(ids, vec!["r0", "r1", "r2", "r3", "r4"]);
    assert_eq!(h.sm.in_flight(), 0);
}

#[test]
fn queue_limit_answers_overloaded() {
    let mut h = H::with(
        options()
            .to_builder()
            .max_concurrent_requests(1)
            .max_queued_requests(1)
            .build()
            .expect("valid"),
    );
    h.approve();
    h.execute("a", "echo", b"{}", 0);
    h.execute("b", "echo", b"{}", 0);
    h.execute("c", "echo", b"{}", 0);
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].request_id, "c");
    assert_eq!(r[0].error_kind, ExecuteErrorKind::Overloaded as i32);
}

#[test]
fn exactly_one_response_under_timeout() {
    let mut h = H::new();
    h.approve();
    h.execute("slow", "sleep", b"{}", 100);
    assert_eq!(executes(&h.take_actions()), vec!["slow"]);
    h.advance(Duration::from_millis(99));
    assert!(h.responses().is_empty());
    h.advance(Duration::from_millis(1));
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].error_kind, ExecuteErrorKind::Timeout as i32);
    assert!(h
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::Abort(id) if id == "slow")));
    // The handler finishing late changes nothing.
    h.sm.handle_execute_done(h.now, "slow", Ok(ExecuteOutput::json_bytes(&b"{}"[..])));
    assert!(h.responses().is_empty());
}

#[test]
fn exactly_one_response_under_cancel_and_unknown_cancel_is_ignored() {
    let mut h = H::new();
    h.approve();
    h.execute("c1", "sleep", b"{}", 0);
    h.recv(Kind::Cancel(CancelRequest {
        request_id: "c1".into(),
    }));
    h.recv(Kind::Cancel(CancelRequest {
        request_id: "never-sent".into(),
    }));
    h.sm.handle_execute_done(h.now, "c1", Err(ExecuteError::handler("late")));
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].error_kind, ExecuteErrorKind::Cancelled as i32);
    assert_eq!(h.sm_metrics().protocol_errors, 0);
}

#[test]
fn duplicate_request_id_in_flight_is_counted_not_answered_twice() {
    let mut h = H::new();
    h.approve();
    h.execute("d", "echo", b"{}", 0);
    h.execute("d", "echo", b"{}", 0);
    assert_eq!(executes(&h.take_actions()), vec!["d"]);
    assert_eq!(h.sm_metrics().protocol_errors, 1);
    h.sm.handle_execute_done(h.now, "d", Ok(ExecuteOutput::json_bytes(&b"{}"[..])));
    assert_eq!(h.responses().len(), 1);
}

#[test]
fn response_finished_while_down_is_redelivered_after_reregistering() {
    let mut h = H::new();
    h.approve();
    h.execute("x", "echo", b"{}", 0);
    h.take_actions();
    h.sm.handle_stream_closed(h.now, Some("connection reset"));
    h.sm.handle_execute_done(h.now, "x", Ok(ExecuteOutput::json_bytes(&b"{}"[..])));
    assert!(h.responses().is_empty(), "no stream: nothing sent");
    assert_eq!(h.sm.undelivered(), 1);
    h.advance(Duration::from_secs(2));
    h.sm.handle_stream_opened(h.now);
    assert!(
        h.responses().is_empty(),
        "not before the registration is approved"
    );
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        ..Default::default()
    })));
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].request_id, "x");
    let m = h.sm_metrics();
    assert_eq!((m.responses_redelivered, m.successful_reconnects), (1, 1));
}

#[test]
fn redelivery_respects_its_ttl() {
    let mut h = H::with(
        options()
            .to_builder()
            .redelivery_ttl(Duration::from_secs(1))
            .reconnect_delay(Duration::from_secs(5))
            .max_backoff(Duration::from_secs(5))
            .jitter(Duration::ZERO)
            .build()
            .expect("valid"),
    );
    h.approve();
    h.execute("x", "echo", b"{}", 0);
    h.sm.handle_stream_closed(h.now, None);
    h.sm.handle_execute_done(h.now, "x", Ok(ExecuteOutput::json_bytes(&b"{}"[..])));
    h.advance(Duration::from_secs(5));
    h.sm.handle_stream_opened(h.now);
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        ..Default::default()
    })));
    assert!(h.responses().is_empty());
    assert_eq!(h.sm_metrics().responses_expired, 1);
}

#[test]
fn drain_finishes_in_flight_then_reconnects_after_the_delay() {
    let mut h = H::new();
    h.approve();
    h.execute("a", "echo", b"{}", 0);
    h.take_actions();
    h.recv(Kind::Drain(Box::new(Drain {
        reason: "deploy".into(),
        reconnect_after_ms: 3000,
    })));
    assert_eq!(h.sm.state(), &RegistrationState::Draining);
    // New work is refused while draining, with a response.
    h.execute("late", "echo", b"{}", 0);
    let r = h.responses();
    assert_eq!(r[0].request_id, "late");
    assert_eq!(r[0].error_kind, ExecuteErrorKind::Overloaded as i32);
    assert!(h
        .take_actions()
        .iter()
        .all(|a| !matches!(a, Action::CloseStream)));
    h.sm.handle_execute_done(h.now, "a", Ok(ExecuteOutput::json_bytes(&b"{}"[..])));
    // The response is queued before the close, so a graceful close sends it.
    assert_eq!(
        h.sm.poll_transmit()
            .map(|m| matches!(m.kind, Some(Kind::ExecuteResponse(_)))),
        Some(true)
    );
    assert!(h
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::CloseStream)));
    match h.sm.state() {
        RegistrationState::Backoff { delay } => {
            assert!(*delay >= Duration::from_secs(3) && *delay <= Duration::from_millis(3500))
        }
        other => panic!("{other:?}"),
    }
    h.advance(Duration::from_millis(3500));
    assert!(h.take_actions().iter().any(|a| register_of(a).is_some()));
}

#[test]
fn should_reconnect_drains_like_drain() {
    let mut h = H::new();
    h.approve();
    // A stream that stayed healthy (past backoff_reset_after).
    h.advance(Duration::from_secs(11));
    h.recv(Kind::HeartbeatAck(HeartbeatAck {
        sequence: 0,
        sent_at_unix_ms: 0,
        should_reconnect: true,
    }));
    // Nothing in flight: closes at once and backs off by jitter only.
    assert!(h
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::CloseStream)));
    match h.sm.state() {
        RegistrationState::Backoff { delay } => assert!(*delay <= Duration::from_millis(500)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn drain_timeout_cancels_what_is_left() {
    let mut h = H::with(
        options()
            .to_builder()
            .drain_timeout(Duration::from_secs(5))
            .build()
            .expect("valid"),
    );
    h.approve();
    h.execute("stuck", "sleep", b"{}", 0);
    h.take_actions();
    h.sm.handle_shutdown(h.now);
    assert_eq!(h.sm.state(), &RegistrationState::Draining);
    h.advance(Duration::from_secs(5));
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].error_kind, ExecuteErrorKind::Cancelled as i32);
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
    let mut h = H::with(
        options()
            .to_builder()
            .reconnect(false)
            .build()
            .expect("valid"),
    );
    h.approve();
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
    h.execute("early", "echo", b"{}", 0);
    let r = h.responses();
    assert!(
        r.is_empty(),
        "not deliverable before approval; kept instead"
    );
    h.recv(Kind::ApprovalUpdate(Box::new(ApprovalUpdate {
        status: RegistrationStatus::Approved as i32,
        ..Default::default()
    })));
    h.sm.handle_message(h.now, StreamMessage { kind: None });
    h.recv(Kind::Heartbeat(Default::default()));
    assert_eq!(h.sm.state(), &RegistrationState::Registering);
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        ..Default::default()
    })));
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        ..Default::default()
    })));
    assert_eq!(h.sm.state(), &RegistrationState::Active);
    // early execute, approval while registering, no kind, heartbeat from
    // server, second register_response.
    assert_eq!(h.sm_metrics().protocol_errors, 5);
    // The early request got its one (OVERLOADED) answer once approved.
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].error_kind, ExecuteErrorKind::Overloaded as i32);
}

#[test]
fn server_heartbeat_interval_is_honoured() {
    let mut h = H::new();
    h.open();
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        heartbeat_interval_ms: 5_000,
        ..Default::default()
    })));
    h.take_sent();
    h.advance(Duration::from_secs(5));
    assert!(h
        .take_sent()
        .iter()
        .any(|m| matches!(m.kind, Some(Kind::Heartbeat(_)))));
}

#[test]
fn debug_output_never_shows_tokens() {
    let mut h = H::new();
    h.approve();
    let dump = format!("{:?}", h.sm);
    assert!(!dump.contains("secret-auth"), "{dump}");
    assert!(!dump.contains("sess-1"), "{dump}");
}

#[test]
fn a_server_that_does_not_read_cannot_grow_the_outbox_without_bound() {
    let mut h = H::with(
        options()
            .to_builder()
            .max_concurrent_requests(1)
            .limits(
                crate::Limits::default()
                    .queued_requests(2)
                    .answered_entries(4)
                    .outbox_messages(71),
            )
            .build()
            .expect("valid"),
    );
    h.approve();
    // The driver never pulls: the stream's queue is full. Requests keep
    // coming and are answered at once (bad payload), piling up.
    for i in 0..200 {
        h.sm.handle_message(
            h.now,
            StreamMessage {
                kind: Some(Kind::ExecuteRequest(Box::new(ExecuteRequest {
                    request_id: format!("r{i}"),
                    payload: b"{".to_vec().into(),
                    encoding: PayloadEncoding::Json as i32,
                    ..Default::default()
                }))),
            },
        );
        while let Some(e) = h.sm.poll_event() {
            h.events.push(e);
        }
        assert!(h.sm.undelivered() <= 4);
    }
    assert!(h.events.iter().any(|e| matches!(
        e,
        RegistrationEvent::Disconnected {
            cause: DisconnectCause::OutboundStalled
        }
    )));
    assert!(
        h.sm_metrics().responses_expired > 0,
        "what was dropped is counted"
    );
}

fn reconnect(h: &mut H) {
    h.advance(Duration::from_secs(2));
    assert!(h.take_actions().iter().any(|a| register_of(a).is_some()));
    h.sm.handle_stream_opened(h.now);
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        ..Default::default()
    })));
    assert_eq!(h.sm.state(), &RegistrationState::Active);
}

#[test]
fn a_request_asked_again_after_a_reconnect_replays_the_unconfirmed_answer() {
    let mut h = H::new();
    h.approve();
    h.execute("x", "echo", b"{}", 0);
    h.take_actions();
    h.sm.handle_execute_done(h.now, "x", Ok(ExecuteOutput::json_bytes(&b"{\"v\":1}"[..])));
    assert_eq!(h.responses().len(), 1, "sent once");
    // The connection dies before the server acknowledged a later heartbeat.
    h.sm.handle_stream_closed(h.now, Some("reset"));
    reconnect(&mut h);
    assert!(h.responses().is_empty(), "not resent on its own");
    h.execute("x", "echo", b"{}", 0);
    assert!(
        executes(&h.take_actions()).is_empty(),
        "the handler does not run twice"
    );
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].payload, &b"{\"v\":1}"[..]);
    // Asked a third time on the same stream: the answer is on its way.
    h.execute("x", "echo", b"{}", 0);
    assert!(h.responses().is_empty());
    assert!(executes(&h.take_actions()).is_empty());
}

#[test]
fn an_acknowledged_heartbeat_confirms_earlier_answers() {
    let mut h = H::new();
    h.approve();
    h.execute("x", "echo", b"{}", 0);
    h.take_actions();
    h.sm.handle_execute_done(h.now, "x", Ok(ExecuteOutput::json_bytes(&b"{}"[..])));
    h.take_sent();
    h.advance(HB);
    let seq = h
        .take_sent()
        .iter()
        .find_map(|m| match &m.kind {
            Some(Kind::Heartbeat(hb)) => Some(hb.sequence),
            _ => None,
        })
        .expect("heartbeat");
    h.recv(Kind::HeartbeatAck(HeartbeatAck {
        sequence: seq,
        ..Default::default()
    }));
    h.sm.handle_stream_closed(h.now, Some("reset"));
    reconnect(&mut h);
    // The server read the answer, so the id is free: a new request.
    h.execute("x", "echo", b"{}", 0);
    assert_eq!(executes(&h.take_actions()), vec!["x"]);
}

#[test]
fn many_answers_without_a_heartbeat_ask_for_an_early_ack() {
    let mut h = H::with(
        options()
            .to_builder()
            .max_concurrent_requests(1000)
            .build()
            .expect("valid"),
    );
    h.approve();
    for i in 0..70 {
        h.execute(&format!("r{i}"), "echo", b"{}", 0);
    }
    h.take_actions();
    for i in 0..70 {
        h.sm.handle_execute_done(
            h.now,
            &format!("r{i}"),
            Ok(ExecuteOutput::json_bytes(&b"{}"[..])),
        );
    }
    let sent = h.take_sent();
    let beats = sent
        .iter()
        .filter(|m| matches!(m.kind, Some(Kind::Heartbeat(_))))
        .count();
    assert_eq!(beats, 2, "an early heartbeat after every 32 answers");
}

#[test]
fn large_answers_ask_for_an_early_ack_by_bytes() {
    let mut h = H::with(
        options()
            .to_builder()
            .max_concurrent_requests(1000)
            .build()
            .expect("valid"),
    );
    h.approve();
    for i in 0..20 {
        h.execute(&format!("r{i}"), "echo", b"{}", 0);
    }
    h.take_actions();
    // 20 answers of 4 KiB: a heartbeat after every 8 (32 KiB), not 32.
    let big = format!("\"{}\"", "x".repeat(4094));
    for i in 0..20 {
        h.sm.handle_execute_done(
            h.now,
            &format!("r{i}"),
            Ok(ExecuteOutput::json_bytes(big.clone().into_bytes())),
        );
    }
    let sent = h.take_sent();
    let kinds: Vec<bool> = sent
        .iter()
        .map(|m| matches!(m.kind, Some(Kind::Heartbeat(_))))
        .collect();
    assert_eq!(kinds.iter().filter(|&&b| b).count(), 2, "{kinds:?}");
    assert!(kinds[8], "the first early heartbeat follows the 8th answer");
}

// ----------------------------------------------------------------------
// A server that is buggy or hostile (issue 11): one test per behaviour.
// ----------------------------------------------------------------------

impl H {
    fn delay(&self) -> Duration {
        match self.sm.state() {
            RegistrationState::Backoff { delay } => *delay,
            other => panic!("not backing off: {other:?}"),
        }
    }

    fn heartbeats_sent(&mut self) -> Vec<u64> {
        self.take_sent()
            .iter()
            .filter_map(|m| match &m.kind {
                Some(Kind::Heartbeat(hb)) => Some(hb.sequence),
                _ => None,
            })
            .collect()
    }

    /// Plays a server that answers every `OpenStream` by opening it and
    /// sending `answer`, for `total` of synthetic time; returns how many
    /// registers went out.
    fn serve_for(&mut self, total: Duration, answer: impl Fn() -> Kind) -> usize {
        let end = self.now + total;
        let mut registers = 0;
        loop {
            let opens = self
                .take_actions()
                .iter()
                .filter(|a| register_of(a).is_some())
                .count();
            if opens > 0 {
                registers += opens;
                self.sm.handle_stream_opened(self.now);
                self.recv(answer());
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
    h.open();
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        heartbeat_interval_ms: 1,
        ..Default::default()
    })));
    let mut beats = 0;
    for _ in 0..3000 {
        h.advance(Duration::from_millis(1));
        for seq in h.heartbeats_sent() {
            beats += 1;
            h.recv(Kind::HeartbeatAck(HeartbeatAck {
                sequence: seq,
                ..Default::default()
            }));
        }
    }
    // 3 s at the 1 s floor: at most one beat per second (plus the phase).
    assert!((2..=3).contains(&beats), "{beats} heartbeats in 3 s");
    assert_eq!(h.sm.state(), &RegistrationState::Active);
    // And the other end of the range: a 49-day wish is 5 minutes.
    let mut h = H::new();
    h.open();
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        heartbeat_interval_ms: u32::MAX,
        ..Default::default()
    })));
    let next = h.sm.next_heartbeat_at().expect("armed");
    assert!(next <= h.now + super::MAX_SERVER_HEARTBEAT_INTERVAL);
}

#[test]
fn hostile_session_expired_forever_escalates_the_backoff() {
    // The server rejects every register SESSION_EXPIRED, and hands out a
    // session token with each rejection to bait an immediate retry.
    let mut h = H::new();
    h.sm.handle_start(h.now);
    let registers = h.serve_for(Duration::from_secs(60), || {
        Kind::RegisterResponse(Box::new(RegisterResponse {
            status: RegistrationStatus::Rejected as i32,
            reject_reason: RejectReason::SessionExpired as i32,
            session_token: "bait".into(),
            ..Default::default()
        }))
    });
    // 0.5 + 1 + 2 + 4 + 8 + 16 + 32 s: about 8 attempts in a minute.
    assert!(
        (5..=10).contains(&registers),
        "{registers} registers in 60 s"
    );
    assert!(
        !h.sm.has_session_token(),
        "a token sent with a rejection is not kept"
    );
    assert!(h.delay() >= Duration::from_secs(16), "{:?}", h.delay());
}

#[test]
fn session_expired_gets_one_immediate_retry_then_backs_off() {
    let mut h = H::new();
    h.approve();
    h.sm.handle_stream_closed(h.now, None);
    h.advance(Duration::from_secs(2));
    assert!(h.take_actions().iter().any(|a| register_of(a).is_some()));
    h.sm.handle_stream_opened(h.now);
    let expired = || {
        Kind::RegisterResponse(Box::new(RegisterResponse {
            status: RegistrationStatus::Rejected as i32,
            reject_reason: RejectReason::SessionExpired as i32,
            ..Default::default()
        }))
    };
    h.recv(expired());
    let reg = h
        .take_actions()
        .iter()
        .find_map(|a| register_of(a).cloned())
        .expect("immediate retry");
    assert_eq!(reg.session_token, "");
    h.sm.handle_stream_opened(h.now);
    h.recv(expired());
    assert!(h.take_actions().iter().all(|a| register_of(a).is_none()));
    assert!(h.delay() >= Duration::from_millis(500));
}

#[test]
fn hostile_duplicate_forever_escalates_the_backoff() {
    let mut h = H::new();
    h.sm.handle_start(h.now);
    let registers = h.serve_for(Duration::from_secs(60), || {
        Kind::RegisterResponse(Box::new(RegisterResponse {
            status: RegistrationStatus::Rejected as i32,
            reject_reason: RejectReason::Duplicate as i32,
            ..Default::default()
        }))
    });
    assert!(
        (5..=10).contains(&registers),
        "{registers} registers in 60 s"
    );
}

#[test]
fn hostile_unknown_and_unspecified_reject_reasons_retry_with_backoff() {
    for code in [99, 0] {
        let mut h = H::new();
        h.open();
        h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
            status: RegistrationStatus::Rejected as i32,
            reject_reason: code,
            message: "new reason".into(),
            ..Default::default()
        })));
        let first = h.delay();
        assert!(
            first >= Duration::from_millis(500),
            "code {code}: {first:?}"
        );
        // Retried, and a second one escalates.
        h.advance(first);
        assert!(h.take_actions().iter().any(|a| register_of(a).is_some()));
        h.sm.handle_stream_opened(h.now);
        h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
            status: RegistrationStatus::Rejected as i32,
            reject_reason: code,
            ..Default::default()
        })));
        assert!(h.delay() >= Duration::from_secs(1), "code {code}");
    }
}

#[test]
fn hostile_drain_delay_is_clamped_to_max_backoff() {
    let opts = options()
        .to_builder()
        .max_backoff(Duration::from_secs(2))
        .build()
        .expect("valid");
    // Healthy stream and fresh stream alike.
    for healthy in [true, false] {
        let mut h = H::with(opts.clone());
        h.approve();
        if healthy {
            h.advance(Duration::from_secs(11));
        }
        h.recv(Kind::Drain(Box::new(Drain {
            reason: "bye".into(),
            reconnect_after_ms: u32::MAX,
        })));
        assert!(h.delay() <= Duration::from_secs(2), "{:?}", h.delay());
        h.advance(Duration::from_secs(2));
        assert!(h.take_actions().iter().any(|a| register_of(a).is_some()));
    }
}

#[test]
fn drains_on_streams_that_never_stay_healthy_escalate_the_backoff() {
    // Approve, drain at once with reconnect_after_ms = 0, again and again.
    let mut h = H::new();
    h.sm.handle_start(h.now);
    let mut delays = Vec::new();
    for _ in 0..6 {
        let d = h.serve_for(Duration::ZERO, || {
            Kind::RegisterResponse(Box::new(RegisterResponse {
                status: RegistrationStatus::Approved as i32,
                ..Default::default()
            }))
        });
        assert_eq!(d, 1);
        h.recv(Kind::Drain(Box::new(Drain {
            reason: String::new(),
            reconnect_after_ms: 0,
        })));
        delays.push(h.delay());
        h.advance(h.delay());
    }
    assert!(delays[5] >= Duration::from_secs(16), "{delays:?}");
    // should_reconnect on an unhealthy stream too.
    h.serve_for(Duration::ZERO, || {
        Kind::RegisterResponse(Box::new(RegisterResponse {
            status: RegistrationStatus::Approved as i32,
            ..Default::default()
        }))
    });
    h.recv(Kind::HeartbeatAck(HeartbeatAck {
        should_reconnect: true,
        ..Default::default()
    }));
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
    let mut h = H::new();
    h.approve();
    h.recv(Kind::Drain(Box::new(Drain {
        reason: "bye\nFORGED".into(),
        reconnect_after_ms: 0,
    })));
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, RegistrationEvent::Draining { reason } if reason == "bye\\nFORGED")));
}

#[test]
fn hostile_request_timeout_is_clamped() {
    let mut h = H::new();
    h.approve();
    h.execute("r", "echo", b"{}", u32::MAX);
    let at = h.sm.inflight.next_deadline().expect("deadline");
    assert_eq!(at, h.now + super::MAX_REQUEST_TIMEOUT);
}

fn execute_raw(h: &mut H, id: &str, capability: &str) {
    h.recv(Kind::ExecuteRequest(Box::new(ExecuteRequest {
        request_id: id.into(),
        payload: b"{}".to_vec().into(),
        encoding: PayloadEncoding::Json as i32,
        capability_id: capability.into(),
        ..Default::default()
    })));
}

#[test]
fn hostile_long_request_id_is_answered_and_never_stored() {
    let mut h = H::new();
    h.approve();
    let id = "i".repeat(16 * 1024);
    execute_raw(&mut h, &id, "echo");
    assert!(
        executes(&h.take_actions()).is_empty(),
        "the handler does not run"
    );
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].request_id, id,
        "the answer carries the id to be matched"
    );
    assert_eq!(r[0].error_kind, ExecuteErrorKind::BadPayload as i32);
    assert!(r[0].error.len() < 200);
    assert_eq!(h.sm.in_flight(), 0);
    assert_eq!(h.sm.held_bytes(), (0, 0, 0), "nothing kept");
}

#[test]
fn hostile_never_acking_server_with_long_ids_cannot_grow_memory() {
    // Never acks heartbeats; 24 000 requests, unknown capability. With
    // 16 KiB ids they are refused unstored; with ids just under the limit
    // the answered log (unconfirmed part included) stays in its budget.
    let budget = 2 << 20;
    let opts = options()
        .to_builder()
        .limits(
            crate::Limits::default()
                .answered_bytes(budget)
                .answered_entries(100_000),
        )
        .build()
        .expect("valid");
    for id_len in [16 * 1024, 1000] {
        let mut h = H::with(opts.clone());
        h.approve();
        let mut answered = 0;
        let mut peak = 0;
        for i in 0..24_000 {
            let id = format!("{i:08}{}", "x".repeat(id_len - 8));
            execute_raw(&mut h, &id, "no-such-capability");
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
    let mut h = H::new();
    h.approve();
    let cap: String = "\u{1}".repeat(1 << 20);
    execute_raw(&mut h, "r1", &cap);
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].error_kind, ExecuteErrorKind::UnknownCapability as i32);
    assert!(r[0].error.len() < 2048, "{} bytes", r[0].error.len());
    assert!(
        r[0].error.contains("\\u{1}"),
        "sanitized, not Debug: {}",
        &r[0].error[..80]
    );
    assert!(!r[0].error.contains('\u{1}'));
}

#[test]
fn an_answer_over_max_message_size_is_replaced_by_one_that_fits() {
    let mut h = H::with(
        options()
            .to_builder()
            .max_message_size(64 * 1024)
            .build()
            .expect("valid"),
    );
    h.approve();
    h.execute("big", "echo", b"{}", 0);
    h.execute("loud", "echo", b"{}", 0);
    h.take_actions();
    h.sm.handle_execute_done(h.now, "big", Ok(ExecuteOutput::raw(vec![7u8; 100 * 1024])));
    h.sm.handle_execute_done(
        h.now,
        "loud",
        Err(ExecuteError::handler("e".repeat(200 * 1024))),
    );
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
    let mut h = H::new();
    h.approve();
    h.recv(Kind::Drain(Box::new(Drain {
        reason: String::new(),
        reconnect_after_ms: 0,
    })));
    assert!(h
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::CloseStream)));
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
    reconnect(&mut h);
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].request_id, "late");
    assert_eq!(r[0].error_kind, ExecuteErrorKind::Overloaded as i32);
}

#[test]
fn a_cancel_flood_on_queued_requests_answers_each_once() {
    let mut h = H::with(
        options()
            .to_builder()
            .max_concurrent_requests(1)
            .build()
            .expect("valid"),
    );
    h.approve();
    h.execute("busy", "echo", b"{}", 0);
    assert_eq!(executes(&h.take_actions()), vec!["busy"]);
    for i in 0..5000 {
        h.execute(&format!("q{i}"), "echo", b"{}", 0);
    }
    for i in 0..5000 {
        h.recv(Kind::Cancel(CancelRequest {
            request_id: format!("q{i}"),
        }));
    }
    let r = h.responses();
    assert_eq!(r.len(), 5000);
    assert!(r
        .iter()
        .all(|a| a.error_kind == ExecuteErrorKind::Cancelled as i32));
    assert_eq!(h.sm.in_flight(), 1);
    assert!(h.sm.inflight.queue_len() <= 67);
    // The running one finishes; nothing cancelled starts.
    h.sm.handle_execute_done(h.now, "busy", Ok(ExecuteOutput::json_bytes(&b"{}"[..])));
    assert!(executes(&h.take_actions()).is_empty());
}

#[test]
fn queued_request_bytes_are_budgeted() {
    let mut h = H::with(
        options()
            .to_builder()
            .max_concurrent_requests(1)
            .limits(crate::Limits::default().queued_bytes(64 * 1024))
            .build()
            .expect("valid"),
    );
    h.approve();
    let payload = format!("\"{}\"", "p".repeat(10 * 1024));
    for i in 0..20 {
        h.execute(&format!("r{i}"), "echo", payload.as_bytes(), 0);
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
    let mut h = H::with(
        options()
            .to_builder()
            .limits(crate::Limits::default().outbox_bytes(256 * 1024))
            .build()
            .expect("valid"),
    );
    h.approve();
    for i in 0..100 {
        // The driver never pulls from the outbox: no `pump`.
        let id = format!("r{i}");
        h.sm.handle_message(
            h.now,
            StreamMessage {
                kind: Some(Kind::ExecuteRequest(Box::new(ExecuteRequest {
                    request_id: id.clone(),
                    ..Default::default()
                }))),
            },
        );
        while h.sm.poll_action().is_some() {}
        h.sm.handle_execute_done(h.now, &id, Ok(ExecuteOutput::raw(vec![0u8; 16 * 1024])));
        while let Some(e) = h.sm.poll_event() {
            h.events.push(e);
        }
        assert!(h.sm.held_bytes().0 <= 256 * 1024 + 17 * 1024);
    }
    assert!(h.events.iter().any(|e| matches!(
        e,
        RegistrationEvent::Disconnected {
            cause: DisconnectCause::OutboundStalled
        }
    )));
}

#[test]
fn heartbeat_phase_is_seeded_per_registration_and_deterministic() {
    let first_beat = |instance: &str| {
        let config = ConnectorConfig::builder("t", "echo", instance)
            .build()
            .expect("valid");
        let reg = ConnectorRegistration::new(config, Echo);
        let now = Instant::now();
        let mut sm = Registration::new(&reg, &options(), now, 0);
        sm.handle_start(now);
        sm.handle_stream_opened(now);
        sm.next_heartbeat_at().expect("armed") - now
    };
    assert_eq!(first_beat("a"), first_beat("a"));
    let phases: std::collections::BTreeSet<_> =
        (0..20).map(|i| first_beat(&format!("i{i}"))).collect();
    assert_eq!(phases.len(), 20);
    assert!(phases.iter().all(|d| *d <= HB));
}

#[test]
fn hostile_ack_for_a_heartbeat_never_sent_confirms_nothing() {
    let mut h = H::new();
    h.approve();
    h.execute("x", "echo", b"{}", 0);
    h.take_actions();
    h.sm.handle_execute_done(h.now, "x", Ok(ExecuteOutput::json_bytes(&b"{}"[..])));
    h.take_sent();
    let errors = h.sm_metrics().protocol_errors;
    h.recv(Kind::HeartbeatAck(HeartbeatAck {
        sequence: u64::MAX,
        ..Default::default()
    }));
    assert_eq!(h.sm_metrics().protocol_errors, errors + 1);
    // The answer is still kept for replay: the server never read a
    // heartbeat after it.
    h.sm.handle_stream_closed(h.now, Some("reset"));
    reconnect(&mut h);
    h.execute("x", "echo", b"{}", 0);
    assert!(
        executes(&h.take_actions()).is_empty(),
        "replayed, not run again"
    );
    assert_eq!(h.responses().len(), 1);
}

#[test]
fn transport_error_text_is_sanitized() {
    let mut h = H::new();
    h.approve();
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

fn with_token_source() -> H {
    let config = ConnectorConfig::builder("t", "echo", "i1")
        .token_source(std::sync::Arc::new(crate::FixedToken::new("unused")))
        .build()
        .expect("valid config");
    let reg = ConnectorRegistration::new(config, Echo);
    let now = Instant::now();
    H {
        sm: Registration::new(&reg, &options(), now, 1_000_000),
        now,
        sent: Vec::new(),
        actions: Vec::new(),
        events: Vec::new(),
    }
}

fn asks_for_token(actions: &[Action]) -> bool {
    actions.iter().any(|a| matches!(a, Action::FetchToken))
}

/// Answers the pending `FetchToken` with `token`; returns the register sent.
fn give_token(h: &mut H, token: &str) -> connector_proto::RegisterRequest {
    h.sm.handle_token(h.now, Ok(crate::Secret::new(token)));
    let actions = h.take_actions();
    actions
        .iter()
        .find_map(register_of)
        .cloned()
        .expect("a token opens the stream")
}

fn reject_now(h: &mut H, reason: RejectReason) {
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Rejected as i32,
        reject_reason: reason as i32,
        message: "bad token".into(),
        ..Default::default()
    })));
}

#[test]
fn a_token_source_is_asked_before_every_register() {
    let mut h = with_token_source();
    h.sm.handle_start(h.now);
    let actions = h.take_actions();
    assert!(asks_for_token(&actions), "{actions:?}");
    assert!(actions.iter().all(|a| register_of(a).is_none()));
    assert_eq!(h.sm.state(), &RegistrationState::Connecting);
    assert_eq!(give_token(&mut h, "tok-1").auth_token, "tok-1");
    h.sm.handle_stream_opened(h.now);
    h.recv(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        session_token: "sess-1".into(),
        ..Default::default()
    })));
    // Lost stream: the reconnect asks again and carries the new token
    // beside the session token.
    h.sm.handle_stream_closed(h.now, None);
    h.advance(Duration::from_secs(2));
    assert!(asks_for_token(&h.take_actions()));
    let reg = give_token(&mut h, "tok-2");
    assert_eq!(
        (reg.auth_token.as_str(), reg.session_token.as_str()),
        ("tok-2", "sess-1")
    );
    // SESSION_EXPIRED: asked again at once, no session token.
    h.sm.handle_stream_opened(h.now);
    reject_now(&mut h, RejectReason::SessionExpired);
    assert!(asks_for_token(&h.take_actions()));
    let reg = give_token(&mut h, "tok-3");
    assert_eq!(
        (reg.auth_token.as_str(), reg.session_token.as_str()),
        ("tok-3", "")
    );
}

#[test]
fn a_token_source_error_backs_off_with_a_clear_cause() {
    let mut h = with_token_source();
    h.sm.handle_start(h.now);
    h.take_actions();
    h.sm.handle_token(h.now, Err("token file /x: cannot read: not found"));
    h.pump();
    assert!(
        matches!(h.sm.state(), RegistrationState::Backoff { .. }),
        "{:?}",
        h.sm.state()
    );
    assert!(h.events.iter().any(|e| matches!(e,
        RegistrationEvent::Disconnected { cause: DisconnectCause::Token(why) } if why.contains("cannot read")
    )), "{:?}", h.events);
    assert_eq!(h.sm.metrics_snapshot().connect_failures, 1);
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
    assert!(h.events.iter().any(|e| matches!(e,
        RegistrationEvent::Disconnected { cause: DisconnectCause::Token(why) } if why.contains("did not answer")
    )));
}

#[test]
fn invalid_credentials_is_retried_once_with_a_newer_token() {
    let mut h = with_token_source();
    h.sm.handle_start(h.now);
    h.take_actions();
    give_token(&mut h, "old");
    h.sm.handle_stream_opened(h.now);
    reject_now(&mut h, RejectReason::InvalidCredentials);
    let actions = h.take_actions();
    assert!(matches!(actions[0], Action::CloseStream), "{actions:?}");
    assert!(asks_for_token(&actions), "rechecks the source at once");
    assert_eq!(give_token(&mut h, "new").auth_token, "new");
    h.sm.handle_stream_opened(h.now);
    // Rejected again: the contract's rule applies (stop), even with yet
    // another token in the source.
    reject_now(&mut h, RejectReason::InvalidCredentials);
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
    let mut h = with_token_source();
    h.sm.handle_start(h.now);
    h.take_actions();
    give_token(&mut h, "same");
    h.sm.handle_stream_opened(h.now);
    reject_now(&mut h, RejectReason::InvalidCredentials);
    assert!(asks_for_token(&h.take_actions()));
    h.sm.handle_token(h.now, Ok(crate::Secret::new("same")));
    let actions = h.take_actions();
    assert!(
        actions.iter().all(|a| register_of(a).is_none()),
        "{actions:?}"
    );
    match h.sm.state() {
        RegistrationState::Stopped(StopReason::Rejected { reason, message }) => {
            assert_eq!(*reason, RejectReason::InvalidCredentials);
            assert_eq!(message, "bad token");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn shutdown_while_fetching_a_token_stops_and_drops_the_fetch() {
    let mut h = with_token_source();
    h.sm.handle_start(h.now);
    h.take_actions();
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
    h.sm.handle_start(h.now);
    let actions = h.take_actions();
    assert!(!asks_for_token(&actions));
    assert_eq!(
        register_of(&actions[0]).expect("register").auth_token,
        "secret-auth"
    );
}
