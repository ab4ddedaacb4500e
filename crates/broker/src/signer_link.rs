//! Glue between the embedded MQTT server and the relay: who may log in, and what their
//! messages mean.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sphinx_wire::{token, topics};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::mqtt::{Authenticator, MqttEvent, MqttHandle};
use crate::pin::PinStore;
use crate::relay::{LinkEvent, SignerLink};

/// Signer login: a fresh sphinx-key token for the key in the username, which must be the
/// pinned node id once there is one. The identity (topic prefix) is the node id in hex.
pub struct TokenAuth {
    /// Pinned node id.
    pub pin: Arc<PinStore>,
    /// Accepted distance between the token's timestamp and our clock.
    pub window: Duration,
}

impl Authenticator for TokenAuth {
    fn authenticate(&self, _client_id: &str, username: Option<&str>, password: Option<&[u8]>) -> Result<String, String> {
        let user = username.ok_or("no username (expected the signer's node id)")?;
        let pass = password.ok_or("no password (expected a sphinx-key token)")?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let key = token::verify(user, pass, now, self.window.as_secs()).map_err(|e| e.to_string())?;
        let id = key.to_string();
        if id != user {
            return Err(format!("username must be the node id in lowercase hex ({id})"));
        }
        self.pin.allows(&id).map_err(|e| e.to_string())?;
        Ok(id)
    }
}

impl SignerLink for MqttHandle {
    fn publish(&self, topic: String, payload: Vec<u8>) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move { MqttHandle::publish(self, &topic, payload.into()).await.map_err(|e| e.to_string()) })
    }
    fn disconnect(&self, identity: &str) {
        MqttHandle::disconnect(self, identity)
    }
}

/// Translates MQTT events into relay events until either side closes.
pub async fn forward_events(mut from: mpsc::Receiver<MqttEvent>, to: mpsc::Sender<LinkEvent>) {
    while let Some(ev) = from.recv().await {
        let out = match ev {
            MqttEvent::Connected { identity, .. } => {
                debug!(%identity, "signer connected; waiting for its hello");
                continue;
            }
            MqttEvent::Disconnected { identity, .. } => LinkEvent::Gone(identity),
            MqttEvent::Message { identity, topic, payload, .. } => {
                let Some((prefix, suffix)) = topics::split(&topic) else { continue };
                if prefix != identity {
                    warn!(%identity, %topic, "message outside the client's prefix reached the relay; dropped");
                    continue;
                }
                match suffix {
                    topics::HELLO => LinkEvent::Hello(identity),
                    topics::BYE => LinkEvent::Gone(identity),
                    topics::VLS_RES => LinkEvent::Reply(identity, payload.to_vec()),
                    topics::ERROR => LinkEvent::Error(identity, payload.to_vec()),
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
