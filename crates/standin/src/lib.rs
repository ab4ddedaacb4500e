//! Test stand-ins for what cannot be installed here (see `docs/standin.md`):
//!
//! - [`trace`]: the recorded CLN hsmd traces, parsed and paired.
//! - [`lightningd`]: [`lightningd::FakeLightningd`], which runs the broker exactly as lightningd runs
//!   its hsmd (`--version` check, fd 0 status socket, fd 3 request socket, `SCM_RIGHTS` client fds).
//! - [`replay`]: replays a trace end to end, step by step ([`replay::Session`], which owns the
//!   session loop; [`replay::replay`] runs one to the end) and in process (the oracle), and
//!   compares.
//! - `chansim` (feature `oracle`): a counterparty simulator that generates CLN's channel traffic
//!   (open, payments) for channels of any dbid, signed by a simulated peer.
//! - [`harness`]: the whole loop on one machine for tests: a `sphinx-key` signer process, the
//!   broker's environment, a cuttable TCP proxy and the signer's durable state. It knows nothing
//!   of replays ([`replay`] uses it, not the other way round).
#![warn(missing_docs)]

#[cfg(feature = "oracle")]
pub mod chansim;
pub mod harness;
pub mod lightningd;
pub mod replay;
pub mod trace;
