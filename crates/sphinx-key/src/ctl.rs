//! `sphinx-key ctl`: the owner's side of control messages. Builds and signs a request with the
//! owner key, POSTs it to the broker API (`/v1/signers/{node_id}/control`, body = request bytes,
//! response body = the device's signed response), verifies the device's signature and the nonce,
//! and prints the response as JSON. `ctl signers` lists the broker's signers (`GET /v1/signers`)
//! instead: which device of the node is active, which stand by, their LSS status.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
use clap::{Args, Subcommand, ValueEnum};
use sphinx_wire::control::{self, ControlMessage, ControlResponse, Interval, OtaParams, Policy};

use crate::http;

/// Options of `sphinx-key ctl`.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Broker API base URL (http only; the API listens on loopback).
    #[arg(long, env = "SPHINX_KEY_CTL_URL", default_value = "http://127.0.0.1:8090")]
    pub url: String,
    /// Bearer token of the broker API.
    #[arg(long, env = "SPHINX_KEY_CTL_TOKEN")]
    pub token: Option<String>,
    /// Node id (hex) of the signer to control; default: the node of the seed in the data dir.
    #[arg(long)]
    pub node_id: Option<String>,
    /// File with the owner's secret key (64 hex characters, or 32 raw bytes); default: the node
    /// key of the seed in the data directory (the default owner key).
    #[arg(long, env = "SPHINX_KEY_CTL_OWNER_KEY_FILE")]
    pub owner_key_file: Option<PathBuf>,
    /// Nonce to use; default: ask the device for its last nonce first and use the next one.
    #[arg(long)]
    pub nonce: Option<u64>,
    /// Seconds to wait for the broker's answer.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// The message to send.
    #[command(subcommand)]
    pub msg: CtlCmd,
}

/// `--interval` values.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum IntervalArg {
    /// Per hour (12 buckets of 5 minutes).
    Hourly,
    /// Per day (24 buckets of 1 hour).
    Daily,
}

/// The control messages.
#[derive(Subcommand, Debug)]
pub enum CtlCmd {
    /// Ask for the last accepted nonce.
    Nonce,
    /// Read the owner's limits.
    QueryPolicy,
    /// Set the owner's limits; fields not given keep their current values (read first).
    UpdatePolicy {
        /// Outgoing payments allowed per interval, msat.
        #[arg(long)]
        msat_per_interval: Option<u64>,
        /// Velocity interval.
        #[arg(long, value_enum)]
        interval: Option<IntervalArg>,
        /// Largest in-flight HTLC value, msat (whole sats count).
        #[arg(long)]
        htlc_limit_msat: Option<u64>,
    },
    /// Read the allowlist.
    QueryAllowlist,
    /// Replace the allowlist (addresses or VLS allowlist entries; none = empty list).
    UpdateAllowlist {
        /// Entries.
        entries: Vec<String>,
    },
    /// Read the velocity state.
    QueryVelocity,
    /// Read policy, allowlist and velocity.
    QueryAll,
    /// Forget network settings (a no-op acknowledgement on Linux).
    ResetWifi,
    /// Delete the device's seed: it stops signing until `sphinx-key init`.
    ResetKeys,
    /// Delete the device's seed, owner key and state.
    ResetAll,
    /// List the broker's signers (GET /v1/signers): client id, node id, role (active, standby,
    /// syncing, refused), connection and LSS status. Needs no owner key.
    Signers {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Firmware update (refused on Linux).
    Ota {
        /// Version.
        #[arg(long)]
        version: u64,
        /// URL.
        #[arg(long)]
        url: String,
    },
}

/// Reads an owner secret key: 64 hex characters (whitespace ignored) or 32 raw bytes.
pub fn read_secret_key(path: &Path) -> Result<SecretKey> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read owner key {}", path.display()))?;
    let text = String::from_utf8_lossy(&raw);
    let bytes = match hex::decode(text.trim()) {
        Ok(b) => b,
        Err(_) => raw.clone(),
    };
    SecretKey::from_slice(&bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a secp256k1 secret key (64 hex or 32 bytes)", path.display()))
}

/// One signed round trip to the device through the broker API.
struct Link {
    url: http::Url,
    path: String,
    token: Option<String>,
    device: PublicKey,
    owner: SecretKey,
    timeout: Duration,
}

impl Link {
    fn send(&self, msg: &ControlMessage, nonce: u64) -> Result<ControlResponse> {
        let req = control::build_request(msg, nonce, &self.owner)?;
        tracing::debug!(?msg, nonce, "sending control message");
        let resp = http::post(&self.url, &self.path, self.token.as_deref(), &req, self.timeout)?;
        if resp.status != 200 {
            bail!(
                "broker API answered HTTP {}: {}",
                resp.status,
                String::from_utf8_lossy(&resp.body).chars().take(500).collect::<String>()
            );
        }
        control::parse_response(&resp.body, &self.device, nonce)
            .context("the response is not a valid device-signed answer to this request")
    }

    fn next_nonce(&self, given: Option<u64>) -> Result<u64> {
        if let Some(n) = given {
            return Ok(n);
        }
        match self.send(&ControlMessage::Nonce, 0)? {
            ControlResponse::Nonce(n) => n.checked_add(1).context("the device's nonce is exhausted"),
            ControlResponse::Error(e) => bail!("the device refused the nonce query: {e}"),
            other => bail!("unexpected answer to the nonce query: {other:?}"),
        }
    }
}

/// `ctl signers`: the broker's signer list, as a table (or its JSON).
pub fn signers(args: &CtlArgs, json: bool) -> Result<String> {
    let url = http::parse_url(&args.url)?;
    let path = format!("{}/v1/signers", url.path);
    let resp = http::get(&url, &path, args.token.as_deref(), Duration::from_secs(args.timeout_secs.max(1)))?;
    let text = String::from_utf8_lossy(&resp.body).into_owned();
    if resp.status != 200 {
        bail!("broker API answered HTTP {}: {}", resp.status, text.chars().take(500).collect::<String>());
    }
    let v: serde_json::Value = serde_json::from_str(&text).context("the broker's signer list is not JSON")?;
    if json {
        return Ok(serde_json::to_string_pretty(&v)?);
    }
    Ok(signers_table(&v))
}

/// The signer list as a table, one signer a line.
fn signers_table(v: &serde_json::Value) -> String {
    let s = |x: &serde_json::Value, k: &str| -> String {
        match &x[k] {
            serde_json::Value::String(t) => t.clone(),
            serde_json::Value::Null => "-".into(),
            other => other.to_string(),
        }
    };
    let mut rows = vec![[
        "CLIENT ID".to_string(),
        "NODE ID".into(),
        "ROLE".into(),
        "CONNECTED".into(),
        "LSS".into(),
        "LAST ERROR".into(),
    ]];
    for x in v["signers"].as_array().into_iter().flatten() {
        let node = s(x, "node_id");
        let short = if node.len() > 16 { format!("{}…", &node[..16]) } else { node };
        let lss = match x["lss_error"].as_str() {
            Some(e) => format!("{} ({e})", s(x, "lss")),
            None => s(x, "lss"),
        };
        let err = x["last_error"]["text"].as_str().unwrap_or("-").to_string();
        let pinned = if x["pinned"].as_bool() == Some(true) { " (pinned)" } else { "" };
        // A ready signer whose hello lacked error-seq is an upstream client (no control over MQTT).
        let upstream = x["ready"].as_bool() == Some(true) && x["error_seq"].as_bool() == Some(false);
        let id = format!("{}{}", s(x, "client_id"), if upstream { " (upstream)" } else { "" });
        rows.push([id, format!("{short}{pinned}"), s(x, "role"), s(x, "connected"), lss, err]);
    }
    let widths: Vec<usize> = (0..6).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> =
            r.iter().zip(&widths).map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count()))).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if rows.len() == 1 {
        out.push_str("(no signer has connected)\n");
    }
    if let Some(k) = v["lss_server"].as_str() {
        out.push_str(&format!("LSS server: {k} (for a new device: sphinx-key run --lss-server-pubkey {k})\n"));
    }
    out
}

/// Runs `ctl`: `seed` is the data directory's seed, if there is one. Returns the response to
/// print; a `ControlResponse::Error` is printed too and makes the command fail.
pub fn run(args: CtlArgs, seed: Option<[u8; 32]>, network: bitcoin::Network) -> Result<ControlResponse> {
    let node_keys = seed.map(|s| sphinx_signer::node_keys_for_seed(&s, network));
    let device = match (&args.node_id, &node_keys) {
        (Some(h), _) => {
            let b = hex::decode(h.trim()).context("--node-id is not hex")?;
            PublicKey::from_slice(&b).context("--node-id is not a public key")?
        }
        (None, Some((pk, _))) => *pk,
        (None, None) => bail!("no --node-id and no seed in the data directory to derive it from"),
    };
    let owner = match (&args.owner_key_file, &node_keys) {
        (Some(f), _) => read_secret_key(f)?,
        (None, Some((pk, sk))) if *pk == device => *sk,
        (None, Some(_)) => bail!("the data directory's seed is not node {device}: give --owner-key-file"),
        (None, None) => bail!("no --owner-key-file and no seed in the data directory"),
    };
    tracing::debug!(owner = %PublicKey::from_secret_key(&Secp256k1::new(), &owner), "owner key");
    let url = http::parse_url(&args.url)?;
    let path = format!("{}/v1/signers/{}/control", url.path, hex::encode(device.serialize()));
    let link = Link {
        url,
        path,
        token: args.token.clone(),
        device,
        owner,
        timeout: Duration::from_secs(args.timeout_secs.max(1)),
    };
    let msg = match args.msg {
        CtlCmd::Nonce => return link.send(&ControlMessage::Nonce, args.nonce.unwrap_or(0)),
        CtlCmd::QueryPolicy => ControlMessage::QueryPolicy,
        CtlCmd::UpdatePolicy { msat_per_interval, interval, htlc_limit_msat } => {
            let mut nonce = link.next_nonce(args.nonce)?;
            let current = if msat_per_interval.is_none() || interval.is_none() || htlc_limit_msat.is_none() {
                let cur = match link.send(&ControlMessage::QueryPolicy, nonce)? {
                    ControlResponse::PolicyCurrent(p) => p,
                    ControlResponse::Error(e) => bail!("reading the current policy failed: {e}"),
                    other => bail!("unexpected answer to QueryPolicy: {other:?}"),
                };
                nonce += 1;
                cur
            } else {
                Policy::default()
            };
            let p = Policy {
                msat_per_interval: msat_per_interval.unwrap_or(current.msat_per_interval),
                interval: match interval {
                    Some(IntervalArg::Hourly) => Interval::Hourly,
                    Some(IntervalArg::Daily) => Interval::Daily,
                    None => current.interval,
                },
                htlc_limit_msat: htlc_limit_msat.unwrap_or(current.htlc_limit_msat),
            };
            return link.send(&ControlMessage::UpdatePolicy(p), nonce);
        }
        CtlCmd::QueryAllowlist => ControlMessage::QueryAllowlist,
        CtlCmd::UpdateAllowlist { entries } => ControlMessage::UpdateAllowlist(entries),
        CtlCmd::QueryVelocity => ControlMessage::QueryVelocity,
        CtlCmd::QueryAll => ControlMessage::QueryAll,
        CtlCmd::ResetWifi => ControlMessage::ResetWifi,
        CtlCmd::ResetKeys => ControlMessage::ResetKeys,
        CtlCmd::ResetAll => ControlMessage::ResetAll,
        CtlCmd::Ota { version, url } => ControlMessage::Ota(OtaParams { version, url }),
        CtlCmd::Signers { .. } => bail!("`ctl signers` sends no control message"),
    };
    let nonce = link.next_nonce(args.nonce)?;
    link.send(&msg, nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signers_table_shows_every_signer_with_its_role() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"signers":[
                {"client_id":"dev-a","node_id":"029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef46","role":"active","connected":true,"ready":true,"since":1,"pinned":true,"last_error":null,"lss":"synced","lss_error":null,"error_seq":true},
                {"client_id":"vls-mqtt","node_id":"029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef46","role":"standby","connected":true,"ready":true,"since":1,"pinned":true,"last_error":null,"lss":"synced","lss_error":null,"error_seq":false},
                {"client_id":"dev-b","node_id":"029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef46","role":"standby","connected":true,"ready":true,"since":2,"pinned":true,"last_error":{"seq":3,"text":"boom","time":4},"lss":"error","lss_error":"cannot reach LSS"}
            ],"pinned":null,"relay":{"queued":0,"failovers":1}}"#,
        )
        .unwrap();
        let t = signers_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("CLIENT ID") && lines[0].contains("ROLE"), "{t}");
        assert!(lines[1].starts_with("dev-a") && lines[1].contains("active") && lines[1].contains("synced"), "{t}");
        assert!(!lines[1].contains("upstream") && lines[2].starts_with("vls-mqtt (upstream)"), "{t}");
        assert!(
            lines[3].contains("standby") && lines[3].contains("error (cannot reach LSS)") && lines[3].ends_with("boom"),
            "{t}"
        );
        assert!(signers_table(&serde_json::json!({"signers": []})).contains("no signer"));
        let with_lss = signers_table(&serde_json::json!({"signers": [], "lss_server": "02ab"}));
        assert!(with_lss.contains("LSS server: 02ab") && with_lss.contains("--lss-server-pubkey 02ab"), "{with_lss}");
    }
}
