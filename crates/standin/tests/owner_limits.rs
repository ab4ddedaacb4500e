//! The owner's limits bite on the real signing path, end to end:
//!
//! fake lightningd ──fd──▶ sphinx-broker ──MQTT──▶ sphinx-key, while the owner runs
//! `sphinx-key ctl update-policy` through the broker's HTTP API.
//!
//! Right after lightningd's `hsmd_init`, the owner sets a velocity limit of 50,500,000 msat a day.
//! The recorded session then pays a 50,000,000 msat invoice (approved: under the limit) and later
//! keysends 1,000,000 msat (refused: 51,000,000 > 50,500,000). CLN gets the refusal as its answer
//! (`approved = false`), at once, not a hang. The limits are then read back through the API,
//! signed by the device.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{recorded_session, tempdir};
use sphinx_standin::harness::{bin, broker_envs, free_port, init_signer, tail, SignerProcess};
use sphinx_standin::lightningd::{BrokerOutput, SpawnOptions};
use sphinx_standin::replay::{self, ReplayOptions};
use sphinx_wire::hsmd;

const TOKEN: &str = "owner-limits-test-token-0123456789";

#[test]
fn velocity_limit_set_by_the_owner_refuses_the_payment_over_it() {
    let (tr, seed, clock) = recorded_session("open-pay-close", "alice");
    let d = tempdir("owner-limits");
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let api = format!("127.0.0.1:{}", free_port().unwrap());
    let key = bin("sphinx-key").unwrap();
    let signer_dir = d.join("signer");
    init_signer(&key, &signer_dir, seed).unwrap();
    let _signer = SignerProcess::start(&key, &signer_dir, &listen, clock, &d.join("signer.log"), &[]).unwrap();

    let mut opts = ReplayOptions::new(bin("sphinx-broker").unwrap());
    opts.envs = broker_envs(&d.join("broker"), &listen);
    opts.envs.push(("SPHINX_BROKER_API_LISTEN".into(), api.clone().into()));
    opts.envs.push(("SPHINX_BROKER_API_TOKEN".into(), TOKEN.into()));
    opts.spawn = SpawnOptions {
        call_timeout: Duration::from_secs(20),
        output: BrokerOutput::File(d.join("broker.log")),
        ..SpawnOptions::default()
    };
    let ctl = |args: &[&str]| {
        let out = Command::new(&key)
            .args(["ctl", "--url", &format!("http://{api}"), "--token", TOKEN, "--data-dir"])
            .arg(&signer_dir)
            .args(["--network", "regtest"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (mut policy_set, mut velocity) = (None, None);
    let report = replay::replay(&tr, &opts, &mut |step| {
        if step.recorded_type == hsmd::HSMD_INIT && policy_set.is_none() {
            policy_set = Some(ctl(&["update-policy", "--msat-per-interval", "50500000", "--interval", "daily"]));
        }
        if step.msg_type == hsmd::PREAPPROVE_KEYSEND {
            velocity = Some(ctl(&["query-velocity"]));
        }
    })
    .unwrap();
    let (ok, out) = policy_set.expect("policy was set after init");
    assert!(ok, "ctl update-policy failed: {out}\n{}", tail(&d.join("broker.log"), 3000));
    assert!(out.contains("50500000"), "{out}");

    let reply_of = |t: u16| report.steps.iter().find(|s| s.msg_type == t).expect("step").clone();
    let invoice = reply_of(hsmd::PREAPPROVE_INVOICE);
    assert_eq!(invoice.reply.as_deref().unwrap(), &[0, 138, 1], "50,000,000 msat is under the limit");
    let keysend = reply_of(hsmd::PREAPPROVE_KEYSEND);
    assert_eq!(keysend.reply.as_deref().unwrap(), &[0, 139, 0], "1,000,000 msat more is over the limit: refused");
    assert!(keysend.latency < Duration::from_secs(2), "the refusal is an answer, not a hang: {:?}", keysend.latency);

    let (ok, out) = velocity.expect("velocity was queried");
    assert!(ok, "{out}");
    assert!(out.contains("50000000") && out.contains("50500000"), "spent and limit, signed by the device: {out}");
}
