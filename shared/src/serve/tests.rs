//! The server's limits, against a real socket.

use super::*;
use axum::body::{Body, to_bytes};
use axum::routing::{get, post};
use tokio::io::AsyncRead;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n";

struct Server {
    addr: SocketAddr,
    /// Sends the shutdown grace.
    stop: oneshot::Sender<Duration>,
    task: JoinHandle<io::Result<()>>,
    /// Receives "slow" and "upload" when those handlers start.
    started: mpsc::UnboundedReceiver<&'static str>,
}

async fn start(limits: ServerLimits) -> Server {
    let (tx, started) = mpsc::unbounded_channel();
    let upload_tx = tx.clone();
    let slow = move || async move {
        let _ = tx.send("slow");
        sleep(SECOND).await;
        "slow done"
    };
    let upload = move |body: Body| async move {
        let _ = upload_tx.send("upload");
        let body = to_bytes(body, 1024).await;
        body.map(|b| b.len().to_string()).unwrap_or_default()
    };
    // Reads its body only after 2 s, as a handler behind a slow middleware would.
    let late_upload = |body: Body| async move {
        sleep(2 * SECOND).await;
        let body = to_bytes(body, 1024).await;
        body.map(|b| b.len().to_string()).unwrap_or_default()
    };
    let peer = |ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() };
    let router = Router::new()
        .route("/late_upload", post(late_upload))
        .route("/", get(|| async { "ok" }))
        .route("/peer", get(peer))
        .route("/slow", get(slow))
        .route("/upload", post(upload));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = oneshot::channel::<Duration>();
    let stopped = async { stopped.await.unwrap_or(Duration::ZERO) };
    let task = tokio::spawn(serve("test", listener, router, limits, stopped));
    Server {
        addr,
        stop,
        task,
        started,
    }
}

fn limits(header_secs: u64, idle_secs: u64) -> ServerLimits {
    ServerLimits {
        header_timeout: Duration::from_secs(header_secs),
        idle_timeout: Duration::from_secs(idle_secs),
        ..ServerLimits::default()
    }
}

async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    let result = tokio::time::timeout(limit, fut).await;
    result.unwrap_or_else(|_| panic!("{what}: not within {limit:?}"))
}

fn assert_took(since: Instant, min: Duration, max: Duration, what: &str) {
    let took = since.elapsed();
    assert!(min <= took && took <= max, "{what} after {took:?}");
}

async fn connect(server: &Server) -> TcpStream {
    TcpStream::connect(server.addr).await.expect("connect")
}

async fn send(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).await.expect("write");
}

/// Sends `GET path` and returns the body of the 200 response.
async fn get_body(stream: &mut TcpStream, path: &str) -> String {
    send(
        stream,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    )
    .await;
    within(5 * SECOND, "response", read_response(stream)).await
}

/// Reads one 200 response with a `Content-Length` body (what axum sends for strings).
async fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let length: usize = (head.lines())
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().expect("length"));
            if let Some(body) = buf.get(end + 4..end + 4 + length) {
                return String::from_utf8_lossy(body).into_owned();
            }
        }
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed before a whole response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits until the server closes the connection (EOF or reset), skipping any bytes.
async fn closed(read: &mut (impl AsyncRead + Unpin)) {
    let mut chunk = [0u8; 1024];
    while let Ok(1..) = read.read(&mut chunk).await {}
}

/// Trickles a never-ending request head, a byte every 200 ms, until the server closes the
/// connection; returns when the first byte was sent.
async fn trickle_until_closed(stream: TcpStream) -> Instant {
    trickle_after(stream, b"", b"GET / HTTP/1.1\r\nX-Slow: ").await
}

/// Sends `sent` at once, then trickles `trickled` and more bytes after it, a byte every 200 ms,
/// until the server closes the connection; returns when the first byte was sent.
async fn trickle_after(stream: TcpStream, sent: &[u8], trickled: &'static [u8]) -> Instant {
    let (mut read, mut write) = stream.into_split();
    let first_byte = Instant::now();
    write.write_all(sent).await.expect("write");
    let writer = tokio::spawn(async move {
        for byte in trickled.iter().chain([b'a'].iter().cycle()) {
            if write.write_all(&[*byte]).await.is_err() {
                return;
            }
            sleep(Duration::from_millis(200)).await;
        }
    });
    within(5 * SECOND, "trickled connection closed", closed(&mut read)).await;
    writer.abort();
    first_byte
}

#[tokio::test]
async fn trickled_head_is_cut_at_the_header_timeout_while_others_are_served() {
    let server = start(limits(1, 30)).await;
    let trickled = tokio::spawn(trickle_until_closed(connect(&server).await));
    assert_eq!(get_body(&mut connect(&server).await, "/").await, "ok");
    let first_byte = trickled.await.expect("trickle");
    assert_took(first_byte, SECOND * 8 / 10, SECOND * 5 / 2, "cut");
}

#[tokio::test]
async fn header_timeout_counts_from_the_first_byte_of_a_keep_alive_request() {
    let server = start(limits(1, 30)).await;
    let mut stream = connect(&server).await;
    assert_eq!(get_body(&mut stream, "/").await, "ok");
    // Idle for twice the header timeout: hyper's own header timeout would close it here.
    sleep(2 * SECOND).await;
    let first_byte = trickle_until_closed(stream).await;
    assert_took(first_byte, SECOND * 8 / 10, SECOND * 5 / 2, "cut");
}

#[tokio::test]
async fn idle_keep_alive_outlives_the_header_timeout_and_closes_at_the_idle_timeout() {
    let server = start(limits(1, 3)).await;
    let mut stream = connect(&server).await;
    assert_eq!(get_body(&mut stream, "/").await, "ok");
    sleep(2 * SECOND).await;
    assert_eq!(get_body(&mut stream, "/").await, "ok");
    let idle_since = Instant::now();
    within(10 * SECOND, "idle connection closed", closed(&mut stream)).await;
    assert_took(idle_since, SECOND * 25 / 10, 5 * SECOND, "closed");
}

#[tokio::test]
async fn a_request_body_not_in_within_the_header_timeout_is_cut() {
    let mut server = start(limits(1, 30)).await;
    let head = b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n";
    let stream = connect(&server).await;
    let first_byte = trickle_after(stream, head, b"0123456789").await;
    // The handler had the head and was reading the body.
    assert_eq!(server.started.try_recv().ok(), Some("upload"));
    assert_took(first_byte, SECOND * 8 / 10, SECOND * 5 / 2, "cut");
}

#[tokio::test]
async fn a_body_read_late_by_the_server_is_not_cut() {
    let server = start(limits(1, 30)).await;
    let mut stream = connect(&server).await;
    send(
        &mut stream,
        b"POST /late_upload HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\n0123456789",
    )
    .await;
    let body = within(
        5 * SECOND,
        "the late read answered",
        read_response(&mut stream),
    )
    .await;
    assert_eq!(body, "10");
}

/// A server with `PLACES` places and `header_secs` of header timeout, full: a connection in
/// each place, each idle after one request.
async fn full_of_idle_connections<const PLACES: usize>(
    header_secs: u64,
) -> (Server, [TcpStream; PLACES]) {
    let server = start(ServerLimits {
        max_connections: PLACES,
        ..limits(header_secs, 75)
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..PLACES {
        let mut stream = connect(&server).await;
        assert_eq!(get_body(&mut stream, "/").await, "ok");
        idle.push(stream);
    }
    let idle = idle
        .try_into()
        .unwrap_or_else(|_| unreachable!("PLACES connections"));
    (server, idle)
}

#[tokio::test]
async fn at_the_cap_the_next_connection_waits_until_one_closes() {
    let (server, [first, _second]) = full_of_idle_connections::<2>(60).await;

    // The kernel completes the handshake from its backlog; the server must not answer yet.
    let mut third = connect(&server).await;
    send(&mut third, GET).await;
    let early = tokio::time::timeout(SECOND, read_response(&mut third)).await;
    assert!(early.is_err(), "served beyond the cap");
    drop(first);
    let body = within(2 * SECOND, "third served", read_response(&mut third)).await;
    assert_eq!(body, "ok");
}

#[tokio::test]
async fn a_waiting_client_takes_the_place_of_one_connection_idle_for_the_header_timeout() {
    // One quick request each, then idle: otherwise they would hold both places for the 75 s
    // idle timeout.
    let (server, [mut first, mut second]) = full_of_idle_connections::<2>(1).await;
    let mut third = connect(&server).await;
    send(&mut third, GET).await;
    let body = within(5 * SECOND, "third served", read_response(&mut third)).await;
    assert_eq!(body, "ok");
    // One place was wanted, so one of the two gave it up; the other is still served.
    let mut kept = 0;
    for stream in [&mut first, &mut second] {
        // A write to a closed connection may still succeed; the read tells.
        let _ = stream.write_all(GET).await;
        let mut chunk = [0u8; 1024];
        let read = tokio::time::timeout(SECOND, stream.read(&mut chunk)).await;
        if matches!(read, Ok(Ok(1..))) {
            kept += 1;
        }
    }
    assert_eq!(kept, 1, "not exactly one connection made room");
}

/// A connection idle past the header timeout is told when a client begins to wait; it does not
/// find out at its next look some time later. (When connections looked every header timeout,
/// this client waited 3.7 s, until the idle one's second look at 8 s.)
#[tokio::test]
async fn a_client_that_begins_to_wait_is_served_without_waiting_for_a_look() {
    let (server, [_idle]) = full_of_idle_connections::<1>(4).await;
    // Past the idle connection's first offer (at 4 s, with no one waiting).
    tokio::time::sleep(SECOND * 43 / 10).await;
    let mut late = connect(&server).await;
    send(&mut late, GET).await;
    let body = within(
        2 * SECOND,
        "the late client served",
        read_response(&mut late),
    )
    .await;
    assert_eq!(body, "ok");
}

#[tokio::test]
async fn at_the_cap_with_no_client_waiting_idle_connections_are_kept() {
    let (_server, [mut first, mut second]) = full_of_idle_connections::<2>(1).await;
    // Idle for more than twice the header timeout with every place taken and no one waiting.
    let early = tokio::time::timeout(SECOND * 5 / 2, closed(&mut first)).await;
    assert!(
        early.is_err(),
        "an idle connection was closed with no one waiting"
    );
    assert_eq!(get_body(&mut first, "/").await, "ok");
    assert_eq!(get_body(&mut second, "/").await, "ok");
}

#[tokio::test]
async fn a_client_that_leaves_while_waiting_makes_no_connection_close() {
    let (server, [mut idle]) = full_of_idle_connections::<1>(1).await;
    // A port scan: connects at the cap, and leaves without a word.
    drop(connect(&server).await);
    let early = tokio::time::timeout(SECOND * 5 / 2, closed(&mut idle)).await;
    assert!(
        early.is_err(),
        "an idle connection was closed for a client that had left"
    );
    assert_eq!(get_body(&mut idle, "/").await, "ok");
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_cuts_the_rest_at_the_deadline() {
    let grace = 3 * SECOND;
    let mut server = start(limits(5, 75)).await;
    let mut idle = connect(&server).await;
    assert_eq!(get_body(&mut idle, "/").await, "ok");
    let mut slow = connect(&server).await;
    send(&mut slow, b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n").await;
    let mut half_sent = connect(&server).await;
    let head = b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n";
    send(&mut half_sent, &[&head[..], b"0123456789"].concat()).await;
    for _ in 0..2 {
        within(5 * SECOND, "handlers started", server.started.recv()).await;
    }

    let stopped_at = Instant::now();
    server.stop.send(grace).expect("server running");
    within(2 * SECOND, "idle connection closed", closed(&mut idle)).await;
    let body = within(grace, "slow response", read_response(&mut slow)).await;
    assert_eq!(body, "slow done");
    let served = within(grace + 2 * SECOND, "serve returned", server.task).await;
    served.expect("serve task").expect("serve");
    assert_took(stopped_at, grace - SECOND / 5, grace + SECOND, "returned");
    within(SECOND, "half-sent request cut", closed(&mut half_sent)).await;
    let refused = TcpStream::connect(server.addr).await;
    assert!(refused.is_err(), "still accepting");
}

#[tokio::test]
async fn requests_carry_the_peer_address() {
    let server = start(ServerLimits::default()).await;
    let mut stream = connect(&server).await;
    let local = stream.local_addr().expect("address").to_string();
    assert_eq!(get_body(&mut stream, "/peer").await, local);
}
