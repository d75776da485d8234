//! Send limits that span numbers: per calling code, overall, and the per-country fraud guard; a
//! refused request counts toward nothing.

use std::time::Duration;

use reqwest::StatusCode;
use tests::wait::eventually;
use uuid::Uuid;

use crate::helpers::{Reply, Spawn, TestApp, captured_logs, metric_value, spawn_with};

const UK_MOBILES: [&str; 3] = ["+447911123456", "+447911123457", "+447911123458"];
const US_TRIPS: &str = r#"otp_fraud_guard_trips_total{country="US"}"#;
const JM_TRIPS: &str = r#"otp_fraud_guard_trips_total{country="JM"}"#;

fn us_phone(i: usize) -> String {
    format!("+1415555{:04}", 300 + i)
}

/// Jamaica shares +1 with the United States.
fn jamaican_mobile(i: usize) -> String {
    format!("+1876210{:04}", 100 + i)
}

/// A 429 naming its limit. The per-network, per-country and overall limits are sliding-window
/// counters (the previous fixed window weighted by its overlap), so their `Retry-After` can
/// reach up to two windows.
fn assert_limited(reply: &Reply, detail_mentions: &str, max_retry_after: u64) {
    reply.assert_problem(429, "rate_limited");
    let detail = reply.body["detail"].as_str().expect("a detail");
    assert!(detail.contains(detail_mentions), "{detail}");
    let retry_after: u64 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!(
        (1..=max_retry_after).contains(&retry_after),
        "{retry_after}"
    );
}

async fn accepted(app: &TestApp, phone: &str) {
    let reply = app.request_otp(phone).await;
    assert_eq!(
        reply.status,
        StatusCode::ACCEPTED,
        "{phone}: {}",
        reply.body
    );
}

/// Every Redis key of one number.
async fn keys_of(app: &TestApp, phone: &str) -> Vec<String> {
    let mut redis = app.redis().await;
    redis::cmd("KEYS")
        .arg(format!("{}:otp:{{{phone}}}:*", app.namespace))
        .query_async(&mut redis)
        .await
        .expect("the keys are listed")
}

#[tokio::test]
async fn the_per_country_cap_refuses_only_that_calling_code_and_counts_nothing_refused() {
    let app = spawn_with(
        Spawn::default()
            .var("OTP_PER_COUNTRY_PER_HOUR", 2)
            .var("OTP_PER_IP_PER_HOUR", 4),
    )
    .await;
    accepted(&app, &us_phone(1)).await;
    accepted(&app, &us_phone(2)).await;
    for i in 3..5 {
        assert_limited(&app.request_otp(&us_phone(i)).await, "country", 7200);
        // The refused number's own limits were not touched: no code, no resend gap, no count.
        assert_eq!(keys_of(&app, &us_phone(i)).await, Vec::<String>::new());
    }
    // Nor the network's: of its 4 codes an hour, the refused requests took none.
    accepted(&app, UK_MOBILES[0]).await;
    accepted(&app, UK_MOBILES[1]).await;
    assert_limited(&app.request_otp(UK_MOBILES[2]).await, "network", 7200);
}

#[tokio::test]
async fn the_global_cap_refuses_any_number() {
    let app = spawn_with(Spawn::default().var("OTP_GLOBAL_PER_MINUTE", 2)).await;
    accepted(&app, &us_phone(1)).await;
    accepted(&app, UK_MOBILES[0]).await;
    assert_limited(&app.request_otp(UK_MOBILES[1]).await, "", 120);
    assert_limited(&app.request_otp(&us_phone(2)).await, "", 120);
    assert_eq!(keys_of(&app, UK_MOBILES[1]).await, Vec::<String>::new());
}

/// The guard with a floor of 3 unverified codes and a ratio of 1. A week-long window, so that
/// no window boundary falls inside the test.
fn fraud_guard(mode: &str) -> Spawn {
    Spawn::default()
        .var("OTP_FRAUD_GUARD", mode)
        .var("OTP_FRAUD_GUARD_MIN_UNVERIFIED", 3)
        .var("OTP_FRAUD_GUARD_RATIO", 1)
        .var("OTP_FRAUD_GUARD_WINDOW_SECS", 604_800)
}

/// Waits until `country`'s guard has counted `count` verified codes: a verified code is counted
/// just after the sign-in answers.
async fn verified_codes_counted(app: &TestApp, country: &str, count: u32) {
    let key = format!("{}:limit:guard:{{{country}}}", app.namespace);
    let redis = app.redis().await;
    let what = format!("{count} verified codes counted for {country}");
    eventually(Duration::from_secs(5), &what, || {
        let (key, mut redis) = (key.clone(), redis.clone());
        async move {
            let verified: Option<u32> = redis::cmd("HGET")
                .arg(&key)
                .arg("v")
                .query_async(&mut redis)
                .await
                .ok()?;
            (verified == Some(count)).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn the_fraud_guard_blocks_a_country_whose_codes_go_unverified() {
    let app = spawn_with(fraud_guard("enforce").var("OTP_PER_IP_PER_HOUR", 5)).await;
    // The recorder is shared by the test binary: compare before and after.
    let before = metric_value(&app.metrics().await, US_TRIPS);
    for i in 0..3 {
        accepted(&app, &us_phone(i)).await;
    }
    let refused = app.request_otp(&us_phone(3)).await;
    assert_limited(&refused, "temporarily blocked", 604_800);
    assert_eq!(keys_of(&app, &us_phone(3)).await, Vec::<String>::new());
    // Another country is not affected, and the refused request gave its place in the
    // network's 5 an hour back: two more go through, the third does not.
    accepted(&app, UK_MOBILES[0]).await;
    accepted(&app, UK_MOBILES[1]).await;
    assert_limited(&app.request_otp(UK_MOBILES[2]).await, "network", 7200);
    let after = metric_value(&app.metrics().await, US_TRIPS);
    assert!(after >= before + 1.0, "{US_TRIPS}: {before} then {after}");
    // The api notes the settings it runs, for the workers to compare theirs with.
    let key = format!("{}:fraud_guard:{{settings}}", app.namespace);
    let noted = eventually(Duration::from_secs(5), "the api's note", || async {
        let noted: Vec<String> = redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async(&mut app.redis().await)
            .await
            .expect("ZRANGE");
        (noted.len() == 1).then(|| noted[0].clone())
    })
    .await;
    assert!(noted.starts_with("enforce ("), "{noted}");
}

#[tokio::test]
async fn in_monitor_mode_the_fraud_guard_counts_and_warns_but_sends() {
    let app = spawn_with(fraud_guard("monitor")).await;
    let before = metric_value(&app.metrics().await, US_TRIPS);
    for i in 0..3 {
        accepted(&app, &us_phone(i)).await;
    }
    let request_id = format!("guard-{}", Uuid::new_v4().simple());
    let tripped = app
        .send(
            app.client
                .post(app.url("/v1/otp"))
                .header("x-request-id", &request_id)
                .json(&serde_json::json!({ "phone_number": us_phone(3) })),
        )
        .await;
    assert_eq!(tripped.status, StatusCode::ACCEPTED, "{}", tripped.body);
    accepted(&app, &us_phone(4)).await;
    let after = metric_value(&app.metrics().await, US_TRIPS);
    assert!(after >= before + 2.0, "{US_TRIPS}: {before} then {after}");
    let warning = captured_logs()
        .lines()
        .find(|line| line.contains(&request_id) && line.contains("fraud guard tripped"))
        .map(str::to_owned);
    assert!(
        warning.as_deref().is_some_and(|l| l.contains("WARN")),
        "a warning for request {request_id}: {warning:?}"
    );
}

#[tokio::test]
async fn verified_codes_keep_the_fraud_guard_from_tripping() {
    let app = spawn_with(fraud_guard("enforce")).await;
    for i in 0..3 {
        app.sign_in(&us_phone(i)).await;
    }
    verified_codes_counted(&app, "US", 3).await;
    // 3 sent, 3 verified: three more unverified codes are still below max(3, 1 × 3).
    for i in 3..6 {
        accepted(&app, &us_phone(i)).await;
    }
    assert_limited(
        &app.request_otp(&us_phone(6)).await,
        "temporarily blocked",
        604_800,
    );
}

/// Countries sharing a calling code are guarded apart. Jamaica's numbers, a classic target of SMS
/// pumping, share +1 with the United States: counted together, the US's verified codes would let
/// Jamaica's unverified ones through, and a tripped Jamaica would hold the US's sign-ins.
#[tokio::test]
async fn countries_sharing_a_calling_code_are_guarded_apart() {
    let app = spawn_with(fraud_guard("enforce").var("OTP_PER_IP_PER_HOUR", 50)).await;
    let before = metric_value(&app.metrics().await, JM_TRIPS);
    for i in 0..4 {
        app.sign_in(&us_phone(i)).await;
    }
    verified_codes_counted(&app, "US", 4).await;
    // The US's 4 verified codes do not cover Jamaica's unverified ones.
    for i in 0..3 {
        accepted(&app, &jamaican_mobile(i)).await;
    }
    assert_limited(
        &app.request_otp(&jamaican_mobile(3)).await,
        "temporarily blocked",
        604_800,
    );
    // Nor does a tripped Jamaica hold the US.
    accepted(&app, &us_phone(4)).await;
    let after = metric_value(&app.metrics().await, JM_TRIPS);
    assert!(after >= before + 1.0, "{JM_TRIPS}: {before} then {after}");
}
