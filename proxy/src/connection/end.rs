//! The end of a connection: tell the client, settle the will, save or end the session.

use std::time::Duration;

use broker_shard::link::Request;
use broker_shard::now_ms;
use mqfleet_codec::{QoS, ReasonCode};
use session_store::{DeliveryState, Op};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Connection, End};
use crate::metrics::{Metrics, ReasonLabel};
use crate::session::outbound::Stage;

/// How long a will waits for Redis to say it is this connection's to publish.
const WITHDRAW_PATIENCE: Duration = Duration::from_secs(30);

/// Time to write the last packets to a client that may not be reading.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

impl<R, W> Connection<R, W>
where
    R: AsyncRead + super::io::Readiness + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    pub(super) async fn finish(mut self, end: End) {
        self.ctx.registry.mark_closing(&self.client_id, self.conn);
        self.ctx.metrics.disconnects.get_or_create(&ReasonLabel { reason: end.label() }).inc();
        let told = match &end {
            End::Protocol { reason, detail } => {
                self.ctx.metrics.protocol_errors.get_or_create(&Metrics::code(*reason)).inc();
                tracing::debug!(reason = %reason, detail = %detail, "closing: client broke the protocol");
                Some((*reason, detail.as_str()))
            }
            End::TakenOver => Some((ReasonCode::SessionTakenOver, "another connection took over this client id")),
            End::Shutdown => Some((ReasonCode::ServerShuttingDown, "server shutting down")),
            End::KeepAliveTimeout => {
                tracing::debug!("closing: keep-alive timeout");
                Some((ReasonCode::KeepAliveTimeout, "no packet within 1.5 times the keep-alive"))
            }
            End::Server { reason, detail } => {
                tracing::debug!(reason = %reason, detail = %detail, "closing on the server's decision");
                Some((*reason, detail.as_str()))
            }
            End::Network(e) => {
                tracing::debug!(error = ?e, "connection lost");
                None
            }
            End::Client { .. } => None,
        };
        if let Some((reason, detail)) = told {
            if self.v5() {
                let packet = self.disconnect_packet(reason, detail);
                self.send(packet);
            }
        }
        if !matches!(end, End::Network(_)) {
            let _ = tokio::time::timeout(FINAL_FLUSH, self.io.output.flush_all()).await;
        }
        self.io.output.shutdown().await;
        self.unreport();

        // No more deliveries are taken from here on; a persistent session has them queued in
        // the store. The client id stays claimed until the session is saved, so a reconnect
        // waits for it (as a takeover does) instead of reading a half-saved session.
        self.mailbox.close();

        // [MQTT-3.1.2-8]: the will is published unless the client disconnected normally.
        let will_discarded = matches!(end, End::Client { will: false }) && self.session.will.is_some();
        let will = match end {
            End::Client { will: false } => None,
            _ => self.session.will.take().map(|w| *w),
        };
        if self.session.persistent() {
            self.save_session(will).await;
        } else {
            self.end_session(will).await;
        }
        if self.ctx.cluster.is_some() {
            release(self.ctx.clone(), self.client_id.to_string(), self.session.epoch, will_discarded).await;
        }
        self.ctx.registry.release(&self.client_id, self.conn);
    }

    /// Publishes the will of this connection now. In a cluster it takes the will in Redis
    /// first, as this proxy's intent: if another proxy took this one for dead meanwhile (a
    /// pause, a partition) and settled this connection, that proxy publishes the will and this
    /// one must not; and if this proxy dies before a shard accepted the will, whoever settles it
    /// publishes it — each will once (see `session_store::Op::AcceptWill`).
    async fn publish_will_now(&mut self, will: crate::session::connect::WillSpec) {
        let (ctx, client_id, epoch) = (self.ctx.clone(), self.client_id.clone(), self.session.epoch);
        if let Some(c) = &ctx.cluster {
            // Redis must say whose will it is: publishing without its answer could publish it a
            // second time later (a settlement finding it still owed). A Redis restart takes
            // seconds; only past WITHDRAW_PATIENCE is the will published regardless.
            let stored = crate::lifecycle::stored_will(&will);
            let mut backoff = mqfleet_ops::outage::Backoff::within(WITHDRAW_PATIENCE);
            loop {
                let taken = async {
                    c.redis.owe_wills(&c.id, &client_id).await?;
                    c.redis.withdraw_will(&client_id, epoch, &c.id, &stored).await
                };
                match taken.await {
                    Ok(true) => break,
                    Ok(false) => {
                        tracing::info!("will not published here: this connection was settled (and its will published) by another proxy");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot ask Redis whose will this is yet");
                        if !backoff.pause().await {
                            tracing::warn!(error = %e, "Redis did not answer within {WITHDRAW_PATIENCE:?}; publishing the will anyway");
                            break;
                        }
                    }
                }
            }
        }
        // Its right taken, the will goes out in the background: a shard that is away makes it
        // wait (and retry), not this connection's end — a reconnect of the client waits for
        // that (takeover), and it must not wait for a shard it may not even use.
        let publisher = ctx.clone();
        ctx.tasks.spawn(async move { publisher.publish_will(will, Some((&client_id, epoch))).await });
    }

    /// A persistent session outlives the connection: record where its deliveries stand, keep a
    /// delayed will, and let the shards queue for it.
    async fn save_session(&mut self, will: Option<crate::session::connect::WillSpec>) {
        let expiry = self.session.expiry;
        let mut will_pending = None;
        if let Some(w) = will {
            // Published when the delay elapses or the session ends, whichever is first.
            let delay = w.delay_interval.min(expiry);
            if delay == 0 {
                self.publish_will_now(w).await;
            } else {
                will_pending = Some((w, delay));
            }
        }
        self.session.will = will_pending.as_ref().map(|(w, _)| Box::new(w.clone()));

        let mut ops = std::mem::take(&mut self.store_ops);
        let (inflight, _pending) = self.outbound.drain();
        for (pkid, entry) in inflight {
            // QoS 2 ids were recorded before sending; record QoS 1 ids now so the resend
            // carries DUP and the same id.
            if let (Some(seq), Stage::AwaitPubAck) = (entry.msg.seq, entry.stage) {
                ops.push(Op::SetState { client_id: self.client_id.to_string(), seq, state: DeliveryState::Sent { pkid } });
            }
        }
        ops.push(Op::PutSession(self.record(false)));
        if let Err(e) = self.ctx.store.write(ops).await {
            tracing::error!(error = %e, "could not save the session at disconnect");
        }
        let (client_id, conn) = (self.client_id.clone(), self.conn);
        for link in self.ctx.shards.links_for(self.session.subscriptions.keys()) {
            let _ = link.send(Request::Detach { client_id: client_id.clone(), conn }).await;
        }
        match &self.ctx.cluster {
            None => {
                if let Some((w, delay)) = will_pending {
                    self.ctx.lifecycle.schedule_will(&self.client_id, w, Duration::from_secs(u64::from(delay)), true);
                }
                if expiry != crate::session::connect::NEVER {
                    self.ctx.lifecycle.schedule_expiry(&self.client_id, now_ms() + u64::from(expiry) * 1000);
                }
            }
            // The will is in Redis since CONNECT: schedule it there, where any proxy fires it
            // (and a reconnect cancels it). Expiry is the keys' TTL.
            Some(c) => {
                if let Some((_, delay)) = will_pending {
                    if let Err(e) = c.redis.schedule_will(&self.client_id, now_ms() + u64::from(delay) * 1000).await {
                        tracing::error!(error = %e, "could not schedule the delayed will");
                    }
                }
            }
        }
    }

    /// A session without expiry ends with its connection.
    async fn end_session(&mut self, will: Option<crate::session::connect::WillSpec>) {
        if let Some(w) = will {
            self.publish_will_now(w).await;
        }
        let taken_over = self.ctx.registry.owner(&self.client_id).is_some_and(|c| c != self.conn);
        let had_record = !self.session.expiry_zero_at_connect;
        if had_record && !taken_over && (self.ctx.cluster.is_some() || self.ctx.store.may_have_session(&self.client_id)) {
            // Its expiry was lowered to 0 at DISCONNECT (MQTT 5 §3.14.2.2.2).
            if let Err(e) = self.ctx.end_stored_session(&self.client_id, Some(self.session.epoch)).await {
                tracing::error!(error = %e, "could not remove the ended session");
            }
        }
        let (client_id, conn) = (self.client_id.clone(), self.conn);
        for link in self.ctx.shards.links_for(self.session.subscriptions.keys()) {
            let _ = link.send(Request::Forget { client_id: client_id.clone(), conn: Some(conn) }).await;
        }
        let shards = self.ctx.shards.now();

        // Messages of shared subscriptions this client never acknowledged go to another
        // member (MQTT 5 §4.8.2).
        let (inflight, pending) = self.outbound.drain();
        let unacked = inflight.into_iter().filter(|(_, e)| e.stage != Stage::AwaitPubComp).map(|(_, e)| e.msg).chain(pending);
        for m in unacked {
            if let (Some(share_filter), true) = (m.share_filter, m.delivery.qos != QoS::AtMostOnce) {
                let link = shards.owner(&m.message.topic);
                let request = Request::Redispatch { message: m.message, share_filter, exclude: self.client_id.clone() };
                let _ = link.send(request).await;
            }
        }
    }
}

/// Gives the client id up in Redis (a no-op if a newer connection holds it) and records a
/// discarded will. Tried once here; if Redis does not answer, retried in the background for
/// [`WITHDRAW_PATIENCE`] — a claim left behind would keep the session owned by this proxy, and
/// a discarded will not recorded would be published if this proxy died later. Past that, the
/// session settles when this proxy's heartbeat stops.
async fn release(ctx: std::sync::Arc<crate::Context>, client_id: String, epoch: u64, will_discarded: bool) {
    let Some(c) = &ctx.cluster else { return };
    let Err(e) = c.redis.release(&client_id, &c.id, epoch, will_discarded).await else { return };
    tracing::warn!(error = %e, "could not release the client id yet; retrying in the background");
    tokio::spawn(async move {
        let mut backoff = mqfleet_ops::outage::Backoff::within(WITHDRAW_PATIENCE);
        while backoff.pause().await {
            let Some(c) = &ctx.cluster else { return };
            if c.redis.release(&client_id, &c.id, epoch, will_discarded).await.is_ok() {
                tracing::info!(client_id, "client id released after Redis came back");
                return;
            }
        }
        tracing::warn!(client_id, "could not release the client id; the session settles when this proxy's heartbeat stops");
    });
}
