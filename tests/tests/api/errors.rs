//! Every row of SPEC §3's error table, and the ugly inputs.

use axum::Router;
use axum::routing::get;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{PHONE, Spawn, spawn_app, spawn_with};

#[tokio::test]
async fn malformed_bodies_get_400_invalid_request() {
    let app = spawn_app().await;
    let cases = [
        r#"{"phone_number": "+14155550100""#,
        "not json",
        "",
        r#"{"phone_number": 14155550100}"#,
        r#"{"phone_number": null}"#,
        r#"{"phone_number": ["+14155550100"]}"#,
        r#"{}"#,
        r#"[]"#,
        r#""+14155550100""#,
    ];
    for body in cases {
        let reply = app.post_raw("/v1/otp", body).await;
        reply.assert_problem(400, "invalid_request");
    }
    let reply = app
        .post(
            "/v1/otp/verify",
            json!({ "phone_number": PHONE, "otp": 123456 }),
        )
        .await;
    reply.assert_problem(400, "invalid_request");
    let reply = app
        .post("/v1/token/refresh", json!({ "refresh_token": 42 }))
        .await;
    reply.assert_problem(400, "invalid_request");
}

#[tokio::test]
async fn non_json_gets_415() {
    let app = spawn_app().await;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut request = app
            .client
            .post(app.url("/v1/otp"))
            .body(r#"{"phone_number": "+14155550100"}"#);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        app.send(request)
            .await
            .assert_problem(415, "unsupported_media_type");
    }
}

#[tokio::test]
async fn bodies_over_16_kib_get_413() {
    let app = spawn_app().await;
    let huge = format!(r#"{{"phone_number": "{}"}}"#, "1".repeat(17 * 1024));
    let reply = app.post_raw("/v1/otp", huge.clone()).await;
    reply.assert_problem(413, "payload_too_large");
    let detail = reply.body["detail"].as_str().unwrap();
    assert!(detail.contains("16 KiB"), "the limit is stated: {detail}");
    // Without a Content-Length too: a chunked body is cut off at the limit.
    let head = format!(
        "POST /v1/otp/verify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n",
        huge.len()
    );
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(huge.as_bytes()).await;
    let _ = stream.write_all(b"\r\n0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    // Just under the limit is parsed (and refused as a number, not as a size).
    let padded = format!(
        r#"{{"phone_number": "+14155550100", "pad": "{}"}}"#,
        "x".repeat(15 * 1024)
    );
    let reply = app.post_raw("/v1/otp", padded).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
}

#[tokio::test]
async fn bad_numbers_and_codes_get_422() {
    let app = spawn_with(Spawn::default().var("ALLOWED_COUNTRIES", "US,CA")).await;
    for phone in [
        "",
        "hello",
        "+1",
        "+1415555010",
        "4155550100",
        "+99912345678",
        "+1 (415) 555-0100 ext 12345678901234",
    ] {
        app.request_otp(phone)
            .await
            .assert_problem(422, "invalid_phone_number");
    }
    app.request_otp("+919876543210")
        .await
        .assert_problem(422, "country_not_allowed");
    app.request_otp("+447911123456")
        .await
        .assert_problem(422, "country_not_allowed");
    for otp in ["", "12345", "1234567", "12345a", " 12345", "１２３４５６"] {
        app.verify(PHONE, otp)
            .await
            .assert_problem(422, "invalid_otp_format");
    }
    let nope = app.verify("nope", "123456").await;
    nope.assert_problem(422, "invalid_phone_number");
    let detail = nope.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("E.164") && detail.contains("+14155550100"),
        "{detail}"
    );

    // With a DEFAULT_REGION, the hint names it.
    let national = spawn_with(Spawn::default().var("DEFAULT_REGION", "GB")).await;
    let reply = national.request_otp("12").await;
    reply.assert_problem(422, "invalid_phone_number");
    let detail = reply.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("GB number") && detail.contains("E.164"),
        "{detail}"
    );
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods() {
    let app = spawn_app().await;
    app.get("/v1/nothing-here")
        .await
        .assert_problem(404, "not_found");
    app.send(app.client.get(app.url("/v1/otp")))
        .await
        .assert_problem(405, "method_not_allowed");
    app.send(app.client.delete(app.url("/v1/me")))
        .await
        .assert_problem(405, "method_not_allowed");
    app.send(app.client.post(app.url("/healthz")))
        .await
        .assert_problem(405, "method_not_allowed");
}

#[tokio::test]
async fn protected_routes_need_a_valid_bearer_token() {
    let app = spawn_app().await;
    let attempts = [
        app.client.get(app.url("/v1/me")),
        app.client
            .get(app.url("/v1/me"))
            .header("authorization", "Bearer"),
        app.client
            .get(app.url("/v1/me"))
            .header("authorization", "Basic dXNlcjpwYXNz"),
        app.client.get(app.url("/v1/me")).bearer_auth("short"),
        app.client
            .get(app.url("/v1/me"))
            .bearer_auth("AAAAAAAAAAAAAAAAAAAAAAAAAA"),
        app.client.post(app.url("/v1/logout")),
    ];
    for request in attempts {
        let reply = app.send(request).await;
        reply.assert_problem(401, "unauthorized");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
    // A bad token on a public route does not get in the way.
    let reply = app
        .send(
            app.client
                .get(app.url("/healthz"))
                .bearer_auth("AAAAAAAAAAAAAAAAAAAAAAAAAA"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let app = spawn_app().await;
    let reply = app
        .send(
            app.client
                .get(app.url("/healthz"))
                .header("x-request-id", "abc-123"),
        )
        .await;
    assert_eq!(reply.header("x-request-id"), Some("abc-123"));
    let generated = app.get("/healthz").await;
    let id = generated
        .header("x-request-id")
        .expect("generated id")
        .to_owned();
    assert!(id.len() >= 16);
    assert_ne!(
        app.get("/healthz").await.header("x-request-id"),
        Some(id.as_str())
    );
    // An absurd id is replaced, not echoed.
    let long = "x".repeat(500);
    let reply = app
        .send(
            app.client
                .get(app.url("/healthz"))
                .header("x-request-id", long.as_str()),
        )
        .await;
    assert_ne!(reply.header("x-request-id"), Some(long.as_str()));
}

#[tokio::test]
async fn a_panic_answers_500_and_the_server_keeps_serving() {
    async fn boom() -> &'static str {
        panic!("deliberate test panic")
    }
    let extra = Router::new().route("/test/panic", get(boom));
    let app = spawn_with(Spawn {
        extra_routes: Some(extra),
        ..Spawn::default()
    })
    .await;
    let reply = app.get("/test/panic").await;
    reply.assert_problem(500, "internal");
    assert!(
        !reply.body.to_string().contains("deliberate"),
        "no details leak to the client"
    );
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(app.request_otp(PHONE).await.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn operational_endpoints() {
    let app = spawn_app().await;
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(
        ready.body["checks"],
        json!({"postgres": "up", "redis": "up", "rabbitmq": "up"})
    );
    assert_eq!(app.request_otp(PHONE).await.status, StatusCode::ACCEPTED);
    let metrics = app.send(app.client.get(app.url("/metrics"))).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.body.as_str().expect("text");
    assert!(text.contains("http_requests_total"), "{text}");
    assert!(text.contains("otp_requests_total"), "{text}");
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().unwrap_or_default();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP:\n{text}"
        );
    }

    let doc = app.get("/openapi.json").await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/otp",
        "/v1/otp/verify",
        "/v1/signup",
        "/v1/token/refresh",
        "/v1/logout",
        "/v1/me",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(doc.body["paths"][path].is_object(), "{path} is documented");
    }
}
