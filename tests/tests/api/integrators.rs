//! What integrators ask for: test numbers with fixed codes (app-store review, CI), and the SMS's
//! language from the request.

use reqwest::StatusCode;
use serde_json::json;
use shared::{Env, OtpRequested};

use crate::helpers::{
    Spawn, TestApp, captured_logs, challenge_of, metric_value, spawn_app, spawn_with,
};

const TEST_NUMBER: &str = "+15005550100";

/// Requests a code for `phone` with `body` merged in and `accept_language`, and returns the
/// event the api published.
async fn event_for(
    app: &TestApp,
    phone: &str,
    extra: serde_json::Value,
    accept_language: Option<&str>,
) -> OtpRequested {
    let mut body = json!({ "phone_number": phone });
    body.as_object_mut()
        .expect("an object")
        .extend(extra.as_object().expect("an object").clone());
    let mut request = app.client.post(app.url("/v1/otp")).json(&body);
    if let Some(value) = accept_language {
        request = request.header("accept-language", value);
    }
    let reply = app.send(request).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    app.next_delivery(phone).await.0
}

#[tokio::test]
async fn test_numbers_get_no_sms_and_accept_their_fixed_code() {
    let app = spawn_with(Spawn::default().var(
        "OTP_TEST_NUMBERS",
        "+15005550100=246810, +447700900123=135791",
    ))
    .await;
    // Twilio's magic +1500555… numbers are not valid numbers, yet a test number is accepted.
    let sent = app.request_otp(TEST_NUMBER).await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{}", sent.body);
    let challenge = challenge_of(&sent);

    // No event was published: the next one in the queue is the real number's.
    let real = "+14155550142";
    assert_eq!(app.request_otp(real).await.status, StatusCode::ACCEPTED);
    let (first, _) = app.next_delivery_any().await;
    assert_eq!(
        first.phone_number.as_str(),
        real,
        "the test number got no SMS"
    );

    app.verify_bound(TEST_NUMBER, "999999", &challenge)
        .await
        .assert_problem(401, "invalid_otp");
    let signed_in = app.verify_bound(TEST_NUMBER, "246810", &challenge).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{}", signed_in.body);
    assert_eq!(signed_in.body["user"]["phone_number"], TEST_NUMBER);

    let logs = captured_logs();
    assert!(logs.contains("OTP_TEST_NUMBERS"), "every use is logged");
    // As a token of its own: the logs of every test in this binary are shared, and a
    // timestamp's microseconds (`.246810Z`) or a number's digits may hold the same six.
    let standalone = |line: &str| {
        line.match_indices("246810").any(|(at, code)| {
            let before = line[..at].chars().next_back();
            let after = line[at + code.len()..].chars().next();
            !before.is_some_and(|c| c.is_ascii_alphanumeric())
                && !after.is_some_and(|c| c.is_ascii_alphanumeric())
        })
    };
    let leaked = logs.lines().find(|line| standalone(line));
    assert_eq!(leaked, None, "the fixed code is never logged");
    let metrics = app.metrics().await;
    assert!(metric_value(&metrics, r#"otp_test_number_uses_total{step="request"}"#) >= 1.0);
    assert!(metric_value(&metrics, r#"otp_test_number_uses_total{step="verify"}"#) >= 2.0);
}

#[tokio::test]
async fn bad_test_numbers_stop_the_api_with_one_clear_line() {
    for (value, expected) in [
        ("+15005550100", "expected +NUMBER=CODE"),
        ("15005550100=123456", "not an E.164 number"),
        ("+15005550100=12345", "must be OTP_LENGTH (6) digits"),
        ("+15005550100=12a456", "must be OTP_LENGTH (6) digits"),
    ] {
        let env = Env::from_pairs([("OTP_TEST_NUMBERS", value)]);
        let error = api::ApiConfig::from_env(&env).unwrap_err().to_string();
        assert!(error.contains("OTP_TEST_NUMBERS: "), "{error}");
        assert!(error.contains(expected), "{value}: {error}");
        assert!(!error.contains("5550100"), "the number is masked: {error}");
    }
}

#[tokio::test]
async fn the_sms_language_comes_from_the_request() {
    let app = spawn_app().await;
    let explicit = event_for(&app, "+14155550143", json!({"locale": "pt_br"}), Some("de")).await;
    assert_eq!(explicit.locale.as_deref(), Some("pt-BR"));
    let header = event_for(
        &app,
        "+14155550144",
        json!({}),
        Some("en;q=0.5, es-MX, es;q=0.9"),
    )
    .await;
    assert_eq!(header.locale.as_deref(), Some("es-MX"));
    let neither = event_for(&app, "+14155550145", json!({}), None).await;
    assert_eq!(neither.locale, None);
    // signup sends codes too.
    let signup = app
        .send(
            app.client
                .post(app.url("/v1/signup"))
                .json(&json!({"phone_number": "+14155550146", "locale": "fr"})),
        )
        .await;
    assert_eq!(signup.status, StatusCode::ACCEPTED, "{}", signup.body);
    assert_eq!(
        app.next_delivery("+14155550146").await.0.locale.as_deref(),
        Some("fr")
    );

    let bad = app
        .post(
            "/v1/otp",
            json!({"phone_number": "+14155550147", "locale": "klingon!"}),
        )
        .await;
    bad.assert_problem(400, "invalid_request");
    assert!(
        bad.body["detail"]
            .as_str()
            .unwrap()
            .contains("language tag")
    );
    // A header nobody can read is ignored, not refused.
    let garbled = app
        .send(
            app.client
                .post(app.url("/v1/otp"))
                .header("accept-language", "%%%, ;;;")
                .json(&json!({"phone_number": "+14155550148"})),
        )
        .await;
    assert_eq!(garbled.status, StatusCode::ACCEPTED, "{}", garbled.body);
    assert_eq!(app.next_delivery("+14155550148").await.0.locale, None);
}
