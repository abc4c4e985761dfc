//! `connector-host`: hosts N echo connectors in one process through
//! `MultiConnectorRunner`.
//!
//! Without `--url` it is a self-contained demo: the testkit server runs
//! in-process on a free loopback port, the connectors register with it, the
//! server sends a short workload, and a summary table is printed. With
//! `--url` it runs against a real server until SIGINT/SIGTERM or
//! `--duration-secs`, then shuts down gracefully.
//!
//! Operating it: `--metrics-addr HOST:PORT` serves `/metrics` (Prometheus)
//! and `/ready` (see `examples::ops`); `--shard I/N`, or `--shards N` with
//! the ordinal at the end of `HOSTNAME`, hosts only this replica's share of
//! the registrations; every flag can also be set by a `CONNECTOR_HOST_…`
//! environment variable (listed by `--help`).
//!
//! Exit codes: 0 after a graceful stop, 1 when something went wrong at run
//! time (demo responses not as expected, every registration stopped on its
//! own), 2 for a configuration error (one line on stderr, never a panic).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use connector_core::proto::{ExecuteErrorKind, ExecuteRequest, ExecuteResponse, PayloadEncoding};
use connector_core::{
    validate_identifier, BaseConnector, ConnectorConfig, ConnectorError, ConnectorRegistration,
    MultiConnectorRunner, MultiTransportOptions, ProxySetting, RegistrationKey, RegistrationState,
    Shard,
};
use connector_testkit::{
    GrpcServerOptions, GrpcTestServer, PendingExecute, TestServer, TestkitError, WsServerOptions,
    WsTestServer,
};
use examples::ops::{OpsEndpoint, OpsServer};
use examples::{render_summary, transport_for, EchoConnector, SummaryRow};
use tokio::task::JoinHandle;

const AFTER_HELP: &str = "\
Echo capabilities (capability_id → result):
  echo (or empty)   the same JSON back
  sleep             {\"ms\": N}: waits N ms, then {\"slept_ms\": N}
  fail              a handler error (success = false, kind HANDLER)
  A payload that is not valid JSON gets BAD_PAYLOAD; any other id UNKNOWN_CAPABILITY.

Operating:
  --metrics-addr HOST:PORT serves GET /metrics (Prometheus text: the SDK's
  connector_client_* metrics and connector_host_registrations{state},
  connector_host_connections, connector_host_streams, connector_host_ready)
  and GET /ready (200 while every hosted registration is active, else 503).
  --shard I/N hosts only the registrations shard I of N owns; or --shards N
  (CONNECTOR_HOST_SHARDS) takes I from the -ORDINAL at the end of HOSTNAME, as
  in a StatefulSet pod. N replicas cover the registrations exactly once. A
  shard that owns none idles (ready) until SIGINT/SIGTERM.
  Every flag can also come from the environment variable shown beside it; a
  flag on the command line wins over its variable.

Exit codes: 0 after a graceful stop; 1 when the run failed (demo responses not
as expected, or every registration stopped on its own); 2 for a configuration
error (bad URL, bad identifier, unreadable CA file, bad shard, metrics address
not bindable), printed as one line.

Examples:
  connector-host                                    # demo on an embedded server
  connector-host --transport ws                     # the demo over WebSocket
  connector-host --url grpc://127.0.0.1:50051 --count 200
  connector-host --url wss://cp.example.com --ca-cert ca.pem --auth-token \"$TOKEN\"
  connector-host --url grpc://cp:50051 --count 3000 --shard 1/4 --metrics-addr 0.0.0.0:9090";

/// Hosts N echo connectors against a connector.v1 control plane.
#[derive(Debug, Parser)]
#[command(
    name = "connector-host",
    version,
    about = "Hosts N echo connectors against a connector.v1 control plane.",
    long_about = "Hosts N echo connectors in one process.\n\n\
        Without --url: a self-contained demo. A test server starts in this process on a \
        free loopback port, the connectors register with it, the server sends a short \
        workload of execute requests, and a summary table is printed (one row per \
        registration, then totals and the TCP connections used).\n\n\
        With --url: runs against that server until SIGINT or SIGTERM (graceful: in-flight \
        requests are answered, streams closed) or until --duration-secs passes, then \
        prints the same summary.",
    after_help = AFTER_HELP
)]
struct Args {
    /// Server to connect to: grpc://HOST:PORT, grpcs://HOST:PORT, ws://HOST:PORT or
    /// wss://HOST:PORT. Without it, the demo runs on an embedded test server.
    #[arg(long, value_name = "URL", env = "CONNECTOR_HOST_URL")]
    url: Option<String>,

    /// Number of registrations (instances P0 … P{N-1}).
    #[arg(long, value_name = "N", default_value_t = 3, env = "CONNECTOR_HOST_COUNT",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    count: u32,

    /// Tenant of every registration (1-128 of A-Z a-z 0-9 _ -).
    #[arg(
        long,
        value_name = "T",
        default_value = "demo",
        env = "CONNECTOR_HOST_TENANT"
    )]
    tenant: String,

    /// Connector type of every registration (1-128 of A-Z a-z 0-9 _ -).
    #[arg(
        long,
        value_name = "T",
        default_value = "echo",
        env = "CONNECTOR_HOST_CONNECTOR_TYPE"
    )]
    connector_type: String,

    /// Instance ids are P0, P1, … P{N-1} (each 1-128 of A-Z a-z 0-9 _ -).
    #[arg(
        long,
        value_name = "P",
        default_value = "echo-",
        env = "CONNECTOR_HOST_INSTANCE_PREFIX"
    )]
    instance_prefix: String,

    /// Bearer credential sent in `register` (default: empty). Never logged.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CONNECTOR_HOST_AUTH_TOKEN",
        hide_env_values = true
    )]
    auth_token: Option<String>,

    /// gRPC: streams one HTTP/2 connection carries before another is opened.
    #[arg(
        long,
        value_name = "K",
        default_value_t = 80,
        env = "CONNECTOR_HOST_MAX_STREAMS_PER_CHANNEL"
    )]
    max_streams_per_channel: usize,

    /// Execute requests each registration runs at once; more wait for a slot.
    #[arg(
        long,
        value_name = "K",
        default_value_t = 100,
        env = "CONNECTOR_HOST_MAX_CONCURRENT_REQUESTS"
    )]
    max_concurrent_requests: u32,

    /// Heartbeat period. The demo uses 500 ms unless this is given.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 30_000,
        env = "CONNECTOR_HOST_HEARTBEAT_INTERVAL_MS"
    )]
    heartbeat_interval_ms: u64,

    /// A stream with no server message for this long is dead and reconnected.
    /// The demo uses 5000 ms unless this is given.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 45_000,
        env = "CONNECTOR_HOST_HEARTBEAT_TIMEOUT_MS"
    )]
    heartbeat_timeout_ms: u64,

    /// Reconnect backoff base (doubles per failed attempt).
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 500,
        env = "CONNECTOR_HOST_RECONNECT_DELAY_MS"
    )]
    reconnect_delay_ms: u64,

    /// Reconnect backoff cap, jitter included.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 60_000,
        env = "CONNECTOR_HOST_MAX_BACKOFF_MS"
    )]
    max_backoff_ms: u64,

    /// Random extra delay added to each backoff.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 500,
        env = "CONNECTOR_HOST_JITTER_MS"
    )]
    jitter_ms: u64,

    /// A registration whose stream ends stops instead of reconnecting
    /// (variable: true/false, 1/0, yes/no, on/off).
    #[arg(long, env = "CONNECTOR_HOST_NO_RECONNECT",
          value_parser = clap::builder::BoolishValueParser::new())]
    no_reconnect: bool,

    /// Stop gracefully by itself after S seconds.
    #[arg(long, value_name = "S", env = "CONNECTOR_HOST_DURATION_SECS")]
    duration_secs: Option<u64>,

    /// Extra trusted CA certificate(s), PEM, for grpcs:// and wss://.
    #[arg(long, value_name = "PATH", env = "CONNECTOR_HOST_CA_CERT")]
    ca_cert: Option<PathBuf>,

    /// Tracing filter for the logs on stderr, e.g. `debug` or
    /// `info,connector_core=debug`. [default: info; RUST_LOG is used when
    /// this is not given]
    #[arg(long, value_name = "LEVEL", env = "CONNECTOR_HOST_LOG")]
    log: Option<String>,

    /// Kind of embedded test server for the demo (only used without --url).
    #[arg(long, value_enum, default_value_t = DemoTransport::Grpc, env = "CONNECTOR_HOST_TRANSPORT")]
    transport: DemoTransport,

    /// HTTP CONNECT proxy: `http://[USER:PASSWORD@]HOST:PORT`, or `none` for a
    /// direct connection. [default: HTTPS_PROXY for grpcs/wss, HTTP_PROXY
    /// for grpc/ws (or their lower-case forms), except hosts in NO_PROXY]
    #[arg(
        long,
        value_name = "URL|none",
        env = "CONNECTOR_HOST_PROXY",
        hide_env_values = true
    )]
    proxy: Option<String>,

    /// Serve GET /metrics (Prometheus text) and GET /ready (200 while every
    /// hosted registration is active, else 503) on this address, e.g.
    /// 0.0.0.0:9090 (port 0: any free port, logged at startup).
    #[arg(long, value_name = "HOST:PORT", env = "CONNECTOR_HOST_METRICS_ADDR",
          value_parser = parse_host_port)]
    metrics_addr: Option<String>,

    /// Host only the registrations that shard I of N owns (0 <= I < N):
    /// N replicas, one per shard, cover the registrations exactly once.
    #[arg(long, value_name = "I/N", env = "CONNECTOR_HOST_SHARD",
          value_parser = parse_shard)]
    shard: Option<Shard>,

    /// Number of replicas (shards) when --shard is not given: this
    /// replica's index is the ordinal at the end of HOSTNAME, as a
    /// StatefulSet pod's name `connector-host-3` is shard 3.
    #[arg(long, value_name = "N", env = "CONNECTOR_HOST_SHARDS",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    shards: Option<u32>,
}

/// `HOST:PORT` (a name, an IPv4 address or a bracketed IPv6 address, and a
/// port 0-65535); the name is resolved when binding.
fn parse_host_port(s: &str) -> Result<String, String> {
    let bad = || format!("{s:?}: expected HOST:PORT, e.g. 0.0.0.0:9090 or [::]:9090");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(bad());
    }
    Ok(s.to_string())
}

fn parse_shard(s: &str) -> Result<Shard, String> {
    s.parse::<Shard>().map_err(|e| match e {
        ConnectorError::InvalidConfig(m) => m,
        other => other.to_string(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DemoTransport {
    /// gRPC: all registrations share HTTP/2 connections.
    Grpc,
    /// WebSocket: one socket per registration.
    Ws,
}

/// Why the program stops without success.
#[derive(Debug)]
enum Failure {
    /// Exit 2: the configuration cannot work; one line.
    Config(String),
    /// Exit 1: something failed at run time.
    Runtime(String),
}

impl From<ConnectorError> for Failure {
    fn from(e: ConnectorError) -> Self {
        if e.is_config() {
            Failure::Config(e.to_string())
        } else {
            Failure::Runtime(e.to_string())
        }
    }
}

fn main() -> ExitCode {
    let (args, matches) = match parse_args() {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    if let Err(message) = init_logging(args.log.as_deref()) {
        return report(Failure::Config(message));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(Failure::Runtime(format!("cannot start the runtime: {e}"))),
    };
    let result = runtime.block_on(run(args, matches));
    // Background tasks (server connections, timers) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => report(failure),
    }
}

fn report(failure: Failure) -> ExitCode {
    match failure {
        Failure::Config(message) => {
            eprintln!("connector-host: error: {message}");
            ExitCode::from(2)
        }
        Failure::Runtime(message) => {
            eprintln!("connector-host: {message}");
            ExitCode::from(1)
        }
    }
}

/// Parses the command line. `--help`/`--version` print and exit 0; a usage
/// error is one line and exit 2, like every other configuration error.
fn parse_args() -> Result<(Args, ArgMatches), ExitCode> {
    let clap_error = |e: clap::Error| {
        use clap::error::ErrorKind;
        match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = e.print();
                ExitCode::SUCCESS
            }
            _ => {
                let text = e.render().to_string();
                let first = text.lines().next().unwrap_or("invalid arguments");
                let first = first.strip_prefix("error: ").unwrap_or(first);
                report(Failure::Config(format!("{first} (see --help)")))
            }
        }
    };
    let matches = Args::command().try_get_matches().map_err(clap_error)?;
    let args = Args::from_arg_matches(&matches).map_err(clap_error)?;
    Ok((args, matches))
}

/// Logs go to stderr: `--log` if given, else `RUST_LOG`, else `info`.
fn init_logging(level: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log {l:?}: {e}"))?,
        None => match std::env::var("RUST_LOG") {
            Ok(v) if !v.trim().is_empty() => {
                EnvFilter::try_new(&v).map_err(|e| format!("RUST_LOG {v:?}: {e}"))?
            }
            _ => EnvFilter::new("info"),
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Ok(())
}

async fn run(args: Args, matches: ArgMatches) -> Result<(), Failure> {
    // Everything that can be checked without a network is checked first, so
    // a bad flag never half-starts anything.
    validate_identities(&args)?;
    if let Some(path) = &args.ca_cert {
        check_ca_file(path)?;
    }
    let shard = resolve_shard(&args)?;
    match args.url.clone() {
        Some(url) => {
            let options = build_options(&args, &url, false, &matches)?;
            if args.ca_cert.is_some() && !options.endpoint.tls {
                tracing::warn!(
                    url = %options.endpoint,
                    "--ca-cert is ignored: the URL is not TLS (use grpcs:// or wss://)"
                );
            }
            if given(&matches, "transport") {
                tracing::warn!(
                    "--transport only selects the embedded demo server; \
                     with --url the URL scheme decides"
                );
            }
            let ops = bind_ops(&args).await?;
            run_remote(&args, options, shard, ops).await
        }
        None => {
            // Check the flag values now; the real URL is known once the
            // embedded server has bound its port.
            build_options(&args, "grpc://127.0.0.1:1", true, &matches)?;
            if args.ca_cert.is_some() {
                tracing::warn!(
                    "--ca-cert is ignored by the demo: its embedded server is plaintext"
                );
            }
            if args.proxy.is_some() {
                tracing::warn!("--proxy is ignored by the demo: its server is in this process");
            }
            let ops = bind_ops(&args).await?;
            run_demo(&args, &matches, shard, ops).await
        }
    }
}

/// Whether the flag `id` was given, on the command line or by its variable.
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// This replica's shard: `--shard I/N`, else `--shards N` with the ordinal
/// at the end of `HOSTNAME`, else none (every registration).
fn resolve_shard(args: &Args) -> Result<Option<Shard>, Failure> {
    if let Some(shard) = args.shard {
        if let Some(count) = args.shards.filter(|n| *n != shard.count()) {
            tracing::warn!(
                %shard,
                shards = count,
                "--shard is given, so --shards (CONNECTOR_HOST_SHARDS) is ignored"
            );
        }
        return Ok(Some(shard));
    }
    let Some(count) = args.shards else {
        return Ok(None);
    };
    let hostname = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .ok_or_else(|| {
            Failure::Config(format!(
                "--shards {count} (CONNECTOR_HOST_SHARDS) takes this replica's index from \
                 HOSTNAME, which is not set; set HOSTNAME=NAME-ORDINAL or use --shard I/{count}"
            ))
        })?;
    let shard = Shard::from_hostname(hostname.trim(), count).map_err(|e| {
        let why = match e {
            ConnectorError::InvalidConfig(m) => m,
            other => other.to_string(),
        };
        Failure::Config(format!(
            "--shards {count} (CONNECTOR_HOST_SHARDS) with HOSTNAME={hostname:?}: {why}"
        ))
    })?;
    Ok(Some(shard))
}

/// Binds `--metrics-addr` and installs the Prometheus recorder, before
/// anything connects (so no metric is missed and a bad address is a
/// configuration error).
async fn bind_ops(args: &Args) -> Result<Option<OpsEndpoint>, Failure> {
    let Some(addr) = &args.metrics_addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr.as_str())
        .await
        .map_err(|e| Failure::Config(format!("--metrics-addr {addr}: cannot listen: {e}")))?;
    let prometheus = examples::ops::install_recorder().map_err(Failure::Runtime)?;
    Ok(Some(OpsEndpoint::new(listener, prometheus)))
}

/// Starts serving `/metrics` and `/ready` for `runner`; the log line gives
/// the bound address (the real port when `--metrics-addr` asked for 0).
fn serve_ops(ops: Option<OpsEndpoint>, runner: &MultiConnectorRunner) -> Option<OpsServer> {
    let server = ops?.serve(runner.clone());
    tracing::info!(
        "metrics: listening on {} (GET /metrics, GET /ready)",
        server.local_addr()
    );
    Some(server)
}

/// Checks every identifier of every registration before any connection:
/// one bad registration out of N is reported as a configuration error.
fn validate_identities(args: &Args) -> Result<(), Failure> {
    let config = |m: ConnectorError| match m {
        ConnectorError::InvalidConfig(m) => Failure::Config(m),
        other => Failure::from(other),
    };
    validate_identifier("--tenant", &args.tenant).map_err(config)?;
    validate_identifier("--connector-type", &args.connector_type).map_err(config)?;
    for i in 0..args.count {
        let instance = format!("{}{i}", args.instance_prefix);
        validate_identifier("instance id (from --instance-prefix)", &instance).map_err(config)?;
    }
    Ok(())
}

/// An unreadable or certificate-less CA file is reported before connecting.
fn check_ca_file(path: &Path) -> Result<(), Failure> {
    let bytes = std::fs::read(path)
        .map_err(|e| Failure::Config(format!("--ca-cert: cannot read {}: {e}", path.display())))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN CERTIFICATE-----") {
        return Err(Failure::Config(format!(
            "--ca-cert: {} holds no PEM certificate (no -----BEGIN CERTIFICATE----- block)",
            path.display()
        )));
    }
    Ok(())
}

fn build_options(
    args: &Args,
    url: &str,
    demo: bool,
    matches: &ArgMatches,
) -> Result<MultiTransportOptions, Failure> {
    let given = |id: &str| given(matches, id);
    let ms = Duration::from_millis;
    // The demo wants heartbeat RTTs in its table after a second or two.
    let heartbeat_interval = if demo && !given("heartbeat_interval_ms") {
        ms(500)
    } else {
        ms(args.heartbeat_interval_ms)
    };
    let heartbeat_timeout = if demo && !given("heartbeat_timeout_ms") {
        ms(5_000)
    } else {
        ms(args.heartbeat_timeout_ms)
    };
    let mut builder = MultiTransportOptions::builder(url)
        .max_streams_per_channel(args.max_streams_per_channel)
        .max_concurrent_requests(args.max_concurrent_requests)
        .heartbeat_interval(heartbeat_interval)
        .heartbeat_timeout(heartbeat_timeout)
        .reconnect_delay(ms(args.reconnect_delay_ms))
        .max_backoff(ms(args.max_backoff_ms))
        .jitter(ms(args.jitter_ms))
        .reconnect(!args.no_reconnect);
    if let (Some(ca), false) = (&args.ca_cert, demo) {
        builder = builder.ca_cert(ca);
    }
    // The demo's server is in this process: never through a proxy.
    let proxy = match (&args.proxy, demo) {
        (_, true) => ProxySetting::Disabled,
        (Some(p), false) if p.trim().eq_ignore_ascii_case("none") => ProxySetting::Disabled,
        (Some(p), false) => ProxySetting::Url(p.trim().to_string()),
        (None, false) => ProxySetting::FromEnv,
    };
    builder = builder.proxy(proxy);
    builder.build().map_err(|e| match e {
        // The builder's message names the field; drop its generic prefix.
        ConnectorError::InvalidConfig(m) => Failure::Config(m),
        other => Failure::from(other),
    })
}

/// The registrations this process hosts: all `--count`, or the share of
/// `shard`.
fn registrations(args: &Args, shard: Option<Shard>) -> Result<Vec<ConnectorRegistration>, Failure> {
    // One connector value serves every registration: it is stateless.
    let echo: Arc<dyn BaseConnector> = Arc::new(EchoConnector::with_type(&args.connector_type));
    let all = (0..args.count)
        .map(|i| {
            let mut config = ConnectorConfig::builder(
                &args.tenant,
                &args.connector_type,
                format!("{}{i}", args.instance_prefix),
            );
            if let Some(token) = &args.auth_token {
                config = config.auth_token(token.clone());
            }
            Ok(ConnectorRegistration::from_arc(
                config.build()?,
                echo.clone(),
            ))
        })
        .collect::<Result<Vec<_>, ConnectorError>>()
        .map_err(Failure::from)?;
    Ok(all
        .into_iter()
        .filter(|r| shard.is_none_or(|s| s.owns(r.key())))
        .collect())
}

/// The log line saying what this process hosts.
fn log_hosting(endpoint: &str, shard: Option<Shard>, hosted: usize, count: u32) {
    match shard {
        Some(shard) => tracing::info!(
            %endpoint,
            "shard {shard}: hosting {hosted} of {count} registrations"
        ),
        None => tracing::info!(%endpoint, registrations = hosted, "hosting echo connectors"),
    }
}

/// The per-registration rows: counters from `now`, states from `states`
/// (taken before the shutdown, so they show how the run went rather than
/// `stopped`).
fn summary_rows(
    runner: &MultiConnectorRunner,
    states: &BTreeMap<RegistrationKey, RegistrationState>,
) -> Vec<SummaryRow> {
    let metrics = runner.metrics_snapshot();
    runner
        .registrations()
        .into_iter()
        .filter_map(|key| {
            let m = metrics.get(&key)?;
            let state = states.get(&key).unwrap_or(&m.state);
            Some(SummaryRow {
                address: key.to_string(),
                state: state.name().to_string(),
                ok: m.requests_succeeded,
                failed: m.requests_failed,
                reconnects: m.successful_reconnects,
                heartbeat_rtt: m.last_heartbeat_rtt,
            })
        })
        .collect()
}

fn states(runner: &MultiConnectorRunner) -> BTreeMap<RegistrationKey, RegistrationState> {
    runner
        .metrics_snapshot()
        .into_iter()
        .map(|(k, m)| (k, m.state))
        .collect()
}

fn print_stop_reasons(states: &BTreeMap<RegistrationKey, RegistrationState>) {
    for (key, state) in states {
        if let RegistrationState::Stopped(_) = state {
            println!("{key}: {state}");
        }
    }
}

fn spawn_run(runner: &MultiConnectorRunner) -> JoinHandle<Result<(), ConnectorError>> {
    let runner = runner.clone();
    tokio::spawn(async move { runner.run().await })
}

fn run_ended(joined: Result<Result<(), ConnectorError>, tokio::task::JoinError>) -> Failure {
    match joined {
        Ok(Ok(())) => Failure::Runtime("every registration has stopped; see the log".into()),
        Ok(Err(e)) => Failure::from(e),
        Err(e) => Failure::Runtime(format!("the runner task failed: {e}")),
    }
}

// ---------------------------------------------------------------------------
// With --url: run until a signal or --duration-secs.

/// SIGINT and SIGTERM (Ctrl-C elsewhere).
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, Failure> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let install = |kind: SignalKind| {
                signal(kind)
                    .map_err(|e| Failure::Runtime(format!("cannot install signal handler: {e}")))
            };
            Ok(Self {
                interrupt: install(SignalKind::interrupt())?,
                terminate: install(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next signal's name.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => "SIGINT",
                _ = self.terminate.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

/// Resolves after `--duration-secs`, or never.
async fn duration_elapsed(duration_secs: Option<u64>) {
    match duration_secs {
        Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
        None => std::future::pending().await,
    }
}

async fn run_remote(
    args: &Args,
    options: MultiTransportOptions,
    shard: Option<Shard>,
    ops: Option<OpsEndpoint>,
) -> Result<(), Failure> {
    let regs = registrations(args, shard)?;
    let hosted = regs.len();
    let endpoint = options.endpoint.to_string();
    let runner = MultiConnectorRunner::new(regs, options.clone(), transport_for(&options));
    // Installed before anything connects, so an early signal is not lost.
    let mut signals = Signals::install()?;
    // Serves until this function returns: `/ready` turns 503 while the
    // registrations drain at shutdown.
    let _ops = serve_ops(ops, &runner);
    log_hosting(&endpoint, shard, hosted, args.count);
    if hosted == 0 {
        return idle(args, &mut signals).await;
    }
    let mut run_task = spawn_run(&runner);
    let deadline = duration_elapsed(args.duration_secs);
    let reason = tokio::select! {
        joined = &mut run_task => {
            // Ended by itself: a configuration error (bad CA file), or every
            // registration stopped (rejected, or reconnect off).
            let failure = run_ended(joined);
            if matches!(failure, Failure::Runtime(_)) {
                let states = states(&runner);
                print!("{}", render_summary(&summary_rows(&runner, &states), 0));
                print_stop_reasons(&states);
            }
            return Err(failure);
        }
        signal = signals.recv() => signal,
        () = deadline => "--duration-secs elapsed",
    };
    tracing::info!("{reason}: shutting down gracefully (answering in-flight requests)");
    let at_stop = states(&runner);
    let connections = runner.summary().transport.open_connections();
    runner.shutdown_handle().shutdown();
    let joined = tokio::select! {
        joined = &mut run_task => joined,
        signal = signals.recv() => {
            return Err(Failure::Runtime(format!(
                "{signal} again: exiting without waiting for in-flight requests"
            )));
        }
    };
    match joined {
        Ok(Ok(())) => {}
        other => return Err(run_ended(other)),
    }
    print!(
        "{}",
        render_summary(&summary_rows(&runner, &at_stop), connections)
    );
    print_stop_reasons(&at_stop);
    println!("stopped gracefully ({reason})");
    Ok(())
}

/// A shard that owns none of the registrations: nothing to connect, ready,
/// until a signal or `--duration-secs`. Idling (rather than exiting) keeps a
/// StatefulSet replica from crash-looping when there are fewer
/// registrations than replicas; it takes registrations as soon as `--count`
/// grows and it is restarted.
async fn idle(args: &Args, signals: &mut Signals) -> Result<(), Failure> {
    tracing::info!(
        "this shard owns none of the {} registrations: idle until SIGINT or SIGTERM",
        args.count
    );
    let reason = tokio::select! {
        signal = signals.recv() => signal,
        () = duration_elapsed(args.duration_secs) => "--duration-secs elapsed",
    };
    print!("{}", render_summary(&[], 0));
    println!("stopped gracefully ({reason})");
    Ok(())
}

// ---------------------------------------------------------------------------
// Without --url: the demo on an embedded test server.

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
    Grpc(GrpcTestServer),
    Ws(WsTestServer),
}

impl DemoServer {
    async fn start(kind: DemoTransport) -> Result<Self, TestkitError> {
        Ok(match kind {
            DemoTransport::Grpc => Self::Grpc(
                GrpcTestServer::start(TestServer::new(), GrpcServerOptions::default()).await?,
            ),
            DemoTransport::Ws => {
                Self::Ws(WsTestServer::start(TestServer::new(), WsServerOptions::default()).await?)
            }
        })
    }

    fn url(&self) -> String {
        match self {
            Self::Grpc(s) => s.url(),
            Self::Ws(s) => s.url(),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Grpc(_) => "gRPC",
            Self::Ws(_) => "WebSocket",
        }
    }

    fn engine(&self) -> &TestServer {
        match self {
            Self::Grpc(s) => s.engine(),
            Self::Ws(s) => s.engine(),
        }
    }

    fn connection_count(&self) -> usize {
        match self {
            Self::Grpc(s) => s.connection_count(),
            Self::Ws(s) => s.connection_count(),
        }
    }

    /// Stops the server once the client has closed its connections (bounded):
    /// stopping earlier would cut a WebSocket close handshake still under way
    /// and make the client log a lost socket.
    async fn stop(&self) {
        let closed = match self {
            Self::Grpc(s) => s.wait_for_connection_count(0, CLOSE_TIMEOUT).await,
            Self::Ws(s) => s.wait_for_connection_count(0, CLOSE_TIMEOUT).await,
        };
        if let Err(e) = closed {
            tracing::debug!("stopping the test server with connections open: {e}");
        }
        match self {
            Self::Grpc(s) => s.stop().await,
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
    key: String,
    request: ExecuteRequest,
    expect: Expect,
}

/// The workload: mostly `echo`, every tenth a short `sleep`, a few `fail`,
/// and one each of bad JSON, a non-JSON RAW payload, an unknown capability
/// and an empty capability id.
fn plan(keys: &[String]) -> Vec<Planned> {
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

async fn run_demo(
    args: &Args,
    matches: &ArgMatches,
    shard: Option<Shard>,
    ops: Option<OpsEndpoint>,
) -> Result<(), Failure> {
    let regs = registrations(args, shard)?;
    if let (true, Some(shard)) = (regs.is_empty(), shard) {
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
    let options = build_options(args, &url, true, matches)?;
    if shard.is_some() {
        log_hosting(&url, shard, regs.len(), args.count);
    }
    let keys: Vec<RegistrationKey> = regs.iter().map(|r| r.key().clone()).collect();
    let addresses: Vec<String> = keys.iter().map(ToString::to_string).collect();
    println!(
        "connector-host demo: {} echo connectors on an embedded {} test server at {url}",
        keys.len(),
        server.label()
    );
    let runner = MultiConnectorRunner::new(regs, options.clone(), transport_for(&options));
    let _ops = serve_ops(ops, &runner);
    let mut run_task = spawn_run(&runner);
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
    let planned = plan(&addresses);
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
    let at_stop = states(&runner);
    let connections = server.connection_count();
    let not_active: Vec<String> = at_stop
        .iter()
        .filter(|(_, s)| **s != RegistrationState::Active)
        .map(|(k, s)| format!("{k} is {s}"))
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
        render_summary(&summary_rows(&runner, &at_stop), connections)
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
