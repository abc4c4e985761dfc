//! The whole SDK over gRPC: `MultiConnectorRunner` + `GrpcTransport`
//! against the testkit's gRPC server on loopback sockets. What is
//! specific to gRPC: many registrations share an HTTP/2 connection, up to
//! the client's stream cap and the server's stream limit, and a lost
//! connection is replaced by one. (The stories every transport shares are
//! in `conformance.rs`.)

mod fleet;

use std::sync::Arc;
use std::time::Duration;

use connector_core::{MultiTransportOptionsBuilder, RegistrationKey};
use connector_testkit::connectors::Echo;
use connector_testkit::harness::{json_execute, key, WAIT};
use connector_testkit::{GrpcServerOptions, TestServer};
use fleet::Fleet;
use tokio::time::timeout;

/// `n` echo registrations, every one active.
async fn echoes(
    n: usize,
    options: GrpcServerOptions,
    tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
) -> Fleet {
    Fleet::start(n, options, Arc::new(Echo), tune).await
}

/// The registration `key` echoes request `id`.
async fn echo(engine: &TestServer, key: &RegistrationKey, id: &str) {
    let request = json_execute(id, "echo", &format!("{{\"id\":\"{id}\"}}"));
    let resp = timeout(WAIT, engine.execute(key, request.clone()))
        .await
        .expect("answered in time")
        .expect("answered");
    assert!(resp.success, "{resp:?}");
    assert_eq!(resp.request_id, id);
    assert_eq!(resp.payload, request.payload);
}

/// `connections` server connections, the client's count agreeing, carrying
/// `streams` streams.
async fn assert_connections(f: &Fleet, connections: usize, streams: usize) {
    f.server
        .wait_for_connection_count(connections, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{connections} connections: {e}"));
    let transport = f.runner().summary().transport;
    assert_eq!(transport.open_connections(), connections, "{transport:?}");
    assert_eq!(transport.open_streams(), streams, "{transport:?}");
}

/// `n` echo registrations at most ten to a connection, every one active,
/// on `connections` connections.
async fn capped_at_ten(n: usize, connections: usize) -> Fleet {
    let f = echoes(n, GrpcServerOptions::default(), |o| {
        o.max_streams_per_channel(10)
    })
    .await;
    assert_connections(&f, connections, n).await;
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_registrations_share_three_connections_and_echo() {
    let f = echoes(200, GrpcServerOptions::default(), |o| o).await;
    assert_connections(&f, 3, 200).await;
    assert_eq!(f.server.total_connections_accepted(), 3);

    let tasks: Vec<_> = f
        .runner()
        .registrations()
        .into_iter()
        .map(|key| {
            let engine = f.engine.clone();
            tokio::spawn(async move { echo(&engine, &key, &format!("req-{key}")).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("echo task");
    }

    let engine = f.engine.clone();
    f.stop().await;
    let stats = engine.stats();
    assert!(stats.protocol_errors.is_empty(), "{stats:?}");
    assert_eq!(stats.duplicate_active, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cap_ten_with_thirty_five_registrations_uses_four_connections() {
    let f = capped_at_ten(35, 4).await;
    assert_eq!(f.server.total_connections_accepted(), 4);
    echo(&f.engine, &key(34), "last").await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_limit_below_the_cap_gets_every_registration_active() {
    let f = echoes(
        12,
        GrpcServerOptions::default().max_concurrent_streams(5),
        |o| o.connect_timeout(Duration::from_secs(1)),
    )
    .await;
    assert_connections(&f, 3, 12).await;
    for i in [0, 6, 11] {
        echo(&f.engine, &key(i), &format!("r{i}")).await;
    }
    f.stop().await;
}

/// The registrations of the killed connection (and only they) register
/// again, on one new connection: the stream accounting is as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_connection_recovers_its_registrations_and_leaves_others_alone() {
    let f = capped_at_ten(15, 2).await;

    let victim = f
        .server
        .connections()
        .into_iter()
        .find(|c| c.open_streams == 5)
        .expect("the connection with 5 streams");
    let victims: Vec<RegistrationKey> = f
        .engine
        .registrations()
        .into_iter()
        .filter(|r| r.connection_id == victim.connection_id)
        .map(|r| r.key.parse().expect("a key"))
        .collect();
    assert_eq!(victims.len(), 5);
    let registers_before = f.engine.stats().registers;
    assert!(f.server.kill_connection(victim.connection_id));

    f.engine
        .wait_until(WAIT, |e| {
            e.stats().registers >= registers_before + 5 && e.active_keys().len() == 15
        })
        .await
        .expect("the 5 re-registered");
    f.wait_all_active().await;
    assert_eq!(
        f.engine.stats().registers,
        registers_before + 5,
        "only the 5 registered again"
    );
    for key in f.runner().registrations() {
        let m = f.runner().registration(&key).expect("hosted").metrics();
        let lost = u64::from(victims.contains(&key));
        assert_eq!(m.total_disconnects, lost, "{key}: {m:?}");
        assert_eq!(m.successful_reconnects, lost, "{key}: {m:?}");
    }
    for v in &victims {
        echo(&f.engine, v, &format!("after-{v}")).await;
    }
    assert_connections(&f, 2, 15).await;
    assert_eq!(
        f.server.total_connections_accepted(),
        3,
        "one new connection"
    );
    f.stop().await;
}
