//! Memory per idle client connection, in this process: rumqttc (the reference client) against
//! the harness's lean client. One kind per run, so each starts from a clean heap:
//!
//! ```sh
//! cargo run --release -p loadtest --example client_memory -- 127.0.0.1:1883 5000 lean
//! cargo run --release -p loadtest --example client_memory -- 127.0.0.1:1883 5000 rumqttc
//! ```

use std::time::Duration;

use loadtest::client::{Client, ConnectOptions};
use mqfleet_codec::Protocol;

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).unwrap_or(0) * 1024
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target: loadtest::transport::Target = args.get(1).map(|s| s.as_str()).unwrap_or("127.0.0.1:1883").parse().unwrap();
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let kind = args.get(3).map(|s| s.as_str()).unwrap_or("lean").to_string();
    loadtest::raise_fd_limit();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss();
    let mut keep = Vec::new();
    for i in 0..n {
        let id = format!("mem-{kind}-{i}");
        if kind == "rumqttc" {
            let mut o = rumqttc::MqttOptions::new(id, target.host.clone(), target.port);
            o.set_keep_alive(Duration::from_secs(60));
            let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 10);
            let task = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
            keep.push(Box::new((client, task)) as Box<dyn std::any::Any>);
        } else {
            let o = ConnectOptions {
                protocol: Protocol::V3_1_1,
                client_id: id,
                clean_start: true,
                keep_alive: 60,
                session_expiry: None,
                username: None,
                password: None,
                will: None,
                timeout: Duration::from_secs(10),
            };
            let (c, _) = Client::connect(&target, None, None, &o).await.unwrap();
            keep.push(Box::new(c) as Box<dyn std::any::Any>);
        }
    }
    // Let rumqttc's event loops finish connecting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss();
    println!("{kind}: {n} connections, {:.0} bytes per connection in the client process", (after - before) as f64 / n as f64);
    drop(keep);
}
