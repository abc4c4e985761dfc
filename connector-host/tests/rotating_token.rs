//! Rotating credentials (issue 15 §2) against a real testkit gRPC server on
//! 127.0.0.1: a token file rewritten while the registration runs is sent
//! by the next `register` (after a killed connection, after a
//! `SESSION_EXPIRED`); an `INVALID_CREDENTIALS` is retried once with a newer
//! token; a source that fails backs off with a clear error; no token text
//! ever reaches a log line. Then the same through `connector-host --config`
//! with `auth_token_file` (no SIGHUP needed).
//!
//! Every wait is on the server's state or a log line, bounded; ports are 0.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use connector_core::proto::{
    stream_message::Kind, ApprovalUpdate, RegistrationStatus, RejectReason, StreamMessage,
};
use connector_core::{
    ConnectorConfig, ConnectorRegistration, DisconnectCause, FileToken, MultiConnectorRunner,
    RegistrationEvent, RegistrationKey, RegistrationState, StopReason,
};
use connector_grpc::GrpcTransport;
use connector_host::EchoConnector;
use connector_testkit::harness::{fast_options, Running};
use connector_testkit::{ApprovalPolicy, GrpcTestServer, TestServer};

mod support;
use support::{grpc_server, registers, temp_dir, Host, LOG, WAIT};

const KEY: &str = "rot.echo.i0";

fn key() -> connector_core::RegistrationKey {
    KEY.parse().expect("a key")
}

/// Every log line of this test binary, at `trace` for the SDK's crates.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "connector_core=trace,connector_grpc=trace,connector_host=trace",
            ))
            .with_writer(move || LogWriter(buf))
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        buf
    })
}

struct LogWriter(&'static Mutex<Vec<u8>>);

impl Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// No token of any test in any log line, Debug output or error.
fn assert_no_token_logged(tokens: &[&str]) {
    let text = log_text();
    assert!(!text.is_empty(), "the SDK logged nothing: capture broken");
    for t in tokens {
        assert!(!text.contains(t), "token {t:?} in the logs");
    }
}

/// `token` in a directory of the test's own (`name`): its path.
fn token_file(name: &str, token: Option<&str>) -> PathBuf {
    let file = temp_dir("ch-token", name).join("token");
    if let Some(token) = token {
        rewrite(&file, token);
    }
    file
}

/// The server holds an approved stream for [`KEY`] whose register carried
/// `token`.
fn approved_with(token: &str) -> impl Fn(&TestServer) -> bool + '_ {
    move |s| {
        s.registrations().iter().any(|r| {
            r.key == KEY
                && r.status == RegistrationStatus::Approved
                && r.register.auth_token == token
        })
    }
}

/// Rewrites atomically (write + rename), as Kubernetes and most rotators do.
fn rewrite(path: &Path, token: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{token}\n")).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

struct Run {
    server: GrpcTestServer,
    running: Running,
}

impl Run {
    async fn start(token_file: &Path, policy: ApprovalPolicy) -> Self {
        let _ = logs();
        let server = grpc_server().await;
        server.engine().set_policy(policy);
        let options = fast_options(&server.url()).build().expect("options");
        let config = ConnectorConfig::builder("rot", "echo", "i0")
            .token_source(Arc::new(FileToken::new(token_file)))
            .build()
            .expect("config");
        let runner = MultiConnectorRunner::new(
            vec![ConnectorRegistration::new(config, EchoConnector::new())],
            options,
            GrpcTransport::new(),
        );
        Self {
            server,
            running: Running::start(runner),
        }
    }

    /// Started with a file holding `token`, under a server that holds the
    /// register pending (and does by the time this returns).
    async fn pending_with(name: &str, token: &str) -> (Self, PathBuf) {
        let file = token_file(name, Some(token));
        let run = Self::start(&file, ApprovalPolicy::Pending).await;
        run.wait_pending().await;
        (run, file)
    }

    fn handle(&self) -> connector_core::RegistrationHandle {
        let key: RegistrationKey = RegistrationKey::new("rot", "echo", "i0").expect("key");
        self.running.runner().registration(&key).expect("hosted")
    }

    /// Waits for an approved stream whose register carried `token`.
    async fn wait_approved_with(&self, token: &str) {
        let ok = self
            .server
            .engine()
            .wait_until(WAIT, approved_with(token))
            .await;
        assert!(
            ok.is_ok(),
            "no approved register with the expected token; live: {:?}",
            self.server.engine().registrations()
        );
        // And the client has read the approval (with its session token).
        self.handle()
            .wait_for(WAIT, |s| *s == RegistrationState::Active)
            .await
            .expect("active on the client");
    }

    async fn wait_pending(&self) {
        self.server
            .engine()
            .wait_until(WAIT, |s| {
                s.registrations()
                    .iter()
                    .any(|r| r.key == KEY && r.status == RegistrationStatus::Pending)
            })
            .await
            .expect("pending");
    }

    fn registers(&self) -> usize {
        registers(self.server.engine(), KEY)
    }

    async fn stop(self) {
        self.running.stop().await.expect("clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_token_file_is_sent_after_session_expired_and_after_a_kill() {
    let (run, file) = Run::pending_with("rewrite", "rot-token-one").await;
    assert_eq!(live_token(&run), "rot-token-one");

    // Rotated while the server holds the register; then the session
    // expires: the next register reads the file again.
    rewrite(&file, "rot-token-two");
    let expire = StreamMessage {
        kind: Some(Kind::ApprovalUpdate(Box::new(ApprovalUpdate {
            status: RegistrationStatus::Rejected as i32,
            reject_reason: RejectReason::SessionExpired as i32,
            message: "session expired".into(),
            ..Default::default()
        }))),
    };
    run.server
        .engine()
        .send_raw(&key(), expire)
        .expect("a SESSION_EXPIRED sent on the stream");
    run.server
        .engine()
        .wait_until(WAIT, |s| {
            s.registrations()
                .iter()
                .any(|r| r.key == KEY && r.register.auth_token == "rot-token-two")
        })
        .await
        .expect("a register with the rewritten token after SESSION_EXPIRED");
    assert_eq!(run.registers(), 2);
    run.wait_pending().await;
    run.server
        .engine()
        .approve(&key())
        .expect("the registration is pending");
    run.wait_approved_with("rot-token-two").await;

    // Rotated again; the connection dies: the reconnect reads it, beside
    // the session token the server issued.
    rewrite(&file, "rot-token-three");
    assert_eq!(
        run.server.kill_all_connections(),
        1,
        "one registration, one connection"
    );
    run.wait_approved_with("rot-token-three").await;
    assert!(run
        .server
        .engine()
        .registrations()
        .iter()
        .any(|r| r.key == KEY && !r.register.session_token.is_empty()));
    run.stop().await;
    assert_no_token_logged(&["rot-token-one", "rot-token-two", "rot-token-three"]);
}

fn live_token(run: &Run) -> String {
    run.server
        .engine()
        .registrations()
        .into_iter()
        .find(|r| r.key == KEY)
        .map(|r| r.register.auth_token)
        .expect("a live register")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_credentials_is_retried_once_with_the_newer_token() {
    let (run, file) = Run::pending_with("invalid", "inv-token-old").await;
    // The token rotates while the server is checking the old one.
    rewrite(&file, "inv-token-new");
    run.server
        .engine()
        .set_policy_for(&key(), ApprovalPolicy::Approve);
    run.server
        .engine()
        .reject(&key(), RejectReason::InvalidCredentials, "token expired")
        .expect("the registration is pending");
    run.wait_approved_with("inv-token-new").await;
    assert_eq!(run.registers(), 2, "one retry, with the newer token");

    // INVALID_CREDENTIALS when the file holds the very token rejected: no
    // retry, the contract's rule (stop for good, saying why).
    run.server.engine().set_policy_for(
        &key(),
        ApprovalPolicy::Reject(RejectReason::InvalidCredentials),
    );
    assert_eq!(
        run.server.kill_all_connections(),
        1,
        "one registration, one connection"
    );
    let state = run
        .handle()
        .wait_for(WAIT, |s| s.is_stopped())
        .await
        .expect("stops");
    assert!(
        matches!(
            &state,
            RegistrationState::Stopped(StopReason::Rejected {
                reason: RejectReason::InvalidCredentials,
                ..
            })
        ),
        "{state:?}"
    );
    assert_eq!(run.registers(), 3, "no retry with an unchanged token");
    run.stop().await;
    assert_no_token_logged(&["inv-token-old", "inv-token-new"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_token_source_backs_off_with_a_clear_error_then_recovers() {
    let file = token_file("missing", None);
    let run = Run::start(&file, ApprovalPolicy::Approve).await;
    let handle = run.handle();
    let mut events = handle.events();
    // The file does not exist: a clear error, a backoff, no stream.
    let cause = tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(RegistrationEvent::Disconnected { cause }) => return cause,
                Ok(_) => {}
                Err(e) => panic!("events: {e}"),
            }
        }
    })
    .await
    .expect("a token error in time");
    match &cause {
        DisconnectCause::Token(why) => {
            assert!(why.contains("cannot read"), "{why}");
            assert!(why.contains(&file.display().to_string()), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert!(cause.to_string().starts_with("auth token unavailable: "));
    handle
        .wait_for(WAIT, |s| matches!(s, RegistrationState::Backoff { .. }))
        .await
        .expect("backs off");
    assert_eq!(run.registers(), 0, "no register without a token");
    assert!(handle.metrics().connect_failures >= 1);
    // Still retrying: the file appears, the registration comes up.
    rewrite(&file, "late-token-value");
    run.wait_approved_with("late-token-value").await;
    run.stop().await;
    let text = log_text();
    assert!(text.contains("auth token source failed"), "{text}");
    assert_no_token_logged(&["late-token-value"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_host_rereads_auth_token_file_before_every_register() {
    let server = grpc_server().await;
    let token = token_file("host", Some("host-token-one"));
    let config = token.with_file_name("host.toml");
    std::fs::write(
        &config,
        format!(
            r#"
url = "{url}"
reconnect_delay_ms = 20
jitter_ms = 10
max_backoff_ms = 200

[[registration]]
tenant = "rot"
connector_type = "echo"
instance = "i0"
auth_token_file = "{token}"
"#,
            url = server.url(),
            token = token.display()
        ),
    )
    .expect("config");
    let config_arg = config.to_string_lossy().into_owned();
    let host = Host::spawn(&["--config", &config_arg, "--log", LOG], &[]);
    server
        .engine()
        .wait_until(WAIT, approved_with("host-token-one"))
        .await
        .expect("registered with the first token");
    rewrite(&token, "host-token-two");
    assert_eq!(
        server.kill_all_connections(),
        1,
        "one registration, one connection"
    );
    server
        .engine()
        .wait_until(WAIT, approved_with("host-token-two"))
        .await
        .expect("the reconnect carries the rewritten token, no SIGHUP");
    let (_, stderr) = host.stop_ok().await;
    assert!(!stderr.contains("host-token-"), "{stderr}");
}
