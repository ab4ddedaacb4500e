//! Fuzz target `control`: see `sphinx_fuzz::wire_checks::control`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sphinx_fuzz::wire_checks::control(data));
