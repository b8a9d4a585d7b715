//! A raw RESP client for byte-level checks, and waiting on a condition.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redis_sidecar::wire::ReplyScanner;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw RESP client for byte-exact checks.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
    scanner: ReplyScanner,
}

impl Raw {
    pub async fn connect(addr: std::net::SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
            scanner: ReplyScanner::new(1 << 30),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Send a command as a RESP array.
    pub async fn cmd(&mut self, args: &[&[u8]]) {
        let raw = redis_sidecar::wire::encode_command(args);
        self.send(&raw).await;
    }

    /// Next whole reply (panics after 10 s).
    pub async fn read(&mut self) -> Bytes {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(f) = self.scanner.next(&mut self.buf).unwrap() {
                    return f;
                }
                let n = self.stream.read_buf(&mut self.buf).await.unwrap();
                assert!(n > 0, "connection closed while waiting for a reply");
            }
        })
        .await
        .expect("no reply within 10 s")
    }

    /// Send one command and read its reply.
    pub async fn call(&mut self, args: &[&[u8]]) -> Bytes {
        self.cmd(args).await;
        self.read().await
    }

    /// True when the peer closed the connection (after any pending bytes).
    pub async fn closed(&mut self) -> bool {
        let mut tmp = [0u8; 1024];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match self.stream.read(&mut tmp).await {
                        Ok(0) | Err(_) => return true,
                        Ok(_) => continue,
                    }
                }
            })
            .await,
            Ok(true)
        )
    }
}

/// Poll `f` until it returns true (10 s max).
pub async fn eventually<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
