//! Server set-up and waits the front-end and engine tests (`grpc.rs`,
//! `ws.rs`, `engine_memory.rs`) share; the messages they send are in
//! `common`.
#![allow(dead_code)] // each test binary takes a different subset
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use connector_testkit::{
    GrpcServerOptions, GrpcTestServer, TestServer, WsServerOptions, WsTestServer,
};

use crate::common::T;

/// A fresh engine and its gRPC front-end.
pub(crate) async fn start_grpc(opts: GrpcServerOptions) -> (TestServer, GrpcTestServer) {
    let engine = TestServer::new();
    let server = GrpcTestServer::start(engine.clone(), opts).await.unwrap();
    (engine, server)
}

/// A fresh engine and its WebSocket front-end.
pub(crate) async fn start_ws(opts: WsServerOptions) -> (TestServer, WsTestServer) {
    let engine = TestServer::new();
    let server = WsTestServer::start(engine.clone(), opts).await.unwrap();
    (engine, server)
}

/// Waits (bounded) until the engine holds no registration: every stream
/// the test opened is gone on the server side too.
pub(crate) async fn wait_no_registrations(engine: &TestServer) {
    engine
        .wait_until(T, |e| e.registrations().is_empty())
        .await
        .unwrap_or_else(|e| panic!("registrations left: {e}: {:?}", engine.registrations()));
}
