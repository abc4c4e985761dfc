//! An in-memory [`StreamMux`] over the engine: channels instead of sockets,
//! so a whole runner can be tested on paused tokio time, deterministically
//! and fast, with the same server logic the socket front-ends use.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use connector_core::{
    ConnectionStats, MessageStream, MultiTransportOptions, MuxStats, RegistrationKey, StreamInfo,
    StreamMux, Transport, TransportError, TransportErrorKind,
};
use connector_proto::StreamMessage;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::engine::{ConnectionMeta, TestServer};

/// Capacity of each direction of an in-memory stream.
const CHANNEL_CAPACITY: usize = 64;

/// A [`StreamMux`] whose streams are pairs of channels into a
/// [`TestServer`]: one "connection" per stream, numbered from the engine's
/// connection ids. Cheap to clone; clones share knobs and connections.
///
/// Fault knobs: [`MemoryMux::fail_next_opens`], [`MemoryMux::set_open_delay`],
/// [`MemoryMux::set_black_hole`], [`MemoryMux::kill_connection`].
#[derive(Clone)]
pub struct MemoryMux {
    engine: TestServer,
    inner: Arc<MuxInner>,
}

struct MuxInner {
    fail_next: AtomicUsize,
    black_hole: AtomicBool,
    delay: Mutex<Option<Duration>>,
    /// Live connections and the token that kills each.
    conns: Mutex<BTreeMap<u64, CancellationToken>>,
    dials_succeeded: AtomicU64,
    dials_failed: AtomicU64,
}

impl fmt::Debug for MemoryMux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryMux")
            .field("live_connections", &self.conns().len())
            .finish_non_exhaustive()
    }
}

impl MemoryMux {
    /// A mux over `engine` (same as [`TestServer::memory_mux`]).
    pub fn new(engine: TestServer) -> Self {
        Self {
            engine,
            inner: Arc::new(MuxInner {
                fail_next: AtomicUsize::new(0),
                black_hole: AtomicBool::new(false),
                delay: Mutex::new(None),
                conns: Mutex::new(BTreeMap::new()),
                dials_succeeded: AtomicU64::new(0),
                dials_failed: AtomicU64::new(0),
            }),
        }
    }

    fn conns(&self) -> MutexGuard<'_, BTreeMap<u64, CancellationToken>> {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The engine behind this mux.
    pub fn engine(&self) -> &TestServer {
        &self.engine
    }

    /// The next `n` calls to `open` fail with a `Connect` transport error
    /// (a refused dial), before any stream reaches the engine.
    pub fn fail_next_opens(&self, n: usize) {
        self.inner.fail_next.store(n, Ordering::SeqCst);
    }

    /// Every `open` first waits `delay` (tokio time, so paused-time tests
    /// advance through it): a slow dial. `Duration::ZERO` turns it off.
    pub fn set_open_delay(&self, delay: Duration) {
        let mut d = self
            .inner
            .delay
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *d = (!delay.is_zero()).then_some(delay);
    }

    /// While on, `open` never completes (a dial into a black hole); only the
    /// caller's own timeout ends it. Opens already waiting stay stuck.
    pub fn set_black_hole(&self, on: bool) {
        self.inner.black_hole.store(on, Ordering::SeqCst);
    }

    /// Abruptly breaks connection `id`: the client's inbound yields a
    /// `Closed` transport error and ends, the engine sees an error. False if
    /// no such live connection.
    pub fn kill_connection(&self, id: u64) -> bool {
        match self.conns().get(&id) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    /// Breaks every live connection; returns how many.
    pub fn kill_all_connections(&self) -> usize {
        let conns = self.conns();
        conns.values().for_each(CancellationToken::cancel);
        conns.len()
    }

    /// Ids of the live connections (one per live stream), ascending.
    pub fn connection_ids(&self) -> Vec<u64> {
        self.conns().keys().copied().collect()
    }
}

#[async_trait]
impl StreamMux for MemoryMux {
    async fn open(
        &self,
        key: &RegistrationKey,
        register: StreamMessage,
    ) -> Result<MessageStream, TransportError> {
        if self.inner.black_hole.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let delay = *self
            .inner
            .delay
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let failed = self
            .inner
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failed {
            self.inner.dials_failed.fetch_add(1, Ordering::Relaxed);
            return Err(TransportError::new(
                TransportErrorKind::Connect,
                format!("memory mux: injected connect failure for {key}"),
            ));
        }

        let id = self.engine.allocate_connection_id();
        let kill = CancellationToken::new();
        let (c2s_tx, c2s_rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (s2c_tx, s2c_rx) = mpsc::channel(CHANNEL_CAPACITY);
        // The contract: register is on its way before `open` returns.
        c2s_tx.send(register).await.map_err(|_| {
            TransportError::new(TransportErrorKind::Closed, "memory mux: stream vanished")
        })?;
        self.conns().insert(id, kill.clone());
        self.inner.dials_succeeded.fetch_add(1, Ordering::Relaxed);

        // Placeholder peer: the port is the connection id, so logs and
        // `registrations()` still tell connections apart.
        let port = u16::try_from(id).unwrap_or(u16::MAX);
        let meta = ConnectionMeta::new(id, SocketAddr::from((Ipv4Addr::LOCALHOST, port)), "memory");
        let engine_in = Killable::new(ReceiverStream::new(c2s_rx), kill.clone(), || {
            "memory connection killed".to_string()
        });
        let engine = self.engine.clone();
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            engine.serve_stream(meta, engine_in, s2c_tx).await;
            inner
                .conns
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&id);
        });

        let client_in = Killable::new(ReceiverStream::new(s2c_rx), kill, || {
            TransportError::new(TransportErrorKind::Closed, "memory connection killed")
        });
        Ok(MessageStream::new(
            c2s_tx,
            Box::pin(client_in),
            StreamInfo::new(id),
        ))
    }

    fn stats(&self) -> MuxStats {
        let mut stats = MuxStats::default();
        stats.connections = self
            .conns()
            .keys()
            .map(|id| ConnectionStats::new(*id, 1, 1))
            .collect();
        stats.dials_succeeded = self.inner.dials_succeeded.load(Ordering::Relaxed);
        stats.dials_failed = self.inner.dials_failed.load(Ordering::Relaxed);
        stats
    }
}

/// A [`Transport`] that hands out one shared [`MemoryMux`], whatever the
/// options say (the URL is not dialled), so a runner configured for any
/// endpoint runs in memory.
#[derive(Debug, Clone)]
pub struct MemoryTransport {
    mux: MemoryMux,
}

impl MemoryTransport {
    /// A transport handing out `mux`.
    pub fn new(mux: MemoryMux) -> Self {
        Self { mux }
    }

    /// The mux it hands out (named so it does not shadow
    /// [`Transport::mux`]).
    pub fn memory_mux(&self) -> &MemoryMux {
        &self.mux
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn mux(
        &self,
        _options: &MultiTransportOptions,
    ) -> Result<Arc<dyn StreamMux>, TransportError> {
        Ok(Arc::new(self.mux.clone()))
    }
}

/// A stream of `Ok` items that yields one error and ends once its token is
/// cancelled: a connection dying under a stream.
struct Killable<S, E> {
    inner: S,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
    make_err: fn() -> E,
    done: bool,
}

impl<S, E> Killable<S, E> {
    fn new(inner: S, kill: CancellationToken, make_err: fn() -> E) -> Self {
        Self {
            inner,
            kill: Box::pin(kill.cancelled_owned()),
            make_err,
            done: false,
        }
    }
}

impl<S: Stream + Unpin, E> Stream for Killable<S, E> {
    type Item = Result<S::Item, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        // Checked first: after a kill nothing more is delivered.
        if self.kill.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(Some(Err((self.make_err)())));
        }
        Pin::new(&mut self.inner)
            .poll_next(cx)
            .map(|item| item.map(Ok))
    }
}
