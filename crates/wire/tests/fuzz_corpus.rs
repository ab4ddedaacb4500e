//! Replays every file of `fuzz/corpus/{serial_request,serial_reply,token,hsmd,control,lss}/` through the
//! same checks the fuzz targets run (`fuzz/src/wire_checks.rs`, included here), so CI exercises
//! the corpora and every regression input without a nightly toolchain or cargo-fuzz.

#[path = "../../../fuzz/src/wire_checks.rs"]
mod wire_checks;

#[path = "../../../fuzz/src/corpus.rs"]
mod corpus;

use std::path::Path;

use corpus::{corpus, replay};

#[test]
fn serial_request_corpus() {
    replay("serial_request", wire_checks::serial_request);
}

#[test]
fn serial_reply_corpus() {
    replay("serial_reply", wire_checks::serial_reply);
}

#[test]
fn token_corpus() {
    replay("token", wire_checks::token);
}

#[test]
fn hsmd_corpus() {
    replay("hsmd", wire_checks::hsmd);
}

#[test]
fn control_corpus() {
    replay("control", wire_checks::control);
}

#[test]
fn lss_corpus() {
    replay("lss", wire_checks::lss);
}

/// The LSS seeds are real messages of every variant (they reach past the variant names).
#[test]
fn lss_seeds_decode() {
    use sphinx_wire::lss::{Msg, Response};
    let mut n = 0;
    for (path, body) in corpus("lss") {
        let name = path.file_name().and_then(|f| f.to_str()).unwrap_or_default().to_string();
        if name.starts_with("seed-msg-") {
            Msg::decode(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
            n += 1;
        } else if name.starts_with("seed-res-") {
            Response::decode(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
            n += 1;
        }
    }
    assert!(n >= 8);
}

/// The token seeds must reach the success path, or the fuzzer never explores past the
/// signature check.
#[test]
fn token_seed_verifies() {
    let seed =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/token/seed-tribe")).expect("seed");
    let text = String::from_utf8(seed).expect("utf8");
    let (user, pass) = text.split_once('\n').expect("two lines");
    assert!(sphinx_wire::token::verify(user, pass.as_bytes(), 0x5ee3a9e4, 300).is_ok());
}

/// The control seeds are real messages (they reach past the msgpack decoder).
#[test]
fn control_seeds_decode() {
    use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
    let sk = SecretKey::from_slice(&[0x11; 32]).expect("key");
    let pk = PublicKey::from_secret_key(&Secp256k1::new(), &sk);
    let mut n = 0;
    for (path, body) in corpus("control") {
        let name = path.file_name().and_then(|f| f.to_str()).unwrap_or_default().to_string();
        let mut signed = body.clone();
        signed.extend_from_slice(&7u64.to_be_bytes());
        signed.extend_from_slice(&sphinx_wire::token::sign_message(&signed.clone(), &sk));
        if name.starts_with("seed-req-") {
            sphinx_wire::control::parse_request(&signed, &pk).unwrap_or_else(|e| panic!("{name}: {e}"));
            n += 1;
        } else if name.starts_with("seed-rep-") {
            sphinx_wire::control::parse_response(&signed, &pk, 7).unwrap_or_else(|e| panic!("{name}: {e}"));
            n += 1;
        }
    }
    assert!(n >= 10);
}
