//! What the device shows an operator: Prometheus metrics (an explicit `prometheus-client`
//! Registry) and the snapshot behind the status page, both served by [`crate::web`].
//!
//! The signing loop (`client.rs`) has no metrics code. It reports every state change to its
//! status indicator and every failure to the log; the observer takes both:
//! - [`Observed`] wraps the status indicator: a request is the time from `signing` to the next
//!   state (`connected`: answered; `error`: failed; anything else: the reply was not sent), a new
//!   session is `connected` after a disconnected state;
//! - [`Layer`] is a `tracing` layer that sees warnings and errors: the last one for the status
//!   page, and for a failed request, its kind and the VLS policy that refused it, read from the
//!   signer's error text (`VLS refused hsmd message type 19 (...): ... policy-...`).

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;
use sphinx_signer::{Status, StatusIndicator};
use sphinx_wire::unix_now;

/// Longest error text kept for the status page.
const MAX_ERROR_TEXT: usize = 512;
/// Distinct failure label pairs kept; further ones are counted under `other`.
const MAX_FAILURE_SERIES: usize = 256;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    /// hsmd message name (`SignWithdrawal`), or `unknown`.
    msg_type: String,
    /// `policy` (a VLS policy refusal), `refused` (another VLS refusal), or the kind of failure
    /// (`decode`, `persist`, …).
    reason: String,
    /// For a policy refusal: the VLS policy tag if the text names one (`policy-…`), else the
    /// innermost VLS check that refused (`validate_commitment_tx`); empty otherwise.
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    node_id: String,
    version: &'static str,
}

/// The last warning or error, for the status page.
#[derive(Clone, Debug, Serialize)]
pub struct LastError {
    /// UNIX seconds.
    pub at: u64,
    /// `LEVEL target: message key=value …`.
    pub text: String,
}

/// What the status page shows (`GET /status.json`).
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// The node id (hex), once the signer is open.
    pub node_id: Option<String>,
    /// Bitcoin network.
    pub network: String,
    /// `sphinx-key` version.
    pub version: &'static str,
    /// Current state (`connected`, `signing`, …).
    pub state: &'static str,
    /// True while a broker session is up.
    pub connected: bool,
    /// UNIX seconds of the last state change.
    pub state_since: u64,
    /// UNIX seconds the process started.
    pub started: u64,
    /// Requests answered.
    pub requests_ok: u64,
    /// Requests that failed (refused, undecodable, …).
    pub requests_failed: u64,
    /// Requests whose reply could not be sent (the connection dropped).
    pub requests_unsent: u64,
    /// Duration of the last request, milliseconds.
    pub last_request_ms: Option<f64>,
    /// Broker sessions established.
    pub sessions: u64,
    /// Broker sessions after the first.
    pub reconnects: u64,
    /// The last warning or error logged.
    pub last_error: Option<LastError>,
    /// LSS backup: `off` (no broker dance yet), `unsynced` (a new broker session has not synced
    /// it), `syncing`, `synced` or `stale`.
    pub lss: &'static str,
    #[serde(skip)]
    failure_series: usize,
}

/// The device's metrics and status; shared by the indicator wrapper, the log layer and the
/// HTTP server.
pub struct Observer {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    duration: Histogram,
    failures: Family<FailureLabels, Counter>,
    reconnects: Counter,
    connected: Gauge,
    state: Family<StateLabels, Gauge>,
    login_refusals: Counter,
    info: Family<InfoLabels, Gauge>,
    lss_synced: Gauge,
    snapshot: Mutex<Snapshot>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer").finish_non_exhaustive()
    }
}

impl Observer {
    /// A fresh observer for a device on `network`.
    pub fn new(network: &str) -> Arc<Observer> {
        let mut registry = Registry::with_prefix("sphinx_key");
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "requests",
            "hsmd requests handled, by outcome (ok: answered; failed: refused or invalid; unsent: the reply could not be sent)",
            requests.clone(),
        );
        // 100 µs .. ~3.3 s: in-process VLS calls take 0.04-0.1 ms, a commit adds an fsync.
        let duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to having its reply (VLS, state commit, fsync) ready to send",
            duration.clone(),
        );
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "request_failures",
            "Failed requests by hsmd message and reason (the VLS policy name for a policy refusal)",
            failures.clone(),
        );
        let reconnects = Counter::default();
        registry.register("reconnects", "Broker sessions established after the first", reconnects.clone());
        let connected = Gauge::default();
        registry.register("connected", "1 while a broker session is up", connected.clone());
        let state = Family::<StateLabels, Gauge>::default();
        registry.register("state", "1 for the device's current state", state.clone());
        for s in Status::ALL {
            state.get_or_create(&StateLabels { state: s.name() }).set(0);
        }
        state.get_or_create(&StateLabels { state: Status::Starting.name() }).set(1);
        let login_refusals = Counter::default();
        registry.register(
            "login_refusals",
            "Logins the broker refused (token, clock or node id)",
            login_refusals.clone(),
        );
        let lss_synced = Gauge::default();
        registry.register(
            "lss_synced",
            "1 while the device's state is in sync with LSS (every reply backed up first)",
            lss_synced.clone(),
        );
        let info = Family::<InfoLabels, Gauge>::default();
        registry.register("device", "The node id and version of this device (value 1)", info.clone());
        for outcome in ["ok", "failed", "unsent"] {
            requests.get_or_create(&OutcomeLabels { outcome }).get();
        }
        let now = unix_now();
        Arc::new(Observer {
            registry,
            requests,
            duration,
            failures,
            reconnects,
            connected,
            state,
            login_refusals,
            info,
            lss_synced,
            snapshot: Mutex::new(Snapshot {
                node_id: None,
                network: network.to_string(),
                version: env!("CARGO_PKG_VERSION"),
                state: Status::Starting.name(),
                connected: false,
                state_since: now,
                started: now,
                requests_ok: 0,
                requests_failed: 0,
                requests_unsent: 0,
                last_request_ms: None,
                sessions: 0,
                reconnects: 0,
                last_error: None,
                lss: "off",
                failure_series: 0,
            }),
        })
    }

    fn snap(&self) -> MutexGuard<'_, Snapshot> {
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the node id once the signer is open.
    pub fn set_node_id(&self, node_id: &str) {
        self.info
            .get_or_create(&InfoLabels { node_id: node_id.to_string(), version: env!("CARGO_PKG_VERSION") })
            .set(1);
        self.snap().node_id = Some(node_id.to_string());
    }

    /// Records where the signer is with LSS (`None`: the broker never started the dance).
    pub fn set_lss(&self, phase: Option<sphinx_signer::LssPhase>) {
        use sphinx_signer::LssPhase;
        let name = match phase {
            None => "off",
            Some(LssPhase::Identified) => "syncing",
            Some(LssPhase::Synced) => "synced",
            Some(LssPhase::Stale) => "stale",
            Some(LssPhase::Unsynced) => "unsynced",
        };
        self.lss_synced.set((phase == Some(LssPhase::Synced)) as i64);
        self.snap().lss = name;
    }

    /// The status page's data.
    pub fn snapshot(&self) -> Snapshot {
        self.snap().clone()
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::debug!(error = %e, "cannot encode metrics");
        }
        out
    }

    fn request_done(&self, outcome: &'static str, secs: f64) {
        self.requests.get_or_create(&OutcomeLabels { outcome }).inc();
        self.duration.observe(secs);
        let mut s = self.snap();
        match outcome {
            "ok" => s.requests_ok += 1,
            "failed" => s.requests_failed += 1,
            _ => s.requests_unsent += 1,
        }
        s.last_request_ms = Some(secs * 1000.0);
    }

    fn state_changed(&self, from: Option<Status>, to: Status, new_session: bool) {
        if let Some(f) = from {
            self.state.get_or_create(&StateLabels { state: f.name() }).set(0);
        }
        self.state.get_or_create(&StateLabels { state: to.name() }).set(1);
        let up = matches!(to, Status::Connected | Status::Signing | Status::Error);
        self.connected.set(up as i64);
        let mut s = self.snap();
        if new_session {
            if s.sessions > 0 {
                self.reconnects.inc();
                s.reconnects += 1;
            }
            s.sessions += 1;
        }
        s.state = to.name();
        s.connected = up;
        s.state_since = unix_now();
    }

    /// A failed request, as the signer's error text describes it.
    fn request_failed(&self, text: &str) {
        let (msg_type, reason, policy) = classify(text);
        let mut labels = FailureLabels { msg_type, reason: reason.into(), policy };
        // Label values come from our own signer's texts, but bound the series anyway.
        let mut s = self.snap();
        if self.failures.get(&labels).is_none() {
            if s.failure_series >= MAX_FAILURE_SERIES {
                labels = FailureLabels { msg_type: "other".into(), reason: "other".into(), policy: String::new() };
            } else {
                s.failure_series += 1;
            }
        }
        drop(s);
        self.failures.get_or_create(&labels).inc();
    }

    fn logged(&self, level: tracing::Level, target: &str, text: String) {
        if target == "sphinx_key::client" && text.starts_with("broker refused the login") {
            self.login_refusals.inc();
        }
        let mut text = format!("{level} {target}: {text}");
        if text.len() > MAX_ERROR_TEXT {
            let mut cut = MAX_ERROR_TEXT;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        self.snap().last_error = Some(LastError { at: unix_now(), text });
    }
}

/// `(message name, reason, policy)` of a signer error text (`sphinx_signer::Error`'s Display).
fn classify(text: &str) -> (String, &'static str, String) {
    let msg_type = text
        .split_once("hsmd message type ")
        .and_then(|(_, rest)| {
            let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit()).strip_prefix(" (")?;
            rest.split_once(')').map(|(name, _)| name.to_string())
        })
        .filter(|n| !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or_else(|| "unknown".into());
    // The reason and policy are classified in sphinx-wire, shared with the broker's metrics.
    let (reason, policy) = sphinx_wire::error_report::classify(text);
    (msg_type, reason, policy.unwrap_or_default())
}

/// The status indicator wrapper: forwards every state to the real indicator and derives the
/// request and connection metrics from the sequence of states.
pub struct Observed {
    inner: Box<dyn StatusIndicator>,
    obs: Arc<Observer>,
    last: Option<Status>,
    signing_since: Option<Instant>,
}

impl Observed {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn StatusIndicator>, obs: Arc<Observer>) -> Observed {
        Observed { inner, obs, last: None, signing_since: None }
    }
}

impl StatusIndicator for Observed {
    fn set(&mut self, s: Status) {
        self.inner.set(s);
        if let Some(t0) = self.signing_since.take() {
            let outcome = match s {
                Status::Connected => "ok",
                Status::Error => "failed",
                _ => "unsent",
            };
            self.obs.request_done(outcome, t0.elapsed().as_secs_f64());
        }
        if s == Status::Signing {
            self.signing_since = Some(Instant::now());
        }
        if self.last == Some(s) {
            return;
        }
        let new_session =
            s == Status::Connected && !matches!(self.last, Some(Status::Connected | Status::Signing | Status::Error));
        self.obs.state_changed(self.last, s, new_session);
        self.last = Some(s);
    }
}

/// The `tracing` layer that hands warnings and errors to the observer.
pub struct Layer(pub Arc<Observer>);

/// Formats an event's fields as `message key=value …`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
    error: Option<String>,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "error" {
            self.error = Some(value.to_string());
        }
        self.record_debug(field, &value)
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            if field.name() == "error" && self.error.is_none() {
                // `error = %e` arrives as a Display wrapper: its Debug is the Display text.
                self.error = Some(format!("{value:?}"));
            }
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Layer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() > tracing::Level::WARN {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        if meta.target() == "sphinx_key::client" && f.message == "request failed" {
            if let Some(e) = &f.error {
                self.0.request_failed(e);
            }
        }
        self.0.logged(*meta.level(), meta.target(), format!("{}{}", f.message, f.rest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sphinx_wire::error_report::policy_name;

    #[test]
    fn failure_texts_are_classified() {
        let c = |t: &str| {
            let (m, r, p) = classify(t);
            (m, r.to_string(), p)
        };
        let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
        // As VLS 1.0.0-rc.1 words it (seen end to end: tests/metrics_e2e.rs).
        assert_eq!(
            c("VLS refused hsmd message type 19 (SignRemoteCommitmentTx): FailedPrecondition: policy failure: \
               validate_counterparty_commitment_tx: validate_commitment_tx: sum of HTLC values 50000 too large"),
            s("SignRemoteCommitmentTx", "policy", "validate_commitment_tx")
        );
        assert_eq!(
            c("VLS refused hsmd message type 14 (SignPenaltyToUs): FailedPrecondition: policy failure: \
               validate_justice_sweep: policy-sweep-fee-range: feerate below minimum: 226 < 253"),
            s("SignPenaltyToUs", "policy", "policy-sweep-fee-range")
        );
        assert_eq!(c("VLS refused hsmd message type 7 (SignInvoice): protocol: x"), s("SignInvoice", "refused", ""));
        assert_eq!(c("cannot decode hsmd message type 1 (Ecdh): short"), s("Ecdh", "decode", ""));
        assert_eq!(c("hsmd message type 23 (SignMessage) before hsmd_init"), s("SignMessage", "not_initialized", ""));
        assert_eq!(
            c("hsmd message type 9 is answered by the broker, not the signer"),
            s("unknown", "not_for_signer", "")
        );
        assert_eq!(c("bad request frame: too short"), s("unknown", "bad_frame", ""));
        assert_eq!(c("persisting signer state failed: disk full"), s("unknown", "persist", ""));
        assert_eq!(
            c("VLS failed on hsmd message type 5 (SignTx): boom (state reloaded)"),
            s("SignTx", "vls_panic", "")
        );
        assert_eq!(c("something new"), s("unknown", "other", ""));
        assert_eq!(c("hsmd message type 5 (bad name!) before hsmd_init").0, "unknown");
        assert_eq!(policy_name("VLS refused x policy-"), None);
        assert_eq!(policy_name("policy failure: Not An Ident: x"), None);
    }

    #[test]
    fn states_make_requests_and_sessions() {
        let obs = Observer::new("regtest");
        let mut ind = Observed::new(Box::new(sphinx_signer::NoIndicator), obs.clone());
        use Status::*;
        for s in [Starting, ConnectingToBroker, Connected, Signing, Connected, Signing, Error, Signing, Connected] {
            ind.set(s);
        }
        // The reply of this one is not sent: the connection drops.
        for s in [Signing, ConnectingToBroker, ConnectingToBroker, NoNetwork, ConnectingToBroker, Connected] {
            ind.set(s);
        }
        let snap = obs.snapshot();
        assert_eq!((snap.requests_ok, snap.requests_failed, snap.requests_unsent), (2, 1, 1));
        assert_eq!((snap.reconnects, snap.state, snap.connected), (1, "connected", true));
        let text = obs.encode();
        for line in [
            "sphinx_key_requests_total{outcome=\"ok\"} 2",
            "sphinx_key_requests_total{outcome=\"failed\"} 1",
            "sphinx_key_requests_total{outcome=\"unsent\"} 1",
            "sphinx_key_request_duration_seconds_count 4",
            "sphinx_key_reconnects_total 1",
            "sphinx_key_connected 1",
            "sphinx_key_state{state=\"connected\"} 1",
            "sphinx_key_state{state=\"no-network\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        ind.set(NoNetwork);
        assert!(obs.encode().lines().any(|l| l == "sphinx_key_connected 0"));
    }

    #[test]
    fn log_layer_records_failures_and_the_last_error() {
        use tracing_subscriber::layer::SubscriberExt;
        let obs = Observer::new("regtest");
        let sub = tracing_subscriber::registry().with(Layer(obs.clone()));
        tracing::subscriber::with_default(sub, || {
            let e =
                "VLS refused hsmd message type 19 (SignRemoteCommitmentTx): policy-commitment-htlc-inflight-limit: x";
            tracing::warn!(target: "sphinx_key::client", seq = 4, error = %e, "request failed");
            tracing::info!(target: "sphinx_key::client", "not an error");
            tracing::error!(target: "sphinx_key::client", code = 5, "broker refused the login (token)");
        });
        let text = obs.encode();
        let want = "sphinx_key_request_failures_total{msg_type=\"SignRemoteCommitmentTx\",reason=\"policy\",\
                    policy=\"policy-commitment-htlc-inflight-limit\"} 1";
        assert!(text.lines().any(|l| l == want), "{text}");
        assert!(text.lines().any(|l| l == "sphinx_key_login_refusals_total 1"), "{text}");
        let last = obs.snapshot().last_error.unwrap();
        assert!(last.text.starts_with("ERROR sphinx_key::client: broker refused the login"), "{}", last.text);
        assert!(last.text.contains("code=5"), "{}", last.text);
    }

    #[test]
    fn failure_series_are_bounded() {
        let obs = Observer::new("regtest");
        for i in 0..MAX_FAILURE_SERIES + 10 {
            obs.request_failed(&format!("VLS refused hsmd message type 1 (T{i}): x"));
        }
        let text = obs.encode();
        let n = text.lines().filter(|l| l.starts_with("sphinx_key_request_failures_total{")).count();
        assert_eq!(n, MAX_FAILURE_SERIES + 1);
        assert!(text.contains("sphinx_key_request_failures_total{msg_type=\"other\",reason=\"other\",policy=\"\"} 10"));
    }
}
