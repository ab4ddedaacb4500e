//! A counterparty simulator: plays the peer of one channel so that a signer can be driven through
//! a channel open and payments on channels of its own (issue 11's load benchmark).
//!
//! Recorded commitment traffic cannot be moved to another dbid: VLS derives the channel keys from
//! the peer id and dbid, so the recorded counterparty signatures and commitment transactions no
//! longer match another channel. [`ChannelSim`] builds that traffic for any (peer id, dbid,
//! funding outpoint): it chooses the peer's keys (basepoints, funding key, per-commitment secrets
//! from a seed), builds the commitment and HTLC transactions with the machinery VLS checks them
//! with (LDK's `chan_utils`: [`CommitmentTransaction`], [`TxCreationKeys`],
//! [`HTLCOutputInCommitment`], `build_htlc_transaction`), signs as the peer, and encodes CLN's
//! hsmd requests with vls-protocol's own message types ([`vls_protocol::msgs`]) in the order and
//! on the connections channeld and lightningd use (taken from the recorded CLN v25.12.1 sessions,
//! `testdata/traces/README.md`).
//!
//! The simulated node is the **fundee** (as bob in the recorded open-pay-close): the peer funds the
//! channel, and each payment is the peer paying us, with CLN's 11 channeld requests of a payee
//! (`validate_commitment_tx`, `revoke_commitment_tx`, `sign_remote_commitment_tx`,
//! `sign_remote_htlc_tx`, `validate_revocation` + `sign_penalty_to_us`, then the fulfil round;
//! see [`PAYMENT_REQUESTS`]). The payee's root `ecdh` (lightningd decoding the onion) is not
//! generated: it is not channel traffic.
//!
//! A simulator needs the signer's replies (its per-commitment points and basepoints) while it
//! runs, so it drives an [`Hsmd`]. The signer is deterministic for a seed, a fixed clock and the
//! same requests, so the requests recorded while driving one signer ([`ChannelSim::log`]) are
//! valid again for another signer with the same seed: that is how the load benchmark gets the
//! same traffic into the in-process and the end-to-end runs.

use bitcoin::hashes::{sha256, Hash};
use bitcoin::psbt::Psbt;
use bitcoin::secp256k1::{ecdsa, All, Message as SecpMessage, PublicKey, Secp256k1, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::{Amount, OutPoint, ScriptBuf, Transaction, TxOut, Txid};
use lightning_signer::lightning::chain::transaction::OutPoint as LdkOutPoint;
use lightning_signer::lightning::ln::chan_utils::{
    build_commitment_secret, build_htlc_transaction, derive_private_key, get_htlc_redeemscript,
    get_keyed_anchor_redeemscript, get_revokeable_redeemscript, get_to_countersigner_keyed_anchor_redeemscript,
    make_funding_redeemscript, ChannelPublicKeys, ChannelTransactionParameters, CommitmentTransaction,
    CounterpartyChannelTransactionParameters, DirectedChannelTransactionParameters, HTLCOutputInCommitment,
    TxCreationKeys,
};
use lightning_signer::lightning::ln::channel_keys::{DelayedPaymentBasepoint, HtlcBasepoint, RevocationBasepoint};
use lightning_signer::lightning::types::features::ChannelTypeFeatures;
use lightning_signer::lightning::types::payment::PaymentHash;
use vls_protocol::model::{Basepoints, BitcoinSignature, DisclosedSecret, Htlc, PubKey, Sha256, Signature};
use vls_protocol::msgs::{self, Message, SerBolt};
use vls_protocol::psbt::PsbtWrapper;
use vls_protocol::serde_bolt::{Array, Octets, WithSize};

/// LDK's `INITIAL_COMMITMENT_NUMBER`: commitment `n` has LDK number `2^48 - 1 - n`.
const INITIAL_COMMITMENT_NUMBER: u64 = (1 << 48) - 1;
/// BOLT 3 weight of an anchors commitment transaction without HTLCs.
const ANCHOR_COMMIT_BASE_WEIGHT: u64 = 1124;
/// BOLT 3 weight each non-dust HTLC adds to a commitment transaction.
const HTLC_WEIGHT: u64 = 172;
/// Value of each anchor output.
const ANCHOR_SAT: u64 = 330;

/// Requests one [`ChannelSim::pay`] sends: the payee channeld's requests of a payment in the
/// recorded CLN v25.12 sessions: 2× validate_commitment_tx, 2× revoke_commitment_tx, 2×
/// sign_remote_commitment_tx, 1× sign_remote_htlc_tx, 2× validate_revocation, 2×
/// sign_penalty_to_us (with a template that has a recorded penalty; 9 without).
pub const PAYMENT_REQUESTS: usize = 11;

/// Which connection a request goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conn {
    /// lightningd's own connection (no client context).
    Root,
    /// The channel's client connection (openingd, channeld: the channel's peer id and dbid).
    Channel,
}

/// One request as it was sent.
#[derive(Clone, Debug)]
pub struct Call {
    /// The connection it went on.
    pub conn: Conn,
    /// The hsmd message (type + body).
    pub request: Vec<u8>,
}

/// What the simulator talks to: an hsmd (a signer in process, or lightningd's sockets).
pub trait Hsmd {
    /// Sends `request` on `conn` of the channel (`peer_id`, `dbid`) and returns the reply
    /// message, or the signer's refusal as text.
    fn call(&mut self, conn: Conn, peer_id: &[u8; 33], dbid: u64, request: &[u8]) -> Result<Vec<u8>, String>;
}

/// An in-process signer as an [`Hsmd`] (each request gets the next sequence number).
#[cfg(feature = "oracle")]
pub struct InProcess<'a> {
    /// The signer.
    pub signer: &'a mut sphinx_signer::Signer,
    /// The next sequence number.
    pub seq: u16,
}

#[cfg(feature = "oracle")]
impl Hsmd for InProcess<'_> {
    fn call(&mut self, conn: Conn, peer_id: &[u8; 33], dbid: u64, request: &[u8]) -> Result<Vec<u8>, String> {
        let (peer_id, dbid) = match conn {
            Conn::Root => ([0u8; 33], 0),
            Conn::Channel => (*peer_id, dbid),
        };
        let req = sphinx_wire::serial::Request { seq: self.seq, peer_id, dbid, message: request.to_vec() };
        self.seq = self.seq.wrapping_add(1);
        self.signer.handle(&req).map(|r| r.message).map_err(|e| e.to_string())
    }
}

/// The channel parameters CLN sends that the simulator takes from a recorded `hsmd_setup_channel`
/// (shutdown scripts, delays, channel type, value) plus the commitment feerate and an HTLC expiry
/// from the recorded payment.
#[derive(Clone, Debug)]
pub struct Template {
    /// Channel value (sat) of the recorded `hsmd_setup_channel`.
    pub channel_value: u64,
    /// Pushed to us at the open (msat).
    pub push_value: u64,
    /// The delay we impose on the peer.
    pub to_self_delay: u16,
    /// Our shutdown script and its wallet index (the recorded node's, same seed).
    pub local_shutdown_script: Vec<u8>,
    /// Wallet index of our shutdown script.
    pub local_shutdown_wallet_index: Option<u32>,
    /// The delay the peer imposes on us.
    pub remote_to_self_delay: u16,
    /// The peer's shutdown script.
    pub remote_shutdown_script: Vec<u8>,
    /// The negotiated channel type (CLN v25.12's default: anchors, zero-fee HTLC).
    pub channel_type: Vec<u8>,
    /// Commitment feerate (sat/kw) of the recorded payment.
    pub feerate: u32,
    /// CLTV expiry of the recorded HTLC.
    pub cltv_expiry: u32,
    /// The recorded `hsmd_sign_penalty_to_us` (14), if any: its fee (sat), its output (our
    /// wallet's address) and that output's PSBT entry (the wallet key path VLS checks).
    pub penalty: Option<(u64, TxOut, bitcoin::psbt::Output)>,
}

impl Template {
    /// Takes the template from a recorded trace of the fundee side (bob in open-pay-close): its
    /// `hsmd_setup_channel` and its first `hsmd_validate_commitment_tx` that carries an HTLC.
    pub fn from_trace(trace: &crate::trace::Trace) -> Result<Template, String> {
        let mut setup = None;
        let mut htlc = None;
        let mut penalty = None;
        for ex in &trace.exchanges {
            match decode(&ex.request) {
                Ok(Message::SetupChannel(m)) if setup.is_none() => setup = Some(m),
                Ok(Message::ValidateCommitmentTx(m)) if htlc.is_none() && !m.htlcs.0.is_empty() => {
                    htlc = Some((m.feerate, m.htlcs.0[0].ctlv_expiry))
                }
                Ok(Message::SignPenaltyToUs(m)) if penalty.is_none() => {
                    let p = &m.psbt.0.inner;
                    let input = p.inputs.first().and_then(|i| i.witness_utxo.as_ref()).map(|u| u.value);
                    if let (Some(inv), Some(out), Some(pout)) = (input, m.tx.0.output.first(), p.outputs.first()) {
                        let fee = inv.to_sat().saturating_sub(out.value.to_sat());
                        penalty = Some((fee, out.clone(), pout.clone()));
                    }
                }
                _ => {}
            }
        }
        let s: msgs::SetupChannel = setup.ok_or("no hsmd_setup_channel in the trace")?;
        if s.is_outbound {
            return Err("the trace's channel is outbound: take the fundee's trace".into());
        }
        let (feerate, cltv_expiry) = htlc.ok_or("no validate_commitment_tx with an HTLC in the trace")?;
        Ok(Template {
            channel_value: s.channel_value,
            push_value: s.push_value,
            to_self_delay: s.to_self_delay,
            local_shutdown_script: s.local_shutdown_script.0,
            local_shutdown_wallet_index: s.local_shutdown_wallet_index,
            remote_to_self_delay: s.remote_to_self_delay,
            remote_shutdown_script: s.remote_shutdown_script.0,
            channel_type: s.channel_type.0,
            feerate,
            cltv_expiry,
            penalty,
        })
    }
}

fn decode(msg: &[u8]) -> Result<Message, String> {
    std::panic::catch_unwind(|| msgs::from_vec(msg.to_vec()))
        .map_err(|_| "decoder panicked".to_string())?
        .map_err(|e| format!("{e:?}"))
}

/// The peer's secrets, all derived from one seed.
struct PeerKeys {
    funding: SecretKey,
    revocation_base: SecretKey,
    payment: SecretKey,
    delayed_base: SecretKey,
    htlc_base: SecretKey,
    commitment_seed: [u8; 32],
}

fn derive_key(seed: &[u8; 32], label: &str) -> SecretKey {
    let mut data = seed.to_vec();
    data.extend_from_slice(label.as_bytes());
    // A sha256 output is a valid secret key with overwhelming probability; retry otherwise.
    let mut h = sha256::Hash::hash(&data).to_byte_array();
    loop {
        if let Ok(k) = SecretKey::from_slice(&h) {
            return k;
        }
        h = sha256::Hash::hash(&h).to_byte_array();
    }
}

impl PeerKeys {
    fn new(seed: &[u8; 32]) -> PeerKeys {
        PeerKeys {
            funding: derive_key(seed, "funding"),
            revocation_base: derive_key(seed, "revocation"),
            payment: derive_key(seed, "payment"),
            delayed_base: derive_key(seed, "delayed"),
            htlc_base: derive_key(seed, "htlc"),
            commitment_seed: sha256::Hash::hash(&[&seed[..], b"commitment"].concat()).to_byte_array(),
        }
    }

    fn pubkeys(&self, secp: &Secp256k1<All>) -> ChannelPublicKeys {
        ChannelPublicKeys {
            funding_pubkey: PublicKey::from_secret_key(secp, &self.funding),
            revocation_basepoint: RevocationBasepoint(PublicKey::from_secret_key(secp, &self.revocation_base)),
            payment_point: PublicKey::from_secret_key(secp, &self.payment),
            delayed_payment_basepoint: DelayedPaymentBasepoint(PublicKey::from_secret_key(secp, &self.delayed_base)),
            htlc_basepoint: HtlcBasepoint(PublicKey::from_secret_key(secp, &self.htlc_base)),
        }
    }

    /// The peer's per-commitment secret of its commitment `n` (BOLT 3 shachain).
    fn secret(&self, n: u64) -> [u8; 32] {
        build_commitment_secret(&self.commitment_seed, INITIAL_COMMITMENT_NUMBER - n)
    }

    fn point(&self, secp: &Secp256k1<All>, n: u64) -> Result<PublicKey, String> {
        let sk = SecretKey::from_slice(&self.secret(n)).map_err(|e| e.to_string())?;
        Ok(PublicKey::from_secret_key(secp, &sk))
    }
}

/// An HTLC in flight, offered by the peer.
#[derive(Clone, Debug)]
struct InFlight {
    amount_msat: u64,
    payment_hash: [u8; 32],
    cltv_expiry: u32,
}

/// The peer of one channel (see the module docs).
pub struct ChannelSim {
    secp: Secp256k1<All>,
    /// The peer's node id (the channel's client context).
    pub peer_id: [u8; 33],
    /// The channel's dbid.
    pub dbid: u64,
    /// The funding outpoint.
    pub funding: OutPoint,
    template: Template,
    peer: PeerKeys,
    params: Option<ChannelTransactionParameters>,
    /// Our (the signer's) per-commitment points, by commitment number, from its replies.
    our_points: std::collections::BTreeMap<u64, PublicKey>,
    /// The holder commitment the signer holds now, and the peer's commitment.
    holder_num: u64,
    remote_num: u64,
    /// Balances (msat), HTLCs aside.
    to_us_msat: u64,
    to_peer_msat: u64,
    payments: u64,
    /// The peer's commitments we signed, until revoked and swept.
    remote_txs: std::collections::BTreeMap<u64, CommitmentTransaction>,
    /// Every request sent, in order.
    pub log: Vec<Call>,
}

fn sig(s: &ecdsa::Signature, sighash: EcdsaSighashType) -> BitcoinSignature {
    BitcoinSignature { signature: Signature(s.serialize_compact()), sighash: sighash as u8 }
}

fn pubkey(p: &PubKey) -> Result<PublicKey, String> {
    PublicKey::from_slice(&p.0).map_err(|e| format!("bad pubkey in a reply: {e}"))
}

impl ChannelSim {
    /// The peer of channel `dbid`, with keys and funding outpoint derived from `seed` and
    /// `dbid` (distinct per channel).
    pub fn new(template: Template, seed: [u8; 32], dbid: u64) -> ChannelSim {
        let secp = Secp256k1::new();
        let mut s = seed.to_vec();
        s.extend_from_slice(&dbid.to_be_bytes());
        let chan_seed = sha256::Hash::hash(&s).to_byte_array();
        let node_key = derive_key(&chan_seed, "node");
        let peer_id = PublicKey::from_secret_key(&secp, &node_key).serialize();
        let txid = Txid::from_byte_array(sha256::Hash::hash(&[&chan_seed[..], b"funding tx"].concat()).to_byte_array());
        let value_msat = template.channel_value * 1000;
        ChannelSim {
            secp,
            peer_id,
            dbid,
            funding: OutPoint { txid, vout: 0 },
            to_us_msat: template.push_value,
            to_peer_msat: value_msat.saturating_sub(template.push_value),
            template,
            peer: PeerKeys::new(&chan_seed),
            params: None,
            our_points: Default::default(),
            holder_num: 0,
            remote_num: 0,
            payments: 0,
            remote_txs: Default::default(),
            log: Vec::new(),
        }
    }

    fn send(&mut self, hsmd: &mut dyn Hsmd, conn: Conn, msg: &dyn SerBolt) -> Result<Message, String> {
        let request = msg.as_vec();
        let name = msg.name();
        let reply = hsmd.call(conn, &self.peer_id, self.dbid, &request).map_err(|e| format!("{name}: {e}"))?;
        self.log.push(Call { conn, request });
        decode(&reply).map_err(|e| format!("{name}: undecodable reply: {e}"))
    }

    fn params(&self) -> Result<&ChannelTransactionParameters, String> {
        self.params.as_ref().ok_or_else(|| "channel not set up".to_string())
    }

    fn features() -> ChannelTypeFeatures {
        // As VLS's ChannelSetup::features() for CLN's default channel type (anchors, zero-fee HTLC).
        let mut f = ChannelTypeFeatures::empty();
        f.set_static_remote_key_required();
        f.set_anchors_zero_fee_htlc_tx_optional();
        f
    }

    /// The commitment fee the funder (the peer) pays, BOLT 3.
    fn fee_sat(&self, htlcs: usize) -> u64 {
        self.template.feerate as u64 * (ANCHOR_COMMIT_BASE_WEIGHT + htlcs as u64 * HTLC_WEIGHT) / 1000
    }

    /// Opens the channel as CLN does for a fundee: lightningd's `hsmd_new_channel` and
    /// `hsmd_get_channel_basepoints`, then openingd's `hsmd_get_per_commitment_point(0)`,
    /// `hsmd_setup_channel`, `hsmd_validate_commitment_tx` (our commitment 0, with the peer's
    /// signature) and `hsmd_sign_remote_commitment_tx` (the peer's commitment 0), then channeld's
    /// `hsmd_get_per_commitment_point(1)`, `hsmd_check_outpoint` and `hsmd_lock_outpoint`.
    pub fn open(&mut self, hsmd: &mut dyn Hsmd) -> Result<(), String> {
        let peer = PubKey(self.peer_id);
        self.send(hsmd, Conn::Root, &msgs::NewChannel { peer_id: peer.clone(), dbid: self.dbid })?;
        let bp = match self.send(hsmd, Conn::Root, &msgs::GetChannelBasepoints { node_id: peer, dbid: self.dbid })? {
            Message::GetChannelBasepointsReply(r) => r,
            m => return Err(format!("get_channel_basepoints: unexpected reply {m:?}")),
        };
        let holder = ChannelPublicKeys {
            funding_pubkey: pubkey(&bp.funding)?,
            revocation_basepoint: RevocationBasepoint(pubkey(&bp.basepoints.revocation)?),
            payment_point: pubkey(&bp.basepoints.payment)?,
            delayed_payment_basepoint: DelayedPaymentBasepoint(pubkey(&bp.basepoints.delayed_payment)?),
            htlc_basepoint: HtlcBasepoint(pubkey(&bp.basepoints.htlc)?),
        };
        let p0 = self.get_point(hsmd, 0)?;
        self.our_points.insert(0, p0);

        let t = &self.template;
        let cp = self.peer.pubkeys(&self.secp);
        let ser = |p: &PublicKey| PubKey(p.serialize());
        let setup = msgs::SetupChannel {
            is_outbound: false,
            channel_value: t.channel_value,
            push_value: t.push_value,
            funding_txid: self.funding.txid,
            funding_txout: self.funding.vout as u16,
            to_self_delay: t.to_self_delay,
            local_shutdown_script: Octets(t.local_shutdown_script.clone()),
            local_shutdown_wallet_index: t.local_shutdown_wallet_index,
            remote_basepoints: Basepoints {
                revocation: ser(&cp.revocation_basepoint.0),
                payment: ser(&cp.payment_point),
                htlc: ser(&cp.htlc_basepoint.0),
                delayed_payment: ser(&cp.delayed_payment_basepoint.0),
            },
            remote_funding_pubkey: ser(&cp.funding_pubkey),
            remote_to_self_delay: t.remote_to_self_delay,
            remote_shutdown_script: Octets(t.remote_shutdown_script.clone()),
            channel_type: Octets(t.channel_type.clone()),
        };
        self.params = Some(ChannelTransactionParameters {
            holder_pubkeys: holder,
            holder_selected_contest_delay: t.to_self_delay,
            is_outbound_from_holder: false,
            counterparty_parameters: Some(CounterpartyChannelTransactionParameters {
                pubkeys: cp,
                selected_contest_delay: t.remote_to_self_delay,
            }),
            funding_outpoint: Some(LdkOutPoint { txid: self.funding.txid, index: self.funding.vout as u16 }),
            splice_parent_funding_txid: None,
            channel_type_features: Self::features(),
            channel_value_satoshis: t.channel_value,
        });
        self.send(hsmd, Conn::Channel, &setup)?;
        // openingd: our commitment 0 first (validate), then theirs (sign).
        let next = self.validate_holder(hsmd, 0, &[])?;
        self.our_points.insert(1, next);
        self.sign_remote(hsmd, 0, &[])?;
        // channeld starts: asks for point 1, checks and locks the funding outpoint.
        let p1 = self.get_point(hsmd, 1)?;
        if p1 != next {
            return Err("get_per_commitment_point(1) differs from validate_commitment_tx's next point".into());
        }
        let (txid, txout) = (self.funding.txid, self.funding.vout as u16);
        self.send(hsmd, Conn::Channel, &msgs::CheckOutpoint { funding_txid: txid, funding_txout: txout })?;
        self.send(hsmd, Conn::Channel, &msgs::LockOutpoint { funding_txid: txid, funding_txout: txout })?;
        Ok(())
    }

    fn get_point(&mut self, hsmd: &mut dyn Hsmd, n: u64) -> Result<PublicKey, String> {
        match self.send(hsmd, Conn::Channel, &msgs::GetPerCommitmentPoint { commitment_number: n })? {
            Message::GetPerCommitmentPointReply(r) => pubkey(&r.point),
            m => Err(format!("get_per_commitment_point: unexpected reply {m:?}")),
        }
    }

    /// One payment of `amount_msat` from the peer to us, as channeld sends it on the payee side:
    /// the peer's `update_add_htlc` + `commitment_signed` (validate our commitment with the HTLC,
    /// revoke our previous one), our `commitment_signed` (sign theirs and its HTLC transaction) and
    /// their `revoke_and_ack` (validate the revocation); then our `update_fulfill_htlc` +
    /// `commitment_signed` (sign theirs without the HTLC), their revocation, their
    /// `commitment_signed` (validate ours) and our revocation.
    pub fn pay(&mut self, hsmd: &mut dyn Hsmd, amount_msat: u64) -> Result<(), String> {
        let mut pre = self.peer.commitment_seed.to_vec();
        pre.extend_from_slice(b"preimage");
        pre.extend_from_slice(&self.payments.to_be_bytes());
        let preimage = sha256::Hash::hash(&pre).to_byte_array();
        let payment_hash = sha256::Hash::hash(&preimage).to_byte_array();
        self.payments += 1;
        let htlc = InFlight { amount_msat, payment_hash, cltv_expiry: self.template.cltv_expiry };
        if self.to_peer_msat < amount_msat + (self.fee_sat(1) + 2 * ANCHOR_SAT) * 1000 {
            return Err("the peer has no balance left for this payment".into());
        }
        self.to_peer_msat -= amount_msat;
        let with = [htlc];
        // Their commitment_signed with the HTLC: our next commitment.
        let h = self.holder_num + 1;
        let next = self.validate_holder(hsmd, h, &with)?;
        self.our_points.insert(h + 1, next);
        self.revoke_holder(hsmd, h - 1)?;
        // Our commitment_signed: their next commitment with the HTLC, and the HTLC's transaction.
        let r = self.remote_num + 1;
        let remote_tx = self.sign_remote(hsmd, r, &with)?;
        self.sign_remote_htlc(hsmd, r, &remote_tx)?;
        self.validate_revocation(hsmd, r - 1)?;
        // We fulfil: the HTLC's value is ours.
        self.to_us_msat += amount_msat;
        self.sign_remote(hsmd, r + 1, &[])?;
        self.validate_revocation(hsmd, r)?;
        let next = self.validate_holder(hsmd, h + 1, &[])?;
        self.our_points.insert(h + 2, next);
        self.revoke_holder(hsmd, h)?;
        Ok(())
    }

    /// Builds commitment `n` of `broadcaster_is_us`'s side with `htlcs` (all offered by the peer).
    fn commitment(&self, holder: bool, n: u64, htlcs: &[InFlight]) -> Result<CommitmentTransaction, String> {
        let params = self.params()?;
        let point = if holder {
            *self.our_points.get(&n).ok_or_else(|| format!("no per-commitment point of ours for {n}"))?
        } else {
            self.peer.point(&self.secp, n)?
        };
        let fee = self.fee_sat(htlcs.len()) + 2 * ANCHOR_SAT;
        let peer_sat = (self.to_peer_msat / 1000).saturating_sub(fee);
        let us_sat = self.to_us_msat / 1000;
        let oic: Vec<HTLCOutputInCommitment> = htlcs
            .iter()
            .map(|h| HTLCOutputInCommitment {
                // The peer offered it: offered on their commitment, received on ours.
                offered: !holder,
                amount_msat: h.amount_msat,
                cltv_expiry: h.cltv_expiry,
                payment_hash: PaymentHash(h.payment_hash),
                transaction_output_index: None,
            })
            .collect();
        let (directed, to_broadcaster, to_countersignatory) = if holder {
            (params.as_holder_broadcastable(), us_sat, peer_sat)
        } else {
            (params.as_counterparty_broadcastable(), peer_sat, us_sat)
        };
        Ok(CommitmentTransaction::new(
            INITIAL_COMMITMENT_NUMBER - n,
            &point,
            to_broadcaster,
            to_countersignatory,
            self.template.feerate,
            oic,
            &directed,
            &self.secp,
        ))
    }

    /// The PSBT CLN sends with a commitment: the funding input's UTXO and witness script, and the
    /// witness script of every P2WSH output (VLS identifies the outputs by them).
    fn commitment_psbt(
        &self,
        c: &CommitmentTransaction,
        directed: &DirectedChannelTransactionParameters,
    ) -> Result<Psbt, String> {
        let params = self.params()?;
        let trusted = c.trust();
        let tx = trusted.built_transaction().transaction.clone();
        let keys: &TxCreationKeys = trusted.keys();
        let features = Self::features();
        let b = directed.broadcaster_pubkeys();
        let cs = directed.countersignatory_pubkeys();
        let mut candidates = vec![
            get_revokeable_redeemscript(
                &keys.revocation_key,
                directed.contest_delay(),
                &keys.broadcaster_delayed_payment_key,
            ),
            get_to_countersigner_keyed_anchor_redeemscript(&cs.payment_point),
            get_keyed_anchor_redeemscript(&b.funding_pubkey),
            get_keyed_anchor_redeemscript(&cs.funding_pubkey),
        ];
        for h in c.nondust_htlcs() {
            candidates.push(get_htlc_redeemscript(h, &features, keys));
        }
        let mut psbt = Psbt::from_unsigned_tx(tx.clone()).map_err(|e| e.to_string())?;
        for (i, out) in tx.output.iter().enumerate() {
            let ws = candidates.iter().find(|s| s.to_p2wsh() == out.script_pubkey).cloned();
            psbt.outputs[i].witness_script = ws;
        }
        let funding_script = make_funding_redeemscript(&params.holder_pubkeys.funding_pubkey, &cs_funding(params)?);
        psbt.inputs[0].witness_utxo = Some(TxOut {
            value: Amount::from_sat(params.channel_value_satoshis),
            script_pubkey: funding_script.to_p2wsh(),
        });
        psbt.inputs[0].witness_script = Some(funding_script);
        Ok(psbt)
    }

    fn htlcs_wire(htlcs: &[InFlight]) -> Array<Htlc> {
        Array(
            htlcs
                .iter()
                .map(|h| Htlc {
                    side: Htlc::REMOTE,
                    amount: h.amount_msat,
                    payment_hash: Sha256(h.payment_hash),
                    ctlv_expiry: h.cltv_expiry,
                })
                .collect(),
        )
    }

    /// `hsmd_validate_commitment_tx` of our commitment `n` with the peer's signatures; returns the
    /// next per-commitment point of the reply.
    fn validate_holder(&mut self, hsmd: &mut dyn Hsmd, n: u64, htlcs: &[InFlight]) -> Result<PublicKey, String> {
        let c = self.commitment(true, n, htlcs)?;
        let params = self.params()?.clone();
        let directed = params.as_holder_broadcastable();
        let psbt = self.commitment_psbt(&c, &directed)?;
        let trusted = c.trust();
        let built = trusted.built_transaction();
        let funding_script = make_funding_redeemscript(&params.holder_pubkeys.funding_pubkey, &cs_funding(&params)?);
        let commit_sig = built.sign_counterparty_commitment(
            &self.peer.funding,
            &funding_script,
            params.channel_value_satoshis,
            &self.secp,
        );
        // HTLC signatures as VLS checks them: zero-fee HTLC transactions, SIGHASH_SINGLE|ANYONECANPAY.
        let keys = trusted.keys();
        let features = Self::features();
        let htlc_key = derive_private_key(&self.secp, &keys.per_commitment_point, &self.peer.htlc_base);
        let mut htlc_sigs = Vec::new();
        for h in c.nondust_htlcs() {
            let htlc_tx = build_htlc_transaction(
                &built.txid,
                0,
                directed.contest_delay(),
                h,
                &features,
                &keys.broadcaster_delayed_payment_key,
                &keys.revocation_key,
            );
            let script = get_htlc_redeemscript(h, &features, keys);
            let sighash = SighashCache::new(&htlc_tx)
                .p2wsh_signature_hash(
                    0,
                    &script,
                    Amount::from_sat(h.amount_msat / 1000),
                    EcdsaSighashType::SinglePlusAnyoneCanPay,
                )
                .map_err(|e| e.to_string())?;
            let s = self.secp.sign_ecdsa(&SecpMessage::from_digest(sighash.to_byte_array()), &htlc_key);
            htlc_sigs.push(sig(&s, EcdsaSighashType::SinglePlusAnyoneCanPay));
        }
        let msg = msgs::ValidateCommitmentTx {
            tx: WithSize(built.transaction.clone()),
            psbt: WithSize(PsbtWrapper { inner: psbt }),
            htlcs: Self::htlcs_wire(htlcs),
            commitment_number: n,
            feerate: self.template.feerate,
            signature: sig(&commit_sig, EcdsaSighashType::All),
            htlc_signatures: Array(htlc_sigs),
        };
        match self.send(hsmd, Conn::Channel, &msg)? {
            Message::ValidateCommitmentTxReply(r) => {
                self.holder_num = self.holder_num.max(n);
                pubkey(&r.next_per_commitment_point)
            }
            m => Err(format!("validate_commitment_tx: unexpected reply {m:?}")),
        }
    }

    /// `hsmd_revoke_commitment_tx` of our commitment `n`; checks the disclosed secret is ours for `n`.
    fn revoke_holder(&mut self, hsmd: &mut dyn Hsmd, n: u64) -> Result<(), String> {
        match self.send(hsmd, Conn::Channel, &msgs::RevokeCommitmentTx { commitment_number: n })? {
            Message::RevokeCommitmentTxReply(r) => {
                let sk = SecretKey::from_slice(&r.old_commitment_secret.0).map_err(|e| e.to_string())?;
                if Some(&PublicKey::from_secret_key(&self.secp, &sk)) != self.our_points.get(&n) {
                    return Err(format!("revoke_commitment_tx({n}): the secret is not of our point {n}"));
                }
                self.our_points.insert(n + 2, pubkey(&r.next_per_commitment_point)?);
                Ok(())
            }
            m => Err(format!("revoke_commitment_tx: unexpected reply {m:?}")),
        }
    }

    /// `hsmd_sign_remote_commitment_tx` of the peer's commitment `n`; returns it.
    fn sign_remote(
        &mut self,
        hsmd: &mut dyn Hsmd,
        n: u64,
        htlcs: &[InFlight],
    ) -> Result<CommitmentTransaction, String> {
        let c = self.commitment(false, n, htlcs)?;
        let params = self.params()?.clone();
        let psbt = self.commitment_psbt(&c, &params.as_counterparty_broadcastable())?;
        let msg = msgs::SignRemoteCommitmentTx {
            tx: WithSize(c.trust().built_transaction().transaction.clone()),
            psbt: WithSize(PsbtWrapper { inner: psbt }),
            remote_funding_key: PubKey(cs_funding(&params)?.serialize()),
            remote_per_commitment_point: PubKey(self.peer.point(&self.secp, n)?.serialize()),
            option_static_remotekey: true,
            commitment_number: n,
            htlcs: Self::htlcs_wire(htlcs),
            feerate: self.template.feerate,
        };
        match self.send(hsmd, Conn::Channel, &msg)? {
            Message::SignTxReply(_) => {
                self.remote_num = self.remote_num.max(n);
                self.remote_txs.insert(n, c.clone());
                Ok(c)
            }
            m => Err(format!("sign_remote_commitment_tx: unexpected reply {m:?}")),
        }
    }

    /// `hsmd_sign_remote_htlc_tx` for each HTLC of the peer's commitment `n` (their HTLC-timeout
    /// transactions of the HTLCs they offered, which we countersign).
    fn sign_remote_htlc(&mut self, hsmd: &mut dyn Hsmd, n: u64, c: &CommitmentTransaction) -> Result<(), String> {
        let params = self.params()?.clone();
        let directed = params.as_counterparty_broadcastable();
        let trusted = c.trust();
        let keys = trusted.keys();
        let features = Self::features();
        let point = self.peer.point(&self.secp, n)?;
        for h in c.nondust_htlcs() {
            let tx = build_htlc_transaction(
                &trusted.txid(),
                0,
                directed.contest_delay(),
                h,
                &features,
                &keys.broadcaster_delayed_payment_key,
                &keys.revocation_key,
            );
            let script = get_htlc_redeemscript(h, &features, keys);
            let mut psbt = Psbt::from_unsigned_tx(tx.clone()).map_err(|e| e.to_string())?;
            psbt.inputs[0].witness_utxo =
                Some(TxOut { value: Amount::from_sat(h.amount_msat / 1000), script_pubkey: script.to_p2wsh() });
            psbt.inputs[0].witness_script = Some(script.clone());
            psbt.outputs[0].witness_script = Some(get_revokeable_redeemscript(
                &keys.revocation_key,
                directed.contest_delay(),
                &keys.broadcaster_delayed_payment_key,
            ));
            let msg = msgs::SignRemoteHtlcTx {
                tx: WithSize(tx),
                psbt: WithSize(PsbtWrapper { inner: psbt }),
                wscript: Octets(script.to_bytes()),
                remote_per_commitment_point: PubKey(point.serialize()),
                option_anchors: true,
            };
            match self.send(hsmd, Conn::Channel, &msg)? {
                Message::SignTxReply(_) => {}
                m => return Err(format!("sign_remote_htlc_tx: unexpected reply {m:?}")),
            }
        }
        Ok(())
    }

    /// `hsmd_validate_revocation` of the peer's commitment `n` with its real secret, then (as
    /// channeld does, for the watchtower) `hsmd_sign_penalty_to_us` of its `to_local` output.
    fn validate_revocation(&mut self, hsmd: &mut dyn Hsmd, n: u64) -> Result<(), String> {
        let msg =
            msgs::ValidateRevocation { commitment_number: n, commitment_secret: DisclosedSecret(self.peer.secret(n)) };
        match self.send(hsmd, Conn::Channel, &msg)? {
            Message::ValidateRevocationReply(_) => {}
            m => return Err(format!("validate_revocation: unexpected reply {m:?}")),
        }
        match self.remote_txs.remove(&n) {
            Some(c) => self.sign_penalty(hsmd, n, &c),
            None => Ok(()),
        }
    }

    /// `hsmd_sign_penalty_to_us`: the justice transaction of the revoked commitment `n`'s
    /// `to_local` output, in the recorded shape (one input, one output to our wallet, the recorded
    /// fee). Skipped when the template has no recorded penalty or the output does not exist.
    fn sign_penalty(&mut self, hsmd: &mut dyn Hsmd, n: u64, c: &CommitmentTransaction) -> Result<(), String> {
        let Some((fee, out, pout)) = self.template.penalty.clone() else { return Ok(()) };
        let params = self.params()?.clone();
        let directed = params.as_counterparty_broadcastable();
        let trusted = c.trust();
        let Some(vout) = trusted.revokeable_output_index() else { return Ok(()) };
        let keys = trusted.keys();
        let script = get_revokeable_redeemscript(
            &keys.revocation_key,
            directed.contest_delay(),
            &keys.broadcaster_delayed_payment_key,
        );
        let value = trusted.built_transaction().transaction.output[vout].value;
        let tx = Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::ZERO,
            input: vec![bitcoin::TxIn {
                previous_output: OutPoint { txid: trusted.txid(), vout: vout as u32 },
                script_sig: ScriptBuf::new(),
                sequence: bitcoin::Sequence::MAX,
                witness: bitcoin::Witness::new(),
            }],
            output: vec![TxOut { value: value - Amount::from_sat(fee), script_pubkey: out.script_pubkey }],
        };
        let mut psbt = Psbt::from_unsigned_tx(tx.clone()).map_err(|e| e.to_string())?;
        psbt.inputs[0].witness_utxo = Some(TxOut { value, script_pubkey: script.to_p2wsh() });
        psbt.inputs[0].witness_script = Some(script.clone());
        psbt.outputs[0] = pout;
        let msg = msgs::SignPenaltyToUs {
            revocation_secret: DisclosedSecret(self.peer.secret(n)),
            tx: WithSize(tx),
            psbt: WithSize(PsbtWrapper { inner: psbt }),
            wscript: Octets(script.to_bytes()),
        };
        match self.send(hsmd, Conn::Channel, &msg)? {
            Message::SignTxReply(_) => Ok(()),
            m => Err(format!("sign_penalty_to_us: unexpected reply {m:?}")),
        }
    }

    /// Our balance in the channel (msat).
    pub fn our_balance_msat(&self) -> u64 {
        self.to_us_msat
    }
}

fn cs_funding(params: &ChannelTransactionParameters) -> Result<PublicKey, String> {
    params
        .counterparty_parameters
        .as_ref()
        .map(|c| c.pubkeys.funding_pubkey)
        .ok_or_else(|| "no counterparty parameters".to_string())
}
