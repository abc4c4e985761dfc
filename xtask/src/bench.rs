//! `cargo xtask bench [--quick|--smoke] [SCENARIO...]`: a dispatcher to the
//! benchmark binary in `examples`, which gets every argument unchanged.

use crate::cmd;

/// The benchmark binary's source; its presence decides whether there is a
/// benchmark to run.
const BENCH_SOURCE: &str = "bench/src/main.rs";

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "-h" || a == "--help") && !bench_exists() {
        println!("usage: cargo xtask bench [--quick|--smoke] [SCENARIO...]");
        return Ok(());
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    if !bench_exists() {
        return if smoke {
            Ok(())
        } else {
            Err(format!(
                "no benchmark to run: {BENCH_SOURCE} does not exist"
            ))
        };
    }
    // The smoke run only proves the benchmark still builds and runs: a debug
    // build reuses what the tests compiled instead of a second, release build.
    let mut command = if smoke {
        cmd::cargo([
            "run",
            "--package",
            "connector-bench",
            "--bin",
            "connector-bench",
            "--",
        ])
    } else {
        cmd::cargo([
            "run",
            "--release",
            "--package",
            "connector-bench",
            "--bin",
            "connector-bench",
            "--",
        ])
    };
    command.args(args);
    cmd::run(&mut command)
}

fn bench_exists() -> bool {
    cmd::workspace_root().join(BENCH_SOURCE).is_file()
}
