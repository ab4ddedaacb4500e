//! Replays every file of `fuzz/corpus/broker_config/` through the same check the fuzz target runs
//! (`fuzz/src/broker_checks.rs`, included here), so CI exercises the corpus and every regression
//! input without a nightly toolchain or cargo-fuzz.

#[path = "../../../fuzz/src/broker_checks.rs"]
mod broker_checks;

#[path = "../../../fuzz/src/corpus.rs"]
mod corpus;

use corpus::replay;

#[test]
fn broker_config_corpus() {
    replay("broker_config", broker_checks::broker_config);
}
