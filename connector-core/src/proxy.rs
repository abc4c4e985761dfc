//! HTTP CONNECT proxies: which one (if any) a connection goes through.
//!
//! Both transports tunnel through an HTTP proxy with `CONNECT host:port`
//! before their own TLS and protocol handshakes, so the proxy sees only an
//! opaque TCP stream. The proxy comes from [`ProxySetting`]: the usual
//! environment variables by default, an explicit URL, or none.

use std::fmt;

use percent_encoding::percent_decode_str;

use crate::config::{parse_host_port, Endpoint, Secret};
use crate::error::ConnectorError;
use crate::redact::redact_url;

/// Where the proxy setting comes from.
///
/// `Debug` prints a proxy URL with its user info redacted.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxySetting {
    /// `HTTPS_PROXY` (for `grpcs`/`wss`) or `HTTP_PROXY` (for `grpc`/`ws`),
    /// lower-case forms too, minus hosts listed in `NO_PROXY`.
    #[default]
    FromEnv,
    /// Never use a proxy.
    Disabled,
    /// Always this proxy (`http://[user:password@]host:port`; user and
    /// password percent-encoded, so `p%40ss` is the password `p@ss`).
    Url(String),
}

impl fmt::Debug for ProxySetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FromEnv => f.write_str("FromEnv"),
            Self::Disabled => f.write_str("Disabled"),
            Self::Url(url) => f.debug_tuple("Url").field(&redact_url(url)).finish(),
        }
    }
}

/// A resolved proxy to tunnel through.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Proxy {
    /// Proxy host.
    pub host: String,
    /// Proxy port.
    pub port: u16,
    /// `Proxy-Authorization` value (`Basic …`), from the URL's user info.
    pub authorization: Option<Secret>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("authorization", &self.authorization)
            .finish()
    }
}

impl Proxy {
    /// `host:port` of the proxy, brackets around an IPv6 literal.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Parses `http://[user:password@]host[:port]` (port 80 by default).
    ///
    /// User and password are percent-decoded (RFC 3986 user info: `p%40ss`
    /// is `p@ss`) before they become the `Basic` credential. Errors never
    /// quote them.
    pub fn parse(url: &str) -> Result<Self, ConnectorError> {
        let bad = |why: &str| ConnectorError::InvalidConfig(format!("proxy url: {why}"));
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "scheme {scheme:?} is not supported; use http://host:port"
                )))
            }
            None => url,
        };
        // The user info ends at the last `@` before any query or fragment,
        // even past a raw `/` in a password: what follows it is the host, so
        // an error about the host or port can never quote the password.
        let before_query = rest.find(['?', '#']).unwrap_or(rest.len());
        let (userinfo, rest) = match rest[..before_query].rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let hostport = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (host, port) = parse_host_port(hostport).map_err(|why| bad(&why))?;
        let port = port.unwrap_or(80);
        let authorization = userinfo.map(|u| {
            let (user, password) = u.split_once(':').unwrap_or((u, ""));
            let mut credential: Vec<u8> = percent_decode_str(user).collect();
            credential.push(b':');
            credential.extend(percent_decode_str(password));
            Secret::new(format!("Basic {}", base64_std(&credential)))
        });
        Ok(Self {
            host: host.to_string(),
            port,
            authorization,
        })
    }

    /// The proxy `endpoint` should go through under `setting`, reading
    /// variables with `lookup` (the process environment in
    /// [`Proxy::for_endpoint`]).
    pub fn resolve(
        endpoint: &Endpoint,
        setting: &ProxySetting,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ConnectorError> {
        match setting {
            ProxySetting::Disabled => Ok(None),
            ProxySetting::Url(url) => Self::parse(url).map(Some),
            ProxySetting::FromEnv => {
                let get = |name: &str| {
                    lookup(name)
                        .or_else(|| lookup(&name.to_ascii_lowercase()))
                        .filter(|v| !v.trim().is_empty())
                };
                let var = if endpoint.tls {
                    "HTTPS_PROXY"
                } else {
                    "HTTP_PROXY"
                };
                let Some(url) = get(var) else {
                    return Ok(None);
                };
                if let Some(no_proxy) = get("NO_PROXY") {
                    if bypasses(&no_proxy, &endpoint.host, endpoint.port) {
                        return Ok(None);
                    }
                }
                Self::parse(&url).map(Some)
            }
        }
    }

    /// As [`Proxy::resolve`] with the process environment.
    pub fn for_endpoint(
        endpoint: &Endpoint,
        setting: &ProxySetting,
    ) -> Result<Option<Self>, ConnectorError> {
        Self::resolve(endpoint, setting, |name| std::env::var(name).ok())
    }

    /// The CONNECT request that opens a tunnel to `target` (`host:port`).
    pub fn connect_request(&self, target: &str) -> String {
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(auth) = &self.authorization {
            req.push_str("Proxy-Authorization: ");
            req.push_str(auth.expose());
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        req
    }
}

/// `NO_PROXY` semantics as curl has them: `*` matches everything; an entry
/// matches the host itself or any subdomain (a leading dot is optional);
/// `host:port` entries match that port only.
fn bypasses(no_proxy: &str, host: &str, port: u16) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    no_proxy
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let (name, entry_port) = match entry.rsplit_once(':') {
                Some((n, p)) if !n.contains(':') || n.ends_with(']') => (n, p.parse::<u16>().ok()),
                _ => (entry, None),
            };
            if entry_port.is_some_and(|p| p != port) {
                return false;
            }
            let name = name
                .trim_start_matches('.')
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase();
            host == name || host.ends_with(&format!(".{name}"))
        })
}

/// Standard base64 with padding (RFC 4648), as `Basic` credentials use.
fn base64_std(input: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fake_env as env;

    fn ep(url: &str) -> Endpoint {
        Endpoint::parse(url).expect("valid")
    }

    #[test]
    fn env_picks_by_tls_and_honours_no_proxy() {
        let vars = [
            ("HTTPS_PROXY", "http://secure-proxy:3128"),
            ("http_proxy", "http://plain-proxy:8080"),
            ("NO_PROXY", "internal.example, .corp, localhost:9000"),
        ];
        let p = Proxy::resolve(
            &ep("grpcs://api.example.com:443"),
            &ProxySetting::FromEnv,
            env(&vars),
        )
        .expect("ok")
        .expect("proxied");
        assert_eq!((p.host.as_str(), p.port), ("secure-proxy", 3128));
        let p = Proxy::resolve(
            &ep("ws://api.example.com:80"),
            &ProxySetting::FromEnv,
            env(&vars),
        )
        .expect("ok")
        .expect("proxied");
        assert_eq!(p.authority(), "plain-proxy:8080");
        for direct in [
            "grpc://internal.example:1",
            "grpc://a.b.corp:1",
            "grpc://localhost:9000",
        ] {
            assert_eq!(
                Proxy::resolve(&ep(direct), &ProxySetting::FromEnv, env(&vars)).expect("ok"),
                None,
                "{direct}"
            );
        }
        assert!(Proxy::resolve(
            &ep("grpc://localhost:9001"),
            &ProxySetting::FromEnv,
            env(&vars)
        )
        .expect("ok")
        .is_some());
        assert_eq!(
            Proxy::resolve(&ep("grpc://h:1"), &ProxySetting::FromEnv, env(&[])).expect("ok"),
            None
        );
    }

    #[test]
    fn explicit_and_disabled_settings_win() {
        let vars = [("HTTP_PROXY", "http://env-proxy:1")];
        let p = Proxy::resolve(
            &ep("grpc://h:1"),
            &ProxySetting::Url("http://user:pa55@explicit:3128".into()),
            env(&vars),
        )
        .expect("ok")
        .expect("proxied");
        assert_eq!(p.host, "explicit");
        let req = p.connect_request("h:1");
        assert!(req.starts_with("CONNECT h:1 HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(
            req.contains("Proxy-Authorization: Basic dXNlcjpwYTU1\r\n"),
            "{req}"
        );
        // That neither `p` nor the setting prints the credential:
        // tests/secrets.rs.
        assert_eq!(
            Proxy::resolve(&ep("grpc://h:1"), &ProxySetting::Disabled, env(&vars)).expect("ok"),
            None
        );
    }

    #[test]
    fn user_info_is_percent_decoded_before_it_is_encoded() {
        let p = Proxy::parse("http://us%3Aer%20x:p%40ss%2Fw@proxy:3128").expect("valid");
        // "us:er x:p@ss/w", in base64.
        assert_eq!(
            p.authorization.as_ref().map(Secret::expose),
            Some("Basic dXM6ZXIgeDpwQHNzL3c=")
        );
        // No password at all, and an empty one, both send `user:`.
        for url in ["http://agent@p:1", "http://agent:@p:1"] {
            let p = Proxy::parse(url).expect("valid");
            assert_eq!(
                p.authorization.as_ref().map(Secret::expose),
                Some("Basic YWdlbnQ6"), // "agent:"
                "{url}"
            );
        }
        // A raw `@` or `/` in the password (not encoded): the last `@` ends
        // the user info, and the host is still found.
        let p = Proxy::parse("http://agent:p@s/s@proxy:8080").expect("valid");
        assert_eq!(p.authority(), "proxy:8080");
        assert_eq!(
            p.authorization.as_ref().map(Secret::expose),
            Some("Basic YWdlbnQ6cEBzL3M=") // "agent:p@s/s"
        );
    }

    // That a proxy URL error never quotes the password: tests/secrets.rs.

    #[test]
    fn bad_proxy_urls_are_config_errors() {
        for bad in ["https://p:1", "http://:1", "http://p:0", "socks5://p:1"] {
            let err = Proxy::parse(bad).expect_err(bad);
            assert!(
                matches!(err, ConnectorError::InvalidConfig(_)),
                "{bad}: {err:?}"
            );
        }
        assert_eq!(Proxy::parse("p:3128").expect("bare host:port").port, 3128);
    }
}
