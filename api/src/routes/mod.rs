pub mod health;
pub mod otp;
pub mod session;

use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::db::{IssuedSession, User};

/// A user as clients see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    /// E.164.
    #[schema(example = "+14155550100")]
    pub phone_number: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

impl From<User> for UserView {
    fn from(user: User) -> Self {
        Self {
            id: user.id,
            phone_number: user.phone_number,
            created_at: user.created_at,
        }
    }
}

/// A signed-in session. The tokens are shown only here, once.
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    /// Opaque bearer token, 26 base32 characters.
    pub access_token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Exchange at `/v1/token/refresh` for a new session; single use.
    pub refresh_token: String,
    pub refresh_expires_in: u64,
    pub user: UserView,
    /// Whether this sign-in created the user.
    pub new_user: bool,
}

impl SessionView {
    pub fn new(session: IssuedSession) -> Self {
        Self {
            access_token: session.access_token.into_string(),
            token_type: "Bearer",
            expires_in: session.access_expires_in.as_secs(),
            refresh_token: session.refresh_token.into_string(),
            refresh_expires_in: session.refresh_expires_in.as_secs(),
            user: session.user.into(),
            new_user: session.new_user,
        }
    }
}
