//! The broker's start-up and hsmd behaviour as lightningd sees it, through the real binary:
//! `--version` from configuration (and a clear error when unset), the chain check of
//! `hsmd_init`, requests waiting in order for a signer that is not there yet, the messages the
//! broker answers itself (`client_hsmfd`, `dev_memleak`, `dev_preinit`), and a clean exit when
//! lightningd closes fd 3.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{tempdir, trace_path};
use sphinx_standin::harness::{bin, broker_envs, free_port, init_signer, tail, SignerProcess};
use sphinx_standin::lightningd::{BrokerOutput, FakeLightningd, SpawnOptions};
use sphinx_standin::trace::{scenario_for_path, seed_for_path, Trace};
use sphinx_wire::{hsmd, ClientContext};

fn init_request() -> Vec<u8> {
    let tr = Trace::load(trace_path("open-pay-close", "alice")).unwrap();
    tr.exchanges.iter().find(|e| e.msg_type == hsmd::HSMD_INIT).unwrap().request.clone()
}

#[test]
fn version_comes_from_configuration_and_its_absence_is_a_clear_error() {
    let broker = bin("sphinx-broker").unwrap();
    let out = Command::new(&broker).arg("--version").env_remove("SPHINX_BROKER_CLN_VERSION").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "unset version is a configuration error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cln_version") && err.contains("lightningd --version"), "{err}");
    let out = Command::new(&broker).arg("--version").env("SPHINX_BROKER_CLN_VERSION", "v25.12.1").output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"v25.12.1\n");
    let d = tempdir("version-file");
    std::fs::write(d.join("b.toml"), "cln_version = \"v26.04\"\n").unwrap();
    let out = Command::new(&broker)
        .args(["--version", "--config"])
        .arg(d.join("b.toml"))
        .env_remove("SPHINX_BROKER_CLN_VERSION")
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"v26.04\n", "from the config file");
    // A release outside the supported range fails at `--version`, so lightningd never starts on it.
    let out = Command::new(&broker).arg("--version").env("SPHINX_BROKER_CLN_VERSION", "v25.09").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("v25.09") && err.contains("supported range v25.12.x to v26.x"), "{err}");
}

/// lightningd's init with an `hsm_passphrase` TLV (CLN v25.12, `--hsm-passphrase`): VLS would
/// refuse its trailing bytes with a parse error; the broker refuses it first, saying why.
#[test]
fn hsmd_init_with_a_passphrase_is_refused_with_a_clear_error() {
    let d = tempdir("passphrase");
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let envs = broker_envs(&d.join("broker"), &listen);
    let log = d.join("broker.log");
    let opts = SpawnOptions { output: BrokerOutput::File(log.clone()), ..SpawnOptions::default() };
    let mut ld = FakeLightningd::spawn_with(bin("sphinx-broker").unwrap(), Vec::<String>::new(), envs, opts).unwrap();
    let mut init = init_request();
    init.extend_from_slice(&[hsmd::INIT_TLV_HSM_PASSPHRASE as u8, 4]);
    init.extend_from_slice(b"pw1\0");
    assert!(ld.root_call(&init).is_err(), "no init reply for a passphrase the signer cannot apply");
    let status = ld.shutdown().unwrap();
    assert_eq!(status.code(), Some(3), "runtime failure exit code");
    let text = tail(&log, 4000);
    assert!(text.contains("hsm_passphrase") && text.contains("cannot apply it"), "{text}");
    assert!(!d.join("broker/pinned-node-id").exists(), "nothing was initialised");
}

/// Under `cln_version = v26.x`, `hsmd_sign_local_htlc_tx` (16), gone from v26's hsmd wire, is
/// refused by the broker itself (bad-request report, client closed) without waiting for a
/// signer; under v25.12 the same request is queued for the signer as any other.
#[test]
fn cln_v26_message_set_refuses_the_removed_sign_local_htlc_tx() {
    let ctx = ClientContext { peer_id: [2u8; 33], dbid: 1, permissions: 447 };
    let mut req = hsmd::SIGN_LOCAL_HTLC_TX.to_be_bytes().to_vec();
    req.extend_from_slice(&[0u8; 16]);
    for (version, removed) in [("v26.04", true), ("v25.12.1", false)] {
        let d = tempdir("v26-set");
        let listen = format!("127.0.0.1:{}", free_port().unwrap());
        let mut envs = broker_envs(&d.join("broker"), &listen);
        envs.retain(|(k, _)| k.to_str() != Some("SPHINX_BROKER_CLN_VERSION"));
        envs.push(("SPHINX_BROKER_CLN_VERSION".into(), version.into()));
        envs.push(("SPHINX_BROKER_REQUEST_TIMEOUT".into(), "2".into()));
        let log = d.join("broker.log");
        let opts = SpawnOptions {
            output: BrokerOutput::File(log.clone()),
            expected_version: version.into(),
            ..SpawnOptions::default()
        };
        let mut ld =
            FakeLightningd::spawn_with(bin("sphinx-broker").unwrap(), Vec::<String>::new(), envs, opts).unwrap();
        let mut client = ld.new_client(&ctx).unwrap();
        let before = ld.status_log().count;
        let t0 = Instant::now();
        assert!(client.call(&req).is_err(), "{version}: no reply without a signer");
        let status = ld.wait_status(before + 1, Duration::from_secs(10)).expect("a bad-request report");
        let report = String::from_utf8_lossy(status.frames.last().unwrap()).to_string();
        if removed {
            assert!(report.contains("does not exist in the hsmd protocol of CLN V26"), "{report}");
            assert!(t0.elapsed() < Duration::from_secs(2), "refused at once, not at the request bound");
        } else {
            assert!(report.contains("no reply from the signer within"), "{version}: queued for the signer: {report}");
        }
        drop(client);
        assert_eq!(ld.shutdown().unwrap().code(), Some(0), "{}", tail(&log, 3000));
    }
}

#[test]
fn not_under_lightningd_explains_itself() {
    let out = Command::new(bin("sphinx-broker").unwrap())
        .env("SPHINX_BROKER_CLN_VERSION", "v25.12.1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("subdaemon=hsmd:"));
}

#[test]
fn hsmd_init_for_another_chain_is_refused_with_a_clear_error() {
    let d = tempdir("wrong-chain");
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let mut envs = broker_envs(&d.join("broker"), &listen);
    envs.push(("SPHINX_BROKER_NETWORK".into(), "bitcoin".into()));
    let log = d.join("broker.log");
    let opts = SpawnOptions { output: BrokerOutput::File(log.clone()), ..SpawnOptions::default() };
    let mut ld = FakeLightningd::spawn_with(bin("sphinx-broker").unwrap(), Vec::<String>::new(), envs, opts).unwrap();
    assert!(ld.root_call(&init_request()).is_err(), "no reply for a regtest init on a mainnet broker");
    let status = ld.shutdown().unwrap();
    assert_eq!(status.code(), Some(3), "runtime failure exit code");
    let text = tail(&log, 4000);
    assert!(text.contains("lightningd runs on chain") && text.contains("configured for bitcoin"), "{text}");
}

#[test]
fn requests_wait_for_a_signer_broker_answers_its_own_and_exits_cleanly() {
    let path = trace_path("open-pay-close", "alice");
    let seed = seed_for_path(&path).unwrap();
    let clock = scenario_for_path(&path).unwrap().fixed_clock();
    let d = tempdir("startup");
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let log = d.join("broker.log");
    let opts = SpawnOptions { output: BrokerOutput::File(log.clone()), ..SpawnOptions::default() };
    let mut ld = FakeLightningd::spawn_with(
        bin("sphinx-broker").unwrap(),
        ["--developer", "--log-io", "--dev-disconnect=dev_disconnect", "--dev-no-plugin-checksum"],
        broker_envs(&d.join("broker"), &listen),
        opts,
    )
    .unwrap();

    // Answered by the broker with no signer anywhere: dev_preinit (no reply), memleak, client fds.
    let mut preinit = hsmd::DEV_PREINIT.to_be_bytes().to_vec();
    preinit.extend_from_slice(&[0u8; 8]);
    ld.send_no_reply(&preinit).unwrap();
    let leak = ld.root_call(&hsmd::DEV_MEMLEAK.to_be_bytes()).unwrap();
    assert_eq!(leak, hsmd::memleak_reply());
    let ctx = ClientContext { peer_id: [2u8; 33], dbid: 1, permissions: 447 };
    let mut client = ld.new_client(&ctx).unwrap();
    assert_eq!(client.call(&hsmd::DEV_MEMLEAK.to_be_bytes()).unwrap(), hsmd::memleak_reply());

    // hsmd_init is held until a signer answers: start the signer only once the broker says it
    // is waiting, from another thread, while lightningd blocks on the call.
    let key = bin("sphinx-key").unwrap();
    init_signer(&key, &d.join("signer"), seed).unwrap();
    let (k, sd, l, sl) = (key.clone(), d.join("signer"), listen.clone(), d.join("signer.log"));
    let waited = log.clone();
    let starter = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        // The broker's own log line is the event we wait for (bounded).
        while !tail(&waited, 20000).contains("waiting for the signer") {
            assert!(Instant::now() < deadline, "broker never said it was waiting");
            std::thread::yield_now();
        }
        SignerProcess::start(&k, &sd, &l, clock, &sl, &[]).unwrap()
    });
    let reply = ld.root_call(&init_request()).unwrap();
    let _signer = starter.join().unwrap();
    assert_eq!(hsmd::msg_type(&reply).unwrap(), hsmd::HSMD_INIT_REPLY_V4);
    let caps = hsmd::parse_init_reply_capabilities(&reply).unwrap();
    assert!(caps.contains(&147), "anchors (sign_anchorspend) advertised: {caps:?}");
    assert_eq!(
        hex::encode(hsmd::parse_init_reply_node_id(&reply).unwrap()),
        "029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef46"
    );
    assert!(d.join("broker/pinned-node-id").is_file(), "the signer's node id is pinned");

    drop(client);
    let status = ld.shutdown().unwrap();
    assert_eq!(status.code(), Some(0), "clean exit when lightningd closes fd 3\n{}", tail(&log, 3000));
}

#[test]
fn a_configured_signer_node_id_is_pinned_before_any_signer_connects() {
    let path = trace_path("open-pay-close", "alice");
    let clock = scenario_for_path(&path).unwrap().fixed_clock();
    let bob = "02c0c171d21db07e402c123e72ecb9fb01ef764a1efe153fcf785a8885962d9bc1";
    let d = tempdir("prepin");
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let mut envs = broker_envs(&d.join("broker"), &listen);
    envs.push(("SPHINX_BROKER_SIGNER_NODE_ID".into(), bob.into()));
    let log = d.join("broker.log");
    let opts = SpawnOptions { output: BrokerOutput::File(log.clone()), ..SpawnOptions::default() };
    let mut ld = FakeLightningd::spawn_with(bin("sphinx-broker").unwrap(), Vec::<String>::new(), envs, opts).unwrap();
    ld.root_call(&hsmd::DEV_MEMLEAK.to_be_bytes()).unwrap();
    assert_eq!(std::fs::read_to_string(d.join("broker/pinned-node-id")).unwrap().trim(), bob);

    // Alice's signer (another key) is refused at login, so lightningd's init is not answered by it.
    let key = bin("sphinx-key").unwrap();
    init_signer(&key, &d.join("signer"), seed_for_path(&path).unwrap()).unwrap();
    let _alice = SignerProcess::start(&key, &d.join("signer"), &listen, clock, &d.join("signer.log"), &[]).unwrap();
    let r = ld.root_call_timeout(&init_request(), Duration::from_secs(3));
    assert!(r.is_err(), "only the configured node may answer");
    assert!(tail(&log, 20000).contains("is not the pinned node"), "{}", tail(&log, 3000));
    let _ = ld.kill();
}

#[test]
fn lightningd_dying_while_init_waits_for_a_signer_ends_the_broker() {
    let d = tempdir("ld-dies");
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let log = d.join("broker.log");
    let opts = SpawnOptions { output: BrokerOutput::File(log.clone()), ..SpawnOptions::default() };
    let mut ld = FakeLightningd::spawn_with(
        bin("sphinx-broker").unwrap(),
        Vec::<String>::new(),
        broker_envs(&d.join("broker"), &listen),
        opts,
    )
    .unwrap();
    // No signer: the init waits; lightningd gives up and goes away.
    assert!(ld.root_call_timeout(&init_request(), Duration::from_millis(500)).is_err());
    let status = ld.shutdown().unwrap();
    assert_eq!(status.code(), Some(0), "the broker ends with lightningd\n{}", tail(&log, 3000));
    assert!(tail(&log, 20000).contains("closed the hsmd connection while its request was pending"));
}
