//! The signer's restart-to-ready time and peak memory with channels of state on disk (issue 11,
//! item 4), against the same with no channel, in the same run.
//!
//! For each channel count, a signer data dir is made with `sphinx-key init` (the recorded
//! session's seed), then filled in process (`Signer::open`, the device's redb store) with
//! lightningd's `hsmd_init` and, per channel `k`, `hsmd_new_channel` + `hsmd_setup_channel` of
//! the recorded channel with dbid `k` (VLS keys each channel by peer and dbid, so these are
//! distinct channels, each with its own durable state). Then, `ROUNDS` times: the lightningd
//! stand-in spawns `sphinx-broker` and sends the init; once the broker says it waits for a signer,
//! `sphinx-key run` is started, and "ready" is the time from that process start until
//! lightningd has the init reply. Peak RSS is the signer's `VmHWM` then.
//!
//! Run: `cargo bench -p sphinx-standin --features oracle --bench startup` (after building the
//! binaries).

use std::time::{Duration, Instant};

use sphinx_signer::{PolicyConfig, Signer};
use sphinx_standin::harness::{bin, broker_envs, free_port, init_signer, tail, SignerProcess, TempDir};
use sphinx_standin::lightningd::{BrokerOutput, FakeLightningd, SpawnOptions};
use sphinx_standin::replay::{self, translate_request};
use sphinx_standin::trace::{scenario_for_path, seed_for_path, Trace};
use sphinx_wire::{hsmd, serial};

const ROUNDS: usize = 5;
const CHANNELS: [u64; 2] = [0, 100];

/// Rewrites the `node_id | dbid` at the start of `hsmd_new_channel`'s body to `dbid`.
fn with_body_dbid(msg: &[u8], dbid: u64) -> Vec<u8> {
    let mut m = msg.to_vec();
    m[2 + 33..2 + 33 + 8].copy_from_slice(&dbid.to_be_bytes());
    m
}

/// `hsmd_setup_channel` with a funding txid of its own for channel `k`: `type | is_outbound(1) |
/// channel_value(8) | push_value(8) | funding_txid(32) | …`. (Two channels on one outpoint are
/// accepted by VLS, but its node then cannot be restored: "tracker not found for point".)
fn with_funding_txid(msg: &[u8], k: u64) -> Vec<u8> {
    let mut m = msg.to_vec();
    m[2 + 1 + 8 + 8..2 + 1 + 8 + 8 + 8].copy_from_slice(&k.to_be_bytes());
    m
}

/// A signer data dir holding `channels` channels.
fn prepare(trace: &Trace, seed: [u8; 32], clock: u64, channels: u64, dir: &TempDir) {
    let key = bin("sphinx-key").expect("sphinx-key binary");
    init_signer(&key, &dir.join("signer"), seed).expect("init");
    let cfg = replay::signer::replay_config(clock, PolicyConfig::default());
    let mut signer = Signer::open(seed, &dir.join("signer/state"), &cfg).expect("open the store");
    let find = |t: u16| trace.exchanges.iter().find(|e| e.msg_type == t).expect("request in the trace");
    let (init, new, setup) = (find(hsmd::HSMD_INIT), find(30), find(31));
    let mut seq = 0u16;
    let mut call = |peer_id: [u8; 33], dbid: u64, message: Vec<u8>| {
        seq = seq.wrapping_add(1);
        signer.handle(&serial::Request { seq, peer_id, dbid, message }).expect("accepted");
    };
    call([0; 33], 0, init.request.clone());
    let peer = setup.ctx.client_context().peer_id;
    for k in 1..=channels {
        call([0; 33], 0, with_body_dbid(&new.request, k));
        call(peer, k, with_funding_txid(&translate_request(&setup.request), k));
    }
}

/// One restart: (ready time, peak RSS in KiB).
fn restart(init: &[u8], clock: u64, dir: &TempDir) -> (Duration, u64) {
    let listen = format!("127.0.0.1:{}", free_port().expect("port"));
    let log = dir.join("broker.log");
    let _ = std::fs::remove_dir_all(dir.join("broker"));
    let opts = SpawnOptions { output: BrokerOutput::File(log.clone()), ..SpawnOptions::default() };
    let envs = broker_envs(&dir.join("broker"), &listen);
    let mut ld = FakeLightningd::spawn_with(bin("sphinx-broker").expect("broker"), Vec::<String>::new(), envs, opts)
        .expect("broker");
    let init = init.to_vec();
    let waiter = std::thread::spawn(move || {
        let r = ld.root_call(&init);
        (ld, r, Instant::now())
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tail(&log, 20000).contains("waiting for the signer") {
        assert!(Instant::now() < deadline, "broker never waited for a signer");
        std::thread::sleep(Duration::from_millis(1));
    }
    let t0 = Instant::now();
    let key = bin("sphinx-key").expect("sphinx-key binary");
    let signer =
        SignerProcess::start(&key, &dir.join("signer"), &listen, clock, &dir.join("signer.log"), &[]).expect("signer");
    let (ld, reply, t1) = waiter.join().expect("lightningd thread");
    reply.unwrap_or_else(|e| panic!("init: {e}\n{}", signer.log_tail(3000)));
    let pid = signer.id().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    drop(signer);
    let _ = ld.shutdown();
    (t1 - t0, hwm)
}

fn median<T: Copy + PartialOrd>(v: &mut [T]) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn main() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/traces/open-pay-close/bob.jsonl");
    let trace = Trace::load(&path).expect("trace");
    let seed = seed_for_path(&path).expect("seed");
    let clock = scenario_for_path(&path).expect("scenario").fixed_clock();
    let init = trace.exchanges.iter().find(|e| e.msg_type == hsmd::HSMD_INIT).expect("init").request.clone();
    println!("signer restart to ready (process start -> lightningd has the init reply), {ROUNDS} rounds each");
    println!("{:>9} {:>10} {:>12} {:>14}", "channels", "state KiB", "ready ms p50", "peak RSS MiB");
    let mut rows = vec![];
    for n in CHANNELS {
        let dir = TempDir::new("bench-startup").expect("temp dir");
        prepare(&trace, seed, clock, n, &dir);
        let state_kib = std::fs::metadata(dir.join("signer/state/redb")).map(|m| m.len() / 1024).unwrap_or(0);
        let (mut ready, mut rss) = (vec![], vec![]);
        for _ in 0..ROUNDS {
            let (t, kib) = restart(&init, clock, &dir);
            ready.push(t.as_secs_f64() * 1e3);
            rss.push(kib as f64 / 1024.0);
        }
        let (r, m) = (median(&mut ready), median(&mut rss));
        println!("{n:>9} {state_kib:>10} {r:>12.1} {m:>14.1}");
        rows.push((r, m));
    }
    println!("ratios 100 / 0 channels: ready {:.2}x, peak RSS {:.2}x", rows[1].0 / rows[0].0, rows[1].1 / rows[0].1);
    let (r, m) = rows[1];
    println!(
        "targets (100 channels): ready <= 1000 ms: {}; peak RSS <= 32 MiB: {}",
        if r <= 1000.0 { "met" } else { "NOT met" },
        if m <= 32.0 { "met" } else { "NOT met" }
    );
}
