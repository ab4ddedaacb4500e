//! The whole loop on one machine, for tests and benchmarks: a `sphinx-key` signer process and the
//! environment that makes `sphinx-broker` (spawned by [`crate::lightningd::FakeLightningd`]) serve it.
//!
//! Child processes get `PR_SET_PDEATHSIG = SIGKILL`, so a test that dies (panic, timeout, ^C)
//! leaves no signer running, and they are killed and reaped on drop. The kernel ties that signal
//! to the *thread* that spawned the child, so every spawn goes through one keeper thread that
//! lives as long as the process: a signer started from a short-lived thread stays up.

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

/// A temporary directory removed on drop (kept when `SPHINX_KEEP_TEMP` is set: the logs and
/// state of a failed test or a benchmark run can then be read).
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
        if std::env::var_os("SPHINX_KEEP_TEMP").is_some() {
            return;
        }
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

/// `sphinx-key node-id` of `data_dir` (regtest), if it has a readable seed.
fn node_id(key_bin: &Path, data_dir: &Path, envs: &[(&str, &str)]) -> Option<String> {
    let mut cmd = Command::new(key_bin);
    cmd.args(["node-id", "--data-dir"]).arg(data_dir).args(["--network", "regtest"]).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().ok()?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && id.len() == 66).then_some(id)
}

type SpawnJob = (Command, std::sync::mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from the process-lifetime keeper thread (see the module docs).
pub fn spawn_kept(cmd: Command) -> io::Result<Child> {
    static KEEPER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<SpawnJob>>> =
        std::sync::OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        });
        std::sync::Mutex::new(tx)
    });
    let (tx, rx) = std::sync::mpsc::channel();
    keeper
        .lock()
        .map_err(|_| io::Error::other("spawn keeper poisoned"))?
        .send((cmd, tx))
        .map_err(|_| io::Error::other("spawn keeper gone"))?;
    rx.recv().map_err(|_| io::Error::other("spawn keeper gone"))?
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
        // Without a client id of the test's choosing, the device's node id: the legacy identity
        // (topic prefix = node id) that the tests written before client ids look for.
        if !envs.iter().any(|(k, _)| *k == "SPHINX_KEY_CLIENT_ID") {
            if let Some(node) = node_id(key_bin, data_dir, envs) {
                cmd.env("SPHINX_KEY_CLIENT_ID", node);
            }
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
        let child = spawn_kept(cmd)?;
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

impl SignerProcess {
    /// Sends `sig` to the process (e.g. `libc::SIGSTOP` / `libc::SIGCONT` to make a slow
    /// device). The child is not reaped until [`kill`](Self::kill)/[`wait`](Self::wait), so the
    /// pid cannot have been recycled.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        let pid = self.id().ok_or_else(|| io::Error::other("signer not running"))?;
        // SAFETY: kill(2) on our own unreaped child.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        tail(&self.log, usize::MAX)
    }
}

/// Waits (bounded) until `addr` accepts TCP connections, e.g. a broker's MQTT listener right
/// after spawn. A refused connect returns at once, so this retries every 10 ms until `timeout`.
pub fn wait_listening(addr: &str, timeout: std::time::Duration) -> io::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{addr} not listening after {timeout:?}: {e}"),
                ))
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// A log file's text without ANSI colour sequences (tracing colours its output by default).
pub fn log_text(path: &Path) -> String {
    let raw = tail(path, usize::MAX);
    let mut out = String::with_capacity(raw.len());
    let mut it = raw.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            it.next();
            // CSI: parameters and intermediates, then one final byte in @..~
            for d in it.by_ref() {
                if ('@'..='~').contains(&d) {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Waits (bounded) until a log file contains `needle`, returning the whole file. Only for
/// facts that have no other observable event (a line a process writes about what it refused).
pub fn wait_log(path: &Path, needle: &str, timeout: std::time::Duration) -> Result<String, String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let s = log_text(path);
        if s.contains(needle) {
            return Ok(s);
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "{} has no {needle:?} after {timeout:?}; last lines:\n{}",
                path.display(),
                log_text(path).chars().rev().take(3000).collect::<Vec<_>>().into_iter().rev().collect::<String>()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Direction of bytes through a [`TcpProxy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client (signer) → server (broker).
    ToServer,
    /// Server → client.
    ToClient,
}

struct ProxyRule {
    dir: Dir,
    pattern: Vec<u8>,
    cut: bool,
    tx: std::sync::mpsc::Sender<Vec<u8>>,
}

struct ProxyInner {
    upstream: std::net::SocketAddr,
    conns: std::sync::Mutex<Vec<(std::net::TcpStream, std::net::TcpStream)>>,
    rules: std::sync::Mutex<Vec<ProxyRule>>,
    first_bytes: std::sync::Mutex<Vec<Vec<u8>>>,
    stop: std::sync::atomic::AtomicBool,
}

/// A loopback TCP proxy between a signer and the broker: the network in the middle. It can
/// watch for a byte pattern in either direction (an event when e.g. a request frame reaches the
/// signer's socket, or its reply leaves it), cut the connection exactly there (the chunk with the
/// pattern is not forwarded), sever every connection, and it keeps the first bytes each client
/// sent (its CONNECT, with the login token: what a network attacker would capture).
pub struct TcpProxy {
    addr: std::net::SocketAddr,
    inner: std::sync::Arc<ProxyInner>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`. A client
    /// whose upstream connect fails is closed (as if the broker were down).
    pub fn start(upstream: &str) -> io::Result<TcpProxy> {
        use std::net::ToSocketAddrs;
        let upstream = upstream.to_socket_addrs()?.next().ok_or_else(|| io::Error::other("no upstream address"))?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let inner = std::sync::Arc::new(ProxyInner {
            upstream,
            conns: Default::default(),
            rules: Default::default(),
            first_bytes: Default::default(),
            stop: Default::default(),
        });
        let i2 = inner.clone();
        std::thread::Builder::new().name("proxy-accept".into()).spawn(move || {
            for c in listener.incoming() {
                if i2.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = c else { continue };
                let Ok(server) = std::net::TcpStream::connect_timeout(&i2.upstream, std::time::Duration::from_secs(2))
                else {
                    continue; // dropped: the client sees the connection close
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) =
                    (client.try_clone(), server.try_clone(), client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                let idx = {
                    let mut fb = i2.first_bytes.lock().unwrap_or_else(|p| p.into_inner());
                    fb.push(Vec::new());
                    fb.len() - 1
                };
                i2.conns.lock().unwrap_or_else(|p| p.into_inner()).push((c3, s3));
                let (ia, ib) = (i2.clone(), i2.clone());
                let _ = std::thread::Builder::new()
                    .name("proxy-up".into())
                    .spawn(move || pump(ia, client, server, Dir::ToServer, Some(idx)));
                let _ = std::thread::Builder::new()
                    .name("proxy-down".into())
                    .spawn(move || pump(ib, s2, c2, Dir::ToClient, None));
            }
        })?;
        Ok(TcpProxy { addr, inner })
    }

    /// `127.0.0.1:PORT` to give the signer as its broker.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// One-shot: the receiver gets the bytes around the match (the previous chunk's last 256
    /// bytes and the chunk carrying it) the first time `pattern` passes in `dir`; bytes are
    /// forwarded normally.
    pub fn watch(&self, dir: Dir, pattern: &[u8]) -> std::sync::mpsc::Receiver<Vec<u8>> {
        self.rule(dir, pattern, false)
    }

    /// One-shot: the first time `pattern` passes in `dir`, the chunk carrying it is dropped and
    /// that connection is severed (both sockets shut down); then the receiver gets the bytes.
    pub fn cut_on(&self, dir: Dir, pattern: &[u8]) -> std::sync::mpsc::Receiver<Vec<u8>> {
        self.rule(dir, pattern, true)
    }

    fn rule(&self, dir: Dir, pattern: &[u8], cut: bool) -> std::sync::mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.inner.rules.lock().unwrap_or_else(|p| p.into_inner()).push(ProxyRule {
            dir,
            pattern: pattern.to_vec(),
            cut,
            tx,
        });
        rx
    }

    /// Severs every open connection now.
    pub fn cut_all(&self) {
        for (c, s) in self.inner.conns.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The first bytes (up to 4 KiB) each client sent, one entry per connection, in order.
    pub fn first_bytes(&self) -> Vec<Vec<u8>> {
        self.inner.first_bytes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.cut_all();
        let _ = std::net::TcpStream::connect(self.addr); // wakes the accept loop
    }
}

fn pump(
    inner: std::sync::Arc<ProxyInner>,
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    dir: Dir,
    capture: Option<usize>,
) {
    use std::io::Write;
    let mut buf = vec![0u8; 64 * 1024];
    let mut window: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if let Some(i) = capture {
            let mut fb = inner.first_bytes.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = fb.get_mut(i) {
                let room = 4096usize.saturating_sub(v.len());
                v.extend_from_slice(&chunk[..room.min(n)]);
            }
        }
        // Match against the end of the previous chunk too: a pattern may straddle two reads.
        window.extend_from_slice(chunk);
        let mut cut = false;
        let mut notify = Vec::new();
        {
            let mut rules = inner.rules.lock().unwrap_or_else(|p| p.into_inner());
            let mut k = 0;
            while k < rules.len() {
                let r = &rules[k];
                // Only matches that end in this chunk (older bytes were seen by older rules).
                let from_at = window.len().saturating_sub(n + r.pattern.len().saturating_sub(1));
                let hit = !r.pattern.is_empty()
                    && window[from_at..].windows(r.pattern.len()).any(|w| w == r.pattern.as_slice());
                if r.dir == dir && hit {
                    let r = rules.remove(k);
                    cut |= r.cut;
                    if !r.cut {
                        notify.push(r.tx); // after the chunk is forwarded
                    } else {
                        // Sever first, then tell: the receiver may rely on the cut having happened.
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = r.tx.send(window.clone());
                    }
                } else {
                    k += 1;
                }
            }
        }
        if cut {
            return;
        }
        let ok = to.write_all(chunk).is_ok();
        for tx in notify {
            let _ = tx.send(window.clone());
        }
        if !ok {
            break;
        }
        let keep = 256.min(window.len());
        window.drain(..window.len() - keep);
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// The password of the first MQTT 3.1.1 CONNECT in `bytes` whose username is `user` (what a
/// network attacker on a plaintext link reads).
pub fn connect_password(bytes: &[u8], user: &str) -> Option<Vec<u8>> {
    let u = user.as_bytes();
    let mut field = (u.len() as u16).to_be_bytes().to_vec();
    field.extend_from_slice(u);
    // The client id may be the same string: the username is the last occurrence.
    let at = bytes.windows(field.len()).rposition(|w| w == field.as_slice())? + field.len();
    let len = u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]) as usize;
    bytes.get(at + 2..at + 2 + len).map(|p| p.to_vec())
}
