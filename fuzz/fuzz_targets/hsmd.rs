//! Fuzz target `hsmd`: see `sphinx_fuzz::wire_checks::hsmd`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sphinx_fuzz::wire_checks::hsmd(data));
