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
use std::process::Stdio;
use std::time::Duration;

use connector_core::proto::RejectReason;
use connector_core::{
    ConnectorConfig, ConnectorRegistration, MultiConnectorRunner, MultiTransportOptions,
    ProxySetting, RegistrationKey, RegistrationState, StopReason, Transport,
};
use connector_grpc::GrpcTransport;
use connector_ws::WsTransport;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
/// Bound for any one wait: generous, only reached when something is broken.
const WAIT: Duration = Duration::from_secs(30);

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
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
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
        match tokio::time::timeout(WAIT, self.lines.recv()).await {
            Ok(Some(line)) => {
                self.seen.push(line.clone());
                line
            }
            _ => panic!(
                "testkit-server printed no further line; so far:\n{}",
                self.seen.join("\n")
            ),
        }
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

fn runner(url: &str, count: usize, transport: impl Transport) -> MultiConnectorRunner {
    let registrations = (0..count)
        .map(|i| {
            let config = ConnectorConfig::builder("acme", "echo", format!("e-{i}"))
                .auth_token("t")
                .build()
                .expect("config");
            ConnectorRegistration::new(config, connector_testkit::connectors::Echo)
        })
        .collect();
    let options = MultiTransportOptions::builder(url)
        .proxy(ProxySetting::Disabled)
        .build()
        .expect("options");
    MultiConnectorRunner::new(registrations, options, transport)
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
    let runner = runner(url, 2, transport);
    let run = {
        let runner = runner.clone();
        tokio::spawn(async move { runner.run().await })
    };
    wait_all(&runner, |s| *s == RegistrationState::Active).await;
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
    assert!(received(&runner) >= answered);
    runner.shutdown_handle().shutdown();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("runner stopped in time")
        .expect("join")
        .expect("clean stop");
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
    let runner = runner(&server.url("grpc"), 1, GrpcTransport::new());
    let run = {
        let runner = runner.clone();
        tokio::spawn(async move { runner.run().await })
    };
    wait_all(&runner, RegistrationState::is_stopped).await;
    let key = RegistrationKey::new("acme", "echo", "e-0").expect("key");
    let state = runner.registration(&key).expect("hosted").state();
    assert!(
        matches!(
            &state,
            RegistrationState::Stopped(StopReason::Rejected {
                reason: RejectReason::Denied,
                ..
            })
        ),
        "{state}"
    );
    server
        .line_where(|l| l == "rejected acme.echo.e-0: DENIED")
        .await;
    // Every registration stopped: the runner ends by itself.
    tokio::time::timeout(WAIT, run)
        .await
        .expect("runner ended")
        .expect("join")
        .expect("ended cleanly");
    let (code, _) = server.stop().await;
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_waits_for_approve_typed_on_stdin() {
    let mut server = Server::start(&["--ws", "127.0.0.1:0", "--approve", "pending"]).await;
    let runner = runner(&server.url("ws"), 2, WsTransport::new());
    let run = {
        let runner = runner.clone();
        tokio::spawn(async move { runner.run().await })
    };
    wait_all(&runner, |s| *s == RegistrationState::PendingApproval).await;
    server
        .status_where(|s| s.get("pending") == 2 && s.get("active") == 0)
        .await;
    server.type_line("approve acme.echo.e-1").await;
    let e1 = RegistrationKey::new("acme", "echo", "e-1").expect("key");
    let handle = runner.registration(&e1).expect("hosted");
    assert!(handle
        .wait_for(WAIT, |s| *s == RegistrationState::Active)
        .await
        .is_some());
    server
        .status_where(|s| s.get("pending") == 1 && s.get("active") == 1)
        .await;
    server.type_line("approve all").await;
    wait_all(&runner, |s| *s == RegistrationState::Active).await;
    server.status_where(|s| s.get("active") == 2).await;
    runner.shutdown_handle().shutdown();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("runner stopped in time")
        .expect("join")
        .expect("clean stop");
    let (code, _) = server.stop().await;
    assert_eq!(code, 0);
}

/// The `connector-host` library (the binary's code, its `echo` type) and the
/// custom host example (its `kv` type) pointed at the binary with flags.
async fn host_story(
    server: &mut Server,
    types: connector_host::ConnectorTypes,
    connector_type: &str,
    at_least: u64,
) {
    let url = server.url("grpc");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let args = [
        "host",
        "--url",
        &url,
        "--connector-type",
        connector_type,
        "--tenant",
        "acme",
        "--count",
        "2",
        "--log",
        "error",
    ]
    .map(String::from);
    let host = tokio::spawn(connector_host::run_until(types, args, async move {
        let _ = stop_rx.await;
    }));
    let status = server
        .status_where(|s| s.get("active") == 2 && s.get("answers/s") >= at_least)
        .await;
    assert_eq!(status.get("failed/s"), 0, "{status:?}");
    stop_tx.send(()).expect("host still running");
    let code = tokio::time::timeout(WAIT, host)
        .await
        .expect("host stopped in time")
        .expect("join");
    assert_eq!(
        format!("{code:?}"),
        format!("{:?}", std::process::ExitCode::SUCCESS)
    );
    // The server sees the registrations go.
    server.status_where(|s| s.get("active") == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_host_and_the_custom_host_example_run_against_it() {
    let mut echo = Server::start(&["--grpc", "127.0.0.1:0", "--workload", "4"]).await;
    host_story(&mut echo, connector_host::ConnectorTypes::echo(), "echo", 6).await;
    let (code, _) = echo.stop().await;
    assert_eq!(code, 0);

    // `get` of a key never put answers `{"value": null}`: a success.
    let mut kv = Server::start(&[
        "--grpc",
        "127.0.0.1:0",
        "--workload",
        "4",
        "--capability",
        "get",
        "--payload",
        r#"{"key":"k"}"#,
    ])
    .await;
    host_story(&mut kv, custom_host::types(), "kv", 6).await;
    let (code, _) = kv.stop().await;
    assert_eq!(code, 0);

    // The same server asking `kv` for something it cannot do: every answer
    // is a failure, and the line says so.
    let mut wrong = Server::start(&[
        "--grpc",
        "127.0.0.1:0",
        "--workload",
        "4",
        "--capability",
        "delete",
    ])
    .await;
    let url = wrong.url("grpc");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let args = [
        "host",
        "--url",
        &url,
        "--connector-type",
        "kv",
        "--count",
        "1",
        "--log",
        "error",
    ]
    .map(String::from);
    let host = tokio::spawn(connector_host::run_until(
        custom_host::types(),
        args,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let status = wrong
        .status_where(|s| s.get("active") == 1 && s.get("answers/s") >= 3)
        .await;
    assert_eq!(
        status.get("failed/s"),
        status.get("answers/s"),
        "{status:?}"
    );
    stop_tx.send(()).expect("host still running");
    tokio::time::timeout(WAIT, host)
        .await
        .expect("host stopped in time")
        .expect("join");
    let (code, _) = wrong.stop().await;
    assert_eq!(code, 0);
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
        let out = tokio::time::timeout(
            WAIT,
            Command::new(BIN)
                .args(args)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("exited in time")
        .expect("ran");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("testkit-server: error: "),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
    let help = Command::new(BIN).arg("--help").output().await.expect("ran");
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("usage: testkit-server"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_is_a_runtime_error() {
    let server = Server::start(&["--grpc", "127.0.0.1:0"]).await;
    let taken = server.url("grpc").replace("grpc://", "");
    let out = tokio::time::timeout(
        WAIT,
        Command::new(BIN)
            .args(["--grpc", &taken])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("exited in time")
    .expect("ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot serve gRPC on"), "{stderr}");
    let (code, _) = server.stop().await;
    assert_eq!(code, 0);
}
