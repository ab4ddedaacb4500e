//! Parsing of the four recorded traces: counts must match the tables of the traces README.

mod common;

use std::collections::BTreeMap;

use common::{trace_path, ALL_TRACES};
use sphinx_standin::trace::{scenario_for_path, seed_for_path, Trace};

/// (type, count) for the README's "Message counts by type" tables; columns alice, bob.
fn expected(scenario: &str, node: &str) -> BTreeMap<u16, usize> {
    let table: &[(u16, usize, usize)] = match scenario {
        "open-pay-close" => &[
            (1, 2, 3),
            (3, 2, 3),
            (4, 3, 3),
            (5, 1, 1),
            (6, 1, 1),
            (7, 1, 0),
            (8, 1, 2),
            (9, 6, 6),
            (10, 1, 1),
            (11, 1, 1),
            (14, 4, 6),
            (18, 3, 3),
            (19, 7, 7),
            (20, 3, 3),
            (21, 1, 1),
            (23, 0, 1),
            (27, 7, 7),
            (28, 58, 54),
            (30, 1, 1),
            (31, 1, 1),
            (32, 1, 1),
            (35, 7, 7),
            (36, 6, 6),
            (37, 1, 1),
            (40, 6, 6),
            (51, 1, 1),
            (52, 1, 0),
        ],
        "force-close" => &[
            (1, 1, 2),
            (3, 2, 4),
            (4, 3, 3),
            (5, 1, 0),
            (6, 1, 1),
            (7, 1, 0),
            (8, 0, 1),
            (9, 5, 7),
            (10, 1, 1),
            (11, 1, 2),
            (14, 0, 2),
            (18, 4, 3),
            (19, 3, 3),
            (20, 1, 1),
            (27, 7, 14),
            (28, 60, 104),
            (30, 1, 1),
            (31, 1, 1),
            (32, 1, 1),
            (34, 1, 1),
            (35, 3, 3),
            (36, 2, 2),
            (37, 1, 1),
            (40, 2, 2),
            (51, 1, 0),
            (142, 2, 0),
        ],
        _ => unreachable!(),
    };
    table.iter().map(|&(t, a, b)| (t, if node == "alice" { a } else { b })).filter(|&(_, n)| n > 0).collect()
}

#[test]
fn all_four_traces_match_the_readme_tables() {
    for (scenario, node) in ALL_TRACES {
        let p = trace_path(scenario, node);
        let t = Trace::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let want_lines = match (scenario, node) {
            ("open-pay-close", _) => 254,
            ("force-close", "alice") => 212,
            _ => 320,
        };
        assert_eq!(t.records.len(), want_lines, "{scenario}/{node} lines");
        assert_eq!(t.request_count(), want_lines / 2, "{scenario}/{node} requests");
        assert!(t.exchanges.iter().all(|e| e.reply.is_some()), "every request has its reply");
        assert_eq!(t.request_counts(), expected(scenario, node), "{scenario}/{node} per type");
        let runs = if (scenario, node) == ("force-close", "bob") { 2 } else { 1 };
        assert_eq!(t.runs(), runs);
        // Every 109 creates a connection; every client request is on a created one (checked by parse).
        let n109 = t.exchanges.iter().filter(|e| e.new_conn.is_some()).count();
        assert_eq!(n109, t.request_counts()[&9]);
        assert!(scenario_for_path(&p).is_some());
        assert!(seed_for_path(&p).is_some());
    }
}

#[test]
fn open_pay_close_alice_has_127_requests() {
    let t = Trace::load(trace_path("open-pay-close", "alice")).unwrap();
    assert_eq!(t.request_count(), 127);
    // The first request is hsmd_init on root, answered by init_reply_v4 with alice's node id.
    let first = &t.exchanges[0];
    assert_eq!((first.conn, first.msg_type, first.reply_type()), (0, 11, Some(114)));
    let id = sphinx_wire::hsmd::parse_init_reply_node_id(first.reply.as_ref().unwrap()).unwrap();
    assert_eq!(hex::encode(id), "029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef46");
}

#[test]
fn bob_force_close_restart_conns_continue() {
    let t = Trace::load(trace_path("force-close", "bob")).unwrap();
    let inits: Vec<_> = t.exchanges.iter().filter(|e| e.msg_type == 11).collect();
    assert_eq!(inits.len(), 2);
    assert!((inits[1].t - 93.357).abs() < 0.01, "restart at t = 93.357, got {}", inits[1].t);
    let after: Vec<u64> = t.exchanges.iter().filter(|e| e.t > inits[1].t).filter_map(|e| e.new_conn).collect();
    assert_eq!(after, vec![5, 6, 7]);
}

#[test]
fn client_contexts_match_the_9_that_created_them() {
    for (scenario, node) in ALL_TRACES {
        let t = Trace::load(trace_path(scenario, node)).unwrap();
        let mut ctx_of = std::collections::HashMap::new();
        for e in &t.exchanges {
            if let Some(c) = e.new_conn {
                ctx_of.insert(c, sphinx_wire::hsmd::parse_client_hsmfd(&e.request).unwrap());
            }
            if e.conn != 0 {
                assert_eq!(e.ctx.client_context(), ctx_of[&e.conn], "{scenario}/{node} #{}", e.index);
            } else {
                assert_eq!(e.ctx.client_context(), sphinx_wire::ClientContext::ROOT);
            }
        }
    }
}
