//! LSS backup messages between broker and signer, byte-compatible with upstream sphinx-rs
//! `lss-connector` (`msgs.rs`, hand-written msgpack via `rmp-utils`).
//!
//! The broker sends [`Msg`] (topics `init-1-msg`, `init-2-msg`, `lss-msg`, `lss-conflict`), the
//! signer answers with [`Response`] (`init-1-res`, `init-2-res`, `lss-res`,
//! `lss-conflict-res`). Shapes (docs/wire.md, "LSS"):
//!
//! ```text
//! Msg::Init          {"Init": {"server_pubkey": bin33}}
//! Msg::Created       {"Created": {"server_hmac": bin32|nil, "muts": [[key, [version, bin]], …]}}
//! Msg::Stored        {"Stored":  {"server_hmac": bin32|nil, "muts": […]}}
//! Msg::PutConflict   {"PutConflict"            (a one-entry map with its key and no value, as upstream)
//! Response::Init     {"Init": {"client_id": bin33, "auth_token": bin32, "nonce": bin32|nil}}
//! Response::Created  {"Created": {"client_hmac": bin32, "muts": […]}}
//! Response::VlsMuts  {"VlsMuts": {"client_hmac": bin32, "muts": […]}}
//! Response::PutConflictConfirmed  {"PutConflictConfirmed"
//! ```
//!
//! Encoding uses msgpack's shortest forms (as `rmp::encode`); decoding accepts any width of a
//! length or integer (as `rmp::decode`), checks field names and order, and refuses trailing
//! bytes. Decoding never panics and allocates at most what the input can fill.
//!
//! The HMACs (`shared_hmac` and friends) are VLS's `compute_shared_hmac`: the LSS server and the
//! signer compute them with the ECDH secret of the signer's persistence key and the server key;
//! the broker only relays them.

use bitcoin::hashes::{sha256, Hash, HashEngine, Hmac, HmacEngine};

/// Largest message accepted (the MQTT server's packet limit is 16 MiB; LSS state is far smaller).
pub const MAX_LSS_MSG_LEN: usize = 16 * 1024 * 1024;
/// Length of the server's and the client's public keys.
pub const PUBKEY_LEN: usize = 33;
/// Length of an HMAC, an auth token and a nonce.
pub const HASH_LEN: usize = 32;

/// One key's new version and value, as VLS's `Mutations` and LSS's `KeyValue`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mutation {
    /// KVV key (e.g. `node/state/02ab…`).
    pub key: String,
    /// Version: 0 for a new key, then one more per write (LSS refuses any other).
    pub version: u64,
    /// Opaque value (VLS's JSON); empty means deleted.
    pub value: Vec<u8>,
}

impl Mutation {
    /// A mutation.
    pub fn new(key: impl Into<String>, version: u64, value: Vec<u8>) -> Self {
        Mutation { key: key.into(), version, value }
    }
}

/// Broker → signer (`init-1-msg` carries `Init`; `init-2-msg` `Created`; `lss-msg` `Stored`;
/// `lss-conflict` `PutConflict`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// The LSS server's public key (step 1 of the init dance).
    Init(Init),
    /// The state LSS holds for this client, with the server's HMAC over it and the signer's nonce
    /// (step 2); or, after a `Put` of init-2's mutations, an empty acknowledgement.
    Created(BrokerMutations),
    /// LSS stored the signer's mutations: `server_hmac` is the server's proof (per request).
    Stored(BrokerMutations),
    /// LSS refused the `Put`: another writer got there first (the signer's state is stale).
    PutConflict,
}

/// The LSS server's public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Init {
    /// Compressed secp256k1 key of the LSS server.
    pub server_pubkey: [u8; PUBKEY_LEN],
}

/// Mutations from LSS with the server's HMAC.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BrokerMutations {
    /// Server HMAC (absent in an empty acknowledgement).
    pub server_hmac: Option<[u8; HASH_LEN]>,
    /// The mutations (all of the client's state in init-2; empty in acknowledgements).
    pub muts: Vec<Mutation>,
}

/// Signer → broker (`init-1-res` carries `Init`; `init-2-res` `Created`; `lss-res` `VlsMuts`;
/// `lss-conflict-res` `PutConflictConfirmed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The signer's LSS identity and the nonce for the `Get` (step 1 answer).
    Init(InitResponse),
    /// Mutations the signer made while building its node from LSS's state (step 2 answer).
    Created(SignerMutations),
    /// Mutations of one signed request, to be `Put` before the reply is released.
    VlsMuts(SignerMutations),
    /// The signer saw the conflict and drops its staged state.
    PutConflictConfirmed,
}

/// The signer's identity towards LSS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitResponse {
    /// The signer's persistence public key (LSS client id).
    pub client_id: [u8; PUBKEY_LEN],
    /// sha256 of the ECDH secret of the client and server keys (LSS authentication).
    pub auth_token: [u8; HASH_LEN],
    /// Nonce for the `Get` HMAC; upstream sends none on a reconnect when it needs no state.
    pub nonce: Option<[u8; HASH_LEN]>,
}

/// Mutations from the signer with its HMAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerMutations {
    /// Client HMAC (`0x01` variant), checked by the LSS server on `Put`.
    pub client_hmac: [u8; HASH_LEN],
    /// The mutations, sorted by key (LSS refuses unsorted puts).
    pub muts: Vec<Mutation>,
}

/// Why an LSS message did not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The input is longer than [`MAX_LSS_MSG_LEN`].
    #[error("LSS message of {0} bytes is over the limit")]
    TooLong(usize),
    /// The input ended inside a value.
    #[error("LSS message truncated")]
    Truncated,
    /// A msgpack value of another type than the format has at this place.
    #[error("LSS message: expected {expected} at byte {at}")]
    Unexpected {
        /// What the format has there.
        expected: &'static str,
        /// Offset of the value.
        at: usize,
    },
    /// A variant or field name the format does not have there.
    #[error("LSS message: unexpected name {0:?}")]
    Name(String),
    /// A fixed-length field with another length.
    #[error("LSS message: field {field} has {len} bytes, not {expected}")]
    Length {
        /// Field name.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The length it must have.
        expected: usize,
    },
    /// A key that is not UTF-8.
    #[error("LSS message: key is not UTF-8")]
    Utf8,
    /// Bytes after the message.
    #[error("LSS message: {0} trailing bytes")]
    Trailing(usize),
}

// ---- msgpack writer (shortest forms, as rmp::encode) ------------------------------------------

struct Writer(Vec<u8>);

impl Writer {
    fn len_marker(&mut self, len: usize, fix: u8, fix_max: usize, m16: u8, m32: u8) {
        if len <= fix_max {
            self.0.push(fix | len as u8);
        } else if len <= u16::MAX as usize {
            self.0.push(m16);
            self.0.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.0.push(m32);
            self.0.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
    fn map(&mut self, len: usize) {
        self.len_marker(len, 0x80, 15, 0xde, 0xdf);
    }
    fn array(&mut self, len: usize) {
        self.len_marker(len, 0x90, 15, 0xdc, 0xdd);
    }
    fn str(&mut self, s: &str) {
        let len = s.len();
        if len <= 31 {
            self.0.push(0xa0 | len as u8);
        } else if len <= u8::MAX as usize {
            self.0.extend_from_slice(&[0xd9, len as u8]);
        } else if len <= u16::MAX as usize {
            self.0.push(0xda);
            self.0.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.0.push(0xdb);
            self.0.extend_from_slice(&(len as u32).to_be_bytes());
        }
        self.0.extend_from_slice(s.as_bytes());
    }
    fn bin(&mut self, b: &[u8]) {
        let len = b.len();
        if len <= u8::MAX as usize {
            self.0.extend_from_slice(&[0xc4, len as u8]);
        } else if len <= u16::MAX as usize {
            self.0.push(0xc5);
            self.0.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.0.push(0xc6);
            self.0.extend_from_slice(&(len as u32).to_be_bytes());
        }
        self.0.extend_from_slice(b);
    }
    fn opt_bin(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => self.bin(b),
            None => self.0.push(0xc0),
        }
    }
    fn uint(&mut self, v: u64) {
        if v < 0x80 {
            self.0.push(v as u8);
        } else if v <= u8::MAX as u64 {
            self.0.extend_from_slice(&[0xcc, v as u8]);
        } else if v <= u16::MAX as u64 {
            self.0.push(0xcd);
            self.0.extend_from_slice(&(v as u16).to_be_bytes());
        } else if v <= u32::MAX as u64 {
            self.0.push(0xce);
            self.0.extend_from_slice(&(v as u32).to_be_bytes());
        } else {
            self.0.push(0xcf);
            self.0.extend_from_slice(&v.to_be_bytes());
        }
    }
    fn muts(&mut self, muts: &[Mutation]) {
        self.str("muts");
        self.array(muts.len());
        for m in muts {
            // (key, (version, value)): a 2-array holding the key and a 2-array.
            self.array(2);
            self.str(&m.key);
            self.array(2);
            self.uint(m.version);
            self.bin(&m.value);
        }
    }
    /// `{variant: {hmac_name: bin|nil, "muts": […]}}`
    fn with_muts(&mut self, variant: &str, hmac_name: &str, hmac: Option<&[u8]>, muts: &[Mutation]) {
        self.map(1);
        self.str(variant);
        self.map(2);
        self.str(hmac_name);
        self.opt_bin(hmac);
        self.muts(muts);
    }
    /// Upstream's unit variants: a one-entry map holding only the key (no value follows).
    fn unit(&mut self, variant: &str) {
        self.map(1);
        self.str(variant);
    }
}

// ---- msgpack reader (any width, as rmp::decode) -----------------------------------------------

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Result<Self, Error> {
        if buf.len() > MAX_LSS_MSG_LEN {
            return Err(Error::TooLong(buf.len()));
        }
        Ok(Reader { buf, pos: 0 })
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).ok_or(Error::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(Error::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn byte(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn peek(&self) -> Result<u8, Error> {
        self.buf.get(self.pos).copied().ok_or(Error::Truncated)
    }
    fn be(&mut self, n: usize) -> Result<u64, Error> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, b| (acc << 8) | *b as u64))
    }
    fn unexpected(&self, expected: &'static str, at: usize) -> Error {
        Error::Unexpected { expected, at }
    }
    fn len_of(&mut self, expected: &'static str, fix: (u8, u8), m16: u8, m32: u8) -> Result<usize, Error> {
        let at = self.pos;
        let m = self.byte()?;
        let len = if m & fix.1 == fix.0 {
            (m & !fix.1) as u64
        } else if m == m16 {
            self.be(2)?
        } else if m == m32 {
            self.be(4)?
        } else {
            return Err(self.unexpected(expected, at));
        };
        Ok(len as usize)
    }
    fn map(&mut self) -> Result<usize, Error> {
        self.len_of("a map", (0x80, 0xf0), 0xde, 0xdf)
    }
    fn array(&mut self) -> Result<usize, Error> {
        self.len_of("an array", (0x90, 0xf0), 0xdc, 0xdd)
    }
    fn expect_map(&mut self, len: usize) -> Result<(), Error> {
        let at = self.pos;
        if self.map()? != len {
            return Err(self.unexpected(if len == 1 { "a one-entry map" } else { "a map of another size" }, at));
        }
        Ok(())
    }
    fn expect_array(&mut self, len: usize) -> Result<(), Error> {
        let at = self.pos;
        if self.array()? != len {
            return Err(self.unexpected("a 2-array", at));
        }
        Ok(())
    }
    fn str(&mut self) -> Result<&'a str, Error> {
        let at = self.pos;
        let m = self.byte()?;
        let len = match m {
            0xa0..=0xbf => (m & 0x1f) as u64,
            0xd9 => self.be(1)?,
            0xda => self.be(2)?,
            0xdb => self.be(4)?,
            _ => return Err(self.unexpected("a string", at)),
        };
        std::str::from_utf8(self.take(len as usize)?).map_err(|_| Error::Utf8)
    }
    fn name(&mut self, expected: &str) -> Result<(), Error> {
        let s = self.str()?;
        if s != expected {
            return Err(Error::Name(s.to_string()));
        }
        Ok(())
    }
    fn bin(&mut self) -> Result<&'a [u8], Error> {
        let at = self.pos;
        let len = match self.byte()? {
            0xc4 => self.be(1)?,
            0xc5 => self.be(2)?,
            0xc6 => self.be(4)?,
            _ => return Err(self.unexpected("binary", at)),
        };
        self.take(len as usize)
    }
    fn fixed<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Error> {
        let b = self.bin()?;
        b.try_into().map_err(|_| Error::Length { field, len: b.len(), expected: N })
    }
    fn opt_fixed<const N: usize>(&mut self, field: &'static str) -> Result<Option<[u8; N]>, Error> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            return Ok(None);
        }
        self.fixed(field).map(Some)
    }
    /// A non-negative integer of any msgpack width (as `rmp::decode::read_int::<u64>`).
    fn uint(&mut self) -> Result<u64, Error> {
        let at = self.pos;
        let m = self.byte()?;
        let v: i128 = match m {
            0x00..=0x7f => m as i128,
            0xe0..=0xff => (m as i8) as i128,
            0xcc => self.be(1)? as i128,
            0xcd => self.be(2)? as i128,
            0xce => self.be(4)? as i128,
            0xcf => self.be(8)? as i128,
            0xd0 => self.be(1)? as u8 as i8 as i128,
            0xd1 => self.be(2)? as u16 as i16 as i128,
            0xd2 => self.be(4)? as u32 as i32 as i128,
            0xd3 => self.be(8)? as i64 as i128,
            _ => return Err(self.unexpected("an integer", at)),
        };
        u64::try_from(v).map_err(|_| self.unexpected("a non-negative integer", at))
    }
    fn muts(&mut self) -> Result<Vec<Mutation>, Error> {
        self.name("muts")?;
        let n = self.array()?;
        // Each entry takes at least 6 bytes: never reserve more than the input can hold.
        let mut muts = Vec::with_capacity(n.min(self.buf.len().saturating_sub(self.pos) / 6));
        for _ in 0..n {
            self.expect_array(2)?;
            let key = self.str()?.to_string();
            self.expect_array(2)?;
            let version = self.uint()?;
            let value = self.bin()?.to_vec();
            muts.push(Mutation { key, version, value });
        }
        Ok(muts)
    }
    fn variant(&mut self) -> Result<&'a str, Error> {
        self.expect_map(1)?;
        self.str()
    }
    fn end(&self) -> Result<(), Error> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(Error::Trailing(n)),
        }
    }
}

impl Msg {
    /// Encodes as upstream does.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        match self {
            Msg::Init(i) => {
                w.map(1);
                w.str("Init");
                w.map(1);
                w.str("server_pubkey");
                w.bin(&i.server_pubkey);
            }
            Msg::Created(b) => w.with_muts("Created", "server_hmac", b.server_hmac.as_ref().map(|h| &h[..]), &b.muts),
            Msg::Stored(b) => w.with_muts("Stored", "server_hmac", b.server_hmac.as_ref().map(|h| &h[..]), &b.muts),
            Msg::PutConflict => w.unit("PutConflict"),
        }
        w.0
    }

    /// Decodes untrusted bytes.
    pub fn decode(input: &[u8]) -> Result<Msg, Error> {
        let mut r = Reader::new(input)?;
        let msg = match r.variant()? {
            "Init" => {
                r.expect_map(1)?;
                r.name("server_pubkey")?;
                Msg::Init(Init { server_pubkey: r.fixed("server_pubkey")? })
            }
            v @ ("Created" | "Stored") => {
                let created = v == "Created";
                r.expect_map(2)?;
                r.name("server_hmac")?;
                let server_hmac = r.opt_fixed("server_hmac")?;
                let muts = r.muts()?;
                let b = BrokerMutations { server_hmac, muts };
                if created {
                    Msg::Created(b)
                } else {
                    Msg::Stored(b)
                }
            }
            "PutConflict" => Msg::PutConflict,
            other => return Err(Error::Name(other.to_string())),
        };
        r.end()?;
        Ok(msg)
    }
}

impl Response {
    /// Encodes as upstream does.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        match self {
            Response::Init(i) => {
                w.map(1);
                w.str("Init");
                w.map(3);
                w.str("client_id");
                w.bin(&i.client_id);
                w.str("auth_token");
                w.bin(&i.auth_token);
                w.str("nonce");
                w.opt_bin(i.nonce.as_ref().map(|n| &n[..]));
            }
            Response::Created(s) => w.with_muts("Created", "client_hmac", Some(&s.client_hmac), &s.muts),
            Response::VlsMuts(s) => w.with_muts("VlsMuts", "client_hmac", Some(&s.client_hmac), &s.muts),
            Response::PutConflictConfirmed => w.unit("PutConflictConfirmed"),
        }
        w.0
    }

    /// Decodes untrusted bytes.
    pub fn decode(input: &[u8]) -> Result<Response, Error> {
        let mut r = Reader::new(input)?;
        let res = match r.variant()? {
            "Init" => {
                r.expect_map(3)?;
                r.name("client_id")?;
                let client_id = r.fixed("client_id")?;
                r.name("auth_token")?;
                let auth_token = r.fixed("auth_token")?;
                r.name("nonce")?;
                let nonce = r.opt_fixed("nonce")?;
                Response::Init(InitResponse { client_id, auth_token, nonce })
            }
            v @ ("Created" | "VlsMuts") => {
                let created = v == "Created";
                r.expect_map(2)?;
                r.name("client_hmac")?;
                let client_hmac = r.fixed("client_hmac")?;
                let muts = r.muts()?;
                let s = SignerMutations { client_hmac, muts };
                if created {
                    Response::Created(s)
                } else {
                    Response::VlsMuts(s)
                }
            }
            "PutConflictConfirmed" => Response::PutConflictConfirmed,
            other => return Err(Error::Name(other.to_string())),
        };
        r.end()?;
        Ok(res)
    }
}

// ---- HMACs and auth token (VLS `compute_shared_hmac`, LSS `PrivAuth::auth_token`) -------------

/// HMAC-SHA256 keyed with `secret` over `secret | nonce | (key | version u64 BE | value)*`.
pub fn shared_hmac(secret: &[u8; HASH_LEN], nonce: &[u8], muts: &[Mutation]) -> [u8; HASH_LEN] {
    let mut e = HmacEngine::<sha256::Hash>::new(secret);
    e.input(secret);
    e.input(nonce);
    for m in muts {
        e.input(m.key.as_bytes());
        e.input(&m.version.to_be_bytes());
        e.input(&m.value);
    }
    Hmac::<sha256::Hash>::from_engine(e).to_byte_array()
}

/// The signer's HMAC on a `Put` (nonce `0x01`): proves the signer made these mutations.
pub fn client_hmac(secret: &[u8; HASH_LEN], muts: &[Mutation]) -> [u8; HASH_LEN] {
    shared_hmac(secret, &[0x01], muts)
}

/// The server's HMAC on a `Put` reply (nonce `0x02`): proves LSS stored these mutations.
pub fn server_hmac(secret: &[u8; HASH_LEN], muts: &[Mutation]) -> [u8; HASH_LEN] {
    shared_hmac(secret, &[0x02], muts)
}

// ---- Per-value tags (ours: LSS's "the client should append an HMAC to each value") -----------

/// Length of the tag appended to each value stored in LSS.
pub const VALUE_TAG_LEN: usize = HASH_LEN;

/// The tag of one stored value: HMAC-SHA256 keyed with `value_key` (a secret only the signer's
/// seed gives, never the ECDH secret the LSS server shares) over `key | version u64 BE | value`.
/// The shared HMACs above only prove the data crossed the broker unchanged: the server computes
/// them over whatever it holds, so a value changed in its store passes them; this tag does not.
pub fn value_tag(value_key: &[u8; HASH_LEN], key: &str, version: u64, value: &[u8]) -> [u8; VALUE_TAG_LEN] {
    let mut e = HmacEngine::<sha256::Hash>::new(value_key);
    e.input(key.as_bytes());
    e.input(&version.to_be_bytes());
    e.input(value);
    Hmac::<sha256::Hash>::from_engine(e).to_byte_array()
}

/// The mutation as stored in LSS: its value followed by its [`value_tag`].
pub fn seal_value(value_key: &[u8; HASH_LEN], m: Mutation) -> Mutation {
    let tag = value_tag(value_key, &m.key, m.version, &m.value);
    let Mutation { key, version, mut value } = m;
    value.extend_from_slice(&tag);
    Mutation { key, version, value }
}

/// A value read from LSS with its tag checked and removed; `Err` names the key whose tag is
/// missing or wrong (changed in LSS's store, moved to another key or version, or not written by
/// this seed's signer).
pub fn open_value(value_key: &[u8; HASH_LEN], m: Mutation) -> Result<Mutation, String> {
    let Mutation { key, version, mut value } = m;
    if value.len() < VALUE_TAG_LEN {
        return Err(format!("LSS value of {key} (version {version}) has no tag ({} bytes)", value.len()));
    }
    let tag = value.split_off(value.len() - VALUE_TAG_LEN);
    let want = value_tag(value_key, &key, version, &value);
    // Not secret-dependent timing that matters here (the tag is public once stored), but cheap.
    if tag.iter().zip(want.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0 {
        return Err(format!(
            "LSS value of {key} (version {version}) fails its tag: changed in LSS's store or not written by this signer"
        ));
    }
    Ok(Mutation { key, version, value })
}

/// The LSS auth token: sha256 of the ECDH secret (what the broker may hold; it cannot make HMACs).
pub fn auth_token(secret: &[u8; HASH_LEN]) -> [u8; HASH_LEN] {
    sha256::Hash::hash(secret).to_byte_array()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).expect("hex")
    }

    fn sample_muts() -> Vec<Mutation> {
        vec![Mutation::new("aaaa", 15, vec![0xff; 3]), Mutation::new("node/x", 300, vec![])]
    }

    // Golden bytes, written from upstream's serializers (lss-connector msgs.rs on rmp-utils):
    // map_len(1) | str(variant) | map_len(n) | (str(field) | value)*; muts are
    // array(n) of [str key, [uint version, bin value]].
    #[test]
    fn golden_msg_init() {
        let m = Msg::Init(Init { server_pubkey: [0x02; 33] });
        let want = [h("81 a4 496e6974 81 ad 7365727665725f7075626b6579 c4 21"), vec![0x02; 33]].concat();
        assert_eq!(m.encode(), want);
        assert_eq!(Msg::decode(&want), Ok(m));
    }

    #[test]
    fn golden_msg_created_and_stored() {
        let b = BrokerMutations { server_hmac: Some([0xab; 32]), muts: sample_muts() };
        let body = |variant: &str| {
            [
                h("81"),
                Writer::str_bytes(variant),
                h("82 ab 7365727665725f686d6163 c4 20"),
                vec![0xab; 32],
                h("a4 6d757473 92"),
                h("92 a4 61616161 92 0f c4 03 ffffff"),
                h("92 a6 6e6f64652f78 92 cd 012c c4 00"),
            ]
            .concat()
        };
        assert_eq!(Msg::Created(b.clone()).encode(), body("Created"));
        assert_eq!(Msg::Stored(b.clone()).encode(), body("Stored"));
        assert_eq!(Msg::decode(&body("Stored")), Ok(Msg::Stored(b)));
        // An empty acknowledgement: nil HMAC, no mutations.
        let ack = h("81 a7 43726561746564 82 ab 7365727665725f686d6163 c0 a4 6d757473 90");
        assert_eq!(Msg::Created(BrokerMutations::default()).encode(), ack);
        assert_eq!(Msg::decode(&ack), Ok(Msg::Created(BrokerMutations::default())));
    }

    #[test]
    fn golden_unit_variants_have_no_value() {
        assert_eq!(Msg::PutConflict.encode(), h("81 ab 507574436f6e666c696374"));
        assert_eq!(Response::PutConflictConfirmed.encode(), h("81 b4 507574436f6e666c696374436f6e6669726d6564"));
        assert_eq!(Msg::decode(&h("81 ab 507574436f6e666c696374")), Ok(Msg::PutConflict));
    }

    #[test]
    fn golden_response_init() {
        let r = Response::Init(InitResponse { client_id: [0x03; 33], auth_token: [0x11; 32], nonce: Some([0x22; 32]) });
        let want = [
            h("81 a4 496e6974 83 a9 636c69656e745f6964 c4 21"),
            vec![0x03; 33],
            h("aa 617574685f746f6b656e c4 20"),
            vec![0x11; 32],
            h("a5 6e6f6e6365 c4 20"),
            vec![0x22; 32],
        ]
        .concat();
        assert_eq!(r.encode(), want);
        assert_eq!(Response::decode(&want), Ok(r));
        let none = Response::Init(InitResponse { client_id: [0x03; 33], auth_token: [0x11; 32], nonce: None });
        let enc = none.encode();
        assert_eq!(enc[enc.len() - 7..], h("a5 6e6f6e6365 c0")[..]);
        assert_eq!(Response::decode(&enc), Ok(none));
    }

    #[test]
    fn golden_response_muts() {
        let s = SignerMutations { client_hmac: [0x44; 32], muts: vec![Mutation::new("k", 0, vec![1])] };
        let want = [
            h("81 a7 566c734d757473 82 ab 636c69656e745f686d6163 c4 20"),
            vec![0x44; 32],
            h("a4 6d757473 91 92 a1 6b 92 00 c4 01 01"),
        ]
        .concat();
        assert_eq!(Response::VlsMuts(s.clone()).encode(), want);
        assert_eq!(Response::decode(&want), Ok(Response::VlsMuts(s.clone())));
        let created = Response::Created(s).encode();
        assert_eq!(created[..10], h("81 a7 43726561746564 82")[..]);
    }

    #[test]
    fn long_strings_values_and_versions_use_wider_forms() {
        let key = "k".repeat(40);
        let m = vec![Mutation::new(key.clone(), u64::MAX, vec![7; 300])];
        let b = Msg::Stored(BrokerMutations { server_hmac: None, muts: m.clone() }).encode();
        let at = b.windows(2).position(|w| w == [0xd9, 40]).expect("str8 key");
        assert_eq!(&b[at + 2..at + 42], key.as_bytes());
        assert_eq!(&b[at + 43..at + 52], &h("cf ffffffffffffffff")[..]);
        assert_eq!(&b[at + 52..at + 55], &h("c5 012c")[..]);
        assert_eq!(Msg::decode(&b), Ok(Msg::Stored(BrokerMutations { server_hmac: None, muts: m })));
    }

    #[test]
    fn decoder_accepts_wide_forms_and_refuses_bad_input() {
        // map16 / str8 / uint64 instead of the shortest forms decode to the same value.
        let wide = [h("de 0001 d9 04 496e6974 de 0001 ad 7365727665725f7075626b6579 c4 21"), vec![2; 33]].concat();
        assert_eq!(Msg::decode(&wide), Ok(Msg::Init(Init { server_pubkey: [2; 33] })));
        let good = Msg::Init(Init { server_pubkey: [2; 33] }).encode();
        for cut in 0..good.len() {
            assert!(Msg::decode(&good[..cut]).is_err(), "truncated at {cut}");
        }
        assert_eq!(Msg::decode(&[good.clone(), vec![0]].concat()), Err(Error::Trailing(1)));
        let short = [h("81 a4 496e6974 81 ad 7365727665725f7075626b6579 c4 20"), vec![2; 32]].concat();
        assert!(matches!(Msg::decode(&short), Err(Error::Length { field: "server_pubkey", .. })));
        assert!(matches!(Msg::decode(&h("81 a3 466f6f")), Err(Error::Name(_))));
        // A response is not a message (VlsMuts is not a Msg variant) and vice versa.
        let r = Response::VlsMuts(SignerMutations { client_hmac: [0; 32], muts: vec![] }).encode();
        assert!(Msg::decode(&r).is_err());
        assert!(Response::decode(&Msg::PutConflict.encode()).is_err());
        // Negative versions and huge counts do not decode (and do not allocate).
        let neg = h("81 a6 53746f726564 82 ab 7365727665725f686d6163 c0 a4 6d757473 91 92 a1 6b 92 ff c4 00");
        assert!(Msg::decode(&neg).is_err());
        let huge = h("81 a6 53746f726564 82 ab 7365727665725f686d6163 c0 a4 6d757473 dd ffffffff");
        assert_eq!(Msg::decode(&huge), Err(Error::Truncated));
        assert_eq!(Msg::decode(&vec![0; MAX_LSS_MSG_LEN + 1]), Err(Error::TooLong(MAX_LSS_MSG_LEN + 1)));
    }

    #[test]
    fn sealed_values_open_only_unchanged_under_their_key_and_version() {
        let k = [7u8; 32];
        let m = Mutation::new("node/state/x", 4, b"{\"a\":1}".to_vec());
        let s = seal_value(&k, m.clone());
        assert_eq!(s.value.len(), m.value.len() + VALUE_TAG_LEN);
        assert_eq!(open_value(&k, s.clone()), Ok(m.clone()));
        let mut v = s.clone();
        v.value[2] ^= 1;
        assert!(open_value(&k, v).unwrap_err().contains("fails its tag"));
        let moved = Mutation { version: 5, ..s.clone() };
        assert!(open_value(&k, moved).is_err(), "the version is covered");
        let renamed = Mutation { key: "node/state/y".into(), ..s.clone() };
        assert!(open_value(&k, renamed).is_err(), "the key is covered");
        assert!(open_value(&[8; 32], s).is_err(), "another seed's key");
        assert!(open_value(&k, Mutation::new("k", 0, vec![1; 5])).unwrap_err().contains("no tag"));
    }

    /// Test vector of VLS's `persist::tests::hmac_test` (vls-core 1.0.0-rc.1).
    #[test]
    fn hmacs_match_vls_test_vector() {
        let muts =
            vec![Mutation::new("foo", 0, vec![1]), Mutation::new("bar", 0, vec![2]), Mutation::new("baz", 0, vec![3])];
        let secret = [0u8; 32];
        assert_eq!(
            hex::encode(client_hmac(&secret, &muts)),
            "2e3c1864370a95cbd641d09ae0cf7c0dd5bd0b1c30707ee5ec23775e41f19f2e"
        );
        assert_eq!(
            hex::encode(server_hmac(&secret, &muts)),
            "8fe3d55b41ae5f1c0d2b1015e3d190ff4c6d419bd792fccf8f349505031f9fec"
        );
        assert_ne!(shared_hmac(&secret, &[9; 32], &muts), shared_hmac(&secret, &[8; 32], &muts));
        assert_eq!(auth_token(&secret), sha256::Hash::hash(&[0u8; 32]).to_byte_array());
    }

    impl Writer {
        fn str_bytes(s: &str) -> Vec<u8> {
            let mut w = Writer(Vec::new());
            w.str(s);
            w.0
        }
    }
}
