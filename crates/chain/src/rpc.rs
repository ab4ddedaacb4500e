//! The bitcoind JSON-RPC client: HTTP/1.1 with basic auth on hyper's client connection (one
//! keep-alive connection, reconnected on demand), for the four calls the follower needs.
//!
//! Every reply is untrusted input, and every read is bounded in bytes ([`RpcLimits`]): the status
//! line and headers together and their count (hyper's `max_header_size`, `max_buf_size` and
//! `max_headers`: the client errors as soon as the bound is reached, however long the line), and
//! the body (a declared `Content-Length` over the bound is refused before reading; otherwise
//! http-body-util's `Limited` stops at the bound, for fixed-length, chunked and close-delimited
//! bodies alike). hyper parses chunk sizes with checked arithmetic and bounds chunk extensions and
//! trailers. The whole call (cookie, connect, request, head, body) is bounded by the timeout.
//! Nothing here panics on a reply.
//!
//! The cookie file is read again on every new connection, because bitcoind writes a new cookie
//! each time it starts.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use bitcoin::block::Header;
use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::{Block, BlockHash, Network};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::client::conn::http1;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tracing::debug;

/// Largest cookie file read (bitcoind's is `__cookie__:` and 64 hex digits).
const MAX_COOKIE: u64 = 4096;

/// Byte bounds on what is read from bitcoind (see `SECURITY.md` for the defaults and why).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RpcLimits {
    /// Status line and headers together, in bytes (default 16 KiB; bitcoind sends about 150).
    pub max_head: usize,
    /// Header lines (default 32; bitcoind sends 3 or 4).
    pub max_headers: usize,
    /// Body, in bytes (default 16 MiB: the largest block, 4 MB, is 8 MB of hex in `getblock`).
    pub max_body: usize,
}

impl Default for RpcLimits {
    fn default() -> Self {
        RpcLimits { max_head: 16 << 10, max_headers: 32, max_body: 16 << 20 }
    }
}

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
    if path.parse::<Uri>().is_err() {
        return Err(RpcError::Config(format!("bad path {path:?} in bitcoind URL")));
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

/// A live connection: hyper's request handle, the task that drives the connection (aborted when
/// this is dropped, so a dropped connection is closed at once) and the login read for it.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    auth: HeaderValue,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The client: one connection at a time, reconnecting on demand.
pub struct RpcClient {
    ep: Endpoint,
    timeout: Duration,
    limits: RpcLimits,
    conn: Option<Conn>,
    next_id: u64,
}

impl RpcClient {
    /// A client for `ep` with the default [`RpcLimits`]; each call is bounded by `timeout`.
    pub fn new(ep: Endpoint, timeout: Duration) -> RpcClient {
        RpcClient::with_limits(ep, timeout, RpcLimits::default())
    }

    /// A client for `ep` reading at most `limits` of each reply; each call is bounded by `timeout`.
    pub fn with_limits(ep: Endpoint, timeout: Duration, limits: RpcLimits) -> RpcClient {
        RpcClient { ep, timeout, limits, conn: None, next_id: 0 }
    }

    /// `host:port` (`[v6]:port`), for messages and the `Host` header.
    fn addr(&self) -> String {
        if self.ep.host.contains(':') {
            format!("[{}]:{}", self.ep.host, self.ep.port)
        } else {
            format!("{}:{}", self.ep.host, self.ep.port)
        }
    }

    /// Drops the connection (the next call reconnects and re-reads the cookie).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    async fn read_cookie(path: &PathBuf) -> Result<(String, String), RpcError> {
        let err = |reason: String| RpcError::Cookie { path: path.clone(), reason };
        let file = tokio::fs::File::open(path).await.map_err(|e| err(e.to_string()))?;
        let mut raw = Vec::new();
        file.take(MAX_COOKIE + 1).read_to_end(&mut raw).await.map_err(|e| err(e.to_string()))?;
        if raw.len() as u64 > MAX_COOKIE {
            return Err(err(format!("larger than {MAX_COOKIE} bytes: not a bitcoind cookie")));
        }
        let text = String::from_utf8(raw).map_err(|_| err("not UTF-8".into()))?;
        let (u, p) = text.trim_end().split_once(':').ok_or_else(|| err("no ':' in the cookie".into()))?;
        Ok((u.to_string(), p.to_string()))
    }

    async fn connect(&self) -> Result<Conn, RpcError> {
        let (user, pass) = match &self.ep.login {
            Login::Static(u, p) => (u.clone(), p.clone()),
            Login::Cookie(path) => Self::read_cookie(path).await?,
        };
        let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")));
        let auth = HeaderValue::from_str(&basic)
            .map_err(|_| RpcError::Config("the login cannot be sent in an HTTP header".into()))?;
        let addr = self.addr();
        let unreachable = |reason: String| RpcError::Unreachable { addr: addr.clone(), reason };
        let stream =
            TcpStream::connect((self.ep.host.as_str(), self.ep.port)).await.map_err(|e| unreachable(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        // hyper refuses a head over `max_header_size` as soon as that much is buffered, and never
        // buffers more than `max_buf_size` (which it requires to be at least 8 KiB).
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(self.limits.max_head.max(8192))
            .max_header_size(self.limits.max_head)
            .max_headers(self.limits.max_headers)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "bitcoind connection ended");
            }
        });
        debug!(bitcoind = %addr, "connected to bitcoind");
        Ok(Conn { sender, auth, task })
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
        let body =
            Bytes::from(json!({"jsonrpc": "1.0", "id": self.next_id, "method": method, "params": params}).to_string());
        let (status, bytes) = self.exchange(method, body).await?;
        if status == StatusCode::UNAUTHORIZED {
            return Err(RpcError::Unauthorized(self.addr()));
        }
        parse_reply(method, status.as_u16(), &bytes)
    }

    /// Sends one request (connecting first if there is no connection) and reads the whole
    /// response within the limits: (status, body).
    async fn exchange(&mut self, method: &str, body: Bytes) -> Result<(StatusCode, Bytes), RpcError> {
        let addr = self.addr();
        let bad = |reason: String| RpcError::BadReply { method: method.to_string(), reason };
        let uri: Uri =
            self.ep.path.parse().map_err(|_| RpcError::Config(format!("bad URL path {:?}", self.ep.path)))?;
        let mut reused = true;
        let response = loop {
            // bitcoind closes idle connections: a kept-alive one may be gone.
            let kept = match self.conn.take() {
                Some(mut c) => c.sender.ready().await.is_ok().then_some(c),
                None => None,
            };
            let conn = match kept {
                Some(c) => c,
                None => {
                    reused = false;
                    self.connect().await?
                }
            };
            let conn = self.conn.insert(conn);
            let req = Request::post(uri.clone())
                .header(header::HOST, addr.as_str())
                .header(header::AUTHORIZATION, conn.auth.clone())
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))
                .map_err(|e| RpcError::Config(format!("cannot build the request: {e}")))?;
            match conn.sender.send_request(req).await {
                Ok(r) => break r,
                // Closed before any answer on a connection that had served calls: once more
                // on a fresh one (the four calls are read-only).
                Err(e) if reused && (e.is_canceled() || e.is_closed() || e.is_incomplete_message()) => {
                    debug!(error = %e, "kept-alive bitcoind connection closed; reconnecting");
                    self.conn = None;
                    reused = false;
                }
                Err(e) if e.is_parse_too_large() => {
                    return Err(bad(format!(
                        "response head larger than {} bytes or with more than {} header lines",
                        self.limits.max_head, self.limits.max_headers
                    )))
                }
                Err(e) if e.is_parse() => return Err(bad(format!("bad HTTP response: {e}"))),
                Err(e) => return Err(RpcError::Unreachable { addr, reason: error_chain(&e) }),
            }
        };
        let status = response.status();
        let body = response.into_body();
        let max = self.limits.max_body;
        if body.size_hint().lower() > max as u64 {
            return Err(bad(format!(
                "body of {} bytes declared, larger than the bound of {max} bytes",
                body.size_hint().lower()
            )));
        }
        match Limited::new(body, max).collect().await {
            Ok(c) => Ok((status, c.to_bytes())),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                Err(bad(format!("body larger than the bound of {max} bytes")))
            }
            Err(e) => {
                let text = error_chain(&*e);
                match io_kind(&*e) {
                    Some(std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput) => {
                        Err(bad(format!("bad HTTP body: {text}")))
                    }
                    _ => Err(RpcError::Unreachable {
                        addr,
                        reason: format!("while reading the reply to {method}: {text}"),
                    }),
                }
            }
        }
    }

    /// `getblockchaininfo`.
    pub async fn chain_info(&mut self) -> Result<ChainInfo, RpcError> {
        parse_chain_info(&self.call("getblockchaininfo", json!([])).await?)
    }

    /// `getblockhash`: `None` when `height` is above bitcoind's tip (error -8).
    pub async fn block_hash(&mut self, height: u32) -> Result<Option<BlockHash>, RpcError> {
        match self.call("getblockhash", json!([height])).await {
            Ok(v) => parse_block_hash(&v).map(Some),
            Err(RpcError::Rpc { code: -8, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `getblockheader <hash> false`: the 80-byte header.
    pub async fn header(&mut self, hash: &BlockHash) -> Result<Header, RpcError> {
        parse_header(&self.call("getblockheader", json!([hash.to_string(), false])).await?)
    }

    /// `getblock <hash> 0`: the whole block, which must be the one asked for.
    pub async fn block(&mut self, hash: &BlockHash) -> Result<Block, RpcError> {
        let block = parse_block(&self.call("getblock", json!([hash.to_string(), 0])).await?)?;
        if block.block_hash() != *hash {
            return Err(RpcError::BadReply {
                method: "getblock".into(),
                reason: format!("asked for block {hash}, got {}", block.block_hash()),
            });
        }
        Ok(block)
    }
}

// What is left to parse once HTTP is done (hyper's part): the JSON-RPC envelope and the results
// of the four calls. Pure functions, fuzzed by the `bitcoind_reply` target (fuzz/README.md).

/// bitcoind's answer to `method` (HTTP status and body) as a JSON-RPC reply: its `result`, or the
/// error it carries (legacy replies carry errors with HTTP 500/404, JSON-RPC 2.0 ones with 200).
/// The caller handles HTTP 401 (no JSON body).
pub fn parse_reply(method: &str, status: u16, body: &[u8]) -> Result<Value, RpcError> {
    let bad = |reason: String| RpcError::BadReply { method: method.to_string(), reason };
    let mut v: Value = serde_json::from_slice(body).map_err(|e| {
        bad(format!("HTTP {status}, body is not JSON ({e}): {}", String::from_utf8_lossy(&body[..body.len().min(200)])))
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
    v.get_mut("result").map(Value::take).ok_or_else(|| bad("no result".into()))
}

/// `getblockchaininfo`'s result.
pub fn parse_chain_info(v: &Value) -> Result<ChainInfo, RpcError> {
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

/// `getblockhash`'s result.
pub fn parse_block_hash(v: &Value) -> Result<BlockHash, RpcError> {
    let bad = |reason: String| RpcError::BadReply { method: "getblockhash".into(), reason };
    let s = v.as_str().ok_or_else(|| bad("result is not a string".into()))?;
    BlockHash::from_str(s).map_err(|_| bad(format!("bad hash {s:?}")))
}

/// `getblockheader <hash> false`'s result: 80 bytes in hex.
pub fn parse_header(v: &Value) -> Result<Header, RpcError> {
    decode_hex::<Header>(v, "getblockheader")
}

/// `getblock <hash> 0`'s result: the serialized block in hex.
pub fn parse_block(v: &Value) -> Result<Block, RpcError> {
    decode_hex::<Block>(v, "getblock")
}

fn decode_hex<T: bitcoin::consensus::Decodable>(v: &Value, method: &str) -> Result<T, RpcError> {
    let s = v
        .as_str()
        .ok_or_else(|| RpcError::BadReply { method: method.into(), reason: "result is not a hex string".into() })?;
    deserialize_hex::<T>(s).map_err(|e| RpcError::BadReply { method: method.into(), reason: e.to_string() })
}

/// `e` and its causes, as one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cur = c.source();
    }
    text
}

/// The kind of the I/O error behind `e`, if there is one.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = c.source();
    }
    None
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
        assert!(parse_endpoint("http://u:p@h:1/wal let", None, Network::Regtest).is_err());
    }
}
