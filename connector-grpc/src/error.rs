//! The crate's one error type, and how tonic's errors are sorted into it.

use std::error::Error as StdError;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use connector_core::{sanitize_text, TransportError, TransportErrorKind, MAX_PEER_TEXT_CHARS};
use tonic::{Code, Status};

/// Longest error chain quoted in one message, in characters. A chain can
/// carry text from the peer (an h2 or TLS error's detail); past this it is
/// cut, as `sanitize_text` says.
const MAX_CHAIN_CHARS: usize = 1024;

/// A `grpc-message` from the server, safe to print: control characters
/// escaped (no forged log line, no terminal escape), at most
/// [`MAX_PEER_TEXT_CHARS`] characters.
fn server_text(status: &Status) -> String {
    sanitize_text(status.message(), MAX_PEER_TEXT_CHARS).into_owned()
}

/// The underlying cause of a [`GrpcError`], shared so the error can be
/// cloned (one failed dial is reported to every open that waited for it).
pub type Cause = Arc<dyn StdError + Send + Sync + 'static>;

/// Everything the gRPC transport reports.
///
/// [`GrpcError::Config`] is the caller's to fix (retrying cannot help); every
/// other variant is the network or the server failing, which the runner
/// retries with backoff. Converts into [`TransportError`] with the matching
/// [`TransportErrorKind`], keeping this error as the source so callers can
/// downcast to it. Messages never contain a token.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum GrpcError {
    /// The options cannot work: not a gRPC URL, an unreadable or invalid CA
    /// file or client identity. Raised before any connection is made.
    #[error("invalid gRPC transport configuration: {message}")]
    Config {
        /// What is wrong, naming the option or file.
        message: String,
    },
    /// No connection could be made (refused, unreachable, reset while
    /// connecting).
    #[error("cannot connect to {target}: {message}")]
    Connect {
        /// The server, as `grpc[s]://host:port`.
        target: String,
        /// Why.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Cause>,
    },
    /// Something took longer than its deadline.
    #[error("{what} took longer than {after:?}")]
    Timeout {
        /// What timed out (a dial, the response headers of a stream, …).
        what: String,
        /// The deadline.
        after: Duration,
    },
    /// The TLS handshake failed: unknown CA, wrong name, expired
    /// certificate. Check `ca_cert` and the URL's host.
    #[error("TLS with {target} failed: {message}; check the CA (ca_cert) and the host name")]
    Tls {
        /// The server.
        target: String,
        /// Why, as rustls says it.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Cause>,
    },
    /// The stream or its connection was closed or reset, or the mux was
    /// closed.
    #[error("stream closed: {message}")]
    Closed {
        /// Why.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Cause>,
    },
    /// The server answered with a gRPC error status.
    #[error("server refused the stream with status {code:?}: {message}")]
    Refused {
        /// The gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
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
    /// The peer broke the protocol (undecodable or oversized message, h2
    /// protocol error).
    #[error("gRPC protocol error: {message}")]
    Protocol {
        /// What went wrong.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Cause>,
    },
}

impl GrpcError {
    /// The transport-level category of this error.
    pub fn kind(&self) -> TransportErrorKind {
        match self {
            Self::Config { .. } => TransportErrorKind::Config,
            Self::Connect { .. } => TransportErrorKind::Connect,
            Self::Timeout { .. } => TransportErrorKind::Timeout,
            Self::Tls { .. } => TransportErrorKind::Tls,
            Self::Closed { .. } => TransportErrorKind::Closed,
            Self::Refused { .. } => TransportErrorKind::Refused,
            Self::Protocol { .. } => TransportErrorKind::Protocol,
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

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self::Config {
            message: message.into(),
        }
    }

    pub(crate) fn closed(message: impl Into<String>) -> Self {
        Self::Closed {
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn timeout(what: impl Into<String>, after: Duration) -> Self {
        Self::Timeout {
            what: what.into(),
            after,
        }
    }
}

/// Why HTTP/2 itself did not get through to the server, as opposed to the
/// server or the network failing (see [`GrpcError::http2_refusal`]).
///
/// A program that has a second transport (WebSocket) switches to it on a
/// definite refusal, and on repeated [`Http2Refusal::ProtocolError`]s; a
/// refused connection or a timeout is never one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Http2Refusal {
    /// TLS ALPN did not agree on `h2` (the server or a TLS-terminating
    /// proxy answered `no_application_protocol`, or picked a protocol we
    /// did not offer). Definite.
    Alpn,
    /// The server or a proxy sent `HTTP_1_1_REQUIRED` (RST_STREAM or
    /// GOAWAY). Definite.
    Http11Required,
    /// Our HTTP/2 peer broke the framing (`PROTOCOL_ERROR`,
    /// `FRAME_SIZE_ERROR`) before a stream opened. This is what an HTTP/1.x
    /// answer looks like to h2: `HTTP/1.1 400 …` read as a frame header is a
    /// 4.7 MB frame (`FRAME_SIZE_ERROR`). A single one may be a glitch;
    /// repeated ones mean HTTP/2 does not get through.
    ProtocolError,
}

impl Http2Refusal {
    /// True when one occurrence is enough to conclude HTTP/2 cannot work.
    pub fn is_definite(self) -> bool {
        matches!(self, Self::Alpn | Self::Http11Required)
    }
}

impl GrpcError {
    /// Whether this error says HTTP/2 cannot get through to the server (see
    /// [`Http2Refusal`]); `None` for everything else, including refused
    /// connections, timeouts, certificate errors and gRPC statuses from the
    /// server (a status proves HTTP/2 works).
    pub fn http2_refusal(&self) -> Option<Http2Refusal> {
        let source = match self {
            Self::Tls { source, .. }
            | Self::Closed { source, .. }
            | Self::Protocol { source, .. } => source.as_ref()?,
            Self::Connect { source, .. } => source.as_ref()?,
            _ => return None,
        };
        refusal_in_chain(source.as_ref())
    }

    /// True for a definite [`Http2Refusal`] (ALPN without `h2`,
    /// `HTTP_1_1_REQUIRED`).
    pub fn is_protocol_fatal(&self) -> bool {
        self.http2_refusal().is_some_and(Http2Refusal::is_definite)
    }
}

/// Every error of a source chain, in order. `io::Error::source` skips the
/// error a custom io error wraps, so that one is looked into with `get_ref`
/// as well: its own chain follows the io error. At most 32 links are
/// followed on each level, against a chain that never ends.
fn chain_links<'a>(err: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    fn walk<'a>(err: &'a (dyn StdError + 'static), out: &mut Vec<&'a (dyn StdError + 'static)>) {
        let mut next = Some(err);
        let mut depth = 0;
        while let Some(e) = next {
            depth += 1;
            if depth > 32 {
                break;
            }
            out.push(e);
            if let Some(inner) = e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
                walk(inner, out);
            }
            next = e.source();
        }
    }
    let mut out = Vec::new();
    walk(err, &mut out);
    out
}

/// The strongest [`Http2Refusal`] found in a source chain: the first
/// definite one, else the first of any kind.
fn refusal_in_chain(err: &(dyn StdError + 'static)) -> Option<Http2Refusal> {
    let mut found = None;
    for e in chain_links(err) {
        let here = if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            match tls {
                rustls::Error::NoApplicationProtocol
                | rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
                | rustls::Error::PeerMisbehaved(
                    rustls::PeerMisbehaved::SelectedUnofferedApplicationProtocol,
                ) => Some(Http2Refusal::Alpn),
                _ => None,
            }
        } else if let Some(h2) = e.downcast_ref::<h2::Error>() {
            match h2.reason() {
                Some(h2::Reason::HTTP_1_1_REQUIRED) => Some(Http2Refusal::Http11Required),
                Some(h2::Reason::PROTOCOL_ERROR | h2::Reason::FRAME_SIZE_ERROR) => {
                    Some(Http2Refusal::ProtocolError)
                }
                _ => None,
            }
        } else {
            None
        };
        found = match (found, here) {
            (Some(a), Some(b)) if !Http2Refusal::is_definite(a) && b.is_definite() => Some(b),
            (None, b) => b,
            (a, _) => a,
        };
    }
    found
}

impl From<GrpcError> for TransportError {
    fn from(e: GrpcError) -> Self {
        TransportError::new(e.kind(), e.to_string()).with_source(e)
    }
}

/// What the source chain of an error says, beyond its message.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ChainFacts {
    tls: bool,
    timed_out: bool,
    refused: bool,
    refused_stream: bool,
}

/// What the links of a source chain ([`chain_links`]) say.
fn chain_facts(err: &(dyn StdError + 'static)) -> ChainFacts {
    let mut facts = ChainFacts::default();
    for e in chain_links(err) {
        if e.downcast_ref::<rustls::Error>().is_some() {
            facts.tls = true;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                facts.refused_stream = true;
            }
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::TimedOut => facts.timed_out = true,
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable
                | io::ErrorKind::AddrNotAvailable => facts.refused = true,
                _ => {}
            }
        }
    }
    facts
}

/// The message of an error with its sources, `a: b: c`, for people:
/// sanitized and capped, since any link may quote the peer.
fn chain_message(err: &(dyn StdError + 'static)) -> String {
    let out = raw_chain_message(err);
    sanitize_text(&out, MAX_CHAIN_CHARS).into_owned()
}

fn raw_chain_message(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    let mut depth = 0;
    while let Some(e) = next {
        depth += 1;
        if depth > 8 {
            break;
        }
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        next = e.source();
    }
    out
}

/// A [`GrpcError`] our own connector returned, found in tonic's chain.
fn own_error(err: &(dyn StdError + 'static)) -> Option<GrpcError> {
    chain_links(err)
        .into_iter()
        .find_map(|e| e.downcast_ref::<GrpcError>().cloned())
}

/// Sorts a failed dial (`Endpoint::connect`, or `connect_with_connector`
/// through a proxy, whose errors come back as they were made).
pub(crate) fn dial_error(
    target: &str,
    connect_timeout: Duration,
    err: tonic::transport::Error,
) -> GrpcError {
    if let Some(own) = own_error(&err) {
        return own;
    }
    let facts = chain_facts(&err);
    let message = chain_message(&err);
    let source: Cause = Arc::new(err);
    if facts.tls {
        GrpcError::Tls {
            target: target.to_string(),
            message,
            source: Some(source),
        }
    } else if facts.timed_out {
        GrpcError::timeout(format!("connecting to {target}"), connect_timeout)
    } else {
        GrpcError::Connect {
            target: target.to_string(),
            message,
            source: Some(source),
        }
    }
}

/// How a failed status bears on the channel it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blame {
    /// The connection failed (a transport error): counts against the
    /// channel's health.
    Channel,
    /// The server answered; the channel is fine.
    Server,
    /// The server's h2 refused the stream (`REFUSED_STREAM`: over its
    /// concurrent-stream limit, typically before our h2 saw its SETTINGS).
    /// Nothing was processed, so the open may be retried elsewhere.
    Limit,
}

/// Sorts the error of an open that failed before response headers.
///
/// A status with a source was made locally from a transport error; one
/// without came from the server (a trailers-only response).
pub(crate) fn open_error(target: &str, status: Status) -> (GrpcError, Blame) {
    if status.source().is_none() {
        return (
            GrpcError::Refused {
                code: status.code(),
                message: server_text(&status),
            },
            Blame::Server,
        );
    }
    let facts = chain_facts(&status);
    let message = chain_message(&status);
    let source: Cause = Arc::new(status);
    if facts.refused_stream {
        let err = GrpcError::Closed {
            message: format!("the server refused the stream (over its stream limit): {message}"),
            source: Some(source),
        };
        return (err, Blame::Limit);
    }
    let err = if facts.tls {
        GrpcError::Tls {
            target: target.to_string(),
            message,
            source: Some(source),
        }
    } else if facts.refused {
        GrpcError::Connect {
            target: target.to_string(),
            message,
            source: Some(source),
        }
    } else {
        GrpcError::Closed {
            message: format!("before the response headers: {message}"),
            source: Some(source),
        }
    };
    (err, Blame::Channel)
}

/// Sorts the error that ended an open stream.
pub(crate) fn stream_error(target: &str, status: Status) -> (GrpcError, Blame) {
    let code = status.code();
    if status.source().is_none() {
        // The server's status, or one tonic made locally for a message it
        // could not decode (no source either).
        let err = match code {
            Code::Internal | Code::OutOfRange | Code::DataLoss => GrpcError::Protocol {
                message: format!("{code:?}: {}", server_text(&status)),
                source: Some(Arc::new(status)),
            },
            Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::Unimplemented
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists => GrpcError::Refused {
                code,
                message: server_text(&status),
            },
            _ => GrpcError::Closed {
                message: format!(
                    "server ended the stream with {code:?}: {}",
                    server_text(&status)
                ),
                source: Some(Arc::new(status)),
            },
        };
        return (err, Blame::Server);
    }
    let facts = chain_facts(&status);
    let message = chain_message(&status);
    let source: Cause = Arc::new(status);
    let err = if facts.tls {
        GrpcError::Tls {
            target: target.to_string(),
            message,
            source: Some(source),
        }
    } else if code == Code::Internal {
        // tonic maps h2 PROTOCOL_ERROR, FRAME_SIZE_ERROR, … to Internal.
        GrpcError::Protocol {
            message,
            source: Some(source),
        }
    } else {
        GrpcError::Closed {
            message,
            source: Some(source),
        }
    };
    (err, Blame::Channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_one_to_one() {
        let cases = [
            (GrpcError::config("x"), TransportErrorKind::Config),
            (
                GrpcError::Connect {
                    target: "t".into(),
                    message: "m".into(),
                    source: None,
                },
                TransportErrorKind::Connect,
            ),
            (
                GrpcError::timeout("dial", Duration::from_secs(1)),
                TransportErrorKind::Timeout,
            ),
            (
                GrpcError::Tls {
                    target: "t".into(),
                    message: "m".into(),
                    source: None,
                },
                TransportErrorKind::Tls,
            ),
            (GrpcError::closed("x"), TransportErrorKind::Closed),
            (
                GrpcError::Refused {
                    code: Code::PermissionDenied,
                    message: "no".into(),
                },
                TransportErrorKind::Refused,
            ),
            (
                GrpcError::Protocol {
                    message: "m".into(),
                    source: None,
                },
                TransportErrorKind::Protocol,
            ),
            (
                GrpcError::Proxy {
                    proxy: "p:1".into(),
                    status: Some(407),
                    message: "m".into(),
                },
                TransportErrorKind::Refused,
            ),
            (
                GrpcError::Proxy {
                    proxy: "p:1".into(),
                    status: None,
                    message: "m".into(),
                },
                TransportErrorKind::Connect,
            ),
        ];
        for (err, kind) in cases {
            assert_eq!(err.kind(), kind);
            let message = err.to_string();
            let t: TransportError = err.into();
            assert_eq!(t.kind(), kind);
            assert_eq!(t.message(), message);
            let src = std::error::Error::source(&t).expect("source kept");
            assert!(src.downcast_ref::<GrpcError>().is_some());
        }
    }

    #[test]
    fn server_status_before_headers_is_refused_and_not_the_channels_fault() {
        let (err, blame) = open_error("grpc://h:1", Status::permission_denied("nope"));
        assert_eq!(err.kind(), TransportErrorKind::Refused);
        assert_eq!(blame, Blame::Server);
    }

    #[test]
    fn transport_status_before_headers_blames_the_channel() {
        let io = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        let status = Status::from_error(Box::new(io));
        let (err, blame) = open_error("grpc://h:1", status);
        assert_eq!(err.kind(), TransportErrorKind::Connect);
        assert_eq!(blame, Blame::Channel);

        let io = io::Error::new(io::ErrorKind::BrokenPipe, "gone");
        let (err, blame) = open_error("grpc://h:1", Status::from_error(Box::new(io)));
        assert_eq!(err.kind(), TransportErrorKind::Closed);
        assert_eq!(blame, Blame::Channel);
    }

    #[test]
    fn refused_stream_is_a_limit_not_a_failure() {
        let h2 = h2::Error::from(h2::Reason::REFUSED_STREAM);
        let (err, blame) = open_error("grpc://h:1", Status::from_error(Box::new(h2)));
        assert_eq!(blame, Blame::Limit);
        assert_eq!(err.kind(), TransportErrorKind::Closed);
    }

    #[test]
    fn tls_errors_are_found_inside_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = io::Error::new(io::ErrorKind::InvalidData, tls);
        let status = Status::from_error(Box::new(io));
        let (err, _) = open_error("grpcs://h:1", status);
        assert_eq!(err.kind(), TransportErrorKind::Tls);
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    }

    /// A newline that would forge a log line, terminal escapes, a bidi
    /// override, and a megabyte of text.
    fn hostile() -> String {
        let mut s =
            String::from("denied\n2026-01-01T00:00:00Z  INFO forged\x1b[2J\x1b]0;pwn\x07\u{202e}");
        s.push_str(&"A".repeat(1024 * 1024));
        s
    }

    fn assert_safe(text: &str) {
        assert!(text.contains("denied"), "the server's text is still quoted");
        for bad in ['\n', '\r', '\x1b', '\x07', '\u{202e}'] {
            assert!(!text.contains(bad), "{bad:?} reached {text:.200}");
        }
        assert!(text.len() < 4 * 1024, "{} bytes", text.len());
    }

    #[test]
    fn server_status_text_is_sanitized_and_capped_everywhere() {
        for code in [
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::Internal,
            Code::Unavailable,
            Code::Unknown,
        ] {
            let (e, _) = open_error("grpc://h:1", Status::new(code, hostile()));
            assert_safe(&e.to_string());
            let (e, _) = stream_error("grpc://h:1", Status::new(code, hostile()));
            assert_safe(&e.to_string());
            assert_safe(TransportError::from(e).message());
        }
        // Text inside a source chain (a status made from a local error).
        let io = io::Error::new(io::ErrorKind::BrokenPipe, hostile());
        let (e, _) = stream_error("grpc://h:1", Status::from_error(Box::new(io)));
        assert_safe(&e.to_string());
        let io = io::Error::new(io::ErrorKind::ConnectionRefused, hostile());
        let (e, _) = open_error("grpc://h:1", Status::from_error(Box::new(io)));
        assert_safe(&e.to_string());
    }

    #[test]
    fn http2_refusals_are_recognised_and_plain_failures_are_not() {
        let status = |e: Box<dyn StdError + Send + Sync>| Status::from_error(e);
        let h2 = |r| Box::new(h2::Error::from(r)) as Box<dyn StdError + Send + Sync>;
        let (e, _) = open_error("grpc://h:1", status(h2(h2::Reason::HTTP_1_1_REQUIRED)));
        assert_eq!(e.http2_refusal(), Some(Http2Refusal::Http11Required));
        assert!(e.is_protocol_fatal());
        let (e, _) = open_error("grpc://h:1", status(h2(h2::Reason::FRAME_SIZE_ERROR)));
        assert_eq!(e.http2_refusal(), Some(Http2Refusal::ProtocolError));
        assert!(
            !e.is_protocol_fatal(),
            "one framing error is only a suspicion"
        );
        let (e, _) = open_error("grpc://h:1", status(h2(h2::Reason::PROTOCOL_ERROR)));
        assert_eq!(e.http2_refusal(), Some(Http2Refusal::ProtocolError));
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol);
        let io = io::Error::new(io::ErrorKind::InvalidData, alert);
        let (e, _) = open_error("grpcs://h:1", status(Box::new(io)));
        assert_eq!(e.kind(), TransportErrorKind::Tls);
        assert_eq!(e.http2_refusal(), Some(Http2Refusal::Alpn));

        // Not refusals: a refused connection, a reset, a timeout, a bad
        // certificate, a server's status, an h2 CANCEL.
        for io_kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
        ] {
            let io = io::Error::new(io_kind, "x");
            let (e, _) = open_error("grpc://h:1", status(Box::new(io)));
            assert_eq!(e.http2_refusal(), None, "{e}");
        }
        let cert = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = io::Error::new(io::ErrorKind::InvalidData, cert);
        let (e, _) = open_error("grpcs://h:1", status(Box::new(io)));
        assert_eq!(e.http2_refusal(), None);
        assert_eq!(
            GrpcError::timeout("x", Duration::from_secs(1)).http2_refusal(),
            None
        );
        let (e, _) = open_error("grpc://h:1", Status::unavailable("server says no"));
        assert_eq!(e.http2_refusal(), None);
        let (e, _) = open_error("grpc://h:1", status(h2(h2::Reason::CANCEL)));
        assert_eq!(e.http2_refusal(), None);
    }

    #[test]
    fn stream_errors_are_sorted() {
        let (e, b) = stream_error(
            "grpc://h:1",
            Status::internal("failed to decode Protobuf message"),
        );
        assert_eq!((e.kind(), b), (TransportErrorKind::Protocol, Blame::Server));
        let (e, b) = stream_error(
            "grpc://h:1",
            Status::out_of_range("decoded message length too large"),
        );
        assert_eq!((e.kind(), b), (TransportErrorKind::Protocol, Blame::Server));
        let (e, b) = stream_error("grpc://h:1", Status::unavailable("going away"));
        assert_eq!((e.kind(), b), (TransportErrorKind::Closed, Blame::Server));
        let (e, b) = stream_error("grpc://h:1", Status::unauthenticated("bad token"));
        assert_eq!((e.kind(), b), (TransportErrorKind::Refused, Blame::Server));
        let io = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        let (e, b) = stream_error("grpc://h:1", Status::from_error(Box::new(io)));
        assert_eq!((e.kind(), b), (TransportErrorKind::Closed, Blame::Channel));
    }
}
