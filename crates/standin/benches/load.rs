//! Throughput and latency under concurrent channels (issue 11 items 1, 2 and 5), against the same
//! request mix in process, in the same run.
//!
//! Traffic: the counterparty simulator (`sphinx_standin::chansim`) opens `N` channels (own peer
//! id, dbid and funding outpoint each) and makes 10 payments on each, peer to us, with CLN's
//! channeld requests of a payee in the recorded order (11 per payment: 2× validate_commitment_tx,
//! 2× revoke_commitment_tx, 2× sign_remote_commitment_tx, 1× sign_remote_htlc_tx, 2×
//! validate_revocation, 2× sign_penalty_to_us). The requests are generated once, against an in-memory signer with the
//! recorded session's seed and a fixed clock; the signer is deterministic, so the same requests
//! are valid for every run below. Only the payments are timed (the opens are setup).
//!
//! For each N in 1, 8, 32, 64 (fresh state each):
//! - `in-process (memory)`: `Signer::in_memory`, VLS alone, the channels' requests interleaved
//!   round robin (one signer answers one request at a time, as `sphinx-key` does);
//! - `in-process (redb)`: `Signer::open`, VLS plus the device's durable commit (fsync), same order;
//! - `in-process (redb gc)` / `in-proc gc 2 threads`: the same with group commit (rounds of one
//!   request per channel through `Signer::handle_batch`), signing on one thread / on two
//!   (`Signer::set_sign_threads`); the `end to end` rows use `sphinx-key`'s default (one thread;
//!   `SPHINX_KEY_SIGN_THREADS` in the bench's environment overrides it), `e2e, 2 sign threads`
//!   two;
//! - `end to end`: `fake-lightningd` spawns `sphinx-broker` (real fd passing), one client
//!   connection per channel (a channeld each), N threads sending concurrently, each waiting for
//!   its reply before the next request (as channeld does) → embedded MQTT → `sphinx-key run`
//!   (redb) and back.
//!
//! Prints requests/s, p50/p99 per N and path, the signer's peak RSS (VmHWM) end to end, the ratios end to end / in process (redb), CPU time
//! per request of the broker, the signer and the client threads (from /proc), and per request type
//! the p50 of VLS alone, of VLS + commit, and end to end at N = 1. What the signer's time goes to
//! (fdatasync vs CPU) is measured with `perf trace -s` / `perf record` on its pid: see
//! docs/benchmarks.md.
//!
//! At N = 32 (quiet) the saturating end-to-end load also runs with LSS backup on (`e2e, LSS
//! on`: the broker's `[lss] url` set to a real `lssd`, redb backend, loopback).
//!
//! At N = 32 the end-to-end path also runs paced (`Load::Paced`): each channel starts a payment
//! on a schedule so that 2,000 (then 3,000) requests/s are offered in all, its requests back to
//! back; latency counts from the scheduled start, so a signer that falls behind shows it.
//!
//! Run: `cargo bench -p sphinx-standin --bench load` (after `cargo build --release --workspace
//! --bins`). `CI=true` or `LOAD_QUICK=1`: 2 payments per channel instead of 10. `LOAD_NS=32`: only
//! that N (e.g. to profile one load).

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use sphinx_lss::lssd::Lssd;
use sphinx_signer::{PolicyConfig, Signer, SignerConfig};
use sphinx_standin::chansim::{Call, ChannelSim, Conn, InProcess, Template};
use sphinx_standin::harness::{bin, broker_envs, free_port, init_signer, SignerProcess, TempDir};
use sphinx_standin::lightningd::{BrokerOutput, FakeLightningd, SpawnOptions};
use sphinx_standin::replay;
use sphinx_standin::trace::{scenario_for_path, seed_for_path, Trace};
use sphinx_wire::{hsmd, serial, ClientContext};

const NS: [usize; 4] = [1, 8, 32, 64];
const SIM_SEED: [u8; 32] = [0x51; 32];
/// 2,000 sat per payment: above the dust limit, so every payment's HTLC is an output.
const AMOUNT_MSAT: u64 = 2_000_000;
/// channeld's permissions in the recorded sessions.
const CHANNELD_PERMISSIONS: u64 = 447;

/// One channel's traffic: its open (setup, untimed) and its payments' requests (timed).
struct Channel {
    peer_id: [u8; 33],
    dbid: u64,
    open: Vec<Call>,
    pay: Vec<Vec<u8>>,
}

fn generate(trace: &Trace, seed: [u8; 32], cfg: &SignerConfig, init: &[u8], n: usize, payments: usize) -> Vec<Channel> {
    let template = Template::from_trace(trace).expect("template");
    let mut signer = Signer::in_memory(seed, cfg).expect("signer");
    signer.handle(&serial::Request { seq: 0, peer_id: [0; 33], dbid: 0, message: init.to_vec() }).expect("init");
    let mut hsmd = InProcess { signer: &mut signer, seq: 1 };
    let mut sims: Vec<ChannelSim> =
        (1..=n as u64).map(|dbid| ChannelSim::new(template.clone(), SIM_SEED, dbid)).collect();
    let mut opened = vec![];
    for sim in &mut sims {
        sim.open(&mut hsmd).unwrap_or_else(|e| panic!("open dbid {}: {e}", sim.dbid));
        opened.push(sim.log.len());
    }
    for _ in 0..payments {
        for sim in &mut sims {
            sim.pay(&mut hsmd, AMOUNT_MSAT).unwrap_or_else(|e| panic!("payment on dbid {}: {e}", sim.dbid));
        }
    }
    sims.into_iter()
        .zip(opened)
        .map(|(sim, k)| {
            assert!(sim.log[k..].iter().all(|c| c.conn == Conn::Channel));
            Channel {
                peer_id: sim.peer_id,
                dbid: sim.dbid,
                open: sim.log[..k].to_vec(),
                pay: sim.log[k..].iter().map(|c| c.request.clone()).collect(),
            }
        })
        .collect()
}

/// Timed requests of one run: (message type, latency), and the wall time of the timed part.
#[derive(Default)]
struct Run {
    samples: Vec<(u16, Duration)>,
    wall: Duration,
    /// CPU seconds (user + system) during the timed part: broker, signer, client.
    cpu: Option<(f64, f64, f64)>,
    /// The signer's peak RSS (VmHWM), MiB, at the end of the run.
    signer_rss: Option<f64>,
}

fn in_process(mut signer: Signer, init: &[u8], channels: &[Channel]) -> Run {
    let mut seq: u16 = 0;
    let mut call = |signer: &mut Signer, peer_id: [u8; 33], dbid: u64, message: &[u8]| {
        seq = seq.wrapping_add(1);
        signer.handle(&serial::Request { seq, peer_id, dbid, message: message.to_vec() })
    };
    call(&mut signer, [0; 33], 0, init).expect("init");
    for ch in channels {
        for c in &ch.open {
            let (p, d) = if c.conn == Conn::Root { ([0; 33], 0) } else { (ch.peer_id, ch.dbid) };
            call(&mut signer, p, d, &c.request).unwrap_or_else(|e| panic!("open dbid {}: {e}", ch.dbid));
        }
    }
    let mut run = Run::default();
    let longest = channels.iter().map(|c| c.pay.len()).max().unwrap_or(0);
    let t0 = Instant::now();
    for k in 0..longest {
        for ch in channels {
            let Some(m) = ch.pay.get(k) else { continue };
            let t = Instant::now();
            call(&mut signer, ch.peer_id, ch.dbid, m).unwrap_or_else(|e| panic!("dbid {} request {k}: {e}", ch.dbid));
            run.samples.push((hsmd::msg_type(m).unwrap_or(0), t.elapsed()));
        }
    }
    run.wall = t0.elapsed();
    run
}

/// `sphinx-key run --batch-max` of the `end to end` rows (its default).
const GROUP_COMMIT: u16 = 32;

/// As [`in_process`] on redb, but each round of the channels' requests (one request of each, as
/// N concurrent channelds have them outstanding) goes through `Signer::handle_batch` in batches
/// of at most [`GROUP_COMMIT`]: the group commit's bound in process. A request's latency is its
/// batch's.
fn in_process_batched(mut signer: Signer, init: &[u8], channels: &[Channel]) -> Run {
    let mut seq: u16 = 0;
    let mut req = |peer_id: [u8; 33], dbid: u64, message: &[u8]| {
        seq = seq.wrapping_add(1);
        serial::Request { seq, peer_id, dbid, message: message.to_vec() }
    };
    signer.handle(&req([0; 33], 0, init)).expect("init");
    for ch in channels {
        for c in &ch.open {
            let (p, d) = if c.conn == Conn::Root { ([0; 33], 0) } else { (ch.peer_id, ch.dbid) };
            signer.handle(&req(p, d, &c.request)).unwrap_or_else(|e| panic!("open dbid {}: {e}", ch.dbid));
        }
    }
    let mut run = Run::default();
    let longest = channels.iter().map(|c| c.pay.len()).max().unwrap_or(0);
    let t0 = Instant::now();
    for k in 0..longest {
        let round: Vec<(u16, serial::Request)> = channels
            .iter()
            .filter_map(|ch| ch.pay.get(k).map(|m| (hsmd::msg_type(m).unwrap_or(0), req(ch.peer_id, ch.dbid, m))))
            .collect();
        for batch in round.chunks(usize::from(GROUP_COMMIT)) {
            let reqs: Vec<serial::Request> = batch.iter().map(|(_, r)| r.clone()).collect();
            let t = Instant::now();
            for (i, r) in signer.handle_batch(&reqs).into_iter().enumerate() {
                r.unwrap_or_else(|e| panic!("request {k} of batch #{i}: {e}"));
            }
            let dt = t.elapsed();
            run.samples.extend(batch.iter().map(|(t, _)| (*t, dt)));
        }
    }
    run.wall = t0.elapsed();
    run
}

/// A process's peak resident set (VmHWM), MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 =
        s.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let v = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (v(11) + v(12)) / tick
}

/// Offered load of the paced pass at N = 32 (issue 11's throughput target, as a rate).
const PACED_RPS: f64 = 2000.0;
/// A second paced rate at N = 32: how the tail grows nearer the saturated throughput.
const PACED_RPS_HIGH: f64 = 3000.0;

/// How the end-to-end clients send.
#[derive(Clone, Copy)]
enum Load {
    /// Each channel sends its next request as soon as it has the reply (closed loop: N
    /// requests always outstanding, the most the signer can be asked).
    Saturate,
    /// Each channel starts a payment every `interval` (channels evenly staggered), its requests
    /// back to back as channeld sends them. A payment that starts late counts its lateness in
    /// its first request's latency (no coordinated omission).
    Paced { interval: Duration },
}

/// How one end-to-end pass runs (the default: the device's defaults, saturating, LSS off).
#[derive(Clone, Copy)]
struct E2e<'a> {
    /// `sphinx-key run --batch-max` (1: group commit off).
    batch_max: u16,
    load: Load,
    /// The broker's `[lss] url` (LSS backup on).
    lss: Option<&'a str>,
    /// `sphinx-key run --sign-threads` (`None`: its default, or the bench's environment).
    sign_threads: Option<u16>,
}

impl Default for E2e<'_> {
    fn default() -> Self {
        E2e { batch_max: GROUP_COMMIT, load: Load::Saturate, lss: None, sign_threads: None }
    }
}

fn end_to_end(init: &[u8], channels: &[Channel], seed: [u8; 32], clock: u64, how: E2e) -> Run {
    let E2e { batch_max, load, lss, sign_threads } = how;
    let d = TempDir::new("bench-load").expect("temp dir");
    let listen = format!("127.0.0.1:{}", free_port().expect("port"));
    let key = bin("sphinx-key").expect("sphinx-key binary");
    init_signer(&key, &d.join("signer"), seed).expect("init");
    let opts = SpawnOptions { output: BrokerOutput::File(d.join("broker.log")), ..SpawnOptions::default() };
    let mut envs = broker_envs(&d.join("broker"), &listen);
    if let Some(url) = lss {
        envs.push(("SPHINX_BROKER_LSS_URL".into(), url.into()));
    }
    let mut ld = FakeLightningd::spawn_with(
        bin("sphinx-broker").expect("sphinx-broker binary"),
        Vec::<String>::new(),
        envs,
        opts,
    )
    .expect("broker");
    let (batch, threads) = (batch_max.to_string(), sign_threads.map(|t| t.to_string()));
    let mut env = vec![("SPHINX_KEY_BATCH_MAX", batch.as_str())];
    if let Some(t) = &threads {
        env.push(("SPHINX_KEY_SIGN_THREADS", t.as_str()));
    }
    let signer =
        SignerProcess::start(&key, &d.join("signer"), &listen, clock, &d.join("signer.log"), &env).expect("signer");
    ld.root_call(init).unwrap_or_else(|e| panic!("init: {e}\n{}", signer.log_tail(3000)));
    let mut conns = vec![];
    for ch in channels {
        let ctx = ClientContext { peer_id: ch.peer_id, dbid: ch.dbid, permissions: CHANNELD_PERMISSIONS };
        let mut conn = ld.new_client(&ctx).expect("client connection");
        for c in &ch.open {
            let r = match c.conn {
                Conn::Root => ld.root_call(&c.request),
                Conn::Channel => conn.call(&c.request),
            };
            r.unwrap_or_else(|e| panic!("open dbid {}: {e}\n{}", ch.dbid, signer.log_tail(3000)));
        }
        conns.push(conn);
    }
    let (bpid, spid) = (ld.pid(), signer.id().expect("signer pid"));
    let barrier = Arc::new(Barrier::new(channels.len() + 1));
    let n = channels.len();
    let threads: Vec<_> = channels
        .iter()
        .zip(conns)
        .enumerate()
        .map(|(i, (ch, mut conn))| {
            let reqs = ch.pay.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let mut out = Vec::with_capacity(reqs.len());
                for (k, m) in reqs.iter().enumerate() {
                    let mut t = Instant::now();
                    if let Load::Paced { interval } = load {
                        if k % PAYMENT_MIX.len() == 0 {
                            // Pacing of the offered load (a schedule, not a synchronisation).
                            let payment = (k / PAYMENT_MIX.len()) as u32;
                            let due = start + interval * payment + interval.mul_f64(i as f64 / n as f64);
                            std::thread::sleep(due.saturating_duration_since(t));
                            t = due;
                        }
                    }
                    let r = conn.call(m);
                    let dt = t.elapsed();
                    if let Err(e) = r {
                        return Err(format!("dbid {}: {e}", conn.ctx().dbid));
                    }
                    out.push((hsmd::msg_type(m).unwrap_or(0), dt));
                }
                Ok(out)
            })
        })
        .collect();
    let (b0, s0, c0) = (cpu_seconds(bpid), cpu_seconds(spid), cpu_seconds(std::process::id()));
    let t0 = Instant::now();
    barrier.wait();
    let mut run = Run::default();
    for t in threads {
        match t.join().expect("client thread") {
            Ok(v) => run.samples.extend(v),
            Err(e) => panic!("{e}\n{}", signer.log_tail(3000)),
        }
    }
    run.wall = t0.elapsed();
    run.cpu = Some((cpu_seconds(bpid) - b0, cpu_seconds(spid) - s0, cpu_seconds(std::process::id()) - c0));
    run.signer_rss = peak_rss_mib(spid);
    drop(signer);
    let _ = ld.shutdown();
    run
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (req/s, p50 ms, p99 ms)
fn summary(r: &Run) -> (f64, f64, f64) {
    let mut v: Vec<f64> = r.samples.iter().map(|x| ms(x.1)).collect();
    (r.samples.len() as f64 / r.wall.as_secs_f64(), pct(&mut v, 0.5), pct(&mut v, 0.99))
}

fn by_type(r: &Run) -> BTreeMap<u16, f64> {
    let mut m: BTreeMap<u16, Vec<f64>> = BTreeMap::new();
    for (t, d) in &r.samples {
        m.entry(*t).or_default().push(ms(*d));
    }
    m.into_iter().map(|(t, mut v)| (t, pct(&mut v, 0.5))).collect()
}

/// Other processes' durable writes on the signer's disk, as on a real node host (CLN's sqlite
/// database, bitcoind): `WRITERS` threads, each appending `BLOCK` bytes and `fdatasync`ing it,
/// then pausing `PAUSE` (a fixed pacing of the load, not a synchronisation). Stopped and joined on drop;
/// reports how many fdatasyncs it made and their mean latency (how busy the disk was).
struct DiskNoise {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Duration)>>,
    _dir: TempDir,
}

impl DiskNoise {
    const WRITERS: usize = 4;
    const BLOCK: usize = 64 * 1024;
    const PAUSE: Duration = Duration::from_millis(1);

    fn start() -> DiskNoise {
        use std::io::{Seek, Write};
        let dir = TempDir::new("bench-load-noise").expect("temp dir");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..Self::WRITERS)
            .map(|i| {
                let (stop, path) = (stop.clone(), dir.join(&format!("noise-{i}")));
                std::thread::spawn(move || {
                    let mut f = std::fs::File::create(path).expect("noise file");
                    let block = vec![0x5a_u8; Self::BLOCK];
                    let (mut n, mut spent, mut len) = (0u64, Duration::ZERO, 0usize);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if len >= 4 << 20 {
                            let _ = f.rewind();
                            len = 0;
                        }
                        let t = Instant::now();
                        if f.write_all(&block).and_then(|()| f.sync_data()).is_err() {
                            break;
                        }
                        spent += t.elapsed();
                        n += 1;
                        len += block.len();
                        std::thread::sleep(Self::PAUSE);
                    }
                    (n, spent)
                })
            })
            .collect();
        DiskNoise { stop, threads, _dir: dir }
    }

    /// Stops the writers: (fdatasyncs, mean latency ms).
    fn finish(mut self) -> (u64, f64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut n, mut spent) = (0, Duration::ZERO);
        for t in self.threads.drain(..) {
            if let Ok((k, d)) = t.join() {
                n += k;
                spent += d;
            }
        }
        (n, if n > 0 { ms(spent) / n as f64 } else { f64::NAN })
    }
}

fn main() {
    let quick = std::env::var("CI").is_ok_and(|v| v == "true") || std::env::var("LOAD_QUICK").is_ok();
    let payments = if quick { 2 } else { 10 };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/traces/open-pay-close/bob.jsonl");
    let trace = Trace::load(&path).expect("trace");
    let seed = seed_for_path(&path).expect("seed");
    let clock = scenario_for_path(&path).expect("scenario").fixed_clock();
    let cfg = replay::signer::replay_config(clock, PolicyConfig::default());
    let init = trace.exchanges.iter().find(|e| e.msg_type == hsmd::HSMD_INIT).expect("init").request.clone();
    let nmax = *NS.iter().max().unwrap_or(&1);
    let t = Instant::now();
    let all = generate(&trace, seed, &cfg, &init, nmax, payments);
    println!(
        "traffic: {nmax} channels x {payments} payments x {} requests, generated in {:.1} s (chansim, default policy)",
        all[0].pay.len() / payments,
        t.elapsed().as_secs_f64()
    );
    println!(
        "{:>3} {:<20} {:>7} {:>9} {:>8} {:>8}   {:>28} {:>8}",
        "N", "path", "reqs", "req/s", "p50 ms", "p99 ms", "CPU ms/req broker signer client", "RSS MiB"
    );
    let mut per_type: Vec<(bool, [BTreeMap<u16, f64>; 3])> = vec![];
    let mut ratios = vec![];
    // LOAD_NS=1,32: only these N (profiling one load).
    let ns: Vec<usize> = std::env::var("LOAD_NS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).filter(|n| NS.contains(n)).collect())
        .unwrap_or_else(|| NS.to_vec());
    // The same runs again with other processes fsyncing on the disk (`DiskNoise`), at N = 1 and
    // 32. LOAD_BUSY=0: quiet runs only; LOAD_BUSY=only: busy runs only.
    let busy = std::env::var("LOAD_BUSY").unwrap_or_default();
    let mut passes: Vec<(bool, usize)> = vec![];
    if busy != "only" {
        passes.extend(ns.iter().map(|&n| (false, n)));
    }
    if busy != "0" {
        passes.extend(ns.iter().filter(|&&n| n == 1 || n == 32).map(|&n| (true, n)));
    }
    for (busy, n) in passes {
        let chans = &all[..n];
        let noise = busy.then(DiskNoise::start);
        if busy {
            println!(
                "--- busy disk: {} other writers, each {} KiB + fdatasync, {} ms apart ---",
                DiskNoise::WRITERS,
                DiskNoise::BLOCK / 1024,
                DiskNoise::PAUSE.as_millis()
            );
        }
        let mem = in_process(Signer::in_memory(seed, &cfg).expect("signer"), &init, chans);
        let dir = TempDir::new("bench-load-redb").expect("temp dir");
        let redb = in_process(Signer::open(seed, dir.path(), &cfg).expect("signer"), &init, chans);
        drop(dir);
        let dir = TempDir::new("bench-load-redb-batch").expect("temp dir");
        let redb_gc = in_process_batched(Signer::open(seed, dir.path(), &cfg).expect("signer"), &init, chans);
        drop(dir);
        let dir = TempDir::new("bench-load-redb-batch-2").expect("temp dir");
        let mut two = Signer::open(seed, dir.path(), &cfg).expect("signer");
        two.set_sign_threads(2);
        let redb_gc2 = in_process_batched(two, &init, chans);
        drop(dir);
        let e2e_one = end_to_end(&init, chans, seed, clock, E2e { batch_max: 1, ..E2e::default() });
        let e2e = end_to_end(&init, chans, seed, clock, E2e::default());
        // Against the device's default (one signing thread), two, same run.
        let e2e_t2 = (n > 1 && !busy)
            .then(|| end_to_end(&init, chans, seed, clock, E2e { sign_threads: Some(2), ..E2e::default() }));
        // At N = 32 also the target rate offered, not the most the clients can push.
        let paced_at = |rps: f64| {
            let interval = Duration::from_secs_f64(n as f64 * PAYMENT_MIX.len() as f64 / rps);
            (n == 32).then(|| {
                end_to_end(&init, chans, seed, clock, E2e { load: Load::Paced { interval }, ..E2e::default() })
            })
        };
        let (paced, paced_high) = (paced_at(PACED_RPS), paced_at(PACED_RPS_HIGH));
        // At N = 32, quiet disk: the same saturating load with LSS backup on (a real lssd).
        let with_lss = (n == 32 && !busy).then(|| {
            let lssd = Lssd::start_temp("bench-load-lss").expect("lssd (cargo build --release -p sphinx-lssd)");
            end_to_end(&init, chans, seed, clock, E2e { lss: Some(&lssd.url()), ..E2e::default() })
        });
        let paced_label = format!("e2e, {PACED_RPS:.0}/s offered");
        let paced_high_label = format!("e2e, {PACED_RPS_HIGH:.0}/s offered");
        let mut rows = vec![
            ("in-process (memory)", &mem),
            ("in-process (redb)", &redb),
            ("in-process (redb gc)", &redb_gc),
            ("in-proc gc 2 threads", &redb_gc2),
            ("e2e, gc off", &e2e_one),
            ("end to end", &e2e),
        ];
        if let Some(t) = &e2e_t2 {
            rows.push(("e2e, 2 sign threads", t));
        }
        if let Some(p) = &paced {
            rows.push((paced_label.as_str(), p));
        }
        if let Some(p) = &paced_high {
            rows.push((paced_high_label.as_str(), p));
        }
        if let Some(l) = &with_lss {
            rows.push(("e2e, LSS on", l));
        }
        for (label, r) in rows {
            let (rps, p50, p99) = summary(r);
            let cpu = r.cpu.map(|(b, s, c)| {
                let k = 1e3 / r.samples.len() as f64;
                format!("{:>9.3} {:>6.3} {:>6.3}", b * k, s * k, c * k)
            });
            let rss = r.signer_rss.map(|m| format!("{m:>8.1}"));
            println!(
                "{n:>3} {label:<20} {:>7} {rps:>9.0} {p50:>8.3} {p99:>8.3}   {:>28} {}",
                r.samples.len(),
                cpu.unwrap_or_default(),
                rss.unwrap_or_default()
            );
        }
        let ((e, e50, e99), (i, _, _), (im, _, _)) = (summary(&e2e), summary(&redb), summary(&mem));
        println!("{n:>3} ratio end to end / in-process throughput: (redb) {:.2}, (memory) {:.2}", e / i, e / im);
        let ((g, _, _), (o, _, _)) = (summary(&redb_gc), summary(&e2e_one));
        println!("{n:>3} group commit on / off throughput: end to end {:.2}, in process (redb) {:.2}", e / o, g / i);
        if let Some(noise) = noise {
            let (k, mean) = noise.finish();
            println!("{n:>3} the other writers' fdatasyncs meanwhile: {k}, mean {mean:.3} ms");
        } else {
            let paced = paced.as_ref().map(|p| {
                let (achieved, _, p99) = summary(p);
                (achieved, p99)
            });
            if let Some(t) = &e2e_t2 {
                let (g2, _, _) = summary(&redb_gc2);
                println!(
                    "{n:>3} signing threads 2 / 1 throughput: end to end {:.2}; in process (redb gc) {:.2}",
                    summary(t).0 / e,
                    g2 / g
                );
            }
            if let Some(l) = &with_lss {
                println!("{n:>3} LSS on / off throughput (end to end): {:.2}", summary(l).0 / e);
            }
            ratios.push((n, e, e50, e99, e / i, paced));
        }
        if n == 1 {
            per_type.push((busy, [by_type(&mem), by_type(&redb), by_type(&e2e)]));
        }
    }
    for (busy, [m, r, e]) in per_type {
        // No subtraction: the in-process commits run back to back, and a back-to-back fdatasync
        // costs more than a spaced one on a shared disk (docs/benchmarks.md), so the redb column is
        // an upper bound of VLS + commit, not the signer's cost inside the end-to-end path.
        println!(
            "per request type at N = 1{}, p50 ms: VLS alone (memory), VLS + commit back to back (redb), end to end",
            if busy { ", busy disk" } else { "" }
        );
        let (mut sm, mut se) = (0.0, 0.0);
        for (t, vm) in &m {
            let (vr, ve) = (r.get(t).copied().unwrap_or(f64::NAN), e.get(t).copied().unwrap_or(f64::NAN));
            let name = vls_protocol_name(*t);
            println!("  {t:>3} {name:<28} {vm:>8.3} {vr:>8.3} {ve:>8.3}");
        }
        // A payment's requests one after another (the payee's channeld waits for each).
        for t in PAYMENT_MIX {
            sm += m.get(&t).copied().unwrap_or(f64::NAN);
            se += e.get(&t).copied().unwrap_or(f64::NAN);
        }
        println!("  one payment's {} requests in sequence (sum of p50): VLS alone {sm:.2} ms, end to end {se:.2} ms, added {:.2} ms", PAYMENT_MIX.len(), se - sm);
    }
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    if let Some(&(_, rps, _, p99, ratio, paced)) = ratios.iter().find(|r| r.0 == 32) {
        println!(
            "targets at N = 32: >= 2000 req/s: {} ({rps:.0}); p99 <= 5 ms: {} ({p99:.2}, saturated); ratio >= 0.8: {} ({ratio:.2})",
            met(rps >= 2000.0),
            met(p99 <= 5.0),
            met(ratio >= 0.8),
        );
        if let Some((achieved, p99)) = paced {
            // Sustained means the signer kept up: the run took no longer than its schedule.
            println!(
                "  at {PACED_RPS:.0} req/s offered: sustained {} ({achieved:.0} req/s achieved), p99 <= 5 ms {} ({p99:.2})",
                met(achieved >= 0.97 * PACED_RPS),
                met(p99 <= 5.0),
            );
        }
    }
}

/// The payee channeld's requests of one payment, in the recorded order (see the module docs).
const PAYMENT_MIX: [u16; 11] = [35, 40, 19, 20, 36, 14, 19, 36, 14, 35, 40];

fn vls_protocol_name(t: u16) -> &'static str {
    match t {
        14 => "sign_penalty_to_us",
        19 => "sign_remote_commitment_tx",
        20 => "sign_remote_htlc_tx",
        35 => "validate_commitment_tx",
        36 => "validate_revocation",
        40 => "revoke_commitment_tx",
        _ => "other",
    }
}
