//! The in-process oracle (`sphinx_signer::Signer::in_memory`) against CLN's own recorded replies:
//! every reply must be byte-identical, or differ only where the traces README says VLS differs by
//! design (signature nonces, init capabilities, withdrawal PSBT shape). No refusals.

mod common;

use common::{trace_path, ALL_TRACES};
use sphinx_standin::replay::{self, judge_against_recorded, oracle_replay, Verdict};
use sphinx_standin::trace::{scenario_for_path, seed_for_path, Trace};

#[test]
fn in_process_signer_agrees_with_cln_on_all_four_traces() {
    let mut problems = Vec::new();
    for (scenario, node) in ALL_TRACES {
        let path = trace_path(scenario, node);
        let tr = Trace::load(&path).unwrap();
        let cfg = replay::signer::replay_config(scenario_for_path(&path).unwrap().fixed_clock(), Default::default());
        let mut signer = replay::signer::in_memory(seed_for_path(&path).unwrap(), &cfg).unwrap();
        let steps = oracle_replay(&tr, &mut signer, true);
        let mut exact = 0;
        for s in &steps {
            let rec = tr.exchanges[s.index].reply.as_deref();
            match judge_against_recorded(s.msg_type, &s.reply, rec) {
                Verdict::Exact => exact += 1,
                Verdict::Expected(_) => {}
                v => {
                    problems.push(format!("{scenario}/{node} #{} conn {} type {}: {v:?}", s.index, s.conn, s.msg_type))
                }
            }
        }
        eprintln!("{scenario}/{node}: {} requests to the signer, {exact} byte-identical to CLN", steps.len());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
