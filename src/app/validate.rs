//! Validation of a whole configuration: the schema's own checks (addresses,
//! limits, timeouts) and each module's check of its section (the
//! upstream endpoints, the policy stages, client auth), every error at
//! once. Lives above every module it asks, so the schema module
//! ([`crate::config`]) depends on none of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::client::auth::ClientAuth;
use crate::config::{Config, ConfigErrors};
use crate::policy::Builder;
use crate::upstream::endpoint::EndpointSpec;

/// A configuration that passed validation, with parsed addresses and URLs.
#[derive(Debug, Clone)]
pub struct Validated {
    pub config: Config,
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub upstreams: Vec<EndpointSpec>,
    /// `[client_auth]`, loaded (`None`: clients AUTH to the upstream).
    pub client_auth: Option<Arc<ClientAuth>>,
}

impl Config {
    /// Check everything, report every error at once.
    pub fn validate(self) -> Result<Validated, ConfigErrors> {
        let mut errors = Vec::new();
        let listen = self
            .listen
            .parse::<SocketAddr>()
            .map_err(|_| errors.push("listen: not an address like 127.0.0.1:6380".to_string()))
            .ok();
        let admin_listen = if self.admin_listen.is_empty() {
            None
        } else {
            self.admin_listen
                .parse::<SocketAddr>()
                .map_err(|_| {
                    errors.push("admin_listen: not an address like 127.0.0.1:9121".to_string())
                })
                .ok()
        };
        let mut upstreams = Vec::new();
        if self.upstream.is_empty() {
            errors.push("upstream: at least one [[upstream]] is required".into());
        }
        for (i, u) in self.upstream.iter().enumerate() {
            if let Some(spec) =
                EndpointSpec::from_config(i, u, listen, &self.upstream[..i], &mut errors)
            {
                upstreams.push(spec);
            }
        }
        let f = &self.failover;
        if f.check_interval < Duration::from_millis(10) {
            errors.push("failover.check_interval: must be at least 10ms".into());
        }
        if f.check_timeout.is_zero() {
            errors.push("failover.check_timeout: must be greater than 0".into());
        }
        let l = &self.limits;
        if l.max_bulk.0 == 0 {
            errors.push("limits.max_bulk: must be at least 1 byte".into());
        }
        if l.max_inline.0 < 16 {
            errors.push("limits.max_inline: must be at least 16 bytes".into());
        }
        if l.max_request.0 < 1024 {
            errors.push("limits.max_request: must be at least 1KiB".into());
        }
        if l.max_request.0 >= 4 << 30 {
            errors.push("limits.max_request: must be below 4GiB".into());
        }
        if l.max_output_buffer.0 < 1024 {
            errors.push("limits.max_output_buffer: must be at least 1KiB".into());
        }
        let t = &self.timeouts;
        for (name, d) in [
            ("connect", t.connect),
            ("command", t.command),
            ("queue", t.queue),
        ] {
            if d.is_zero() {
                errors.push(format!("timeouts.{name}: must be greater than 0"));
            }
        }
        if let Err(e) = Builder::check(&self) {
            errors.extend(e.0);
        }
        let client_auth = ClientAuth::from_config(&self.client_auth)
            .unwrap_or_else(|e| {
                errors.extend(e.iter().map(ToString::to_string));
                None
            })
            .map(Arc::new);
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            errors.push("log.level: not a valid filter (e.g. info, redis_sidecar=debug)".into());
        }
        match (errors.is_empty(), listen) {
            (true, Some(listen)) => Ok(Validated {
                config: self,
                listen,
                admin_listen,
                upstreams,
                client_auth,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }
}
