//! Framed MQTT I/O of one connection, in two halves so that reading and writing can be raced
//! in one `select!`.
//!
//! # Cancel safety
//! [`Input::read`] and [`Output::write_some`] keep all state in the struct, so either may be
//! dropped unfinished without losing bytes.

use bytes::{Buf, BytesMut};
use mqfleet_codec::{decode_packet, DecodeError, Packet, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read-buffer size after a large packet, above which the buffer is released once empty.
const READ_CHUNK: usize = 4096;
/// First reservation: an idle device sends only a PINGREQ now and then.
const MIN_CHUNK: usize = 256;
/// Largest reservation: enough for many packets per read on a busy connection.
const MAX_CHUNK: usize = 64 * 1024;

/// The reading half: bytes from the socket, split into packets.
pub struct Input<R> {
    reader: R,
    buf: BytesMut,
    /// How much to reserve when the buffer runs out: doubles when a read fills what was free,
    /// so a busy connection soon reads in large chunks while an idle one stays small.
    chunk: usize,
    /// Largest packet accepted, header included.
    max_packet_size: usize,
    pub bytes: u64,
}

/// The writing half: packets encoded into one buffer, written in as few writes as possible.
pub struct Output<W> {
    writer: W,
    buf: BytesMut,
    /// Written but not flushed: TLS and WebSocket streams buffer until flushed.
    unflushed: bool,
    pub bytes: u64,
}

/// Both halves of a connection.
pub struct Io<R, W> {
    pub input: Input<R>,
    pub output: Output<W>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Io<R, W> {
    pub fn new(reader: R, writer: W, max_packet_size: usize) -> Io<R, W> {
        Io {
            input: Input { reader, buf: BytesMut::new(), chunk: MIN_CHUNK, max_packet_size, bytes: 0 },
            output: Output { writer, buf: BytesMut::new(), unflushed: false, bytes: 0 },
        }
    }
}

/// Waits until a read would find bytes, without a buffer to read into: so an idle connection
/// holds none while it waits. Streams that cannot tell (TLS, WebSocket) say ready at once.
pub trait Readiness {
    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>>;
}

impl Readiness for tokio::net::tcp::OwnedReadHalf {
    /// Peeks one byte: readiness alone can be stale (tokio starts a socket as readable), and
    /// the peek clears it when nothing is there. One extra system call per read that starts
    /// with an empty buffer, which busy connections (they keep theirs) do not pay.
    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        AsRef::<tokio::net::TcpStream>::as_ref(self).poll_peek(cx, &mut buf).map_ok(|_| ())
    }
}

impl Readiness for crate::websocket::Reader {
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
impl<T> Readiness for tokio::io::ReadHalf<T> {
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl<R: AsyncRead + Readiness + Unpin> Input<R> {
    /// Reads what the socket has. `Ok(0)` is end of stream.
    pub async fn read(&mut self) -> std::io::Result<usize> {
        // Only a quiet connection (its reads never filled the buffer) waits buffer-less: a busy
        // one would pay a peek per read for memory it needs again at once.
        if self.buf.capacity() == 0 && self.chunk == MIN_CHUNK {
            std::future::poll_fn(|cx| self.reader.poll_ready(cx)).await?;
        }
        if self.buf.capacity() - self.buf.len() < 64 {
            self.buf.reserve(self.chunk);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let n = self.reader.read_buf(&mut self.buf).await?;
        if n == spare {
            self.chunk = (self.chunk * 2).min(MAX_CHUNK);
        }
        self.bytes += n as u64;
        Ok(n)
    }

    /// The next complete packet in the read buffer, if any.
    pub fn next_packet(&mut self, protocol: Protocol) -> Result<Option<Packet>, DecodeError> {
        let p = decode_packet(&mut self.buf, protocol, self.max_packet_size)?;
        if self.buf.is_empty() && (self.buf.capacity() <= READ_CHUNK || self.buf.capacity() > 4 * READ_CHUNK) {
            // Nothing buffered: an idle connection holds no read buffer between its packets
            // ([`Input::read`] waits for bytes before it takes one; an allocation per read costs
            // far less than the read itself), and a large packet's memory goes back. A busy
            // connection's mid-sized buffer is kept.
            self.buf = BytesMut::new();
        }
        Ok(p)
    }

    /// The protocol level byte of a CONNECT at the start of the read buffer, if it got that
    /// far (used to answer a malformed CONNECT in the client's own version).
    pub fn peek_connect_level(&self) -> Option<u8> {
        let buf = &self.buf[..];
        let mut i = 1;
        while i < buf.len() && i < 5 && buf[i] & 0x80 != 0 {
            i += 1;
        }
        let name_len_at = i + 1;
        let name_len = usize::from(u16::from_be_bytes([*buf.get(name_len_at)?, *buf.get(name_len_at + 1)?]));
        buf.get(name_len_at + 2 + name_len).copied()
    }
}

impl<W: AsyncWrite + Unpin> Output<W> {
    /// Encodes `packet` into the write buffer.
    pub fn queue(&mut self, packet: &Packet, protocol: Protocol) {
        if let Err(e) = packet.encode(protocol, &mut self.buf) {
            // Fields come from validated input; an unencodable packet is our bug, not the peer's.
            tracing::error!(error = %e, packet = %packet.packet_type(), "cannot encode packet; not sent");
        }
    }

    /// Bytes waiting to be written.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Whether [`Output::write_some`] has work: bytes to write or a flush to do.
    pub fn has_work(&self) -> bool {
        !self.buf.is_empty() || self.unflushed
    }

    /// One write of the buffered bytes, or the flush after the last write.
    pub async fn write_some(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            self.writer.flush().await?;
            self.unflushed = false;
            return Ok(());
        }
        let n = self.writer.write(&self.buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        self.buf.advance(n);
        self.unflushed = true;
        self.bytes += n as u64;
        if self.buf.is_empty() && (self.buf.capacity() <= READ_CHUNK || self.buf.capacity() > 16 * READ_CHUNK) {
            // All written: an idle connection holds no write buffer, nor does one after a burst.
            self.buf = BytesMut::new();
        }
        Ok(())
    }

    /// Writes everything buffered and flushes.
    pub async fn flush_all(&mut self) -> std::io::Result<()> {
        while self.has_work() {
            self.write_some().await?;
        }
        Ok(())
    }

    pub async fn shutdown(&mut self) {
        let _ = self.writer.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqfleet_codec::Packet;

    /// An idle connection holds no buffer between packets: every connection of a fleet would
    /// otherwise keep one (docs/BENCHMARKS.md, memory per idle connection).
    #[tokio::test]
    async fn an_idle_connection_keeps_no_buffers_between_packets() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(ours);
        let mut io = Io::new(r, w, 1024);
        let mut ping = BytesMut::new();
        Packet::PingReq.encode(Protocol::V3_1_1, &mut ping).unwrap();
        theirs.write_all(&ping).await.unwrap();
        io.input.read().await.unwrap();
        assert!(matches!(io.input.next_packet(Protocol::V3_1_1).unwrap(), Some(Packet::PingReq)));
        assert_eq!(io.input.buf.capacity(), 0, "read buffer released");
        io.output.queue(&Packet::PingResp, Protocol::V3_1_1);
        io.output.flush_all().await.unwrap();
        assert_eq!(io.output.buf.capacity(), 0, "write buffer released");
        let mut got = [0u8; 2];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0xD0, 0x00], "PINGRESP written");
    }

    /// Waiting for its next packet, an idle TCP connection holds no read buffer either: the
    /// buffer is taken once the socket has bytes.
    #[tokio::test]
    async fn waiting_for_bytes_takes_no_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (r, w) = server.into_split();
        let mut io = Io::new(r, w, 1024);
        {
            let read = io.input.read();
            tokio::pin!(read);
            assert!(futures::poll!(read.as_mut()).is_pending(), "nothing sent yet");
        }
        assert_eq!(io.input.buf.capacity(), 0, "no buffer while waiting");
        client.write_all(&[0xC0, 0x00]).await.unwrap(); // PINGREQ
        assert_eq!(io.input.read().await.unwrap(), 2);
        assert!(matches!(io.input.next_packet(Protocol::V3_1_1).unwrap(), Some(Packet::PingReq)));
    }
}
