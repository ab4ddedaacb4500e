//! The seed file: 32 raw bytes at `{data_dir}/seed`, mode 0600, written once; and the optional
//! owner key file `{data_dir}/owner.pub` (the owner's public key in hex).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// File name of the seed inside the data directory.
pub const SEED_FILE: &str = "seed";

/// File name of the owner's public key (hex) inside the data directory.
pub const OWNER_FILE: &str = "owner.pub";

/// The seed is missing: the device needs `sphinx-key init` (exit code [`EXIT_NEEDS_INIT`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NeedsInit(pub String);

/// Exit code of `sphinx-key` when there is no seed (never initialised, or reset by the owner).
pub const EXIT_NEEDS_INIT: i32 = 3;

/// Where the seed of `data_dir` lives.
pub fn seed_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SEED_FILE)
}

/// The 32-byte seed of a BIP39 mnemonic: the first 32 bytes of the 64-byte BIP39 seed with an
/// empty passphrase, as CLN's `hsmtool generatehsm` derives a (legacy) `hsm_secret`.
pub fn seed_from_mnemonic(words: &str) -> Result<[u8; 32]> {
    let m = bip39::Mnemonic::parse_normalized(words.trim())
        .or_else(|_| bip39::Mnemonic::parse(words.trim()))
        .map_err(|e| anyhow::anyhow!("invalid BIP39 mnemonic: {e}"))?;
    let full = m.to_seed("");
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&full[..32]);
    Ok(seed)
}

/// Parses 64 hex characters.
pub fn seed_from_hex(h: &str) -> Result<[u8; 32]> {
    let v = hex::decode(h.trim()).context("seed is not hex")?;
    let seed: [u8; 32] = v
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("seed must be 32 bytes (64 hex characters), got {}", v.len()))?;
    Ok(seed)
}

/// Writes a new seed file with mode 0600 and fsyncs it and its directory.
/// Refuses to overwrite an existing seed.
pub fn write_new(data_dir: &Path, seed: &[u8; 32]) -> Result<PathBuf> {
    fs::create_dir_all(data_dir).with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let path = seed_path(data_dir);
    if path.exists() {
        bail!("{} already exists: refusing to overwrite a seed", path.display());
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(seed).with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all().with_context(|| format!("cannot fsync {}", path.display()))?;
    drop(f);
    File::open(data_dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot fsync {}", data_dir.display()))?;
    Ok(path)
}

/// Reads the seed of `data_dir`; warns if the file is readable by group or others.
pub fn read(data_dir: &Path) -> Result<[u8; 32]> {
    let path = seed_path(data_dir);
    let mut f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(NeedsInit(format!(
                "no seed at {}: this device is not initialised (or its keys were reset by the owner); run `sphinx-key init`",
                path.display()
            ))
            .into())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open seed {}", path.display())),
    };
    let mode = f.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "seed file is readable by others; chmod 600 it");
    }
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    let seed: [u8; 32] = v
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("seed {} has {} bytes, expected 32", path.display(), v.len()))?;
    Ok(seed)
}

/// Writes the owner's public key (hex) to `{data_dir}/owner.pub`, fsynced.
pub fn write_owner(data_dir: &Path, owner: &bitcoin::secp256k1::PublicKey) -> Result<PathBuf> {
    fs::create_dir_all(data_dir).with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let path = data_dir.join(OWNER_FILE);
    let mut f = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(format!("{}\n", hex::encode(owner.serialize())).as_bytes())?;
    f.sync_all()?;
    File::open(data_dir).and_then(|d| d.sync_all())?;
    Ok(path)
}

/// Reads the owner's public key, if an owner key was set at `init`.
pub fn read_owner(data_dir: &Path) -> Result<Option<bitcoin::secp256k1::PublicKey>> {
    let path = data_dir.join(OWNER_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    Ok(Some(parse_pubkey(text.trim()).with_context(|| format!("invalid owner key in {}", path.display()))?))
}

/// Parses a 33-byte compressed public key in hex.
pub fn parse_pubkey(h: &str) -> Result<bitcoin::secp256k1::PublicKey> {
    let b = hex::decode(h.trim()).context("not hex")?;
    bitcoin::secp256k1::PublicKey::from_slice(&b).context("not a secp256k1 public key (33 bytes, compressed)")
}

/// Deletes the seed (and, for `all`, the owner key file) and fsyncs the directory: what the
/// owner's `ResetKeys`/`ResetAll` ask for. Missing files are fine.
pub fn delete(data_dir: &Path, all: bool) -> Result<()> {
    let mut files = vec![seed_path(data_dir)];
    if all {
        files.push(data_dir.join(OWNER_FILE));
    }
    for f in files {
        match fs::remove_file(&f) {
            Ok(()) => tracing::warn!(file = %f.display(), "deleted on the owner's request"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot delete {}", f.display())),
        }
    }
    File::open(data_dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot fsync {}", data_dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bip39_test_vector_first_32_bytes() {
        // BIP39 reference vector: "abandon" x11 + "about", empty passphrase.
        let s = seed_from_mnemonic(
            "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about",
        )
        .unwrap();
        assert_eq!(hex::encode(s), "5eb00bbddcf069084889a8ab9155568165f5c453ccb85e70811aaed6f6da5fc1");
        assert!(seed_from_mnemonic("abandon abandon").is_err());
        assert!(
            seed_from_mnemonic(
                "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon"
            )
            .is_err(),
            "bad checksum"
        );
    }

    #[test]
    fn write_is_0600_and_never_overwrites() {
        let d = std::env::temp_dir().join(format!("sphinx-key-seed-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let p = write_new(&d, &[7u8; 32]).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_new(&d, &[8u8; 32]).is_err());
        assert_eq!(read(&d).unwrap(), [7u8; 32]);
        let _ = fs::remove_dir_all(&d);
    }
}
