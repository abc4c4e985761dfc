//! The program: flags (and `--config`) → settings → a [`Host`] over a
//! `MultiConnectorRunner` → run until a signal (reloading on SIGHUP), or the
//! demo on an embedded server when there is no URL.
//!
//! Exit codes: 0 after a graceful stop, 1 when something went wrong at run
//! time, 2 for a configuration error (one line on stderr, never a panic).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::ArgMatches;
use connector_core::{
    validate_identifier, ConnectorError, MultiConnectorRunner, MultiTransportOptions, ProxySetting,
    RegistrationKey, Shard,
};
use tokio::task::JoinHandle;

use crate::cli::{self, given, Args};
use crate::config::{plain, ConfigFile, Loader, RegistrationSpec, TokenSource, TopLevel};
use crate::hosting::{Changes, Host, RegistrationView};
use crate::ops::{BindError, OpsEndpoint, OpsServer, ReadyGate};
use crate::summary::{render_summary, SummaryRow};
use crate::transport::select_transport;
use crate::ConnectorTypes;

/// Why the program stops without success.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Exit 2: the configuration cannot work; one line.
    Config(String),
    /// Exit 1: something failed at run time.
    Runtime(String),
}

impl From<ConnectorError> for Failure {
    fn from(e: ConnectorError) -> Self {
        if e.is_config() {
            Failure::Config(plain(e))
        } else {
            Failure::Runtime(e.to_string())
        }
    }
}

/// A future that asks the host to stop (besides signals); for embedding.
pub(crate) type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Everything settled before the runtime starts.
struct Prepared {
    args: Args,
    matches: ArgMatches,
    types: ConnectorTypes,
    /// `--config`: the file, as read at start-up.
    file: Option<(PathBuf, ConfigFile)>,
    /// Settings the file gave (so the demo's defaults do not override them).
    from_file: Vec<&'static str>,
}

pub(crate) fn main(types: ConnectorTypes, argv: Vec<OsString>) -> ExitCode {
    let prepared = match prepare(types, argv) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(Failure::Runtime(format!("cannot start the runtime: {e}"))),
    };
    // Inside the runtime: an OTLP exporter's channel lives on it.
    let exporter = match runtime.block_on(async { init_logging(&prepared.args) }) {
        Ok(exporter) => exporter,
        Err(message) => return report(Failure::Config(message)),
    };
    let result = runtime.block_on(run(prepared, None));
    runtime.block_on(async { exporter.shutdown() });
    // Background tasks (server connections, timers) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    finish(result)
}

/// As [`main`], on the caller's runtime, also stopping when `stop` resolves.
/// Logging is installed only if no global subscriber is set yet.
pub(crate) async fn run_until(types: ConnectorTypes, argv: Vec<OsString>, stop: Stop) -> ExitCode {
    let prepared = match prepare(types, argv) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let exporter = match init_logging(&prepared.args) {
        Ok(exporter) => exporter,
        Err(message) => return report(Failure::Config(message)),
    };
    let result = run(prepared, Some(stop)).await;
    exporter.shutdown();
    finish(result)
}

fn finish(result: Result<(), Failure>) -> ExitCode {
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

/// Parses the command line and the config file. `--help`/`--version` print
/// and exit 0; every error is one line and exit 2.
fn prepare(types: ConnectorTypes, argv: Vec<OsString>) -> Result<Prepared, ExitCode> {
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
    let (mut args, matches) = cli::parse(argv).map_err(clap_error)?;
    let config_error = |m: String| report(Failure::Config(m));
    let mut file = None;
    let mut from_file = Vec::new();
    if let Some(path) = args.config.clone() {
        cli::check_no_registration_flags(&matches).map_err(config_error)?;
        let loaded = load_config(&types, &path).map_err(config_error)?;
        from_file = cli::apply_file_settings(&mut args, &matches, &loaded.top)
            .map_err(|e| config_error(format!("config {}: {e}", path.display())))?;
        file = Some((path, loaded));
    }
    Ok(Prepared {
        args,
        matches,
        types,
        file,
        from_file,
    })
}

fn load_config(types: &ConnectorTypes, path: &Path) -> Result<ConfigFile, String> {
    let known: BTreeSet<String> = types.names().map(str::to_string).collect();
    let env = |name: &str| std::env::var(name).ok();
    Loader {
        known_types: &known,
        env: &env,
    }
    .load(path)
    .map_err(|e| e.to_string())
}

/// Logs go to stderr: `--log` if given, else `RUST_LOG`, else `info`
/// (`warn` for the demo, whose own output is the progress and the table).
///
/// With `--otlp-endpoint` (and the `opentelemetry` feature), spans are also
/// exported over OTLP, whatever the log filter says (`crate::otel`).
fn init_logging(args: &Args) -> Result<crate::otel::Exporter, String> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};
    let demo = args.url.is_none() && args.config.is_none();
    let filter = match args.log.as_deref() {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log {l:?}: {e}"))?,
        None => match std::env::var("RUST_LOG") {
            Ok(v) if !v.trim().is_empty() => {
                EnvFilter::try_new(&v).map_err(|e| format!("RUST_LOG {v:?}: {e}"))?
            }
            _ => EnvFilter::new(if demo { "warn" } else { "info" }),
        },
    };
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(crate::status::LogWriter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(logs);
    #[cfg(feature = "opentelemetry")]
    if let Some(endpoint) = &args.otlp_endpoint {
        cli::check_extras(args)?;
        let (otlp, exporter) = crate::otel::layer(endpoint)?;
        // A library user may have installed a subscriber already: theirs wins.
        if registry.with(otlp).try_init().is_ok() {
            tracing::info!(endpoint = %connector_core::redact_url(endpoint), "exporting execute spans over OTLP");
        }
        return Ok(exporter);
    }
    // A library user may have installed a subscriber already: theirs wins.
    let _ = registry.try_init();
    Ok(crate::otel::Exporter::default())
}

async fn run(p: Prepared, stop: Option<Stop>) -> Result<(), Failure> {
    let args = &p.args;
    // Everything that can be checked without a network is checked first, so
    // a bad flag never half-starts anything.
    cli::check_extras(args).map_err(Failure::Config)?;
    if let Some(path) = &args.ca_cert {
        check_ca_file(path)?;
    }
    let fleet = resolve_fleet(args)?;
    let shard = resolve_shard(args)?;
    let configured = match &p.file {
        Some((_, file)) => file.registrations.clone(),
        None => flag_registrations(args, &p.types)?,
    };
    match args.url.clone() {
        Some(url) => {
            let options = build_options(args, &url, false, &p.matches, &p.from_file)?;
            if args.ca_cert.is_some() && !options.endpoint.tls {
                tracing::warn!(
                    url = %options.endpoint,
                    "--ca-cert is ignored: the URL is not TLS (use grpcs:// or wss://)"
                );
            }
            if given(&p.matches, "transport") {
                tracing::warn!(
                    "--transport only selects the embedded demo server; \
                     with --url the URL scheme decides"
                );
            }
            let transport = select_transport(&options, args.fallback_url.as_deref())
                .map_err(Failure::Config)?;
            let ops = bind_ops(args).await?;
            let runner = MultiConnectorRunner::new(Vec::new(), options, transport);
            let host = Arc::new(Host::new(runner, p.types.clone(), shard));
            run_remote(&p, host, configured, ops, fleet, stop).await
        }
        None if p.file.is_some() => Err(Failure::Config(
            "--config needs a server: set `url` in the file or give --url \
             (the embedded demo takes no config file)"
                .into(),
        )),
        None => {
            // Check the flag values now; the real URL is known once the
            // embedded server has bound its port.
            build_options(args, "grpc://127.0.0.1:1", true, &p.matches, &p.from_file)?;
            if args.ca_cert.is_some() {
                tracing::warn!(
                    "--ca-cert is ignored by the demo: its embedded server is plaintext"
                );
            }
            if args.proxy.is_some() {
                tracing::warn!("--proxy is ignored by the demo: its server is in this process");
            }
            let ops = bind_ops(args).await?;
            crate::demo::run_demo(
                crate::demo::DemoInput {
                    args,
                    types: &p.types,
                    configured,
                    shard,
                    ops,
                },
                |url| build_options(args, url, true, &p.matches, &p.from_file),
            )
            .await
        }
    }
}

/// The registrations of `--count`, `--tenant`, `--connector-type`,
/// `--instance-prefix` and `--auth-token`, every identifier checked.
fn flag_registrations(
    args: &Args,
    types: &ConnectorTypes,
) -> Result<Vec<RegistrationSpec>, Failure> {
    let config = |e: ConnectorError| Failure::Config(plain(e));
    validate_identifier("--tenant", &args.tenant).map_err(config)?;
    validate_identifier("--connector-type", &args.connector_type).map_err(config)?;
    if !types.flag_type_known(&args.connector_type) {
        let known: Vec<&str> = types.names().collect();
        return Err(Failure::Config(format!(
            "--connector-type {:?}: this host knows only {}",
            args.connector_type,
            known.join(", ")
        )));
    }
    let token = match &args.auth_token {
        Some(t) => TokenSource::Literal(t.clone()),
        None => TokenSource::None,
    };
    (0..args.count)
        .map(|i| {
            let instance = format!("{}{i}", args.instance_prefix);
            validate_identifier("instance id (from --instance-prefix)", &instance)
                .map_err(config)?;
            Ok(RegistrationSpec {
                key: RegistrationKey::new(&args.tenant, &args.connector_type, &instance)
                    .map_err(config)?,
                token: token.clone(),
                display_name: None,
                tags: Vec::new(),
                metadata: BTreeMap::new(),
                max_concurrent_requests: None,
                paused: false,
            })
        })
        .collect()
}

/// What `--fleet` resolves to: the validated options with the `etcd`
/// feature; nothing without it (`--fleet` is then refused by
/// [`cli::check_extras`]).
#[cfg(feature = "etcd")]
type FleetPlan = crate::fleet::FleetOptions;
#[cfg(not(feature = "etcd"))]
type FleetPlan = std::convert::Infallible;

/// `--fleet` (config key `fleet`) with `--fleet-member` and
/// `--fleet-lease-secs`, checked: it needs a server and excludes the static
/// shards.
fn resolve_fleet(args: &Args) -> Result<Option<FleetPlan>, Failure> {
    let Some(url) = &args.fleet else {
        return Ok(None);
    };
    if args.shard.is_some() || args.shards.is_some() {
        let which = if args.shard.is_some() {
            "--shard (CONNECTOR_HOST_SHARD)"
        } else {
            "--shards (CONNECTOR_HOST_SHARDS)"
        };
        return Err(Failure::Config(format!(
            "--fleet cannot be combined with {which}: in a fleet, etcd assigns each \
             replica its share; remove one of them"
        )));
    }
    if args.url.is_none() {
        return Err(Failure::Config(
            "--fleet needs a server (--url, or `url` in the config file): \
             the embedded demo runs alone"
                .into(),
        ));
    }
    #[cfg(feature = "etcd")]
    {
        crate::fleet::host::options(url, args.fleet_member.as_deref(), args.fleet_lease_secs)
            .map(Some)
            .map_err(|e| Failure::Config(format!("--fleet {url:?}: {e}")))
    }
    #[cfg(not(feature = "etcd"))]
    {
        Err(Failure::Config(cli::fleet_needs_etcd(url)))
    }
}

/// The fleet a running replica is in; uninhabited without the `etcd`
/// feature.
struct FleetLink {
    #[cfg(feature = "etcd")]
    inner: crate::fleet::host::FleetHost,
    #[cfg(not(feature = "etcd"))]
    never: std::convert::Infallible,
}

/// How long a replica leaving its fleet (SIGTERM) waits for its
/// registrations to close: a drain may wait for a request in flight up to
/// the SDK's `drain_timeout` (30 s).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(35);

impl FleetLink {
    /// Joins with the host's configured keys; the host hosts nothing the
    /// fleet has not given it.
    fn start(plan: FleetPlan, host: &Arc<Host>, keys: Vec<RegistrationKey>) -> FleetLink {
        #[cfg(feature = "etcd")]
        {
            FleetLink {
                inner: crate::fleet::host::FleetHost::start(plan, host.clone(), keys),
            }
        }
        #[cfg(not(feature = "etcd"))]
        {
            let _ = (host, keys);
            match plan {}
        }
    }

    fn url(&self) -> &str {
        #[cfg(feature = "etcd")]
        {
            self.inner.url()
        }
        #[cfg(not(feature = "etcd"))]
        match self.never {}
    }

    fn ready_gate(&self) -> ReadyGate {
        #[cfg(feature = "etcd")]
        {
            self.inner.ready_gate()
        }
        #[cfg(not(feature = "etcd"))]
        match self.never {}
    }

    fn set_registrations(&self, keys: Vec<RegistrationKey>) {
        #[cfg(feature = "etcd")]
        {
            self.inner.set_registrations(keys)
        }
        #[cfg(not(feature = "etcd"))]
        {
            let _ = keys;
            match self.never {}
        }
    }

    async fn leave(self, limit: Duration) {
        #[cfg(feature = "etcd")]
        {
            self.inner.leave(limit).await
        }
        #[cfg(not(feature = "etcd"))]
        {
            let _ = limit;
            match self.never {}
        }
    }
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
        Failure::Config(format!(
            "--shards {count} (CONNECTOR_HOST_SHARDS) with HOSTNAME={hostname:?}: {}",
            plain(e)
        ))
    })?;
    Ok(Some(shard))
}

/// Binds `--metrics-addr` and installs the Prometheus recorder.
pub(crate) async fn bind_ops(args: &Args) -> Result<Option<OpsEndpoint>, Failure> {
    let Some(addr) = &args.metrics_addr else {
        return Ok(None);
    };
    match OpsEndpoint::bind(addr).await {
        Ok(ops) => Ok(Some(ops)),
        Err(BindError::Config(m)) => Err(Failure::Config(m)),
        Err(BindError::Runtime(m)) => Err(Failure::Runtime(m)),
    }
}

/// Starts serving the ops routes for `host`; `/ready` also waits for
/// `gate` (a fleet's membership), if any.
pub(crate) fn serve_ops(
    ops: Option<OpsEndpoint>,
    host: &Arc<Host>,
    gate: Option<ReadyGate>,
) -> Option<OpsServer> {
    Some(ops?.serve(host.clone(), gate))
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
    from_file: &[&str],
) -> Result<MultiTransportOptions, Failure> {
    let given = |id: &str| given(matches, id) || from_file.contains(&id);
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
    builder.build().map_err(Failure::from)
}

/// The log line saying what this process hosts.
pub(crate) fn log_hosting(endpoint: &str, shard: Option<Shard>, hosted: usize, configured: usize) {
    match shard {
        Some(shard) => tracing::info!(
            %endpoint,
            "shard {shard}: hosting {hosted} of {configured} registrations"
        ),
        None => tracing::info!(%endpoint, registrations = hosted, "hosting connectors"),
    }
}

/// The per-registration rows: states from `before` (taken before the
/// shutdown, so they show how the run went rather than `stopped`),
/// counters from `after`.
pub(crate) fn summary_rows(
    before: &[RegistrationView],
    after: &[RegistrationView],
) -> Vec<SummaryRow> {
    let after: BTreeMap<&str, &RegistrationView> =
        after.iter().map(|v| (v.key.as_str(), v)).collect();
    before
        .iter()
        .map(|b| {
            let a = after.get(b.key.as_str()).copied().unwrap_or(b);
            SummaryRow {
                address: b.key.clone(),
                state: b.state.to_string(),
                ok: a.requests_succeeded,
                failed: a.requests_failed,
                reconnects: a.reconnects,
                heartbeat_rtt: a
                    .last_heartbeat_rtt_ms
                    .map(|ms| Duration::from_secs_f64(ms / 1000.0)),
            }
        })
        .collect()
}

fn print_stop_reasons(host: &Host) {
    for (key, m) in host.runner().metrics_snapshot() {
        if m.state.is_stopped() {
            println!("{key}: {}", m.state);
        }
    }
}

type RunTask = JoinHandle<Result<(), ConnectorError>>;

fn spawn_run(runner: &MultiConnectorRunner, until_shutdown: bool) -> RunTask {
    let runner = runner.clone();
    tokio::spawn(async move {
        if until_shutdown {
            runner.run_until_shutdown().await
        } else {
            runner.run().await
        }
    })
}

pub(crate) fn run_ended(
    joined: Result<Result<(), ConnectorError>, tokio::task::JoinError>,
) -> Failure {
    match joined {
        Ok(Ok(())) => Failure::Runtime("every registration has stopped; see the log".into()),
        Ok(Err(e)) => Failure::from(e),
        Err(e) => Failure::Runtime(format!("the runner task failed: {e}")),
    }
}

// ---------------------------------------------------------------------------
// With a URL: run until a signal or --duration-secs.

/// What woke the main loop.
enum Wake {
    Stop(&'static str),
    Reload,
}

/// SIGINT, SIGTERM and SIGHUP (Ctrl-C elsewhere).
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
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
                hangup: install(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next signal.
    async fn recv(&mut self) -> Wake {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => Wake::Stop("SIGINT"),
                _ = self.terminate.recv() => Wake::Stop("SIGTERM"),
                _ = self.hangup.recv() => Wake::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Wake::Stop("Ctrl-C")
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
    p: &Prepared,
    host: Arc<Host>,
    configured: Vec<RegistrationSpec>,
    ops: Option<OpsEndpoint>,
    fleet: Option<FleetPlan>,
    stop: Option<Stop>,
) -> Result<(), Failure> {
    let args = &p.args;
    // Installed before anything connects, so an early signal is not lost.
    let mut signals = Signals::install()?;
    let endpoint = format!("{:?}", args.url.as_deref().unwrap_or_default());
    let keys: Vec<RegistrationKey> = configured.iter().map(|s| s.key.clone()).collect();
    if fleet.is_some() {
        // Nothing is hosted before the fleet gives it to this replica.
        host.set_allowed(Some(BTreeSet::new())).await;
    }
    let changes = host.set_configured(configured).await;
    let hosted = changes.added - changes.failed;
    let mut fleet = fleet.map(|plan| FleetLink::start(plan, &host, keys));
    // Serves until this function returns: `/ready` turns 503 while the
    // registrations drain at shutdown.
    let _ops = serve_ops(ops, &host, fleet.as_ref().map(FleetLink::ready_gate));
    match &fleet {
        Some(link) => tracing::info!(
            endpoint = %endpoint.trim_matches('"'),
            fleet = %link.url(),
            "fleet: {} registrations in the list; hosting the share this replica owns",
            host.configured_len()
        ),
        None => log_hosting(
            endpoint.trim_matches('"'),
            host_shard(args)?,
            hosted,
            host.configured_len(),
        ),
    }
    let reloadable = p.file.is_some();
    if hosted == 0 && !reloadable && fleet.is_none() {
        return idle(args, host.configured_len(), &mut signals, stop).await;
    }
    // With a config file the set may empty and fill again at a reload; in a
    // fleet, whenever the share does.
    let mut run_task = spawn_run(host.runner(), reloadable || fleet.is_some());
    let status = crate::status::start(host.clone());
    let mut stop = stop.unwrap_or_else(|| Box::pin(std::future::pending()));
    let deadline = duration_elapsed(args.duration_secs);
    tokio::pin!(deadline);
    let reason = loop {
        let wake = tokio::select! {
            joined = &mut run_task => {
                drop(status);
                // Ended by itself: a configuration error (bad CA file), or
                // every registration stopped (rejected, or reconnect off).
                let failure = run_ended(joined);
                if let Some(link) = fleet.take() {
                    // Hand the share over now rather than after a TTL.
                    link.leave(Duration::from_secs(5)).await;
                }
                if matches!(failure, Failure::Runtime(_)) {
                    let views = host.views();
                    print!("{}", render_summary(&summary_rows(&views, &views), 0));
                    print_stop_reasons(&host);
                }
                return Err(failure);
            }
            wake = signals.recv() => wake,
            () = &mut deadline => Wake::Stop("--duration-secs elapsed"),
            () = &mut stop => Wake::Stop("asked to stop"),
        };
        match wake {
            Wake::Stop(reason) => break reason,
            Wake::Reload => match &p.file {
                Some((path, first)) => {
                    reload(&host, &p.types, path, &first.top, fleet.as_ref()).await
                }
                None => tracing::warn!("SIGHUP ignored: there is no --config file to reload"),
            },
        }
    };
    drop(status);
    tracing::info!("{reason}: shutting down gracefully (answering in-flight requests)");
    let before = host.views();
    let connections = host.runner().summary().transport.open_connections();
    if let Some(link) = fleet.take() {
        // Close the share gracefully, delete the ownership keys and revoke
        // the lease, so the others take over at once instead of after a TTL.
        let leave = link.leave(LEAVE_TIMEOUT);
        tokio::pin!(leave);
        loop {
            tokio::select! {
                () = &mut leave => break,
                wake = signals.recv() => match wake {
                    Wake::Stop(signal) => {
                        return Err(Failure::Runtime(format!(
                            "{signal} again: exiting without waiting for in-flight requests \
                             (the fleet's keys expire with the lease)"
                        )));
                    }
                    Wake::Reload => tracing::info!("SIGHUP ignored: shutting down"),
                },
            }
        }
    }
    host.runner().shutdown_handle().shutdown();
    let joined = loop {
        tokio::select! {
            joined = &mut run_task => break joined,
            wake = signals.recv() => match wake {
                Wake::Stop(signal) => {
                    return Err(Failure::Runtime(format!(
                        "{signal} again: exiting without waiting for in-flight requests"
                    )));
                }
                Wake::Reload => tracing::info!("SIGHUP ignored: shutting down"),
            },
        }
    };
    match joined {
        Ok(Ok(())) => {}
        other => return Err(run_ended(other)),
    }
    print!(
        "{}",
        render_summary(&summary_rows(&before, &host.views()), connections)
    );
    print_stop_reasons(&host);
    println!("stopped gracefully ({reason})");
    Ok(())
}

fn host_shard(args: &Args) -> Result<Option<Shard>, Failure> {
    // Already resolved (and warned about) once; this only re-reads it.
    match args.shard {
        Some(s) => Ok(Some(s)),
        None if args.shards.is_some() => resolve_shard(args),
        None => Ok(None),
    }
}

/// SIGHUP: read the file again; apply its registrations, or keep the
/// running set and log one error line. In a fleet, the fleet's list follows
/// the file (new keys are assigned, gone ones handed back).
async fn reload(
    host: &Host,
    types: &ConnectorTypes,
    path: &Path,
    first: &TopLevel,
    fleet: Option<&FleetLink>,
) {
    match load_config(types, path) {
        Err(e) => {
            crate::ops::count_reload(false);
            tracing::error!("reload failed, running set kept: {e}");
        }
        Ok(file) => {
            if file.top != *first {
                tracing::warn!(
                    "config {}: top-level settings changed; they apply at the next restart",
                    path.display()
                );
            }
            let keys: Vec<RegistrationKey> =
                file.registrations.iter().map(|s| s.key.clone()).collect();
            let Changes {
                added,
                removed,
                changed,
                unchanged,
                failed,
            } = host.set_configured(file.registrations).await;
            if let Some(link) = fleet {
                link.set_registrations(keys);
            }
            crate::ops::count_reload(true);
            tracing::info!(
                added,
                removed,
                changed,
                unchanged,
                failed,
                "config reloaded: {added} added, {removed} removed, {changed} changed, \
                 {unchanged} unchanged"
            );
        }
    }
}

/// A shard that owns none of the registrations: nothing to connect, ready,
/// until a signal or `--duration-secs`. Idling (rather than exiting) keeps a
/// StatefulSet replica from crash-looping when there are fewer
/// registrations than replicas.
async fn idle(
    args: &Args,
    configured: usize,
    signals: &mut Signals,
    stop: Option<Stop>,
) -> Result<(), Failure> {
    tracing::info!(
        "this shard owns none of the {configured} registrations: idle until SIGINT or SIGTERM"
    );
    let mut stop = stop.unwrap_or_else(|| Box::pin(std::future::pending()));
    let deadline = duration_elapsed(args.duration_secs);
    tokio::pin!(deadline);
    let reason = loop {
        tokio::select! {
            wake = signals.recv() => match wake {
                Wake::Stop(signal) => break signal,
                Wake::Reload => tracing::warn!("SIGHUP ignored: there is no --config file to reload"),
            },
            () = &mut deadline => break "--duration-secs elapsed",
            () = &mut stop => break "asked to stop",
        }
    };
    print!("{}", render_summary(&[], 0));
    println!("stopped gracefully ({reason})");
    Ok(())
}
