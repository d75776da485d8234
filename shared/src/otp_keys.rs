//! Where the api keeps a phone's codes in Redis. The worker reads one field of them (which event
//! the current code belongs to) to decide whether a code the carrier dropped is still worth
//! resending, so the layout is part of the contract between the two programs and lives here.
//!
//! Every key of one phone carries the phone as its Redis Cluster hash tag (`{+14155550100}`), so
//! the api's scripts touch one slot.

use crate::PhoneNumber;

/// Field of the code hashes that holds the id of the event that carried the code.
pub const EVENT_FIELD: &str = "e";

/// `{ns}:otp:{+14155550100}:{name}`.
pub fn key(namespace: &str, phone: &PhoneNumber, name: &str) -> String {
    format!("{namespace}:otp:{{{}}}:{name}", phone.as_str())
}

/// The phone's current code: a hash with the code's digest, challenge, attempts and [`EVENT_FIELD`].
pub fn current_code(namespace: &str, phone: &PhoneNumber) -> String {
    key(namespace, phone, "code")
}

/// A code while its event awaits the broker's confirm: the current code's fields but the
/// attempt counts, which it gets when the confirm makes it current.
pub fn pending_code(namespace: &str, phone: &PhoneNumber) -> String {
    key(namespace, phone, "pending")
}
