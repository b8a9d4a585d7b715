//! Upstream endpoint URLs: `redis://` and `rediss://`
//! `[user:password@]host:port[/db]`, and
//! `redis-sentinel://[user:password@]host:port[,host:port]/master[/db]`,
//! and `redis-cluster://` / `rediss-cluster://`
//! `[user:password@]host:port[,host:port...]` (seed nodes of a cluster).
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

/// A parsed `redis://` or `rediss://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `rediss://`: TLS.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub db: i64,
}

/// A parsed `redis-sentinel://[user:password@]host:port[,host:port]/master[/db]`.
/// The credentials and db are the master's; sentinels are asked without
/// them (see `sentinel_password` in the config for sentinels that need one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelUrl {
    pub sentinels: Vec<(String, u16)>,
    pub master: String,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub db: i64,
}

/// A parsed `redis-cluster://` or `rediss-cluster://` URL: seed nodes
/// (any node of the cluster; the slot map is learned from them) and the
/// credentials every node is reached with. A cluster has database 0 only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterUrl {
    pub tls: bool,
    pub seeds: Vec<(String, u16)>,
    pub user: Option<String>,
    pub password: Option<Secret>,
}

/// What an `[[upstream]]` URL points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Direct(UpstreamUrl),
    Sentinel(SentinelUrl),
    Cluster(ClusterUrl),
}

fn write_userinfo(
    f: &mut fmt::Formatter<'_>,
    user: &Option<String>,
    password: &Option<Secret>,
) -> fmt::Result {
    match (user, password) {
        (Some(u), Some(_)) => write!(f, "{u}:***@"),
        (None, Some(_)) => write!(f, ":***@"),
        (Some(u), None) => write!(f, "{u}@"),
        (None, None) => Ok(()),
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", if self.tls { "rediss" } else { "redis" })?;
        write_userinfo(f, &self.user, &self.password)?;
        write!(f, "{}", host_port(&self.host, self.port))?;
        if self.db != 0 {
            write!(f, "/{}", self.db)?;
        }
        Ok(())
    }
}

impl fmt::Display for SentinelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "redis-sentinel://")?;
        write_userinfo(f, &self.user, &self.password)?;
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(h, p)| host_port(h, *p))
            .collect();
        write!(f, "{}/{}", hosts.join(","), self.master)?;
        if self.db != 0 {
            write!(f, "/{}", self.db)?;
        }
        Ok(())
    }
}

impl fmt::Display for ClusterUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://",
            if self.tls {
                "rediss-cluster"
            } else {
                "redis-cluster"
            }
        )?;
        write_userinfo(f, &self.user, &self.password)?;
        let hosts: Vec<String> = self.seeds.iter().map(|(h, p)| host_port(h, *p)).collect();
        f.write_str(&hosts.join(","))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Direct(u) => u.fmt(f),
            Target::Sentinel(s) => s.fmt(f),
            Target::Cluster(c) => c.fmt(f),
        }
    }
}

/// Why an upstream URL was refused. No variant carries any part of the
/// URL: the text may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error(
        "must start with redis://, rediss://, redis-sentinel://, redis-cluster:// or rediss-cluster://"
    )]
    Scheme,
    #[error("a cluster has database 0 only (no /db in a redis-cluster:// URL)")]
    ClusterDb,
    #[error("missing master name (redis-sentinel://host:port/master_name)")]
    MissingMaster,
    #[error("missing host")]
    MissingHost,
    #[error("unclosed [ in host")]
    UnclosedBracket,
    #[error("invalid port")]
    InvalidPort,
    #[error("invalid database number")]
    InvalidDb,
    #[error("invalid percent-encoding in user")]
    UserEncoding,
    #[error("invalid percent-encoding in password")]
    PasswordEncoding,
    /// A `#` or `?` before the `@`: it would cut the URL short and turn
    /// the rest of the password into a host.
    #[error("the user or password contains '#' or '?': percent-encode them (%23, %3F)")]
    ReservedInCredentials,
}

impl Target {
    /// Parse any supported URL; the error never contains the password.
    pub fn parse(s: &str) -> Result<Target, UrlError> {
        let cluster = match s.strip_prefix("redis-cluster://") {
            Some(r) => Some((false, r)),
            None => s.strip_prefix("rediss-cluster://").map(|r| (true, r)),
        };
        if let Some((tls, rest)) = cluster {
            let (user, password, hosts, path) = split_url(rest)?;
            if !path.is_empty() && path != "0" {
                return Err(UrlError::ClusterDb);
            }
            let mut seeds = Vec::new();
            for h in hosts.split(',') {
                seeds.push(parse_host_port(h, 6379)?);
            }
            return Ok(Target::Cluster(ClusterUrl {
                tls,
                seeds,
                user,
                password,
            }));
        }
        if let Some(rest) = s.strip_prefix("redis-sentinel://") {
            let (user, password, hosts, path) = split_url(rest)?;
            let mut sentinels = Vec::new();
            for h in hosts.split(',') {
                sentinels.push(parse_host_port(h, 26379)?);
            }
            let mut parts = path.splitn(2, '/');
            let master = parts.next().unwrap_or("");
            if master.is_empty() {
                return Err(UrlError::MissingMaster);
            }
            Ok(Target::Sentinel(SentinelUrl {
                sentinels,
                master: master.to_string(),
                user,
                password,
                db: parse_db(parts.next().unwrap_or(""))?,
            }))
        } else {
            UpstreamUrl::parse(s).map(Target::Direct)
        }
    }

    /// The database the endpoint's URL selects.
    pub fn db(&self) -> i64 {
        match self {
            Target::Direct(u) => u.db,
            Target::Sentinel(s) => s.db,
            Target::Cluster(_) => 0,
        }
    }

    /// User and password for the data node, if the URL has a password.
    pub fn credentials(&self) -> Option<(Option<&str>, &Secret)> {
        let (user, password) = match self {
            Target::Direct(u) => (&u.user, &u.password),
            Target::Sentinel(s) => (&s.user, &s.password),
            Target::Cluster(c) => (&c.user, &c.password),
        };
        password.as_ref().map(|p| (user.as_deref(), p))
    }
}

/// `(user, password, hosts, path)` of `[user:password@]hosts[/path]`.
type UrlParts<'a> = (Option<String>, Option<Secret>, &'a str, &'a str);

fn split_url(rest: &str) -> Result<UrlParts<'_>, UrlError> {
    if let Some(cut) = rest.find(['?', '#'])
        && rest[cut..].contains('@')
    {
        return Err(UrlError::ReservedInCredentials);
    }
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (auth, hostpart) = match rest.rfind('@') {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    };
    let (hosts, path) = match hostpart.find('/') {
        Some(i) => (&hostpart[..i], &hostpart[i + 1..]),
        None => (hostpart, ""),
    };
    let (user, password) = match auth {
        None => (None, None),
        Some(a) => {
            let (u, p) = match a.find(':') {
                Some(i) => (&a[..i], Some(&a[i + 1..])),
                None => (a, None),
            };
            let u = percent_decode(u).ok_or(UrlError::UserEncoding)?;
            let p = match p {
                Some(p) => Some(Secret(percent_decode(p).ok_or(UrlError::PasswordEncoding)?)),
                None => None,
            };
            ((!u.is_empty()).then_some(u), p.filter(|p| !p.0.is_empty()))
        }
    };
    Ok((user, password, hosts, path))
}

fn parse_host_port(hostport: &str, default_port: u16) -> Result<(String, u16), UrlError> {
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        // [ipv6]:port
        let end = h.find(']').ok_or(UrlError::UnclosedBracket)?;
        let port = h[end + 1..].strip_prefix(':').unwrap_or("");
        (&h[..end], port)
    } else {
        match hostport.rfind(':') {
            Some(i) => (&hostport[..i], &hostport[i + 1..]),
            None => (hostport, ""),
        }
    };
    if host.is_empty() {
        return Err(UrlError::MissingHost);
    }
    let port = if port.is_empty() {
        default_port
    } else {
        port.parse::<u16>().map_err(|_| UrlError::InvalidPort)?
    };
    Ok((host.to_string(), port))
}

fn parse_db(path: &str) -> Result<i64, UrlError> {
    if path.is_empty() {
        return Ok(0);
    }
    path.parse::<i64>()
        .ok()
        .filter(|d| *d >= 0)
        .ok_or(UrlError::InvalidDb)
}

/// `host:port`, with brackets around an IPv6 address.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl UpstreamUrl {
    /// Parse `redis://` or `rediss://`; the error never contains the password.
    pub fn parse(s: &str) -> Result<UpstreamUrl, UrlError> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("redis://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("rediss://") {
            (true, r)
        } else {
            return Err(UrlError::Scheme);
        };
        let (user, password, hostport, path) = split_url(rest)?;
        let (host, port) = parse_host_port(hostport, 6379)?;
        Ok(UpstreamUrl {
            tls,
            host,
            port,
            user,
            password,
            db: parse_db(path)?,
        })
    }

    /// `host:port` for connecting (resolved on every connect).
    pub fn addr(&self) -> String {
        host_port(&self.host, self.port)
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
                .to_string()
                .find("pw")
                .is_none()
        );
        for bad in [
            "redis://:6379#x@h:7000",
            "redis://u:p?w@h",
            "rediss://u#:p@h",
        ] {
            let e = UpstreamUrl::parse(bad).unwrap_err();
            assert_eq!(e, UrlError::ReservedInCredentials);
            assert!(!e.to_string().contains("6379#x") && !e.to_string().contains("p?w"));
        }
        let t = UpstreamUrl::parse("rediss://default:pw@h:7000").unwrap();
        assert!(t.tls);
        assert_eq!(t.to_string(), "rediss://default:***@h:7000");
        assert!(UpstreamUrl::parse("http://h").is_err());
        let Target::Sentinel(s) =
            Target::parse("redis-sentinel://:pw@10.0.0.1:5000,[::1]/mymaster/3").unwrap()
        else {
            panic!("not a sentinel URL")
        };
        assert_eq!(
            s.sentinels,
            vec![("10.0.0.1".to_string(), 5000), ("::1".to_string(), 26379)]
        );
        assert_eq!((s.master.as_str(), s.db), ("mymaster", 3));
        assert_eq!(
            s.to_string(),
            "redis-sentinel://:***@10.0.0.1:5000,[::1]:26379/mymaster/3"
        );
        assert!(Target::parse("redis-sentinel://h:1").is_err());
    }

    #[test]
    fn cluster_urls() {
        let Target::Cluster(c) =
            Target::parse("rediss-cluster://app:s%40cret@node1.example:7000,10.0.0.2,[::1]:7002")
                .unwrap()
        else {
            panic!("not a cluster URL")
        };
        assert!(c.tls);
        assert_eq!(
            c.seeds,
            vec![
                ("node1.example".to_string(), 7000),
                ("10.0.0.2".to_string(), 6379),
                ("::1".to_string(), 7002)
            ]
        );
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("s@cret"));
        assert_eq!(
            c.to_string(),
            "rediss-cluster://app:***@node1.example:7000,10.0.0.2:6379,[::1]:7002"
        );
        assert!(!format!("{c:?}").contains("cret"));
        let t = Target::parse("redis-cluster://h:7000/0").unwrap();
        assert_eq!((t.db(), t.credentials().is_none()), (0, true));
        assert_eq!(
            Target::parse("redis-cluster://:pw@h:7000/1"),
            Err(UrlError::ClusterDb)
        );
        assert!(
            Target::parse("redis-cluster://:pw@h:x")
                .unwrap_err()
                .to_string()
                .find("pw")
                .is_none()
        );
    }
}
