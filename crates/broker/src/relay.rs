//! The request path from CLN's connections to the signer and back.
//!
//! One task owns all state (the event loop is explicit): requests come in through a bounded
//! queue, each gets a sequence number, goes out as a serial frame to `{signer}/vls`, and is
//! completed by the `vls-res` reply with the same number. While no signer is connected the
//! queue is not drained, so requests wait in order and callers feel back-pressure.
//!
//! Requests sent but not answered stay in flight across signer disconnects and are sent again,
//! in their original order, when a signer says `hello`; before them the broker replays
//! lightningd's `hsmd_init` ([`crate::init`]), so a restarted signer is initialised exactly as
//! lightningd initialised it. The signer answers a repeated delivery from its reply log, without
//! signing twice.
//!
//! Several signers of one node (distinct MQTT identities, one node key) may be connected; one
//! is **active** and gets the requests. Without LSS a second one is refused (it could not
//! share the active one's state). With LSS every signer that says hello is brought in sync
//! (the init dance) and becomes active if none is, else **standby**. When the active one
//! disconnects, or the oldest request sent to it waited longer than
//! [`RelayConfig::failover`] while a standby is in sync, the active one is fenced (its
//! replies, errors and `lss-res` are ignored from then on, and it is disconnected), a standby
//! is danced again and made active, and the requests in flight are re-sent to it in their
//! original order with their original sequence numbers (docs/signer.md "Several signers").
//!
//! What goes to signers goes through a [`SignerLink`] (the embedded MQTT server,
//! [`crate::mqtt_link`]); what they say arrives as [`LinkEvent`]s.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use sphinx_mqtt_server::MqttError;
use sphinx_wire::serial::{encode_request, Reply};
use sphinx_wire::{error_report, hsmd, topics, ClientContext};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::config::ConfigError;
use crate::hub::{Role, SignerHub};
use crate::init::{self, InitReplay};
use crate::lss_link::{LssEvent, LssRelay, Next};
use crate::metrics::{Metrics, Outcome};
use crate::pin::PinStore;

/// Why a request got no reply.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RelayError {
    /// The signer refused the request (policy violation or a bad request).
    #[error("signer refused the request: {0}")]
    Refused(String),
    /// No reply within the configured bound.
    #[error("no reply from the signer within {0:?}")]
    Timeout(Duration),
    /// The relay has shut down.
    #[error("relay stopped")]
    Stopped,
}

/// What the relay sends towards signers (the embedded MQTT server in production). Neither
/// method waits: a publish is queued for the subscriber or fails at once.
pub trait SignerLink: Send + Sync + 'static {
    /// Publishes `payload` on `topic` to whoever subscribed (nobody subscribed is not an error).
    /// `Bytes`: a request frame kept for re-sending is shared with the publish, not copied.
    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PublishError>;
    /// Drops a signer's connection.
    fn disconnect(&self, identity: &str);
}

/// Why [`SignerLink::publish`] failed (the request stays in flight and is sent again on the next
/// `hello`).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The MQTT server refused the message.
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    /// The link is gone.
    #[error("signer link closed")]
    Closed,
}

/// What signers say, as the relay needs it.
#[derive(Debug)]
pub enum LinkEvent {
    /// A signer whose identity is its node id (a legacy client id) subscribed and announced
    /// itself (`{id}/hello`).
    Hello(String),
    /// A signer subscribed and announced itself (`{id}/hello`); it logged in with the node key
    /// `node_id`.
    HelloAs {
        /// Its MQTT identity (client id, the topic prefix).
        id: String,
        /// The node id it logged in with (hex).
        node_id: String,
        /// Its hello announced [`error_report::SEQ_ERRORS`]; else (upstream's signer) its
        /// error reports are text only.
        seq_errors: bool,
    },
    /// A signer's connection ended.
    Gone(String),
    /// A `{id}/vls-res` payload (the MQTT payload's buffer: the reply's message is handed on
    /// as a slice of it).
    Reply(String, Bytes),
    /// A `{id}/error` payload: `seq u16 BE | utf8 text`, or the text alone from a signer whose
    /// hello did not announce [`error_report::SEQ_ERRORS`].
    Error(String, Vec<u8>),
    /// An LSS message from a signer: `(id, topic suffix, payload)` on `init-1-res`,
    /// `init-2-res`, `init-3-res`, `lss-res` or `lss-conflict-res` ([`crate::lss_link`]).
    Lss(String, String, Vec<u8>),
}

/// The request path's settings: the `[relay]` table of the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Requests that may wait for a signer before callers are pushed back. Default 1000.
    pub queue_capacity: usize,
    /// Requests sent to the signer and not yet answered, at most (1..=30000, the u16 sequence
    /// space). Default 64.
    pub max_inflight: usize,
    /// Longest a request may wait for its reply, queueing included (file:
    /// `request_timeout_secs`; `SPHINX_BROKER_REQUEST_TIMEOUT`, `--request-timeout`). Default 600 s.
    #[serde(rename = "request_timeout_secs", deserialize_with = "crate::config::secs")]
    pub request_timeout: Duration,
    /// With LSS and a standby in sync: the longest the oldest request sent to the active
    /// signer may wait for its answer before the standby takes over (file: `failover_secs`;
    /// `SPHINX_BROKER_FAILOVER`, `--failover`). Default 10 s.
    #[serde(rename = "failover_secs", deserialize_with = "crate::config::secs")]
    pub failover: Duration,
    /// How often to log that requests are waiting for a signer. Not a file key. Default 10 s.
    #[serde(skip)]
    pub waiting_log_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            queue_capacity: 1000,
            max_inflight: 64,
            request_timeout: Duration::from_secs(600),
            failover: Duration::from_secs(10),
            waiting_log_interval: Duration::from_secs(10),
        }
    }
}

impl RelayConfig {
    /// Rejects values the relay cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.queue_capacity == 0 {
            return Err(ConfigError::Invalid("relay.queue_capacity", "must be at least 1".into()));
        }
        if self.max_inflight == 0 || self.max_inflight > 30000 {
            return Err(ConfigError::Invalid("relay.max_inflight", "must be 1..=30000 (u16 sequence space)".into()));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::Invalid("relay.request_timeout_secs", "must be positive".into()));
        }
        if self.failover.is_zero() {
            return Err(ConfigError::Invalid("relay.failover_secs", "must be positive".into()));
        }
        Ok(())
    }
}

/// The sequence number of every init-3 frame (see [`init_frame`]).
const INIT_3_SEQ: u16 = 0;

/// lightningd's `hsmd_init` (`init`) as the init-3 request frame of a dance, unless it is itself
/// still in flight (then it is re-sent as it is). Sequence number 0, as upstream frames it, and
/// none taken from the relay's counter: the dance matches its reply by topic (`init-3-res`), and
/// upstream's vls-mqtt refuses `vls` frames whose numbers are not consecutive, so neither a dance
/// nor an LSS `Put` may leave a gap in the numbers the active signer sees.
fn init_frame(inflight: &VecDeque<Pending>, init: &InitReplay) -> Option<Vec<u8>> {
    if inflight.iter().any(|p| p.kind == Kind::Cln && p.msg_type == hsmd::HSMD_INIT) {
        return None;
    }
    Some(encode_request(INIT_3_SEQ, &[0; 33], 0, init.message()?))
}

struct Job {
    ctx: ClientContext,
    msg: Bytes,
    reply: oneshot::Sender<Result<Bytes, RelayError>>,
}

/// The callers' side of the relay: cheap to clone, one per CLN connection.
#[derive(Clone)]
pub struct RelayHandle {
    jobs: mpsc::Sender<Job>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl RelayHandle {
    /// Sends one hsmd request (type + body) with its connection's context and waits for the
    /// reply (type + body). Both are `Bytes` so that nothing on the way copies them: the caller
    /// may keep the request (a `Vec` converts without a copy), and the reply is a slice of the
    /// signer's MQTT payload.
    pub async fn call(&self, ctx: ClientContext, msg: impl Into<Bytes>) -> Result<Bytes, RelayError> {
        let msg = msg.into();
        let started = Instant::now();
        let msg_type = hsmd::msg_type(&msg).unwrap_or(0);
        let (tx, rx) = oneshot::channel();
        let job = Job { ctx, msg, reply: tx };
        let fut = async {
            self.jobs.send(job).await.map_err(|_| RelayError::Stopped)?;
            rx.await.map_err(|_| RelayError::Stopped)?
        };
        let r = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(RelayError::Timeout(self.timeout)),
        };
        let outcome = match &r {
            Ok(_) => Outcome::Ok,
            Err(RelayError::Refused(_)) => Outcome::Refused,
            Err(RelayError::Timeout(_)) => Outcome::Timeout,
            Err(RelayError::Stopped) => Outcome::Stopped,
        };
        self.metrics.request_done(msg_type, outcome, started.elapsed());
        r
    }

    /// The metrics this relay reports into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Requests queued and not yet sent to a signer.
    pub fn queued(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }
}

/// Chain following (crate `sphinx-chain`) sends its messages as lightningd's root requests, so
/// they queue with CLN's in the same FIFO (docs/chain.md, fairness).
impl sphinx_chain::ChainLink for RelayHandle {
    type Error = RelayError;

    fn request(&self, msg: Vec<u8>) -> impl Future<Output = Result<Vec<u8>, RelayError>> + Send {
        let call = self.call(ClientContext::ROOT, msg);
        async move { call.await.map(Vec::from) }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// A request from CLN; its reply goes back to the caller.
    Cln,
    /// lightningd's `hsmd_init`, replayed to a (re)connected signer; the reply is only checked.
    InitReplay,
}

struct Pending {
    seq: u16,
    /// The request frame, shared by every publish of it (first send and re-sends).
    frame: Bytes,
    kind: Kind,
    msg_type: u16,
    reply: Option<oneshot::Sender<Result<Bytes, RelayError>>>,
    /// When it was last sent to the active signer (for the failover bound).
    sent_at: Instant,
}

/// A signer that said hello on its current session.
struct Member {
    /// The node key it logged in with.
    node: String,
    role: Role,
    /// Its error reports carry the sequence number ([`error_report::SEQ_ERRORS`]).
    seq_errors: bool,
}

/// Starts the relay task. `events` carries what signers say; `link` carries what we say to them.
/// Its metrics are its own ([`RelayHandle::metrics`]); see [`spawn_with`].
pub fn spawn(
    cfg: RelayConfig,
    link: Arc<dyn SignerLink>,
    events: mpsc::Receiver<LinkEvent>,
    pin: Arc<PinStore>,
) -> RelayHandle {
    spawn_with(cfg, link, events, pin, Arc::new(Metrics::new()), None)
}

/// [`spawn_with`], showing each signer's role in `hub` (the operator API's view).
pub fn spawn_with_hub(
    cfg: RelayConfig,
    link: Arc<dyn SignerLink>,
    events: mpsc::Receiver<LinkEvent>,
    pin: Arc<PinStore>,
    metrics: Arc<Metrics>,
    lss: Option<LssRelay>,
    hub: Option<Arc<SignerHub>>,
) -> RelayHandle {
    let (jobs_tx, jobs_rx) = mpsc::channel(cfg.queue_capacity);
    let handle = RelayHandle { jobs: jobs_tx.clone(), timeout: cfg.request_timeout, metrics: metrics.clone() };
    let relay = Relay {
        cfg,
        link,
        pin,
        metrics,
        sessions: 0,
        signer: None,
        vls_topic: String::new(),
        unanswered: None,
        members: std::collections::BTreeMap::new(),
        candidate: None,
        hub,
        init: InitReplay::default(),
        next_seq: 0,
        inflight: VecDeque::new(),
        jobs_probe: jobs_tx.downgrade(),
        lss,
    };
    tokio::spawn(relay.run(jobs_rx, events));
    handle
}

/// [`spawn`], reporting into `metrics` (the broker's, served on `/metrics`), and with LSS backup
/// when `lss` is given (a signer is ready only once in sync with LSS).
pub fn spawn_with(
    cfg: RelayConfig,
    link: Arc<dyn SignerLink>,
    events: mpsc::Receiver<LinkEvent>,
    pin: Arc<PinStore>,
    metrics: Arc<Metrics>,
    lss: Option<LssRelay>,
) -> RelayHandle {
    let hub = lss.as_ref().map(|l| l.hub().clone());
    spawn_with_hub(cfg, link, events, pin, metrics, lss, hub)
}

struct Relay {
    cfg: RelayConfig,
    link: Arc<dyn SignerLink>,
    pin: Arc<PinStore>,
    metrics: Arc<Metrics>,
    /// Hellos accepted since start (the ones after the first are reconnects).
    sessions: u64,
    /// The active signer's identity, while it takes requests (said hello and, with LSS, is in
    /// sync).
    signer: Option<String>,
    /// `{signer}/vls` for the active signer (set with it): not formatted per request.
    vls_topic: String,
    /// For an active signer whose error reports are text only (upstream's): the sequence
    /// numbers sent to it on this session and not yet answered, oldest first. It answers one
    /// frame at a time, in order, so a report without a number is for the oldest of them.
    unanswered: Option<VecDeque<u16>>,
    /// Every signer that said hello on its current session, by identity.
    members: std::collections::BTreeMap<String, Member>,
    /// With LSS: the signer whose running dance makes it the active one when it completes.
    candidate: Option<String>,
    /// Where roles are shown (the operator API), if anywhere.
    hub: Option<Arc<SignerHub>>,
    /// lightningd's `hsmd_init`, replayed to every signer that connects after it.
    init: InitReplay,
    next_seq: u16,
    /// Sent (or to be re-sent) and unanswered, in dispatch order.
    inflight: VecDeque<Pending>,
    /// To read the queue length for logs without keeping the queue open.
    jobs_probe: mpsc::WeakSender<Job>,
    /// LSS backup, when configured.
    lss: Option<LssRelay>,
}

impl Relay {
    async fn run(mut self, mut jobs: mpsc::Receiver<Job>, mut events: mpsc::Receiver<LinkEvent>) {
        let mut ticker = tokio::time::interval(self.cfg.waiting_log_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut jobs_open = true;
        let mut lss_events = self.lss.as_mut().and_then(LssRelay::take_events);
        loop {
            let can_send = jobs_open && self.signer.is_some() && self.inflight.len() < self.cfg.max_inflight;
            let failover_at = self.failover_deadline();
            tokio::select! {
                job = jobs.recv(), if can_send => match job {
                    Some(job) => self.dispatch(job),
                    None => jobs_open = false,
                },
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => {
                        info!("signer link closed; relay stopping");
                        break;
                    }
                },
                _ = ticker.tick() => self.on_tick(),
                _ = async {
                    match failover_at {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                } => self.on_failover_bound(),
                Some(ev) = async {
                    match lss_events.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.on_lss_event(ev),
            }
            // Two atomic stores per event: cheaper than tracking every change.
            self.metrics.set_inflight(self.inflight.len());
            self.metrics.set_signer_active(self.signer.is_some());
            self.metrics.set_standby(self.members.values().filter(|m| m.role == Role::Standby).count());
            if !jobs_open && self.inflight.is_empty() {
                debug!("all callers gone; relay stopping");
                break;
            }
        }
        for p in self.inflight.drain(..) {
            if let Some(tx) = p.reply {
                let _ = tx.send(Err(RelayError::Stopped));
            }
        }
    }

    fn queued(&self) -> usize {
        self.jobs_probe.upgrade().map(|s| s.max_capacity() - s.capacity()).unwrap_or(0)
    }

    /// Callers that gave up (timeout, closed connection) need no answer: forget their requests
    /// so a reconnecting signer is not asked to sign for nobody.
    fn forget_abandoned(&mut self) {
        self.inflight.retain(|p| p.kind != Kind::Cln || p.reply.as_ref().is_some_and(|r| !r.is_closed()));
    }

    fn on_tick(&mut self) {
        self.forget_abandoned();
        if self.signer.is_none() {
            let waiting = self.queued() + self.inflight.len();
            if waiting > 0 {
                warn!(waiting, "no signer connected: requests are waiting for a signer");
            }
        }
    }

    fn alloc_seq(&mut self) -> u16 {
        loop {
            let s = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
            if !self.inflight.iter().any(|p| p.seq == s) {
                return s;
            }
        }
    }

    fn dispatch(&mut self, job: Job) {
        if job.reply.is_closed() {
            return;
        }
        let msg_type = hsmd::msg_type(&job.msg).unwrap_or(0);
        self.init.remember(&job.msg);
        let seq = self.alloc_seq();
        let frame = encode_request(seq, &job.ctx.peer_id, job.ctx.dbid, &job.msg).into();
        let p = Pending { seq, frame, kind: Kind::Cln, msg_type, reply: Some(job.reply), sent_at: Instant::now() };
        self.send(&p);
        self.inflight.push_back(p);
    }

    fn send(&mut self, p: &Pending) {
        self.publish(p.seq, p.msg_type, p.frame.clone());
    }

    fn publish(&mut self, seq: u16, msg_type: u16, frame: Bytes) {
        if self.signer.is_none() {
            return;
        }
        debug!(seq, msg_type, "request to signer");
        match self.link.publish(&self.vls_topic, frame) {
            Ok(()) => {
                if let Some(u) = self.unanswered.as_mut() {
                    // Bounded: a signer that answers nothing is failed over or timed out long
                    // before; the oldest numbers are the least likely to be reported.
                    if u.len() >= usize::from(u16::MAX) / 2 {
                        u.pop_front();
                    }
                    u.push_back(seq);
                }
            }
            // Stays in flight: it is sent again when a signer says hello.
            Err(e) => warn!(seq, error = %e, "could not publish request; will resend on reconnect"),
        }
    }

    /// A `{id}/error` payload in our numbered form ([`error_report::encode`]). A report of a
    /// signer without [`error_report::SEQ_ERRORS`] (upstream's vls-mqtt: text only) is for the
    /// oldest frame sent to it and not answered when it is the active signer, else for its
    /// dance (init-3, seq 0); `None` when there is nothing it can be for.
    fn numbered_report(&mut self, id: &str, payload: Vec<u8>) -> Option<Vec<u8>> {
        if self.members.get(id).is_none_or(|m| m.seq_errors) {
            return Some(payload);
        }
        // Shown in the hub from here, with the seq it is for (`mqtt_link` leaves these to us).
        let seq = if self.signer.as_deref() == Some(id) {
            self.unanswered.as_mut().and_then(VecDeque::pop_front)
        } else {
            Some(INIT_3_SEQ)
        };
        let text = error_report::decode_text(&payload).text;
        if let Some(h) = &self.hub {
            h.on_error(id, error_report::ErrorReport { seq, text: text.clone() });
        }
        let Some(seq) = seq else {
            warn!(signer = %id, report = %text, "error report while nothing is sent to the signer; ignored");
            return None;
        };
        Some(error_report::encode(seq, &text))
    }

    fn set_role(&mut self, id: &str, role: Role) {
        if let Some(m) = self.members.get_mut(id) {
            m.role = role;
        }
        if let Some(h) = &self.hub {
            h.set_role(id, role);
        }
    }

    /// When the active signer misses the failover bound: only with a standby in sync to take
    /// over (without one, waiting is all there is to do), measured from when the oldest request
    /// was sent to the current active signer.
    fn failover_deadline(&self) -> Option<Instant> {
        self.signer.as_ref()?;
        let lss = self.lss.as_ref()?;
        if !self.members.iter().any(|(id, m)| m.role == Role::Standby && lss.is_synced(id)) {
            return None;
        }
        let oldest = self.inflight.iter().filter(|p| p.kind == Kind::Cln).map(|p| p.sent_at).min()?;
        Some(oldest + self.cfg.failover)
    }

    fn on_failover_bound(&mut self) {
        // Checked again: the deadline was computed before the last event.
        if self.failover_deadline().is_none_or(|t| t > Instant::now()) {
            return;
        }
        let Some(id) = self.signer.clone() else { return };
        let oldest = self.inflight.iter().filter(|p| p.kind == Kind::Cln).map(|p| p.seq).next();
        warn!(signer = %id, ?oldest, bound = ?self.cfg.failover, inflight = self.inflight.len(),
            "active signer missed the failover bound; fencing it and bringing in a standby");
        self.fence(&id);
    }

    /// Takes `id` out for good on this session: nothing it says counts any more (its replies
    /// and errors no longer match the active signer, its `lss-res` is not stored and a `Put` of
    /// it still running is not answered), and it is disconnected, so it logs in again and
    /// catches up as a standby.
    ///
    /// A `Put` of the fenced signer may still be running while the standby's dance reads LSS.
    /// It is not waited for: LSS versions make it harmless. If it lands before the dance's
    /// `Get`, the new signer is restored with it (its reply log included, so the re-sent
    /// request is answered from it, byte-identically). If it lands after, the new signer's
    /// `Put` for the same request writes the same keys at the same versions and conflicts:
    /// the new signer is told (`lss-conflict`), danced again (now with that state) and the
    /// request re-sent; if the new signer's `Put` lands first, the old one's conflicts and
    /// is dropped. Either way LSS holds one history.
    fn fence(&mut self, id: &str) {
        if let Some(lss) = self.lss.as_mut() {
            lss.on_gone(id);
        }
        self.members.remove(id);
        if let Some(h) = &self.hub {
            h.set_role(id, Role::None);
        }
        if self.signer.as_deref() == Some(id) {
            self.signer = None;
        }
        if self.candidate.as_deref() == Some(id) {
            self.candidate = None;
        }
        self.link.disconnect(id);
        self.promote();
    }

    /// With LSS and no active signer (nor one on its way): brings in a standby (the one that
    /// said hello first). It is danced again, since LSS moved on since it caught up, and made
    /// active once that completes ([`Next::Ready`]).
    fn promote(&mut self) {
        if self.signer.is_some() || self.candidate.is_some() || self.lss.is_none() {
            return;
        }
        let next = self
            .members
            .iter()
            .find(|(id, m)| m.role == Role::Standby && self.lss.as_ref().is_some_and(|l| l.is_synced(id)))
            .map(|(id, _)| id.clone());
        let Some(id) = next else { return };
        info!(signer = %id, inflight = self.inflight.len(), "failover: bringing in a standby (dancing it again first)");
        self.metrics.failover();
        self.candidate = Some(id.clone());
        self.set_role(&id, Role::Syncing);
        let init = self.init_frame();
        if let Some(l) = self.lss.as_mut() {
            l.redance(&id, init);
        }
    }

    fn on_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Hello(id) => self.on_hello(id.clone(), id, true),
            LinkEvent::HelloAs { id, node_id, seq_errors } => self.on_hello(id, node_id, seq_errors),
            LinkEvent::Gone(id) => {
                if let Some(lss) = self.lss.as_mut() {
                    lss.on_gone(&id);
                }
                self.members.remove(&id);
                if self.candidate.as_deref() == Some(id.as_str()) {
                    self.candidate = None;
                }
                if self.signer.as_deref() == Some(id.as_str()) {
                    warn!(signer = %id, inflight = self.inflight.len(), "signer disconnected");
                    self.signer = None;
                }
                self.promote();
            }
            LinkEvent::Reply(id, payload) => self.on_reply(id, payload),
            LinkEvent::Error(id, payload) => {
                let Some(payload) = self.numbered_report(&id, payload) else { return };
                let active = self.signer.as_deref() == Some(id.as_str());
                if !self.lss.as_mut().is_some_and(|l| l.on_message(&id, topics::ERROR, &payload, active)) {
                    self.on_error(id, payload)
                }
            }
            LinkEvent::Lss(id, suffix, payload) => {
                let active = self.signer.as_deref() == Some(id.as_str());
                match self.lss.as_mut() {
                    Some(l) => {
                        l.on_message(&id, &suffix, &payload, active);
                    }
                    None => debug!(signer = %id, %suffix, "LSS message while LSS is off; ignored"),
                }
            }
        }
    }

    fn on_hello(&mut self, id: String, node: String, seq_errors: bool) {
        // A client that logged in before a node id was pinned keeps its MQTT session after the
        // pin (login is only checked at CONNECT). Without this check its `hello` would make it
        // the current signer: requests would go to it and the real signer's replies would be
        // ignored (hijack / denial of service). Proved by standin/tests/foreign_clients.rs.
        if let Err(e) = self.pin.allows(&node) {
            warn!(signer = %id, node_id = %node, error = %e, "hello from a key that is not the pinned node id; disconnecting it");
            if let Some(h) = &self.hub {
                h.set_role(&id, Role::Refused);
            }
            self.link.disconnect(&id);
            return;
        }
        // Forget requests whose callers gave up *before* re-sending: otherwise a request that
        // timed out (CLN was told it failed and closed that client) would still be signed by
        // the signer that comes back, e.g. advancing a channel's state for nobody. (Before,
        // only the periodic tick did this.) Proved by standin/tests/failures.rs
        // slow_signer_never_holds_a_caller_beyond_the_bound.
        self.forget_abandoned();
        if self.lss.is_none() {
            if let Some(active) = self.signer.as_ref().filter(|a| **a != id) {
                // Without shared state a second signer could only fork the channel state.
                warn!(signer = %id, active = %active,
                    "a second signer said hello while another is active: several signers need [lss]; disconnecting it");
                if let Some(h) = &self.hub {
                    h.set_role(&id, Role::Refused);
                }
                self.link.disconnect(&id);
                return;
            }
            self.members.insert(id.clone(), Member { node, role: Role::Active, seq_errors });
            self.ready(id, true);
            return;
        }
        // Not ready until it is in sync with LSS (the dance sends lightningd's init as init-3).
        if self.signer.as_deref() == Some(id.as_str()) {
            // The active one said hello again: it stays the one to become active.
            self.signer = None;
            self.candidate = Some(id.clone());
        }
        self.members.insert(id.clone(), Member { node, role: Role::Syncing, seq_errors });
        self.set_role(&id, Role::Syncing);
        let init = self.init_frame();
        if let Some(l) = self.lss.as_mut() {
            l.on_hello(&id, init);
        }
    }

    /// [`init_frame`] of this relay.
    fn init_frame(&self) -> Option<Vec<u8>> {
        init_frame(&self.inflight, &self.init)
    }

    fn on_lss_event(&mut self, ev: LssEvent) {
        if self.lss.is_none() {
            return;
        }
        // Made only when a dance starts again.
        let (inflight, init) = (&self.inflight, &self.init);
        let Some(lss) = self.lss.as_mut() else { return };
        match lss.on_event(ev, || init_frame(inflight, init)) {
            Next::Nothing => {}
            Next::NotReady(id) => {
                if self.signer.as_deref() == Some(id.as_str()) {
                    warn!(signer = %id, "LSS: signer not ready until it is in sync again");
                    self.signer = None;
                    // Its dance already runs; it becomes active again when it completes.
                    self.candidate = Some(id.clone());
                }
                self.set_role(&id, Role::Syncing);
            }
            Next::Failed(id) => {
                self.set_role(&id, Role::Syncing);
                if self.candidate.as_deref() == Some(id.as_str()) {
                    self.candidate = None;
                    // Another standby may do better; else the next to sync becomes active.
                    self.promote();
                }
            }
            Next::Ready { id, init_reply } => {
                let Some(node) = self.members.get(&id).map(|m| m.node.clone()) else { return };
                if let Some(frame) = init_reply {
                    let checked = Reply::decode(&frame)
                        .map_err(|e| e.to_string())
                        .and_then(|r| init::check_reply(&node, &r.message, &self.pin).map_err(|e| e.to_string()));
                    if let Err(e) = checked {
                        error!(signer = %id, error = %e, "signer's init reply (init-3) rejected; disconnecting it");
                        self.fence(&id);
                        return;
                    }
                }
                let takes_over = self.signer.is_none() && self.candidate.as_deref().is_none_or(|c| c == id);
                if takes_over {
                    self.candidate = None;
                    self.ready(id, false);
                } else {
                    info!(signer = %id, active = ?self.signer, "LSS: signer in sync; standby");
                    self.set_role(&id, Role::Standby);
                }
            }
        }
    }

    /// `id` can take requests: lightningd's init first (when `replay_init`), then what is pending.
    fn ready(&mut self, id: String, replay_init: bool) {
        info!(signer = %id, resend = self.inflight.len(), "signer ready");
        if self.sessions > 0 {
            self.metrics.signer_reconnected();
        }
        self.sessions += 1;
        self.set_role(&id, Role::Active);
        self.vls_topic = topics::topic(&id, topics::VLS);
        let numbered = self.members.get(&id).is_none_or(|m| m.seq_errors);
        self.unanswered = (!numbered).then(VecDeque::new);
        self.signer = Some(id);
        self.inflight.retain(|p| p.kind != Kind::InitReplay);
        // lightningd's init goes first unless it is itself still unanswered.
        let init_in_flight = self.inflight.iter().any(|p| p.msg_type == hsmd::HSMD_INIT);
        let now = Instant::now();
        if let (Some(init), false, true) = (self.init.message().map(<[u8]>::to_vec), init_in_flight, replay_init) {
            let seq = self.alloc_seq();
            let frame = encode_request(seq, &[0; 33], 0, &init).into();
            let p =
                Pending { seq, frame, kind: Kind::InitReplay, msg_type: hsmd::HSMD_INIT, reply: None, sent_at: now };
            self.send(&p);
            self.inflight.push_front(p);
        }
        // Same frames, same sequence numbers, original order: a request the previous signer
        // already committed is answered from the reply log (part of the LSS state).
        for p in self.inflight.iter_mut() {
            p.sent_at = now;
        }
        let resend: Vec<_> = self
            .inflight
            .iter()
            .filter(|p| p.kind == Kind::Cln)
            .map(|p| (p.seq, p.msg_type, p.frame.clone()))
            .collect();
        for (seq, msg_type, frame) in resend {
            self.publish(seq, msg_type, frame);
        }
    }

    fn take_pending(&mut self, id: &str, seq: u16) -> Option<Pending> {
        if self.signer.as_deref() != Some(id) {
            warn!(from = %id, seq, "message from a signer that is not the current one; ignored");
            return None;
        }
        let Some(i) = self.inflight.iter().position(|p| p.seq == seq) else {
            debug!(seq, "reply for no pending request (duplicate or abandoned); ignored");
            return None;
        };
        self.inflight.remove(i)
    }

    fn on_reply(&mut self, id: String, payload: Bytes) {
        let (seq, message) = match Reply::peek(&payload) {
            Ok((seq, range)) => (seq, payload.slice(range)),
            Err(e) => {
                warn!(signer = %id, error = %e, "undecodable reply; ignored");
                return;
            }
        };
        if self.signer.as_deref() == Some(id.as_str()) {
            if let Some(u) = self.unanswered.as_mut() {
                // In order: what was sent before `seq` is answered too (or never will be).
                if let Some(i) = u.iter().position(|s| *s == seq) {
                    u.drain(..=i);
                }
            }
        }
        let Some(p) = self.take_pending(&id, seq) else { return };
        if p.msg_type == hsmd::HSMD_INIT {
            let node = self.members.get(&id).map(|m| m.node.clone()).unwrap_or_else(|| id.clone());
            if let Err(e) = init::check_reply(&node, &message, &self.pin) {
                error!(signer = %id, error = %e, "signer's init reply rejected; disconnecting it");
                self.inflight.push_front(p);
                self.signer = None;
                self.set_role(&id, Role::Refused);
                self.members.remove(&id);
                self.link.disconnect(&id);
                return;
            }
        }
        if let Some(tx) = p.reply {
            let _ = tx.send(Ok(message));
        }
    }

    fn on_error(&mut self, id: String, payload: Vec<u8>) {
        let error_report::ErrorReport { seq: Some(seq), text } = error_report::decode(&payload) else {
            warn!(signer = %id, "malformed error report; ignored");
            return;
        };
        let Some(p) = self.take_pending(&id, seq) else { return };
        warn!(signer = %id, seq, msg_type = p.msg_type, error = %text, "signer refused request");
        self.metrics.refused(p.msg_type, &text);
        if p.kind == Kind::InitReplay {
            error!(signer = %id, "signer refused lightningd's init; disconnecting it");
            self.signer = None;
            self.members.remove(&id);
            self.link.disconnect(&id);
            return;
        }
        if let Some(tx) = p.reply {
            let _ = tx.send(Err(RelayError::Refused(text)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sphinx_wire::serial::Request;
    use std::sync::Mutex as StdMutex;

    /// A link that records what the relay publishes, and lets the test play the signer.
    struct FakeLink {
        out: mpsc::UnboundedSender<(String, Vec<u8>)>,
        disconnected: StdMutex<Vec<String>>,
    }

    impl SignerLink for FakeLink {
        fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PublishError> {
            self.out.send((topic.to_string(), payload.to_vec())).map_err(|_| PublishError::Closed)
        }
        fn disconnect(&self, identity: &str) {
            self.disconnected.lock().unwrap().push(identity.to_string());
        }
    }

    const ID: &str = "029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef46";

    struct Harness {
        relay: RelayHandle,
        events: mpsc::Sender<LinkEvent>,
        out: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
        link: Arc<FakeLink>,
        _dir: PathGuard,
    }

    struct PathGuard(std::path::PathBuf);
    impl Drop for PathGuard {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn harness(name: &str, timeout: Duration) -> Harness {
        let dir = std::env::temp_dir().join(format!("relay-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pin = Arc::new(PinStore::open(&dir).unwrap());
        let (out_tx, out) = mpsc::unbounded_channel();
        let link = Arc::new(FakeLink { out: out_tx, disconnected: StdMutex::new(vec![]) });
        let (events, ev_rx) = mpsc::channel(16);
        let cfg = RelayConfig {
            queue_capacity: 8,
            max_inflight: 4,
            request_timeout: timeout,
            failover: Duration::from_secs(10),
            waiting_log_interval: Duration::from_secs(3600),
        };
        let relay = spawn(cfg, link.clone(), ev_rx, pin);
        Harness { relay, events, out, link, _dir: PathGuard(dir) }
    }

    fn init_msg() -> Vec<u8> {
        let mut m = hsmd::HSMD_INIT.to_be_bytes().to_vec();
        m.extend_from_slice(&[0u8; 40]);
        m
    }

    fn init_reply(node: &str) -> Vec<u8> {
        let mut m = hsmd::HSMD_INIT_REPLY_V4.to_be_bytes().to_vec();
        m.extend_from_slice(&6u32.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&hex::decode(node).unwrap());
        m.extend_from_slice(&[0u8; hsmd::EXT_KEY_LEN + 33]); // bip32, bolt12
        m
    }

    fn reply(seq: u16, message: Vec<u8>) -> LinkEvent {
        LinkEvent::Reply(ID.into(), Reply { seq, message }.encode().into())
    }

    /// A node id other than [`ID`].
    const OTHER: &str = "02c0c171d21db07e402c123e72ecb9fb01ef764a1efe153fcf785a8885962d9bc1";

    impl Harness {
        /// `msg` called through the relay in a task of its own, as lightningd's hsmd would.
        fn call(&self, msg: Vec<u8>) -> tokio::task::JoinHandle<Result<Vec<u8>, RelayError>> {
            let r = self.relay.clone();
            tokio::spawn(async move { r.call(ClientContext::ROOT, msg).await.map(Vec::from) })
        }

        /// The signer `id` says hello.
        async fn hello(&self, id: &str) {
            self.events.send(LinkEvent::Hello(id.into())).await.unwrap();
        }

        /// The next request the relay publishes, decoded (its topic not checked).
        async fn next_request(&mut self) -> Request {
            Request::decode(&self.out.recv().await.unwrap().1).unwrap()
        }

        /// The signer answers `seq` with `message`.
        async fn answer(&self, seq: u16, message: Vec<u8>) {
            self.events.send(reply(seq, message)).await.unwrap();
        }

        /// [`ID`] says hello and answers an init for [`ID`], which pins it.
        async fn initialise(&mut self) {
            self.initialise_with(LinkEvent::Hello(ID.into())).await;
        }

        /// [`Harness::initialise`], the signer saying `hello` as `hello` (e.g. an upstream one).
        async fn initialise_with(&mut self, hello: LinkEvent) {
            self.events.send(hello).await.unwrap();
            let init = self.call(init_msg());
            let q = self.next_request().await;
            self.answer(q.seq, init_reply(ID)).await;
            assert!(init.await.unwrap().is_ok());
        }
    }

    #[tokio::test]
    async fn requests_wait_for_a_signer_then_go_in_order_and_match_by_seq() {
        let mut h = harness("order", Duration::from_secs(30));
        let r1 = h.call(vec![0, 28, 1]);
        // Let the first request reach the queue before the second: order must be preserved.
        while h.relay.queued() < 1 {
            tokio::task::yield_now().await;
        }
        let r2 = h.call(vec![0, 28, 2]);
        while h.relay.queued() < 2 {
            tokio::task::yield_now().await;
        }
        assert!(h.out.try_recv().is_err(), "nothing may be sent before a signer says hello");
        h.hello(ID).await;
        let (t1, f1) = h.out.recv().await.unwrap();
        let (_, f2) = h.out.recv().await.unwrap();
        assert_eq!(t1, format!("{ID}/vls"));
        let q1 = Request::decode(&f1).unwrap();
        let q2 = Request::decode(&f2).unwrap();
        assert_eq!(q1.message, vec![0, 28, 1]);
        assert_eq!(q2.message, vec![0, 28, 2]);
        // Answer out of order: each caller still gets its own reply.
        h.answer(q2.seq, vec![0, 128, 2]).await;
        h.answer(q1.seq, vec![0, 128, 1]).await;
        assert_eq!(r1.await.unwrap().unwrap(), vec![0, 128, 1]);
        assert_eq!(r2.await.unwrap().unwrap(), vec![0, 128, 2]);
    }

    #[tokio::test]
    async fn reconnect_replays_init_then_resends_unanswered_requests() {
        let mut h = harness("resend", Duration::from_secs(30));
        h.initialise().await;

        let pending = h.call(vec![0, 23, 9]);
        let first = h.next_request().await;
        h.events.send(LinkEvent::Gone(ID.into())).await.unwrap();
        h.hello(ID).await;
        let replayed_init = h.next_request().await;
        assert_eq!(replayed_init.message, init_msg(), "init is replayed first");
        let resent = h.next_request().await;
        assert_eq!(resent, first, "the unanswered request is resent unchanged (same seq)");
        h.answer(replayed_init.seq, init_reply(ID)).await;
        h.answer(resent.seq, vec![0, 123]).await;
        // A duplicate reply for the same seq is ignored.
        h.answer(resent.seq, vec![0, 124]).await;
        assert_eq!(pending.await.unwrap().unwrap(), vec![0, 123]);
    }

    #[tokio::test]
    async fn refusal_and_timeout_reach_the_caller() {
        let mut h = harness("refuse", Duration::from_millis(300));
        h.hello(ID).await;
        let call = h.call(vec![0, 7]);
        let q = h.next_request().await;
        let err = error_report::encode(q.seq, "policy failure: nope");
        h.events.send(LinkEvent::Error(ID.into(), err)).await.unwrap();
        assert_eq!(call.await.unwrap(), Err(RelayError::Refused("policy failure: nope".into())));
        // No answer at all: the caller is released at the bound.
        let r = h.relay.call(ClientContext::ROOT, vec![0, 7]).await;
        assert!(matches!(r, Err(RelayError::Timeout(_))), "{r:?}");
    }

    /// [`ID`]'s hello as an upstream signer says it (no `error-seq`).
    fn upstream_hello() -> LinkEvent {
        LinkEvent::HelloAs { id: ID.into(), node_id: ID.into(), seq_errors: false }
    }

    /// A signer without `error-seq` (upstream's) reports refusals as text: each is for the oldest
    /// frame sent to it and not answered, also when that request's caller already gave up (the
    /// report then fails nothing, not the next request).
    #[tokio::test]
    async fn a_text_report_is_for_the_oldest_unanswered_frame_even_if_its_caller_left() {
        let mut h = harness("text-report", Duration::from_secs(30));
        h.initialise_with(upstream_hello()).await;

        let (a, b, c) = (h.call(vec![0, 28, 1]), h.call(vec![0, 28, 2]), h.call(vec![0, 28, 3]));
        let mut sent = vec![h.next_request().await, h.next_request().await, h.next_request().await];
        // The first request's caller gives up (its task, and with it the call, is dropped).
        a.abort();
        assert!(a.await.unwrap_err().is_cancelled());
        // The signer, in the order it got them: refuses the first, signs the second, refuses
        // the third.
        let text = |t: &str| LinkEvent::Error(ID.into(), t.as_bytes().to_vec());
        sent.sort_by_key(|q| q.seq);
        for q in &sent {
            match q.message[2] {
                1 => h.events.send(text("refused one")).await.unwrap(),
                2 => h.answer(q.seq, vec![0, 128, 2]).await,
                _ => h.events.send(text("refused three")).await.unwrap(),
            }
        }
        assert_eq!(b.await.unwrap(), Ok(vec![0, 128, 2]), "the second is signed, not failed by the first's refusal");
        assert_eq!(c.await.unwrap(), Err(RelayError::Refused("refused three".into())));
    }

    /// As above, after the relay forgot the abandoned request (its periodic tick): the text
    /// report is still the abandoned frame's (it was sent and the signer answers in order), so
    /// it fails nothing. "The oldest request in flight" would have failed the second one here.
    #[tokio::test(start_paused = true)]
    async fn a_text_report_for_a_forgotten_request_fails_nothing() {
        let mut h = harness("text-report-forgotten", Duration::from_secs(7200));
        h.initialise_with(upstream_hello()).await;

        let a = h.call(vec![0, 28, 1]);
        let first = h.next_request().await;
        let b = h.call(vec![0, 28, 2]);
        let second = h.next_request().await;
        a.abort();
        assert!(a.await.unwrap_err().is_cancelled());
        // The relay's tick (every `waiting_log_interval`, 1 h here) forgets the abandoned request.
        tokio::time::advance(Duration::from_secs(3601)).await;
        for _ in 0..1000 {
            if h.relay.metrics().inflight() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(h.relay.metrics().inflight(), 1, "the abandoned request is forgotten");
        h.events.send(LinkEvent::Error(ID.into(), b"refused one".to_vec())).await.unwrap();
        h.answer(second.seq, vec![0, 128, 2]).await;
        assert_eq!(first.message, vec![0, 28, 1]);
        assert_eq!(b.await.unwrap(), Ok(vec![0, 128, 2]), "the second is signed, not failed by the first's refusal");
    }

    #[tokio::test]
    async fn hello_from_a_key_other_than_the_pinned_one_is_refused() {
        let mut h = harness("hellopin", Duration::from_secs(30));
        h.initialise().await;
        // A client that logged in before the pin (still connected) says hello: refused, dropped,
        // and the pinned signer stays the one requests go to.
        h.hello(OTHER).await;
        let call = h.call(vec![0, 23, 1]);
        let (topic, f) = h.out.recv().await.unwrap();
        assert_eq!(topic, format!("{ID}/vls"));
        assert_eq!(h.link.disconnected.lock().unwrap().as_slice(), &[OTHER.to_string()]);
        let q = Request::decode(&f).unwrap();
        h.answer(q.seq, vec![0, 123]).await;
        assert_eq!(call.await.unwrap().unwrap(), vec![0, 123]);
    }

    #[tokio::test]
    async fn init_reply_for_another_node_is_rejected_and_the_signer_dropped() {
        let mut h = harness("wrongnode", Duration::from_secs(30));
        h.hello(ID).await;
        let init = h.call(init_msg());
        let q = h.next_request().await;
        h.answer(q.seq, init_reply(OTHER)).await;
        // The request is still pending (not answered with a foreign node id): a good signer answers it.
        h.hello(ID).await;
        let again = h.next_request().await;
        assert_eq!(again.message, init_msg());
        assert_eq!(h.link.disconnected.lock().unwrap().as_slice(), &[ID.to_string()]);
        h.answer(again.seq, init_reply(ID)).await;
        assert!(init.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn without_lss_a_second_signer_is_refused_until_the_active_one_is_gone() {
        let mut h = harness("second", Duration::from_secs(30));
        h.initialise().await;
        // Another device of the same node (same key, its own client id) says hello.
        h.events
            .send(LinkEvent::HelloAs { id: "device-b".into(), node_id: ID.into(), seq_errors: true })
            .await
            .unwrap();
        let call = h.call(vec![0, 23, 1]);
        let (topic, f) = h.out.recv().await.unwrap();
        assert_eq!(topic, format!("{ID}/vls"), "requests stay with the active signer");
        assert_eq!(h.link.disconnected.lock().unwrap().as_slice(), &["device-b".to_string()]);
        h.answer(Request::decode(&f).unwrap().seq, vec![0, 123]).await;
        assert_eq!(call.await.unwrap().unwrap(), vec![0, 123]);
        // Once the active one is gone, the next hello becomes active (init replayed first).
        h.events.send(LinkEvent::Gone(ID.into())).await.unwrap();
        h.events
            .send(LinkEvent::HelloAs { id: "device-b".into(), node_id: ID.into(), seq_errors: true })
            .await
            .unwrap();
        let (topic, f) = h.out.recv().await.unwrap();
        assert_eq!(topic, "device-b/vls");
        assert_eq!(Request::decode(&f).unwrap().message, init_msg());
    }

    /// Two real signers (same seed, own state directories) behind a real lssd, each reached
    /// through its own identity: what the broker's MQTT link does, without MQTT.
    mod several {
        use super::super::*;
        use crate::hub::{Role, SignerHub};
        use crate::lss_link::LssSettings;
        use sphinx_lss::lssd::Lssd;
        use sphinx_signer::{ClockConfig, Output, PolicyConfig, Signer, SignerConfig};
        use sphinx_wire::serial::Request;
        use std::collections::HashMap;
        use std::sync::Mutex as StdMutex;

        const SEED: [u8; 32] = [0x51; 32];
        /// alice's `hsmd_init` (regtest) from the recorded CLN v25.12.1 session.
        const INIT: &str = "000b043587cf0435839406226e46111a0b59caaf126043eb5bbf28c34f3a5e332a1fc7b2b73cf188910f00000000000000000500000006";
        const WAIT: Duration = Duration::from_secs(30);

        fn config() -> SignerConfig {
            SignerConfig {
                network: bitcoin::Network::Regtest,
                policy: PolicyConfig::default(),
                clock: ClockConfig::Fixed(1_700_000_000),
            }
        }

        /// `derive_secret` for `info`: a root request whose reply is deterministic.
        fn derive(info: &[u8]) -> Vec<u8> {
            let mut m = hsmd::DERIVE_SECRET.to_be_bytes().to_vec();
            m.extend_from_slice(&(info.len() as u16).to_be_bytes());
            m.extend_from_slice(info);
            m
        }

        struct Device {
            signer: Signer,
            /// Requests (`vls`) are kept, not answered (a stopped device).
            hold: bool,
            held: Vec<Vec<u8>>,
        }

        #[derive(Default)]
        struct Net {
            devices: HashMap<String, Device>,
            /// Every `(identity, suffix, payload)` the relay published.
            published: Vec<(String, String, Vec<u8>)>,
            disconnected: Vec<String>,
        }

        struct RoutingLink {
            net: Arc<StdMutex<Net>>,
            events: mpsc::Sender<LinkEvent>,
        }

        fn outputs_to_events(id: &str, outs: Vec<Output>) -> Vec<LinkEvent> {
            outs.into_iter()
                .filter_map(|o| match o {
                    Output::Publish { topic, payload } => Some(match topic {
                        topics::VLS_RES => LinkEvent::Reply(id.into(), payload.into()),
                        topics::ERROR => LinkEvent::Error(id.into(), payload),
                        t => LinkEvent::Lss(id.into(), t.to_string(), payload),
                    }),
                    Output::Control(_) => None,
                })
                .collect()
        }

        impl SignerLink for RoutingLink {
            fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PublishError> {
                let payload = payload.to_vec();
                let (id, suffix) = topics::split(topic).ok_or(PublishError::Closed)?;
                let (id, suffix) = (id.to_string(), suffix.to_string());
                let mut net = self.net.lock().unwrap();
                net.published.push((id.clone(), suffix.clone(), payload.clone()));
                let Some(d) = net.devices.get_mut(&id) else { return Ok(()) };
                if d.hold && suffix == topics::VLS {
                    d.held.push(payload);
                    return Ok(());
                }
                let evs = outputs_to_events(&id, d.signer.on_message(&suffix, &payload));
                drop(net);
                let tx = self.events.clone();
                tokio::spawn(async move {
                    for ev in evs {
                        let _ = tx.send(ev).await;
                    }
                });
                Ok(())
            }
            fn disconnect(&self, identity: &str) {
                let mut net = self.net.lock().unwrap();
                net.disconnected.push(identity.to_string());
                if net.devices.remove(identity).is_some() {
                    let _ = self.events.try_send(LinkEvent::Gone(identity.to_string()));
                }
            }
        }

        struct Several {
            relay: RelayHandle,
            events: mpsc::Sender<LinkEvent>,
            net: Arc<StdMutex<Net>>,
            hub: Arc<SignerHub>,
            metrics: Arc<Metrics>,
            node: String,
            root: std::path::PathBuf,
            _lssd: Lssd,
        }

        impl Drop for Several {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.root);
            }
        }

        async fn several(name: &str, failover: Duration) -> Several {
            let root = std::env::temp_dir().join(format!("relay-several-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            let lssd = Lssd::start_temp(&format!("relay-{name}")).expect("lssd (cargo build --release -p sphinx-lssd)");
            let pin = Arc::new(PinStore::open(&root.join("broker")).unwrap());
            let hub = Arc::new(SignerHub::new(64));
            let (events, ev_rx) = mpsc::channel(256);
            let net = Arc::new(StdMutex::new(Net::default()));
            let link: Arc<dyn SignerLink> = Arc::new(RoutingLink { net: net.clone(), events: events.clone() });
            let settings = LssSettings { url: Some(lssd.url()), timeout: Duration::from_secs(10) };
            let lss = LssRelay::new(&settings, link.clone(), hub.clone());
            let cfg = RelayConfig {
                queue_capacity: 64,
                max_inflight: 16,
                request_timeout: WAIT,
                failover,
                waiting_log_interval: Duration::from_secs(3600),
            };
            let metrics = Arc::new(Metrics::new());
            let relay = spawn_with(cfg, link, ev_rx, pin, metrics.clone(), lss);
            let node = Signer::in_memory(SEED, &config()).unwrap().node_id_hex();
            Several { relay, events, net, hub, metrics, node, root, _lssd: lssd }
        }

        impl Several {
            /// Device `id` (its own state directory, kept across reconnects) logs in and says hello.
            async fn hello(&self, id: &str) {
                let signer = Signer::open(SEED, &self.root.join(id), &config()).unwrap();
                self.hub.on_connected(id, &self.node);
                self.net.lock().unwrap().devices.insert(id.into(), Device { signer, hold: false, held: vec![] });
                self.hub.on_ready(id, true);
                self.events
                    .send(LinkEvent::HelloAs { id: id.into(), node_id: self.node.clone(), seq_errors: true })
                    .await
                    .unwrap();
            }

            async fn until(&self, what: &str, f: impl Fn(&Several) -> bool) {
                let deadline = Instant::now() + WAIT;
                while !f(self) {
                    assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }

            async fn until_role(&self, id: &str, role: Role) {
                self.until(&format!("{id} {role:?}"), |s| s.hub.signer(id).is_some_and(|x| x.role == role)).await;
            }

            fn call(&self, msg: Vec<u8>) -> tokio::task::JoinHandle<Result<Vec<u8>, RelayError>> {
                let r = self.relay.clone();
                tokio::spawn(async move { r.call(ClientContext::ROOT, msg).await.map(Vec::from) })
            }

            /// The `vls` frames published to `id`, in order.
            fn vls_to(&self, id: &str) -> Vec<Vec<u8>> {
                let net = self.net.lock().unwrap();
                net.published
                    .iter()
                    .filter(|(i, s, _)| i == id && s == topics::VLS)
                    .map(|(_, _, p)| p.clone())
                    .collect()
            }

            fn hold(&self, id: &str, hold: bool) {
                self.net.lock().unwrap().devices.get_mut(id).unwrap().hold = hold;
            }

            /// `id` answers what it held, in order.
            async fn release(&self, id: &str) {
                let evs = {
                    let mut net = self.net.lock().unwrap();
                    let d = net.devices.get_mut(id).unwrap();
                    d.hold = false;
                    let held = std::mem::take(&mut d.held);
                    let mut evs = Vec::new();
                    for f in held {
                        evs.extend(outputs_to_events(id, d.signer.on_message(topics::VLS, &f)));
                    }
                    evs
                };
                for ev in evs {
                    self.events.send(ev).await.unwrap();
                }
            }

            /// A and B connected, A active (and lightningd's init answered by it), B standby.
            async fn two(&self) {
                self.hello("a").await;
                self.until_role("a", Role::Active).await;
                let init = self.call(hex::decode(INIT).unwrap());
                init.await.unwrap().expect("hsmd_init answered");
                self.hello("b").await;
                self.until_role("b", Role::Standby).await;
            }
        }

        /// What an in-memory signer of the same seed (LSS off) answers to `derive(info)`.
        fn oracle(info: &[u8]) -> Vec<u8> {
            let mut o = Signer::in_memory(SEED, &config()).unwrap();
            o.handle(&Request { seq: 0, peer_id: [0; 33], dbid: 0, message: hex::decode(INIT).unwrap() }).unwrap();
            o.handle(&Request { seq: 1, peer_id: [0; 33], dbid: 0, message: derive(info) }).unwrap().message
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn standby_gets_no_requests_and_takes_over_on_gone_with_the_same_seqs_in_order() {
            let h = several("gone", Duration::from_secs(3600)).await;
            h.two().await;
            for i in 0..3u8 {
                assert_eq!(h.call(derive(&[i])).await.unwrap().unwrap(), oracle(&[i]));
            }
            assert!(h.vls_to("b").is_empty(), "a standby is sent no request");
            // A stops answering with two requests in flight, then its connection ends.
            h.hold("a", true);
            let c1 = h.call(derive(b"x"));
            h.until("first request reached a", |s| s.vls_to("a").len() == 5).await;
            let c2 = h.call(derive(b"y"));
            h.until("both reached a", |s| s.vls_to("a").len() == 6).await;
            let held_by_a: Vec<Vec<u8>> = h.vls_to("a")[4..].to_vec();
            assert!(h.vls_to("b").is_empty());
            h.events.send(LinkEvent::Gone("a".into())).await.unwrap();
            assert_eq!(c1.await.unwrap().unwrap(), oracle(b"x"));
            assert_eq!(c2.await.unwrap().unwrap(), oracle(b"y"));
            assert_eq!(h.vls_to("b"), held_by_a, "re-sent to b: same frames (same seqs), same order");
            assert_eq!(h.metrics.failovers(), 1);
            assert_eq!(h.hub.signer("b").unwrap().role, Role::Active);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn failover_by_the_bound_fences_the_old_active_ignores_its_late_answers_and_it_returns_as_standby() {
            let h = several("bound", Duration::from_millis(300)).await;
            h.two().await;
            h.hold("a", true);
            h.hold("b", true);
            let started = Instant::now();
            let call = h.call(derive(b"late"));
            // Past the bound: A is fenced (disconnected), B is danced again and gets the request.
            h.until("b got the request", |s| s.vls_to("b").len() == 1).await;
            assert!(started.elapsed() >= Duration::from_millis(300));
            assert_eq!(h.net.lock().unwrap().disconnected, vec!["a".to_string()]);
            let to_a = h.vls_to("a");
            let frame = to_a.last().unwrap().clone();
            assert_eq!(h.vls_to("b"), vec![frame.clone()], "same frame, same seq");
            let seq = Request::decode(&frame).unwrap().seq;
            // A's late answers (its session was still draining): a reply, an error, an lss-res.
            let bogus = Reply { seq, message: vec![0xde, 0xad] }.encode();
            h.events.send(LinkEvent::Reply("a".into(), bogus.into())).await.unwrap();
            h.events.send(LinkEvent::Error("a".into(), error_report::encode(seq, "late refusal"))).await.unwrap();
            h.events.send(LinkEvent::Lss("a".into(), topics::LSS_RES.into(), vec![0x90])).await.unwrap();
            h.release("b").await;
            assert_eq!(call.await.unwrap().unwrap(), oracle(b"late"), "b's answer, not a's");
            // A logs in again: it catches up from LSS and stands by.
            h.hello("a").await;
            h.until_role("a", Role::Standby).await;
            assert_eq!(h.hub.signer("b").unwrap().role, Role::Active);
            assert_eq!(h.call(derive(b"next")).await.unwrap().unwrap(), oracle(b"next"));
            assert_eq!(h.vls_to("a").len(), to_a.len(), "the fenced signer got nothing since");
            assert_eq!(h.metrics.failovers(), 1);
        }
    }
}
