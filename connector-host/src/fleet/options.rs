//! [`FleetOptions`]: where etcd is, the key prefix, this replica's id and
//! its lease TTL, validated once when built.

use std::fmt;
use std::time::Duration;

use super::FleetError;

/// The lease TTL when none is given (`--fleet-lease-secs`): a replica that
/// dies is replaced after about this long.
pub const DEFAULT_LEASE_SECS: u32 = 10;
/// The longest lease accepted: longer only delays take-over.
const MAX_LEASE_SECS: u32 = 3600;
/// etcd's own key size limit is far larger; this keeps keys readable.
const MAX_MEMBER_LEN: usize = 253;
/// The port etcd clients use by default.
const DEFAULT_PORT: u16 = 2379;

/// Where the fleet is coordinated and who this replica is in it.
///
/// ```
/// use connector_host::fleet::FleetOptions;
/// let opts = FleetOptions::builder("etcd://10.0.0.5:2379/connector-host")
///     .member("connector-host-0")
///     .lease_secs(10)
///     .build()?;
/// assert_eq!(opts.prefix(), "/connector-host");
/// assert_eq!(opts.endpoints(), ["http://10.0.0.5:2379"]);
/// # Ok::<(), connector_host::fleet::FleetError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct FleetOptions {
    url: String,
    endpoints: Vec<String>,
    prefix: String,
    member: String,
    lease_secs: u32,
}

impl fmt::Debug for FleetOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("member", &self.member)
            .field("lease_secs", &self.lease_secs)
            .finish()
    }
}

impl FleetOptions {
    /// Options from `etcd://HOST[:PORT][,HOST[:PORT]…]/PREFIX` with the
    /// defaults: member id from `HOSTNAME`, else random; lease
    /// [`DEFAULT_LEASE_SECS`].
    pub fn parse(url: &str) -> Result<Self, FleetError> {
        Self::builder(url).build()
    }

    /// A builder for options on `url` (validated by
    /// [`FleetOptionsBuilder::build`]).
    pub fn builder(url: impl Into<String>) -> FleetOptionsBuilder {
        FleetOptionsBuilder {
            url: url.into(),
            member: None,
            lease_secs: DEFAULT_LEASE_SECS,
        }
    }

    /// The URL as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// etcd's client URLs (`http://HOST:PORT`).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The key prefix, with its leading `/` and without a trailing one.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// This replica's id in the fleet.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// The lease TTL.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_secs.into())
    }

    pub(crate) fn lease_secs(&self) -> u32 {
        self.lease_secs
    }
}

/// Builds [`FleetOptions`] (see [`FleetOptions::builder`]).
#[derive(Debug, Clone)]
pub struct FleetOptionsBuilder {
    url: String,
    member: Option<String>,
    lease_secs: u32,
}

impl FleetOptionsBuilder {
    /// This replica's id (`--fleet-member`): 1 to 253 characters of
    /// `A-Z a-z 0-9 . _ -`. Default: `HOSTNAME` if it is such an id, else
    /// `member-` and 16 random hex digits. Two live replicas must never share
    /// an id: the second waits until the first's key is gone.
    pub fn member(mut self, id: impl Into<String>) -> Self {
        self.member = Some(id.into());
        self
    }

    /// The lease TTL in seconds (`--fleet-lease-secs`), 1 to 3600; default
    /// [`DEFAULT_LEASE_SECS`]. etcd raises TTLs below its own minimum
    /// (1.5 × its election timeout, 2 s by default); the granted TTL is used.
    /// Keep it above the time a registration takes to close gracefully.
    pub fn lease_secs(mut self, secs: u32) -> Self {
        self.lease_secs = secs;
        self
    }

    /// Validates everything, with one clear error for the first problem.
    pub fn build(self) -> Result<FleetOptions, FleetError> {
        let (endpoints, prefix) = parse_url(&self.url)?;
        let member = match self.member {
            Some(m) => {
                validate_member(&m)?;
                m
            }
            None => default_member(),
        };
        if !(1..=MAX_LEASE_SECS).contains(&self.lease_secs) {
            return Err(FleetError::InvalidConfig(format!(
                "fleet lease of {} s: expected 1 to {MAX_LEASE_SECS} seconds",
                self.lease_secs
            )));
        }
        Ok(FleetOptions {
            url: self.url,
            endpoints,
            prefix,
            member,
            lease_secs: self.lease_secs,
        })
    }
}

fn bad_url(url: &str, why: &str) -> FleetError {
    FleetError::InvalidConfig(format!(
        "fleet URL {url:?}: {why}; expected etcd://HOST:PORT/PREFIX, e.g. etcd://127.0.0.1:2379/connector-host"
    ))
}

/// `etcd://HOST[:PORT][,HOST[:PORT]…]/PREFIX` → (endpoints, `/PREFIX`).
fn parse_url(url: &str) -> Result<(Vec<String>, String), FleetError> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| bad_url(url, "the scheme must be etcd://"))?;
    if rest.contains(['?', '#']) {
        return Err(bad_url(url, "no query or fragment is allowed"));
    }
    let (authority, path) = rest
        .split_once('/')
        .ok_or_else(|| bad_url(url, "the key prefix is missing"))?;
    if authority.contains('@') {
        return Err(bad_url(url, "credentials in the URL are not supported"));
    }
    if authority.is_empty() {
        return Err(bad_url(url, "the host is missing"));
    }
    let mut endpoints = Vec::new();
    for hostport in authority.split(',') {
        endpoints.push(parse_endpoint(url, hostport)?);
    }
    let prefix = path.trim_end_matches('/');
    if prefix.is_empty() {
        return Err(bad_url(url, "the key prefix is empty"));
    }
    if let Some(bad) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')))
    {
        return Err(bad_url(
            url,
            &format!("the key prefix contains {bad:?}; only A-Z a-z 0-9 _ - . / are allowed"),
        ));
    }
    if prefix.split('/').any(str::is_empty) {
        return Err(bad_url(url, "the key prefix has an empty segment (`//`)"));
    }
    Ok((endpoints, format!("/{prefix}")))
}

fn parse_endpoint(url: &str, hostport: &str) -> Result<String, FleetError> {
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .ok_or_else(|| bad_url(url, "an IPv6 host lacks its closing `]`"))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad_url(url, &format!("{h:?} is not an IPv6 address")));
        }
        let port = match tail {
            "" => None,
            t => Some(
                t.strip_prefix(':')
                    .ok_or_else(|| bad_url(url, "junk after an IPv6 host"))?,
            ),
        };
        (format!("[{h}]"), port)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    let host_ok = host.starts_with('[')
        || (!host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')));
    if !host_ok {
        return Err(bad_url(url, &format!("{host:?} is not a host name")));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad_url(url, &format!("port {p:?} is not 1 to 65535")))?,
    };
    Ok(format!("http://{host}:{port}"))
}

fn validate_member(id: &str) -> Result<(), FleetError> {
    if id.is_empty() || id.len() > MAX_MEMBER_LEN {
        return Err(FleetError::InvalidConfig(format!(
            "fleet member id is {} characters long; it needs 1 to {MAX_MEMBER_LEN}",
            id.len()
        )));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(FleetError::InvalidConfig(format!(
            "fleet member id {:?} contains {bad:?}; only A-Z a-z 0-9 . _ - are allowed",
            connector_core::sanitize_text(id, 64)
        )));
    }
    Ok(())
}

/// `HOSTNAME` when it is a valid id (a StatefulSet pod's name), else a
/// random one.
fn default_member() -> String {
    if let Ok(host) = std::env::var("HOSTNAME") {
        if validate_member(&host).is_ok() {
            return host;
        }
    }
    random_member()
}

fn random_member() -> String {
    use std::hash::{BuildHasher, Hasher};
    // `RandomState` is seeded from the OS per process; mixing in the time
    // and the pid keeps two hosts started together apart.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    format!("member-{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_and_prefixes() {
        let o = FleetOptions::builder("etcd://127.0.0.1:2379/a/b/")
            .member("m-1")
            .build()
            .expect("valid");
        assert_eq!(o.endpoints(), ["http://127.0.0.1:2379"]);
        assert_eq!(o.prefix(), "/a/b");
        assert_eq!(o.member(), "m-1");
        assert_eq!(o.lease_ttl(), Duration::from_secs(10));
        let o = FleetOptions::builder("etcd://etcd-0.etcd,etcd-1.etcd:2380,[::1]:2381/fleet")
            .member("m")
            .lease_secs(3)
            .build()
            .expect("valid");
        assert_eq!(
            o.endpoints(),
            [
                "http://etcd-0.etcd:2379",
                "http://etcd-1.etcd:2380",
                "http://[::1]:2381"
            ]
        );
        assert_eq!(o.lease_secs(), 3);
    }

    #[test]
    fn every_kind_of_bad_url_is_one_clear_error() {
        for (url, says) in [
            ("http://127.0.0.1:2379/p", "scheme"),
            ("etcd://127.0.0.1:2379", "prefix is missing"),
            ("etcd://127.0.0.1:2379/", "prefix is empty"),
            ("etcd:///p", "host is missing"),
            ("etcd://127.0.0.1:0/p", "port"),
            ("etcd://127.0.0.1:99999/p", "port"),
            ("etcd://127.0.0.1:x/p", "port"),
            ("etcd://u:pw@127.0.0.1:2379/p", "credentials"),
            ("etcd://127.0.0.1:2379/p?x=1", "query"),
            ("etcd://127.0.0.1:2379/a//b", "empty segment"),
            ("etcd://127.0.0.1:2379/a b", "contains ' '"),
            ("etcd://[::1/p", "closing"),
            ("etcd://[nope]:1/p", "IPv6"),
            ("etcd://ho$t:1/p", "host name"),
            ("etcd://a:1,/p", "host name"),
        ] {
            let err = FleetOptions::builder(url)
                .member("m")
                .build()
                .expect_err(url);
            assert!(err.is_config(), "{url}");
            let text = err.to_string();
            assert!(text.contains(says), "{url}: {text}");
            assert!(text.contains("etcd://HOST:PORT/PREFIX"), "{url}: {text}");
            assert_eq!(text.lines().count(), 1, "{text}");
        }
    }

    #[test]
    fn bad_members_and_leases_are_refused() {
        let url = "etcd://127.0.0.1:2379/p";
        for bad in ["", "a b", "pod/0", "x\u{1b}[31m", &"a".repeat(254)] {
            let err = FleetOptions::builder(url)
                .member(bad)
                .build()
                .expect_err(bad);
            assert!(err.to_string().contains("member id"), "{err}");
            assert!(!err.to_string().contains('\u{1b}'), "sanitized: {err}");
        }
        for secs in [0, 3601] {
            let err = FleetOptions::builder(url)
                .member("m")
                .lease_secs(secs)
                .build()
                .expect_err("bad lease");
            assert!(err.to_string().contains("lease"), "{err}");
        }
    }

    #[test]
    fn default_member_is_valid_and_random_ones_differ() {
        let a = random_member();
        let b = random_member();
        assert_ne!(a, b);
        assert!(validate_member(&a).is_ok(), "{a}");
        let o = FleetOptions::parse("etcd://127.0.0.1/p").expect("valid");
        assert!(validate_member(o.member()).is_ok());
    }
}
