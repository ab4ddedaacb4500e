//! Broker configuration: a plain struct, filled from a TOML file, then environment variables,
//! then command-line flags (each overriding the one before).
//!
//! lightningd starts the broker with only its own flags, so a real deployment configures it with
//! the file (`--config`, `$SPHINX_BROKER_CONFIG`, or `sphinx-broker.toml` in the working
//! directory, which is lightningd's network directory) or the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bitcoin::Network;
use serde::Deserialize;

/// Everything the broker needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// The exact line `lightningd --version` prints (e.g. `v25.12.1`); `--version` echoes it.
    pub cln_version: Option<String>,
    /// The chain lightningd must be on; `hsmd_init` carrying another chain is refused.
    pub network: Network,
    /// Where the broker keeps its state (the pinned signer key).
    pub data_dir: PathBuf,
    /// Embedded MQTT server.
    pub mqtt: MqttSettings,
    /// The request path to the signer.
    pub relay: RelaySettings,
    /// bitcoind to follow; chain tracking is off when no URL is set.
    pub bitcoind: crate::chain::BitcoindSettings,
}

/// Embedded MQTT server settings.
#[derive(Clone, Debug)]
pub struct MqttSettings {
    /// Listen address; loopback by default.
    pub listen: SocketAddr,
    /// Largest accepted MQTT payload.
    pub max_payload: usize,
    /// A login token's timestamp must be within this many seconds of the broker's clock.
    pub token_window: Duration,
}

/// Request path settings.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// Requests that may wait for a signer before callers are pushed back.
    pub queue_capacity: usize,
    /// Requests sent to the signer and not yet answered, at most.
    pub max_inflight: usize,
    /// Longest a request may wait for its reply (queueing included).
    pub request_timeout: Duration,
    /// How often to log that requests are waiting for a signer.
    pub waiting_log_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cln_version: None,
            network: Network::Regtest,
            data_dir: PathBuf::from("sphinx-broker"),
            mqtt: MqttSettings {
                listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
                max_payload: 1024 * 1024,
                token_window: Duration::from_secs(300),
            },
            relay: RelaySettings {
                queue_capacity: 1000,
                max_inflight: 64,
                request_timeout: Duration::from_secs(600),
                waiting_log_interval: Duration::from_secs(10),
            },
            bitcoind: Default::default(),
        }
    }
}

/// The TOML file, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Config::cln_version`].
    pub cln_version: Option<String>,
    /// CLN network name: bitcoin, testnet, testnet4, signet, regtest.
    pub network: Option<String>,
    /// See [`Config::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// `[mqtt]` table.
    #[serde(default)]
    pub mqtt: FileMqtt,
    /// `[relay]` table.
    #[serde(default)]
    pub relay: FileRelay,
    /// `[bitcoind]` table.
    #[serde(default)]
    pub bitcoind: crate::chain::BitcoindSettings,
}

/// `[mqtt]` in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMqtt {
    /// Listen address.
    pub listen: Option<SocketAddr>,
    /// Largest payload, bytes.
    pub max_payload: Option<usize>,
    /// Token window, seconds.
    pub token_window_secs: Option<u64>,
}

/// `[relay]` in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRelay {
    /// Waiting-queue capacity.
    pub queue_capacity: Option<usize>,
    /// In-flight window.
    pub max_inflight: Option<usize>,
    /// Per-request timeout, seconds.
    pub request_timeout_secs: Option<u64>,
}

/// Configuration errors: all fatal at start-up, all say which setting is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        source: toml::de::Error,
    },
    /// A network name CLN would not use.
    #[error("unknown network {0:?} (expected bitcoin, testnet, testnet4, signet or regtest)")]
    Network(String),
    /// A numeric setting out of range.
    #[error("invalid setting {0}: {1}")]
    Invalid(&'static str, String),
}

/// Parses a CLN network name.
pub fn parse_network(s: &str) -> Result<Network, ConfigError> {
    match s {
        "bitcoin" | "mainnet" => Ok(Network::Bitcoin),
        "testnet" => Ok(Network::Testnet),
        "testnet4" => Ok(Network::Testnet4),
        "signet" => Ok(Network::Signet),
        "regtest" => Ok(Network::Regtest),
        other => Err(ConfigError::Network(other.to_string())),
    }
}

impl Config {
    /// Applies a TOML document over `self`.
    pub fn merge_toml(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let f: FileConfig =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })?;
        if let Some(v) = f.cln_version {
            self.cln_version = Some(v);
        }
        if let Some(n) = f.network {
            self.network = parse_network(&n)?;
        }
        if let Some(d) = f.data_dir {
            self.data_dir = d;
        }
        if let Some(l) = f.mqtt.listen {
            self.mqtt.listen = l;
        }
        if let Some(m) = f.mqtt.max_payload {
            self.mqtt.max_payload = m;
        }
        if let Some(w) = f.mqtt.token_window_secs {
            self.mqtt.token_window = Duration::from_secs(w);
        }
        if let Some(q) = f.relay.queue_capacity {
            self.relay.queue_capacity = q;
        }
        if let Some(q) = f.relay.max_inflight {
            self.relay.max_inflight = q;
        }
        if let Some(t) = f.relay.request_timeout_secs {
            self.relay.request_timeout = Duration::from_secs(t);
        }
        if f.bitcoind.url.is_some() {
            self.bitcoind.url = f.bitcoind.url;
        }
        if f.bitcoind.cookie_file.is_some() {
            self.bitcoind.cookie_file = f.bitcoind.cookie_file;
        }
        Ok(())
    }

    /// Reads and applies a TOML file.
    pub fn merge_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        self.merge_toml(&text, path)
    }

    /// Rejects values the broker cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.relay.queue_capacity == 0 {
            return Err(ConfigError::Invalid("relay.queue_capacity", "must be at least 1".into()));
        }
        if self.relay.max_inflight == 0 || self.relay.max_inflight > 30000 {
            return Err(ConfigError::Invalid("relay.max_inflight", "must be 1..=30000 (u16 sequence space)".into()));
        }
        if self.relay.request_timeout.is_zero() {
            return Err(ConfigError::Invalid("relay.request_timeout_secs", "must be positive".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let mut c = Config::default();
        c.merge_toml(
            "cln_version = \"v25.12.1\"\nnetwork = \"testnet\"\n[mqtt]\nlisten = \"0.0.0.0:8883\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.cln_version.as_deref(), Some("v25.12.1"));
        assert_eq!(c.network, Network::Testnet);
        assert_eq!(c.mqtt.listen.port(), 8883);
        assert!(c.merge_toml("bogus = 1\n", Path::new("x.toml")).is_err());
        assert!(c.merge_toml("network = \"mars\"\n", Path::new("x.toml")).is_err());
    }
}
