//! A program under test as a child process: started with only the environment the test gives
//! it, its output kept line by line, killed when the test ends, and its output shown when the
//! test fails (a timed-out wait included), since that is where the reason usually is.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

pub struct Program {
    name: String,
    child: Child,
    output: Arc<Mutex<Output>>,
    readers: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct Output {
    /// stdout and stderr interleaved as they came.
    all: String,
    stdout: String,
}

/// Long enough for a line logged at start to reach us on a busy machine.
const WAIT_FOR_A_LINE: Duration = Duration::from_secs(20);

impl Program {
    /// Starts `binary` with `args` and exactly `env`.
    pub fn start(
        binary: &Path,
        args: &[&str],
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        let name = binary.file_name().map_or_else(
            || binary.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        let mut child = Command::new(binary)
            .args(args)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", binary.display()));
        let output = Arc::new(Mutex::new(Output::default()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let readers = vec![
            tokio::spawn(collect(stdout, output.clone(), true)),
            tokio::spawn(collect(stderr, output.clone(), false)),
        ];
        Self {
            name,
            child,
            output,
            readers,
        }
    }

    /// Starts the workspace's `api` or `sms-worker` (built first if need be).
    pub async fn start_workspace(
        name: &'static str,
        args: &[&str],
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        let binary = workspace_binary(name).await;
        Self::start(&binary, args, env)
    }

    /// As [`Program::start_workspace`], under a limit of `open_files` (soft and hard), set by
    /// util-linux's `prlimit` before it runs the program.
    pub async fn start_workspace_with_open_files(
        name: &'static str,
        env: impl IntoIterator<Item = (String, String)>,
        open_files: u64,
    ) -> Self {
        let binary = workspace_binary(name).await;
        let binary = binary.to_str().expect("a UTF-8 path");
        let nofile = format!("--nofile={open_files}:{open_files}");
        Self::start(Path::new("/usr/bin/prlimit"), &[&nofile, binary], env)
    }

    /// Waits until its JSON log has warned that the open-file limit lowered its connection cap
    /// to `max_connections`.
    pub async fn wait_for_cap_lowered_to(&self, max_connections: usize) {
        let field = format!(r#""max_connections":{max_connections}"#);
        crate::wait::eventually(WAIT_FOR_A_LINE, "the warning about the cap", || async {
            let logs = self.logs();
            logs.contains("HTTP_MAX_CONNECTIONS is more than the open-file limit leaves")
                && logs.contains(&field)
        })
        .await;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything it printed so far, stdout and stderr interleaved.
    pub fn logs(&self) -> String {
        self.output().all.clone()
    }

    /// What it printed on stdout alone, once it has exited ([`Program::wait`]).
    pub fn stdout(&self) -> String {
        self.output().stdout.clone()
    }

    /// Sends SIGTERM, as an orchestrator stopping it does.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// SIGSTOP: it does nothing, its connections stay open, until [`Program::resume`].
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT, after [`Program::pause`].
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the program is running");
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIG{signal} to {} failed", self.name);
    }

    /// SIGKILL: it dies at once, with whatever it held.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("the program can be killed");
    }

    /// Waits for it to exit and for the last of its output.
    pub async fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let status = tokio::time::timeout(deadline, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {deadline:?}", self.name))
            .expect("waiting on the program");
        for reader in self.readers.drain(..) {
            let _ = reader.await;
        }
        status
    }

    fn output(&self) -> MutexGuard<'_, Output> {
        self.output.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.name, self.logs());
        }
    }
}

async fn collect(stream: impl AsyncRead + Unpin, output: Arc<Mutex<Output>>, is_stdout: bool) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut output = output.lock().unwrap_or_else(|e| e.into_inner());
        output.all.push_str(&line);
        output.all.push('\n');
        if is_stdout {
            output.stdout.push_str(&line);
            output.stdout.push('\n');
        }
    }
}

/// [`crate::binaries::workspace_binary`] off the async thread: the first call runs cargo.
pub async fn workspace_binary(name: &'static str) -> PathBuf {
    tokio::task::spawn_blocking(move || crate::binaries::workspace_binary(name))
        .await
        .expect("building the workspace's programs")
}
