//! Copyable examples of the connector SDK; the code is in `examples/`
//! (`cargo run -p examples --example NAME`), and `tests/` shows how a user
//! tests their own connector against the testkit server.
//!
//! The README's API tour is `examples/api_tour.rs`, compiled with the other
//! examples; `tests/readme.rs` checks the README shows exactly that file.
#![deny(missing_docs)]
