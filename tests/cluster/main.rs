//! The sidecar and a real Redis Cluster (3 masters, 3 replicas, on free
//! ports), in one place: key slots and the slot map ([`slots`]), the
//! sidecar in front of it compared byte for byte with a single Redis
//! ([`proxy`]), and the cluster changing under load ([`faults`]). RESET in
//! every mode on a cluster is with the other state commands, in
//! `tests/modes.rs`.
#![allow(clippy::unwrap_used)]

#[path = "../support/mod.rs"]
mod support;

mod faults;
mod migration;
mod proxy;
mod slots;
