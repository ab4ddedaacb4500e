//! TLS for the embedded MQTT server, over real sockets: a self-signed certificate made in the
//! test with `rcgen`, rumqttc 0.25 (rustls, ring provider) as the client, trusting the
//! certificate through `sphinx_tls` (CA file or pinned fingerprint).
//!
//! Synchronisation is always by awaiting something (an event, a packet, EOF); the timeouts only
//! turn a hang into a failure.

#[path = "../../tls/tests/common/mod.rs"]
mod certs;
mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use certs::{self_signed, Cert, Dir};
use common::{init_tracing, next_event, Refused, WAIT};
use rumqttc::mqttbytes::v4::{self, Connect, Login};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use sphinx_mqtt_server::{
    self as mqtt, Limits, MqttConfig, MqttEvent, MqttEvents, MqttHandle, OwnPrefix, StartError, TlsSettings,
};
use sphinx_tls::{Fingerprint, ServerTrust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// identity = username, accepted when password == username.
fn auth(_c: &str, u: Option<&str>, p: Option<&[u8]>) -> Result<String, Refused> {
    match (u, p) {
        (Some(u), Some(p)) if u.as_bytes() == p => Ok(u.to_string()),
        _ => Err(Refused("bad token".into())),
    }
}

fn tls_config(cert: &Cert, listen: &str) -> MqttConfig {
    MqttConfig {
        tls: Some(TlsSettings { cert_chain: cert.crt.clone(), private_key: cert.key.clone() }),
        ..MqttConfig::new(listen.parse().unwrap())
    }
}

async fn tls_server(cert: &Cert, limits: Limits) -> (MqttHandle, MqttEvents) {
    init_tracing();
    mqtt::start_with(tls_config(cert, "127.0.0.1:0"), limits, auth, OwnPrefix).await.unwrap()
}

fn tls_client(h: &MqttHandle, id: &str, trust: &ServerTrust) -> (AsyncClient, EventLoop) {
    let addr = h.local_addr();
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_credentials(id, id);
    let cfg = sphinx_tls::client_config(trust).unwrap();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    AsyncClient::new(opts, 16)
}

async fn poll(el: &mut EventLoop) -> Result<Event, ConnectionError> {
    tokio::time::timeout(WAIT, el.poll()).await.expect("timed out polling the client")
}

/// Polls until an incoming packet matching `want` (skipping outgoing notifications).
async fn until_incoming(el: &mut EventLoop, want: impl Fn(&Packet) -> bool) -> Packet {
    loop {
        match poll(el).await {
            Ok(Event::Incoming(p)) if want(&p) => return p,
            Ok(_) => {}
            Err(e) => panic!("client error: {e:?}"),
        }
    }
}

/// Connects, subscribes to `{id}/vls`, receives an application publish, and publishes a reply
/// that becomes an event: the whole relay path, over TLS.
async fn round_trip(h: &MqttHandle, rx: &mut MqttEvents, id: &str, trust: &ServerTrust) {
    let (client, mut el) = tls_client(h, id, trust);
    until_incoming(&mut el, |p| matches!(p, Packet::ConnAck(_))).await;
    let conn = match next_event(rx).await {
        MqttEvent::Connected { identity, conn_id } if identity == id => conn_id,
        other => panic!("expected Connected({id}), got {other:?}"),
    };
    client.subscribe(format!("{id}/vls"), QoS::AtLeastOnce).await.unwrap();
    until_incoming(&mut el, |p| matches!(p, Packet::SubAck(_))).await;
    h.wait_subscriber(&format!("{id}/vls")).await;
    assert_eq!(h.publish_count(&format!("{id}/vls"), Bytes::from_static(b"request")).unwrap(), 1);
    match until_incoming(&mut el, |p| matches!(p, Packet::Publish(_))).await {
        Packet::Publish(p) => {
            assert_eq!(p.topic, format!("{id}/vls"));
            assert_eq!(&p.payload[..], b"request");
        }
        _ => unreachable!(),
    }
    client.publish(format!("{id}/vls-res"), QoS::AtLeastOnce, false, "reply").await.unwrap();
    // Drive the client until its publish is acknowledged, while the event arrives.
    let ack = async {
        until_incoming(&mut el, |p| matches!(p, Packet::PubAck(_))).await;
        el
    };
    let (mut el, ev) = tokio::join!(ack, next_event(rx));
    match ev {
        MqttEvent::Message { identity, topic, payload, conn_id } => {
            assert_eq!((identity.as_str(), conn_id), (id, conn));
            assert_eq!(topic, format!("{id}/vls-res"));
            assert_eq!(&payload[..], b"reply");
        }
        other => panic!("expected Message, got {other:?}"),
    }
    client.disconnect().await.unwrap();
    loop {
        match poll(&mut el).await {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match next_event(rx).await {
        MqttEvent::Disconnected { identity, conn_id } => {
            assert_eq!((identity.as_str(), conn_id), (id, conn))
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

#[tokio::test]
async fn tls_client_trusting_the_certificate_works() {
    let dir = Dir::new("sphinx-mqtt-tls");
    let cert = self_signed(&dir, "broker");
    let (h, mut rx) = tls_server(&cert, Limits::default()).await;
    round_trip(&h, &mut rx, "alice", &ServerTrust::CaFile(cert.crt.clone())).await;
    round_trip(&h, &mut rx, "bob", &ServerTrust::Pinned(cert.fingerprint)).await;
    // The fingerprint as `openssl x509 -fingerprint -sha256` prints it parses to the same pin.
    let printed = format!("sha256 Fingerprint={}", cert.fingerprint);
    let pin: Fingerprint = printed.parse().unwrap();
    round_trip(&h, &mut rx, "carol", &ServerTrust::Pinned(pin)).await;
}

#[tokio::test]
async fn client_trusting_another_ca_fails_and_no_event() {
    let dir = Dir::new("sphinx-mqtt-tls");
    let cert = self_signed(&dir, "broker");
    let other = self_signed(&dir, "other");
    let (h, mut rx) = tls_server(&cert, Limits::default()).await;

    for trust in [ServerTrust::CaFile(other.crt.clone()), ServerTrust::Pinned(other.fingerprint)] {
        let (_c, mut el) = tls_client(&h, "mallory", &trust);
        match poll(&mut el).await {
            Err(ConnectionError::Tls(e)) => {
                assert!(e.to_string().contains("certificate"), "{e}")
            }
            other => panic!("expected a TLS error, got {other:?}"),
        }
    }
    // The refused clients never got to send a CONNECT: the next event is the good client's.
    round_trip(&h, &mut rx, "alice", &ServerTrust::CaFile(cert.crt.clone())).await;
    assert!(h.connected().is_empty());
    assert!(rx.try_recv().is_none(), "no event for the refused clients");
}

/// An MQTT CONNECT in clear text on the TLS port.
fn plaintext_connect() -> BytesMut {
    let mut c = Connect::new("alice");
    c.login = Some(Login::new("alice", "alice"));
    let mut b = BytesMut::new();
    c.write(&mut b).unwrap();
    b
}

#[tokio::test]
async fn plaintext_client_on_tls_port_is_closed_and_server_keeps_serving() {
    let dir = Dir::new("sphinx-mqtt-tls");
    let cert = self_signed(&dir, "broker");
    let (h, mut rx) = tls_server(&cert, Limits::default()).await;

    let mut s = TcpStream::connect(h.local_addr()).await.unwrap();
    s.write_all(&plaintext_connect()).await.unwrap();
    let mut got = Vec::new();
    // EOF (possibly after a TLS alert) or a reset; never a CONNACK.
    let r = tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("server did not close the plaintext connection");
    if let Err(e) = r {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    assert_ne!(got.first(), Some(&0x20), "got a CONNACK in clear text: {got:02x?}");

    round_trip(&h, &mut rx, "alice", &ServerTrust::CaFile(cert.crt.clone())).await;
}

#[tokio::test]
async fn silent_client_is_closed_at_the_connect_deadline() {
    let dir = Dir::new("sphinx-mqtt-tls");
    let cert = self_signed(&dir, "broker");
    let limits = Limits { connect_timeout: Duration::from_millis(300), ..Limits::default() };
    let (h, mut rx) = tls_server(&cert, limits).await;
    let mut s = TcpStream::connect(h.local_addr()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("a client that never starts the TLS handshake must be closed");
    round_trip(&h, &mut rx, "alice", &ServerTrust::Pinned(cert.fingerprint)).await;
}

#[tokio::test]
async fn plaintext_on_non_loopback_needs_opt_in() {
    init_tracing();
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let cfg = MqttConfig::new(listen.parse().unwrap());
        match mqtt::start(cfg, auth).await {
            Err(e @ StartError::PlaintextNonLoopback(_)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("TLS") && msg.contains(listen.trim_end_matches(":0").trim_matches(['[', ']'])),
                    "{msg}"
                );
            }
            Err(e) => panic!("expected PlaintextNonLoopback for {listen}, got {e}"),
            Ok(_) => panic!("plaintext on {listen} was accepted without opt-in"),
        }
    }
    assert!(mqtt::is_loopback("::ffff:127.0.0.1".parse().unwrap()));
    assert!(!mqtt::is_loopback("10.0.0.1".parse().unwrap()));

    // Explicit opt-in.
    let cfg = MqttConfig { allow_plaintext_non_loopback: true, ..MqttConfig::new("0.0.0.0:0".parse().unwrap()) };
    let (h, _rx) = mqtt::start(cfg, auth).await.unwrap();
    h.shutdown();

    // TLS on all interfaces needs no opt-in.
    let dir = Dir::new("sphinx-mqtt-tls");
    let cert = self_signed(&dir, "broker");
    let (h, _rx) = mqtt::start(tls_config(&cert, "0.0.0.0:0"), auth).await.unwrap();
    h.shutdown();

    // Unusable TLS files are a start error too.
    let mut cfg = tls_config(&cert, "127.0.0.1:0");
    if let Some(t) = cfg.tls.as_mut() {
        t.private_key = dir.0.join("missing.key");
    }
    assert!(matches!(mqtt::start(cfg, auth).await, Err(StartError::Tls(_))));
    let other = self_signed(&dir, "other");
    let mut cfg = tls_config(&cert, "127.0.0.1:0");
    if let Some(t) = cfg.tls.as_mut() {
        t.private_key = other.key.clone();
    }
    match mqtt::start(cfg, auth).await {
        Err(StartError::Tls(e)) => println!("mismatched key refused: {e}"),
        Err(e) => panic!("expected a TLS error, got {e}"),
        Ok(_) => panic!("a key that does not match the certificate was accepted"),
    }
}

/// A raw client over TLS (tokio-rustls + the v4 codec), with TCP_NODELAY.
struct RawTls {
    s: tokio_rustls::client::TlsStream<TcpStream>,
    buf: BytesMut,
}

impl RawTls {
    async fn connect(h: &MqttHandle, trust: &ServerTrust, name: &str) -> RawTls {
        let tcp = TcpStream::connect(h.local_addr()).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let connector = tokio_rustls::TlsConnector::from(sphinx_tls::client_config(trust).unwrap());
        let server_name = sphinx_tls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let s = connector.connect(server_name, tcp).await.unwrap();
        let mut r = RawTls { s, buf: BytesMut::new() };
        let mut c = Connect::new(name);
        c.keep_alive = 30;
        c.login = Some(Login::new(name, name));
        r.send(|b| c.write(b)).await;
        assert!(matches!(r.read().await, v4::Packet::ConnAck(_)));
        r
    }

    async fn send(&mut self, enc: impl FnOnce(&mut BytesMut) -> Result<usize, rumqttc::Error>) {
        let mut b = BytesMut::new();
        enc(&mut b).unwrap();
        self.s.write_all(&b).await.unwrap();
        self.s.flush().await.unwrap();
    }

    async fn read(&mut self) -> v4::Packet {
        tokio::time::timeout(WAIT, async {
            loop {
                match v4::Packet::read(&mut self.buf, 1 << 24) {
                    Ok(p) => return p,
                    Err(rumqttc::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("bad packet from server: {e}"),
                }
                let n = self.s.read_buf(&mut self.buf).await.unwrap();
                assert!(n > 0, "server closed the connection");
            }
        })
        .await
        .expect("timed out reading from the server")
    }
}

/// The relay's round trip (application QoS 1 publish → client PUBACK and QoS 1 reply as two
/// writes → `Message` event → server PUBACK), over TLS: every write is flushed, so nothing
/// waits in a TLS buffer.
#[tokio::test]
async fn qos1_request_reply_round_trips_over_tls() {
    let dir = Dir::new("sphinx-mqtt-tls");
    let cert = self_signed(&dir, "broker");
    let (h, mut rx) = tls_server(&cert, Limits::default()).await;
    let mut r = RawTls::connect(&h, &ServerTrust::Pinned(cert.fingerprint), "alice").await;
    assert!(matches!(next_event(&mut rx).await, MqttEvent::Connected { .. }));
    let mut sub = v4::Subscribe::new("alice/vls", rumqttc::mqttbytes::QoS::AtLeastOnce);
    sub.pkid = 1;
    r.send(|b| sub.write(b)).await;
    assert!(matches!(r.read().await, v4::Packet::SubAck(_)));
    let n = 200u32;
    for i in 0..n {
        h.publish("alice/vls", Bytes::from(i.to_be_bytes().to_vec())).unwrap();
        let req = match r.read().await {
            v4::Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        };
        r.send(|b| v4::PubAck::new(req.pkid).write(b)).await;
        let mut reply =
            v4::Publish::from_bytes("alice/vls-res", rumqttc::mqttbytes::QoS::AtLeastOnce, req.payload.clone());
        reply.pkid = (i % 60000 + 1) as u16;
        r.send(|b| reply.write(b)).await;
        match next_event(&mut rx).await {
            MqttEvent::Message { topic, payload, .. } => {
                assert_eq!(topic, "alice/vls-res");
                assert_eq!(&payload[..], &i.to_be_bytes()[..]);
            }
            other => panic!("expected Message, got {other:?}"),
        }
        assert!(matches!(r.read().await, v4::Packet::PubAck(_)));
    }
}
