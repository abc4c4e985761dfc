//! The HTTP CONNECT tunnel both transports open under a connection when a
//! proxy is configured: before TLS and before their own handshake, so the
//! proxy sees only the server's `host:port` and an opaque byte stream.
//!
//! It needs only tokio's TCP, so it lives here once rather than in each
//! transport crate.

use std::fmt;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proxy::Proxy;
use crate::text::sanitize_text;

/// Longest proxy response head read; a proxy that sends more is broken.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// Longest part of the proxy's status line quoted in an error.
const MAX_QUOTED: usize = 120;

/// Why a tunnel could not be opened (see [`Proxy::open_tunnel`]). Its
/// message names the target and never a credential; the caller's error adds
/// the proxy's name.
#[derive(Debug)]
pub struct TunnelError {
    target: String,
    failure: TunnelFailure,
}

#[derive(Debug)]
enum TunnelFailure {
    /// The proxy could not be reached.
    Connect(io::Error),
    /// The proxy closed or failed before answering in full.
    Io(io::Error),
    /// The proxy answered with a status other than 2xx.
    Status {
        /// The status code.
        code: u16,
        /// The status line, sanitized (`sanitize_text`) and shortened.
        line: String,
    },
    /// The answer is not an HTTP/1 response head of at most 8 KiB.
    Malformed(String),
}

impl TunnelError {
    /// The proxy's status code, if it answered with one.
    pub fn status(&self) -> Option<u16> {
        match self.failure {
            TunnelFailure::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl fmt::Display for TunnelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.failure {
            TunnelFailure::Connect(e) => write!(f, "cannot connect to the proxy: {e}"),
            TunnelFailure::Io(e) => {
                write!(f, "the proxy closed the connection during CONNECT: {e}")
            }
            TunnelFailure::Status { code: 407, line } => write!(
                f,
                "proxy authentication failed ({line}); check the user and password in the proxy URL"
            ),
            TunnelFailure::Status { line, .. } => write!(
                f,
                "the proxy refused the tunnel to {} ({line})",
                self.target
            ),
            TunnelFailure::Malformed(what) => write!(f, "invalid answer to CONNECT: {what}"),
        }
    }
}

impl std::error::Error for TunnelError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.failure {
            TunnelFailure::Connect(e) | TunnelFailure::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl Proxy {
    /// Dials the proxy, asks it for a tunnel to `target` (`host:port`) and
    /// returns the socket once the proxy answered 2xx. Unbounded in time:
    /// callers bound it with their connect timeout.
    pub async fn open_tunnel(&self, target: &str) -> Result<TcpStream, TunnelError> {
        let fail = |failure| TunnelError {
            target: target.to_string(),
            failure,
        };
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| fail(TunnelFailure::Connect(e)))?;
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        // The request carries `Proxy-Authorization`: it is written, never logged.
        tcp.write_all(self.connect_request(target).as_bytes())
            .await
            .map_err(|e| fail(TunnelFailure::Io(e)))?;
        let head = read_head(&mut tcp).await.map_err(fail)?;
        check_status(&head).map_err(fail)?;
        Ok(tcp)
    }
}

/// Reads the response head up to its blank line. One byte at a time: the
/// bytes right behind the head belong to the tunnelled protocol (a server
/// may speak first) and must stay in the socket.
async fn read_head(io: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>, TunnelFailure> {
    let mut head = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(TunnelFailure::Malformed(format!(
                "response head longer than {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        match io.read(&mut byte).await {
            Ok(0) => {
                return Err(TunnelFailure::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the end of the response head",
                )))
            }
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(TunnelFailure::Io(e)),
        }
    }
    Ok(head)
}

/// Accepts `HTTP/1.x 2xx …` (RFC 9110: any 2xx opens the tunnel).
fn check_status(head: &[u8]) -> Result<(), TunnelFailure> {
    let end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(head.len());
    // The proxy chose these bytes: quoted in errors only once sanitized
    // (control characters escaped, bounded), like any text from a peer.
    let raw = String::from_utf8_lossy(&head[..end]);
    let line = sanitize_text(&raw, MAX_QUOTED).into_owned();
    let mut parts = raw.split(' ');
    let version = parts.next().unwrap_or_default();
    let code = parts
        .next()
        .filter(|c| c.len() == 3)
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(code) if version.starts_with("HTTP/1.") => {
            if (200..300).contains(&code) {
                Ok(())
            } else {
                Err(TunnelFailure::Status { code, line })
            }
        }
        _ => Err(TunnelFailure::Malformed(format!(
            "not an HTTP response: \"{line}\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(failure: TunnelFailure) -> TunnelError {
        TunnelError {
            target: "h:1".into(),
            failure,
        }
    }

    #[test]
    fn statuses_are_sorted() {
        assert!(check_status(b"HTTP/1.1 200 Connection established\r\n\r\n").is_ok());
        assert!(check_status(b"HTTP/1.0 204 OK\r\n\r\n").is_ok());
        let e = err(
            check_status(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").expect_err("407"),
        );
        assert_eq!(e.status(), Some(407));
        assert!(e.to_string().contains("proxy authentication failed"));
        let e = err(check_status(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").expect_err("502"));
        assert!(
            e.to_string().contains("h:1 (HTTP/1.1 502 Bad Gateway)"),
            "{e}"
        );
        for bad in [
            &b"SSH-2.0-x\r\n\r\n"[..],
            b"HTTP/1.1 2000 x\r\n\r\n",
            b"\r\n\r\n",
        ] {
            let e = check_status(bad).expect_err("malformed");
            assert!(matches!(e, TunnelFailure::Malformed(_)), "{e:?}");
        }
        let e = err(check_status(b"HTTP/1.1 500 \x1b[31mred\r\n\r\n").expect_err("500"));
        assert!(!e.to_string().contains('\x1b'));
        assert!(e.to_string().contains("500 \\u{1b}[31mred"), "{e}");
    }

    #[test]
    fn hostile_status_lines_are_sanitized_and_capped() {
        let mut head = b"HTTP/1.1 403 no\nFORGED LINE\x1b]0;pwn\x07".to_vec();
        head.extend(std::iter::repeat_n(b'A', 7 * 1024));
        head.extend(b"\r\n\r\n");
        let e = err(check_status(&head).expect_err("403"));
        let text = e.to_string();
        assert_eq!(e.status(), Some(403));
        assert!(text.contains("403 no\\nFORGED LINE"), "{text}");
        assert!(!text.contains(['\n', '\x1b', '\x07']), "{text}");
        assert!(text.len() < 512, "{} bytes", text.len());
        let e = err(check_status(b"SSH-2.0\x1b[2J\n\r\n\r\n").expect_err("not http"));
        assert!(!e.to_string().contains(['\n', '\x1b']), "{e}");
    }

    #[tokio::test]
    async fn head_is_bounded_and_leaves_the_rest_in_the_socket() {
        let (mut client, mut proxy) = tokio::io::duplex(64 * 1024);
        proxy
            .write_all(b"HTTP/1.1 200 OK\r\n\r\nserver-first")
            .await
            .expect("write");
        let head = read_head(&mut client).await.expect("head");
        assert_eq!(head, b"HTTP/1.1 200 OK\r\n\r\n");
        let mut rest = [0u8; 12];
        client.read_exact(&mut rest).await.expect("rest");
        assert_eq!(&rest, b"server-first");

        proxy
            .write_all(&vec![b'a'; MAX_RESPONSE_HEAD + 1])
            .await
            .expect("write");
        let e = read_head(&mut client).await.expect_err("too long");
        assert!(matches!(e, TunnelFailure::Malformed(_)), "{e:?}");

        drop(proxy);
        let e = read_head(&mut client).await.expect_err("eof");
        assert!(matches!(e, TunnelFailure::Io(_)), "{e:?}");
    }
}
