//! The public receipts port (`CALLBACK_ADDR`) under a hostile client, as the api's port is: a
//! request head trickled a byte at a time, or a body held back, is cut at
//! `HTTP_HEADER_TIMEOUT_SECS`, connections past
//! `HTTP_MAX_CONNECTIONS` wait in the kernel's backlog (so a flood cannot take the descriptors the
//! worker's calls to the providers need), and neither holds a stopping worker.

use std::time::Duration;

use shared::QueueType;
use tests::program::Program;
use tests::wait::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::harness::{Harness, WAIT, pairs, with_harness};

/// A worker process with receipts on and `overrides`: the process, its receipts address and its
/// HTTP port's address, once `/readyz` says it is consuming.
async fn worker_with_receipts(
    h: &Harness,
    overrides: &[(&str, &str)],
) -> (Program, String, String) {
    worker_with_receipts_under(h, overrides, None).await
}

/// As [`worker_with_receipts`], under a limit of `open_files` when one is given.
async fn worker_with_receipts_under(
    h: &Harness,
    overrides: &[(&str, &str)],
    open_files: Option<u64>,
) -> (Program, String, String) {
    let mut env = h.receipts();
    let addr = format!("127.0.0.1:{}", tests::ports::free_port());
    env.push(("WORKER_ADDR".to_owned(), addr.clone()));
    env.extend(
        overrides
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned())),
    );
    let receipts = env
        .iter()
        .rev()
        .find(|(name, _)| name == "CALLBACK_ADDR")
        .map(|(_, value)| value.clone())
        .expect("receipts are on");
    let worker = match open_files {
        None => h.start_worker_process(&pairs(&env)).await,
        Some(limit) => {
            h.start_worker_process_with_open_files(&pairs(&env), limit)
                .await
        }
    };
    let ready = format!("http://{addr}/readyz");
    eventually(WAIT, "the worker to be ready", || async {
        matches!(h.http.get(&ready).send().await, Ok(r) if r.status().is_success())
    })
    .await;
    (worker, receipts, addr)
}

/// A client that sends the start of a request head, then one more header byte every 200 ms
/// until the server closes the connection. The task ends with when that was.
fn trickle_a_head(mut stream: TcpStream) -> JoinHandle<Instant> {
    tokio::spawn(async move {
        let head = b"POST /v1/callbacks/twilio HTTP/1.1\r\nHost: receipts\r\nX-Slow: ";
        if stream.write_all(head).await.is_err() {
            return Instant::now();
        }
        let mut byte = [0u8; 1];
        loop {
            // A closed connection shows as a failed write or as end of file on the read.
            if stream.write_all(b"a").await.is_err() {
                return Instant::now();
            }
            let read = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte));
            if let Ok(Ok(0) | Err(_)) = read.await {
                return Instant::now();
            }
        }
    })
}

/// A forged Twilio callback: the worker must answer it (403) when it serves the connection.
async fn post_forged_callback(h: &Harness, receipts: &str) -> reqwest::Result<reqwest::Response> {
    h.http
        .post(format!("http://{receipts}/v1/callbacks/twilio"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("MessageSid=SM0&MessageStatus=delivered")
        .timeout(Duration::from_secs(1))
        .send()
        .await
}

/// A forged callback is served: refused, 403, as the worker refuses one it reads.
async fn assert_served(h: &Harness, receipts: &str, worker: &Program) {
    let answer = post_forged_callback(h, receipts).await.expect("an answer");
    assert_eq!(answer.status(), 403, "{}", worker.logs());
}

/// A forged callback gets no answer within 1 s: the port has no place for it.
async fn assert_not_served(h: &Harness, receipts: &str) {
    let beyond = post_forged_callback(h, receipts).await;
    assert!(
        beyond.as_ref().is_err_and(reqwest::Error::is_timeout),
        "served beyond the cap: {beyond:?}"
    );
}

#[tokio::test]
async fn a_request_head_trickled_to_the_receipts_port_is_cut_at_the_header_timeout() {
    with_harness(QueueType::Classic, |h| async move {
        let (worker, receipts, addr) =
            worker_with_receipts(&h, &[("HTTP_HEADER_TIMEOUT_SECS", "1")]).await;
        let connected = Instant::now();
        let stream = TcpStream::connect(&receipts).await.expect("connect");
        let closed = tokio::time::timeout(WAIT, trickle_a_head(stream))
            .await
            .expect("the trickling client was not cut off")
            .expect("the client task");
        let took = closed - connected;
        assert!(
            took >= Duration::from_millis(800) && took <= Duration::from_secs(4),
            "closed after {took:?}, with a 1 s header timeout"
        );
        let metrics = h.metrics_at(&addr).await;
        assert!(
            metrics.lines().any(|l| l.starts_with(
                "http_connections_closed_total{port=\"receipts\",reason=\"header_timeout\"}"
            )),
            "no header_timeout close counted:\n{metrics}"
        );
        // Still serving: a forged callback gets its 403.
        assert_served(&h, &receipts, &worker).await;
    })
    .await;
}

#[tokio::test]
async fn a_request_body_held_back_on_the_receipts_port_is_cut_at_the_header_timeout() {
    with_harness(QueueType::Classic, |h| async move {
        let (_worker, receipts, _) =
            worker_with_receipts(&h, &[("HTTP_HEADER_TIMEOUT_SECS", "1")]).await;
        let mut stream = TcpStream::connect(&receipts).await.expect("connect");
        let sent_at = Instant::now();
        stream
            .write_all(
                b"POST /v1/callbacks/twilio HTTP/1.1\r\nHost: receipts\r\n\
                  Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n",
            )
            .await
            .expect("write");
        // Before, only the callbacks' 15 s request timeout ended it.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
            .await
            .expect("the connection was not closed");
        let took = sent_at.elapsed();
        assert!(
            took >= Duration::from_millis(800) && took <= Duration::from_secs(4),
            "closed after {took:?}, with a 1 s header timeout"
        );
    })
    .await;
}

/// An unauthenticated caller gets nothing held for it: an Infobip report without the secret is
/// refused before its body is read (a flood of 256 KiB bodies pinned that much each), a request
/// head is bounded under hyper's default 400 KiB, and forged callbacks are warned of once per
/// 10 s (all of them counted), so that they cannot crowd the log's real warnings out.
#[tokio::test]
async fn the_receipts_port_holds_nothing_for_a_caller_it_does_not_know() {
    with_harness(QueueType::Classic, |h| async move {
        let (mut worker, receipts, addr) = worker_with_receipts(&h, &[]).await;
        // A head announcing a large body, and no body: the refusal comes without waiting for it.
        let mut stream = TcpStream::connect(&receipts).await.expect("connect");
        stream
            .write_all(
                b"POST /v1/callbacks/infobip?secret=wrong HTTP/1.1\r\nHost: receipts\r\n\
                  Content-Type: application/json\r\nContent-Length: 200000\r\n\r\n",
            )
            .await
            .expect("write");
        let mut status_line = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut status_line))
            .await
            .expect("refused before the body came")
            .expect("read");
        assert_eq!(&status_line, b"HTTP/1.1 403");
        drop(stream);

        let infobip = format!("http://{receipts}/v1/callbacks/infobip");
        let big_head = h
            .http
            .post(&infobip)
            .header("X-Padding", "a".repeat(300 * 1024))
            .body("{}")
            .send()
            .await
            .expect("an answer");
        assert_eq!(big_head.status(), 431);

        for _ in 0..5 {
            let forged = h
                .http
                .post(&infobip)
                .body("{}")
                .send()
                .await
                .expect("an answer");
            assert_eq!(forged.status(), 403);
        }
        let metrics = h.metrics_at(&addr).await;
        let series = r#"sms_callbacks_rejected_total{provider="infobip",reason="secret"} 6"#;
        assert!(
            metrics.lines().any(|l| l == series),
            "no {series}:\n{metrics}"
        );
        // Every line written: the worker has exited.
        worker.terminate();
        worker.wait(WAIT).await;
        let warnings = worker
            .logs()
            .matches("refused an Infobip delivery report")
            .count();
        assert_eq!(warnings, 1, "{}", worker.logs());
    })
    .await;
}

#[tokio::test]
async fn the_receipts_port_serves_no_more_connections_than_its_cap() {
    with_harness(QueueType::Classic, |h| async move {
        let (worker, receipts, addr) = worker_with_receipts(
            &h,
            &[
                ("HTTP_MAX_CONNECTIONS", "2"),
                ("HTTP_HEADER_TIMEOUT_SECS", "60"),
            ],
        )
        .await;
        // Two silent connections take the receipts port's two places.
        let first = TcpStream::connect(&receipts).await.expect("connect");
        let _second = TcpStream::connect(&receipts).await.expect("connect");
        // The kernel completes a third handshake from its backlog; the worker must not serve it.
        assert_not_served(&h, &receipts).await;
        // The worker holds that client, accepted, until a place frees, and says on which port.
        let metrics = h.metrics_at(&addr).await;
        let lines: Vec<&str> = metrics.lines().collect();
        for line in [
            r#"http_clients_waiting{port="receipts"} 1"#,
            r#"http_clients_waiting{port="http"} 0"#,
            r#"http_open_connections{port="receipts"} 2"#,
        ] {
            assert!(lines.contains(&line), "no {line}:\n{metrics}");
        }
        // The cap is the port's own: the HTTP port still answers.
        let health = h
            .http
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .expect("the HTTP port answers");
        assert!(health.status().is_success());
        drop(first);
        assert_served(&h, &receipts, &worker).await;
    })
    .await;
}

#[tokio::test]
async fn a_client_trickling_a_head_to_the_receipts_port_does_not_hold_a_stopping_worker() {
    with_harness(QueueType::Classic, |h| async move {
        // Without the header timeout, the stop would wait for the client until its deadline,
        // about 20 s after SIGTERM with this grace.
        let (mut worker, receipts, _) = worker_with_receipts(
            &h,
            &[
                ("HTTP_HEADER_TIMEOUT_SECS", "2"),
                ("SHUTDOWN_GRACE_SECS", "10"),
            ],
        )
        .await;
        let stream = TcpStream::connect(&receipts).await.expect("connect");
        let client = trickle_a_head(stream);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stopped_at = Instant::now();
        worker.terminate();
        let exit = worker.wait(WAIT).await;
        assert_eq!(exit.code(), Some(0), "{}", worker.logs());
        let took = stopped_at.elapsed();
        assert!(
            took <= Duration::from_secs(8),
            "the stop took {took:?}:\n{}",
            worker.logs()
        );
        client.abort();
    })
    .await;
}

#[tokio::test]
async fn under_a_low_open_file_limit_the_receipts_port_takes_what_is_left_and_probes_keep_theirs() {
    with_harness(QueueType::Classic, |h| async move {
        // 300 open files. The worker keeps 64, its HTTP port's 64 and two for each of its 64
        // sends in flight: 44 are left, two for each receipts connection (a resend).
        let (worker, receipts, addr) = worker_with_receipts_under(
            &h,
            &[("HTTP_HEADER_TIMEOUT_SECS", "60"), ("LOG_FORMAT", "json")],
            Some(300),
        )
        .await;
        worker.wait_for_cap_lowered_to(22).await;

        // The HTTP port keeps its own places: 30 connections, more than the receipts port's 22,
        // each served and kept open.
        let mut probes = Vec::new();
        for n in 1..=30 {
            let mut probe = TcpStream::connect(&addr).await.expect("connect");
            probe
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: worker\r\n\r\n")
                .await
                .expect("the request is written");
            let mut start = [0u8; 12];
            tokio::time::timeout(WAIT, probe.read_exact(&mut start))
                .await
                .unwrap_or_else(|_| panic!("probe {n} not served"))
                .expect("an answer");
            assert_eq!(&start, b"HTTP/1.1 200", "probe {n}");
            probes.push(probe);
        }

        // 22 silent connections take the receipts port's places; the next is not served.
        let mut silent = Vec::new();
        for _ in 0..22 {
            silent.push(TcpStream::connect(&receipts).await.expect("connect"));
        }
        assert_not_served(&h, &receipts).await;
        drop(silent.pop());
        assert_served(&h, &receipts, &worker).await;
        drop((probes, silent));
    })
    .await;
}
