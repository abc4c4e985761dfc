//! The `connector-host` binary in a fleet (`--fleet etcd://…`), as an
//! operator runs it: separate host processes against a real etcd (started
//! here on free loopback ports) and a real testkit gRPC server started here.
//!
//! Each replica is given its own auth token (`tok-ID`), so the server's view
//! says which process hosts which key; a monitor fails the test on any
//! moment with two live streams for one key. Every wait is bounded and waits
//! on the server's state changes, never on a sleep.

mod fleet_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use connector_core::{owner_of, RegistrationKey};
use connector_testkit::{GrpcTestServer, TestServer};
use tokio::time::Instant;

use fleet_support::{setup, streams, Etcd, Monitor};
use support::{get, grpc_server, has_line, one_execute_each, temp_dir, write, Host, LOG, WAIT};

/// Flags every replica started by flags gets: fast reconnects.
const FAST: [&str; 6] = [
    "--reconnect-delay-ms",
    "20",
    "--jitter-ms",
    "20",
    "--max-backoff-ms",
    "200",
];

/// `tenant.type.instance` of `count` registrations `tenant.echo.{prefix}N`.
fn keys_of(tenant: &str, prefix: &str, count: usize) -> Vec<RegistrationKey> {
    (0..count)
        .map(|i| RegistrationKey::new(tenant, "echo", format!("{prefix}{i}")).expect("valid key"))
        .collect()
}

/// Member id → the keys rendezvous hashing gives it among `ids` (members
/// that get none are left out, as the server never sees them).
fn expected(keys: &[RegistrationKey], ids: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for k in keys {
        let owner = owner_of(k, ids.iter().copied()).expect("members");
        m.entry(owner.to_string())
            .or_default()
            .insert(k.to_string());
    }
    m
}

/// Member id → the keys the server has a live stream for from that replica
/// (told apart by their tokens, `tok-ID`).
fn hosted_by(engine: &TestServer) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in engine.registrations() {
        let who = r
            .register
            .auth_token
            .strip_prefix("tok-")
            .unwrap_or("?")
            .to_string();
        m.entry(who).or_default().insert(r.key);
    }
    m
}

/// Every key has one live approved stream, from the replica that
/// rendezvous hashing over `ids` names.
fn settled(engine: &TestServer, keys: &[RegistrationKey], ids: &[&str]) -> bool {
    streams(engine, keys.len()).is_some() && hosted_by(engine) == expected(keys, ids)
}

async fn settle(engine: &TestServer, keys: &[RegistrationKey], ids: &[&str], limit: Duration) {
    if engine
        .wait_until(limit, |s| settled(s, keys, ids))
        .await
        .is_err()
    {
        let now: BTreeMap<String, usize> = hosted_by(engine)
            .into_iter()
            .map(|(who, keys)| (who, keys.len()))
            .collect();
        let want: BTreeMap<String, usize> = expected(keys, ids)
            .into_iter()
            .map(|(who, keys)| (who, keys.len()))
            .collect();
        panic!(
            "not settled on {ids:?} within {limit:?}: hosted {now:?}, expected {want:?}, \
             {} live streams",
            engine.registrations().len()
        );
    }
}

/// The keys of `--count 60`.
fn sixty() -> Vec<RegistrationKey> {
    keys_of("demo", "echo-", 60)
}

/// [`setup`] under `prefix`, then `h0`, `h1`, `h2` with `lease`, hosting 60
/// registrations (`demo.echo.echo-N`, [`sixty`]) once each among them
/// ([`settle`]); None when etcd is not installed.
async fn setup_three(
    prefix: &str,
    lease: u64,
) -> Option<(Etcd, TestServer, GrpcTestServer, Monitor, Vec<Replica>)> {
    let (etcd, engine, server, monitor) = setup(prefix).await?;
    let mut replicas = Vec::new();
    for id in ["h0", "h1", "h2"] {
        replicas.push(Replica::start(&etcd, prefix, id, &server, 60, lease).await);
    }
    settle(&engine, &sixty(), &["h0", "h1", "h2"], WAIT).await;
    Some((etcd, engine, server, monitor, replicas))
}

/// A `connector-host --fleet` process with `--count N` flag registrations.
struct Replica {
    id: &'static str,
    process: Host,
    metrics: std::net::SocketAddr,
}

impl Replica {
    async fn start(
        etcd: &Etcd,
        prefix: &str,
        id: &'static str,
        server: &GrpcTestServer,
        count: usize,
        lease: u64,
    ) -> Self {
        let url = server.url();
        let fleet = etcd.url(prefix);
        let count = count.to_string();
        let lease = lease.to_string();
        let token = format!("tok-{id}");
        let mut args = vec![
            "--url",
            &url,
            "--count",
            &count,
            "--fleet",
            &fleet,
            "--fleet-member",
            id,
            "--fleet-lease-secs",
            &lease,
            "--auth-token",
            &token,
        ];
        args.extend(FAST);
        Self::spawn(id, &args, &[]).await
    }

    /// `args` plus `--metrics-addr 127.0.0.1:0 --log LOG`, once it listens.
    async fn spawn(id: &'static str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut args = args.to_vec();
        args.extend(["--metrics-addr", "127.0.0.1:0", "--log", LOG]);
        let mut process = Host::spawn(&args, env);
        let metrics = process.metrics_addr().await;
        Replica {
            id,
            process,
            metrics,
        }
    }

    /// Every one of `lines` is a line of its `/metrics`.
    async fn assert_metrics(&self, lines: &[&str]) {
        let text = self.metrics_text().await;
        for line in lines {
            assert!(has_line(&text, line), "{}: no {line:?} in\n{text}", self.id);
        }
    }

    async fn metrics_text(&self) -> String {
        let r = get(self.metrics, "/metrics").await;
        assert_eq!(r.status, 200, "{}: /metrics", self.id);
        r.body
    }

    /// The keys of its `/registrations`.
    async fn listed(&self) -> BTreeSet<String> {
        let r = get(self.metrics, "/registrations").await;
        assert_eq!(r.status, 200, "{}: /registrations", self.id);
        let list: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        list.as_array()
            .expect("an array")
            .iter()
            .map(|o| o["key"].as_str().expect("a key").to_string())
            .collect()
    }

    /// SIGTERM, then the exit: code 0 after saying it left the fleet.
    async fn terminate(self) -> Duration {
        let asked = Instant::now();
        let (code, stdout, stderr) = self.process.stop().await;
        let took = asked.elapsed();
        assert_eq!(code, 0, "{}: stdout:\n{stdout}\nstderr:\n{stderr}", self.id);
        assert!(
            stdout.contains("stopped gracefully (SIGTERM)"),
            "{}: {stdout}",
            self.id
        );
        assert!(
            stderr.contains(
                "fleet: left; registrations closed, ownership keys deleted, lease revoked"
            ),
            "{}: {stderr}",
            self.id
        );
        took
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_host_sixty_once_and_a_sigterm_hands_over_at_once() {
    // The default-sized lease (10 s): a hand-over much faster than that
    // can only come from the leaver deleting its keys and revoking.
    let lease = 10;
    let Some((etcd, engine, _server, monitor, mut replicas)) = setup_three("term", lease).await
    else {
        return;
    };
    let keys = sixty();
    let ids = ["h0", "h1", "h2"];
    // Afterwards every key is Active on its host's side too.
    one_execute_each(&engine, &keys).await;
    let shares = expected(&keys, &ids);
    for r in &replicas {
        let share = shares.get(r.id).cloned().unwrap_or_default();
        let ready = get(r.metrics, "/ready").await;
        assert_eq!(ready.status, 200, "{}: {}", r.id, ready.body);
        assert!(
            ready.body.contains("fleet joined: 3 members"),
            "{}: {}",
            r.id,
            ready.body
        );
        assert_eq!(r.listed().await, share, "{}'s /registrations", r.id);
        let owned = format!("connector_host_fleet_owned {}", share.len());
        r.assert_metrics(&[
            "connector_host_fleet_members 3",
            &owned,
            "connector_host_ready 1",
        ])
        .await;
        let text = r.metrics_text().await;
        assert!(
            text.contains("connector_host_fleet_moves_total{direction=\"acquired\"}"),
            "{}:\n{text}",
            r.id
        );
    }
    let shares_len: Vec<usize> = shares.values().map(BTreeSet::len).collect();
    eprintln!("FIGURE fleet of 3 processes: shares {shares_len:?} of 60");

    // SIGTERM h2: its share moves without waiting for the lease.
    let leaver = replicas.pop().expect("three");
    let moving = shares.get(leaver.id).map_or(0, BTreeSet::len);
    let asked = Instant::now();
    let (moved, exited) = tokio::join!(
        async {
            settle(&engine, &keys, &["h0", "h1"], Duration::from_secs(5)).await;
            asked.elapsed()
        },
        leaver.terminate()
    );
    eprintln!(
        "FIGURE SIGTERM of a fleet process (lease {lease} s): its {moving} registrations \
         hosted elsewhere {:.2} s after the signal; it exited after {:.2} s",
        moved.as_secs_f64(),
        exited.as_secs_f64()
    );
    assert!(
        moved < Duration::from_secs(3),
        "a SIGTERM'd replica hands over at once, not after its {lease} s lease: {moved:?}"
    );
    for r in &replicas {
        r.assert_metrics(&["connector_host_fleet_members 2"]).await;
    }
    monitor
        .stop_all(&engine, replicas, Replica::terminate)
        .await;
    engine
        .wait_until(WAIT, |s| s.registrations().is_empty())
        .await
        .expect("every stream closed after the last replica left");
    monitor.assert_clean(&engine);
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_s_share_is_hosted_again_within_the_lease() {
    let lease = 2;
    let Some((etcd, engine, _server, monitor, mut replicas)) = setup_three("kill9", lease).await
    else {
        return;
    };
    let keys = sixty();
    let victim = replicas.remove(1);
    let moving = expected(&keys, &["h0", "h1", "h2"])
        .get("h1")
        .map_or(0, BTreeSet::len);
    let killed = Instant::now();
    victim.process.signal("KILL");
    settle(
        &engine,
        &keys,
        &["h0", "h2"],
        Duration::from_secs(lease + 4),
    )
    .await;
    eprintln!(
        "FIGURE kill -9 of a fleet process (lease {lease} s): its {moving} registrations \
         hosted elsewhere {:.2} s later",
        killed.elapsed().as_secs_f64()
    );
    drop(victim);
    monitor
        .stop_all(&engine, replicas, Replica::terminate)
        .await;
    drop(etcd);
}

fn config(url: &str, fleet: &str, registrations: &str) -> String {
    format!(
        "url = \"{url}\"\nfleet = \"{fleet}\"\nfleet_lease_secs = 5\n\
         reconnect_delay_ms = 20\njitter_ms = 20\nmax_backoff_ms = 200\n\n\
         [defaults]\ntenant = \"acme\"\nconnector_type = \"echo\"\n\
         auth_token_env = \"FLEET_TOKEN\"\n\n{registrations}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_fleet_s_list_and_leaves_the_rest_untouched() {
    let Some((etcd, engine, server, monitor)) = setup("reload").await else {
        return;
    };
    let d = temp_dir("fleet-host", "reload");
    let file = d.join("host.toml");
    let fleet = etcd.url("reload");
    write(
        &file,
        &config(
            &server.url(),
            &fleet,
            "[[registration]]\ninstance_prefix = \"a-\"\ncount = 30\n",
        ),
    );
    let path = file.to_str().expect("UTF-8 path");
    // The member id from its variable, the fleet and the lease from the file.
    let mut replicas = Vec::new();
    for id in ["h0", "h1"] {
        let token = format!("tok-{id}");
        let env = [
            ("CONNECTOR_HOST_FLEET_MEMBER", id),
            ("FLEET_TOKEN", token.as_str()),
        ];
        replicas.push(Replica::spawn(id, &["--config", path], &env).await);
    }
    let ids = ["h0", "h1"];
    let first = keys_of("acme", "a-", 30);
    settle(&engine, &first, &ids, WAIT).await;
    let before = streams(&engine, 30).expect("settled");

    // a-20 … a-29 go, b-0 … b-9 come; a-0 … a-19 stay.
    write(
        &file,
        &config(
            &server.url(),
            &fleet,
            "[[registration]]\ninstance_prefix = \"a-\"\ncount = 20\n\n\
             [[registration]]\ninstance_prefix = \"b-\"\ncount = 10\n",
        ),
    );
    for r in &replicas {
        r.process.signal("HUP");
    }
    let mut second = keys_of("acme", "a-", 20);
    second.extend(keys_of("acme", "b-", 10));
    settle(&engine, &second, &ids, WAIT).await;
    let after = streams(&engine, 30).expect("settled");
    for k in keys_of("acme", "a-", 20) {
        let k = k.to_string();
        assert_eq!(
            before.get(&k),
            after.get(&k),
            "{k} was untouched by the reload"
        );
    }
    for r in &replicas {
        r.assert_metrics(&["connector_host_config_reloads_total{outcome=\"ok\"} 1"])
            .await;
        let share = expected(&second, &ids)
            .get(r.id)
            .cloned()
            .unwrap_or_default();
        assert_eq!(r.listed().await, share, "{}'s /registrations", r.id);
    }
    monitor
        .stop_all(&engine, replicas, Replica::terminate)
        .await;
    let _ = std::fs::remove_dir_all(&d);
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_and_hosting_nothing_until_etcd_answers() {
    let Some(mut etcd) = Etcd::prepare("late") else {
        return;
    };
    let server = grpc_server().await;
    let engine = server.engine().clone();
    let monitor = Monitor::start(&engine);
    let url = server.url();
    let fleet = etcd.url("late");
    // The fleet URL from its variable; lease 2 s keeps the join backoff short.
    let mut args = vec![
        "--url",
        &url,
        "--count",
        "6",
        "--fleet-member",
        "h0",
        "--fleet-lease-secs",
        "2",
        "--auth-token",
        "tok-h0",
    ];
    args.extend(FAST);
    let Replica {
        mut process,
        metrics,
        ..
    } = Replica::spawn("h0", &args, &[("CONNECTOR_HOST_FLEET", fleet.as_str())]).await;
    // etcd is not there: the join fails (logged), nothing is hosted.
    process.line_with("fleet: cannot join; retrying").await;
    let ready = get(metrics, "/ready").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(
        ready.body.starts_with("not ready: fleet connecting"),
        "{}",
        ready.body
    );
    let text = get(metrics, "/metrics").await.body;
    support::assert_lines(
        &text,
        &["connector_host_fleet_members 0", "connector_host_ready 0"],
    );
    let list = get(metrics, "/registrations").await.body;
    assert_eq!(list, "[]", "nothing hosted before joining");
    assert!(engine.registrations().is_empty(), "nothing registered");

    etcd.spawn().await;
    let keys = keys_of("demo", "echo-", 6);
    settle(&engine, &keys, &["h0"], WAIT).await;
    one_execute_each(&engine, &keys).await;
    let ready = get(metrics, "/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(
        ready.body.contains("fleet joined: 1 member, 6 owned here"),
        "{}",
        ready.body
    );
    process.stop_ok().await;
    monitor.assert_clean(&engine);
}
