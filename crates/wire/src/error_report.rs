//! The `{id}/error` report: a signer tells the broker that it refused a request, and why.
//!
//! `seq u16 BE | utf8 text`: the request's sequence number (from its serial header), so the
//! broker fails exactly that request, then the error text. Our extension: upstream sends the
//! text only (see docs/wire.md).

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
    ErrorReport { seq, text: String::from_utf8_lossy(text).chars().take(MAX_TEXT).collect() }
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
    }
}
