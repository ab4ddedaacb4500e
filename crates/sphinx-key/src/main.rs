//! `sphinx-key`: the signer device for Linux. `init` creates the seed; `run` connects to the
//! broker over MQTT (optionally TLS) and answers hsmd requests and owner control messages with
//! the VLS signer (`sphinx_signer`); `ctl` is the owner's tool for control messages.
//!
//! Settings come from, in order of precedence: command-line flags, `SPHINX_KEY_*` environment
//! variables, the TOML config file (`--config`, else `{data_dir}/sphinx-key.toml` if present),
//! and built-in defaults. See docs/signer.md.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod ctl;
mod http;
mod indicator;
mod observe;
mod passphrase;
mod seed;
mod seedcrypt;
mod web;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bitcoin::Network;
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use sphinx_signer::{ClockConfig, PolicyConfig, Signer, SignerConfig, Status, StatusIndicator};

/// Name of the config file looked for in the data directory.
const CONFIG_FILE: &str = "sphinx-key.toml";
/// Default log filter: our crates at info, VLS's per-request chatter at warn.
const DEFAULT_LOG: &str = "info,lightning_signer=warn,vls_protocol_signer=warn,vls_persist=warn";
/// Name of the VLS state directory inside the data directory.
const STATE_DIR: &str = "state";
/// Default network.
const DEFAULT_NETWORK: &str = "regtest";
/// Default broker address.
const DEFAULT_BROKER: &str = "127.0.0.1:1883";
/// Default status indicator.
const DEFAULT_STATUS: &str = "terminal";
/// Default MQTT keep-alive, seconds.
const DEFAULT_KEEP_ALIVE_SECS: u64 = 10;
/// `--batch-max` / `batch_max` default.
const DEFAULT_BATCH_MAX: u16 = 32;
/// Default cap of the reconnect backoff, seconds.
const DEFAULT_BACKOFF_MAX_SECS: u64 = 30;

#[derive(Parser, Debug)]
#[command(name = "sphinx-key", version, about = "Remote Lightning signer device: VLS over MQTT")]
struct Cli {
    /// TOML config file (default: {data_dir}/sphinx-key.toml if it exists).
    #[arg(long, env = "SPHINX_KEY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Data directory: seed and state (default: $HOME/.sphinx-key).
    #[arg(long, env = "SPHINX_KEY_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Bitcoin network: bitcoin, testnet, testnet4, signet, regtest (default: regtest).
    #[arg(long, env = "SPHINX_KEY_NETWORK", global = true)]
    network: Option<String>,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `sphinx_key=debug` (default: info, VLS crates at warn).
    #[arg(long, env = "SPHINX_KEY_LOG", global = true)]
    log: Option<String>,
    /// Read the seed's passphrase from this file (default: the systemd credential, else the terminal).
    #[arg(long, value_name = "FILE", env = "SPHINX_KEY_PASSPHRASE_FILE", global = true)]
    passphrase_file: Option<PathBuf>,
    /// Name of the systemd credential with the passphrase, read from $CREDENTIALS_DIRECTORY
    /// (default: sphinx-key-passphrase).
    #[arg(long, value_name = "NAME", env = "SPHINX_KEY_PASSPHRASE_CREDENTIAL", global = true)]
    passphrase_credential: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the seed file (0600) in the data directory and print the node id.
    Init {
        /// Import a BIP39 mnemonic (seed = first 32 bytes of its BIP39 seed, empty passphrase).
        #[arg(long, env = "SPHINX_KEY_MNEMONIC", conflicts_with = "seed_hex")]
        mnemonic: Option<String>,
        /// Import a raw 32-byte seed in hex (e.g. a legacy CLN hsm_secret).
        #[arg(long)]
        seed_hex: Option<String>,
        /// Owner public key (33 bytes, hex) that signs control messages; default: the node key.
        #[arg(long, env = "SPHINX_KEY_OWNER_PUBKEY")]
        owner_pubkey: Option<String>,
        /// Encrypt the seed with a passphrase (asked twice on the terminal, or read from
        /// --passphrase-file or the systemd credential).
        #[arg(long)]
        encrypt: bool,
    },
    /// Encrypt an existing plaintext seed with a passphrase (the file is replaced atomically).
    Encrypt,
    /// Change the passphrase of an encrypted seed (the old one from --passphrase-file, the
    /// credential or the terminal; the new one from --new-passphrase-file or the terminal).
    ChangePassphrase {
        /// Read the new passphrase from this file instead of the terminal.
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Print the node id of the existing seed.
    NodeId,
    /// Connect to the broker and sign.
    Run {
        /// Broker address HOST:PORT (default: 127.0.0.1:1883).
        #[arg(long, env = "SPHINX_KEY_BROKER")]
        broker: Option<String>,
        /// Demote policy violations to warnings and approve everything (operators only).
        #[arg(long, env = "SPHINX_KEY_PERMISSIVE")]
        permissive: bool,
        /// Freeze the signer's clock at UNIX_SECS (tests and replays only).
        #[arg(long, value_name = "UNIX_SECS", env = "SPHINX_KEY_DEV_FIXED_CLOCK")]
        dev_fixed_clock: Option<u64>,
        /// Group commit: at most this many requests already received are handled and committed
        /// in one durable transaction (1: one commit per request).
        /// File key `batch_max`. Default 32.
        #[arg(long, value_name = "N", env = "SPHINX_KEY_BATCH_MAX",
              value_parser = clap::value_parser!(u16).range(1..=64))]
        batch_max: Option<u16>,
        /// Threads a batch's requests of different channels are signed on (0: one per CPU, at
        /// most 8; 1: one at a time). File key `sign_threads`. Default 1: a second thread pays
        /// only on a device whose cores nothing else needs (docs/benchmarks.md).
        #[arg(long, value_name = "N", env = "SPHINX_KEY_SIGN_THREADS",
              value_parser = clap::value_parser!(u16).range(0..=8))]
        sign_threads: Option<u16>,
        /// Status indicator: `terminal`, `led:NAME` (/sys/class/leds/NAME) or `none`.
        #[arg(long, env = "SPHINX_KEY_STATUS")]
        status: Option<String>,
        /// Connect with TLS, trusting the CA certificate(s) in this PEM file (the broker's host
        /// name or IP must be in its certificate).
        #[arg(long, value_name = "FILE", env = "SPHINX_KEY_TLS_CA", conflicts_with = "tls_fingerprint")]
        tls_ca: Option<PathBuf>,
        /// Connect with TLS, accepting exactly the broker certificate with this SHA-256
        /// fingerprint (hex, `AB:CD:…` as openssl prints it).
        #[arg(long, value_name = "HEX", env = "SPHINX_KEY_TLS_FINGERPRINT")]
        tls_fingerprint: Option<String>,
        /// Allow a plaintext connection to a broker that is not on loopback (off by default:
        /// on an open network, the login token and every request would travel in the clear).
        #[arg(long, env = "SPHINX_KEY_ALLOW_PLAINTEXT")]
        allow_plaintext: bool,
        /// Sign for a broker that does not sync this device with LSS although its state was
        /// backed up to LSS (off by default: a broker could otherwise stop the backups, and a
        /// standby restored from LSS would then sign on older state). File key
        /// `allow_without_lss`.
        #[arg(long, env = "SPHINX_KEY_ALLOW_WITHOUT_LSS")]
        allow_without_lss: bool,
        /// The LSS server (compressed public key, hex) this device is backed up to: the broker
        /// must offer exactly this one. Default: the server of the device's first init dance,
        /// pinned then. Set it to move the device to another server. File key
        /// `lss_server_pubkey`.
        #[arg(long, value_name = "HEX", env = "SPHINX_KEY_LSS_SERVER_PUBKEY")]
        lss_server_pubkey: Option<String>,
        /// Serve Prometheus metrics (/metrics) and a status page (/) on ADDR, e.g.
        /// 127.0.0.1:9091 (default: off).
        #[arg(long, value_name = "ADDR", env = "SPHINX_KEY_METRICS_LISTEN")]
        metrics_listen: Option<String>,
        /// Allow a non-loopback --metrics-listen address (unauthenticated, read-only).
        #[arg(long, env = "SPHINX_KEY_METRICS_ALLOW_NON_LOOPBACK")]
        metrics_allow_non_loopback: bool,
        /// MQTT client id: this device's name at the broker and its topic prefix (default:
        /// generated once at random and kept in {data_dir}/client-id, so that two devices with
        /// one seed differ).
        #[arg(long, value_name = "ID", env = "SPHINX_KEY_CLIENT_ID")]
        client_id: Option<String>,
    },
    /// Owner control: sign a control message, send it through the broker API, verify and print
    /// the device's answer as JSON (exit code 1 if the device refused it).
    Ctl(ctl::CtlArgs),
}

/// The TOML config file. Every key is optional; flags and environment variables override it.
/// `contrib/sphinx-key.toml` documents every key with its default ([`FileConfig::builtin`]).
#[derive(Deserialize, Serialize, Default, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    network: Option<String>,
    log: Option<String>,
    broker: Option<String>,
    permissive: Option<bool>,
    dev_fixed_clock: Option<u64>,
    status: Option<String>,
    keep_alive_secs: Option<u64>,
    backoff_max_secs: Option<u64>,
    sweep_min_feerate_per_kw: Option<u32>,
    approve_payments: Option<bool>,
    approve_onchain: Option<bool>,
    allowlist: Option<Vec<String>>,
    tls_ca: Option<PathBuf>,
    tls_fingerprint: Option<String>,
    allow_plaintext: Option<bool>,
    /// Sign without LSS although the state was backed up (`--allow-without-lss`).
    allow_without_lss: Option<bool>,
    /// The LSS server key the device is backed up to (`--lss-server-pubkey`).
    lss_server_pubkey: Option<String>,
    /// Initial owner limits (used until the owner sends an UpdatePolicy).
    msat_per_interval: Option<u64>,
    interval: Option<sphinx_wire::control::Interval>,
    htlc_limit_msat: Option<u64>,
    passphrase_file: Option<PathBuf>,
    passphrase_credential: Option<String>,
    metrics_listen: Option<String>,
    metrics_allow_non_loopback: Option<bool>,
    /// MQTT client id (default: generated once, kept in `{data_dir}/client-id`).
    client_id: Option<String>,
    /// Group commit bound (`--batch-max`), 1..=64.
    batch_max: Option<u16>,
    /// Signing threads (`--sign-threads`), 0 (one per CPU) ..= 8.
    sign_threads: Option<u16>,
}

impl FileConfig {
    /// The built-in defaults, as the keys of a config file (`None`: no default, e.g. TLS).
    fn builtin() -> FileConfig {
        let p = PolicyConfig::default();
        FileConfig {
            network: Some(DEFAULT_NETWORK.into()),
            log: Some(DEFAULT_LOG.into()),
            broker: Some(DEFAULT_BROKER.into()),
            permissive: Some(p.permissive),
            status: Some(DEFAULT_STATUS.into()),
            keep_alive_secs: Some(DEFAULT_KEEP_ALIVE_SECS),
            backoff_max_secs: Some(DEFAULT_BACKOFF_MAX_SECS),
            sweep_min_feerate_per_kw: Some(p.sweep_min_feerate_per_kw),
            approve_payments: Some(p.approve_payments),
            approve_onchain: Some(p.approve_onchain),
            allowlist: Some(p.allowlist),
            allow_plaintext: Some(false),
            allow_without_lss: Some(false),
            msat_per_interval: Some(p.limits.msat_per_interval),
            interval: Some(p.limits.interval),
            htlc_limit_msat: Some(p.limits.htlc_limit_msat),
            passphrase_credential: Some(passphrase::DEFAULT_CREDENTIAL.into()),
            metrics_allow_non_loopback: Some(false),
            batch_max: Some(DEFAULT_BATCH_MAX),
            sign_threads: Some(1),
            ..FileConfig::default()
        }
    }

    /// `self`, with every key it does not set taken from [`FileConfig::builtin`].
    fn with_builtin(self) -> Result<FileConfig> {
        let mut v = serde_json::to_value(&self)?;
        if let (Some(m), serde_json::Value::Object(d)) = (v.as_object_mut(), serde_json::to_value(Self::builtin())?) {
            for (k, dv) in d {
                if m.get(&k).is_none_or(|x| x.is_null()) {
                    m.insert(k, dv);
                }
            }
        }
        Ok(serde_json::from_value(v)?)
    }
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".sphinx-key")
}

fn parse_network(s: &str) -> Result<Network> {
    let s = s.trim().to_ascii_lowercase();
    let s = if s == "mainnet" { "bitcoin".to_string() } else { s };
    Network::from_str(&s)
        .map_err(|_| anyhow::anyhow!("unknown network {s:?} (expected bitcoin, testnet, testnet4, signet or regtest)"))
}

/// The config file, with the built-in default of every key it does not set.
fn load_file(cli: &Cli) -> Result<FileConfig> {
    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (cli.data_dir.clone().unwrap_or_else(default_data_dir).join(CONFIG_FILE), false),
    };
    if !explicit && !path.exists() {
        return FileConfig::default().with_builtin();
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read config file {}", path.display()))?;
    let file: FileConfig = toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    file.with_builtin()
}

/// `localhost` or a loopback IP: the only hosts a plaintext connection goes to by default.
fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn parse_broker(s: &str) -> Result<(String, u16)> {
    let (h, p) = s.rsplit_once(':').with_context(|| format!("broker {s:?} must be HOST:PORT"))?;
    let port = p.parse().with_context(|| format!("bad broker port in {s:?}"))?;
    let host = h.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("broker {s:?} has no host");
    }
    Ok((host.to_string(), port))
}

fn indicator(spec: &str) -> Result<Box<dyn StatusIndicator>> {
    Ok(match spec {
        "terminal" => Box::new(indicator::Terminal::default()),
        "none" => Box::new(sphinx_signer::NoIndicator),
        s if s.starts_with("led:") && s.len() > 4 => Box::new(indicator::Led::new(&s[4..])),
        s => bail!("unknown status indicator {s:?} (expected terminal, led:NAME or none)"),
    })
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = real_main(cli) {
        eprintln!("sphinx-key: {e:#}");
        let code = if e.downcast_ref::<seed::NeedsInit>().is_some() {
            seed::EXIT_NEEDS_INIT
        } else if e.downcast_ref::<seed::WrongPassphrase>().is_some() {
            seed::EXIT_WRONG_PASSPHRASE
        } else {
            1
        };
        std::process::exit(code);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let file = load_file(&cli)?;
    let log = cli.log.clone().or(file.log.clone()).unwrap_or_else(|| DEFAULT_LOG.into());
    let network_name = cli.network.clone().or(file.network.clone()).unwrap_or_else(|| DEFAULT_NETWORK.into());
    let obs = observe::Observer::new(&network_name);
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let filter = tracing_subscriber::EnvFilter::try_new(&log).context("bad --log filter")?;
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        // The observer sees warnings and errors whatever the log filter (metrics, status page).
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .with(observe::Layer(obs.clone()).with_filter(tracing_subscriber::filter::LevelFilter::WARN))
            .init();
    }
    // The signer catches VLS panics and carries on; log them instead of printing raw backtraces.
    std::panic::set_hook(Box::new(|info| tracing::error!("panic: {info}")));
    let data_dir = cli.data_dir.clone().or(file.data_dir.clone()).unwrap_or_else(default_data_dir);
    let network = parse_network(&network_name)?;
    let pass = passphrase::Source::new(
        cli.passphrase_file.clone().or(file.passphrase_file.clone()),
        cli.passphrase_credential.clone().or(file.passphrase_credential.clone()),
    );

    match cli.cmd {
        Cmd::Init { mnemonic, seed_hex, owner_pubkey, encrypt } => {
            let owner = owner_pubkey.map(|h| seed::parse_pubkey(&h).context("--owner-pubkey")).transpose()?;
            let passphrase = if encrypt { Some(pass.new_passphrase()?) } else { None };
            init(&data_dir, network, mnemonic, seed_hex, owner, passphrase.as_deref().map(String::as_str))
        }
        Cmd::Encrypt => {
            let seed = match seed::load(&data_dir)? {
                seed::SeedFile::Plain(s) => s,
                seed::SeedFile::Encrypted(_) => {
                    bail!("the seed is already encrypted: use `sphinx-key change-passphrase`")
                }
            };
            let p = seed::rewrite_encrypted(&data_dir, &seed, &pass.new_passphrase()?)?;
            tracing::warn!(seed = %p.display(), "seed encrypted; the plaintext may survive in the storage's free blocks (see SECURITY.md)");
            Ok(())
        }
        Cmd::ChangePassphrase { new_passphrase_file } => {
            let seed::SeedFile::Encrypted(sealed) = seed::load(&data_dir)? else {
                bail!("the seed is not encrypted: use `sphinx-key encrypt`");
            };
            let seed = seed::unlock(&data_dir, &sealed, &pass)?;
            let new = passphrase::Source { file: new_passphrase_file, ..Default::default() }.new_passphrase()?;
            let p = seed::rewrite_encrypted(&data_dir, &seed, &new)?;
            tracing::info!(seed = %p.display(), "passphrase changed");
            Ok(())
        }
        Cmd::Ctl(args) if matches!(args.msg, ctl::CtlCmd::Signers { .. }) => {
            let json = matches!(args.msg, ctl::CtlCmd::Signers { json: true });
            print!("{}", ctl::signers(&args, json)?);
            if json {
                println!();
            }
            Ok(())
        }
        Cmd::Ctl(args) => {
            let seed = if args.node_id.is_some() && args.owner_key_file.is_some() {
                None
            } else {
                match seed::read(&data_dir, &pass) {
                    Ok(s) => Some(*s),
                    Err(e) if e.downcast_ref::<seed::NeedsInit>().is_some() => None,
                    Err(e) => return Err(e),
                }
            };
            let r = ctl::run(args, seed, network)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            if let sphinx_wire::control::ControlResponse::Error(e) = r {
                bail!("the device refused the request: {e}");
            }
            Ok(())
        }
        Cmd::NodeId => {
            let seed = seed::read(&data_dir, &pass)?;
            println!("{}", hex::encode(sphinx_signer::node_id_for_seed(&seed, network)));
            Ok(())
        }
        Cmd::Run {
            broker,
            permissive,
            dev_fixed_clock,
            batch_max,
            sign_threads,
            status,
            tls_ca,
            tls_fingerprint,
            allow_plaintext,
            allow_without_lss,
            lss_server_pubkey,
            metrics_listen,
            metrics_allow_non_loopback,
            client_id,
        } => {
            let broker = broker.or(file.broker.clone()).unwrap_or_else(|| DEFAULT_BROKER.into());
            let (host, port) = parse_broker(&broker)?;
            let status = status.or(file.status.clone()).unwrap_or_else(|| DEFAULT_STATUS.into());
            let mut ind: Box<dyn StatusIndicator> = Box::new(observe::Observed::new(indicator(&status)?, obs.clone()));
            ind.set(Status::Starting);
            if let Some(addr) = metrics_listen.or(file.metrics_listen.clone()) {
                let addr = addr.parse().with_context(|| format!("bad metrics listen address {addr:?} (IP:PORT)"))?;
                let allow = metrics_allow_non_loopback || file.metrics_allow_non_loopback.unwrap_or(false);
                web::start(addr, allow, obs.clone())?;
            }
            let defaults = PolicyConfig::default();
            let policy = PolicyConfig {
                permissive: permissive || file.permissive.unwrap_or(false),
                sweep_min_feerate_per_kw: file.sweep_min_feerate_per_kw.unwrap_or(defaults.sweep_min_feerate_per_kw),
                approve_payments: file.approve_payments.unwrap_or(defaults.approve_payments),
                approve_onchain: file.approve_onchain.unwrap_or(defaults.approve_onchain),
                allowlist: file.allowlist.clone().unwrap_or_default(),
                limits: sphinx_wire::control::Policy {
                    msat_per_interval: file.msat_per_interval.unwrap_or(defaults.limits.msat_per_interval),
                    interval: file.interval.unwrap_or(defaults.limits.interval),
                    htlc_limit_msat: file.htlc_limit_msat.unwrap_or(defaults.limits.htlc_limit_msat),
                },
            };
            if policy.permissive {
                tracing::warn!("PERMISSIVE policy: violations are only logged and everything is approved");
            }
            let clock = match dev_fixed_clock.or(file.dev_fixed_clock) {
                Some(t) => {
                    tracing::warn!(t, "signer clock frozen (--dev-fixed-clock): not for real use");
                    ClockConfig::Fixed(t)
                }
                None => ClockConfig::System,
            };
            let cfg = SignerConfig { network, policy, clock };
            let seed = seed::read(&data_dir, &pass)?;
            let state_dir = data_dir.join(STATE_DIR);
            let mut signer = match Signer::open(*seed, &state_dir, &cfg) {
                Ok(s) => s,
                Err(e @ sphinx_signer::Error::WrongSeed { .. }) => bail!(
                    "{e}. The state directory {} belongs to another node (was the seed reset by the owner and a \
                     new one created?): re-import that node's seed, or move the state directory away to start a new node",
                    state_dir.display()
                ),
                Err(e) => return Err(e).context("cannot open signer state"),
            };
            obs.set_node_id(&signer.node_id_hex());
            let batch_max = match batch_max.or(file.batch_max).unwrap_or(DEFAULT_BATCH_MAX) {
                n @ 1..=64 => n,
                n => bail!("batch_max = {n}: must be 1..=64"),
            };
            let sign_threads = match sign_threads.or(file.sign_threads).unwrap_or(1) {
                n @ 0..=8 => n,
                n => bail!("sign_threads = {n}: must be 0..=8"),
            };
            let threads = match sign_threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => usize::from(n),
            };
            signer.set_sign_threads(threads);
            if allow_without_lss || file.allow_without_lss.unwrap_or(false) {
                tracing::warn!(
                    "allow_without_lss: this device signs for a broker without LSS even if its state was backed up"
                );
                signer.set_allow_without_lss(true);
            }
            if let Some(hex_key) = lss_server_pubkey.or(file.lss_server_pubkey.clone()) {
                signer.set_lss_server(Some(seed::parse_pubkey(&hex_key).context("lss_server_pubkey")?.serialize()));
            }
            if let Some(owner) = seed::read_owner(&data_dir)? {
                tracing::info!(%owner, "control messages must be signed by the owner key");
                signer.set_owner_key(owner);
            }
            // Only once the seed is unlocked and the state opened: a run that stops before (wrong
            // passphrase, no seed) leaves the data directory as it was.
            let client_id = match client_id.or(file.client_id.clone()) {
                Some(c) => check_client_id(&c)?,
                None => stored_client_id(&data_dir)?,
            };
            let tls = match (tls_ca.or(file.tls_ca.clone()), tls_fingerprint.or(file.tls_fingerprint.clone())) {
                (Some(_), Some(_)) => bail!("give either a TLS CA file or a certificate fingerprint, not both"),
                (Some(ca), None) => Some(sphinx_tls::ServerTrust::CaFile(ca)),
                (None, Some(fp)) => Some(sphinx_tls::ServerTrust::Pinned(fp.parse().context("bad --tls-fingerprint")?)),
                (None, None) => None,
            };
            if tls.is_none() && !is_loopback_host(&host) && !(allow_plaintext || file.allow_plaintext.unwrap_or(false))
            {
                bail!(
                    "broker {host} is not on loopback: connect with TLS (--tls-ca FILE or --tls-fingerprint HEX), \
                     or pass --allow-plaintext if the link is already protected (VPN, SSH tunnel)"
                );
            }
            let rc = client::RunConfig {
                host,
                port,
                keep_alive: Duration::from_secs(file.keep_alive_secs.unwrap_or(DEFAULT_KEEP_ALIVE_SECS).max(1)),
                backoff_min: Duration::from_millis(250),
                backoff_max: Duration::from_secs(file.backoff_max_secs.unwrap_or(DEFAULT_BACKOFF_MAX_SECS).max(1)),
                tls: tls.map(|t| sphinx_tls::client_config(&t).context("TLS configuration")).transpose()?,
                data_dir: data_dir.clone(),
                batch_max: usize::from(batch_max),
                client_id,
                observer: Some(obs.clone()),
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(client::run(signer, ind, rc))
        }
    }
}

/// Name of the file in the data directory that keeps the generated client id.
const CLIENT_ID_FILE: &str = "client-id";
/// Longest client id (the broker refuses longer ones).
const MAX_CLIENT_ID: usize = 128;

/// `c` if the broker can use it as an identity and topic prefix: 1..=128 bytes, no `/`, `+`,
/// `#`, NUL or whitespace, not starting with `$`.
fn check_client_id(c: &str) -> Result<String> {
    let ok = !c.is_empty()
        && c.len() <= MAX_CLIENT_ID
        && !c.starts_with('$')
        && !c.contains(['/', '+', '#', '\0'])
        && !c.chars().any(char::is_whitespace);
    if !ok {
        bail!("client id {c:?}: expected 1..={MAX_CLIENT_ID} bytes without '/', '+', '#', NUL or spaces, not starting with '$'");
    }
    Ok(c.to_string())
}

/// The client id kept in `{data_dir}/client-id`; generated at random (and written durably)
/// the first time.
fn stored_client_id(data_dir: &Path) -> Result<String> {
    let path = data_dir.join(CLIENT_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return check_client_id(text.trim()).with_context(|| format!("bad client id in {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let mut raw = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
    let id = format!("sphinx-key-{}", hex::encode(raw));
    std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let tmp = data_dir.join(format!("{CLIENT_ID_FILE}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::File::open(data_dir)?.sync_all()?;
    tracing::info!(client_id = %id, file = %path.display(), "generated this device's MQTT client id");
    Ok(id)
}

fn init(
    data_dir: &Path,
    network: Network,
    mnemonic: Option<String>,
    seed_hex: Option<String>,
    owner: Option<bitcoin::secp256k1::PublicKey>,
    passphrase: Option<&str>,
) -> Result<()> {
    let seed = zeroize::Zeroizing::new(match (mnemonic, seed_hex) {
        (Some(m), _) => seed::seed_from_mnemonic(&m)?,
        (None, Some(h)) => seed::seed_from_hex(&h)?,
        (None, None) => {
            let mut s = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut s);
            s
        }
    });
    let path = seed::write_new(data_dir, &seed, passphrase)?;
    tracing::info!(seed = %path.display(), encrypted = passphrase.is_some(), "seed written");
    match owner {
        Some(o) => {
            let p = seed::write_owner(data_dir, &o)?;
            tracing::info!(owner = %o, file = %p.display(), "owner key written");
        }
        None => {
            // A stale owner key (e.g. after ResetKeys) must not outlive the seed it was set with.
            let p = data_dir.join(seed::OWNER_FILE);
            if p.exists() {
                tracing::warn!(file = %p.display(), "an owner key from before is kept: control messages must be signed by it");
            }
        }
    }
    println!("{}", hex::encode(sphinx_signer::node_id_for_seed(&seed, network)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "sphinx-key",
            "run",
            "--broker",
            "127.0.0.1:1884",
            "--permissive",
            "--dev-fixed-clock",
            "5",
            "--status",
            "led:x",
            "--network",
            "regtest",
        ])
        .unwrap();
        assert!(Cli::try_parse_from(["sphinx-key", "run", "--tls-ca", "a", "--tls-fingerprint", "b"]).is_err());
        let c2 = Cli::try_parse_from([
            "sphinx-key",
            "ctl",
            "--token",
            "t",
            "--nonce",
            "3",
            "update-policy",
            "--msat-per-interval",
            "5",
            "--interval",
            "hourly",
        ])
        .unwrap();
        assert!(matches!(c2.cmd, Cmd::Ctl(ctl::CtlArgs { nonce: Some(3), msg: ctl::CtlCmd::UpdatePolicy { .. }, .. })));
        assert!(Cli::try_parse_from(["sphinx-key", "ctl", "update-allowlist", "a", "b"]).is_ok());
        assert!(matches!(c.cmd, Cmd::Run { permissive: true, dev_fixed_clock: Some(5), .. }));
        assert_eq!(parse_broker("127.0.0.1:1883").unwrap(), ("127.0.0.1".into(), 1883));
        assert_eq!(parse_broker("[::1]:1883").unwrap(), ("::1".into(), 1883));
        assert!(parse_broker("nope").is_err());
        assert!(is_loopback_host("127.0.0.1") && is_loopback_host("::1") && is_loopback_host("localhost"));
        assert!(!is_loopback_host("10.0.0.1") && !is_loopback_host("cln-host.example"));
        assert_eq!(parse_network("mainnet").unwrap(), Network::Bitcoin);
        assert!(parse_network("x").is_err());
        let f: FileConfig = toml::from_str("broker = \"h:1\"\nsweep_min_feerate_per_kw = 200\n").unwrap();
        let g: FileConfig =
            toml::from_str("interval = \"hourly\"\nmsat_per_interval = 5\ntls_fingerprint = \"ab\"\n").unwrap();
        assert_eq!(g.interval, Some(sphinx_wire::control::Interval::Hourly));
        assert_eq!(f.sweep_min_feerate_per_kw, Some(200));
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
        let e = Cli::try_parse_from(["sphinx-key", "--passphrase-file", "p", "init", "--encrypt"]).unwrap();
        assert!(matches!(e.cmd, Cmd::Init { encrypt: true, .. }) && e.passphrase_file.is_some());
        let m = Cli::try_parse_from(["sphinx-key", "run", "--metrics-listen", "127.0.0.1:9091"]).unwrap();
        assert!(matches!(m.cmd, Cmd::Run { metrics_listen: Some(_), metrics_allow_non_loopback: false, .. }));
        assert!(Cli::try_parse_from(["sphinx-key", "change-passphrase", "--new-passphrase-file", "n"]).is_ok());
        assert!(Cli::try_parse_from(["sphinx-key", "encrypt"]).is_ok());
    }

    /// `contrib/sphinx-key.toml` sets every key that has a default to that default, and shows
    /// every other key commented out: the example cannot drift from the code.
    #[test]
    fn example_config_is_every_key_at_its_default() {
        let text = include_str!("../../../contrib/sphinx-key.toml");
        let example: FileConfig = toml::from_str(text).unwrap();
        assert_eq!(example, FileConfig::builtin());
        assert_eq!(FileConfig::default().with_builtin().unwrap(), FileConfig::builtin());
        let keys = serde_json::to_value(FileConfig::default()).unwrap();
        let keys = keys.as_object().unwrap();
        for k in keys.keys() {
            let set = |l: &str| l.starts_with(&format!("{k} = ")) || l.starts_with(&format!("# {k} = "));
            assert_eq!(text.lines().filter(|l| set(l)).count(), 1, "key {k} must appear once in the example");
        }
        // Uncommented, the examples of the keys without a default are valid too.
        let all: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(r) if r.split_once(" = ").is_some_and(|(k, _)| keys.contains_key(k)) => r,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let all = serde_json::to_value(toml::from_str::<FileConfig>(&all).unwrap()).unwrap();
        assert!(all.as_object().unwrap().values().all(|v| !v.is_null()), "{all}");
        // A file's keys win over the defaults.
        let f: FileConfig = toml::from_str("broker = \"h:1\"\nkeep_alive_secs = 3\n").unwrap();
        let f = f.with_builtin().unwrap();
        assert_eq!((f.broker.as_deref(), f.keep_alive_secs, f.backoff_max_secs), (Some("h:1"), Some(3), Some(30)));
    }

    #[test]
    fn client_id_is_generated_once_kept_and_checked() {
        let dir = std::env::temp_dir().join(format!("sphinx-key-client-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = stored_client_id(&dir).unwrap();
        assert!(a.starts_with("sphinx-key-") && check_client_id(&a).is_ok(), "{a}");
        assert_eq!(stored_client_id(&dir).unwrap(), a, "kept in the data dir");
        let other = dir.join("other");
        assert_ne!(stored_client_id(&other).unwrap(), a, "another device gets another id");
        for bad in ["", "a/b", "a+", "#", "$sys", "a b", &"x".repeat(129)] {
            assert!(check_client_id(bad).is_err(), "{bad:?}");
        }
        std::fs::write(dir.join(CLIENT_ID_FILE), "bad/id\n").unwrap();
        assert!(stored_client_id(&dir).is_err(), "a damaged file is an error, not silently replaced");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The ExecStart of the shipped unit is a valid `sphinx-key` command line.
    #[test]
    fn systemd_unit_command_line_parses() {
        let unit = include_str!("../../../contrib/systemd/sphinx-key.service");
        let exec: Vec<&str> = unit.lines().filter_map(|l| l.strip_prefix("ExecStart=")).collect();
        assert_eq!(exec.len(), 1, "one ExecStart");
        let args: Vec<&str> = exec[0].split_whitespace().collect();
        assert!(args[0].ends_with("/sphinx-key"), "{}", args[0]);
        let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{}: {e}", exec[0]));
        assert!(matches!(cli.cmd, Cmd::Run { .. }));
        assert_eq!(cli.data_dir.as_deref(), Some(Path::new("/var/lib/sphinx-key")));
        // The credential it loads is the one sphinx-key looks for by default.
        let cred = format!("LoadCredentialEncrypted={}:", passphrase::DEFAULT_CREDENTIAL);
        assert!(unit.lines().any(|l| l.starts_with(&cred)), "{cred}");
        assert!(unit.lines().any(
            |l| l == format!("RestartPreventExitStatus={} {}", seed::EXIT_NEEDS_INIT, seed::EXIT_WRONG_PASSPHRASE)
        ));
    }
}
