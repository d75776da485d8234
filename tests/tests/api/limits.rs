//! Attempts, resend gap, hourly caps, and their atomicity under concurrency.

use futures_util::future::join_all;
use reqwest::StatusCode;

use crate::helpers::{PHONE, Spawn, count, spawn_app, spawn_with};

#[tokio::test]
async fn five_wrong_guesses_burn_the_code() {
    let app = spawn_app().await;
    let code = app.code_for(PHONE).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for _ in 0..5 {
        app.verify(PHONE, wrong)
            .await
            .assert_problem(401, "invalid_otp");
    }
    app.verify(PHONE, &code)
        .await
        .assert_problem(429, "too_many_attempts");
    app.verify(PHONE, wrong)
        .await
        .assert_problem(429, "too_many_attempts");
}

#[tokio::test]
async fn a_new_code_resets_the_attempts() {
    let app = spawn_with(
        Spawn::default()
            .var("OTP_RESEND_SECS", 0)
            .var("OTP_MAX_ATTEMPTS", 2),
    )
    .await;
    let first = app.code_for(PHONE).await;
    let wrong = if first == "000000" {
        "111111"
    } else {
        "000000"
    };
    app.verify(PHONE, wrong)
        .await
        .assert_problem(401, "invalid_otp");
    app.verify(PHONE, wrong)
        .await
        .assert_problem(401, "invalid_otp");
    app.verify(PHONE, &first)
        .await
        .assert_problem(429, "too_many_attempts");
    let second = app.code_for(PHONE).await;
    // The first code is gone; the second works.
    if first != second {
        app.verify(PHONE, &first)
            .await
            .assert_problem(401, "invalid_otp");
    }
    assert_eq!(app.verify(PHONE, &second).await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_resend_gap_answers_429_with_retry_after() {
    let app = spawn_app().await;
    assert_eq!(app.request_otp(PHONE).await.status, StatusCode::ACCEPTED);
    let refused = app.request_otp(PHONE).await;
    refused.assert_problem(429, "rate_limited");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
    // The detail says which limit, and when to come back.
    let detail = refused.body["detail"].as_str().unwrap();
    assert!(detail.contains("OTP_RESEND_SECS"), "{detail}");
    assert!(
        detail.contains(&format!("retry in {retry_after} s")),
        "{detail}"
    );
    // Another phone is not affected.
    assert_eq!(
        app.request_otp("+14155550101").await.status,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn the_hourly_cap_per_phone_counts_only_sent_codes() {
    let app = spawn_with(
        Spawn::default()
            .var("OTP_RESEND_SECS", 0)
            .var("OTP_PER_PHONE_PER_HOUR", 3),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(app.request_otp(PHONE).await.status, StatusCode::ACCEPTED);
    }
    for _ in 0..3 {
        let refused = app.request_otp(PHONE).await;
        refused.assert_problem(429, "rate_limited");
        let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
        assert!(
            (3500..=3600).contains(&retry_after),
            "Retry-After {retry_after}"
        );
    }
}

#[tokio::test]
async fn the_hourly_cap_per_ip_spans_phones() {
    let app = spawn_with(Spawn::default().var("OTP_PER_IP_PER_HOUR", 2)).await;
    assert_eq!(
        app.request_otp("+14155550101").await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        app.request_otp("+14155550102").await.status,
        StatusCode::ACCEPTED
    );
    let refused = app.request_otp("+14155550103").await;
    refused.assert_problem(429, "rate_limited");
    assert!(refused.header("retry-after").is_some());
}

#[tokio::test]
async fn trusted_proxies_rate_limit_by_forwarded_address() {
    let app = spawn_with(
        Spawn::default()
            .var("OTP_PER_IP_PER_HOUR", 1)
            .var("TRUST_PROXY", true),
    )
    .await;
    let from = |ip: &'static str, phone: &'static str| {
        app.client
            .post(app.url("/v1/otp"))
            .header("x-forwarded-for", ip)
            .json(&serde_json::json!({ "phone_number": phone }))
    };
    assert_eq!(
        app.send(from("203.0.113.1", "+14155550101")).await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        app.send(from("203.0.113.2", "+14155550102")).await.status,
        StatusCode::ACCEPTED
    );
    app.send(from("203.0.113.1", "+14155550103"))
        .await
        .assert_problem(429, "rate_limited");
    // The client's own claims to the left of the proxy's entry are ignored.
    app.send(from("198.51.100.7, 203.0.113.2", "+14155550104"))
        .await
        .assert_problem(429, "rate_limited");
}

#[tokio::test]
async fn thirty_simultaneous_requests_for_one_phone_give_one_202() {
    let app = spawn_app().await;
    let replies = join_all((0..30).map(|_| app.request_otp(PHONE))).await;
    let accepted = count(&replies, StatusCode::ACCEPTED);
    let limited = count(&replies, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((accepted, limited), (1, 29));
}

#[tokio::test]
async fn thirty_simultaneous_wrong_guesses_give_at_most_five_401s() {
    let app = spawn_app().await;
    let code = app.code_for(PHONE).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let replies = join_all((0..30).map(|_| app.verify(PHONE, wrong))).await;
    let invalid = count(&replies, StatusCode::UNAUTHORIZED);
    let burned = count(&replies, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((invalid, burned), (5, 25));
    app.verify(PHONE, &code)
        .await
        .assert_problem(429, "too_many_attempts");
}

#[tokio::test]
async fn two_simultaneous_right_guesses_give_one_session() {
    let app = spawn_app().await;
    for round in 0..3 {
        let phone = format!("+1415555011{round}");
        let code = app.code_for(&phone).await;
        let replies = join_all((0..2).map(|_| app.verify(&phone, &code))).await;
        let ok = count(&replies, StatusCode::OK);
        let refused = count(&replies, StatusCode::UNAUTHORIZED);
        assert_eq!((ok, refused), (1, 1), "round {round}");
    }
    let db = app.db().await;
    let (users, tokens): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM tokens)")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!((users, tokens), (3, 6));
}
