//! The bitcoind client against the fake bitcoind and against odd HTTP servers.

use std::time::Duration;

use bitcoin::hashes::Hash;
use bitcoin::{BlockHash, Network};
use fake_bitcoind::{Config, FakeBitcoind};
use sphinx_chain::rpc::{parse_endpoint, RpcClient, RpcError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn client(url: &str, cookie: Option<std::path::PathBuf>) -> RpcClient {
    RpcClient::new(parse_endpoint(url, cookie, Network::Regtest).unwrap(), Duration::from_secs(5))
}

#[tokio::test]
async fn chain_rpc_calls_and_error_mapping() {
    let f = FakeBitcoind::start(Config { users: vec![("u".into(), "p".into())], ..Config::default() }).await.unwrap();
    let hashes = f.mine(4);
    let mut c = client(&f.url_with_login("u", "p"), None);
    let info = c.chain_info().await.unwrap();
    assert_eq!((info.chain.as_str(), info.blocks, info.best), ("regtest", 4, hashes[3]));
    assert_eq!(c.block_hash(2).await.unwrap(), Some(hashes[1]));
    assert_eq!(c.block_hash(5).await.unwrap(), None, "-8 above the tip is 'no block yet'");
    let b = c.block(&hashes[2]).await.unwrap();
    assert_eq!(b.block_hash(), hashes[2]);
    assert_eq!(c.header(&hashes[2]).await.unwrap(), b.header);
    match c.header(&BlockHash::all_zeros()).await {
        Err(RpcError::Rpc { code: -5, message, .. }) => assert_eq!(message, "Block not found"),
        other => panic!("{other:?}"),
    }
    // Many calls ride one kept-alive connection.
    for _ in 0..50 {
        c.block_hash(1).await.unwrap();
    }
    // Wrong password: a clear error.
    let mut bad = client(&f.url_with_login("u", "nope"), None);
    let e = bad.chain_info().await.unwrap_err();
    assert!(matches!(e, RpcError::Unauthorized(_)), "{e}");
    assert!(e.to_string().contains("rejected the login"));
    // Warm-up is its own error.
    f.set_warmup(Some("Verifying blocks…"));
    assert!(matches!(c.chain_info().await, Err(RpcError::Warmup(m)) if m == "Verifying blocks…"));
}

#[tokio::test]
async fn chain_rpc_cookie_is_reread_after_bitcoind_restarts() {
    let dir = std::env::temp_dir().join(format!("sphinx-chain-rpc-cookie-{}", std::process::id()));
    let f = FakeBitcoind::start(Config { cookie_dir: Some(dir.clone()), ..Config::default() }).await.unwrap();
    let mut c = client(&f.url(), f.cookie_file());
    assert_eq!(c.chain_info().await.unwrap().blocks, 0);
    f.stop().await;
    let e = c.chain_info().await.unwrap_err();
    assert!(matches!(e, RpcError::Cookie { .. } | RpcError::Unreachable { .. }), "{e}");
    f.restart().await.unwrap(); // new cookie
    f.mine(1);
    assert_eq!(c.chain_info().await.unwrap().blocks, 1, "reconnected with the new cookie");
    let _ = std::fs::remove_dir_all(dir);
}

/// Serves each connection one canned response (after reading the request headers and body).
async fn canned(response: &'static [u8], reply: bool) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                if reply {
                    let _ = s.write_all(response).await;
                    let _ = s.shutdown().await;
                } else {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    format!("http://u:p@{addr}")
}

#[tokio::test]
async fn chain_rpc_odd_servers_give_errors_not_panics() {
    // Chunked body.
    let url = canned(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"res\r\n20\r\nult\":\"regtest-ish\",\"error\":null}\r\n0\r\n\r\n",
        true,
    )
    .await;
    let v = client(&url, None).call("x", serde_json::json!([])).await.unwrap();
    assert_eq!(v, "regtest-ish");
    // Body delimited by the end of the connection (HTTP/1.0 style).
    let url = canned(b"HTTP/1.0 200 OK\r\n\r\n{\"result\":5,\"error\":null,\"id\":1}", true).await;
    assert_eq!(client(&url, None).call("x", serde_json::json!([])).await.unwrap(), 5);
    // Not HTTP, not JSON, wrong types: errors.
    let url = canned(b"SSH-2.0-OpenSSH\r\n", true).await;
    assert!(client(&url, None).chain_info().await.is_err());
    let url = canned(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", true).await;
    assert!(matches!(client(&url, None).chain_info().await, Err(RpcError::BadReply { .. })));
    let url = canned(b"HTTP/1.1 200 OK\r\nContent-Length: 29\r\n\r\n{\"result\":{\"chain\":7},\"id\":1}", true).await;
    assert!(matches!(client(&url, None).chain_info().await, Err(RpcError::BadReply { .. })));
    let url =
        canned(b"HTTP/1.1 200 OK\r\nContent-Length: 31\r\n\r\n{\"result\":\"00zz\",\"error\":null}\n", true).await;
    assert!(matches!(client(&url, None).block_hash(1).await, Err(RpcError::BadReply { .. })));
    // Silence: bounded by the timeout.
    let url = canned(b"", false).await;
    let mut c = RpcClient::new(parse_endpoint(&url, None, Network::Regtest).unwrap(), Duration::from_millis(200));
    assert!(matches!(c.chain_info().await, Err(RpcError::Timeout { .. })));
    // Nothing listening.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let e = client(&format!("http://u:p@{addr}"), None).chain_info().await.unwrap_err();
    assert!(matches!(e, RpcError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("cannot reach bitcoind"));
}
