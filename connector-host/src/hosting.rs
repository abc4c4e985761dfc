//! The set of registrations a host runs, kept equal to what it is asked for.
//!
//! What is hosted is `configured ∩ this shard ∩ allowed` ([`hosted_share`]):
//! `configured` comes from the flags or the config file (replaced at each
//! reload), `shard` from `--shard`/`--shards`, and `allowed` is an optional
//! set of keys that something else assigns to this replica at run time (an
//! elastic fleet's share; `None` means every key). Of the hosted ones, the
//! paused are listed but not connected. [`Host::reconcile`] brings the
//! runner to that set: gone → removed gracefully, new → added, changed →
//! removed and added again (re-registered), unchanged → untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use connector_core::{
    sanitize_text, ConnectorRegistration, MultiConnectorRunner, RegistrationEvent, RegistrationKey,
    RegistrationState, Shard, StopReason, MAX_PEER_TEXT_CHARS,
};
use serde::Serialize;
use tokio::time::Instant;

use crate::config::RegistrationSpec;
use crate::ConnectorTypes;

/// How long a re-registration waits for the old registration's entry to be
/// gone from the runner before adding the new one.
const FORGET_TIMEOUT: Duration = Duration::from_secs(30);

/// The registrations this replica hosts: those of `configured` that `shard`
/// owns and that `allowed` (when set) contains. The seam where a fleet's
/// assignment is applied.
pub(crate) fn hosted_share(
    configured: &[RegistrationSpec],
    shard: Option<Shard>,
    allowed: Option<&BTreeSet<RegistrationKey>>,
) -> Vec<RegistrationSpec> {
    configured
        .iter()
        .filter(|s| shard.is_none_or(|shard| shard.owns(&s.key)))
        .filter(|s| allowed.is_none_or(|a| a.contains(&s.key)))
        .cloned()
        .collect()
}

/// What a reconcile did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Changes {
    pub(crate) added: usize,
    pub(crate) removed: usize,
    pub(crate) changed: usize,
    pub(crate) unchanged: usize,
    /// Registrations that could not be (re)added (their token file became
    /// unreadable): logged, not hosted.
    pub(crate) failed: usize,
}

/// What `/registrations` and the status line know about one hosted
/// registration beyond its counters.
#[derive(Debug)]
struct Tracked {
    state: &'static str,
    since: Instant,
    last_error: Option<String>,
}

type TrackedCell = Arc<Mutex<Tracked>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Hosted {
    spec: RegistrationSpec,
    tracked: TrackedCell,
}

/// Inputs of the hosted set; see [`hosted_share`].
struct Wanted {
    configured: Vec<RegistrationSpec>,
    shard: Option<Shard>,
    allowed: Option<BTreeSet<RegistrationKey>>,
}

/// A host's registrations over one [`MultiConnectorRunner`].
pub(crate) struct Host {
    runner: MultiConnectorRunner,
    types: ConnectorTypes,
    wanted: Mutex<Wanted>,
    hosted: Mutex<BTreeMap<RegistrationKey, Hosted>>,
    /// One reconcile at a time.
    reconciling: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("hosted", &lock(&self.hosted).len())
            .finish_non_exhaustive()
    }
}

/// One object of `GET /registrations` (fields of connector-host-config.md).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct RegistrationView {
    pub(crate) key: String,
    pub(crate) state: &'static str,
    pub(crate) since_ms: u64,
    /// The transport's connection the stream is on (an HTTP/2 connection
    /// for gRPC, the socket for WebSocket); null without an open stream.
    pub(crate) connection_id: Option<u64>,
    pub(crate) in_flight: u64,
    pub(crate) requests_received: u64,
    pub(crate) requests_succeeded: u64,
    pub(crate) requests_failed: u64,
    pub(crate) disconnects: u64,
    pub(crate) reconnects: u64,
    pub(crate) last_heartbeat_rtt_ms: Option<f64>,
    pub(crate) last_error: Option<String>,
}

/// Counts for `/ready` and the status line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Hosted and not paused.
    pub(crate) expected: usize,
    /// Of those, active.
    pub(crate) active: usize,
    pub(crate) paused: usize,
    /// By state name, over all hosted (paused included).
    pub(crate) by_state: BTreeMap<&'static str, usize>,
    /// Executes received so far, summed.
    pub(crate) executes: u64,
}

impl Counts {
    /// `/ready`: every hosted registration that is not paused is active.
    pub(crate) fn ready(&self) -> bool {
        self.active >= self.expected
    }

    pub(crate) fn count(&self, state: &str) -> usize {
        self.by_state.get(state).copied().unwrap_or(0)
    }
}

impl Host {
    pub(crate) fn new(
        runner: MultiConnectorRunner,
        types: ConnectorTypes,
        shard: Option<Shard>,
    ) -> Self {
        Self {
            runner,
            types,
            wanted: Mutex::new(Wanted {
                configured: Vec::new(),
                shard,
                allowed: None,
            }),
            hosted: Mutex::new(BTreeMap::new()),
            reconciling: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn runner(&self) -> &MultiConnectorRunner {
        &self.runner
    }

    /// Replaces the configured registrations (start-up, reload) and
    /// reconciles.
    pub(crate) async fn set_configured(&self, configured: Vec<RegistrationSpec>) -> Changes {
        lock(&self.wanted).configured = configured;
        self.reconcile().await
    }

    /// Replaces the keys this replica may host (`None`: all), as a fleet
    /// assigns them, and reconciles.
    #[cfg_attr(
        not(feature = "etcd"),
        allow(dead_code, reason = "driven by the fleet (feature `etcd`)")
    )]
    pub(crate) async fn set_allowed(&self, allowed: Option<BTreeSet<RegistrationKey>>) -> Changes {
        lock(&self.wanted).allowed = allowed;
        self.reconcile().await
    }

    /// How many registrations the configuration names before the shard and
    /// fleet filters.
    pub(crate) fn configured_len(&self) -> usize {
        lock(&self.wanted).configured.len()
    }

    /// Brings the runner to [`hosted_share`] of what is wanted now.
    pub(crate) async fn reconcile(&self) -> Changes {
        let _one = self.reconciling.lock().await;
        let target: BTreeMap<RegistrationKey, RegistrationSpec> = {
            let w = lock(&self.wanted);
            hosted_share(&w.configured, w.shard, w.allowed.as_ref())
                .into_iter()
                .map(|s| (s.key.clone(), s))
                .collect()
        };
        let mut changes = Changes::default();
        let current: BTreeMap<RegistrationKey, RegistrationSpec> = lock(&self.hosted)
            .iter()
            .map(|(k, h)| (k.clone(), h.spec.clone()))
            .collect();
        // Gone, and changed (re-registered): the old one goes first. All
        // are closed at once, so one slow drain (a long request in flight)
        // does not hold up the others (a fleet hand-over waits for these).
        let mut to_add = Vec::new();
        let mut downs = Vec::new();
        for (key, old) in &current {
            match target.get(key) {
                None => {
                    downs.push((key, old));
                    changes.removed += 1;
                }
                Some(new) if new != old => {
                    downs.push((key, old));
                    to_add.push(new.clone());
                    changes.changed += 1;
                }
                Some(_) => changes.unchanged += 1,
            }
        }
        futures_util::future::join_all(downs.iter().map(|(key, old)| self.take_down(key, old)))
            .await;
        {
            let mut hosted = lock(&self.hosted);
            for (key, _) in &downs {
                hosted.remove(*key);
            }
        }
        for (key, spec) in &target {
            if !current.contains_key(key) {
                to_add.push(spec.clone());
                changes.added += 1;
            }
        }
        for spec in to_add {
            if let Err(e) = self.bring_up(spec) {
                tracing::error!("{e}");
                changes.failed += 1;
            }
        }
        changes
    }

    /// Removes `key` from the runner (unless paused: it is not there) and
    /// waits until the runner has forgotten it, so the same key can be
    /// added again at once.
    async fn take_down(&self, key: &RegistrationKey, spec: &RegistrationSpec) {
        if spec.paused {
            return;
        }
        let Some(handle) = self.runner.registration(key) else {
            return;
        };
        let mut gone = handle.watch_state();
        drop(handle);
        if let Err(e) = self.runner.remove(key).await {
            tracing::debug!(%key, error = %e, "remove");
        }
        // The state channel closes when the runner drops its entry.
        let forgotten = tokio::time::timeout(FORGET_TIMEOUT, async {
            while gone.changed().await.is_ok() {}
        })
        .await;
        if forgotten.is_err() {
            tracing::warn!(%key, "the runner still holds this registration after removing it");
        }
    }

    /// Adds `spec`: listed at once; connected unless paused.
    fn bring_up(&self, spec: RegistrationSpec) -> Result<(), String> {
        let key = spec.key.clone();
        let tracked = Arc::new(Mutex::new(Tracked {
            state: if spec.paused { "paused" } else { "idle" },
            since: Instant::now(),
            last_error: None,
        }));
        if !spec.paused {
            // A token file or variable is a token source: read again
            // before every `register`, reconnects included.
            let config = spec.connector_config()?;
            let connector = self
                .types
                .make(&key)
                .ok_or_else(|| format!("{key}: unknown connector type"))?;
            let handle = self
                .runner
                .add(ConnectorRegistration::from_arc(config, connector))
                .map_err(|e| format!("{key}: cannot add: {e}"))?;
            spawn_tracker(handle, tracked.clone());
        }
        lock(&self.hosted).insert(key, Hosted { spec, tracked });
        Ok(())
    }

    /// Counts for `/ready` and the status line.
    pub(crate) fn counts(&self) -> Counts {
        let metrics = self.runner.metrics_snapshot();
        let hosted = lock(&self.hosted);
        let mut counts = Counts::default();
        for (key, h) in hosted.iter() {
            let state = if h.spec.paused {
                counts.paused += 1;
                "paused"
            } else {
                counts.expected += 1;
                let m = metrics.get(key);
                let state = m.map_or("idle", |m| m.state.name());
                if state == "active" {
                    counts.active += 1;
                }
                counts.executes += m.map_or(0, |m| m.requests_received);
                state
            };
            *counts.by_state.entry(state).or_default() += 1;
        }
        counts
    }

    /// `GET /registrations`, in key order.
    pub(crate) fn views(&self) -> Vec<RegistrationView> {
        let metrics = self.runner.metrics_snapshot();
        let hosted = lock(&self.hosted);
        let now = Instant::now();
        hosted
            .iter()
            .map(|(key, h)| {
                let t = lock(&h.tracked);
                let m = metrics.get(key).filter(|_| !h.spec.paused);
                let state = if h.spec.paused {
                    "paused"
                } else {
                    m.map_or("idle", |m| m.state.name())
                };
                // The tracker may not have seen the latest change yet.
                let since = if t.state == state { t.since } else { now };
                RegistrationView {
                    key: key.to_string(),
                    state,
                    since_ms: now.saturating_duration_since(since).as_millis() as u64,
                    connection_id: m.and_then(|m| m.connection_id),
                    in_flight: m.map_or(0, |m| m.in_flight),
                    requests_received: m.map_or(0, |m| m.requests_received),
                    requests_succeeded: m.map_or(0, |m| m.requests_succeeded),
                    requests_failed: m.map_or(0, |m| m.requests_failed),
                    disconnects: m.map_or(0, |m| m.total_disconnects),
                    reconnects: m.map_or(0, |m| m.successful_reconnects),
                    last_heartbeat_rtt_ms: m
                        .and_then(|m| m.last_heartbeat_rtt)
                        .map(|d| d.as_secs_f64() * 1000.0),
                    last_error: t.last_error.clone(),
                }
            })
            .collect()
    }
}

/// Server text made safe for JSON consumers and terminals.
fn clean(text: &str) -> String {
    sanitize_text(text, MAX_PEER_TEXT_CHARS).into_owned()
}

/// Follows one registration's state and events for `/registrations`
/// (`since_ms`, `last_error`) until the runner forgets it.
fn spawn_tracker(handle: connector_core::RegistrationHandle, tracked: TrackedCell) {
    let mut states = handle.watch_state();
    let mut events = handle.events();
    // The tracker must not keep the registration alive.
    drop(handle);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = states.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let state = states.borrow_and_update().clone();
                    let mut t = lock(&tracked);
                    if t.state != state.name() {
                        t.state = state.name();
                        t.since = Instant::now();
                    }
                    if let RegistrationState::Stopped(StopReason::Rejected { message, reason }) = &state {
                        t.last_error = Some(clean(&format!(
                            "rejected {}: {message}",
                            reason.as_str_name()
                        )));
                    }
                }
                event = events.recv() => match event {
                    Ok(RegistrationEvent::Disconnected { cause }) => {
                        lock(&tracked).last_error = Some(clean(&cause.to_string()));
                    }
                    Ok(RegistrationEvent::Rejected { reason, message }) => {
                        lock(&tracked).last_error = Some(clean(&format!(
                            "rejected {}: {message}",
                            reason.as_str_name()
                        )));
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
}
