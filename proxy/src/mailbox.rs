//! A connection's mailbox: any number of senders (the registry, shard-link dispatchers, the
//! cluster and admin tasks), one receiver (the connection's task). Unbounded, so that routing
//! never waits for a device: the connection drains it at once into its own bounded queues.
//!
//! Hand-written instead of `tokio::sync::mpsc::unbounded_channel` for memory: tokio's channel
//! allocates a block of 32 message slots when it is created — about 3 KiB per connection with
//! our message size, a quarter of what an idle connection used to cost (docs/BENCHMARKS.md).
//! Here an empty mailbox holds no buffer; the queue grows when messages come and is given back
//! when a burst is over.
//!
//! # Invariants
//! - Messages are received in the order they were sent (one `VecDeque`, one lock).
//! - No wake-up is lost: `recv` looks at the queue before every wait, and `Notify` keeps a
//!   permit for a `notify_one` that finds nobody waiting. A receive dropped by `select!`
//!   leaves its message in the queue (cancel-safe).

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Queue capacity above which an emptied queue gives its memory back.
const KEEP_CAPACITY: usize = 32;

struct Shared<T> {
    state: Mutex<State<T>>,
    notify: Notify,
}

struct State<T> {
    queue: VecDeque<T>,
    /// The receiver closed the mailbox (or is gone): sends fail.
    closed: bool,
    senders: usize,
}

/// The sending side; clone it freely.
pub struct Sender<T>(Arc<Shared<T>>);

/// The receiving side, owned by the connection.
pub struct Receiver<T>(Arc<Shared<T>>);

/// A new, empty mailbox (allocates only its shared header).
pub fn mailbox<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared { state: Mutex::new(State { queue: VecDeque::new(), closed: false, senders: 1 }), notify: Notify::new() });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    /// Queues `msg`; gives it back if the receiver closed the mailbox.
    pub fn send(&self, msg: T) -> Result<(), T> {
        {
            let mut s = self.0.state.lock();
            if s.closed {
                return Err(msg);
            }
            s.queue.push_back(msg);
        }
        self.0.notify.notify_one();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Sender<T> {
        self.0.state.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let last = {
            let mut s = self.0.state.lock();
            s.senders -= 1;
            s.senders == 0
        };
        if last {
            self.0.notify.notify_one(); // the receiver learns that nothing more can come
        }
    }
}

impl<T> Receiver<T> {
    /// The next message; `None` once the mailbox is empty and either closed or without
    /// senders. Cancel-safe.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            {
                let mut s = self.0.state.lock();
                if let Some(msg) = s.queue.pop_front() {
                    if s.queue.is_empty() && s.queue.capacity() > KEEP_CAPACITY {
                        s.queue = VecDeque::new();
                    }
                    return Some(msg);
                }
                if s.closed || s.senders == 0 {
                    return None;
                }
            }
            self.0.notify.notified().await;
        }
    }

    /// Refuses further messages; those already queued can still be received.
    pub fn close(&mut self) {
        self.0.state.lock().closed = true;
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock();
        s.closed = true;
        s.queue.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_arrive_in_order_and_the_end_is_seen() {
        let (tx, mut rx) = mailbox();
        let tx2 = tx.clone();
        tx.send(1).unwrap();
        tx2.send(2).unwrap();
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
        let waiter = tokio::spawn(async move { (rx.recv().await, rx) });
        tokio::task::yield_now().await;
        tx.send(3).unwrap();
        let (got, mut rx) = waiter.await.unwrap();
        assert_eq!(got, Some(3));
        drop((tx, tx2));
        assert_eq!(rx.recv().await, None, "no senders left");
    }

    #[tokio::test]
    async fn a_closed_mailbox_refuses_new_messages_but_yields_queued_ones() {
        let (tx, mut rx) = mailbox();
        tx.send("queued").unwrap();
        rx.close();
        assert_eq!(tx.send("late"), Err("late"));
        assert_eq!(rx.recv().await, Some("queued"));
        assert_eq!(rx.recv().await, None);
        drop(rx);
        assert!(tx.send("after").is_err(), "a dropped receiver refuses too");
    }

    #[tokio::test]
    async fn a_receive_cancelled_by_select_loses_nothing() {
        let (tx, mut rx) = mailbox();
        for i in 0..50u32 {
            // Nothing queued: the receive waits, loses to the timer and is dropped; the next
            // message still reaches the next receive.
            tokio::select! {
                m = rx.recv() => panic!("nothing was sent: {m:?}"),
                () = tokio::time::sleep(std::time::Duration::from_millis(1)) => {}
            }
            tx.send(i).unwrap();
            assert_eq!(rx.recv().await, Some(i));
        }
    }

    #[test]
    fn a_burst_gives_its_memory_back() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (tx, mut rx) = mailbox();
        for i in 0..1000 {
            tx.send(i).unwrap();
        }
        rt.block_on(async {
            for _ in 0..1000 {
                rx.recv().await.unwrap();
            }
        });
        assert_eq!(rx.0.state.lock().queue.capacity(), 0);
    }
}
