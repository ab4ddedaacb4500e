//! The operator HTTP API over real sockets on 127.0.0.1: the broker (`sphinx_broker::start`)
//! with its embedded MQTT server, a rumqttc client playing the signer (logged in with a real
//! `sphinx_wire::token`), and hyper's HTTP/1.1 client connection as the operator.
//!
//! Synchronisation is by awaiting something (an MQTT packet, a hub or SSE event, a response);
//! the timeouts only turn a hang into a failure.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sphinx_broker::api::ApiToken;
use sphinx_broker::config::Config;
use sphinx_broker::hub::SignerEvent;
use sphinx_broker::Broker;
use sphinx_wire::control::{self, ControlMessage, ControlResponse, Policy};
use sphinx_wire::{token, topics};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc};

const TOKEN: &str = "test-api-token-0123456789";
const WAIT: Duration = Duration::from_secs(10);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "sphinx_broker=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> Dir {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "api-http-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn config(dir: &Dir, control_timeout: Duration) -> Config {
    let mut cfg = Config { data_dir: dir.0.join("broker"), ..Config::default() };
    cfg.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.api.token = Some(ApiToken::new(TOKEN).unwrap());
    cfg.api.control_timeout = control_timeout;
    cfg
}

async fn broker(dir: &Dir, control_timeout: Duration) -> Broker {
    init_tracing();
    sphinx_broker::start(&config(dir, control_timeout)).await.unwrap()
}

fn api_addr(b: &Broker) -> SocketAddr {
    b.api.as_ref().expect("API configured").local_addr()
}

// ---------------------------------------------------------------------------------------------
// HTTP client

async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Response<Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    tokio::time::timeout(WAIT * 2, sender.send_request(req)).await.expect("response in time").unwrap()
}

fn req(
    method: Method,
    path: &str,
    auth: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(path).header(header::HOST, "localhost");
    if let Some(a) = auth {
        b = b.header(header::AUTHORIZATION, a);
    }
    if let Some(c) = content_type {
        b = b.header(header::CONTENT_TYPE, c);
    }
    b.body(Full::new(Bytes::from(body))).unwrap()
}

async fn call(addr: SocketAddr, r: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
    let resp = send(addr, r).await;
    let (parts, body) = resp.into_parts();
    let bytes = tokio::time::timeout(WAIT, body.collect()).await.expect("body in time").unwrap().to_bytes();
    (parts.status, parts.headers, bytes)
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

async fn get(addr: SocketAddr, path: &str) -> (StatusCode, HeaderMap, Bytes) {
    call(addr, req(Method::GET, path, Some(&bearer()), None, vec![])).await
}

async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, headers, body) = get(addr, path).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    serde_json::from_slice(&body).unwrap()
}

async fn post_control(addr: SocketAddr, node_id: impl AsRef<str>, body: Vec<u8>) -> (StatusCode, HeaderMap, Bytes) {
    let path = format!("/v1/signers/{}/control", node_id.as_ref());
    call(addr, req(Method::POST, &path, Some(&bearer()), Some("application/octet-stream"), body)).await
}

/// A `/v1/events` stream, parsed into (event, data) pairs; comments are skipped.
struct Sse {
    body: Incoming,
    buf: String,
}

impl Sse {
    async fn open(addr: SocketAddr) -> Sse {
        let resp = send(addr, req(Method::GET, "/v1/events", Some(&bearer()), None, vec![])).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
        Sse { body: resp.into_body(), buf: String::new() }
    }

    async fn next(&mut self) -> (String, serde_json::Value) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut event = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event: ") {
                        event = Some(e.to_string());
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(d).unwrap());
                    }
                }
                if let (Some(e), Some(d)) = (event, data) {
                    return (e, d);
                }
                continue;
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("an SSE frame in time")
                .expect("stream still open")
                .unwrap();
            if let Ok(d) = frame.into_data() {
                self.buf.push_str(std::str::from_utf8(&d).unwrap());
            }
        }
    }

    /// The next event named `name`, skipping others.
    async fn expect(&mut self, name: &str) -> serde_json::Value {
        loop {
            let (e, d) = self.next().await;
            if e == name {
                return d;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The test signer

fn key(b: u8) -> (SecretKey, String) {
    let sk = SecretKey::from_slice(&[b; 32]).unwrap();
    let id = PublicKey::from_secret_key(&Secp256k1::new(), &sk).to_string();
    (sk, id)
}

struct TestSigner {
    /// Its identity: topic prefix (the client id).
    id: String,
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Event>,
}

impl TestSigner {
    /// Logs in with a fresh token, subscribes to `{id}/control` and says hello.
    async fn connect(mqtt: SocketAddr, sk: &SecretKey) -> TestSigner {
        // Client id = node id: a legacy client, whose identity (topic prefix) is its node id.
        let id = PublicKey::from_secret_key(&Secp256k1::new(), sk).to_string();
        Self::connect_as(mqtt, sk, &id, sphinx_wire::unix_now() as u32).await
    }

    /// Logs in as client id `client_id` (its identity and topic prefix) with a token for `now`.
    async fn connect_as(mqtt: SocketAddr, sk: &SecretKey, client_id: &str, now: u32) -> TestSigner {
        Self::connect_saying(mqtt, sk, client_id, now, sphinx_wire::error_report::HELLO).await
    }

    /// [`TestSigner::connect_as`], saying `hello` with this payload (upstream's is empty).
    async fn connect_saying(mqtt: SocketAddr, sk: &SecretKey, client_id: &str, now: u32, hello: &[u8]) -> TestSigner {
        let node = PublicKey::from_secret_key(&Secp256k1::new(), sk).to_string();
        let id = client_id.to_string();
        let mut opts = MqttOptions::new(id.clone(), mqtt.ip().to_string(), mqtt.port());
        opts.set_credentials(node, token::make(sk, now));
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(opts, 16);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(ev) = el.poll().await {
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        let mut s = TestSigner { id, client, events };
        s.until(|p| matches!(p, Packet::ConnAck(_))).await;
        s.client.subscribe(topics::topic(&s.id, topics::CONTROL), QoS::AtLeastOnce).await.unwrap();
        s.until(|p| matches!(p, Packet::SubAck(_))).await;
        s.publish(topics::HELLO, hello.to_vec()).await;
        s
    }

    async fn until(&mut self, f: impl Fn(&Packet) -> bool) -> Packet {
        loop {
            let ev = tokio::time::timeout(WAIT, self.events.recv())
                .await
                .expect("MQTT event in time")
                .expect("MQTT loop alive");
            if let Event::Incoming(p) = ev {
                if f(&p) {
                    return p;
                }
            }
        }
    }

    /// The next control request the broker relays.
    async fn control_request(&mut self) -> Vec<u8> {
        let topic = topics::topic(&self.id, topics::CONTROL);
        match self.until(|p| matches!(p, Packet::Publish(x) if x.topic == topic)).await {
            Packet::Publish(p) => p.payload.to_vec(),
            _ => unreachable!(),
        }
    }

    async fn publish(&self, suffix: &str, payload: Vec<u8>) {
        self.client.publish(topics::topic(&self.id, suffix), QoS::AtLeastOnce, false, payload).await.unwrap();
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

fn is_ready(id: &str) -> impl Fn(&SignerEvent) -> bool + '_ {
    move |e| matches!(e, SignerEvent::Ready { node_id, .. } if node_id == id)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn every_endpoint_needs_the_bearer_token() {
    let dir = temp_dir("auth");
    let b = broker(&dir, Duration::from_secs(10)).await;
    let addr = api_addr(&b);
    let node = key(0x31).1;
    let cases: Vec<(Method, String)> = vec![
        (Method::GET, "/v1/signers".into()),
        (Method::GET, "/v1/events".into()),
        (Method::GET, "/v1/chain".into()),
        (Method::GET, "/v1/chain/heartbeat".into()),
        (Method::POST, format!("/v1/signers/{node}/control")),
        (Method::GET, "/nope".into()),
    ];
    let wrong = [
        None,
        Some("Bearer wrong-token-0123456789".to_string()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_string()),
        Some("Bearer ".to_string()),
    ];
    for (m, path) in &cases {
        for auth in &wrong {
            let (status, headers, body) =
                call(addr, req(m.clone(), path, auth.as_deref(), Some("application/octet-stream"), b"x".to_vec()))
                    .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{m} {path} with {auth:?}");
            assert!(headers[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Bearer"), "{m} {path}");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(v["error"].is_string());
        }
    }
    // The right token, any case of the scheme.
    let (status, ..) =
        call(addr, req(Method::GET, "/v1/signers", Some(&format!("bearer {TOKEN}")), None, vec![])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(get(addr, "/nope").await.0, StatusCode::NOT_FOUND);
    let (status, headers, _) = call(addr, req(Method::POST, "/v1/signers", Some(&bearer()), None, vec![])).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers[header::ALLOW], "GET");
}

#[tokio::test]
async fn two_devices_of_one_node_are_listed_by_client_id_and_control_goes_to_the_active_one() {
    let dir = temp_dir("two");
    let b = broker(&dir, Duration::from_secs(10)).await;
    let addr = api_addr(&b);
    let (sk, node) = key(0x47);
    let mut hub = b.hub.subscribe();
    let now = sphinx_wire::unix_now() as u32;
    let mut a = TestSigner::connect_as(b.mqtt.local_addr(), &sk, "device-a", now).await;
    hub_event(&mut hub, |e| matches!(e, SignerEvent::Ready { client_id, .. } if client_id == "device-a")).await;
    // Without LSS a second device of the node is refused (disconnected).
    let _b = TestSigner::connect_as(b.mqtt.local_addr(), &sk, "device-b", now + 1).await;
    hub_event(&mut hub, |e| matches!(e, SignerEvent::Disconnected { client_id, .. } if client_id == "device-b")).await;
    let v = get_json(addr, "/v1/signers").await;
    let list = v["signers"].as_array().unwrap();
    let by = |c: &str| list.iter().find(|s| s["client_id"] == c).cloned().unwrap_or_default();
    assert_eq!(
        (by("device-a")["node_id"].as_str(), by("device-a")["role"].as_str()),
        (Some(node.as_str()), Some("active")),
        "{v}"
    );
    assert_eq!(
        (by("device-b")["node_id"].as_str(), by("device-b")["role"].as_str()),
        (Some(node.as_str()), Some("refused")),
        "{v}"
    );
    // A control call addressed to the node goes to its active device, on its own topics.
    let pk = PublicKey::from_secret_key(&Secp256k1::new(), &sk);
    let request = control::build_request(&ControlMessage::Nonce, 1, &sk).unwrap();
    let call = tokio::spawn(post_control(addr, node.clone(), request.clone()));
    let got = a.control_request().await;
    assert_eq!(got, request);
    a.publish(topics::CONTROL_RES, control::build_response(&ControlResponse::Nonce(0), 1, &sk).unwrap()).await;
    let (s, _, body) = call.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(control::parse_response(&body, &pk, 1).unwrap(), ControlResponse::Nonce(0));
    // And to a device by its client id.
    let call = tokio::spawn(post_control(addr, "device-a", request.clone()));
    assert_eq!(a.control_request().await, request);
    a.publish(topics::CONTROL_RES, control::build_response(&ControlResponse::Nonce(0), 1, &sk).unwrap()).await;
    assert_eq!(call.await.unwrap().0, StatusCode::OK);
}

#[tokio::test]
async fn signers_list_reflects_a_connected_signer_that_said_hello() {
    let dir = temp_dir("list");
    let b = broker(&dir, Duration::from_secs(10)).await;
    let addr = api_addr(&b);
    let v = get_json(addr, "/v1/signers").await;
    assert_eq!(v["signers"], serde_json::json!([]));
    assert_eq!(v["pinned"], serde_json::Value::Null);
    assert_eq!(v["relay"]["queued"], 0);

    let (sk, id) = key(0x41);
    let mut hub = b.hub.subscribe();
    let signer = TestSigner::connect(b.mqtt.local_addr(), &sk).await;
    hub_event(&mut hub, is_ready(&id)).await;
    let v = get_json(addr, "/v1/signers").await;
    let list = v["signers"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    let s = &list[0];
    assert_eq!(s["node_id"], id.as_str());
    assert_eq!(s["connected"], true);
    assert_eq!(s["ready"], true);
    assert_eq!(s["pinned"], false);
    assert_eq!(s["last_error"], serde_json::Value::Null);
    let now = sphinx_wire::unix_now();
    assert!(s["since"].as_u64().unwrap().abs_diff(now) < 60, "{s}");

    // An error report is kept as the signer's last error.
    signer.publish(topics::ERROR, b"\x00\x05policy failure: over the limit".to_vec()).await;
    hub_event(&mut hub, |e| matches!(e, SignerEvent::Error(_))).await;
    let v = get_json(addr, "/v1/signers").await;
    assert_eq!(v["signers"][0]["last_error"]["seq"], 5);
    assert_eq!(v["signers"][0]["last_error"]["text"], "policy failure: over the limit");

    // Pinned, then gone: still listed, not connected, pinned.
    b.pin.pin(&id).unwrap();
    signer.client.disconnect().await.unwrap();
    hub_event(&mut hub, |e| matches!(e, SignerEvent::Disconnected { .. })).await;
    let v = get_json(addr, "/v1/signers").await;
    assert_eq!(v["pinned"], id.as_str());
    assert_eq!(v["signers"][0]["connected"], false);
    assert_eq!(v["signers"][0]["ready"], false);
    assert_eq!(v["signers"][0]["pinned"], true);
}

#[tokio::test]
async fn control_request_is_relayed_and_the_signers_bytes_returned() {
    let dir = temp_dir("control");
    let b = broker(&dir, Duration::from_secs(10)).await;
    let addr = api_addr(&b);
    let (sk, id) = key(0x42);
    let (owner, _) = key(0x07);
    let mut hub = b.hub.subscribe();
    let mut signer = TestSigner::connect(b.mqtt.local_addr(), &sk).await;
    hub_event(&mut hub, is_ready(&id)).await;

    let request = control::build_request(&ControlMessage::QueryPolicy, 1, &owner).unwrap();
    let expect = control::build_response(&ControlResponse::PolicyCurrent(Policy::default()), 1, &sk).unwrap();
    let answer = expect.clone();
    let post = tokio::spawn(post_control(addr, id.clone(), request.clone()));
    let got = signer.control_request().await;
    assert_eq!(got, request, "the signer receives exactly the posted bytes");
    signer.publish(topics::CONTROL_RES, answer).await;
    let (status, headers, body) = post.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers[header::CONTENT_TYPE], "application/octet-stream");
    assert_eq!(body.to_vec(), expect, "the caller gets exactly the signer's bytes");
    let pk = PublicKey::from_secret_key(&Secp256k1::new(), &sk);
    assert_eq!(control::parse_response(&body, &pk, 1).unwrap(), ControlResponse::PolicyCurrent(Policy::default()));

    // Two calls at once: serialized, each gets the answer to its own request.
    let r2 = control::build_request(&ControlMessage::QueryAllowlist, 2, &owner).unwrap();
    let r3 = control::build_request(&ControlMessage::QueryVelocity, 3, &owner).unwrap();
    let p2 = tokio::spawn(post_control(addr, id.clone(), r2));
    let p3 = tokio::spawn(post_control(addr, id.clone(), r3));
    for _ in 0..2 {
        let req = signer.control_request().await;
        let (msg, nonce) =
            control::parse_request(&req, &PublicKey::from_secret_key(&Secp256k1::new(), &owner)).unwrap();
        let resp = match msg {
            ControlMessage::QueryAllowlist => ControlResponse::AllowlistCurrent(vec!["a".into()]),
            _ => ControlResponse::VelocityCurrent(None),
        };
        signer.publish(topics::CONTROL_RES, control::build_response(&resp, nonce, &sk).unwrap()).await;
    }
    let (s2, _, b2) = p2.await.unwrap();
    let (s3, _, b3) = p3.await.unwrap();
    assert_eq!((s2, s3), (StatusCode::OK, StatusCode::OK));
    assert_eq!(control::parse_response(&b2, &pk, 2).unwrap(), ControlResponse::AllowlistCurrent(vec!["a".into()]));
    assert_eq!(control::parse_response(&b3, &pk, 3).unwrap(), ControlResponse::VelocityCurrent(None));

    // Bad requests never reach the signer.
    let other = key(0x43).1;
    let (s, _, body) = post_control(addr, &other, request.clone()).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&body));
    assert!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"].is_string());
    // Neither a node id nor a possible client id; a possible client id nobody has.
    assert_eq!(post_control(addr, "$SYS", request.clone()).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(post_control(addr, "02abcd", request.clone()).await.0, StatusCode::NOT_FOUND);
    assert_eq!(post_control(addr, &id, vec![]).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(post_control(addr, &id, vec![0; 64 * 1024 + 1]).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    let path = format!("/v1/signers/{id}/control");
    let (s, ..) =
        call(addr, req(Method::POST, &path, Some(&bearer()), Some("application/json"), request.clone())).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (s, h, _) = call(addr, req(Method::GET, &path, Some(&bearer()), None, vec![])).await;
    assert_eq!((s, h[header::ALLOW].to_str().unwrap()), (StatusCode::METHOD_NOT_ALLOWED, "POST"));
    // Upper-case hex is the same signer.
    let marker = control::build_request(&ControlMessage::Nonce, 4, &owner).unwrap();
    let p = tokio::spawn(post_control(addr, id.to_uppercase(), marker.clone()));
    assert_eq!(signer.control_request().await, marker, "only the last, valid request reached the signer");
    signer.publish(topics::CONTROL_RES, b"ok".to_vec()).await;
    assert_eq!(p.await.unwrap().2, Bytes::from_static(b"ok"));

    // The signer goes away while a call waits: 503 at once, not at the bound.
    let r5 = control::build_request(&ControlMessage::QueryAll, 5, &owner).unwrap();
    let t = Instant::now();
    let p = tokio::spawn(post_control(addr, id.clone(), r5));
    signer.control_request().await;
    signer.client.disconnect().await.unwrap();
    let (s, _, body) = p.await.unwrap();
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("disconnected before answering"));
    assert!(t.elapsed() < Duration::from_secs(5));

    // Disconnected: 503.
    hub_event(&mut hub, |e| matches!(e, SignerEvent::Disconnected { .. })).await;
    let (s, _, body) = post_control(addr, &id, request).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("not connected"));
}

#[tokio::test]
async fn control_times_out_with_504_within_the_bound_and_late_answers_are_dropped() {
    let dir = temp_dir("timeout");
    let bound = Duration::from_millis(500);
    let b = broker(&dir, bound).await;
    let addr = api_addr(&b);
    let (sk, id) = key(0x44);
    let (owner, _) = key(0x08);
    let mut hub = b.hub.subscribe();
    let mut signer = TestSigner::connect(b.mqtt.local_addr(), &sk).await;
    hub_event(&mut hub, is_ready(&id)).await;

    let r1 = control::build_request(&ControlMessage::QueryPolicy, 1, &owner).unwrap();
    let t = Instant::now();
    let post = tokio::spawn(post_control(addr, id.clone(), r1.clone()));
    assert_eq!(signer.control_request().await, r1);
    let (status, _, body) = post.await.unwrap();
    let took = t.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{}", String::from_utf8_lossy(&body));
    assert!(took >= bound && took < bound + Duration::from_secs(3), "took {took:?}");

    // The answer to the timed-out call arrives during the next call: it is not mistaken for
    // the next call's answer.
    let late = control::build_response(&ControlResponse::PolicyCurrent(Policy::default()), 1, &sk).unwrap();
    let r2 = control::build_request(&ControlMessage::QueryAllowlist, 2, &owner).unwrap();
    let a2 = control::build_response(&ControlResponse::AllowlistCurrent(vec![]), 2, &sk).unwrap();
    let post = tokio::spawn(post_control(addr, id.clone(), r2.clone()));
    assert_eq!(signer.control_request().await, r2);
    signer.publish(topics::CONTROL_RES, late).await;
    signer.publish(topics::CONTROL_RES, a2.clone()).await;
    let (status, _, body) = post.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.to_vec(), a2);
}

#[tokio::test]
async fn event_stream_delivers_connects_errors_and_disconnects() {
    let dir = temp_dir("events");
    let b = broker(&dir, Duration::from_secs(10)).await;
    let addr = api_addr(&b);
    let mut sse = Sse::open(addr).await;
    let (sk, id) = key(0x45);
    let signer = TestSigner::connect(b.mqtt.local_addr(), &sk).await;
    let c = sse.expect("signer-connected").await;
    assert_eq!(c["node_id"], id.as_str());
    assert_eq!(sse.expect("signer-ready").await["node_id"], id.as_str());

    signer.publish(topics::ERROR, b"\x00\x07policy failure: velocity limit".to_vec()).await;
    let e = sse.expect("signer-error").await;
    assert_eq!(e["node_id"], id.as_str());
    assert_eq!(e["seq"], 7);
    assert_eq!(e["text"], "policy failure: velocity limit");
    let now = sphinx_wire::unix_now();
    assert!(e["time"].as_u64().unwrap().abs_diff(now) < 60);
    // Text with a newline is still one event (JSON escapes it).
    signer.publish(topics::ERROR, b"\x00\x01line one\nline two".to_vec()).await;
    assert_eq!(sse.expect("signer-error").await["text"], "line one\nline two");

    signer.client.disconnect().await.unwrap();
    assert_eq!(sse.expect("signer-disconnected").await["node_id"], id.as_str());

    // At most 8 streams at once: the ninth is refused, not queued.
    let mut more = Vec::new();
    for _ in 0..7 {
        more.push(Sse::open(addr).await);
    }
    let (status, _, body) = get(addr, "/v1/events").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&body));
    // The others still work.
    assert_eq!(get(addr, "/v1/signers").await.0, StatusCode::OK);
}

#[tokio::test]
async fn heartbeat_needs_an_initialised_connected_signer() {
    let dir = temp_dir("heartbeat");
    let b = broker(&dir, Duration::from_secs(10)).await;
    let (status, _, body) = get(api_addr(&b), "/v1/chain/heartbeat").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&body));
}

#[tokio::test]
async fn api_refuses_to_start_without_opt_in_for_other_interfaces_or_without_a_token() {
    init_tracing();
    let dir = temp_dir("refuse");
    let mut cfg = config(&dir, Duration::from_secs(10));
    cfg.api.listen = Some("0.0.0.0:0".parse().unwrap());
    let e = sphinx_broker::start(&cfg).await.err().expect("0.0.0.0 without opt-in is refused").to_string();
    assert!(e.contains("not a loopback address"), "{e}");
    cfg.api.listen = Some("[::]:0".parse().unwrap());
    assert!(sphinx_broker::start(&cfg).await.is_err());
    // With the opt-in the settings are acceptable (not bound here: no test listens beyond loopback).
    cfg.api.allow_non_loopback = true;
    assert!(cfg.validate().is_ok());

    let mut cfg = config(&dir, Duration::from_secs(10));
    cfg.api.token = None;
    let e = sphinx_broker::start(&cfg).await.err().expect("no token is refused").to_string();
    assert!(e.contains("no token"), "{e}");
    assert!(ApiToken::new("short-token").is_err(), "tokens under 16 characters are refused");

    // Off by default: nothing listens.
    let mut cfg = config(&dir, Duration::from_secs(10));
    cfg.api = Default::default();
    let b = sphinx_broker::start(&cfg).await.unwrap();
    assert!(b.api.is_none());
}

/// The binary as lightningd runs it, configured by the environment, with the API on: it
/// serves the API and exits 0 when lightningd closes fd 3.
#[test]
fn broker_binary_serves_the_api_and_exits_when_lightningd_closes_fd3() {
    let dir = temp_dir("binary");
    let token_file = dir.0.join("api-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let (ours, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        // Close-on-exec on both: the child gets only its end, as fd 3 (dup2 clears the flag).
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sphinx-broker"));
    cmd.env_clear()
        .env("NO_COLOR", "1")
        .env("SPHINX_BROKER_LOG", "info")
        .env("SPHINX_BROKER_CLN_VERSION", "v25.12.1")
        .env("SPHINX_BROKER_DATA_DIR", dir.0.join("data"))
        .env("SPHINX_BROKER_MQTT_LISTEN", "127.0.0.1:0")
        .env("SPHINX_BROKER_API_LISTEN", "127.0.0.1:0")
        .env("SPHINX_BROKER_API_TOKEN_FILE", &token_file)
        // Nothing listens there: chain following waits for lightningd's init anyway.
        .env("SPHINX_BROKER_BITCOIND_URL", "http://u:p@127.0.0.1:9")
        .current_dir(&dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 onto fd 3 in the child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let r =
                if theirs_fd == 3 { nix::libc::fcntl(3, nix::libc::F_SETFD, 0) } else { nix::libc::dup2(theirs_fd, 3) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop::<OwnedFd>(theirs);
    let stderr = child.stderr.take().unwrap();
    // Read the log until the API's address shows up; keep reading in the background.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT;
    let addr: SocketAddr = loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("API listening log line");
        if line.contains("operator API listening") {
            let at = line.find("127.0.0.1:").expect("listen address in the line");
            let end = line[at + 10..].find(|c: char| !c.is_ascii_digit()).map_or(line.len(), |e| at + 10 + e);
            break line[at..end].parse().unwrap();
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (status, ..) = call(addr, req(Method::GET, "/v1/signers", None, None, vec![])).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, ..) = get(addr, "/v1/signers").await;
        assert_eq!(status, StatusCode::OK);
        // The chain follower's status: configured, waiting for lightningd's hsmd_init.
        let (status, _, body) = get(addr, "/v1/chain").await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["phase"], "waiting_for_init", "{v}");
        assert_eq!((v["restarts"].as_u64(), v["signer_tip"].is_null()), (Some(0), true), "{v}");
    });
    // lightningd goes away.
    drop(ours);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = done_tx.send(());
        (child, status)
    });
    if done_rx.recv_timeout(WAIT).is_err() {
        panic!("broker did not exit after fd 3 closed");
    }
    let (_child, status) = waiter.join().unwrap();
    let status = status.unwrap();
    assert!(status.success(), "{status:?}");

    // Enabled without a token: a configuration error (exit 1), before anything listens.
    let out = Command::new(env!("CARGO_BIN_EXE_sphinx-broker"))
        .env_clear()
        .env("SPHINX_BROKER_API_LISTEN", "127.0.0.1:0")
        .env("SPHINX_BROKER_DATA_DIR", dir.0.join("data"))
        .current_dir(&dir.0)
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no token"), "{}", String::from_utf8_lossy(&out.stderr));
}

// ---------------------------------------------------------------------------------------------
// Connection limits: a refused request closes its connection, idle ones are shed or time out

/// Reads until EOF (or a reset) within `bound`; the bytes read, or `None` if still open.
async fn read_to_close(s: &mut TcpStream, bound: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let mut b = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(all),
            Ok(Ok(n)) => all.extend_from_slice(&b[..n]),
        }
    }
}

/// A TCP connection to `addr` from the loopback address `from` (any 127.x.y.z is ours on Linux).
async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((from, 0))).unwrap();
    s.connect(addr).await.unwrap()
}

#[tokio::test]
async fn a_refused_request_closes_its_connection() {
    use tokio::io::AsyncWriteExt;
    let dir = temp_dir("close401");
    let b = broker(&dir, WAIT).await;
    let addr = api_addr(&b);
    // No token, then a second (pipelined) request with the token: the 401 ends the connection,
    // the second request is never answered.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let two = format!(
        "GET /v1/signers HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/signers HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
        bearer()
    );
    s.write_all(two.as_bytes()).await.unwrap();
    let got = read_to_close(&mut s, Duration::from_secs(3)).await.expect("closed after the 401, not kept open");
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 401"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert_eq!(text.matches("http/1.1 ").count(), 1, "only the refused request is answered: {text}");
    // A wrong token and a POST with a body it never reads: the same.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/signers/02/control HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-token-0123456789\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut s, Duration::from_secs(3)).await.expect("closed after the 401");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 401"));
    // With the token, the connection is kept alive for the next request.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /v1/signers HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n", bearer()).as_bytes())
        .await
        .unwrap();
    assert!(read_to_close(&mut s, Duration::from_millis(300)).await.is_none(), "an authorized connection stays open");
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_header_deadline() {
    use tokio::io::AsyncWriteExt;
    init_tracing();
    let dir = temp_dir("idle");
    let mut cfg = config(&dir, WAIT);
    cfg.api.header_timeout = Duration::from_secs(1);
    let b = sphinx_broker::start(&cfg).await.unwrap();
    let addr = api_addr(&b);
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"GET /v1/signers HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    assert!(read_to_close(&mut silent, Duration::from_secs(4)).await.is_some(), "a silent connection is closed");
    assert!(read_to_close(&mut partial, Duration::from_secs(4)).await.is_some(), "an incomplete head is closed");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test]
async fn a_client_gets_in_while_an_attacker_holds_many_idle_sockets() {
    init_tracing();
    let dir = temp_dir("slots");
    let mut cfg = config(&dir, WAIT);
    // Idle sockets are not closed by the header deadline during this test: only the limits act.
    cfg.api.header_timeout = Duration::from_secs(120);
    let (max, per_addr) = (cfg.api.max_connections, cfg.api.max_connections_per_addr);
    assert_eq!((max, per_addr), (32, 16), "the defaults");
    let b = sphinx_broker::start(&cfg).await.unwrap();
    let addr = api_addr(&b);
    // The attacker: 2 × per_addr idle sockets from the client's own address, and per_addr from
    // each of 8 other addresses: more than all the slots.
    let mut idle = Vec::new();
    for _ in 0..2 * per_addr {
        idle.push(connect_from([127, 0, 0, 1], addr).await);
    }
    for a in 2..10u8 {
        for _ in 0..per_addr {
            idle.push(connect_from([127, 0, 0, a], addr).await);
        }
    }
    // Everything beyond the limits is shed at once (not after a timeout), oldest first: the
    // first per_addr from 127.0.0.1 make room for the next per_addr of that address, then the
    // oldest go until `max` remain.
    let shed = idle.len() - max;
    for (i, s) in idle.iter_mut().enumerate() {
        let bound = if i < shed { WAIT } else { Duration::from_millis(20) };
        let closed = read_to_close(s, bound).await.is_some();
        assert_eq!(closed, i < shed, "socket {i} of {}: {max} slots", shed + max);
    }
    // The legitimate client, from the same address as some of the attacker's sockets, gets in
    // at once, again and again.
    for _ in 0..3 {
        let started = Instant::now();
        let (status, ..) = tokio::time::timeout(Duration::from_secs(3), get(addr, "/v1/signers"))
            .await
            .expect("the client is served while the attacker holds its sockets");
        assert_eq!(status, StatusCode::OK);
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    // A busy connection (its request is being served) is never shed: an SSE stream stays open
    // while the attacker opens more idle sockets than there are slots.
    let mut sse = Sse::open(addr).await;
    let mut more = Vec::new();
    for _ in 0..max + per_addr {
        more.push(connect_from([127, 0, 0, 1], addr).await);
    }
    let (status, ..) = tokio::time::timeout(Duration::from_secs(3), get(addr, "/v1/signers")).await.expect("served");
    assert_eq!(status, StatusCode::OK);
    let (_sk, id) = key(0x61);
    b.hub.on_connected(&id, &id);
    let ev = sse.expect("signer-connected").await;
    assert_eq!(ev["node_id"], id, "the stream survived the attacker's sockets");
    drop(idle);
}

/// An upstream signer (vls-mqtt: empty hello) answers a message on `{id}/control` with a text
/// error report, which the relay would take for a refusal of its oldest request in flight; the
/// API lists it with `error_seq: false` and refuses control calls to it, sending nothing.
#[tokio::test]
async fn control_is_not_sent_to_an_upstream_signer() {
    let dir = temp_dir("control-upstream");
    let b = broker(&dir, Duration::from_secs(10)).await;
    let addr = api_addr(&b);
    let (sk, id) = key(0x43);
    let (owner, _) = key(0x07);
    let mut hub = b.hub.subscribe();
    let mut signer =
        TestSigner::connect_saying(b.mqtt.local_addr(), &sk, &id, sphinx_wire::unix_now() as u32, b"").await;
    hub_event(&mut hub, is_ready(&id)).await;
    let list = get_json(addr, "/v1/signers").await;
    assert_eq!(list["signers"][0]["error_seq"], false, "{list}");

    let request = control::build_request(&ControlMessage::QueryPolicy, 1, &owner).unwrap();
    let (status, _, body) = post_control(addr, id.clone(), request).await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("upstream"), "{}", String::from_utf8_lossy(&body));
    // Nothing reached its control topic: the first message there is its own marker.
    signer.publish(topics::CONTROL, b"marker".to_vec()).await;
    assert_eq!(signer.control_request().await, b"marker");

    // Ours (hello with error-seq) is listed as such.
    let (sk2, id2) = key(0x44);
    let _ours = TestSigner::connect(b.mqtt.local_addr(), &sk2).await;
    hub_event(&mut hub, is_ready(&id2)).await;
    let list = get_json(addr, "/v1/signers").await;
    let ours = list["signers"].as_array().unwrap().iter().find(|s| s["client_id"] == id2.as_str()).cloned();
    assert_eq!(ours.map(|s| s["error_seq"].clone()), Some(serde_json::Value::Bool(true)), "{list}");
}
