//! Without a URL: the demo on an embedded test server. The testkit server
//! runs in this process on a free loopback port, the echo connectors
//! register with it, the server sends a short workload, every answer is
//! checked, and a summary table is printed.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use connector_core::proto::{ExecuteErrorKind, ExecuteRequest, ExecuteResponse, PayloadEncoding};
use connector_core::{
    MultiConnectorRunner, MultiTransportOptions, RegistrationKey, RegistrationState, Shard,
};
#[cfg(feature = "grpc")]
use connector_testkit::{GrpcServerOptions, GrpcTestServer};
use connector_testkit::{PendingExecute, TestServer, TestkitError};
#[cfg(feature = "ws")]
use connector_testkit::{WsServerOptions, WsTestServer};

use crate::app::{log_hosting, run_ended, serve_ops, summary_rows, Failure};
use crate::cli::{Args, DemoTransport};
use crate::config::RegistrationSpec;
use crate::hosting::{hosted_share, Host};
use crate::ops::OpsEndpoint;
use crate::summary::render_summary;
use crate::transport::transport_for;
use crate::ConnectorTypes;

/// How long the demo waits for every registration to become active.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one workload request may take to be answered.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the demo waits for every registration's first heartbeat RTT.
const RTT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the graceful shutdown may take.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the client may take to close its connections after stopping.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Workload requests in flight at once.
const IN_FLIGHT: usize = 32;

enum DemoServer {
    #[cfg(feature = "grpc")]
    Grpc(GrpcTestServer),
    #[cfg(feature = "ws")]
    Ws(WsTestServer),
}

impl DemoServer {
    async fn start(kind: DemoTransport) -> Result<Self, String> {
        Ok(match kind {
            #[cfg(feature = "grpc")]
            DemoTransport::Grpc => Self::Grpc(
                GrpcTestServer::start(TestServer::new(), GrpcServerOptions::default())
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            #[cfg(feature = "ws")]
            DemoTransport::Ws => Self::Ws(
                WsTestServer::start(TestServer::new(), WsServerOptions::default())
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            #[allow(
                unreachable_patterns,
                reason = "reached only in a build with one transport"
            )]
            other => {
                return Err(format!(
                    "--transport {other:?}: this connector-host was built without that \
                     transport's feature (`grpc` or `ws`)"
                ))
            }
        })
    }

    fn url(&self) -> String {
        match self {
            #[cfg(feature = "grpc")]
            Self::Grpc(s) => s.url(),
            #[cfg(feature = "ws")]
            Self::Ws(s) => s.url(),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            #[cfg(feature = "grpc")]
            Self::Grpc(_) => "gRPC",
            #[cfg(feature = "ws")]
            Self::Ws(_) => "WebSocket",
        }
    }

    fn engine(&self) -> &TestServer {
        match self {
            #[cfg(feature = "grpc")]
            Self::Grpc(s) => s.engine(),
            #[cfg(feature = "ws")]
            Self::Ws(s) => s.engine(),
        }
    }

    fn connection_count(&self) -> usize {
        match self {
            #[cfg(feature = "grpc")]
            Self::Grpc(s) => s.connection_count(),
            #[cfg(feature = "ws")]
            Self::Ws(s) => s.connection_count(),
        }
    }

    /// Stops the server once the client has closed its connections (bounded):
    /// stopping earlier would cut a WebSocket close handshake still under way
    /// and make the client log a lost socket.
    async fn stop(&self) {
        let closed = match self {
            #[cfg(feature = "grpc")]
            Self::Grpc(s) => s.wait_for_connection_count(0, CLOSE_TIMEOUT).await,
            #[cfg(feature = "ws")]
            Self::Ws(s) => s.wait_for_connection_count(0, CLOSE_TIMEOUT).await,
        };
        if let Err(e) = closed {
            tracing::debug!("stopping the test server with connections open: {e}");
        }
        match self {
            #[cfg(feature = "grpc")]
            Self::Grpc(s) => s.stop().await,
            #[cfg(feature = "ws")]
            Self::Ws(s) => s.stop().await,
        }
    }
}

/// What a workload response must look like.
#[derive(Debug, Clone)]
enum Expect {
    /// `success = true` with this JSON.
    Json(serde_json::Value),
    /// `success = false` with this kind.
    Error(ExecuteErrorKind),
}

#[derive(Debug)]
struct Planned {
    key: RegistrationKey,
    request: ExecuteRequest,
    expect: Expect,
}

/// The workload: mostly `echo`, every tenth a short `sleep`, a few `fail`,
/// and one each of bad JSON, a non-JSON RAW payload, an unknown capability
/// and an empty capability id.
fn plan(keys: &[RegistrationKey]) -> Vec<Planned> {
    use ExecuteErrorKind::{BadPayload, Handler, UnknownCapability};
    use PayloadEncoding::{Json, Raw};
    let total = 300.max(2 * keys.len());
    (0..total)
        .map(|i| {
            let echo = serde_json::json!({
                "seq": i,
                "from": "connector-host demo",
                "nested": {"list": [1, 2, 3], "ok": true},
            });
            let body = echo.to_string().into_bytes();
            let (capability, payload, encoding, expect) = match i {
                1 => ("fail", body, Json, Expect::Error(Handler)),
                // Checked by the SDK (JSON encoding) and by the connector (RAW).
                2 => (
                    "echo",
                    b"{not json".to_vec(),
                    Json,
                    Expect::Error(BadPayload),
                ),
                4 => (
                    "echo",
                    b"plain text".to_vec(),
                    Raw,
                    Expect::Error(BadPayload),
                ),
                3 => ("teleport", body, Json, Expect::Error(UnknownCapability)),
                5 => ("", body, Json, Expect::Json(echo)),
                i if i % 50 == 7 => ("fail", body, Json, Expect::Error(Handler)),
                i if i % 10 == 0 => {
                    let ms = 5 + (i / 10 % 5) as u64 * 5;
                    let payload = serde_json::json!({ "ms": ms }).to_string().into_bytes();
                    let result = serde_json::json!({ "slept_ms": ms });
                    ("sleep", payload, Json, Expect::Json(result))
                }
                _ => ("echo", body, Json, Expect::Json(echo)),
            };
            Planned {
                key: keys[i % keys.len()].clone(),
                request: ExecuteRequest {
                    request_id: format!("demo-{i}"),
                    payload: payload.into(),
                    encoding: encoding as i32,
                    capability_id: capability.into(),
                    timeout_ms: RESPONSE_TIMEOUT.as_millis() as u32,
                    ..Default::default()
                },
                expect,
            }
        })
        .collect()
}

/// `None` when the response is what `expect` says, else why not.
fn check(request_id: &str, expect: &Expect, response: &ExecuteResponse) -> Option<String> {
    if response.request_id != request_id {
        return Some(format!("answered as `{}`", response.request_id));
    }
    match expect {
        Expect::Json(want) => {
            if !response.success {
                return Some(format!(
                    "failed ({:?}): {}",
                    response.error_kind(),
                    response.error
                ));
            }
            match serde_json::from_slice::<serde_json::Value>(&response.payload) {
                Ok(got) if got == *want => None,
                Ok(got) => Some(format!("returned {got}, expected {want}")),
                Err(e) => Some(format!("returned a payload that is not JSON: {e}")),
            }
        }
        Expect::Error(kind) => {
            if response.success {
                Some(format!("succeeded; expected {}", kind.as_str_name()))
            } else if response.error_kind() != *kind {
                Some(format!(
                    "failed with {}; expected {}",
                    response.error_kind().as_str_name(),
                    kind.as_str_name()
                ))
            } else {
                None
            }
        }
    }
}

/// Progress of the workload: a live status line on a terminal, a plain line
/// every quarter otherwise.
struct Progress {
    total: usize,
    done: usize,
    unexpected: usize,
    tty: bool,
    quarters_shown: usize,
    last_draw: Option<std::time::Instant>,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            total,
            done: 0,
            unexpected: 0,
            tty: std::io::stdout().is_terminal(),
            quarters_shown: 0,
            last_draw: None,
        }
    }

    fn record(&mut self, as_expected: bool) {
        self.done += 1;
        if !as_expected {
            self.unexpected += 1;
        }
        let finished = self.done == self.total;
        if self.tty {
            // Redraw at most every 40 ms: the workload is faster than a
            // terminal wants to be written to.
            let due = self
                .last_draw
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(40));
            if due || finished {
                self.last_draw = Some(std::time::Instant::now());
                let width = 30;
                let filled = width * self.done / self.total.max(1);
                print!(
                    "\rworkload: [{}{}] {}/{} answered, {} unexpected",
                    "#".repeat(filled),
                    ".".repeat(width - filled),
                    self.done,
                    self.total,
                    self.unexpected
                );
                let _ = std::io::stdout().flush();
                if finished {
                    println!();
                }
            }
        } else {
            let quarter = 4 * self.done / self.total.max(1);
            if quarter > self.quarters_shown {
                self.quarters_shown = quarter;
                println!(
                    "workload: {}/{} answered ({}%), {} unexpected",
                    self.done,
                    self.total,
                    25 * quarter,
                    self.unexpected
                );
            }
        }
    }
}

/// Runs the workload; returns the descriptions of unexpected responses.
async fn drive_workload(engine: &TestServer, planned: Vec<Planned>) -> Vec<String> {
    type Answer = (String, Expect, Result<ExecuteResponse, TestkitError>);
    let mut progress = Progress::new(planned.len());
    let mut unexpected = Vec::new();
    let mut in_flight: tokio::task::JoinSet<Answer> = tokio::task::JoinSet::new();
    let mut on_answer = |(id, expect, answer): Answer, unexpected: &mut Vec<String>| {
        let problem = match answer {
            Ok(response) => check(&id, &expect, &response),
            Err(e) => Some(e.to_string()),
        };
        progress.record(problem.is_none());
        if let Some(p) = problem {
            unexpected.push(format!("{id}: {p}"));
        }
    };
    for p in planned {
        while in_flight.len() >= IN_FLIGHT {
            if let Some(Ok(answer)) = in_flight.join_next().await {
                on_answer(answer, &mut unexpected);
            }
        }
        let id = p.request.request_id.clone();
        let pending: Result<PendingExecute, TestkitError> = engine.send_execute(&p.key, p.request);
        match pending {
            Ok(pending) => {
                in_flight
                    .spawn(async move { (id, p.expect, pending.wait(RESPONSE_TIMEOUT).await) });
            }
            Err(e) => on_answer((id, p.expect, Err(e)), &mut unexpected),
        }
    }
    while let Some(joined) = in_flight.join_next().await {
        match joined {
            Ok(answer) => on_answer(answer, &mut unexpected),
            Err(e) => unexpected.push(format!("a workload task failed: {e}")),
        }
    }
    unexpected
}

/// What the demo needs from the program.
pub(crate) struct DemoInput<'a> {
    pub(crate) args: &'a Args,
    pub(crate) types: &'a ConnectorTypes,
    pub(crate) configured: Vec<RegistrationSpec>,
    pub(crate) shard: Option<Shard>,
    pub(crate) ops: Option<OpsEndpoint>,
}

pub(crate) async fn run_demo(
    input: DemoInput<'_>,
    options_for: impl Fn(&str) -> Result<MultiTransportOptions, Failure>,
) -> Result<(), Failure> {
    let DemoInput {
        args,
        types,
        configured,
        shard,
        ops,
    } = input;
    let built = match args.transport {
        DemoTransport::Grpc => cfg!(feature = "grpc"),
        DemoTransport::Ws => cfg!(feature = "ws"),
    };
    if !built {
        let feature = match args.transport {
            DemoTransport::Grpc => "grpc",
            DemoTransport::Ws => "ws",
        };
        return Err(Failure::Config(format!(
            "--transport {feature}: this connector-host was built without the `{feature}` \
             feature; build it with `cargo build --release -p connector-host --features {feature}`"
        )));
    }
    let hosted = hosted_share(&configured, shard, None).len();
    if let (0, Some(shard)) = (hosted, shard) {
        return Err(Failure::Config(format!(
            "shard {shard} owns none of the {} registrations: nothing to demo \
             (raise --count, or run without --shard)",
            args.count
        )));
    }
    let server = DemoServer::start(args.transport)
        .await
        .map_err(|e| Failure::Runtime(format!("cannot start the embedded test server: {e}")))?;
    let url = server.url();
    let options = options_for(&url)?;
    let runner = MultiConnectorRunner::new(Vec::new(), options.clone(), transport_for(&options));
    let host = Arc::new(Host::new(runner.clone(), types.clone(), shard));
    let changes = host.set_configured(configured).await;
    if changes.failed > 0 {
        return Err(Failure::Config(
            "a registration could not be added; see the log".into(),
        ));
    }
    if shard.is_some() {
        log_hosting(&url, shard, hosted, args.count as usize);
    }
    let keys: Vec<RegistrationKey> = runner.registrations();
    println!(
        "connector-host demo: {} echo connectors on an embedded {} test server at {url}",
        keys.len(),
        server.label()
    );
    let _ops = serve_ops(ops, &host, None);
    let mut run_task = {
        let runner = runner.clone();
        tokio::spawn(async move { runner.run().await })
    };
    let started = tokio::time::Instant::now();

    // 1. Every registration active, on both sides.
    let all_active = async {
        server
            .engine()
            .wait_for_active(keys.len(), ACTIVE_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        for key in &keys {
            let handle = runner.registration(key).ok_or("registration missing")?;
            let left = ACTIVE_TIMEOUT.saturating_sub(started.elapsed());
            if handle
                .wait_for(left, |s| *s == RegistrationState::Active)
                .await
                .is_none()
            {
                return Err(format!("{key} is {}", handle.state()));
            }
        }
        Ok::<(), String>(())
    };
    let active = tokio::select! {
        r = all_active => r,
        joined = &mut run_task => return Err(run_ended(joined)),
    };
    if let Err(why) = active {
        let summary = runner.summary();
        runner.shutdown_handle().shutdown();
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, &mut run_task).await;
        server.stop().await;
        return Err(Failure::Runtime(format!(
            "not every registration became active within {} s ({} of {} active; {why})",
            ACTIVE_TIMEOUT.as_secs(),
            summary.count("active"),
            keys.len()
        )));
    }
    println!(
        "registered: {0}/{0} active in {1} ms",
        keys.len(),
        started.elapsed().as_millis()
    );

    // 2. The workload, checked response by response.
    let planned = plan(&keys);
    let total = planned.len();
    let workload_started = tokio::time::Instant::now();
    let unexpected = drive_workload(server.engine(), planned).await;
    let workload_ms = workload_started.elapsed().as_millis();

    // 3. A heartbeat RTT for every row (heartbeats run every 500 ms here);
    //    waiting on the server's state changes, bounded. Missing RTTs are
    //    shown as `-`, not an error.
    let _ = server
        .engine()
        .wait_until(RTT_TIMEOUT, |_| {
            runner
                .metrics_snapshot()
                .values()
                .all(|m| m.last_heartbeat_rtt.is_some())
        })
        .await;

    // 4. Snapshot, then a graceful shutdown.
    let before = host.views();
    let connections = server.connection_count();
    let not_active: Vec<String> = before
        .iter()
        .filter(|v| v.state != "active")
        .map(|v| format!("{} is {}", v.key, v.state))
        .collect();
    let stop_started = tokio::time::Instant::now();
    runner.shutdown_handle().shutdown();
    let stopped = match tokio::time::timeout(SHUTDOWN_TIMEOUT, &mut run_task).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(other) => Err(match run_ended(other) {
            Failure::Config(m) | Failure::Runtime(m) => m,
        }),
        Err(_) => Err(format!(
            "the runner did not stop within {} s",
            SHUTDOWN_TIMEOUT.as_secs()
        )),
    };
    let stop_ms = stop_started.elapsed().as_millis();
    server.stop().await;

    // 5. The report.
    println!();
    print!(
        "{}",
        render_summary(&summary_rows(&before, &host.views()), connections)
    );
    if unexpected.is_empty() {
        println!(
            "workload: all {total} responses as expected in {workload_ms} ms \
             (echo, sleep, fail → HANDLER, bad JSON → BAD_PAYLOAD, \
             unknown capability → UNKNOWN_CAPABILITY)"
        );
    } else {
        println!(
            "workload: {} of {total} responses NOT as expected:",
            unexpected.len()
        );
        for u in unexpected.iter().take(10) {
            println!("  {u}");
        }
    }
    match &stopped {
        Ok(()) => println!("shutdown: graceful, {stop_ms} ms"),
        Err(e) => println!("shutdown: {e}"),
    }

    let mut problems = Vec::new();
    if !unexpected.is_empty() {
        problems.push(format!(
            "{} workload responses were not as expected",
            unexpected.len()
        ));
    }
    if !not_active.is_empty() {
        problems.push(format!(
            "not all registrations stayed active ({})",
            not_active.join(", ")
        ));
    }
    if let Err(e) = stopped {
        problems.push(e);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::Runtime(format!(
            "demo failed: {}",
            problems.join("; ")
        )))
    }
}
