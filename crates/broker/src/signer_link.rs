//! Glue between the embedded MQTT server and the rest of the broker: who may log in, and what
//! their messages mean.
//!
//! [`forward_events`] turns MQTT events into relay events ([`LinkEvent`]) and, for the operator
//! API, keeps the [`SignerHub`] up to date: the signers' state, a broadcast of connects,
//! disconnects and errors, and the routing of `{id}/control-res` replies to the one control
//! call waiting for them.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use sphinx_wire::{token, topics};
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, info, warn};

use sphinx_mqtt_server::{Authenticator, MqttEvent, MqttEvents, MqttHandle};

use crate::pin::{PinError, PinStore};
use crate::relay::{LinkEvent, SignerLink};

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
    last_login_path: std::path::PathBuf,
}

impl TokenAuth {
    /// Tokens must be within `window` of our clock and signed by the pinned key (if any);
    /// `data_dir` keeps the pinned key's last login time.
    pub fn new(pin: Arc<PinStore>, window: Duration, data_dir: &std::path::Path) -> Self {
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
        path: std::path::PathBuf,
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

impl SignerLink for MqttHandle {
    fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move { MqttHandle::publish(self, &topic, payload.into()).map_err(|e| e.to_string()) })
    }
    fn disconnect(&self, identity: &str) {
        MqttHandle::disconnect(self, identity)
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Longest error text kept from a signer's `{id}/error` report (characters).
pub const MAX_ERROR_TEXT: usize = 2000;
/// Signers remembered by the hub; beyond this, the longest-disconnected ones are forgotten.
pub const MAX_REMEMBERED_SIGNERS: usize = 64;

/// A signer's `{id}/error` report, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SignerErrorReport {
    /// The signer (node id, hex).
    pub node_id: String,
    /// The request it refers to (`None` if the payload was shorter than the 2-byte sequence).
    pub seq: Option<u16>,
    /// The signer's text (invalid UTF-8 replaced, at most [`MAX_ERROR_TEXT`] characters).
    pub text: String,
    /// When the broker received it (Unix seconds).
    pub time: u64,
}

impl SignerErrorReport {
    /// Decodes `seq u16 BE | utf8 text` (see docs/wire.md); never fails.
    pub fn decode(node_id: &str, payload: &[u8], time: u64) -> SignerErrorReport {
        let (seq, text) = match payload {
            [a, b, rest @ ..] => (Some(u16::from_be_bytes([*a, *b])), rest),
            _ => (None, payload),
        };
        let text = String::from_utf8_lossy(text).chars().take(MAX_ERROR_TEXT).collect();
        SignerErrorReport { node_id: node_id.to_string(), seq, text, time }
    }
}

/// What the hub broadcasts (to the API's `/v1/events` subscribers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignerEvent {
    /// A signer logged in (MQTT CONNECT accepted).
    Connected {
        /// Node id (hex).
        node_id: String,
        /// Unix seconds.
        time: u64,
    },
    /// A signer subscribed and said `hello`: it can take requests.
    Ready {
        /// Node id (hex).
        node_id: String,
        /// Unix seconds.
        time: u64,
    },
    /// A signer's connection ended (or it said `bye`).
    Disconnected {
        /// Node id (hex).
        node_id: String,
        /// Unix seconds.
        time: u64,
    },
    /// A signer reported an error on `{id}/error`.
    Error(SignerErrorReport),
}

/// One signer as the hub knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SignerStatus {
    /// Node id (hex), also its MQTT identity.
    pub node_id: String,
    /// Has a live MQTT session.
    pub connected: bool,
    /// Said `hello` on its current session (subscribed, takes requests).
    pub ready: bool,
    /// When `connected` last changed (Unix seconds).
    pub since: u64,
    /// The last `{id}/error` report, kept across reconnects.
    pub last_error: Option<SignerErrorReport>,
}

#[derive(Default)]
struct HubState {
    signers: BTreeMap<String, SignerStatus>,
    /// The control call waiting for `{id}/control-res`, per signer, with its registration number.
    control: HashMap<String, (u64, mpsc::Sender<Bytes>)>,
    next_waiter: u64,
}

/// The signers' state for the operator API: who is connected, their last errors, a bounded
/// broadcast of events, and the routing of control responses. Updated only by
/// [`forward_events`]; nothing here blocks it (the broadcast drops events for subscribers
/// that fall behind, who then see `RecvError::Lagged`).
pub struct SignerHub {
    state: Mutex<HubState>,
    events: broadcast::Sender<SignerEvent>,
}

/// [`SignerHub::expect_control`] refused: another call is already waiting for this signer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a control call to this signer is already waiting for its response")]
pub struct ControlBusy;

/// A registered wait for a signer's next `{id}/control-res`. Dropping it unregisters it.
pub struct ControlWaiter {
    hub: Arc<SignerHub>,
    node_id: String,
    id: u64,
    rx: mpsc::Receiver<Bytes>,
}

impl ControlWaiter {
    /// The next control response from the signer (`None` only if the hub is gone).
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }
}

impl Drop for ControlWaiter {
    fn drop(&mut self) {
        let mut st = self.hub.lock();
        if st.control.get(&self.node_id).is_some_and(|(id, _)| *id == self.id) {
            st.control.remove(&self.node_id);
        }
    }
}

impl SignerHub {
    /// A hub whose broadcast keeps up to `event_capacity` events per subscriber.
    pub fn new(event_capacity: usize) -> SignerHub {
        let (events, _) = broadcast::channel(event_capacity.max(1));
        SignerHub { state: Mutex::new(HubState::default()), events }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // The state stays consistent even if a holder panicked (every update is one step).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new subscriber to signer events (from now on).
    pub fn subscribe(&self) -> broadcast::Receiver<SignerEvent> {
        self.events.subscribe()
    }

    /// Every remembered signer, by node id.
    pub fn signers(&self) -> Vec<SignerStatus> {
        self.lock().signers.values().cloned().collect()
    }

    /// One signer, if the hub has seen it.
    pub fn signer(&self, node_id: &str) -> Option<SignerStatus> {
        self.lock().signers.get(node_id).cloned()
    }

    /// Registers the (single) wait for `node_id`'s next control response. Register before
    /// publishing the request, so that a fast answer is not missed.
    pub fn expect_control(self: &Arc<Self>, node_id: &str) -> Result<ControlWaiter, ControlBusy> {
        let mut st = self.lock();
        if st.control.get(node_id).is_some_and(|(_, tx)| !tx.is_closed()) {
            return Err(ControlBusy);
        }
        st.next_waiter += 1;
        let id = st.next_waiter;
        let (tx, rx) = mpsc::channel(4);
        st.control.insert(node_id.to_string(), (id, tx));
        Ok(ControlWaiter { hub: self.clone(), node_id: node_id.to_string(), id, rx })
    }

    fn send(&self, ev: SignerEvent) {
        // Err only means nobody is subscribed.
        let _ = self.events.send(ev);
    }

    fn entry<'a>(st: &'a mut HubState, node_id: &str, now: u64) -> &'a mut SignerStatus {
        if !st.signers.contains_key(node_id) && st.signers.len() >= MAX_REMEMBERED_SIGNERS {
            let oldest =
                st.signers.values().filter(|s| !s.connected).min_by_key(|s| s.since).map(|s| s.node_id.clone());
            if let Some(old) = oldest {
                st.signers.remove(&old);
            }
        }
        st.signers.entry(node_id.to_string()).or_insert_with(|| SignerStatus {
            node_id: node_id.to_string(),
            connected: false,
            ready: false,
            since: now,
            last_error: None,
        })
    }

    /// A session for `node_id` began.
    pub fn on_connected(&self, node_id: &str) {
        let now = unix_now();
        {
            let mut st = self.lock();
            let s = Self::entry(&mut st, node_id, now);
            s.connected = true;
            s.ready = false;
            s.since = now;
        }
        self.send(SignerEvent::Connected { node_id: node_id.to_string(), time: now });
    }

    /// `node_id` said hello.
    pub fn on_ready(&self, node_id: &str) {
        let now = unix_now();
        {
            let mut st = self.lock();
            let s = Self::entry(&mut st, node_id, now);
            if !s.connected {
                s.connected = true;
                s.since = now;
            }
            s.ready = true;
        }
        self.send(SignerEvent::Ready { node_id: node_id.to_string(), time: now });
    }

    /// `node_id`'s session ended (or it said bye).
    pub fn on_disconnected(&self, node_id: &str) {
        let now = unix_now();
        let was_connected = {
            let mut st = self.lock();
            let s = Self::entry(&mut st, node_id, now);
            let was = s.connected;
            s.connected = false;
            s.ready = false;
            if was {
                s.since = now;
            }
            // A control call waiting on this signer learns at once that no answer will come.
            st.control.remove(node_id);
            was
        };
        if was_connected {
            self.send(SignerEvent::Disconnected { node_id: node_id.to_string(), time: now });
        }
    }

    /// `node_id` published on `{id}/error`.
    pub fn on_error(&self, node_id: &str, payload: &[u8]) {
        let now = unix_now();
        let report = SignerErrorReport::decode(node_id, payload, now);
        {
            let mut st = self.lock();
            Self::entry(&mut st, node_id, now).last_error = Some(report.clone());
        }
        self.send(SignerEvent::Error(report));
    }

    /// `node_id` published on `{id}/control-res`: handed to the waiting control call, if any.
    pub fn on_control_response(&self, node_id: &str, payload: Bytes) {
        let st = self.lock();
        match st.control.get(node_id) {
            Some((_, tx)) => {
                if tx.try_send(payload).is_err() {
                    warn!(signer = %node_id, "control response while the caller is gone or flooded; dropped");
                }
            }
            None => {
                warn!(signer = %node_id, bytes = payload.len(), "control response with no call waiting (late or unsolicited); dropped")
            }
        }
    }
}

/// Translates MQTT events into relay events until either side closes, and keeps `hub` (the
/// operator API's view) up to date. The relay sees exactly what it saw before the hub existed:
/// connects are not relay events, `control-res` is not either, errors go to both.
pub async fn forward_events(mut from: MqttEvents, to: mpsc::Sender<LinkEvent>, hub: Arc<SignerHub>) {
    while let Some(ev) = from.recv().await {
        let out = match ev {
            MqttEvent::Connected { identity, .. } => {
                debug!(%identity, "signer connected; waiting for its hello");
                hub.on_connected(&identity);
                continue;
            }
            MqttEvent::Disconnected { identity, .. } => {
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
                        hub.on_ready(&identity);
                        LinkEvent::Hello(identity)
                    }
                    topics::BYE => {
                        info!(%identity, "signer said bye");
                        hub.on_disconnected(&identity);
                        LinkEvent::Gone(identity)
                    }
                    topics::VLS_RES => LinkEvent::Reply(identity, payload.to_vec()),
                    topics::ERROR => {
                        hub.on_error(&identity, &payload);
                        LinkEvent::Error(identity, payload.to_vec())
                    }
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
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
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

    #[test]
    fn error_reports_decode_any_payload() {
        let r = SignerErrorReport::decode("a", b"\x00\x07policy failure: x", 5);
        assert_eq!((r.seq, r.text.as_str(), r.time), (Some(7), "policy failure: x", 5));
        assert_eq!(SignerErrorReport::decode("a", b"x", 0).seq, None);
        assert_eq!(SignerErrorReport::decode("a", b"", 0).text, "");
        let r = SignerErrorReport::decode("a", b"\x00\x01\xff\xfe", 0);
        assert_eq!(r.text, "\u{fffd}\u{fffd}");
        let long = vec![b'a'; 10_000];
        assert_eq!(SignerErrorReport::decode("a", &long, 0).text.len(), MAX_ERROR_TEXT);
    }

    #[tokio::test]
    async fn hub_tracks_state_and_routes_control_to_one_waiter() {
        let hub = Arc::new(SignerHub::new(4));
        let mut sub = hub.subscribe();
        hub.on_connected("a");
        hub.on_ready("a");
        hub.on_error("a", b"\x00\x02no");
        let s = hub.signer("a").unwrap();
        assert!(s.connected && s.ready);
        assert_eq!(s.last_error.as_ref().map(|e| e.seq), Some(Some(2)));
        assert!(matches!(sub.recv().await.unwrap(), SignerEvent::Connected { .. }));
        assert!(matches!(sub.recv().await.unwrap(), SignerEvent::Ready { .. }));
        assert!(matches!(sub.recv().await.unwrap(), SignerEvent::Error(_)));
        // One waiter per signer; a response goes to it; dropped waiter frees the slot.
        let mut w = hub.expect_control("a").unwrap();
        assert_eq!(hub.expect_control("a").err(), Some(ControlBusy));
        hub.on_control_response("a", Bytes::from_static(b"r1"));
        hub.on_control_response("b", Bytes::from_static(b"other"));
        assert_eq!(w.recv().await.unwrap(), Bytes::from_static(b"r1"));
        drop(w);
        hub.on_control_response("a", Bytes::from_static(b"late"));
        let mut w2 = hub.expect_control("a").unwrap();
        hub.on_control_response("a", Bytes::from_static(b"r2"));
        assert_eq!(w2.recv().await.unwrap(), Bytes::from_static(b"r2"));
        drop(w2);
        let mut w3 = hub.expect_control("a").unwrap();
        hub.on_disconnected("a");
        assert_eq!(w3.recv().await, None, "a disconnect ends the wait");
        assert!(!hub.signer("a").unwrap().connected);
        assert!(hub.signer("a").unwrap().last_error.is_some());
        // A slow subscriber lags instead of blocking.
        for _ in 0..10 {
            hub.on_error("a", b"\x00\x01x");
        }
        assert!(matches!(sub.recv().await, Err(broadcast::error::RecvError::Lagged(7))));
        assert!(matches!(sub.recv().await, Ok(SignerEvent::Error(_))));
    }

    #[test]
    fn hub_forgets_oldest_disconnected_signers_beyond_the_bound() {
        let hub = SignerHub::new(4);
        for i in 0..MAX_REMEMBERED_SIGNERS + 10 {
            let id = format!("s{i:03}");
            hub.on_connected(&id);
            hub.on_disconnected(&id);
        }
        hub.on_connected("live");
        assert_eq!(hub.signers().len(), MAX_REMEMBERED_SIGNERS);
        assert!(hub.signer("live").unwrap().connected);
    }
}
