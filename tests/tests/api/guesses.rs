//! Limits beyond one code's own budget: wrong guesses per client network per hour and per
//! number per day, and codes per number per day.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use tests::wait::eventually;

use crate::helpers::{PHONE, Reply, Spawn, TestApp, count, spawn_with, wrong_code};

/// `Retry-After` of a 429, in seconds.
fn retry_after(reply: &Reply) -> u64 {
    reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After on {}", reply.body))
}

fn phones(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("+1415555{:04}", 200 + i))
        .collect()
}

/// Waits until no wrong-guess slot of 127.0.0.1 is taken: a right guess gives its slot back
/// after the answer.
async fn wait_for_no_taken_fail_slots(app: &TestApp) {
    let key = format!("{}:limit:ip:{{127.0.0.1}}:fails", app.namespace);
    let redis = app.redis().await;
    eventually(Duration::from_secs(5), "the slots to be given back", || {
        let (key, mut redis) = (key.clone(), redis.clone());
        async move {
            let taken: Option<u32> = redis::cmd("HGET")
                .arg(&key)
                .arg("c")
                .query_async(&mut redis)
                .await
                .ok()?;
            (taken.unwrap_or(0) == 0).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn wrong_guesses_across_numbers_from_one_network_hit_the_hourly_cap() {
    let app = spawn_with(
        Spawn::default()
            .var("OTP_VERIFY_FAILS_PER_IP_PER_HOUR", 3)
            .var("TRUST_PROXY", 1),
    )
    .await;
    let phones = phones(4);
    let mut codes = Vec::new();
    for phone in &phones {
        codes.push(app.code_for(phone).await);
    }
    let guess = |from: &'static str, phone: &str, otp: &str| {
        app.post_forwarded(
            "/v1/otp/verify",
            from,
            json!({ "phone_number": phone, "otp": otp }),
        )
    };
    let attacker = "203.0.113.66";
    for i in 0..3 {
        guess(attacker, &phones[i], &wrong_code(&codes[i], 0))
            .await
            .assert_problem(401, "invalid_otp");
    }
    // Past the cap every verify from that network is refused, the right code for another
    // number included; the code is not checked, so it is not consumed.
    let refused = guess(attacker, &phones[3], &codes[3]).await;
    refused.assert_problem(429, "rate_limited");
    // A sliding-window counter: up to two windows.
    assert!((1..=7200).contains(&retry_after(&refused)));
    guess(attacker, &phones[0], &wrong_code(&codes[0], 1))
        .await
        .assert_problem(429, "rate_limited");
    // Another network is not affected, and the refused code still works there.
    let session = guess("198.51.100.8", &phones[3], &codes[3]).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
}

/// Strangers behind the user's address (a carrier's NAT) spend its wrong-guess budget: the user
/// holding the code's challenge_id still signs in, while guesses without one stay refused.
#[tokio::test]
async fn a_network_past_its_budget_still_checks_guesses_that_name_their_challenge() {
    let app = spawn_with(
        Spawn::default()
            .var("OTP_VERIFY_FAILS_PER_IP_PER_HOUR", 3)
            .var("OTP_MAX_ATTEMPTS", 2)
            .var("TRUST_PROXY", 1),
    )
    .await;
    let phones = phones(5);
    let shared_address = "203.0.113.77";
    let verify_from =
        |body: serde_json::Value| app.post_forwarded("/v1/otp/verify", shared_address, body);
    let mut codes = Vec::new();
    for phone in &phones[..3] {
        codes.push(app.code_for(phone).await);
    }
    for (phone, code) in phones.iter().zip(&codes) {
        verify_from(json!({ "phone_number": phone, "otp": wrong_code(code, 0) }))
            .await
            .assert_problem(401, "invalid_otp");
    }
    let unbound = app.code_for(&phones[3]).await;
    verify_from(json!({ "phone_number": phones[3], "otp": unbound }))
        .await
        .assert_problem(429, "rate_limited");

    let user = app.code_and_challenge(&phones[4]).await;
    let bound = |otp: String| json!({ "phone_number": phones[4], "otp": otp, "challenge_id": user.challenge_id });
    // Checked, and counted against the code's own attempts (two).
    verify_from(bound(wrong_code(&user.code, 0)))
        .await
        .assert_problem(401, "invalid_otp");
    let session = verify_from(bound(user.code.clone())).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
}

#[tokio::test]
async fn right_guesses_do_not_count_toward_the_network_cap() {
    let app = spawn_with(Spawn::default().var("OTP_VERIFY_FAILS_PER_IP_PER_HOUR", 3)).await;
    let phones = phones(5);
    for phone in &phones[..4] {
        app.sign_in(phone).await;
    }
    wait_for_no_taken_fail_slots(&app).await;
    let code = app.code_for(&phones[4]).await;
    for n in 0..3 {
        app.verify(&phones[4], &wrong_code(&code, n))
            .await
            .assert_problem(401, "invalid_otp");
    }
    app.verify(&phones[4], &wrong_code(&code, 3))
        .await
        .assert_problem(429, "rate_limited");
}

#[tokio::test]
async fn twenty_simultaneous_wrong_guesses_from_one_network_give_three_401s() {
    let app = spawn_with(Spawn::default().var("OTP_VERIFY_FAILS_PER_IP_PER_HOUR", 3)).await;
    let phones = phones(20);
    let mut codes = Vec::new();
    for phone in &phones {
        codes.push(app.code_for(phone).await);
    }
    let wrong: Vec<String> = codes.iter().map(|code| wrong_code(code, 0)).collect();
    let replies = join_all(
        phones
            .iter()
            .zip(&wrong)
            .map(|(phone, guess)| app.verify(phone, guess)),
    )
    .await;
    let invalid = count(&replies, StatusCode::UNAUTHORIZED);
    let limited = count(&replies, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((invalid, limited), (3, 17));
    for reply in replies
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
    {
        reply.assert_problem(429, "rate_limited");
    }
}

#[tokio::test]
async fn a_numbers_daily_wrong_guess_tally_closes_only_unbound_verification() {
    let app = spawn_with(
        Spawn::default()
            .var("OTP_VERIFY_FAILS_PER_PHONE_PER_DAY", 4)
            .var("OTP_MAX_ATTEMPTS", 100)
            .var("OTP_RESEND_SECS", 0)
            .var("OTP_PER_PHONE_PER_HOUR", 100),
    )
    .await;
    // Wrong guesses of both kinds, over two codes, all count in the number's tally.
    let first = app.code_and_challenge(PHONE).await;
    app.verify(PHONE, &wrong_code(&first.code, 0))
        .await
        .assert_problem(401, "invalid_otp");
    app.verify_bound(PHONE, &wrong_code(&first.code, 1), &first.challenge_id)
        .await
        .assert_problem(401, "invalid_otp");
    let second = app.code_and_challenge(PHONE).await;
    for n in 2..4 {
        app.verify(PHONE, &wrong_code(&second.code, n))
            .await
            .assert_problem(401, "invalid_otp");
    }

    let refused = app.verify(PHONE, &wrong_code(&second.code, 4)).await;
    refused.assert_problem(429, "rate_limited");
    assert!((86_000..=86_400).contains(&retry_after(&refused)));
    app.verify(PHONE, &second.code)
        .await
        .assert_problem(429, "rate_limited");
    // The owner, with the challenge_id, still signs in.
    let session = app
        .verify_bound(PHONE, &second.code, &second.challenge_id)
        .await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
    // No code is live now, and an unbound guess answers as it did while one was: the answer
    // does not tell a stranger whether the number is signing in.
    app.verify(PHONE, &second.code)
        .await
        .assert_problem(429, "rate_limited");
}

/// Twenty simultaneous unbound guesses for one number whose daily tally is 4: four are checked.
async fn simultaneous_guesses_fill_the_numbers_daily_tally(distinct: bool) {
    let app = spawn_with(
        Spawn::default()
            .var("OTP_VERIFY_FAILS_PER_PHONE_PER_DAY", 4)
            .var("OTP_MAX_ATTEMPTS", 100),
    )
    .await;
    let code = app.code_for(PHONE).await;
    let guesses: Vec<String> = (0..20)
        .map(|n| wrong_code(&code, if distinct { n } else { 0 }))
        .collect();
    let replies = join_all(guesses.iter().map(|guess| app.verify(PHONE, guess))).await;
    let invalid = count(&replies, StatusCode::UNAUTHORIZED);
    let limited = count(&replies, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((invalid, limited), (4, 16));
}

#[tokio::test]
async fn simultaneous_distinct_wrong_guesses_all_count_in_the_numbers_daily_tally() {
    simultaneous_guesses_fill_the_numbers_daily_tally(true).await;
}

#[tokio::test]
async fn simultaneous_identical_wrong_guesses_all_count_in_the_numbers_daily_tally() {
    simultaneous_guesses_fill_the_numbers_daily_tally(false).await;
}

#[tokio::test]
async fn the_eleventh_code_for_a_number_in_a_day_is_refused() {
    let app = spawn_with(
        Spawn::default()
            .var("OTP_RESEND_SECS", 0)
            .var("OTP_PER_PHONE_PER_HOUR", 100),
    )
    .await;
    for _ in 0..10 {
        let reply = app.request_otp(PHONE).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    }
    let refused = app.request_otp(PHONE).await;
    refused.assert_problem(429, "rate_limited");
    let detail = refused.body["detail"].as_str().unwrap();
    assert!(detail.contains("day"), "{detail}");
    assert!((86_000..=86_400).contains(&retry_after(&refused)));
    assert_eq!(
        app.request_otp("+14155550101").await.status,
        StatusCode::ACCEPTED
    );
}
