//! What a test creates on the shared servers: a NAMESPACE (queues, exchanges, Redis keys) and a
//! database of its own under a unique name, so tests run in parallel, and removed at the end, so
//! suites can run again and again.

use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use shared::{QueueType, Topology};

use crate::servers::servers;

/// `{prefix}_{random}`: a name no other test or run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Deletes the namespace's queues and exchanges and its Redis keys. Best effort.
pub async fn remove_namespace(namespace: &str) {
    // The names do not depend on the queue type.
    let topology = Topology::new(namespace, QueueType::Classic);
    let connect = Connection::connect(servers().rabbitmq.url(), ConnectionProperties::default());
    if let Ok(Ok(connection)) = tokio::time::timeout(Duration::from_secs(3), connect).await {
        if let Ok(channel) = connection.create_channel().await {
            for queue in topology.queues() {
                let _ = channel
                    .queue_delete(queue.into(), QueueDeleteOptions::default())
                    .await;
            }
            for exchange in topology.exchanges() {
                let _ = channel
                    .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = connection.close(200, "bye".into()).await;
    }
    if let Ok(client) = redis::Client::open(servers().redis.url())
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
    if let Ok(pool) = sqlx::PgPool::connect(&servers().database_url("postgres")).await {
        let statement = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await;
        pool.close().await;
    }
}

/// [`remove_namespace`] and [`drop_database`] from a `Drop`, which cannot await: on a thread
/// of its own, since the test's runtime may be the one being torn down.
pub fn remove_now(namespace: &str, database: Option<&str>) {
    let namespace = namespace.to_owned();
    let database = database.map(str::to_owned);
    let removal = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            remove_namespace(&namespace).await;
            if let Some(database) = database {
                drop_database(&database).await;
            }
        });
    });
    let _ = removal.join();
}
