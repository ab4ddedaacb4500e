//! Helpers shared by the `sphinx-key` end-to-end tests (`mod common;`).
// Each test binary uses some of them.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use sphinx_mqtt_server::{Authenticator, MqttEvent, MqttEvents, MqttHandle};
use sphinx_wire::serial::Request;
use sphinx_wire::token;

/// alice's node id (seed 0x41 × 32, regtest).
pub const ALICE: &str = "029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef46";
/// How long the tests wait for the device; only turns a hang into a failure.
pub const T: Duration = Duration::from_secs(20);

/// alice's recorded requests as the signer gets them (51/52 translated to 38/39).
pub fn trace_requests() -> Vec<Request> {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/traces/open-pay-close/alice.jsonl");
    let text = std::fs::read_to_string(p).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let ty = v["type"].as_u64().unwrap();
        if v["dir"] != "req" || ty == 9 || ty == 33 {
            continue;
        }
        // CLN's own preapprove_*_check: VLS speaks 38/39, without the check_only byte.
        let message = sphinx_wire::hsmd::without_check_capability(&hex::decode(v["hex"].as_str().unwrap()).unwrap());
        let mut peer_id = [0u8; 33];
        if let Some(p) = v["ctx"]["peer_id"].as_str() {
            peer_id.copy_from_slice(&hex::decode(p).unwrap());
        }
        out.push(Request { seq: out.len() as u16, peer_id, dbid: v["ctx"]["dbid"].as_u64().unwrap(), message });
    }
    out
}

/// The broker's login check: the username is the node id, the password its token (120 s window).
pub fn auth() -> impl Authenticator {
    |_cid: &str, user: Option<&str>, pass: Option<&[u8]>| -> Result<String, token::Error> {
        let user = user.ok_or(token::Error::Username(String::new()))?;
        token::verify(user, pass.ok_or(token::Error::Length(0))?, sphinx_wire::unix_now(), 120)?;
        Ok(user.to_string())
    }
}

/// Makes a started device die with the test's thread (a panicking test leaves no device
/// running; the tokio worker that spawns it lives until the test's runtime ends).
pub fn die_with_test(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from))
    }
}

/// Kills the device and reaps it.
pub fn stop(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The next message the MQTT server saw (other events skipped), within [`T`].
pub async fn next_message(rx: &mut MqttEvents) -> (String, Bytes) {
    loop {
        match tokio::time::timeout(T, rx.recv()).await.expect("event in time").expect("server up") {
            MqttEvent::Message { topic, payload, .. } => return (topic, payload),
            _ => continue,
        }
    }
}

/// Sends `req` to alice's device and returns the next message (its answer).
pub async fn ask(h: &MqttHandle, rx: &mut MqttEvents, req: &Request) -> (String, Bytes) {
    h.publish(&format!("{ALICE}/vls"), Bytes::from(req.encode())).unwrap();
    next_message(rx).await
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    /// `sphinx-key-{prefix}-{pid}-{name}-{n}`.
    pub fn new(prefix: &str, name: &str) -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "sphinx-key-{prefix}-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
