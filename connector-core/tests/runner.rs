//! Runner tests over the testkit's in-memory mux, on paused tokio time: the
//! whole driver + state machine + engine, without sockets.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use connector_core::proto::{ExecuteErrorKind, ExecuteResponse, RejectReason};
use connector_core::{
    BaseConnector, ConnectorConfig, ConnectorError, ConnectorRegistration, ConnectorRunner,
    ExecuteContext, ExecuteError, ExecuteOutput, MultiConnectorRunner, MultiTransportOptions,
    RegistrationKey, RegistrationState, StopReason,
};
use connector_testkit::connectors::{Counting, Sleep};
use connector_testkit::harness::{assert_rejected, capabilities, json_execute, Running, WAIT};
use connector_testkit::{ApprovalPolicy, MemoryMux, MemoryTransport, TestServer};
use support::{key_of, options, tuned};

/// Echoes; a payload `{"ms": N}` waits N ms first; counts runs and how
/// many run at once.
type Worker = Counting<Sleep>;

fn worker() -> Worker {
    Counting::new(Sleep::new(Duration::ZERO))
}

/// `t.echo.<instance>`.
fn key(instance: &str) -> RegistrationKey {
    key_of("echo", instance)
}

/// A registration of `echo` under `t.echo.<instance>`.
fn reg(instance: &str, echo: &Worker) -> ConnectorRegistration {
    support::registration("echo", instance, Arc::new(echo.clone()))
}

/// `n` registrations `t.echo.e0..` of one worker, over a fresh server.
fn setup_with(
    n: usize,
    options: MultiTransportOptions,
) -> (TestServer, MemoryMux, MultiConnectorRunner, Worker) {
    let echo = worker();
    let (server, mux, runner) =
        support::runner(support::echoes(n, Arc::new(echo.clone())), options);
    (server, mux, runner, echo)
}

/// A running [`setup_with`].
struct Fixture {
    server: TestServer,
    mux: MemoryMux,
    running: Running,
    echo: Worker,
}

/// [`setup_with`], running (not yet waited for).
fn start(n: usize, options: MultiTransportOptions) -> Fixture {
    let (server, mux, runner, echo) = setup_with(n, options);
    Fixture {
        server,
        mux,
        running: Running::start(runner),
        echo,
    }
}

/// [`start`], once all `n` are active.
async fn active(n: usize, options: MultiTransportOptions) -> Fixture {
    let f = start(n, options);
    f.server.wait_for_active(n, WAIT).await.expect("all active");
    f
}

/// Sends a JSON execute to `key` and waits for its answer.
async fn answer(
    server: &TestServer,
    key: &RegistrationKey,
    id: &str,
    capability: &str,
    payload: &str,
) -> ExecuteResponse {
    server
        .execute(key, json_execute(id, capability, payload))
        .await
        .expect("answered")
}

#[test]
fn builder_defaults_overrides_and_round_trip() {
    let o = options();
    assert_eq!(o.max_streams_per_channel, 80);
    assert_eq!(o.connect_timeout, Duration::from_secs(10));
    assert!(o.reconnect);
    assert_eq!(o.reconnect_delay, Duration::from_millis(500));
    assert_eq!(o.max_backoff, Duration::from_secs(60));
    assert_eq!(o.jitter, Duration::from_millis(500));
    assert_eq!(o.max_concurrent_requests, 100);
    assert_eq!(o.heartbeat_interval, Duration::from_secs(30));
    assert_eq!(o.heartbeat_timeout, Duration::from_secs(45));
    assert!(!o.endpoint.tls);
    let o2 = o
        .to_builder()
        .heartbeat_interval(Duration::from_secs(5))
        .heartbeat_timeout(Duration::from_secs(8))
        .max_streams_per_channel(10)
        .build()
        .expect("valid");
    assert_eq!(o2.heartbeat_interval, Duration::from_secs(5));
    assert_eq!(o2.heartbeat_timeout, Duration::from_secs(8));
    assert_eq!(o2.max_streams_per_channel, 10);
    let back = o2.to_builder().build().expect("valid");
    assert_eq!(back.heartbeat_interval, o2.heartbeat_interval);
    assert_eq!(back.endpoint, o2.endpoint);
    let tls = MultiTransportOptions::builder("grpcs://example.com:443")
        .build()
        .expect("valid");
    assert!(tls.endpoint.tls);
}

#[test]
fn heartbeat_pair_is_validated() {
    // Shorter timeout than interval: allowed, but warned about.
    assert!(MultiTransportOptions::builder("grpc://h:1")
        .heartbeat_interval(Duration::from_secs(30))
        .heartbeat_timeout(Duration::from_secs(10))
        .build()
        .is_ok());
    for (i, t) in [(0, 45), (30, 0)] {
        let err = MultiTransportOptions::builder("grpc://h:1")
            .heartbeat_interval(Duration::from_secs(i))
            .heartbeat_timeout(Duration::from_secs(t))
            .build()
            .expect_err("zero is invalid");
        assert!(err.is_config(), "{err}");
    }
}

#[test]
fn invalid_urls_and_identifiers_are_config_errors() {
    for url in [
        "ftp://h:1",
        "grpc://:1",
        "grpc://h:0",
        "grpc://h:70000",
        "grpc://h:1/path",
        "nonsense",
        "ws://user:pw@h:1",
    ] {
        let err = MultiTransportOptions::builder(url).build().expect_err(url);
        assert!(
            matches!(err, ConnectorError::InvalidConfig(_)),
            "{url}: {err}"
        );
    }
    let ws = MultiTransportOptions::builder("ws://h:9")
        .build()
        .expect("ok");
    assert_eq!(ws.endpoint.path, "/v1/connect");
    for (t, ty, i) in [
        ("", "echo", "a"),
        ("t t", "echo", "a"),
        ("t", "ec.ho", "a"),
        ("t", "echo", "ä"),
    ] {
        assert!(ConnectorConfig::builder(t, ty, i).build().is_err());
    }
    let long = "x".repeat(129);
    assert!(ConnectorConfig::builder("t", "echo", long).build().is_err());
    assert!(ConnectorConfig::builder("t", "echo", "x".repeat(128))
        .build()
        .is_ok());
}

#[test]
fn key_display() {
    // That a config's Debug hides its token is tests/secrets.rs.
    let key = RegistrationKey::new("acme", "jira", "i-1").expect("valid");
    assert_eq!(key.to_string(), "acme.jira.i-1");
}

#[test]
fn new_collapses_duplicates_keeping_the_first() {
    let echo = worker();
    let (_s, _m, runner) = support::runner(
        vec![reg("a", &echo), reg("b", &echo), reg("a", &echo)],
        options(),
    );
    assert_eq!(runner.registrations(), vec![key("a"), key("b")]);
}

#[test]
fn add_duplicate_is_rejected_naming_the_key() {
    let (_s, _m, runner, echo) = setup_with(1, options());
    let err = runner.add(reg("e0", &echo)).expect_err("duplicate");
    assert!(
        matches!(&err, ConnectorError::InvalidConfig(m) if m.contains("t.echo.e0")),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn empty_run_and_pre_signalled_shutdown_are_clean() {
    let (_s, _m, empty, _) = setup_with(0, options());
    empty.run().await.expect("empty run is Ok");
    let (server, _m, runner, _) = setup_with(3, options());
    let stop = runner.shutdown_handle();
    assert!(!stop.is_shutdown());
    stop.shutdown();
    assert!(stop.is_shutdown());
    runner.run().await.expect("pre-signalled shutdown is Ok");
    assert_eq!(server.stats().streams_opened, 0, "nothing was dialled");
}

#[tokio::test(start_paused = true)]
async fn run_twice_and_add_after_finish_are_already_running() {
    let Fixture { running, echo, .. } = active(2, options()).await;
    let runner = running.runner().clone();
    let err = runner.run().await.expect_err("second run");
    assert!(matches!(err, ConnectorError::AlreadyRunning(_)), "{err}");
    running.stop().await.expect("run ok");
    let err = runner.add(reg("late", &echo)).expect_err("finished");
    assert!(matches!(err, ConnectorError::AlreadyRunning(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn all_registrations_reach_active_and_answer() {
    let Fixture {
        server, running, ..
    } = active(25, options()).await;
    for key in server.active_keys() {
        let resp = answer(&server, &key, &format!("{key}-1"), "", r#"{"k":1}"#).await;
        assert!(resp.success);
        assert_eq!(resp.payload, &br#"{"k":1}"#[..]);
    }
    let runner = running.runner().clone();
    let summary = runner.summary();
    assert_eq!(summary.count("active"), 25);
    assert_eq!(summary.transport.open_connections(), 25);
    running.stop().await.expect("ok");
    assert_eq!(server.stats().outstanding, 0);
    assert!(
        server.stats().protocol_errors.is_empty(),
        "{:?}",
        server.stats().protocol_errors
    );
    let snapshot = runner.metrics_snapshot();
    assert_eq!(snapshot.len(), 25);
    for (_, m) in snapshot {
        assert_eq!(m.state, RegistrationState::Stopped(StopReason::Shutdown));
    }
}

#[tokio::test(start_paused = true)]
async fn concurrency_bound_is_respected_and_excess_waits() {
    let Fixture {
        server,
        running,
        echo,
        ..
    } = active(1, tuned(|b| b.max_concurrent_requests(3))).await;
    let pending: Vec<_> = (0..10)
        .map(|i| {
            server
                .send_execute(
                    &key("e0"),
                    json_execute(&format!("s{i}"), "sleep", r#"{"ms":100}"#),
                )
                .expect("sent")
        })
        .collect();
    for p in pending {
        let r = p.wait(WAIT).await.expect("answered");
        assert!(r.success, "{r:?}");
    }
    assert_eq!(echo.peak(), 3);
    running.stop().await.expect("ok");
}

/// Starts 2-3 registrations under `options`, breaks them with `fault`,
/// waits until `e0`'s state passes `reached`, and checks that a shutdown
/// ends `run()` within a second.
async fn shutdown_is_prompt(
    n: usize,
    options: MultiTransportOptions,
    fault: impl FnOnce(&MemoryMux),
    reached: impl Fn(&RegistrationState) -> bool,
) {
    let (_server, mux, runner, _) = setup_with(n, options);
    fault(&mux);
    let running = Running::start(runner);
    running
        .runner()
        .registration(&key("e0"))
        .expect("hosted")
        .wait_for(WAIT, reached)
        .await
        .expect("reached the state");
    let started = tokio::time::Instant::now();
    running.stop().await.expect("ok");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_backoff_exits_promptly() {
    shutdown_is_prompt(
        2,
        tuned(|b| {
            b.reconnect_delay(Duration::from_secs(30))
                .max_backoff(Duration::from_secs(60))
        }),
        |mux| mux.fail_next_opens(2),
        |s| matches!(s, RegistrationState::Backoff { .. }),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_mid_register_with_a_black_hole_is_prompt() {
    shutdown_is_prompt(
        3,
        options(),
        |mux| mux.set_black_hole(true),
        |s| *s == RegistrationState::Connecting,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn rejected_registration_stops_others_carry_on() {
    let (server, _m, runner, _) = setup_with(3, options());
    server.set_policy_for(&key("e1"), ApprovalPolicy::Reject(RejectReason::Denied));
    let running = Running::start(runner);
    server.wait_for_active(2, WAIT).await.expect("two active");
    let state = running
        .runner()
        .registration(&key("e1"))
        .expect("hosted")
        .wait_for(WAIT, RegistrationState::is_stopped)
        .await
        .expect("stopped");
    assert_rejected(&state, RejectReason::Denied);
    assert_eq!(server.active_keys(), vec![key("e0"), key("e2")]);
    running.stop().await.expect("ok");
}

#[tokio::test(start_paused = true)]
async fn add_racing_run_is_either_driven_or_rejected() {
    for round in 0..200 {
        let Fixture {
            server,
            running,
            echo,
            ..
        } = start(1, options());
        match running.runner().add(reg("raced", &echo)) {
            Ok(_) => {
                server
                    .wait_for_active(2, WAIT)
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: added but not driven: {e}"));
            }
            Err(ConnectorError::AlreadyRunning(_)) => {}
            Err(e) => panic!("round {round}: {e}"),
        }
        running.stop().await.expect("ok");
    }
}

#[tokio::test(start_paused = true)]
async fn add_and_remove_while_running() {
    let Fixture {
        server,
        running,
        echo,
        ..
    } = active(2, options()).await;
    let runner = running.runner();
    let handle = runner.add(reg("new", &echo)).expect("added while running");
    server
        .wait_for_active(3, WAIT)
        .await
        .expect("new one active");
    assert_eq!(handle.state(), RegistrationState::Active);
    runner.remove(&key("e0")).await.expect("removed");
    server
        .wait_until(WAIT, |s| s.active_keys().len() == 2)
        .await
        .expect("stream gone from the server");
    assert!(runner.registration(&key("e0")).is_none());
    let again = runner.remove(&key("e0")).await;
    assert!(
        matches!(again, Err(ConnectorError::UnknownRegistration(_))),
        "{again:?}"
    );
    running.stop().await.expect("ok");
}

#[tokio::test(start_paused = true)]
async fn run_until_shutdown_outlives_an_empty_set() {
    let (server, _m, runner, echo) = setup_with(1, options());
    let r2 = runner.clone();
    let run = tokio::spawn(async move { r2.run_until_shutdown().await });
    server.wait_for_active(1, WAIT).await.expect("active");
    let mut gone = runner
        .registration(&key("e0"))
        .expect("hosted")
        .watch_state();
    runner.remove(&key("e0")).await.expect("removed");
    // The entry is forgotten once its driver has ended: the state channel closes.
    tokio::time::timeout(WAIT, async { while gone.changed().await.is_ok() {} })
        .await
        .expect("entry forgotten in time");
    assert!(runner.registrations().is_empty());
    server
        .wait_until(WAIT, |s| s.active_keys().is_empty())
        .await
        .expect("stream gone from the server");
    assert!(
        !run.is_finished(),
        "run() must wait for shutdown, not for an empty set"
    );
    // The same key again, on the live runner.
    runner
        .add(reg("e0", &echo))
        .expect("added to an empty running runner");
    server.wait_for_active(1, WAIT).await.expect("active again");
    runner.shutdown_handle().shutdown();
    support::joined(run).await.expect("ok");
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_answers_in_flight_requests() {
    let Fixture {
        server,
        running,
        echo,
        ..
    } = active(1, options()).await;
    let pending = server
        .send_execute(&key("e0"), json_execute("slow", "sleep", r#"{"ms":2000}"#))
        .expect("sent");
    echo.wait_started(1, WAIT).await.expect("handler started");
    let stopped = running.stop();
    let (r, stopped) = tokio::join!(pending.wait(WAIT), stopped);
    let r = r.expect("answered before the stream closed");
    assert!(r.success, "{r:?}");
    stopped.expect("ok");
    assert_eq!(server.stats().outstanding, 0);
}

#[tokio::test(start_paused = true)]
async fn killed_stream_reconnects_and_redelivers() {
    // The backoff (5 s) outlasts the handler (1 s): the response is made
    // while no stream is up.
    let Fixture {
        server,
        mux,
        running,
        echo,
    } = active(1, tuned(|b| b.reconnect_delay(Duration::from_secs(5)))).await;
    let pending = server
        .send_execute(&key("e0"), json_execute("x", "sleep", r#"{"ms":1000}"#))
        .expect("sent");
    // Let the request reach the handler, then kill the connection under it.
    let handle = running.runner().registration(&key("e0")).expect("hosted");
    echo.wait_started(1, WAIT).await.expect("handler started");
    assert_eq!(mux.kill_all_connections(), 1);
    let r = pending
        .wait(WAIT)
        .await
        .expect("delivered on the next stream");
    assert!(r.success, "{r:?}");
    let m = handle.metrics();
    assert_eq!(m.total_disconnects, 1);
    assert_eq!(m.successful_reconnects, 1);
    assert_eq!(m.responses_redelivered, 1);
    assert_eq!(server.stats().duplicate_responses, 0);
    running.stop().await.expect("ok");
}

#[tokio::test(start_paused = true)]
async fn watchdog_reconnects_when_acks_stop() {
    let Fixture {
        server, running, ..
    } = active(
        1,
        tuned(|b| {
            b.heartbeat_interval(Duration::from_secs(1))
                .heartbeat_timeout(Duration::from_secs(3))
        }),
    )
    .await;
    server.set_ack_heartbeats(false);
    let handle = running.runner().registration(&key("e0")).expect("hosted");
    server
        .wait_until(WAIT, |_| handle.metrics().total_disconnects >= 1)
        .await
        .expect("watchdog fired");
    server.set_ack_heartbeats(true);
    server
        .wait_until(WAIT, |_| handle.metrics().successful_reconnects >= 1)
        .await
        .expect("back");
    let m = handle.metrics();
    assert_eq!((m.total_disconnects, m.successful_reconnects), (1, 1));
    running.stop().await.expect("ok");
}

#[tokio::test(start_paused = true)]
async fn bad_payload_and_unknown_capability_through_the_runner() {
    struct Picky;
    #[async_trait]
    impl BaseConnector for Picky {
        fn capabilities(&self) -> Vec<connector_core::proto::Capability> {
            capabilities(&["echo"])
        }
        async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
            Ok(ExecuteOutput::json_bytes(ctx.payload))
        }
    }
    let server = TestServer::new();
    let runner = ConnectorRunner::new(
        support::registration("picky", "p", Arc::new(Picky)),
        options(),
        MemoryTransport::new(server.memory_mux()),
    );
    let r2 = runner.clone();
    let run = tokio::spawn(async move { r2.run().await });
    server.wait_for_active(1, WAIT).await.expect("active");
    let picky = key_of("picky", "p");
    for (id, capability, payload, kind) in [
        ("b", "echo", "{nope", ExecuteErrorKind::BadPayload),
        ("u", "other", "{}", ExecuteErrorKind::UnknownCapability),
    ] {
        let r = answer(&server, &picky, id, capability, payload).await;
        assert_eq!(r.error_kind, kind as i32, "{id}: {r:?}");
    }
    assert_eq!(runner.metrics().expect("metrics").requests_failed, 2);
    runner.shutdown_handle().shutdown();
    support::joined(run).await.expect("ok");
}

/// Kills every stream of `n` active registrations and returns, per second
/// since the kill, how many `register`s reached the server, and the time
/// until all were Active again.
async fn mass_reconnect(n: usize, options: MultiTransportOptions) -> (Vec<usize>, Duration) {
    use connector_testkit::ServerEvent;
    let Fixture {
        server,
        mux,
        running,
        ..
    } = active(n, options).await;
    let killed_at = tokio::time::Instant::now();
    assert_eq!(mux.kill_all_connections(), n, "one connection per stream");
    server
        .wait_until(WAIT, |s| s.active_keys().is_empty())
        .await
        .expect("all down");
    server
        .wait_for_active(n, Duration::from_secs(60))
        .await
        .expect("all back");
    let back = killed_at.elapsed();
    let mut per_second = Vec::new();
    for e in server.events() {
        if let ServerEvent::Registered { at, .. } = e {
            if at > killed_at {
                let s = (at - killed_at).as_secs() as usize;
                if per_second.len() <= s {
                    per_second.resize(s + 1, 0);
                }
                per_second[s] += 1;
            }
        }
    }
    assert_eq!(per_second.iter().sum::<usize>(), n, "one register each");
    running.stop().await.expect("ok");
    (per_second, back)
}

#[tokio::test(start_paused = true)]
async fn mass_reconnect_is_paced_across_the_runner() {
    // 300 registrations, 100 reconnects/s after a burst of 20: no second
    // sees more than 120 of them, and all are back after ~2.8 s + backoff.
    let paced = tuned(|b| {
        b.reconnect_delay(Duration::from_millis(100))
            .jitter(Duration::from_millis(100))
            .reconnect_rate(100)
            .reconnect_burst(20)
    });
    let (per_second, back) = mass_reconnect(300, paced.clone()).await;
    assert!(
        per_second.iter().all(|&c| c <= 120),
        "per second: {per_second:?}"
    );
    assert!(back >= Duration::from_millis(2_800), "back after {back:?}");
    assert!(back < Duration::from_secs(5), "back after {back:?}");

    // The same without pacing: all within the first second.
    let (per_second, back) = mass_reconnect(
        300,
        paced.to_builder().reconnect_rate(0).build().expect("valid"),
    )
    .await;
    assert_eq!(per_second, vec![300], "unpaced");
    assert!(back < Duration::from_secs(1), "back after {back:?}");
}

#[tokio::test(start_paused = true)]
async fn first_connects_are_not_paced() {
    // A rate of 1/s would take minutes to start 100 registrations if the
    // first connect were paced; they all come up at once.
    let started = tokio::time::Instant::now();
    let Fixture { running, .. } =
        active(100, tuned(|b| b.reconnect_rate(1).reconnect_burst(1))).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    running.stop().await.expect("ok");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_is_a_handler_error_whether_it_waited_or_not() {
    /// `now` panics on the first poll, `later` after waiting; `ok` answers.
    struct Panicky;
    #[async_trait]
    impl BaseConnector for Panicky {
        async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
            match ctx.capability_id.as_str() {
                "now" => panic!("handler bug"),
                "later" => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    panic!("handler bug after a wait")
                }
                _ => Ok(ExecuteOutput::json_bytes(ctx.payload)),
            }
        }
    }
    let (server, _m, running) = support::start(
        vec![support::registration("echo", "p", Arc::new(Panicky))],
        options(),
    );
    server.wait_for_active(1, WAIT).await.expect("active");
    for (i, capability) in ["now", "later", "ok", "now", "ok"].iter().enumerate() {
        let resp = answer(&server, &key("p"), &format!("r{i}"), capability, "{}").await;
        if *capability == "ok" {
            assert!(resp.success, "{resp:?}");
        } else {
            assert!(!resp.success);
            assert_eq!(resp.error_kind, ExecuteErrorKind::Handler as i32);
            assert!(resp.error.contains("panicked"), "{}", resp.error);
        }
    }
    let m = running
        .runner()
        .registration(&key("p"))
        .expect("hosted")
        .metrics();
    assert_eq!(m.requests_failed, 3);
    assert_eq!(m.requests_succeeded, 2);
    assert_eq!(
        m.total_disconnects, 0,
        "a handler panic never costs the stream"
    );
    running.stop().await.expect("ok");
}
