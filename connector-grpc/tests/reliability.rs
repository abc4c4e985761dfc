//! Faults over real loopback gRPC: no head-of-line stall on a shared
//! channel, GOAWAY survived on one replacement connection. (The black-hole
//! server, exactly-once under random faults and the restart story for
//! every transport are conformance stories.)

mod fleet;

use std::sync::Arc;
use std::time::Duration;

use connector_core::proto::ExecuteErrorKind;
use connector_core::{MultiTransportOptionsBuilder, RegistrationEvent};
use connector_testkit::connectors::{Counting, Sleep};
use connector_testkit::harness::{json_execute, key, WAIT};
use connector_testkit::GrpcServerOptions;
use fleet::Fleet;
use tokio::time::timeout;

/// Long enough to outlast any test: a request that never finishes by itself.
const BLOCK: &str = r#"{"ms":3600000}"#;

/// `n` registrations of a worker that echoes, and for `{"ms": N}` waits N
/// ms first (an hour: "blocks"), every one active over gRPC.
async fn start(
    n: usize,
    tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
) -> Fleet {
    let worker = Arc::new(Counting::new(Sleep::new(Duration::ZERO)));
    Fleet::start(n, GrpcServerOptions::default(), worker, tune).await
}

/// One registration whose handler never returns does not stall the other
/// 79 streams of its channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_handler_does_not_stall_its_channel() {
    const N: usize = 80;
    let f = start(N, |o| {
        o.max_concurrent_requests(2)
            // Shutdown cancels what never ends after this long.
            .drain_timeout(Duration::from_millis(500))
    })
    .await;
    assert_eq!(f.server.connection_count(), 1, "one channel carries all");
    // Fill w0's slots and its queue with work that never ends.
    let blocked: Vec<_> = (0..50)
        .map(|i| {
            f.engine
                .send_execute(&key(0), json_execute(&format!("b{i}"), "block", BLOCK))
                .expect("sent")
        })
        .collect();
    for round in 0..5 {
        let mut answers = Vec::new();
        for i in 1..N {
            let request = json_execute(&format!("e{round}-{i}"), "echo", "{\"x\":1}");
            answers.push((
                request.payload.clone(),
                f.engine.send_execute(&key(i), request).expect("sent"),
            ));
        }
        for (payload, a) in answers {
            let r = a.wait(WAIT).await.expect("answered");
            assert!(r.success, "{r:?}");
            assert_eq!(r.payload, payload, "{r:?}");
        }
    }
    // The blocked registration still reads its stream: a cancel reaches it.
    f.engine.cancel(&key(0), "b0").expect("cancel");
    let r = blocked
        .into_iter()
        .next()
        .expect("one")
        .wait(WAIT)
        .await
        .expect("cancelled answer");
    assert!(!r.success, "{r:?}");
    assert_eq!(r.error_kind(), ExecuteErrorKind::Cancelled, "{r:?}");
    f.stop().await;
}

/// The server stops (GOAWAY to every connection) and comes back: all
/// registrations return, each reconnect counted once, on one new
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_and_restart_bring_everyone_back() {
    const N: usize = 20;
    // Every registration active on the client too: an approval still in
    // flight when the server restarts would make the next one a first
    // approval, not a reconnect.
    let f = start(N, |o| o).await;
    assert_eq!(f.server.total_connections_accepted(), 1);
    let runner = f.runner();
    let mut events: Vec<_> = runner
        .registrations()
        .iter()
        .map(|k| runner.registration(k).expect("hosted").events())
        .collect();
    f.server.restart().await.expect("restart");
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
                f.engine.stats()
            )
        });
    }
    for m in runner.metrics_snapshot().values() {
        assert_eq!(m.successful_reconnects, 1, "{m:?}");
    }
    f.engine.wait_for_active(N, WAIT).await.expect("all back");
    assert_eq!(f.engine.stats().duplicate_active, 0);
    f.server
        .wait_for_connection_count(1, WAIT)
        .await
        .expect("one connection again");
    assert_eq!(runner.summary().transport.open_connections(), 1);
    assert_eq!(f.server.total_connections_accepted(), 2, "one replacement");
    f.stop().await;
}
