//! The signer key the broker trusts, pinned on disk.
//!
//! The first signer whose `hsmd_init` reply reaches lightningd fixes the node id; from then on
//! only that key may log in, across broker restarts. The file is written atomically (temp file,
//! fsync, rename, directory fsync), so a crash leaves either no pin or the whole pin.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Errors of the pin store.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The file could not be read or written.
    #[error("pin file {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file does not hold a node id.
    #[error("pin file {0} is corrupt (expected a 33-byte node id in hex)")]
    Corrupt(PathBuf),
    /// A different key is already pinned.
    #[error("signer {offered} is not the pinned node {pinned}")]
    Mismatch {
        /// Pinned id.
        pinned: String,
        /// Offered id.
        offered: String,
    },
}

/// The pinned node id (hex), cached in memory and persisted in `data_dir/pinned-node-id`.
pub struct PinStore {
    path: PathBuf,
    pinned: Mutex<Option<String>>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PinError + '_ {
    move |source| PinError::Io { path: path.to_path_buf(), source }
}

impl PinStore {
    /// Loads the pin from `data_dir` (creating the directory if needed).
    pub fn open(data_dir: &Path) -> Result<Self, PinError> {
        fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
        let path = data_dir.join("pinned-node-id");
        let pinned = match fs::read_to_string(&path) {
            Ok(s) => {
                let id = s.trim().to_string();
                if id.len() != 66 || hex::decode(&id).is_err() {
                    return Err(PinError::Corrupt(path));
                }
                Some(id)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(PinStore { path, pinned: Mutex::new(pinned) })
    }

    /// The pinned id, if any.
    pub fn get(&self) -> Option<String> {
        self.pinned.lock().ok().and_then(|g| g.clone())
    }

    /// Is `id` allowed to log in? Any key before a pin exists; only the pinned key after.
    pub fn allows(&self, id: &str) -> Result<(), PinError> {
        match self.get() {
            Some(p) if p != id => Err(PinError::Mismatch { pinned: p, offered: id.to_string() }),
            _ => Ok(()),
        }
    }

    /// Pins `id` durably if nothing is pinned; errors if another key is.
    pub fn pin(&self, id: &str) -> Result<(), PinError> {
        let mut g = self.pinned.lock().map_err(|_| PinError::Corrupt(self.path.clone()))?;
        match g.as_deref() {
            Some(p) if p == id => return Ok(()),
            Some(p) => return Err(PinError::Mismatch { pinned: p.to_string(), offered: id.to_string() }),
            None => {}
        }
        write_durably(&self.path, format!("{id}\n").as_bytes()).map_err(io_err(&self.path))?;
        tracing::info!(node_id = %id, path = %self.path.display(), "pinned signer node id");
        *g = Some(id.to_string());
        Ok(())
    }
}

/// Replaces `path` with `contents` so that a crash leaves the old or the new file, never a torn
/// one: temp file, fsync, rename, directory fsync.
pub(crate) fn write_durably(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_survives_reopen_and_refuses_other_keys() {
        let dir = std::env::temp_dir().join(format!("pin-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = "02".to_string() + &"11".repeat(32);
        let b = "03".to_string() + &"22".repeat(32);
        let s = PinStore::open(&dir).unwrap();
        assert!(s.allows(&b).is_ok());
        s.pin(&a).unwrap();
        assert!(s.allows(&b).is_err());
        let s2 = PinStore::open(&dir).unwrap();
        assert_eq!(s2.get().as_deref(), Some(a.as_str()));
        assert!(s2.pin(&b).is_err());
        fs::write(dir.join("pinned-node-id"), "junk").unwrap();
        assert!(PinStore::open(&dir).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
