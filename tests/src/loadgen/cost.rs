//! What a run costs each process of the stack, read from `/proc` (Linux only): CPU time per
//! accepted operation, and resident memory over time for a soak.
//!
//! Requests per second swing ±15 % from run to run on a shared 2-core VM; the CPU a process
//! spends per operation moves far less, because it does not count the time a process spent
//! waiting for a core. So changes are compared by CPU per operation, in interleaved runs.
//!
//! The processes are found by name (`/proc/<pid>/comm`): every `api`, `sms-worker`, `fake-sms`,
//! RabbitMQ's `beam.smp`, `redis-server` and `postgres` on the machine. Run cost measurements on
//! a machine with one stack only, or the figures add up the others' work too. PostgreSQL starts a
//! process per connection, so the stack is looked for again at the end: a process that was not
//! there at the start (a connection the api's pool opened during the run) counts all it spent.
//! One that came and went during the run (an autovacuum worker) is not counted.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

/// The programs of the stack, by the name the kernel keeps for them (at most 15 bytes).
const STACK: [&str; 6] = [
    "api",
    "sms-worker",
    "fake-sms",
    "beam.smp",
    "redis-server",
    "postgres",
];

/// `/proc/<pid>/stat` counts CPU time in clock ticks of `USER_HZ`, which Linux fixes at 100 on
/// every architecture it runs this on. A 10 ms tick is fine here: a cost run is many seconds.
const TICKS_PER_SEC: u64 = 100;

/// One process of the stack.
#[derive(Debug, Clone, Serialize)]
pub struct StackProcess {
    pub name: String,
    pub pid: u32,
}

/// Every running process of the stack, in the order of [`STACK`], then by pid.
pub fn discover() -> anyhow::Result<Vec<StackProcess>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").context("no /proc: cost figures need Linux")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue; // gone since the directory was read
        };
        let comm = comm.trim_end();
        if let Some(rank) = STACK.iter().position(|name| *name == comm) {
            found.push((rank, pid, comm.to_owned()));
        }
    }
    found.sort();
    Ok(found
        .into_iter()
        .map(|(_, pid, name)| StackProcess { name, pid })
        .collect())
}

/// CPU time (user and system) the process has used so far, or None once it is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (2nd field) is in parentheses and may hold spaces: count from after it.
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis(
        (user + system) * 1000 / TICKS_PER_SEC,
    ))
}

/// Resident memory in MiB, or None once the process is gone.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// What one process spent during the run.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessCost {
    pub name: String,
    pub pid: u32,
    pub cpu_ms: f64,
    /// CPU microseconds per accepted operation.
    pub us_per_op: f64,
    pub rss_mib: f64,
}

/// The CPU clocks of the stack's processes (and of loadgen itself) at the start of a run.
pub struct CpuMeter {
    processes: Vec<(StackProcess, Duration)>,
    own_start: Duration,
}

impl CpuMeter {
    pub fn start(processes: Vec<StackProcess>) -> Self {
        let processes = processes
            .into_iter()
            .filter_map(|p| Some((p.clone(), cpu_time(p.pid)?)))
            .collect();
        Self {
            processes,
            own_start: cpu_time(std::process::id()).unwrap_or_default(),
        }
    }

    /// Each process's CPU since [`CpuMeter::start`], per one of `operations`.
    pub fn finish(&self, operations: u64) -> Costs {
        let per_op = |spent: Duration| spent.as_secs_f64() * 1e6 / operations.max(1) as f64;
        let born_during_run = discover()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| self.processes.iter().all(|(seen, _)| seen.pid != p.pid))
            .map(|p| (p, Duration::ZERO));
        let mut all: Vec<(StackProcess, Duration)> = self.processes.clone();
        all.extend(born_during_run);
        all.sort_by_key(|(p, _)| (STACK.iter().position(|name| *name == p.name), p.pid));
        let processes = all
            .iter()
            .map(|(p, start)| {
                let spent = cpu_time(p.pid).unwrap_or(*start).saturating_sub(*start);
                ProcessCost {
                    name: p.name.clone(),
                    pid: p.pid,
                    cpu_ms: spent.as_secs_f64() * 1e3,
                    us_per_op: per_op(spent),
                    rss_mib: rss_mib(p.pid).unwrap_or(0.0),
                }
            })
            .collect::<Vec<_>>();
        let loadgen = cpu_time(std::process::id())
            .unwrap_or_default()
            .saturating_sub(self.own_start);
        Costs {
            operations,
            total_us_per_op: processes.iter().map(|p| p.us_per_op).sum(),
            processes,
            loadgen_us_per_op: per_op(loadgen),
        }
    }
}

/// The stack's CPU per accepted operation, process by process.
#[derive(Debug, Clone, Serialize)]
pub struct Costs {
    pub operations: u64,
    pub processes: Vec<ProcessCost>,
    /// The stack's processes together, loadgen not included.
    pub total_us_per_op: f64,
    /// loadgen's own CPU: the client side, not part of the stack's cost.
    pub loadgen_us_per_op: f64,
}

/// Resident memory of each process at one moment of a soak.
#[derive(Debug, Clone, Serialize)]
pub struct RssSample {
    pub at_secs: f64,
    /// (name, pid, MiB)
    pub rss_mib: Vec<(String, u32, f64)>,
}

/// Samples the resident memory of `processes` every `every` until dropped, printing each line
/// to stderr as it goes (a soak runs for minutes) and keeping them for the report.
pub fn sample_rss(
    processes: Vec<StackProcess>,
    every: Duration,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::Mutex<Vec<RssSample>>>,
) {
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = samples.clone();
    let started = Instant::now();
    // Our programs only: PostgreSQL's per-connection processes come and go, and a soak is about
    // whether the api and the worker hold their memory.
    let processes: Vec<StackProcess> = processes
        .into_iter()
        .filter(|p| p.name != "postgres")
        .collect();
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        loop {
            ticker.tick().await;
            let sample = RssSample {
                at_secs: started.elapsed().as_secs_f64(),
                rss_mib: processes
                    .iter()
                    .filter_map(|p| Some((p.name.clone(), p.pid, rss_mib(p.pid)?)))
                    .collect(),
            };
            let line: Vec<String> = sample
                .rss_mib
                .iter()
                .map(|(name, pid, mib)| format!("{name}[{pid}] {mib:.1} MiB"))
                .collect();
            eprintln!("rss t={:>5.0}s  {}", sample.at_secs, line.join("  "));
            kept.lock().unwrap_or_else(|e| e.into_inner()).push(sample);
        }
    });
    (task, samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cpu_and_memory() {
        let before = cpu_time(std::process::id()).expect("own /proc/self/stat");
        // Burn a little CPU so the clock must move (by at least one 10 ms tick).
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = cpu_time(std::process::id()).unwrap();
        assert!(after > before, "{before:?} → {after:?}");
        assert!(rss_mib(std::process::id()).unwrap() > 1.0);
        assert_eq!(cpu_time(u32::MAX), None);
    }
}
