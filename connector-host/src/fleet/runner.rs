//! [`FleetRunner`]: hosts exactly the registrations a [`Fleet`] offers, on
//! a [`MultiConnectorRunner`], and tells the fleet when each one it gave
//! back is closed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use connector_core::{
    ConnectorError, ConnectorRegistration, MultiConnectorRunner, RegistrationKey,
};
use futures_util::FutureExt as _;
use tokio::task::{JoinHandle, JoinSet};

use super::Fleet;

/// Builds a runner for the registrations given (the host's transport and
/// options). Called again whenever the previous runner has finished, which
/// a runner does once its last registration is removed.
type RunnerFactory = dyn Fn(Vec<ConnectorRegistration>) -> MultiConnectorRunner + Send + Sync;

/// How long to wait before adding again a key whose previous run is still
/// being forgotten by the runner (its driver has stopped, the runner's
/// bookkeeping lags by a task switch).
const READD_DELAY: Duration = Duration::from_millis(10);

/// Drives a [`MultiConnectorRunner`] from [`Fleet::assignment`]: adds what the
/// fleet offers, removes (gracefully: in-flight answered, stream closed)
/// what it takes back and then calls [`Fleet::released`].
///
/// ```no_run
/// # async fn demo(
/// #     regs: Vec<connector_core::ConnectorRegistration>,
/// #     options: connector_core::MultiTransportOptions,
/// #     transport: impl connector_core::Transport + Clone,
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// use connector_core::MultiConnectorRunner;
/// use connector_host::fleet::{Fleet, FleetOptions, FleetRunner};
///
/// let fleet = Fleet::start(
///     FleetOptions::parse("etcd://127.0.0.1:2379/connector-host")?,
///     regs.iter().map(|r| r.key().clone()),
/// );
/// let host = FleetRunner::new(fleet, regs, move |regs| {
///     MultiConnectorRunner::new(regs, options.clone(), transport.clone())
/// });
/// let run = host.run();
/// tokio::pin!(run);
/// tokio::select! {
///     r = &mut run => r?,
///     _ = tokio::signal::ctrl_c() => {
///         host.fleet().leave().await?; // hands everything over
///         run.await?;                  // returns once all is closed
///     }
/// }
/// # Ok(()) }
/// ```
///
/// Dropping it aborts its runner's tasks and the fleet's without telling
/// anyone (a crash): use [`Fleet::leave`] to stop cleanly.
pub struct FleetRunner {
    fleet: Fleet,
    factory: Box<RunnerFactory>,
    registrations: Mutex<BTreeMap<RegistrationKey, ConnectorRegistration>>,
    current: Mutex<Option<Generation>>,
}

/// One runner and the task running it.
struct Generation {
    runner: MultiConnectorRunner,
    run: JoinHandle<Result<(), ConnectorError>>,
}

impl Drop for FleetRunner {
    fn drop(&mut self) {
        if let Some(g) = lock(&self.current).take() {
            g.run.abort();
        }
    }
}

impl fmt::Debug for FleetRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetRunner")
            .field("fleet", &self.fleet)
            .field("registrations", &lock(&self.registrations).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind the lock; a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FleetRunner {
    /// A host for `registrations` (the full list, the same one the fleet was
    /// started with), building its runners with `factory`.
    pub fn new(
        fleet: Fleet,
        registrations: Vec<ConnectorRegistration>,
        factory: impl Fn(Vec<ConnectorRegistration>) -> MultiConnectorRunner + Send + Sync + 'static,
    ) -> Self {
        Self {
            fleet,
            factory: Box::new(factory),
            registrations: Mutex::new(
                registrations
                    .into_iter()
                    .map(|r| (r.key().clone(), r))
                    .collect(),
            ),
            current: Mutex::new(None),
        }
    }

    /// The fleet (status, leave).
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The runner hosting the registrations now (its metrics, summary and
    /// live handles), if any registration was hosted since the last time
    /// the set was empty.
    pub fn runner(&self) -> Option<MultiConnectorRunner> {
        lock(&self.current).as_ref().map(|g| g.runner.clone())
    }

    /// Replaces the full registration list (a config reload): new keys may
    /// be offered by the fleet, gone ones are taken back and closed.
    pub fn set_registrations(&self, registrations: Vec<ConnectorRegistration>) {
        let keys: Vec<RegistrationKey> = registrations.iter().map(|r| r.key().clone()).collect();
        {
            let mut regs = lock(&self.registrations);
            // A key still hosted keeps its registration until it is removed.
            for r in registrations {
                regs.insert(r.key().clone(), r);
            }
        }
        self.fleet.set_registrations(keys);
    }

    /// Hosts what the fleet offers until the fleet has left (after
    /// [`Fleet::leave`]) and every registration is closed; then stops the
    /// runner and returns. Fails only if a runner does (a transport
    /// configuration error).
    pub async fn run(&self) -> Result<(), ConnectorError> {
        let mut offered = self.fleet.assignment();
        let mut hosting: BTreeSet<RegistrationKey> = BTreeSet::new();
        let mut closing: BTreeSet<RegistrationKey> = BTreeSet::new();
        let mut removing: JoinSet<RegistrationKey> = JoinSet::new();
        let mut open = true;
        loop {
            let (want, give_back) = if open {
                let a = offered.borrow_and_update();
                (a.host.clone(), a.release.clone())
            } else {
                Default::default()
            };
            for key in hosting.difference(&want).cloned().collect::<Vec<_>>() {
                hosting.remove(&key);
                closing.insert(key.clone());
                let runner = self.runner();
                tracing::debug!(%key, "fleet: closing a registration the fleet took back");
                removing.spawn(async move {
                    if let Some(r) = runner {
                        // Unknown means it already stopped by itself.
                        let _ = r.remove(&key).await;
                    }
                    key
                });
            }
            // Taken back before this loop ever saw it offered: nothing to
            // close.
            for key in give_back.iter() {
                if !hosting.contains(key) && !closing.contains(key) {
                    self.fleet.released(key);
                }
            }
            let mut readd = false;
            for key in want.difference(&hosting).cloned().collect::<Vec<_>>() {
                match self.add(&key) {
                    Ok(true) => {
                        hosting.insert(key);
                    }
                    Ok(false) => readd = true,
                    Err(e) => return Err(e),
                }
            }
            if !open && removing.is_empty() {
                break;
            }
            tokio::select! {
                changed = offered.changed(), if open => {
                    if changed.is_err() {
                        open = false;
                    }
                }
                Some(done) = removing.join_next(), if !removing.is_empty() => {
                    match done {
                        Ok(key) => {
                            tracing::debug!(%key, "fleet: registration closed");
                            closing.remove(&key);
                            self.fleet.released(&key);
                        }
                        Err(e) => tracing::error!(error = %e, "fleet: a removal task failed"),
                    }
                }
                _ = tokio::time::sleep(READD_DELAY), if readd => {}
            }
        }
        let current = lock(&self.current).take();
        if let Some(g) = current {
            g.runner.shutdown_handle().shutdown();
            match g.run.await {
                Ok(r) => r?,
                Err(e) => tracing::error!(error = %e, "fleet: the runner task failed"),
            }
        }
        Ok(())
    }

    /// Hosts `key`: on the current runner, or on a new one. `Ok(false)`
    /// when the runner still lists the key from its previous run (retry
    /// shortly).
    fn add(&self, key: &RegistrationKey) -> Result<bool, ConnectorError> {
        let Some(reg) = lock(&self.registrations).get(key).cloned() else {
            tracing::warn!(%key, "fleet: offered a registration that is not in the list");
            return Ok(true);
        };
        let mut cur = lock(&self.current);
        if let Some(g) = cur.as_ref() {
            if !g.run.is_finished() {
                match g.runner.add(reg.clone()) {
                    Ok(_) => return Ok(true),
                    Err(ConnectorError::InvalidConfig(_)) => return Ok(false),
                    // Finished or finishing: start the next one below.
                    Err(ConnectorError::AlreadyRunning(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if let Some(mut old) = cur.take() {
            // Its last registration was removed (or stopped for good) and
            // its `run` has returned or is about to; only an error matters.
            if let Some(Ok(Err(e))) = (&mut old.run).now_or_never() {
                return Err(e);
            }
        }
        let runner = (self.factory)(vec![reg]);
        let r = runner.clone();
        let run = tokio::spawn(async move { r.run().await });
        *cur = Some(Generation { runner, run });
        Ok(true)
    }
}
