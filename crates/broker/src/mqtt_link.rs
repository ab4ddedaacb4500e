//! The relay's link to the signers over the embedded MQTT server ([`sphinx_mqtt_server`]): the
//! `[mqtt]` settings, publishing ([`SignerLink`] for [`MqttHandle`]), and what signers'
//! messages mean ([`forward_events`]: MQTT events into relay events and hub updates).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use sphinx_mqtt_server::{Limits, MqttConfig, MqttEvent, MqttEvents, MqttHandle, TlsSettings};
use sphinx_wire::{error_report, topics};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::auth::Identities;
use crate::config::ConfigError;
use crate::hub::SignerHub;
use crate::relay::{LinkEvent, PublishError, SignerLink};

/// The embedded MQTT server and the signers' login: the `[mqtt]` table of the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// Listen address (`SPHINX_BROKER_MQTT_LISTEN`, `--mqtt-listen`). Default `127.0.0.1:1883`.
    pub listen: SocketAddr,
    /// Largest MQTT payload accepted or sent, bytes. Default 1 MiB.
    pub max_payload: usize,
    /// A login token's timestamp must be within this of the broker's clock (file:
    /// `token_window_secs`). Default 300 s.
    #[serde(rename = "token_window_secs", deserialize_with = "crate::config::secs")]
    pub token_window: Duration,
    /// TLS certificate chain, PEM (`SPHINX_BROKER_MQTT_TLS_CERT`, `--mqtt-tls-cert`); with
    /// [`MqttSettings::tls_key`], MQTT is served over TLS. Default unset.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key, PEM (`SPHINX_BROKER_MQTT_TLS_KEY`, `--mqtt-tls-key`); set
    /// both or neither. Default unset.
    pub tls_key: Option<PathBuf>,
    /// Allow plaintext MQTT on a non-loopback address
    /// (`SPHINX_BROKER_MQTT_ALLOW_PLAINTEXT_NON_LOOPBACK`). Default false: such a listener is
    /// refused.
    pub allow_plaintext_non_loopback: bool,
    /// Time a new connection has for its TLS handshake and CONNECT (file:
    /// `connect_timeout_secs`). Default 5 s.
    #[serde(rename = "connect_timeout_secs", deserialize_with = "crate::config::secs")]
    pub connect_timeout: Duration,
    /// Connections from one source (IPv4 address, IPv6 /64) in the handshake at once. Default 4.
    pub max_handshakes_per_ip: usize,
    /// Frames queued for one client before it is dropped as too slow. Default 1024.
    pub outbound_queue: usize,
    /// Bytes queued for one client before it is dropped as too slow. Default 4 MiB.
    pub outbound_queue_bytes: usize,
    /// A write to a client that accepts nothing for this long drops it (file:
    /// `write_stall_timeout_secs`). Default 30 s.
    #[serde(rename = "write_stall_timeout_secs", deserialize_with = "crate::config::secs")]
    pub write_stall_timeout: Duration,
    /// QoS 1 publishes a client may leave unacknowledged before it is dropped (1..=65535).
    /// Default 1024.
    pub max_inflight: usize,
}

impl Default for MqttSettings {
    fn default() -> Self {
        let limits = Limits::default();
        MqttSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_payload: 1024 * 1024,
            token_window: Duration::from_secs(300),
            tls_cert: None,
            tls_key: None,
            allow_plaintext_non_loopback: false,
            connect_timeout: limits.connect_timeout,
            max_handshakes_per_ip: limits.max_handshakes_per_ip,
            outbound_queue: limits.outbound_queue,
            outbound_queue_bytes: limits.outbound_queue_bytes,
            write_stall_timeout: limits.write_stall_timeout,
            max_inflight: limits.max_inflight,
        }
    }
}

impl MqttSettings {
    /// The TLS identity: both files or none; one without the other is an error.
    pub fn tls(&self) -> Result<Option<TlsSettings>, ConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(TlsSettings { cert_chain: cert.clone(), private_key: key.clone() })),
            (None, None) => Ok(None),
            _ => Err(ConfigError::Invalid(
                "mqtt.tls_cert/mqtt.tls_key",
                "set both (certificate chain and its private key, PEM) or neither".into(),
            )),
        }
    }

    /// The server's limits (the server's own defaults for the ones not set here); each must be
    /// at least 1 (1 s for the times), `max_inflight` at most 65535.
    pub fn limits(&self) -> Result<Limits, ConfigError> {
        let positive = [
            ("mqtt.connect_timeout_secs", self.connect_timeout.as_secs() as usize),
            ("mqtt.max_handshakes_per_ip", self.max_handshakes_per_ip),
            ("mqtt.outbound_queue", self.outbound_queue),
            ("mqtt.outbound_queue_bytes", self.outbound_queue_bytes),
            ("mqtt.write_stall_timeout_secs", self.write_stall_timeout.as_secs() as usize),
            ("mqtt.max_inflight", self.max_inflight),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Invalid(key, "must be at least 1".into()));
        }
        if self.max_inflight > usize::from(u16::MAX) {
            return Err(ConfigError::Invalid("mqtt.max_inflight", "at most 65535 (MQTT packet ids)".into()));
        }
        Ok(Limits {
            connect_timeout: self.connect_timeout,
            max_handshakes_per_ip: self.max_handshakes_per_ip,
            outbound_queue: self.outbound_queue,
            outbound_queue_bytes: self.outbound_queue_bytes,
            write_stall_timeout: self.write_stall_timeout,
            max_inflight: self.max_inflight,
            ..Limits::default()
        })
    }

    /// The server's configuration (the server's own defaults for everything not set here).
    pub fn server_config(&self) -> Result<MqttConfig, ConfigError> {
        Ok(MqttConfig {
            max_payload: self.max_payload,
            tls: self.tls()?,
            allow_plaintext_non_loopback: self.allow_plaintext_non_loopback,
            ..MqttConfig::new(self.listen)
        })
    }
}

impl SignerLink for MqttHandle {
    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PublishError> {
        Ok(MqttHandle::publish(self, topic, payload)?)
    }
    fn disconnect(&self, identity: &str) {
        MqttHandle::disconnect(self, identity)
    }
}

/// A live MQTT session of a signer, as [`forward_events`] keeps it.
struct Session {
    conn_id: u64,
    /// The node key it logged in with.
    node: String,
    /// Its `hello` announced [`error_report::SEQ_ERRORS`] (upstream's does not).
    seq_errors: bool,
}

/// Translates MQTT events into relay events until either side closes, and keeps `hub` (the
/// operator API's view) up to date. The relay sees exactly what it saw before the hub existed:
/// connects are not relay events, `control-res` is not either, errors go to both.
///
/// `identities` gives each session's node key (recorded at login by [`crate::auth::TokenAuth`]);
/// it is read once per session, when its `Connected` event arrives, and kept with the session.
pub async fn forward_events(
    mut from: MqttEvents,
    to: mpsc::Sender<LinkEvent>,
    hub: Arc<SignerHub>,
    identities: Arc<Identities>,
) {
    let mut sessions: HashMap<String, Session> = HashMap::new();
    while let Some(ev) = from.recv().await {
        let out = match ev {
            MqttEvent::Connected { identity, conn_id } => {
                // A legacy identity is the node id itself.
                let node = identities.node_of(&identity).unwrap_or_else(|| identity.clone());
                debug!(%identity, node_id = %node, "signer connected; waiting for its hello");
                hub.on_connected(&identity, &node);
                sessions.insert(identity, Session { conn_id, node, seq_errors: false });
                continue;
            }
            MqttEvent::Disconnected { identity, conn_id } => {
                if sessions.get(&identity).is_some_and(|s| s.conn_id == conn_id) {
                    sessions.remove(&identity);
                }
                hub.on_disconnected(&identity);
                LinkEvent::Gone(identity)
            }
            MqttEvent::Message { identity, topic, payload, .. } => {
                let Some((prefix, suffix)) = topics::split(&topic) else { continue };
                if prefix != identity {
                    warn!(%identity, %topic, "message outside the client's prefix reached the relay; dropped");
                    continue;
                }
                match suffix {
                    topics::HELLO => {
                        let seq_errors = error_report::hello_has_seq_errors(&payload);
                        let node = match sessions.get_mut(&identity) {
                            Some(s) => {
                                s.seq_errors = seq_errors;
                                s.node.clone()
                            }
                            None => identity.clone(),
                        };
                        hub.on_ready(&identity, seq_errors);
                        LinkEvent::HelloAs { id: identity, node_id: node, seq_errors }
                    }
                    topics::BYE => {
                        info!(%identity, "signer said bye");
                        hub.on_disconnected(&identity);
                        LinkEvent::Gone(identity)
                    }
                    topics::VLS_RES => LinkEvent::Reply(identity, payload),
                    topics::ERROR => {
                        // A text-only report reaches the hub from the relay, with the seq it is for.
                        if sessions.get(&identity).is_some_and(|s| s.seq_errors) {
                            hub.on_error(&identity, error_report::decode(&payload));
                        }
                        LinkEvent::Error(identity, payload.to_vec())
                    }
                    topics::INIT_1_RES
                    | topics::INIT_2_RES
                    | topics::INIT_3_RES
                    | topics::LSS_RES
                    | topics::LSS_CONFLICT_RES => LinkEvent::Lss(identity, suffix.to_string(), payload.to_vec()),
                    topics::CONTROL_RES => {
                        hub.on_control_response(&identity, payload);
                        continue;
                    }
                    other => {
                        debug!(%identity, suffix = other, "message not for the relay");
                        continue;
                    }
                }
            }
        };
        if to.send(out).await.is_err() {
            return;
        }
    }
}
