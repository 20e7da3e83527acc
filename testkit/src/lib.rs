//! Real components for tests: `redis-server` processes on free loopback ports, standalone or as
//! a 3-master Redis Cluster. Each starts in its own temporary directory, waits until it answers
//! (with a deadline, and the server's log in the panic if not), and is killed and reaped on drop.
//! [`relay::Relay`] sits on a TCP path and cuts it on demand.

// Waiting for real processes is wall-clock time: a paused tokio clock must not stretch these
// deadlines, so std::time::Instant is the right clock here.
#![allow(clippy::disallowed_types)]

pub mod local_cluster;
pub mod pki;
pub mod relay;
pub mod service;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to come up on a slow machine.
const STARTUP: Duration = Duration::from_secs(20);

/// A free loopback port (free when asked; the server binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli").args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One `redis-server`.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts with extra `--option value` arguments.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = spawn_redis(dir.path(), port, extra);
        let server = RedisServer { child, port, dir };
        server.wait_ready();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + STARTUP;
        while redis_cli(self.port, &["PING"]).as_deref() != Some("PONG") {
            assert!(Instant::now() < deadline, "redis-server on port {} did not answer PING; its log:\n{}", self.port, self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a redis-cli command against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args).unwrap_or_default()
    }

    /// Stops the server abruptly (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self, extra: &[&str]) {
        self.kill();
        self.child = spawn_redis(self.dir.path(), self.port, extra);
        self.wait_ready();
    }
}

fn spawn_redis(dir: &Path, port: u16, extra: &[&str]) -> Child {
    let log: PathBuf = dir.join("redis.log");
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (the README's test command installs it)")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters, no replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

/// What makes a `redis-server` a Cluster node.
const CLUSTER_ARGS: [&str; 6] = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"];

impl RedisCluster {
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(&[])
    }

    /// Every node with extra `--option value` arguments (e.g. persistence).
    pub fn start_with(extra: &[&str]) -> RedisCluster {
        let args: Vec<&str> = CLUSTER_ARGS.iter().chain(extra).copied().collect();
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_with(&args)).collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = Command::new("redis-cli").args(&args).output().expect("redis-cli is installed");
        assert!(out.status.success(), "redis-cli --cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        let deadline = Instant::now() + STARTUP;
        for n in &nodes {
            while !n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster did not reach state ok:\n{}", n.cli(&["CLUSTER", "INFO"]));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        RedisCluster { nodes }
    }

    /// Starts node `i` again (after a kill) with the same `extra` arguments it started with:
    /// same port and directory, so it rejoins with its slots and, if persistent, its data.
    pub fn restart_node(&mut self, i: usize, extra: &[&str]) {
        let args: Vec<&str> = CLUSTER_ARGS.iter().chain(extra).copied().collect();
        self.nodes[i].restart(&args);
    }

    /// `redis+cluster://h1:p1,h2:p2,h3:p3`
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// Which node holds a key (by asking the cluster).
    pub fn slot_of(&self, key: &str) -> u16 {
        self.nodes[0].cli(&["CLUSTER", "KEYSLOT", key]).parse().unwrap_or(0)
    }
}

/// A master, one replica and three Sentinels watching them (quorum 2), as operators run Redis
/// for failover without a Cluster. The master is known to the Sentinels as `mqfleet`.
pub struct RedisSentinel {
    /// Index 0 starts as the master, index 1 as its replica.
    pub servers: Vec<RedisServer>,
    sentinels: Vec<SentinelProcess>,
}

struct SentinelProcess {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const SENTINEL_MASTER: &str = "mqfleet";

impl RedisSentinel {
    pub fn start() -> RedisSentinel {
        let master = RedisServer::start();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
        let deadline = Instant::now() + STARTUP;
        while !replica.cli(&["INFO", "replication"]).contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "the replica did not sync:\n{}", replica.cli(&["INFO", "replication"]));
            std::thread::sleep(Duration::from_millis(50));
        }
        let sentinels: Vec<SentinelProcess> = (0..3).map(|_| spawn_sentinel(master.port)).collect();
        // Ready when every Sentinel has found the replica and the other Sentinels: only then can
        // they agree on a failover.
        for s in &sentinels {
            loop {
                let info = redis_cli(s.port, &["SENTINEL", "master", SENTINEL_MASTER]).unwrap_or_default();
                let field = |name: &str| info.lines().skip_while(|l| *l != name).nth(1).map(str::to_string);
                if field("num-slaves").as_deref() == Some("1") && field("num-other-sentinels").as_deref() == Some("2") {
                    break;
                }
                assert!(Instant::now() < deadline, "Sentinel on {} did not see the replica and its peers:\n{info}", s.port);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        RedisSentinel { servers: vec![master, replica], sentinels }
    }

    /// `redis+sentinel://h1:p1,h2:p2,h3:p3/mqfleet`
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("redis+sentinel://{}/{SENTINEL_MASTER}", nodes.join(","))
    }

    /// The port of the server the Sentinels currently name as master.
    pub fn master_port(&self) -> Option<u16> {
        let reply = redis_cli(self.sentinels[0].port, &["SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER])?;
        reply.lines().nth(1)?.trim().parse().ok()
    }
}

fn spawn_sentinel(master_port: u16) -> SentinelProcess {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {dir}/sentinel.log\n\
             sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
             sentinel failover-timeout {SENTINEL_MASTER} 5000\n",
            dir = dir.path().display()
        ),
    )
    .unwrap();
    let child = Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (the README's test command installs it)");
    let deadline = Instant::now() + STARTUP;
    while redis_cli(port, &["PING"]).as_deref() != Some("PONG") {
        assert!(Instant::now() < deadline, "Sentinel on port {port} did not answer PING");
        std::thread::sleep(Duration::from_millis(50));
    }
    SentinelProcess { child, port, _dir: dir }
}
