//! An embeddable MQTT 3.1.1 server for tokio, with per-client topic ACLs (see `docs/mqtt.md`).
//!
//! It runs inside the application's process, as a small tokio task tree: the application
//! decides who may log in (an [`Authenticator`]), which topics each client may publish and
//! subscribe to (an [`Authorizer`]; the default, [`OwnPrefix`], confines every client to topics
//! under its own identity), publishes to clients through an [`MqttHandle`], and reads what clients
//! publish from an explicit event stream ([`MqttEvents`]). It knows nothing of what the messages
//! mean.
//!
//! # Example: a server with per-client ACLs
//!
//! Sensors log in with a password and publish under their own prefix; the `dashboard` client may
//! in addition read every sensor's `temp` topic.
//!
//! ```
//! use std::collections::HashMap;
//!
//! use sphinx_mqtt_server::{self as mqtt, Authenticator, Authorizer, Limits, MqttConfig, MqttEvent, OwnPrefix};
//!
//! /// User name → password; a client's identity is its user name.
//! struct Users(HashMap<String, String>);
//!
//! /// Why a login was refused (logged by the server, never sent to the client).
//! #[derive(Debug)]
//! struct BadLogin;
//! impl std::fmt::Display for BadLogin {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
//!         f.write_str("unknown user or wrong password")
//!     }
//! }
//! impl std::error::Error for BadLogin {}
//!
//! impl Authenticator for Users {
//!     type Error = BadLogin;
//!     fn authenticate(&self, _client_id: &str, user: Option<&str>, pass: Option<&[u8]>) -> Result<String, BadLogin> {
//!         match (user, pass) {
//!             (Some(u), Some(p)) if self.0.get(u).is_some_and(|want| want.as_bytes() == p) => Ok(u.to_string()),
//!             _ => Err(BadLogin),
//!         }
//!     }
//! }
//!
//! /// Everyone gets their own prefix; the dashboard may also subscribe to `+/temp`.
//! struct Acl;
//! impl Authorizer for Acl {
//!     fn may_publish(&self, identity: &str, topic: &str) -> bool {
//!         OwnPrefix.may_publish(identity, topic)
//!     }
//!     fn may_subscribe(&self, identity: &str, filter: &str) -> bool {
//!         OwnPrefix.may_subscribe(identity, filter) || (identity == "dashboard" && filter == "+/temp")
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let users = Users(HashMap::from([("sensor-1".into(), "s3cret".into()), ("dashboard".into(), "pw".into())]));
//! let cfg = MqttConfig::new("127.0.0.1:0".parse()?); // port 0: any free port
//! let (server, mut events) = mqtt::start_with(cfg, Limits::default(), users, Acl).await?;
//! println!("MQTT on {}", server.local_addr());
//!
//! // The application publishes without ACL checks: here a command for sensor-1 (if subscribed).
//! server.publish("sensor-1/cmd", "calibrate".into())?;
//!
//! server.shutdown();
//! drop(server);
//! // Every client's publishes arrive here, in order, after the ACL check; the stream ends when
//! // the server is shut down and its handles are dropped.
//! while let Some(event) = events.recv().await {
//!     match event {
//!         MqttEvent::Connected { identity, .. } => println!("{identity} logged in"),
//!         MqttEvent::Message { identity, topic, payload, .. } => println!("{identity}: {topic} {payload:?}"),
//!         MqttEvent::Disconnected { identity, .. } => println!("{identity} left"),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Design
//!
//! * [`start`] binds a TCP listener and spawns an **accept loop**. Every accepted socket gets
//!   `TCP_NODELAY` and its own **connection task**; the number of connections still in the
//!   CONNECT handshake and the number of authenticated sessions are each capped at
//!   [`MqttConfig::max_clients`], and handshakes per source address at
//!   [`Limits::max_handshakes_per_ip`]. When either handshake cap is reached, the oldest
//!   connection that has not yet sent a complete CONNECT is shed to admit the newcomer, so idle
//!   sockets cannot keep a legitimate client out.
//! * With [`MqttConfig::tls`] set, the connection task first runs the TLS handshake (rustls,
//!   `ring` provider, certificate chain and key from PEM files); TCP and TLS then share one code
//!   path, generic over the stream (`AsyncRead + AsyncWrite`). A plaintext listener on an address
//!   that is not loopback is refused by [`start`] unless
//!   [`MqttConfig::allow_plaintext_non_loopback`] is set.
//! * The connection task reads the CONNECT (TLS handshake and CONNECT together within
//!   [`Limits::connect_timeout`]), asks the [`Authenticator`] for the client's **identity**, and
//!   registers a session under that identity. One identity has at most one session: a second
//!   CONNECT for the same identity takes over (the old connection is closed and its
//!   [`MqttEvent::Disconnected`] is emitted *before* the new [`MqttEvent::Connected`]).
//! * After CONNACK the socket is split: the connection task keeps reading and handles packets
//!   (ACL, events, acknowledgements), and a **writer task** drains a bounded queue of encoded
//!   frames ([`Limits::outbound_queue`] frames, [`Limits::outbound_queue_bytes`] bytes). Everything
//!   sent to a client — acknowledgements and publishes routed by [`MqttHandle::publish`] or by
//!   other clients — goes through that queue without waiting; a client whose queue is full, or
//!   whose socket accepts nothing for [`Limits::write_stall_timeout`], is not reading and is
//!   dropped.
//! * Every PUBLISH and SUBSCRIBE filter is checked by the [`Authorizer`]: a refused publish is
//!   dropped (and acknowledged, so the client cannot tell), a refused filter gets SUBACK failure.
//! * Packets are decoded and encoded with `rumqttc::mqttbytes::v4` (the MQTT 3.1.1 codec of the
//!   `rumqttc` crate); topic validation and matching are in [`topic`] because the codec's matcher
//!   can panic on some UTF-8 input.
//! * Every allowed client publish becomes an [`MqttEvent::Message`] on the bounded event stream
//!   returned by [`start`] (the connection awaits space, i.e. a slow application back-pressures
//!   clients), and is routed to matching subscribers.
//!
//! Nothing from the network can panic this crate: malformed or oversized packets, protocol
//! violations and timeouts close the offending connection with a `tracing` log carrying the
//! connection id, the peer address and (once known) the identity.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![warn(missing_docs)]

mod conn;
mod prelogin;
pub mod topic;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::Publish;
use rumqttc::mqttbytes::QoS;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

/// Server configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// Address to listen on (port 0 picks a free port; see [`MqttHandle::local_addr`]).
    pub listen: SocketAddr,
    /// Largest PUBLISH payload accepted from a client or sent with [`MqttHandle::publish`], in
    /// bytes. A client sending a bigger packet is disconnected.
    pub max_payload: usize,
    /// Maximum number of authenticated sessions, and separately of connections still in the
    /// CONNECT handshake.
    pub max_clients: usize,
    /// Largest keep-alive (seconds) a client may use; a client asking for 0 (none) or more is
    /// held to this value. 0 here means "no limit" (and a client keep-alive of 0 then disables the
    /// timeout for it).
    pub keep_alive_max: u16,
    /// Capacity of the [`MqttEvent`] channel returned by [`start`].
    pub event_capacity: usize,
    /// Serve MQTT over TLS with this certificate and key (`None`: plaintext TCP).
    pub tls: Option<TlsSettings>,
    /// Allow a plaintext (non-TLS) listener on an address that is not loopback. Off by default:
    /// [`start`] then refuses such a configuration with [`StartError::PlaintextNonLoopback`], so
    /// tokens and signing requests never cross a network in clear text by accident.
    pub allow_plaintext_non_loopback: bool,
}

/// The TLS identity of the server: PEM files, read once at [`start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Certificate chain, PEM, the server's certificate first (then intermediates, if any).
    pub cert_chain: PathBuf,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
}

/// Why [`start`] could not start the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Plaintext on a non-loopback address without [`MqttConfig::allow_plaintext_non_loopback`].
    #[error(
        "refusing to serve MQTT without TLS on non-loopback address {0}: configure a TLS \
         certificate and key, listen on 127.0.0.1 or ::1, or explicitly allow plaintext on \
         non-loopback addresses"
    )]
    PlaintextNonLoopback(SocketAddr),
    /// The TLS certificate or key could not be loaded or used.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] sphinx_tls::Error),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// True for 127.0.0.0/8, `::1` and IPv4-mapped loopback (`::ffff:127.x.y.z`).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

impl MqttConfig {
    /// A configuration listening on `listen` with the defaults: 1 MiB payloads, 64 clients,
    /// keep-alive at most 120 s, 1024 queued events, plaintext (no TLS), and plaintext allowed
    /// on loopback addresses only.
    pub fn new(listen: SocketAddr) -> Self {
        MqttConfig {
            listen,
            max_payload: 1 << 20,
            max_clients: 64,
            keep_alive_max: 120,
            event_capacity: 1024,
            tls: None,
            allow_plaintext_non_loopback: false,
        }
    }
}

/// Secondary limits, with sensible [`Default`]s; pass them with [`start_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Time a new connection has to finish the TLS handshake (if any) and deliver its CONNECT
    /// packet (default 5 s).
    pub connect_timeout: Duration,
    /// Connections from one source (an IPv4 address, or an IPv6 /64) that may be in the
    /// handshake (between accept and CONNACK) at once (default 4; loopback is not exempt). A
    /// newcomer beyond it sheds that source's oldest connection that has not yet sent a complete
    /// CONNECT; if there is none, the newcomer is closed.
    pub max_handshakes_per_ip: usize,
    /// Frames queued for one client before it is dropped as too slow (default 1024).
    pub outbound_queue: usize,
    /// Bytes queued for one client, including the write in progress, before it is dropped as too
    /// slow (default 4 MiB; raised to one largest PUBLISH frame if smaller, so one maximal
    /// publish always fits an empty queue).
    pub outbound_queue_bytes: usize,
    /// A write to a client that makes no progress (not one byte accepted) for this long drops it
    /// as not reading (default 30 s).
    pub write_stall_timeout: Duration,
    /// Outbound QoS 1 publishes a client may leave unacknowledged before it is dropped
    /// (default 1024; at most 65535).
    pub max_inflight: usize,
    /// Subscriptions one session may hold; further filters get SUBACK failure (default 64).
    pub max_subscriptions: usize,
    /// On takeover, how long the new connection waits for the old one to finish closing
    /// before it proceeds anyway (default 5 s).
    pub takeover_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(5),
            max_handshakes_per_ip: 4,
            outbound_queue: 1024,
            outbound_queue_bytes: 4 << 20,
            write_stall_timeout: Duration::from_secs(30),
            max_inflight: 1024,
            max_subscriptions: 64,
            takeover_wait: Duration::from_secs(5),
        }
    }
}

/// Largest CONNECT packet accepted (remaining length), before the client is authenticated.
pub const MAX_CONNECT_PACKET: usize = 64 * 1024;

/// Decides who may connect, and under which identity.
pub trait Authenticator: Send + Sync + 'static {
    /// Why a login is refused (logged with the connection; the client only gets the CONNACK code).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decide a CONNECT. `Ok(identity)` = the client's identity (what the [`Authorizer`] and the
    /// events name it by); `Err` = refuse (CONNACK 0x04 "bad user name or password" if a username
    /// was given, else 0x05 "not authorized") and log the error.
    ///
    /// Empty usernames and passwords arrive as `None` (the codec cannot tell them from absent
    /// ones). An identity that is not [`topic::valid_identity`] (e.g. contains `/`) is refused.
    /// Called on the connection's task; keep it fast (a signature check is fine).
    fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<String, Self::Error>;
}

impl<F, E> Authenticator for F
where
    F: Fn(&str, Option<&str>, Option<&[u8]>) -> Result<String, E> + Send + Sync + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    type Error = E;
    fn authenticate(&self, client_id: &str, username: Option<&str>, password: Option<&[u8]>) -> Result<String, E> {
        self(client_id, username, password)
    }
}

/// [`Authenticator`] with its error erased to the text the server logs (the server only logs it).
trait Login: Send + Sync + 'static {
    fn login(&self, client_id: &str, username: Option<&str>, password: Option<&[u8]>) -> Result<String, String>;
}

impl<A: Authenticator> Login for A {
    fn login(&self, client_id: &str, username: Option<&str>, password: Option<&[u8]>) -> Result<String, String> {
        self.authenticate(client_id, username, password).map_err(|e| e.to_string())
    }
}

/// Decides which topics an authenticated client may publish to and subscribe to (the ACL).
///
/// Both are asked only with a syntactically valid topic name ([`topic::valid_topic`]) or filter
/// ([`topic::valid_filter`]) and an identity the [`Authenticator`] returned. Routing follows the
/// granted filters exactly: a client receives every publish matching a filter it was granted.
pub trait Authorizer: Send + Sync + 'static {
    /// May `identity` publish to `topic`? A refused publish is dropped (still acknowledged).
    fn may_publish(&self, identity: &str, topic: &str) -> bool;
    /// May `identity` subscribe to `filter`? A refused filter gets SUBACK failure.
    fn may_subscribe(&self, identity: &str, filter: &str) -> bool;
}

/// The default ACL: a client publishes and subscribes only under its own identity,
/// `{identity}/…` ([`topic::topic_allowed`], [`topic::filter_allowed`]). A filter must start with
/// the literal `{identity}/`, so wildcards (`#`, `+/x`, `$SYS/#`) never reach another client's
/// topics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnPrefix;

impl Authorizer for OwnPrefix {
    fn may_publish(&self, identity: &str, topic: &str) -> bool {
        topic::topic_allowed(identity, topic)
    }
    fn may_subscribe(&self, identity: &str, filter: &str) -> bool {
        topic::filter_allowed(identity, filter)
    }
}

/// What the server tells the application. For one identity the events are ordered:
/// `Connected{conn_id: a}`, `Message{conn_id: a}`…, `Disconnected{conn_id: a}`, then the next
/// connection's `Connected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MqttEvent {
    /// A client authenticated as `identity` (CONNACK already sent).
    Connected {
        /// The identity returned by the [`Authenticator`].
        identity: String,
        /// Unique id of this connection (never reused while the server runs).
        conn_id: u64,
    },
    /// The connection `conn_id` of `identity` ended (client DISCONNECT, error, keep-alive
    /// timeout, takeover, [`MqttHandle::disconnect`] or a full queue).
    Disconnected {
        /// The identity of the connection.
        identity: String,
        /// The connection that ended.
        conn_id: u64,
    },
    /// A PUBLISH from an authenticated client (already ACL-checked).
    Message {
        /// Identity of the publisher.
        identity: String,
        /// The connection it came on.
        conn_id: u64,
        /// Topic name, allowed for `identity` by the [`Authorizer`] (with [`OwnPrefix`]: under
        /// `{identity}/`).
        topic: String,
        /// Payload, at most [`MqttConfig::max_payload`] bytes.
        payload: Bytes,
    },
}

/// The server's events, in order ([`MqttEvent`] says which order), returned by [`start`].
///
/// Bounded ([`MqttConfig::event_capacity`]): while the application does not read, connections
/// wait to deliver their clients' publishes (back-pressure, nothing is dropped). Ends (`None`)
/// once the server is shut down and every [`MqttHandle`] is dropped.
#[derive(Debug)]
pub struct MqttEvents {
    rx: mpsc::Receiver<MqttEvent>,
}

impl MqttEvents {
    /// The next event; `None` once the server is gone.
    pub async fn recv(&mut self) -> Option<MqttEvent> {
        self.rx.recv().await
    }

    /// The next event if one is already queued (`None` if none is, or the server is gone).
    pub fn try_recv(&mut self) -> Option<MqttEvent> {
        self.rx.try_recv().ok()
    }
}

/// Errors from [`MqttHandle::publish`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    /// The topic is empty, too long, or contains wildcards or NUL.
    #[error("invalid topic name {0:?}")]
    InvalidTopic(String),
    /// The payload is larger than [`MqttConfig::max_payload`].
    #[error("payload of {size} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Payload size.
        size: usize,
        /// The configured limit.
        max: usize,
    },
}

/// A session's outbound queue: encoded frames for its writer task, bounded in frames (the
/// channel) and in bytes (`bytes`, counted from enqueue until the writer has written them).
#[derive(Clone)]
struct OutQueue {
    tx: mpsc::Sender<Bytes>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// Why a frame could not be queued.
enum QueueError {
    /// Full in frames or in bytes: the client is not keeping up.
    Full,
    /// The writer is gone (the connection is closing).
    Closed,
}

impl OutQueue {
    /// Queues `frame` without waiting.
    fn push(&self, frame: Bytes) -> Result<(), QueueError> {
        let n = frame.len();
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| q.checked_add(n).filter(|t| *t <= self.max_bytes))
            .map_err(|_| QueueError::Full)?;
        self.tx.try_send(frame).map_err(|e| {
            self.written(n);
            match e {
                mpsc::error::TrySendError::Full(_) => QueueError::Full,
                mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
            }
        })
    }

    /// `n` queued bytes have left the queue (written, or never queued).
    fn written(&self, n: usize) {
        let _ = self.bytes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| Some(q.saturating_sub(n)));
    }

    fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

/// One authenticated session, as seen by routing and by the handle.
struct SessionEntry {
    conn_id: u64,
    peer: SocketAddr,
    /// Encoded frames for the writer task.
    out: OutQueue,
    /// Closes the connection (takeover, `disconnect`, slow client, shutdown).
    kill: Arc<Notify>,
    /// Becomes `true` when the connection task has finished (after its `Disconnected`).
    done: watch::Receiver<bool>,
    /// Filter → granted QoS (0 or 1).
    subs: Vec<(String, QoS)>,
    /// Next outbound packet id (1..=65535).
    next_pkid: u16,
    /// Unacknowledged outbound QoS 1 publishes.
    inflight: Arc<AtomicUsize>,
    /// Set once the session has been told to close, so it is skipped and logged only once.
    killed: bool,
}

impl SessionEntry {
    fn kill(&mut self, identity: &str, why: &str) {
        if !self.killed {
            warn!(identity, conn = self.conn_id, peer = %self.peer, "dropping client: {why}");
            self.killed = true;
            self.kill.notify_one();
        }
    }
}

struct Shared {
    cfg: MqttConfig,
    limits: Limits,
    local_addr: SocketAddr,
    auth: Box<dyn Login>,
    acl: Box<dyn Authorizer>,
    events: mpsc::Sender<MqttEvent>,
    sessions: Mutex<HashMap<String, SessionEntry>>,
    next_conn: AtomicU64,
    /// Connections between accept and CONNACK.
    handshakes: Arc<prelogin::Prelogin>,
    /// Bumped on every subscription change (for [`MqttHandle::wait_subscriber`]).
    subs_changed: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
}

/// Locks, recovering from poisoning (no code path panics while holding it, but never cascade).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn qos_rank(q: QoS) -> u8 {
    q as u8
}

impl Shared {
    /// Largest remaining length the codec accepts after CONNECT: the payload limit plus the
    /// largest PUBLISH variable header (topic length prefix, 65535-byte topic, packet id).
    fn max_packet(&self) -> usize {
        self.cfg.max_payload.saturating_add(2 + usize::from(u16::MAX) + 2)
    }

    async fn emit(&self, ev: MqttEvent) {
        if self.events.send(ev).await.is_err() {
            debug!("event receiver dropped; event discarded");
        }
    }

    /// Delivers a publish to every session with a matching subscription, at
    /// `min(qos, granted)`. Returns how many sessions it was queued for.
    fn route(&self, topic: &str, payload: &Bytes, qos: QoS) -> usize {
        let mut map = lock(&self.sessions);
        let mut queued = 0;
        for (identity, s) in map.iter_mut() {
            if s.killed {
                continue;
            }
            let Some(granted) =
                s.subs.iter().filter(|(f, _)| topic::matches(topic, f)).map(|(_, q)| *q).max_by_key(|q| qos_rank(*q))
            else {
                continue;
            };
            let qos = if qos_rank(qos) < qos_rank(granted) { qos } else { granted };
            queued += self.deliver(identity, s, topic, payload, qos);
        }
        queued
    }

    /// Queues one publish for one session (1 if queued).
    fn deliver(&self, identity: &str, s: &mut SessionEntry, topic: &str, payload: &Bytes, qos: QoS) -> usize {
        let mut publish = Publish::from_bytes(topic, qos, payload.clone());
        if qos == QoS::AtLeastOnce {
            if s.inflight.load(Ordering::Relaxed) >= self.limits.max_inflight {
                s.kill(identity, "too many unacknowledged QoS 1 publishes");
                return 0;
            }
            publish.pkid = s.next_pkid;
            s.next_pkid = s.next_pkid.checked_add(1).unwrap_or(1);
        }
        let mut frame = BytesMut::with_capacity(publish.size());
        if let Err(e) = publish.write(&mut frame) {
            warn!(topic, "cannot encode publish: {e}");
            return 0;
        }
        match s.out.push(frame.freeze()) {
            Ok(()) => {
                if qos == QoS::AtLeastOnce {
                    s.inflight.fetch_add(1, Ordering::Relaxed);
                }
                debug!(identity, conn = s.conn_id, topic, bytes = payload.len(), "routed");
                1
            }
            Err(QueueError::Full) => {
                s.kill(identity, "outbound queue full (client not reading fast enough)");
                0
            }
            Err(QueueError::Closed) => 0,
        }
    }

    fn has_subscriber(&self, topic: &str) -> bool {
        lock(&self.sessions).values().any(|s| !s.killed && s.subs.iter().any(|(f, _)| topic::matches(topic, f)))
    }

    fn bump_subs(&self) {
        self.subs_changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// Cloneable handle to a running server.
#[derive(Clone)]
pub struct MqttHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MqttHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttHandle").field("local_addr", &self.shared.local_addr).finish()
    }
}

impl MqttHandle {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Publish from the application (trusted, no ACL) to all subscribers matching
    /// `topic`: QoS 1 to subscribers that asked for QoS ≥ 1, else QoS 0. Publishing to a topic
    /// nobody subscribes to is not an error (see [`MqttHandle::publish_count`]).
    pub fn publish(&self, topic: &str, payload: Bytes) -> Result<(), MqttError> {
        self.publish_count(topic, payload).map(|_| ())
    }

    /// Like [`MqttHandle::publish`], returning the number of sessions it was queued for (with
    /// [`OwnPrefix`], 0 or 1: only the identity named by the topic's first level can subscribe
    /// to it).
    pub fn publish_count(&self, topic: &str, payload: Bytes) -> Result<usize, MqttError> {
        if !topic::valid_topic(topic) {
            return Err(MqttError::InvalidTopic(topic.chars().take(200).collect()));
        }
        if payload.len() > self.shared.cfg.max_payload {
            return Err(MqttError::PayloadTooLarge { size: payload.len(), max: self.shared.cfg.max_payload });
        }
        Ok(self.shared.route(topic, &payload, QoS::AtLeastOnce))
    }

    /// Drop a client (e.g. the application no longer trusts its login). Its
    /// [`MqttEvent::Disconnected`] follows. No effect if `identity` is not connected.
    pub fn disconnect(&self, identity: &str) {
        let entry = lock(&self.shared.sessions).remove(identity);
        if let Some(mut s) = entry {
            info!(identity, conn = s.conn_id, peer = %s.peer, "disconnecting client on request");
            s.killed = true;
            s.kill.notify_one();
            self.shared.bump_subs();
        }
    }

    /// Identities with a live session, sorted.
    pub fn connected(&self) -> Vec<String> {
        let mut v: Vec<String> =
            lock(&self.shared.sessions).iter().filter(|(_, s)| !s.killed).map(|(k, _)| k.clone()).collect();
        v.sort();
        v
    }

    /// Bytes queued for `identity`'s session or being written to its socket, at most
    /// [`Limits::outbound_queue_bytes`] (`None` if it has no live session). What the server
    /// buffers for that client, for tests and monitoring.
    pub fn outbound_bytes(&self, identity: &str) -> Option<usize> {
        lock(&self.shared.sessions).get(identity).filter(|s| !s.killed).map(|s| s.out.queued_bytes())
    }

    /// Is some session subscribed to a filter matching `topic`?
    pub fn has_subscriber(&self, topic: &str) -> bool {
        self.shared.has_subscriber(topic)
    }

    /// Waits until some session is subscribed to a filter matching `topic` (returns at once if
    /// one already is). Lets the application hold messages until a client can receive them.
    pub async fn wait_subscriber(&self, topic: &str) {
        let mut rx = self.shared.subs_changed.subscribe();
        loop {
            rx.borrow_and_update();
            if self.shared.has_subscriber(topic) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Stops accepting connections and closes every session (each emits `Disconnected`).
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        let mut map = lock(&self.shared.sessions);
        for (id, s) in map.iter_mut() {
            s.kill(id, "server shutting down");
        }
        map.clear();
        drop(map);
        self.shared.bump_subs();
    }
}

/// Binds, spawns the accept loop, returns a handle (cloneable) and the event stream for the
/// application. Uses the [`OwnPrefix`] ACL and [`Limits::default`]; see [`start_with`].
///
/// Fails if the TLS files cannot be loaded, if the listener would be plaintext on a
/// non-loopback address without [`MqttConfig::allow_plaintext_non_loopback`], or if the address
/// cannot be bound.
pub async fn start(cfg: MqttConfig, auth: impl Authenticator) -> Result<(MqttHandle, MqttEvents), StartError> {
    start_with(cfg, Limits::default(), auth, OwnPrefix).await
}

/// [`start`] with explicit secondary [`Limits`] and an [`Authorizer`].
pub async fn start_with(
    cfg: MqttConfig,
    limits: Limits,
    auth: impl Authenticator,
    acl: impl Authorizer,
) -> Result<(MqttHandle, MqttEvents), StartError> {
    let tls = match &cfg.tls {
        Some(t) => Some(TlsAcceptor::from(sphinx_tls::server_config(&t.cert_chain, &t.private_key)?)),
        None if !is_loopback(cfg.listen.ip()) && !cfg.allow_plaintext_non_loopback => {
            return Err(StartError::PlaintextNonLoopback(cfg.listen));
        }
        None => None,
    };
    if tls.is_none() && !is_loopback(cfg.listen.ip()) {
        warn!(listen = %cfg.listen, "MQTT without TLS on a non-loopback address (explicitly allowed): logins and messages travel in clear text");
    }
    let bind_err = |source| StartError::Bind { addr: cfg.listen, source };
    let listener = TcpListener::bind(cfg.listen).await.map_err(bind_err)?;
    let local_addr = listener.local_addr().map_err(bind_err)?;
    let (events, rx) = mpsc::channel(cfg.event_capacity.max(1));
    // One largest PUBLISH frame: its remaining length plus a 5-byte fixed header at most.
    let max_frame = cfg.max_payload.saturating_add(2 + usize::from(u16::MAX) + 2 + 5);
    if limits.outbound_queue_bytes < max_frame {
        info!(
            outbound_queue_bytes = limits.outbound_queue_bytes,
            max_frame, "outbound_queue_bytes raised to one largest PUBLISH frame"
        );
    }
    let limits = Limits {
        outbound_queue: limits.outbound_queue.max(1),
        outbound_queue_bytes: limits.outbound_queue_bytes.max(max_frame),
        max_handshakes_per_ip: limits.max_handshakes_per_ip.max(1),
        max_inflight: limits.max_inflight.clamp(1, usize::from(u16::MAX)),
        ..limits
    };
    let shared = Arc::new(Shared {
        handshakes: prelogin::Prelogin::new(cfg.max_clients, limits.max_handshakes_per_ip),
        cfg,
        limits,
        local_addr,
        auth: Box::new(auth),
        acl: Box::new(acl),
        events,
        sessions: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        subs_changed: watch::channel(0).0,
        shutdown: watch::channel(false).0,
    });
    info!(%local_addr, tls = tls.is_some(), "MQTT server listening");
    tokio::spawn(accept_loop(shared.clone(), listener, tls));
    Ok((MqttHandle { shared }, MqttEvents { rx }))
}

/// Minimum interval between two warnings about handshake slots (an attacker can cause one per
/// connection).
const SLOT_WARN_EVERY: Duration = Duration::from_secs(10);

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, tls: Option<TlsAcceptor>) {
    let mut shutdown = shared.shutdown.subscribe();
    let (mut shed_warn, mut full_warn) =
        (prelogin::Throttle::new(SLOT_WARN_EVERY), prelogin::Throttle::new(SLOT_WARN_EVERY));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|v| *v) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let slot = match shared.handshakes.admit(conn_id, peer.ip()) {
            Ok(prelogin::Admitted { slot, shed }) => {
                if let Some(old) = shed {
                    debug!(conn = conn_id, %peer, shed_conn = old, "handshake slots full: shed the oldest connection without CONNECT");
                    if let Some(suppressed) = shed_warn.allow() {
                        warn!(conn = conn_id, %peer, suppressed, "handshake slots full (max_clients or max_handshakes_per_ip): shedding the oldest connections that have not sent CONNECT");
                    }
                }
                slot
            }
            Err(full) => {
                debug!(conn = conn_id, %peer, ?full, "handshake slots full, all authenticating; closing");
                if let Some(suppressed) = full_warn.allow() {
                    warn!(conn = conn_id, %peer, ?full, suppressed, "too many connections in handshake; closing");
                }
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            warn!(conn = conn_id, %peer, "cannot set TCP_NODELAY: {e}");
        }
        let span = tracing::info_span!(
            "mqtt",
            conn = conn_id,
            peer = %peer,
            identity = tracing::field::Empty
        );
        tokio::spawn(serve(shared.clone(), tls.clone(), stream, peer, conn_id, slot).instrument(span));
    }
    info!("MQTT server stopped accepting");
}

/// Runs one accepted connection: the TLS handshake if configured, then [`conn::run`]. The
/// handshake and the CONNECT share one deadline ([`Limits::connect_timeout`]) and the
/// handshake slot (`slot`; the connection closes if it is shed).
async fn serve(
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    stream: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    slot: prelogin::Slot,
) {
    let deadline = tokio::time::Instant::now() + shared.limits.connect_timeout;
    let Some(acceptor) = tls else {
        conn::run(shared, stream, peer, conn_id, slot, deadline).await;
        return;
    };
    let mut shutdown = shared.shutdown.subscribe();
    let handshake = tokio::select! {
        r = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => r,
        _ = shutdown.wait_for(|v| *v) => return,
        () = slot.shed() => {
            debug!("closed during the TLS handshake to make room for a newer connection");
            return;
        }
    };
    match handshake {
        Ok(Ok(stream)) => {
            let (_, session) = stream.get_ref();
            debug!(
                version = ?session.protocol_version(),
                cipher = ?session.negotiated_cipher_suite().map(|c| c.suite()),
                "TLS handshake done"
            );
            conn::run(shared, stream, peer, conn_id, slot, deadline).await;
        }
        Ok(Err(e)) => warn!("TLS handshake failed: {e}"),
        Err(_) => warn!("TLS handshake not finished within {:?}; closing", shared.limits.connect_timeout),
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4;

    /// The codec must never panic on arbitrary bytes (it is fed straight from the network).
    #[test]
    fn codec_survives_random_bytes() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200_000 {
            let len = (next() % 64) as usize;
            let mut buf = BytesMut::with_capacity(len);
            let first = [0x10u8, 0x30, 0x32, 0x40, 0x82, 0xa2, 0xc0, 0xe0][(next() % 8) as usize];
            buf.extend_from_slice(&[first]);
            for _ in 1..len {
                buf.extend_from_slice(&[(next() & 0xff) as u8]);
            }
            if next() % 2 == 0 && buf.len() > 1 {
                // Make the remaining length consistent more often, to reach the packet parsers.
                buf[1] = (buf.len() - 2).min(127) as u8;
            }
            while let Ok(_p) = v4::Packet::read(&mut buf, 1 << 20) {}
        }
    }
}
