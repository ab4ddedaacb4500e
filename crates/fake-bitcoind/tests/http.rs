//! The fake answers over HTTP exactly in bitcoind's shapes (status codes, headers, bodies).

use base64::Engine;
use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::{Block, Network};
use fake_bitcoind::{Config, FakeBitcoind};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request on a fresh connection with `Connection: close`: (status, headers, body).
async fn post(f: &FakeBitcoind, auth: Option<(&str, &str)>, body: &str, method: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(f.addr()).await.unwrap();
    let mut req = format!("{method} / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if let Some((u, p)) = auth {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        req.push_str(&format!("Authorization: Basic {b}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

fn j(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

#[tokio::test]
async fn answers_in_bitcoinds_shapes() {
    let f = FakeBitcoind::start(Config { users: vec![("u".into(), "p".into())], ..Config::default() }).await.unwrap();
    f.mine(3);
    let ok = Some(("u", "p"));
    let call = |m: &str, p: Value| json!({"jsonrpc": "1.0", "id": 7, "method": m, "params": p}).to_string();

    // No login, wrong login: 401, basic realm, empty body.
    for auth in [None, Some(("u", "wrong"))] {
        let (st, head, body) = post(&f, auth, &call("getblockcount", json!([])), "POST").await;
        assert_eq!(st, 401);
        assert!(head.contains("WWW-Authenticate: Basic realm=\"jsonrpc\""), "{head}");
        assert!(body.is_empty());
    }
    // Only POST.
    assert_eq!(post(&f, ok, "", "GET").await.0, 405);

    // Success, legacy shape.
    let (st, _, body) = post(&f, ok, &call("getblockcount", json!([])), "POST").await;
    assert_eq!((st, j(&body)), (200, json!({"result": 3, "error": null, "id": 7})));
    // RPC errors: HTTP 500 with result null (legacy), 404 for an unknown method.
    let (st, _, body) = post(&f, ok, &call("getblockhash", json!([4])), "POST").await;
    assert_eq!(st, 500);
    assert_eq!(
        j(&body),
        json!({"result": null, "error": {"code": -8, "message": "Block height out of range"}, "id": 7})
    );
    let (st, _, body) = post(&f, ok, &call("getblockheader", json!(["00".repeat(32)])), "POST").await;
    assert_eq!((st, j(&body)["error"]["code"].clone()), (500, json!(-5)));
    assert_eq!(j(&body)["error"]["message"], "Block not found");
    let (st, _, body) = post(&f, ok, &call("getblock", json!(["xyz"])), "POST").await;
    assert_eq!(j(&body)["error"], json!({"code": -8, "message": "blockhash must be of length 64 (not 3, for 'xyz')"}));
    assert_eq!(st, 500);
    let (st, _, body) = post(&f, ok, &call("getblockhash", json!(["1"])), "POST").await;
    assert_eq!((st, j(&body)["error"]["code"].clone()), (500, json!(-3)));
    let (st, _, body) = post(&f, ok, &call("nosuchcall", json!([])), "POST").await;
    assert_eq!(st, 404);
    assert_eq!(j(&body)["error"], json!({"code": -32601, "message": "Method not found"}));
    let (st, _, body) = post(&f, ok, "{not json", "POST").await;
    assert_eq!((st, j(&body)["error"]["code"].clone()), (500, json!(-32700)));
    // JSON-RPC 2.0: HTTP 200 and no `result` on errors.
    let v2 = json!({"jsonrpc": "2.0", "id": 1, "method": "getblockhash", "params": [9]}).to_string();
    let (st, _, body) = post(&f, ok, &v2, "POST").await;
    assert_eq!(
        (st, j(&body)),
        (200, json!({"jsonrpc": "2.0", "error": {"code": -8, "message": "Block height out of range"}, "id": 1}))
    );
    // Batches.
    let batch =
        json!([{"id": 1, "method": "getblockcount"}, {"id": 2, "method": "getblockhash", "params": [9]}]).to_string();
    let (st, _, body) = post(&f, ok, &batch, "POST").await;
    assert_eq!(st, 200);
    assert_eq!(j(&body)[0]["result"], 3);
    assert_eq!(j(&body)[1]["error"]["code"], -8);
    // Warm-up.
    f.set_warmup(Some("Loading block index…"));
    let (st, _, body) = post(&f, ok, &call("getblockcount", json!([])), "POST").await;
    assert_eq!((st, j(&body)["error"]["code"].clone()), (500, json!(-28)));
    f.set_warmup(None);

    // Raw blocks and headers decode to what was mined.
    let hash = f.block_hash(2).unwrap();
    let (_, _, body) = post(&f, ok, &call("getblock", json!([hash.to_string(), 0])), "POST").await;
    let block: Block = deserialize_hex(j(&body)["result"].as_str().unwrap()).unwrap();
    assert_eq!(block.block_hash(), hash);
    let (_, _, body) = post(&f, ok, &call("getblockheader", json!([hash.to_string(), false])), "POST").await;
    assert_eq!(j(&body)["result"].as_str().unwrap().len(), 160);
    let (_, _, body) = post(&f, ok, &call("getblockheader", json!([hash.to_string()])), "POST").await;
    let h = &j(&body)["result"];
    assert_eq!(h["height"], 2);
    assert_eq!(h["bits"], "207fffff");
    assert_eq!(h["previousblockhash"], f.block_hash(1).unwrap().to_string());
    assert_eq!(h["nextblockhash"], f.block_hash(3).unwrap().to_string());
    let (_, _, body) = post(&f, ok, &call("getblockchaininfo", json!([])), "POST").await;
    let info = &j(&body)["result"];
    assert_eq!(info["chain"], "regtest");
    assert_eq!(info["blocks"], 3);
    assert_eq!(info["bestblockhash"], f.tip().1.to_string());
    assert_eq!(f.block_hash(0).unwrap(), bitcoin::blockdata::constants::genesis_block(Network::Regtest).block_hash());
}

#[tokio::test]
async fn cookie_is_rewritten_on_restart_and_removed_on_stop() {
    let dir = std::env::temp_dir().join(format!("fake-bitcoind-cookie-{}", std::process::id()));
    let f = FakeBitcoind::start(Config { cookie_dir: Some(dir.clone()), ..Config::default() }).await.unwrap();
    let path = f.cookie_file().unwrap();
    let (u, p1) = fake_bitcoind::read_cookie(&path).unwrap();
    assert_eq!(u, "__cookie__");
    let body = json!({"id": 1, "method": "getblockcount"}).to_string();
    assert_eq!(post(&f, Some((&u, &p1)), &body, "POST").await.0, 200);
    f.stop().await;
    assert!(!path.exists());
    assert!(TcpStream::connect(f.addr()).await.is_err(), "nothing listens while stopped");
    f.restart().await.unwrap();
    let (_, p2) = fake_bitcoind::read_cookie(&path).unwrap();
    assert_ne!(p1, p2);
    assert_eq!(post(&f, Some((&u, &p1)), &body, "POST").await.0, 401, "old cookie no longer works");
    assert_eq!(post(&f, Some((&u, &p2)), &body, "POST").await.0, 200);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_raw_answer_replaces_one_call_of_its_method() {
    let f = FakeBitcoind::start(Config { users: vec![("u".into(), "p".into())], ..Config::default() }).await.unwrap();
    let call = |m: &str| json!({"id": 1, "method": m, "params": []}).to_string();
    f.answer_raw_once("getblockcount", b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 0\r\n\r\n".to_vec());
    assert_eq!(f.raw_answers_pending(), 1);
    assert_eq!(post(&f, Some(("u", "p")), &call("getbestblockhash"), "POST").await.0, 200, "other methods unchanged");
    assert_eq!(post(&f, Some(("u", "p")), &call("getblockcount"), "POST").await.0, 418);
    assert_eq!(f.raw_answers_pending(), 0);
    let (st, _, body) = post(&f, Some(("u", "p")), &call("getblockcount"), "POST").await;
    assert_eq!((st, j(&body)["result"].clone()), (200, json!(0)), "only once");
    assert_eq!(f.calls("getblockcount"), 2);
}
