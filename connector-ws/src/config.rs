//! [`WsConfig`]: the WebSocket-specific knobs, as data with documented
//! defaults, resolved against the runner's `MultiTransportOptions` once,
//! when the mux is built.

use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::error::WsError;

/// Room for a frame header and control frames (pongs, close) queued beside
/// one full message in the write buffer.
const WRITE_BUFFER_SLACK: usize = 16 * 1024;

/// The smallest read buffer accepted: a WebSocket frame header is at most
/// 14 bytes, but reading in tiny chunks costs a syscall per chunk.
const MIN_READ_BUFFER: usize = 256;

/// WebSocket transport settings beyond `MultiTransportOptions`.
///
/// Defaults are chosen so that thousands of idle sockets stay cheap:
///
/// | field | default |
/// |---|---|
/// | [`read_buffer_size`](Self::read_buffer_size) | 4 KiB (tungstenite's own default is 128 KiB) |
/// | [`write_buffer_size`](Self::write_buffer_size) | 0 (every frame is written at once) |
/// | [`max_write_buffer_size`](Self::max_write_buffer_size) | `None`: one largest message + 16 KiB |
/// | [`max_message_size`](Self::max_message_size) | `None`: `MultiTransportOptions::max_message_size` |
/// | [`max_concurrent_handshakes`](Self::max_concurrent_handshakes) | 64 |
/// | [`ping_interval`](Self::ping_interval) | 20 s |
/// | [`close_timeout`](Self::close_timeout) | 5 s |
/// | [`outbound_capacity`](Self::outbound_capacity) | 32 messages |
///
/// ```
/// use std::time::Duration;
/// use connector_ws::WsConfig;
///
/// let config = WsConfig::default()
///     .max_concurrent_handshakes(16)
///     .ping_interval(Some(Duration::from_secs(10)));
/// assert_eq!(config.read_buffer_size, 4 * 1024);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WsConfig {
    /// Bytes read from the socket at a time; the buffer grows only while a
    /// larger message is being received.
    pub read_buffer_size: usize,
    /// Bytes collected before a write reaches the socket; 0 writes each
    /// frame at once (the transport flushes after every message anyway).
    pub write_buffer_size: usize,
    /// Most bytes queued for a socket that cannot keep up; `None` allows
    /// one largest message plus 16 KiB. Must hold one largest message plus
    /// `write_buffer_size`.
    pub max_write_buffer_size: Option<usize>,
    /// Largest message (and frame) accepted from or sent to the server;
    /// `None` takes `MultiTransportOptions::max_message_size`.
    pub max_message_size: Option<usize>,
    /// TCP + TLS + WebSocket handshakes in progress at once per mux; more
    /// `open` calls wait their turn (the wait does not count against the
    /// connect timeout).
    pub max_concurrent_handshakes: usize,
    /// WebSocket ping period, a keepalive for proxies and NATs; `None`
    /// sends none. The protocol's `heartbeat` runs independently.
    pub ping_interval: Option<Duration>,
    /// How long sending the final close frame may take before the socket is
    /// dropped without it.
    pub close_timeout: Duration,
    /// Messages queued towards one socket before the sender waits.
    pub outbound_capacity: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            read_buffer_size: 4 * 1024,
            write_buffer_size: 0,
            max_write_buffer_size: None,
            max_message_size: None,
            max_concurrent_handshakes: 64,
            ping_interval: Some(Duration::from_secs(20)),
            close_timeout: Duration::from_secs(5),
            outbound_capacity: 32,
        }
    }
}

macro_rules! setter {
    ($name:ident: $ty:ty) => {
        #[doc = concat!("Sets [`", stringify!($name), "`](Self::", stringify!($name), ").")]
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
    };
}

impl WsConfig {
    setter!(read_buffer_size: usize);
    setter!(write_buffer_size: usize);
    setter!(max_write_buffer_size: Option<usize>);
    setter!(max_message_size: Option<usize>);
    setter!(max_concurrent_handshakes: usize);
    setter!(ping_interval: Option<Duration>);
    setter!(close_timeout: Duration);
    setter!(outbound_capacity: usize);

    /// Checks the values against each other and `default_max_message_size`
    /// (the runner's), and builds tungstenite's configuration.
    pub(crate) fn resolve(&self, default_max_message_size: usize) -> Result<Resolved, WsError> {
        let invalid = |m: String| Err(WsError::Config(m));
        let max_message_size = self.max_message_size.unwrap_or(default_max_message_size);
        if max_message_size == 0 {
            return invalid("max_message_size must be more than 0".into());
        }
        if self.read_buffer_size < MIN_READ_BUFFER {
            return invalid(format!(
                "read_buffer_size is {}; use at least {MIN_READ_BUFFER} bytes",
                self.read_buffer_size
            ));
        }
        let needed = max_message_size
            .saturating_add(self.write_buffer_size)
            .saturating_add(WRITE_BUFFER_SLACK);
        let max_write_buffer_size = self.max_write_buffer_size.unwrap_or(needed);
        if max_write_buffer_size < needed {
            return invalid(format!(
                "max_write_buffer_size is {max_write_buffer_size}; it must hold one largest \
                 message plus write_buffer_size plus {WRITE_BUFFER_SLACK} bytes ({needed})"
            ));
        }
        if self.max_concurrent_handshakes == 0 {
            return invalid("max_concurrent_handshakes must be at least 1".into());
        }
        if self.ping_interval.is_some_and(|p| p.is_zero()) {
            return invalid("ping_interval must be more than 0 (use None to send no pings)".into());
        }
        if self.close_timeout.is_zero() {
            return invalid("close_timeout must be more than 0".into());
        }
        if self.outbound_capacity == 0 {
            return invalid("outbound_capacity must be at least 1".into());
        }
        let websocket = WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(self.write_buffer_size)
            .max_write_buffer_size(max_write_buffer_size)
            .max_message_size(Some(max_message_size))
            .max_frame_size(Some(max_message_size));
        Ok(Resolved {
            websocket,
            max_message_size,
            max_concurrent_handshakes: self.max_concurrent_handshakes,
            ping_interval: self.ping_interval,
            close_timeout: self.close_timeout,
            outbound_capacity: self.outbound_capacity,
        })
    }
}

/// A validated [`WsConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resolved {
    pub(crate) websocket: WebSocketConfig,
    pub(crate) max_message_size: usize,
    pub(crate) max_concurrent_handshakes: usize,
    pub(crate) ping_interval: Option<Duration>,
    pub(crate) close_timeout: Duration,
    pub(crate) outbound_capacity: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve() {
        let r = WsConfig::default()
            .resolve(4 << 20)
            .expect("defaults are valid");
        assert_eq!(r.websocket.read_buffer_size, 4096);
        assert_eq!(r.websocket.max_message_size, Some(4 << 20));
        assert_eq!(r.websocket.max_frame_size, Some(4 << 20));
        assert!(r.websocket.max_write_buffer_size > r.websocket.write_buffer_size);
        assert_eq!(r.max_concurrent_handshakes, 64);
    }

    #[test]
    fn invalid_values_are_config_errors() {
        let cases = [
            WsConfig::default().max_concurrent_handshakes(0),
            WsConfig::default().read_buffer_size(0),
            WsConfig::default().max_write_buffer_size(Some(10)),
            WsConfig::default().ping_interval(Some(Duration::ZERO)),
            WsConfig::default().close_timeout(Duration::ZERO),
            WsConfig::default().outbound_capacity(0),
            WsConfig::default().max_message_size(Some(0)),
        ];
        for case in cases {
            let err = case.resolve(4 << 20).expect_err("must be rejected");
            assert!(matches!(err, WsError::Config(_)), "{case:?}: {err}");
        }
    }

    #[test]
    fn explicit_message_size_wins() {
        let r = WsConfig::default()
            .max_message_size(Some(2048))
            .resolve(4 << 20)
            .expect("valid");
        assert_eq!(r.max_message_size, 2048);
    }
}
