//! What the broker shows an operator: Prometheus metrics (an explicit `prometheus-client`
//! Registry, as `sphinx-key`'s `observe.rs`) and the recent requests and refusals behind the
//! status page ([`crate::status_page`]).
//!
//! Served as `GET /metrics` by the operator API (bearer token), and by [`serve`] on
//! `metrics_listen` (no token, loopback unless allowed) for a broker without the API.
//!
//! Hook points, none of which waits or holds a lock across an await:
//! - [`crate::relay::RelayHandle::call`]: every request end to end (queueing included), by
//!   hsmd message type and outcome; label values are `&'static str`, so a request allocates
//!   nothing once its series exists;
//! - the relay task: requests in flight, the active signer, reconnects, refusals;
//! - [`CountingAuth`] around [`crate::auth::TokenAuth`]: refused logins by cause;
//! - at scrape time ([`Metrics::encode`]): queue depth, connected signers, chain heights and lag.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;
use sphinx_mqtt_server::{is_loopback, Authenticator};
use sphinx_wire::{error_report, token, unix_now};
use tokio::sync::{watch, Semaphore};

use crate::auth::{LoginError, TokenAuth};
use crate::config::ConfigError;
use crate::hub::SignerHub;
use crate::pin::PinError;
use crate::relay::RelayHandle;

/// Requests kept for the status page's plot.
pub const RECENT_REQUESTS: usize = 300;
/// Refusals kept for the status page.
pub const RECENT_REFUSALS: usize = 20;
/// Longest refusal text kept for the status page, in characters.
pub const MAX_REFUSAL_TEXT: usize = 300;
/// Distinct refusal label sets; further ones are counted under `other` (the policy label comes
/// from the signer's text).
const MAX_REFUSAL_SERIES: usize = 256;
/// Simultaneous connections to [`serve`]; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 8;
/// A client of [`serve`] must send its request headers within this time.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How a request through the relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The signer answered.
    Ok,
    /// The signer refused it (error reply).
    Refused,
    /// No reply within the request bound.
    Timeout,
    /// The relay stopped.
    Stopped,
}

impl Outcome {
    /// Its label value.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
            Outcome::Stopped => "stopped",
        }
    }
}

/// CLN's name of an hsmd message type (`hsmd_wire.csv`), or `""` when this table does not know it.
pub fn msg_name(t: u16) -> &'static str {
    match t {
        1 => "hsmd_ecdh_req",
        2 => "hsmd_cannouncement_sig_req",
        3 => "hsmd_cupdate_sig_req",
        4 => "hsmd_sign_any_cannouncement_req",
        5 => "hsmd_sign_commitment_tx",
        6 => "hsmd_node_announcement_sig_req",
        7 => "hsmd_sign_withdrawal",
        8 => "hsmd_sign_invoice",
        9 => "hsmd_client_hsmfd",
        10 => "hsmd_get_channel_basepoints",
        11 => "hsmd_init",
        12 => "hsmd_sign_delayed_payment_to_us",
        13 => "hsmd_sign_remote_htlc_to_us",
        14 => "hsmd_sign_penalty_to_us",
        16 => "hsmd_sign_local_htlc_tx",
        18 => "hsmd_get_per_commitment_point",
        19 => "hsmd_sign_remote_commitment_tx",
        20 => "hsmd_sign_remote_htlc_tx",
        21 => "hsmd_sign_mutual_close_tx",
        22 => "hsmd_check_future_secret",
        23 => "hsmd_sign_message",
        27 => "hsmd_derive_secret",
        28 => "hsmd_check_pubkey",
        30 => "hsmd_new_channel",
        31 => "hsmd_setup_channel",
        32 => "hsmd_check_outpoint",
        33 => "hsmd_dev_memleak",
        34 => "hsmd_forget_channel",
        35 => "hsmd_validate_commitment_tx",
        36 => "hsmd_validate_revocation",
        37 => "hsmd_lock_outpoint",
        38 => "hsmd_preapprove_invoice",
        39 => "hsmd_preapprove_keysend",
        40 => "hsmd_revoke_commitment_tx",
        51 => "hsmd_preapprove_invoice_check",
        52 => "hsmd_preapprove_keysend_check",
        142 => "hsmd_sign_any_delayed_payment_to_us",
        143 => "hsmd_sign_any_remote_htlc_to_us",
        144 => "hsmd_sign_any_penalty_to_us",
        146 => "hsmd_sign_any_local_htlc_tx",
        _ => "",
    }
}

/// The `msg_type` label: the type number as text for 0..=255 (made once), `other` above.
fn type_label(t: u16) -> &'static str {
    static LABELS: OnceLock<Vec<&'static str>> = OnceLock::new();
    let labels = LABELS.get_or_init(|| (0..256).map(|i| &*Box::leak(i.to_string().into_boxed_str())).collect());
    labels.get(t as usize).copied().unwrap_or("other")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    /// hsmd message type number.
    msg_type: &'static str,
    /// CLN's name for it (empty if unknown).
    name: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    msg_type: &'static str,
    name: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    msg_type: &'static str,
    name: &'static str,
    /// `error_report::classify`'s reason (`policy`, `refused`, `decode`, …).
    reason: &'static str,
    /// The VLS policy that refused, for `reason="policy"`; empty otherwise.
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

/// One request through the relay, for the status page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    /// Running number (the count of requests before it).
    pub id: u64,
    /// When it ended, Unix milliseconds.
    pub time_ms: u64,
    /// hsmd message type.
    pub msg_type: u16,
    /// CLN's name for it ([`msg_name`]).
    pub name: &'static str,
    /// End to end in the broker (queueing included), microseconds.
    pub latency_us: u64,
    /// `ok`, `refused`, `timeout`, `stopped`.
    pub outcome: &'static str,
}

/// One refusal (a signer's error reply), for the status page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefusalRecord {
    /// Unix seconds.
    pub time: u64,
    /// hsmd message type of the refused request.
    pub msg_type: u16,
    /// CLN's name for it.
    pub name: &'static str,
    /// `policy`, `refused`, … ([`error_report::classify`]).
    pub reason: &'static str,
    /// The VLS policy that refused, when the text names one.
    pub policy: Option<String>,
    /// The signer's text, cut at [`MAX_REFUSAL_TEXT`] characters.
    pub text: String,
}

struct Recent {
    requests: VecDeque<RequestRecord>,
    next_id: u64,
    refusals: VecDeque<RefusalRecord>,
    refusals_total: u64,
}

/// The broker's metrics and recent history. One per broker ([`crate::Broker::metrics`]).
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<TypeLabels, Histogram, fn() -> Histogram>,
    queued: Gauge,
    inflight: Gauge,
    signers_connected: Gauge,
    signer_active: Gauge,
    signer_reconnects: Counter,
    failovers: Counter,
    standby: Gauge,
    refusals: Family<RefusalLabels, Counter>,
    refusal_series: AtomicUsize,
    token_refusals: Family<CauseLabels, Counter>,
    chain_signer_height: Gauge,
    chain_bitcoind_height: Gauge,
    chain_lag: Gauge,
    chain_blocks_per_sec: Gauge<f64, std::sync::atomic::AtomicU64>,
    recent: Mutex<Recent>,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~13 s: a relayed request costs ~0.5 ms on loopback, a slow device seconds.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Fresh metrics, every family registered (names prefixed `sphinx_broker_`).
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sphinx_broker");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "hsmd requests relayed to the signer, by message type and outcome (ok, refused, timeout, stopped)",
            requests.clone(),
        );
        let latency = Family::<TypeLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Broker end to end: from a request entering the relay to its reply (or failure), queueing included",
            latency.clone(),
        );
        let queued = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests waiting in the relay's queue, not yet sent to a signer",
            queued.clone(),
        );
        let inflight = Gauge::default();
        registry.register(
            "inflight",
            "Requests sent to the signer (or to be re-sent) and not yet answered",
            inflight.clone(),
        );
        let signers_connected = Gauge::default();
        registry.register("signers_connected", "Signers with a live MQTT session", signers_connected.clone());
        let signer_active = Gauge::default();
        registry.register(
            "signer_active",
            "1 while a signer has said hello and takes requests (the relay's current signer)",
            signer_active.clone(),
        );
        let signer_reconnects = Counter::default();
        registry.register(
            "signer_reconnects",
            "Signer sessions (hello) after the first since the broker started",
            signer_reconnects.clone(),
        );
        let failovers = Counter::default();
        registry.register(
            "failovers",
            "Times a standby signer was brought in to replace the active one (it left or missed the failover bound)",
            failovers.clone(),
        );
        let standby = Gauge::default();
        registry.register(
            "signers_standby",
            "Signers in sync with LSS and ready to take over (standby)",
            standby.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refusals",
            "Signer error replies by message type, reason and (for policy refusals) the VLS policy",
            refusals.clone(),
        );
        let token_refusals = Family::<CauseLabels, Counter>::default();
        registry.register("token_refusals", "Signer logins refused, by cause", token_refusals.clone());
        let chain_signer_height = Gauge::default();
        registry.register(
            "chain_signer_height",
            "Height of the signer's chain tracker tip as the follower last saw it (-1: unknown)",
            chain_signer_height.clone(),
        );
        let chain_bitcoind_height = Gauge::default();
        registry.register(
            "chain_bitcoind_height",
            "bitcoind's best block height as the follower last saw it (-1: unknown)",
            chain_bitcoind_height.clone(),
        );
        let chain_lag = Gauge::default();
        registry.register(
            "chain_lag_blocks",
            "Blocks the signer's tracker is behind bitcoind (-1: unknown)",
            chain_lag.clone(),
        );
        let chain_blocks_per_sec = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "chain_catch_up_blocks_per_second",
            "Blocks added per second during the current catch-up (0 when not catching up)",
            chain_blocks_per_sec.clone(),
        );
        for c in TOKEN_CAUSES {
            token_refusals.get_or_create(&CauseLabels { cause: c }).get();
        }
        Metrics {
            registry,
            requests,
            latency,
            queued,
            inflight,
            signers_connected,
            signer_active,
            signer_reconnects,
            failovers,
            standby,
            refusals,
            refusal_series: AtomicUsize::new(0),
            token_refusals,
            chain_signer_height,
            chain_bitcoind_height,
            chain_lag,
            chain_blocks_per_sec,
            recent: Mutex::new(Recent {
                requests: VecDeque::with_capacity(RECENT_REQUESTS),
                next_id: 0,
                refusals: VecDeque::with_capacity(RECENT_REFUSALS),
                refusals_total: 0,
            }),
        }
    }

    fn recent(&self) -> MutexGuard<'_, Recent> {
        // Every update is one step: the state is consistent even after a panic elsewhere.
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request through the relay ended (called by [`RelayHandle::call`]).
    pub fn request_done(&self, msg_type: u16, outcome: Outcome, elapsed: Duration) {
        let (t, name) = (type_label(msg_type), msg_name(msg_type));
        self.requests.get_or_create(&RequestLabels { msg_type: t, name, outcome: outcome.name() }).inc();
        self.latency.get_or_create(&TypeLabels { msg_type: t, name }).observe(elapsed.as_secs_f64());
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut r = self.recent();
        if r.requests.len() >= RECENT_REQUESTS {
            r.requests.pop_front();
        }
        let id = r.next_id;
        r.next_id += 1;
        r.requests.push_back(RequestRecord {
            id,
            time_ms,
            msg_type,
            name,
            latency_us: elapsed.as_micros().min(u64::MAX as u128) as u64,
            outcome: outcome.name(),
        });
    }

    /// The signer refused a request of `msg_type` with `text` (its error reply).
    pub fn refused(&self, msg_type: u16, text: &str) {
        let (reason, policy) = error_report::classify(text);
        let (t, name) = (type_label(msg_type), msg_name(msg_type));
        let mut labels = RefusalLabels { msg_type: t, name, reason, policy: policy.clone().unwrap_or_default() };
        if self.refusals.get(&labels).is_none()
            && self.refusal_series.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSAL_SERIES
        {
            labels = RefusalLabels { msg_type: "other", name: "", reason: "other", policy: String::new() };
        }
        self.refusals.get_or_create(&labels).inc();
        let mut r = self.recent();
        if r.refusals.len() >= RECENT_REFUSALS {
            r.refusals.pop_front();
        }
        r.refusals_total += 1;
        r.refusals.push_back(RefusalRecord {
            time: unix_now(),
            msg_type,
            name,
            reason,
            policy,
            text: text.chars().take(MAX_REFUSAL_TEXT).collect(),
        });
    }

    /// Requests sent and unanswered (set by the relay task).
    pub fn set_inflight(&self, n: usize) {
        self.inflight.set(n as i64);
    }

    /// Whether the relay has a signer that takes requests.
    pub fn set_signer_active(&self, active: bool) {
        self.signer_active.set(active as i64);
    }

    /// Requests in flight, as last set by the relay.
    pub fn inflight(&self) -> i64 {
        self.inflight.get()
    }

    /// Whether the relay has a signer that takes requests, as last set.
    pub fn signer_active(&self) -> bool {
        self.signer_active.get() != 0
    }

    /// A standby was brought in to replace the active signer.
    pub fn failover(&self) {
        self.failovers.inc();
    }

    /// Failovers so far.
    pub fn failovers(&self) -> u64 {
        self.failovers.get()
    }

    /// Signers on standby (set by the relay task).
    pub fn set_standby(&self, n: usize) {
        self.standby.set(n as i64);
    }

    /// A signer said hello after an earlier session.
    pub fn signer_reconnected(&self) {
        self.signer_reconnects.inc();
    }

    /// A refused signer login.
    pub fn token_refused(&self, e: &LoginError) {
        self.token_refusals.get_or_create(&CauseLabels { cause: token_cause(e) }).inc();
    }

    /// Requests after `after` (a [`RequestRecord::id`]; `None`: all kept), oldest first.
    pub fn requests_since(&self, after: Option<u64>) -> Vec<RequestRecord> {
        let r = self.recent();
        r.requests.iter().filter(|q| after.is_none_or(|a| q.id > a)).copied().collect()
    }

    /// Requests relayed since start (the next [`RequestRecord::id`]).
    pub fn requests_total(&self) -> u64 {
        self.recent().next_id
    }

    /// The recent refusals, oldest first, and how many there were since start.
    pub fn refusals(&self) -> (Vec<RefusalRecord>, u64) {
        let r = self.recent();
        (r.refusals.iter().cloned().collect(), r.refusals_total)
    }

    /// Samples what is read at scrape time, then encodes everything in the OpenMetrics text
    /// format.
    pub fn encode(&self, src: &Sources<'_>) -> String {
        self.queued.set(src.relay.queued() as i64);
        self.signers_connected.set(src.hub.signers().iter().filter(|s| s.connected).count() as i64);
        {
            let chain = src.chain.borrow();
            let signer = chain.signer_tip.map(|t| t.0 as i64).unwrap_or(-1);
            let bitcoind = chain.bitcoind_tip.map(|t| t.0 as i64).unwrap_or(-1);
            self.chain_signer_height.set(signer);
            self.chain_bitcoind_height.set(bitcoind);
            self.chain_lag.set(if signer >= 0 && bitcoind >= 0 { (bitcoind - signer).max(0) } else { -1 });
            self.chain_blocks_per_sec.set(chain.catch_up.as_ref().map(|c| c.blocks_per_sec()).unwrap_or(0.0));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::debug!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// What [`Metrics::encode`] samples at scrape time.
pub struct Sources<'a> {
    /// The relay (queue depth).
    pub relay: &'a RelayHandle,
    /// The signers.
    pub hub: &'a SignerHub,
    /// The chain follower's status.
    pub chain: &'a watch::Receiver<sphinx_chain::FollowerStatus>,
}

/// Every `cause` label of `token_refusals` (created at zero, so a scrape shows them all).
pub const TOKEN_CAUSES: [&str; 16] = [
    "no_username",
    "no_password",
    "token_encoding",
    "token_length",
    "token_signature",
    "token_high_s",
    "token_wrong_key",
    "token_username",
    "token_expired",
    "not_node_id",
    "client_id_of_another_node",
    "not_pinned",
    "replayed",
    "not_after_last_login",
    "last_login_unreadable",
    "record_failed",
];

/// The `cause` of a refused login. Exhaustive on purpose: a new refusal path must get a cause.
fn token_cause(e: &LoginError) -> &'static str {
    match e {
        LoginError::NoUsername => "no_username",
        LoginError::NoPassword => "no_password",
        LoginError::Token(t) => match t {
            token::Error::Encoding => "token_encoding",
            token::Error::Length(_) => "token_length",
            token::Error::Signature => "token_signature",
            token::Error::HighS => "token_high_s",
            token::Error::WrongKey { .. } => "token_wrong_key",
            token::Error::Username(_) => "token_username",
            token::Error::Expired { .. } => "token_expired",
        },
        LoginError::NotNodeId(_) => "not_node_id",
        LoginError::ClientIdOfAnotherNode { .. } => "client_id_of_another_node",
        LoginError::Pin(PinError::Mismatch { .. }) => "not_pinned",
        // The pin file could not be read: the login is refused for the broker's sake.
        LoginError::Pin(PinError::Io { .. } | PinError::Corrupt(_)) => "record_failed",
        LoginError::Replayed => "replayed",
        LoginError::NotAfterLastLogin { .. } => "not_after_last_login",
        LoginError::LastLoginUnreadable { .. } => "last_login_unreadable",
        LoginError::Record { .. } => "record_failed",
    }
}

/// [`TokenAuth`] with its refusals counted: wraps the login policy instead of editing each of
/// its refusal paths, so a cause is counted wherever the refusal comes from.
pub struct CountingAuth {
    inner: TokenAuth,
    metrics: Arc<Metrics>,
}

impl CountingAuth {
    /// Counts `inner`'s refusals in `metrics`.
    pub fn new(inner: TokenAuth, metrics: Arc<Metrics>) -> CountingAuth {
        CountingAuth { inner, metrics }
    }
}

impl Authenticator for CountingAuth {
    type Error = LoginError;

    fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<String, LoginError> {
        self.inner.authenticate(client_id, username, password).inspect_err(|e| self.metrics.token_refused(e))
    }
}

// ---------------------------------------------------------------------------------------------
// metrics_listen: /metrics without the API

/// The `metrics_listen` server; dropping it stops it (the listener closes).
pub struct MetricsServer {
    local_addr: SocketAddr,
    _stop: watch::Sender<bool>,
}

impl MetricsServer {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Binds `addr` (loopback unless `allow_non_loopback`) and serves `GET /metrics` there, without
/// a token: for a broker whose API is off.
pub async fn serve(
    addr: SocketAddr,
    allow_non_loopback: bool,
    metrics: Arc<Metrics>,
    relay: RelayHandle,
    hub: Arc<SignerHub>,
    chain: watch::Receiver<sphinx_chain::FollowerStatus>,
) -> anyhow::Result<MetricsServer> {
    let (stop, mut shutdown) = watch::channel(false);
    if !is_loopback(addr.ip()) && !allow_non_loopback {
        return Err(ConfigError::Invalid(
            "metrics_listen",
            format!(
                "{addr} is not a loopback address: use 127.0.0.1/::1, or set metrics_allow_non_loopback = true to \
                 serve the metrics (without a token) on the network"
            ),
        )
        .into());
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for metrics: {e}"))?;
    let local = listener.local_addr()?;
    if !is_loopback(local.ip()) {
        tracing::warn!(listen = %local, "metrics on a non-loopback address (explicitly allowed): anyone who reaches it can read them");
    }
    tracing::info!(listen = %local, "metrics on http://{local}/metrics");
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = conns.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = shutdown.changed() => return,
            };
            let stream = tokio::select! {
                a = listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::debug!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let (metrics, relay, hub, chain) = (metrics.clone(), relay.clone(), hub.clone(), chain.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let body = if req.method() != Method::GET && req.method() != Method::HEAD {
                        Err(StatusCode::METHOD_NOT_ALLOWED)
                    } else if req.uri().path() != "/metrics" {
                        Err(StatusCode::NOT_FOUND)
                    } else {
                        Ok(metrics.encode(&Sources { relay: &relay, hub: &hub, chain: &chain }))
                    };
                    async move { Ok::<_, Infallible>(text_response(body)) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(READ_TIMEOUT)
                    .max_buf_size(16 * 1024)
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                }
            });
        }
    });
    Ok(MetricsServer { local_addr: local, _stop: stop })
}

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn text_response(body: Result<String, StatusCode>) -> Response<Full<Bytes>> {
    let (status, ct, body) = match body {
        Ok(b) => (StatusCode::OK, CONTENT_TYPE, b),
        Err(s) => (s, "text/plain; charset=utf-8", format!("{}\n", s.canonical_reason().unwrap_or("error"))),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_refusals_are_counted_and_kept() {
        let m = Metrics::new();
        m.request_done(19, Outcome::Ok, Duration::from_micros(700));
        m.request_done(19, Outcome::Refused, Duration::from_millis(2));
        m.request_done(60000, Outcome::Timeout, Duration::from_secs(1));
        m.refused(
            19,
            "VLS refused hsmd message type 19 (SignRemoteCommitmentTx): FailedPrecondition: policy failure: \
             validate_counterparty_commitment_tx: validate_commitment_tx: sum of HTLC values 50000 too large",
        );
        let text = {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
            out
        };
        for line in [
            "sphinx_broker_requests_total{msg_type=\"19\",name=\"hsmd_sign_remote_commitment_tx\",outcome=\"ok\"} 1",
            "sphinx_broker_requests_total{msg_type=\"other\",name=\"\",outcome=\"timeout\"} 1",
            "sphinx_broker_request_duration_seconds_count{msg_type=\"19\",name=\"hsmd_sign_remote_commitment_tx\"} 2",
            "sphinx_broker_refusals_total{msg_type=\"19\",name=\"hsmd_sign_remote_commitment_tx\",reason=\"policy\",policy=\"validate_commitment_tx\"} 1",
            "sphinx_broker_token_refusals_total{cause=\"replayed\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        let recent = m.requests_since(Some(0));
        assert_eq!(recent.iter().map(|q| q.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(recent[0].latency_us, 2000);
        assert_eq!(m.requests_total(), 3);
        let (refusals, total) = m.refusals();
        assert_eq!((refusals[0].policy.as_deref(), total), (Some("validate_commitment_tx"), 1));
    }

    #[test]
    fn history_and_refusal_series_are_bounded() {
        let m = Metrics::new();
        for _ in 0..RECENT_REQUESTS + 5 {
            m.request_done(1, Outcome::Ok, Duration::ZERO);
        }
        assert_eq!(m.requests_since(None).len(), RECENT_REQUESTS);
        assert_eq!(m.requests_since(None)[0].id, 5);
        for i in 0..MAX_REFUSAL_SERIES + 10 {
            m.refused(1, &format!("VLS refused x: policy-p{i}"));
        }
        assert_eq!(m.refusals().0.len(), RECENT_REFUSALS);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        let n = out.lines().filter(|l| l.starts_with("sphinx_broker_refusals_total{")).count();
        assert_eq!(n, MAX_REFUSAL_SERIES + 1, "{out}");
    }
}
