//! Bearer-token authentication: `authenticate` runs on every request and records who is calling;
//! `require_user` guards the protected routes.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;

use crate::db::{self, Authenticated};
use crate::error::{ApiError, Dependency};
use crate::state::AppState;
use crate::tokens;

/// Who is calling, as far as `authenticate` could tell.
#[derive(Debug, Clone)]
pub enum CurrentUser {
    Anonymous,
    /// A bearer token was sent but is malformed, unknown, expired or revoked.
    Rejected,
    /// The token could not be checked because PostgreSQL is away.
    CouldNotCheck,
    User(Authenticated),
}

fn bearer_token(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let current = if request.headers().contains_key(header::AUTHORIZATION) {
        match bearer_token(&request) {
            Some(token) if tokens::is_well_formed(token) => {
                let hash = tokens::hash(token);
                match state.db() {
                    Err(_) => CurrentUser::CouldNotCheck,
                    Ok(pool) => match db::authenticate(pool, &hash).await {
                        Ok(Some(user)) => CurrentUser::User(user),
                        Ok(None) => CurrentUser::Rejected,
                        Err(e) => {
                            tracing::warn!(error = %e, "token look-up failed");
                            CurrentUser::CouldNotCheck
                        }
                    },
                }
            }
            _ => CurrentUser::Rejected,
        }
    } else {
        CurrentUser::Anonymous
    };
    if let CurrentUser::User(user) = &current {
        tracing::Span::current().record("user_id", tracing::field::display(user.user.id));
    }
    request.extensions_mut().insert(current);
    next.run(request).await
}

pub async fn require_user(request: Request, next: Next) -> Result<Response, ApiError> {
    match request.extensions().get::<CurrentUser>() {
        Some(CurrentUser::User(_)) => Ok(next.run(request).await),
        Some(CurrentUser::CouldNotCheck) => Err(ApiError::unavailable(
            Dependency::Postgres,
            anyhow::anyhow!("cannot check the bearer token"),
        )),
        _ => Err(ApiError::Unauthorized),
    }
}

/// The authenticated caller, for handlers behind `require_user`.
pub struct AuthUser(pub Authenticated);

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<CurrentUser>() {
            Some(CurrentUser::User(user)) => Ok(Self(user.clone())),
            _ => Err(ApiError::Unauthorized),
        }
    }
}
