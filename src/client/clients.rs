//! The sidecar's own clients, as the CLIENT family sees them: a registry
//! of live sessions with what `CLIENT LIST` / `CLIENT INFO` show (in
//! Redis's format), the filters of `CLIENT KILL` and `CLIENT LIST`, and
//! what `CLIENT UNBLOCK` and `CLIENT TRACKING ... REDIRECT` need to reach a
//! client's dedicated upstream connection. The app sees the sidecar as its
//! Redis, so these commands act on the sidecar's clients, never on the
//! sidecar's upstream connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use bytes::Bytes;

use crate::request::command::interned;
use crate::upstream::ClientShared;

/// What a session publishes about itself (on state changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub name: Option<Bytes>,
    /// The database the client is in (the URL's when it never selected).
    pub db: i64,
    pub user: Option<Bytes>,
    pub resp: i64,
    /// `N`, or Redis's letters: `x` MULTI, `P` pub/sub, `t` tracking ...
    pub flags: &'static str,
    /// Commands queued in MULTI, or -1.
    pub multi: i64,
    pub sub: usize,
    pub psub: usize,
    pub ssub: usize,
    pub lib_name: Option<Bytes>,
    pub lib_ver: Option<Bytes>,
}

impl Default for Published {
    fn default() -> Self {
        Published {
            name: None,
            db: 0,
            user: None,
            resp: 2,
            flags: "N",
            multi: -1,
            sub: 0,
            psub: 0,
            ssub: 0,
            lib_name: None,
            lib_ver: None,
        }
    }
}

/// One live client.
pub struct ClientEntry {
    pub id: u64,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub fd: i64,
    pub created: Instant,
    pub client: Arc<ClientShared>,
    /// `None` while everything is at its default: 10,000 idle clients do
    /// not each hold a full record.
    state: Mutex<Option<Box<Published>>>,
    /// The last command's interned name id (`u32::MAX`: none yet), and
    /// when it came (seconds after `created`, what CLIENT LIST shows):
    /// atomics, as they change on every command.
    last_cmd: AtomicU32,
    last_active_s: AtomicU64,
    /// See the session's `blocked_until`: blocked while fewer output
    /// entries are complete.
    pub blocked_until: AtomicU64,
    /// The output entry of the last blocking command sent (dropped if the
    /// client leaves while it waits).
    pub blocked_seq: AtomicU64,
    /// The upstream's id of the client's dedicated connection, -1 if none.
    pub upstream_id: AtomicI64,
}

impl ClientEntry {
    pub fn new(
        id: u64,
        peer: SocketAddr,
        local: SocketAddr,
        fd: i64,
        client: Arc<ClientShared>,
    ) -> ClientEntry {
        ClientEntry {
            id,
            peer,
            local,
            fd,
            created: Instant::now(),
            client,
            state: Mutex::new(None),
            last_cmd: AtomicU32::new(u32::MAX),
            last_active_s: AtomicU64::new(0),
            blocked_until: AtomicU64::new(0),
            blocked_seq: AtomicU64::new(0),
            upstream_id: AtomicI64::new(-1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Box<Published>>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn publish(&self, p: Published) {
        let p = (p != Published::default()).then(|| Box::new(p));
        *self.lock() = p;
    }

    pub fn published(&self) -> Published {
        self.lock().as_deref().cloned().unwrap_or_default()
    }

    /// A command was read (its interned name id).
    pub fn touch_cmd(&self, id: u32) {
        self.last_cmd.store(id, Ordering::Relaxed);
    }

    /// The client was active at `at`.
    pub fn touch_time(&self, at: Instant) {
        let secs = at.saturating_duration_since(self.created).as_secs();
        self.last_active_s.store(secs, Ordering::Relaxed);
    }

    /// Blocked in a blocking command on its dedicated connection.
    pub fn is_blocked(&self) -> bool {
        self.client.progress.done() < self.blocked_until.load(Ordering::Acquire)
    }

    pub fn upstream_id(&self) -> Option<i64> {
        let id = self.upstream_id.load(Ordering::Acquire);
        (id >= 0).then_some(id)
    }

    /// Redis's `CLIENT LIST` line for this client.
    pub fn line(&self) -> String {
        let p = self.published();
        let cmd = interned(self.last_cmd.load(Ordering::Relaxed)).unwrap_or("NULL");
        let age = self.created.elapsed();
        let idle = age.saturating_sub(std::time::Duration::from_secs(
            self.last_active_s.load(Ordering::Relaxed),
        ));
        let text = |b: &Option<Bytes>| {
            b.as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let mut flags = p.flags.to_string();
        if self.is_blocked() {
            flags = if flags == "N" {
                "b".into()
            } else {
                flags + "b"
            };
        }
        format!(
            "id={} addr={} laddr={} fd={} name={} age={} idle={} flags={} db={} sub={} psub={} ssub={} multi={} qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd={} user={} redir=-1 resp={} lib-name={} lib-ver={}\n",
            self.id,
            self.peer,
            self.local,
            self.fd,
            text(&p.name),
            age.as_secs(),
            idle.as_secs(),
            flags,
            p.db,
            p.sub,
            p.psub,
            p.ssub,
            p.multi,
            cmd,
            p.user
                .as_ref()
                .map(|u| String::from_utf8_lossy(u).into_owned())
                .unwrap_or_else(|| "default".into()),
            p.resp,
            text(&p.lib_name),
            text(&p.lib_ver),
        )
    }

    /// The client's type for `TYPE` filters.
    fn kind(&self) -> &'static str {
        // As Redis's getClientType: MONITOR is a normal client.
        let flags = self.published().flags;
        if flags.contains('S') {
            "replica"
        } else if flags.contains('P') {
            "pubsub"
        } else {
            "normal"
        }
    }
}

/// Live clients by id (ordered, as `CLIENT LIST` shows them).
#[derive(Default)]
pub struct Registry {
    live: Mutex<BTreeMap<u64, Arc<ClientEntry>>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<ClientEntry>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn insert(&self, e: Arc<ClientEntry>) {
        self.lock().insert(e.id, e);
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn get(&self, id: u64) -> Option<Arc<ClientEntry>> {
        self.lock().get(&id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<ClientEntry>> {
        self.lock().values().cloned().collect()
    }
}

/// A `CLIENT LIST` / `CLIENT KILL` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    Id(Vec<u64>),
    Type(&'static str),
    User(Bytes),
    Addr(Bytes),
    Laddr(Bytes),
    SkipMe(bool),
    MaxAge(u64),
}

/// Parse `TYPE t`, `ID id ...` (LIST) or the KILL filters, with Redis's
/// errors.
pub fn parse_filters(args: &[Bytes], kill: bool) -> Result<Vec<Filter>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let opt = args[i].to_ascii_lowercase();
        let Some(v) = args.get(i + 1) else {
            return Err("ERR syntax error".into());
        };
        match &opt[..] {
            b"id" if !kill => {
                let mut ids = Vec::new();
                for a in &args[i + 1..] {
                    match crate::wire::scan::parse_int(a) {
                        Some(n) if n > 0 => ids.push(n as u64),
                        _ => return Err("ERR Invalid client ID".into()),
                    }
                }
                out.push(Filter::Id(ids));
                return Ok(out);
            }
            b"id" => match crate::wire::scan::parse_int(v) {
                Some(n) if n > 0 => out.push(Filter::Id(vec![n as u64])),
                _ => return Err("ERR client-id should be greater than 0".into()),
            },
            b"type" => {
                let t = match &v.to_ascii_lowercase()[..] {
                    b"normal" => "normal",
                    b"pubsub" => "pubsub",
                    b"master" => "master",
                    b"replica" | b"slave" => "replica",
                    _ => {
                        return Err(format!(
                            "ERR Unknown client type '{}'",
                            String::from_utf8_lossy(v)
                        ));
                    }
                };
                out.push(Filter::Type(t));
            }
            b"user" if kill => out.push(Filter::User(v.clone())),
            b"addr" if kill => out.push(Filter::Addr(v.clone())),
            b"laddr" if kill => out.push(Filter::Laddr(v.clone())),
            b"skipme" if kill => match &v.to_ascii_lowercase()[..] {
                b"yes" => out.push(Filter::SkipMe(true)),
                b"no" => out.push(Filter::SkipMe(false)),
                _ => return Err("ERR syntax error".into()),
            },
            b"maxage" if kill => match crate::wire::scan::parse_int(v) {
                Some(n) if n >= 0 => out.push(Filter::MaxAge(n as u64)),
                _ => return Err("ERR syntax error".into()),
            },
            _ => return Err("ERR syntax error".into()),
        }
        i += 2;
    }
    Ok(out)
}

impl Filter {
    /// Does `e` pass this filter, for the client `me`?
    pub fn matches(&self, e: &ClientEntry, me: u64) -> bool {
        match self {
            Filter::Id(ids) => ids.contains(&e.id),
            Filter::Type(t) => e.kind() == *t,
            Filter::User(u) => {
                let user = e.published().user;
                user.as_deref().unwrap_or(b"default") == &u[..]
            }
            Filter::Addr(a) => e.peer.to_string().as_bytes() == &a[..],
            Filter::Laddr(a) => e.local.to_string().as_bytes() == &a[..],
            Filter::SkipMe(skip) => !(*skip && e.id == me),
            Filter::MaxAge(secs) => e.created.elapsed().as_secs() >= *secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_with_redis_errors() {
        let b = |s: &str| {
            s.split(' ')
                .map(|x| Bytes::from(x.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            parse_filters(&b("ID 7 TYPE normal SKIPME no"), true),
            Ok(vec![
                Filter::Id(vec![7]),
                Filter::Type("normal"),
                Filter::SkipMe(false)
            ])
        );
        assert_eq!(
            parse_filters(&b("TYPE nope"), true),
            Err("ERR Unknown client type 'nope'".into())
        );
        assert_eq!(
            parse_filters(&b("ID 1 2 3"), false),
            Ok(vec![Filter::Id(vec![1, 2, 3])])
        );
        assert_eq!(
            parse_filters(&b("ID"), true),
            Err("ERR syntax error".into())
        );
    }
}
