//! The policy stage a running migration adds: every write that passes
//! through the sidecar marks what it changed (its keys, a flushed
//! database), which the migration copies again after the write's reply;
//! during a cutover (or a rollback) it holds new writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use super::{Kind, Migration};
use crate::policy::{Ctx, Exchange, Mode, ReplyAction, Stage, Verdict};
use crate::upstream::URL_DB;

/// What a write changed, to be copied again.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Item {
    /// A key of a db.
    Key(i64, Bytes),
    /// Every key of a db is gone (FLUSHDB).
    FlushDb(i64),
    /// Every key of every db is gone (FLUSHALL).
    FlushAll,
}

/// Scripts remembered for the target, at most (past it, no new one is).
pub(super) const MAX_SCRIPTS: usize = 4096;
/// Bytes of script bodies remembered, at most.
pub(super) const MAX_SCRIPT_BYTES: usize = 16 << 20;

pub(super) struct Tracker {
    pub m: Arc<Migration>,
    /// What the writes queued in each client's open transaction changed:
    /// marked when its EXEC replies.
    tx_items: Mutex<HashMap<u64, Vec<Item>>>,
}

impl Tracker {
    pub fn new(m: Arc<Migration>) -> Tracker {
        Tracker {
            m,
            tx_items: Mutex::new(HashMap::new()),
        }
    }
}

/// After a write's (or an EXEC's) reply: what it changed is copied again.
/// Marked before the write stops counting as in flight, so a cutover that
/// sees none in flight has them all. A write whose reply never comes (its
/// client or its connection went away, a transaction discarded) does the
/// same when its exchange is dropped: it may have run.
struct Marked {
    m: Arc<Migration>,
    items: Vec<Item>,
    /// Counted in flight (blocking commands are not: they may wait for
    /// ever, and the switch closes their clients).
    counted: bool,
    done: AtomicBool,
}

impl Marked {
    fn finish(&self, mark: bool) {
        if self.done.swap(true, Ordering::SeqCst) {
            return;
        }
        if mark {
            for item in &self.items {
                self.m.mark(item.clone());
            }
        }
        if self.counted {
            self.m.inflight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl ReplyAction for Marked {
    fn on_reply(&self, index: u32, reply: &Bytes) {
        if index != 0 {
            return;
        }
        if self.m.kind == Kind::Carry && crate::wire::is_error(reply) {
            // A carry copies what ran on the fallback; a write refused or
            // lost (the endpoint that failed, during the failover) did not
            // run there.
            self.finish(false);
        } else {
            self.finish(true);
        }
    }
}

impl Drop for Marked {
    fn drop(&mut self) {
        // A migration's source has it or not: copy it again either way. A
        // carry's write whose fate is unknown is not taken to the endpoint
        // that failed.
        self.finish(self.m.kind != Kind::Carry);
    }
}

impl Tracker {
    /// Let a write through, counted in flight until its reply, unless the
    /// cutover holds writes: then wait. The count goes up *before* the hold
    /// is looked at (and the cutover sets the hold before it looks at the
    /// count, both sequentially consistent), so a write either is seen in
    /// flight by the cutover or sees the hold.
    fn let_through(&self, ex: &mut Exchange, items: Vec<Item>, blocking: bool) -> Verdict {
        if !blocking {
            self.m.inflight.fetch_add(1, Ordering::SeqCst);
        }
        if self.m.hold.load(Ordering::SeqCst) {
            if !blocking {
                self.m.inflight.fetch_sub(1, Ordering::SeqCst);
            }
            let mut rx = self.m.holding.subscribe();
            return Verdict::Wait(Box::pin(async move {
                // Bounded: the cutover releases within max_pause.
                let _ = rx.wait_for(|h| !*h).await;
            }));
        }
        ex.on_reply(Arc::new(Marked {
            m: self.m.clone(),
            items,
            counted: !blocking,
            done: AtomicBool::new(false),
        }));
        Verdict::Continue
    }
}

/// What a write command changes besides its write keys: a flushed db, the
/// other db of MOVE and COPY ... DB.
fn db_items(name: &str, args: &[Bytes], db: i64, out: &mut Vec<Item>) {
    let arg_db = |b: &Bytes| std::str::from_utf8(b).ok()?.parse::<i64>().ok();
    match name {
        "flushdb" => out.push(Item::FlushDb(db)),
        "flushall" => out.push(Item::FlushAll),
        "move" => {
            if let (Some(k), Some(other)) = (args.get(1), args.get(2).and_then(arg_db)) {
                out.push(Item::Key(other, k.clone()));
            }
        }
        "copy" => {
            let other = args
                .iter()
                .skip(3)
                .position(|a| a.eq_ignore_ascii_case(b"db"))
                .and_then(|i| args.get(i + 4))
                .and_then(arg_db);
            if let (Some(k), Some(other)) = (args.get(2), other) {
                out.push(Item::Key(other, k.clone()));
            }
        }
        _ => {}
    }
}

impl Stage for Tracker {
    fn name(&self) -> &'static str {
        "migration"
    }

    fn on_command(&self, ctx: &Ctx<'_>, ex: &mut Exchange) -> Verdict {
        let Some(info) = ctx.info else {
            return Verdict::Continue;
        };
        let txs = || self.tx_items.lock().unwrap_or_else(PoisonError::into_inner);
        let name = info.name.as_str();
        match name {
            "multi" => {
                txs().insert(ctx.client_id, Vec::new());
                return Verdict::Continue;
            }
            "discard" => {
                txs().remove(&ctx.client_id);
                return Verdict::Continue;
            }
            "exec" => {
                let items = txs().get(&ctx.client_id).cloned().unwrap_or_default();
                let v = self.let_through(ex, items, false);
                if matches!(v, Verdict::Continue) {
                    txs().remove(&ctx.client_id);
                }
                return v;
            }
            "eval" | "eval_ro" => {
                if let Some(body) = ex.args().get(1) {
                    self.m.remember_script(body);
                }
            }
            "script|load" => {
                if let Some(body) = ex.args().get(2) {
                    self.m.remember_script(body);
                }
                return Verdict::Continue;
            }
            "swapdb" => {
                // Two dbs trade places: the copy so far no longer says
                // which keys belong where.
                return Verdict::Refuse(Bytes::from_static(
                    b"-ERR SWAPDB is refused while a live migration runs (abort it first)\r\n",
                ));
            }
            _ => {}
        }
        let writes = info.flags.write || name == "eval" || name == "evalsha" || name == "fcall";
        if !writes {
            return Verdict::Continue;
        }
        let db = if ctx.db == URL_DB {
            self.m.url_db
        } else {
            ctx.db
        };
        let args = ex.args();
        let mut items: Vec<Item> = info
            .keys(args)
            .iter()
            .filter(|k| k.write)
            .filter_map(|k| args.get(k.index).map(|a| Item::Key(db, a.clone())))
            .collect();
        db_items(name, args, db, &mut items);
        if ctx.mode == Mode::Transaction {
            // Queued, not run: what it changes waits for the EXEC.
            txs().entry(ctx.client_id).or_default().extend(items);
            return Verdict::Continue;
        }
        self.let_through(ex, items, info.flags.blocking)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<Bytes> {
        a.iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    #[test]
    fn the_other_db_of_move_and_copy() {
        let mut out = Vec::new();
        db_items("move", &args(&["MOVE", "k", "3"]), 0, &mut out);
        db_items(
            "copy",
            &args(&["COPY", "a", "b", "DB", "5", "REPLACE"]),
            0,
            &mut out,
        );
        db_items("copy", &args(&["COPY", "a", "b"]), 0, &mut out);
        db_items("flushdb", &args(&["FLUSHDB", "ASYNC"]), 2, &mut out);
        assert_eq!(
            out,
            vec![
                Item::Key(3, Bytes::from_static(b"k")),
                Item::Key(5, Bytes::from_static(b"b")),
                Item::FlushDb(2),
            ]
        );
    }
}
