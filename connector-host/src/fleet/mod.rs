//! Elastic fleets coordinated through etcd.
//!
//! Every replica is given the same full list of registrations and hosts
//! only the ones it owns. Replicas join and leave without a restart:
//!
//! - **Membership.** Each replica puts `PREFIX/members/ID` on its own lease
//!   (TTL [`FleetOptionsBuilder::lease_secs`], kept alive at a third of it)
//!   and watches `PREFIX/` for the member set.
//! - **Assignment.** A key belongs to the live member that
//!   [`connector_core::owner_of`] names: rendezvous hashing of
//!   `tenant.type.instance` with the same weight `--shard` uses, so a join
//!   or a leave moves only the keys the newcomer takes or the leaver held.
//! - **Ownership.** A replica hosts a key only while it holds
//!   `PREFIX/owners/KEY`, created in a transaction only if absent, on its
//!   lease. A replica that stops owning a key (membership changed, leaving,
//!   lease lost) first stops hosting it gracefully, then deletes the key
//!   (only if it is still the one it created); the new owner, which watches
//!   `owners/`, creates its own as soon as the old one is gone. A replica
//!   that dies loses its lease and its keys vanish with it: the others take
//!   over within about one TTL.
//! - **etcd unreachable.** The replica keeps hosting what it owns while its
//!   lease is valid by its own conservative clock (the send time of the last
//!   answered keep-alive plus the TTL, which etcd can only extend), stops
//!   hosting everything a quarter TTL before that, then retries with backoff
//!   and joins again with a new lease once etcd answers.
//!
//! # The seam with the host
//!
//! [`Fleet`] is the etcd side. It publishes, in [`Fleet::assignment`], the
//! keys this replica may host *now* and the keys it is taking back. The host
//! closes each taken-back key gracefully and then calls [`Fleet::released`];
//! only then is its ownership key deleted, and the key is never offered
//! again before that.
//! [`FleetRunner`] is that host loop for a bare
//! [`connector_core::MultiConnectorRunner`]. The `connector-host` program
//! (`--fleet`) runs the same loop over its own host instead, so a fleet's
//! share keeps everything the program does for its registrations (token
//! files, pauses, re-registration on reload, `/registrations`).
//!
//! ```text
//!            start / backoff over
//!   ┌────────────┐  lease granted, member key put   ┌────────┐
//!   │ Connecting │ ───────────────────────────────▶ │ Joined │ ◀─┐ streams
//!   └────────────┘                                  └────────┘   │ repaired
//!         ▲   ▲                    keep-alive or watch  │        │
//!         │   │                    stream broken        ▼        │
//!         │   │  lease lost (expired, or   ┌──────────┐          │
//!         │   └─ 3/4 TTL unanswered): hand │ Degraded │ ─────────┘
//!         │      everything back           └──────────┘
//!   ┌───────────┐                                │
//!   │ Suspended │ ◀──────────────────────────────┘
//!   └───────────┘      leave(): hand everything back, revoke  ──▶  Left
//! ```
//!
//! Dropping a [`Fleet`] without [`Fleet::leave`] is a crash as far as the
//! others can tell: nothing is revoked, the keys expire with the lease.

mod engine;
pub(crate) mod host;
mod options;
mod runner;

pub use engine::Fleet;

use std::collections::BTreeSet;

use connector_core::RegistrationKey;
pub use options::{FleetOptions, FleetOptionsBuilder, DEFAULT_LEASE_SECS};
pub use runner::FleetRunner;

/// Gauge: live members of the fleet as this replica sees them (0 when it
/// is not joined).
pub const METRIC_FLEET_MEMBERS: &str = "connector_host_fleet_members";
/// Gauge: registrations this replica owns (holds the ownership key of) now.
pub const METRIC_FLEET_OWNED: &str = "connector_host_fleet_owned";
/// Counter: ownership changes at this replica, by `direction`: `acquired`
/// (it created an ownership key) or `released` (it gave one up: membership
/// change, leave, lease lost, or the key vanished under it).
pub const METRIC_FLEET_MOVES: &str = "connector_host_fleet_moves_total";

/// Everything that can go wrong in a fleet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// A fleet option is invalid (URL, member id, lease TTL); the message
    /// names it and says what is expected. Fix the configuration.
    #[error("invalid fleet configuration: {0}")]
    InvalidConfig(String),
    /// etcd could not be reached or refused a request. The fleet retries by
    /// itself; this is only returned by [`Fleet::leave`], whose keys then
    /// expire with the lease instead of at once.
    #[error("etcd: {0}")]
    Etcd(String),
}

impl FleetError {
    /// True when the error is the caller's to fix.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::InvalidConfig(_))
    }
}

/// What a replica may host and what it must give back
/// ([`Fleet::assignment`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Assignment {
    /// Keys this replica holds the ownership key of: host them.
    pub host: BTreeSet<RegistrationKey>,
    /// Keys taken back: close each one if hosted, then call
    /// [`Fleet::released`]. Never also in `host`.
    pub release: BTreeSet<RegistrationKey>,
}

/// Where a replica is in the fleet (see the diagram in the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FleetState {
    /// No lease yet: connecting to etcd or waiting out a backoff.
    Connecting,
    /// Member with a live lease and a current view of the fleet.
    Joined,
    /// Member with a lease still valid, but the keep-alive or the watch
    /// stream is broken (etcd unreachable): keeps hosting what it owns,
    /// takes nothing new, repairs with backoff.
    Degraded,
    /// The lease was lost: everything is being handed back; it joins again
    /// with a new lease once etcd answers.
    Suspended,
    /// Left the fleet for good ([`Fleet::leave`]).
    Left,
}

impl FleetState {
    /// The state's name, for logs, `/ready` and tables.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Joined => "joined",
            Self::Degraded => "degraded",
            Self::Suspended => "suspended",
            Self::Left => "left",
        }
    }
}

/// A snapshot of the replica's place in the fleet ([`Fleet::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FleetStatus {
    /// The state.
    pub state: FleetState,
    /// Live members as last seen (0 when not joined).
    pub members: usize,
    /// Registrations this replica owns now.
    pub owned: usize,
    /// The last etcd failure, cleared once joined again.
    pub last_error: Option<String>,
}

impl FleetStatus {
    /// What `/ready` should answer: joined with a current view of the fleet.
    pub fn is_ready(&self) -> bool {
        self.state == FleetState::Joined
    }
}
