//! Configuration: who a registration is ([`ConnectorConfig`],
//! [`RegistrationKey`]) and how the host reaches the server
//! ([`MultiTransportOptions`], [`Endpoint`]).
//!
//! Everything is validated once, when it is built, so a bad identifier or
//! URL is reported before any connection is made and is never silently
//! rewritten.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::ConnectorError;
use crate::proxy::{Proxy, ProxySetting};
use crate::redact::{redact_path_and_query, redact_url};
use crate::token::TokenSource;

/// The identity of one registration: `tenant.type.instance`.
///
/// Two registrations with the same key cannot be hosted by one runner: the
/// server would treat the second as a duplicate of the first.
///
/// Cloning is a reference-count increment: every execute carries the key
/// in its context.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistrationKey {
    parts: Arc<KeyParts>,
}

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct KeyParts {
    tenant_id: String,
    connector_type: String,
    instance_id: String,
}

impl RegistrationKey {
    /// A key from its three parts, each validated as the wire contract says
    /// (1 to 128 characters of `A-Z a-z 0-9 _ -`).
    pub fn new(
        tenant_id: impl Into<String>,
        connector_type: impl Into<String>,
        instance_id: impl Into<String>,
    ) -> Result<Self, ConnectorError> {
        let parts = KeyParts {
            tenant_id: tenant_id.into(),
            connector_type: connector_type.into(),
            instance_id: instance_id.into(),
        };
        validate_identifier("tenant_id", &parts.tenant_id)?;
        validate_identifier("connector_type", &parts.connector_type)?;
        validate_identifier("instance_id", &parts.instance_id)?;
        Ok(Self {
            parts: Arc::new(parts),
        })
    }

    /// The tenant.
    pub fn tenant_id(&self) -> &str {
        &self.parts.tenant_id
    }

    /// The connector type.
    pub fn connector_type(&self) -> &str {
        &self.parts.connector_type
    }

    /// The instance.
    pub fn instance_id(&self) -> &str {
        &self.parts.instance_id
    }
}

impl fmt::Display for RegistrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}",
            self.parts.tenant_id, self.parts.connector_type, self.parts.instance_id
        )
    }
}

/// Parses `tenant.type.instance`, the form [`RegistrationKey`]'s `Display`
/// writes. Identifiers cannot contain `.`, so the split is unambiguous.
impl std::str::FromStr for RegistrationKey {
    type Err = ConnectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(tenant), Some(kind), Some(instance), None) => Self::new(tenant, kind, instance),
            _ => Err(ConnectorError::InvalidConfig(format!(
                "registration key `{s}` is not `tenant.type.instance`"
            ))),
        }
    }
}

/// A key equals the `tenant.type.instance` text its `Display` writes.
impl PartialEq<str> for RegistrationKey {
    fn eq(&self, other: &str) -> bool {
        let mut parts = other.split('.');
        parts.next() == Some(self.tenant_id())
            && parts.next() == Some(self.connector_type())
            && parts.next() == Some(self.instance_id())
            && parts.next().is_none()
    }
}

impl PartialEq<&str> for RegistrationKey {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl PartialEq<String> for RegistrationKey {
    fn eq(&self, other: &String) -> bool {
        *self == **other
    }
}

impl fmt::Debug for RegistrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegistrationKey({self})")
    }
}

/// The longest identifier the wire contract allows.
pub const MAX_IDENTIFIER_LEN: usize = 128;

/// Checks one identifier against the wire contract.
pub fn validate_identifier(field: &str, value: &str) -> Result<(), ConnectorError> {
    if value.is_empty() {
        return Err(ConnectorError::InvalidConfig(format!(
            "{field} is empty; it needs 1 to {MAX_IDENTIFIER_LEN} characters of A-Z a-z 0-9 _ -"
        )));
    }
    if value.len() > MAX_IDENTIFIER_LEN {
        return Err(ConnectorError::InvalidConfig(format!(
            "{field} is {} characters long; the limit is {MAX_IDENTIFIER_LEN}",
            value.len()
        )));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(ConnectorError::InvalidConfig(format!(
            "{field} {value:?} contains {bad:?}; only A-Z a-z 0-9 _ - are allowed"
        )));
    }
    Ok(())
}

/// A secret string (auth or session token): never printed by `Debug` or
/// `Display`, so it cannot leak into a log line by accident.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("<empty>")
        } else {
            f.write_str("<redacted>")
        }
    }
}

/// Who one registration is and how it presents itself to the server.
///
/// Build it with [`ConnectorConfig::builder`]; `build` validates the
/// identifiers. `Debug` never shows the auth token.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConnectorConfig {
    /// `tenant.type.instance`.
    pub key: RegistrationKey,
    /// Bearer credential for a first registration (may be empty). Unused
    /// when [`ConnectorConfig::token_source`] is set.
    pub auth_token: Secret,
    /// Where the auth token comes from when it can change: asked before
    /// every `register` (see [`TokenSource`]). `None`: `auth_token` is sent.
    pub token_source: Option<Arc<dyn TokenSource>>,
    /// Human name shown by the control plane.
    pub display_name: String,
    /// Routing tags.
    pub tags: Vec<String>,
    /// Free metadata.
    pub metadata: BTreeMap<String, String>,
    /// Executes run at once; `None` takes
    /// [`MultiTransportOptions::max_concurrent_requests`].
    pub max_concurrent_requests: Option<u32>,
}

impl ConnectorConfig {
    /// A builder for the registration `tenant.type.instance`.
    pub fn builder(
        tenant_id: impl Into<String>,
        connector_type: impl Into<String>,
        instance_id: impl Into<String>,
    ) -> ConnectorConfigBuilder {
        ConnectorConfigBuilder {
            tenant_id: tenant_id.into(),
            connector_type: connector_type.into(),
            instance_id: instance_id.into(),
            auth_token: Secret::default(),
            token_source: None,
            display_name: None,
            tags: Vec::new(),
            metadata: BTreeMap::new(),
            max_concurrent_requests: None,
        }
    }

    /// The registration's key.
    pub fn key(&self) -> &RegistrationKey {
        &self.key
    }

    /// A config from the process environment:
    ///
    /// | variable | meaning |
    /// |---|---|
    /// | `CONNECTOR_TENANT_ID` | tenant (required) |
    /// | `CONNECTOR_TYPE` | connector type (required) |
    /// | `CONNECTOR_INSTANCE_ID` | instance (required) |
    /// | `CONNECTOR_AUTH_TOKEN` | bearer credential |
    /// | `CONNECTOR_DISPLAY_NAME` | human name |
    /// | `CONNECTOR_TAGS` | comma-separated tags |
    /// | `CONNECTOR_MAX_CONCURRENT_REQUESTS` | executes at once |
    ///
    /// A missing required variable or a bad value is an `InvalidConfig`
    /// error that names the variable.
    pub fn from_env() -> Result<Self, ConnectorError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`ConnectorConfig::from_env`], reading variables through `lookup`
    /// (for tests, or a source other than the process environment).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConnectorError> {
        let required = |name: &str| {
            lookup(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                ConnectorError::InvalidConfig(format!("environment variable {name} is not set"))
            })
        };
        let mut b = ConnectorConfig::builder(
            required("CONNECTOR_TENANT_ID")?,
            required("CONNECTOR_TYPE")?,
            required("CONNECTOR_INSTANCE_ID")?,
        );
        if let Some(t) = lookup("CONNECTOR_AUTH_TOKEN") {
            b = b.auth_token(t);
        }
        if let Some(n) = lookup("CONNECTOR_DISPLAY_NAME").filter(|v| !v.is_empty()) {
            b = b.display_name(n);
        }
        if let Some(tags) = lookup("CONNECTOR_TAGS") {
            for tag in tags.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                b = b.tag(tag);
            }
        }
        if let Some(n) = lookup("CONNECTOR_MAX_CONCURRENT_REQUESTS") {
            let n = n.trim().parse::<u32>().map_err(|_| {
                ConnectorError::InvalidConfig(format!(
                    "CONNECTOR_MAX_CONCURRENT_REQUESTS={n:?} is not a whole number"
                ))
            })?;
            b = b.max_concurrent_requests(n);
        }
        b.build()
    }
}

/// Builds a [`ConnectorConfig`].
#[derive(Debug)]
pub struct ConnectorConfigBuilder {
    tenant_id: String,
    connector_type: String,
    instance_id: String,
    auth_token: Secret,
    token_source: Option<Arc<dyn TokenSource>>,
    display_name: Option<String>,
    tags: Vec<String>,
    metadata: BTreeMap<String, String>,
    max_concurrent_requests: Option<u32>,
}

impl ConnectorConfigBuilder {
    /// Bearer credential sent in `register`, fixed for the registration's
    /// life. For one that rotates, use
    /// [`ConnectorConfigBuilder::token_source`] instead (not both).
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Secret::new(token);
        self
    }

    /// The auth token comes from `source`, asked before every `register`
    /// ([`crate::FileToken`], [`crate::EnvToken`], or your own). One
    /// source may serve many registrations.
    pub fn token_source(mut self, source: Arc<dyn TokenSource>) -> Self {
        self.token_source = Some(source);
        self
    }

    /// Human name (default: the key).
    pub fn display_name(mut self, name: impl Into<String>) -> Self {
        self.display_name = Some(name.into());
        self
    }

    /// Adds a routing tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Executes this registration runs at once (at least 1).
    pub fn max_concurrent_requests(mut self, n: u32) -> Self {
        self.max_concurrent_requests = Some(n);
        self
    }

    /// Validates and builds.
    pub fn build(self) -> Result<ConnectorConfig, ConnectorError> {
        let key = RegistrationKey::new(self.tenant_id, self.connector_type, self.instance_id)?;
        if self.max_concurrent_requests == Some(0) {
            return Err(ConnectorError::InvalidConfig(format!(
                "{key}: max_concurrent_requests must be at least 1"
            )));
        }
        if self.token_source.is_some() && !self.auth_token.is_empty() {
            return Err(ConnectorError::InvalidConfig(format!(
                "{key}: set auth_token or token_source, not both"
            )));
        }
        Ok(ConnectorConfig {
            display_name: self.display_name.unwrap_or_else(|| key.to_string()),
            key,
            auth_token: self.auth_token,
            token_source: self.token_source,
            tags: self.tags,
            metadata: self.metadata,
            max_concurrent_requests: self.max_concurrent_requests,
        })
    }
}

/// Which wire binding a URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportKind {
    /// gRPC over HTTP/2 (`grpc://`, `grpcs://`).
    Grpc,
    /// WebSocket (`ws://`, `wss://`).
    WebSocket,
}

/// A parsed and validated server URL.
///
/// `Debug` and `Display` redact the query and fragment values of the path
/// (`?token=<redacted>`): a server URL may carry a credential there. The
/// `path` field itself is kept whole, for the request.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Endpoint {
    /// The binding.
    pub kind: TransportKind,
    /// TLS on (`grpcs`, `wss`).
    pub tls: bool,
    /// Host name or IP literal (without brackets), also the TLS server name.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query (WebSocket only; `/v1/connect` when the URL has no
    /// path). Printing it would print any token in the query: print the
    /// `Endpoint` instead.
    pub path: String,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("kind", &self.kind)
            .field("tls", &self.tls)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("path", &redact_path_and_query(&self.path))
            .finish()
    }
}

impl Endpoint {
    /// Parses `grpc://host:port`, `grpcs://…`, `ws://host:port[/path][?query]`,
    /// `wss://…`. Errors quote the URL with its user info and query values
    /// redacted.
    pub fn parse(url: &str) -> Result<Self, ConnectorError> {
        let bad =
            |why: &str| ConnectorError::InvalidConfig(format!("url {:?}: {why}", redact_url(url)));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://host:port (grpc, grpcs, ws or wss)"))?;
        let (kind, tls) = match scheme.to_ascii_lowercase().as_str() {
            "grpc" => (TransportKind::Grpc, false),
            "grpcs" => (TransportKind::Grpc, true),
            "ws" => (TransportKind::WebSocket, false),
            "wss" => (TransportKind::WebSocket, true),
            other => {
                return Err(bad(&format!(
                    "unknown scheme {other:?}; use grpc, grpcs, ws or wss"
                )))
            }
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        // `path` may still hold a query: split it off so `/v1/connect` can be
        // put in front of a query-only URL (`ws://h:1?token=…`).
        let (path, query) = match path.find(['?', '#']) {
            Some(i) => (&path[..i], &path[i..]),
            None => (path, ""),
        };
        if authority.contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        let (host, port) = parse_host_port(authority).map_err(|why| bad(&why))?;
        let port = port.unwrap_or(if tls { 443 } else { 80 });
        let path = match kind {
            TransportKind::Grpc => {
                if !path.is_empty() && path != "/" || !query.is_empty() {
                    return Err(bad("a gRPC URL takes no path or query"));
                }
                String::new()
            }
            TransportKind::WebSocket => {
                if path.is_empty() || path == "/" {
                    format!("{}{query}", connector_proto::WS_PATH)
                } else {
                    format!("{path}{query}")
                }
            }
        };
        Ok(Self {
            kind,
            tls,
            host: host.to_string(),
            port,
            path,
        })
    }

    /// `host:port`, with brackets around an IPv6 literal.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl Endpoint {
    fn scheme(&self) -> &'static str {
        match (self.kind, self.tls) {
            (TransportKind::Grpc, false) => "grpc",
            (TransportKind::Grpc, true) => "grpcs",
            (TransportKind::WebSocket, false) => "ws",
            (TransportKind::WebSocket, true) => "wss",
        }
    }

    /// The whole URL, query values included: only for the request itself
    /// (and to rebuild options), never for a log.
    pub fn full_url(&self) -> String {
        format!("{}://{}{}", self.scheme(), self.authority(), self.path)
    }
}

/// `scheme://host:port/path`, with query values redacted.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme(),
            self.authority(),
            redact_path_and_query(&self.path)
        )
    }
}

/// Splits `host[:port]` (`[v6]:port` too) and validates both parts: the host
/// is not empty and the port, when given, is in 1..=65535.
pub(crate) fn parse_host_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let (h, p) = after
            .split_once(']')
            .ok_or_else(|| "unterminated IPv6 literal".to_string())?;
        (h, p.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    if !authority.starts_with('[') && host.contains(':') {
        return Err("too many ':'; an IPv6 address needs brackets ([::1]:port)".into());
    }
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {p:?} is not in 1..=65535"))?,
        ),
        None => None,
    };
    Ok((host, port))
}

/// TLS material beyond the system roots. Which CAs are trusted is one rule
/// for both transports: see [`trust_anchors`](crate::trust_anchors).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsOptions {
    /// Extra trusted CA certificates (PEM file).
    pub ca_cert: Option<PathBuf>,
    /// Trust only `ca_cert`, not the system roots (a private control plane
    /// whose hosts must not accept any publicly trusted certificate).
    pub trust_only_ca: bool,
    /// Client certificate chain (PEM) for mutual TLS, with `client_key`.
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS, with `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// Budgets for what a server can make one registration hold, in entries and
/// in bytes. A server is input: whatever it sends, a registration's memory
/// stays within these (h2 bounds its send buffer and pending resets the
/// same way).
///
/// | budget | default | when it is reached |
/// |---|---|---|
/// | [`outbox_messages`](Self::outbox_messages) | 16 384 | the server is not reading: the stream is dropped (`OutboundStalled`), answers move to the answered log |
/// | [`outbox_bytes`](Self::outbox_bytes) | 32 MiB | as above |
/// | [`queued_requests`](Self::queued_requests) | 10 000 | further requests are answered `OVERLOADED` |
/// | [`queued_bytes`](Self::queued_bytes) | 64 MiB | as above |
/// | [`answered_entries`](Self::answered_entries) | 1 024 | the oldest kept answer is forgotten (counted) |
/// | [`answered_bytes`](Self::answered_bytes) | 16 MiB | as above |
/// | [`max_request_id_len`](Self::max_request_id_len) | 1 024 bytes | the request gets a `BAD_PAYLOAD` answer and is never stored |
///
/// The answered log holds answers waiting for a stream *and* answers sent
/// but not yet confirmed by a heartbeat ack (kept to replay, never to run a
/// handler twice). A server that never acks heartbeats therefore fills the
/// log: past its budget the oldest answers are forgotten. An answer
/// forgotten while waiting is lost (`responses_expired`); one forgotten
/// while unconfirmed was sent, but if the server asks for it again the
/// handler runs again: counted in `replay_forgotten` as a lost
/// exactly-once guarantee.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Messages queued for one stream before it counts as not read.
    pub outbox_messages: usize,
    /// Encoded bytes queued for one stream before it counts as not read.
    pub outbox_bytes: usize,
    /// Requests waiting for a slot.
    pub queued_requests: usize,
    /// Bytes of requests waiting for a slot (id, capability, payload,
    /// context).
    pub queued_bytes: usize,
    /// Answers kept (waiting for a stream, or sent and unconfirmed);
    /// 0 turns redelivery and replay off.
    pub answered_entries: usize,
    /// Bytes of kept answers (id, payload, error text).
    pub answered_bytes: usize,
    /// Longest `request_id` accepted, in bytes. A longer one is answered
    /// `BAD_PAYLOAD` with the id as received (so the server can match it;
    /// it fits since the request itself fit the message limit) and is
    /// never stored: not in the in-flight table, not in the answered log.
    pub max_request_id_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            outbox_messages: 16_384,
            outbox_bytes: 32 << 20,
            queued_requests: 10_000,
            queued_bytes: 64 << 20,
            answered_entries: 1024,
            answered_bytes: 16 << 20,
            max_request_id_len: 1024,
        }
    }
}

macro_rules! limit_setter {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub fn $name(mut self, value: usize) -> Self {
            self.$name = value;
            self
        }
    };
}

impl Limits {
    limit_setter!(
        /// Sets [`Limits::outbox_messages`] (default 16 384).
        outbox_messages
    );
    limit_setter!(
        /// Sets [`Limits::outbox_bytes`] (default 32 MiB).
        outbox_bytes
    );
    limit_setter!(
        /// Sets [`Limits::queued_requests`] (default 10 000).
        queued_requests
    );
    limit_setter!(
        /// Sets [`Limits::queued_bytes`] (default 64 MiB).
        queued_bytes
    );
    limit_setter!(
        /// Sets [`Limits::answered_entries`] (default 1 024; 0: no replay).
        answered_entries
    );
    limit_setter!(
        /// Sets [`Limits::answered_bytes`] (default 16 MiB).
        answered_bytes
    );
    limit_setter!(
        /// Sets [`Limits::max_request_id_len`] (default 1 024 bytes).
        max_request_id_len
    );

    fn validate(&self) -> Result<(), ConnectorError> {
        let invalid = |m: &str| Err(ConnectorError::InvalidConfig(m.into()));
        if self.outbox_messages == 0 || self.outbox_bytes < 1024 {
            return invalid("limits: the outbox needs at least 1 message and 1024 bytes");
        }
        if self.queued_bytes < 1024 {
            return invalid("limits: queued_bytes must be at least 1024");
        }
        if self.answered_bytes < 1024 {
            return invalid("limits: answered_bytes must be at least 1024");
        }
        if self.max_request_id_len == 0 {
            return invalid("limits: max_request_id_len must be at least 1");
        }
        Ok(())
    }
}

/// How a host reaches its server and how every registration behaves on the
/// wire. One value serves all registrations of a runner.
///
/// Defaults (see [`MultiTransportOptions::builder`]): 80 streams per gRPC
/// channel, 10 s connect timeout, reconnect on with a 500 ms base, a 60 s
/// cap and 500 ms of jitter, reconnects paced at 2 000/s after a burst of
/// 200 across the runner, 100 concurrent requests per registration,
/// heartbeats every 30 s with a 45 s watchdog.
///
/// `Debug` never prints a credential: the endpoint's query values and the
/// proxy's user info are redacted.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MultiTransportOptions {
    /// The server.
    pub endpoint: Endpoint,
    /// TLS material (used with `grpcs`/`wss`).
    pub tls: TlsOptions,
    /// gRPC: streams one HTTP/2 connection carries before another is dialled.
    pub max_streams_per_channel: usize,
    /// Dial + TLS + first response deadline.
    pub connect_timeout: Duration,
    /// Reconnect a registration whose stream ends.
    pub reconnect: bool,
    /// Backoff base.
    pub reconnect_delay: Duration,
    /// Backoff cap: no wait is ever longer, jitter included.
    pub max_backoff: Duration,
    /// Random extra delay added to each backoff (then clamped to the cap).
    pub jitter: Duration,
    /// How long a stream must stay Active before the backoff resets.
    pub backoff_reset_after: Duration,
    /// Reconnects per second the whole runner may start once
    /// [`reconnect_burst`](Self::reconnect_burst) is spent (0: no limit).
    /// Spreads a mass reconnect (server restart) over several seconds; a
    /// registration's first connect is never paced.
    pub reconnect_rate: u32,
    /// Reconnects that may start at once before the rate applies.
    pub reconnect_burst: u32,
    /// Executes a registration runs at once, unless its config says otherwise.
    pub max_concurrent_requests: u32,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// Watchdog: a stream with no server message for this long is dead.
    pub heartbeat_timeout: Duration,
    /// Graceful shutdown and `drain`: how long in-flight requests may take
    /// before they are answered `CANCELLED`.
    pub drain_timeout: Duration,
    /// Period of `metrics_report` messages (`None`: never sent).
    pub metrics_report_interval: Option<Duration>,
    /// Largest message accepted or sent, in bytes.
    pub max_message_size: usize,
    /// Responses finished while their stream was down are kept this long for
    /// delivery on the next stream.
    pub redelivery_ttl: Duration,
    /// Byte and entry budgets for everything a server can make a
    /// registration hold (see [`Limits`] for each one and its default).
    pub limits: Limits,
    /// Seed for the backoff jitter (`None`: seeded from the clock and key).
    pub jitter_seed: Option<u64>,
    /// HTTP CONNECT proxy (default: from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`).
    pub proxy: ProxySetting,
}

/// A `$target` struct literal with the `$extra` fields and every field
/// [`MultiTransportOptions`] and its builder share, moved out of `$src`:
/// one list for [`MultiTransportOptions::to_builder`] and
/// [`MultiTransportOptionsBuilder::build`], so that neither can forget an
/// option.
macro_rules! with_shared_fields {
    ($target:ident { $($extra:ident: $value:expr),* $(,)? } from $src:ident) => {
        $target {
            $($extra: $value,)*
            tls: $src.tls,
            max_streams_per_channel: $src.max_streams_per_channel,
            connect_timeout: $src.connect_timeout,
            reconnect: $src.reconnect,
            reconnect_delay: $src.reconnect_delay,
            max_backoff: $src.max_backoff,
            jitter: $src.jitter,
            backoff_reset_after: $src.backoff_reset_after,
            reconnect_rate: $src.reconnect_rate,
            reconnect_burst: $src.reconnect_burst,
            max_concurrent_requests: $src.max_concurrent_requests,
            heartbeat_interval: $src.heartbeat_interval,
            heartbeat_timeout: $src.heartbeat_timeout,
            drain_timeout: $src.drain_timeout,
            metrics_report_interval: $src.metrics_report_interval,
            max_message_size: $src.max_message_size,
            redelivery_ttl: $src.redelivery_ttl,
            limits: $src.limits,
            jitter_seed: $src.jitter_seed,
            proxy: $src.proxy,
        }
    };
}

impl MultiTransportOptions {
    /// A builder for `url` with every default.
    pub fn builder(url: impl Into<String>) -> MultiTransportOptionsBuilder {
        MultiTransportOptionsBuilder {
            url: ServerUrl(url.into()),
            use_tls: None,
            tls: TlsOptions::default(),
            max_streams_per_channel: 80,
            connect_timeout: Duration::from_secs(10),
            reconnect: true,
            reconnect_delay: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            jitter: Duration::from_millis(500),
            backoff_reset_after: Duration::from_secs(10),
            reconnect_rate: 2_000,
            reconnect_burst: 200,
            max_concurrent_requests: 100,
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(45),
            drain_timeout: Duration::from_secs(30),
            metrics_report_interval: Some(Duration::from_secs(30)),
            max_message_size: 4 * 1024 * 1024,
            redelivery_ttl: Duration::from_secs(300),
            limits: Limits::default(),
            jitter_seed: None,
            proxy: ProxySetting::FromEnv,
        }
    }

    /// The proxy the transport should tunnel through, if any.
    pub fn resolve_proxy(&self) -> Result<Option<Proxy>, ConnectorError> {
        Proxy::for_endpoint(&self.endpoint, &self.proxy)
    }

    /// Turns these options back into a builder, to change a few fields.
    pub fn to_builder(&self) -> MultiTransportOptionsBuilder {
        let src = self.clone();
        with_shared_fields!(MultiTransportOptionsBuilder {
            url: ServerUrl(self.endpoint.full_url()),
            use_tls: Some(self.endpoint.tls),
        } from src)
    }
}

/// The URL a builder was given, printed redacted by `Debug`.
#[derive(Clone)]
struct ServerUrl(String);

impl fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact_url(&self.0), f)
    }
}

/// Builds [`MultiTransportOptions`]; `build` validates. `Debug` never
/// prints a credential (URL query values, proxy user info).
#[derive(Debug, Clone)]
pub struct MultiTransportOptionsBuilder {
    url: ServerUrl,
    use_tls: Option<bool>,
    tls: TlsOptions,
    max_streams_per_channel: usize,
    connect_timeout: Duration,
    reconnect: bool,
    reconnect_delay: Duration,
    max_backoff: Duration,
    jitter: Duration,
    backoff_reset_after: Duration,
    reconnect_rate: u32,
    reconnect_burst: u32,
    max_concurrent_requests: u32,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    drain_timeout: Duration,
    metrics_report_interval: Option<Duration>,
    max_message_size: usize,
    redelivery_ttl: Duration,
    limits: Limits,
    jitter_seed: Option<u64>,
    proxy: ProxySetting,
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
    };
}

impl MultiTransportOptionsBuilder {
    /// Forces TLS on or off whatever the scheme says (`grpc` + `true` is
    /// `grpcs`).
    pub fn use_tls(mut self, on: bool) -> Self {
        self.use_tls = Some(on);
        self
    }

    /// Extra trusted CA certificates (PEM file) for `grpcs`/`wss`.
    pub fn ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca_cert = Some(path.into());
        self
    }

    /// Trust only the CA certificates of this PEM file for `grpcs`/`wss`:
    /// the system roots are not read.
    pub fn trust_only_ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca_cert = Some(path.into());
        self.tls.trust_only_ca = true;
        self
    }

    /// Client certificate and key (PEM files) for mutual TLS.
    pub fn client_identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls.client_cert = Some(cert.into());
        self.tls.client_key = Some(key.into());
        self
    }

    setter!(
        /// gRPC streams per HTTP/2 connection (default 80).
        max_streams_per_channel: usize
    );
    setter!(
        /// Dial + TLS + first response deadline (default 10 s).
        connect_timeout: Duration
    );
    setter!(
        /// Reconnect ended streams (default on).
        reconnect: bool
    );
    setter!(
        /// Backoff base (default 500 ms).
        reconnect_delay: Duration
    );
    setter!(
        /// Backoff cap, jitter included (default 60 s).
        max_backoff: Duration
    );
    setter!(
        /// Random extra backoff (default 500 ms).
        jitter: Duration
    );
    setter!(
        /// Healthy time before the backoff resets (default 10 s).
        backoff_reset_after: Duration
    );
    setter!(
        /// Reconnects per second across the runner once the burst is spent
        /// (default 2 000; 0 turns pacing off).
        reconnect_rate: u32
    );
    setter!(
        /// Reconnects that may start at once (default 200).
        reconnect_burst: u32
    );
    setter!(
        /// Concurrent executes per registration (default 100).
        max_concurrent_requests: u32
    );
    /// Executes waiting for a slot per registration (default 10 000):
    /// shorthand for [`Limits::queued_requests`].
    pub fn max_queued_requests(mut self, value: usize) -> Self {
        self.limits.queued_requests = value;
        self
    }
    setter!(
        /// Heartbeat period (default 30 s).
        heartbeat_interval: Duration
    );
    setter!(
        /// Watchdog timeout (default 45 s).
        heartbeat_timeout: Duration
    );
    setter!(
        /// Drain and graceful-shutdown bound (default 30 s).
        drain_timeout: Duration
    );
    setter!(
        /// `metrics_report` period (default 30 s; `None` turns it off).
        metrics_report_interval: Option<Duration>
    );
    setter!(
        /// Largest message in bytes (default 4 MiB).
        max_message_size: usize
    );
    setter!(
        /// How long an undelivered response is kept (default 5 min).
        redelivery_ttl: Duration
    );
    /// How many answers are kept for redelivery and replay (default 1024):
    /// shorthand for [`Limits::answered_entries`].
    pub fn redelivery_capacity(mut self, value: usize) -> Self {
        self.limits.answered_entries = value;
        self
    }
    setter!(
        /// Byte and entry budgets (default [`Limits::default`]).
        limits: Limits
    );
    setter!(
        /// Seed for the jitter (tests); default: from the clock.
        jitter_seed: Option<u64>
    );
    setter!(
        /// HTTP CONNECT proxy (default: from the environment).
        proxy: ProxySetting
    );

    /// Validates and builds. Warns (tracing) when the watchdog timeout is
    /// shorter than the heartbeat interval: such a watchdog can fire between
    /// two healthy heartbeats.
    pub fn build(self) -> Result<MultiTransportOptions, ConnectorError> {
        let mut endpoint = Endpoint::parse(&self.url.0)?;
        if let Some(tls) = self.use_tls {
            endpoint.tls = tls;
        }
        let invalid = |m: String| Err(ConnectorError::InvalidConfig(m));
        if self.max_streams_per_channel == 0 {
            return invalid("max_streams_per_channel must be at least 1".into());
        }
        if self.max_concurrent_requests == 0 {
            return invalid("max_concurrent_requests must be at least 1".into());
        }
        if self.heartbeat_interval.is_zero() {
            return invalid("heartbeat_interval must be more than 0".into());
        }
        if self.heartbeat_timeout.is_zero() {
            return invalid("heartbeat_timeout must be more than 0".into());
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout must be more than 0".into());
        }
        if self.max_backoff < self.reconnect_delay {
            return invalid(format!(
                "max_backoff ({:?}) is below reconnect_delay ({:?})",
                self.max_backoff, self.reconnect_delay
            ));
        }
        if self.max_message_size < 1024 {
            return invalid("max_message_size must be at least 1024 bytes".into());
        }
        self.limits.validate()?;
        if let ProxySetting::Url(url) = &self.proxy {
            Proxy::parse(url)?;
        }
        if self.tls.trust_only_ca && self.tls.ca_cert.is_none() {
            return invalid("trust_only_ca needs a ca_cert to trust".into());
        }
        if self.tls.client_cert.is_some() != self.tls.client_key.is_some() {
            return invalid("client_cert and client_key go together".into());
        }
        if self.heartbeat_timeout < self.heartbeat_interval {
            tracing::warn!(
                heartbeat_interval_ms = self.heartbeat_interval.as_millis() as u64,
                heartbeat_timeout_ms = self.heartbeat_timeout.as_millis() as u64,
                "heartbeat timeout is shorter than the interval; the watchdog may fire between healthy heartbeats"
            );
        }
        let src = self;
        Ok(with_shared_fields!(MultiTransportOptions { endpoint: endpoint } from src))
    }
}

/// An environment of `vars` only, for the tests of what reads one through
/// a lookup function (`from_lookup`, proxy resolution).
#[cfg(test)]
pub(crate) fn fake_env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::fake_env as env;
    use super::*;

    #[test]
    fn a_key_parses_from_and_equals_its_display_form() {
        let k: RegistrationKey = "acme.echo.i-0".parse().expect("parses");
        assert_eq!(
            k,
            RegistrationKey::new("acme", "echo", "i-0").expect("valid")
        );
        assert_eq!(
            k.to_string()
                .parse::<RegistrationKey>()
                .expect("round trip"),
            k
        );
        let text = String::from("acme.echo.i-0");
        assert!(k == "acme.echo.i-0" && k == text);
        for other in [
            "acme.echo.i-1",
            "acme.echo",
            "acme.echo.i-0.x",
            "acme.echo.i-0.",
            "",
        ] {
            assert!(k != other, "{other}");
        }
        for bad in ["acme.echo", "a.b.c.d", "acme..i0", "acme.echo.i 0", ""] {
            assert!(bad.parse::<RegistrationKey>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn from_env_reads_every_variable() {
        let c = ConnectorConfig::from_lookup(env(&[
            ("CONNECTOR_TENANT_ID", "acme"),
            ("CONNECTOR_TYPE", "jira"),
            ("CONNECTOR_INSTANCE_ID", "i1"),
            ("CONNECTOR_AUTH_TOKEN", "tok"),
            ("CONNECTOR_TAGS", "a, b,,c"),
            ("CONNECTOR_MAX_CONCURRENT_REQUESTS", "7"),
        ]))
        .expect("valid");
        assert_eq!(c.key.to_string(), "acme.jira.i1");
        assert_eq!(c.auth_token.expose(), "tok");
        assert_eq!(c.tags, vec!["a", "b", "c"]);
        assert_eq!(c.max_concurrent_requests, Some(7));
    }

    #[test]
    fn from_env_names_what_is_wrong() {
        let err = ConnectorConfig::from_lookup(env(&[("CONNECTOR_TENANT_ID", "acme")]))
            .expect_err("missing");
        assert!(err.to_string().contains("CONNECTOR_TYPE"), "{err}");
        let err = ConnectorConfig::from_lookup(env(&[
            ("CONNECTOR_TENANT_ID", "acme"),
            ("CONNECTOR_TYPE", "jira"),
            ("CONNECTOR_INSTANCE_ID", "i1"),
            ("CONNECTOR_MAX_CONCURRENT_REQUESTS", "lots"),
        ]))
        .expect_err("bad number");
        assert!(
            err.to_string()
                .contains("CONNECTOR_MAX_CONCURRENT_REQUESTS"),
            "{err}"
        );
        let err = ConnectorConfig::from_lookup(env(&[
            ("CONNECTOR_TENANT_ID", "ac me"),
            ("CONNECTOR_TYPE", "jira"),
            ("CONNECTOR_INSTANCE_ID", "i1"),
        ]))
        .expect_err("bad identifier");
        assert!(err.is_config());
    }

    #[test]
    fn to_builder_then_build_keeps_every_option() {
        let o = MultiTransportOptions::builder("wss://h:9/x?token=t")
            .use_tls(false)
            .ca_cert("/ca.pem")
            .client_identity("/c.pem", "/k.pem")
            .max_streams_per_channel(3)
            .connect_timeout(Duration::from_secs(2))
            .reconnect(false)
            .reconnect_delay(Duration::from_millis(7))
            .max_backoff(Duration::from_secs(9))
            .jitter(Duration::from_millis(11))
            .backoff_reset_after(Duration::from_secs(13))
            .reconnect_rate(17)
            .reconnect_burst(19)
            .max_concurrent_requests(23)
            .heartbeat_interval(Duration::from_secs(29))
            .heartbeat_timeout(Duration::from_secs(31))
            .drain_timeout(Duration::from_secs(37))
            .metrics_report_interval(None)
            .max_message_size(4096)
            .redelivery_ttl(Duration::from_secs(41))
            .limits(Limits::default().outbox_messages(43))
            .jitter_seed(Some(47))
            .proxy(ProxySetting::Disabled)
            .build()
            .expect("valid");
        let again = o.to_builder().build().expect("still valid");
        // `Debug` prints every field (credentials redacted, none here).
        assert_eq!(format!("{again:?}"), format!("{o:?}"));
        assert_eq!(again.endpoint.full_url(), "ws://h:9/x?token=t");
    }

    #[test]
    fn endpoint_parsing_keeps_what_it_is_given() {
        let e = Endpoint::parse("wss://[::1]:8443/custom").expect("valid");
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str(), e.tls),
            ("::1", 8443, "/custom", true)
        );
        assert_eq!(e.to_string(), "wss://[::1]:8443/custom");
        let g = Endpoint::parse("grpc://localhost:50051").expect("valid");
        assert_eq!(g.kind, TransportKind::Grpc);
        assert_eq!(g.authority(), "localhost:50051");
    }
}
