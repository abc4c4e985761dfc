//! Elastic fleets against a real etcd (started here on free loopback
//! ports) and a real testkit gRPC server: three in-process replicas, each
//! its own `Fleet` + `FleetRunner` + `MultiConnectorRunner` over
//! `GrpcTransport`, sharing 60 registrations.
//!
//! A monitor samples the server's live streams per key on every change of
//! the server's state, so a moment with two live streams for one key fails
//! the test even if it lasts a millisecond.

mod fleet_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use connector_core::{
    owner_of, BaseConnector, ConnectorConfig, ConnectorRegistration, MultiConnectorRunner,
    MultiTransportOptions, RegistrationKey,
};
use connector_grpc::GrpcTransport;
use connector_host::fleet::{Fleet, FleetOptions, FleetRunner, FleetState};
use connector_testkit::connectors::Echo;
use connector_testkit::{GrpcTestServer, TestServer};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use fleet_support::{setup, Etcd, Monitor};

const COUNT: usize = 60;
const WAIT: Duration = Duration::from_secs(20);

fn registrations() -> Vec<ConnectorRegistration> {
    let echo: Arc<dyn BaseConnector> = Arc::new(Echo);
    (0..COUNT)
        .map(|i| {
            ConnectorRegistration::from_arc(
                ConnectorConfig::builder("acme", "echo", format!("e{i}"))
                    .build()
                    .expect("valid config"),
                Arc::clone(&echo),
            )
        })
        .collect()
}

fn keys() -> Vec<RegistrationKey> {
    registrations().iter().map(|r| r.key().clone()).collect()
}

/// One replica: its own fleet, runner and transport.
struct Replica {
    id: String,
    host: Arc<FleetRunner>,
    run: JoinHandle<Result<(), connector_core::ConnectorError>>,
}

impl Replica {
    fn start(etcd: &Etcd, prefix: &str, id: &str, server: &GrpcTestServer, lease: u32) -> Self {
        let opts = FleetOptions::builder(etcd.url(prefix))
            .member(id)
            .lease_secs(lease)
            .build()
            .expect("valid fleet options");
        let fleet = Fleet::start(opts, keys());
        let options = MultiTransportOptions::builder(server.url())
            .connect_timeout(Duration::from_secs(5))
            .reconnect_delay(Duration::from_millis(20))
            .jitter(Duration::from_millis(20))
            .max_backoff(Duration::from_millis(200))
            .drain_timeout(Duration::from_secs(1))
            .build()
            .expect("valid options");
        let host = Arc::new(FleetRunner::new(fleet, registrations(), move |regs| {
            MultiConnectorRunner::new(regs, options.clone(), GrpcTransport::new())
        }));
        let h = Arc::clone(&host);
        let run = tokio::spawn(async move { h.run().await });
        Replica {
            id: id.to_string(),
            host,
            run,
        }
    }

    /// Killed without warning: tasks aborted, nothing revoked.
    async fn kill(self) {
        self.run.abort();
        let _ = self.run.await;
        assert_eq!(Arc::strong_count(&self.host), 1, "the run task let go");
        drop(self.host);
    }

    /// SIGTERM: hand everything over, revoke, return.
    async fn leave(self) {
        timeout(WAIT, self.host.fleet().leave())
            .await
            .expect("leave finishes")
            .expect("etcd told");
        timeout(WAIT, self.run)
            .await
            .expect("run returns after leave")
            .expect("no panic")
            .expect("clean stop");
    }

    fn hosted(&self) -> BTreeSet<RegistrationKey> {
        self.host.fleet().hosted()
    }

    async fn wait_state(&self, want: FleetState, limit: Duration) {
        let mut st = self.host.fleet().status();
        let what = format!("{} reaching {want:?}", self.id);
        let reached = timeout(limit, st.wait_for(|s| s.state == want))
            .await
            .map(|r| r.is_ok());
        assert!(
            matches!(reached, Ok(true)),
            "timed out: {what}; now {:?}",
            *st.borrow()
        );
    }
}

/// key → stream id, once every key has exactly one live approved stream.
fn streams(engine: &TestServer) -> Option<BTreeMap<String, u64>> {
    fleet_support::streams(engine, COUNT)
}

async fn wait_all_hosted(
    engine: &TestServer,
    limit: Duration,
    what: &str,
) -> BTreeMap<String, u64> {
    engine
        .wait_until(limit, |s| streams(s).is_some())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: not all {COUNT} hosted once within {limit:?}; active {}",
                engine.active_keys().len()
            )
        });
    streams(engine).expect("just checked")
}

/// Each replica's rendezvous share of the live members `replicas`.
fn shares<'a>(
    replicas: &'a [&'a Replica],
) -> impl Iterator<Item = (&'a Replica, BTreeSet<RegistrationKey>)> + 'a {
    let ids: Vec<&str> = replicas.iter().map(|r| r.id.as_str()).collect();
    replicas.iter().map(move |r| {
        let share = keys()
            .into_iter()
            .filter(|k| owner_of(k, ids.iter().copied()) == Some(r.id.as_str()))
            .collect();
        (*r, share)
    })
}

/// Each replica holds exactly its rendezvous share of `replicas`.
fn settled(replicas: &[&Replica]) -> bool {
    shares(replicas).all(|(r, share)| r.hosted() == share)
}

/// Waits until the fleet has settled on `replicas` and every key has one
/// live approved stream; returns key → stream id.
async fn settle(engine: &TestServer, replicas: &[&Replica]) -> BTreeMap<String, u64> {
    engine
        .wait_until(WAIT, |s| settled(replicas) && streams(s).is_some())
        .await
        .unwrap_or_else(|_| {
            let shares: Vec<(String, usize)> = replicas
                .iter()
                .map(|r| (r.id.clone(), r.hosted().len()))
                .collect();
            panic!(
                "not settled within {WAIT:?}: shares {shares:?}, {} keys active",
                engine.active_keys().len()
            )
        });
    assert_assignment(replicas);
    streams(engine).expect("just checked")
}

/// Each replica hosts exactly its rendezvous share of the live members.
fn assert_assignment(replicas: &[&Replica]) {
    for (r, share) in shares(replicas) {
        assert_eq!(r.hosted(), share, "{}'s share", r.id);
    }
}

/// The keys whose stream changed between two [`streams`] snapshots.
fn moved_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeSet<String> {
    after
        .iter()
        .filter(|(k, id)| before.get(*k) != Some(*id))
        .map(|(k, _)| k.clone())
        .collect()
}

/// [`setup`] under `prefix`, then replicas `r0`, `r1`, `r2` with `lease`,
/// started and joined; None when etcd is not installed.
async fn setup_three(
    prefix: &str,
    lease: u32,
) -> Option<(Etcd, TestServer, GrpcTestServer, Monitor, [Replica; 3])> {
    let (etcd, engine, server, monitor) = setup(prefix).await?;
    let replicas: [Replica; 3] =
        std::array::from_fn(|i| Replica::start(&etcd, prefix, &format!("r{i}"), &server, lease));
    for r in &replicas {
        r.wait_state(FleetState::Joined, WAIT).await;
    }
    Some((etcd, engine, server, monitor, replicas))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_host_sixty_once_and_take_over_from_a_killed_one() {
    let lease = 2;
    let Some((etcd, engine, _server, monitor, [a, b, c])) = setup_three("kill", lease).await else {
        return;
    };
    settle(&engine, &[&a, &b, &c]).await;
    for r in [&a, &b, &c] {
        let n = r.hosted().len();
        assert!((8..=35).contains(&n), "{} hosts {n} of 60", r.id);
    }

    let victim: BTreeSet<String> = c.hosted().iter().map(|k| k.to_string()).collect();
    let killed_at = Instant::now();
    c.kill().await;
    // Its streams close with its connections at once …
    engine
        .wait_until(WAIT, |s| {
            s.registrations().iter().all(|r| !victim.contains(&r.key))
        })
        .await
        .expect("the killed replica's streams close");
    // … and the survivors take its share once its lease expires.
    let limit = Duration::from_secs(lease as u64 + 4);
    wait_all_hosted(&engine, limit, "after the kill").await;
    let took = killed_at.elapsed();
    eprintln!(
        "FIGURE take-over after kill (TTL {lease} s): {:.2} s for {} registrations",
        took.as_secs_f64(),
        victim.len()
    );
    assert_assignment(&[&a, &b]);
    monitor.stop_all(&engine, [a, b], Replica::leave).await;
    assert_eq!(engine.registrations().len(), 0, "all closed after leave");
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_replica_takes_a_quarter_and_a_leaver_hands_over_at_once() {
    let lease = 2;
    let Some((etcd, engine, server, monitor, [a, b, c])) = setup_three("join", lease).await else {
        return;
    };
    let before = settle(&engine, &[&a, &b, &c]).await;
    let conns_before = server.total_connections_accepted();

    // Join: only the newcomer's share moves.
    let four = ["r0", "r1", "r2", "r3"];
    let to_move: BTreeSet<String> = keys()
        .iter()
        .filter(|k| owner_of(k, four) == Some("r3"))
        .map(|k| k.to_string())
        .collect();
    let joined_at = Instant::now();
    let d = Replica::start(&etcd, "join", "r3", &server, lease);
    engine
        .wait_until(WAIT, |s| {
            streams(s).is_some_and(|now| to_move.iter().all(|k| now.get(k) != before.get(k)))
        })
        .await
        .expect("the newcomer's share moves to it");
    let took = joined_at.elapsed();
    let after = wait_all_hosted(&engine, WAIT, "four replicas").await;
    let moved = moved_between(&before, &after);
    eprintln!(
        "FIGURE join of a 4th replica: {} of {COUNT} moved in {:.2} s (expected {}), {} new connections",
        moved.len(),
        took.as_secs_f64(),
        to_move.len(),
        server.total_connections_accepted() - conns_before
    );
    assert_eq!(
        moved, to_move,
        "exactly the newcomer's share moved; the rest kept their streams"
    );
    assert!(
        (5..=28).contains(&moved.len()),
        "about a quarter: {}",
        moved.len()
    );
    assert_assignment(&[&a, &b, &c, &d]);

    // Leave (SIGTERM): its share moves without waiting for a TTL.
    let leaver: BTreeSet<String> = b.hosted().iter().map(|k| k.to_string()).collect();
    let before = after;
    let left_at = Instant::now();
    b.leave().await;
    let after = wait_all_hosted(&engine, Duration::from_secs(3), "after a leave").await;
    let took = left_at.elapsed();
    let moved = moved_between(&before, &after);
    eprintln!(
        "FIGURE leave of a replica (TTL {lease} s): {} moved in {:.2} s",
        moved.len(),
        took.as_secs_f64()
    );
    assert_eq!(moved, leaver, "only the leaver's share moved");
    assert!(
        took < Duration::from_secs(lease as u64),
        "a leave does not wait for the TTL: {took:?}"
    );
    assert_assignment(&[&a, &c, &d]);
    monitor.stop_all(&engine, [a, c, d], Replica::leave).await;
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_hosting_while_the_lease_lasts_then_hands_back_without_doubles() {
    // A longer lease so "still hosting while the lease lasts" has room.
    let lease = 3;
    let Some((mut etcd, engine, _server, monitor, replicas)) = setup_three("outage", lease).await
    else {
        return;
    };
    let refs: Vec<&Replica> = replicas.iter().collect();
    let before = settle(&engine, &refs).await;

    etcd.stop();
    let stopped = Instant::now();
    for r in &replicas {
        r.wait_state(FleetState::Degraded, Duration::from_secs(2))
            .await;
    }
    // Degraded, lease still valid by their clocks: nothing was dropped.
    let during = streams(&engine).expect("all still hosted while the lease lasts");
    assert_eq!(during, before, "no stream touched during a short outage");
    for r in &replicas {
        r.wait_state(FleetState::Suspended, Duration::from_secs(lease as u64 + 2))
            .await;
    }
    engine
        .wait_until(WAIT, |s| s.registrations().is_empty())
        .await
        .expect("everything handed back once the lease is lost");
    eprintln!(
        "FIGURE etcd down: all streams closed {:.2} s after etcd stopped (TTL {lease} s)",
        stopped.elapsed().as_secs_f64()
    );

    let restart = Instant::now();
    etcd.spawn().await;
    if engine
        .wait_until(WAIT, |s| streams(s).is_some())
        .await
        .is_err()
    {
        let active: BTreeSet<RegistrationKey> = engine.active_keys().into_iter().collect();
        for k in keys() {
            if !active.contains(&k) {
                eprintln!(
                    "DIAG missing {k}, owner {:?}",
                    owner_of(&k, ["r0", "r1", "r2"])
                );
            }
        }
        for r in &replicas {
            let a = r.host.fleet().assignment().borrow().clone();
            eprintln!(
                "DIAG {} {:?} host {} release {:?} runner {:?}",
                r.id,
                *r.host.fleet().status().borrow(),
                a.host.len(),
                a.release,
                r.host.runner().map(|x| x.summary().by_state)
            );
        }
    }
    wait_all_hosted(&engine, WAIT, "after etcd returned").await;
    eprintln!(
        "FIGURE etcd back: all {COUNT} hosted {:.2} s after restart began",
        restart.elapsed().as_secs_f64()
    );
    // All hosted can come before the last replica rejoined; then its share
    // moves to it, and the fleet settles on three again.
    settle(&engine, &refs).await;
    eprintln!(
        "FIGURE etcd back: settled on 3 replicas {:.2} s after restart began",
        restart.elapsed().as_secs_f64()
    );
    for r in &replicas {
        r.wait_state(FleetState::Joined, WAIT).await;
    }
    monitor.stop_all(&engine, replicas, Replica::leave).await;
}
