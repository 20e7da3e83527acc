//! A persistent session's messages that outrun its connection's queue wait in the session's
//! store queue and are read back from there, in order, as room frees up.
//!
//! Every copy for a persistent session is in its store queue before it reaches the connection
//! (the shard queues it, then delivers it with its queue position), so a copy the connection
//! has no room for need not be dropped: it is left where it already is. From the first such
//! copy on, every later one is left there too — taking a newer one first would break order
//! (MQTT-4.6.0-6) — until a read of the store queue has brought the connection up to date.
//!
//! Found by the fault-injection soak (docs/RELIABILITY.md, finding 23): after a Redis outage a
//! shard's queued-up copies reached a subscriber in one burst larger than its connection's
//! queue; the copies that did not fit stayed in the store until the client's next connection —
//! lost to a client that stayed connected — and, as they filled the store queue, the shard
//! refused newer ones there as `queue_full`.
//!
//! # Invariants
//! - While a backlog exists, no copy with a queue position is taken from a delivery: every one
//!   is in the store at or after `from`, and is taken from there.
//! - Positions below `from` were taken by this connection (or completed before it).

use futures::future::{BoxFuture, FutureExt};
use session_store::{DeliveryState, QueuedMessage};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Connection;

pub(super) struct Backlog {
    /// The oldest queue position this connection has not taken: it and everything after it
    /// is in the store queue, not in the connection's.
    from: u64,
    /// A copy was left in the store while `reading` ran: the read may have missed it.
    left_while_reading: bool,
    /// A read of the store queue, once the connection has room for a good part of it.
    pub(super) reading: Option<BoxFuture<'static, Vec<QueuedMessage>>>,
}

impl<R, W> Connection<R, W>
where
    R: AsyncRead + super::io::Readiness + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// Leaves a delivered copy in the store if a backlog exists (and notes it, should a read
    /// be running that may not see it); says whether it did.
    pub(super) fn left_behind_backlog(&mut self) -> bool {
        match &mut self.backlog {
            Some(b) => {
                b.left_while_reading |= b.reading.is_some();
                true
            }
            None => false,
        }
    }

    /// The connection has no room for the copy at queue position `seq`: it and every later one
    /// wait in the store.
    pub(super) fn leave_in_store(&mut self, seq: u64) {
        if !self.left_behind_backlog() {
            tracing::debug!(from = seq, "queue full: newer messages wait in the session store");
            self.ctx.metrics.store_backlogs.inc();
            self.backlog = Some(Box::new(Backlog { from: seq, left_while_reading: false, reading: None }));
        }
    }

    /// Starts reading the store queue once the connection has room for half of what it holds
    /// (reading for each free slot would read the whole queue per acknowledgement).
    pub(super) fn read_backlog_when_room(&mut self) {
        let room = self.outbound.room();
        let Some(b) = &mut self.backlog else { return };
        if b.reading.is_some() || room == 0 || room * 2 < self.outbound.capacity() {
            return;
        }
        let (store, client_id) = (self.ctx.store.clone(), self.client_id.to_string());
        b.reading = Some(
            async move {
                let mut backoff = mqfleet_ops::outage::Backoff::forever();
                loop {
                    match store.load_queue(&client_id, broker_shard::now_ms()).await {
                        Ok(queue) => return queue,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not read the session's queued messages back from the store; retrying");
                            backoff.pause().await;
                        }
                    }
                }
            }
            .boxed(),
        );
    }

    /// Takes the store queue's copies from the backlog's start on, in order, as far as there
    /// is room; what does not fit starts the backlog again from there.
    pub(super) fn on_backlog_read(&mut self, queue: Vec<QueuedMessage>) {
        let Some(before) = self.backlog.take() else { return };
        let read_to = queue.iter().map(|q| q.seq).filter(|&s| s >= before.from).max().unwrap_or(before.from.saturating_sub(1));
        // Entries below `from` were taken already (their acknowledgement not yet applied);
        // entries sent before were restored in flight at resume.
        let entries: Vec<QueuedMessage> = queue.into_iter().filter(|q| q.seq >= before.from && q.state == DeliveryState::Queued).collect();
        self.restore(entries);
        if self.backlog.is_none() {
            // Live copies up to here were read from the store.
            self.resume_floor = self.resume_floor.max(read_to);
            if before.left_while_reading {
                // Copies left in the store while it was read may have come after what it saw.
                self.backlog = Some(Box::new(Backlog { from: read_to + 1, left_while_reading: false, reading: None }));
            }
        }
        // Out of room again (a new backlog started within what was read): the rest waits, as
        // do the copies left while this read ran, and the next read sees them all.
        self.read_backlog_when_room();
    }
}
