//! Where SMS go: Twilio's Messages API (`CreateMessage`), or the log in development.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use shared::PhoneNumber;
use time::OffsetDateTime;

use crate::config::{ProviderConfig, TwilioAuth, TwilioConfig};
use crate::metrics as m;

/// One SMS ready to go.
pub struct Sms<'a> {
    pub to: &'a PhoneNumber,
    pub body: String,
    /// The same body with the code replaced, for anything that is logged.
    pub masked_body: String,
    /// Seconds until the OTP expires: Twilio drops the SMS if it cannot deliver it by then.
    pub validity_secs: u64,
}

/// The provider accepted the message.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Twilio's message SID (`SM…`), when there is one.
    pub sid: Option<String>,
    pub status: Option<String>,
}

/// Why a send failed, and whether trying again can help.
#[derive(Debug, Clone)]
pub struct SendError {
    pub retryable: bool,
    /// Text for logs and the dead-letter header; never holds the code, the number is masked.
    pub message: String,
    /// HTTP status, when the provider answered.
    pub status: Option<u16>,
    /// Twilio's error code (e.g. 21211), when the answer carried one.
    pub code: Option<i64>,
    /// `Retry-After` of a 429 or 503.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub enum Provider {
    Log,
    Twilio(Twilio),
}

impl Provider {
    pub fn new(config: &ProviderConfig) -> anyhow::Result<Self> {
        Ok(match config {
            ProviderConfig::Log => Self::Log,
            ProviderConfig::Twilio(twilio) => Self::Twilio(Twilio::new(twilio)?),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::Twilio(_) => "twilio",
        }
    }

    /// One attempt, bounded by `timeout`. Records the provider latency histogram.
    pub async fn send(&self, sms: &Sms<'_>, timeout: Duration) -> Result<Accepted, SendError> {
        let started = Instant::now();
        let result = match self {
            Self::Log => {
                tracing::info!(
                    to = %sms.to,
                    body = %sms.masked_body,
                    validity_secs = sms.validity_secs,
                    "SMS_PROVIDER=log: not sending this SMS, only logging it"
                );
                Ok(Accepted {
                    sid: None,
                    status: None,
                })
            }
            Self::Twilio(twilio) => twilio.send(sms, timeout).await,
        };
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(e) if e.retryable => "retryable_error",
            Err(_) => "permanent_error",
        };
        metrics::histogram!(m::PROVIDER_DURATION, "provider" => self.name(), "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        result
    }
}

/// A client of `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`.
pub struct Twilio {
    client: reqwest::Client,
    url: String,
    username: String,
    password: SecretString,
    from: Option<String>,
    messaging_service_sid: Option<String>,
}

/// Twilio's error body: `{"code", "message", "more_info", "status"}`.
#[derive(Debug, Deserialize)]
struct TwilioError {
    code: Option<i64>,
    message: Option<String>,
}

/// The parts of the message resource (201) that are worth a log line.
#[derive(Debug, Deserialize)]
struct TwilioMessage {
    sid: Option<String>,
    status: Option<String>,
}

impl Twilio {
    pub fn new(config: &TwilioConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("otp-auth-sms-worker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            // A redirected POST would be resent as a GET: never the right thing for an SMS.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let (username, password) = match &config.auth {
            TwilioAuth::AuthToken(token) => (config.account_sid.clone(), token.clone()),
            TwilioAuth::ApiKey { sid, secret } => (sid.clone(), secret.clone()),
        };
        Ok(Self {
            client,
            url: format!(
                "{}/2010-04-01/Accounts/{}/Messages.json",
                config.base_url, config.account_sid
            ),
            username,
            password,
            from: config.from.clone(),
            messaging_service_sid: config.messaging_service_sid.clone(),
        })
    }

    async fn send(&self, sms: &Sms<'_>, timeout: Duration) -> Result<Accepted, SendError> {
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
            sms.validity_secs.clamp(1, 36_000).to_string(),
        ));

        let response = self
            .client
            .post(&self.url)
            .basic_auth(&self.username, Some(self.password.expose_secret()))
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| transport_error(&e))?;

        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // The body is read under the same deadline as the request (reqwest's per-request timeout
        // covers it); a body that cannot be read is treated like a lost connection.
        let body = response.bytes().await.map_err(|e| transport_error(&e))?;

        if status.is_success() {
            let message: Option<TwilioMessage> = serde_json::from_slice(&body).ok();
            return Ok(Accepted {
                sid: message.as_ref().and_then(|m| m.sid.clone()),
                status: message.and_then(|m| m.status),
            });
        }
        let error: Option<TwilioError> = serde_json::from_slice(&body).ok();
        let code = error.as_ref().and_then(|e| e.code);
        let text = error
            .and_then(|e| e.message)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
        let status = status.as_u16();
        Err(SendError {
            retryable: is_retryable_status(status),
            message: mask_number(
                &format!("twilio answered {status}: {text}"),
                sms.to.as_str(),
            ),
            status: Some(status),
            code,
            retry_after,
        })
    }
}

/// 429 (rate limited), 408 and 5xx are worth another try; any other 4xx (invalid number 21211,
/// unsubscribed 21610, bad credentials 20003, …) will fail the same way every time.
pub fn is_retryable_status(status: u16) -> bool {
    status == 429 || status == 408 || status >= 500
}

fn transport_error(error: &reqwest::Error) -> SendError {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    // Only the kind and the source chain: reqwest's own Display starts with the URL, which is
    // harmless, but the chain is what helps an operator.
    let mut message = format!("twilio {kind}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    SendError {
        retryable: true,
        message,
        status: None,
        code: None,
        retry_after: None,
    }
}

/// `Retry-After` is either delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let date = OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    let left = date - OffsetDateTime::now_utc();
    Some(Duration::try_from(left).unwrap_or(Duration::ZERO))
}

/// Twilio's error texts quote the number ("The 'To' number +14155550100 is not a valid phone
/// number"); they end up in logs and in the dead-letter queue, so the number is masked.
pub fn mask_number(text: &str, phone: &str) -> String {
    if phone.is_empty() {
        return text.to_owned();
    }
    let masked = shared::mask_phone(phone);
    let mut out = text.replace(phone, &masked);
    if let Some(digits) = phone.strip_prefix('+')
        && digits.len() >= 6
    {
        out = out.replace(digits, &shared::mask_phone(digits));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_statuses() {
        for status in [429, 500, 502, 503, 504, 408] {
            assert!(is_retryable_status(status), "{status}");
        }
        for status in [400, 401, 403, 404, 409, 422] {
            assert!(!is_retryable_status(status), "{status}");
        }
    }

    #[test]
    fn parses_retry_after() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn masks_the_number_in_provider_errors() {
        let text = "The 'To' number +14155550100 is not a valid phone number (14155550100).";
        let masked = mask_number(text, "+14155550100");
        assert!(!masked.contains("4155550100"), "{masked}");
        assert!(masked.contains("+1415*****00"), "{masked}");
    }
}
