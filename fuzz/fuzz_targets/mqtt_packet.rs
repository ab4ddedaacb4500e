//! Fuzz target `mqtt_packet`: see `sphinx_fuzz::mqtt_checks::mqtt_packet`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sphinx_fuzz::mqtt_checks::mqtt_packet(data));
