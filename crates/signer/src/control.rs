//! Owner control messages on the signer side (docs/control.md).
//!
//! A request (`msgpack(ControlMessage) | nonce u64 BE | sig65`) must be signed by the owner key
//! (default: the node key) and, except `Nonce`, carry a nonce above the last accepted one and at
//! most [`sphinx_wire::control::NONCE_WINDOW`] above it. An accepted message's effects and its
//! nonce are committed in ONE persister transaction (redb, fsync) before the response exists;
//! a refused one changes nothing, not even the nonce. Every answer, refusals included, is a
//! [`ControlResponse`] signed by the device (node) key over the msgpack and the request's nonce.

use std::panic::{catch_unwind, AssertUnwindSafe};

use bitcoin::secp256k1::PublicKey;
use lightning_signer::node::Allowable;
use lightning_signer::util::velocity::VelocityControl;
use sphinx_wire::control::{self, All, ControlMessage, ControlResponse, Policy as Limits, Velocity, MAX_CONTROL_LEN};
use tracing::{info, warn};
use vls_persist::kvv::KVVStore;

use crate::policy::velocity_spec;
use crate::store::Persister;
use crate::{begin, panic_text, sync_node_state, Core, Error, PolicyConfig, Signer};

/// KVV key of the last accepted control nonce (JSON number).
pub const NONCE_KEY: &str = "sphinx/control-nonce";
/// KVV key of the owner's policy (JSON [`sphinx_wire::control::Policy`]).
pub const POLICY_KEY: &str = "sphinx/policy";

/// What the device must do after the response to an accepted reset has been sent. The signer
/// itself refuses every request from then on (for `ResetKeys`/`ResetAll`); deleting files is the
/// front end's job, because only it knows where the seed lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlAction {
    /// Forget network settings (on Linux there are none: nothing to do).
    ResetWifi,
    /// Delete the seed; keep the state (a re-imported same seed continues with it).
    ResetKeys,
    /// Delete the seed, the owner key and the state directory ([`Signer::destroy_state`]).
    ResetAll,
}

/// The result of [`Signer::control`].
#[derive(Clone, Debug)]
pub struct ControlOutcome {
    /// The signed response bytes to publish on `{id}/control-res`.
    pub response: Vec<u8>,
    /// What the response says.
    pub answer: ControlResponse,
    /// The nonce the response is bound to (the request's, or 0 if it had none).
    pub nonce: u64,
    /// For an accepted reset: what to do once the response is out.
    pub action: Option<ControlAction>,
}

/// Reads the owner's stored limits, if the owner ever set them.
pub(crate) fn stored_limits(p: &Persister) -> Result<Option<Limits>, Error> {
    match catch_unwind(AssertUnwindSafe(|| p.get(POLICY_KEY))) {
        Ok(Ok(Some((_, v)))) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| Error::Unavailable(format!("stored owner policy unreadable: {e}"))),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) => Err(Error::Unavailable(format!("reading owner policy: {e:?}"))),
        Err(x) => Err(Error::Unavailable(format!("reading owner policy: {}", panic_text(x)))),
    }
}

/// Reads the last accepted nonce (0 if none was ever accepted).
fn stored_nonce(p: &Persister) -> Result<u64, String> {
    match p.get(NONCE_KEY) {
        Ok(Some((_, v))) => serde_json::from_slice(&v).map_err(|e| format!("stored nonce unreadable: {e}")),
        Ok(None) => Ok(0),
        Err(e) => Err(format!("reading nonce: {e:?}")),
    }
}

/// The nonce field of a request, if it is long enough to have one (for binding an error
/// response even to a request that does not parse).
fn trailer_nonce(request: &[u8]) -> u64 {
    if request.len() < 73 || request.len() > MAX_CONTROL_LEN {
        return 0;
    }
    let n = &request[request.len() - 73..request.len() - 65];
    let mut b = [0u8; 8];
    b.copy_from_slice(n);
    u64::from_be_bytes(b)
}

/// The velocity state of `vc` as of `now` (unix seconds), without changing `vc`.
fn velocity_now(vc: &VelocityControl, now: u64, limits: &Limits) -> Velocity {
    let mut c = vc.clone();
    if now >= c.start_sec {
        // Inserting 0 ages the buckets to `now` (and cannot fail).
        c.insert(now, 0);
    }
    Velocity { spent_msat: c.velocity(), limit_msat: limits.msat_per_interval, interval: limits.interval }
}

/// The answer to an accepted message and what the device must do after sending it.
type Effect = (ControlResponse, Option<ControlAction>);

/// An accepted control message: the answer, what the device must do after sending it, and the
/// `lss-res` payload when its state waits for LSS.
type Accepted = (ControlResponse, Option<ControlAction>, Option<Vec<u8>>);

impl Signer {
    /// The key whose signature control messages must carry (default: the node key).
    pub fn owner_key(&self) -> PublicKey {
        self.owner
    }

    /// Sets the owner key (e.g. a separate key chosen at `sphinx-key init`).
    pub fn set_owner_key(&mut self, owner: PublicKey) {
        self.owner = owner;
    }

    /// Set after an accepted `ResetKeys`/`ResetAll`: the signer refuses every request.
    pub fn reset_state(&self) -> Option<ControlAction> {
        self.reset
    }

    /// The owner's limits in force.
    pub fn limits(&mut self) -> Result<Limits, Error> {
        Ok(self.core()?.limits)
    }

    /// The velocity state (spent in the current interval) as of the signer's clock.
    pub fn velocity(&mut self) -> Result<Velocity, Error> {
        let core = self.core()?;
        let now = core.node.get_clock().now().as_secs();
        let st = core.node.get_state();
        Ok(velocity_now(&st.velocity_control, now, &core.limits))
    }

    /// The node's allowlist (VLS syntax).
    pub fn allowlist(&mut self) -> Result<Vec<String>, Error> {
        self.core()?.node.allowlist().map_err(|e| Error::Unavailable(format!("allowlist: {e}")))
    }

    /// Handles one owner control request (`{id}/control` payload) and returns the signed response
    /// for `{id}/control-res`. Never fails: anything refused is a signed
    /// `ControlResponse::Error(text)`. See [`Signer::control`] for resets.
    pub fn handle_control(&mut self, request: &[u8]) -> Vec<u8> {
        self.control(request).response
    }

    /// Like [`Signer::handle_control`], also saying what the response is and what the device
    /// must do after sending it (for resets).
    /// With LSS backup on, a message that changed state is staged (see [`Signer::stage_control`]);
    /// this then answers with a refusal instead.
    pub fn control(&mut self, request: &[u8]) -> ControlOutcome {
        if self.lss.is_some() {
            let nonce = trailer_nonce(request);
            let answer = ControlResponse::Error("backup is on: control goes through stage_control()".into());
            return ControlOutcome {
                response: self.sign_control_response(&answer, nonce),
                answer,
                nonce,
                action: None,
            };
        }
        match self.stage_control(request) {
            crate::Outcome::Ready(o) => o,
            crate::Outcome::Backup { .. } => {
                let nonce = trailer_nonce(request);
                let answer = ControlResponse::Error("internal: staged without LSS".into());
                ControlOutcome { response: self.sign_control_response(&answer, nonce), answer, nonce, action: None }
            }
        }
    }

    /// Handles a control message up to its commit, as [`Signer::stage`] does a request: with
    /// LSS on, a message that changed state is held until LSS acknowledged it
    /// ([`Signer::lss_stored`] releases it as [`crate::Held::Control`]).
    pub fn stage_control(&mut self, request: &[u8]) -> crate::Outcome<ControlOutcome> {
        let mut nonce = trailer_nonce(request);
        let mut lss_res = None;
        let (answer, action) = match control::parse_request(request, &self.owner) {
            Err(e) => {
                warn!(error = %e, bytes = request.len(), "control message refused");
                (ControlResponse::Error(e.to_string()), None)
            }
            Ok((msg, n)) => {
                nonce = n;
                match self.control_msg(&msg, n) {
                    Ok((answer, action, staged)) => {
                        info!(?msg, nonce = n, staged = staged.is_some(), "control message accepted");
                        lss_res = staged;
                        (answer, action)
                    }
                    Err(text) => {
                        warn!(?msg, nonce = n, error = %text, "control message refused");
                        (ControlResponse::Error(text), None)
                    }
                }
            }
        };
        if let Some(a) = action {
            if a != ControlAction::ResetWifi {
                self.reset = Some(a);
            }
        }
        let response = self.sign_control_response(&answer, nonce);
        let outcome = ControlOutcome { response, answer, nonce, action };
        match lss_res {
            None => crate::Outcome::Ready(outcome),
            Some(lss_res) => {
                self.hold(crate::Held::Control(outcome));
                crate::Outcome::Backup { lss_res }
            }
        }
    }

    /// Signs a control response with the device (node) key, bound to `nonce`.
    pub fn sign_control_response(&self, answer: &ControlResponse, nonce: u64) -> Vec<u8> {
        match control::build_response(answer, nonce, &self.node_secret) {
            Ok(r) => r,
            Err(e) => {
                // Only possible for an unencodable answer; say so instead.
                let text = ControlResponse::Error(format!("cannot encode the response: {e}"));
                control::build_response(&text, nonce, &self.node_secret).unwrap_or_default()
            }
        }
    }

    /// Checks the nonce and carries out an authenticated message: `Err(text)` is a refusal that
    /// changed nothing.
    fn control_msg(&mut self, msg: &ControlMessage, nonce: u64) -> Result<Accepted, String> {
        if let Some(r) = self.reset {
            return Err(format!("the device was reset ({r:?}) and must be initialised again"));
        }
        self.core().map_err(|e| e.to_string())?;
        self.lss_ready().map_err(|e| e.to_string())?;
        if let ControlMessage::Ota(_) = msg {
            return Err("OTA is not supported on Linux: update the binary with your package manager".into());
        }
        let network = self.cfg.network;
        let base = self.cfg.policy.clone();
        let core = self.core.as_mut().ok_or("signer state unavailable")?;
        let persister = core.persister.clone();
        let last = stored_nonce(&persister)?;
        if let ControlMessage::Nonce = msg {
            return Ok((ControlResponse::Nonce(last), None, None));
        }
        control::check_nonce(last, nonce).map_err(|e| e.to_string())?;

        begin(&persister).map_err(|e| e.to_string())?;
        let effect = catch_unwind(AssertUnwindSafe(|| apply(core, msg, network, &base)));
        let effect = match effect {
            Ok(Ok(e)) => e,
            Ok(Err(text)) => {
                // Nothing may stay behind: drop the transaction's writes and the in-memory node.
                self.rebuild();
                return Err(text);
            }
            Err(p) => {
                self.rebuild();
                return Err(format!("internal error: {}", panic_text(p)));
            }
        };
        let (answer, action) = effect;
        let done = catch_unwind(AssertUnwindSafe(|| -> Result<(), lightning_signer::persist::Error> {
            let core = self
                .core
                .as_ref()
                .ok_or_else(|| lightning_signer::persist::Error::Internal("signer state unavailable".into()))?;
            sync_node_state(&persister, &core.node)?;
            let v =
                serde_json::to_vec(&nonce).map_err(|e| lightning_signer::persist::Error::Internal(e.to_string()))?;
            persister.put(NONCE_KEY, v)
        }));
        let done = match done {
            Ok(Ok(())) => match self.finish(&persister, 0) {
                Ok(staged) => Ok(Ok(staged)),
                Err(e) => Ok(Err(lightning_signer::persist::Error::Internal(e.to_string()))),
            },
            Ok(Err(e)) => Ok(Err(e)),
            Err(p) => Err(p),
        };
        match done {
            Ok(Ok(staged)) => Ok((answer, action, staged)),
            Ok(Err(e)) => {
                self.rebuild();
                Err(format!("persisting failed, nothing changed: {e:?}"))
            }
            Err(p) => {
                self.rebuild();
                Err(format!("persisting failed, nothing changed: {}", panic_text(p)))
            }
        }
    }

    /// Deletes the state directory (after an accepted `ResetAll`): closes redb and removes the
    /// directory. An in-memory signer just drops its state.
    pub fn destroy_state(mut self) -> Result<(), Error> {
        self.core = None;
        if let crate::Backend::Redb { dir, store } = &mut self.backend {
            *store = None;
            match std::fs::remove_dir_all(&*dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::StateDir { path: dir.clone(), reason: e.to_string() }),
            }
            info!(dir = %dir.display(), "signer state deleted");
        }
        Ok(())
    }
}

/// Carries out an accepted message on the node, inside the open transaction.
fn apply(
    core: &mut Core,
    msg: &ControlMessage,
    network: bitcoin::Network,
    base: &PolicyConfig,
) -> Result<Effect, String> {
    let now = core.node.get_clock().now().as_secs();
    let velocity = |core: &Core| {
        let st = core.node.get_state();
        velocity_now(&st.velocity_control, now, &core.limits)
    };
    let allowlist = |core: &Core| core.node.allowlist().map_err(|e| format!("allowlist: {e}"));
    Ok(match msg {
        ControlMessage::Nonce | ControlMessage::Ota(_) => {
            return Err("internal: handled before".into());
        }
        ControlMessage::ResetWifi => (ControlResponse::ResetWifi, Some(ControlAction::ResetWifi)),
        ControlMessage::ResetKeys => (ControlResponse::ResetKeys, Some(ControlAction::ResetKeys)),
        ControlMessage::ResetAll => (ControlResponse::ResetAll, Some(ControlAction::ResetAll)),
        ControlMessage::QueryPolicy => (ControlResponse::PolicyCurrent(core.limits), None),
        ControlMessage::QueryAllowlist => (ControlResponse::AllowlistCurrent(allowlist(core)?), None),
        ControlMessage::QueryVelocity => (ControlResponse::VelocityCurrent(Some(velocity(core))), None),
        ControlMessage::QueryAll => (
            ControlResponse::AllCurrent(All {
                policy: core.limits,
                allowlist: allowlist(core)?,
                velocity: Some(velocity(core)),
            }),
            None,
        ),
        ControlMessage::UpdatePolicy(new) => {
            let policy = PolicyConfig { limits: *new, ..base.clone() };
            core.node.set_validator_factory(policy.validator_factory(network));
            {
                // Keep what was spent in the current interval unless the interval type changes
                // (the buckets then mean something else): a new limit applies to the same
                // spending. VLS's own `update_velocity_controls` would reset on any change.
                let fresh = VelocityControl::new(velocity_spec(new));
                let mut st = core.node.get_state();
                let vc = &mut st.velocity_control;
                if vc.bucket_interval == fresh.bucket_interval && vc.buckets.len() == fresh.buckets.len() {
                    vc.limit = fresh.limit;
                } else {
                    *vc = fresh;
                }
            }
            core.limits = *new;
            let v = serde_json::to_vec(new).map_err(|e| e.to_string())?;
            core.persister.put(POLICY_KEY, v).map_err(|e| format!("persisting policy: {e:?}"))?;
            (ControlResponse::PolicyUpdated(*new), None)
        }
        ControlMessage::UpdateAllowlist(list) => {
            // Check every entry first: VLS clears its list before parsing the new one.
            for a in list {
                Allowable::from_str(a, network).map_err(|e| format!("invalid allowlist entry {a:?}: {e}"))?;
            }
            core.node.set_allowlist(list).map_err(|e| format!("allowlist: {e}"))?;
            (ControlResponse::AllowlistUpdated(allowlist(core)?), None)
        }
    })
}
