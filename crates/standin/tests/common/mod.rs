//! Shared test helpers (no external crates but the dev-dependencies).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub use sphinx_standin::harness::TempDir;
use sphinx_standin::trace::{scenario_for_path, seed_for_path, Trace};

/// A temporary directory for a test (panics if the system has none).
pub fn tempdir(tag: &str) -> TempDir {
    TempDir::new(tag).expect("cannot create a temporary directory")
}

/// Writes an executable shell script.
///
/// A child process (`sh -c 'cat > …'`) writes it, so that this multi-threaded test process never
/// holds the file open for writing: a child that another test thread forks meanwhile would inherit
/// that fd until its exec, and executing the script then fails with ETXTBSY ("Text file busy").
pub fn script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let p = dir.join(name);
    let mut writer = Command::new("sh")
        .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
        .arg(&p)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    writer.stdin.take().unwrap().write_all(format!("#!/bin/sh\n{body}\n").as_bytes()).unwrap();
    assert!(writer.wait().unwrap().success(), "writing {}", p.display());
    p
}

/// `testdata/traces/<scenario>/<node>.jsonl`.
pub fn trace_path(scenario: &str, node: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/traces").join(scenario).join(format!("{node}.jsonl"))
}

/// The recorded session `<scenario>/<node>`: its trace, its node's seed and its scenario's fixed clock.
pub fn recorded_session(scenario: &str, node: &str) -> (Trace, [u8; 32], u64) {
    let path = trace_path(scenario, node);
    let tr = Trace::load(&path).unwrap();
    let seed = seed_for_path(&path).unwrap();
    let clock = scenario_for_path(&path).unwrap().fixed_clock();
    (tr, seed, clock)
}

pub const ALL_TRACES: [(&str, &str); 4] =
    [("open-pay-close", "alice"), ("open-pay-close", "bob"), ("force-close", "alice"), ("force-close", "bob")];

/// What an LSS server at `url` holds for `seed`'s signer, each value's tag checked and removed
/// (the signer's LSS identity is derived as its init-1 does, with clock `clock`).
#[cfg(feature = "oracle")]
pub fn lss_state(url: &str, seed: [u8; 32], clock: u64) -> Result<Vec<sphinx_wire::lss::Mutation>, String> {
    use sphinx_wire::lss::{Init, Msg, Response};
    let t = std::time::Duration::from_secs(10);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let server = sphinx_lss::LssClient::info(url, t).await.map_err(|e| e.to_string())?;
        let cfg = sphinx_standin::replay::signer::replay_config(clock, Default::default());
        let mut s = sphinx_standin::replay::signer::in_memory(seed, &cfg).map_err(|e| e.to_string())?;
        let outs =
            s.on_message(sphinx_wire::topics::INIT_1_MSG, &Msg::Init(Init { server_pubkey: server.pubkey }).encode());
        let identity = match outs.as_slice() {
            [sphinx_signer::Output::Publish { payload, .. }] => match Response::decode(payload) {
                Ok(Response::Init(i)) => i,
                other => return Err(format!("init-1-res: {other:?}")),
            },
            other => return Err(format!("init-1: {other:?}")),
        };
        let mut c = sphinx_lss::LssClient::connect(url, t, &identity).await.map_err(|e| e.to_string())?;
        let key = sphinx_signer::lss_value_key(&seed);
        let state = c.get_all(&[7; 32]).await.map_err(|e| e.to_string())?;
        state.muts.into_iter().map(|m| sphinx_wire::lss::open_value(&key, m).map_err(|e| e.to_string())).collect()
    })
}
