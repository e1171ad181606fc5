//! Wall-clock time as shoal writes it into Redis: milliseconds since the Unix epoch, comparable
//! between processes and machines (leases, liveness deadlines, status timestamps).

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
