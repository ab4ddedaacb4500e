//! Upstream compatibility, checked with upstream sphinx-rs's own published code rather than our
//! reading of it: `sphinx-auther` 0.1.12 (the login token and the signed-nonce framing that
//! upstream's `vls-mqtt` signer and owner tools use) and `sphinx-glyph` 0.1.2 (an older glyph,
//! whose formats differ from today's upstream: docs/wire.md "Upstream compatibility").
//!
//! - A token made by upstream's `Token::new().sign_to_base64` logs in to the real broker
//!   (in-process, embedded MQTT, a rumqttc client doing what vls-mqtt does: random 8-character
//!   client id, the same subscriptions, hello right away) as the pinned node's signer, and the
//!   session signs lightningd's requests; stale, tampered or replayed upstream tokens are refused.
//! - Our tokens (`sphinx_wire::token`, `Signer::login_token`) verify and recover with upstream's
//!   `Token::from_base64(..).recover()/.verify()`.
//! - Control messages framed by upstream's `nonce::build_msg` / `nonce::Controller` over our
//!   msgpack are accepted by a real `sphinx-key run` device over MQTT; its responses' trailers
//!   parse with upstream's `nonce::parse_msg_no_nonce` and recover the device key.
//! - sphinx-glyph 0.1.2's control messages are refused cleanly (adjacently tagged enum, other
//!   policy fields): the exact bytes are asserted so the documented difference stays true.
//!
//! The real-device test needs `target/release/sphinx-key` (scripts/test builds every binary).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
use bitcoin::Network;
use bytes::Bytes;
use common::{start_key, trace_request, Dir};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS};
use sphinx_auther::nonce as up_nonce;
use sphinx_auther::secp256k1 as up;
use sphinx_auther::token::{base64_encode as up_base64, Token as UpToken};
use sphinx_broker::config::Config;
use sphinx_broker::hub::SignerEvent;
use sphinx_broker::Broker;
use sphinx_glyph::control as glyph_control;
use sphinx_glyph::types as glyph;
use sphinx_signer::{ClockConfig, Signer, SignerConfig};
use sphinx_wire::control::{self, ControlMessage as M, ControlResponse as R, Interval, Policy};
use sphinx_wire::{token, topics, ClientContext};
use tokio::sync::{broadcast, mpsc};

const WAIT: Duration = Duration::from_secs(30);
const ALICE_SEED: [u8; 32] = [0x41; 32];
/// The recorded session's clock (the trace's requests are valid at this time).
const CLOCK: u64 = 1_795_466_257;
/// A client id as vls-mqtt makes them (`random_word(8)`: 8 alphanumerics).
const UPSTREAM_CID: &str = "Xq3vLm9Z";
/// The fixture token of sphinx-auther 0.1.12's own tests (`a_token()`), made by upstream for the
/// key `[0xcd; 32]` in 2022: a genuine upstream token, long stale.
const UPSTREAM_2022_TOKEN: &str =
    "YvM0wyAZBWdHaVsS4sqy-ub3X0JRx7zVTY9O6aL0q_CIV9zOKykO_grPE4DSelinHNX9pTFZ3wEoLhg5QT7EVZpOlj0x";

fn alice() -> (PublicKey, SecretKey) {
    sphinx_signer::node_keys_for_seed(&ALICE_SEED, Network::Regtest)
}

fn key(byte: u8) -> (PublicKey, SecretKey) {
    let sk = SecretKey::from_slice(&[byte; 32]).unwrap();
    (PublicKey::from_secret_key(&Secp256k1::new(), &sk), sk)
}

/// The same secret as upstream's secp256k1 (0.24) type.
fn up_sk(sk: &SecretKey) -> up::SecretKey {
    up::SecretKey::from_slice(&sk.secret_bytes()).unwrap()
}

fn up_pk(pk: &PublicKey) -> up::PublicKey {
    up::PublicKey::from_slice(&pk.serialize()).unwrap()
}

fn now() -> u32 {
    sphinx_wire::unix_now() as u32
}

/// An upstream-made token for time `ts`: upstream's own `sign_message` over the 4 time bytes and
/// its base64 (what `Token::sign_to_base64` does for `now`; `Token` cannot be given a time).
fn upstream_token_at(sk: &SecretKey, ts: u32) -> String {
    let mut raw = ts.to_be_bytes().to_vec();
    raw.extend(sphinx_auther::sign_message(&ts.to_be_bytes(), &up_sk(sk)).unwrap());
    up_base64(&raw)
}

/// `token` with bit `bit` of raw byte `at` flipped (re-encoded as base64url).
fn flip(token: &str, at: usize, bit: u8) -> String {
    let mut raw = sphinx_auther::token::base64_decode(token).unwrap();
    raw[at] ^= 1 << bit;
    up_base64(&raw)
}

async fn broker(dir: &Dir, pinned: &PublicKey) -> Broker {
    let mut cfg = Config { network: Network::Regtest, data_dir: dir.0.join("broker"), ..Config::default() };
    cfg.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    cfg.signer_node_id = Some(pinned.to_string());
    sphinx_broker::start(&cfg).await.unwrap()
}

/// An MQTT session that got a successful CONNACK; its events arrive on `events`.
struct Session {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Event>,
}

/// Logs in as vls-mqtt does (`mqtt.rs`: credentials = node id hex and the token, keep-alive 5 s,
/// 256 KiB packets). `Err` is the broker's refusal (or any other connection error).
async fn login(addr: SocketAddr, client_id: &str, user: &str, password: &str) -> Result<Session, ConnectionError> {
    let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_credentials(user, password);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(262_144, 262_144);
    let (client, mut el) = AsyncClient::new(opts, 10);
    match tokio::time::timeout(WAIT, el.poll()).await.expect("CONNACK or refusal in time")? {
        Event::Incoming(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::Success),
        other => panic!("expected CONNACK first, got {other:?}"),
    }
    let (tx, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    Ok(Session { client, events })
}

fn assert_refused(r: Result<Session, ConnectionError>, what: &str) {
    match r {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_ne!(code, ConnectReturnCode::Success, "{what}");
        }
        Err(e) => panic!("{what}: expected a CONNACK refusal, got {e}"),
        Ok(_) => panic!("{what}: the broker accepted it"),
    }
}

async fn hub_event(rx: &mut broadcast::Receiver<SignerEvent>, f: impl Fn(&SignerEvent) -> bool) -> SignerEvent {
    loop {
        let ev = tokio::time::timeout(WAIT, rx.recv()).await.expect("hub event in time").unwrap();
        if f(&ev) {
            return ev;
        }
    }
}

fn signer_config() -> SignerConfig {
    SignerConfig { network: Network::Regtest, policy: Default::default(), clock: ClockConfig::Fixed(CLOCK) }
}

/// Answers every `{cid}/vls` frame of `s` with a real in-process signer on `{cid}/vls-res`, as
/// vls-mqtt does with its own signer (no LSS: nothing to back up, the reply goes out at once).
fn serve_vls(mut s: Session, cid: &str, mut signer: Signer) {
    let (vls, vls_res) = (topics::topic(cid, topics::VLS), topics::topic(cid, topics::VLS_RES));
    tokio::spawn(async move {
        while let Some(ev) = s.events.recv().await {
            let Event::Incoming(Packet::Publish(p)) = ev else { continue };
            if p.topic != vls {
                continue;
            }
            let reply = signer.handle_frame(&p.payload).expect("the signer answers the relayed frame");
            if s.client.publish(vls_res.clone(), QoS::AtLeastOnce, false, reply).await.is_err() {
                return;
            }
        }
    });
}

/// A token made by upstream's own `Token::new().sign_to_base64` logs in as the pinned node's
/// signer; the session, set up exactly as vls-mqtt sets up its own, then signs lightningd's
/// `hsmd_init` and a `check_pubkey` through the relay. The same token a second time is refused
/// (upstream's broker would take it again; ours accepts each token once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_token_logs_in_as_the_pinned_signer_and_signs() {
    let dir = Dir::fresh("sphinx-upstream-login");
    let (pk, sk) = alice();
    let b = broker(&dir, &pk).await;
    let mut hub = b.hub.subscribe();
    let addr = b.mqtt.local_addr();
    let user = hex::encode(up_pk(&pk).serialize()); // vls-mqtt: hex::encode(pubkey.serialize())
    let password = UpToken::new().sign_to_base64(&up_sk(&sk)).unwrap();

    let s = login(addr, UPSTREAM_CID, &user, &password).await.expect("upstream token accepted");
    // vls-mqtt subscribes to these (QoS 0) and says hello without waiting for the SUBACKs.
    for t in [topics::VLS, topics::CONTROL, topics::LSS_MSG, topics::INIT_1_MSG, topics::INIT_2_MSG] {
        s.client.subscribe(topics::topic(UPSTREAM_CID, t), QoS::AtMostOnce).await.unwrap();
    }
    s.client.publish(topics::topic(UPSTREAM_CID, topics::HELLO), QoS::AtLeastOnce, false, vec![]).await.unwrap();
    let ready = hub_event(&mut hub, |e| matches!(e, SignerEvent::Ready { .. })).await;
    let SignerEvent::Ready { node_id, client_id, .. } = ready else { unreachable!() };
    assert_eq!((node_id.as_str(), client_id.as_str()), (pk.to_string().as_str(), UPSTREAM_CID));

    serve_vls(s, UPSTREAM_CID, Signer::in_memory(ALICE_SEED, &signer_config()).unwrap());
    let init = tokio::time::timeout(WAIT, b.relay.call(ClientContext::ROOT, trace_request(11)))
        .await
        .expect("hsmd_init answered in time")
        .expect("hsmd_init answered");
    assert_eq!(&init[..2], &[0, 114], "hsmd_init_reply_v4");
    let check = tokio::time::timeout(WAIT, b.relay.call(ClientContext::ROOT, trace_request(28)))
        .await
        .expect("check_pubkey answered in time")
        .expect("check_pubkey answered");
    assert_eq!(check, vec![0, 128, 1], "check_pubkey_reply: ok");

    // Replaying the same upstream token (another client id, so it is not a session takeover).
    assert_refused(login(addr, "Replay01", &user, &password).await, "replayed upstream token");
}

/// Upstream tokens that must not log in: upstream's own 2022 fixture token (genuine, stale), a
/// stale one made now by upstream's signing code, and fresh ones with one bit flipped in the
/// signature or in the time. The broker refuses each at CONNECT, and `token::verify` (the
/// broker's check) says why. A fresh, untouched upstream token of the same key then logs in, so
/// the refusals are about the tokens, not the setup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_or_tampered_upstream_tokens_are_refused() {
    let dir = Dir::fresh("sphinx-upstream-refused");
    // The key of upstream's fixture token.
    let (pk, sk) = key(0xcd);
    let b = broker(&dir, &pk).await;
    let addr = b.mqtt.local_addr();
    let user = pk.to_string();
    let verify = |t: &str| token::verify(&user, t.as_bytes(), u64::from(now()), 300);

    // Upstream itself still takes its fixture (it never checks the time).
    assert_eq!(UpToken::from_base64(UPSTREAM_2022_TOKEN).unwrap().recover().unwrap(), up_pk(&pk));
    assert!(matches!(verify(UPSTREAM_2022_TOKEN), Err(token::Error::Expired { ts: 0x62f3_34c3, .. })));
    assert_refused(login(addr, "Stale001", &user, UPSTREAM_2022_TOKEN).await, "upstream's 2022 token");

    let hour_old = upstream_token_at(&sk, now() - 3600);
    assert!(matches!(verify(&hour_old), Err(token::Error::Expired { .. })));
    assert_refused(login(addr, "Stale002", &user, &hour_old).await, "an hour-old upstream token");

    let fresh = UpToken::new().sign_to_base64(&up_sk(&sk)).unwrap();
    assert!(verify(&fresh).is_ok());
    // Byte 0..4: time; 4: 31 + recovery id; 5..37: r; 37..69: s.
    for (at, bit, what) in [(3, 0, "time"), (10, 3, "r"), (60, 5, "s"), (4, 0, "recovery id")] {
        let bad = flip(&fresh, at, bit);
        let why = verify(&bad).expect_err(what);
        assert!(
            matches!(why, token::Error::Signature | token::Error::WrongKey { .. } | token::Error::HighS),
            "{what}: {why}"
        );
        assert_refused(login(addr, "Tamper01", &user, &bad).await, what);
    }

    login(addr, UPSTREAM_CID, &user, &fresh).await.expect("the untouched upstream token logs in");
}

/// Tokens made by our code (what `sphinx-key` sends) verify with upstream's own parser, recover
/// the node key and pass upstream's freshness check; one flipped bit does not.
#[test]
fn our_tokens_verify_with_upstream_code() {
    let (pk, sk) = alice();
    let signer = Signer::in_memory(ALICE_SEED, &signer_config()).unwrap();
    for ours in [token::make(&sk, now()), signer.login_token(now())] {
        let t = UpToken::from_base64(&ours).expect("upstream parses our token");
        assert_eq!(t.recover().expect("upstream recovers a key"), up_pk(&pk));
        t.verify(&up_pk(&pk)).expect("upstream verifies it against the node key");
        assert_eq!(t.recover_within(60).unwrap(), up_pk(&pk));

        let bad = UpToken::from_base64(&flip(&ours, 20, 1)).unwrap();
        assert!(bad.verify(&up_pk(&pk)).is_err());
    }
    // Both sides make byte-identical tokens for the same time (RFC 6979 signatures).
    let ts = now();
    assert_eq!(token::make(&sk, ts), upstream_token_at(&sk, ts));
}

/// Sends `req` on the device's `{cid}/control` through the broker (as the API does) and returns
/// its `{cid}/control-res`.
async fn control_call(b: &Broker, cid: &str, req: Vec<u8>) -> Bytes {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut call = b.hub.control_call(cid, deadline).await.unwrap();
    b.mqtt.publish(&topics::topic(cid, topics::CONTROL), Bytes::from(req)).unwrap();
    tokio::time::timeout_at(deadline, call.recv()).await.expect("control response in time").expect("device connected")
}

/// Upstream's `parse_msg_no_nonce` on a device response: the msgpack body (read as our
/// `ControlResponse`, exactly) and the nonce, after checking the device key's signature.
fn upstream_reads(resp: &[u8], device: &PublicKey) -> (R, u64) {
    let (body, nonce) = up_nonce::parse_msg_no_nonce(resp, &up_pk(device)).expect("upstream verifies the device");
    (rmp_serde::from_slice(&body).expect("a ControlResponse"), nonce)
}

fn key_bin() -> PathBuf {
    let p = common::key_bin_path().unwrap();
    assert!(p.is_file(), "{} not found: cargo build --release -p sphinx-key first", p.display());
    p
}

/// Control messages framed by upstream's `nonce::build_msg` and `nonce::Controller` (owner key =
/// node key, our msgpack inside) reach a real `sphinx-key run` device over MQTT and are accepted;
/// the device's responses parse with upstream's `parse_msg_no_nonce` and recover its key. A
/// request with one flipped bit is refused (signed Error), consuming no nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_framed_control_reaches_the_device_and_its_answers_verify_upstream() {
    let dir = Dir::fresh("sphinx-upstream-control");
    let (pk, sk) = alice();
    let b = broker(&dir, &pk).await;
    let mut hub = b.hub.subscribe();
    let device = start_key(&key_bin(), &dir.0.join("key"), &b.mqtt.local_addr().to_string(), &[]);
    let ready = tokio::time::timeout(WAIT, hub_event(&mut hub, |e| matches!(e, SignerEvent::Ready { .. })))
        .await
        .unwrap_or_else(|_| panic!("device never said hello; its log:\n{}", device.log()));
    let SignerEvent::Ready { client_id: cid, .. } = ready else { unreachable!() };

    let limits = Policy { msat_per_interval: 123_000, interval: Interval::Hourly, htlc_limit_msat: 45_000 };
    let body = rmp_serde::to_vec(&M::UpdatePolicy(limits)).unwrap();
    let req = up_nonce::build_msg(&body, &up_sk(&sk), 1).unwrap();
    // Upstream's framing is ours, byte for byte.
    assert_eq!(req, control::build_request(&M::UpdatePolicy(limits), 1, &sk).unwrap());
    let resp = control_call(&b, &cid, req).await;
    assert_eq!(upstream_reads(&resp, &pk), (R::PolicyUpdated(limits), 1), "{}", device.log());
    up_nonce::parse_msg(&resp, &up_pk(&pk), 0).expect("upstream's nonce-checking parser too");

    // Upstream's owner-side Controller numbers its own nonces (this one: 2).
    let mut owner = up_nonce::Controller::new(up_sk(&sk), up_pk(&pk), 1);
    let req = owner.build_msg(&rmp_serde::to_vec(&M::QueryPolicy).unwrap()).unwrap();
    let resp = control_call(&b, &cid, req).await;
    assert_eq!(upstream_reads(&resp, &pk), (R::PolicyCurrent(limits), 2));

    // One bit of the signed msgpack flipped: refused, signed, bound to the request's nonce.
    let mut bad = owner.build_msg(&rmp_serde::to_vec(&M::ResetAll).unwrap()).unwrap();
    bad[0] ^= 0x01;
    let (answer, nonce) = upstream_reads(&control_call(&b, &cid, bad).await, &pk);
    assert!(matches!(answer, R::Error(_)), "{answer:?}");
    assert_eq!(nonce, 3);
    // Nonce 3 is still free: the refused message changed nothing.
    let req = owner.build_msg_with_nonce(&rmp_serde::to_vec(&M::Nonce).unwrap(), 3).unwrap();
    assert_eq!(upstream_reads(&control_call(&b, &cid, req).await, &pk).0, R::Nonce(2));
}

/// sphinx-glyph 0.1.2 (old upstream) does not interoperate on control messages, and fails
/// closed: its `ControlMessage` is adjacently tagged (`{"type": .., "content": ..}`; ours and
/// today's upstream: externally tagged) and its `Policy` is `{sat_limit, interval, htlc_limit}`.
/// Its requests are refused by our device with a signed Error (nothing changes, no nonce used);
/// its parser reads our answers only where the shapes happen to agree. The bytes asserted here
/// are the ones docs/wire.md "Upstream compatibility" shows.
#[test]
fn old_glyph_control_messages_are_refused_cleanly() {
    let (pk, sk) = alice();
    let mut s = Signer::in_memory(ALICE_SEED, &signer_config()).unwrap();
    let ask = |s: &mut Signer, req: &[u8]| {
        let out = s.control(req);
        assert_eq!(upstream_reads(&out.response, &pk).0, out.answer);
        out.answer
    };

    // `Nonce`: glyph 0.1.2's {"type": "Nonce"}, which `rmp_serde::to_vec` writes as the array
    // ["Nonce"]; we (and upstream today) write the string.
    let old = glyph_control::build_control_msg(glyph::ControlMessage::Nonce, 1, &up_sk(&sk)).unwrap();
    assert_eq!(&old[..old.len() - 73], b"\x91\xa5Nonce");
    assert_eq!(rmp_serde::to_vec(&M::Nonce).unwrap(), b"\xa5Nonce");
    assert!(matches!(ask(&mut s, &old), R::Error(t) if t.contains("decode")));

    let old_policy = glyph::Policy { sat_limit: 10, interval: glyph::Interval::Hourly, htlc_limit: 5 };
    let old =
        glyph_control::build_control_msg(glyph::ControlMessage::UpdatePolicy(old_policy), 1, &up_sk(&sk)).unwrap();
    assert_eq!(&old[..old.len() - 73], b"\x92\xacUpdatePolicy\x93\x0a\xa6hourly\x05");
    assert!(matches!(ask(&mut s, &old), R::Error(t) if t.contains("decode")));
    // Nothing changed: the policy is the default and nonce 1 is still free.
    let query = control::build_request(&M::QueryPolicy, 1, &sk).unwrap();
    assert_eq!(ask(&mut s, &query), R::PolicyCurrent(Policy::default()));

    // glyph 0.1.2's parser on our answers: `Nonce(n)` has one shape in both; a policy is a
    // positional array in both (rmp-serde's `to_vec`), so glyph reads our msat as its sats.
    let nonce = s.control(&control::build_request(&M::Nonce, 0, &sk).unwrap()).response;
    assert!(matches!(glyph_control::parse_control_response(&nonce), Ok(glyph::ControlResponse::Nonce(1))));
    let policy = s.control(&control::build_request(&M::QueryPolicy, 2, &sk).unwrap()).response;
    let Ok(glyph::ControlResponse::PolicyCurrent(p)) = glyph_control::parse_control_response(&policy) else {
        panic!("glyph 0.1.2 reads a PolicyCurrent");
    };
    assert_eq!((p.sat_limit, p.htlc_limit), (Policy::default().msat_per_interval, Policy::default().htlc_limit_msat));
}

/// Alice's recorded requests (lightningd's order) with their client contexts, without the
/// fd-passing `hsmd_client_hsmfd` (9) and `dev_memleak` (33) the broker answers itself.
fn recorded_requests() -> Vec<(ClientContext, Vec<u8>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/traces/open-pay-close/alice.jsonl");
    let mut out = Vec::new();
    for line in std::fs::read_to_string(path).unwrap().lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["dir"] != "req" || v["type"] == 9 || v["type"] == 33 {
            continue;
        }
        let mut peer_id = [0u8; 33];
        if let Some(p) = v["ctx"]["peer_id"].as_str() {
            peer_id.copy_from_slice(&hex::decode(p).unwrap());
        }
        let ctx = ClientContext {
            peer_id,
            dbid: v["ctx"]["dbid"].as_u64().unwrap(),
            permissions: v["ctx"]["permissions"].as_u64().unwrap(),
        };
        // Recorded against CLN's own hsmd, which has the preapprove "check" capability; with
        // VLS (which has not) lightningd sends 38/39 instead of 51/52, without `check_only`.
        let message = sphinx_wire::hsmd::without_check_capability(&hex::decode(v["hex"].as_str().unwrap()).unwrap());
        out.push((ctx, message));
    }
    out
}

/// vls-mqtt requires the `vls` frames of one session to be numbered consecutively: after the
/// first, each must carry the previous one's sequence number + 1, else it answers "invalid
/// sequence" on `{id}/error` and exits (`mqtt.rs`, `root::handle_inner`). With LSS on (which
/// vls-mqtt always needs: it waits for init-1 before it signs anything), the broker must not
/// spend sequence numbers between two requests to the active signer. Played here by our own
/// signer with LSS (it does not check the numbers) behind a real lssd; the broker's `vls`
/// frames are recorded and checked as vls-mqtt checks them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lss_the_vls_frames_of_a_session_are_numbered_consecutively() {
    let dir = Dir::fresh("sphinx-upstream-seq");
    let lssd = sphinx_lss::lssd::Lssd::start_in(&dir.0.join("lssd"), None).expect("lssd (target/release/lssd)");
    let (pk, _) = alice();
    let mut cfg = Config { network: Network::Regtest, data_dir: dir.0.join("broker"), ..Config::default() };
    cfg.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    cfg.signer_node_id = Some(pk.to_string());
    cfg.lss.url = Some(lssd.url());
    let b = sphinx_broker::start(&cfg).await.unwrap();

    let (_, sk) = alice();
    let password = UpToken::new().sign_to_base64(&up_sk(&sk)).unwrap();
    let mut s = login(b.mqtt.local_addr(), UPSTREAM_CID, &pk.to_string(), &password).await.unwrap();
    for t in topics::TO_SIGNER {
        s.client.subscribe(topics::topic(UPSTREAM_CID, t), QoS::AtMostOnce).await.unwrap();
    }
    s.client.publish(topics::topic(UPSTREAM_CID, topics::HELLO), QoS::AtLeastOnce, false, vec![]).await.unwrap();

    let seqs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u16>::new()));
    let mut signer = Signer::open(ALICE_SEED, &dir.0.join("signer"), &signer_config()).unwrap();
    let recorded = seqs.clone();
    tokio::spawn(async move {
        while let Some(ev) = s.events.recv().await {
            let Event::Incoming(Packet::Publish(p)) = ev else { continue };
            let Some((_, suffix)) = topics::split(&p.topic) else { continue };
            if suffix == topics::VLS && p.payload.len() >= 4 {
                recorded.lock().unwrap().push(u16::from_be_bytes([p.payload[2], p.payload[3]]));
            }
            for out in signer.on_message(suffix, &p.payload) {
                if let sphinx_signer::Output::Publish { topic, payload } = out {
                    let t = topics::topic(UPSTREAM_CID, topic);
                    if s.client.publish(t, QoS::AtLeastOnce, false, payload).await.is_err() {
                        return;
                    }
                }
            }
        }
    });

    let requests = recorded_requests();
    let n = requests.len();
    for (i, (ctx, msg)) in requests.into_iter().enumerate() {
        tokio::time::timeout(WAIT, b.relay.call(ctx, msg))
            .await
            .unwrap_or_else(|_| panic!("request {i} of {n} not answered in time"))
            .unwrap_or_else(|e| panic!("request {i} of {n}: {e}"));
    }
    let seqs = seqs.lock().unwrap().clone();
    assert!(seqs.len() >= n - 1, "{} vls frames for {n} requests", seqs.len());
    let gaps: Vec<(u16, u16)> =
        seqs.windows(2).filter(|w| w[1] != w[0].wrapping_add(1)).map(|w| (w[0], w[1])).collect();
    assert!(gaps.is_empty(), "{} gaps in the vls sequence, first {:?}", gaps.len(), &gaps[..gaps.len().min(5)]);
}

/// vls-mqtt reports a refusal on `{id}/error` as text alone (`e.to_string()`, no sequence
/// number) and handles one message at a time. lightningd gets the refusal at once (before, our
/// relay read the text's first two bytes as a sequence number that matched nothing, ignored the
/// report, and lightningd's request waited for `request_timeout`, 600 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_text_error_fails_the_request_at_once() {
    let dir = Dir::fresh("sphinx-upstream-error");
    let (pk, sk) = alice();
    let b = broker(&dir, &pk).await;
    let password = UpToken::new().sign_to_base64(&up_sk(&sk)).unwrap();
    let mut s = login(b.mqtt.local_addr(), UPSTREAM_CID, &pk.to_string(), &password).await.unwrap();
    s.client.subscribe(topics::topic(UPSTREAM_CID, topics::VLS), QoS::AtMostOnce).await.unwrap();
    s.client.publish(topics::topic(UPSTREAM_CID, topics::HELLO), QoS::AtLeastOnce, false, vec![]).await.unwrap();
    let mut signer = Signer::in_memory(ALICE_SEED, &signer_config()).unwrap();
    const REFUSAL: &str = "policy failure: check_pubkey refused by the test";
    tokio::spawn(async move {
        let mut ecdh = 0;
        while let Some(ev) = s.events.recv().await {
            let Event::Incoming(Packet::Publish(p)) = ev else { continue };
            // Serial request header: magic 2, seq 2, peer 33, dbid 8, len 4, then the type.
            // The second ecdh (type 28) it is sent is refused, the others are signed.
            let is_ecdh = p.payload.get(49..51) == Some(&[0, 28][..]);
            ecdh += usize::from(is_ecdh);
            let (suffix, payload) = if is_ecdh && ecdh == 2 {
                (topics::ERROR, REFUSAL.as_bytes().to_vec())
            } else {
                (topics::VLS_RES, signer.handle_frame(&p.payload).expect("the signer answers"))
            };
            let t = topics::topic(UPSTREAM_CID, suffix);
            if s.client.publish(t, QoS::AtLeastOnce, false, payload).await.is_err() {
                return;
            }
        }
    });
    let init = tokio::time::timeout(WAIT, b.relay.call(ClientContext::ROOT, trace_request(11))).await;
    assert!(matches!(init, Ok(Ok(ref r)) if r[..2] == [0, 114]), "{init:?}");
    // Three in flight at once: the refusal fails exactly the one refused. Had it failed
    // another, the refused one would wait for request_timeout and this would time out.
    let call = || tokio::time::timeout(WAIT, b.relay.call(ClientContext::ROOT, trace_request(28)));
    let (a, r, c) = tokio::join!(call(), call(), call());
    let results = [a, r, c].map(|x| x.expect("every request is answered at once, none after request_timeout"));
    let refused: Vec<_> = results.iter().filter_map(|x| x.as_ref().err()).collect();
    assert!(
        matches!(refused[..], [sphinx_broker::relay::RelayError::Refused(ref t)] if t == REFUSAL),
        "one refusal with upstream's text: {results:?}"
    );
    assert!(results.iter().flatten().all(|r| r[..2] == [0, 128]), "ecdh replies: {results:?}");
    let after = tokio::time::timeout(WAIT, b.relay.call(ClientContext::ROOT, trace_request(28))).await;
    assert!(matches!(after, Ok(Ok(ref r)) if r[..2] == [0, 128]), "the signer goes on after a refusal: {after:?}");
    // The operator's view has the refusal once, whole, with the seq it was attributed to.
    let shown = b.hub.signer(UPSTREAM_CID).and_then(|s| s.last_error).expect("the hub has the refusal");
    assert_eq!(shown.text, REFUSAL);
    assert!(shown.seq.is_some_and(|s| s != 0), "{shown:?}");
}
