//! What a browser gets: `/` sends it to `/docs`, whose Swagger UI loads entirely from this
//! server (no network needed), over a document that states this server's own rules; `/demo`
//! exists only with `DEMO_PAGE=true` and may load nothing from elsewhere.

use reqwest::StatusCode;
use reqwest::redirect::Policy;
use serde_json::Value;

use crate::helpers::{Spawn, spawn_app, spawn_with};

/// Every `src="…"` and `href="…"` in `html`.
fn assets(html: &str) -> Vec<String> {
    ["src=\"", "href=\""]
        .iter()
        .flat_map(|marker| html.split(marker).skip(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_docs_load_from_this_server_alone() {
    let app = spawn_app().await;
    let no_redirects = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap();
    let root = no_redirects.get(app.url("/")).send().await.unwrap();
    assert!(root.status().is_redirection(), "{}", root.status());
    assert_eq!(root.headers()["location"], "/docs/");

    let page = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("<title>otp-auth API docs</title>"), "{html}");
    let assets = assets(&html);
    assert!(assets.len() >= 3, "{assets:?}");
    for asset in &assets {
        assert!(!asset.contains("//"), "{asset} is not served by the api");
        let url = app.url(&format!("/docs/{}", asset.trim_start_matches("./")));
        let response = app.client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{url}");
    }
    // The page is pointed at this server's document.
    let initializer = app
        .client
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(initializer.contains("/openapi.json"), "{initializer}");
}

#[tokio::test]
async fn the_document_states_the_servers_rules_and_every_status() {
    let app = spawn_with(Spawn::default().var("OTP_LENGTH", 8)).await;
    let doc = app.get("/openapi.json").await.body;
    let schema = |name: &str| doc["components"]["schemas"][name]["properties"].clone();
    for body in ["VerifyBody", "SignupBody"] {
        assert_eq!(schema(body)["otp"]["pattern"], "^[0-9]{8}$", "{body}");
    }
    for body in ["OtpRequestBody", "VerifyBody", "SignupBody"] {
        assert_eq!(
            schema(body)["phone_number"]["pattern"],
            r"^\+[1-9][0-9]{6,14}$",
            "{body}"
        );
    }
    for (path, method) in [
        ("/v1/otp", "post"),
        ("/v1/otp/verify", "post"),
        ("/v1/signup", "post"),
        ("/v1/token/refresh", "post"),
        ("/v1/logout", "post"),
    ] {
        let responses = &doc["paths"][path][method]["responses"];
        for status in ["400", "413", "415", "500", "503"] {
            assert!(responses[status].is_object(), "{path} documents {status}");
            let content = &responses[status]["content"]["application/problem+json"];
            assert!(content.is_object(), "{path} {status} is problem+json");
        }
    }
    let me = &doc["paths"]["/v1/me"]["get"]["responses"];
    assert!(me["401"].is_object() && me["503"].is_object(), "{me}");

    // With a DEFAULT_REGION, national numbers are fine: no E.164 pattern then.
    let national = spawn_with(Spawn::default().var("DEFAULT_REGION", "GB")).await;
    let doc = national.get("/openapi.json").await.body;
    let phone = &doc["components"]["schemas"]["OtpRequestBody"]["properties"]["phone_number"];
    assert_eq!(phone["pattern"], Value::Null, "{phone}");
}

#[tokio::test]
async fn the_demo_page_is_off_by_default_and_self_contained_when_on() {
    let off = spawn_app().await;
    assert_eq!(off.get("/demo").await.status, StatusCode::NOT_FOUND);

    let on = spawn_with(Spawn::default().var("DEMO_PAGE", true)).await;
    let page = on.client.get(on.url("/demo")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"autocomplete="one-time-code""#));
    assert!(
        html.contains("OTPCredential"),
        "WebOTP where the browser has it"
    );
    assert!(
        assets(&html).iter().all(|a| !a.contains("//")),
        "nothing from elsewhere: {:?}",
        assets(&html)
    );
}
