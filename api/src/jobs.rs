//! Background jobs of the api: preparing the database, and purging expired tokens.

use std::sync::atomic::Ordering;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::Postgres;
use sqlx::migrate::MigrateDatabase;

use crate::db;
use crate::error::error_chain;
use crate::state::AppState;

const PURGE_EVERY: Duration = Duration::from_secs(600);

/// Creates the database if it is missing and runs pending migrations, retrying until
/// PostgreSQL answers. Database routes answer 503 until this is done.
pub async fn prepare_database(state: AppState) {
    let mut delay = Duration::from_millis(200);
    loop {
        match migrate(&state).await {
            Ok(()) => {
                state.schema_ready.store(true, Ordering::Release);
                tracing::info!("database schema is up to date");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), retry_in_ms = delay.as_millis(), "database not ready");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn migrate(state: &AppState) -> anyhow::Result<()> {
    let url = state.config.database_url.expose_secret();
    if !Postgres::database_exists(url).await? {
        // Another replica may win the race; that is fine.
        if let Err(e) = Postgres::create_database(url).await
            && !Postgres::database_exists(url).await?
        {
            return Err(e.into());
        }
        tracing::info!("created the database");
    }
    sqlx::migrate!("../migrations")
        .run(state.raw_pool())
        .await?;
    Ok(())
}

/// Deletes expired tokens every ten minutes; they are refused anyway, this only bounds the table.
pub async fn purge_expired_tokens(state: AppState) {
    let mut every = tokio::time::interval(PURGE_EVERY);
    loop {
        every.tick().await;
        if let Ok(pool) = state.db() {
            match db::purge_expired(pool).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(purged = n, "purged expired tokens"),
                Err(e) => tracing::warn!(error = %e, "could not purge expired tokens"),
            }
        }
    }
}
