//! Chain tracking: follows bitcoind and feeds the signer's VLS chain tracker (see docs/chain.md).

/// Where bitcoind is and how to log in (the `[bitcoind]` table of the broker config).
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitcoindSettings {
    /// JSON-RPC URL, optionally with `user:password@` (e.g. `http://user:pass@127.0.0.1:18443`).
    pub url: Option<String>,
    /// bitcoind's `.cookie` file, used when the URL carries no credentials.
    pub cookie_file: Option<std::path::PathBuf>,
}
