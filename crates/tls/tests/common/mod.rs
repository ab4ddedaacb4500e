//! Test certificates: a temporary directory and self-signed certificates written into it as PEM.
//! Used by this crate's tests (`mod common;`) and, with `#[path]`, by the broker's and the
//! device's TLS tests (`crates/mqtt-server/tests/mqtt_tls.rs`, `crates/sphinx-key/tests/control_e2e.rs`);
//! needs `rcgen` and `sphinx_tls` only.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use sphinx_tls::rustls::pki_types::CertificateDer;
use sphinx_tls::Fingerprint;

/// A fresh directory `{temp}/{prefix}-{pid}-{n}` (removed by [`Dir::drop`]).
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(prefix: &str) -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p =
            std::env::temp_dir().join(format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl AsRef<Path> for Dir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, written as `{name}.crt` and
/// `{name}.key`.
pub struct Cert {
    pub crt: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
    pub fingerprint: Fingerprint,
}

pub fn self_signed(dir: impl AsRef<Path>, name: &str) -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let write = |file: String, text: String| {
        let p = dir.as_ref().join(file);
        std::fs::write(&p, text).unwrap();
        p
    };
    Cert {
        crt: write(format!("{name}.crt"), ck.cert.pem()),
        key: write(format!("{name}.key"), ck.key_pair.serialize_pem()),
        der: ck.cert.der().clone(),
        fingerprint: Fingerprint::of(ck.cert.der().as_ref()),
    }
}
