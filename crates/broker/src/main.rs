//! `sphinx-broker`: started by lightningd as its hsmd (`subdaemon=hsmd:/path/to/sphinx-broker`).

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nix::sys::stat::{fstat, SFlag};
use sphinx_broker::config::{parse_network, Config};
use tracing::error;

/// Exit codes: 0 lightningd closed the connection; 1 configuration; 2 usage; 3 runtime failure.
const EXIT_CONFIG: u8 = 1;
const EXIT_RUNTIME: u8 = 3;

/// The fd lightningd hands its hsmd for requests.
const REQUEST_FD: RawFd = 3;
/// The status socket (stdin).
const STATUS_FD: RawFd = 0;
/// The API token, from the environment only (a flag would show it in `ps`).
const API_TOKEN_ENV: &str = "SPHINX_BROKER_API_TOKEN";

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
    /// TOML configuration file.
    #[arg(long, env = "SPHINX_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// The exact `lightningd --version` line, e.g. v25.12.1.
    #[arg(long, env = "SPHINX_BROKER_CLN_VERSION")]
    cln_version: Option<String>,
    /// Chain: bitcoin, testnet, testnet4, signet, regtest.
    #[arg(long, env = "SPHINX_BROKER_NETWORK")]
    network: Option<String>,
    /// State directory (pinned signer key).
    #[arg(long, env = "SPHINX_BROKER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The signer's node id (`sphinx-key node-id`): pinned at start instead of on first use.
    #[arg(long, env = "SPHINX_BROKER_SIGNER_NODE_ID")]
    signer_node_id: Option<String>,
    /// Embedded MQTT listen address.
    #[arg(long, env = "SPHINX_BROKER_MQTT_LISTEN")]
    mqtt_listen: Option<std::net::SocketAddr>,
    /// MQTT over TLS: certificate chain (PEM); needs --mqtt-tls-key.
    #[arg(long, env = "SPHINX_BROKER_MQTT_TLS_CERT")]
    mqtt_tls_cert: Option<PathBuf>,
    /// MQTT over TLS: the certificate's private key (PEM); needs --mqtt-tls-cert.
    #[arg(long, env = "SPHINX_BROKER_MQTT_TLS_KEY")]
    mqtt_tls_key: Option<PathBuf>,
    /// Allow plaintext MQTT on a non-loopback address (refused otherwise).
    #[arg(long, env = "SPHINX_BROKER_MQTT_ALLOW_PLAINTEXT_NON_LOOPBACK", value_parser = clap::builder::BoolishValueParser::new())]
    mqtt_allow_plaintext_non_loopback: bool,
    /// Operator HTTP API listen address (the API is off without one; loopback only unless
    /// --api-allow-non-loopback). Needs a token: SPHINX_BROKER_API_TOKEN_FILE (or
    /// SPHINX_BROKER_API_TOKEN, or [api] token_file in the config file).
    #[arg(long, env = "SPHINX_BROKER_API_LISTEN")]
    api_listen: Option<std::net::SocketAddr>,
    /// File holding the API's bearer token (at least 16 characters). There is deliberately no
    /// flag for the token itself: command lines are visible to every local user.
    #[arg(long, env = "SPHINX_BROKER_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Allow the API on a non-loopback address (it is plain HTTP: prefer a tunnel or TLS proxy).
    #[arg(long, env = "SPHINX_BROKER_API_ALLOW_NON_LOOPBACK", value_parser = clap::builder::BoolishValueParser::new())]
    api_allow_non_loopback: bool,
    /// Longest a control call waits for the signer's response, seconds (default 10).
    #[arg(long, env = "SPHINX_BROKER_API_CONTROL_TIMEOUT")]
    api_control_timeout: Option<u64>,
    /// Per-request reply bound, seconds.
    #[arg(long, env = "SPHINX_BROKER_REQUEST_TIMEOUT")]
    request_timeout: Option<u64>,
    /// bitcoind JSON-RPC URL to follow (http://user:password@host:port); chain tracking is off without one.
    #[arg(long, env = "SPHINX_BROKER_BITCOIND_URL")]
    bitcoind_url: Option<String>,
    /// bitcoind's .cookie file, used when the URL carries no user:password.
    #[arg(long, env = "SPHINX_BROKER_BITCOIND_COOKIE")]
    bitcoind_cookie: Option<PathBuf>,
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

fn load_config(cli: &Cli) -> Result<Config, String> {
    let mut cfg = Config::default();
    let file = cli.config.clone().or_else(|| {
        let p = PathBuf::from("sphinx-broker.toml");
        p.exists().then_some(p)
    });
    if let Some(f) = &file {
        cfg.merge_file(f).map_err(|e| e.to_string())?;
    }
    if let Some(v) = &cli.cln_version {
        cfg.cln_version = Some(v.clone());
    }
    if let Some(n) = &cli.network {
        cfg.network = parse_network(n).map_err(|e| e.to_string())?;
    }
    if let Some(d) = &cli.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(id) = &cli.signer_node_id {
        cfg.signer_node_id = Some(id.clone());
    }
    if let Some(l) = cli.mqtt_listen {
        cfg.mqtt.listen = l;
    }
    if let Some(c) = &cli.mqtt_tls_cert {
        cfg.mqtt.tls_cert = Some(c.clone());
    }
    if let Some(k) = &cli.mqtt_tls_key {
        cfg.mqtt.tls_key = Some(k.clone());
    }
    if cli.mqtt_allow_plaintext_non_loopback {
        cfg.mqtt.allow_plaintext_non_loopback = true;
    }
    if let Some(l) = cli.api_listen {
        cfg.api.listen = Some(l);
    }
    // The token itself only from the environment (or the file): never a flag.
    let env_token = std::env::var(API_TOKEN_ENV).ok().filter(|t| !t.is_empty());
    match (env_token, &cli.api_token_file) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "set {API_TOKEN_ENV} or the API token file (SPHINX_BROKER_API_TOKEN_FILE / --api-token-file), not both"
            ))
        }
        (Some(t), None) => cfg.api.set_token(&t).map_err(|e| format!("{API_TOKEN_ENV}: {e}"))?,
        (None, Some(f)) => cfg.api.set_token_file(f.clone()),
        (None, None) => {}
    }
    if cli.api_allow_non_loopback {
        cfg.api.allow_non_loopback = true;
    }
    if let Some(t) = cli.api_control_timeout {
        cfg.api.control_timeout = std::time::Duration::from_secs(t);
    }
    cfg.load_api_token().map_err(|e| e.to_string())?;
    if let Some(t) = cli.request_timeout {
        cfg.relay.request_timeout = std::time::Duration::from_secs(t);
    }
    if let Some(u) = &cli.bitcoind_url {
        cfg.bitcoind.url = Some(u.clone());
    }
    if let Some(c) = &cli.bitcoind_cookie {
        cfg.bitcoind.cookie_file = Some(c.clone());
    }
    cfg.bitcoind.check(cfg.network).map_err(|e| e.to_string())?;
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
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
    let cfg = match load_config(&cli) {
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
