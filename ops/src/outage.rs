//! Logging a recurring operation's failures once per outage, not once per attempt: a heartbeat
//! that fails every second for a minute is one warning and one recovery line, not sixty.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
pub struct Outage {
    failing: bool,
}

impl Outage {
    /// Records one attempt: warns (with `failed`, which should say what follows for the operator)
    /// on the first failure of an outage, says `recovered` on the first success after one.
    pub fn record<E: Display>(&mut self, result: Result<(), E>, recovered: &str, failed: &str) {
        match result {
            Ok(()) if self.failing => {
                tracing::info!("{recovered}");
                self.failing = false;
            }
            Err(e) if !self.failing => {
                tracing::warn!(error = %e, "{failed}");
                self.failing = true;
            }
            Ok(()) | Err(_) => {}
        }
    }

    pub fn failing(&self) -> bool {
        self.failing
    }
}

/// Runs `attempt` every `every` until `shutdown`, or until `attempt` returns `None` (what it
/// works for is gone), logging outages as [`Outage::record`] does. For heartbeats.
pub async fn repeat<F, Fut, E>(every: Duration, shutdown: CancellationToken, recovered: &str, failed: &str, mut attempt: F)
where
    F: FnMut() -> Option<Fut>,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let mut tick = tokio::time::interval(every);
    let mut outage = Outage::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(once) = attempt() else { return };
        outage.record(once.await, recovered, failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_entered_and_left_once() {
        let mut o = Outage::default();
        o.record(Ok::<(), String>(()), "back", "down");
        assert!(!o.failing());
        o.record(Err("refused"), "back", "down");
        o.record(Err("refused"), "back", "down");
        assert!(o.failing());
        o.record(Ok::<(), &str>(()), "back", "down");
        assert!(!o.failing());
    }
}

/// Retrying one operation through an outage: pauses doubling from 100 ms to 2 s, until a
/// deadline or for as long as it takes.
#[derive(Debug)]
pub struct Backoff {
    /// `None`: never gives up.
    deadline: Option<tokio::time::Instant>,
    pause: Duration,
}

impl Backoff {
    pub fn within(limit: Duration) -> Backoff {
        Backoff { deadline: Some(tokio::time::Instant::now() + limit), pause: Duration::from_millis(100) }
    }

    /// For work that must not give up (what it retries would otherwise be lost).
    pub fn forever() -> Backoff {
        Backoff { deadline: None, pause: Duration::from_millis(100) }
    }

    /// Waits before the next attempt; false (at once) if that would pass the deadline.
    pub async fn pause(&mut self) -> bool {
        if self.deadline.is_some_and(|d| tokio::time::Instant::now() + self.pause >= d) {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(2));
        true
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bounded_backoff_gives_up_before_its_deadline_and_an_unbounded_one_never() {
        let start = tokio::time::Instant::now();
        let mut bounded = Backoff::within(Duration::from_secs(1));
        let mut pauses = 0;
        while bounded.pause().await {
            pauses += 1;
        }
        // 100 + 200 + 400 ms; the next 800 ms would pass the deadline.
        assert_eq!(pauses, 3);
        assert!(start.elapsed() < Duration::from_secs(1));

        let mut unbounded = Backoff::forever();
        for _ in 0..2000 {
            assert!(unbounded.pause().await, "gave up after {:?}", start.elapsed());
        }
        assert!(start.elapsed() > Duration::from_secs(3600));
    }
}
