//! Fault injection for the soak: a slow disk. The delay every durable commit waits is read from
//! a file (`fault_slow_disk_file`), so that a test harness can make a running shard's disk slow
//! and fast again without signals or privileges. Off unless that setting names a file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(100);

/// The delay (ms) the store's writer applies, following `file` from now on: its content, a
/// number of milliseconds; missing, empty or not a number means none.
pub fn follow(file: PathBuf) -> Arc<AtomicU64> {
    let delay = Arc::new(AtomicU64::new(0));
    let shared = delay.clone();
    tracing::warn!(file = %file.display(), "fault injection: commits wait as long as this file says (a slow disk); not for production");
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            let ms = tokio::fs::read_to_string(&file).await.ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
            if ms != last {
                tracing::warn!(delay_ms = ms, "fault injection: commit delay changed");
                last = ms;
            }
            shared.store(ms, Ordering::Relaxed);
            // Ends with the runtime; the writer holds its own handle to the value.
            if Arc::strong_count(&shared) == 1 {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    });
    delay
}
