//! Client authentication at the sidecar (`[client_auth]`): its own
//! password (Redis `requirepass` semantics: the `default` user) and named
//! users, checked locally in constant time. Clients then never send
//! credentials upstream; the sidecar uses the upstream URL's.

use std::fmt;

use crate::config::ClientAuthConfig;

/// Why `[client_auth]` is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientAuthError {
    #[error("{0}: set password or password_file, not both")]
    Both(String),
    #[error("{0}: the password is empty")]
    Empty(String),
    #[error("{0}: cannot read password_file ({1})")]
    File(String, String),
    #[error("users[{0}]: the name is empty or used twice")]
    Name(usize),
}

/// The passwords, loaded (never printed by `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// The `default` user's password (`AUTH <password>`).
    default: Option<Vec<u8>>,
    users: Vec<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth")
            .field("default", &self.default.as_ref().map(|_| "***"))
            .field(
                "users",
                &self
                    .users
                    .iter()
                    .map(|(u, _)| String::from_utf8_lossy(u).into_owned())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn load(
    field: &str,
    password: &Option<String>,
    file: &Option<String>,
) -> Result<Option<Vec<u8>>, ClientAuthError> {
    let p = match (password, file) {
        (Some(_), Some(_)) => return Err(ClientAuthError::Both(field.into())),
        (Some(p), None) => p.clone().into_bytes(),
        (None, Some(path)) => {
            // The file's content without a trailing newline; the error
            // names the field and the I/O problem, never the content.
            let text = std::fs::read(path)
                .map_err(|e| ClientAuthError::File(field.into(), e.kind().to_string()))?;
            let mut text = text;
            while matches!(text.last(), Some(b'\n' | b'\r')) {
                text.pop();
            }
            text
        }
        (None, None) => return Ok(None),
    };
    if p.is_empty() {
        return Err(ClientAuthError::Empty(field.into()));
    }
    Ok(Some(p))
}

impl ClientAuth {
    /// `None` when no password or user is configured (AUTH passes through
    /// to the upstream).
    pub fn from_config(c: &ClientAuthConfig) -> Result<Option<ClientAuth>, Vec<ClientAuthError>> {
        let mut errors = Vec::new();
        let default = load("client_auth", &c.password, &c.password_file).unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        let mut users: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (i, u) in c.users.iter().enumerate() {
            let name = u.name.as_bytes().to_vec();
            if name.is_empty() || users.iter().any(|(n, _)| *n == name) {
                errors.push(ClientAuthError::Name(i));
                continue;
            }
            match load(
                &format!("client_auth.users[{i}]"),
                &u.password,
                &u.password_file,
            ) {
                Ok(Some(p)) => users.push((name, p)),
                Ok(None) => errors.push(ClientAuthError::Empty(format!("client_auth.users[{i}]"))),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok((default.is_some() || !users.is_empty()).then_some(ClientAuth { default, users }))
    }

    /// Whether the `default` user has a password (`AUTH <password>` works).
    pub fn has_default(&self) -> bool {
        self.default.is_some()
    }

    /// Does `password` open `user` (`None`: the `default` user)? The user's
    /// index ([`ClientAuth::user_name`]) if so. Every candidate is
    /// compared, each in constant time, so the time taken does not tell
    /// which user exists or how much of a password matched.
    pub fn check(&self, user: Option<&[u8]>, password: &[u8]) -> Option<u32> {
        let user = user.unwrap_or(b"default");
        let mut found = None;
        if let Some(d) = &self.default
            && ct_eq(user, b"default") & ct_eq(password, d)
        {
            found = Some(0);
        }
        for (i, (name, p)) in self.users.iter().enumerate() {
            if ct_eq(user, name) & ct_eq(password, p) {
                found = Some(i as u32 + 1);
            }
        }
        found
    }

    /// The name of the user [`ClientAuth::check`] returned.
    pub fn user_name(&self, index: u32) -> &[u8] {
        match index {
            0 => b"default",
            i => self
                .users
                .get(i as usize - 1)
                .map_or(&b"default"[..], |(n, _)| &n[..]),
        }
    }
}

/// Equal bytes, in time that depends only on the lengths (passwords, the
/// admin token): timing does not tell how much of a secret matched.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientUser;

    #[test]
    fn passwords_and_users() {
        let c = ClientAuthConfig {
            password: Some("main".into()),
            password_file: None,
            users: vec![ClientUser {
                name: "app".into(),
                password: Some("apppw".into()),
                password_file: None,
            }],
        };
        let a = ClientAuth::from_config(&c).unwrap().unwrap();
        assert_eq!(a.check(None, b"main"), Some(0));
        assert_eq!(a.check(Some(b"default"), b"main"), Some(0));
        assert_eq!(a.check(Some(b"app"), b"apppw"), Some(1));
        assert_eq!(a.user_name(1), b"app");
        assert_eq!(a.check(Some(b"app"), b"main"), None);
        assert_eq!(a.check(None, b"mai"), None);
        assert_eq!(a.check(Some(b"nobody"), b"apppw"), None);
        assert!(!format!("{a:?}").contains("main"));
        assert!(ct_eq(b"", b""));
        assert!(!ct_eq(b"a", b"ab"));
        let bad = ClientAuthConfig {
            password: Some("x".into()),
            password_file: Some("/nonexistent".into()),
            users: vec![ClientUser {
                name: String::new(),
                password: None,
                password_file: None,
            }],
        };
        assert_eq!(ClientAuth::from_config(&bad).unwrap_err().len(), 2);
    }
}
