//! Stand-in for `bitcoind -regtest` (see docs/chain.md).
