//! Resumable RESP scanners: find frame boundaries without building frames.
//!
//! The request scanner yields a command's raw bytes plus `Bytes` slices of its
//! arguments; the reply scanner yields only the raw bytes of one complete
//! reply (RESP2 and RESP3: push, attribute, map, set, double, big number,
//! verbatim and streamed types). Both keep their position across reads, so a
//! 4 MiB frame arriving in 16 KiB pieces is scanned once, not once per read
//! (redis-protocol's codecs re-parse a partial frame from its start on
//! every read, which is quadratic on large values).
//! Declared lengths are checked against [`Limits`] before anything is
//! buffered. "Need more bytes" is `Ok(None)`; `Err` is bad data.

use bytes::{Buf, Bytes, BytesMut};

/// What one argument costs in memory beyond its bytes, counted against
/// `max_request`: its `Bytes` handle and its offsets in the scanner.
pub const ARG_COST: usize = std::mem::size_of::<Bytes>() + std::mem::size_of::<(u32, u32)>();

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
    /// Largest whole request, from its declared lengths and
    /// [`ARG_COST`] per argument (Redis `client-query-buffer-limit`, 1
    /// GiB); below 4 GiB.
    pub max_request: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk: 512 * 1024 * 1024,
            max_array: i32::MAX as usize,
            max_inline: 64 * 1024,
            max_request: 1 << 30,
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
    /// The byte as it came: Redis writes it raw into its error line
    /// (`%c`), CR and LF as spaces.
    #[error("expected '$', got '{}'", char::from(*.0))]
    ExpectedBulk(u8),
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
    /// Past `max_request`: Redis closes such a client without a reply.
    #[error("request larger than the query buffer limit")]
    RequestTooBig,
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
            ProtocolError::RequestTooBig => "request_too_big",
        }
    }

    /// What the client gets before the connection closes: nothing for a
    /// request past the query buffer limit (Redis closes such a client
    /// silently), else Redis's error line.
    pub fn client_reply(&self) -> Option<Bytes> {
        match self {
            ProtocolError::RequestTooBig => None,
            other => Some(other.to_reply()),
        }
    }

    /// The reply Redis sends before closing the connection. As Redis
    /// (`addReplyErrorFormat`), CR and LF inside the text become spaces: an
    /// error line cannot hold them.
    pub fn to_reply(&self) -> Bytes {
        let mut out = b"-ERR Protocol error: ".to_vec();
        match self {
            ProtocolError::ExpectedBulk(b) => {
                out.extend_from_slice(b"expected '$', got '");
                out.push(*b);
                out.push(b'\'');
            }
            other => out.extend_from_slice(other.to_string().as_bytes()),
        }
        for c in &mut out {
            if *c == b'\r' || *c == b'\n' {
                *c = b' ';
            }
        }
        out.extend_from_slice(b"\r\n");
        Bytes::from(out)
    }
}

/// One client command: the exact bytes to forward and its arguments.
///
/// `raw` is always canonical RESP (`*<n>\r\n` then `$<len>\r\n<arg>\r\n`
/// per argument): Redis, and the scanner, accept line ends of `\r` and any
/// byte, and any two bytes after a bulk; a request that came in such a form
/// (or inline) is re-encoded from its arguments, so what reaches an
/// upstream connection parses one way only, whoever splices it.
#[derive(Debug, Clone)]
pub struct Request {
    /// RESP-encoded command.
    pub raw: Bytes,
    /// Arguments, slices of the bytes that arrived (copies for inline
    /// commands).
    pub args: Vec<Bytes>,
    /// Length of the array header in `raw` (`*<n>\r\n`): where the
    /// arguments start, for a stage that adds arguments.
    pub head: usize,
}

impl Request {
    /// A request from its arguments (encoded canonically).
    pub fn from_args(args: Vec<Bytes>) -> Request {
        let raw = encode_command(&args);
        Request {
            head: header_len(args.len()),
            raw,
            args,
        }
    }
}

/// Length of a canonical header `*<n>\r\n` (or `$<n>\r\n`).
pub fn header_len(n: usize) -> usize {
    let mut digits = 1;
    let mut n = n / 10;
    while n > 0 {
        digits += 1;
        n /= 10;
    }
    1 + digits + 2
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
    /// Bytes the current request declared so far (headers and bulks).
    declared: usize,
    /// Where each argument of the current request is in the buffer (32-bit
    /// offsets: `max_request` is below 4 GiB; 8 bytes per argument, as an
    /// empty argument is 6 bytes on the wire).
    args: Vec<(u32, u32)>,
    /// Every line of the current request ended `\r\n` and every bulk was
    /// followed by `\r\n`: its bytes can be forwarded as they came.
    canonical: bool,
    /// Length of the current request's array header.
    head: usize,
}

impl RequestScanner {
    pub fn new(limits: Limits) -> Self {
        RequestScanner {
            limits,
            pos: 0,
            remaining: None,
            bulk_len: None,
            declared: 0,
            args: Vec::new(),
            canonical: true,
            head: 0,
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
                let Some(nl) = count_line_end(buf, 0) else {
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
                self.declared = nl + 2;
                self.pos = nl + 2;
                self.head = nl + 2;
                self.canonical = buf[nl + 1] == b'\n';
                self.args.clear();
                // Capacity from a client-declared count is capped: memory
                // grows with bytes that actually arrived, not with claims.
                self.args.reserve((n as usize).min(1024));
                continue;
            };
            while remaining > 0 {
                match self.bulk_len {
                    None => {
                        // As Redis: the line is found first (a '$' is only
                        // expected once it is complete).
                        let Some(nl) = count_line_end(buf, self.pos) else {
                            if buf.len() - self.pos > MAX_COUNT_LINE {
                                return Err(ProtocolError::BulkCountTooBig);
                            }
                            self.remaining = Some(remaining);
                            return Ok(None);
                        };
                        if buf[self.pos] != b'$' {
                            return Err(ProtocolError::ExpectedBulk(buf[self.pos]));
                        }
                        let len = parse_int(&buf[self.pos + 1..nl])
                            .filter(|&l| l >= 0 && l as u64 <= self.limits.max_bulk as u64)
                            .ok_or(ProtocolError::InvalidBulkLength)?;
                        self.bulk_len = Some(len as usize);
                        self.canonical &= buf[nl + 1] == b'\n';
                        // The whole request's declared size, checked
                        // before its bytes are buffered, with what each
                        // argument costs in memory beyond its bytes: a
                        // request of millions of empty arguments is
                        // bounded by what it costs, not by its few bytes.
                        self.declared = self
                            .declared
                            .saturating_add(nl + 2 - self.pos + len as usize + 2 + ARG_COST);
                        if self.declared > self.limits.max_request {
                            return Err(ProtocolError::RequestTooBig);
                        }
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
                        // Below max_request, which is below 4 GiB.
                        self.args.push((self.pos as u32, (self.pos + len) as u32));
                        self.canonical &= buf[end - 2..end] == *b"\r\n";
                        self.pos = end;
                        self.bulk_len = None;
                        remaining -= 1;
                    }
                }
            }
            let raw = buf.split_to(self.pos).freeze();
            let args: Vec<Bytes> = self
                .args
                .drain(..)
                .map(|(s, e)| raw.slice(s as usize..e as usize))
                .collect();
            if self.args.capacity() > 4096 {
                // A request of many arguments does not leave its offsets
                // allocated for the life of the connection.
                self.args = Vec::new();
            }
            self.remaining = None;
            self.pos = 0;
            if !self.canonical {
                return Ok(Some(Request::from_args(args)));
            }
            return Ok(Some(Request {
                raw,
                args,
                head: self.head,
            }));
        }
    }

    fn inline(&mut self, buf: &mut BytesMut) -> Result<Inline, ProtocolError> {
        // Redis looks for the newline with strchr(): a NUL before it hides
        // it, and the request stays incomplete (until it is too big).
        let nl = match memchr::memchr2(b'\n', 0, buf) {
            Some(i) if buf[i] == b'\n' => Some(i),
            _ => None,
        };
        let Some(nl) = nl else {
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
        Ok(Inline::Request(Request::from_args(args)))
    }
}

enum Inline {
    Incomplete,
    Empty,
    Request(Request),
}

/// Split an inline command line exactly as Redis's `sdssplitargs` does
/// (sds.c): tokens separated by blanks (C `isspace`), a quote anywhere in a
/// token opens a quoted part ("double": `\n \r \t \b \a \xHH` and `\c`
/// escapes; 'single': only `\'`), a closing quote must be followed by a
/// blank or the end, and an unterminated quote is an error. The line holds
/// no NUL (the scanner never completes such a line, as Redis does not).
fn split_inline(line: &[u8]) -> Result<Vec<Bytes>, ProtocolError> {
    // C isspace: space, \t, \n, \v, \f, \r.
    let blank = |c: u8| matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r');
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let hex = |c: u8| (c as char).to_digit(16);
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        while p < line.len() && blank(line[p]) {
            p += 1;
        }
        if p >= line.len() {
            return Ok(args);
        }
        // The quote a quoted part was opened with, while inside it.
        let mut quote: Option<u8> = None;
        let mut cur = Vec::new();
        loop {
            let c = at(p);
            if let Some(q) = quote {
                if q == b'"'
                    && c == b'\\'
                    && at(p + 1) == b'x'
                    && let (Some(h), Some(l)) = (hex(at(p + 2)), hex(at(p + 3)))
                {
                    cur.push((h * 16 + l) as u8);
                    p += 4;
                    continue;
                }
                if q == b'"' && c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    cur.push(match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        other => other,
                    });
                } else if q == b'\'' && c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    cur.push(b'\'');
                } else if c == q {
                    // A closing quote must be followed by a blank or the end.
                    if at(p + 1) != 0 && !blank(at(p + 1)) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return Err(ProtocolError::UnbalancedQuotes);
                } else {
                    cur.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => {
                        if c != 0 {
                            p += 1;
                        }
                        break;
                    }
                    b'"' | b'\'' => quote = Some(c),
                    other => cur.push(other),
                }
            }
            p += 1;
        }
        args.push(Bytes::from(cur));
    }
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
    /// Bytes of a bulk's body (and its CRLF) still to pass over: a large
    /// bulk is scanned as it arrives, so the part scanned can be handed on
    /// before the rest is in ([`ReplyScanner::take_scanned`]).
    skip: usize,
}

impl ReplyScanner {
    pub fn new(max_bulk: usize) -> Self {
        ReplyScanner {
            max_bulk,
            pos: 0,
            levels: Vec::new(),
            in_stream_str: false,
            skip: 0,
        }
    }

    /// Bytes of an incomplete reply already scanned (0 between replies).
    pub fn scanned(&self) -> usize {
        if self.levels.is_empty() { 0 } else { self.pos }
    }

    /// Hand on the scanned bytes of an incomplete reply (the rest follows
    /// from later calls of [`ReplyScanner::next`], whose reply is then
    /// only what came after).
    pub fn take_scanned(&mut self, buf: &mut BytesMut) -> Bytes {
        let n = self.scanned();
        self.pos = 0;
        buf.split_to(n).freeze()
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
            if self.skip > 0 {
                let have = buf.len() - self.pos;
                if have < self.skip {
                    self.pos += have;
                    self.skip -= have;
                    // Ask for the rest in one allocation, capped so a
                    // declared-but-unsent length costs little.
                    buf.reserve(self.skip.min(16 << 20));
                    return Ok(None);
                }
                self.pos += self.skip;
                self.skip = 0;
                if !self.in_stream_str {
                    self.complete_value();
                }
                continue;
            }
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
                self.pos = next;
                if n == 0 {
                    self.in_stream_str = false;
                    self.complete_value();
                } else {
                    self.skip = n + 2;
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
                    if buf.len() >= end {
                        // Whole (the usual case): no pass through `skip`.
                        self.pos = end;
                        self.complete_value();
                    } else {
                        self.pos = next;
                        self.skip = n + 2;
                    }
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
/// The end of a count line (`*n` or `$n`) starting at `from`, as Redis
/// finds it: the first `\r` (strchr: a NUL before it hides it), with one
/// more byte after it, whatever that byte is (Redis skips two bytes).
fn count_line_end(buf: &[u8], from: usize) -> Option<usize> {
    let i = memchr::memchr2(b'\r', 0, &buf[from..])? + from;
    (buf[i] == b'\r' && i + 1 < buf.len()).then_some(i)
}

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

/// A decimal integer exactly as Redis's `string2ll` accepts it: an
/// optional `-` (no `+`), no leading zeros (`0` alone is fine, `-0` is
/// not), digits only, within `i64`. Used for lengths on the wire (so only
/// what Redis would accept reaches a shared connection) and for integer
/// arguments the sidecar reads itself.
pub fn parse_int(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    if negative {
        // i64::MIN's magnitude is one more than i64::MAX's.
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// One command at `at` of a payload the sidecar sends upstream (well
/// formed: multibulk, or an inline line as a client sent it): its
/// arguments, sliced from `payload`, and the offset where it ends.
pub fn command_at(payload: &Bytes, at: usize) -> Option<(Vec<Bytes>, usize)> {
    let b = payload.get(at..)?;
    if b.first() != Some(&b'*') {
        let nl = memchr::memchr(b'\n', b)?;
        let line = &b[..nl];
        let args = line
            .split(|c| c.is_ascii_whitespace())
            .filter(|a| !a.is_empty())
            .map(|a| {
                let start = at + (a.as_ptr() as usize - b.as_ptr() as usize);
                payload.slice(start..start + a.len())
            })
            .collect();
        return Some((args, at + nl + 1));
    }
    let nl = find_crlf(payload, at + 1)?;
    let n = usize::try_from(parse_int(&payload[at + 1..nl])?).ok()?;
    let mut pos = nl + 2;
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        if payload.get(pos) != Some(&b'$') {
            return None;
        }
        let nl = find_crlf(payload, pos + 1)?;
        let len = usize::try_from(parse_int(&payload[pos + 1..nl])?).ok()?;
        let start = nl + 2;
        if payload.len() < start + len + 2 {
            return None;
        }
        args.push(payload.slice(start..start + len));
        pos = start + len + 2;
    }
    Some((args, pos))
}

/// Split a complete RESP array (or RESP3 push) reply into its element
/// ranges. Returns `None` when `frame` is not a non-null array or is
/// malformed.
pub fn split_array(frame: &Bytes) -> Option<Vec<(usize, usize)>> {
    if !matches!(frame.first(), Some(b'*' | b'>')) {
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

    #[test]
    fn many_empty_arguments_count_what_they_cost() {
        // 1,000 empty arguments are 6 KB on the wire and ~46 KB in memory:
        // refused under a 20 KB limit, accepted under 60 KB.
        let mut req = b"*1001\r\n$6\r\nEXISTS\r\n".to_vec();
        req.extend(b"$0\r\n\r\n".repeat(1000));
        let limits = |max_request| Limits {
            max_request,
            ..Limits::default()
        };
        let e = RequestScanner::new(limits(20_000))
            .next(&mut BytesMut::from(&req[..]))
            .unwrap_err();
        assert_eq!(e, ProtocolError::RequestTooBig);
        let r = RequestScanner::new(limits(60_000))
            .next(&mut BytesMut::from(&req[..]))
            .unwrap()
            .unwrap();
        assert_eq!(r.args.len(), 1001);
    }

    #[test]
    fn a_large_reply_is_handed_on_in_parts() {
        let mut whole = b"*2\r\n$10\r\n0123456789\r\n:7\r\n".to_vec();
        whole.extend_from_slice(b"+next\r\n");
        // Fed a byte at a time, with the scanned part taken at each step:
        // the parts and the tail are the reply, byte for byte.
        let mut s = ReplyScanner::new(1 << 20);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut frames = Vec::new();
        for &b in &whole {
            buf.extend_from_slice(&[b]);
            loop {
                match s.next(&mut buf).unwrap() {
                    Some(f) => {
                        out.extend_from_slice(&f);
                        frames.push(std::mem::take(&mut out));
                    }
                    None => {
                        out.extend_from_slice(&s.take_scanned(&mut buf));
                        break;
                    }
                }
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(&frames[0][..], &whole[..whole.len() - 7]);
        assert_eq!(&frames[1][..], b"+next\r\n");
        assert_eq!(s.scanned(), 0);
    }

    #[test]
    fn odd_line_ends_are_forwarded_canonical() {
        // Line ends of `\r` and any byte, and any two bytes after a bulk,
        // are accepted (as Redis does) and re-encoded: the bytes forwarded
        // parse one way only, and `head` is where the arguments start.
        let mut s = RequestScanner::new(Limits::default());
        let mut buf = BytesMut::from(&b"*2\rX$3\rYSETab$3\r\nk\nvZZ*1\r\n$4\r\nPING\r\n"[..]);
        let r = s.next(&mut buf).unwrap().unwrap();
        assert_eq!(r.args, vec![Bytes::from("SET"), Bytes::from("k\nv")]);
        assert_eq!(r.raw, encode_command(&["SET", "k\nv"]));
        assert_eq!(r.head, 4);
        let r = s.next(&mut buf).unwrap().unwrap();
        assert_eq!(&r.raw[..], b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(r.head, 4);
        assert_eq!(header_len(9), 4);
        assert_eq!(header_len(10), 5);
        assert_eq!(header_len(1000), 7);
    }

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
    fn integers_as_redis_string2ll_takes_them() {
        for (s, want) in [
            ("0", Some(0)),
            ("42", Some(42)),
            ("-1", Some(-1)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("04", None),
            ("+4", None),
            ("-0", None),
            ("-", None),
            ("", None),
            (" 4", None),
            ("4 ", None),
            ("1e3", None),
        ] {
            assert_eq!(parse_int(s.as_bytes()), want, "{s:?}");
        }
        assert_eq!(
            &ProtocolError::ExpectedBulk(b'\r').to_reply()[..],
            b"-ERR Protocol error: expected '$', got ' '\r\n"
        );
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
            max_request: 4 + 2 * (17 + ARG_COST) + 10,
        };
        let mut s = RequestScanner::new(limits);
        // The whole request's declared size: 4 + (5+10+2 + ARG_COST)*2
        // fits, a third bulk does not, refused from its header.
        let mut r = RequestScanner::new(limits);
        let e = r
            .next(&mut BytesMut::from(
                &b"*3\r\n$10\r\n0123456789\r\n$10\r\n0123456789\r\n$10\r\n"[..],
            ))
            .unwrap_err();
        assert_eq!(e, ProtocolError::RequestTooBig);
        assert_eq!(e.client_reply(), None);
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
        assert_eq!(e, ProtocolError::ExpectedBulk(b':'));
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
