//! [`ConnectProxy`]: a small HTTP CONNECT proxy on a loopback socket, so
//! tests can check that a transport tunnels through a proxy (and what it
//! asked the proxy for) without a real proxy on the machine.
//!
//! It does what a forward proxy does for TLS traffic and nothing more:
//! read the request head, check `Proxy-Authorization` when asked to, dial
//! the target, answer `200 Connection established` and copy bytes both
//! ways. Everything the client sends is peer input: a bad request gets an
//! HTTP error status, never a panic.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::error::TestkitError;

/// Longest request head accepted; a longer one is answered 400. Real
/// CONNECT requests are a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// How long a client may take to send its request head, and how long
/// dialling the target may take, so a silent client or a black-holed
/// target cannot hold a task past any test's patience.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP CONNECT proxy on `127.0.0.1:<ephemeral port>`.
///
/// Cheap to clone; clones share the counters. [`ConnectProxy::stop`] (or
/// dropping the last clone) stops accepting and ends every tunnel.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), connector_testkit::TestkitError> {
/// use connector_testkit::ConnectProxy;
///
/// let proxy = ConnectProxy::start().await?;
/// proxy.require_auth("user", "secret");
/// // MultiTransportOptions::builder(url)
/// //     .proxy(ProxySetting::Url(proxy.url_with_auth("user", "secret")))
/// assert!(proxy.url().starts_with("http://127.0.0.1:"));
/// assert_eq!(proxy.tunnels_opened(), 0);
/// proxy.stop().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ConnectProxy {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: CancellationToken,
    accept: Mutex<Option<JoinHandle<()>>>,
}

/// What the connection tasks share with the handle.
#[derive(Default)]
struct State {
    /// The exact `Proxy-Authorization` value required, if any.
    auth: Mutex<Option<String>>,
    targets: Mutex<Vec<String>>,
    tunnels_opened: AtomicU64,
    auth_failures: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single assignment or push.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl fmt::Debug for ConnectProxy {
    /// Never shows the required credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectProxy")
            .field("addr", &self.inner.addr)
            .field("requires_auth", &lock(&self.inner.state.auth).is_some())
            .field("tunnels_opened", &self.tunnels_opened())
            .finish_non_exhaustive()
    }
}

impl ConnectProxy {
    /// Binds `127.0.0.1:0` and serves until stopped. No authentication is
    /// required until [`ConnectProxy::require_auth`].
    pub async fn start() -> Result<ConnectProxy, TestkitError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let shutdown = CancellationToken::new();
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&state), shutdown.clone()));
        Ok(ConnectProxy {
            inner: Arc::new(Inner {
                addr,
                state,
                shutdown,
                accept: Mutex::new(Some(accept)),
            }),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT`, for `ProxySetting::Url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// `http://user:password@127.0.0.1:PORT`.
    pub fn url_with_auth(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@{}", self.inner.addr)
    }

    /// From now on, CONNECT requests without `Proxy-Authorization: Basic`
    /// of exactly `user:password` are answered `407`.
    pub fn require_auth(&self, user: &str, password: &str) {
        let value = format!(
            "Basic {}",
            base64_std(format!("{user}:{password}").as_bytes())
        );
        *lock(&self.inner.state.auth) = Some(value);
    }

    /// Tunnels established (answered `200`) since start.
    pub fn tunnels_opened(&self) -> u64 {
        self.inner.state.tunnels_opened.load(Ordering::Relaxed)
    }

    /// CONNECT requests answered `407` since start.
    pub fn auth_failures(&self) -> u64 {
        self.inner.state.auth_failures.load(Ordering::Relaxed)
    }

    /// The `host:port` of every well-formed CONNECT request, in arrival
    /// order, whether or not it was then allowed.
    pub fn connect_targets(&self) -> Vec<String> {
        lock(&self.inner.state.targets).clone()
    }

    /// Stops accepting (the port is released) and ends every tunnel; returns
    /// once every task of the proxy has ended.
    pub async fn stop(&self) {
        self.inner.shutdown.cancel();
        let accept = lock(&self.inner.accept).take();
        if let Some(accept) = accept {
            // The accept loop ends its connection tasks before it returns;
            // a panic in it is already reported by the runtime.
            let _ = accept.await;
        }
    }
}

/// Accepts until `shutdown`, then aborts and awaits every connection task,
/// so no tunnel outlives [`ConnectProxy::stop`].
async fn accept_loop(listener: TcpListener, state: Arc<State>, shutdown: CancellationToken) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let state = Arc::clone(&state);
                    tasks.spawn(async move {
                        if let Err(e) = serve(socket, &state).await {
                            tracing::debug!(%peer, error = %e, "proxy connection ended with an error");
                        }
                    });
                }
                // Per-connection failures (the client reset before accept,
                // out of descriptors): keep serving the others.
                Err(e) => tracing::debug!(error = %e, "proxy accept failed"),
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    tasks.shutdown().await;
}

/// A parsed request head: what to answer, or where to tunnel.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Connect {
        target: String,
        authorization: Option<String>,
    },
    Reject(u16, &'static str),
}

/// One client connection: request head, checks, dial, `200`, then bytes
/// both ways until either side closes.
async fn serve(mut client: TcpStream, state: &State) -> std::io::Result<()> {
    let head = match tokio::time::timeout(STEP_TIMEOUT, read_head(&mut client)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return respond(&mut client, 400, "Bad Request").await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return respond(&mut client, 408, "Request Timeout").await,
    };
    let (target, authorization) = match parse_request(&head) {
        Request::Connect {
            target,
            authorization,
        } => (target, authorization),
        Request::Reject(code, reason) => return respond(&mut client, code, reason).await,
    };
    lock(&state.targets).push(target.clone());
    let required = lock(&state.auth).clone();
    if let Some(required) = required {
        if authorization.as_deref() != Some(required.as_str()) {
            state.auth_failures.fetch_add(1, Ordering::Relaxed);
            // The value the client sent is a credential: never logged.
            tracing::debug!(%target, "proxy authentication failed");
            client
                .write_all(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                      Proxy-Authenticate: Basic realm=\"connector-testkit\"\r\n\
                      Content-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await?;
            return client.shutdown().await;
        }
    }
    let mut upstream =
        match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(target.as_str())).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%target, error = %e, "proxy cannot reach the target");
                return respond(&mut client, 502, "Bad Gateway").await;
            }
            Err(_) => return respond(&mut client, 504, "Gateway Timeout").await,
        };
    // Small writes (TLS records, h2 frames) should not wait for Nagle.
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    state.tunnels_opened.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%target, "tunnel open");
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// Answers `code` and closes.
async fn respond(client: &mut TcpStream, code: u16, reason: &str) -> std::io::Result<()> {
    let allow = if code == 405 {
        "Allow: CONNECT\r\n"
    } else {
        ""
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\n{allow}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    client.write_all(response.as_bytes()).await?;
    client.shutdown().await
}

/// Reads up to the blank line that ends the head. `None` when the head is
/// longer than [`MAX_REQUEST_HEAD`] or the client closed before finishing
/// it. Reads one byte at a time: the client may send the tunnelled
/// protocol's first bytes right behind the head, and they must stay in the
/// socket for the copy.
async fn read_head(io: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST_HEAD || io.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        head.push(byte[0]);
    }
    Ok(Some(head))
}

/// Parses `CONNECT host:port HTTP/1.x` and its headers.
fn parse_request(head: &[u8]) -> Request {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Reject(400, "Bad Request");
    };
    let mut lines = text.split("\r\n");
    let mut parts = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Reject(400, "Bad Request");
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Reject(400, "Bad Request");
    }
    if method != "CONNECT" {
        return Request::Reject(405, "Method Not Allowed");
    }
    let valid_target = target
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if !valid_target {
        return Request::Reject(400, "Bad Request");
    }
    let authorization = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, value)| value.trim().to_string());
    Request::Connect {
        target: target.to_string(),
        authorization,
    }
}

/// Standard base64 with padding (RFC 4648), as `Basic` credentials use.
fn base64_std(input: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(input)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// Sends `request` to the proxy and returns its status line, with the
    /// stream for further use.
    async fn ask(proxy: &ConnectProxy, request: &[u8]) -> (String, TcpStream) {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(request).await.unwrap();
        let head = tokio::time::timeout(WAIT, read_head(&mut s))
            .await
            .expect("answered in time")
            .unwrap()
            .expect("a response head");
        let text = String::from_utf8(head).unwrap();
        let line = text.split("\r\n").next().unwrap().to_string();
        (line, s)
    }

    /// A one-shot echo server.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        addr
    }

    #[test]
    fn parses_connect_and_rejects_the_rest() {
        assert_eq!(
            parse_request(
                b"CONNECT h:1 HTTP/1.1\r\nHost: h:1\r\nproxy-authorization:  Basic eA== \r\n\r\n"
            ),
            Request::Connect {
                target: "h:1".into(),
                authorization: Some("Basic eA==".into())
            }
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\n\r\n"),
            Request::Reject(405, "Method Not Allowed")
        );
        for bad in [
            &b"CONNECT h HTTP/1.1\r\n\r\n"[..],
            b"CONNECT h:0 HTTP/1.1\r\n\r\n",
            b"CONNECT :1 HTTP/1.1\r\n\r\n",
            b"CONNECT h:1\r\n\r\n",
            b"CONNECT h:1 SPDY/3\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert_eq!(parse_request(bad), Request::Reject(400, "Bad Request"));
        }
    }

    #[tokio::test]
    async fn tunnels_bytes_and_counts() {
        let proxy = ConnectProxy::start().await.unwrap();
        let target = echo_server().await;
        let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        let (line, mut s) = ask(&proxy, req.as_bytes()).await;
        assert_eq!(line, "HTTP/1.1 200 Connection established");
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(WAIT, s.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(proxy.tunnels_opened(), 1);
        assert_eq!(proxy.connect_targets(), vec![target.to_string()]);

        // Stopping ends the tunnel: the client sees EOF or a reset.
        proxy.stop().await;
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("tunnel ended");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }

    #[tokio::test]
    async fn bad_requests_get_statuses_not_panics() {
        let proxy = ConnectProxy::start().await.unwrap();
        let (line, _) = ask(&proxy, b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(line.starts_with("HTTP/1.1 405"), "{line}");
        let (line, _) = ask(&proxy, b"CONNECT nope HTTP/1.1\r\n\r\n").await;
        assert!(line.starts_with("HTTP/1.1 400"), "{line}");
        let huge = vec![b'a'; MAX_REQUEST_HEAD];
        let (line, _) = ask(&proxy, &huge).await;
        assert!(line.starts_with("HTTP/1.1 400"), "{line}");

        // A port nothing listens on.
        let closed = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        let req = format!("CONNECT {dead} HTTP/1.1\r\n\r\n");
        let (line, _) = ask(&proxy, req.as_bytes()).await;
        assert!(line.starts_with("HTTP/1.1 502"), "{line}");
        assert_eq!(proxy.tunnels_opened(), 0);
        proxy.stop().await;
    }

    #[tokio::test]
    async fn auth_is_enforced_when_required() {
        let proxy = ConnectProxy::start().await.unwrap();
        proxy.require_auth("user", "pa55");
        assert!(!format!("{proxy:?}").contains("dXNlcjpwYTU1"));
        let target = echo_server().await;
        for auth in ["", "Proxy-Authorization: Basic d3Jvbmc6d3Jvbmc=\r\n"] {
            let req = format!("CONNECT {target} HTTP/1.1\r\n{auth}\r\n");
            let (line, _) = ask(&proxy, req.as_bytes()).await;
            assert!(line.starts_with("HTTP/1.1 407"), "{line}");
        }
        assert_eq!(proxy.auth_failures(), 2);
        let req =
            format!("CONNECT {target} HTTP/1.1\r\nProxy-Authorization: Basic dXNlcjpwYTU1\r\n\r\n");
        let (line, _) = ask(&proxy, req.as_bytes()).await;
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        assert_eq!(proxy.tunnels_opened(), 1);
        assert_eq!(proxy.connect_targets().len(), 3);
        proxy.stop().await;
    }
}
