//! `--fleet` at the command line: one-line configuration errors (exit 2),
//! with and without the `etcd` feature. Nothing here needs etcd: every
//! case is refused before anything connects.

mod support;

use support::{assert_one_line_config_error, run};

/// A server address nothing listens on: never reached by these cases.
const URL: &str = "grpc://127.0.0.1:1";
const FLEET: &str = "etcd://127.0.0.1:1/connector-host";

#[cfg(not(feature = "etcd"))]
#[tokio::test]
async fn fleet_without_the_etcd_feature_says_how_to_build_it() {
    let build = "cargo build --release -p connector-host --features etcd";
    let (code, _, stderr) = run(&["--url", URL, "--fleet", FLEET], &[]).await;
    assert_one_line_config_error("--fleet", code, &stderr, build);
    // The same from the variable.
    let (code, _, stderr) = run(&["--url", URL], &[("CONNECTOR_HOST_FLEET", FLEET)]).await;
    assert_one_line_config_error("CONNECTOR_HOST_FLEET", code, &stderr, build);
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn fleet_with_static_shards_or_without_a_server_is_refused() {
    for (what, args, env, needle) in [
        (
            "--shards",
            vec!["--url", URL, "--fleet", FLEET, "--shards", "3"],
            vec![],
            "--fleet cannot be combined with --shards",
        ),
        (
            "--shard",
            vec!["--url", URL, "--fleet", FLEET, "--shard", "0/2"],
            vec![],
            "--fleet cannot be combined with --shard",
        ),
        (
            "CONNECTOR_HOST_SHARDS left over from a static fleet",
            vec!["--url", URL, "--fleet", FLEET],
            vec![("CONNECTOR_HOST_SHARDS", "3")],
            "--fleet cannot be combined with --shards",
        ),
        (
            "the demo",
            vec!["--fleet", FLEET],
            vec![],
            "--fleet needs a server",
        ),
        (
            "no prefix",
            vec!["--url", URL, "--fleet", "etcd://127.0.0.1:2379"],
            vec![],
            "the key prefix is missing",
        ),
        (
            "not etcd://",
            vec!["--url", URL, "--fleet", "http://127.0.0.1:2379/p"],
            vec![],
            "expected etcd://HOST:PORT/PREFIX",
        ),
        (
            "a member id that is no identifier",
            vec!["--url", URL, "--fleet", FLEET, "--fleet-member", "a b"],
            vec![],
            "--fleet-member",
        ),
        (
            "a lease of 0 s",
            vec!["--url", URL, "--fleet", FLEET, "--fleet-lease-secs", "0"],
            vec![],
            "--fleet-lease-secs",
        ),
    ] {
        let (code, _, stderr) = run(&args, &env).await;
        assert_one_line_config_error(what, code, &stderr, needle);
    }
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn fleet_keys_of_the_config_file_are_checked_too() {
    let dir = std::env::temp_dir().join(format!("fleet-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("host.toml");
    for (what, top, needle) in [
        (
            "fleet_lease_secs out of range",
            format!("fleet = \"{FLEET}\"\nfleet_lease_secs = 7200\n"),
            "fleet lease of 7200 s",
        ),
        (
            "fleet with shards",
            format!("fleet = \"{FLEET}\"\nshards = 2\n"),
            "--fleet cannot be combined with --shards",
        ),
        (
            "a bad fleet URL",
            "fleet = \"etcd://127.0.0.1:2379/a//b\"\n".to_string(),
            "empty segment",
        ),
    ] {
        std::fs::write(
            &file,
            format!(
                "url = \"{URL}\"\n{top}\n[[registration]]\ntenant = \"t\"\n\
                 connector_type = \"echo\"\ninstance = \"e0\"\n"
            ),
        )
        .expect("write");
        let path = file.to_str().expect("UTF-8 path");
        let (code, _, stderr) = run(&["--config", path], &[]).await;
        assert_one_line_config_error(what, code, &stderr, needle);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
