//! TLS 1.3 for a cluster's channels (decision 45): a server's acceptor for its data, peer and
//! admin ports, and the client side that agents, servers dialling peers and `mtcp drain` use,
//! which trusts only the cluster's CA. Everything a file can get wrong (missing, not PEM, a key
//! that is not the certificate's, expired, not signed by the CA, not naming the server) is
//! found when the configuration is loaded, with a message naming the file.

use crate::config::TlsFiles;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpStream;

/// Why a TLS configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: cannot read {path}: {err}")]
    Read { path: String, err: String },
    #[error("TLS: {path} holds no certificate (expected PEM `BEGIN CERTIFICATE`; `mtcp cert` makes them)")]
    NoCert { path: String },
    #[error("TLS: {path} holds no private key (expected PEM `BEGIN PRIVATE KEY`)")]
    NoKey { path: String },
    #[error("TLS: the key {key} is not the key of certificate {cert}: {err}")]
    KeyMismatch {
        cert: String,
        key: String,
        err: String,
    },
    #[error(
        "TLS: certificate {cert} is not valid for server {name:?} under the cluster CA {ca}: {err}"
    )]
    Invalid {
        cert: String,
        name: String,
        ca: String,
        err: String,
    },
    #[error("TLS: {what} {name:?} cannot be a certificate name: {err}")]
    Name {
        what: &'static str,
        name: String,
        err: String,
    },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// *ring*: it builds with a C compiler alone (aws-lc-rs would add a long C build to every CI
/// run). rustls 0.23.48 deprecates it for lacking post-quantum key exchange (X25519MLKEM768);
/// decision 45 records that trade.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let p = path.display().to_string();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Read {
            path: p.clone(),
            err: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read {
            path: p.clone(),
            err: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert { path: p });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let p = path.display().to_string();
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: p },
        e => TlsError::Read {
            path: p,
            err: e.to_string(),
        },
    })
}

fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c).map_err(|err| TlsError::Invalid {
            cert: ca.display().to_string(),
            name: "cluster CA".into(),
            ca: ca.display().to_string(),
            err: err.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The name a client checks a server's certificate against: the host part of the address it
/// dials (an IP address or a DNS name).
pub fn name_of_addr(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_string()).map_err(|e| TlsError::Name {
        what: "address",
        name: addr.into(),
        err: e.to_string(),
    })
}

/// The name a server's certificate carries for its id (a DNS name: peers and `mtcp drain`
/// check that the server they dial is the one they mean).
pub fn name_of_id(id: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(id.to_string()).map_err(|e| TlsError::Name {
        what: "server id",
        name: id.into(),
        err: e.to_string(),
    })
}

/// The client side: trusts the cluster CA only, TLS 1.3 only.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// Trusts the CA certificate(s) in the PEM file `ca`.
    pub fn from_ca_file(ca: &Path) -> Result<Self, TlsError> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth();
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// Runs the handshake on `s` and checks the server's certificate for `name`. An error says
    /// what was expected, so a server without TLS or with a foreign certificate is named as such.
    pub async fn connect(
        &self,
        name: ServerName<'static>,
        s: TcpStream,
    ) -> std::io::Result<crate::stream::Stream> {
        let shown = name.to_str().into_owned();
        match self.connector.connect(name, s).await {
            Ok(t) => Ok(crate::stream::Stream::Tls(Box::new(t.into()))),
            Err(e) => Err(std::io::Error::new(
                e.kind(),
                format!("TLS handshake with {shown} failed: {e}{}", hint(&e)),
            )),
        }
    }
}

/// A hint for the commonest causes of a failed client handshake, read from the rustls error
/// inside the I/O error.
fn hint(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    match e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
        Some(E::InvalidMessage(_)) => {
            " (the server speaks plain M-TCP: is `[tls]` missing from its cluster file?)"
        }
        Some(E::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => {
            " (its certificate is not signed by this cluster's CA)"
        }
        Some(E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => {
            " (its certificate does not name this address or server id)"
        }
        _ => "",
    }
}

/// A server's TLS: its certificate for its ports, and the client side for dialling peers.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    pub client: ClientTls,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// Loads server `id`'s certificate and key and the CA from `files`, and checks that the
    /// key is the certificate's and that the certificate is valid now under the CA for every
    /// name clients will check: the server's id and the hosts of `addrs`.
    pub fn load(files: &TlsFiles, id: &str, addrs: &[&str]) -> Result<Self, TlsError> {
        let (cert_path, key_path) = (files.cert_for(id), files.key_for(id));
        let certs = read_certs(&cert_path)?;
        let key = read_key(&key_path)?;
        let roots = roots(&files.ca)?;
        let ck = rustls::sign::CertifiedKey::from_der(certs.clone(), key.clone_key(), &provider())
            .map_err(|err| TlsError::KeyMismatch {
                cert: cert_path.display().to_string(),
                key: key_path.display().to_string(),
                err: err.to_string(),
            })?;
        ck.keys_match().map_err(|err| TlsError::KeyMismatch {
            cert: cert_path.display().to_string(),
            key: key_path.display().to_string(),
            err: err.to_string(),
        })?;
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let mut names = vec![name_of_id(id)?];
        for a in addrs {
            names.push(name_of_addr(a)?);
        }
        for name in names {
            use rustls::client::danger::ServerCertVerifier;
            verifier
                .verify_server_cert(&certs[0], &certs[1..], &name, &[], UnixTime::now())
                .map_err(|err| TlsError::Invalid {
                    cert: cert_path.display().to_string(),
                    name: name.to_str().into_owned(),
                    ca: files.ca.display().to_string(),
                    err: err.to_string(),
                })?;
        }
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            client: ClientTls::from_ca_file(&files.ca)?,
        })
    }

    /// Runs the server side of the handshake on an accepted connection.
    pub async fn accept(&self, s: TcpStream) -> std::io::Result<crate::stream::Stream> {
        let t = self.acceptor.accept(s).await?;
        Ok(crate::stream::Stream::Tls(Box::new(t.into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_addresses() {
        assert_eq!(
            name_of_addr("127.0.0.1:7001").unwrap().to_str(),
            "127.0.0.1"
        );
        assert_eq!(name_of_addr("[::1]:7001").unwrap().to_str(), "::1");
        assert_eq!(name_of_addr("db.example:5").unwrap().to_str(), "db.example");
        assert!(name_of_id("s1").is_ok());
        assert!(name_of_id("not a name").is_err());
    }

    /// A CA and a certificate for server `s1` at 127.0.0.1 in a fresh directory.
    fn certs() -> (std::path::PathBuf, TlsFiles) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = std::env::temp_dir().join(format!("mtcp-tls-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        std::fs::write(dir.join("ca.crt"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(vec!["s1".to_string(), "127.0.0.1".to_string()]).unwrap();
        std::fs::write(
            dir.join("s1.crt"),
            p.signed_by(&key, &issuer).unwrap().pem(),
        )
        .unwrap();
        std::fs::write(dir.join("s1.key"), key.serialize_pem()).unwrap();
        let files = TlsFiles {
            ca: dir.join("ca.crt"),
            cert: dir.join("{id}.crt").display().to_string(),
            key: dir.join("{id}.key").display().to_string(),
        };
        (dir, files)
    }

    /// Frames written through a TLS half arrive whole (the framed writers flush), and a peer
    /// that closes without `close_notify` reads as a clean end, as on TCP.
    #[tokio::test]
    async fn frames_cross_tls_and_an_abrupt_close_reads_as_the_end() {
        use crate::framed::{self, ChannelError, FrameReader, Out};
        use mtcp_proto::wire::Msg;
        let (dir, files) = certs();
        let server = ServerTls::load(&files, "s1", &["127.0.0.1:1"]).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let acceptor = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, _w) = server.accept(s).await.unwrap().into_split();
            let mut reader = FrameReader::new(r, 1 << 20);
            let mut got = Vec::new();
            loop {
                match reader.next_msg(std::time::Duration::from_secs(5)).await {
                    Ok(m) => got.push(m),
                    Err(ChannelError::Closed) => return Ok(got),
                    Err(e) => return Err(e.to_string()),
                }
            }
        });
        let client = ClientTls::from_ca_file(&files.ca).unwrap();
        let s = TcpStream::connect(&addr).await.unwrap();
        let s = client
            .connect(name_of_addr(&addr).unwrap(), s)
            .await
            .unwrap();
        assert!(s.is_tls());
        let (_r, mut w) = s.into_split();
        framed::write_frames(
            &mut w,
            &[Out::Msg(Msg::Ping { t: 1 }), Out::Msg(Msg::Ping { t: 2 })],
        )
        .await
        .unwrap();
        framed::write_msg(&mut w, &Msg::Close).await.unwrap();
        // Dropped without a TLS shutdown: no close_notify.
        drop((_r, w));
        let got = acceptor.await.unwrap().expect("a clean end");
        assert_eq!(
            got,
            vec![Msg::Ping { t: 1 }, Msg::Ping { t: 2 }, Msg::Close]
        );
        // A client that trusts another CA refuses this server, saying why.
        let (dir2, other) = certs();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = ServerTls::load(&files, "s1", &[]).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let _ = server.accept(s).await;
        });
        let s = TcpStream::connect(&addr).await.unwrap();
        let e = ClientTls::from_ca_file(&other.ca)
            .unwrap()
            .connect(name_of_addr(&addr).unwrap(), s)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("not signed by this cluster's CA"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&dir2);
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = std::env::temp_dir().join(format!("mtcp-tls-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles {
            ca: dir.join("ca.crt"),
            cert: dir.join("{id}.crt").display().to_string(),
            key: dir.join("{id}.key").display().to_string(),
        };
        let e = ServerTls::load(&files, "s1", &[]).unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("s1.crt"), "{e}");
        std::fs::write(dir.join("s1.crt"), "not pem\n").unwrap();
        let e = ServerTls::load(&files, "s1", &[]).unwrap_err().to_string();
        assert!(e.contains("holds no certificate"), "{e}");
        let e = ClientTls::from_ca_file(&dir.join("nope.crt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.crt"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod hint_tests {
    use super::hint;
    use rustls::{CertificateError, Error, InvalidMessage};
    use std::io;

    fn wrapped(e: Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn a_failed_handshake_is_explained_by_its_rustls_error() {
        let plain = wrapped(Error::InvalidMessage(InvalidMessage::InvalidContentType));
        assert!(hint(&plain).contains("speaks plain M-TCP"));
        let ca = wrapped(Error::InvalidCertificate(CertificateError::UnknownIssuer));
        assert!(hint(&ca).contains("not signed by this cluster's CA"));
        let name = wrapped(Error::InvalidCertificate(CertificateError::NotValidForName));
        assert!(hint(&name).contains("does not name this address"));
        // Anything else, and an error that is not rustls's, get no hint.
        assert_eq!(hint(&wrapped(Error::HandshakeNotComplete)), "");
        assert_eq!(hint(&io::Error::other("UnknownIssuer")), "");
    }
}
