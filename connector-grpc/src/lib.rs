//! gRPC transport for the connector SDK.
//!
//! [`GrpcTransport`] implements [`connector_core::Transport`] for
//! `grpc://` and `grpcs://` URLs. The [`GrpcMux`] it makes runs every
//! registration as one `connector.v1.ConnectorService/Connect` stream and
//! packs streams onto shared HTTP/2 connections (tonic channels), at most
//! `max_streams_per_channel` per connection, dialling another connection
//! only when every one is full. See [`GrpcMux`] for the accounting, the
//! handling of servers with a low concurrent-stream limit, channel health
//! and deadlines.
//!
//! TLS uses rustls (ring) with the system roots plus an optional extra CA
//! file, the server name taken from the URL, and an optional client
//! identity for mutual TLS.
//!
//! Behind an HTTP proxy (`MultiTransportOptions::proxy`: `HTTPS_PROXY`,
//! `HTTP_PROXY` and `NO_PROXY` by default, or an explicit URL) each
//! connection is an HTTP `CONNECT` tunnel to the server, with TLS and
//! HTTP/2 inside it, so the proxy never sees the traffic. A proxy that
//! refuses the tunnel (`407` for missing or wrong credentials) fails the
//! dial with [`GrpcError::Proxy`]; the registrations back off and retry.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use connector_core::{MultiTransportOptions, Transport};
//! use connector_grpc::GrpcTransport;
//!
//! let options = MultiTransportOptions::builder("grpcs://control.example.com:443")
//!     .ca_cert("/etc/connector/ca.pem")
//!     .build()?;
//! let mux = GrpcTransport::new().mux(&options).await?;
//! println!("{} connections", mux.stats().open_connections());
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod channel;
mod connector;
mod error;
mod mux;
mod pool;
mod settings;

pub use error::{Cause, GrpcError, Http2Refusal};
pub use mux::{GrpcMux, GrpcTransport};
