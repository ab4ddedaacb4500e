//! A small bitcoind JSON-RPC client: HTTP/1.1 with basic auth over one keep-alive TCP
//! connection, for the four calls the follower needs.
//!
//! The cookie file is read again on every new connection, because bitcoind writes a new cookie
//! each time it starts. Every reply is untrusted input: nothing here panics on it.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use bitcoin::block::Header;
use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::{Block, BlockHash, Network};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tracing::debug;

/// Largest HTTP body accepted (a 4 MB block is 8 MB of hex).
const MAX_BODY: usize = 64 << 20;

/// Why a bitcoind call failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The settings cannot work (bad URL).
    #[error("bitcoind settings: {0}")]
    Config(String),
    /// No TCP connection, or it broke.
    #[error("cannot reach bitcoind at {addr}: {reason}")]
    Unreachable {
        /// host:port.
        addr: String,
        /// The I/O error.
        reason: String,
    },
    /// No complete reply in time.
    #[error("no reply from bitcoind at {addr} within {timeout:?}")]
    Timeout {
        /// host:port.
        addr: String,
        /// The bound.
        timeout: Duration,
    },
    /// The cookie file cannot be read (bitcoind not started yet, or wrong path/permissions).
    #[error("cannot read bitcoind's cookie file {path}: {reason}")]
    Cookie {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// HTTP 401: wrong user/password or stale cookie.
    #[error("bitcoind at {0} rejected the login (HTTP 401): check the user:password in the URL, or the cookie file")]
    Unauthorized(String),
    /// bitcoind is still loading (error -28).
    #[error("bitcoind is warming up: {0}")]
    Warmup(String),
    /// bitcoind answered with a JSON-RPC error.
    #[error("bitcoind {method} failed: error {code}: {message}")]
    Rpc {
        /// The call.
        method: String,
        /// bitcoind's error code.
        code: i64,
        /// bitcoind's message.
        message: String,
    },
    /// The reply is not what bitcoind sends.
    #[error("bad reply from bitcoind to {method}: {reason}")]
    BadReply {
        /// The call.
        method: String,
        /// What is wrong.
        reason: String,
    },
}

/// How to log in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Login {
    /// `user:password` from the URL.
    Static(String, String),
    /// bitcoind's `.cookie` file, read on every connection.
    Cookie(PathBuf),
}

/// Where bitcoind is and how to log in, parsed from the settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// HTTP path (`/` unless the URL says otherwise, e.g. `/wallet/x`).
    pub path: String,
    /// The login.
    pub login: Login,
}

/// bitcoind's default RPC port for `network`.
pub fn default_port(network: Network) -> u16 {
    match network {
        Network::Bitcoin => 8332,
        Network::Testnet => 18332,
        Network::Testnet4 => 48332,
        Network::Signet => 38332,
        _ => 18443,
    }
}

/// bitcoind's default cookie file for `network` (`~/.bitcoin[/<chain dir>]/.cookie`).
pub fn default_cookie(network: Network) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let base = PathBuf::from(home).join(".bitcoin");
    let dir = match network {
        Network::Bitcoin => base,
        Network::Testnet => base.join("testnet3"),
        Network::Testnet4 => base.join("testnet4"),
        Network::Signet => base.join("signet"),
        _ => base.join("regtest"),
    };
    Some(dir.join(".cookie"))
}

fn percent_decode(s: &str) -> String {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `http://[user:password@]host[:port][/path]` (the scheme may be left out). Without
/// credentials in the URL, `cookie` (or bitcoind's default cookie path) is used.
pub fn parse_endpoint(url: &str, cookie: Option<PathBuf>, network: Network) -> Result<Endpoint, RpcError> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("https://") {
        return Err(RpcError::Config(
            "bitcoind's RPC server speaks plain HTTP; use http:// (tunnel it if it is remote)".into(),
        ));
    } else if url.contains("://") {
        return Err(RpcError::Config(format!("unsupported URL scheme in {url:?}; use http://")));
    } else {
        url
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (creds, hostport) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        // [v6]:port
        let end = h.find(']').ok_or_else(|| RpcError::Config(format!("bad IPv6 host in {url:?}")))?;
        let port = h[end + 1..].strip_prefix(':');
        (h[..end].to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(RpcError::Config(format!("no host in bitcoind URL {url:?}")));
    }
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| RpcError::Config(format!("bad port {p:?} in bitcoind URL")))?,
        None => default_port(network),
    };
    let login = match creds {
        Some(c) => {
            let (u, p) = c.split_once(':').unwrap_or((c, ""));
            Login::Static(percent_decode(u), percent_decode(p))
        }
        None => match cookie.or_else(|| default_cookie(network)) {
            Some(path) => Login::Cookie(path),
            None => {
                return Err(RpcError::Config(
                    "no credentials: put user:password in the URL or set the cookie file".into(),
                ))
            }
        },
    };
    Ok(Endpoint { host, port, path, login })
}

/// Summary of `getblockchaininfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainInfo {
    /// `main`, `test`, `testnet4`, `signet` or `regtest`.
    pub chain: String,
    /// Height of the best block.
    pub blocks: u32,
    /// Height of the best header bitcoind knows (above `blocks` while it is still syncing).
    pub headers: u32,
    /// Its hash.
    pub best: BlockHash,
    /// bitcoind's `initialblockdownload`.
    pub ibd: bool,
}

/// bitcoind's name for `network` in `getblockchaininfo`.
pub fn chain_name(network: Network) -> &'static str {
    match network {
        Network::Bitcoin => "main",
        Network::Testnet => "test",
        Network::Testnet4 => "testnet4",
        Network::Signet => "signet",
        _ => "regtest",
    }
}

/// The client: one connection at a time, reconnecting on demand.
pub struct RpcClient {
    ep: Endpoint,
    timeout: Duration,
    conn: Option<BufReader<TcpStream>>,
    auth_header: String,
    next_id: u64,
}

impl RpcClient {
    /// A client for `ep`; each call is bounded by `timeout`.
    pub fn new(ep: Endpoint, timeout: Duration) -> RpcClient {
        RpcClient { ep, timeout, conn: None, auth_header: String::new(), next_id: 0 }
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.ep.host, self.ep.port)
    }

    /// Drops the connection (the next call reconnects and re-reads the cookie).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    async fn connect(&mut self) -> Result<(), RpcError> {
        let (user, pass) = match &self.ep.login {
            Login::Static(u, p) => (u.clone(), p.clone()),
            Login::Cookie(path) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| RpcError::Cookie { path: path.clone(), reason: e.to_string() })?;
                let (u, p) = text
                    .trim_end()
                    .split_once(':')
                    .ok_or_else(|| RpcError::Cookie { path: path.clone(), reason: "no ':' in the cookie".into() })?;
                (u.to_string(), p.to_string())
            }
        };
        self.auth_header =
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")));
        let addr = self.addr();
        let stream = TcpStream::connect((self.ep.host.as_str(), self.ep.port))
            .await
            .map_err(|e| RpcError::Unreachable { addr: addr.clone(), reason: e.to_string() })?;
        let _ = stream.set_nodelay(true);
        debug!(bitcoind = %addr, "connected to bitcoind");
        self.conn = Some(BufReader::new(stream));
        Ok(())
    }

    /// One JSON-RPC call; returns `result`.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, RpcError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.call_inner(method, params)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if matches!(e, RpcError::Unreachable { .. } | RpcError::Unauthorized(_) | RpcError::BadReply { .. }) {
                    self.conn = None;
                }
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(RpcError::Timeout { addr: self.addr(), timeout })
            }
        }
    }

    async fn call_inner(&mut self, method: &str, params: Value) -> Result<Value, RpcError> {
        self.next_id += 1;
        let body = json!({"jsonrpc": "1.0", "id": self.next_id, "method": method, "params": params}).to_string();
        // A kept-alive connection may have been closed by bitcoind: retry once on a fresh one.
        let reused = self.conn.is_some();
        let (status, bytes) = match self.exchange(method, &body).await {
            Ok(r) => r,
            Err(RpcError::Unreachable { .. }) if reused => self.exchange(method, &body).await?,
            Err(e) => return Err(e),
        };
        if status == 401 {
            return Err(RpcError::Unauthorized(self.addr()));
        }
        let bad = |reason: String| RpcError::BadReply { method: method.to_string(), reason };
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            bad(format!(
                "HTTP {status}, body is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ))
        })?;
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
            let message = err.get("message").and_then(Value::as_str).unwrap_or("").to_string();
            if code == -28 {
                return Err(RpcError::Warmup(message));
            }
            return Err(RpcError::Rpc { method: method.to_string(), code, message });
        }
        if status != 200 {
            return Err(bad(format!("HTTP status {status}")));
        }
        v.get("result").cloned().ok_or_else(|| bad("no result".into()))
    }

    /// Sends one request on the current connection (connecting first if there is none) and
    /// reads the response. Any failure drops the connection.
    async fn exchange(&mut self, method: &str, body: &str) -> Result<(u16, Vec<u8>), RpcError> {
        if self.conn.is_none() {
            self.connect().await?;
        }
        let addr = self.addr();
        let req = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            self.ep.path,
            addr,
            self.auth_header,
            body.len(),
            body
        );
        let Some(conn) = self.conn.as_mut() else {
            return Err(RpcError::Unreachable { addr, reason: "not connected".into() });
        };
        let res = read_exchange(conn, req.as_bytes()).await;
        match res {
            Ok((status, body, keep)) => {
                if !keep {
                    self.conn = None;
                }
                Ok((status, body))
            }
            Err(e) => {
                self.conn = None;
                if e.kind() == std::io::ErrorKind::InvalidData {
                    Err(RpcError::BadReply { method: method.to_string(), reason: format!("bad HTTP response: {e}") })
                } else {
                    Err(RpcError::Unreachable { addr, reason: e.to_string() })
                }
            }
        }
    }

    /// `getblockchaininfo`.
    pub async fn chain_info(&mut self) -> Result<ChainInfo, RpcError> {
        let v = self.call("getblockchaininfo", json!([])).await?;
        let bad = |r: &str| RpcError::BadReply { method: "getblockchaininfo".into(), reason: r.to_string() };
        let chain = v.get("chain").and_then(Value::as_str).ok_or_else(|| bad("no chain"))?.to_string();
        let blocks = v.get("blocks").and_then(Value::as_u64).ok_or_else(|| bad("no blocks"))?;
        let best = v.get("bestblockhash").and_then(Value::as_str).ok_or_else(|| bad("no bestblockhash"))?;
        let best = BlockHash::from_str(best).map_err(|_| bad("bad bestblockhash"))?;
        let ibd = v.get("initialblockdownload").and_then(Value::as_bool).unwrap_or(false);
        let blocks = u32::try_from(blocks).map_err(|_| bad("height out of range"))?;
        let headers = v.get("headers").and_then(Value::as_u64).and_then(|h| u32::try_from(h).ok()).unwrap_or(blocks);
        Ok(ChainInfo { chain, blocks, headers, best, ibd })
    }

    /// `getblockhash`: `None` when `height` is above bitcoind's tip (error -8).
    pub async fn block_hash(&mut self, height: u32) -> Result<Option<BlockHash>, RpcError> {
        match self.call("getblockhash", json!([height])).await {
            Ok(v) => {
                let s = v.as_str().ok_or_else(|| RpcError::BadReply {
                    method: "getblockhash".into(),
                    reason: "result is not a string".into(),
                })?;
                BlockHash::from_str(s).map(Some).map_err(|_| RpcError::BadReply {
                    method: "getblockhash".into(),
                    reason: format!("bad hash {s:?}"),
                })
            }
            Err(RpcError::Rpc { code: -8, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `getblockheader <hash> false`: the 80-byte header.
    pub async fn header(&mut self, hash: &BlockHash) -> Result<Header, RpcError> {
        let v = self.call("getblockheader", json!([hash.to_string(), false])).await?;
        decode_hex::<Header>(&v, "getblockheader")
    }

    /// `getblock <hash> 0`: the whole block.
    pub async fn block(&mut self, hash: &BlockHash) -> Result<Block, RpcError> {
        let v = self.call("getblock", json!([hash.to_string(), 0])).await?;
        let block = decode_hex::<Block>(&v, "getblock")?;
        if block.block_hash() != *hash {
            return Err(RpcError::BadReply {
                method: "getblock".into(),
                reason: format!("asked for block {hash}, got {}", block.block_hash()),
            });
        }
        Ok(block)
    }
}

fn decode_hex<T: bitcoin::consensus::Decodable>(v: &Value, method: &str) -> Result<T, RpcError> {
    let s = v
        .as_str()
        .ok_or_else(|| RpcError::BadReply { method: method.into(), reason: "result is not a hex string".into() })?;
    deserialize_hex::<T>(s).map_err(|e| RpcError::BadReply { method: method.into(), reason: e.to_string() })
}

/// Writes `req` and reads one HTTP/1.1 response: (status, body, connection reusable).
async fn read_exchange(conn: &mut BufReader<TcpStream>, req: &[u8]) -> std::io::Result<(u16, Vec<u8>, bool)> {
    use std::io::{Error, ErrorKind};
    conn.get_mut().write_all(req).await?;
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        return Err(Error::new(ErrorKind::UnexpectedEof, "connection closed by bitcoind"));
    }
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(Error::new(ErrorKind::InvalidData, format!("not an HTTP response: {:?}", line.trim_end())));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, "no HTTP status"))?;
    let mut keep = version == "HTTP/1.1";
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut header_bytes = 0usize;
    loop {
        let mut h = String::new();
        let n = conn.read_line(&mut h).await?;
        if n == 0 {
            return Err(Error::new(ErrorKind::UnexpectedEof, "connection closed in headers"));
        }
        header_bytes += n;
        if header_bytes > 64 << 10 {
            return Err(Error::new(ErrorKind::InvalidData, "HTTP headers too large"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k.eq_ignore_ascii_case("connection") {
                keep = !v.eq_ignore_ascii_case("close");
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            conn.read_line(&mut size_line).await?;
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| Error::new(ErrorKind::InvalidData, "bad chunk size"))?;
            if body.len() + size > MAX_BODY {
                return Err(Error::new(ErrorKind::InvalidData, "HTTP body too large"));
            }
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let mut t = String::new();
                    if conn.read_line(&mut t).await? == 0 || t.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            conn.read_exact(&mut body[start..]).await?;
            let mut crlf = [0u8; 2];
            conn.read_exact(&mut crlf).await?;
        }
    } else if let Some(len) = length {
        if len > MAX_BODY {
            return Err(Error::new(ErrorKind::InvalidData, "HTTP body too large"));
        }
        body.resize(len, 0);
        conn.read_exact(&mut body).await?;
    } else {
        // Delimited by the end of the connection.
        (&mut *conn).take(MAX_BODY as u64).read_to_end(&mut body).await?;
        keep = false;
    }
    Ok((status, body, keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_and_without_credentials() {
        let e = parse_endpoint("http://alice:p%40ss@127.0.0.1:18443", None, Network::Regtest).unwrap();
        assert_eq!((e.host.as_str(), e.port, e.path.as_str()), ("127.0.0.1", 18443, "/"));
        assert_eq!(e.login, Login::Static("alice".into(), "p@ss".into()));
        let e = parse_endpoint("localhost", Some("/x/.cookie".into()), Network::Signet).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("localhost", 38332));
        assert_eq!(e.login, Login::Cookie("/x/.cookie".into()));
        let e = parse_endpoint("http://u:p@[::1]:8332/wallet/w", None, Network::Bitcoin).unwrap();
        assert_eq!((e.host.as_str(), e.port, e.path.as_str()), ("::1", 8332, "/wallet/w"));
        assert!(parse_endpoint("https://h:1", None, Network::Regtest).is_err());
        assert!(parse_endpoint("http://u:p@h:notaport", None, Network::Regtest).is_err());
    }
}
