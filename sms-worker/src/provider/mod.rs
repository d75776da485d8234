//! Where SMS go: Twilio, Infobip, or the log in development; each behind a circuit breaker, in
//! the failover order of `SMS_PROVIDERS` (README.md#providers-and-failover).
//!
//! Every provider answer is sorted into a [`Failure`] kind, because what happens next depends on
//! it: a failure the provider caused (its 5xx, its refusal of our credentials) counts toward its
//! breaker and may move the send to the next provider; a failure the recipient caused (an
//! invalid or unsubscribed number) would fail the same way everywhere, so it is dead-lettered;
//! and an answer that never came after the request was written is *ambiguous*: the SMS may be on
//! its way, so it is never retried in a loop.

mod answer;
pub mod breaker;
mod infobip;
pub mod token;
mod twilio;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shared::PhoneNumber;
use shared::redis_connection::RedisConnection;

use crate::config::{Config, ProviderConfig};
use crate::metrics as m;
use breaker::Breaker;

/// One SMS ready to go.
pub struct Sms<'a> {
    pub to: &'a PhoneNumber,
    pub body: String,
    /// The same body with the code replaced, for anything that is logged.
    pub masked_body: String,
    /// When the OTP expires: providers are told to drop the SMS if they cannot deliver it by
    /// then ([`Sms::validity_secs`]).
    pub expires_at: Instant,
    /// Our id for this message, where the provider takes one (Infobip refuses a second message
    /// with the same id, which makes a redelivered copy harmless there): the event id, or for a
    /// resend the event id with a suffix.
    pub message_id: String,
    /// Set as the request is handed to the HTTP client: from then on the SMS may go out, even
    /// if the send is cut short before an answer (a token fetch before it sends nothing).
    pub request_out: &'a AtomicBool,
    /// Whether a further request may still start, for a provider that tries again by itself
    /// (Infobip, after a 401): for a delivery, none does once a stopping worker's grace period
    /// is over.
    pub may_start: &'a (dyn Fn() -> bool + Sync),
}

impl Sms<'_> {
    /// Whole seconds until the OTP expires, from now.
    pub fn validity_secs(&self) -> u64 {
        self.expires_at
            .saturating_duration_since(Instant::now())
            .as_secs()
    }

    fn going_out(&self) {
        self.request_out.store(true, Ordering::Relaxed);
    }

    /// The provider refused the request, so nothing went out (before the provider itself tries
    /// again, which may take a while).
    fn refused(&self) {
        self.request_out.store(false, Ordering::Relaxed);
    }
}

/// The provider accepted the message.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub provider: &'static str,
    /// The provider's message id (Twilio's `SM…` SID, Infobip's `messageId`).
    pub message_id: Option<String>,
    pub status: Option<String>,
}

/// What kind of failure a send met, which decides what happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Nothing was sent: the provider answered 429, 408 or 5xx, or could not be reached.
    /// Retried with backoff; counts toward the provider's breaker.
    Retryable,
    /// The request went out and no answer came (a timeout or a reset after writing): the SMS
    /// may have been accepted. At most one more attempt, never a retry loop.
    Ambiguous,
    /// The recipient is the problem (invalid, unsubscribed, blocked number): every provider
    /// would fail the same way. Dead-lettered; no breaker, no failover.
    Recipient,
    /// The provider refuses us (credentials, suspended account, sender): counts toward its
    /// breaker and the send moves to the next provider at once.
    Provider,
    /// This provider cannot reach this destination (no route, region not enabled), though it
    /// works for others: the send moves to the next provider, the breaker is left alone.
    Route,
    /// The provider refused with a reason the worker cannot place: an error code it does not
    /// know, or none it could read (a proxy's page in the provider's stead). It may be ours or
    /// the recipient's, so the send moves to the next provider, and the breaker is left alone:
    /// the requester chooses the number, and must not be able to open a breaker with it.
    Unrecognised,
    /// Not sent again: the provider refused a first request for a reason of ours (Infobip, a
    /// token it had dropped), and the worker's grace period ended before the second could
    /// start. Nothing is the provider's fault: no breaker; the send stops there.
    Withheld,
    /// Not sent: a wait before the request (for a token) left too little of the attempt's time,
    /// or of the code's life. The event's clock, not the provider's fault: no breaker; the send
    /// backs off and tries again within its budget.
    NoTimeLeft,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retryable => "retryable",
            Self::Ambiguous => "ambiguous",
            Self::Recipient => "recipient",
            Self::Provider => "provider",
            Self::Route => "route",
            Self::Unrecognised => "unrecognised",
            Self::Withheld => "withheld",
            Self::NoTimeLeft => "no_time_left",
        }
    }

    /// Whether the provider (not the recipient, not the route) is to blame.
    pub fn counts_toward_breaker(self) -> bool {
        matches!(self, Self::Retryable | Self::Ambiguous | Self::Provider)
    }
}

/// Why a send failed.
#[derive(Debug, Clone)]
pub struct SendError {
    pub kind: Failure,
    /// Text for logs and the dead-letter header; never holds the code, the number is masked.
    pub message: String,
    /// HTTP status, when the provider answered.
    pub status: Option<u16>,
    /// The provider's error code (Twilio's 21211, Infobip's status or error id), when it gave one.
    pub code: Option<i64>,
    /// `Retry-After` of a 429 or 503.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl SendError {
    /// With `code` masked in the text: a provider (or whatever answers in its place) that echoes
    /// the message it was sent must not put the code into logs, dead letters or timelines.
    pub fn masking(mut self, code: &str) -> Self {
        if !code.is_empty() {
            self.message = self.message.replace(code, &"*".repeat(code.len()));
        }
        self
    }

    fn new(kind: Failure, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            status: None,
            code: None,
            retry_after: None,
        }
    }

    /// A request that did not get an answer: before the request was written it is retryable,
    /// after it the SMS may have gone out.
    fn transport(provider: &str, error: &reqwest::Error, to: &PhoneNumber) -> Self {
        let (kind, what) = if error.is_connect() {
            (Failure::Retryable, "could not connect")
        } else if error.is_timeout() {
            (Failure::Ambiguous, "timed out")
        } else {
            (Failure::Ambiguous, "request failed")
        };
        // The kind and the source chain only: reqwest's own Display starts with the URL.
        let mut message = format!("{provider} {what}");
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::new(kind, mask_number(&message, to.as_str()))
    }
}

enum Client {
    Log,
    Twilio(twilio::Twilio),
    Infobip(Box<infobip::Infobip>),
}

/// One provider with its breaker.
pub struct Provider {
    name: &'static str,
    client: Client,
    pub breaker: Breaker,
    /// A repeat of a message id it has taken sends nothing (`INFOBIP_IDEMPOTENT`).
    ignores_repeats: bool,
}

impl Provider {
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether sending this event again, under the same message id, sends nothing more when
    /// the provider took it already: what makes a retry after an unanswered call safe.
    pub fn ignores_repeats(&self) -> bool {
        self.ignores_repeats
    }

    /// Whether this "provider" only writes SMS to the log (development).
    pub fn logs_only(&self) -> bool {
        matches!(self.client, Client::Log)
    }

    /// One attempt, bounded by `timeout`. Records the provider's latency and outcome metrics;
    /// the breaker is the caller's to update, since only it knows whether the send moved on.
    pub async fn send(&self, sms: &Sms<'_>, timeout: Duration) -> Result<Accepted, SendError> {
        let started = Instant::now();
        let result = match &self.client {
            Client::Log => {
                tracing::info!(
                    to = %sms.to,
                    body = %sms.masked_body,
                    validity_secs = sms.validity_secs(),
                    "SMS_PROVIDERS=log: not sending this SMS, only logging it"
                );
                Ok(Accepted {
                    provider: self.name,
                    message_id: None,
                    status: None,
                })
            }
            Client::Twilio(twilio) => twilio.send(sms, timeout).await,
            Client::Infobip(infobip) => infobip.send(sms, timeout).await,
        };
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(e) => e.kind.as_str(),
        };
        metrics::histogram!(m::PROVIDER_DURATION, "provider" => self.name, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(m::PROVIDER_SENDS, "provider" => self.name, "outcome" => outcome)
            .increment(1);
        result
    }
}

/// The configured providers, in failover order.
pub struct Providers(Vec<Provider>);

impl Providers {
    pub fn new(config: &Config, redis: &RedisConnection) -> anyhow::Result<Self> {
        let seal = config.seal_key.clone().map(Arc::new);
        let namespace = &config.common.namespace;
        let callback = |provider: &str| {
            let callbacks = config.callbacks.as_ref()?;
            let url = format!("{}/v1/callbacks/{provider}", callbacks.base_url);
            match (provider, &seal) {
                ("infobip", Some(seal)) => Some(format!(
                    "{url}?secret={}",
                    crate::receipts::infobip::callback_secret(seal)
                )),
                _ => Some(url),
            }
        };
        let providers = config
            .providers
            .iter()
            .map(|provider| {
                let client = match provider {
                    ProviderConfig::Log => Client::Log,
                    ProviderConfig::Twilio(twilio) => {
                        Client::Twilio(twilio::Twilio::new(twilio, callback("twilio"))?)
                    }
                    ProviderConfig::Infobip(infobip) => {
                        Client::Infobip(Box::new(infobip::Infobip::new(
                            infobip,
                            redis.clone(),
                            namespace,
                            seal.clone(),
                            callback("infobip"),
                        )?))
                    }
                };
                // At 0 from the start, so that an alert on its increase sees the first one.
                metrics::counter!(m::PROVIDER_ANSWERS_CUT, "provider" => provider.name())
                    .increment(0);
                Ok(Provider {
                    name: provider.name(),
                    ignores_repeats: matches!(provider, ProviderConfig::Infobip(i) if i.idempotent),
                    client,
                    breaker: Breaker::new(
                        provider.name(),
                        config.breaker,
                        redis.clone(),
                        namespace,
                    ),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self(providers))
    }

    pub fn all(&self) -> &[Provider] {
        &self.0
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(Provider::name).collect()
    }

    /// Whether any provider sends nothing (development).
    pub fn logs_only(&self) -> bool {
        self.0.iter().all(Provider::logs_only)
    }
}

/// A provider's own words in an error answer (Twilio's `message`, Infobip's `description`),
/// every digit masked. They may quote the number ("The 'To' number +14155550100 is not a valid
/// phone number") or the message, code included, whole or cut short; and they end up in logs, the
/// dead-letter queue and timelines. Masking every digit, not only those of the code, keeps what
/// is masked from telling anything about the code. The status and the provider's error code are
/// kept in fields of their own. What would act on a terminal or reorder the text is written out
/// (`\u{1b}`, [`crate::terminal::printable`]): a provider's (or a proxy's) escape sequence must
/// not reach a terminal that reads the log or the dead letters, and operators still see it came.
pub fn masked_words(text: &str) -> String {
    let masked: String = text
        .chars()
        .map(|c| if c.is_ascii_digit() { '*' } else { c })
        .collect();
    crate::terminal::printable(&masked)
}

/// Texts that may quote the number, masked as the logs mask numbers.
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

/// The longest `Retry-After` taken as given: a day, the most any retry budget allows
/// (`RETRY_MAX_ELAPSED_SECS`). Whatever answers in a provider's stead may send any number, and a
/// delay past what a clock can add would panic where the next attempt is scheduled.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(86_400);

/// `Retry-After` is either delay-seconds or an HTTP date; at most [`RETRY_AFTER_MAX`].
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(RETRY_AFTER_MAX));
    }
    let date =
        time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    let left = date - time::OffsetDateTime::now_utc();
    Some(
        Duration::try_from(left)
            .unwrap_or(Duration::ZERO)
            .min(RETRY_AFTER_MAX),
    )
}

/// The `Retry-After` of a 429 or a 503, which say nothing was done; on another answer (a 502 or
/// 504 from an edge, which may come after the provider took the request) it is not heeded, so
/// that it never sends the event to another provider (see `worker::failover`).
fn retry_after(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
) -> Option<Duration> {
    if !matches!(status.as_u16(), 429 | 503) {
        return None;
    }
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after)
}

/// An `Authorization` value marked sensitive: kept out of `Debug` output and of HTTP/2 header
/// compression. Fails when the text cannot be a header value.
fn sensitive_header(
    value: String,
) -> Result<reqwest::header::HeaderValue, reqwest::header::InvalidHeaderValue> {
    let mut header = reqwest::header::HeaderValue::try_from(value)?;
    header.set_sensitive(true);
    Ok(header)
}

/// A client for one provider: no redirects (a redirected POST would be resent as a GET, never
/// right for an SMS), a short connect timeout.
fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .user_agent(concat!("otp-auth-sms-worker/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_retry_after() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(
            parse_retry_after("18446744073709551615"),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT"),
            Some(Duration::from_secs(86_400))
        );
    }

    #[test]
    fn masks_the_number_in_provider_errors() {
        let text = "The 'To' number +14155550100 is not a valid phone number (14155550100).";
        let masked = mask_number(text, "+14155550100");
        assert!(!masked.contains("4155550100"), "{masked}");
        assert!(masked.contains("+1415*****00"), "{masked}");
    }

    #[test]
    fn masks_every_digit_of_a_providers_words() {
        let words = "The body 'Your code is 0482' (cut) to +14155550100 was refused";
        assert_eq!(
            masked_words(words),
            "The body 'Your code is ****' (cut) to +*********** was refused"
        );
        assert_eq!(masked_words("Invalid destination"), "Invalid destination");
        // Escapes are written out (their hex digits name the character, not a code).
        assert_eq!(
            masked_words("bad\u{1b}[2J\r\nline\u{202e}"),
            "bad\\u{1b}[*J\\r\\nline\\u{202e}"
        );
    }

    #[test]
    fn only_provider_side_failures_count_toward_the_breaker() {
        assert!(Failure::Retryable.counts_toward_breaker());
        assert!(Failure::Ambiguous.counts_toward_breaker());
        assert!(Failure::Provider.counts_toward_breaker());
        assert!(!Failure::Recipient.counts_toward_breaker());
        assert!(!Failure::Route.counts_toward_breaker());
        assert!(!Failure::Unrecognised.counts_toward_breaker());
        assert!(!Failure::Withheld.counts_toward_breaker());
        assert!(!Failure::NoTimeLeft.counts_toward_breaker());
    }
}
