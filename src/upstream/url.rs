//! Upstream endpoint URLs: `redis://[user:password@]host:port[/db]`.
//!
//! User and password are percent-decoded. The password lives in a
//! [`Secret`], whose `Debug` and `Display` print `***`; [`UpstreamUrl`]'s
//! `Display` is the redacted form used in logs, errors and metrics.

use std::fmt;

/// A string that never prints itself.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A parsed upstream URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub db: i64,
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "redis://")?;
        match (&self.user, &self.password) {
            (Some(u), Some(_)) => write!(f, "{u}:***@")?,
            (None, Some(_)) => write!(f, ":***@")?,
            (Some(u), None) => write!(f, "{u}@")?,
            (None, None) => {}
        }
        write!(f, "{}:{}", self.host, self.port)?;
        if self.db != 0 {
            write!(f, "/{}", self.db)?;
        }
        Ok(())
    }
}

impl UpstreamUrl {
    /// Parse; the error never contains the password.
    pub fn parse(s: &str) -> Result<UpstreamUrl, String> {
        let rest = if let Some(r) = s.strip_prefix("redis://") {
            r
        } else if s.starts_with("rediss://") {
            return Err("rediss:// (TLS) upstreams are not supported yet".into());
        } else {
            return Err("must start with redis://".into());
        };
        let (auth, hostpart) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let (hostport, path) = match hostpart.find('/') {
            Some(i) => (&hostpart[..i], &hostpart[i + 1..]),
            None => (hostpart, ""),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            // [ipv6]:port
            let end = h.find(']').ok_or("unclosed [ in host")?;
            let port = h[end + 1..].strip_prefix(':').unwrap_or("");
            (&h[..end], port)
        } else {
            match hostport.rfind(':') {
                Some(i) => (&hostport[..i], &hostport[i + 1..]),
                None => (hostport, ""),
            }
        };
        if host.is_empty() {
            return Err("missing host".into());
        }
        let port = if port.is_empty() {
            6379
        } else {
            port.parse::<u16>()
                .map_err(|_| "invalid port".to_string())?
        };
        let path = path.split(['?', '#']).next().unwrap_or("");
        let db = if path.is_empty() {
            0
        } else {
            path.parse::<i64>()
                .ok()
                .filter(|d| *d >= 0)
                .ok_or("invalid database number")?
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => {
                let (u, p) = match a.find(':') {
                    Some(i) => (&a[..i], Some(&a[i + 1..])),
                    None => (a, None),
                };
                let u = percent_decode(u).ok_or("invalid percent-encoding in user")?;
                let p = match p {
                    Some(p) => Some(Secret(
                        percent_decode(p).ok_or("invalid percent-encoding in password")?,
                    )),
                    None => None,
                };
                ((!u.is_empty()).then_some(u), p.filter(|p| !p.0.is_empty()))
            }
        };
        Ok(UpstreamUrl {
            host: host.to_string(),
            port,
            user,
            password,
            db,
        })
    }

    /// `host:port` for connecting (resolved on every connect).
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_redacts() {
        let u = UpstreamUrl::parse("redis://app%40svc:p%3Ass@localhost:7579/2").unwrap();
        assert_eq!(u.user.as_deref(), Some("app@svc"));
        assert_eq!(u.password.as_ref().map(|p| p.expose()), Some("p:ss"));
        assert_eq!(u.db, 2);
        assert_eq!(u.to_string(), "redis://app@svc:***@localhost:7579/2");
        assert!(!format!("{u:?}").contains("p:ss"));
        let u = UpstreamUrl::parse("redis://:pw@127.0.0.1").unwrap();
        assert_eq!((u.user, u.port), (None, 6379));
        assert!(
            UpstreamUrl::parse("redis://x:pw@h:notaport")
                .unwrap_err()
                .find("pw")
                .is_none()
        );
        assert!(UpstreamUrl::parse("rediss://h").is_err());
    }
}
