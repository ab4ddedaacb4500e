//! sphinx-broker: a drop-in hsmd for Core Lightning that relays requests to sphinx-key signers
//! over an embedded, authenticated MQTT broker.
//!
//! One path for a request: [`hsmd`] reads it from a CLN connection → [`relay`] numbers it and
//! publishes it to the signer through the embedded MQTT server ([`sphinx_mqtt_server`]) → the signer's reply comes
//! back through [`signer_link`] → [`relay`] matches it by sequence number → [`hsmd`] writes it.
//!
//! Beside it, the optional operator [`api`] (HTTP, loopback, bearer token) lists the signers,
//! relays owner control messages and streams signer events, fed by [`signer_link::SignerHub`].
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod hsmd;
pub mod pin;
pub mod relay;
pub mod signer_link;

use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;

use sphinx_chain as chain;
use sphinx_mqtt_server as mqtt;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::pin::PinStore;

/// The running broker's parts that callers (main, tests) need.
pub struct Broker {
    /// The request path.
    pub relay: relay::RelayHandle,
    /// The embedded MQTT server.
    pub mqtt: mqtt::MqttHandle,
    /// The pinned signer key.
    pub pin: Arc<PinStore>,
    /// The signers' state and events (what the API shows).
    pub hub: Arc<signer_link::SignerHub>,
    /// The operator API, when configured (dropping it stops the API).
    pub api: Option<api::ApiHandle>,
    /// Where the chain follower reports (the API reads it): give it to
    /// [`chain::spawn_reporting`].
    pub chain_status: tokio::sync::watch::Sender<chain::FollowerStatus>,
}

/// Starts the MQTT server, the relay and, when configured, the operator API.
///
/// The API's settings are checked before anything starts (an enabled API needs a token of at
/// least 16 characters and a loopback address unless `api.allow_non_loopback`).
pub async fn start(cfg: &Config) -> anyhow::Result<Broker> {
    let api_cfg = api::ApiConfig::from_settings(&cfg.api).map_err(|e| anyhow::anyhow!("operator API: {e}"))?;
    let tls = match (&cfg.mqtt.tls_cert, &cfg.mqtt.tls_key) {
        (Some(cert), Some(key)) => Some(mqtt::TlsSettings { cert_chain: cert.clone(), private_key: key.clone() }),
        (None, None) => None,
        _ => anyhow::bail!("MQTT TLS needs both mqtt.tls_cert and mqtt.tls_key"),
    };
    let pin = Arc::new(PinStore::open(&cfg.data_dir)?);
    if let Some(id) = &cfg.signer_node_id {
        // Configured: pin now (or check the existing pin) instead of trusting the first signer.
        pin.pin(id).map_err(|e| anyhow::anyhow!("signer_node_id: {e}"))?;
    }
    let auth = signer_link::TokenAuth::new(pin.clone(), cfg.mqtt.token_window, &cfg.data_dir);
    let mqtt_cfg = mqtt::MqttConfig {
        max_payload: cfg.mqtt.max_payload,
        tls,
        allow_plaintext_non_loopback: cfg.mqtt.allow_plaintext_non_loopback,
        ..mqtt::MqttConfig::new(cfg.mqtt.listen)
    };
    let tls_on = mqtt_cfg.tls.is_some();
    let (mqtt, mqtt_events) = mqtt::start(mqtt_cfg, auth)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the MQTT server on {}: {e}", cfg.mqtt.listen))?;
    tracing::info!(listen = %mqtt.local_addr(), tls = tls_on, pinned = ?pin.get(), "embedded MQTT server listening");
    let hub = Arc::new(signer_link::SignerHub::new(cfg.api.event_capacity));
    let (link_tx, link_rx) = mpsc::channel(1024);
    tokio::spawn(signer_link::forward_events(mqtt_events, link_tx, hub.clone()));
    let relay_cfg = relay::RelayConfig {
        queue_capacity: cfg.relay.queue_capacity,
        max_inflight: cfg.relay.max_inflight,
        request_timeout: cfg.relay.request_timeout,
        waiting_log_interval: cfg.relay.waiting_log_interval,
    };
    let relay = relay::spawn(relay_cfg, Arc::new(mqtt.clone()), link_rx, pin.clone());
    // With bitcoind configured, chain following waits for lightningd's init from the start.
    let phase = if cfg.bitcoind.enabled() { chain::Phase::WaitingForInit } else { chain::Phase::Disabled };
    let (chain_status, chain_rx) = tokio::sync::watch::channel(chain::FollowerStatus { phase, ..Default::default() });
    let api = match api_cfg {
        None => None,
        Some(c) => {
            let state = api::ApiState {
                mqtt: mqtt.clone(),
                hub: hub.clone(),
                relay: relay.clone(),
                pin: pin.clone(),
                chain: chain_rx,
            };
            match api::start(c, state).await {
                Ok(h) => Some(h),
                Err(e) => {
                    mqtt.shutdown();
                    anyhow::bail!("cannot start the operator API: {e}");
                }
            }
        }
    };
    Ok(Broker { relay, mqtt, pin, hub, api, chain_status })
}

/// Runs as lightningd's hsmd on `root` (fd 3) until lightningd closes it.
pub async fn run_hsmd(
    cfg: &Config,
    root: StdUnixStream,
    status: Option<StdUnixStream>,
    log_io: bool,
) -> anyhow::Result<()> {
    let broker = start(cfg).await?;
    let server = Arc::new(hsmd::HsmdServer::new(broker.relay.clone(), cfg.network, status, log_io)?);
    // Chain tracking: follows bitcoind once a signer has answered lightningd's hsmd_init.
    let follower = chain::spawn_reporting(
        chain::FollowerConfig::new(cfg.bitcoind.clone(), cfg.network).with_data_dir(&cfg.data_dir),
        broker.relay.clone(),
        server.init_done(),
        broker.chain_status.clone(),
    );
    let served = server.serve_root(root).await;
    follower.task.abort();
    if let Some(api) = &broker.api {
        api.shutdown();
    }
    served?;
    Ok(())
}
