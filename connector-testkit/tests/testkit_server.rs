//! The `testkit-server` binary as a user runs it: on port 0, its first stdout
//! line read back for the URLs, real hosts pointed at it (the SDK's runner,
//! the `connector-host` library with its echo type, and the custom host
//! example with its `kv` type), its approvals and its once-a-second
//! `answers/s` line checked against what the host itself counted. Bad flags
//! exit 2 with one line; SIGTERM stops it with exit 0.
//!
//! Every wait is on a line or a state, bounded by [`WAIT`].
#![cfg(all(feature = "grpc", feature = "ws"))]

use std::collections::HashMap;
use std::process::{Output, Stdio};
use std::sync::Arc;

use connector_core::proto::RejectReason;
use connector_core::{
    MultiConnectorRunner, MultiTransportOptions, ProxySetting, RegistrationState, Transport,
};
use connector_grpc::GrpcTransport;
use connector_testkit::connectors::Echo;
use connector_testkit::harness::{
    assert_rejected, forward_lines, key, registrations, Running, RunningHost, WAIT,
};
use connector_ws::WsTransport;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

#[allow(
    dead_code,
    unreachable_pub,
    reason = "the example's `main` is not called here"
)]
#[path = "../../examples/examples/custom_host.rs"]
mod custom_host;

const BIN: &str = env!("CARGO_BIN_EXE_testkit-server");

/// A running `testkit-server`, its stdout read line by line as it comes.
struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    /// The URLs of its first line, by scheme (`grpc`, `ws`).
    urls: HashMap<String, String>,
}

impl Server {
    async fn start(args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn testkit-server");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdin = child.stdin.take();
        let lines = forward_lines(stdout);
        let mut server = Server {
            child,
            stdin,
            lines,
            seen: Vec::new(),
            urls: HashMap::new(),
        };
        let first = server.next_line().await;
        let urls = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line names the URLs: {first:?}"));
        for url in urls.split_whitespace() {
            let (scheme, _) = url.split_once("://").expect("a URL");
            assert!(!url.ends_with(":0"), "the bound port, not 0: {url}");
            server.urls.insert(scheme.to_string(), url.to_string());
        }
        server
    }

    fn url(&self, scheme: &str) -> String {
        self.urls
            .get(scheme)
            .unwrap_or_else(|| panic!("no {scheme} URL in {:?}", self.urls))
            .clone()
    }

    async fn next_line(&mut self) -> String {
        self.line_where(|_| true).await
    }

    /// The first line from now on that `pred` accepts, within [`WAIT`]
    /// (status lines keep coming, so each line's wait is not a bound).
    async fn line_where(&mut self, mut pred: impl FnMut(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let line = match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => line,
                _ => panic!(
                    "no line as expected within {WAIT:?}; so far:\n{}",
                    self.seen.join("\n")
                ),
            };
            self.seen.push(line.clone());
            if pred(&line) {
                return line;
            }
        }
    }

    /// The first status line from now on that `pred` accepts, within [`WAIT`].
    async fn status_where(&mut self, mut pred: impl FnMut(&Status) -> bool) -> Status {
        let line = self
            .line_where(|line| Status::parse(line).is_some_and(|s| pred(&s)))
            .await;
        Status::parse(&line).expect("a status line")
    }

    async fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is piped");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to stdin");
        stdin.flush().await.expect("flush stdin");
    }

    /// SIGTERM; then the exit code and the rest of stdout.
    async fn stop(mut self) -> (i32, Vec<String>) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let exit = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exited in time")
            .expect("exit status");
        let mut rest = Vec::new();
        while let Ok(Some(line)) = tokio::time::timeout(WAIT, self.lines.recv()).await {
            rest.push(line);
        }
        (exit.code().expect("exited with a code"), rest)
    }
}

/// One `t=… active=… answers/s=…` line.
#[derive(Debug, Clone, Default)]
struct Status {
    fields: HashMap<String, u64>,
}

impl Status {
    fn parse(line: &str) -> Option<Status> {
        if !line.starts_with("t=") {
            return None;
        }
        let fields = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.trim_end_matches('s').parse().ok()?)))
            .collect();
        Some(Status { fields })
    }

    fn get(&self, field: &str) -> u64 {
        *self
            .fields
            .get(field)
            .unwrap_or_else(|| panic!("no {field} in {:?}", self.fields))
    }
}

/// `count` echo registrations `key(0)..` pointed at `url`, running.
fn start_runner(url: &str, count: usize, transport: impl Transport) -> Running {
    let options = MultiTransportOptions::builder(url)
        .proxy(ProxySetting::Disabled)
        .build()
        .expect("options");
    Running::start(MultiConnectorRunner::new(
        registrations(count, Arc::new(Echo)),
        options,
        transport,
    ))
}

async fn wait_all(runner: &MultiConnectorRunner, pred: impl Fn(&RegistrationState) -> bool) {
    for key in runner.registrations() {
        let handle = runner.registration(&key).expect("hosted");
        let state = handle.wait_for(WAIT, &pred).await;
        assert!(state.is_some(), "{key} is {}", handle.state());
    }
}

fn received(runner: &MultiConnectorRunner) -> u64 {
    runner
        .metrics_snapshot()
        .values()
        .map(|m| m.requests_received)
        .sum()
}

/// The story on one transport: two registrations approved, the workload's
/// answers counted by the server as the host answered them, none failed.
async fn workload_story(server: &mut Server, url: &str, transport: impl Transport) {
    let running = start_runner(url, 2, transport);
    let runner = running.runner();
    wait_all(runner, |s| *s == RegistrationState::Active).await;
    let mut unseen: Vec<String> = runner
        .registrations()
        .iter()
        .map(|k| format!("approved {k} "))
        .collect();
    while !unseen.is_empty() {
        let line = server
            .line_where(|l| unseen.iter().any(|u| l.starts_with(u)))
            .await;
        unseen.retain(|u| !line.starts_with(u));
    }
    // `--workload 5`: 5 a second to each of 2 registrations. From the first
    // second with answers, four lines add up to about 40 (a late tick is
    // caught up in the next second, so single lines may vary).
    server
        .status_where(|s| s.get("active") == 2 && s.get("answers/s") > 0)
        .await;
    let mut answered = 0;
    for _ in 0..4 {
        let status = server.status_where(|_| true).await;
        assert_eq!(status.get("active"), 2, "{status:?}");
        assert_eq!(status.get("pending"), 0, "{status:?}");
        assert_eq!(status.get("failed/s"), 0, "{status:?}");
        answered += status.get("answers/s");
    }
    assert!(
        (30..=50).contains(&answered),
        "about 10 a second for 4 s: {answered}; lines:\n{}",
        server.seen.join("\n")
    );
    assert!(received(runner) >= answered);
    running.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_websocket_hosts_get_approved_and_answer_the_workload() {
    let mut server = Server::start(&[
        "--grpc",
        "127.0.0.1:0",
        "--ws",
        "127.0.0.1:0",
        "--workload",
        "5",
    ])
    .await;
    let grpc = server.url("grpc");
    workload_story(&mut server, &grpc, GrpcTransport::new()).await;
    let ws = server.url("ws");
    workload_story(&mut server, &ws, WsTransport::new()).await;
    let (code, rest) = server.stop().await;
    assert_eq!(code, 0, "{rest:?}");
    let last = rest.last().expect("a last line");
    assert!(last.starts_with("stopped: SIGTERM"), "{rest:?}");
    assert!(last.contains("failed 0"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rejects_every_registration_for_good() {
    let mut server = Server::start(&["--grpc", "127.0.0.1:0", "--approve", "deny"]).await;
    let running = start_runner(&server.url("grpc"), 1, GrpcTransport::new());
    wait_all(running.runner(), RegistrationState::is_stopped).await;
    let state = running
        .runner()
        .registration(&key(0))
        .expect("hosted")
        .state();
    assert_rejected(&state, RejectReason::Denied);
    let rejected = format!("rejected {}: DENIED", key(0));
    server.line_where(|l| l == rejected).await;
    // Every registration stopped: the runner ends by itself.
    running.join().await.expect("ended cleanly");
    let (code, _) = server.stop().await;
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_waits_for_approve_typed_on_stdin() {
    let mut server = Server::start(&["--ws", "127.0.0.1:0", "--approve", "pending"]).await;
    let running = start_runner(&server.url("ws"), 2, WsTransport::new());
    let runner = running.runner();
    wait_all(runner, |s| *s == RegistrationState::PendingApproval).await;
    server
        .status_where(|s| s.get("pending") == 2 && s.get("active") == 0)
        .await;
    server.type_line(&format!("approve {}", key(1))).await;
    let handle = runner.registration(&key(1)).expect("hosted");
    assert!(handle
        .wait_for(WAIT, |s| *s == RegistrationState::Active)
        .await
        .is_some());
    server
        .status_where(|s| s.get("pending") == 1 && s.get("active") == 1)
        .await;
    server.type_line("approve all").await;
    wait_all(runner, |s| *s == RegistrationState::Active).await;
    server.status_where(|s| s.get("active") == 2).await;
    running.stop().await.expect("clean stop");
    let (code, _) = server.stop().await;
    assert_eq!(code, 0);
}

/// The `connector-host` library (the binary's code, its `echo` type) and the
/// custom host example (its `kv` type) pointed at a `testkit-server
/// --workload 4` started with `server_args`: `count` registrations answer,
/// all of them successfully or (`all_fail`) none; the host stops with
/// success and the server sees the registrations go.
async fn host_story(
    server_args: &[&str],
    types: connector_host::ConnectorTypes,
    connector_type: &str,
    count: u64,
    at_least: u64,
    all_fail: bool,
) {
    let mut server =
        Server::start(&[&["--grpc", "127.0.0.1:0", "--workload", "4"], server_args].concat()).await;
    let url = server.url("grpc");
    let count_arg = count.to_string();
    let args = [
        "host",
        "--url",
        &url,
        "--connector-type",
        connector_type,
        "--tenant",
        "acme",
        "--count",
        &count_arg,
        "--log",
        "error",
    ]
    .map(String::from);
    let host = RunningHost::start(|stop| connector_host::run_until(types, args, stop));
    let status = server
        .status_where(|s| s.get("active") == count && s.get("answers/s") >= at_least)
        .await;
    let failed = if all_fail { status.get("answers/s") } else { 0 };
    assert_eq!(status.get("failed/s"), failed, "{status:?}");
    host.stop_successfully().await;
    // The server sees the registrations go.
    server.status_where(|s| s.get("active") == 0).await;
    let (code, _) = server.stop().await;
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_host_and_the_custom_host_example_run_against_it() {
    host_story(
        &[],
        connector_host::ConnectorTypes::echo(),
        "echo",
        2,
        6,
        false,
    )
    .await;
    // `get` of a key never put answers `{"value": null}`: a success.
    let get = ["--capability", "get", "--payload", r#"{"key":"k"}"#];
    host_story(&get, custom_host::types(), "kv", 2, 6, false).await;
    // The same server asking `kv` for something it cannot do: every answer
    // is a failure, and the line says so.
    let delete = ["--capability", "delete"];
    host_story(&delete, custom_host::types(), "kv", 1, 3, true).await;
}

/// Runs the binary with `args` to its exit (stdin closed).
async fn run_to_exit(args: &[&str]) -> Output {
    tokio::time::timeout(
        WAIT,
        Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("exited in time")
    .expect("ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_exit_2_with_one_line() {
    for args in [
        &["--grpc", "127.0.0.1:0", "--bogus"][..],
        &["--grpc"],
        &["--grpc", "not-an-address"],
        &["--ws", "127.0.0.1:0", "--approve", "sometimes"],
        &["--grpc", "127.0.0.1:0", "--workload", "many"],
        &[],
    ] {
        let out = run_to_exit(args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("testkit-server: error: "),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
    let help = run_to_exit(&["--help"]).await;
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("usage: testkit-server"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_is_a_runtime_error() {
    let server = Server::start(&["--grpc", "127.0.0.1:0"]).await;
    let taken = server.url("grpc").replace("grpc://", "");
    let out = run_to_exit(&["--grpc", &taken]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot serve gRPC on"), "{stderr}");
    let (code, _) = server.stop().await;
    assert_eq!(code, 0);
}
