//! The server's `SETTINGS_MAX_CONCURRENT_STREAMS`, read off the wire.
//!
//! hyper keeps h2's view of the server's settings to itself and tonic's
//! `Channel` hides hyper, so a channel cannot ask how many streams the
//! server allows. Without that number the pool only finds a low limit by a
//! stall (a stream h2 queued, no response headers within the connect
//! timeout). So every connection's bytes from the server pass through
//! [`SniffedIo`], which follows the HTTP/2 frame headers (9 bytes each; the
//! payloads are skipped) and decodes only SETTINGS frames. It sits under
//! hyper and above TLS (our own connector runs TLS, see
//! [`crate::connector`]), so it sees plaintext frames on every kind of
//! connection: direct, through a proxy tunnel, with or without TLS.
//!
//! The rule is h2's own (`Counts::apply_remote_settings`): the first
//! SETTINGS frame sets the limit, or "unlimited" when it has no
//! `MAX_CONCURRENT_STREAMS`; a later frame changes it only when it carries
//! the parameter. The cost is a few comparisons per frame on the read path.
//!
//! The sniffer also sees a server that is not an HTTP/2 server at all: the
//! server's connection preface must be a SETTINGS frame (RFC 9113 §3.4), so
//! a first frame of another type (an HTTP/1.1 answer read as a frame header,
//! say) or the connection ending before any SETTINGS is a [`PrefaceFault`].
//! A dial waiting for SETTINGS ends at once with it instead of waiting out
//! the connect timeout, and says what it saw: h2 itself reports such a
//! connection only to the streams on it, sometimes as a bare "cancelled".

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use std::sync::OnceLock;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// HTTP/2 frame type of SETTINGS (RFC 9113 §6.5).
const FRAME_SETTINGS: u8 = 0x4;
/// The SETTINGS flag of an acknowledgement (no parameters).
const FLAG_ACK: u8 = 0x1;
/// `SETTINGS_MAX_CONCURRENT_STREAMS`.
const PARAM_MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// Length of a frame header.
const HEADER_LEN: usize = 9;
/// Length of one SETTINGS parameter (16-bit id, 32-bit value).
const PARAM_LEN: usize = 6;
/// The largest frame a peer may send before it has our SETTINGS
/// (`SETTINGS_MAX_FRAME_SIZE`'s initial value, RFC 9113 §6.5.2).
const INITIAL_MAX_FRAME: usize = 1 << 14;

/// Why a connection's server preface is not HTTP/2.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PrefaceFault {
    /// The first frame header is not a SETTINGS frame; `head` is the 9
    /// bytes read as that header (often the start of an HTTP/1.1 answer).
    NotSettings {
        head: [u8; HEADER_LEN],
        /// What h2 calls it: `FRAME_SIZE_ERROR` when the header's length
        /// is beyond the initial frame size, else `PROTOCOL_ERROR`.
        reason: h2::Reason,
    },
    /// The connection ended before any SETTINGS: at its end or dropped
    /// (`None`), or with a read error, kept for the dial's error.
    Closed(Option<ReadFailure>),
}

/// A read error seen before the server's SETTINGS. The error itself goes
/// to h2; this is what the dial reports: its text, and the TLS error in it
/// (a server refusing our client certificate after the handshake sends
/// its alert here), which `rustls` lets us copy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReadFailure {
    pub(crate) message: String,
    pub(crate) tls: Option<rustls::Error>,
}

impl ReadFailure {
    fn of(e: &io::Error) -> Self {
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned();
        Self {
            message: e.to_string(),
            tls,
        }
    }
}

/// No SETTINGS frame seen yet.
const NOT_SEEN: u64 = u64::MAX;
/// A SETTINGS frame without the parameter: no limit.
const UNLIMITED: u64 = 1 << 32;

/// What one connection's server said about its stream limit, shared by the
/// sniffer (writer) and the pool (reader).
#[derive(Debug)]
pub(crate) struct PeerSettings {
    /// [`NOT_SEEN`], [`UNLIMITED`] or the limit (a `u32`).
    max_streams: AtomicU64,
    /// Set once, instead of a first SETTINGS frame.
    fault: OnceLock<PrefaceFault>,
    seen: Notify,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            max_streams: AtomicU64::new(NOT_SEEN),
            fault: OnceLock::new(),
            seen: Notify::new(),
        }
    }
}

impl PeerSettings {
    /// Settings of a connection not yet made.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The server's concurrent-stream limit: `None` before its first
    /// SETTINGS frame, `Some(usize::MAX)` when it set none.
    pub(crate) fn max_streams(&self) -> Option<usize> {
        match self.max_streams.load(Ordering::Acquire) {
            NOT_SEEN => None,
            UNLIMITED => Some(usize::MAX),
            n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        }
    }

    /// Waits until the first SETTINGS frame was read, or the preface
    /// proved not to be HTTP/2 (unbounded: the caller bounds it).
    pub(crate) async fn wait_seen(&self) -> Result<(), PrefaceFault> {
        loop {
            let notified = self.seen.notified();
            if self.max_streams().is_some() {
                return Ok(());
            }
            if let Some(fault) = self.fault.get() {
                return Err(fault.clone());
            }
            notified.await;
        }
    }

    /// Records that the preface is not HTTP/2; ignored once a SETTINGS
    /// frame was seen (what comes later is h2's to judge).
    fn fail(&self, fault: PrefaceFault) {
        if self.max_streams().is_none() && self.fault.set(fault).is_ok() {
            self.seen.notify_waiters();
        }
    }

    /// Records a SETTINGS frame: `param` is its `MAX_CONCURRENT_STREAMS`,
    /// if it has one.
    pub(crate) fn apply(&self, param: Option<u32>) {
        let first = self.max_streams.load(Ordering::Acquire) == NOT_SEEN;
        match (param, first) {
            (Some(n), _) => self.max_streams.store(u64::from(n), Ordering::Release),
            (None, true) => self.max_streams.store(UNLIMITED, Ordering::Release),
            (None, false) => {}
        }
        if first {
            self.seen.notify_waiters();
        }
    }
}

/// Follows the frames of a server-to-client byte stream.
#[derive(Debug)]
struct FrameScanner {
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame not yet read.
    remaining: usize,
    /// The current frame is a SETTINGS frame whose parameters we decode.
    in_settings: bool,
    param: [u8; PARAM_LEN],
    param_len: usize,
    /// The frame's `MAX_CONCURRENT_STREAMS` (the last one wins, as in h2).
    found: Option<u32>,
    /// No frame header completed yet: the next one is the server preface.
    first: bool,
}

impl FrameScanner {
    fn new() -> Self {
        Self {
            header: [0; HEADER_LEN],
            header_len: 0,
            remaining: 0,
            in_settings: false,
            param: [0; PARAM_LEN],
            param_len: 0,
            found: None,
            first: true,
        }
    }

    /// Feeds bytes as they were read; reports every complete SETTINGS
    /// frame to `settings`.
    fn feed(&mut self, mut bytes: &[u8], settings: &PeerSettings) {
        while !bytes.is_empty() {
            if self.remaining == 0 && self.header_len < HEADER_LEN {
                let take = (HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len < HEADER_LEN {
                    return;
                }
                self.start_frame(settings);
                continue;
            }
            let take = self.remaining.min(bytes.len());
            if self.in_settings {
                for &b in &bytes[..take] {
                    self.param[self.param_len] = b;
                    self.param_len += 1;
                    if self.param_len == PARAM_LEN {
                        self.param_len = 0;
                        let id = u16::from_be_bytes([self.param[0], self.param[1]]);
                        if id == PARAM_MAX_CONCURRENT_STREAMS {
                            self.found = Some(u32::from_be_bytes([
                                self.param[2],
                                self.param[3],
                                self.param[4],
                                self.param[5],
                            ]));
                        }
                    }
                }
            }
            self.remaining -= take;
            bytes = &bytes[take..];
            if self.remaining == 0 {
                self.end_frame(settings);
            }
        }
    }

    /// A frame header is complete.
    fn start_frame(&mut self, settings: &PeerSettings) {
        let h = &self.header;
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        if std::mem::take(&mut self.first) && h[3] != FRAME_SETTINGS {
            let reason = if len > INITIAL_MAX_FRAME {
                h2::Reason::FRAME_SIZE_ERROR
            } else {
                h2::Reason::PROTOCOL_ERROR
            };
            settings.fail(PrefaceFault::NotSettings {
                head: self.header,
                reason,
            });
        }
        // A SETTINGS payload that is not whole parameters is a protocol
        // error h2 deals with; we just do not decode it.
        self.in_settings = h[3] == FRAME_SETTINGS && h[4] & FLAG_ACK == 0 && len % PARAM_LEN == 0;
        self.remaining = len;
        self.param_len = 0;
        self.found = None;
        if len == 0 {
            self.end_frame(settings);
        }
    }

    /// The current frame's payload is complete.
    fn end_frame(&mut self, settings: &PeerSettings) {
        if self.in_settings {
            settings.apply(self.found);
        }
        self.in_settings = false;
        self.header_len = 0;
    }
}

/// An IO whose reads pass through a [`FrameScanner`] into a
/// [`PeerSettings`]. Writes are untouched.
#[derive(Debug)]
pub(crate) struct SniffedIo<T> {
    inner: T,
    scanner: FrameScanner,
    settings: Arc<PeerSettings>,
}

impl<T> SniffedIo<T> {
    pub(crate) fn new(inner: T, settings: Arc<PeerSettings>) -> Self {
        Self {
            inner,
            scanner: FrameScanner::new(),
            settings,
        }
    }
}

/// A connection that goes away before its SETTINGS (h2 gave up on it, say
/// after a failed write) ended its preface too.
impl<T> Drop for SniffedIo<T> {
    fn drop(&mut self) {
        self.settings.fail(PrefaceFault::Closed(None));
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SniffedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &result {
            Poll::Ready(Ok(())) if room && buf.filled().len() == before => {
                this.settings.fail(PrefaceFault::Closed(None));
            }
            Poll::Ready(Ok(())) => this.scanner.feed(&buf.filled()[before..], &this.settings),
            Poll::Ready(Err(e)) if this.settings.max_streams().is_none() => {
                let failure = ReadFailure::of(e);
                this.settings.fail(PrefaceFault::Closed(Some(failure)));
            }
            Poll::Ready(Err(_)) => {}
            Poll::Pending => {}
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SniffedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        out.extend_from_slice(payload);
        out
    }

    fn param(id: u16, value: u32) -> Vec<u8> {
        let mut out = id.to_be_bytes().to_vec();
        out.extend_from_slice(&value.to_be_bytes());
        out
    }

    fn settings(params: &[(u16, u32)]) -> Vec<u8> {
        let payload: Vec<u8> = params.iter().flat_map(|&(i, v)| param(i, v)).collect();
        frame(FRAME_SETTINGS, 0, &payload)
    }

    /// Feeds `bytes` in pieces of `chunk` bytes.
    fn scan(bytes: &[u8], chunk: usize) -> Arc<PeerSettings> {
        let s = PeerSettings::new();
        let mut scanner = FrameScanner::new();
        for piece in bytes.chunks(chunk) {
            scanner.feed(piece, &s);
        }
        s
    }

    #[test]
    fn reads_the_limit_however_the_bytes_are_split() {
        let mut wire = settings(&[(0x4, 65_535), (0x3, 5), (0x6, 16_384)]);
        wire.extend(frame(0x8, 0, &[0, 0, 0, 10])); // WINDOW_UPDATE
        for chunk in [1, 2, 5, 7, 9, 64] {
            assert_eq!(scan(&wire, chunk).max_streams(), Some(5), "chunk {chunk}");
        }
    }

    #[test]
    fn first_settings_without_the_parameter_means_unlimited() {
        let wire = settings(&[(0x4, 65_535)]);
        assert_eq!(scan(&wire, 3).max_streams(), Some(usize::MAX));
        assert_eq!(scan(&[], 1).max_streams(), None);
    }

    #[test]
    fn later_settings_change_it_only_with_the_parameter_and_acks_are_skipped() {
        let mut wire = settings(&[(0x3, 100)]);
        // DATA and HEADERS payloads that look like SETTINGS are skipped.
        wire.extend(frame(0x0, 0, &settings(&[(0x3, 1)])));
        wire.extend(frame(FRAME_SETTINGS, FLAG_ACK, &[]));
        wire.extend(settings(&[(0x4, 1)]));
        assert_eq!(scan(&wire, 4).max_streams(), Some(100));
        wire.extend(settings(&[(0x3, 7)]));
        wire.extend(frame(0x6, 0, &[0; 8])); // PING
        assert_eq!(scan(&wire, 5).max_streams(), Some(7));
    }

    #[test]
    fn a_malformed_settings_payload_is_not_decoded() {
        let mut wire = frame(FRAME_SETTINGS, 0, &[0, 3, 0, 0, 0]);
        wire.extend(settings(&[(0x3, 9)]));
        assert_eq!(scan(&wire, 2).max_streams(), Some(9));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_seen_wakes_on_the_first_frame() {
        let s = PeerSettings::new();
        let waiter = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.wait_seen().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        FrameScanner::new().feed(&settings(&[(0x3, 2)]), &s);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("task")
            .expect("SETTINGS, not a fault");
        assert_eq!(s.max_streams(), Some(2));
    }

    #[test]
    fn an_http1_answer_is_a_frame_size_fault_with_its_first_bytes() {
        let answer = b"HTTP/1.1 505 HTTP Version Not Supported\r\nConnection: close\r\n\r\n";
        for chunk in [1, 4, 9, 64] {
            let s = scan(answer, chunk);
            assert_eq!(s.max_streams(), None);
            assert_eq!(
                s.fault.get(),
                Some(&PrefaceFault::NotSettings {
                    head: *b"HTTP/1.1 ",
                    reason: h2::Reason::FRAME_SIZE_ERROR,
                }),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn a_small_first_frame_of_another_type_is_a_protocol_fault() {
        let mut wire = frame(0x6, 0, &[0; 8]); // PING before SETTINGS
        wire.extend(settings(&[(0x3, 4)]));
        let s = scan(&wire, 3);
        assert!(matches!(
            s.fault.get(),
            Some(PrefaceFault::NotSettings {
                reason: h2::Reason::PROTOCOL_ERROR,
                ..
            })
        ));
    }

    #[test]
    fn later_frames_of_any_type_are_no_fault() {
        let mut wire = settings(&[]);
        wire.extend(frame(0x6, 0, &[0; 8]));
        wire.extend(frame(0x0, 0, &[0; 20_000]));
        let s = scan(&wire, 7);
        assert_eq!(s.max_streams(), Some(usize::MAX));
        assert_eq!(s.fault.get(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_the_stream_before_settings_wakes_the_dial_with_closed() {
        use tokio::io::AsyncReadExt;
        let (client, server) = tokio::io::duplex(64);
        let s = PeerSettings::new();
        let mut io = SniffedIo::new(client, Arc::clone(&s));
        let waiter = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.wait_seen().await }
        });
        drop(server);
        let mut buf = [0u8; 16];
        assert_eq!(io.read(&mut buf).await.expect("EOF is Ok"), 0);
        let got = tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(got, Err(PrefaceFault::Closed(None)));
    }

    #[test]
    fn dropping_the_io_before_settings_is_closed_and_after_is_no_fault() {
        let (client, _server) = tokio::io::duplex(64);
        let before = PeerSettings::new();
        drop(SniffedIo::new(client, Arc::clone(&before)));
        assert_eq!(before.fault.get(), Some(&PrefaceFault::Closed(None)));

        let (client, _server) = tokio::io::duplex(64);
        let after = PeerSettings::new();
        let io = SniffedIo::new(client, Arc::clone(&after));
        FrameScanner::new().feed(&settings(&[]), &after);
        drop(io);
        assert_eq!(after.fault.get(), None);
        assert_eq!(after.max_streams(), Some(usize::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_the_stream_after_settings_is_no_fault() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut server) = tokio::io::duplex(64);
        let s = PeerSettings::new();
        let mut io = SniffedIo::new(client, Arc::clone(&s));
        server
            .write_all(&settings(&[(0x3, 3)]))
            .await
            .expect("write");
        drop(server);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.expect("read");
        assert_eq!(s.wait_seen().await, Ok(()));
        assert_eq!(s.max_streams(), Some(3));
    }
}
