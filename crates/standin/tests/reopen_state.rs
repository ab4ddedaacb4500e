//! The signer's durable state does not depend on when the device restarted.
//!
//! A recorded session is replayed in process through `Signer::open` (redb), closing and
//! reopening the signer before request N, for N all along the session; the final state on disk
//! must equal that of the run without a restart. This caught two VLS 1.0.0-rc.1 gaps the signer
//! now covers: node state changed only in memory (velocity, fee velocity, invoices) and velocity
//! controls reset to fresh ones on restore.

mod common;

use std::collections::BTreeMap;

use common::recorded_session;
use sphinx_signer::Signer;
use sphinx_standin::harness::{signer_state, TempDir};
use sphinx_standin::replay::{self, oracle_skips, translate_request};
use sphinx_standin::trace::Trace;
use sphinx_wire::serial;

fn run(tr: &Trace, seed: [u8; 32], clock: u64, reopen_before: Option<usize>) -> BTreeMap<String, Vec<u8>> {
    let cfg = replay::signer::replay_config(clock, Default::default());
    let d = TempDir::new("reopen").unwrap();
    let mut s = Signer::open(seed, d.path(), &cfg).unwrap();
    let mut seq = 0u16;
    for (i, ex) in tr.exchanges.iter().enumerate() {
        if oracle_skips(ex.msg_type) {
            continue;
        }
        if reopen_before == Some(i) {
            drop(s);
            s = Signer::open(seed, d.path(), &cfg).unwrap();
        }
        let ctx = ex.ctx.client_context();
        let req =
            serial::Request { seq, peer_id: ctx.peer_id, dbid: ctx.dbid, message: translate_request(&ex.request) };
        s.handle(&req).unwrap_or_else(|e| panic!("request #{i} type {}: {e}", ex.msg_type));
        seq = seq.wrapping_add(1);
    }
    drop(s);
    signer_state(d.path()).unwrap()
}

#[test]
fn restart_at_any_point_leaves_the_same_state() {
    let (tr, seed, clock) = recorded_session("open-pay-close", "alice");
    let calm = run(&tr, seed, clock, None);
    let velocity = |st: &BTreeMap<String, Vec<u8>>| {
        let (_, v) = st.iter().find(|(k, _)| k.starts_with("node/state/")).expect("node state");
        let j: serde_json::Value = serde_json::from_slice(v).unwrap();
        (j["velocity_control"].clone(), j["fee_velocity_control"].clone())
    };
    let (vc, fc) = velocity(&calm);
    assert_ne!(vc["start_sec"], 0, "the session's payments are in the velocity control");
    assert_ne!(fc["start_sec"], 0, "the funding fee is in the fee velocity control");
    let mut failures = vec![];
    for i in (3..tr.exchanges.len()).step_by(4) {
        let r = run(&tr, seed, clock, Some(i));
        let diff: Vec<&String> = calm.iter().filter(|(k, v)| r.get(*k) != Some(*v)).map(|(k, _)| k).collect();
        if !diff.is_empty() || r.len() != calm.len() {
            failures.push(format!("restart before #{i} (type {}): {diff:?}", tr.exchanges[i].msg_type));
        }
    }
    assert!(failures.is_empty(), "state depends on when the signer restarted:\n{}", failures.join("\n"));
}
