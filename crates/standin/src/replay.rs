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

use crate::harness::wait_listening;
use crate::lightningd::SpawnOptions;
use crate::trace::{Ctx, Trace};

/// `preapprove_invoice_check` (51) / `preapprove_keysend_check` (52) → 38 / 39 without the
/// trailing `check_only` byte ([`hsmd::without_check_capability`]). Other messages are returned
/// unchanged.
pub fn translate_request(msg: &[u8]) -> Vec<u8> {
    hsmd::without_check_capability(msg)
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

/// Replays a trace one request at a time through a [`crate::lightningd::FakeLightningd`], with
/// the rules of this module (same translation, a second `hsmd_init` on conn 0 restarts the
/// broker; [`replay`] is a session run to the end), so that a test can act between requests
/// (kill, stop or disconnect the signer, play a foreign client, open an extra client, …) and
/// still compare the steps with the oracle ([`compare_with_oracle`]).
pub struct Session {
    opts: ReplayOptions,
    exchanges: Vec<crate::trace::Exchange>,
    ld: Option<crate::lightningd::FakeLightningd>,
    clients: std::collections::HashMap<u64, crate::lightningd::ClientConn>,
    seen_init: bool,
    next: usize,
    run: usize,
    /// Steps done and broker exits, as [`replay`] reports them.
    pub report: ReplayReport,
    /// After each broker spawn, wait (bounded) until this address accepts connections.
    pub wait_listen: Option<String>,
    /// Restart lightningd at a second `hsmd_init` by SIGKILLing the old broker (a crash)
    /// instead of closing fd 3.
    pub restart_by_kill: bool,
}

impl Session {
    /// Spawns the broker (run 0); no request is sent yet.
    pub fn start(trace: &crate::trace::Trace, opts: ReplayOptions) -> Result<Session, String> {
        let mut s = Session::unstarted(trace, opts);
        s.spawn()?;
        Ok(s)
    }

    /// A session whose first broker is not spawned yet ([`spawn_broker`](Self::spawn_broker) does).
    pub(crate) fn unstarted(trace: &crate::trace::Trace, opts: ReplayOptions) -> Session {
        Session {
            opts,
            exchanges: trace.exchanges.clone(),
            ld: None,
            clients: Default::default(),
            seen_init: false,
            next: 0,
            run: 0,
            report: Default::default(),
            wait_listen: None,
            restart_by_kill: false,
        }
    }

    /// Spawns the broker of the current run and, if [`wait_listen`](Self::wait_listen) is set,
    /// waits (bounded) until it listens.
    fn spawn(&mut self) -> Result<(), String> {
        self.spawn_broker().map_err(spawn_message)?;
        self.await_listen()
    }

    /// Spawns the broker of the current run, as lightningd spawns its hsmd.
    pub(crate) fn spawn_broker(&mut self) -> Result<(), ReplayError> {
        let o = &self.opts;
        let ld = crate::lightningd::FakeLightningd::spawn_with(
            &o.broker,
            &o.args,
            o.envs.iter().map(|(k, v)| (k, v)),
            o.spawn.clone(),
        )
        .map_err(|source| ReplayError::Spawn { run: self.run, source })?;
        self.ld = Some(ld);
        Ok(())
    }

    /// Waits (bounded) until [`wait_listen`](Self::wait_listen), if set, accepts connections.
    fn await_listen(&self) -> Result<(), String> {
        if let Some(a) = &self.wait_listen {
            wait_listening(a, std::time::Duration::from_secs(20)).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Sets [`wait_listen`](Self::wait_listen) and waits for the current broker too.
    pub fn set_wait_listen(&mut self, addr: &str) -> std::io::Result<()> {
        self.wait_listen = Some(addr.to_string());
        wait_listening(addr, std::time::Duration::from_secs(20))
    }

    /// The running lightningd stand-in.
    pub fn ld(&mut self) -> &mut crate::lightningd::FakeLightningd {
        self.ld.as_mut().expect("broker running")
    }

    /// The next request to be sent, if any.
    pub fn peek(&self) -> Option<&crate::trace::Exchange> {
        self.exchanges.get(self.next)
    }

    /// The client connection of a trace conn id, if open.
    pub fn client(&mut self, conn: u64) -> Option<&mut crate::lightningd::ClientConn> {
        self.clients.get_mut(&conn)
    }

    /// Which broker run is current (0, 1 after a restart).
    pub fn run(&self) -> usize {
        self.run
    }

    fn finish_run(&mut self) {
        if let Some(ld) = self.ld.take() {
            let status = ld.status_shared();
            let exit = if self.restart_by_kill {
                ld.kill().map(|s| crate::lightningd::describe_status(&s)).map_err(|e| e.to_string())
            } else {
                ld.shutdown().map(|s| crate::lightningd::describe_status(&s)).map_err(|e| e.to_string())
            };
            // Counted after the exit: the drain thread has read all the broker wrote.
            self.report.status_messages.push(status.lock().unwrap_or_else(|p| p.into_inner()).count);
            self.report.broker_exits.push(exit);
        }
    }

    /// Sends the next request and records its step; `None` when the trace is done.
    /// Panics if the broker cannot be respawned at a restart.
    pub fn step(&mut self) -> Option<&Step> {
        match self.try_step() {
            Ok(true) => self.report.steps.last(),
            Ok(false) => None,
            Err(e) => panic!("{}", spawn_message(e)),
        }
    }

    /// [`step`](Self::step) for [`replay`]: `Ok(true)` when a step was recorded
    /// (last in [`report`](Self::report)), `Ok(false)` when the trace is done, `Err` when the
    /// broker cannot be respawned at a restart.
    pub(crate) fn try_step(&mut self) -> Result<bool, ReplayError> {
        use sphinx_wire::hsmd;
        use {translate_request, translated_name, Step};
        let Some(ex) = self.exchanges.get(self.next).cloned() else { return Ok(false) };
        self.next += 1;
        if ex.conn == 0 && ex.msg_type == hsmd::HSMD_INIT {
            if self.seen_init {
                // lightningd restarted: its subdaemons and their hsm fds are gone, and so is the hsmd.
                self.clients.clear();
                self.finish_run();
                self.run += 1;
                self.spawn_broker()?;
                if let Err(e) = self.await_listen() {
                    panic!("{e}");
                }
            }
            self.seen_init = true;
        }
        let request = if self.opts.translate_preapprove { translate_request(&ex.request) } else { ex.request.clone() };
        let msg_type = hsmd::msg_type(&request).unwrap_or(ex.msg_type);
        let name = if msg_type != ex.msg_type {
            translated_name(msg_type).map(str::to_string).unwrap_or_else(|| format!("type_{msg_type}"))
        } else {
            ex.name.clone()
        };
        let start = std::time::Instant::now();
        let ld = self.ld.as_mut().expect("broker running");
        let reply: Result<Vec<u8>, String> = if ex.conn == 0 {
            if ex.msg_type == hsmd::CLIENT_HSMFD {
                match ld.new_client_raw(&request) {
                    Ok(c) => {
                        if let Some(id) = ex.new_conn {
                            self.clients.insert(id, c);
                        }
                        Ok(hsmd::client_hsmfd_reply())
                    }
                    Err(e) => Err(e.to_string()),
                }
            } else if ex.msg_type == hsmd::DEV_PREINIT {
                ld.send_no_reply(&request).map(|()| Vec::new()).map_err(|e| e.to_string())
            } else {
                ld.root_call(&request).map_err(|e| e.to_string())
            }
        } else {
            match self.clients.get_mut(&ex.conn) {
                Some(c) => c.call(&request).map_err(|e| e.to_string()),
                None => Err(format!("conn {} does not exist (its 9 failed?)", ex.conn)),
            }
        };
        self.report.steps.push(Step {
            index: ex.index,
            run: self.run,
            conn: ex.conn,
            ctx: ex.ctx,
            t: ex.t,
            recorded_type: ex.msg_type,
            msg_type,
            name,
            request,
            reply,
            recorded_reply: ex.reply.clone(),
            latency: start.elapsed(),
        });
        Ok(true)
    }

    /// Steps until the trace is done.
    pub fn run_to_end(&mut self) {
        while self.step().is_some() {}
    }

    /// Steps while `until(next exchange)` is false; returns the number of steps taken.
    pub fn run_until(&mut self, until: impl Fn(&crate::trace::Exchange) -> bool) -> usize {
        let mut n = 0;
        while let Some(ex) = self.peek() {
            if until(ex) {
                break;
            }
            self.step();
            n += 1;
        }
        n
    }

    /// Closes every client and lightningd's fd 3 (clean exit awaited) and returns the report.
    pub fn finish(mut self) -> ReplayReport {
        self.close()
    }

    /// [`finish`](Self::finish) in place (the session is done afterwards: no broker runs).
    pub fn close(&mut self) -> ReplayReport {
        self.clients.clear();
        self.restart_by_kill = false;
        self.finish_run();
        std::mem::take(&mut self.report)
    }
}

/// The message of a broker that could not be spawned (what [`Session::start`] returns and
/// [`Session::step`] panics with).
fn spawn_message(e: ReplayError) -> String {
    match e {
        ReplayError::Spawn { run, source } => format!("spawning broker (run {run}): {source}"),
    }
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
    use super::{compare_with_oracle, oracle_replay, Oracle, ReplayReport};
    use crate::trace::Trace;
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

    /// For tests: panics unless every reply in `report` equals the in-process oracle's for
    /// `trace` (`seed`, fixed `clock`, default policy, LSS off), every request was answered and
    /// the broker exited cleanly. `logs` is shown with a failure.
    pub fn assert_like_oracle(
        trace: &Trace,
        seed: [u8; 32],
        clock: u64,
        report: &ReplayReport,
        logs: impl FnOnce() -> String,
    ) {
        let cfg = replay_config(clock, Default::default());
        let mut signer = match in_memory(seed, &cfg) {
            Ok(s) => s,
            Err(e) => panic!("in-process oracle: {e}"),
        };
        let expected = oracle_replay(trace, &mut signer, true);
        let mismatches = compare_with_oracle(&report.steps, &expected);
        if !mismatches.is_empty() || !report.brokers_exited_cleanly() {
            let list: Vec<String> = mismatches
                .iter()
                .take(20)
                .map(|m| format!("  #{} conn {} type {}: {}", m.index, m.conn, m.msg_type, m.what))
                .collect();
            panic!(
                "{} mismatches vs the oracle, broker exits {:?}\n{}\n{}",
                mismatches.len(),
                report.broker_exits,
                list.join("\n"),
                logs()
            );
        }
        assert_eq!(report.steps.len(), trace.request_count(), "every request of the trace answered");
    }

    impl Oracle for Signer {
        fn handle(&mut self, req: &serial::Request) -> Result<Vec<u8>, String> {
            Signer::handle(self, req).map(|r| r.message).map_err(|e| format!("{e}"))
        }
    }
}
