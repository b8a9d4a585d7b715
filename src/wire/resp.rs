//! Raw RESP helpers: the text of a bulk reply, an integer reply's value,
//! the elements of an aggregate reply, and
//! a RESP3 reply as Redis would have sent it to a RESP2 client (fills are
//! made over RESP3; doubles keep Redis's own text, which a decode and
//! re-encode would not).

use bytes::{BufMut, Bytes, BytesMut};

/// One line's end (after `\r\n`), from `at`.
fn line_end(b: &[u8], at: usize) -> Option<usize> {
    memchr::memmem::find(b.get(at..)?, b"\r\n").map(|i| at + i + 2)
}

fn int(line: &[u8]) -> Option<i64> {
    std::str::from_utf8(line).ok()?.parse().ok()
}

/// The end of the value starting at `at` (one whole frame), if complete
/// and well formed.
pub fn frame_end(b: &[u8], at: usize) -> Option<usize> {
    let kind = *b.get(at)?;
    let end = line_end(b, at)?;
    let head = &b[at + 1..end - 2];
    match kind {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Some(end),
        b'$' | b'!' | b'=' => {
            let n = int(head)?;
            if n < 0 {
                return Some(end);
            }
            let stop = end + n as usize + 2;
            (stop <= b.len()).then_some(stop)
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = int(head)?;
            if n < 0 {
                return Some(end);
            }
            let count = if matches!(kind, b'%' | b'|') {
                2 * n
            } else {
                n
            };
            let mut pos = end;
            for _ in 0..count {
                pos = frame_end(b, pos)?;
            }
            if kind == b'|' {
                // An attribute precedes the value it annotates.
                return frame_end(b, pos);
            }
            Some(pos)
        }
        _ => None,
    }
}

/// The bytes of a bulk (`$`) or verbatim (`=`, without its `txt:`) string.
pub fn bulk_text(r: &[u8]) -> Option<&[u8]> {
    let t = *r.first()?;
    if t != b'$' && t != b'=' {
        return None;
    }
    let nl = memchr::memchr(b'\n', r)?;
    let len: usize = std::str::from_utf8(r.get(1..nl.checked_sub(1)?)?)
        .ok()?
        .parse()
        .ok()?;
    let body = r.get(nl + 1..nl + 1 + len)?;
    Some(if t == b'=' { body.get(4..)? } else { body })
}

/// An integer reply's value (`:n`).
pub fn integer(r: &[u8]) -> Option<i64> {
    crate::wire::scan::parse_int(r.strip_prefix(b":")?.strip_suffix(b"\r\n")?)
}

/// The elements of an array (or set, push) reply, as raw frames.
pub fn elements(reply: &Bytes) -> Option<Vec<Bytes>> {
    if !matches!(reply.first(), Some(b'*' | b'~' | b'>')) {
        return None;
    }
    let end = line_end(reply, 0)?;
    let n = int(&reply[1..end - 2])?;
    let mut out = Vec::with_capacity(usize::try_from(n).ok()?);
    let mut pos = end;
    for _ in 0..n {
        let next = frame_end(reply, pos)?;
        out.push(reply.slice(pos..next));
        pos = next;
    }
    Some(out)
}

/// `reply` (RESP3) as Redis sends it to a RESP2 client. `flatten_pairs`:
/// an array of two-element arrays becomes one flat array (ZRANGE ..
/// WITHSCORES). `None` if it is not well formed.
pub fn to_resp2(reply: &[u8], flatten_pairs: bool) -> Option<Bytes> {
    let mut out = BytesMut::with_capacity(reply.len() + 16);
    let end = convert(reply, 0, &mut out, flatten_pairs)?;
    (end == reply.len()).then(|| out.freeze())
}

fn bulk(out: &mut BytesMut, text: &[u8]) {
    out.put_u8(b'$');
    out.put_slice(text.len().to_string().as_bytes());
    out.put_slice(b"\r\n");
    out.put_slice(text);
    out.put_slice(b"\r\n");
}

fn convert(b: &[u8], at: usize, out: &mut BytesMut, flatten: bool) -> Option<usize> {
    let kind = *b.get(at)?;
    let end = line_end(b, at)?;
    let head = &b[at + 1..end - 2];
    match kind {
        b'+' | b'-' | b':' => {
            out.put_slice(&b[at..end]);
            Some(end)
        }
        b'_' => {
            out.put_slice(b"$-1\r\n");
            Some(end)
        }
        // Doubles and big numbers: a bulk string of the same text.
        b',' | b'(' => {
            bulk(out, head);
            Some(end)
        }
        b'#' => {
            out.put_slice(if head == b"t" { b":1\r\n" } else { b":0\r\n" });
            Some(end)
        }
        b'$' | b'!' | b'=' => {
            let n = int(head)?;
            if n < 0 {
                out.put_slice(b"$-1\r\n");
                return Some(end);
            }
            let stop = end + n as usize + 2;
            let body = b.get(end..stop - 2)?;
            match kind {
                b'$' => out.put_slice(&b[at..stop]),
                b'!' => {
                    out.put_u8(b'-');
                    out.put_slice(body);
                    out.put_slice(b"\r\n");
                }
                // Verbatim: the text after its `xxx:` format.
                _ => bulk(out, body.get(4..)?),
            }
            Some(stop)
        }
        b'*' | b'~' | b'%' => {
            let n = int(head)?;
            if n < 0 {
                out.put_slice(b"*-1\r\n");
                return Some(end);
            }
            let n = n as usize;
            let mut pos = end;
            if kind == b'%' {
                out.put_slice(format!("*{}\r\n", 2 * n).as_bytes());
                for _ in 0..2 * n {
                    pos = convert(b, pos, out, false)?;
                }
                return Some(pos);
            }
            // Pairs flattened: the count doubles, each pair's header goes.
            let pairs =
                flatten && kind == b'*' && n > 0 && b.get(pos..pos + 4) == Some(&b"*2\r\n"[..]);
            out.put_slice(format!("*{}\r\n", if pairs { 2 * n } else { n }).as_bytes());
            for _ in 0..n {
                if pairs {
                    if b.get(pos..pos + 4) != Some(&b"*2\r\n"[..]) {
                        return None;
                    }
                    pos += 4;
                    pos = convert(b, pos, out, false)?;
                    pos = convert(b, pos, out, false)?;
                } else {
                    pos = convert(b, pos, out, false)?;
                }
            }
            Some(pos)
        }
        // An attribute: dropped, the value it annotates kept.
        b'|' => {
            let n = int(head)?;
            let mut pos = end;
            for _ in 0..2 * n.max(0) {
                pos = frame_end(b, pos)?;
            }
            convert(b, pos, out, flatten)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r2(s: &str, flatten: bool) -> String {
        String::from_utf8(to_resp2(s.as_bytes(), flatten).unwrap_or_default().to_vec())
            .unwrap_or_default()
    }

    #[test]
    fn resp3_to_resp2() {
        assert_eq!(r2("_\r\n", false), "$-1\r\n");
        assert_eq!(r2(",1.5\r\n", false), "$3\r\n1.5\r\n");
        assert_eq!(
            r2("%1\r\n$1\r\na\r\n$1\r\nb\r\n", false),
            "*2\r\n$1\r\na\r\n$1\r\nb\r\n"
        );
        assert_eq!(r2("~2\r\n:1\r\n:2\r\n", false), "*2\r\n:1\r\n:2\r\n");
        assert_eq!(
            r2("*2\r\n*2\r\n$1\r\na\r\n,1\r\n*2\r\n$1\r\nb\r\n,2\r\n", true),
            "*4\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$1\r\n2\r\n"
        );
        assert_eq!(
            r2("*2\r\n$1\r\na\r\n_\r\n", true),
            "*2\r\n$1\r\na\r\n$-1\r\n"
        );
        assert_eq!(r2("#t\r\n", false), ":1\r\n");
        assert_eq!(r2("=7\r\ntxt:abc\r\n", false), "$3\r\nabc\r\n");
        assert!(to_resp2(b"*2\r\n:1\r\n", false).is_none());
    }

    #[test]
    fn elements_of_an_exec_reply() {
        let r = Bytes::from_static(b"*3\r\n:5\r\n$-1\r\n*1\r\n$1\r\nx\r\n");
        let e = elements(&r).unwrap_or_default();
        assert_eq!(e.len(), 3);
        assert_eq!(&e[2][..], b"*1\r\n$1\r\nx\r\n");
        assert_eq!(frame_end(b"|1\r\n+a\r\n+b\r\n:1\r\n", 0), Some(16));
    }
}
