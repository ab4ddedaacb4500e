//! The sphinx-key signing core (hardware-agnostic): VLS handlers over durable redb state.
//! API CONTRACT (filled in by the signer work; other crates code against these signatures):
//!
//! ```ignore
//! pub enum ClockConfig { System, Fixed(u64 /* unix seconds */) }
//! pub struct PolicyConfig { pub permissive: bool, /* … */ }
//! pub struct SignerConfig { pub network: bitcoin::Network, pub policy: PolicyConfig, pub clock: ClockConfig }
//! pub struct Signer;
//! impl Signer {
//!     pub fn open(seed: [u8; 32], state_dir: &std::path::Path, cfg: &SignerConfig) -> Result<Signer, Error>;
//!     pub fn in_memory(seed: [u8; 32], cfg: &SignerConfig) -> Result<Signer, Error>;
//!     pub fn node_id(&self) -> [u8; 33];
//!     pub fn handle(&mut self, req: &sphinx_wire::serial::Request) -> Result<sphinx_wire::serial::Reply, Error>;
//! }
//! ```
