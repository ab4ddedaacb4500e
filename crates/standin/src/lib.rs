//! Test stand-ins for what cannot be installed here (see `docs/standin.md`):
//!
//! - [`trace`]: the recorded CLN hsmd traces, parsed and paired.
//! - [`lightningd`]: [`lightningd::FakeLightningd`], which runs the broker exactly as lightningd runs
//!   its hsmd (`--version` check, fd 0 status socket, fd 3 request socket, `SCM_RIGHTS` client fds).
//! - [`replay`]: replays a trace end to end and in process (the oracle), and compares.
#![warn(missing_docs)]

pub mod harness;
pub mod lightningd;
pub mod replay;
pub mod trace;
