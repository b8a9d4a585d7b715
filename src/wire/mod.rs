//! RESP on the wire: the resumable scanners ([`scan`]) used on the hot path,
//! and the replies the sidecar builds itself ([`Value`]), encoded with
//! redis-protocol for RESP2 or RESP3.

pub mod error;
pub mod resp;
pub mod scan;

pub use error::error_text;

use bytes::{Bytes, BytesMut};
use redis_protocol::{resp2, resp3};

pub use scan::{Limits, ProtocolError, ReplyScanner, Request, RequestScanner, encode_command};

/// Protocol version a client negotiated with HELLO (2 unless it asked for 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Resp2,
    Resp3,
}

impl Proto {
    pub fn number(self) -> i64 {
        match self {
            Proto::Resp2 => 2,
            Proto::Resp3 => 3,
        }
    }
}

/// A reply the sidecar synthesises (errors, HELLO, CLIENT ID, ...).
#[derive(Debug, Clone)]
pub enum Value {
    Simple(&'static str),
    Error(String),
    Int(i64),
    Bulk(Bytes),
    /// Text (`CLIENT LIST`): a bulk string in RESP2, a `txt` verbatim
    /// string in RESP3, as Redis sends it.
    Text(String),
    Null,
    Array(Vec<Value>),
    /// A RESP3 push (`>`); an array in RESP2 (pub/sub replies).
    Push(Vec<Value>),
    /// A RESP3 map; a flat array in RESP2. Order is kept.
    Map(Vec<(Value, Value)>),
}

impl Value {
    pub fn error(msg: impl Into<String>) -> Value {
        Value::Error(msg.into())
    }

    pub fn bulk(b: impl Into<Bytes>) -> Value {
        Value::Bulk(b.into())
    }

    /// Encode for a client speaking `proto`.
    pub fn encode(&self, proto: Proto) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        self.encode_into(&mut out, proto);
        out.freeze()
    }

    fn encode_into(&self, out: &mut BytesMut, proto: Proto) {
        // redis-protocol encodes the leaves; aggregates are written here so
        // that map order is kept (its maps are HashMaps).
        let r2 = |out: &mut BytesMut, f: resp2::types::BorrowedFrame| {
            // Encoding into a growable buffer cannot fail for these frames.
            let _ = resp2::encode::extend_encode_borrowed(out, &f, false);
        };
        let r3 = |out: &mut BytesMut, f: resp3::types::BorrowedFrame| {
            let _ = resp3::encode::complete::extend_encode_borrowed(out, &f, false);
        };
        use resp2::types::BorrowedFrame as F2;
        use resp3::types::BorrowedFrame as F3;
        match (self, proto) {
            (Value::Simple(s), Proto::Resp2) => r2(out, F2::SimpleString(s.as_bytes())),
            (Value::Simple(s), Proto::Resp3) => r3(
                out,
                F3::SimpleString {
                    data: s.as_bytes(),
                    attributes: None,
                },
            ),
            (Value::Error(e), _) => {
                // An error line cannot hold CR or LF.
                let clean: String = e
                    .chars()
                    .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
                    .collect();
                match proto {
                    Proto::Resp2 => r2(out, F2::Error(&clean)),
                    Proto::Resp3 => r3(
                        out,
                        F3::SimpleError {
                            data: &clean,
                            attributes: None,
                        },
                    ),
                }
            }
            (Value::Int(i), Proto::Resp2) => r2(out, F2::Integer(*i)),
            (Value::Int(i), Proto::Resp3) => r3(
                out,
                F3::Number {
                    data: *i,
                    attributes: None,
                },
            ),
            (Value::Bulk(b), Proto::Resp2) => r2(out, F2::BulkString(b)),
            (Value::Bulk(b), Proto::Resp3) => r3(
                out,
                F3::BlobString {
                    data: b,
                    attributes: None,
                },
            ),
            (Value::Text(t), Proto::Resp2) => r2(out, F2::BulkString(t.as_bytes())),
            (Value::Text(t), Proto::Resp3) => {
                scan::push_header(out, b'=', t.len() + 4);
                out.extend_from_slice(b"txt:");
                out.extend_from_slice(t.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            (Value::Null, Proto::Resp2) => r2(out, F2::Null),
            (Value::Null, Proto::Resp3) => r3(out, F3::Null),
            (Value::Array(items), _) | (Value::Push(items), Proto::Resp2) => {
                scan::push_header(out, b'*', items.len());
                for i in items {
                    i.encode_into(out, proto);
                }
            }
            (Value::Push(items), Proto::Resp3) => {
                scan::push_header(out, b'>', items.len());
                for i in items {
                    i.encode_into(out, proto);
                }
            }
            (Value::Map(pairs), _) => {
                match proto {
                    Proto::Resp2 => scan::push_header(out, b'*', pairs.len() * 2),
                    Proto::Resp3 => scan::push_header(out, b'%', pairs.len()),
                }
                for (k, v) in pairs {
                    k.encode_into(out, proto);
                    v.encode_into(out, proto);
                }
            }
        }
    }
}

/// True when a raw reply is an error (`-` or RESP3 blob error `!`).
pub fn is_error(reply: &[u8]) -> bool {
    matches!(reply.first(), Some(b'-' | b'!'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keeps_order_and_flattens_in_resp2() {
        let v = Value::Map(vec![
            (Value::bulk("server"), Value::bulk("redis")),
            (Value::bulk("proto"), Value::Int(3)),
        ]);
        assert_eq!(
            &v.encode(Proto::Resp3)[..],
            b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n"
        );
        assert_eq!(
            &v.encode(Proto::Resp2)[..],
            b"*4\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n"
        );
        assert_eq!(&Value::Null.encode(Proto::Resp3)[..], b"_\r\n");
        assert_eq!(
            &Value::error("ERR a\r\nb").encode(Proto::Resp2)[..],
            b"-ERR a  b\r\n"
        );
    }
}
