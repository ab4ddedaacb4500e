//! The `{id}/error` report: a signer tells the broker that it refused a request, and why.
//!
//! `seq u16 BE | utf8 text`: the request's sequence number (from its serial header), so the
//! broker fails exactly that request, then the error text. Our extension: upstream sends the
//! text only (see docs/wire.md). A signer says which it sends in its `{id}/hello` payload: a
//! feature list with [`SEQ_ERRORS`] means `seq | text`, anything else (upstream's empty hello)
//! means text only.

/// The `hello` feature of a signer whose reports carry the sequence number.
pub const SEQ_ERRORS: &[u8] = b"error-seq";

/// The `{id}/hello` payload this project's signer sends: space-separated features.
pub const HELLO: &[u8] = SEQ_ERRORS;

/// Whether a `hello` payload announces [`SEQ_ERRORS`].
pub fn hello_has_seq_errors(hello: &[u8]) -> bool {
    hello.split(|b| *b == b' ').any(|f| f == SEQ_ERRORS)
}

/// Longest text [`decode`] keeps, in characters; the rest is cut.
pub const MAX_TEXT: usize = 2000;

/// A decoded `{id}/error` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReport {
    /// The request it refers to; `None` if the payload is shorter than the 2-byte sequence
    /// number (then `text` is the whole payload).
    pub seq: Option<u16>,
    /// The signer's text, invalid UTF-8 replaced, at most [`MAX_TEXT`] characters.
    pub text: String,
}

/// Builds the payload for the request `seq` refused with `text`.
pub fn encode(seq: u16, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// Decodes any payload (never fails: a report is shown to the operator even when malformed).
pub fn decode(payload: &[u8]) -> ErrorReport {
    let (seq, text) = match payload {
        [a, b, rest @ ..] => (Some(u16::from_be_bytes([*a, *b])), rest),
        _ => (None, payload),
    };
    ErrorReport { seq, text: text_of(text) }
}

/// Decodes the report of a signer without [`SEQ_ERRORS`] (upstream's): all text, no `seq`.
pub fn decode_text(payload: &[u8]) -> ErrorReport {
    ErrorReport { seq: None, text: text_of(payload) }
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().take(MAX_TEXT).collect()
}

/// What kind of failure a signer's error text describes, by the words of `sphinx_signer::Error`'s
/// Display (shared by the device's metrics and the broker's, so both count refusals alike):
/// `(reason, policy)`. `reason` is `policy` (a VLS policy refusal, `policy` then names it),
/// `refused` (another VLS refusal), or the kind of failure (`decode`, `persist`, …, `other`).
pub fn classify(text: &str) -> (&'static str, Option<String>) {
    let policy = if text.starts_with("VLS refused") { policy_name(text) } else { None };
    let reason = if policy.is_some() {
        "policy"
    } else if text.starts_with("VLS refused") {
        "refused"
    } else if text.starts_with("VLS failed") {
        "vls_panic"
    } else if text.starts_with("cannot decode") {
        "decode"
    } else if text.contains("before hsmd_init") {
        "not_initialized"
    } else if text.contains("is answered by the broker") {
        "not_for_signer"
    } else if text.contains("has no type") {
        "no_type"
    } else if text.starts_with("persisting signer state failed") {
        "persist"
    } else if text.starts_with("signer state unavailable") {
        "unavailable"
    } else if text.starts_with("bad request frame") {
        "bad_frame"
    } else {
        "other"
    };
    (reason, policy)
}

/// What refused a VLS policy failure: the `policy-…` tag if the text has one, else the last
/// check named in VLS's `policy failure: check: check: message` chain. At most 64 characters of
/// `[a-z0-9_-]`, so it is safe as a metrics label.
pub fn policy_name(text: &str) -> Option<String> {
    let ident = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    if let Some(i) = text.find("policy-") {
        let tag = &text[i..];
        let end = tag.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')).unwrap_or(tag.len());
        let tag = tag[..end].trim_end_matches('-');
        if tag.len() > "policy-".len() && ident(tag) {
            return Some(tag.to_string());
        }
    }
    let (_, chain) = text.split_once("policy failure: ")?;
    chain.split(": ").take_while(|s| ident(s)).last().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_any_payload_decodes() {
        assert_eq!(encode(7, "policy failure: x"), b"\x00\x07policy failure: x");
        let r = decode(&encode(7, "policy failure: x"));
        assert_eq!((r.seq, r.text.as_str()), (Some(7), "policy failure: x"));
        assert_eq!(decode(b"x"), ErrorReport { seq: None, text: "x".into() });
        assert_eq!(decode(b""), ErrorReport { seq: None, text: String::new() });
        assert_eq!(decode(b"\x00\x01").text, "");
        assert_eq!(decode(b"\x00\x01\xff\xfe").text, "\u{fffd}\u{fffd}");
        let long = vec![b'a'; 10_000];
        assert_eq!(decode(&long).text.len(), MAX_TEXT);
        assert_eq!(decode_text(&long).text.len(), MAX_TEXT);
    }

    #[test]
    fn hello_says_which_reports_a_signer_sends() {
        assert!(hello_has_seq_errors(HELLO));
        assert!(hello_has_seq_errors(b"future-thing error-seq"));
        assert!(!hello_has_seq_errors(b""), "upstream's hello is empty");
        assert!(!hello_has_seq_errors(b"error-seqs"));
        let r = decode_text(b"ab policy failure");
        assert_eq!((r.seq, r.text.as_str()), (None, "ab policy failure"));
    }
}
