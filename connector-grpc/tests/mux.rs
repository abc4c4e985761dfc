//! `GrpcMux` over real loopback sockets against the testkit's gRPC server:
//! connection counts, the server stream limit, kills, restarts, TLS and
//! configuration errors. Every wait is bounded; ports are always 0.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use connector_core::{
    MessageStream, MultiTransportOptions, MultiTransportOptionsBuilder, StreamMux, Transport,
    TransportErrorKind,
};
use connector_grpc::{GrpcError, GrpcMux, GrpcTransport};
use connector_proto::{ExecuteRequest, ExecuteResponse, Kind, StreamMessage};
use connector_testkit::harness::{key, TempDir, WAIT};
use connector_testkit::{GrpcServerOptions, GrpcTestServer, TestCertificate, TestServer};
use support::{
    closed_port, connection_carrying, heartbeat, next, open_err, open_many, open_registered,
    options, register, server_streams_per_connection, start, streams_per_channel,
};
use tokio::time::timeout;

/// A testkit gRPC server (default options) and a `GrpcMux` on it, its
/// client options `tune`d.
async fn mux_on_default_server(
    tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
) -> (TestServer, GrpcTestServer, Arc<GrpcMux>) {
    let (engine, server) = start(GrpcServerOptions::default()).await;
    let o = tune(options(&server.url())).build().expect("options");
    (engine, server, Arc::new(GrpcMux::new(&o).expect("mux")))
}

/// `n` concurrent opens against a server that allows any number of streams,
/// with the client's channel cap `cap` (default 80): the streams fill
/// channels of `cap` one after another, each client channel one server
/// connection, each dialled once, and every stream works both ways.
async fn streams_fill_channels_of_the_cap(cap: Option<usize>, n: usize, per_channel: &[usize]) {
    let (engine, server, mux) = mux_on_default_server(|o| match cap {
        Some(cap) => o.max_streams_per_channel(cap),
        None => o,
    })
    .await;
    let mut streams = open_many(&mux, 0..n).await;

    engine.wait_for_active(n, WAIT).await.expect("all active");
    assert_eq!(engine.active_keys().len(), n);
    server
        .wait_for_connection_count(per_channel.len(), WAIT)
        .await
        .expect("one TCP connection per channel");
    assert_eq!(
        server.total_connections_accepted(),
        per_channel.len() as u64
    );
    assert_eq!(streams_per_channel(&*mux), per_channel);
    assert_eq!(server_streams_per_connection(&server), per_channel);
    let stats = mux.stats();
    assert_eq!(stats.open_streams(), n);
    assert_eq!(
        (stats.dials_succeeded, stats.dials_failed, stats.rebuilds),
        (per_channel.len() as u64, 0, 0)
    );
    assert!(
        stats
            .connections
            .iter()
            .all(|c| c.capacity == cap.unwrap_or(80)),
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
    assert_eq!(by_channel.len(), per_channel.len());

    drop(streams);
    // Every slot comes back once the streams are dropped.
    assert_eq!(mux.stats().open_streams(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_streams_at_the_default_cap_use_three_connections() {
    streams_fill_channels_of_the_cap(None, 200, &[80, 80, 40]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cap_ten_with_thirty_five_streams_uses_four_connections() {
    streams_fill_channels_of_the_cap(Some(10), 35, &[10, 10, 10, 5]).await;
}

/// A server that allows 5 streams per connection, and client options with
/// the default cap (80) and a 1 s connect timeout (the stall bound).
async fn limit_five() -> (TestServer, GrpcTestServer, MultiTransportOptions) {
    let (engine, server) = start(GrpcServerOptions::default().max_concurrent_streams(5)).await;
    let o = options(&server.url())
        .connect_timeout(Duration::from_secs(1))
        .build()
        .expect("options");
    (engine, server, o)
}

/// After 12 opens under [`limit_five`]: 12 active, over 3 connections.
async fn twelve_over_three_connections(engine: &TestServer, server: &GrpcTestServer) {
    engine.wait_for_active(12, WAIT).await.expect("12 active");
    server
        .wait_for_connection_count(3, WAIT)
        .await
        .expect("3 connections");
}

/// The server allows 5 streams per connection, the client's cap is 80:
/// h2 would queue stream 6 silently forever. All 12 must open, over 3
/// connections, in bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_limit_below_the_cap_never_hangs_concurrent_opens() {
    let (engine, server, o) = limit_five().await;
    let mux = Arc::new(GrpcMux::new(&o).expect("mux"));
    let mut streams = timeout(Duration::from_secs(15), open_many(&mux, 0..12))
        .await
        .expect("12 opens finish in bounded time");
    assert_eq!(streams.len(), 12);
    twelve_over_three_connections(&engine, &server).await;
    assert_eq!(streams_per_channel(&*mux), vec![5, 5, 2]);
    let stats = mux.stats();
    assert!(
        stats.connections.iter().all(|c| c.capacity == 5),
        "every channel learned the limit: {stats:?}"
    );
    assert_eq!(stats.rebuilds, 0, "a low limit is not a failure: {stats:?}");

    // The streams h2 had queued were cancelled, not left waiting: when a
    // slot frees on a full channel, the next open takes it (no stale queued
    // stream slips in first) and the server saw exactly one register each.
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
    assert_eq!(streams_per_channel(&*mux), vec![5, 5, 2]);
    drop((streams, again));
}

/// The same limit through `GrpcTransport::mux`, whose eager dial lets the
/// first channel see the server's SETTINGS before any open: h2 queues
/// (rather than the server refusing) and the stall detection does the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_limit_below_the_cap_after_an_eager_dial() {
    let (engine, server, o) = limit_five().await;
    let mux = GrpcTransport::new().mux(&o).await.expect("mux");
    server
        .wait_for_connection_count(1, WAIT)
        .await
        .expect("eager dial");
    let streams = timeout(Duration::from_secs(15), open_many(&mux, 0..12))
        .await
        .expect("12 opens finish in bounded time");
    twelve_over_three_connections(&engine, &server).await;
    assert_eq!(mux.stats().open_streams(), 12);
    assert_eq!(engine.stats().registers, 12);
    drop(streams);
}

/// Same limit, opens one after another: the 6th open stalls once, the
/// learned limit then applies to the next channels without more stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_limit_below_the_cap_sequential_opens_learn_the_limit() {
    let (engine, server, o) = limit_five().await;
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
    twelve_over_three_connections(&engine, &server).await;
    assert_eq!(streams_per_channel(&mux), vec![5, 5, 2]);
    for (i, s) in streams.iter_mut().enumerate() {
        heartbeat(s, i as u64).await;
    }
}

/// Expects a stream whose connection died: a `Closed` error first (a dead
/// connection is never a clean end, which would read as "the server closed
/// it"), then the end.
async fn expect_connection_lost(s: &mut MessageStream, what: &str) {
    match next(s).await {
        Some(Err(e)) => assert_eq!(e.kind(), TransportErrorKind::Closed, "{what}: {e}"),
        None => panic!("{what}: the stream ended cleanly"),
        Some(Ok(m)) => panic!("{what}: unexpected message {m:?}"),
    }
    assert!(next(s).await.is_none(), "{what}: the stream is over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_connection_fails_its_streams_and_new_opens_succeed() {
    let (engine, server, mux) = mux_on_default_server(|o| o.max_streams_per_channel(10)).await;
    let streams = open_many(&mux, 0..15).await;
    let full = connection_carrying(&server, 2, 10).await;
    assert!(server.kill_connection(full));

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
    let (mut dead, mut survivors): (Vec<_>, Vec<_>) = streams
        .into_iter()
        .partition(|s| s.info.connection_id == dead_channel);
    assert_eq!((dead.len(), survivors.len()), (10, 5));
    for s in &mut dead {
        expect_connection_lost(s, "a stream of the killed connection").await;
    }
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
    assert_eq!(engine.active_keys().len(), 15);
    assert_eq!(streams_per_channel(&*mux), vec![10, 5]);
    drop((fresh, survivors));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_restart_ends_streams_and_opens_work_again() {
    let (engine, server, mux) = mux_on_default_server(|o| o).await;
    let streams = open_many(&mux, 0..5).await;
    server.restart().await.expect("restart");
    for mut s in streams {
        expect_connection_lost(&mut s, "a stream across a restart").await;
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
    assert_eq!(reopened.len(), 5);
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
    let o = options(&format!("grpc://{}", closed_port().await))
        .build()
        .expect("options");
    // mux() does not fail on network errors.
    let mux = GrpcTransport::new().mux(&o).await.expect("mux");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let mux = Arc::clone(&mux);
            tokio::spawn(async move { open_err(&*mux, i).await })
        })
        .collect();
    for t in tasks {
        let err = t.await.expect("task");
        assert_eq!(err.kind(), TransportErrorKind::Connect, "{err}");
    }
    let stats = mux.stats();
    assert_eq!(stats.open_connections(), 0);
    // How many dials the 20 waiters shared depends on timing; at least one.
    assert!(stats.dials_failed >= 1);
    assert!(
        stats.dials_failed < 20,
        "waiters share a dial's failure: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_inbound_frees_the_slot_and_ends_the_server_stream() {
    let (engine, server, mux) = mux_on_default_server(|o| o.max_streams_per_channel(2)).await;
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
        .wait_until(WAIT, |e| e.active_keys() == [key(1)])
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
    let (_engine, server, mux) = mux_on_default_server(|o| o).await;
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
    let err = open_err(&mux, 1).await;
    assert_eq!(err.kind(), TransportErrorKind::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_server_message_is_a_protocol_error() {
    let (engine, _server, mux) = mux_on_default_server(|o| o.max_message_size(1024)).await;
    let mut s = open_registered(&mux, 0).await;
    let big = StreamMessage {
        kind: Some(Kind::ExecuteRequest(Box::new(ExecuteRequest {
            request_id: "r1".into(),
            payload: vec![7; 4096].into(),
            ..Default::default()
        }))),
    };
    engine.send_raw(&key(0), big).expect("send_raw");
    match next(&mut s).await {
        Some(Err(e)) => assert_eq!(e.kind(), TransportErrorKind::Protocol, "{e}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    // After the error the stream is over.
    assert!(next(&mut s).await.is_none());
}

/// A `grpcs://` testkit server signed by a fresh CA, the CA file that
/// trusts it, and the CA file of another CA.
struct Tls {
    engine: TestServer,
    server: GrpcTestServer,
    /// Holds the CA files until the end.
    _dir: TempDir,
    ca: std::path::PathBuf,
    other_ca: std::path::PathBuf,
}

async fn tls_server() -> Tls {
    let cert = TestCertificate::generate().expect("cert");
    let dir = TempDir::new("tls");
    let ca = cert.write_ca_pem(dir.dir()).expect("ca file");
    let other_ca = dir.path("other-ca.pem");
    let other = TestCertificate::generate().expect("other cert");
    std::fs::write(&other_ca, other.ca_pem()).expect("other ca file");
    let (engine, server) = start(GrpcServerOptions::default().tls(cert)).await;
    assert!(server.url().starts_with("grpcs://localhost:"));
    Tls {
        engine,
        server,
        _dir: dir,
        ca,
        other_ca,
    }
}

/// One trust rule (`connector_core::trust_anchors`) for every setting, as
/// for WebSocket (`wss_trust_settings` in connector-ws's mux tests): the
/// testkit CA (added to the roots, or the only root) is trusted, three
/// streams share one connection and work both ways; another CA is a TLS
/// error (a `GrpcError::Tls` source) that says to check `ca_cert`, for
/// every open, with no connection and nothing registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcs_trust_settings() {
    let tls = tls_server().await;
    let url = tls.server.url();
    let (ca, other_ca) = (&tls.ca, &tls.other_ca);
    let cases = [
        ("the testkit CA", options(&url).ca_cert(ca), true),
        (
            "only the testkit CA",
            options(&url).trust_only_ca_cert(ca),
            true,
        ),
        ("another CA", options(&url).ca_cert(other_ca), false),
        (
            "only another CA",
            options(&url).trust_only_ca_cert(other_ca),
            false,
        ),
    ];
    for (case, (name, o, trusted)) in cases.into_iter().enumerate() {
        let o = o.build().expect("options");
        assert_eq!(o.tls.trust_only_ca, name.starts_with("only"), "{name}");
        let mux = GrpcTransport::new()
            .mux(&o)
            .await
            .expect("a bad peer is not a config error");
        let keys = case * 10..case * 10 + 3;
        let registers_before = tls.engine.stats().registers;
        if trusted {
            let mut streams = Vec::new();
            for i in keys.clone() {
                streams.push(open_registered(&*mux, i).await);
            }
            for (i, s) in streams.iter_mut().enumerate() {
                heartbeat(s, i as u64).await;
            }
            let want: Vec<_> = keys.map(key).collect();
            tls.engine
                .wait_until(WAIT, |e| {
                    let mut active = e.active_keys();
                    active.sort_by_key(ToString::to_string);
                    active == want
                })
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(mux.stats().open_connections(), 1, "{name}");
            drop(streams);
            tls.engine
                .wait_until(WAIT, |e| e.active_keys().is_empty())
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            for i in keys {
                let err = open_err(&*mux, i).await;
                assert_eq!(err.kind(), TransportErrorKind::Tls, "{name}: {err}");
                let grpc = std::error::Error::source(&err)
                    .and_then(|s| s.downcast_ref::<GrpcError>())
                    .expect("the GrpcError is the source");
                assert!(matches!(grpc, GrpcError::Tls { .. }), "{name}: {grpc:?}");
                let text = err.to_string();
                assert!(
                    text.contains("ca_cert") && text.contains("invalid peer certificate"),
                    "{name}: {text}"
                );
            }
            assert_eq!(mux.stats().open_connections(), 0, "{name}");
            // Every open dials anew and fails the handshake; the eager
            // dial of `mux()` fails too, counted once it has.
            let failed = mux.stats().dials_failed;
            assert!((3..=4).contains(&failed), "{name}: {failed} failed dials");
            assert_eq!(tls.engine.stats().registers, registers_before, "{name}");
        }
    }
}

/// Settings `mux()` refuses up front, as config errors.
#[tokio::test]
async fn bad_settings_are_config_errors_from_mux() {
    let cases = [
        (
            "unreadable CA",
            MultiTransportOptions::builder("grpcs://localhost:1")
                .ca_cert("/definitely/not/here/ca.pem"),
            "/definitely/not/here/ca.pem",
        ),
        (
            "WebSocket URL",
            MultiTransportOptions::builder("ws://localhost:1"),
            "",
        ),
    ];
    for (name, o, says) in cases {
        let o = o.build().expect("options");
        let Err(err) = GrpcTransport::new().mux(&o).await else {
            panic!("{name}: must fail mux()");
        };
        assert_eq!(err.kind(), TransportErrorKind::Config, "{name}: {err}");
        assert!(err.to_string().contains(says), "{name}: {err}");
    }
}

#[tokio::test]
async fn client_identity_files_are_validated() {
    let cert = TestCertificate::generate().expect("cert");
    let (cert_pem, key_pem) = cert
        .generate_client_identity("client-1")
        .expect("client identity");
    let dir = TempDir::new("mtls");
    let ca = cert.write_ca_pem(dir.dir()).expect("ca");
    let (cert_path, key_path, bad_key) = (
        dir.path("client.pem"),
        dir.path("client.key"),
        dir.path("bad.key"),
    );
    std::fs::write(&cert_path, cert_pem).expect("write");
    std::fs::write(&key_path, key_pem).expect("write");
    std::fs::write(&bad_key, "not a key").expect("write");
    let with_key = |key: &std::path::Path| {
        MultiTransportOptions::builder("grpcs://localhost:1")
            .ca_cert(&ca)
            .client_identity(&cert_path, key)
            .build()
            .expect("options")
    };
    GrpcMux::new(&with_key(&key_path)).expect("a valid identity is accepted");
    let err = GrpcMux::new(&with_key(&bad_key)).expect_err("bad key");
    assert!(matches!(err, GrpcError::Config { .. }), "{err}");
    assert!(err.to_string().contains("bad.key"), "{err}");
}

/// The codec's buffers start at 1 KiB per stream: messages many times that
/// size still cross both ways intact, byte for byte, one after another on
/// the same stream (the buffers grow, and shrink back, as needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_far_larger_than_the_codec_buffer_cross_both_ways() {
    let (engine, _server, mux) = mux_on_default_server(|o| o).await;
    let mut s = open_registered(&mux, 0).await;
    for (n, size) in [300 * 1024usize, 17, 1025, 2 * 1024 * 1024]
        .into_iter()
        .enumerate()
    {
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 + n) as u8).collect();
        let pending = engine
            .send_execute(
                &key(0),
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
