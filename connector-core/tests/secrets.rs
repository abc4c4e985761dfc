//! Credentials never reach `Debug`, `Display` or an error: server URL query
//! tokens, proxy `user:password`, auth tokens. And proxy user info is
//! percent-decoded before it becomes `Proxy-Authorization`, checked against
//! the testkit's `ConnectProxy` on a loopback socket.

use std::time::Duration;

use connector_core::{
    redact_url, ConnectorConfig, Endpoint, MultiTransportOptions, Proxy, ProxySetting,
};
use connector_testkit::ConnectProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

/// Every way a value is printed by people and by `tracing`.
fn shown(v: &(impl std::fmt::Debug + std::fmt::Display)) -> [String; 3] {
    [format!("{v}"), format!("{v:?}"), format!("{v:#?}")]
}

fn assert_hidden(texts: &[String], secrets: &[&str], kept: &[&str]) {
    for text in texts {
        for s in secrets {
            assert!(!text.contains(s), "{s:?} leaked in {text}");
        }
        for k in kept {
            assert!(text.contains(k), "{k:?} missing from {text}");
        }
    }
}

#[test]
fn options_and_their_builder_never_print_a_credential() {
    let builder =
        MultiTransportOptions::builder("wss://api.example.com:8443/v1/connect?token=q-s3cret&v=2")
            .proxy(ProxySetting::Url(
                "http://agent:hunter2@proxy.example:3128".into(),
            ));
    let options = builder.clone().build().expect("valid");
    let texts = [
        format!("{builder:?}"),
        format!("{options:?}"),
        format!("{options:#?}"),
        format!("{:?}", options.to_builder()),
    ];
    assert_hidden(
        &texts,
        &["q-s3cret", "hunter2", "agent"],
        &["api.example.com", "8443", "token=", "proxy.example:3128"],
    );
    // The request itself still gets the whole URL.
    assert_eq!(
        options.endpoint.full_url(),
        "wss://api.example.com:8443/v1/connect?token=q-s3cret&v=2"
    );
    assert_eq!(
        options.to_builder().build().expect("round trip").endpoint,
        options.endpoint
    );
}

#[test]
fn endpoint_prints_its_path_but_not_its_query_values() {
    let e = Endpoint::parse("ws://h:1/custom?token=abc123&session=zz9#frag-secret").expect("valid");
    assert_hidden(
        &shown(&e),
        &["abc123", "zz9", "frag-secret"],
        &["/custom", "token=", "session="],
    );
    assert_eq!(
        e.to_string(),
        "ws://h:1/custom?token=<redacted>&session=<redacted>#<redacted>"
    );
    // A query-only URL gets the contract's path in front of the query.
    let e = Endpoint::parse("wss://h:2?token=abc123").expect("valid");
    assert_eq!(e.path, "/v1/connect?token=abc123");
    assert_eq!(e.to_string(), "wss://h:2/v1/connect?token=<redacted>");
}

#[test]
fn url_parse_errors_never_quote_a_credential() {
    for (url, secret) in [
        ("wss://user:pw-123@h:1/v1/connect", "pw-123"),
        ("ws://h:notaport?token=tok-456", "tok-456"),
        ("ws://h:1:2/x?token=tok-789", "tok-789"),
        ("grpc://h:1?token=tok-000", "tok-000"),
        ("ftp://u:pw-321@h:1", "pw-321"),
    ] {
        let err = Endpoint::parse(url).expect_err(url);
        assert_hidden(&shown(&err), &[secret], &["url"]);
        let err = MultiTransportOptions::builder(url).build().expect_err(url);
        assert_hidden(&shown(&err), &[secret], &["url"]);
    }
}

#[test]
fn proxy_errors_and_settings_never_quote_a_credential() {
    for url in [
        "http://agent:hunter2@proxy:notaport",
        "http://agent:hunter2@:3128",
        "http://agent:hunter2@:1",
        "http://agent:hun/ter2@proxy:0",
        "https://agent:hunter2@proxy:3128",
        "socks5://agent:hunter2@proxy:1",
    ] {
        let secrets = ["hunter2", "ter2", "agent"];
        let err = Proxy::parse(url).expect_err(url);
        assert_hidden(&shown(&err), &secrets, &["proxy url"]);
        let err = MultiTransportOptions::builder("grpc://h:1")
            .proxy(ProxySetting::Url(url.into()))
            .build()
            .expect_err(url);
        assert_hidden(&shown(&err), &secrets, &["proxy url"]);
    }
    // base64("agent:hunter2") is the `Proxy-Authorization` value.
    let p = Proxy::parse("http://agent:hunter2@proxy:3128").expect("valid");
    assert_hidden(
        &[format!("{p:?}")],
        &["hunter2", "YWdlbnQ6aHVudGVyMg"],
        &["proxy"],
    );
    let setting = ProxySetting::Url("http://agent:hunter2@proxy:3128".into());
    assert_hidden(
        &[format!("{setting:?}")],
        &["hunter2", "agent"],
        &["proxy:3128"],
    );
    assert_eq!(
        redact_url("http://agent:hunter2@proxy:3128"),
        "http://<redacted>@proxy:3128"
    );
}

#[test]
fn auth_token_is_not_in_a_config_debug() {
    let c = ConnectorConfig::builder("acme", "echo", "i1")
        .auth_token("bearer-xyz")
        .build()
        .expect("valid");
    assert_hidden(
        &[format!("{c:?}"), format!("{c:#?}")],
        &["bearer-xyz"],
        &["acme.echo.i1", "<redacted>"],
    );
}

/// A TCP server the proxy tunnels to: answers `pong` to `ping`.
async fn pong_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).await.is_ok() && &buf == b"ping" {
                    let _ = s.write_all(b"pong").await;
                }
            });
        }
    });
    addr.to_string()
}

#[tokio::test]
async fn percent_encoded_proxy_credentials_are_decoded_on_the_wire() {
    let target = pong_server().await;
    let proxy = ConnectProxy::start().await.expect("proxy");
    // Every character that must be encoded in user info.
    proxy.require_auth("ag ent", "p@ss:w/rd%");
    let url = proxy.url_with_auth("ag%20ent", "p%40ss%3Aw%2Frd%25");

    let p = Proxy::parse(&url).expect("valid");
    let mut tunnel = timeout(WAIT, p.open_tunnel(&target))
        .await
        .expect("in time")
        .expect("the proxy accepts the decoded credentials");
    tunnel.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    timeout(WAIT, tunnel.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&buf, b"pong");
    assert_eq!((proxy.tunnels_opened(), proxy.auth_failures()), (1, 0));

    // The same credentials sent literally (what the code did before) are
    // refused, so the test above can tell decoding from not decoding.
    proxy.require_auth("ag%20ent", "p%40ss%3Aw%2Frd%25");
    let err = timeout(WAIT, p.open_tunnel(&target))
        .await
        .expect("in time")
        .expect_err("decoded credentials do not match the literal ones");
    assert_eq!(err.status(), Some(407));
    let text = format!("{err} {err:?}");
    assert!(!text.contains("p@ss") && !text.contains("p%40ss"), "{text}");
    assert_eq!(proxy.auth_failures(), 1);
    proxy.stop().await;
}
