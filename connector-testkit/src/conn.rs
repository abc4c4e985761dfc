//! What the two socket front-ends share: the accept loop (with TLS
//! terminated here, not inside tonic, so a TLS connection can be killed the
//! same way as a plain one), the registry of live TCP connections, and the
//! killable socket wrapper.
//!
//! Killing works below every protocol layer: the wrapper's reads and writes
//! start failing and the socket is closed with `SO_LINGER = 0`, so the peer
//! sees a reset, exactly like a crashed server or a dropped NAT entry.

use std::collections::BTreeMap;
use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::engine::TestServer;
use crate::error::TestkitError;

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One live TCP connection of a socket front-end.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The connection's id (the `connection_id` its streams report in
    /// [`TestServer::registrations`]).
    pub connection_id: u64,
    /// The client's address; distinct connections from one host differ in
    /// port.
    pub peer: SocketAddr,
    /// Streams it carries now (gRPC: `Connect` calls; WebSocket: 0 or 1).
    pub open_streams: usize,
}

struct Entry {
    peer: SocketAddr,
    kill: CancellationToken,
    open_streams: usize,
}

/// Live connections of one front-end, with change notification.
pub(crate) struct ConnRegistry {
    conns: Mutex<BTreeMap<u64, Entry>>,
    accepted: AtomicU64,
    changed: watch::Sender<u64>,
}

impl ConnRegistry {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            conns: Mutex::new(BTreeMap::new()),
            accepted: AtomicU64::new(0),
            changed: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update<R>(&self, f: impl FnOnce(&mut BTreeMap<u64, Entry>) -> R) -> R {
        let r = f(&mut self.lock());
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        r
    }

    fn add(self: &Arc<Self>, id: u64, peer: SocketAddr) -> (ConnGuard, CancellationToken) {
        let kill = CancellationToken::new();
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.update(|m| {
            m.insert(
                id,
                Entry {
                    peer,
                    kill: kill.clone(),
                    open_streams: 0,
                },
            )
        });
        (self.guard(id, |m, id| drop(m.remove(&id))), kill)
    }

    pub(crate) fn kill(&self, id: u64) -> bool {
        match self.lock().get(&id) {
            Some(e) => {
                e.kill.cancel();
                true
            }
            None => false,
        }
    }

    pub(crate) fn kill_all(&self) -> usize {
        let m = self.lock();
        m.values().for_each(|e| e.kill.cancel());
        m.len()
    }

    pub(crate) fn list(&self) -> Vec<ConnectionInfo> {
        self.lock()
            .iter()
            .map(|(id, e)| ConnectionInfo {
                connection_id: *id,
                peer: e.peer,
                open_streams: e.open_streams,
            })
            .collect()
    }

    pub(crate) fn count(&self) -> usize {
        self.lock().len()
    }

    pub(crate) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Counts a stream on connection `id` until the guard drops.
    pub(crate) fn stream_opened(self: &Arc<Self>, id: u64) -> StreamGuard {
        self.update(|m| {
            if let Some(e) = m.get_mut(&id) {
                e.open_streams += 1;
            }
        });
        self.guard(id, |m, id| {
            if let Some(e) = m.get_mut(&id) {
                e.open_streams = e.open_streams.saturating_sub(1);
            }
        })
    }

    fn guard(self: &Arc<Self>, id: u64, release: fn(&mut BTreeMap<u64, Entry>, u64)) -> Guard {
        Guard {
            registry: Arc::clone(self),
            id,
            release,
        }
    }

    /// Waits until `cond` holds on the live connections, re-checking on
    /// every change (accept, close, stream count).
    pub(crate) async fn wait_until(
        &self,
        timeout: Duration,
        what: impl FnOnce() -> String,
        mut cond: impl FnMut(&[ConnectionInfo]) -> bool,
    ) -> Result<(), TestkitError> {
        let deadline = Instant::now() + timeout;
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if cond(&self.list()) {
                return Ok(());
            }
            if !matches!(
                tokio::time::timeout_at(deadline, rx.changed()).await,
                Ok(Ok(()))
            ) {
                return if cond(&self.list()) {
                    Ok(())
                } else {
                    Err(TestkitError::Timeout {
                        what: format!("{}; connections now: {:?}", what(), self.list()),
                    })
                };
            }
        }
    }
}

/// Undoes one registry change of connection `id` when dropped (and
/// notifies the waiters).
pub(crate) struct Guard {
    registry: Arc<ConnRegistry>,
    id: u64,
    release: fn(&mut BTreeMap<u64, Entry>, u64),
}

impl Drop for Guard {
    fn drop(&mut self) {
        let (id, release) = (self.id, self.release);
        self.registry.update(|m| release(m, id));
    }
}

/// Removes its connection from the registry when the socket is dropped.
pub(crate) type ConnGuard = Guard;

/// Uncounts a stream when dropped.
pub(crate) type StreamGuard = Guard;

/// Identity of an accepted connection, also handed to tonic as its
/// connect info so the `Connect` handler can read it from the request's
/// extensions.
#[derive(Debug, Clone)]
pub(crate) struct ServerConnInfo {
    pub(crate) connection_id: u64,
    pub(crate) peer: SocketAddr,
}

enum IoKind {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted socket (plain or TLS) whose IO fails once its connection is
/// killed.
pub(crate) struct ServerIo {
    io: IoKind,
    // Separate waits for the read and write sides: each registers the
    // waker of its own poll, so a kill wakes whichever side is parked.
    kill_read: Pin<Box<WaitForCancellationFutureOwned>>,
    kill_write: Pin<Box<WaitForCancellationFutureOwned>>,
    killed: bool,
    info: ServerConnInfo,
    _guard: ConnGuard,
}

impl ServerIo {
    pub(crate) fn info(&self) -> &ServerConnInfo {
        &self.info
    }

    fn tcp(&self) -> &TcpStream {
        match &self.io {
            IoKind::Plain(s) => s,
            IoKind::Tls(s) => s.get_ref().0,
        }
    }

    /// True once killed; on the first observation the socket is set to
    /// reset on close, so the peer sees an abrupt failure, not a clean FIN.
    fn poll_killed(&mut self, cx: &mut Context<'_>, write: bool) -> bool {
        if !self.killed {
            let fut = if write {
                self.kill_write.as_mut()
            } else {
                self.kill_read.as_mut()
            };
            if fut.poll(cx).is_ready() {
                self.killed = true;
                // Zero linger never blocks on drop (the reason for the
                // deprecation); `set_zero_linger` needs tokio 1.50 while the
                // workspace floor is 1.40.
                #[allow(deprecated)]
                let linger = self.tcp().set_linger(Some(Duration::ZERO));
                if let Err(e) = linger {
                    tracing::debug!("testkit: SO_LINGER on a killed connection: {e}");
                }
            }
        }
        self.killed
    }
}

fn killed_err() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "connection killed by the test server",
    )
}

/// What both socket kinds are.
trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}

impl ServerIo {
    /// `op` on the socket, or the kill error once killed (`write`: which
    /// side's kill wait to poll).
    fn poll_io<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        write: bool,
        op: impl FnOnce(Pin<&mut dyn Io>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let this = self.get_mut();
        if this.poll_killed(cx, write) {
            return Poll::Ready(Err(killed_err()));
        }
        let io: &mut dyn Io = match &mut this.io {
            IoKind::Plain(s) => s,
            IoKind::Tls(s) => s.as_mut(),
        };
        op(Pin::new(io), cx)
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.poll_io(cx, false, |io, cx| io.poll_read(cx, buf))
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(cx, true, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_io(cx, true, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_io(cx, true, |io, cx| io.poll_shutdown(cx))
    }
}

#[cfg(feature = "grpc")]
impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = ServerConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

/// Accepts until `shutdown`, registering each TCP connection at once and
/// handing it (after the TLS handshake, which runs in its own task so a slow
/// client cannot stall the loop) to `on_conn`. Dropping the listener when
/// this returns frees the port for a restart.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    engine: TestServer,
    registry: Arc<ConnRegistry>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    on_conn: Arc<dyn Fn(ServerIo) + Send + Sync>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("testkit: accept failed: {e}");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let connection_id = engine.allocate_connection_id();
        let (guard, kill) = registry.add(connection_id, peer);
        tracing::debug!(connection_id, %peer, "testkit: connection accepted");
        let make = move |io: IoKind, guard: ConnGuard, kill: &CancellationToken| ServerIo {
            io,
            kill_read: Box::pin(kill.clone().cancelled_owned()),
            kill_write: Box::pin(kill.clone().cancelled_owned()),
            killed: false,
            info: ServerConnInfo {
                connection_id,
                peer,
            },
            _guard: guard,
        };
        match &tls {
            None => on_conn(make(IoKind::Plain(tcp), guard, &kill)),
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let on_conn = Arc::clone(&on_conn);
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    tokio::select! {
                        r = handshake => match r {
                            Ok(Ok(s)) => on_conn(make(IoKind::Tls(Box::new(s)), guard, &kill)),
                            Ok(Err(e)) => tracing::debug!(connection_id, "testkit: TLS handshake failed: {e}"),
                            Err(_) => tracing::debug!(connection_id, "testkit: TLS handshake timed out"),
                        },
                        _ = kill.cancelled() => {}
                    }
                });
            }
        }
    }
}

/// Binds `addr`, retrying briefly while the port is still held (a restart
/// right after a stop, when the kernel has not released the old socket).
pub(crate) async fn bind_retry(addr: SocketAddr) -> Result<TcpListener, TestkitError> {
    let mut attempt = 0u32;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < 40 => {
                attempt += 1;
                // A retry interval, not a wait for something to settle: the
                // old listener is already closed when a restart gets here.
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => return Err(TestkitError::Io(e)),
        }
    }
}
