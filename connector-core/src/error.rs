//! The one error type of the crate, and the error a transport reports.

use std::fmt;

/// Everything that can go wrong in `connector-core`.
///
/// The variants fall in two families that call for different reactions:
/// the caller misused the API or gave a bad configuration
/// ([`ConnectorError::is_config`]): fix the program, retrying cannot help;
/// and the peer or the network failed ([`ConnectorError::is_transport`]):
/// the SDK already retries those with backoff where reconnect is on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectorError {
    /// A configuration value is invalid; the message names the field.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The runner is running (or has finished) and cannot take this call.
    #[error("the runner is already running or has finished; {0}")]
    AlreadyRunning(String),
    /// No registration with this key is hosted by the runner.
    #[error("no registration `{0}` in this runner")]
    UnknownRegistration(String),
    /// A transport failed to open or keep a stream.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A [`crate::TokenSource`] could not give a token; the message says
    /// why (never the token). The registration backs off and asks again.
    #[error("auth token unavailable: {0}")]
    Token(String),
    /// The server rejected the registration for good.
    #[error("registration `{key}` rejected ({reason}): {message}")]
    Rejected {
        /// The registration's address.
        key: String,
        /// The reject reason, as its protocol name.
        reason: String,
        /// The server's human-readable message.
        message: String,
    },
}

impl ConnectorError {
    /// True when the error is the caller's to fix (configuration or API misuse).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::InvalidConfig(_) | Self::AlreadyRunning(_) | Self::UnknownRegistration(_)
        ) || matches!(self, Self::Transport(t) if t.kind() == TransportErrorKind::Config)
    }

    /// True when the peer or the network failed.
    pub fn is_transport(&self) -> bool {
        matches!(self, Self::Transport(t) if t.kind() != TransportErrorKind::Config)
    }
}

/// What kind of failure a [`TransportError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// The transport's configuration is unusable (bad URL, unreadable CA
    /// file, …). Retrying cannot help.
    Config,
    /// A TCP connection could not be made.
    Connect,
    /// Something took longer than its deadline (dial, TLS, first response).
    Timeout,
    /// The TLS handshake failed (unknown CA, bad name, …).
    Tls,
    /// The peer broke the protocol (bad frame, wrong status, undecodable
    /// message, oversized message).
    Protocol,
    /// The stream or connection was closed or reset by the peer.
    Closed,
    /// The stream could not be opened because the server refused it
    /// (HTTP status, gRPC status, WebSocket handshake refusal).
    Refused,
}

impl fmt::Display for TransportErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Config => "configuration",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Tls => "tls",
            Self::Protocol => "protocol",
            Self::Closed => "closed",
            Self::Refused => "refused",
        })
    }
}

/// A failure of a transport, with a kind to branch on and a message for people.
#[derive(Debug, thiserror::Error)]
#[error("{kind} error: {message}")]
pub struct TransportError {
    kind: TransportErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl TransportError {
    /// A new error of `kind`. The message must not contain credentials.
    pub fn new(kind: TransportErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> TransportErrorKind {
        self.kind
    }

    /// The human-readable message, without the source chain.
    pub fn message(&self) -> &str {
        &self.message
    }
}
