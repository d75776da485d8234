//! Why an event was dead-lettered, and the headers that say so on the copy.

/// Header names of a dead-lettered copy (docs/messaging.md#dead-letters).
pub const ERROR_KIND_HEADER: &str = "x-error-kind";
pub const ERROR_HEADER: &str = "x-error";
pub const ATTEMPTS_HEADER: &str = "x-attempts";
pub const FAILED_AT_HEADER: &str = "x-failed-at";
pub const PROVIDER_STATUS_HEADER: &str = "x-provider-status";
pub const PROVIDER_CODE_HEADER: &str = "x-provider-code";
/// Every provider tried for the event, in order, as `name:status:code` (`-` where unknown).
pub const PROVIDERS_HEADER: &str = "x-providers";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The recipient cannot get it (invalid, unsubscribed, blocked), or every provider refused.
    Permanent,
    /// Retryable failures until `RETRY_MAX_ELAPSED_SECS` ran out.
    RetriesExhausted,
    /// The OTP expired before it could be sent (on arrival, or while retrying).
    Expired,
    /// The body is not an `OtpRequested` this worker can read.
    InvalidMessage,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permanent => "permanent",
            Self::RetriesExhausted => "retries_exhausted",
            Self::Expired => "expired",
            Self::InvalidMessage => "invalid_message",
        }
    }
}

/// Why one event is being dead-lettered.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub kind: ErrorKind,
    pub error: String,
    /// Provider calls made.
    pub attempts: u32,
    pub provider_status: Option<u16>,
    pub provider_code: Option<i64>,
    /// Every provider tried, in order, with what it answered.
    pub providers: Vec<String>,
}

impl DeadLetter {
    pub fn new(kind: ErrorKind, error: impl Into<String>, attempts: u32) -> Self {
        Self {
            kind,
            error: error.into(),
            attempts,
            provider_status: None,
            provider_code: None,
            providers: Vec::new(),
        }
    }
}
