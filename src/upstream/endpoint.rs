//! One upstream endpoint: where it is (a direct URL, resolved on every
//! connect, or the master a set of sentinels names), how to reach it (TCP or
//! TLS) and its health as the checker sees it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::UpstreamError;
use super::slots::{Node, Topology};
use crate::config::UpstreamConfig;
use crate::config::url::{ClusterUrl, Secret, Target, host_port};
use crate::wire::{ReplyScanner, encode_command};

/// A byte stream to an upstream: plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What the health checker knows about an endpoint.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub state: HealthState,
    pub ok_streak: usize,
    pub fail_streak: usize,
    /// Round trip of the last good check.
    pub latency: Option<Duration>,
    /// Why the last check failed (host and port, never a password).
    pub last_error: Option<String>,
    /// When the endpoint last became up.
    pub up_since: Option<Instant>,
    /// The address the last check reached (a sentinel endpoint's master).
    pub address: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HealthState {
    /// Not checked yet.
    #[default]
    Unknown,
    Up,
    Down,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Up => "up",
            HealthState::Down => "down",
        }
    }
}

/// One `[[upstream]]` at run time.
#[derive(Debug)]
pub struct Endpoint {
    pub spec: EndpointSpec,
    /// Sentinels in the order to ask them; the one that answers moves to
    /// the front (Sentinel client spec).
    sentinel_order: Mutex<Vec<(String, u16)>>,
    pub health: Mutex<Health>,
    /// Cancelled when a reload removes the endpoint: its checker stops.
    pub stop: CancellationToken,
    /// Wakes the checker early (a connection to the endpoint failed).
    pub nudge: Notify,
    /// A cluster endpoint's slot map.
    pub cluster: Option<Arc<Topology>>,
    /// Reads that brought replies on the data path's connections to this
    /// endpoint: a health check that times out while this moves was late
    /// because the sidecar (or Redis) was busy, not because the upstream
    /// is down.
    pub data_reads: Arc<std::sync::atomic::AtomicU64>,
}

impl Endpoint {
    pub fn new(spec: EndpointSpec) -> Endpoint {
        let order = match &spec.target {
            Target::Sentinel(s) => s.sentinels.clone(),
            Target::Direct(_) | Target::Cluster(_) => Vec::new(),
        };
        let cluster =
            matches!(spec.target, Target::Cluster(_)).then(|| Arc::new(Topology::default()));
        Endpoint {
            spec,
            sentinel_order: Mutex::new(order),
            health: Mutex::new(Health::default()),
            stop: CancellationToken::new(),
            nudge: Notify::new(),
            cluster,
            data_reads: Arc::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn health(&self) -> Health {
        self.lock_health().clone()
    }

    pub fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The data node's database from the URL.
    pub fn db(&self) -> i64 {
        self.spec.target.db()
    }

    /// User and password from the URL, for the handshake.
    pub fn credentials(&self) -> Option<(Option<Bytes>, Bytes)> {
        self.spec.target.credentials().map(|(u, p)| {
            (
                u.map(|u| Bytes::copy_from_slice(u.as_bytes())),
                Bytes::copy_from_slice(p.expose().as_bytes()),
            )
        })
    }

    /// Resolve the endpoint (DNS, or ask the sentinels) and open a transport
    /// to it. Returns the stream and the `host:port` reached, for messages.
    pub async fn open(&self, timeout: Duration) -> Result<(Stream, String), UpstreamError> {
        let (host, port, tls) = match &self.spec.target {
            Target::Direct(u) => (u.host.clone(), u.port, self.spec.tls.as_ref()),
            Target::Sentinel(s) => {
                let (h, p) = self.ask_sentinels(&s.master, timeout).await?;
                (h, p, None)
            }
            Target::Cluster(c) => return self.open_cluster(c).await,
        };
        self.open_at(&host, port, None, tls).await
    }

    /// A cluster endpoint (control and health paths): the masters of the
    /// map first, then the seeds of the URL; the first that answers.
    async fn open_cluster(&self, c: &ClusterUrl) -> Result<(Stream, String), UpstreamError> {
        let map = self.cluster.as_ref().map(|t| t.map());
        let nodes: Vec<Node> = map
            .iter()
            .flat_map(|m| m.masters.iter().cloned())
            .chain(c.seeds.iter().map(|(h, p)| Node {
                id: String::new(),
                host: h.clone(),
                port: *p,
                hostname: None,
            }))
            .collect();
        let mut last = UpstreamError::unreachable("no cluster node to connect to");
        for n in &nodes {
            match self.open_node(n).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// One node of a cluster endpoint. TLS verifies the announced hostname
    /// (or `tls_server_name`) while connecting by address.
    pub async fn open_node(&self, node: &Node) -> Result<(Stream, String), UpstreamError> {
        let name = node.hostname.as_deref();
        self.open_at(&node.host, node.port, name, self.spec.tls.as_ref())
            .await
    }

    async fn open_at(
        &self,
        host: &str,
        port: u16,
        verify_as: Option<&str>,
        tls: Option<&crate::upstream::tls::TlsSettings>,
    ) -> Result<(Stream, String), UpstreamError> {
        let addr = host_port(host, port);
        // `TcpStream::connect` with a host name resolves it now: an
        // endpoint whose address changes is followed on the next connect.
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|e| UpstreamError::unreachable_by(format!("connect to {addr}"), e))?;
        tcp.set_nodelay(true).ok();
        let stream = match tls {
            None => Stream::Tcp(tcp),
            Some(t) => Stream::Tls(Box::new(
                t.connect(verify_as.unwrap_or(host), tcp)
                    .await
                    .map_err(|e| UpstreamError::unreachable_by(addr.clone(), e))?,
            )),
        };
        Ok((stream, addr))
    }

    /// Ask each sentinel in turn for the master's address; the first that
    /// names one moves to the front of the list.
    async fn ask_sentinels(
        &self,
        master: &str,
        timeout: Duration,
    ) -> Result<(String, u16), UpstreamError> {
        let order = self
            .sentinel_order
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut errors = Vec::new();
        for (i, (host, port)) in order.iter().enumerate() {
            let addr = host_port(host, *port);
            let mut cmds: Vec<Vec<Bytes>> = self.sentinel_auth().into_iter().collect();
            cmds.push(vec![
                Bytes::from_static(b"SENTINEL"),
                Bytes::from_static(b"get-master-addr-by-name"),
                Bytes::copy_from_slice(master.as_bytes()),
            ]);
            let asked = tokio::time::timeout(timeout, async {
                let tcp = TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
                let mut s = Stream::Tcp(tcp);
                roundtrip(&mut s, &mut BytesMut::new(), &cmds, 1 << 20)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
            let replies = match asked {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
                Err(_) => {
                    errors.push(format!("{addr}: timed out"));
                    continue;
                }
            };
            match replies.last().map(|r| parse_master_addr(r)) {
                Some(Ok(found)) => {
                    if i > 0 {
                        let mut o = self
                            .sentinel_order
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        if let Some(pos) = o.iter().position(|s| s == &order[i]) {
                            let s = o.remove(pos);
                            o.insert(0, s);
                        }
                    }
                    return Ok(found);
                }
                Some(Err(e)) => errors.push(format!("{addr}: {e}")),
                None => errors.push(format!("{addr}: no reply")),
            }
        }
        Err(UpstreamError::unreachable(format!(
            "no sentinel named a master for {master:?} ({})",
            errors.join("; ")
        )))
    }

    /// `AUTH` for the sentinels, if they have credentials.
    pub fn sentinel_auth(&self) -> Option<Vec<Bytes>> {
        self.spec.sentinel_auth.as_ref().map(|(user, pass)| {
            auth_command(
                user.as_ref().map(|u| Bytes::copy_from_slice(u.as_bytes())),
                Bytes::copy_from_slice(pass.expose().as_bytes()),
            )
        })
    }

    /// The sentinels' addresses (for the `+switch-master` listener).
    pub fn sentinels(&self) -> Vec<(String, u16)> {
        self.sentinel_order
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// `AUTH [user] password`: one argument when there is no user, as the
/// client gave it (Redis answers that form differently).
pub fn auth_command(user: Option<Bytes>, password: Bytes) -> Vec<Bytes> {
    let mut auth = vec![Bytes::from_static(b"AUTH")];
    auth.extend(user);
    auth.push(password);
    auth
}

/// `[ip, port]` from `SENTINEL get-master-addr-by-name`.
fn parse_master_addr(reply: &[u8]) -> Result<(String, u16), String> {
    use redis_protocol::resp2::types::OwnedFrame;
    let frame = redis_protocol::resp2::decode::decode(&Bytes::copy_from_slice(reply))
        .ok()
        .flatten()
        .map(|(f, _)| f)
        .ok_or("unreadable reply")?;
    match frame {
        OwnedFrame::Array(items) if items.len() == 2 => {
            let text = |f: &OwnedFrame| match f {
                OwnedFrame::BulkString(b) | OwnedFrame::SimpleString(b) => {
                    Some(String::from_utf8_lossy(b).into_owned())
                }
                _ => None,
            };
            let host = text(&items[0]).ok_or("bad address")?;
            let port = text(&items[1])
                .and_then(|p| p.parse::<u16>().ok())
                .ok_or("bad port")?;
            Ok((host, port))
        }
        OwnedFrame::Null => Err("does not know this master".into()),
        OwnedFrame::Error(e) => Err(e.to_string()),
        _ => Err("unexpected reply".into()),
    }
}

/// Send `cmds` in one write and read one reply each (control path: the
/// handshake, health checks, sentinels, `COMMAND`). `rbuf` may hold bytes
/// already read, and keeps what arrives past the last reply. Replies are
/// returned as they arrived, errors included.
pub async fn roundtrip(
    stream: &mut Stream,
    rbuf: &mut BytesMut,
    cmds: &[Vec<Bytes>],
    max_bulk: usize,
) -> Result<Vec<Bytes>, UpstreamError> {
    let mut out = BytesMut::new();
    for c in cmds {
        out.extend_from_slice(&encode_command(c));
    }
    stream
        .write_all(&out)
        .await
        .map_err(|_| UpstreamError::ConnectionLost)?;
    let mut scanner = ReplyScanner::new(max_bulk);
    let mut replies = Vec::with_capacity(cmds.len());
    while replies.len() < cmds.len() {
        match scanner.next(rbuf) {
            Ok(Some(f)) => replies.push(f),
            Ok(None) => {
                if stream
                    .read_buf(rbuf)
                    .await
                    .map_err(|_| UpstreamError::ConnectionLost)?
                    == 0
                {
                    return Err(UpstreamError::ConnectionLost);
                }
            }
            Err(e) => return Err(UpstreamError::Protocol(e.to_string())),
        }
    }
    Ok(replies)
}

/// The first element of a `ROLE` reply (`master`, `slave`, `sentinel`), or
/// `None` when the reply is an error (ROLE not allowed for this user, or
/// not supported by a managed service): the role is then unknown.
pub fn role_of(reply: &[u8]) -> Option<String> {
    let (frame, _) = redis_protocol::resp3::decode::complete::decode(reply).ok()??;
    use redis_protocol::resp3::types::OwnedFrame as F;
    match frame {
        F::Array { data, .. } => match data.first() {
            Some(F::BlobString { data, .. } | F::SimpleString { data, .. }) => {
                Some(String::from_utf8_lossy(data).into_owned())
            }
            _ => None,
        },
        _ => None,
    }
}

/// One `[[upstream]]`, parsed and checked.
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    pub name: String,
    pub target: Target,
    /// TLS settings (CA file loaded), for `rediss://`.
    pub tls: Option<crate::upstream::tls::TlsSettings>,
    /// Credentials for the sentinels (`redis-sentinel://`).
    pub sentinel_auth: Option<(Option<String>, Secret)>,
}

impl EndpointSpec {
    /// The same endpoint (health history carries over on reload).
    pub fn same_as(&self, other: &EndpointSpec) -> bool {
        self.name == other.name
            && self.target == other.target
            && self.tls == other.tls
            && self.sentinel_auth == other.sentinel_auth
    }
}

impl EndpointSpec {
    /// `[[upstream]]` number `i`, checked (its errors pushed to `errors`).
    pub fn from_config(
        i: usize,
        u: &UpstreamConfig,
        listen: Option<SocketAddr>,
        before: &[UpstreamConfig],
        errors: &mut Vec<String>,
    ) -> Option<EndpointSpec> {
        let n = errors.len();
        if u.name.is_empty() {
            errors.push(format!("upstream[{i}].name: must not be empty"));
        } else if !u
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            // Names appear in admin URLs and metric labels.
            errors.push(format!(
                "upstream[{i}].name: may only contain letters, digits, '-', '_' and '.'"
            ));
        }
        if before.iter().any(|o| o.name == u.name) {
            errors.push(format!("upstream[{i}].name: used twice"));
        }
        let target = match Target::parse(&u.url) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(format!("upstream[{i}].url: {e}"));
                None
            }
        };
        if let (Some(Target::Direct(url)), Some(l)) = (&target, listen)
            && url.port == l.port()
            && is_own_host(&url.host, &l)
        {
            // REDIS_URL=redis://127.0.0.1:6380 is what the app is given; if the
            // sidecar inherits it, it would proxy to itself.
            errors.push(format!(
                "upstream[{i}].url: {url} is this sidecar's own listen address"
            ));
        }
        let is_tls = match &target {
            Some(Target::Direct(u)) => u.tls,
            Some(Target::Cluster(c)) => c.tls,
            _ => false,
        };
        if !is_tls && (u.tls_ca_file.is_some() || u.tls_server_name.is_some()) {
            errors.push(format!(
            "upstream[{i}]: tls_ca_file and tls_server_name need a rediss:// or rediss-cluster:// URL"
        ));
        }
        let tls = if is_tls {
            match crate::upstream::tls::TlsSettings::new(
                u.tls_ca_file.as_deref(),
                u.tls_server_name.as_deref(),
            ) {
                Ok(t) => Some(t),
                Err(e) => {
                    errors.push(format!("upstream[{i}]: {e}"));
                    None
                }
            }
        } else {
            None
        };
        let is_sentinel = matches!(target, Some(Target::Sentinel(_)));
        if !is_sentinel && (u.sentinel_user.is_some() || u.sentinel_password.is_some()) {
            errors.push(format!(
                "upstream[{i}]: sentinel_user and sentinel_password need a redis-sentinel:// URL"
            ));
        }
        let sentinel_auth = u
            .sentinel_password
            .as_ref()
            .map(|p| (u.sentinel_user.clone(), Secret::new(p.clone())));
        match target {
            Some(target) if errors.len() == n => Some(EndpointSpec {
                name: u.name.clone(),
                target,
                tls,
                sentinel_auth,
            }),
            _ => None,
        }
    }
}

/// Would connecting to `host` reach the listener bound at `listen`?
fn is_own_host(host: &str, listen: &SocketAddr) -> bool {
    let loopback = matches!(host, "localhost" | "127.0.0.1" | "::1");
    let ip = host.parse::<std::net::IpAddr>().ok();
    // A remote address with the same port is another host: only an exact
    // match, or loopback against a loopback or any-address listener, is us.
    ip == Some(listen.ip())
        || (loopback && (listen.ip().is_loopback() || listen.ip().is_unspecified()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sentinel_and_role_replies() {
        assert_eq!(
            parse_master_addr(b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6379\r\n"),
            Ok(("127.0.0.1".to_string(), 6379))
        );
        assert!(parse_master_addr(b"*-1\r\n").is_err());
        assert!(parse_master_addr(b"-ERR no such master\r\n").is_err());
        assert_eq!(
            role_of(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n").as_deref(),
            Some("master")
        );
        assert_eq!(
            role_of(b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:1\r\n$9\r\nconnected\r\n:1\r\n")
                .as_deref(),
            Some("slave")
        );
        assert_eq!(role_of(b"-NOPERM no\r\n"), None);
    }
}
