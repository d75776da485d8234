//! Tests of the api against the real PostgreSQL, Redis and RabbitMQ (found as tests::servers
//! says). Each test gets its own database and NAMESPACE, so they run in parallel and again and
//! again.

mod errors;
mod failures;
mod flow;
mod helpers;
mod limits;
mod tokens;
