//! A TCP hop between the sidecar and Redis that injects faults.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a [`FaultHop`] does to the bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Passed on at once.
    Pass = 0,
    /// Held (both directions) until the mode changes.
    Stall = 1,
    /// Replies dripped a few bytes per millisecond.
    Drip = 2,
}

/// A TCP hop in front of a port that can stall, drip replies, or reset
/// every connection it carries (RST), for failure tests on loopback.
pub struct FaultHop {
    pub port: u16,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    resets: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultHop {
    pub async fn start(target: u16) -> FaultHop {
        use std::sync::atomic::{AtomicU8, AtomicU64};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = std::sync::Arc::new(AtomicU8::new(Fault::Pass as u8));
        let resets = std::sync::Arc::new(AtomicU64::new(0));
        let (m, r) = (mode.clone(), resets.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                tokio::spawn(hop(client, server, m.clone(), r.clone()));
            }
        });
        FaultHop {
            port,
            mode,
            resets,
            task,
        }
    }

    pub fn set(&self, f: Fault) {
        self.mode
            .store(f as u8, std::sync::atomic::Ordering::SeqCst);
    }

    /// Reset every connection carried now.
    pub fn reset_all(&self) {
        self.resets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FaultHop {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hop(
    client: TcpStream,
    server: TcpStream,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    resets: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    let born = resets.load(Ordering::SeqCst);
    // A zero linger makes the close an RST (connection reset mid-reply).
    zero_linger(&client);
    zero_linger(&server);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let pump = |mut r: tokio::net::tcp::OwnedReadHalf,
                mut w: tokio::net::tcp::OwnedWriteHalf,
                drip: bool| {
        let (mode, resets) = (mode.clone(), resets.clone());
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = tokio::select! {
                    n = r.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
                    _ = async { loop {
                        if resets.load(Ordering::SeqCst) != born { return; }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } } => return,
                };
                while mode.load(Ordering::SeqCst) == Fault::Stall as u8 {
                    if resets.load(Ordering::SeqCst) != born {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if drip && mode.load(Ordering::SeqCst) == Fault::Drip as u8 {
                    for chunk in buf[..n].chunks(8) {
                        if w.write_all(chunk).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                } else if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = pump(cr, sw, false) => {}
        _ = pump(sr, cw, true) => {}
    }
}

#[allow(deprecated)]
fn zero_linger(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}
