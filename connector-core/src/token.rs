//! Where a registration's auth token comes from: a [`TokenSource`] asked
//! before every `register`, so a credential that rotates (a Kubernetes
//! projected service-account token rewritten on disk, a short-lived JWT
//! minted again) is picked up by the next registration without a restart.
//!
//! The state machine stays sans-IO: it asks for a token
//! ([`crate::Action::FetchToken`]), the driver awaits the source and hands
//! the answer back ([`crate::Registration::handle_token`]).

use std::fmt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::config::Secret;
use crate::error::ConnectorError;

/// Gives the auth token for the next `register`.
///
/// Called before every `register` of a registration configured with it
/// ([`crate::ConnectorConfigBuilder::token_source`]): the first, every
/// reconnect, the retry after `SESSION_EXPIRED`, and once more after an
/// `INVALID_CREDENTIALS` (a token that changed since is retried once). A
/// source may cache; it should answer quickly (the call is bounded by the
/// connect timeout and counts as a failed attempt when it runs over).
///
/// An error ([`ConnectorError::Token`]) is that registration's failed
/// attempt: it backs off and asks again; other registrations carry on.
/// Neither the error nor `Debug` may contain the token: both reach logs.
#[async_trait]
pub trait TokenSource: Send + Sync + fmt::Debug + 'static {
    /// The token to send now.
    async fn token(&self) -> Result<Secret, ConnectorError>;
}

/// A token that never changes.
#[derive(Debug, Clone)]
pub struct FixedToken(Secret);

impl FixedToken {
    /// A source that always gives `token`.
    pub fn new(token: impl Into<String>) -> Self {
        Self(Secret::new(token))
    }
}

#[async_trait]
impl TokenSource for FixedToken {
    async fn token(&self) -> Result<Secret, ConnectorError> {
        Ok(self.0.clone())
    }
}

/// A token read from an environment variable at every call (a variable
/// that is not set, or not UTF-8, is an error naming it).
#[derive(Debug, Clone)]
pub struct EnvToken {
    name: String,
}

impl EnvToken {
    /// A source that reads the variable `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    /// The variable's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[async_trait]
impl TokenSource for EnvToken {
    async fn token(&self) -> Result<Secret, ConnectorError> {
        match std::env::var(&self.name) {
            Ok(v) => Ok(Secret::new(v)),
            Err(std::env::VarError::NotPresent) => Err(ConnectorError::Token(format!(
                "environment variable {} is not set",
                self.name
            ))),
            Err(std::env::VarError::NotUnicode(_)) => Err(ConnectorError::Token(format!(
                "environment variable {} is not valid UTF-8",
                self.name
            ))),
        }
    }
}

/// A token read from a file at every call, surrounding whitespace trimmed.
///
/// Reading a small file is a few system calls, cheaper than any
/// change-detection that can be fooled (an mtime that does not move when a
/// file is rewritten within its granularity), and it follows the symlink
/// swap Kubernetes uses for projected volumes. An empty file is an error
/// (a writer that truncates before it writes is caught mid-rewrite): the
/// attempt backs off and reads again.
#[derive(Debug, Clone)]
pub struct FileToken {
    path: PathBuf,
}

impl FileToken {
    /// A source that reads `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One read, synchronously (for a start-up check).
    pub fn read_now(&self) -> Result<Secret, ConnectorError> {
        read_token_file(&self.path)
    }
}

fn read_token_file(path: &Path) -> Result<Secret, ConnectorError> {
    // The io error names the failure (not found, permission denied); the
    // file's content never appears in it.
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConnectorError::Token(format!("token file {}: cannot read: {e}", path.display()))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ConnectorError::Token(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(token))
}

#[async_trait]
impl TokenSource for FileToken {
    async fn token(&self) -> Result<Secret, ConnectorError> {
        let path = self.path.clone();
        match tokio::task::spawn_blocking(move || read_token_file(&path)).await {
            Ok(result) => result,
            // No blocking pool (the runtime is shutting down): read here.
            Err(_) => read_token_file(&self.path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_token_follows_rewrites_and_never_shows_the_token() {
        let dir = std::env::temp_dir().join(format!("ct-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("token");
        std::fs::write(&path, "  first-token\n").expect("write");
        let source = FileToken::new(&path);
        assert_eq!(source.token().await.expect("token").expose(), "first-token");
        // Same length, same second: still seen.
        std::fs::write(&path, "  secnd-token\n").expect("write");
        assert_eq!(source.token().await.expect("token").expose(), "secnd-token");
        std::fs::write(&path, "\n").expect("write");
        let e = source.token().await.expect_err("empty file is an error");
        assert!(e.to_string().contains("is empty"), "{e}");
        std::fs::remove_file(&path).expect("rm");
        let e = source.token().await.expect_err("missing file");
        let text = format!("{e} {e:?} {source:?}");
        assert!(text.contains("cannot read"), "{text}");
        assert!(!text.contains("secnd-token") && !text.contains("first-token"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn env_token_names_a_missing_variable() {
        let e = EnvToken::new("CONNECTOR_CORE_TEST_SURELY_UNSET_VAR")
            .token()
            .await
            .expect_err("unset");
        assert!(e
            .to_string()
            .contains("CONNECTOR_CORE_TEST_SURELY_UNSET_VAR is not set"));
        assert_eq!(
            FixedToken::new("x").token().await.expect("fixed").expose(),
            "x"
        );
        assert_eq!(
            format!("{:?}", FixedToken::new("hunter2")),
            "FixedToken(<redacted>)"
        );
    }
}
