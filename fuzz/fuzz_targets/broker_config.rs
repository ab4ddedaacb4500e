//! Fuzz target `broker_config`: see `sphinx_fuzz::broker_checks::broker_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sphinx_fuzz::broker_checks::broker_config(data));
