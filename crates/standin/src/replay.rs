//! Replaying a recorded trace: end to end through a
//! [`FakeLightningd`](crate::lightningd::FakeLightningd) (and so through the broker and whatever
//! signer it relays to), and in process through an [`Oracle`] (the signer library), so that a test
//! can demand byte-identical replies from both.
//!
//! Rules (see `shared/traces/README.md`):
//! - every request of the trace is sent, in recorded order (no two requests of a trace are ever in
//!   flight at once, so sequential replay keeps the recorded order exactly);
//! - `preapprove_invoice_check` (51) → `preapprove_invoice` (38) and `preapprove_keysend_check`
//!   (52) → `preapprove_keysend` (39), dropping the trailing `check_only` byte: with VLS behind the
//!   broker CLN sends 38/39, because VLS does not advertise 51/52;
//! - a 9 on conn 0 creates the client whose id is the recorded 109's `new_conn`;
//! - a second `hsmd_init` on conn 0 is a lightningd restart: the broker is shut down (fd 3 closed)
//!   and a fresh one spawned with the same arguments and environment;
//! - the oracle gets every request except 9 and 33 (the broker answers those itself) and 99
//!   (never answered), as `serial::Request { seq, peer_id: ctx peer (zeros for root), dbid, message }`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use sphinx_wire::hsmd;
use sphinx_wire::serial;

use crate::harness::Session;
use crate::lightningd::SpawnOptions;
use crate::trace::{Ctx, Trace};

/// `preapprove_invoice_check` (51) / `preapprove_keysend_check` (52) → 38 / 39 without the
/// trailing `check_only` byte. Other messages are returned unchanged.
pub fn translate_request(msg: &[u8]) -> Vec<u8> {
    let to = match hsmd::msg_type(msg) {
        Ok(hsmd::PREAPPROVE_INVOICE_CHECK) => hsmd::PREAPPROVE_INVOICE,
        Ok(hsmd::PREAPPROVE_KEYSEND_CHECK) => hsmd::PREAPPROVE_KEYSEND,
        _ => return msg.to_vec(),
    };
    if msg.len() < 3 {
        return msg.to_vec();
    }
    let mut out = to.to_be_bytes().to_vec();
    out.extend_from_slice(&msg[2..msg.len() - 1]);
    out
}

/// Name of a message type we may send that is not in the trace (the translated ones).
pub fn translated_name(t: u16) -> Option<&'static str> {
    match t {
        hsmd::PREAPPROVE_INVOICE => Some("hsmd_preapprove_invoice"),
        hsmd::PREAPPROVE_KEYSEND => Some("hsmd_preapprove_keysend"),
        _ => None,
    }
}

/// How to run the broker for a replay.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// Broker executable.
    pub broker: PathBuf,
    /// Its arguments (as lightningd would pass: none, `--developer`, `--log-io`, …).
    pub args: Vec<OsString>,
    /// Extra environment (the broker also inherits ours).
    pub envs: Vec<(OsString, OsString)>,
    /// Spawn/timeouts.
    pub spawn: SpawnOptions,
    /// Apply the 51→38 / 52→39 translation (default true).
    pub translate_preapprove: bool,
}

impl ReplayOptions {
    /// Defaults for a broker path.
    pub fn new(broker: impl Into<PathBuf>) -> Self {
        ReplayOptions {
            broker: broker.into(),
            args: Vec::new(),
            envs: Vec::new(),
            spawn: SpawnOptions::default(),
            translate_preapprove: true,
        }
    }
}

/// One replayed request.
#[derive(Clone, Debug)]
pub struct Step {
    /// Index of the request in the trace ([`crate::trace::Exchange::index`]).
    pub index: usize,
    /// Which broker run (0, then 1 after a restart).
    pub run: usize,
    /// Connection id from the trace.
    pub conn: u64,
    /// Context of the connection.
    pub ctx: Ctx,
    /// Recorded time (s since T0).
    pub t: f64,
    /// Type as recorded.
    pub recorded_type: u16,
    /// Type as sent (differs for 51/52).
    pub msg_type: u16,
    /// Name of what was sent.
    pub name: String,
    /// Request as sent.
    pub request: Vec<u8>,
    /// Our reply, or why there is none.
    pub reply: Result<Vec<u8>, String>,
    /// The reply CLN's hsmd gave.
    pub recorded_reply: Option<Vec<u8>>,
    /// Round trip time (for 9: reply + fd).
    pub latency: Duration,
}

/// Outcome of a whole replay.
#[derive(Clone, Debug, Default)]
pub struct ReplayReport {
    /// Every request, in order.
    pub steps: Vec<Step>,
    /// Exit of each broker run after its fd 3 was closed (`Ok("exited with code 0")`, …).
    pub broker_exits: Vec<Result<String, String>>,
    /// Status messages received per run.
    pub status_messages: Vec<usize>,
}

impl ReplayReport {
    /// Steps that failed (no reply).
    pub fn errors(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| s.reply.is_err())
    }

    /// True if every broker run exited with status 0 after fd 3 closed.
    pub fn brokers_exited_cleanly(&self) -> bool {
        self.broker_exits.iter().all(|e| matches!(e, Ok(s) if s == "exited with code 0"))
    }
}

/// Errors that stop a replay (per-request failures are recorded in [`Step::reply`] instead).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The broker could not be started.
    #[error("starting broker (run {run}): {source}")]
    Spawn {
        /// Run number.
        run: usize,
        /// Cause.
        source: crate::lightningd::Error,
    },
}

/// Replays every request of `trace` through a broker spawned as lightningd spawns its hsmd:
/// a [`Session`] run to the end. `on_step` sees each step as soon as it is done (for live output).
pub fn replay(
    trace: &Trace,
    opts: &ReplayOptions,
    on_step: &mut dyn FnMut(&Step),
) -> Result<ReplayReport, ReplayError> {
    let mut sess = Session::unstarted(trace, opts.clone());
    sess.spawn_broker()?;
    while sess.try_step()? {
        on_step(sess.report.steps.last().expect("a step was just recorded"));
    }
    Ok(sess.finish())
}

/// How a reply compares with the one CLN's own hsmd gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Byte-identical.
    Exact,
    /// Different in a way the traces README documents (signature nonces, init capabilities, …).
    Expected(&'static str),
    /// Different where it must not be.
    Mismatch(String),
    /// No reply.
    Error(String),
    /// The trace has no recorded reply.
    NoRecord,
}

impl Verdict {
    /// Exact or documented difference.
    pub fn is_ok(&self) -> bool {
        matches!(self, Verdict::Exact | Verdict::Expected(_) | Verdict::NoRecord)
    }
}

/// Compares a reply with the recorded one, allowing only the differences measured and explained in
/// the traces README ("Replaying these traces into VLS").
pub fn judge_against_recorded(msg_type: u16, reply: &Result<Vec<u8>, String>, recorded: Option<&[u8]>) -> Verdict {
    let ours = match reply {
        Err(e) => return Verdict::Error(e.clone()),
        Ok(r) => r,
    };
    if msg_type == hsmd::DEV_PREINIT {
        return Verdict::Exact; // no reply expected
    }
    let Some(rec) = recorded else { return Verdict::NoRecord };
    if ours.as_slice() == rec {
        return Verdict::Exact;
    }
    let (Ok(ot), Ok(rt)) = (hsmd::msg_type(ours), hsmd::msg_type(rec)) else {
        return Verdict::Mismatch("reply shorter than a type".into());
    };
    if ot != rt {
        return Verdict::Mismatch(format!("reply type {ot}, recorded {rt}"));
    }
    match ot {
        hsmd::HSMD_INIT_REPLY_V4 => match (init_reply_identity(ours), init_reply_identity(rec)) {
            (Some(a), Some(b)) if a == b => {
                Verdict::Expected("init_reply: same version, node id, bip32 and bolt12 keys; other capabilities")
            }
            (Some(a), Some(b)) => Verdict::Mismatch(format!(
                "init_reply identity differs: version {} node id {} (recorded version {} node id {})",
                a.0,
                hex::encode(&a.1[..33]),
                b.0,
                hex::encode(&b.1[..33])
            )),
            _ => Verdict::Mismatch("unparsable init_reply".into()),
        },
        // cupdate_sig, cannouncement, node_announcement: nonce differs, both verify.
        103 | 104 | 106 if ours.len() == rec.len() => Verdict::Expected("gossip signature nonce"),
        // sign_commitment_tx, sign_tx_reply: CLN grinds low-R, VLS does not.
        105 | 112 if ours.len() == rec.len() => Verdict::Expected("tx signature nonce (low-R grinding)"),
        // sign_withdrawal: VLS returns the PSBT in a different shape.
        107 => Verdict::Expected("withdrawal PSBT shape"),
        _ => Verdict::Mismatch(format!("{} bytes vs recorded {}", ours.len(), rec.len())),
    }
}

/// `hsmd_init_reply_v4` (114) without its capability list and trailing TLV:
/// `(hsm_version, node_id[33] | bip32 ext_key[78] | bolt12 pubkey[33])`.
pub fn init_reply_identity(msg: &[u8]) -> Option<(u32, Vec<u8>)> {
    if hsmd::msg_type(msg).ok()? != hsmd::HSMD_INIT_REPLY_V4 || msg.len() < 8 {
        return None;
    }
    let version = u32::from_be_bytes(msg[2..6].try_into().ok()?);
    let ncaps = u16::from_be_bytes([msg[6], msg[7]]) as usize;
    let off = 8 + 4 * ncaps;
    let ident = msg.get(off..off + 33 + 78 + 33)?;
    Some((version, ident.to_vec()))
}

/// The signer as the replay's oracle: one hsmd request in, one reply out.
pub trait Oracle {
    /// Handles one request; `Err` is the signer's refusal/failure, as text.
    fn handle(&mut self, req: &serial::Request) -> Result<Vec<u8>, String>;
}

/// An [`Oracle`] from a closure (tests, fakes).
pub struct FnOracle<F>(pub F);

impl<F: FnMut(&serial::Request) -> Result<Vec<u8>, String>> Oracle for FnOracle<F> {
    fn handle(&mut self, req: &serial::Request) -> Result<Vec<u8>, String> {
        (self.0)(req)
    }
}

/// One request answered by the oracle.
#[derive(Clone, Debug)]
pub struct OracleStep {
    /// Index of the request in the trace.
    pub index: usize,
    /// Connection id.
    pub conn: u64,
    /// Type as sent.
    pub msg_type: u16,
    /// Request as sent (after translation).
    pub request: Vec<u8>,
    /// The oracle's answer.
    pub reply: Result<Vec<u8>, String>,
}

/// Types the broker answers itself or that get no answer: not given to the oracle.
pub fn oracle_skips(msg_type: u16) -> bool {
    matches!(msg_type, hsmd::CLIENT_HSMFD | hsmd::DEV_MEMLEAK | hsmd::DEV_PREINIT)
}

/// Computes, in process, what the signer answers to every request of `trace` (same order, same
/// translation, same contexts as the end-to-end replay).
pub fn oracle_replay(trace: &Trace, oracle: &mut dyn Oracle, translate_preapprove: bool) -> Vec<OracleStep> {
    let mut out = Vec::new();
    let mut seq: u16 = 0;
    for ex in &trace.exchanges {
        if oracle_skips(ex.msg_type) {
            continue;
        }
        let message = if translate_preapprove { translate_request(&ex.request) } else { ex.request.clone() };
        let ctx = ex.ctx.client_context();
        let req = serial::Request { seq, peer_id: ctx.peer_id, dbid: ctx.dbid, message };
        seq = seq.wrapping_add(1);
        let reply = oracle.handle(&req);
        out.push(OracleStep {
            index: ex.index,
            conn: ex.conn,
            msg_type: hsmd::msg_type(&req.message).unwrap_or(ex.msg_type),
            request: req.message,
            reply,
        });
    }
    out
}

/// A difference between the end-to-end replay and the oracle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OracleMismatch {
    /// Trace request index.
    pub index: usize,
    /// Connection.
    pub conn: u64,
    /// Type sent.
    pub msg_type: u16,
    /// What differs.
    pub what: String,
}

/// Demands byte identity between end-to-end replies and the oracle's, request by request.
/// A refusal counts as equal only if both sides refused. Steps the oracle skips (9, 33, 99) are
/// checked against the recorded reply instead (exact). The request sequences must line up.
pub fn compare_with_oracle(steps: &[Step], oracle: &[OracleStep]) -> Vec<OracleMismatch> {
    let mut out = Vec::new();
    let by_index: HashMap<usize, &OracleStep> = oracle.iter().map(|o| (o.index, o)).collect();
    for s in steps {
        let mism = |what: String| OracleMismatch { index: s.index, conn: s.conn, msg_type: s.msg_type, what };
        if oracle_skips(s.recorded_type) {
            let v = judge_against_recorded(s.msg_type, &s.reply, s.recorded_reply.as_deref());
            if v != Verdict::Exact {
                out.push(mism(format!("broker-answered type {}: {v:?}", s.recorded_type)));
            }
            continue;
        }
        let Some(o) = by_index.get(&s.index) else {
            out.push(mism("no oracle step for this request".into()));
            continue;
        };
        if o.request != s.request {
            out.push(mism("oracle was given a different request".into()));
            continue;
        }
        match (&s.reply, &o.reply) {
            (Ok(a), Ok(b)) if a == b => {}
            (Ok(a), Ok(b)) => out.push(mism(format!("reply {} vs oracle {}", short_hex(a), short_hex(b)))),
            (Err(_), Err(_)) => {}
            (Err(e), Ok(b)) => out.push(mism(format!("end-to-end failed ({e}), oracle replied {}", short_hex(b)))),
            (Ok(a), Err(e)) => out.push(mism(format!("end-to-end replied {}, oracle refused ({e})", short_hex(a)))),
        }
    }
    let replayed: std::collections::HashSet<usize> = steps.iter().map(|s| s.index).collect();
    for o in oracle {
        if !replayed.contains(&o.index) {
            out.push(OracleMismatch {
                index: o.index,
                conn: o.conn,
                msg_type: o.msg_type,
                what: "not replayed end to end".into(),
            });
        }
    }
    out
}

fn short_hex(b: &[u8]) -> String {
    if b.len() <= 24 {
        hex::encode(b)
    } else {
        format!("{}…({} bytes)", hex::encode(&b[..24]), b.len())
    }
}

/// The in-process oracle through `sphinx_signer::Signer` (feature `oracle`).
#[cfg(feature = "oracle")]
pub mod signer {
    use super::Oracle;
    use sphinx_signer::{ClockConfig, PolicyConfig, Signer, SignerConfig};
    use sphinx_wire::serial;

    /// The signer configuration of replays: regtest, the given policy, a fixed clock.
    pub fn replay_config(fixed_clock: u64, policy: PolicyConfig) -> SignerConfig {
        SignerConfig { network: bitcoin::Network::Regtest, policy, clock: ClockConfig::Fixed(fixed_clock) }
    }

    /// An in-memory signer for a seed and config.
    pub fn in_memory(seed: [u8; 32], cfg: &SignerConfig) -> Result<Signer, String> {
        Signer::in_memory(seed, cfg).map_err(|e| format!("{e}"))
    }

    impl Oracle for Signer {
        fn handle(&mut self, req: &serial::Request) -> Result<Vec<u8>, String> {
            Signer::handle(self, req).map(|r| r.message).map_err(|e| format!("{e}"))
        }
    }
}
