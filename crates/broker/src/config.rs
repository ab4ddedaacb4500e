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
    /// The signer's node id, if the operator knows it (`sphinx-key node-id`): pinned at start, so
    /// no other key can log in even before the first `hsmd_init` (no trust on first use).
    pub signer_node_id: Option<String>,
    /// Embedded MQTT server.
    pub mqtt: MqttSettings,
    /// The request path to the signer.
    pub relay: RelaySettings,
    /// bitcoind to follow; chain tracking is off when no URL is set.
    pub bitcoind: sphinx_chain::BitcoindSettings,
    /// The operator HTTP API (off unless `api.listen` is set).
    pub api: ApiSettings,
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
    /// TLS certificate chain (PEM); with [`MqttSettings::tls_key`], MQTT is served over TLS.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM); set both or neither.
    pub tls_key: Option<PathBuf>,
    /// Allow plaintext MQTT on a non-loopback address (off: such a listener is refused).
    pub allow_plaintext_non_loopback: bool,
}

/// The operator HTTP API (see docs/api.md).
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// Listen address; `None` (the default) = no API.
    pub listen: Option<SocketAddr>,
    /// Allow a listen address that is not loopback (off by default).
    pub allow_non_loopback: bool,
    /// The bearer token every request must carry (required when the API is enabled).
    pub token: Option<ApiToken>,
    /// A file holding the token (read by [`Config::load_api_token`]).
    pub token_file: Option<PathBuf>,
    /// Longest a control call waits for the signer's response (then 504).
    pub control_timeout: Duration,
    /// Events buffered per `/v1/events` subscriber before it starts losing them.
    pub event_capacity: usize,
}

/// Shortest accepted API token, in characters.
pub const MIN_API_TOKEN_LEN: usize = 16;
/// Longest accepted API token, in characters.
pub const MAX_API_TOKEN_LEN: usize = 1024;

/// The API's bearer token. Its `Debug` never shows it; comparison is in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

impl ApiToken {
    /// A token of [`MIN_API_TOKEN_LEN`]..=[`MAX_API_TOKEN_LEN`] visible ASCII characters (no
    /// spaces), so that it fits an `Authorization: Bearer` header as is.
    pub fn new(token: &str) -> Result<ApiToken, ConfigError> {
        if token.len() < MIN_API_TOKEN_LEN {
            return Err(ConfigError::Invalid(
                "api.token",
                format!(
                    "too short ({} characters): use at least {MIN_API_TOKEN_LEN}, e.g. `openssl rand -hex 32`",
                    token.len()
                ),
            ));
        }
        if token.len() > MAX_API_TOKEN_LEN {
            return Err(ConfigError::Invalid("api.token", format!("longer than {MAX_API_TOKEN_LEN} characters")));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::Invalid("api.token", "must be visible ASCII characters without spaces".into()));
        }
        Ok(ApiToken(token.to_string()))
    }

    /// Is `offered` this token? Compares SHA-256 digests in constant time, so neither the
    /// content nor the length of the token leaks through timing.
    pub fn matches(&self, offered: &[u8]) -> bool {
        use bitcoin::hashes::{sha256, Hash};
        let a = sha256::Hash::hash(self.0.as_bytes()).to_byte_array();
        let b = sha256::Hash::hash(offered).to_byte_array();
        let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            listen: None,
            allow_non_loopback: false,
            token: None,
            token_file: None,
            control_timeout: Duration::from_secs(10),
            event_capacity: 256,
        }
    }
}

impl ApiSettings {
    /// Sets the token inline (replacing a token file set earlier).
    pub fn set_token(&mut self, token: &str) -> Result<(), ConfigError> {
        self.token = Some(ApiToken::new(token)?);
        self.token_file = None;
        Ok(())
    }

    /// Sets the token file (replacing an inline token set earlier); read by
    /// [`Config::load_api_token`].
    pub fn set_token_file(&mut self, path: PathBuf) {
        self.token_file = Some(path);
        self.token = None;
    }

    /// Rejects an enabled API without a token, on a non-loopback address without
    /// `allow_non_loopback`, or with zero bounds. A disabled API is always fine.
    pub fn check(&self) -> Result<(), ConfigError> {
        let Some(listen) = self.listen else { return Ok(()) };
        if self.token.is_none() {
            return Err(ConfigError::Invalid(
                "api.token",
                format!(
                    "the API is enabled (api.listen = {listen}) but no token is set: set [api] token_file (or token), \
                     SPHINX_BROKER_API_TOKEN_FILE or SPHINX_BROKER_API_TOKEN, at least {MIN_API_TOKEN_LEN} characters"
                ),
            ));
        }
        if !sphinx_mqtt_server::is_loopback(listen.ip()) && !self.allow_non_loopback {
            return Err(ConfigError::Invalid(
                "api.listen",
                format!(
                    "{listen} is not a loopback address; the API is plain HTTP and controls the signer: listen on \
                     127.0.0.1/::1 (and use an SSH tunnel or a TLS proxy), or set api.allow_non_loopback = true"
                ),
            ));
        }
        if self.control_timeout.is_zero() {
            return Err(ConfigError::Invalid("api.control_timeout_secs", "must be positive".into()));
        }
        if self.event_capacity == 0 {
            return Err(ConfigError::Invalid("api.event_capacity", "must be at least 1".into()));
        }
        Ok(())
    }
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
            signer_node_id: None,
            mqtt: MqttSettings {
                listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
                max_payload: 1024 * 1024,
                token_window: Duration::from_secs(300),
                tls_cert: None,
                tls_key: None,
                allow_plaintext_non_loopback: false,
            },
            relay: RelaySettings {
                queue_capacity: 1000,
                max_inflight: 64,
                request_timeout: Duration::from_secs(600),
                waiting_log_interval: Duration::from_secs(10),
            },
            bitcoind: Default::default(),
            api: ApiSettings::default(),
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
    /// See [`Config::signer_node_id`].
    pub signer_node_id: Option<String>,
    /// `[mqtt]` table.
    #[serde(default)]
    pub mqtt: FileMqtt,
    /// `[relay]` table.
    #[serde(default)]
    pub relay: FileRelay,
    /// `[bitcoind]` table.
    #[serde(default)]
    pub bitcoind: sphinx_chain::BitcoindSettings,
    /// `[api]` table.
    #[serde(default)]
    pub api: FileApi,
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
    /// TLS certificate chain, PEM.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key, PEM.
    pub tls_key: Option<PathBuf>,
    /// Allow plaintext on a non-loopback address.
    pub allow_plaintext_non_loopback: Option<bool>,
}

/// `[api]` in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApi {
    /// Listen address (the API is off without one).
    pub listen: Option<SocketAddr>,
    /// Allow a non-loopback listen address.
    pub allow_non_loopback: Option<bool>,
    /// Bearer token, inline (prefer `token_file`).
    pub token: Option<String>,
    /// File holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// Control call bound, seconds.
    pub control_timeout_secs: Option<u64>,
    /// Events buffered per subscriber.
    pub event_capacity: Option<usize>,
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
        if let Some(id) = f.signer_node_id {
            self.signer_node_id = Some(id);
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
        if f.mqtt.tls_cert.is_some() {
            self.mqtt.tls_cert = f.mqtt.tls_cert;
        }
        if f.mqtt.tls_key.is_some() {
            self.mqtt.tls_key = f.mqtt.tls_key;
        }
        if let Some(b) = f.mqtt.allow_plaintext_non_loopback {
            self.mqtt.allow_plaintext_non_loopback = b;
        }
        if let Some(l) = f.api.listen {
            self.api.listen = Some(l);
        }
        if let Some(b) = f.api.allow_non_loopback {
            self.api.allow_non_loopback = b;
        }
        match (f.api.token, f.api.token_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid("api.token", "set token or token_file, not both".into()));
            }
            (Some(t), None) => self.api.set_token(&t)?,
            (None, Some(p)) => self.api.set_token_file(p),
            (None, None) => {}
        }
        if let Some(t) = f.api.control_timeout_secs {
            self.api.control_timeout = Duration::from_secs(t);
        }
        if let Some(c) = f.api.event_capacity {
            self.api.event_capacity = c;
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
        self.merge_toml(&text, path)?;
        if self.api.token.is_some() && self.api.token_file.is_none() {
            use std::os::unix::fs::PermissionsExt;
            if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
                tracing::warn!(
                    path = %path.display(),
                    "the config file holds the API token and is readable by group or others; chmod 600 it or use token_file"
                );
            }
        }
        Ok(())
    }

    /// Reads the API token from `api.token_file`, if one is set (trimming surrounding
    /// whitespace). Warns if the file is readable by group or others.
    pub fn load_api_token(&mut self) -> Result<(), ConfigError> {
        let Some(path) = self.api.token_file.clone() else { return Ok(()) };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(&path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), "the API token file is readable by group or others; chmod 600 it");
                }
            }
        }
        let token = ApiToken::new(text.trim()).map_err(|e| match e {
            ConfigError::Invalid(_, why) => {
                ConfigError::Invalid("api.token_file", format!("{}: {why}", path.display()))
            }
            other => other,
        })?;
        self.api.token = Some(token);
        Ok(())
    }

    /// Rejects values the broker cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.signer_node_id {
            let ok = bitcoin::secp256k1::PublicKey::from_slice(&hex::decode(id).unwrap_or_default())
                .is_ok_and(|k| k.to_string() == *id);
            if !ok {
                return Err(ConfigError::Invalid(
                    "signer_node_id",
                    "expected a node id: 33-byte public key in lowercase hex".into(),
                ));
            }
        }
        if self.mqtt.tls_cert.is_some() != self.mqtt.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "mqtt.tls_cert/mqtt.tls_key",
                "set both (certificate chain and its private key, PEM) or neither".into(),
            ));
        }
        self.api.check()?;
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
    fn signer_node_id_must_be_a_node_id() {
        let mut c = Config {
            signer_node_id: Some("029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef46".into()),
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        c.signer_node_id = Some("029E41168D807AC2A06BD2C6025ACA1BF0C6401E9683BE9BC66B06F07C54A0EF46".into());
        assert!(c.validate().is_err(), "lowercase hex, as topics use it");
        c.signer_node_id = Some("xyz".into());
        assert!(c.validate().is_err());
    }

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

    #[test]
    fn mqtt_tls_keys_both_or_neither() {
        let mut c = Config::default();
        c.merge_toml(
            "[mqtt]\nlisten = \"0.0.0.0:8883\"\ntls_cert = \"b.crt\"\ntls_key = \"b.key\"\nallow_plaintext_non_loopback = true\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.mqtt.tls_cert.as_deref(), Some(Path::new("b.crt")));
        assert!(c.mqtt.allow_plaintext_non_loopback);
        assert!(c.validate().is_ok());
        c.mqtt.tls_key = None;
        assert!(c.validate().unwrap_err().to_string().contains("tls_cert"));
    }

    #[test]
    fn api_is_off_by_default_and_needs_a_token_and_loopback() {
        let mut c = Config::default();
        assert!(c.api.listen.is_none());
        assert!(c.validate().is_ok());
        c.merge_toml("[api]\nlisten = \"127.0.0.1:7878\"\n", Path::new("x.toml")).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("no token"));
        let short = c.merge_toml("[api]\ntoken = \"short\"\n", Path::new("x.toml")).unwrap_err();
        assert!(short.to_string().contains("too short"), "{short}");
        assert!(c.merge_toml("[api]\ntoken = \"has a space in it ok\"\n", Path::new("x.toml")).is_err());
        c.merge_toml("[api]\ntoken = \"0123456789abcdef\"\ncontrol_timeout_secs = 3\n", Path::new("x.toml")).unwrap();
        assert!(c.validate().is_ok());
        assert_eq!(c.api.control_timeout, Duration::from_secs(3));
        assert!(!format!("{c:?}").contains("0123456789abcdef"), "the token must not appear in Debug output");
        c.merge_toml("[api]\nlisten = \"0.0.0.0:7878\"\n", Path::new("x.toml")).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("not a loopback address"));
        c.merge_toml("[api]\nallow_non_loopback = true\n", Path::new("x.toml")).unwrap();
        assert!(c.validate().is_ok());
        assert!(c
            .merge_toml("[api]\ntoken = \"0123456789abcdef\"\ntoken_file = \"t\"\n", Path::new("x.toml"))
            .is_err());
    }

    #[test]
    fn api_token_file_is_read_and_trimmed_and_compared_exactly() {
        let dir = std::env::temp_dir().join(format!("api-token-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "  secret-secret-secret-1\n").unwrap();
        let mut c = Config::default();
        c.api.set_token("inline-token-inline").unwrap();
        c.api.set_token_file(f.clone());
        assert!(c.api.token.is_none(), "a later token file replaces an earlier inline token");
        c.load_api_token().unwrap();
        let t = c.api.token.clone().unwrap();
        assert!(t.matches(b"secret-secret-secret-1"));
        assert!(!t.matches(b"secret-secret-secret-2"));
        assert!(!t.matches(b"secret-secret-secret-1 "));
        assert!(!t.matches(b""));
        std::fs::write(&f, "tiny\n").unwrap();
        assert!(c.load_api_token().unwrap_err().to_string().contains("too short"));
        c.api.set_token_file(dir.join("missing"));
        assert!(c.load_api_token().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
