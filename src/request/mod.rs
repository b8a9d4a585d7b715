//! One request's way through the sidecar, below the upstream: the command
//! table that classifies it ([`command`]), the request record the policy
//! chain works on and the plan for its replies ([`exchange`]), and the
//! client's output queue its reply completes ([`output`]).

pub mod command;
pub mod exchange;
pub mod output;
pub mod signal;
