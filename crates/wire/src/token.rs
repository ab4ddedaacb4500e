//! The MQTT login token, compatible with upstream sphinx-key (sphinx-auther):
//!
//! ```text
//! username = node id, 33-byte compressed key in hex
//! password = base64url(ts u32 BE | sig65)        (padded URL-safe alphabet)
//! sig65    = (31 + recovery id) | r | s          (LDK `message_signing` layout)
//!            over sha256d("Lightning Signed Message:" | ts as 4 BE bytes)
//! ```
//! Upstream never checks `ts`; [`verify`] requires it within a window of `now`, and refuses a
//! signature with a high `s`: `(r, s)` and `(r, n - s)` (with the other recovery id) recover the
//! same key, so accepting both would let anyone turn a captured token into a second, different
//! password for the same login. Signers (libsecp256k1, LDK, upstream) only make low-`s` ones.

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine;
use bitcoin::hashes::{sha256d, Hash};
use bitcoin::secp256k1::ecdsa::{RecoverableSignature, RecoveryId, Signature};
use bitcoin::secp256k1::{Message, PublicKey, Secp256k1, SecretKey};

const PREFIX: &[u8] = b"Lightning Signed Message:";

/// Errors from token verification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not base64url.
    #[error("token is not base64url")]
    Encoding,
    /// Not `4 + 65` bytes.
    #[error("token has {0} bytes, expected 69")]
    Length(usize),
    /// Signature does not parse or recover.
    #[error("token signature is invalid")]
    Signature,
    /// The signature's `s` is in the upper half of the group order: the malleated twin of a
    /// low-`s` signature, which no honest signer makes.
    #[error("token signature has a high s (a malleated copy of another token); refused")]
    HighS,
    /// Signed by a different key than the username claims.
    #[error("token signed by {signer}, username claims {claimed}")]
    WrongKey {
        /// Key that signed.
        signer: String,
        /// Key in the username.
        claimed: String,
    },
    /// The username is not a public key.
    #[error("username is not a node id: {0}")]
    Username(String),
    /// Timestamp outside the accepted window.
    #[error("token timestamp {ts} is {skew}s away from now, window is {window}s")]
    Expired {
        /// Token time.
        ts: u32,
        /// Distance from now, seconds.
        skew: u64,
        /// Allowed distance.
        window: u64,
    },
}

fn digest(msg: &[u8]) -> Message {
    let mut buf = Vec::with_capacity(PREFIX.len() + msg.len());
    buf.extend_from_slice(PREFIX);
    buf.extend_from_slice(msg);
    Message::from_digest(sha256d::Hash::hash(&buf).to_byte_array())
}

/// Signs `msg` the way LDK's `message_signing::sign` does, returning the 65 raw bytes.
pub fn sign_message(msg: &[u8], key: &SecretKey) -> [u8; 65] {
    let secp = Secp256k1::signing_only();
    let sig = secp.sign_ecdsa_recoverable(&digest(msg), key);
    let (rid, compact) = sig.serialize_compact();
    let mut out = [0u8; 65];
    out[0] = 31 + rid.to_i32() as u8;
    out[1..].copy_from_slice(&compact);
    out
}

/// Recovers the key that made a [`sign_message`] signature.
pub fn recover(msg: &[u8], sig: &[u8]) -> Result<PublicKey, Error> {
    if sig.len() != 65 || !(31..=34).contains(&sig[0]) {
        return Err(Error::Signature);
    }
    let rid = RecoveryId::from_i32(i32::from(sig[0]) - 31).map_err(|_| Error::Signature)?;
    let rs = RecoverableSignature::from_compact(&sig[1..], rid).map_err(|_| Error::Signature)?;
    Secp256k1::verification_only().recover_ecdsa(&digest(msg), &rs).map_err(|_| Error::Signature)
}

/// Is the `s` of a [`sign_message`] signature in the upper half of the order (not normalised)?
fn is_high_s(sig: &[u8]) -> Result<bool, Error> {
    let compact = sig.get(1..65).ok_or(Error::Signature)?;
    let sig = Signature::from_compact(compact).map_err(|_| Error::Signature)?;
    let mut low = sig;
    low.normalize_s();
    Ok(low != sig)
}

/// The malleated twin of a token: same time, same key, signature `(r, n - s)` with the other
/// recovery id. It recovers the same key; [`verify`] refuses it ([`Error::HighS`]). For tests of
/// that refusal (anyone who sees a token can compute it).
pub fn high_s_twin(password: &[u8]) -> Result<String, Error> {
    let mut raw = decode(password)?;
    let s = SecretKey::from_slice(&raw[37..69]).map_err(|_| Error::Signature)?;
    raw[37..69].copy_from_slice(&s.negate().secret_bytes());
    // Negating s negates R: the recovery id's parity bit flips.
    raw[4] = 31 + ((raw[4].checked_sub(31).ok_or(Error::Signature)?) ^ 1);
    Ok(URL_SAFE.encode(raw))
}

/// Makes a login token for time `ts` (unix seconds).
pub fn make(key: &SecretKey, ts: u32) -> String {
    let tsb = ts.to_be_bytes();
    let mut buf = tsb.to_vec();
    buf.extend_from_slice(&sign_message(&tsb, key));
    URL_SAFE.encode(buf)
}

/// The timestamp inside a token (unverified: call [`verify`] first).
pub fn timestamp(password: &[u8]) -> Result<u32, Error> {
    let raw = decode(password)?;
    Ok(u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]))
}

/// A token's bytes: base64url of `ts(4) | recovery id + 31 (1) | r(32) | s(32)`, exactly 69.
fn decode(password: &[u8]) -> Result<Vec<u8>, Error> {
    let raw = URL_SAFE.decode(password).map_err(|_| Error::Encoding)?;
    if raw.len() != 69 {
        return Err(Error::Length(raw.len()));
    }
    Ok(raw)
}

/// Checks a login: the token must be signed by the key named in `username` at a time within
/// `window` seconds of `now`. Returns that key.
pub fn verify(username: &str, password: &[u8], now: u64, window: u64) -> Result<PublicKey, Error> {
    let claimed = hex::decode(username)
        .ok()
        .and_then(|b| PublicKey::from_slice(&b).ok())
        .ok_or_else(|| Error::Username(username.chars().take(80).collect()))?;
    let raw = decode(password)?;
    let signer = recover(&raw[..4], &raw[4..])?;
    if is_high_s(&raw[4..])? {
        return Err(Error::HighS);
    }
    if signer != claimed {
        return Err(Error::WrongKey { signer: signer.to_string(), claimed: claimed.to_string() });
    }
    let ts = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let skew = now.abs_diff(u64::from(ts));
    if skew > window {
        return Err(Error::Expired { ts, skew, window });
    }
    Ok(signer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> (SecretKey, String) {
        let sk = SecretKey::from_slice(&[b; 32]).unwrap();
        let pk = PublicKey::from_secret_key(&Secp256k1::new(), &sk);
        (sk, pk.to_string())
    }

    #[test]
    fn accepts_fresh_rejects_stale_and_foreign() {
        let (sk, user) = key(0x41);
        let tok = make(&sk, 1_000_000);
        assert!(verify(&user, tok.as_bytes(), 1_000_100, 300).is_ok());
        assert!(matches!(verify(&user, tok.as_bytes(), 1_000_400, 300), Err(Error::Expired { .. })));
        let (_, other) = key(0x42);
        assert!(matches!(verify(&other, tok.as_bytes(), 1_000_000, 300), Err(Error::WrongKey { .. })));
        assert!(verify(&user, b"garbage", 1_000_000, 300).is_err());
        assert!(verify("zz", tok.as_bytes(), 1_000_000, 300).is_err());
    }

    #[test]
    fn verifies_upstream_sphinx_auther_tokens() {
        // Tokens made by upstream sphinx-auther's own tests (key [0xcd; 32], and a tribe key).
        let (_, user) = key(0xcd);
        let t = "YvM0wyAZBWdHaVsS4sqy-ub3X0JRx7zVTY9O6aL0q_CIV9zOKykO_grPE4DSelinHNX9pTFZ3wEoLhg5QT7EVZpOlj0x";
        let ts = 0x62f334c3u64;
        assert!(verify(&user, t.as_bytes(), ts, 0).is_ok());
        let tribe = "XuOp5B9kC3CcL52svtl_LJJJFbV1OTgnq7thtOjdKJMnOuETIw_hlLkVfonozVIwz5wADlya_i946GiKFZAgMto0cDuk";
        let tribe_key = "02290714deafd0cb33d2be3b634fc977a98a9c9fa1dd6c53cf17d99b350c08c67b";
        assert!(verify(tribe_key, tribe.as_bytes(), 0x5ee3a9e4, 0).is_ok());
    }

    #[test]
    fn matches_ldk_message_signing_layout() {
        // bob's recorded signmessage is zbase32 of the same 65-byte layout; check the header byte range.
        let (sk, _) = key(0x42);
        let s = sign_message(b"x", &sk);
        assert!((31..=34).contains(&s[0]));
        assert_eq!(recover(b"x", &s).unwrap(), PublicKey::from_secret_key(&Secp256k1::new(), &sk));
    }

    #[test]
    fn high_s_twin_of_a_token_is_refused() {
        let (sk, user) = key(0x41);
        let tok = make(&sk, 1_000_000);
        let twin = high_s_twin(tok.as_bytes()).unwrap();
        assert_ne!(twin, tok);
        // The twin is a valid signature by the same key over the same time...
        let raw = URL_SAFE.decode(&twin).unwrap();
        let pk = PublicKey::from_secret_key(&Secp256k1::new(), &sk);
        assert_eq!(recover(&raw[..4], &raw[4..]).unwrap(), pk);
        assert_eq!(timestamp(twin.as_bytes()).unwrap(), 1_000_000);
        // ...but not a login.
        assert_eq!(verify(&user, twin.as_bytes(), 1_000_000, 300), Err(Error::HighS));
        assert!(verify(&user, tok.as_bytes(), 1_000_000, 300).is_ok());
        // Its twin is the original again, accepted.
        assert_eq!(high_s_twin(twin.as_bytes()).unwrap(), tok);
        // The upstream tokens are low-s (see verifies_upstream_sphinx_auther_tokens).
        let t = "YvM0wyAZBWdHaVsS4sqy-ub3X0JRx7zVTY9O6aL0q_CIV9zOKykO_grPE4DSelinHNX9pTFZ3wEoLhg5QT7EVZpOlj0x";
        let (_, cd) = key(0xcd);
        assert_eq!(verify(&cd, high_s_twin(t.as_bytes()).unwrap().as_bytes(), 0x62f334c3, 0), Err(Error::HighS));
    }
}
