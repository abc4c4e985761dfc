//! WebSocket transport for the connector SDK.
//!
//! [`WsTransport`] builds a [`WsMux`], a [`connector_core::StreamMux`] that
//! gives every registration its own socket to `ws[s]://host:port/v1/connect`
//! (the WebSocket binding of `connector.v1`): the client offers subprotocol
//! `connector.v1`, writes `register` as the first binary frame right after
//! the upgrade, and every binary frame carries one protobuf `StreamMessage`.
//! The registration protocol itself (heartbeats, reconnects, executes) lives
//! in `connector-core`; this crate only moves messages.
//!
//! Per socket there is one writer task (outbound messages, a keepalive ping
//! every [`WsConfig::ping_interval`], the final close frame) and the read
//! half, handed to the driver as the inbound stream. A text frame, a binary
//! frame that is not a `StreamMessage`, or an oversized message from the
//! server yields one `Protocol` error, closes the socket with 1003, 1007 or
//! 1009 and ends the stream. Dropping the stream closes the socket.
//!
//! Behind an HTTP proxy (`MultiTransportOptions::proxy`: `HTTPS_PROXY`,
//! `HTTP_PROXY` and `NO_PROXY` by default, or an explicit URL) each socket
//! is an HTTP `CONNECT` tunnel to the server, with TLS and the upgrade
//! inside it. A proxy that refuses the tunnel (`407` for missing or wrong
//! credentials) fails the open with [`WsError::Proxy`]; the registration
//! backs off and retries.
//!
//! Sockets are cheap when idle: a 4 KiB read buffer instead of
//! tungstenite's 128 KiB, no write buffering, and a bounded write buffer
//! (see [`WsConfig`]).
#![deny(missing_docs)]

mod config;
mod error;
mod mux;
mod socket;
mod tls;

pub use config::WsConfig;
pub use error::WsError;
pub use mux::{WsMux, WsTransport};
