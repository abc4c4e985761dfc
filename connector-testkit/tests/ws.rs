//! The WebSocket front-end over real loopback sockets, driven by a raw
//! tokio-tungstenite client: upgrade rules, frame rules, faults, TLS.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod support;

use std::sync::Arc;

use common::*;
use connector_testkit::proto::{Kind, RegistrationStatus, StreamMessage};
use connector_testkit::{TestCertificate, TestServer, WsServerOptions, WsTestServer};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use support::{start_ws, wait_no_registrations};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

const KEY: &str = "t1.echo.i1";

fn key() -> connector_core::RegistrationKey {
    KEY.parse().expect("a key")
}

fn request(url: &str, subprotocol: Option<&str>) -> Request {
    let mut req = url.into_client_request().unwrap();
    if let Some(p) = subprotocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
    }
    req
}

async fn connect(server: &WsTestServer) -> ClientWs {
    let url = format!("{}/v1/connect", server.url());
    let (ws, resp) = tokio::time::timeout(
        T,
        tokio_tungstenite::connect_async(request(&url, Some("connector.v1"))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        resp.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "connector.v1"
    );
    ws
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, m: StreamMessage) {
    ws.send(Message::Binary(m.encode_to_vec().into()))
        .await
        .unwrap();
}

/// The next frame that is not a ping/pong.
async fn next_frame<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Message {
    loop {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket failed");
        if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
            return m;
        }
    }
}

async fn next_msg<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> StreamMessage {
    match next_frame(ws).await {
        Message::Binary(b) => StreamMessage::decode(b).unwrap(),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

async fn expect_close<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    code: CloseCode,
) {
    match next_frame(ws).await {
        Message::Close(Some(f)) => assert_eq!(f.code, code, "{f:?}"),
        other => panic!("expected close {code}, got {other:?}"),
    }
}

type ClientWs = WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A testkit server (`opts`) and a client socket on it whose `register`
/// for `KEY` was answered (the answer is returned too).
async fn registered(
    opts: WsServerOptions,
) -> (
    TestServer,
    WsTestServer,
    ClientWs,
    connector_testkit::proto::RegisterResponse,
) {
    let (engine, server) = start_ws(opts).await;
    let (ws, r) = connect_registered(&server).await;
    (engine, server, ws, r)
}

/// A client socket on `server` whose `register` for `KEY` was answered.
async fn connect_registered(
    server: &WsTestServer,
) -> (ClientWs, connector_testkit::proto::RegisterResponse) {
    let mut ws = connect(server).await;
    send(&mut ws, register("t1", "echo", "i1")).await;
    let r = expect_register_response(next_msg(&mut ws).await);
    (ws, r)
}

/// The next thing from a socket the server dropped without a close frame:
/// an error, never a clean end or a frame.
async fn expect_reset(ws: &mut ClientWs, what: &str) {
    match tokio::time::timeout(T, ws.next()).await.unwrap() {
        Some(Err(_)) => {}
        other => panic!("{what}: expected the socket to die, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_and_gets_approved() {
    let (engine, server, mut ws, r) = registered(WsServerOptions::default()).await;
    assert_eq!(server.url(), format!("ws://{}", server.addr()));
    assert_eq!(r.status, RegistrationStatus::Approved as i32);
    assert_eq!(r.address, KEY);

    let regs = engine.registrations();
    assert_eq!(regs.len(), 1);
    assert_eq!(regs[0].transport, "ws");
    let conns = server.connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].connection_id, regs[0].connection_id);
    assert_eq!(conns[0].open_streams, 1);

    // Heartbeat and execute over frames.
    send(&mut ws, heartbeat(7, 99)).await;
    assert!(matches!(next_msg(&mut ws).await.kind, Some(Kind::HeartbeatAck(a)) if a.sequence == 7));
    let pending = engine.send_execute(&key(), exec_req("r1")).unwrap();
    assert!(matches!(
        next_msg(&mut ws).await.kind,
        Some(Kind::ExecuteRequest(_))
    ));
    send(&mut ws, exec_resp("r1")).await;
    assert!(pending.wait(T).await.unwrap().success);

    // Client close: the stream and the socket go away.
    ws.close(None).await.unwrap();
    wait_no_registrations(&engine).await;
    server.wait_for_connection_count(0, T).await.unwrap();
}

#[tokio::test]
async fn wrong_path_is_404_and_missing_subprotocol_is_400() {
    let (engine, server) = start_ws(WsServerOptions::default()).await;
    let bad_path = format!("{}/v2/other", server.url());
    match tokio_tungstenite::connect_async(request(&bad_path, Some("connector.v1"))).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected a 404 refusal, got {:?}", other.map(|_| ())),
    }
    let url = format!("{}/v1/connect", server.url());
    match tokio_tungstenite::connect_async(request(&url, Some("other.v9"))).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 400),
        other => panic!("expected a 400 refusal, got {:?}", other.map(|_| ())),
    }
    assert_eq!(engine.stats().streams_opened, 0);
}

/// A bad frame from the client: the server closes with the contract's
/// code, records one protocol error saying what it was, and drops the
/// registration.
#[tokio::test]
async fn bad_client_frames_close_with_the_contract_codes() {
    let cases = [
        (
            Message::Text("hello".into()),
            CloseCode::Unsupported,
            "text frame",
        ),
        (
            Message::Binary(vec![0xff; 11].into()),
            CloseCode::Invalid,
            "",
        ),
    ];
    for (frame, code, says) in cases {
        let (engine, _server, mut ws, _) = registered(WsServerOptions::default()).await;
        engine.expect_protocol_errors();
        ws.send(frame).await.unwrap();
        expect_close(&mut ws, code).await;
        let errs = engine.stats().protocol_errors;
        assert_eq!(errs.len(), 1, "{code}: {errs:?}");
        assert!(errs[0].contains(says), "{code}: {errs:?}");
        wait_no_registrations(&engine).await;
    }
}

#[tokio::test]
async fn server_side_faults_reach_the_client() {
    let (engine, server, mut ws, _) = registered(WsServerOptions::default()).await;

    assert!(server.send_text_frame(KEY));
    assert!(matches!(next_frame(&mut ws).await, Message::Text(_)));
    assert!(server.send_garbage_frame(KEY));
    match next_frame(&mut ws).await {
        Message::Binary(b) => assert!(StreamMessage::decode(b).is_err()),
        other => panic!("expected binary, got {other:?}"),
    }
    assert!(server.send_oversized_frame(KEY, 100_000));
    match next_frame(&mut ws).await {
        Message::Binary(b) => assert_eq!(b.len(), 100_000),
        other => panic!("expected binary, got {other:?}"),
    }
    assert!(!server.send_text_frame("t1.echo.nobody"));

    // Server close is a normal close frame.
    engine.close_stream(&key()).expect("close_stream");
    expect_close(&mut ws, CloseCode::Normal).await;
}

#[tokio::test]
async fn kill_connection_drops_the_socket_without_a_close_frame() {
    let (engine, server, mut ws, _) = registered(WsServerOptions::default()).await;
    let id = server.connections()[0].connection_id;
    assert!(server.kill_connection(id));
    expect_reset(&mut ws, "a killed connection").await;
    server.wait_for_connection_count(0, T).await.unwrap();
    wait_no_registrations(&engine).await;
}

#[tokio::test]
async fn restart_and_stop() {
    let (_engine, server, mut ws, _) = registered(WsServerOptions::default()).await;
    let addr = server.addr();
    server.restart().await.unwrap();
    expect_reset(&mut ws, "a restart").await;
    assert_eq!(server.addr(), addr);
    let (_ws, r) = connect_registered(&server).await;
    assert_eq!(r.status, RegistrationStatus::Approved as i32);
    assert_eq!(server.total_connections_accepted(), 2);
    server.stop().await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn max_message_size_is_enforced_on_client_frames() {
    let (engine, _server, mut ws, _) =
        registered(WsServerOptions::default().max_message_size(1024)).await;
    let mut big = exec_resp("r1");
    if let Some(Kind::ExecuteResponse(r)) = &mut big.kind {
        r.payload = vec![1; 4096].into();
    }
    send(&mut ws, big).await;
    wait_no_registrations(&engine).await;
    assert_eq!(engine.stats().responses_received, 0);
}

#[tokio::test]
async fn wss_with_the_test_ca() {
    let cert = TestCertificate::generate().unwrap();
    let (_engine, server) = start_ws(WsServerOptions::default().tls(cert.clone())).await;
    let port = server.addr().port();
    assert_eq!(server.url(), format!("wss://localhost:{port}"));

    let mut roots = rustls::RootCertStore::empty();
    let dir = std::env::temp_dir().join(format!("testkit-ws-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_path = cert.write_ca_pem(&dir).unwrap();
    let pem = std::fs::read(&ca_path).unwrap();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(server.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let url = format!("wss://localhost:{port}/v1/connect");
    let (mut ws, _) = tokio_tungstenite::client_async(request(&url, Some("connector.v1")), tls)
        .await
        .unwrap();
    send(&mut ws, register("t1", "echo", "i1")).await;
    let r = expect_register_response(next_msg(&mut ws).await);
    assert_eq!(r.status, RegistrationStatus::Approved as i32);
    let _ = std::fs::remove_dir_all(&dir);
}
