//! Checks of the broker's own parsers (fuzz target `broker_config`). Depends on `sphinx_broker`
//! only, so `crates/broker/tests/config_fuzz_corpus.rs` can include it.

use std::path::Path;

use sphinx_broker::config::Config;

/// `broker_config`: the operator's TOML file (`Config::from_toml`, then `validate`).
pub fn broker_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = Config::from_toml(text, Path::new("fuzz.toml")) {
        let _ = cfg.validate();
    }
}
