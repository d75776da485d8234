//! The `OtpRequested` event: the api publishes it, the sms-worker consumes it.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::PhoneNumber;

/// The body version this build writes and reads.
pub const EVENT_VERSION: u32 = 1;
/// AMQP routing key of `OtpRequested` on `{ns}.events`.
pub const ROUTING_KEY: &str = "otp.requested";
/// AMQP `type` property.
pub const MESSAGE_TYPE: &str = "OtpRequested";
pub const CONTENT_TYPE: &str = "application/json";
/// Header carrying the HTTP request id from the api to the worker's logs.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// An OTP to deliver by SMS. The body is versioned so that the api and the workers can be upgraded
/// one after the other.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtpRequested {
    pub version: u32,
    pub event_id: Uuid,
    pub phone_number: PhoneNumber,
    /// The code in plaintext; `None` in dead-lettered copies, so a failed code is never kept readable.
    pub otp: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    pub request_id: String,
    /// The language the SMS should be written in (a BCP 47 tag such as `es` or `pt-BR`), from
    /// the request's `locale` or `Accept-Language`; absent: the default template. Optional, so
    /// version 1 events without it stay valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
}

impl std::fmt::Debug for OtpRequested {
    // The code never reaches a log, and the number is masked.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtpRequested")
            .field("version", &self.version)
            .field("event_id", &self.event_id)
            .field("phone_number", &self.phone_number)
            .field("otp", &self.otp.as_ref().map(|_| "[REDACTED]"))
            .field("expires_at", &self.expires_at)
            .field("requested_at", &self.requested_at)
            .field("request_id", &self.request_id)
            .field("locale", &self.locale)
            .finish()
    }
}

impl OtpRequested {
    pub fn new(
        phone_number: PhoneNumber,
        otp: String,
        expires_at: OffsetDateTime,
        request_id: String,
    ) -> Self {
        Self {
            version: EVENT_VERSION,
            event_id: Uuid::now_v7(),
            phone_number,
            otp: Some(otp),
            expires_at,
            requested_at: OffsetDateTime::now_utc(),
            request_id,
            locale: None,
        }
    }

    /// The same event, to be written in `locale`.
    pub fn in_locale(mut self, locale: Option<String>) -> Self {
        self.locale = locale;
        self
    }

    /// A new event for a code valid for `ttl` from now; `expires_at - requested_at` is exactly `ttl`.
    pub fn valid_for(
        phone_number: PhoneNumber,
        otp: String,
        ttl: std::time::Duration,
        request_id: String,
    ) -> Self {
        let requested_at = OffsetDateTime::now_utc();
        Self {
            requested_at,
            ..Self::new(phone_number, otp, requested_at + ttl, request_id)
        }
    }

    /// Milliseconds until the OTP expires (0 when it already has).
    pub fn millis_left(&self, now: OffsetDateTime) -> u64 {
        let left = (self.expires_at - now).whole_milliseconds();
        u64::try_from(left.max(0)).unwrap_or(u64::MAX)
    }

    /// The copy kept in the dead-letter queue: the same event without its code.
    pub fn without_code(&self) -> Self {
        Self {
            otp: None,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_the_documented_shape() {
        let body = r#"{"version":1,"event_id":"0192f0c4-1c2b-7cc3-a5b1-2f0f6c1d9e11","phone_number":"+14155550100","otp":"123456","expires_at":"2026-11-22T10:05:00Z","requested_at":"2026-11-22T10:00:00Z","request_id":"req-1"}"#;
        let event: OtpRequested = serde_json::from_str(body).unwrap();
        assert_eq!(event.otp.as_deref(), Some("123456"));
        assert_eq!(event.millis_left(event.requested_at), 300_000);
        let json: serde_json::Value = serde_json::to_value(&event).unwrap();
        assert_eq!(json["expires_at"], "2026-11-22T10:05:00Z");
        assert_eq!(json["version"], 1);

        let debug = format!("{event:?}");
        assert!(!debug.contains("123456"), "{debug}");
        assert!(!debug.contains("+14155550100"), "{debug}");

        let dead = event.without_code();
        assert_eq!(
            serde_json::to_value(&dead).unwrap()["otp"],
            serde_json::Value::Null
        );
    }
}
