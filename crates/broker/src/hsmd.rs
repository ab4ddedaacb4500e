//! The broker's face towards lightningd (the drawing's "CLN CLIENT"): CLN's hsmd wire protocol
//! on fd 3 and on one socketpair per subdaemon. Requests go to the signer through
//! [`crate::relay`], which runs the signer loop.
//!
//! lightningd starts its hsmd with fd 0 as the status socket and fd 3 as the request socket.
//! The root connection (fd 3) carries lightningd's own requests; every `hsmd_client_hsmfd` (9)
//! creates a new socketpair whose far end is passed back with SCM_RIGHTS, one per subdaemon,
//! each served concurrently with its own context. Each connection has at most one request in
//! flight, as CLN's own hsmd serves them.
//!
//! Failures follow CLN's `hsmd/hsmd.c`: a refused client request is reported to lightningd on
//! the status socket (`hsmstatus_client_bad_request`) and that client's connection is closed;
//! a failed root request is fatal (CLN's `master_badmsg`), so lightningd never waits on a dead
//! request.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;

use bitcoin::Network;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use sphinx_wire::{hsmd, ClientContext};
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tracing::{debug, error, info, warn};

use crate::init::{self, InitError, WrongChain};
use crate::relay::{RelayError, RelayHandle};
use sphinx_wire::hsmd::ClnRelease;

/// `hsmstatus_client_bad_request` (common `hsmd_wire.csv`), sent to lightningd on the status socket.
const HSMSTATUS_CLIENT_BAD_REQUEST: u16 = 1000;

/// Why the root connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum HsmdError {
    /// Socket I/O failed.
    #[error("lightningd socket: {0}")]
    Io(#[from] std::io::Error),
    /// lightningd sent something that is not an hsmd message.
    #[error("bad message from lightningd: {0}")]
    Wire(#[from] hsmd::Error),
    /// `hsmd_init` is for another chain than the broker's.
    #[error(transparent)]
    WrongChain(#[from] WrongChain),
    /// `hsmd_init` cannot be served by a remote signer (passphrase, unknown TLV, version).
    #[error(transparent)]
    Init(InitError),
    /// lightningd sent a request its own release does not define (`cln_version`).
    #[error("request type {msg_type} does not exist in the hsmd protocol of CLN {release:?} (cln_version); refused")]
    NotInRelease {
        /// Request type.
        msg_type: u16,
        /// The configured release.
        release: ClnRelease,
    },
    /// A root request failed; CLN's hsmd treats this as fatal.
    #[error("root request type {msg_type} failed: {error}")]
    RootRequest {
        /// Request type.
        msg_type: u16,
        /// Cause.
        error: RelayError,
    },
}

impl From<InitError> for HsmdError {
    fn from(e: InitError) -> Self {
        match e {
            InitError::Wire(e) => HsmdError::Wire(e),
            InitError::WrongChain(e) => HsmdError::WrongChain(e),
            e => HsmdError::Init(e),
        }
    }
}

/// Serves lightningd until it closes the root connection (Ok) or a fatal error.
pub struct HsmdServer {
    relay: RelayHandle,
    network: Network,
    release: ClnRelease,
    status: Option<Arc<Mutex<UnixStream>>>,
    log_io: bool,
    /// Set once a signer has answered lightningd's `hsmd_init` (chain following starts then).
    init_done: tokio::sync::watch::Sender<bool>,
}

impl HsmdServer {
    /// `status` is fd 0 when it is a socket (it is under lightningd); `release` is the CLN
    /// release lightningd is (from `cln_version`): requests it does not define are refused.
    pub fn new(
        relay: RelayHandle,
        network: Network,
        release: ClnRelease,
        status: Option<StdUnixStream>,
        log_io: bool,
    ) -> std::io::Result<Self> {
        let status = match status {
            Some(s) => {
                s.set_nonblocking(true)?;
                Some(Arc::new(Mutex::new(UnixStream::from_std(s)?)))
            }
            None => None,
        };
        let (init_done, _) = tokio::sync::watch::channel(false);
        Ok(HsmdServer { relay, network, release, status, log_io, init_done })
    }

    /// Becomes `true` once a signer has answered lightningd's `hsmd_init` (step 4 of
    /// [`crate::init`]: chain following starts then).
    pub fn init_done(&self) -> tokio::sync::watch::Receiver<bool> {
        self.init_done.subscribe()
    }

    /// Serves the root connection (fd 3).
    pub async fn serve_root(self: Arc<Self>, root: StdUnixStream) -> Result<(), HsmdError> {
        root.set_nonblocking(true)?;
        let mut root = UnixStream::from_std(root)?;
        let mut clients = 0u64;
        loop {
            let Some(msg) = read_msg(&mut root).await? else {
                info!("lightningd closed the hsmd connection; exiting");
                return Ok(());
            };
            let msg_type = hsmd::msg_type(&msg)?;
            if self.log_io {
                debug!(conn = 0, msg_type, hex = %hex::encode(&msg), "request");
            }
            match msg_type {
                hsmd::DEV_PREINIT => {
                    // Developer-mode presets (dev allowlist, fixed keys) are not for a remote signer; CLN expects no reply.
                    info!("hsmd_dev_preinit received (developer mode); nothing to preset on a remote signer");
                }
                hsmd::CLIENT_HSMFD => {
                    let ctx = hsmd::parse_client_hsmfd(&msg)?;
                    clients += 1;
                    let (ours, theirs) = StdUnixStream::pair()?;
                    write_msg(&mut root, &hsmd::client_hsmfd_reply()).await?;
                    send_fd(&root, theirs.as_raw_fd()).await?;
                    drop(theirs);
                    info!(client = clients, peer = %hex::encode(ctx.peer_id), dbid = ctx.dbid, permissions = ctx.permissions, "new client connection");
                    ours.set_nonblocking(true)?;
                    let stream = UnixStream::from_std(ours)?;
                    tokio::spawn(self.clone().serve_client(stream, ctx, clients));
                }
                hsmd::DEV_MEMLEAK => write_msg(&mut root, &hsmd::memleak_reply()).await?,
                t if !self.release.defines(t) => {
                    return Err(HsmdError::NotInRelease { msg_type: t, release: self.release });
                }
                _ => {
                    let mut msg = msg;
                    let mut versions = None;
                    if msg_type == hsmd::HSMD_INIT {
                        let checked = init::check_init(&msg, self.network)?;
                        versions = Some(checked.versions);
                        msg = checked.message;
                        info!("hsmd_init from lightningd; waiting for the signer's answer");
                    }
                    // lightningd waits for this reply; if it dies meanwhile, so do we (CLN's hsmd
                    // would see the closed socket too) instead of waiting out the request bound.
                    let reply = tokio::select! {
                        r = self.relay.call(ClientContext::ROOT, msg) => {
                            r.map_err(|error| HsmdError::RootRequest { msg_type, error })?
                        }
                        gone = peer_closed(&root) => {
                            gone?;
                            info!(msg_type, "lightningd closed the hsmd connection while its request was pending; exiting");
                            return Ok(());
                        }
                    };
                    if let Some(versions) = versions {
                        init::check_reply_version(versions, &reply)?;
                    }
                    write_msg(&mut root, &reply).await?;
                    if msg_type == hsmd::HSMD_INIT {
                        info!("signer answered hsmd_init");
                        self.init_done.send_replace(true);
                    }
                }
            }
        }
    }

    async fn serve_client(self: Arc<Self>, mut stream: UnixStream, ctx: ClientContext, client: u64) {
        loop {
            // `Bytes`: the relay shares it (for the refusal report below), nothing copies it.
            let msg: bytes::Bytes = match read_msg(&mut stream).await {
                Ok(Some(m)) => m.into(),
                Ok(None) => {
                    debug!(client, "client connection closed");
                    return;
                }
                Err(e) => {
                    warn!(client, error = %e, "client connection failed; closing it");
                    return;
                }
            };
            let msg_type = hsmd::msg_type(&msg).unwrap_or(0);
            if self.log_io {
                debug!(conn = client, msg_type, hex = %hex::encode(&msg), "request");
            }
            let result = match msg_type {
                hsmd::DEV_MEMLEAK => Ok(hsmd::memleak_reply().into()),
                hsmd::CLIENT_HSMFD | hsmd::HSMD_INIT | hsmd::DEV_PREINIT => Err(RelayError::Refused(format!(
                    "message type {msg_type} is only valid on lightningd's connection"
                ))),
                t if !self.release.defines(t) => Err(RelayError::Refused(format!(
                    "message type {t} does not exist in the hsmd protocol of CLN {:?} (cln_version)",
                    self.release
                ))),
                _ => self.relay.call(ctx, msg.clone()).await,
            };
            match result {
                Ok(reply) => {
                    if let Err(e) = write_msg(&mut stream, &reply).await {
                        warn!(client, error = %e, "cannot write reply; closing client");
                        return;
                    }
                }
                Err(e) => {
                    error!(client, peer = %hex::encode(ctx.peer_id), dbid = ctx.dbid, msg_type, error = %e, "bad request; closing this client connection as CLN's hsmd does");
                    self.report_bad_request(&ctx, &e.to_string(), &msg).await;
                    return;
                }
            }
        }
    }

    /// Tells lightningd about a refused client request, as CLN's hsmd does.
    async fn report_bad_request(&self, ctx: &ClientContext, description: &str, msg: &[u8]) {
        let Some(status) = &self.status else { return };
        let mut m = HSMSTATUS_CLIENT_BAD_REQUEST.to_be_bytes().to_vec();
        m.extend_from_slice(&ctx.peer_id);
        // wirestring: NUL-terminated.
        m.extend_from_slice(description.replace('\0', " ").as_bytes());
        m.push(0);
        let len = msg.len().min(u16::MAX as usize);
        m.extend_from_slice(&(len as u16).to_be_bytes());
        m.extend_from_slice(&msg[..len]);
        let mut s = status.lock().await;
        if let Err(e) = write_msg(&mut s, &m).await {
            warn!(error = %e, "cannot report bad request on the status socket");
        }
    }
}

/// Resolves once the peer has closed `s` (EOF), consuming nothing. If the peer sends data
/// instead (lightningd never writes while its request is pending), it stays pending: that data is
/// read as the next message.
async fn peer_closed(s: &UnixStream) -> std::io::Result<()> {
    loop {
        s.readable().await?;
        let mut byte = [0u8; 1];
        let r = s.try_io(Interest::READABLE, || {
            nix::sys::socket::recv(s.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK).map_err(std::io::Error::from)
        });
        match r {
            Ok(0) => return Ok(()),
            Ok(_) => std::future::pending::<()>().await,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads one length-prefixed message; `None` on a clean EOF before a message.
pub async fn read_msg(s: &mut UnixStream) -> Result<Option<Vec<u8>>, HsmdError> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = hsmd::frame_len(len)?;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Writes one length-prefixed message: prefix and message in one vectored write (one syscall,
/// no copy of the message into a framed buffer).
pub async fn write_msg(s: &mut UnixStream, msg: &[u8]) -> std::io::Result<()> {
    let len = hsmd::length_prefix(msg);
    let mut bufs = [IoSlice::new(&len), IoSlice::new(msg)];
    let mut bufs: &mut [IoSlice<'_>] = &mut bufs;
    while !bufs.is_empty() {
        let n = s.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Passes `fd` over `s` the way ccan's `fdpass_send` does: one zero byte carrying SCM_RIGHTS.
async fn send_fd(s: &UnixStream, fd: RawFd) -> std::io::Result<()> {
    loop {
        s.writable().await?;
        let r = s.try_io(Interest::WRITABLE, || {
            let byte = [0u8];
            let iov = [IoSlice::new(&byte)];
            let fds = [fd];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(std::io::Error::from)
        });
        match r {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message larger than the socket buffer is written in several vectored writes (the
    /// partial-write path of `write_msg`) and read back whole, prefix and all.
    #[tokio::test]
    async fn write_msg_survives_partial_writes() {
        let (mut a, mut b) = UnixStream::pair().expect("socketpair");
        let big: Vec<u8> = (0..3 * 1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
        let small = vec![0u8, 28, 1];
        let sent = (big.clone(), small.clone());
        let writer = tokio::spawn(async move {
            write_msg(&mut a, &sent.0).await.expect("write big");
            write_msg(&mut a, &sent.1).await.expect("write small");
        });
        assert_eq!(read_msg(&mut b).await.expect("read").expect("a message"), big);
        assert_eq!(read_msg(&mut b).await.expect("read").expect("a message"), small);
        writer.await.expect("writer");
    }
}
