//! The sign-in flow end to end, as a client and the sms-worker see it.

use reqwest::StatusCode;
use serde_json::json;
use sha2::{Digest, Sha256};
use shared::amqp::headers::header_str;
use tests::wait::eventually;

use crate::helpers::{PHONE, Spawn, spawn_app, spawn_with};

#[tokio::test]
async fn request_publish_verify_and_me() {
    let app = spawn_app().await;
    let sent = app
        .send(
            app.client
                .post(app.url("/v1/otp"))
                .header("x-request-id", "flow-test-request-1")
                .json(&json!({ "phone_number": PHONE })),
        )
        .await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{}", sent.body);
    assert_eq!(sent.header("x-request-id"), Some("flow-test-request-1"));
    let challenge_id = sent.body["challenge_id"].as_str().unwrap_or_default();
    assert_eq!(challenge_id.len(), 26, "{}", sent.body);
    assert_eq!(
        sent.body,
        json!({"phone_number": PHONE, "expires_in": 300, "resend_after": 30, "challenge_id": challenge_id})
    );

    // The event as the sms-worker receives it.
    let (event, delivery) = app.next_delivery(PHONE).await;
    assert_eq!(event.version, 1);
    assert_eq!(event.request_id, "flow-test-request-1");
    let code = event.otp.clone().expect("code in the event");
    assert_eq!(code.len(), 6);
    let properties = &delivery.properties;
    assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        properties.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(
        properties.kind().as_ref().map(|s| s.as_str()),
        Some("OtpRequested")
    );
    assert_eq!(
        properties.message_id().as_ref().map(|s| s.to_string()),
        Some(event.event_id.to_string())
    );
    let expiration: u64 = properties
        .expiration()
        .as_ref()
        .unwrap()
        .as_str()
        .parse()
        .unwrap();
    assert!(
        (290_000..=300_000).contains(&expiration),
        "expiration {expiration}"
    );
    assert_eq!(
        header_str(properties.headers().as_ref(), "x-request-id").as_deref(),
        Some("flow-test-request-1"),
        "x-request-id is a string header"
    );
    assert_eq!(delivery.routing_key.as_str(), "otp.requested");
    let left = event.expires_at - event.requested_at;
    assert_eq!(left.whole_seconds(), 300);

    let session = app.verify(PHONE, &code).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
    let body = &session.body;
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 86_400);
    assert_eq!(body["refresh_expires_in"], 2_592_000);
    assert_eq!(body["new_user"], true);
    assert_eq!(body["user"]["phone_number"], PHONE);
    let access = body["access_token"].as_str().unwrap();
    let refresh = body["refresh_token"].as_str().unwrap();
    assert_eq!(access.len(), 26);
    assert_eq!(refresh.len(), 26);
    assert_ne!(access, refresh);

    let me = app.get_authed("/v1/me", access).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert_eq!(me.body["phone_number"], PHONE);
    assert_eq!(me.body["id"], body["user"]["id"]);
    assert!(me.body["created_at"].as_str().unwrap().contains('T'));

    // A second sign-in finds the same user.
    let again = app.sign_in_again(PHONE).await;
    assert_eq!(again["new_user"], false);
    assert_eq!(again["user"]["id"], body["user"]["id"]);
}

#[tokio::test]
async fn an_otp_works_once() {
    let app = spawn_app().await;
    let code = app.code_for(PHONE).await;
    assert_eq!(app.verify(PHONE, &code).await.status, StatusCode::OK);
    app.verify(PHONE, &code)
        .await
        .assert_problem(401, "invalid_otp");
}

#[tokio::test]
async fn a_code_never_requested_or_for_another_phone_is_refused() {
    let app = spawn_app().await;
    app.verify(PHONE, "123456")
        .await
        .assert_problem(401, "invalid_otp");
    let code = app.code_for(PHONE).await;
    app.verify("+14155550101", &code)
        .await
        .assert_problem(401, "invalid_otp");
    assert_eq!(app.verify(PHONE, &code).await.status, StatusCode::OK);
}

#[tokio::test]
async fn an_expired_otp_is_refused() {
    let app = spawn_with(Spawn::default().var("OTP_TTL_SECS", 1)).await;
    let code = app.code_for(PHONE).await;
    let redis = app.redis().await;
    let key = format!("{}:otp:{{{PHONE}}}:code", app.namespace);
    eventually(
        std::time::Duration::from_secs(5),
        "the OTP to expire",
        || {
            let key = key.clone();
            let mut redis = redis.clone();
            async move {
                let exists: bool = redis::cmd("EXISTS")
                    .arg(key)
                    .query_async(&mut redis)
                    .await
                    .ok()?;
                (!exists).then_some(())
            }
        },
    )
    .await;
    app.verify(PHONE, &code)
        .await
        .assert_problem(401, "invalid_otp");
}

#[tokio::test]
async fn national_numbers_use_the_default_region() {
    let app = spawn_with(Spawn::default().var("DEFAULT_REGION", "IN")).await;
    let reply = app.request_otp("98765 43210").await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.body["phone_number"], "+919876543210");
    let (event, _) = app.next_delivery("+919876543210").await;
    let session = app
        .verify("9876543210", event.otp.as_deref().unwrap())
        .await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
    assert_eq!(session.body["user"]["phone_number"], "+919876543210");
}

#[tokio::test]
async fn signup_is_request_without_otp_and_verify_with_it() {
    let app = spawn_app().await;
    let sent = app
        .post("/v1/signup", json!({ "phone_number": PHONE }))
        .await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{}", sent.body);
    assert_eq!(sent.body["phone_number"], PHONE);
    let (event, _) = app.next_delivery(PHONE).await;
    let wrong = app
        .post("/v1/signup", json!({ "phone_number": PHONE, "otp": "abc" }))
        .await;
    wrong.assert_problem(422, "invalid_otp_format");
    let session = app
        .post(
            "/v1/signup",
            json!({ "phone_number": PHONE, "otp": event.otp.unwrap() }),
        )
        .await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
    assert_eq!(session.body["new_user"], true);
}

#[tokio::test]
async fn tokens_are_stored_only_as_sha256() {
    let app = spawn_app().await;
    let session = app.sign_in(PHONE).await;
    let access = session["access_token"].as_str().unwrap();
    let refresh = session["refresh_token"].as_str().unwrap();
    let db = app.db().await;
    let rows: Vec<(Vec<u8>, String)> =
        sqlx::query_as("SELECT hash, scope FROM tokens ORDER BY scope")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2);
    let access_hash = Sha256::digest(access.as_bytes()).to_vec();
    let refresh_hash = Sha256::digest(refresh.as_bytes()).to_vec();
    assert_eq!(rows[0], (access_hash, "authentication".to_owned()));
    assert_eq!(rows[1], (refresh_hash, "refresh".to_owned()));
    // No column of any table holds the plaintext.
    let dump: String = sqlx::query_scalar(
        "SELECT coalesce(string_agg(t::text, ' '), '') FROM (SELECT * FROM tokens) t",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(!dump.contains(access) && !dump.contains(refresh));
    assert!(!dump.to_lowercase().contains(&access.to_lowercase()));
}

#[tokio::test]
async fn logs_never_hold_a_code_a_token_or_a_full_number() {
    let phone = "+14155550142";
    let app = spawn_with(Spawn::default().var("OTP_LENGTH", 10)).await;
    let code = app.code_for(phone).await;
    app.verify(phone, "0000000000")
        .await
        .assert_problem(401, "invalid_otp");
    let session = app.verify(phone, &code).await;
    assert_eq!(session.status, StatusCode::OK);
    let access = session.body["access_token"].as_str().unwrap().to_owned();
    let refresh = session.body["refresh_token"].as_str().unwrap().to_owned();
    let me = app.get_authed("/v1/me", &access).await;
    assert_eq!(me.status, StatusCode::OK);
    let rotated = app
        .post("/v1/token/refresh", json!({ "refresh_token": refresh }))
        .await;
    assert_eq!(rotated.status, StatusCode::OK);

    let logs = crate::helpers::captured_logs();
    assert!(logs.contains("+1415*****42"), "the masked number is logged");
    for secret in [
        &code,
        &access,
        &refresh,
        &phone.to_owned(),
        &phone[1..].to_owned(),
    ] {
        assert!(!logs.contains(secret.as_str()), "the logs contain {secret}");
    }
}
