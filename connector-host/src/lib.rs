//! The `connector-host` program and the library behind it.
//!
//! Operators run the `connector-host` binary; Rust developers who write their
//! own connectors call this library to get the same program (flags,
//! environment, config file, reload, ops endpoints, shards and fleets) for
//! their connector types.
#![deny(missing_docs)]

#[cfg(all(feature = "grpc", feature = "ws"))]
pub mod fallback;

// Elastic fleets on etcd (`--fleet etcd://HOST:PORT/PREFIX`), documented in
// the module itself: built with the `etcd` feature only, which needs `protoc`
// to compile etcd's protos.
#[cfg(feature = "etcd")]
pub mod fleet;
