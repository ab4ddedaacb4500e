//! The operator HTTP API: list the signers, relay an owner control message to a signer and
//! return its response, and stream signer events. Off unless `api.listen` is configured;
//! loopback only unless explicitly allowed; every request needs `Authorization: Bearer <token>`.
//! See docs/api.md for the endpoints and the reasons behind them.
//!
//! HTTP/1.1 on hyper 1 (no framework): four routes do not need a router, and the server side
//! stays small (hyper, hyper-util's tokio glue, http-body-util).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Deserializer, Serialize};
use sphinx_mqtt_server::{is_loopback, MqttError, MqttHandle};
use sphinx_wire::control::MAX_CONTROL_LEN;
use sphinx_wire::topics;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch, Semaphore};
use tracing::{debug, info, warn, Instrument};

use crate::config::ConfigError;
use crate::hub::{Role, SignerEvent, SignerHub};
use crate::pin::PinStore;
use crate::relay::RelayHandle;

/// Largest control request body accepted (the signer refuses anything larger anyway).
pub const MAX_CONTROL_BODY: usize = MAX_CONTROL_LEN;
/// Nonces of timed-out control calls remembered per signer, to drop their late responses.
const LATE_NONCES: usize = 16;
/// `nonce u64 | sig65` after the msgpack of a control request or response.
const CONTROL_TRAILER: usize = 8 + 65;

/// Simultaneous `/v1/events` streams; more get 503.
const MAX_EVENT_STREAMS: usize = 8;
/// Interval of SSE keep-alive comments.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// A client must send a control request's body within this time.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connection-limit warnings are logged at most this often (each refusal is logged at `debug`).
const LIMIT_WARN_EVERY: Duration = Duration::from_secs(10);

/// The operator API: the `[api]` table of the config file (see docs/api.md). Off unless
/// [`ApiConfig::listen`] is set.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address (`SPHINX_BROKER_API_LISTEN`, `--api-listen`; port 0 picks one, see
    /// [`ApiHandle::local_addr`]). Default unset: no API.
    pub listen: Option<SocketAddr>,
    /// Allow a listen address that is not loopback (`SPHINX_BROKER_API_ALLOW_NON_LOOPBACK`).
    /// Default false.
    pub allow_non_loopback: bool,
    /// The bearer token every request must carry, inline (`SPHINX_BROKER_API_TOKEN`; prefer
    /// [`ApiConfig::token_file`]). Required when the API is enabled. Default unset.
    pub token: Option<ApiToken>,
    /// A file holding the token (`SPHINX_BROKER_API_TOKEN_FILE`, `--api-token-file`), read by
    /// [`ApiConfig::load_token`]. Default unset.
    pub token_file: Option<PathBuf>,
    /// Longest a control call waits for the signer's response, then 504 (file:
    /// `control_timeout_secs`; `SPHINX_BROKER_API_CONTROL_TIMEOUT`). Default 10 s.
    #[serde(rename = "control_timeout_secs", deserialize_with = "crate::config::secs")]
    pub control_timeout: Duration,
    /// Events buffered per `/v1/events` subscriber before it starts losing them. Default 256.
    pub event_capacity: usize,
    /// Simultaneous connections in all (file: `max_connections`). When all are taken, a new
    /// connection replaces the oldest one that has not sent a complete request head yet; if
    /// every one is serving a request, the new one is closed. Default 32.
    pub max_connections: usize,
    /// Simultaneous connections from one source address (file: `max_connections_per_addr`), so
    /// that one address cannot take every slot. Beyond it, a new connection from that address
    /// replaces its oldest one without a complete request head, or is closed. Default 16 (above
    /// the 8 event streams, so that a client holding them all can still make other requests).
    pub max_connections_per_addr: usize,
    /// A client must send a complete request head within this time of connecting (and of its
    /// previous response, on a kept-alive connection), else it is closed (file:
    /// `header_timeout_secs`). Default 5 s.
    #[serde(rename = "header_timeout_secs", deserialize_with = "crate::config::secs")]
    pub header_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: None,
            allow_non_loopback: false,
            token: None,
            token_file: None,
            control_timeout: Duration::from_secs(10),
            event_capacity: 256,
            max_connections: 32,
            max_connections_per_addr: 16,
            header_timeout: Duration::from_secs(5),
        }
    }
}

impl ApiConfig {
    /// Sets the token inline (replacing a token file set earlier).
    pub fn set_token(&mut self, token: &str) -> Result<(), ConfigError> {
        self.token = Some(ApiToken::new(token)?);
        self.token_file = None;
        Ok(())
    }

    /// Sets the token file (replacing an inline token set earlier); read by
    /// [`ApiConfig::load_token`].
    pub fn set_token_file(&mut self, path: PathBuf) {
        self.token_file = Some(path);
        self.token = None;
    }

    /// Reads the token from [`ApiConfig::token_file`], if one is set (trimming surrounding
    /// whitespace). Warns if the file is readable by group or others.
    pub fn load_token(&mut self) -> Result<(), ConfigError> {
        let Some(path) = self.token_file.clone() else { return Ok(()) };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        crate::config::warn_if_shared(&path, "the API token file is readable by group or others; chmod 600 it");
        let token = ApiToken::new(text.trim()).map_err(|e| match e {
            ConfigError::Invalid(_, why) => {
                ConfigError::Invalid("api.token_file", format!("{}: {why}", path.display()))
            }
            other => other,
        })?;
        self.token = Some(token);
        Ok(())
    }

    /// Rejects an enabled API without a token, on a non-loopback address without
    /// `allow_non_loopback`, or with zero bounds. A disabled API is always fine. [`start`] checks
    /// the same.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Some(listen) = self.listen else { return Ok(()) };
        if self.token.is_none() {
            return Err(ConfigError::Invalid(
                "api.token",
                format!(
                    "the API is enabled (api.listen = {listen}) but no token is set: set [api] token_file (or token), \
                     SPHINX_BROKER_API_TOKEN_FILE or SPHINX_BROKER_API_TOKEN, at least {MIN_API_TOKEN_LEN} characters"
                ),
            ));
        }
        if !is_loopback(listen.ip()) && !self.allow_non_loopback {
            return Err(ConfigError::Invalid(
                "api.listen",
                format!(
                    "{listen} is not a loopback address; the API is plain HTTP and controls the signer: listen on \
                     127.0.0.1/::1 (and use an SSH tunnel or a TLS proxy), or set api.allow_non_loopback = true"
                ),
            ));
        }
        if self.control_timeout.is_zero() {
            return Err(ConfigError::Invalid("api.control_timeout_secs", "must be positive".into()));
        }
        if self.event_capacity == 0 {
            return Err(ConfigError::Invalid("api.event_capacity", "must be at least 1".into()));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid("api.max_connections", "must be at least 1".into()));
        }
        if self.max_connections_per_addr == 0 {
            return Err(ConfigError::Invalid("api.max_connections_per_addr", "must be at least 1".into()));
        }
        if self.header_timeout.is_zero() {
            return Err(ConfigError::Invalid("api.header_timeout_secs", "must be positive".into()));
        }
        Ok(())
    }
}

/// Shortest accepted API token, in characters.
pub const MIN_API_TOKEN_LEN: usize = 16;
/// Longest accepted API token, in characters.
pub const MAX_API_TOKEN_LEN: usize = 1024;

/// The API's bearer token. Its `Debug` never shows it; comparison is in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for ApiToken {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ApiToken::new(&s).map_err(serde::de::Error::custom)
    }
}

impl ApiToken {
    /// A token of [`MIN_API_TOKEN_LEN`]..=[`MAX_API_TOKEN_LEN`] visible ASCII characters (no
    /// spaces), so that it fits an `Authorization: Bearer` header as is.
    pub fn new(token: &str) -> Result<ApiToken, ConfigError> {
        if token.len() < MIN_API_TOKEN_LEN {
            return Err(ConfigError::Invalid(
                "api.token",
                format!(
                    "too short ({} characters): use at least {MIN_API_TOKEN_LEN}, e.g. `openssl rand -hex 32`",
                    token.len()
                ),
            ));
        }
        if token.len() > MAX_API_TOKEN_LEN {
            return Err(ConfigError::Invalid("api.token", format!("longer than {MAX_API_TOKEN_LEN} characters")));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::Invalid("api.token", "must be visible ASCII characters without spaces".into()));
        }
        Ok(ApiToken(token.to_string()))
    }

    /// Is `offered` this token? Compares SHA-256 digests in constant time, so neither the
    /// content nor the length of the token leaks through timing.
    pub fn matches(&self, offered: &[u8]) -> bool {
        use bitcoin::hashes::{sha256, Hash};
        let a = sha256::Hash::hash(self.0.as_bytes()).to_byte_array();
        let b = sha256::Hash::hash(offered).to_byte_array();
        let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }
}

/// What the API reads and drives: the broker's parts.
#[derive(Clone)]
pub struct ApiState {
    /// The embedded MQTT server (publishes control requests, tells who is subscribed).
    pub mqtt: MqttHandle,
    /// The signers' state and events.
    pub hub: Arc<SignerHub>,
    /// The request path (queue length; heartbeat).
    pub relay: RelayHandle,
    /// The pinned node id.
    pub pin: Arc<PinStore>,
    /// The chain follower's status (`GET /v1/chain`).
    pub chain: watch::Receiver<sphinx_chain::FollowerStatus>,
    /// The broker's metrics (`GET /metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The status page's sessions (`GET /`, crate::status_page).
    pub page: Arc<crate::status_page::StatusPage>,
}

/// Why the API did not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The settings are not acceptable (no token, non-loopback without opt-in, …).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// A running API server. Dropping it (or [`ApiHandle::shutdown`]) stops the server: the
/// listener closes and open connections and event streams end.
pub struct ApiHandle {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
}

impl ApiHandle {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the server.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

impl std::fmt::Debug for ApiHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiHandle").field("local_addr", &self.local_addr).finish()
    }
}

/// What the server's tasks share.
struct Shared {
    control_timeout: Duration,
    token: ApiToken,
    state: ApiState,
    streams: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
}

/// Binds the API and serves it in the background. Refuses settings that
/// [`ApiConfig::validate`] refuses, and an API that is off (no [`ApiConfig::listen`]).
pub async fn start(cfg: &ApiConfig, state: ApiState) -> Result<ApiHandle, ApiError> {
    cfg.validate()?;
    let (Some(listen), Some(token)) = (cfg.listen, cfg.token.clone()) else {
        return Err(ApiError::Config(ConfigError::Invalid("api.listen", "the API is off (no listen address)".into())));
    };
    let listener = TcpListener::bind(listen).await.map_err(|source| ApiError::Bind { addr: listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| ApiError::Bind { addr: listen, source })?;
    if !is_loopback(local_addr.ip()) {
        warn!(listen = %local_addr, "operator API on a non-loopback address (explicitly allowed): plain HTTP, the token travels in clear text");
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let conns = Arc::new(ConnLimits::new(cfg.max_connections, cfg.max_connections_per_addr));
    let header_timeout = cfg.header_timeout;
    let shared = Arc::new(Shared {
        control_timeout: cfg.control_timeout,
        token,
        state,
        streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
        shutdown: shutdown_rx.clone(),
    });
    info!(listen = %local_addr, "operator API listening");
    tokio::spawn(accept_loop(listener, shared, conns, header_timeout, shutdown_rx));
    Ok(ApiHandle { local_addr, shutdown: shutdown_tx })
}

/// The open connections, for [`ApiConfig::max_connections`] and
/// [`ApiConfig::max_connections_per_addr`]. Connections are admitted at accept (no slot is held
/// while waiting for one), and an idle one (no complete request head yet) is shed to make room,
/// so idle sockets cannot lock a client with a request out.
struct ConnLimits {
    max: usize,
    per_addr: usize,
    table: std::sync::Mutex<ConnTable>,
}

#[derive(Default)]
struct ConnTable {
    next_id: u64,
    /// By id, which is also age order (oldest first). At most `max` entries.
    open: std::collections::BTreeMap<u64, ConnEntry>,
    last_warn: Option<Instant>,
}

/// [`ConnEntry::state`]: no complete request head yet (may be shed).
const CONN_IDLE: u8 = 0;
/// A complete request head arrived: the connection is being served, never shed.
const CONN_BUSY: u8 = 1;
/// Chosen to make room; closing.
const CONN_SHED: u8 = 2;

struct ConnEntry {
    ip: std::net::IpAddr,
    /// [`CONN_IDLE`] → [`CONN_BUSY`] (first request) or [`CONN_SHED`], by compare-and-swap, so
    /// a connection whose request just arrived is never shed.
    state: Arc<AtomicU8>,
    /// Told to close when shed (a stored permit: works even before the task waits on it).
    shed: Arc<tokio::sync::Notify>,
}

/// A connection's place in [`ConnLimits`], given back when dropped.
struct ConnSlot {
    limits: Arc<ConnLimits>,
    id: u64,
    state: Arc<AtomicU8>,
    shed: Arc<tokio::sync::Notify>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.lock().open.remove(&self.id);
    }
}

/// Why a new connection was closed at once.
#[derive(Debug)]
enum Refused {
    PerAddr,
    Full,
}

impl ConnLimits {
    fn new(max: usize, per_addr: usize) -> ConnLimits {
        ConnLimits { max: max.max(1), per_addr: per_addr.max(1), table: Default::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnTable> {
        // The table stays consistent at every step; a panic elsewhere cannot tear it.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `peer`, shedding an idle one if a limit is reached: that
    /// address's oldest idle connection when it is at its own limit, else the oldest idle one
    /// when all slots are taken. Refused if there is nothing idle to shed.
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<ConnSlot, Refused> {
        let ip = peer.ip().to_canonical();
        let mut t = self.lock();
        // Claims the entry for shedding unless its first request has just arrived.
        let claim =
            |e: &ConnEntry| e.state.compare_exchange(CONN_IDLE, CONN_SHED, Ordering::AcqRel, Ordering::Acquire).is_ok();
        let from_ip = t.open.values().filter(|e| e.ip == ip).count();
        let victim = if from_ip >= self.per_addr {
            Some(t.open.iter().find(|(_, e)| e.ip == ip && claim(e)).map(|(id, _)| *id).ok_or(Refused::PerAddr))
        } else if t.open.len() >= self.max {
            Some(t.open.iter().find(|(_, e)| claim(e)).map(|(id, _)| *id).ok_or(Refused::Full))
        } else {
            None
        };
        let limited = victim.is_some();
        let outcome = match victim {
            Some(Err(why)) => Err(why),
            Some(Ok(id)) => {
                if let Some(old) = t.open.remove(&id) {
                    debug!(%peer, shed = %old.ip, "API connection limit: shedding an idle connection");
                    old.shed.notify_one();
                }
                Ok(())
            }
            None => Ok(()),
        };
        if limited && t.last_warn.is_none_or(|w| w.elapsed() >= LIMIT_WARN_EVERY) {
            t.last_warn = Some(Instant::now());
            warn!(
                %peer,
                open = t.open.len(),
                max = self.max,
                per_addr = self.per_addr,
                "API connection limits reached: idle connections are shed, others refused (logged at most every {}s)",
                LIMIT_WARN_EVERY.as_secs()
            );
        }
        outcome?;
        let id = t.next_id;
        t.next_id += 1;
        let state = Arc::new(AtomicU8::new(CONN_IDLE));
        let shed = Arc::new(tokio::sync::Notify::new());
        t.open.insert(id, ConnEntry { ip, state: state.clone(), shed: shed.clone() });
        Ok(ConnSlot { limits: self.clone(), id, state, shed })
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    conns: Arc<ConnLimits>,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let slot = match conns.admit(peer) {
            Ok(slot) => slot,
            Err(why) => {
                debug!(%peer, ?why, "API connection refused: limit reached and nothing idle to shed");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        let span = tracing::debug_span!("api", %peer);
        tokio::spawn(
            async move {
                let svc_shared = shared.clone();
                let state = slot.state.clone();
                let svc = service_fn(move |req| {
                    // A complete request head arrived: from now on this connection is served,
                    // not shed (a refused one closes after its 401). If it was shed just
                    // before, the select below is ending it anyway.
                    let _ = state.compare_exchange(CONN_IDLE, CONN_BUSY, Ordering::AcqRel, Ordering::Acquire);
                    let shared = svc_shared.clone();
                    async move { Ok::<_, Infallible>(handle(&shared, peer, req).await) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    r = conn => if let Err(e) = r {
                        debug!(error = %e, "API connection ended with an error");
                    },
                    _ = slot.shed.notified() => debug!("API connection shed (idle, limit reached)"),
                    _ = shutdown.changed() => debug!("API shutting down; connection closed"),
                }
                drop(slot);
            }
            .instrument(span),
        );
    }
    info!("operator API stopped");
}

/// Response bodies: a whole buffer or an event stream.
type ApiBody = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> ApiBody {
    Full::new(b.into()).boxed()
}

fn response(status: StatusCode, content_type: &'static str, body: ApiBody) -> Response<ApiBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ApiBody> {
    match serde_json::to_vec(value) {
        Ok(v) => response(status, "application/json", full(v)),
        Err(e) => {
            warn!(error = %e, "cannot encode a JSON response");
            response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "application/json",
                full(&b"{\"error\":\"internal error\"}"[..]),
            )
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

fn error(status: StatusCode, msg: &str) -> Response<ApiBody> {
    json(status, &ErrorBody { error: msg })
}

/// 401, and the connection closes after it (`Connection: close`): a client without the token
/// gets nothing more from the connection, and does not keep its slot.
fn unauthorized(msg: &str) -> Response<ApiBody> {
    let mut r = error(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"sphinx-broker\""));
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn method_not_allowed(allow: &'static str) -> Response<ApiBody> {
    let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The token of a single `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let v = all.next()?;
    if all.next().is_some() {
        return None;
    }
    let v = v.as_bytes();
    let sp = v.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = v.split_at(sp);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    Some(rest.trim_ascii())
}

async fn handle(shared: &Shared, peer: SocketAddr, req: Request<Incoming>) -> Response<ApiBody> {
    let started = Instant::now();
    // The status page, its assets and its login form need no token (crate::status_page).
    let req = match shared.state.page.route(&shared.token, peer, req).await {
        Ok(resp) => return resp,
        Err(req) => req,
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let authorized = match bearer(req.headers()) {
        Some(t) => shared.token.matches(t),
        // The page's session cookie stands in for the token on GET and HEAD.
        None => shared.state.page.session_ok(&method, req.headers()),
    };
    if !authorized {
        let had = req.headers().contains_key(header::AUTHORIZATION);
        warn!(%peer, %method, %path, "API request refused: {} bearer token", if had { "wrong" } else { "no" });
        return unauthorized(if had { "invalid bearer token" } else { "bearer token required" });
    }
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let resp = match (&method, segs.as_slice()) {
        (&Method::GET, ["v1", "signers"]) => signers(shared),
        (&Method::POST, ["v1", "signers", id, "control"]) => {
            let id = id.to_ascii_lowercase();
            control(shared, &id, req).await
        }
        (&Method::GET, ["v1", "events"]) => events(shared),
        (&Method::GET, ["v1", "chain"]) => chain_status(shared),
        (&Method::GET, ["v1", "chain", "heartbeat"]) => heartbeat(shared).await,
        (&Method::GET, ["v1", "status"]) => json(StatusCode::OK, &crate::status_page::snapshot(&shared.state)),
        (&Method::GET, ["metrics"]) => {
            let s = &shared.state;
            let src = crate::metrics::Sources { relay: &s.relay, hub: &s.hub, chain: &s.chain };
            response(StatusCode::OK, crate::metrics::CONTENT_TYPE, full(s.metrics.encode(&src)))
        }
        (_, ["v1", "signers"])
        | (_, ["v1", "events"])
        | (_, ["v1", "chain"])
        | (_, ["v1", "chain", "heartbeat"])
        | (_, ["v1", "status"])
        | (_, ["metrics"]) => method_not_allowed("GET"),
        (_, ["v1", "signers", _, "control"]) => method_not_allowed("POST"),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    };
    debug!(%peer, %method, %path, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "API request");
    resp
}

// ---------------------------------------------------------------------------------------------
// GET /v1/signers

/// One signer as `GET /v1/signers` and the status page (`GET /v1/status`) show it
/// (docs/api.md): built by [`signer_list`] for both.
#[derive(Serialize)]
pub struct SignerJson {
    /// Its MQTT identity (client id, the topic prefix; the node id for a legacy client).
    client_id: String,
    /// The node id it logged in with.
    node_id: String,
    /// "active", "standby", "syncing", "refused" or "none".
    role: &'static str,
    connected: bool,
    ready: bool,
    since: Option<u64>,
    pinned: bool,
    last_error: Option<ErrorJson>,
    /// LSS backup: "off", "syncing", "synced", "stale" or "error" (then `lss_error` says why).
    lss: &'static str,
    lss_error: Option<String>,
    /// Its hello announced `error-seq` (this project's signer); false: an upstream client.
    error_seq: bool,
}

#[derive(Serialize)]
struct ErrorJson {
    seq: Option<u16>,
    text: String,
    time: u64,
}

/// Every signer the hub knows, and the pinned node (as a disconnected entry) if none of them
/// is of it.
pub fn signer_list(hub: &SignerHub, pinned: Option<&str>) -> Vec<SignerJson> {
    let mut list: Vec<SignerJson> = hub
        .signers()
        .into_iter()
        .map(|s| SignerJson {
            pinned: pinned == Some(s.node_id.as_str()),
            role: s.role.as_str(),
            connected: s.connected,
            ready: s.ready,
            since: Some(s.since),
            last_error: s.last_error.map(|e| ErrorJson { seq: e.seq, text: e.text, time: e.time }),
            lss: s.lss.parts().0,
            lss_error: s.lss.parts().1.map(str::to_string),
            error_seq: s.error_seq,
            client_id: s.client_id,
            node_id: s.node_id,
        })
        .collect();
    if let Some(p) = pinned {
        if !list.iter().any(|s| s.node_id == p) {
            list.push(SignerJson {
                client_id: p.to_string(),
                node_id: p.to_string(),
                role: Role::None.as_str(),
                connected: false,
                ready: false,
                since: None,
                pinned: true,
                last_error: None,
                lss: "off",
                lss_error: None,
                error_seq: false,
            });
        }
    }
    list
}

#[derive(Serialize)]
struct RelayJson {
    queued: usize,
    failovers: u64,
}

#[derive(Serialize)]
struct SignersJson {
    signers: Vec<SignerJson>,
    pinned: Option<String>,
    relay: RelayJson,
    /// The LSS server's key (hex) once a signer was synced with it; `null` without LSS.
    lss_server: Option<String>,
}

fn signers(shared: &Shared) -> Response<ApiBody> {
    let pinned = shared.state.pin.get();
    let list = signer_list(&shared.state.hub, pinned.as_deref());
    let relay = RelayJson { queued: shared.state.relay.queued(), failovers: shared.state.metrics.failovers() };
    let lss_server = shared.state.hub.lss_server();
    json(StatusCode::OK, &SignersJson { signers: list, pinned, relay, lss_server })
}

// ---------------------------------------------------------------------------------------------
// POST /v1/signers/{node_id}/control

/// The nonce in a control message's trailer (`msgpack | nonce u64 BE | sig65`), if it has one.
fn control_nonce(msg: &[u8]) -> Option<u64> {
    if msg.len() <= CONTROL_TRAILER {
        return None;
    }
    let at = msg.len() - CONTROL_TRAILER;
    let b: [u8; 8] = msg.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

fn is_node_id(id: &str) -> bool {
    crate::auth::is_node_id(id)
}

/// A node id, or a client id the broker could have given a signer as its identity.
fn is_signer_id(id: &str) -> bool {
    is_node_id(id) || crate::auth::identity_for(id, "") == id
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<ApiBody>> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let essence = ct.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if essence != "application/octet-stream" {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be application/octet-stream (the raw control message)",
            ));
        }
    }
    let too_large =
        || error(StatusCode::PAYLOAD_TOO_LARGE, &format!("control messages are at most {MAX_CONTROL_BODY} bytes"));
    if let Some(len) =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
    {
        if len > MAX_CONTROL_BODY as u64 {
            return Err(too_large());
        }
    }
    let body = Limited::new(req.into_body(), MAX_CONTROL_BODY);
    match tokio::time::timeout(READ_TIMEOUT, body.collect()).await {
        Err(_) => Err(error(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time")),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, &format!("cannot read the request body: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

async fn control(shared: &Shared, id: &str, req: Request<Incoming>) -> Response<ApiBody> {
    let deadline = tokio::time::Instant::now() + shared.control_timeout;
    if !is_signer_id(id) {
        return error(StatusCode::BAD_REQUEST, "expected a node id (33 bytes in hex) or a signer's client id");
    }
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if body.is_empty() {
        return error(StatusCode::BAD_REQUEST, "empty control message");
    }
    // A node id means its active signer; a client id that one signer.
    let known = shared.state.hub.resolve(id);
    let pinned = shared.state.pin.get().as_deref() == Some(id);
    let id =
        match &known {
            None if !pinned => return error(StatusCode::NOT_FOUND, "unknown signer"),
            // vls-mqtt answers a message on `{id}/control` with a text error report, which the
            // relay would take for a refusal of its oldest request in flight (docs/wire.md row 8).
            Some(s) if s.connected && s.ready && !s.error_seq => return error(
                StatusCode::NOT_IMPLEMENTED,
                "this signer did not announce error-seq in its hello (an upstream vls-mqtt client): it takes owner \
                 control over its own HTTP API, not over MQTT; nothing was sent",
            ),
            Some(s) if s.connected => s.client_id.clone(),
            _ => return error(StatusCode::SERVICE_UNAVAILABLE, "signer not connected"),
        };
    let id = id.as_str();
    let topic = topics::topic(id, topics::CONTROL);
    if !shared.state.mqtt.has_subscriber(&topic) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "signer connected but not subscribed to its control topic");
    }

    // One control call per signer at a time: the response topic carries no request id.
    let mut call = match shared.state.hub.control_call(id, deadline).await {
        Ok(c) => c,
        Err(e) => {
            warn!(signer = %id, "control call gave up waiting for another call to the same signer");
            return error(StatusCode::CONFLICT, &e.to_string());
        }
    };
    let nonce = control_nonce(&body);
    let len = body.len();
    match shared.state.mqtt.publish_count(&topic, body) {
        Ok(0) => return error(StatusCode::SERVICE_UNAVAILABLE, "signer not subscribed to its control topic"),
        Ok(_) => {}
        Err(e @ MqttError::PayloadTooLarge { .. }) => return error(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()),
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
    info!(signer = %id, bytes = len, ?nonce, "control request relayed to the signer");
    loop {
        match tokio::time::timeout_at(deadline, call.recv()).await {
            Err(_) => {
                if let Some(n) = nonce {
                    let late = &mut call.slot().late;
                    if late.len() >= LATE_NONCES {
                        late.pop_front();
                    }
                    late.push_back(n);
                }
                warn!(signer = %id, ?nonce, timeout = ?shared.control_timeout, "no control response in time");
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "no response from the signer in time (the request was delivered and may still be applied)",
                );
            }
            Ok(None) => {
                warn!(signer = %id, ?nonce, "signer disconnected before answering a control request");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the signer disconnected before answering (the request may or may not have been applied)",
                );
            }
            Ok(Some(resp)) => {
                let got = control_nonce(&resp);
                if got.is_some() && got != nonce && got.is_some_and(|g| call.slot().late.contains(&g)) {
                    warn!(signer = %id, late_nonce = ?got, "late response to an earlier, timed-out control call; dropped");
                    continue;
                }
                info!(signer = %id, bytes = resp.len(), nonce = ?got, "control response relayed to the caller");
                return response(StatusCode::OK, "application/octet-stream", full(resp));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GET /v1/events

/// A response body fed by a channel (the event stream).
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut().rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(Serialize)]
struct NodeTime<'a> {
    node_id: &'a str,
    client_id: &'a str,
    time: u64,
}

#[derive(Serialize)]
struct Lagged {
    missed: u64,
}

fn sse<T: Serialize>(event: &str, data: &T) -> Bytes {
    // serde_json's compact output has no newline, so one `data:` line carries it.
    let data = serde_json::to_string(data).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// The SSE frame of a signer event.
fn sse_frame(ev: &SignerEvent) -> Bytes {
    match ev {
        SignerEvent::Connected { node_id, client_id, time } => {
            sse("signer-connected", &NodeTime { node_id, client_id, time: *time })
        }
        SignerEvent::Ready { node_id, client_id, time } => {
            sse("signer-ready", &NodeTime { node_id, client_id, time: *time })
        }
        SignerEvent::Disconnected { node_id, client_id, time } => {
            sse("signer-disconnected", &NodeTime { node_id, client_id, time: *time })
        }
        SignerEvent::Error(e) => sse("signer-error", e),
        // Already JSON (crate::status_page::spawn_ticker): one line, no newline inside.
        SignerEvent::Status(json) => Bytes::from(format!("event: status\ndata: {json}\n\n")),
    }
}

#[derive(Clone, Copy)]
struct PumpTiming {
    /// Interval of keep-alive comments.
    keepalive: Duration,
    /// A client that does not take a frame within this time loses its stream.
    send_timeout: Duration,
}

/// Feeds one `/v1/events` stream: a hello comment, then each hub event as an SSE frame,
/// `lagged` when this subscriber fell behind the bounded broadcast, and keep-alive comments.
/// Ends when the client goes away, stops reading, or the API shuts down.
async fn event_pump(
    mut rx: broadcast::Receiver<SignerEvent>,
    tx: mpsc::Sender<Bytes>,
    timing: PumpTiming,
    mut shutdown: watch::Receiver<bool>,
) {
    if tx.send(Bytes::from_static(b": sphinx-broker signer events\n\n")).await.is_err() {
        return;
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + timing.keepalive, timing.keepalive);
    loop {
        let frame = tokio::select! {
            ev = rx.recv() => match ev {
                Ok(ev) => sse_frame(&ev),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "event subscriber too slow; events dropped for it");
                    sse("lagged", &Lagged { missed: n })
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => Bytes::from_static(b": keep-alive\n\n"),
            _ = tx.closed() => break,
            _ = shutdown.changed() => break,
        };
        // A client that stops reading loses its stream (never the broker's time).
        match tokio::time::timeout(timing.send_timeout, tx.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                warn!("event subscriber not reading; stream closed");
                break;
            }
        }
    }
    debug!("event stream ended");
}

fn events(shared: &Shared) -> Response<ApiBody> {
    let Ok(permit) = shared.streams.clone().try_acquire_owned() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "too many event streams open");
    };
    // Subscribed before the response goes out: once a client has the headers, it gets every
    // event from then on.
    let rx = shared.state.hub.subscribe();
    let (tx, body_rx) = mpsc::channel::<Bytes>(16);
    let timing = PumpTiming { keepalive: KEEPALIVE, send_timeout: READ_TIMEOUT.max(Duration::from_secs(30)) };
    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        let _permit = permit;
        event_pump(rx, tx, timing, shutdown).await;
    });
    let mut r = response(StatusCode::OK, "text/event-stream", ChannelBody { rx: body_rx }.boxed());
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

// ---------------------------------------------------------------------------------------------
// GET /v1/chain

#[derive(Serialize)]
struct TipJson {
    height: u32,
    hash: String,
}

#[derive(Serialize)]
struct FailureJson {
    text: String,
    time: u64,
    restarted: bool,
}

#[derive(Serialize)]
struct ChainHeartbeatJson {
    chain_height: u32,
    chain_tip: String,
    current_timestamp: u32,
    verified: bool,
}

#[derive(Serialize)]
struct ChainJson {
    phase: &'static str,
    signer_tip: Option<TipJson>,
    bitcoind_tip: Option<TipJson>,
    blocks_added: u64,
    blocks_removed: u64,
    consecutive_failures: u32,
    failures_total: u64,
    restarts: u64,
    last_error: Option<String>,
    last_failure: Option<FailureJson>,
    heartbeat: Option<ChainHeartbeatJson>,
    catch_up: Option<CatchUpJson>,
}

#[derive(Serialize)]
struct CatchUpJson {
    from_height: u32,
    target_height: u32,
    behind: u32,
    blocks_done: u32,
    elapsed_secs: f64,
    blocks_per_sec: f64,
    eta_secs: Option<u64>,
}

fn chain_status(shared: &Shared) -> Response<ApiBody> {
    let s = shared.state.chain.borrow().clone();
    let tip = |t: Option<(u32, bitcoin::BlockHash)>| t.map(|(height, h)| TipJson { height, hash: h.to_string() });
    json(
        StatusCode::OK,
        &ChainJson {
            phase: s.phase.name(),
            signer_tip: tip(s.signer_tip),
            bitcoind_tip: tip(s.bitcoind_tip),
            blocks_added: s.blocks_added,
            blocks_removed: s.blocks_removed,
            consecutive_failures: s.consecutive_failures,
            failures_total: s.failures_total,
            restarts: s.restarts,
            last_error: s.last_error,
            last_failure: s.last_failure.map(|f| FailureJson { text: f.text, time: f.time, restarted: f.restarted }),
            heartbeat: s.heartbeat.map(|h| ChainHeartbeatJson {
                chain_height: h.chain_height,
                chain_tip: h.chain_tip.to_string(),
                current_timestamp: h.current_timestamp,
                verified: h.verified,
            }),
            catch_up: s.catch_up.map(|c| CatchUpJson {
                from_height: c.from_height,
                target_height: c.target_height,
                behind: c.behind,
                blocks_done: c.blocks_done,
                elapsed_secs: c.elapsed_ms as f64 / 1000.0,
                blocks_per_sec: c.blocks_per_sec(),
                eta_secs: c.eta_secs(),
            }),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// GET /v1/chain/heartbeat

#[derive(Serialize)]
struct HeartbeatJson {
    node_id: String,
    chain_tip: String,
    chain_height: u32,
    chain_timestamp: u32,
    current_timestamp: u32,
    signature: String,
    verified: bool,
    raw: String,
}

async fn heartbeat(shared: &Shared) -> Response<ApiBody> {
    // Only through the pinned (lightningd-initialised) signer, and only while it is there:
    // otherwise the request would wait in the relay's queue.
    let Some(node_id) = shared.state.pin.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no signer has been initialised by lightningd yet");
    };
    if shared.state.hub.active_of(&node_id).is_none() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "signer not connected");
    }
    match tokio::time::timeout(shared.control_timeout, sphinx_chain::fetch_heartbeat(shared.state.relay.clone())).await
    {
        Err(_) => error(StatusCode::GATEWAY_TIMEOUT, "no heartbeat from the signer in time"),
        Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, &e.to_string()),
        Ok(Ok(hb)) => json(
            StatusCode::OK,
            &HeartbeatJson {
                node_id,
                chain_tip: hb.chain_tip.to_string(),
                chain_height: hb.chain_height,
                chain_timestamp: hb.chain_timestamp,
                current_timestamp: hb.current_timestamp,
                signature: hb.signature,
                verified: hb.verified,
                raw: hb.raw,
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(bearer(&h), Some(&b"abc"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer   abc  "));
        assert_eq!(bearer(&h), Some(&b"abc"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        h.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(bearer(&h), None, "two Authorization headers are refused");
    }

    #[test]
    fn nonce_of_a_control_message() {
        let mut m = vec![0xa5];
        m.extend_from_slice(&42u64.to_be_bytes());
        m.extend_from_slice(&[0; 65]);
        assert_eq!(control_nonce(&m), Some(42));
        assert_eq!(control_nonce(&m[1..]), None);
        assert_eq!(control_nonce(b""), None);
    }

    #[test]
    fn node_ids_are_lowercase_hex_of_33_bytes() {
        assert!(is_node_id(&format!("02{}", "ab".repeat(32))));
        assert!(!is_node_id(&format!("02{}", "AB".repeat(32))));
        assert!(!is_node_id("02ab"));
        assert!(!is_node_id(&format!("02{}", "zz".repeat(32))));
    }

    #[tokio::test]
    async fn a_slow_event_subscriber_gets_lagged_then_the_newest_events() {
        let hub = SignerHub::new(2);
        let rx = hub.subscribe();
        for i in 0..5u8 {
            hub.on_error("a", sphinx_wire::error_report::decode(&[0, i, b'x']));
        }
        let (tx, mut out) = mpsc::channel(16);
        let (stop, shutdown) = watch::channel(false);
        let timing = PumpTiming { keepalive: Duration::from_secs(3600), send_timeout: Duration::from_secs(5) };
        let pump = tokio::spawn(event_pump(rx, tx, timing, shutdown));
        let mut frames = Vec::new();
        for _ in 0..4 {
            let b = tokio::time::timeout(Duration::from_secs(5), out.recv()).await.ok().flatten();
            frames.push(b.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default());
        }
        assert!(frames[0].starts_with(':'), "{frames:?}");
        assert_eq!(frames[1], "event: lagged\ndata: {\"missed\":3}\n\n");
        assert!(frames[2].starts_with("event: signer-error\ndata: {\"node_id\":\"a\",\"seq\":3,"), "{frames:?}");
        assert!(frames[3].contains("\"seq\":4"), "{frames:?}");
        stop.send_replace(true);
        assert!(tokio::time::timeout(Duration::from_secs(5), pump).await.is_ok(), "the pump ends on shutdown");
    }
}
