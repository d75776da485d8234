//! Challenge binding (a stranger's guesses cannot lock the requester out) and resends that never
//! destroy a code that may already be on the user's phone.

use reqwest::StatusCode;
use serde_json::json;
use tests::proxy::TcpProxy;
use tests::servers::servers;

use crate::helpers::{PHONE, Spawn, spawn_app, spawn_with, wrong_code};

/// A well-formed `challenge_id` that no code has.
const MADE_UP_CHALLENGE: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAA";

#[tokio::test]
async fn a_strangers_six_guesses_do_not_lock_out_the_challenge_holder() {
    let app = spawn_app().await;
    let sent = app.code_and_challenge(PHONE).await;
    // A stranger knows the number, not the challenge_id: five wrong guesses, then the budget of
    // unbound guesses is spent, even for the right code.
    for n in 0..5 {
        app.verify(PHONE, &wrong_code(&sent.code, n))
            .await
            .assert_problem(401, "invalid_otp");
    }
    app.verify(PHONE, &wrong_code(&sent.code, 5))
        .await
        .assert_problem(429, "too_many_attempts");
    app.verify(PHONE, &sent.code)
        .await
        .assert_problem(429, "too_many_attempts");

    let session = app
        .verify_bound(PHONE, &sent.code, &sent.challenge_id)
        .await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
    assert_eq!(session.body["user"]["phone_number"], PHONE);
}

#[tokio::test]
async fn signup_takes_the_challenge_id_too() {
    let app = spawn_app().await;
    let sent = app.code_and_challenge(PHONE).await;
    for n in 0..6 {
        let reply = app
            .post(
                "/v1/signup",
                json!({ "phone_number": PHONE, "otp": wrong_code(&sent.code, n) }),
            )
            .await;
        if n < 5 {
            reply.assert_problem(401, "invalid_otp");
        } else {
            reply.assert_problem(429, "too_many_attempts");
        }
    }
    let signup = |challenge_id: &str| {
        app.post(
            "/v1/signup",
            json!({ "phone_number": PHONE, "otp": sent.code, "challenge_id": challenge_id }),
        )
    };
    signup(MADE_UP_CHALLENGE)
        .await
        .assert_problem(401, "invalid_otp");
    let session = signup(&sent.challenge_id).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
    assert_eq!(session.body["new_user"], true);
}

#[tokio::test]
async fn five_wrong_guesses_with_the_challenge_id_burn_the_code_for_everyone() {
    let app = spawn_app().await;
    let sent = app.code_and_challenge(PHONE).await;
    for n in 0..5 {
        app.verify_bound(PHONE, &wrong_code(&sent.code, n), &sent.challenge_id)
            .await
            .assert_problem(401, "invalid_otp");
    }
    app.verify_bound(PHONE, &sent.code, &sent.challenge_id)
        .await
        .assert_problem(429, "too_many_attempts");
    app.verify(PHONE, &sent.code)
        .await
        .assert_problem(429, "too_many_attempts");
}

#[tokio::test]
async fn guesses_with_a_wrong_challenge_id_count_nowhere() {
    // Caps low enough that ten counted guesses would show: per code, per number, per network.
    let app = spawn_with(
        Spawn::default()
            .var("OTP_MAX_ATTEMPTS", 3)
            .var("OTP_VERIFY_FAILS_PER_PHONE_PER_DAY", 3)
            .var("OTP_VERIFY_FAILS_PER_IP_PER_HOUR", 3),
    )
    .await;
    let other = "+14155550101";
    let first = app.code_and_challenge(PHONE).await;
    let second = app.code_and_challenge(other).await;
    // Ten guesses with a made-up challenge_id, one of them with the right code, and the other
    // number's challenge_id: none is checked, so the right code is not accepted either.
    app.verify_bound(PHONE, &first.code, MADE_UP_CHALLENGE)
        .await
        .assert_problem(401, "invalid_otp");
    app.verify_bound(PHONE, &first.code, &second.challenge_id)
        .await
        .assert_problem(401, "invalid_otp");
    for n in 0..10 {
        for phone in [PHONE, other] {
            let code = if phone == PHONE {
                &first.code
            } else {
                &second.code
            };
            app.verify_bound(phone, &wrong_code(code, n), MADE_UP_CHALLENGE)
                .await
                .assert_problem(401, "invalid_otp");
        }
    }
    // Both codes are untouched: the right code works unbound for one, bound for the other.
    let session = app.verify(PHONE, &first.code).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
    let session = app
        .verify_bound(other, &second.code, &second.challenge_id)
        .await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
}

#[tokio::test]
async fn a_stale_challenge_id_is_refused_after_a_resend() {
    let app = spawn_with(Spawn::default().var("OTP_RESEND_SECS", 0)).await;
    let old = app.code_and_challenge(PHONE).await;
    let new = app.code_and_challenge(PHONE).await;
    assert_ne!(old.challenge_id, new.challenge_id);
    app.verify_bound(PHONE, &new.code, &old.challenge_id)
        .await
        .assert_problem(401, "invalid_otp");
    let session = app.verify_bound(PHONE, &new.code, &new.challenge_id).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
}

#[tokio::test]
async fn a_confirmed_resend_replaces_the_previous_code() {
    let app = spawn_with(Spawn::default().var("OTP_RESEND_SECS", 0)).await;
    let a = app.code_and_challenge(PHONE).await;
    let b = app.code_and_challenge(PHONE).await;
    if a.code != b.code {
        app.verify(PHONE, &a.code)
            .await
            .assert_problem(401, "invalid_otp");
        app.verify_bound(PHONE, &a.code, &a.challenge_id)
            .await
            .assert_problem(401, "invalid_otp");
    }
    let session = app.verify_bound(PHONE, &b.code, &b.challenge_id).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
}

#[tokio::test]
async fn a_resend_the_broker_did_not_confirm_leaves_the_delivered_code_working() {
    let (broker, amqp_url) = TcpProxy::in_front_of(&servers().rabbitmq).await;
    let app = spawn_with(
        Spawn::default()
            .var("AMQP_URL", amqp_url)
            .var("OTP_RESEND_SECS", 0),
    )
    .await;
    // Code A is delivered (its event is on the real broker, read past the proxy).
    let a = app.code_and_challenge(PHONE).await;

    broker.go_down();
    let resend = app.request_otp(PHONE).await;
    resend.assert_problem(503, "unavailable");
    assert!(resend.header("retry-after").is_some());

    // The user types the code they have: it still works.
    let session = app.verify_bound(PHONE, &a.code, &a.challenge_id).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
}

#[tokio::test]
async fn a_resend_the_broker_did_not_confirm_leaves_unbound_verification_working() {
    let (broker, amqp_url) = TcpProxy::in_front_of(&servers().rabbitmq).await;
    let app = spawn_with(
        Spawn::default()
            .var("AMQP_URL", amqp_url)
            .var("OTP_RESEND_SECS", 0),
    )
    .await;
    let code = app.code_for(PHONE).await;
    broker.go_down();
    for _ in 0..2 {
        app.request_otp(PHONE)
            .await
            .assert_problem(503, "unavailable");
    }
    let session = app.verify(PHONE, &code).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
}
