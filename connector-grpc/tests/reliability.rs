//! Faults over real loopback gRPC: no head-of-line stall, black holes and
//! GOAWAY survived. (Exactly-once under random faults, for both transports,
//! is in connector-testkit's `exactly_once` test.)

use std::time::Duration;

use connector_core::proto::{ExecuteRequest, PayloadEncoding};
use connector_core::{
    ConnectorConfig, ConnectorError, ConnectorRegistration, MultiConnectorRunner,
    MultiTransportOptions, RegistrationEvent, RegistrationKey, RegistrationState,
};
use connector_grpc::GrpcTransport;
use connector_testkit::connectors::{Counting, Sleep};
use connector_testkit::{GrpcServerOptions, GrpcTestServer, TestServer};
use tokio::task::JoinHandle;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(30);

/// Echoes; `{"ms": N}` waits N ms first (an hour: "blocks"); counts runs.
type Worker = Counting<Sleep>;

/// Long enough to outlast any test: a request that never finishes by itself.
const BLOCK: &str = r#"{"ms":3600000}"#;

fn options(url: &str) -> connector_core::MultiTransportOptionsBuilder {
    MultiTransportOptions::builder(url)
        .connect_timeout(Duration::from_secs(2))
        .reconnect_delay(Duration::from_millis(20))
        .jitter(Duration::from_millis(30))
        .max_backoff(Duration::from_millis(300))
        .heartbeat_interval(Duration::from_millis(200))
        .heartbeat_timeout(Duration::from_secs(2))
        .drain_timeout(Duration::from_secs(5))
        .jitter_seed(Some(11))
}

fn runner(n: usize, options: MultiTransportOptions, worker: Worker) -> MultiConnectorRunner {
    let regs = (0..n)
        .map(|i| {
            ConnectorRegistration::new(
                ConnectorConfig::builder("acme", "worker", format!("w{i}"))
                    .build()
                    .expect("valid config"),
                worker.clone(),
            )
        })
        .collect();
    MultiConnectorRunner::new(regs, options, GrpcTransport::new())
}

fn start(runner: &MultiConnectorRunner) -> JoinHandle<Result<(), ConnectorError>> {
    let r = runner.clone();
    tokio::spawn(async move { r.run().await })
}

async fn stop(runner: &MultiConnectorRunner, run: JoinHandle<Result<(), ConnectorError>>) {
    runner.shutdown_handle().shutdown();
    timeout(WAIT, run)
        .await
        .expect("run() returns after shutdown")
        .expect("no panic")
        .expect("clean stop");
}

fn request(id: &str, capability: &str, payload: &str) -> ExecuteRequest {
    ExecuteRequest {
        request_id: id.into(),
        payload: payload.as_bytes().to_vec().into(),
        encoding: PayloadEncoding::Json as i32,
        capability_id: capability.into(),
        ..Default::default()
    }
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
    let runner = runner(
        N,
        options(&server.url())
            .max_concurrent_requests(2)
            // Shutdown cancels what never ends after this long.
            .drain_timeout(Duration::from_millis(500))
            .build()
            .expect("valid"),
        Counting::new(Sleep::new(Duration::ZERO)),
    );
    let run = start(&runner);
    engine.wait_for_active(N, WAIT).await.expect("all active");
    assert_eq!(server.connection_count(), 1);
    // Fill w0's slots and its queue with work that never ends.
    let blocked: Vec<_> = (0..50)
        .map(|i| {
            engine
                .send_execute(
                    &"acme.worker.w0".parse().expect("a key"),
                    request(&format!("b{i}"), "block", BLOCK),
                )
                .expect("sent")
        })
        .collect();
    for round in 0..5 {
        let mut answers = Vec::new();
        for i in 1..N {
            let key = format!("acme.worker.w{i}").parse().expect("a key");
            answers.push(
                engine
                    .send_execute(&key, request(&format!("e{round}-{i}"), "echo", "{\"x\":1}"))
                    .expect("sent"),
            );
        }
        for a in answers {
            assert!(a.wait(WAIT).await.expect("answered").success);
        }
    }
    // The blocked registration still reads its stream: a cancel reaches it.
    engine
        .cancel(&"acme.worker.w0".parse().expect("a key"), "b0")
        .expect("cancel");
    let r = blocked
        .into_iter()
        .next()
        .expect("one")
        .wait(WAIT)
        .await
        .expect("cancelled answer");
    assert!(!r.success);
    stop(&runner, run).await;
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
    let runner = runner(
        2,
        options(&format!("grpc://{addr}"))
            .connect_timeout(Duration::from_millis(300))
            .build()
            .expect("valid"),
        Counting::new(Sleep::new(Duration::ZERO)),
    );
    let run = start(&runner);
    let key = RegistrationKey::new("acme", "worker", "w0").expect("valid");
    let handle = runner.registration(&key).expect("hosted");
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
    stop(&runner, run).await;
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
    let runner = runner(
        N,
        options(&server.url()).build().expect("valid"),
        Counting::new(Sleep::new(Duration::ZERO)),
    );
    let run = start(&runner);
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
    stop(&runner, run).await;
}
