//! The thin async loop that runs one [`Registration`] over a [`StreamMux`]:
//! it turns IO and timers into `handle_*` calls and carries out the state
//! machine's actions. No protocol decision is made here.

use std::collections::{HashMap, VecDeque};

use foldhash::fast::RandomState;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use connector_proto::{ExecuteRequest, PayloadEncoding, StreamMessage};
use futures_util::{FutureExt, StreamExt};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::Instrument;

use crate::config::{MultiTransportOptions, RegistrationKey, Secret};
use crate::connector::{
    BaseConnector, ConnectorRegistration, ExecuteContext, ExecuteError, ExecuteOutput,
};
use crate::error::{ConnectorError, TransportError, TransportErrorKind};
use crate::live::LiveShared;
use crate::metrics::Counters;
use crate::pacing::ReconnectPacer;
use crate::registration::{Action, Registration};
use crate::state::RegistrationEvent;
use crate::token::TokenSource;
use crate::transport::{MessageStream, StreamMux};

/// How long a graceful close waits for the outbox to flush and the server to
/// end its side before the stream is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

type Opening = Pin<Box<dyn Future<Output = Result<MessageStream, TransportError>> + Send>>;
type Fetching = Pin<Box<dyn Future<Output = Result<Secret, ConnectorError>> + Send>>;
type Outcome = (Arc<str>, Result<ExecuteOutput, ExecuteError>);

/// What woke the driver.
// Lives for one loop iteration on the stack; boxing the big variants would
// cost an allocation per inbound message.
#[allow(clippy::large_enum_variant)]
enum Input {
    Stop,
    Opened(Result<MessageStream, TransportError>),
    Token(Result<Secret, ConnectorError>),
    Inbound(Option<Result<StreamMessage, TransportError>>),
    OutboundClosed,
    Sent,
    Done(Outcome),
    Closing(ClosingEvent),
    Timer,
}

fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs one registration until it stops. Resolves when the registration is
/// stopped and every handler task is gone (no task outlives this future).
///
/// The state machine and the driver are built here, before the future
/// exists, so the future holds them and nothing else: an `async fn` would
/// also keep its arguments (the registration's config, 144 bytes) in every
/// state, and the runner's task would hold a third copy, for each of the
/// tens of thousands of registrations a process may host.
pub(crate) fn drive(
    registration: ConnectorRegistration,
    options: &MultiTransportOptions,
    mux: Arc<dyn StreamMux>,
    pacer: Option<Arc<ReconnectPacer>>,
    live: Arc<LiveShared>,
) -> impl Future<Output = ()> + Send + 'static {
    let key = live.key.clone();
    let span = tracing::info_span!("registration", key = %key);
    let connector = registration.connector().clone();
    let token_source = registration.config().token_source.clone();
    let mut sm = Registration::new(&registration, options, Instant::now(), unix_ms_now());
    // The state machine has what it needs; the config's copy (and its
    // strings) need not live as long as the registration runs.
    drop(registration);
    let mut driver = Driver {
        key,
        connector,
        mux,
        pacer,
        opened_before: false,
        stream: None,
        closing: None,
        opening: None,
        token_source,
        fetching: None,
        timer: Box::pin(tokio::time::sleep_until(Instant::now())),
        timer_at: None,
        stopped: Box::pin(live.stop.clone().cancelled_owned()),
        tasks: None,
        aborts: HashMap::default(),
        stop_seen: false,
        published: u64::MAX,
        published_counters: Counters::default(),
        published_connection: None,
    };
    async move {
        sm.handle_start(Instant::now());
        loop {
            driver.apply_actions(&mut sm).await;
            driver.publish(&mut sm, &live);
            if sm.is_finished()
                && driver.stream.is_none()
                && driver.opening.is_none()
                && driver.fetching.is_none()
                && driver.closing.is_none()
            {
                break;
            }
            let input = driver.next_input(&mut sm).await;
            driver.handle(&mut sm, input).await;
        }
        if let Some(tasks) = &mut driver.tasks {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        driver.publish(&mut sm, &live);
    }
    .instrument(span)
}

struct Driver {
    key: RegistrationKey,
    connector: Arc<dyn BaseConnector>,
    mux: Arc<dyn StreamMux>,
    /// Paces every open but the first (see [`ReconnectPacer`]).
    pacer: Option<Arc<ReconnectPacer>>,
    opened_before: bool,
    stream: Option<MessageStream>,
    /// A stream being closed gracefully: a driver state polled in the
    /// select loop beside everything else, so one registration's close
    /// never holds up its timers, handler results or the next stream.
    closing: Option<Closing>,
    opening: Option<Opening>,
    /// Asked for a token before every `register` (`Action::FetchToken`).
    token_source: Option<Arc<dyn TokenSource>>,
    fetching: Option<Fetching>,
    /// One timer and one cancellation waiter for the driver's life, reset
    /// rather than rebuilt on every loop: making a `Sleep` registers it in
    /// the runtime's timer wheel and a `cancelled()` future in the token's
    /// waiter list, both behind locks, which per message was a measurable
    /// share of the per-execute cost.
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<Instant>,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Handlers that were not ready at once. Made with the first such
    /// handler: most registrations' handlers answer at once, and an empty
    /// `JoinSet` still allocates.
    tasks: Option<JoinSet<Outcome>>,
    aborts: HashMap<Arc<str>, AbortHandle, RandomState>,
    stop_seen: bool,
    published: u64,
    published_counters: Counters,
    /// The connection id last published (the open stream's).
    published_connection: Option<u64>,
}

impl Driver {
    async fn apply_actions(&mut self, sm: &mut Registration) {
        // One clock read for the handlers started in this batch (their
        // deadlines); each one's end is read when it ends.
        let mut started_at: Option<Instant> = None;
        while let Some(action) = sm.poll_action() {
            match action {
                Action::OpenStream(register) => {
                    let mux = self.mux.clone();
                    let key = self.key.clone();
                    let pacer = if self.opened_before {
                        self.pacer.clone()
                    } else {
                        None
                    };
                    self.opened_before = true;
                    self.opening = Some(Box::pin(async move {
                        if let Some(pacer) = pacer {
                            pacer.admit().await;
                        }
                        mux.open(&key, register).await
                    }));
                }
                Action::CloseStream => {
                    if let Some(stream) = self.stream.take() {
                        // What the state machine still has queued belongs
                        // to this stream: it goes first, then the half-close.
                        let mut pending = VecDeque::new();
                        while let Some(m) = sm.poll_transmit() {
                            pending.push_back(m);
                        }
                        let closing = Closing::new(stream, pending);
                        if let Some(old) = self.closing.replace(closing) {
                            // A second close while the first lingers: the
                            // first is given up; what it did not send is
                            // kept for the next stream.
                            for m in old.abandon() {
                                sm.handle_unsent(Instant::now(), m);
                            }
                        }
                    }
                    self.opening = None;
                }
                Action::DropStream => {
                    self.stream = None;
                    self.opening = None;
                    self.fetching = None;
                }
                Action::FetchToken => match self.token_source.clone() {
                    Some(source) => {
                        self.fetching = Some(Box::pin(async move { source.token().await }))
                    }
                    None => sm.handle_token(Instant::now(), Err("no token source configured")),
                },
                Action::Execute(request) => {
                    let now = *started_at.get_or_insert_with(Instant::now);
                    self.start_execute(sm, *request, now)
                }
                Action::Abort(id) => {
                    if let Some(handle) = self.aborts.remove(id.as_str()) {
                        handle.abort();
                    }
                }
            }
        }
    }

    /// Starts a handler. Its future is polled once right here: a handler
    /// that finishes without waiting (an in-memory lookup, a transform) is
    /// answered with no task spawned, which at high rates was the largest
    /// single cost per execute. One that is not ready moves to a task of its
    /// own, so a slow handler never holds up the registration's stream.
    ///
    /// Every handler runs in an `execute` span (see [`crate::trace`]),
    /// created here, inside the registration's span, and carried by the
    /// future wherever it runs, so a spawned handler keeps the registration
    /// span as its parent.
    fn start_execute(&mut self, sm: &mut Registration, request: ExecuteRequest, now: Instant) {
        // The state machine's copy of the id, shared: no allocation.
        let id = sm
            .shared_request_id(&request.request_id)
            .unwrap_or_else(|| Arc::from(request.request_id.as_str()));
        let deadline = (request.timeout_ms > 0)
            .then(|| now + Duration::from_millis(request.timeout_ms as u64));
        let ctx = ExecuteContext::from_request(
            self.key.clone(),
            request.request_id,
            request.capability_id,
            request.payload,
            PayloadEncoding::try_from(request.encoding).unwrap_or(PayloadEncoding::Unspecified),
            request.context,
            deadline,
        );
        let span = crate::trace::execute_span(&self.key, &ctx);
        let end = crate::trace::SpanEnd::new(&span, ctx.deadline);
        let connector = self.connector.clone();
        // Owns the connector so it can move to a task if it is not ready;
        // a panic in the handler, on either poll, becomes a handler error.
        let mut future = Box::pin(
            async move {
                match AssertUnwindSafe(connector.execute(ctx))
                    .catch_unwind()
                    .await
                {
                    Ok(result) => {
                        end.finish(crate::trace::Outcome::of(&result));
                        result
                    }
                    Err(_) => {
                        end.finish(crate::trace::Outcome::Panicked);
                        Err(panicked())
                    }
                }
            }
            .instrument(span),
        );
        if let Some(result) = (&mut future).now_or_never() {
            sm.handle_execute_done(Instant::now(), &id, result);
            return;
        }
        let task_id = Arc::clone(&id);
        let handle = self
            .tasks
            .get_or_insert_with(JoinSet::new)
            .spawn(async move { (task_id, future.await) });
        self.aborts.insert(id, handle);
    }

    fn publish(&mut self, sm: &mut Registration, live: &LiveShared) {
        // Counters, then state, then events: whoever reacts to an event or a
        // state change reads counters at least as new (the watch's lock orders
        // the relaxed counter stores before the state it publishes).
        // The one place the counters are published.
        let counters = sm.counters();
        if counters != self.published_counters {
            self.published_counters = counters;
            live.metrics.publish(&counters);
        }
        let connection = self.stream.as_ref().map(|s| s.info.connection_id);
        if connection != self.published_connection {
            self.published_connection = connection;
            live.metrics.publish_connection(connection);
        }
        if sm.state_version() != self.published {
            self.published = sm.state_version();
            live.state.publish(sm.state().clone());
        }
        while let Some(event) = sm.poll_event() {
            match &event {
                RegistrationEvent::Approved { reconnect } => {
                    tracing::info!(reconnect, "registration approved")
                }
                RegistrationEvent::Disconnected { cause } => {
                    tracing::debug!(%cause, "disconnected")
                }
                RegistrationEvent::BackingOff { delay } => {
                    tracing::debug!(delay_ms = delay.as_millis() as u64, "backing off")
                }
                RegistrationEvent::Stopped { reason } => tracing::info!(%reason, "stopped"),
                _ => tracing::trace!(?event, "event"),
            }
            live.send_event(event);
        }
    }

    async fn next_input(&mut self, sm: &mut Registration) -> Input {
        let deadline = sm.poll_timeout();
        if deadline != self.timer_at {
            self.timer_at = deadline;
            if let Some(at) = deadline {
                self.timer.as_mut().reset(at);
            }
        }
        let wants_send = sm.has_transmit();
        let Self {
            stream,
            closing,
            opening,
            fetching,
            tasks,
            stop_seen,
            timer,
            stopped,
            ..
        } = self;
        let has_timer = deadline.is_some();
        let (inbound, outbound) = match stream.as_mut() {
            Some(s) => (Some(&mut s.inbound), Some(&s.outbound)),
            None => (None, None),
        };
        let has_opening = opening.is_some();
        let has_fetching = fetching.is_some();
        let has_tasks = tasks.as_ref().is_some_and(|t| !t.is_empty());
        let has_stream = inbound.is_some();
        let has_closing = closing.is_some();
        tokio::select! {
            biased;
            _ = stopped.as_mut(), if !*stop_seen => Input::Stop,
            res = async { match opening.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if has_opening => Input::Opened(res),
            res = async { match fetching.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if has_fetching => Input::Token(res),
            Some(done) = async { match tasks.as_mut() { Some(t) => t.join_next().await, None => None } }, if has_tasks => match done {
                Ok(outcome) => Input::Done(outcome),
                // Aborted after its response was made (timeout, cancel).
                Err(_) => Input::Timer,
            },
            msg = async { match inbound { Some(i) => i.next().await, None => std::future::pending().await } }, if has_stream => Input::Inbound(msg),
            permit = async { match outbound { Some(o) => o.reserve().await, None => std::future::pending().await } }, if has_stream && wants_send => match permit {
                Ok(permit) => {
                    if let Some(m) = sm.poll_transmit() {
                        permit.send(m);
                    }
                    Input::Sent
                }
                Err(_) => Input::OutboundClosed,
            },
            // Boxed: a close is rare and short, and inline its future
            // (~270 bytes) would be in every registration's task for life.
            ev = async { match closing.as_mut() { Some(c) => Box::pin(c.step()).await, None => std::future::pending().await } }, if has_closing => Input::Closing(ev),
            _ = timer.as_mut(), if has_timer => Input::Timer,
        }
    }

    async fn handle(&mut self, sm: &mut Registration, input: Input) {
        // One clock read per wake-up: everything below is synchronous, and
        // reading the clock per message was a visible cost at high rates.
        let now = Instant::now();
        match input {
            Input::Stop => {
                self.stop_seen = true;
                sm.handle_shutdown(now);
            }
            Input::Opened(res) => {
                self.opening = None;
                match res {
                    Ok(stream) => {
                        tracing::debug!(connection_id = stream.info.connection_id, "stream open");
                        self.stream = Some(stream);
                        sm.handle_stream_opened(now);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not open stream");
                        sm.handle_open_failed(now, &e.to_string());
                    }
                }
            }
            Input::Token(res) => {
                self.fetching = None;
                match res {
                    Ok(token) => sm.handle_token(now, Ok(token)),
                    Err(ConnectorError::Token(why)) => sm.handle_token(now, Err(&why)),
                    Err(other) => sm.handle_token(now, Err(&other.to_string())),
                }
            }
            Input::Inbound(Some(Ok(msg))) => {
                sm.handle_message(now, msg);
                // Take what else is ready without another trip through select.
                for _ in 0..64 {
                    let Some(s) = self.stream.as_mut() else { break };
                    match s.inbound.next().now_or_never() {
                        Some(Some(Ok(msg))) => sm.handle_message(now, msg),
                        Some(Some(Err(e))) => {
                            self.stream = None;
                            stream_failed(sm, &e);
                            break;
                        }
                        Some(None) => {
                            self.stream = None;
                            sm.handle_stream_closed(Instant::now(), None);
                            break;
                        }
                        None => break,
                    }
                }
            }
            Input::Inbound(Some(Err(e))) => {
                self.stream = None;
                stream_failed(sm, &e);
            }
            Input::Inbound(None) => {
                self.stream = None;
                sm.handle_stream_closed(now, None);
            }
            Input::OutboundClosed => {
                self.stream = None;
                sm.handle_stream_closed(now, Some("outbound half closed"));
            }
            Input::Sent => {}
            Input::Done((id, result)) => {
                self.aborts.remove(&id);
                sm.handle_execute_done(now, &id, result);
                while let Some(Some(Ok((id, result)))) = self
                    .tasks
                    .as_mut()
                    .and_then(|t| t.join_next().now_or_never())
                {
                    self.aborts.remove(&id);
                    sm.handle_execute_done(now, &id, result);
                }
            }
            Input::Closing(ClosingEvent::Request(request)) => {
                sm.handle_closing_request(now, &request);
            }
            Input::Closing(ClosingEvent::Done(unsent)) => {
                self.closing = None;
                for m in unsent {
                    sm.handle_unsent(now, m);
                }
            }
            Input::Timer => {}
        }
        // Timers are checked after every input: cheap, and it keeps a busy
        // stream from starving the watchdog or request deadlines.
        if sm.poll_timeout().is_some_and(|t| t <= now) {
            sm.handle_timeout(now);
        }
        // Likewise the outbox: fill the stream's queue while it has room,
        // so a stream that never stops delivering requests still gets its
        // responses out (the select's send branch is only the slow path,
        // for when the queue is full).
        if let Some(s) = self.stream.as_ref() {
            while sm.has_transmit() {
                match s.outbound.try_reserve() {
                    Ok(permit) => {
                        if let Some(m) = sm.poll_transmit() {
                            permit.send(m);
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    }
}

fn panicked() -> ExecuteError {
    ExecuteError::handler("the handler panicked")
}

fn stream_failed(sm: &mut Registration, error: &TransportError) {
    let now = Instant::now();
    tracing::warn!(error = %error, kind = %error.kind(), "stream failed");
    if error.kind() == TransportErrorKind::Protocol {
        sm.handle_malformed(now, error.message());
    }
    sm.handle_stream_closed(now, Some(&error.to_string()));
}

/// What a closing stream has to say.
enum ClosingEvent {
    /// An `execute_request` that arrived during the linger.
    Request(Box<ExecuteRequest>),
    /// The close is over; these messages could not be sent.
    Done(Vec<StreamMessage>),
}

/// A stream being closed: first what was queued for it is sent, then it is
/// half-closed, then the server's side is read (bounded by
/// [`CLOSE_LINGER`]) so nothing queued is lost to a reset, and requests
/// that arrive meanwhile still get an answer (through the state machine).
struct Closing {
    outbound: Option<tokio::sync::mpsc::Sender<StreamMessage>>,
    inbound: crate::transport::InboundStream,
    pending: VecDeque<StreamMessage>,
    deadline: Instant,
}

impl Closing {
    fn new(stream: MessageStream, pending: VecDeque<StreamMessage>) -> Self {
        Self {
            outbound: Some(stream.outbound),
            inbound: stream.inbound,
            pending,
            deadline: Instant::now() + CLOSE_LINGER,
        }
    }

    fn abandon(self) -> VecDeque<StreamMessage> {
        self.pending
    }

    /// The next thing the close has to report. Cancel-safe: every await is
    /// (`reserve`, `next`), and progress lives in `self`.
    async fn step(&mut self) -> ClosingEvent {
        loop {
            if let Some(outbound) = &self.outbound {
                if self.pending.is_empty() {
                    // Half-close: the server sees the end of our side.
                    self.outbound = None;
                    continue;
                }
                let sent = match tokio::time::timeout_at(self.deadline, outbound.reserve()).await {
                    Ok(Ok(permit)) => {
                        if let Some(m) = self.pending.pop_front() {
                            permit.send(m);
                        }
                        true
                    }
                    _ => false,
                };
                if !sent {
                    self.outbound = None;
                    return ClosingEvent::Done(std::mem::take(&mut self.pending).into());
                }
                continue;
            }
            match tokio::time::timeout_at(self.deadline, self.inbound.next()).await {
                Ok(Some(Ok(message))) => {
                    if let Some(connector_proto::stream_message::Kind::ExecuteRequest(r)) =
                        message.kind
                    {
                        return ClosingEvent::Request(r);
                    }
                }
                _ => return ClosingEvent::Done(Vec::new()),
            }
        }
    }
}
