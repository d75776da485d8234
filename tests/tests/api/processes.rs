//! The `api` program itself, as a child process: what it refuses to start with, how it stops,
//! and what its logs carry.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tests::cleanup::{remove_now, unique};
use tests::ports::free_port;
use tests::program::Program;
use tests::servers::servers;
use tests::wait::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The `api` program with a namespace and database of its own, removed when it is dropped.
struct ApiProcess {
    program: Option<Program>,
    namespace: String,
    database: String,
}

impl ApiProcess {
    /// Starts `api` on the test servers with `vars` added (or replacing the defaults).
    async fn start(vars: &[(&str, String)]) -> Self {
        Self::start_with(vars, None).await
    }

    /// As [`ApiProcess::start`], under a limit of `open_files` (soft and hard), set by
    /// util-linux's `prlimit` before it runs the api.
    async fn start_with(vars: &[(&str, String)], open_files: Option<u64>) -> Self {
        let servers = servers().require_all();
        let namespace = unique("proc");
        let database = unique("otp_test");
        let mut env = servers.env();
        env.extend(
            [
                ("NAMESPACE", namespace.clone()),
                ("DATABASE_URL", servers.database_url(&database)),
                ("AMQP_QUEUE_TYPE", "classic".to_owned()),
                ("LOG_FORMAT", "json".to_owned()),
                ("RUST_LOG", "info,tower_http=debug".to_owned()),
            ]
            .map(|(name, value)| (name.to_owned(), value)),
        );
        for (name, value) in vars {
            env.retain(|(existing, _)| existing != name);
            env.push(((*name).to_owned(), value.clone()));
        }
        let program = match open_files {
            None => Program::start_workspace("api", &[], env).await,
            Some(limit) => Program::start_workspace_with_open_files("api", env, limit).await,
        };
        Self {
            program: Some(program),
            namespace,
            database,
        }
    }

    fn program(&mut self) -> &mut Program {
        self.program.as_mut().expect("running")
    }

    async fn wait_until_ready(&self, base: &str) {
        let client = reqwest::Client::new();
        let url = format!("{base}/readyz");
        eventually(Duration::from_secs(30), "the api to be ready", || async {
            let reply = client.get(&url).send().await;
            reply.is_ok_and(|r| r.status() == StatusCode::OK)
        })
        .await;
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        // Stopped first, so it declares nothing again after the removal.
        drop(self.program.take());
        remove_now(&self.namespace, Some(&self.database));
    }
}

#[tokio::test]
async fn sigterm_with_a_half_sent_request_exits_within_the_grace() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut api = ApiProcess::start(&[
        ("API_ADDR", format!("127.0.0.1:{port}")),
        ("OTP_SECRET", "process-secret-0123456789".to_owned()),
        ("SHUTDOWN_GRACE_SECS", "2".to_owned()),
    ])
    .await;
    api.wait_until_ready(&base).await;

    // A request whose body never comes: headers announce 100 bytes, 10 arrive.
    let request_id = unique("half-sent");
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!(
        "POST /v1/otp HTTP/1.1\r\nHost: test\r\nx-request-id: {request_id}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"phone_nu"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the request to be in flight",
        || async { api.program.as_ref().unwrap().logs().contains(&request_id) },
    )
    .await;

    let started = Instant::now();
    api.program().terminate();
    let status = api.program().wait(Duration::from_secs(8)).await;
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        took >= Duration::from_millis(1_500),
        "exited after {took:?}: no grace"
    );
    drop(stream);
}

#[tokio::test]
async fn every_log_line_of_a_request_carries_its_request_id() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut api = ApiProcess::start(&[
        ("API_ADDR", format!("127.0.0.1:{port}")),
        ("OTP_SECRET", "process-secret-0123456789".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ])
    .await;
    api.wait_until_ready(&base).await;
    let client = reqwest::Client::new();
    let mut request_ids = Vec::new();
    for i in 0..10 {
        let request_id = unique("logged");
        let reply = client
            .post(format!("{base}/v1/otp"))
            .header("x-request-id", &request_id)
            .json(&serde_json::json!({ "phone_number": format!("+1415555{:04}", 700 + i) }))
            .send()
            .await
            .expect("the api answers");
        assert_eq!(reply.status(), StatusCode::ACCEPTED);
        request_ids.push(request_id);
    }
    // Stopped, so every line it wrote has been read.
    api.program().terminate();
    assert!(api.program().wait(Duration::from_secs(15)).await.success());
    let logs = api.program().logs();
    let requested: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("OTP requested"))
        .collect();
    assert_eq!(requested.len(), 10, "{logs}");
    let missing: Vec<&String> = request_ids
        .iter()
        .filter(|id| !requested.iter().any(|line| line.contains(id.as_str())))
        .collect();
    assert!(
        missing.is_empty(),
        "no request id on the log line of {missing:?}:\n{}",
        requested.join("\n")
    );
}

#[tokio::test]
async fn the_development_otp_secret_is_refused_on_a_public_address_unless_allowed() {
    let mut refused = ApiProcess::start(&[("API_ADDR", "0.0.0.0:0".to_owned())]).await;
    let status = refused.program().wait(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(2), "{}", refused.program().logs());
    let logs = refused.program().logs();
    assert!(logs.contains("OTP_SECRET"), "{logs}");
    drop(refused);

    let port = free_port();
    let mut allowed = ApiProcess::start(&[
        ("API_ADDR", format!("0.0.0.0:{port}")),
        ("OTP_SECRET_ALLOW_DEV", "true".to_owned()),
    ])
    .await;
    allowed
        .wait_until_ready(&format!("http://127.0.0.1:{port}"))
        .await;
    allowed.program().terminate();
    let status = allowed.program().wait(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test]
async fn a_connection_cap_past_the_open_file_limit_is_lowered_to_what_it_leaves() {
    // 200 open files, of which the api keeps 64 and its database pool's 10: 126 connections.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let api = ApiProcess::start_with(
        &[
            ("API_ADDR", addr.clone()),
            ("OTP_SECRET", "process-secret-0123456789".to_owned()),
            // Silent connections keep their places for the whole test.
            ("HTTP_HEADER_TIMEOUT_SECS", "60".to_owned()),
        ],
        Some(200),
    )
    .await;
    api.wait_until_ready(&format!("http://{addr}")).await;
    let program = api.program.as_ref().expect("running");
    program.wait_for_cap_lowered_to(126).await;

    // 126 connections, each served a request and kept open. The readiness check's connection
    // may still hold a place for a moment; the last of them is served once it lets go.
    let mut served = Vec::new();
    for n in 1..=126 {
        let mut connection = TcpStream::connect(&addr).await.expect("a connection");
        assert_eq!(
            healthz(&mut connection, Duration::from_secs(10)).await,
            Some(true),
            "connection {n}"
        );
        served.push(connection);
    }
    // The 127th has no place: it waits, unserved.
    let mut waiting = TcpStream::connect(&addr).await.expect("a connection");
    assert_eq!(
        healthz(&mut waiting, Duration::from_secs(1)).await,
        None,
        "a connection past 126 was served"
    );

    // A place frees, and the client waiting takes it.
    drop(served.pop());
    let mut start = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), waiting.read_exact(&mut start))
        .await
        .expect("served once a place freed")
        .expect("an answer");
    assert_eq!(&start, b"HTTP/1.1 200");
    drop(served);
}

/// Sends `GET /healthz` on `connection` (kept open): whether a 200 came within `within`, or
/// `None` when nothing came at all.
async fn healthz(connection: &mut TcpStream, within: Duration) -> Option<bool> {
    connection
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .expect("the request is written");
    let mut start = [0u8; 12];
    match tokio::time::timeout(within, connection.read_exact(&mut start)).await {
        Ok(read) => Some(read.is_ok() && &start == b"HTTP/1.1 200"),
        Err(_) => None,
    }
}
