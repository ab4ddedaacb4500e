//! The seed file `{data_dir}/seed`, mode 0600: either the 32 raw bytes, or the seed encrypted
//! with a passphrase (`init --encrypt`; format in [`crate::seedcrypt`]). Also the optional
//! owner key file `{data_dir}/owner.pub` (the owner's public key in hex).
//!
//! Every write goes to a temporary file in the same directory (0600), is fsynced, moved into
//! place (rename, or a hard link where an existing seed must not be replaced), and the
//! directory is fsynced: a crash leaves the old file or the new one, never a torn seed.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use zeroize::Zeroizing;

use crate::passphrase;
use crate::seedcrypt::{self, KdfParams, Sealed};

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

/// The passphrase does not open the encrypted seed (exit code [`EXIT_WRONG_PASSPHRASE`]).
#[derive(Debug, thiserror::Error)]
#[error("cannot unlock the seed {0}: wrong passphrase (or the file was altered); nothing was changed")]
pub struct WrongPassphrase(pub String);

/// Exit code of `sphinx-key` when the seed's passphrase is wrong.
pub const EXIT_WRONG_PASSPHRASE: i32 = 4;

/// What the seed file holds.
pub enum SeedFile {
    /// The 32 raw bytes.
    Plain(Zeroizing<[u8; 32]>),
    /// The seed encrypted with a passphrase.
    Encrypted(Sealed),
}

/// Writes `bytes` to `{dir}/{name}` (0600) through a fsynced temporary file; `replace` says
/// whether an existing file may be replaced (else the write fails and leaves it alone).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8], replace: bool) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    match fs::remove_file(&tmp) {
        Ok(()) => tracing::debug!(file = %tmp.display(), "removed a temporary file left by an interrupted write"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", tmp.display())),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    drop(f);
    let placed = written.and_then(|()| {
        if replace {
            fs::rename(&tmp, &path)
        } else {
            // link(2) fails if `path` exists: an existing seed is never replaced, even in a race.
            fs::hard_link(&tmp, &path).and_then(|()| fs::remove_file(&tmp))
        }
    });
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            bail!("{} already exists: refusing to overwrite a seed", path.display());
        }
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot fsync {}", dir.display()))?;
    Ok(path)
}

/// The file bytes of `seed`: raw, or sealed under `passphrase`.
fn encode(seed: &[u8; 32], passphrase: Option<&str>) -> Result<Zeroizing<Vec<u8>>> {
    Ok(Zeroizing::new(match passphrase {
        None => seed.to_vec(),
        Some(p) => Sealed::seal(seed, p.as_bytes(), KdfParams::DEFAULT).context("cannot encrypt the seed")?.encode(),
    }))
}

/// Writes a new seed file (0600, atomic and durable), encrypted if a passphrase is given.
/// Refuses to overwrite an existing seed.
pub fn write_new(data_dir: &Path, seed: &[u8; 32], passphrase: Option<&str>) -> Result<PathBuf> {
    let path = seed_path(data_dir);
    if path.exists() {
        bail!("{} already exists: refusing to overwrite a seed", path.display());
    }
    write_atomic(data_dir, SEED_FILE, &encode(seed, passphrase)?, false)
}

/// Replaces the seed file with `seed` sealed under a new passphrase (atomic and durable).
pub fn rewrite_encrypted(data_dir: &Path, seed: &[u8; 32], passphrase: &str) -> Result<PathBuf> {
    write_atomic(data_dir, SEED_FILE, &encode(seed, Some(passphrase))?, true)
}

/// Reads the seed file of `data_dir` without unlocking it; warns if it is readable by group
/// or others.
pub fn load(data_dir: &Path) -> Result<SeedFile> {
    let path = seed_path(data_dir);
    let f = match File::open(&path) {
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
    let mut v = Zeroizing::new(Vec::new());
    // Neither format is longer than this; a larger file is not a seed.
    f.take(1024).read_to_end(&mut v).with_context(|| format!("cannot read seed {}", path.display()))?;
    if seedcrypt::is_sealed(&v) {
        return Ok(SeedFile::Encrypted(
            Sealed::decode(&v).with_context(|| format!("seed {} cannot be read", path.display()))?,
        ));
    }
    if v.len() != 32 {
        bail!("seed {} has {} bytes: expected 32 (a plain seed) or an encrypted seed file", path.display(), v.len());
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    seed.copy_from_slice(&v);
    Ok(SeedFile::Plain(seed))
}

/// Opens a sealed seed with the passphrase from `source`.
pub fn unlock(data_dir: &Path, sealed: &Sealed, source: &passphrase::Source) -> Result<Zeroizing<[u8; 32]>> {
    let pass = source.existing()?;
    match sealed.open(pass.as_bytes()) {
        Ok(seed) => Ok(seed),
        Err(seedcrypt::Error::WrongPassphrase) => {
            Err(WrongPassphrase(seed_path(data_dir).display().to_string()).into())
        }
        Err(e) => Err(e).context("cannot unlock the seed"),
    }
}

/// Reads the seed of `data_dir`, unlocking it with the passphrase from `source` if it is
/// encrypted. Writes nothing.
pub fn read(data_dir: &Path, source: &passphrase::Source) -> Result<Zeroizing<[u8; 32]>> {
    match load(data_dir)? {
        SeedFile::Plain(s) => Ok(s),
        SeedFile::Encrypted(sealed) => {
            let seed = unlock(data_dir, &sealed, source)?;
            tracing::info!("seed unlocked");
            Ok(seed)
        }
    }
}

/// Writes the owner's public key (hex) to `{data_dir}/owner.pub` (atomic and durable).
pub fn write_owner(data_dir: &Path, owner: &bitcoin::secp256k1::PublicKey) -> Result<PathBuf> {
    write_atomic(data_dir, OWNER_FILE, format!("{}\n", hex::encode(owner.serialize())).as_bytes(), true)
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
        let p = write_new(&d, &[7u8; 32], None).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_new(&d, &[8u8; 32], None).is_err());
        assert_eq!(*read(&d, &passphrase::Source::default()).unwrap(), [7u8; 32]);
        // A temporary file left by an interrupted write is replaced, and none is left behind.
        fs::write(d.join(".owner.pub.tmp"), b"junk").unwrap();
        let owner = bitcoin::secp256k1::PublicKey::from_secret_key(
            &bitcoin::secp256k1::Secp256k1::new(),
            &bitcoin::secp256k1::SecretKey::from_slice(&[1; 32]).unwrap(),
        );
        write_owner(&d, &owner).unwrap();
        assert_eq!(read_owner(&d).unwrap(), Some(owner));
        let mut names: Vec<_> = fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["owner.pub", "seed"]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn other_files_are_not_seeds() {
        let d = std::env::temp_dir().join(format!("sphinx-key-seed-bad-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let none = passphrase::Source::default();
        assert!(read(&d, &none).unwrap_err().downcast_ref::<NeedsInit>().is_some());
        fs::write(seed_path(&d), [1u8; 33]).unwrap();
        assert!(format!("{:#}", read(&d, &none).unwrap_err()).contains("33 bytes"));
        fs::write(seed_path(&d), b"sphxseed\x02rest").unwrap();
        assert!(format!("{:#}", read(&d, &none).unwrap_err()).contains("version 2"));
        let _ = fs::remove_dir_all(&d);
    }
}
