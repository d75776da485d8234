//! The Redis the unit tests talk to: the integration tests' (`TEST_REDIS_URL`), else the local
//! default, with a namespace of each test's own so that tests share it in parallel.

use secrecy::SecretString;
use shared::redis_connection::{RedisConnection, RedisTarget};

pub(crate) fn connection() -> RedisConnection {
    let url = std::env::var("TEST_REDIS_URL")
        .unwrap_or_else(|_| shared::config::DEFAULT_REDIS_URL.to_owned());
    let target = RedisTarget::parse(&SecretString::from(url)).expect("a Redis URL");
    RedisConnection::new(&target).expect("a Redis connection")
}

/// `{what}-test-{a new uuid}`.
pub(crate) fn namespace(what: &str) -> String {
    format!("{what}-test-{}", uuid::Uuid::new_v4().simple())
}
