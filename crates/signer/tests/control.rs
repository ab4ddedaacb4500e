//! Owner control messages through `Signer::control`: every message, replay/forgery/window
//! refusals, and the limits biting on recorded CLN requests (velocity on pre-approval, HTLC
//! value on commitments), durable across a reopen.

mod common;

use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
use common::*;
use sphinx_signer::{ControlAction, Error, Signer};
use sphinx_wire::control::{
    build_request, parse_response, ControlMessage as M, ControlResponse as R, Interval, OtaParams, Policy, NONCE_WINDOW,
};
use sphinx_wire::serial::Request;

const ALICE_SEED: [u8; 32] = [0x41; 32];
const ALICE_ADDR: &str = "bcrt1qwd0sxj7f47k67wysm20xut2drv7t2stu7fesk4";
/// How VLS lists it (its canonical form, also accepted as input).
const ALICE_ALLOWED: &str = "address:bcrt1qwd0sxj7f47k67wysm20xut2drv7t2stu7fesk4";
const INVOICE_MSAT: u64 = 50_000_000;
const KEYSEND_MSAT: u64 = 1_000_000;

fn alice_keys() -> (PublicKey, SecretKey) {
    sphinx_signer::node_keys_for_seed(&ALICE_SEED, bitcoin::Network::Regtest)
}

fn other_key(b: u8) -> (PublicKey, SecretKey) {
    let sk = SecretKey::from_slice(&[b; 32]).unwrap();
    (PublicKey::from_secret_key(&Secp256k1::new(), &sk), sk)
}

/// Sends `msg` with `nonce` signed by `owner`; returns the verified answer.
fn ctl(s: &mut Signer, owner: &SecretKey, msg: M, nonce: u64) -> R {
    let req = build_request(&msg, nonce, owner).unwrap();
    ctl_raw(s, &req, nonce)
}

fn ctl_raw(s: &mut Signer, req: &[u8], nonce: u64) -> R {
    let out = s.control(req);
    let device = PublicKey::from_slice(&s.node_id()).unwrap();
    let r = parse_response(&out.response, &device, nonce).expect("device-signed response");
    assert_eq!(r, out.answer);
    r
}

fn last_nonce(s: &mut Signer) -> u64 {
    let (_, sk) = alice_keys();
    match ctl(s, &sk, M::Nonce, 0) {
        R::Nonce(n) => n,
        other => panic!("{other:?}"),
    }
}

fn is_error(r: &R, needle: &str) -> bool {
    matches!(r, R::Error(t) if t.contains(needle))
}

fn limits(msat_per_interval: u64) -> Policy {
    Policy { msat_per_interval, ..Policy::default() }
}

/// The last byte of a preapprove reply is its `approved` flag.
fn approved(reply: &[u8]) -> bool {
    assert!(matches!(reply[..2], [0, 138] | [0, 139]), "{reply:?}");
    reply[reply.len() - 1] == 1
}

#[test]
fn every_control_message_round_trips() {
    let (_, sk) = alice_keys();
    let mut s = Signer::in_memory(ALICE_SEED, &config(T0_OPEN_PAY_CLOSE + 100)).unwrap();
    assert_eq!(last_nonce(&mut s), 0);
    let p = Policy { msat_per_interval: 7_000_000, interval: Interval::Hourly, htlc_limit_msat: 5_000_000 };
    type Check = Box<dyn Fn(&R) -> bool>;
    let cases: Vec<(M, Check)> = vec![
        (M::QueryPolicy, Box::new(|r| *r == R::PolicyCurrent(Policy::default()))),
        (M::UpdatePolicy(p), Box::new(move |r| *r == R::PolicyUpdated(p))),
        (M::QueryPolicy, Box::new(move |r| *r == R::PolicyCurrent(p))),
        (M::QueryAllowlist, Box::new(|r| *r == R::AllowlistCurrent(vec![]))),
        (
            M::UpdateAllowlist(vec![ALICE_ADDR.into()]),
            Box::new(|r| *r == R::AllowlistUpdated(vec![ALICE_ALLOWED.into()])),
        ),
        (M::QueryAllowlist, Box::new(|r| *r == R::AllowlistCurrent(vec![ALICE_ALLOWED.into()]))),
        (
            M::QueryVelocity,
            Box::new(move |r| {
                *r == R::VelocityCurrent(Some(sphinx_wire::control::Velocity {
                    spent_msat: 0,
                    limit_msat: 7_000_000,
                    interval: Interval::Hourly,
                }))
            }),
        ),
        (
            M::QueryAll,
            Box::new(
                move |r| matches!(r, R::AllCurrent(a) if a.policy == p && a.allowlist == vec![ALICE_ALLOWED.to_string()] && a.velocity.as_ref().is_some_and(|v| v.limit_msat == 7_000_000)),
            ),
        ),
        (M::ResetWifi, Box::new(|r| *r == R::ResetWifi)),
        (
            M::Ota(OtaParams { version: 2, url: "https://example.invalid/fw".into() }),
            Box::new(|r| is_error(r, "OTA is not supported on Linux")),
        ),
    ];
    let mut nonce = 0;
    for (msg, ok) in cases {
        let refused_ota = matches!(msg, M::Ota(_));
        nonce += 1;
        let r = ctl(&mut s, &sk, msg.clone(), nonce);
        assert!(ok(&r), "{msg:?} -> {r:?}");
        if refused_ota {
            nonce -= 1; // refused: the nonce was not consumed
        }
        assert_eq!(last_nonce(&mut s), nonce, "after {msg:?}");
    }
    assert_eq!(s.reset_state(), None, "ResetWifi is only acknowledged");

    // ResetKeys and ResetAll: acknowledged, then the signer refuses to sign.
    for (msg, want, action) in
        [(M::ResetKeys, R::ResetKeys, ControlAction::ResetKeys), (M::ResetAll, R::ResetAll, ControlAction::ResetAll)]
    {
        let trace = load("open-pay-close/alice.jsonl");
        let mut s = Signer::in_memory(ALICE_SEED, &config(T0_OPEN_PAY_CLOSE + 100)).unwrap();
        s.handle(&trace[0].req).unwrap();
        let req = build_request(&msg, 1, &sk).unwrap();
        let out = s.control(&req);
        assert_eq!(out.answer, want);
        assert_eq!(out.action, Some(action));
        assert_eq!(s.reset_state(), Some(action));
        assert!(matches!(s.handle(&trace[1].req), Err(Error::Unavailable(t)) if t.contains("init")));
        assert!(is_error(&ctl(&mut s, &sk, M::QueryPolicy, 2), "reset"));
    }
}

#[test]
fn replayed_forged_truncated_and_out_of_window_messages_change_nothing() {
    let (_, sk) = alice_keys();
    let mut s = Signer::in_memory(ALICE_SEED, &config(T0_OPEN_PAY_CLOSE + 100)).unwrap();
    let req = build_request(&M::UpdatePolicy(limits(1)), 5, &sk).unwrap();
    assert_eq!(ctl_raw(&mut s, &req, 5), R::PolicyUpdated(limits(1)));
    // Replay: same bytes again.
    assert!(is_error(&ctl_raw(&mut s, &req, 5), "nonce 5 rejected"));
    // Lower and equal nonces, and one beyond the window.
    for n in [0, 4, 5, 5 + NONCE_WINDOW + 1, u64::MAX] {
        let r = ctl(&mut s, &sk, M::UpdatePolicy(limits(2)), n);
        assert!(is_error(&r, "rejected"), "nonce {n}: {r:?}");
    }
    // Forged: signed by another key.
    let (_, forger) = other_key(9);
    assert!(is_error(&ctl(&mut s, &forger, M::UpdatePolicy(limits(3)), 6), "signature"));
    // Tampered after signing.
    let mut t = build_request(&M::UpdatePolicy(limits(4)), 6, &sk).unwrap();
    t[3] ^= 1;
    assert!(is_error(&ctl_raw(&mut s, &t, 6), ""));
    // Truncated at every length, and garbage.
    let good = build_request(&M::UpdatePolicy(limits(5)), 6, &sk).unwrap();
    for cut in 0..good.len() {
        let out = s.control(&good[..cut]);
        assert!(matches!(out.answer, R::Error(_)), "cut {cut}");
    }
    for junk in [vec![], vec![0xff; 10], vec![0x81; 80], vec![0u8; 70_000]] {
        assert!(matches!(s.control(&junk).answer, R::Error(_)));
    }
    // Every single-bit change anywhere (message, nonce, signature) is refused.
    for i in 0..good.len() {
        for bit in [0x01u8, 0x80] {
            let mut m = good.clone();
            m[i] ^= bit;
            assert!(matches!(s.control(&m).answer, R::Error(_)), "byte {i} bit {bit:#x} accepted");
        }
    }
    // Nothing changed: neither the policy nor the nonce.
    assert_eq!(last_nonce(&mut s), 5);
    assert_eq!(s.limits().unwrap(), limits(1));
    // The window's top is accepted.
    assert_eq!(ctl_raw(&mut s, &good, 6), R::PolicyUpdated(limits(5)));
    assert_eq!(ctl(&mut s, &sk, M::QueryPolicy, 6 + NONCE_WINDOW), R::PolicyCurrent(limits(5)));
}

#[test]
fn separate_owner_key_replaces_the_node_key() {
    let (_, node_sk) = alice_keys();
    let (owner_pk, owner_sk) = other_key(7);
    let mut s = Signer::in_memory(ALICE_SEED, &config(T0_OPEN_PAY_CLOSE + 100)).unwrap();
    s.set_owner_key(owner_pk);
    assert_eq!(s.owner_key(), owner_pk);
    assert!(is_error(&ctl(&mut s, &node_sk, M::QueryPolicy, 1), "signature"));
    assert_eq!(ctl(&mut s, &owner_sk, M::QueryPolicy, 1), R::PolicyCurrent(Policy::default()));
}

#[test]
fn invalid_allowlist_is_refused_and_changes_nothing() {
    let (_, sk) = alice_keys();
    let mut s = Signer::in_memory(ALICE_SEED, &config(T0_OPEN_PAY_CLOSE + 100)).unwrap();
    assert_eq!(
        ctl(&mut s, &sk, M::UpdateAllowlist(vec![ALICE_ADDR.into()]), 1),
        R::AllowlistUpdated(vec![ALICE_ALLOWED.into()])
    );
    let r = ctl(
        &mut s,
        &sk,
        M::UpdateAllowlist(vec!["bcrt1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq".into(), "nonsense".into()]),
        2,
    );
    assert!(is_error(&r, "invalid allowlist entry"), "{r:?}");
    assert_eq!(s.allowlist().unwrap(), vec![ALICE_ALLOWED.to_string()]);
    assert_eq!(last_nonce(&mut s), 1);
}

/// Replays alice's trace up to (not including) the first request of `msg_type`; returns its index.
fn replay_until(s: &mut Signer, trace: &[Step], msg_type: u16) -> usize {
    for (i, st) in trace.iter().enumerate() {
        if st.msg_type == msg_type {
            return i;
        }
        s.handle(&st.req).unwrap_or_else(|e| panic!("#{i} type {}: {e}", st.msg_type));
    }
    panic!("no request of type {msg_type}");
}

#[test]
fn payment_preapproval_under_the_velocity_limit_is_approved_and_over_it_refused() {
    let trace = load("open-pay-close/alice.jsonl");
    let (_, sk) = alice_keys();

    // Limit between the invoice alone and invoice + keysend.
    let mut s = Signer::in_memory(ALICE_SEED, &config(T0_OPEN_PAY_CLOSE + 100)).unwrap();
    ctl(&mut s, &sk, M::UpdatePolicy(limits(INVOICE_MSAT + KEYSEND_MSAT / 2)), 1);
    let i = replay_until(&mut s, &trace, 38);
    assert!(approved(&s.handle(&trace[i].req).unwrap().message), "50,000 sat invoice under the limit");
    let k = replay_until(&mut s, &trace[i + 1..], 39) + i + 1;
    let rep = s.handle(&trace[k].req).unwrap();
    assert!(!approved(&rep.message), "keysend over the limit: a refusal reply, not an error");
    assert_eq!(s.velocity().unwrap().spent_msat, INVOICE_MSAT);

    // Limit below the invoice: refused, and nothing spent.
    let mut s = Signer::in_memory(ALICE_SEED, &config(T0_OPEN_PAY_CLOSE + 100)).unwrap();
    ctl(&mut s, &sk, M::UpdatePolicy(limits(INVOICE_MSAT - 1)), 1);
    let i = replay_until(&mut s, &trace, 38);
    assert!(!approved(&s.handle(&trace[i].req).unwrap().message));
    assert_eq!(s.velocity().unwrap().spent_msat, 0);
    // Raising the limit (same interval) lets the same invoice through.
    ctl(&mut s, &sk, M::UpdatePolicy(limits(INVOICE_MSAT)), 2);
    let again = Request { seq: 60000, ..trace[i].req.clone() };
    assert!(approved(&s.handle(&again).unwrap().message));
}

#[test]
fn htlc_over_the_limit_is_refused() {
    let trace = load("open-pay-close/alice.jsonl");
    let (_, sk) = alice_keys();
    let mut s = Signer::in_memory(ALICE_SEED, &config(T0_OPEN_PAY_CLOSE + 100)).unwrap();
    // Below the traced 50,000 sat HTLC.
    let p = Policy { htlc_limit_msat: 40_000_000, ..Policy::default() };
    ctl(&mut s, &sk, M::UpdatePolicy(p), 1);
    let mut refused = None;
    for (i, st) in trace.iter().enumerate() {
        match s.handle(&st.req) {
            Ok(_) => {}
            Err(Error::Refused { msg_type, reason, .. }) => {
                refused = Some((i, msg_type, reason));
                break;
            }
            Err(e) => panic!("#{i}: {e}"),
        }
    }
    let (i, msg_type, reason) = refused.expect("the HTLC is refused");
    assert!(
        reason.contains("policy-commitment-htlc-inflight-limit") || reason.contains("sum of HTLC values"),
        "{reason}"
    );
    assert!([19, 35, 5].contains(&msg_type), "refused on a commitment: type {msg_type}");
    let pre = trace.iter().position(|st| st.msg_type == 38).unwrap();
    assert!(i > pre, "refused after the payment was pre-approved");

    // The same request passes with the default limit.
    let mut ok = Signer::in_memory(ALICE_SEED, &config(T0_OPEN_PAY_CLOSE + 100)).unwrap();
    for st in &trace[..=i] {
        ok.handle(&st.req).unwrap();
    }
}

#[test]
fn limits_velocity_allowlist_and_nonce_survive_a_restart() {
    let trace = load("open-pay-close/alice.jsonl");
    let (_, sk) = alice_keys();
    let cfg = config(T0_OPEN_PAY_CLOSE + 100);
    let dir = temp_dir("control-restart");
    let p = limits(INVOICE_MSAT + KEYSEND_MSAT / 2);
    let k;
    {
        let mut s = Signer::open(ALICE_SEED, &dir, &cfg).unwrap();
        assert_eq!(ctl(&mut s, &sk, M::UpdatePolicy(p), 3), R::PolicyUpdated(p));
        ctl(&mut s, &sk, M::UpdateAllowlist(vec![ALICE_ADDR.into()]), 4);
        let i = replay_until(&mut s, &trace, 38);
        assert!(approved(&s.handle(&trace[i].req).unwrap().message));
        k = replay_until(&mut s, &trace[i + 1..], 39) + i + 1;
    } // dropped: a restart
    let mut s = Signer::open(ALICE_SEED, &dir, &cfg).unwrap();
    match ctl(&mut s, &sk, M::QueryAll, 5) {
        R::AllCurrent(a) => {
            assert_eq!(a.policy, p);
            assert_eq!(a.allowlist, vec![ALICE_ALLOWED.to_string()]);
            assert_eq!(a.velocity.unwrap().spent_msat, INVOICE_MSAT, "velocity survives the restart");
        }
        other => panic!("{other:?}"),
    }
    // The nonce survived too: an old message is a replay.
    assert!(is_error(&ctl(&mut s, &sk, M::UpdatePolicy(limits(1)), 4), "rejected"));
    // And the limit still bites.
    assert!(!approved(&s.handle(&trace[k].req).unwrap().message));

    // Changing only the HTLC limit, or the amount, keeps what was spent.
    ctl(&mut s, &sk, M::UpdatePolicy(Policy { htlc_limit_msat: 2_000_000_000, ..p }), 6);
    assert_eq!(s.velocity().unwrap().spent_msat, INVOICE_MSAT);
    ctl(&mut s, &sk, M::UpdatePolicy(limits(INVOICE_MSAT + KEYSEND_MSAT)), 7);
    assert_eq!(s.velocity().unwrap().spent_msat, INVOICE_MSAT);
    drop(s);
    let mut s = Signer::open(ALICE_SEED, &dir, &cfg).unwrap();
    assert_eq!(s.velocity().unwrap().spent_msat, INVOICE_MSAT);
    assert_eq!(s.limits().unwrap(), limits(INVOICE_MSAT + KEYSEND_MSAT));
    // Now the keysend fits (50,000,000 + 1,000,000 <= 51,000,000).
    assert!(approved(&s.handle(&Request { seq: 61000, ..trace[k].req.clone() }).unwrap().message));
    // A different interval type starts a new count (documented).
    let hourly = Policy { interval: Interval::Hourly, ..limits(INVOICE_MSAT) };
    ctl(&mut s, &sk, M::UpdatePolicy(hourly), 8);
    assert_eq!(s.velocity().unwrap().spent_msat, 0);

    // ResetAll: acknowledged, then the state directory can be destroyed.
    let out = s.control(&build_request(&M::ResetAll, 9, &sk).unwrap());
    assert_eq!(out.action, Some(ControlAction::ResetAll));
    s.destroy_state().unwrap();
    assert!(!dir.exists());
}
