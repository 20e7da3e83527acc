//! CPU and memory of the broker process under test, read from `/proc/<pid>` (Linux).

/// CPU time and resident memory of one process at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// Share of one core since the previous sample (200 = both cores of a 2-core machine).
    pub cpu_percent: f64,
    pub rss_bytes: u64,
}

/// Samples a process; remembers the previous CPU reading to compute rates.
pub struct ProcSampler {
    pid: u32,
    ticks_per_s: f64,
    last: Option<(u64, tokio::time::Instant)>,
    pub first_cpu_ticks: Option<u64>,
    pub last_cpu_ticks: Option<u64>,
    pub max_rss: u64,
}

impl ProcSampler {
    pub fn new(pid: u32) -> ProcSampler {
        // USER_HZ is 100 on every Linux this tool targets.
        ProcSampler { pid, ticks_per_s: 100.0, last: None, first_cpu_ticks: None, last_cpu_ticks: None, max_rss: 0 }
    }

    /// utime + stime in clock ticks, from /proc/<pid>/stat.
    fn cpu_ticks(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    }

    fn rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    }

    pub fn sample(&mut self) -> Option<ProcSample> {
        let ticks = self.cpu_ticks()?;
        let rss = self.rss()?;
        let now = tokio::time::Instant::now();
        self.first_cpu_ticks.get_or_insert(ticks);
        self.last_cpu_ticks = Some(ticks);
        self.max_rss = self.max_rss.max(rss);
        let cpu = match self.last.replace((ticks, now)) {
            Some((t0, i0)) => (ticks - t0) as f64 / self.ticks_per_s / (now - i0).as_secs_f64().max(1e-3) * 100.0,
            None => 0.0,
        };
        Some(ProcSample { cpu_percent: cpu, rss_bytes: rss })
    }

    /// CPU seconds used between the first and last sample.
    pub fn cpu_seconds(&self) -> Option<f64> {
        Some((self.last_cpu_ticks? - self.first_cpu_ticks?) as f64 / self.ticks_per_s)
    }
}
