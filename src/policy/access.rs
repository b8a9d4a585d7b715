//! The access stage: commands and ACL categories that clients may not run
//! (`[access] deny`, and `allow` when only some may run), refused with
//! Redis's own ACL wording (`-NOPERM this user has no permissions to run
//! the 'keys' command`) before anything is sent upstream.
//!
//! Categories come from the command table learned from the upstream's
//! `COMMAND`; a command the table does not know matches by name only.

use bytes::Bytes;

use super::{Ctx, PolicyError, Stage, Verdict};
use crate::config::AccessConfig;
use crate::exchange::Exchange;
use crate::metrics::Metrics;

/// Redis 7's ACL categories.
const CATEGORIES: &[&str] = &[
    "all",
    "keyspace",
    "read",
    "write",
    "set",
    "sortedset",
    "list",
    "hash",
    "string",
    "bitmap",
    "hyperloglog",
    "geo",
    "stream",
    "pubsub",
    "admin",
    "fast",
    "slow",
    "blocking",
    "dangerous",
    "connection",
    "transaction",
    "scripting",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("unknown ACL category")]
    UnknownCategory,
    #[error("not a command name (letters, digits, '-', '_', and '|' for a subcommand)")]
    BadName,
}

/// One entry of a list: a command (or `container|sub`) or a category.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rule {
    Command(String),
    Category(String),
}

impl Rule {
    pub(crate) fn parse(s: &str) -> Result<Rule, AccessError> {
        let s = s.to_ascii_lowercase();
        if let Some(cat) = s.strip_prefix('@') {
            if CATEGORIES.contains(&cat) {
                return Ok(Rule::Category(cat.to_string()));
            }
            return Err(AccessError::UnknownCategory);
        }
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'|'));
        if ok {
            Ok(Rule::Command(s))
        } else {
            Err(AccessError::BadName)
        }
    }

    /// The entry names this command (not by category).
    pub(crate) fn names(&self, command: &str) -> bool {
        matches!(self, Rule::Command(c) if c == command)
    }

    pub(crate) fn is_all(&self) -> bool {
        matches!(self, Rule::Category(c) if c == "all")
    }

    /// `name` is the table's name (`config|set`) or the command's own.
    pub(crate) fn matches(&self, name: &str, categories: &[String]) -> bool {
        match self {
            Rule::Command(c) => {
                c == name
                    || name
                        .split('|')
                        .next()
                        .is_some_and(|container| c == container)
            }
            Rule::Category(c) => c == "all" || categories.iter().any(|x| x == c),
        }
    }
}

/// A deny list and an allow list (empty: everything allowed).
struct Lists {
    deny: Vec<Rule>,
    allow: Vec<Rule>,
}

impl Lists {
    fn permits(&self, name: &str, cats: &[String]) -> bool {
        let allowed = self.allow.is_empty() || self.allow.iter().any(|r| r.matches(name, cats));
        allowed && !self.deny.iter().any(|r| r.matches(name, cats))
    }

    fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty()
    }
}

pub struct Access {
    everyone: Lists,
    /// Per user, instead of `everyone`.
    users: Vec<(Vec<u8>, Lists)>,
    metrics: Metrics,
}

impl Access {
    /// `None` when nothing is restricted (no stage at all).
    pub fn from_config(
        c: &AccessConfig,
        metrics: &Metrics,
    ) -> Result<Option<Access>, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut parse = |field: String, list: &[String]| {
            list.iter()
                .enumerate()
                .filter_map(|(index, s)| {
                    Rule::parse(s)
                        .map_err(|reason| {
                            errors.push(PolicyError::Access {
                                field: field.clone(),
                                index,
                                reason,
                            })
                        })
                        .ok()
                })
                .collect::<Vec<_>>()
        };
        let everyone = Lists {
            deny: parse("access.deny".into(), &c.deny),
            allow: parse("access.allow".into(), &c.allow),
        };
        let users: Vec<(Vec<u8>, Lists)> = c
            .users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let lists = Lists {
                    deny: parse(format!("access.users[{i}].deny"), &u.deny),
                    allow: parse(format!("access.users[{i}].allow"), &u.allow),
                };
                (u.name.as_bytes().to_vec(), lists)
            })
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        let restricted = !everyone.is_empty() || !users.is_empty();
        Ok(restricted.then(|| Access {
            everyone,
            users,
            metrics: metrics.clone(),
        }))
    }
}

impl Stage for Access {
    fn name(&self) -> &'static str {
        "access"
    }

    fn on_command(&self, ctx: &Ctx<'_>, ex: &mut Exchange) -> Verdict {
        let name = match ctx.info {
            Some(i) => i.name.clone(),
            None => match ex.args().first() {
                Some(n) => String::from_utf8_lossy(n).to_ascii_lowercase(),
                None => return Verdict::Continue,
            },
        };
        let cats: &[String] = ctx.info.map(|i| &i.acl_categories[..]).unwrap_or(&[]);
        let user = ctx.user.unwrap_or(b"default");
        let lists = self
            .users
            .iter()
            .find(|(u, _)| u[..] == *user)
            .map_or(&self.everyone, |(_, l)| l);
        if lists.permits(&name, cats) {
            return Verdict::Continue;
        }
        // Bounded label: a table name, or `other` for unknown commands.
        let label = ctx
            .info
            .map_or("other", |i| i.name.split('|').next().unwrap_or("other"));
        self.metrics.access_denied(label).inc();
        Verdict::Refuse(Bytes::from(format!(
            "-NOPERM this user has no permissions to run the '{name}' command\r\n"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match() {
        assert_eq!(Rule::parse("KEYS"), Ok(Rule::Command("keys".into())));
        assert_eq!(Rule::parse("@nope"), Err(AccessError::UnknownCategory));
        assert_eq!(Rule::parse("a b"), Err(AccessError::BadName));
        let config = Rule::parse("config").unwrap_or(Rule::Category("x".into()));
        assert!(config.matches("config|set", &[]));
        assert!(!config.matches("configx", &[]));
        let dangerous = Rule::Category("dangerous".into());
        assert!(dangerous.matches("flushall", &["write".into(), "dangerous".into()]));
        assert!(!dangerous.matches("get", &["read".into()]));
    }
}
