//! `GrpcMux` over real loopback sockets against the testkit's gRPC server:
//! connection counts, the server stream limit, kills, restarts, TLS and
//! configuration errors. Every wait is bounded; ports are always 0.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use connector_core::{
    MessageStream, MultiTransportOptions, RegistrationKey, StreamMux, Transport, TransportErrorKind,
};
use connector_grpc::{GrpcError, GrpcMux, GrpcTransport};
use connector_proto::{
    ExecuteRequest, ExecuteResponse, Heartbeat, Kind, RegisterRequest, RegistrationStatus,
    StreamMessage,
};
use connector_testkit::{GrpcServerOptions, GrpcTestServer, TestCertificate, TestServer};
use futures_util::StreamExt;
use tokio::time::timeout;

/// Generous bound for anything that should take milliseconds.
const WAIT: Duration = Duration::from_secs(20);

fn key(i: usize) -> RegistrationKey {
    RegistrationKey::new("tenant", "echo", format!("i{i}")).expect("valid key")
}

fn register(i: usize) -> StreamMessage {
    StreamMessage {
        kind: Some(Kind::Register(Box::new(RegisterRequest {
            tenant_id: "tenant".into(),
            connector_type: "echo".into(),
            instance_id: format!("i{i}"),
            version: "1.0.0".into(),
            auth_token: "secret-token".into(),
            max_concurrent_requests: 1,
            ..Default::default()
        }))),
    }
}

fn options(url: &str) -> connector_core::MultiTransportOptionsBuilder {
    MultiTransportOptions::builder(url).connect_timeout(Duration::from_secs(5))
}

async fn start(opts: GrpcServerOptions) -> (TestServer, GrpcTestServer) {
    let engine = TestServer::new();
    let server = GrpcTestServer::start(engine.clone(), opts)
        .await
        .expect("server starts");
    (engine, server)
}

/// Reads the next message, bounded.
async fn next(
    stream: &mut MessageStream,
) -> Option<Result<StreamMessage, connector_core::TransportError>> {
    timeout(WAIT, stream.inbound.next())
        .await
        .expect("a message or the end in time")
}

/// Opens registration `i` and checks the server approved it.
async fn open_registered(mux: &dyn StreamMux, i: usize) -> MessageStream {
    let mut stream = timeout(WAIT, mux.open(&key(i), register(i)))
        .await
        .expect("open in time")
        .unwrap_or_else(|e| panic!("open {i}: {e}"));
    match next(&mut stream).await {
        Some(Ok(StreamMessage {
            kind: Some(Kind::RegisterResponse(r)),
        })) => assert_eq!(r.status, RegistrationStatus::Approved as i32, "{i}: {r:?}"),
        other => panic!("{i}: expected a register_response, got {other:?}"),
    }
    stream
}

/// Opens `n` registrations at once, from `n` tasks.
async fn open_many(mux: &Arc<GrpcMux>, range: std::ops::Range<usize>) -> Vec<MessageStream> {
    let tasks: Vec<_> = range
        .map(|i| {
            let mux = Arc::clone(mux);
            tokio::spawn(async move { open_registered(&*mux, i).await })
        })
        .collect();
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.expect("open task panicked"));
    }
    streams
}

/// A heartbeat round trip: proves the stream's outbound half works.
async fn heartbeat(stream: &mut MessageStream, sequence: u64) {
    stream
        .outbound
        .send(StreamMessage {
            kind: Some(Kind::Heartbeat(Heartbeat {
                sequence,
                sent_at_unix_ms: 1,
            })),
        })
        .await
        .expect("outbound open");
    loop {
        match next(stream).await {
            Some(Ok(StreamMessage {
                kind: Some(Kind::HeartbeatAck(ack)),
            })) if ack.sequence == sequence => return,
            Some(Ok(_)) => continue,
            other => panic!("expected a heartbeat_ack, got {other:?}"),
        }
    }
}

/// Streams per client channel, largest first.
fn streams_per_channel(mux: &GrpcMux) -> Vec<usize> {
    let mut v: Vec<usize> = mux.channel_stats().iter().map(|c| c.streams).collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v
}

/// Open streams per server-side connection, largest first.
fn server_streams_per_connection(server: &GrpcTestServer) -> Vec<usize> {
    let mut v: Vec<usize> = server
        .connections()
        .iter()
        .map(|c| c.open_streams)
        .collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_streams_at_the_default_cap_use_three_connections() {
    let (engine, server) = start(GrpcServerOptions::default()).await;
    let mux =
        Arc::new(GrpcMux::new(&options(&server.url()).build().expect("options")).expect("mux"));
    let mut streams = open_many(&mux, 0..200).await;

    engine.wait_for_active(200, WAIT).await.expect("200 active");
    server
        .wait_for_connection_count(3, WAIT)
        .await
        .expect("3 TCP connections");
    assert_eq!(server.total_connections_accepted(), 3);
    assert_eq!(streams_per_channel(&mux), vec![80, 80, 40]);
    let stats = mux.stats();
    assert_eq!(stats.open_streams(), 200);
    assert_eq!(
        (stats.dials_succeeded, stats.dials_failed, stats.rebuilds),
        (3, 0, 0)
    );
    assert!(
        stats.connections.iter().all(|c| c.capacity == 80),
        "{stats:?}"
    );
    // Every stream works both ways.
    for (i, s) in streams.iter_mut().enumerate() {
        heartbeat(s, i as u64).await;
    }
    // Each client channel is one server connection.
    let mut by_channel = BTreeMap::new();
    for s in &streams {
        *by_channel.entry(s.info.connection_id).or_insert(0usize) += 1;
    }
    assert_eq!(by_channel.len(), 3);
    assert_eq!(server_streams_per_connection(&server), vec![80, 80, 40]);

    drop(streams);
    // Every slot comes back once the streams are dropped.
    assert_eq!(mux.stats().open_streams(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cap_ten_with_thirty_five_streams_uses_four_connections() {
    let (engine, server) = start(GrpcServerOptions::default()).await;
    let o = options(&server.url())
        .max_streams_per_channel(10)
        .build()
        .expect("options");
    let mux = Arc::new(GrpcMux::new(&o).expect("mux"));
    let streams = open_many(&mux, 0..35).await;
    engine.wait_for_active(35, WAIT).await.expect("35 active");
    server
        .wait_for_connection_count(4, WAIT)
        .await
        .expect("4 connections");
    assert_eq!(streams_per_channel(&mux), vec![10, 10, 10, 5]);
    assert_eq!(server_streams_per_connection(&server), vec![10, 10, 10, 5]);
    assert_eq!(mux.stats().dials_succeeded, 4);
    drop(streams);
}

/// The server allows 5 streams per connection, the client's cap is 80:
/// h2 would queue stream 6 silently forever. All 12 must open, over 3
/// connections, in bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_limit_below_the_cap_never_hangs_concurrent_opens() {
    let (engine, server) = start(GrpcServerOptions::default().max_concurrent_streams(5)).await;
    let o = options(&server.url())
        .connect_timeout(Duration::from_secs(1))
        .build()
        .expect("options");
    let mux = Arc::new(GrpcMux::new(&o).expect("mux"));
    let streams = timeout(Duration::from_secs(15), open_many(&mux, 0..12))
        .await
        .expect("12 opens finish in bounded time");
    assert_eq!(streams.len(), 12);
    engine.wait_for_active(12, WAIT).await.expect("12 active");
    server
        .wait_for_connection_count(3, WAIT)
        .await
        .expect("3 connections");
    assert_eq!(streams_per_channel(&mux), vec![5, 5, 2]);
    let stats = mux.stats();
    assert!(
        stats.connections.iter().all(|c| c.capacity == 5),
        "every channel learned the limit: {stats:?}"
    );
    assert_eq!(stats.rebuilds, 0, "a low limit is not a failure: {stats:?}");

    // The streams h2 had queued were cancelled, not left waiting: when a
    // slot frees on a full channel, the next open takes it (no stale queued
    // stream slips in first) and the server saw exactly one register each.
    let mut streams = streams;
    let full = streams
        .iter()
        .position(|s| {
            mux.channel_stats()
                .iter()
                .any(|c| c.id == s.info.connection_id && c.streams == 5)
        })
        .expect("a stream on a full channel");
    let freed = streams.swap_remove(full).info.connection_id;
    let again = open_registered(&*mux, 12).await;
    assert_eq!(again.info.connection_id, freed);
    engine
        .wait_until(WAIT, |e| e.active_keys().len() == 12)
        .await
        .expect("12 active");
    let server_stats = engine.stats();
    assert_eq!(server_stats.registers, 13, "{server_stats:?}");
    assert_eq!(server_stats.duplicate_active, 0, "{server_stats:?}");
    assert_eq!(streams_per_channel(&mux), vec![5, 5, 2]);
    drop((streams, again));
}

/// The same limit through `GrpcTransport::mux`, whose eager dial lets the
/// first channel see the server's SETTINGS before any open: h2 queues
/// (rather than the server refusing) and the stall detection does the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_limit_below_the_cap_after_an_eager_dial() {
    let (engine, server) = start(GrpcServerOptions::default().max_concurrent_streams(5)).await;
    let o = options(&server.url())
        .connect_timeout(Duration::from_secs(1))
        .build()
        .expect("options");
    let mux = GrpcTransport::new().mux(&o).await.expect("mux");
    server
        .wait_for_connection_count(1, WAIT)
        .await
        .expect("eager dial");
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let mux = Arc::clone(&mux);
            tokio::spawn(async move { open_registered(&*mux, i).await })
        })
        .collect();
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(
            timeout(Duration::from_secs(15), t)
                .await
                .expect("bounded")
                .expect("task"),
        );
    }
    engine.wait_for_active(12, WAIT).await.expect("12 active");
    server
        .wait_for_connection_count(3, WAIT)
        .await
        .expect("3 connections");
    assert_eq!(mux.stats().open_streams(), 12);
    assert_eq!(engine.stats().registers, 12);
}

/// Same limit, opens one after another: the 6th open stalls once, the
/// learned limit then applies to the next channels without more stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_limit_below_the_cap_sequential_opens_learn_the_limit() {
    let (engine, server) = start(GrpcServerOptions::default().max_concurrent_streams(5)).await;
    let o = options(&server.url())
        .connect_timeout(Duration::from_secs(1))
        .build()
        .expect("options");
    let mux = GrpcMux::new(&o).expect("mux");
    let started = tokio::time::Instant::now();
    let mut streams = Vec::new();
    for i in 0..12 {
        streams.push(open_registered(&mux, i).await);
    }
    // One stall of `connect_timeout` (1 s), not one per channel.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    engine.wait_for_active(12, WAIT).await.expect("12 active");
    server
        .wait_for_connection_count(3, WAIT)
        .await
        .expect("3 connections");
    assert_eq!(streams_per_channel(&mux), vec![5, 5, 2]);
    for (i, s) in streams.iter_mut().enumerate() {
        heartbeat(s, i as u64).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_connection_fails_its_streams_and_new_opens_succeed() {
    let (engine, server) = start(GrpcServerOptions::default()).await;
    let o = options(&server.url())
        .max_streams_per_channel(10)
        .build()
        .expect("options");
    let mux = Arc::new(GrpcMux::new(&o).expect("mux"));
    let streams = open_many(&mux, 0..15).await;
    server
        .wait_for_connection_count(2, WAIT)
        .await
        .expect("2 connections");

    let full = server
        .connections()
        .into_iter()
        .find(|c| c.open_streams == 10)
        .expect("a connection with 10 streams");
    assert!(server.kill_connection(full.connection_id));

    // The 10 streams of the killed connection fail; the other 5 live on.
    let mut by_channel = BTreeMap::new();
    for s in &streams {
        *by_channel.entry(s.info.connection_id).or_insert(0usize) += 1;
    }
    let dead_channel = by_channel
        .iter()
        .find(|(_, n)| **n == 10)
        .map(|(id, _)| *id)
        .expect("a client channel with 10 streams");
    let mut survivors = Vec::new();
    let mut failed = 0;
    for mut s in streams {
        if s.info.connection_id != dead_channel {
            survivors.push(s);
            continue;
        }
        match next(&mut s).await {
            Some(Err(e)) => {
                assert!(
                    matches!(
                        e.kind(),
                        TransportErrorKind::Closed | TransportErrorKind::Protocol
                    ),
                    "{e}"
                );
                failed += 1;
            }
            None => failed += 1,
            Some(Ok(m)) => panic!("unexpected message on a killed connection: {m:?}"),
        }
    }
    assert_eq!(failed, 10);
    assert_eq!(survivors.len(), 5);
    for (i, s) in survivors.iter_mut().enumerate() {
        heartbeat(s, 100 + i as u64).await;
    }

    // Repeated failures dropped the broken channel from the pool.
    let stats = mux.stats();
    assert_eq!(stats.rebuilds, 1, "{stats:?}");
    assert!(
        stats.connections.iter().all(|c| c.id != dead_channel),
        "{stats:?}"
    );

    // New registrations open (5 fill the surviving channel, 5 go to a new one).
    let fresh = open_many(&mux, 100..110).await;
    engine
        .wait_for_active(15, WAIT)
        .await
        .expect("15 active after the kill");
    assert_eq!(streams_per_channel(&mux), vec![10, 5]);
    drop((fresh, survivors));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_restart_ends_streams_and_opens_work_again() {
    let (engine, server) = start(GrpcServerOptions::default()).await;
    let mux =
        Arc::new(GrpcMux::new(&options(&server.url()).build().expect("options")).expect("mux"));
    let streams = open_many(&mux, 0..5).await;
    server.restart().await.expect("restart");
    for mut s in streams {
        match next(&mut s).await {
            Some(Err(_)) | None => {}
            Some(Ok(m)) => panic!("unexpected message after a restart: {m:?}"),
        }
    }
    // The first opens after a restart may meet the dead connection; the
    // runner retries with backoff. Here: retry a bounded number of times.
    let mut reopened = Vec::new();
    for i in 0..5 {
        let mut last = None;
        for _ in 0..5 {
            match timeout(WAIT, mux.open(&key(i), register(i))).await {
                Ok(Ok(s)) => {
                    last = None;
                    reopened.push(s);
                    break;
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => panic!("open {i} hung after a restart"),
            }
        }
        if let Some(e) = last {
            panic!("open {i} kept failing after a restart: {e}");
        }
    }
    engine
        .wait_for_active(5, WAIT)
        .await
        .expect("5 active again");
    assert_eq!(mux.stats().open_streams(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transport_dials_the_first_channel_eagerly() {
    let (_engine, server) = start(GrpcServerOptions::default()).await;
    let o = options(&server.url()).build().expect("options");
    let mux = GrpcTransport::new().mux(&o).await.expect("mux");
    server
        .wait_for_connection_count(1, WAIT)
        .await
        .expect("dialled before any open");
    let s = open_registered(&*mux, 0).await;
    assert_eq!(
        mux.stats().dials_succeeded,
        1,
        "the open used the eager channel"
    );
    assert_eq!(server.total_connections_accepted(), 1);
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_server_is_a_connect_error_shared_by_waiters() {
    // A port nobody listens on: bind, read the port, close.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let o = options(&format!("grpc://{addr}")).build().expect("options");
    // mux() does not fail on network errors.
    let mux = GrpcTransport::new().mux(&o).await.expect("mux");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let mux = Arc::clone(&mux);
            tokio::spawn(async move { timeout(WAIT, mux.open(&key(i), register(i))).await })
        })
        .collect();
    for t in tasks {
        let err = t
            .await
            .expect("task")
            .expect("open in time")
            .expect_err("nobody listens");
        assert_eq!(err.kind(), TransportErrorKind::Connect, "{err}");
    }
    let stats = mux.stats();
    assert_eq!(stats.open_connections(), 0);
    assert!(stats.dials_failed >= 1);
    assert!(
        stats.dials_failed < 20,
        "waiters share a dial's failure: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_inbound_frees_the_slot_and_ends_the_server_stream() {
    let (engine, server) = start(GrpcServerOptions::default()).await;
    let o = options(&server.url())
        .max_streams_per_channel(2)
        .build()
        .expect("options");
    let mux = GrpcMux::new(&o).expect("mux");
    let a = open_registered(&mux, 0).await;
    let b = open_registered(&mux, 1).await;
    assert_eq!(streams_per_channel(&mux), vec![2]);
    // Keep `a`'s outbound sender alive: dropping the inbound half alone
    // must end the stream (the slot and the server's stream).
    let MessageStream {
        outbound: a_out,
        inbound: a_in,
        ..
    } = a;
    drop(a_in);
    assert_eq!(streams_per_channel(&mux), vec![1]);
    engine
        .wait_until(WAIT, |e| e.active_keys() == ["tenant.echo.i1"])
        .await
        .expect("the server saw stream 0 end");
    // The freed slot is reused: still one connection.
    let c = open_registered(&mux, 2).await;
    assert_eq!(streams_per_channel(&mux), vec![2]);
    assert_eq!(server.total_connections_accepted(), 1);
    drop((a_out, b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn close_drops_channels_and_refuses_new_opens() {
    let (_engine, server) = start(GrpcServerOptions::default()).await;
    let mux = GrpcMux::new(&options(&server.url()).build().expect("options")).expect("mux");
    drop(open_registered(&mux, 0).await);
    server
        .wait_for_connection_count(1, WAIT)
        .await
        .expect("connected");
    mux.close().await;
    assert_eq!(mux.stats().open_connections(), 0);
    server
        .wait_for_connection_count(0, WAIT)
        .await
        .expect("the connection closes");
    let err = mux
        .open(&key(1), register(1))
        .await
        .expect_err("closed mux");
    assert_eq!(err.kind(), TransportErrorKind::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_server_message_is_a_protocol_error() {
    let (engine, server) = start(GrpcServerOptions::default()).await;
    let o = options(&server.url())
        .max_message_size(1024)
        .build()
        .expect("options");
    let mux = GrpcMux::new(&o).expect("mux");
    let mut s = open_registered(&mux, 0).await;
    let big = StreamMessage {
        kind: Some(Kind::ExecuteRequest(Box::new(ExecuteRequest {
            request_id: "r1".into(),
            payload: vec![7; 4096].into(),
            ..Default::default()
        }))),
    };
    engine
        .send_raw(&"tenant.echo.i0".parse().expect("a key"), big)
        .expect("send_raw");
    match next(&mut s).await {
        Some(Err(e)) => assert_eq!(e.kind(), TransportErrorKind::Protocol, "{e}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    // After the error the stream is over.
    assert!(next(&mut s).await.is_none());
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("connector-grpc-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_the_testkit_ca_works() {
    let cert = TestCertificate::generate().expect("cert");
    let dir = temp_dir("tls-ok");
    let ca = cert.write_ca_pem(&dir).expect("ca file");
    let (engine, server) = start(GrpcServerOptions::default().tls(cert)).await;
    assert!(server.url().starts_with("grpcs://localhost:"));
    let o = options(&server.url())
        .ca_cert(&ca)
        .build()
        .expect("options");
    let mux = GrpcTransport::new().mux(&o).await.expect("mux");
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(open_registered(&*mux, i).await);
    }
    for (i, s) in streams.iter_mut().enumerate() {
        heartbeat(s, i as u64).await;
    }
    engine.wait_for_active(3, WAIT).await.expect("3 active");
    assert_eq!(mux.stats().open_connections(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_a_wrong_ca_is_a_tls_error() {
    let served = TestCertificate::generate().expect("cert");
    let other = TestCertificate::generate().expect("other cert");
    let dir = temp_dir("tls-wrong");
    let wrong_ca = other.write_ca_pem(&dir).expect("ca file");
    let (engine, server) = start(GrpcServerOptions::default().tls(served)).await;
    let o = options(&server.url())
        .ca_cert(&wrong_ca)
        .build()
        .expect("options");
    let mux = GrpcTransport::new()
        .mux(&o)
        .await
        .expect("a bad peer is not a config error");
    for i in 0..3 {
        let err = timeout(WAIT, mux.open(&key(i), register(i)))
            .await
            .expect("in time")
            .expect_err("untrusted server");
        assert_eq!(err.kind(), TransportErrorKind::Tls, "{err}");
        let grpc = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<GrpcError>())
            .expect("the GrpcError is the source");
        assert!(matches!(grpc, GrpcError::Tls { .. }), "{grpc:?}");
    }
    assert_eq!(mux.stats().open_connections(), 0);
    assert!(mux.stats().dials_failed >= 1);
    assert!(engine.registrations().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `trust_only_ca_cert`: the testkit CA alone is enough (the system roots
/// are not read), and a server signed by another CA is refused with a TLS
/// error that says to check `ca_cert`. Mirrors the WebSocket test of the
/// same name: one trust rule (`connector_core::trust_anchors`) for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcs_trusting_only_the_given_ca() {
    let served = TestCertificate::generate().expect("cert");
    let other = TestCertificate::generate().expect("other cert");
    let dir = temp_dir("only-ca");
    let ca = served.write_ca_pem(&dir).expect("ca file");
    let other_dir = temp_dir("only-other-ca");
    let other_ca = other.write_ca_pem(&other_dir).expect("ca file");
    let (engine, server) = start(GrpcServerOptions::default().tls(served)).await;

    let o = options(&server.url())
        .trust_only_ca_cert(&ca)
        .build()
        .expect("options");
    assert!(o.tls.trust_only_ca);
    let mux = GrpcTransport::new().mux(&o).await.expect("mux");
    let mut s = open_registered(&*mux, 0).await;
    heartbeat(&mut s, 1).await;
    engine.wait_for_active(1, WAIT).await.expect("active");
    drop(s);

    let o = options(&server.url())
        .trust_only_ca_cert(&other_ca)
        .build()
        .expect("options");
    let mux = GrpcTransport::new()
        .mux(&o)
        .await
        .expect("an untrusted peer is not a config error");
    let err = timeout(WAIT, mux.open(&key(1), register(1)))
        .await
        .expect("in time")
        .expect_err("untrusted server");
    assert_eq!(err.kind(), TransportErrorKind::Tls, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("ca_cert") && text.contains("invalid peer certificate"),
        "{text}"
    );

    // No CA at all: the system roots do not know the testkit CA (or the
    // machine has none, which is a config error naming ca_cert).
    let o = options(&server.url()).build().expect("options");
    match GrpcTransport::new().mux(&o).await {
        Ok(mux) => {
            let err = timeout(WAIT, mux.open(&key(2), register(2)))
                .await
                .expect("in time")
                .expect_err("untrusted server");
            assert_eq!(err.kind(), TransportErrorKind::Tls, "{err}");
            assert!(err.to_string().contains("ca_cert"), "{err}");
        }
        Err(err) => {
            assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
            assert!(err.to_string().contains("ca_cert"), "{err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other_dir);
}

#[tokio::test]
async fn bad_ca_path_is_a_config_error_from_mux() {
    let o = MultiTransportOptions::builder("grpcs://localhost:1")
        .ca_cert("/definitely/not/here/ca.pem")
        .build()
        .expect("options");
    let Err(err) = GrpcTransport::new().mux(&o).await else {
        panic!("an unreadable CA file must fail mux()");
    };
    assert_eq!(err.kind(), TransportErrorKind::Config);
    assert!(
        err.to_string().contains("/definitely/not/here/ca.pem"),
        "{err}"
    );
}

#[tokio::test]
async fn websocket_url_is_a_config_error_from_mux() {
    let o = MultiTransportOptions::builder("ws://localhost:1")
        .build()
        .expect("options");
    let Err(err) = GrpcTransport::new().mux(&o).await else {
        panic!("a ws:// URL must fail the gRPC transport");
    };
    assert_eq!(err.kind(), TransportErrorKind::Config);
}

#[tokio::test]
async fn client_identity_files_are_validated() {
    let cert = TestCertificate::generate().expect("cert");
    let (cert_pem, key_pem) = cert
        .generate_client_identity("client-1")
        .expect("client identity");
    let dir = temp_dir("mtls");
    let ca = cert.write_ca_pem(&dir).expect("ca");
    let cert_path = dir.join("client.pem");
    let key_path = dir.join("client.key");
    std::fs::write(&cert_path, cert_pem).expect("write");
    std::fs::write(&key_path, key_pem).expect("write");
    let good = MultiTransportOptions::builder("grpcs://localhost:1")
        .ca_cert(&ca)
        .client_identity(&cert_path, &key_path)
        .build()
        .expect("options");
    GrpcMux::new(&good).expect("a valid identity is accepted");

    let bad_key = dir.join("bad.key");
    std::fs::write(&bad_key, "not a key").expect("write");
    let bad = MultiTransportOptions::builder("grpcs://localhost:1")
        .ca_cert(&ca)
        .client_identity(&cert_path, &bad_key)
        .build()
        .expect("options");
    let err = GrpcMux::new(&bad).expect_err("bad key");
    assert!(matches!(err, GrpcError::Config { .. }), "{err}");
    assert!(err.to_string().contains("bad.key"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The codec's buffers start at 1 KiB per stream: messages many times that
/// size still cross both ways intact, byte for byte, one after another on
/// the same stream (the buffers grow, and shrink back, as needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_far_larger_than_the_codec_buffer_cross_both_ways() {
    let (engine, server) = start(GrpcServerOptions::default()).await;
    let o = options(&server.url()).build().expect("options");
    let mux = GrpcMux::new(&o).expect("mux");
    let mut s = open_registered(&mux, 0).await;
    for (n, size) in [300 * 1024usize, 17, 1025, 2 * 1024 * 1024]
        .into_iter()
        .enumerate()
    {
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 + n) as u8).collect();
        let pending = engine
            .send_execute(
                &"tenant.echo.i0".parse().expect("a key"),
                ExecuteRequest {
                    request_id: format!("r{n}"),
                    payload: payload.clone().into(),
                    ..Default::default()
                },
            )
            .expect("sent");
        let request = loop {
            match next(&mut s).await {
                Some(Ok(StreamMessage {
                    kind: Some(Kind::ExecuteRequest(r)),
                })) => break r,
                Some(Ok(_)) => continue,
                other => panic!("expected execute_request r{n}, got {other:?}"),
            }
        };
        assert_eq!(request.request_id, format!("r{n}"));
        assert_eq!(request.payload.as_ref(), payload.as_slice(), "r{n} inbound");
        s.outbound
            .send(StreamMessage {
                kind: Some(Kind::ExecuteResponse(Box::new(ExecuteResponse {
                    request_id: request.request_id,
                    success: true,
                    payload: request.payload,
                    ..Default::default()
                }))),
            })
            .await
            .expect("outbound open");
        let response = pending.wait(WAIT).await.expect("response in time");
        assert!(response.success);
        assert_eq!(
            response.payload.as_ref(),
            payload.as_slice(),
            "r{n} outbound"
        );
    }
}
