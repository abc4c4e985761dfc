//! The whole SDK over gRPC: `MultiConnectorRunner` + `GrpcTransport`
//! against the testkit's gRPC server on loopback sockets.

use std::sync::Arc;
use std::time::Duration;

use connector_core::{
    DisconnectCause, MultiConnectorRunner, MultiTransportOptions, RegistrationEvent,
    RegistrationKey, RegistrationState,
};
use connector_grpc::GrpcTransport;
use connector_testkit::connectors::Echo;
use connector_testkit::harness::{fast_options, json_execute, key, registrations, Running, WAIT};
use connector_testkit::{GrpcServerOptions, GrpcTestServer, TestCertificate, TestServer};
use tokio::time::timeout;

fn runner(n: usize, options: MultiTransportOptions) -> MultiConnectorRunner {
    MultiConnectorRunner::new(
        registrations(n, Arc::new(Echo)),
        options,
        GrpcTransport::new(),
    )
}

/// Stops cleanly, and no connection outlives `run()`.
async fn stop(running: Running) {
    let runner = running.runner().clone();
    running.stop().await.expect("clean stop");
    assert_eq!(runner.summary().transport.open_connections(), 0);
}

async fn grpc_server(opts: GrpcServerOptions) -> (TestServer, GrpcTestServer) {
    let engine = TestServer::new();
    let server = GrpcTestServer::start(engine.clone(), opts)
        .await
        .expect("server starts");
    (engine, server)
}

async fn wait_all_active(runner: &MultiConnectorRunner) {
    for key in runner.registrations() {
        runner
            .registration(&key)
            .expect("hosted")
            .wait_for(WAIT, |s| *s == RegistrationState::Active)
            .await
            .unwrap_or_else(|| panic!("{key} not active"));
    }
}

/// The registration `key` echoes request `id`.
async fn echo(engine: &TestServer, key: &RegistrationKey, id: &str) {
    let request = json_execute(id, "echo", &format!("{{\"id\":\"{id}\"}}"));
    let resp = timeout(WAIT, engine.execute(key, request.clone()))
        .await
        .expect("answered in time")
        .expect("answered");
    assert!(resp.success, "{resp:?}");
    assert_eq!(resp.payload, request.payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_registrations_share_three_connections_and_echo() {
    let (engine, server) = grpc_server(GrpcServerOptions::default()).await;
    let running = Running::start(runner(
        200,
        fast_options(&server.url()).build().expect("options"),
    ));
    let runner = running.runner().clone();

    engine.wait_for_active(200, WAIT).await.expect("200 active");
    wait_all_active(&runner).await;
    server
        .wait_for_connection_count(3, WAIT)
        .await
        .expect("3 connections");
    let transport = runner.summary().transport;
    assert_eq!(transport.open_connections(), 3, "{transport:?}");
    assert_eq!(transport.open_streams(), 200, "{transport:?}");
    assert_eq!(server.total_connections_accepted(), 3);

    let tasks: Vec<_> = runner
        .registrations()
        .into_iter()
        .map(|key| {
            let engine = engine.clone();
            tokio::spawn(async move { echo(&engine, &key, &format!("req-{key}")).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("echo task");
    }

    stop(running).await;
    server
        .wait_for_connection_count(0, WAIT)
        .await
        .expect("connections closed");
    let stats = engine.stats();
    assert!(stats.protocol_errors.is_empty(), "{stats:?}");
    assert_eq!(stats.duplicate_active, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cap_ten_with_thirty_five_registrations_uses_four_connections() {
    let (engine, server) = grpc_server(GrpcServerOptions::default()).await;
    let running = Running::start(runner(
        35,
        fast_options(&server.url())
            .max_streams_per_channel(10)
            .build()
            .expect("options"),
    ));
    let runner = running.runner().clone();
    engine.wait_for_active(35, WAIT).await.expect("35 active");
    server
        .wait_for_connection_count(4, WAIT)
        .await
        .expect("4 connections");
    assert_eq!(runner.summary().transport.open_connections(), 4);
    echo(&engine, &key(34), "last").await;
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_limit_below_the_cap_gets_every_registration_active() {
    let (engine, server) =
        grpc_server(GrpcServerOptions::default().max_concurrent_streams(5)).await;
    let running = Running::start(runner(
        12,
        fast_options(&server.url())
            .connect_timeout(Duration::from_secs(1))
            .build()
            .expect("options"),
    ));
    let runner = running.runner().clone();
    engine.wait_for_active(12, WAIT).await.expect("12 active");
    wait_all_active(&runner).await;
    server
        .wait_for_connection_count(3, WAIT)
        .await
        .expect("3 connections");
    for i in [0, 6, 11] {
        echo(&engine, &key(i), &format!("r{i}")).await;
    }
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_connection_recovers_its_registrations_and_leaves_others_alone() {
    let (engine, server) = grpc_server(GrpcServerOptions::default()).await;
    let running = Running::start(runner(
        15,
        fast_options(&server.url())
            .max_streams_per_channel(10)
            .build()
            .expect("options"),
    ));
    let runner = running.runner().clone();
    engine.wait_for_active(15, WAIT).await.expect("15 active");
    wait_all_active(&runner).await;
    server
        .wait_for_connection_count(2, WAIT)
        .await
        .expect("2 connections");

    let victim = server
        .connections()
        .into_iter()
        .find(|c| c.open_streams == 5)
        .expect("the connection with 5 streams");
    let victims: Vec<RegistrationKey> = engine
        .registrations()
        .into_iter()
        .filter(|r| r.connection_id == victim.connection_id)
        .map(|r| r.key.parse().expect("a key"))
        .collect();
    assert_eq!(victims.len(), 5);
    let registers_before = engine.stats().registers;
    assert!(server.kill_connection(victim.connection_id));

    engine
        .wait_until(WAIT, |e| {
            e.stats().registers >= registers_before + 5 && e.active_keys().len() == 15
        })
        .await
        .expect("the 5 re-registered");
    wait_all_active(&runner).await;
    for key in runner.registrations() {
        let m = runner.registration(&key).expect("hosted").metrics();
        if victims.contains(&key) {
            assert!(m.total_disconnects >= 1, "{key}: {m:?}");
            assert!(m.successful_reconnects >= 1, "{key}: {m:?}");
        } else {
            assert_eq!(m.total_disconnects, 0, "{key} was untouched: {m:?}");
        }
    }
    for v in &victims {
        echo(&engine, v, &format!("after-{v}")).await;
    }
    assert_eq!(runner.summary().transport.open_streams(), 15);
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_ca_is_a_tls_error_retried_with_backoff() {
    let served = TestCertificate::generate().expect("cert");
    let other = TestCertificate::generate().expect("cert");
    let (engine, server) = grpc_server(GrpcServerOptions::default().tls(served)).await;
    let dir = std::env::temp_dir().join(format!(
        "connector-grpc-runner-bad-ca-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let wrong = other.write_ca_pem(&dir).expect("ca");
    let runner = runner(
        1,
        fast_options(&server.url())
            .ca_cert(wrong)
            .build()
            .expect("options"),
    );
    let mut events = runner.registration(&key(0)).expect("hosted").events();
    let running = Running::start(runner);

    // Two failed opens that name TLS, with a backoff between them.
    let mut tls_failures = 0;
    let mut backoffs = 0;
    timeout(WAIT, async {
        while tls_failures < 2 || backoffs < 1 {
            match events.recv().await {
                Ok(RegistrationEvent::Disconnected {
                    cause: DisconnectCause::OpenFailed(msg),
                }) => {
                    assert!(msg.to_lowercase().contains("tls"), "{msg}");
                    tls_failures += 1;
                }
                Ok(RegistrationEvent::BackingOff { .. }) => backoffs += 1,
                Ok(_) => {}
                Err(e) => panic!("event stream: {e}"),
            }
        }
    })
    .await
    .expect("retries in time");
    assert!(engine.registrations().is_empty());
    assert!(
        !running.is_finished(),
        "a TLS failure does not end the runner"
    );
    stop(running).await;
    let _ = std::fs::remove_dir_all(dir);
}
