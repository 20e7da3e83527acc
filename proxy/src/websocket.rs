//! MQTT over WebSocket (MQTT 5.0 §6, 3.1.1 §6): the HTTP upgrade with the `mqtt` subprotocol,
//! then binary frames read as one byte stream and each write sent as one binary frame — so an
//! MQTT packet may be split across frames, or several may share one, as the specification
//! allows.

use std::pin::Pin;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::io::{CopyToBytes, SinkWriter, StreamReader};

pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// The subprotocol MQTT over WebSocket uses [MQTT-6.0.0-3].
const SUBPROTOCOL: &str = "mqtt";

/// Whether the client offered the `mqtt` subprotocol (the header may list several, comma
/// separated, and may repeat).
fn offers_mqtt(request: &Request) -> bool {
    request
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case(SUBPROTOCOL))
}

/// Answers the upgrade on `stream` and returns the MQTT byte stream. `max_packet_size` bounds a
/// WebSocket message, so a hostile frame length is refused before it is buffered.
// The upgrade callback's signature, with its large error type, is tungstenite's.
#[allow(clippy::result_large_err)]
pub async fn accept<S>(stream: S, max_packet_size: usize) -> Result<(Reader, Writer), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let choose_mqtt = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        if !offers_mqtt(request) {
            let mut refusal = ErrorResponse::new(Some("MQTT over WebSocket needs the \"mqtt\" subprotocol".into()));
            *refusal.status_mut() = StatusCode::BAD_REQUEST;
            return Err(refusal);
        }
        response.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(SUBPROTOCOL));
        Ok(response)
    };
    // A packet may arrive in many frames: the bound is per frame and per message, not per packet,
    // and the MQTT codec still enforces max_packet_size on the byte stream.
    let limit = max_packet_size.saturating_add(16);
    let config = WebSocketConfig::default().max_message_size(Some(limit)).max_frame_size(Some(limit));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, choose_mqtt, Some(config)).await.map_err(|e| e.to_string())?;
    let (sink, frames) = ws.split();
    let reads = frames.filter_map(|m| async move {
        match m {
            Ok(Message::Binary(b)) => Some(Ok::<Bytes, std::io::Error>(b)),
            // [MQTT-6.0.0-1]: MQTT travels in binary frames; anything else ends the connection.
            Ok(Message::Text(_)) => Some(Err(std::io::Error::other("text WebSocket frame; MQTT is sent in binary frames"))),
            Ok(Message::Close(_)) => None,
            Ok(_) => Some(Ok(Bytes::new())),
            Err(e) => Some(Err(std::io::Error::other(e))),
        }
    });
    let writes = sink.sink_map_err(std::io::Error::other).with(|b: Bytes| async move { Ok::<_, std::io::Error>(Message::Binary(b)) });
    Ok((Box::pin(StreamReader::new(Box::pin(reads))), Box::pin(SinkWriter::new(CopyToBytes::new(Box::pin(writes))))))
}
