//! `WsMux` against real loopback sockets: the testkit's WebSocket server,
//! and a few hand-scripted tokio-tungstenite peers for what the testkit does
//! not do (no subprotocol, pings, custom close codes, silence).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use connector_core::proto::{Kind, RegistrationStatus, StreamMessage, WS_SUBPROTOCOL};
use connector_core::{
    MessageStream, MultiTransportOptions, MultiTransportOptionsBuilder, RegistrationKey, StreamMux,
    Transport, TransportError, TransportErrorKind,
};
use connector_testkit::harness::{key, TempDir, WAIT};
use connector_testkit::{
    CloseCause, ServerEvent, TestCertificate, TestServer, WsServerOptions, WsTestServer,
};
use connector_ws::{WsConfig, WsError, WsMux, WsTransport};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use support::{register, TOKEN};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Client options for `url`: a 5 s connect timeout, then `tune`.
fn options_with(
    url: &str,
    tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
) -> MultiTransportOptions {
    tune(MultiTransportOptions::builder(url).connect_timeout(Duration::from_secs(5)))
        .build()
        .unwrap()
}

fn options(url: &str) -> MultiTransportOptions {
    options_with(url, |b| b)
}

async fn mux_for(options: &MultiTransportOptions) -> Arc<dyn StreamMux> {
    WsTransport::new().mux(options).await.unwrap()
}

async fn next(stream: &mut MessageStream) -> Option<Result<StreamMessage, TransportError>> {
    timeout(WAIT, stream.inbound.next())
        .await
        .expect("inbound stalled")
}

/// Opens `k`'s stream (bounded) and checks its first message is an approval.
async fn open_approved(mux: &dyn StreamMux, k: &RegistrationKey) -> MessageStream {
    let mut s = timeout(WAIT, mux.open(k, register(k)))
        .await
        .expect("open in time")
        .unwrap_or_else(|e| panic!("open {k}: {e}"));
    let msg = next(&mut s).await.expect("stream ended").expect("error");
    match msg.kind {
        Some(Kind::RegisterResponse(r)) => {
            assert_eq!(r.status, RegistrationStatus::Approved as i32, "{r:?}")
        }
        other => panic!("expected register_response, got {other:?}"),
    }
    s
}

/// Opens `k`'s stream (bounded), expecting the open itself to fail.
async fn open_err(mux: &dyn StreamMux, k: &RegistrationKey) -> TransportError {
    timeout(WAIT, mux.open(k, register(k)))
        .await
        .expect("open in time")
        .err()
        .unwrap_or_else(|| panic!("open {k} must fail"))
}

/// Expects the stream to end cleanly now (`None`), not with an error.
async fn expect_end(stream: &mut MessageStream) {
    match next(stream).await {
        None => {}
        Some(other) => panic!("expected the end of the stream, got {other:?}"),
    }
}

/// Waits (bounded) until the mux reports no open socket: both halves of
/// every socket dropped, every writer task ended.
async fn wait_no_sockets(mux: &dyn StreamMux) {
    timeout(WAIT, async {
        while mux.stats().open_connections() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("sockets still open: {:?}", mux.stats()));
}

/// Waits until the server saw `key`'s stream end with a close frame from
/// the client.
async fn wait_closed_by_client(engine: &TestServer, key: &RegistrationKey) {
    let key = key.to_string();
    engine
        .wait_until(WAIT, |e| {
            e.events().iter().any(|ev| {
                // A close frame (not a reset, which is `Error`); the testkit
                // reports `PeerGone` when its socket loop ends before the
                // engine reads the end of the inbound half.
                matches!(
                    ev,
                    ServerEvent::StreamClosed {
                        cause: CloseCause::ClientClosed | CloseCause::PeerGone,
                        ..
                    }
                ) && ev.key() == Some(key.as_str())
            })
        })
        .await
        .unwrap_or_else(|_| panic!("server never saw {key} close: {:?}", engine.events()));
}

/// The testkit's WebSocket server (plain `ws://`) and a mux on it.
struct Plain {
    engine: TestServer,
    server: WsTestServer,
    mux: Arc<dyn StreamMux>,
}

async fn plain() -> Plain {
    plain_with(|b| b).await
}

async fn plain_with(
    tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
) -> Plain {
    let engine = TestServer::new();
    let server = WsTestServer::start(engine.clone(), WsServerOptions::default())
        .await
        .unwrap();
    let mux = mux_for(&options_with(&server.url(), tune)).await;
    Plain {
        engine,
        server,
        mux,
    }
}

impl Plain {
    /// A server, a mux, and `key(0)`'s approved stream.
    async fn approved() -> (Self, RegistrationKey, MessageStream) {
        let p = plain().await;
        let k = key(0);
        let s = open_approved(&*p.mux, &k).await;
        (p, k, s)
    }

    /// Waits until the server saw the socket go while `held` is still
    /// alive, then drops it and waits until the mux holds no socket either.
    async fn closed_while_held<T>(&self, held: T) {
        self.server
            .wait_for_connection_count(0, WAIT)
            .await
            .unwrap();
        drop(held);
        wait_no_sockets(&*self.mux).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_opens_twenty_sockets_each_registered() {
    let Plain {
        engine,
        server,
        mux,
    } = plain().await;
    let keys: Vec<_> = (0..20).map(key).collect();
    let streams: Vec<MessageStream> =
        futures_util::future::join_all(keys.iter().map(|k| open_approved(&*mux, k))).await;
    let mut ids: Vec<u64> = streams.iter().map(|s| s.info.connection_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 20, "one socket per registration");
    let stats = mux.stats();
    assert_eq!(stats.open_connections(), 20);
    assert_eq!(stats.open_streams(), 20);
    assert!(stats.connections.iter().all(|c| c.capacity == 1));
    assert_eq!(stats.dials_succeeded, 20);
    assert_eq!(stats.dials_failed, 0);
    server.wait_for_connection_count(20, WAIT).await.unwrap();
    engine.wait_for_active(20, WAIT).await.unwrap();
    let regs = engine.registrations();
    assert_eq!(regs.len(), 20);
    assert!(regs.iter().all(|r| r.register.auth_token == TOKEN));

    drop(streams);
    wait_no_sockets(&*mux).await;
    server.wait_for_connection_count(0, WAIT).await.unwrap();
}

#[tokio::test]
async fn messages_flow_both_ways() {
    let (p, k, mut s) = Plain::approved().await;

    let pending = p
        .engine
        .send_execute(
            &k,
            connector_core::proto::ExecuteRequest {
                request_id: "r1".into(),
                payload: b"{}".to_vec().into(),
                ..Default::default()
            },
        )
        .unwrap();
    let req = next(&mut s).await.unwrap().unwrap();
    let Some(Kind::ExecuteRequest(req)) = req.kind else {
        panic!("expected execute_request, got {req:?}");
    };
    s.outbound
        .send(StreamMessage {
            kind: Some(Kind::ExecuteResponse(Box::new(
                connector_core::proto::ExecuteResponse {
                    request_id: req.request_id,
                    success: true,
                    payload: b"{\"ok\":true}".to_vec().into(),
                    ..Default::default()
                },
            ))),
        })
        .await
        .unwrap();
    let resp = pending.wait(WAIT).await.unwrap();
    assert!(resp.success);
}

/// A bad frame from the testkit server: a protocol error that says what
/// was wrong, then the end of the stream; the client closes the socket
/// (with a close code, so the server records no error of its own).
#[tokio::test]
async fn bad_server_frames_are_protocol_errors_then_the_stream_ends() {
    type Fault = fn(&WsTestServer, &str) -> bool;
    let cases: [(&str, Fault, &str); 3] = [
        ("text", |s, k| s.send_text_frame(k), "text frame"),
        (
            "garbage",
            |s, k| s.send_garbage_frame(k),
            "not a StreamMessage",
        ),
        (
            "oversized",
            |s, k| s.send_oversized_frame(k, 64 * 1024),
            "oversized",
        ),
    ];
    for (name, fault, says) in cases {
        let p = plain_with(|b| b.max_message_size(2048)).await;
        let k = key(0);
        let mut s = open_approved(&*p.mux, &k).await;

        assert!(fault(&p.server, &k.to_string()), "{name}");
        let err = next(&mut s).await.expect("an error first").unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::Protocol, "{name}: {err}");
        assert!(err.message().contains(says), "{name}: {err}");
        expect_end(&mut s).await;
        p.closed_while_held(s).await;
        let errors = p.engine.stats().protocol_errors;
        assert!(errors.is_empty(), "{name}: {errors:?}");
    }
}

/// The server ends an approved stream: a close frame is a clean end; a
/// socket dropped without one (`killed`) is a `Closed` error first, never
/// a clean end of stream (`None` would read as "the server closed it").
/// Either way the socket goes on both sides.
async fn server_ends_the_stream(killed: bool) {
    let (p, k, mut s) = Plain::approved().await;
    if killed {
        assert_eq!(p.server.kill_all_connections(), 1);
        match next(&mut s).await {
            Some(Err(e)) => assert_eq!(e.kind(), TransportErrorKind::Closed, "{e}"),
            None => panic!("a killed connection ended the stream cleanly"),
            Some(Ok(m)) => panic!("unexpected message {m:?}"),
        }
    } else {
        p.engine.close_stream(&k).expect("close_stream");
    }
    expect_end(&mut s).await;
    p.closed_while_held(s).await;
}

#[tokio::test]
async fn server_close_ends_the_stream() {
    server_ends_the_stream(false).await;
}

#[tokio::test]
async fn killed_connection_is_a_closed_error() {
    server_ends_the_stream(true).await;
}

/// Reads `inbound` to its end (bounded); every item before it must be a
/// message, not an error.
async fn drain_clean(inbound: &mut connector_core::InboundStream, what: &str) {
    let rest: Vec<_> = timeout(WAIT, inbound.by_ref().collect::<Vec<_>>())
        .await
        .unwrap_or_else(|_| panic!("{what}"));
    assert!(rest.iter().all(|r| r.is_ok()), "{rest:?}");
}

/// The client ends its approved stream: by dropping all of it, or only the
/// sender half (inbound then ends cleanly after the close handshake). The
/// server sees a close frame from the client, and the socket goes on both
/// sides, the writer task with it.
async fn client_ends_the_stream(whole: bool) {
    let (p, k, s) = Plain::approved().await;
    assert_eq!(p.mux.stats().open_connections(), 1);
    let held = if whole {
        drop(s);
        None
    } else {
        let MessageStream {
            outbound,
            mut inbound,
            ..
        } = s;
        drop(outbound);
        drain_clean(&mut inbound, "inbound must end after the close handshake").await;
        Some(inbound)
    };
    wait_closed_by_client(&p.engine, &k).await;
    p.closed_while_held(held).await;
}

#[tokio::test]
async fn dropping_the_stream_closes_the_socket_and_ends_the_writer() {
    client_ends_the_stream(true).await;
}

#[tokio::test]
async fn dropping_the_sender_half_closes_and_inbound_then_ends() {
    client_ends_the_stream(false).await;
}

#[tokio::test]
async fn close_ends_everything_and_refuses_new_opens() {
    let Plain { server, mux, .. } = plain().await;
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(open_approved(&*mux, &key(i)).await);
    }
    // The runner drops its streams before closing the mux; keep one inbound
    // half alive here to check close() still ends every writer.
    let held = streams.pop().unwrap();
    drop(streams);
    timeout(WAIT, mux.close()).await.expect("close is bounded");
    let MessageStream { mut inbound, .. } = held;
    drain_clean(&mut inbound, "the held stream ends after close").await;
    drop(inbound);
    wait_no_sockets(&*mux).await;
    server.wait_for_connection_count(0, WAIT).await.unwrap();

    let err = open_err(&*mux, &key(9)).await;
    assert_eq!(err.kind(), TransportErrorKind::Closed, "{err}");
}

// ---- wss ----------------------------------------------------------------------

/// A `wss://` testkit server signed by `cert`, the CA file that trusts it,
/// and the CA file of another CA.
struct Tls {
    cert: TestCertificate,
    engine: TestServer,
    server: WsTestServer,
    /// Holds the CA files (and any others a test writes) until the end.
    dir: TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
}

async fn tls_server() -> Tls {
    let cert = TestCertificate::generate().unwrap();
    let engine = TestServer::new();
    let server = WsTestServer::start(engine.clone(), WsServerOptions::default().tls(cert.clone()))
        .await
        .unwrap();
    assert!(server.url().starts_with("wss://"), "{}", server.url());
    let dir = TempDir::new("tls");
    let ca = cert.write_ca_pem(dir.dir()).unwrap();
    let other_ca = dir.path("other-ca.pem");
    std::fs::write(&other_ca, TestCertificate::generate().unwrap().ca_pem()).unwrap();
    Tls {
        cert,
        engine,
        server,
        dir,
        ca,
        other_ca,
    }
}

/// One trust rule (`connector_core::trust_anchors`) for every setting, as
/// for gRPC (`grpcs_trust_settings` in connector-grpc's mux tests): the
/// testkit CA (added to the roots, or the only root, with or without a
/// client identity) is trusted; another CA is a TLS error that says to
/// check `ca_cert`, and no socket stays open.
#[tokio::test]
async fn wss_trust_settings() {
    let tls = tls_server().await;
    let (client_cert, client_key) = tls.cert.generate_client_identity("client-1").unwrap();
    std::fs::write(tls.dir.path("client.pem"), client_cert).unwrap();
    std::fs::write(tls.dir.path("client.key"), client_key).unwrap();
    let url = tls.server.url();
    let (ca, other_ca) = (&tls.ca, &tls.other_ca);
    let cases = [
        (
            "the testkit CA",
            options_with(&url, |b| b.ca_cert(ca)),
            true,
        ),
        (
            "mutual TLS",
            options_with(&url, |b| {
                b.ca_cert(ca)
                    .client_identity(tls.dir.path("client.pem"), tls.dir.path("client.key"))
            }),
            true,
        ),
        (
            "only the testkit CA",
            options_with(&url, |b| b.trust_only_ca_cert(ca)),
            true,
        ),
        (
            "another CA",
            options_with(&url, |b| b.ca_cert(other_ca)),
            false,
        ),
        (
            "only another CA",
            options_with(&url, |b| b.trust_only_ca_cert(other_ca)),
            false,
        ),
    ];
    for (i, (name, opts, trusted)) in cases.into_iter().enumerate() {
        assert_eq!(opts.tls.trust_only_ca, name.starts_with("only"), "{name}");
        let mux = mux_for(&opts).await;
        let k = key(i);
        if trusted {
            let s = open_approved(&*mux, &k).await;
            tls.engine
                .wait_until(WAIT, |e| e.active_keys() == [k.clone()])
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            drop(s);
            tls.server.wait_for_connection_count(0, WAIT).await.unwrap();
            wait_no_sockets(&*mux).await;
        } else {
            let err = open_err(&*mux, &k).await;
            assert_eq!(err.kind(), TransportErrorKind::Tls, "{name}: {err}");
            let text = err.to_string();
            assert!(
                text.contains("ca_cert") && text.contains("invalid peer certificate"),
                "{name}: {text}"
            );
            assert_eq!(mux.stats().dials_failed, 1, "{name}");
            assert_eq!(mux.stats().open_connections(), 0, "{name}");
        }
    }
}

/// Settings `mux()` refuses up front, as config errors whose source is a
/// config `WsError`.
#[tokio::test]
async fn bad_settings_are_config_errors_from_mux() {
    let dir = TempDir::new("not-pem");
    std::fs::write(dir.path("ca.pem"), "not a certificate").unwrap();
    let cases = [
        (
            "unreadable CA",
            WsTransport::new(),
            options_with("wss://localhost:1", |b| {
                b.ca_cert("/nonexistent/connector-ws/ca.pem")
            }),
            "/nonexistent/connector-ws/ca.pem",
        ),
        (
            "CA file that is not PEM",
            WsTransport::new(),
            options_with("wss://localhost:1", |b| b.ca_cert(dir.path("ca.pem"))),
            "",
        ),
        (
            "gRPC URL",
            WsTransport::new(),
            options("grpc://localhost:1"),
            "",
        ),
        (
            "no handshake permits",
            WsTransport::with_config(WsConfig::default().max_concurrent_handshakes(0)),
            options("ws://localhost:1"),
            "",
        ),
    ];
    for (name, transport, opts, says) in cases {
        let err = transport
            .mux(&opts)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: must fail"));
        assert_eq!(err.kind(), TransportErrorKind::Config, "{name}: {err}");
        assert!(err.message().contains(says), "{name}: {err}");
        let source = std::error::Error::source(&err).expect("source");
        assert!(
            source
                .downcast_ref::<WsError>()
                .is_some_and(WsError::is_config),
            "{name}: {source:?}"
        );
    }
}

/// A port nobody listens on: bind, read the port, close.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    listener.local_addr().unwrap()
}

/// A listener that accepts and holds every socket and never answers the
/// upgrade; each accept is reported on the receiver.
async fn silent_server() -> (SocketAddr, JoinHandle<()>, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, accepted_rx) = mpsc::unbounded_channel();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
            let _ = accepted_tx.send(());
        }
    });
    (addr, hold, accepted_rx)
}

#[tokio::test]
async fn refused_port_is_a_connect_error() {
    let mux = mux_for(&options(&format!("ws://{}", closed_port().await))).await;
    let err = open_err(&*mux, &key(0)).await;
    assert_eq!(err.kind(), TransportErrorKind::Connect, "{err}");
    assert_eq!(mux.stats().dials_failed, 1);
}

#[tokio::test]
async fn wrong_path_is_refused() {
    let Plain { server, .. } = plain().await;
    let mux = mux_for(&options(&format!("{}/elsewhere", server.url()))).await;
    let err = open_err(&*mux, &key(0)).await;
    assert_eq!(err.kind(), TransportErrorKind::Refused, "{err}");
    assert!(err.message().contains("404"), "{err}");
}

#[tokio::test]
async fn silent_server_is_a_timeout() {
    let (addr, hold, _accepted) = silent_server().await;
    let opts = options_with(&format!("ws://{addr}"), |b| {
        b.connect_timeout(Duration::from_millis(200))
    });
    let mux = mux_for(&opts).await;
    let err = open_err(&*mux, &key(0)).await;
    assert_eq!(err.kind(), TransportErrorKind::Timeout, "{err}");
    hold.abort();
}

#[tokio::test]
async fn handshakes_are_paced() {
    // Two handshakes at most; a silent server holds them until the timeout.
    let (addr, hold, mut accepted_rx) = silent_server().await;
    let opts = options_with(&format!("ws://{addr}"), |b| {
        b.connect_timeout(Duration::from_millis(500))
    });
    let mux = WsMux::new(&opts, WsConfig::default().max_concurrent_handshakes(2)).unwrap();
    let keys: Vec<_> = (0..5).map(key).collect();
    let opens =
        futures_util::future::join_all(keys.iter().map(|k| mux.open_socket(k, register(k))));
    let watch = async {
        // The first two dials arrive; the others wait for a permit.
        for _ in 0..2 {
            accepted_rx.recv().await.unwrap();
        }
        let early = accepted_rx.try_recv().is_ok();
        assert!(
            !early,
            "a third handshake started while two were in progress"
        );
    };
    let (results, ()) = tokio::join!(opens, watch);
    assert!(results
        .iter()
        .all(|r| matches!(r, Err(WsError::Timeout { .. }))));
    assert_eq!(mux.stats().dials_failed, 5);
    hold.abort();
}

// ---- hand-scripted peers ----------------------------------------------------

/// A one-socket server: accepts one upgrade (selecting `connector.v1` when
/// `select` is true), reads the first frame, and hands the socket to the test.
async fn scripted_server(
    select: bool,
) -> (
    SocketAddr,
    JoinHandle<(WebSocketStream<TcpStream>, StreamMessage)>,
) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        #[allow(clippy::result_large_err)] // tungstenite's callback signature
        let callback = move |req: &Request, mut resp: Response| {
            let offered = req
                .headers()
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            assert_eq!(offered.as_deref(), Some(WS_SUBPROTOCOL));
            assert_eq!(req.uri().path(), "/v1/connect");
            if select {
                resp.headers_mut().insert(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(WS_SUBPROTOCOL),
                );
            }
            Ok(resp)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
            .await
            .unwrap();
        let first = match ws.next().await {
            Some(Ok(Message::Binary(b))) => StreamMessage::decode(b).unwrap(),
            other => panic!("expected a binary first frame, got {other:?}"),
        };
        (ws, first)
    });
    (addr, task)
}

/// `key(0)`'s stream through a mux of `transport` on a scripted server that
/// selects the subprotocol; with the server's end of the socket and the
/// first frame it read.
struct Scripted {
    mux: Arc<dyn StreamMux>,
    stream: MessageStream,
    ws: WebSocketStream<TcpStream>,
    first: StreamMessage,
}

async fn scripted(
    transport: WsTransport,
    tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
) -> Scripted {
    let (addr, server) = scripted_server(true).await;
    let mux = transport
        .mux(&options_with(&format!("ws://{addr}"), tune))
        .await
        .unwrap();
    let k = key(0);
    let stream = timeout(WAIT, mux.open(&k, register(&k)))
        .await
        .expect("open in time")
        .unwrap();
    let (ws, first) = timeout(WAIT, server).await.unwrap().unwrap();
    Scripted {
        mux,
        stream,
        ws,
        first,
    }
}

#[tokio::test]
async fn register_is_the_first_frame_and_no_subprotocol_is_a_protocol_error() {
    // Server selects the subprotocol: the first frame is `register`.
    let Scripted { first, .. } = scripted(WsTransport::new(), |b| b).await;
    assert_eq!(first, register(&key(0)));

    // Server selects nothing: the client must refuse the socket.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = tokio_tungstenite::accept_async(tcp).await;
    });
    let mux = mux_for(&options(&format!("ws://{addr}"))).await;
    let err = open_err(&*mux, &key(0)).await;
    assert_eq!(err.kind(), TransportErrorKind::Protocol, "{err}");
    assert!(err.message().contains("subprotocol"), "{err}");
    let _ = server.await;
}

#[tokio::test]
async fn client_pings_and_answers_pings() {
    let transport = WsTransport::with_config(
        WsConfig::default().ping_interval(Some(Duration::from_millis(50))),
    );
    let Scripted {
        mux,
        stream:
            MessageStream {
                outbound,
                mut inbound,
                ..
            },
        mut ws,
        ..
    } = scripted(transport, |b| b).await;
    // The driver keeps reading; that is what flushes pong replies.
    let reader = tokio::spawn(async move { inbound.next().await.map(|r| r.map_err(|e| e.kind())) });

    ws.send(Message::Ping(b"are-you-there".to_vec().into()))
        .await
        .unwrap();
    let (mut got_ping, mut got_pong) = (false, false);
    timeout(WAIT, async {
        while !(got_ping && got_pong) {
            match ws.next().await {
                Some(Ok(Message::Ping(_))) => got_ping = true,
                Some(Ok(Message::Pong(p))) => {
                    assert_eq!(&p[..], b"are-you-there");
                    got_pong = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("a keepalive ping and a pong reply");

    // A server close with an application code ends the stream.
    ws.close(Some(CloseFrame {
        code: CloseCode::Library(4000),
        reason: "maintenance".into(),
    }))
    .await
    .unwrap();
    let end = timeout(WAIT, reader).await.unwrap().unwrap();
    assert_eq!(end, None);
    drop(outbound);
    wait_no_sockets(&*mux).await;
}

/// Reads frames until the client's close frame; returns its code.
async fn client_close_code(ws: &mut WebSocketStream<TcpStream>) -> u16 {
    timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("the client closes the socket")
}

#[tokio::test]
async fn bad_frames_close_the_socket_with_the_contract_codes() {
    let cases: [(Message, u16); 3] = [
        (Message::Text("hello".into()), 1003),
        (Message::Binary(vec![0xff; 11].into()), 1007),
        (Message::Binary(vec![0u8; 8 * 1024].into()), 1009),
    ];
    for (frame, code) in cases {
        let Scripted {
            stream: mut s,
            mut ws,
            ..
        } = scripted(WsTransport::new(), |b| b.max_message_size(4096)).await;
        ws.send(frame).await.unwrap();
        let err = next(&mut s).await.expect("an error").unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::Protocol, "{err}");
        expect_end(&mut s).await;
        assert_eq!(client_close_code(&mut ws).await, code);
    }
}

#[tokio::test]
async fn messages_queued_before_the_drop_are_sent_before_the_close() {
    let Scripted {
        mux,
        stream: s,
        mut ws,
        ..
    } = scripted(WsTransport::new(), |b| b).await;
    let heartbeat = |n: u64| StreamMessage {
        kind: Some(Kind::Heartbeat(Box::new(
            connector_core::proto::Heartbeat {
                sequence: n,
                sent_at_unix_ms: 0,
            },
        ))),
    };
    for n in 0..3 {
        s.outbound.send(heartbeat(n)).await.unwrap();
    }
    drop(s);
    for n in 0..3 {
        match timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Binary(b))) => {
                assert_eq!(StreamMessage::decode(b).unwrap(), heartbeat(n))
            }
            other => panic!("expected heartbeat {n}, got {other:?}"),
        }
    }
    assert_eq!(client_close_code(&mut ws).await, 1000);
    wait_no_sockets(&*mux).await;
}

#[test]
fn bad_proxy_url_is_a_config_error() {
    let mut opts = options("ws://127.0.0.1:1");
    // The builder already rejects it; a hand-edited value is caught again
    // when the mux is made.
    opts.proxy = connector_core::ProxySetting::Url("socks5://p:1".into());
    let err = WsMux::new(&opts, WsConfig::default()).expect_err("bad proxy url");
    assert!(err.is_config(), "{err}");
    assert!(err.to_string().contains("proxy url"), "{err}");
}
