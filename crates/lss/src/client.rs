//! A Lightning Storage Server client with bounded waits.
//!
//! Wraps `lightning_storage_server::client::Client` (unprivileged: it authenticates with the
//! signer's auth token and passes HMACs through). Every call, including connecting, is bounded
//! by the configured timeout. Versions are `u64` here and `i64` in LSS; a value that does not
//! fit either way is an error, not a wrap.

use std::time::Duration;

use bitcoin::secp256k1::PublicKey;
use lightning_storage_server::client::{Auth, Client, ClientError};
use lightning_storage_server::Value;
use sphinx_wire::lss::{BrokerMutations, InitResponse, Mutation, SignerMutations, HASH_LEN, PUBKEY_LEN};
use tracing::debug;

/// Default bound on one LSS call (connect, `Info`, `Get`, `Put`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What an LSS call failed with.
#[derive(Debug, thiserror::Error)]
pub enum LssError {
    /// The server could not be reached (connection refused, TLS, bad URL).
    #[error("cannot reach LSS at {url}: {reason}")]
    Connect {
        /// Server URL.
        url: String,
        /// Transport error.
        reason: String,
    },
    /// The call did not complete in time.
    #[error("LSS {op} did not answer within {after:?}")]
    Timeout {
        /// Which call.
        op: &'static str,
        /// The bound.
        after: Duration,
    },
    /// The server refused the call (bad auth token, bad client HMAC, unsorted keys, internal error).
    #[error("LSS {op} refused: {reason}")]
    Refused {
        /// Which call.
        op: &'static str,
        /// gRPC status.
        reason: String,
    },
    /// The server's answer does not make sense (bad key, HMAC of the wrong length, negative version).
    #[error("invalid answer from LSS: {0}")]
    InvalidResponse(String),
    /// A `Put` version conflict: another writer stored newer versions. The current values of the
    /// conflicting keys (`None`: the key does not exist in LSS).
    #[error("LSS put conflict on {} key(s): the writer's state is stale", .0.len())]
    Conflict(Vec<(String, Option<Mutation>)>),
    /// A mutation this client cannot send (version above `i64::MAX`, keys not sorted).
    #[error("cannot send to LSS: {0}")]
    BadRequest(String),
}

/// The server's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    /// Compressed server public key (the signer derives its shared secret from it).
    pub pubkey: [u8; PUBKEY_LEN],
    /// Version string the server reports.
    pub version: String,
}

async fn bounded<T>(
    op: &'static str,
    after: Duration,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
    url: &str,
) -> Result<T, LssError> {
    match tokio::time::timeout(after, f).await {
        Err(_) => Err(LssError::Timeout { op, after }),
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(map_err(op, e, url)),
    }
}

fn map_err(op: &'static str, e: ClientError, url: &str) -> LssError {
    match e {
        ClientError::Connect(t) => LssError::Connect { url: url.to_string(), reason: t.to_string() },
        ClientError::Tonic(s) if s.code() == tonic::Code::Unavailable => {
            LssError::Connect { url: url.to_string(), reason: s.message().to_string() }
        }
        ClientError::Tonic(s) => LssError::Refused { op, reason: format!("{:?}: {}", s.code(), s.message()) },
        ClientError::PutConflict(c) => match conflicts(c) {
            Ok(c) => LssError::Conflict(c),
            Err(e) => e,
        },
        ClientError::InvalidResponse => LssError::InvalidResponse("malformed reply".into()),
        other => LssError::InvalidResponse(other.to_string()),
    }
}

fn to_mutation(key: String, v: Value) -> Result<Mutation, LssError> {
    let version =
        u64::try_from(v.version).map_err(|_| LssError::InvalidResponse(format!("key {key}: version {}", v.version)))?;
    Ok(Mutation { key, version, value: v.value })
}

fn conflicts(c: Vec<(String, Value)>) -> Result<Vec<(String, Option<Mutation>)>, LssError> {
    c.into_iter()
        .map(|(k, v)| if v.version < 0 { Ok((k, None)) } else { to_mutation(k.clone(), v).map(|m| (k, Some(m))) })
        .collect()
}

/// A connection to one LSS server, authenticated as one signer (its persistence key and token).
pub struct LssClient {
    url: String,
    timeout: Duration,
    client: Client,
    client_id: [u8; PUBKEY_LEN],
}

impl LssClient {
    /// The server's key and version (`Info`).
    pub async fn info(url: &str, timeout: Duration) -> Result<ServerInfo, LssError> {
        let (pk, version) = bounded("info", timeout, Client::get_info(url), url).await?;
        Ok(ServerInfo { pubkey: pk.serialize(), version })
    }

    /// Connects as the signer that answered `init-1-res` (its client id and auth token).
    pub async fn connect(url: &str, timeout: Duration, init: &InitResponse) -> Result<LssClient, LssError> {
        let client_id = PublicKey::from_slice(&init.client_id)
            .map_err(|e| LssError::BadRequest(format!("client id is not a public key: {e}")))?;
        let auth = Auth { client_id, token: init.auth_token.to_vec() };
        let client = bounded("connect", timeout, Client::new(url, auth), url).await?;
        debug!(url, client_id = %hex::encode(init.client_id), "connected to LSS");
        Ok(LssClient { url: url.to_string(), timeout, client, client_id: init.client_id })
    }

    /// The signer this connection is authenticated as.
    pub fn client_id(&self) -> [u8; PUBKEY_LEN] {
        self.client_id
    }

    /// Every key of the client with the server's HMAC over them and `nonce` (`Get` with prefix "").
    pub async fn get_all(&mut self, nonce: &[u8; HASH_LEN]) -> Result<BrokerMutations, LssError> {
        self.get_prefix("", nonce).await
    }

    /// The client's keys starting with `prefix`, with the server's HMAC over them and `nonce`.
    pub async fn get_prefix(&mut self, prefix: &str, nonce: &[u8; HASH_LEN]) -> Result<BrokerMutations, LssError> {
        let (timeout, url) = (self.timeout, self.url.clone());
        let (kvs, hmac) = bounded("get", timeout, self.client.get(prefix.to_string(), nonce), &url).await?;
        let server_hmac: [u8; HASH_LEN] = hmac
            .as_slice()
            .try_into()
            .map_err(|_| LssError::InvalidResponse(format!("get HMAC of {} bytes", hmac.len())))?;
        let muts = kvs.into_iter().map(|(k, v)| to_mutation(k, v)).collect::<Result<Vec<_>, _>>()?;
        Ok(BrokerMutations { server_hmac: Some(server_hmac), muts })
    }

    /// Stores a signer's mutations atomically. Returns the server's HMAC (for the signer to check);
    /// a version conflict is [`LssError::Conflict`] and stores nothing. An empty set is not sent.
    pub async fn put(&mut self, m: &SignerMutations) -> Result<Option<[u8; HASH_LEN]>, LssError> {
        if m.muts.is_empty() {
            return Ok(None);
        }
        if m.muts.windows(2).any(|w| w[0].key > w[1].key) {
            return Err(LssError::BadRequest("keys are not sorted".into()));
        }
        let kvs = m
            .muts
            .iter()
            .map(|x| {
                let version = i64::try_from(x.version)
                    .map_err(|_| LssError::BadRequest(format!("key {}: version {}", x.key, x.version)))?;
                Ok((x.key.clone(), Value { version, value: x.value.clone() }))
            })
            .collect::<Result<Vec<_>, LssError>>()?;
        let (timeout, url) = (self.timeout, self.url.clone());
        let hmac = bounded("put", timeout, self.client.put(kvs, &m.client_hmac), &url).await?;
        let hmac: [u8; HASH_LEN] = hmac
            .as_slice()
            .try_into()
            .map_err(|_| LssError::InvalidResponse(format!("put HMAC of {} bytes", hmac.len())))?;
        Ok(Some(hmac))
    }
}
