//! Replay mechanics over the test hsmd: every request of every trace is sent, clients are created
//! from the recorded 9s, bob's restart spawns a fresh hsmd, 51/52 are translated; and the oracle
//! comparison catches differences.

mod common;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::time::Duration;

use common::{tempdir, trace_path, ALL_TRACES};
use sphinx_standin::lightningd::{BrokerOutput, SpawnOptions};
use sphinx_standin::replay::{
    compare_with_oracle, judge_against_recorded, oracle_replay, replay, translate_request, FnOracle, ReplayOptions,
    Verdict,
};
use sphinx_standin::trace::Trace;

const ECHO: &str = env!("CARGO_BIN_EXE_fake-hsmd-echo");

fn opts(envs: Vec<(&str, OsString)>) -> ReplayOptions {
    let mut o = ReplayOptions::new(ECHO);
    o.envs = envs.into_iter().map(|(k, v)| (k.into(), v)).collect();
    o.spawn = SpawnOptions {
        call_timeout: Duration::from_secs(10),
        init_timeout: Duration::from_secs(10),
        output: BrokerOutput::Inherit,
        ..SpawnOptions::default()
    };
    o
}

#[test]
fn translate_51_52() {
    // 51 = invoice string | check_only; 52 = destination | payment_hash | amount | check_only.
    assert_eq!(translate_request(&[0, 51, 0, 2, b'l', b'n', 0]), vec![0, 38, 0, 2, b'l', b'n']);
    assert_eq!(translate_request(&[0, 52, 1, 2, 3, 0]), vec![0, 39, 1, 2, 3]);
    assert_eq!(translate_request(&[0, 28, 1, 2, 3]), vec![0, 28, 1, 2, 3]);
    assert_eq!(translate_request(&[0, 51]), vec![0, 51], "too short to translate: unchanged");
}

#[test]
fn every_request_of_every_trace_reaches_the_hsmd() {
    for (scenario, node) in ALL_TRACES {
        let tr = Trace::load(trace_path(scenario, node)).unwrap();
        let mut seen = 0;
        let report = replay(&tr, &opts(vec![]), &mut |_| seen += 1).unwrap();
        assert_eq!(seen, tr.request_count());
        assert_eq!(report.steps.len(), tr.request_count(), "{scenario}/{node}");
        for (s, ex) in report.steps.iter().zip(&tr.exchanges) {
            assert_eq!(s.index, ex.index);
            let reply = s.reply.as_ref().unwrap_or_else(|e| panic!("{scenario}/{node} #{}: {e}", s.index));
            if ex.msg_type == 9 {
                assert_eq!(reply, &vec![0, 109]);
            } else {
                // The echo hsmd returns what it got: proves what was sent, on which connection.
                assert_eq!(reply, &s.request, "{scenario}/{node} #{}", s.index);
            }
            match ex.msg_type {
                51 => assert_eq!((s.msg_type, s.request.len()), (38, ex.request.len() - 1)),
                52 => assert_eq!((s.msg_type, s.request.len()), (39, ex.request.len() - 1)),
                t => assert_eq!((s.msg_type, &s.request), (t, &ex.request)),
            }
        }
        assert_eq!(report.broker_exits.len(), tr.runs(), "{scenario}/{node}: one hsmd per run");
        assert!(report.brokers_exited_cleanly(), "{:?}", report.broker_exits);
        assert!(report.steps.iter().all(|s| s.run < tr.runs()));
        assert!(report.status_messages.iter().all(|&n| n == 1));
    }
}

#[test]
fn canned_cln_replies_are_exact_and_match_an_in_process_oracle() {
    for (scenario, node) in ALL_TRACES {
        let path = trace_path(scenario, node);
        let tr = Trace::load(&path).unwrap();
        let d = tempdir("canned");
        let o = opts(vec![("FAKE_HSMD_CANNED", path.clone().into()), ("FAKE_HSMD_RUN_FILE", d.join("runs").into())]);
        let report = replay(&tr, &o, &mut |_| {}).unwrap();
        for s in &report.steps {
            let v = judge_against_recorded(s.msg_type, &s.reply, s.recorded_reply.as_deref());
            assert_eq!(v, Verdict::Exact, "{scenario}/{node} #{} {}", s.index, s.name);
        }
        assert!(report.brokers_exited_cleanly(), "{:?}", report.broker_exits);

        // An in-process "signer" that answers from the same recording: identical replies.
        let mut replies: VecDeque<Vec<u8>> =
            tr.exchanges.iter().filter(|e| e.msg_type != 9).map(|e| e.reply.clone().unwrap()).collect();
        let mut seqs = Vec::new();
        let mut oracle = FnOracle(|req: &sphinx_wire::serial::Request| {
            seqs.push((req.seq, req.dbid));
            replies.pop_front().ok_or_else(|| "exhausted".to_string())
        });
        let steps = oracle_replay(&tr, &mut oracle, true);
        assert_eq!(steps.len(), tr.request_count() - tr.request_counts()[&9], "9s are skipped");
        assert_eq!(compare_with_oracle(&report.steps, &steps), vec![], "{scenario}/{node}");
        assert!(seqs.iter().enumerate().all(|(i, (s, _))| *s as usize == i), "seq counts up");

        // A single differing byte, or a refusal, is caught.
        let mut bad = steps.clone();
        let k = bad.iter().position(|s| s.msg_type == 28).unwrap();
        bad[k].reply.as_mut().unwrap().push(0);
        bad[k + 1].reply = Err("policy".into());
        let m = compare_with_oracle(&report.steps, &bad);
        assert_eq!(m.len(), 2, "{m:?}");
    }
}

#[test]
fn oracle_contexts_are_the_connections() {
    let tr = Trace::load(trace_path("open-pay-close", "alice")).unwrap();
    let mut ctxs = Vec::new();
    let mut oracle = FnOracle(|req: &sphinx_wire::serial::Request| {
        ctxs.push((req.peer_id, req.dbid, sphinx_wire::hsmd::msg_type(&req.message).unwrap()));
        Ok(vec![0, 0])
    });
    oracle_replay(&tr, &mut oracle, true);
    // Root requests: zero peer id, dbid 0. Channel requests: the peer's id and the channel dbid.
    let bob = hex::decode("02c0c171d21db07e402c123e72ecb9fb01ef764a1efe153fcf785a8885962d9bc1").unwrap();
    for (peer, dbid, t) in ctxs {
        match t {
            19 | 35 | 36 | 40 | 31 | 32 | 37 | 14 | 20 | 21 => {
                assert_eq!((peer.to_vec(), dbid), (bob.clone(), 1), "type {t}")
            }
            28 | 27 | 11 | 30 | 10 | 38 | 39 | 8 | 5 | 6 | 7 | 4 | 3 => {
                assert_eq!((peer, dbid), ([0; 33], 0), "type {t}")
            }
            _ => {}
        }
    }
}

#[test]
fn init_reply_judged_by_identity_not_capabilities() {
    let tr = Trace::load(trace_path("open-pay-close", "alice")).unwrap();
    let rec = tr.exchanges[0].reply.clone().unwrap();
    // Same identity, one capability fewer, no TLV: the documented VLS difference.
    let ncaps = u16::from_be_bytes([rec[6], rec[7]]) as usize;
    let mut fewer = rec[..6].to_vec();
    fewer.extend_from_slice(&((ncaps - 1) as u16).to_be_bytes());
    fewer.extend_from_slice(&rec[8 + 4..8 + 4 * ncaps + 144]);
    assert!(matches!(judge_against_recorded(114, &Ok(fewer.clone()), Some(&rec)), Verdict::Expected(_)));
    // A different bolt12 key (last identity byte) is a mismatch.
    let mut other = fewer;
    let last = other.len() - 1;
    other[last] ^= 1;
    assert!(matches!(judge_against_recorded(114, &Ok(other), Some(&rec)), Verdict::Mismatch(_)));
    assert!(matches!(judge_against_recorded(114, &Err("x".into()), Some(&rec)), Verdict::Error(_)));
}
