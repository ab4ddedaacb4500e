//! A real `lssd` (crates.io `lssd` 0.5.1, redb backend) on loopback for the tests and the demo,
//! built by the workspace (crates/lssd, the `lssd` binary next to the tests) and found by [`binary`].
//!
//! `lssd` keeps its identity key in `$HOME/.lss/server_key`, so each instance gets its own
//! directory as `HOME` (key and redb data inside it): a restart in the same directory is the
//! same server with the same data. The process is killed when the [`Lssd`] is dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long `start` waits for the server to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `lssd`.
pub struct Lssd {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    remove_dir: bool,
}

/// The `lssd` binary: `$LSSD`, else the workspace's own build (crates/lssd, next to the running
/// test or binary in the target directory), else `lssd` on `PATH` or in `~/.cargo/bin`.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LSSD") {
        return Some(PathBuf::from(p));
    }
    let built = std::env::current_exe().ok().and_then(|exe| {
        // target/release/lssd, seen from target/release/<bin> or target/release/deps/<test>.
        let dir = exe.parent()?;
        [dir.join("lssd"), dir.parent()?.join("lssd")].into_iter().find(|p| p.is_file() && *p != exe)
    });
    let on_path = || {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("lssd"))
            .find(|p| p.is_file())
    };
    built.or_else(on_path).or_else(|| {
        let p = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/lssd");
        p.is_file().then_some(p)
    })
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("no free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

impl Lssd {
    /// Starts `lssd` in a fresh temporary directory (removed on drop).
    pub fn start_temp(name: &str) -> Result<Lssd, String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sphinx-lssd-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut l = Lssd::start_in(&dir, None)?;
        l.remove_dir = true;
        Ok(l)
    }

    /// Starts `lssd` with `dir` as its home (created if missing) on `port` (a free one if `None`).
    pub fn start_in(dir: &Path, port: Option<u16>) -> Result<Lssd, String> {
        let bin = binary().ok_or(
            "lssd not found: `cargo build --release -p sphinx-lssd` (scripts/test does), or set LSSD=/path/to/lssd",
        )?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        let mut l = Lssd { child: None, dir: dir.to_path_buf(), port, remove_dir: false };
        l.spawn(&bin)?;
        Ok(l)
    }

    fn spawn(&mut self, bin: &Path) -> Result<(), String> {
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let mut child = Command::new(bin)
            .args(["--interface", "127.0.0.1", "--port", &self.port.to_string(), "--datadir"])
            .arg(&data)
            .env("HOME", &self.dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        // Its log goes to `dir/lssd.log`; "ready on" is logged just before it binds.
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            let log_path = self.dir.join("lssd.log");
            std::thread::spawn(move || {
                let mut log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).ok();
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if line.contains(" ready on ") {
                        let _ = tx.send(());
                    }
                    if let Some(f) = log.as_mut() {
                        let _ = writeln!(f, "{line}");
                    }
                }
            });
        }
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        if rx.recv_timeout(START_TIMEOUT).is_err() {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            return Err(self.failed(&match exited {
                Some(status) => format!("exited with {status}"),
                None => "did not log that it is ready".to_string(),
            }));
        }
        // Serving starts right after the log line: probe until the port accepts.
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut wait = Duration::from_millis(5);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(self.failed(&format!("exited with {status}")));
            }
            if Instant::now() > deadline {
                return Err(self.failed("does not accept connections"));
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_millis(100));
        }
    }

    fn failed(&self, what: &str) -> String {
        let log = std::fs::read_to_string(self.dir.join("lssd.log")).unwrap_or_default();
        format!("lssd on port {} {what}; log:\n{log}", self.port)
    }

    /// `http://127.0.0.1:PORT`, the `[lss] url` of a broker using this server.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's home directory (identity key, data, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills and starts it again in the same directory on the same port (same key, same data).
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let bin = binary().ok_or("lssd is not installed")?;
        self.spawn(&bin)
    }
}

impl Drop for Lssd {
    fn drop(&mut self) {
        self.kill();
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
