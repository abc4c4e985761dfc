//! `GrpcMux::probe` and `GrpcError::http2_refusal` against real loopback
//! listeners: a gRPC server, an HTTP/1.1-only one, and a closed port.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::time::Duration;

use connector_core::MultiTransportOptions;
use connector_grpc::{GrpcMux, Http2Refusal};
use connector_testkit::harness::WAIT;
use connector_testkit::{GrpcServerOptions, Http1OnlyServer, ServerEvent};
use support::{closed_port, start};

fn mux(url: &str) -> GrpcMux {
    let options = MultiTransportOptions::builder(url)
        .connect_timeout(Duration::from_secs(2))
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
async fn probe_of_an_http1_server_is_a_suspect_refusal() {
    let mut http1 = Http1OnlyServer::start().await.unwrap();
    let err = mux(&http1.grpc_url()).probe().await.unwrap_err();
    assert_eq!(
        err.http2_refusal(),
        Some(Http2Refusal::ProtocolError),
        "{err}"
    );
    assert!(!err.is_protocol_fatal());
    assert!(http1.answered() >= 1);
    http1.stop().await;
}

#[tokio::test]
async fn probe_of_a_closed_port_is_no_refusal() {
    let err = mux(&format!("grpc://{}", closed_port().await))
        .probe()
        .await
        .unwrap_err();
    assert_eq!(err.http2_refusal(), None, "{err}");
}
