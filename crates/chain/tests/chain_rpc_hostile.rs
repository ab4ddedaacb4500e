//! The bitcoind client against a hostile JSON-RPC server (issue 8, item 1): raw TCP servers that
//! answer with endless lines, huge or overflowing sizes, or stall. Every read from bitcoind must be
//! bounded in bytes (status line, each header, the whole body), sizes must never overflow, and the
//! client must answer with an error, never a panic.
//!
//! Memory is shown bounded without measuring it: the server counts the bytes it managed to write
//! before the client hung up. A client that buffers the whole answer lets the server write all of
//! it (gigabytes); a bounded one hangs up after its bound plus what the kernel's socket buffers
//! hold (a few MiB on loopback).

use std::time::Duration;

use bitcoin::Network;
use sphinx_chain::rpc::{parse_endpoint, RpcClient, RpcError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// What a server may write beyond the client's bound before the client hangs up: the socket
/// buffers of both ends on loopback (Linux autotuning: up to 4 MiB send + 6 MiB receive) with
/// room to spare, and far below what an unbounded client reads.
const SLACK: u64 = 24 * MIB;
/// The default body bound (`RpcLimits::default().max_body`, docs/chain.md).
const MAX_BODY: u64 = 16 * MIB;

/// A valid `getblockchaininfo` answer (regtest, at genesis).
const GOOD_INFO: &str = concat!(
    r#"{"result":{"chain":"regtest","blocks":0,"headers":0,"#,
    r#""bestblockhash":"0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206","#,
    r#""initialblockdownload":false},"error":null,"id":1}"#
);

/// What the server wrote on one connection.
#[derive(Debug)]
struct Sent {
    /// Bytes written (head + filler + tail) before the client hung up or the script ended.
    written: u64,
    /// Whether the whole script was written (the client read or buffered all of it).
    all: bool,
}

/// What a hostile server sends: `head`, then `fill` bytes made of `unit` repeated (cut to
/// whole units), then `tail`; then it closes, or keeps the connection open until the client
/// closes it (`stall`).
#[derive(Clone)]
struct Script {
    head: Vec<u8>,
    unit: Vec<u8>,
    fill: u64,
    tail: Vec<u8>,
    stall: bool,
}

impl Script {
    fn new(head: &[u8]) -> Script {
        Script { head: head.to_vec(), unit: b"a".to_vec(), fill: 0, tail: Vec::new(), stall: false }
    }
    fn fill(mut self, unit: &[u8], bytes: u64) -> Script {
        self.unit = unit.to_vec();
        self.fill = bytes;
        self
    }
    fn tail(mut self, tail: &[u8]) -> Script {
        self.tail = tail.to_vec();
        self
    }
    fn stall(mut self) -> Script {
        self.stall = true;
        self
    }
}

/// Reads one HTTP request (head and `Content-Length` body), at most 64 KiB.
async fn read_request(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return true;
            }
        }
        if buf.len() > 64 << 10 {
            return false;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Plays `script` on one connection; returns what it wrote.
async fn play(mut s: TcpStream, script: &Script) -> Sent {
    let mut written = 0u64;
    if !read_request(&mut s).await {
        return Sent { written, all: false };
    }
    if s.write_all(&script.head).await.is_err() {
        return Sent { written, all: false };
    }
    written += script.head.len() as u64;
    // Writes of about 64 KiB made of whole units.
    let per = (64usize << 10).div_ceil(script.unit.len()).max(1);
    let buf: Vec<u8> = script.unit.iter().copied().cycle().take(per * script.unit.len()).collect();
    let mut left = script.fill;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        if s.write_all(&buf[..n]).await.is_err() {
            return Sent { written, all: false };
        }
        written += n as u64;
        left -= n as u64;
    }
    if s.write_all(&script.tail).await.is_err() {
        return Sent { written, all: false };
    }
    written += script.tail.len() as u64;
    if script.stall {
        // Holds the connection until the client closes it (the bound turns a hang into a failure).
        let mut b = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    } else {
        let _ = s.shutdown().await;
    }
    Sent { written, all: true }
}

/// A server playing `script` on every connection; reports what it wrote on each.
async fn hostile(script: Script) -> (String, mpsc::UnboundedReceiver<Sent>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (script, tx) = (script.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(play(s, &script).await);
            });
        }
    });
    (format!("http://u:p@{addr}"), rx)
}

/// A client with the default limits; `timeout` bounds each call.
fn client(url: &str, timeout: Duration) -> RpcClient {
    RpcClient::new(parse_endpoint(url, None, Network::Regtest).unwrap(), timeout)
}

/// One `getblockchaininfo` against `script`, run in its own task so that a panic in the client
/// is reported as such; returns the error and what the server wrote.
async fn exchange(script: Script, timeout: Duration) -> (RpcError, Sent) {
    let (url, mut sent) = hostile(script).await;
    let mut c = client(&url, timeout);
    let r = tokio::spawn(async move { c.chain_info().await }).await;
    let r = match r {
        Ok(r) => r,
        Err(e) => panic!("the client panicked on a hostile answer: {e}"),
    };
    let e = match r {
        Ok(info) => panic!("a hostile answer was taken for a reply: {info:?}"),
        Err(e) => e,
    };
    let s =
        tokio::time::timeout(Duration::from_secs(60), sent.recv()).await.expect("server done").expect("one connection");
    (e, s)
}

fn assert_too_large(e: &RpcError, what: &str) {
    match e {
        RpcError::BadReply { reason, .. } if reason.contains("larger than") => {}
        e => panic!("{what}: expected a 'larger than' bad reply, got: {e}"),
    }
}

/// A status line of 4 GiB without a newline: the client stops reading at its head bound while
/// the server is still sending, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_rpc_hostile_endless_status_line_is_cut_at_the_head_bound() {
    let (e, sent) = exchange(Script::new(b"HTTP/1.1 200 ").fill(b"a", 4 * GIB), Duration::from_secs(20)).await;
    eprintln!("endless status line: {e}; server wrote {} bytes", sent.written);
    assert!(!sent.all, "the client hung up while the server was still sending");
    assert!(sent.written < SLACK, "the client read {} bytes of a status line", sent.written);
    assert_too_large(&e, "endless status line");
}

/// Oversized headers: one endless header line, headers adding up past the head bound, and more
/// header lines than bitcoind ever sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_rpc_hostile_oversized_headers_are_refused() {
    // The control: the same answer behind a few ordinary headers is taken.
    let tail = format!("Content-Length: {}\r\n\r\n{GOOD_INFO}", GOOD_INFO.len());
    let (url, _) = hostile(Script::new(b"HTTP/1.1 200 OK\r\nX-a: b\r\n").tail(tail.as_bytes())).await;
    let info = client(&url, Duration::from_secs(20)).chain_info().await.expect("a valid answer");
    assert_eq!((info.chain.as_str(), info.blocks), ("regtest", 0));

    let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Junk: ";
    let (e, sent) = exchange(Script::new(head).fill(b"a", 4 * GIB), Duration::from_secs(20)).await;
    eprintln!("endless header line: {e}; server wrote {} bytes", sent.written);
    assert!(!sent.all && sent.written < SLACK, "the client read {} bytes of one header", sent.written);
    assert_too_large(&e, "endless header line");

    // 1 MiB of short, complete header lines, then the valid answer.
    let s = Script::new(b"HTTP/1.1 200 OK\r\n").fill(b"X-Junk: 0123456789abcdef\r\n", MIB).tail(tail.as_bytes());
    let (e, sent) = exchange(s, Duration::from_secs(20)).await;
    eprintln!("1 MiB of headers: {e}; server wrote {} bytes", sent.written);
    assert_too_large(&e, "1 MiB of headers");

    // 200 header lines in 2 KiB: small, but more than any HTTP server in front of bitcoind sends.
    let s = Script::new(b"HTTP/1.1 200 OK\r\n").fill(b"X-a: b\r\n", 200 * 8).tail(tail.as_bytes());
    let (e, _) = exchange(s, Duration::from_secs(20)).await;
    eprintln!("200 headers: {e}");
    assert!(matches!(e, RpcError::BadReply { .. }), "200 headers: {e}");
}

/// Chunked bodies whose sizes are meant to overflow the length arithmetic: errors, never a panic
/// (release builds wrap instead of checking), and the body bound still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_rpc_hostile_chunk_sizes_near_u64_max_are_errors_not_panics() {
    let chunked = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    // A first chunk, then one of u64::MAX bytes (the sum overflows), followed by 4 GiB of data.
    let head = [&chunked[..], b"1\r\n{\r\nffffffffffffffff\r\n"].concat();
    let (e, sent) = exchange(Script::new(&head).fill(b"a", 4 * GIB), Duration::from_secs(20)).await;
    eprintln!("chunk of u64::MAX bytes: {e}; server wrote {} bytes", sent.written);
    assert!(!sent.all && sent.written < MAX_BODY + SLACK, "the client read {} bytes of one chunk", sent.written);
    assert_too_large(&e, "chunk of u64::MAX bytes");

    // The same sum overflow, then the connection ends.
    let head = [&chunked[..], b"10\r\n{\"result\":null, \r\nfffffffffffffff0\r\n\"x\""].concat();
    let (e, _) = exchange(Script::new(&head), Duration::from_secs(20)).await;
    eprintln!("16 bytes, then a chunk of 2^64-16: {e}");

    // A size that does not fit in 64 bits.
    let head = [&chunked[..], b"1ffffffffffffffff\r\n{}\r\n0\r\n\r\n"].concat();
    let (e, _) = exchange(Script::new(&head), Duration::from_secs(20)).await;
    eprintln!("chunk size over 64 bits: {e}");
    assert!(matches!(e, RpcError::BadReply { .. }), "{e}");

    // A chunk-size line (an extension) of 4 GiB without a newline.
    let head = [&chunked[..], b"1;ext="].concat();
    let (e, sent) = exchange(Script::new(&head).fill(b"a", 4 * GIB), Duration::from_secs(20)).await;
    eprintln!("endless chunk extension: {e}; server wrote {} bytes", sent.written);
    assert!(!sent.all && sent.written < SLACK, "the client read {} bytes of a chunk-size line", sent.written);
    assert!(matches!(e, RpcError::BadReply { .. }), "{e}");

    // Endless trailers after the last chunk.
    let head = [&chunked[..], b"2\r\n{}\r\n0\r\nX-Trailer: "].concat();
    let (e, sent) = exchange(Script::new(&head).fill(b"a", 4 * GIB), Duration::from_secs(20)).await;
    eprintln!("endless trailer: {e}; server wrote {} bytes", sent.written);
    assert!(!sent.all && sent.written < SLACK, "the client read {} bytes of a trailer", sent.written);
    assert!(matches!(e, RpcError::BadReply { .. }), "{e}");
}

/// Bodies over the bound, however they are delimited: refused from the declared length without
/// reading it, or cut at the bound while the server is still sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_rpc_hostile_body_larger_than_the_bound_is_refused() {
    // Delimited by the end of the connection (HTTP/1.0), 4 GiB.
    let s = Script::new(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n").fill(b"a", 4 * GIB);
    let (e, sent) = exchange(s, Duration::from_secs(20)).await;
    eprintln!("close-delimited 4 GiB: {e}; server wrote {} bytes", sent.written);
    assert!(!sent.all && sent.written < MAX_BODY + SLACK, "the client read {} bytes of the body", sent.written);
    assert_too_large(&e, "close-delimited 4 GiB");

    // Chunked, in 1 MiB chunks, 4 GiB.
    let mut unit = format!("{:x}\r\n", MIB).into_bytes();
    unit.extend(std::iter::repeat_n(b' ', MIB as usize));
    unit.extend_from_slice(b"\r\n");
    let s = Script::new(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").fill(&unit, 4 * GIB);
    let (e, sent) = exchange(s, Duration::from_secs(20)).await;
    eprintln!("chunked 4 GiB: {e}; server wrote {} bytes", sent.written);
    assert!(!sent.all && sent.written < MAX_BODY + SLACK, "the client read {} bytes of the body", sent.written);
    assert_too_large(&e, "chunked 4 GiB");

    // Declared: 1 TiB.
    let s = Script::new(b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n").fill(b"a", 4 * GIB);
    let (e, sent) = exchange(s, Duration::from_secs(20)).await;
    eprintln!("Content-Length 1 TiB: {e}; server wrote {} bytes", sent.written);
    assert!(!sent.all && sent.written < SLACK, "the client read {} bytes of a refused body", sent.written);
    assert_too_large(&e, "Content-Length 1 TiB");
}

/// A server that stops in the middle of a body, or drips it a byte at a time: the call's
/// timeout covers the whole exchange, not each read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_rpc_hostile_server_stalling_mid_body_times_out() {
    let s = Script::new(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"result\":").stall();
    let (e, _) = exchange(s, Duration::from_millis(300)).await;
    assert!(matches!(e, RpcError::Timeout { .. }), "stalled mid-body: {e}");

    // One byte at a time, each well within any per-read timeout, never finishing.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let drip = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        read_request(&mut s).await;
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n").await;
        let mut n = 0u32;
        // Ends when the client hangs up (or after a bound that fails the test below).
        while n < 2000 && s.write_all(b" ").await.is_ok() {
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    });
    let mut c = client(&format!("http://u:p@{addr}"), Duration::from_millis(500));
    let e = c.chain_info().await.unwrap_err();
    assert!(matches!(e, RpcError::Timeout { .. }), "dripping body: {e}");
    let dripped = drip.await.unwrap();
    assert!(dripped < 2000, "the client kept the dripping connection open ({dripped} writes)");
}
