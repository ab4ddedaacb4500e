//! The signers as the operator API sees them ([`SignerHub`]): who is connected, with which node
//! key, their role (active, standby, …, set by the relay), their last errors, a bounded
//! broadcast of events, and the one control call per signer waiting for its
//! `{id}/control-res`. Signers are keyed by their MQTT identity (client id, the topic prefix);
//! several may share one node id. Fed by [`crate::mqtt_link::forward_events`] and the relay.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde::Serialize;
use sphinx_wire::{error_report, unix_now};
use tokio::sync::{broadcast, mpsc};
use tracing::warn;

/// Signers remembered by the hub; beyond this, the longest-disconnected ones are forgotten.
pub const MAX_REMEMBERED_SIGNERS: usize = 64;

/// A signer's `{id}/error` report, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SignerErrorReport {
    /// The signer (its MQTT identity: client id, or node id for a legacy client).
    pub node_id: String,
    /// The request it refers to (`None` if the payload was shorter than the 2-byte sequence).
    pub seq: Option<u16>,
    /// The signer's text (invalid UTF-8 replaced, at most [`error_report::MAX_TEXT`] characters).
    pub text: String,
    /// When the broker received it (Unix seconds).
    pub time: u64,
}

impl SignerErrorReport {
    /// Decodes any payload ([`error_report::decode`]); never fails.
    pub fn decode(node_id: &str, payload: &[u8], time: u64) -> SignerErrorReport {
        Self::new(node_id, error_report::decode(payload), time)
    }

    /// `report` of `node_id`, at `time`.
    pub fn new(node_id: &str, report: error_report::ErrorReport, time: u64) -> SignerErrorReport {
        let error_report::ErrorReport { seq, text } = report;
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
        /// The signer's MQTT identity (client id).
        client_id: String,
        /// Unix seconds.
        time: u64,
    },
    /// A signer subscribed and said `hello`: it can take requests.
    Ready {
        /// Node id (hex).
        node_id: String,
        /// The signer's MQTT identity (client id).
        client_id: String,
        /// Unix seconds.
        time: u64,
    },
    /// A signer's connection ended (or it said `bye`).
    Disconnected {
        /// Node id (hex).
        node_id: String,
        /// The signer's MQTT identity (client id).
        client_id: String,
        /// Unix seconds.
        time: u64,
    },
    /// A signer reported an error on `{id}/error`.
    Error(SignerErrorReport),
    /// The relay's and the chain follower's state, as JSON, at most once a second while
    /// something changes (`crate::status_page::spawn_ticker`; the status page's live feed).
    Status(Arc<str>),
}

/// One signer as the hub knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SignerStatus {
    /// Its MQTT identity: the client id (topic prefix), or the node id for a legacy client.
    pub client_id: String,
    /// Node id (hex): the key it logged in with.
    pub node_id: String,
    /// What the relay makes of it.
    pub role: Role,
    /// Has a live MQTT session.
    pub connected: bool,
    /// Said `hello` on its current session (subscribed, takes requests).
    pub ready: bool,
    /// When `connected` last changed (Unix seconds).
    pub since: u64,
    /// The last `{id}/error` report, kept across reconnects.
    pub last_error: Option<SignerErrorReport>,
    /// Where the signer is with LSS backup (set by the relay; `Off` without `[lss] url`).
    pub lss: LssStatus,
    /// Its last `hello` announced `error-seq` (this project's `sphinx-key`); `false`: an
    /// upstream client (vls-mqtt), whose error reports are text only and which takes owner
    /// control over its own HTTP, not over MQTT.
    pub error_seq: bool,
}

/// A signer's role in the relay (docs/signer.md "Several signers").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not (or no longer) taking part: disconnected, or connected without `hello` yet.
    #[default]
    None,
    /// Being brought in sync with LSS (init dance).
    Syncing,
    /// In sync with LSS, takes over when the active one fails. Gets no requests.
    Standby,
    /// Gets the requests.
    Active,
    /// Turned away (a second signer without LSS, or a key that is not the pinned one).
    Refused,
}

impl Role {
    /// The role as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Syncing => "syncing",
            Role::Standby => "standby",
            Role::Active => "active",
            Role::Refused => "refused",
        }
    }
}

/// A signer's LSS backup status, as the API shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LssStatus {
    /// LSS is not configured.
    #[default]
    Off,
    /// The init dance is running: not ready yet.
    Syncing,
    /// In sync with LSS: every state change is stored before its reply.
    Synced,
    /// LSS holds newer state (a conflict): not ready until it is synced again.
    Stale,
    /// The dance or a store failed (the text says why): not ready until it is synced again.
    Error(String),
}

impl LssStatus {
    /// The status word and the error text, if any.
    pub fn parts(&self) -> (&'static str, Option<&str>) {
        match self {
            LssStatus::Off => ("off", None),
            LssStatus::Syncing => ("syncing", None),
            LssStatus::Synced => ("synced", None),
            LssStatus::Stale => ("stale", None),
            LssStatus::Error(e) => ("error", Some(e)),
        }
    }
}

#[derive(Default)]
struct HubState {
    signers: BTreeMap<String, SignerStatus>,
    /// The control call waiting for `{id}/control-res`, per signer, with its registration number.
    control: HashMap<String, (u64, mpsc::Sender<Bytes>)>,
    next_waiter: u64,
    /// Per signer: the turn of its one control call at a time, and what earlier calls left.
    slots: HashMap<String, Arc<tokio::sync::Mutex<ControlSlot>>>,
    /// The LSS server's key (hex), once a dance reached it.
    lss_server: Option<String>,
}

/// What a signer's control calls leave for the next one.
#[derive(Debug, Default)]
pub struct ControlSlot {
    /// Nonces of calls that timed out: a response carrying one is late, and the API drops it.
    pub late: std::collections::VecDeque<u64>,
}

/// The signers' state for the operator API: who is connected, their last errors, a bounded
/// broadcast of events, and the routing of control responses. Updated only by
/// [`crate::mqtt_link::forward_events`]; nothing here blocks it (the broadcast drops events for
/// subscribers that fall behind, who then see `RecvError::Lagged`).
pub struct SignerHub {
    state: Mutex<HubState>,
    events: broadcast::Sender<SignerEvent>,
}

/// [`SignerHub::control_call`] gave up: another control call to this signer held its turn until
/// the deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("another control call to this signer is in progress; this one was not sent")]
pub struct ControlBusy;

/// The one control call to a signer: holds the signer's turn (one at a time, since the response
/// topic carries no request id) and receives its next `{id}/control-res`. Dropping it ends the
/// call and lets the next one in.
pub struct ControlCall {
    hub: Arc<SignerHub>,
    node_id: String,
    id: u64,
    rx: mpsc::Receiver<Bytes>,
    slot: tokio::sync::OwnedMutexGuard<ControlSlot>,
}

impl ControlCall {
    /// The next control response from the signer (`None` if it disconnected meanwhile).
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    /// What earlier calls to this signer left (late nonces), kept across calls.
    pub fn slot(&mut self) -> &mut ControlSlot {
        &mut self.slot
    }
}

impl Drop for ControlCall {
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

    /// Records the LSS server's key (hex) the signers are synced with: the key an operator
    /// gives a device (`sphinx-key run --lss-server-pubkey`) to check its first dance.
    pub fn set_lss_server(&self, key_hex: String) {
        self.lock().lss_server = Some(key_hex);
    }

    /// The LSS server's key (hex), once a dance reached it.
    pub fn lss_server(&self) -> Option<String> {
        self.lock().lss_server.clone()
    }

    /// Every remembered signer, by identity.
    pub fn signers(&self) -> Vec<SignerStatus> {
        self.lock().signers.values().cloned().collect()
    }

    /// One signer by its identity (client id), if the hub has seen it.
    pub fn signer(&self, client_id: &str) -> Option<SignerStatus> {
        self.lock().signers.get(client_id).cloned()
    }

    /// The signer `id` names: the signer with that identity (client id) if there is one, else
    /// the active signer of the node with that node id, else (none active) that node's only
    /// connected signer, else any signer of it. `None` if the hub knows neither.
    pub fn resolve(&self, id: &str) -> Option<SignerStatus> {
        let st = self.lock();
        if let Some(s) = st.signers.get(id) {
            return Some(s.clone());
        }
        let of_node: Vec<&SignerStatus> = st.signers.values().filter(|s| s.node_id == id).collect();
        if let Some(a) = of_node.iter().find(|s| s.role == Role::Active) {
            return Some((*a).clone());
        }
        let connected: Vec<&&SignerStatus> = of_node.iter().filter(|s| s.connected).collect();
        if connected.len() == 1 {
            return Some((*connected[0]).clone());
        }
        of_node.first().map(|s| (*s).clone())
    }

    /// The active signer of `node_id` that said hello on its current session, if any.
    pub fn active_of(&self, node_id: &str) -> Option<SignerStatus> {
        self.lock().signers.values().find(|s| s.node_id == node_id && s.role == Role::Active && s.ready).cloned()
    }

    /// The relay's view of `client_id`'s role changed.
    pub fn set_role(&self, client_id: &str, role: Role) {
        let mut st = self.lock();
        if let Some(s) = st.signers.get_mut(client_id) {
            s.role = role;
        }
    }

    /// Begins the (single) control call to `node_id`: waits until `deadline` for the signer's
    /// turn (another call may hold it), then registers for its next control response. Begin
    /// before publishing the request, so that a fast answer is not missed.
    pub async fn control_call(
        self: &Arc<Self>,
        node_id: &str,
        deadline: tokio::time::Instant,
    ) -> Result<ControlCall, ControlBusy> {
        let turn = {
            let mut st = self.lock();
            if st.slots.len() > 128 {
                // Forget idle slots of signers that are gone (nobody holds or waits for them).
                st.slots.retain(|_, s| {
                    Arc::strong_count(s) > 1 || s.try_lock().map(|g| !g.late.is_empty()).unwrap_or(true)
                });
            }
            st.slots.entry(node_id.to_string()).or_default().clone()
        };
        let slot = tokio::time::timeout_at(deadline, turn.lock_owned()).await.map_err(|_| ControlBusy)?;
        let mut st = self.lock();
        st.next_waiter += 1;
        let id = st.next_waiter;
        let (tx, rx) = mpsc::channel(4);
        st.control.insert(node_id.to_string(), (id, tx));
        Ok(ControlCall { hub: self.clone(), node_id: node_id.to_string(), id, rx, slot })
    }

    /// Whether anyone listens to the events (an open `/v1/events` stream).
    pub fn has_subscribers(&self) -> bool {
        self.events.receiver_count() > 0
    }

    /// Broadcasts a `status` event (JSON text).
    pub fn publish_status(&self, json: Arc<str>) {
        self.send(SignerEvent::Status(json));
    }

    fn send(&self, ev: SignerEvent) {
        // Err only means nobody is subscribed.
        let _ = self.events.send(ev);
    }

    fn entry<'a>(st: &'a mut HubState, client_id: &str, now: u64) -> &'a mut SignerStatus {
        if !st.signers.contains_key(client_id) && st.signers.len() >= MAX_REMEMBERED_SIGNERS {
            let oldest =
                st.signers.values().filter(|s| !s.connected).min_by_key(|s| s.since).map(|s| s.client_id.clone());
            if let Some(old) = oldest {
                st.signers.remove(&old);
            }
        }
        st.signers.entry(client_id.to_string()).or_insert_with(|| SignerStatus {
            client_id: client_id.to_string(),
            // Until a login says otherwise (legacy identities are node ids).
            node_id: client_id.to_string(),
            role: Role::None,
            connected: false,
            ready: false,
            since: now,
            last_error: None,
            lss: LssStatus::Off,
            error_seq: false,
        })
    }

    /// A session for `client_id`, logged in with key `node_id`, began.
    pub fn on_connected(&self, client_id: &str, node_id: &str) {
        let now = unix_now();
        {
            let mut st = self.lock();
            let s = Self::entry(&mut st, client_id, now);
            s.node_id = node_id.to_string();
            s.connected = true;
            s.ready = false;
            s.role = Role::None;
            s.since = now;
        }
        self.send(SignerEvent::Connected { node_id: node_id.to_string(), client_id: client_id.to_string(), time: now });
    }

    /// `client_id` said hello; `error_seq`: it announced `error-seq`.
    pub fn on_ready(&self, client_id: &str, error_seq: bool) {
        let now = unix_now();
        let node_id = {
            let mut st = self.lock();
            let s = Self::entry(&mut st, client_id, now);
            if !s.connected {
                s.connected = true;
                s.since = now;
            }
            s.ready = true;
            s.error_seq = error_seq;
            s.node_id.clone()
        };
        self.send(SignerEvent::Ready { node_id, client_id: client_id.to_string(), time: now });
    }

    /// `client_id`'s session ended (or it said bye).
    pub fn on_disconnected(&self, client_id: &str) {
        let now = unix_now();
        let (was_connected, node_id) = {
            let mut st = self.lock();
            let s = Self::entry(&mut st, client_id, now);
            let was = s.connected;
            s.connected = false;
            s.ready = false;
            if s.role != Role::Refused {
                s.role = Role::None;
            }
            if was {
                s.since = now;
            }
            let node_id = s.node_id.clone();
            // A control call waiting on this signer learns at once that no answer will come.
            st.control.remove(client_id);
            (was, node_id)
        };
        if was_connected {
            self.send(SignerEvent::Disconnected { node_id, client_id: client_id.to_string(), time: now });
        }
    }

    /// `node_id` published on `{id}/error`.
    pub fn on_error(&self, node_id: &str, report: error_report::ErrorReport) {
        let now = unix_now();
        let report = SignerErrorReport::new(node_id, report, now);
        {
            let mut st = self.lock();
            Self::entry(&mut st, node_id, now).last_error = Some(report.clone());
        }
        self.send(SignerEvent::Error(report));
    }

    /// The relay's view of `node_id`'s LSS backup changed.
    pub fn set_lss(&self, node_id: &str, status: LssStatus) {
        let mut st = self.lock();
        Self::entry(&mut st, node_id, unix_now()).lss = status;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reports_decode_any_payload() {
        let r = SignerErrorReport::decode("a", b"\x00\x07policy failure: x", 5);
        assert_eq!((r.seq, r.text.as_str(), r.time), (Some(7), "policy failure: x", 5));
        assert_eq!(SignerErrorReport::decode("a", b"x", 0).seq, None);
        assert_eq!(SignerErrorReport::decode("a", b"", 0).text, "");
        let r = SignerErrorReport::decode("a", b"\x00\x01\xff\xfe", 0);
        assert_eq!(r.text, "\u{fffd}\u{fffd}");
        let long = vec![b'a'; 10_000];
        assert_eq!(SignerErrorReport::decode("a", &long, 0).text.len(), error_report::MAX_TEXT);
    }

    #[tokio::test]
    async fn hub_tracks_state_and_routes_control_to_one_call() {
        let hub = Arc::new(SignerHub::new(4));
        let mut sub = hub.subscribe();
        hub.on_connected("a", "a");
        hub.on_ready("a", true);
        hub.on_error("a", error_report::decode(b"\x00\x02no"));
        let s = hub.signer("a").unwrap();
        assert!(s.connected && s.ready);
        assert_eq!(s.last_error.as_ref().map(|e| e.seq), Some(Some(2)));
        assert!(matches!(sub.recv().await.unwrap(), SignerEvent::Connected { .. }));
        assert!(matches!(sub.recv().await.unwrap(), SignerEvent::Ready { .. }));
        assert!(matches!(sub.recv().await.unwrap(), SignerEvent::Error(_)));
        // One call per signer; a response goes to it; a dropped call frees the turn.
        let now = tokio::time::Instant::now;
        let mut w = hub.control_call("a", now()).await.unwrap();
        assert_eq!(hub.control_call("a", now()).await.err(), Some(ControlBusy));
        hub.on_control_response("a", Bytes::from_static(b"r1"));
        hub.on_control_response("b", Bytes::from_static(b"other"));
        assert_eq!(w.recv().await.unwrap(), Bytes::from_static(b"r1"));
        drop(w);
        hub.on_control_response("a", Bytes::from_static(b"late"));
        let mut w2 = hub.control_call("a", now()).await.unwrap();
        hub.on_control_response("a", Bytes::from_static(b"r2"));
        assert_eq!(w2.recv().await.unwrap(), Bytes::from_static(b"r2"));
        drop(w2);
        let mut w3 = hub.control_call("a", now()).await.unwrap();
        hub.on_disconnected("a");
        assert_eq!(w3.recv().await, None, "a disconnect ends the wait");
        assert!(!hub.signer("a").unwrap().connected);
        assert!(hub.signer("a").unwrap().last_error.is_some());
        // A slow subscriber lags instead of blocking.
        for _ in 0..10 {
            hub.on_error("a", error_report::decode(b"\x00\x01x"));
        }
        assert!(matches!(sub.recv().await, Err(broadcast::error::RecvError::Lagged(7))));
        assert!(matches!(sub.recv().await, Ok(SignerEvent::Error(_))));
    }

    #[test]
    fn hub_forgets_oldest_disconnected_signers_beyond_the_bound() {
        let hub = SignerHub::new(4);
        for i in 0..MAX_REMEMBERED_SIGNERS + 10 {
            let id = format!("s{i:03}");
            hub.on_connected(&id, "n");
            hub.on_disconnected(&id);
        }
        hub.on_connected("live", "n");
        assert_eq!(hub.signers().len(), MAX_REMEMBERED_SIGNERS);
        assert!(hub.signer("live").unwrap().connected);
    }
}
