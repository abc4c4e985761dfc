//! The SDK client: N echo registrations in one `MultiConnectorRunner`, the
//! real path (decode, dispatch, JSON check, concurrency bound, encode).

use connector_testkit::connectors::Echo;
use std::sync::Arc;
use std::time::{Duration, Instant};

use connector_core::{
    BaseConnector, ConnectorConfig, ConnectorRegistration, MultiConnectorRunner,
    MultiTransportOptions, RegistrationHandle,
};
use connector_grpc::GrpcTransport;
use connector_ws::WsTransport;
use serde_json::json;

use crate::sys::unix_us;
use crate::wire::{
    emit, emit_active, instance_id, next_command, ready_then_go, unknown_command, Result,
};
use crate::ClientArgs;

/// The shortest pause between two checks of a condition over all
/// registrations.
const POLL: Duration = Duration::from_millis(5);

/// A check walks every registration (`summary()` takes the runner's lock
/// and reads each state); with 10 000 of them that is around a
/// millisecond. Pausing 20× as long as the last check took keeps the
/// bench's own polling under 5 % of one core, so it does not slow down the
/// registrations it is timing (a fixed 5 ms poll cost the SDK ~20 % of its
/// CPU at N = 10 000 in a profile), while the all-Active instant is still
/// known to within a few percent.
fn pause_after(check: Duration) -> Duration {
    (check * 20).max(POLL)
}

/// `n` registrations `bench.echo.i<i>`, all served by one [`Echo`].
pub(crate) fn echo_registrations(n: usize) -> Result<Vec<ConnectorRegistration>> {
    let echo: Arc<dyn BaseConnector> = Arc::new(Echo);
    let registrations = (0..n)
        .map(|i| {
            ConnectorConfig::builder("bench", "echo", instance_id(i))
                .build()
                .map(|c| ConnectorRegistration::from_arc(c, Arc::clone(&echo)))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(registrations)
}

/// Runs the SDK client (see the crate docs for the command protocol).
pub(crate) async fn run(args: &ClientArgs) -> Result<()> {
    let (mut cmds, started, started_unix) = ready_then_go().await;
    let registrations = echo_registrations(args.n)?;
    let mut options =
        MultiTransportOptions::builder(&args.url).max_streams_per_channel(args.streams_per_channel);
    if let Some(ca) = &args.ca {
        options = options.ca_cert(ca);
    }
    if let Some(ms) = args.jitter_ms {
        options = options.jitter(Duration::from_millis(ms));
    }
    if let Some(rate) = args.reconnect_rate {
        options = options.reconnect_rate(rate);
    }
    let options = options.build()?;
    let runner = if args.url.starts_with("ws") {
        MultiConnectorRunner::new(registrations, options, WsTransport::new())
    } else {
        MultiConnectorRunner::new(registrations, options, GrpcTransport::new())
    };
    let run = tokio::spawn({
        let runner = runner.clone();
        async move { runner.run().await }
    });

    let deadline = started + Duration::from_secs_f64(args.timeout_secs);
    loop {
        let check = Instant::now();
        let summary = runner.summary();
        let check = check.elapsed();
        if summary.count("active") == args.n {
            break;
        }
        if run.is_finished() {
            return Err(format!("the runner stopped before all were active: {summary:?}").into());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not all {} registrations active after {} s: {:?}",
                args.n, args.timeout_secs, summary.by_state
            )
            .into());
        }
        tokio::time::sleep(pause_after(check)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let summary = runner.summary();
    emit_active(
        args.n,
        secs,
        started_unix,
        summary.transport.open_connections(),
    );

    loop {
        let cmd = next_command(&mut cmds).await;
        match cmd.as_str() {
            "stats" => emit("stats", stats(&runner)),
            "watch-reconnect" => {
                let handles: Vec<RegistrationHandle> = runner
                    .registrations()
                    .iter()
                    .filter_map(|k| runner.registration(k))
                    .collect();
                emit("watching", json!({}));
                emit(
                    "reconnected",
                    watch_reconnect(&handles, args.timeout_secs).await,
                );
            }
            "exit" => std::process::exit(0),
            other => unknown_command(other),
        }
    }
}

/// Waits until every registration has reconnected once and is Active.
async fn watch_reconnect(handles: &[RegistrationHandle], timeout_secs: f64) -> serde_json::Value {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(timeout_secs);
    let mut back = 0;
    while Instant::now() < deadline {
        let check = Instant::now();
        back = handles
            .iter()
            .filter(|h| {
                let m = h.metrics();
                m.successful_reconnects >= 1 && m.state.name() == "active"
            })
            .count();
        if back == handles.len() {
            break;
        }
        tokio::time::sleep(pause_after(check.elapsed())).await;
    }
    let disconnects: u64 = handles.iter().map(|h| h.metrics().total_disconnects).sum();
    let connect_failures: u64 = handles.iter().map(|h| h.metrics().connect_failures).sum();
    json!({
        "back": back,
        "n": handles.len(),
        "unix_us": unix_us(),
        "secs": started.elapsed().as_secs_f64(),
        "disconnects": disconnects,
        "connect_failures": connect_failures,
    })
}

fn stats(runner: &MultiConnectorRunner) -> serde_json::Value {
    let summary = runner.summary();
    let (mut received, mut succeeded, mut failed) = (0u64, 0u64, 0u64);
    for m in runner.metrics_snapshot().values() {
        received += m.requests_received;
        succeeded += m.requests_succeeded;
        failed += m.requests_failed;
    }
    json!({
        "by_state": summary.by_state,
        "connections": summary.transport.open_connections(),
        "requests_received": received,
        "requests_succeeded": succeeded,
        "requests_failed": failed,
    })
}
