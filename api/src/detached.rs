//! Work a request starts that must run to its end whatever happens to the request: a client that
//! hangs up, or the router's timeout, drops the handler's future, and with it any step not yet
//! done. The sign-in's undo steps (`signin`) and a refresh's count against its daily cap
//! (`routes/session.rs`) run this way.

use crate::error::ApiError;

/// Runs `step` on a task of its own and awaits it: the handler waits for it but does not own it.
pub async fn detached<T: Send + 'static>(
    step: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    // The task logs on behalf of the request: it keeps the request's span (and its id).
    let step = tracing::Instrument::instrument(step, tracing::Span::current());
    tokio::spawn(step).await.unwrap_or_else(|e| {
        Err(ApiError::Internal(anyhow::anyhow!(
            "a detached request step failed: {e}"
        )))
    })
}
