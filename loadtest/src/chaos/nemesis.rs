//! The nemesis: a schedule of faults drawn from the seed before the run starts (so a failing
//! run replays the same faults at the same offsets), played against the cluster, each healed
//! before the next begins.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cluster::{signal, ChaosCluster};

/// What can go wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `kill -9`, then a restart on the same ports and data.
    KillProxy,
    KillShard,
    KillRedis,
    /// SIGSTOP, then SIGCONT: a process that looks alive but is not.
    PauseProxy,
    PauseShard,
    /// Every link to a shard reset, new ones refused.
    CutLinks,
    /// Every link to a shard silent (packets dropped, nothing closed).
    BlackholeLinks,
    /// A shard's disk turns slow: every durable commit waits [`SLOW_COMMIT_MS`] (the shard's
    /// `fault_slow_disk_file`).
    SlowDisk,
}

/// What a commit waits on a slow disk: an fsync on a saturated network volume.
pub const SLOW_COMMIT_MS: u64 = 400;

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::KillProxy,
        Kind::KillShard,
        Kind::KillRedis,
        Kind::PauseProxy,
        Kind::PauseShard,
        Kind::CutLinks,
        Kind::BlackholeLinks,
        Kind::SlowDisk,
    ];

    /// How long the fault lasts, in ms (min, max).
    fn span_ms(self) -> (u64, u64) {
        match self {
            Kind::KillProxy | Kind::KillShard => (500, 3_000),
            Kind::KillRedis => (300, 2_000),
            Kind::PauseProxy | Kind::PauseShard => (1_000, 4_000),
            Kind::CutLinks => (500, 4_000),
            // Past the link's 5 s ping timeout at times: the proxy gives up and relinks.
            Kind::BlackholeLinks => (1_000, 8_000),
            Kind::SlowDisk => (2_000, 8_000),
        }
    }

    fn on_shard(self) -> bool {
        matches!(self, Kind::KillShard | Kind::PauseShard | Kind::CutLinks | Kind::BlackholeLinks | Kind::SlowDisk)
    }
}

/// One planned fault.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    /// Offset from the start of the faults.
    pub at_ms: u64,
    pub kind: Kind,
    /// Index of the proxy, shard or Redis server.
    pub target: usize,
    pub lasts_ms: u64,
}

/// How many of each the nemesis aims at.
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    pub proxies: usize,
    pub shards: usize,
    /// Redis servers holding data (a Cluster's masters).
    pub redis: usize,
}

/// Draws faults of `kinds` for a window of `window`, one every `gap` (min, max) ms.
pub fn plan(seed: u64, kinds: &[Kind], window: Duration, gap_ms: (u64, u64), t: Targets) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut at = rng.random_range(gap_ms.0..=gap_ms.1) / 2;
    if kinds.is_empty() {
        return out;
    }
    loop {
        let kind = kinds[rng.random_range(0..kinds.len())];
        let (lo, hi) = kind.span_ms();
        let lasts_ms = rng.random_range(lo..=hi);
        let target = match kind {
            // One server draws nothing: a standalone run's schedule stays what it was.
            Kind::KillRedis if t.redis > 1 => rng.random_range(0..t.redis),
            Kind::KillRedis => 0,
            k if k.on_shard() => rng.random_range(0..t.shards),
            _ => rng.random_range(0..t.proxies),
        };
        if Duration::from_millis(at + lasts_ms) > window {
            return out;
        }
        out.push(Planned { at_ms: at, kind, target, lasts_ms });
        at += lasts_ms + rng.random_range(gap_ms.0..=gap_ms.1);
    }
}

/// A fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Happened {
    pub kind: Kind,
    pub target: String,
    /// Seconds since the run started.
    pub at_s: f64,
    pub healed_at_s: f64,
}

/// Plays `plan` from `start`, reporting times since `clock` (the run's start, which every
/// observer's record shares); stops early (healing the current fault) when `stop` fires.
pub async fn play(
    cluster: Arc<Mutex<ChaosCluster>>,
    plan: Vec<Planned>,
    start: Instant,
    clock: Instant,
    stop: CancellationToken,
) -> Vec<Happened> {
    let mut timeline = Vec::new();
    for p in plan {
        tokio::select! {
            () = tokio::time::sleep_until(start + Duration::from_millis(p.at_ms)) => {}
            () = stop.cancelled() => break,
        }
        let began = clock.elapsed().as_secs_f64();
        let target = inject(&cluster, &p).await;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(p.lasts_ms)) => {}
            () = stop.cancelled() => {}
        }
        heal(&cluster, &p).await;
        let healed = clock.elapsed().as_secs_f64();
        eprintln!("chaos: {:>7.1} s {:?} {} for {:.1} s", began, p.kind, target, healed - began);
        timeline.push(Happened { kind: p.kind, target, at_s: began, healed_at_s: healed });
        if stop.is_cancelled() {
            break;
        }
    }
    timeline
}

/// Runs `f` on the cluster on a blocking thread (process control waits for logs and exits).
async fn with_cluster<T: Send + 'static>(cluster: &Arc<Mutex<ChaosCluster>>, f: impl FnOnce(&mut ChaosCluster) -> T + Send + 'static) -> T {
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || f(&mut c.lock().expect("cluster lock"))).await.expect("controlling the cluster does not panic")
}

async fn inject(cluster: &Arc<Mutex<ChaosCluster>>, p: &Planned) -> String {
    let (kind, i) = (p.kind, p.target);
    with_cluster(cluster, move |c| match kind {
        Kind::KillProxy => {
            c.proxies[i].service.kill9();
            c.proxies[i].name.clone()
        }
        Kind::KillShard => {
            c.shards[i].service.kill9();
            c.shards[i].name.clone()
        }
        Kind::KillRedis => {
            c.redis.kill(i);
            if c.redis.servers() > 1 {
                format!("redis node {i}")
            } else {
                "redis".into()
            }
        }
        Kind::PauseProxy => {
            signal(c.proxies[i].service.pid(), "STOP");
            c.proxies[i].name.clone()
        }
        Kind::PauseShard => {
            signal(c.shards[i].service.pid(), "STOP");
            c.shards[i].name.clone()
        }
        Kind::CutLinks => {
            c.shards[i].relay.cut();
            format!("links to {}", c.shards[i].name)
        }
        Kind::BlackholeLinks => {
            c.shards[i].relay.blackhole();
            format!("links to {}", c.shards[i].name)
        }
        Kind::SlowDisk => {
            c.slow_disk(i, SLOW_COMMIT_MS);
            format!("disk of {}", c.shards[i].name)
        }
    })
    .await
}

async fn heal(cluster: &Arc<Mutex<ChaosCluster>>, p: &Planned) {
    let (kind, i) = (p.kind, p.target);
    with_cluster(cluster, move |c| match kind {
        Kind::KillProxy => c.proxies[i].service.restart(&["MQTT", "HTTP"]),
        Kind::KillShard => c.shards[i].service.restart(&["link", "HTTP"]),
        Kind::KillRedis => c.restart_redis(i),
        Kind::PauseProxy => signal(c.proxies[i].service.pid(), "CONT"),
        Kind::PauseShard => signal(c.shards[i].service.pid(), "CONT"),
        Kind::CutLinks | Kind::BlackholeLinks => c.shards[i].relay.restore(),
        Kind::SlowDisk => c.slow_disk(i, 0),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGETS: Targets = Targets { proxies: 2, shards: 3, redis: 1 };

    #[test]
    fn a_seed_gives_the_same_faults_and_faults_never_overlap_or_outlast_the_window() {
        let a = plan(7, &Kind::ALL, Duration::from_secs(120), (2_000, 6_000), TARGETS);
        let b = plan(7, &Kind::ALL, Duration::from_secs(120), (2_000, 6_000), TARGETS);
        assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
        assert!(a.len() >= 10, "{} faults", a.len());
        for w in a.windows(2) {
            assert!(w[0].at_ms + w[0].lasts_ms + 2_000 <= w[1].at_ms);
        }
        assert!(a.iter().all(|p| p.at_ms + p.lasts_ms <= 120_000));
        assert!(a.iter().all(|p| if p.kind.on_shard() { p.target < 3 } else { p.target < 2 }));
        let c = plan(8, &Kind::ALL, Duration::from_secs(120), (2_000, 6_000), TARGETS);
        assert_ne!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&c).unwrap());
        let only = plan(7, &[Kind::PauseProxy], Duration::from_secs(120), (2_000, 6_000), TARGETS);
        assert!(!only.is_empty() && only.iter().all(|p| p.kind == Kind::PauseProxy));
    }

    #[test]
    fn redis_kills_aim_at_every_node_of_a_cluster_and_leave_a_standalone_schedule_as_it_was() {
        let standalone = plan(7, &Kind::ALL, Duration::from_secs(600), (2_000, 6_000), TARGETS);
        let cluster = plan(7, &[Kind::KillRedis], Duration::from_secs(600), (2_000, 6_000), Targets { redis: 3, ..TARGETS });
        let mut nodes: Vec<usize> = cluster.iter().map(|p| p.target).collect();
        nodes.sort_unstable();
        nodes.dedup();
        assert_eq!(nodes, [0, 1, 2]);
        assert!(standalone.iter().filter(|p| p.kind == Kind::KillRedis).all(|p| p.target == 0));
    }
}
