//! `connector-host --config PATH` against its contract
//! (`connector-host-config.md`): a file's registrations hosted with their
//! tokens, names and pauses; every ops endpoint; SIGHUP reload (add,
//! remove, change, unchanged untouched, invalid file kept out); one-line
//! errors with exit 2; idle sockets that cannot starve `/ready`.
//!
//! Every wait is on an event (a log line, the server's state) and bounded;
//! every port is 0.

use std::path::PathBuf;

use connector_testkit::GrpcTestServer;
use tokio::net::TcpStream;

mod support;
use support::*;

/// A directory of its own per test.
fn dir(name: &str) -> PathBuf {
    temp_dir("ch-config", name)
}

/// The active keys, sorted.
fn registrations(engine_server: &GrpcTestServer) -> Vec<connector_core::RegistrationKey> {
    engine_server.engine().active_keys()
}

/// `--config PATH --log LOG`.
fn spawn_config(config: &std::path::Path, env: &[(&str, &str)]) -> Host {
    let config_arg = config.to_string_lossy().into_owned();
    Host::spawn(&["--config", &config_arg, "--log", LOG], env)
}

/// [`spawn_config`], waited for until its metrics address is known and
/// exactly `active` (sorted) are active on `server`: the host and that
/// address.
async fn spawn_active(
    config: &std::path::Path,
    env: &[(&str, &str)],
    server: &GrpcTestServer,
    active: &[&str],
) -> (Host, std::net::SocketAddr) {
    let mut host = spawn_config(config, env);
    let addr = host.metrics_addr().await;
    server
        .engine()
        .wait_for_active(active.len(), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{} active: {e:?}", active.len()));
    assert_eq!(registrations(server), active);
    (host, addr)
}

/// Writes `text` to `config`, sends SIGHUP and waits for the log line
/// that starts with `outcome`.
async fn reload(host: &mut Host, config: &std::path::Path, text: &str, outcome: &str) -> String {
    write(config, text);
    host.signal("HUP");
    host.line_with(outcome).await
}

/// [`reload`], then waits (at most [`WAIT`]) until the server's state is
/// `done` (`what` names it when it is not).
async fn reload_until(
    host: &mut Host,
    config: &std::path::Path,
    text: &str,
    outcome: &str,
    server: &GrpcTestServer,
    what: &str,
    done: impl FnMut(&connector_testkit::TestServer) -> bool,
) {
    reload(host, config, text, outcome).await;
    server
        .engine()
        .wait_until(WAIT, done)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
}

fn stream_id(server: &GrpcTestServer, key: &str) -> u64 {
    server
        .engine()
        .registrations()
        .into_iter()
        .find(|r| r.key == key)
        .unwrap_or_else(|| panic!("{key} not registered"))
        .stream_id
}

async fn json(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    let r = get_status(addr, path, 200).await;
    assert!(
        r.head.to_ascii_lowercase().contains("application/json"),
        "{r:?}"
    );
    serde_json::from_str(&r.body).expect("JSON body")
}

fn by_key<'a>(list: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    list.as_array()
        .expect("an array")
        .iter()
        .find(|o| o["key"] == key)
        .unwrap_or_else(|| panic!("{key} not in {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_hosts_its_registrations_with_tokens_names_and_pauses() {
    let server = grpc_server().await;
    let dir = dir("hosts");
    let token = dir.join("beta-token");
    write(&token, "  beta-secret\n");
    let config = dir.join("host.toml");
    write(
        &config,
        &format!(
            r#"
url = "{url}"
metrics_addr = "127.0.0.1:0"

[defaults]
tenant = "acme"
auth_token_env = "ACME_TOKEN"
tags = ["prod"]

[[registration]]
connector_type = "echo"
instance_prefix = "e-"
count = 3
display_name = "Echo fleet"

[[registration]]
tenant = "beta"
connector_type = "echo"
instance = "b0"
auth_token_file = "{token}"
metadata = {{ region = "eu" }}

[[registration]]
connector_type = "echo"
instance = "p0"
paused = true
"#,
            url = server.url(),
            token = token.display()
        ),
    );
    let (mut host, addr) = spawn_active(
        &config,
        &[("ACME_TOKEN", "acme-secret")],
        &server,
        &[
            "acme.echo.e-0",
            "acme.echo.e-1",
            "acme.echo.e-2",
            "beta.echo.b0",
        ],
    )
    .await;
    for info in server.engine().registrations() {
        let r = &info.register;
        if info.key.starts_with("acme.") {
            assert_eq!(r.auth_token, "acme-secret", "{}", info.key);
            assert_eq!(r.display_name, "Echo fleet");
            assert_eq!(r.tags, ["prod"]);
        } else {
            assert_eq!(r.auth_token, "beta-secret", "trimmed file content");
            assert_eq!(r.tags, ["prod"], "tags from [defaults]");
            assert_eq!(r.metadata.get("region").map(String::as_str), Some("eu"));
        }
    }
    let keys = registrations(&server);
    one_execute_each(server.engine(), &keys).await;

    // /registrations: every hosted one, the paused one included.
    let list = json(addr, "/registrations").await;
    assert_eq!(list.as_array().map(Vec::len), Some(5), "{list}");
    let paused = by_key(&list, "acme.echo.p0");
    assert_eq!(paused["state"], "paused");
    assert_eq!(paused["requests_received"], 0);
    let e0 = by_key(&list, "acme.echo.e-0");
    assert_eq!(e0["state"], "active");
    assert_eq!(e0["requests_received"], 1);
    assert_eq!(e0["requests_succeeded"], 1);
    assert_eq!(e0["in_flight"], 0);
    assert!(e0["since_ms"].is_u64(), "{e0}");
    assert!(e0["last_error"].is_null(), "{e0}");
    // One connection, never lost; the only request succeeded.
    assert!(e0["connection_id"].is_u64(), "{e0}");
    for field in ["requests_failed", "disconnects", "reconnects"] {
        assert_eq!(e0[field], 0, "{field} in {e0}");
    }
    // Null until the first heartbeat answer, a number after.
    let rtt = &e0["last_heartbeat_rtt_ms"];
    assert!(rtt.is_null() || rtt.is_u64(), "{e0}");
    assert!(e0.get("last_heartbeat_rtt_ms").is_some(), "{e0}");
    assert!(!list.to_string().contains("secret"), "no token in {list}");

    // /ready leaves the paused one out; /livez; /metrics counts it.
    get_status(addr, "/ready", 200).await;
    get_status(addr, "/livez", 200).await;
    assert_metrics(
        addr,
        &[
            r#"connector_host_registrations{state="paused"} 1"#,
            r#"connector_host_registrations{state="active"} 4"#,
            "connector_host_ready 1",
        ],
    )
    .await;

    // The token file is read again when a registration is re-registered.
    write(&token, "rotated-secret");
    let changed = std::fs::read_to_string(&config).expect("read").replace(
        r#"metadata = { region = "eu" }"#,
        r#"metadata = { region = "us" }"#,
    );
    reload_until(
        &mut host,
        &config,
        &changed,
        "config reloaded: 0 added, 0 removed, 1 changed, 4 unchanged",
        &server,
        "re-registered with the rotated token",
        |s| {
            s.registrations()
                .iter()
                .any(|r| r.key == "beta.echo.b0" && r.register.auth_token == "rotated-secret")
        },
    )
    .await;

    let (_, stderr) = host.stop_ok().await;
    assert!(!stderr.contains("secret"), "{stderr}");
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file of `t.echo.INSTANCE` registrations, each with its extra lines.
fn reload_file(url: &str, registrations: &[(&str, &str)]) -> String {
    let body: String = registrations
        .iter()
        .map(|(instance, extra)| format!("[[registration]]\ninstance = \"{instance}\"\n{extra}\n"))
        .collect();
    format!("url = \"{url}\"\nmetrics_addr = \"127.0.0.1:0\"\n[defaults]\ntenant = \"t\"\nconnector_type = \"echo\"\n{body}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_removes_changes_and_leaves_the_rest_untouched() {
    let server = grpc_server().await;
    let url = server.url();
    let dir = dir("reload");
    let config = dir.join("host.toml");
    let first = [
        ("a0", ""),
        ("a1", "display_name = \"one\""),
        ("a2", ""),
        ("p0", "paused = true"),
    ];
    write(&config, &reload_file(&url, &first));
    let (mut host, addr) = spawn_active(
        &config,
        &[],
        &server,
        &["t.echo.a0", "t.echo.a1", "t.echo.a2"],
    )
    .await;
    let a0_stream = stream_id(&server, "t.echo.a0");

    // Gone, changed, new, unpaused; a0 unchanged.
    let second = [
        ("a0", ""),
        ("a1", "display_name = \"two\""),
        ("a3", ""),
        ("p0", "paused = false"),
    ];
    reload_until(
        &mut host,
        &config,
        &reload_file(&url, &second),
        "config reloaded: 1 added, 1 removed, 2 changed, 1 unchanged",
        &server,
        "the new set is active, a1 with its new name",
        |s| {
            s.active_keys() == ["t.echo.a0", "t.echo.a1", "t.echo.a3", "t.echo.p0"]
                && s.registrations()
                    .iter()
                    .any(|r| r.key == "t.echo.a1" && r.register.display_name == "two")
        },
    )
    .await;
    assert_eq!(
        stream_id(&server, "t.echo.a0"),
        a0_stream,
        "a0's stream untouched"
    );
    // a0: no new register; a1 re-registered; a2 registered once, removed.
    for (key, count) in [("t.echo.a0", 1), ("t.echo.a1", 2), ("t.echo.a2", 1)] {
        assert_eq!(registers(server.engine(), key), count, "{key}'s registers");
    }

    // An invalid file: one error line, the running set kept.
    let line = reload(
        &mut host,
        &config,
        &format!("{}colour = \"red\"\n", reload_file(&url, &second)),
        "reload failed, running set kept",
    )
    .await;
    assert!(line.contains("colour"), "{line}");
    assert_eq!(
        registrations(&server),
        ["t.echo.a0", "t.echo.a1", "t.echo.a3", "t.echo.p0"]
    );
    assert_eq!(stream_id(&server, "t.echo.a0"), a0_stream);

    // Pausing closes the stream and keeps it out of /ready.
    let mut third = second;
    third[0] = ("a0", "paused = true");
    reload_until(
        &mut host,
        &config,
        &reload_file(&url, &third),
        "config reloaded: 0 added, 0 removed, 1 changed, 3 unchanged",
        &server,
        "a0's stream closed",
        |s| !s.active_keys().iter().any(|k| k == "t.echo.a0"),
    )
    .await;
    one_execute_each(
        server.engine(),
        &["t.echo.a1", "t.echo.a3", "t.echo.p0"].map(|k| k.parse().expect("a key")),
    )
    .await;
    let list = json(addr, "/registrations").await;
    assert_eq!(by_key(&list, "t.echo.a0")["state"], "paused");
    assert_eq!(by_key(&list, "t.echo.p0")["state"], "active");
    assert!(list
        .as_array()
        .expect("array")
        .iter()
        .all(|o| o["key"] != "t.echo.a2"));
    get_status(addr, "/ready", 200).await;
    assert_metrics(
        addr,
        &[
            r#"connector_host_config_reloads_total{outcome="ok"} 2"#,
            r#"connector_host_config_reloads_total{outcome="failed"} 1"#,
        ],
    )
    .await;

    let (_, stderr) = host.stop_ok().await;
    let errors = stderr.lines().filter(|l| l.contains("ERROR")).count();
    assert_eq!(errors, 1, "one error line for the invalid file:\n{stderr}");
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn every_kind_of_bad_file_is_one_line_and_exit_2() {
    let dir = dir("errors");
    let head = "url = \"grpc://127.0.0.1:1\"\n";
    let one = "[[registration]]\ntenant = \"t\"\nconnector_type = \"echo\"\ninstance = \"a\"\n";
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown key", format!("{head}urll = 1\n{one}"), "urll"),
        ("unknown registration key", format!("{head}{one}colour = 1\n"), "line 6"),
        ("wrong type", format!("{head}jitter_ms = \"x\"\n{one}"), "jitter_ms"),
        (
            "no tenant",
            format!("{head}[[registration]]\nconnector_type = \"echo\"\ninstance = \"a\"\n"),
            "tenant",
        ),
        ("duplicate", format!("{head}{one}{one}"), "t.echo.a"),
        (
            "unknown type",
            format!("{head}[[registration]]\ntenant = \"t\"\nconnector_type = \"sql\"\ninstance = \"a\"\n"),
            "sql",
        ),
        ("token env unset", format!("{head}{one}auth_token_env = \"CH_TEST_UNSET\"\n"), "CH_TEST_UNSET"),
        (
            "token file unreadable",
            format!("{head}{one}auth_token_file = \"/nonexistent/ch-token\"\n"),
            "/nonexistent/ch-token",
        ),
        (
            "two token keys",
            format!("{head}{one}auth_token = \"a\"\nauth_token_env = \"B\"\n"),
            "more than one",
        ),
        (
            "instance and count",
            format!("{head}{one}instance_prefix = \"p\"\ncount = 2\n"),
            "both",
        ),
        ("no url", one.to_string(), "url"),
    ];
    let path = dir.join("bad.toml");
    let p = path.to_string_lossy().into_owned();
    for (what, text, needle) in cases {
        write(&path, &text);
        let (code, _stdout, stderr) = run(&["--config", &p], &[]).await;
        assert_one_line_config_error(what, code, &stderr, needle);
    }
    // A good file, bad company.
    write(&path, &format!("{head}{one}"));
    let mut cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "--count with --config",
            vec!["--config", &p, "--count", "2"],
            "--count",
        ),
        (
            "missing file",
            vec!["--config", "/nonexistent/host.toml"],
            "/nonexistent/host.toml",
        ),
    ];
    if cfg!(not(feature = "etcd")) {
        cases.push((
            "--fleet without etcd",
            vec!["--config", &p, "--fleet", "etcd://127.0.0.1:2379/c"],
            "cargo build --release -p connector-host --features etcd",
        ));
    }
    for (what, args, needle) in cases {
        let (code, _, stderr) = run(&args, &[]).await;
        assert_one_line_config_error(what, code, &stderr, needle);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_starve_ready() {
    let server = grpc_server().await;
    let mut host = Host::with_metrics(&server.url(), "1", &[]);
    let addr = host.metrics_addr().await;
    server
        .engine()
        .wait_for_active(1, WAIT)
        .await
        .expect("active");
    // 100 clients that connect and send nothing, plus 10 that stop half-way
    // through their request head.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    for _ in 0..10 {
        use tokio::io::AsyncWriteExt;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("send");
        idle.push(s);
    }
    // Bounded below the 5 s header read timeout: an endpoint with a small
    // slot limit would answer only once an idle client timed out.
    let bound = std::time::Duration::from_secs(3);
    for path in ["/ready", "/livez"] {
        let r = tokio::time::timeout(bound, get(addr, path))
            .await
            .unwrap_or_else(|_| panic!("{path} answered while 110 clients sit idle"));
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
    drop(idle);
    host.stop_ok().await;
    server.stop().await;
}
