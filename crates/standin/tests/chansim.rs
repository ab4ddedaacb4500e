//! The counterparty simulator against the signer in process, under the default (strict) policy:
//! every request of a channel open and of payments is accepted, on several channels (own peer id,
//! dbid and funding outpoint each), and the requests a simulator recorded are accepted again by a
//! fresh signer with the same seed (what the load benchmark relies on).

use std::path::PathBuf;

use sphinx_signer::{PolicyConfig, Signer};
use sphinx_standin::chansim::{Call, ChannelSim, Conn, Hsmd, InProcess, Template, PAYMENT_REQUESTS};
use sphinx_standin::replay;
use sphinx_standin::trace::{scenario_for_path, seed_for_path, Trace};
use sphinx_wire::{hsmd, serial};

fn bob() -> (Trace, [u8; 32], u64) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/traces/open-pay-close/bob.jsonl");
    let trace = Trace::load(&path).expect("trace");
    let seed = seed_for_path(&path).expect("seed");
    let clock = scenario_for_path(&path).expect("scenario").fixed_clock();
    (trace, seed, clock)
}

fn signer(trace: &Trace, seed: [u8; 32], clock: u64) -> Signer {
    let cfg = replay::signer::replay_config(clock, PolicyConfig::default());
    let mut s = Signer::in_memory(seed, &cfg).expect("signer");
    let init = trace.exchanges.iter().find(|e| e.msg_type == hsmd::HSMD_INIT).expect("init");
    s.handle(&serial::Request { seq: 60000, peer_id: [0; 33], dbid: 0, message: init.request.clone() }).expect("init");
    s
}

const SIM_SEED: [u8; 32] = [7; 32];

#[test]
fn open_then_one_commitment_round_is_accepted() {
    let (trace, seed, clock) = bob();
    let template = Template::from_trace(&trace).expect("template");
    let mut s = signer(&trace, seed, clock);
    let mut hsmd = InProcess { signer: &mut s, seq: 0 };
    let mut sim = ChannelSim::new(template, SIM_SEED, 1);
    sim.open(&mut hsmd).unwrap_or_else(|e| panic!("open: {e}"));
    let opened = sim.log.len();
    sim.pay(&mut hsmd, 5_000_000).unwrap_or_else(|e| panic!("payment: {e}"));
    assert_eq!(sim.log.len() - opened, PAYMENT_REQUESTS);
    // The payee channeld's order in the recorded session (bob, first payment, t = 63.894..63.985).
    let types: Vec<u16> = sim.log[opened..].iter().map(|c| u16::from_be_bytes([c.request[0], c.request[1]])).collect();
    assert_eq!(types, [35, 40, 19, 20, 36, 14, 19, 36, 14, 35, 40]);
    let open_types: Vec<u16> =
        sim.log[..opened].iter().map(|c| u16::from_be_bytes([c.request[0], c.request[1]])).collect();
    assert_eq!(open_types, [30, 10, 18, 31, 35, 19, 18, 32, 37]);
    assert_eq!(sim.our_balance_msat(), 5_000_000);
}

#[test]
fn payments_on_several_channels_are_accepted_and_replay_into_a_fresh_signer() {
    let (trace, seed, clock) = bob();
    let template = Template::from_trace(&trace).expect("template");
    let mut s = signer(&trace, seed, clock);
    let mut sims: Vec<ChannelSim> = (1..=3).map(|dbid| ChannelSim::new(template.clone(), SIM_SEED, dbid)).collect();
    {
        let mut hsmd = InProcess { signer: &mut s, seq: 0 };
        for sim in &mut sims {
            sim.open(&mut hsmd).unwrap_or_else(|e| panic!("open dbid {}: {e}", sim.dbid));
        }
        // Interleaved, as concurrent channels reach one signer.
        for round in 0..5 {
            for sim in &mut sims {
                sim.pay(&mut hsmd, 2_000_000).unwrap_or_else(|e| panic!("payment {round} dbid {}: {e}", sim.dbid));
            }
        }
    }
    let ids: std::collections::BTreeSet<_> = sims.iter().map(|s| s.peer_id).collect();
    assert_eq!(ids.len(), 3, "each channel has its own peer");

    // The recorded requests, channel after channel, into a fresh signer with the same seed.
    let mut fresh = signer(&trace, seed, clock);
    let mut hsmd = InProcess { signer: &mut fresh, seq: 0 };
    for sim in &sims {
        for (i, Call { conn, request }) in sim.log.iter().enumerate() {
            hsmd.call(*conn, &sim.peer_id, sim.dbid, request)
                .unwrap_or_else(|e| panic!("replayed request {i} of dbid {}: {e}", sim.dbid));
        }
    }
}

/// Passes requests through, except that it changes the first request of type `t` that `f`
/// changes (`f` returns whether it did).
struct Corrupt<'a> {
    inner: InProcess<'a>,
    t: u16,
    f: fn(&mut Vec<u8>) -> bool,
    done: bool,
}

impl Hsmd for Corrupt<'_> {
    fn call(&mut self, conn: Conn, peer_id: &[u8; 33], dbid: u64, request: &[u8]) -> Result<Vec<u8>, String> {
        let mut r = request.to_vec();
        if !self.done && r[..2] == self.t.to_be_bytes() {
            self.done = (self.f)(&mut r);
        }
        self.inner.call(conn, peer_id, dbid, &r)
    }
}

// A `Vec` like the corruptors that re-encode the message (they are one `fn` type).
#[allow(clippy::ptr_arg)]
fn flip_last_byte(r: &mut Vec<u8>) -> bool {
    let n = r.len();
    r[n - 1] ^= 1;
    true
}

/// Flips the lowest bit of `s` in the peer's commitment signature of a `validate_commitment_tx`
/// (still a well-formed signature, but not the peer's).
fn flip_commitment_signature(r: &mut Vec<u8>) -> bool {
    use vls_protocol::msgs::{self, Message, SerBolt};
    let Ok(Message::ValidateCommitmentTx(mut m)) = msgs::from_vec(r.clone()) else { panic!("not a 35") };
    m.signature.signature.0[63] ^= 1;
    *r = m.as_vec();
    true
}

/// The same for the peer's first HTLC signature, in the first `validate_commitment_tx` that has one.
fn flip_htlc_signature(r: &mut Vec<u8>) -> bool {
    use vls_protocol::msgs::{self, Message, SerBolt};
    let Ok(Message::ValidateCommitmentTx(mut m)) = msgs::from_vec(r.clone()) else { panic!("not a 35") };
    let Some(s) = m.htlc_signatures.0.first_mut() else { return false };
    s.signature.0[63] ^= 1;
    *r = m.as_vec();
    true
}

#[test]
fn a_wrong_htlc_signature_is_refused() {
    let (trace, seed, clock) = bob();
    let template = Template::from_trace(&trace).expect("template");
    let mut s = signer(&trace, seed, clock);
    let mut sim = ChannelSim::new(template, SIM_SEED, 1);
    let mut hsmd = Corrupt { inner: InProcess { signer: &mut s, seq: 0 }, t: 35, f: flip_htlc_signature, done: false };
    sim.open(&mut hsmd).expect("open");
    let e = sim.pay(&mut hsmd, 1_000_000).expect_err("a wrong HTLC signature was accepted");
    eprintln!("refusal: {e}");
    assert!(hsmd.done && e.contains("ValidateCommitmentTx"), "{e}");
}

#[test]
fn a_wrong_commitment_signature_is_refused() {
    let (trace, seed, clock) = bob();
    let template = Template::from_trace(&trace).expect("template");
    let mut s = signer(&trace, seed, clock);
    let mut sim = ChannelSim::new(template, SIM_SEED, 1);
    let mut hsmd =
        Corrupt { inner: InProcess { signer: &mut s, seq: 0 }, t: 35, f: flip_commitment_signature, done: false };
    let e = sim.open(&mut hsmd).expect_err("a wrong commitment signature was accepted");
    eprintln!("refusal: {e}");
    assert!(e.contains("ValidateCommitmentTx") && e.contains("sig"), "{e}");
}

#[test]
fn a_wrong_revocation_secret_is_refused() {
    // The signer checks what the simulator sends: the same payment with one bit of the peer's
    // revocation secret flipped fails (so the acceptance above is not vacuous).
    let (trace, seed, clock) = bob();
    let template = Template::from_trace(&trace).expect("template");
    let mut s = signer(&trace, seed, clock);
    let mut sim = ChannelSim::new(template, SIM_SEED, 1);
    let mut hsmd = Corrupt { inner: InProcess { signer: &mut s, seq: 0 }, t: 36, f: flip_last_byte, done: false };
    sim.open(&mut hsmd).expect("open");
    let e = sim.pay(&mut hsmd, 1_000_000).expect_err("a wrong revocation secret was accepted");
    eprintln!("refusal: {e}");
    assert!(e.contains("ValidateRevocation"), "{e}");
}

/// Group commit with concurrent signing (`Signer::set_sign_threads`): rounds of one request per
/// channel (as N channelds have them outstanding) through `handle_batch` on two threads give
/// the replies and the durable state of one request at a time, also when a request inside a
/// concurrent run is refused (the run is then taken back and handled one at a time).
#[test]
fn concurrent_signing_of_channels_replies_and_persists_like_one_at_a_time() {
    use sphinx_standin::harness::TempDir;
    let (trace, seed, clock) = bob();
    let template = Template::from_trace(&trace).expect("template");
    let cfg = replay::signer::replay_config(clock, PolicyConfig::default());
    let init = trace.exchanges.iter().find(|e| e.msg_type == hsmd::HSMD_INIT).expect("init").request.clone();
    // Traffic: 6 channels, 3 payments each, made against an in-memory signer.
    let mut gen = signer(&trace, seed, clock);
    let mut sims: Vec<ChannelSim> = (1..=6).map(|dbid| ChannelSim::new(template.clone(), SIM_SEED, dbid)).collect();
    let mut opened = vec![];
    {
        let mut hsmd = InProcess { signer: &mut gen, seq: 0 };
        for sim in &mut sims {
            sim.open(&mut hsmd).unwrap_or_else(|e| panic!("open dbid {}: {e}", sim.dbid));
            opened.push(sim.log.len());
        }
        for _ in 0..3 {
            for sim in &mut sims {
                sim.pay(&mut hsmd, 2_000_000).unwrap_or_else(|e| panic!("payment dbid {}: {e}", sim.dbid));
            }
        }
    }
    let rounds = sims[0].log.len() - opened[0];
    // `corrupt`: (round, dbid) whose request gets a wrong commitment signature.
    let run = |threads: usize, corrupt: Option<(usize, u64)>| {
        let dir = TempDir::new("parallel-sign").expect("temp dir");
        let mut s = Signer::open(seed, dir.path(), &cfg).expect("signer");
        s.set_sign_threads(threads);
        let mut seq = 0u16;
        let mut req = |peer_id: [u8; 33], dbid: u64, message: Vec<u8>| {
            seq += 1;
            serial::Request { seq, peer_id, dbid, message }
        };
        s.handle(&req([0; 33], 0, init.clone())).expect("init");
        for (sim, &k) in sims.iter().zip(&opened) {
            for c in &sim.log[..k] {
                let (p, d) = if c.conn == Conn::Root { ([0; 33], 0) } else { (sim.peer_id, sim.dbid) };
                s.handle(&req(p, d, c.request.clone())).expect("open");
            }
        }
        let mut out = vec![];
        for r in 0..rounds {
            let round: Vec<serial::Request> = sims
                .iter()
                .zip(&opened)
                .map(|(sim, &k)| {
                    let mut m = sim.log[k + r].request.clone();
                    if corrupt == Some((r, sim.dbid)) {
                        flip_commitment_signature(&mut m);
                    }
                    req(sim.peer_id, sim.dbid, m)
                })
                .collect();
            let results: Vec<_> =
                if threads == 1 { round.iter().map(|q| s.handle(q)).collect() } else { s.handle_batch(&round) };
            out.extend(results.into_iter().map(|x| x.map(|r| hex::encode(r.message)).map_err(|e| e.to_string())));
        }
        (out, s.synced_state().expect("state"), s.stats())
    };
    // Round 0 is every channel's first validate_commitment_tx (a run of 6): dbid 4's is refused.
    assert_eq!(u16::from_be_bytes([sims[3].log[opened[3]].request[0], sims[3].log[opened[3]].request[1]]), 35);
    for corrupt in [None, Some((0, 4))] {
        let (one, one_state, _) = run(1, corrupt);
        let (two, two_state, stats) = run(2, corrupt);
        assert_eq!(one.len(), two.len());
        for (i, (a, b)) in one.iter().zip(&two).enumerate() {
            assert_eq!(a, b, "request {i} (round {}, channel {}), {corrupt:?}", i / 6, i % 6 + 1);
        }
        assert!(one_state == two_state, "durable state differs, {corrupt:?}");
        let refused = one.iter().filter(|r| r.is_err()).count();
        assert_eq!(refused > 0, corrupt.is_some(), "{corrupt:?}: {refused} refused");
        assert!(
            stats.concurrent as usize > one.len() / 2,
            "only {} of {} signed concurrently",
            stats.concurrent,
            one.len()
        );
        if corrupt.is_some() {
            assert!(stats.rebuilds > 0, "the refused run was not taken back");
        }
    }
}
