//! Fuzz target `token`: see `sphinx_fuzz::wire_checks::token`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sphinx_fuzz::wire_checks::token(data));
