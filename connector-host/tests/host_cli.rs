//! The `connector-host` binary against its contract: the demo, the exit
//! codes of configuration errors, and a graceful SIGTERM with a request in
//! flight against a server started here. Every wait is bounded; servers bind
//! `127.0.0.1:0`.

use std::time::Duration;

use connector_testkit::harness::json_execute;

mod support;
use support::{
    addresses, assert_exit, assert_one_line_config_error, assert_rows, execute, execute_ok,
    grpc_server, ws_server, Host, FLAGS, WAIT,
};

async fn run(args: &[&str]) -> (i32, String, String) {
    support::run(args, &[]).await
}

async fn run_ok(args: &[&str]) -> String {
    support::run_ok(args, &[]).await.0
}

/// `--url URL --count COUNT --log warn`, then `extra`.
fn quiet(url: &str, count: &str, extra: &[&str]) -> Host {
    let mut args = vec!["--url", url, "--count", count, "--log", "warn"];
    args.extend_from_slice(extra);
    Host::spawn(&args, &[])
}

#[tokio::test]
async fn demo_with_no_arguments_hosts_three_active_registrations_and_exits_0() {
    let stdout = run_ok(&[]).await;
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
    assert_exit(code, 0, &stdout, &stderr);
    assert_rows(&stdout, &addresses("t1.e_c-ho.i-", 4), "active");
    assert!(stdout.contains("TCP connections used: 4"), "{stdout}");
    assert!(stderr.is_empty(), "--log warn keeps stderr quiet: {stderr}");
}

#[tokio::test]
async fn configuration_errors_are_one_line_and_exit_2_before_anything_starts() {
    // 127 + "0".."9" fits; "10" makes 129 characters: every instance id is
    // checked, not just the first.
    let prefix = "p".repeat(127);
    // What is wrong, the arguments, what the one error line names.
    let cases: [(&str, &[&str], &str); 7] = [
        ("unknown URL scheme", &["--url", "ftp://x:1"], "ftp"),
        (
            "port out of range",
            &["--url", "grpc://127.0.0.1:70000"],
            "70000",
        ),
        (
            "invalid instance prefix",
            &["--count", "2", "--instance-prefix", "bad id"],
            "bad id0",
        ),
        (
            "the eleventh instance id is too long",
            &["--count", "11", "--instance-prefix", &prefix],
            "129",
        ),
        ("bad tenant", &["--tenant", "a.b"], "--tenant"),
        (
            "empty connector type",
            &["--url", "ws://127.0.0.1:1", "--connector-type", ""],
            "--connector-type",
        ),
        (
            "unreadable CA file",
            &[
                "--url",
                "grpcs://127.0.0.1:1",
                "--ca-cert",
                "/nonexistent/ca.pem",
            ],
            "/nonexistent/ca.pem",
        ),
    ];
    for (what, args, needle) in cases {
        let (code, stdout, stderr) = run(args).await;
        assert_one_line_config_error(what, code, &stderr, needle);
        assert!(
            stdout.is_empty(),
            "{what}: the demo did not start: {stdout}"
        );
    }
}

#[tokio::test]
async fn an_unusable_ca_file_is_exit_2() {
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
        assert_exit(code, 2, &stdout, &stderr);
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
        let (code, _, stderr) = run(args).await;
        assert_one_line_config_error(&format!("{args:?}"), code, &stderr, "");
    }
}

#[tokio::test]
async fn help_explains_every_flag_of_the_contract() {
    let stdout = run_ok(&["--help"]).await;
    for flag in FLAGS {
        assert!(
            stdout.contains(flag),
            "{flag} missing from --help:\n{stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_in_flight_requests_and_exits_0() {
    let server = grpc_server().await;
    let engine = server.engine().clone();
    let url = server.url();
    let host = quiet(&url, "5", &[]);
    engine.wait_for_active(5, WAIT).await.expect("5 active");
    let keys = engine.active_keys();
    assert_eq!(keys, addresses("demo.echo.echo-", 5));
    assert_eq!(
        server.connection_count(),
        1,
        "5 streams on one HTTP/2 connection"
    );

    for (i, key) in keys.iter().enumerate() {
        let r = execute_ok(
            &engine,
            key,
            json_execute(&format!("e{i}"), "echo", r#"{"n": 1}"#),
        )
        .await;
        assert_eq!(r.payload, &br#"{"n": 1}"#[..]);
    }
    let fail = execute(&engine, &keys[1], json_execute("f", "fail", "{}")).await;
    assert_eq!(
        fail.error_kind(),
        connector_core::proto::ExecuteErrorKind::Handler
    );

    // A sleep, then an echo behind it on the same stream: once the echo is
    // answered, the host has read the sleep too, so it is in flight.
    let sleeping = engine
        .send_execute(&keys[0], json_execute("s", "sleep", r#"{"ms": 1500}"#))
        .expect("sent");
    execute_ok(&engine, &keys[0], json_execute("m", "echo", "{}")).await;

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
    assert_exit(code, 0, &stdout, &stderr);
    assert!(signalled.elapsed() < Duration::from_secs(5));
    assert_rows(&stdout, &keys, "active");
    assert!(stdout.contains("stopped gracefully (SIGTERM)"), "{stdout}");
    assert!(stdout.contains("TCP connections used: 1"), "{stdout}");
    assert_eq!(engine.stats().outstanding, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_secs_stops_a_websocket_host_by_itself() {
    let server = ws_server().await;
    let engine = server.engine().clone();
    let url = server.url();
    let host = quiet(&url, "3", &["--duration-secs", "2"]);
    engine.wait_for_active(3, WAIT).await.expect("3 active");
    execute_ok(
        &engine,
        &"demo.echo.echo-2".parse().expect("a key"),
        json_execute("x", "sleep", r#"{"ms": 10}"#),
    )
    .await;
    let (stdout, _) = host.finish_ok().await;
    assert_rows(&stdout, &addresses("demo.echo.echo-", 3), "active");
    assert!(stdout.contains("--duration-secs elapsed"), "{stdout}");
    assert!(stdout.contains("TCP connections used: 3"), "{stdout}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reconnect_host_exits_1_when_every_stream_has_ended() {
    let server = grpc_server().await;
    let engine = server.engine().clone();
    let host = quiet(&server.url(), "2", &["--no-reconnect"]);
    engine.wait_for_active(2, WAIT).await.expect("2 active");
    assert_eq!(engine.close_all_streams(), 2);
    let (code, stdout, stderr) = host.finish().await;
    assert_exit(code, 1, &stdout, &stderr);
    assert_rows(&stdout, &addresses("demo.echo.echo-", 2), "stopped");
    assert!(
        stderr.contains("every registration has stopped"),
        "{stderr}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_registrations_share_three_grpc_connections() {
    let server = grpc_server().await;
    let engine = server.engine().clone();
    let host = quiet(&server.url(), "200", &[]);
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
        execute_ok(
            &engine,
            &key.parse().expect("a key"),
            json_execute(&format!("s{i}"), "sleep", r#"{"ms": 5}"#),
        )
        .await;
    }
    host.sigterm();
    let (code, stdout, stderr) = host.finish_within(Duration::from_secs(10)).await;
    assert_exit(code, 0, &stdout, &stderr);
    assert!(stdout.contains("total (200)"), "{stdout}");
    assert!(stdout.contains("200 active"), "{stdout}");
    assert!(stdout.contains("TCP connections used: 3"), "{stdout}");
    server.stop().await;
}
