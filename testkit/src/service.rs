//! An mqfleet process started by a test: built from this workspace, run on chosen ports, its
//! log captured, and stopped the way the test needs — SIGTERM, `kill -9`, SIGSTOP.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// How long a process may take to report its listeners.
const STARTUP: Duration = Duration::from_secs(30);

/// The path of a binary of this workspace, built (once per test process) in the profile the
/// tests run in: a test of one package can then start another package's binary, never a stale
/// one.
pub fn binary(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("the test knows its path");
    // target/<profile>/deps/<test> → target/<profile>
    let dir = exe.parent().and_then(Path::parent).expect("tests run from target/<profile>/deps").to_path_buf();
    BUILD.call_once(|| {
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(p) => p.to_string(),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--profile", &profile, "-p", "broker-shard", "-p", "proxy", "--bins"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the mqfleet binaries failed");
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A running (or stopped) process.
pub struct Service {
    pub name: String,
    bin: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    /// Bound addresses by listener ("MQTT", "HTTP", "link"), from the log.
    pub addrs: HashMap<String, SocketAddr>,
}

impl Service {
    /// Starts `bin` with `args` and waits until it logged "<what> listener bound" for each of
    /// `listeners` (e.g. "MQTT", "link").
    pub fn start(name: &str, bin: PathBuf, args: Vec<String>, listeners: &[&str]) -> Service {
        let mut s = Service { name: name.into(), bin, args, child: None, log: Arc::default(), addrs: HashMap::new() };
        s.spawn(listeners);
        s
    }

    fn spawn(&mut self, listeners: &[&str]) {
        let mut child = Command::new(&self.bin)
            .args(&self.args)
            .env("RUST_LOG", std::env::var("MQFLEET_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start: {e}", self.bin.display()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        for out in
            [child.stdout.take().map(|o| Box::new(o) as Box<dyn std::io::Read + Send>), child.stderr.take().map(|e| Box::new(e) as _)]
                .into_iter()
                .flatten()
        {
            let (tx, log, name) = (tx.clone(), self.log.clone(), self.name.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if std::env::var_os("MQFLEET_TEST_ECHO").is_some() {
                        eprintln!("[{name}] {line}");
                    }
                    let _ = tx.send(line.clone());
                    log.lock().expect("log lock").push(line);
                }
            });
        }
        let deadline = Instant::now() + STARTUP;
        let mut missing: Vec<&str> = listeners.to_vec();
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    for l in listeners {
                        if line.contains(&format!("{l} listener bound")) {
                            if let Some(addr) = line.split("address=").nth(1).and_then(|a| a.split_whitespace().next()?.parse().ok()) {
                                self.addrs.insert(l.to_string(), addr);
                            }
                        }
                    }
                    missing.retain(|l| !line.contains(&format!("{l} listener bound")));
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{} did not report its {missing:?} listener(s); log:\n{}", self.name, self.log_text());
                }
            }
        }
        self.child = Some(child);
    }

    /// GET `path` on the process's HTTP listener; the body, or `None` if it did not answer.
    pub fn http_get(&self, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let addr = self.addrs.get("HTTP")?;
        let mut s = std::net::TcpStream::connect_timeout(addr, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    }

    /// The value of a Prometheus gauge or counter (the first sample of `name`).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let body = self.http_get("/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: the process dies without any clean-up, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        c.wait().ok()
    }

    /// Starts it again with the same arguments (same ports, same data directory).
    pub fn restart(&mut self, listeners: &[&str]) {
        self.kill9();
        self.spawn(listeners);
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Waits until the log has a line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log.lock().expect("log lock").iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `127.0.0.1:port`
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
