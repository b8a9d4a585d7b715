//! One end of a migration: its endpoint and control connection, the db
//! it has selected, what `INFO keyspace`, `SCAN`, `RANDOMKEY` and `CLIENT
//! LIST` say there (every master of a cluster).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::upstream::endpoint::Endpoint;
use crate::upstream::pool::{ControlConn, Pool};
use crate::upstream::{Identity, URL_DB, UpstreamError};
use crate::wire::resp::bulk_text;
use crate::wire::{Proto, error_text, is_error};

/// The migration's connections' name on both sides (`CLIENT LIST`).
pub const CLIENT_NAME: &str = "redis-sidecar-migration";

/// A control connection to `e` with its URL's credentials and db (in
/// front of a cluster, routing by `e`'s slot map).
pub(super) async fn connect(
    pool: &Arc<Pool>,
    e: &Arc<Endpoint>,
) -> Result<ControlConn, UpstreamError> {
    connect_as(pool, e, CLIENT_NAME).await
}

/// [`connect`], the connection named `name` (for whoever looks at `CLIENT
/// LIST` on either side).
pub(super) async fn connect_as(
    pool: &Arc<Pool>,
    e: &Arc<Endpoint>,
    name: &'static str,
) -> Result<ControlConn, UpstreamError> {
    let ident = Identity {
        proto: Proto::Resp2,
        db: URL_DB,
        auth: None,
    };
    let name = Bytes::from_static(name.as_bytes());
    pool.control_for(e, &ident, Some(&name)).await
}

/// Another sidecar seen in `CLIENT LIST`: its name (its health checks'
/// connection's), and where that connection comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Other {
    pub name: String,
    pub addr: String,
}

impl std::fmt::Display for Other {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.addr)
    }
}

/// The other sidecars whose health checks reach `c`'s server (every
/// master of a cluster), from `CLIENT LIST`; `None` when the server does
/// not say (CLIENT LIST refused).
pub(super) async fn other_sidecars(c: &mut ControlConn, me: &[u8]) -> Option<Vec<Other>> {
    let replies = c.each_master(&cmd(&[b"CLIENT", b"LIST"])).await.ok()?;
    let mut out: Vec<Other> = Vec::new();
    for r in replies {
        out.extend(sidecars_in(&String::from_utf8_lossy(&bulk(&r)?), me));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    Some(out)
}

/// The sidecars' connections in a `CLIENT LIST` text but `me`.
fn sidecars_in(list: &str, me: &[u8]) -> Vec<Other> {
    let me = String::from_utf8_lossy(me);
    list.lines()
        .filter_map(|l| {
            let field = |k: &str| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix(k).and_then(|f| f.strip_prefix('=')))
            };
            let name = field("name")?;
            (name.starts_with(crate::upstream::failover::INSTANCE_PREFIX) && name != me).then(
                || Other {
                    name: name.to_string(),
                    addr: field("addr").unwrap_or("?").to_string(),
                },
            )
        })
        .collect()
}

pub(super) fn cmd(parts: &[&[u8]]) -> Vec<Bytes> {
    parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
}

/// A bulk reply's payload, as a slice of it (`None`: null, not a bulk).
pub(super) fn bulk(r: &Bytes) -> Option<Bytes> {
    bulk_text(r).map(|b| r.slice_ref(b))
}

/// One end of the migration: its endpoint and control connection, and
/// the db that connection has selected.
pub(super) struct Side {
    pub(super) ep: Arc<Endpoint>,
    pub(super) conn: ControlConn,
    pub(super) db: Option<i64>,
    pub(super) what: &'static str,
    /// The connection failed (not a command): what the copy does next
    /// depends on which side it was.
    pub(super) lost: bool,
}

impl Side {
    pub(super) fn new(ep: Arc<Endpoint>, conn: ControlConn, what: &'static str) -> Side {
        Side {
            ep,
            conn,
            db: None,
            what,
            lost: false,
        }
    }

    /// A new control connection to the same endpoint.
    pub(super) async fn reconnect(&mut self, pool: &Arc<Pool>) -> Result<(), UpstreamError> {
        self.conn = connect(pool, &self.ep).await?;
        self.db = None;
        self.lost = false;
        Ok(())
    }

    /// The server's `run_id` (`INFO server`): another one after a
    /// reconnect means it restarted, and may have lost what it had.
    pub(super) async fn run_id(&mut self) -> Result<String, String> {
        let r = self.call(&[cmd(&[b"INFO", b"server"])]).await?;
        let text = bulk(&r[0]).ok_or("INFO: not a bulk reply")?;
        Ok(String::from_utf8_lossy(&text)
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap_or_default()
            .trim()
            .to_string())
    }

    pub(super) async fn call(&mut self, cmds: &[Vec<Bytes>]) -> Result<Vec<Bytes>, String> {
        let name = cmds
            .first()
            .and_then(|c| c.first())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default();
        let r = self.conn.call(cmds).await;
        r.map_err(|e| self.lost(&name, e))
    }

    /// The connection failed running `name`: marked lost, and said so.
    fn lost(&mut self, name: &str, e: UpstreamError) -> String {
        self.lost = true;
        format!("{name} on the {} ({}): {e}", self.what, self.ep.name())
    }

    pub(super) async fn select(&mut self, db: i64) -> Result<(), String> {
        if self.db == Some(db) {
            return Ok(());
        }
        let r = self
            .call(&[vec![
                Bytes::from_static(b"SELECT"),
                Bytes::from(db.to_string()),
            ]])
            .await?;
        if is_error(&r[0]) {
            return Err(format!(
                "SELECT {db} on the {}: {}",
                self.what,
                error_text(&r[0])
            ));
        }
        self.db = Some(db);
        Ok(())
    }

    /// Every db that holds keys: its keys and, of them, those with a TTL
    /// (`INFO keyspace`).
    pub(super) async fn databases(&mut self) -> Result<HashMap<i64, (u64, u64)>, String> {
        let mut out: HashMap<i64, (u64, u64)> = HashMap::new();
        // Every master of a cluster, summed.
        for r in self.each_master(&cmd(&[b"INFO", b"keyspace"])).await? {
            let text = bulk(&r).ok_or("INFO: not a bulk reply")?;
            for (db, (k, e)) in parse_keyspace(&String::from_utf8_lossy(&text)) {
                let t = out.entry(db).or_default();
                t.0 += k;
                t.1 += e;
            }
        }
        Ok(out)
    }

    /// `cmd` on every master of a cluster, or on the one Redis.
    pub(super) async fn each_master(&mut self, cmd: &[Bytes]) -> Result<Vec<Bytes>, String> {
        let name = String::from_utf8_lossy(&cmd[0]).into_owned();
        let r = self.conn.each_master(cmd).await;
        r.map_err(|e| self.lost(&name, e))
    }

    /// Up to `n` random keys of the selected db (of every master).
    pub(super) async fn random_keys(&mut self, n: usize) -> Result<Vec<Bytes>, String> {
        let mut keys = Vec::new();
        for _ in 0..n {
            let r = self.each_master(&cmd(&[b"RANDOMKEY"])).await?;
            keys.extend(r.iter().filter_map(bulk));
            if keys.len() >= n {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// SCAN the selected db to its end (`pattern`: MATCH).
    pub(super) async fn scan_all(&mut self, pattern: &[u8]) -> Result<Vec<Bytes>, String> {
        let mut cursor = Bytes::from_static(b"0");
        let mut out = Vec::new();
        loop {
            let r = self
                .call(&[vec![
                    Bytes::from_static(b"SCAN"),
                    cursor,
                    Bytes::from_static(b"MATCH"),
                    Bytes::copy_from_slice(pattern),
                    Bytes::from_static(b"COUNT"),
                    Bytes::from_static(b"1000"),
                ]])
                .await?;
            let (next, keys) = scan_reply(&r[0]).ok_or("SCAN: not an array reply")?;
            out.extend(keys);
            if next == b"0"[..] {
                return Ok(out);
            }
            cursor = next;
        }
    }
}

/// `db0:keys=3,expires=1,avg_ttl=0` lines: db → (keys, expires).
fn parse_keyspace(text: &str) -> HashMap<i64, (u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let (db, rest) = l.trim().strip_prefix("db")?.split_once(':')?;
            let mut keys = None;
            let mut expires = 0;
            for field in rest.split(',') {
                match field.split_once('=') {
                    Some(("keys", n)) => keys = n.parse().ok(),
                    Some(("expires", n)) => expires = n.parse().unwrap_or(0),
                    _ => {}
                }
            }
            Some((db.parse().ok()?, (keys?, expires)))
        })
        .collect()
}

/// SCAN's `[cursor, [keys...]]`.
pub(super) fn scan_reply(r: &Bytes) -> Option<(Bytes, Vec<Bytes>)> {
    let outer = crate::wire::scan::split_array(r)?;
    let (cs, ce) = *outer.first()?;
    let cursor = bulk(&r.slice(cs..ce))?;
    let (ks, ke) = *outer.get(1)?;
    let inner = r.slice(ks..ke);
    let keys = crate::wire::scan::split_array(&inner)?
        .iter()
        .filter_map(|&(s, e)| bulk(&inner.slice(s..e)))
        .collect();
    Some((cursor, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_sidecars_in_client_list() {
        let list = "id=3 addr=10.0.0.5:40112 laddr=x fd=8 name=redis-sidecar:web1:77:0 age=3\n\
                    id=4 addr=10.0.0.6:40113 laddr=x fd=9 name=redis-sidecar:web2:12:0 age=3\n\
                    id=5 addr=10.0.0.6:40114 laddr=x fd=9 name=redis-sidecar-migration age=3\n\
                    id=6 addr=10.0.0.7:40115 laddr=x fd=9 name= age=3\n";
        assert_eq!(
            sidecars_in(list, b"redis-sidecar:web1:77:0"),
            vec![Other {
                name: "redis-sidecar:web2:12:0".into(),
                addr: "10.0.0.6:40113".into()
            }]
        );
    }

    #[test]
    fn keyspace_lines() {
        let m = parse_keyspace(
            "# Keyspace\r\ndb0:keys=3,expires=1,avg_ttl=5\r\ndb12:keys=7,expires=0,avg_ttl=0,subexpiry=0\r\n",
        );
        assert_eq!(m.get(&0), Some(&(3, 1)));
        assert_eq!(m.get(&12), Some(&(7, 0)));
        assert_eq!(m.len(), 2);
    }
}
