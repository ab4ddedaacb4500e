//! Overhead of the remote path, measured against in-process VLS in the same run.
//!
//! Request mix: every request of the four recorded CLN v25.12.1 sessions (open, pay, get paid,
//! keysend, close; force close, sweeps, a node restart), in recorded order, except the two the
//! signer does not answer alone (`client_hsmfd` is answered by the broker; `hsmd_init` includes
//! waiting for the signer to connect). Each session is replayed `ROUNDS` times, from fresh state:
//!
//! - `in-process (memory)`: `sphinx_signer::Signer::in_memory`, the pure VLS cost;
//! - `in-process (redb)`:   `Signer::open` on a temp dir, VLS plus the device's durable commit;
//! - `end to end`:          fake lightningd ──fd──▶ sphinx-broker ──MQTT──▶ sphinx-key (redb) and back;
//! - `end to end, LSS on`:  the same with the broker's `[lss] url` set to a real `lssd` (redb
//!   backend, loopback; a fresh one per round): every state change is `Put` before the reply.
//!
//! Prints p50/p99 of each, the end-to-end minus in-process overhead per request (paired by
//! request), the latency LSS adds per request (LSS on minus LSS off, paired by request), and the
//! ratios. Run: `cargo bench -p sphinx-standin` (after building the binaries, `lssd` included).

use std::time::{Duration, Instant};

use sphinx_lss::lssd::Lssd;
use sphinx_signer::{Output, PolicyConfig, Signer};
use sphinx_standin::harness::{bin, broker_envs, free_port, init_signer, SignerProcess, TempDir};
use sphinx_standin::lightningd::{BrokerOutput, SpawnOptions};
use sphinx_standin::replay::{self, oracle_skips, translate_request, ReplayOptions};
use sphinx_standin::trace::{scenario_for_path, seed_for_path, Trace};
use sphinx_wire::{hsmd, serial, topics};

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

/// The signer's LSS link in process: the library's `SignerLink` over direct calls.
struct InProcess(Signer);

impl sphinx_lss::broker::SignerLink for InProcess {
    fn exchange(
        &mut self,
        topic: &'static str,
        payload: Vec<u8>,
        answers: &'static [&'static str],
    ) -> impl std::future::Future<Output = Result<(String, Vec<u8>), sphinx_lss::broker::LinkError>> + Send {
        let answer = self
            .0
            .on_message(topic, &payload)
            .into_iter()
            .find_map(|o| match o {
                Output::Publish { topic, payload } if answers.contains(&topic) || topic == topics::ERROR => {
                    Some((topic.to_string(), payload))
                }
                _ => None,
            })
            .ok_or_else(|| sphinx_lss::broker::LinkError(format!("no answer to {topic}")));
        async move { answer }
    }
}

/// In process with LSS on (redb device, a real lssd): per request index, whether it changed state
/// (went out as `lss-res`) and, if so, how long its `Put` took (gRPC round trip + lssd's commit);
/// and the time of a `Get` of one missing key after each `Put` (a gRPC round trip that writes
/// nothing: the `Put` minus it is lssd's durable commit).
type InProcessLss = (Vec<(usize, Option<Duration>)>, Vec<Duration>);
fn in_process_lss(trace: &Trace, seed: [u8; 32], cfg: &sphinx_signer::SignerConfig) -> InProcessLss {
    let lssd = Lssd::start_temp("bench-inproc").expect("lssd");
    let dir = TempDir::new("bench-lss").expect("temp dir");
    let mut dev = InProcess(Signer::open(seed, dir.path(), cfg).expect("signer"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let lss = sphinx_lss::broker::LssBackend::new(&lssd.url(), Duration::from_secs(10)).await.expect("lss");
        let mut session = None;
        let mut probe = None;
        let (mut out, mut gets) = (Vec::new(), Vec::new());
        let mut seq: u16 = 0;
        for ex in &trace.exchanges {
            if oracle_skips(ex.msg_type) {
                continue;
            }
            let ctx = ex.ctx.client_context();
            let req =
                serial::Request { seq, peer_id: ctx.peer_id, dbid: ctx.dbid, message: translate_request(&ex.request) };
            seq = seq.wrapping_add(1);
            if ex.msg_type == hsmd::HSMD_INIT {
                // A node restart in the trace: the dance again, as the broker does on hello.
                let d = sphinx_lss::broker::init_dance(&lss, &mut dev, Some(req.encode())).await.expect("dance");
                session = Some(d.session);
                probe = Some(
                    sphinx_lss::LssClient::connect(&lssd.url(), Duration::from_secs(10), &d.identity)
                        .await
                        .expect("probe"),
                );
                continue;
            }
            let Some(s) = session.as_mut() else { continue };
            let mut put = None;
            for o in dev.0.on_message(topics::VLS, &req.encode()) {
                if let Output::Publish { topic, payload } = o {
                    if topic == topics::LSS_RES {
                        let t = Instant::now();
                        let (back, msg) = s.store(&payload).await.expect("put");
                        put = Some(t.elapsed());
                        dev.0.on_message(back, &msg);
                        if let Some(p) = probe.as_mut() {
                            let t = Instant::now();
                            p.get_prefix("~none", &[0; 32]).await.expect("get");
                            gets.push(t.elapsed());
                        }
                    }
                }
            }
            if measured(ex.msg_type) {
                out.push((ex.index, put));
            }
        }
        (out, gets)
    })
}

fn end_to_end(
    path: &std::path::Path,
    trace: &Trace,
    seed: [u8; 32],
    clock: u64,
    lss_url: Option<&str>,
) -> Vec<(usize, Duration)> {
    let d = TempDir::new("bench").expect("temp dir");
    let listen = format!("127.0.0.1:{}", free_port().expect("port"));
    let key = bin("sphinx-key").expect("sphinx-key binary");
    init_signer(&key, &d.join("signer"), seed).expect("init");
    let _signer =
        SignerProcess::start(&key, &d.join("signer"), &listen, clock, &d.join("signer.log"), &[]).expect("signer");
    let mut opts = ReplayOptions::new(bin("sphinx-broker").expect("sphinx-broker binary"));
    opts.envs = broker_envs(&d.join("broker"), &listen);
    if let Some(url) = lss_url {
        opts.envs.push(("SPHINX_BROKER_LSS_URL".into(), url.into()));
    }
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
    let (mut e2e_lss, mut lss_added) = (vec![], vec![]);
    // Split by whether the request changed state (a `Put` before its reply) or not.
    let (mut added_changed, mut added_other, mut puts, mut off_changed, mut on_changed) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut gets = vec![];
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
            let e = end_to_end(&path, &trace, seed, clock, None);
            // A fresh LSS per round: the same seed's state from the last round would be restored.
            let lssd = Lssd::start_temp("bench").expect("lssd (cargo build --release -p sphinx-lssd)");
            let l = end_to_end(&path, &trace, seed, clock, Some(&lssd.url()));
            drop(lssd);
            let base: std::collections::HashMap<usize, Duration> = r.iter().copied().collect();
            for (i, d) in &e {
                if let Some(b) = base.get(i) {
                    overhead.push(ms(*d) - ms(*b));
                }
            }
            let (changed, g) = in_process_lss(&trace, seed, &cfg);
            let changed: std::collections::HashMap<usize, Option<Duration>> = changed.into_iter().collect();
            gets.extend(g.iter().map(|d| ms(*d)));
            puts.extend(changed.values().flatten().map(|d| ms(*d)));
            let off: std::collections::HashMap<usize, Duration> = e.iter().copied().collect();
            for (i, d) in &l {
                if let Some(b) = off.get(i) {
                    let added = ms(*d) - ms(*b);
                    lss_added.push(added);
                    if matches!(changed.get(i), Some(Some(_))) {
                        added_changed.push(added);
                        off_changed.push(ms(*b));
                        on_changed.push(ms(*d));
                    } else {
                        added_other.push(added);
                    }
                }
            }
            e2e_lss.extend(l.iter().map(|x| ms(x.1)));
            mem.extend(m.iter().map(|x| ms(x.1)));
            redb.extend(r.iter().map(|x| ms(x.1)));
            e2e.extend(e.iter().map(|x| ms(x.1)));
        }
    }
    println!("request mix: {} requests per round from the 4 recorded sessions, {ROUNDS} rounds", mem.len() / ROUNDS);
    println!("{:<26} {:>8} {:>9} {:>9}", "path", "samples", "p50 ms", "p99 ms");
    let mut rows = vec![];
    for (label, v) in [
        ("in-process (memory)", &mut mem),
        ("in-process (redb)", &mut redb),
        ("end to end", &mut e2e),
        ("end to end, LSS on", &mut e2e_lss),
    ] {
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
    let (a50, a99) = (pct(&mut lss_added, 0.50), pct(&mut lss_added, 0.99));
    println!("{:<26} {:>8} {a50:>9.3} {a99:>9.3}", "LSS added (on - off)", lss_added.len());
    println!(
        "ratios: LSS on / LSS off (end to end) p50 {:.2}x p99 {:.2}x",
        rows[3].0 / rows[2].0,
        rows[3].1 / rows[2].1
    );
    println!("LSS on, by request: state-changing ones are Put before the reply; the others are not");
    println!("{:<34} {:>8} {:>9} {:>9}", "", "samples", "p50 ms", "p99 ms");
    let row = |label: &str, v: &mut Vec<f64>| {
        let (p50, p99) = if v.is_empty() { (f64::NAN, f64::NAN) } else { (pct(v, 0.50), pct(v, 0.99)) };
        println!("{label:<34} {:>8} {p50:>9.3} {p99:>9.3}", v.len());
        (p50, p99)
    };
    let (c50, _) = row("state-changing, LSS off", &mut off_changed);
    let (l50, _) = row("state-changing, LSS on", &mut on_changed);
    let (ac50, _) = row("state-changing, added (paired)", &mut added_changed);
    row("others, added (paired)", &mut added_other);
    row("in process: one Put (gRPC + lssd)", &mut puts);
    row("in process: one Get (gRPC only)", &mut gets);
    println!("ratio: state-changing LSS on / off p50 {:.2}x", l50 / c50);
    println!(
        "target: LSS adds <= 1 ms p50: {} over all requests, {} over state-changing ones ({ac50:.3} ms)",
        if a50 <= 1.0 { "met" } else { "NOT met" },
        if ac50 <= 1.0 { "met" } else { "NOT met" }
    );
}
