//! Faults over real loopback gRPC: no head-of-line stall, black holes and
//! GOAWAY survived. (Exactly-once under random faults, for both transports,
//! is in connector-testkit's `exactly_once` test.)

use std::sync::Arc;
use std::time::Duration;

use connector_core::{
    MultiConnectorRunner, MultiTransportOptions, RegistrationEvent, RegistrationState,
};
use connector_grpc::GrpcTransport;
use connector_testkit::connectors::{Counting, Sleep};
use connector_testkit::harness::{fast_options, json_execute, key, registrations, Running, WAIT};
use connector_testkit::{GrpcServerOptions, GrpcTestServer, TestServer};
use tokio::time::timeout;

/// Long enough to outlast any test: a request that never finishes by itself.
const BLOCK: &str = r#"{"ms":3600000}"#;

/// `n` registrations of a worker that echoes, and for `{"ms": N}` waits N
/// ms first (an hour: "blocks"), running over gRPC.
fn start(n: usize, options: MultiTransportOptions) -> Running {
    let worker = Arc::new(Counting::new(Sleep::new(Duration::ZERO)));
    Running::start(MultiConnectorRunner::new(
        registrations(n, worker),
        options,
        GrpcTransport::new(),
    ))
}

/// One registration whose handler never returns does not stall the other
/// 79 streams of its channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_handler_does_not_stall_its_channel() {
    const N: usize = 80;
    let engine = TestServer::new();
    let server = GrpcTestServer::start(engine.clone(), GrpcServerOptions::default())
        .await
        .expect("server");
    let running = start(
        N,
        fast_options(&server.url())
            .max_concurrent_requests(2)
            // Shutdown cancels what never ends after this long.
            .drain_timeout(Duration::from_millis(500))
            .build()
            .expect("valid"),
    );
    engine.wait_for_active(N, WAIT).await.expect("all active");
    assert_eq!(server.connection_count(), 1);
    // Fill w0's slots and its queue with work that never ends.
    let blocked: Vec<_> = (0..50)
        .map(|i| {
            engine
                .send_execute(&key(0), json_execute(&format!("b{i}"), "block", BLOCK))
                .expect("sent")
        })
        .collect();
    for round in 0..5 {
        let mut answers = Vec::new();
        for i in 1..N {
            let request = json_execute(&format!("e{round}-{i}"), "echo", "{\"x\":1}");
            answers.push(engine.send_execute(&key(i), request).expect("sent"));
        }
        for a in answers {
            assert!(a.wait(WAIT).await.expect("answered").success);
        }
    }
    // The blocked registration still reads its stream: a cancel reaches it.
    engine.cancel(&key(0), "b0").expect("cancel");
    let r = blocked
        .into_iter()
        .next()
        .expect("one")
        .wait(WAIT)
        .await
        .expect("cancelled answer");
    assert!(!r.success);
    running.stop().await.expect("clean stop");
}

/// A server that accepts TCP and never answers: the registration times out
/// the connect and backs off, and comes up once a real server is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_server_times_out_and_backs_off() {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = hole.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            sockets.push(s);
        }
    });
    let running = start(
        2,
        fast_options(&format!("grpc://{addr}"))
            .connect_timeout(Duration::from_millis(300))
            .build()
            .expect("valid"),
    );
    let handle = running.runner().registration(&key(0)).expect("hosted");
    let mut states = handle.watch_state();
    timeout(WAIT, async {
        loop {
            if handle.metrics().connect_failures >= 2 {
                break;
            }
            states.changed().await.expect("driver alive");
        }
    })
    .await
    .expect("repeated connect timeouts");
    assert!(matches!(
        handle.state(),
        RegistrationState::Backoff { .. } | RegistrationState::Connecting
    ));
    running.stop().await.expect("clean stop");
    held.abort();
}

/// The server stops (GOAWAY to every connection) and comes back: all
/// registrations return, each reconnect counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_and_restart_bring_everyone_back() {
    const N: usize = 20;
    let engine = TestServer::new();
    let server = GrpcTestServer::start(engine.clone(), GrpcServerOptions::default())
        .await
        .expect("server");
    let running = start(N, fast_options(&server.url()).build().expect("valid"));
    let runner = running.runner();
    engine.wait_for_active(N, WAIT).await.expect("all active");
    // The client side too: an approval still in flight when the server
    // restarts would make the next one a first approval, not a reconnect.
    for key in runner.registrations() {
        runner
            .registration(&key)
            .expect("hosted")
            .wait_for(WAIT, |s| *s == RegistrationState::Active)
            .await
            .expect("active on the client");
    }
    let mut events: Vec<_> = runner
        .registrations()
        .iter()
        .map(|k| runner.registration(k).expect("hosted").events())
        .collect();
    server.restart().await.expect("restart");
    for rx in &mut events {
        timeout(WAIT, async {
            loop {
                match rx.recv().await {
                    Ok(RegistrationEvent::Approved { reconnect: true }) => break,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "every registration reconnected: {:#?}\n{:?}\n{:?}",
                runner.metrics_snapshot(),
                runner.summary(),
                engine.stats()
            )
        });
    }
    for m in runner.metrics_snapshot().values() {
        assert_eq!(m.successful_reconnects, 1, "{m:?}");
    }
    engine.wait_for_active(N, WAIT).await.expect("all back");
    assert_eq!(engine.stats().duplicate_active, 0);
    running.stop().await.expect("clean stop");
}
