//! The embedded store against a real redb file in a temporary directory.

use bytes::Bytes;
use session_store::*;

fn record(id: &str) -> SessionRecord {
    SessionRecord {
        client_id: id.into(),
        protocol_level: 5,
        expiry_interval: 60,
        subscriptions: vec![StoredSubscription {
            filter: "a/#".into(),
            qos: 1,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: Some(7),
        }],
        will: None,
        epoch: 1,
        connected: true,
        disconnected_at_ms: 0,
    }
}

fn open(dir: &std::path::Path, max_queue_len: u32) -> Store {
    let mut config = EmbeddedConfig::new(dir);
    config.max_queue_len = max_queue_len;
    Store::Embedded(EmbeddedStore::open(config).unwrap())
}

fn enqueue(msg: &'static [u8], to: &[&str]) -> Op {
    Op::Enqueue {
        message: Bytes::from_static(msg),
        expires_at_ms: None,
        to: to.iter().map(|c| (c.to_string(), Delivery { qos: 1, ..Default::default() })).collect(),
        origin: None,
    }
}

#[tokio::test]
async fn sessions_and_queues_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), 10);
        store.write(vec![Op::PutSession(record("a")), Op::PutSession(record("b"))]).await.unwrap();
        let r = store.write(vec![enqueue(b"m1", &["a", "b"]), enqueue(b"m2", &["a"])]).await.unwrap();
        assert!(matches!(&r[0], OpResult::Enqueued(s) if s.iter().all(|c| c.seq().is_some())));
        store.write(vec![Op::PutRetained { topic: "t".into(), message: Bytes::from_static(b"r"), expires_at_ms: None }]).await.unwrap();
    }
    let store = open(dir.path(), 10);
    assert_eq!(store.load_session("a").await.unwrap(), Some(record("a")));
    let q = store.load_queue("a", 0).await.unwrap();
    assert_eq!(q.iter().map(|m| &m.message[..]).collect::<Vec<_>>(), [&b"m1"[..], b"m2"]);
    assert!(q[0].seq < q[1].seq, "queue positions increase with enqueue order");
    assert_eq!(store.load_queue("b", 0).await.unwrap().len(), 1);
    assert_eq!(store.retained().await.unwrap()[0].topic, "t");
    assert_eq!(store.sessions().await.unwrap().len(), 2);
}

#[tokio::test]
async fn queue_is_bounded_per_session_and_drops_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    store.write(vec![Op::PutSession(record("a")), Op::PutSession(record("b"))]).await.unwrap();
    store.write(vec![enqueue(b"1", &["a"]), enqueue(b"2", &["a"])]).await.unwrap();
    let r = store.write(vec![enqueue(b"3", &["a", "b"])]).await.unwrap();
    assert_eq!(
        r,
        vec![OpResult::Enqueued(vec![
            Queued::Full,
            match &r[0] {
                OpResult::Enqueued(s) => Queued::At(s[1].seq().unwrap()),
                _ => Queued::NoSession,
            }
        ])]
    );
    assert_eq!(store.load_queue("a", 0).await.unwrap().len(), 2);
    // Acknowledging frees a slot.
    let seq = store.load_queue("a", 0).await.unwrap()[0].seq;
    store.write(vec![Op::Ack { client_id: "a".into(), seq }]).await.unwrap();
    let r = store.write(vec![enqueue(b"4", &["a"])]).await.unwrap();
    assert!(matches!(&r[0], OpResult::Enqueued(s) if s[0].seq().is_some()));
}

#[tokio::test]
async fn queue_bound_counts_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), 2);
        store.write(vec![Op::PutSession(record("a")), enqueue(b"1", &["a"]), enqueue(b"2", &["a"])]).await.unwrap();
    }
    let store = open(dir.path(), 2);
    let r = store.write(vec![enqueue(b"3", &["a"])]).await.unwrap();
    assert_eq!(r, vec![OpResult::Enqueued(vec![Queued::Full])]);
}

#[tokio::test]
async fn nothing_is_queued_for_a_session_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10);
    let r = store.write(vec![enqueue(b"1", &["ghost"])]).await.unwrap();
    assert_eq!(r, vec![OpResult::Enqueued(vec![Queued::NoSession])]);
    assert!(!store.may_have_session("ghost"));
}

#[tokio::test]
async fn removing_a_session_removes_its_queue_and_unshared_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10);
    store.write(vec![Op::PutSession(record("a")), Op::PutSession(record("b")), enqueue(b"shared", &["a", "b"])]).await.unwrap();
    assert!(store.may_have_session("a"));
    store.write(vec![Op::RemoveSession { client_id: "a".into(), epoch: None }]).await.unwrap();
    assert!(!store.may_have_session("a"));
    assert_eq!(store.load_session("a").await.unwrap(), None);
    assert!(store.load_queue("a", 0).await.unwrap().is_empty());
    // b still has its copy: the body is reference-counted.
    assert_eq!(&store.load_queue("b", 0).await.unwrap()[0].message[..], b"shared");
    let seq = store.load_queue("b", 0).await.unwrap()[0].seq;
    store.write(vec![Op::Ack { client_id: "b".into(), seq }, Op::Ack { client_id: "b".into(), seq }]).await.unwrap();
    assert!(store.load_queue("b", 0).await.unwrap().is_empty());
}

#[tokio::test]
async fn delivery_state_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10);
    store.write(vec![Op::PutSession(record("a")), enqueue(b"1", &["a"])]).await.unwrap();
    let seq = store.load_queue("a", 0).await.unwrap()[0].seq;
    store.write(vec![Op::SetState { client_id: "a".into(), seq, state: DeliveryState::Sent { pkid: 9 } }]).await.unwrap();
    assert_eq!(store.load_queue("a", 0).await.unwrap()[0].state, DeliveryState::Sent { pkid: 9 });
}

#[tokio::test]
async fn expired_messages_are_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10);
    store.write(vec![Op::PutSession(record("a"))]).await.unwrap();
    store
        .write(vec![Op::Enqueue {
            message: Bytes::from_static(b"old"),
            expires_at_ms: Some(1_000),
            to: vec![("a".into(), Delivery::default())],
            origin: None,
        }])
        .await
        .unwrap();
    assert_eq!(store.load_queue("a", 999).await.unwrap().len(), 1);
    assert!(store.load_queue("a", 1_000).await.unwrap().is_empty());
}

#[tokio::test]
async fn interval_sync_policy_still_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    config.sync = SyncPolicy::Interval(std::time::Duration::from_millis(5));
    let store = Store::Embedded(EmbeddedStore::open(config).unwrap());
    store.write(vec![Op::PutSession(record("a"))]).await.unwrap();
    store.flush().await.unwrap();
    assert!(store.load_session("a").await.unwrap().is_some());
}

#[tokio::test]
async fn a_second_process_cannot_open_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path(), 10);
    let err = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap_err();
    assert!(err.to_string().contains("cannot open the embedded store at"), "{err}");
}

#[cfg(unix)]
#[tokio::test]
async fn store_files_are_private_bad_input_i75() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _store = open(&data, 10);
    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(data.join("mqfleet.redb")).unwrap().permissions().mode() & 0o777, 0o600);
}

#[tokio::test]
async fn inbound_qos2_markers_are_kept_until_cleared_and_removed_with_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10);
    store
        .write(vec![
            Op::PutSession(record("a")),
            Op::MarkInbound { client_id: "a".into(), pkid: 7, by: "s@1".into(), replacing: vec![] },
            Op::MarkInbound { client_id: "a".into(), pkid: 9, by: "s@1".into(), replacing: vec![] },
        ])
        .await
        .unwrap();
    assert_eq!(store.load_inbound("a").await.unwrap(), [7, 9]);
    let again = store.write(vec![Op::MarkInbound { client_id: "a".into(), pkid: 9, by: "s@2".into(), replacing: vec![] }]).await.unwrap();
    assert_eq!(again, [OpResult::Marked(false)], "a marked id says so");
    store.write(vec![Op::ClearInbound { client_id: "a".into(), pkid: 7 }]).await.unwrap();
    assert_eq!(store.load_inbound("a").await.unwrap(), [9]);
    store.write(vec![Op::RemoveSession { client_id: "a".into(), epoch: None }]).await.unwrap();
    assert!(store.load_inbound("a").await.unwrap().is_empty());
}

#[tokio::test]
async fn shard_log_and_subscriptions_are_kept_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let Store::Embedded(e) = open(dir.path(), 10) else { unreachable!() };
        let s = Store::Embedded(e.clone());
        s.write(vec![
            Op::AppendLog { position: 1, entry: Bytes::from_static(b"one") },
            Op::AppendLog { position: 2, entry: Bytes::from_static(b"two") },
            Op::PutSubscription { client_id: "c".into(), filter: "a/+".into(), entry: Bytes::from_static(b"s1") },
            Op::PutSubscription { client_id: "c".into(), filter: "b".into(), entry: Bytes::from_static(b"s2") },
            Op::PutSubscription { client_id: "d".into(), filter: "b".into(), entry: Bytes::from_static(b"s3") },
        ])
        .await
        .unwrap();
        s.write(vec![Op::TrimLog { position: 1 }, Op::RemoveSubscription { client_id: "c".into(), filter: Some("b".into()) }])
            .await
            .unwrap();
    }
    let Store::Embedded(e) = open(dir.path(), 10) else { unreachable!() };
    assert_eq!(e.log().await.unwrap(), vec![(2, Bytes::from_static(b"two"))]);
    let subs: Vec<(String, String)> = e.subscriptions().await.unwrap().into_iter().map(|(c, f, _)| (c, f)).collect();
    assert_eq!(subs, [("c".to_string(), "a/+".to_string()), ("d".to_string(), "b".to_string())]);
    Store::Embedded(e.clone()).write(vec![Op::RemoveSubscription { client_id: "c".into(), filter: None }]).await.unwrap();
    assert_eq!(e.subscriptions().await.unwrap().len(), 1);
}

#[tokio::test]
async fn log_positions_are_never_given_out_twice_even_after_trimming() {
    let dir = tempfile::tempdir().unwrap();
    {
        let Store::Embedded(e) = open(dir.path(), 10) else { unreachable!() };
        assert_eq!(e.log_position().await.unwrap(), 0);
        let s = Store::Embedded(e.clone());
        s.write(vec![Op::AppendLog { position: 7, entry: Bytes::from_static(b"seven") }]).await.unwrap();
        s.write(vec![Op::TrimLog { position: 7 }]).await.unwrap();
    }
    let Store::Embedded(e) = open(dir.path(), 10) else { unreachable!() };
    assert!(e.log().await.unwrap().is_empty());
    assert_eq!(e.log_position().await.unwrap(), 7, "a restarted shard must continue above 7");
}

#[test]
fn sync_policies_parse_with_a_clear_error() {
    use session_store::SyncPolicy;
    use std::time::Duration;
    assert_eq!("batch".parse::<SyncPolicy>(), Ok(SyncPolicy::Batch));
    assert_eq!("per-message".parse::<SyncPolicy>(), Ok(SyncPolicy::Batch));
    assert_eq!("group:2".parse::<SyncPolicy>(), Ok(SyncPolicy::Window(Duration::from_millis(2))));
    assert_eq!("interval:100".parse::<SyncPolicy>(), Ok(SyncPolicy::Interval(Duration::from_millis(100))));
    for bad in ["group:0", "sometimes", "interval:", "group:x"] {
        let e = bad.parse::<SyncPolicy>().unwrap_err();
        assert!(e.contains("is not a sync policy"), "{e}");
    }
}

#[tokio::test]
async fn a_group_commit_window_still_makes_every_write_durable_and_readable() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut config = EmbeddedConfig::new(dir.path());
        config.sync = session_store::SyncPolicy::Window(std::time::Duration::from_millis(5));
        let s = Store::Embedded(EmbeddedStore::open(config).unwrap());
        let writes = (0..20).map(|i| s.write(vec![Op::PutSession(record(&format!("c{i}")))]));
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
    }
    let s = open(dir.path(), 10);
    for i in 0..20 {
        assert!(s.load_session(&format!("c{i}")).await.unwrap().is_some());
    }
}
