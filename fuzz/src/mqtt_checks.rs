//! Checks of the MQTT server's packet handling (fuzz target `mqtt_packet`). Depends on
//! `sphinx_mqtt_server`, `rumqttc` 0.25 and `bytes` only, so
//! `crates/mqtt-server/tests/mqtt_fuzz_corpus.rs` can include it.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{self, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use sphinx_mqtt_server::topic::{
    filter_allowed, matches, owner, topic_allowed, valid_filter, valid_identity, valid_topic,
};
use sphinx_mqtt_server::MAX_CONNECT_PACKET;

/// The server's limit after CONNECT with the default `max_payload` (1 MiB): payload plus the
/// largest PUBLISH variable header.
const MAX_PACKET: usize = (1 << 20) + 2 + 65535 + 2;

/// `mqtt_packet`: bytes a client sends to the MQTT server.
///
/// 1. As the server reads them: a CONNECT (only if the first byte is 0x10, with
///    `MAX_CONNECT_PACKET`), then packets with the post-CONNECT limit, each topic and filter
///    through the server's validation and ACL helpers; the ACL invariants are asserted for every
///    (topic, filter) pair seen.
/// 2. As text `identity \n topic \n filter`, straight into the same helpers and invariants.
pub fn mqtt_packet(data: &[u8]) {
    {
        let text = String::from_utf8_lossy(data);
        let mut lines = text.splitn(3, '\n');
        let id = lines.next().unwrap_or_default();
        let topic = lines.next().unwrap_or_default();
        let filter = lines.next().unwrap_or_default();
        acl_invariants(id, topic, filter);
        acl_invariants(id, filter, topic);
    }

    let mut buf = BytesMut::from(data);
    let mut identity = String::from("alice");
    if buf.first() == Some(&0x10) {
        match v4::Packet::read(&mut buf, MAX_CONNECT_PACKET) {
            Ok(Packet::Connect(c)) => {
                let user = c.login.as_ref().map(|l| l.username.clone());
                if let Some(u) = user.filter(|u| valid_identity(u)) {
                    identity = u;
                } else if valid_identity(&c.client_id) {
                    identity = c.client_id;
                }
            }
            Ok(_) => unreachable!("first byte 0x10 decoded as another packet"),
            Err(_) => return,
        }
    }
    let mut topics: Vec<String> = Vec::new();
    let mut filters: Vec<String> = Vec::new();
    // Every successful read consumes at least 2 bytes; the bound only guards that assumption.
    for _ in 0..=data.len() {
        let before = buf.len();
        match v4::Packet::read(&mut buf, MAX_PACKET) {
            Ok(p) => {
                assert!(buf.len() < before, "codec returned a packet without consuming input");
                match p {
                    Packet::Publish(p) => {
                        if valid_topic(&p.topic) {
                            publish_round_trip(&p.topic, &p.payload);
                        }
                        topics.push(p.topic);
                    }
                    Packet::Subscribe(s) => filters.extend(s.filters.into_iter().map(|f| f.path)),
                    Packet::Unsubscribe(u) => filters.extend(u.topics),
                    Packet::Connect(c) => {
                        let _ = valid_identity(&c.client_id);
                    }
                    _ => {}
                }
            }
            Err(_) => break,
        }
    }
    for t in topics.iter().take(16) {
        for f in filters.iter().take(16) {
            acl_invariants(&identity, t, f);
        }
        acl_invariants(&identity, t, t);
    }
}

/// What the server's routing relies on.
fn acl_invariants(id: &str, topic: &str, filter: &str) {
    let id_ok = valid_identity(id);
    if id_ok {
        assert!(!id.contains('/'));
    }
    // The server only ever uses identities that passed `valid_identity` (conn.rs refuses others
    // at CONNECT), so the ACL invariants are stated for those.
    if id_ok && topic_allowed(id, topic) {
        assert!(valid_topic(topic));
        assert_eq!(owner(topic), Some(id), "publish allowed outside the identity's prefix");
    }
    if id_ok && filter_allowed(id, filter) {
        assert!(valid_filter(filter));
        assert!(filter.starts_with(id));
    }
    let m = matches(topic, filter);
    // With the default ACL (`OwnPrefix`) a client's granted filter only ever matches its own
    // topics, so `route` never delivers another identity's publish to it: the owner of a matching
    // topic is the identity, or the topic is the bare identity (`id/#` matches `id`), which no
    // client may publish to.
    if id_ok && filter_allowed(id, filter) && valid_topic(topic) && m {
        assert!(topic == id || owner(topic) == Some(id), "filter {filter:?} of {id:?} matches foreign topic {topic:?}");
    }
    if valid_topic(topic) {
        assert!(matches(topic, topic), "a topic name must match itself");
        if !topic.starts_with('$') {
            assert!(matches(topic, "#"));
        }
    }
}

/// The server encodes outbound publishes with the same codec (`Shared::route`); the client must
/// decode exactly what was sent.
fn publish_round_trip(topic: &str, payload: &Bytes) {
    let mut p = Publish::from_bytes(topic, QoS::AtLeastOnce, payload.clone());
    p.pkid = 1;
    let mut out = BytesMut::new();
    if let Err(e) = p.write(&mut out) {
        panic!("cannot encode a publish to a valid topic {topic:?}: {e}");
    }
    match v4::Packet::read(&mut out, MAX_PACKET) {
        Ok(Packet::Publish(q)) => {
            assert_eq!(q.topic, topic);
            assert_eq!(q.payload, *payload);
            assert_eq!(q.pkid, 1);
            assert_eq!(q.qos, QoS::AtLeastOnce);
        }
        other => panic!("publish to {topic:?} decoded as {other:?}"),
    }
    assert!(out.is_empty());
}
