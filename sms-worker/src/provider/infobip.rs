//! Infobip's SMS API v3: `POST {base}/sms/3/messages`, authenticated with a shared OAuth token
//! (`POST {base}/auth/1/oauth2/token`) or an API key.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use shared::redis_connection::RedisConnection;

use super::answer::{End, read_at_most, read_send_answer};
use super::token::{FETCH_TIMEOUT, FreshToken, Token, TokenManager, TokenSource};
use super::{
    Accepted, Failure, SendError, Sms, http_client, masked_words, retry_after, sensitive_header,
};
use crate::config::{InfobipAuth, InfobipConfig};
use crate::seal::SealKey;

pub struct Infobip {
    client: reqwest::Client,
    /// Parsed once, like Twilio's.
    send_url: reqwest::Url,
    sender: String,
    auth: Auth,
    /// Where Infobip posts delivery reports, when receipts are on.
    notify_url: Option<String>,
}

enum Auth {
    /// `App {key}`, built once and marked sensitive.
    ApiKey(HeaderValue),
    OAuth(Box<TokenManager<OAuthEndpoint>>),
}

/// The token endpoint, fetched through the shared [`TokenManager`].
struct OAuthEndpoint {
    client: reqwest::Client,
    url: String,
    client_id: String,
    client_secret: SecretString,
}

/// Longer than any bearer token a real endpoint issues (Infobip's are under 100 bytes), and it
/// goes into Redis and a header of every send.
const MAX_TOKEN_LEN: usize = 4_096;

/// An OAuth answer is a few hundred bytes; no more than this is read of one, so a broken
/// endpoint cannot fill the worker's memory.
const MAX_TOKEN_ANSWER: usize = 16 * 1024;

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

impl TokenSource for OAuthEndpoint {
    async fn fetch(&self) -> Result<FreshToken, String> {
        let form = [
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose_secret()),
            ("grant_type", "client_credentials"),
        ];
        let response = self
            .client
            .post(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .timeout(FETCH_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("infobip token endpoint: {}", e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("infobip token endpoint answered {status}"));
        }
        let body = read_at_most(response, MAX_TOKEN_ANSWER, FETCH_TIMEOUT).await;
        match body.end {
            End::Whole => {}
            End::TooLong => {
                return Err(format!(
                    "infobip token endpoint answered more than {MAX_TOKEN_ANSWER} bytes"
                ));
            }
            End::Stalled => return Err("infobip token endpoint: its answer stalled".to_owned()),
            End::Broken(e) => return Err(format!("infobip token endpoint: {}", e.without_url())),
        }
        let answer: TokenAnswer = serde_json::from_slice(&body.bytes)
            .map_err(|_| "infobip token endpoint answered an unreadable body".to_owned())?;
        // Refused here, before it is stored and shared: the refresh counts as failed, and no
        // worker is handed a token that every send would have to forget again.
        if answer.access_token.trim().is_empty() || answer.access_token.len() > MAX_TOKEN_LEN {
            return Err(format!(
                "infobip token endpoint answered a token of {} bytes (1 to {MAX_TOKEN_LEN} expected)",
                answer.access_token.len()
            ));
        }
        if sensitive_header(format!("Bearer {}", answer.access_token)).is_err() {
            return Err(
                "infobip token endpoint answered a token that cannot be sent as a header"
                    .to_owned(),
            );
        }
        Ok(FreshToken {
            token: SecretString::from(answer.access_token),
            lifetime: Duration::from_secs(answer.expires_in.max(1)),
        })
    }
}

/// The parts of a 200 answer that matter: the message id and its status.
#[derive(Deserialize)]
struct SendAnswer {
    #[serde(default)]
    messages: Vec<MessageAnswer>,
}

#[derive(Deserialize)]
struct MessageAnswer {
    #[serde(rename = "messageId")]
    message_id: Option<String>,
    status: Option<Status>,
}

#[derive(Deserialize)]
struct Status {
    #[serde(rename = "groupName")]
    group_name: Option<String>,
    id: Option<i64>,
    name: Option<String>,
}

/// Either error shape Infobip answers: `{errorCode, description, violations}` (v3) or
/// `{requestError: {serviceException: {messageId, text}}}` (older endpoints).
#[derive(Deserialize, Default)]
struct ErrorAnswer {
    #[serde(rename = "errorCode")]
    error_code: Option<String>,
    description: Option<String>,
    #[serde(default)]
    violations: Vec<Violation>,
    #[serde(rename = "requestError")]
    request_error: Option<RequestError>,
}

#[derive(Deserialize)]
struct Violation {
    property: Option<String>,
}

#[derive(Deserialize)]
struct RequestError {
    #[serde(rename = "serviceException")]
    service_exception: Option<ServiceException>,
}

#[derive(Deserialize)]
struct ServiceException {
    text: Option<String>,
}

impl Infobip {
    pub fn new(
        config: &InfobipConfig,
        redis: RedisConnection,
        namespace: &str,
        seal: Option<Arc<SealKey>>,
        notify_url: Option<String>,
    ) -> anyhow::Result<Self> {
        let client = http_client()?;
        let auth = match &config.auth {
            InfobipAuth::ApiKey(key) => Auth::ApiKey(
                sensitive_header(format!("App {}", key.expose_secret()))
                    .map_err(|_| anyhow::anyhow!("INFOBIP_API_KEY cannot be sent as a header"))?,
            ),
            InfobipAuth::OAuth {
                client_id,
                client_secret,
            } => {
                let seal = seal.ok_or_else(|| {
                    anyhow::anyhow!("WORKER_SEAL_KEY is required with Infobip OAuth")
                })?;
                let endpoint = OAuthEndpoint {
                    client: client.clone(),
                    url: format!("{}/auth/1/oauth2/token", config.base_url),
                    client_id: client_id.clone(),
                    client_secret: client_secret.clone(),
                };
                Auth::OAuth(Box::new(TokenManager::new(
                    "infobip", endpoint, redis, namespace, seal,
                )))
            }
        };
        Ok(Self {
            client,
            send_url: reqwest::Url::parse(&format!("{}/sms/3/messages", config.base_url))
                .map_err(|e| anyhow::anyhow!("INFOBIP_BASE_URL does not make a URL: {e}"))?,
            sender: config.sender.clone(),
            auth,
            notify_url,
        })
    }

    /// One attempt within `timeout`: a request starts only with enough of it left, and of the
    /// code's life ([`Within::left_at`]), its validity counted from then, so a code that ran out
    /// while a token was fetched is not sent.
    pub async fn send(&self, sms: &Sms<'_>, timeout: Duration) -> Result<Accepted, SendError> {
        let within = Within::starting_now(timeout, sms.expires_at);
        match &self.auth {
            Auth::ApiKey(header) => self.send_with(sms, within, header.clone()).await,
            Auth::OAuth(tokens) => {
                let token = self.token(tokens).await?;
                match self
                    .send_with(sms, within, bearer(tokens, &token).await?)
                    .await
                {
                    // The token was refused (expired early, or replaced when another worker
                    // fetched a new one): forget it once and try again with the current one.
                    Err(e) if e.status == Some(401) => {
                        sms.refused();
                        tokens.invalidate(&token).await;
                        if !(sms.may_start)() {
                            return Err(SendError {
                                kind: Failure::Withheld,
                                ..e
                            });
                        }
                        let token = self.token(tokens).await?;
                        match self
                            .send_with(sms, within, bearer(tokens, &token).await?)
                            .await
                        {
                            // No time left for the second try: the refusal is the answer, and
                            // counts as one (a provider refusing every token must open its
                            // breaker, not loop the event until its code runs out).
                            Err(late) if late.kind == Failure::NoTimeLeft => Err(e),
                            second => second,
                        }
                    }
                    other => other,
                }
            }
        }
    }

    async fn token(&self, tokens: &TokenManager<OAuthEndpoint>) -> Result<Token, SendError> {
        // Not cut short by the attempt's time: this send may be the one fetching the token that
        // every send waits for, and a fetch dropped halfway would hold the lock for its lease.
        // What the wait spent is looked at before the SMS goes (`Within::left_at`).
        tokens.token().await.map_err(|e| {
            // Nothing was sent: the provider's side failed before the message could go.
            SendError::new(Failure::Retryable, format!("infobip: no access token: {e}"))
        })
    }

    async fn send_with(
        &self,
        sms: &Sms<'_>,
        within: Within,
        authorization: HeaderValue,
    ) -> Result<Accepted, SendError> {
        let (timeout, validity_secs) = within.left_at(Instant::now()).ok_or_else(|| {
            SendError::new(
                Failure::NoTimeLeft,
                "infobip: too little of the attempt's time or of the code's life was left for the SMS to go",
            )
        })?;
        let to = sms.to.as_str().trim_start_matches('+');
        let mut message = json!({
            "sender": self.sender,
            "destinations": [{ "to": to, "messageId": sms.message_id }],
            "content": { "text": sms.body },
            "options": {
                "validityPeriod": { "amount": validity_secs, "timeUnit": "SECONDS" }
            }
        });
        if let Some(url) = &self.notify_url {
            message["webhooks"] = json!({
                "delivery": { "url": url },
                "contentType": "application/json"
            });
        }
        let body = json!({ "messages": [message] });
        sms.going_out();
        let response = self
            .client
            .post(self.send_url.clone())
            .header(reqwest::header::AUTHORIZATION, authorization)
            .header(reqwest::header::ACCEPT, "application/json")
            .json(&body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| SendError::transport("infobip", &e, sms.to))?;
        let status = response.status();
        let retry_after = retry_after(status, response.headers());
        let answer = read_send_answer("infobip", response, sms.to).await;
        let bytes = &answer.bytes;
        let status = status.as_u16();

        if (200..300).contains(&status) {
            let message = serde_json::from_slice::<SendAnswer>(bytes)
                .ok()
                .and_then(|answer| answer.messages.into_iter().next());
            let Some(message) = message else {
                return Ok(Accepted {
                    provider: "infobip",
                    message_id: None,
                    status: None,
                });
            };
            let group = message
                .status
                .as_ref()
                .and_then(|s| s.group_name.clone())
                .unwrap_or_default();
            let id = message.status.as_ref().and_then(|s| s.id);
            if group.eq_ignore_ascii_case("REJECTED") || group.eq_ignore_ascii_case("UNDELIVERABLE")
            {
                // A duplicate message id: this very event was accepted before (a redelivered copy).
                if id == Some(crate::receipts::infobip::REJECTED_DUPLICATE_MESSAGE_ID) {
                    return Ok(Accepted {
                        provider: "infobip",
                        message_id: message.message_id,
                        status: Some("duplicate".to_owned()),
                    });
                }
                let name = message.status.and_then(|s| s.name).unwrap_or_default();
                return Err(SendError {
                    kind: classify_rejection(id),
                    message: format!("infobip rejected the message: {}", masked_words(&name)),
                    status: Some(status),
                    code: id,
                    retry_after: None,
                });
            }
            return Ok(Accepted {
                provider: "infobip",
                message_id: message.message_id,
                status: Some(group),
            });
        }

        let error: ErrorAnswer = serde_json::from_slice(bytes).unwrap_or_default();
        let text = error
            .description
            .clone()
            .or_else(|| {
                error
                    .request_error
                    .as_ref()
                    .and_then(|r| r.service_exception.as_ref())
                    .and_then(|s| s.text.clone())
            })
            .unwrap_or_else(|| "no description".to_owned());
        let violated = Violated::of(&error.violations);
        let code = error
            .error_code
            .as_deref()
            .and_then(|c| c.trim_start_matches('E').parse().ok());
        Err(SendError {
            kind: answer.sorted(classify(status, violated)),
            message: format!("infobip answered {status}: {}", masked_words(&text)),
            status: Some(status),
            code,
            retry_after,
        })
    }
}

/// What the violations of a 400 are about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Violated {
    /// The number (`messages[0].destinations[0].to`): the requester's.
    Destination,
    /// Only the rest of the request (the sender, the text, the options): ours.
    Request,
    /// None named.
    Nothing,
}

impl Violated {
    fn of(violations: &[Violation]) -> Self {
        let properties = violations.iter().filter_map(|v| v.property.as_deref());
        let mut violated = Self::Nothing;
        for property in properties {
            // Only the number itself: the rest of a destination (its `messageId`) is ours.
            if property.ends_with(".to") {
                return Self::Destination;
            }
            violated = Self::Request;
        }
        violated
    }
}

/// An error answer, by HTTP status and what it says was wrong
/// (docs/messaging.md#the-provider-call). As for Twilio, only what no requester can cause counts
/// against Infobip.
fn classify(status: u16, violated: Violated) -> Failure {
    match (status, violated) {
        (429 | 408, _) => Failure::Retryable,
        (s, _) if s >= 500 => Failure::Retryable,
        // Credentials or the account's permissions: the provider refuses us.
        (401 | 403, _) => Failure::Provider,
        (400, Violated::Destination) => Failure::Recipient,
        (400, Violated::Request) => Failure::Provider,
        (400, Violated::Nothing) => Failure::Unrecognised,
        // A 404, 405 or 415 is about where and how we send (a wrong base URL, a proxy's page).
        _ => Failure::Provider,
    }
}

/// A REJECTED or UNDELIVERABLE status in a 200 answer, by Infobip's status id.
fn classify_rejection(id: Option<i64>) -> Failure {
    match id {
        // Unknown prefix, do-not-disturb, blocklisted or invalid destination; flooding and
        // anti-fraud blocks are policies another provider must not be used to get around.
        Some(8 | 10 | 14 | 20 | 52 | 87) => Failure::Recipient,
        // Sender, credit, package or route settings of the account.
        Some(11 | 12 | 13 | 17 | 19) => Failure::Provider,
        // The operator's network is not set up on the account, or the operator refused it; or
        // a test account may not send to this number (18, as Twilio's 21608): the number is
        // the requester's choice, so it must not open the breaker.
        Some(4 | 6 | 18) => Failure::Route,
        Some(21 | 100) => Failure::Retryable,
        _ => Failure::Unrecognised,
    }
}

/// `Bearer {token}` as a sensitive header. Fetched tokens were checked already; one that still
/// cannot be a header (stored by an older worker) is forgotten, so that the retry fetches another
/// instead of failing the same way until it expires.
async fn bearer(
    tokens: &TokenManager<OAuthEndpoint>,
    token: &Token,
) -> Result<HeaderValue, SendError> {
    match sensitive_header(format!("Bearer {}", token.value.expose_secret())) {
        Ok(header) => Ok(header),
        Err(_) => {
            tokens.invalidate(token).await;
            Err(SendError::new(
                Failure::Retryable,
                "infobip: the access token cannot be sent as a header".to_owned(),
            ))
        }
    }
}

/// Less of the code's life than this is not worth an SMS (the worker's own floor before any
/// attempt, `MIN_MILLIS_LEFT`).
const LEAST_LIFE: Duration = Duration::from_secs(1);

/// One attempt's time: it must end by `deadline`, and the SMS is of use until `expires_at`.
#[derive(Clone, Copy)]
struct Within {
    deadline: Instant,
    expires_at: Instant,
    /// Below this much of the attempt's time, a request would likely time out after it went
    /// out (an ambiguous send, where not sending is clean): a second, or half the attempt.
    least_time: Duration,
}

impl Within {
    fn starting_now(timeout: Duration, expires_at: Instant) -> Self {
        Self {
            deadline: Instant::now() + timeout,
            expires_at,
            least_time: (timeout / 2).min(Duration::from_secs(1)),
        }
    }

    /// At `now`: the time left for a request, and the SMS's validity in whole seconds; `None`
    /// once too little of either is left.
    fn left_at(&self, now: Instant) -> Option<(Duration, u64)> {
        let time = self.deadline.checked_duration_since(now)?;
        let life = self.expires_at.checked_duration_since(now)?;
        let enough = time >= self.least_time && life >= LEAST_LIFE;
        enough.then_some((time, life.as_secs().max(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_sends_only_with_time_and_validity_left() {
        let now = Instant::now();
        let within = Within {
            deadline: now + Duration::from_secs(3),
            expires_at: now + Duration::from_millis(2_500),
            least_time: Duration::from_secs(1),
        };
        assert_eq!(
            within.left_at(now),
            Some((Duration::from_secs(3), 2)),
            "whole seconds of the code's life"
        );
        let later = |millis| now + Duration::from_millis(millis);
        assert_eq!(
            within.left_at(later(1_400)),
            Some((Duration::from_millis(1_600), 1))
        );
        assert_eq!(within.left_at(later(1_600)), None, "under a second of life");
        let short_attempt = Within {
            expires_at: now + Duration::from_secs(60),
            ..within
        };
        assert_eq!(
            short_attempt.left_at(later(2_100)),
            None,
            "under a second of the attempt, which would end in doubt"
        );
    }

    #[test]
    fn classifies_infobip_answers() {
        use Violated::*;
        assert_eq!(classify(429, Nothing), Failure::Retryable);
        assert_eq!(classify(503, Nothing), Failure::Retryable);
        assert_eq!(classify(401, Nothing), Failure::Provider);
        assert_eq!(classify(403, Nothing), Failure::Provider);
        assert_eq!(classify(400, Destination), Failure::Recipient);
        assert_eq!(classify(400, Request), Failure::Provider);
        assert_eq!(classify(400, Nothing), Failure::Unrecognised);
        for status in [404, 405, 415] {
            assert_eq!(classify(status, Nothing), Failure::Provider, "{status}");
        }
        assert_eq!(classify_rejection(Some(52)), Failure::Recipient);
        assert_eq!(classify_rejection(Some(12)), Failure::Provider);
        assert_eq!(classify_rejection(Some(6)), Failure::Route);
        assert_eq!(classify_rejection(Some(18)), Failure::Route);
        assert_eq!(classify_rejection(Some(21)), Failure::Retryable);
        assert_eq!(classify_rejection(Some(9_999)), Failure::Unrecognised);
        assert_eq!(classify_rejection(None), Failure::Unrecognised);
    }

    #[test]
    fn a_400_is_the_recipients_only_when_it_names_the_destination() {
        let violated = |json: &str| {
            let answer: ErrorAnswer = serde_json::from_str(json).unwrap();
            Violated::of(&answer.violations)
        };
        assert_eq!(
            violated(
                r#"{"violations":[{"property":"messages[0].sender"},{"property":"messages[0].destinations[0].to"}]}"#
            ),
            Violated::Destination
        );
        assert_eq!(
            violated(r#"{"violations":[{"property":"messages[0].sender"}]}"#),
            Violated::Request
        );
        assert_eq!(
            violated(r#"{"violations":[{"property":"messages[0].destinations[0].messageId"}]}"#),
            Violated::Request
        );
        assert_eq!(
            violated(r#"{"violations":[{"violation":"no property"}]}"#),
            Violated::Nothing
        );
        assert_eq!(violated("{}"), Violated::Nothing);
    }

    #[test]
    fn reads_both_error_shapes() {
        let v3: ErrorAnswer = serde_json::from_str(
            r#"{"errorCode":"E400","description":"Request cannot be processed.","action":"x","violations":[{"property":"messages[0].destinations[0].to","violation":"bad"}],"resources":[]}"#,
        )
        .unwrap();
        assert_eq!(v3.error_code.as_deref(), Some("E400"));
        assert_eq!(v3.violations.len(), 1);
        let legacy: ErrorAnswer = serde_json::from_str(
            r#"{"requestError":{"serviceException":{"messageId":"UNAUTHORIZED","text":"Invalid login details"}}}"#,
        )
        .unwrap();
        assert_eq!(
            legacy
                .request_error
                .unwrap()
                .service_exception
                .unwrap()
                .text
                .as_deref(),
            Some("Invalid login details")
        );
    }
}
