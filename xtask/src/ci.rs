//! `cargo xtask ci`: every check CI runs, in CI's order, stopping at the
//! first failure.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cmd;

/// The steps, in the order they run.
const STEPS: &[(&str, &str)] = &[
    ("fmt", "format (cargo fmt --check)"),
    ("clippy", "lint (cargo clippy -D warnings)"),
    ("test", "tests (cargo test, incl. doc tests)"),
    ("doc", "docs (cargo doc, -D warnings)"),
    ("tree", "connector-core has no transport deps"),
    (
        "features",
        "each transport feature alone: no other transport, builds",
    ),
    ("bench", "bench smoke (cargo xtask bench --smoke)"),
];

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let skip = parse_args(args)?;
    let started = Instant::now();
    let mut results: Vec<(&str, Outcome)> = Vec::new();
    let mut tests = TestCounts::default();
    let mut failure = None;

    for &(name, title) in STEPS {
        if failure.is_some() {
            results.push((name, Outcome::NotRun));
            continue;
        }
        if skip.iter().any(|s| s == name) {
            println!("== {name}: {title} (skipped)");
            results.push((name, Outcome::Skipped));
            continue;
        }
        println!("== {name}: {title}");
        flush();
        let step_start = Instant::now();
        let result = run_step(name, &mut tests);
        let elapsed = step_start.elapsed();
        match result {
            Ok(()) => {
                println!("== {name}: ok in {}", fmt_duration(elapsed));
                results.push((name, Outcome::Ok(elapsed)));
            }
            Err(message) => {
                println!("== {name}: FAILED in {}", fmt_duration(elapsed));
                results.push((name, Outcome::Failed(elapsed)));
                failure = Some(format!("step `{name}` failed: {message}"));
            }
        }
        flush();
    }

    print_summary(&results, started.elapsed());
    if tests.suites > 0 {
        // The plain closing line a CI log reader understands.
        println!(
            "tests: {} passed, {} failed, {} skipped",
            tests.passed, tests.failed, tests.ignored
        );
    }
    flush();
    match failure {
        Some(message) => Err(message),
        None => Ok(()),
    }
}

fn parse_args(args: &[String]) -> Result<Vec<String>, String> {
    let mut skip = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let step = if arg == "--skip" {
            iter.next().ok_or("`--skip` needs a step name")?.to_string()
        } else if let Some(step) = arg.strip_prefix("--skip=") {
            step.to_string()
        } else {
            return Err(format!(
                "unknown argument `{arg}` to `ci` (usage: cargo xtask ci [--skip STEP]...)"
            ));
        };
        if !STEPS.iter().any(|&(name, _)| name == step) {
            let names: Vec<&str> = STEPS.iter().map(|&(name, _)| name).collect();
            return Err(format!(
                "unknown step `{step}` for --skip; steps are: {}",
                names.join(", ")
            ));
        }
        skip.push(step);
    }
    Ok(skip)
}

fn run_step(name: &str, tests: &mut TestCounts) -> Result<(), String> {
    match name {
        "fmt" => {
            let mut command = cmd::cargo(["fmt", "--all", "--", "--check"]);
            if cmd::is_ci() {
                command.args(["--color", "never"]);
            }
            cmd::run(&mut command).map_err(|e| format!("{e}\nrun `cargo fmt --all` to fix"))
        }
        "clippy" => cmd::run(&mut cmd::cargo([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ])),
        "test" => run_tests(tests),
        "doc" => {
            let mut command = cmd::cargo(["doc", "--workspace", "--no-deps", "--all-features"]);
            command.env("RUSTDOCFLAGS", "-D warnings");
            cmd::run(&mut command)
        }
        "tree" => crate::tree::check(),
        "features" => crate::tree::check_features(),
        "bench" => crate::bench::run(&["--smoke".to_string()]),
        other => Err(format!("no such step `{other}`")),
    }
}

/// `cargo test`, its stdout passed through line by line and its
/// `test result:` lines added up.
fn run_tests(tests: &mut TestCounts) -> Result<(), String> {
    let mut command = cmd::cargo(["test", "--workspace", "--all-features"]);
    let shown = cmd::describe(&command);
    println!("$ {shown}");
    flush();
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start `{shown}`: {e}"))?;
    if let Some(stdout) = child.stdout.take() {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        let mut out = std::io::stdout().lock();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    // Best effort: a closed stdout must not hide the test result.
                    let _ = out.write_all(&line);
                    let _ = out.flush();
                    tests.observe(&String::from_utf8_lossy(&line));
                }
                Err(e) => return Err(format!("reading the output of `{shown}`: {e}")),
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for `{shown}`: {e}"))?;
    println!(
        "test summary: {} suites, {} passed, {} failed, {} ignored",
        tests.suites, tests.passed, tests.failed, tests.ignored
    );
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown}` failed ({status})"))
    }
}

/// Totals of libtest's `test result:` lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct TestCounts {
    suites: u64,
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestCounts {
    /// Adds one line of `cargo test` output if it is a `test result:` line,
    /// e.g. `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; ...`.
    fn observe(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result:") else {
            return;
        };
        self.suites += 1;
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            let (Some(count), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Ok(Duration),
    Failed(Duration),
    Skipped,
    NotRun,
}

fn print_summary(results: &[(&str, Outcome)], total: Duration) {
    println!();
    println!("== summary");
    println!("  {:<8} {:<8} {:>9}", "step", "result", "time");
    for (name, outcome) in results {
        let (result, time) = match outcome {
            Outcome::Ok(d) => ("ok", fmt_duration(*d)),
            Outcome::Failed(d) => ("FAILED", fmt_duration(*d)),
            Outcome::Skipped => ("skipped", "-".to_string()),
            Outcome::NotRun => ("not run", "-".to_string()),
        };
        println!("  {name:<8} {result:<8} {time:>9}");
    }
    println!("  {:<8} {:<8} {:>9}", "total", "", fmt_duration(total));
}

fn fmt_duration(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn flush() {
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_test_result_lines() {
        let mut counts = TestCounts::default();
        counts.observe("running 3 tests");
        counts.observe(
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        );
        counts.observe(
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.50s\n",
        );
        assert_eq!(
            counts,
            TestCounts {
                suites: 2,
                passed: 4,
                failed: 2,
                ignored: 1
            }
        );
    }

    #[test]
    fn skip_accepts_known_steps_only() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_args(&args(&["--skip", "test", "--skip=doc"])),
            Ok(vec!["test".to_string(), "doc".to_string()])
        );
        assert!(parse_args(&args(&["--skip", "tests"])).is_err());
        assert!(parse_args(&args(&["--skip"])).is_err());
        assert!(parse_args(&args(&["--verbose"])).is_err());
    }
}
