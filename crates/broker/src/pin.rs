//! The signer key the broker trusts, pinned on disk.
//!
//! The first signer whose `hsmd_init` reply reaches lightningd fixes the node id; from then on
//! only that key may log in, across broker restarts. The file is written atomically (a unique
//! temp file, fsync, rename, directory fsync), so a crash leaves either no pin or the whole pin.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
/// one: a temporary file of its own in the same directory, fsync, rename, directory fsync.
/// Concurrent writers never share a temporary file (each name is unique: pid, counter and a
/// random suffix, created exclusively), so the last rename wins and none fails for the other.
pub(crate) fn write_durably(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?
        .to_string_lossy();
    let (tmp, mut f) = create_temp(dir, &name)?;
    let written = f.write_all(contents).and_then(|()| f.sync_all()).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

/// Creates `dir/.{name}.{pid}.{n}.{random}.tmp`, exclusively (an existing file is never reused).
fn create_temp(dir: &Path, name: &str) -> std::io::Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let mut last = None;
    for _ in 0..8 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let r: u32 = bitcoin::secp256k1::rand::random();
        let tmp = dir.join(format!(".{name}.{pid}.{n}.{r:08x}.tmp"));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::AlreadyExists, "no free temporary name")))
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

    #[test]
    fn concurrent_durable_writes_all_succeed_and_leave_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("pin-write-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let barrier = std::sync::Barrier::new(16);
        std::thread::scope(|sc| {
            for i in 0..16 {
                let (path, barrier) = (&path, &barrier);
                sc.spawn(move || {
                    barrier.wait();
                    for j in 0..8 {
                        write_durably(path, format!("{i} {j}\n").as_bytes()).unwrap();
                    }
                });
            }
        });
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(" 7\n"), "a whole last write: {text:?}");
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
        let _ = fs::remove_dir_all(&dir);
    }
}
