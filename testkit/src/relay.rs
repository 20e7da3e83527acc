//! A TCP relay between two components that a test can cut and restore — the link failure a
//! real network produces (connections reset, new ones refused) — or black-hole: connections
//! stay open but nothing passes until it is restored, as when a network drops every packet and
//! TCP keeps retransmitting (both ends see silence, not an error; nothing is lost or reordered
//! once it heals). Black-holing only the replies (upstream to downstream) stands for a request
//! that reached its server while the answer is lost: the client cannot tell whether it did.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct Relay {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

struct State {
    cut: AtomicBool,
    /// Cancelled to reset every open connection.
    connections: Mutex<CancellationToken>,
    /// What is held back now.
    held: watch::Sender<Held>,
}

/// What a black hole holds back, in increasing order: a direction passes while `held` is
/// below its threshold.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Held {
    Nothing,
    Replies,
    Everything,
}

impl Relay {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let state = Arc::new(State {
            cut: AtomicBool::new(false),
            connections: Mutex::new(CancellationToken::new()),
            held: watch::Sender::new(Held::Nothing),
        });
        let stop = CancellationToken::new();
        let (s, st) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    r = listener.accept() => r,
                    () = st.cancelled() => return,
                };
                let Ok((down, _)) = accepted else { continue };
                if s.cut.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let token = s.connections.lock().expect("relay lock").clone();
                tokio::spawn(forward(down, upstream, token, s.held.subscribe()));
            }
        });
        Relay { addr, state, stop }
    }

    /// Resets every connection and refuses new ones until [`Relay::restore`].
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        let mut c = self.state.connections.lock().expect("relay lock");
        c.cancel();
        *c = CancellationToken::new();
    }

    /// Stops every byte in both directions, on open and new connections, until
    /// [`Relay::restore`]; nothing is closed.
    pub fn blackhole(&self) {
        self.state.held.send_replace(Held::Everything);
    }

    /// Stops every byte from upstream to downstream (the replies), until [`Relay::restore`] or
    /// [`Relay::blackhole`]; requests still pass.
    pub fn blackhole_replies(&self) {
        self.state.held.send_replace(Held::Replies);
    }

    /// Ends a cut or a black hole.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        self.state.held.send_replace(Held::Nothing);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
        self.state.connections.lock().expect("relay lock").cancel();
    }
}

async fn forward(down: TcpStream, upstream: SocketAddr, cut: CancellationToken, held: watch::Receiver<Held>) {
    let Ok(up) = TcpStream::connect(upstream).await else { return };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let ((down_r, down_w), (up_r, up_w)) = (down.into_split(), up.into_split());
    tokio::select! {
        _ = pump(down_r, up_w, held.clone(), Held::Everything) => {}
        _ = pump(up_r, down_w, held, Held::Replies) => {}
        // Both sockets close: each side sees its link end mid-stream.
        () = cut.cancelled() => {}
    }
}

/// Copies one direction, holding bytes (not dropping them) while `held` is at `stops` or above.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut held: watch::Receiver<Held>, stops: Held) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        // A black hole: the chunk waits here, and TCP back-pressure stops the sender.
        while *held.borrow_and_update() >= stops {
            if held.changed().await.is_err() {
                return Ok(());
            }
        }
        to.write_all(&buf[..n]).await?;
    }
}
