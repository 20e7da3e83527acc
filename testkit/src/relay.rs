//! A TCP relay between two components that a test can cut and restore: the link failure a
//! real network produces (connections reset, new ones refused), on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
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
}

impl Relay {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let state = Arc::new(State { cut: AtomicBool::new(false), connections: Mutex::new(CancellationToken::new()) });
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
                tokio::spawn(forward(down, upstream, token));
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

    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
        self.state.connections.lock().expect("relay lock").cancel();
    }
}

async fn forward(mut down: TcpStream, upstream: SocketAddr, cut: CancellationToken) {
    let Ok(mut up) = TcpStream::connect(upstream).await else { return };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
        // Both sockets close: each side sees its link end mid-stream.
        () = cut.cancelled() => {}
    }
}
