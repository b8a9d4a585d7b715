//! The session's own unit tests.

use super::*;

/// Every idle client holds one of these futures: keep it small.
#[tokio::test]
async fn session_future_is_small() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stream = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let settings = crate::upstream::conn::ConnSettings {
        connect_timeout: std::time::Duration::from_secs(1),
        command_timeout: std::time::Duration::from_secs(1),
        queue_timeout: std::time::Duration::from_secs(1),
        max_reply_bulk: 1 << 20,
    };
    let spec = crate::upstream::endpoint::EndpointSpec {
        name: "t".into(),
        target: crate::config::url::Target::parse("redis://127.0.0.1:1").unwrap(),
        tls: None,
        sentinel_auth: None,
    };
    let metrics = crate::metrics::Metrics::new();
    let ups = crate::upstream::failover::Upstreams::start(
        vec![spec],
        Default::default(),
        settings.clone(),
        metrics.clone(),
        tokio_util::sync::CancellationToken::new(),
        Default::default(),
    )
    .unwrap();
    let pool =
        crate::upstream::pool::Pool::new(ups, settings, 1, 1, metrics.clone(), Default::default());
    let limits = super::super::SessionLimits {
        frame: crate::wire::Limits::default(),
        max_inflight: 16,
        max_output: 1 << 20,
        idle_timeout: std::time::Duration::ZERO,
        lane_reply: 64 << 10,
        lane_inflight: 32,
    };
    let policies = crate::policy::Policies::new(
        crate::policy::Builder::default(),
        &crate::config::Config::default(),
        metrics.clone(),
    )
    .unwrap();
    let shared = super::super::Shared::new(pool, policies, metrics, limits, None);
    let addr = stream.local_addr().unwrap();
    let entry = Arc::new(ClientEntry::new(
        1,
        addr,
        addr,
        0,
        crate::upstream::ClientShared::new(1 << 20, 64 << 10),
    ));
    let fut = run(stream, shared, entry);
    let size = std::mem::size_of_val(&fut);
    println!(
        "session future: {size} bytes; Session {}, Mode {}, Dedicated {}",
        std::mem::size_of::<Session>(),
        std::mem::size_of::<Mode>(),
        std::mem::size_of::<Dedicated>()
    );
    // 3024 bytes when written, 2712 with the writer in the session,
    // 1960 with the output queue, 2056 with the session modes, the
    // request record and client auth, 2072 with the cluster's direct
    // path, 2120 with the scanner's framing state (a request re-encoded
    // unless its framing was canonical, and where its header ends),
    // 2136 with the connection state in one struct (RESET's default;
    // its padding no longer shared with the session's flags);
    // 10,000 idle clients x this is most of the idle RSS (README,
    // Performance).
    assert!(size <= 2136, "session future is {size} bytes");
}
