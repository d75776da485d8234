//! Background jobs of the api: preparing the database, purging expired tokens, and noting the
//! fraud guard's settings for the workers.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::Postgres;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::db;
use crate::error::error_chain;
use crate::state::AppState;

const PURGE_EVERY: Duration = Duration::from_secs(600);
/// How often the purge looks whether the schema is migrated yet.
const SCHEMA_LOOK: Duration = Duration::from_secs(1);

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
    // A connection of its own, without the statement timeout of the api's pool (startup.rs): a
    // migration may rightly run longer.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(url.parse::<PgConnectOptions>()?)
        .await?;
    let applied = applied_migrations(&pool).await?;
    let known: BTreeSet<i64> = migrator.iter().map(|m| m.version).collect();
    let newest_known = known.last().copied().unwrap_or(0);
    let unknown: Vec<i64> = applied.difference(&known).copied().collect();
    if !unknown.is_empty() {
        // Migrations of a newer release, after every one of this release's own: this release
        // is being rolled back to, or still runs beside the newer one during a rolling deploy.
        // Each migration keeps the schema usable by the release before it (docs/operations.md),
        // so the api runs. Anything else (migrations it does not know among or instead of its
        // own) is most likely another application's database: it is left alone.
        if !known.is_subset(&applied) || unknown.iter().any(|&version| version < newest_known) {
            anyhow::bail!(
                "the database holds {} migration(s) this api does not know, and not after all of its own: \
                 DATABASE_URL may name another application's database; leaving it alone",
                unknown.len()
            );
        }
        tracing::warn!(
            newest_applied = unknown.last().copied().unwrap_or_default(),
            newest_known,
            "the database has migrations of a newer release; running on it, as every migration allows for the release before"
        );
        migrator.set_ignore_missing(true);
    }
    let migrated = migrator.run(&pool).await;
    pool.close().await;
    migrated?;
    Ok(())
}

/// The versions of the migrations applied to the database, none when it has never been migrated.
async fn applied_migrations(pool: &sqlx::PgPool) -> anyhow::Result<BTreeSet<i64>> {
    let migrated: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !migrated {
        return Ok(BTreeSet::new());
    }
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
        .fetch_all(pool)
        .await?;
    Ok(versions.into_iter().collect())
}

/// Deletes expired tokens and ended sessions at start and every ten minutes; they are refused
/// anyway, this only bounds the tables. It waits for the schema first: the first tick comes
/// before the migrations have run, and skipping it would leave a fresh replica ten minutes
/// without a purge.
pub async fn purge_expired_tokens(state: AppState) {
    let mut every = tokio::time::interval(PURGE_EVERY);
    loop {
        every.tick().await;
        let pool = loop {
            match state.db() {
                Ok(pool) => break pool,
                Err(_) => tokio::time::sleep(SCHEMA_LOOK).await,
            }
        };
        match db::purge_expired(pool).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "purged expired tokens"),
            Err(e) => tracing::warn!(error = %e, "could not purge expired tokens"),
        }
    }
}

/// Notes this api's fraud-guard settings in Redis now and every minute, for the workers to compare
/// theirs with (`shared::fraud_guard::SETTINGS_ANNOUNCED_EVERY`). Redis away only skips a note.
pub async fn announce_fraud_guard_settings(state: AppState) {
    let mut tick = tokio::time::interval(shared::fraud_guard::SETTINGS_ANNOUNCED_EVERY);
    loop {
        tick.tick().await;
        let announced = state
            .limits
            .guard()
            .announce_settings(state.redis(), &state.config.fraud_guard);
        if let Err(e) = announced.await {
            tracing::debug!(error = %e, "could not note the fraud guard's settings for the workers");
        }
    }
}

#[cfg(test)]
mod tests {
    /// SHA-384 of `000004_fewer_token_writes.sql` as shipped (commit `0e92396`), which some
    /// databases have applied: sqlx refuses one whose version 4 has another checksum.
    const SHIPPED_VERSION_4: &str = "ae5d75734bf5bd10ba7694138867b45444ddd09941e0d958515f290e0596660e882cb848b2b501184fd749636d4bc982";

    #[test]
    fn version_4_comes_back_only_as_it_shipped() {
        let migrator = sqlx::migrate!("../migrations");
        for migration in migrator.iter().filter(|m| m.version == 4) {
            let checksum: String = migration
                .checksum
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(
                checksum, SHIPPED_VERSION_4,
                "migration 4 must be the fewer-writes SQL of 0e92396, byte for byte (docs/operations.md)"
            );
        }
    }
}
