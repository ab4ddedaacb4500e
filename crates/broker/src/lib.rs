//! sphinx-broker: a drop-in hsmd for Core Lightning that relays requests to sphinx-key signers
//! over an embedded, authenticated MQTT broker.
//!
//! One path for a request: [`hsmd`] reads it from a CLN connection → [`relay`] numbers it and
//! publishes it to the signer through the embedded MQTT server ([`sphinx_mqtt_server`], wired
//! by [`mqtt_link`]) → the signer's reply comes back as an MQTT event, which [`mqtt_link`]
//! turns into a relay event → [`relay`] matches it by sequence number → [`hsmd`] writes it.
//! What the broker itself does with lightningd's `hsmd_init` is all in [`init`].
//!
//! Around it: [`auth`] decides which signer may log in (with the pinned key of [`pin`]); the
//! optional operator [`api`] (HTTP, loopback, bearer token) lists the signers, relays owner
//! control messages and streams signer events, fed by the [`hub`]; chain following (crate
//! `sphinx-chain`) feeds the signer's chain tracker through the relay; [`metrics`] counts what
//! the relay and the login see (Prometheus, `/metrics`) and [`status_page`] shows it live in a
//! browser. [`config`] assembles the
//! sections of each; [`start`] and [`run_hsmd`] wire them.
#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod config;
pub mod hsmd;
pub mod hub;
pub mod init;
pub mod lss_link;
pub mod metrics;
pub mod mqtt_link;
pub mod pin;
pub mod relay;
pub mod status_page;

use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;

use sphinx_chain as chain;
use sphinx_mqtt_server::{self as mqtt, StartError};
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
    pub hub: Arc<hub::SignerHub>,
    /// The operator API, when configured (dropping it stops the API).
    pub api: Option<api::ApiHandle>,
    /// The broker's metrics (`/metrics`) and recent requests and refusals.
    pub metrics: Arc<metrics::Metrics>,
    /// `/metrics` on its own address (`metrics_listen`), when configured (dropping it stops it).
    pub metrics_server: Option<metrics::MetricsServer>,
    /// Where the chain follower reports (the API reads it): give it to
    /// [`chain::spawn_reporting`].
    pub chain_status: tokio::sync::watch::Sender<chain::FollowerStatus>,
}

/// Starts the MQTT server, the relay and, when configured, the operator API.
///
/// The API's settings are checked before anything starts (an enabled API needs a token of at
/// least 16 characters and a loopback address unless `api.allow_non_loopback`).
pub async fn start(cfg: &Config) -> anyhow::Result<Broker> {
    cfg.api.validate().map_err(|e| anyhow::anyhow!("operator API: {e}"))?;
    let mqtt_cfg = cfg.mqtt.server_config()?;
    let mqtt_limits = cfg.mqtt.limits()?;
    let pin = Arc::new(PinStore::open(&cfg.data_dir)?);
    if let Some(id) = &cfg.signer_node_id {
        // Configured: pin now (or check the existing pin) instead of trusting the first signer.
        pin.pin(id).map_err(|e| anyhow::anyhow!("signer_node_id: {e}"))?;
    }
    let metrics = Arc::new(metrics::Metrics::new());
    let identities = Arc::new(auth::Identities::default());
    let auth = metrics::CountingAuth::new(
        auth::TokenAuth::with_identities(pin.clone(), cfg.mqtt.token_window, &cfg.data_dir, identities.clone()),
        metrics.clone(),
    );
    let tls_on = mqtt_cfg.tls.is_some();
    let (mqtt, mqtt_events) =
        mqtt::start_with(mqtt_cfg, mqtt_limits, auth, mqtt::OwnPrefix).await.map_err(|e| match e {
            // The server knows no config keys; the operator needs them.
            StartError::PlaintextNonLoopback(addr) => anyhow::anyhow!(
                "cannot start the MQTT server on {addr}: refusing to serve MQTT without TLS on non-loopback address \
             {addr}: configure a TLS certificate and key \
             ([mqtt] tls_cert and tls_key), listen on 127.0.0.1 or ::1, or explicitly allow plaintext on \
             non-loopback addresses ([mqtt] allow_plaintext_non_loopback = true)"
            ),
            e => anyhow::anyhow!("cannot start the MQTT server on {}: {e}", cfg.mqtt.listen),
        })?;
    tracing::info!(listen = %mqtt.local_addr(), tls = tls_on, pinned = ?pin.get(), "embedded MQTT server listening");
    let hub = Arc::new(hub::SignerHub::new(cfg.api.event_capacity));
    let (link_tx, link_rx) = mpsc::channel(1024);
    tokio::spawn(mqtt_link::forward_events(mqtt_events, link_tx, hub.clone(), identities));
    let link: Arc<dyn relay::SignerLink> = Arc::new(mqtt.clone());
    let lss = lss_link::LssRelay::new(&cfg.lss, link.clone(), hub.clone());
    if let Some(url) = &cfg.lss.url {
        tracing::info!(%url, "LSS backup on: a signer is ready once in sync with LSS");
    }
    let relay =
        relay::spawn_with_hub(cfg.relay.clone(), link, link_rx, pin.clone(), metrics.clone(), lss, Some(hub.clone()));
    // With bitcoind configured, chain following waits for lightningd's init from the start.
    let phase = if cfg.bitcoind.enabled() { chain::Phase::WaitingForInit } else { chain::Phase::Disabled };
    let (chain_status, chain_rx) = tokio::sync::watch::channel(chain::FollowerStatus { phase, ..Default::default() });
    let api = match cfg.api.listen {
        None => None,
        Some(_) => {
            let state = api::ApiState {
                mqtt: mqtt.clone(),
                hub: hub.clone(),
                relay: relay.clone(),
                pin: pin.clone(),
                chain: chain_rx.clone(),
                metrics: metrics.clone(),
                page: Arc::new(status_page::StatusPage::default()),
            };
            // The page's live feed on /v1/events; ends with the runtime.
            status_page::spawn_ticker(hub.clone(), metrics.clone(), relay.clone(), chain_rx.clone());
            match api::start(&cfg.api, state).await {
                Ok(h) => Some(h),
                Err(e) => {
                    mqtt.shutdown();
                    anyhow::bail!("cannot start the operator API: {e}");
                }
            }
        }
    };
    let metrics_server = match cfg.metrics_listen {
        None => None,
        Some(addr) => {
            let allow = cfg.metrics_allow_non_loopback;
            match metrics::serve(addr, allow, metrics.clone(), relay.clone(), hub.clone(), chain_rx).await {
                Ok(s) => Some(s),
                Err(e) => {
                    mqtt.shutdown();
                    if let Some(api) = &api {
                        api.shutdown();
                    }
                    anyhow::bail!("{e}");
                }
            }
        }
    };
    Ok(Broker { relay, mqtt, pin, hub, api, chain_status, metrics, metrics_server })
}

/// Runs as lightningd's hsmd on `root` (fd 3) until lightningd closes it.
pub async fn run_hsmd(
    cfg: &Config,
    root: StdUnixStream,
    status: Option<StdUnixStream>,
    log_io: bool,
) -> anyhow::Result<()> {
    let broker = start(cfg).await?;
    let server =
        Arc::new(hsmd::HsmdServer::new(broker.relay.clone(), cfg.network, cfg.cln_release()?, status, log_io)?);
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
