//! LSS backup in the relay (docs/signer.md "LSS backup", formats in docs/wire.md "LSS backup").
//!
//! With `[lss] url` set, a signer's `hello` does not make it ready at once: the relay first runs
//! the init dance ([`sphinx_lss::broker::init_dance`]: init-1, init-2, and lightningd's
//! `hsmd_init` as init-3) in a spawned task, over [`DanceLink`] (the broker's MQTT link seen as
//! the library's request/answer seam). Only when it completes is the signer marked ready and
//! are pending requests re-sent. Per request, the signer's `lss-res` is `Put` to LSS by a spawned
//! task ([`LssSession::store`]) and answered with `lss-msg` (then the signer releases its
//! `vls-res`) or `lss-conflict` (then the signer is stale: not ready, danced again).
//!
//! Several signers (MQTT identities) of one node may be connected: each is danced on its
//! `hello` and kept in sync; the relay picks the one that takes requests (the active one) and
//! tells [`LssRelay::on_message`], which stores only the active one's `lss-res`. The others
//! are standbys, danced again before they take over (docs/signer.md "Several signers").
//!
//! The relay is one task: nothing here awaits in it. Tasks report back as [`LssEvent`]s on a
//! bounded channel; each carries the generation it was started for, so the result of a dance
//! for a signer that has since gone (or said `hello` again) is dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sphinx_lss::broker::{init_dance, DanceError, Danced, LinkError, LssBackend, LssSession, StoreError};
use sphinx_wire::topics;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::config::ConfigError;
use crate::hub::{LssStatus, SignerHub};
use crate::relay::SignerLink as RelayLink;

/// Answers from the signer buffered for a running dance; beyond this they are dropped (a dance
/// expects one answer at a time).
pub const DANCE_ANSWER_CAPACITY: usize = 16;
/// Longest wait before a failed dance is tried again (doubling from one second).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// The `[lss]` table of the config file: LSS backup, off unless `url` is set.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LssSettings {
    /// The Lightning Storage Server (gRPC), e.g. `http://127.0.0.1:55551`
    /// (`SPHINX_BROKER_LSS_URL`, `--lss-url`). Default unset: LSS off, signers are used as before.
    pub url: Option<String>,
    /// Bound on each LSS call and on each signer answer during the init dance (file:
    /// `timeout_secs`). Default 10 s.
    #[serde(rename = "timeout_secs", deserialize_with = "crate::config::secs")]
    pub timeout: Duration,
}

impl Default for LssSettings {
    fn default() -> Self {
        LssSettings { url: None, timeout: sphinx_lss::client::DEFAULT_TIMEOUT }
    }
}

impl LssSettings {
    /// Rejects values LSS cannot run with (checked without contacting the server).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(u) = &self.url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(ConfigError::Invalid("lss.url", format!("{u:?}: expected http://host:port")));
            }
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::Invalid("lss.timeout_secs", "must be positive".into()));
        }
        Ok(())
    }
}

/// What a spawned LSS task reports to the relay.
pub enum LssEvent {
    /// A dance ended.
    Danced {
        /// The signer.
        id: String,
        /// The generation it ran for.
        gen: u64,
        /// Its outcome (with the server's identity, read on the first dance).
        result: Result<Box<(Danced, LssBackend)>, DanceError>,
    },
    /// A request's `Put` ended.
    Stored {
        /// The signer.
        id: String,
        /// The generation it ran for.
        gen: u64,
        /// The session, handed back.
        session: Box<LssSession>,
        /// The topic and payload to answer with, or why nothing was stored.
        result: Result<(&'static str, Vec<u8>), StoreError>,
    },
    /// Time to try a failed dance again.
    Retry {
        /// The signer.
        id: String,
        /// The generation whose dance failed.
        gen: u64,
    },
}

/// The signer's side of a dance: publish through the relay's link, answers fed by the relay.
pub struct DanceLink {
    link: Arc<dyn RelayLink>,
    id: String,
    answers: mpsc::Receiver<(String, Vec<u8>)>,
    timeout: Duration,
}

impl sphinx_lss::broker::SignerLink for DanceLink {
    async fn exchange(
        &mut self,
        topic: &'static str,
        payload: Vec<u8>,
        answers: &'static [&'static str],
    ) -> Result<(String, Vec<u8>), LinkError> {
        {
            self.link
                .publish(&topics::topic(&self.id, topic), payload.into())
                .map_err(|e| LinkError(format!("cannot publish {topic}: {e}")))?;
            let deadline = tokio::time::Instant::now() + self.timeout;
            loop {
                match tokio::time::timeout_at(deadline, self.answers.recv()).await {
                    Err(_) => return Err(LinkError(format!("no answer to {topic} within {:?}", self.timeout))),
                    Ok(None) => return Err(LinkError("signer gone".into())),
                    Ok(Some((suffix, body))) => {
                        if answers.contains(&suffix.as_str()) || suffix == topics::ERROR {
                            return Ok((suffix, body));
                        }
                        // E.g. the `lss-conflict-res` of an earlier conflict.
                        debug!(%suffix, "not an answer to {topic}; ignored");
                    }
                }
            }
        }
    }
}

enum Phase {
    /// A dance runs; its answers go to `answers`.
    Dancing { answers: mpsc::Sender<(String, Vec<u8>)> },
    /// Waiting to dance again.
    Waiting,
    /// In sync; `session` is `None` while a `Put` runs.
    Synced { session: Option<Box<LssSession>> },
}

/// One signer (MQTT identity) with LSS: where its dance is, and its retry state.
struct Member {
    phase: Phase,
    /// The generation its current task runs for: a report of another is stale.
    gen: u64,
    retry_delay: Duration,
    /// Dances failed in a row.
    failures: u32,
}

/// Dances failed in a row after which the signer is disconnected (it logs in again, with its
/// own backoff, and gets a fresh round): retries are bounded.
pub const MAX_DANCE_FAILURES: u32 = 8;

/// What the relay does with its signers and LSS (module docs). Owned by the relay task. Every
/// signer that says hello is danced (brought in sync); which one takes requests is the relay's
/// choice, and only that one's `lss-res` is stored ([`LssRelay::on_message`]).
pub struct LssRelay {
    settings: LssSettings,
    url: String,
    backend: Option<LssBackend>,
    hub: Arc<SignerHub>,
    link: Arc<dyn RelayLink>,
    tx: mpsc::Sender<LssEvent>,
    rx: Option<mpsc::Receiver<LssEvent>>,
    members: HashMap<String, Member>,
    gen: u64,
}

/// What the relay must do after an LSS event.
pub enum Next {
    /// Nothing.
    Nothing,
    /// `id` is in sync: it may take requests (or stand by). `init_reply` is the serial reply
    /// frame to the init-3 `hsmd_init`, if one was sent, for the relay's checks.
    Ready {
        /// The signer.
        id: String,
        /// init-3's answer.
        init_reply: Option<Vec<u8>>,
    },
    /// `id` may hold stale state: not ready until the next dance (already started).
    NotReady(String),
    /// `id`'s dance failed; it is tried again later (or, after [`MAX_DANCE_FAILURES`], the
    /// signer was disconnected).
    Failed(String),
}

impl LssRelay {
    /// LSS for the relay, if `settings.url` is set. `hub` shows the status per signer.
    pub fn new(settings: &LssSettings, link: Arc<dyn RelayLink>, hub: Arc<SignerHub>) -> Option<LssRelay> {
        let url = settings.url.clone()?;
        let (tx, rx) = mpsc::channel(64);
        Some(LssRelay {
            settings: settings.clone(),
            url,
            backend: None,
            hub,
            link,
            tx,
            rx: Some(rx),
            members: HashMap::new(),
            gen: 0,
        })
    }

    /// The events channel (taken once by the relay's loop).
    pub fn take_events(&mut self) -> Option<mpsc::Receiver<LssEvent>> {
        self.rx.take()
    }

    /// The hub this reports to.
    pub fn hub(&self) -> &Arc<SignerHub> {
        &self.hub
    }

    /// Whether `id` is in sync with LSS (its last dance completed, no conflict since).
    pub fn is_synced(&self, id: &str) -> bool {
        self.members.get(id).is_some_and(|m| matches!(m.phase, Phase::Synced { .. }))
    }

    /// `id` said hello: (re)start its dance. `hsmd_init` is the init-3 request frame, if any.
    pub fn on_hello(&mut self, id: &str, hsmd_init: Option<Vec<u8>>) {
        if let Some(m) = self.members.get_mut(id) {
            m.retry_delay = Duration::from_secs(1);
            m.failures = 0;
        }
        self.start_dance(id, hsmd_init);
    }

    /// Dances `id` again (a standby about to take over: LSS moved on since it caught up).
    pub fn redance(&mut self, id: &str, hsmd_init: Option<Vec<u8>>) {
        self.start_dance(id, hsmd_init);
    }

    fn start_dance(&mut self, id: &str, hsmd_init: Option<Vec<u8>>) {
        self.gen += 1;
        let gen = self.gen;
        let (answers_tx, answers) = mpsc::channel(DANCE_ANSWER_CAPACITY);
        let m = self.members.entry(id.to_string()).or_insert_with(|| Member {
            phase: Phase::Waiting,
            gen,
            retry_delay: Duration::from_secs(1),
            failures: 0,
        });
        m.gen = gen;
        m.phase = Phase::Dancing { answers: answers_tx };
        self.hub.set_lss(id, LssStatus::Syncing);
        let mut link =
            DanceLink { link: self.link.clone(), id: id.to_string(), answers, timeout: self.settings.timeout };
        let (backend, url, timeout, tx, id) =
            (self.backend.clone(), self.url.clone(), self.settings.timeout, self.tx.clone(), id.to_string());
        info!(signer = %id, "LSS: init dance");
        tokio::spawn(async move {
            let run = async {
                let backend = match backend {
                    Some(b) => b,
                    None => LssBackend::new(&url, timeout).await.map_err(DanceError::Lss)?,
                };
                let d = init_dance(&backend, &mut link, hsmd_init).await?;
                Ok(Box::new((d, backend)))
            };
            // Each step is bounded; this bounds the whole (three exchanges, Info, connect, Get, Put).
            let result = match tokio::time::timeout(timeout * 8, run).await {
                Ok(r) => r,
                Err(_) => Err(DanceError::Link(LinkError(format!("init dance not done within {:?}", timeout * 8)))),
            };
            let _ = tx.send(LssEvent::Danced { id, gen, result }).await;
        });
    }

    /// `id`'s connection ended, or the relay fenced it: whatever its tasks report from now on
    /// is dropped (a running `Put` of it is not answered).
    pub fn on_gone(&mut self, id: &str) {
        self.members.remove(id);
    }

    fn current(&self, id: &str, gen: u64) -> bool {
        self.members.get(id).is_some_and(|m| m.gen == gen)
    }

    /// Whether a signer message on `suffix` (not `vls-res`) is for LSS; if so it was handled.
    /// `error` payloads go to a running dance only when they carry sequence 0 (the signer's
    /// dance errors); others are the relay's. `active`: whether `id` is the signer that takes
    /// requests; only its `lss-res` is stored (a standby or a fenced signer never writes to LSS).
    pub fn on_message(&mut self, id: &str, suffix: &str, payload: &[u8], active: bool) -> bool {
        let Some(m) = self.members.get_mut(id) else {
            return suffix != topics::ERROR;
        };
        match (&mut m.phase, suffix) {
            (Phase::Dancing { answers }, s) => {
                if s == topics::ERROR && sphinx_wire::error_report::decode(payload).seq != Some(0) {
                    return false;
                }
                if answers.try_send((s.to_string(), payload.to_vec())).is_err() {
                    warn!(signer = %id, suffix = s, "LSS: answer during the dance not taken; dropped");
                }
                true
            }
            (Phase::Synced { .. }, topics::LSS_RES) if !active => {
                warn!(signer = %id, "LSS: lss-res from a signer that is not the active one; not stored");
                true
            }
            (Phase::Synced { session }, topics::LSS_RES) => {
                let Some(mut s) = session.take() else {
                    warn!(signer = %id, "LSS: lss-res while a Put runs; ignored");
                    return true;
                };
                // Reported with the member's generation: a dance started meanwhile (or the
                // signer fenced or gone) makes the report stale, and it is not answered.
                let (tx, gen, id, body) = (self.tx.clone(), m.gen, id.to_string(), payload.to_vec());
                tokio::spawn(async move {
                    // LssSession's calls are bounded by the configured timeout.
                    let result = s.store(&body).await;
                    let _ = tx.send(LssEvent::Stored { id, gen, session: s, result }).await;
                });
                true
            }
            (_, topics::ERROR) => false,
            (_, other) => {
                debug!(signer = %id, suffix = other, "LSS: message outside a dance or request; ignored");
                true
            }
        }
    }

    /// A task's report. `hsmd_init` gives the init-3 frame for a dance started again.
    pub fn on_event(&mut self, ev: LssEvent, hsmd_init: impl FnOnce() -> Option<Vec<u8>>) -> Next {
        match ev {
            LssEvent::Danced { id, gen, result } => {
                if !self.current(&id, gen) {
                    return Next::Nothing;
                }
                match result {
                    Ok(b) => {
                        let (d, backend) = *b;
                        info!(signer = %id, client_id = %hex::encode(d.identity.client_id), restored_keys = d.restored_keys, "LSS: signer in sync");
                        self.hub.set_lss_server(hex::encode(backend.server().pubkey));
                        self.backend = Some(backend);
                        self.hub.set_lss(&id, LssStatus::Synced);
                        if let Some(m) = self.members.get_mut(&id) {
                            m.retry_delay = Duration::from_secs(1);
                            m.failures = 0;
                            m.phase = Phase::Synced { session: Some(Box::new(d.session)) };
                        }
                        Next::Ready { id, init_reply: d.init_reply }
                    }
                    Err(e) => {
                        let status = if matches!(e, DanceError::Conflict) {
                            LssStatus::Stale
                        } else {
                            LssStatus::Error(e.to_string())
                        };
                        // Status first: the log line is what operators (and tests) wait for.
                        self.hub.set_lss(&id, status);
                        let failures = self.members.get(&id).map_or(0, |m| m.failures + 1);
                        if failures >= MAX_DANCE_FAILURES {
                            error!(signer = %id, error = %e, failures, "LSS: init dance failed too often; disconnecting the signer (it logs in again with its own backoff)");
                            self.members.remove(&id);
                            self.link.disconnect(&id);
                            return Next::Failed(id);
                        }
                        let delay = self.members.get(&id).map_or(Duration::from_secs(1), |m| m.retry_delay);
                        error!(signer = %id, error = %e, retry_in = ?delay, "LSS: init dance failed; the signer is not ready");
                        self.schedule_retry(&id);
                        if let Some(m) = self.members.get_mut(&id) {
                            m.failures = failures;
                        }
                        Next::Failed(id)
                    }
                }
            }
            LssEvent::Stored { id, gen, session, result } => {
                if !self.current(&id, gen) {
                    return Next::Nothing;
                }
                match result {
                    Ok((topic, payload)) => {
                        if let Err(e) = self.link.publish(&topics::topic(&id, topic), payload.into()) {
                            warn!(signer = %id, error = %e, "LSS: cannot answer the signer's lss-res");
                        }
                        if topic == topics::LSS_CONFLICT {
                            self.hub.set_lss(&id, LssStatus::Stale);
                            self.start_dance(&id, hsmd_init());
                            return Next::NotReady(id);
                        }
                        if let Some(Member { phase: Phase::Synced { session: s }, .. }) = self.members.get_mut(&id) {
                            *s = Some(session);
                        }
                        Next::Nothing
                    }
                    Err(e) => {
                        // Unknown whether LSS stored it: the signer holds its reply; re-sync it.
                        error!(signer = %id, error = %e, "LSS: storing a request's state failed; re-syncing the signer");
                        self.hub.set_lss(&id, LssStatus::Error(e.to_string()));
                        self.start_dance(&id, hsmd_init());
                        Next::NotReady(id)
                    }
                }
            }
            LssEvent::Retry { id, gen } => {
                if self.members.get(&id).is_some_and(|m| m.gen == gen && matches!(m.phase, Phase::Waiting)) {
                    self.start_dance(&id, hsmd_init());
                }
                Next::Nothing
            }
        }
    }

    fn schedule_retry(&mut self, id: &str) {
        let Some(m) = self.members.get_mut(id) else { return };
        m.phase = Phase::Waiting;
        let (tx, gen, id, delay) = (self.tx.clone(), m.gen, id.to_string(), m.retry_delay);
        m.retry_delay = (m.retry_delay * 2).min(MAX_RETRY_DELAY);
        tokio::spawn(async move {
            // A backoff, not synchronisation: the retry is dropped if the signer went meanwhile.
            tokio::time::sleep(delay).await;
            let _ = tx.send(LssEvent::Retry { id, gen }).await;
        });
    }
}
