//! Policy stages: the chain every forwarded command passes through before it
//! is routed (design.md, request flow step 4).
//!
//! A stage sees the command and may rewrite it, append extra commands whose
//! replies the sidecar consumes (step 6: the client still gets exactly one
//! reply, in order, and inside MULTI the extra replies are removed from the
//! EXEC array), or answer it itself. Stages are built once and shared by
//! every session (`Arc`), so they must be cheap and non-blocking.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::command::CommandInfo;
use crate::protocol::{Proto, encode_command};

/// What a stage knows about the command's client.
pub struct Ctx<'a> {
    pub client_id: u64,
    pub proto: Proto,
    pub db: i64,
    /// Inside MULTI: commands are queued, not run.
    pub in_multi: bool,
    /// The command's table entry, when the table knows it.
    pub info: Option<&'a CommandInfo>,
}

/// A command on its way upstream.
#[derive(Debug, Clone)]
pub struct Outgoing {
    args: Vec<Bytes>,
    raw: Bytes,
    extra: Vec<Bytes>,
}

impl Outgoing {
    pub fn new(raw: Bytes, args: Vec<Bytes>) -> Outgoing {
        Outgoing {
            args,
            raw,
            extra: Vec::new(),
        }
    }

    pub fn args(&self) -> &[Bytes] {
        &self.args
    }

    /// Replace the command (it is re-encoded; untouched commands are
    /// forwarded as the bytes that arrived).
    pub fn rewrite(&mut self, args: Vec<Bytes>) {
        self.raw = encode_command(&args);
        self.args = args;
    }

    /// Send `args` right after the command, on the same connection; its
    /// reply is consumed by the sidecar.
    pub fn append(&mut self, args: &[Bytes]) {
        self.extra.push(encode_command(args));
    }

    /// Commands appended by stages.
    pub fn extra_count(&self) -> usize {
        self.extra.len()
    }

    /// The bytes to write upstream: the command, then the extras.
    pub fn payload(&self) -> Bytes {
        if self.extra.is_empty() {
            return self.raw.clone();
        }
        let mut out = BytesMut::with_capacity(
            self.raw.len() + self.extra.iter().map(Bytes::len).sum::<usize>(),
        );
        out.extend_from_slice(&self.raw);
        for e in &self.extra {
            out.extend_from_slice(e);
        }
        out.freeze()
    }
}

/// A stage's decision.
pub enum Verdict {
    /// Go on to the next stage, then upstream.
    Continue,
    /// Answer the client with this reply; nothing is sent upstream.
    Reply(Bytes),
}

/// One policy stage (access, rate limit, cache lookup, TTL rewrite).
pub trait Stage: Send + Sync {
    fn name(&self) -> &'static str;
    fn on_request(&self, ctx: &Ctx<'_>, cmd: &mut Outgoing) -> Verdict;
}

/// The stages in their fixed order.
#[derive(Clone, Default)]
pub struct Chain {
    stages: Vec<Arc<dyn Stage>>,
}

impl Chain {
    pub fn new(stages: Vec<Arc<dyn Stage>>) -> Chain {
        Chain { stages }
    }

    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Run every stage until one answers.
    pub fn run(&self, ctx: &Ctx<'_>, cmd: &mut Outgoing) -> Verdict {
        for s in &self.stages {
            if let Verdict::Reply(r) = s.on_request(ctx, cmd) {
                return Verdict::Reply(r);
            }
        }
        Verdict::Continue
    }
}
