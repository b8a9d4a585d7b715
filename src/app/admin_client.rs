//! A plain HTTP/1.1 client of the admin API over a blocking socket (the
//! admin listener is local), for the commands that drive a running
//! sidecar (`migrate`, `hotkeys`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// What went wrong talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("the admin address {0} is not http://host:port")]
    Address(String),
    #[error("cannot reach the admin API at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {path}: {status} {body}")]
    Refused {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{0}: not a JSON reply")]
    Reply(String),
}

pub(crate) struct Admin {
    addr: String,
    token: String,
}

impl Admin {
    /// The admin API at `url` (`http://host:port`), with `token` when not
    /// empty.
    pub(crate) fn new(url: &str, token: &str) -> Result<Admin, CliError> {
        Ok(Admin {
            addr: address(url)?,
            token: token.to_string(),
        })
    }

    pub(crate) fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), CliError> {
        let connect = |e| CliError::Connect {
            addr: self.addr.clone(),
            source: e,
        };
        let mut s = TcpStream::connect(&self.addr).map_err(connect)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(connect)?;
        let auth = if self.token.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {}\r\n", self.token)
        };
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(connect)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(connect)?;
        let text = String::from_utf8_lossy(&out);
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| CliError::Reply(path.to_string()))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim().to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    pub(crate) fn json(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&str>,
        ok: &[u16],
    ) -> Result<serde_json::Value, CliError> {
        let (status, text) = self.call(method, path, body)?;
        if !ok.contains(&status) {
            return Err(CliError::Refused {
                method,
                path: path.to_string(),
                status,
                body: text,
            });
        }
        serde_json::from_str(&text).map_err(|_| CliError::Reply(path.to_string()))
    }
}

/// `http://host:port` (or `host:port`) → `host:port`.
pub(crate) fn address(url: &str) -> Result<String, CliError> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || !rest.contains(':') {
        return Err(CliError::Address(url.to_string()));
    }
    Ok(rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(address("http://127.0.0.1:9121").unwrap(), "127.0.0.1:9121");
        assert_eq!(address("127.0.0.1:9121/").unwrap(), "127.0.0.1:9121");
        assert!(address("http://host/path").is_err());
        assert!(address("http://host").is_err());
    }
}
