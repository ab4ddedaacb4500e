//! A stand-in for the part of `lightningd` that runs its hsmd (CLN v25.12.1,
//! `lightningd/lightningd.c` `test_subdaemons`, `lightningd/subd.c` `subd()`,
//! `lightningd/hsm_control.c`):
//!
//! 1. `BROKER --version`, stdout and stderr into one pipe, stdin `/dev/null`; the output must be
//!    exactly `v25.12.1\n` (CLN accepts `v25.12.1\n` followed by anything; we are stricter, so a
//!    broker that passes here passes lightningd).
//! 2. `BROKER [args]` with fd 0 = one end of a socketpair (status messages, drained and counted),
//!    fd 3 = one end of an `AF_UNIX SOCK_STREAM` socketpair (requests), every other inherited fd
//!    closed at exec (lightningd closes all fds above its last one), stdout/stderr inherited or
//!    sent to a file.
//! 3. Synchronous calls on fd 3 with `len u32 BE | type u16 | body` framing.
//! 4. `hsmd_client_hsmfd` (9) → 109, then the client fd, read exactly as lightningd does: the
//!    reply with plain reads (`wire_sync_read`), then `fdpass_recv` = one `recvmsg` of 1 byte
//!    carrying `SCM_RIGHTS`. An fd that arrives attached to the reply bytes would be lost by real
//!    lightningd (read(2) discards it) and then it would hang in `fdpass_recv`: that is an error
//!    here under [`FdPassing::Strict`] (default), accepted under [`FdPassing::Lenient`].
//!
//! Every read has a deadline; a hang becomes [`Error::Timeout`], after which the connection is
//! poisoned (its framing can no longer be trusted).

use std::ffi::{OsStr, OsString};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessageOwned, MsgFlags};
use sphinx_wire::hsmd;
use sphinx_wire::ClientContext;

/// What `lightningd --version` prints (without the newline): the broker must print the same.
pub const CLN_VERSION: &str = "v25.12.1";

/// Errors of the stand-in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// Cause.
        source: io::Error,
    },
    /// `--version` printed something else: lightningd refuses to start.
    #[error("{broker}: bad version {got:?}, lightningd {expected} requires exactly {expected:?} followed by a newline; lightningd refuses to start")]
    BadVersion {
        /// Broker path.
        broker: PathBuf,
        /// Expected version.
        expected: String,
        /// What stdout+stderr contained.
        got: String,
    },
    /// `--version` exited unsuccessfully.
    #[error("{broker} --version failed: {status}; output {output:?}")]
    VersionFailed {
        /// Broker path.
        broker: PathBuf,
        /// Exit status.
        status: String,
        /// stdout+stderr.
        output: String,
    },
    /// No answer within the deadline.
    #[error("timeout after {after:?} waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long.
        after: Duration,
    },
    /// The broker closed the connection.
    #[error("{what}: connection closed by the broker{}", .exit.as_ref().map(|s| format!(" (broker {s})")).unwrap_or_default())]
    Closed {
        /// What we were doing.
        what: String,
        /// The broker's exit status, if it has exited.
        exit: Option<String>,
    },
    /// The broker broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// An earlier failure left this connection unusable.
    #[error("connection unusable after an earlier failure: {0}")]
    Poisoned(String),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// How strictly the client fd after a 109 is received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FdPassing {
    /// As lightningd: the fd must come with a separate message after the 109 reply bytes.
    #[default]
    Strict,
    /// Also accept the fd attached to the reply bytes.
    Lenient,
}

/// Where the broker's stdout/stderr go.
#[derive(Clone, Debug, Default)]
pub enum BrokerOutput {
    /// Inherited from this process (as lightningd does).
    #[default]
    Inherit,
    /// Discarded.
    Null,
    /// Appended to a file (stdout and stderr both).
    File(PathBuf),
}

/// Knobs of [`FakeLightningd::spawn_with`].
#[derive(Clone, Debug)]
pub struct SpawnOptions {
    /// Version the broker must print (default [`CLN_VERSION`]).
    pub expected_version: String,
    /// Deadline of each call (write + reply).
    pub call_timeout: Duration,
    /// Deadline of `hsmd_init` (11), which the broker holds until a signer answers.
    pub init_timeout: Duration,
    /// Deadline of `--version` and of the broker's exit at shutdown.
    pub process_timeout: Duration,
    /// The broker's stdout/stderr.
    pub output: BrokerOutput,
    /// Client fd reception.
    pub fd_passing: FdPassing,
}

impl Default for SpawnOptions {
    fn default() -> Self {
        SpawnOptions {
            expected_version: CLN_VERSION.to_string(),
            call_timeout: Duration::from_secs(30),
            init_timeout: Duration::from_secs(60),
            process_timeout: Duration::from_secs(10),
            output: BrokerOutput::Inherit,
            fd_passing: FdPassing::Strict,
        }
    }
}

impl BrokerOutput {
    fn stdio_pair(&self) -> Result<(Stdio, Stdio)> {
        Ok(match self {
            BrokerOutput::Inherit => (Stdio::inherit(), Stdio::inherit()),
            BrokerOutput::Null => (Stdio::null(), Stdio::null()),
            BrokerOutput::File(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(io_err(format!("opening broker log {}", p.display())))?;
                let g = f.try_clone().map_err(io_err("dup broker log"))?;
                (Stdio::from(f), Stdio::from(g))
            }
        })
    }
}

/// A child process with a pidfd: race-free bounded waits and kills.
struct Proc {
    child: Child,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
}

impl Proc {
    fn new(child: Child) -> Result<Proc> {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        if fd < 0 {
            return Err(Error::Io { what: "pidfd_open".into(), source: io::Error::last_os_error() });
        }
        // SAFETY: `fd` is a fresh fd we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(Proc { child, pidfd, status: None })
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io { what: "poll(pidfd)".into(), source: e });
            }
            if r == 0 {
                return Ok(None);
            }
            let s = self.child.wait().map_err(io_err("waitpid"))?;
            self.status = Some(s);
            return Ok(Some(s));
        }
    }

    /// SIGKILL through the pidfd (cannot hit a recycled pid), then reap.
    fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        // SAFETY: pidfd_send_signal(2) with our pidfd, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(Error::Io { what: "pidfd_send_signal".into(), source: e });
            }
        }
        let s = self.child.wait().map_err(io_err("waitpid"))?;
        self.status = Some(s);
        Ok(s)
    }
}

/// Human form of an exit status.
pub fn describe_status(s: &ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{s}"),
    }
}

/// Runs `broker --version` as lightningd does and checks its output.
pub fn check_version(broker: &Path, expected: &str, timeout: Duration) -> Result<()> {
    check_version_env(broker, std::iter::empty::<(OsString, OsString)>(), expected, timeout)
}

/// [`check_version`] with extra environment (lightningd runs `--version` and the hsmd with the
/// same environment).
pub fn check_version_env<E, K, V>(broker: &Path, envs: E, expected: &str, timeout: Duration) -> Result<()>
where
    E: IntoIterator<Item = (K, V)>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    // lightningd: pipecmd(&outfd, NULL, &outfd, path, "--version") — stdout and stderr on one pipe.
    let (mut ours, theirs) = UnixStream::pair().map_err(io_err("socketpair"))?;
    let theirs2 = theirs.try_clone().map_err(io_err("dup"))?;
    let child = Command::new(broker)
        .arg("--version")
        .envs(envs)
        .stdin(Stdio::null())
        .stdout(Stdio::from(OwnedFd::from(theirs)))
        .stderr(Stdio::from(OwnedFd::from(theirs2)))
        .spawn()
        .map_err(io_err(format!("running {} --version", broker.display())))?;
    let mut proc = Proc::new(child)?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = proc.kill();
            return Err(Error::Timeout { what: format!("{} --version", broker.display()), after: timeout });
        }
        ours.set_read_timeout(Some(left)).map_err(io_err("SO_RCVTIMEO"))?;
        match ours.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if out.len() < 65536 => out.extend_from_slice(&buf[..n]),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(Error::Io { what: "reading --version output".into(), source: e }),
        }
    }
    let status = match proc.wait_timeout(deadline.saturating_duration_since(Instant::now()))? {
        Some(s) => s,
        None => {
            let _ = proc.kill();
            return Err(Error::Timeout { what: format!("{} --version to exit", broker.display()), after: timeout });
        }
    };
    let output = String::from_utf8_lossy(&out).into_owned();
    if !status.success() {
        return Err(Error::VersionFailed { broker: broker.into(), status: describe_status(&status), output });
    }
    if out != format!("{expected}\n").as_bytes() {
        return Err(Error::BadVersion { broker: broker.into(), expected: expected.into(), got: output });
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// A framed, synchronous hsmd connection with deadlines.
struct Conn {
    stream: UnixStream,
    poisoned: Option<String>,
}

impl Conn {
    fn check(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(Error::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    fn poison<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.poisoned = Some(e.to_string());
        }
        r
    }

    fn write_msg(&mut self, msg: &[u8], deadline: Instant, what: &str) -> Result<()> {
        self.check()?;
        let r = write_all_deadline(&mut self.stream, &hsmd::frame(msg), deadline, what);
        self.poison(r)
    }

    /// Reads exactly `buf.len()` bytes with recvmsg, collecting any fds that arrive with them.
    fn read_exact(&mut self, buf: &mut [u8], deadline: Instant, what: &str, fds: &mut Vec<OwnedFd>) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            let n = recv_with_fds(&self.stream, &mut buf[got..], deadline, what, fds)?;
            if n == 0 {
                return Err(Error::Closed { what: what.into(), exit: None });
            }
            got += n;
        }
        Ok(())
    }

    /// Reads one framed message; fds that came with its bytes are returned too.
    fn read_msg_fds(&mut self, deadline: Instant, what: &str) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        self.check()?;
        let mut fds = Vec::new();
        let r = (|| {
            let mut prefix = [0u8; 4];
            self.read_exact(&mut prefix, deadline, what, &mut fds)?;
            let len = hsmd::frame_len(prefix).map_err(|e| Error::Protocol(format!("{what}: {e}")))?;
            let mut msg = vec![0u8; len];
            self.read_exact(&mut msg, deadline, what, &mut fds)?;
            Ok(msg)
        })();
        let msg = self.poison(r)?;
        Ok((msg, fds))
    }

    fn read_msg(&mut self, deadline: Instant, what: &str) -> Result<Vec<u8>> {
        let (msg, fds) = self.read_msg_fds(deadline, what)?;
        if !fds.is_empty() {
            let e = Error::Protocol(format!("{what}: {} unexpected fd(s) arrived with the reply", fds.len()));
            return self.poison(Err(e));
        }
        Ok(msg)
    }

    fn call(&mut self, msg: &[u8], timeout: Duration, what: &str) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        self.write_msg(msg, deadline, what)?;
        self.read_msg(deadline, what)
    }
}

fn with_deadline(stream: &UnixStream, deadline: Instant, what: &str, timeout_total: Duration) -> Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Timeout { what: what.into(), after: timeout_total });
    }
    stream.set_read_timeout(Some(left)).map_err(io_err("SO_RCVTIMEO"))?;
    stream.set_write_timeout(Some(left)).map_err(io_err("SO_SNDTIMEO"))?;
    Ok(())
}

fn write_all_deadline(stream: &mut UnixStream, mut buf: &[u8], deadline: Instant, what: &str) -> Result<()> {
    let start = Instant::now();
    while !buf.is_empty() {
        with_deadline(stream, deadline, what, deadline - start)?;
        match stream.write(buf) {
            Ok(0) => return Err(Error::Closed { what: what.into(), exit: None }),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {
                return Err(Error::Closed { what: what.into(), exit: None })
            }
            Err(e) => return Err(Error::Io { what: what.into(), source: e }),
        }
    }
    Ok(())
}

/// One recvmsg of up to `buf.len()` bytes before `deadline`; fds received are appended to `fds`
/// (with `MSG_CMSG_CLOEXEC`, so they never leak into a later broker).
fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    deadline: Instant,
    what: &str,
    fds: &mut Vec<OwnedFd>,
) -> Result<usize> {
    let start = Instant::now();
    loop {
        with_deadline(stream, deadline, what, deadline.saturating_duration_since(start))?;
        let mut cmsg = nix::cmsg_space!([RawFd; 8]);
        let mut iov = [IoSliceMut::new(buf)];
        let r = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC);
        match r {
            Ok(m) => {
                let truncated = m.flags.contains(MsgFlags::MSG_CTRUNC);
                if let Ok(cmsgs) = m.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(rfds) = c {
                            for fd in rfds {
                                // SAFETY: the kernel just installed this fd for us.
                                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                    }
                }
                if truncated {
                    return Err(Error::Protocol(format!("{what}: control data truncated (too many fds)")));
                }
                return Ok(m.bytes);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                if Instant::now() >= deadline {
                    return Err(Error::Timeout { what: what.into(), after: deadline.saturating_duration_since(start) });
                }
            }
            Err(nix::errno::Errno::ECONNRESET) => return Ok(0),
            Err(e) => return Err(Error::Io { what: what.into(), source: e.into() }),
        }
    }
}

/// Messages the broker wrote on its status socket (fd 0), drained by a thread.
#[derive(Clone, Debug, Default)]
pub struct StatusLog {
    /// Number of framed messages read.
    pub count: usize,
    /// Their types (first 10,000).
    pub types: Vec<u16>,
    /// Set if the stream was not valid framing.
    pub error: Option<String>,
    /// The messages themselves (type + body, first 1,000), to check their content.
    pub frames: Vec<Vec<u8>>,
    /// The stream ended (EOF or a read error): every message the broker wrote is counted.
    pub ended: bool,
}

fn drain_status(s: UnixStream, log: Arc<Mutex<StatusLog>>, cv: Arc<Condvar>) {
    drain_status_frames(s, &log, &cv);
    log.lock().unwrap_or_else(|p| p.into_inner()).ended = true;
    cv.notify_all();
}

fn drain_status_frames(mut s: UnixStream, log: &Mutex<StatusLog>, cv: &Condvar) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        // Parse complete frames.
        loop {
            if buf.len() < 4 {
                break;
            }
            let len = match hsmd::frame_len([buf[0], buf[1], buf[2], buf[3]]) {
                Ok(l) => l,
                Err(e) => {
                    // Keep draining so the broker never blocks, but stop parsing.
                    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                    l.error.get_or_insert_with(|| e.to_string());
                    buf.clear();
                    break;
                }
            };
            if buf.len() < 4 + len {
                break;
            }
            let t = u16::from_be_bytes([buf[4], buf[5]]);
            {
                let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                l.count += 1;
                if l.types.len() < 10_000 {
                    l.types.push(t);
                }
                if l.frames.len() < 1_000 {
                    l.frames.push(buf[4..4 + len].to_vec());
                }
            }
            cv.notify_all();
            buf.drain(..4 + len);
        }
    }
}

/// A client connection created by `hsmd_client_hsmfd` (what channeld, openingd, … hold).
pub struct ClientConn {
    conn: Conn,
    ctx: ClientContext,
    timeout: Duration,
}

impl std::fmt::Debug for ClientConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConn").field("ctx", &self.ctx).field("fd", &self.conn.stream.as_raw_fd()).finish()
    }
}

impl ClientConn {
    /// Sends a request and waits (bounded) for its reply.
    pub fn call(&mut self, msg: &[u8]) -> Result<Vec<u8>> {
        self.call_timeout(msg, self.timeout)
    }

    /// Sends a request with its own deadline.
    pub fn call_timeout(&mut self, msg: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let what = format!("reply to type {} on client dbid {}", type_of(msg), self.ctx.dbid);
        self.conn.call(msg, timeout, &what)
    }

    /// Sends a request without waiting for its reply (a subdaemon that dies mid-request);
    /// [`recv`](Self::recv) reads the reply.
    pub fn send(&mut self, msg: &[u8]) -> Result<()> {
        let what = format!("sending type {} on client dbid {}", type_of(msg), self.ctx.dbid);
        self.conn.write_msg(msg, Instant::now() + self.timeout, &what)
    }

    /// Reads one reply with its own deadline (after [`send`](Self::send)).
    pub fn recv(&mut self, timeout: Duration) -> Result<Vec<u8>> {
        let what = format!("reply on client dbid {}", self.ctx.dbid);
        self.conn.read_msg(Instant::now() + timeout, &what)
    }

    /// The context given in the 9 request.
    pub fn ctx(&self) -> &ClientContext {
        &self.ctx
    }

    /// Sets the per-call deadline.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }
}

fn type_of(msg: &[u8]) -> String {
    hsmd::msg_type(msg).map(|t| t.to_string()).unwrap_or_else(|_| "?".into())
}

/// `hsmd_client_hsmfd` (9) for a context.
pub fn client_hsmfd_request(ctx: &ClientContext) -> Vec<u8> {
    let mut m = hsmd::CLIENT_HSMFD.to_be_bytes().to_vec();
    m.extend_from_slice(&ctx.peer_id);
    m.extend_from_slice(&ctx.dbid.to_be_bytes());
    m.extend_from_slice(&ctx.permissions.to_be_bytes());
    m
}

/// lightningd with a running broker as its hsmd.
pub struct FakeLightningd {
    proc: Proc,
    root: Conn,
    status: Arc<Mutex<StatusLog>>,
    /// Notified after each status message is logged.
    status_cv: Arc<Condvar>,
    status_thread: Option<JoinHandle<()>>,
    opts: SpawnOptions,
    broker: PathBuf,
}

impl std::fmt::Debug for FakeLightningd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeLightningd").field("broker", &self.broker).field("pid", &self.proc.child.id()).finish()
    }
}

impl FakeLightningd {
    /// `--version` check, then spawn with default [`SpawnOptions`].
    pub fn spawn<I, S, E, K, V>(broker: impl AsRef<Path>, args: I, envs: E) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        Self::spawn_with(broker, args, envs, SpawnOptions::default())
    }

    /// `--version` check, then spawn the broker as lightningd spawns its hsmd.
    pub fn spawn_with<I, S, E, K, V>(broker: impl AsRef<Path>, args: I, envs: E, opts: SpawnOptions) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let broker = broker.as_ref().to_path_buf();
        let envs: Vec<(OsString, OsString)> =
            envs.into_iter().map(|(k, v)| (k.as_ref().to_os_string(), v.as_ref().to_os_string())).collect();
        check_version_env(&broker, envs.iter().cloned(), &opts.expected_version, opts.process_timeout)?;

        let (status_ours, status_theirs) = UnixStream::pair().map_err(io_err("socketpair (status)"))?;
        let (hsm_ours, hsm_theirs) = UnixStream::pair().map_err(io_err("socketpair (hsm)"))?;
        // Move the child's hsm end to fd >= 10 (still close-on-exec), so that dup2 onto 3 in the
        // child can never be a no-op that would leave fd 3 close-on-exec.
        // SAFETY: F_DUPFD_CLOEXEC returns a new fd or -1.
        let high = unsafe { libc::fcntl(hsm_theirs.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
        if high < 0 {
            return Err(Error::Io { what: "F_DUPFD_CLOEXEC".into(), source: io::Error::last_os_error() });
        }
        // SAFETY: fresh fd we own.
        let hsm_child_fd = unsafe { OwnedFd::from_raw_fd(high) };
        drop(hsm_theirs);
        let raw = hsm_child_fd.as_raw_fd();

        let (out, err) = opts.output.stdio_pair()?;
        let child = {
            let mut cmd = Command::new(&broker);
            cmd.args(args).envs(envs).stdin(Stdio::from(OwnedFd::from(status_theirs))).stdout(out).stderr(err);
            // SAFETY: runs in the forked child before exec; only async-signal-safe syscalls.
            // std has already put the status socket on fd 0 and stdout/stderr on 1/2.
            unsafe {
                cmd.pre_exec(move || {
                    // lightningd closes every fd above its last one: mark all inherited fds >= 3
                    // close-on-exec (CLOSE_RANGE_CLOEXEC, Linux >= 5.11; harmless if unsupported,
                    // std opens everything with O_CLOEXEC anyway).
                    libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
                    // The request socket on fd 3; dup2's copy is not close-on-exec.
                    if libc::dup2(raw, 3) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            cmd.spawn().map_err(io_err(format!("spawning {}", broker.display())))?
            // `cmd` drops here, closing our copies of the child's status end.
        };
        drop(hsm_child_fd);
        let proc = Proc::new(child)?;

        let status = Arc::new(Mutex::new(StatusLog::default()));
        let s2 = status.clone();
        let status_cv = Arc::new(Condvar::new());
        let cv2 = status_cv.clone();
        let status_thread = std::thread::Builder::new()
            .name("status-drain".into())
            .spawn(move || drain_status(status_ours, s2, cv2))
            .map_err(io_err("spawning status thread"))?;

        Ok(FakeLightningd {
            proc,
            root: Conn { stream: hsm_ours, poisoned: None },
            status,
            status_cv,
            status_thread: Some(status_thread),
            opts,
            broker,
        })
    }

    /// The broker's pid.
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// The options in force.
    pub fn options(&self) -> &SpawnOptions {
        &self.opts
    }

    /// What the broker wrote on its status socket so far.
    pub fn status_log(&self) -> StatusLog {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The status log as the drain thread fills it, to read after [`FakeLightningd::shutdown`]
    /// or [`FakeLightningd::kill`] (which wait for the stream's end).
    pub fn status_shared(&self) -> Arc<Mutex<StatusLog>> {
        self.status.clone()
    }

    /// Waits (bounded) until at least `count` status messages have been read; the log then, or
    /// `None` at the deadline. (The drain thread reads fd 0 on its own, so a message the broker
    /// wrote before closing a client may still be in flight when the client sees EOF.)
    pub fn wait_status(&self, count: usize, timeout: Duration) -> Option<StatusLog> {
        let deadline = Instant::now() + timeout;
        let mut g = self.status.lock().unwrap_or_else(|p| p.into_inner());
        while g.count < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = self.status_cv.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        Some(g.clone())
    }

    /// Adds the broker's exit status to a `Closed` error if it has exited (waits up to 1 s).
    fn enrich(&mut self, e: Error) -> Error {
        match e {
            Error::Closed { what, exit: None } => {
                let exit = self.proc.wait_timeout(Duration::from_secs(1)).ok().flatten().map(|s| describe_status(&s));
                Error::Closed { what, exit }
            }
            e => e,
        }
    }

    /// Synchronous request on fd 3 (deadline: `init_timeout` for `hsmd_init`, else `call_timeout`).
    pub fn root_call(&mut self, msg: &[u8]) -> Result<Vec<u8>> {
        let t = if hsmd::msg_type(msg).ok() == Some(hsmd::HSMD_INIT) {
            self.opts.init_timeout
        } else {
            self.opts.call_timeout
        };
        self.root_call_timeout(msg, t)
    }

    /// Synchronous request on fd 3 with its own deadline.
    pub fn root_call_timeout(&mut self, msg: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let what = format!("reply to type {} on root", type_of(msg));
        let r = self.root.call(msg, timeout, &what);
        r.map_err(|e| self.enrich(e))
    }

    /// Sends a message that gets no reply (`hsmd_dev_preinit`, 99).
    pub fn send_no_reply(&mut self, msg: &[u8]) -> Result<()> {
        let deadline = Instant::now() + self.opts.call_timeout;
        let r = self.root.write_msg(msg, deadline, &format!("sending type {} on root", type_of(msg)));
        r.map_err(|e| self.enrich(e))
    }

    /// `hsmd_client_hsmfd` (9) for `ctx` → 109 + fd → a client connection.
    pub fn new_client(&mut self, ctx: &ClientContext) -> Result<ClientConn> {
        self.new_client_raw(&client_hsmfd_request(ctx))
    }

    /// As [`new_client`](Self::new_client) with the exact 9 request bytes (e.g. from a trace).
    pub fn new_client_raw(&mut self, request: &[u8]) -> Result<ClientConn> {
        let ctx = hsmd::parse_client_hsmfd(request).map_err(|e| Error::Protocol(format!("bad 9 request: {e}")))?;
        let r = self.client_hsmfd_inner(request);
        let fd = r.map_err(|e| self.enrich(e))?;
        let stream = UnixStream::from(fd);
        Ok(ClientConn { conn: Conn { stream, poisoned: None }, ctx, timeout: self.opts.call_timeout })
    }

    fn client_hsmfd_inner(&mut self, request: &[u8]) -> Result<OwnedFd> {
        let deadline = Instant::now() + self.opts.call_timeout;
        let what = "hsmd_client_hsmfd_reply (109)";
        self.root.write_msg(request, deadline, what)?;
        let (reply, mut fds) = self.root.read_msg_fds(deadline, what)?;
        if reply != hsmd::client_hsmfd_reply() {
            let e = Error::Protocol(format!("expected 109 reply 006d, got {}", hex::encode(&reply)));
            return self.root.poison(Err(e));
        }
        if !fds.is_empty() {
            if self.opts.fd_passing == FdPassing::Strict {
                let e = Error::Protocol(
                    "the client fd arrived attached to the 109 reply bytes; lightningd reads the reply with \
                     read(2), which discards it, and then hangs in fdpass_recv: send the fd in its own \
                     1-byte message after the reply (ccan fdpass_send)"
                        .into(),
                );
                return self.root.poison(Err(e));
            }
        } else {
            // fdpass_recv: recvmsg of exactly one byte with SCM_RIGHTS.
            let mut one = [0u8; 1];
            let r = (|| {
                let n = recv_with_fds(&self.root.stream, &mut one, deadline, "client fd after 109", &mut fds)?;
                if n == 0 {
                    return Err(Error::Closed { what: "client fd after 109".into(), exit: None });
                }
                Ok(())
            })();
            self.root.poison(r)?;
        }
        if fds.len() != 1 {
            let e = Error::Protocol(format!("expected exactly 1 fd after 109, got {}", fds.len()));
            return self.root.poison(Err(e));
        }
        Ok(fds.pop().expect("one fd"))
    }

    /// Non-blocking: the broker's exit status if it has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.proc.wait_timeout(Duration::ZERO).ok().flatten()
    }

    /// Clean shutdown as lightningd's: close fd 3 and wait (bounded) for the broker to exit by
    /// itself. On timeout it is killed and [`Error::Timeout`] is returned.
    pub fn shutdown(mut self) -> Result<ExitStatus> {
        // Replace the root stream by a dummy closed one: dropping the real one closes fd 3's peer.
        let _ = self.root.stream.shutdown(std::net::Shutdown::Both);
        let (dummy, _) = UnixStream::pair().map_err(io_err("socketpair"))?;
        drop(std::mem::replace(&mut self.root.stream, dummy));
        let t = self.opts.process_timeout;
        let st = match self.proc.wait_timeout(t)? {
            Some(s) => s,
            None => {
                let _ = self.proc.kill();
                return Err(Error::Timeout {
                    what: format!("{} to exit after fd 3 was closed", self.broker.display()),
                    after: t,
                });
            }
        };
        self.join_status();
        Ok(st)
    }

    /// Kills the broker (SIGKILL) and reaps it.
    pub fn kill(mut self) -> Result<ExitStatus> {
        let s = self.proc.kill()?;
        self.join_status();
        Ok(s)
    }

    fn join_status(&mut self) {
        // The status thread ends at EOF on fd 0, i.e. when the broker (and anything that inherited
        // its fd 0) is gone: wait for that (bounded), so that the log holds every message the
        // exited broker wrote; don't join a thread that is still reading.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut g = self.status.lock().unwrap_or_else(|p| p.into_inner());
        while !g.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self.status_cv.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        drop(g);
        if let Some(h) = self.status_thread.take() {
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for FakeLightningd {
    fn drop(&mut self) {
        if self.proc.status.is_none() {
            let _ = self.proc.kill();
        }
    }
}

/// Passes `fd` over `sock` as CLN's hsmd does (ccan `fdpass_send`): one zero byte with SCM_RIGHTS.
/// Used by the test hsmd.
pub fn fdpass_send(sock: &impl AsRawFd, fd: &impl AsRawFd) -> io::Result<()> {
    let fds = [fd.as_raw_fd()];
    let cm = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(&[0u8])];
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cm, MsgFlags::empty(), None) {
            Ok(1) => return Ok(()),
            Ok(n) => return Err(io::Error::other(format!("sendmsg wrote {n} bytes"))),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends `bytes` with `fd` attached to them in one sendmsg (what lightningd would NOT accept).
/// Used by the test hsmd to exercise [`FdPassing`].
pub fn send_with_fd(sock: &impl AsRawFd, bytes: &[u8], fd: &impl AsRawFd) -> io::Result<()> {
    let fds = [fd.as_raw_fd()];
    let cm = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(bytes)];
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, &cm, MsgFlags::empty(), None)?;
    if n != bytes.len() {
        return Err(io::Error::other("short sendmsg"));
    }
    Ok(())
}

/// Arguments lightningd may pass, as `OsString`s (convenience for callers).
pub fn os_args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(args: I) -> Vec<OsString> {
    args.into_iter().map(|a| a.as_ref().to_os_string()).collect()
}
