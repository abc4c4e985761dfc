//! The transport-independent conformance suite
//! (`connector_testkit::conformance`) over `WsTransport`. What is specific
//! to WebSocket (sockets, frames, close codes) is in the other files here.

connector_testkit::conformance_suite!(connector_testkit::conformance::Target::websocket());
