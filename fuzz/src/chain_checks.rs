//! Checks of what the chain follower parses from bitcoind (fuzz target `bitcoind_reply`).
//! Depends on `sphinx_chain` and `bitcoin` (a dependency of `sphinx_chain`) only, so
//! `crates/chain/tests/chain_fuzz_corpus.rs` can include it.
//!
//! HTTP itself is hyper's (fuzzed upstream; its bounds are tested in
//! `crates/chain/tests/chain_rpc_hostile.rs`); what is left is the JSON-RPC envelope and the
//! results of the four calls, including block and header decoding and the follower's block check.

use bitcoin::consensus::encode::serialize_hex;
use bitcoin::Network;
use sphinx_chain::follower::check_block;
use sphinx_chain::rpc::{parse_block, parse_block_hash, parse_chain_info, parse_header, parse_reply};

/// The calls, in the order of the input's first byte (modulo 4).
pub const METHODS: [&str; 4] = ["getblockchaininfo", "getblockhash", "getblockheader", "getblock"];

/// `bitcoind_reply`: `method u8 | HTTP status u16 BE | body`, the body as bitcoind's answer to
/// that call. Nothing panics; a header or block that decodes re-encodes to the same hex (so no
/// trailing or ignored data is taken), and a decoded block goes through the follower's checks.
pub fn bitcoind_reply(data: &[u8]) {
    let [m, s0, s1, body @ ..] = data else { return };
    let method = METHODS[usize::from(*m) % METHODS.len()];
    let status = u16::from_be_bytes([*s0, *s1]);
    let Ok(result) = parse_reply(method, status, body) else { return };
    match method {
        "getblockchaininfo" => {
            let _ = parse_chain_info(&result);
        }
        "getblockhash" => {
            if let Ok(h) = parse_block_hash(&result) {
                assert_eq!(Some(h.to_string()), result.as_str().map(str::to_ascii_lowercase));
            }
        }
        "getblockheader" => {
            if let Ok(h) = parse_header(&result) {
                assert_eq!(Some(serialize_hex(&h)), result.as_str().map(str::to_ascii_lowercase));
            }
        }
        _ => {
            if let Ok(b) = parse_block(&result) {
                assert_eq!(Some(serialize_hex(&b)), result.as_str().map(str::to_ascii_lowercase));
                let _ = check_block(&b, Network::Regtest);
            }
        }
    }
}
