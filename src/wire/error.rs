//! The error a request meets on its way to an upstream and back: where it
//! came from (the upstream's reach, a limit of the sidecar's own, cluster
//! routing, the upstream's own refusal) and whether the request may have
//! been sent. Decisions are made on the variant, never on the text: only
//! [`UpstreamError::never_sent`] errors may be retried, and only
//! [`UpstreamError::upstream_down`] ones let the cache serve stale data.

use std::sync::Arc;

use bytes::Bytes;

/// The source of an [`UpstreamError::Unreachable`] (an I/O or TLS error).
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The connection broke after the request may have been sent: its fate
    /// is unknown, so it is never resent.
    #[error("upstream connection lost")]
    ConnectionLost,
    /// No reply within the command timeout; the connection was closed.
    #[error("upstream timeout")]
    Timeout,
    /// The upstream could not be reached or used (connect failed or timed
    /// out, the handshake's connection closed, not a primary, a
    /// connection gone before the request was written): never sent.
    #[error(transparent)]
    Unreachable(Box<Unreachable>),
    /// A limit of the sidecar itself was reached: never sent, and the
    /// upstream may be perfectly well.
    #[error("upstream unavailable: {0}")]
    Limit(String),
    /// No node to send it to (a slot-map gap, a cluster without masters,
    /// redirected twice, the active endpoint changed under it): never sent.
    #[error("upstream unavailable: {0}")]
    Routing(String),
    /// Redis is busy in a long script or function and refused a command a
    /// new connection is set up with (its own `-BUSY` text): nothing ran.
    #[error("{0}")]
    Busy(String),
    /// Redis refused the handshake (e.g. WRONGPASS); its own error text.
    #[error("{0}")]
    Refused(String),
    /// The upstream sent bytes that are not RESP.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
}

/// What [`UpstreamError::Unreachable`] holds (boxed: a reply's error
/// stays small, and this one is rare).
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream unavailable: {what}{}", cause_text(.source))]
pub struct Unreachable {
    pub what: String,
    #[source]
    pub source: Option<Cause>,
}

fn cause_text(source: &Option<Cause>) -> String {
    source
        .as_ref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default()
}

impl UpstreamError {
    /// [`UpstreamError::Unreachable`] without an underlying error.
    pub fn unreachable(what: impl Into<String>) -> UpstreamError {
        UpstreamError::Unreachable(Box::new(Unreachable {
            what: what.into(),
            source: None,
        }))
    }

    /// [`UpstreamError::Unreachable`] caused by `source`.
    pub fn unreachable_by(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> UpstreamError {
        UpstreamError::Unreachable(Box::new(Unreachable {
            what: what.into(),
            source: Some(Arc::new(source)),
        }))
    }

    /// The request was certainly not written to the upstream.
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            UpstreamError::Unreachable(_)
                | UpstreamError::Limit(_)
                | UpstreamError::Routing(_)
                | UpstreamError::Busy(_)
        )
    }

    /// The upstream itself failed (unreachable, the connection broke, no
    /// reply in time), as opposed to a limit or a routing gap of the
    /// sidecar's own or an answer of the upstream's.
    pub fn upstream_down(&self) -> bool {
        matches!(
            self,
            UpstreamError::ConnectionLost | UpstreamError::Timeout | UpstreamError::Unreachable(_)
        )
    }

    /// The error reply a client gets.
    pub fn to_reply(&self) -> Bytes {
        match self {
            UpstreamError::Refused(msg) | UpstreamError::Busy(msg) => {
                Bytes::from(format!("-{msg}\r\n"))
            }
            other => Bytes::from(format!("-ERR {other}\r\n")),
        }
    }
}

/// What a connection delivers for one job.
pub type Reply = Result<Bytes, UpstreamError>;

/// The text of an error reply, without its type byte and CRLF.
pub fn error_text(reply: &[u8]) -> String {
    let body = reply.get(1..).unwrap_or_default();
    let body = match reply.first() {
        // Blob error: `!<len>\r\n<text>\r\n`
        Some(b'!') => body.splitn(2, |&b| b == b'\n').nth(1).unwrap_or_default(),
        _ => body,
    };
    String::from_utf8_lossy(body).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts() {
        assert_eq!(error_text(b"-WRONGPASS bad\r\n"), "WRONGPASS bad");
        assert_eq!(error_text(b"!5\r\nERR x\r\n"), "ERR x");
    }

    #[test]
    fn a_cause_is_kept_and_shown() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = UpstreamError::unreachable_by("connect to h:1", io);
        assert_eq!(
            e.to_string(),
            "upstream unavailable: connect to h:1: refused"
        );
        // The I/O error is the cause, one level down (the box is transparent).
        let inner = std::error::Error::source(&e).expect("a cause");
        assert_eq!(inner.to_string(), "refused");
        assert_eq!(std::mem::size_of::<UpstreamError>(), 32);
        assert!(e.never_sent() && e.upstream_down());
        let limit = UpstreamError::Limit("too many".into());
        assert!(limit.never_sent() && !limit.upstream_down());
    }
}
