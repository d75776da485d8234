//! What any client can make the api keep, tell or do: metric series, readiness details,
//! database queries, and connections held open by trickling a request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tests::cleanup::{drop_database, unique};
use tests::proxy::TcpProxy;
use tests::servers::{database_url, servers};
use tests::wait::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{Spawn, spawn_app, spawn_with};

/// Sends `request` on a connection of its own and reads the answer until the server closes.
async fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("a connection");
    stream
        .write_all(request)
        .await
        .expect("the request is sent");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .expect("reading the answer");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn made_up_methods_are_counted_as_other() {
    let app = spawn_app().await;
    let long = "A".repeat(8_000);
    for method in [long.as_str(), "FOO"] {
        let request =
            format!("{method} /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        let answer = raw_request(app.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{method:.20}: {answer}");
    }
    let metrics = app.metrics().await;
    assert!(!metrics.contains("AAAAAAAA"), "the long method is a series");
    assert!(!metrics.contains(r#"method="FOO""#), "FOO is a series");
    assert!(
        metrics.contains(r#"http_requests_total{method="other",route="/healthz",status="405"}"#),
        "{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("http_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn readyz_names_what_is_down_but_not_the_error() {
    let (redis, redis_url) = TcpProxy::in_front_of(&servers().redis).await;
    let app = spawn_with(Spawn::default().var("REDIS_URL", redis_url)).await;
    redis.go_down();
    let ready = app.get("/readyz").await;
    ready.assert_problem(503, "unavailable");
    assert!(
        ready.body["detail"].as_str().unwrap().contains("redis"),
        "{}",
        ready.body
    );
    assert_eq!(
        ready.body["checks"],
        json!({"postgres": "up", "redis": "down", "rabbitmq": "up"})
    );
    let text = ready.body.to_string().to_lowercase();
    for leak in [
        "refused",
        "os error",
        "connection",
        "timed out",
        "127.0.0.1",
        "error",
    ] {
        assert!(!text.contains(leak), "{leak} in {text}");
    }
}

#[tokio::test]
async fn a_bearer_token_on_a_public_route_costs_no_database_query() {
    let (postgres, postgres_url) = TcpProxy::in_front_of(&servers().postgres).await;
    let database = unique("otp_test");
    let app =
        spawn_with(Spawn::default().var("DATABASE_URL", database_url(&postgres_url, &database)))
            .await;
    let token = "AAAAAAAAAAAAAAAAAAAAAAAAAA";
    // The app's database is the one behind the proxy, not the one TestApp::db names.
    let db = sqlx::PgPool::connect(&servers().database_url(&database))
        .await
        .unwrap();
    // While the tokens table is locked, a token look-up waits.
    let mut lock = db.begin().await.unwrap();
    sqlx::query("LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let started = Instant::now();
    let health = app
        .client
        .get(app.url("/healthz"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .expect("/healthz answers while the tokens table is locked");
    assert_eq!(health.status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // /v1/me does look the token up: it waits for the lock, then refuses the unknown token.
    let me = app.get_authed("/v1/me", token);
    let release = async {
        eventually(Duration::from_secs(5), "/v1/me to wait for the lock", || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&db)
            .await
            .ok()?;
            (waiting > 0).then_some(())
        })
        .await;
        lock.rollback().await.unwrap();
    };
    let (me, ()) = tokio::join!(me, release);
    me.assert_problem(401, "unauthorized");

    // With PostgreSQL away, the public route is as fast as ever; the protected one cannot check.
    postgres.go_down();
    let started = Instant::now();
    let health = app
        .send(app.client.get(app.url("/healthz")).bearer_auth(token))
        .await;
    assert_eq!(health.status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    app.get_authed("/v1/me", token)
        .await
        .assert_problem(503, "unavailable");
    db.close().await;
    drop(app);
    drop_database(&database).await;
}

#[tokio::test]
async fn a_client_trickling_its_request_head_is_cut_off_while_others_are_served() {
    let app = spawn_with(Spawn::default().var("HTTP_HEADER_TIMEOUT_SECS", 1)).await;
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: test\r\nX-Pad: {}",
        "a".repeat(200)
    );
    let started = Instant::now();
    // One byte every 200 ms: trickling is the point of the test.
    let trickle = tokio::spawn(async move {
        for byte in head.bytes() {
            if writer.write_all(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let closed = async {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink).await;
        started.elapsed()
    };
    let served = async {
        let mut answered = 0;
        while !trickle.is_finished() && answered < 5 {
            assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
            answered += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        answered
    };
    let (closed, answered) =
        tokio::join!(tokio::time::timeout(Duration::from_secs(6), closed), served);
    trickle.abort();
    let closed_after = closed.expect("the trickling connection is closed");
    assert!(
        (Duration::from_millis(800)..Duration::from_secs(3)).contains(&closed_after),
        "closed after {closed_after:?}"
    );
    assert!(answered >= 3, "{answered} requests served meanwhile");
}
