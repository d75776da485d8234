//! Twilio's Messages API: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`.

use std::time::Duration;

use base64::Engine;
use reqwest::header::HeaderValue;
use secrecy::ExposeSecret;
use serde::Deserialize;

use super::answer::read_send_answer;
use super::{
    Accepted, Failure, SendError, Sms, http_client, masked_words, retry_after, sensitive_header,
};
use crate::config::{TwilioAuth, TwilioConfig};

pub struct Twilio {
    client: reqwest::Client,
    /// Parsed once: a send is then one `Url` clone, not a parse of the text.
    url: reqwest::Url,
    /// `Basic base64(username:password)`, encoded once and marked sensitive (kept out of
    /// `Debug` output).
    authorization: HeaderValue,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    /// Where Twilio posts this message's status callbacks, when receipts are on.
    status_callback: Option<String>,
}

/// Twilio's error body: `{"code", "message", "more_info", "status"}`.
#[derive(Debug, Deserialize)]
struct TwilioError {
    code: Option<i64>,
    message: Option<String>,
}

/// The parts of the message resource (201) that are worth keeping.
#[derive(Debug, Deserialize)]
struct TwilioMessage {
    sid: Option<String>,
    status: Option<String>,
}

impl Twilio {
    pub fn new(config: &TwilioConfig, status_callback: Option<String>) -> anyhow::Result<Self> {
        let (username, password) = match &config.auth {
            TwilioAuth::AuthToken(token) => (config.account_sid.clone(), token.clone()),
            TwilioAuth::ApiKey { sid, secret } => (sid.clone(), secret.clone()),
        };
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            config.base_url, config.account_sid
        );
        let credentials = base64::engine::general_purpose::STANDARD
            .encode(format!("{username}:{}", password.expose_secret()));
        let authorization = sensitive_header(format!("Basic {credentials}"))
            .map_err(|_| anyhow::anyhow!("the Twilio credentials cannot be sent as a header"))?;
        Ok(Self {
            client: http_client()?,
            url: reqwest::Url::parse(&url)
                .map_err(|e| anyhow::anyhow!("TWILIO_BASE_URL does not make a URL: {e}"))?,
            authorization,
            from: config.from.clone(),
            messaging_service_sid: config.messaging_service_sid.clone(),
            status_callback,
        })
    }

    pub async fn send(&self, sms: &Sms<'_>, timeout: Duration) -> Result<Accepted, SendError> {
        let mut form: Vec<(&str, String)> = vec![("To", sms.to.as_str().to_owned())];
        if let Some(from) = &self.from {
            form.push(("From", from.clone()));
        }
        if let Some(sid) = &self.messaging_service_sid {
            form.push(("MessagingServiceSid", sid.clone()));
        }
        form.push(("Body", sms.body.clone()));
        // Twilio accepts 1 to 36000.
        form.push((
            "ValidityPeriod",
            sms.validity_secs().clamp(1, 36_000).to_string(),
        ));
        if let Some(url) = &self.status_callback {
            form.push(("StatusCallback", url.clone()));
        }

        sms.going_out();
        let response = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::AUTHORIZATION, self.authorization.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| SendError::transport("twilio", &e, sms.to))?;

        let status = response.status();
        let retry_after = retry_after(status, response.headers());
        let answer = read_send_answer("twilio", response, sms.to).await;
        let body = &answer.bytes;

        if status.is_success() {
            let message: Option<TwilioMessage> = serde_json::from_slice(body).ok();
            return Ok(Accepted {
                provider: "twilio",
                message_id: message.as_ref().and_then(|m| m.sid.clone()),
                status: message.and_then(|m| m.status),
            });
        }
        let error: Option<TwilioError> = serde_json::from_slice(body).ok();
        let code = error.as_ref().and_then(|e| e.code);
        let text = error
            .and_then(|e| e.message)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
        let status = status.as_u16();
        Err(SendError {
            kind: answer.sorted(classify(status, code)),
            message: format!("twilio answered {status}: {}", masked_words(&text)),
            status: Some(status),
            code,
            retry_after,
        })
    }
}

/// Twilio's answer, by HTTP status and error code (docs/messaging.md#the-provider-call).
///
/// Only what no requester can cause counts against Twilio: the requester chooses the number, and
/// an SMS-pumping attacker must not be able to open a breaker with it.
pub fn classify(status: u16, code: Option<i64>) -> Failure {
    if status == 429 || status == 408 || status >= 500 {
        return Failure::Retryable;
    }
    if status == 401 || status == 403 {
        // 20003: the account SID, token or API key is wrong; or the account is suspended.
        return Failure::Provider;
    }
    match code {
        // Our account, sender or request, whatever the number: 20404 a wrong account SID in the
        // URL, 21212 an invalid `From`, 21602 and 21603 a missing body or sender, 21611 the
        // sender's queue full, 21617 a body over 1,600 characters (the template), 21624 a
        // `ValidityPeriod` out of range, 30002 a suspended account; another provider may work.
        Some(20003 | 20005 | 20404 | 21212 | 21602 | 21603 | 21611 | 21617 | 21624 | 30002) => {
            Failure::Provider
        }
        // This destination cannot be reached through this account (region not enabled, a sender
        // not capable of it or not in its country, a trial account's unverified number):
        // another provider may reach it, and Twilio still works for others. 21606 and 21659
        // can be a wrong sender too, but a short code sent to another country gives the same
        // codes, so a requester could cause them.
        Some(21408 | 21606 | 21608 | 21612 | 21659 | 30024 | 30034) => Failure::Route,
        // Invalid, unsubscribed, landline, short-code, premium-rate or blocked numbers: every
        // provider would fail the same way, or must not be used to get around the refusal (a
        // premium-rate number is how SMS pumping is paid).
        Some(21211 | 21217 | 21265 | 21266 | 21268 | 21610 | 21614 | 21635) => Failure::Recipient,
        // Twilio refuses a number with a 400, so any other 4xx with a code not listed here, or
        // none (a proxy's page, a wrong base URL), is about where and how we send.
        _ if status != 400 => Failure::Provider,
        _ => Failure::Unrecognised,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_twilio_answers() {
        for status in [429, 500, 502, 503, 504, 408] {
            assert_eq!(classify(status, None), Failure::Retryable, "{status}");
        }
        assert_eq!(classify(401, Some(20003)), Failure::Provider);
        assert_eq!(classify(403, None), Failure::Provider);
        for code in [21212, 21603, 21611, 21617, 21624] {
            assert_eq!(classify(400, Some(code)), Failure::Provider, "{code}");
        }
        assert_eq!(classify(404, Some(20404)), Failure::Provider);
        for code in [21408, 21606, 21608, 21659] {
            assert_eq!(classify(400, Some(code)), Failure::Route, "{code}");
        }
        for code in [21211, 21268, 21610, 21614, 21635] {
            assert_eq!(classify(400, Some(code)), Failure::Recipient, "{code}");
        }
    }

    #[test]
    fn a_refusal_without_a_known_code_is_nobodys_at_400_and_ours_otherwise() {
        assert_eq!(classify(400, None), Failure::Unrecognised);
        assert_eq!(classify(400, Some(63_999)), Failure::Unrecognised);
        for status in [404, 405, 413, 415] {
            assert_eq!(classify(status, None), Failure::Provider, "{status}");
        }
        // A known code decides whatever the status.
        assert_eq!(classify(404, Some(21211)), Failure::Recipient);
    }
}
