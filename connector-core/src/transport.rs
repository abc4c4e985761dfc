//! The seam between the protocol logic (this crate) and the wire
//! (`connector-grpc`, `connector-ws`, the testkit's in-memory mux).
//!
//! A transport only moves [`StreamMessage`]s: it opens one logical
//! bidirectional stream per registration and decides how streams share
//! connections. Registration, heartbeats, backoff and execute handling stay
//! here, written once for every transport.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use connector_proto::StreamMessage;
use futures_util::Stream;
use tokio::sync::mpsc;

use crate::config::{MultiTransportOptions, RegistrationKey};
use crate::error::TransportError;

/// Inbound half of a logical stream: server messages until the stream ends
/// (`None`) or fails (`Some(Err)`).
pub type InboundStream =
    Pin<Box<dyn Stream<Item = Result<StreamMessage, TransportError>> + Send + 'static>>;

/// One registration's logical stream, as a transport hands it to the driver.
///
/// Closing: the driver drops `outbound` (a half-close: gRPC ends the request
/// body, WebSocket sends a close frame once the queue is flushed), then reads
/// `inbound` until it ends or a short deadline passes, then drops it.
/// Dropping `inbound` must release whatever the transport reserved for the
/// stream (a channel slot, a socket).
pub struct MessageStream {
    /// Messages to the server, in order. Bounded: the driver waits for
    /// capacity instead of buffering without limit.
    pub outbound: mpsc::Sender<StreamMessage>,
    /// Messages from the server.
    pub inbound: InboundStream,
    /// Where the stream runs, for logs and live state.
    pub info: StreamInfo,
}

impl MessageStream {
    /// A stream from its two halves.
    pub fn new(
        outbound: mpsc::Sender<StreamMessage>,
        inbound: InboundStream,
        info: StreamInfo,
    ) -> Self {
        Self {
            outbound,
            inbound,
            info,
        }
    }
}

impl fmt::Debug for MessageStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageStream")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Where a logical stream runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamInfo {
    /// The transport's id of the connection carrying the stream (a gRPC
    /// channel, a WebSocket socket), unique within one mux.
    pub connection_id: u64,
}

impl StreamInfo {
    /// Info for a stream on connection `connection_id`.
    pub fn new(connection_id: u64) -> Self {
        Self { connection_id }
    }
}

/// Opens logical streams for registrations over shared connections.
///
/// Implementations decide how streams map to connections (gRPC: many per
/// HTTP/2 connection; WebSocket: one socket each) and must be cheap to call
/// from many registrations at once.
#[async_trait]
pub trait StreamMux: Send + Sync + 'static {
    /// Opens a stream for `key` and sends `register` as its first message
    /// *before* waiting for anything from the server (some servers send no
    /// response headers until the first message arrives). Resolves once the
    /// stream is open; bounded by the transport's connect timeout.
    async fn open(
        &self,
        key: &RegistrationKey,
        register: StreamMessage,
    ) -> Result<MessageStream, TransportError>;

    /// Connection accounting, for live state and tests.
    fn stats(&self) -> MuxStats {
        MuxStats::default()
    }

    /// Closes every connection; called once when the runner stops, after
    /// every stream was dropped.
    async fn close(&self) {}
}

/// A snapshot of a mux's connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MuxStats {
    /// Open connections with the streams each carries.
    pub connections: Vec<ConnectionStats>,
    /// Dials that succeeded since the mux was made.
    pub dials_succeeded: u64,
    /// Dials that failed since the mux was made.
    pub dials_failed: u64,
    /// Connections dropped and rebuilt after repeated failures.
    pub rebuilds: u64,
}

impl MuxStats {
    /// Open connections.
    pub fn open_connections(&self) -> usize {
        self.connections.len()
    }

    /// Streams across all connections.
    pub fn open_streams(&self) -> usize {
        self.connections.iter().map(|c| c.streams).sum()
    }
}

/// One connection of a mux.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// The connection's id (see [`StreamInfo::connection_id`]).
    pub id: u64,
    /// Streams it carries now.
    pub streams: usize,
    /// The most streams it may carry (lowered when the server's limit is
    /// found to be below the configured cap).
    pub capacity: usize,
}

impl ConnectionStats {
    /// Connection `id` carrying `streams` of at most `capacity` streams.
    pub fn new(id: u64, streams: usize, capacity: usize) -> Self {
        Self {
            id,
            streams,
            capacity,
        }
    }
}

/// Makes the [`StreamMux`] a runner uses, from its options.
///
/// `connector-grpc` and `connector-ws` each provide one; a program picks by
/// the URL scheme.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Builds the mux. Fails only for configuration errors (bad CA file,
    /// wrong URL scheme for this transport); network failures are reported
    /// per stream by [`StreamMux::open`], where the registration backs off
    /// and retries.
    async fn mux(
        &self,
        options: &MultiTransportOptions,
    ) -> Result<Arc<dyn StreamMux>, TransportError>;
}

#[async_trait]
impl<M: StreamMux + ?Sized> StreamMux for Arc<M> {
    async fn open(
        &self,
        key: &RegistrationKey,
        register: StreamMessage,
    ) -> Result<MessageStream, TransportError> {
        (**self).open(key, register).await
    }

    fn stats(&self) -> MuxStats {
        (**self).stats()
    }

    async fn close(&self) {
        (**self).close().await
    }
}
