//! The one place that maps failures to HTTP: every error leaves as RFC 9457 problem+json
//! (docs/api.md#errors).
//!
//! Handlers return [`ApiError`] (with `?`: database and Redis errors convert by themselves). Its
//! `IntoResponse` sets the status and headers and attaches a [`Problem`] to the response, plus
//! the error itself for [`log_errors`]: as in axum's `error-handling` example, an error is logged
//! by a middleware inside the request's span rather than in `IntoResponse`, which cannot see the
//! request and also runs for errors nobody needs logged (a 404). [`render_problems`] (the
//! outermost middleware after the request id) writes the body with the request id, and also
//! turns bare error responses made by layers (405 from the router, 413 from the body limit, a
//! timeout) into problems.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::request_id::RequestId;

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// A dependency the api cannot work without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Postgres,
    Redis,
    RabbitMq,
}

impl Dependency {
    pub fn name(self) -> &'static str {
        match self {
            Dependency::Postgres => "postgres",
            Dependency::Redis => "redis",
            Dependency::RabbitMq => "rabbitmq",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the request body is larger than the limit of 16 KiB (16384 bytes)")]
    PayloadTooLarge,
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("{}", phone_hint(.default_region.as_deref()))]
    InvalidPhoneNumber {
        /// `DEFAULT_REGION`, when numbers may be written in its national format.
        default_region: Option<String>,
    },
    #[error("OTPs cannot be sent to this country")]
    CountryNotAllowed,
    #[error("OTPs cannot be sent to this kind of number (premium-rate, satellite, landline…)")]
    NumberTypeNotAllowed,
    #[error("the OTP must be {length} digits")]
    InvalidOtpFormat { length: u32 },
    #[error("the OTP is wrong, expired, already used or was never requested")]
    InvalidOtp,
    #[error("too many wrong guesses: request a new OTP")]
    TooManyAttempts,
    #[error("{}; retry in {} s", .limit.describe(), whole_seconds(*.retry_after))]
    RateLimited { limit: Limit, retry_after: Duration },
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("the refresh token is unknown, expired, revoked or was already used")]
    InvalidRefreshToken,
    #[error("no such resource")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{} is unavailable", .dependency.name())]
    Unavailable {
        dependency: Dependency,
        #[source]
        source: anyhow::Error,
    },
    /// `/readyz` with at least one dependency down; `checks` is each dependency's state.
    #[error("not ready: {} unavailable", .down.join(", "))]
    NotReady {
        down: Vec<&'static str>,
        checks: serde_json::Value,
    },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// How to write a number this server accepts.
fn phone_hint(default_region: Option<&str>) -> String {
    match default_region {
        None => "the phone number is not valid: write it in E.164, a + then the country code and the number, e.g. +14155550100".to_owned(),
        Some(region) => format!(
            "the phone number is not valid: write it as a {region} number, or in E.164 (a + then the country code and the number, e.g. +14155550100)"
        ),
    }
}

/// Which limit refused a request: named in the problem's `detail`, so a client (or its
/// developer) knows what to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    ResendGap,
    PhonePerHour,
    PhonePerDay,
    IpPerHour,
    Ipv6SitePerHour,
    CountryPerHour,
    Global,
    FraudGuard,
    VerifyFailsPerIp,
    VerifyFailsPerPhone,
    RefreshesPerSessionPerMinute,
    RefreshesPerSessionPerDay,
}

impl Limit {
    fn describe(self) -> &'static str {
        match self {
            Self::ResendGap => "a code was sent to this number moments ago (OTP_RESEND_SECS)",
            Self::PhonePerHour => "too many codes sent to this number in the last hour",
            Self::PhonePerDay => "too many codes sent to this number in the last day",
            Self::IpPerHour => "too many codes requested from your network in the last hour",
            Self::Ipv6SitePerHour => {
                "too many codes requested from your network's IPv6 /48 in the last hour"
            }
            Self::CountryPerHour => "too many codes sent to this country in the last hour",
            Self::Global => "the service is sending too many codes right now",
            Self::FraudGuard => {
                "codes to this destination are temporarily blocked: too few of them are being used (SMS fraud guard)"
            }
            Self::VerifyFailsPerIp => "too many wrong codes from your network in the last hour",
            Self::VerifyFailsPerPhone => {
                "too many wrong codes for this number today; sign in with the challenge_id of a new code"
            }
            Self::RefreshesPerSessionPerMinute => {
                "this session is refreshing too often (REFRESH_PER_SESSION_PER_MINUTE)"
            }
            Self::RefreshesPerSessionPerDay => {
                "this session has refreshed too many times today (REFRESH_PER_SESSION_PER_DAY)"
            }
        }
    }
}

/// Rounded up: retrying a fraction of a second early would only be refused again.
fn whole_seconds(duration: Duration) -> u64 {
    (duration.as_secs() + u64::from(duration.subsec_nanos() > 0)).max(1)
}

/// Seconds a client should wait before retrying after a 503.
const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 2;

impl ApiError {
    pub fn unavailable(dependency: Dependency, source: impl Into<anyhow::Error>) -> Self {
        Self::Unavailable {
            dependency,
            source: source.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidPhoneNumber { .. }
            | Self::CountryNotAllowed
            | Self::NumberTypeNotAllowed
            | Self::InvalidOtpFormat { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InvalidOtp | Self::Unauthorized | Self::InvalidRefreshToken => {
                StatusCode::UNAUTHORIZED
            }
            Self::TooManyAttempts | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable { .. } | Self::NotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable `code` (docs/api.md#errors).
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::InvalidPhoneNumber { .. } => "invalid_phone_number",
            Self::CountryNotAllowed => "country_not_allowed",
            Self::NumberTypeNotAllowed => "number_type_not_allowed",
            Self::InvalidOtpFormat { .. } => "invalid_otp_format",
            Self::InvalidOtp => "invalid_otp",
            Self::TooManyAttempts => "too_many_attempts",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::InvalidRefreshToken => "invalid_refresh_token",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Unavailable { .. } | Self::NotReady { .. } => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// What the client is told. Causes of 500s and 503s stay in the log.
    fn detail(&self) -> String {
        match self {
            Self::Internal(_) => "an unexpected error occurred; it has been logged".to_owned(),
            other => other.to_string(),
        }
    }
}

/// Database failures that mean "PostgreSQL is away or overloaded" are 503s; anything else is a
/// bug and a 500.
impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        let unavailable = match &error {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => true,
            // 08: connection exceptions; 57P: admin shutdown / cannot connect now; 53300: too
            // many connections; 57014: a statement cancelled, as the statement timeout does
            // (startup.rs); 55P03: a lock not available in time.
            sqlx::Error::Database(db) => db.code().is_some_and(|c| {
                c.starts_with("08")
                    || c.starts_with("57P")
                    || c == "53300"
                    || c == "57014"
                    || c == "55P03"
            }),
            _ => false,
        };
        if unavailable {
            Self::unavailable(Dependency::Postgres, error)
        } else {
            Self::Internal(error.into())
        }
    }
}

/// Every Redis failure seen here is the server being away, slow or refusing: a 503.
impl From<redis::RedisError> for ApiError {
    fn from(error: redis::RedisError) -> Self {
        Self::unavailable(Dependency::Redis, error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = status.into_response();
        let headers = response.headers_mut();
        match &self {
            Self::RateLimited { retry_after, .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(whole_seconds(*retry_after)),
                );
            }
            Self::Unavailable { .. } | Self::NotReady { .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(UNAVAILABLE_RETRY_AFTER_SECS),
                );
            }
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        let extra = match &self {
            Self::NotReady { checks, .. } => Some(serde_json::json!({ "checks": checks })),
            _ => None,
        };
        response.extensions_mut().insert(Problem {
            code: self.code(),
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: self.detail(),
            extra,
        });
        response.extensions_mut().insert(Arc::new(self));
        response
    }
}

/// Logs the errors worth an operator's attention, inside the request's span so the line carries
/// the request id. Runs just inside the tracing layer.
pub async fn log_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    match response
        .extensions()
        .get::<Arc<ApiError>>()
        .map(AsRef::as_ref)
    {
        Some(ApiError::Internal(source)) => tracing::error!(error = ?source, "internal error"),
        Some(ApiError::Unavailable { dependency, source }) => {
            tracing::warn!(dependency = dependency.name(), error = %error_chain(source), "dependency unavailable");
        }
        _ => {}
    }
    response
}

/// `a: b: c` for an error and its sources, for a log line.
pub fn error_chain(error: &anyhow::Error) -> String {
    error
        .chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// An RFC 9457 problem, rendered by [`render_problems`] once the request id is known.
#[derive(Debug, Clone)]
pub struct Problem {
    pub code: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// More members, e.g. the per-dependency checks of `/readyz`.
    pub extra: Option<serde_json::Value>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ProblemBody<'a> {
    /// A URI naming the problem type: `urn:otp-auth:problem:{code}`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'a str,
    pub status: u16,
    pub detail: &'a str,
    /// Stable, machine-readable error code.
    pub code: &'a str,
    pub request_id: &'a str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub extra: Option<&'a serde_json::Value>,
}

impl Problem {
    /// The problem for an error response that a layer produced without one.
    fn for_bare_status(status: StatusCode) -> Self {
        let error = match status {
            StatusCode::NOT_FOUND => ApiError::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType,
            StatusCode::REQUEST_TIMEOUT
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => {
                return Problem {
                    code: "unavailable",
                    title: "Service Unavailable",
                    status: StatusCode::SERVICE_UNAVAILABLE.as_u16(),
                    detail: "the request took too long; retry later".to_owned(),
                    extra: None,
                };
            }
            s if s.is_client_error() => {
                ApiError::InvalidRequest(s.canonical_reason().unwrap_or("bad request").to_owned())
            }
            _ => ApiError::Internal(anyhow::anyhow!("unhandled {status}")),
        };
        Problem {
            code: error.code(),
            title: error.status().canonical_reason().unwrap_or("Error"),
            status: error.status().as_u16(),
            detail: error.detail(),
            extra: None,
        }
    }

    fn into_body(self, request_id: &str) -> Vec<u8> {
        let body = ProblemBody {
            kind: format!("urn:otp-auth:problem:{}", self.code),
            title: self.title,
            status: self.status,
            detail: &self.detail,
            code: self.code,
            request_id,
            extra: self.extra.as_ref(),
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// Writes every error response as problem+json carrying the request id.
pub async fn render_problems(request: Request, next: Next) -> Response {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_default();
    let response = next.run(request).await;
    let status = response.status();
    let problem = response.extensions().get::<Problem>().cloned();
    let problem = match problem {
        Some(problem) => problem,
        None if status.is_client_error() || status.is_server_error() => {
            let already_problem = response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|ct| ct.as_bytes().starts_with(PROBLEM_CONTENT_TYPE.as_bytes()));
            if already_problem {
                return response;
            }
            let problem = Problem::for_bare_status(status);
            if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
                tracing::error!(%status, "a layer answered with a bare server error");
            }
            problem
        }
        None => return response,
    };
    let (mut parts, _) = response.into_parts();
    let body = problem.into_body(&request_id);
    if matches!(
        parts.status,
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT
    ) {
        parts.status = StatusCode::SERVICE_UNAVAILABLE;
    }
    if parts.status == StatusCode::SERVICE_UNAVAILABLE
        && !parts.headers.contains_key(header::RETRY_AFTER)
    {
        parts.headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(UNAVAILABLE_RETRY_AFTER_SECS),
        );
    }
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}
