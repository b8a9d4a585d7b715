//! Redis glob patterns (as in `KEYS`, `SCAN MATCH`, `PSUBSCRIBE`), matched
//! on a key's raw bytes exactly as Redis's `stringmatchlen` does: `*`, `?`,
//! `[abc]`, `[a-z]`, `[^x]`, and `\` escaping the next byte. Compiled once
//! per rule; a plain `prefix*` pattern (the usual `session:*`) is a prefix
//! comparison.

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: Vec<u8>,
    /// `Some(n)`: the pattern is `pattern[..n]` followed by one `*`, with
    /// no other special byte.
    prefix: Option<usize>,
}

impl Glob {
    pub fn new(pattern: &[u8]) -> Glob {
        let special = |b: &u8| matches!(b, b'*' | b'?' | b'[' | b'\\');
        let prefix = match pattern.split_last() {
            Some((b'*', head)) if !head.iter().any(special) => Some(head.len()),
            _ => None,
        };
        Glob {
            pattern: pattern.to_vec(),
            prefix,
        }
    }

    pub fn matches(&self, key: &[u8]) -> bool {
        match self.prefix {
            Some(n) => key.starts_with(&self.pattern[..n]),
            None => {
                let mut skip_longer = false;
                match_impl(&self.pattern, key, &mut skip_longer)
            }
        }
    }
}

/// A port of Redis's `stringmatchlen_impl` (util.c), case-sensitive.
fn match_impl(mut p: &[u8], mut s: &[u8], skip_longer: &mut bool) -> bool {
    while !p.is_empty() && !s.is_empty() {
        match p[0] {
            b'*' => {
                while p.len() > 1 && p[1] == b'*' {
                    p = &p[1..];
                }
                if p.len() == 1 {
                    return true;
                }
                while !s.is_empty() {
                    if match_impl(&p[1..], s, skip_longer) {
                        return true;
                    }
                    if *skip_longer {
                        return false;
                    }
                    s = &s[1..];
                }
                // The rest of the pattern cannot match a shorter tail
                // either: stop the callers from trying.
                *skip_longer = true;
                return false;
            }
            b'?' => s = &s[1..],
            b'[' => {
                p = &p[1..];
                let not = p.first() == Some(&b'^');
                if not {
                    p = &p[1..];
                }
                let mut matched = false;
                loop {
                    match p {
                        [b'\\', c, ..] => {
                            p = &p[1..];
                            if *c == s[0] {
                                matched = true;
                            }
                        }
                        [b']', ..] => break,
                        [] => break,
                        [start, b'-', end, ..] => {
                            let (lo, hi) = if start <= end {
                                (*start, *end)
                            } else {
                                (*end, *start)
                            };
                            p = &p[2..];
                            if (lo..=hi).contains(&s[0]) {
                                matched = true;
                            }
                        }
                        [c, ..] => {
                            if *c == s[0] {
                                matched = true;
                            }
                        }
                    }
                    p = &p[1..];
                }
                if not {
                    matched = !matched;
                }
                if !matched {
                    return false;
                }
                s = &s[1..];
                // An unclosed class consumed the whole pattern (Redis
                // steps back one byte for the step below).
                if p.is_empty() {
                    return s.is_empty();
                }
            }
            b'\\' if p.len() >= 2 => {
                p = &p[1..];
                if p[0] != s[0] {
                    return false;
                }
                s = &s[1..];
            }
            c => {
                if c != s[0] {
                    return false;
                }
                s = &s[1..];
            }
        }
        p = &p[1..];
        if s.is_empty() {
            while p.first() == Some(&b'*') {
                p = &p[1..];
            }
            break;
        }
    }
    p.is_empty() && s.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_glob_cases() {
        let m = |p: &str, k: &str| Glob::new(p.as_bytes()).matches(k.as_bytes());
        assert!(m("session:*", "session:abc"));
        assert!(m("session:*", "session:"));
        assert!(!m("session:*", "sessions:x"));
        assert!(m("*", ""));
        assert!(m("feed:user:*:*", "feed:user:1:h"));
        assert!(!m("feed:user:*:*", "feed:user:1"));
        assert!(m("h?llo", "hello"));
        assert!(!m("h?llo", "hllo"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(m("h[b-a]llo", "hallo"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("**x", "abx"));
        assert!(m("[abc", "a"));
    }
}
