//! `cargo xtask tree-check`: `connector-core` stays transport-agnostic, so its
//! normal dependency tree must not contain a transport crate.

use std::process::Stdio;

use crate::cmd;

/// Crates `connector-core` must never depend on, directly or not.
const FORBIDDEN: &[&str] = &["tonic", "hyper", "tungstenite", "h2"];

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    if let Some(arg) = args.first() {
        return Err(format!("`tree-check` takes no arguments, got `{arg}`"));
    }
    check()
}

pub(crate) fn check() -> Result<(), String> {
    let mut command = cmd::cargo(["tree", "--package", "connector-core", "--edges", "normal"]);
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
    let offending = forbidden_lines(&tree)?;
    if offending.is_empty() {
        let count = tree.lines().filter(|l| !l.trim().is_empty()).count();
        println!("connector-core: {count} lines in its dependency tree, none of {FORBIDDEN:?}");
        Ok(())
    } else {
        println!("{tree}");
        Err(format!(
            "connector-core depends on transport crates (it must stay sans-IO and \
             transport-agnostic; move the dependency to connector-grpc or connector-ws):\n{}",
            offending.join("\n")
        ))
    }
}

/// The crate name a `cargo tree` line names: the first word after the tree
/// glyphs (`├──`, `│`, `└──`) and indentation.
fn crate_name(line: &str) -> Option<&str> {
    line.trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .split_whitespace()
        .next()
}

/// The lines of a `cargo tree` output that name a forbidden crate; an error if
/// the output does not look like connector-core's tree at all.
fn forbidden_lines(tree: &str) -> Result<Vec<String>, String> {
    let root = tree.lines().find_map(crate_name);
    if root != Some("connector-core") {
        return Err(format!(
            "`cargo tree` output does not start with connector-core:\n{tree}"
        ));
    }
    Ok(tree
        .lines()
        .filter(|line| crate_name(line).is_some_and(|name| FORBIDDEN.contains(&name)))
        .map(|line| format!("  {}", line.trim_end()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let found = forbidden_lines(tree).expect("valid tree");
        let names: Vec<&str> = found.iter().filter_map(|l| crate_name(l)).collect();
        assert_eq!(names, ["hyper", "h2", "tungstenite", "tonic"]);
    }

    #[test]
    fn clean_tree_passes_and_garbage_fails() {
        let tree = "connector-core v0.1.0 (/x)\n├── tokio v1.0.0\n│   └── h2o v1.0.0\n";
        assert_eq!(forbidden_lines(tree), Ok(vec![]));
        assert!(forbidden_lines("").is_err());
        assert!(forbidden_lines("error: something\n").is_err());
    }
}
