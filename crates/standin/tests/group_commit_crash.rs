//! Crash safety of the group commit: several channels (counterparty simulator traffic, one
//! client connection and one thread each, as channelds) load the real broker and `sphinx-key
//! run` (group commit on, its default) concurrently, while the signer is SIGKILLed at random
//! moments and restarted.
//!
//! Passing means no reply ever left the device for state that is not on disk:
//! - every reply each channel got is byte-identical to the uninterrupted in-process signer's
//!   (a reply whose state was lost makes that channel's later requests fail VLS's checks or get
//!   other replies; the broker re-sends what was in flight and the signer answers re-deliveries
//!   from its reply log);
//! - after the last reply, the state on disk equals the uninterrupted signer's (every VLS key and
//!   value; the reply log is bookkeeping and excluded), so the last replies' state is there too.
//!
//! The same with LSS backup on (a real `lssd`): the requests then go through LSS group commit
//! (one transaction and one `Put` per group, the local commit running while the `Put` does), and
//! LSS must hold exactly the device's state at the end.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sphinx_signer::{PolicyConfig, Signer, REPLY_KEY_PREFIX, WRITER_KEY};
use sphinx_standin::chansim::{ChannelSim, Conn, Hsmd, InProcess, Template};
use sphinx_standin::harness::{bin, broker_envs, free_port, init_signer, signer_state, SignerProcess, TempDir};
use sphinx_standin::lightningd::{BrokerOutput, FakeLightningd, SpawnOptions};
use sphinx_standin::replay;
use sphinx_standin::trace::{scenario_for_path, seed_for_path, Trace};
use sphinx_wire::{hsmd, serial, ClientContext};

const CHANNELS: u64 = 8;
const PAYMENTS: usize = 10;
const SIM_SEED: [u8; 32] = [0x52; 32];
const CHANNELD_PERMISSIONS: u64 = 447;

/// One call as the uninterrupted signer answered it: connection, request, reply.
type Answered = (Conn, Vec<u8>, Vec<u8>);

/// Records every reply of the in-process signer, per channel, in order.
struct Recording<'a> {
    inner: InProcess<'a>,
    replies: BTreeMap<u64, Vec<Answered>>,
}

impl Hsmd for Recording<'_> {
    fn call(&mut self, conn: Conn, peer_id: &[u8; 33], dbid: u64, request: &[u8]) -> Result<Vec<u8>, String> {
        let r = self.inner.call(conn, peer_id, dbid, request)?;
        self.replies.entry(dbid).or_default().push((conn, request.to_vec(), r.clone()));
        Ok(r)
    }
}

/// xorshift64*: deterministic kill moments without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn signer_killed_during_batched_commits_never_replies_for_lost_state() {
    killed_during_batched_commits(false);
}

#[test]
fn signer_killed_during_lss_group_commits_never_replies_for_lost_state() {
    killed_during_batched_commits(true);
}

fn killed_during_batched_commits(with_lss: bool) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/traces/open-pay-close/bob.jsonl");
    let trace = Trace::load(&path).unwrap();
    let seed = seed_for_path(&path).unwrap();
    let clock = scenario_for_path(&path).unwrap().fixed_clock();
    let cfg = replay::signer::replay_config(clock, PolicyConfig::default());
    let init = trace.exchanges.iter().find(|e| e.msg_type == hsmd::HSMD_INIT).unwrap().request.clone();

    // The uninterrupted signer: every channel's requests and replies.
    let template = Template::from_trace(&trace).unwrap();
    let mut oracle = Signer::in_memory(seed, &cfg).unwrap();
    oracle.handle(&serial::Request { seq: 0, peer_id: [0; 33], dbid: 0, message: init.clone() }).unwrap();
    let mut rec = Recording { inner: InProcess { signer: &mut oracle, seq: 1 }, replies: BTreeMap::new() };
    let mut sims: Vec<ChannelSim> = (1..=CHANNELS).map(|d| ChannelSim::new(template.clone(), SIM_SEED, d)).collect();
    for sim in &mut sims {
        sim.open(&mut rec).unwrap();
    }
    let opened: BTreeMap<u64, usize> = rec.replies.iter().map(|(d, v)| (*d, v.len())).collect();
    for _ in 0..PAYMENTS {
        for sim in &mut sims {
            sim.pay(&mut rec, 2_000_000).unwrap();
        }
    }
    let calls = rec.replies;
    let expected_state: BTreeMap<String, Vec<u8>> = oracle
        .synced_state()
        .unwrap()
        .into_iter()
        .filter(|m| !m.key.starts_with(REPLY_KEY_PREFIX))
        .map(|m| (m.key, m.value))
        .collect();

    // The device, behind the real broker (and LSS).
    let d = TempDir::new("gc-crash").unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let lssd = with_lss.then(|| sphinx_lss::lssd::Lssd::start_in(&d.join("lssd"), None).unwrap());
    let mut envs = broker_envs(&d.join("broker"), &listen);
    if let Some(l) = &lssd {
        envs.push(("SPHINX_BROKER_LSS_URL".into(), l.url().into()));
    }
    let key = bin("sphinx-key").unwrap();
    init_signer(&key, &d.join("signer"), seed).unwrap();
    let opts = SpawnOptions {
        output: BrokerOutput::File(d.join("broker.log")),
        call_timeout: Duration::from_secs(60),
        init_timeout: Duration::from_secs(60),
        ..SpawnOptions::default()
    };
    let mut ld = FakeLightningd::spawn_with(bin("sphinx-broker").unwrap(), Vec::<String>::new(), envs, opts).unwrap();
    let (sdir, slog) = (d.join("signer"), d.join("signer.log"));
    let start = {
        let (key, sdir, listen, slog) = (key.clone(), sdir.clone(), listen.clone(), slog.clone());
        move || SignerProcess::start(&key, &sdir, &listen, clock, &slog, &[]).unwrap()
    };
    let mut signer = start();
    ld.root_call(&init).unwrap();
    let mut conns = vec![];
    for sim in &sims {
        let ctx = ClientContext { peer_id: sim.peer_id, dbid: sim.dbid, permissions: CHANNELD_PERMISSIONS };
        let mut conn = ld.new_client(&ctx).unwrap();
        for (c, req, reply) in &calls[&sim.dbid][..opened[&sim.dbid]] {
            let got = match c {
                Conn::Root => ld.root_call(req).unwrap(),
                Conn::Channel => conn.call(req).unwrap(),
            };
            assert_eq!(&got, reply, "open of dbid {}", sim.dbid);
        }
        conns.push(conn);
    }

    // The payments, concurrently, while a supervisor (it owns the signer process: PR_SET_PDEATHSIG
    // follows the spawning thread) kills and restarts the signer at random moments.
    let done = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(0x6c0c_0000_0000_0001 ^ std::process::id() as u64);
            let mut kills = 0usize;
            while !done.load(Ordering::SeqCst) {
                // Chooses where to crash (somewhere inside the stream of batches); nothing waits
                // on it for correctness.
                std::thread::sleep(Duration::from_millis(20 + rng.next() % 80));
                signer.kill().unwrap();
                kills += 1;
                signer = start();
            }
            (signer, kills)
        })
    };
    let threads: Vec<_> = sims
        .iter()
        .zip(conns)
        .map(|(sim, mut conn)| {
            let mine: Vec<(Vec<u8>, Vec<u8>)> =
                calls[&sim.dbid][opened[&sim.dbid]..].iter().map(|(_, q, r)| (q.clone(), r.clone())).collect();
            let dbid = sim.dbid;
            std::thread::spawn(move || {
                for (i, (req, reply)) in mine.iter().enumerate() {
                    let got = conn.call(req).map_err(|e| format!("dbid {dbid} payment request #{i}: {e}"))?;
                    if &got != reply {
                        return Err(format!(
                            "dbid {dbid} payment request #{i}: reply differs from the uninterrupted signer's"
                        ));
                    }
                }
                Ok::<usize, String>(mine.len())
            })
        })
        .collect();
    let results: Vec<Result<usize, String>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    done.store(true, Ordering::SeqCst);
    let (mut signer, kills) = supervisor.join().unwrap();
    signer.kill().unwrap();
    let _ = ld.shutdown();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{failed:#?}\n--- signer ---\n{}", sphinx_standin::harness::tail(&slog, 4000));
    let answered: usize = results.iter().map(|r| *r.as_ref().unwrap()).sum();
    let rolled = sphinx_standin::harness::log_text(&slog).matches("LSS lacks the device's last transaction").count();
    eprintln!("{kills} kills during {answered} concurrent requests (LSS: {with_lss}, last transaction rolled forward {rolled} times)");
    assert!(kills >= 5, "the supervisor should kill the signer several times ({kills})");

    let state: BTreeMap<String, Vec<u8>> = signer_state(&sdir.join("state"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.starts_with(REPLY_KEY_PREFIX) && k != sphinx_signer::INIT_KEY && k != WRITER_KEY)
        .collect();
    assert_eq!(state.keys().collect::<Vec<_>>(), expected_state.keys().collect::<Vec<_>>(), "same state keys");
    for (k, v) in &expected_state {
        assert_eq!(Some(v), state.get(k), "state {k} differs from the uninterrupted signer's");
    }
    // And LSS holds what the device holds, key by key.
    if let Some(l) = &lssd {
        let remote: BTreeMap<String, Vec<u8>> = common::lss_state(&l.url(), seed, clock)
            .unwrap()
            .into_iter()
            .filter(|m| !m.key.starts_with(REPLY_KEY_PREFIX) && m.key != WRITER_KEY)
            .map(|m| (m.key, m.value))
            .collect();
        assert_eq!(remote.keys().collect::<Vec<_>>(), state.keys().collect::<Vec<_>>(), "LSS and device keys");
        assert!(remote == state, "LSS's values differ from the device's");
    }
}
