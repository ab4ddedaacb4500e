//! Fuzz target `bitcoind_reply`: see `sphinx_fuzz::chain_checks::bitcoind_reply`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sphinx_fuzz::chain_checks::bitcoind_reply(data));
