//! Real TLS handshakes (in memory, over `tokio::io::duplex`) between a [`sphinx_tls::server_config`]
//! server and the client configurations, with certificates made by `rcgen` in the test.

mod common;

use std::sync::Arc;

use common::{self_signed, Dir};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sphinx_tls::{client_config, rustls, Fingerprint, ServerTrust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Runs a handshake and a one-byte echo; `Err` carries the client's error.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<(), String> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from(name.to_string()).unwrap();
    let server = async move {
        let mut s = TlsAcceptor::from(server).accept(s).await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        s.write_all(&b).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())
    };
    let client = async move {
        let mut c = TlsConnector::from(client).connect(name, c).await.map_err(|e| e.to_string())?;
        c.write_all(b"x").await.map_err(|e| e.to_string())?;
        c.flush().await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        assert_eq!(&b, b"x");
        Ok::<(), String>(())
    };
    let (sr, cr) = tokio::join!(server, client);
    cr?;
    sr.map_err(|e| format!("server: {e}"))
}

#[tokio::test]
async fn ca_file_and_pinned_fingerprint_accept_the_right_certificate() {
    let dir = Dir::new("sphinx-tls-test");
    let a = self_signed(&dir, "a");
    let server = sphinx_tls::server_config(&a.crt, &a.key).unwrap();

    let by_ca = client_config(&ServerTrust::CaFile(a.crt.clone())).unwrap();
    handshake(server.clone(), by_ca.clone(), "localhost").await.unwrap();
    handshake(server.clone(), by_ca.clone(), "127.0.0.1").await.unwrap();
    let err = handshake(server.clone(), by_ca, "other.example").await.unwrap_err();
    assert!(err.contains("certificate") || err.contains("name"), "{err}");

    let fp = Fingerprint::of_pem_file(&a.crt).unwrap();
    assert_eq!(fp, Fingerprint::of(a.der.as_ref()));
    let pinned = client_config(&ServerTrust::Pinned(fp)).unwrap();
    // A pinned certificate is accepted under any name.
    handshake(server.clone(), pinned.clone(), "localhost").await.unwrap();
    handshake(server, pinned, "anything.example").await.unwrap();
}

#[tokio::test]
async fn other_ca_and_wrong_fingerprint_are_refused() {
    let dir = Dir::new("sphinx-tls-test");
    let a = self_signed(&dir, "a");
    let b = self_signed(&dir, "b");
    let server = sphinx_tls::server_config(&a.crt, &a.key).unwrap();
    let err = handshake(server.clone(), client_config(&ServerTrust::CaFile(b.crt.clone())).unwrap(), "localhost")
        .await
        .unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    let wrong = Fingerprint::of(b.der.as_ref());
    let err = handshake(server, client_config(&ServerTrust::Pinned(wrong)).unwrap(), "localhost").await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// An attacker who has the pinned certificate (it is public) but not its key cannot pass: the
/// pinned verifier still checks the handshake signature against the certificate's key.
#[tokio::test]
async fn pinned_certificate_with_another_key_is_refused() {
    let dir = Dir::new("sphinx-tls-test");
    let a = self_signed(&dir, "a");
    let other_key = rcgen::KeyPair::generate().unwrap();
    let provider = sphinx_tls::provider();
    let signing =
        provider.key_provider.load_private_key(PrivateKeyDer::Pkcs8(other_key.serialize_der().into())).unwrap();
    let forged = Arc::new(CertifiedKey::new(vec![a.der.clone()], signing));
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(forged)));
    let pinned = client_config(&ServerTrust::Pinned(Fingerprint::of(a.der.as_ref()))).unwrap();
    let err = handshake(Arc::new(server), pinned, "localhost").await.unwrap_err();
    assert!(err.to_lowercase().contains("signature"), "{err}");

    // And the server side refuses such a pair at configuration time.
    let bad_key = dir.write("other.key", &other_key.serialize_pem());
    let e = sphinx_tls::server_config(&a.crt, &bad_key).unwrap_err();
    assert!(matches!(e, sphinx_tls::Error::Rustls(_)), "{e}");
    // Files without the expected PEM blocks.
    assert!(matches!(sphinx_tls::server_config(&a.key, &a.key), Err(sphinx_tls::Error::NoCertificates(_))));
    assert!(matches!(sphinx_tls::server_config(&a.crt, &a.crt), Err(sphinx_tls::Error::NoPrivateKey(_))));
}
