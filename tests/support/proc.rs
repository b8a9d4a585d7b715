//! Process memory, and the lock for tests that measure it.

/// This process's resident memory (KiB), from `/proc/self/status`.
pub fn rss_kib() -> u64 {
    proc_status_kib("VmRSS:")
}

/// A field of `/proc/self/status` in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Tests of one binary that measure time or the process's memory take
/// this: `write()` to run alone, `read()` to run alongside each other but
/// not alongside a `write()` holder.
pub fn serial() -> &'static tokio::sync::RwLock<()> {
    static LOCK: std::sync::OnceLock<tokio::sync::RwLock<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::RwLock::new(()))
}
