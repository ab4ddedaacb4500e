//! Broker configuration, assembled in one place from the sections that live beside the code they
//! configure:
//!
//! | table | type | where |
//! |---|---|---|
//! | (top level) | [`Config`] | here |
//! | `[mqtt]` | [`MqttSettings`] | [`crate::mqtt_link`] |
//! | `[relay]` | [`RelayConfig`] | [`crate::relay`] |
//! | `[bitcoind]` | [`BitcoindSettings`] | crate `sphinx-chain` |
//! | `[api]` | [`ApiConfig`] | [`crate::api`] |
//! | `[lss]` | [`LssSettings`] | [`crate::lss_link`] |
//!
//! Each is one serde struct whose fields document their defaults. Sources, each overriding the
//! one before ([`Config::load`]): the defaults, the TOML file, then environment variables and
//! flags ([`Overrides`]), then the API token file; then every section is validated.
//!
//! lightningd starts the broker with only its own flags, so a real deployment configures it with
//! the file (`--config`, `$SPHINX_BROKER_CONFIG`, or `sphinx-broker.toml` in the working
//! directory, which is lightningd's network directory) or the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bitcoin::Network;
use serde::{Deserialize, Deserializer};
use sphinx_chain::BitcoindSettings;

use sphinx_wire::hsmd::ClnRelease;

use crate::api::ApiConfig;
use crate::lss_link::LssSettings;
use crate::mqtt_link::MqttSettings;
use crate::relay::RelayConfig;

/// Everything the broker needs to run: the config file's schema, every key optional.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The exact line `lightningd --version` prints (e.g. `v25.12.1`); `--version` echoes it
    /// (`SPHINX_BROKER_CLN_VERSION`, `--cln-version`). Default unset: `--version` fails.
    /// It must lie in the supported range ([`sphinx_wire::hsmd::SUPPORTED_CLN_RANGE`], v25.12.x to v26.x),
    /// and picks that release's hsmd message set: requests the release does not define are
    /// refused (unset: v25.12's).
    pub cln_version: Option<String>,
    /// The chain lightningd must be on, by CLN's name (bitcoin, testnet, testnet4, signet,
    /// regtest); `hsmd_init` carrying another chain is refused (`SPHINX_BROKER_NETWORK`,
    /// `--network`). Default regtest.
    #[serde(deserialize_with = "network")]
    pub network: Network,
    /// Where the broker keeps its state, the pinned signer key (`SPHINX_BROKER_DATA_DIR`,
    /// `--data-dir`). Default `sphinx-broker`, relative to the working directory.
    pub data_dir: PathBuf,
    /// The signer's node id, if the operator knows it (`sphinx-key node-id`): pinned at start, so
    /// no other key can log in even before the first `hsmd_init` (no trust on first use)
    /// (`SPHINX_BROKER_SIGNER_NODE_ID`, `--signer-node-id`). Default unset.
    pub signer_node_id: Option<String>,
    /// `[mqtt]`: the embedded MQTT server and the signers' login.
    pub mqtt: MqttSettings,
    /// `[relay]`: the request path to the signer.
    pub relay: RelayConfig,
    /// `[bitcoind]`: bitcoind to follow; chain tracking is off when no URL is set.
    pub bitcoind: BitcoindSettings,
    /// `[api]`: the operator HTTP API (off unless `api.listen` is set).
    pub api: ApiConfig,
    /// `[lss]`: LSS backup of the signer's state (off unless `lss.url` is set).
    pub lss: LssSettings,
    /// Serve Prometheus metrics (`GET /metrics`, no token) on this address, for a broker whose
    /// API is off (the API serves them too, behind its token) (`SPHINX_BROKER_METRICS_LISTEN`,
    /// `--metrics-listen`). Default unset: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    /// Allow a `metrics_listen` address that is not loopback
    /// (`SPHINX_BROKER_METRICS_ALLOW_NON_LOOPBACK`). Default false.
    pub metrics_allow_non_loopback: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cln_version: None,
            network: Network::Regtest,
            data_dir: PathBuf::from("sphinx-broker"),
            signer_node_id: None,
            mqtt: MqttSettings::default(),
            relay: RelayConfig::default(),
            bitcoind: BitcoindSettings::default(),
            api: ApiConfig::default(),
            lss: LssSettings::default(),
            metrics_listen: None,
            metrics_allow_non_loopback: false,
        }
    }
}

/// Configuration errors: all fatal at start-up, all say which setting is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys, bad values).
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
    /// A setting out of range or inconsistent with another.
    #[error("invalid setting {0}: {1}")]
    Invalid(&'static str, String),
    /// A value from the environment is not acceptable.
    #[error("{var}: {source}")]
    Env {
        /// The variable.
        var: &'static str,
        /// What is wrong with it.
        source: Box<ConfigError>,
    },
    /// The bitcoind settings cannot work (checked without contacting bitcoind).
    #[error(transparent)]
    Bitcoind(#[from] sphinx_chain::rpc::RpcError),
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

fn network<'de, D: Deserializer<'de>>(d: D) -> Result<Network, D::Error> {
    parse_network(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// A duration given in whole seconds (the `*_secs` keys).
pub(crate) fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_secs)
}

/// Warns (`why`) if `path` is readable by group or others: it holds a secret.
pub(crate) fn warn_if_shared(path: &Path, why: &str) {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
        tracing::warn!(path = %path.display(), "{why}");
    }
}

/// The API token, from the environment only (a flag would show it in `ps`).
pub const API_TOKEN_ENV: &str = "SPHINX_BROKER_API_TOKEN";

/// What the environment and the command line override, each flag with its `SPHINX_BROKER_*`
/// variable (flags win over the environment, both over the file).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct Overrides {
    /// TOML configuration file.
    #[arg(long, env = "SPHINX_BROKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// The exact `lightningd --version` line, e.g. v25.12.1.
    #[arg(long, env = "SPHINX_BROKER_CLN_VERSION")]
    pub cln_version: Option<String>,
    /// Chain: bitcoin, testnet, testnet4, signet, regtest.
    #[arg(long, env = "SPHINX_BROKER_NETWORK")]
    pub network: Option<String>,
    /// State directory (pinned signer key).
    #[arg(long, env = "SPHINX_BROKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The signer's node id (`sphinx-key node-id`): pinned at start instead of on first use.
    #[arg(long, env = "SPHINX_BROKER_SIGNER_NODE_ID")]
    pub signer_node_id: Option<String>,
    /// Embedded MQTT listen address.
    #[arg(long, env = "SPHINX_BROKER_MQTT_LISTEN")]
    pub mqtt_listen: Option<SocketAddr>,
    /// MQTT over TLS: certificate chain (PEM); needs --mqtt-tls-key.
    #[arg(long, env = "SPHINX_BROKER_MQTT_TLS_CERT")]
    pub mqtt_tls_cert: Option<PathBuf>,
    /// MQTT over TLS: the certificate's private key (PEM); needs --mqtt-tls-cert.
    #[arg(long, env = "SPHINX_BROKER_MQTT_TLS_KEY")]
    pub mqtt_tls_key: Option<PathBuf>,
    /// Allow plaintext MQTT on a non-loopback address (refused otherwise).
    #[arg(long, env = "SPHINX_BROKER_MQTT_ALLOW_PLAINTEXT_NON_LOOPBACK", value_parser = clap::builder::BoolishValueParser::new())]
    pub mqtt_allow_plaintext_non_loopback: bool,
    /// Operator HTTP API listen address (the API is off without one; loopback only unless
    /// --api-allow-non-loopback). Needs a token: SPHINX_BROKER_API_TOKEN_FILE (or
    /// SPHINX_BROKER_API_TOKEN, or api.token_file in the config file).
    #[arg(long, env = "SPHINX_BROKER_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// File holding the API's bearer token (at least 16 characters). There is deliberately no
    /// flag for the token itself: command lines are visible to every local user.
    #[arg(long, env = "SPHINX_BROKER_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Allow the API on a non-loopback address (it is plain HTTP: prefer a tunnel or TLS proxy).
    #[arg(long, env = "SPHINX_BROKER_API_ALLOW_NON_LOOPBACK", value_parser = clap::builder::BoolishValueParser::new())]
    pub api_allow_non_loopback: bool,
    /// Longest a control call waits for the signer's response, seconds (default 10).
    #[arg(long, env = "SPHINX_BROKER_API_CONTROL_TIMEOUT")]
    pub api_control_timeout: Option<u64>,
    /// Prometheus metrics (GET /metrics, no token) on this address; loopback only unless
    /// --metrics-allow-non-loopback. The API, when on, serves them too (with its token).
    #[arg(long, env = "SPHINX_BROKER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Allow --metrics-listen on a non-loopback address (anyone who reaches it reads the metrics).
    #[arg(long, env = "SPHINX_BROKER_METRICS_ALLOW_NON_LOOPBACK", value_parser = clap::builder::BoolishValueParser::new())]
    pub metrics_allow_non_loopback: bool,
    /// Per-request reply bound, seconds.
    #[arg(long, env = "SPHINX_BROKER_REQUEST_TIMEOUT")]
    pub request_timeout: Option<u64>,
    /// With LSS and a standby signer in sync: how long the oldest request may wait for the
    /// active signer before the standby takes over, seconds.
    #[arg(long, env = "SPHINX_BROKER_FAILOVER")]
    pub failover: Option<u64>,
    /// bitcoind JSON-RPC URL to follow (http://user:password@host:port); chain tracking is off without one.
    #[arg(long, env = "SPHINX_BROKER_BITCOIND_URL")]
    pub bitcoind_url: Option<String>,
    /// bitcoind's .cookie file, used when the URL carries no user:password.
    #[arg(long, env = "SPHINX_BROKER_BITCOIND_COOKIE")]
    pub bitcoind_cookie: Option<PathBuf>,
    /// Lightning Storage Server URL (http://host:port) for LSS backup; off without one.
    #[arg(long, env = "SPHINX_BROKER_LSS_URL")]
    pub lss_url: Option<String>,
}

impl Config {
    /// The defaults overridden by a TOML document (`path` names it in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })?;
        if cfg.api.token.is_some() && cfg.api.token_file.is_some() {
            return Err(ConfigError::Invalid("api.token", "set token or token_file, not both".into()));
        }
        Ok(cfg)
    }

    /// Reads [`Config::from_toml`] from a file. Warns if the file holds the API token and is
    /// readable by group or others.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let cfg = Config::from_toml(&text, path)?;
        if cfg.api.token.is_some() {
            warn_if_shared(
                path,
                "the config file holds the API token and is readable by group or others; chmod 600 it or use token_file",
            );
        }
        Ok(cfg)
    }

    /// The whole configuration: the file (`o.config`, else `./sphinx-broker.toml` if it exists,
    /// else the defaults), then `o` (environment and flags) and `$SPHINX_BROKER_API_TOKEN`, then
    /// the API token file; validated.
    pub fn load(o: &Overrides) -> Result<Config, ConfigError> {
        let file = o.config.clone().or_else(|| {
            let p = PathBuf::from("sphinx-broker.toml");
            p.exists().then_some(p)
        });
        let mut cfg = match &file {
            Some(f) => Config::from_file(f)?,
            None => Config::default(),
        };
        if let Some(v) = &o.cln_version {
            cfg.cln_version = Some(v.clone());
        }
        if let Some(n) = &o.network {
            cfg.network = parse_network(n)?;
        }
        if let Some(d) = &o.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(id) = &o.signer_node_id {
            cfg.signer_node_id = Some(id.clone());
        }
        if let Some(l) = o.mqtt_listen {
            cfg.mqtt.listen = l;
        }
        if let Some(c) = &o.mqtt_tls_cert {
            cfg.mqtt.tls_cert = Some(c.clone());
        }
        if let Some(k) = &o.mqtt_tls_key {
            cfg.mqtt.tls_key = Some(k.clone());
        }
        if o.mqtt_allow_plaintext_non_loopback {
            cfg.mqtt.allow_plaintext_non_loopback = true;
        }
        if let Some(l) = o.api_listen {
            cfg.api.listen = Some(l);
        }
        // The token itself only from the environment (or a file): never a flag.
        let env_token = std::env::var(API_TOKEN_ENV).ok().filter(|t| !t.is_empty());
        match (env_token, &o.api_token_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "api.token",
                    format!(
                        "set {API_TOKEN_ENV} or the API token file (SPHINX_BROKER_API_TOKEN_FILE / --api-token-file), \
                         not both"
                    ),
                ))
            }
            (Some(t), None) => {
                cfg.api.set_token(&t).map_err(|e| ConfigError::Env { var: API_TOKEN_ENV, source: Box::new(e) })?
            }
            (None, Some(f)) => cfg.api.set_token_file(f.clone()),
            (None, None) => {}
        }
        if o.api_allow_non_loopback {
            cfg.api.allow_non_loopback = true;
        }
        if let Some(t) = o.api_control_timeout {
            cfg.api.control_timeout = Duration::from_secs(t);
        }
        cfg.api.load_token()?;
        if let Some(l) = o.metrics_listen {
            cfg.metrics_listen = Some(l);
        }
        if o.metrics_allow_non_loopback {
            cfg.metrics_allow_non_loopback = true;
        }
        if let Some(t) = o.request_timeout {
            cfg.relay.request_timeout = Duration::from_secs(t);
        }
        if let Some(t) = o.failover {
            cfg.relay.failover = Duration::from_secs(t);
        }
        if let Some(u) = &o.bitcoind_url {
            cfg.bitcoind.url = Some(u.clone());
        }
        if let Some(c) = &o.bitcoind_cookie {
            cfg.bitcoind.cookie_file = Some(c.clone());
        }
        if let Some(u) = &o.lss_url {
            cfg.lss.url = Some(u.clone());
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The CLN release lightningd is, from `cln_version` (unset: v25.12).
    pub fn cln_release(&self) -> Result<ClnRelease, ConfigError> {
        match &self.cln_version {
            None => Ok(ClnRelease::V25_12),
            Some(v) => ClnRelease::from_version(v).map_err(|e| ConfigError::Invalid("cln_version", e.to_string())),
        }
    }

    /// Rejects values the broker cannot run with: each section's own checks, in one pass.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cln_release()?;
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
        if let Some(l) = self.metrics_listen {
            if !sphinx_mqtt_server::is_loopback(l.ip()) && !self.metrics_allow_non_loopback {
                return Err(ConfigError::Invalid(
                    "metrics_listen",
                    format!(
                        "{l} is not a loopback address; the metrics need no token there: listen on 127.0.0.1/::1, \
                         or set metrics_allow_non_loopback = true"
                    ),
                ));
            }
        }
        self.bitcoind.check(self.network)?;
        self.mqtt.tls()?;
        self.api.validate()?;
        self.lss.validate()?;
        self.relay.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiToken;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("x.toml"))
    }

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
        let c =
            parse("cln_version = \"v25.12.1\"\nnetwork = \"testnet\"\n[mqtt]\nlisten = \"0.0.0.0:8883\"\n").unwrap();
        assert_eq!(c.cln_version.as_deref(), Some("v25.12.1"));
        assert_eq!(c.network, Network::Testnet);
        assert_eq!(c.mqtt.listen.port(), 8883);
        assert_eq!(c.mqtt.token_window, Duration::from_secs(300), "unset keys keep their defaults");
        assert_eq!(c.relay, RelayConfig::default());
        assert_eq!(c.lss.url, None, "LSS is off unless configured");
        assert!(parse("bogus = 1\n").is_err());
        assert!(parse("[relay]\nbogus = 1\n").is_err());
        assert!(parse("network = \"mars\"\n").is_err());
    }

    #[test]
    fn every_documented_key_is_read() {
        let c = parse(
            "cln_version = \"v26.04\"\nnetwork = \"signet\"\ndata_dir = \"d\"\n\
             metrics_listen = \"0.0.0.0:3\"\nmetrics_allow_non_loopback = true\n\
             signer_node_id = \"029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef46\"\n\
             [mqtt]\nlisten = \"127.0.0.1:1\"\nmax_payload = 7\ntoken_window_secs = 8\n\
             tls_cert = \"c\"\ntls_key = \"k\"\nallow_plaintext_non_loopback = true\n\
             connect_timeout_secs = 15\nmax_handshakes_per_ip = 16\noutbound_queue = 17\n\
             outbound_queue_bytes = 18\nwrite_stall_timeout_secs = 19\nmax_inflight = 20\n\
             [relay]\nqueue_capacity = 9\nmax_inflight = 10\nrequest_timeout_secs = 11\nfailover_secs = 14\n\
             [bitcoind]\nurl = \"http://u:p@h:1\"\ncookie_file = \"/c\"\n\
             [api]\nlisten = \"127.0.0.1:2\"\nallow_non_loopback = true\ntoken_file = \"t\"\n\
             control_timeout_secs = 12\nevent_capacity = 13\n",
        )
        .unwrap();
        assert_eq!((c.network, c.data_dir.as_path()), (Network::Signet, Path::new("d")));
        assert_eq!((c.metrics_listen, c.metrics_allow_non_loopback), (Some("0.0.0.0:3".parse().unwrap()), true));
        let on = Config { metrics_listen: c.metrics_listen, metrics_allow_non_loopback: true, ..Config::default() };
        assert!(on.validate().is_ok());
        let off = Config { metrics_allow_non_loopback: false, ..on.clone() };
        assert!(off.validate().unwrap_err().to_string().contains("metrics_listen"));
        assert_eq!((c.mqtt.max_payload, c.mqtt.token_window), (7, Duration::from_secs(8)));
        assert!(c.mqtt.allow_plaintext_non_loopback && c.mqtt.tls().unwrap().is_some());
        let l = c.mqtt.limits().unwrap();
        assert_eq!((l.connect_timeout, l.write_stall_timeout), (Duration::from_secs(15), Duration::from_secs(19)));
        assert_eq!(
            (l.max_handshakes_per_ip, l.outbound_queue, l.outbound_queue_bytes, l.max_inflight),
            (16, 17, 18, 20)
        );
        let zero = parse("cln_version = \"v26.04\"\n[mqtt]\nmax_inflight = 0\n").unwrap();
        assert!(zero.mqtt.limits().unwrap_err().to_string().contains("mqtt.max_inflight"));
        let big = parse("cln_version = \"v26.04\"\n[mqtt]\nmax_inflight = 70000\n").unwrap();
        assert!(big.mqtt.limits().unwrap_err().to_string().contains("65535"));
        assert_eq!(
            MqttSettings::default().limits().unwrap().max_inflight,
            sphinx_mqtt_server::Limits::default().max_inflight
        );
        assert_eq!((c.relay.queue_capacity, c.relay.max_inflight), (9, 10));
        assert_eq!(c.relay.request_timeout, Duration::from_secs(11));
        assert_eq!(c.relay.failover, Duration::from_secs(14));
        assert_eq!(c.relay.waiting_log_interval, RelayConfig::default().waiting_log_interval);
        assert_eq!(c.bitcoind.cookie_file.as_deref(), Some(Path::new("/c")));
        assert_eq!((c.api.control_timeout, c.api.event_capacity), (Duration::from_secs(12), 13));
        assert!(c.api.allow_non_loopback && c.api.token_file.is_some());
    }

    #[test]
    fn mqtt_tls_keys_both_or_neither() {
        let mut c = parse(
            "[mqtt]\nlisten = \"0.0.0.0:8883\"\ntls_cert = \"b.crt\"\ntls_key = \"b.key\"\nallow_plaintext_non_loopback = true\n",
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
        let c = Config::default();
        assert!(c.api.listen.is_none());
        assert!(c.validate().is_ok());
        let listen = "[api]\nlisten = \"127.0.0.1:7878\"\n";
        let c = parse(listen).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("no token"));
        let short = parse(&format!("{listen}token = \"short\"\n")).unwrap_err();
        assert!(short.to_string().contains("too short"), "{short}");
        assert!(parse(&format!("{listen}token = \"has a space in it ok\"\n")).is_err());
        let with_token = format!("{listen}token = \"0123456789abcdef\"\ncontrol_timeout_secs = 3\n");
        let c = parse(&with_token).unwrap();
        assert!(c.validate().is_ok());
        assert_eq!(c.api.control_timeout, Duration::from_secs(3));
        assert!(!format!("{c:?}").contains("0123456789abcdef"), "the token must not appear in Debug output");
        let anywhere = with_token.replace("127.0.0.1:7878", "0.0.0.0:7878");
        let c = parse(&anywhere).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("not a loopback address"));
        let c = parse(&format!("{anywhere}allow_non_loopback = true\n")).unwrap();
        assert!(c.validate().is_ok());
        assert!(parse("[api]\ntoken = \"0123456789abcdef\"\ntoken_file = \"t\"\n").is_err());
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
        c.api.load_token().unwrap();
        let t: ApiToken = c.api.token.clone().unwrap();
        assert!(t.matches(b"secret-secret-secret-1"));
        assert!(!t.matches(b"secret-secret-secret-2"));
        assert!(!t.matches(b"secret-secret-secret-1 "));
        assert!(!t.matches(b""));
        std::fs::write(&f, "tiny\n").unwrap();
        assert!(c.api.load_token().unwrap_err().to_string().contains("too short"));
        c.api.set_token_file(dir.join("missing"));
        assert!(c.api.load_token().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
