//! Helpers for the end-to-end tests that run the real SDK (runner + a real
//! transport) against the testkit's servers.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;

use async_trait::async_trait;
use connector_core::{MultiTransportOptions, StreamMux, Transport, TransportError};
use connector_grpc::GrpcTransport;
use connector_testkit::{GrpcTestServer, WsTestServer};
use connector_ws::WsTransport;

/// Either transport, so one test body serves both.
pub(crate) enum AnyTransport {
    Grpc(GrpcTransport),
    Ws(WsTransport),
}

#[async_trait]
impl Transport for AnyTransport {
    async fn mux(
        &self,
        options: &MultiTransportOptions,
    ) -> Result<Arc<dyn StreamMux>, TransportError> {
        match self {
            Self::Grpc(t) => t.mux(options).await,
            Self::Ws(t) => t.mux(options).await,
        }
    }
}

/// Either server front-end, with the faults both offer.
#[derive(Clone)]
pub(crate) enum AnyServer {
    Grpc(GrpcTestServer),
    Ws(WsTestServer),
}

impl AnyServer {
    pub(crate) fn url(&self) -> String {
        match self {
            Self::Grpc(s) => s.url(),
            Self::Ws(s) => s.url(),
        }
    }

    pub(crate) fn transport(&self) -> AnyTransport {
        match self {
            Self::Grpc(_) => AnyTransport::Grpc(GrpcTransport::new()),
            Self::Ws(_) => AnyTransport::Ws(WsTransport::new()),
        }
    }

    /// Kills the oldest live connection, if any.
    pub(crate) fn kill_one(&self) {
        let first = match self {
            Self::Grpc(s) => s.connections().first().map(|c| c.connection_id),
            Self::Ws(s) => s.connections().first().map(|c| c.connection_id),
        };
        if let Some(id) = first {
            match self {
                Self::Grpc(s) => s.kill_connection(id),
                Self::Ws(s) => s.kill_connection(id),
            };
        }
    }

    pub(crate) fn kill_all(&self) -> usize {
        match self {
            Self::Grpc(s) => s.kill_all_connections(),
            Self::Ws(s) => s.kill_all_connections(),
        }
    }

    pub(crate) async fn restart(&self) {
        match self {
            Self::Grpc(s) => s.restart().await.expect("grpc restart"),
            Self::Ws(s) => s.restart().await.expect("ws restart"),
        }
    }
}
