//! The broker's Prometheus metrics over real sockets: `sphinx_broker::start` with its embedded
//! MQTT server, the operator API and `metrics_listen`, a `sphinx-key run` signer process, the
//! fake bitcoind for chain following. Scrapes `/metrics` after relayed requests, a refusal and a
//! refused login, and checks that the counts moved and that the text parses as OpenMetrics.
//!
//! Needs the `sphinx-key` binary next to this test's directory (`target/release/sphinx-key`):
//! `cargo build --release -p sphinx-key` first (scripts/test builds every binary before testing).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bitcoin::Network;
use common::{start_key, trace_request, Dir};
use fake_bitcoind::{Config as FakeConfig, FakeBitcoind};
use http_body_util::{BodyExt, Empty};
use sphinx_broker::api::ApiToken;
use sphinx_broker::config::Config;
use sphinx_chain::{self as chain, BitcoindSettings, FollowerConfig, Phase};
use sphinx_wire::ClientContext;
use tokio::sync::watch;

const CLOCK: u64 = 1_795_466_257;
const BOUND: Duration = Duration::from_secs(60);
const TOKEN: &str = "metrics-http-api-token-0123456789";

/// `GET path` at `addr`, with the bearer token if given: (status, content type, body).
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(io).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path).header(hyper::header::HOST, "localhost");
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp =
        tokio::time::timeout(BOUND, sender.send_request(req.body(Empty::new()).unwrap())).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let ct =
        resp.headers().get(hyper::header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body = tokio::time::timeout(BOUND, resp.into_body().collect()).await.unwrap().unwrap().to_bytes();
    (status, ct, String::from_utf8(body.to_vec()).unwrap())
}

/// Parses the OpenMetrics text exposition (what Prometheus reads): every sample line is
/// `name{label="value",…} number`, every metric family is introduced by `# TYPE` and `# HELP`,
/// and the text ends with `# EOF`. Returns sample → value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut families = std::collections::HashSet::new();
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.pop(), Some("# EOF"), "the exposition ends with # EOF");
    for line in lines {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut it = rest.splitn(3, ' ');
            let (kind, name) = (it.next().unwrap(), it.next().expect("a family name"));
            assert!(matches!(kind, "TYPE" | "HELP" | "UNIT"), "comment {line:?}");
            if kind == "TYPE" {
                let ty = it.next().unwrap();
                assert!(["counter", "gauge", "histogram", "info", "unknown"].contains(&ty), "{line:?}");
                families.insert(name.to_string());
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample line {line:?}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "metric name {name:?}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).expect("{labels}");
                for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("label {pair:?} in {line:?}"));
                    assert!(k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{line:?}");
                    assert!(!v.trim_end_matches('"').contains('"'), "{line:?}");
                }
            }
        }
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| families.contains(*f))
            .unwrap_or(name);
        assert!(families.contains(family), "sample {name} before its # TYPE");
        samples.insert(series.to_string(), v);
    }
    samples
}

fn value(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| panic!("{series} missing from {:#?}", m.keys().collect::<Vec<_>>()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_relayed_requests_and_parse() {
    let dir = Dir::fresh("sphinx-metrics-http");
    let mut cfg = Config { network: Network::Regtest, data_dir: dir.0.join("broker"), ..Config::default() };
    cfg.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.api.token = Some(ApiToken::new(TOKEN).unwrap());
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let broker = sphinx_broker::start(&cfg).await.unwrap();
    let api = broker.api.as_ref().unwrap().local_addr();
    let own = broker.metrics_server.as_ref().expect("metrics_listen serves").local_addr();

    // Before any signer: the families are there, nothing counted, the chain unknown.
    let (status, ct, text) = get(api, "/metrics", Some(TOKEN)).await;
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let before = parse(&text);
    assert_eq!(value(&before, "sphinx_broker_signer_active"), 0.0);
    assert_eq!(value(&before, "sphinx_broker_chain_lag_blocks"), -1.0);
    assert_eq!(value(&before, "sphinx_broker_token_refusals_total{cause=\"token_encoding\"}"), 0.0);
    // The API's /metrics needs the token like every other route; the own listener does not.
    assert_eq!(get(api, "/metrics", None).await.0, 401);
    assert_eq!(get(api, "/metrics", Some("wrong-token-wrong-token")).await.0, 401);

    // A login with a password that is no token: refused and counted by cause.
    let mut opts = rumqttc::MqttOptions::new("intruder", "127.0.0.1", broker.mqtt.local_addr().port());
    opts.set_credentials("029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef46", "not a token!");
    let (_client, mut ev) = rumqttc::AsyncClient::new(opts, 4);
    let refused = tokio::time::timeout(BOUND, async {
        loop {
            match ev.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return false,
                Ok(_) => continue,
                Err(_) => return true,
            }
        }
    })
    .await
    .unwrap();
    assert!(refused, "a bad token must be refused");

    let key = common::key_bin_path().unwrap();
    assert!(key.is_file(), "{} not found: cargo build --release -p sphinx-key first", key.display());
    let signer = start_key(
        &key,
        &dir.0.join("key"),
        &broker.mqtt.local_addr().to_string(),
        &["--dev-fixed-clock", &CLOCK.to_string()],
    );
    let reply = tokio::time::timeout(BOUND, broker.relay.call(ClientContext::ROOT, trace_request(11)))
        .await
        .unwrap_or_else(|_| panic!("no init reply; signer log:\n{}", signer.log()))
        .unwrap();
    assert_eq!(&reply[..2], &[0, 114]);
    let check_pubkey = trace_request(28);
    for _ in 0..5 {
        broker.relay.call(ClientContext::ROOT, check_pubkey.clone()).await.unwrap();
    }
    // hsmd_sign_message (23) with a body that does not decode: the signer refuses it.
    let r = broker.relay.call(ClientContext::ROOT, vec![0, 23, 0xff]).await;
    assert!(r.is_err(), "{r:?}");

    // Chain following: 20 blocks behind, then synced.
    let btc = FakeBitcoind::start(FakeConfig { users: vec![("u".into(), "p".into())], ..FakeConfig::default() })
        .await
        .unwrap();
    btc.mine(20);
    let mut fc = FollowerConfig::new(
        BitcoindSettings { url: Some(btc.url_with_login("u", "p")), cookie_file: None },
        Network::Regtest,
    );
    fc.poll_interval = Duration::from_millis(20);
    let (_init_done, init_rx) = watch::channel(true);
    let f = chain::spawn_reporting(fc, broker.relay.clone(), init_rx, broker.chain_status.clone());
    let mut st = broker.chain_status.subscribe();
    let synced =
        tokio::time::timeout(BOUND, st.wait_for(|s| s.phase == Phase::Synced && s.signer_tip.map(|t| t.0) == Some(20)))
            .await
            .is_ok();
    assert!(synced, "chain not synced: {:?}", *st.borrow());

    let (status, _, text) = get(api, "/metrics", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let m = parse(&text);
    let ok = |t: &str, n: &str| format!("sphinx_broker_requests_total{{msg_type=\"{t}\",name=\"{n}\",outcome=\"ok\"}}");
    assert_eq!(value(&m, &ok("11", "hsmd_init")), 1.0);
    assert_eq!(value(&m, &ok("28", "hsmd_check_pubkey")), 5.0);
    let refused = "sphinx_broker_requests_total{msg_type=\"23\",name=\"hsmd_sign_message\",outcome=\"refused\"}";
    assert_eq!(value(&m, refused), 1.0);
    let refusal =
        "sphinx_broker_refusals_total{msg_type=\"23\",name=\"hsmd_sign_message\",reason=\"decode\",policy=\"\"}";
    assert_eq!(value(&m, refusal), 1.0, "{text}");
    let count = "sphinx_broker_request_duration_seconds_count{msg_type=\"28\",name=\"hsmd_check_pubkey\"}";
    assert_eq!(value(&m, count), 5.0);
    let inf = "sphinx_broker_request_duration_seconds_bucket{le=\"+Inf\",msg_type=\"28\",name=\"hsmd_check_pubkey\"}";
    assert_eq!(
        m.get(inf).copied().or_else(|| {
            // The label order of `le` is the encoder's: accept either position.
            m.iter()
                .find(|(k, _)| k.contains("_bucket{") && k.contains("le=\"+Inf\"") && k.contains("msg_type=\"28\""))
                .map(|(_, v)| *v)
        }),
        Some(5.0)
    );
    assert_eq!(value(&m, "sphinx_broker_token_refusals_total{cause=\"token_encoding\"}"), 1.0);
    assert_eq!(value(&m, "sphinx_broker_signer_active"), 1.0);
    assert_eq!(value(&m, "sphinx_broker_signers_connected"), 1.0);
    assert_eq!(value(&m, "sphinx_broker_signer_reconnects_total"), 0.0);
    assert_eq!(value(&m, "sphinx_broker_queue_depth"), 0.0);
    // The follower may have a heartbeat request out to the signer right now.
    assert!(value(&m, "sphinx_broker_inflight") <= 1.0);
    assert_eq!(value(&m, "sphinx_broker_chain_signer_height"), 20.0);
    assert_eq!(value(&m, "sphinx_broker_chain_bitcoind_height"), 20.0);
    assert_eq!(value(&m, "sphinx_broker_chain_lag_blocks"), 0.0);

    // The own listener: the same metrics, no token; nothing else there.
    let (status, ct, own_text) = get(own, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert_eq!(value(&parse(&own_text), &ok("28", "hsmd_check_pubkey")), 5.0);
    assert_eq!(get(own, "/v1/signers", None).await.0, 404);
    f.task.abort();
}

#[tokio::test]
async fn metrics_listen_off_loopback_needs_the_opt_in() {
    let dir = Dir::fresh("sphinx-metrics-listen");
    let mut cfg = Config { data_dir: dir.0.join("broker"), ..Config::default() };
    cfg.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    cfg.metrics_listen = Some("0.0.0.0:0".parse().unwrap());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("metrics_listen") && e.contains("loopback"), "{e}");
    let e = sphinx_broker::start(&cfg).await.err().expect("refused at start too").to_string();
    assert!(e.contains("loopback"), "{e}");
}

/// `method path` with `headers` and `body`: (status, headers, body).
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, hyper::HeaderMap, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, http_body_util::Full<bytes::Bytes>>(io).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header(hyper::header::HOST, addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(http_body_util::Full::new(bytes::Bytes::from(body.to_string()))).unwrap();
    let resp = tokio::time::timeout(BOUND, sender.send_request(req)).await.unwrap().unwrap();
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(BOUND, body.collect()).await.unwrap().unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn status_page_login_cookie_authorizes_reads_only() {
    let dir = Dir::fresh("sphinx-status-login");
    let mut cfg = Config { data_dir: dir.0.join("broker"), ..Config::default() };
    cfg.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.api.token = Some(ApiToken::new(TOKEN).unwrap());
    let broker = sphinx_broker::start(&cfg).await.unwrap();
    let api = broker.api.as_ref().unwrap().local_addr();

    // The page and its assets are public, with a strict CSP; what they show is not.
    let (status, h, body) = send(api, "GET", "/", &[], "").await;
    assert_eq!(status, 200);
    assert!(body.contains("<form method=\"post\" action=\"/login\">"), "{body}");
    let csp = h[hyper::header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(!body.contains("<script>") && !body.contains("style="), "nothing inline");
    assert_eq!(send(api, "GET", "/status.js", &[], "").await.0, 200);
    assert_eq!(send(api, "GET", "/v1/status", &[], "").await.0, 401);

    // A wrong token: no cookie. The right one: an HttpOnly, SameSite=Strict session.
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let (status, h, _) = send(api, "POST", "/login", &form, "token=wrong-wrong-wrong-wrong").await;
    assert_eq!(status, 303);
    assert!(h.get(hyper::header::SET_COOKIE).is_none());
    let (status, _, _) =
        send(api, "POST", "/login", &[form[0], ("origin", "http://evil.example")], &format!("token={TOKEN}")).await;
    assert_eq!(status, 403, "a cross-origin login post is refused");
    let (status, h, _) = send(api, "POST", "/login", &form, &format!("token={TOKEN}")).await;
    assert_eq!((status, h[hyper::header::LOCATION].to_str().unwrap()), (303, "/"));
    let set = h[hyper::header::SET_COOKIE].to_str().unwrap().to_string();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    assert!(!cookie.contains(TOKEN), "the cookie is a session, not the token");

    // The cookie reads (GET) but never writes: a control call still needs the bearer token.
    let c = [("cookie", cookie.as_str())];
    let (status, _, body) = send(api, "GET", "/v1/status", &c, "").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["relay"]["requests_total"], 0);
    assert_eq!(v["chain"]["phase"], "disabled");
    assert_eq!(send(api, "GET", "/metrics", &c, "").await.0, 200);
    let control = format!("/v1/signers/{}/control", "02".repeat(33));
    assert_eq!(send(api, "POST", &control, &c, "x").await.0, 401);

    // Logout ends the session.
    assert_eq!(send(api, "POST", "/logout", &c, "").await.0, 303);
    assert_eq!(send(api, "GET", "/v1/status", &c, "").await.0, 401);
}
