//! A whole mqfleet cluster on loopback: Redis (standalone or a 3-master Cluster), shard
//! processes and proxy processes, each on fixed free ports so that a restart comes back where
//! its peers expect it. Timers are shortened (heartbeats 200 ms, death after 1 s) so failures
//! settle quickly.

use std::net::SocketAddr;
use std::time::Duration;

use crate::service::{binary, local, Service};
use crate::{free_port, RedisCluster, RedisSentinel, RedisServer};

/// Which Redis the cluster keeps its sessions in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisKind {
    Standalone,
    /// Three masters, no replicas.
    Cluster,
    /// A master and a replica under three Sentinels.
    Sentinel,
}

pub enum Redis {
    Standalone(RedisServer),
    Cluster(RedisCluster),
    Sentinel(RedisSentinel),
}

impl Redis {
    pub fn start(kind: RedisKind) -> Redis {
        match kind {
            RedisKind::Standalone => Redis::Standalone(RedisServer::start()),
            RedisKind::Cluster => Redis::Cluster(RedisCluster::start()),
            RedisKind::Sentinel => Redis::Sentinel(RedisSentinel::start()),
        }
    }

    /// Standalone or a Cluster whose every server gets `extra` arguments (e.g. persistence).
    pub fn start_with(kind: RedisKind, extra: &[&str]) -> Redis {
        match kind {
            RedisKind::Standalone => Redis::Standalone(RedisServer::start_with(extra)),
            RedisKind::Cluster => Redis::Cluster(RedisCluster::start_with(extra)),
            RedisKind::Sentinel => panic!("a Sentinel deployment takes no extra server arguments here"),
        }
    }

    /// The `redis-server` processes holding data (a Cluster's masters, Sentinel's master and
    /// replica), which [`Redis::kill`] and [`Redis::restart`] number.
    pub fn servers(&self) -> usize {
        match self {
            Redis::Standalone(_) => 1,
            Redis::Cluster(c) => c.nodes.len(),
            Redis::Sentinel(s) => s.servers.len(),
        }
    }

    /// SIGKILL to data server `i`.
    pub fn kill(&mut self, i: usize) {
        match self {
            Redis::Standalone(r) => r.kill(),
            Redis::Cluster(c) => c.nodes[i].kill(),
            Redis::Sentinel(s) => s.servers[i].kill(),
        }
    }

    /// Starts data server `i` again, with the `extra` arguments it started with (standalone and
    /// Cluster: a restarted Sentinel-managed server would need its current role).
    pub fn restart(&mut self, i: usize, extra: &[&str]) {
        match self {
            Redis::Standalone(r) => r.restart(extra),
            Redis::Cluster(c) => c.restart_node(i, extra),
            Redis::Sentinel(_) => panic!("restarting a Sentinel-managed server is not supported here"),
        }
    }

    pub fn url(&self) -> String {
        match self {
            Redis::Standalone(r) => r.url(),
            Redis::Cluster(c) => c.url(),
            Redis::Sentinel(s) => s.url(),
        }
    }

    /// Runs a redis-cli command (following Cluster redirections; on the current master under
    /// Sentinel).
    pub fn cli(&self, args: &[&str]) -> String {
        let (port, cluster) = match self {
            Redis::Standalone(r) => (r.port, false),
            Redis::Cluster(c) => (c.nodes[0].port, true),
            Redis::Sentinel(s) => (s.master_port().unwrap_or(s.servers[0].port), false),
        };
        let mut cmd = std::process::Command::new("redis-cli");
        if cluster {
            cmd.arg("-c");
        }
        let out = cmd.args(["-p", &port.to_string()]).args(args).output().expect("redis-cli is installed");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The ring's members (empty before the first shard joined).
    pub fn ring_members(&self) -> Vec<String> {
        self.cli(&["HGET", "mqf:{m}:ring", "members"]).split(',').filter(|s| !s.is_empty()).map(String::from).collect()
    }
}

pub struct Shard {
    pub service: Service,
    pub link: SocketAddr,
    pub dir: tempfile::TempDir,
}

pub struct Proxy {
    pub service: Service,
    pub mqtt: SocketAddr,
    pub id: String,
}

pub struct LocalCluster {
    pub redis: Redis,
    pub shards: Vec<Shard>,
    pub proxies: Vec<Proxy>,
    /// Proxies find the shards through the ring in Redis (and follow its changes) instead of a
    /// fixed list.
    pub discover: bool,
}

/// Heartbeat of every process in a test cluster.
pub const HEARTBEAT_MS: u64 = 200;
/// Silence after which a proxy counts as dead.
pub const DEAD_AFTER_MS: u64 = 1_000;

impl LocalCluster {
    /// Starts Redis, `shards` shards and `proxies` proxies (proxies know the shards by their
    /// static list of addresses).
    pub fn start(kind: RedisKind, shards: usize, proxies: usize) -> LocalCluster {
        LocalCluster::start_with(kind, shards, proxies, false)
    }

    /// Like [`LocalCluster::start`], with proxies that discover the shards through the ring.
    pub fn start_discovering(kind: RedisKind, shards: usize, proxies: usize) -> LocalCluster {
        LocalCluster::start_with(kind, shards, proxies, true)
    }

    fn start_with(kind: RedisKind, shards: usize, proxies: usize, discover: bool) -> LocalCluster {
        let redis = Redis::start(kind);
        let mut c = LocalCluster { redis, shards: Vec::new(), proxies: Vec::new(), discover };
        for _ in 0..shards {
            c.add_shard();
            if discover {
                c.wait_for_ring(c.shards.len());
            }
        }
        for _ in 0..proxies {
            c.add_proxy(&[]);
        }
        c
    }

    pub fn shard_addrs(&self) -> Vec<String> {
        self.shards.iter().map(|s| s.link.to_string()).collect()
    }

    pub fn add_shard(&mut self) -> usize {
        self.add_shard_with(&[])
    }

    /// A shard named `shard-<i>`; `extra` arguments come last (they win).
    pub fn add_shard_with(&mut self, extra: &[&str]) -> usize {
        let i = self.shards.len();
        let dir = tempfile::tempdir().expect("temp dir");
        let link = local(free_port());
        let args: Vec<String> = [
            "--name",
            &format!("shard-{i}"),
            "--link",
            &link.to_string(),
            "--http",
            "127.0.0.1:0",
            "--store",
            &self.redis.url(),
            "--data-dir",
            &dir.path().display().to_string(),
            "--heartbeat-ms",
            &HEARTBEAT_MS.to_string(),
            "--proxy-dead-after-ms",
            &DEAD_AFTER_MS.to_string(),
            "--resync-wait-ms",
            "3000",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        let service = Service::start(&format!("shard-{i}"), binary("mqfleet-shard"), args, &["link", "HTTP"]);
        self.shards.push(Shard { service, link, dir });
        i
    }

    /// A proxy named `proxy-<i>`; `extra` arguments come last (they win).
    pub fn add_proxy(&mut self, extra: &[&str]) -> usize {
        let i = self.proxies.len();
        let id = format!("proxy-{i}");
        let mqtt = local(free_port());
        let mut args: Vec<String> = [
            "--id",
            &id,
            "--mqtt",
            &mqtt.to_string(),
            "--http",
            "127.0.0.1:0",
            "--store",
            &self.redis.url(),
            "--shards",
            &if self.discover { "discover".to_string() } else { self.shard_addrs().join(",") },
            "--heartbeat-ms",
            &HEARTBEAT_MS.to_string(),
            "--dead-after-ms",
            &DEAD_AFTER_MS.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let service = Service::start(&id, binary("mqfleet-proxy"), args, &["MQTT", "HTTP"]);
        self.proxies.push(Proxy { service, mqtt, id });
        i
    }

    /// Waits until the ring has `n` members.
    pub fn wait_for_ring(&self, n: usize) {
        assert!(
            eventually(Duration::from_secs(30), || self.redis.ring_members().len() == n),
            "the ring did not reach {n} members:\n{}",
            self.logs()
        );
    }

    pub fn proxy(&self, i: usize) -> SocketAddr {
        self.proxies[i].mqtt
    }

    pub fn restart_shard(&mut self, i: usize) {
        self.shards[i].service.restart(&["link", "HTTP"]);
    }

    pub fn restart_proxy(&mut self, i: usize) {
        self.proxies[i].service.restart(&["MQTT", "HTTP"]);
    }

    /// Every process's log, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for s in &self.shards {
            out += &format!("=== {} ===\n{}\n", s.service.name, s.service.log_text());
        }
        for p in &self.proxies {
            out += &format!("=== {} ===\n{}\n", p.service.name, p.service.log_text());
        }
        out
    }
}

/// Waits for `f` to hold, up to `within`.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}
