//! The whole SDK over WebSocket: `MultiConnectorRunner` + `WsTransport`
//! against the testkit's WebSocket server on loopback sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::sync::Arc;

use connector_core::{MultiConnectorRunner, RegistrationState};
use connector_testkit::connectors::Echo;
use connector_testkit::harness::{fast_options, json_execute, key, registrations, Running, WAIT};
use connector_testkit::{TestServer, WsServerOptions, WsTestServer};
use connector_ws::WsTransport;
use tokio::time::timeout;

/// `n` echo registrations over WebSocket, running.
fn start(n: usize, server: &WsTestServer) -> Running {
    let options = fast_options(&server.url()).build().unwrap();
    Running::start(MultiConnectorRunner::new(
        registrations(n, Arc::new(Echo)),
        options,
        WsTransport::new(),
    ))
}

async fn ws_server(opts: WsServerOptions) -> (TestServer, WsTestServer) {
    let engine = TestServer::new();
    let server = WsTestServer::start(engine.clone(), opts).await.unwrap();
    (engine, server)
}

/// Stops cleanly: no socket and no writer task outlives `run()`, and the
/// server sees every socket closed.
async fn stop(running: Running, server: &WsTestServer) {
    let runner = running.runner().clone();
    running.stop().await.expect("clean stop");
    assert_eq!(runner.summary().transport.open_connections(), 0);
    server.wait_for_connection_count(0, WAIT).await.unwrap();
}

async fn wait_all_active(runner: &MultiConnectorRunner) {
    for key in runner.registrations() {
        runner
            .registration(&key)
            .unwrap()
            .wait_for(WAIT, |s| *s == RegistrationState::Active)
            .await
            .unwrap_or_else(|| panic!("{key} not active"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_registrations_twenty_sockets_all_active_and_echo() {
    let (engine, server) = ws_server(WsServerOptions::default()).await;
    let running = start(20, &server);
    let runner = running.runner().clone();

    engine.wait_for_active(20, WAIT).await.unwrap();
    wait_all_active(&runner).await;
    server.wait_for_connection_count(20, WAIT).await.unwrap();
    assert_eq!(runner.summary().transport.open_connections(), 20);
    assert_eq!(server.total_connections_accepted(), 20, "one socket each");

    for key in runner.registrations() {
        let id = format!("req-{key}");
        let request = json_execute(&id, "echo", &format!("{{\"id\":\"{id}\"}}"));
        let resp = timeout(WAIT, engine.execute(&key, request.clone()))
            .await
            .expect("answered in time")
            .unwrap();
        assert!(resp.success, "{resp:?}");
        assert_eq!(resp.request_id, id);
        assert_eq!(resp.payload, request.payload);
    }

    stop(running, &server).await;
    assert!(
        engine.stats().protocol_errors.is_empty(),
        "{:?}",
        engine.stats()
    );
}

#[tokio::test]
async fn text_and_garbage_frames_make_the_registration_reconnect() {
    let (engine, server) = ws_server(WsServerOptions::default()).await;
    let running = start(2, &server);
    let runner = running.runner().clone();
    engine.wait_for_active(2, WAIT).await.unwrap();

    assert!(server.send_text_frame(&key(0).to_string()));
    assert!(server.send_garbage_frame(&key(1).to_string()));
    engine
        .wait_until(WAIT, |e| {
            e.stats().registers >= 4 && e.active_keys().len() == 2
        })
        .await
        .unwrap();
    wait_all_active(&runner).await;
    assert_eq!(engine.stats().registers, 4, "each registered again once");
    for key in runner.registrations() {
        let m = runner.registration(&key).unwrap().metrics();
        assert_eq!(m.total_disconnects, 1, "{key}: {m:?}");
        assert_eq!(m.successful_reconnects, 1, "{key}: {m:?}");
        assert_eq!(
            m.protocol_errors, 1,
            "{key}: the bad frame is counted: {m:?}"
        );
    }
    stop(running, &server).await;
}
