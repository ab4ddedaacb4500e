//! The broker's status page in a real browser: headless Chromium (Debian's `chromium`, driven
//! through `chromedriver`'s WebDriver HTTP API with a small client on hyper) against
//!
//! fake lightningd ──fd──▶ sphinx-broker (API on) ──MQTT──▶ sphinx-key,
//!
//! replaying the recorded session `open-pay-close/alice`. Right after `hsmd_init` the browser
//! opens the page, logs in through the form (the token typed into the password field, never in a
//! URL), and reads the signer's node id and the request count; later in the replay the count
//! must have moved (the page is live: `status` events on `/v1/events`). A screenshot is saved to
//! `target/test-artifacts/status_page.png`.
//!
//! WebDriver rather than `--dump-dom`/`--screenshot`: only a driven browser can fill in and
//! submit the login form, keep its cookie, and be read twice while the page stays open.
//!
//! Needs `chromium` and `chromedriver` (`scripts/setup` installs them): without them the test
//! fails and says so.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use common::{recorded_session, tempdir};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use sphinx_standin::harness::{bin, broker_envs, free_port, init_signer, tail, wait_listening, SignerProcess};
use sphinx_standin::lightningd::{BrokerOutput, SpawnOptions};
use sphinx_standin::replay::{self, ReplayOptions};
use sphinx_wire::hsmd;

const TOKEN: &str = "status-page-test-token-0123456789";
const WAIT: Duration = Duration::from_secs(20);
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(name)).find(|p| p.is_file())
}

/// `chromedriver` on a free port, killed on drop.
struct Driver {
    child: Child,
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(chromedriver: &PathBuf, log: &std::path::Path) -> Driver {
        let port = free_port().unwrap();
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_listening(&addr.to_string(), WAIT).expect("chromedriver listens");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Driver { child, addr, rt }
    }

    /// One WebDriver command: its `value`, or the WebDriver error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Value> {
        let addr = self.addr;
        let method: hyper::Method = method.parse().unwrap();
        let path = path.to_string();
        self.rt.block_on(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut tx, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io).await.unwrap();
            tokio::spawn(conn);
            // A POST without parameters still carries an empty JSON object (WebDriver requires it).
            let data = match body {
                Some(b) => b.to_string(),
                None if method == hyper::Method::POST => "{}".to_string(),
                None => String::new(),
            };
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, addr.to_string())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(data)))
                .unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(60), tx.send_request(req)).await.unwrap().unwrap();
            let ok = resp.status().is_success();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            if ok {
                Ok(v["value"].clone())
            } else {
                Err(v)
            }
        })
    }
}

/// A browser session.
struct Browser<'a> {
    d: &'a Driver,
    id: String,
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = self.d.call("DELETE", &format!("/session/{}", self.id), None);
    }
}

impl<'a> Browser<'a> {
    fn open(d: &'a Driver, chromium: &PathBuf, profile: &std::path::Path) -> Browser<'a> {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1100,1400",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let v = d.call("POST", "/session", Some(caps)).unwrap_or_else(|e| panic!("cannot start Chromium: {e}"));
        Browser { d, id: v["sessionId"].as_str().unwrap().to_string() }
    }

    fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> Result<Value, Value> {
        self.d.call(method, &format!("/session/{}/{what}", self.id), body)
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "url", Some(json!({ "url": url }))).unwrap();
    }

    fn find(&self, css: &str) -> Option<String> {
        let v = self.cmd("POST", "element", Some(json!({"using": "css selector", "value": css}))).ok()?;
        v[ELEMENT].as_str().map(str::to_string)
    }

    fn text(&self, css: &str) -> Option<String> {
        let e = self.find(css)?;
        self.cmd("GET", &format!("element/{e}/text"), None).ok()?.as_str().map(str::to_string)
    }

    /// Polls (bounded) until `css`'s text satisfies `f`; returns it.
    fn wait_text(&self, css: &str, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let t = self.text(css).unwrap_or_default();
            if f(&t) {
                return t;
            }
            if Instant::now() >= deadline {
                let url = self.cmd("GET", "url", None).unwrap_or_default();
                let cookies = self.cmd("GET", "cookie", None).unwrap_or_default();
                let source = self.cmd("GET", "source", None).unwrap_or_default();
                panic!("timed out waiting for {what}: {css} shows {t:?}\nurl {url}\ncookies {cookies}\n{source}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, to: &std::path::Path) {
        let b64 = self.cmd("GET", "screenshot", None).unwrap();
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, png).unwrap();
    }
}

fn count(s: &str) -> u64 {
    s.trim().parse().unwrap_or(0)
}

#[test]
fn status_page_in_headless_chromium_shows_the_signer_and_live_counts() {
    let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver")) else {
        panic!(
            "chromium and chromedriver are needed for this test (Debian packages chromium, chromium-driver): \
             run scripts/setup"
        );
    };
    let (tr, seed, clock) = recorded_session("open-pay-close", "alice");
    let d = tempdir("status-page");
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let api = format!("127.0.0.1:{}", free_port().unwrap());
    let key = bin("sphinx-key").unwrap();
    let signer_dir = d.join("signer");
    init_signer(&key, &signer_dir, seed).unwrap();
    let _signer = SignerProcess::start(&key, &signer_dir, &listen, clock, &d.join("signer.log"), &[]).unwrap();
    let driver = Driver::start(&chromedriver, &d.join("chromedriver.log"));

    let mut opts = ReplayOptions::new(bin("sphinx-broker").unwrap());
    opts.envs = broker_envs(&d.join("broker"), &listen);
    opts.envs.push(("SPHINX_BROKER_API_LISTEN".into(), api.clone().into()));
    opts.envs.push(("SPHINX_BROKER_API_TOKEN".into(), TOKEN.into()));
    opts.spawn = SpawnOptions {
        call_timeout: Duration::from_secs(30),
        output: BrokerOutput::File(d.join("broker.log")),
        ..SpawnOptions::default()
    };
    let page = format!("http://{api}/");
    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts/status_page.png");
    let mut browser: Option<Browser> = None;
    let (mut node_id, mut first, mut later) = (None, None, None);
    let (mut plot_points, mut cookies, mut url) = (None, None, None);
    let mut steps = 0;
    let report = replay::replay(&tr, &opts, &mut |step| {
        steps += 1;
        if step.recorded_type == hsmd::HSMD_INIT && browser.is_none() {
            let id = step.reply.as_ref().ok().and_then(|r| hsmd::parse_init_reply_node_id(r).ok()).map(hex::encode);
            node_id = id.clone();
            let b = Browser::open(&driver, &chromium, &d.join("chromium-profile"));
            b.go(&page);
            // Not logged in: the form, and nothing of the dashboard.
            b.wait_text("#login", "the login form", |t| t.contains("API token"));
            let field = b.find("#token").expect("token field");
            b.cmd("POST", &format!("element/{field}/value"), Some(json!({ "text": TOKEN }))).unwrap();
            let button = b.find("#login-button").expect("login button");
            b.cmd("POST", &format!("element/{button}/click"), None).unwrap();
            let id = id.expect("init reply with a node id");
            b.wait_text("#signers", "the signer's node id", |t| t.contains(&id));
            first = Some(count(&b.wait_text("#requests_total", "a request count", |t| count(t) >= 1)));
            browser = Some(b);
        }
        if steps == 60 {
            if let (Some(b), Some(f)) = (&browser, first) {
                // Live: no reload, the `status` events of /v1/events move the count.
                later = Some(count(&b.wait_text("#requests_total", "the count to move", |t| count(t) > f)));
                let points = b.cmd(
                    "POST",
                    "execute/sync",
                    Some(json!({
                        "script": "return document.getElementById('plot').querySelectorAll('circle').length",
                        "args": []
                    })),
                );
                plot_points = points.ok().and_then(|v| v.as_u64());
                b.screenshot(&shot);
                cookies = b.cmd("GET", "cookie", None).ok();
                url = b.cmd("GET", "url", None).ok();
            }
        }
    })
    .unwrap_or_else(|e| panic!("replay: {e}\n{}", tail(&d.join("broker.log"), 3000)));
    assert!(report.errors().next().is_none(), "the replay itself went through");
    drop(browser.expect("the browser was opened after hsmd_init"));
    assert!(node_id.is_some());
    let (first, later) = (first.unwrap(), later.expect("checked again later in the replay"));
    assert!(later > first, "the request count moved: {first} → {later}");
    assert!(plot_points.unwrap_or(0) > 0, "the latency plot has points: {plot_points:?}");
    assert!(shot.is_file());

    // The session is an HttpOnly, SameSite=Strict cookie; the URL never carried the token.
    let cookies = cookies.expect("cookies read");
    let session = cookies.as_array().unwrap().iter().find(|c| c["name"] == "sphinx_session").expect("session cookie");
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");
    let url = url.expect("url read");
    assert!(!url.as_str().unwrap().contains(TOKEN), "{url}");
}
