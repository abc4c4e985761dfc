//! The conformance suite: every story of the wire contract that does not
//! depend on the transport, written once and run over any client
//! transport against the testkit's servers.
//!
//! A story is a plain async function taking a [`Target`]; it panics with a
//! message naming what broke. [`conformance_suite!`](crate::conformance_suite)
//! expands to one `#[tokio::test]` per story, so one line runs them all:
//!
//! ```ignore
//! // connector-grpc/tests/conformance.rs
//! connector_testkit::conformance_suite!(connector_testkit::conformance::Target::grpc());
//! ```
//!
//! A downstream transport plugs in with [`Target::custom`]: it names the
//! wire its client speaks (the testkit's gRPC or WebSocket server is the
//! other end) and how to make a client.
//!
//! Every story ends with [`TestServer::verify`]: a client protocol error
//! anywhere in it fails the story. Waits are on events with bounded
//! timeouts; nothing sleeps to let things settle.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use connector_core::proto::stream_message::Kind;
use connector_core::proto::{
    ApprovalUpdate, ExecuteRequest, ExecuteResponse, PayloadEncoding, RegistrationStatus,
    RejectReason, StreamMessage,
};
use connector_core::{
    BaseConnector, ConnectorError, DisconnectCause, JitterRng, MultiConnectorRunner,
    MultiTransportOptions, MultiTransportOptionsBuilder, ProxySetting, RegistrationEvent,
    RegistrationHandle, RegistrationKey, RegistrationState, StopReason, StreamMux, Transport,
    TransportError, TransportErrorKind,
};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::connectors::{Counting, Sleep};
use crate::engine::{ApprovalPolicy, ServerEvent, TestServer};
use crate::proxy::ConnectProxy;
use crate::tls::TestCertificate;

/// Bound for every wait of a story: generous, only reached when broken.
pub use crate::harness::WAIT;
use crate::harness::{fast_options as options, key, registrations, Running, TempDir, TEST_TOKEN};

/// The wire a client transport speaks, that is which testkit server a
/// story starts for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Wire {
    /// gRPC over HTTP/2 ([`crate::GrpcTestServer`]).
    Grpc,
    /// WebSocket ([`crate::WsTestServer`]).
    WebSocket,
}

type MakeTransport = dyn Fn() -> Arc<dyn Transport> + Send + Sync;

/// A client transport under test: the wire it speaks and how to make one.
#[derive(Clone)]
pub struct Target {
    name: String,
    wire: Wire,
    make: Arc<MakeTransport>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("wire", &self.wire)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// The SDK's gRPC transport (`connector_grpc::GrpcTransport`).
    #[cfg(feature = "grpc")]
    pub fn grpc() -> Self {
        Self::custom("grpc", Wire::Grpc, connector_grpc::GrpcTransport::new)
    }

    /// The SDK's WebSocket transport (`connector_ws::WsTransport`).
    #[cfg(feature = "ws")]
    pub fn websocket() -> Self {
        Self::custom("websocket", Wire::WebSocket, connector_ws::WsTransport::new)
    }

    /// Your own transport: `make` builds a client for `wire`.
    pub fn custom<T: Transport>(
        name: impl Into<String>,
        wire: Wire,
        make: impl Fn() -> T + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            wire,
            make: Arc::new(move || Arc::new(make()) as Arc<dyn Transport>),
        }
    }

    /// The name given at construction.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The wire the transport speaks.
    pub fn wire(&self) -> Wire {
        self.wire
    }

    fn transport(&self) -> Shared {
        Shared((self.make)())
    }
}

/// `Arc<dyn Transport>` as an `impl Transport` for the runner.
struct Shared(Arc<dyn Transport>);

#[async_trait]
impl Transport for Shared {
    async fn mux(
        &self,
        options: &MultiTransportOptions,
    ) -> Result<Arc<dyn StreamMux>, TransportError> {
        self.0.mux(options).await
    }
}

/// Either testkit server, with the faults both offer.
#[derive(Clone)]
enum Server {
    #[cfg(feature = "grpc")]
    Grpc(crate::GrpcTestServer),
    #[cfg(feature = "ws")]
    Ws(crate::WsTestServer),
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            #[cfg(feature = "grpc")]
            Server::Grpc($s) => $e,
            #[cfg(feature = "ws")]
            Server::Ws($s) => $e,
        }
    };
}

/// How a story's server is set up: TLS, and a fixed address.
#[derive(Clone, Default)]
struct Setup {
    cert: Option<TestCertificate>,
    require_client_cert: bool,
    bind: Option<SocketAddr>,
}

impl Setup {
    /// TLS with `cert`.
    fn tls(cert: TestCertificate) -> Self {
        Self {
            cert: Some(cert),
            ..Self::default()
        }
    }

    /// TLS with `cert`, and a client certificate required.
    fn mutual(cert: TestCertificate) -> Self {
        Self {
            require_client_cert: true,
            ..Self::tls(cert)
        }
    }
}

/// Starts the front-end `$server` (options `$opts`) for `Server::$variant`.
macro_rules! start_server {
    ($variant:ident, $server:ident, $opts:ident, $engine:expr, $setup:expr) => {{
        let setup = $setup;
        let mut o = crate::$opts::default();
        if let Some(c) = setup.cert {
            o = o.tls(c).require_client_cert(setup.require_client_cert);
        }
        if let Some(a) = setup.bind {
            o = o.bind(a);
        }
        Server::$variant(
            crate::$server::start($engine.clone(), o)
                .await
                .expect("the test server starts"),
        )
    }};
}

impl Server {
    async fn start(wire: Wire, engine: &TestServer, setup: Setup) -> Self {
        match wire {
            #[cfg(feature = "grpc")]
            Wire::Grpc => start_server!(Grpc, GrpcTestServer, GrpcServerOptions, engine, setup),
            #[cfg(feature = "ws")]
            Wire::WebSocket => start_server!(Ws, WsTestServer, WsServerOptions, engine, setup),
            #[allow(unreachable_patterns)] // a front-end compiled out
            other => panic!("this testkit build has no server for {other:?}"),
        }
    }

    fn url(&self) -> String {
        each!(self, s => s.url())
    }

    fn kill(&self, connection_id: u64) -> bool {
        each!(self, s => s.kill_connection(connection_id))
    }

    fn kill_one(&self) {
        let first = each!(self, s => s.connections().first().map(|c| c.connection_id));
        if let Some(id) = first {
            self.kill(id);
        }
    }

    fn total_connections_accepted(&self) -> u64 {
        each!(self, s => s.total_connections_accepted())
    }

    async fn wait_for_connection_count(&self, n: usize) {
        each!(self, s => s.wait_for_connection_count(n, WAIT).await)
            .unwrap_or_else(|e| panic!("{n} server connections: {e}"));
    }

    async fn restart(&self) {
        each!(self, s => s.restart().await).expect("server restarts");
    }

    async fn stop(&self) {
        each!(self, s => s.stop().await)
    }
}

/// The URL scheme of `wire`, without TLS.
fn scheme(wire: Wire) -> &'static str {
    match wire {
        Wire::Grpc => "grpc",
        Wire::WebSocket => "ws",
    }
}

/// One story's world: the engine, a server for the target's wire, and a
/// runner of `n` counted registrations `acme.echo.i{k}`.
struct World {
    engine: TestServer,
    server: Server,
    runner: MultiConnectorRunner,
    worker: Counting<Sleep>,
    run: Option<JoinHandle<Result<(), ConnectorError>>>,
}

fn runner(
    target: &Target,
    n: usize,
    options: MultiTransportOptions,
    connector: Arc<dyn BaseConnector>,
) -> MultiConnectorRunner {
    MultiConnectorRunner::new(registrations(n, connector), options, target.transport())
}

fn worker() -> Counting<Sleep> {
    Counting::new(Sleep::new(Duration::ZERO))
}

impl World {
    async fn new(
        target: &Target,
        n: usize,
        setup: Setup,
        tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
    ) -> Self {
        let engine = TestServer::new();
        let server = Server::start(target.wire, &engine, setup).await;
        let worker = worker();
        let options = tune(options(&server.url())).build().expect("valid options");
        let runner = runner(target, n, options, Arc::new(worker.clone()));
        Self {
            engine,
            server,
            runner,
            worker,
            run: None,
        }
    }

    /// `n` registrations, a plaintext server, the test options.
    async fn plain(target: &Target, n: usize) -> Self {
        Self::new(target, n, Setup::default(), |o| o).await
    }

    /// [`World::new`], started, every registration active.
    async fn started(
        target: &Target,
        n: usize,
        setup: Setup,
        tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
    ) -> Self {
        let mut w = Self::new(target, n, setup, tune).await;
        w.start();
        w.all_active(n).await;
        w
    }

    /// `n` registrations at most four to a connection (gRPC: several
    /// connections), started, every one active.
    async fn spread(target: &Target, n: usize) -> Self {
        Self::started(target, n, Setup::default(), |o| {
            o.max_streams_per_channel(4)
        })
        .await
    }

    /// [`World::plain`], the server answering registration 0 `PENDING`
    /// (and approving the others), started; returns once 0 is pending,
    /// with its events after the `PendingApproval`.
    async fn pending(target: &Target, n: usize) -> (Self, broadcast::Receiver<RegistrationEvent>) {
        let mut w = Self::plain(target, n).await;
        w.engine.set_policy_for(&key(0), ApprovalPolicy::Pending);
        let mut events = w.events(0);
        w.start();
        wait_event(&mut events, "pending", |e| {
            (*e == RegistrationEvent::PendingApproval).then_some(())
        })
        .await;
        (w, events)
    }

    /// [`World::plain`], started, every registration active.
    async fn running(target: &Target, n: usize) -> Self {
        Self::started(target, n, Setup::default(), |o| o).await
    }

    fn start(&mut self) {
        let r = self.runner.clone();
        self.run = Some(tokio::spawn(async move { r.run().await }));
    }

    fn handle(&self, i: usize) -> RegistrationHandle {
        self.runner.registration(&key(i)).expect("hosted")
    }

    /// Waits until registration `i` is active on the client.
    async fn active(&self, i: usize) {
        self.handle(i)
            .wait_for(WAIT, |s| *s == RegistrationState::Active)
            .await
            .unwrap_or_else(|| panic!("{} not active on the client", key(i)));
    }

    /// `n` keys active on the server, and every registration on the client.
    async fn all_active(&self, n: usize) {
        self.engine
            .wait_for_active(n, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for i in 0..self.runner.registrations().len() {
            self.active(i).await;
        }
    }

    /// Registration `i` lost exactly `n` approved streams and was approved
    /// again after each (a failed open on the way back is not a lost
    /// stream).
    fn assert_lost_and_back(&self, i: usize, n: u64) {
        let m = self.handle(i).metrics();
        assert_eq!(m.total_disconnects, n, "{}: {m:?}", key(i));
        assert_eq!(m.successful_reconnects, n, "{}: {m:?}", key(i));
    }

    fn events(&self, i: usize) -> broadcast::Receiver<RegistrationEvent> {
        self.handle(i).events()
    }

    /// Every `register` the server saw from registration `i`, oldest
    /// first, as "did it carry a session token this server issued".
    fn registers(&self, i: usize) -> Vec<bool> {
        let k = key(i).to_string();
        self.engine
            .events()
            .iter()
            .filter_map(|e| match e {
                ServerEvent::Registered { key, resumed, .. } if *key == k => Some(*resumed),
                _ => None,
            })
            .collect()
    }

    /// Whether `run` has returned.
    fn finished(&self) -> bool {
        self.run.as_ref().is_some_and(JoinHandle::is_finished)
    }

    /// Stops the runner: `run` returns `Ok` and no connection stays open.
    /// Then, once the server has seen every connection and stream end and
    /// has stopped itself, the engine must have seen no protocol error: a
    /// violation in the client's last messages is caught, and a server
    /// teardown after the check cannot add one the check missed.
    async fn stop(mut self) {
        self.runner.shutdown_handle().shutdown();
        if let Some(run) = self.run.take() {
            timeout(WAIT, run)
                .await
                .expect("run() returns after shutdown")
                .expect("no panic")
                .expect("clean stop");
        }
        assert_eq!(self.runner.summary().transport.open_connections(), 0);
        self.server.wait_for_connection_count(0).await;
        self.engine
            .wait_until(WAIT, |e| e.registrations().is_empty())
            .await
            .unwrap_or_else(|e| panic!("every stream ends on the server: {e}"));
        self.server.stop().await;
        self.engine.verify().expect("no client protocol error");
    }
}

fn message(kind: Kind) -> StreamMessage {
    StreamMessage { kind: Some(kind) }
}

fn request(id: &str, payload: &str) -> ExecuteRequest {
    ExecuteRequest {
        request_id: id.into(),
        payload: payload.as_bytes().to_vec().into(),
        encoding: PayloadEncoding::Json as i32,
        capability_id: "echo".into(),
        ..Default::default()
    }
}

/// Sends `req` to `k` and waits for its answer, which must carry its id.
async fn answer(engine: &TestServer, k: &RegistrationKey, req: ExecuteRequest) -> ExecuteResponse {
    let id = req.request_id.clone();
    let resp = engine
        .send_execute(k, req)
        .unwrap_or_else(|e| panic!("send {id}: {e}"))
        .wait(WAIT)
        .await
        .unwrap_or_else(|e| panic!("answer to {id}: {e}"));
    assert_eq!(resp.request_id, id);
    resp
}

/// Sends one request and checks the answer is its payload, echoed.
async fn echo(engine: &TestServer, k: &RegistrationKey, id: &str) -> ExecuteResponse {
    let req = request(id, &format!("{{\"id\":\"{id}\"}}"));
    let resp = answer(engine, k, req.clone()).await;
    assert!(resp.success, "{resp:?}");
    assert_eq!(resp.payload, req.payload, "the echo is the payload");
    resp
}

/// Waits for the first event `pick` accepts (lagging is fine).
async fn wait_event<T>(
    events: &mut broadcast::Receiver<RegistrationEvent>,
    what: &str,
    mut pick: impl FnMut(&RegistrationEvent) -> Option<T>,
) -> T {
    timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(e) => {
                    if let Some(t) = pick(&e) {
                        return t;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream while waiting for {what}: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Every event up to and including the first `done` accepts. Lagging
/// fails: the story asserts on the whole sequence.
async fn events_until(
    events: &mut broadcast::Receiver<RegistrationEvent>,
    what: &str,
    mut done: impl FnMut(&RegistrationEvent) -> bool,
) -> Vec<RegistrationEvent> {
    let mut seen = Vec::new();
    timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(e) => {
                    let last = done(&e);
                    seen.push(e);
                    if last {
                        return;
                    }
                }
                Err(e) => panic!("event stream while waiting for {what}: {e}; seen {seen:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    seen
}

/// The cause of a `Disconnected` event.
fn disconnect(e: &RegistrationEvent) -> Option<DisconnectCause> {
    match e {
        RegistrationEvent::Disconnected { cause } => Some(cause.clone()),
        _ => None,
    }
}

/// The message of a `Disconnected { OpenFailed }` event.
fn open_failure(e: &RegistrationEvent) -> Option<String> {
    match disconnect(e)? {
        DisconnectCause::OpenFailed(m) => Some(m),
        _ => None,
    }
}

/// A `Disconnected` event with exactly `cause`.
fn disconnected(cause: DisconnectCause) -> impl FnMut(&RegistrationEvent) -> Option<()> {
    move |e| (disconnect(e).as_ref() == Some(&cause)).then_some(())
}

/// An approval after a lost approved stream.
fn reconnected(e: &RegistrationEvent) -> Option<()> {
    matches!(e, RegistrationEvent::Approved { reconnect: true }).then_some(())
}

/// Every event up to the second failed open, with a backoff between the
/// two failures.
async fn two_failed_opens(
    events: &mut broadcast::Receiver<RegistrationEvent>,
) -> Vec<RegistrationEvent> {
    let mut failures = 0;
    let seen = events_until(events, "two failed opens", |e| {
        failures += usize::from(open_failure(e).is_some());
        failures == 2
    })
    .await;
    let first = position(&seen, "a failed open", |e| open_failure(e).is_some());
    position(&seen[first..], "a backoff between the attempts", |e| {
        matches!(e, RegistrationEvent::BackingOff { .. })
    });
    seen
}

/// The index of the first event `is` accepts, or a panic naming `what`.
fn position(
    seen: &[RegistrationEvent],
    what: &str,
    is: impl Fn(&RegistrationEvent) -> bool,
) -> usize {
    seen.iter()
        .position(is)
        .unwrap_or_else(|| panic!("no {what} among {seen:#?}"))
}

/// Registration 0 was rejected with `reason` and `message` and stopped for
/// good: no second register; registration 1 carries on and answers.
async fn assert_rejected_for_good(
    w: &World,
    events: &mut broadcast::Receiver<RegistrationEvent>,
    reason: RejectReason,
    message: &str,
) {
    let got = wait_event(events, "the rejection", |e| match e {
        RegistrationEvent::Rejected { reason, message } => Some((*reason, message.clone())),
        _ => None,
    })
    .await;
    assert_eq!(got, (reason, message.to_string()));
    let state = w
        .handle(0)
        .wait_for(WAIT, |s| matches!(s, RegistrationState::Stopped(_)))
        .await
        .expect("a final rejection stops the registration");
    assert_eq!(
        state,
        RegistrationState::Stopped(StopReason::Rejected {
            reason,
            message: message.into()
        })
    );
    w.active(1).await;
    echo(&w.engine, &key(1), "the-other-carries-on").await;
    assert!(!w.finished(), "the runner carries on with the others");
    assert_eq!(w.registers(0).len(), 1, "a final rejection is not retried");
    assert_eq!(w.handle(0).state(), state, "stopped stays stopped");
    assert_eq!(w.worker.total(), 1, "only the other one ran a request");
}

/// The server rejects registration 0 with a final `reason` at once.
async fn rejected_for_good(target: Target, reason: RejectReason) {
    let mut w = World::plain(&target, 2).await;
    w.engine
        .set_policy_for(&key(0), ApprovalPolicy::Reject(reason));
    let mut events = w.events(0);
    w.start();
    assert_rejected_for_good(&w, &mut events, reason, "rejected by the test's policy").await;
    w.stop().await;
}

/// Register once, get approved, answer executes; the server sees the
/// registration's identity and auth token (and no session token yet).
pub async fn register_approve_and_echo(target: Target) {
    let w = World::running(&target, 3).await;
    let regs = w.engine.registrations();
    assert_eq!(regs.len(), 3, "{regs:?}");
    for (i, r) in regs.iter().enumerate() {
        assert_eq!(r.key, key(i).to_string());
        assert_eq!(r.register.auth_token, TEST_TOKEN);
        assert_eq!(w.registers(i), vec![false], "one fresh register");
    }
    for i in 0..3 {
        echo(&w.engine, &key(i), &format!("r{i}")).await;
        assert_eq!(w.worker.runs(&format!("r{i}")), 1);
    }
    assert_eq!(w.worker.total(), 3, "one run per request");
    w.stop().await;
}

/// `PENDING` then approved: the client waits without executing, then
/// becomes active on the same stream.
pub async fn pending_then_approved(target: Target) {
    let (w, mut events) = World::pending(&target, 1).await;
    assert_eq!(w.handle(0).state(), RegistrationState::PendingApproval);
    assert!(w.engine.active_keys().is_empty());
    w.engine.approve(&key(0)).expect("approve");
    let seen = events_until(&mut events, "the approval", |e| {
        matches!(e, RegistrationEvent::Approved { .. })
    })
    .await;
    assert_eq!(
        seen,
        [RegistrationEvent::Approved { reconnect: false }],
        "pending, then approved (a first approval), nothing between"
    );
    w.all_active(1).await;
    echo(&w.engine, &key(0), "after-approval").await;
    assert_eq!(
        w.engine.stats().streams_opened,
        1,
        "approved on the same stream"
    );
    assert_eq!(w.registers(0), vec![false], "one register");
    w.stop().await;
}

/// `PENDING` then rejected (`DENIED`): the client reports the reason and
/// the server's message, stops that registration for good without running
/// a request, and the other one carries on.
pub async fn pending_then_rejected(target: Target) {
    let (w, mut events) = World::pending(&target, 2).await;
    w.engine
        .reject(&key(0), RejectReason::Denied, "not this one")
        .expect("reject");
    assert_rejected_for_good(&w, &mut events, RejectReason::Denied, "not this one").await;
    assert_eq!(w.engine.active_keys(), vec![key(1)]);
    w.stop().await;
}

/// `REJECTED` with `DENIED`: final.
pub async fn denied_is_final(target: Target) {
    rejected_for_good(target, RejectReason::Denied).await;
}

/// `REJECTED` with `INVALID_CREDENTIALS` (a fixed token): final.
pub async fn invalid_credentials_is_final(target: Target) {
    rejected_for_good(target, RejectReason::InvalidCredentials).await;
}

/// `REJECTED` with `INVALID_REQUEST`: final.
pub async fn invalid_request_is_final(target: Target) {
    rejected_for_good(target, RejectReason::InvalidRequest).await;
}

/// `SESSION_EXPIRED` on a resumed register: the client drops the session
/// token and registers again at once (no backoff) with its auth token.
pub async fn session_expired_registers_again_at_once_without_the_token(target: Target) {
    let w = World::running(&target, 1).await;
    assert_eq!(w.registers(0), vec![false]);
    w.engine.set_policy_for(
        &key(0),
        ApprovalPolicy::RejectOnce(RejectReason::SessionExpired),
    );
    let mut events = w.events(0);
    w.engine.close_stream(&key(0)).expect("close");
    // The first approval's event may still be on its way when the state
    // already says Active: wait for the rejection first, then the approval.
    let expired = |e: &RegistrationEvent| {
        matches!(
            e,
            RegistrationEvent::Rejected {
                reason: RejectReason::SessionExpired,
                ..
            }
        )
    };
    let mut seen = events_until(&mut events, "the SESSION_EXPIRED rejection", expired).await;
    seen.extend(
        events_until(&mut events, "the approval after the expiry", |e| {
            matches!(e, RegistrationEvent::Approved { .. })
        })
        .await,
    );
    let at = position(&seen, "SESSION_EXPIRED rejection", expired);
    assert!(
        !seen[at..]
            .iter()
            .any(|e| matches!(e, RegistrationEvent::BackingOff { .. })),
        "registers again at once: {seen:#?}"
    );
    position(&seen[at..], "SessionExpired disconnect", |e| {
        disconnect(e) == Some(DisconnectCause::SessionExpired)
    });
    assert_eq!(
        w.registers(0),
        vec![false, true, false],
        "first, resumed (expired), then fresh"
    );
    let regs = w.engine.registrations();
    assert_eq!(regs.len(), 1, "{regs:?}");
    assert!(
        regs[0].register.session_token.is_empty(),
        "the expired token is dropped"
    );
    assert_eq!(regs[0].register.auth_token, TEST_TOKEN);
    w.all_active(1).await;
    echo(&w.engine, &key(0), "after-expiry").await;
    w.stop().await;
}

/// `DUPLICATE`: the client backs off, retries, and is approved.
pub async fn duplicate_backs_off_then_is_approved(target: Target) {
    let mut w = World::plain(&target, 1).await;
    w.engine
        .set_policy_for(&key(0), ApprovalPolicy::RejectOnce(RejectReason::Duplicate));
    let mut events = w.events(0);
    w.start();
    let seen = events_until(&mut events, "the approval after the retry", |e| {
        matches!(e, RegistrationEvent::Approved { .. })
    })
    .await;
    let at = position(&seen, "DUPLICATE rejection", |e| {
        matches!(
            e,
            RegistrationEvent::Rejected {
                reason: RejectReason::Duplicate,
                ..
            }
        )
    });
    position(&seen[at..], "Duplicate disconnect", |e| {
        disconnect(e) == Some(DisconnectCause::Duplicate)
    });
    position(&seen[at..], "backoff before the retry", |e| {
        matches!(e, RegistrationEvent::BackingOff { .. })
    });
    assert_eq!(
        seen.last(),
        Some(&RegistrationEvent::Approved { reconnect: false }),
        "never approved before, so not a reconnect"
    );
    w.all_active(1).await;
    assert_eq!(
        w.registers(0),
        vec![false, false],
        "one rejected, one approved"
    );
    echo(&w.engine, &key(0), "after-duplicate").await;
    w.stop().await;
}

/// A reject reason this client does not know (99, from a newer server):
/// not one of the contract's final reasons, so never final; the client
/// reports it, backs off and registers again.
pub async fn unknown_reject_reason_is_retried(target: Target) {
    let (w, mut events) = World::pending(&target, 1).await;
    w.engine
        .send_raw(
            &key(0),
            message(Kind::ApprovalUpdate(Box::new(ApprovalUpdate {
                status: RegistrationStatus::Rejected as i32,
                session_token: String::new(),
                message: "a reason from the future".into(),
                reject_reason: 99,
            }))),
        )
        .expect("send");
    let seen = events_until(&mut events, "pending again", |e| {
        matches!(e, RegistrationEvent::PendingApproval)
    })
    .await;
    let at = position(&seen, "the rejection", |e| {
        *e == RegistrationEvent::Rejected {
            reason: RejectReason::Unspecified,
            message: "a reason from the future".into(),
        }
    });
    position(&seen[at..], "backoff before the retry", |e| {
        matches!(e, RegistrationEvent::BackingOff { .. })
    });
    assert!(!matches!(
        w.handle(0).state(),
        RegistrationState::Stopped(_)
    ));
    assert_eq!(w.registers(0).len(), 2);
    w.engine.approve(&key(0)).expect("approve the retry");
    w.all_active(1).await;
    echo(&w.engine, &key(0), "after-unknown-reason").await;
    w.stop().await;
}

/// The server ends a stream: the client reconnects with the session token
/// it was given (the server sees a resumed register) and works again.
pub async fn stream_kill_resumes_with_the_session_token(target: Target) {
    let w = World::running(&target, 2).await;
    let mut events = w.events(0);
    w.engine.close_stream(&key(0)).expect("close");
    let cause = wait_event(&mut events, "the disconnect", disconnect).await;
    assert_eq!(cause, DisconnectCause::ClosedByServer);
    wait_event(&mut events, "the reconnect", reconnected).await;
    assert_eq!(w.registers(0), vec![false, true], "resumed with the token");
    assert_eq!(w.registers(1), vec![false], "the other stream untouched");
    w.all_active(2).await;
    w.assert_lost_and_back(0, 1);
    w.assert_lost_and_back(1, 0);
    echo(&w.engine, &key(0), "after-close").await;
    w.stop().await;
}

/// A connection dies under the client: every registration it carried sees
/// an error (not a clean close, not a failed open), comes back and
/// answers; the registrations on other connections see nothing.
pub async fn connection_kill_is_an_error_then_recovers(target: Target) {
    const N: usize = 6;
    let w = World::spread(&target, N).await;
    let regs = w.engine.registrations();
    let victim = regs[0].connection_id;
    let victims: Vec<usize> = (0..N)
        .filter(|i| {
            regs.iter()
                .any(|r| key(*i) == r.key && r.connection_id == victim)
        })
        .collect();
    assert!(victims.contains(&0), "{regs:?}");
    let mut events: Vec<_> = victims.iter().map(|i| w.events(*i)).collect();
    assert!(w.server.kill(victim), "the connection was live");
    for (i, ev) in victims.iter().zip(&mut events) {
        let cause = wait_event(ev, "the disconnect", disconnect).await;
        assert!(
            matches!(cause, DisconnectCause::Error(_)),
            "{}: a killed connection is an error, not {cause:?}",
            key(*i)
        );
        wait_event(ev, "the reconnect", reconnected).await;
    }
    w.all_active(N).await;
    for i in 0..N {
        echo(&w.engine, &key(i), &format!("back{i}")).await;
        w.assert_lost_and_back(i, u64::from(victims.contains(&i)));
    }
    assert_eq!(w.runner.summary().transport.open_streams(), N);
    assert_eq!(w.engine.stats().duplicate_active, 0);
    w.stop().await;
}

/// The server restarts on the same port (gRPC: GOAWAY to every
/// connection): every registration reconnects once, is active again and
/// answers.
pub async fn server_restart_brings_everyone_back(target: Target) {
    const N: usize = 20;
    let w = World::running(&target, N).await;
    let mut events: Vec<_> = (0..N).map(|i| w.events(i)).collect();
    w.server.restart().await;
    for (i, ev) in events.iter_mut().enumerate() {
        wait_event(ev, &format!("{} to reconnect", key(i)), reconnected).await;
    }
    w.all_active(N).await;
    for i in 0..N {
        w.assert_lost_and_back(i, 1);
        echo(&w.engine, &key(i), &format!("after-restart{i}")).await;
    }
    assert_eq!(w.engine.stats().duplicate_active, 0);
    w.stop().await;
}

/// Heartbeat acks stop: the watchdog drops the stream; once acks flow
/// again the registration is back.
pub async fn stalled_heartbeat_acks_trip_the_watchdog(target: Target) {
    let w = World::started(&target, 1, Setup::default(), |o| {
        o.heartbeat_interval(Duration::from_millis(100))
            .heartbeat_timeout(Duration::from_millis(400))
    })
    .await;
    let mut events = w.events(0);
    w.engine.set_ack_heartbeats(false);
    wait_event(
        &mut events,
        "the watchdog",
        disconnected(DisconnectCause::Watchdog),
    )
    .await;
    w.engine.set_ack_heartbeats(true);
    wait_event(&mut events, "the approval after reconnecting", reconnected).await;
    echo(&w.engine, &key(0), "after-watchdog").await;
    w.stop().await;
}

/// `drain`: requests in flight are answered, the stream ends as drained,
/// and the registration reconnects; `should_reconnect` on a heartbeat ack
/// makes it reconnect too.
pub async fn drain_and_should_reconnect(target: Target) {
    let w = World::running(&target, 1).await;
    let k = key(0);
    let slow = w
        .engine
        .send_execute(&k, request("slow", r#"{"ms":200}"#))
        .expect("send");
    w.worker.wait_started(1, WAIT).await.expect("running");
    let mut events = w.events(0);
    w.engine.drain(&k, "deploy", 0).expect("drain");
    let answer = slow.wait(WAIT).await.expect("in-flight answered");
    assert!(answer.success, "{answer:?}");
    assert_eq!(answer.request_id, "slow");
    wait_event(
        &mut events,
        "the drained disconnect",
        disconnected(DisconnectCause::Drained),
    )
    .await;
    wait_event(&mut events, "the reconnect after the drain", reconnected).await;
    w.all_active(1).await;
    let opened = w.engine.stats().streams_opened;
    w.engine.ack_should_reconnect(&k).expect("arm");
    wait_event(
        &mut events,
        "the should_reconnect disconnect",
        disconnected(DisconnectCause::Drained),
    )
    .await;
    wait_event(
        &mut events,
        "the reconnect after should_reconnect",
        reconnected,
    )
    .await;
    w.all_active(1).await;
    assert_eq!(
        w.engine.stats().streams_opened,
        opened + 1,
        "one new stream after should_reconnect"
    );
    echo(&w.engine, &key(0), "after-drain").await;
    assert_eq!(w.worker.runs("slow"), 1);
    w.assert_lost_and_back(0, 2);
    w.stop().await;
}

/// Shutdown while requests run: each is answered before `run` returns.
pub async fn shutdown_answers_work_in_flight(target: Target) {
    let w = World::running(&target, 2).await;
    let pending: Vec<_> = (0..6)
        .map(|i| {
            w.engine
                .send_execute(&key(i % 2), request(&format!("f{i}"), r#"{"ms":300}"#))
                .expect("send")
        })
        .collect();
    w.worker.wait_started(6, WAIT).await.expect("all running");
    w.runner.shutdown_handle().shutdown();
    for p in pending {
        let id = p.request_id().to_string();
        let r = p.wait(WAIT).await.unwrap_or_else(|e| panic!("{id}: {e}"));
        assert!(r.success, "{r:?}");
        assert_eq!(r.request_id, id);
    }
    assert_eq!(w.worker.total(), 6);
    assert!(w.worker.runs_over_once().is_empty());
    w.stop().await;
}

/// Random stream closes, connection kills and restarts while executes
/// flow: every request the server sent is answered exactly once (per id),
/// and the handler ran at most once per id.
pub async fn exactly_once_under_random_faults(target: Target) {
    const N: usize = 8;
    let w = World::spread(&target, N).await;
    let mut rng = JitterRng::new(2024);
    let mut pending = Vec::new();
    for round in 0..20u64 {
        for i in 0..10u64 {
            let keys = w.engine.active_keys();
            if keys.is_empty() {
                break;
            }
            let k = &keys[(rng.next_u64() as usize) % keys.len()];
            let ms = rng.next_u64() % 40;
            let req = request(&format!("r{round}-{i}"), &format!("{{\"ms\":{ms}}}"));
            if let Ok(p) = w.engine.send_execute(k, req) {
                pending.push(p);
            }
        }
        match rng.next_u64() % 5 {
            0 => {
                if let Some(k) = w.engine.active_keys().first() {
                    w.engine.close_stream(k).expect("close a live stream");
                }
            }
            1 => w.server.kill_one(),
            2 if round % 10 == 5 => w.server.restart().await,
            _ => {}
        }
        w.engine
            .wait_for_active(N, WAIT)
            .await
            .expect("all back after the fault");
    }
    w.engine
        .wait_until(WAIT, |s| s.stats().outstanding == 0)
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", w.engine.stats()));
    let stats = w.engine.stats();
    let sent = pending.len() as u64;
    assert!(sent > 100, "the story sent too little to mean anything");
    assert_eq!(stats.executes_sent, sent);
    // One answer per id: none missing (outstanding 0 and each waiter
    // answered), none twice (the strict engine fails on a duplicate).
    let mut answered_ids = std::collections::HashSet::new();
    for p in pending {
        let id = p.request_id().to_string();
        let r = p.wait(WAIT).await.unwrap_or_else(|e| panic!("{id}: {e}"));
        assert!(r.success, "{r:?}");
        assert_eq!(r.request_id, id);
        assert!(answered_ids.insert(id), "one waiter per id");
    }
    assert_eq!(stats.duplicate_responses, 0, "{stats:?}");
    let answered_events = w
        .engine
        .events()
        .iter()
        .filter(|e| matches!(e, ServerEvent::ExecuteAnswered { .. }))
        .count();
    assert_eq!(answered_events as u64, sent, "exactly one answer per id");
    // A replay answers from the kept response: the handler ran at most
    // once per id, and at least once for each (nothing answered unrun).
    assert!(
        w.worker.runs_over_once().is_empty(),
        "handlers ran twice: {:?}",
        w.worker.runs_over_once()
    );
    assert_eq!(w.worker.distinct() as u64, sent);
    assert_eq!(stats.duplicate_active, 0, "{stats:?}");
    w.stop().await;
}

/// Through an HTTP CONNECT proxy, with TLS inside the tunnel: every
/// server connection is one tunnel, each asked for the name TLS verifies
/// (not an address), and the registrations answer.
pub async fn proxy_tunnels_every_connection(target: Target) {
    let cert = TestCertificate::generate().expect("cert");
    let dir = TempDir::new("proxy");
    let ca = cert.write_ca_pem(dir.dir()).expect("ca");
    let proxy = ConnectProxy::start().await.expect("proxy");
    let purl = proxy.url();
    let w = World::started(&target, 6, Setup::tls(cert), |o| {
        o.proxy(ProxySetting::Url(purl))
            .max_streams_per_channel(4)
            .ca_cert(&ca)
    })
    .await;
    assert!(
        w.server.url().contains("://localhost:"),
        "{}",
        w.server.url()
    );
    echo(&w.engine, &key(5), "via-proxy").await;
    let conns = w.server.total_connections_accepted();
    assert_eq!(
        w.runner.summary().transport.open_connections() as u64,
        conns,
        "every connection the server saw is one the client holds"
    );
    assert_eq!(proxy.tunnels_opened(), conns, "each connection is a tunnel");
    let authority = w
        .server
        .url()
        .split_once("://")
        .expect("scheme")
        .1
        .to_string();
    assert_eq!(proxy.connect_targets(), vec![authority; conns as usize]);
    w.stop().await;
    proxy.stop().await;
}

/// A proxy that cannot reach the server: every open fails with the
/// proxy's status (502) and the target's address; the runner keeps going.
pub async fn proxy_that_cannot_reach_the_server(target: Target) {
    let proxy = ConnectProxy::start().await.expect("proxy");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = closed.local_addr().expect("addr");
    drop(closed);
    let (running, mut events) =
        serverless(&target, dead, |o| o.proxy(ProxySetting::Url(proxy.url())));
    let msg = wait_event(&mut events, "a failed open", open_failure).await;
    assert_kind(&msg, TransportErrorKind::Refused);
    assert!(msg.contains("502"), "{msg}");
    assert!(msg.contains(&dead.to_string()), "{msg}");
    assert!(
        !running.is_finished(),
        "a proxy refusal does not end the runner"
    );
    stop_serverless(running).await;
    proxy.stop().await;
}

/// One registration, running, aimed at `addr` where no testkit server
/// is, and its events (subscribed before it starts).
fn serverless(
    target: &Target,
    addr: SocketAddr,
    tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
) -> (Running, broadcast::Receiver<RegistrationEvent>) {
    let options = tune(options(&format!("{}://{addr}", scheme(target.wire))))
        .build()
        .expect("options");
    let runner = runner(target, 1, options, Arc::new(worker()));
    let events = runner.registration(&key(0)).expect("hosted").events();
    (Running::start(runner), events)
}

/// Stops a [`serverless`] runner: `run` returns `Ok` and no connection
/// stays open.
async fn stop_serverless(running: Running) {
    let runner = running.runner().clone();
    running.stop().await.expect("clean stop");
    assert_eq!(runner.summary().transport.open_connections(), 0);
}

/// A server that accepts TCP and never answers: every open times out
/// (a timeout error, counted as a connect failure), with a backoff
/// between attempts; the registration never gets further than
/// connecting and the runner keeps going.
pub async fn black_hole_server_times_out_and_backs_off(target: Target) {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = hole.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            sockets.push(s);
        }
    });
    let (running, mut events) = serverless(&target, addr, |o| {
        o.connect_timeout(Duration::from_millis(300))
    });
    let seen = two_failed_opens(&mut events).await;
    for msg in seen.iter().filter_map(open_failure) {
        assert_kind(&msg, TransportErrorKind::Timeout);
        assert!(msg.contains("300ms"), "names the deadline: {msg}");
    }
    assert!(
        !seen.iter().any(|e| matches!(
            e,
            RegistrationEvent::Connected
                | RegistrationEvent::PendingApproval
                | RegistrationEvent::Approved { .. }
        )),
        "a black hole never connects: {seen:#?}"
    );
    let attempts: Vec<u32> = seen
        .iter()
        .filter_map(|e| match e {
            RegistrationEvent::Connecting { attempt } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, vec![0, 1], "two attempts, counted: {seen:#?}");
    let handle = running.runner().registration(&key(0)).expect("hosted");
    // The state machine counts a failure before its event goes out, so a
    // third attempt may have failed already.
    let failed = handle.metrics().connect_failures;
    assert!((2..=3).contains(&failed), "{failed} connect failures");
    assert!(matches!(
        handle.state(),
        RegistrationState::Backoff { .. } | RegistrationState::Connecting
    ));
    assert!(
        !running.is_finished(),
        "a black hole does not end the runner"
    );
    stop_serverless(running).await;
    held.abort();
}

/// A proxy that wants credentials: the right ones go through; wrong ones
/// fail every open naming the proxy and the 407 (never the password), and
/// the registration keeps retrying.
pub async fn proxy_credentials(target: Target) {
    let proxy = ConnectProxy::start().await.expect("proxy");
    proxy.require_auth("agent", "hunter2");
    let good = proxy.url_with_auth("agent", "hunter2");
    let w = World::started(&target, 1, Setup::default(), |o| {
        o.proxy(ProxySetting::Url(good))
    })
    .await;
    echo(&w.engine, &key(0), "authed").await;
    assert_eq!(proxy.auth_failures(), 0);
    w.stop().await;

    let tunnels = proxy.tunnels_opened();
    let bad = proxy.url_with_auth("agent", "wrong-pass");
    let mut w = World::new(&target, 1, Setup::default(), |o| {
        o.proxy(ProxySetting::Url(bad))
    })
    .await;
    let mut events = w.events(0);
    w.start();
    let addr = proxy.addr().to_string();
    for _ in 0..2 {
        let msg = wait_event(&mut events, "a failed open", open_failure).await;
        assert_kind(&msg, TransportErrorKind::Refused);
        assert!(msg.contains("407"), "{msg}");
        assert!(msg.contains(&addr), "{msg}");
        assert!(
            !msg.contains("wrong-pass"),
            "no credential in errors: {msg}"
        );
    }
    assert!(proxy.auth_failures() >= 2);
    assert_eq!(
        proxy.tunnels_opened(),
        tunnels,
        "no tunnel without credentials"
    );
    assert!(w.engine.registrations().is_empty());
    w.stop().await;
    proxy.stop().await;
}

/// `ProxySetting::Disabled` goes direct even with a proxy around.
pub async fn proxy_disabled_goes_direct(target: Target) {
    let proxy = ConnectProxy::start().await.expect("proxy");
    let w = World::started(&target, 2, Setup::default(), |o| {
        o.proxy(ProxySetting::Disabled)
    })
    .await;
    echo(&w.engine, &key(1), "direct").await;
    assert!(
        proxy.connect_targets().is_empty(),
        "Disabled never asks the proxy"
    );
    w.stop().await;
    proxy.stop().await;
}

/// A failed open's message for a transport error of `kind`: the SDK's
/// transports report `{kind} error: {message}` (`TransportError`'s display).
fn assert_kind(msg: &str, kind: TransportErrorKind) {
    assert!(
        msg.starts_with(&format!("{kind} error: ")),
        "a {kind} error, not: {msg}"
    );
}

/// TLS with the testkit CA, and mutual TLS: without a client certificate
/// every open fails with a TLS error (retried, nothing registers); with
/// one, admitted.
pub async fn tls_and_mutual_tls(target: Target) {
    let cert = TestCertificate::generate().expect("cert");
    let dir = TempDir::new("tls");
    let ca = cert.write_ca_pem(dir.dir()).expect("ca");
    let (c, k) = cert
        .generate_client_identity("client.test")
        .expect("identity");
    let (cp, kp) = (dir.path("client.pem"), dir.path("client.key"));
    std::fs::write(&cp, c).expect("write");
    std::fs::write(&kp, k).expect("write");

    let w = World::started(&target, 2, Setup::tls(cert.clone()), |o| o.ca_cert(&ca)).await;
    echo(&w.engine, &key(1), "tls").await;
    w.stop().await;

    let mut w = World::new(&target, 1, Setup::mutual(cert.clone()), |o| o.ca_cert(&ca)).await;
    let mut events = w.events(0);
    w.start();
    for _ in 0..2 {
        let msg = wait_event(&mut events, "a refused open", open_failure).await;
        // The server refuses the handshake, so the open fails: no stream,
        // no register. Under TLS 1.3 the client's half of the handshake is
        // done before the server checks the client's certificate, so the
        // client sees the connection closed, not a TLS error of its own.
        assert_kind(&msg, TransportErrorKind::Closed);
    }
    assert_eq!(
        w.engine.stats().streams_opened,
        0,
        "no stream without a client certificate"
    );
    assert!(!w.finished(), "a TLS failure does not end the runner");
    w.stop().await;

    let w = World::started(&target, 1, Setup::mutual(cert), |o| {
        o.ca_cert(&ca).client_identity(&cp, &kp)
    })
    .await;
    echo(&w.engine, &key(0), "mtls").await;
    w.stop().await;
}

/// A CA that did not sign the server's certificate: every open fails with
/// a TLS error that names the certificate and says what to check (the
/// `ca_cert`), with a backoff between attempts; no stream opens and the
/// runner keeps going.
pub async fn wrong_ca_is_a_tls_error_retried_with_backoff(target: Target) {
    let served = TestCertificate::generate().expect("cert");
    let other = TestCertificate::generate().expect("cert");
    let dir = TempDir::new("wrong-ca");
    let wrong = other.write_ca_pem(dir.dir()).expect("ca");
    let mut w = World::new(&target, 1, Setup::tls(served), |o| o.ca_cert(&wrong)).await;
    let mut events = w.events(0);
    w.start();
    let seen = two_failed_opens(&mut events).await;
    for msg in seen.iter().filter_map(open_failure) {
        assert_kind(&msg, TransportErrorKind::Tls);
        assert!(msg.contains("certificate"), "names the certificate: {msg}");
        assert!(msg.contains("ca_cert"), "says what to check: {msg}");
    }
    let stats = w.engine.stats();
    assert_eq!(stats.streams_opened, 0, "{stats:?}");
    assert_eq!(stats.registers, 0, "{stats:?}");
    assert!(!w.finished(), "a TLS failure does not end the runner");
    w.stop().await;
}

/// Bad input from the user: an unreadable CA file fails `run` with a
/// configuration error naming the file, at once; nothing reaches the
/// server.
pub async fn unreadable_ca_file_is_a_config_error(target: Target) {
    const MISSING: &str = "/nonexistent/connector-conformance/ca.pem";
    let setup = Setup::tls(TestCertificate::generate().expect("cert"));
    let w = World::new(&target, 1, setup, |o| o.ca_cert(MISSING)).await;
    let err = timeout(WAIT, w.runner.run())
        .await
        .expect("run returns at once")
        .expect_err("a config error");
    assert!(err.is_config(), "{err}");
    assert!(err.to_string().contains(MISSING), "{err}");
    assert_eq!(w.server.total_connections_accepted(), 0, "not even a dial");
    assert_eq!(w.engine.stats().streams_opened, 0);
    w.engine.verify().expect("no protocol error");
}

/// TLS with no CA given: the system roots do not know the testkit CA, so
/// every open fails with a TLS error that says to set `ca_cert` (or, on a
/// machine with no system roots at all, `run` fails at once with a config
/// error naming `ca_cert`); nothing registers.
pub async fn tls_without_a_ca_names_ca_cert(target: Target) {
    let setup = Setup::tls(TestCertificate::generate().expect("cert"));
    let mut w = World::new(&target, 1, setup, |o| o).await;
    let mut events = w.events(0);
    let runner = w.runner.clone();
    let mut run = tokio::spawn(async move { runner.run().await });
    let failed = tokio::select! {
        msg = wait_event(&mut events, "a failed open", open_failure) => Some(msg),
        ended = &mut run => {
            let err = ended.expect("no panic").expect_err("run cannot succeed");
            assert!(err.is_config(), "{err}");
            assert!(err.to_string().contains("ca_cert"), "{err}");
            None
        }
    };
    if let Some(msg) = failed {
        assert_kind(&msg, TransportErrorKind::Tls);
        assert!(msg.contains("ca_cert"), "{msg}");
        assert!(msg.contains("invalid peer certificate"), "{msg}");
        // Still running: `stop` ends it and checks it ends clean.
        w.run = Some(run);
    }
    assert_eq!(w.engine.stats().registers, 0, "nothing registers");
    assert_eq!(w.engine.stats().streams_opened, 0);
    w.stop().await;
}

/// Legal messages the client cannot act on, from a buggy server: a message
/// with no kind, a `register_response` or an `approval_update` while
/// active, an `execute_request` whose id is already in flight. Each is a
/// `ProtocolError` event that says what it was; none costs the stream, and
/// nothing is lost: the request in flight is answered exactly once (a
/// second answer would fail the strict engine at `stop`), its handler runs
/// once, and the next request is answered too.
pub async fn hostile_messages_are_protocol_errors_that_lose_nothing(target: Target) {
    let w = World::running(&target, 1).await;
    let k = key(0);
    let mut events = w.events(0);
    let slow = request("slow", r#"{"ms":1000}"#);
    let pending = w.engine.send_execute(&k, slow.clone()).expect("send");
    w.worker
        .wait_started(1, WAIT)
        .await
        .expect("the slow handler runs");
    // The duplicate first, well inside the slow handler's second.
    let hostile: [(StreamMessage, &str); 4] = [
        (
            message(Kind::ExecuteRequest(Box::new(slow))),
            "duplicate request_id while the first is in flight",
        ),
        (StreamMessage { kind: None }, "no known kind"),
        (
            message(Kind::RegisterResponse(Box::default())),
            "register_response outside of registering",
        ),
        (
            message(Kind::ApprovalUpdate(Default::default())),
            "approval_update while not pending",
        ),
    ];
    for (msg, says) in hostile {
        w.engine.send_raw(&k, msg).expect("send_raw");
        let seen = events_until(&mut events, says, |e| {
            matches!(e, RegistrationEvent::ProtocolError { .. })
        })
        .await;
        match seen.last() {
            Some(RegistrationEvent::ProtocolError { detail }) => {
                assert!(detail.contains(says), "{detail:?} should say {says:?}")
            }
            other => panic!("no protocol error for {says:?}: {other:?}"),
        }
        assert!(
            !seen
                .iter()
                .any(|e| matches!(e, RegistrationEvent::Disconnected { .. })),
            "{says}: the stream stays: {seen:#?}"
        );
    }
    let resp = pending.wait(WAIT).await.expect("the slow one is answered");
    assert_eq!(resp.request_id, "slow");
    assert!(resp.success, "{resp:?}");
    assert_eq!(w.worker.runs("slow"), 1, "the duplicate did not run");
    echo(&w.engine, &k, "after").await;
    assert_eq!(w.registers(0), vec![false], "never registered again");
    w.stop().await;
}

/// Expands to one `#[tokio::test]` per conformance story for a
/// [`conformance::Target`](crate::conformance::Target) expression.
///
/// The calling crate needs `tokio` (with `macros` and `rt-multi-thread`)
/// among its dev-dependencies.
#[macro_export]
macro_rules! conformance_suite {
    ($target:expr) => {
        $crate::conformance_suite!(@each $target;
            register_approve_and_echo,
            pending_then_approved,
            pending_then_rejected,
            denied_is_final,
            invalid_credentials_is_final,
            invalid_request_is_final,
            session_expired_registers_again_at_once_without_the_token,
            duplicate_backs_off_then_is_approved,
            unknown_reject_reason_is_retried,
            stream_kill_resumes_with_the_session_token,
            connection_kill_is_an_error_then_recovers,
            server_restart_brings_everyone_back,
            stalled_heartbeat_acks_trip_the_watchdog,
            drain_and_should_reconnect,
            shutdown_answers_work_in_flight,
            exactly_once_under_random_faults,
            proxy_tunnels_every_connection,
            proxy_that_cannot_reach_the_server,
            black_hole_server_times_out_and_backs_off,
            proxy_credentials,
            proxy_disabled_goes_direct,
            tls_and_mutual_tls,
            wrong_ca_is_a_tls_error_retried_with_backoff,
            unreadable_ca_file_is_a_config_error,
            tls_without_a_ca_names_ca_cert,
            hostile_messages_are_protocol_errors_that_lose_nothing,
        );
    };
    (@each $target:expr; $($story:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $story() {
                $crate::conformance::$story($target).await;
            }
        )*
    };
}
