//! `--config PATH`: the TOML file of `connector-host-config.md`: top-level
//! settings (the flags of the same name), `[defaults]`, and
//! `[[registration]]` tables that expand to [`RegistrationSpec`]s.
//!
//! Parsing is `toml` + `serde` with `deny_unknown_fields`; every error is one
//! line naming the key, its line or the registration ([`ConfigError`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use connector_core::{
    validate_identifier, ConnectorConfig, ConnectorConfigBuilder, ConnectorError, EnvToken,
    FileToken, RegistrationKey,
};
use serde::Deserialize;

/// A config file that cannot be used: one line, naming the file and the key,
/// line or registration at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError(pub(crate) String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The top level: the same settings as the flags of the same name. Each is
/// used only where the flag (or its variable) was not given.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TopLevel {
    pub(crate) url: Option<String>,
    pub(crate) ca_cert: Option<PathBuf>,
    pub(crate) proxy: Option<String>,
    pub(crate) max_streams_per_channel: Option<usize>,
    pub(crate) max_concurrent_requests: Option<u32>,
    pub(crate) metrics_addr: Option<String>,
    pub(crate) heartbeat_interval_ms: Option<u64>,
    pub(crate) heartbeat_timeout_ms: Option<u64>,
    pub(crate) reconnect_delay_ms: Option<u64>,
    pub(crate) max_backoff_ms: Option<u64>,
    pub(crate) jitter_ms: Option<u64>,
    pub(crate) no_reconnect: Option<bool>,
    pub(crate) log: Option<String>,
    pub(crate) shard: Option<String>,
    pub(crate) shards: Option<u32>,
    pub(crate) fallback_url: Option<String>,
    pub(crate) fleet: Option<String>,
    pub(crate) fleet_member: Option<String>,
    pub(crate) fleet_lease_secs: Option<u64>,
    pub(crate) otlp_endpoint: Option<String>,
}

/// Declares a table type with the keys `[defaults]` and a
/// `[[registration]]` share, then its own. One list for both: serde's
/// `flatten` does not combine with `deny_unknown_fields`, which names an
/// unknown key with its line.
macro_rules! table_with_shared_keys {
    ($(#[$doc:meta])* struct $name:ident { $($own:ident: $ty:ty,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            tenant: Option<String>,
            connector_type: Option<String>,
            auth_token: Option<String>,
            auth_token_env: Option<String>,
            auth_token_file: Option<PathBuf>,
            display_name: Option<String>,
            tags: Option<Vec<String>>,
            metadata: Option<BTreeMap<String, String>>,
            max_concurrent_requests: Option<u32>,
            paused: Option<bool>,
            $($own: $ty,)*
        }
    };
}

table_with_shared_keys! {
    /// `[defaults]`: the shared keys only.
    struct Defaults {}
}

table_with_shared_keys! {
    /// One `[[registration]]`: the shared keys, and which instances.
    struct RegistrationTable {
        instance: Option<String>,
        instance_prefix: Option<String>,
        count: Option<u32>,
    }
}

/// The whole file. Unknown top-level keys land in `top` and are rejected by
/// [`parse_top`] (serde's `flatten` ignores `deny_unknown_fields`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
struct FileToml {
    #[serde(flatten)]
    top: TopLevelKeys,
    defaults: Option<Defaults>,
    #[serde(default)]
    registration: Vec<RegistrationTable>,
}

/// Wrapper so the top-level keys can be checked for unknown names together
/// with `defaults` and `registration` (see [`parse`]).
type TopLevelKeys = BTreeMap<String, toml::Value>;

/// Where a registration's token comes from. Compared at reload: a changed
/// source is a changed registration.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum TokenSource {
    /// No token (an empty one is sent).
    None,
    /// `auth_token`: the literal.
    Literal(String),
    /// `auth_token_env`: the variable's name and the value read at load
    /// (checked set at load; read again before every `register`).
    Env { name: String, value: String },
    /// `auth_token_file`: checked readable at load, then read again before
    /// every `register` (a rotated file needs no reload).
    File(PathBuf),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Literal(_) => f.write_str("Literal(<redacted>)"),
            Self::Env { name, .. } => write!(f, "Env({name})"),
            Self::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl TokenSource {
    /// The token as it would be sent now (the tests' view of a source).
    #[cfg(test)]
    pub(crate) fn token(&self) -> Result<String, String> {
        match self {
            Self::None => Ok(String::new()),
            Self::Literal(t) => Ok(t.clone()),
            Self::Env { value, .. } => Ok(value.clone()),
            Self::File(path) => read_token_file(path),
        }
    }

    /// Sets the token on `b`: a literal as a fixed token, a variable or a
    /// file as connector-core's [`EnvToken`] / [`FileToken`], asked before
    /// every `register`.
    fn apply(&self, b: ConnectorConfigBuilder) -> ConnectorConfigBuilder {
        match self {
            Self::None => b,
            Self::Literal(t) => b.auth_token(t.clone()),
            Self::Env { name, .. } => b.token_source(Arc::new(EnvToken::new(name.clone()))),
            Self::File(path) => b.token_source(Arc::new(FileToken::new(path.clone()))),
        }
    }
}

fn read_token_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| format!("auth_token_file {}: cannot read: {e}", path.display()))
}

/// One registration the file asks for, with every setting that matters for
/// "changed or not" at reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RegistrationSpec {
    pub(crate) key: RegistrationKey,
    pub(crate) token: TokenSource,
    pub(crate) display_name: Option<String>,
    pub(crate) tags: Vec<String>,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) max_concurrent_requests: Option<u32>,
    pub(crate) paused: bool,
}

impl RegistrationSpec {
    /// The connector-core config for this registration. A token file or
    /// variable becomes a token source, read again before every
    /// `register` the registration makes.
    pub(crate) fn connector_config(&self) -> Result<ConnectorConfig, String> {
        let mut b = self.token.apply(ConnectorConfig::builder(
            self.key.tenant_id(),
            self.key.connector_type(),
            self.key.instance_id(),
        ));
        if let Some(name) = &self.display_name {
            b = b.display_name(name.clone());
        }
        for tag in &self.tags {
            b = b.tag(tag.clone());
        }
        for (k, v) in &self.metadata {
            b = b.metadata(k.clone(), v.clone());
        }
        if let Some(n) = self.max_concurrent_requests {
            b = b.max_concurrent_requests(n);
        }
        b.build().map_err(|e| format!("{}: {}", self.key, plain(e)))
    }
}

/// A parsed file: its top-level settings and its registrations, in file
/// order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConfigFile {
    pub(crate) top: TopLevel,
    pub(crate) registrations: Vec<RegistrationSpec>,
}

/// The message of a connector-core config error, without its generic prefix.
pub(crate) fn plain(e: ConnectorError) -> String {
    match e {
        ConnectorError::InvalidConfig(m) => m,
        other => other.to_string(),
    }
}

/// How the file is read: the environment lookup is injected so tests need
/// not touch the process environment.
pub(crate) struct Loader<'a> {
    /// The connector types the host knows.
    pub(crate) known_types: &'a BTreeSet<String>,
    /// Reads an environment variable.
    pub(crate) env: &'a dyn Fn(&str) -> Option<String>,
}

impl Loader<'_> {
    /// Reads and checks the file at `path`.
    pub(crate) fn load(&self, path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("config {}: cannot read: {e}", path.display())))?;
        self.parse(&text)
            .map_err(|e| ConfigError(format!("config {}: {e}", path.display())))
    }

    /// Checks a file's text. The error is one line (without the file name).
    pub(crate) fn parse(&self, text: &str) -> Result<ConfigFile, String> {
        let file: FileToml = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        let top = parse_top(text, file.top)?;
        let defaults = file.defaults.unwrap_or_default();
        let mut registrations = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, table) in file.registration.into_iter().enumerate() {
            for spec in self.expand(i + 1, table, &defaults)? {
                if !seen.insert(spec.key.clone()) {
                    return Err(format!(
                        "[[registration]] #{}: registration `{}` is listed twice",
                        i + 1,
                        spec.key
                    ));
                }
                registrations.push(spec);
            }
        }
        Ok(ConfigFile { top, registrations })
    }

    /// One `[[registration]]` table (1-based `n`) into its registrations.
    fn expand(
        &self,
        n: usize,
        t: RegistrationTable,
        d: &Defaults,
    ) -> Result<Vec<RegistrationSpec>, String> {
        let at = |what: String| format!("[[registration]] #{n}: {what}");
        let tenant = t
            .tenant
            .or_else(|| d.tenant.clone())
            .ok_or_else(|| at("no `tenant` (set it here or in [defaults])".into()))?;
        let connector_type = t
            .connector_type
            .or_else(|| d.connector_type.clone())
            .ok_or_else(|| at("no `connector_type`".into()))?;
        validate_identifier("tenant", &tenant).map_err(|e| at(plain(e)))?;
        validate_identifier("connector_type", &connector_type).map_err(|e| at(plain(e)))?;
        if !self.known_types.contains(&connector_type) {
            let known: Vec<&str> = self.known_types.iter().map(String::as_str).collect();
            return Err(at(format!(
                "unknown connector_type `{connector_type}` (this host knows: {})",
                known.join(", ")
            )));
        }
        let instances: Vec<String> = match (t.instance, t.instance_prefix, t.count) {
            (Some(one), None, None) => vec![one],
            (None, Some(prefix), Some(count)) if count >= 1 => {
                (0..count).map(|i| format!("{prefix}{i}")).collect()
            }
            (None, Some(_), Some(_)) => return Err(at("`count` must be at least 1".into())),
            (None, Some(_), None) => {
                return Err(at("`instance_prefix` needs `count`".into()));
            }
            (None, None, Some(_)) => {
                return Err(at("`count` needs `instance_prefix`".into()));
            }
            (None, None, None) => {
                return Err(at(
                    "no instance: set `instance`, or `instance_prefix` and `count`".into(),
                ))
            }
            (Some(_), _, _) => {
                return Err(at(
                    "both `instance` and `instance_prefix`/`count`: set one or the other".into(),
                ))
            }
        };
        let own = token_source(
            t.auth_token.clone(),
            t.auth_token_env.clone(),
            t.auth_token_file.clone(),
        )
        .map_err(at)?;
        let token = match own {
            Some(source) => source,
            None => token_source(
                d.auth_token.clone(),
                d.auth_token_env.clone(),
                d.auth_token_file.clone(),
            )
            .map_err(|e| format!("[defaults]: {e}"))?
            .unwrap_or(Unresolved::None),
        };
        let token = self.resolve(token).map_err(at)?;
        let max_concurrent_requests = t.max_concurrent_requests.or(d.max_concurrent_requests);
        if max_concurrent_requests == Some(0) {
            return Err(at("`max_concurrent_requests` must be at least 1".into()));
        }
        let template = RegistrationSpec {
            // Replaced per instance below.
            key: RegistrationKey::new(&tenant, &connector_type, "x").map_err(|e| at(plain(e)))?,
            token,
            display_name: t.display_name.or_else(|| d.display_name.clone()),
            tags: t.tags.or_else(|| d.tags.clone()).unwrap_or_default(),
            metadata: t
                .metadata
                .or_else(|| d.metadata.clone())
                .unwrap_or_default(),
            max_concurrent_requests,
            paused: t.paused.or(d.paused).unwrap_or(false),
        };
        instances
            .into_iter()
            .map(|instance| {
                validate_identifier("instance", &instance).map_err(|e| at(plain(e)))?;
                let key = RegistrationKey::new(&tenant, &connector_type, &instance)
                    .map_err(|e| at(plain(e)))?;
                Ok(RegistrationSpec {
                    key,
                    ..template.clone()
                })
            })
            .collect()
    }

    fn resolve(&self, token: Unresolved) -> Result<TokenSource, String> {
        Ok(match token {
            Unresolved::None => TokenSource::None,
            Unresolved::Literal(t) => TokenSource::Literal(t),
            Unresolved::Env(name) => {
                let value = (self.env)(&name).ok_or_else(|| {
                    format!("auth_token_env: the environment variable `{name}` is not set")
                })?;
                TokenSource::Env { name, value }
            }
            Unresolved::File(path) => {
                read_token_file(&path)?;
                TokenSource::File(path)
            }
        })
    }
}

enum Unresolved {
    None,
    Literal(String),
    Env(String),
    File(PathBuf),
}

/// At most one of the three token keys of one table.
fn token_source(
    literal: Option<String>,
    env: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<Unresolved>, String> {
    match (literal, env, file) {
        (None, None, None) => Ok(None),
        (Some(t), None, None) => Ok(Some(Unresolved::Literal(t))),
        (None, Some(n), None) => Ok(Some(Unresolved::Env(n))),
        (None, None, Some(p)) => Ok(Some(Unresolved::File(p))),
        _ => Err(
            "more than one of `auth_token`, `auth_token_env`, `auth_token_file`: set one".into(),
        ),
    }
}

/// The top-level table, checked key by key against [`TopLevel`] so an
/// unknown key is named with its line.
fn parse_top(text: &str, keys: TopLevelKeys) -> Result<TopLevel, String> {
    // Key by key first, so a wrong value is named by its key and line.
    for (key, value) in &keys {
        let one: toml::Table = [(key.clone(), value.clone())].into_iter().collect();
        if let Err(e) = TopLevel::deserialize(one) {
            let message = e.message().trim().replace('\n', " ");
            let at = match line_of_top_key(text, key) {
                Some(line) => format!("line {line}: "),
                None => String::new(),
            };
            return Err(format!("{at}`{key}`: {message}"));
        }
    }
    let table: toml::Table = keys.into_iter().collect();
    TopLevel::deserialize(table).map_err(|e| e.message().trim().replace('\n', " "))
}

/// The 1-based line of `key = …` before the first table header.
fn line_of_top_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// A `toml` error as one line: `line N: message`.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types() -> BTreeSet<String> {
        ["echo".to_string(), "kv".to_string()].into()
    }

    fn parse_with(text: &str, env: &[(&str, &str)]) -> Result<ConfigFile, String> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.get(name).cloned();
        let known = types();
        Loader {
            known_types: &known,
            env: &lookup,
        }
        .parse(text)
    }

    fn parse(text: &str) -> Result<ConfigFile, String> {
        parse_with(text, &[])
    }

    fn err(text: &str) -> String {
        let e = parse(text).expect_err("must be rejected");
        assert_eq!(e.lines().count(), 1, "one line: {e}");
        e
    }

    #[test]
    fn the_contract_example_parses() {
        let dir = std::env::temp_dir().join(format!("ch-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let token = dir.join("beta-token");
        std::fs::write(&token, "  s3cret\n").expect("token file");
        let text = format!(
            r#"
url = "grpcs://cp.example.com:443"
ca_cert = "/etc/connector/ca.pem"
proxy = "none"
max_streams_per_channel = 80
metrics_addr = "127.0.0.1:9090"
heartbeat_interval_ms = 30000
heartbeat_timeout_ms = 45000
reconnect_delay_ms = 500
max_backoff_ms = 60000
jitter_ms = 500

[defaults]
tenant = "acme"
auth_token_env = "ACME_TOKEN"
max_concurrent_requests = 100
tags = ["prod"]

[[registration]]
connector_type = "echo"
instance = "echo-0"

[[registration]]
tenant = "beta"
connector_type = "echo"
instance_prefix = "e-"
count = 50
display_name = "Echo fleet"
metadata = {{ region = "eu" }}
auth_token_file = "{}"
paused = false
"#,
            token.display()
        );
        let file = parse_with(&text, &[("ACME_TOKEN", "acme-token")]).expect("valid");
        assert_eq!(file.top.url.as_deref(), Some("grpcs://cp.example.com:443"));
        assert_eq!(file.top.max_streams_per_channel, Some(80));
        assert_eq!(file.registrations.len(), 51);
        let first = &file.registrations[0];
        assert_eq!(first.key.to_string(), "acme.echo.echo-0");
        assert_eq!(first.tags, vec!["prod".to_string()]);
        assert_eq!(first.max_concurrent_requests, Some(100));
        assert_eq!(first.token.token().expect("token"), "acme-token");
        let last = &file.registrations[50];
        assert_eq!(last.key.to_string(), "beta.echo.e-49");
        assert_eq!(last.display_name.as_deref(), Some("Echo fleet"));
        assert_eq!(last.metadata.get("region").map(String::as_str), Some("eu"));
        // Its own token source: nothing of [defaults]' token.
        assert_eq!(last.token.token().expect("token"), "s3cret");
        assert!(!last.paused);
        let config = last.connector_config().expect("config");
        // A file is a source read before every register (tests/rotating_token.rs).
        assert!(config.auth_token.is_empty());
        assert!(format!("{:?}", config.token_source).contains("FileToken"));
        assert_eq!(config.display_name, "Echo fleet");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A rejected file, one line naming every needle.
    fn rejected(text: &str, needles: &[&str]) {
        let e = err(text);
        for needle in needles {
            assert!(e.contains(needle), "{needle:?} not in {e}");
        }
    }

    #[test]
    fn an_unknown_key_or_a_wrong_value_is_named_with_its_line() {
        let reg = "[[registration]]\ntenant = \"t\"\nconnector_type = \"echo\"\n";
        for (text, needles) in [
            // Unknown keys: top level, [[registration]], [defaults].
            (
                "url = \"grpc://h:1\"\nurll = \"x\"\n".to_string(),
                &["urll", "line 2"][..],
            ),
            (
                format!("{reg}instance = \"a\"\ncolour = 1\n"),
                &["colour", "line 5"],
            ),
            (
                "[defaults]\ninstance = \"a\"\n".into(),
                &["instance", "line 2"],
            ),
            // Values of the wrong type, and no TOML at all.
            (
                format!("{reg}instance_prefix = \"a\"\ncount = \"ten\"\n"),
                &["line 5"],
            ),
            ("jitter_ms = \"soon\"\n".into(), &["jitter_ms", "line 1"]),
            ("not toml at all [".into(), &["line 1"]),
        ] {
            rejected(&text, needles);
        }
    }

    #[test]
    fn missing_tenant_or_type_is_an_error() {
        rejected(
            "[[registration]]\nconnector_type = \"echo\"\ninstance = \"a\"\n",
            &["#1", "tenant"],
        );
        rejected(
            "[[registration]]\ntenant = \"t\"\ninstance = \"a\"\n",
            &["#1", "connector_type"],
        );
    }

    #[test]
    fn instance_and_prefix_count_are_one_or_the_other() {
        let head = "[[registration]]\ntenant = \"t\"\nconnector_type = \"echo\"\n";
        for (body, needle) in [
            (
                "instance = \"a\"\ninstance_prefix = \"p\"\ncount = 2\n",
                "both",
            ),
            ("", "no instance"),
            ("instance_prefix = \"p\"\n", "needs `count`"),
            ("count = 2\n", "needs `instance_prefix`"),
            ("instance_prefix = \"p\"\ncount = 0\n", "at least 1"),
        ] {
            rejected(&format!("{head}{body}"), &[needle]);
        }
    }

    #[test]
    fn a_duplicate_registration_is_named() {
        rejected("[[registration]]\ntenant = \"t\"\nconnector_type = \"echo\"\ninstance_prefix = \"e\"\ncount = 3\n\
             [[registration]]\ntenant = \"t\"\nconnector_type = \"echo\"\ninstance = \"e2\"\n", &["t.echo.e2", "#2"]);
    }

    #[test]
    fn an_unknown_connector_type_is_named() {
        rejected(
            "[[registration]]\ntenant = \"t\"\nconnector_type = \"sql\"\ninstance = \"a\"\n",
            &["sql", "echo, kv"],
        );
    }

    #[test]
    fn token_sources_are_checked() {
        let head =
            "[[registration]]\ntenant = \"t\"\nconnector_type = \"echo\"\ninstance = \"a\"\n";
        for (text, needles) in [
            (
                format!("{head}auth_token_env = \"NOPE_NOT_SET\"\n"),
                &["NOPE_NOT_SET", "not set"][..],
            ),
            (
                format!("{head}auth_token_file = \"/nonexistent/token\"\n"),
                &["/nonexistent/token"],
            ),
            (
                format!("{head}auth_token = \"a\"\nauth_token_env = \"B\"\n"),
                &["more than one"],
            ),
            (
                format!("[defaults]\nauth_token = \"a\"\nauth_token_file = \"f\"\n{head}"),
                &["[defaults]", "more than one"],
            ),
        ] {
            rejected(&text, needles);
        }
        // A registration's own source replaces the defaults' (no "more than one").
        let ok = parse_with(
            "[defaults]\nauth_token_env = \"A\"\n[[registration]]\ntenant = \"t\"\nconnector_type = \"echo\"\ninstance = \"a\"\nauth_token = \"lit\"\n",
            &[("A", "from-env")],
        )
        .expect("valid");
        assert_eq!(ok.registrations[0].token.token().expect("token"), "lit");
    }

    #[test]
    fn bad_identifiers_and_zero_limits_are_errors() {
        rejected(
            "[[registration]]\ntenant = \"t t\"\nconnector_type = \"echo\"\ninstance = \"a\"\n",
            &["tenant"],
        );
        rejected("[[registration]]\ntenant = \"t\"\nconnector_type = \"echo\"\ninstance = \"a\"\nmax_concurrent_requests = 0\n", &["max_concurrent_requests"]);
    }

    #[test]
    fn tokens_never_show_in_debug() {
        let file = parse(
            "[[registration]]\ntenant = \"t\"\nconnector_type = \"echo\"\ninstance = \"a\"\nauth_token = \"hunter2\"\n",
        )
        .expect("valid");
        assert!(!format!("{file:?}").contains("hunter2"));
    }
}
