//! Publishing a message as the system (no client id: No Local never suppresses it).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use base64::Engine;
use broker_shard::link::Request;
use broker_shard::{now_ms, Message};
use mqfleet_codec::topic::validate_topic_name;
use mqfleet_codec::utf8::{check_chars, Strictness};
use mqfleet_codec::{ByteString, Publish, QoS};
use mqfleet_ops::admin::ApiError;
use serde::{Deserialize, Serialize};

use super::ANSWER_WITHIN;
use crate::Context;

/// Every field but `topic` may be absent or null (docs/openapi/proxy.yaml).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PublishRequest {
    topic: String,
    /// The payload, as text or (with `payload_encoding = base64`) base64.
    payload: Option<String>,
    payload_encoding: Option<Encoding>,
    qos: Option<u8>,
    retain: Option<bool>,
    content_type: Option<String>,
    response_topic: Option<String>,
    /// Base64.
    correlation_data: Option<String>,
    message_expiry_interval: Option<u32>,
    /// Marks the payload as UTF-8 (checked).
    payload_format_utf8: Option<bool>,
    user_properties: Option<Vec<(String, String)>>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Encoding {
    #[default]
    Utf8,
    Base64,
}

#[derive(Debug, Serialize)]
pub(super) struct Published {
    topic: String,
    qos: u8,
    /// QoS 1/2: the owning shard made it durable before this answer. QoS 0: handed to it.
    durable: bool,
}

/// A string field as MQTT allows it (no U+0000, at most 65535 bytes; identifiers and topics
/// also without control characters), so that no subscriber receives a packet it must reject.
fn mqtt_string(field: &str, s: &str, strictness: Strictness) -> Result<(), ApiError> {
    check_chars(s, strictness).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))?;
    if s.len() > usize::from(u16::MAX) {
        return Err(ApiError::bad_request(format!("{field}: {} bytes exceed the MQTT maximum of 65535", s.len())));
    }
    Ok(())
}

fn base64(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    base64::engine::general_purpose::STANDARD.decode(text).map_err(|e| ApiError::bad_request(format!("{field}: not base64: {e}")))
}

/// Checks the request as the broker checks a client's PUBLISH, then routes it to the shard
/// owning the topic.
pub(super) async fn publish(
    State(ctx): State<Arc<Context>>,
    body: Result<Json<PublishRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Published>, ApiError> {
    let Json(r) = body?;
    mqtt_string("topic", &r.topic, Strictness::Identifier)?;
    validate_topic_name(&r.topic, &ctx.limits.topic).map_err(|e| ApiError::bad_request(format!("topic: {e}")))?;
    let qos_level = r.qos.unwrap_or(0);
    let qos = QoS::from_u8(qos_level).ok_or_else(|| ApiError::bad_request(format!("qos: {qos_level} is not 0, 1 or 2")))?;
    let text = r.payload.unwrap_or_default();
    let payload = match r.payload_encoding.unwrap_or_default() {
        Encoding::Utf8 => text.into_bytes(),
        Encoding::Base64 => base64("payload", &text)?,
    };
    let utf8 = r.payload_format_utf8.unwrap_or(false);
    let user_properties = r.user_properties.unwrap_or_default();
    if payload.len() > ctx.limits.max_packet_size as usize {
        return Err(ApiError::bad_request(format!(
            "payload: {} bytes exceed max_packet_size ({})",
            payload.len(),
            ctx.limits.max_packet_size
        )));
    }
    if utf8 && std::str::from_utf8(&payload).is_err() {
        return Err(ApiError::bad_request("payload: payload_format_utf8 is set but the payload is not UTF-8"));
    }
    if let Some(t) = &r.response_topic {
        mqtt_string("response_topic", t, Strictness::Identifier)?;
        validate_topic_name(t, &ctx.limits.topic).map_err(|e| ApiError::bad_request(format!("response_topic: {e}")))?;
    }
    if let Some(c) = &r.content_type {
        mqtt_string("content_type", c, Strictness::Text)?;
    }
    for (k, v) in &user_properties {
        mqtt_string("user_properties", k, Strictness::Text)?;
        mqtt_string("user_properties", v, Strictness::Text)?;
    }
    let mut p = Publish::new(r.topic.as_str(), qos, payload, None);
    p.retain = r.retain.unwrap_or(false);
    let props = &mut p.properties;
    props.content_type = r.content_type.map(ByteString::from);
    props.response_topic = r.response_topic.map(ByteString::from);
    props.correlation_data = r.correlation_data.as_deref().map(|c| base64("correlation_data", c)).transpose()?.map(Into::into);
    props.message_expiry_interval = r.message_expiry_interval;
    props.payload_format_indicator = utf8.then_some(true);
    props.user_properties = user_properties.into_iter().map(|(k, v)| (ByteString::from(k), ByteString::from(v))).collect();

    let message = Arc::new(Message::from_publish(p, None, now_ms()));
    let unavailable =
        |e: broker_shard::link::LinkError| ApiError::unavailable(format!("the shard owning the topic did not take the message: {e}"));
    // Held until the request is on its link, as for a client's PUBLISH: a ring switch waits.
    let gate = ctx.shards.publish_gate().await;
    let link = ctx.shards.now().owner(&message.topic).clone();
    if qos == QoS::AtMostOnce {
        link.send(Request::Publish { id: None, message, marker: None }).await.map_err(unavailable)?;
    } else {
        let reply = link.start(|id| Request::Publish { id: Some(id), message, marker: None }).await.map_err(unavailable)?;
        drop(gate);
        tokio::time::timeout(ANSWER_WITHIN, reply)
            .await
            .map_err(|_| ApiError::unavailable("the shard owning the topic did not answer in time; the message may still be delivered"))?
            .map_err(unavailable)?;
    }
    tracing::info!(topic = %r.topic, qos = qos_level, "message published by an operator");
    Ok(Json(Published { topic: r.topic, qos: qos_level, durable: qos != QoS::AtMostOnce }))
}
