//! Glue between the embedded MQTT server and the relay: who may log in, and what their
//! messages mean.

use std::future::Future;
use std::pin::Pin;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sphinx_wire::{token, topics};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::mqtt::{Authenticator, MqttEvent, MqttHandle};
use crate::pin::PinStore;
use crate::relay::{LinkEvent, SignerLink};

/// Signer login: a fresh sphinx-key token for the key in the username, which must be the
/// pinned node id once there is one. The identity (topic prefix) is the node id in hex.
///
/// Each token is accepted once: a token seen within the window is refused, so a captured
/// password cannot be replayed while it is still fresh. (A signer reconnecting within the same
/// second makes the same token; it is refused and retries after its backoff with a new one.)
pub struct TokenAuth {
    pin: Arc<PinStore>,
    window: Duration,
    /// Tokens accepted within the window, with the unix time they expire from memory.
    seen: Mutex<HashMap<Vec<u8>, u64>>,
}

impl TokenAuth {
    /// Tokens must be within `window` of our clock and signed by the pinned key (if any).
    pub fn new(pin: Arc<PinStore>, window: Duration) -> Self {
        TokenAuth { pin, window, seen: Mutex::new(HashMap::new()) }
    }

    /// Records a token as used; false if it was used before.
    fn first_use(&self, token: &[u8], now: u64) -> bool {
        let Ok(mut seen) = self.seen.lock() else { return false };
        seen.retain(|_, forget_at| *forget_at > now);
        // Remembered for two windows: a token is valid from ts - window to ts + window.
        seen.insert(token.to_vec(), now + 2 * self.window.as_secs() + 1).is_none()
    }
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
        if !self.first_use(pass, now) {
            return Err("token already used (replayed login)".into());
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};

    #[test]
    fn token_login_fresh_once_pinned_key_only() {
        let dir = std::env::temp_dir().join(format!("auth-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pin = Arc::new(PinStore::open(&dir).unwrap());
        let auth = TokenAuth::new(pin.clone(), Duration::from_secs(300));
        let sk = SecretKey::from_slice(&[0x41; 32]).unwrap();
        let id = PublicKey::from_secret_key(&Secp256k1::new(), &sk).to_string();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let tok = token::make(&sk, now as u32);
        assert_eq!(auth.authenticate("c", Some(&id), Some(tok.as_bytes())).unwrap(), id);
        assert!(auth.authenticate("c", Some(&id), Some(tok.as_bytes())).unwrap_err().contains("already used"));
        let stale = token::make(&sk, (now - 3600) as u32);
        assert!(auth.authenticate("c", Some(&id), Some(stale.as_bytes())).is_err());
        assert!(auth.authenticate("c", None, None).is_err());
        assert!(auth.authenticate("c", Some(&id), Some(b"wrong")).is_err());
        // Another key is fine until a node id is pinned, refused after.
        let other = SecretKey::from_slice(&[0x42; 32]).unwrap();
        let other_id = PublicKey::from_secret_key(&Secp256k1::new(), &other).to_string();
        let t2 = token::make(&other, now as u32);
        pin.pin(&id).unwrap();
        assert!(auth.authenticate("c", Some(&other_id), Some(t2.as_bytes())).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
