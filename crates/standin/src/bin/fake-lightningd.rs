//! `fake-lightningd`: runs the broker as lightningd runs its hsmd and replays a recorded CLN trace
//! through it, printing one line per request and a summary. Exit code 0 only if every reply is
//! acceptable and every broker run exited with status 0 after fd 3 was closed.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sphinx_standin::lightningd::{BrokerOutput, FdPassing, SpawnOptions};
use sphinx_standin::replay::{self, judge_against_recorded, ReplayOptions, Step, Verdict};
use sphinx_standin::trace::Trace;

/// Replay a recorded Core Lightning hsmd trace through a broker spawned exactly as lightningd
/// v25.12.1 spawns its hsmd (`--version` check, status socket on fd 0, requests on fd 3, client
/// fds passed with SCM_RIGHTS).
///
/// Replies are judged against the recorded ones (CLN's own hsmd): byte-identical ("ok"), or
/// different only where the traces README says VLS differs by design ("ok~": signature nonces,
/// init capabilities, withdrawal PSBT shape). With the `oracle` feature, replies are also
/// compared byte for byte with an in-process signer built from the seed ("oracle" column).
#[derive(Parser, Debug)]
#[command(
    name = "fake-lightningd",
    version,
    after_help = "Example:\n  fake-lightningd --broker target/release/sphinx-broker \\\n      --trace testdata/traces/open-pay-close/alice.jsonl -- --log-io"
)]
struct Cli {
    /// The hsmd to run (normally sphinx-broker).
    #[arg(long)]
    broker: PathBuf,
    /// Trace file (JSONL) to replay.
    #[arg(long)]
    trace: PathBuf,
    /// Node seed (32 bytes hex) for the in-process oracle; default from the file name (alice/bob).
    #[arg(long)]
    seed_hex: Option<String>,
    /// Fixed signer clock (unix seconds) for the oracle; default: the scenario's end.
    #[arg(long)]
    fixed_clock: Option<u64>,
    /// Do not run the in-process oracle; judge only against the recorded CLN replies.
    #[arg(long)]
    no_oracle: bool,
    /// Deadline of each request, seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Deadline of hsmd_init (held until a signer answers), seconds.
    #[arg(long, default_value_t = 60.0)]
    init_timeout: f64,
    /// Send 51/52 as recorded instead of translating them to 38/39.
    #[arg(long)]
    no_translate: bool,
    /// Accept a client fd attached to the 109 reply bytes (real lightningd would not).
    #[arg(long)]
    fd_lenient: bool,
    /// Append the broker's stdout/stderr to this file instead of inheriting them.
    #[arg(long)]
    broker_log: Option<PathBuf>,
    /// Print only failing steps and the summary.
    #[arg(long, short)]
    quiet: bool,
    /// Arguments for the broker, as lightningd would pass them (e.g. --log-io, --developer).
    #[arg(last = true)]
    broker_args: Vec<OsString>,
}

/// `println!` that ignores a closed stdout (e.g. piped into `head`) instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.001))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("fake-lightningd: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(feature = "oracle")]
fn oracle_steps(cli: &Cli, tr: &Trace) -> anyhow::Result<Option<Vec<replay::OracleStep>>> {
    if cli.no_oracle {
        return Ok(None);
    }
    let seed = match &cli.seed_hex {
        Some(h) => {
            let b = hex::decode(h)?;
            Some(<[u8; 32]>::try_from(b.as_slice()).map_err(|_| anyhow::anyhow!("--seed-hex must be 32 bytes"))?)
        }
        None => sphinx_standin::trace::seed_for_path(&cli.trace),
    };
    let clock =
        cli.fixed_clock.or_else(|| sphinx_standin::trace::scenario_for_path(&cli.trace).map(|s| s.fixed_clock()));
    let (Some(seed), Some(clock)) = (seed, clock) else {
        eprintln!("note: no oracle (give --seed-hex and --fixed-clock for a trace outside testdata/traces)");
        return Ok(None);
    };
    let cfg = replay::signer::replay_config(clock, Default::default());
    let mut signer = replay::signer::in_memory(seed, &cfg).map_err(|e| anyhow::anyhow!(e))?;
    Ok(Some(replay::oracle_replay(tr, &mut signer, !cli.no_translate)))
}

#[cfg(not(feature = "oracle"))]
fn oracle_steps(cli: &Cli, _tr: &Trace) -> anyhow::Result<Option<Vec<replay::OracleStep>>> {
    if cli.seed_hex.is_some() || cli.fixed_clock.is_some() {
        eprintln!("note: built without the `oracle` feature; --seed-hex/--fixed-clock are ignored");
    }
    Ok(None)
}

fn verdict_text(v: &Verdict) -> &'static str {
    match v {
        Verdict::Exact => "ok",
        Verdict::Expected(_) => "ok~",
        Verdict::NoRecord => "ok?",
        Verdict::Mismatch(_) => "MISMATCH",
        Verdict::Error(_) => "ERROR",
    }
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    let tr = Trace::load(&cli.trace)?;
    let oracle = oracle_steps(&cli, &tr)?;
    let oracle_by_index: std::collections::HashMap<usize, &replay::OracleStep> =
        oracle.iter().flatten().map(|o| (o.index, o)).collect();

    let mut opts = ReplayOptions::new(&cli.broker);
    opts.args = cli.broker_args.clone();
    opts.translate_preapprove = !cli.no_translate;
    opts.spawn = SpawnOptions {
        call_timeout: secs(cli.timeout),
        init_timeout: secs(cli.init_timeout),
        output: cli.broker_log.clone().map(BrokerOutput::File).unwrap_or_default(),
        fd_passing: if cli.fd_lenient { FdPassing::Lenient } else { FdPassing::Strict },
        ..SpawnOptions::default()
    };

    out!(
        "replaying {} ({} requests, {} hsmd run(s)) through {}",
        cli.trace.display(),
        tr.request_count(),
        tr.runs(),
        cli.broker.display()
    );
    out!("{:>4} {:>4} {:>5} {:<40} {:>10}  verdict", "#", "conn", "type", "name", "latency_ms");

    let mut failures = 0usize;
    let mut counts: std::collections::BTreeMap<&'static str, usize> = Default::default();
    let mut last_run = 0usize;
    let quiet = cli.quiet;
    let mut on_step = |s: &Step| {
        if s.run != last_run {
            out!("---- lightningd restarted: fresh broker (run {}) ----", s.run);
            last_run = s.run;
        }
        let v = judge_against_recorded(s.msg_type, &s.reply, s.recorded_reply.as_deref());
        let mut text = verdict_text(&v).to_string();
        let mut bad = !v.is_ok();
        let mut detail = match &v {
            Verdict::Mismatch(d) | Verdict::Error(d) => Some(d.clone()),
            Verdict::Expected(d) => Some(d.to_string()),
            _ => None,
        };
        if let Some(o) = oracle_by_index.get(&s.index) {
            let same = match (&s.reply, &o.reply) {
                (Ok(a), Ok(b)) => a == b,
                (Err(_), Err(_)) => true,
                _ => false,
            };
            // The oracle is the stronger judge: identical to the in-process signer is correct.
            bad = !same;
            text = if same { format!("{text} oracle=ok") } else { "MISMATCH oracle".to_string() };
            if !same {
                detail = Some(match &o.reply {
                    Ok(b) => {
                        format!("oracle replied {} bytes type {}", b.len(), sphinx_wire::hsmd::msg_type(b).unwrap_or(0))
                    }
                    Err(e) => format!("oracle refused: {e}"),
                });
            }
        }
        *counts.entry(verdict_text(&v)).or_insert(0) += 1;
        if bad {
            failures += 1;
        }
        if !quiet || bad {
            let translated =
                if s.msg_type != s.recorded_type { format!(" (recorded {})", s.recorded_type) } else { String::new() };
            out!(
                "{:>4} {:>4} {:>5} {:<40} {:>10.3}  {}{}",
                s.index,
                s.conn,
                s.msg_type,
                format!("{}{}", s.name, translated),
                s.latency.as_secs_f64() * 1000.0,
                text,
                if bad || matches!(v, Verdict::Expected(_)) {
                    detail.map(|d| format!("  [{d}]")).unwrap_or_default()
                } else {
                    String::new()
                }
            );
        }
    };
    let report = replay::replay(&tr, &opts, &mut on_step)?;

    let mut lat: Vec<f64> =
        report.steps.iter().filter(|s| s.reply.is_ok()).map(|s| s.latency.as_secs_f64() * 1000.0).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| if lat.is_empty() { 0.0 } else { lat[((lat.len() - 1) as f64 * p).round() as usize] };
    out!("---- summary ----");
    out!("requests: {}   failures: {}", report.steps.len(), failures);
    out!("vs recorded CLN replies: {}", counts.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "));
    if oracle.is_some() {
        out!("vs in-process oracle: {} differ", failures);
    }
    out!("latency ms: p50 {:.3}  p90 {:.3}  max {:.3}", pct(0.5), pct(0.9), pct(1.0));
    for (i, e) in report.broker_exits.iter().enumerate() {
        match e {
            Ok(s) => out!("broker run {i}: {s} after fd 3 closed ({} status messages)", report.status_messages[i]),
            Err(e) => out!("broker run {i}: FAILED to exit cleanly: {e}"),
        }
    }
    let ok = failures == 0 && report.brokers_exited_cleanly();
    out!("{}", if ok { "RESULT: PASS" } else { "RESULT: FAIL" });
    Ok(ok)
}
