//! End to end, the project's main oracle:
//!
//! FakeLightningd ──fd 3──▶ sphinx-broker ──MQTT──▶ sphinx-key run ──▶ VLS (redb state)
//!
//! Every request of each recorded trace is replayed through the real broker and signer binaries,
//! and every reply must be byte-identical to what `sphinx_signer::Signer::in_memory` answers in
//! process for the same request sequence (same seed, regtest, same fixed clock, same policy
//! defaults). Refusals must agree too (both sides refuse). The broker must exit 0 by itself once
//! fd 3 is closed; bob's force-close trace restarts the broker midway (a second `hsmd_init`).
//!
//! Needs the binaries next to this test's directory (`target/release/{sphinx-broker,sphinx-key}`):
//! `cargo build --release -p sphinx-broker -p sphinx-key` before
//! `cargo test --release -p sphinx-standin --features oracle --test e2e_replay`.

mod common;

use std::time::Duration;

use common::recorded_session;
use sphinx_standin::harness::{bin, broker_envs, free_port, init_signer, tail, SignerProcess, TempDir};
use sphinx_standin::lightningd::{BrokerOutput, SpawnOptions};
use sphinx_standin::replay::{self, compare_with_oracle, oracle_replay, ReplayOptions};

fn run_e2e(scenario: &str, node: &str) {
    let (tr, seed, clock) = recorded_session(scenario, node);
    let d = TempDir::new(&format!("e2e-{scenario}-{node}")).unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let key = bin("sphinx-key").unwrap();
    let broker = bin("sphinx-broker").unwrap();
    let signer_dir = d.join("signer");
    let broker_log = d.join("broker.log");
    init_signer(&key, &signer_dir, seed).unwrap();

    // The signer connects (with backoff) to the broker that the replay is about to spawn;
    // the broker holds hsmd_init until the signer answers it.
    let signer_proc = SignerProcess::start(&key, &signer_dir, &listen, clock, &d.join("signer.log"), &[]).unwrap();

    let mut opts = ReplayOptions::new(&broker);
    opts.envs = broker_envs(&d.join("broker"), &listen);
    opts.spawn = SpawnOptions {
        call_timeout: Duration::from_secs(20),
        init_timeout: Duration::from_secs(60),
        output: BrokerOutput::File(broker_log.clone()),
        ..SpawnOptions::default()
    };
    let report = replay::replay(&tr, &opts, &mut |_| {}).unwrap_or_else(|e| {
        panic!(
            "{e}\n--- broker log ---\n{}\n--- signer log ---\n{}",
            tail(&broker_log, 4000),
            signer_proc.log_tail(4000)
        )
    });

    let cfg = replay::signer::replay_config(clock, Default::default());
    let mut signer = replay::signer::in_memory(seed, &cfg).unwrap();
    let expected = oracle_replay(&tr, &mut signer, true);
    let mismatches = compare_with_oracle(&report.steps, &expected);

    let lat: Vec<f64> = report.steps.iter().map(|s| s.latency.as_secs_f64() * 1e3).collect();
    let total: f64 = lat.iter().sum();
    eprintln!(
        "{scenario}/{node}: {} requests, {} mismatches, {:.1} ms total, broker exits {:?}",
        report.steps.len(),
        mismatches.len(),
        total,
        report.broker_exits
    );
    if !mismatches.is_empty() || !report.brokers_exited_cleanly() {
        let list: Vec<String> = mismatches
            .iter()
            .take(30)
            .map(|m| format!("  #{} conn {} type {}: {}", m.index, m.conn, m.msg_type, m.what))
            .collect();
        panic!(
            "{scenario}/{node}: {} mismatches vs the in-process signer, broker exits {:?}\n{}\n--- broker log ---\n{}\n--- signer log ---\n{}",
            mismatches.len(),
            report.broker_exits,
            list.join("\n"),
            tail(&broker_log, 4000),
            signer_proc.log_tail(4000)
        );
    }
    assert_eq!(report.steps.len(), tr.request_count());
}

#[test]
fn e2e_open_pay_close_alice() {
    run_e2e("open-pay-close", "alice");
}

#[test]
fn e2e_open_pay_close_bob() {
    run_e2e("open-pay-close", "bob");
}

#[test]
fn e2e_force_close_alice() {
    run_e2e("force-close", "alice");
}

/// Includes lightningd's restart: the broker is replaced while the signer stays up and reconnects.
#[test]
fn e2e_force_close_bob() {
    run_e2e("force-close", "bob");
}
