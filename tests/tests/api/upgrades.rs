//! Releases meeting one database: a release rolled back to, or still running beside a newer one
//! during a rolling deploy, finds migrations it does not know.

use std::time::Duration;

use reqwest::StatusCode;
use tests::cleanup::{drop_database, unique};
use tests::servers::servers;
use tests::wait::eventually;

use crate::helpers::{PHONE, Spawn, captured_logs, spawn_app, spawn_with};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn an_api_runs_on_a_database_a_newer_release_has_migrated() {
    let newer = spawn_app().await;
    // What a later release's migration leaves behind in sqlx's ledger.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99990101000000, 'a later release', true, '\\x00'::bytea, 0)",
    )
    .execute(&newer.db().await)
    .await
    .expect("a newer migration is recorded");

    // `spawn_with` waits for /readyz, which holds 503 until the migrations have run.
    let older =
        spawn_with(Spawn::default().var("DATABASE_URL", servers().database_url(&newer.database)))
            .await;
    let session = older.sign_in(PHONE).await;
    assert!(session["access_token"].is_string(), "{session}");
    assert!(
        captured_logs().contains("the database has migrations of a newer release"),
        "the api says it runs on a newer schema"
    );
    drop(older);
}

#[tokio::test]
async fn an_api_leaves_alone_a_database_migrated_by_another_application() {
    let database = unique("otp_test");
    let admin = sqlx::PgPool::connect(&servers().database_url("postgres"))
        .await
        .expect("the server");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE \"{database}\""
    )))
    .execute(&admin)
    .await
    .expect("a database is created");
    let other = sqlx::PgPool::connect(&servers().database_url(&database))
        .await
        .expect("the other application's database");
    // Another sqlx application's ledger: none of this api's migrations, one of its own.
    sqlx::raw_sql(
        "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
           installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL,
           checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL);
         INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
           VALUES (20240101000000, 'another application', true, '\\x00'::bytea, 0);",
    )
    .execute(&other)
    .await
    .expect("another application's migrations");

    let mut app = spawn_with(
        Spawn {
            wait_ready: false,
            ..Spawn::default()
        }
        .var("DATABASE_URL", servers().database_url(&database)),
    )
    .await;
    eventually(WAIT, "the api to refuse the database", || async {
        captured_logs()
            .contains("DATABASE_URL may name another application's database")
            .then_some(())
    })
    .await;
    assert_eq!(
        app.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    .fetch_all(&other)
    .await
    .expect("the tables");
    assert_eq!(tables, ["_sqlx_migrations"], "the api created tables there");
    app.stop().await;
    other.close().await;
    drop_database(&database).await;
}
