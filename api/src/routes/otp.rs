//! `POST /v1/otp`, `POST /v1/otp/verify` and the one-endpoint `POST /v1/signup`. The rules are in
//! [`crate::signin`]; these handlers read the body and shape the answer.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::client_ip::ClientIp;
use crate::error::ApiError;
use crate::extract::{ApiJson, Arrived};
use crate::request_id::RequestId;
use crate::routes::SessionView;
use crate::signin::request::request_code;
use crate::signin::verify::{Guess, verify_code};
use crate::state::AppState;
use crate::{locale, phone};

#[derive(Debug, Deserialize, ToSchema)]
pub struct OtpRequestBody {
    /// E.164 (`+14155550100`; spaces, dashes and parentheses are tolerated), or national format
    /// when the server has a `DEFAULT_REGION`.
    #[schema(example = "+14155550100", pattern = r"^\+[1-9][0-9]{6,14}$")]
    pub phone_number: String,
    /// The language of the SMS, a BCP 47 tag (`es`, `pt-BR`); without it, the best language of
    /// `Accept-Language`. The worker uses `SMS_TEMPLATE_<LANG>` when it has one.
    #[schema(example = "es")]
    pub locale: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OtpAccepted {
    /// The number the code goes to, in E.164.
    #[schema(example = "+14155550100")]
    pub phone_number: String,
    /// Seconds the code stays valid.
    pub expires_in: u64,
    /// Seconds before another code may be requested for this number.
    pub resend_after: u64,
    /// This code's handle: send it back with the code. Guesses that carry it have a budget of
    /// their own, so nobody without it can lock this sign-in out.
    #[schema(example = "MFRGGZDFMZTWQ2LKNNWG23TPOA")]
    pub challenge_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct VerifyBody {
    #[schema(example = "+14155550100", pattern = r"^\+[1-9][0-9]{6,14}$")]
    pub phone_number: String,
    /// The code from the SMS: `OTP_LENGTH` digits.
    #[schema(example = "123456", pattern = "^[0-9]{4,10}$")]
    pub otp: String,
    /// The `challenge_id` of the 202 that sent the code. Optional, but without it a stranger's
    /// wrong guesses can close unbound verification of the code.
    pub challenge_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SignupBody {
    #[schema(example = "+14155550100", pattern = r"^\+[1-9][0-9]{6,14}$")]
    pub phone_number: String,
    /// Absent: send a code. Present: verify it.
    #[schema(pattern = "^[0-9]{4,10}$")]
    pub otp: Option<String>,
    /// With `otp`: the `challenge_id` of the 202 that sent it.
    pub challenge_id: Option<String>,
    /// Without `otp`: the language of the SMS, as in `/v1/otp`.
    pub locale: Option<String>,
}

/// Sends a one-time password by SMS.
///
/// The answer is the same whether or not the number has an account.
#[utoipa::path(post, path = "/v1/otp", tag = "sign-in", request_body = OtpRequestBody,
    responses(
        (status = 202, description = "Code stored and its SMS queued", body = OtpAccepted),
        (status = 422, description = "`invalid_phone_number`, `country_not_allowed` or `number_type_not_allowed`"),
        (status = 429, description = "`rate_limited`: `detail` names the limit, `Retry-After` says when to retry"),
        (status = 503, description = "`unavailable`; see `Retry-After`"),
    ))]
pub async fn request_otp(
    Arrived(arrived): Arrived,
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    request_id: axum::Extension<RequestId>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<OtpRequestBody>,
) -> Result<Response, ApiError> {
    let locale = locale::choose(body.locale.as_deref(), &headers)?;
    send_code(
        &state,
        &body.phone_number,
        locale,
        ip,
        &request_id.0.0,
        arrived,
    )
    .await
}

async fn send_code(
    state: &AppState,
    raw_phone: &str,
    locale: Option<String>,
    ip: std::net::IpAddr,
    request_id: &str,
    arrived: tokio::time::Instant,
) -> Result<Response, ApiError> {
    let destination = phone::normalize(raw_phone, &state.config.phone)?;
    let requested = request_code(state, destination, locale, ip, request_id, arrived).await?;
    let policy = &state.config.otp;
    let accepted = OtpAccepted {
        phone_number: requested.phone.as_str().to_owned(),
        expires_in: policy.ttl.as_secs(),
        resend_after: policy.resend_gap.as_secs(),
        challenge_id: requested.challenge_id,
    };
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

/// Checks a code and signs the user in, creating the account on first success.
///
/// A code works once. Wrong, expired, used and never-requested codes, and a `challenge_id` that
/// is not the code's, get one and the same answer.
#[utoipa::path(post, path = "/v1/otp/verify", tag = "sign-in", request_body = VerifyBody,
    responses(
        (status = 200, description = "Signed in", body = SessionView),
        (status = 401, description = "`invalid_otp`"),
        (status = 422, description = "`invalid_phone_number`, `country_not_allowed`, `number_type_not_allowed` or `invalid_otp_format`"),
        (status = 429, description = "`too_many_attempts`: the code is burned, request a new one; or `rate_limited`: too many wrong guesses from this network or for this number"),
        (status = 503, description = "`unavailable`"),
    ))]
pub async fn verify_otp(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(body): ApiJson<VerifyBody>,
) -> Result<Json<SessionView>, ApiError> {
    check_code(&state, &body.phone_number, body.otp, body.challenge_id, ip)
        .await
        .map(Json)
}

async fn check_code(
    state: &AppState,
    raw_phone: &str,
    code: String,
    challenge_id: Option<String>,
    ip: std::net::IpAddr,
) -> Result<SessionView, ApiError> {
    let guess = Guess {
        destination: phone::normalize(raw_phone, &state.config.phone)?,
        code,
        challenge_id,
        client: ip,
    };
    let session = verify_code(state, guess).await?;
    Ok(SessionView::new(session))
}

/// The one-endpoint flow: without `otp` it sends a code (as `/v1/otp`), with it it verifies
/// (as `/v1/otp/verify`).
#[utoipa::path(post, path = "/v1/signup", tag = "sign-in", request_body = SignupBody,
    responses(
        (status = 202, description = "Without `otp`: code sent", body = OtpAccepted),
        (status = 200, description = "With `otp`: signed in", body = SessionView),
        (status = 401, description = "`invalid_otp`"),
        (status = 422, description = "Invalid phone number, number type or OTP format"),
        (status = 429, description = "`rate_limited` or `too_many_attempts`"),
        (status = 503, description = "`unavailable`"),
    ))]
pub async fn signup(
    Arrived(arrived): Arrived,
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    request_id: axum::Extension<RequestId>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SignupBody>,
) -> Result<Response, ApiError> {
    match body.otp {
        Some(code) => {
            let session =
                check_code(&state, &body.phone_number, code, body.challenge_id, ip).await?;
            Ok(Json(session).into_response())
        }
        None => {
            let locale = locale::choose(body.locale.as_deref(), &headers)?;
            send_code(
                &state,
                &body.phone_number,
                locale,
                ip,
                &request_id.0.0,
                arrived,
            )
            .await
        }
    }
}
