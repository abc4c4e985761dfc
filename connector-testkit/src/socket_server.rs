//! The socket server both front-ends ([`crate::GrpcTestServer`],
//! [`crate::WsTestServer`]) are: a listener on an address that stays the
//! same across restarts, the accept loop, the registry of live
//! connections, and the stop / restart lifecycle. A front-end adds only
//! what it does with each accepted connection ([`Serve`]) and its public
//! methods, most of them written once by [`socket_front_end!`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::conn::{accept_loop, bind_retry, ConnRegistry, ConnectionInfo, ServerIo};
use crate::engine::TestServer;
use crate::error::TestkitError;
use crate::tls::TestCertificate;

/// How long `stop` waits for a front-end's own server task to wind down
/// after every connection was killed, before aborting it.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes each accepted connection (after the TLS handshake, if any).
pub(crate) type OnConn = Arc<dyn Fn(ServerIo) + Send + Sync>;

/// What a front-end runs from one start (or restart) to the next stop.
pub(crate) struct Serving {
    /// Where the accept loop hands each connection.
    pub(crate) on_conn: OnConn,
    /// The front-end's own server task, if it has one (tonic's), which
    /// ends once the run's shutdown token is cancelled. `stop` waits
    /// [`STOP_TIMEOUT`] for it, then aborts it.
    pub(crate) task: Option<JoinHandle<()>>,
}

/// Starts one run of a front-end, given the engine, the registry and the
/// run's shutdown token. Called at start and at every restart.
pub(crate) type Serve =
    Box<dyn Fn(&TestServer, &Arc<ConnRegistry>, CancellationToken) -> Serving + Send + Sync>;

/// Where and how a front-end listens.
pub(crate) struct Listen<'a> {
    /// `None`: `127.0.0.1:0`.
    pub(crate) bind: Option<SocketAddr>,
    /// Serve TLS with this certificate.
    pub(crate) tls: Option<&'a TestCertificate>,
    /// With `tls`: the ALPN protocols offered.
    pub(crate) alpn: &'a [&'a [u8]],
    /// With `tls`: refuse clients without a certificate from the test CA.
    pub(crate) require_client_cert: bool,
    /// URL schemes without and with TLS (`grpc`/`grpcs`, `ws`/`wss`).
    pub(crate) schemes: (&'static str, &'static str),
    /// The protocol's name in messages (`gRPC`, `WebSocket`).
    pub(crate) protocol: &'static str,
}

/// One front-end's socket server. Dropping it stops accepting and kills
/// every connection.
pub(crate) struct SocketServer {
    engine: TestServer,
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    schemes: (&'static str, &'static str),
    protocol: &'static str,
    registry: Arc<ConnRegistry>,
    serve: Serve,
    running: Mutex<Option<Run>>,
    /// Serialises stop/restart so two of them never interleave.
    lifecycle: tokio::sync::Mutex<()>,
}

struct Run {
    shutdown: CancellationToken,
    accept: JoinHandle<()>,
    task: Option<JoinHandle<()>>,
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        let running = self
            .running
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(r) = running {
            r.shutdown.cancel();
        }
        self.registry.kill_all();
    }
}

impl SocketServer {
    /// Binds `listen.bind` (or `127.0.0.1:0`) and starts the first run.
    pub(crate) async fn start(
        engine: TestServer,
        listen: Listen<'_>,
        serve: Serve,
    ) -> Result<Arc<SocketServer>, TestkitError> {
        let tls = match listen.tls {
            Some(cert) => Some(TlsAcceptor::from(
                cert.server_config(listen.alpn, listen.require_client_cert)?,
            )),
            None => None,
        };
        let bind = listen
            .bind
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let listener = TcpListener::bind(bind).await?;
        let server = Arc::new(SocketServer {
            engine,
            addr: listener.local_addr()?,
            tls,
            schemes: listen.schemes,
            protocol: listen.protocol,
            registry: ConnRegistry::new(),
            serve,
            running: Mutex::new(None),
            lifecycle: tokio::sync::Mutex::new(()),
        });
        server.run(listener);
        Ok(server)
    }

    fn running(&self) -> MutexGuard<'_, Option<Run>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn run(&self, listener: TcpListener) {
        let shutdown = CancellationToken::new();
        let Serving { on_conn, task } =
            (self.serve)(&self.engine, &self.registry, shutdown.clone());
        let accept = tokio::spawn(accept_loop(
            listener,
            self.engine.clone(),
            Arc::clone(&self.registry),
            self.tls.clone(),
            shutdown.clone(),
            on_conn,
        ));
        *self.running() = Some(Run {
            shutdown,
            accept,
            task,
        });
    }

    pub(crate) fn engine(&self) -> &TestServer {
        &self.engine
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `PLAIN://127.0.0.1:PORT`, or with TLS `SECURE://localhost:PORT`
    /// (the name the test certificate is issued for).
    pub(crate) fn url(&self) -> String {
        let (plain, secure) = self.schemes;
        match self.tls {
            Some(_) => format!("{secure}://localhost:{}", self.addr.port()),
            None => format!("{plain}://{}", self.addr),
        }
    }

    pub(crate) fn connections(&self) -> Vec<ConnectionInfo> {
        self.registry.list()
    }

    pub(crate) fn connection_count(&self) -> usize {
        self.registry.count()
    }

    pub(crate) fn total_connections_accepted(&self) -> u64 {
        self.registry.accepted()
    }

    pub(crate) async fn wait_for_connection_count(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<(), TestkitError> {
        let protocol = self.protocol;
        self.registry
            .wait_until(
                timeout,
                || format!("{n} live {protocol} connections"),
                |c| c.len() == n,
            )
            .await
    }

    pub(crate) fn kill_connection(&self, connection_id: u64) -> bool {
        self.registry.kill(connection_id)
    }

    pub(crate) fn kill_all_connections(&self) -> usize {
        self.registry.kill_all()
    }

    pub(crate) async fn stop(&self) {
        let _lifecycle = self.lifecycle.lock().await;
        self.stop_locked().await;
    }

    async fn stop_locked(&self) {
        let running = self.running().take();
        let Some(r) = running else {
            self.registry.kill_all();
            return;
        };
        r.shutdown.cancel();
        // The accept task owns the listener: once it returns the port is free.
        let _ = r.accept.await;
        self.registry.kill_all();
        if let Some(mut task) = r.task {
            if tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err() {
                let protocol = self.protocol;
                tracing::warn!(
                    "testkit {protocol} server did not stop in {STOP_TIMEOUT:?}; aborting it"
                );
                task.abort();
            }
        }
    }

    pub(crate) async fn restart(&self) -> Result<(), TestkitError> {
        let _lifecycle = self.lifecycle.lock().await;
        self.stop_locked().await;
        let listener = bind_retry(self.addr).await?;
        self.run(listener);
        Ok(())
    }
}

/// The public methods a front-end (a struct with a `core: Arc<SocketServer>`
/// field) shares with the other, written once: `addr`, `engine`, `url`,
/// `connections`, `connection_count`, `total_connections_accepted`,
/// `wait_for_connection_count`, `kill_connection`, `kill_all_connections`,
/// `stop`, `restart`, and a `Debug` that shows the URL and the live
/// connection count. The front-end gives the docs of the four whose
/// meaning differs between the protocols, each above its name.
macro_rules! socket_front_end {
    (
        $ty:ident;
        $(#[$url:meta])* url;
        $(#[$connections:meta])* connections;
        $(#[$kill:meta])* kill_connection;
        $(#[$stop:meta])* stop;
    ) => {
        impl ::std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    .field("url", &self.url())
                    .field("connections", &self.connection_count())
                    .finish_non_exhaustive()
            }
        }

        impl $ty {
            /// The bound address (the same across restarts).
            pub fn addr(&self) -> ::std::net::SocketAddr {
                self.core.addr()
            }

            /// The engine behind the server.
            pub fn engine(&self) -> &$crate::TestServer {
                self.core.engine()
            }

            $(#[$url])*
            pub fn url(&self) -> String {
                self.core.url()
            }

            $(#[$connections])*
            pub fn connections(&self) -> Vec<$crate::ConnectionInfo> {
                self.core.connections()
            }

            $(#[$kill])*
            pub fn kill_connection(&self, connection_id: u64) -> bool {
                self.core.kill_connection(connection_id)
            }

            $(#[$stop])*
            pub async fn stop(&self) {
                self.core.stop().await;
            }

            /// Number of live TCP connections.
            pub fn connection_count(&self) -> usize {
                self.core.connection_count()
            }

            /// TCP connections accepted since start (across restarts).
            pub fn total_connections_accepted(&self) -> u64 {
                self.core.total_connections_accepted()
            }

            /// Waits until exactly `n` TCP connections are live (connections
            /// close asynchronously after a kill or a client drop).
            pub async fn wait_for_connection_count(
                &self,
                n: usize,
                timeout: ::std::time::Duration,
            ) -> Result<(), $crate::TestkitError> {
                self.core.wait_for_connection_count(n, timeout).await
            }

            /// Breaks every live connection; returns how many.
            pub fn kill_all_connections(&self) -> usize {
                self.core.kill_all_connections()
            }

            /// Stops, then serves again on the same port (a control-plane
            /// restart). The engine and its state (session tokens,
            /// counters) survive.
            pub async fn restart(&self) -> Result<(), $crate::TestkitError> {
                self.core.restart().await
            }
        }
    };
}
pub(crate) use socket_front_end;

/// The option setters both front-ends' options (structs with `tls`,
/// `require_client_cert` and `bind` fields) have, written once.
macro_rules! listen_option_setters {
    ($ty:ident) => {
        impl $ty {
            #[doc = concat!("Sets [`", stringify!($ty), "::tls`].")]
            pub fn tls(mut self, cert: $crate::TestCertificate) -> Self {
                self.tls = Some(cert);
                self
            }

            #[doc = concat!("Sets [`", stringify!($ty), "::require_client_cert`].")]
            pub fn require_client_cert(mut self, on: bool) -> Self {
                self.require_client_cert = on;
                self
            }

            #[doc = concat!("Sets [`", stringify!($ty), "::bind`].")]
            pub fn bind(mut self, addr: ::std::net::SocketAddr) -> Self {
                self.bind = Some(addr);
                self
            }
        }
    };
}
pub(crate) use listen_option_setters;
