//! Certificates for the TLS tests (openssl).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::server::RedisServer;

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is not installed: run ./scripts/test.sh, which installs it");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`), a server certificate it signed for the names of
/// `san` (`DNS:localhost,IP:127.0.0.1`; `server.pem`, `server.key`), and
/// an unrelated CA (`other-ca.pem`), made with the `openssl` command.
pub fn make_certs(dir: &Path, san: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for (key, pem, cn) in [
        ("ca.key", "ca.pem", "sidecar test CA"),
        ("other-ca.key", "other-ca.pem", "another CA"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                key,
                "-out",
                pem,
                "-days",
                "2",
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(dir.join("san.ext"), format!("subjectAltName={san}\n")).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

pub const PASSWORD: &str = "tls-default-pw-51";
pub const ACL_PASSWORD: &str = "p:ss-acl-93";

/// A redis-server with a TLS port (certificates in `dir`), `requirepass`
/// [`PASSWORD`] and an ACL user `app@svc` with [`ACL_PASSWORD`].
pub struct TlsRedis {
    pub server: RedisServer,
    pub tls_port: u16,
    pub dir: PathBuf,
}

/// redis-server's arguments for a TLS port with the certificates
/// [`make_certs`] wrote to `dir` (clients need no certificate).
pub fn tls_args(dir: &Path, tls_port: u16) -> Vec<String> {
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    vec![
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        p("server.pem"),
        "--tls-key-file".into(),
        p("server.key"),
        "--tls-ca-cert-file".into(),
        p("ca.pem"),
        "--tls-auth-clients".into(),
        "no".into(),
    ]
}

pub fn start_tls_redis() -> TlsRedis {
    let dir = std::env::temp_dir().join(format!(
        "sidecar-tls-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    make_certs(&dir, "DNS:localhost,IP:127.0.0.1");
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut args = tls_args(&dir, tls_port);
    args.extend(
        [
            "--requirepass",
            PASSWORD,
            "--user",
            "app@svc",
            "on",
            &format!(">{ACL_PASSWORD}"),
            "~*",
            "&*",
            "+@all",
        ]
        .map(String::from),
    );
    let server = RedisServer::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    TlsRedis {
        server,
        tls_port,
        dir,
    }
}
