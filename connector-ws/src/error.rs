//! [`WsError`], the crate's one error type, and its mapping onto
//! [`TransportError`].

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::time::Duration;

use connector_core::{sanitize_text, TransportError, TransportErrorKind};

/// Longest cause chain quoted in a [`TransportError`] message, in
/// characters: links of the chain (a tungstenite error) may quote the peer.
const MAX_CHAIN_CHARS: usize = 1024;

/// A boxed cause.
type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong in the WebSocket transport.
///
/// [`WsError::Config`] is the caller's to fix (retrying cannot help); every
/// other variant is a failure of the peer or the network, which the runner
/// retries with backoff. Every variant converts into a
/// [`TransportError`] of the matching [`TransportErrorKind`], with the
/// `WsError` as its source (downcast it to get the details back).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WsError {
    /// The configuration is unusable: wrong URL scheme, unreadable or
    /// invalid certificate file, inconsistent buffer sizes.
    #[error("invalid WebSocket transport configuration: {0}")]
    Config(String),
    /// The TCP connection could not be made.
    #[error("could not connect to {addr}")]
    Connect {
        /// `host:port` dialled.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting (TCP, TLS, WebSocket upgrade and the first frame) took
    /// longer than the connect timeout.
    #[error("connecting to {addr} timed out after {after:?}")]
    Timeout {
        /// `host:port` dialled.
        addr: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The TLS handshake failed: unknown CA, wrong name, no TLS on the port.
    #[error("TLS handshake with {addr} failed; check the CA (ca_cert) and the host name")]
    Tls {
        /// `host:port` dialled.
        addr: String,
        /// The TLS error.
        #[source]
        source: std::io::Error,
    },
    /// The server broke the WebSocket binding of `connector.v1`: no or a
    /// different subprotocol, a text frame, a frame that is not a
    /// `StreamMessage`, an oversized message.
    #[error("WebSocket protocol error: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The socket was closed or reset.
    #[error("WebSocket closed: {message}")]
    Closed {
        /// How it ended.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The HTTP CONNECT proxy did not open a tunnel to the server: it could
    /// not be reached, refused (`status`; 407 means its credentials, the
    /// user and password of the proxy URL, were missing or wrong), or did
    /// not answer HTTP.
    #[error("through HTTP proxy {proxy}: {message}")]
    Proxy {
        /// The proxy, as `host:port` (never its credentials).
        proxy: String,
        /// The proxy's HTTP status, when it answered with one.
        status: Option<u16>,
        /// What happened.
        message: String,
    },
    /// The server answered the upgrade request with an HTTP status other
    /// than 101.
    #[error("server at {addr} refused the WebSocket upgrade with HTTP {status}")]
    Refused {
        /// `host:port` dialled.
        addr: String,
        /// The HTTP status code.
        status: u16,
    },
}

impl WsError {
    /// The [`TransportErrorKind`] this error maps to.
    pub fn kind(&self) -> TransportErrorKind {
        match self {
            Self::Config(_) => TransportErrorKind::Config,
            Self::Connect { .. } => TransportErrorKind::Connect,
            Self::Timeout { .. } => TransportErrorKind::Timeout,
            Self::Tls { .. } => TransportErrorKind::Tls,
            Self::Protocol { .. } => TransportErrorKind::Protocol,
            Self::Closed { .. } => TransportErrorKind::Closed,
            Self::Refused { .. } => TransportErrorKind::Refused,
            // A proxy's answer is a refusal; no answer is a failed connect.
            Self::Proxy {
                status: Some(_), ..
            } => TransportErrorKind::Refused,
            Self::Proxy { status: None, .. } => TransportErrorKind::Connect,
        }
    }

    /// True when an HTTP proxy refused the tunnel for want of the right
    /// credentials (`407`): fix the user and password in the proxy URL.
    pub fn is_proxy_auth(&self) -> bool {
        matches!(
            self,
            Self::Proxy {
                status: Some(407),
                ..
            }
        )
    }

    /// True when the configuration is at fault and retrying cannot help.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_))
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Self::Protocol {
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn protocol_with(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Protocol {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn closed(message: impl Into<String>) -> Self {
        Self::Closed {
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn closed_with(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Closed {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

impl From<WsError> for TransportError {
    /// The message is the whole cause chain on one line (what a log line
    /// wants), sanitized and capped since links may quote the peer; the
    /// source is the `WsError` itself.
    fn from(err: WsError) -> Self {
        let mut message = err.to_string();
        let mut cause = err.source();
        while let Some(c) = cause {
            let _ = write!(message, ": {c}");
            cause = c.source();
        }
        let message = sanitize_text(&message, MAX_CHAIN_CHARS).into_owned();
        TransportError::new(err.kind(), message).with_source(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_chain() {
        let err = WsError::Connect {
            addr: "127.0.0.1:1".into(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        };
        let t: TransportError = err.into();
        assert_eq!(t.kind(), TransportErrorKind::Connect);
        assert_eq!(t.message(), "could not connect to 127.0.0.1:1: refused");
        let source = std::error::Error::source(&t).expect("has a source");
        assert!(source.downcast_ref::<WsError>().is_some());

        let cases = [
            (WsError::Config("x".into()), TransportErrorKind::Config),
            (
                WsError::Timeout {
                    addr: "a:1".into(),
                    after: Duration::from_secs(1),
                },
                TransportErrorKind::Timeout,
            ),
            (WsError::protocol("x"), TransportErrorKind::Protocol),
            (WsError::closed("x"), TransportErrorKind::Closed),
            (
                WsError::Refused {
                    addr: "a:1".into(),
                    status: 404,
                },
                TransportErrorKind::Refused,
            ),
            (
                WsError::Proxy {
                    proxy: "p:1".into(),
                    status: Some(407),
                    message: "m".into(),
                },
                TransportErrorKind::Refused,
            ),
            (
                WsError::Proxy {
                    proxy: "p:1".into(),
                    status: None,
                    message: "m".into(),
                },
                TransportErrorKind::Connect,
            ),
        ];
        for (err, kind) in cases {
            assert_eq!(TransportError::from(err).kind(), kind);
        }
    }

    #[test]
    fn peer_text_in_a_cause_chain_is_sanitized_and_capped() {
        let mut hostile = String::from("bye\nFORGED LINE\x1b[2J\u{202e}");
        hostile.push_str(&"A".repeat(1024 * 1024));
        let err = WsError::closed_with("connection lost", std::io::Error::other(hostile));
        let t = TransportError::from(err);
        let m = t.message();
        assert!(
            m.starts_with("WebSocket closed: connection lost: bye"),
            "{m:.200}"
        );
        for bad in ['\n', '\x1b', '\u{202e}'] {
            assert!(!m.contains(bad), "{bad:?} in {m:.200}");
        }
        assert!(m.len() < 4 * 1024, "{} bytes", m.len());
    }
}
