//! The one error type of the crate.

/// Everything a testkit call can fail with.
///
/// Tests usually `unwrap()` these: each message says what was awaited or
/// missing so the failure explains itself in the test output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// Something awaited did not happen in time; `what` says what was awaited
    /// and what the server saw instead.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What the test waited for.
        what: String,
    },
    /// No live stream (or no live approved stream, for executes) exists for
    /// this registration key. Wait for the registration first
    /// (`TestServer::wait_for_active`).
    #[error("no live registration `{0}` on the test server")]
    NoSuchRegistration(String),
    /// Binding, accepting or writing a file failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Generating certificates or building a TLS configuration failed.
    #[error("tls setup failed: {0}")]
    Tls(String),
    /// The registration has no live `PENDING` stream to approve or reject
    /// (it was approved already, rejected, or never registered).
    #[error("no pending registration `{0}` on the test server")]
    NotPending(String),
    /// A client broke the protocol and the test did not say it expects that
    /// (`TestServer::expect_protocol_errors`): one line per violation.
    #[error("the client broke the protocol: {}", .0.join("; "))]
    ClientProtocolErrors(Vec<String>),
    /// The stream or the engine went away before the awaited message arrived.
    #[error("the stream closed before the awaited message arrived")]
    StreamClosed,
    /// The caller misused the protocol (for example reused an outstanding
    /// `request_id`), or the peer broke it.
    #[error("protocol error: {0}")]
    Protocol(String),
}
