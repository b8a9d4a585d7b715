//! The application layer: validation of a whole configuration against
//! every module's own checks ([`validate`]), reload ([`control`]) and the
//! admin HTTP listener ([`admin`]).

pub mod admin;
pub mod control;
pub mod migrate;
pub mod validate;

pub use validate::Validated;
