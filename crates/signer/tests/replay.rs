//! Replays recorded CLN hsmd sessions through the signer and checks its replies.

mod common;

use common::*;
use sphinx_signer::{Error, Signer};
use sphinx_wire::serial::Request;

/// Reply types that VLS produces byte for byte like CLN's hsmd (traces README, measured).
const IDENTICAL: &[u16] = &[28, 27, 1, 18, 35, 36, 40, 30, 10, 31, 32, 37, 8, 23, 34, 38, 39];

const ALICE_SEED: [u8; 32] = [0x41; 32];
const BOB_SEED: [u8; 32] = [0x42; 32];

/// Replays `trace` and returns the replies; panics with the first unanswered request.
fn replay_all(signer: &mut Signer, trace: &[Step], check_cln: bool) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut compared = 0;
    for (i, s) in trace.iter().enumerate() {
        let rep = signer.handle(&s.req).unwrap_or_else(|e| panic!("request #{i} type {} unanswered: {e}", s.msg_type));
        assert_eq!(rep.seq, s.req.seq);
        assert_eq!(&rep.message[..2], &s.cln_reply[..2], "request #{i} type {}: reply type differs", s.msg_type);
        if check_cln && IDENTICAL.contains(&s.msg_type) {
            assert_eq!(
                hex::encode(&rep.message),
                hex::encode(&s.cln_reply),
                "request #{i} type {} (recorded {}): reply differs from CLN's",
                s.msg_type,
                s.recorded_type
            );
            compared += 1;
        }
        out.push(rep.message);
    }
    if check_cln {
        assert!(compared > 50, "compared only {compared} replies");
    }
    out
}

#[test]
fn alice_open_pay_close_in_memory_matches_cln() {
    let trace = load("open-pay-close/alice.jsonl");
    let mut s = Signer::in_memory(ALICE_SEED, &config(T0_OPEN_PAY_CLOSE + 100)).unwrap();
    assert_eq!(hex::encode(s.node_id()), "029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef46");
    replay_all(&mut s, &trace, true);
    // The penalty sweeps at CLN's floor feerate are signed under the default (strict) policy.
    assert!(trace.iter().any(|s| s.msg_type == 14));
}

#[test]
fn bob_open_pay_close_in_memory_matches_cln() {
    let trace = load("open-pay-close/bob.jsonl");
    let mut s = Signer::in_memory(BOB_SEED, &config(T0_OPEN_PAY_CLOSE + 100)).unwrap();
    replay_all(&mut s, &trace, true);
}

#[test]
fn force_close_traces_are_answered() {
    // alice signs two delayed sweeps (142) at CLN's floor; bob restarts (a second hsmd_init).
    for (name, seed) in [("force-close/alice.jsonl", ALICE_SEED), ("force-close/bob.jsonl", BOB_SEED)] {
        let trace = load(name);
        let mut s = Signer::in_memory(seed, &config(T0_FORCE_CLOSE + 100)).unwrap();
        replay_all(&mut s, &trace, true);
    }
}

#[test]
fn sweeps_at_floor_are_refused_with_vls_default_minimum() {
    // The documented exception is what makes them pass: with the sweep minimum at VLS's 253,
    // the first penalty sweep is refused with policy-sweep-fee-range.
    let trace = load("open-pay-close/alice.jsonl");
    let mut cfg = config(T0_OPEN_PAY_CLOSE + 100);
    cfg.policy.sweep_min_feerate_per_kw = 253;
    let mut s = Signer::in_memory(ALICE_SEED, &cfg).unwrap();
    let mut refused = 0;
    for st in &trace {
        match s.handle(&st.req) {
            Ok(_) => {}
            Err(Error::Refused { msg_type: 14, reason, .. }) => {
                assert!(reason.contains("feerate below minimum"), "{reason}");
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(refused, trace.iter().filter(|s| s.msg_type == 14).count());
}

#[test]
fn redb_equals_in_memory_and_reopen_continues_identically() {
    let trace = load("open-pay-close/alice.jsonl");
    let cfg = config(T0_OPEN_PAY_CLOSE + 100);
    let mut mem = Signer::in_memory(ALICE_SEED, &cfg).unwrap();
    let expected = replay_all(&mut mem, &trace, false);

    let dir = temp_dir("reopen");
    let half = trace.len() / 2;
    let mut got = Vec::new();
    {
        let mut s = Signer::open(ALICE_SEED, &dir, &cfg).unwrap();
        assert!(!s.is_initialized());
        for st in &trace[..half] {
            got.push(s.handle(&st.req).unwrap().message);
        }
    } // dropped mid-sequence
    {
        let mut s = Signer::open(ALICE_SEED, &dir, &cfg).unwrap();
        assert!(s.is_initialized(), "the stored hsmd_init is resumed");
        for st in &trace[half..] {
            got.push(s.handle(&st.req).unwrap().message);
        }
    }
    assert_eq!(got.len(), expected.len());
    for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(hex::encode(a), hex::encode(b), "reply #{i} type {}", trace[i].msg_type);
    }
    // A different seed on the same state is refused, not panicked on.
    assert!(matches!(Signer::open(BOB_SEED, &dir, &cfg), Err(Error::WrongSeed { .. })));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn init_replayed_mid_session_keeps_going() {
    let trace = load("open-pay-close/alice.jsonl");
    let cfg = config(T0_OPEN_PAY_CLOSE + 100);
    let mut s = Signer::in_memory(ALICE_SEED, &cfg).unwrap();
    let init = trace[0].req.clone();
    assert_eq!(init.message[..2], [0, 11]);
    let first = s.handle(&init).unwrap();
    for (i, st) in trace.iter().enumerate().skip(1) {
        if i % 20 == 0 {
            // The broker replays hsmd_init on every reconnect: same reply, and nothing breaks.
            let again = s.handle(&Request { seq: 60000 + i as u16, ..init.clone() }).unwrap();
            assert_eq!(again.message, first.message);
        }
        s.handle(&st.req).unwrap_or_else(|e| panic!("#{i}: {e}"));
    }
}

#[test]
fn duplicate_delivery_returns_stored_reply_without_rerunning() {
    let trace = load("open-pay-close/alice.jsonl");
    let cfg = config(T0_OPEN_PAY_CLOSE + 100);
    let dir = temp_dir("dupe");
    let mut s = Signer::open(ALICE_SEED, &dir, &cfg).unwrap();
    // Run until the first revoke_commitment_tx (40): re-running it would advance state.
    let k = trace.iter().position(|st| st.msg_type == 40).unwrap();
    let mut last = None;
    for st in &trace[..=k] {
        last = Some(s.handle(&st.req).unwrap());
    }
    let last = last.unwrap();
    let before = s.stats();
    let again = s.handle(&trace[k].req).unwrap();
    assert_eq!(again, last);
    assert_eq!(s.stats().vls_calls, before.vls_calls, "VLS not run again");
    assert_eq!(s.stats().dedupe_hits, before.dedupe_hits + 1);

    // Also after a crash-like reopen: the record was committed with the state.
    drop(s);
    let mut s = Signer::open(ALICE_SEED, &dir, &cfg).unwrap();
    let again = s.handle(&trace[k].req).unwrap();
    assert_eq!(again, last);
    assert_eq!(s.stats().vls_calls, 0);

    // Same seq, different bytes: processed normally.
    let cp = trace.iter().position(|st| st.msg_type == 28).unwrap();
    let other = Request { seq: trace[k].req.seq, ..trace[cp].req.clone() };
    let rep = s.handle(&other).unwrap();
    assert_eq!(rep.message, trace[cp].cln_reply);
    assert_eq!(s.stats().vls_calls, 1);

    // The rest of the session continues identically.
    for st in &trace[k + 1..] {
        s.handle(&st.req).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn garbage_and_truncated_messages_are_errors_not_panics() {
    let trace = load("open-pay-close/alice.jsonl");
    let cfg = config(T0_OPEN_PAY_CLOSE + 100);
    let mut s = Signer::in_memory(ALICE_SEED, &cfg).unwrap();
    let root = |seq: u16, message: Vec<u8>| Request { seq, peer_id: [0; 33], dbid: 0, message };

    // Before init: refused, not panicked.
    assert!(matches!(s.handle(&trace[1].req), Err(Error::NotInitialized(..))));
    s.handle(&trace[0].req).unwrap();

    let mut seq = 40000u16;
    let mut next = || {
        seq += 1;
        seq
    };
    for m in [vec![], vec![0], vec![0xff, 0xff], vec![0, 9], vec![0, 200, 1, 2, 3]] {
        assert!(s.handle(&root(next(), m)).is_err());
    }
    // Every request type of the trace, cut short at several points, on its own context.
    let mut seen = std::collections::HashSet::new();
    for st in &trace {
        if !seen.insert(st.msg_type) {
            continue;
        }
        let m = &st.req.message;
        for cut in [2, 3, m.len() / 2, m.len().saturating_sub(1)] {
            if cut >= m.len() || cut < 2 {
                continue;
            }
            let r = Request { seq: next(), message: m[..cut].to_vec(), ..st.req.clone() };
            assert!(s.handle(&r).is_err(), "type {} cut at {cut} accepted", st.msg_type);
        }
        // Well-formed messages with nonsense contents (all-0xff body of the same length).
        let mut junk = m[..2].to_vec();
        junk.extend(std::iter::repeat_n(0xff, m.len() - 2));
        let _ = s.handle(&Request { seq: next(), message: junk, ..st.req.clone() });
    }
    // A channel request for a channel that does not exist.
    let cp = trace.iter().find(|st| st.msg_type == 18 && st.req.dbid != 0).unwrap();
    let r = Request { seq: next(), dbid: 999, ..cp.req.clone() };
    assert!(s.handle(&r).is_err());

    // Still answers correctly afterwards.
    let fresh = {
        let mut f = Signer::in_memory(ALICE_SEED, &cfg).unwrap();
        replay_all(&mut f, &trace, false)
    };
    let mut s2 = Signer::in_memory(ALICE_SEED, &cfg).unwrap();
    for (i, st) in trace.iter().enumerate() {
        if i == 10 {
            assert!(s2.handle(&root(next(), vec![0, 28, 1])).is_err());
        }
        assert_eq!(s2.handle(&st.req).unwrap().message, fresh[i], "#{i}");
    }
}

#[test]
fn bad_state_dir_is_an_error() {
    let dir = temp_dir("badfile");
    let file = dir.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let cfg = config(T0_OPEN_PAY_CLOSE);
    assert!(matches!(Signer::open(ALICE_SEED, &file, &cfg), Err(Error::StateDir { .. })));
    // A corrupt redb file.
    let d2 = dir.join("corrupt");
    std::fs::create_dir_all(&d2).unwrap();
    std::fs::write(d2.join("redb"), vec![0x5a; 4096]).unwrap();
    assert!(Signer::open(ALICE_SEED, &d2, &cfg).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn login_token_verifies_as_node_id() {
    let s = Signer::in_memory(ALICE_SEED, &config(T0_OPEN_PAY_CLOSE)).unwrap();
    let tok = s.login_token(1_800_000_000);
    let pk = sphinx_wire::token::verify(&s.node_id_hex(), tok.as_bytes(), 1_800_000_010, 300).unwrap();
    assert_eq!(pk.serialize(), s.node_id());
    assert_eq!(sphinx_signer::node_id_for_seed(&ALICE_SEED, bitcoin::Network::Regtest), s.node_id());
}

#[test]
fn redb_signer_recovers_from_vls_panic_with_state_from_disk() {
    let trace = load("open-pay-close/alice.jsonl");
    let cfg = config(T0_OPEN_PAY_CLOSE + 100);
    let expected = {
        let mut m = Signer::in_memory(ALICE_SEED, &cfg).unwrap();
        replay_all(&mut m, &trace, false)
    };
    let dir = temp_dir("panic");
    let mut s = Signer::open(ALICE_SEED, &dir, &cfg).unwrap();
    // ecdh (1) with a point that is not a public key: VLS `expect`s and panics.
    let mut bad = vec![0u8, 1];
    bad.extend_from_slice(&[0xff; 33]);
    for (i, st) in trace.iter().enumerate() {
        if i == trace.len() / 2 {
            let r = Request { seq: 50000, peer_id: [0; 33], dbid: 0, message: bad.clone() };
            assert!(matches!(s.handle(&r), Err(Error::Panic { msg_type: 1, .. })));
            assert_eq!(s.stats().rebuilds, 1);
            assert!(s.is_initialized());
        }
        assert_eq!(s.handle(&st.req).unwrap().message, expected[i], "#{i}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second channel set up on the funding outpoint of another is refused (named check): VLS
/// alone accepts it, and its node then cannot be restored from disk ("tracker not found for
/// point"), which would leave the device unable to start. A channel on its own outpoint is
/// accepted, and the state reopens.
#[test]
fn second_channel_on_a_used_funding_outpoint_is_refused_and_state_still_reopens() {
    let trace = load("open-pay-close/alice.jsonl");
    let cfg = config(T0_OPEN_PAY_CLOSE + 100);
    let dir = temp_dir("dup-outpoint");
    let setup_at = trace.iter().position(|st| st.msg_type == 31).unwrap();
    let new = trace.iter().find(|st| st.msg_type == 30).unwrap().req.clone();
    let setup = trace[setup_at].req.clone();
    let mut s = Signer::open(ALICE_SEED, &dir, &cfg).unwrap();
    for st in &trace[..=setup_at] {
        s.handle(&st.req).unwrap();
    }
    // Channel dbid 77 of the same peer: new_channel (root, dbid in the body), then setup_channel.
    let mut new77 = new.clone();
    new77.message[2 + 33..2 + 33 + 8].copy_from_slice(&77u64.to_be_bytes());
    new77.seq = 60000;
    s.handle(&new77).unwrap();
    let setup77 = Request { seq: 60001, dbid: 77, ..setup.clone() };
    let e = s.handle(&setup77).unwrap_err();
    assert!(e.to_string().contains("policy-setup-channel-funding-outpoint-unused"), "{e}");
    // On an outpoint of its own (funding txid changed), the same setup is accepted.
    let mut own = setup77.clone();
    own.seq = 60002;
    own.message[2 + 1 + 8 + 8] ^= 0xff;
    s.handle(&own).unwrap();
    drop(s);
    Signer::open(ALICE_SEED, &dir, &cfg).expect("state with two channels on distinct outpoints reopens");
}
