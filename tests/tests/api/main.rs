//! Tests of the api against the real PostgreSQL, Redis and RabbitMQ (found as tests::servers
//! says). Each test gets its own database and NAMESPACE, so they run in parallel and again and
//! again.

mod after_the_confirm;
mod challenges;
mod database;
mod errors;
mod exposure;
mod failures;
mod flow;
mod guesses;
mod helpers;
mod integrators;
mod limits;
mod networks;
mod numbers;
mod pages;
mod processes;
mod sessions;
mod tokens;
mod upgrades;
mod velocity;
