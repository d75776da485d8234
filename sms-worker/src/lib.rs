//! `sms-worker`: consumes `OtpRequested` events from RabbitMQ and sends each OTP by SMS through
//! Twilio, with retries, at most one SMS per event, and a dead-letter queue for what cannot be
//! sent (SPEC §4, §5).
//!
//! Run it with [`run`] (or [`Worker::bind`] then [`Worker::run`] to learn the bound port first);
//! stop it by resolving the shutdown future.

pub mod claims;
pub mod config;
pub mod dead_letter;
pub mod dlq;
mod http;
pub mod message;
pub mod metrics;
pub mod provider;
mod worker;

pub use config::{Config, ProviderConfig, TwilioAuth, TwilioConfig};
pub use worker::{Worker, run};
