//! What the broker does with a signer when LSS is on, over a [`SignerLink`] (MQTT in the broker,
//! direct calls in tests).
//!
//! - [`init_dance`]: on every signer `hello`: `init-1` (server key → client id, token, nonce),
//!   `Get` everything, `init-2` (state → the signer's own mutations), `Put` them, and, when the
//!   broker has lightningd's `hsmd_init`, `init-3`. A `Put` conflict is sent to the signer as
//!   `lss-conflict` and ends the dance with [`DanceError::Conflict`]: the caller runs it again
//!   (the signer re-syncs) or brings in another signer.
//! - [`LssSession::store`]: a request's `lss-res` → `Put` → the `lss-msg` (`Stored`) or
//!   `lss-conflict` (`PutConflict`) answer to send back.
//!
//! The broker never holds the shared secret: it relays the signer's client HMAC to LSS and the
//! server's HMAC to the signer, which checks it.

use std::future::Future;
use std::time::Duration;

use sphinx_wire::lss::{BrokerMutations, Init, InitResponse, Msg, Response};
use sphinx_wire::topics;
use tracing::{debug, info, warn};

use crate::client::{LssClient, LssError, ServerInfo};

/// The transport to one signer: publish on `{id}/{topic}` and wait, bounded, for its next message
/// on one of `answers` (or on `error`).
pub trait SignerLink {
    /// Sends `payload` on `topic` and returns `(suffix, payload)` of the signer's answer.
    fn exchange(
        &mut self,
        topic: &'static str,
        payload: Vec<u8>,
        answers: &'static [&'static str],
    ) -> impl Future<Output = Result<(String, Vec<u8>), LinkError>> + Send;
}

/// The signer could not be reached or did not answer in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("signer link: {0}")]
pub struct LinkError(pub String);

/// Why an init dance did not complete.
#[derive(Debug, thiserror::Error)]
pub enum DanceError {
    /// The signer went away or did not answer in time.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// LSS failed (unreachable, timeout, refused).
    #[error(transparent)]
    Lss(LssError),
    /// The signer answered with an error or something that is not the expected message.
    #[error("signer at {step}: {text}")]
    Signer {
        /// Which step.
        step: &'static str,
        /// What it said, or what was wrong with its answer.
        text: String,
    },
    /// LSS refused the signer's init mutations: its state was stale. It was told (`lss-conflict`).
    #[error("LSS put conflict at init: the signer's state is stale (it re-syncs on the next dance)")]
    Conflict,
}

/// The configured LSS server (`[lss] url`), with its identity read once.
#[derive(Clone, Debug)]
pub struct LssBackend {
    url: String,
    timeout: Duration,
    server: ServerInfo,
}

impl LssBackend {
    /// Asks the server for its key (`Info`), bounded by `timeout` (as is every later call).
    pub async fn new(url: &str, timeout: Duration) -> Result<LssBackend, LssError> {
        let server = LssClient::info(url, timeout).await?;
        info!(url, server = %hex::encode(server.pubkey), version = %server.version, "LSS server");
        Ok(LssBackend { url: url.to_string(), timeout, server })
    }

    /// The server's identity.
    pub fn server(&self) -> &ServerInfo {
        &self.server
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// An authenticated LSS connection for one signer (its persistence key), after a dance.
pub struct LssSession {
    client: LssClient,
}

/// A completed dance.
pub struct Danced {
    /// The signer's LSS session, for [`LssSession::store`].
    pub session: LssSession,
    /// The signer's `init-1-res` (its LSS client id).
    pub identity: InitResponse,
    /// How many keys LSS held for it (what it was brought in sync with).
    pub restored_keys: usize,
    /// The `init-3-res` payload (serial reply frame to `hsmd_init`), if `hsmd_init` was sent.
    pub init_reply: Option<Vec<u8>>,
}

fn expect_answer(step: &'static str, answer: (String, Vec<u8>), want: &str) -> Result<Response, DanceError> {
    let (suffix, payload) = answer;
    if suffix != want {
        let text = if suffix == topics::ERROR {
            String::from_utf8_lossy(&payload).into_owned()
        } else {
            format!("answered on {suffix}, not {want}")
        };
        return Err(DanceError::Signer { step, text });
    }
    Response::decode(&payload).map_err(|e| DanceError::Signer { step, text: e.to_string() })
}

/// Runs the init dance with one signer (module docs). `hsmd_init` is lightningd's `hsmd_init` as a
/// serial request frame, when the broker has it.
pub async fn init_dance<L: SignerLink>(
    lss: &LssBackend,
    link: &mut L,
    hsmd_init: Option<Vec<u8>>,
) -> Result<Danced, DanceError> {
    // 1. Server key → the signer's identity and nonce.
    let msg = Msg::Init(Init { server_pubkey: lss.server.pubkey }).encode();
    let answer = link.exchange(topics::INIT_1_MSG, msg, &[topics::INIT_1_RES]).await?;
    let identity = match expect_answer("init-1", answer, topics::INIT_1_RES)? {
        Response::Init(i) => i,
        other => return Err(DanceError::Signer { step: "init-1", text: format!("sent {other:?}") }),
    };
    let mut client = LssClient::connect(&lss.url, lss.timeout, &identity).await.map_err(DanceError::Lss)?;

    // 2. Its state in LSS (HMAC'd with its nonce) → the mutations it made loading it.
    let state = match identity.nonce {
        Some(nonce) => client.get_all(&nonce).await.map_err(DanceError::Lss)?,
        // Upstream signers send no nonce on a reconnect: they want no state.
        None => BrokerMutations::default(),
    };
    let restored_keys = state.muts.len();
    debug!(keys = restored_keys, "LSS state for the signer");
    let answer = link.exchange(topics::INIT_2_MSG, Msg::Created(state).encode(), &[topics::INIT_2_RES]).await?;
    let created = match expect_answer("init-2", answer, topics::INIT_2_RES)? {
        Response::Created(c) => c,
        other => return Err(DanceError::Signer { step: "init-2", text: format!("sent {other:?}") }),
    };
    match client.put(&created).await {
        Ok(_) => {}
        Err(LssError::Conflict(keys)) => {
            warn!(keys = keys.len(), "LSS conflict on the signer's init mutations");
            tell_conflict(link).await?;
            return Err(DanceError::Conflict);
        }
        Err(e) => return Err(DanceError::Lss(e)),
    }

    // 3. lightningd's hsmd_init.
    let init_reply = match hsmd_init {
        Some(frame) => {
            let (suffix, payload) = link.exchange(topics::INIT_3_MSG, frame, &[topics::INIT_3_RES]).await?;
            if suffix != topics::INIT_3_RES {
                return Err(DanceError::Signer {
                    step: "init-3",
                    text: String::from_utf8_lossy(&payload).into_owned(),
                });
            }
            Some(payload)
        }
        None => None,
    };
    Ok(Danced { session: LssSession { client }, identity, restored_keys, init_reply })
}

async fn tell_conflict<L: SignerLink>(link: &mut L) -> Result<(), LinkError> {
    let (suffix, _) =
        link.exchange(topics::LSS_CONFLICT, Msg::PutConflict.encode(), &[topics::LSS_CONFLICT_RES]).await?;
    if suffix != topics::LSS_CONFLICT_RES {
        warn!(%suffix, "signer did not confirm the conflict");
    }
    Ok(())
}

/// Why a request's mutations were not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The `lss-res` payload is not a `VlsMuts` message.
    #[error("bad lss-res from the signer: {0}")]
    BadPayload(String),
    /// LSS failed or did not answer in time: whether the mutations were stored is unknown, so the
    /// signer must re-sync (init dance) before it goes on; its held reply is not released.
    #[error(transparent)]
    Lss(LssError),
}

impl LssSession {
    /// A request's `lss-res` payload: `Put` its mutations. Returns the topic and payload to send
    /// back: `lss-msg` with the server's HMAC, or `lss-conflict` when LSS has newer state.
    pub async fn store(&mut self, lss_res: &[u8]) -> Result<(&'static str, Vec<u8>), StoreError> {
        let muts = match Response::decode(lss_res) {
            Ok(Response::VlsMuts(m)) => m,
            Ok(other) => return Err(StoreError::BadPayload(format!("{other:?}"))),
            Err(e) => return Err(StoreError::BadPayload(e.to_string())),
        };
        match self.client.put(&muts).await {
            Ok(server_hmac) => {
                Ok((topics::LSS_MSG, Msg::Stored(BrokerMutations { server_hmac, muts: Vec::new() }).encode()))
            }
            Err(LssError::Conflict(keys)) => {
                warn!(keys = keys.len(), "LSS put conflict: the signer's state is stale");
                Ok((topics::LSS_CONFLICT, Msg::PutConflict.encode()))
            }
            Err(e) => Err(StoreError::Lss(e)),
        }
    }

    /// The signer this session stores for.
    pub fn client_id(&self) -> [u8; sphinx_wire::lss::PUBKEY_LEN] {
        self.client.client_id()
    }
}

/// How a signer answered a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Answered {
    /// The answer (`vls-res` frame or `control-res` response), released after LSS stored the state.
    Reply(Vec<u8>),
    /// The signer refused it (`error` payload: `seq | text`).
    Refused(Vec<u8>),
    /// LSS refused the signer's mutations: it is stale and was told; nothing was released. The
    /// caller re-syncs it with [`init_dance`] (or brings in another signer) and sends the
    /// request again.
    Conflict,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The signer went away or did not answer in time.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Storing failed (see [`StoreError`]): the signer holds its reply until it is re-synced.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The signer answered on a topic that does not belong here.
    #[error("signer answered on {0}")]
    Unexpected(String),
}

/// One request to a signer with LSS on, in sequence: `vls` (or `control`) → either the answer at
/// once (no state changed) or `lss-res` → [`LssSession::store`] → `lss-msg` → the held answer;
/// a conflict is sent as `lss-conflict` and reported as [`Answered::Conflict`].
pub async fn request<L: SignerLink>(
    link: &mut L,
    session: &mut LssSession,
    topic: &'static str,
    payload: Vec<u8>,
) -> Result<Answered, RequestError> {
    let answer_topic = if topic == topics::CONTROL { topics::CONTROL_RES } else { topics::VLS_RES };
    const VLS_ANSWERS: &[&str] = &[topics::VLS_RES, topics::LSS_RES];
    const CONTROL_ANSWERS: &[&str] = &[topics::CONTROL_RES, topics::LSS_RES];
    let answers = if topic == topics::CONTROL { CONTROL_ANSWERS } else { VLS_ANSWERS };
    let (suffix, body) = link.exchange(topic, payload, answers).await?;
    let lss_res = match suffix.as_str() {
        s if s == answer_topic => return Ok(Answered::Reply(body)),
        topics::ERROR => return Ok(Answered::Refused(body)),
        topics::LSS_RES => body,
        other => return Err(RequestError::Unexpected(other.to_string())),
    };
    let (back, msg) = session.store(&lss_res).await?;
    if back == topics::LSS_CONFLICT {
        tell_conflict(link).await?;
        return Ok(Answered::Conflict);
    }
    const RELEASED_VLS: &[&str] = &[topics::VLS_RES];
    const RELEASED_CONTROL: &[&str] = &[topics::CONTROL_RES];
    let released = if topic == topics::CONTROL { RELEASED_CONTROL } else { RELEASED_VLS };
    let (suffix, body) = link.exchange(back, msg, released).await?;
    match suffix.as_str() {
        s if s == answer_topic => Ok(Answered::Reply(body)),
        topics::ERROR => Ok(Answered::Refused(body)),
        other => Err(RequestError::Unexpected(other.to_string())),
    }
}
