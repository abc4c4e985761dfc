//! Helpers of the `connector-host` process tests: the program with a clean
//! environment, its stderr read line by line, plain HTTP/1.1 requests.
#![allow(dead_code, reason = "each test file uses a part of these helpers")]
#![allow(unreachable_pub, reason = "a test helper module")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use connector_core::proto::{ExecuteRequest, ExecuteResponse};
use connector_core::{RegistrationKey, Shard};
use connector_testkit::harness::json_execute;
use connector_testkit::{
    GrpcServerOptions, GrpcTestServer, ServerEvent, TestServer, WsServerOptions, WsTestServer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub const BIN: &str = env!("CARGO_BIN_EXE_connector-host");
/// Bound for any one wait.
pub const WAIT: Duration = Duration::from_secs(60);
/// The host's own info lines (the metrics address, the shard line) and
/// warnings from everything else.
pub const LOG: &str = "warn,connector_host=info";

/// The program with a clean environment: none of the variables it reads
/// leaks in from the machine running the tests.
pub fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        let lower = name.to_ascii_lowercase();
        if name.starts_with("CONNECTOR_HOST_")
            || name == "RUST_LOG"
            || name == "HOSTNAME"
            || lower.ends_with("_proxy")
        {
            cmd.env_remove(&name);
        }
    }
    cmd.envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A failed assertion or timeout must not leave the process behind.
        .kill_on_drop(true);
    cmd
}

/// A running `connector-host` whose stderr is read line by line as it
/// comes, so the test can wait for a line and the pipe never fills.
pub struct Host {
    child: Child,
    stderr: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Host {
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = command(args, env).spawn().expect("spawn connector-host");
        let stderr = child.stderr.take().expect("stderr is piped");
        Self {
            child,
            stderr: connector_testkit::harness::forward_lines(stderr),
            seen: Vec::new(),
        }
    }

    /// `--url URL --count COUNT --metrics-addr 127.0.0.1:0 --log LOG`, then
    /// `extra`.
    pub fn with_metrics(url: &str, count: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "--url",
            url,
            "--count",
            count,
            "--metrics-addr",
            "127.0.0.1:0",
            "--log",
            LOG,
        ];
        args.extend_from_slice(extra);
        Self::spawn(&args, &[])
    }

    /// The first stderr line (from now on) that contains `needle`.
    pub async fn line_with(&mut self, needle: &str) -> String {
        let Self { stderr, seen, .. } = self;
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = stderr.recv().await {
                seen.push(line.clone());
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!(
                "no stderr line with {needle:?}; stderr so far:\n{}",
                self.seen.join("\n")
            ),
        }
    }

    /// The address of `--metrics-addr 127.0.0.1:0`, from its log line.
    pub async fn metrics_addr(&mut self) -> SocketAddr {
        let line = self.line_with("metrics: listening on ").await;
        line.split("metrics: listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    /// Sends `kill -SIG` (e.g. `HUP`) to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("the child is running");
        let status = std::process::Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {pid}");
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// SIGTERM, then [`Host::finish`].
    pub async fn stop(self) -> (i32, String, String) {
        self.sigterm();
        self.finish().await
    }

    /// [`Host::stop`], asserting exit code 0: stdout and stderr.
    pub async fn stop_ok(self) -> (String, String) {
        let (code, stdout, stderr) = self.stop().await;
        assert_exit(code, 0, &stdout, &stderr);
        (stdout, stderr)
    }

    /// [`Host::finish`], asserting exit code 0: stdout and stderr.
    pub async fn finish_ok(self) -> (String, String) {
        let (code, stdout, stderr) = self.finish().await;
        assert_exit(code, 0, &stdout, &stderr);
        (stdout, stderr)
    }

    /// Waits (at most [`WAIT`]) for the exit: code, stdout, all of stderr.
    pub async fn finish(self) -> (i32, String, String) {
        self.finish_within(WAIT).await
    }

    /// [`Host::finish`], the exit bounded by `within`.
    pub async fn finish_within(self, within: Duration) -> (i32, String, String) {
        let Self {
            child,
            mut stderr,
            mut seen,
        } = self;
        let out = tokio::time::timeout(within, child.wait_with_output())
            .await
            .expect("connector-host exited in time")
            .expect("connector-host output collected");
        // The reader ends at EOF, which the exit brings.
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(line) = stderr.recv().await {
                seen.push(line);
            }
        })
        .await;
        (
            out.status.code().expect("exited with a code, not a signal"),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            seen.join("\n"),
        )
    }
}

/// Runs to completion (configuration errors).
pub async fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    Host::spawn(args, env).finish().await
}

/// [`run`], asserting exit code 0: stdout and stderr.
pub async fn run_ok(args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    Host::spawn(args, env).finish_ok().await
}

/// Every flag of the contract; each can also come from its variable
/// ([`env_var`]).
pub const FLAGS: [&str; 22] = [
    "--url",
    "--count",
    "--tenant",
    "--connector-type",
    "--instance-prefix",
    "--auth-token",
    "--max-streams-per-channel",
    "--max-concurrent-requests",
    "--heartbeat-interval-ms",
    "--heartbeat-timeout-ms",
    "--reconnect-delay-ms",
    "--max-backoff-ms",
    "--jitter-ms",
    "--no-reconnect",
    "--duration-secs",
    "--ca-cert",
    "--log",
    "--transport",
    "--proxy",
    "--metrics-addr",
    "--shard",
    "--shards",
];

/// `--max-backoff-ms` → `CONNECTOR_HOST_MAX_BACKOFF_MS`.
pub fn env_var(flag: &str) -> String {
    let name = flag.trim_start_matches("--").replace('-', "_");
    format!("CONNECTOR_HOST_{}", name.to_ascii_uppercase())
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Sends `request` as is, reads the response until the server closes.
pub async fn http(addr: SocketAddr, request: &[u8], half_close: bool) -> HttpResponse {
    let raw = tokio::time::timeout(WAIT, async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("send the request");
        if half_close {
            stream.shutdown().await.expect("half-close");
        }
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .expect("read the response");
        raw
    })
    .await
    .expect("answered in time");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    HttpResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    http(addr, request.as_bytes(), false).await
}

/// `GET path`, asserting the status is `want`.
pub async fn get_status(addr: SocketAddr, path: &str, want: u16) -> HttpResponse {
    let r = get(addr, path).await;
    assert_eq!(r.status, want, "GET {path}: {r:?}");
    r
}

/// `GET /metrics` answers 200 with every one of `lines` ([`assert_lines`]):
/// the body.
pub async fn assert_metrics(addr: SocketAddr, lines: &[impl AsRef<str>]) -> String {
    let metrics = get_status(addr, "/metrics", 200).await;
    assert_lines(&metrics.body, lines);
    metrics.body
}

pub fn has_line(body: &str, line: &str) -> bool {
    body.lines().any(|l| l == line)
}

/// The summary table has a row for each of `addresses`, in `state`.
pub fn assert_rows(stdout: &str, addresses: &[impl ToString], state: &str) {
    for address in addresses {
        let address = address.to_string();
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(address.as_str()))
            .unwrap_or_else(|| panic!("no row for {address} in:\n{stdout}"));
        assert_eq!(
            row.split_whitespace().nth(1),
            Some(state),
            "row {row:?} in:\n{stdout}"
        );
    }
}

/// `prefix0` … `prefix{n-1}`.
pub fn addresses(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Every one of `lines` is a whole line of `body` (a metrics scrape).
pub fn assert_lines(body: &str, lines: &[impl AsRef<str>]) {
    for line in lines {
        let line = line.as_ref();
        assert!(has_line(body, line), "{line} missing from:\n{body}");
    }
}

/// The exit code is `want`; the message shows both streams.
pub fn assert_exit(code: i32, want: i32, stdout: &str, stderr: &str) {
    assert_eq!(code, want, "stdout:\n{stdout}\nstderr:\n{stderr}");
}

/// A directory of its own per test, `{prefix}-{pid}-{name}` in the temp
/// dir, empty.
pub fn temp_dir(prefix: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write the file");
}

/// Sends `req` on `key`'s stream and waits (at most [`WAIT`]) for the
/// answer, whatever it is.
pub async fn execute(
    engine: &TestServer,
    key: &RegistrationKey,
    req: ExecuteRequest,
) -> ExecuteResponse {
    engine
        .send_execute(key, req)
        .expect("sent")
        .wait(WAIT)
        .await
        .expect("answered")
}

/// [`execute`], asserting the answer is a success.
pub async fn execute_ok(
    engine: &TestServer,
    key: &RegistrationKey,
    req: ExecuteRequest,
) -> ExecuteResponse {
    let r = execute(engine, key, req).await;
    assert!(r.success, "{key}: {:?}: {}", r.error_kind(), r.error);
    r
}

/// How many `register` messages the server has seen for `key`.
pub fn registers(engine: &TestServer, key: &str) -> usize {
    engine
        .events()
        .iter()
        .filter(|e| matches!(e, ServerEvent::Registered { key: k, .. } if k == key))
        .count()
}

/// One execute answered per key. The host reads its approval before the
/// execute on the same stream, so afterwards every key is Active on the
/// host's side too, not only on the server's.
pub async fn one_execute_each(engine: &TestServer, keys: &[connector_core::RegistrationKey]) {
    for (i, key) in keys.iter().enumerate() {
        execute_ok(engine, key, json_execute(&format!("e{i}"), "echo", "{}")).await;
    }
}

/// `demo.echo.echo-0` … `-{count-1}`, the keys of `shard` (or all), sorted
/// as the test server sorts them.
pub fn keys(count: u32, shard: Option<Shard>) -> Vec<String> {
    let mut keys: Vec<String> = (0..count)
        .map(|i| RegistrationKey::new("demo", "echo", format!("echo-{i}")).expect("valid key"))
        .filter(|k| shard.is_none_or(|s| s.owns(k)))
        .map(|k| k.to_string())
        .collect();
    keys.sort();
    keys
}

pub fn assert_one_line_config_error(what: &str, code: i32, stderr: &str, needle: &str) {
    assert_eq!(code, 2, "{what}: stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: one line on stderr, got:\n{stderr}");
    assert!(
        lines[0].starts_with("connector-host: error: "),
        "{what}: {stderr}"
    );
    assert!(
        lines[0].contains(needle),
        "{what}: {needle:?} not in {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
}

pub async fn grpc_server() -> GrpcTestServer {
    GrpcTestServer::start(TestServer::new(), GrpcServerOptions::default())
        .await
        .expect("server starts")
}

pub async fn ws_server() -> WsTestServer {
    WsTestServer::start(TestServer::new(), WsServerOptions::default())
        .await
        .expect("server starts")
}
