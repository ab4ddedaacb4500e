//! Loads the recorded CLN hsmd traces (testdata/traces) as signer requests with CLN's replies.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use sphinx_signer::{ClockConfig, SignerConfig};
use sphinx_wire::serial::Request;

/// T0 of the open-pay-close scenario (unix seconds, rounded down).
pub const T0_OPEN_PAY_CLOSE: u64 = 1795466157;
/// T0 of the force-close scenario.
pub const T0_FORCE_CLOSE: u64 = 1795466255;

/// One request of a trace and what CLN's hsmd answered.
#[derive(Clone, Debug)]
pub struct Step {
    /// The request as the signer gets it (51/52 already translated to 38/39).
    pub req: Request,
    /// Message type sent to the signer.
    pub msg_type: u16,
    /// Type of the recorded request (before translation).
    pub recorded_type: u16,
    /// CLN's recorded reply (type + body).
    pub cln_reply: Vec<u8>,
}

pub fn trace_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/traces").join(name)
}

/// Reads a trace: requests in order, each with its reply; skips client_hsmfd (9) and memleak (33).
pub fn load(name: &str) -> Vec<Step> {
    let text = std::fs::read_to_string(trace_path(name)).expect("trace file");
    let mut pending: HashMap<u64, usize> = HashMap::new();
    let mut steps: Vec<Option<Step>> = Vec::new();
    let mut replies: HashMap<usize, Vec<u8>> = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        let conn = v["conn"].as_u64().unwrap();
        let ty = v["type"].as_u64().unwrap() as u16;
        let msg = hex::decode(v["hex"].as_str().unwrap()).unwrap();
        if v["dir"] == "req" {
            let ctx = &v["ctx"];
            let dbid = ctx["dbid"].as_u64().unwrap();
            let mut peer_id = [0u8; 33];
            if let Some(p) = ctx["peer_id"].as_str() {
                peer_id.copy_from_slice(&hex::decode(p).unwrap());
            }
            pending.insert(conn, steps.len());
            if ty == 9 || ty == 33 {
                steps.push(None);
                continue;
            }
            let message = sphinx_wire::hsmd::without_check_capability(&msg);
            let msg_type = sphinx_wire::hsmd::msg_type(&message).unwrap();
            let seq = (steps.len() % 65536) as u16;
            steps.push(Some(Step {
                req: Request { seq, peer_id, dbid, message },
                msg_type,
                recorded_type: ty,
                cln_reply: Vec::new(),
            }));
        } else {
            let idx = pending.remove(&conn).expect("reply without request");
            replies.insert(idx, msg);
        }
    }
    steps
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.map(|mut s| {
                s.cln_reply = replies.remove(&i).expect("request without reply");
                s
            })
        })
        .collect()
}

/// Regtest, strict policy, clock fixed at `t`.
pub fn config(t: u64) -> SignerConfig {
    SignerConfig { network: bitcoin::Network::Regtest, policy: Default::default(), clock: ClockConfig::Fixed(t) }
}

/// A fresh, empty temporary directory for this test.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sphinx-signer-{}-{}", std::process::id(), name));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
