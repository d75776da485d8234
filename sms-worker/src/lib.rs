//! `sms-worker`: consumes `OtpRequested` events from RabbitMQ and sends each OTP by SMS through
//! Twilio, with retries, at most one SMS per event, and a dead-letter queue for what cannot be
//! sent (docs/messaging.md).
//!
//! Run it with [`run`] (or [`Worker::bind`] then [`Worker::run`] to learn the bound port first);
//! stop it by resolving the shutdown future. [`cli`] is the program's command line.
//!
//! Where things are: [`config`] reads the environment once; `worker/` is the consumer in stages
//! (connection, delivery, send); `ledger` keeps one SMS per event; `provider` talks to Twilio;
//! `message` renders the SMS body; [`dead_letter`] publishes and inspects the dead-letter queue;
//! `http` serves `/healthz`, `/readyz` and `/metrics`; `shutdown` carries the stop signal;
//! `receipts` reads providers' delivery receipts and remembers sent messages for them; [`trace`]
//! keeps each number's timeline for `sms-worker trace`.

pub mod cli;
pub mod config;
pub mod dead_letter;
mod http;
mod ledger;
mod message;
pub mod metrics;
mod provider;
mod receipts;
pub mod seal;
mod shutdown;
mod terminal;
#[cfg(test)]
mod test_redis;
pub mod trace;
mod worker;

pub use config::{Config, ProviderConfig, TwilioAuth, TwilioConfig};
pub use worker::{Worker, run};
