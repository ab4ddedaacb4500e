//! lightningd's `hsmd_init`: every check and record the broker keeps of it, in one place.
//!
//! The init is the one request whose meaning the broker needs besides relaying it:
//!
//! 1. **Chain** ([`check_chain`], called by [`crate::hsmd`] before relaying): an init for another
//!    chain than the configured network is refused, and lightningd is told why.
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
}

/// Refuses an `hsmd_init` (`msg`: type + body) whose chain is not `network`'s.
pub fn check_chain(msg: &[u8], network: Network) -> Result<(), InitError> {
    let got = hsmd::parse_init_chain_hash(msg)?;
    let want = ChainHash::using_genesis_block(network).to_bytes();
    if got != want {
        return Err(WrongChain { got: hex::encode(got), network, want: hex::encode(want) }.into());
    }
    Ok(())
}

/// The `hsmd_init` lightningd sent, to replay to every signer that connects after it.
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
