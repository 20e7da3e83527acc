//! Limits enforced before work is done: connections per source address, CONNECT rate per
//! source address and per listener, and each client's publish rate in messages and bytes.
//!
//! Connection limits answer the CONNECT (before authentication, the store or the shards are
//! touched) with 0x9F Connection rate exceeded or 0x97 Quota exceeded. Publish rates do not
//! disconnect: a client over its rate is throttled — its socket is not read until its bucket
//! refills — so TCP slows it down and nothing it sent is lost.
//!
//! Buckets are plain token buckets (rate per second, burst); a bucket may go into debt by one
//! packet, and the debt is the wait.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mqfleet_codec::ReasonCode;
use parking_lot::Mutex;
use tokio::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket { rate, burst, tokens: burst, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` if available.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` even into debt; returns how long until the bucket is out of debt.
    pub fn take(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Connection limits of this proxy.
#[derive(Debug)]
pub struct Admission {
    max_per_ip: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// (rate, burst) per source address.
    rate_per_ip: Option<(f64, f64)>,
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
    /// (rate, burst) per listener, and the listeners' buckets.
    listener_rate: Option<(f64, f64)>,
    listeners: Mutex<HashMap<&'static str, TokenBucket>>,
}

/// Counts one connection of an address while alive.
#[derive(Debug)]
pub struct IpSlot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.admission.per_ip.lock();
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A refused connection: the CONNACK reason and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub reason: ReasonCode,
    pub cause: &'static str,
}

/// Buckets of addresses idle this long are forgotten (a full bucket says nothing).
const PRUNE_AT: usize = 65_536;

impl Admission {
    /// `0` disables a limit. Bursts default to one second's worth (at least 1).
    pub fn new(max_per_ip: usize, rate_per_ip: f64, listener_rate: f64) -> Admission {
        let burst = |r: f64| r.max(1.0);
        Admission {
            max_per_ip,
            per_ip: Mutex::new(HashMap::new()),
            rate_per_ip: (rate_per_ip > 0.0).then(|| (rate_per_ip, burst(rate_per_ip))),
            buckets: Mutex::new(HashMap::new()),
            listener_rate: (listener_rate > 0.0).then(|| (listener_rate, burst(listener_rate))),
            listeners: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a connection from `ip` on `listener` or says why not; the slot counts it until
    /// dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, listener: &'static str) -> Result<Option<IpSlot>, Refused> {
        let now = Instant::now();
        if let Some((rate, burst)) = self.rate_per_ip {
            let mut buckets = self.buckets.lock();
            if buckets.len() >= PRUNE_AT {
                buckets.retain(|_, b| !b.is_full(now));
            }
            if !buckets.entry(ip).or_insert_with(|| TokenBucket::new(rate, burst, now)).try_take(1.0, now) {
                return Err(Refused { reason: ReasonCode::ConnectionRateExceeded, cause: "connect_rate_per_ip" });
            }
        }
        if let Some((rate, burst)) = self.listener_rate {
            let mut listeners = self.listeners.lock();
            if !listeners.entry(listener).or_insert_with(|| TokenBucket::new(rate, burst, now)).try_take(1.0, now) {
                return Err(Refused { reason: ReasonCode::ConnectionRateExceeded, cause: "connect_rate" });
            }
        }
        if self.max_per_ip == 0 {
            return Ok(None);
        }
        let mut map = self.per_ip.lock();
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Refused { reason: ReasonCode::QuotaExceeded, cause: "max_connections_per_ip" });
        }
        *n += 1;
        Ok(Some(IpSlot { admission: self.clone(), ip }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_and_debt_is_the_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 2.0, t0);
        assert!(b.try_take(1.0, t0) && b.try_take(1.0, t0));
        assert!(!b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0 + Duration::from_millis(100)));
        assert_eq!(b.take(5.0, t0 + Duration::from_millis(100)), Duration::from_millis(500));
    }

    #[test]
    fn per_address_counts_free_on_drop_and_rates_refuse_with_0x9f() {
        let a = Arc::new(Admission::new(2, 0.0, 0.0));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let s1 = a.admit(ip, "mqtt").unwrap();
        let _s2 = a.admit(ip, "mqtts").unwrap();
        assert_eq!(a.admit(ip, "mqtt").unwrap_err().reason, ReasonCode::QuotaExceeded);
        assert!(a.admit("192.0.2.2".parse().unwrap(), "mqtt").is_ok(), "other addresses are not affected");
        drop(s1);
        assert!(a.admit(ip, "mqtt").is_ok());

        let a = Arc::new(Admission::new(0, 3.0, 0.0));
        for _ in 0..3 {
            a.admit(ip, "mqtt").unwrap();
        }
        assert_eq!(a.admit(ip, "mqtt").unwrap_err(), Refused { reason: ReasonCode::ConnectionRateExceeded, cause: "connect_rate_per_ip" });
        assert!(a.admit("192.0.2.2".parse().unwrap(), "mqtt").is_ok());

        let a = Arc::new(Admission::new(0, 0.0, 2.0));
        a.admit(ip, "mqtt").unwrap();
        a.admit(ip, "mqtt").unwrap();
        assert_eq!(a.admit(ip, "mqtt").unwrap_err().cause, "connect_rate");
        assert!(a.admit(ip, "wss").is_ok(), "each listener has its own rate");
    }
}
