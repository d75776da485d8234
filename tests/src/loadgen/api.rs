//! The api's endpoints as loadgen calls them. A failure is the name it is counted under in the
//! report: the HTTP status (prefixed with the step after the first), or how the request failed.

use serde_json::{Value, json};
use time::OffsetDateTime;

use super::sms_inbox::SmsInbox;

/// How long a sign-in waits for its SMS at fake-sms.
const SMS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Clone)]
pub(super) struct Api {
    client: reqwest::Client,
    /// Without a trailing slash.
    url: String,
}

impl Api {
    pub(super) fn new(client: reqwest::Client, url: &str) -> Self {
        Self {
            client,
            url: url.trim_end_matches('/').to_owned(),
        }
    }

    /// `POST /v1/otp`; a failure is the status, e.g. `429`.
    pub(super) async fn request_code(&self, phone: &str) -> Result<(), String> {
        let (status, _) = self
            .post("/v1/otp", json!({ "phone_number": phone }))
            .await?;
        if status != 202 {
            return Err(status.to_string());
        }
        Ok(())
    }

    /// `POST /v1/otp/verify`: the access token.
    pub(super) async fn verify(&self, phone: &str, code: &str) -> Result<String, String> {
        let (status, session) = self
            .post(
                "/v1/otp/verify",
                json!({ "phone_number": phone, "otp": code }),
            )
            .await?;
        if status != 200 {
            return Err(format!("verify {status}"));
        }
        Ok(session["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// `GET /v1/me`.
    pub(super) async fn me(&self, token: &str) -> Result<(), String> {
        let response = self
            .client
            .get(format!("{}/v1/me", self.url))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| classify(&e))?;
        let status = response.status().as_u16();
        // Read the body so the connection goes back to the pool.
        let _ = response.bytes().await;
        if status != 200 {
            return Err(format!("me {status}"));
        }
        Ok(())
    }

    /// Requests a code, reads it at fake-sms and verifies it: the access token, and when the
    /// api accepted the request (delivery latency starts there).
    pub(super) async fn sign_in(
        &self,
        sms: &SmsInbox,
        phone: &str,
    ) -> Result<(String, OffsetDateTime), String> {
        self.request_code(phone).await?;
        let accepted_at = OffsetDateTime::now_utc();
        let code = sms
            .wait_for_code(phone, SMS_DEADLINE)
            .await
            .ok_or("no-sms")?;
        let token = self.verify(phone, &code).await?;
        Ok((token, accepted_at))
    }

    async fn post(&self, path: &str, body: Value) -> Result<(u16, Value), String> {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .map_err(|e| classify(&e))?;
        let status = response.status().as_u16();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body))
    }
}

fn classify(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timeout".into()
    } else if error.is_connect() {
        "connect".into()
    } else {
        "transport".into()
    }
}
