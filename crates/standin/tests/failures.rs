//! Failures through the real binaries: the lightningd stand-in spawns `sphinx-broker` as its
//! hsmd, `sphinx-key run` signs behind a [`TcpProxy`] (the network between them), and a recorded
//! CLN session is replayed one request at a time ([`Session`]) so that each test can break
//! something at an exact point: the signer's connection dropped with a request in flight or with
//! its reply on the wire, the signer killed, stopped (slow) or the broker crashed and restarted,
//! a CLN client closing its socket mid-request, a request VLS refuses.
//!
//! Every test ends with the replies of the whole session compared byte for byte with the
//! in-process signer (`replay::compare_with_oracle`): nothing lost, nothing signed twice
//! differently. Synchronisation is by events (proxy pattern seen, process exit, socket EOF);
//! log files are only read for what has no other event, with bounded waits.
//!
//! Needs `target/<profile>/{sphinx-broker,sphinx-key}` (`cargo build --release --workspace --bins`).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::recorded_session;
use sphinx_standin::harness::{
    bin, broker_envs, free_port, init_signer, log_text, signer_state, tail, wait_log, Dir, SignerProcess, TcpProxy,
    TempDir,
};
use sphinx_standin::lightningd::{BrokerOutput, Error as LdError, SpawnOptions};
use sphinx_standin::replay::{self, compare_with_oracle, oracle_replay, ReplayOptions, ReplayReport, Session};
use sphinx_standin::trace::Trace;
use sphinx_wire::hsmd;
use sphinx_wire::ClientContext;

/// The signer logs duplicate deliveries at debug.
const SIGNER_LOG: &str = "info,sphinx_signer=debug,lightning_signer=warn,vls_protocol_signer=warn,vls_persist=warn";

struct Rig {
    d: TempDir,
    tr: Trace,
    seed: [u8; 32],
    clock: u64,
    key_bin: PathBuf,
    proxy: TcpProxy,
    signer: Option<SignerProcess>,
    sess: Session,
    sid: String,
}

impl Rig {
    /// Broker spawned (and listening), signer started behind the proxy; nothing sent yet.
    fn new(scenario: &str, node: &str, tag: &str, broker_env: &[(&str, &str)]) -> Rig {
        let (tr, seed, clock) = recorded_session(scenario, node);
        let d = TempDir::new(tag).unwrap();
        let listen = format!("127.0.0.1:{}", free_port().unwrap());
        let key_bin = bin("sphinx-key").unwrap();
        init_signer(&key_bin, &d.join("signer"), seed).unwrap();
        let mut opts = ReplayOptions::new(bin("sphinx-broker").unwrap());
        opts.envs = broker_envs(&d.join("broker"), &listen);
        for (k, v) in broker_env {
            opts.envs.push((k.into(), v.into()));
        }
        opts.spawn = SpawnOptions {
            call_timeout: Duration::from_secs(20),
            init_timeout: Duration::from_secs(30),
            output: BrokerOutput::File(d.join("broker.log")),
            ..SpawnOptions::default()
        };
        let mut sess = Session::start(&tr, opts).unwrap();
        // Start the signer once the broker listens, so that even a 2 s request bound leaves
        // lightningd's hsmd_init enough time.
        sess.set_wait_listen(&listen).unwrap();
        let proxy = TcpProxy::start(&listen).unwrap();
        let cfg = replay::signer::replay_config(clock, Default::default());
        let sid = replay::signer::in_memory(seed, &cfg).unwrap().node_id_hex();
        let mut r = Rig { d, tr, seed, clock, key_bin, proxy, signer: None, sess, sid };
        r.start_signer();
        r
    }

    fn start_signer(&mut self) {
        self.signer = Some(spawn_signer(&self.key_bin, &self.d, &self.proxy.addr(), self.clock));
    }

    fn signer(&self) -> &SignerProcess {
        self.signer.as_ref().unwrap()
    }

    fn blog(&self) -> PathBuf {
        self.d.join("broker.log")
    }

    fn slog(&self) -> PathBuf {
        self.d.join("signer.log")
    }

    fn logs(&self) -> String {
        format!("--- broker ---\n{}\n--- signer ---\n{}", tail(&self.blog(), 5000), tail(&self.slog(), 5000))
    }

    fn topic(&self, suffix: &str) -> Vec<u8> {
        format!("{}/{suffix}", self.sid).into_bytes()
    }

    /// Steps one request and demands a reply.
    fn step_ok(&mut self) {
        let s = self.sess.step().expect("a request left").clone();
        assert!(s.reply.is_ok(), "#{} type {}: {:?}\n{}", s.index, s.msg_type, s.reply, self.logs());
    }

    /// Every reply equals the in-process signer's.
    fn verdict(&self, report: &ReplayReport) {
        let cfg = replay::signer::replay_config(self.clock, Default::default());
        let mut oracle = replay::signer::in_memory(self.seed, &cfg).unwrap();
        let expected = oracle_replay(&self.tr, &mut oracle, true);
        let mismatches = compare_with_oracle(&report.steps, &expected);
        assert!(mismatches.is_empty(), "differs from the in-process signer: {mismatches:#?}\n{}", self.logs());
        assert_eq!(report.steps.len(), self.tr.request_count());
    }

    /// The first exchange at or after `from` on a client connection of type `t`.
    fn find(&self, from: usize, t: u16) -> usize {
        self.tr.exchanges.iter().find(|e| e.index >= from && e.msg_type == t && e.conn != 0).unwrap().index
    }
}

fn spawn_signer(key_bin: &std::path::Path, d: &TempDir, broker: &str, clock: u64) -> SignerProcess {
    SignerProcess::start(
        key_bin,
        &d.join("signer"),
        broker,
        clock,
        &d.join("signer.log"),
        &[("SPHINX_KEY_LOG", SIGNER_LOG)],
    )
    .unwrap()
}

fn status_frames_of_type(frames: &[Vec<u8>], t: u16) -> Vec<Vec<u8>> {
    frames.iter().filter(|f| hsmd::msg_type(f).ok() == Some(t)).cloned().collect()
}

/// `hsmstatus_client_bad_request` (1000): `node_id[33] | wirestring description (NUL-terminated)
/// | u16 len | msg` → (peer, description, msg).
fn parse_bad_request(f: &[u8]) -> ([u8; 33], String, Vec<u8>) {
    assert_eq!(hsmd::msg_type(f).unwrap(), 1000);
    let peer: [u8; 33] = f[2..35].try_into().unwrap();
    let rest = &f[35..];
    let nul = rest.iter().position(|b| *b == 0).expect("NUL-terminated description");
    let text = String::from_utf8_lossy(&rest[..nul]).into_owned();
    let len = u16::from_be_bytes([rest[nul + 1], rest[nul + 2]]) as usize;
    (peer, text, rest[nul + 3..nul + 3 + len].to_vec())
}

/// The signer loses its connection with a request in flight, three ways; each request is
/// delivered again when it is back and signed exactly once.
#[test]
fn signer_disconnects_mid_request_and_each_request_is_signed_once() {
    let mut r = Rig::new("open-pay-close", "alice", "fail-midreq", &[]);
    let (vls, vls_res) = (r.topic("vls"), r.topic("vls-res"));

    // (a) The request frame is cut on its way to the signer: it never saw it.
    let at = r.find(0, 19); // sign_remote_commitment_tx
    r.sess.run_until(|ex| ex.index >= at);
    let cut = r.proxy.cut_on(Dir::ToClient, &vls);
    r.step_ok();
    cut.try_recv().expect("the request was cut on its way to the signer");

    // (b) The signer signs and commits, its reply is cut on the wire: the broker re-sends the
    // request after the reconnect, and the signer answers from its reply log.
    let at = r.find(at + 1, 35); // validate_commitment_tx
    r.sess.run_until(|ex| ex.index >= at);
    let cut = r.proxy.cut_on(Dir::ToServer, &vls_res);
    r.step_ok();
    cut.try_recv().expect("the reply was cut on its way to the broker");
    wait_log(&r.slog(), "duplicate request: stored reply", Duration::from_secs(5)).unwrap();

    // (c) The signer is killed with the request in its socket, unread (stopped first, so the
    // kill lands between "request sent" and "reply"), and restarted.
    let at = r.find(at + 1, 40); // revoke_commitment_tx
    r.sess.run_until(|ex| ex.index >= at);
    r.signer().signal(libc::SIGSTOP).unwrap();
    let seen = r.proxy.watch(Dir::ToClient, &vls);
    let reply = {
        let Rig { sess, signer, key_bin, d, proxy, clock, .. } = &mut r;
        std::thread::scope(|sc| {
            let stepper = sc.spawn(|| sess.step().map(|s| s.reply.clone()));
            seen.recv_timeout(Duration::from_secs(20)).expect("the request reached the stopped signer's socket");
            signer.as_mut().unwrap().kill().unwrap();
            // Restarted from this (the test's) thread: PR_SET_PDEATHSIG follows the spawning thread.
            *signer = Some(spawn_signer(key_bin, d, &proxy.addr(), *clock));
            stepper.join().unwrap().unwrap()
        })
    };
    assert!(reply.is_ok(), "the request is answered by the restarted signer: {reply:?}\n{}", r.logs());

    r.sess.run_to_end();
    let report = r.sess.close();
    r.verdict(&report);
    assert!(report.brokers_exited_cleanly(), "{:?}", report.broker_exits);

    // Signed once: the durable state equals that of a signer that saw each request exactly once
    // (in process, on its own redb directory), key for key (reply log and stored init excluded).
    r.signer.take().unwrap().kill().unwrap();
    let refdir = TempDir::new("fail-midreq-ref").unwrap();
    let cfg = replay::signer::replay_config(r.clock, Default::default());
    let mut reference = sphinx_signer::Signer::open(r.seed, refdir.path(), &cfg).unwrap();
    let _ = oracle_replay(&r.tr, &mut reference, true);
    drop(reference);
    let want = signer_state(refdir.path()).unwrap();
    let got = signer_state(&r.d.join("signer").join("state")).unwrap();
    assert!(!want.is_empty());
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>(), "same state keys");
    for (k, v) in &want {
        assert_eq!(Some(v), got.get(k), "state {k} differs from a signer that saw each request once");
    }
}

/// lightningd restarts (bob's force-close trace has a second `hsmd_init`), and here the old broker
/// does not even exit cleanly: it is SIGKILLed (a crash), and the new one binds the same port.
/// The signer, up all along, reconnects to it; the pinned node id survives; every reply of both
/// runs equals the in-process signer's. (The clean restart, fd 3 closed, is e2e_force_close_bob.)
#[test]
fn broker_crashes_and_restarts_while_the_signer_is_up() {
    let mut r = Rig::new("force-close", "bob", "fail-brokercrash", &[]);
    r.sess.restart_by_kill = true;
    let pin = r.d.join("broker").join("pinned-node-id");
    // Up to the restart: the next request is lightningd's second hsmd_init.
    let second_init =
        r.tr.exchanges.iter().filter(|e| e.conn == 0 && e.msg_type == hsmd::HSMD_INIT).nth(1).unwrap().index;
    r.sess.run_until(|ex| ex.index >= second_init);
    assert_eq!(std::fs::read_to_string(&pin).unwrap().trim(), r.sid);
    let connects_before = log_text(&r.slog()).matches("connected to broker; subscribing").count();
    r.step_ok(); // kills broker run 0, spawns run 1, hsmd_init answered through it
    assert_eq!(r.sess.run(), 1);
    let connects_after = log_text(&r.slog()).matches("connected to broker; subscribing").count();
    assert!(connects_after > connects_before, "the signer reconnected to the new broker");
    r.sess.run_to_end();
    let report = r.sess.close();
    r.verdict(&report);
    assert_eq!(report.broker_exits.len(), 2);
    assert_eq!(report.broker_exits[0].as_deref(), Ok("killed by signal 9"));
    assert_eq!(report.broker_exits[1].as_deref(), Ok("exited with code 0"));
    assert_eq!(std::fs::read_to_string(&pin).unwrap().trim(), r.sid, "the pin survives the crash");
    let blog = log_text(&r.blog());
    assert_eq!(blog.matches("embedded MQTT server listening").count(), 2, "two broker runs on one port");
}

/// A subdaemon dies with its request in flight (its hsm fd closed): the broker does not crash,
/// the reply has nowhere to go, and the root connection and every other client keep working.
#[test]
fn cln_client_closes_mid_request() {
    let mut r = Rig::new("open-pay-close", "alice", "fail-clientclose", &[]);
    let vls = r.topic("vls");
    // An ECDH on a connectd-like client (stateless: signing it once more changes nothing).
    let ecdh = r.tr.exchanges.iter().find(|e| e.msg_type == 1 && e.conn != 0).unwrap().clone();
    r.sess.run_until(|ex| ex.index > ecdh.index);
    let ctx: ClientContext = ecdh.ctx.client_context();
    let mut extra = r.sess.ld().new_client(&ctx).unwrap();
    r.signer().signal(libc::SIGSTOP).unwrap();
    let seen = r.proxy.watch(Dir::ToClient, &vls);
    extra.send(&ecdh.request).unwrap();
    seen.recv_timeout(Duration::from_secs(20)).expect("the request reached the signer");
    drop(extra); // the subdaemon is gone
    r.signer().signal(libc::SIGCONT).unwrap();
    wait_log(&r.blog(), "cannot write reply; closing client", Duration::from_secs(20)).unwrap();
    assert!(r.sess.ld().try_exit_status().is_none(), "the broker is still running");
    // Another client of the same peer, opened now, works; then the whole rest of the session
    // (root calls and other clients) runs.
    let mut again = r.sess.ld().new_client(&ctx).unwrap();
    let reply = again.call(&ecdh.request).unwrap();
    assert_eq!(Some(reply), ecdh.reply, "ECDH is deterministic: the recorded CLN reply");
    drop(again);
    r.sess.run_to_end();
    let report = r.sess.close();
    r.verdict(&report);
    assert!(report.brokers_exited_cleanly(), "{:?}", report.broker_exits);
}

/// A slow signer (stopped for longer than SPHINX_BROKER_REQUEST_TIMEOUT=2): a client's caller is
/// released at the bound (its request reported as a bad request and its connection closed, as
/// CLN's hsmd does), so is a caller whose request waits for an absent signer; the session goes on
/// afterwards with nothing lost. On lightningd's own connection a timeout is fatal, as in CLN:
/// the broker exits within the bound too, instead of leaving lightningd blocked.
#[test]
fn slow_signer_never_holds_a_caller_beyond_the_bound() {
    const BOUND: Duration = Duration::from_secs(2);
    const MARGIN: Duration = Duration::from_millis(1500);
    let mut r = Rig::new("open-pay-close", "alice", "fail-slow", &[("SPHINX_BROKER_REQUEST_TIMEOUT", "2")]);
    let ecdh = r.tr.exchanges.iter().find(|e| e.msg_type == 1 && e.conn != 0).unwrap().clone();
    r.sess.run_until(|ex| ex.index > ecdh.index);
    let ctx = ecdh.ctx.client_context();

    // Stopped signer, request sent to it.
    let before_status = r.sess.ld().status_log().count;
    r.signer().signal(libc::SIGSTOP).unwrap();
    let mut c = r.sess.ld().new_client(&ctx).unwrap();
    let t0 = Instant::now();
    let res = c.call_timeout(&ecdh.request, Duration::from_secs(15));
    let waited = t0.elapsed();
    assert!(matches!(res, Err(LdError::Closed { .. })), "the client is closed at the bound: {res:?}");
    assert!(waited >= BOUND - Duration::from_millis(100) && waited < BOUND + MARGIN, "waited {waited:?}");
    let log = r.sess.ld().wait_status(before_status + 1, Duration::from_secs(5)).expect("a status message");
    let frames = status_frames_of_type(&log.frames, 1000);
    let (peer, text, msg) = parse_bad_request(frames.last().expect("a bad-request status message"));
    assert_eq!(peer, ctx.peer_id);
    assert!(text.contains("no reply from the signer within"), "{text}");
    assert_eq!(msg, ecdh.request);
    r.signer().signal(libc::SIGCONT).unwrap();

    // No signer at all: the request waits in the queue, and its caller is released at the bound.
    r.signer.as_mut().unwrap().kill().unwrap();
    let mut c = r.sess.ld().new_client(&ctx).unwrap();
    let t0 = Instant::now();
    let res = c.call_timeout(&ecdh.request, Duration::from_secs(15));
    let waited = t0.elapsed();
    assert!(matches!(res, Err(LdError::Closed { .. })), "{res:?}");
    assert!(waited < BOUND + MARGIN, "waited {waited:?} with no signer");
    // Both callers gave up: neither request may reach the signer that comes back (it would
    // sign for nobody, e.g. advance a channel's state after CLN was told the request failed).
    let abandoned = r.proxy.watch(Dir::ToClient, &ecdh.request);
    r.start_signer();

    // Nothing lost: the rest of the session is answered, identical to the in-process signer.
    r.step_ok(); // answered by the new signer, so everything re-sent before it has passed
    assert!(abandoned.try_recv().is_err(), "a request whose caller gave up was re-sent to the new signer");
    r.sess.run_to_end();
    assert!(r.sess.ld().try_exit_status().is_none());

    // lightningd's own connection: fatal within the bound.
    let root_req = r.tr.exchanges.iter().find(|e| e.conn == 0 && e.msg_type == 27).unwrap().request.clone();
    r.signer().signal(libc::SIGSTOP).unwrap();
    let t0 = Instant::now();
    let res = r.sess.ld().root_call_timeout(&root_req, Duration::from_secs(15));
    let waited = t0.elapsed();
    r.signer().signal(libc::SIGCONT).unwrap();
    assert!(matches!(res, Err(LdError::Closed { .. })), "{res:?}");
    assert!(waited < BOUND + MARGIN, "root waited {waited:?}");
    let report = r.sess.close();
    assert_eq!(report.broker_exits.last().unwrap().as_deref(), Ok("exited with code 3"), "{}", r.logs());
    wait_log(&r.blog(), "root request type 27 failed: no reply from the signer within", Duration::from_secs(5))
        .unwrap();
    r.verdict(&report);
}

/// A request VLS refuses reaches CLN the way CLN's hsmd reports a bad request (hsmd/hsmd.c
/// `bad_req_fmt`): `hsmstatus_client_bad_request` (1000) on the status socket naming the peer,
/// with the description and the request, and that client's connection closed; the root
/// connection and the other clients keep working. On lightningd's own connection it is fatal.
#[test]
fn refusal_reaches_cln_as_a_bad_request() {
    let mut r = Rig::new("open-pay-close", "alice", "fail-refusal", &[]);
    let at = r.find(0, 35); // channel 1 exists and is set up
    r.sess.run_until(|ex| ex.index > at);
    let chan = r.tr.exchanges.iter().find(|e| e.index == at).unwrap().ctx.client_context();
    // A channel request for a channel the signer does not know (same peer, unknown dbid):
    // get_per_commitment_point(n = 0).
    let unknown = ClientContext { dbid: 4242, ..chan };
    let mut req = 18u16.to_be_bytes().to_vec();
    req.extend_from_slice(&0u64.to_be_bytes());
    let mut c = r.sess.ld().new_client(&unknown).unwrap();
    let before = r.sess.ld().status_log();
    let res = c.call(&req);
    assert!(matches!(res, Err(LdError::Closed { .. })), "the client connection is closed: {res:?}\n{}", r.logs());
    let after = r.sess.ld().wait_status(before.count + 1, Duration::from_secs(5)).expect("a status message");
    let before = status_frames_of_type(&before.frames, 1000).len();
    let frames = status_frames_of_type(&after.frames, 1000);
    assert_eq!(frames.len(), before + 1, "exactly one bad-request report");
    let (peer, text, msg) = parse_bad_request(frames.last().unwrap());
    assert_eq!(peer, unknown.peer_id, "the report names the peer");
    assert!(text.contains("signer refused the request"), "{text}");
    assert_eq!(msg, req, "the report carries the request");
    wait_log(&r.blog(), "bad request; closing this client connection as CLN's hsmd does", Duration::from_secs(5))
        .unwrap();

    // A policy violation on a live channel: its first remote commitment signed again after the
    // channel moved on (a revoked state). Refused the same way; the channel's state is
    // untouched (the rest of the session still matches the oracle, which never saw this).
    let first = r.find(at + 1, 19);
    let old = r.tr.exchanges.iter().find(|e| e.index == first).unwrap().clone();
    let later = r.tr.exchanges.iter().filter(|e| e.conn == old.conn && e.msg_type == 36).nth(1).unwrap().index;
    r.sess.run_until(|ex| ex.index > later);
    let before = r.sess.ld().status_log();
    let mut c = r.sess.ld().new_client(&old.ctx.client_context()).unwrap();
    let res = c.call(&old.request);
    assert!(
        matches!(res, Err(LdError::Closed { .. })),
        "signing a revoked commitment again is refused: {res:?}\n{}",
        r.logs()
    );
    let after = r.sess.ld().wait_status(before.count + 1, Duration::from_secs(5)).expect("a status message");
    let (peer, text, msg) = parse_bad_request(after.frames.last().unwrap());
    assert_eq!((peer, msg), (old.ctx.client_context().peer_id, old.request.clone()));
    eprintln!("revoked commitment refused: {text}");
    assert!(text.contains("policy") || text.contains("VLS refused"), "{text}");

    // The rest of the session: root and every other client unaffected.
    r.sess.run_to_end();
    assert!(r.sess.ld().try_exit_status().is_none());
    // The same kind of refusal on lightningd's own connection is fatal (CLN: master_badmsg).
    let mut bogus = 0x7777u16.to_be_bytes().to_vec();
    bogus.extend_from_slice(b"not an hsmd message");
    let res = r.sess.ld().root_call(&bogus);
    assert!(matches!(res, Err(LdError::Closed { .. })), "{res:?}");
    let report = r.sess.close();
    assert_eq!(report.broker_exits.last().unwrap().as_deref(), Ok("exited with code 3"), "{}", r.logs());
    r.verdict(&report);
}
