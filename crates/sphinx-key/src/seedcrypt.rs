//! The encrypted seed file format (version 1), without I/O: the 32-byte seed sealed with
//! XChaCha20-Poly1305 under a key derived from the passphrase with Argon2id.
//!
//! ```text
//! offset size
//!      0    8  magic "sphxseed"
//!      8    1  version = 1 (Argon2id v19 + XChaCha20-Poly1305)
//!      9    4  Argon2 memory, KiB (u32 BE)
//!     13    4  Argon2 passes (u32 BE)
//!     17    4  Argon2 lanes (u32 BE)
//!     21   16  salt (random)
//!     37   24  nonce (random)
//!     61   48  ciphertext (32) | Poly1305 tag (16); associated data = bytes 0..61
//! ```
//! The header (bytes 0..61) is authenticated, so parameters cannot be changed without the tag
//! failing. A plaintext seed file is exactly 32 bytes, so the two cannot be confused.
//! See docs/signer.md ("Seed encryption") and docs/wire.md.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

/// First bytes of an encrypted seed file.
pub const MAGIC: &[u8; 8] = b"sphxseed";
/// The only format version.
pub const VERSION: u8 = 1;
/// Length of the authenticated header.
pub const HEADER_LEN: usize = 8 + 1 + 12 + SALT_LEN + NONCE_LEN;
/// Length of a version 1 file.
pub const FILE_LEN: usize = HEADER_LEN + 32 + 16;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 24;

/// Argon2id cost parameters, stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes over the memory.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfParams {
    /// RFC 9106 §4, second recommended option: 64 MiB, 3 passes, 4 lanes.
    pub const DEFAULT: KdfParams = KdfParams { m_kib: 64 * 1024, t: 3, p: 4 };
    /// Largest memory accepted from a file (1 GiB): a corrupted or hostile header must not make
    /// the device allocate without bound.
    pub const MAX_M_KIB: u32 = 1024 * 1024;
    /// Most passes accepted from a file.
    pub const MAX_T: u32 = 64;
    /// Most lanes accepted from a file.
    pub const MAX_P: u32 = 16;

    fn check(&self) -> Result<Params, Error> {
        if self.m_kib > Self::MAX_M_KIB || self.t > Self::MAX_T || self.p > Self::MAX_P {
            return Err(Error::Params(format!(
                "{self:?} exceeds the limits (memory {} KiB, {} passes, {} lanes)",
                Self::MAX_M_KIB,
                Self::MAX_T,
                Self::MAX_P
            )));
        }
        Params::new(self.m_kib, self.t, self.p, Some(32)).map_err(|e| Error::Params(format!("{self:?}: {e}")))
    }
}

/// Why a seed file cannot be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not a version 1 encrypted seed file.
    #[error("not an encrypted seed file: {0}")]
    Format(String),
    /// The stored KDF parameters are refused.
    #[error("unacceptable key derivation parameters: {0}")]
    Params(String),
    /// The passphrase is wrong (or the file was altered): the tag does not verify.
    #[error("wrong passphrase (or the seed file was altered)")]
    WrongPassphrase,
}

/// A parsed encrypted seed file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// KDF cost.
    pub params: KdfParams,
    salt: [u8; SALT_LEN],
    nonce: [u8; NONCE_LEN],
    ciphertext: [u8; 48],
}

/// True if `bytes` starts like an encrypted seed file (of any version).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

fn derive_key(passphrase: &[u8], salt: &[u8], params: &KdfParams) -> Result<Zeroizing<[u8; 32]>, Error> {
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.check()?);
    let mut key = Zeroizing::new([0u8; 32]);
    argon.hash_password_into(passphrase, salt, key.as_mut()).map_err(|e| Error::Params(e.to_string()))?;
    Ok(key)
}

impl Sealed {
    /// Seals `seed` under `passphrase` with a fresh random salt and nonce.
    pub fn seal(seed: &[u8; 32], passphrase: &[u8], params: KdfParams) -> Result<Sealed, Error> {
        let mut salt = [0u8; SALT_LEN];
        let mut nonce = [0u8; NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let mut s = Sealed { params, salt, nonce, ciphertext: [0; 48] };
        let key = derive_key(passphrase, &salt, &params)?;
        let aad = s.header();
        let ct = XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(key.as_ref()))
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: seed, aad: &aad })
            .map_err(|_| Error::Params("encryption failed".into()))?;
        s.ciphertext.copy_from_slice(&ct);
        Ok(s)
    }

    /// Opens the seed with `passphrase`.
    pub fn open(&self, passphrase: &[u8]) -> Result<Zeroizing<[u8; 32]>, Error> {
        let key = derive_key(passphrase, &self.salt, &self.params)?;
        let aad = self.header();
        let pt = Zeroizing::new(
            XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(key.as_ref()))
                .decrypt(XNonce::from_slice(&self.nonce), Payload { msg: &self.ciphertext, aad: &aad })
                .map_err(|_| Error::WrongPassphrase)?,
        );
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&pt);
        Ok(seed)
    }

    fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8] = VERSION;
        h[9..13].copy_from_slice(&self.params.m_kib.to_be_bytes());
        h[13..17].copy_from_slice(&self.params.t.to_be_bytes());
        h[17..21].copy_from_slice(&self.params.p.to_be_bytes());
        h[21..37].copy_from_slice(&self.salt);
        h[37..61].copy_from_slice(&self.nonce);
        h
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.header().to_vec();
        v.extend_from_slice(&self.ciphertext);
        v
    }

    /// Parses a file's bytes (checks the layout and the parameter limits, not the passphrase).
    pub fn decode(b: &[u8]) -> Result<Sealed, Error> {
        if !is_sealed(b) {
            return Err(Error::Format("no magic".into()));
        }
        if b.len() < 9 || b[8] != VERSION {
            return Err(Error::Format(format!(
                "version {} is not supported (this build reads version {VERSION})",
                b.get(8).map_or("none".to_string(), |v| v.to_string())
            )));
        }
        if b.len() != FILE_LEN {
            return Err(Error::Format(format!("{} bytes, expected {FILE_LEN}", b.len())));
        }
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let params = KdfParams { m_kib: u32_at(9), t: u32_at(13), p: u32_at(17) };
        params.check()?;
        let mut s = Sealed { params, salt: [0; SALT_LEN], nonce: [0; NONCE_LEN], ciphertext: [0; 48] };
        s.salt.copy_from_slice(&b[21..37]);
        s.nonce.copy_from_slice(&b[37..61]);
        s.ciphertext.copy_from_slice(&b[61..]);
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap parameters for the format tests (the default cost is exercised end to end).
    const FAST: KdfParams = KdfParams { m_kib: 64, t: 1, p: 1 };

    #[test]
    fn seal_open_and_layout() {
        let seed = [0x41u8; 32];
        let s = Sealed::seal(&seed, b"correct horse", FAST).unwrap();
        let bytes = s.encode();
        assert_eq!(bytes.len(), FILE_LEN);
        assert_eq!(FILE_LEN, 109);
        assert_eq!(&bytes[..8], b"sphxseed");
        assert_eq!(bytes[8], 1);
        assert_eq!(&bytes[9..21], &[0, 0, 0, 64, 0, 0, 0, 1, 0, 0, 0, 1]);
        let back = Sealed::decode(&bytes).unwrap();
        assert_eq!(back, s);
        assert_eq!(*back.open(b"correct horse").unwrap(), seed);
        assert_eq!(back.open(b"correct horsf"), Err(Error::WrongPassphrase));
        assert_eq!(back.open(b""), Err(Error::WrongPassphrase));
        // Fresh salt and nonce every time.
        let s2 = Sealed::seal(&seed, b"correct horse", FAST).unwrap();
        assert_ne!(s2.encode()[21..61], bytes[21..61]);
        assert_ne!(s2.encode()[61..], bytes[61..]);
    }

    #[test]
    fn tampering_is_detected() {
        let bytes = Sealed::seal(&[7u8; 32], b"pw", FAST).unwrap().encode();
        // Every byte of the header and the ciphertext is covered: flipping any fails the open
        // (or the parse, for the magic, version and parameter limits).
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            let r = Sealed::decode(&b).and_then(|s| s.open(b"pw"));
            assert!(r.is_err(), "byte {i} flipped went unnoticed");
        }
        // A lower cost is not a way around the tag either.
        let mut b = bytes.clone();
        b[16] = 2; // t = 2
        assert_eq!(Sealed::decode(&b).unwrap().open(b"pw"), Err(Error::WrongPassphrase));
    }

    #[test]
    fn bad_files_are_refused_before_any_work() {
        let bytes = Sealed::seal(&[7u8; 32], b"pw", FAST).unwrap().encode();
        assert!(matches!(Sealed::decode(&bytes[..60]), Err(Error::Format(_))));
        assert!(matches!(Sealed::decode(&[7u8; 32]), Err(Error::Format(_))));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(Sealed::decode(&v2), Err(Error::Format(m)) if m.contains("version 2")));
        let mut huge = bytes.clone();
        huge[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Sealed::decode(&huge), Err(Error::Params(_))));
        let mut lanes = bytes.clone();
        lanes[17..21].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(Sealed::decode(&lanes), Err(Error::Params(_))));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(Sealed::decode(&long), Err(Error::Format(_))));
    }

    #[test]
    fn default_parameters_are_rfc9106_second_option() {
        assert_eq!(KdfParams::DEFAULT, KdfParams { m_kib: 65536, t: 3, p: 4 });
        assert!(KdfParams::DEFAULT.check().is_ok());
    }
}
