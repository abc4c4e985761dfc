//! `connector-bench`: scale, throughput and memory of the connector SDK,
//! side by side with a raw tonic / tokio-tungstenite baseline
//! (`cargo xtask bench [--quick|--smoke] [SCENARIO...]`).
//!
//! The default command is the orchestrator. For every measurement it starts
//! the server and the client as *separate processes* (this binary again,
//! with a hidden `child-server` / `child-client` subcommand), so that the
//! client's resident memory, read from `/proc/PID/status`, holds nothing but
//! the client. Children print one JSON event per line on stdout and take
//! one command per line on stdin; they exit when stdin closes, so an
//! interrupted run leaves nothing behind.
//!
//! The same bench server serves the SDK and the raw baseline, so their
//! ratio compares clients only. Scenarios that need TLS with a testkit
//! certificate, or a server restart with duplicate detection, use the
//! testkit's reference server instead (SDK against SDK there).
//!
//! Figures go to stdout as tables and to `target/bench/*.json`. Missed
//! targets are reported, never fatal: the exit code is non-zero only when
//! something is functionally broken (registrations never became active, no
//! execute was answered, a child crashed).

mod child;
mod client_raw;
mod client_sdk;
mod hotpath;
mod profile;
mod report;
mod scenarios;
mod server_core;
mod server_grpc;
mod server_testkit;
mod server_ws;
mod sys;
mod wire;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::scenarios::{Mode, Orchestrator, FULL_RUN_EXTRAS, SCENARIOS};

/// Scale, throughput and memory of the connector SDK beside a raw baseline.
#[derive(Debug, Parser)]
#[command(name = "connector-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    /// Reduced sizes: the whole suite in under two minutes (release build).
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// Tiny sizes, a few seconds: proves the bench works (CI, debug build).
    #[arg(long)]
    smoke: bool,
    /// Profile the clients of the 64 B throughput runs (N = 80 and 1000)
    /// with `perf record` and print the top frames of each, with their
    /// share of client CPU and the µs per response that share is.
    #[arg(long, conflicts_with = "smoke")]
    profile: bool,
    /// Where results go (default: `target/bench` of the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Scenarios to run (default: throughput, idle-grpc, server-limit,
    /// shared-vs-single, idle-ws, storm, and in a full run also
    /// idle-grpc-100k).
    scenarios: Vec<String>,
}

/// The processes the orchestrator starts.
#[derive(Debug, Subcommand)]
enum Role {
    /// A server process (internal).
    #[command(name = "child-server", hide = true)]
    Server(ServerArgs),
    /// A client process (internal).
    #[command(name = "child-client", hide = true)]
    Client(ClientArgs),
    /// The SDK's per-response path in one process, no network: for
    /// instruction counts under `valgrind --tool=callgrind`.
    Hotpath(hotpath::HotpathArgs),
}

/// Which server.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ServerKind {
    /// The bench's tonic server.
    BenchGrpc,
    /// The bench's tokio-tungstenite server.
    BenchWs,
    /// The testkit's `GrpcTestServer` (TLS, restart, duplicate detection).
    TestkitGrpc,
}

#[derive(Debug, Args)]
struct ServerArgs {
    #[arg(long, value_enum)]
    kind: ServerKind,
    /// Executes kept outstanding per stream (0: none).
    #[arg(long, default_value_t = 0)]
    window: usize,
    /// Size of each execute's JSON payload.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// The bench gRPC server's `SETTINGS_MAX_CONCURRENT_STREAMS`.
    #[arg(long, default_value_t = 1024)]
    max_streams: u32,
    /// Serve TLS (testkit server only).
    #[arg(long)]
    tls: bool,
    /// Where the testkit CA certificate is written.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
}

/// Which client.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ClientKind {
    /// `MultiConnectorRunner` with echo connectors.
    Sdk,
    /// Plain tonic streams.
    RawGrpc,
    /// Plain tokio-tungstenite sockets.
    RawWs,
}

#[derive(Debug, Args)]
pub(crate) struct ClientArgs {
    #[arg(long, value_enum)]
    kind: ClientKind,
    #[arg(long)]
    url: String,
    /// Registrations.
    #[arg(long)]
    n: usize,
    #[arg(long, default_value_t = 80)]
    streams_per_channel: usize,
    /// Extra CA certificate (PEM) for TLS.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Bound on every wait of the client.
    #[arg(long, default_value_t = 60.0)]
    timeout_secs: f64,
    /// SDK only: backoff jitter instead of the default 500 ms.
    #[arg(long)]
    jitter_ms: Option<u64>,
    /// SDK only: `MultiTransportOptions::reconnect_rate` (0 turns pacing off).
    #[arg(long)]
    reconnect_rate: Option<u32>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let limit = sys::raise_nofile();
    match cli.role {
        Some(Role::Hotpath(args)) => match hotpath::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => wire::fail(&e),
        },
        Some(role) => run_child(role),
        None => orchestrate(cli, limit),
    }
}

/// Children log to stderr (a file per child); `error` unless `RUST_LOG`
/// says otherwise, so a storm's thousands of "stream lost" warnings do not
/// cost the client what is being measured.
fn run_child(role: Role) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    // Two workers, as many as the machine the figures come from;
    // the same for every client and server so comparisons hold.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => wire::fail(&e),
    };
    let result = runtime.block_on(async move {
        match role {
            Role::Server(a) => match a.kind {
                ServerKind::BenchGrpc => server_grpc::run(a.window, a.payload, a.max_streams).await,
                ServerKind::BenchWs => server_ws::run(a.window, a.payload).await,
                ServerKind::TestkitGrpc => server_testkit::run(a.tls, a.ca_dir).await,
            },
            Role::Client(a) => match a.kind {
                ClientKind::Sdk => client_sdk::run(&a).await,
                ClientKind::RawGrpc => client_raw::run_grpc(&a).await,
                ClientKind::RawWs => client_raw::run_ws(&a).await,
            },
            Role::Hotpath(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => wire::fail(&e),
    }
}

fn orchestrate(cli: Cli, limit: sys::NofileLimit) -> ExitCode {
    let mode = if cli.smoke {
        Mode::Smoke
    } else if cli.quick {
        Mode::Quick
    } else {
        Mode::Full
    };
    let scenarios: Vec<String> = if cli.profile {
        vec!["throughput".to_string()]
    } else if cli.scenarios.is_empty() {
        let scale = if mode == Mode::Full {
            FULL_RUN_EXTRAS
        } else {
            &[]
        };
        SCENARIOS
            .iter()
            .chain(scale)
            .map(|s| s.to_string())
            .collect()
    } else {
        cli.scenarios.clone()
    };
    let known = |s: &str| SCENARIOS.contains(&s) || FULL_RUN_EXTRAS.contains(&s);
    if let Some(bad) = scenarios.iter().find(|s| !known(s)) {
        eprintln!(
            "unknown scenario {bad:?}; the scenarios are: {} (full runs add: {})",
            SCENARIOS.join(", "),
            FULL_RUN_EXTRAS.join(", ")
        );
        return ExitCode::from(2);
    }
    let out = cli.out.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(|p| p.join("target").join("bench"))
            .unwrap_or_else(|| PathBuf::from("target/bench"))
    });
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let orchestrator = Orchestrator::new(mode, out.join("work"), cli.profile);
    println!(
        "connector-bench: {} run ({build} build), {cores} cores, scenarios: {}",
        orchestrator.mode_name(),
        scenarios.join(", ")
    );
    println!(
        "open-file limit (RLIMIT_NOFILE): soft {} raised to {} (hard limit {}); children inherit it",
        limit.before, limit.soft, limit.hard
    );
    if mode == Mode::Smoke {
        println!(
            "smoke: tiny N, figures are not meaningful; only a functional failure fails the run"
        );
    }
    let stamp = sys::timestamp();
    let mut all = Vec::new();
    let mut failed = Vec::new();
    let mut misses = 0usize;
    for scenario in &scenarios {
        let started = std::time::Instant::now();
        let cpu_before = sys::cpu_snapshot();
        let (mut sections, error) = match orchestrator.run(scenario) {
            Ok(sections) => (sections, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let others = cpu_before.others_share(&sys::cpu_snapshot(), cores);
        if others > 0.1 {
            if let Some(s) = sections.first_mut() {
                s.notes.push(format!(
                    "other processes used {:.0} % of the machine's CPU while this ran: \
                     figures are perturbed",
                    others * 100.0
                ));
            }
        }
        for s in &sections {
            s.print();
            misses += s.misses().count();
        }
        if let Some(e) = &error {
            println!("\n== {scenario}: FAILED: {e}");
            failed.push(scenario.clone());
        }
        let record = json!({
            "scenario": scenario,
            "mode": orchestrator.mode_name(),
            "build": build,
            "timestamp": stamp,
            "cores": cores,
            "nofile": { "soft": limit.soft, "hard": limit.hard },
            "secs": started.elapsed().as_secs_f64(),
            "cpu_share_of_other_processes": others,
            "error": error,
            "sections": sections,
        });
        if let Err(e) = write_json(&out.join(format!("{scenario}-{stamp}.json")), &record) {
            eprintln!("cannot write results: {e}");
        }
        all.push(record);
    }
    let latest = json!({ "timestamp": stamp, "mode": orchestrator.mode_name(), "runs": all });
    // `latest.json` is the last run of any mode; `latest-<mode>.json` keeps
    // the last full run from being overwritten by a CI smoke run.
    let latest_path = out.join("latest.json");
    let _ = write_json(
        &out.join(format!("latest-{}.json", orchestrator.mode_name())),
        &latest,
    );
    match write_json(&latest_path, &latest) {
        Ok(()) => println!(
            "\nresults: {} and {}",
            latest_path.display(),
            out.join(format!("<scenario>-{stamp}.json")).display()
        ),
        Err(e) => eprintln!("cannot write results: {e}"),
    }
    if misses > 0 {
        println!(
            "{misses} target(s) missed (marked NO above); see the notes and the JSON for details"
        );
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("functional failure in: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}

fn write_json(path: &std::path::Path, value: &Value) -> wire::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)?)?;
    Ok(())
}
