//! The cluster under test: Redis (standalone or a 3-master Cluster, AOF with `appendfsync
//! always` on every server), shards each behind a relay that
//! can cut or black-hole the links to it, and proxies that find the shards through the ring —
//! real processes from the built binaries, on loopback.
//!
//! Every shard advertises its relay's address, so every link to it (from proxies and from other
//! shards during a hand-over) passes through the relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::free_port;
use testkit::local_cluster::{Redis, RedisKind};
use testkit::relay::Relay;
use testkit::service::Service;

/// Heartbeats of the cluster's processes: short, so that dead processes are noticed quickly.
const HEARTBEAT_MS: &str = "200";
const DEAD_AFTER_MS: &str = "1000";
/// Redis keeps every acknowledged write across its own `kill -9`.
const REDIS_ARGS: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "always"];

pub struct Shard {
    pub name: String,
    pub service: Service,
    pub relay: Relay,
}

pub struct Proxy {
    pub name: String,
    pub service: Service,
    pub mqtt: SocketAddr,
}

pub struct ChaosCluster {
    pub redis: Redis,
    pub shards: Vec<Shard>,
    pub proxies: Vec<Proxy>,
    /// The admin API's bearer token (the observers list clients through it).
    pub token: String,
    _dir: tempfile::TempDir,
}

/// Where `mqfleet-proxy` and `mqfleet-shard` are: `dir`, or next to this program.
pub fn binaries(dir: Option<&Path>) -> Result<PathBuf, String> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)).ok_or("cannot tell where this program is")?,
    };
    for b in ["mqfleet-proxy", "mqfleet-shard"] {
        if !dir.join(b).is_file() {
            return Err(format!("{} is missing: build the workspace (cargo build --bins) or pass --bin-dir", dir.join(b).display()));
        }
    }
    Ok(dir)
}

impl ChaosCluster {
    /// Starts Redis, `shards` shards (waiting until all are in the ring), then `proxies`
    /// proxies. Blocking: run it on a blocking thread inside the runtime (relays are tasks).
    pub fn start(
        bins: &Path,
        redis: RedisKind,
        shards: usize,
        proxies: usize,
        handle: &tokio::runtime::Handle,
    ) -> Result<ChaosCluster, String> {
        which("redis-server")?;
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let token = format!("chaos-{:032x}", rand::random::<u128>());
        let token_file = dir.path().join("admin-token");
        std::fs::write(&token_file, &token).map_err(|e| format!("{}: {e}", token_file.display()))?;
        let token_file = token_file.display().to_string();
        let redis = Redis::start_with(redis, &REDIS_ARGS);
        let mut c = ChaosCluster { redis, shards: Vec::new(), proxies: Vec::new(), token, _dir: dir };
        for i in 0..shards {
            let name = format!("shard-{i}");
            let link = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let relay = handle.block_on(Relay::start(link));
            let data = c._dir.path().join(&name);
            std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
            let args = [
                ("--name", name.clone()),
                ("--link", link.to_string()),
                ("--advertise", relay.addr.to_string()),
                ("--http", "127.0.0.1:0".into()),
                ("--store", c.redis.url()),
                ("--data-dir", data.display().to_string()),
                ("--heartbeat-ms", HEARTBEAT_MS.into()),
                ("--proxy-dead-after-ms", DEAD_AFTER_MS.into()),
                ("--resync-wait-ms", "3000".into()),
                ("--admin-token-file", token_file.clone()),
                ("--fault-slow-disk-file", slow_disk_file(c._dir.path(), &name).display().to_string()),
            ];
            let service = Service::start(&name, bins.join("mqfleet-shard"), flatten(&args), &["link", "HTTP"]);
            c.shards.push(Shard { name, service, relay });
            c.wait_for_ring(i + 1)?;
        }
        for i in 0..proxies {
            let name = format!("proxy-{i}");
            let mqtt = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let args = [
                ("--id", name.clone()),
                ("--mqtt", mqtt.to_string()),
                ("--http", "127.0.0.1:0".into()),
                ("--store", c.redis.url()),
                ("--shards", "discover".into()),
                ("--heartbeat-ms", HEARTBEAT_MS.into()),
                ("--dead-after-ms", DEAD_AFTER_MS.into()),
                ("--admin-token-file", token_file.clone()),
            ];
            let service = Service::start(&name, bins.join("mqfleet-proxy"), flatten(&args), &["MQTT", "HTTP"]);
            c.proxies.push(Proxy { name, service, mqtt });
        }
        Ok(c)
    }

    fn wait_for_ring(&self, n: usize) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let members = self.redis.cli(&["HGET", "mqf:{m}:ring", "members"]);
            if members.split(',').filter(|m| !m.is_empty()).count() == n {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("the ring did not reach {n} shards within a minute (members: {members:?})"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Makes every durable commit of shard `i` wait `ms` (0: a healthy disk again).
    pub fn slow_disk(&self, i: usize, ms: u64) {
        let file = slow_disk_file(self._dir.path(), &self.shards[i].name);
        if let Err(e) = std::fs::write(&file, ms.to_string()) {
            eprintln!("chaos: cannot write {}: {e}", file.display());
        }
    }

    /// Starts Redis server `i` again (after `self.redis.kill(i)`), with its data.
    pub fn restart_redis(&mut self, i: usize) {
        self.redis.restart(i, &REDIS_ARGS);
    }

    /// The HTTP address of each proxy now (it changes when a proxy restarts).
    pub fn proxy_http(&self) -> Vec<(String, Option<SocketAddr>)> {
        self.proxies.iter().map(|p| (p.name.clone(), p.service.addrs.get("HTTP").copied())).collect()
    }

    /// Counters worth reading after a run: dropped copies by reason, fencing and withheld will
    /// copies, by process.
    pub fn counters(&self) -> std::collections::BTreeMap<String, f64> {
        let mut out = std::collections::BTreeMap::new();
        for s in self.services() {
            let Some(text) = s.http_get("/metrics") else { continue };
            const COUNTED: [&str; 2] = ["mqfleet_proxy_fenced_total", "mqfleet_shard_wills_withheld_total"];
            for line in text.lines().filter(|l| l.contains("dropped_messages_total") || COUNTED.iter().any(|c| l.starts_with(c))) {
                if let Some((name, value)) = line.rsplit_once(' ') {
                    if let Ok(v) = value.parse::<f64>() {
                        out.insert(format!("{}: {name}", s.name), v);
                    }
                }
            }
            if let Some(slow) = slow_commits(&text).filter(|_| s.name.starts_with("shard")) {
                out.insert(format!("{}: commits slower than 0.2 s (slow disk)", s.name), slow);
            }
        }
        out
    }

    /// Every process's whole log into `dir/<name>.log`.
    pub fn write_logs(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for s in self.services() {
            let file = dir.join(format!("{}.log", s.name));
            std::fs::write(&file, s.log_text()).map_err(|e| format!("{}: {e}", file.display()))?;
        }
        Ok(())
    }

    fn services(&self) -> impl Iterator<Item = &Service> {
        self.shards.iter().map(|s| &s.service).chain(self.proxies.iter().map(|p| &p.service))
    }

    /// The last lines of every process's log, for a failing run.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for s in self.services() {
            let text = s.log_text();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            out.push_str(&format!("--- {} (last {} lines)\n", s.name, tail.len()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// Commits of a shard's store that took longer than about 0.2 s (its commit histogram): shows
/// that slow-disk faults took effect (since the shard's last start).
fn slow_commits(metrics: &str) -> Option<f64> {
    let value = |l: &str| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok());
    let count = metrics.lines().find(|l| l.starts_with("mqfleet_shard_commit_seconds_count"))?;
    let within = metrics
        .lines()
        .filter_map(|l| {
            let le = l.strip_prefix("mqfleet_shard_commit_seconds_bucket{le=\"")?.split('"').next()?.parse::<f64>().ok()?;
            (le >= 0.2).then_some((le, value(l)?))
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))?;
    Some(value(count)? - within.1)
}

fn slow_disk_file(dir: &Path, shard: &str) -> PathBuf {
    dir.join(format!("{shard}.slow-disk"))
}

fn flatten(args: &[(&str, String)]) -> Vec<String> {
    args.iter().flat_map(|(k, v)| [k.to_string(), v.clone()]).collect()
}

fn which(name: &str) -> Result<(), String> {
    let found = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()));
    if found {
        Ok(())
    } else {
        Err(format!("{name} is not installed (the README's test command installs it)"))
    }
}

/// Sends a signal to a process (pauses: STOP and CONT).
pub fn signal(pid: u32, sig: &str) {
    if pid == 0 {
        return; // no process (never `kill 0`: that is our own process group)
    }
    let _ = std::process::Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status();
}
