//! LSS backup under crashes, through the real binaries:
//!
//! FakeLightningd ──fd 3──▶ sphinx-broker ──MQTT──▶ sphinx-key run (redb)
//!                                 └──gRPC──▶ lssd (redb)
//!
//! `signer_broker_and_lssd_killed_at_random_points_lose_nothing`: a recorded CLN session is
//! replayed while a seeded generator (the seed is printed; `SPHINX_LSS_CRASH_SEED=<n>` replays
//! one) SIGKILLs the signer, `lssd` or the broker, either between requests or 0–2 ms after one was
//! sent (inside the signer's handling, the `Put` or the commit). What was killed is restarted:
//! the signer and `lssd` at once (the broker re-sends what is unanswered and re-syncs the signer
//! when a `Put` failed); a killed broker is a **node restart**, since lightningd dies with its
//! hsmd: the lightningd stand-in is started again with a new broker, sends `hsmd_init` again,
//! reopens its subdaemons' client connections (their recorded `client_hsmfd`) and re-sends the
//! request that had no reply, as CLN's daemons redo what they did not see completed. Past a
//! random point the device dies for good and a **fresh device** (empty data dir, same seed) is
//! restored from LSS alone and finishes the session. Passing means:
//! - every reply of the session (and every `hsmd_init` reply after a node restart) is
//!   byte-identical to the uninterrupted in-process signer's (LSS off);
//! - the device's final durable state equals LSS's, key by key with versions (each LSS value
//!   carrying the signer's tag), and its VLS state equals the in-process signer's: nothing lost,
//!   nothing applied twice.
//!
//! The kills land between the signer's local commit and LSS's acknowledgement too (the commit runs
//! while the `Put` does): the device is then one transaction ahead of LSS and rolls it forward at
//! its next dance (counted as `rolled_forward`).
//!
//! Several rounds with consecutive seeds run while the whole test stays within ~40 s.
//! Needs `target/release/{sphinx-broker,sphinx-key,lssd}`
//! (`cargo build --release -p sphinx-broker -p sphinx-key -p sphinx-lssd`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{lss_state, recorded_session};
use sphinx_lss::lssd::Lssd;
use sphinx_signer::{Output, Signer};
use sphinx_standin::harness::{bin, broker_envs, free_port, init_signer, tail, SignerProcess, TempDir};
use sphinx_standin::lightningd::{BrokerOutput, ClientConn, FakeLightningd, SpawnOptions};
use sphinx_standin::replay::{self, compare_with_oracle, oracle_replay, translate_request, Step};
use sphinx_standin::trace::{Exchange, Trace};
use sphinx_wire::hsmd;

/// xorshift64*: deterministic kill points without a dependency.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the chaos thread does; it answers each job once done.
enum Job {
    /// SIGKILL the signer after `delay` and start it again at once on the same data dir.
    Signer(Duration),
    /// SIGKILL lssd after `delay` and start it again at once (same port, same data).
    Lssd(Duration),
    /// SIGKILL the broker (this pid, not yet reaped by the main thread) after `delay`.
    Broker(u32, Duration),
    /// The device dies for good; a fresh one (this empty data dir, same seed) takes its place.
    FreshDevice(PathBuf),
}

/// Owns the signer process and lssd for a round (so kills can land while the main thread waits
/// in a call).
struct Chaos {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Result<(), String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Chaos {
    fn start(
        mut signer: SignerProcess,
        mut lssd: Lssd,
        start_signer: impl Fn(&PathBuf) -> SignerProcess + Send + 'static,
    ) -> Chaos {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let wait = |d: Duration| {
                // Chooses *where* the kill lands (inside a request); nothing waits on it.
                if !d.is_zero() {
                    std::thread::sleep(d);
                }
            };
            let mut dir: Option<PathBuf> = None;
            for job in rx {
                let r = match job {
                    Job::Signer(d) => {
                        wait(d);
                        let _ = signer.kill();
                        signer = start_signer(dir.as_ref().expect("device dir"));
                        Ok(())
                    }
                    Job::Lssd(d) => {
                        wait(d);
                        lssd.restart()
                    }
                    Job::Broker(pid, d) => {
                        wait(d);
                        // SAFETY: kill(2) on a child the main thread reaps only after this answer.
                        let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                        if rc == 0 {
                            Ok(())
                        } else {
                            Err(format!("kill broker: {}", std::io::Error::last_os_error()))
                        }
                    }
                    Job::FreshDevice(new) => {
                        let _ = signer.kill();
                        signer = start_signer(&new);
                        dir = Some(new);
                        Ok(())
                    }
                };
                if done_tx.send(r).is_err() {
                    break;
                }
            }
            let _ = signer.kill();
            drop(lssd);
        });
        Chaos { jobs, done, thread: Some(thread) }
    }

    fn send(&self, job: Job) {
        self.jobs.send(job).expect("chaos thread");
    }

    fn wait(&self) {
        match self.done.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("chaos job failed: {e}"),
            Err(e) => panic!("chaos job not done: {e}"),
        }
    }

    fn stop(self) {
        drop(self);
    }
}

impl Drop for Chaos {
    /// Also on a failed assertion: the thread owns lssd (no parent-death signal) and the signer,
    /// which must not outlive the test.
    fn drop(&mut self) {
        drop(std::mem::replace(&mut self.jobs, mpsc::channel().0));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One lightningd (and so one broker) run, with its subdaemons' client connections.
struct Node {
    ld: FakeLightningd,
    clients: HashMap<u64, ClientConn>,
}

struct Round {
    d: TempDir,
    tr: Trace,
    seed: [u8; 32],
    envs: Vec<(OsString, OsString)>,
    spawn: SpawnOptions,
    /// The recorded `client_hsmfd` request of each client conn opened so far.
    opened: BTreeMap<u64, Vec<u8>>,
    /// The oracle's answers by trace index.
    want: HashMap<usize, Result<Vec<u8>, String>>,
    steps: Vec<Step>,
    restarts: usize,
}

impl Round {
    fn logs(&self) -> String {
        let mut s = format!("--- broker ---\n{}", tail(&self.d.join("broker.log"), 6000));
        for dev in ["device-a", "device-b"] {
            s.push_str(&format!("\n--- {dev} ---\n{}", tail(&self.d.join(&format!("{dev}.log")), 3000)));
        }
        s
    }

    fn spawn_node(&self) -> Node {
        let ld = FakeLightningd::spawn_with(
            bin("sphinx-broker").unwrap(),
            Vec::<OsString>::new(),
            self.envs.iter().map(|(k, v)| (k, v)),
            self.spawn.clone(),
        )
        .unwrap_or_else(|e| panic!("spawning broker: {e}\n{}", self.logs()));
        Node { ld, clients: HashMap::new() }
    }

    /// lightningd starts again after its hsmd died: `hsmd_init` (what precedes it on conn 0
    /// too), then every subdaemon's client connection.
    fn restart_node(&mut self, old: Node) -> Node {
        drop(old.clients);
        let _ = old.ld.kill();
        self.restarts += 1;
        let mut node = self.spawn_node();
        let exs: Vec<Exchange> = self.tr.exchanges.clone();
        for ex in exs.iter().take_while(|e| !(e.conn == 0 && e.msg_type == hsmd::HSMD_INIT)) {
            if ex.conn == 0 && ex.msg_type == hsmd::DEV_PREINIT {
                node.ld.send_no_reply(&ex.request).unwrap();
            }
        }
        let init = exs.iter().find(|e| e.conn == 0 && e.msg_type == hsmd::HSMD_INIT).unwrap();
        let reply = node.ld.root_call(&translate_request(&init.request));
        let want = self.want.get(&init.index).cloned().unwrap();
        assert_eq!(reply.as_ref().ok(), want.as_ref().ok(), "hsmd_init after a node restart\n{}", self.logs());
        for (conn, req) in &self.opened {
            let c =
                node.ld.new_client_raw(req).unwrap_or_else(|e| panic!("reopening conn {conn}: {e}\n{}", self.logs()));
            node.clients.insert(*conn, c);
        }
        node
    }

    /// Sends one exchange on `node`; `Err` when the broker is gone.
    fn send(&mut self, node: &mut Node, ex: &Exchange) -> Result<Vec<u8>, String> {
        let request = translate_request(&ex.request);
        if ex.conn == 0 {
            if ex.msg_type == hsmd::CLIENT_HSMFD {
                let c = node.ld.new_client_raw(&request).map_err(|e| e.to_string())?;
                if let Some(id) = ex.new_conn {
                    node.clients.insert(id, c);
                    self.opened.insert(id, request.clone());
                }
                Ok(hsmd::client_hsmfd_reply())
            } else if ex.msg_type == hsmd::DEV_PREINIT {
                node.ld.send_no_reply(&request).map(|()| Vec::new()).map_err(|e| e.to_string())
            } else {
                node.ld.root_call(&request).map_err(|e| e.to_string())
            }
        } else {
            match node.clients.get_mut(&ex.conn) {
                Some(c) => c.call(&request).map_err(|e| e.to_string()),
                None => Err(format!("conn {} does not exist", ex.conn)),
            }
        }
    }

    fn record(&mut self, ex: &Exchange, reply: Result<Vec<u8>, String>, latency: Duration) {
        let request = translate_request(&ex.request);
        let msg_type = hsmd::msg_type(&request).unwrap_or(ex.msg_type);
        self.steps.push(Step {
            index: ex.index,
            run: self.restarts,
            conn: ex.conn,
            ctx: ex.ctx,
            t: ex.t,
            recorded_type: ex.msg_type,
            msg_type,
            name: ex.name.clone(),
            request,
            reply,
            recorded_reply: ex.reply.clone(),
            latency,
        });
    }
}

#[derive(Default, Debug)]
struct Kills {
    signer: usize,
    lssd: usize,
    broker: usize,
    /// Restarts at which the device was one transaction ahead of LSS (killed between its local
    /// commit and LSS's acknowledgement) and rolled it forward.
    rolled_forward: usize,
}

fn vls_only(m: &[sphinx_wire::lss::Mutation]) -> BTreeMap<String, Vec<u8>> {
    m.iter()
        .filter(|m| !m.key.starts_with("sphinx/") && m.key != sphinx_signer::WRITER_KEY)
        .map(|m| (m.key.clone(), m.value.clone()))
        .collect()
}

fn round(seed: u64) -> (Kills, usize) {
    eprintln!("lss_crash: round seed {seed} (SPHINX_LSS_CRASH_SEED={seed} replays it)");
    let mut rng = Rng::new(seed);
    let (tr, node_seed, clock) = recorded_session("open-pay-close", "alice");
    let d = TempDir::new("lss-crash").unwrap();
    let lssd = Lssd::start_in(&d.join("lssd"), None).unwrap();
    let lss_url = lssd.url();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let mut envs = broker_envs(&d.join("broker"), &listen);
    envs.push(("SPHINX_BROKER_LSS_URL".into(), lss_url.clone().into()));
    let spawn = SpawnOptions {
        call_timeout: Duration::from_secs(60),
        init_timeout: Duration::from_secs(60),
        output: BrokerOutput::File(d.join("broker.log")),
        ..SpawnOptions::default()
    };

    let cfg = replay::signer::replay_config(clock, Default::default());
    let mut oracle = replay::signer::in_memory(node_seed, &cfg).unwrap();
    let expected = oracle_replay(&tr, &mut oracle, true);
    let want = expected.iter().map(|o| (o.index, o.reply.clone())).collect();

    let key = bin("sphinx-key").unwrap();
    let dev_a = d.join("device-a");
    init_signer(&key, &dev_a, node_seed).unwrap();
    let start_signer = {
        let (key, listen, root) = (key.clone(), listen.clone(), d.path().to_path_buf());
        move |dir: &PathBuf| {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            SignerProcess::start(&key, dir, &listen, clock, &root.join(format!("{name}.log")), &[]).unwrap()
        }
    };
    let chaos = Chaos::start(start_signer(&dev_a), lssd, start_signer);
    // The chaos thread knows the device dir through its first FreshDevice job.
    chaos.send(Job::FreshDevice(dev_a.clone()));
    chaos.wait();

    let mut r =
        Round { d, tr, seed: node_seed, envs, spawn, opened: BTreeMap::new(), want, steps: Vec::new(), restarts: 0 };
    let n = r.tr.exchanges.len();
    // Past a channel open (request 63 on), at a random point, the device dies for good.
    let fresh_at = 90 + rng.below((n - 110) as u64) as usize;
    let mut node = r.spawn_node();
    let mut kills = Kills::default();
    let exs = r.tr.exchanges.clone();
    for (i, ex) in exs.iter().enumerate() {
        if i == fresh_at {
            let dev_b = r.d.join("device-b");
            init_signer(&key, &dev_b, node_seed).unwrap();
            chaos.send(Job::FreshDevice(dev_b));
            chaos.wait();
        }
        // Not before lightningd's first hsmd_init: there is nothing to crash yet.
        let job = if i > 0 && rng.below(6) == 0 {
            let delay = if rng.below(3) == 0 { Duration::ZERO } else { Duration::from_micros(1 + rng.below(2000)) };
            match rng.below(8) {
                0..=3 => Some(Job::Signer(delay)),
                // Each lssd crash costs the broker's first retry (1 s); each node restart a spawn.
                4 | 5 if kills.lssd < 4 => Some(Job::Lssd(delay)),
                6 | 7 if kills.broker < 4 => Some(Job::Broker(node.ld.pid(), delay)),
                _ => Some(Job::Signer(delay)),
            }
        } else {
            None
        };
        let broker_kill = matches!(job, Some(Job::Broker(..)));
        match &job {
            Some(Job::Signer(_)) => kills.signer += 1,
            Some(Job::Lssd(_)) => kills.lssd += 1,
            Some(Job::Broker(..)) => kills.broker += 1,
            _ => {}
        }
        let t = Instant::now();
        let sent = job.is_some();
        if let Some(j) = job {
            chaos.send(j);
        }
        let mut reply = r.send(&mut node, ex);
        if sent {
            // The kill may land after the reply; either way it is done (and what was killed is
            // up again, but for the broker) before the next request.
            chaos.wait();
        }
        if broker_kill {
            // The broker is dead (or about to be, after this reply): lightningd with it.
            node = r.restart_node(node);
            if reply.is_err() {
                reply = r.send(&mut node, ex);
            }
        }
        assert!(
            reply.is_ok() || ex.msg_type == hsmd::DEV_PREINIT,
            "#{} type {} failed: {:?}\n{}",
            ex.index,
            ex.msg_type,
            reply,
            r.logs()
        );
        r.record(ex, reply, t.elapsed());
    }
    let last = node.ld.shutdown();
    chaos.stop();
    kills.rolled_forward = ["device-a.log", "device-b.log"]
        .iter()
        .map(|f| std::fs::read_to_string(r.d.join(f)).unwrap_or_default())
        .map(|log| log.matches("LSS lacks the device's last transaction").count())
        .sum();
    assert!(matches!(&last, Ok(s) if s.success()), "broker exit {last:?}\n{}", r.logs());

    // Every reply equals the uninterrupted in-process signer's.
    let mismatches = compare_with_oracle(&r.steps, &expected);
    let list: Vec<String> = mismatches
        .iter()
        .take(20)
        .map(|m| format!("  #{} conn {} type {}: {}", m.index, m.conn, m.msg_type, m.what))
        .collect();
    assert!(mismatches.is_empty(), "{} mismatches vs the oracle:\n{}\n{}", mismatches.len(), list.join("\n"), r.logs());

    // The device's durable state equals LSS's, and its VLS state the in-process signer's.
    let lssd = Lssd::start_in(&r.d.join("lssd"), None).unwrap();
    let remote = lss_state(&lssd.url(), r.seed, clock).unwrap();
    let mut dev = Signer::open(r.seed, &r.d.join("device-b").join("state"), &cfg).unwrap();
    let local = dev.synced_state().unwrap();
    let keys = |v: &[sphinx_wire::lss::Mutation]| v.iter().map(|m| (m.key.clone(), m.version)).collect::<Vec<_>>();
    assert_eq!(keys(&local), keys(&remote), "device and LSS hold the same keys at the same versions");
    for (l, rm) in local.iter().zip(&remote) {
        assert!(l.value == rm.value, "{} differs between the device and LSS", l.key);
    }
    let (got, want) = (vls_only(&local), vls_only(&oracle.synced_state().unwrap()));
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "VLS keys vs the in-process signer");
    for (k, v) in &want {
        assert!(got.get(k) == Some(v), "VLS state {k} differs from the in-process signer's");
    }
    (kills, r.restarts)
}

#[test]
fn signer_broker_and_lssd_killed_at_random_points_lose_nothing() {
    let first: u64 = match std::env::var("SPHINX_LSS_CRASH_SEED") {
        Ok(s) => s.parse().expect("SPHINX_LSS_CRASH_SEED: a number"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
    };
    let single = std::env::var("SPHINX_LSS_CRASH_SEED").is_ok();
    let started = Instant::now();
    let mut total = Kills::default();
    let (mut rounds, mut restarts) = (0, 0);
    // Rounds while the test stays within its budget (a round takes ~5-15 s on 2 cores).
    while rounds == 0 || (!single && rounds < 4 && started.elapsed() < Duration::from_secs(25)) {
        let (k, n) = round(first + rounds as u64);
        eprintln!("lss_crash: round {rounds}: kills {k:?}, node restarts {n}");
        total.signer += k.signer;
        total.lssd += k.lssd;
        total.broker += k.broker;
        total.rolled_forward += k.rolled_forward;
        restarts += n;
        rounds += 1;
    }
    eprintln!("lss_crash: {rounds} rounds in {:?}: kills {total:?}, node restarts {restarts}", started.elapsed());
    assert!(total.signer + total.lssd + total.broker >= 10, "the generator should crash things often ({total:?})");
}

// ---- The broker's LSS error paths, each at an exact point ---------------------------------------

/// An in-process device reached by direct calls (the library's `SignerLink`): another writer.
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
                Output::Publish { topic, payload }
                    if answers.contains(&topic) || topic == sphinx_wire::topics::ERROR =>
                {
                    Some((topic.to_string(), payload))
                }
                _ => None,
            })
            .ok_or_else(|| sphinx_lss::broker::LinkError(format!("no answer to {topic}")));
        async move { answer }
    }
}

/// A session through the real broker (LSS on) and a real device, stopped before trace index 90
/// (a `validate_commitment_tx` on an open channel: it changes state, so it is `Put` first).
struct Rig {
    d: TempDir,
    tr: Trace,
    seed: [u8; 32],
    clock: u64,
    sess: replay::Session,
    _signer: SignerProcess,
}

const AT: usize = 90;

impl Rig {
    fn new(tag: &str, lss_url: &str) -> Rig {
        let (tr, seed, clock) = recorded_session("open-pay-close", "alice");
        assert_eq!(tr.exchanges[AT].msg_type, 35, "trace index {AT} is validate_commitment_tx");
        let d = TempDir::new(tag).unwrap();
        let listen = format!("127.0.0.1:{}", free_port().unwrap());
        let key = bin("sphinx-key").unwrap();
        init_signer(&key, &d.join("device-a"), seed).unwrap();
        let mut opts = replay::ReplayOptions::new(bin("sphinx-broker").unwrap());
        opts.envs = broker_envs(&d.join("broker"), &listen);
        opts.envs.push(("SPHINX_BROKER_LSS_URL".into(), lss_url.into()));
        opts.spawn = SpawnOptions {
            call_timeout: Duration::from_secs(60),
            init_timeout: Duration::from_secs(60),
            output: BrokerOutput::File(d.join("broker.log")),
            ..SpawnOptions::default()
        };
        let mut sess = replay::Session::start(&tr, opts).unwrap();
        sess.set_wait_listen(&listen).unwrap();
        let signer =
            SignerProcess::start(&key, &d.join("device-a"), &listen, clock, &d.join("device-a.log"), &[]).unwrap();
        sess.run_until(|ex| ex.index >= AT);
        let mut r = Rig { d, tr, seed, clock, sess, _signer: signer };
        r.assert_ok("before the error");
        r
    }

    fn logs(&self) -> String {
        format!(
            "--- broker ---\n{}\n--- device ---\n{}",
            tail(&self.d.join("broker.log"), 6000),
            tail(&self.d.join("device-a.log"), 4000)
        )
    }

    fn assert_ok(&mut self, when: &str) {
        let bad: Vec<String> =
            self.sess.report.errors().map(|s| format!("#{} type {}: {:?}", s.index, s.msg_type, s.reply)).collect();
        assert!(bad.is_empty(), "{when}: {}\n{}", bad.join("\n"), self.logs());
    }

    /// Runs to the end; every reply byte-identical to the in-process signer's, each request
    /// answered once (a second reply to one request would be read as the next one's and differ).
    fn finish(mut self) -> String {
        self.sess.run_to_end();
        let report = self.sess.close();
        let cfg = replay::signer::replay_config(self.clock, Default::default());
        let mut oracle = replay::signer::in_memory(self.seed, &cfg).unwrap();
        let expected = oracle_replay(&self.tr, &mut oracle, true);
        let mismatches = compare_with_oracle(&report.steps, &expected);
        assert!(
            mismatches.is_empty() && report.brokers_exited_cleanly(),
            "vs the oracle: {mismatches:#?}, exits {:?}\n{}",
            report.broker_exits,
            self.logs()
        );
        assert_eq!(report.steps.len(), self.tr.request_count());
        sphinx_standin::harness::log_text(&self.d.join("broker.log"))
    }
}

#[test]
fn lssd_down_mid_session_holds_the_reply_until_it_is_back() {
    let d = TempDir::new("lss-down-mid").unwrap();
    let mut lssd = Lssd::start_in(&d.join("lssd"), None).unwrap();
    let mut r = Rig::new("lss-down-mid-rig", &lssd.url());
    lssd.kill();
    // Once the broker has seen the Put fail, bring lssd back (same port, same data).
    let blog = r.d.join("broker.log");
    let back = std::thread::spawn(move || {
        let log =
            sphinx_standin::harness::wait_log(&blog, "storing a request's state failed", Duration::from_secs(60))?;
        lssd.restart()?;
        Ok::<(String, Instant, Lssd), String>((log, Instant::now(), lssd))
    });
    let step = r.sess.step().unwrap().clone();
    let answered = Instant::now();
    let (log, up, _lssd) = back.join().unwrap().unwrap_or_else(|e| panic!("{e}\n{}", r.logs()));
    assert!(step.reply.is_ok(), "#{AT}: {:?}\n{}", step.reply, r.logs());
    assert!(answered > up, "the reply left before LSS had stored its state\n{}", r.logs());
    assert!(log.contains("cannot reach LSS"), "a clear error: {log}");
    let device = sphinx_standin::harness::log_text(&r.d.join("device-a.log"));
    assert!(device.contains("dropping state LSS did not acknowledge"), "the device held it\n{}", r.logs());
    // It had committed the request's state while the Put ran: one transaction ahead of LSS,
    // rolled forward at the re-sync instead of refused as "LSS rolled back".
    assert!(device.contains("LSS lacks the device's last transaction"), "rolled forward\n{}", r.logs());
    let broker = r.finish();
    assert!(broker.matches("LSS: signer in sync").count() >= 2, "re-synced after the failed Put");
}

#[test]
fn another_writer_makes_the_put_conflict_and_the_signer_is_resynced() {
    let lssd = Lssd::start_temp("lss-conflict").unwrap();
    let mut r = Rig::new("lss-conflict-rig", &lssd.url());
    // Another device of this node (same seed) catches up from LSS and writes: a channel stub.
    let cfg = replay::signer::replay_config(r.clock, Default::default());
    let dir = r.d.join("device-b");
    let mut other = InProcess(Signer::open(r.seed, &dir, &cfg).unwrap());
    let init = r.tr.exchanges.iter().find(|e| e.msg_type == hsmd::HSMD_INIT).unwrap();
    let init =
        sphinx_wire::serial::Request { seq: 0, peer_id: [0; 33], dbid: 0, message: translate_request(&init.request) };
    let mut new_channel = 30u16.to_be_bytes().to_vec();
    new_channel.extend_from_slice(&[2; 33]);
    new_channel.extend_from_slice(&4242u64.to_be_bytes());
    let stub = sphinx_wire::serial::Request { seq: 1, peer_id: [0; 33], dbid: 0, message: new_channel };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let lss = sphinx_lss::broker::LssBackend::new(&lssd.url(), Duration::from_secs(10)).await.unwrap();
        let d = sphinx_lss::broker::init_dance(&lss, &mut other, Some(init.encode())).await.unwrap();
        let mut s = d.session;
        let got =
            sphinx_lss::broker::request(&mut other, &mut s, sphinx_wire::topics::VLS, stub.encode()).await.unwrap();
        assert!(matches!(got, sphinx_lss::broker::Answered::Reply(_)), "{got:?}");
    });
    // The device's next state change is stale: conflict, re-sync, then answered.
    let step = r.sess.step().unwrap().clone();
    assert!(step.reply.is_ok(), "#{AT}: {:?}\n{}", step.reply, r.logs());
    let device = sphinx_standin::harness::log_text(&r.d.join("device-a.log"));
    assert!(device.contains("LSS conflict: this signer's state is stale"), "the device was told\n{}", r.logs());
    let broker = r.finish();
    assert!(broker.contains("LSS put conflict"), "the broker saw the conflict");
    assert_eq!(broker.matches("LSS: signer in sync").count(), 2, "danced again after the conflict");
}
