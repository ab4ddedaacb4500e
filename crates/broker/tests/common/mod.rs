//! Helpers shared by the broker's integration tests (`mod common;` in each file that uses them;
//! a file uses only some, hence `dead_code` allowed).
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

// ---------- a `sphinx-key` process ----------

/// `{temp}/{name}-{pid}`, emptied and created; removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn fresh(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `sphinx-key` binary's path: next to this test's directory (`target/release/sphinx-key`),
/// whether or not it is there.
pub fn key_bin_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let dir = if dir.ends_with("deps") { dir.parent()? } else { dir };
    Some(dir.join("sphinx-key"))
}

/// `sphinx-key run`, killed and reaped on drop (and killed by the kernel if this test dies).
pub struct KeyProc(Child, PathBuf);

impl Drop for KeyProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl KeyProc {
    /// The end of its log.
    pub fn log(&self) -> String {
        let t = std::fs::read_to_string(&self.1).unwrap_or_default();
        t[t.len().saturating_sub(4000)..].to_string()
    }
}

/// `sphinx-key init` of alice's seed (regtest) in `data`, then `sphinx-key run` against the MQTT
/// server at `broker` with `extra` arguments, logging to `data.log`.
pub fn start_key(bin: &Path, data: &Path, broker: &str, extra: &[&str]) -> KeyProc {
    const ALICE_SEED: &str = "4141414141414141414141414141414141414141414141414141414141414141";
    let out = Command::new(bin)
        .args(["init", "--data-dir"])
        .arg(data)
        .args(["--network", "regtest", "--seed-hex", ALICE_SEED])
        .output()
        .unwrap();
    assert!(out.status.success(), "sphinx-key init: {}", String::from_utf8_lossy(&out.stderr));
    let log = data.with_extension("log");
    let f = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--data-dir"])
        .arg(data)
        .args(["--broker", broker, "--network", "regtest", "--status", "none"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
    // SAFETY: only asks the kernel to SIGKILL the child when this process dies.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    KeyProc(cmd.spawn().unwrap(), log)
}

// ---------- recorded requests ----------

/// The first root (dbid 0) request of type `ty` in alice's recorded open-pay-close session.
pub fn trace_request(ty: u16) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/traces/open-pay-close/alice.jsonl");
    let text = std::fs::read_to_string(path).unwrap();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["dir"] == "req" && v["type"] == ty && v["ctx"]["dbid"] == 0 {
            return hex::decode(v["hex"].as_str().unwrap()).unwrap();
        }
    }
    panic!("no request of type {ty}");
}
