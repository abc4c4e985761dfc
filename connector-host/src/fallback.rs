//! Transport fallback (`auto`): registrations use gRPC, and move to a
//! WebSocket endpoint only when HTTP/2 itself cannot get through to the
//! server; while on WebSocket the gRPC endpoint is probed, and once it
//! answers the registrations move back one by one.
//!
//! [`FallbackTransport`] implements [`Transport`]: give it to a runner with
//! the gRPC URL as the runner's URL and the WebSocket URL here.
//!
//! ```text
//!                    definite refusal (ALPN without h2, HTTP_1_1_REQUIRED)
//!                    or N suspect waves (PROTOCOL_ERROR / FRAME_SIZE_ERROR,
//!                    what an HTTP/1.x answer looks like to h2)
//!        +------+  ------------------------------------------------>  +-----------+
//! start->| Grpc |                                                     | WebSocket |
//!        +------+  <------------------------------------------------  +-----------+
//!          |  ^      probe answered (every `reprobe_period`, jittered)    |    ^
//!          |  |      then: drain WebSocket streams one at a time         |    |
//!          +--+                                                          +----+
//!   connect failure / timeout / server status:          probe failed: next probe
//!   back off, never switch                              in [3/4, 1] x period
//! ```
//!
//! **Opens.** In `Grpc` mode an open goes to gRPC. A failure that is not an
//! HTTP/2 refusal (refused connection, timeout, TLS certificate, a status
//! from the server) is returned as it is: the registration backs off exactly
//! as it would on a single transport, since the same failure would hit the
//! WebSocket too. A refusal switches to `WebSocket` mode at once when it is
//! definite; a suspect one counts one *wave* (opens started before the last
//! counted suspect do not count again, so many registrations failing on one
//! broken connection are one wave, not many) and switches after
//! `protocol_errors_before_fallback` waves (2 by default) with no gRPC
//! success between. The open that switches, and every later one, is made on
//! the WebSocket at once: HTTP/2 never carried its `register`, so nothing is
//! registered twice.
//!
//! **Coming back.** In `WebSocket` mode a background task probes gRPC with
//! an empty `Connect` stream ([`GrpcMux::probe`]: no `register`, the server
//! registers nothing). When a probe is answered the mode returns to `Grpc`
//! and the WebSocket registrations move back one at a time: each approved
//! WebSocket stream gets a synthetic `Drain { reconnect_after_ms: 0 }`
//! injected into its inbound half. The registration's own drain handling
//! (connector-core) then stops taking new work, answers what is in flight,
//! closes the stream gracefully and reconnects; the reconnect's open goes to
//! gRPC. The next registration moves once the previous one has a new stream.
//! If it has none within a bound (drain timeout + 2 × connect timeout +
//! jitter + 3 s), gRPC may be unreachable again: the move pauses, and goes
//! on only after another probe (same jittered period) is answered, so no
//! one else leaves a working WebSocket meanwhile. A gRPC refusal during the
//! move switches back to `WebSocket` mode and the move stops.
//!
//! What this relies on from the registration state machine (kept by any
//! redesign of `connector-core/src/registration.rs`):
//! 1. `Drain` while Active: new `execute_request`s are answered
//!    `OVERLOADED` ("draining"), in-flight ones are answered, then the stream
//!    closes gracefully (outbox flushed, half-close) and the registration
//!    reconnects after `reconnect_after_ms` + jitter;
//! 2. that reconnect does not count as a backoff attempt (no escalation) and
//!    keeps the session token (no re-approval);
//! 3. the reconnect opens through the same `StreamMux` (so through this one).
//!
//! Only approved streams are drained (the mux watches for the `APPROVED`
//! status on each WebSocket stream): a drain while pending would restart the
//! approval.
//!
//! **Live state.** [`FallbackStatus`] (from [`FallbackTransport::status`])
//! tells the active transport of each registration, counts per transport and
//! the mode; it sends a [`FallbackEvent`] on every switch; the gauge
//! `connector.client.transport_registrations{transport="grpc"|"ws"}` counts
//! open streams per transport.

use std::collections::HashMap;
use std::fmt;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use connector_core::proto::{stream_message::Kind, Drain, RegistrationStatus, StreamMessage};
use connector_core::{
    Endpoint, InboundStream, JitterRng, MessageStream, MultiTransportOptions, MuxStats,
    RegistrationKey, StreamInfo, StreamMux, Transport, TransportError, TransportErrorKind,
    TransportKind, MAX_PEER_TEXT_CHARS,
};
use connector_grpc::{GrpcError, GrpcMux, Http2Refusal};
use connector_ws::{WsConfig, WsTransport};
use futures_util::Stream;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The gauge of open streams per transport.
pub const TRANSPORT_REGISTRATIONS: &str = "connector.client.transport_registrations";

/// Default time between gRPC probes while on WebSocket (an upper bound:
/// each wait is drawn from `[3/4, 1]` of it).
pub const DEFAULT_REPROBE_PERIOD: Duration = Duration::from_secs(30);

/// Default number of suspect waves (see the module docs) before falling
/// back.
pub const DEFAULT_PROTOCOL_ERRORS_BEFORE_FALLBACK: u32 = 2;

/// Shortest re-probe period accepted (a probe is a real HTTP/2 request).
const MIN_REPROBE_PERIOD: Duration = Duration::from_millis(100);

/// Events a slow [`FallbackStatus::events`] receiver may fall behind.
const EVENT_CAPACITY: usize = 256;

/// The reason carried by the synthetic drain.
const MOVE_REASON: &str = "moving back to gRPC";

/// The transport a registration's stream runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ActiveTransport {
    /// gRPC over HTTP/2.
    Grpc,
    /// The WebSocket fallback.
    WebSocket,
}

impl ActiveTransport {
    /// `"grpc"` or `"ws"`, the gauge's label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::WebSocket => "ws",
        }
    }
}

impl fmt::Display for ActiveTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the fallback mux reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FallbackEvent {
    /// New opens go to `to` from now on; `reason` says why.
    ModeChanged {
        /// The transport new opens use.
        to: ActiveTransport,
        /// Why (the refusal, or "gRPC probe answered").
        reason: String,
    },
    /// A registration's stream opened on a different transport than its
    /// previous one (the first open of a registration is not a switch).
    Switched {
        /// The registration.
        key: RegistrationKey,
        /// Its previous stream's transport.
        from: ActiveTransport,
        /// Its new stream's transport.
        to: ActiveTransport,
    },
    /// A synthetic drain was injected into a WebSocket stream to move its
    /// registration back to gRPC.
    MoveStarted {
        /// The registration.
        key: RegistrationKey,
    },
}

/// gRPC first, WebSocket when HTTP/2 cannot get through (see the module
/// docs). The runner's URL is the gRPC one (`grpc://`, `grpcs://`); the
/// WebSocket URL is given here. Both use the runner's other options (TLS
/// files, proxy, timeouts).
#[derive(Debug, Clone)]
pub struct FallbackTransport {
    ws_url: String,
    ws_config: WsConfig,
    reprobe_period: Duration,
    protocol_errors_before_fallback: u32,
    status: FallbackStatus,
}

impl FallbackTransport {
    /// Falls back to `ws_url` (`ws://…` or `wss://…`; checked when the
    /// runner starts). Re-probes every [`DEFAULT_REPROBE_PERIOD`].
    pub fn new(ws_url: impl Into<String>) -> Self {
        Self {
            ws_url: ws_url.into(),
            ws_config: WsConfig::default(),
            reprobe_period: DEFAULT_REPROBE_PERIOD,
            protocol_errors_before_fallback: DEFAULT_PROTOCOL_ERRORS_BEFORE_FALLBACK,
            status: FallbackStatus::default(),
        }
    }

    /// The longest time between two gRPC probes while on WebSocket; each
    /// wait is drawn uniformly from `[3/4, 1]` of it, so hosts that fell
    /// back together do not probe together. Default 30 s; at least 100 ms.
    pub fn reprobe_period(mut self, period: Duration) -> Self {
        self.reprobe_period = period.max(MIN_REPROBE_PERIOD);
        self
    }

    /// How many suspect waves (h2 `PROTOCOL_ERROR` / `FRAME_SIZE_ERROR`
    /// before a stream opened) fall back; definite refusals always fall
    /// back at once. Default 2; at least 1.
    pub fn protocol_errors_before_fallback(mut self, n: u32) -> Self {
        self.protocol_errors_before_fallback = n.max(1);
        self
    }

    /// The WebSocket transport's settings.
    pub fn ws_config(mut self, config: WsConfig) -> Self {
        self.ws_config = config;
        self
    }

    /// A handle on the live state of the mux this transport makes (empty
    /// until the runner has made it).
    pub fn status(&self) -> FallbackStatus {
        self.status.clone()
    }
}

#[async_trait]
impl Transport for FallbackTransport {
    /// Checks both URLs (the runner's must be gRPC, the fallback's
    /// WebSocket), builds both muxes and starts the prober. Dials nothing.
    async fn mux(
        &self,
        options: &MultiTransportOptions,
    ) -> Result<Arc<dyn StreamMux>, TransportError> {
        let config_error = |m: String| TransportError::new(TransportErrorKind::Config, m);
        if options.endpoint.kind != TransportKind::Grpc {
            return Err(config_error(format!(
                "transport fallback: the url {} must be grpc:// or grpcs:// (the WebSocket \
                 endpoint is the fallback url)",
                options.endpoint
            )));
        }
        let ws_endpoint = Endpoint::parse(&self.ws_url)
            .map_err(|e| config_error(format!("fallback url: {e}")))?;
        if ws_endpoint.kind != TransportKind::WebSocket {
            return Err(config_error(format!(
                "fallback url {ws_endpoint} must be ws:// or wss://"
            )));
        }
        let mut ws_options = options.clone();
        ws_options.endpoint = ws_endpoint;
        let grpc = Arc::new(GrpcMux::new(options)?);
        let ws = WsTransport::with_config(self.ws_config.clone())
            .mux(&ws_options)
            .await?;
        let seed = options.jitter_seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(LiveState {
                router: Router::new(
                    self.reprobe_period,
                    self.protocol_errors_before_fallback,
                    JitterRng::new(seed),
                ),
                streams: HashMap::new(),
                last_transport: HashMap::new(),
                next_stream_id: 1,
                fallback_reason: None,
            }),
            changed: watch::channel(0).0,
            events: broadcast::channel(EVENT_CAPACITY).0,
            move_bound: options.drain_timeout
                + options.connect_timeout.saturating_mul(2)
                + options.jitter
                + Duration::from_secs(3),
        });
        shared.publish_gauges(&shared.lock());
        *self
            .status
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&shared));
        let stop = CancellationToken::new();
        tokio::spawn(run_prober(
            Arc::clone(&shared),
            Arc::clone(&grpc),
            stop.clone(),
        ));
        Ok(Arc::new(FallbackMux {
            grpc,
            ws,
            shared,
            stop,
        }))
    }
}

/// A handle on the live state of a [`FallbackTransport`]'s mux. Cheap to
/// clone.
#[derive(Clone, Default)]
pub struct FallbackStatus {
    current: Arc<Mutex<Option<Arc<Shared>>>>,
}

impl fmt::Debug for FallbackStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackStatus")
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

impl FallbackStatus {
    fn shared(&self) -> Option<Arc<Shared>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The transport new opens use now; `None` before the mux is made.
    pub fn mode(&self) -> Option<ActiveTransport> {
        Some(self.shared()?.lock().router.mode())
    }

    /// Why the mux last fell back to the WebSocket (the gRPC error, with
    /// peer text sanitized); `None` if it never did.
    pub fn fallback_reason(&self) -> Option<String> {
        self.shared()?.lock().fallback_reason.clone()
    }

    /// The transport of `key`'s open stream, if it has one.
    pub fn active_transport(&self, key: &RegistrationKey) -> Option<ActiveTransport> {
        Some(self.shared()?.lock().streams.get(key)?.transport)
    }

    /// Open streams on `transport`.
    pub fn registrations_on(&self, transport: ActiveTransport) -> usize {
        self.shared().map_or(0, |s| s.lock().count(transport))
    }

    /// Events from now on (`broadcast` semantics: a receiver more than 256
    /// events behind loses the oldest). Before the mux is made, a receiver
    /// that never gets anything.
    pub fn events(&self) -> broadcast::Receiver<FallbackEvent> {
        match self.shared() {
            Some(s) => s.events.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Waits until `pred` holds for this status (checked now and after every
    /// change of the mux's state), or `timeout` passes. False on timeout or
    /// before the mux is made.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&FallbackStatus) -> bool,
    ) -> bool {
        let Some(shared) = self.shared() else {
            return false;
        };
        let mut rx = shared.changed.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                rx.borrow_and_update();
                if pred(self) {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .is_ok()
    }
}

// ----------------------------------------------------------------------
// The routing decision, as a value (no IO, no clock of its own)
// ----------------------------------------------------------------------

/// Where new opens go, with the data each mode needs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// Opens go to gRPC; `suspects` suspect waves were counted since the
    /// last gRPC success.
    Grpc { suspects: u32 },
    /// Opens go to the WebSocket; gRPC is probed at `next_probe`.
    WebSocket { next_probe: Instant },
}

/// Where one open goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// To gRPC, started in suspect wave `wave`.
    Grpc { wave: u64 },
    /// To the WebSocket.
    WebSocket,
}

/// What to do after a gRPC open failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterGrpcError {
    /// Return the error: the registration backs off.
    BackOff,
    /// Open on the WebSocket now; `switched` when this failure switched.
    UseWebSocket { switched: bool },
}

/// The fallback decision: which transport, when to switch, when to probe.
#[derive(Debug)]
struct Router {
    mode: Mode,
    /// Bumped when a suspect wave is counted or gRPC succeeds.
    wave: u64,
    period: Duration,
    threshold: u32,
    rng: JitterRng,
}

impl Router {
    fn new(period: Duration, threshold: u32, rng: JitterRng) -> Self {
        Self {
            mode: Mode::Grpc { suspects: 0 },
            wave: 0,
            period,
            threshold: threshold.max(1),
            rng,
        }
    }

    fn mode(&self) -> ActiveTransport {
        match self.mode {
            Mode::Grpc { .. } => ActiveTransport::Grpc,
            Mode::WebSocket { .. } => ActiveTransport::WebSocket,
        }
    }

    fn route(&self) -> Route {
        match self.mode {
            Mode::Grpc { .. } => Route::Grpc { wave: self.wave },
            Mode::WebSocket { .. } => Route::WebSocket,
        }
    }

    /// A gRPC open succeeded: HTTP/2 works, suspicions are forgotten.
    fn grpc_opened(&mut self) {
        if let Mode::Grpc { suspects } = &mut self.mode {
            if *suspects > 0 {
                *suspects = 0;
                self.wave += 1;
            }
        }
    }

    /// A gRPC open started in `wave` failed with `refusal` (`None`: not an
    /// HTTP/2 refusal).
    fn grpc_failed(
        &mut self,
        now: Instant,
        wave: u64,
        refusal: Option<Http2Refusal>,
    ) -> AfterGrpcError {
        let Some(refusal) = refusal else {
            // Refused connection, timeout, certificate, server status: the
            // WebSocket would meet the same; back off.
            return AfterGrpcError::BackOff;
        };
        match &mut self.mode {
            Mode::WebSocket { .. } => AfterGrpcError::UseWebSocket { switched: false },
            Mode::Grpc { .. } if refusal.is_definite() => {
                self.fall_back(now);
                AfterGrpcError::UseWebSocket { switched: true }
            }
            Mode::Grpc { suspects } => {
                if wave == self.wave {
                    *suspects += 1;
                    self.wave += 1;
                }
                if *suspects >= self.threshold {
                    self.fall_back(now);
                    AfterGrpcError::UseWebSocket { switched: true }
                } else {
                    AfterGrpcError::BackOff
                }
            }
        }
    }

    fn fall_back(&mut self, now: Instant) {
        let next_probe = now + self.probe_delay();
        self.mode = Mode::WebSocket { next_probe };
        self.wave += 1;
    }

    fn next_probe(&self) -> Option<Instant> {
        match self.mode {
            Mode::WebSocket { next_probe } => Some(next_probe),
            Mode::Grpc { .. } => None,
        }
    }

    fn probe_failed(&mut self, now: Instant) {
        if matches!(self.mode, Mode::WebSocket { .. }) {
            let next_probe = now + self.probe_delay();
            self.mode = Mode::WebSocket { next_probe };
        }
    }

    /// True when this switched the mode back to gRPC.
    fn probe_succeeded(&mut self) -> bool {
        if matches!(self.mode, Mode::WebSocket { .. }) {
            self.mode = Mode::Grpc { suspects: 0 };
            self.wave += 1;
            return true;
        }
        false
    }

    /// A wait in `[3/4, 1]` of the period.
    fn probe_delay(&mut self) -> Duration {
        self.period - self.rng.up_to(self.period / 4)
    }
}

// ----------------------------------------------------------------------
// Live state shared by the mux, its streams, the prober and the status
// ----------------------------------------------------------------------

/// One open stream.
#[derive(Debug)]
struct StreamEntry {
    id: u64,
    transport: ActiveTransport,
    /// WebSocket only: the stream saw `APPROVED`, so a drain moves it.
    approved: bool,
    /// WebSocket only: fires the synthetic drain (taken when used).
    drain: Option<oneshot::Sender<()>>,
}

#[derive(Debug)]
struct LiveState {
    router: Router,
    /// The open stream of each registration.
    streams: HashMap<RegistrationKey, StreamEntry>,
    /// The transport of each registration's latest stream, to tell a switch.
    last_transport: HashMap<RegistrationKey, ActiveTransport>,
    next_stream_id: u64,
    /// Why the mux last fell back to the WebSocket (sanitized).
    fallback_reason: Option<String>,
}

impl LiveState {
    fn count(&self, transport: ActiveTransport) -> usize {
        self.streams
            .values()
            .filter(|e| e.transport == transport)
            .count()
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<LiveState>,
    /// Bumped on every change, for waiters.
    changed: watch::Sender<u64>,
    events: broadcast::Sender<FallbackEvent>,
    /// How long one move may take (drain, close, reconnect) before the
    /// next one starts anyway.
    move_bound: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, LiveState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn emit(&self, event: FallbackEvent) {
        // No receiver is fine.
        let _ = self.events.send(event);
    }

    fn publish_gauges(&self, st: &LiveState) {
        for t in [ActiveTransport::Grpc, ActiveTransport::WebSocket] {
            metrics::gauge!(TRANSPORT_REGISTRATIONS, "transport" => t.as_str())
                .set(st.count(t) as f64);
        }
    }

    fn mode_changed(&self, to: ActiveTransport, reason: String) {
        match to {
            ActiveTransport::WebSocket => {
                self.lock().fallback_reason = Some(reason.clone());
                tracing::warn!(%reason, "HTTP/2 does not get through; new streams use the WebSocket fallback")
            }
            ActiveTransport::Grpc => {
                tracing::info!(%reason, "gRPC answers again; moving registrations back to gRPC")
            }
        }
        self.emit(FallbackEvent::ModeChanged { to, reason });
    }

    /// Records a newly opened stream; returns its id and, for WebSocket
    /// streams, the receiver of its synthetic drain.
    fn stream_opened(
        &self,
        key: &RegistrationKey,
        transport: ActiveTransport,
    ) -> (u64, Option<oneshot::Receiver<()>>) {
        let (tx, rx) = match transport {
            ActiveTransport::WebSocket => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            ActiveTransport::Grpc => (None, None),
        };
        let (id, switched) = {
            let mut st = self.lock();
            let id = st.next_stream_id;
            st.next_stream_id += 1;
            st.streams.insert(
                key.clone(),
                StreamEntry {
                    id,
                    transport,
                    approved: false,
                    drain: tx,
                },
            );
            let previous = st.last_transport.insert(key.clone(), transport);
            self.publish_gauges(&st);
            (id, previous.filter(|p| *p != transport))
        };
        if let Some(from) = switched {
            tracing::info!(registration = %key, %from, to = %transport, "registration switched transport");
            self.emit(FallbackEvent::Switched {
                key: key.clone(),
                from,
                to: transport,
            });
        }
        self.bump();
        (id, rx)
    }

    fn stream_approved(&self, key: &RegistrationKey, id: u64) {
        let mut st = self.lock();
        if let Some(e) = st.streams.get_mut(key).filter(|e| e.id == id) {
            e.approved = true;
        }
        drop(st);
        self.bump();
    }

    fn stream_gone(&self, key: &RegistrationKey, id: u64) {
        let mut st = self.lock();
        if st.streams.get(key).is_some_and(|e| e.id == id) {
            st.streams.remove(key);
            self.publish_gauges(&st);
        }
        drop(st);
        self.bump();
    }
}

// ----------------------------------------------------------------------
// The mux
// ----------------------------------------------------------------------

/// The [`StreamMux`] a [`FallbackTransport`] makes.
struct FallbackMux {
    grpc: Arc<GrpcMux>,
    ws: Arc<dyn StreamMux>,
    shared: Arc<Shared>,
    /// Stops the prober.
    stop: CancellationToken,
}

impl fmt::Debug for FallbackMux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackMux")
            .field("mode", &self.shared.lock().router.mode())
            .finish_non_exhaustive()
    }
}

impl FallbackMux {
    async fn open_ws(
        &self,
        key: &RegistrationKey,
        register: StreamMessage,
    ) -> Result<MessageStream, TransportError> {
        let stream = self.ws.open(key, register).await?;
        Ok(self.track(key, stream, ActiveTransport::WebSocket))
    }

    fn track(
        &self,
        key: &RegistrationKey,
        stream: MessageStream,
        transport: ActiveTransport,
    ) -> MessageStream {
        let (id, drain) = self.shared.stream_opened(key, transport);
        let MessageStream {
            outbound,
            inbound,
            info,
            ..
        } = stream;
        let inbound: InboundStream = Box::pin(TrackedInbound {
            inner: inbound,
            drain,
            watch_approval: transport == ActiveTransport::WebSocket,
            shared: Arc::clone(&self.shared),
            key: key.clone(),
            id,
        });
        let info = StreamInfo::new(connection_id(transport, info.connection_id));
        MessageStream::new(outbound, inbound, info)
    }
}

/// The id the fallback mux reports for connection `id` of one of its two
/// muxes, which count from 1 each: odd for gRPC connections, even for
/// WebSocket sockets, so `/registrations` never shows two connections
/// under one id.
fn connection_id(transport: ActiveTransport, id: u64) -> u64 {
    match transport {
        ActiveTransport::Grpc => id.saturating_mul(2).saturating_sub(1),
        ActiveTransport::WebSocket => id.saturating_mul(2),
    }
}

/// The gRPC error inside a transport error from the gRPC mux.
fn grpc_error(e: &TransportError) -> Option<&GrpcError> {
    std::error::Error::source(e).and_then(|s| s.downcast_ref::<GrpcError>())
}

#[async_trait]
impl StreamMux for FallbackMux {
    async fn open(
        &self,
        key: &RegistrationKey,
        register: StreamMessage,
    ) -> Result<MessageStream, TransportError> {
        let route = self.shared.lock().router.route();
        let wave = match route {
            Route::WebSocket => return self.open_ws(key, register).await,
            Route::Grpc { wave } => wave,
        };
        let err = match self.grpc.open(key, register.clone()).await {
            Ok(stream) => {
                self.shared.lock().router.grpc_opened();
                return Ok(self.track(key, stream, ActiveTransport::Grpc));
            }
            Err(e) => e,
        };
        let refusal = grpc_error(&err).and_then(GrpcError::http2_refusal);
        let after = self
            .shared
            .lock()
            .router
            .grpc_failed(Instant::now(), wave, refusal);
        tracing::debug!(registration = %key, error = %err, ?refusal, ?after, "gRPC open failed");
        match after {
            AfterGrpcError::BackOff => Err(err),
            AfterGrpcError::UseWebSocket { switched } => {
                if switched {
                    // The error may quote what the server or a proxy said.
                    let reason =
                        connector_core::sanitize_text(&err.to_string(), MAX_PEER_TEXT_CHARS)
                            .into_owned();
                    self.shared.mode_changed(ActiveTransport::WebSocket, reason);
                    self.shared.bump();
                }
                self.open_ws(key, register).await
            }
        }
    }

    fn stats(&self) -> MuxStats {
        let mut stats = self.grpc.stats();
        for c in &mut stats.connections {
            c.id = connection_id(ActiveTransport::Grpc, c.id);
        }
        let ws = self.ws.stats();
        stats
            .connections
            .extend(ws.connections.into_iter().map(|mut c| {
                c.id = connection_id(ActiveTransport::WebSocket, c.id);
                c
            }));
        stats.dials_succeeded += ws.dials_succeeded;
        stats.dials_failed += ws.dials_failed;
        stats.rebuilds += ws.rebuilds;
        stats
    }

    async fn close(&self) {
        self.stop.cancel();
        self.grpc.close().await;
        self.ws.close().await;
    }
}

impl Drop for FallbackMux {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A stream's inbound half as the driver sees it: the transport's, plus
/// the synthetic drain (WebSocket streams), the approval watch, and the
/// bookkeeping when it is dropped.
struct TrackedInbound {
    inner: InboundStream,
    drain: Option<oneshot::Receiver<()>>,
    watch_approval: bool,
    shared: Arc<Shared>,
    key: RegistrationKey,
    id: u64,
}

fn approves(message: &StreamMessage) -> bool {
    let approved = RegistrationStatus::Approved as i32;
    match &message.kind {
        Some(Kind::RegisterResponse(r)) => r.status == approved,
        Some(Kind::ApprovalUpdate(u)) => u.status == approved,
        _ => false,
    }
}

impl Stream for TrackedInbound {
    type Item = Result<StreamMessage, TransportError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(rx) = this.drain.as_mut() {
            if let Poll::Ready(fired) = Pin::new(rx).poll(cx) {
                this.drain = None;
                if fired.is_ok() {
                    let drain = StreamMessage {
                        kind: Some(Kind::Drain(Box::new(Drain {
                            reason: MOVE_REASON.to_string(),
                            reconnect_after_ms: 0,
                        }))),
                    };
                    return Poll::Ready(Some(Ok(drain)));
                }
            }
        }
        let item = this.inner.as_mut().poll_next(cx);
        if this.watch_approval {
            if let Poll::Ready(Some(Ok(message))) = &item {
                if approves(message) {
                    this.watch_approval = false;
                    this.shared.stream_approved(&this.key, this.id);
                }
            }
        }
        item
    }
}

impl Drop for TrackedInbound {
    fn drop(&mut self) {
        self.shared.stream_gone(&self.key, self.id);
    }
}

// ----------------------------------------------------------------------
// The prober: probes gRPC while on WebSocket, then moves registrations back
// ----------------------------------------------------------------------

async fn run_prober(shared: Arc<Shared>, grpc: Arc<GrpcMux>, stop: CancellationToken) {
    let mut changes = shared.changed.subscribe();
    loop {
        changes.borrow_and_update();
        let next = shared.lock().router.next_probe();
        let Some(at) = next else {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            continue;
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = changes.changed() => { if r.is_err() { return } continue }
            _ = tokio::time::sleep_until(at) => {}
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = grpc.probe() => r,
        };
        match result {
            Ok(()) => {
                let switched = shared.lock().router.probe_succeeded();
                if switched {
                    shared.mode_changed(ActiveTransport::Grpc, "gRPC probe answered".into());
                    shared.bump();
                    move_back(&shared, &grpc, &stop).await;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, refusal = ?e.http2_refusal(), "gRPC probe failed; staying on WebSocket");
                shared.lock().router.probe_failed(Instant::now());
                shared.bump();
            }
        }
    }
}

/// Moves WebSocket registrations back to gRPC one at a time, while the mode
/// stays gRPC.
async fn move_back(shared: &Shared, grpc: &GrpcMux, stop: &CancellationToken) {
    let mut changes = shared.changed.subscribe();
    loop {
        changes.borrow_and_update();
        let pick = {
            let mut st = shared.lock();
            if st.router.mode() != ActiveTransport::Grpc {
                return;
            }
            let mut remaining = false;
            let mut pick = None;
            for (key, entry) in st.streams.iter_mut() {
                if entry.transport != ActiveTransport::WebSocket {
                    continue;
                }
                remaining = true;
                if entry.approved {
                    if let Some(tx) = entry.drain.take() {
                        pick = Some((key.clone(), entry.id, tx));
                        break;
                    }
                }
            }
            if !remaining {
                tracing::info!("every registration is back on gRPC");
                return;
            }
            pick
        };
        let Some((key, id, tx)) = pick else {
            // Only streams not yet approved (or already draining) are left:
            // wait for one to change.
            tokio::select! {
                _ = stop.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            continue;
        };
        if tx.send(()).is_err() {
            continue;
        }
        tracing::debug!(registration = %key, "draining the WebSocket stream to move it to gRPC");
        shared.emit(FallbackEvent::MoveStarted { key: key.clone() });
        // The next move starts once this registration has a new stream, the
        // mode changed, or the bound passed.
        let moved = async {
            loop {
                changes.borrow_and_update();
                {
                    let st = shared.lock();
                    if st.router.mode() != ActiveTransport::Grpc {
                        return;
                    }
                    if st.streams.get(&key).is_some_and(|e| e.id != id) {
                        return;
                    }
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        let timed_out = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(shared.move_bound, moved) => r.is_err(),
        };
        if timed_out {
            // The moved registration did not get a new stream in time (gRPC
            // may have become unreachable again): move no one else off a
            // working WebSocket until a probe is answered again.
            tracing::info!(registration = %key, "no new stream within the move bound; pausing the move until gRPC answers a probe");
            loop {
                let wait = shared.lock().router.probe_delay();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                if shared.lock().router.mode() != ActiveTransport::Grpc {
                    return;
                }
                let probed = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = grpc.probe() => r,
                };
                match probed {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "gRPC probe failed; the move stays paused")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(threshold: u32) -> Router {
        Router::new(Duration::from_secs(30), threshold, JitterRng::new(7))
    }

    #[test]
    fn plain_failures_never_switch() {
        let mut r = router(1);
        let now = Instant::now();
        for _ in 0..100 {
            let Route::Grpc { wave } = r.route() else {
                panic!("switched")
            };
            assert_eq!(r.grpc_failed(now, wave, None), AfterGrpcError::BackOff);
        }
        assert_eq!(r.mode(), ActiveTransport::Grpc);
        assert_eq!(r.next_probe(), None);
    }

    #[test]
    fn a_definite_refusal_switches_at_once() {
        for refusal in [Http2Refusal::Alpn, Http2Refusal::Http11Required] {
            let mut r = router(5);
            let now = Instant::now();
            assert_eq!(
                r.grpc_failed(now, 0, Some(refusal)),
                AfterGrpcError::UseWebSocket { switched: true }
            );
            assert_eq!(r.route(), Route::WebSocket);
        }
    }

    #[test]
    fn suspects_count_once_per_wave_and_switch_at_the_threshold() {
        let mut r = router(2);
        let now = Instant::now();
        let suspect = Some(Http2Refusal::ProtocolError);
        // Ten opens started together fail on one broken connection: one wave.
        let waves: Vec<u64> = (0..10)
            .map(|_| match r.route() {
                Route::Grpc { wave } => wave,
                Route::WebSocket => panic!("switched"),
            })
            .collect();
        for w in waves {
            assert_eq!(r.grpc_failed(now, w, suspect), AfterGrpcError::BackOff);
        }
        assert_eq!(r.mode(), ActiveTransport::Grpc);
        // A success in between forgets the suspicion.
        r.grpc_opened();
        let Route::Grpc { wave } = r.route() else {
            panic!()
        };
        assert_eq!(r.grpc_failed(now, wave, suspect), AfterGrpcError::BackOff);
        // The second wave in a row switches; an open of the same wave that
        // fails afterwards goes to the WebSocket without switching again.
        let Route::Grpc { wave } = r.route() else {
            panic!()
        };
        assert_eq!(
            r.grpc_failed(now, wave, suspect),
            AfterGrpcError::UseWebSocket { switched: true }
        );
        assert_eq!(
            r.grpc_failed(now, wave, suspect),
            AfterGrpcError::UseWebSocket { switched: false }
        );
        // A plain failure while on WebSocket is still just a backoff.
        assert_eq!(r.grpc_failed(now, wave, None), AfterGrpcError::BackOff);
    }

    #[test]
    fn probes_are_jittered_within_three_quarters_to_one_period() {
        let period = Duration::from_secs(30);
        let mut r = router(1);
        let start = Instant::now();
        r.grpc_failed(start, 0, Some(Http2Refusal::Alpn));
        let mut now = start;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let at = r.next_probe().expect("probing while on WebSocket");
            let wait = at - now;
            assert!(wait >= period * 3 / 4 && wait <= period, "{wait:?}");
            seen.insert(wait.as_millis());
            now = at;
            r.probe_failed(now);
        }
        assert!(seen.len() > 100, "the waits are spread, not fixed");
        assert!(r.probe_succeeded());
        assert_eq!(r.mode(), ActiveTransport::Grpc);
        assert_eq!(r.next_probe(), None);
        assert!(!r.probe_succeeded(), "only the first success switches");
    }
}
