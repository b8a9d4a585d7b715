//! The application layer: validation of a whole configuration against
//! every module's own checks ([`validate`]), reload ([`control`]) and the
//! admin HTTP listener ([`admin`]).

pub mod admin;
mod admin_client;
pub mod control;
pub mod hotkeys_cli;
pub mod migrate;
pub mod validate;

pub use validate::Validated;
