//! Stock connectors for tests: [`Echo`], [`Sleep`], [`Fail`], and
//! [`Counting`], which wraps any of them and counts handler runs per
//! `request_id`.
//!
//! Every test, example and bench that needs "some connector" uses one of
//! these instead of writing its own, so a change to [`BaseConnector`] is
//! made once and a test's connector never hides a bug of its own.
//!
//! ```
//! use std::time::Duration;
//! use connector_core::{ConnectorConfig, ConnectorRegistration};
//! use connector_testkit::connectors::{Counting, Sleep};
//!
//! let worker = Counting::new(Sleep::new(Duration::from_millis(5)));
//! let config = ConnectorConfig::builder("acme", "echo", "a").build().unwrap();
//! let _registration = ConnectorRegistration::new(config, worker.clone());
//! // … run it, send executes, then:
//! assert_eq!(worker.total(), 0);
//! assert!(worker.runs_over_once().is_empty());
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use connector_core::proto::{ExecuteErrorKind, PayloadEncoding};
use connector_core::{BaseConnector, ExecuteContext, ExecuteError, ExecuteOutput};
use tokio::sync::watch;

use crate::error::TestkitError;

/// Answers every request with its own payload, in its own encoding (a RAW
/// payload comes back RAW, anything else as JSON). The bytes are handed
/// back without a copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

fn echo(ctx: ExecuteContext) -> ExecuteOutput {
    match ctx.encoding {
        PayloadEncoding::Raw => ExecuteOutput::raw(ctx.payload),
        _ => ExecuteOutput::json_bytes(ctx.payload),
    }
}

#[async_trait]
impl BaseConnector for Echo {
    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        Ok(echo(ctx))
    }
}

/// Waits, then echoes like [`Echo`]: keeps requests in flight so a test can
/// drain, cancel, kill or shut down under load.
///
/// A JSON payload `{"ms": N}` overrides the wait for that request (so one
/// registration can serve both quick and slow requests); otherwise the
/// wait given at construction applies. The wait is a tokio sleep, so it
/// follows paused test time, and it ends when the SDK drops the future
/// (cancel, deadline, shutdown).
#[derive(Debug, Clone, Copy)]
pub struct Sleep {
    /// `None`: forever.
    wait: Option<Duration>,
}

impl Sleep {
    /// Waits `wait` (unless the payload says `{"ms": N}`).
    pub fn new(wait: Duration) -> Self {
        Self { wait: Some(wait) }
    }

    /// Never answers (unless the payload says `{"ms": N}`): for requests
    /// that must still be running when something else happens.
    pub fn forever() -> Self {
        Self { wait: None }
    }

    fn wait_for(&self, ctx: &ExecuteContext) -> Option<Duration> {
        let from_payload = (ctx.encoding == PayloadEncoding::Json)
            .then(|| serde_json::from_slice::<serde_json::Value>(&ctx.payload).ok())
            .flatten()
            .and_then(|v| v.get("ms").and_then(serde_json::Value::as_u64))
            .map(Duration::from_millis);
        from_payload.or(self.wait)
    }
}

#[async_trait]
impl BaseConnector for Sleep {
    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        match self.wait_for(&ctx) {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending::<()>().await,
        }
        Ok(echo(ctx))
    }
}

/// Fails every request with one error kind and message.
#[derive(Debug, Clone)]
pub struct Fail {
    error: ExecuteError,
}

impl Fail {
    /// Fails with `HANDLER` and `message`.
    pub fn handler(message: impl Into<String>) -> Self {
        Self::new(ExecuteErrorKind::Handler, message)
    }

    /// Fails with `kind` and `message`.
    pub fn new(kind: ExecuteErrorKind, message: impl Into<String>) -> Self {
        Self {
            error: ExecuteError::new(kind, message),
        }
    }
}

#[async_trait]
impl BaseConnector for Fail {
    async fn execute(&self, _ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        Err(self.error.clone())
    }
}

/// Wraps a connector and counts handler runs: per `request_id`, in total,
/// and how many run at once. Clones share the counts, so a test keeps one
/// clone and gives the other to the runner.
///
/// Exactly-once is checked with both sides: [`Counting::runs_over_once`]
/// must be empty (no request ran twice) and the server must have exactly
/// one answer per id (`ServerStats::duplicate_responses == 0` and
/// `outstanding == 0`).
#[derive(Clone)]
pub struct Counting<C = Echo> {
    inner: Arc<C>,
    counts: Arc<Counts>,
}

struct Counts {
    state: Mutex<CountState>,
    /// Handler runs started so far (for [`Counting::wait_started`]).
    started: watch::Sender<usize>,
}

#[derive(Default)]
struct CountState {
    per_id: HashMap<String, usize>,
    running: usize,
    peak: usize,
}

impl<C> fmt::Debug for Counting<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.counts.lock();
        f.debug_struct("Counting")
            .field("total", &st.per_id.values().sum::<usize>())
            .field("ids", &st.per_id.len())
            .field("running", &st.running)
            .field("peak", &st.peak)
            .finish_non_exhaustive()
    }
}

impl Counts {
    fn lock(&self) -> MutexGuard<'_, CountState> {
        // A panic while holding the lock cannot leave the counts half
        // updated (each update is one statement), so poison is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Counting<Echo> {
    fn default() -> Self {
        Self::new(Echo)
    }
}

impl<C: BaseConnector> Counting<C> {
    /// Counts the runs of `inner`.
    pub fn new(inner: C) -> Self {
        Self {
            inner: Arc::new(inner),
            counts: Arc::new(Counts {
                state: Mutex::new(CountState::default()),
                started: watch::Sender::new(0),
            }),
        }
    }
}

impl<C> Counting<C> {
    /// How many times the handler ran for `request_id`.
    pub fn runs(&self, request_id: &str) -> usize {
        self.counts
            .lock()
            .per_id
            .get(request_id)
            .copied()
            .unwrap_or(0)
    }

    /// Handler runs, all ids together.
    pub fn total(&self) -> usize {
        self.counts.lock().per_id.values().sum()
    }

    /// Distinct request ids the handler ran for.
    pub fn distinct(&self) -> usize {
        self.counts.lock().per_id.len()
    }

    /// The ids the handler ran for more than once, with their counts,
    /// sorted: empty when every request ran at most once.
    pub fn runs_over_once(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = self
            .counts
            .lock()
            .per_id
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, n)| (id.clone(), *n))
            .collect();
        v.sort();
        v
    }

    /// Handler runs in progress now.
    pub fn running(&self) -> usize {
        self.counts.lock().running
    }

    /// The most handler runs ever in progress at once.
    pub fn peak(&self) -> usize {
        self.counts.lock().peak
    }

    /// Waits until at least `n` handler runs have started.
    pub async fn wait_started(&self, n: usize, timeout: Duration) -> Result<(), TestkitError> {
        let mut rx = self.counts.started.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|s| *s >= n))
            .await
            .map(|r| r.is_ok());
        match reached {
            Ok(true) => Ok(()),
            // The sender lives in `self`: it cannot be gone while we wait.
            Ok(false) | Err(_) => Err(TestkitError::Timeout {
                what: format!("{n} handler runs to start (started: {})", self.total()),
            }),
        }
    }
}

/// Decrements `running` when a handler run ends, however it ends (answer,
/// error, or the future dropped by a cancel).
struct RunGuard<'a>(&'a Counts);

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().running -= 1;
    }
}

#[async_trait]
impl<C: BaseConnector> BaseConnector for Counting<C> {
    fn version(&self) -> &str {
        self.inner.version()
    }

    fn behavior(&self) -> connector_core::proto::ConnectorBehavior {
        self.inner.behavior()
    }

    fn capabilities(&self) -> Vec<connector_core::proto::Capability> {
        self.inner.capabilities()
    }

    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        {
            let mut st = self.counts.lock();
            *st.per_id.entry(ctx.request_id.clone()).or_default() += 1;
            st.running += 1;
            st.peak = st.peak.max(st.running);
        }
        let _guard = RunGuard(&self.counts);
        self.counts.started.send_modify(|n| *n += 1);
        self.inner.execute(ctx).await
    }
}
