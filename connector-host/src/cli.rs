//! The command line of `connector-host-cli.md` (clap): every flag, each
//! with its `CONNECTOR_HOST_*` variable, and the checks that need no network.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use connector_core::{ConnectorError, Shard};

pub(crate) const AFTER_HELP: &str = "\
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
  --fleet etcd://HOST:PORT/PREFIX (build with --features etcd) instead shares
  the full list among the replicas alive in etcd: replicas join and leave
  without a restart, a killed one's share moves after --fleet-lease-secs, a
  SIGTERM'd one's at once. /ready is 503 while not joined; metrics
  connector_host_fleet_members, connector_host_fleet_owned,
  connector_host_fleet_moves_total{direction}.
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
  connector-host --url grpc://cp:50051 --count 3000 --shard 1/4 --metrics-addr 0.0.0.0:9090
  connector-host --url grpc://cp:50051 --count 3000 --fleet etcd://etcd:2379/connector-host";

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
pub(crate) struct Args {
    /// Server to connect to: grpc://HOST:PORT, grpcs://HOST:PORT, ws://HOST:PORT or
    /// wss://HOST:PORT. Without it, the demo runs on an embedded test server.
    #[arg(long, value_name = "URL")]
    pub(crate) url: Option<String>,

    /// Number of registrations (instances P0 … P{N-1}).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) count: u32,

    /// Tenant of every registration (1-128 of A-Z a-z 0-9 _ -).
    #[arg(long, value_name = "T", default_value = "demo")]
    pub(crate) tenant: String,

    /// Connector type of every registration (1-128 of A-Z a-z 0-9 _ -).
    #[arg(long, value_name = "T", default_value = "echo")]
    pub(crate) connector_type: String,

    /// Instance ids are P0, P1, … P{N-1} (each 1-128 of A-Z a-z 0-9 _ -).
    #[arg(long, value_name = "P", default_value = "echo-")]
    pub(crate) instance_prefix: String,

    /// Bearer credential sent in `register` (default: empty). Never logged.
    #[arg(long, value_name = "TOKEN", hide_env_values = true)]
    pub(crate) auth_token: Option<String>,

    /// gRPC: streams one HTTP/2 connection carries before another is opened.
    #[arg(long, value_name = "K", default_value_t = 80)]
    pub(crate) max_streams_per_channel: usize,

    /// Execute requests each registration runs at once; more wait for a slot.
    #[arg(long, value_name = "K", default_value_t = 100)]
    pub(crate) max_concurrent_requests: u32,

    /// Heartbeat period. The demo uses 500 ms unless this is given.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub(crate) heartbeat_interval_ms: u64,

    /// A stream with no server message for this long is dead and reconnected.
    /// The demo uses 5000 ms unless this is given.
    #[arg(long, value_name = "MS", default_value_t = 45_000)]
    pub(crate) heartbeat_timeout_ms: u64,

    /// Reconnect backoff base (doubles per failed attempt).
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub(crate) reconnect_delay_ms: u64,

    /// Reconnect backoff cap, jitter included.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    pub(crate) max_backoff_ms: u64,

    /// Random extra delay added to each backoff.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub(crate) jitter_ms: u64,

    /// A registration whose stream ends stops instead of reconnecting
    /// (variable: true/false, 1/0, yes/no, on/off).
    #[arg(long, value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) no_reconnect: bool,

    /// Stop gracefully by itself after S seconds.
    #[arg(long, value_name = "S")]
    pub(crate) duration_secs: Option<u64>,

    /// Extra trusted CA certificate(s), PEM, for grpcs:// and wss://.
    #[arg(long, value_name = "PATH")]
    pub(crate) ca_cert: Option<PathBuf>,

    /// Tracing filter for the logs on stderr, e.g. `debug` or
    /// `info,connector_core=debug`. [default: info; RUST_LOG is used when
    /// this is not given]
    #[arg(long, value_name = "LEVEL")]
    pub(crate) log: Option<String>,

    /// Kind of embedded test server for the demo (only used without --url).
    #[arg(long, value_enum, default_value_t = DemoTransport::Grpc)]
    pub(crate) transport: DemoTransport,

    /// HTTP CONNECT proxy: `http://[USER:PASSWORD@]HOST:PORT`, or `none` for a
    /// direct connection. [default: HTTPS_PROXY for grpcs/wss, HTTP_PROXY
    /// for grpc/ws (or their lower-case forms), except hosts in NO_PROXY]
    #[arg(long, value_name = "URL|none", hide_env_values = true)]
    pub(crate) proxy: Option<String>,

    /// Serve GET /metrics (Prometheus text) and GET /ready (200 while every
    /// hosted registration is active, else 503) on this address, e.g.
    /// 0.0.0.0:9090 (port 0: any free port, logged at startup).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub(crate) metrics_addr: Option<String>,

    /// Host only the registrations that shard I of N owns (0 <= I < N):
    /// N replicas, one per shard, cover the registrations exactly once.
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    pub(crate) shard: Option<Shard>,

    /// Number of replicas (shards) when --shard is not given: this
    /// replica's index is the ordinal at the end of HOSTNAME, as a
    /// StatefulSet pod's name `connector-host-3` is shard 3.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) shards: Option<u32>,

    /// Registrations and settings from a TOML file (see
    /// connector-host-config.md), read again on SIGHUP. Excludes --count,
    /// --tenant, --connector-type, --instance-prefix and --auth-token.
    #[arg(long, value_name = "PATH")]
    pub(crate) config: Option<PathBuf>,

    /// WebSocket endpoint (ws:// or wss://) used when HTTP/2 to --url cannot
    /// get through (config key `fallback_url`).
    #[arg(long, value_name = "ws[s]://…")]
    pub(crate) fallback_url: Option<String>,

    /// Elastic fleet: replicas share the registration list through etcd,
    /// etcd://HOST:PORT/PREFIX (config key `fleet`; needs the `etcd` feature).
    #[arg(long, value_name = "etcd://HOST:PORT/PREFIX")]
    pub(crate) fleet: Option<String>,

    /// This replica's id in the fleet. [default: HOSTNAME, else random]
    #[arg(long, value_name = "ID")]
    pub(crate) fleet_member: Option<String>,

    /// Fleet lease TTL: a replica that dies is replaced after about this long.
    #[arg(long, value_name = "S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) fleet_lease_secs: u64,

    /// Export execute spans over OTLP to this endpoint (http:// or https://;
    /// needs the `opentelemetry` feature).
    #[arg(long, value_name = "URL")]
    pub(crate) otlp_endpoint: Option<String>,
}

/// The command line: [`Args`], each flag reading its `CONNECTOR_HOST_*`
/// variable (the flag name in upper case, `-` as `_`), the one rule of
/// `connector-host-cli.md` applied to every flag here rather than spelled
/// out per flag.
pub(crate) fn command() -> clap::Command {
    Args::command().mut_args(|arg| match arg.get_long().map(env_var) {
        Some(var) => arg.env(var),
        None => arg,
    })
}

/// `--connector-type` reads `CONNECTOR_HOST_CONNECTOR_TYPE`.
fn env_var(long: &str) -> String {
    format!(
        "CONNECTOR_HOST_{}",
        long.replace('-', "_").to_ascii_uppercase()
    )
}

/// Parses `argv` (the program name first) into the arguments and the
/// matches (which tell where each value came from, see [`given`]).
pub(crate) fn parse<I, T>(argv: I) -> Result<(Args, ArgMatches), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = command().try_get_matches_from(argv)?;
    let args = Args::from_arg_matches(&matches)?;
    Ok((args, matches))
}

/// `HOST:PORT` (a name, an IPv4 address or a bracketed IPv6 address, and a
/// port 0-65535); the name is resolved when binding.
pub(crate) fn parse_host_port(s: &str) -> Result<String, String> {
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

pub(crate) fn parse_shard(s: &str) -> Result<Shard, String> {
    s.parse::<Shard>().map_err(|e| match e {
        ConnectorError::InvalidConfig(m) => m,
        other => other.to_string(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DemoTransport {
    /// gRPC: all registrations share HTTP/2 connections.
    Grpc,
    /// WebSocket: one socket per registration.
    Ws,
}

/// Whether the flag `id` was given, on the command line or by its variable.
pub(crate) fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// The flags a config file replaces: with `--config`, registrations come
/// from the file.
const REGISTRATION_FLAGS: [(&str, &str); 5] = [
    ("count", "--count"),
    ("tenant", "--tenant"),
    ("connector_type", "--connector-type"),
    ("instance_prefix", "--instance-prefix"),
    ("auth_token", "--auth-token"),
];

/// With `--config`: the flags that make registrations are an error.
pub(crate) fn check_no_registration_flags(matches: &ArgMatches) -> Result<(), String> {
    for (id, flag) in REGISTRATION_FLAGS {
        if given(matches, id) {
            return Err(format!(
                "{flag} cannot be used with --config: registrations come from the file \
                 (set them in its [[registration]] tables)"
            ));
        }
    }
    Ok(())
}

/// Fills every setting the command line (or its variable) did not give from
/// the file's top level; returns the ids the file set.
pub(crate) fn apply_file_settings(
    args: &mut Args,
    matches: &ArgMatches,
    top: &crate::config::TopLevel,
) -> Result<Vec<&'static str>, String> {
    let mut set = Vec::new();
    macro_rules! fill {
        ($($field:ident),* $(,)?) => {$(
            if let Some(v) = &top.$field {
                if !given(matches, stringify!($field)) {
                    args.$field = v.clone().into();
                    set.push(stringify!($field));
                }
            }
        )*};
    }
    fill!(
        max_streams_per_channel,
        max_concurrent_requests,
        heartbeat_interval_ms,
        heartbeat_timeout_ms,
        reconnect_delay_ms,
        max_backoff_ms,
        jitter_ms,
        no_reconnect,
        fleet_lease_secs,
    );
    macro_rules! fill_opt {
        ($($field:ident),* $(,)?) => {$(
            if let Some(v) = &top.$field {
                if !given(matches, stringify!($field)) {
                    args.$field = Some(v.clone());
                    set.push(stringify!($field));
                }
            }
        )*};
    }
    fill_opt!(
        url,
        ca_cert,
        proxy,
        log,
        shards,
        fallback_url,
        fleet,
        fleet_member,
        otlp_endpoint,
    );
    if let Some(addr) = &top.metrics_addr {
        if !given(matches, "metrics_addr") {
            args.metrics_addr =
                Some(parse_host_port(addr).map_err(|e| format!("metrics_addr: {e}"))?);
            set.push("metrics_addr");
        }
    }
    if let Some(shard) = &top.shard {
        if !given(matches, "shard") {
            args.shard = Some(parse_shard(shard).map_err(|e| format!("shard: {e}"))?);
            set.push("shard");
        }
    }
    Ok(set)
}

/// Checks `--fallback-url`, `--fleet`, `--fleet-member` and
/// `--otlp-endpoint` (or their config keys): schemes, and whether this
/// build has the feature they need.
pub(crate) fn check_extras(args: &Args) -> Result<(), String> {
    if let Some(url) = &args.fallback_url {
        let endpoint = connector_core::Endpoint::parse(url)
            .map_err(|e| format!("--fallback-url {url:?}: {}", crate::config::plain(e)))?;
        if endpoint.kind != connector_core::TransportKind::WebSocket {
            return Err(format!(
                "--fallback-url {url:?}: must be a ws:// or wss:// URL (the WebSocket endpoint \
                 used when HTTP/2 cannot get through)"
            ));
        }
        if !cfg!(feature = "ws") {
            return Err("--fallback-url needs the `ws` feature: build with \
                 `cargo build --release -p connector-host --features ws`"
                .into());
        }
    }
    if let Some(fleet) = &args.fleet {
        if !cfg!(feature = "etcd") {
            return Err(fleet_needs_etcd(fleet));
        }
        // The URL itself is checked with the other fleet options
        // (`connector_host::fleet::FleetOptions`).
    }
    if let Some(member) = &args.fleet_member {
        connector_core::validate_identifier("--fleet-member", member)
            .map_err(crate::config::plain)?;
    }
    if let Some(endpoint) = &args.otlp_endpoint {
        if !cfg!(feature = "opentelemetry") {
            return Err(format!(
                "--otlp-endpoint {endpoint:?}: this connector-host was built without the \
                 `opentelemetry` feature; build it with \
                 `cargo build --release -p connector-host --features opentelemetry`"
            ));
        }
        let ok = ["http://", "https://"].iter().any(|p| {
            endpoint
                .strip_prefix(p)
                .is_some_and(|rest| !rest.is_empty())
        });
        if !ok {
            return Err(format!(
                "--otlp-endpoint {endpoint:?}: expected http://HOST:PORT or https://HOST:PORT"
            ));
        }
    }
    Ok(())
}

/// The one line for `--fleet` in a build without the `etcd` feature.
pub(crate) fn fleet_needs_etcd(url: &str) -> String {
    format!(
        "--fleet {url:?}: this connector-host was built without the `etcd` feature; \
         build it with `cargo build --release -p connector-host --features etcd`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        parse(std::iter::once("connector-host").chain(list.iter().copied()))
            .expect("valid flags")
            .0
    }

    #[test]
    fn every_flag_reads_its_variable() {
        let cmd = command();
        let mut flags = 0;
        for arg in cmd.get_arguments() {
            let long = arg.get_long().expect("every flag is long");
            let var = arg.get_env().expect("every flag has a variable");
            let want = format!(
                "CONNECTOR_HOST_{}",
                long.replace('-', "_").to_ascii_uppercase()
            );
            assert_eq!(var, want.as_str(), "--{long}");
            flags += 1;
        }
        assert_eq!(
            flags, 28,
            "the flags of connector-host-cli.md and --transport"
        );
        let var = |long: &str| {
            cmd.get_arguments()
                .find(|a| a.get_long() == Some(long))
                .and_then(|a| a.get_env())
                .map(|v| v.to_string_lossy().into_owned())
        };
        assert_eq!(
            var("connector-type").as_deref(),
            Some("CONNECTOR_HOST_CONNECTOR_TYPE")
        );
        assert_eq!(
            var("max-streams-per-channel").as_deref(),
            Some("CONNECTOR_HOST_MAX_STREAMS_PER_CHANNEL")
        );
    }

    #[test]
    fn fallback_url_must_be_websocket() {
        let e = check_extras(&args(&["--fallback-url", "grpc://h:1"])).expect_err("grpc");
        assert!(e.contains("ws://"), "{e}");
        let e = check_extras(&args(&["--fallback-url", "wss://"])).expect_err("no host");
        assert!(e.contains("--fallback-url"), "{e}");
        #[cfg(feature = "ws")]
        check_extras(&args(&[
            "--fallback-url",
            "wss://cp.example.com/v1/connect",
        ]))
        .expect("ok");
    }

    #[cfg(not(feature = "etcd"))]
    #[test]
    fn fleet_without_etcd_says_how_to_build_it() {
        let e = check_extras(&args(&["--fleet", "etcd://h:2379/p"])).expect_err("no etcd");
        assert!(
            e.contains("cargo build --release -p connector-host --features etcd"),
            "{e}"
        );
    }

    #[cfg(not(feature = "opentelemetry"))]
    #[test]
    fn otlp_without_its_feature_says_how_to_build_it() {
        let e = check_extras(&args(&["--otlp-endpoint", "http://h:4317"])).expect_err("no otel");
        assert!(e.contains("--features opentelemetry"), "{e}");
    }

    #[test]
    fn fleet_member_is_an_identifier() {
        let e = check_extras(&args(&["--fleet-member", "a b"])).expect_err("space");
        assert!(e.contains("--fleet-member"), "{e}");
        assert_eq!(args(&[]).fleet_lease_secs, 10);
    }
}
