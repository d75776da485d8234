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
    let mut migrator = sqlx::migrate!("../migrations");
    // A newer release may have applied migrations this one does not know: this release is being
    // rolled back to, or still runs beside the newer one during a rolling deploy. Every
    // migration keeps the schema usable by the release before it (docs/operations.md), so the
    // api runs; refusing, sqlx's default, would keep every replica of this release from starting.
    migrator.set_ignore_missing(true);
    migrator.run(state.raw_pool()).await?;
    let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(state.raw_pool())
            .await?;
    if let Some(applied) = applied.filter(|&applied| applied > known) {
        tracing::warn!(
            applied,
            known,
            "the database has migrations of a newer release; running on it, as every migration allows"
        );
    }
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
