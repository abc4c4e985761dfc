//! Project automation, run as `cargo xtask <command>` (the alias lives in
//! `.cargo/config.toml`). Standard library only, so it builds in seconds.

use std::process::ExitCode;

mod bench;
mod ci;
mod cmd;
mod tree;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  ci [--skip STEP]...    run every check CI runs, in order, stopping at the first
                         failure; STEP is one of: fmt, clippy, test, doc, tree,
                         features, bench (repeat --skip to skip several)
  bench [--quick|--smoke] [SCENARIO...]
                         run the connector-bench binary (bench/src/main.rs) in
                         release mode; every argument is passed through to it
  tree-check             check that connector-core's normal dependency tree has
                         no tonic, hyper, tungstenite or h2 (and that neither
                         transport crate pulls the other's stack)
  features-check         check connector-testkit and connector-host with only
                         `grpc` or only `ws`: no crate of the other transport
                         in `cargo tree -e normal`, and `cargo check` is clean
  help                   print this message
";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(command) = args.next() else {
        eprint!("{USAGE}");
        return ExitCode::FAILURE;
    };
    let rest: Vec<String> = args.collect();
    let result = match command.as_str() {
        "ci" => ci::run(&rest),
        "bench" => bench::run(&rest),
        "tree-check" => tree::run(&rest),
        "features-check" => tree::run_features(&rest),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: error: {message}");
            ExitCode::FAILURE
        }
    }
}
