//! Wire formats of sphinx-key, in one place and without I/O.
//!
//! - [`hsmd`]: Core Lightning's hsmd framing and the few message bodies the broker reads itself.
//! - [`serial`]: the request/reply headers that carry an hsmd message to the signer
//!   (`0xAA55`/`0x5AA5`, compatible with upstream sphinx-key and `vls_protocol::msgs::SerialRequestHeader`).
//! - [`topics`]: MQTT topic names.
//! - [`token`]: the MQTT login token (node key signature over a timestamp).
//! - [`control`]: the owner's signed control messages and the device's signed responses.
//! - [`error_report`]: the signer's `{id}/error` report of a refused request.
//! - [`lss`]: the LSS backup messages of the init dance and of each request (upstream `lss-connector`).
//!
//! Every parser here takes untrusted bytes and returns an error, never panics. The only thing
//! here that looks outside is [`unix_now`], the clock tokens and reports are dated by.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod control;
pub mod error_report;
pub mod hsmd;
pub mod lss;
pub mod serial;
pub mod token;
pub mod topics;

/// Seconds since the Unix epoch by the system clock (0 if the clock is set before 1970): the time
/// login tokens carry and the broker dates events with.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Length of a compressed secp256k1 public key (a node id).
pub const PUBKEY_LEN: usize = 33;

/// Where a request came from: lightningd's root connection or a per-daemon client connection.
///
/// This is what `hsmd_client_hsmfd` (9) says about a client: the peer it serves, the channel
/// dbid, and the permission bits (`hsmd/permissions.h`). The root connection has a zero peer id
/// and dbid 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientContext {
    /// Peer node id, or 33 zero bytes for the root connection.
    pub peer_id: [u8; PUBKEY_LEN],
    /// Channel database id (0 for the root and for global daemons).
    pub dbid: u64,
    /// `HSM_PERM_*` bits granted to the client.
    pub permissions: u64,
}

impl ClientContext {
    /// The context of lightningd's own connection (fd 3): no peer, dbid 0, the stock master permissions.
    pub const ROOT: ClientContext = ClientContext { peer_id: [0u8; PUBKEY_LEN], dbid: 0, permissions: 1027 };

    /// True for lightningd's root connection (and for global daemons with dbid 0, which VLS serves with the root handler).
    pub fn is_root(&self) -> bool {
        self.dbid == 0
    }
}
