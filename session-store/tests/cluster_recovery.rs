//! A Redis Cluster connection under node kills, with real `redis-server` nodes: after the
//! nodes are back, every slot answers again within a bounded time.
//!
//! Without `redis::cluster` replacing a wedged connection this fails: a few hundred commands
//! in flight while a node is killed leave the `redis` crate's cluster client timing out on
//! every command for good.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use session_store::redis::{Conn, RedisTarget};
use testkit::RedisCluster;

/// Keys spread over the three nodes' slots.
const KEYS: usize = 64;
/// Commands in flight at once, as a busy proxy has.
const IN_FLIGHT: usize = 256;
/// Persistence as production runs it: a restarted node loads its AOF first.
const NODE_ARGS: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "always"];
const TIMEOUT: Duration = Duration::from_secs(2);
/// Service is back this long after the last node returned: the library's own repairs, or
/// a replacement (its commands time out for twice the timeout, then a new connection).
const RECOVERY: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_slot_answers_again_after_node_kills_under_load() {
    let cluster = RedisCluster::start_with(&NODE_ARGS);
    let conn = Conn::connect(&RedisTarget::parse(&cluster.url()).unwrap(), TIMEOUT).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..IN_FLIGHT)
        .map(|t| {
            let (mut conn, stop, answered) = (conn.clone(), stop.clone(), answered.clone());
            tokio::spawn(async move {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    if set(&mut conn, i % KEYS, i).await.is_ok() {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    i += IN_FLIGHT;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(answered.load(Ordering::Relaxed) > 0, "the cluster answered before any fault");

    // Each node killed once for a second (SIGKILL, as a crash), one at a time.
    let cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        for i in 0..3 {
            cluster.nodes[i].kill();
            std::thread::sleep(Duration::from_secs(1));
            cluster.restart_node(i, &NODE_ARGS);
            std::thread::sleep(Duration::from_secs(2));
        }
        cluster
    })
    .await
    .unwrap();

    let deadline = tokio::time::Instant::now() + RECOVERY;
    let mut silent: Vec<usize> = (0..KEYS).collect();
    while !silent.is_empty() && tokio::time::Instant::now() < deadline {
        let answers = futures::future::join_all(silent.iter().map(|&k| {
            let mut conn = conn.clone();
            async move { (k, set(&mut conn, k, 0).await.is_ok()) }
        }))
        .await;
        silent = answers.into_iter().filter(|(_, ok)| !ok).map(|(k, _)| k).collect();
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let slots: Vec<u16> = silent.iter().map(|k| cluster.slot_of(&key(*k))).collect();
    assert!(silent.is_empty(), "{} keys (slots {slots:?}) still unanswered {RECOVERY:?} after the last node returned", silent.len());
}

fn key(k: usize) -> String {
    format!("k{k}")
}

/// Writes one key the three ways the store talks to Redis: a command, a script, a pipeline.
async fn set(conn: &mut Conn, k: usize, v: usize) -> redis::RedisResult<()> {
    let key = key(k);
    match v % 3 {
        0 => redis::cmd("SET").arg(&key).arg(v).query_async(conn).await,
        1 => redis::Script::new("redis.call('SET', KEYS[1], ARGV[1])").key(&key).arg(v).invoke_async(conn).await,
        _ => redis::pipe().cmd("SET").arg(&key).arg(v).ignore().cmd("GET").arg(&key).ignore().query_async(conn).await,
    }
}

/// A slot moved to another node (a resharding, or a slot map the client built while a node was
/// down) answers a transaction with MOVED inside its abort. Found by the soak (finding 23): the
/// `redis` crate does not refresh its slot map for that, so every acknowledgement to that slot
/// failed the same way until the connection was replaced. A command answered MOVED in any form
/// now replaces the connection, whose new slot map routes to the slot's owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_to_a_moved_slot_is_routed_to_its_new_owner() {
    let cluster = RedisCluster::start();
    let mut conn = Conn::connect(&RedisTarget::parse(&cluster.url()).unwrap(), TIMEOUT).await.unwrap();
    let key = "moving";
    let transaction = || redis::pipe().atomic().cmd("SET").arg(key).arg(1).ignore().cmd("DEL").arg(key).ignore().clone();
    let _: () = transaction().query_async(&mut conn).await.expect("the transaction runs before the move");

    let slot = cluster.slot_of(key).to_string();
    let owner = |n: &testkit::RedisServer| n.cli(&["CLUSTER", "MYID"]);
    let holder = cluster
        .nodes
        .iter()
        .position(|n| {
            n.cli(&["CLUSTER", "COUNTKEYSINSLOT", &slot]) == "0"
                && n.cli(&["CLUSTER", "NODES"]).lines().any(|l| l.contains("myself") && slot_in(l, slot.parse().unwrap()))
        })
        .expect("one node owns the slot");
    let target = owner(&cluster.nodes[(holder + 1) % 3]);
    for n in &cluster.nodes {
        n.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &target]);
    }

    let mut last = None;
    for _ in 0..20 {
        match transaction().query_async::<()>(&mut conn).await {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the transaction still fails after its slot moved: {last:?}");
}

/// Whether a `CLUSTER NODES` line's slot ranges include `slot`.
fn slot_in(line: &str, slot: u16) -> bool {
    line.split_whitespace().skip(8).any(|r| match r.split_once('-') {
        Some((a, b)) => a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b),
        None => r.parse::<u16>() == Ok(slot),
    })
}
