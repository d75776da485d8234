//! Which numbers get codes: mobiles by default; premium-rate, satellite and landline numbers,
//! where SMS pumping sends codes, are refused.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Spawn, spawn_app, spawn_with};

/// US premium rate, Iridium (satellite), UK premium rate, UK landline.
const REFUSED: [&str; 4] = [
    "+19002345678",
    "+881631234567",
    "+449098790123",
    "+442079460000",
];

#[tokio::test]
async fn premium_satellite_and_landline_numbers_get_no_code() {
    let app = spawn_app().await;
    for phone in REFUSED {
        app.request_otp(phone)
            .await
            .assert_problem(422, "number_type_not_allowed");
        app.post("/v1/signup", json!({ "phone_number": phone }))
            .await
            .assert_problem(422, "number_type_not_allowed");
        app.verify(phone, "123456")
            .await
            .assert_problem(422, "number_type_not_allowed");
    }
    for phone in ["+447911123456", "+14155550100"] {
        let reply = app.request_otp(phone).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "{phone}: {}",
            reply.body
        );
    }
}

#[tokio::test]
async fn allowed_number_types_are_configurable() {
    let app = spawn_with(Spawn::default().var(
        "OTP_ALLOWED_NUMBER_TYPES",
        "mobile,fixed_line_or_mobile,premium_rate",
    ))
    .await;
    let reply = app.request_otp("+19002345678").await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.body["phone_number"], "+19002345678");
    // Satellite numbers are not premium_rate: still refused.
    app.request_otp("+881631234567")
        .await
        .assert_problem(422, "number_type_not_allowed");
}
