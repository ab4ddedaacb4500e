//! The live status page on the operator API: `GET /` (HTML, script and style embedded in the
//! binary from `crates/broker/assets/`), a login form that trades the API token for a session
//! cookie, `GET /v1/status` (the page's snapshot) and the `status` event of `/v1/events`
//! ([`spawn_ticker`]), which keeps the page live.
//!
//! The session: `POST /login` with the API token in the form body (never in a URL) checks it as
//! the bearer check does, and sets `sphinx_session=<random 256 bits>; HttpOnly; SameSite=Strict;
//! Path=/`. The cookie stands in for the bearer token on `GET`/`HEAD` only (a cookie-carrying
//! request cannot change anything: control calls still need the bearer header). Sessions are
//! kept in memory, at most [`MAX_SESSIONS`], each for [`SESSION_TTL`]; `POST /logout` ends one.
//! Pages carry a strict Content-Security-Policy (`'self'` only, nothing inline, no frames).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bitcoin::hashes::{sha256, Hash};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{ApiState, ApiToken};
use crate::hub::SignerHub;
use crate::metrics::{Metrics, RefusalRecord, RequestRecord};
use crate::relay::RelayHandle;

/// Sessions kept at once; a new login beyond this ends the oldest.
pub const MAX_SESSIONS: usize = 16;
/// How long a session lasts after its login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Largest login form body accepted.
pub const MAX_LOGIN_BODY: usize = 4096;
/// Interval of the `status` event (sent only when something changed and someone listens).
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// Requests in one `status` event at most (the rest are in `/v1/status`).
const MAX_REQUESTS_PER_EVENT: usize = 200;

const COOKIE: &str = "sphinx_session";
const PAGE: &str = include_str!("../assets/status.html");
const SCRIPT: &str = include_str!("../assets/status.js");
const STYLE: &str = include_str!("../assets/status.css");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

type Body = BoxBody<Bytes, Infallible>;

/// The page's sessions (one per broker, in [`ApiState::page`]).
#[derive(Default)]
pub struct StatusPage {
    /// SHA-256 of the session id → when it expires.
    sessions: Mutex<HashMap<[u8; 32], Instant>>,
}

fn page_response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    // `same-origin`, not `no-referrer`: with the latter a browser sends `Origin: null` on the
    // login post, which [`same_origin`] must refuse.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    r
}

fn redirect(to: &'static str, cookie: Option<String>) -> Response<Body> {
    let mut r = page_response(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "see other\n");
    r.headers_mut().insert(header::LOCATION, HeaderValue::from_static(to));
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Decodes one `application/x-www-form-urlencoded` value (`+` is a space, `%XX` a byte).
fn form_value(body: &[u8], name: &str) -> Option<Vec<u8>> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    for pair in body.split(|b| *b == b'&') {
        let mut kv = pair.splitn(2, |b| *b == b'=');
        if kv.next() != Some(name.as_bytes()) {
            continue;
        }
        let v = kv.next().unwrap_or(b"");
        let mut out = Vec::with_capacity(v.len());
        let mut i = 0;
        while i < v.len() {
            match v[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let (h, l) = (v.get(i + 1).copied().and_then(hex), v.get(i + 2).copied().and_then(hex));
                    out.push((h? << 4) | l?);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        return Some(out);
    }
    None
}

/// A cross-site form post carries its own `Origin`: only the page's own origin may log in.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    origin.to_str().is_ok_and(|o| o.strip_prefix("http://").or_else(|| o.strip_prefix("https://")) == Some(host))
}

impl StatusPage {
    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 32], Instant>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_session(&self) -> String {
        use bitcoin::secp256k1::rand::{thread_rng, RngCore};
        let mut id = [0u8; 32];
        thread_rng().fill_bytes(&mut id);
        let id = hex::encode(id);
        let now = Instant::now();
        let mut s = self.lock();
        s.retain(|_, exp| *exp > now);
        if s.len() >= MAX_SESSIONS {
            if let Some(oldest) = s.iter().min_by_key(|(_, exp)| **exp).map(|(k, _)| *k) {
                s.remove(&oldest);
            }
        }
        s.insert(sha256::Hash::hash(id.as_bytes()).to_byte_array(), now + SESSION_TTL);
        id
    }

    /// Whether the request carries a live session cookie and may use it: `GET` and `HEAD` only.
    pub fn session_ok(&self, method: &Method, headers: &HeaderMap) -> bool {
        if method != Method::GET && method != Method::HEAD {
            return false;
        }
        let Some(id) = cookie(headers, COOKIE) else { return false };
        // Looked up by digest: timing tells nothing about the live ids themselves.
        let key = sha256::Hash::hash(id.as_bytes()).to_byte_array();
        self.lock().get(&key).is_some_and(|exp| *exp > Instant::now())
    }

    fn end_session(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            self.lock().remove(&sha256::Hash::hash(id.as_bytes()).to_byte_array());
        }
    }

    /// The routes that need no token: the page and its assets (`GET`), `POST /login`,
    /// `POST /logout`. Any other request is handed back for the API's bearer check.
    pub async fn route(
        &self,
        token: &ApiToken,
        peer: SocketAddr,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Request<Incoming>> {
        let get = req.method() == Method::GET || req.method() == Method::HEAD;
        let post = req.method() == Method::POST;
        Ok(match req.uri().path() {
            "/" | "/status" if get => page_response(StatusCode::OK, "text/html; charset=utf-8", PAGE),
            "/status.js" if get => page_response(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT),
            "/status.css" if get => page_response(StatusCode::OK, "text/css; charset=utf-8", STYLE),
            "/login" if post => self.login(token, peer, req).await,
            "/logout" if post => {
                if same_origin(req.headers()) {
                    self.end_session(req.headers());
                }
                redirect("/", Some(format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")))
            }
            "/" | "/status" | "/status.js" | "/status.css" | "/login" | "/logout" => {
                let mut r =
                    page_response(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "method not allowed\n");
                let allow = if matches!(req.uri().path(), "/login" | "/logout") { "POST" } else { "GET, HEAD" };
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
                r
            }
            _ => return Err(req),
        })
    }

    async fn login(&self, token: &ApiToken, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        if !same_origin(req.headers()) {
            warn!(%peer, "status page login refused: cross-origin form post");
            return page_response(StatusCode::FORBIDDEN, "text/plain; charset=utf-8", "cross-origin login refused\n");
        }
        let body = Limited::new(req.into_body(), MAX_LOGIN_BODY);
        let body = match tokio::time::timeout(Duration::from_secs(10), body.collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            _ => return page_response(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", "bad login form\n"),
        };
        let offered = form_value(&body, "token").unwrap_or_default();
        if !token.matches(offered.trim_ascii()) {
            warn!(%peer, "status page login refused: wrong token");
            return redirect("/#login-failed", None);
        }
        let id = self.new_session();
        info!(%peer, "status page login");
        let max_age = SESSION_TTL.as_secs();
        redirect("/", Some(format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}")))
    }
}

// ---------------------------------------------------------------------------------------------
// GET /v1/status and the `status` event

#[derive(Serialize)]
struct RelayJson {
    queued: usize,
    inflight: i64,
    signer_active: bool,
    requests_total: u64,
    refusals_total: u64,
    failovers: u64,
}

#[derive(Serialize)]
struct CatchUpJson {
    from_height: u32,
    target_height: u32,
    behind: u32,
    blocks_per_sec: f64,
    eta_secs: Option<u64>,
}

#[derive(Serialize)]
struct ChainJson {
    phase: &'static str,
    signer_height: Option<u32>,
    bitcoind_height: Option<u32>,
    lag: Option<u32>,
    catch_up: Option<CatchUpJson>,
    last_error: Option<String>,
}

fn chain_json(chain: &watch::Receiver<sphinx_chain::FollowerStatus>) -> ChainJson {
    let s = chain.borrow();
    let signer_height = s.signer_tip.map(|t| t.0);
    let bitcoind_height = s.bitcoind_tip.map(|t| t.0);
    ChainJson {
        phase: s.phase.name(),
        signer_height,
        bitcoind_height,
        lag: signer_height.zip(bitcoind_height).map(|(a, b)| b.saturating_sub(a)),
        catch_up: s.catch_up.as_ref().map(|c| CatchUpJson {
            from_height: c.from_height,
            target_height: c.target_height,
            behind: c.behind,
            blocks_per_sec: c.blocks_per_sec(),
            eta_secs: c.eta_secs(),
        }),
        last_error: s.last_error.clone(),
    }
}

#[derive(Serialize)]
struct StatusJson {
    time: u64,
    version: &'static str,
    pinned: Option<String>,
    signers: Vec<crate::api::SignerJson>,
    relay: RelayJson,
    chain: ChainJson,
    requests: Vec<RequestRecord>,
    refusals: Vec<RefusalRecord>,
}

fn relay_json(metrics: &Metrics, relay: &RelayHandle) -> RelayJson {
    RelayJson {
        queued: relay.queued(),
        inflight: metrics.inflight(),
        signer_active: metrics.signer_active(),
        requests_total: metrics.requests_total(),
        refusals_total: metrics.refusals().1,
        failovers: metrics.failovers(),
    }
}

/// `GET /v1/status`: everything the page shows, as JSON.
pub fn snapshot(state: &ApiState) -> impl Serialize {
    let pinned = state.pin.get();
    // The same list as `GET /v1/signers` (one builder for both).
    let signers = crate::api::signer_list(&state.hub, pinned.as_deref());
    StatusJson {
        time: sphinx_wire::unix_now(),
        version: env!("CARGO_PKG_VERSION"),
        pinned,
        signers,
        relay: relay_json(&state.metrics, &state.relay),
        chain: chain_json(&state.chain),
        requests: state.metrics.requests_since(None),
        refusals: state.metrics.refusals().0,
    }
}

#[derive(Serialize)]
struct UpdateJson {
    time: u64,
    relay: RelayJson,
    chain: ChainJson,
    /// Requests since the previous `status` event.
    requests: Vec<RequestRecord>,
    /// The recent refusals, when there are new ones.
    refusals: Option<Vec<RefusalRecord>>,
}

/// Sends a `status` event through the hub every [`STATUS_INTERVAL`] while someone listens to
/// `/v1/events` and something changed: the relay's counts, the chain, the requests since the
/// last one. One event a second at most, whatever the request rate.
pub fn spawn_ticker(
    hub: Arc<SignerHub>,
    metrics: Arc<Metrics>,
    relay: RelayHandle,
    chain: watch::Receiver<sphinx_chain::FollowerStatus>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_id: Option<u64> = metrics.requests_total().checked_sub(1);
        let mut last_refusals = metrics.refusals().1;
        let mut last_sent = String::new();
        loop {
            tick.tick().await;
            if !hub.has_subscribers() {
                // Nobody listens: the next listener starts from `/v1/status` anyway.
                last_id = metrics.requests_total().checked_sub(1);
                continue;
            }
            let mut requests = metrics.requests_since(last_id);
            requests.drain(..requests.len().saturating_sub(MAX_REQUESTS_PER_EVENT));
            let (refusals, refusals_total) = metrics.refusals();
            let update = UpdateJson {
                time: sphinx_wire::unix_now(),
                relay: relay_json(&metrics, &relay),
                chain: chain_json(&chain),
                refusals: (refusals_total != last_refusals).then_some(refusals),
                requests,
            };
            // Compared without the time, so an idle broker sends nothing.
            let Ok(key) = serde_json::to_string(&(&update.relay, &update.chain)) else { continue };
            if update.requests.is_empty() && update.refusals.is_none() && key == last_sent {
                continue;
            }
            if let Some(q) = update.requests.last() {
                last_id = Some(q.id);
            }
            last_refusals = refusals_total;
            last_sent = key;
            if let Ok(json) = serde_json::to_string(&update) {
                hub.publish_status(json.into());
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_decode() {
        assert_eq!(form_value(b"token=abc%2B%25+x&b=1", "token").unwrap(), b"abc+% x");
        assert_eq!(form_value(b"a=1&token=", "token").unwrap(), b"");
        assert_eq!(form_value(b"a=1", "token"), None);
        assert_eq!(form_value(b"token=%zz", "token"), None, "bad escapes are no value");
        assert_eq!(form_value(b"token=%4", "token"), None);
    }

    #[test]
    fn cookies_and_origins() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; sphinx_session=abc; b=2"));
        assert_eq!(cookie(&h, "sphinx_session"), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8090"));
        assert!(same_origin(&h), "no Origin: not a cross-site browser post");
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8090"));
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert!(!same_origin(&h));
    }

    #[test]
    fn sessions_are_get_only_bounded_and_end_at_logout() {
        let page = StatusPage::default();
        let ids: Vec<String> = (0..MAX_SESSIONS + 1).map(|_| page.new_session()).collect();
        let headers = |id: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::COOKIE, HeaderValue::from_str(&format!("{COOKIE}={id}")).unwrap());
            h
        };
        assert_eq!(page.lock().len(), MAX_SESSIONS);
        let last = headers(&ids[MAX_SESSIONS]);
        assert!(page.session_ok(&Method::GET, &last));
        assert!(!page.session_ok(&Method::POST, &last), "a cookie never authorizes a POST");
        assert!(!page.session_ok(&Method::GET, &headers("00")));
        page.end_session(&last);
        assert!(!page.session_ok(&Method::GET, &last));
    }
}
