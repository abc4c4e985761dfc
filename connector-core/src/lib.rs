//! Transport-agnostic core of the connector SDK.
//!
//! A host process runs many *registrations* (tenant, type, instance), each a
//! [`BaseConnector`] with its [`ConnectorConfig`]. Every registration is
//! driven by one sans-IO state machine ([`Registration`]) that owns the whole
//! protocol: register, approval, heartbeats and the watchdog, backoff, drain,
//! and the bookkeeping that gives every `execute_request` exactly one
//! response. A thin async driver runs it over any [`StreamMux`]; the gRPC
//! and WebSocket transports live in their own crates and only move messages.
#![deny(missing_docs)]

mod answered;
mod backoff;
mod config;
mod connector;
mod driver;
mod error;
mod fleet;
mod live;
mod metrics;
mod pacing;
mod proxy;
mod redact;
mod registration;
mod runner;
mod state;
mod telemetry;
mod text;
mod token;
mod trace;
mod transport;
mod trust;
mod tunnel;

pub use backoff::{Backoff, JitterRng};
pub use config::{
    validate_identifier, ConnectorConfig, ConnectorConfigBuilder, Endpoint, Limits,
    MultiTransportOptions, MultiTransportOptionsBuilder, RegistrationKey, Secret, TlsOptions,
    TransportKind, MAX_IDENTIFIER_LEN,
};
pub use connector::{
    BaseConnector, ConnectorRegistration, ExecuteContext, ExecuteError, ExecuteOutput,
};
pub use error::{ConnectorError, TransportError, TransportErrorKind};
pub use fleet::{owner_of, shard_of, Shard};
pub use live::RegistrationHandle;
pub use metrics::ConnectorMetrics;
pub use proxy::{Proxy, ProxySetting};
pub use redact::redact_url;
pub use registration::{
    Action, Registration, MAX_REQUEST_TIMEOUT, MAX_SERVER_HEARTBEAT_INTERVAL,
    MIN_SERVER_HEARTBEAT_INTERVAL,
};
pub use runner::{ConnectorRunner, MultiConnectorRunner, RunnerSummary, ShutdownHandle};
pub use state::{DisconnectCause, RegistrationEvent, RegistrationState, StopReason};
pub use telemetry::names as metric_names;
pub use text::{sanitize_text, MAX_PEER_TEXT_CHARS};
pub use token::{EnvToken, FileToken, FixedToken, TokenSource};
pub use trace::{TraceContext, TRACEPARENT, TRACESTATE};
pub use transport::{
    ConnectionStats, InboundStream, MessageStream, MuxStats, StreamInfo, StreamMux, Transport,
};
pub use trust::trust_anchors;
pub use tunnel::TunnelError;

/// The wire protocol's messages, re-exported so users need one dependency.
pub use connector_proto as proto;
