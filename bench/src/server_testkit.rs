//! The testkit's reference gRPC server in a process of its own, for the
//! scenarios that need what only it has: TLS with a testkit certificate
//! (shared-vs-single), and a restart on the same port with an event log
//! and duplicate detection (storm).

use std::path::PathBuf;
use std::time::Duration;

use connector_testkit::{
    GrpcServerOptions, GrpcTestServer, ServerEvent, TestCertificate, TestServer,
};
use serde_json::json;
use tokio::time::Instant;

use crate::sys::unix_us;
use crate::wire::{commands, emit, next_command, unknown_command, Result};

/// Width of one bucket of the reconnect histogram.
const BUCKET: Duration = Duration::from_millis(100);

/// Serves until stdin closes. Commands: `count`, `restart`, `storm-report`.
pub(crate) async fn run(tls: bool, ca_dir: Option<PathBuf>) -> Result<()> {
    let engine = TestServer::new();
    // The bench reports client protocol errors in its numbers rather than
    // failing the run on the first one.
    engine.expect_protocol_errors();
    let mut opts = GrpcServerOptions::default();
    let mut ca_path = None;
    if tls {
        let cert = TestCertificate::generate()?;
        let dir = ca_dir.unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&dir)?;
        ca_path = Some(cert.write_ca_pem(&dir)?);
        opts = opts.tls(cert);
    }
    let server = GrpcTestServer::start(engine.clone(), opts).await?;
    emit(
        "ready",
        json!({ "port": server.addr().port(), "url": server.url(), "ca": ca_path }),
    );
    let mut restarted_at: Option<Instant> = None;
    let mut cmds = commands();
    loop {
        let cmd = next_command(&mut cmds).await;
        match cmd.as_str() {
            "count" => emit(
                "count",
                json!({
                    "active": engine.active_keys().len(),
                    "connections": server.connection_count(),
                    "accepted": server.total_connections_accepted(),
                    "duplicate_active": engine.stats().duplicate_active,
                }),
            ),
            "restart" => {
                let t0 = Instant::now();
                let t0_unix = unix_us();
                restarted_at = Some(t0);
                server.restart().await?;
                emit(
                    "restarted",
                    json!({
                        "t0_unix_us": t0_unix,
                        "restart_ms": t0.elapsed().as_secs_f64() * 1e3,
                    }),
                );
            }
            "storm-report" => {
                let Some(t0) = restarted_at else {
                    emit("error", json!({ "message": "storm-report before restart" }));
                    continue;
                };
                emit("storm", storm_report(&engine, t0));
            }
            "exit" => std::process::exit(0),
            _ => unknown_command(&cmd),
        }
    }
}

/// The registrations that reached the server after the restart, bucketed
/// by 100 ms, and the largest share of them in any one second (both any
/// sliding 1 s window and whole seconds counted from the restart).
fn storm_report(engine: &TestServer, t0: Instant) -> serde_json::Value {
    let events = engine.events();
    let stats = engine.stats();
    let mut buckets: Vec<u64> = Vec::new();
    let mut registers = 0u64;
    let mut approvals = 0u64;
    let mut keys = std::collections::HashSet::new();
    let mut last = Duration::ZERO;
    for e in &events {
        if e.at() < t0 {
            continue;
        }
        let since = e.at() - t0;
        match e {
            ServerEvent::Registered { .. } => {
                registers += 1;
                let i = (since.as_millis() / BUCKET.as_millis()) as usize;
                if buckets.len() <= i {
                    buckets.resize(i + 1, 0);
                }
                buckets[i] += 1;
            }
            ServerEvent::Approved { key, .. } => {
                approvals += 1;
                keys.insert(key.clone());
                last = last.max(since);
            }
            _ => {}
        }
    }
    let total = registers.max(1) as f64;
    let per_second = (BUCKET.as_millis() as usize).max(1);
    let window = 1000 / per_second;
    let sliding = (0..buckets.len())
        .map(|i| {
            buckets[i..(i + window).min(buckets.len())]
                .iter()
                .sum::<u64>()
        })
        .max()
        .unwrap_or(0);
    let aligned = buckets
        .chunks(window)
        .map(|c| c.iter().sum::<u64>())
        .max()
        .unwrap_or(0);
    json!({
        "registers_after_restart": registers,
        "approvals_after_restart": approvals,
        "distinct_keys_approved": keys.len(),
        "last_approval_secs": last.as_secs_f64(),
        "bucket_ms": BUCKET.as_millis() as u64,
        "per_bucket": buckets,
        "max_share_sliding_1s": sliding as f64 / total,
        "max_share_aligned_1s": aligned as f64 / total,
        "duplicate_active": stats.duplicate_active,
        "protocol_errors": stats.protocol_errors.len(),
        "active_now": engine.active_keys().len(),
    })
}
