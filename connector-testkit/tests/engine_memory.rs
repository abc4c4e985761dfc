//! The engine through the in-memory mux, with the test playing the client:
//! every protocol rule of the server side, on paused tokio time where time
//! matters.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod support;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use connector_core::{
    InboundStream, MessageStream, MultiTransportOptions, RegistrationKey, StreamMux, Transport,
    TransportErrorKind,
};
use connector_testkit::proto::{Kind, RegistrationStatus, RejectReason, StreamMessage};
use connector_testkit::{
    ApprovalPolicy, CloseCause, MemoryMux, MemoryTransport, ServerEvent, TestServer, TestkitError,
};
use futures_util::StreamExt;
use support::wait_no_registrations;

const KEY: &str = "t1.echo.i1";

fn key() -> RegistrationKey {
    RegistrationKey::new("t1", "echo", "i1").unwrap()
}

async fn next(inbound: &mut InboundStream) -> StreamMessage {
    tokio::time::timeout(T, inbound.next())
        .await
        .expect("timed out waiting for a server message")
        .expect("stream ended")
        .expect("transport error")
}

async fn expect_end(inbound: &mut InboundStream) {
    match tokio::time::timeout(T, inbound.next()).await {
        Ok(None) => {}
        Ok(Some(m)) => panic!("expected the stream to end, got {m:?}"),
        Err(_) => panic!("timed out waiting for the stream to end"),
    }
}

async fn open(mux: &MemoryMux, msg: StreamMessage) -> MessageStream {
    mux.open(&key(), msg).await.unwrap()
}

/// The client drops its sender half: the stream ends, and the server lets
/// the registration go.
async fn client_half_closes(engine: &TestServer, s: MessageStream) {
    let MessageStream {
        outbound,
        mut inbound,
        ..
    } = s;
    drop(outbound);
    expect_end(&mut inbound).await;
    wait_no_registrations(engine).await;
}

/// Whether the engine saw a stream close with a cause that `is`.
fn saw_close(engine: &TestServer, is: impl Fn(&CloseCause) -> bool) -> bool {
    engine
        .events()
        .iter()
        .any(|e| matches!(e, ServerEvent::StreamClosed { cause, .. } if is(cause)))
}

/// Waits (bounded) until the in-memory mux holds no connection.
async fn wait_no_connections(engine: &TestServer, mux: &MemoryMux) {
    engine
        .wait_until(T, |_| mux.stats().open_connections() == 0)
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", mux.stats()));
}

/// A fresh engine, `setup` on it, its in-memory mux, and a stream for `KEY`
/// opened with its register response.
async fn registered(
    setup: impl FnOnce(&TestServer),
) -> (
    TestServer,
    MemoryMux,
    MessageStream,
    connector_testkit::proto::RegisterResponse,
) {
    let engine = TestServer::new();
    setup(&engine);
    let mux = engine.memory_mux();
    let (s, r) = open_registered(&mux).await;
    (engine, mux, s, r)
}

/// Expects the next message to be the execute request `id`.
async fn expect_execute(s: &mut MessageStream, id: &str) {
    match next(&mut s.inbound).await.kind {
        Some(Kind::ExecuteRequest(r)) => assert_eq!(r.request_id, id),
        other => panic!("expected execute_request {id}, got {other:?}"),
    }
}

/// Opens a stream for `KEY` and returns it with its register response.
async fn open_registered(
    mux: &MemoryMux,
) -> (MessageStream, connector_testkit::proto::RegisterResponse) {
    let mut s = open(mux, register("t1", "echo", "i1")).await;
    let r = expect_register_response(next(&mut s.inbound).await);
    (s, r)
}

#[tokio::test]
async fn approve_by_default_with_token_and_address() {
    let (engine, mux, s, r) = registered(|engine| {
        engine.set_heartbeat_interval_ms(1500);
    })
    .await;
    assert_eq!(r.status, RegistrationStatus::Approved as i32);
    assert!(!r.session_token.is_empty());
    assert_eq!(r.address, KEY);
    assert_eq!(r.heartbeat_interval_ms, 1500);

    engine.wait_for_active(1, T).await.unwrap();
    assert_eq!(engine.active_keys(), vec![key()]);
    let regs = engine.registrations();
    assert_eq!(regs.len(), 1);
    assert_eq!(regs[0].transport, "memory");
    assert_eq!(regs[0].status, RegistrationStatus::Approved);
    assert_eq!(regs[0].connection_id, s.info.connection_id);
    assert_eq!(regs[0].register.version, "0.0.1-test");
    // Debug must not leak tokens.
    assert!(!format!("{:?}", regs[0]).contains("auth"));
    assert_eq!(mux.stats().open_connections(), 1);
    assert_eq!(mux.stats().open_streams(), 1);

    // Client half-close ends the stream and releases the "connection".
    client_half_closes(&engine, s).await;
    assert!(
        saw_close(&engine, |c| matches!(c, CloseCause::ClientClosed)),
        "{:?}",
        engine.events()
    );
    wait_no_connections(&engine, &mux).await;
}

#[tokio::test]
async fn token_is_stable_per_key() {
    let (_engine, mux, s1, r1) = registered(|_| {}).await;
    drop(s1);
    let (_s2, r2) = open_registered(&mux).await;
    assert_eq!(r1.session_token, r2.session_token);
}

#[tokio::test]
async fn pending_then_approve() {
    let (engine, _mux, mut s, r) = registered(|engine| {
        engine.set_policy(ApprovalPolicy::Pending);
    })
    .await;
    assert_eq!(r.status, RegistrationStatus::Pending as i32);
    assert!(r.session_token.is_empty());
    assert!(engine.active_keys().is_empty());
    assert_eq!(
        engine.registrations()[0].status,
        RegistrationStatus::Pending
    );
    // Not approved yet: executes have nowhere to go.
    assert!(matches!(
        engine.send_execute(&key(), exec_req("r0")),
        Err(TestkitError::NoSuchRegistration(_))
    ));

    engine.approve(&key()).expect("approve");
    match next(&mut s.inbound).await.kind {
        Some(Kind::ApprovalUpdate(u)) => {
            assert_eq!(u.status, RegistrationStatus::Approved as i32);
            assert!(!u.session_token.is_empty());
        }
        other => panic!("expected approval_update, got {other:?}"),
    }
    assert_eq!(engine.active_keys(), vec![key()]);
    assert!(
        matches!(engine.approve(&key()), Err(TestkitError::NotPending(k)) if k == KEY),
        "nothing pending any more"
    );
}

#[tokio::test]
async fn pending_then_reject_closes_the_stream() {
    let (engine, _mux, mut s, r) = registered(|engine| {
        engine.set_policy_for(&key(), ApprovalPolicy::Pending);
    })
    .await;
    assert_eq!(r.status, RegistrationStatus::Pending as i32);
    engine
        .reject(&key(), RejectReason::Denied, "no thanks")
        .expect("reject");
    match next(&mut s.inbound).await.kind {
        Some(Kind::ApprovalUpdate(u)) => {
            assert_eq!(u.status, RegistrationStatus::Rejected as i32);
            assert_eq!(u.reject_reason, RejectReason::Denied as i32);
            assert_eq!(u.message, "no thanks");
        }
        other => panic!("expected approval_update, got {other:?}"),
    }
    expect_end(&mut s.inbound).await;
    let again = engine.reject(&key(), RejectReason::Denied, "again");
    assert!(
        matches!(&again, Err(TestkitError::NotPending(k)) if k == KEY),
        "{again:?}"
    );
}

#[tokio::test]
async fn reject_policy_and_reject_once() {
    let (engine, mux, mut s, r) = registered(|engine| {
        engine.set_policy(ApprovalPolicy::Reject(RejectReason::InvalidCredentials));
    })
    .await;
    assert_eq!(r.status, RegistrationStatus::Rejected as i32);
    assert_eq!(r.reject_reason, RejectReason::InvalidCredentials as i32);
    expect_end(&mut s.inbound).await;

    engine.set_policy_for(
        &key(),
        ApprovalPolicy::RejectOnce(RejectReason::SessionExpired),
    );
    let (_s, r) = open_registered(&mux).await;
    assert_eq!(r.reject_reason, RejectReason::SessionExpired as i32);
    let (_s, r) = open_registered(&mux).await;
    assert_eq!(r.status, RegistrationStatus::Approved as i32);
    let rejected = engine
        .events()
        .iter()
        .filter(|e| matches!(e, ServerEvent::Rejected { .. }))
        .count();
    assert_eq!(rejected, 2);
}

#[tokio::test]
async fn issued_session_token_skips_pending() {
    let (engine, mux, s, r) = registered(|_| {}).await;
    let token = r.session_token;
    drop(s);
    engine.set_policy(ApprovalPolicy::Pending);

    let mut s = open(&mux, register_with_token("t1", "echo", "i1", &token)).await;
    let r = expect_register_response(next(&mut s.inbound).await);
    assert_eq!(r.status, RegistrationStatus::Approved as i32);
    assert_eq!(r.session_token, token);

    // A token the server never issued buys nothing.
    let mut s = open(&mux, register_with_token("t1", "echo", "i2", "forged")).await;
    let r = expect_register_response(next(&mut s.inbound).await);
    assert_eq!(r.status, RegistrationStatus::Pending as i32);
}

#[tokio::test]
async fn invalid_identifier_is_rejected_as_invalid_request() {
    let engine = TestServer::new();
    let mux = engine.memory_mux();
    let mut s = open(&mux, register("t1", "echo", "has space")).await;
    let r = expect_register_response(next(&mut s.inbound).await);
    assert_eq!(r.status, RegistrationStatus::Rejected as i32);
    assert_eq!(r.reject_reason, RejectReason::InvalidRequest as i32);
    assert!(r.message.contains("instance_id"), "{}", r.message);
    expect_end(&mut s.inbound).await;
}

#[tokio::test]
async fn heartbeats_are_acked_stalled_and_flagged() {
    let (engine, _mux, mut s, _) = registered(|_| {}).await;

    s.outbound.send(heartbeat(1, 1234)).await.unwrap();
    match next(&mut s.inbound).await.kind {
        Some(Kind::HeartbeatAck(a)) => {
            assert_eq!(
                (a.sequence, a.sent_at_unix_ms, a.should_reconnect),
                (1, 1234, false)
            );
        }
        other => panic!("expected heartbeat_ack, got {other:?}"),
    }

    // Stalled: heartbeat 2 is counted but not acked. Acks back on: the next
    // message the client sees is the ack of 3, which proves 2 got none.
    engine.set_ack_heartbeats(false);
    s.outbound.send(heartbeat(2, 0)).await.unwrap();
    engine
        .wait_until(T, |e| e.stats().heartbeats == 2)
        .await
        .unwrap();
    engine.set_ack_heartbeats(true);
    engine
        .ack_should_reconnect(&key())
        .expect("ack_should_reconnect");
    s.outbound.send(heartbeat(3, 0)).await.unwrap();
    s.outbound.send(heartbeat(4, 0)).await.unwrap();
    match next(&mut s.inbound).await.kind {
        Some(Kind::HeartbeatAck(a)) => assert_eq!((a.sequence, a.should_reconnect), (3, true)),
        other => panic!("expected heartbeat_ack, got {other:?}"),
    }
    match next(&mut s.inbound).await.kind {
        Some(Kind::HeartbeatAck(a)) => assert_eq!((a.sequence, a.should_reconnect), (4, false)),
        other => panic!("expected heartbeat_ack, got {other:?}"),
    }
    let nobody = engine.ack_should_reconnect(&"t1.echo.nobody".parse().expect("a key"));
    assert!(
        matches!(&nobody, Err(TestkitError::NoSuchRegistration(k)) if k == "t1.echo.nobody"),
        "{nobody:?}"
    );
}

#[tokio::test]
async fn execute_roundtrip_with_the_test_as_client() {
    let (engine, _mux, mut s, _) = registered(|_| {}).await;

    let pending = engine.send_execute(&key(), exec_req("r1")).unwrap();
    assert_eq!(pending.request_id(), "r1");
    assert_eq!(engine.stats().outstanding, 1);
    // The same id cannot be outstanding twice.
    assert!(matches!(
        engine.send_execute(&key(), exec_req("r1")),
        Err(TestkitError::Protocol(_))
    ));
    match next(&mut s.inbound).await.kind {
        Some(Kind::ExecuteRequest(r)) => {
            assert_eq!(r.request_id, "r1");
            assert_eq!(r.capability_id, "echo");
        }
        other => panic!("expected execute_request, got {other:?}"),
    }
    s.outbound.send(exec_resp("r1")).await.unwrap();
    let resp = pending.wait(T).await.unwrap();
    assert!(resp.success);
    assert_eq!(resp.payload, br#"{"ok":true}"#.to_vec());

    // `execute` is the same, awaited in place; the client answers concurrently.
    let client = tokio::spawn(async move {
        let m = next(&mut s.inbound).await;
        let Some(Kind::ExecuteRequest(r)) = m.kind else {
            panic!("expected execute_request, got {m:?}");
        };
        s.outbound.send(exec_resp(&r.request_id)).await.unwrap();
        s
    });
    let resp = tokio::time::timeout(T, engine.execute(&key(), exec_req("r2")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.request_id, "r2");
    let _s = client.await.unwrap();

    let st = engine.stats();
    assert_eq!(
        (st.executes_sent, st.responses_received, st.outstanding),
        (2, 2, 0)
    );
    assert_eq!((st.duplicate_responses, st.unknown_responses), (0, 0));
    assert!(st.protocol_errors.is_empty(), "{:?}", st.protocol_errors);
}

#[tokio::test]
async fn duplicate_and_unknown_responses_are_counted() {
    let (engine, _mux, mut s, _) = registered(|engine| {
        engine.expect_protocol_errors();
    })
    .await;
    let pending = engine.send_execute(&key(), exec_req("r1")).unwrap();
    expect_execute(&mut s, "r1").await;
    s.outbound.send(exec_resp("r1")).await.unwrap();
    s.outbound.send(exec_resp("r1")).await.unwrap();
    s.outbound.send(exec_resp("never-sent")).await.unwrap();
    pending.wait(T).await.unwrap();
    engine
        .wait_until(T, |e| e.stats().responses_received == 3)
        .await
        .unwrap();
    let st = engine.stats();
    assert_eq!(st.duplicate_responses, 1);
    assert_eq!(st.unknown_responses, 1);
    assert_eq!(st.outstanding, 0);
}

#[tokio::test]
async fn late_response_on_a_later_stream_of_the_key_counts() {
    let (engine, mux, mut s1, r) = registered(|_| {}).await;
    let pending = engine.send_execute(&key(), exec_req("late")).unwrap();
    assert!(matches!(
        next(&mut s1.inbound).await.kind,
        Some(Kind::ExecuteRequest(_))
    ));

    // The first stream dies with the request in flight; it stays pending.
    client_half_closes(&engine, s1).await;
    assert_eq!(engine.stats().outstanding, 1);

    // The client reconnects and delivers the answer over the new stream.
    let mut s2 = open(
        &mux,
        register_with_token("t1", "echo", "i1", &r.session_token),
    )
    .await;
    let r2 = expect_register_response(next(&mut s2.inbound).await);
    assert_eq!(r2.status, RegistrationStatus::Approved as i32);
    s2.outbound.send(exec_resp("late")).await.unwrap();
    let resp = pending.wait(T).await.unwrap();
    assert_eq!(resp.request_id, "late");
    let st = engine.stats();
    assert_eq!(
        (st.outstanding, st.duplicate_responses, st.unknown_responses),
        (0, 0, 0)
    );
    let answered_on = engine.events().into_iter().find_map(|e| match e {
        ServerEvent::ExecuteAnswered { stream_id, .. } => Some(stream_id),
        _ => None,
    });
    assert_eq!(answered_on, Some(engine.registrations()[0].stream_id));
}

#[tokio::test]
async fn server_actions_reach_the_client() {
    let (engine, _mux, mut s, _) = registered(|_| {}).await;

    engine.cancel(&key(), "r9").expect("cancel");
    assert!(
        matches!(next(&mut s.inbound).await.kind, Some(Kind::Cancel(c)) if c.request_id == "r9")
    );
    engine.drain(&key(), "deploy", 250).expect("drain");
    match next(&mut s.inbound).await.kind {
        Some(Kind::Drain(d)) => {
            assert_eq!((d.reason.as_str(), d.reconnect_after_ms), ("deploy", 250))
        }
        other => panic!("expected drain, got {other:?}"),
    }
    let raw = StreamMessage {
        kind: Some(Kind::MetricsReport(Box::default())),
    };
    engine.send_raw(&key(), raw.clone()).expect("send_raw");
    assert_eq!(next(&mut s.inbound).await, raw);

    engine.close_stream(&key()).expect("close_stream");
    expect_end(&mut s.inbound).await;
    assert!(
        engine.registrations().is_empty(),
        "closing streams are not live"
    );
    // Nothing to steer any more: each call names the missing key.
    for (call, result) in [
        ("close_stream", engine.close_stream(&key())),
        ("cancel", engine.cancel(&key(), "r9")),
        ("drain", engine.drain(&key(), "x", 0)),
        ("send_raw", engine.send_raw(&key(), raw)),
    ] {
        assert!(
            matches!(&result, Err(TestkitError::NoSuchRegistration(k)) if k == KEY),
            "{call}: {result:?}"
        );
    }
}

#[tokio::test]
async fn close_all_streams_counts() {
    let engine = TestServer::new();
    let mux = engine.memory_mux();
    let mut a = open(&mux, register("t1", "echo", "a")).await;
    let mut b = open(&mux, register("t1", "echo", "b")).await;
    engine.wait_for_active(2, T).await.unwrap();
    assert_eq!(engine.close_all_streams(), 2);
    let _ = next(&mut a.inbound).await;
    let _ = next(&mut b.inbound).await;
    expect_end(&mut a.inbound).await;
    expect_end(&mut b.inbound).await;
    wait_no_connections(&engine, &mux).await;
}

#[tokio::test]
async fn protocol_errors_are_recorded_not_fatal_to_the_server() {
    let engine = TestServer::new();
    engine.expect_protocol_errors();
    let mux = engine.memory_mux();

    // First message is not a register: recorded, stream closed.
    let mut s = open(&mux, heartbeat(1, 0)).await;
    expect_end(&mut s.inbound).await;

    // Wrong direction and a second register: recorded, stream stays up.
    let (mut s, _) = open_registered(&mux).await;
    s.outbound
        .send(StreamMessage {
            kind: Some(Kind::Cancel(Box::default())),
        })
        .await
        .unwrap();
    s.outbound.send(register("t1", "echo", "i1")).await.unwrap();
    s.outbound.send(StreamMessage { kind: None }).await.unwrap();
    s.outbound
        .send(StreamMessage {
            kind: Some(Kind::MetricsReport(Box::default())),
        })
        .await
        .unwrap();
    engine
        .wait_until(T, |e| e.stats().metrics_reports == 1)
        .await
        .unwrap();
    let st = engine.stats();
    assert_eq!(st.protocol_errors.len(), 4, "{:?}", st.protocol_errors);
    assert!(st.protocol_errors[0].contains("first message was heartbeat"));
    assert_eq!(st.registers, 2);
    s.outbound.send(heartbeat(5, 0)).await.unwrap();
    assert!(matches!(
        next(&mut s.inbound).await.kind,
        Some(Kind::HeartbeatAck(_))
    ));
}

#[tokio::test]
async fn duplicate_active_streams_are_counted() {
    let (engine, mux, _a, _) = registered(|_| {}).await;
    let (_b, _) = open_registered(&mux).await;
    assert_eq!(engine.stats().duplicate_active, 1);
    assert_eq!(engine.active_keys().len(), 1);
    assert_eq!(engine.registrations().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn mux_fault_knobs() {
    let engine = TestServer::new();
    let mux = engine.memory_mux();

    mux.fail_next_opens(2);
    for _ in 0..2 {
        let e = mux
            .open(&key(), register("t1", "echo", "i1"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), TransportErrorKind::Connect);
    }
    let (_s, r) = open_registered(&mux).await;
    assert_eq!(r.status, RegistrationStatus::Approved as i32);
    assert_eq!(
        (mux.stats().dials_failed, mux.stats().dials_succeeded),
        (2, 1)
    );

    // A slow dial takes exactly the delay on the (paused) clock.
    mux.set_open_delay(Duration::from_secs(3));
    let t0 = tokio::time::Instant::now();
    let _s2 = open(&mux, register("t1", "echo", "i2")).await;
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
    mux.set_open_delay(Duration::ZERO);

    // A black hole never answers; only the caller's timeout ends the dial.
    mux.set_black_hole(true);
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        mux.open(&key(), register("t1", "echo", "i3")),
    )
    .await;
    assert!(r.is_err(), "black-holed open must not complete");
    mux.set_black_hole(false);

    // Paused time: waits time out virtually, instantly.
    let err = engine
        .wait_for_active(5, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, TestkitError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn kill_connection_fails_both_sides() {
    let (engine, mux, mut s, _) = registered(|_| {}).await;
    assert_eq!(mux.connection_ids(), vec![s.info.connection_id]);
    assert!(mux.kill_connection(s.info.connection_id));
    let err = tokio::time::timeout(T, s.inbound.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Closed);
    wait_no_registrations(&engine).await;
    assert!(
        saw_close(&engine, |c| matches!(c, CloseCause::Error(_))),
        "{:?}",
        engine.events()
    );
    wait_no_connections(&engine, &mux).await;
    assert!(!mux.kill_connection(s.info.connection_id));
}

#[tokio::test]
async fn memory_transport_hands_out_the_mux() {
    let engine = TestServer::new();
    let transport = MemoryTransport::new(engine.memory_mux());
    let opts = MultiTransportOptions::builder("grpc://127.0.0.1:1")
        .build()
        .unwrap();
    let mux: Arc<dyn StreamMux> = transport.mux(&opts).await.unwrap();
    let mut s = mux
        .open(&key(), register("t1", "echo", "i1"))
        .await
        .unwrap();
    let r = expect_register_response(next(&mut s.inbound).await);
    assert_eq!(r.status, RegistrationStatus::Approved as i32);
    assert_eq!(transport.memory_mux().stats().open_connections(), 1);
}

#[tokio::test]
async fn an_unexpected_client_protocol_error_fails_the_next_call_and_verify() {
    let (engine, _mux, mut s, _) = registered(|_| {}).await;
    engine.verify().unwrap();
    let pending = engine.send_execute(&key(), exec_req("r1")).unwrap();
    expect_execute(&mut s, "r1").await;
    s.outbound.send(exec_resp("r1")).await.unwrap();
    s.outbound.send(exec_resp("r1")).await.unwrap();
    pending.wait(T).await.unwrap();
    // The wait itself fails on the duplicate, with the reason.
    let err = engine
        .wait_until(T, |e| e.stats().responses_received == 2)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TestkitError::ClientProtocolErrors(v) if v[0].contains("duplicate")),
        "{err}"
    );
    assert!(matches!(
        engine.send_execute(&key(), exec_req("r2")),
        Err(TestkitError::ClientProtocolErrors(_))
    ));
    assert!(matches!(
        engine.drain(&key(), "x", 0),
        Err(TestkitError::ClientProtocolErrors(_))
    ));
    assert!(engine.verify().is_err());
    // Said once, the same errors are only recorded.
    engine.expect_protocol_errors();
    engine.verify().unwrap();
    engine.drain(&key(), "x", 0).unwrap();
}

#[tokio::test]
async fn steering_calls_say_why_they_did_nothing() {
    let engine = TestServer::new();
    let mux = engine.memory_mux();
    assert!(matches!(
        engine.approve(&key()),
        Err(TestkitError::NotPending(k)) if k == KEY
    ));
    assert!(matches!(
        engine.close_stream(&key()),
        Err(TestkitError::NoSuchRegistration(k)) if k == KEY
    ));
    let (_s, _) = open_registered(&mux).await;
    // Approved already: nothing pending.
    assert!(matches!(
        engine.reject(&key(), RejectReason::Denied, "late"),
        Err(TestkitError::NotPending(_))
    ));
    engine.close_stream(&key()).unwrap();
}
