//! lightningd's `hsmd_init`: every check and record the broker keeps of it, in one place.
//!
//! The init is the one request whose meaning the broker needs besides relaying it:
//!
//! 1. **Check** ([`check_init`], called by [`crate::hsmd`] before relaying): the whole message is
//!    parsed, its TLV stream included. An init for another chain than the configured network is
//!    refused; so is one carrying `hsm_passphrase` (the seed is on the signer device, which
//!    cannot apply a passphrase given to lightningd) or an unknown even TLV; unknown odd TLVs
//!    are dropped (BOLT 1: "it's OK to be odd"), because VLS refuses trailing bytes. The signer's
//!    answer must carry an hsmd wire version inside lightningd's range ([`check_reply_version`]).
//! 2. **Replay** ([`InitReplay`], kept by [`crate::relay`]): the init lightningd sent is
//!    remembered and replayed first to every signer that says `hello` afterwards, so a restarted
//!    signer is initialised exactly as lightningd initialised it.
//! 3. **Reply** ([`check_reply`], called by [`crate::relay`] on the signer's answer): the node id
//!    the signer reports to lightningd must be its MQTT login identity, and becomes (or must be)
//!    the pinned node id.
//! 4. **Done** ([`crate::hsmd::HsmdServer::init_done`]): once lightningd has its answer, chain
//!    following starts.

use bitcoin::constants::ChainHash;
use bitcoin::Network;
use sphinx_wire::hsmd;

use crate::pin::{PinError, PinStore};

/// An `hsmd_init` for another chain than the broker's network.
#[derive(Debug, thiserror::Error)]
#[error("lightningd runs on chain {got}, but the broker is configured for {network} ({want}): set network in the broker config")]
pub struct WrongChain {
    /// Chain hash lightningd sent (hex, wire order).
    pub got: String,
    /// Configured network.
    pub network: Network,
    /// Its chain hash.
    pub want: String,
}

/// Why an `hsmd_init` could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The message is not a well-formed `hsmd_init`.
    #[error(transparent)]
    Wire(#[from] hsmd::Error),
    /// It is for another chain.
    #[error(transparent)]
    WrongChain(#[from] WrongChain),
    /// lightningd was given an `hsm_secret` passphrase, which the remote signer cannot honour.
    #[error(
        "lightningd sent an hsm_passphrase (it was started with --hsm-passphrase or an encrypted hsm_secret), \
         but the seed is on the sphinx-key signer, which cannot apply it: start lightningd without the passphrase \
         (to protect the seed at rest, use `sphinx-key init --encrypt` on the device)"
    )]
    Passphrase,
    /// An even (must-understand) TLV the broker does not know.
    #[error(
        "hsmd_init carries TLV type {0}, which this broker does not understand (even: must be understood); refused"
    )]
    UnknownEvenTlv(u64),
    /// The signer answered with a wire version lightningd does not accept.
    #[error("the signer negotiated hsmd wire version {got}, outside lightningd's range {min}..={max}")]
    VersionOutOfRange {
        /// The version in the signer's reply.
        got: u32,
        /// lightningd's minimum.
        min: u32,
        /// lightningd's maximum.
        max: u32,
    },
}

/// An `hsmd_init` that passed [`check_init`].
#[derive(Debug)]
pub struct CheckedInit {
    /// What to relay to the signer: the init without TLVs the signer must not see.
    pub message: Vec<u8>,
    /// lightningd's accepted wire versions.
    pub versions: (u32, u32),
}

/// Checks lightningd's `hsmd_init` (`msg`: type + body) against the broker's `network`.
pub fn check_init(msg: &[u8], network: Network) -> Result<CheckedInit, InitError> {
    let init = hsmd::parse_init(msg)?;
    let want = ChainHash::using_genesis_block(network).to_bytes();
    if init.chain_hash != want {
        return Err(WrongChain { got: hex::encode(init.chain_hash), network, want: hex::encode(want) }.into());
    }
    for tlv in &init.tlvs {
        match tlv.typ {
            hsmd::INIT_TLV_HSM_PASSPHRASE => return Err(InitError::Passphrase),
            t if t % 2 == 0 => return Err(InitError::UnknownEvenTlv(t)),
            t => tracing::warn!(tlv_type = t, "hsmd_init carries an unknown odd TLV; dropped before relaying"),
        }
    }
    let message = msg[..init.fixed_len].to_vec();
    Ok(CheckedInit { message, versions: (init.min_version, init.max_version) })
}

/// Refuses a signer's init reply whose wire version is outside lightningd's `versions`, so that
/// lightningd is not handed a version it will reject ("HSM version above maximum").
pub fn check_reply_version(versions: (u32, u32), reply: &[u8]) -> Result<(), InitError> {
    let got = hsmd::parse_init_reply(reply)?.hsm_version;
    let (min, max) = versions;
    if !(min..=max).contains(&got) {
        return Err(InitError::VersionOutOfRange { got, min, max });
    }
    Ok(())
}

/// The `hsmd_init` lightningd sent (as checked), to replay to every signer that connects after it.
#[derive(Debug, Default)]
pub struct InitReplay {
    msg: Option<Vec<u8>>,
}

impl InitReplay {
    /// Remembers `msg` if it is an `hsmd_init` (the latest one wins). Returns whether it was.
    pub fn remember(&mut self, msg: &[u8]) -> bool {
        let is_init = hsmd::msg_type(msg).is_ok_and(|t| t == hsmd::HSMD_INIT);
        if is_init {
            self.msg = Some(msg.to_vec());
        }
        is_init
    }

    /// The init to replay, if lightningd has sent one.
    pub fn message(&self) -> Option<&[u8]> {
        self.msg.as_deref()
    }
}

/// Why a signer's init reply is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum InitReplyError {
    /// The reply is not an init reply with a node id.
    #[error(transparent)]
    Wire(#[from] hsmd::Error),
    /// The node id is not the one the signer logged in with.
    #[error("init reply names node {reported}, but the signer logged in as {identity}")]
    NotItsLogin {
        /// The node id in the reply (hex).
        reported: String,
        /// The MQTT identity.
        identity: String,
    },
    /// Another node id is pinned (or the pin could not be written).
    #[error(transparent)]
    Pin(#[from] PinError),
}

/// Checks the init reply `msg` of the signer logged in as `identity`, and pins its node id
/// (durably, before lightningd sees the reply).
pub fn check_reply(identity: &str, msg: &[u8], pin: &PinStore) -> Result<(), InitReplyError> {
    let reported = hex::encode(hsmd::parse_init_reply_node_id(msg)?);
    if reported != identity {
        return Err(InitReplyError::NotItsLogin { reported, identity: identity.to_string() });
    }
    pin.pin(&reported)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// alice's `hsmd_init` (regtest, wire versions 5..=6) from the recorded CLN v25.12.1 session.
    const INIT: &str = "000b043587cf0435839406226e46111a0b59caaf126043eb5bbf28c34f3a5e332a1fc7b2b73cf188910f00000000000000000500000006";

    fn init_with(tlvs: &[u8]) -> Vec<u8> {
        let mut m = hex::decode(INIT).unwrap();
        m.extend_from_slice(tlvs);
        m
    }

    #[test]
    fn plain_init_is_relayed_unchanged() {
        let m = init_with(&[]);
        let c = check_init(&m, Network::Regtest).unwrap();
        assert_eq!(c.message, m);
        assert_eq!(c.versions, (5, 6));
        assert!(matches!(check_init(&m, Network::Bitcoin), Err(InitError::WrongChain(_))));
    }

    #[test]
    fn passphrase_and_unknown_even_tlvs_are_refused_odd_ones_dropped() {
        let e = check_init(&init_with(&[1, 3, b'p', b'w', 0]), Network::Regtest).unwrap_err();
        assert!(matches!(e, InitError::Passphrase), "{e}");
        assert!(e.to_string().contains("sphinx-key init --encrypt"));
        assert!(matches!(check_init(&init_with(&[4, 0]), Network::Regtest), Err(InitError::UnknownEvenTlv(4))));
        let c = check_init(&init_with(&[7, 1, 9]), Network::Regtest).unwrap();
        assert_eq!(c.message, init_with(&[]), "odd TLV dropped: VLS refuses trailing bytes");
        assert!(matches!(check_init(&init_with(&[7, 5, 9]), Network::Regtest), Err(InitError::Wire(_))));
    }

    #[test]
    fn reply_version_must_be_in_lightningds_range() {
        let mut reply = hsmd::HSMD_INIT_REPLY_V4.to_be_bytes().to_vec();
        reply.extend_from_slice(&6u32.to_be_bytes());
        reply.extend_from_slice(&0u16.to_be_bytes());
        reply.extend_from_slice(&[2u8; 33 + 78 + 33]);
        assert!(check_reply_version((5, 6), &reply).is_ok());
        let e = check_reply_version((4, 5), &reply).unwrap_err();
        assert!(matches!(e, InitError::VersionOutOfRange { got: 6, min: 4, max: 5 }), "{e}");
    }
}
