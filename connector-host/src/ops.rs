//! The operations endpoint of `--metrics-addr HOST:PORT`, on hyper
//! (HTTP/1.1, keep-alive).
//!
//! | path | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text (0.0.4) of everything recorded through the `metrics` facade, host gauges refreshed per scrape |
//! | `GET /ready` | 200 while every hosted registration that is not paused is active (and, in a fleet, the replica is joined), else 503 |
//! | `GET /livez` | 200 while the runtime serves |
//! | `GET /registrations` | 200, JSON array, one object per hosted registration |
//!
//! `HEAD` works too; another method is `405`, another path `404`. Each
//! connection is its own task with no global slot limit, so idle or slow
//! clients cannot starve a probe: a client that does not finish its request
//! head within [`HEADER_READ_TIMEOUT`] is closed, and hyper bounds the
//! buffered request to [`MAX_REQUEST_BUFFER`] bytes. Request bodies are never
//! read.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use connector_core::{metric_names, RegistrationState};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::hosting::{Counts, Host};

/// Something besides the registrations that `/ready` waits for: a fleet's
/// membership. `Ok(note)` when ready (the note goes into the body),
/// `Err(why)` when not.
pub(crate) type ReadyGate = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Host-level metric names (facade form; Prometheus shows `_` for `.`).
pub(crate) mod names {
    /// Gauge: hosted registrations in each state, label `state`.
    pub(crate) const REGISTRATIONS: &str = "connector.host.registrations";
    /// Gauge: open transport connections.
    pub(crate) const CONNECTIONS: &str = "connector.host.connections";
    /// Gauge: logical streams across all connections.
    pub(crate) const STREAMS: &str = "connector.host.streams";
    /// Gauge: 1 while `/ready` answers 200, else 0.
    pub(crate) const READY: &str = "connector.host.ready";
    /// Counter: config reloads, label `outcome` = `ok` / `failed`.
    pub(crate) const CONFIG_RELOADS: &str = "connector.host.config_reloads_total";
}

/// How long a client may take to send a request head.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The most a connection's read buffer holds (request line and headers).
pub(crate) const MAX_REQUEST_BUFFER: usize = 16 * 1024;

/// Histogram buckets, in seconds (execute duration, heartbeat RTT): from
/// 0.5 ms to 1 min, so the histograms of N replicas can be summed.
const SECONDS_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The process's Prometheus recorder: installed on first use, then shared
/// (a library user may run the host more than once in a process).
fn recorder() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&SECONDS_BUCKETS)
                .map_err(|e| format!("metrics: bad histogram buckets: {e}"))?
                .install_recorder()
                .map_err(|e| format!("metrics: cannot install the Prometheus recorder: {e}"))?;
            describe();
            Ok(handle)
        })
        .clone()
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
        "1 while every hosted registration that is not paused is Active, else 0."
    );
    describe_counter!(
        names::CONFIG_RELOADS,
        "Config file reloads (SIGHUP), by outcome."
    );
    #[cfg(feature = "etcd")]
    {
        use crate::fleet::{METRIC_FLEET_MEMBERS, METRIC_FLEET_MOVES, METRIC_FLEET_OWNED};
        describe_gauge!(
            METRIC_FLEET_MEMBERS,
            "Live members of the fleet as this replica sees them (0 while not joined)."
        );
        describe_gauge!(
            METRIC_FLEET_OWNED,
            "Registrations this replica owns (holds the ownership key of) in the fleet."
        );
        describe_counter!(
            METRIC_FLEET_MOVES,
            "Ownership changes at this replica, by direction (acquired, released)."
        );
    }
}

/// Counts one reload (`ok` or `failed`).
pub(crate) fn count_reload(ok: bool) {
    metrics::counter!(names::CONFIG_RELOADS, "outcome" => if ok { "ok" } else { "failed" })
        .increment(1);
}

/// Sets the host-level gauges from the host's counts.
fn record_host_gauges(host: &Host, counts: &Counts, gate_ok: bool) {
    // Every state name, always, so a state that empties drops to 0 instead
    // of keeping its last value: the core's, plus the host's own "paused".
    for state in RegistrationState::NAMES.into_iter().chain(["paused"]) {
        metrics::gauge!(names::REGISTRATIONS, "state" => state).set(counts.count(state) as f64);
    }
    let transport = host.runner().summary().transport;
    metrics::gauge!(names::CONNECTIONS).set(transport.open_connections() as f64);
    metrics::gauge!(names::STREAMS).set(transport.open_streams() as f64);
    let ready = gate_ok && counts.ready();
    metrics::gauge!(names::READY).set(if ready { 1.0 } else { 0.0 });
}

/// A bound listener and the recorder it serves; see [`OpsEndpoint::serve`].
#[derive(Debug)]
pub(crate) struct OpsEndpoint {
    listener: TcpListener,
    prometheus: PrometheusHandle,
}

impl OpsEndpoint {
    /// Binds `addr` and installs the recorder (before anything connects, so
    /// no metric is missed and a bad address is a configuration error).
    pub(crate) async fn bind(addr: &str) -> Result<Self, BindError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| BindError::Config(format!("--metrics-addr {addr}: cannot listen: {e}")))?;
        let prometheus = recorder().map_err(BindError::Runtime)?;
        Ok(Self {
            listener,
            prometheus,
        })
    }

    /// Serves the routes for `host` until the returned server is dropped;
    /// `/ready` also waits for `gate`, if any.
    pub(crate) fn serve(self, host: Arc<Host>, gate: Option<ReadyGate>) -> OpsServer {
        let local_addr = self
            .listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let ctx = Arc::new(Ctx {
            prometheus: self.prometheus,
            host,
            gate,
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
        tracing::info!(
            "metrics: listening on {local_addr} (GET /metrics, /ready, /livez, /registrations)"
        );
        OpsServer {
            local_addr,
            tasks: [accept, upkeep],
        }
    }
}

/// Why binding failed: a configuration error (exit 2) or not.
#[derive(Debug)]
pub(crate) enum BindError {
    Config(String),
    Runtime(String),
}

/// The running endpoint; dropping it stops accepting.
#[derive(Debug)]
pub(crate) struct OpsServer {
    local_addr: SocketAddr,
    tasks: [JoinHandle<()>; 2],
}

impl OpsServer {
    #[allow(dead_code, reason = "used by tests and logged at start")]
    pub(crate) fn local_addr(&self) -> SocketAddr {
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
    host: Arc<Host>,
    gate: Option<ReadyGate>,
}

impl Ctx {
    fn gate(&self) -> Result<Option<String>, String> {
        self.gate.as_ref().map(|g| g()).transpose()
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BUFFER)
        // A client that half-closes after its request (`printf … | nc`)
        // still gets its answer; without this hyper may see the EOF first
        // and drop the connection unanswered.
        .half_close(true)
        .keep_alive(true);
    let http = Arc::new(http);
    loop {
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
        let http = http.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(respond(&req, &ctx)) }
            });
            if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "metrics: connection ended with an error");
            }
        });
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    Ready,
    Livez,
    Registrations,
}

/// The route of a path, and whether the method is allowed on it.
fn route(method: &Method, path: &str) -> Result<Route, StatusCode> {
    let route = match path {
        "/metrics" => Route::Metrics,
        "/ready" => Route::Ready,
        "/livez" => Route::Livez,
        "/registrations" => Route::Registrations,
        _ => return Err(StatusCode::NOT_FOUND),
    };
    if method == Method::GET || method == Method::HEAD {
        Ok(route)
    } else {
        Err(StatusCode::METHOD_NOT_ALLOWED)
    }
}

fn respond(req: &Request<Incoming>, ctx: &Ctx) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    let (status, content_type, body) = match route(req.method(), req.uri().path()) {
        Err(status) => (
            status,
            "text/plain; charset=utf-8",
            format!("{}\n", status.canonical_reason().unwrap_or("")),
        ),
        Ok(Route::Livez) => (StatusCode::OK, "text/plain; charset=utf-8", "live\n".into()),
        Ok(Route::Ready) => {
            let counts = ctx.host.counts();
            match ctx.gate() {
                Err(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    format!("not ready: {why}\n"),
                ),
                Ok(note) if counts.ready() => (
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    format!(
                        "ready: {} of {} active ({} paused){}\n",
                        counts.active,
                        counts.expected,
                        counts.paused,
                        note.map(|n| format!("; {n}")).unwrap_or_default()
                    ),
                ),
                Ok(_) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    format!(
                        "not ready: {} of {} registrations not active\n",
                        counts.expected - counts.active.min(counts.expected),
                        counts.expected
                    ),
                ),
            }
        }
        Ok(Route::Metrics) => {
            record_host_gauges(&ctx.host, &ctx.host.counts(), ctx.gate().is_ok());
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                ctx.prometheus.render(),
            )
        }
        Ok(Route::Registrations) => match serde_json::to_string(&ctx.host.views()) {
            Ok(json) => (StatusCode::OK, "application/json", json),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                format!("{e}\n"),
            ),
        },
    };
    let mut response = Response::new(Full::new(if head {
        Bytes::new()
    } else {
        Bytes::from(body)
    }));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_method_and_path() {
        assert_eq!(route(&Method::GET, "/metrics"), Ok(Route::Metrics));
        assert_eq!(route(&Method::HEAD, "/ready"), Ok(Route::Ready));
        assert_eq!(route(&Method::GET, "/livez"), Ok(Route::Livez));
        assert_eq!(
            route(&Method::GET, "/registrations"),
            Ok(Route::Registrations)
        );
        assert_eq!(
            route(&Method::POST, "/ready"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(route(&Method::GET, "/"), Err(StatusCode::NOT_FOUND));
        assert_eq!(route(&Method::GET, "/ready/x"), Err(StatusCode::NOT_FOUND));
    }
}
