//! Tests of the api against the real PostgreSQL, Redis and RabbitMQ. Each test gets its own
//! database and NAMESPACE, so they run in parallel and again and again.
#![allow(clippy::unwrap_used)]

mod errors;
mod failures;
mod flow;
mod helpers;
mod limits;
mod tokens;
