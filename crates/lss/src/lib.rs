//! The broker's side of LSS backup (docs/wire.md "LSS", docs/signer.md "LSS").
//!
//! - [`client`]: a client of a Lightning Storage Server (`lssd`, gRPC through VLS's
//!   `lightning-storage-server` crate) with a bounded wait on every call and typed errors; a
//!   version conflict on `Put` is [`LssError::Conflict`].
//! - [`broker`]: what the broker does with a signer, as functions over a [`broker::SignerLink`]
//!   (the MQTT request/answer seam): the init dance on every `hello` and the `Put` of each
//!   request's mutations. The broker only relays HMACs: it holds the auth token, never the
//!   shared secret, so it cannot make or forge them.
//! - [`lssd`]: starts a real `lssd` on loopback in its own directory (tests, demo), stopped on drop.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod broker;
pub mod client;
pub mod lssd;

pub use client::{LssClient, LssError, ServerInfo};
