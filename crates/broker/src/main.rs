//! `sphinx-broker`: started by lightningd as its hsmd (`subdaemon=hsmd:/path/to/sphinx-broker`).

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use clap::Parser;
use nix::sys::stat::{fstat, SFlag};
use sphinx_broker::config::{Config, Overrides};
use tracing::error;

/// Exit codes: 0 lightningd closed the connection; 1 configuration; 2 usage; 3 runtime failure.
const EXIT_CONFIG: u8 = 1;
const EXIT_RUNTIME: u8 = 3;

/// The fd lightningd hands its hsmd for requests.
const REQUEST_FD: RawFd = 3;
/// The status socket (stdin).
const STATUS_FD: RawFd = 0;

/// A drop-in hsmd for Core Lightning that relays every request to a sphinx-key signer over an
/// embedded, authenticated MQTT broker.
///
/// Configuration: TOML file (--config, $SPHINX_BROKER_CONFIG, or ./sphinx-broker.toml), then
/// SPHINX_BROKER_* environment variables, then flags.
#[derive(Parser, Debug)]
#[command(name = "sphinx-broker", disable_version_flag = true)]
struct Cli {
    /// Print the CLN version this broker stands in for (lightningd checks it) and exit.
    #[arg(long)]
    version: bool,
    #[command(flatten)]
    config: Overrides,
    /// Log every hsmd message (lightningd passes this with --log-level=io).
    #[arg(long)]
    log_io: bool,
    /// Passed by lightningd in developer mode.
    #[arg(long)]
    developer: bool,
    /// Developer-mode options lightningd may pass (--dev-disconnect=…, …): accepted and ignored.
    #[arg(long = "dev-disconnect")]
    dev_disconnect: Option<String>,
}

fn is_socket(fd: RawFd) -> bool {
    fstat(fd).map(|st| SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFSOCK).unwrap_or(false)
}

fn main() -> ExitCode {
    // lightningd may pass developer flags we have no use for; drop unknown --dev-* flags
    // rather than refusing to start.
    let args: Vec<String> = std::env::args()
        .enumerate()
        .filter(|(i, a)| *i == 0 || !a.starts_with("--dev-") || a.starts_with("--dev-disconnect"))
        .map(|(_, a)| a)
        .collect();
    let cli = Cli::parse_from(args);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPHINX_BROKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if cli.log_io { "debug" } else { "info" })),
        )
        .init();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sphinx-broker: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.version {
        return match &cfg.cln_version {
            Some(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "sphinx-broker: cln_version is not set; set it to the exact output of `lightningd --version` \
                     (cln_version in the config file, SPHINX_BROKER_CLN_VERSION, or --cln-version)"
                );
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    if !is_socket(REQUEST_FD) {
        eprintln!(
            "sphinx-broker: fd 3 is not a socket. This program is started by lightningd as its hsmd: \
             put `subdaemon=hsmd:/absolute/path/to/sphinx-broker` in CLN's config"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    // SAFETY: fd 3 (and fd 0 when it is a socket) are handed to us by lightningd and owned by
    // nothing else in this process; we checked fd 3 is a socket.
    let root = unsafe { UnixStream::from_raw_fd(REQUEST_FD) };
    let status = is_socket(STATUS_FD).then(|| unsafe { UnixStream::from_raw_fd(STATUS_FD) });
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sphinx-broker: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match rt.block_on(sphinx_broker::run_hsmd(&cfg, root, status, cli.log_io)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("fatal: {e:#}");
            eprintln!("sphinx-broker: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
