//! Group commit (`Signer::handle_batch`): a recorded session handled in batches gives the same
//! replies and the same durable state as one request at a time, and a refusal inside a batch
//! takes back only its own request: the others are committed, it is not.

mod common;

use common::*;
use sphinx_signer::{Error, Signer};
use sphinx_wire::serial::Request;
use vls_protocol::msgs::{self, Message, SerBolt};

const BOB_SEED: [u8; 32] = [0x42; 32];

fn open(dir: &std::path::Path) -> Signer {
    Signer::open(BOB_SEED, dir, &config(T0_OPEN_PAY_CLOSE + 100)).unwrap()
}

/// The recorded `validate_commitment_tx` with another commitment number: VLS refuses it.
fn refused_variant(req: &Request) -> Request {
    let mut m = match msgs::from_vec(req.message.clone()).unwrap() {
        Message::ValidateCommitmentTx(m) => m,
        other => panic!("{other:?}"),
    };
    m.commitment_number += 7;
    Request { message: m.as_vec(), seq: req.seq.wrapping_add(1000), ..req.clone() }
}

#[test]
fn batches_reply_and_persist_like_one_at_a_time() {
    let trace = load("open-pay-close/bob.jsonl");
    let (d1, d2) = (temp_dir("gc-single"), temp_dir("gc-batch"));
    let (mut one, mut batched) = (open(&d1), open(&d2));
    let single: Vec<Vec<u8>> = trace.iter().map(|s| one.handle(&s.req).unwrap().message).collect();
    let reqs: Vec<Request> = trace.iter().map(|s| s.req.clone()).collect();
    let mut got = vec![];
    // Uneven batch sizes, so that hsmd_init and batch borders fall everywhere.
    for (k, chunk) in reqs.chunks(7).enumerate() {
        let (a, b) = chunk.split_at(chunk.len().min(k % 7));
        for part in [a, b] {
            for r in batched.handle_batch(part) {
                got.push(r.unwrap().message);
            }
        }
    }
    assert_eq!(got.len(), single.len());
    for (i, (a, b)) in single.iter().zip(&got).enumerate() {
        assert_eq!(hex::encode(a), hex::encode(b), "request #{i} type {}", trace[i].msg_type);
    }
    // Same keys, versions and values on disk.
    assert_eq!(one.synced_state().unwrap(), batched.synced_state().unwrap());
    assert_eq!(one.stats().vls_calls, batched.stats().vls_calls);
}

#[test]
fn a_refusal_inside_a_batch_keeps_the_others_and_nothing_of_its_own() {
    let trace = load("open-pay-close/bob.jsonl");
    let at = trace.iter().position(|s| s.msg_type == 35).expect("a validate_commitment_tx");
    assert!(at + 2 < trace.len());
    let bad = refused_variant(&trace[at].req);
    let (d1, d2) = (temp_dir("gc-refusal-single"), temp_dir("gc-refusal-batch"));
    let (mut one, mut batched) = (open(&d1), open(&d2));
    for s in &trace[..at - 1] {
        one.handle(&s.req).unwrap();
        batched.handle(&s.req).unwrap();
    }
    // ecdh (1) with a point that is not a public key: VLS `expect`s and panics (the signer then
    // reloads its node from disk, so the batch so far must be on disk first).
    let mut ecdh = vec![0u8, 1];
    ecdh.extend_from_slice(&[0xff; 33]);
    let panics = Request { seq: 50000, peer_id: [0; 33], dbid: 0, message: ecdh };
    // The request before, the refused one, the one after, the panicking one, the next one.
    let batch = [trace[at - 1].req.clone(), bad, trace[at].req.clone(), panics, trace[at + 1].req.clone()];
    let expect: Vec<Result<Vec<u8>, String>> =
        batch.iter().map(|r| one.handle(r).map(|x| x.message).map_err(|e| e.to_string())).collect();
    let got = batched.handle_batch(&batch);
    assert!(matches!(got[1], Err(Error::Refused { msg_type: 35, .. })), "{:?}", got[1]);
    assert!(matches!(got[3], Err(Error::Panic { msg_type: 1, .. })), "{:?}", got[3]);
    assert_eq!(batched.stats().rebuilds, 1);
    let got: Vec<Result<Vec<u8>, String>> =
        got.into_iter().map(|r| r.map(|x| x.message).map_err(|e| e.to_string())).collect();
    assert_eq!(got, expect, "the same replies and the same refusal text as one at a time");
    // What is on disk is the accepted requests' state, without the refused one's.
    assert_eq!(one.synced_state().unwrap(), batched.synced_state().unwrap());
    drop(batched);
    let mut reopened = open(&d2);
    assert_eq!(one.synced_state().unwrap(), reopened.synced_state().unwrap());
    // And the session goes on from it.
    for (i, s) in trace.iter().enumerate().skip(at + 2) {
        let a = one.handle(&s.req).unwrap();
        let b = reopened.handle(&s.req).unwrap_or_else(|e| panic!("request #{i} type {}: {e}", s.msg_type));
        assert_eq!(a.message, b.message, "request #{i}");
    }
}

#[test]
fn a_duplicate_inside_a_batch_gets_the_stored_reply() {
    let trace = load("open-pay-close/bob.jsonl");
    let d = temp_dir("gc-dup");
    let mut s = open(&d);
    let n = trace.iter().position(|s| s.msg_type == 35).expect("a validate_commitment_tx");
    for st in &trace[..n] {
        s.handle(&st.req).unwrap();
    }
    let r = &trace[n].req;
    let out = s.handle_batch(&[r.clone(), r.clone()]);
    let (a, b) = (out[0].as_ref().unwrap(), out[1].as_ref().unwrap());
    assert_eq!(a.message, b.message);
    assert_eq!(s.stats().dedupe_hits, 1);
}

/// A request that changes no state (here every `ecdh`, `sign_remote_htlc_tx` and
/// `sign_penalty_to_us` of the session) writes nothing, so it costs no commit and no fsync, one
/// at a time or in a batch; delivered again it is answered again by VLS, with the same reply.
/// The state-changing requests still commit with their dedupe record.
#[test]
fn requests_that_change_nothing_write_nothing() {
    let trace = load("open-pay-close/bob.jsonl");
    let d = temp_dir("gc-stateless");
    let mut s = open(&d);
    let stateless = [1u16, 20, 14];
    let mut seen = 0;
    for (i, st) in trace.iter().enumerate() {
        let before = s.synced_state().unwrap();
        let reply = s.handle(&st.req).unwrap_or_else(|e| panic!("#{i}: {e}"));
        if !stateless.contains(&st.msg_type) {
            continue;
        }
        seen += 1;
        assert_eq!(s.synced_state().unwrap(), before, "#{i} type {} wrote state", st.msg_type);
        let vls = s.stats().vls_calls;
        // Again, alone and as a batch of two: VLS answers each time, identically.
        assert_eq!(s.handle(&st.req).unwrap(), reply);
        let twice = s.handle_batch(&[st.req.clone(), st.req.clone()]);
        for r in twice {
            assert_eq!(r.unwrap(), reply);
        }
        assert_eq!(s.stats().vls_calls, vls + 3);
        assert_eq!(s.synced_state().unwrap(), before);
    }
    assert!(seen >= 5, "the session has stateless requests ({seen})");
    // A state-changing request still leaves its dedupe record: delivered again, it is not re-run.
    let k = trace.iter().rposition(|st| st.msg_type == 40).expect("a revoke_commitment_tx");
    let d2 = temp_dir("gc-stateful");
    let mut s = open(&d2);
    for st in &trace[..=k] {
        s.handle(&st.req).unwrap();
    }
    let vls = s.stats().vls_calls;
    s.handle(&trace[k].req).unwrap();
    assert_eq!(s.stats().vls_calls, vls);
}
