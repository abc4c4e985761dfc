//! The pieces every SDK-against-testkit test repeats, written once: test
//! keys, test-speed options, registrations of one connector, JSON execute
//! requests, and a runner running in the background that stops cleanly.
//!
//! ```no_run
//! # async fn demo(url: String, transport: impl connector_core::Transport) {
//! use std::sync::Arc;
//! use connector_testkit::connectors::Echo;
//! use connector_testkit::harness::{fast_options, registrations, Running};
//!
//! let options = fast_options(&url).build().expect("valid options");
//! let runner = connector_core::MultiConnectorRunner::new(
//!     registrations(3, Arc::new(Echo)),
//!     options,
//!     transport,
//! );
//! let running = Running::start(runner);
//! // … drive the server, assert …
//! running.stop().await.expect("clean stop");
//! # }
//! ```

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use connector_core::proto::{
    Capability, ExecuteRequest, Kind, PayloadEncoding, RegisterRequest, RejectReason, StreamMessage,
};
use connector_core::{
    BaseConnector, ConnectorConfig, ConnectorError, ConnectorRegistration, MultiConnectorRunner,
    MultiTransportOptions, MultiTransportOptionsBuilder, RegistrationKey, RegistrationState,
    StopReason,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Bound for a test's waits: generous, only reached when something is broken.
pub const WAIT: Duration = Duration::from_secs(30);

/// The auth token [`registrations`] configure.
pub const TEST_TOKEN: &str = "secret-token";

/// The `i`-th test key: `acme.echo.i{i}`.
pub fn key(i: usize) -> RegistrationKey {
    RegistrationKey::new("acme", "echo", format!("i{i}")).expect("a valid key")
}

/// Options tuned for tests against a local server: short connect timeout,
/// reconnect within tens of milliseconds, a heartbeat every 200 ms, a fixed
/// jitter seed. Tune further with the returned builder.
pub fn fast_options(url: &str) -> MultiTransportOptionsBuilder {
    MultiTransportOptions::builder(url)
        .connect_timeout(Duration::from_secs(3))
        .reconnect_delay(Duration::from_millis(20))
        .jitter(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(200))
        .heartbeat_interval(Duration::from_millis(200))
        .heartbeat_timeout(Duration::from_secs(3))
        .drain_timeout(Duration::from_secs(5))
        .jitter_seed(Some(7))
}

/// `n` registrations `key(0)..key(n)` sharing one connector, each with the
/// auth token [`TEST_TOKEN`].
pub fn registrations(n: usize, connector: Arc<dyn BaseConnector>) -> Vec<ConnectorRegistration> {
    (0..n)
        .map(|i| {
            let k = key(i);
            ConnectorRegistration::from_arc(
                ConnectorConfig::builder(k.tenant_id(), k.connector_type(), k.instance_id())
                    .auth_token(TEST_TOKEN)
                    .build()
                    .expect("a valid config"),
                Arc::clone(&connector),
            )
        })
        .collect()
}

/// The `register` message a test opening a stream for `key` by hand sends
/// first: version 1.0.0, auth token [`TEST_TOKEN`], at most
/// `max_concurrent_requests` requests at a time.
pub fn register_message(key: &RegistrationKey, max_concurrent_requests: u32) -> StreamMessage {
    StreamMessage {
        kind: Some(Kind::Register(Box::new(RegisterRequest {
            tenant_id: key.tenant_id().into(),
            connector_type: key.connector_type().into(),
            instance_id: key.instance_id().into(),
            version: "1.0.0".into(),
            auth_token: TEST_TOKEN.into(),
            max_concurrent_requests,
            ..Default::default()
        }))),
    }
}

/// Capabilities with these ids and nothing else set: what a test
/// connector's [`BaseConnector::capabilities`] returns when only the ids
/// matter.
pub fn capabilities(ids: &[&str]) -> Vec<Capability> {
    ids.iter()
        .map(|id| Capability {
            id: (*id).into(),
            ..Default::default()
        })
        .collect()
}

/// A JSON execute request for `capability`, with a 30 s deadline.
pub fn json_execute(request_id: &str, capability: &str, payload: &str) -> ExecuteRequest {
    ExecuteRequest {
        request_id: request_id.into(),
        payload: payload.as_bytes().to_vec().into(),
        encoding: PayloadEncoding::Json as i32,
        capability_id: capability.into(),
        timeout_ms: 30_000,
        ..Default::default()
    }
}

/// Each line `reader` yields (a child process's piped stdout or stderr),
/// sent on the returned channel by a task of its own until the reader ends
/// or the receiver is dropped. Bound each `recv` with [`WAIT`].
pub fn forward_lines<R>(reader: R) -> mpsc::UnboundedReceiver<String>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Asserts that `state` is [`RegistrationState::Stopped`] by a rejection
/// with `reason` (any message).
///
/// # Panics
///
/// When it is any other state.
pub fn assert_rejected(state: &RegistrationState, reason: RejectReason) {
    assert!(
        matches!(
            state,
            RegistrationState::Stopped(StopReason::Rejected { reason: r, .. }) if *r == reason
        ),
        "expected a stop by rejection {}, got {state:?}",
        reason.as_str_name()
    );
}

/// A fresh directory under the system temp dir, for certificate and
/// config files a test writes; removed with everything in it on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Makes `<temp>/connector-test-<tag>-<pid>-<n>`, unique per process
    /// and call.
    ///
    /// # Panics
    ///
    /// When the directory cannot be made.
    pub fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("connector-test-{tag}-{}-{n}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("cannot make {}: {e}", dir.display());
        }
        Self(dir)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// `file` inside the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A runner whose `run()` is running on a task.
#[derive(Debug)]
pub struct Running {
    runner: MultiConnectorRunner,
    task: JoinHandle<Result<(), ConnectorError>>,
}

impl Running {
    /// Spawns `runner.run()`.
    pub fn start(runner: MultiConnectorRunner) -> Self {
        let r = runner.clone();
        let task = tokio::spawn(async move { r.run().await });
        Self { runner, task }
    }

    /// The runner (a clone shares it).
    pub fn runner(&self) -> &MultiConnectorRunner {
        &self.runner
    }

    /// Whether `run()` has returned.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Shuts the runner down and returns what `run()` returned.
    ///
    /// # Panics
    ///
    /// When `run()` does not return within [`WAIT`] of the shutdown (the
    /// prompt-shutdown promise is broken) or its task panicked.
    pub async fn stop(self) -> Result<(), ConnectorError> {
        self.runner.shutdown_handle().shutdown();
        self.join().await
    }

    /// Waits for `run()` to return on its own (without shutting down).
    ///
    /// # Panics
    ///
    /// As [`Running::stop`].
    pub async fn join(self) -> Result<(), ConnectorError> {
        match tokio::time::timeout(WAIT, self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => panic!("the runner's task failed: {e}"),
            Err(_) => panic!("run() did not return within {WAIT:?}"),
        }
    }
}

/// The stop signal [`RunningHost::start`] hands its host: resolves when
/// [`RunningHost::stop`] is called (or the [`RunningHost`] is dropped).
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A host (`connector_host::run_until` or anything else ending in an
/// [`ExitCode`]) running on a task, stopped through the signal it was given.
///
/// ```no_run
/// # async fn demo(types: connector_host::ConnectorTypes, args: Vec<String>) {
/// use connector_testkit::harness::RunningHost;
///
/// let host = RunningHost::start(|stop| connector_host::run_until(types, args, stop));
/// // … drive the server, assert …
/// host.stop_successfully().await;
/// # }
/// ```
#[derive(Debug)]
pub struct RunningHost {
    stop: oneshot::Sender<()>,
    task: JoinHandle<ExitCode>,
}

impl RunningHost {
    /// Spawns `run(stop)`, where `stop` resolves on [`RunningHost::stop`].
    pub fn start<F, Fut>(run: F) -> Self
    where
        F: FnOnce(StopSignal) -> Fut,
        Fut: Future<Output = ExitCode> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async move {
            let _ = stopped.await;
        })));
        Self { stop, task }
    }

    /// Signals the host to stop and returns its exit code.
    ///
    /// # Panics
    ///
    /// When the host had already ended before the signal, does not end
    /// within [`WAIT`] of it, or its task panicked.
    pub async fn stop(self) -> ExitCode {
        assert!(
            self.stop.send(()).is_ok(),
            "the host ended before it was stopped"
        );
        match tokio::time::timeout(WAIT, self.task).await {
            Ok(Ok(code)) => code,
            Ok(Err(e)) => panic!("the host's task failed: {e}"),
            Err(_) => panic!("the host did not stop within {WAIT:?}"),
        }
    }

    /// [`RunningHost::stop`], asserting the exit code is
    /// [`ExitCode::SUCCESS`].
    ///
    /// # Panics
    ///
    /// As [`RunningHost::stop`], and when the code is another one.
    pub async fn stop_successfully(self) {
        let code = self.stop().await;
        // `ExitCode` has no `PartialEq`; its `Debug` tells codes apart.
        assert_eq!(
            format!("{code:?}"),
            format!("{:?}", ExitCode::SUCCESS),
            "the host's exit code"
        );
    }
}
