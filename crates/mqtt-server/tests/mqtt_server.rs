//! Integration tests of the embedded MQTT server, over real sockets on 127.0.0.1.
//!
//! Synchronisation is always by awaiting something (an event, a packet, EOF); the timeouts in
//! the helpers only turn a hang into a failure.

mod common;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{init_tracing, next_event, Refused, WAIT};
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, QoS, SubscribeFilter, SubscribeReasonCode,
};
use sphinx_mqtt_server::{
    self as mqtt, Authenticator, Authorizer, Limits, MqttConfig, MqttError, MqttEvent, MqttEvents, MqttHandle,
    OwnPrefix,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Accepts `username == password` (as a token) with identity = username.
struct TokenAuth;

impl Authenticator for TokenAuth {
    type Error = Refused;
    fn authenticate(
        &self,
        _client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<String, Refused> {
        match (username, password) {
            (Some(u), Some(p)) if u.as_bytes() == p => Ok(u.to_string()),
            (Some(u), _) => Err(Refused(format!("bad token for {u}"))),
            (None, _) => Err(Refused("no username".into())),
        }
    }
}

fn config() -> MqttConfig {
    MqttConfig {
        max_payload: 4096,
        max_clients: 8,
        keep_alive_max: 60,
        event_capacity: 64,
        ..MqttConfig::new("127.0.0.1:0".parse().unwrap())
    }
}

async fn server_with(cfg: MqttConfig, limits: Limits) -> (MqttHandle, MqttEvents) {
    init_tracing();
    mqtt::start_with(cfg, limits, TokenAuth, OwnPrefix).await.unwrap()
}

async fn server() -> (MqttHandle, MqttEvents) {
    server_with(config(), Limits::default()).await
}

async fn expect_connected(rx: &mut MqttEvents, who: &str) -> u64 {
    match next_event(rx).await {
        MqttEvent::Connected { identity, conn_id } if identity == who => conn_id,
        other => panic!("expected Connected({who}), got {other:?}"),
    }
}

async fn expect_disconnected(rx: &mut MqttEvents, who: &str, conn: u64) {
    match next_event(rx).await {
        MqttEvent::Disconnected { identity, conn_id } if identity == who && conn_id == conn => {}
        other => panic!("expected Disconnected({who}, {conn}), got {other:?}"),
    }
}

async fn expect_message(rx: &mut MqttEvents) -> (String, String, Bytes) {
    match next_event(rx).await {
        MqttEvent::Message { identity, topic, payload, .. } => (identity, topic, payload),
        other => panic!("expected Message, got {other:?}"),
    }
}

/// A rumqttc client whose event loop runs in a task and stops at its first error (so it never
/// auto-reconnects behind the test's back).
struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
}

fn client(h: &MqttHandle, id: &str, creds: Option<(&str, &str)>) -> Client {
    let addr = h.local_addr();
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((u, p)) = creds {
        opts.set_credentials(u, p);
    }
    let (client, mut el) = AsyncClient::new(opts, 16);
    let (tx, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let ev = el.poll().await;
            let stop = ev.is_err();
            if tx.send(ev).is_err() || stop {
                break;
            }
        }
    });
    Client { client, events }
}

impl Client {
    async fn next(&mut self) -> Result<Event, ConnectionError> {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("timed out waiting for client event")
            .expect("client loop ended")
    }

    /// Next incoming packet (outgoing notifications skipped); panics on error.
    async fn incoming(&mut self) -> Packet {
        loop {
            match self.next().await {
                Ok(Event::Incoming(p)) => return p,
                Ok(Event::Outgoing(_)) => {}
                Err(e) => panic!("client error: {e:?}"),
            }
        }
    }

    /// Waits for the connection to end with an error (server closed it).
    async fn closed(&mut self) -> ConnectionError {
        loop {
            match self.next().await {
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    }

    /// Publishes (not retained); the packet is only queued in the client's event loop.
    async fn publish(&self, topic: &str, qos: QoS, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, qos, false, payload).await.unwrap();
    }

    /// Waits for the server to refuse the connection with `want`.
    async fn expect_refused(&mut self, want: ConnectReturnCode) {
        match self.next().await {
            Err(ConnectionError::ConnectionRefused(code)) => assert_eq!(code, want),
            other => panic!("expected refusal, got {other:?}"),
        }
    }

    /// Subscribes to `filter` and waits for the SUBACK (its codes not checked).
    async fn subscribe_acked(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        assert!(matches!(self.incoming().await, Packet::SubAck(_)));
    }

    async fn connack(&mut self) -> Result<(), ConnectionError> {
        match self.next().await? {
            Event::Incoming(Packet::ConnAck(c)) if c.code == ConnectReturnCode::Success => Ok(()),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

/// Connects `name` with a valid token, waits for CONNACK and for its Connected event.
async fn connect(h: &MqttHandle, rx: &mut MqttEvents, name: &str) -> (Client, u64) {
    let mut c = client(h, name, Some((name, name)));
    c.connack().await.unwrap();
    let conn = expect_connected(rx, name).await;
    (c, conn)
}

/// At least `min` has passed since `t`: the server did not act (`what`) too early.
fn assert_not_before(t: Instant, min: Duration, what: &str) {
    assert!(t.elapsed() >= min, "{what} too early: {:?}", t.elapsed());
}

// ---------- raw-socket helpers (encode with the same codec) ----------

fn frame(p: Packet) -> BytesMut {
    let mut b = BytesMut::new();
    match p {
        Packet::Connect(c) => c.write(&mut b),
        Packet::Publish(p) => p.write(&mut b),
        Packet::PubAck(p) => p.write(&mut b),
        Packet::Subscribe(s) => s.write(&mut b),
        Packet::PingReq => v4::PingReq.write(&mut b),
        Packet::Disconnect => v4::Disconnect.write(&mut b),
        other => panic!("not needed: {other:?}"),
    }
    .unwrap();
    b
}

struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn open(h: &MqttHandle) -> Raw {
        let s = TcpStream::connect(h.local_addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        Raw { s, buf: BytesMut::new() }
    }

    async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    /// Connects `name` with a valid token, waits for CONNACK and for its Connected event.
    async fn connect(h: &MqttHandle, rx: &mut MqttEvents, name: &str, keep_alive: u16) -> (Raw, u64) {
        let mut r = Raw::open(h).await;
        let mut c = v4::Connect::new(name);
        c.keep_alive = keep_alive;
        c.set_login(name, name);
        r.send(&frame(Packet::Connect(c))).await;
        match r.read().await {
            Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        let conn = expect_connected(rx, name).await;
        (r, conn)
    }

    /// Subscribes to `filter` (packet id 1) and waits for the SUBACK.
    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let mut s = v4::Subscribe::new(filter, qos);
        s.pkid = 1;
        self.send(&frame(Packet::Subscribe(s))).await;
        assert!(matches!(self.read().await, Some(Packet::SubAck(_))));
    }

    /// Next packet, or `None` at EOF / connection reset.
    async fn read(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, async {
            loop {
                match v4::Packet::read(&mut self.buf, 1 << 24) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("bad packet from server: {e}"),
                }
                match self.s.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("timed out reading from server")
    }

    async fn expect_eof(&mut self) {
        if let Some(p) = self.read().await {
            panic!("expected the server to close, got {p:?}");
        }
    }
}

// ---------- tests ----------

#[tokio::test]
async fn auth_accepted_and_refused() {
    let (h, mut rx) = server().await;

    let mut bad = client(&h, "x", Some(("alice", "wrong")));
    bad.expect_refused(ConnectReturnCode::BadUserNamePassword).await;
    let mut anon = client(&h, "y", None);
    anon.expect_refused(ConnectReturnCode::NotAuthorized).await;

    // Refused clients produce no events: the first event is the good client's.
    let (_alice, _) = connect(&h, &mut rx, "alice").await;
    assert_eq!(h.connected(), vec!["alice".to_string()]);
}

#[tokio::test]
async fn identity_with_slash_is_refused() {
    init_tracing();
    let auth = |_: &str, u: Option<&str>, _: Option<&[u8]>| -> Result<String, Refused> {
        Ok(format!("{}/x", u.unwrap_or("")))
    };
    let (h, _rx) = mqtt::start(config(), auth).await.unwrap();
    let mut c = client(&h, "a", Some(("a", "a")));
    c.expect_refused(ConnectReturnCode::NotAuthorized).await;
}

#[tokio::test]
async fn publish_under_own_prefix_is_an_event() {
    let (h, mut rx) = server().await;
    let (mut alice, conn) = connect(&h, &mut rx, "alice").await;
    alice.publish("alice/vls-res", QoS::AtLeastOnce, b"reply".to_vec()).await;
    match next_event(&mut rx).await {
        MqttEvent::Message { identity, conn_id, topic, payload } => {
            assert_eq!((identity.as_str(), conn_id, topic.as_str()), ("alice", conn, "alice/vls-res"));
            assert_eq!(&payload[..], b"reply");
        }
        other => panic!("expected Message, got {other:?}"),
    }
    assert!(matches!(alice.incoming().await, Packet::PubAck(_)));
    alice.publish("alice/hello", QoS::AtMostOnce, b"hi".to_vec()).await;
    let (_, topic, _) = expect_message(&mut rx).await;
    assert_eq!(topic, "alice/hello");
}

#[tokio::test]
async fn publish_to_other_prefix_is_dropped() {
    let (h, mut rx) = server().await;
    let (mut alice, _) = connect(&h, &mut rx, "alice").await;
    for t in ["bob/vls", "alice", "alicex/vls"] {
        alice.publish(t, QoS::AtLeastOnce, b"sneaky".to_vec()).await;
    }
    alice.publish("alice/marker", QoS::AtLeastOnce, b"m".to_vec()).await;
    // The marker, sent after the forbidden publishes on the same connection, arrives first.
    let (_, topic, payload) = expect_message(&mut rx).await;
    assert_eq!((topic.as_str(), &payload[..]), ("alice/marker", &b"m"[..]));
    // The dropped QoS 1 publishes were still acknowledged, so the client does not stall.
    let mut acks = 0;
    while acks < 4 {
        if let Packet::PubAck(_) = alice.incoming().await {
            acks += 1;
        }
    }
}

#[tokio::test]
async fn subscribe_own_topic_then_app_publish_reaches_client() {
    let (h, mut rx) = server().await;
    let (mut alice, _) = connect(&h, &mut rx, "alice").await;
    assert!(!h.has_subscriber("alice/vls"));
    assert_eq!(h.publish_count("alice/vls", Bytes::from_static(b"lost")), Ok(0));
    alice.client.subscribe("alice/vls", QoS::AtLeastOnce).await.unwrap();
    h.wait_subscriber("alice/vls").await;
    match alice.incoming().await {
        Packet::SubAck(s) => assert_eq!(s.return_codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    h.publish("alice/vls", Bytes::from_static(b"request")).unwrap();
    match alice.incoming().await {
        Packet::Publish(p) => {
            assert_eq!(p.topic, "alice/vls");
            assert_eq!(p.qos, QoS::AtLeastOnce);
            assert_eq!(&p.payload[..], b"request");
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    // Not subscribed / other identity: nobody gets it, and that is not an error.
    assert_eq!(h.publish_count("alice/control", Bytes::from_static(b"x")), Ok(0));
    assert_eq!(h.publish_count("bob/vls", Bytes::from_static(b"x")), Ok(0));
    // Bad topics and oversized payloads are refused.
    assert!(matches!(h.publish("alice/#", Bytes::new()), Err(MqttError::InvalidTopic(_))));
    assert!(matches!(
        h.publish("alice/vls", Bytes::from(vec![0u8; 4097])),
        Err(MqttError::PayloadTooLarge { size: 4097, max: 4096 })
    ));
}

#[tokio::test]
async fn qos0_subscription_and_unsubscribe() {
    let (h, mut rx) = server().await;
    let (mut alice, _) = connect(&h, &mut rx, "alice").await;
    alice.subscribe_acked("alice/+", QoS::AtMostOnce).await;
    assert_eq!(h.publish_count("alice/vls", Bytes::from_static(b"q0")), Ok(1));
    match alice.incoming().await {
        Packet::Publish(p) => assert_eq!((p.qos, &p.payload[..]), (QoS::AtMostOnce, &b"q0"[..])),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    alice.client.unsubscribe("alice/+").await.unwrap();
    assert!(matches!(alice.incoming().await, Packet::UnsubAck(_)));
    assert!(!h.has_subscriber("alice/vls"));
    assert_eq!(h.publish_count("alice/vls", Bytes::from_static(b"gone")), Ok(0));
}

#[tokio::test]
async fn client_publish_is_routed_to_matching_subscription() {
    // One identity has one session, so the only other subscriber is the publisher itself.
    let (h, mut rx) = server().await;
    let (mut alice, _) = connect(&h, &mut rx, "alice").await;
    alice.subscribe_acked("alice/echo/#", QoS::AtLeastOnce).await;
    alice.publish("alice/echo/1", QoS::AtLeastOnce, b"loop".to_vec()).await;
    let (_, topic, _) = expect_message(&mut rx).await;
    assert_eq!(topic, "alice/echo/1");
    loop {
        if let Packet::Publish(p) = alice.incoming().await {
            assert_eq!((p.topic.as_str(), &p.payload[..]), ("alice/echo/1", &b"loop"[..]));
            break;
        }
    }
}

/// A custom ACL (the crate's example): `dashboard` may also read every client's `temp`; routing
/// follows the granted filters across identities, and what the ACL refuses stays refused.
struct DashboardAcl;

impl Authorizer for DashboardAcl {
    fn may_publish(&self, identity: &str, topic: &str) -> bool {
        OwnPrefix.may_publish(identity, topic)
    }
    fn may_subscribe(&self, identity: &str, filter: &str) -> bool {
        OwnPrefix.may_subscribe(identity, filter) || (identity == "dashboard" && filter == "+/temp")
    }
}

#[tokio::test]
async fn custom_authorizer_grants_and_routes_across_identities() {
    let (h, mut rx) = {
        init_tracing();
        mqtt::start_with(config(), Limits::default(), TokenAuth, DashboardAcl).await.unwrap()
    };
    let (mut dash, _) = connect(&h, &mut rx, "dashboard").await;
    let (mut sensor, _) = connect(&h, &mut rx, "sensor").await;
    dash.client
        .subscribe_many(["+/temp", "+/other", "dashboard/#"].map(|f| SubscribeFilter::new(f.into(), QoS::AtLeastOnce)))
        .await
        .unwrap();
    match dash.incoming().await {
        Packet::SubAck(s) => assert_eq!(
            s.return_codes,
            vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtLeastOnce)
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // The sensor may not read others' temp (the grant is the dashboard's only).
    sensor.client.subscribe("+/temp", QoS::AtLeastOnce).await.unwrap();
    match sensor.incoming().await {
        Packet::SubAck(s) => assert_eq!(s.return_codes, vec![SubscribeReasonCode::Failure]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // The sensor's publish is an event and reaches the dashboard; the app's too.
    sensor.publish("sensor/temp", QoS::AtLeastOnce, b"21.5".to_vec()).await;
    let (id, topic, payload) = expect_message(&mut rx).await;
    assert_eq!((id.as_str(), topic.as_str(), &payload[..]), ("sensor", "sensor/temp", &b"21.5"[..]));
    loop {
        if let Packet::Publish(p) = dash.incoming().await {
            assert_eq!((p.topic.as_str(), &p.payload[..]), ("sensor/temp", &b"21.5"[..]));
            break;
        }
    }
    assert!(h.has_subscriber("other/temp"));
    assert_eq!(h.publish_count("other/temp", Bytes::from_static(b"x")), Ok(1));
    // Publishing outside its own prefix is still dropped for everyone.
    dash.publish("sensor/temp", QoS::AtLeastOnce, b"forged".to_vec()).await;
    dash.publish("dashboard/marker", QoS::AtLeastOnce, b"m".to_vec()).await;
    let (id, topic, _) = expect_message(&mut rx).await;
    assert_eq!((id.as_str(), topic.as_str()), ("dashboard", "dashboard/marker"), "the forged publish was dropped");
}

#[tokio::test]
async fn subscribe_outside_prefix_is_refused() {
    let (h, mut rx) = server().await;
    let (mut alice, _) = connect(&h, &mut rx, "alice").await;
    let filters = ["bob/#", "#", "+/vls", "$SYS/#", "alice", "alice/#"];
    alice
        .client
        .subscribe_many(filters.iter().map(|f| SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)))
        .await
        .unwrap();
    match alice.incoming().await {
        Packet::SubAck(s) => {
            let mut want = vec![SubscribeReasonCode::Failure; 5];
            want.push(SubscribeReasonCode::Success(QoS::AtLeastOnce));
            assert_eq!(s.return_codes, want);
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // Bob's traffic does not reach alice.
    let (mut bob, _) = connect(&h, &mut rx, "bob").await;
    bob.subscribe_acked("bob/vls", QoS::AtLeastOnce).await;
    assert_eq!(h.publish_count("bob/vls", Bytes::from_static(b"for bob")), Ok(1));
    assert_eq!(h.publish_count("alice/x", Bytes::from_static(b"for alice")), Ok(1));
    match alice.incoming().await {
        Packet::Publish(p) => assert_eq!(p.topic, "alice/x"),
        other => panic!("expected alice's PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn same_identity_takes_over() {
    let (h, mut rx) = server().await;
    let (mut first, c1) = connect(&h, &mut rx, "alice").await;
    first.subscribe_acked("alice/vls", QoS::AtLeastOnce).await;

    let mut second = client(&h, "alice-2", Some(("alice", "alice")));
    second.connack().await.unwrap();
    // The old connection's end is reported before the new one's start.
    expect_disconnected(&mut rx, "alice", c1).await;
    let c2 = expect_connected(&mut rx, "alice").await;
    assert_ne!(c1, c2);
    first.closed().await;
    assert_eq!(h.connected(), vec!["alice".to_string()]);

    // Clean session: the old subscription is gone with the old connection.
    assert!(!h.has_subscriber("alice/vls"));
    second.subscribe_acked("alice/vls", QoS::AtLeastOnce).await;
    h.publish("alice/vls", Bytes::from_static(b"to the new one")).unwrap();
    match second.incoming().await {
        Packet::Publish(p) => assert_eq!(&p.payload[..], b"to the new one"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn app_disconnect_drops_client() {
    let (h, mut rx) = server().await;
    let (mut alice, c) = connect(&h, &mut rx, "alice").await;
    h.disconnect("alice");
    assert!(h.connected().is_empty());
    expect_disconnected(&mut rx, "alice", c).await;
    alice.closed().await;
    h.disconnect("nobody");
}

#[tokio::test]
async fn oversized_payload_closes_connection() {
    let (h, mut rx) = server().await;
    let (mut alice, c) = connect(&h, &mut rx, "alice").await;
    alice.publish("alice/big", QoS::AtLeastOnce, vec![7u8; 4097]).await;
    expect_disconnected(&mut rx, "alice", c).await;
    alice.closed().await;

    // A packet whose remaining length exceeds every limit is refused from its header alone.
    let (mut r, cb) = Raw::connect(&h, &mut rx, "bob", 30).await;
    r.send(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await;
    r.expect_eof().await;
    expect_disconnected(&mut rx, "bob", cb).await;
}

#[tokio::test]
async fn garbage_closes_connection_and_server_keeps_serving() {
    let (h, mut rx) = server().await;

    let mut r = Raw::open(&h).await;
    r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    r.expect_eof().await;

    let mut r = Raw::open(&h).await;
    r.send(&[0x10, 0xff, 0xff, 0xff, 0xff, 0xff]).await; // malformed remaining length
    r.expect_eof().await;

    let mut r = Raw::open(&h).await;
    r.send(&frame(Packet::PingReq)).await; // not CONNECT first
    r.expect_eof().await;

    // Garbage after a good CONNECT.
    let (mut r, cb) = Raw::connect(&h, &mut rx, "bob", 30).await;
    r.send(&[0x00, 0x00, 0xde, 0xad, 0xbe, 0xef]).await;
    r.expect_eof().await;
    expect_disconnected(&mut rx, "bob", cb).await;

    // Still serving.
    let (alice, _) = connect(&h, &mut rx, "alice").await;
    alice.publish("alice/ok", QoS::AtLeastOnce, b"still here".to_vec()).await;
    let (_, topic, _) = expect_message(&mut rx).await;
    assert_eq!(topic, "alice/ok");
}

#[tokio::test]
async fn mqtt5_connect_refused_with_protocol_version() {
    let (h, _rx) = server().await;
    let mut r = Raw::open(&h).await;
    let mut c = v4::Connect::new("v5");
    c.protocol = rumqttc::mqttbytes::Protocol::V5;
    c.set_login("alice", "alice");
    r.send(&frame(Packet::Connect(c))).await;
    // Note: a real MQTT 5 CONNECT also has properties; the level byte is what matters here.
    match r.read().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::RefusedProtocolVersion),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    r.expect_eof().await;
}

/// A real MQTT 5 CONNECT (with a properties block, which a 3.1.1 parser misreads as the client
/// id length) and an MQTT 3.1 CONNECT ("MQIsdp", level 3) are answered with CONNACK 0x01, as
/// raw bytes, then closed.
#[tokio::test]
async fn mqtt5_connect_with_properties_gets_connack_0x01() {
    let (h, _rx) = server().await;
    let v5: &[u8] = &[
        0x10, 17, // CONNECT, remaining length
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, // protocol name, level 5
        0x02, 0x00, 0x3c, // flags (clean start), keep alive 60
        0x05, 0x11, 0x00, 0x00, 0x00, 0x0a, // properties: session expiry interval 10
        0x00, 0x00, // empty client id
    ];
    let v31: &[u8] = &[0x10, 14, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3c, 0x00, 0x00];
    for connect in [v5, v31] {
        let mut r = Raw::open(&h).await;
        r.send(connect).await;
        let mut got = [0u8; 4];
        match tokio::time::timeout(WAIT, r.s.read_exact(&mut got)).await {
            Ok(Ok(_)) => assert_eq!(got, [0x20, 0x02, 0x00, 0x01], "CONNACK 0x01"),
            other => panic!("expected a CONNACK, got {other:?}"),
        }
        r.expect_eof().await;
    }
}

/// Captured log output of the current thread (the test runtime is current-thread, so the
/// server's tasks log here too).
#[derive(Clone, Default)]
struct LogBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> LogBuf {
        self.clone()
    }
}

/// One SUBSCRIBE with thousands of refused filters: SUBACK 0x80 for each, one warning line for
/// the packet (not one per filter); a second such packet right after is not warned again.
#[tokio::test]
async fn many_refused_filters_logged_once() {
    let logs = LogBuf::default();
    let sub = tracing_subscriber::fmt().with_writer(logs.clone()).with_max_level(tracing::Level::WARN).finish();
    let _guard = tracing::subscriber::set_default(sub);
    let (h, mut rx) = server().await;
    let (mut r, _) = Raw::connect(&h, &mut rx, "alice", 30).await;
    const N: usize = 3000;
    for pkid in [7u16, 8] {
        let filters =
            (0..N).map(|i| v4::SubscribeFilter::new(format!("bob/f{i}"), QoS::AtLeastOnce)).collect::<Vec<_>>();
        let mut s = v4::Subscribe::new_many(filters);
        s.pkid = pkid;
        r.send(&frame(Packet::Subscribe(s))).await;
        match r.read().await {
            Some(Packet::SubAck(a)) => {
                assert_eq!(a.pkid, pkid);
                assert_eq!(a.return_codes.len(), N);
                assert!(a.return_codes.iter().all(|c| *c == v4::SubscribeReasonCode::Failure));
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let refused = text.lines().filter(|l| l.contains("subscription refused")).count();
    assert_eq!(refused, 1, "one warning for both packets, got:\n{text}");
    assert!(text.contains("3000 filter(s)"), "{text}");
}

#[tokio::test]
async fn connect_timeout_closes_silent_socket() {
    let limits = Limits { connect_timeout: Duration::from_millis(300), ..Limits::default() };
    let (h, _rx) = server_with(config(), limits).await;
    let mut r = Raw::open(&h).await;
    let t = Instant::now();
    r.expect_eof().await;
    assert_not_before(t, Duration::from_millis(250), "closed");
}

#[tokio::test]
async fn keep_alive_ping_and_timeout() {
    let (h, mut rx) = server().await;
    let (mut r, c) = Raw::connect(&h, &mut rx, "alice", 1).await;
    r.send(&frame(Packet::PingReq)).await;
    assert_eq!(r.read().await, Some(Packet::PingResp));
    // Silence for 1.5 × keep-alive drops the client.
    let t = Instant::now();
    expect_disconnected(&mut rx, "alice", c).await;
    r.expect_eof().await;
    assert_not_before(t, Duration::from_millis(1200), "dropped");
}

#[tokio::test]
async fn qos2_publish_disconnects() {
    let (h, mut rx) = server().await;
    let (mut r, c) = Raw::connect(&h, &mut rx, "alice", 30).await;
    let mut p = v4::Publish::new("alice/x", QoS::ExactlyOnce, b"q2".to_vec());
    p.pkid = 9;
    r.send(&frame(Packet::Publish(p))).await;
    r.expect_eof().await;
    expect_disconnected(&mut rx, "alice", c).await;
}

#[tokio::test]
async fn clean_disconnect_and_max_clients() {
    let cfg = MqttConfig { max_clients: 1, ..config() };
    let (h, mut rx) = server_with(cfg, Limits::default()).await;
    let (mut r, c) = Raw::connect(&h, &mut rx, "alice", 30).await;

    let mut bob = client(&h, "bob", Some(("bob", "bob")));
    bob.expect_refused(ConnectReturnCode::ServiceUnavailable).await;

    r.send(&frame(Packet::Disconnect)).await;
    expect_disconnected(&mut rx, "alice", c).await;
    r.expect_eof().await;
    let (_bob, _) = connect(&h, &mut rx, "bob").await;
}

#[tokio::test]
async fn slow_client_is_dropped() {
    let limits = Limits { outbound_queue: 4, ..Limits::default() };
    let (h, mut rx) = server_with(config(), limits).await;
    let (mut r, c) = Raw::connect(&h, &mut rx, "alice", 30).await;
    r.subscribe("alice/vls", QoS::AtMostOnce).await;
    // Never read: the socket buffers fill, then the queue, then the server gives up.
    let payload = Bytes::from(vec![1u8; 4096]);
    let mut sent = 0usize;
    while h.publish_count("alice/vls", payload.clone()) == Ok(1) {
        sent += 1;
        tokio::task::yield_now().await;
        assert!(sent < 1_000_000, "client never dropped");
    }
    expect_disconnected(&mut rx, "alice", c).await;
}

#[tokio::test]
async fn qos1_request_reply_round_trips_with_split_writes() {
    // App → client QoS 1 request, client → app QoS 1 reply, like the relay does. (Its latency,
    // where Nagle + delayed ACK would show, is measured by `cargo bench -p sphinx-standin`.)
    let (h, mut rx) = server().await;
    let (mut r, _) = Raw::connect(&h, &mut rx, "alice", 30).await;
    r.subscribe("alice/vls", QoS::AtLeastOnce).await;
    let n = 200u32;
    for i in 0..n {
        h.publish("alice/vls", Bytes::from(i.to_be_bytes().to_vec())).unwrap();
        let req = match r.read().await {
            Some(Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        };
        // PUBACK and the reply as two separate writes, as a naive client would.
        r.send(&frame(Packet::PubAck(v4::PubAck::new(req.pkid)))).await;
        let mut reply = v4::Publish::from_bytes("alice/vls-res", QoS::AtLeastOnce, req.payload.clone());
        reply.pkid = (i % 60000 + 1) as u16;
        r.send(&frame(Packet::Publish(reply))).await;
        let (_, topic, payload) = expect_message(&mut rx).await;
        assert_eq!((topic.as_str(), &payload[..]), ("alice/vls-res", &i.to_be_bytes()[..]));
        assert!(matches!(r.read().await, Some(Packet::PubAck(_))));
    }
}

#[tokio::test]
async fn shutdown_closes_everything() {
    let (h, mut rx) = server().await;
    let (mut alice, c) = connect(&h, &mut rx, "alice").await;
    h.shutdown();
    expect_disconnected(&mut rx, "alice", c).await;
    alice.closed().await;
    assert!(h.connected().is_empty());
}

/// `mosquitto_pub` or `mosquitto_sub` speaking MQTT 3.1.1 to 127.0.0.1:`port`.
fn mosquitto(cmd: &str, port: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(cmd);
    c.args(["-V", "mqttv311", "-h", "127.0.0.1", "-p", port]);
    c
}

/// Foreign clients: mosquitto_pub / mosquitto_sub (Debian `mosquitto-clients`), if installed.
#[tokio::test]
async fn mosquitto_clients_interoperate() {
    let have = |cmd: &str| std::process::Command::new(cmd).arg("--help").output().is_ok();
    if !have("mosquitto_pub") || !have("mosquitto_sub") {
        println!("SKIPPED mosquitto_clients_interoperate: mosquitto_pub/mosquitto_sub not on PATH (apt-get install mosquitto-clients)");
        return;
    }
    let (h, mut rx) = server().await;
    let port = h.local_addr().port().to_string();

    // Subscriber: waits for one message on carol/vls.
    let sub = mosquitto("mosquitto_sub", &port)
        .args(["-i", "carol-sub", "-u", "carol", "-P", "carol", "-q", "1", "-t", "carol/vls", "-C", "1"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let c = expect_connected(&mut rx, "carol").await;
    tokio::time::timeout(WAIT, h.wait_subscriber("carol/vls")).await.unwrap();
    h.publish("carol/vls", Bytes::from_static(b"hello from the broker")).unwrap();
    let out = tokio::time::timeout(WAIT, sub.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "mosquitto_sub failed: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), "hello from the broker");
    expect_disconnected(&mut rx, "carol", c).await;

    // Publisher: QoS 1 to its own prefix becomes an event.
    let status = mosquitto("mosquitto_pub", &port)
        .args(["-i", "carol-pub", "-u", "carol", "-P", "carol", "-q", "1", "-t", "carol/vls-res", "-m", "signed"])
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(WAIT, status).await.unwrap().unwrap();
    assert!(status.success());
    let c = expect_connected(&mut rx, "carol").await;
    let (id, topic, payload) = expect_message(&mut rx).await;
    assert_eq!((id.as_str(), topic.as_str(), &payload[..]), ("carol", "carol/vls-res", &b"signed"[..]));
    expect_disconnected(&mut rx, "carol", c).await;

    // A wrong password is refused (mosquitto_pub exits non-zero), with no events.
    let status = mosquitto("mosquitto_pub", &port)
        .args(["-u", "carol", "-P", "nope"])
        .args(["-t", "carol/x", "-m", "x"])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(WAIT, status).await.unwrap().unwrap();
    assert!(!status.success());
    assert!(rx.try_recv().is_none());
}

// ---------- pre-login slot exhaustion (issue 8, item 2) ----------

/// An attacker's idle sockets: `per_ip` from each address in `ips`, never sending a byte, each
/// reopened 50 ms after the server closes it. Resolves once every socket has connected once;
/// abort the returned tasks to stop the attack.
async fn idle_attack(
    addr: std::net::SocketAddr,
    ips: &[std::net::Ipv4Addr],
    per_ip: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (up_tx, mut up_rx) = mpsc::channel::<()>(1024);
    let mut tasks = Vec::new();
    for ip in ips {
        for _ in 0..per_ip {
            let (ip, up) = (*ip, up_tx.clone());
            tasks.push(tokio::spawn(async move {
                let mut first = Some(up);
                loop {
                    let sock = tokio::net::TcpSocket::new_v4().unwrap();
                    sock.bind((ip, 0).into()).unwrap();
                    if let Ok(mut s) = sock.connect(addr).await {
                        if let Some(up) = first.take() {
                            let _ = up.send(()).await;
                        }
                        // Hold it until the server closes it.
                        let mut b = [0u8; 64];
                        while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }));
        }
    }
    drop(up_tx);
    for _ in 0..tasks.len() {
        tokio::time::timeout(WAIT, up_rx.recv()).await.unwrap().unwrap();
    }
    tasks
}

/// Logs `name` in from 127.0.0.1, retrying (every 20 ms) while the server closes the socket
/// without a CONNACK; panics unless it succeeds within `bound`. Returns the connection.
async fn login_within(h: &MqttHandle, rx: &mut MqttEvents, name: &str, bound: Duration) -> (Raw, u64) {
    let t = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut r = Raw::open(h).await;
        let mut c = v4::Connect::new(name);
        c.keep_alive = 30;
        c.set_login(name, name);
        if r.s.write_all(&frame(Packet::Connect(c))).await.is_ok() {
            match r.read().await {
                Some(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => {
                    return (r, expect_connected(rx, name).await);
                }
                Some(other) => panic!("expected CONNACK, got {other:?}"),
                None => {}
            }
        }
        assert!(t.elapsed() < bound, "{name} could not log in within {bound:?} ({attempts} attempts)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legit_client_logs_in_while_200_idle_sockets_are_held_and_reopened() {
    // Default limits and max_clients (64 handshake slots); the attacker holds 200 idle sockets
    // from 25 loopback addresses, 127.0.0.1 (the legitimate client's own) among them.
    init_tracing();
    let (h, mut rx) =
        mqtt::start_with(MqttConfig::new("127.0.0.1:0".parse().unwrap()), Limits::default(), TokenAuth, OwnPrefix)
            .await
            .unwrap();
    let ips: Vec<std::net::Ipv4Addr> = (1..=25).map(|i| std::net::Ipv4Addr::new(127, 0, 0, i)).collect();
    let attack = idle_attack(h.local_addr(), &ips, 8).await;
    // Well below the CONNECT deadline: before the fix every slot stayed taken for all of it.
    let bound = Duration::from_secs(3);
    for i in 0..5 {
        let name = format!("signer{i}");
        let (mut r, c) = login_within(&h, &mut rx, &name, bound).await;
        r.send(&frame(Packet::Disconnect)).await;
        expect_disconnected(&mut rx, &name, c).await;
    }
    for t in attack {
        t.abort();
    }
}

#[tokio::test]
async fn fifth_idle_socket_from_one_address_sheds_the_oldest() {
    let (h, _rx) = server().await;
    let addr = h.local_addr();
    let open_from = |ip: [u8; 4]| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((std::net::Ipv4Addr::from(ip), 0).into()).unwrap();
        Raw { s: sock.connect(addr).await.unwrap(), buf: BytesMut::new() }
    };
    let mut first = open_from([127, 0, 0, 9]).await;
    let mut rest = Vec::new();
    for _ in 0..4 {
        rest.push(open_from([127, 0, 0, 9]).await);
    }
    // Closed long before the CONNECT deadline (5 s): shed for the fifth.
    let t = Instant::now();
    first.expect_eof().await;
    assert!(t.elapsed() < Duration::from_secs(3), "shed after {:?}", t.elapsed());
}

// ---------- outbound queue bounded in bytes (issue 8, item 3) ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_dropped_at_the_byte_bound_while_a_reader_gets_everything() {
    let cfg = MqttConfig { max_payload: 1 << 20, ..config() };
    let limits = Limits::default();
    let bound = limits.outbound_queue_bytes;
    let (h, mut rx) = server_with(cfg, limits).await;
    let (mut slow, slow_conn) = Raw::connect(&h, &mut rx, "slow", 30).await;
    slow.subscribe("slow/vls", QoS::AtLeastOnce).await;
    let (mut fast, _) = Raw::connect(&h, &mut rx, "fast", 30).await;
    fast.subscribe("fast/vls", QoS::AtLeastOnce).await;
    // The reading subscriber acknowledges and reports every publish it gets.
    let (got_tx, mut got) = mpsc::unbounded_channel::<Bytes>();
    let reader = tokio::spawn(async move {
        while let Some(p) = fast.read().await {
            if let Packet::Publish(p) = p {
                fast.send(&frame(Packet::PubAck(v4::PubAck::new(p.pkid)))).await;
                got_tx.send(p.payload).unwrap();
            }
        }
    });
    // 48 publishes of 1 MiB to each; "slow" never reads.
    let n = 48u8;
    let (mut peak, mut slow_dropped_at) = (0usize, None);
    for i in 0..n {
        let payload = Bytes::from(vec![i; 1 << 20]);
        if h.publish_count("slow/vls", payload.clone()).unwrap() == 0 && slow_dropped_at.is_none() {
            slow_dropped_at = Some(i);
        }
        // Only routing grows the count, so sampling after each publish sees its peak.
        peak = peak.max(h.outbound_bytes("slow").unwrap_or(0));
        assert_eq!(h.publish_count("fast/vls", payload.clone()).unwrap(), 1, "the reader stays connected");
        let p = tokio::time::timeout(WAIT, got.recv()).await.unwrap().unwrap();
        assert!(p == payload, "publish {i} reached the reader intact");
    }
    assert!(peak > 0 && peak <= bound, "buffered for the slow reader: {peak} bytes, bound {bound}");
    assert!(slow_dropped_at.is_some(), "the slow reader was never dropped (peak {peak} bytes)");
    expect_disconnected(&mut rx, "slow", slow_conn).await;
    assert_eq!(h.outbound_bytes("slow"), None);
    assert_eq!(h.connected(), vec!["fast".to_string()]);
    reader.abort();
}

#[tokio::test]
async fn writer_without_progress_is_dropped() {
    // A byte bound too large to matter: only the stalled write can drop the client.
    let cfg = MqttConfig { max_payload: 1 << 20, ..config() };
    let limits = Limits {
        outbound_queue_bytes: 256 << 20,
        write_stall_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let (h, mut rx) = server_with(cfg, limits).await;
    let (mut r, c) = Raw::connect(&h, &mut rx, "alice", 30).await;
    r.subscribe("alice/vls", QoS::AtMostOnce).await;
    // More than the loopback socket buffers hold; the client never reads.
    for i in 0..32u8 {
        assert_eq!(h.publish_count("alice/vls", Bytes::from(vec![i; 1 << 20])), Ok(1));
    }
    let t = Instant::now();
    expect_disconnected(&mut rx, "alice", c).await;
    assert!(t.elapsed() < Duration::from_secs(5), "dropped after {:?}", t.elapsed());
}
