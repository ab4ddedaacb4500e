//! The checks behind the fuzz targets, one function per target. Each takes arbitrary bytes,
//! feeds them to a parser that reads outside input, and asserts the parser's properties (no
//! panic, and round trips or invariants where the format has them).
//!
//! The same files are compiled into the main workspace's tests with `#[path]`
//! (`crates/wire/tests/fuzz_corpus.rs`, `crates/mqtt-server/tests/mqtt_fuzz_corpus.rs`,
//! `crates/broker/tests/config_fuzz_corpus.rs`, `crates/chain/tests/chain_fuzz_corpus.rs`), which
//! replay every file of `fuzz/corpus/<target>/` so CI exercises the corpora without a nightly
//! toolchain.
//! Those tests share the replay loop, `corpus.rs`, which is not a module of this library.
#![warn(missing_docs)]

pub mod broker_checks;
pub mod chain_checks;
pub mod mqtt_checks;
pub mod wire_checks;
