//! A real, in-process `connector.v1` control-plane server for tests: ours
//! and those of the SDK's users.
//!
//! The [`TestServer`] engine is the server side of the wire contract
//! (register, approval, heartbeats, execute bookkeeping) plus a handle to
//! steer it: approve or reject, send executes and await their responses,
//! inject faults (stalled acks, drains, raw messages, closed streams), and
//! assert on counters ([`ServerStats`]) and an event log ([`ServerEvent`]).
//! Anything the client gets wrong is recorded as a protocol error rather
//! than ignored, so a test can fail loudly on it.
//!
//! The engine is transport-agnostic; front-ends only move messages:
//!
//! - [`MemoryMux`] / [`MemoryTransport`]: in-memory channels implementing
//!   `connector_core::StreamMux`, for fast deterministic runner tests on
//!   paused tokio time;
//! - [`GrpcTestServer`]: tonic over a loopback socket, with connection
//!   accounting and abrupt kills, optional TLS;
//! - [`WsTestServer`]: WebSocket over a loopback socket, with frame-level
//!   fault injection, optional TLS.
//!
//! [`conformance`] is the transport-independent story suite, run over any
//! client transport with [`conformance_suite!`].
//!
//! [`connectors`] has the stock connectors tests run ([`connectors::Echo`],
//! [`connectors::Sleep`], [`connectors::Fail`], [`connectors::Counting`]).
//!
//! Servers bind `127.0.0.1:0` and every wait is on an event with a bounded
//! timeout, so tests run in parallel without fixed ports or sleeps.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), connector_testkit::TestkitError> {
//! use std::time::Duration;
//! use connector_testkit::{GrpcServerOptions, GrpcTestServer, TestServer};
//!
//! let engine = TestServer::new();
//! let server = GrpcTestServer::start(engine.clone(), GrpcServerOptions::default()).await?;
//! // Point a runner at `server.url()`, then:
//! // engine.wait_for_active(1, Duration::from_secs(5)).await?;
//! assert!(server.url().starts_with("grpc://127.0.0.1:"));
//! assert_eq!(engine.active_keys().len(), 0);
//! server.stop().await;
//! # let _ = Duration::ZERO;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
// With a front-end compiled out (`grpc` or `ws` off), the socket and TLS
// helpers only that front-end uses are unused; that is expected.
#![cfg_attr(not(all(feature = "grpc", feature = "ws")), allow(dead_code))]

// The stories start a testkit front-end for the transport under test.
#[cfg(any(feature = "grpc", feature = "ws"))]
pub mod conformance;
mod conn;
pub mod connectors;
mod engine;
mod error;
#[cfg(feature = "grpc")]
mod grpc_server;
pub mod harness;
mod http1_only;
mod memory;
mod proxy;
#[cfg(any(feature = "grpc", feature = "ws"))]
mod socket_server;
mod tls;
#[cfg(feature = "ws")]
mod ws_server;

pub use conn::ConnectionInfo;
pub use engine::{
    ApprovalPolicy, CloseCause, ConnectionMeta, PendingExecute, RegistrationInfo, ServerEvent,
    ServerStats, TestServer,
};
pub use error::TestkitError;
#[cfg(feature = "grpc")]
pub use grpc_server::{GrpcServerOptions, GrpcTestServer};
pub use http1_only::Http1OnlyServer;
pub use memory::{MemoryMux, MemoryTransport};
pub use proxy::ConnectProxy;
pub use tls::TestCertificate;
#[cfg(feature = "ws")]
pub use ws_server::{WsServerOptions, WsTestServer};

/// The wire protocol's messages, re-exported for tests that play the client.
pub use connector_proto as proto;
