//! What a user implements: [`BaseConnector`], and what it is given and
//! returns for one execute.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use connector_proto::{Capability, ConnectorBehavior, ExecuteErrorKind, PayloadEncoding};
use tokio::time::Instant;

use crate::config::{ConnectorConfig, RegistrationKey};
use crate::trace::TraceContext;

/// A connector: what it is, what it can do, and how it executes one request.
///
/// Its connector type is not here: it is part of the registration's key
/// ([`ConnectorConfig`]), which is what `register` sends, so one value can
/// serve several types.
///
/// One value serves every request of its registration concurrently (up to
/// the registration's `max_concurrent_requests`), so `execute` takes `&self`
/// and keeps per-request state on the stack.
#[async_trait]
pub trait BaseConnector: Send + Sync + 'static {
    /// The connector's version, sent in `register`.
    fn version(&self) -> &str {
        "0.0.0"
    }

    /// What kind of connector this is.
    fn behavior(&self) -> ConnectorBehavior {
        ConnectorBehavior::Tool
    }

    /// What it can execute. When the list is not empty, a request for any
    /// other capability id is answered `UNKNOWN_CAPABILITY` without calling
    /// [`BaseConnector::execute`]; an empty id always reaches `execute`.
    fn capabilities(&self) -> Vec<Capability> {
        Vec::new()
    }

    /// Runs one request. The SDK has already checked the capability id and,
    /// for JSON requests, that the payload is valid JSON. The future is
    /// dropped when the request is cancelled or its deadline passes.
    ///
    /// It is polled once on the registration's own task (a handler that
    /// finishes at once costs no task spawn), then, if not ready, on a task
    /// of its own. Like any async code it must not block the thread: put
    /// blocking or long CPU work in `tokio::task::spawn_blocking`.
    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError>;
}

/// One execute request, as the handler sees it.
///
/// The SDK makes one per request; a unit test of a handler makes its own,
/// with no server:
///
/// ```
/// use connector_core::{ExecuteContext, RegistrationKey};
///
/// let key = RegistrationKey::new("acme", "kv", "kv-0").unwrap();
/// let ctx = ExecuteContext::new(key, "req-1", r#"{"key":"a"}"#)
///     .with_capability("get")
///     .with_context_entry(
///         "traceparent",
///         "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
///     );
/// assert_eq!(ctx.capability_id, "get");
/// assert!(ctx.trace_context().is_some());
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct ExecuteContext {
    /// The server's id for the request.
    pub request_id: String,
    /// The capability asked for (may be empty).
    pub capability_id: String,
    /// The payload.
    pub payload: Bytes,
    /// How the payload is encoded.
    pub encoding: PayloadEncoding,
    /// Free context from the server.
    pub context: HashMap<String, String>,
    /// When the server stops waiting, if it set a deadline.
    pub deadline: Option<Instant>,
    /// The registration the request came to.
    pub key: RegistrationKey,
    /// The server's W3C trace context, parsed from `context`.
    trace: Option<TraceContext>,
}

impl ExecuteContext {
    /// A request `request_id` for the registration `key` with `payload`
    /// (JSON), no capability id, no context, no deadline.
    pub fn new(
        key: RegistrationKey,
        request_id: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self {
            request_id: request_id.into(),
            capability_id: String::new(),
            payload: payload.into(),
            encoding: PayloadEncoding::Json,
            context: HashMap::new(),
            deadline: None,
            key,
            trace: None,
        }
    }

    /// The context of a request from the wire, built in one step (the
    /// builder methods move the whole context once per call, which per
    /// execute was measurable).
    pub(crate) fn from_request(
        key: RegistrationKey,
        request_id: String,
        capability_id: String,
        payload: Bytes,
        encoding: PayloadEncoding,
        context: HashMap<String, String>,
        deadline: Option<Instant>,
    ) -> Self {
        let trace = if context.is_empty() {
            None
        } else {
            TraceContext::from_context(&context)
        };
        Self {
            request_id,
            capability_id,
            payload,
            encoding,
            context,
            deadline,
            key,
            trace,
        }
    }

    /// The capability asked for.
    pub fn with_capability(mut self, capability_id: impl Into<String>) -> Self {
        self.capability_id = capability_id.into();
        self
    }

    /// How the payload is encoded (default JSON).
    pub fn with_encoding(mut self, encoding: PayloadEncoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// The server's free context, replacing any set before. A valid W3C
    /// `traceparent` (with `tracestate`) in it becomes
    /// [`ExecuteContext::trace_context`]; an invalid one is ignored.
    pub fn with_context(mut self, context: HashMap<String, String>) -> Self {
        self.trace = if context.is_empty() {
            None
        } else {
            TraceContext::from_context(&context)
        };
        self.context = context;
        self
    }

    /// Adds one context entry (see [`ExecuteContext::with_context`]).
    pub fn with_context_entry(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.context.insert(key.into(), value.into());
        self.trace = TraceContext::from_context(&self.context);
        self
    }

    /// When the server stops waiting.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The server's W3C trace context (`traceparent` / `tracestate` in the
    /// request's context), when it sent a valid one.
    pub fn trace_context(&self) -> Option<&TraceContext> {
        self.trace.as_ref()
    }

    /// Decodes a JSON payload.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ExecuteError> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| ExecuteError::bad_payload(format!("payload does not decode: {e}")))
    }
}

impl fmt::Debug for ExecuteContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecuteContext")
            .field("request_id", &self.request_id)
            .field("capability_id", &self.capability_id)
            .field("payload_len", &self.payload.len())
            .field("encoding", &self.encoding)
            .field("key", &self.key)
            .field("trace", &self.trace)
            .finish_non_exhaustive()
    }
}

/// A successful result.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExecuteOutput {
    /// The result payload.
    pub payload: Bytes,
    /// How it is encoded.
    pub encoding: PayloadEncoding,
}

impl ExecuteOutput {
    /// A JSON result from bytes the caller knows to be JSON.
    pub fn json_bytes(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            encoding: PayloadEncoding::Json,
        }
    }

    /// A JSON result from any serialisable value.
    pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<Self, ExecuteError> {
        serde_json::to_vec(value)
            .map(Self::json_bytes)
            .map_err(|e| ExecuteError::handler(format!("result does not encode as JSON: {e}")))
    }

    /// A raw (opaque bytes) result.
    pub fn raw(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            encoding: PayloadEncoding::Raw,
        }
    }
}

/// A failed execute, as the server will see it (`success = false`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
#[non_exhaustive]
pub struct ExecuteError {
    /// The protocol's error kind.
    pub kind: ExecuteErrorKind,
    /// A message for the server's logs.
    pub message: String,
}

impl ExecuteError {
    /// The handler failed (`HANDLER`).
    pub fn handler(message: impl Into<String>) -> Self {
        Self {
            kind: ExecuteErrorKind::Handler,
            message: message.into(),
        }
    }

    /// The payload is not what the capability takes (`BAD_PAYLOAD`).
    pub fn bad_payload(message: impl Into<String>) -> Self {
        Self {
            kind: ExecuteErrorKind::BadPayload,
            message: message.into(),
        }
    }

    /// The capability id is not one this connector has (`UNKNOWN_CAPABILITY`).
    /// The id came from the server: it is sanitized and capped
    /// ([`crate::sanitize_text`]), never Debug-escaped (a 1 MB id of control
    /// characters once made a 6 MB error text).
    pub fn unknown_capability(capability_id: &str) -> Self {
        Self {
            kind: ExecuteErrorKind::UnknownCapability,
            message: format!(
                "unknown capability \"{}\"",
                crate::text::sanitize_text(capability_id, crate::text::MAX_PEER_TEXT_CHARS)
            ),
        }
    }

    /// An error of any kind.
    pub fn new(kind: ExecuteErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// A connector with its registration config: one unit a runner hosts.
#[derive(Clone)]
pub struct ConnectorRegistration {
    pub(crate) config: ConnectorConfig,
    pub(crate) connector: Arc<dyn BaseConnector>,
}

impl ConnectorRegistration {
    /// Pairs a config with a connector.
    pub fn new(config: ConnectorConfig, connector: impl BaseConnector) -> Self {
        Self::from_arc(config, Arc::new(connector))
    }

    /// Pairs a config with a shared connector (one value may serve several
    /// registrations).
    pub fn from_arc(config: ConnectorConfig, connector: Arc<dyn BaseConnector>) -> Self {
        Self { config, connector }
    }

    /// The registration's key.
    pub fn key(&self) -> &RegistrationKey {
        &self.config.key
    }

    /// The registration's config.
    pub fn config(&self) -> &ConnectorConfig {
        &self.config
    }

    /// The connector.
    pub fn connector(&self) -> &Arc<dyn BaseConnector> {
        &self.connector
    }
}

impl fmt::Debug for ConnectorRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectorRegistration")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
