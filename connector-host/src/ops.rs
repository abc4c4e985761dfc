//! The operations endpoint of `connector-host --metrics-addr HOST:PORT`: a
//! tiny HTTP/1.1 server with two routes.
//!
//! - `GET /metrics`: the Prometheus text format (version 0.0.4) of every
//!   metric recorded through the `metrics` facade: the SDK's per-registration
//!   `connector.client.*` metrics (dots become underscores, so
//!   `connector_client_executes`) and the host-level gauges of [`names`],
//!   refreshed from [`MultiConnectorRunner::summary`] on every scrape.
//! - `GET /ready`: `200 ready` while every hosted registration is Active,
//!   else `503` with how many are not (see [`Readiness`]).
//!
//! `HEAD` works on both; another method on them is `405`, another path
//! `404`, a malformed or oversized request `400`/`431`. Each connection
//! serves one request and is closed (`Connection: close`). Reading is
//! bounded in size ([`MAX_REQUEST_HEAD`]) and time, and at most
//! [`MAX_CONNECTIONS`] are served at once, so a bad client costs little.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use connector_core::{metric_names, MultiConnectorRunner, RunnerSummary};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Host-level metric names (facade form; Prometheus shows `_` for `.`).
pub mod names {
    /// Gauge: hosted registrations in each state, label `state`
    /// (`idle`, `connecting`, `registering`, `pending`, `active`,
    /// `draining`, `backoff`, `stopped`); every state is always present.
    pub const REGISTRATIONS: &str = "connector.host.registrations";
    /// Gauge: open transport connections (HTTP/2 connections for gRPC,
    /// sockets for WebSocket).
    pub const CONNECTIONS: &str = "connector.host.connections";
    /// Gauge: logical streams across all connections.
    pub const STREAMS: &str = "connector.host.streams";
    /// Gauge: 1 while `/ready` answers 200, else 0.
    pub const READY: &str = "connector.host.ready";
}

/// The state names [`names::REGISTRATIONS`] always reports, so a state that
/// empties drops to 0 instead of keeping its last value.
pub const STATES: [&str; 8] = [
    "idle",
    "connecting",
    "registering",
    "pending",
    "active",
    "draining",
    "backoff",
    "stopped",
];

/// The longest request head (request line and headers) read, in bytes;
/// longer gets `431`.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing a response may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Histogram buckets, in seconds (execute duration, heartbeat RTT): from
/// 0.5 ms to 1 min. Buckets rather than the exporter's default summaries,
/// so the histograms of N replicas can be summed in Prometheus.
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Installs the Prometheus recorder as the process's global `metrics`
/// recorder (once per process) and describes every metric, so `/metrics`
/// carries `# HELP` lines.
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&SECONDS_BUCKETS)
        .map_err(|e| format!("metrics: bad histogram buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("metrics: cannot install the Prometheus recorder: {e}"))?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        metric_names::CONNECTION_ATTEMPTS,
        "Stream open attempts per registration, by outcome (succeeded, failed)."
    );
    describe_counter!(
        metric_names::DISCONNECTIONS,
        "Streams lost per registration, by cause."
    );
    describe_counter!(
        metric_names::EXECUTES,
        "Execute requests answered per registration, by outcome (success or the error kind)."
    );
    describe_histogram!(
        metric_names::EXECUTE_DURATION,
        Unit::Seconds,
        "Time from execute_request received to response made."
    );
    describe_histogram!(
        metric_names::HEARTBEAT_RTT,
        Unit::Seconds,
        "Heartbeat round trip."
    );
    describe_counter!(
        metric_names::PROTOCOL_ERRORS,
        "Malformed or unexpected server messages per registration."
    );
    describe_gauge!(
        metric_names::ACTIVE,
        "1 while the registration is Active, else 0."
    );
    describe_gauge!(
        names::REGISTRATIONS,
        "Registrations hosted by this process, by state."
    );
    describe_gauge!(names::CONNECTIONS, "Open transport connections.");
    describe_gauge!(
        names::STREAMS,
        "Logical streams (one per connected registration) across all connections."
    );
    describe_gauge!(
        names::READY,
        "1 while every hosted registration is Active (/ready answers 200), else 0."
    );
}

/// Sets the host-level gauges of [`names`] from a runner summary.
pub fn record_host_gauges(summary: &RunnerSummary) {
    for state in STATES {
        metrics::gauge!(names::REGISTRATIONS, "state" => state).set(summary.count(state) as f64);
    }
    // A state added to the SDK later still shows up.
    for (state, n) in &summary.by_state {
        if !STATES.contains(state) {
            metrics::gauge!(names::REGISTRATIONS, "state" => *state).set(*n as f64);
        }
    }
    metrics::gauge!(names::CONNECTIONS).set(summary.transport.open_connections() as f64);
    metrics::gauge!(names::STREAMS).set(summary.transport.open_streams() as f64);
    let ready = Readiness::of(summary).is_ready();
    metrics::gauge!(names::READY).set(if ready { 1.0 } else { 0.0 });
}

/// The `/ready` rule: ready while **every hosted registration is Active**.
///
/// Whatever is not Active counts against it: still connecting, pending
/// approval, backing off after a lost stream, draining during shutdown, and
/// stopped for good (rejected by the server, or ended with reconnect off).
/// A rejected registration therefore keeps the replica unready until its
/// configuration is fixed: it should be Active and is not. A replica that
/// hosts no registration (a shard that owns none) is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Registrations hosted.
    pub hosted: usize,
    /// Of those, Active now.
    pub active: usize,
}

impl Readiness {
    /// The readiness of a runner, from its summary.
    pub fn of(summary: &RunnerSummary) -> Self {
        Self {
            hosted: summary.registrations,
            active: summary.count("active"),
        }
    }

    /// True while every hosted registration is Active.
    pub fn is_ready(&self) -> bool {
        self.active >= self.hosted
    }

    /// How many are not Active.
    pub fn not_active(&self) -> usize {
        self.hosted.saturating_sub(self.active)
    }
}

/// A request the endpoint can answer, from its request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET`/`HEAD /metrics`.
    Metrics {
        /// `HEAD`: headers only.
        head: bool,
    },
    /// `GET`/`HEAD /ready`.
    Ready {
        /// `HEAD`: headers only.
        head: bool,
    },
    /// A known path with another method: `405`.
    MethodNotAllowed,
    /// Another path: `404`.
    NotFound,
    /// Not an HTTP/1.x request line: `400`.
    BadRequest,
}

impl Route {
    /// Routes a request head (request line first, as sent). Never panics.
    pub fn of(head: &[u8]) -> Self {
        let line_end = head.iter().position(|b| *b == b'\n').unwrap_or(head.len());
        let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
            return Self::BadRequest;
        };
        let mut parts = line.trim_end_matches('\r').split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Self::BadRequest;
        };
        let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphabetic());
        if !token(method) || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
            return Self::BadRequest;
        }
        let path = target.split(['?', '#']).next().unwrap_or(target);
        let head = match method {
            "GET" => Some(false),
            "HEAD" => Some(true),
            _ => None,
        };
        match (path, head) {
            ("/metrics", Some(head)) => Self::Metrics { head },
            ("/ready", Some(head)) => Self::Ready { head },
            ("/metrics" | "/ready", None) => Self::MethodNotAllowed,
            _ => Self::NotFound,
        }
    }
}

/// A bound listener and the recorder it serves; see [`OpsEndpoint::serve`].
pub struct OpsEndpoint {
    listener: TcpListener,
    prometheus: PrometheusHandle,
}

impl fmt::Debug for OpsEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpsEndpoint")
            .field("local_addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl OpsEndpoint {
    /// An endpoint on `listener` rendering `prometheus`.
    pub fn new(listener: TcpListener, prometheus: PrometheusHandle) -> Self {
        Self {
            listener,
            prometheus,
        }
    }

    /// The address bound (with the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Starts serving `/metrics` and `/ready` for `runner` on the current
    /// tokio runtime. Also runs the recorder's upkeep every few seconds.
    /// Stops when the returned [`OpsServer`] is dropped.
    pub fn serve(self, runner: MultiConnectorRunner) -> OpsServer {
        let local_addr = self
            .listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let ctx = Arc::new(Ctx {
            prometheus: self.prometheus,
            runner,
        });
        let upkeep = {
            let prometheus = ctx.prometheus.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    prometheus.run_upkeep();
                }
            })
        };
        let accept = tokio::spawn(accept_loop(self.listener, ctx));
        OpsServer {
            local_addr,
            tasks: [accept, upkeep],
        }
    }
}

/// The running endpoint; dropping it stops accepting (requests being
/// answered finish on their own, bounded by the write timeout).
#[derive(Debug)]
pub struct OpsServer {
    local_addr: SocketAddr,
    tasks: [JoinHandle<()>; 2],
}

impl OpsServer {
    /// The address served.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Ctx {
    prometheus: PrometheusHandle,
    runner: MultiConnectorRunner,
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of
                // spinning, then go on.
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, &ctx).await {
                tracing::debug!(error = %e, "metrics: connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// Why a request head could not be read.
enum HeadError {
    TooLarge,
    /// The client stopped sending (half-closed) before the blank line;
    /// what it sent.
    Incomplete(Vec<u8>),
}

/// Reads until the blank line ending the head, at most [`MAX_REQUEST_HEAD`]
/// bytes.
async fn read_head(stream: &mut TcpStream) -> io::Result<Result<Vec<u8>, HeadError>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(HeadError::Incomplete(buf)));
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        let tail = &buf[scan_from..];
        if tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n") {
            return Ok(Ok(buf));
        }
        if buf.len() >= MAX_REQUEST_HEAD {
            return Ok(Err(HeadError::TooLarge));
        }
    }
}

async fn serve_connection(mut stream: TcpStream, ctx: &Ctx) -> io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()), // A client that sends nothing gets nothing.
    };
    let response = match head {
        Ok(head) => respond(Route::of(&head), ctx),
        Err(HeadError::TooLarge) => Response::text(431, "request head too large\n"),
        // Nothing sent at all (a TCP probe): nothing to answer.
        Err(HeadError::Incomplete(sent)) if sent.is_empty() => return Ok(()),
        // A complete request line is enough (`printf 'GET /ready HTTP/1.0\n' | nc`).
        Err(HeadError::Incomplete(sent)) if sent.contains(&b'\n') => respond(Route::of(&sent), ctx),
        Err(HeadError::Incomplete(_)) => Response::text(400, "bad request\n"),
    };
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response.to_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client may still send (a body we ignored) so the
        // close does not reset the connection before it reads the answer.
        let mut sink = [0u8; 1024];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
        Ok::<(), io::Error>(())
    })
    .await
    .unwrap_or(Ok(()))
}

/// One response, always `Connection: close`.
struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    head_only: bool,
    allow: bool,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            head_only: false,
            allow: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if self.allow {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

fn respond(route: Route, ctx: &Ctx) -> Response {
    match route {
        Route::Metrics { head } => {
            record_host_gauges(&ctx.runner.summary());
            ctx.prometheus.run_upkeep();
            Response {
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                head_only: head,
                ..Response::text(200, ctx.prometheus.render())
            }
        }
        Route::Ready { head } => {
            let summary = ctx.runner.summary();
            let readiness = Readiness::of(&summary);
            let mut response = if readiness.is_ready() {
                Response::text(200, "ready\n")
            } else {
                let states: Vec<String> = summary
                    .by_state
                    .iter()
                    .filter(|(state, n)| **state != "active" && **n > 0)
                    .map(|(state, n)| format!("{n} {state}"))
                    .collect();
                Response::text(
                    503,
                    format!(
                        "not ready: {} of {} registrations not active ({})\n",
                        readiness.not_active(),
                        readiness.hosted,
                        states.join(", ")
                    ),
                )
            };
            response.head_only = head;
            response
        }
        Route::MethodNotAllowed => Response {
            allow: true,
            ..Response::text(405, "method not allowed: use GET or HEAD\n")
        },
        Route::NotFound => Response::text(404, "not found: try /metrics or /ready\n"),
        Route::BadRequest => Response::text(400, "bad request\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_method_and_path() {
        let r = |s: &str| Route::of(s.as_bytes());
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            r("HEAD /metrics HTTP/1.0\r\n\r\n"),
            Route::Metrics { head: true }
        );
        assert_eq!(
            r("GET /ready?verbose=1 HTTP/1.1\r\n\r\n"),
            Route::Ready { head: false }
        );
        assert_eq!(r("GET /ready HTTP/1.1\n\n"), Route::Ready { head: false });
        assert_eq!(r("POST /ready HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
        assert_eq!(r("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /metrics/x HTTP/1.1\r\n\r\n"), Route::NotFound);
    }

    #[test]
    fn malformed_request_lines_are_bad_requests() {
        for bad in [
            &b""[..],
            b"\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"G\xffT /metrics HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            assert_eq!(Route::of(bad), Route::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn ready_only_when_every_hosted_registration_is_active() {
        let summary = |states: &[(&'static str, usize)]| {
            let mut s = RunnerSummary::default();
            for (state, n) in states {
                s.by_state.insert(state, *n);
                s.registrations += n;
            }
            s
        };
        let ready = |states: &[(&'static str, usize)]| Readiness::of(&summary(states)).is_ready();
        assert!(ready(&[("active", 5)]));
        assert!(ready(&[]), "a shard that hosts nothing is ready");
        assert!(!ready(&[("active", 4), ("stopped", 1)]));
        assert!(!ready(&[("active", 4), ("backoff", 1)]));
        assert!(!ready(&[("draining", 5)]));
        assert_eq!(
            Readiness::of(&summary(&[("active", 3), ("pending", 2)])).not_active(),
            2
        );
    }

    #[test]
    fn responses_are_complete_http_messages() {
        let r = Response::text(404, "nope\n");
        let text = String::from_utf8(r.to_bytes()).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Content-Length: 5\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nnope\n"), "{text}");
        let head = Response {
            head_only: true,
            ..Response::text(200, "ready\n")
        };
        let text = String::from_utf8(head.to_bytes()).expect("utf-8");
        assert!(text.contains("Content-Length: 6\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }
}
