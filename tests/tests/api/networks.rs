//! Who the client is: `X-Forwarded-For` read only as far as trusted proxies wrote it, and IPv6
//! clients limited per /64.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Reply, Spawn, TestApp, spawn_with};

fn phone(i: usize) -> String {
    format!("+1415555{:04}", 500 + i)
}

/// An OTP request for a fresh number, as forwarded by a proxy.
async fn request_via(app: &TestApp, forwarded_for: &str, i: usize) -> Reply {
    app.post_forwarded(
        "/v1/otp",
        forwarded_for,
        json!({ "phone_number": phone(i) }),
    )
    .await
}

fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.status.as_u16()).collect()
}

#[tokio::test]
async fn ipv6_clients_are_limited_per_64() {
    let app = spawn_with(
        Spawn::default()
            .var("TRUST_PROXY", 1)
            .var("OTP_PER_IP_PER_HOUR", 2),
    )
    .await;
    let mut replies = Vec::new();
    for i in 1..=5 {
        replies.push(request_via(&app, &format!("2001:db8:1:2::{i:x}"), i).await);
    }
    assert_eq!(statuses(&replies), [202, 202, 429, 429, 429]);
    for refused in &replies[2..] {
        refused.assert_problem(429, "rate_limited");
    }
    // Another /64 is another client.
    let other = request_via(&app, "2001:db8:1:3::1", 6).await;
    assert_eq!(other.status, StatusCode::ACCEPTED, "{}", other.body);
}

/// A client with a whole /48 (a free tunnel routes one) has 65,536 /64s: with
/// `OTP_PER_IPV6_48_PER_HOUR` set, the /48 has a cap of its own, which IPv4 clients never meet.
#[tokio::test]
async fn with_a_site_cap_an_ipv6_48_is_limited_as_a_whole() {
    let app = spawn_with(
        Spawn::default()
            .var("TRUST_PROXY", 1)
            .var("OTP_PER_IPV6_48_PER_HOUR", 2),
    )
    .await;
    let mut replies = Vec::new();
    for i in 1..=3 {
        replies.push(request_via(&app, &format!("2001:db8:7:{i:x}::1"), i).await);
    }
    assert_eq!(statuses(&replies), [202, 202, 429]);
    let detail = replies[2].body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("/48"), "{detail}");
    // Another /48 is another site; IPv4 clients have no site.
    for (i, client) in [
        (4, "2001:db8:8:1::1"),
        (5, "203.0.113.7"),
        (6, "203.0.113.7"),
    ] {
        let reply = request_via(&app, client, i).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "{client}: {}",
            reply.body
        );
    }
    // The refused request counted nowhere: its /64's slot was given back.
    assert_eq!(
        app.limit_count("ip:{2001:db8:7:3::/64}:sent").await,
        Some(0)
    );
}

#[tokio::test]
async fn a_client_cannot_choose_its_address_with_x_forwarded_for() {
    let app = spawn_with(
        Spawn::default()
            .var("TRUST_PROXY", 1)
            .var("OTP_PER_IP_PER_HOUR", 1),
    )
    .await;
    // The client wrote 203.0.113.<i>; our proxy appended the address it saw, with a port.
    let mut replies = Vec::new();
    for i in 1..=5 {
        replies.push(request_via(&app, &format!("203.0.113.{i}, 10.0.0.7:5555"), i).await);
    }
    assert_eq!(statuses(&replies), [202, 429, 429, 429, 429]);
    // What the proxy saw is the client: another address there is another client.
    let other = request_via(&app, "203.0.113.1, 10.0.0.8", 6).await;
    assert_eq!(other.status, StatusCode::ACCEPTED, "{}", other.body);
}

#[tokio::test]
async fn with_two_trusted_hops_the_client_is_the_second_entry_from_the_right() {
    let app = spawn_with(
        Spawn::default()
            .var("TRUST_PROXY", 2)
            .var("OTP_PER_IP_PER_HOUR", 1),
    )
    .await;
    let first = request_via(&app, "1.1.1.1, 203.0.113.9, 10.0.0.7", 1).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    let mut redis = app.redis().await;
    let key = format!("{}:limit:ip:{{203.0.113.9}}:sent", app.namespace);
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(exists, "203.0.113.9 is the client: {key}");
    // The same client behind other outer claims and another inner proxy.
    request_via(&app, "8.8.8.8, 203.0.113.9, 10.0.0.8", 2)
        .await
        .assert_problem(429, "rate_limited");
    let other = request_via(&app, "1.1.1.1, 203.0.113.10, 10.0.0.7", 3).await;
    assert_eq!(other.status, StatusCode::ACCEPTED, "{}", other.body);
}

#[tokio::test]
async fn x_forwarded_for_from_a_peer_outside_trusted_proxies_is_ignored() {
    // The test client connects from 127.0.0.1, which is not in 192.0.2.0/24.
    let app = spawn_with(
        Spawn::default()
            .var("TRUST_PROXY", 1)
            .var("TRUSTED_PROXIES", "192.0.2.0/24")
            .var("OTP_PER_IP_PER_HOUR", 1),
    )
    .await;
    let mut replies = Vec::new();
    for i in 1..=4 {
        replies.push(request_via(&app, &format!("203.0.113.{i}"), i).await);
    }
    assert_eq!(statuses(&replies), [202, 429, 429, 429]);
    app.request_otp(&phone(5))
        .await
        .assert_problem(429, "rate_limited");
}
