//! URLs with their secrets taken out, for `Debug`, `Display`, errors and logs.
//!
//! A server URL may carry a token in its query (`wss://h/v1/connect?token=…`)
//! and a proxy URL carries `user:password@`. Both must reach the socket
//! intact and must never reach a log line, so everything that prints a URL
//! prints [`redact_url`] of it.

/// What a redacted secret prints as.
pub(crate) const REDACTED: &str = "<redacted>";

/// `url` with the user info replaced by `<redacted>@`, every query value
/// replaced by `<redacted>` (names kept, so an operator can still see which
/// parameter is set) and any fragment replaced likewise. Scheme, host, port
/// and path are kept as they are. Works on text that is not a valid URL too:
/// it is what parse errors quote.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let mut out = String::with_capacity(url.len() + 16);
    if let Some(s) = scheme {
        out.push_str(s);
        out.push_str("://");
    }
    // The user info ends at the last `@` before any query or fragment, even
    // past a `/`: a password typed with a raw `/` in it must not leak as a
    // "path". (A path holding `@` is then over-redacted, which is harmless.)
    let before_query = rest.find(['?', '#']).unwrap_or(rest.len());
    let rest = match rest[..before_query].rfind('@') {
        Some(at) => {
            out.push_str(REDACTED);
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    out.push_str(authority);
    out.push_str(&redact_path_and_query(tail));
    out
}

/// The path of a URL with its query values and fragment redacted (see
/// [`redact_url`]).
pub(crate) fn redact_path_and_query(tail: &str) -> String {
    let (before_fragment, fragment) = match tail.split_once('#') {
        Some((b, _)) => (b, true),
        None => (tail, false),
    };
    let mut out = String::with_capacity(tail.len() + 16);
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                let name = pair.split_once('=').map_or(pair, |(name, _)| name);
                out.push_str(name);
                if pair.contains('=') || !name.is_empty() {
                    out.push('=');
                    out.push_str(REDACTED);
                }
            }
        }
        None => out.push_str(before_fragment),
    }
    if fragment {
        out.push('#');
        out.push_str(REDACTED);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_query_values_and_fragments_are_redacted() {
        assert_eq!(
            redact_url("http://user:p%40ss@proxy:3128"),
            "http://<redacted>@proxy:3128"
        );
        assert_eq!(
            redact_url("wss://h:1/v1/connect?token=s3cret&x=1#frag"),
            "wss://h:1/v1/connect?token=<redacted>&x=<redacted>#<redacted>"
        );
        assert_eq!(
            redact_url("wss://h:1?bare-secret"),
            "wss://h:1?bare-secret=<redacted>"
        );
        // A password that holds `/` or `?` (not valid, but typed by people).
        assert_eq!(redact_url("http://u:pa/ss@p:1"), "http://<redacted>@p:1");
        assert_eq!(redact_url("grpc://h:1"), "grpc://h:1");
        assert_eq!(redact_url("ws://h:1/custom"), "ws://h:1/custom");
    }
}
