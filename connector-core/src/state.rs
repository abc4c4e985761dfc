//! The observable life of a registration: its [`RegistrationState`] and the
//! [`RegistrationEvent`]s that move it.

use std::fmt;
use std::time::Duration;

use connector_proto::RejectReason;

/// Where a registration is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationState {
    /// Not started yet.
    Idle,
    /// Opening a stream (dial, TLS, sending `register`).
    Connecting,
    /// Stream open, `register` sent, waiting for `register_response`.
    Registering,
    /// The server said `PENDING`; waiting for an `approval_update`.
    PendingApproval,
    /// Approved: executes are taken.
    Active,
    /// No new work; in-flight requests finish, then the stream closes.
    Draining,
    /// Waiting before the next connection attempt.
    Backoff {
        /// How long this wait is.
        delay: Duration,
    },
    /// Done for good.
    Stopped(StopReason),
}

impl RegistrationState {
    /// A short lowercase name (`active`, `backoff`, …) for tables and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Connecting => "connecting",
            Self::Registering => "registering",
            Self::PendingApproval => "pending",
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Backoff { .. } => "backoff",
            Self::Stopped(_) => "stopped",
        }
    }

    /// True once the registration is done for good.
    pub fn is_stopped(&self) -> bool {
        matches!(self, Self::Stopped(_))
    }
}

impl fmt::Display for RegistrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Backoff { delay } => write!(f, "backoff ({} ms)", delay.as_millis()),
            Self::Stopped(reason) => write!(f, "stopped ({reason})"),
            other => f.write_str(other.name()),
        }
    }
}

/// Why a registration stopped for good.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The runner shut down.
    Shutdown,
    /// The registration was removed from its runner.
    Removed,
    /// The server rejected it with a final reason.
    Rejected {
        /// The protocol's reason.
        reason: RejectReason,
        /// The server's message.
        message: String,
    },
    /// The stream ended and reconnect is off.
    StreamEnded {
        /// What ended it.
        cause: DisconnectCause,
    },
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shutdown => f.write_str("shutdown"),
            Self::Removed => f.write_str("removed"),
            Self::Rejected { reason, message } => {
                write!(f, "rejected {}: {message}", reason.as_str_name())
            }
            Self::StreamEnded { cause } => write!(f, "stream ended: {cause}"),
        }
    }
}

/// Why a stream was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectCause {
    /// The stream could not be opened.
    OpenFailed(String),
    /// The server ended the stream.
    ClosedByServer,
    /// The stream failed (reset, connection lost, protocol error).
    Error(String),
    /// No server message within the watchdog timeout.
    Watchdog,
    /// No `register_response` within the connect timeout.
    RegisterTimeout,
    /// The server asked for it (`drain` or `should_reconnect`).
    Drained,
    /// The session token expired; registering again with the auth token.
    SessionExpired,
    /// The server still holds another stream of this registration.
    Duplicate,
    /// The server stopped reading: messages for it piled up past the limit.
    OutboundStalled,
    /// The registration's token source gave no token (the reason, never
    /// the token); no stream was opened.
    Token(String),
}

impl fmt::Display for DisconnectCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OpenFailed(e) => write!(f, "open failed: {e}"),
            Self::ClosedByServer => f.write_str("closed by server"),
            Self::Error(e) => write!(f, "stream error: {e}"),
            Self::Watchdog => f.write_str("watchdog timeout"),
            Self::RegisterTimeout => f.write_str("no register_response in time"),
            Self::Drained => f.write_str("drained by server"),
            Self::SessionExpired => f.write_str("session expired"),
            Self::Duplicate => f.write_str("duplicate registration"),
            Self::OutboundStalled => f.write_str("server stopped reading"),
            Self::Token(e) => write!(f, "auth token unavailable: {e}"),
        }
    }
}

impl DisconnectCause {
    /// A short label for metrics (`watchdog`, `server_closed`, …).
    pub fn label(&self) -> &'static str {
        match self {
            Self::OpenFailed(_) => "open_failed",
            Self::ClosedByServer => "server_closed",
            Self::Error(_) => "error",
            Self::Watchdog => "watchdog",
            Self::RegisterTimeout => "register_timeout",
            Self::Drained => "drained",
            Self::SessionExpired => "session_expired",
            Self::Duplicate => "duplicate",
            Self::OutboundStalled => "outbound_stalled",
            Self::Token(_) => "token",
        }
    }
}

/// Something that happened to a registration, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationEvent {
    /// A connection attempt started.
    Connecting {
        /// Attempts since the last healthy stream (0 for the first).
        attempt: u32,
    },
    /// The stream opened and `register` went out.
    Connected,
    /// The server answered `PENDING`.
    PendingApproval,
    /// The server approved the registration.
    Approved {
        /// Whether this approval follows a lost approved stream.
        reconnect: bool,
    },
    /// The server rejected the registration.
    Rejected {
        /// The protocol's reason.
        reason: RejectReason,
        /// The server's message.
        message: String,
    },
    /// The stream was lost.
    Disconnected {
        /// Why.
        cause: DisconnectCause,
    },
    /// Waiting before the next attempt.
    BackingOff {
        /// How long.
        delay: Duration,
    },
    /// Taking no new work; closing when in-flight requests are answered.
    Draining {
        /// Why.
        reason: String,
    },
    /// A malformed or unexpected message was received and ignored.
    ProtocolError {
        /// What was wrong.
        detail: String,
    },
    /// Done for good.
    Stopped {
        /// Why.
        reason: StopReason,
    },
}
