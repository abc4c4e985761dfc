//! Running cargo from xtask: where, with which environment, and how a failure
//! is reported.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root: the parent of this crate's directory.
pub(crate) fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// True when running under CI (`CI=true`, as CI sets it).
pub(crate) fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A `cargo` command run from the workspace root. Uses the cargo that started
/// xtask (`$CARGO`) so the toolchain matches; colour is off under CI.
pub(crate) fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(program);
    command.args(args).current_dir(workspace_root());
    if is_ci() {
        command.env("CARGO_TERM_COLOR", "never");
    }
    command
}

/// `cargo fmt --all -- --check`-style text for a command, with the
/// environment variables it sets in front.
pub(crate) fn describe(command: &Command) -> String {
    let mut text = String::new();
    for (key, value) in command.get_envs() {
        if key == "CARGO_TERM_COLOR" {
            continue;
        }
        if let Some(value) = value {
            text.push_str(&format!(
                "{}={} ",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            ));
        }
    }
    text.push_str("cargo");
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&quote(&arg.to_string_lossy()));
    }
    text
}

fn quote(s: &str) -> String {
    if !s.is_empty() && !s.contains([' ', '"', '\'']) {
        s.to_string()
    } else {
        format!("\"{s}\"")
    }
}

/// Runs a command with inherited stdin/stdout/stderr; an error if it cannot
/// start or exits unsuccessfully.
pub(crate) fn run(command: &mut Command) -> Result<(), String> {
    let shown = describe(command);
    println!("$ {shown}");
    let status = command
        .status()
        .map_err(|e| format!("could not start `{shown}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown}` failed ({status})"))
    }
}
