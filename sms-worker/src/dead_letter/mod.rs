//! Dead letters: what could not be sent, kept for operators in `{ns}.sms.dlq`.
//!
//! [`publish`] puts the worker's own dead letters there (the reason in headers, the code
//! removed); [`inspect`] is the operator's view, `sms-worker dlq list|purge`, which also reads
//! what RabbitMQ dead-lettered by itself. The headers are described in
//! docs/messaging.md#dead-letters.

pub mod inspect;
pub mod publish;
mod reason;

pub use inspect::{Entry, Listing, count, entries, format_table, list, purge};
pub use publish::{
    HeldCopies, PublishError, Route, forward_broker_copy, properties, publish, without_code,
};
pub use reason::{
    ATTEMPTS_HEADER, DeadLetter, ERROR_HEADER, ERROR_KIND_HEADER, ErrorKind, FAILED_AT_HEADER,
    PROVIDER_CODE_HEADER, PROVIDER_STATUS_HEADER, PROVIDERS_HEADER,
};
