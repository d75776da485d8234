//! `POST /v1/otp`, `POST /v1/otp/verify` and the one-endpoint `POST /v1/signup`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use shared::OtpRequested;
use utoipa::ToSchema;

use crate::db;
use crate::error::{ApiError, Dependency, error_chain};
use crate::extract::{ApiJson, ClientIp};
use crate::otp::{self, CheckOutcome, Issue, IssueOutcome};
use crate::phone;
use crate::request_id::RequestId;
use crate::routes::SessionView;
use crate::state::AppState;

#[derive(Debug, Deserialize, ToSchema)]
pub struct OtpRequestBody {
    /// E.164 (`+14155550100`), or national format when the server has a `DEFAULT_REGION`.
    #[schema(example = "+14155550100")]
    pub phone_number: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OtpAccepted {
    /// The number the code goes to, in E.164.
    pub phone_number: String,
    /// Seconds the code stays valid.
    pub expires_in: u64,
    /// Seconds before another code may be requested for this number.
    pub resend_after: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct VerifyBody {
    #[schema(example = "+14155550100")]
    pub phone_number: String,
    /// The code from the SMS.
    #[schema(example = "123456")]
    pub otp: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SignupBody {
    #[schema(example = "+14155550100")]
    pub phone_number: String,
    /// Absent: send a code. Present: verify it.
    pub otp: Option<String>,
}

/// Sends a one-time password by SMS.
///
/// The answer is the same whether or not the number has an account.
#[utoipa::path(post, path = "/v1/otp", tag = "sign-in", request_body = OtpRequestBody,
    responses(
        (status = 202, description = "Code stored and its SMS queued", body = OtpAccepted),
        (status = 400, description = "Malformed body"),
        (status = 422, description = "`invalid_phone_number` or `country_not_allowed`"),
        (status = 429, description = "`rate_limited`; see `Retry-After`"),
        (status = 503, description = "`unavailable`; see `Retry-After`"),
    ))]
pub async fn request_otp(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    request_id: axum::Extension<RequestId>,
    ApiJson(body): ApiJson<OtpRequestBody>,
) -> Result<Response, ApiError> {
    let accepted = issue(&state, &body.phone_number, ip, &request_id.0.0).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

async fn issue(
    state: &AppState,
    raw_phone: &str,
    ip: std::net::IpAddr,
    request_id: &str,
) -> Result<OtpAccepted, ApiError> {
    let phone = phone::normalize(raw_phone, &state.config.phone)?;
    let policy = &state.config.otp;
    let code = otp::generate_code(policy.length);
    let issue = Issue {
        phone: &phone,
        client_ip: ip,
        digest: state.hasher.digest(&phone, &code),
        event_id: uuid::Uuid::nil(),
    };
    let event = OtpRequested::valid_for(phone.clone(), code, policy.ttl, request_id.to_owned());
    let issue = Issue {
        event_id: event.event_id,
        ..issue
    };
    let event_id = event.event_id;
    let mut redis = state.redis();

    let outcome = state.otp_store.issue(&mut redis, policy, &issue).await?;
    if let IssueOutcome::Refused { retry_after } = outcome {
        metrics::counter!("otp_requests_total", "outcome" => "rate_limited").increment(1);
        tracing::info!(%phone, retry_after_ms = retry_after.as_millis(), "OTP request refused by rate limit");
        return Err(ApiError::RateLimited { retry_after });
    }

    let started = std::time::Instant::now();
    let published = state.publisher.publish(&event).await;
    metrics::histogram!("amqp_publish_duration_seconds").record(started.elapsed().as_secs_f64());
    if let Err(e) = published {
        metrics::counter!("otp_requests_total", "outcome" => "unavailable").increment(1);
        // The code was never sent: it must not stay valid, and the attempt should not count.
        if let Err(undo) = state.otp_store.withdraw(&mut redis, &issue).await {
            tracing::error!(error = %undo, %event_id, "could not withdraw an unpublished OTP; it expires unsent");
        }
        return Err(ApiError::unavailable(Dependency::RabbitMq, e));
    }
    metrics::counter!("otp_requests_total", "outcome" => "accepted").increment(1);
    tracing::info!(%phone, %event_id, "OTP requested");
    Ok(OtpAccepted {
        phone_number: phone.as_str().to_owned(),
        expires_in: policy.ttl.as_secs(),
        resend_after: policy.resend_gap.as_secs(),
    })
}

/// Checks a code and signs the user in, creating the account on first success.
///
/// A code works once. Wrong, expired, used and never-requested codes get one and the same answer.
#[utoipa::path(post, path = "/v1/otp/verify", tag = "sign-in", request_body = VerifyBody,
    responses(
        (status = 200, description = "Signed in", body = SessionView),
        (status = 400, description = "Malformed body"),
        (status = 401, description = "`invalid_otp`"),
        (status = 422, description = "`invalid_phone_number`, `country_not_allowed` or `invalid_otp_format`"),
        (status = 429, description = "`too_many_attempts`: the code is burned; request a new one"),
        (status = 503, description = "`unavailable`"),
    ))]
pub async fn verify_otp(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<VerifyBody>,
) -> Result<Json<SessionView>, ApiError> {
    verify(&state, &body.phone_number, &body.otp)
        .await
        .map(Json)
}

async fn verify(state: &AppState, raw_phone: &str, code: &str) -> Result<SessionView, ApiError> {
    let phone = phone::normalize(raw_phone, &state.config.phone)?;
    let policy = &state.config.otp;
    if !otp::is_well_formed(code, policy.length) {
        return Err(ApiError::InvalidOtpFormat {
            length: policy.length,
        });
    }
    // Fail before consuming the code if the session could not be stored anyway.
    let pool = state.db()?;
    let digest = state.hasher.digest(&phone, code);
    let mut redis = state.redis();
    let consumed = match state
        .otp_store
        .check_guess(&mut redis, &phone, &digest, policy.max_attempts)
        .await?
    {
        CheckOutcome::Accepted(consumed) => consumed,
        CheckOutcome::Rejected => {
            metrics::counter!("otp_verifications_total", "outcome" => "invalid").increment(1);
            tracing::info!(%phone, "OTP rejected");
            return Err(ApiError::InvalidOtp);
        }
        CheckOutcome::Burned => {
            metrics::counter!("otp_verifications_total", "outcome" => "burned").increment(1);
            return Err(ApiError::TooManyAttempts);
        }
    };
    match db::sign_in(pool, &phone, &state.lifetimes).await {
        Ok(session) => {
            metrics::counter!("otp_verifications_total", "outcome" => "accepted").increment(1);
            tracing::info!(user_id = %session.user.id, new_user = session.new_user, "signed in");
            Ok(SessionView::new(session, &state.lifetimes))
        }
        Err(e) => {
            // Nothing half-done: give the code back so the user can retry once PostgreSQL is back.
            if let Err(undo) = state.otp_store.restore(&mut redis, &phone, &consumed).await {
                tracing::warn!(error = %error_chain(&undo.into()), "could not restore a consumed OTP");
            }
            Err(e.into())
        }
    }
}

/// The one-endpoint flow: without `otp` it sends a code (as `/v1/otp`), with it it verifies
/// (as `/v1/otp/verify`).
#[utoipa::path(post, path = "/v1/signup", tag = "sign-in", request_body = SignupBody,
    responses(
        (status = 202, description = "Without `otp`: code sent", body = OtpAccepted),
        (status = 200, description = "With `otp`: signed in", body = SessionView),
        (status = 400, description = "Malformed body"),
        (status = 401, description = "`invalid_otp`"),
        (status = 422, description = "Invalid phone number or OTP format"),
        (status = 429, description = "`rate_limited` or `too_many_attempts`"),
        (status = 503, description = "`unavailable`"),
    ))]
pub async fn signup(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    request_id: axum::Extension<RequestId>,
    ApiJson(body): ApiJson<SignupBody>,
) -> Result<Response, ApiError> {
    match body.otp {
        Some(code) => Ok(Json(verify(&state, &body.phone_number, &code).await?).into_response()),
        None => {
            let accepted = issue(&state, &body.phone_number, ip, &request_id.0.0).await?;
            Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
        }
    }
}
