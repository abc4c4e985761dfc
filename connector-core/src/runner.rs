//! Hosting registrations: [`MultiConnectorRunner`] (many, sharing one
//! transport), [`ConnectorRunner`] (one), and [`ShutdownHandle`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{MultiTransportOptions, RegistrationKey};
use crate::connector::ConnectorRegistration;
use crate::driver::drive;
use crate::error::ConnectorError;
use crate::live::{LiveShared, RegistrationHandle};
use crate::metrics::ConnectorMetrics;
use crate::pacing::ReconnectPacer;
use crate::state::RegistrationState;
use crate::transport::{MuxStats, StreamMux, Transport};

/// Asks a runner to stop gracefully: every registration stops taking work,
/// answers what is in flight (bounded by the drain timeout), closes its
/// stream, and `run` returns. Cheap to clone; usable from any thread, before
/// or during `run`.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    token: CancellationToken,
}

impl ShutdownHandle {
    /// Starts the graceful shutdown. Idempotent.
    pub fn shutdown(&self) {
        self.token.cancel();
    }

    /// True once [`ShutdownHandle::shutdown`] was called.
    pub fn is_shutdown(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves when shutdown is asked.
    pub async fn wait(&self) {
        self.token.cancelled().await
    }
}

/// Where the runner is in its life.
enum Phase {
    Idle,
    Running { adds: mpsc::UnboundedSender<Entry> },
    Finished,
}

/// One hosted registration.
struct Entry {
    /// Taken when its driver starts: the driver keeps what it needs, and
    /// the runner's table holds no second copy of every config.
    registration: Option<ConnectorRegistration>,
    live: Arc<LiveShared>,
}

struct RunnerState {
    phase: Phase,
    /// In insertion order, for stable listings.
    order: Vec<RegistrationKey>,
    entries: HashMap<RegistrationKey, Entry>,
    mux: Option<Arc<dyn StreamMux>>,
}

struct Shared {
    options: Arc<MultiTransportOptions>,
    /// Shared by every registration of the runner (see [`ReconnectPacer`]).
    pacer: Option<Arc<ReconnectPacer>>,
    transport: Arc<dyn Transport>,
    shutdown: CancellationToken,
    state: Mutex<RunnerState>,
}

/// Hosts many registrations over one transport: on gRPC they share HTTP/2
/// connections, on WebSocket each has its own socket. Each registration is
/// approved, monitored and reconnected on its own.
///
/// ```no_run
/// # async fn demo(
/// #     regs: Vec<connector_core::ConnectorRegistration>,
/// #     transport: impl connector_core::Transport,
/// # ) -> Result<(), connector_core::ConnectorError> {
/// use connector_core::{MultiConnectorRunner, MultiTransportOptions};
/// let options = MultiTransportOptions::builder("grpc://127.0.0.1:50051").build()?;
/// let runner = MultiConnectorRunner::new(regs, options, transport);
/// let stop = runner.shutdown_handle();
/// tokio::spawn(async move {
///     let _ = tokio::signal::ctrl_c().await;
///     stop.shutdown();
/// });
/// runner.run().await
/// # }
/// ```
#[derive(Clone)]
pub struct MultiConnectorRunner {
    shared: Arc<Shared>,
}

impl fmt::Debug for MultiConnectorRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiConnectorRunner")
            .field("endpoint", &self.shared.options.endpoint.to_string())
            .field("registrations", &self.lock().order.len())
            .finish_non_exhaustive()
    }
}

impl MultiConnectorRunner {
    /// A runner for `registrations`. Duplicate keys are collapsed: the first
    /// is kept and a warning names each one dropped.
    pub fn new(
        registrations: Vec<ConnectorRegistration>,
        options: MultiTransportOptions,
        transport: impl Transport,
    ) -> Self {
        let shutdown = CancellationToken::new();
        let mut state = RunnerState {
            phase: Phase::Idle,
            order: Vec::with_capacity(registrations.len()),
            entries: HashMap::with_capacity(registrations.len()),
            mux: None,
        };
        for registration in registrations {
            let key = registration.key().clone();
            if state.entries.contains_key(&key) {
                tracing::warn!(%key, "duplicate registration dropped; the first one is kept");
                continue;
            }
            state.entries.insert(
                key.clone(),
                Entry {
                    live: Arc::new(LiveShared::new(key.clone(), shutdown.child_token())),
                    registration: Some(registration),
                },
            );
            state.order.push(key);
        }
        Self {
            shared: Arc::new(Shared {
                pacer: ReconnectPacer::new(options.reconnect_rate, options.reconnect_burst)
                    .map(Arc::new),
                options: Arc::new(options),
                transport: Arc::new(transport),
                shutdown,
                state: Mutex::new(state),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RunnerState> {
        // A panic while holding this lock leaves plain data behind; go on.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a registration. Before `run` it joins the list; while running it
    /// is brought up at once on the live transport. Fails with
    /// `InvalidConfig` if the key is already hosted and with `AlreadyRunning`
    /// once the runner has finished.
    pub fn add(
        &self,
        registration: ConnectorRegistration,
    ) -> Result<RegistrationHandle, ConnectorError> {
        let key = registration.key().clone();
        let mut state = self.lock();
        if matches!(state.phase, Phase::Finished) {
            return Err(ConnectorError::AlreadyRunning(format!(
                "cannot add `{key}`: the runner has finished"
            )));
        }
        if state.entries.contains_key(&key) {
            return Err(ConnectorError::InvalidConfig(format!(
                "registration `{key}` is already hosted by this runner"
            )));
        }
        let mut entry = Entry {
            live: Arc::new(LiveShared::new(
                key.clone(),
                self.shared.shutdown.child_token(),
            )),
            registration: Some(registration),
        };
        let handle = RegistrationHandle {
            shared: entry.live.clone(),
        };
        if let Phase::Running { adds } = &state.phase {
            // The run loop holds the receiver until it sets `Finished` under
            // this same lock, so the send cannot be lost.
            let started = Entry {
                registration: entry.registration.take(),
                live: entry.live.clone(),
            };
            if adds.send(started).is_err() {
                return Err(ConnectorError::AlreadyRunning(format!(
                    "cannot add `{key}`: the runner is finishing"
                )));
            }
        }
        state.entries.insert(key.clone(), entry);
        state.order.push(key);
        Ok(handle)
    }

    /// Removes a registration: it stops taking work, answers what is in
    /// flight, closes its stream and frees its slot. Resolves when it has
    /// stopped (at once if the runner is not running).
    pub async fn remove(&self, key: &RegistrationKey) -> Result<(), ConnectorError> {
        let (live, running) = {
            let mut state = self.lock();
            let running = matches!(state.phase, Phase::Running { .. });
            let Some(entry) = state.entries.get(key) else {
                return Err(ConnectorError::UnknownRegistration(key.to_string()));
            };
            let live = entry.live.clone();
            if !running {
                state.entries.remove(key);
                state.order.retain(|k| k != key);
            }
            (live, running)
        };
        live.removing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        live.stop.cancel();
        if running {
            let mut rx = live.state.subscribe();
            // The driver publishes `Stopped` last; the run loop then forgets
            // the entry. A closed channel means it is already gone.
            let _ = rx.wait_for(|s| s.is_stopped()).await;
        }
        Ok(())
    }

    /// A handle that shuts this runner down.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            token: self.shared.shutdown.clone(),
        }
    }

    /// The keys hosted, in the order they were added.
    pub fn registrations(&self) -> Vec<RegistrationKey> {
        self.lock().order.clone()
    }

    /// The live handle of one registration.
    pub fn registration(&self, key: &RegistrationKey) -> Option<RegistrationHandle> {
        self.lock().entries.get(key).map(|e| RegistrationHandle {
            shared: e.live.clone(),
        })
    }

    /// Every registration's counters, by key.
    pub fn metrics_snapshot(&self) -> BTreeMap<RegistrationKey, ConnectorMetrics> {
        self.lock()
            .entries
            .iter()
            .map(|(k, e)| {
                let state = e.live.state.get();
                (k.clone(), e.live.metrics.snapshot(state))
            })
            .collect()
    }

    /// How many registrations are in each state, and the transport's
    /// connections.
    pub fn summary(&self) -> RunnerSummary {
        let state = self.lock();
        let mut by_state: BTreeMap<&'static str, usize> = BTreeMap::new();
        for e in state.entries.values() {
            *by_state.entry(e.live.state.name()).or_default() += 1;
        }
        RunnerSummary {
            registrations: state.entries.len(),
            by_state,
            transport: state.mux.as_ref().map(|m| m.stats()).unwrap_or_default(),
        }
    }

    /// Runs every registration until shutdown or until all have stopped
    /// (rejected for good, or ended with reconnect off). Returns `Ok` after a
    /// clean stop; an empty runner or a shutdown asked before `run` return
    /// `Ok` at once. A second `run`, concurrent or later, fails with
    /// `AlreadyRunning`. Fails only for a transport configuration error
    /// (such as an unreadable CA file); network failures are retried.
    pub async fn run(&self) -> Result<(), ConnectorError> {
        self.run_inner(false).await
    }

    /// As [`MultiConnectorRunner::run`], but keeps running while no
    /// registration is hosted (none yet, all removed, all stopped) until
    /// shutdown: for hosts whose set of registrations comes and goes (a
    /// reloaded config file, a fleet's share), where an empty set is a
    /// normal moment and a later [`MultiConnectorRunner::add`] must still
    /// work.
    pub async fn run_until_shutdown(&self) -> Result<(), ConnectorError> {
        self.run_inner(true).await
    }

    async fn run_inner(&self, keep_alive: bool) -> Result<(), ConnectorError> {
        let (initial, mut adds) = {
            let mut state = self.lock();
            if !matches!(state.phase, Phase::Idle) {
                return Err(ConnectorError::AlreadyRunning(
                    "run() was already called on this runner".into(),
                ));
            }
            if (state.entries.is_empty() && !keep_alive) || self.shared.shutdown.is_cancelled() {
                state.phase = Phase::Finished;
                return Ok(());
            }
            let (tx, rx) = mpsc::unbounded_channel();
            state.phase = Phase::Running { adds: tx };
            let RunnerState { order, entries, .. } = &mut *state;
            let initial: Vec<Entry> = order
                .iter()
                .filter_map(|k| {
                    let e = entries.get_mut(k)?;
                    Some(Entry {
                        registration: e.registration.take(),
                        live: e.live.clone(),
                    })
                })
                .collect();
            (initial, rx)
        };
        let mux = match self.shared.transport.mux(&self.shared.options).await {
            Ok(mux) => mux,
            Err(e) => {
                self.lock().phase = Phase::Finished;
                return Err(e.into());
            }
        };
        self.lock().mux = Some(mux.clone());
        tracing::info!(
            endpoint = %self.shared.options.endpoint,
            registrations = initial.len(),
            "runner started"
        );
        let mut drivers = JoinSet::new();
        let spawn = |drivers: &mut JoinSet<RegistrationKey>, entry: Entry| {
            let options = &self.shared.options;
            let pacer = self.shared.pacer.clone();
            let mux = mux.clone();
            let Some(registration) = entry.registration else {
                return;
            };
            let key = entry.live.key.clone();
            // Built outside the task's future, which then holds the driver
            // and the key only (see `drive`). `map`, not `async { run.await;
            // key }`: an async block would keep `run` twice (the captured
            // value and the awaited one), 2 KiB more per registration.
            let run = drive(registration, options, mux, pacer, entry.live);
            drivers.spawn(run.map(move |()| key));
        };
        for entry in initial {
            spawn(&mut drivers, entry);
        }
        loop {
            tokio::select! {
                Some(entry) = adds.recv() => spawn(&mut drivers, entry),
                done = drivers.join_next(), if !drivers.is_empty() => {
                    if let Some(Ok(key)) = done {
                        let mut state = self.lock();
                        let removed = state
                            .entries
                            .get(&key)
                            .is_some_and(|e| e.live.removing.load(std::sync::atomic::Ordering::SeqCst));
                        if removed {
                            state.entries.remove(&key);
                            state.order.retain(|k| *k != key);
                        }
                    } else if let Some(Err(e)) = done {
                        tracing::error!(error = %e, "a registration driver panicked");
                    }
                }
                () = self.shared.shutdown.cancelled(), if keep_alive && drivers.is_empty() => {}
            }
            if drivers.is_empty() && (!keep_alive || self.shared.shutdown.is_cancelled()) {
                // Decide under the lock `add` takes, so an add is either
                // spawned here or rejected there, never lost.
                let mut state = self.lock();
                match adds.try_recv() {
                    Ok(entry) => {
                        drop(state);
                        spawn(&mut drivers, entry);
                    }
                    Err(_) => {
                        state.phase = Phase::Finished;
                        break;
                    }
                }
            }
        }
        mux.close().await;
        tracing::info!("runner stopped");
        Ok(())
    }
}

/// How a runner's registrations are doing, at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunnerSummary {
    /// Registrations hosted.
    pub registrations: usize,
    /// How many are in each state (by [`RegistrationState::name`]).
    pub by_state: BTreeMap<&'static str, usize>,
    /// The transport's connections (empty before `run`).
    pub transport: MuxStats,
}

impl RunnerSummary {
    /// How many registrations are in the state named `name`.
    pub fn count(&self, name: &str) -> usize {
        self.by_state.get(name).copied().unwrap_or(0)
    }
}

/// Hosts a single registration: a [`MultiConnectorRunner`] of one.
#[derive(Debug, Clone)]
pub struct ConnectorRunner {
    inner: MultiConnectorRunner,
    key: RegistrationKey,
}

impl ConnectorRunner {
    /// A runner for one registration.
    pub fn new(
        registration: ConnectorRegistration,
        options: MultiTransportOptions,
        transport: impl Transport,
    ) -> Self {
        let key = registration.key().clone();
        Self {
            inner: MultiConnectorRunner::new(vec![registration], options, transport),
            key,
        }
    }

    /// A handle that shuts the runner down.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.inner.shutdown_handle()
    }

    /// The registration's live handle.
    pub fn handle(&self) -> Option<RegistrationHandle> {
        self.inner.registration(&self.key)
    }

    /// The registration's state.
    pub fn state(&self) -> RegistrationState {
        self.handle()
            .map(|h| h.state())
            .unwrap_or(RegistrationState::Idle)
    }

    /// The registration's counters.
    pub fn metrics(&self) -> Option<ConnectorMetrics> {
        self.handle().map(|h| h.metrics())
    }

    /// Runs until shutdown or until the registration stops for good.
    pub async fn run(&self) -> Result<(), ConnectorError> {
        self.inner.run().await
    }
}
