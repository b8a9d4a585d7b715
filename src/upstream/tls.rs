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
    pub fn new(ca_file: Option<&str>, server_name: Option<&str>) -> Result<TlsSettings, String> {
        let mut roots = RootCertStore::empty();
        // System roots (honours SSL_CERT_FILE / SSL_CERT_DIR). Unreadable
        // entries are skipped: a CA file may be all that is needed.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        let mut extra = Vec::new();
        if let Some(path) = ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("tls_ca_file {path}: {e}"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("tls_ca_file {path}: {e}"))?;
            if certs.is_empty() {
                return Err(format!("tls_ca_file {path}: no PEM certificate in it"));
            }
            for c in &certs {
                roots
                    .add(c.clone())
                    .map_err(|e| format!("tls_ca_file {path}: {e}"))?;
            }
            extra = certs;
        }
        if roots.is_empty() {
            return Err("no trusted root certificates (no system roots and no tls_ca_file)".into());
        }
        if let Some(n) = server_name {
            ServerName::try_from(n.to_string())
                .map_err(|_| format!("tls_server_name {n:?} is not a valid DNS name or IP"))?;
        }
        let provider = Arc::new(crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
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
    ) -> Result<TlsStream<TcpStream>, String> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| format!("{name:?} is not a valid TLS server name"))?;
        TlsConnector::from(self.config.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))
    }
}
