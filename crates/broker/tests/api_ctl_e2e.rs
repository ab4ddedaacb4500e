//! Owner control end to end over real processes: the broker in-process (embedded MQTT server +
//! operator API), a `sphinx-key run` device connected over MQTT, and `sphinx-key ctl` as the
//! owner's client through the API (signs with the node key, verifies the device's answer).
//!
//! Needs the `sphinx-key` binary next to this test's directory (`target/release/sphinx-key`,
//! `cargo build --release -p sphinx-key` first; scripts/test builds every binary). Skipped with a
//! printed notice if it is missing or has no `ctl` subcommand.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sphinx_broker::config::{ApiToken, Config};
use sphinx_broker::signer_link::SignerEvent;

const ALICE_SEED: &str = "4141414141414141414141414141414141414141414141414141414141414141";
const TOKEN: &str = "e2e-api-token-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(60);

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `sphinx-key run`, killed and reaped on drop (and killed by the kernel if this test dies).
struct Device(Child, PathBuf);
impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
impl Device {
    fn log(&self) -> String {
        let t = std::fs::read_to_string(&self.1).unwrap_or_default();
        t[t.len().saturating_sub(4000)..].to_string()
    }
}

/// The sphinx-key binary, if it is there and knows `ctl`.
fn key_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let dir = if dir.ends_with("deps") { dir.parent()? } else { dir };
    let p = dir.join("sphinx-key");
    let ok = Command::new(&p).args(["ctl", "--help"]).output().map(|o| o.status.success()).unwrap_or(false);
    ok.then_some(p)
}

fn start_device(bin: &Path, data: &Path, broker: &str) -> Device {
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
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
    // SAFETY: only asks the kernel to SIGKILL the child when this process dies.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    Device(cmd.spawn().unwrap(), log)
}

/// Runs `sphinx-key ctl` (blocking, off the runtime's threads): exit code, stdout, stderr.
async fn ctl(bin: &Path, data: &Path, url: &str, token: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(bin);
    cmd.args(["--data-dir"]).arg(data).args(["--network", "regtest", "--log", "warn", "ctl", "--url", url, "--token", token]);
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sphinx_key_ctl_through_the_broker_api_to_a_device() {
    let Some(bin) = key_bin() else {
        println!("SKIPPED: target/release/sphinx-key with `ctl` not found (cargo build --release -p sphinx-key)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("sphinx-api-ctl-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _guard = Dir(dir.clone());

    let mut cfg = Config { data_dir: dir.join("broker"), ..Config::default() };
    cfg.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.api.token = Some(ApiToken::new(TOKEN).unwrap());
    let broker = sphinx_broker::start(&cfg).await.unwrap();
    let url = format!("http://{}", broker.api.as_ref().unwrap().local_addr());
    let mut events = broker.hub.subscribe();
    let data = dir.join("key");
    let device = start_device(&bin, &data, &broker.mqtt.local_addr().to_string());
    // Ready = logged in with its token, subscribed to {id}/vls and {id}/control, said hello.
    let ready = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(SignerEvent::Ready { node_id, .. }) = events.recv().await {
                return node_id;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("device never said hello; its log:\n{}", device.log()));
    let listed = broker.hub.signers();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].node_id, ready);

    let (code, out, err) = ctl(&bin, &data, &url, TOKEN, &["query-policy"]).await;
    assert_eq!(code, Some(0), "{err}\n{}", device.log());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["PolicyCurrent"]["interval"], "daily");

    let (code, out, err) = ctl(&bin, &data, &url, TOKEN, &["update-policy", "--msat-per-interval", "123000"]).await;
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["PolicyUpdated"]["msat_per_interval"], 123000);

    let (code, out, err) = ctl(&bin, &data, &url, TOKEN, &["query-all"]).await;
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["AllCurrent"]["policy"]["msat_per_interval"], 123000);

    // A replayed (old) nonce: relayed, refused by the device with a signed Error, exit 1.
    let (code, out, _) = ctl(&bin, &data, &url, TOKEN, &["--nonce", "1", "query-policy"]).await;
    assert_eq!(code, Some(1));
    assert!(out.contains("Error"), "{out}");

    // The wrong API token never reaches the device.
    let (code, _, err) = ctl(&bin, &data, &url, "wrong-token-wrong-token", &["nonce"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("401"), "{err}");
}
