//! `--fleet` at the command line: one-line configuration errors (exit 2),
//! with and without the `etcd` feature. Nothing here needs etcd: every
//! case is refused before anything connects.

mod support;

use support::{assert_exit, assert_one_line_config_error, run};
#[cfg(feature = "etcd")]
use support::{temp_dir, write};

/// A server address nothing listens on: never reached by these cases.
const URL: &str = "grpc://127.0.0.1:1";
const FLEET: &str = "etcd://127.0.0.1:1/connector-host";

/// What is wrong, the arguments, the environment, the exit code, what the
/// one error line names.
type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, i32, &'a str);

async fn check(cases: Vec<Case<'_>>) {
    for (what, args, env, want, needle) in cases {
        let (code, stdout, stderr) = run(&args, &env).await;
        assert_exit(code, want, &stdout, &stderr);
        assert_one_line_config_error(what, code, &stderr, needle);
    }
}

#[cfg(not(feature = "etcd"))]
#[tokio::test]
async fn fleet_without_the_etcd_feature_says_how_to_build_it() {
    let build = "cargo build --release -p connector-host --features etcd";
    check(vec![
        (
            "--fleet",
            vec!["--url", URL, "--fleet", FLEET],
            vec![],
            2,
            build,
        ),
        // The same from the variable.
        (
            "CONNECTOR_HOST_FLEET",
            vec!["--url", URL],
            vec![("CONNECTOR_HOST_FLEET", FLEET)],
            2,
            build,
        ),
    ])
    .await;
}

/// A config file at `dir/name.toml`: the url, `top`, one registration.
#[cfg(feature = "etcd")]
fn config_file(dir: &std::path::Path, name: &str, top: &str) -> String {
    let file = dir.join(format!("{name}.toml"));
    write(
        &file,
        &format!(
            "url = \"{URL}\"\n{top}\n[[registration]]\ntenant = \"t\"\n\
             connector_type = \"echo\"\ninstance = \"e0\"\n"
        ),
    );
    file.to_str().expect("UTF-8 path").to_string()
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn fleet_with_static_shards_without_a_server_or_with_bad_settings_is_refused() {
    let dir = temp_dir("fleet-cli", "config");
    let lease_file = config_file(
        &dir,
        "lease",
        &format!("fleet = \"{FLEET}\"\nfleet_lease_secs = 7200\n"),
    );
    let shards_file = config_file(
        &dir,
        "shards",
        &format!("fleet = \"{FLEET}\"\nshards = 2\n"),
    );
    let url_file = config_file(&dir, "url", "fleet = \"etcd://127.0.0.1:2379/a//b\"\n");
    check(vec![
        (
            "--shards",
            vec!["--url", URL, "--fleet", FLEET, "--shards", "3"],
            vec![],
            2,
            "--fleet cannot be combined with --shards",
        ),
        (
            "--shard",
            vec!["--url", URL, "--fleet", FLEET, "--shard", "0/2"],
            vec![],
            2,
            "--fleet cannot be combined with --shard",
        ),
        (
            "CONNECTOR_HOST_SHARDS left over from a static fleet",
            vec!["--url", URL, "--fleet", FLEET],
            vec![("CONNECTOR_HOST_SHARDS", "3")],
            2,
            "--fleet cannot be combined with --shards",
        ),
        (
            "the demo",
            vec!["--fleet", FLEET],
            vec![],
            2,
            "--fleet needs a server",
        ),
        (
            "no prefix",
            vec!["--url", URL, "--fleet", "etcd://127.0.0.1:2379"],
            vec![],
            2,
            "the key prefix is missing",
        ),
        (
            "not etcd://",
            vec!["--url", URL, "--fleet", "http://127.0.0.1:2379/p"],
            vec![],
            2,
            "expected etcd://HOST:PORT/PREFIX",
        ),
        (
            "a member id that is no identifier",
            vec!["--url", URL, "--fleet", FLEET, "--fleet-member", "a b"],
            vec![],
            2,
            "--fleet-member",
        ),
        (
            "a lease of 0 s",
            vec!["--url", URL, "--fleet", FLEET, "--fleet-lease-secs", "0"],
            vec![],
            2,
            "--fleet-lease-secs",
        ),
        // The fleet keys of a config file are checked too.
        (
            "fleet_lease_secs out of range",
            vec!["--config", &lease_file],
            vec![],
            2,
            "fleet lease of 7200 s",
        ),
        (
            "fleet with shards",
            vec!["--config", &shards_file],
            vec![],
            2,
            "--fleet cannot be combined with --shards",
        ),
        (
            "a bad fleet URL",
            vec!["--config", &url_file],
            vec![],
            2,
            "empty segment",
        ),
    ])
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
