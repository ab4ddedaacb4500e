//! The whole loop on one machine, for tests and benchmarks: a `sphinx-key` signer process and the
//! environment that makes `sphinx-broker` (spawned by [`crate::lightningd::FakeLightningd`]) serve it.
//!
//! Child processes get `PR_SET_PDEATHSIG = SIGKILL`, so a test that dies (panic, timeout, ^C)
//! leaves no signer running, and they are killed and reaped on drop. The kernel ties that signal
//! to the *thread* that spawned the child: spawn from a thread that outlives the process.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::lightningd::CLN_VERSION;

/// `target/<profile>/` of the running executable (a test or bench in `deps/`, or a binary).
pub fn bin_dir() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or_else(|| io::Error::other("executable has no directory"))?;
    Ok(if dir.ends_with("deps") { dir.parent().unwrap_or(dir).to_path_buf() } else { dir.to_path_buf() })
}

/// A workspace binary next to the running executable, with a hint to build it when missing.
pub fn bin(name: &str) -> io::Result<PathBuf> {
    let p = bin_dir()?.join(name);
    if !p.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} not found: build the binaries first (cargo build --release --workspace --bins)", p.display()),
        ));
    }
    Ok(p)
}

/// A free loopback port (bound and released; the broker binds it right after).
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/sphinx-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> io::Result<TempDir> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "sphinx-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// A path inside it.
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The environment that configures a spawned `sphinx-broker` for a local loop.
pub fn broker_envs(data_dir: &Path, listen: &str) -> Vec<(OsString, OsString)> {
    [
        ("SPHINX_BROKER_CLN_VERSION", CLN_VERSION.to_string()),
        ("SPHINX_BROKER_NETWORK", "regtest".to_string()),
        ("SPHINX_BROKER_DATA_DIR", data_dir.display().to_string()),
        ("SPHINX_BROKER_MQTT_LISTEN", listen.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect()
}

/// Runs `sphinx-key init` for `seed` in `data_dir` (regtest).
pub fn init_signer(key_bin: &Path, data_dir: &Path, seed: [u8; 32]) -> io::Result<()> {
    let out = Command::new(key_bin)
        .args(["init", "--data-dir"])
        .arg(data_dir)
        .args(["--network", "regtest", "--seed-hex", &hex::encode(seed)])
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "sphinx-key init failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// A running `sphinx-key run`, killed (SIGKILL) and reaped on drop.
pub struct SignerProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl SignerProcess {
    /// Starts `sphinx-key run` against `broker` (HOST:PORT) with a fixed clock, logging to `log`.
    pub fn start(
        key_bin: &Path,
        data_dir: &Path,
        broker: &str,
        fixed_clock: u64,
        log: &Path,
        envs: &[(&str, &str)],
    ) -> io::Result<SignerProcess> {
        let f = File::options().create(true).append(true).open(log)?;
        let mut cmd = Command::new(key_bin);
        cmd.args(["run", "--data-dir"])
            .arg(data_dir)
            .args(["--broker", broker, "--network", "regtest", "--status", "none"])
            .args(["--dev-fixed-clock", &fixed_clock.to_string()])
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the child when
        // this process dies, so no signer outlives its test.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        Ok(SignerProcess { child: Some(child), log: log.to_path_buf() })
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL and reap: the crash of a device.
    pub fn kill(&mut self) -> io::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            c.wait()?;
        }
        Ok(())
    }

    /// Waits for the process to exit by itself (e.g. a planned crash point) and returns its status.
    pub fn wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        match self.child.take() {
            Some(mut c) => c.wait().map(Some),
            None => Ok(None),
        }
    }

    /// The last `max` bytes of the log.
    pub fn log_tail(&self, max: usize) -> String {
        tail(&self.log, max)
    }
}

impl Drop for SignerProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The last `max` bytes of a text file (lossy), for failure messages.
pub fn tail(path: &Path, max: usize) -> String {
    let mut b = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut b);
    }
    let s = String::from_utf8_lossy(&b[b.len().saturating_sub(max)..]).into_owned();
    s
}

/// Every VLS key → value of a signer's redb state directory (the signer's own bookkeeping under
/// `sphinx/` — reply log, stored init — left out), to compare two runs' durable state.
#[cfg(feature = "oracle")]
pub fn signer_state(state_dir: &Path) -> io::Result<std::collections::BTreeMap<String, Vec<u8>>> {
    use vls_persist::kvv::KVVStore;
    // RedbKVVStore::new panics on an unusable directory.
    let store = std::panic::catch_unwind(|| vls_persist::kvv::redb::RedbKVVStore::new(state_dir))
        .map_err(|_| io::Error::other(format!("cannot open redb state in {}", state_dir.display())))?;
    let all = store.get_prefix("").map_err(|e| io::Error::other(format!("reading state: {e:?}")))?;
    Ok(all.map(|kvv| kvv.into_inner()).filter(|(k, _)| !k.starts_with("sphinx/")).map(|(k, (_, v))| (k, v)).collect())
}
