//! WebSocket through an HTTP CONNECT proxy: `MultiConnectorRunner` +
//! `WsTransport` with `ProxySetting::Url`, against the testkit's WebSocket
//! server behind the testkit's `ConnectProxy`, on loopback sockets.
//!
//! The environment path (`HTTPS_PROXY`, `NO_PROXY`, …) is tested in
//! `connector-core` with an injected lookup: the process environment is
//! shared by tests running in parallel.

use std::sync::Arc;
use std::time::Duration;

use connector_core::proto::{ExecuteRequest, PayloadEncoding};
use connector_core::{
    BaseConnector, ConnectorConfig, ConnectorError, ConnectorRegistration, DisconnectCause,
    MultiConnectorRunner, MultiTransportOptions, ProxySetting, RegistrationEvent, RegistrationKey,
    RegistrationState,
};
use connector_testkit::connectors::Echo;
use connector_testkit::{ConnectProxy, TestCertificate, TestServer, WsServerOptions, WsTestServer};
use connector_ws::WsTransport;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

fn options(url: &str, proxy: ProxySetting) -> connector_core::MultiTransportOptionsBuilder {
    MultiTransportOptions::builder(url)
        .connect_timeout(Duration::from_secs(5))
        .reconnect_delay(Duration::from_millis(20))
        .jitter(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(200))
        .drain_timeout(Duration::from_secs(5))
        .jitter_seed(Some(7))
        .proxy(proxy)
}

fn runner(n: usize, options: MultiTransportOptions) -> MultiConnectorRunner {
    let echo: Arc<dyn BaseConnector> = Arc::new(Echo);
    let regs = (0..n)
        .map(|i| {
            ConnectorRegistration::from_arc(
                ConnectorConfig::builder("acme", "echo", format!("i{i}"))
                    .auth_token("secret-token")
                    .build()
                    .expect("valid config"),
                Arc::clone(&echo),
            )
        })
        .collect();
    MultiConnectorRunner::new(regs, options, WsTransport::new())
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
    assert_eq!(runner.summary().transport.open_connections(), 0);
}

async fn ws_server(opts: WsServerOptions) -> (TestServer, WsTestServer) {
    let engine = TestServer::new();
    let server = WsTestServer::start(engine.clone(), opts)
        .await
        .expect("server starts");
    (engine, server)
}

async fn proxy() -> ConnectProxy {
    ConnectProxy::start().await.expect("proxy starts")
}

/// `host:port` of a test server's URL: what a CONNECT must ask for.
fn authority(url: &str) -> String {
    url.split_once("://").expect("scheme").1.to_string()
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

async fn echo(engine: &TestServer, key: &str, id: &str) {
    let request = ExecuteRequest {
        request_id: id.into(),
        payload: format!("{{\"id\":\"{id}\"}}").into_bytes().into(),
        encoding: PayloadEncoding::Json as i32,
        ..Default::default()
    };
    let resp = timeout(WAIT, engine.execute(key, request.clone()))
        .await
        .expect("answered in time")
        .expect("answered");
    assert!(resp.success, "{resp:?}");
    assert_eq!(resp.payload, request.payload);
}

/// Waits for `n` failed opens of `key` (checking each message with
/// `check`) and one backoff, proving the registration keeps retrying.
async fn expect_open_failures(
    events: &mut tokio::sync::broadcast::Receiver<RegistrationEvent>,
    n: usize,
    check: impl Fn(&str),
) {
    let mut failures = 0;
    let mut backoffs = 0;
    timeout(WAIT, async {
        while failures < n || backoffs < 1 {
            match events.recv().await {
                Ok(RegistrationEvent::Disconnected {
                    cause: DisconnectCause::OpenFailed(msg),
                }) => {
                    check(&msg);
                    failures += 1;
                }
                Ok(RegistrationEvent::BackingOff { .. }) => backoffs += 1,
                Ok(_) => {}
                Err(e) => panic!("event stream: {e}"),
            }
        }
    })
    .await
    .expect("failed opens and a backoff in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_socket_is_its_own_tunnel() {
    let (engine, server) = ws_server(WsServerOptions::default()).await;
    let proxy = proxy().await;
    let runner = runner(
        12,
        options(&server.url(), ProxySetting::Url(proxy.url()))
            .build()
            .expect("options"),
    );
    let run = start(&runner);

    engine.wait_for_active(12, WAIT).await.expect("12 active");
    wait_all_active(&runner).await;
    server
        .wait_for_connection_count(12, WAIT)
        .await
        .expect("12 connections");
    // One socket per registration, each one tunnel to the server.
    assert_eq!(proxy.tunnels_opened(), 12);
    let target = authority(&server.url());
    assert_eq!(proxy.connect_targets(), vec![target; 12]);
    echo(&engine, "acme.echo.i0", "first").await;
    echo(&engine, "acme.echo.i11", "last").await;

    stop(&runner, run).await;
    server
        .wait_for_connection_count(0, WAIT)
        .await
        .expect("tunnelled connections closed");
    assert!(engine.stats().protocol_errors.is_empty());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_runs_inside_the_tunnel() {
    let cert = TestCertificate::generate().expect("cert");
    let dir = std::env::temp_dir().join(format!("connector-ws-proxy-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = cert.write_ca_pem(&dir).expect("ca");
    let (engine, server) = ws_server(WsServerOptions::default().tls(cert)).await;
    assert!(server.url().starts_with("wss://localhost:"));
    let proxy = proxy().await;
    let runner = runner(
        3,
        options(&server.url(), ProxySetting::Url(proxy.url()))
            .ca_cert(ca)
            .build()
            .expect("options"),
    );
    let run = start(&runner);

    engine.wait_for_active(3, WAIT).await.expect("3 active");
    wait_all_active(&runner).await;
    echo(&engine, "acme.echo.i2", "tls").await;
    assert_eq!(proxy.tunnels_opened(), 3);
    // The proxy is asked for the name TLS verifies, not an address.
    assert_eq!(proxy.connect_targets(), vec![authority(&server.url()); 3]);

    stop(&runner, run).await;
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_credentials_are_sent_and_wrong_ones_back_off_with_a_clear_error() {
    let (engine, server) = ws_server(WsServerOptions::default()).await;
    let proxy = proxy().await;
    proxy.require_auth("agent", "hunter2");

    // Right credentials: through.
    let good = runner(
        2,
        options(
            &server.url(),
            ProxySetting::Url(proxy.url_with_auth("agent", "hunter2")),
        )
        .build()
        .expect("options"),
    );
    let run = start(&good);
    engine.wait_for_active(2, WAIT).await.expect("2 active");
    wait_all_active(&good).await;
    echo(&engine, "acme.echo.i1", "authed").await;
    assert_eq!(proxy.tunnels_opened(), 2);
    assert_eq!(proxy.auth_failures(), 0);
    stop(&good, run).await;

    // Wrong credentials: every open fails naming the proxy and the 407,
    // the registration backs off and retries, nothing panics.
    let bad = runner(
        1,
        options(
            &server.url(),
            ProxySetting::Url(proxy.url_with_auth("agent", "wrong-pass")),
        )
        .build()
        .expect("options"),
    );
    let key = RegistrationKey::new("acme", "echo", "i0").expect("key");
    let mut events = bad.registration(&key).expect("hosted").events();
    let run = start(&bad);
    expect_open_failures(&mut events, 2, |msg| {
        assert!(msg.contains("proxy authentication failed"), "{msg}");
        assert!(msg.contains("407"), "{msg}");
        assert!(msg.contains(&proxy.addr().to_string()), "{msg}");
        assert!(
            !msg.contains("wrong-pass"),
            "no credential in errors: {msg}"
        );
    })
    .await;
    assert!(proxy.auth_failures() >= 2);
    assert_eq!(proxy.tunnels_opened(), 2, "no tunnel without credentials");
    assert!(
        !run.is_finished(),
        "a proxy refusal does not end the runner"
    );
    stop(&bad, run).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_that_cannot_reach_the_server_is_reported_with_its_status() {
    let proxy = proxy().await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = closed.local_addr().expect("addr");
    drop(closed);
    let runner = runner(
        1,
        options(&format!("ws://{dead}"), ProxySetting::Url(proxy.url()))
            .build()
            .expect("options"),
    );
    let key = RegistrationKey::new("acme", "echo", "i0").expect("key");
    let mut events = runner.registration(&key).expect("hosted").events();
    let run = start(&runner);
    expect_open_failures(&mut events, 1, |msg| {
        assert!(msg.contains("502"), "{msg}");
        assert!(msg.contains(&dead.to_string()), "{msg}");
    })
    .await;
    stop(&runner, run).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disabled_goes_direct_even_with_a_proxy_running() {
    let (engine, server) = ws_server(WsServerOptions::default()).await;
    let proxy = proxy().await;

    let direct = runner(
        2,
        options(&server.url(), ProxySetting::Disabled)
            .build()
            .expect("options"),
    );
    let run = start(&direct);
    engine.wait_for_active(2, WAIT).await.expect("2 active");
    wait_all_active(&direct).await;
    echo(&engine, "acme.echo.i0", "direct").await;
    assert!(
        proxy.connect_targets().is_empty(),
        "Disabled never asks the proxy"
    );
    stop(&direct, run).await;
    proxy.stop().await;
}

#[test]
fn bad_proxy_url_is_a_config_error() {
    let mut opts = options("ws://127.0.0.1:1", ProxySetting::Disabled)
        .build()
        .expect("options");
    // The builder already rejects it; a hand-edited value is caught again
    // when the mux is made.
    opts.proxy = ProxySetting::Url("socks5://p:1".into());
    let err = connector_ws::WsMux::new(&opts, connector_ws::WsConfig::default())
        .expect_err("bad proxy url");
    assert!(err.is_config(), "{err}");
    assert!(err.to_string().contains("proxy url"), "{err}");
}
