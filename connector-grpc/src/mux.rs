//! [`GrpcMux`]: registrations as `Connect` streams over a pool of HTTP/2
//! channels, and [`GrpcTransport`], which makes one.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_trait::async_trait;
use connector_core::{
    ConnectionStats, InboundStream, MessageStream, MultiTransportOptions, MuxStats,
    RegistrationKey, StreamInfo, StreamMux, Transport, TransportError,
};
use connector_proto::{StreamMessage, CONNECT_PATH};
use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{BufferSettings, Codec, Streaming};
use tonic::transport::Channel;
use tracing::Instrument;

use crate::channel::{ChannelFactory, Dialled};
use crate::error::{open_error, stream_error, Blame, GrpcError};
use crate::pool::{lock, FailureOutcome, Pool, SharedPool, Slot};

/// Messages the driver may queue on a stream's outbound half before it
/// waits for the connection to take them.
const OUTBOUND_CAPACITY: usize = 64;

/// The first allocation of each stream's encode and decode buffers (tonic
/// allocates 8 KiB of each per stream by default, eagerly). An idle
/// registration sends and receives a heartbeat of a few dozen bytes every
/// 30 s, and the largest control message (`register`, `register_response`)
/// is a few hundred bytes at most, so 256 bytes hold all of them; at 1 KiB
/// the two buffers were an eighth of an idle registration's memory. A
/// larger message grows the buffer as needed (prost reserves what it
/// writes, the decoder reserves the message's length, and the grown
/// capacity is kept while the buffer is not shared), so only throughput
/// with large payloads pays an extra allocation now and then.
const CODEC_BUFFER_SIZE: usize = 256;
/// Encoded messages are handed to HTTP/2 once this many bytes are queued
/// (tonic's default), so bursts still go out in large writes.
const CODEC_YIELD_THRESHOLD: usize = 32 * 1024;

/// prost's codec with [`CODEC_BUFFER_SIZE`] buffers.
#[derive(Debug, Clone, Copy, Default)]
struct SmallBufferCodec;

impl Codec for SmallBufferCodec {
    type Encode = StreamMessage;
    type Decode = StreamMessage;
    type Encoder = tonic_prost::ProstEncoder<StreamMessage>;
    type Decoder = tonic_prost::ProstDecoder<StreamMessage>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(buffer_settings())
    }
}

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(CODEC_BUFFER_SIZE, CODEC_YIELD_THRESHOLD)
}

/// `ConnectorService/Connect` on `channel`: what the generated client's
/// `connect` does, with [`SmallBufferCodec`] instead of the default codec.
async fn connect(
    channel: Channel,
    body: impl Stream<Item = StreamMessage> + Send + 'static,
    max_message_size: usize,
) -> Result<tonic::Response<Streaming<StreamMessage>>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(max_message_size)
        .max_encoding_message_size(max_message_size);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {e}")))?;
    let mut request = tonic::Request::new(body);
    request.extensions_mut().insert(tonic::GrpcMethod::new(
        "connector.v1.ConnectorService",
        "Connect",
    ));
    let path = http::uri::PathAndQuery::from_static(CONNECT_PATH);
    grpc.streaming(request, path, SmallBufferCodec).await
}

/// How many times an open moves to another channel after a stall (the
/// server queued the stream past its concurrency limit) before it gives up.
const MAX_STALL_RETRIES: usize = 3;

/// The most channels one dial round opens at once (see
/// [`Inner::dial_locked`]).
const MAX_CONCURRENT_DIALS: usize = 8;

/// The shared result of the last dial, so that the opens that waited for
/// it get its error instead of each dialling again in turn.
#[derive(Debug, Default)]
struct DialState {
    generation: u64,
    last_error: Option<GrpcError>,
}

struct Inner {
    factory: ChannelFactory,
    /// `factory.target()`, shared with the streams for their errors.
    target: Arc<str>,
    max_message_size: usize,
    pool: SharedPool<Channel>,
    /// Held (across the dial's await) by the one task dialling; the others
    /// wait here, then use the channel it added or share its error.
    dial: tokio::sync::Mutex<DialState>,
    /// `DialState::generation`, readable without the lock.
    dial_generation: AtomicU64,
    /// Opens waiting for `dial`: what the next dial round is sized for.
    queued: AtomicUsize,
}

/// Counts an open in [`Inner::queued`] while it waits for the dial lock
/// (dropped, too, when the open gives up while waiting).
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A [`StreamMux`] over gRPC: each registration is one
/// `ConnectorService/Connect` stream; streams share HTTP/2 connections
/// ("channels") of at most `max_streams_per_channel` streams each.
///
/// * **Strict accounting.** A stream reserves a slot on a channel with room
///   before it is opened and frees it when its inbound half is dropped. When
///   every channel is full new channels are dialled, as many at once (at
///   most 8) as the opens waiting will fill; the waiting opens share that
///   dial round's channels, or its error.
/// * **Reads the server's stream limit.** Each dial waits (one round trip,
///   within `connect_timeout`) for the server's first SETTINGS frame, read
///   off the wire under hyper, and caps the channel at its
///   `SETTINGS_MAX_CONCURRENT_STREAMS`; a later SETTINGS frame that lowers
///   it applies at once, and reservations above it move to another channel.
/// * **Never hangs on a low server limit it was not told.** A server whose
///   limit is below the cap makes h2 queue streams silently. As a fallback
///   for a limit the SETTINGS did not show (sent late, or lowered while
///   streams were queued), an open whose response headers do not arrive within
///   `connect_timeout` on a channel that already carries established streams
///   lowers that channel's cap to those streams (and the cap of channels
///   dialled later), frees its slot and moves to another channel, at most
///   3 times. New channels also carry at most 100 streams until they have
///   seen a response, the limit hyper assumes before the server's SETTINGS.
/// * **Health.** 3 consecutive failures on a channel (opens failing with a
///   transport error, streams dying of one) drop it from the pool; its
///   streams end by themselves and new opens dial a fresh channel.
///
/// **Deadlines of [`StreamMux::open`].** Finding a slot (waiting for a dial
/// in progress, then dialling) takes at most 2 × `connect_timeout`; the
/// response headers at most `connect_timeout` per attempt. In the common
/// case an open returns within `connect_timeout` of getting a slot; with
/// stalls it makes at most 4 attempts.
pub struct GrpcMux {
    inner: Arc<Inner>,
}

impl GrpcMux {
    /// Validates `options` (a `grpc://`/`grpcs://` URL, readable and valid
    /// TLS files) and makes a mux. Dials nothing: the first open (or
    /// [`GrpcTransport::mux`], which dials eagerly) does.
    pub fn new(options: &MultiTransportOptions) -> Result<Self, GrpcError> {
        let factory = ChannelFactory::new(options)?;
        Ok(Self {
            inner: Arc::new(Inner {
                target: Arc::from(factory.target()),
                factory,
                max_message_size: options.max_message_size,
                pool: Arc::new(Mutex::new(Pool::new(options.max_streams_per_channel))),
                dial: tokio::sync::Mutex::new(DialState::default()),
                dial_generation: AtomicU64::new(0),
                queued: AtomicUsize::new(0),
            }),
        })
    }

    /// One entry per open channel: its id, the streams it carries and the
    /// most it may carry now.
    pub fn channel_stats(&self) -> Vec<ConnectionStats> {
        lock(&self.inner.pool).channel_stats()
    }

    /// Checks that gRPC over HTTP/2 gets through to the server, without
    /// registering anything: opens a `Connect` stream that carries no
    /// message (its request body ends at once) and waits, at most
    /// `connect_timeout`, for the server's answer. Response headers or any
    /// gRPC status the server sends count as success: HTTP/2 got through.
    /// A program on a fallback transport calls this to learn when to come
    /// back; [`GrpcError::http2_refusal`] sorts the failures.
    pub async fn probe(&self) -> Result<(), GrpcError> {
        let inner = &self.inner;
        let (slot, channel) = inner.acquire().await?;
        let timeout = inner.factory.connect_timeout();
        let body = futures_util::stream::empty::<StreamMessage>();
        let opened = connect(channel, body, inner.max_message_size);
        let result = match tokio::time::timeout(timeout, opened).await {
            Ok(Ok(_response)) => Ok(()),
            Ok(Err(status)) => match open_error(inner.factory.target(), status) {
                (_, Blame::Server | Blame::Limit) => Ok(()),
                (err, Blame::Channel) => {
                    inner.count_failure(&slot);
                    Err(err)
                }
            },
            Err(_) => Err(GrpcError::timeout(
                "waiting for the response headers of a probe stream",
                timeout,
            )),
        };
        drop(slot);
        result
    }
}

impl fmt::Debug for GrpcMux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcMux")
            .field("target", &self.inner.factory.target())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Why one open attempt did not produce a stream.
enum AttemptError {
    /// The server queued the stream past its limit; try another channel.
    Stalled,
    /// Give up and report.
    Failed(GrpcError),
}

impl Inner {
    fn channel_span(&self, channel_id: u64) -> tracing::Span {
        tracing::info_span!("grpc_channel", channel_id, server = %self.factory.target())
    }

    /// Dials and adds channels. With `reserve`, also takes a slot for the
    /// caller on the first. Called with the dial lock held.
    ///
    /// A round dials as many channels at once as the opens queued behind
    /// the lock will fill ([`Pool::new_channel_room`] each, at most
    /// [`MAX_CONCURRENT_DIALS`]): each dial is a handshake and a round
    /// trip for the server's SETTINGS, and one at a time a thousand
    /// registrations waited for thirteen of them in a row. Sized by the
    /// opens actually waiting, a round never dials a channel nobody asked
    /// for; without `reserve` (the eager first dial) it dials one.
    ///
    /// [`Pool::new_channel_room`]: crate::pool::Pool::new_channel_room
    async fn dial_locked(
        &self,
        state: &mut DialState,
        reserve: bool,
    ) -> Result<Option<(Slot<Channel>, Channel)>, GrpcError> {
        let dials = if reserve {
            let demand = self.queued.load(Ordering::Relaxed) + 1;
            let room = lock(&self.pool).new_channel_room();
            demand.div_ceil(room).clamp(1, MAX_CONCURRENT_DIALS)
        } else {
            1
        };
        let results = futures_util::future::join_all((0..dials).map(|_| self.factory.dial())).await;
        state.generation += 1;
        self.dial_generation
            .store(state.generation, Ordering::Release);
        let mut mine = None;
        let mut first_error = None;
        let mut added = 0;
        for result in results {
            let Dialled { channel, settings } = match result {
                Ok(dialled) => dialled,
                Err(e) => {
                    lock(&self.pool).dial_failed();
                    tracing::warn!(server = %self.factory.target(), error = %e, "dial failed");
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let closed = || GrpcError::closed("the mux is closed");
            let mut pool = lock(&self.pool);
            // The caller's slot is taken with the first channel, under the
            // same lock, so the waiters cannot take the channel it dialled.
            let id = if reserve && mine.is_none() {
                let r = pool
                    .add_channel_and_reserve(channel, settings)
                    .ok_or_else(closed)?;
                mine = Some((Slot::adopt(&self.pool, r.channel_id), r.channel));
                r.channel_id
            } else {
                pool.add_channel(channel, settings).ok_or_else(closed)?
            };
            drop(pool);
            tracing::debug!(parent: &self.channel_span(id), "channel dialled");
            added += 1;
        }
        match first_error {
            // Every dial failed: the waiters share the error.
            Some(e) if added == 0 => {
                state.last_error = Some(e.clone());
                Err(e)
            }
            _ => {
                state.last_error = None;
                Ok(mine)
            }
        }
    }

    /// Dials a first channel unless the pool has one (once any dial under
    /// way has finished). Errors are counted and logged, not returned: the
    /// opens dial again.
    async fn warm_up(&self) {
        let mut state = self.dial.lock().await;
        {
            let pool = lock(&self.pool);
            if pool.is_closed() || pool.has_channels() {
                return;
            }
        }
        // The error is logged and counted by `dial_locked`.
        let _ = self.dial_locked(&mut state, false).await;
    }

    /// A slot on a channel with room, dialling one if every channel is
    /// full. Unbounded in itself; `acquire` bounds it.
    async fn acquire_unbounded(&self) -> Result<(Slot<Channel>, Channel), GrpcError> {
        loop {
            let seen = self.dial_generation.load(Ordering::Acquire);
            if lock(&self.pool).is_closed() {
                return Err(GrpcError::closed("the mux is closed"));
            }
            if let Some(got) = Slot::try_reserve(&self.pool) {
                return Ok(got);
            }
            let queued = Queued::new(&self.queued);
            let mut state = self.dial.lock().await;
            drop(queued);
            // A dial may have finished, or a stream ended, while we waited.
            if let Some(got) = Slot::try_reserve(&self.pool) {
                return Ok(got);
            }
            if lock(&self.pool).is_closed() {
                return Err(GrpcError::closed("the mux is closed"));
            }
            if state.generation != seen {
                if let Some(e) = &state.last_error {
                    // The dial we waited for failed: share its error rather
                    // than dialling again (the registration backs off).
                    return Err(e.clone());
                }
            }
            if let Some(got) = self.dial_locked(&mut state, true).await? {
                return Ok(got);
            }
        }
    }

    async fn acquire(&self) -> Result<(Slot<Channel>, Channel), GrpcError> {
        let bound = self.factory.connect_timeout().saturating_mul(2);
        tokio::time::timeout(bound, self.acquire_unbounded())
            .await
            .unwrap_or_else(|_| Err(GrpcError::timeout("waiting for a gRPC channel", bound)))
    }

    fn count_failure(&self, slot: &Slot<Channel>) {
        match slot.record_failure() {
            FailureOutcome::Dropped => tracing::warn!(
                "channel failed repeatedly; dropped from the pool, new streams go to a new channel"
            ),
            FailureOutcome::Counted(n) => tracing::debug!(failures = n, "channel failure"),
            FailureOutcome::Gone => {}
        }
    }

    async fn attempt(
        &self,
        key: &RegistrationKey,
        register: StreamMessage,
    ) -> Result<MessageStream, AttemptError> {
        let (mut slot, channel) = self.acquire().await.map_err(AttemptError::Failed)?;
        let channel_id = slot.channel_id();
        let span = tracing::debug_span!(
            parent: &self.channel_span(channel_id),
            "grpc_stream",
            registration = %key,
        );
        async move {
            if slot.over_cap() {
                // The server's SETTINGS arrived after this slot was taken
                // and allow fewer streams: h2 would queue this one.
                tracing::debug!("channel over the server's limit; trying another");
                return Err(AttemptError::Stalled);
            }
            let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
            // `register` goes first, before we wait for response headers
            // (some servers send none until the first message arrives).
            // The channel is new and empty, so this cannot wait.
            tx.send(register)
                .await
                .map_err(|_| AttemptError::Failed(GrpcError::closed("outbound queue closed")))?;
            // The request body ends when the driver drops `outbound` or when
            // the stream's inbound half (which holds `stop`) is dropped: the
            // h2 stream is then gone too, matching the released slot.
            let (stop, stopped) = oneshot::channel::<()>();
            let body = ReceiverStream::new(rx).take_until(stopped);
            let timeout = self.factory.connect_timeout();
            match tokio::time::timeout(timeout, connect(channel, body, self.max_message_size)).await
            {
                Ok(Ok(response)) => {
                    slot.mark_established();
                    tracing::debug!("stream open");
                    let inbound = GuardedInbound {
                        inner: response.into_inner(),
                        slot,
                        target: Arc::clone(&self.target),
                        _stop: stop,
                        done: false,
                    };
                    let inbound: InboundStream = Box::pin(inbound);
                    Ok(MessageStream::new(tx, inbound, StreamInfo::new(channel_id)))
                }
                Ok(Err(status)) => {
                    let (err, blame) = open_error(self.factory.target(), status);
                    match blame {
                        Blame::Limit => {
                            // Refused unprocessed: safe to retry. Our h2 has
                            // the server's SETTINGS now, so a retry on this
                            // channel queues and is caught as a stall.
                            slot.refused();
                            tracing::debug!(error = %err, "stream refused; retrying");
                            return Err(AttemptError::Stalled);
                        }
                        Blame::Channel => self.count_failure(&slot),
                        Blame::Server => {}
                    }
                    tracing::debug!(error = %err, "open failed");
                    Err(AttemptError::Failed(err))
                }
                Err(_) => match slot.stalled() {
                    Some(cap) => {
                        tracing::info!(
                            new_capacity = cap,
                            "no response headers in time on a channel with open streams; \
                             the server's concurrent-stream limit is lower than the cap"
                        );
                        Err(AttemptError::Stalled)
                    }
                    None => {
                        self.count_failure(&slot);
                        Err(AttemptError::Failed(GrpcError::timeout(
                            "waiting for the stream's response headers",
                            timeout,
                        )))
                    }
                },
            }
            // On every error path `slot` and `stop` drop here: the slot is
            // free and the queued h2 stream is cancelled.
        }
        .instrument(span)
        .await
    }
}

#[async_trait]
impl StreamMux for GrpcMux {
    async fn open(
        &self,
        key: &RegistrationKey,
        register: StreamMessage,
    ) -> Result<MessageStream, TransportError> {
        for _ in 0..MAX_STALL_RETRIES {
            match self.inner.attempt(key, register.clone()).await {
                Ok(stream) => return Ok(stream),
                Err(AttemptError::Stalled) => continue,
                Err(AttemptError::Failed(e)) => return Err(e.into()),
            }
        }
        match self.inner.attempt(key, register).await {
            Ok(stream) => Ok(stream),
            Err(AttemptError::Stalled) => Err(GrpcError::timeout(
                format!(
                    "opening a stream ({} channels in a row queued it past the server's limit)",
                    MAX_STALL_RETRIES + 1
                ),
                self.inner.factory.connect_timeout(),
            )
            .into()),
            Err(AttemptError::Failed(e)) => Err(e.into()),
        }
    }

    fn stats(&self) -> MuxStats {
        lock(&self.inner.pool).stats()
    }

    async fn close(&self) {
        let channels = lock(&self.inner.pool).close();
        tracing::debug!(
            server = %self.inner.factory.target(),
            channels = channels.len(),
            "gRPC mux closed"
        );
        drop(channels);
    }
}

/// The inbound half handed to the driver: tonic's stream, errors sorted
/// into [`TransportError`]s, and the slot, freed when this is dropped.
struct GuardedInbound {
    inner: Streaming<StreamMessage>,
    slot: Slot<Channel>,
    target: Arc<str>,
    /// Dropped with this struct, which ends the request body.
    _stop: oneshot::Sender<()>,
    done: bool,
}

impl Stream for GuardedInbound {
    type Item = Result<StreamMessage, TransportError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(message))) => Poll::Ready(Some(Ok(message))),
            Poll::Ready(Some(Err(status))) => {
                this.done = true;
                let (err, blame) = stream_error(&this.target, status);
                let channel_id = this.slot.channel_id();
                if blame == Blame::Channel {
                    let outcome = this.slot.record_failure();
                    tracing::warn!(channel_id, error = %err, ?outcome, "stream failed");
                } else {
                    tracing::debug!(channel_id, error = %err, "server ended the stream");
                }
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
        }
    }
}

/// Makes a [`GrpcMux`] for `grpc://` and `grpcs://` URLs.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct GrpcTransport {}

impl GrpcTransport {
    /// The gRPC transport.
    pub fn new() -> Self {
        Self {}
    }
}

#[async_trait]
impl Transport for GrpcTransport {
    /// Validates the options (a [`TransportErrorKind::Config`] error for a
    /// non-gRPC URL or a bad TLS file), then starts dialling the first
    /// channel in the background and returns at once: network failures are
    /// reported by the opens.
    ///
    /// [`TransportErrorKind::Config`]: connector_core::TransportErrorKind::Config
    async fn mux(
        &self,
        options: &MultiTransportOptions,
    ) -> Result<Arc<dyn StreamMux>, TransportError> {
        let mux = GrpcMux::new(options)?;
        let inner = Arc::clone(&mux.inner);
        tokio::spawn(async move { inner.warm_up().await });
        Ok(Arc::new(mux))
    }
}
