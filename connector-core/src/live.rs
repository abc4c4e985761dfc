//! The live view of one hosted registration, shared by its driver (which
//! publishes) and its runner and handles (which read): state, events,
//! counters, and what `remove` needs.
//!
//! Everything here exists once per registration, and a process may host
//! a hundred thousand of them, so what nobody asks for is not made: the
//! `watch` channel behind [`RegistrationHandle::watch_state`] (~380 bytes:
//! a lock and nine notifiers) and the `broadcast` channel behind
//! [`RegistrationHandle::events`] (~5 KiB: its 64 slots are allocated up
//! front) appear on the first call that needs them. Until then the state
//! is a plain value behind a mutex.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::config::RegistrationKey;
use crate::metrics::{ConnectorMetrics, MetricsCell};
use crate::state::{RegistrationEvent, RegistrationState};

/// Events a slow [`RegistrationHandle::events`] receiver may fall behind
/// before it loses the oldest.
const EVENT_CAPACITY: usize = 64;

/// A registration's state: the value, and a `watch` channel made for the
/// first subscriber.
#[derive(Debug)]
pub(crate) struct StateCell {
    inner: Mutex<StateInner>,
    /// The state's [`kind`], readable without the lock: a runner's
    /// `summary()` reads it for every registration it hosts (100 000 locks
    /// per call were most of the call, and a program that polls the summary
    /// pays it at every poll).
    kind: AtomicU8,
}

impl RegistrationState {
    /// Every [`name`](Self::name) a state can have, in the order of the
    /// variants: the label values a per-state gauge or table reports (so a
    /// state that empties shows 0 instead of disappearing).
    pub const NAMES: [&'static str; 8] = [
        "idle",
        "connecting",
        "registering",
        "pending",
        "active",
        "draining",
        "backoff",
        "stopped",
    ];
}

/// The index of `state`'s variant in [`RegistrationState::NAMES`].
fn kind(state: &RegistrationState) -> u8 {
    match state {
        RegistrationState::Idle => 0,
        RegistrationState::Connecting => 1,
        RegistrationState::Registering => 2,
        RegistrationState::PendingApproval => 3,
        RegistrationState::Active => 4,
        RegistrationState::Draining => 5,
        RegistrationState::Backoff { .. } => 6,
        RegistrationState::Stopped(_) => 7,
    }
}

#[derive(Debug)]
struct StateInner {
    now: RegistrationState,
    /// Made under the same lock as every publish, so a subscriber never
    /// misses a change made while its channel was being made.
    watch: Option<watch::Sender<RegistrationState>>,
}

impl StateCell {
    fn new() -> Self {
        Self {
            inner: Mutex::new(StateInner {
                now: RegistrationState::Idle,
                watch: None,
            }),
            kind: AtomicU8::new(kind(&RegistrationState::Idle)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StateInner> {
        // A panic while holding this lock cannot leave a half-written state.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state now.
    pub(crate) fn get(&self) -> RegistrationState {
        self.lock().now.clone()
    }

    /// The name of the state now ([`RegistrationState::name`]), without
    /// the lock.
    pub(crate) fn name(&self) -> &'static str {
        let names = RegistrationState::NAMES;
        names[usize::from(self.kind.load(Ordering::Acquire)) % names.len()]
    }

    /// Replaces the state and tells the subscribers, if any.
    pub(crate) fn publish(&self, state: RegistrationState) {
        let mut inner = self.lock();
        if let Some(watch) = &inner.watch {
            watch.send_replace(state.clone());
        }
        self.kind.store(kind(&state), Ordering::Release);
        inner.now = state;
    }

    /// A receiver that sees every change from now on.
    pub(crate) fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        let mut inner = self.lock();
        let now = inner.now.clone();
        inner
            .watch
            .get_or_insert_with(|| watch::channel(now).0)
            .subscribe()
    }
}

/// Live view of one registration, shared by its driver and its runner.
#[derive(Debug)]
pub(crate) struct LiveShared {
    pub(crate) key: RegistrationKey,
    pub(crate) metrics: MetricsCell,
    pub(crate) state: StateCell,
    /// Made on the first `events()` call (see the module docs).
    pub(crate) events: OnceLock<broadcast::Sender<RegistrationEvent>>,
    /// Cancelled by `remove` (and, as a child, by the runner's shutdown).
    pub(crate) stop: CancellationToken,
    pub(crate) removing: AtomicBool,
}

impl LiveShared {
    pub(crate) fn new(key: RegistrationKey, stop: CancellationToken) -> Self {
        Self {
            key,
            metrics: MetricsCell::default(),
            state: StateCell::new(),
            events: OnceLock::new(),
            stop,
            removing: AtomicBool::new(false),
        }
    }

    /// Sends `event` to the `events()` receivers, if there are any.
    pub(crate) fn send_event(&self, event: RegistrationEvent) {
        if let Some(events) = self.events.get() {
            // No receiver is fine: events are for whoever listens.
            let _ = events.send(event);
        }
    }
}

/// A handle on one hosted registration: its state, events and metrics.
#[derive(Debug, Clone)]
pub struct RegistrationHandle {
    pub(crate) shared: std::sync::Arc<LiveShared>,
}

impl RegistrationHandle {
    /// The registration's key.
    pub fn key(&self) -> &RegistrationKey {
        &self.shared.key
    }

    /// The state now.
    pub fn state(&self) -> RegistrationState {
        self.shared.state.get()
    }

    /// A receiver that sees every state change (`watch` semantics: the
    /// latest value, never a backlog).
    pub fn watch_state(&self) -> watch::Receiver<RegistrationState> {
        self.shared.state.subscribe()
    }

    /// Events from now on. A receiver that falls more than 64 events behind
    /// loses the oldest (`broadcast` semantics) and is told so.
    pub fn events(&self) -> broadcast::Receiver<RegistrationEvent> {
        self.shared
            .events
            .get_or_init(|| broadcast::channel(EVENT_CAPACITY).0)
            .subscribe()
    }

    /// The counters now.
    pub fn metrics(&self) -> ConnectorMetrics {
        self.shared.metrics.snapshot(self.shared.state.get())
    }

    /// Waits until the state satisfies `pred`, or `timeout` passes; returns
    /// the state that satisfied it.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&RegistrationState) -> bool,
    ) -> Option<RegistrationState> {
        let mut rx = self.watch_state();
        tokio::time::timeout(timeout, async {
            let state = rx.wait_for(|s| pred(s)).await.ok()?;
            Some(state.clone())
        })
        .await
        .ok()
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_watch_channel_until_someone_subscribes() {
        let cell = StateCell::new();
        cell.publish(RegistrationState::Connecting);
        assert!(cell.lock().watch.is_none());
        assert_eq!(cell.name(), "connecting");
        let rx = cell.subscribe();
        assert_eq!(*rx.borrow(), RegistrationState::Connecting);
        assert!(cell.lock().watch.is_some());
    }

    #[test]
    fn the_lock_free_name_matches_the_state() {
        let cell = StateCell::new();
        for state in [
            RegistrationState::Idle,
            RegistrationState::Connecting,
            RegistrationState::Registering,
            RegistrationState::PendingApproval,
            RegistrationState::Active,
            RegistrationState::Draining,
            RegistrationState::Backoff {
                delay: Duration::from_millis(5),
            },
            RegistrationState::Stopped(crate::state::StopReason::Shutdown),
        ] {
            let name = state.name();
            assert_eq!(RegistrationState::NAMES[usize::from(kind(&state))], name);
            cell.publish(state);
            assert_eq!(cell.name(), name);
        }
    }

    #[tokio::test]
    async fn a_subscriber_sees_every_later_change() {
        let cell = std::sync::Arc::new(StateCell::new());
        let mut rx = cell.subscribe();
        cell.publish(RegistrationState::Connecting);
        rx.changed().await.expect("sender alive");
        assert_eq!(*rx.borrow_and_update(), RegistrationState::Connecting);
        cell.publish(RegistrationState::Idle);
        rx.changed().await.expect("sender alive");
        assert_eq!(*rx.borrow(), RegistrationState::Idle);
        // A second subscriber shares the channel and starts at the latest.
        let rx2 = cell.subscribe();
        assert_eq!(*rx2.borrow(), RegistrationState::Idle);
    }
}
