//! The TTL stage: key-pattern rules (`[[ttl]]`, first match wins) that
//! give every key a write leaves without a TTL its rule's `default`, and
//! clamp longer TTLs to its `max`.
//!
//! How each write is handled (keys and their write flags come from the
//! command table's key specs; keys a command only deletes or pops from are
//! left alone):
//!
//! * `SET` without an expiry option gets `PX default` (or `PX max` under a
//!   max-only rule); `SET .. EX/PX t` above max is rewritten to `PX max`;
//!   `SETEX`/`PSETEX` above max become `PSETEX key max`; `GETEX EX/PX`
//!   above max is clamped the same way. In place: no extra command, and
//!   the reply does not depend on the TTL.
//! * `SET .. KEEPTTL`, `SET .. EXAT/PXAT` (only the upstream's clock may
//!   judge an absolute time) and every other write (HSET, INCR, LPUSH,
//!   RENAME/COPY destinations, *STORE, RESTORE, PERSIST, GETEX PERSIST,
//!   EVAL's declared keys ...) are followed on the same connection by
//!   `PEXPIRE key default NX` and/or `PEXPIRE key max LT` (Redis counts no
//!   TTL as infinite for LT, so a max alone also gives a key without TTL
//!   the max), their replies consumed; inside MULTI they are queued in the
//!   same transaction and their elements removed from the EXEC array.
//! * `EXPIRE`/`PEXPIRE`/`EXPIREAT`/`PEXPIREAT` are forwarded as sent (the
//!   client gets Redis's own reply, which a rewrite could flip under GT or
//!   XX) and followed by `PEXPIRE key max LT`.
//!
//! An `observe` rule changes nothing and counts what it would have done
//! (`ttl_enforced_total{action="observe"}`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use prometheus::IntCounter;

use super::glob::Glob;
use super::{Ctx, PolicyError, Stage, Verdict};
use crate::config::{RuleMode, TtlRule};
use crate::exchange::{Exchange, ReplyAction};
use crate::metrics::Metrics;
use crate::protocol::scan::parse_int;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    #[error("pattern must not be empty")]
    EmptyPattern,
    #[error("{0} must be at least 1ms")]
    TooShort(&'static str),
    #[error("max must be at least default")]
    MaxBelowDefault,
}

/// One compiled rule.
struct Rule {
    glob: Glob,
    label: String,
    /// Milliseconds.
    default: Option<u64>,
    max: Option<u64>,
    observe: bool,
    counted_default: IntCounter,
    counted_clamp: IntCounter,
    counted_observe: IntCounter,
    append_errors: IntCounter,
    /// An appended command's error is logged once per rule.
    logged: AtomicBool,
}

impl Rule {
    /// The TTL a key with none gets: the default, else the max.
    fn fill(&self) -> Option<u64> {
        self.default.or(self.max)
    }

    fn exempt(&self) -> bool {
        self.default.is_none() && self.max.is_none()
    }
}

pub struct Ttl {
    rules: Vec<Arc<Rule>>,
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Ttl {
    /// `None` when there are no rules (no stage at all).
    pub fn from_config(
        rules: &[TtlRule],
        metrics: &Metrics,
    ) -> Result<Option<Ttl>, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut out = Vec::new();
        for (index, r) in rules.iter().enumerate() {
            let mut err = |reason| errors.push(PolicyError::Ttl { index, reason });
            if r.pattern.is_empty() {
                err(TtlError::EmptyPattern);
            }
            for (name, d) in [("default", r.default), ("max", r.max)] {
                if d.is_some_and(|d| d < std::time::Duration::from_millis(1)) {
                    err(TtlError::TooShort(name));
                }
            }
            if let (Some(d), Some(m)) = (r.default, r.max)
                && m < d
            {
                err(TtlError::MaxBelowDefault);
            }
            let label = r.label().to_string();
            out.push(Arc::new(Rule {
                glob: Glob::new(r.pattern.as_bytes()),
                default: r.default.map(ms),
                max: r.max.map(ms),
                observe: r.mode == RuleMode::Observe,
                counted_default: metrics.ttl_enforced(&label, "default"),
                counted_clamp: metrics.ttl_enforced(&label, "clamp"),
                counted_observe: metrics.ttl_enforced(&label, "observe"),
                append_errors: metrics.ttl_append_errors(&label),
                logged: AtomicBool::new(false),
                label,
            }));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok((!out.is_empty()).then_some(Ttl { rules: out }))
    }

    fn rule(&self, key: &[u8]) -> Option<&Arc<Rule>> {
        self.rules
            .iter()
            .find(|r| r.glob.matches(key))
            .filter(|r| !r.exempt())
    }
}

/// What the stage does to one exchange: appended commands and the rules
/// they came from (for counting their errors).
struct Plan<'a> {
    appended: Vec<(Vec<Bytes>, Arc<Rule>)>,
    rewrite: Option<Vec<Bytes>>,
    args: &'a [Bytes],
}

impl Plan<'_> {
    /// `PEXPIRE key default NX` (when the default is not covered by the
    /// max) and `PEXPIRE key max LT`.
    fn fill_and_clamp(&mut self, rule: &Arc<Rule>, key: &Bytes) {
        if let Some(d) = rule.default
            && rule.max.is_none_or(|m| d < m)
        {
            self.push(rule, key, d, "NX", &rule.counted_default);
        }
        if let Some(m) = rule.max {
            self.push(rule, key, m, "LT", &rule.counted_clamp);
        }
    }

    fn clamp(&mut self, rule: &Arc<Rule>, key: &Bytes) {
        if let Some(m) = rule.max {
            self.push(rule, key, m, "LT", &rule.counted_clamp);
        }
    }

    fn push(&mut self, rule: &Arc<Rule>, key: &Bytes, ms: u64, opt: &'static str, c: &IntCounter) {
        if rule.observe {
            rule.counted_observe.inc();
            tracing::debug!(rule = %rule.label, ms, opt, "observe: would append PEXPIRE");
            return;
        }
        c.inc();
        self.appended.push((
            vec![
                Bytes::from_static(b"PEXPIRE"),
                key.clone(),
                Bytes::from(ms.to_string()),
                Bytes::from_static(opt.as_bytes()),
            ],
            rule.clone(),
        ));
    }

    /// Replace `args[at..at + n]` with `PX ms` (in place, no extra command).
    fn set_px(&mut self, rule: &Rule, at: usize, n: usize, ms: u64, c: &IntCounter) {
        if rule.observe {
            rule.counted_observe.inc();
            tracing::debug!(rule = %rule.label, ms, "observe: would set PX");
            return;
        }
        c.inc();
        let mut args = self.rewrite.take().unwrap_or_else(|| self.args.to_vec());
        args.splice(
            at..at + n,
            [Bytes::from_static(b"PX"), Bytes::from(ms.to_string())],
        );
        self.rewrite = Some(args);
    }
}

/// A SET's expiry option: its position, name (upper case) and value.
type Expiry = (usize, Vec<u8>, Option<i64>);

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT|PXAT|KEEPTTL]`: the
/// expiry option; `Err` when the options do not parse (Redis answers the
/// error; nothing to do).
fn set_expiry(args: &[Bytes]) -> Result<Option<Expiry>, ()> {
    let mut found = None;
    let mut i = 3;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        match &opt[..] {
            b"NX" | b"XX" | b"GET" => i += 1,
            b"KEEPTTL" => {
                found = Some((i, opt, None));
                i += 1;
            }
            b"EX" | b"PX" | b"EXAT" | b"PXAT" => {
                let v = args.get(i + 1).and_then(|v| parse_int(v)).ok_or(())?;
                found = Some((i, opt, Some(v)));
                i += 2;
            }
            _ => return Err(()),
        }
    }
    Ok(found)
}

impl Stage for Ttl {
    fn name(&self) -> &'static str {
        "ttl"
    }

    fn on_command(&self, ctx: &Ctx<'_>, ex: &mut Exchange) -> Verdict {
        let Some(info) = ctx.info else {
            return Verdict::Continue;
        };
        if !info.may_store() {
            return Verdict::Continue;
        }
        let args = ex.args();
        let mut plan = Plan {
            appended: Vec::new(),
            rewrite: None,
            args,
        };
        let key_rule = |i: usize| args.get(i).and_then(|k| self.rule(k).map(|r| (k, r)));
        match info.name.as_str() {
            "set" => {
                if let Some((key, rule)) = key_rule(1) {
                    match set_expiry(args) {
                        Ok(None) => {
                            if let Some(t) = rule.fill() {
                                let c = if rule.default.is_some() {
                                    &rule.counted_default
                                } else {
                                    &rule.counted_clamp
                                };
                                plan.set_px(rule, args.len(), 0, t, c);
                            }
                        }
                        Ok(Some((at, opt, Some(v)))) if opt == b"EX" || opt == b"PX" => {
                            let t = if opt == b"EX" {
                                v.saturating_mul(1000)
                            } else {
                                v
                            };
                            if let Some(m) = rule.max
                                && t > 0
                                && t as u64 > m
                            {
                                plan.set_px(rule, at, 2, m, &rule.counted_clamp);
                            }
                        }
                        // KEEPTTL, EXAT, PXAT: the upstream decides.
                        Ok(Some(_)) => plan.fill_and_clamp(rule, key),
                        Err(()) => {}
                    }
                }
            }
            "setex" | "psetex" => {
                if let Some((key, rule)) = key_rule(1)
                    && let (Some(v), Some(m), [_, _, _, value]) =
                        (args.get(2).and_then(|v| parse_int(v)), rule.max, args)
                {
                    let t = if info.name == "setex" {
                        v.saturating_mul(1000)
                    } else {
                        v
                    };
                    if t > 0 && t as u64 > m {
                        if rule.observe {
                            rule.counted_observe.inc();
                        } else {
                            rule.counted_clamp.inc();
                            plan.rewrite = Some(vec![
                                Bytes::from_static(b"PSETEX"),
                                key.clone(),
                                Bytes::from(m.to_string()),
                                value.clone(),
                            ]);
                        }
                    }
                }
            }
            "getex" => {
                if let Some((key, rule)) = key_rule(1) {
                    let opt = args.get(2).map(|o| o.to_ascii_uppercase());
                    match (opt.as_deref(), args.get(3).and_then(|v| parse_int(v))) {
                        (Some(o @ (b"EX" | b"PX")), Some(v)) if args.len() == 4 => {
                            let t = if o == b"EX" {
                                v.saturating_mul(1000)
                            } else {
                                v
                            };
                            if let Some(m) = rule.max
                                && t > 0
                                && t as u64 > m
                            {
                                plan.set_px(rule, 2, 2, m, &rule.counted_clamp);
                            }
                        }
                        _ => plan.fill_and_clamp(rule, key),
                    }
                }
            }
            "expire" | "pexpire" | "expireat" | "pexpireat" => {
                if let Some((key, rule)) = key_rule(1) {
                    plan.clamp(rule, key);
                }
            }
            _ => {
                let mut seen: Vec<&Bytes> = Vec::new();
                for k in info.keys(args) {
                    let Some(key) = args.get(k.index).filter(|_| k.stores) else {
                        continue;
                    };
                    if seen.contains(&key) {
                        continue;
                    }
                    seen.push(key);
                    if let Some(rule) = self.rule(key) {
                        plan.fill_and_clamp(rule, key);
                    }
                }
            }
        }
        let Plan {
            appended, rewrite, ..
        } = plan;
        if let Some(new) = rewrite {
            ex.rewrite(new);
        }
        if !appended.is_empty() {
            let mut rules = Vec::with_capacity(appended.len());
            for (cmd, rule) in appended {
                ex.append(&cmd);
                rules.push(rule);
            }
            ex.on_reply(Arc::new(AppendErrors { rules }));
        }
        Verdict::Continue
    }
}

/// Counts (and logs once per rule) error replies to appended commands;
/// the client never sees them.
struct AppendErrors {
    rules: Vec<Arc<Rule>>,
}

impl ReplyAction for AppendErrors {
    fn on_reply(&self, index: u32, reply: &Bytes) {
        if index == 0 || !crate::protocol::is_error(reply) {
            return;
        }
        let Some(rule) = self.rules.get(index as usize - 1) else {
            return;
        };
        rule.append_errors.inc();
        if !rule.logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                rule = %rule.label,
                error = %crate::upstream::conn::error_text(reply),
                "a PEXPIRE appended by a TTL rule failed (logged once per rule; counted in ttl_append_errors_total)"
            );
        }
    }
}
