//! Replays every file of `fuzz/corpus/{mqtt_packet,broker_config}/` through the same checks the
//! fuzz targets run (`fuzz/src/broker_checks.rs`, included here), so CI exercises the corpora and
//! every regression input without a nightly toolchain or cargo-fuzz.

#[path = "../../../fuzz/src/broker_checks.rs"]
mod broker_checks;

#[path = "../../../fuzz/src/corpus.rs"]
mod corpus;

use corpus::replay;

#[test]
fn mqtt_packet_corpus() {
    replay("mqtt_packet", broker_checks::mqtt_packet);
}

#[test]
fn broker_config_corpus() {
    replay("broker_config", broker_checks::broker_config);
}
