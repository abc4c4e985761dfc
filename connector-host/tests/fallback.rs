//! Transport fallback over real loopback sockets: an HTTP/1.1-only listener
//! where gRPC should be, the testkit's WebSocket server as the fallback, and
//! the testkit's gRPC server taking the port over later; both front-ends
//! share one engine, so exactly-once is checked across the move.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use connector_core::proto::{ExecuteErrorKind, ExecuteRequest};
use connector_core::{
    DisconnectCause, MultiConnectorRunner, MultiTransportOptions, MultiTransportOptionsBuilder,
    RegistrationEvent, RegistrationKey,
};
use connector_host::fallback::{ActiveTransport, FallbackEvent, FallbackTransport};
use connector_testkit::connectors::Sleep;
use connector_testkit::harness::{fast_options, json_execute, registrations, Running, WAIT};
use connector_testkit::{
    GrpcServerOptions, GrpcTestServer, Http1OnlyServer, PendingExecute, TestCertificate,
    TestServer, WsServerOptions, WsTestServer,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

const REPROBE: Duration = Duration::from_millis(500);

fn options_builder(url: &str, connect_timeout: Duration) -> MultiTransportOptionsBuilder {
    fast_options(url)
        .connect_timeout(connect_timeout)
        .jitter_seed(Some(11))
}

fn options(url: &str, connect_timeout: Duration) -> MultiTransportOptions {
    options_builder(url, connect_timeout)
        .build()
        .expect("options")
}

fn runner(n: usize, options: MultiTransportOptions, t: FallbackTransport) -> MultiConnectorRunner {
    let sleep = Arc::new(Sleep::new(Duration::from_millis(30)));
    MultiConnectorRunner::new(registrations(n, sleep), options, t)
}

fn echo_request(id: &str) -> ExecuteRequest {
    json_execute(id, "", &format!("{{\"id\":\"{id}\"}}"))
}

/// Sends executes to every key in rounds until told to stop; returns every
/// request sent with its handle.
fn workload(
    engine: TestServer,
    keys: Vec<String>,
    running: Arc<AtomicBool>,
) -> JoinHandle<Vec<(String, PendingExecute)>> {
    tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut n = 0u64;
        while running.load(Ordering::Relaxed) {
            for key in &keys {
                n += 1;
                let id = format!("r{n}");
                // A key between streams has no approved stream: skip it
                // this round.
                if let Ok(p) = engine.send_execute(&key.parse().expect("a key"), echo_request(&id))
                {
                    sent.push((id, p));
                }
            }
            // A pace, not a wait for something to happen.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sent
    })
}

fn transports(engine: &TestServer) -> HashMap<String, &'static str> {
    engine
        .registrations()
        .into_iter()
        .map(|r| (r.key, r.transport))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_only_grpc_address_falls_back_to_ws_then_returns_exactly_once() {
    const N: usize = 6;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let engine = TestServer::new();
    // Take a port for gRPC, then put the HTTP/1.1-only listener on it.
    let grpc = GrpcTestServer::start(engine.clone(), GrpcServerOptions::default())
        .await
        .unwrap();
    grpc.stop().await;
    let mut http1 = Http1OnlyServer::start_on(grpc.addr()).await.unwrap();
    let ws = WsTestServer::start(engine.clone(), WsServerOptions::default())
        .await
        .unwrap();

    let transport = FallbackTransport::new(ws.url()).reprobe_period(REPROBE);
    let status = transport.status();
    let runner = runner(N, options(&grpc.url(), Duration::from_secs(5)), transport);
    let run = Running::start(runner.clone());

    // Every registration is active on the WebSocket.
    engine.wait_for_active(N, WAIT).await.unwrap();
    let keys: Vec<String> = runner
        .registrations()
        .iter()
        .map(|k| k.to_string())
        .collect();
    assert!(
        transports(&engine).values().all(|t| *t == "ws"),
        "{:?}",
        transports(&engine)
    );
    assert!(
        status
            .wait_until(WAIT, |s| s.registrations_on(ActiveTransport::WebSocket)
                == N)
            .await
    );
    assert_eq!(status.mode(), Some(ActiveTransport::WebSocket));
    assert!(http1.answered() >= 1, "gRPC was tried first");
    // The HTTP/1.1 answer reached h2 as a framing error (counted as a
    // suspect, twice in a row), not as a refused connection or a timeout.
    let reason = status.fallback_reason().expect("fell back");
    assert!(reason.contains("FRAME_SIZE_ERROR"), "{reason}");
    let mut events = status.events();

    // Work flows while the move happens.
    let running = Arc::new(AtomicBool::new(true));
    let load = workload(engine.clone(), keys.clone(), Arc::clone(&running));
    engine
        .wait_until(WAIT, |e| e.stats().responses_received >= 2 * N as u64)
        .await
        .unwrap();

    // Each registration's events from before the move.
    let mut reg_events: Vec<_> = runner
        .registrations()
        .iter()
        .map(|k| (k.to_string(), runner.registration(k).unwrap().events()))
        .collect();

    // HTTP/2 gets through from now on.
    http1.stop().await;
    grpc.restart().await.unwrap();
    let served_at = Instant::now();
    assert!(
        status
            .wait_until(WAIT, |s| s.registrations_on(ActiveTransport::Grpc) == N)
            .await,
        "every registration back on gRPC; on ws: {}",
        status.registrations_on(ActiveTransport::WebSocket)
    );
    let back_after = served_at.elapsed();
    assert_eq!(status.mode(), Some(ActiveTransport::Grpc));
    engine
        .wait_until(WAIT, |e| {
            let t = transports(e);
            t.len() == N && t.values().all(|t| *t == "grpc")
        })
        .await
        .unwrap();
    // Work keeps flowing on gRPC.
    let before = engine.stats().responses_received;
    engine
        .wait_until(WAIT, |e| {
            e.stats().responses_received >= before + 2 * N as u64
        })
        .await
        .unwrap();
    running.store(false, Ordering::Relaxed);
    let sent = load.await.unwrap();

    // Every request answered exactly once: successes, plus the ones that
    // arrived on a draining stream, refused as OVERLOADED (retryable).
    let (mut ok, mut overloaded) = (0, 0);
    for (id, p) in sent {
        let resp = p.wait(WAIT).await.unwrap_or_else(|e| panic!("{id}: {e}"));
        if resp.success {
            assert_eq!(resp.payload, echo_request(&id).payload);
            ok += 1;
        } else {
            assert_eq!(
                resp.error_kind,
                ExecuteErrorKind::Overloaded as i32,
                "{resp:?}"
            );
            overloaded += 1;
        }
    }
    let stats = engine.stats();
    assert_eq!(stats.outstanding, 0);
    assert_eq!(stats.duplicate_responses, 0);
    assert_eq!(stats.unknown_responses, 0);
    assert_eq!(stats.duplicate_active, 0, "no registration was live twice");
    assert!(
        stats.protocol_errors.is_empty(),
        "{:?}",
        stats.protocol_errors
    );

    // One switch event per registration (ws -> grpc), and the mode change.
    let mut switched = Vec::new();
    let mut mode_back = false;
    while let Ok(e) = events.try_recv() {
        match e {
            FallbackEvent::Switched { key, from, to } => {
                assert_eq!(
                    (from, to),
                    (ActiveTransport::WebSocket, ActiveTransport::Grpc)
                );
                switched.push(key.to_string());
            }
            FallbackEvent::ModeChanged { to, .. } => {
                assert_eq!(to, ActiveTransport::Grpc);
                mode_back = true;
            }
            _ => {}
        }
    }
    // The move is one drain and one reconnect per registration. The stream
    // moved is young (it did not stay healthy for `backoff_reset_after`), so
    // the state machine's no-hot-loop rule keeps the backoff it had; the
    // wait stays within the cap (200 ms) plus jitter (20 ms).
    for (key, rx) in &mut reg_events {
        let mut draining = false;
        let mut delays = Vec::new();
        while let Ok(e) = rx.try_recv() {
            match e {
                RegistrationEvent::Draining { reason } => {
                    assert_eq!(reason, "moving back to gRPC");
                    draining = true;
                }
                RegistrationEvent::BackingOff { delay } if draining => delays.push(delay),
                _ => {}
            }
        }
        assert!(draining, "{key} was drained");
        assert_eq!(delays.len(), 1, "{key}: one reconnect: {delays:?}");
        assert!(delays[0] <= Duration::from_millis(220), "{key}: {delays:?}");
    }
    switched.sort();
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(switched, expected);
    assert!(mode_back);
    eprintln!(
        "back on gRPC {back_after:?} after it started serving (re-probe period {REPROBE:?}); \
         {ok} answered ok, {overloaded} refused while draining"
    );

    run.stop().await.expect("clean stop");
    assert_eq!(status.registrations_on(ActiveTransport::Grpc), 0);
    ws.stop().await;
    grpc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_without_h2_falls_back_on_the_first_open() {
    const N: usize = 3;
    let engine = TestServer::new();
    let cert = TestCertificate::generate().unwrap();
    let dir = std::env::temp_dir().join(format!("connector-host-alpn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = cert.write_ca_pem(&dir).unwrap();
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let http1 = Http1OnlyServer::start_tls_on(addr, &cert).await.unwrap();
    let ws = WsTestServer::start(engine.clone(), WsServerOptions::default())
        .await
        .unwrap();
    let transport = FallbackTransport::new(ws.url()).reprobe_period(REPROBE);
    let status = transport.status();
    let options = options_builder(&http1.grpc_url(), Duration::from_secs(2))
        .ca_cert(&ca)
        .build()
        .expect("options");
    let runner = runner(N, options, transport);
    let run = Running::start(runner.clone());
    engine.wait_for_active(N, WAIT).await.unwrap();
    assert!(transports(&engine).values().all(|t| *t == "ws"));
    let reason = status.fallback_reason().expect("fell back");
    assert!(reason.contains("NoApplicationProtocol"), "{reason}");
    // Definite: no registration backed off before moving.
    for key in runner.registrations() {
        let m = runner.registration(&key).unwrap().metrics();
        assert_eq!(m.connect_failures, 0, "{key}: {m:?}");
    }
    // Still refused at every probe: everything stays on the WebSocket.
    assert_eq!(status.mode(), Some(ActiveTransport::WebSocket));
    run.stop().await.expect("clean stop");
    ws.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until every registration saw `n` failed opens; returns their
/// messages.
async fn wait_for_open_failures(
    runner: &MultiConnectorRunner,
    keys: &[RegistrationKey],
    n: usize,
) -> Vec<String> {
    let mut messages = Vec::new();
    for key in keys {
        let handle = runner.registration(key).expect("hosted");
        let mut events = handle.events();
        let mut seen = 0;
        timeout(WAIT, async {
            while seen < n {
                if let Ok(RegistrationEvent::Disconnected {
                    cause: DisconnectCause::OpenFailed(m),
                }) = events.recv().await
                {
                    seen += 1;
                    messages.push(m);
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{key}: {n} failed opens"));
    }
    messages
}

async fn assert_no_fallback(grpc_url: &str, connect_timeout: Duration) -> Vec<String> {
    let engine = TestServer::new();
    let ws = WsTestServer::start(engine.clone(), WsServerOptions::default())
        .await
        .unwrap();
    let transport = FallbackTransport::new(ws.url()).reprobe_period(REPROBE);
    let status = transport.status();
    let runner = runner(2, options(grpc_url, connect_timeout), transport);
    let keys = runner.registrations();
    let run = Running::start(runner.clone());
    // Failures keep coming (each registration backs off and retries), so
    // subscribing after the start misses nothing that matters.
    let messages = wait_for_open_failures(&runner, &keys, 3).await;
    assert_eq!(status.mode(), Some(ActiveTransport::Grpc));
    assert_eq!(status.registrations_on(ActiveTransport::WebSocket), 0);
    assert_eq!(
        ws.total_connections_accepted(),
        0,
        "the WebSocket was never tried"
    );
    assert!(engine.active_keys().is_empty());
    run.stop().await.expect("clean stop");
    ws.stop().await;
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_grpc_connection_backs_off_and_does_not_fall_back() {
    // A port nobody listens on.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let messages = assert_no_fallback(&format!("grpc://{addr}"), Duration::from_secs(2)).await;
    assert!(
        messages.iter().all(|m| m.contains("connect")),
        "the failures were refused connections: {messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_backs_off_and_does_not_fall_back() {
    // Accepts TCP and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let messages = assert_no_fallback(&format!("grpc://{addr}"), Duration::from_millis(300)).await;
    assert!(
        messages.iter().all(|m| m.contains("took longer than")),
        "the failures were timeouts: {messages:?}"
    );
    hold.abort();
}
