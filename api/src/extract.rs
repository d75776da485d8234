//! Request extractors whose rejections are [`ApiError`]s, so bad bodies get problem+json too.

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequest, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// When the handler was called, before its body is read: the router's timeout counts from about
/// here, and a client slow to send its body spends the request's time, not a time of its own.
/// Put before the body's extractor, which axum runs last.
pub struct Arrived(pub tokio::time::Instant);

impl<S: Send + Sync> FromRequestParts<S> for Arrived {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(tokio::time::Instant::now()))
    }
}

/// `axum::Json` with its rejections mapped: 415 without a JSON content type, 413 over the body
/// limit, 400 for syntax errors, missing or wrong-typed fields.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match <axum::Json<T> as FromRequest<S>>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(map_json_rejection(rejection)),
        }
    }
}

/// `Option<ApiJson<T>>`: an empty body is `None` (an optional body may be left out); anything
/// else must be JSON, exactly as for `ApiJson<T>`.
impl<T: DeserializeOwned, S: Send + Sync> OptionalFromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let (parts, body) = request.into_parts();
        let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(map_bytes_rejection)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let request = Request::from_parts(parts, Body::from(bytes));
        <Self as FromRequest<S>>::from_request(request, state)
            .await
            .map(Some)
    }
}

fn map_bytes_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge
    } else {
        ApiError::InvalidRequest(rejection.body_text())
    }
}

fn map_json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
        JsonRejection::BytesRejection(bytes) => map_bytes_rejection(bytes),
        JsonRejection::JsonDataError(e) => ApiError::InvalidRequest(e.body_text()),
        JsonRejection::JsonSyntaxError(e) => ApiError::InvalidRequest(e.body_text()),
        other => ApiError::InvalidRequest(other.body_text()),
    }
}
