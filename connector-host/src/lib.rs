//! The `connector-host` program and the library behind it.
//!
//! Operators run the `connector-host` binary; Rust developers who write their
//! own connectors call this library to get the same program (flags,
//! environment, config file, SIGHUP reload, ops endpoints, shards, fleets,
//! live status) for their connector types:
//!
//! ```no_run
//! # use connector_host::{ConnectorTypes, EchoConnector};
//! fn main() -> std::process::ExitCode {
//!     // One factory per connector type name the config file may name.
//!     let types = ConnectorTypes::new().with("echo", |_key| EchoConnector::new());
//!     connector_host::main(types)
//! }
//! ```
//!
//! [`main`] parses the flags of `connector-host-cli.md` (each also from its
//! `CONNECTOR_HOST_*` variable) and the `--config` file of
//! `connector-host-config.md`, runs until SIGINT/SIGTERM (or
//! `--duration-secs`), and returns the exit code: 0 after a graceful stop,
//! 1 when the run failed, 2 for a configuration error (printed as one line).
//!
//! Cargo features: `grpc` and `ws` (both default) pick the transports built
//! in; a build with one of them has none of the other's crates. `etcd` adds
//! elastic fleets (`--fleet etcd://HOST:PORT/PREFIX`, module `fleet`): the
//! replicas alive in etcd share the registration list, each hosting the
//! share it owns; without it `--fleet` is a configuration error (exit 2)
//! saying how to build it.
#![deny(missing_docs)]

#[cfg(all(feature = "grpc", feature = "ws"))]
pub mod fallback;

// Elastic fleets on etcd (`--fleet etcd://HOST:PORT/PREFIX`), documented in
// the module itself: built with the `etcd` feature only, which needs `protoc`
// to compile etcd's protos.
#[cfg(feature = "etcd")]
pub mod fleet;

#[cfg(not(any(feature = "grpc", feature = "ws")))]
compile_error!("connector-host needs at least one of the `grpc` and `ws` features");

mod app;
mod cli;
mod config;
mod demo;
mod echo;
mod hosting;
mod ops;
mod otel;
mod status;
mod summary;
mod transport;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::sync::Arc;

use connector_core::{BaseConnector, RegistrationKey};

pub use echo::EchoConnector;
pub use summary::{render_summary, SummaryRow};
pub use transport::{transport_for, HostTransport};

/// Makes the connector value for one registration of a type.
type Factory = Arc<dyn Fn(&RegistrationKey) -> Arc<dyn BaseConnector> + Send + Sync>;

/// The connector types a host knows, by type name: the `connector_type` of
/// a `[[registration]]` (or `--connector-type`) picks the factory that makes
/// each registration's connector.
#[derive(Clone, Default)]
pub struct ConnectorTypes {
    factories: BTreeMap<String, Factory>,
    /// For `--connector-type NAME` (flags, not the config file) with a name
    /// not in `factories`: the `connector-host` binary hosts echo connectors
    /// under any type name its flags give.
    any_flag_type: Option<Factory>,
}

impl fmt::Debug for ConnectorTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.factories.keys()).finish()
    }
}

impl ConnectorTypes {
    /// No types yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The types of the `connector-host` binary: `echo` ([`EchoConnector`]).
    ///
    /// With flags (no `--config`), `--connector-type NAME` hosts echo
    /// connectors under any type name, as the CLI contract has it.
    pub fn echo() -> Self {
        let mut types = Self::new().with("echo", |_| EchoConnector::new());
        types.any_flag_type = Some(Arc::new(|_key: &RegistrationKey| {
            Arc::new(EchoConnector::new()) as Arc<dyn BaseConnector>
        }));
        types
    }

    /// Adds (or replaces) type `name`: `factory` is called once for every
    /// registration of that type as it is added (also again when it is
    /// re-registered after a reload), with its key.
    pub fn with<C, F>(mut self, name: impl Into<String>, factory: F) -> Self
    where
        C: BaseConnector,
        F: Fn(&RegistrationKey) -> C + Send + Sync + 'static,
    {
        self.factories.insert(
            name.into(),
            Arc::new(move |key| Arc::new(factory(key)) as Arc<dyn BaseConnector>),
        );
        self
    }

    /// Adds type `name` served by one shared connector value.
    pub fn with_shared(
        mut self,
        name: impl Into<String>,
        connector: Arc<dyn BaseConnector>,
    ) -> Self {
        self.factories
            .insert(name.into(), Arc::new(move |_| connector.clone()));
        self
    }

    /// The type names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }

    /// Whether `--connector-type name` can be hosted.
    pub(crate) fn flag_type_known(&self, name: &str) -> bool {
        self.factories.contains_key(name) || self.any_flag_type.is_some()
    }

    pub(crate) fn make(&self, key: &RegistrationKey) -> Option<Arc<dyn BaseConnector>> {
        match self.factories.get(key.connector_type()) {
            Some(f) => Some(f(key)),
            None => self.any_flag_type.as_ref().map(|f| f(key)),
        }
    }
}

/// The whole program: parses the process's arguments and environment,
/// installs logging on stderr, runs on a new multi-threaded runtime until
/// SIGINT/SIGTERM or `--duration-secs`, and returns the exit code.
pub fn main(types: ConnectorTypes) -> std::process::ExitCode {
    app::main(types, std::env::args_os().collect())
}

/// As [`main`], with the arguments given (the first is the program name).
pub fn main_with_args(
    types: ConnectorTypes,
    args: impl IntoIterator<Item = impl Into<OsString>>,
) -> std::process::ExitCode {
    app::main(types, args.into_iter().map(Into::into).collect())
}

/// As [`main_with_args`], on the caller's tokio runtime, stopping gracefully
/// also when `stop` resolves (as on SIGTERM). Logging is installed only if
/// no global `tracing` subscriber is set yet. For embedding the host in a
/// larger program, or running it in a test.
pub async fn run_until(
    types: ConnectorTypes,
    args: impl IntoIterator<Item = impl Into<OsString>>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::process::ExitCode {
    app::run_until(
        types,
        args.into_iter().map(Into::into).collect(),
        Box::pin(stop),
    )
    .await
}
