//! TLS configuration shared by the broker (server side) and the signer (client side).
//!
//! Both sides use [`rustls`] with the `ring` crypto provider (no aws-lc C build). This crate
//! depends on neither the broker nor the signer, so both can depend on it.
//!
//! * Server: [`server_config`] loads a PEM certificate chain and private key
//!   (`sphinx_mqtt_server` wraps it in a `tokio_rustls::TlsAcceptor`).
//! * Client: [`client_config`] trusts the broker's certificate in one of two ways
//!   ([`ServerTrust`]):
//!   - [`ServerTrust::CaFile`]: the usual WebPKI verification against the CA certificate(s) in a
//!     PEM file, including the host name (or IP address) the client connects to, which must be
//!     in the certificate's subjectAltName;
//!   - [`ServerTrust::Pinned`]: the SHA-256 [`Fingerprint`] of the broker's end-entity
//!     certificate (DER). Exactly that certificate is accepted, whatever its name, issuer or
//!     validity dates; the TLS handshake signature is still verified against its public key
//!     with the provider's algorithms, so only the holder of its private key can pass.
//!
//! Make a self-signed certificate and its fingerprint for testing (see `docs/mqtt.md`):
//!
//! ```text
//! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
//!   -subj /CN=sphinx-broker -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
//!   -keyout broker.key -out broker.crt
//! openssl x509 -in broker.crt -noout -fingerprint -sha256
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

pub use rustls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// Errors from loading certificates and keys or building a configuration. Each says which file
/// or value is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not valid PEM.
    #[error("invalid PEM in {path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A certificate file holds no `CERTIFICATE` block.
    #[error("no certificate found in {0}")]
    NoCertificates(PathBuf),
    /// A key file holds no PKCS#8, PKCS#1 (RSA) or SEC1 (EC) private key.
    #[error("no private key found in {0}")]
    NoPrivateKey(PathBuf),
    /// A CA certificate could not be used as a trust anchor.
    #[error("unusable CA certificate in {path}: {source}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls::Error,
    },
    /// A fingerprint string is not 32 bytes of hex.
    #[error("invalid SHA-256 fingerprint {0:?}: expected 64 hex digits, optionally separated by ':'")]
    Fingerprint(String),
    /// rustls refused the configuration (e.g. the private key does not match the certificate,
    /// or its algorithm is not supported).
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider used everywhere: rustls' `ring` provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn open(path: &Path) -> Result<BufReader<std::fs::File>, Error> {
    std::fs::File::open(path).map(BufReader::new).map_err(|source| Error::Read { path: path.to_path_buf(), source })
}

/// Reads every `CERTIFICATE` block of a PEM file (other blocks are skipped). Errors if there is
/// none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let mut r = open(path)?;
    let certs = rustls_pemfile::certs(&mut r)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem { path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(Error::NoCertificates(path.to_path_buf()));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let mut r = open(path)?;
    rustls_pemfile::private_key(&mut r)
        .map_err(|source| Error::Pem { path: path.to_path_buf(), source })?
        .ok_or_else(|| Error::NoPrivateKey(path.to_path_buf()))
}

/// A server configuration presenting the certificate chain in `cert_chain` (PEM, end-entity
/// certificate first) with the key in `private_key` (PEM). TLS 1.2 and 1.3, no client
/// certificates. Fails if the files are unreadable, hold no certificate or key, or the key does
/// not belong to the certificate.
pub fn server_config(cert_chain: &Path, private_key: &Path) -> Result<Arc<ServerConfig>, Error> {
    let certs = load_certs(cert_chain)?;
    let key = load_private_key(private_key)?;
    let provider = provider();
    // `with_single_cert` refuses a key that does not match the certificate (at start-up, not at
    // the first handshake).
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

/// The SHA-256 digest of a certificate's DER encoding, the value `openssl x509 -noout
/// -fingerprint -sha256` prints.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(cert_der: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, cert_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }

    /// The fingerprint of the first certificate in a PEM file (the end-entity certificate of a
    /// chain).
    pub fn of_pem_file(path: &Path) -> Result<Self, Error> {
        let certs = load_certs(path)?;
        certs.first().map(|c| Fingerprint::of(c.as_ref())).ok_or_else(|| Error::NoCertificates(path.to_path_buf()))
    }
}

/// Parses `AB:CD:…` (as openssl prints it, with or without its `sha256 Fingerprint=` prefix),
/// plain hex, or `sha256:`-prefixed hex; case-insensitive; whitespace is ignored.
impl FromStr for Fingerprint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Fingerprint(s.chars().take(120).collect());
        let mut v = s.trim();
        if let Some((_, rest)) = v.rsplit_once('=') {
            v = rest;
        }
        let v = v.trim();
        let v = match v.get(..7) {
            Some(p) if p.eq_ignore_ascii_case("sha256:") => &v[7..],
            _ => v,
        };
        let digits: Vec<u8> = v.bytes().filter(|b| *b != b':' && !b.is_ascii_whitespace()).collect();
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(bad)?;
            let lo = hex_val(pair[1]).ok_or_else(bad)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Fingerprint(out))
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Uppercase hex pairs separated by `:`, as openssl prints it.
impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// How a client decides to trust the broker's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerTrust {
    /// Verify the chain against the CA certificate(s) in this PEM file (a self-signed broker
    /// certificate is its own CA), and the name the client connects to against the
    /// certificate's subjectAltName.
    CaFile(PathBuf),
    /// Accept exactly the certificate with this SHA-256 fingerprint (names, issuer and dates are
    /// not checked; the handshake signature is).
    Pinned(Fingerprint),
}

/// A client configuration for [`ServerTrust`], no client certificate, TLS 1.2 and 1.3.
pub fn client_config(trust: &ServerTrust) -> Result<Arc<ClientConfig>, Error> {
    match trust {
        ServerTrust::CaFile(path) => client_config_ca_file(path),
        ServerTrust::Pinned(fp) => client_config_pinned(*fp),
    }
}

/// A client configuration trusting the CA certificates in a PEM file.
pub fn client_config_ca_file(path: &Path) -> Result<Arc<ClientConfig>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|source| Error::BadCa { path: path.to_path_buf(), source })?;
    }
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A client configuration accepting exactly the server certificate whose DER SHA-256 is `fp`.
pub fn client_config_pinned(fp: Fingerprint) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = PinnedVerifier { fingerprint: fp, algorithms: provider.signature_verification_algorithms };
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Accepts exactly one end-entity certificate (by SHA-256 of its DER) and verifies handshake
/// signatures with the provider's algorithms.
#[derive(Debug)]
pub struct PinnedVerifier {
    fingerprint: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedVerifier {
    /// A verifier pinning `fingerprint`, verifying signatures with [`provider`]'s algorithms.
    pub fn new(fingerprint: Fingerprint) -> Self {
        PinnedVerifier { fingerprint, algorithms: provider().signature_verification_algorithms }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Fingerprint::of(end_entity.as_ref()) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_formats() {
        let hex = "0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789abcdef";
        let fp: Fingerprint = hex.parse().unwrap();
        assert_eq!(fp.0[0], 0x01);
        assert_eq!(fp.0[31], 0xef);
        let colons = fp.to_string();
        assert_eq!(colons.len(), 95);
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(format!("sha256 Fingerprint={colons}\n").parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(format!("SHA256 Fingerprint={}", colons.to_lowercase()).parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(format!("sha256:{hex}").parse::<Fingerprint>().unwrap(), fp);
        for bad in ["", "abc", &hex[..62], &format!("{hex}00"), &hex.replace('0', "g"), "é".repeat(40).as_str()] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_files_are_errors() {
        let p = Path::new("/nonexistent/sphinx-tls-test.pem");
        assert!(matches!(load_certs(p), Err(Error::Read { .. })));
        assert!(matches!(server_config(p, p), Err(Error::Read { .. })));
        assert!(client_config(&ServerTrust::CaFile(p.to_path_buf())).is_err());
        assert!(client_config(&ServerTrust::Pinned(Fingerprint([0; 32]))).is_ok());
    }
}
