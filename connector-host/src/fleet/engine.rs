//! [`Fleet`]: one replica's membership, view and ownership keys in etcd,
//! driven by one task that owns all of its state.
//!
//! The task is level-triggered: after every event (a watch event, a
//! keep-alive answer, a release, a timer) it recomputes which keys this
//! replica should own from the member set and moves towards that, so a
//! missed or reordered event can delay a move but never make it wrong.
//! Every etcd request is bounded by a timeout well under the lease TTL so
//! the lease guard is never starved.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use connector_core::{
    owner_of, sanitize_text, Backoff, JitterRng, RegistrationKey, MAX_PEER_TEXT_CHARS,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchResponse, WatchStream,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};

use super::{
    Assignment, FleetError, FleetOptions, FleetState, FleetStatus, METRIC_FLEET_MEMBERS,
    METRIC_FLEET_MOVES, METRIC_FLEET_OWNED,
};

/// How many ownership transactions run at once (etcd batches concurrent
/// proposals into one raft round).
const ACQUIRE_CONCURRENCY: usize = 64;

/// A replica's membership in a fleet (see the [module docs](super)).
///
/// Made by [`Fleet::start`]; the work happens on a task of the current
/// tokio runtime. Dropping it aborts that task without revoking anything
/// (a crash, as the other replicas see it); call [`Fleet::leave`] for a
/// clean exit.
pub struct Fleet {
    member: String,
    cmds: mpsc::UnboundedSender<Cmd>,
    assignment: watch::Receiver<Assignment>,
    status: watch::Receiver<FleetStatus>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("member", &self.member)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Cmd {
    Released(RegistrationKey),
    SetRegistrations(BTreeSet<RegistrationKey>),
    Leave(oneshot::Sender<Result<(), FleetError>>),
}

impl Fleet {
    /// Joins the fleet described by `options` with the full registration
    /// list `keys` (every replica is given the same list). Returns at once;
    /// connecting, joining and retrying happen on a spawned task. Must be
    /// called inside a tokio runtime.
    pub fn start(options: FleetOptions, keys: impl IntoIterator<Item = RegistrationKey>) -> Self {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (hosted_tx, assignment) = watch::channel(Assignment::default());
        let (status_tx, status) = watch::channel(FleetStatus {
            state: FleetState::Connecting,
            members: 0,
            owned: 0,
            last_error: None,
        });
        let member = options.member().to_string();
        let ttl = options.lease_ttl();
        let seed = member.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let engine = Engine {
            keys: by_name(keys),
            prefix: options.prefix().to_string(),
            request_timeout: (ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(2)),
            backoff: Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(5).min(ttl),
                Duration::from_millis(100),
                JitterRng::new(seed),
            ),
            options,
            client: None,
            hosted_tx,
            status_tx,
            cmds: cmd_rx,
            closing: BTreeMap::new(),
            old_lease: None,
            leaving: None,
            last_error: None,
        };
        let task = tokio::spawn(engine.run());
        Self {
            member,
            cmds: cmd_tx,
            assignment,
            status,
            task,
        }
    }

    /// This replica's member id.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// What this replica may host now and what it must give back. Host
    /// every key of [`Assignment::host`]; for every key of
    /// [`Assignment::release`], close it gracefully if it is hosted, then
    /// call [`Fleet::released`] (also for a key never hosted: a watch
    /// channel keeps only the latest value, so a key may enter and leave
    /// `host` between two looks). The channel closes when the fleet has
    /// left (or its task was aborted).
    pub fn assignment(&self) -> watch::Receiver<Assignment> {
        self.assignment.clone()
    }

    /// The keys this replica may host now (a snapshot of
    /// [`Assignment::host`]).
    pub fn hosted(&self) -> BTreeSet<RegistrationKey> {
        self.assignment.borrow().host.clone()
    }

    /// The replica's state, for `/ready`, logs and tables.
    pub fn status(&self) -> watch::Receiver<FleetStatus> {
        self.status.clone()
    }

    /// Says the host has closed `key` (listed in [`Assignment::release`]): its
    /// ownership key is deleted and another replica may take it. A key
    /// that left the set is not offered again before this call.
    pub fn released(&self, key: &RegistrationKey) {
        // Fails only when the task has ended, and then nothing is held.
        let _ = self.cmds.send(Cmd::Released(key.clone()));
    }

    /// Replaces the full registration list (a config reload). Keys no
    /// longer listed leave [`Assignment::host`]; new ones are assigned.
    pub fn set_registrations(&self, keys: impl IntoIterator<Item = RegistrationKey>) {
        let _ = self
            .cmds
            .send(Cmd::SetRegistrations(keys.into_iter().collect()));
    }

    /// Leaves the fleet: every key leaves [`Assignment::host`] at once (and is
    /// deleted as the host releases it, so each moves as soon as it is
    /// closed), the member key goes, and once all are released the lease is
    /// revoked. Resolves then; unbounded if the host never releases, so
    /// wrap it in a timeout. An `Err` means etcd could not be told: the
    /// keys expire with the lease instead.
    pub async fn leave(&self) -> Result<(), FleetError> {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Leave(tx)).is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }
}

fn by_name(keys: impl IntoIterator<Item = RegistrationKey>) -> BTreeMap<String, RegistrationKey> {
    keys.into_iter().map(|k| (k.to_string(), k)).collect()
}

/// One lease and what hangs on it.
struct Session {
    lease: i64,
    ttl: Duration,
    /// The lease is valid until then by our clock: the send time of the
    /// last answered keep-alive plus the TTL. etcd's own expiry is later.
    deadline: Instant,
    keeper: LeaseKeeper,
    /// `None` while broken.
    keepalive: Option<LeaseKeepAliveStream>,
    /// Send times of unanswered keep-alives, oldest first.
    sent: VecDeque<Instant>,
    next_keepalive: Instant,
    /// `None` while broken (the view is then stale).
    watch: Option<WatchStream>,
    members: BTreeSet<String>,
    /// Ownership keys by registration name.
    owners: HashMap<String, OwnerKey>,
    /// Keys this replica owns and may host, with their create revision.
    held: BTreeMap<RegistrationKey, i64>,
    /// Ownership keys to delete once etcd answers (name → create revision).
    deletes: HashMap<String, i64>,
    /// Something failed; retry at this time.
    retry_at: Option<Instant>,
}

/// One ownership key as last seen.
/// (Its value, the owner's member id, is there for operators reading etcd.)
struct OwnerKey {
    create_revision: i64,
    lease: i64,
}

impl Session {
    fn degraded(&self) -> bool {
        self.keepalive.is_none() || self.watch.is_none()
    }
}

enum SessionEnd {
    Lost,
    Left,
}

struct Engine {
    options: FleetOptions,
    prefix: String,
    request_timeout: Duration,
    backoff: Backoff,
    client: Option<Client>,
    keys: BTreeMap<String, RegistrationKey>,
    hosted_tx: watch::Sender<Assignment>,
    status_tx: watch::Sender<FleetStatus>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    /// Keys that left the hosted set and that the host has not released:
    /// never offered again before that. The create revision, if the
    /// ownership key may still exist, to delete it on release.
    closing: BTreeMap<RegistrationKey, Option<i64>>,
    /// A lease lost by our clock that etcd may still hold (it extends
    /// leases across its own restarts): revoked once nothing is closing.
    old_lease: Option<i64>,
    leaving: Option<Vec<oneshot::Sender<Result<(), FleetError>>>>,
    last_error: Option<String>,
}

/// Runs `f` with the request timeout; a timeout is an error like any other.
async fn bounded<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", clean(&e.to_string()))),
        Err(_) => Err(format!("{what}: no answer in {limit:?}")),
    }
}

impl Engine {
    fn members_key(&self) -> String {
        format!("{}/members/", self.prefix)
    }

    fn owners_key(&self) -> String {
        format!("{}/owners/", self.prefix)
    }

    fn me(&self) -> &str {
        self.options.member()
    }

    async fn run(mut self) {
        loop {
            self.publish(None);
            let session = match self.join().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(member = %self.me(), error = %e, "fleet: cannot join; retrying");
                    self.last_error = Some(e);
                    self.publish(None);
                    let wait = self.backoff.next_delay();
                    if self.idle_until(Instant::now() + wait).await {
                        return;
                    }
                    continue;
                }
            };
            self.backoff.reset();
            self.last_error = None;
            tracing::info!(member = %self.me(), lease = session.lease, ttl = ?session.ttl, "fleet: joined");
            match self.session(session).await {
                SessionEnd::Left => return,
                SessionEnd::Lost => continue,
            }
        }
    }

    /// Between sessions: handles commands until `until`. True when the
    /// fleet has left.
    async fn idle_until(&mut self, until: Instant) -> bool {
        loop {
            if self.leaving.is_some() && self.closing.is_empty() {
                let result = match self.old_lease.take() {
                    Some(lease) => self.revoke(lease).await,
                    None => Ok(()),
                };
                self.finish_leave(result);
                return true;
            }
            tokio::select! {
                _ = sleep_until(until) => return false,
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => {
                        self.command(cmd, None).await;
                        self.publish(None);
                    }
                    // The handle is gone: the host has dropped the fleet.
                    None => return true,
                },
            }
        }
    }

    fn finish_leave(&mut self, result: Result<(), FleetError>) {
        match &result {
            Ok(()) => tracing::info!(member = %self.me(), "fleet: left"),
            Err(e) => {
                tracing::warn!(member = %self.me(), error = %e, "fleet: left without telling etcd")
            }
        }
        for tx in self.leaving.take().unwrap_or_default() {
            let _ = tx.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(FleetError::Etcd(e.to_string())),
            });
        }
        self.publish_empty(FleetState::Left);
    }

    async fn revoke(&mut self, lease: i64) -> Result<(), FleetError> {
        let Some(client) = self.client.clone() else {
            return Err(FleetError::Etcd("never connected".into()));
        };
        let mut c = client;
        match bounded(self.request_timeout, "lease revoke", c.lease_revoke(lease)).await {
            Ok(_) => Ok(()),
            // A lease etcd no longer knows is as good as revoked.
            Err(e) if e.contains("not found") => Ok(()),
            Err(e) => Err(FleetError::Etcd(e)),
        }
    }

    async fn client(&mut self) -> Result<Client, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let t = self.request_timeout;
        let ping = self.options.lease_ttl() / 4;
        let opts = ConnectOptions::new()
            .with_connect_timeout(t)
            .with_timeout(t)
            .with_keep_alive(ping.max(Duration::from_millis(500)), t)
            .with_keep_alive_while_idle(true);
        let c = bounded(
            t,
            "connect",
            Client::connect(self.options.endpoints(), Some(opts)),
        )
        .await?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Grants a lease, puts the member key on it (only if no other lease
    /// holds it), reads the fleet and starts the watch.
    async fn join(&mut self) -> Result<Session, String> {
        if self.closing.is_empty() {
            if let Some(lease) = self.old_lease {
                self.revoke(lease).await.map_err(|e| e.to_string())?;
                self.old_lease = None;
            }
        }
        let mut c = self.client().await?;
        let t = self.request_timeout;
        let sent = Instant::now();
        let grant = bounded(
            t,
            "lease grant",
            c.lease_grant(self.options.lease_secs().into(), None),
        )
        .await?;
        let lease = grant.id();
        let ttl = Duration::from_secs(grant.ttl().max(1) as u64);
        match self.join_with(&mut c, lease, ttl, sent).await {
            Ok(s) => Ok(s),
            Err(e) => {
                // Do not leave a lease (and maybe a member key) behind.
                let _ = bounded(t, "lease revoke", c.lease_revoke(lease)).await;
                Err(e)
            }
        }
    }

    async fn join_with(
        &mut self,
        c: &mut Client,
        lease: i64,
        ttl: Duration,
        sent: Instant,
    ) -> Result<Session, String> {
        let t = self.request_timeout;
        let ka_sent = Instant::now();
        let (keeper, stream) = bounded(t, "lease keep-alive", c.lease_keep_alive(lease)).await?;
        let member_key = format!("{}{}", self.members_key(), self.me());
        let txn = Txn::new()
            .when([Compare::create_revision(
                member_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                member_key,
                self.me(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let r = bounded(t, "member key", c.txn(txn)).await?;
        if !r.succeeded() {
            return Err(format!(
                "member id {:?} is held by another lease (an earlier run of this replica, \
                 gone within one TTL, or two replicas given the same id)",
                self.me()
            ));
        }
        let mut s = Session {
            lease,
            ttl,
            deadline: sent.max(ka_sent) + ttl,
            keeper,
            keepalive: Some(stream),
            sent: VecDeque::new(),
            next_keepalive: Instant::now() + ttl / 3,
            watch: None,
            members: BTreeSet::new(),
            owners: HashMap::new(),
            held: BTreeMap::new(),
            deletes: HashMap::new(),
            retry_at: None,
        };
        self.resync(c, &mut s).await?;
        Ok(s)
    }

    /// Reads the whole prefix and watches it from the next revision.
    async fn resync(&mut self, c: &mut Client, s: &mut Session) -> Result<(), String> {
        let t = self.request_timeout;
        let root = format!("{}/", self.prefix);
        let got = bounded(
            t,
            "read fleet",
            c.get(root.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = got.header().map(|h| h.revision()).unwrap_or(0);
        s.members.clear();
        s.owners.clear();
        for kv in got.kvs() {
            self.apply_put(s, kv);
        }
        // A key we hold that is gone or recreated was lost under us.
        let lost: Vec<RegistrationKey> = s
            .held
            .iter()
            .filter(|(k, rev)| {
                s.owners.get(&k.to_string()).map(|o| &o.create_revision) != Some(rev)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in lost {
            self.lose(s, &k, "its ownership key is gone");
        }
        let watch = bounded(
            t,
            "watch fleet",
            c.watch(
                root,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .await?;
        s.watch = Some(watch);
        Ok(())
    }

    fn apply_put(&self, s: &mut Session, kv: &etcd_client::KeyValue) {
        let (key, create_revision) = (kv.key(), kv.create_revision());
        let Ok(key) = std::str::from_utf8(key) else {
            return;
        };
        if let Some(id) = key.strip_prefix(&self.members_key()) {
            s.members.insert(id.to_string());
        } else if let Some(name) = key.strip_prefix(&self.owners_key()) {
            s.owners.insert(
                name.to_string(),
                OwnerKey {
                    create_revision,
                    lease: kv.lease(),
                },
            );
        }
    }

    /// A held key vanished or changed hands under us: stop hosting it now.
    fn lose(&mut self, s: &mut Session, key: &RegistrationKey, why: &str) {
        if s.held.remove(key).is_some() {
            // Not offered again before the host has closed it; nothing of
            // ours left to delete.
            self.closing.insert(key.clone(), None);
            tracing::warn!(member = %self.me(), %key, "fleet: lost a registration: {why}");
            metrics::counter!(METRIC_FLEET_MOVES, "direction" => "released").increment(1);
        }
    }

    fn apply_watch(&mut self, s: &mut Session, resp: WatchResponse) -> Result<(), String> {
        if resp.canceled() {
            return Err(format!(
                "watch cancelled by etcd (compacted at {}): {}",
                resp.compact_revision(),
                clean(resp.cancel_reason())
            ));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => {
                    self.apply_put(s, kv);
                    if let Some(name) = self.owner_name(kv.key()) {
                        if let Some(key) = self.keys.get(&name).cloned() {
                            let ours = s.held.get(&key).copied();
                            if ours.is_some_and(|r| r != kv.create_revision()) {
                                self.lose(s, &key, "its ownership key was recreated");
                            }
                        }
                    }
                }
                EventType::Delete => {
                    let Ok(key) = std::str::from_utf8(kv.key()) else {
                        continue;
                    };
                    if let Some(id) = key.strip_prefix(&self.members_key()) {
                        s.members.remove(id);
                    } else if let Some(name) = key.strip_prefix(&self.owners_key()) {
                        s.owners.remove(name);
                        s.deletes.remove(name);
                        if let Some(k) = self.keys.get(name).cloned() {
                            if s.held.contains_key(&k) {
                                self.lose(s, &k, "its ownership key was deleted");
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn owner_name(&self, key: &[u8]) -> Option<String> {
        std::str::from_utf8(key)
            .ok()?
            .strip_prefix(&self.owners_key())
            .map(str::to_string)
    }

    /// The keys this replica should own: the list's keys whose rendezvous
    /// owner among the live members is this replica.
    fn desired(&self, s: &Session) -> BTreeSet<RegistrationKey> {
        if self.leaving.is_some() || !s.members.contains(self.me()) {
            return BTreeSet::new();
        }
        self.keys
            .values()
            .filter(|k| owner_of(k, s.members.iter().map(String::as_str)) == Some(self.me()))
            .cloned()
            .collect()
    }

    /// Moves towards the desired set: gives up what is no longer ours,
    /// creates ownership keys for what is ours and free.
    async fn reconcile(&mut self, s: &mut Session) {
        let desired = self.desired(s);
        let gone: Vec<RegistrationKey> = s
            .held
            .keys()
            .filter(|k| !desired.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(rev) = s.held.remove(&k) {
                tracing::debug!(member = %self.me(), key = %k, "fleet: handing a registration over");
                self.closing.insert(k, Some(rev));
                metrics::counter!(METRIC_FLEET_MOVES, "direction" => "released").increment(1);
            }
        }
        // Ownership keys on our lease we do not hold: a transaction that
        // timed out here but committed there. Adopt the wanted ones (the
        // key is ours until the lease ends), delete the others.
        let strays: Vec<(String, i64)> = s
            .owners
            .iter()
            .filter(|(name, o)| {
                o.lease == s.lease && self.keys.get(*name).is_none_or(|k| !s.held.contains_key(k))
            })
            .map(|(name, o)| (name.clone(), o.create_revision))
            .collect();
        for (name, rev) in strays {
            match self.keys.get(&name) {
                Some(k) if desired.contains(k) && !self.closing.contains_key(k) => {
                    s.held.insert(k.clone(), rev);
                    metrics::counter!(METRIC_FLEET_MOVES, "direction" => "acquired").increment(1);
                }
                // Being closed: deleted on release, not before.
                Some(k) if self.closing.contains_key(k) => {}
                _ => {
                    s.deletes.insert(name, rev);
                }
            }
        }
        self.flush_deletes(s).await;
        // Publish the shrunk set before any slow request.
        self.publish(Some(s));
        let free: Vec<RegistrationKey> = desired
            .into_iter()
            .filter(|k| {
                !s.held.contains_key(k)
                    && !self.closing.contains_key(k)
                    && !s.owners.contains_key(&k.to_string())
            })
            .collect();
        if !free.is_empty() && s.watch.is_some() {
            if let Err(e) = self.acquire(s, free).await {
                tracing::warn!(member = %self.me(), error = %e, "fleet: acquiring registrations failed");
                self.last_error = Some(e);
                s.retry_at = Some(Instant::now() + self.backoff.next_delay());
            }
        }
        self.publish(Some(s));
    }

    async fn acquire(&mut self, s: &mut Session, free: Vec<RegistrationKey>) -> Result<(), String> {
        let Some(client) = self.client.clone() else {
            return Err("not connected".into());
        };
        let t = self.request_timeout;
        let me = self.me().to_string();
        let owners = self.owners_key();
        let mut first_error = None;
        let mut acquired = 0u64;
        for chunk in free.chunks(ACQUIRE_CONCURRENCY) {
            let calls = chunk.iter().map(|k| {
                let mut c = client.clone();
                let okey = format!("{owners}{k}");
                let txn = Txn::new()
                    .when([Compare::create_revision(okey.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        okey.clone(),
                        me.as_str(),
                        Some(PutOptions::new().with_lease(s.lease)),
                    )])
                    .or_else([TxnOp::get(okey, None)]);
                async move { (k.clone(), bounded(t, "ownership txn", c.txn(txn)).await) }
            });
            for (k, r) in futures_util::future::join_all(calls).await {
                match r {
                    Ok(r) if r.succeeded() => {
                        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
                        s.owners.insert(
                            k.to_string(),
                            OwnerKey {
                                create_revision: rev,
                                lease: s.lease,
                            },
                        );
                        s.held.insert(k, rev);
                        acquired += 1;
                    }
                    Ok(r) => {
                        // Someone holds it: remember who, wait for the delete.
                        for op in r.op_responses() {
                            if let TxnOpResponse::Get(g) = op {
                                for kv in g.kvs() {
                                    self.apply_put(s, kv);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        if acquired > 0 {
            tracing::debug!(member = %self.me(), acquired, "fleet: registrations acquired");
            metrics::counter!(METRIC_FLEET_MOVES, "direction" => "acquired").increment(acquired);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Deletes the ownership keys queued in `s.deletes`, each only if it is
    /// still the one this replica created.
    async fn flush_deletes(&mut self, s: &mut Session) {
        if s.deletes.is_empty() {
            return;
        }
        let Some(client) = self.client.clone() else {
            return;
        };
        let t = self.request_timeout;
        let owners = self.owners_key();
        let calls = s.deletes.iter().map(|(name, rev)| {
            let mut c = client.clone();
            let okey = format!("{owners}{name}");
            let txn = Txn::new()
                .when([Compare::create_revision(
                    okey.clone(),
                    CompareOp::Equal,
                    *rev,
                )])
                .and_then([TxnOp::delete(okey, None)]);
            async move {
                (
                    name.clone(),
                    bounded(t, "delete ownership", c.txn(txn)).await,
                )
            }
        });
        let results = futures_util::future::join_all(calls).await;
        for (name, r) in results {
            match r {
                // Deleted, or no longer ours to delete: done either way.
                Ok(_) => {
                    s.deletes.remove(&name);
                }
                Err(e) => {
                    self.last_error = Some(e);
                    s.retry_at
                        .get_or_insert_with(|| Instant::now() + self.backoff.next_delay());
                }
            }
        }
    }

    /// Handles one command (and the releases queued right behind it). `s`
    /// is the live session, if any.
    async fn command(&mut self, first: Cmd, mut s: Option<&mut Session>) {
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Released(key) => {
                    // Releases come in bursts (a leave, a membership change,
                    // a host closing its share at once): take every one
                    // already queued and delete their keys in one round,
                    // rather than one etcd round trip after the other.
                    let mut keys = vec![key];
                    while let Ok(cmd) = self.cmds.try_recv() {
                        match cmd {
                            Cmd::Released(key) => keys.push(key),
                            other => {
                                next = Some(other);
                                break;
                            }
                        }
                    }
                    let mut queued = false;
                    for key in keys {
                        if let Some(rev) = self.closing.remove(&key) {
                            tracing::debug!(member = %self.me(), %key, "fleet: registration released");
                            if let (Some(rev), Some(s)) = (rev, s.as_deref_mut()) {
                                s.deletes.insert(key.to_string(), rev);
                                queued = true;
                            }
                        }
                    }
                    if let (true, Some(s)) = (queued, s.as_deref_mut()) {
                        self.flush_deletes(s).await;
                    }
                }
                Cmd::SetRegistrations(keys) => self.keys = by_name(keys),
                Cmd::Leave(tx) => {
                    let first = self.leaving.is_none();
                    self.leaving.get_or_insert_with(Vec::new).push(tx);
                    if let (true, Some(s)) = (first, s.as_deref_mut()) {
                        self.leave_members(s).await;
                    }
                }
            }
        }
    }

    /// Out of the member set first, so the others start computing their
    /// new shares while this one closes.
    async fn leave_members(&mut self, s: &Session) {
        let Some(mut c) = self.client.clone() else {
            return;
        };
        let key = format!("{}{}", self.members_key(), self.me());
        let txn = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, s.lease)])
            .and_then([TxnOp::delete(key, None)]);
        if let Err(e) = bounded(self.request_timeout, "member key", c.txn(txn)).await {
            tracing::warn!(member = %self.me(), error = %e, "fleet: could not delete the member key");
        }
    }

    async fn session(&mut self, mut s: Session) -> SessionEnd {
        let margin = s.ttl / 4;
        loop {
            self.reconcile(&mut s).await;
            if self.closing.is_empty() {
                if let Some(old) = self.old_lease {
                    if self.revoke(old).await.is_ok() {
                        self.old_lease = None;
                    }
                }
            }
            if self.leaving.is_some() && self.closing.is_empty() {
                self.flush_deletes(&mut s).await;
                let result = self.revoke(s.lease).await;
                self.finish_leave(result);
                return SessionEnd::Left;
            }
            let guard = s.deadline.checked_sub(margin).unwrap_or(s.deadline);
            let retry = s.retry_at;
            tokio::select! {
                _ = sleep_until(guard) => {
                    tracing::warn!(member = %self.me(), "fleet: lease not renewed in time; handing everything back");
                    return self.lost(s, "lease not renewed in time (etcd unreachable)");
                }
                _ = sleep_until(s.next_keepalive) => {
                    s.next_keepalive = Instant::now() + s.ttl / 3;
                    if s.keepalive.is_some() {
                        if s.keeper.keep_alive().await.is_ok() {
                            s.sent.push_back(Instant::now());
                        } else {
                            self.broken(&mut s, "keep-alive stream closed", true);
                        }
                    }
                }
                msg = next_keepalive(&mut s.keepalive) => match msg {
                    Ok(Some(r)) if r.ttl() > 0 => {
                        if let Some(sent) = s.sent.pop_front() {
                            s.deadline = s.deadline.max(sent + Duration::from_secs(r.ttl() as u64));
                        }
                    }
                    Ok(Some(_)) => {
                        tracing::warn!(member = %self.me(), "fleet: etcd says the lease expired");
                        return self.lost(s, "lease expired at etcd");
                    }
                    Ok(None) => self.broken(&mut s, "keep-alive stream ended", true),
                    Err(e) => self.broken(&mut s, &format!("keep-alive: {}", clean(&e.to_string())), true),
                },
                msg = next_watch(&mut s.watch) => match msg {
                    Ok(Some(resp)) => {
                        if let Err(e) = self.apply_watch(&mut s, resp) {
                            self.broken(&mut s, &e, false);
                        }
                    }
                    Ok(None) => self.broken(&mut s, "watch stream ended", false),
                    Err(e) => self.broken(&mut s, &format!("watch: {}", clean(&e.to_string())), false),
                },
                _ = sleep_until(retry.unwrap_or_else(far_future)), if retry.is_some() => {
                    s.retry_at = None;
                    self.repair(&mut s).await;
                }
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd, Some(&mut s)).await,
                    None => return SessionEnd::Left,
                },
            }
        }
    }

    fn broken(&mut self, s: &mut Session, why: &str, keepalive: bool) {
        tracing::warn!(member = %self.me(), "fleet: {why}; repairing");
        self.last_error = Some(why.to_string());
        if keepalive {
            s.keepalive = None;
            s.sent.clear();
        } else {
            s.watch = None;
        }
        s.retry_at
            .get_or_insert_with(|| Instant::now() + self.backoff.next_delay());
    }

    /// Reopens what is broken and retries what failed.
    async fn repair(&mut self, s: &mut Session) {
        let Some(mut c) = self.client.clone() else {
            return;
        };
        let t = self.request_timeout;
        let mut failed = None;
        if s.keepalive.is_none() {
            let sent = Instant::now();
            match bounded(t, "lease keep-alive", c.lease_keep_alive(s.lease)).await {
                Ok((keeper, stream)) => {
                    s.keeper = keeper;
                    s.keepalive = Some(stream);
                    s.deadline = s.deadline.max(sent + s.ttl);
                    s.next_keepalive = Instant::now() + s.ttl / 3;
                }
                Err(e) => failed = Some(e),
            }
        }
        if failed.is_none() && s.watch.is_none() {
            if let Err(e) = self.resync(&mut c, s).await {
                failed = Some(e);
            }
        }
        self.flush_deletes(s).await;
        match failed {
            Some(e) => {
                self.last_error = Some(e);
                s.retry_at
                    .get_or_insert_with(|| Instant::now() + self.backoff.next_delay());
            }
            None if s.retry_at.is_none() => {
                self.backoff.reset();
                self.last_error = None;
            }
            None => {}
        }
    }

    /// The lease is gone (or about to be, by our clock): everything held
    /// leaves the hosted set; the lease is revoked once all is released.
    fn lost(&mut self, mut s: Session, why: &str) -> SessionEnd {
        for (k, rev) in std::mem::take(&mut s.held) {
            self.closing.insert(k, Some(rev));
            metrics::counter!(METRIC_FLEET_MOVES, "direction" => "released").increment(1);
        }
        self.old_lease = Some(s.lease);
        self.last_error = Some(why.to_string());
        self.hosted_tx.send_replace(Assignment {
            host: BTreeSet::new(),
            release: self.closing.keys().cloned().collect(),
        });
        self.publish_empty(FleetState::Suspended);
        SessionEnd::Lost
    }

    /// Publishes `state` with no members and nothing owned (left, or the
    /// session lost), whatever was published before.
    fn publish_empty(&self, state: FleetState) {
        self.status_tx.send_replace(FleetStatus {
            state,
            members: 0,
            owned: 0,
            last_error: self.last_error.clone(),
        });
        metrics::gauge!(METRIC_FLEET_MEMBERS).set(0.0);
        metrics::gauge!(METRIC_FLEET_OWNED).set(0.0);
    }

    /// Publishes the hosted set and the status (without a session: not
    /// joined).
    fn publish(&self, s: Option<&Session>) {
        let held: BTreeSet<RegistrationKey> = s
            .map(|s| s.held.keys().cloned().collect())
            .unwrap_or_default();
        let (state, members) = match s {
            Some(s) if s.degraded() => (FleetState::Degraded, s.members.len()),
            Some(s) => (FleetState::Joined, s.members.len()),
            None if self.old_lease.is_some() || !self.closing.is_empty() => {
                (FleetState::Suspended, 0)
            }
            None => (FleetState::Connecting, 0),
        };
        let owned = held.len();
        let assignment = Assignment {
            host: held,
            release: self.closing.keys().cloned().collect(),
        };
        self.hosted_tx.send_if_modified(|cur| {
            if *cur != assignment {
                *cur = assignment;
                true
            } else {
                false
            }
        });
        let status = FleetStatus {
            state,
            members,
            owned,
            last_error: self.last_error.clone(),
        };
        self.status_tx.send_if_modified(|cur| {
            if *cur != status {
                *cur = status;
                true
            } else {
                false
            }
        });
        metrics::gauge!(METRIC_FLEET_MEMBERS).set(members as f64);
        metrics::gauge!(METRIC_FLEET_OWNED).set(owned as f64);
    }
}

/// Text from etcd (errors, cancel reasons), made safe for logs.
fn clean(text: &str) -> String {
    sanitize_text(text, MAX_PEER_TEXT_CHARS).into_owned()
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

async fn next_keepalive(
    s: &mut Option<LeaseKeepAliveStream>,
) -> Result<Option<etcd_client::LeaseKeepAliveResponse>, etcd_client::Error> {
    match s {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}

async fn next_watch(
    s: &mut Option<WatchStream>,
) -> Result<Option<WatchResponse>, etcd_client::Error> {
    match s {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}
