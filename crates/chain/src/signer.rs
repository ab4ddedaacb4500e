//! The signer's VLS chain tracker, reached through a [`ChainLink`].
//!
//! Each method is one (or, for a streamed block, a few) [`ChainLink::request`], awaited before
//! the next: over the broker's relay, chain traffic takes its place in the FIFO queue like any
//! CLN request and never holds more than one slot (docs/chain.md, fairness).
//! The messages are VLS's (`vls_protocol::msgs`), answered by the signer's `RootHandler`:
//! `TipInfo` (2002), `ForwardWatches` (2003), `ReverseWatches` (2004), `AddBlock` (2005),
//! `RemoveBlock` (2006), `GetHeartbeat` (2008), `BlockChunk` (2009) and `NodeInfo` (1012).
//! All of them need the signer's node to be initialised (a completed `hsmd_init`).

use std::panic::{catch_unwind, AssertUnwindSafe};

use bitcoin::bip32::Xpub;
use bitcoin::block::Header;
use bitcoin::consensus::encode::serialize;
use bitcoin::hash_types::FilterHeader;
use bitcoin::secp256k1::{PublicKey, Secp256k1};
use bitcoin::{Block, BlockHash, OutPoint, Txid};
use lightning_signer::node::SignedHeartbeat;
use txoo::proof::{ProofType, TxoProof};
use vls_protocol::msgs::{self, Message, SerBolt};
use vls_protocol::serde_bolt::{LargeOctets, Octets};

use crate::ChainLink;

/// Largest chunk of a streamed block (a `BlockChunk` carries at most 65535 bytes).
pub const BLOCK_CHUNK: usize = 60_000;
/// Above this size an `AddBlock`/`RemoveBlock` is sent as a streamed block instead (VLS
/// refuses messages over 128 KiB).
pub const MAX_INLINE_MESSAGE: usize = 120 * 1024;

/// Why a chain request to the signer failed; `E` is the [`ChainLink`]'s error.
#[derive(Debug, thiserror::Error)]
pub enum SignerCallError<E> {
    /// The link failed (for the relay: a refusal, a timeout, the relay stopped).
    #[error("{request}: {source}")]
    Link {
        /// The request.
        request: &'static str,
        /// The link's error.
        source: E,
    },
    /// The signer answered with VLS's `SignerError` (e.g. code 401, orphan block).
    #[error("{request}: the signer answered with error {code}: {message}")]
    Signer {
        /// The request.
        request: &'static str,
        /// VLS error code (`msgs::CODE_ORPHAN_BLOCK` = 401).
        code: u16,
        /// Its text.
        message: String,
    },
    /// The reply is not the expected message.
    #[error("{request}: unexpected reply: {reason}")]
    BadReply {
        /// The request.
        request: &'static str,
        /// What was wrong.
        reason: String,
    },
}

impl<E> SignerCallError<E> {
    /// True when the signer said the block does not build on its tip (VLS `OrphanBlock`).
    pub fn is_orphan(&self) -> bool {
        matches!(self, SignerCallError::Signer { code, .. } if *code == msgs::CODE_ORPHAN_BLOCK)
    }
}

/// What `NodeInfo` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node id.
    pub node_id: PublicKey,
    /// The key that signs heartbeats (the account xpub's key, as vls-proxy uses it).
    pub heartbeat_key: PublicKey,
    /// The signer's network name.
    pub network: String,
}

/// A signed heartbeat from the signer: its chain view at a time, signed by the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The signer's tip.
    pub chain_tip: BlockHash,
    /// Its height.
    pub chain_height: u32,
    /// The tip's block time.
    pub chain_timestamp: u32,
    /// The signer's clock when it signed.
    pub current_timestamp: u32,
    /// Schnorr signature (hex).
    pub signature: String,
    /// Whether the signature checked out against the node's heartbeat key.
    pub verified: bool,
    /// The whole signed heartbeat as VLS serialises it (hex), for the operator.
    pub raw: String,
}

/// The signer's chain tracker over a [`ChainLink`].
#[derive(Clone)]
pub struct SignerChain<L> {
    link: L,
}

fn decode(reply: Vec<u8>) -> Result<Message, String> {
    match catch_unwind(AssertUnwindSafe(|| msgs::from_vec(reply))) {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("decoder panicked".into()),
    }
}

impl<L: ChainLink> SignerChain<L> {
    /// Chain requests over `link`.
    pub fn new(link: L) -> SignerChain<L> {
        SignerChain { link }
    }

    async fn call(&self, request: &'static str, msg: Vec<u8>) -> Result<Message, SignerCallError<L::Error>> {
        let reply = self.link.request(msg).await.map_err(|source| SignerCallError::Link { request, source })?;
        match decode(reply) {
            Ok(Message::SignerError(e)) => Err(SignerCallError::Signer {
                request,
                code: e.code,
                message: String::from_utf8_lossy(&e.message.0).into_owned(),
            }),
            Ok(m) => Ok(m),
            Err(reason) => Err(SignerCallError::BadReply { request, reason }),
        }
    }

    fn unexpected(request: &'static str, m: &Message) -> SignerCallError<L::Error> {
        SignerCallError::BadReply { request, reason: message_name(m) }
    }

    /// `TipInfo`: the tracker's height and tip hash.
    pub async fn tip(&self) -> Result<(u32, BlockHash), SignerCallError<L::Error>> {
        match self.call("TipInfo", msgs::TipInfo {}.as_vec()).await? {
            Message::TipInfoReply(r) => Ok((r.height, r.block_hash)),
            m => Err(Self::unexpected("TipInfo", &m)),
        }
    }

    /// `NodeInfo`: node id and heartbeat key.
    pub async fn node_info(&self) -> Result<NodeInfo, SignerCallError<L::Error>> {
        const R: &str = "NodeInfo";
        match self.call(R, msgs::NodeInfo {}.as_vec()).await? {
            Message::NodeInfoReply(r) => {
                let bad = |reason: String| SignerCallError::BadReply { request: R, reason };
                let node_id = PublicKey::from_slice(&r.node_id.0).map_err(|e| bad(format!("node id: {e}")))?;
                let xpub = Xpub::decode(&r.bip32.0).map_err(|e| bad(format!("bip32 key: {e}")))?;
                Ok(NodeInfo {
                    node_id,
                    heartbeat_key: xpub.public_key,
                    network: String::from_utf8_lossy(&r.network_name.0).into_owned(),
                })
            }
            m => Err(Self::unexpected(R, &m)),
        }
    }

    /// `ForwardWatches`: what the next block's proof must cover.
    pub async fn forward_watches(&self) -> Result<(Vec<Txid>, Vec<OutPoint>), SignerCallError<L::Error>> {
        match self.call("ForwardWatches", msgs::ForwardWatches {}.as_vec()).await? {
            Message::ForwardWatchesReply(r) => Ok((r.txids.0, r.outpoints.0)),
            m => Err(Self::unexpected("ForwardWatches", &m)),
        }
    }

    /// `ReverseWatches`: what a removed block's proof must cover.
    pub async fn reverse_watches(&self) -> Result<(Vec<Txid>, Vec<OutPoint>), SignerCallError<L::Error>> {
        match self.call("ReverseWatches", msgs::ReverseWatches {}.as_vec()).await? {
            Message::ReverseWatchesReply(r) => Ok((r.txids.0, r.outpoints.0)),
            m => Err(Self::unexpected("ReverseWatches", &m)),
        }
    }

    /// Streams `block` with `BlockChunk`s and returns the proof that refers to it.
    async fn stream(&self, block: &Block, proof: TxoProof) -> Result<TxoProof, SignerCallError<L::Error>> {
        let bytes = serialize(block);
        let hash = block.block_hash();
        for (i, chunk) in bytes.chunks(BLOCK_CHUNK).enumerate() {
            let m = msgs::BlockChunk { hash, offset: (i * BLOCK_CHUNK) as u32, content: Octets(chunk.to_vec()) };
            match self.call("BlockChunk", m.as_vec()).await? {
                Message::BlockChunkReply(_) => {}
                m => return Err(Self::unexpected("BlockChunk", &m)),
            }
        }
        Ok(TxoProof { attestations: proof.attestations, proof: ProofType::ExternalBlock() })
    }

    /// Whether `proof` must go as a streamed block (a full-block proof, or too big inline).
    fn needs_stream(proof: &TxoProof) -> bool {
        matches!(proof.proof, ProofType::Block(_)) || serialize(proof).len() > MAX_INLINE_MESSAGE
    }

    /// `AddBlock`: `block` becomes the tracker's tip, proven by `proof` (streamed if needed).
    pub async fn add_block(&self, block: &Block, proof: TxoProof) -> Result<(), SignerCallError<L::Error>> {
        let proof = if Self::needs_stream(&proof) { self.stream(block, proof).await? } else { proof };
        self.add_header(&block.header, proof).await
    }

    /// `AddBlock` with a header and an inline proof, as given (no checks, no streaming).
    pub async fn add_header(&self, header: &Header, proof: TxoProof) -> Result<(), SignerCallError<L::Error>> {
        let m = msgs::AddBlock { header: Octets(serialize(header)), unspent_proof: Some(msgs::DebugTxoProof(proof)) };
        match self.call("AddBlock", m.as_vec()).await? {
            Message::AddBlockReply(_) => Ok(()),
            m => Err(Self::unexpected("AddBlock", &m)),
        }
    }

    /// `RemoveBlock`: the tracker's tip `block` is taken off; `prev` headers become the tip.
    pub async fn remove_block(
        &self,
        block: &Block,
        proof: TxoProof,
        prev_header: Header,
        prev_filter_header: FilterHeader,
    ) -> Result<(), SignerCallError<L::Error>> {
        let proof = if Self::needs_stream(&proof) { self.stream(block, proof).await? } else { proof };
        let m = msgs::RemoveBlock {
            unspent_proof: Some(LargeOctets(serialize(&proof))),
            prev_block_header: prev_header,
            prev_filter_header,
        };
        match self.call("RemoveBlock", m.as_vec()).await? {
            Message::RemoveBlockReply(_) => Ok(()),
            m => Err(Self::unexpected("RemoveBlock", &m)),
        }
    }

    /// `GetHeartbeat`: the signer's signed view of the chain; verified against `key` if given.
    pub async fn heartbeat(&self, key: Option<&PublicKey>) -> Result<Heartbeat, SignerCallError<L::Error>> {
        const R: &str = "GetHeartbeat";
        match self.call(R, msgs::GetHeartbeat {}.as_vec()).await? {
            Message::GetHeartbeatReply(r) => {
                let raw = r.heartbeat.0;
                let mut bytes = raw.clone();
                let hb: SignedHeartbeat = match catch_unwind(AssertUnwindSafe(|| {
                    vls_protocol::serde_bolt::from_vec(&mut bytes)
                })) {
                    Ok(Ok(h)) => h,
                    Ok(Err(e)) => return Err(SignerCallError::BadReply { request: R, reason: format!("{e:?}") }),
                    Err(_) => return Err(SignerCallError::BadReply { request: R, reason: "decoder panicked".into() }),
                };
                let verified = key.is_some_and(|k| hb.verify(k, &Secp256k1::new()));
                Ok(Heartbeat {
                    chain_tip: hb.heartbeat.chain_tip,
                    chain_height: hb.heartbeat.chain_height,
                    chain_timestamp: hb.heartbeat.chain_timestamp,
                    current_timestamp: hb.heartbeat.current_timestamp,
                    signature: hex::encode(&hb.signature),
                    verified,
                    raw: hex::encode(raw),
                })
            }
            m => Err(Self::unexpected(R, &m)),
        }
    }
}

fn message_name(m: &Message) -> String {
    let s = format!("{m:?}");
    let name: String = s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    format!("got {name} instead")
}
