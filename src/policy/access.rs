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
use crate::metrics::Metrics;
use crate::request::exchange::Exchange;

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
    /// Not in Redis's command table; the nearest name when one is close.
    /// The name given is not quoted back (the field path says where).
    #[error("unknown command{}", .0.map(|n| format!(" (did you mean {}?)", n.to_ascii_uppercase())).unwrap_or_default())]
    UnknownCommand(Option<&'static str>),
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
        if !ok {
            return Err(AccessError::BadName);
        }
        crate::request::command::check_name(&s).map_err(AccessError::UnknownCommand)?;
        Ok(Rule::Command(s))
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
            // `c`, or `c|sub` (a rule on a container covers its
            // subcommands), without splitting the name per command.
            Rule::Command(c) => name
                .strip_prefix(c.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('|')),
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
        for w in script_warnings(&everyone, &users) {
            tracing::warn!("{w}");
        }
        let restricted = !everyone.is_empty() || !users.is_empty();
        Ok(restricted.then(|| Access {
            everyone,
            users,
            metrics: metrics.clone(),
        }))
    }
}

/// The commands that run scripts: what a script calls is not seen by the
/// sidecar (Redis checks its own ACLs inside scripts; the sidecar's deny
/// list cannot).
const SCRIPTING: &[&str] = &[
    "eval",
    "evalsha",
    "eval_ro",
    "evalsha_ro",
    "fcall",
    "fcall_ro",
];

/// One warning per list that denies something a script can still run:
/// the list denies a command or category other than scripting, and
/// allows EVAL or FCALL (categories from the built-in command table).
fn script_warnings(everyone: &Lists, users: &[(Vec<u8>, Lists)]) -> Vec<String> {
    if everyone.deny.is_empty() && users.iter().all(|(_, l)| l.deny.is_empty()) {
        // Nothing denied: nothing to sidestep (and no table to read).
        return Vec::new();
    }
    let table = crate::request::command::Table::builtin_shared();
    let categories = |name: &str| -> Vec<String> {
        table
            .lookup(&[Bytes::copy_from_slice(name.as_bytes())])
            .map(|i| i.acl_categories.clone())
            .unwrap_or_default()
    };
    let lists = std::iter::once(("access".to_string(), everyone)).chain(
        users
            .iter()
            .enumerate()
            .map(|(i, (_, l))| (format!("access.users[{i}]"), l)),
    );
    let mut out = Vec::new();
    for (field, l) in lists {
        let denied: Vec<String> = l
            .deny
            .iter()
            .filter(|r| !SCRIPTING.iter().any(|s| r.matches(s, &categories(s))))
            .map(|r| match r {
                Rule::Command(c) => c.to_ascii_uppercase(),
                Rule::Category(c) => format!("@{c}"),
            })
            .collect();
        let open: Vec<&str> = SCRIPTING
            .iter()
            .copied()
            .filter(|s| l.permits(s, &categories(s)))
            .collect();
        if denied.is_empty() || open.is_empty() {
            continue;
        }
        out.push(format!(
            "{field}: {} denied, but a script can still run it: {} {} allowed, and the sidecar cannot see the commands a script calls; deny \"@scripting\" too, or give the sidecar an upstream ACL user without these commands (Redis applies its ACLs inside scripts)",
            denied.join(", "),
            open.join(", ").to_ascii_uppercase(),
            if open.len() == 1 { "is" } else { "are" },
        ));
    }
    out
}

/// The warnings [`Access`] logs for this configuration (for
/// `--check-config`); nothing when the lists do not parse.
pub fn warnings(c: &AccessConfig) -> Vec<String> {
    let parse = |list: &[String]| -> Vec<Rule> {
        list.iter().filter_map(|s| Rule::parse(s).ok()).collect()
    };
    let everyone = Lists {
        deny: parse(&c.deny),
        allow: parse(&c.allow),
    };
    let users: Vec<(Vec<u8>, Lists)> = c
        .users
        .iter()
        .map(|u| {
            (
                u.name.as_bytes().to_vec(),
                Lists {
                    deny: parse(&u.deny),
                    allow: parse(&u.allow),
                },
            )
        })
        .collect();
    script_warnings(&everyone, &users)
}

impl Stage for Access {
    fn name(&self) -> &'static str {
        "access"
    }

    fn on_command(&self, ctx: &Ctx<'_>, ex: &mut Exchange) -> Verdict {
        // Borrowed for a known command: no allocation per command.
        let name: std::borrow::Cow<'_, str> = match ctx.info {
            Some(i) => std::borrow::Cow::Borrowed(i.name.as_str()),
            None => match ex.args().first() {
                Some(n) => String::from_utf8_lossy(n).to_ascii_lowercase().into(),
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
    fn a_deny_list_scripts_can_sidestep_is_named() {
        let c = |deny: &[&str], allow: &[&str]| AccessConfig {
            deny: deny.iter().map(|s| s.to_string()).collect(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            ..AccessConfig::default()
        };
        let w = warnings(&c(&["KEYS", "FLUSHALL"], &[]));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("KEYS, FLUSHALL denied"), "{}", w[0]);
        assert!(w[0].contains("EVAL, EVALSHA"), "{}", w[0]);
        assert!(w[0].contains("deny \"@scripting\""), "{}", w[0]);
        // Closed: scripting denied too, or not allowed at all.
        assert!(warnings(&c(&["KEYS", "@scripting"], &[])).is_empty());
        assert!(
            warnings(&c(
                &[
                    "KEYS",
                    "EVAL",
                    "EVALSHA",
                    "EVAL_RO",
                    "EVALSHA_RO",
                    "FCALL",
                    "FCALL_RO"
                ],
                &[]
            ))
            .is_empty()
        );
        assert!(warnings(&c(&["KEYS"], &["@read", "@write"])).is_empty());
        // Nothing denied, nothing to sidestep.
        assert!(warnings(&c(&[], &[])).is_empty());
        // FCALL alone left open is still named.
        let w = warnings(&c(
            &["KEYS", "EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO"],
            &[],
        ));
        assert!(
            w.len() == 1 && w[0].contains("FCALL, FCALL_RO are allowed"),
            "{w:?}"
        );
    }

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
