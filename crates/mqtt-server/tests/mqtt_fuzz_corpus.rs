//! Replays every file of `fuzz/corpus/mqtt_packet/` through the same checks the fuzz target runs
//! (`fuzz/src/mqtt_checks.rs`, included here), so CI exercises the corpus and every regression
//! input without a nightly toolchain or cargo-fuzz.

#[path = "../../../fuzz/src/mqtt_checks.rs"]
mod mqtt_checks;

#[path = "../../../fuzz/src/corpus.rs"]
mod corpus;

use corpus::replay;

#[test]
fn mqtt_packet_corpus() {
    replay("mqtt_packet", mqtt_checks::mqtt_packet);
}
