//! fake-sms itself, over HTTP: it must answer as Twilio does, or the worker tests prove nothing.

use reqwest::{RequestBuilder, Response};
use serde_json::{Value, json};
use tests::fake_sms::{FakeSms, FakeSmsConfig};

/// A random, valid-looking US number.
fn phone() -> String {
    format!("+1415{:07}", rand::random_range(0..10_000_000u32))
}

async fn send(request: RequestBuilder) -> Response {
    request.send().await.expect("fake-sms answers")
}

async fn json_of(response: Response) -> Value {
    response.json().await.expect("a JSON body")
}

#[tokio::test]
async fn fake_sms_answers_like_twilio() {
    let fake = FakeSms::start(FakeSmsConfig::ephemeral()).await.unwrap();
    let config = fake.config().clone();
    let http = reqwest::Client::new();
    let url = format!(
        "{}/2010-04-01/Accounts/{}/Messages.json",
        fake.base_url(),
        config.account_sid
    );
    let with_token = |url: &str| {
        http.post(url)
            .basic_auth(&config.account_sid, Some(&config.auth_token))
    };
    let to = phone();
    let form = [
        ("To", to.as_str()),
        ("From", "+15005550006"),
        ("Body", "<b>hi</b> 123"),
        ("ValidityPeriod", "60"),
    ];

    let response = send(http.post(&url).form(&form)).await;
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    let error = json_of(response).await;
    assert_eq!(error["code"], 20003);
    assert_eq!(error["status"], 401);
    assert_eq!(
        error["more_info"],
        "https://www.twilio.com/docs/errors/20003"
    );

    let other_account = format!(
        "{}/2010-04-01/Accounts/AC{}/Messages.json",
        fake.base_url(),
        "1".repeat(32)
    );
    let response = send(with_token(&other_account).form(&form)).await;
    assert_eq!(response.status(), 401);
    let not_a_sid = format!("{}/2010-04-01/Accounts/nope/Messages.json", fake.base_url());
    let response = send(with_token(&not_a_sid).form(&form)).await;
    assert_eq!(response.status(), 404);

    // JSON is not what Twilio reads: the fields are missing.
    let response =
        send(with_token(&url).json(&json!({"To": to, "From": "+15005550006", "Body": "x"}))).await;
    assert_eq!(response.status(), 400);
    assert_eq!(json_of(response).await["code"], 21604);

    let response = send(with_token(&url).form(&[("To", to.as_str()), ("Body", "x")])).await;
    assert_eq!(json_of(response).await["code"], 21603);

    // Twilio's code for a validity period out of range (21620 is about a media URL).
    let long_lived = [
        ("To", to.as_str()),
        ("From", "+15005550006"),
        ("Body", "x"),
        ("ValidityPeriod", "36001"),
    ];
    let response = send(with_token(&url).form(&long_lived)).await;
    assert_eq!(response.status(), 400);
    assert_eq!(json_of(response).await["code"], 21624);

    let with_api_key = http
        .post(&url)
        .basic_auth(&config.api_key_sid, Some(&config.api_key_secret));
    let response = send(with_api_key.form(&form)).await;
    assert_eq!(response.status(), 201);
    let resource = json_of(response).await;
    assert!(resource["sid"].as_str().unwrap().starts_with("SM"));
    assert_eq!(resource["status"], "queued");
    assert_eq!(resource["to"], to);
    assert_eq!(resource["account_sid"], config.account_sid);
    assert_eq!(resource["direction"], "outbound-api");

    let listing = format!("{}/messages?to={}", fake.base_url(), to.replace('+', "%2B"));
    let listed = json_of(send(http.get(listing)).await).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["body"], "<b>hi</b> 123");
    assert_eq!(listed[0]["validity_period"], 60);

    let inbox = send(http.get(fake.base_url())).await.text().await.unwrap();
    assert!(inbox.contains("&lt;b&gt;hi&lt;/b&gt; 123"), "escaped");
    assert!(!inbox.contains("<b>hi</b>"));
    assert!(
        inbox.contains("<td>twilio</td>"),
        "the provider is shown: {inbox}"
    );
    let link = format!("href=\"/?to={}\"", to.replace('+', "%2B"));
    assert!(
        inbox.contains(&link),
        "numbers link to their filter: {inbox}"
    );
    // The page's own hint, typed as is: the `+` arrives as a space, and still filters.
    let typed = format!("{}/?to={to}", fake.base_url());
    let filtered = send(http.get(typed)).await.text().await.unwrap();
    assert!(filtered.contains("1 message to"), "{filtered}");
    let typed = format!("{}/messages?to={to}", fake.base_url());
    assert_eq!(
        json_of(send(http.get(typed)).await)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let faults = json!({"responses": [{"status": 429, "retry_after_secs": 7}]});
    let control = format!("{}/control/faults", fake.base_url());
    let response = send(http.post(control).json(&faults)).await;
    assert_eq!(response.status(), 200);
    let response = send(with_token(&url).form(&form)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(json_of(response).await["code"], 20429);

    let response = send(http.delete(format!("{}/messages", fake.base_url()))).await;
    assert_eq!(response.status(), 204);
    assert!(fake.messages(None).is_empty() && fake.requests(None).is_empty());
}
