//! `WsMux` against real loopback sockets: the testkit's WebSocket server,
//! and a few hand-scripted tokio-tungstenite peers for what the testkit does
//! not do (no subprotocol, pings, custom close codes, silence).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use connector_core::proto::{
    Kind, RegisterRequest, RegistrationStatus, StreamMessage, WS_SUBPROTOCOL,
};
use connector_core::{
    MessageStream, MultiTransportOptions, RegistrationKey, StreamMux, Transport, TransportError,
    TransportErrorKind,
};
use connector_testkit::{
    CloseCause, ServerEvent, TestCertificate, TestServer, WsServerOptions, WsTestServer,
};
use connector_ws::{WsConfig, WsError, WsMux, WsTransport};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const WAIT: Duration = Duration::from_secs(10);

fn key(i: usize) -> RegistrationKey {
    RegistrationKey::new("acme", "echo", format!("i{i}")).unwrap()
}

fn register(key: &RegistrationKey) -> StreamMessage {
    StreamMessage {
        kind: Some(Kind::Register(Box::new(RegisterRequest {
            tenant_id: key.tenant_id().into(),
            connector_type: key.connector_type().into(),
            instance_id: key.instance_id().into(),
            version: "1.0.0".into(),
            auth_token: "secret-token".into(),
            max_concurrent_requests: 4,
            ..Default::default()
        }))),
    }
}

fn options(url: &str) -> MultiTransportOptions {
    MultiTransportOptions::builder(url)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn mux_for(options: &MultiTransportOptions) -> Arc<dyn StreamMux> {
    WsTransport::new().mux(options).await.unwrap()
}

async fn next(stream: &mut MessageStream) -> Option<Result<StreamMessage, TransportError>> {
    timeout(WAIT, stream.inbound.next())
        .await
        .expect("inbound stalled")
}

async fn expect_approved(stream: &mut MessageStream) {
    let msg = next(stream).await.expect("stream ended").expect("error");
    match msg.kind {
        Some(Kind::RegisterResponse(r)) => {
            assert_eq!(r.status, RegistrationStatus::Approved as i32, "{r:?}")
        }
        other => panic!("expected register_response, got {other:?}"),
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
async fn wait_closed_by_client(engine: &TestServer, key: &str) {
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

async fn ws_server() -> (TestServer, WsTestServer) {
    let engine = TestServer::new();
    let server = WsTestServer::start(engine.clone(), WsServerOptions::default())
        .await
        .unwrap();
    (engine, server)
}

fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "connector-ws-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_opens_twenty_sockets_each_registered() {
    let (engine, server) = ws_server().await;
    let opts = options(&server.url());
    let mux = mux_for(&opts).await;
    let keys: Vec<_> = (0..20).map(key).collect();
    let opens = keys.iter().map(|k| mux.open(k, register(k)));
    let mut streams: Vec<MessageStream> = futures_util::future::join_all(opens)
        .await
        .into_iter()
        .map(|r| r.expect("open"))
        .collect();
    for s in &mut streams {
        expect_approved(s).await;
    }
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
    assert!(regs.iter().all(|r| r.register.auth_token == "secret-token"));

    drop(streams);
    wait_no_sockets(&*mux).await;
    server.wait_for_connection_count(0, WAIT).await.unwrap();
}

#[tokio::test]
async fn messages_flow_both_ways() {
    let (engine, server) = ws_server().await;
    let mux = mux_for(&options(&server.url())).await;
    let k = key(0);
    let mut s = mux.open(&k, register(&k)).await.unwrap();
    expect_approved(&mut s).await;

    let pending = engine
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

#[tokio::test]
async fn text_frame_is_a_protocol_error_then_the_stream_ends() {
    let (engine, server) = ws_server().await;
    let mux = mux_for(&options(&server.url())).await;
    let k = key(0);
    let mut s = mux.open(&k, register(&k)).await.unwrap();
    expect_approved(&mut s).await;

    assert!(server.send_text_frame(&k.to_string()));
    let err = next(&mut s).await.expect("an error first").unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Protocol, "{err}");
    assert!(next(&mut s).await.is_none(), "then the stream ends");
    // The client closed the socket (code 1003); the server sees it go.
    server.wait_for_connection_count(0, WAIT).await.unwrap();
    drop(s);
    wait_no_sockets(&*mux).await;
    assert!(engine.stats().protocol_errors.is_empty());
}

#[tokio::test]
async fn garbage_binary_frame_is_a_protocol_error() {
    let (_engine, server) = ws_server().await;
    let mux = mux_for(&options(&server.url())).await;
    let k = key(0);
    let mut s = mux.open(&k, register(&k)).await.unwrap();
    expect_approved(&mut s).await;

    assert!(server.send_garbage_frame(&k.to_string()));
    let err = next(&mut s).await.expect("an error first").unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Protocol, "{err}");
    assert!(err.message().contains("not a StreamMessage"), "{err}");
    assert!(next(&mut s).await.is_none());
    server.wait_for_connection_count(0, WAIT).await.unwrap();
}

#[tokio::test]
async fn oversized_frame_is_a_protocol_error() {
    let (_engine, server) = ws_server().await;
    let opts = options(&server.url())
        .to_builder()
        .max_message_size(2048)
        .build()
        .unwrap();
    let mux = mux_for(&opts).await;
    let k = key(0);
    let mut s = mux.open(&k, register(&k)).await.unwrap();
    expect_approved(&mut s).await;

    assert!(server.send_oversized_frame(&k.to_string(), 64 * 1024));
    let err = next(&mut s).await.expect("an error first").unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Protocol, "{err}");
    assert!(err.message().contains("oversized"), "{err}");
    assert!(next(&mut s).await.is_none());
    server.wait_for_connection_count(0, WAIT).await.unwrap();
}

#[tokio::test]
async fn server_close_ends_the_stream() {
    let (engine, server) = ws_server().await;
    let mux = mux_for(&options(&server.url())).await;
    let k = key(0);
    let mut s = mux.open(&k, register(&k)).await.unwrap();
    expect_approved(&mut s).await;

    engine.close_stream(&k).expect("close_stream");
    assert!(
        next(&mut s).await.is_none(),
        "a server close ends the stream"
    );
    server.wait_for_connection_count(0, WAIT).await.unwrap();
    drop(s);
    wait_no_sockets(&*mux).await;
}

#[tokio::test]
async fn killed_connection_is_a_closed_error() {
    let (_engine, server) = ws_server().await;
    let mux = mux_for(&options(&server.url())).await;
    let k = key(0);
    let mut s = mux.open(&k, register(&k)).await.unwrap();
    expect_approved(&mut s).await;

    assert_eq!(server.kill_all_connections(), 1);
    // A socket dropped without a close frame is an error, never a clean
    // end of stream (`None` would read as "the server closed it").
    match next(&mut s).await {
        Some(Err(e)) => assert_eq!(e.kind(), TransportErrorKind::Closed, "{e}"),
        None => panic!("a killed connection ended the stream cleanly"),
        Some(Ok(m)) => panic!("unexpected message {m:?}"),
    }
    assert!(next(&mut s).await.is_none());
    drop(s);
    wait_no_sockets(&*mux).await;
}

#[tokio::test]
async fn dropping_the_stream_closes_the_socket_and_ends_the_writer() {
    let (engine, server) = ws_server().await;
    let mux = mux_for(&options(&server.url())).await;
    let k = key(0);
    let mut s = mux.open(&k, register(&k)).await.unwrap();
    expect_approved(&mut s).await;
    assert_eq!(mux.stats().open_connections(), 1);

    drop(s);
    wait_closed_by_client(&engine, &k.to_string()).await;
    server.wait_for_connection_count(0, WAIT).await.unwrap();
    wait_no_sockets(&*mux).await;
}

#[tokio::test]
async fn dropping_the_sender_half_closes_and_inbound_then_ends() {
    let (engine, server) = ws_server().await;
    let mux = mux_for(&options(&server.url())).await;
    let k = key(0);
    let mut s = mux.open(&k, register(&k)).await.unwrap();
    expect_approved(&mut s).await;
    let MessageStream {
        outbound,
        mut inbound,
        ..
    } = s;
    drop(outbound);
    let rest: Vec<_> = timeout(WAIT, inbound.by_ref().collect::<Vec<_>>())
        .await
        .expect("inbound must end after the close handshake");
    assert!(rest.iter().all(|r| r.is_ok()), "{rest:?}");
    wait_closed_by_client(&engine, &k.to_string()).await;
    server.wait_for_connection_count(0, WAIT).await.unwrap();
    drop(inbound);
    wait_no_sockets(&*mux).await;
}

#[tokio::test]
async fn close_ends_everything_and_refuses_new_opens() {
    let (_engine, server) = ws_server().await;
    let mux = mux_for(&options(&server.url())).await;
    let mut streams = Vec::new();
    for i in 0..3 {
        let k = key(i);
        let mut s = mux.open(&k, register(&k)).await.unwrap();
        expect_approved(&mut s).await;
        streams.push(s);
    }
    // The runner drops its streams before closing the mux; keep one inbound
    // half alive here to check close() still ends every writer.
    let held = streams.pop().unwrap();
    drop(streams);
    timeout(WAIT, mux.close()).await.expect("close is bounded");
    let MessageStream { mut inbound, .. } = held;
    let rest: Vec<_> = timeout(WAIT, inbound.by_ref().collect::<Vec<_>>())
        .await
        .expect("the held stream ends after close");
    assert!(rest.iter().all(|r| r.is_ok()), "{rest:?}");
    drop(inbound);
    wait_no_sockets(&*mux).await;
    server.wait_for_connection_count(0, WAIT).await.unwrap();

    let k = key(9);
    let err = mux.open(&k, register(&k)).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Closed, "{err}");
}

#[tokio::test]
async fn wss_with_the_testkit_ca() {
    let cert = TestCertificate::generate().unwrap();
    let engine = TestServer::new();
    let server = WsTestServer::start(engine.clone(), WsServerOptions::default().tls(cert.clone()))
        .await
        .unwrap();
    assert!(server.url().starts_with("wss://"));
    let dir = temp_dir("ca");
    let ca = cert.write_ca_pem(&dir).unwrap();
    let opts = options(&server.url())
        .to_builder()
        .ca_cert(ca)
        .build()
        .unwrap();
    let mux = mux_for(&opts).await;
    let k = key(0);
    let mut s = mux.open(&k, register(&k)).await.unwrap();
    expect_approved(&mut s).await;
    engine.wait_for_active(1, WAIT).await.unwrap();
    drop(s);
    server.wait_for_connection_count(0, WAIT).await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn wss_with_mutual_tls_identity() {
    let cert = TestCertificate::generate().unwrap();
    let server = WsTestServer::start(
        TestServer::new(),
        WsServerOptions::default().tls(cert.clone()),
    )
    .await
    .unwrap();
    let dir = temp_dir("mtls");
    let ca = cert.write_ca_pem(&dir).unwrap();
    let (client_cert, client_key) = cert.generate_client_identity("client-1").unwrap();
    std::fs::write(dir.join("client.pem"), client_cert).unwrap();
    std::fs::write(dir.join("client.key"), client_key).unwrap();
    let opts = options(&server.url())
        .to_builder()
        .ca_cert(ca)
        .client_identity(dir.join("client.pem"), dir.join("client.key"))
        .build()
        .unwrap();
    let mux = mux_for(&opts).await;
    let k = key(0);
    let mut s = mux.open(&k, register(&k)).await.unwrap();
    expect_approved(&mut s).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn wss_with_the_wrong_ca_is_a_tls_error() {
    let cert = TestCertificate::generate().unwrap();
    let other = TestCertificate::generate().unwrap();
    let server = WsTestServer::start(TestServer::new(), WsServerOptions::default().tls(cert))
        .await
        .unwrap();
    let dir = temp_dir("wrong-ca");
    let ca = other.write_ca_pem(&dir).unwrap();
    let opts = options(&server.url())
        .to_builder()
        .ca_cert(ca)
        .build()
        .unwrap();
    let mux = mux_for(&opts).await;
    let k = key(0);
    let err = mux.open(&k, register(&k)).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Tls, "{err}");
    assert_eq!(mux.stats().dials_failed, 1);
    assert_eq!(mux.stats().open_connections(), 0);
    let _ = std::fs::remove_dir_all(dir);
}

/// `trust_only_ca_cert`: the testkit CA alone is enough (the system roots
/// are not read), and a server signed by another CA is refused with a TLS
/// error that says to check `ca_cert`. Mirrors the gRPC test of the same
/// name: one trust rule (`connector_core::trust_anchors`) for both.
#[tokio::test]
async fn wss_trusting_only_the_given_ca() {
    let cert = TestCertificate::generate().unwrap();
    let other = TestCertificate::generate().unwrap();
    let engine = TestServer::new();
    let server = WsTestServer::start(engine.clone(), WsServerOptions::default().tls(cert.clone()))
        .await
        .unwrap();
    let dir = temp_dir("only-ca");
    let ca = cert.write_ca_pem(&dir).unwrap();
    let opts = options(&server.url())
        .to_builder()
        .trust_only_ca_cert(&ca)
        .build()
        .unwrap();
    assert!(opts.tls.trust_only_ca);
    let mux = mux_for(&opts).await;
    let k = key(0);
    let mut s = timeout(WAIT, mux.open(&k, register(&k)))
        .await
        .unwrap()
        .unwrap();
    expect_approved(&mut s).await;
    drop(s);

    let other_dir = temp_dir("only-other-ca");
    let other_ca = other.write_ca_pem(&other_dir).unwrap();
    let opts = options(&server.url())
        .to_builder()
        .trust_only_ca_cert(&other_ca)
        .build()
        .unwrap();
    let mux = mux_for(&opts).await;
    let err = timeout(WAIT, mux.open(&k, register(&k)))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Tls, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("ca_cert") && text.contains("invalid peer certificate"),
        "{text}"
    );
    assert_eq!(mux.stats().dials_failed, 1);

    // No CA at all: the system roots do not know the testkit CA (or the
    // machine has none, which is a config error naming ca_cert).
    let opts = options(&server.url());
    match WsTransport::new().mux(&opts).await {
        Ok(mux) => {
            let err = timeout(WAIT, mux.open(&k, register(&k)))
                .await
                .unwrap()
                .unwrap_err();
            assert_eq!(err.kind(), TransportErrorKind::Tls, "{err}");
            assert!(err.to_string().contains("ca_cert"), "{err}");
        }
        Err(err) => {
            assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
            assert!(err.to_string().contains("ca_cert"), "{err}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(other_dir);
}

#[tokio::test]
async fn bad_ca_path_is_a_config_error_from_mux() {
    let opts = options("wss://localhost:1")
        .to_builder()
        .ca_cert("/nonexistent/connector-ws/ca.pem")
        .build()
        .unwrap();
    let err = WsTransport::new()
        .mux(&opts)
        .await
        .err()
        .expect("must fail");
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
    assert!(
        err.message().contains("/nonexistent/connector-ws/ca.pem"),
        "{err}"
    );

    let dir = temp_dir("not-pem");
    std::fs::write(dir.join("ca.pem"), "not a certificate").unwrap();
    let opts = opts
        .to_builder()
        .ca_cert(dir.join("ca.pem"))
        .build()
        .unwrap();
    let err = WsTransport::new()
        .mux(&opts)
        .await
        .err()
        .expect("must fail");
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn grpc_url_and_bad_config_are_config_errors() {
    let err = WsTransport::new()
        .mux(&options("grpc://localhost:1"))
        .await
        .err()
        .expect("must fail");
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");

    let bad = WsTransport::with_config(WsConfig::default().max_concurrent_handshakes(0));
    let err = bad
        .mux(&options("ws://localhost:1"))
        .await
        .err()
        .expect("must fail");
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
    let source = std::error::Error::source(&err).expect("source");
    assert!(source
        .downcast_ref::<WsError>()
        .is_some_and(WsError::is_config));
}

#[tokio::test]
async fn refused_port_is_a_connect_error() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mux = mux_for(&options(&format!("ws://{addr}"))).await;
    let k = key(0);
    let err = mux.open(&k, register(&k)).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connect, "{err}");
    assert_eq!(mux.stats().dials_failed, 1);
}

#[tokio::test]
async fn wrong_path_is_refused() {
    let (_engine, server) = ws_server().await;
    let mux = mux_for(&options(&format!("{}/elsewhere", server.url()))).await;
    let k = key(0);
    let err = mux.open(&k, register(&k)).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Refused, "{err}");
    assert!(err.message().contains("404"), "{err}");
}

#[tokio::test]
async fn silent_server_is_a_timeout() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts and holds the socket, never answers the upgrade.
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let opts = MultiTransportOptions::builder(format!("ws://{addr}"))
        .connect_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let mux = mux_for(&opts).await;
    let k = key(0);
    let err = mux.open(&k, register(&k)).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Timeout, "{err}");
    hold.abort();
}

// ---- hand-scripted peers ----------------------------------------------------

/// A one-socket server: accepts one upgrade (selecting `connector.v1` when
/// `select` is true), reads the first frame, and hands the socket to the test.
async fn scripted_server(
    select: bool,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<(WebSocketStream<TcpStream>, StreamMessage)>,
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

#[tokio::test]
async fn register_is_the_first_frame_and_no_subprotocol_is_a_protocol_error() {
    // Server selects the subprotocol: the first frame is `register`.
    let (addr, server) = scripted_server(true).await;
    let mux = mux_for(&options(&format!("ws://{addr}"))).await;
    let k = key(0);
    let _s = mux.open(&k, register(&k)).await.unwrap();
    let (_ws, first) = timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(first, register(&k));

    // Server selects nothing: the client must refuse the socket.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = tokio_tungstenite::accept_async(tcp).await;
    });
    let mux = mux_for(&options(&format!("ws://{addr}"))).await;
    let err = mux.open(&k, register(&k)).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Protocol, "{err}");
    assert!(err.message().contains("subprotocol"), "{err}");
    let _ = server.await;
}

#[tokio::test]
async fn client_pings_and_answers_pings() {
    let (addr, server) = scripted_server(true).await;
    let opts = options(&format!("ws://{addr}"));
    let transport = WsTransport::with_config(
        WsConfig::default().ping_interval(Some(Duration::from_millis(50))),
    );
    let mux = transport.mux(&opts).await.unwrap();
    let k = key(0);
    let s = mux.open(&k, register(&k)).await.unwrap();
    let MessageStream {
        outbound,
        mut inbound,
        ..
    } = s;
    // The driver keeps reading; that is what flushes pong replies.
    let reader = tokio::spawn(async move { inbound.next().await.map(|r| r.map_err(|e| e.kind())) });
    let (mut ws, _) = timeout(WAIT, server).await.unwrap().unwrap();

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

#[tokio::test]
async fn handshakes_are_paced() {
    // Two handshakes at most; a silent server holds them until the timeout.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::unbounded_channel();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
            let _ = accepted_tx.send(());
        }
    });
    let opts = MultiTransportOptions::builder(format!("ws://{addr}"))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
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
        let (addr, server) = scripted_server(true).await;
        let opts = options(&format!("ws://{addr}"))
            .to_builder()
            .max_message_size(4096)
            .build()
            .unwrap();
        let mux = mux_for(&opts).await;
        let k = key(0);
        let mut s = mux.open(&k, register(&k)).await.unwrap();
        let (mut ws, _) = timeout(WAIT, server).await.unwrap().unwrap();
        ws.send(frame).await.unwrap();
        let err = next(&mut s).await.expect("an error").unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::Protocol, "{err}");
        assert!(next(&mut s).await.is_none());
        assert_eq!(client_close_code(&mut ws).await, code);
    }
}

#[tokio::test]
async fn messages_queued_before_the_drop_are_sent_before_the_close() {
    let (addr, server) = scripted_server(true).await;
    let mux = mux_for(&options(&format!("ws://{addr}"))).await;
    let k = key(0);
    let s = mux.open(&k, register(&k)).await.unwrap();
    let (mut ws, _) = timeout(WAIT, server).await.unwrap().unwrap();
    let heartbeat = |n: u64| StreamMessage {
        kind: Some(Kind::Heartbeat(connector_core::proto::Heartbeat {
            sequence: n,
            sent_at_unix_ms: 0,
        })),
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
