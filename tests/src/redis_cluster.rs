//! A throwaway Redis Cluster for one test: three masters, no replicas (the tests are about hash
//! slots, not failover), run as `redis-server` processes on free 127.0.0.1 ports in a
//! directory of their own, and killed when dropped. Never the machine's own Redis.
//!
//! Needs `redis-server` and `redis-cli` (Debian's `redis-server` package); [`RedisCluster::start`]
//! says so when they are missing, so a test can skip.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Creating the cluster and agreeing on the slots takes a few seconds.
const READY_DEADLINE: Duration = Duration::from_secs(30);

pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Child>,
    ports: Vec<u16>,
}

impl RedisCluster {
    /// Starts three masters and joins them into a cluster with every slot covered.
    pub fn start() -> Result<Self, String> {
        for program in ["redis-server", "redis-cli"] {
            let found = Command::new(program)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                return Err(format!("{program} is not installed (Debian: redis-server)"));
            }
        }
        let dir = std::env::temp_dir().join(format!(
            "otp-redis-cluster-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
        let mut cluster = Self {
            dir,
            nodes: Vec::new(),
            ports: Vec::new(),
        };
        for _ in 0..3 {
            let port = cluster_port(&cluster.ports)?;
            let node = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                // A node stopped by a test must not take the others down with CLUSTERDOWN once
                // the node timeout passes on a slow machine: only its own slots go.
                .args(["--cluster-require-full-coverage", "no"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&cluster.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start redis-server: {e}"))?;
            cluster.nodes.push(node);
            cluster.ports.push(port);
        }
        for port in cluster.ports.clone() {
            cluster.wait_for(&format!("node {port} to answer"), || {
                redis_cli(port, &["ping"]).is_some_and(|out| out.contains("PONG"))
            })?;
        }
        let addresses: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run redis-cli --cluster create: {e}"))?;
        if !created.success() {
            return Err(format!("redis-cli --cluster create failed: {created}"));
        }
        for port in cluster.ports.clone() {
            cluster.wait_for(&format!("node {port} to see the cluster ok"), || {
                redis_cli(port, &["cluster", "info"])
                    .is_some_and(|out| out.contains("cluster_state:ok"))
            })?;
        }
        Ok(cluster)
    }

    /// `REDIS_URL` for the programs.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// Stops every node's process (SIGSTOP): the kernel still accepts connections, and nothing
    /// answers. The cluster's drop kills the nodes all the same.
    pub fn freeze(&self) {
        for node in &self.nodes {
            let stopped = Command::new("kill")
                .args(["-STOP", &node.id().to_string()])
                .status()
                .is_ok_and(|status| status.success());
            assert!(stopped, "kill -STOP {}", node.id());
        }
    }

    /// The nodes' ports.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The port of the master that serves `key`'s hash slot.
    pub fn port_serving(&self, key: &str) -> u16 {
        let slot: u16 = redis_cli(self.ports[0], &["cluster", "keyslot", key])
            .and_then(|out| out.trim().parse().ok())
            .expect("CLUSTER KEYSLOT answers a number");
        let serves = |port: u16| {
            let nodes = redis_cli(port, &["cluster", "nodes"]).unwrap_or_default();
            let Some(own) = nodes.lines().find(|line| line.contains("myself")) else {
                return false;
            };
            own.split_whitespace().skip(8).any(|range| {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                matches!((first.parse::<u16>(), last.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
            })
        };
        self.ports
            .iter()
            .copied()
            .find(|port| serves(*port))
            .expect("a master serves every slot")
    }

    /// Empties one node's script cache, as a restart or a replica's promotion leaves it.
    pub fn flush_scripts(&self, port: u16) {
        let answer = redis_cli(port, &["script", "flush"]);
        assert!(
            answer.is_some_and(|out| out.contains("OK")),
            "SCRIPT FLUSH on {port}"
        );
    }

    /// Stops one node's process (SIGSTOP), so it accepts connections and answers nothing.
    pub fn freeze_node(&self, port: u16) {
        let index = self
            .ports
            .iter()
            .position(|p| *p == port)
            .expect("a node of this cluster");
        let pid = self.nodes[index].id().to_string();
        let stopped = Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .is_ok_and(|status| status.success());
        assert!(stopped, "kill -STOP {pid}");
    }

    /// The keys of every master, for a test to look at what was written where.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.ports
            .iter()
            .filter_map(|port| redis_cli(*port, &["--scan", "--pattern", pattern]))
            .flat_map(|out| out.lines().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }

    fn wait_for(&self, what: &str, mut check: impl FnMut() -> bool) -> Result<(), String> {
        let started = Instant::now();
        while !check() {
            if started.elapsed() > READY_DEADLINE {
                return Err(format!("timed out waiting for {what}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port whose cluster bus port (+10,000) is free too, not one of `taken`.
fn cluster_port(taken: &[u16]) -> Result<u16, String> {
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        if port < 55_000
            && !taken.contains(&port)
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return Ok(port);
        }
    }
    Err("no free port pair for a cluster node".to_owned())
}

fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
