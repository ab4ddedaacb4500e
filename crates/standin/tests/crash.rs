//! Crash safety: the signer is SIGKILLed at random points while a recorded CLN session is
//! replayed through the real broker, and restarted each time.
//!
//! Passing means:
//! - the run completes: every request gets a reply (the broker re-sends what was in flight, the
//!   signer answers a re-delivery from its reply log);
//! - every reply is byte-identical to the uninterrupted in-process signer's: no reply ever left
//!   the device for state that was then lost (a lost commitment or revocation would make later
//!   replies differ or fail VLS's policy checks), and nothing was signed twice differently;
//! - the final state on disk equals that of an uninterrupted end-to-end run (every VLS key and
//!   value; the reply log and stored init are bookkeeping and excluded).
//!
//! Kill points come from a seeded generator: some between requests, some a random 0–2 ms after a
//! request was sent, so they land inside the signer's handling, before or after its commit.
//! (The delay chooses *where* to crash; nothing waits on it for correctness.)

mod common;

use std::time::Duration;

use common::recorded_session;
use sphinx_standin::harness::{bin, broker_envs, free_port, init_signer, signer_state, SignerProcess, TempDir};
use sphinx_standin::lightningd::{BrokerOutput, SpawnOptions};
use sphinx_standin::replay::{self, compare_with_oracle, oracle_replay, ReplayOptions, ReplayReport};
use sphinx_standin::trace::Trace;

/// xorshift64*: deterministic kill points without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

struct Loop {
    dir: TempDir,
    listen: String,
    key: std::path::PathBuf,
    clock: u64,
}

impl Loop {
    fn new(tag: &str, seed: [u8; 32], clock: u64) -> Loop {
        let dir = TempDir::new(tag).unwrap();
        let key = bin("sphinx-key").unwrap();
        init_signer(&key, &dir.join("signer"), seed).unwrap();
        Loop { listen: format!("127.0.0.1:{}", free_port().unwrap()), dir, key, clock }
    }
    fn start_signer(&self) -> SignerProcess {
        SignerProcess::start(
            &self.key,
            &self.dir.join("signer"),
            &self.listen,
            self.clock,
            &self.dir.join("signer.log"),
            &[],
        )
        .unwrap()
    }
    fn replay(&self, tr: &Trace, on_step: &mut dyn FnMut(&replay::Step)) -> ReplayReport {
        let mut opts = ReplayOptions::new(bin("sphinx-broker").unwrap());
        opts.envs = broker_envs(&self.dir.join("broker"), &self.listen);
        opts.spawn = SpawnOptions {
            call_timeout: Duration::from_secs(60),
            init_timeout: Duration::from_secs(60),
            output: BrokerOutput::File(self.dir.join("broker.log")),
            ..SpawnOptions::default()
        };
        replay::replay(tr, &opts, on_step).unwrap_or_else(|e| {
            panic!(
                "{e}\n--- broker ---\n{}\n--- signer ---\n{}",
                sphinx_standin::harness::tail(&self.dir.join("broker.log"), 3000),
                sphinx_standin::harness::tail(&self.dir.join("signer.log"), 3000)
            )
        })
    }
}

#[test]
fn signer_killed_at_random_points_loses_nothing() {
    let (tr, seed, clock) = recorded_session("open-pay-close", "alice");

    // Reference: uninterrupted end to end.
    let calm = Loop::new("crash-calm", seed, clock);
    let mut s = calm.start_signer();
    let calm_report = calm.replay(&tr, &mut |_| {});
    s.kill().unwrap();
    assert_eq!(calm_report.errors().count(), 0);

    // The same with the signer killed again and again. One supervisor thread owns the signer
    // process for the whole run (PR_SET_PDEATHSIG follows the spawning thread), kills it when
    // told — right away, or after a short random delay that lands inside a request — and
    // restarts it at once.
    let rough = Loop::new("crash-rough", seed, clock);
    let (tx, rx) = std::sync::mpsc::channel::<Duration>();
    let supervisor = {
        let (key, dir, listen, log) =
            (rough.key.clone(), rough.dir.join("signer"), rough.listen.clone(), rough.dir.join("signer.log"));
        let start = move || SignerProcess::start(&key, &dir, &listen, clock, &log, &[]).unwrap();
        std::thread::spawn(move || {
            let mut signer = start();
            for delay in rx {
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                signer.kill().unwrap();
                signer = start();
            }
            signer.kill().unwrap();
        })
    };
    let mut rng = Rng(0x5eed_0000_0000_0001 ^ std::process::id() as u64);
    let mut kills = 0usize;
    let report = rough.replay(&tr, &mut |_step| {
        if rng.next() % 5 != 0 {
            return;
        }
        kills += 1;
        let delay = if rng.next() % 3 == 0 { Duration::ZERO } else { Duration::from_micros(1 + rng.next() % 2000) };
        let _ = tx.send(delay);
    });
    drop(tx);
    supervisor.join().unwrap();
    eprintln!("{kills} kills during {} requests", report.steps.len());
    assert!(kills >= 10, "the generator should kill the signer many times ({kills})");

    let errors: Vec<String> =
        report.errors().map(|s| format!("#{} type {}: {:?}", s.index, s.msg_type, s.reply)).collect();
    assert!(
        errors.is_empty(),
        "requests failed despite restarts:\n{}\n--- broker ---\n{}\n--- signer ---\n{}",
        errors.join("\n"),
        sphinx_standin::harness::tail(&rough.dir.join("broker.log"), 6000),
        sphinx_standin::harness::tail(&rough.dir.join("signer.log"), 6000)
    );

    let cfg = replay::signer::replay_config(clock, Default::default());
    let mut oracle = replay::signer::in_memory(seed, &cfg).unwrap();
    let expected = oracle_replay(&tr, &mut oracle, true);
    let mismatches = compare_with_oracle(&report.steps, &expected);
    assert!(mismatches.is_empty(), "replies differ from the uninterrupted signer: {mismatches:#?}");

    let state = |l: &Loop| signer_state(&l.dir.join("signer").join("state")).unwrap();
    let (a, b) = (state(&calm), state(&rough));
    assert!(!a.is_empty());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "same state keys");
    for (k, v) in &a {
        assert_eq!(Some(v), b.get(k), "state {k} differs after crashes");
    }
}
