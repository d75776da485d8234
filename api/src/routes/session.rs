//! `POST /v1/token/refresh`, `POST /v1/logout` and `GET /v1/me`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::auth::AuthUser;
use crate::db::{self, RefreshOutcome};
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::routes::{SessionView, UserView};
use crate::state::{AppState, db_error};
use crate::tokens;

#[derive(Debug, Deserialize, ToSchema)]
pub struct RefreshBody {
    pub refresh_token: String,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct LogoutBody {
    /// Sign out everywhere: revoke every token of the user.
    #[serde(default)]
    pub all: bool,
}

/// Exchanges a refresh token for a new session.
///
/// The old refresh token stops working. Presenting an already-rotated refresh token revokes its
/// whole family (every token of that sign-in) and answers 401.
#[utoipa::path(post, path = "/v1/token/refresh", tag = "session", request_body = RefreshBody,
    responses(
        (status = 200, description = "New session", body = SessionView),
        (status = 400, description = "Malformed body", body = crate::error::ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "`invalid_refresh_token`", body = crate::error::ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`", body = crate::error::ProblemBody, content_type = "application/problem+json"),
    ))]
pub async fn refresh(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshBody>,
) -> Result<Json<SessionView>, ApiError> {
    if !tokens::is_well_formed(&body.refresh_token) {
        return Err(ApiError::InvalidRefreshToken);
    }
    let pool = state.db()?;
    let hash = tokens::hash(&body.refresh_token);
    match db::refresh(pool, &hash, &state.lifetimes)
        .await
        .map_err(db_error)?
    {
        RefreshOutcome::Rotated(session) => {
            metrics::counter!("token_refreshes_total", "outcome" => "rotated").increment(1);
            Ok(Json(SessionView::new(session, &state.lifetimes)))
        }
        RefreshOutcome::Reused => {
            metrics::counter!("token_refreshes_total", "outcome" => "reused").increment(1);
            tracing::warn!("a rotated refresh token was presented again; its family is revoked");
            Err(ApiError::InvalidRefreshToken)
        }
        RefreshOutcome::Invalid => {
            metrics::counter!("token_refreshes_total", "outcome" => "invalid").increment(1);
            Err(ApiError::InvalidRefreshToken)
        }
    }
}

/// Signs out: revokes this session's tokens, or with `{"all": true}` every token of the user.
#[utoipa::path(post, path = "/v1/logout", tag = "session", request_body(content = Option<LogoutBody>, description = "Optional"),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Signed out"),
        (status = 400, description = "Malformed body", body = crate::error::ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = crate::error::ProblemBody, content_type = "application/problem+json"),
    ))]
pub async fn logout(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        LogoutBody::default()
    } else {
        let is_json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json") || v.contains("+json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        serde_json::from_slice::<LogoutBody>(&body).map_err(|e| {
            ApiError::InvalidRequest(format!("Failed to parse the request body as JSON: {e}"))
        })?
    };
    let pool = state.db()?;
    let revoked = if request.all {
        db::revoke_user(pool, caller.user.id).await
    } else {
        db::revoke_family(pool, caller.family_id).await
    }
    .map_err(db_error)?;
    tracing::info!(user_id = %caller.user.id, all = request.all, revoked, "signed out");
    Ok(StatusCode::NO_CONTENT)
}

/// The signed-in user.
#[utoipa::path(get, path = "/v1/me", tag = "session", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller", body = UserView),
        (status = 401, description = "`unauthorized`", body = crate::error::ProblemBody, content_type = "application/problem+json"),
    ))]
pub async fn me(AuthUser(caller): AuthUser) -> Json<UserView> {
    Json(caller.user.into())
}
