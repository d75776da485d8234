//! Removes what a test created on the shared servers, so suites can run again and again.

use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
pub const AMQP: &str = shared::config::DEFAULT_AMQP_URL;
pub const REDIS: &str = shared::config::DEFAULT_REDIS_URL;

/// Deletes the namespace's queues and exchanges and its Redis keys. Best effort.
pub async fn remove_namespace(namespace: &str) {
    let connect = Connection::connect(AMQP, ConnectionProperties::default());
    if let Ok(Ok(connection)) = tokio::time::timeout(Duration::from_secs(3), connect).await {
        if let Ok(channel) = connection.create_channel().await {
            for queue in [format!("{namespace}.sms"), format!("{namespace}.sms.dlq")] {
                let _ = channel
                    .queue_delete(queue.into(), QueueDeleteOptions::default())
                    .await;
            }
            for exchange in [format!("{namespace}.events"), format!("{namespace}.dlx")] {
                let _ = channel
                    .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = connection.close(200, "bye".into()).await;
    }
    if let Ok(client) = redis::Client::open(REDIS)
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{namespace}:*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
        }
    }
}

/// Drops a test database, even with connections still open to it.
pub async fn drop_database(database: &str) {
    if let Ok(pool) = sqlx::PgPool::connect(&format!("{POSTGRES}/postgres")).await {
        let statement = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await;
        pool.close().await;
    }
}
