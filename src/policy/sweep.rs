//! The TTL sweeper and the TTL audit: what the TTL stage cannot see.
//!
//! The stage acts on writes that pass through the sidecar. Keys written by
//! Lua scripts without declaring them, by other apps, or before a rule
//! existed are found by walking the keyspace: `SCAN 0 MATCH pattern COUNT
//! 100` on a connection of its own, then `PEXPIRE key D NX` / `PEXPIRE key
//! M LT` for each key found (the same commands the stage appends, so a
//! key that already complies is not touched, and WATCHers and caches are
//! not disturbed), at the rule's `sweep_rate` keys per second, across the
//! databases clients use, then a pause of `sweep_every`. A switch of the
//! active endpoint restarts the pass there. Progress is in metrics and the
//! log.
//!
//! [`audit`] is the read-only counterpart (`redis-sidecar ttl-audit`): it
//! samples each rule's keys with SCAN and PTTL and reports how many have no
//! TTL or one above the max, so an operator sees what a rule would do.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::glob::Glob;
use crate::config::{RuleMode, TtlRule};
use crate::metrics::Metrics;
use crate::upstream::pool::{ControlConn, Pool};
use crate::upstream::{Identity, UpstreamError};
use crate::wire::Proto;

/// Keys asked for per SCAN step.
const SCAN_COUNT: &str = "100";

/// One step of a SCAN: the next cursor and the keys.
async fn scan_step(
    conn: &mut ControlConn,
    cursor: &Bytes,
    pattern: &[u8],
) -> Result<(Bytes, Vec<Bytes>), UpstreamError> {
    let cmd = vec![
        Bytes::from_static(b"SCAN"),
        cursor.clone(),
        Bytes::from_static(b"MATCH"),
        Bytes::copy_from_slice(pattern),
        Bytes::from_static(b"COUNT"),
        Bytes::from_static(SCAN_COUNT.as_bytes()),
    ];
    let reply = conn
        .call(&[cmd])
        .await?
        .pop()
        .ok_or(UpstreamError::ConnectionLost)?;
    let bad = || UpstreamError::Protocol("unexpected SCAN reply".into());
    if crate::wire::is_error(&reply) {
        return Err(UpstreamError::Refused(crate::wire::error_text(&reply)));
    }
    let (frame, _) = redis_protocol::resp2::decode::decode(&reply)
        .ok()
        .flatten()
        .ok_or_else(bad)?;
    let OwnedFrame::Array(parts) = frame else {
        return Err(bad());
    };
    let (Some(OwnedFrame::BulkString(next)), Some(OwnedFrame::Array(keys))) =
        (parts.first(), parts.get(1))
    else {
        return Err(bad());
    };
    let keys = keys
        .iter()
        .filter_map(|k| match k {
            OwnedFrame::BulkString(b) => Some(Bytes::from(b.clone())),
            _ => None,
        })
        .collect();
    Ok((Bytes::from(next.clone()), keys))
}

/// `SELECT db` on a control connection (the URL's db is already selected).
async fn select(conn: &mut ControlConn, db: i64) -> Result<(), UpstreamError> {
    let r = conn
        .call(&[vec![
            Bytes::from_static(b"SELECT"),
            Bytes::from(db.to_string()),
        ]])
        .await?;
    match r.first() {
        Some(r) if !crate::wire::is_error(r) => Ok(()),
        Some(r) => Err(UpstreamError::Refused(crate::wire::error_text(r))),
        None => Err(UpstreamError::ConnectionLost),
    }
}

/// Rules compiled for a sweep or an audit, in order (first match wins).
struct Compiled {
    glob: Glob,
    pattern: Bytes,
    label: String,
    default: Option<u64>,
    max: Option<u64>,
}

fn compile(rules: &[TtlRule]) -> Vec<Compiled> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    rules
        .iter()
        .map(|r| Compiled {
            glob: Glob::new(r.pattern.as_bytes()),
            pattern: Bytes::from(r.pattern.clone()),
            label: r.label().to_string(),
            default: r.default.map(ms),
            max: r.max.map(ms),
        })
        .collect()
}

/// Start a sweeper for every rule with a `sweep_rate`; they stop when
/// `stop` is cancelled (a reload replaces them, shutdown ends them).
pub fn start(
    rules: &[TtlRule],
    pool: &Arc<Pool>,
    metrics: &Metrics,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) {
    let compiled = Arc::new(compile(rules));
    for (i, r) in rules.iter().enumerate() {
        let Some(rate) = r.sweep_rate else {
            continue;
        };
        if compiled[i].default.is_none() && compiled[i].max.is_none() {
            continue;
        }
        let sweeper = Sweeper {
            rules: compiled.clone(),
            index: i,
            rate: rate.get(),
            every: r.sweep_every,
            observe: r.mode == RuleMode::Observe,
            pool: pool.clone(),
            metrics: metrics.clone(),
        };
        let stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = sweeper.run() => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

struct Sweeper {
    rules: Arc<Vec<Compiled>>,
    index: usize,
    /// Keys per second.
    rate: u32,
    every: Duration,
    observe: bool,
    pool: Arc<Pool>,
    metrics: Metrics,
}

impl Sweeper {
    fn rule(&self) -> &Compiled {
        &self.rules[self.index]
    }

    /// The key belongs to this rule: an earlier rule does not match it.
    fn owns(&self, key: &[u8]) -> bool {
        !self.rules[..self.index].iter().any(|r| r.glob.matches(key))
    }

    async fn run(self) {
        let label = self.rule().label.clone();
        let scanned = self.metrics.ttl_sweep_scanned(&label);
        let passes = self.metrics.ttl_sweep_passes(&label);
        let fixed = self.metrics.ttl_enforced(&label, "sweep");
        let observed = self.metrics.ttl_enforced(&label, "observe");
        loop {
            match self.pass(&scanned, &fixed, &observed).await {
                Ok((n, changed)) => {
                    passes.inc();
                    tracing::info!(rule = %label, scanned = n, changed, "TTL sweep done");
                    tokio::time::sleep(self.every).await;
                }
                Err(e) => {
                    tracing::warn!(rule = %label, error = %e, "TTL sweep interrupted; starting again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// One walk over every db in use: (keys scanned, keys changed).
    async fn pass(
        &self,
        scanned: &prometheus::IntCounter,
        fixed: &prometheus::IntCounter,
        observed: &prometheus::IntCounter,
    ) -> Result<(u64, u64), UpstreamError> {
        let rule = self.rule();
        let ident = Identity {
            proto: Proto::Resp2,
            db: crate::upstream::URL_DB,
            auth: None,
        };
        let mut conn = self.pool.control(&ident).await?;
        let (mut total, mut changed) = (0u64, 0u64);
        for db in self.pool.dbs_in_use() {
            select(&mut conn, db).await?;
            let mut cursor = Bytes::from_static(b"0");
            loop {
                if self.pool.ups.active().generation != conn.generation {
                    return Err(UpstreamError::Routing("the active endpoint changed".into()));
                }
                let (next, keys) = scan_step(&mut conn, &cursor, &rule.pattern).await?;
                let keys: Vec<Bytes> = keys.into_iter().filter(|k| self.owns(k)).collect();
                if !keys.is_empty() {
                    let n = self.apply(&mut conn, &keys).await?;
                    if self.observe {
                        observed.inc_by(n);
                    } else {
                        fixed.inc_by(n);
                    }
                    changed += n;
                    total += keys.len() as u64;
                    scanned.inc_by(keys.len() as u64);
                    // The rate: this batch's share of a second.
                    tokio::time::sleep(Duration::from_secs_f64(
                        keys.len() as f64 / f64::from(self.rate),
                    ))
                    .await;
                }
                if &next[..] == b"0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok((total, changed))
    }

    /// Give `keys` the rule's TTLs (or, observing, count those that would
    /// change): how many changed.
    async fn apply(&self, conn: &mut ControlConn, keys: &[Bytes]) -> Result<u64, UpstreamError> {
        let rule = self.rule();
        if self.observe {
            let cmds: Vec<Vec<Bytes>> = keys
                .iter()
                .map(|k| vec![Bytes::from_static(b"PTTL"), k.clone()])
                .collect();
            let replies = conn.call(&cmds).await?;
            return Ok(replies
                .iter()
                .filter(|r| would_change(pttl(r), rule.default, rule.max))
                .count() as u64);
        }
        let mut cmds = Vec::with_capacity(keys.len() * 2);
        for k in keys {
            if let Some(d) = rule.default
                && rule.max.is_none_or(|m| d < m)
            {
                cmds.push(pexpire(k, d, "NX"));
            }
            if let Some(m) = rule.max {
                cmds.push(pexpire(k, m, "LT"));
            }
        }
        let replies = conn.call(&cmds).await?;
        Ok(replies.iter().filter(|r| &r[..] == b":1\r\n").count() as u64)
    }
}

fn pexpire(key: &Bytes, ms: u64, opt: &'static str) -> Vec<Bytes> {
    vec![
        Bytes::from_static(b"PEXPIRE"),
        key.clone(),
        Bytes::from(ms.to_string()),
        Bytes::from_static(opt.as_bytes()),
    ]
}

/// The integer of a PTTL reply (`-2` when it is not one).
fn pttl(reply: &[u8]) -> i64 {
    reply
        .strip_prefix(b":")
        .and_then(|r| r.strip_suffix(b"\r\n"))
        .and_then(crate::wire::scan::parse_int)
        .unwrap_or(-2)
}

/// Would the rule change a key with this PTTL? (-1: no TTL; -2: gone.)
fn would_change(pttl: i64, default: Option<u64>, max: Option<u64>) -> bool {
    match pttl {
        -2 => false,
        -1 => default.or(max).is_some(),
        t => max.is_some_and(|m| t as u64 > m),
    }
}

/// What `ttl-audit` found for one rule.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub rule: String,
    pub sampled: u64,
    pub no_ttl: u64,
    pub above_max: u64,
    /// Keys a sweep would change.
    pub would_change: u64,
}

/// Sample up to `sample` keys per rule in `db` (SCAN and PTTL only; no
/// key is changed).
pub async fn audit(
    conn: &mut ControlConn,
    rules: &[TtlRule],
    db: i64,
    sample: u64,
) -> Result<Vec<AuditRow>, UpstreamError> {
    select(conn, db).await?;
    let compiled = compile(rules);
    let mut rows = Vec::new();
    for (i, rule) in compiled.iter().enumerate() {
        let mut row = AuditRow {
            rule: rule.label.clone(),
            ..AuditRow::default()
        };
        let mut cursor = Bytes::from_static(b"0");
        while row.sampled < sample {
            let (next, keys) = scan_step(conn, &cursor, &rule.pattern).await?;
            let keys: Vec<Bytes> = keys
                .into_iter()
                .filter(|k| !compiled[..i].iter().any(|r| r.glob.matches(k)))
                .take((sample - row.sampled) as usize)
                .collect();
            if !keys.is_empty() {
                let cmds: Vec<Vec<Bytes>> = keys
                    .iter()
                    .map(|k| vec![Bytes::from_static(b"PTTL"), k.clone()])
                    .collect();
                for r in conn.call(&cmds).await? {
                    let t = pttl(&r);
                    if t == -2 {
                        continue;
                    }
                    row.sampled += 1;
                    row.no_ttl += u64::from(t == -1);
                    row.above_max += u64::from(rule.max.is_some_and(|m| t > 0 && t as u64 > m));
                    row.would_change += u64::from(would_change(t, rule.default, rule.max));
                }
            }
            if &next[..] == b"0" {
                break;
            }
            cursor = next;
        }
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_rule_would_change() {
        assert!(would_change(-1, Some(10), None));
        assert!(would_change(-1, None, Some(10)));
        assert!(!would_change(-1, None, None));
        assert!(would_change(11, None, Some(10)));
        assert!(!would_change(10, Some(5), Some(10)));
        assert!(!would_change(-2, Some(5), Some(10)));
        assert_eq!(pttl(b":1500\r\n"), 1500);
        assert_eq!(pttl(b"-ERR x\r\n"), -2);
    }
}
