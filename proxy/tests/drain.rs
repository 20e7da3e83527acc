//! Draining a proxy of a cluster (what SIGTERM does, and a Kubernetes rolling update): its
//! clients are sent to another proxy at a bounded rate with DISCONNECT 0x9C and a Server
//! Reference, new CONNECTs are refused the same way, and persistent sessions resume on the
//! other proxy with nothing acknowledged lost — under a live QoS 1 stream. Real redis-server,
//! shard and proxy processes.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqfleet_codec::{Ack, Connect, Packet, PacketId, Protocol, Publish, QoS, ReasonCode, Subscribe, SubscriptionOptions};
use support::{Raw, PATIENCE};
use testkit::local_cluster::{LocalCluster, RedisKind};

const SUBSCRIBERS: usize = 20;
const DRAIN_RATE: u32 = 10;

fn persistent(id: &str) -> Connect {
    let mut c = Connect::new(Protocol::V5, id);
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(300);
    c
}

/// A subscriber: receives on `drain/t`, acknowledges, follows a DISCONNECT 0x9C to the server
/// it names, and resumes its session there. Returns what it received, where it was sent, and
/// when it was told to move.
async fn subscriber(id: String, first: SocketAddr, done: Arc<AtomicBool>) -> (BTreeSet<u32>, Option<String>, Option<tokio::time::Instant>) {
    let (mut c, ack) = Raw::session(first, persistent(&id)).await;
    assert_eq!(ack.reason, ReasonCode::Success);
    let opts = SubscriptionOptions { qos: QoS::AtLeastOnce, ..SubscriptionOptions::default() };
    c.send(Packet::Subscribe(Subscribe::new(PacketId::new(1).unwrap(), vec![("drain/t".into(), opts)]))).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    let (mut got, mut reference, mut moved_at) = (BTreeSet::new(), None, None);
    loop {
        match c.recv_within(Duration::from_millis(500)).await {
            Ok(Some(Packet::Publish(p))) => {
                got.insert(u32::from_be_bytes(p.payload[..4].try_into().unwrap()));
                if let Some(pkid) = p.pkid {
                    c.send(Packet::PubAck(Ack::new(pkid))).await;
                }
            }
            Ok(Some(Packet::Disconnect(d))) => {
                assert_eq!(d.reason, ReasonCode::UseAnotherServer, "{id}: drained with 0x9C");
                let to = d.properties.server_reference.as_ref().map(|r| r.to_string()).expect("a Server Reference");
                moved_at = Some(tokio::time::Instant::now());
                let (next, ack) = Raw::session(to.parse().unwrap(), persistent(&id)).await;
                assert_eq!(ack.reason, ReasonCode::Success);
                assert!(ack.session_present, "{id}: the session followed it");
                reference = Some(to);
                c = next;
            }
            Ok(Some(other)) => panic!("{id}: unexpected {other:?}"),
            Ok(None) => panic!("{id}: closed without DISCONNECT 0x9C"),
            Err(()) if done.load(Ordering::SeqCst) => return (got, reference, moved_at),
            Err(()) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_proxy_moves_its_clients_gradually_and_loses_nothing_acknowledged() {
    let mut cluster = tokio::task::spawn_blocking(|| {
        let mut c = LocalCluster::start(RedisKind::Standalone, 1, 1);
        let other = c.proxy(0).to_string();
        c.add_proxy(&["--server-reference", &other, "--drain-rate", &DRAIN_RATE.to_string(), "--shutdown-grace-ms", "20000"]);
        c
    })
    .await
    .unwrap();
    let (stay, drained) = (cluster.proxy(0), cluster.proxy(1));
    let done = Arc::new(AtomicBool::new(false));
    let subs: Vec<_> = (0..SUBSCRIBERS).map(|i| tokio::spawn(subscriber(format!("sub-{i}"), drained, done.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A QoS 1 stream through the proxy that stays, for the whole drain.
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let publishing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (acked, publishing) = (acked.clone(), publishing.clone());
        tokio::spawn(async move {
            let mut p = Raw::v5(stay, "publisher").await;
            let mut n: u32 = 0;
            while publishing.load(Ordering::SeqCst) {
                n += 1;
                let id = PacketId::new((n % 60_000 + 1) as u16);
                p.send(Packet::Publish(Publish::new("drain/t", QoS::AtLeastOnce, n.to_be_bytes().to_vec(), id))).await;
                match p.recv().await {
                    Some(Packet::PubAck(a)) if a.reason == ReasonCode::Success => {
                        acked.lock().unwrap().insert(n);
                    }
                    other => panic!("publisher: {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // SIGTERM the proxy the subscribers are on; meanwhile it refuses newcomers with 0x9C.
    let terminated = tokio::task::spawn_blocking(move || {
        let status = cluster.proxies[1].service.terminate();
        (cluster, status)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_late, ack) = Raw::session(drained, Connect::new(Protocol::V5, "latecomer")).await;
    assert_eq!(ack.reason, ReasonCode::UseAnotherServer);
    assert_eq!(ack.properties.server_reference.as_deref(), Some(stay.to_string().as_str()));
    let (cluster, status) = terminated.await.unwrap();
    assert!(status.is_some_and(|s| s.success()), "the drained proxy exits 0: {}", cluster.logs());

    tokio::time::sleep(Duration::from_millis(500)).await;
    publishing.store(false, Ordering::SeqCst);
    publisher.await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    done.store(true, Ordering::SeqCst);
    let acked = acked.lock().unwrap().clone();
    let mut moves = Vec::new();
    for s in subs {
        let (got, reference, moved_at) = tokio::time::timeout(PATIENCE * 3, s).await.unwrap().unwrap();
        assert_eq!(reference.as_deref(), Some(stay.to_string().as_str()));
        let lost: Vec<_> = acked.difference(&got).collect();
        assert!(lost.is_empty(), "acknowledged messages lost across the drain: {lost:?}");
        moves.push(moved_at.unwrap());
    }
    // Paced, not all at once: 20 clients at 10 per second take almost two seconds.
    moves.sort();
    let spread = *moves.last().unwrap() - moves[0];
    assert!(spread >= Duration::from_millis(1500), "{SUBSCRIBERS} clients moved within {spread:?}");
    assert!(!acked.is_empty());
}
