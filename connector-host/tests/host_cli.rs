//! The `connector-host` binary against its contract: the demo, the exit
//! codes of configuration errors, and a graceful SIGTERM with a request in
//! flight against a server started here. Every wait is bounded; servers bind
//! `127.0.0.1:0`.

use std::time::Duration;

use connector_testkit::harness::json_execute;
use connector_testkit::{
    GrpcServerOptions, GrpcTestServer, TestServer, WsServerOptions, WsTestServer,
};

mod support;
use support::{assert_one_line_config_error, Host, WAIT};

async fn run(args: &[&str]) -> (i32, String, String) {
    support::run(args, &[]).await
}

/// Rows of the summary table for `prefix0..prefix{n-1}` in `state`.
fn assert_rows(stdout: &str, addresses: &[impl ToString], state: &str) {
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

fn addresses(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test]
async fn demo_with_no_arguments_hosts_three_active_registrations_and_exits_0() {
    let (code, stdout, stderr) = run(&[]).await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_rows(&stdout, &addresses("demo.echo.echo-", 3), "active");
    assert!(stdout.contains("total (3)"), "{stdout}");
    assert!(stdout.contains("3 active"), "{stdout}");
    assert!(stdout.contains("TCP connections used: 1"), "{stdout}");
    assert!(stdout.contains("workload: all "), "{stdout}");
    assert!(stdout.contains("responses as expected"), "{stdout}");
    // Not a terminal: plain progress lines, no carriage returns.
    assert!(stdout.contains("(100%)"), "{stdout}");
    assert!(!stdout.contains('\r'), "{stdout:?}");
}

#[tokio::test]
async fn demo_over_websocket_uses_one_socket_per_registration() {
    let (code, stdout, stderr) = run(&[
        "--transport",
        "ws",
        "--count",
        "4",
        "--tenant",
        "t1",
        "--connector-type",
        "e_c-ho",
        "--instance-prefix",
        "i-",
        "--log",
        "warn",
    ])
    .await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_rows(&stdout, &addresses("t1.e_c-ho.i-", 4), "active");
    assert!(stdout.contains("TCP connections used: 4"), "{stdout}");
    assert!(stderr.is_empty(), "--log warn keeps stderr quiet: {stderr}");
}

#[tokio::test]
async fn unknown_url_scheme_is_one_line_and_exit_2() {
    let (code, stdout, stderr) = run(&["--url", "ftp://x:1"]).await;
    assert_one_line_config_error(&stdout, code, &stderr, "ftp");
}

#[tokio::test]
async fn port_out_of_range_is_exit_2() {
    let (code, stdout, stderr) = run(&["--url", "grpc://127.0.0.1:70000"]).await;
    assert_one_line_config_error(&stdout, code, &stderr, "70000");
}

#[tokio::test]
async fn invalid_instance_prefix_is_exit_2_before_anything_starts() {
    let (code, stdout, stderr) = run(&["--count", "2", "--instance-prefix", "bad id"]).await;
    assert_one_line_config_error(&stdout, code, &stderr, "bad id0");
    assert!(stdout.is_empty(), "the demo did not start: {stdout}");
}

#[tokio::test]
async fn every_instance_id_is_checked_not_just_the_first() {
    // 127 + "0".."9" fits; "10" makes 129 characters.
    let prefix = "p".repeat(127);
    let (code, stdout, stderr) = run(&["--count", "11", "--instance-prefix", &prefix]).await;
    assert_one_line_config_error(&stdout, code, &stderr, "129");
}

#[tokio::test]
async fn bad_tenant_and_type_are_exit_2() {
    let (code, stdout, stderr) = run(&["--tenant", "a.b"]).await;
    assert_one_line_config_error(&stdout, code, &stderr, "--tenant");
    let (code, stdout, stderr) = run(&["--url", "ws://127.0.0.1:1", "--connector-type", ""]).await;
    assert_one_line_config_error(&stdout, code, &stderr, "--connector-type");
}

#[tokio::test]
async fn unreadable_or_unusable_ca_file_is_exit_2() {
    let (code, stdout, stderr) = run(&[
        "--url",
        "grpcs://127.0.0.1:1",
        "--ca-cert",
        "/nonexistent/ca.pem",
    ])
    .await;
    assert_one_line_config_error(&stdout, code, &stderr, "/nonexistent/ca.pem");

    // A file that looks like PEM but does not parse: reported by the
    // transport when the runner starts, still one line and exit 2.
    let dir = std::env::temp_dir().join(format!("connector-host-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("broken.pem");
    std::fs::write(
        &path,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .expect("write temp file");
    let path_str = path.to_str().expect("utf-8 temp path");
    for url in ["grpcs://127.0.0.1:1", "wss://127.0.0.1:1"] {
        let (code, stdout, stderr) = run(&["--url", url, "--ca-cert", path_str]).await;
        assert_eq!(code, 2, "{url}: stdout:\n{stdout}\nstderr:\n{stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("connector-host: error: "))
            .collect();
        assert_eq!(errors.len(), 1, "{url}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn usage_errors_are_one_line_and_exit_2() {
    for args in [
        &["--count", "abc"][..],
        &["--count", "0"],
        &["--bogus"],
        &["--transport", "carrier-pigeon"],
        &[
            "--max-streams-per-channel",
            "0",
            "--url",
            "grpc://127.0.0.1:1",
        ],
        &["--log", "[=invalid"],
    ] {
        let (code, stdout, stderr) = run(args).await;
        assert_eq!(code, 2, "{args:?}: stdout:\n{stdout}\nstderr:\n{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("connector-host: error: "),
            "{args:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn help_explains_every_flag_of_the_contract() {
    let (code, stdout, _) = run(&["--help"]).await;
    assert_eq!(code, 0);
    for flag in [
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
        "--proxy",
        "--metrics-addr",
        "--shard",
        "--shards",
    ] {
        assert!(
            stdout.contains(flag),
            "{flag} missing from --help:\n{stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_in_flight_requests_and_exits_0() {
    let server = GrpcTestServer::start(TestServer::new(), GrpcServerOptions::default())
        .await
        .expect("server starts");
    let engine = server.engine().clone();
    let url = server.url();
    let host = Host::spawn(&["--url", &url, "--count", "5", "--log", "warn"], &[]);
    engine.wait_for_active(5, WAIT).await.expect("5 active");
    let keys = engine.active_keys();
    assert_eq!(keys, addresses("demo.echo.echo-", 5));
    assert_eq!(
        server.connection_count(),
        1,
        "5 streams on one HTTP/2 connection"
    );

    for (i, key) in keys.iter().enumerate() {
        let r = engine
            .send_execute(key, json_execute(&format!("e{i}"), "echo", r#"{"n": 1}"#))
            .expect("sent")
            .wait(WAIT)
            .await
            .expect("answered");
        assert!(r.success, "{}", r.error);
        assert_eq!(r.payload, &br#"{"n": 1}"#[..]);
    }
    let fail = engine
        .send_execute(&keys[1], json_execute("f", "fail", "{}"))
        .expect("sent")
        .wait(WAIT)
        .await
        .expect("answered");
    assert_eq!(
        fail.error_kind(),
        connector_core::proto::ExecuteErrorKind::Handler
    );

    // A sleep, then an echo behind it on the same stream: once the echo is
    // answered, the host has read the sleep too, so it is in flight.
    let sleeping = engine
        .send_execute(&keys[0], json_execute("s", "sleep", r#"{"ms": 1500}"#))
        .expect("sent");
    let marker = engine
        .send_execute(&keys[0], json_execute("m", "echo", "{}"))
        .expect("sent")
        .wait(WAIT)
        .await
        .expect("answered");
    assert!(marker.success);

    let signalled = tokio::time::Instant::now();
    host.sigterm();
    let slept = sleeping
        .wait(WAIT)
        .await
        .expect("the in-flight sleep is answered");
    assert!(slept.success, "{:?}: {}", slept.error_kind(), slept.error);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&slept.payload).expect("json"),
        serde_json::json!({"slept_ms": 1500})
    );
    let (code, stdout, stderr) = host.finish_within(Duration::from_secs(5)).await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
    assert_rows(&stdout, &keys, "active");
    assert!(stdout.contains("stopped gracefully (SIGTERM)"), "{stdout}");
    assert!(stdout.contains("TCP connections used: 1"), "{stdout}");
    assert_eq!(engine.stats().outstanding, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_secs_stops_a_websocket_host_by_itself() {
    let server = WsTestServer::start(TestServer::new(), WsServerOptions::default())
        .await
        .expect("server starts");
    let engine = server.engine().clone();
    let url = server.url();
    let host = Host::spawn(
        &[
            "--url",
            &url,
            "--count",
            "3",
            "--duration-secs",
            "2",
            "--log",
            "warn",
        ],
        &[],
    );
    engine.wait_for_active(3, WAIT).await.expect("3 active");
    let r = engine
        .send_execute(
            &"demo.echo.echo-2".parse().expect("a key"),
            json_execute("x", "sleep", r#"{"ms": 10}"#),
        )
        .expect("sent")
        .wait(WAIT)
        .await
        .expect("answered");
    assert!(r.success, "{}", r.error);
    let (code, stdout, _) = host.finish().await;
    assert_eq!(code, 0, "{stdout}");
    assert_rows(&stdout, &addresses("demo.echo.echo-", 3), "active");
    assert!(stdout.contains("--duration-secs elapsed"), "{stdout}");
    assert!(stdout.contains("TCP connections used: 3"), "{stdout}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reconnect_host_exits_1_when_every_stream_has_ended() {
    let server = GrpcTestServer::start(TestServer::new(), GrpcServerOptions::default())
        .await
        .expect("server starts");
    let engine = server.engine().clone();
    let host = Host::spawn(
        &[
            "--url",
            &server.url(),
            "--count",
            "2",
            "--no-reconnect",
            "--log",
            "warn",
        ],
        &[],
    );
    engine.wait_for_active(2, WAIT).await.expect("2 active");
    assert_eq!(engine.close_all_streams(), 2);
    let (code, stdout, stderr) = host.finish().await;
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_rows(&stdout, &addresses("demo.echo.echo-", 2), "stopped");
    assert!(
        stderr.contains("every registration has stopped"),
        "{stderr}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_registrations_share_three_grpc_connections() {
    let server = GrpcTestServer::start(TestServer::new(), GrpcServerOptions::default())
        .await
        .expect("server starts");
    let engine = server.engine().clone();
    let host = Host::spawn(
        &["--url", &server.url(), "--count", "200", "--log", "warn"],
        &[],
    );
    engine.wait_for_active(200, WAIT).await.expect("200 active");
    // 80 streams per connection by default: 80 + 80 + 40.
    assert_eq!(server.connection_count(), 3);
    for (i, key) in [
        "demo.echo.echo-0",
        "demo.echo.echo-99",
        "demo.echo.echo-199",
    ]
    .iter()
    .enumerate()
    {
        let r = engine
            .send_execute(
                &key.parse().expect("a key"),
                json_execute(&format!("s{i}"), "sleep", r#"{"ms": 5}"#),
            )
            .expect("sent")
            .wait(WAIT)
            .await
            .expect("answered");
        assert!(r.success, "{key}: {}", r.error);
    }
    host.sigterm();
    let (code, stdout, _) = host.finish_within(Duration::from_secs(10)).await;
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("total (200)"), "{stdout}");
    assert!(stdout.contains("200 active"), "{stdout}");
    assert!(stdout.contains("TCP connections used: 3"), "{stdout}");
    server.stop().await;
}
