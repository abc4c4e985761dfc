//! A listener that speaks HTTP/1.1 only, for testing what a client does
//! when HTTP/2 cannot get through: the corporate proxy or load balancer
//! that strips HTTP/2 and answers the h2 preface as a bad HTTP/1.1 request.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::conn::bind_retry;
use crate::error::TestkitError;
use crate::tls::TestCertificate;

/// The answer to whatever arrives: what an HTTP/1.1-only server says to
/// `PRI * HTTP/2.0`.
const ANSWER: &[u8] = b"HTTP/1.1 505 HTTP Version Not Supported\r\n\
Connection: close\r\n\
Content-Type: text/plain\r\n\
Content-Length: 25\r\n\
\r\n\
this server speaks HTTP/1";

/// How long a connection may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads a request head (up to the blank line, at most 8 KiB, at most
/// [`READ_TIMEOUT`]).
const MAX_HEAD: usize = 8 * 1024;

/// An HTTP/1.1-only server on `127.0.0.1`: it reads each connection's
/// request head (an HTTP/2 client's preface `PRI * HTTP/2.0` is one), answers
/// `HTTP/1.1 505 HTTP Version Not Supported` and closes.
///
/// With TLS ([`Http1OnlyServer::start_tls_on`]) it offers ALPN `http/1.1`
/// only, so a client that offers only `h2` (every gRPC client) fails the
/// handshake with the `no_application_protocol` alert.
///
/// Stands where a gRPC server should be; [`Http1OnlyServer::start_on`] takes
/// the address of a stopped [`crate::GrpcTestServer`] so the test can later
/// stop this one and restart the gRPC server on the same port (the moment
/// HTTP/2 starts getting through).
#[derive(Debug)]
pub struct Http1OnlyServer {
    addr: SocketAddr,
    tls: bool,
    answered: Arc<AtomicU64>,
    shutdown: CancellationToken,
    accept: Option<JoinHandle<()>>,
}

impl Http1OnlyServer {
    /// Binds `127.0.0.1:0`.
    pub async fn start() -> Result<Self, TestkitError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Ok(Self::serve(listener, None)?)
    }

    /// Binds `addr` (retrying briefly while a listener that was just closed
    /// still holds it).
    pub async fn start_on(addr: SocketAddr) -> Result<Self, TestkitError> {
        let listener = bind_retry(addr).await?;
        Ok(Self::serve(listener, None)?)
    }

    /// Binds `addr` and serves TLS with `cert`, offering ALPN `http/1.1`
    /// only (see the type's docs).
    pub async fn start_tls_on(
        addr: SocketAddr,
        cert: &TestCertificate,
    ) -> Result<Self, TestkitError> {
        let acceptor = TlsAcceptor::from(cert.server_config(&[b"http/1.1"], false)?);
        let listener = bind_retry(addr).await?;
        Ok(Self::serve(listener, Some(acceptor))?)
    }

    fn serve(listener: TcpListener, tls: Option<TlsAcceptor>) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let answered = Arc::new(AtomicU64::new(0));
        let shutdown = CancellationToken::new();
        let has_tls = tls.is_some();
        let accept = tokio::spawn(accept_loop(
            listener,
            tls,
            Arc::clone(&answered),
            shutdown.clone(),
        ));
        Ok(Self {
            addr,
            tls: has_tls,
            answered,
            shutdown,
            accept: Some(accept),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `grpc://127.0.0.1:PORT` (or `grpcs://localhost:PORT` with TLS):
    /// where a client expects gRPC.
    pub fn grpc_url(&self) -> String {
        if self.tls {
            format!("grpcs://localhost:{}", self.addr.port())
        } else {
            format!("grpc://{}", self.addr)
        }
    }

    /// Connections answered (or being answered) with the HTTP/1.1 refusal
    /// so far (with TLS, only clients that got through the handshake).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Stops accepting and releases the port. Connections being answered
    /// finish by themselves (each is bounded by a short read timeout).
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.accept.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Http1OnlyServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    answered: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, _)) => {
                let answered = Arc::clone(&answered);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let result = match tls {
                        None => answer(socket, &answered).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(socket)).await
                            {
                                Ok(Ok(tls)) => answer(tls, &answered).await,
                                Ok(Err(e)) => {
                                    tracing::debug!("http1-only listener: TLS refused: {e}");
                                    Err(e)
                                }
                                Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
                            }
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!("http1-only listener: connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::debug!("http1-only listener: accept failed: {e}");
            }
        }
    }
}

/// Reads the request head, counts and writes the answer, then waits (bounded)
/// for the client to close.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: S,
    answered: &AtomicU64,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(READ_TIMEOUT, read_head).await {
        Ok(r) => r?,
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    }
    tracing::debug!(
        head = %String::from_utf8_lossy(&head[..head.len().min(24)]).escape_debug(),
        "http1-only listener: refusing"
    );
    // Counted before it is written, so a client that saw the answer always
    // finds it counted.
    answered.fetch_add(1, Ordering::Relaxed);
    socket.write_all(ANSWER).await?;
    socket.flush().await?;
    socket.shutdown().await?;
    // Let the client read the answer before the socket goes away.
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    Ok(())
}
