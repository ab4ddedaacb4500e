//! The signer's VLS policy: a non-permissive `SimplePolicy` by default, with one named, narrow
//! exception for the minimum feerate of sweeps (see [`PolicyConfig::sweep_min_feerate_per_kw`]
//! and docs/signer.md), the owner's limits (velocity and HTLC value, [`PolicyConfig::limits`]),
//! and the approver for payments and on-chain sends.

use std::sync::Arc;

use bitcoin::bip32::DerivationPath;
use bitcoin::secp256k1::{PublicKey, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SegwitV0Sighash};
use bitcoin::{Network, ScriptBuf, Transaction, TxOut};
use lightning_signer::channel::{ChannelId, ChannelSetup, ChannelSlot};
use lightning_signer::invoice::Invoice;
use lightning_signer::lightning::ln::chan_utils::{ClosingTransaction, HTLCOutputInCommitment, TxCreationKeys};
use lightning_signer::lightning::types::payment::PaymentHash;
use lightning_signer::policy::error::ValidationError;
use lightning_signer::policy::filter::PolicyFilter;
use lightning_signer::policy::simple_validator::{make_default_simple_policy, SimplePolicy, SimpleValidatorFactory};
use lightning_signer::policy::validator::{ChainState, EnforcementState, Validator, ValidatorFactory};
use lightning_signer::policy::Policy;
use lightning_signer::prelude::Mutex;
use lightning_signer::signer::vls_channel_signer::VlsChannelSigner;
use lightning_signer::tx::tx::{CommitmentInfo, CommitmentInfo2};
use lightning_signer::util::velocity::{VelocityControlIntervalType, VelocityControlSpec};
use lightning_signer::wallet::Wallet;
use lightning_signer::SendSync;
use sphinx_wire::control::{Interval, Policy as Limits};
use vls_protocol_signer::approver::{Approve, WarningPositiveApprover};

/// Default minimum feerate (sat/kw, as VLS estimates it) for sweeps of our own outputs.
///
/// CLN sweeps penalty and delayed outputs at its 253 sat/kw floor, but VLS estimates a sweep's
/// weight with a 220 WU witness where a `to_local`/justice witness is about 157 WU, so it computes
/// 225-227 sat/kw for those transactions and its default 253 minimum refuses them. 220 accepts
/// CLN's floor sweeps with a small margin; every other sweep check (version, destination, the
/// maximum feerate) is unchanged, and every other minimum (commitments, HTLCs, mutual close,
/// on-chain) stays at VLS's 253.
pub const DEFAULT_SWEEP_MIN_FEERATE_PER_KW: u32 = 220;

/// Policy settings of the signer. `Default` is the strict, non-permissive policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Demote every VLS policy violation to a warning and approve every payment and on-chain
    /// send. Only for operators who ask for it (testing, recovery).
    pub permissive: bool,
    /// Minimum feerate for sweeps (`policy-sweep-fee-range` lower bound), sat/kw as VLS
    /// estimates it. See [`DEFAULT_SWEEP_MIN_FEERATE_PER_KW`].
    pub sweep_min_feerate_per_kw: u32,
    /// Approve Lightning payments (invoices and keysends) that CLN asks to pre-approve.
    /// VLS still enforces its own payment and HTLC policy on the commitments that carry them.
    pub approve_payments: bool,
    /// Approve on-chain sends to destinations that are neither our wallet, a channel of ours nor on
    /// the allowlist. Off by default: such a `withdraw` is refused unless allowlisted.
    pub approve_onchain: bool,
    /// Initial allowlist (addresses or `xpub` entries, VLS syntax); used when the node is created.
    pub allowlist: Vec<String>,
    /// The owner's limits until the owner sets them with an `UpdatePolicy` control message
    /// (from then on the stored ones, `sphinx/policy`, are used): `msat_per_interval` and
    /// `interval` become VLS's node velocity control (`global_velocity_control`, checked when a
    /// payment is pre-approved), `htlc_limit_msat` VLS's `max_htlc_value_sat` (the in-flight
    /// HTLC value of a commitment, `policy-commitment-htlc-inflight-limit`). Default: upstream
    /// sphinx-key's [`Limits::default`].
    pub limits: Limits,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            permissive: false,
            sweep_min_feerate_per_kw: DEFAULT_SWEEP_MIN_FEERATE_PER_KW,
            approve_payments: true,
            approve_onchain: false,
            allowlist: Vec::new(),
            limits: Limits::default(),
        }
    }
}

/// The VLS velocity spec of the owner's limits.
pub(crate) fn velocity_spec(limits: &Limits) -> VelocityControlSpec {
    VelocityControlSpec {
        limit_msat: limits.msat_per_interval,
        interval_type: match limits.interval {
            Interval::Hourly => VelocityControlIntervalType::Hourly,
            Interval::Daily => VelocityControlIntervalType::Daily,
        },
    }
}

impl PolicyConfig {
    /// The VLS `SimplePolicy` this config selects for `network` (everything but sweeps).
    pub fn simple_policy(&self, network: Network) -> SimplePolicy {
        let mut p = make_default_simple_policy(network);
        if self.permissive {
            p.filter = PolicyFilter::new_permissive();
        }
        p.max_htlc_value_sat = self.limits.htlc_limit_msat / 1000;
        p.global_velocity_control = velocity_spec(&self.limits);
        p
    }

    fn sweep_policy(&self, network: Network) -> SimplePolicy {
        let mut p = self.simple_policy(network);
        p.min_feerate_per_kw = self.sweep_min_feerate_per_kw.min(p.min_feerate_per_kw);
        p
    }

    pub(crate) fn validator_factory(&self, network: Network) -> Arc<dyn ValidatorFactory> {
        Arc::new(SphinxValidatorFactory {
            main: SimpleValidatorFactory::new_with_policy(self.simple_policy(network)),
            sweep: SimpleValidatorFactory::new_with_policy(self.sweep_policy(network)),
        })
    }

    pub(crate) fn approver(&self) -> Arc<dyn Approve> {
        if self.permissive {
            Arc::new(WarningPositiveApprover())
        } else {
            Arc::new(ConfigApprover { payments: self.approve_payments, onchain: self.approve_onchain })
        }
    }
}

/// Approves payments and on-chain sends according to [`PolicyConfig`].
struct ConfigApprover {
    payments: bool,
    onchain: bool,
}

impl SendSync for ConfigApprover {}

impl Approve for ConfigApprover {
    fn approve_invoice(&self, _invoice: &Invoice) -> bool {
        self.payments
    }
    fn approve_keysend(&self, _payment_hash: PaymentHash, _amount_msat: u64) -> bool {
        self.payments
    }
    fn approve_onchain(&self, _tx: &Transaction, _prev: &[TxOut], _unknown: &[usize]) -> bool {
        self.onchain
    }
}

/// Makes [`SphinxValidator`]s: VLS's simple validator, with sweeps checked by a copy whose only
/// difference is the minimum feerate.
struct SphinxValidatorFactory {
    main: SimpleValidatorFactory,
    sweep: SimpleValidatorFactory,
}

impl ValidatorFactory for SphinxValidatorFactory {
    // VLS's own factories return `Arc<dyn Validator>` of non-Send validators the same way.
    #[allow(clippy::arc_with_non_send_sync)]
    fn make_validator(
        &self,
        network: Network,
        node_id: PublicKey,
        channel_id: Option<ChannelId>,
    ) -> Arc<dyn Validator> {
        Arc::new(SphinxValidator {
            main: self.main.make_validator(network, node_id, channel_id.clone()),
            sweep: self.sweep.make_validator(network, node_id, channel_id),
        })
    }

    fn policy(&self, network: Network) -> Box<dyn Policy> {
        self.main.policy(network)
    }
}

/// Delegates everything to `main` except the three sweep validations, which go to `sweep`.
struct SphinxValidator {
    main: Arc<dyn Validator>,
    sweep: Arc<dyn Validator>,
}

impl Validator for SphinxValidator {
    fn validate_setup_channel(
        &self,
        wallet: &dyn Wallet,
        setup: &ChannelSetup,
        holder_shutdown_key_path: &DerivationPath,
    ) -> Result<(), ValidationError> {
        self.main.validate_setup_channel(wallet, setup, holder_shutdown_key_path)
    }

    fn validate_channel_value(&self, setup: &ChannelSetup) -> Result<(), ValidationError> {
        self.main.validate_channel_value(setup)
    }

    fn validate_onchain_tx(
        &self,
        wallet: &dyn Wallet,
        channels: Vec<Option<Arc<Mutex<ChannelSlot>>>>,
        tx: &Transaction,
        segwit_flags: &[bool],
        values_sat: &[u64],
        opaths: &[DerivationPath],
        weight_lower_bound: usize,
    ) -> Result<u64, ValidationError> {
        self.main.validate_onchain_tx(wallet, channels, tx, segwit_flags, values_sat, opaths, weight_lower_bound)
    }

    fn decode_commitment_tx(
        &self,
        keys: &VlsChannelSigner,
        setup: &ChannelSetup,
        is_counterparty: bool,
        tx: &Transaction,
        output_witscripts: &[Vec<u8>],
    ) -> Result<CommitmentInfo, ValidationError> {
        self.main.decode_commitment_tx(keys, setup, is_counterparty, tx, output_witscripts)
    }

    fn validate_counterparty_commitment_tx(
        &self,
        estate: &EnforcementState,
        commit_num: u64,
        commitment_point: &PublicKey,
        setup: &ChannelSetup,
        cstate: &ChainState,
        info2: &CommitmentInfo2,
    ) -> Result<(), ValidationError> {
        self.main.validate_counterparty_commitment_tx(estate, commit_num, commitment_point, setup, cstate, info2)
    }

    fn validate_holder_commitment_tx(
        &self,
        estate: &EnforcementState,
        commit_num: u64,
        commitment_point: &PublicKey,
        setup: &ChannelSetup,
        cstate: &ChainState,
        info2: &CommitmentInfo2,
    ) -> Result<(), ValidationError> {
        self.main.validate_holder_commitment_tx(estate, commit_num, commitment_point, setup, cstate, info2)
    }

    fn validate_counterparty_revocation(
        &self,
        state: &EnforcementState,
        revoke_num: u64,
        commitment_secret: &SecretKey,
    ) -> Result<(), ValidationError> {
        self.main.validate_counterparty_revocation(state, revoke_num, commitment_secret)
    }

    fn decode_and_validate_htlc_tx(
        &self,
        is_counterparty: bool,
        setup: &ChannelSetup,
        txkeys: &TxCreationKeys,
        tx: &Transaction,
        redeemscript: &ScriptBuf,
        htlc_amount_sat: u64,
        output_witscript: &ScriptBuf,
    ) -> Result<(u32, HTLCOutputInCommitment, SegwitV0Sighash, EcdsaSighashType), ValidationError> {
        self.main.decode_and_validate_htlc_tx(
            is_counterparty,
            setup,
            txkeys,
            tx,
            redeemscript,
            htlc_amount_sat,
            output_witscript,
        )
    }

    fn validate_htlc_tx(
        &self,
        setup: &ChannelSetup,
        cstate: &ChainState,
        is_counterparty: bool,
        htlc: &HTLCOutputInCommitment,
        feerate_per_kw: u32,
    ) -> Result<(), ValidationError> {
        self.main.validate_htlc_tx(setup, cstate, is_counterparty, htlc, feerate_per_kw)
    }

    fn decode_and_validate_mutual_close_tx(
        &self,
        wallet: &dyn Wallet,
        setup: &ChannelSetup,
        state: &EnforcementState,
        tx: &Transaction,
        opaths: &[DerivationPath],
    ) -> Result<ClosingTransaction, ValidationError> {
        self.main.decode_and_validate_mutual_close_tx(wallet, setup, state, tx, opaths)
    }

    fn validate_mutual_close_tx(
        &self,
        wallet: &dyn Wallet,
        setup: &ChannelSetup,
        state: &EnforcementState,
        to_holder_value_sat: u64,
        to_counterparty_value_sat: u64,
        holder_shutdown_script: &Option<ScriptBuf>,
        counterparty_shutdown_script: &Option<ScriptBuf>,
        holder_wallet_path_hint: &DerivationPath,
    ) -> Result<(), ValidationError> {
        self.main.validate_mutual_close_tx(
            wallet,
            setup,
            state,
            to_holder_value_sat,
            to_counterparty_value_sat,
            holder_shutdown_script,
            counterparty_shutdown_script,
            holder_wallet_path_hint,
        )
    }

    fn validate_delayed_sweep(
        &self,
        wallet: &dyn Wallet,
        setup: &ChannelSetup,
        cstate: &ChainState,
        tx: &Transaction,
        input: usize,
        amount_sat: u64,
        key_path: &DerivationPath,
    ) -> Result<(), ValidationError> {
        self.sweep.validate_delayed_sweep(wallet, setup, cstate, tx, input, amount_sat, key_path)
    }

    fn validate_counterparty_htlc_sweep(
        &self,
        wallet: &dyn Wallet,
        setup: &ChannelSetup,
        cstate: &ChainState,
        tx: &Transaction,
        redeemscript: &ScriptBuf,
        input: usize,
        amount_sat: u64,
        key_path: &DerivationPath,
    ) -> Result<(), ValidationError> {
        self.sweep.validate_counterparty_htlc_sweep(
            wallet,
            setup,
            cstate,
            tx,
            redeemscript,
            input,
            amount_sat,
            key_path,
        )
    }

    fn validate_justice_sweep(
        &self,
        wallet: &dyn Wallet,
        setup: &ChannelSetup,
        cstate: &ChainState,
        tx: &Transaction,
        input: usize,
        amount_sat: u64,
        key_path: &DerivationPath,
    ) -> Result<(), ValidationError> {
        self.sweep.validate_justice_sweep(wallet, setup, cstate, tx, input, amount_sat, key_path)
    }

    fn validate_payment_balance(
        &self,
        incoming_msat: u64,
        outgoing_msat: u64,
        invoiced_amount_msat: Option<u64>,
    ) -> Result<(), ValidationError> {
        self.main.validate_payment_balance(incoming_msat, outgoing_msat, invoiced_amount_msat)
    }

    fn validate_payment_cltv(&self, incoming_cltv: u32, outgoing_cltv: u32) -> Result<(), ValidationError> {
        self.main.validate_payment_cltv(incoming_cltv, outgoing_cltv)
    }

    fn enforce_balance(&self) -> bool {
        self.main.enforce_balance()
    }

    fn minimum_initial_balance(&self, holder_value_msat: u64) -> u64 {
        self.main.minimum_initial_balance(holder_value_msat)
    }

    fn is_ready(&self, cstate: &ChainState) -> bool {
        self.main.is_ready(cstate)
    }

    fn policy(&self) -> Box<&dyn Policy> {
        self.main.policy()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_strict_with_narrow_sweep_floor() {
        let c = PolicyConfig::default();
        assert!(!c.permissive);
        let main = c.simple_policy(Network::Regtest);
        let sweep = c.sweep_policy(Network::Regtest);
        assert_eq!(main.min_feerate_per_kw, 253);
        assert_eq!(sweep.min_feerate_per_kw, DEFAULT_SWEEP_MIN_FEERATE_PER_KW);
        assert_eq!(sweep.max_feerate_per_kw, main.max_feerate_per_kw);
        assert!(main.filter.rules.is_empty(), "strict: every violation is an error");
        // The owner's limits reach both validators (upstream's defaults until the owner sets them).
        for p in [&main, &sweep] {
            assert_eq!(p.max_htlc_value_sat, 1_000_000);
            assert_eq!(p.global_velocity_control.limit_msat, 21_000_000_000);
            assert!(matches!(p.global_velocity_control.interval_type, VelocityControlIntervalType::Daily));
        }
    }
}
