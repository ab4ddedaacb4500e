//! The frames that carry one hsmd message between broker and signer (MQTT payload of the `vls`
//! and `vls-res` topics), as upstream sphinx-key and `vls_protocol::msgs::SerialRequestHeader`:
//!
//! ```text
//! request: 0xAA55 | seq u16 | peer_id [33] | dbid u64 | len u32 | type u16 | body
//! reply:   0x5AA5 | seq u16 | len u32 | type u16 | body
//! ```
//! All big-endian; `len` counts `type | body`. Root requests carry 33 zero bytes and dbid 0.

use crate::PUBKEY_LEN;

/// Magic of a request frame.
pub const REQUEST_MAGIC: u16 = 0xAA55;
/// Magic of a reply frame.
pub const REPLY_MAGIC: u16 = 0x5AA5;
/// Bytes before the message in a request.
pub const REQUEST_HEADER_LEN: usize = 2 + 2 + PUBKEY_LEN + 8 + 4;
/// Bytes before the message in a reply.
pub const REPLY_HEADER_LEN: usize = 2 + 2 + 4;

/// Errors from parsing a serial frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Too short for the header.
    #[error("frame truncated: {0} bytes, header needs {1}")]
    Truncated(usize, usize),
    /// Wrong magic.
    #[error("bad magic {got:#06x}, expected {expected:#06x}")]
    BadMagic {
        /// Magic found.
        got: u16,
        /// Magic expected.
        expected: u16,
    },
    /// `len` disagrees with the bytes that follow the header.
    #[error("length field says {said}, frame carries {have}")]
    LengthMismatch {
        /// Length in the header.
        said: usize,
        /// Bytes present.
        have: usize,
    },
    /// The message inside is shorter than its 2-byte type.
    #[error("message shorter than its type field")]
    NoType,
}

/// A request for the signer: where it came from, its sequence number and the hsmd message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Sequence number, matched by the reply.
    pub seq: u16,
    /// Peer id of the client connection (zeros for root).
    pub peer_id: [u8; PUBKEY_LEN],
    /// Channel dbid of the client connection (0 for root).
    pub dbid: u64,
    /// The hsmd message: type + body.
    pub message: Vec<u8>,
}

/// A reply from the signer to the request with the same `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Sequence number of the request answered.
    pub seq: u16,
    /// The hsmd reply: type + body.
    pub message: Vec<u8>,
}

/// Serializes a request frame from borrowed parts (what [`Request::encode`] does, without
/// needing the message owned: the broker keeps its copy shared).
pub fn encode_request(seq: u16, peer_id: &[u8; PUBKEY_LEN], dbid: u64, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(REQUEST_HEADER_LEN + message.len());
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(peer_id);
    out.extend_from_slice(&dbid.to_be_bytes());
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

impl Request {
    /// Serializes the request frame.
    pub fn encode(&self) -> Vec<u8> {
        encode_request(self.seq, &self.peer_id, self.dbid, &self.message)
    }

    /// The sequence number in a request frame's header, even of a frame that does not parse
    /// (0 if it is too short to have one): what an error report for it is numbered with.
    pub fn seq_of(buf: &[u8]) -> u16 {
        match buf {
            [_, _, a, b, ..] => u16::from_be_bytes([*a, *b]),
            _ => 0,
        }
    }

    /// Parses a request frame.
    pub fn decode(buf: &[u8]) -> Result<Self, Error> {
        if buf.len() < REQUEST_HEADER_LEN {
            return Err(Error::Truncated(buf.len(), REQUEST_HEADER_LEN));
        }
        check_magic(buf, REQUEST_MAGIC)?;
        let seq = u16::from_be_bytes([buf[2], buf[3]]);
        let mut peer_id = [0u8; PUBKEY_LEN];
        peer_id.copy_from_slice(&buf[4..4 + PUBKEY_LEN]);
        let mut dbid = [0u8; 8];
        dbid.copy_from_slice(&buf[4 + PUBKEY_LEN..12 + PUBKEY_LEN]);
        let message = body(buf, REQUEST_HEADER_LEN)?;
        Ok(Request { seq, peer_id, dbid: u64::from_be_bytes(dbid), message })
    }
}

impl Reply {
    /// Serializes the reply frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(REPLY_HEADER_LEN + self.message.len());
        out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&(self.message.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.message);
        out
    }

    /// Parses a reply frame.
    pub fn decode(buf: &[u8]) -> Result<Self, Error> {
        let (seq, message) = Reply::peek(buf)?;
        Ok(Reply { seq, message: buf[message].to_vec() })
    }

    /// Checks a reply frame as [`Reply::decode`] does and says its seq and where its message
    /// is, without copying it (the broker hands the message on as a slice of the MQTT payload).
    pub fn peek(buf: &[u8]) -> Result<(u16, std::ops::Range<usize>), Error> {
        if buf.len() < REPLY_HEADER_LEN {
            return Err(Error::Truncated(buf.len(), REPLY_HEADER_LEN));
        }
        check_magic(buf, REPLY_MAGIC)?;
        let seq = u16::from_be_bytes([buf[2], buf[3]]);
        Ok((seq, body_range(buf, REPLY_HEADER_LEN)?))
    }
}

fn check_magic(buf: &[u8], expected: u16) -> Result<(), Error> {
    let got = u16::from_be_bytes([buf[0], buf[1]]);
    if got != expected {
        return Err(Error::BadMagic { got, expected });
    }
    Ok(())
}

/// The `len u32 | message` at the end of a header of `header_len` bytes.
fn body(buf: &[u8], header_len: usize) -> Result<Vec<u8>, Error> {
    Ok(buf[body_range(buf, header_len)?].to_vec())
}

/// Where the message after a header of `header_len` bytes (ending in `len u32`) is, checked.
fn body_range(buf: &[u8], header_len: usize) -> Result<std::ops::Range<usize>, Error> {
    let l = &buf[header_len - 4..header_len];
    let said = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
    let have = buf.len() - header_len;
    if said != have {
        return Err(Error::LengthMismatch { said, have });
    }
    if said < 2 {
        return Err(Error::NoType);
    }
    Ok(header_len..buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_every_truncation_fails() {
        let r = Request { seq: 0xBEEF, peer_id: [3u8; 33], dbid: 42, message: vec![0, 28, 1, 2, 3] };
        let enc = r.encode();
        assert_eq!(&enc[..2], &[0xAA, 0x55]);
        assert_eq!(Request::decode(&enc).unwrap(), r);
        for cut in 0..enc.len() {
            assert!(Request::decode(&enc[..cut]).is_err());
        }
        assert!(Reply::decode(&enc).is_err(), "a request is not a reply");
        // The header's seq is read even where the frame does not parse; 0 without one.
        assert_eq!(Request::seq_of(&enc[..4]), 0xBEEF);
        assert_eq!(Request::seq_of(&enc[..3]), 0);
        assert_eq!(Request::seq_of(&[]), 0);
    }

    #[test]
    fn reply_roundtrip() {
        let r = Reply { seq: 7, message: vec![0, 128, 1] };
        let enc = r.encode();
        assert_eq!(&enc[..2], &[0x5A, 0xA5]);
        assert_eq!(Reply::decode(&enc).unwrap(), r);
        assert_eq!(Reply::peek(&enc).unwrap(), (7, REPLY_HEADER_LEN..enc.len()));
        let mut long = enc.clone();
        long.push(0);
        assert!(matches!(Reply::decode(&long), Err(Error::LengthMismatch { .. })));
        assert!(matches!(Reply::peek(&long), Err(Error::LengthMismatch { .. })));
        let r = Request { seq: 9, peer_id: [5; 33], dbid: 3, message: vec![0, 28] };
        assert_eq!(encode_request(9, &[5; 33], 3, &[0, 28]), r.encode());
    }
}
