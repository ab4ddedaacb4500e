//! Owner control end to end over real processes: the broker in-process (embedded MQTT server +
//! operator API), a `sphinx-key run` device connected over MQTT, and `sphinx-key ctl` as the
//! owner's client through the API (signs with the node key, verifies the device's answer).
//!
//! Needs the `sphinx-key` binary next to this test's directory (`target/release/sphinx-key`,
//! `cargo build --release -p sphinx-key` first; scripts/test builds every binary). Skipped with a
//! printed notice if it is missing or has no `ctl` subcommand.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{start_key, Dir};
use sphinx_broker::api::ApiToken;
use sphinx_broker::config::Config;
use sphinx_broker::hub::SignerEvent;

const TOKEN: &str = "e2e-api-token-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(60);

/// The sphinx-key binary, if it is there and knows `ctl`.
fn key_bin() -> Option<PathBuf> {
    let p = common::key_bin_path()?;
    let ok = Command::new(&p).args(["ctl", "--help"]).output().map(|o| o.status.success()).unwrap_or(false);
    ok.then_some(p)
}

/// Runs `sphinx-key ctl` (blocking, off the runtime's threads): exit code, stdout, stderr.
async fn ctl(bin: &Path, data: &Path, url: &str, token: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(bin);
    cmd.args(["--data-dir"]).arg(data).args([
        "--network",
        "regtest",
        "--log",
        "warn",
        "ctl",
        "--url",
        url,
        "--token",
        token,
    ]);
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sphinx_key_ctl_through_the_broker_api_to_a_device() {
    let Some(bin) = key_bin() else {
        println!("SKIPPED: target/release/sphinx-key with `ctl` not found (cargo build --release -p sphinx-key)");
        return;
    };
    let dir = Dir::fresh("sphinx-api-ctl-e2e");

    let mut cfg = Config { data_dir: dir.0.join("broker"), ..Config::default() };
    cfg.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.api.token = Some(ApiToken::new(TOKEN).unwrap());
    let broker = sphinx_broker::start(&cfg).await.unwrap();
    let url = format!("http://{}", broker.api.as_ref().unwrap().local_addr());
    let mut events = broker.hub.subscribe();
    let data = dir.0.join("key");
    let device = start_key(&bin, &data, &broker.mqtt.local_addr().to_string(), &[]);
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
