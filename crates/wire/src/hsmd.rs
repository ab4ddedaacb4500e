//! Core Lightning's hsmd wire: `len u32 BE | type u16 BE | body` on a stream socket.
//!
//! The broker parses only what it must answer or check itself; everything else is relayed opaquely.

use crate::{ClientContext, PUBKEY_LEN};

/// Largest hsmd message accepted (type + body). CLN's biggest are PSBTs for `sign_withdrawal`;
/// 16 MiB leaves room while bounding what a broken peer can make us allocate.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024 * 1024;

/// `hsmd_init`.
pub const HSMD_INIT: u16 = 11;
/// `hsmd_init_reply_v4`.
pub const HSMD_INIT_REPLY_V4: u16 = 114;
/// `hsmd_client_hsmfd`: a request for a new client connection.
pub const CLIENT_HSMFD: u16 = 9;
/// `hsmd_client_hsmfd_reply` (followed by the fd, passed with SCM_RIGHTS).
pub const CLIENT_HSMFD_REPLY: u16 = 109;
/// `hsmd_dev_memleak`.
pub const DEV_MEMLEAK: u16 = 33;
/// `hsmd_dev_memleak_reply`.
pub const DEV_MEMLEAK_REPLY: u16 = 133;
/// `hsmd_dev_preinit`: sent only with `--developer`, never answered.
pub const DEV_PREINIT: u16 = 99;
/// `hsmd_derive_secret`.
pub const DERIVE_SECRET: u16 = 27;
/// `hsmd_preapprove_invoice_check` (CLN's hsmd capability; VLS speaks 38).
pub const PREAPPROVE_INVOICE_CHECK: u16 = 51;
/// `hsmd_preapprove_keysend_check` (CLN's hsmd capability; VLS speaks 39).
pub const PREAPPROVE_KEYSEND_CHECK: u16 = 52;
/// `hsmd_preapprove_invoice`.
pub const PREAPPROVE_INVOICE: u16 = 38;
/// `hsmd_preapprove_keysend`.
pub const PREAPPROVE_KEYSEND: u16 = 39;

/// Errors from parsing hsmd messages.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The message is shorter than its fields require.
    #[error("hsmd message truncated: {what} needs {need} bytes, {have} left")]
    Truncated {
        /// Field being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The length prefix is beyond [`MAX_MESSAGE_LEN`] or zero.
    #[error("hsmd message length {0} out of range (2..={MAX_MESSAGE_LEN})")]
    BadLength(usize),
    /// The message has a different type than expected.
    #[error("expected hsmd message type {expected}, got {got}")]
    WrongType {
        /// Expected type.
        expected: u16,
        /// Actual type.
        got: u16,
    },
}

/// Checks a frame's 4-byte length prefix and returns the message length it announces.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, Error> {
    let len = u32::from_be_bytes(prefix) as usize;
    if !(2..=MAX_MESSAGE_LEN).contains(&len) {
        return Err(Error::BadLength(len));
    }
    Ok(len)
}

/// Prefixes a message (type + body) with its length, ready to write to the socket.
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + msg.len());
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// The 2-byte type of a message (type + body).
pub fn msg_type(msg: &[u8]) -> Result<u16, Error> {
    Reader::new(msg).u16("type")
}

/// A bounds-checked big-endian reader.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(Error::Truncated { what, need: n, have: self.buf.len() });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, Error> {
        let b = self.take(what, 2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, Error> {
        let b = self.take(what, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Error> {
        let b = self.take(what, N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }
}

fn expect_type(r: &mut Reader<'_>, expected: u16) -> Result<(), Error> {
    let got = r.u16("type")?;
    if got != expected {
        return Err(Error::WrongType { expected, got });
    }
    Ok(())
}

/// Parses `hsmd_client_hsmfd` (9): `id point | dbid u64 | capabilities u64`.
pub fn parse_client_hsmfd(msg: &[u8]) -> Result<ClientContext, Error> {
    let mut r = Reader::new(msg);
    expect_type(&mut r, CLIENT_HSMFD)?;
    let peer_id = r.array::<PUBKEY_LEN>("id")?;
    let dbid = r.u64("dbid")?;
    let permissions = r.u64("capabilities")?;
    Ok(ClientContext { peer_id, dbid, permissions })
}

/// `hsmd_client_hsmfd_reply` (109): an empty body; the fd follows out of band.
pub fn client_hsmfd_reply() -> Vec<u8> {
    CLIENT_HSMFD_REPLY.to_be_bytes().to_vec()
}

/// `hsmd_dev_memleak_reply` (133) with `leak = false`: the broker holds no signer memory to leak.
pub fn memleak_reply() -> Vec<u8> {
    let mut m = DEV_MEMLEAK_REPLY.to_be_bytes().to_vec();
    m.push(0);
    m
}

/// The chain hash carried by `hsmd_init` (11): `bip32_key_version(8) | chainparams(32) | …`.
pub fn parse_init_chain_hash(msg: &[u8]) -> Result<[u8; 32], Error> {
    let mut r = Reader::new(msg);
    expect_type(&mut r, HSMD_INIT)?;
    r.take("bip32_key_version", 8)?;
    r.array::<32>("chainparams")
}

/// The node id inside `hsmd_init_reply_v4` (114): `hsm_version u32 | num_caps u16 | caps u32* | node_id | …`.
pub fn parse_init_reply_node_id(msg: &[u8]) -> Result<[u8; PUBKEY_LEN], Error> {
    let mut r = Reader::new(msg);
    expect_type(&mut r, HSMD_INIT_REPLY_V4)?;
    r.take("hsm_version", 4)?;
    let n = r.u16("num_hsm_capabilities")? as usize;
    r.take("hsm_capabilities", n * 4)?;
    r.array::<PUBKEY_LEN>("node_id")
}

/// The capabilities listed in `hsmd_init_reply_v4` (114).
pub fn parse_init_reply_capabilities(msg: &[u8]) -> Result<Vec<u32>, Error> {
    let mut r = Reader::new(msg);
    expect_type(&mut r, HSMD_INIT_REPLY_V4)?;
    r.take("hsm_version", 4)?;
    let n = r.u16("num_hsm_capabilities")? as usize;
    let caps = r.take("hsm_capabilities", n * 4)?;
    Ok(caps.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hsmfd_roundtrip_and_truncation() {
        let mut m = CLIENT_HSMFD.to_be_bytes().to_vec();
        m.extend_from_slice(&[2u8; 33]);
        m.extend_from_slice(&7u64.to_be_bytes());
        m.extend_from_slice(&447u64.to_be_bytes());
        let ctx = parse_client_hsmfd(&m).unwrap();
        assert_eq!(ctx, ClientContext { peer_id: [2u8; 33], dbid: 7, permissions: 447 });
        for cut in 0..m.len() {
            assert!(parse_client_hsmfd(&m[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn frame_len_bounds() {
        assert!(frame_len([0, 0, 0, 1]).is_err());
        assert!(frame_len([0xff, 0xff, 0xff, 0xff]).is_err());
        assert_eq!(frame_len([0, 0, 0, 2]).unwrap(), 2);
        assert_eq!(frame(&[0, 9]), vec![0, 0, 0, 2, 0, 9]);
    }
}
