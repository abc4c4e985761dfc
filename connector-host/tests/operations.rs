//! `connector-host` as an operator runs it: `--metrics-addr` scraped over
//! real loopback HTTP, `/ready` following the registrations, `--shard` and
//! the StatefulSet ordinal splitting one registration list across
//! processes, and configuration from the environment.
//!
//! Every wait is on an event (a log line, the test server's state, a
//! process exit) and bounded; every port is 0.

use std::collections::{BTreeMap, BTreeSet};

use connector_core::proto::RejectReason;
use connector_core::Shard;
use connector_testkit::ApprovalPolicy;

mod support;
use connector_testkit::harness::json_execute;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_ready_are_served_while_every_registration_is_active() {
    let server = grpc_server().await;
    let engine = server.engine().clone();
    let url = server.url();
    let mut host = Host::with_metrics(&url, "5", &[]);
    let addr = host.metrics_addr().await;
    engine.wait_for_active(5, WAIT).await.expect("5 active");
    let keys = engine.active_keys();
    assert_eq!(keys, self::keys(5, None));
    one_execute_each(&engine, &keys).await;
    let failed = execute(&engine, &keys[0], json_execute("f", "fail", "{}")).await;
    assert!(!failed.success);

    let metrics = get_status(addr, "/metrics", 200).await;
    assert!(
        metrics
            .head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        metrics.head
    );
    let body = &metrics.body;
    for (i, key) in keys.iter().enumerate() {
        // The first key also answered the `fail`.
        let answered = if i == 0 { 2 } else { 1 };
        assert_lines(
            body,
            &[
                format!(r#"connector_client_executes{{registration="{key}",outcome="success"}} 1"#),
                format!(r#"connector_client_active{{registration="{key}"}} 1"#),
                format!(
                    r#"connector_client_connection_attempts{{registration="{key}",outcome="succeeded"}} 1"#
                ),
                format!(
                    r#"connector_client_execute_duration_count{{registration="{key}"}} {answered}"#
                ),
            ],
        );
    }
    assert_lines(
        body,
        &[
            r#"connector_client_executes{registration="demo.echo.echo-0",outcome="handler"} 1"#,
            r#"connector_host_registrations{state="active"} 5"#,
            r#"connector_host_registrations{state="stopped"} 0"#,
            r#"connector_host_registrations{state="backoff"} 0"#,
            "connector_host_connections 1",
            "connector_host_streams 5",
            "connector_host_ready 1",
            "# TYPE connector_client_execute_duration histogram",
            "# TYPE connector_host_registrations gauge",
        ],
    );
    assert!(
        body.contains("# HELP connector_client_executes "),
        "descriptions are rendered:\n{body}"
    );

    let ready = get_status(addr, "/ready", 200).await;
    assert!(ready.body.starts_with("ready"), "{ready:?}");
    let head = http(
        addr,
        b"HEAD /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        false,
    )
    .await;
    assert_eq!((head.status, head.body.as_str()), (200, ""), "{head:?}");

    // What is not a scrape or a probe gets a clear status and no harm done.
    get_status(addr, "/nope", 404).await;
    let post = http(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbody",
        false,
    )
    .await;
    assert_eq!(post.status, 405, "{post:?}");
    assert!(
        post.head.to_ascii_lowercase().contains("allow: get, head"),
        "{post:?}"
    );
    let garbage = http(addr, b"\x16\x03\x01 hello there\r\n\r\n", false).await;
    assert_eq!(garbage.status, 400, "{garbage:?}");
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Filler: {}\r\n\r\n",
        "x".repeat(16 * 1024)
    );
    let huge = http(addr, huge.as_bytes(), false).await;
    assert_eq!(huge.status, 431, "{huge:?}");
    // HTTP/1.0 without headers (`printf 'GET /ready HTTP/1.0\r\n\r\n' | nc`).
    let bare = http(addr, b"GET /ready HTTP/1.0\r\n\r\n", true).await;
    assert_eq!(bare.status, 200, "{bare:?}");
    get_status(addr, "/ready?after=abuse", 200).await;

    let (stdout, stderr) = host.stop_ok().await;
    assert!(stdout.contains("stopped gracefully (SIGTERM)"), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_a_registration_is_rejected() {
    let server = grpc_server().await;
    let engine = server.engine().clone();
    let rejected = "demo.echo.echo-2";
    engine.set_policy_for(
        &rejected.parse().expect("a key"),
        ApprovalPolicy::Reject(RejectReason::Denied),
    );
    let mut host = Host::with_metrics(&server.url(), "5", &[]);
    let addr = host.metrics_addr().await;
    engine.wait_for_active(4, WAIT).await.expect("4 active");
    let active = engine.active_keys();
    assert!(!active.iter().any(|k| k == rejected), "{active:?}");
    one_execute_each(&engine, &active).await;
    // The host has read the rejection (its warning), so it will not retry.
    let warning = host.line_with("registration rejected").await;
    assert!(warning.contains(rejected), "{warning}");

    let ready = get_status(addr, "/ready", 503).await;
    assert!(
        ready
            .body
            .starts_with("not ready: 1 of 5 registrations not active"),
        "{ready:?}"
    );
    let head = http(addr, b"HEAD /ready HTTP/1.1\r\n\r\n", false).await;
    assert_eq!((head.status, head.body.as_str()), (503, ""), "{head:?}");
    assert_metrics(
        addr,
        &[
            r#"connector_host_registrations{state="active"} 4"#,
            "connector_host_ready 0",
        ],
    )
    .await;

    let (stdout, _) = host.stop_ok().await;
    assert_rows(&stdout, &[rejected], "stopped");
    assert!(
        stdout.contains("DENIED"),
        "the stop reason is printed: {stdout}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_cover_thirty_registrations_exactly_once() {
    let server = grpc_server().await;
    let engine = server.engine().clone();
    let url = server.url();
    let mut hosts: Vec<Host> = (0..3)
        .map(|i| {
            let shard = format!("{i}/3");
            Host::spawn(
                &[
                    "--url", &url, "--count", "30", "--shard", &shard, "--log", LOG,
                ],
                &[],
            )
        })
        .collect();
    engine.wait_for_active(30, WAIT).await.expect("30 active");
    assert_eq!(engine.active_keys(), keys(30, None));
    let streams = engine.registrations();
    assert_eq!(streams.len(), 30, "one live stream per key: {streams:?}");
    assert_eq!(engine.stats().duplicate_active, 0);

    // Each process has its own HTTP/2 connection, so the streams of one
    // connection are the keys one process hosts: they must be exactly the
    // keys its shard owns.
    let mut by_connection: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for s in &streams {
        by_connection
            .entry(s.connection_id)
            .or_default()
            .insert(s.key.clone());
    }
    let hosted: BTreeSet<BTreeSet<String>> = by_connection.into_values().collect();
    let owned: BTreeSet<BTreeSet<String>> = (0..3)
        .map(|i| {
            keys(30, Some(Shard::new(i, 3).expect("valid")))
                .into_iter()
                .collect()
        })
        .collect();
    assert_eq!(hosted, owned);

    for (i, host) in hosts.iter_mut().enumerate() {
        let n = keys(30, Some(Shard::new(i as u32, 3).expect("valid"))).len();
        let line = host.line_with(&format!("shard {i}/3: hosting")).await;
        assert!(
            line.contains(&format!("hosting {n} of 30 registrations")),
            "{line}"
        );
    }
    for host in hosts {
        host.stop_ok().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_shard_and_metrics_settings_are_one_line_and_exit_2() {
    let url = ["--url", "grpc://127.0.0.1:1"];
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    let in_use = [url[0], url[1], "--metrics-addr", &taken];
    /// What is wrong, the arguments, the environment, what the error names.
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 10] = [
        ("--shard 3/3", &["--shard", "3/3"], &[], "3/3"),
        ("--shard 1/0", &["--shard", "1/0"], &[], "1/0"),
        ("--shard x", &["--shard", "x"], &[], "expected I/N"),
        (
            "CONNECTOR_HOST_SHARD=5/2",
            &url,
            &[("CONNECTOR_HOST_SHARD", "5/2")],
            "5/2",
        ),
        (
            "no ordinal in HOSTNAME",
            &url,
            &[("CONNECTOR_HOST_SHARDS", "2"), ("HOSTNAME", "laptop")],
            "laptop",
        ),
        (
            "ordinal out of range",
            &url,
            &[("CONNECTOR_HOST_SHARDS", "2"), ("HOSTNAME", "conn-2")],
            "2/2",
        ),
        (
            "no HOSTNAME",
            &url,
            &[("CONNECTOR_HOST_SHARDS", "2")],
            "HOSTNAME",
        ),
        (
            "CONNECTOR_HOST_SHARDS=0",
            &url,
            &[("CONNECTOR_HOST_SHARDS", "0"), ("HOSTNAME", "conn-0")],
            "--shards",
        ),
        (
            "--metrics-addr without a port",
            &["--metrics-addr", "127.0.0.1"],
            &[],
            "HOST:PORT",
        ),
        ("a metrics address in use", &in_use, &[], "cannot listen"),
    ];
    for (what, args, env, needle) in cases {
        let (code, stdout, stderr) = run(args, env).await;
        assert!(stdout.is_empty(), "{what}: nothing started: {stdout}");
        assert_one_line_config_error(what, code, &stderr, needle);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_ordinal_hosts_the_same_keys_as_the_explicit_shard() {
    let expected = keys(12, Some(Shard::new(1, 2).expect("valid")));
    assert!(
        !expected.is_empty() && expected.len() < 12,
        "a real split: {expected:?}"
    );
    let mut seen = Vec::new();
    for by_env in [false, true] {
        let server = grpc_server().await;
        let engine = server.engine().clone();
        let url = server.url();
        // The second run is configured the way the StatefulSet does it:
        // from the environment only.
        let host = if by_env {
            Host::spawn(
                &[],
                &[
                    ("CONNECTOR_HOST_URL", url.as_str()),
                    ("CONNECTOR_HOST_COUNT", "12"),
                    ("CONNECTOR_HOST_LOG", LOG),
                    ("CONNECTOR_HOST_SHARDS", "2"),
                    ("HOSTNAME", "connector-host-1"),
                ],
            )
        } else {
            Host::spawn(
                &[
                    "--url", &url, "--count", "12", "--shard", "1/2", "--log", LOG,
                ],
                &[],
            )
        };
        let mut host = host;
        let line = host.line_with("shard 1/2: hosting").await;
        assert!(
            line.contains(&format!("hosting {} of 12 registrations", expected.len())),
            "{line}"
        );
        engine
            .wait_for_active(expected.len(), WAIT)
            .await
            .expect("the shard's keys active");
        seen.push(engine.active_keys());
        let (stdout, _) = host.stop_ok().await;
        assert!(
            stdout.contains(&format!("total ({})", expected.len())),
            "{stdout}"
        );
        server.stop().await;
    }
    assert_eq!(seen[0], expected);
    assert_eq!(seen[1], expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_owns_nothing_idles_ready_until_sigterm() {
    // One registration, two shards: one of them owns nothing.
    let key = &keys(1, None)[0];
    let idle = (0..2)
        .map(|i| Shard::new(i, 2).expect("valid"))
        .find(|s| !keys(1, Some(*s)).contains(key))
        .expect("one shard owns nothing");
    let server = grpc_server().await;
    let shard = idle.to_string();
    let mut host = Host::with_metrics(&server.url(), "1", &["--shard", &shard]);
    let addr = host.metrics_addr().await;
    host.line_with("owns none of the 1 registrations").await;
    let ready = get_status(addr, "/ready", 200).await;
    assert!(ready.body.starts_with("ready"), "{ready:?}");
    assert_metrics(
        addr,
        &[
            r#"connector_host_registrations{state="active"} 0"#,
            "connector_host_connections 0",
            "connector_host_ready 1",
        ],
    )
    .await;
    assert_eq!(server.total_connections_accepted(), 0);
    let (stdout, _) = host.stop_ok().await;
    assert!(stdout.contains("total (0)"), "{stdout}");
    assert!(stdout.contains("stopped gracefully (SIGTERM)"), "{stdout}");
    server.stop().await;
}

#[tokio::test]
async fn the_demo_serves_metrics_too() {
    let mut host = Host::spawn(
        &[
            "--count",
            "2",
            "--metrics-addr",
            "127.0.0.1:0",
            "--log",
            LOG,
        ],
        &[],
    );
    host.metrics_addr().await;
    let (stdout, _) = host.finish_ok().await;
    assert!(stdout.contains("2 active"), "{stdout}");
}

#[tokio::test]
async fn every_flag_can_come_from_the_environment() {
    let (help, _) = run_ok(&["--help"], &[]).await;
    for var in FLAGS.map(env_var) {
        assert!(help.contains(&var), "{var} missing from --help:\n{help}");
    }

    // The demo configured by variables alone; a bad variable is exit 2,
    // named like its flag.
    let (stdout, _) = run_ok(
        &[],
        &[
            ("CONNECTOR_HOST_COUNT", "2"),
            ("CONNECTOR_HOST_TENANT", "envt"),
            ("CONNECTOR_HOST_TRANSPORT", "ws"),
            ("CONNECTOR_HOST_LOG", "warn"),
        ],
    )
    .await;
    assert!(stdout.contains("envt.echo.echo-1"), "{stdout}");
    assert!(stdout.contains("TCP connections used: 2"), "{stdout}");
    let (code, _, stderr) = run(&[], &[("CONNECTOR_HOST_COUNT", "lots")]).await;
    assert_one_line_config_error("bad CONNECTOR_HOST_COUNT", code, &stderr, "--count");
    // A flag on the command line wins over its variable.
    let (stdout, _) = run_ok(
        &["--count", "1", "--log", "warn"],
        &[("CONNECTOR_HOST_COUNT", "lots")],
    )
    .await;
    assert!(stdout.contains("total (1)"), "{stdout}");
}

#[tokio::test]
async fn the_statefulset_manifest_uses_real_variables_and_routes() {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/statefulset.yaml"
    ))
    .expect("read deploy/statefulset.yaml");
    let (help, _) = run_ok(&["--help"], &[]).await;
    let vars: BTreeSet<&str> = manifest
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("CONNECTOR_HOST_"))
        .collect();
    // The manifest runs an elastic fleet: no static shard count to keep in
    // step with `replicas`.
    assert!(vars.contains("CONNECTOR_HOST_FLEET"), "{vars:?}");
    assert!(!vars.contains("CONNECTOR_HOST_SHARDS"), "{vars:?}");
    assert!(vars.contains("CONNECTOR_HOST_AUTH_TOKEN"), "{vars:?}");
    for var in vars {
        assert!(help.contains(var), "{var} is not a connector-host variable");
    }
    for needle in [
        "path: /ready",
        "path: /livez",
        r#"args: ["--metrics-addr", "0.0.0.0:9090"]"#,
        "fieldPath: metadata.name",
        "clusterIP: None",
    ] {
        assert!(manifest.contains(needle), "{needle} missing");
    }
}
