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

use bytes::{Bytes, BytesMut};
use prometheus::IntCounter;

use super::glob::Glob;
use super::{Ctx, PolicyError, Stage, Verdict};
use crate::config::{RuleMode, TtlRule};
use crate::metrics::Metrics;
use crate::request::exchange::{Exchange, ReplyAction};
use crate::wire::scan::parse_int;

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
    /// Counts the errors of this rule's appended commands: shared by every
    /// exchange whose appended commands all come from this rule (no
    /// allocation per write).
    errors: Arc<RuleErrors>,
    /// Encoded once: ` PX <fill>` to add to a SET, and the tails of
    /// `PEXPIRE key <default> NX` / `PEXPIRE key <max> LT`.
    px_fill: Option<(Bytes, [Bytes; 2])>,
    nx_tail: Option<Bytes>,
    lt_tail: Option<Bytes>,
}

/// A rule's appended-command errors: counted, and logged once.
struct RuleErrors {
    label: String,
    count: IntCounter,
    logged: AtomicBool,
}

impl RuleErrors {
    fn record(&self, reply: &Bytes) {
        self.count.inc();
        if !self.logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                rule = %self.label,
                error = %crate::upstream::conn::error_text(reply),
                "a PEXPIRE appended by a TTL rule failed (logged once per rule; counted in ttl_append_errors_total)"
            );
        }
    }
}

impl ReplyAction for RuleErrors {
    fn on_reply(&self, index: u32, reply: &Bytes) {
        if index > 0 && crate::wire::is_error(reply) {
            self.record(reply);
        }
    }
}

/// `$<len>\r\n<ms>\r\n$2\r\n<opt>\r\n`: the end of a PEXPIRE.
fn pexpire_tail(ms: u64, opt: &str) -> Bytes {
    let ms = ms.to_string();
    Bytes::from(format!(
        "${}\r\n{ms}\r\n${}\r\n{opt}\r\n",
        ms.len(),
        opt.len()
    ))
}

/// `PEXPIRE key` + a pre-encoded tail, in one allocation.
fn pexpire(key: &[u8], tail: &Bytes) -> Bytes {
    let mut out = BytesMut::with_capacity(32 + key.len() + tail.len());
    out.extend_from_slice(b"*4\r\n$7\r\nPEXPIRE\r\n");
    crate::wire::scan::push_header(&mut out, b'$', key.len());
    out.extend_from_slice(key);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(tail);
    out.freeze()
}

impl Rule {
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
            let (default, max) = (r.default.map(ms), r.max.map(ms));
            let fill = default.or(max);
            out.push(Arc::new(Rule {
                glob: Glob::new(r.pattern.as_bytes()),
                default,
                max,
                observe: r.mode == RuleMode::Observe,
                counted_default: metrics.ttl_enforced(&label, "default"),
                counted_clamp: metrics.ttl_enforced(&label, "clamp"),
                counted_observe: metrics.ttl_enforced(&label, "observe"),
                errors: Arc::new(RuleErrors {
                    label: label.clone(),
                    count: metrics.ttl_append_errors(&label),
                    logged: AtomicBool::new(false),
                }),
                px_fill: fill.map(|t| {
                    let t = t.to_string();
                    (
                        Bytes::from(format!("$2\r\nPX\r\n${}\r\n{t}\r\n", t.len())),
                        [Bytes::from_static(b"PX"), Bytes::from(t)],
                    )
                }),
                nx_tail: default
                    .filter(|d| max.is_none_or(|m| *d < m))
                    .map(|d| pexpire_tail(d, "NX")),
                lt_tail: max.map(|m| pexpire_tail(m, "LT")),
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
struct Plan<'a, 'r> {
    appended: Vec<(Bytes, &'r Arc<Rule>)>,
    rewrite: Option<Vec<Bytes>>,
    /// ` PX <fill>` to add at the end of a SET.
    extend: Option<&'r Rule>,
    args: &'a [Bytes],
}

impl<'r> Plan<'_, 'r> {
    /// `PEXPIRE key default NX` (when the default is not covered by the
    /// max) and `PEXPIRE key max LT`.
    fn fill_and_clamp(&mut self, rule: &'r Arc<Rule>, key: &Bytes) {
        if let Some(t) = &rule.nx_tail {
            self.push(rule, key, t, &rule.counted_default);
        }
        self.clamp(rule, key);
    }

    fn clamp(&mut self, rule: &'r Arc<Rule>, key: &Bytes) {
        if let Some(t) = &rule.lt_tail {
            self.push(rule, key, t, &rule.counted_clamp);
        }
    }

    fn push(&mut self, rule: &'r Arc<Rule>, key: &Bytes, tail: &Bytes, c: &IntCounter) {
        if rule.observe {
            rule.counted_observe.inc();
            tracing::debug!(rule = %rule.label, "observe: would append PEXPIRE");
            return;
        }
        c.inc();
        self.appended.push((pexpire(key, tail), rule));
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

    /// Add the rule's ` PX <fill>` at the end of the command.
    fn add_px(&mut self, rule: &'r Rule) {
        if rule.observe {
            rule.counted_observe.inc();
            tracing::debug!(rule = %rule.label, "observe: would add PX");
            return;
        }
        if rule.default.is_some() {
            rule.counted_default.inc();
        } else {
            rule.counted_clamp.inc();
        }
        self.extend = Some(rule);
    }
}

/// A relative expiry (`EX`/`SETEX` in seconds, `PX`/`PSETEX` in ms) in
/// milliseconds, only where Redis accepts it (`getExpireMillisecondsOrReply`
/// in t_string.c): positive, at most `LLONG_MAX / 1000` seconds, and with
/// the current time added still within `i64`. `None`: Redis answers
/// `invalid expire time`, so the command is left for it to refuse (a
/// clamp would turn its error into `+OK`).
fn relative_ms(v: i64, seconds: bool) -> Option<u64> {
    let ms = if seconds {
        if v > i64::MAX / 1000 {
            return None;
        }
        v.checked_mul(1000)?
    } else {
        v
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    (ms > 0 && ms.checked_add(now).is_some()).then_some(ms as u64)
}

/// A SET's expiry option: its position, name and value.
type Expiry = (usize, &'static str, Option<i64>);

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT|PXAT|KEEPTTL]`: the
/// expiry option; `Err` when the options do not parse (Redis answers the
/// error; nothing to do).
fn set_expiry(args: &[Bytes]) -> Result<Option<Expiry>, ()> {
    let mut found = None;
    let mut i = 3;
    while i < args.len() {
        let a = &args[i];
        let is = |o: &str| a.eq_ignore_ascii_case(o.as_bytes());
        if is("NX") || is("XX") || is("GET") {
            i += 1;
        } else if is("KEEPTTL") {
            found = Some((i, "KEEPTTL", None));
            i += 1;
        } else if let Some(opt) = ["EX", "PX", "EXAT", "PXAT"].into_iter().find(|o| is(o)) {
            let v = args.get(i + 1).and_then(|v| parse_int(v)).ok_or(())?;
            found = Some((i, opt, Some(v)));
            i += 2;
        } else {
            return Err(());
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
            extend: None,
            args,
        };
        let key_rule = |i: usize| args.get(i).and_then(|k| self.rule(k).map(|r| (k, r)));
        match info.name.as_str() {
            "set" => {
                if let Some((key, rule)) = key_rule(1) {
                    match set_expiry(args) {
                        Ok(None) => plan.add_px(rule),
                        Ok(Some((at, opt, Some(v)))) if opt == "EX" || opt == "PX" => {
                            if let Some(m) = rule.max
                                && let Some(t) = relative_ms(v, opt == "EX")
                                && t > m
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
                    && let Some(t) = relative_ms(v, info.name == "setex")
                    && t > m
                {
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
            "getex" => {
                if let Some((key, rule)) = key_rule(1) {
                    let opt = args.get(2).map(|o| o.to_ascii_uppercase());
                    match (opt.as_deref(), args.get(3).and_then(|v| parse_int(v))) {
                        (Some(o @ (b"EX" | b"PX")), Some(v)) if args.len() == 4 => {
                            if let Some(m) = rule.max
                                && let Some(t) = relative_ms(v, o == b"EX")
                                && t > m
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
            appended,
            rewrite,
            extend,
            ..
        } = plan;
        let errors: Option<Arc<dyn ReplyAction>> = match appended.first() {
            None => None,
            // All from one rule (the usual case): its shared counter.
            Some((_, first)) if appended.iter().all(|(_, r)| Arc::ptr_eq(r, first)) => {
                Some(first.errors.clone())
            }
            Some(_) => Some(Arc::new(AppendErrors {
                rules: appended.iter().map(|(_, r)| r.errors.clone()).collect(),
            })),
        };
        if let Some(new) = rewrite {
            ex.rewrite(new);
        }
        if let Some((encoded, args)) = extend.and_then(|r| r.px_fill.as_ref()) {
            ex.extend(encoded, args);
        }
        for (cmd, _) in appended {
            ex.append_encoded(cmd);
        }
        if let Some(e) = errors {
            ex.on_reply(e);
        }
        Verdict::Continue
    }
}

/// Counts (and logs once per rule) error replies to appended commands from
/// several rules; the client never sees them.
struct AppendErrors {
    /// By appended command (index 1 is the first).
    rules: Vec<Arc<RuleErrors>>,
}

impl ReplyAction for AppendErrors {
    fn on_reply(&self, index: u32, reply: &Bytes) {
        if index == 0 || !crate::wire::is_error(reply) {
            return;
        }
        if let Some(rule) = self.rules.get(index as usize - 1) {
            rule.record(reply);
        }
    }
}
