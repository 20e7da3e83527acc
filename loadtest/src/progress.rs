//! The live progress line (indicatif): connections, rates, latency, errors.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::stats::Stats;

pub struct Progress {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn finish(self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}

pub fn spawn(stats: Arc<Stats>, name: String) -> Progress {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed:>4} {prefix} {msg}").expect("valid template"));
    bar.set_prefix(name);
    bar.enable_steady_tick(Duration::from_millis(120));
    let b = bar.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let last = stats.timeline.lock().last().cloned().unwrap_or_default();
            b.set_message(format!(
                "conn {} | pub {:.0}/s | del {:.0}/s | p99 {:.2} ms | delivered {} | errors {}",
                stats.connected.load(Relaxed),
                last.published_per_s,
                last.delivered_per_s,
                last.p99_ms,
                stats.delivered.load(Relaxed),
                stats.error_count()
            ));
        }
    });
    Progress { bar, task }
}
