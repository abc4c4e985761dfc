//! The gRPC front-end over real loopback sockets, driven by a raw tonic
//! client: connection accounting, kills, restart, TLS, the HTTP/2 stream cap.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod support;

use common::*;
use connector_proto::connector_service_client::ConnectorServiceClient;
use connector_testkit::proto::{Kind, RegistrationStatus, StreamMessage};
use connector_testkit::{GrpcServerOptions, GrpcTestServer, ServerEvent, TestCertificate};
use support::{start_grpc, wait_no_registrations};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Streaming;

/// One `Connect` call as the test sees it.
struct Call {
    tx: mpsc::Sender<StreamMessage>,
    rx: Streaming<StreamMessage>,
}

async fn channel(server: &GrpcTestServer) -> Channel {
    let url = format!("http://{}", server.addr());
    Endpoint::from_shared(url).unwrap().connect().await.unwrap()
}

/// Opens a call, sending `register` before waiting for response headers,
/// as the wire contract asks.
async fn open(ch: &Channel, register: StreamMessage) -> Call {
    let (tx, rx) = mpsc::channel(16);
    tx.send(register).await.unwrap();
    let mut client = ConnectorServiceClient::new(ch.clone());
    let resp = tokio::time::timeout(T, client.connect(ReceiverStream::new(rx)))
        .await
        .expect("timed out opening the call")
        .expect("call refused");
    Call {
        tx,
        rx: resp.into_inner(),
    }
}

async fn next(call: &mut Call) -> StreamMessage {
    tokio::time::timeout(T, call.rx.message())
        .await
        .expect("timed out waiting for a server message")
        .expect("call failed")
        .expect("call ended")
}

async fn open_approved(ch: &Channel, instance: &str) -> Call {
    let mut call = open(ch, register("t1", "echo", instance)).await;
    let r = expect_register_response(next(&mut call).await);
    assert_eq!(r.status, RegistrationStatus::Approved as i32);
    call
}

#[tokio::test]
async fn three_streams_share_one_connection() {
    let (engine, server) = start_grpc(GrpcServerOptions::default()).await;
    assert_eq!(server.url(), format!("grpc://{}", server.addr()));
    let ch = channel(&server).await;
    let _a = open_approved(&ch, "a").await;
    let _b = open_approved(&ch, "b").await;
    let _c = open_approved(&ch, "c").await;

    assert_eq!(server.connection_count(), 1);
    assert_eq!(server.total_connections_accepted(), 1);
    let regs = engine.registrations();
    assert_eq!(regs.len(), 3);
    assert!(regs.iter().all(|r| r.transport == "grpc"));
    assert!(regs
        .iter()
        .all(|r| r.connection_id == regs[0].connection_id));
    let conns = server.connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].connection_id, regs[0].connection_id);
    assert_eq!(conns[0].peer, regs[0].peer);
    assert_eq!(conns[0].open_streams, 3);
}

#[tokio::test]
async fn execute_and_server_close_over_grpc() {
    let (engine, server) = start_grpc(GrpcServerOptions::default()).await;
    let ch = channel(&server).await;
    let mut call = open_approved(&ch, "i1").await;

    let pending = engine
        .send_execute(&"t1.echo.i1".parse().expect("a key"), exec_req("r1"))
        .unwrap();
    assert!(
        matches!(next(&mut call).await.kind, Some(Kind::ExecuteRequest(r)) if r.request_id == "r1")
    );
    call.tx.send(exec_resp("r1")).await.unwrap();
    assert!(pending.wait(T).await.unwrap().success);

    // A server close is a clean end of the response stream.
    engine
        .close_stream(&"t1.echo.i1".parse().expect("a key"))
        .expect("close_stream");
    let end = tokio::time::timeout(T, call.rx.message()).await.unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    assert_eq!(engine.stats().outstanding, 0);
}

// Multi-threaded on purpose: the kill must wake IO parked on another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_connection_breaks_the_client_and_it_can_reconnect() {
    let (engine, server) = start_grpc(GrpcServerOptions::default()).await;
    let ch = channel(&server).await;
    let mut a = open_approved(&ch, "a").await;
    let mut b = open_approved(&ch, "b").await;
    let id = server.connections()[0].connection_id;

    assert!(server.kill_connection(id));
    for call in [&mut a, &mut b] {
        let r = tokio::time::timeout(T, call.rx.message()).await.unwrap();
        assert!(
            r.is_err(),
            "a killed connection must fail the call, got {r:?}"
        );
    }
    server.wait_for_connection_count(0, T).await.unwrap();
    wait_no_registrations(&engine).await;
    assert!(!server.kill_connection(id));

    // The server takes new connections after a kill. (A fresh channel: a
    // reused tonic channel may still route its first call to the dying
    // connection, a client-side race that is not under test here.)
    let ch = channel(&server).await;
    let _c = open_approved(&ch, "c").await;
    assert_eq!(server.total_connections_accepted(), 2);
    assert_eq!(server.connection_count(), 1);
    assert_eq!(server.kill_all_connections(), 1);
}

#[tokio::test]
async fn restart_serves_again_on_the_same_port() {
    let (_engine, server) = start_grpc(GrpcServerOptions::default()).await;
    let addr = server.addr();
    let ch = channel(&server).await;
    let mut a = open_approved(&ch, "a").await;

    server.restart().await.unwrap();
    assert_eq!(server.addr(), addr);
    let r = tokio::time::timeout(T, a.rx.message()).await.unwrap();
    assert!(r.is_err(), "the restart kills live calls, got {r:?}");

    let ch2 = channel(&server).await;
    let _b = open_approved(&ch2, "b").await;
    assert_eq!(server.connection_count(), 1);

    // After stop nothing listens on the port.
    server.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    server.wait_for_connection_count(0, T).await.unwrap();
}

/// A channel to `https://localhost:{port}` trusting only `ca`'s CA.
async fn tls_channel(port: u16, ca: &TestCertificate) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.ca_pem()))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

#[tokio::test]
async fn tls_server_accepts_a_client_trusting_the_ca() {
    let cert = TestCertificate::generate().unwrap();
    let (_engine, server) = start_grpc(GrpcServerOptions::default().tls(cert.clone())).await;
    let port = server.addr().port();
    assert_eq!(server.url(), format!("grpcs://localhost:{port}"));

    let ch = tls_channel(port, &cert).await.unwrap();
    let _a = open_approved(&ch, "a").await;
    assert_eq!(server.connection_count(), 1);

    // A client trusting some other CA is turned away at the handshake.
    let other = TestCertificate::generate().unwrap();
    let r = tls_channel(port, &other).await;
    assert!(r.is_err(), "{r:?}");
    // Kill still works under TLS.
    server.kill_all_connections();
    server.wait_for_connection_count(0, T).await.unwrap();
}

#[tokio::test]
async fn max_concurrent_streams_makes_the_next_call_wait_for_a_slot() {
    let (engine, server) = start_grpc(GrpcServerOptions::default().max_concurrent_streams(1)).await;
    let ch = channel(&server).await;
    let mut a = open_approved(&ch, "a").await;
    let first = engine.registrations()[0].stream_id;

    let ch2 = ch.clone();
    let second = tokio::spawn(async move { open_approved(&ch2, "b").await });
    engine
        .close_stream(&"t1.echo.a".parse().expect("a key"))
        .expect("close_stream");
    let end = tokio::time::timeout(T, a.rx.message()).await.unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(a);
    let _b = tokio::time::timeout(T, second).await.unwrap().unwrap();

    // The second stream could only open once the first was gone.
    let events = engine.events();
    let closed_at = events
        .iter()
        .position(
            |e| matches!(e, ServerEvent::StreamClosed { stream_id, .. } if *stream_id == first),
        )
        .unwrap();
    let opened_second = events
        .iter()
        .rposition(|e| matches!(e, ServerEvent::StreamOpened { .. }))
        .unwrap();
    assert!(closed_at < opened_second, "{events:?}");
    assert_eq!(server.connection_count(), 1);
}
