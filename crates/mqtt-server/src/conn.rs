//! One client connection: CONNECT handshake, then the read/dispatch loop; a writer task drains
//! the session's outbound queue. Generic over the stream, so plaintext TCP and TLS (after its
//! handshake in `super::serve`) share this code.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    self, ConnAck, Connect, ConnectReturnCode, Packet, PingResp, PubAck, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn, Instrument};

use super::prelogin::Slot;
use super::{lock, topic, MqttEvent, OutQueue, QueueError, SessionEntry, Shared, MAX_CONNECT_PACKET};

/// Why a connection ended (logged).
type Reason = String;

/// What the first packet turned out to be.
enum FirstPacket {
    /// A CONNECT of protocol level 4 (MQTT 3.1.1).
    Connect(Connect),
    /// A CONNECT of another protocol level (MQTT 5, MQTT 3.1): answered with CONNACK 0x01.
    UnsupportedLevel(u8),
}

/// The protocol level of a CONNECT whose variable header is buffered, if it is not 4. Seen before
/// the 3.1.1 codec parses the packet: an MQTT 5 CONNECT carries a properties block the 3.1.1
/// layout misreads (as the client id length), so the codec would fail or misparse it.
fn unsupported_level(buf: &[u8]) -> Option<u8> {
    // Fixed header: type byte, then a 1..4 byte variable-length remaining length.
    let len_bytes = buf.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    let vh = buf.get(1 + len_bytes..)?;
    let level = match vh {
        [0x00, 0x04, b'M', b'Q', b'T', b'T', level, ..] => *level,
        [0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', level, ..] => *level,
        _ => return None,
    };
    (level != 4).then_some(level)
}

/// Reads the CONNECT packet. The first byte must be a CONNECT fixed header (0x10), checked as soon
/// as it arrives so garbage is refused without waiting for a whole "frame".
async fn read_connect<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> Result<FirstPacket, Reason> {
    loop {
        if let Some(&b) = buf.first() {
            if b != 0x10 {
                return Err(format!("first packet is not CONNECT (byte 0x{b:02x})"));
            }
            if let Some(level) = unsupported_level(buf) {
                return Ok(FirstPacket::UnsupportedLevel(level));
            }
            match v4::Packet::read(buf, MAX_CONNECT_PACKET) {
                Ok(Packet::Connect(c)) if c.protocol == Protocol::V4 => return Ok(FirstPacket::Connect(c)),
                Ok(Packet::Connect(_)) => return Ok(FirstPacket::UnsupportedLevel(5)),
                Ok(p) => return Err(format!("first packet is not CONNECT: {p:?}")),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("bad CONNECT: {e}")),
            }
        }
        match stream.read_buf(buf).await {
            Ok(0) => return Err("closed before CONNECT".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read error before CONNECT: {e}")),
        }
    }
}

fn encode(write: impl FnOnce(&mut BytesMut) -> Result<usize, CodecError>) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    // Only fixed-size control packets are encoded here; they cannot fail.
    if let Err(e) = write(&mut b) {
        warn!("cannot encode control packet: {e}");
    }
    b.freeze()
}

/// Writes `frame` and flushes it (a TLS stream may hold written data until flushed).
async fn send_now<S: AsyncWrite + Unpin>(stream: &mut S, frame: &[u8]) -> std::io::Result<()> {
    stream.write_all(frame).await?;
    stream.flush().await
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, code: ConnectReturnCode) {
    let frame = encode(|b| ConnAck::new(code, false).write(b));
    if let Err(e) = send_now(stream, &frame).await {
        debug!("cannot send CONNACK {code:?}: {e}");
    }
    let _ = stream.shutdown().await;
}

/// Runs one connection to its end. `slot` is its handshake slot, released after CONNACK; the
/// CONNECT must have arrived by `deadline`, and the connection closes if the slot is shed first.
pub(super) async fn run<S>(
    shared: Arc<Shared>,
    mut stream: S,
    peer: SocketAddr,
    conn_id: u64,
    slot: Slot,
    deadline: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(4096);
    let first = tokio::select! {
        r = tokio::time::timeout_at(deadline, read_connect(&mut stream, &mut buf)) => r,
        () = slot.shed() => {
            debug!("closed before CONNECT to make room for a newer connection");
            return;
        }
    };
    // Shed just as the CONNECT completed: the slot is already another connection's.
    if matches!(first, Ok(Ok(_))) && !slot.connect_received() {
        debug!("closed at CONNECT to make room for a newer connection");
        return;
    }
    let connect = match first {
        Err(_) => {
            warn!("no CONNECT within {:?}; closing", shared.limits.connect_timeout);
            return;
        }
        Ok(Err(why)) => {
            warn!("closing: {why}");
            return;
        }
        Ok(Ok(FirstPacket::Connect(c))) => c,
        Ok(Ok(FirstPacket::UnsupportedLevel(level))) => {
            warn!(level, "refused: protocol level {level} is not supported (use MQTT 3.1.1, level 4)");
            refuse(&mut stream, ConnectReturnCode::RefusedProtocolVersion).await;
            return;
        }
    };
    if connect.last_will.is_some() {
        debug!("client set a will; wills are not supported and it is ignored");
    }
    let (username, password) = match &connect.login {
        Some(l) => {
            (Some(l.username.as_str()).filter(|s| !s.is_empty()), Some(l.password.as_bytes()).filter(|p| !p.is_empty()))
        }
        None => (None, None),
    };
    let identity = match shared.auth.login(&connect.client_id, username, password) {
        Ok(id) => id,
        Err(why) => {
            let code = if username.is_some() {
                ConnectReturnCode::BadUserNamePassword
            } else {
                ConnectReturnCode::NotAuthorized
            };
            warn!(client_id = %connect.client_id.escape_debug(), "authentication refused ({code:?}): {why}");
            refuse(&mut stream, code).await;
            return;
        }
    };
    if !topic::valid_identity(&identity) {
        warn!(identity = %identity.escape_debug(), "authenticator returned an unusable identity; refusing");
        refuse(&mut stream, ConnectReturnCode::NotAuthorized).await;
        return;
    }
    tracing::Span::current().record("identity", identity.as_str());

    // Register, taking over any session of the same identity.
    let (tx, out_rx) = mpsc::channel::<Bytes>(shared.limits.outbound_queue);
    let out_tx = OutQueue { tx, bytes: Arc::new(AtomicUsize::new(0)), max_bytes: shared.limits.outbound_queue_bytes };
    let kill = Arc::new(Notify::new());
    let (done_tx, done_rx) = watch::channel(false);
    let inflight = Arc::new(AtomicUsize::new(0));
    let registered: Result<Option<SessionEntry>, ()> = {
        let mut map = lock(&shared.sessions);
        if *shared.shutdown.borrow() {
            Err(())
        } else if !map.contains_key(&identity) && map.len() >= shared.cfg.max_clients {
            warn!("refused: {} sessions already (max_clients)", shared.cfg.max_clients);
            Err(())
        } else {
            let old = map.remove(&identity);
            map.insert(
                identity.clone(),
                SessionEntry {
                    conn_id,
                    peer,
                    out: out_tx.clone(),
                    kill: kill.clone(),
                    done: done_rx,
                    subs: Vec::new(),
                    next_pkid: 1,
                    inflight: inflight.clone(),
                    killed: false,
                },
            );
            Ok(old)
        }
    };
    let Ok(old) = registered else {
        refuse(&mut stream, ConnectReturnCode::ServiceUnavailable).await;
        return;
    };
    if let Some(mut old) = old {
        info!(old_conn = old.conn_id, old_peer = %old.peer, "takeover: closing the previous connection of this identity");
        old.killed = true;
        old.kill.notify_one();
        shared.bump_subs();
        if tokio::time::timeout(shared.limits.takeover_wait, old.done.wait_for(|d| *d)).await.is_err() {
            warn!(old_conn = old.conn_id, "previous connection did not finish closing in time; proceeding");
        }
    }

    let ka = effective_keep_alive(connect.keep_alive, shared.cfg.keep_alive_max);
    let connack = encode(|b| ConnAck::new(ConnectReturnCode::Success, false).write(b));
    if let Err(e) = send_now(&mut stream, &connack).await {
        warn!("cannot send CONNACK: {e}");
        unregister(&shared, &identity, conn_id);
        let _ = done_tx.send(true);
        return;
    }
    drop(slot);
    info!(client_id = %connect.client_id.escape_debug(), keep_alive = ?ka, "connected");
    shared.emit(MqttEvent::Connected { identity: identity.clone(), conn_id }).await;

    let (mut rd, wr) = tokio::io::split(stream);
    let writer = tokio::spawn(
        write_loop(wr, out_rx, out_tx.clone(), kill.clone(), shared.limits.write_stall_timeout).in_current_span(),
    );
    let mut session = Session {
        shared: &shared,
        identity: &identity,
        conn_id,
        out: out_tx,
        inflight,
        refusals: RefusalLog::default(),
    };
    let mut shutdown = shared.shutdown.subscribe();

    let limit = ka.map(|k| Duration::from_millis(u64::from(k) * 1500));
    let far = Duration::from_secs(86_400 * 365);
    let sleep = tokio::time::sleep(limit.unwrap_or(far));
    tokio::pin!(sleep);
    let max_packet = shared.max_packet();

    let reason: Reason = 'conn: loop {
        // Handle every complete packet already buffered.
        loop {
            match v4::Packet::read(&mut buf, max_packet) {
                Ok(p) => {
                    if let Some(l) = limit {
                        sleep.as_mut().reset(tokio::time::Instant::now() + l);
                    }
                    if let Err(why) = session.handle(p).await {
                        break 'conn why;
                    }
                }
                Err(CodecError::InsufficientBytes(n)) => {
                    buf.reserve(n.min(max_packet));
                    break;
                }
                Err(e) => break 'conn format!("protocol error: {e}"),
            }
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break "connection closed by client without DISCONNECT".into(),
                Ok(_) => {}
                Err(e) => break format!("read error: {e}"),
            },
            _ = kill.notified() => break "closed by the server (takeover, disconnect, slow client or shutdown)".into(),
            _ = &mut sleep, if limit.is_some() => break format!("keep-alive timeout ({:?} of silence)", limit.unwrap_or(far)),
            _ = shutdown.wait_for(|v| *v) => break "server shutting down".into(),
        }
    };

    if reason == CLEAN {
        info!("client disconnected");
    } else {
        warn!("connection closed: {reason}");
    }
    writer.abort();
    drop(rd);
    unregister(&shared, &identity, conn_id);
    shared.emit(MqttEvent::Disconnected { identity: identity.clone(), conn_id }).await;
    let _ = done_tx.send(true);
}

const CLEAN: &str = "DISCONNECT";

/// The keep-alive the server enforces, in seconds (`None` = no timeout).
fn effective_keep_alive(client: u16, max: u16) -> Option<u16> {
    match (client, max) {
        (0, 0) => None,
        (c, 0) => Some(c),
        (0, m) => Some(m),
        (c, m) => Some(c.min(m)),
    }
}

/// Removes the session from the table if it is still this connection's.
fn unregister(shared: &Shared, identity: &str, conn_id: u64) {
    let mut map = lock(&shared.sessions);
    if map.get(identity).is_some_and(|s| s.conn_id == conn_id) {
        map.remove(identity);
        drop(map);
        shared.bump_subs();
    }
}

/// Frames smaller than this are coalesced into writes of at most this size; bigger ones are
/// written as they are (never copied, so the batch buffer stays this small).
const COALESCE_MAX: usize = 64 * 1024;

/// Writes all of `buf` and flushes, failing if any single write or the flush accepts nothing for
/// `stall` (the client stopped reading: its socket buffers are full).
async fn write_all_within<W: AsyncWrite + Unpin>(wr: &mut W, mut buf: &[u8], stall: Duration) -> Result<(), WriteFail> {
    while !buf.is_empty() {
        match tokio::time::timeout(stall, wr.write(buf)).await {
            Err(_) => return Err(WriteFail::Stalled),
            Ok(Err(e)) => return Err(WriteFail::Io(e)),
            Ok(Ok(0)) => return Err(WriteFail::Io(std::io::ErrorKind::WriteZero.into())),
            Ok(Ok(n)) => buf = buf.get(n..).unwrap_or_default(),
        }
    }
    match tokio::time::timeout(stall, wr.flush()).await {
        Err(_) => Err(WriteFail::Stalled),
        Ok(r) => r.map_err(WriteFail::Io),
    }
}

/// Why the writer gave up.
enum WriteFail {
    /// No progress within the stall timeout.
    Stalled,
    /// The socket failed (the reader side sees it too).
    Io(std::io::Error),
}

/// Drains the session's queue into the socket. Queued bytes are released from `out`'s count only
/// once written, so the count covers everything the server holds for this client.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Bytes>,
    out: OutQueue,
    kill: Arc<Notify>,
    stall: Duration,
) {
    let mut batch = BytesMut::new();
    // A frame taken from the queue that did not fit the previous batch.
    let mut carried: Option<Bytes> = None;
    loop {
        let frame = match carried.take() {
            Some(f) => f,
            None => match rx.recv().await {
                Some(f) => f,
                None => break,
            },
        };
        let (res, n) = if frame.len() >= COALESCE_MAX {
            (write_all_within(&mut wr, &frame, stall).await, frame.len())
        } else {
            // Coalesce whatever small frames are already queued into one write.
            batch.clear();
            batch.extend_from_slice(&frame);
            while let Ok(f) = rx.try_recv() {
                if batch.len() + f.len() > COALESCE_MAX {
                    carried = Some(f);
                    break;
                }
                batch.extend_from_slice(&f);
            }
            (write_all_within(&mut wr, &batch, stall).await, batch.len())
        };
        out.written(n);
        match res {
            Ok(()) => {}
            Err(WriteFail::Stalled) => {
                warn!("dropping client: no write progress for {stall:?} (client not reading)");
                kill.notify_one();
                return;
            }
            Err(WriteFail::Io(e)) => {
                debug!("write error: {e}");
                kill.notify_one();
                return;
            }
        }
    }
    let _ = wr.shutdown().await;
}

struct Session<'a> {
    shared: &'a Shared,
    identity: &'a str,
    conn_id: u64,
    out: OutQueue,
    inflight: Arc<AtomicUsize>,
    refusals: RefusalLog,
}

/// Rate limit for the "subscription refused" warning of one connection: at most one warning per
/// [`REFUSAL_WARN_EVERY`]; refused packets in between are logged at `debug` and counted into
/// the next warning.
#[derive(Default)]
struct RefusalLog {
    last_warn: Option<tokio::time::Instant>,
    suppressed: u64,
}

/// Minimum interval between two "subscription refused" warnings of one connection.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

impl RefusalLog {
    /// Logs one SUBSCRIBE packet with refused filters, once (never per filter); called outside locks.
    fn log(&mut self, pkid: u16, acl: usize, over_limit: usize, example: &str) {
        let now = tokio::time::Instant::now();
        if self.last_warn.is_some_and(|t| now.duration_since(t) < REFUSAL_WARN_EVERY) {
            self.suppressed += 1;
            debug!(pkid, acl, over_limit, example = %example.escape_debug(), "subscription refused (warning rate-limited)");
            return;
        }
        warn!(
            pkid,
            acl,
            over_limit,
            example = %example.escape_debug(),
            suppressed_packets = self.suppressed,
            "subscription refused: {acl} filter(s) by the ACL or as invalid, {over_limit} over max_subscriptions"
        );
        self.last_warn = Some(now);
        self.suppressed = 0;
    }
}

impl Session<'_> {
    fn send(&self, frame: Bytes) -> Result<(), Reason> {
        self.out.push(frame).map_err(|e| match e {
            QueueError::Full => "outbound queue full (client not reading fast enough)".into(),
            QueueError::Closed => "writer gone".into(),
        })
    }

    /// Handles one packet; `Err` closes the connection with that reason.
    async fn handle(&mut self, packet: Packet) -> Result<(), Reason> {
        match packet {
            Packet::Publish(p) => {
                if p.qos == QoS::ExactlyOnce {
                    return Err(format!("QoS 2 publish to {:?} (not supported)", p.topic));
                }
                if p.payload.len() > self.shared.cfg.max_payload {
                    return Err(format!(
                        "payload of {} bytes exceeds max_payload {}",
                        p.payload.len(),
                        self.shared.cfg.max_payload
                    ));
                }
                if !topic::valid_topic(&p.topic) {
                    return Err(format!("invalid topic name {:?} in PUBLISH", p.topic));
                }
                if self.shared.acl.may_publish(self.identity, &p.topic) {
                    debug!(topic = %p.topic, bytes = p.payload.len(), qos = ?p.qos, "publish");
                    self.shared.route(&p.topic, &p.payload, p.qos);
                    self.shared
                        .emit(MqttEvent::Message {
                            identity: self.identity.to_owned(),
                            conn_id: self.conn_id,
                            topic: p.topic,
                            payload: p.payload,
                        })
                        .await;
                } else {
                    warn!(topic = %p.topic.escape_debug(), "ACL: publish outside own prefix dropped");
                }
                if p.qos == QoS::AtLeastOnce {
                    self.send(encode(|b| PubAck::new(p.pkid).write(b)))?;
                }
                Ok(())
            }
            Packet::PubAck(_) => {
                let _ = self.inflight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
                Ok(())
            }
            Packet::Subscribe(s) => {
                let mut codes = Vec::with_capacity(s.filters.len());
                let mut changed = false;
                // Counted under the lock, logged after it: one line per packet, not per filter.
                let (mut acl_refused, mut over_limit, mut example) = (0usize, 0usize, None);
                {
                    let mut map = lock(&self.shared.sessions);
                    let entry = map.get_mut(self.identity).filter(|e| e.conn_id == self.conn_id);
                    let Some(entry) = entry else {
                        return Err("session was replaced".into());
                    };
                    for f in &s.filters {
                        if !topic::valid_filter(&f.path) || !self.shared.acl.may_subscribe(self.identity, &f.path) {
                            acl_refused += 1;
                            example.get_or_insert_with(|| f.path.clone());
                            codes.push(SubscribeReasonCode::Failure);
                            continue;
                        }
                        let granted = if f.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                        if let Some(existing) = entry.subs.iter_mut().find(|(p, _)| *p == f.path) {
                            existing.1 = granted;
                        } else if entry.subs.len() >= self.shared.limits.max_subscriptions {
                            over_limit += 1;
                            example.get_or_insert_with(|| f.path.clone());
                            codes.push(SubscribeReasonCode::Failure);
                            continue;
                        } else {
                            entry.subs.push((f.path.clone(), granted));
                        }
                        debug!(filter = %f.path.escape_debug(), qos = ?granted, "subscribed");
                        changed = true;
                        codes.push(SubscribeReasonCode::Success(granted));
                    }
                }
                if let Some(example) = example {
                    self.refusals.log(s.pkid, acl_refused, over_limit, &example);
                }
                // SUBACK is queued before waiters learn of the subscription, so anything the
                // application publishes in response reaches the client after the SUBACK.
                let res = self.send(encode(|b| SubAck::new(s.pkid, codes).write(b)));
                if changed {
                    self.shared.bump_subs();
                }
                res
            }
            Packet::Unsubscribe(u) => {
                let removed = {
                    let mut map = lock(&self.shared.sessions);
                    match map.get_mut(self.identity).filter(|e| e.conn_id == self.conn_id) {
                        Some(entry) => {
                            let before = entry.subs.len();
                            entry.subs.retain(|(f, _)| !u.topics.contains(f));
                            before != entry.subs.len()
                        }
                        None => return Err("session was replaced".into()),
                    }
                };
                if removed {
                    self.shared.bump_subs();
                }
                self.send(encode(|b| UnsubAck::new(u.pkid).write(b)))
            }
            Packet::PingReq => self.send(encode(|b| PingResp.write(b))),
            Packet::Disconnect => Err(CLEAN.into()),
            Packet::Connect(_) => Err("second CONNECT on a connection".into()),
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
                Err("QoS 2 flow (PUBREC/PUBREL/PUBCOMP) is not supported".into())
            }
            p @ (Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp) => {
                Err(format!("server-to-client packet received from client: {p:?}"))
            }
        }
    }
}
