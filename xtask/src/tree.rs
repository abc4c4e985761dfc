//! Dependency-tree checks, read from `cargo tree --edges normal` (what a
//! user's build compiles; dev-dependencies do not count):
//!
//! - `cargo xtask tree-check` (CI step `tree`): `connector-core` stays
//!   transport-agnostic, so its tree has no transport crate; each transport
//!   crate has none of the other's.
//! - `cargo xtask features-check` (CI step `features`): `connector-testkit`
//!   and `connector-host` built with one transport feature alone have none
//!   of the other transport's crates, and each such subset compiles
//!   (`cargo check`, no warning), so the `cfg` code of a one-transport build
//!   is not left to rot.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use crate::cmd;

/// The crates of each transport.
const GRPC_CRATES: &[&str] = &["tonic", "h2"];
const WS_CRATES: &[&str] = &["tungstenite", "tokio-tungstenite"];

/// One `cargo tree` to read and what it must not contain.
struct TreeRule {
    package: &'static str,
    /// `None`: the package's default features; `Some(f)`:
    /// `--no-default-features --features f`.
    features: Option<&'static str>,
    forbidden: &'static [&'static str],
    /// What to do when the rule is broken.
    fix: &'static str,
}

/// `connector-core` and the transport crates (CI step `tree`).
const CORE_RULES: &[TreeRule] = &[
    TreeRule {
        package: "connector-core",
        features: None,
        forbidden: &["tonic", "hyper", "tungstenite", "h2"],
        fix: "connector-core must stay sans-IO and transport-agnostic; move the \
              dependency to connector-grpc or connector-ws",
    },
    TreeRule {
        package: "connector-grpc",
        features: None,
        forbidden: WS_CRATES,
        fix: "connector-grpc must not pull the WebSocket stack",
    },
    TreeRule {
        package: "connector-ws",
        // hyper too: nothing in the WebSocket client speaks HTTP/2 or needs
        // an HTTP server.
        features: None,
        forbidden: &["tonic", "h2", "hyper"],
        fix: "connector-ws must not pull the gRPC or hyper stack",
    },
    TreeRule {
        package: "connector-host",
        // The `opentelemetry` feature is off by default: nothing of it is
        // compiled then.
        features: None,
        forbidden: &[
            "opentelemetry",
            "opentelemetry_sdk",
            "opentelemetry-otlp",
            "tracing-opentelemetry",
        ],
        fix: "OpenTelemetry belongs behind connector-host's (and connector-core's) \
              `opentelemetry` feature",
    },
];

/// One transport feature alone (CI step `features`).
const FEATURE_RULES: &[TreeRule] = &[
    TreeRule {
        package: "connector-testkit",
        features: Some("grpc"),
        forbidden: WS_CRATES,
        fix: "tie the dependency to the `ws` feature (`dep:` + `optional = true`)",
    },
    TreeRule {
        package: "connector-testkit",
        features: Some("ws"),
        // The WebSocket front-end and the HTTP/1.1-only server are written on
        // tokio-tungstenite and tokio: no hyper at all.
        forbidden: &["tonic", "h2", "hyper"],
        fix: "tie the dependency to the `grpc` feature (`dep:` + `optional = true`)",
    },
    TreeRule {
        package: "connector-host",
        features: Some("grpc"),
        forbidden: WS_CRATES,
        fix: "tie the dependency to the `ws` feature (`dep:` + `optional = true`)",
    },
    TreeRule {
        package: "connector-host",
        features: Some("ws"),
        // hyper stays: the ops endpoint (`--metrics-addr`) is served by
        // hyper, HTTP/1.1 only, hence no h2.
        forbidden: GRPC_CRATES,
        fix: "tie the dependency to the `grpc` feature; the ops endpoint's hyper \
              must stay HTTP/1.1 only (no `http2` feature)",
    },
];

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    if let Some(arg) = args.first() {
        return Err(format!("`tree-check` takes no arguments, got `{arg}`"));
    }
    check()
}

pub(crate) fn run_features(args: &[String]) -> Result<(), String> {
    if let Some(arg) = args.first() {
        return Err(format!("`features-check` takes no arguments, got `{arg}`"));
    }
    check_features()
}

/// CI step `tree`.
pub(crate) fn check() -> Result<(), String> {
    check_rules(CORE_RULES)
}

/// CI step `features`: the trees of one-transport builds, then each builds.
pub(crate) fn check_features() -> Result<(), String> {
    check_rules(FEATURE_RULES)?;
    for rule in FEATURE_RULES {
        let mut command = cmd::cargo(["check", "--package", rule.package, "--lib", "--bins"]);
        command.args(feature_args(rule.features));
        check_without_warnings(&mut command)?;
    }
    // The testkit with no front-end at all (engine, connectors, harness)
    // builds too: a user with a transport of their own may want only that.
    let mut command = cmd::cargo(["check", "--package", "connector-testkit", "--lib"]);
    command.arg("--no-default-features");
    check_without_warnings(&mut command)?;
    Ok(())
}

fn feature_args(features: Option<&str>) -> Vec<String> {
    match features {
        None => Vec::new(),
        Some(f) => vec![
            "--no-default-features".into(),
            "--features".into(),
            f.to_string(),
        ],
    }
}

fn check_rules(rules: &[TreeRule]) -> Result<(), String> {
    let mut broken = Vec::new();
    for rule in rules {
        let mut command = cmd::cargo(["tree", "--package", rule.package, "--edges", "normal"]);
        command.args(feature_args(rule.features));
        let shown = cmd::describe(&command);
        println!("$ {shown}");
        let output = command
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("could not start `{shown}`: {e}"))?;
        if !output.status.success() {
            return Err(format!("`{shown}` failed ({})", output.status));
        }
        let tree = String::from_utf8_lossy(&output.stdout);
        let offending = forbidden_lines(&tree, rule.package, rule.forbidden)?;
        let what = match rule.features {
            None => rule.package.to_string(),
            Some(f) => format!("{} with only `{f}`", rule.package),
        };
        if offending.is_empty() {
            let count = tree.lines().filter(|l| !l.trim().is_empty()).count();
            println!(
                "{what}: {count} lines in its dependency tree, none of {:?}",
                rule.forbidden
            );
        } else {
            println!("{tree}");
            broken.push(format!(
                "{what} depends on {:?} ({}):\n{}",
                rule.forbidden,
                rule.fix,
                offending.join("\n")
            ));
        }
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(broken.join("\n"))
    }
}

/// Runs `cargo check`, its stderr passed through; an error if it fails or
/// the compiler warned (cargo replays the warnings of cached crates, so a
/// warm cache still reports them).
fn check_without_warnings(command: &mut std::process::Command) -> Result<(), String> {
    let shown = cmd::describe(command);
    println!("$ {shown}");
    let mut child = command
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start `{shown}`: {e}"))?;
    let mut warned = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line.map_err(|e| format!("reading the output of `{shown}`: {e}"))?;
            eprintln!("{line}");
            if is_warning_summary(&line) {
                warned.push(line);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for `{shown}`: {e}"))?;
    if !status.success() {
        return Err(format!("`{shown}` failed ({status})"));
    }
    if !warned.is_empty() {
        return Err(format!(
            "`{shown}` warned (a one-transport build must be clean):\n  {}",
            warned.join("\n  ")
        ));
    }
    Ok(())
}

/// Cargo's line after a crate's compiler warnings:
/// ``warning: `connector-host` (lib) generated 2 warnings``.
fn is_warning_summary(line: &str) -> bool {
    line.strip_prefix("warning: `")
        .is_some_and(|rest| rest.contains(" generated ") && rest.contains("warning"))
}

/// The crate name a `cargo tree` line names: the first word after the tree
/// glyphs (`├──`, `│`, `└──`) and indentation.
fn crate_name(line: &str) -> Option<&str> {
    line.trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .split_whitespace()
        .next()
}

/// The lines of a `cargo tree` output that name a forbidden crate; an error if
/// the output does not look like `root`'s tree at all.
fn forbidden_lines(tree: &str, root: &str, forbidden: &[&str]) -> Result<Vec<String>, String> {
    let first = tree.lines().find_map(crate_name);
    if first != Some(root) {
        return Err(format!(
            "`cargo tree` output does not start with {root}:\n{tree}"
        ));
    }
    Ok(tree
        .lines()
        .filter(|line| crate_name(line).is_some_and(|name| forbidden.contains(&name)))
        .map(|line| format!("  {}", line.trim_end()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORE_FORBIDDEN: &[&str] = &["tonic", "hyper", "tungstenite", "h2"];

    #[test]
    fn finds_forbidden_crates_by_exact_name() {
        let tree = "\
connector-core v0.1.0 (/work/main/connector-core)
├── bytes v1.10.1
├── hyper-util v0.1.10
│   └── hyper v1.6.0
│       └── h2 v0.4.8
├── tokio-tungstenite v0.28.0
│   └── tungstenite v0.28.0
└── tonic-prost v0.14.0
    └── tonic v0.14.0
";
        let found = forbidden_lines(tree, "connector-core", CORE_FORBIDDEN).expect("valid tree");
        let names: Vec<&str> = found.iter().filter_map(|l| crate_name(l)).collect();
        assert_eq!(names, ["hyper", "h2", "tungstenite", "tonic"]);
        let found = forbidden_lines(tree, "connector-core", WS_CRATES).expect("valid tree");
        let names: Vec<&str> = found.iter().filter_map(|l| crate_name(l)).collect();
        assert_eq!(names, ["tokio-tungstenite", "tungstenite"]);
    }

    #[test]
    fn clean_tree_passes_and_garbage_fails() {
        let tree = "connector-core v0.1.0 (/x)\n├── tokio v1.0.0\n│   └── h2o v1.0.0\n";
        assert_eq!(
            forbidden_lines(tree, "connector-core", CORE_FORBIDDEN),
            Ok(vec![])
        );
        assert!(forbidden_lines(tree, "connector-host", CORE_FORBIDDEN).is_err());
        assert!(forbidden_lines("", "connector-core", CORE_FORBIDDEN).is_err());
        assert!(forbidden_lines("error: something\n", "connector-core", CORE_FORBIDDEN).is_err());
    }

    #[test]
    fn every_one_transport_rule_forbids_the_other_transport() {
        for rule in FEATURE_RULES {
            let other = match rule.features {
                Some("grpc") => WS_CRATES,
                Some("ws") => GRPC_CRATES,
                other => panic!("{}: unexpected features {other:?}", rule.package),
            };
            for name in other {
                assert!(
                    rule.forbidden.contains(name),
                    "{} with {:?} must forbid {name}",
                    rule.package,
                    rule.features
                );
            }
        }
    }

    #[test]
    fn warning_summaries_are_told_from_other_lines() {
        assert!(is_warning_summary(
            "warning: `connector-host` (lib) generated 2 warnings"
        ));
        assert!(is_warning_summary(
            "warning: `connector-testkit` (bin \"testkit-server\") generated 1 warning (run `cargo fix`)"
        ));
        assert!(!is_warning_summary("warning: unused manifest key: foo"));
        assert!(!is_warning_summary("    Checking connector-host v0.1.0"));
    }
}
