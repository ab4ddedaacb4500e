//! Who may log in to the embedded MQTT server: the login policy for signers ([`TokenAuth`]).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitcoin::secp256k1::PublicKey;
use sphinx_mqtt_server::Authenticator;
use sphinx_wire::{token, unix_now};

use crate::pin::{PinError, PinStore};

/// Signer login: a fresh sphinx-key token for the key in the username, which must be the
/// pinned node id once there is one. The identity (topic prefix) is the MQTT client id, as
/// upstream sphinx-key has it, so that several devices with one seed (one node key) are told
/// apart; a login without a usable client id gets the node id in hex (what sphinx-key sent as
/// its client id before it had one of its own). Which node key each identity logged in with is
/// kept in [`Identities`] for the relay (the pin check is on the node key). A client id that is
/// a node id other than the login's key is refused: it would take the identity (and the
/// sessions) of that node's legacy devices.
///
/// Each token is accepted once: a login with the same key and token time as one accepted within
/// the window is refused, so a captured password cannot be replayed while it is still fresh, in
/// its own bytes or as another signature of the same login (the token check refuses high-`s`
/// twins; the memory is keyed on what was signed, not on the bytes). For the pinned key this
/// holds across broker restarts too: its last accepted token time is kept on disk and a login
/// must carry a later one; checking and recording that time is one step under a lock, and a
/// login is refused when the file cannot be read. (A signer reconnecting within the same second
/// makes the same token; it is refused and retries after its backoff with a new one.)
pub struct TokenAuth {
    pin: Arc<PinStore>,
    identities: Arc<Identities>,
    window: Duration,
    /// (key, token time) of logins accepted within the window, with the unix time they are
    /// forgotten.
    seen: Mutex<HashMap<(PublicKey, u32), u64>>,
    /// `data_dir/pinned-last-login`: the pinned key's last accepted token time.
    last_login_path: PathBuf,
    /// Held across reading, comparing and durably writing [`TokenAuth::last_login_path`], so
    /// that concurrent logins are checked one after the other against each other's writes.
    last_login: Mutex<()>,
}

/// Longest client id used as an identity; a longer one is refused.
pub const MAX_CLIENT_ID: usize = 128;

/// Which node key each MQTT identity (client id) logged in with, written by [`TokenAuth`] at
/// login and read by the broker when the session's events arrive. Bounded
/// ([`Identities::MAX`]): beyond it the map is cleared of everything but the newest entry (a
/// session whose entry was dropped before its events were read is disconnected by the reader).
#[derive(Debug, Default)]
pub struct Identities {
    map: Mutex<HashMap<String, String>>,
}

impl Identities {
    /// Identities remembered at most.
    pub const MAX: usize = 1024;

    /// `identity` logged in with node key `node_id`.
    pub fn record(&self, identity: &str, node_id: &str) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= Self::MAX && !m.contains_key(identity) {
            m.clear();
        }
        m.insert(identity.to_string(), node_id.to_string());
    }

    /// The node key `identity` last logged in with.
    pub fn node_of(&self, identity: &str) -> Option<String> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(identity).cloned()
    }
}

/// The identity a login gets: its client id when usable (non-empty, at most
/// [`MAX_CLIENT_ID`] bytes, a valid topic level), else the node id.
pub fn identity_for(client_id: &str, node_id: &str) -> String {
    if !client_id.is_empty() && client_id.len() <= MAX_CLIENT_ID && sphinx_mqtt_server::topic::valid_identity(client_id)
    {
        client_id.to_string()
    } else {
        node_id.to_string()
    }
}

/// Whether `s` is spelled like a node id (33 bytes in lowercase hex).
pub fn is_node_id(s: &str) -> bool {
    s.len() == 66 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Longest `pinned-last-login` read (it holds one decimal u32 and a newline).
const LAST_LOGIN_MAX: u64 = 64;

impl TokenAuth {
    /// Tokens must be within `window` of our clock and signed by the pinned key (if any);
    /// `data_dir` keeps the pinned key's last login time.
    pub fn new(pin: Arc<PinStore>, window: Duration, data_dir: &Path) -> Self {
        Self::with_identities(pin, window, data_dir, Arc::default())
    }

    /// [`TokenAuth::new`], recording each accepted identity's node key in `identities`.
    pub fn with_identities(pin: Arc<PinStore>, window: Duration, data_dir: &Path, identities: Arc<Identities>) -> Self {
        TokenAuth {
            pin,
            identities,
            window,
            seen: Mutex::new(HashMap::new()),
            last_login_path: data_dir.join("pinned-last-login"),
            last_login: Mutex::new(()),
        }
    }

    /// Records the login of `key` at token time `ts` as used; false if it was used before.
    fn first_use(&self, key: PublicKey, ts: u32, now: u64) -> bool {
        let Ok(mut seen) = self.seen.lock() else { return false };
        seen.retain(|_, forget_at| *forget_at > now);
        // Remembered for two windows: a token is valid from ts - window to ts + window.
        seen.insert((key, ts), now + 2 * self.window.as_secs() + 1).is_none()
    }

    /// For the pinned key: the token must be later than the last accepted one, durably. Blocks
    /// on the file (read, fsync): call it through [`off_the_workers`].
    fn advance_pinned_login(&self, ts: u32) -> Result<(), LoginError> {
        // The guard protects no data, only the order of file operations: a poisoned lock (a
        // panic mid-write) leaves the file old or new, never torn, so carry on.
        let _order = self.last_login.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = self.read_last_login()? {
            if ts <= last {
                return Err(LoginError::NotAfterLastLogin { ts, last });
            }
        }
        crate::pin::write_durably(&self.last_login_path, format!("{ts}\n").as_bytes())
            .map_err(|source| LoginError::Record { path: self.last_login_path.clone(), source })
    }

    /// The pinned key's last login time; `None` if it never logged in while pinned (no file).
    /// A file that exists but cannot be read or parsed is an error: skipping the check would let
    /// a replayed token in.
    fn read_last_login(&self) -> Result<Option<u32>, LoginError> {
        let path = &self.last_login_path;
        let unreadable = |why: String| LoginError::LastLoginUnreadable { path: path.clone(), why };
        let mut text = String::new();
        match std::fs::File::open(path) {
            Ok(f) => f.take(LAST_LOGIN_MAX).read_to_string(&mut text).map_err(|e| unreadable(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unreadable(e.to_string())),
        };
        match text.trim().parse::<u32>() {
            Ok(last) => Ok(Some(last)),
            Err(_) => {
                Err(unreadable(format!("expected a unix time, found {:?}", text.chars().take(20).collect::<String>())))
            }
        }
    }
}

/// Runs blocking file work (a read and an fsync) without stalling the other tasks of the async
/// worker it is called on. `Authenticator::authenticate` is synchronous and the MQTT server calls
/// it on the connection's task, so `spawn_blocking` (which must be awaited) is not available
/// here; on tokio's multi-thread runtime (the broker's) `block_in_place` hands this worker's
/// other tasks to another thread while this one waits for the disk. Elsewhere (a current-thread
/// runtime, no runtime) it runs inline. Only the pinned key's fresh, first-use tokens get here,
/// so no outsider can make the broker fsync at will.
fn off_the_workers<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Why [`TokenAuth`] refused a login (logged by the MQTT server).
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// No MQTT username.
    #[error("no username (expected the signer's node id)")]
    NoUsername,
    /// No MQTT password.
    #[error("no password (expected a sphinx-key token)")]
    NoPassword,
    /// The token is malformed, stale, or not signed by the username's key.
    #[error(transparent)]
    Token(#[from] token::Error),
    /// The username is not the signing key's node id as topics spell it.
    #[error("username must be the node id in lowercase hex ({0})")]
    NotNodeId(String),
    /// The client id is another node's id.
    #[error("client id {client_id} is another node's id than the login's ({node_id})")]
    ClientIdOfAnotherNode {
        /// The client id.
        client_id: String,
        /// The login's node id.
        node_id: String,
    },
    /// Another key is pinned.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// This token was accepted before, within its window.
    #[error("token already used (replayed login)")]
    Replayed,
    /// The pinned key's token is not later than its last accepted one.
    #[error("token time {ts} is not after the last login ({last}): replayed or clock went back")]
    NotAfterLastLogin {
        /// The token's time.
        ts: u32,
        /// The last accepted login's.
        last: u32,
    },
    /// The pinned key's last login time exists but cannot be read: the login is refused rather
    /// than let through unchecked.
    #[error(
        "cannot read the last login time in {} ({why}); refusing the pinned signer's login: fix the file \
         (one unix time) or remove it (then any fresh token is accepted once)",
        path.display()
    )]
    LastLoginUnreadable {
        /// `data_dir/pinned-last-login`.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The login time could not be recorded durably.
    #[error("cannot record the login time in {}: {source}", path.display())]
    Record {
        /// `data_dir/pinned-last-login`.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl Authenticator for TokenAuth {
    type Error = LoginError;

    fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<String, LoginError> {
        let user = username.ok_or(LoginError::NoUsername)?;
        let pass = password.ok_or(LoginError::NoPassword)?;
        let now = unix_now();
        let key = token::verify(user, pass, now, self.window.as_secs())?;
        let id = key.to_string();
        if id != user {
            return Err(LoginError::NotNodeId(id));
        }
        let identity = identity_for(client_id, &id);
        if identity != id && is_node_id(&identity) {
            return Err(LoginError::ClientIdOfAnotherNode { client_id: identity, node_id: id });
        }
        self.pin.allows(&id)?;
        let ts = token::timestamp(pass)?;
        if !self.first_use(key, ts, now) {
            return Err(LoginError::Replayed);
        }
        if self.pin.get().as_deref() == Some(id.as_str()) {
            off_the_workers(|| self.advance_pinned_login(ts))?;
        }
        self.identities.record(&identity, &id);
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::secp256k1::{Secp256k1, SecretKey};

    #[test]
    fn token_login_fresh_once_pinned_key_only() {
        let dir = std::env::temp_dir().join(format!("auth-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pin = Arc::new(PinStore::open(&dir).unwrap());
        let auth = TokenAuth::new(pin.clone(), Duration::from_secs(300), &dir);
        let sk = SecretKey::from_slice(&[0x41; 32]).unwrap();
        let id = PublicKey::from_secret_key(&Secp256k1::new(), &sk).to_string();
        let now = unix_now();
        let tok = token::make(&sk, now as u32);
        assert_eq!(auth.authenticate("c", Some(&id), Some(tok.as_bytes())).unwrap(), "c");
        assert!(auth
            .authenticate("c", Some(&id), Some(tok.as_bytes()))
            .unwrap_err()
            .to_string()
            .contains("already used"));
        let stale = token::make(&sk, (now - 3600) as u32);
        assert!(auth.authenticate("c", Some(&id), Some(stale.as_bytes())).is_err());
        assert!(auth.authenticate("c", None, None).is_err());
        assert!(auth.authenticate("c", Some(&id), Some(b"wrong")).is_err());
        // Another key is fine until a node id is pinned, refused after.
        let other = SecretKey::from_slice(&[0x42; 32]).unwrap();
        let other_id = PublicKey::from_secret_key(&Secp256k1::new(), &other).to_string();
        let t2 = token::make(&other, now as u32);
        pin.pin(&id).unwrap();
        assert!(auth.authenticate("c", Some(&other_id), Some(t2.as_bytes())).is_err());
        // The pinned key's logins must move forward in time, across broker restarts.
        let t3 = token::make(&sk, now as u32 + 1);
        assert!(auth.authenticate("c", Some(&id), Some(t3.as_bytes())).is_ok());
        let restarted = TokenAuth::new(pin.clone(), Duration::from_secs(300), &dir);
        let err = restarted.authenticate("c", Some(&id), Some(t3.as_bytes())).unwrap_err().to_string();
        assert!(err.contains("not after the last login"), "{err}");
        let t4 = token::make(&sk, now as u32 + 2);
        assert!(restarted.authenticate("c", Some(&id), Some(t4.as_bytes())).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn temp_dir(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("auth-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn signer(b: u8) -> (SecretKey, String) {
        let sk = SecretKey::from_slice(&[b; 32]).unwrap();
        (sk, PublicKey::from_secret_key(&Secp256k1::new(), &sk).to_string())
    }

    /// base64url (padded), for a token made by hand.
    fn b64url(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for c in bytes.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// A second valid (low-s) token of `sk` for time `ts`, with another signing nonce than
    /// [`token::make`]'s: different bytes, same login.
    fn other_signature(sk: &SecretKey, ts: u32) -> String {
        use bitcoin::hashes::{sha256d, Hash};
        use bitcoin::secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
        use bitcoin::secp256k1::Message;
        let secp = Secp256k1::new();
        let mut m = b"Lightning Signed Message:".to_vec();
        m.extend_from_slice(&ts.to_be_bytes());
        let msg = Message::from_digest(sha256d::Hash::hash(&m).to_byte_array());
        let compact = secp.sign_ecdsa_with_noncedata(&msg, sk, &[7; 32]).serialize_compact();
        let pk = PublicKey::from_secret_key(&secp, sk);
        let rid = (0..4)
            .find(|i| {
                let rs = RecoverableSignature::from_compact(&compact, RecoveryId::from_i32(*i).unwrap()).unwrap();
                secp.recover_ecdsa(&msg, &rs).ok() == Some(pk)
            })
            .unwrap();
        let mut raw = ts.to_be_bytes().to_vec();
        raw.push(31 + rid as u8);
        raw.extend_from_slice(&compact);
        b64url(&raw)
    }

    #[test]
    fn a_login_is_accepted_once_whatever_its_signature_bytes() {
        let dir = temp_dir("once");
        let pin = Arc::new(PinStore::open(&dir.0).unwrap());
        let auth = TokenAuth::new(pin.clone(), Duration::from_secs(300), &dir.0);
        let (sk, id) = signer(0x41);
        let ts = unix_now() as u32;
        let tok = token::make(&sk, ts);
        assert_eq!(auth.authenticate("c", Some(&id), Some(tok.as_bytes())).unwrap(), "c");
        // Before a pin: the high-s twin of the captured token, and another valid signature of
        // the same login, are both refused.
        let twin = token::high_s_twin(tok.as_bytes()).unwrap();
        let err = auth.authenticate("c", Some(&id), Some(twin.as_bytes())).unwrap_err();
        assert!(matches!(err, LoginError::Token(token::Error::HighS)), "{err}");
        let again = other_signature(&sk, ts);
        assert_ne!(again, tok);
        token::verify(&id, again.as_bytes(), unix_now(), 300).unwrap();
        let err = auth.authenticate("c", Some(&id), Some(again.as_bytes())).unwrap_err();
        assert!(matches!(err, LoginError::Replayed), "{err}");
        // After the pin (login time not on disk yet: that login predates the pin): the same.
        pin.pin(&id).unwrap();
        let err = auth.authenticate("c", Some(&id), Some(twin.as_bytes())).unwrap_err();
        assert!(matches!(err, LoginError::Token(token::Error::HighS)), "{err}");
        let err = auth.authenticate("c", Some(&id), Some(again.as_bytes())).unwrap_err();
        assert!(matches!(err, LoginError::Replayed), "{err}");
        // A pinned login, then its twin: refused as high-s, not only by the login-time rule.
        let t2 = token::make(&sk, ts + 1);
        auth.authenticate("c", Some(&id), Some(t2.as_bytes())).unwrap();
        let twin2 = token::high_s_twin(t2.as_bytes()).unwrap();
        let err = auth.authenticate("c", Some(&id), Some(twin2.as_bytes())).unwrap_err();
        assert!(matches!(err, LoginError::Token(token::Error::HighS)), "{err}");
    }

    #[test]
    fn the_identity_is_the_client_id_with_its_node_key_recorded() {
        let dir = temp_dir("identity");
        let pin = Arc::new(PinStore::open(&dir.0).unwrap());
        let ids = Arc::new(Identities::default());
        let auth = TokenAuth::with_identities(pin, Duration::from_secs(300), &dir.0, ids.clone());
        let (sk, id) = signer(0x45);
        let (_, other) = signer(0x46);
        let ts = unix_now() as u32;
        // Two devices of one node: own identities, one node key.
        assert_eq!(auth.authenticate("dev-a", Some(&id), Some(token::make(&sk, ts).as_bytes())).unwrap(), "dev-a");
        assert_eq!(auth.authenticate("dev-b", Some(&id), Some(token::make(&sk, ts + 1).as_bytes())).unwrap(), "dev-b");
        assert_eq!((ids.node_of("dev-a"), ids.node_of("dev-b")), (Some(id.clone()), Some(id.clone())));
        // Legacy clients (client id = node id) and unusable client ids get the node id.
        assert_eq!(auth.authenticate(&id, Some(&id), Some(token::make(&sk, ts + 2).as_bytes())).unwrap(), id);
        assert_eq!(auth.authenticate("", Some(&id), Some(token::make(&sk, ts + 3).as_bytes())).unwrap(), id);
        assert_eq!(auth.authenticate("a/b", Some(&id), Some(token::make(&sk, ts + 4).as_bytes())).unwrap(), id);
        // Another node's id as client id would take that node's legacy identity: refused.
        let err = auth.authenticate(&other, Some(&id), Some(token::make(&sk, ts + 5).as_bytes())).unwrap_err();
        assert!(matches!(err, LoginError::ClientIdOfAnotherNode { .. }), "{err}");
        assert_eq!(ids.node_of(&other), None);
    }

    #[test]
    fn concurrent_logins_are_ordered_and_the_latest_is_recorded() {
        let dir = temp_dir("concurrent");
        let pin = Arc::new(PinStore::open(&dir.0).unwrap());
        let (sk, id) = signer(0x43);
        pin.pin(&id).unwrap();
        let auth = Arc::new(TokenAuth::new(pin, Duration::from_secs(300), &dir.0));
        let base = unix_now() as u32 - 200;
        const THREADS: u32 = 24;
        for round in 0..4u32 {
            let barrier = Arc::new(std::sync::Barrier::new(THREADS as usize));
            let results: Vec<(u32, Result<String, String>)> = std::thread::scope(|sc| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|i| {
                        let ts = base + round * THREADS + i;
                        let tok = token::make(&sk, ts);
                        let (auth, barrier, id) = (auth.clone(), barrier.clone(), id.clone());
                        sc.spawn(move || {
                            barrier.wait();
                            (ts, auth.authenticate("c", Some(&id), Some(tok.as_bytes())).map_err(|e| e.to_string()))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let max = base + round * THREADS + THREADS - 1;
            for (ts, r) in &results {
                if let Err(e) = r {
                    // Only the order can refuse a login here: never a file error.
                    assert!(e.contains("is not after the last login"), "login at {ts}: {e}");
                }
            }
            assert!(results.iter().any(|(ts, r)| *ts == max && r.is_ok()), "the latest login is accepted: {results:?}");
            let stored = std::fs::read_to_string(dir.0.join("pinned-last-login")).unwrap();
            assert_eq!(stored.trim(), max.to_string(), "the stored time is the latest accepted");
        }
        // No temporary file is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn an_unreadable_or_garbage_last_login_file_refuses_the_pinned_login() {
        let dir = temp_dir("garbage");
        let pin = Arc::new(PinStore::open(&dir.0).unwrap());
        let (sk, id) = signer(0x44);
        pin.pin(&id).unwrap();
        let auth = TokenAuth::new(pin, Duration::from_secs(300), &dir.0);
        let path = dir.0.join("pinned-last-login");
        let now = unix_now() as u32;
        std::fs::write(&path, "not a time\n").unwrap();
        let err = auth.authenticate("c", Some(&id), Some(token::make(&sk, now).as_bytes())).unwrap_err();
        assert!(matches!(err, LoginError::LastLoginUnreadable { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("cannot read the last login time") && text.contains("not a time"), "{text}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a time\n", "left as it was");
        // Unreadable (a directory in its place: fails for root too).
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let err = auth.authenticate("c", Some(&id), Some(token::make(&sk, now + 1).as_bytes())).unwrap_err();
        assert!(matches!(err, LoginError::LastLoginUnreadable { .. }), "{err}");
        // Removed: the next fresh token is accepted and recorded.
        std::fs::remove_dir(&path).unwrap();
        auth.authenticate("c", Some(&id), Some(token::make(&sk, now + 2).as_bytes())).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), (now + 2).to_string());
    }
}
