//! One open socket: the writer task that owns the write half, and the
//! inbound stream that wraps the read half.
//!
//! Lifetimes: the writer ends when the driver drops its sender (after a
//! close frame), when the socket fails, or when its cancellation token
//! fires. The inbound stream fires that token when it ends or is dropped,
//! and the mux fires the parent token on `close()`. The final close frame
//! is bounded by `close_timeout`, so no writer outlives its socket by more.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use connector_core::TransportError;
use connector_proto::StreamMessage;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{self, Instant, Interval, MissedTickBehavior};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Bytes, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::either::Either;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Span;

use crate::error::WsError;

/// The byte stream under a socket: plain TCP or TLS over TCP. The TLS
/// stream is boxed: rustls's connection state is ~1.1 KiB, and unboxed it
/// would make every plaintext socket (whose `TcpStream` is 32 bytes) that
/// size too, since an enum is as large as its largest variant.
pub(crate) type Io = Either<TcpStream, Box<TlsStream<TcpStream>>>;
/// An open WebSocket.
pub(crate) type Ws = WebSocketStream<Io>;

/// The ids of a mux's open sockets.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    open: Mutex<BTreeSet<u64>>,
}

impl Registry {
    /// Records socket `id` as open until the returned slot is dropped.
    pub(crate) fn insert(self: &Arc<Self>, id: u64) -> Slot {
        self.lock().insert(id);
        Slot {
            id,
            registry: Arc::clone(self),
        }
    }

    /// The open sockets' ids.
    pub(crate) fn ids(&self) -> Vec<u64> {
        self.lock().iter().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        // A panic while holding this lock cannot leave the set half-updated.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A socket's place in the [`Registry`], released on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    id: u64,
    registry: Arc<Registry>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// State both halves of a socket share. The socket counts as open until
/// both halves dropped their `Arc`.
#[derive(Debug)]
pub(crate) struct Shared {
    cancel: CancellationToken,
    /// The close frame the reader wants the writer to send (a protocol
    /// error); `None`: a normal close.
    close_with: Mutex<Option<CloseFrame>>,
    /// The writer has sent (or is sending) its close frame.
    close_sent: AtomicBool,
    /// The server's close frame arrived; tungstenite queued the reply.
    peer_closed: AtomicBool,
    _slot: Slot,
}

impl Shared {
    pub(crate) fn new(cancel: CancellationToken, slot: Slot) -> Self {
        Self {
            cancel,
            close_with: Mutex::new(None),
            close_sent: AtomicBool::new(false),
            peer_closed: AtomicBool::new(false),
            _slot: slot,
        }
    }

    /// Asks the writer to close the socket with `code` and end.
    fn close_with(&self, code: CloseCode, reason: &'static str) {
        let mut slot = self
            .close_with
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(CloseFrame {
            code,
            reason: reason.into(),
        });
        drop(slot);
        self.cancel.cancel();
    }

    fn take_close(&self) -> Option<CloseFrame> {
        self.close_with
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// How a writer behaves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriterSettings {
    pub(crate) max_message_size: usize,
    pub(crate) ping_interval: Option<Duration>,
    pub(crate) close_timeout: Duration,
}

enum WriterEnd {
    /// The driver dropped its sender: close normally.
    SenderDropped,
    /// The reader, the inbound's drop or the mux asked to stop.
    Cancelled,
    /// The socket failed; nothing more can be sent.
    Failed,
}

/// The one task per socket that writes: outbound messages as binary
/// frames, a ping every `ping_interval`, and the final close frame.
pub(crate) async fn run_writer(
    mut sink: SplitSink<Ws, Message>,
    mut outbound: mpsc::Receiver<StreamMessage>,
    shared: Arc<Shared>,
    settings: WriterSettings,
) {
    let end = tokio::select! {
        biased;
        () = shared.cancel.cancelled() => WriterEnd::Cancelled,
        end = pump(&mut sink, &mut outbound, &settings) => end,
    };
    // Nothing new is taken; what the driver already queued (responses to
    // in-flight requests) still goes out before the close frame.
    outbound.close();
    let peer_closed = shared.peer_closed.load(Ordering::Acquire);
    let frame = match end {
        // A write failed; only the reply to a server close may still go out.
        WriterEnd::Failed if !peer_closed => return,
        WriterEnd::Failed | WriterEnd::SenderDropped => None,
        WriterEnd::Cancelled => shared.take_close(),
    }
    .unwrap_or(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    });
    let code = u16::from(frame.code);
    shared.close_sent.store(true, Ordering::Release);
    let close = async {
        if peer_closed {
            // The server closed first: tungstenite refuses a second close
            // frame (and any data) but has queued the reply; flushing sends it.
            return sink.close().await;
        }
        while let Ok(msg) = outbound.try_recv() {
            send_message(&mut sink, msg, &settings).await?;
        }
        sink.send(Message::Close(Some(frame))).await
    };
    let what = if peer_closed {
        "close reply"
    } else {
        "close frame"
    };
    match time::timeout(settings.close_timeout, close).await {
        Ok(Ok(())) => tracing::debug!(close_code = code, "{what} sent"),
        Ok(Err(e)) => tracing::debug!(close_code = code, error = %e, "{what} not sent"),
        Err(_) => tracing::debug!(
            close_code = code,
            timeout_ms = settings.close_timeout.as_millis() as u64,
            "{what} not sent in time; dropping the socket"
        ),
    }
}

/// Writes one message as a binary frame. A message over `max_message_size`
/// is logged and skipped (the server would refuse it and close the socket).
async fn send_message(
    sink: &mut SplitSink<Ws, Message>,
    msg: StreamMessage,
    settings: &WriterSettings,
) -> Result<(), tungstenite::Error> {
    let kind = msg.kind_name();
    let bytes = msg.encode_to_vec();
    if bytes.len() > settings.max_message_size {
        tracing::warn!(
            kind,
            size = bytes.len(),
            max_message_size = settings.max_message_size,
            "outbound message exceeds max_message_size; not sent"
        );
        return Ok(());
    }
    tracing::trace!(kind, size = bytes.len(), "sending");
    sink.send(Message::Binary(bytes.into())).await
}

async fn pump(
    sink: &mut SplitSink<Ws, Message>,
    outbound: &mut mpsc::Receiver<StreamMessage>,
    settings: &WriterSettings,
) -> WriterEnd {
    let mut ping = settings.ping_interval.map(|period| {
        let mut t = time::interval_at(Instant::now() + period, period);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    });
    loop {
        tokio::select! {
            msg = outbound.recv() => {
                let Some(msg) = msg else {
                    return WriterEnd::SenderDropped;
                };
                if let Err(e) = send_message(sink, msg, settings).await {
                    tracing::debug!(error = %e, "write failed; the socket is gone");
                    return WriterEnd::Failed;
                }
            }
            () = tick(&mut ping) => {
                tracing::trace!("sending ping");
                if let Err(e) = sink.send(Message::Ping(Bytes::new())).await {
                    tracing::debug!(error = %e, "ping failed; the socket is gone");
                    return WriterEnd::Failed;
                }
            }
        }
    }
}

async fn tick(ping: &mut Option<Interval>) {
    match ping {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The read half as the driver's inbound stream: one `StreamMessage` per
/// binary frame; anything else ends the stream (after an error where the
/// server broke the protocol). Dropping it stops the writer.
pub(crate) struct Inbound {
    stream: SplitStream<Ws>,
    shared: Arc<Shared>,
    span: Span,
    done: bool,
    _stop_writer: DropGuard,
}

impl Inbound {
    pub(crate) fn new(stream: SplitStream<Ws>, shared: Arc<Shared>, span: Span) -> Self {
        let stop_writer = shared.cancel.clone().drop_guard();
        Self {
            stream,
            shared,
            span,
            done: false,
            _stop_writer: stop_writer,
        }
    }

    /// Ends the stream and stops the writer.
    fn finish(&mut self) {
        self.done = true;
        self.shared.cancel.cancel();
    }

    /// The server broke the protocol: close the socket with `code`, report
    /// `err`, then end.
    fn fail(
        &mut self,
        code: CloseCode,
        reason: &'static str,
        err: WsError,
    ) -> Poll<Option<Result<StreamMessage, TransportError>>> {
        tracing::warn!(close_code = u16::from(code), error = %err, "closing the socket");
        self.shared.close_with(code, reason);
        self.done = true;
        Poll::Ready(Some(Err(err.into())))
    }

    /// The socket failed without a close handshake: report, then end.
    fn lost(&mut self, err: WsError) -> Poll<Option<Result<StreamMessage, TransportError>>> {
        tracing::warn!(error = %err, "socket lost");
        self.finish();
        Poll::Ready(Some(Err(err.into())))
    }

    fn on_close(&mut self, frame: Option<CloseFrame>) {
        if self.shared.close_sent.load(Ordering::Acquire) {
            tracing::debug!(
                close_code = frame.as_ref().map(|f| u16::from(f.code)),
                "server acknowledged the close"
            );
            return;
        }
        match frame {
            Some(f) if matches!(f.code, CloseCode::Normal | CloseCode::Away) => tracing::info!(
                close_code = u16::from(f.code),
                reason = %close_reason(&f),
                "server closed the socket"
            ),
            Some(f) => tracing::warn!(
                close_code = u16::from(f.code),
                reason = %close_reason(&f),
                "server closed the socket"
            ),
            None => tracing::info!("server closed the socket without a close code"),
        }
    }

    fn on_error(
        &mut self,
        err: tungstenite::Error,
    ) -> Poll<Option<Result<StreamMessage, TransportError>>> {
        use tungstenite::error::ProtocolError;
        match err {
            tungstenite::Error::Io(e) => self.lost(WsError::closed_with("connection lost", e)),
            tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => self.lost(
                WsError::closed("the server dropped the connection without a close frame"),
            ),
            tungstenite::Error::Capacity(e) => self.fail(
                CloseCode::Size,
                "message too big",
                WsError::protocol_with("the server sent an oversized message", e),
            ),
            tungstenite::Error::Utf8(e) => self.fail(
                CloseCode::Invalid,
                "invalid UTF-8",
                WsError::protocol(format!("invalid UTF-8 from the server: {e}")),
            ),
            other => self.fail(
                CloseCode::Protocol,
                "protocol error",
                WsError::protocol_with("the server broke the WebSocket protocol", other),
            ),
        }
    }
}

/// The reason of a server's close frame, safe to log: the server chose
/// those bytes, so control characters are escaped and the length capped.
fn close_reason(frame: &CloseFrame) -> std::borrow::Cow<'_, str> {
    connector_core::sanitize_text(frame.reason.as_str(), connector_core::MAX_PEER_TEXT_CHARS)
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Stream for Inbound {
    type Item = Result<StreamMessage, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let span = this.span.clone();
        let _entered = span.enter();
        loop {
            // Polling the read half also flushes the pong (and close reply)
            // tungstenite queued for a ping received earlier.
            let next = match this.stream.poll_next_unpin(cx) {
                Poll::Ready(next) => next,
                Poll::Pending => return Poll::Pending,
            };
            match next {
                Some(Ok(Message::Binary(bytes))) => {
                    return match StreamMessage::decode(bytes) {
                        Ok(msg) => {
                            tracing::trace!(kind = msg.kind_name(), "received");
                            Poll::Ready(Some(Ok(msg)))
                        }
                        Err(e) => this.fail(
                            CloseCode::Invalid,
                            "not a connector.v1 StreamMessage",
                            WsError::protocol_with(
                                "a binary frame from the server is not a StreamMessage",
                                e,
                            ),
                        ),
                    };
                }
                Some(Ok(Message::Text(_))) => {
                    return this.fail(
                        CloseCode::Unsupported,
                        "text frames are not part of connector.v1",
                        WsError::protocol("the server sent a text frame"),
                    )
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                    tracing::trace!("control frame");
                }
                Some(Ok(Message::Close(frame))) => {
                    this.shared.peer_closed.store(true, Ordering::Release);
                    this.on_close(frame);
                    this.finish();
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return this.on_error(e),
                None => {
                    tracing::debug!("socket ended");
                    this.finish();
                    return Poll::Ready(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_close_reason_is_logged_sanitized() {
        // A close frame's reason is at most 123 bytes on the wire, but
        // tungstenite hands over whatever it decoded: test a long one too.
        for reason in [
            "bye\nFORGED 2026-01-01 INFO ok\x1b[2J".to_string(),
            format!("bye\r{}", "\u{1b}".repeat(1024 * 1024)),
        ] {
            let frame = CloseFrame {
                code: CloseCode::Policy,
                reason: reason.as_str().into(),
            };
            let shown = close_reason(&frame);
            assert!(shown.starts_with("bye\\"), "{shown:.100}");
            assert!(!shown.contains(['\n', '\r', '\x1b']), "{shown:.100}");
            assert!(shown.len() < 2048, "{} bytes", shown.len());
        }
    }
}
