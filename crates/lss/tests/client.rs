//! `LssClient` against a real `lssd` (redb): info, auth by the documented ECDH token, get with the
//! nonce HMAC, put with client/server HMACs, version conflicts, bounded waits.

use std::time::{Duration, Instant};

use bitcoin::secp256k1::ecdh::SharedSecret;
use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
use sphinx_lss::lssd::Lssd;
use sphinx_lss::{LssClient, LssError};
use sphinx_wire::lss::{self, InitResponse, Mutation, SignerMutations};

const T: Duration = Duration::from_secs(10);

/// A signer's LSS identity as docs/wire.md derives it (the persistence key is arbitrary here).
fn identity(server: &[u8; 33], secret: u8) -> (InitResponse, [u8; 32]) {
    let sk = SecretKey::from_slice(&[secret; 32]).expect("key");
    let pk = PublicKey::from_secret_key(&Secp256k1::new(), &sk);
    let server = PublicKey::from_slice(server).expect("server key");
    let shared = SharedSecret::new(&server, &sk).secret_bytes();
    (InitResponse { client_id: pk.serialize(), auth_token: lss::auth_token(&shared), nonce: Some([7; 32]) }, shared)
}

fn signed(shared: &[u8; 32], muts: Vec<Mutation>) -> SignerMutations {
    SignerMutations { client_hmac: lss::client_hmac(shared, &muts), muts }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_conflict_and_hmacs_against_real_lssd() {
    let server = Lssd::start_temp("client").expect("lssd");
    let info = LssClient::info(&server.url(), T).await.expect("info");
    let (id, shared) = identity(&info.pubkey, 0x21);
    let mut c = LssClient::connect(&server.url(), T, &id).await.expect("connect");

    let empty = c.get_all(&[1; 32]).await.expect("get");
    assert!(empty.muts.is_empty());
    assert_eq!(empty.server_hmac, Some(lss::shared_hmac(&shared, &[1; 32], &[])), "get HMAC covers the nonce");

    let first = vec![Mutation::new("a/key", 0, b"one".to_vec()), Mutation::new("b/key", 0, b"two".to_vec())];
    let hmac = c.put(&signed(&shared, first.clone())).await.expect("put");
    assert_eq!(hmac, Some(lss::server_hmac(&shared, &first)), "server HMAC proves what was stored");

    let got = c.get_all(&[2; 32]).await.expect("get");
    assert_eq!(got.muts, first);
    assert_eq!(got.server_hmac, Some(lss::shared_hmac(&shared, &[2; 32], &first)));

    // Next versions are accepted; a stale version (another writer got there first) is a conflict
    // that stores nothing, and names the current value.
    let next = vec![Mutation::new("a/key", 1, b"one'".to_vec())];
    c.put(&signed(&shared, next.clone())).await.expect("next version");
    let stale = vec![Mutation::new("a/key", 1, b"fork".to_vec()), Mutation::new("c/new", 0, b"x".to_vec())];
    match c.put(&signed(&shared, stale)).await {
        Err(LssError::Conflict(keys)) => {
            assert_eq!(keys, vec![("a/key".to_string(), Some(next[0].clone()))]);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let after = c.get_all(&[3; 32]).await.expect("get");
    assert_eq!(after.muts.len(), 2, "the conflicting put stored nothing: {:?}", after.muts);
    // A gap in versions is a conflict too, and a new key must start at 0.
    assert!(matches!(
        c.put(&signed(&shared, vec![Mutation::new("z", 1, vec![])])).await,
        Err(LssError::Conflict(k)) if k == vec![("z".to_string(), None)]
    ));

    // A client HMAC that does not match is refused by the server.
    let mut forged = signed(&shared, vec![Mutation::new("a/key", 2, b"evil".to_vec())]);
    forged.client_hmac[0] ^= 1;
    assert!(matches!(c.put(&forged).await, Err(LssError::Refused { op: "put", .. })));
    // Unsorted keys are refused here, before they reach the server.
    let unsorted = signed(&shared, vec![Mutation::new("b", 0, vec![]), Mutation::new("a", 0, vec![])]);
    assert!(matches!(c.put(&unsorted).await, Err(LssError::BadRequest(_))));

    // Another client id is another namespace; a wrong token is refused.
    let (other, _) = identity(&info.pubkey, 0x22);
    let mut c2 = LssClient::connect(&server.url(), T, &other).await.expect("connect");
    assert!(c2.get_all(&[4; 32]).await.expect("get").muts.is_empty());
    let mut bad = other.clone();
    bad.auth_token[0] ^= 1;
    let mut c3 = LssClient::connect(&server.url(), T, &bad).await.expect("connect");
    assert!(matches!(c3.get_all(&[5; 32]).await, Err(LssError::Refused { op: "get", .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_key_and_data_and_dead_servers_fail_within_the_bound() {
    let mut server = Lssd::start_temp("restart").expect("lssd");
    let url = server.url();
    let info = LssClient::info(&url, T).await.expect("info");
    let (id, shared) = identity(&info.pubkey, 0x31);
    let mut c = LssClient::connect(&url, T, &id).await.expect("connect");
    let m = vec![Mutation::new("k", 0, b"v".to_vec())];
    c.put(&signed(&shared, m.clone())).await.expect("put");

    server.kill();
    let started = Instant::now();
    let err = c.get_all(&[1; 32]).await.expect_err("server is down");
    assert!(matches!(err, LssError::Connect { .. } | LssError::Refused { .. }), "{err:?}");
    assert!(LssClient::info(&url, Duration::from_secs(2)).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(8), "failures are bounded");

    server.restart().expect("restart");
    assert_eq!(LssClient::info(&url, T).await.expect("info").pubkey, info.pubkey, "same identity");
    let mut c = LssClient::connect(&url, T, &id).await.expect("connect");
    assert_eq!(c.get_all(&[2; 32]).await.expect("get").muts, m, "data survived the kill");

    // A server that accepts TCP but never answers: the call ends at the bound.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_url = format!("http://{}", silent.local_addr().expect("addr"));
    let started = Instant::now();
    let err = LssClient::info(&silent_url, Duration::from_millis(300)).await.expect_err("no answer");
    assert!(matches!(err, LssError::Timeout { op: "info", .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}
