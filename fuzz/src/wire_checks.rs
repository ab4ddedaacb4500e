//! Checks of `sphinx_wire`'s parsers (fuzz targets `serial_request`, `serial_reply`, `token`,
//! `hsmd`, `control`, `lss`). Depends on `sphinx_wire` and `bitcoin` (a dependency of `sphinx_wire`)
//! only, so `crates/wire/tests/fuzz_corpus.rs` can include it.

use std::sync::OnceLock;

use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
use sphinx_wire::{control, hsmd, lss, serial, token};

/// `serial_request`: a request frame from the network (the signer parses the broker's
/// `{id}/vls` payloads). A frame that decodes must re-encode to the same bytes, and is never
/// also a reply.
pub fn serial_request(data: &[u8]) {
    if let Ok(r) = serial::Request::decode(data) {
        assert_eq!(r.encode(), data, "request does not round-trip");
        assert!(r.message.len() >= 2);
        assert!(serial::Reply::decode(data).is_err(), "a request decoded as a reply");
    }
}

/// `serial_reply`: a reply frame from the network (the broker parses the signer's
/// `{id}/vls-res` payloads). A frame that decodes must re-encode to the same bytes.
pub fn serial_reply(data: &[u8]) {
    if let Ok(r) = serial::Reply::decode(data) {
        assert_eq!(r.encode(), data, "reply does not round-trip");
        assert!(r.message.len() >= 2);
        assert!(serial::Request::decode(data).is_err(), "a reply decoded as a request");
    }
}

/// `token`: an MQTT login. Input: `username \n password [\n now]` (`now` in decimal seconds;
/// without it the token's own timestamp is used, so a valid seed token verifies). An accepted
/// login names the key that signed it, with a timestamp inside the window.
pub fn token(data: &[u8]) {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let username = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let password = parts.next().unwrap_or_default();
    let now: Option<u64> = parts.next().and_then(|n| std::str::from_utf8(n).ok()).and_then(|n| n.trim().parse().ok());
    // The raw signature path, on whatever the password holds.
    if password.len() >= 4 {
        let _ = token::recover(&password[..4], &password[4..]);
    }
    let window = 300;
    let now = now.unwrap_or_else(|| token_ts(password).unwrap_or(0));
    if let Ok(pk) = token::verify(&username, password, now, window) {
        assert!(pk.to_string().eq_ignore_ascii_case(&username), "accepted key is not the username");
        let ts = token_ts(password).unwrap_or(u64::MAX);
        assert!(now.abs_diff(ts) <= window, "accepted a token outside the window");
    }
}

/// The timestamp inside a well-formed token (for the default `now`).
fn token_ts(password: &[u8]) -> Option<u64> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    // Decode just the first 6 base64url characters (36 bits ≥ the 32-bit timestamp).
    let mut acc: u64 = 0;
    for c in password.get(..6)? {
        let v = ALPHABET.iter().position(|a| a == c)? as u64;
        acc = (acc << 6) | v;
    }
    Some(acc >> 4)
}

/// `hsmd`: Core Lightning's hsmd wire. The input is a message (type + body) for the body parsers
/// and, when it has 4 bytes, also a length prefix for `frame_len`.
pub fn hsmd(data: &[u8]) {
    if let Some(prefix) = data.get(..4) {
        let prefix = [prefix[0], prefix[1], prefix[2], prefix[3]];
        if let Ok(len) = hsmd::frame_len(prefix) {
            assert!((2..=hsmd::MAX_MESSAGE_LEN).contains(&len));
            assert_eq!(len, u32::from_be_bytes(prefix) as usize);
        }
    }
    let ty = hsmd::msg_type(data);
    assert_eq!(ty.is_ok(), data.len() >= 2);
    if let Ok(ctx) = hsmd::parse_client_hsmfd(data) {
        assert_eq!(ty, Ok(hsmd::CLIENT_HSMFD));
        let mut m = hsmd::CLIENT_HSMFD.to_be_bytes().to_vec();
        m.extend_from_slice(&ctx.peer_id);
        m.extend_from_slice(&ctx.dbid.to_be_bytes());
        m.extend_from_slice(&ctx.permissions.to_be_bytes());
        assert!(data.starts_with(&m), "client_hsmfd fields do not match the bytes");
    }
    if let Ok(chain) = hsmd::parse_init_chain_hash(data) {
        assert_eq!(ty, Ok(hsmd::HSMD_INIT));
        assert_eq!(data.get(10..42), Some(&chain[..]));
    }
    let node = hsmd::parse_init_reply_node_id(data);
    let caps = hsmd::parse_init_reply_capabilities(data);
    if node.is_ok() {
        let caps = caps.as_ref().map(Vec::len);
        assert!(caps.is_ok(), "node id parsed but capabilities did not");
    }
    if let Ok(caps) = &caps {
        assert!(caps.len() <= usize::from(u16::MAX));
    }
    // A parsed init accounts for every byte: fixed part, then records in increasing type order.
    if let Ok(init) = hsmd::parse_init(data) {
        assert!(init.fixed_len <= data.len());
        assert!(init.tlvs.windows(2).all(|w| w[0].typ < w[1].typ));
        let values: usize = init.tlvs.iter().map(|t| t.value.len() + 2).sum();
        assert!(values <= data.len() - init.fixed_len, "TLV values longer than the stream");
        assert_eq!(hsmd::parse_tlv_stream(&data[init.fixed_len..]).as_ref(), Ok(&init.tlvs));
    }
    // Framing a message and reading its prefix back gives its length (when in range).
    if data.len() <= 4096 {
        let framed = hsmd::frame(data);
        assert_eq!(&framed[4..], data);
        let prefix = [framed[0], framed[1], framed[2], framed[3]];
        assert_eq!(hsmd::frame_len(prefix).ok(), (data.len() >= 2).then_some(data.len()));
    }
}

/// The fixed key the `control` check signs the fuzzer's bodies with.
fn control_key() -> &'static (SecretKey, PublicKey) {
    static KEY: OnceLock<(SecretKey, PublicKey)> = OnceLock::new();
    KEY.get_or_init(|| {
        let sk = match SecretKey::from_slice(&[0x11; 32]) {
            Ok(k) => k,
            Err(e) => panic!("constant test key: {e}"),
        };
        (sk, PublicKey::from_secret_key(&Secp256k1::signing_only(), &sk))
    })
}

/// `control`: owner control messages (`{id}/control`, parsed by the signer) and their
/// responses (parsed by the owner). The input is the msgpack body; the check appends a nonce
/// and a signature by a fixed key, so every input reaches the msgpack decoder (a fuzzer cannot
/// forge signatures). A decoded message re-encodes to one that decodes to the same value. The
/// raw input is also offered unsigned (length and signature checks).
pub fn control(data: &[u8]) {
    let (sk, pk) = control_key();
    let nonce = 7u64;
    let mut signed = data.to_vec();
    signed.extend_from_slice(&nonce.to_be_bytes());
    let sig = token::sign_message(&signed, sk);
    signed.extend_from_slice(&sig);

    if let Ok((msg, n)) = control::parse_request(&signed, pk) {
        assert_eq!(n, nonce);
        match control::build_request(&msg, nonce, sk) {
            Ok(again) => {
                let back = control::parse_request(&again, pk).map(|(m, _)| m);
                assert_eq!(back.as_ref(), Ok(&msg), "control request does not round-trip");
            }
            Err(e) => panic!("decoded control request {msg:?} does not re-encode: {e}"),
        }
    }
    if let Ok(resp) = control::parse_response(&signed, pk, nonce) {
        match control::build_response(&resp, nonce, sk) {
            Ok(again) => {
                let back = control::parse_response(&again, pk, nonce);
                assert_eq!(back.as_ref(), Ok(&resp), "control response does not round-trip");
            }
            Err(e) => panic!("decoded control response {resp:?} does not re-encode: {e}"),
        }
        assert!(control::parse_response(&signed, pk, nonce + 1).is_err());
    }
    let _ = control::parse_request(data, pk);
    if let (Some(a), Some(b)) = (data.get(..8), data.get(8..16)) {
        let (mut x, mut y) = ([0u8; 8], [0u8; 8]);
        x.copy_from_slice(a);
        y.copy_from_slice(b);
        let (last, n) = (u64::from_be_bytes(x), u64::from_be_bytes(y));
        if control::check_nonce(last, n).is_ok() {
            assert!(n > last && n - last <= control::NONCE_WINDOW);
        }
    }
}

/// `lss`: LSS backup messages (`init-*-msg`, `lss-msg`, `lss-conflict` parsed by the signer;
/// `init-*-res`, `lss-res` parsed by the broker). Both decoders see every input; a decoded value
/// re-encodes to bytes that decode to the same value, and canonical input re-encodes to itself.
pub fn lss(data: &[u8]) {
    if let Ok(m) = lss::Msg::decode(data) {
        let again = m.encode();
        assert_eq!(lss::Msg::decode(&again).as_ref(), Ok(&m), "LSS message does not round-trip");
        assert!(again.len() <= data.len(), "re-encoding is longer than the input");
        assert!(lss::Response::decode(data).is_err(), "bytes decode both as a message and a response");
    }
    if let Ok(r) = lss::Response::decode(data) {
        let again = r.encode();
        assert_eq!(lss::Response::decode(&again).as_ref(), Ok(&r), "LSS response does not round-trip");
        assert!(again.len() <= data.len(), "re-encoding is longer than the input");
    }
}
