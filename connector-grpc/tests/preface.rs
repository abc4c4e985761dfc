//! A dial to a server whose first bytes are not HTTP/2 ends at once with an
//! error naming what it saw, not after the connect timeout.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use connector_core::{MultiTransportOptions, TransportErrorKind};
use connector_grpc::{GrpcMux, Http2Refusal};
use connector_testkit::harness::WAIT;
use connector_testkit::Http1OnlyServer;
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
async fn an_http1_answer_ends_the_dial_at_once_as_a_suspect_refusal() {
    let mut http1 = Http1OnlyServer::start().await.unwrap();
    let err = timeout(WAIT, mux(&http1.grpc_url()).probe())
        .await
        .expect("the dial ends before its connect timeout")
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Protocol, "{err}");
    assert_eq!(err.http2_refusal(), Some(Http2Refusal::ProtocolError));
    let text = err.to_string();
    assert!(text.contains("FRAME_SIZE_ERROR"), "{text}");
    assert!(text.contains("began with \"HTTP/1.1 \""), "{text}");
    assert_eq!(http1.answered(), 1, "one dial, one answer");
    http1.stop().await;
}

#[tokio::test]
async fn a_server_that_closes_first_ends_the_dial_at_once_as_a_closed_connection() {
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
