//! Driver tests against a server that sends legal messages with hostile
//! values (issue 11), and the heartbeat spread (issue 15 §3): the whole
//! runner + driver + state machine over the testkit's in-memory mux, on
//! paused tokio time. Counts over a window of virtual time are read at the
//! window's end; nothing waits on real time.

mod support;

use std::sync::Arc;
use std::time::Duration;

use connector_core::proto::{
    stream_message::Kind, ApprovalUpdate, ExecuteErrorKind, RegistrationStatus, RejectReason,
    StreamMessage,
};
use connector_core::{MultiTransportOptionsBuilder, RegistrationKey, RegistrationState};
use connector_testkit::connectors::Echo;
use connector_testkit::harness::{json_execute, Running};
use connector_testkit::{ApprovalPolicy, TestServer};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(60);

/// `n` echo registrations `t.echo.e0..` running over a fresh server, with
/// jitter seed 42, no metrics reports, and `tune` on top.
fn start(
    n: usize,
    tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
) -> (TestServer, Running) {
    let options = support::tuned(|b| tune(b.jitter_seed(Some(42)).metrics_report_interval(None)));
    let (server, _mux, running) = support::start(support::echoes(n, Arc::new(Echo)), options);
    (server, running)
}

fn key(i: usize) -> RegistrationKey {
    support::key_of("echo", &format!("e{i}"))
}

#[tokio::test(start_paused = true)]
async fn heartbeats_of_500_registrations_spread_over_the_interval() {
    let interval = Duration::from_secs(10);
    let (server, running) = start(500, |b| {
        b.heartbeat_interval(interval)
            .heartbeat_timeout(Duration::from_secs(60))
    });
    server.wait_for_active(500, WAIT).await.expect("all active");
    // Opened together (on paused time, at the same instant): with a fixed
    // ticker every tenth but one would be empty.
    let t0 = Instant::now();
    let mut buckets = Vec::new();
    let mut last = server.stats().heartbeats;
    for k in 1..=30u32 {
        tokio::time::sleep_until(t0 + interval * k / 10).await;
        let now = server.stats().heartbeats;
        buckets.push(now - last);
        last = now;
    }
    let total: u64 = buckets.iter().sum();
    assert!(total >= 1400, "about 3 beats each: {total}");
    let mean = total as f64 / buckets.len() as f64;
    for (i, b) in buckets.iter().enumerate() {
        let b = *b as f64;
        assert!(
            b <= 2.0 * mean && b >= mean / 2.0,
            "tenth {i}: {b} beats, mean {mean:.1}: {buckets:?}"
        );
    }
    running.stop().await.expect("clean stop");
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_interval_of_1ms_from_the_server_is_clamped() {
    let (server, running) = start(3, |b| b);
    server.set_heartbeat_interval_ms(1);
    server.wait_for_active(3, WAIT).await.expect("active");
    let before = server.stats().heartbeats;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let beats = server.stats().heartbeats - before;
    // At the 1 s floor: 3 or 4 per registration (was 4 263 from 3).
    assert!(
        beats <= 12,
        "{beats} heartbeats in 3 s from 3 registrations"
    );
    assert!(beats >= 6, "{beats}");
    running.stop().await.expect("clean stop");
}

#[tokio::test(start_paused = true)]
async fn session_expired_on_every_register_is_paced_by_the_backoff() {
    let (server, running) = start(1, |b| b);
    server.set_policy(ApprovalPolicy::Reject(RejectReason::SessionExpired));
    tokio::time::sleep(Duration::from_secs(60)).await;
    let registers = server.stats().registers;
    // 0.5 + 1 + 2 + 4 + 8 + 16 + 32 s (plus jitter): at most ~8 a minute
    // (was 5 437 in 5 s).
    assert!(
        (4..=10).contains(&registers),
        "{registers} registers in 60 s"
    );
    running.stop().await.expect("clean stop");
}

#[tokio::test(start_paused = true)]
async fn a_drain_of_49_days_waits_at_most_max_backoff() {
    let (server, running) = start(1, |b| {
        b.max_backoff(Duration::from_secs(2))
            .reconnect_delay(Duration::from_millis(100))
    });
    server.wait_for_active(1, WAIT).await.expect("active");
    let handle = running.runner().registration(&key(0)).expect("hosted");
    let t = Instant::now();
    server.drain(&key(0), "bye", u32::MAX).expect("drain");
    server
        .wait_until(WAIT, |_| handle.metrics().successful_reconnects >= 1)
        .await
        .expect("reconnected");
    assert!(
        t.elapsed() <= Duration::from_millis(2_100),
        "{:?}",
        t.elapsed()
    );
    running.stop().await.expect("clean stop");
}

#[tokio::test(start_paused = true)]
async fn an_unknown_reject_reason_is_retried_not_fatal() {
    let (server, running) = start(1, |b| b);
    server.set_policy(ApprovalPolicy::Pending);
    let handle = running.runner().registration(&key(0)).expect("hosted");
    handle
        .wait_for(WAIT, |s| *s == RegistrationState::PendingApproval)
        .await
        .expect("pending");
    server
        .send_raw(
            &key(0),
            StreamMessage {
                kind: Some(Kind::ApprovalUpdate(Box::new(ApprovalUpdate {
                    status: RegistrationStatus::Rejected as i32,
                    reject_reason: 99,
                    message: "a reason from the future".into(),
                    ..Default::default()
                }))),
            },
        )
        .expect("send_raw");
    handle
        .wait_for(WAIT, |s| matches!(s, RegistrationState::Backoff { .. }))
        .await
        .expect("backing off, not stopped");
    server.set_policy(ApprovalPolicy::Approve);
    handle
        .wait_for(WAIT, |s| *s == RegistrationState::Active)
        .await
        .expect("retried and approved");
    running.stop().await.expect("clean stop");
}

#[tokio::test(start_paused = true)]
async fn a_request_sent_right_after_a_drain_still_gets_an_answer() {
    let (server, running) = start(1, |b| b);
    // The server does not resend unanswered requests on the next stream:
    // the answer must come from the client.
    server.set_resend_on_reconnect(false);
    server.wait_for_active(1, WAIT).await.expect("active");
    // Drain (nothing in flight: the client closes at once) and a request
    // right behind it on the same stream.
    server.drain(&key(0), "bye", 0).expect("drain");
    let pending = server
        .send_execute(&key(0), json_execute("late", "", "{}"))
        .expect("sent");
    let answer = pending.wait(WAIT).await.expect("answered");
    assert_eq!(answer.request_id, "late");
    assert_eq!(answer.error_kind, ExecuteErrorKind::Overloaded as i32);
    assert_eq!(server.stats().duplicate_responses, 0);
    running.stop().await.expect("clean stop");
}
