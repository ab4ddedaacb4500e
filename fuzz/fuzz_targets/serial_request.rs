//! Fuzz target `serial_request`: see `sphinx_fuzz::wire_checks::serial_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sphinx_fuzz::wire_checks::serial_request(data));
