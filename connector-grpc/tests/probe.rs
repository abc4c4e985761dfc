//! `GrpcMux::probe` and `GrpcError::http2_refusal` against real loopback
//! listeners: a gRPC server, an HTTP/1.1-only one, one that closes at once,
//! and a closed port. A dial to a server whose first bytes are not HTTP/2
//! ends at once with an error naming what it saw, not after the connect
//! timeout.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::time::Duration;

use connector_core::{MultiTransportOptions, TransportErrorKind};
use connector_grpc::{GrpcMux, Http2Refusal};
use connector_testkit::harness::WAIT;
use connector_testkit::{GrpcServerOptions, Http1OnlyServer, ServerEvent};
use support::{closed_port, start};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::time::timeout;

/// A connect timeout far beyond [`WAIT`]: a dial that waited for it would
/// fail the test.
const FOREVER: Duration = Duration::from_secs(3600);

fn mux(url: &str) -> GrpcMux {
    let options = MultiTransportOptions::builder(url)
        .connect_timeout(FOREVER)
        .build()
        .unwrap();
    GrpcMux::new(&options).unwrap()
}

#[tokio::test]
async fn probe_succeeds_on_grpc_and_registers_nothing() {
    let (engine, server) = start(GrpcServerOptions::default()).await;
    mux(&server.url()).probe().await.unwrap();
    // The server saw a stream that carried no register, and it ended.
    engine
        .wait_until(WAIT, |e| {
            e.events()
                .iter()
                .any(|ev| matches!(ev, ServerEvent::StreamClosed { key: None, .. }))
        })
        .await
        .unwrap();
    let stats = engine.stats();
    assert_eq!(stats.registers, 0);
    assert!(
        stats.protocol_errors.is_empty(),
        "{:?}",
        stats.protocol_errors
    );
    server.stop().await;
}

#[tokio::test]
async fn probe_of_an_http1_server_ends_at_once_as_a_suspect_refusal() {
    let mut http1 = Http1OnlyServer::start().await.unwrap();
    let err = timeout(WAIT, mux(&http1.grpc_url()).probe())
        .await
        .expect("the dial ends before its connect timeout")
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Protocol, "{err}");
    assert_eq!(err.http2_refusal(), Some(Http2Refusal::ProtocolError));
    assert!(!err.is_protocol_fatal());
    let text = err.to_string();
    assert!(text.contains("FRAME_SIZE_ERROR"), "{text}");
    assert!(text.contains("began with \"HTTP/1.1 \""), "{text}");
    assert_eq!(http1.answered(), 1, "one dial, one answer");
    http1.stop().await;
}

#[tokio::test]
async fn probe_of_a_server_that_closes_first_ends_at_once_as_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closer = tokio::spawn(async move {
        // Accept and close, politely, without a byte: a few times, since
        // the client may dial again.
        for _ in 0..4 {
            let (mut s, _) = listener.accept().await.unwrap();
            s.shutdown().await.unwrap();
        }
    });
    let err = timeout(WAIT, mux(&format!("grpc://{addr}")).probe())
        .await
        .expect("the dial ends before its connect timeout")
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Closed, "{err}");
    assert_eq!(err.http2_refusal(), None, "{err}");
    assert!(
        err.to_string()
            .contains("ended the connection before its HTTP/2 SETTINGS"),
        "{err}"
    );
    closer.abort();
}

#[tokio::test]
async fn probe_of_a_closed_port_is_no_refusal() {
    let err = mux(&format!("grpc://{}", closed_port().await))
        .probe()
        .await
        .unwrap_err();
    assert_eq!(err.http2_refusal(), None, "{err}");
}
