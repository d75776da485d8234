//! The two halves of a sign-in: [`request`] sends a code, [`verify`] checks it and opens a
//! session. Handlers in `routes/otp.rs` only parse and answer; the rules live here.
//!
//! Both halves end with an undo that must run whatever happens to the HTTP request (a client
//! that hangs up, the request timeout): withdrawing a code whose event was not confirmed, or
//! putting back a code whose session could not be stored. So that work runs on a task of its
//! own (`crate::detached`), which the handler awaits but does not own. Its deadlines add up to no more than the
//! request timeout (10 s), so the client hears the outcome rather than a generic timeout:
//! Redis at most [`REDIS_DEADLINE`] per step, the publish at most [`PUBLISH_DEADLINE`], and
//! withdrawing an event whose publish went unanswered at most 1 s (`withdrawal`). Making a
//! confirmed code current is one Redis step, retried within it; past that it goes on in the
//! background, since the request was decided by the confirm (`promotion`); a sign-in makes a
//! sent code current itself if that never happened (`late_promotion`), within the time of the
//! Redis step that checks the guess.

mod late_promotion;
pub mod promotion;
pub mod request;
pub mod verify;
mod withdrawal;

use std::time::Duration;

/// One Redis step of a sign-in.
pub const REDIS_DEADLINE: Duration = Duration::from_secs(2);
/// How long an OTP request may take to decide its answer: the router's 10 s timeout, less a
/// margin, so that the client hears the outcome rather than a generic timeout.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(9);
/// Connecting to RabbitMQ (when needed) and the broker's confirm, together.
pub const PUBLISH_DEADLINE: Duration = Duration::from_secs(5);

/// Runs a Redis step within [`REDIS_DEADLINE`]; a timeout is Redis being unavailable.
async fn redis_step<T>(
    step: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, crate::error::ApiError> {
    redis_step_by(tokio::time::Instant::now() + REDIS_DEADLINE, step).await
}

/// Runs Redis steps that share one deadline; a timeout is Redis being unavailable.
async fn redis_step_by<T>(
    deadline: tokio::time::Instant,
    step: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, crate::error::ApiError> {
    match tokio::time::timeout_at(deadline, step).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(crate::error::ApiError::unavailable(
            crate::error::Dependency::Redis,
            anyhow::anyhow!("Redis did not answer in time"),
        )),
    }
}
