//! Test support, by concern: a real `redis-server` on a free port
//! ([`server`]), the sidecar in-process on port 0 ([`sidecar`]), a raw RESP
//! client and condition waits ([`raw`]), admin HTTP ([`http`]), a
//! fault-injecting TCP hop ([`faults`]), process memory ([`proc`]) and
//! TLS certificates ([`certs`]).
#![allow(dead_code, clippy::unwrap_used)]

mod certs;
mod faults;
mod http;
mod proc;
mod raw;
mod server;
mod sidecar;

// Each test binary uses some of them.
#[allow(unused_imports)]
pub use {certs::*, faults::*, http::*, proc::*, raw::*, server::*, sidecar::*};
