//! Configuration that follows its files while running: TLS certificates (rotated by
//! cert-manager or a Secret update), the password file, the ACL file and the admin token.
//!
//! SIGHUP reloads everything; the TLS files are also watched by modification time every
//! `tls_reload_ms`, because a Kubernetes Secret update swaps files without signalling anyone.
//! A reload that fails keeps what is running and logs the file at fault. Established
//! connections stay: TLS sessions keep their keys, and after an ACL reload each connection
//! drops the subscriptions the new rules refuse (`ConnMsg::AclChanged`).

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::registry::ConnMsg;
use crate::tls::TlsReloader;
use crate::Context;

/// The distinct TLS configurations of the listeners (`mqtts` and `wss` share one).
fn tls_configs(ctx: &Context) -> Vec<Arc<TlsReloader>> {
    let mut all: Vec<Arc<TlsReloader>> = Vec::new();
    for (_, tls) in [&ctx.settings.mqtts, &ctx.settings.wss].into_iter().flatten() {
        if !all.iter().any(|t| Arc::ptr_eq(t, tls)) {
            all.push(tls.clone());
        }
    }
    all
}

/// Reloads everything now; returns what failed (the rest is reloaded).
pub fn reload_all(ctx: &Context) -> Vec<String> {
    let mut problems = Vec::new();
    for tls in tls_configs(ctx) {
        if let Err(e) = tls.reload(false) {
            problems.push(format!("{}: {}", e.key, e.message));
        }
    }
    match ctx.settings.auth.reload() {
        Ok(()) if ctx.settings.auth.has_acl() => {
            for mailbox in ctx.registry.all() {
                let _ = mailbox.send(ConnMsg::AclChanged);
            }
        }
        Ok(()) => {}
        Err(e) => problems.push(e),
    }
    if let Err(e) = ctx.settings.admin_token.as_ref().map_or(Ok(()), |t| t.reload()) {
        problems.push(format!("admin_token_file: {e}"));
    }
    if problems.is_empty() {
        tracing::info!("configuration files reloaded");
    } else {
        tracing::error!(?problems, "reload incomplete; the previous configuration stays for these");
    }
    problems
}

/// How often the ACL in Redis is read again (with `auth_redis`).
const REDIS_ACL_POLL: Duration = Duration::from_secs(5);

/// Re-reads the ACL in Redis and, if it changed, has every connection recheck.
async fn reload_redis_acl(ctx: &Context) {
    match ctx.settings.auth.reload_redis_acl().await {
        Ok(true) => {
            tracing::info!("ACL in Redis changed: reloaded");
            for mailbox in ctx.registry.all() {
                let _ = mailbox.send(ConnMsg::AclChanged);
            }
        }
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "cannot reload the ACL from Redis; the previous rules stay"),
    }
}

/// Reloads on SIGHUP and on TLS file changes until `stop`.
pub async fn watch(ctx: Weak<Context>, every: Option<Duration>, stop: CancellationToken) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; configuration reloads only on TLS file changes");
            None
        }
    };
    let mut poll = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acl_poll = tokio::time::interval(REDIS_ACL_POLL);
    acl_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let redis_acl = ctx.upgrade().is_some_and(|c| c.settings.raw.auth_redis);
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            _ = hup => {
                let Some(ctx) = ctx.upgrade() else { return };
                tracing::info!("SIGHUP: reloading configuration files");
                reload_all(&ctx);
                reload_redis_acl(&ctx).await;
            }
            _ = acl_poll.tick(), if redis_acl => {
                let Some(ctx) = ctx.upgrade() else { return };
                reload_redis_acl(&ctx).await;
            }
            _ = poll.tick(), if every.is_some() => {
                let Some(ctx) = ctx.upgrade() else { return };
                for tls in tls_configs(&ctx) {
                    match tls.reload(true) {
                        Ok(true) => tracing::info!("TLS files changed: certificate reloaded"),
                        Ok(false) => {}
                        Err(e) => tracing::error!(setting = e.key, error = %e.message, "TLS files changed but cannot be used; the previous certificate stays"),
                    }
                }
            }
        }
    }
}
