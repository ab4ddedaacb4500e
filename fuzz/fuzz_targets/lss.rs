//! Fuzz target `lss`: see `sphinx_fuzz::wire_checks::lss`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sphinx_fuzz::wire_checks::lss(data));
