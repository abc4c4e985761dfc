//! What the gRPC mux tests (`mux.rs`, `server_limit.rs`) build the same
//! way: registrations the test opens itself, a testkit server, and the
//! per-channel counts they check.
#![allow(dead_code)] // each test binary takes a different subset

use std::sync::Arc;
use std::time::Duration;

use connector_core::{
    MessageStream, MultiTransportOptions, MultiTransportOptionsBuilder, StreamMux, TransportError,
};
use connector_proto::{Heartbeat, Kind, RegistrationStatus, StreamMessage};
use connector_testkit::harness::{key, register_message, WAIT};
use connector_testkit::{GrpcServerOptions, GrpcTestServer, TestServer};
use futures_util::StreamExt;
use tokio::time::timeout;

/// The `register` of `key(i)`: version 1.0.0, one request at a time.
pub(crate) fn register(i: usize) -> StreamMessage {
    register_message(&key(i), 1)
}

/// Client options for `url` with a 5 s connect timeout.
pub(crate) fn options(url: &str) -> MultiTransportOptionsBuilder {
    MultiTransportOptions::builder(url).connect_timeout(Duration::from_secs(5))
}

/// A testkit engine and a gRPC server in front of it.
pub(crate) async fn start(opts: GrpcServerOptions) -> (TestServer, GrpcTestServer) {
    let engine = TestServer::new();
    let server = GrpcTestServer::start(engine.clone(), opts)
        .await
        .expect("server starts");
    (engine, server)
}

/// Reads the next message, bounded.
pub(crate) async fn next(
    stream: &mut MessageStream,
) -> Option<Result<StreamMessage, TransportError>> {
    timeout(WAIT, stream.inbound.next())
        .await
        .expect("a message or the end in time")
}

/// Opens registration `i` (bounded) and checks the server approved it.
pub(crate) async fn open_registered<M: StreamMux + ?Sized>(mux: &M, i: usize) -> MessageStream {
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

/// Opens registration `i` (bounded), expecting the open itself to fail.
pub(crate) async fn open_err<M: StreamMux + ?Sized>(mux: &M, i: usize) -> TransportError {
    timeout(WAIT, mux.open(&key(i), register(i)))
        .await
        .expect("open in time")
        .err()
        .unwrap_or_else(|| panic!("open {i} must fail"))
}

/// Opens the registrations of `range` at once, one task each.
pub(crate) async fn open_many<M: StreamMux + ?Sized + 'static>(
    mux: &Arc<M>,
    range: std::ops::Range<usize>,
) -> Vec<MessageStream> {
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
pub(crate) async fn heartbeat(stream: &mut MessageStream, sequence: u64) {
    stream
        .outbound
        .send(StreamMessage {
            kind: Some(Kind::Heartbeat(Box::new(Heartbeat {
                sequence,
                sent_at_unix_ms: 1,
            }))),
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

/// Largest first.
fn sorted(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable_by(|a, b| b.cmp(a));
    v
}

/// Streams per client channel, largest first.
pub(crate) fn streams_per_channel(mux: &dyn StreamMux) -> Vec<usize> {
    sorted(mux.stats().connections.iter().map(|c| c.streams).collect())
}

/// Open streams per server-side connection, largest first.
pub(crate) fn server_streams_per_connection(server: &GrpcTestServer) -> Vec<usize> {
    sorted(
        server
            .connections()
            .iter()
            .map(|c| c.open_streams)
            .collect(),
    )
}

/// A port nobody listens on: bind, read the port, close.
pub(crate) async fn closed_port() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("addr")
}

/// The id of the server connection that carries exactly `n` open streams,
/// once the server has `connections` connections.
pub(crate) async fn connection_carrying(
    server: &GrpcTestServer,
    connections: usize,
    n: usize,
) -> u64 {
    server
        .wait_for_connection_count(connections, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{connections} connections: {e}"));
    server
        .connections()
        .into_iter()
        .find(|c| c.open_streams == n)
        .unwrap_or_else(|| panic!("a connection with {n} streams: {:?}", server.connections()))
        .connection_id
}
