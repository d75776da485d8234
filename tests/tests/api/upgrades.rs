//! Releases meeting one database: a release rolled back to, or still running beside a newer one
//! during a rolling deploy, finds migrations it does not know.

use tests::servers::servers;

use crate::helpers::{PHONE, Spawn, captured_logs, spawn_app, spawn_with};

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
