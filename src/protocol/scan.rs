//! Resumable RESP scanners: find frame boundaries without building frames.
//!
//! The request scanner yields a command's raw bytes plus `Bytes` slices of its
//! arguments; the reply scanner yields only the raw bytes of one complete
//! reply (RESP2 and RESP3: push, attribute, map, set, double, big number,
//! verbatim and streamed types). Both keep their position across reads, so a
//! 4 MiB frame arriving in 16 KiB pieces is scanned once, not once per read
//! (the quadratic cost of redis-protocol's codecs, `protocol-notes.md` §1).
//! Declared lengths are checked against [`Limits`] before anything is
//! buffered. "Need more bytes" is `Ok(None)`; `Err` is bad data.

use bytes::{Buf, Bytes, BytesMut};

/// A line without CRLF longer than this is refused (Redis: `PROTO_INLINE_MAX_SIZE`
/// is also what it uses for multibulk and bulk count lines).
const MAX_COUNT_LINE: usize = 64 * 1024;

/// Frame size limits, checked against declared lengths before buffering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string argument (Redis `proto-max-bulk-len`, 512 MiB).
    pub max_bulk: usize,
    /// Most arguments in one command (Redis accepts up to `INT_MAX`).
    pub max_array: usize,
    /// Longest inline command line (Redis `PROTO_INLINE_MAX_SIZE`, 64 KiB).
    pub max_inline: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk: 512 * 1024 * 1024,
            max_array: i32::MAX as usize,
            max_inline: 64 * 1024,
        }
    }
}

/// Bad bytes on the wire. The message is Redis's own where Redis has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid multibulk length")]
    InvalidMultibulkLength,
    #[error("invalid bulk length")]
    InvalidBulkLength,
    #[error("expected '$', got '{0}'")]
    ExpectedBulk(char),
    #[error("too big inline request")]
    InlineTooBig,
    #[error("too big mbulk count string")]
    MultibulkCountTooBig,
    #[error("too big bulk count string")]
    BulkCountTooBig,
    #[error("unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("invalid reply from upstream: {0}")]
    BadReply(&'static str),
}

impl ProtocolError {
    /// Bounded label for `protocol_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolError::InvalidMultibulkLength => "invalid_multibulk_length",
            ProtocolError::InvalidBulkLength => "invalid_bulk_length",
            ProtocolError::ExpectedBulk(_) => "expected_bulk",
            ProtocolError::InlineTooBig => "inline_too_big",
            ProtocolError::MultibulkCountTooBig | ProtocolError::BulkCountTooBig => "count_too_big",
            ProtocolError::UnbalancedQuotes => "unbalanced_quotes",
            ProtocolError::BadReply(_) => "bad_reply",
        }
    }

    /// The reply Redis sends before closing the connection.
    pub fn to_reply(&self) -> Bytes {
        Bytes::from(format!("-ERR Protocol error: {self}\r\n"))
    }
}

/// One client command: the exact bytes to forward and its arguments.
#[derive(Debug, Clone)]
pub struct Request {
    /// RESP-encoded command (inline commands are re-encoded as RESP arrays).
    pub raw: Bytes,
    /// Arguments, slices of `raw` (copies for inline commands).
    pub args: Vec<Bytes>,
}

/// Resumable scanner for client requests (RESP arrays of bulk strings, or inline).
#[derive(Debug)]
pub struct RequestScanner {
    limits: Limits,
    /// Bytes of the current frame already validated.
    pos: usize,
    /// Arguments still to read; `None` at a frame boundary.
    remaining: Option<usize>,
    /// Declared length of the bulk whose header was read.
    bulk_len: Option<usize>,
    args: Vec<(usize, usize)>,
}

impl RequestScanner {
    pub fn new(limits: Limits) -> Self {
        RequestScanner {
            limits,
            pos: 0,
            remaining: None,
            bulk_len: None,
            args: Vec::new(),
        }
    }

    /// Next complete request, `Ok(None)` when more bytes are needed.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, ProtocolError> {
        loop {
            let Some(mut remaining) = self.remaining else {
                if buf.is_empty() {
                    return Ok(None);
                }
                if buf[0] != b'*' {
                    match self.inline(buf)? {
                        Inline::Incomplete => return Ok(None),
                        Inline::Empty => continue,
                        Inline::Request(r) => return Ok(Some(r)),
                    }
                }
                let Some(nl) = find_crlf(buf, 1) else {
                    if buf.len() > MAX_COUNT_LINE {
                        return Err(ProtocolError::MultibulkCountTooBig);
                    }
                    return Ok(None);
                };
                let n = parse_int(&buf[1..nl]).ok_or(ProtocolError::InvalidMultibulkLength)?;
                if n > self.limits.max_array as i64 {
                    return Err(ProtocolError::InvalidMultibulkLength);
                }
                if n <= 0 {
                    // Redis ignores empty multibulks and sends no reply.
                    buf.advance(nl + 2);
                    continue;
                }
                self.remaining = Some(n as usize);
                self.pos = nl + 2;
                self.args.clear();
                // Capacity from a client-declared count is capped: memory
                // grows with bytes that actually arrived, not with claims.
                self.args.reserve((n as usize).min(1024));
                continue;
            };
            while remaining > 0 {
                match self.bulk_len {
                    None => {
                        if self.pos >= buf.len() {
                            self.remaining = Some(remaining);
                            return Ok(None);
                        }
                        if buf[self.pos] != b'$' {
                            return Err(ProtocolError::ExpectedBulk(buf[self.pos] as char));
                        }
                        let Some(nl) = find_crlf(buf, self.pos + 1) else {
                            if buf.len() - self.pos > MAX_COUNT_LINE {
                                return Err(ProtocolError::BulkCountTooBig);
                            }
                            self.remaining = Some(remaining);
                            return Ok(None);
                        };
                        let len = parse_int(&buf[self.pos + 1..nl])
                            .filter(|&l| l >= 0 && l as u64 <= self.limits.max_bulk as u64)
                            .ok_or(ProtocolError::InvalidBulkLength)?;
                        self.bulk_len = Some(len as usize);
                        self.pos = nl + 2;
                    }
                    Some(len) => {
                        let end = self.pos + len + 2;
                        if buf.len() < end {
                            // Ask for the rest in one allocation, capped so a
                            // declared-but-unsent length costs little.
                            buf.reserve((end - buf.len()).min(16 << 20));
                            self.remaining = Some(remaining);
                            return Ok(None);
                        }
                        self.args.push((self.pos, self.pos + len));
                        self.pos = end;
                        self.bulk_len = None;
                        remaining -= 1;
                    }
                }
            }
            let raw = buf.split_to(self.pos).freeze();
            let args = self.args.drain(..).map(|(s, e)| raw.slice(s..e)).collect();
            self.remaining = None;
            self.pos = 0;
            return Ok(Some(Request { raw, args }));
        }
    }

    fn inline(&mut self, buf: &mut BytesMut) -> Result<Inline, ProtocolError> {
        let Some(nl) = memchr::memchr(b'\n', buf) else {
            if buf.len() > self.limits.max_inline {
                return Err(ProtocolError::InlineTooBig);
            }
            return Ok(Inline::Incomplete);
        };
        if nl > self.limits.max_inline {
            return Err(ProtocolError::InlineTooBig);
        }
        let line = buf.split_to(nl + 1);
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let args = split_inline(line)?;
        if args.is_empty() {
            return Ok(Inline::Empty);
        }
        if args.len() > self.limits.max_array {
            return Err(ProtocolError::InvalidMultibulkLength);
        }
        let raw = encode_command(&args);
        Ok(Inline::Request(Request { raw, args }))
    }
}

enum Inline {
    Incomplete,
    Empty,
    Request(Request),
}

/// Split an inline command line like Redis's `sdssplitargs`: whitespace
/// separated, with "double quotes" (and \n, \xHH escapes) and 'single quotes'.
fn split_inline(line: &[u8]) -> Result<Vec<Bytes>, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= line.len() {
            break;
        }
        let mut cur = Vec::new();
        match line[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                loop {
                    let Some(&c) = line.get(i) else {
                        return Err(ProtocolError::UnbalancedQuotes);
                    };
                    if c == q {
                        i += 1;
                        // A closing quote must be followed by a space or end.
                        if line.get(i).is_some_and(|c| !c.is_ascii_whitespace()) {
                            return Err(ProtocolError::UnbalancedQuotes);
                        }
                        break;
                    }
                    if c == b'\\' && i + 1 < line.len() {
                        let e = line[i + 1];
                        if q == b'"' && e == b'x' && i + 3 < line.len() {
                            let hex = std::str::from_utf8(&line[i + 2..i + 4]).ok();
                            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                                cur.push(b);
                                i += 4;
                                continue;
                            }
                        }
                        let out = match (q, e) {
                            (b'"', b'n') => b'\n',
                            (b'"', b'r') => b'\r',
                            (b'"', b't') => b'\t',
                            (b'"', b'b') => 8,
                            (b'"', b'a') => 7,
                            (b'"', other) => other,
                            (_, b'\'') => b'\'',
                            _ => {
                                cur.push(c);
                                i += 1;
                                continue;
                            }
                        };
                        cur.push(out);
                        i += 2;
                        continue;
                    }
                    cur.push(c);
                    i += 1;
                }
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    cur.push(line[i]);
                    i += 1;
                }
            }
        }
        args.push(Bytes::from(cur));
    }
    Ok(args)
}

/// Encode a command as a RESP array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Bytes {
    let mut out =
        BytesMut::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    push_header(&mut out, b'*', args.len());
    for a in args {
        let a = a.as_ref();
        push_header(&mut out, b'$', a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out.freeze()
}

/// Append `<t><n>\r\n`.
pub fn push_header(out: &mut BytesMut, t: u8, n: usize) {
    out.extend_from_slice(&[t]);
    out.extend_from_slice(itoa_buf(n as u64).as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn itoa_buf(n: u64) -> String {
    n.to_string()
}

/// What an aggregate level still needs.
#[derive(Debug, Clone, Copy)]
enum Level {
    /// A counted aggregate (array, set, push, map) with this many values left.
    Counted(u64),
    /// An attribute: its values do not complete a value of the parent.
    Attr(u64),
    /// A streamed aggregate (`*?`), closed by `.`.
    Streamed,
}

/// Resumable scanner for replies: yields the raw bytes of one whole reply.
/// An attribute (`|`) is returned together with the value it annotates.
#[derive(Debug)]
pub struct ReplyScanner {
    max_bulk: usize,
    pos: usize,
    levels: Vec<Level>,
    in_stream_str: bool,
}

impl ReplyScanner {
    pub fn new(max_bulk: usize) -> Self {
        ReplyScanner {
            max_bulk,
            pos: 0,
            levels: Vec::new(),
            in_stream_str: false,
        }
    }

    /// Next complete reply, `Ok(None)` when more bytes are needed.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
        if self.levels.is_empty() {
            if buf.is_empty() {
                return Ok(None);
            }
            self.pos = 0;
            self.levels.push(Level::Counted(1));
        }
        while !self.levels.is_empty() {
            let Some(nl) = find_crlf(buf, self.pos + 1) else {
                if buf.len() - self.pos > self.max_bulk.max(MAX_COUNT_LINE) {
                    return Err(ProtocolError::BadReply("line too long"));
                }
                return Ok(None);
            };
            let t = buf[self.pos];
            let line = &buf[self.pos + 1..nl];
            let next = nl + 2;
            if self.in_stream_str {
                if t != b';' {
                    return Err(ProtocolError::BadReply("expected streamed string chunk"));
                }
                let n = self.len(line)?;
                if n == 0 {
                    self.in_stream_str = false;
                    self.pos = next;
                    self.complete_value();
                } else {
                    let end = next + n + 2;
                    if buf.len() < end {
                        return Ok(None);
                    }
                    self.pos = end;
                }
                continue;
            }
            match t {
                b'+' | b'-' | b':' | b',' | b'(' | b'#' | b'_' => {
                    self.pos = next;
                    self.complete_value();
                }
                b'$' | b'=' | b'!' => {
                    if t == b'$' && line == b"?" {
                        self.pos = next;
                        self.in_stream_str = true;
                        continue;
                    }
                    if line == b"-1" {
                        self.pos = next;
                        self.complete_value();
                        continue;
                    }
                    let n = self.len(line)?;
                    let end = next + n + 2;
                    if buf.len() < end {
                        buf.reserve((end - buf.len()).min(16 << 20));
                        return Ok(None);
                    }
                    self.pos = end;
                    self.complete_value();
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    self.pos = next;
                    if line == b"?" && t != b'|' {
                        self.levels.push(Level::Streamed);
                        continue;
                    }
                    if line == b"-1" && t == b'*' {
                        self.complete_value();
                        continue;
                    }
                    let n = self.len(line)? as u64;
                    let n = if matches!(t, b'%' | b'|') { n * 2 } else { n };
                    match (t, n) {
                        (b'|', 0) => {}
                        (b'|', n) => self.levels.push(Level::Attr(n)),
                        (_, 0) => self.complete_value(),
                        (_, n) => self.levels.push(Level::Counted(n)),
                    }
                }
                b'.' => {
                    if !matches!(self.levels.last(), Some(Level::Streamed)) {
                        return Err(ProtocolError::BadReply("unexpected end of stream"));
                    }
                    self.levels.pop();
                    self.pos = next;
                    self.complete_value();
                }
                _ => return Err(ProtocolError::BadReply("unknown type byte")),
            }
        }
        let frame = buf.split_to(self.pos).freeze();
        self.pos = 0;
        Ok(Some(frame))
    }

    fn len(&self, line: &[u8]) -> Result<usize, ProtocolError> {
        parse_int(line)
            .filter(|&n| n >= 0 && n as u64 <= self.max_bulk as u64)
            .map(|n| n as usize)
            .ok_or(ProtocolError::BadReply("invalid length"))
    }

    /// One value finished: count it against the innermost aggregate, closing
    /// every aggregate it completes.
    fn complete_value(&mut self) {
        while let Some(level) = self.levels.last_mut() {
            match level {
                Level::Counted(n) => {
                    *n -= 1;
                    if *n > 0 {
                        return;
                    }
                    self.levels.pop();
                }
                Level::Attr(n) => {
                    *n -= 1;
                    if *n == 0 {
                        self.levels.pop();
                    }
                    // An attribute is not a value of its parent.
                    return;
                }
                Level::Streamed => return,
            }
        }
    }
}

/// Position of the `\r` of the first CRLF at or after `from`.
fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let mut start = from;
    while start < buf.len() {
        let nl = memchr::memchr(b'\n', &buf[start..])? + start;
        if nl > from && buf[nl - 1] == b'\r' {
            return Some(nl - 1);
        }
        start = nl + 1;
    }
    None
}

/// Strict decimal integer parse (what Redis's `string2ll` accepts).
pub fn parse_int(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Split a complete RESP array reply into (header length, element ranges).
/// Returns `None` when `frame` is not a non-null array or is malformed.
pub fn split_array(frame: &Bytes) -> Option<Vec<(usize, usize)>> {
    if frame.first() != Some(&b'*') {
        return None;
    }
    let nl = find_crlf(frame, 1)?;
    let n = parse_int(&frame[1..nl])?;
    if n < 0 {
        return None;
    }
    let mut rest = BytesMut::from(&frame[nl + 2..]);
    let mut ranges = Vec::with_capacity(n as usize);
    let mut offset = nl + 2;
    let mut scanner = ReplyScanner::new(usize::MAX >> 1);
    for _ in 0..n {
        let el = scanner.next(&mut rest).ok()??;
        ranges.push((offset, offset + el.len()));
        offset += el.len();
    }
    Some(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reqs(input: &[u8]) -> Vec<Vec<Bytes>> {
        let mut s = RequestScanner::new(Limits::default());
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(r) = s.next(&mut buf).unwrap() {
            out.push(r.args);
        }
        out
    }

    #[test]
    fn pipelined_requests_and_partial_tail() {
        let mut s = RequestScanner::new(Limits::default());
        let mut buf = BytesMut::from(&b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r"[..]);
        let r = s.next(&mut buf).unwrap().unwrap();
        assert_eq!(&r.raw[..], b"*1\r\n$4\r\nPING\r\n");
        assert!(s.next(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"\nk\r\n");
        let r = s.next(&mut buf).unwrap().unwrap();
        assert_eq!(r.args, vec![Bytes::from("GET"), Bytes::from("k")]);
        assert!(buf.is_empty());
    }

    #[test]
    fn inline_commands_with_quotes() {
        let got = reqs(b"PING\r\nSET inl 'a b'\r\n\r\nECHO \"x\\ny\"\n");
        assert_eq!(got.len(), 3);
        assert_eq!(got[1][2], Bytes::from("a b"));
        assert_eq!(got[2][1], Bytes::from("x\ny"));
    }

    #[test]
    fn limits_refuse_before_buffering() {
        let limits = Limits {
            max_bulk: 10,
            max_array: 4,
            max_inline: 8,
        };
        let mut s = RequestScanner::new(limits);
        let e = s
            .next(&mut BytesMut::from(&b"*1\r\n$11\r\n"[..]))
            .unwrap_err();
        assert_eq!(e, ProtocolError::InvalidBulkLength);
        let mut s = RequestScanner::new(limits);
        let e = s.next(&mut BytesMut::from(&b"*5\r\n"[..])).unwrap_err();
        assert_eq!(e, ProtocolError::InvalidMultibulkLength);
        let mut s = RequestScanner::new(limits);
        let e = s
            .next(&mut BytesMut::from(&b"PINGPINGPING"[..]))
            .unwrap_err();
        assert_eq!(e, ProtocolError::InlineTooBig);
        let mut s = RequestScanner::new(limits);
        let e = s
            .next(&mut BytesMut::from(&b"*1\r\n:1\r\n"[..]))
            .unwrap_err();
        assert_eq!(e, ProtocolError::ExpectedBulk(':'));
        let mut s = RequestScanner::new(limits);
        let e = s.next(&mut BytesMut::from(&b"*x\r\n"[..])).unwrap_err();
        assert_eq!(e, ProtocolError::InvalidMultibulkLength);
        let mut s = RequestScanner::new(limits);
        let e = s
            .next(&mut BytesMut::from(&b"SET a \"b\n"[..]))
            .unwrap_err();
        assert_eq!(e, ProtocolError::UnbalancedQuotes);
    }

    fn replies(input: &[u8]) -> Vec<Bytes> {
        let mut s = ReplyScanner::new(1 << 20);
        let mut out = Vec::new();
        // Feed one byte at a time: every boundary must survive a split.
        let mut buf = BytesMut::new();
        for b in input {
            buf.extend_from_slice(&[*b]);
            while let Some(f) = s.next(&mut buf).unwrap() {
                out.push(f);
            }
        }
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn resp3_reply_types_byte_by_byte() {
        let frames: &[&[u8]] = &[
            b"+OK\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"%2\r\n+a\r\n:1\r\n+b\r\n*2\r\n,1.5\r\n(123\r\n",
            b">3\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n_\r\n",
            b"|1\r\n+ttl\r\n:3\r\n$2\r\nhi\r\n",
            b"=15\r\ntxt:Some string\r\n",
            b"~2\r\n#t\r\n!3\r\nerr\r\n",
            b"$?\r\n;4\r\nHell\r\n;1\r\no\r\n;0\r\n",
            b"*?\r\n:1\r\n*?\r\n:2\r\n.\r\n.\r\n",
            b"*2\r\n|1\r\n+k\r\n+v\r\n:7\r\n:8\r\n",
        ];
        let all: Vec<u8> = frames.concat();
        let got = replies(&all);
        assert_eq!(got.len(), frames.len());
        for (g, f) in got.iter().zip(frames) {
            assert_eq!(&g[..], *f);
        }
    }

    #[test]
    fn split_array_elements() {
        let f = Bytes::from_static(b"*3\r\n+OK\r\n*2\r\n:1\r\n:2\r\n$1\r\nx\r\n");
        let r = split_array(&f).unwrap();
        assert_eq!(r, vec![(4, 9), (9, 21), (21, 28)]);
    }
}
