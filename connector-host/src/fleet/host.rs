//! The fleet inside the `connector-host` program (`--fleet`): a [`Fleet`]
//! drives the host's allowed set ([`Host::set_allowed`]), so the host runs
//! `configured ∩ owned` with everything it already does for the rest
//! (tokens, pauses, re-registration on reload, `/registrations`).
//!
//! The hand-over rule of the engine holds here because a key is reported
//! released only after a reconcile that *started after* the key left the
//! allowed set has finished: by then the host has closed it gracefully
//! (in-flight answered, stream closed) and forgotten it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use connector_core::RegistrationKey;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

use super::{Fleet, FleetError, FleetOptions, FleetStatus};
use crate::hosting::Host;
use crate::ops::ReadyGate;

/// A replica of a fleet: the etcd side and the task that applies its
/// assignment to the host.
pub(crate) struct FleetHost {
    fleet: Arc<Fleet>,
    /// `None` once awaited by [`FleetHost::leave`].
    driver: Option<JoinHandle<()>>,
    url: String,
    lease: Duration,
}

impl Drop for FleetHost {
    fn drop(&mut self) {
        // Without `leave` this is a crash for the others: the keys expire
        // with the lease.
        if let Some(driver) = &self.driver {
            driver.abort();
        }
    }
}

/// The options of `--fleet URL`, `--fleet-member ID` and
/// `--fleet-lease-secs S` (or their config keys), validated.
pub(crate) fn options(
    url: &str,
    member: Option<&str>,
    lease_secs: u64,
) -> Result<FleetOptions, FleetError> {
    let mut builder = FleetOptions::builder(url)
        // Out of range is refused by the builder with the accepted range.
        .lease_secs(u32::try_from(lease_secs).unwrap_or(u32::MAX));
    if let Some(member) = member {
        builder = builder.member(member);
    }
    builder.build()
}

impl FleetHost {
    /// Joins the fleet with the full list `keys` and starts applying its
    /// assignment to `host`. The host must already host nothing but what
    /// the fleet allows (`set_allowed(Some(∅))` before its first
    /// configuration).
    pub(crate) fn start(
        options: FleetOptions,
        host: Arc<Host>,
        keys: impl IntoIterator<Item = RegistrationKey>,
    ) -> Self {
        let url = options.url().to_string();
        let lease = options.lease_ttl();
        let member = options.member().to_string();
        let fleet = Arc::new(Fleet::start(options, keys));
        tracing::info!(
            fleet = %url,
            %member,
            lease_secs = lease.as_secs(),
            "fleet: joining; this replica hosts the registrations it owns"
        );
        let driver = tokio::spawn(drive(fleet.clone(), host));
        Self {
            fleet,
            driver: Some(driver),
            url,
            lease,
        }
    }

    /// The fleet URL as given.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Replaces the full registration list (a reload).
    pub(crate) fn set_registrations(&self, keys: impl IntoIterator<Item = RegistrationKey>) {
        self.fleet.set_registrations(keys);
    }

    /// What `/ready` waits for besides the registrations: joined.
    pub(crate) fn ready_gate(&self) -> ReadyGate {
        let status = self.fleet.status();
        Arc::new(move || describe(&status.borrow()))
    }

    /// Leaves the fleet: closes every hosted registration gracefully,
    /// deletes its ownership keys and revokes the lease, so the others take
    /// over at once. Waits at most `limit`; after that (or when etcd cannot
    /// be told) the keys expire with the lease instead, which is logged.
    pub(crate) async fn leave(mut self, limit: Duration) {
        let started = Instant::now();
        match tokio::time::timeout(limit, self.fleet.leave()).await {
            Ok(Ok(())) => tracing::info!(
                fleet = %self.url,
                took_ms = started.elapsed().as_millis() as u64,
                "fleet: left; registrations closed, ownership keys deleted, lease revoked"
            ),
            Ok(Err(e)) => tracing::warn!(
                fleet = %self.url,
                error = %e,
                "fleet: registrations closed, but etcd could not be told; \
                 the others take over when the lease expires (within {:?})",
                self.lease
            ),
            Err(_) => tracing::warn!(
                fleet = %self.url,
                "fleet: leaving took longer than {limit:?}; exiting anyway, \
                 the others take over when the lease expires (within {:?})",
                self.lease
            ),
        }
        // The assignment channel closes once the fleet has left, and the
        // driver ends after emptying the host (it already is: everything
        // was released).
        if let Some(driver) = self.driver.take() {
            if tokio::time::timeout(DRIVER_END, driver).await.is_err() {
                tracing::warn!("fleet: the host was still closing registrations at exit");
            }
        }
    }
}

/// How long [`FleetHost::leave`] waits for the driver after the fleet left.
const DRIVER_END: Duration = Duration::from_secs(2);

/// `/ready`'s view of the fleet: `Ok(note)` while joined, else why not.
fn describe(s: &FleetStatus) -> Result<String, String> {
    if s.is_ready() {
        Ok(format!(
            "fleet joined: {} member{}, {} owned here",
            s.members,
            if s.members == 1 { "" } else { "s" },
            s.owned
        ))
    } else {
        Err(match &s.last_error {
            Some(e) => format!("fleet {}: {e}", s.state.name()),
            None => format!("fleet {}", s.state.name()),
        })
    }
}

/// How long the share must stay unchanged before it is logged at `info`:
/// a join moves keys one watch event at a time, and one line per settled
/// share is what an operator wants to read.
const QUIET: Duration = Duration::from_millis(500);

/// Applies every assignment to the host, then reports the given-back keys
/// as released (each is closed by then). Ends when the fleet has left.
async fn drive(fleet: Arc<Fleet>, host: Arc<Host>) {
    let mut offered = fleet.assignment();
    let status = fleet.status();
    let mut report_at: Option<Instant> = None;
    let mut apply = true;
    loop {
        if apply {
            let assignment = offered.borrow_and_update().clone();
            let owned = assignment.host.len();
            let changes = host.set_allowed(Some(assignment.host)).await;
            for key in &assignment.release {
                fleet.released(key);
            }
            if changes.added + changes.removed + changes.changed > 0 {
                tracing::debug!(
                    added = changes.added,
                    removed = changes.removed,
                    failed = changes.failed,
                    owned,
                    "fleet: share changed"
                );
                report_at = Some(Instant::now() + QUIET);
            }
        }
        tokio::select! {
            changed = offered.changed() => {
                if changed.is_err() {
                    break;
                }
                apply = true;
            }
            () = sleep_until(report_at.unwrap_or_else(Instant::now)), if report_at.is_some() => {
                report_at = None;
                apply = false;
                let (members, owned) = {
                    let s = status.borrow();
                    (s.members, s.owned)
                };
                tracing::info!(
                    owned,
                    members,
                    configured = host.configured_len(),
                    "fleet: hosting {owned} of {} registrations ({members} member{})",
                    host.configured_len(),
                    if members == 1 { "" } else { "s" }
                );
            }
        }
    }
    // Left (or the fleet's task ended): nothing is ours any more.
    host.set_allowed(Some(BTreeSet::new())).await;
}
