//! TLS for `rediss://` endpoints: rustls (ring provider) with the system
//! roots plus an optional CA file, and an optional server name to verify
//! instead of the URL's host. A certificate that does not chain to a trusted
//! root, or is not valid for the name, fails the connect.

use std::fmt;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};

/// Why TLS settings could not be loaded, or a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls_ca_file {path}: {source}")]
    CaFile {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("tls_ca_file {path}: no PEM certificate in it")]
    CaFileEmpty { path: String },
    #[error("tls_ca_file {path}: {source}")]
    CaCert {
        path: String,
        #[source]
        source: tokio_rustls::rustls::Error,
    },
    #[error("no trusted root certificates (no system roots and no tls_ca_file)")]
    NoRoots,
    #[error("tls_server_name {0:?} is not a valid DNS name or IP")]
    ServerName(String),
    #[error("{0:?} is not a valid TLS server name")]
    HostName(String),
    #[error("TLS setup: {0}")]
    Setup(#[source] tokio_rustls::rustls::Error),
    #[error("TLS handshake: {0}")]
    Handshake(#[source] std::io::Error),
}

/// One endpoint's TLS settings, loaded and ready to connect with.
#[derive(Clone)]
pub struct TlsSettings {
    ca_file: Option<String>,
    /// The CA file's certificates, so a reload notices a changed file.
    extra: Vec<CertificateDer<'static>>,
    server_name: Option<String>,
    config: Arc<ClientConfig>,
}

impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file
            && self.extra == other.extra
            && self.server_name == other.server_name
    }
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_file", &self.ca_file)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// Load the roots; errors name the file and the reason.
    pub fn new(ca_file: Option<&str>, server_name: Option<&str>) -> Result<TlsSettings, TlsError> {
        let mut roots = RootCertStore::empty();
        // System roots (honours SSL_CERT_FILE / SSL_CERT_DIR). Unreadable
        // entries are skipped: a CA file may be all that is needed.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        let mut extra = Vec::new();
        if let Some(path) = ca_file {
            let pem = |source| TlsError::CaFile {
                path: path.to_string(),
                source,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(pem)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem)?;
            if certs.is_empty() {
                return Err(TlsError::CaFileEmpty {
                    path: path.to_string(),
                });
            }
            for c in &certs {
                roots.add(c.clone()).map_err(|source| TlsError::CaCert {
                    path: path.to_string(),
                    source,
                })?;
            }
            extra = certs;
        }
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        if let Some(n) = server_name {
            ServerName::try_from(n.to_string()).map_err(|_| TlsError::ServerName(n.to_string()))?;
        }
        let provider = Arc::new(crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsSettings {
            ca_file: ca_file.map(str::to_string),
            extra,
            server_name: server_name.map(str::to_string),
            config: Arc::new(config),
        })
    }

    /// Run the TLS handshake over `tcp`, verifying the certificate against
    /// the configured server name or else `host`.
    pub async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, TlsError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| TlsError::HostName(name.to_string()))?;
        TlsConnector::from(self.config.clone())
            .connect(server_name, tcp)
            .await
            .map_err(TlsError::Handshake)
    }
}
