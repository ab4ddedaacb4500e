//! Overhead of the remote path, measured against in-process VLS in the same run.
//!
//! Request mix: every request of the four recorded CLN v25.12.1 sessions (open, pay, get paid,
//! keysend, close; force close, sweeps, a node restart), in recorded order, except the two the
//! signer does not answer alone (`client_hsmfd` is answered by the broker; `hsmd_init` includes
//! waiting for the signer to connect). Each session is replayed `ROUNDS` times, from fresh state:
//!
//! - `in-process (memory)`: `sphinx_signer::Signer::in_memory`, the pure VLS cost;
//! - `in-process (redb)`:   `Signer::open` on a temp dir, VLS plus the device's durable commit;
//! - `end to end`:          fake lightningd ──fd──▶ sphinx-broker ──MQTT──▶ sphinx-key (redb) and back.
//!
//! Prints p50/p99 of each, the end-to-end minus in-process overhead per request (paired by
//! request), and the ratios. Run: `cargo bench -p sphinx-standin` (after building the binaries).

use std::time::{Duration, Instant};

use sphinx_signer::{PolicyConfig, Signer};
use sphinx_standin::harness::{bin, broker_envs, free_port, init_signer, SignerProcess, TempDir};
use sphinx_standin::lightningd::{BrokerOutput, SpawnOptions};
use sphinx_standin::replay::{self, oracle_skips, translate_request, ReplayOptions};
use sphinx_standin::trace::{scenario_for_path, seed_for_path, Trace};
use sphinx_wire::{hsmd, serial};

const ROUNDS: usize = 5;
const TRACES: [&str; 4] = ["open-pay-close/alice", "open-pay-close/bob", "force-close/alice", "force-close/bob"];

fn measured(msg_type: u16) -> bool {
    !oracle_skips(msg_type) && msg_type != hsmd::HSMD_INIT
}

/// Per-request in-process times, keyed by trace request index.
fn in_process(trace: &Trace, mut signer: Signer) -> Vec<(usize, Duration)> {
    let mut out = Vec::new();
    let mut seq: u16 = 0;
    for ex in &trace.exchanges {
        if oracle_skips(ex.msg_type) {
            continue;
        }
        let ctx = ex.ctx.client_context();
        let req =
            serial::Request { seq, peer_id: ctx.peer_id, dbid: ctx.dbid, message: translate_request(&ex.request) };
        seq = seq.wrapping_add(1);
        let t = Instant::now();
        let r = signer.handle(&req);
        let dt = t.elapsed();
        if r.is_ok() && measured(ex.msg_type) {
            out.push((ex.index, dt));
        }
    }
    out
}

fn end_to_end(path: &std::path::Path, trace: &Trace, seed: [u8; 32], clock: u64) -> Vec<(usize, Duration)> {
    let d = TempDir::new("bench").expect("temp dir");
    let listen = format!("127.0.0.1:{}", free_port().expect("port"));
    let key = bin("sphinx-key").expect("sphinx-key binary");
    init_signer(&key, &d.join("signer"), seed).expect("init");
    let _signer =
        SignerProcess::start(&key, &d.join("signer"), &listen, clock, &d.join("signer.log"), &[]).expect("signer");
    let mut opts = ReplayOptions::new(bin("sphinx-broker").expect("sphinx-broker binary"));
    opts.envs = broker_envs(&d.join("broker"), &listen);
    opts.spawn = SpawnOptions { output: BrokerOutput::File(d.join("broker.log")), ..SpawnOptions::default() };
    let report = replay::replay(trace, &opts, &mut |_| {}).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    report.steps.iter().filter(|s| s.reply.is_ok() && measured(s.recorded_type)).map(|s| (s.index, s.latency)).collect()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/traces");
    let (mut mem, mut redb, mut e2e, mut overhead) = (vec![], vec![], vec![], vec![]);
    for name in TRACES {
        let path = root.join(format!("{name}.jsonl"));
        let trace = Trace::load(&path).expect("trace");
        let seed = seed_for_path(&path).expect("seed");
        let clock = scenario_for_path(&path).expect("scenario").fixed_clock();
        let cfg = replay::signer::replay_config(clock, PolicyConfig::default());
        for _ in 0..ROUNDS {
            let m = in_process(&trace, Signer::in_memory(seed, &cfg).expect("signer"));
            let dir = TempDir::new("bench-redb").expect("temp dir");
            let r = in_process(&trace, Signer::open(seed, dir.path(), &cfg).expect("signer"));
            let e = end_to_end(&path, &trace, seed, clock);
            let base: std::collections::HashMap<usize, Duration> = r.iter().copied().collect();
            for (i, d) in &e {
                if let Some(b) = base.get(i) {
                    overhead.push(ms(*d) - ms(*b));
                }
            }
            mem.extend(m.iter().map(|x| ms(x.1)));
            redb.extend(r.iter().map(|x| ms(x.1)));
            e2e.extend(e.iter().map(|x| ms(x.1)));
        }
    }
    println!("request mix: {} requests per round from the 4 recorded sessions, {ROUNDS} rounds", mem.len() / ROUNDS);
    println!("{:<26} {:>8} {:>9} {:>9}", "path", "samples", "p50 ms", "p99 ms");
    let mut rows = vec![];
    for (label, v) in [("in-process (memory)", &mut mem), ("in-process (redb)", &mut redb), ("end to end", &mut e2e)] {
        let (p50, p99) = (pct(v, 0.50), pct(v, 0.99));
        println!("{label:<26} {:>8} {p50:>9.3} {p99:>9.3}", v.len());
        rows.push((p50, p99));
    }
    let (o50, o99) = (pct(&mut overhead, 0.50), pct(&mut overhead, 0.99));
    println!("{:<26} {:>8} {o50:>9.3} {o99:>9.3}", "overhead (e2e - redb)", overhead.len());
    println!(
        "ratios: end to end / in-process (memory) p50 {:.2}x p99 {:.2}x; / in-process (redb) p50 {:.2}x p99 {:.2}x",
        rows[2].0 / rows[0].0,
        rows[2].1 / rows[0].1,
        rows[2].0 / rows[1].0,
        rows[2].1 / rows[1].1
    );
    println!(
        "target: overhead <= 0.5 ms p50 and <= 2 ms p99: {}",
        if o50 <= 0.5 && o99 <= 2.0 { "met" } else { "NOT met" }
    );
}
