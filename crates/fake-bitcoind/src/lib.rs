//! Stand-in for `bitcoind -regtest` (see docs/chain.md), for tests of the broker's chain follower.
//!
//! It serves bitcoind's JSON-RPC over HTTP/1.1 on loopback, for the calls the follower uses
//! (`getblockchaininfo`, `getblockhash`, `getblockheader`, `getblock` with verbosity 0 or 1, plus
//! `getbestblockhash`, `getblockcount` and `getnetworkinfo`), with bitcoind's answers and error
//! shapes (v29):
//! - authentication by HTTP basic auth, with `rpcuser`/`rpcpassword` pairs and/or a `.cookie`
//!   file (`__cookie__:<hex>`, rewritten on every start and deleted on stop, as bitcoind does);
//!   a missing or wrong login gets `401` with `WWW-Authenticate: Basic realm="jsonrpc"` and an
//!   empty body;
//! - JSON-RPC 1.0 ("legacy") replies `{"result":…,"error":…,"id":…}`, where an error is sent
//!   with HTTP 500 (404 for an unknown method, 400 for an invalid request), and JSON-RPC 2.0
//!   replies (HTTP 200) when the request says `"jsonrpc":"2.0"`; batches (arrays) too;
//! - error codes: -8 (`Block height out of range`, bad hash parameters), -5 (`Block not found`),
//!   -3 (type errors), -1 (wrong number of parameters), -28 (warm-up), -32601, -32700.
//!
//! The chain is real: blocks are regtest blocks (`bits` 0x207fffff) with a BIP34 coinbase and a
//! witness commitment, mined here with valid proof of work. Tests can add transactions, reorganise
//! the chain, and make the server lie (a block with bad proof of work, or one that does not build
//! on its parent, or any raw bytes as the answer to a call: `answer_raw_once`), and can stop and
//! restart the server on the same port.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use bitcoin::block::{Header, Version};
use bitcoin::blockdata::constants::genesis_block;
use bitcoin::consensus::encode::serialize_hex;
use bitcoin::hashes::Hash;
use bitcoin::opcodes::all::OP_RETURN;
use bitcoin::script::{Builder, PushBytesBuf};
use bitcoin::{
    absolute, transaction, Address, Amount, Block, BlockHash, CompactTarget, Network, OutPoint, ScriptBuf, Sequence,
    Target, Transaction, TxIn, TxMerkleNode, TxOut, Witness, Work,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// alice's mining address in the recorded traces (testdata/traces/README.md).
pub const TRACE_MINING_ADDRESS: &str = "bcrt1qwd0sxj7f47k67wysm20xut2drv7t2stu7fesk4";

/// regtest's compact target (bitcoind's `powLimit`).
pub const REGTEST_BITS: u32 = 0x207f_ffff;

/// The version string bitcoind v29.3.0 reports.
const SUBVERSION: &str = "/Satoshi:29.3.0/";

/// How the server is configured.
#[derive(Clone, Debug)]
pub struct Config {
    /// `rpcuser`/`rpcpassword` pairs accepted with basic auth.
    pub users: Vec<(String, String)>,
    /// When set, a `.cookie` file is written in this directory on every start (new password each
    /// time) and removed on stop.
    pub cookie_dir: Option<PathBuf>,
    /// Timestamp of block 1; each later block is one second after its parent.
    pub start_time: u32,
    /// Where coinbases pay.
    pub payout: ScriptBuf,
}

impl Default for Config {
    fn default() -> Self {
        let payout = Address::from_str(TRACE_MINING_ADDRESS)
            .ok()
            .and_then(|a| a.require_network(Network::Regtest).ok())
            .map(|a| a.script_pubkey())
            .unwrap_or_else(|| ScriptBuf::from_bytes(vec![0x51]));
        Config { users: Vec::new(), cookie_dir: None, start_time: 1_795_466_160, payout }
    }
}

#[derive(Clone)]
struct Entry {
    block: Block,
    height: u32,
    chainwork: Work,
}

/// The block tree: every block ever mined here, and the active chain.
struct Chain {
    active: Vec<BlockHash>,
    blocks: HashMap<BlockHash, Entry>,
    /// Makes each coinbase unique, so a replacement branch gets new hashes.
    extra: u32,
    payout: ScriptBuf,
    start_time: u32,
}

impl Chain {
    fn new(cfg: &Config) -> Chain {
        let genesis = genesis_block(Network::Regtest);
        let hash = genesis.block_hash();
        let work = genesis.header.work();
        let mut blocks = HashMap::new();
        blocks.insert(hash, Entry { block: genesis, height: 0, chainwork: work });
        Chain { active: vec![hash], blocks, extra: 0, payout: cfg.payout.clone(), start_time: cfg.start_time }
    }

    fn tip(&self) -> (u32, BlockHash) {
        let h = self.active.len() - 1;
        (h as u32, self.active[h])
    }

    fn entry(&self, hash: &BlockHash) -> Option<&Entry> {
        self.blocks.get(hash)
    }

    fn in_active(&self, e: &Entry) -> bool {
        self.active.get(e.height as usize) == Some(&e.block.block_hash())
    }

    /// Builds a valid block on `prev` with `txs` after the coinbase.
    fn build(&mut self, prev: BlockHash, txs: Vec<Transaction>) -> Block {
        let (height, prev_time) = match self.entry(&prev) {
            Some(e) => (e.height + 1, e.block.header.time),
            None => (1, self.start_time),
        };
        self.extra += 1;
        let time = if height == 1 { self.start_time } else { prev_time.max(self.start_time) + 1 };
        let mut block = assemble(prev, height, time, self.extra, &self.payout, txs);
        mine(&mut block.header, true);
        block
    }

    /// Appends `block` to the active chain without any check (a lying bitcoind can do this).
    fn push(&mut self, block: Block) -> BlockHash {
        let hash = block.block_hash();
        let height = self.active.len() as u32;
        let prev_work = self.entry(&block.header.prev_blockhash).map(|e| e.chainwork);
        let chainwork = match prev_work {
            Some(w) => w + block.header.work(),
            None => block.header.work(),
        };
        self.blocks.insert(hash, Entry { block, height, chainwork });
        self.active.push(hash);
        hash
    }

    fn mine(&mut self, txs: Vec<Transaction>) -> BlockHash {
        let (_, tip) = self.tip();
        let block = self.build(tip, txs);
        self.push(block)
    }

    fn median_time(&self, height: u32) -> u32 {
        let lo = (height as usize + 1).saturating_sub(11);
        let mut times: Vec<u32> = self.active[lo..=height as usize]
            .iter()
            .filter_map(|h| self.blocks.get(h).map(|e| e.block.header.time))
            .collect();
        times.sort_unstable();
        times.get(times.len() / 2).copied().unwrap_or(0)
    }
}

/// Builds (unmined) a regtest block at `height` on `prev`: BIP34 coinbase paying `payout`,
/// witness commitment, then `txs`.
fn assemble(prev: BlockHash, height: u32, time: u32, extra: u32, payout: &ScriptBuf, txs: Vec<Transaction>) -> Block {
    let subsidy = Amount::from_sat((50 * 100_000_000u64) >> (height / 150).min(63));
    let script_sig = Builder::new().push_int(height as i64).push_int(extra as i64).into_script();
    let coinbase = Transaction {
        version: transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig,
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[[0u8; 32]]),
        }],
        output: vec![TxOut { value: subsidy, script_pubkey: payout.clone() }],
    };
    let mut txdata = vec![coinbase];
    txdata.extend(txs);
    let header = Header {
        version: Version::from_consensus(0x2000_0000),
        prev_blockhash: prev,
        merkle_root: TxMerkleNode::all_zeros(),
        time,
        bits: CompactTarget::from_consensus(REGTEST_BITS),
        nonce: 0,
    };
    let mut block = Block { header, txdata };
    // Witness commitment (BIP141), as bitcoind's block assembler always adds it.
    if let Some(root) = block.witness_root() {
        let commitment = Block::compute_witness_commitment(&root, &[0u8; 32]);
        let mut data = vec![0xaa, 0x21, 0xa9, 0xed];
        data.extend_from_slice(commitment.as_byte_array());
        let push = PushBytesBuf::try_from(data).unwrap_or_default();
        let script = Builder::new().push_opcode(OP_RETURN).push_slice(push).into_script();
        block.txdata[0].output.push(TxOut { value: Amount::ZERO, script_pubkey: script });
    }
    if let Some(root) = block.compute_merkle_root() {
        block.header.merkle_root = root;
    }
    block
}

/// Grinds the nonce until the header meets its target (`valid`) or fails it (`!valid`).
fn mine(header: &mut Header, valid: bool) {
    let target = header.target();
    loop {
        if target.is_met_by(header.block_hash()) == valid {
            return;
        }
        header.nonce = header.nonce.wrapping_add(1);
        if header.nonce == 0 {
            header.time += 1;
        }
    }
}

struct Server {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct Inner {
    chain: Mutex<Chain>,
    users: Vec<(String, String)>,
    cookie_dir: Option<PathBuf>,
    /// The current cookie login, while the server runs.
    cookie: Mutex<Option<(String, String)>>,
    /// When set, every call fails with -28 and this message (bitcoind warming up).
    warmup: Mutex<Option<String>>,
    calls: Mutex<HashMap<String, u64>>,
    /// While `Some(n)`, bitcoind reports `n` more headers than blocks and initial block download.
    syncing: Mutex<Option<u32>>,
    /// Raw HTTP responses to send instead of the real answer, each once, to the next call of
    /// its method (a hostile or broken bitcoind, or something in front of it).
    raw_answers: Mutex<Vec<(String, Vec<u8>)>>,
}

/// A running (or stopped) fake bitcoind. Cheap to clone; all clones share the chain.
#[derive(Clone)]
pub struct FakeBitcoind {
    inner: Arc<Inner>,
    addr: SocketAddr,
    server: Arc<Mutex<Option<Server>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A JSON-RPC error: code and message, as bitcoind sends them.
type RpcError = (i64, String);

impl FakeBitcoind {
    /// Starts serving on `127.0.0.1` (a free port) with only the genesis block.
    pub async fn start(cfg: Config) -> std::io::Result<FakeBitcoind> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            chain: Mutex::new(Chain::new(&cfg)),
            users: cfg.users.clone(),
            cookie_dir: cfg.cookie_dir.clone(),
            cookie: Mutex::new(None),
            warmup: Mutex::new(None),
            calls: Mutex::new(HashMap::new()),
            syncing: Mutex::new(None),
            raw_answers: Mutex::new(Vec::new()),
        });
        let fake = FakeBitcoind { inner, addr, server: Arc::new(Mutex::new(None)) };
        fake.serve(listener)?;
        Ok(fake)
    }

    fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        if let Some(dir) = &self.inner.cookie_dir {
            let mut pass = [0u8; 32];
            bitcoin::secp256k1::rand::RngCore::fill_bytes(&mut bitcoin::secp256k1::rand::thread_rng(), &mut pass);
            let pass: String = pass.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::create_dir_all(dir)?;
            // bitcoind writes a temporary file and renames it into place.
            let tmp = dir.join(".cookie.tmp");
            std::fs::write(&tmp, format!("__cookie__:{pass}"))?;
            std::fs::rename(&tmp, dir.join(".cookie"))?;
            *lock(&self.inner.cookie) = Some(("__cookie__".into(), pass));
        }
        let (tx, rx) = watch::channel(false);
        let inner = self.inner.clone();
        let task = tokio::spawn(accept_loop(listener, inner, rx));
        *lock(&self.server) = Some(Server { shutdown: tx, task });
        Ok(())
    }

    /// The RPC URL without credentials (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The RPC URL with `user:password@`.
    pub fn url_with_login(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@{}", self.addr)
    }

    /// The listening address (kept across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Path of the cookie file, if cookie auth is configured.
    pub fn cookie_file(&self) -> Option<PathBuf> {
        self.inner.cookie_dir.as_ref().map(|d| d.join(".cookie"))
    }

    /// Stops serving: closes the listener and every open connection, deletes the cookie.
    pub async fn stop(&self) {
        let server = lock(&self.server).take();
        if let Some(s) = server {
            let _ = s.shutdown.send(true);
            let _ = s.task.await;
        }
        if let Some(path) = self.cookie_file() {
            let _ = std::fs::remove_file(path);
        }
        *lock(&self.inner.cookie) = None;
    }

    /// Serves again on the same port (with a new cookie), keeping the chain.
    pub async fn restart(&self) -> std::io::Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener)
    }

    /// While `Some`, every call fails with bitcoind's warm-up error (-28) and this message.
    pub fn set_warmup(&self, message: Option<&str>) {
        *lock(&self.inner.warmup) = message.map(str::to_string);
    }

    /// While `Some(n)`, `getblockchaininfo` says bitcoind is syncing: `headers` is `blocks + n`
    /// and `initialblockdownload` is true (as during a reindex or initial download).
    pub fn set_syncing(&self, headers_ahead: Option<u32>) {
        *lock(&self.inner.syncing) = headers_ahead;
    }

    /// The next call of `method` is answered with `response` as is (bytes on the socket: status
    /// line, headers, body, however malformed), and the connection is closed after it.
    /// Answers queued for one method go out in order, one per call.
    pub fn answer_raw_once(&self, method: &str, response: Vec<u8>) {
        lock(&self.inner.raw_answers).push((method.to_string(), response));
    }

    /// Raw answers queued with [`FakeBitcoind::answer_raw_once`] and not sent yet.
    pub fn raw_answers_pending(&self) -> usize {
        lock(&self.inner.raw_answers).len()
    }

    /// How many times `method` was called.
    pub fn calls(&self, method: &str) -> u64 {
        lock(&self.inner.calls).get(method).copied().unwrap_or(0)
    }

    /// Height and hash of the active tip.
    pub fn tip(&self) -> (u32, BlockHash) {
        lock(&self.inner.chain).tip()
    }

    /// Hash of the active block at `height`.
    pub fn block_hash(&self, height: u32) -> Option<BlockHash> {
        lock(&self.inner.chain).active.get(height as usize).copied()
    }

    /// Any block ever mined or pushed here.
    pub fn block(&self, hash: &BlockHash) -> Option<Block> {
        lock(&self.inner.chain).entry(hash).map(|e| e.block.clone())
    }

    /// Mines `n` blocks with only a coinbase on the tip; returns their hashes.
    pub fn mine(&self, n: u32) -> Vec<BlockHash> {
        let mut c = lock(&self.inner.chain);
        (0..n).map(|_| c.mine(Vec::new())).collect()
    }

    /// Mines one block on the tip carrying `txs` (not validated: inputs need not exist here).
    pub fn mine_with(&self, txs: Vec<Transaction>) -> BlockHash {
        lock(&self.inner.chain).mine(txs)
    }

    /// Replaces the top `depth` blocks by `new_len` new ones (a reorg, as after
    /// `invalidateblock` and `generatetoaddress`); the old ones stay known as stale blocks.
    pub fn reorg(&self, depth: u32, new_len: u32) -> Vec<BlockHash> {
        let mut c = lock(&self.inner.chain);
        let keep = c.active.len().saturating_sub(depth as usize).max(1);
        c.active.truncate(keep);
        (0..new_len).map(|_| c.mine(Vec::new())).collect()
    }

    /// Removes the top `n` blocks from the active chain (`invalidateblock`); they stay known.
    pub fn pop(&self, n: u32) {
        let mut c = lock(&self.inner.chain);
        let keep = c.active.len().saturating_sub(n as usize).max(1);
        c.active.truncate(keep);
    }

    /// A block on the tip whose header does not meet its target (bad proof of work).
    pub fn bad_pow_block(&self) -> Block {
        let mut c = lock(&self.inner.chain);
        let (_, tip) = c.tip();
        let mut block = c.build(tip, Vec::new());
        mine(&mut block.header, false);
        block
    }

    /// A block with valid proof of work that claims a parent which is not the tip.
    pub fn broken_parent_block(&self) -> Block {
        let mut c = lock(&self.inner.chain);
        let (height, _) = c.tip();
        let fake_parent = BlockHash::from_byte_array([0x5a; 32]);
        c.extra += 1;
        let time = c.start_time + height + 1;
        let mut block = assemble(fake_parent, height + 1, time, c.extra, &c.payout.clone(), Vec::new());
        mine(&mut block.header, true);
        block
    }

    /// Appends `block` to the active chain unchecked (to make the server lie).
    pub fn push_unchecked(&self, block: Block) -> BlockHash {
        lock(&self.inner.chain).push(block)
    }

    /// Answers one JSON-RPC call as bitcoind would (no HTTP, no auth): for unit tests.
    pub fn call(&self, method: &str, params: &[Value]) -> Result<Value, (i64, String)> {
        dispatch(&self.inner, method, params)
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let mut conns = Vec::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    conns.push(tokio::spawn(serve_conn(stream, inner.clone(), shutdown.clone())));
                }
                Err(e) => tracing::warn!(error = %e, "fake bitcoind: accept failed"),
            },
            _ = shutdown.changed() => break,
        }
        conns.retain(|c: &JoinHandle<()>| !c.is_finished());
    }
    drop(listener);
    for c in conns {
        c.abort();
        let _ = c.await;
    }
}

struct HttpRequest {
    method: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

async fn read_request(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> std::io::Result<Option<HttpRequest>> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let method = line.split_whitespace().next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    if len > 32 << 20 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "request too large"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(HttpRequest { method, headers, body }))
}

async fn serve_conn(stream: TcpStream, inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let req = tokio::select! {
            r = read_request(&mut rd) => r,
            _ = shutdown.changed() => return,
        };
        let req = match req {
            Ok(Some(r)) => r,
            _ => return,
        };
        if let Some(raw) = take_raw_answer(&inner, &req) {
            let _ = wr.write_all(&raw).await;
            return;
        }
        let close = req.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let (status, extra, body) = handle_http(&inner, &req);
        let reason = match status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Internal Server Error",
        };
        let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut out = head.into_bytes();
        out.extend_from_slice(&body);
        if wr.write_all(&out).await.is_err() || close {
            return;
        }
    }
}

/// The raw answer queued for this request's method, if any (counted as a call of it).
fn take_raw_answer(inner: &Inner, req: &HttpRequest) -> Option<Vec<u8>> {
    let value: Value = serde_json::from_slice(&req.body).ok()?;
    let method = value.get("method").and_then(Value::as_str)?;
    let mut answers = lock(&inner.raw_answers);
    let i = answers.iter().position(|(m, _)| m == method)?;
    *lock(&inner.calls).entry(method.to_string()).or_default() += 1;
    Some(answers.remove(i).1)
}

/// Status, extra headers, body.
fn handle_http(inner: &Inner, req: &HttpRequest) -> (u16, Vec<(&'static str, String)>, Vec<u8>) {
    if req.method != "POST" {
        return (405, vec![], b"JSONRPC server handles only POST requests".to_vec());
    }
    let www = ("WWW-Authenticate", "Basic realm=\"jsonrpc\"".to_string());
    let Some(auth) = req.header("authorization") else {
        return (401, vec![www], Vec::new());
    };
    if !authorized(inner, auth) {
        return (401, vec![www], Vec::new());
    }
    let ct = ("Content-Type", "application/json".to_string());
    let value: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(_) => {
            let body = json!({"result": null, "error": {"code": -32700, "message": "Parse error"}, "id": null});
            return (500, vec![ct], format!("{body}\n").into_bytes());
        }
    };
    match value {
        Value::Object(_) => {
            let (status, reply) = one_call(inner, &value, false);
            (status, vec![ct], format!("{reply}\n").into_bytes())
        }
        Value::Array(calls) => {
            let replies: Vec<Value> = calls.iter().map(|c| one_call(inner, c, true).1).collect();
            (200, vec![ct], format!("{}\n", Value::Array(replies)).into_bytes())
        }
        _ => {
            let body = json!({"result": null, "error": {"code": -32700, "message": "Top-level object parse error"}, "id": null});
            (500, vec![ct], format!("{body}\n").into_bytes())
        }
    }
}

fn authorized(inner: &Inner, header: &str) -> bool {
    let Some(b64) = header.strip_prefix("Basic ") else { return false };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else { return false };
    let Ok(text) = String::from_utf8(raw) else { return false };
    let Some((user, pass)) = text.split_once(':') else { return false };
    if inner.users.iter().any(|(u, p)| u == user && p == pass) {
        return true;
    }
    lock(&inner.cookie).as_ref().is_some_and(|(u, p)| u == user && p == pass)
}

/// One request object → (HTTP status, reply object). `in_batch` replies keep HTTP 200.
fn one_call(inner: &Inner, req: &Value, in_batch: bool) -> (u16, Value) {
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let v2 = req.get("jsonrpc").and_then(Value::as_str) == Some("2.0");
    let reply = |r: Result<Value, RpcError>| -> (u16, Value) {
        match (r, v2) {
            (Ok(v), false) => (200, json!({"result": v, "error": null, "id": id})),
            (Ok(v), true) => (200, json!({"jsonrpc": "2.0", "result": v, "id": id})),
            (Err((code, message)), false) => {
                let status = match code {
                    -32600 => 400,
                    -32601 => 404,
                    _ => 500,
                };
                let status = if in_batch { 200 } else { status };
                (status, json!({"result": null, "error": {"code": code, "message": message}, "id": id}))
            }
            (Err((code, message)), true) => {
                (200, json!({"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": id}))
            }
        }
    };
    let Some(method) = req.get("method").and_then(Value::as_str) else {
        return reply(Err((-32600, "Method must be a string".into())));
    };
    let params = match req.get("params") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return reply(Err((-32600, "Params must be an array or object".into()))),
    };
    *lock(&inner.calls).entry(method.to_string()).or_default() += 1;
    if let Some(msg) = lock(&inner.warmup).clone() {
        return reply(Err((-28, msg)));
    }
    reply(dispatch(inner, method, &params))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_error(v: &Value, want: &str) -> RpcError {
    (-3, format!("JSON value of type {} is not of expected type {want}", type_name(v)))
}

/// bitcoind's `ParseHashV`.
fn parse_hash(v: &Value, name: &str) -> Result<BlockHash, RpcError> {
    let s = v.as_str().ok_or_else(|| type_error(v, "string"))?;
    if s.len() != 64 {
        return Err((-8, format!("{name} must be of length 64 (not {}, for '{s}')", s.len())));
    }
    BlockHash::from_str(s).map_err(|_| (-8, format!("{name} must be hexadecimal string (not '{s}')")))
}

fn arity(method: &str, params: &[Value], min: usize, max: usize, usage: &str) -> Result<(), RpcError> {
    if params.len() < min || params.len() > max {
        return Err((-1, format!("{method} {usage}\n")));
    }
    Ok(())
}

fn work_hex(w: Work) -> String {
    w.to_be_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn header_json(c: &Chain, e: &Entry) -> Value {
    let h = &e.block.header;
    let (tip_height, _) = c.tip();
    let active = c.in_active(e);
    let confirmations = if active { (tip_height - e.height + 1) as i64 } else { -1 };
    let mut o = json!({
        "hash": h.block_hash().to_string(),
        "confirmations": confirmations,
        "height": e.height,
        "version": h.version.to_consensus(),
        "versionHex": format!("{:08x}", h.version.to_consensus()),
        "merkleroot": h.merkle_root.to_string(),
        "time": h.time,
        "mediantime": c.median_time(e.height.min(tip_height)),
        "nonce": h.nonce,
        "bits": format!("{:08x}", h.bits.to_consensus()),
        "target": work_hex_target(h.target()),
        "difficulty": h.difficulty_float(),
        "chainwork": work_hex(e.chainwork),
        "nTx": e.block.txdata.len(),
    });
    if e.height > 0 {
        o["previousblockhash"] = json!(h.prev_blockhash.to_string());
    }
    if active {
        if let Some(next) = c.active.get(e.height as usize + 1) {
            o["nextblockhash"] = json!(next.to_string());
        }
    }
    o
}

fn work_hex_target(t: Target) -> String {
    t.to_be_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn dispatch(inner: &Inner, method: &str, params: &[Value]) -> Result<Value, RpcError> {
    let c = lock(&inner.chain);
    match method {
        "getblockchaininfo" => {
            arity(method, params, 0, 0, "")?;
            let (height, hash) = c.tip();
            let e = c.entry(&hash).ok_or((-1, "no tip".to_string()))?;
            let syncing = *lock(&inner.syncing);
            Ok(json!({
                "chain": "regtest",
                "blocks": height,
                "headers": height + syncing.unwrap_or(0),
                "bestblockhash": hash.to_string(),
                "bits": format!("{:08x}", e.block.header.bits.to_consensus()),
                "target": work_hex_target(e.block.header.target()),
                "difficulty": e.block.header.difficulty_float(),
                "time": e.block.header.time,
                "mediantime": c.median_time(height),
                "verificationprogress": 1,
                "initialblockdownload": height == 0 || syncing.is_some(),
                "chainwork": work_hex(e.chainwork),
                "size_on_disk": 293 * (height as u64 + 1),
                "pruned": false,
                "warnings": [],
            }))
        }
        "getnetworkinfo" => Ok(json!({
            "version": 290300,
            "subversion": SUBVERSION,
            "protocolversion": 70016,
            "networkactive": true,
            "connections": 0,
            "relayfee": 0.00001,
            "warnings": [],
        })),
        "getblockcount" => {
            arity(method, params, 0, 0, "")?;
            Ok(json!(c.tip().0))
        }
        "getbestblockhash" => {
            arity(method, params, 0, 0, "")?;
            Ok(json!(c.tip().1.to_string()))
        }
        "getblockhash" => {
            arity(method, params, 1, 1, "height")?;
            let h = params[0].as_i64().ok_or_else(|| type_error(&params[0], "number"))?;
            if h < 0 || h > c.tip().0 as i64 {
                return Err((-8, "Block height out of range".into()));
            }
            Ok(json!(c.active[h as usize].to_string()))
        }
        "getblockheader" => {
            arity(method, params, 1, 2, "\"blockhash\" ( verbose )")?;
            let hash = parse_hash(&params[0], "blockhash")?;
            let verbose = match params.get(1) {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(type_error(v, "bool")),
            };
            let e = c.entry(&hash).ok_or((-5, "Block not found".to_string()))?;
            if verbose {
                Ok(header_json(&c, e))
            } else {
                Ok(json!(serialize_hex(&e.block.header)))
            }
        }
        "getblock" => {
            arity(method, params, 1, 2, "\"blockhash\" ( verbosity )")?;
            let hash = parse_hash(&params[0], "blockhash")?;
            let verbosity = match params.get(1) {
                None | Some(Value::Null) => 1,
                Some(Value::Bool(b)) => *b as i64,
                Some(v) => v.as_i64().ok_or_else(|| type_error(v, "number"))?,
            };
            let e = c.entry(&hash).ok_or((-5, "Block not found".to_string()))?;
            if verbosity <= 0 {
                return Ok(json!(serialize_hex(&e.block)));
            }
            let mut o = header_json(&c, e);
            let size = bitcoin::consensus::encode::serialize(&e.block).len();
            o["size"] = json!(size);
            o["weight"] = json!(e.block.weight().to_wu());
            o["tx"] = json!(e.block.txdata.iter().map(|t| t.compute_txid().to_string()).collect::<Vec<_>>());
            Ok(o)
        }
        _ => Err((-32601, "Method not found".into())),
    }
}

/// Reads bitcoind's cookie file format (`user:password`), for tests.
pub fn read_cookie(path: &Path) -> std::io::Result<(String, String)> {
    let text = std::fs::read_to_string(path)?;
    let (u, p) = text
        .trim_end()
        .split_once(':')
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "cookie has no ':'"))?;
    Ok((u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mined_blocks_are_valid_regtest_blocks() {
        let f = FakeBitcoind::start(Config::default()).await.unwrap();
        let hashes = f.mine(20);
        let mut prev = genesis_block(Network::Regtest).block_hash();
        for (i, h) in hashes.iter().enumerate() {
            let b = f.block(h).unwrap();
            assert_eq!(b.header.prev_blockhash, prev);
            assert!(b.header.validate_pow(Target::from_compact(CompactTarget::from_consensus(REGTEST_BITS))).is_ok());
            assert!(b.check_merkle_root());
            assert!(b.check_witness_commitment());
            if i >= 16 {
                // Heights 1..=16 are OP_1..OP_16 (as bitcoind writes them), which rust-bitcoin's parser skips.
                assert_eq!(b.bip34_block_height().unwrap(), i as u64 + 1);
            }
            prev = *h;
        }
        let bad = f.bad_pow_block();
        assert!(bad.header.validate_pow(bad.header.target()).is_err());
        assert_eq!(f.call("getblockhash", &[json!(21)]), Err((-8, "Block height out of range".into())));
        assert_eq!(f.call("getblock", &[json!("00")]).unwrap_err().0, -8);
        assert_eq!(f.call("nosuch", &[]).unwrap_err().0, -32601);
        let hdr = f.call("getblockheader", &[json!(hashes[4].to_string())]).unwrap();
        assert_eq!(hdr["height"], 5);
        assert_eq!(hdr["confirmations"], 16);
        assert_eq!(hdr["chainwork"].as_str().unwrap().len(), 64);
    }
}
