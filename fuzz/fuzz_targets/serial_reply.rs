//! Fuzz target `serial_reply`: see `sphinx_fuzz::wire_checks::serial_reply`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sphinx_fuzz::wire_checks::serial_reply(data));
