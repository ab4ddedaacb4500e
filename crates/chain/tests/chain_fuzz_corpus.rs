//! Replays every file of `fuzz/corpus/bitcoind_reply/` through the same check the fuzz target runs
//! (`fuzz/src/chain_checks.rs`, included here), so CI exercises the corpus and every regression
//! input without a nightly toolchain or cargo-fuzz.

#[path = "../../../fuzz/src/chain_checks.rs"]
mod chain_checks;

#[path = "../../../fuzz/src/corpus.rs"]
mod corpus;

use bitcoin::Network;
use corpus::{corpus, replay};
use sphinx_chain::follower::check_block;
use sphinx_chain::rpc::{parse_block, parse_chain_info, parse_header, parse_reply, RpcError};

#[test]
fn bitcoind_reply_corpus() {
    replay("bitcoind_reply", chain_checks::bitcoind_reply);
}

/// The seeds reach past the envelope: the replies decode to what the follower uses (a block that
/// passes its checks, a header, the chain info), and the error seeds are bitcoind's errors.
#[test]
fn bitcoind_reply_seeds_decode() {
    let seed = |name: &str| {
        let (_, data) = corpus("bitcoind_reply")
            .into_iter()
            .find(|(p, _)| p.file_name().is_some_and(|f| f == format!("seed-{name}").as_str()))
            .unwrap_or_else(|| panic!("seed-{name} missing"));
        let method = chain_checks::METHODS[usize::from(data[0]) % 4];
        parse_reply(method, u16::from_be_bytes([data[1], data[2]]), &data[3..])
    };
    let block = parse_block(&seed("block-segwit").unwrap()).unwrap();
    check_block(&block, Network::Regtest).unwrap();
    assert!(block.witness_root().is_some() && block.check_witness_commitment());
    let header = parse_header(&seed("header").unwrap()).unwrap();
    assert_eq!(header, block.header);
    let info = parse_chain_info(&seed("info").unwrap()).unwrap();
    assert_eq!((info.chain.as_str(), info.blocks, info.best), ("regtest", 1, block.block_hash()));
    let info = parse_chain_info(&seed("info-v2").unwrap()).unwrap();
    assert_eq!(info.blocks, 1);
    assert!(matches!(seed("info-warmup"), Err(RpcError::Warmup(_))));
    assert!(matches!(seed("hash-out-of-range"), Err(RpcError::Rpc { code: -8, .. })));
}
