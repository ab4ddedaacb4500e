//! Owner control messages, wire-compatible with upstream sphinx-key (sphinx-glyph / sphinx-auther):
//!
//! ```text
//! request:  msgpack(ControlMessage) | nonce u64 BE | sig65
//! response: msgpack(ControlResponse) | nonce u64 BE | sig65      (our addition after the msgpack)
//! sig65 = token::sign_message(everything before it)             (LDK message-signing layout)
//! ```
//! Requests are signed by the owner key; the signer accepts a nonce only above the last accepted
//! one and at most [`NONCE_WINDOW`] above it. Responses are signed by the device key over the
//! msgpack and the request's nonce, so an owner can tell a real answer from a forged or replayed
//! one. Upstream's parsers (`rmp_serde::from_slice`) read the msgpack value and ignore the
//! trailing 73 bytes, so they still understand our responses.
//!
//! Enums use serde's default (externally tagged) representation, like upstream: in msgpack a
//! unit variant is its name as a string, a newtype variant a one-entry map `{name: value}`.

use bitcoin::secp256k1::{PublicKey, SecretKey};
use serde::{Deserialize, Serialize};

use crate::token;

/// How far above the last accepted nonce a new one may be.
pub const NONCE_WINDOW: u64 = 20;
/// Largest control message accepted (an allowlist of a few hundred entries fits easily).
pub const MAX_CONTROL_LEN: usize = 64 * 1024;
const TRAILER: usize = 8 + 65;

/// What the owner asks of the signer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// Ask for the last accepted nonce (does not consume one).
    Nonce,
    /// Forget the network settings (on Linux: nothing to forget; acknowledged).
    ResetWifi,
    /// Delete the seed: the device will not sign until a new seed is set.
    ResetKeys,
    /// Delete seed, state, policy and nonce.
    ResetAll,
    /// Read the spending policy.
    QueryPolicy,
    /// Replace the spending policy.
    UpdatePolicy(Policy),
    /// Read the allowlist of payout addresses.
    QueryAllowlist,
    /// Replace the allowlist.
    UpdateAllowlist(Vec<String>),
    /// Read the velocity state (spent in the current interval).
    QueryVelocity,
    /// Firmware update (not supported on Linux: refused).
    Ota(OtaParams),
    /// Policy, allowlist and velocity together.
    QueryAll,
}

/// The signer's answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ControlResponse {
    /// The last accepted nonce.
    Nonce(u64),
    /// Acknowledges ResetWifi.
    ResetWifi,
    /// Acknowledges ResetKeys.
    ResetKeys,
    /// Acknowledges ResetAll.
    ResetAll,
    /// The current policy.
    PolicyCurrent(Policy),
    /// The policy now in force.
    PolicyUpdated(Policy),
    /// The current allowlist.
    AllowlistCurrent(Vec<String>),
    /// The allowlist now in force.
    AllowlistUpdated(Vec<String>),
    /// The velocity state.
    VelocityCurrent(Option<Velocity>),
    /// Acknowledges an OTA (never sent on Linux).
    OtaConfirm(OtaParams),
    /// Everything at once.
    AllCurrent(All),
    /// The request was refused; why.
    Error(String),
}

/// The owner's spending limits.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Outgoing payments allowed per interval, msat (VLS velocity control).
    pub msat_per_interval: u64,
    /// The velocity interval.
    pub interval: Interval,
    /// Largest HTLC value, msat (VLS `max_htlc_value_sat`, rounded down to whole sats).
    pub htlc_limit_msat: u64,
}

impl Default for Policy {
    /// Upstream's defaults: 21,000 sat/day … in msat, 1,000,000 sat HTLCs.
    fn default() -> Self {
        Policy { msat_per_interval: 21_000_000_000, interval: Interval::Daily, htlc_limit_msat: 1_000_000_000 }
    }
}

/// Velocity interval.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    /// Per hour.
    Hourly,
    /// Per day.
    Daily,
}

/// OTA parameters (upstream).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct OtaParams {
    /// Firmware version.
    pub version: u64,
    /// Where to fetch it.
    pub url: String,
}

/// Velocity state.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Velocity {
    /// Spent in the current sliding interval, msat.
    pub spent_msat: u64,
    /// The limit, msat.
    pub limit_msat: u64,
    /// The interval.
    pub interval: Interval,
}

/// QueryAll's answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct All {
    /// Policy.
    pub policy: Policy,
    /// Allowlist.
    pub allowlist: Vec<String>,
    /// Velocity.
    pub velocity: Option<Velocity>,
}

/// Errors reading control messages.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Shorter than msgpack + nonce + signature, or longer than [`MAX_CONTROL_LEN`].
    #[error("control message length {0} out of range")]
    Length(usize),
    /// The signature is not by the expected key.
    #[error("control message signature is not by the expected key")]
    Signature,
    /// The nonce is not above the last one, or too far above it.
    #[error("nonce {got} rejected: must be in {min}..={max}")]
    Nonce {
        /// Offered.
        got: u64,
        /// Lowest acceptable.
        min: u64,
        /// Highest acceptable.
        max: u64,
    },
    /// The last accepted nonce is `u64::MAX`: no nonce is above it, so nothing more can be
    /// accepted (taking `u64::MAX` again would let anyone replay the last message).
    #[error("nonce {got} rejected: the last accepted nonce is u64::MAX, no nonce can be above it")]
    NonceExhausted {
        /// Offered.
        got: u64,
    },
    /// The nonce of a response is not that of the request.
    #[error("response is for nonce {got}, expected {expected}")]
    ResponseNonce {
        /// In the response.
        got: u64,
        /// Of the request.
        expected: u64,
    },
    /// The msgpack does not decode (or has trailing bytes).
    #[error("control message does not decode: {0}")]
    Decode(String),
    /// Encoding failed.
    #[error("control message does not encode: {0}")]
    Encode(String),
}

fn sign(body: Vec<u8>, nonce: u64, key: &SecretKey) -> Vec<u8> {
    let mut out = body;
    out.extend_from_slice(&nonce.to_be_bytes());
    let sig = token::sign_message(&out, key);
    out.extend_from_slice(&sig);
    out
}

/// Splits `body | nonce | sig65`, checking that `key` signed it.
fn open<'a>(input: &'a [u8], key: &PublicKey) -> Result<(&'a [u8], u64), Error> {
    if input.len() < TRAILER + 1 || input.len() > MAX_CONTROL_LEN {
        return Err(Error::Length(input.len()));
    }
    let (signed, sig) = input.split_at(input.len() - 65);
    let signer = token::recover(signed, sig).map_err(|_| Error::Signature)?;
    if signer != *key {
        return Err(Error::Signature);
    }
    let (body, n) = signed.split_at(signed.len() - 8);
    let mut nb = [0u8; 8];
    nb.copy_from_slice(n);
    Ok((body, u64::from_be_bytes(nb)))
}

fn decode_exact<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Error> {
    let mut de = rmp_serde::Deserializer::new(body);
    let v = T::deserialize(&mut de).map_err(|e| Error::Decode(e.to_string()))?;
    if !de.get_ref().is_empty() {
        return Err(Error::Decode(format!("{} trailing bytes", de.get_ref().len())));
    }
    Ok(v)
}

/// Builds a signed control request.
pub fn build_request(msg: &ControlMessage, nonce: u64, owner: &SecretKey) -> Result<Vec<u8>, Error> {
    let body = rmp_serde::to_vec(msg).map_err(|e| Error::Encode(e.to_string()))?;
    Ok(sign(body, nonce, owner))
}

/// Reads a control request signed by `owner`: returns it and its nonce (not yet checked
/// against the last one: see [`check_nonce`]).
pub fn parse_request(input: &[u8], owner: &PublicKey) -> Result<(ControlMessage, u64), Error> {
    let (body, nonce) = open(input, owner)?;
    Ok((decode_exact(body)?, nonce))
}

/// A nonce is accepted only above the last accepted one and at most [`NONCE_WINDOW`] above it.
pub fn check_nonce(last: u64, nonce: u64) -> Result<(), Error> {
    // Not `saturating_add`: with `last == u64::MAX` that made `min == last`, so the last
    // message's nonce was accepted again (a replay). Found by the `control` fuzz target.
    let Some(min) = last.checked_add(1) else {
        return Err(Error::NonceExhausted { got: nonce });
    };
    let max = last.saturating_add(NONCE_WINDOW);
    if nonce < min || nonce > max {
        return Err(Error::Nonce { got: nonce, min, max });
    }
    Ok(())
}

/// Builds the device-signed response to the request with `nonce`.
pub fn build_response(resp: &ControlResponse, nonce: u64, device: &SecretKey) -> Result<Vec<u8>, Error> {
    let body = rmp_serde::to_vec(resp).map_err(|e| Error::Encode(e.to_string()))?;
    Ok(sign(body, nonce, device))
}

/// Reads a response, checking the device's signature and that it answers `nonce`.
pub fn parse_response(input: &[u8], device: &PublicKey, nonce: u64) -> Result<ControlResponse, Error> {
    let (body, got) = open(input, device)?;
    if got != nonce {
        return Err(Error::ResponseNonce { got, expected: nonce });
    }
    decode_exact(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::secp256k1::Secp256k1;

    /// Regression (fuzz target `control`): at `last == u64::MAX` the same nonce was accepted
    /// again, so the last message could be replayed forever.
    #[test]
    fn nonce_never_accepted_twice_even_at_the_top() {
        assert_eq!(check_nonce(u64::MAX, u64::MAX), Err(Error::NonceExhausted { got: u64::MAX }));
        assert!(check_nonce(u64::MAX, 0).is_err());
        assert!(check_nonce(u64::MAX - 1, u64::MAX).is_ok());
        assert!(check_nonce(u64::MAX - 1, u64::MAX - 1).is_err());
        assert!(check_nonce(u64::MAX - NONCE_WINDOW, u64::MAX).is_ok());
        for last in [0, 1, 1000, u64::MAX - 30, u64::MAX - 1] {
            assert!(check_nonce(last, last).is_err(), "{last}");
            assert!(check_nonce(last, last.wrapping_sub(1)).is_err(), "{last}");
        }
    }

    fn keys(b: u8) -> (SecretKey, PublicKey) {
        let sk = SecretKey::from_slice(&[b; 32]).unwrap();
        (sk, PublicKey::from_secret_key(&Secp256k1::new(), &sk))
    }

    #[test]
    fn every_message_round_trips_and_tampering_is_caught() {
        let (osk, opk) = keys(1);
        let msgs = vec![
            ControlMessage::Nonce,
            ControlMessage::ResetWifi,
            ControlMessage::ResetKeys,
            ControlMessage::ResetAll,
            ControlMessage::QueryPolicy,
            ControlMessage::UpdatePolicy(Policy::default()),
            ControlMessage::QueryAllowlist,
            ControlMessage::UpdateAllowlist(vec!["bcrt1qwd0sxj7f47k67wysm20xut2drv7t2stu7fesk4".into()]),
            ControlMessage::QueryVelocity,
            ControlMessage::Ota(OtaParams { version: 2, url: "https://x".into() }),
            ControlMessage::QueryAll,
        ];
        for (i, m) in msgs.iter().enumerate() {
            let b = build_request(m, 10 + i as u64, &osk).unwrap();
            assert_eq!(parse_request(&b, &opk).unwrap(), (m.clone(), 10 + i as u64));
            let mut t = b.clone();
            t[0] ^= 1;
            assert!(parse_request(&t, &opk).is_err());
            let (_, other) = keys(2);
            assert_eq!(parse_request(&b, &other), Err(Error::Signature));
            for cut in 0..b.len() {
                assert!(parse_request(&b[..cut], &opk).is_err());
            }
        }
    }

    #[test]
    fn nonce_window() {
        assert!(check_nonce(5, 5).is_err());
        assert!(check_nonce(5, 4).is_err());
        assert!(check_nonce(5, 6).is_ok());
        assert!(check_nonce(5, 25).is_ok());
        assert!(check_nonce(5, 26).is_err());
    }

    #[test]
    fn responses_are_signed_bound_to_the_nonce_and_upstream_readable() {
        let (dsk, dpk) = keys(3);
        let r = ControlResponse::PolicyUpdated(Policy::default());
        let b = build_response(&r, 7, &dsk).unwrap();
        assert_eq!(parse_response(&b, &dpk, 7).unwrap(), r);
        assert!(matches!(parse_response(&b, &dpk, 8), Err(Error::ResponseNonce { .. })));
        let (_, other) = keys(4);
        assert_eq!(parse_response(&b, &other, 7), Err(Error::Signature));
        // What upstream does: rmp_serde::from_slice on the whole payload.
        let up: ControlResponse = rmp_serde::from_slice(&b).unwrap();
        assert_eq!(up, r);
    }

    #[test]
    fn upstream_msgpack_shapes() {
        // Unit variant: the name as a string; newtype: a one-entry map.
        assert_eq!(rmp_serde::to_vec(&ControlMessage::Nonce).unwrap(), b"\xa5Nonce".to_vec());
        let v = rmp_serde::to_vec(&ControlMessage::UpdateAllowlist(vec![])).unwrap();
        assert_eq!(v[0], 0x81, "fixmap of one entry");
    }
}
