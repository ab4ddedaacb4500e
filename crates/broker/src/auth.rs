//! Who may log in to the embedded MQTT server: the login policy for signers ([`TokenAuth`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sphinx_mqtt_server::Authenticator;
use sphinx_wire::{token, unix_now};

use crate::pin::{PinError, PinStore};

/// Signer login: a fresh sphinx-key token for the key in the username, which must be the
/// pinned node id once there is one. The identity (topic prefix) is the node id in hex.
///
/// Each token is accepted once: a token seen within the window is refused, so a captured
/// password cannot be replayed while it is still fresh. For the pinned key this holds across
/// broker restarts too: its last accepted token time is kept on disk and a login must carry a
/// later one. (A signer reconnecting within the same second makes the same token; it is refused
/// and retries after its backoff with a new one.)
pub struct TokenAuth {
    pin: Arc<PinStore>,
    window: Duration,
    /// Tokens accepted within the window, with the unix time they expire from memory.
    seen: Mutex<HashMap<Vec<u8>, u64>>,
    /// `data_dir/pinned-last-login`: the pinned key's last accepted token time.
    last_login_path: PathBuf,
}

impl TokenAuth {
    /// Tokens must be within `window` of our clock and signed by the pinned key (if any);
    /// `data_dir` keeps the pinned key's last login time.
    pub fn new(pin: Arc<PinStore>, window: Duration, data_dir: &Path) -> Self {
        TokenAuth { pin, window, seen: Mutex::new(HashMap::new()), last_login_path: data_dir.join("pinned-last-login") }
    }

    /// Records a token as used; false if it was used before.
    fn first_use(&self, token: &[u8], now: u64) -> bool {
        let Ok(mut seen) = self.seen.lock() else { return false };
        seen.retain(|_, forget_at| *forget_at > now);
        // Remembered for two windows: a token is valid from ts - window to ts + window.
        seen.insert(token.to_vec(), now + 2 * self.window.as_secs() + 1).is_none()
    }

    /// For the pinned key: the token must be later than the last accepted one, durably.
    fn advance_pinned_login(&self, ts: u32) -> Result<(), LoginError> {
        let last = std::fs::read_to_string(&self.last_login_path).ok().and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(last) = last {
            if ts <= last {
                return Err(LoginError::NotAfterLastLogin { ts, last });
            }
        }
        crate::pin::write_durably(&self.last_login_path, format!("{ts}\n").as_bytes())
            .map_err(|source| LoginError::Record { path: self.last_login_path.clone(), source })
    }
}

/// Why [`TokenAuth`] refused a login (logged by the MQTT server).
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// No MQTT username.
    #[error("no username (expected the signer's node id)")]
    NoUsername,
    /// No MQTT password.
    #[error("no password (expected a sphinx-key token)")]
    NoPassword,
    /// The token is malformed, stale, or not signed by the username's key.
    #[error(transparent)]
    Token(#[from] token::Error),
    /// The username is not the signing key's node id as topics spell it.
    #[error("username must be the node id in lowercase hex ({0})")]
    NotNodeId(String),
    /// Another key is pinned.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// This token was accepted before, within its window.
    #[error("token already used (replayed login)")]
    Replayed,
    /// The pinned key's token is not later than its last accepted one.
    #[error("token time {ts} is not after the last login ({last}): replayed or clock went back")]
    NotAfterLastLogin {
        /// The token's time.
        ts: u32,
        /// The last accepted login's.
        last: u32,
    },
    /// The login time could not be recorded durably.
    #[error("cannot record the login time in {}: {source}", path.display())]
    Record {
        /// `data_dir/pinned-last-login`.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl Authenticator for TokenAuth {
    type Error = LoginError;

    fn authenticate(
        &self,
        _client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<String, LoginError> {
        let user = username.ok_or(LoginError::NoUsername)?;
        let pass = password.ok_or(LoginError::NoPassword)?;
        let now = unix_now();
        let key = token::verify(user, pass, now, self.window.as_secs())?;
        let id = key.to_string();
        if id != user {
            return Err(LoginError::NotNodeId(id));
        }
        self.pin.allows(&id)?;
        if !self.first_use(pass, now) {
            return Err(LoginError::Replayed);
        }
        if self.pin.get().as_deref() == Some(id.as_str()) {
            let ts = token::timestamp(pass)?;
            self.advance_pinned_login(ts)?;
        }
        Ok(id)
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
        let auth = TokenAuth::new(pin.clone(), Duration::from_secs(300), &dir);
        let sk = SecretKey::from_slice(&[0x41; 32]).unwrap();
        let id = PublicKey::from_secret_key(&Secp256k1::new(), &sk).to_string();
        let now = unix_now();
        let tok = token::make(&sk, now as u32);
        assert_eq!(auth.authenticate("c", Some(&id), Some(tok.as_bytes())).unwrap(), id);
        assert!(auth
            .authenticate("c", Some(&id), Some(tok.as_bytes()))
            .unwrap_err()
            .to_string()
            .contains("already used"));
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
        // The pinned key's logins must move forward in time, across broker restarts.
        let t3 = token::make(&sk, now as u32 + 1);
        assert!(auth.authenticate("c", Some(&id), Some(t3.as_bytes())).is_ok());
        let restarted = TokenAuth::new(pin.clone(), Duration::from_secs(300), &dir);
        let err = restarted.authenticate("c", Some(&id), Some(t3.as_bytes())).unwrap_err().to_string();
        assert!(err.contains("not after the last login"), "{err}");
        let t4 = token::make(&sk, now as u32 + 2);
        assert!(restarted.authenticate("c", Some(&id), Some(t4.as_bytes())).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
