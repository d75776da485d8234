//! PostgreSQL slow, locked, or losing answers, during sign-in and refresh: what the client hears
//! and what is left stored. Each test puts a lock, a held commit or a TCP proxy of its own
//! between the api and its database.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::cleanup::{drop_database, unique};
use tests::proxy::TcpProxy;
use tests::servers::{database_url, servers};
use tests::wait::eventually;

use crate::helpers::{
    PHONE, Spawn, TestApp, refresh_day_in, signs_in_a_new_user_within_15_s, spawn_app, spawn_with,
};

#[tokio::test]
async fn postgres_down_during_verify_keeps_the_code_usable() {
    let (postgres, postgres_url) = TcpProxy::in_front_of(&servers().postgres).await;
    let database = unique("otp_test");
    let app =
        spawn_with(Spawn::default().var("DATABASE_URL", database_url(&postgres_url, &database)))
            .await;
    let code = app.code_for(PHONE).await;

    postgres.go_down();
    app.verify(PHONE, &code)
        .await
        .assert_problem(503, "unavailable");
    app.get_authed("/v1/me", "AAAAAAAAAAAAAAAAAAAAAAAAAA")
        .await
        .assert_problem(503, "unavailable");

    postgres.come_back();
    signs_in_a_new_user_within_15_s(&app, &code, "the api to reach PostgreSQL again").await;
    drop(app);
    drop_database(&database).await;
}

/// An app with `spawn`'s settings whose one PostgreSQL connection goes through a proxy the test
/// can cut, its statements waiting up to 30 s; its database's name, and a pool straight to it.
async fn one_connection_through_a_proxy(spawn: Spawn) -> (TcpProxy, TestApp, String, sqlx::PgPool) {
    let (postgres, postgres_url) = TcpProxy::in_front_of(&servers().postgres).await;
    let database = unique("otp_test");
    let app = spawn_with(
        spawn
            .var("DATABASE_URL", database_url(&postgres_url, &database))
            .var("DATABASE_STATEMENT_TIMEOUT_MS", 30_000)
            .var("DATABASE_POOL_SIZE", 1),
    )
    .await;
    let db = sqlx::PgPool::connect(&servers().database_url(&database))
        .await
        .expect("the test database");
    (postgres, app, database, db)
}

/// A sign-in PostgreSQL stored, whose answer was lost with the connection (a failover, a broken
/// network), is not taken for one that failed: the code is not put back, so it cannot sign in a
/// second time. The client hears 503 and asks for a new code.
#[tokio::test]
async fn a_sign_in_stored_whose_answer_was_lost_does_not_give_its_code_back() {
    let (postgres, app, database, db) = one_connection_through_a_proxy(Spawn::default()).await;
    // A sign-in first, so that the one connection has the statement prepared: the next sends
    // it whole, with nothing more to wait for before PostgreSQL runs it.
    app.sign_in("+14155550123").await;
    let code = app.code_for(PHONE).await;
    let sessions = || async {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
            .fetch_one(&db)
            .await
            .expect("count");
        count
    };

    // The sign-in waits behind a lock (its connection already checked out), so that only its
    // answer is held: the lock goes, PostgreSQL stores the session, and the answer never comes.
    let mut lock = db.begin().await.expect("a transaction");
    sqlx::query("LOCK TABLE users IN SHARE MODE")
        .execute(&mut *lock)
        .await
        .expect("the lock");
    let first = tokio::spawn({
        let (client, url) = (
            app.client.clone(),
            format!("http://{}/v1/otp/verify", app.addr),
        );
        let body = json!({ "phone_number": PHONE, "otp": code });
        async move {
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("an answer")
                .status()
        }
    });
    eventually(
        Duration::from_secs(10),
        "the sign-in waiting on the lock",
        || async { waiting_on_a_lock(&db).await == 1 },
    )
    .await;
    postgres.hold_replies();
    lock.rollback().await.expect("the lock released");
    eventually(Duration::from_secs(10), "the session stored", || async {
        sessions().await == 2
    })
    .await;
    postgres.cut_connections();
    postgres.release_replies();
    assert_eq!(
        first.await.expect("the request"),
        StatusCode::SERVICE_UNAVAILABLE
    );
    app.verify(PHONE, &code)
        .await
        .assert_problem(401, "invalid_otp");
    assert_eq!(sessions().await, 2);
    drop(app);
    drop_database(&database).await;
}

/// A sign-in stuck behind a lock (a long migration, an operator's transaction) fails within its
/// request, as PostgreSQL ends the statement, and the code is put back. Before, the client got
/// its 503 from the request's timeout while the statement waited on, then created a session no
/// one received, using up the code: the retry below answered 401.
#[tokio::test]
async fn a_sign_in_stuck_behind_a_lock_answers_503_and_keeps_the_code() {
    let app = spawn_app().await;
    let code = app.code_for(PHONE).await;
    let phone = shared::PhoneNumber::parse(PHONE).expect("E.164");
    let current = shared::otp_keys::current_code(&app.namespace, &phone);
    let life_left = || async {
        let millis: i64 = redis::cmd("PTTL")
            .arg(&current)
            .query_async(&mut app.redis().await)
            .await
            .expect("PTTL");
        millis
    };
    let lock = locked(&app, "LOCK TABLE users IN SHARE MODE").await;
    let before = life_left().await;
    app.verify(PHONE, &code)
        .await
        .assert_problem(503, "unavailable");
    // Put back with the life it had left, less the 3 s the statement waited: a slow session
    // step never lengthens a code's life.
    let after = life_left().await;
    assert!(
        (1..=before - 2_500).contains(&after),
        "{before} ms left before, {after} ms after"
    );
    lock.rollback().await.expect("the lock released");
    let session = app.verify(PHONE, &code).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
    assert_eq!(session.body["new_user"], true);
}

/// How many queries of the test's database wait on a lock now.
async fn waiting_on_a_lock(db: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(db)
    .await
    .expect("pg_stat_activity")
}

/// A transaction holding a table in SHARE mode (`lock`, the `LOCK TABLE` statement): reads go
/// on, and writes wait on it until their statement timeout (sign-ins, to create or update their
/// user, for `users`).
async fn locked(app: &TestApp, lock: &'static str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut held = app.db().await.begin().await.expect("a transaction");
    sqlx::query(lock)
        .execute(&mut *held)
        .await
        .expect("the lock");
    held
}

/// A signed-in app whose statements wait up to 30 s and whose refresh tokens have no reuse grace
/// (a token rotated behind its client's back then revokes on its next use), and the body of a
/// refresh of its session.
async fn signed_in_with_no_reuse_grace() -> (TestApp, serde_json::Value) {
    let app = spawn_with(
        Spawn::default()
            .var("DATABASE_STATEMENT_TIMEOUT_MS", 30_000)
            .var("REFRESH_REUSE_GRACE_SECS", 0),
    )
    .await;
    let session = app.sign_in(PHONE).await;
    let body = serde_json::json!({ "refresh_token": session["refresh_token"] });
    (app, body)
}

/// A refresh stuck on a busy database answers 503 within the request's time, rotates nothing
/// afterwards (the token the client was told nothing of still works), and spends none of the
/// session's refreshes of the day. Before, the refresh went on after the router's timeout and
/// rotated the token once the lock was free, so with no reuse grace the client's retry revoked
/// its session.
#[tokio::test]
async fn a_refresh_that_runs_out_of_time_rotates_nothing_later() {
    let (app, body) = signed_in_with_no_reuse_grace().await;
    let lock = locked(&app, "SELECT id FROM sessions FOR UPDATE").await;
    app.post("/v1/token/refresh", body.clone())
        .await
        .assert_problem(503, "unavailable");
    // Nor did it spend one of the session's refreshes of the day: the count is given back.
    let day = app.refresh_day().await;
    eventually(Duration::from_secs(5), "the count given back", || async {
        app.limit_count(&day).await == Some(0)
    })
    .await;
    lock.rollback().await.expect("the lock released");
    let db = app.db().await;
    // Whatever was still waiting on the lock has had its turn once no query waits on it.
    eventually(
        Duration::from_secs(5),
        "no refresh waiting on the lock",
        || async { (waiting_on_a_lock(&db).await == 0).then_some(()) },
    )
    .await;
    let reply = app.post("/v1/token/refresh", body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
}

/// The request's time counts from its start, the token's lookup included: a refresh whose lookup
/// waited on a busy database, and whose rotation then waited too, still answers 503 within it and
/// rotates nothing afterwards. Before, the deadline started after the lookup, so the rotation
/// could commit after the router had answered 503, and with no reuse grace the client's retry
/// then revoked its session.
#[tokio::test]
async fn a_refresh_whose_lookup_was_slow_still_ends_within_the_requests_time() {
    let (app, body) = signed_in_with_no_reuse_grace().await;
    let db = app.db().await;
    // The rotation's lock, and the lookup's.
    let row = locked(&app, "SELECT id FROM sessions FOR UPDATE").await;
    let table = locked(&app, "LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE").await;
    let started = std::time::Instant::now();
    let refreshed = refresh_meanwhile(&app, body.clone());
    eventually(Duration::from_secs(5), "the lookup waiting", || async {
        waiting_on_a_lock(&db).await == 1
    })
    .await;
    // A third of the request's time goes on the lookup; time itself is what this test needs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    table.rollback().await.expect("the table's lock released");
    let (status, _) = refreshed.await.expect("the request");
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    row.rollback().await.expect("the row's lock released");
    eventually(
        Duration::from_secs(5),
        "no refresh waiting on a lock",
        || async { waiting_on_a_lock(&db).await == 0 },
    )
    .await;
    let reply = app.post("/v1/token/refresh", body).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "after {took:?}: {}",
        reply.body
    );
}

/// From here on, a transaction that stores a token waits at its commit for as long as the test
/// holds advisory lock 4242 (`held_commits`): a deferred trigger, run by the commit itself.
async fn commits_wait_on_the_test(db: &sqlx::PgPool) {
    for statement in [
        r"CREATE FUNCTION wait_for_the_test() RETURNS trigger LANGUAGE plpgsql AS $$
          BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NULL; END $$",
        r"CREATE CONSTRAINT TRIGGER commit_waits AFTER INSERT ON tokens
          DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_for_the_test()",
    ] {
        sqlx::query(statement)
            .execute(db)
            .await
            .expect("the commit's wait");
    }
}

/// Holds the commits of [`commits_wait_on_the_test`] until the transaction is rolled back.
async fn held_commits(db: &sqlx::PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut held = db.begin().await.expect("a transaction");
    sqlx::query("SELECT pg_advisory_xact_lock(4242)")
        .execute(&mut *held)
        .await
        .expect("the advisory lock");
    held
}

/// `POST /v1/token/refresh` with `body` on a task of its own: its status and JSON body.
fn refresh_meanwhile(app: &TestApp, body: Value) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let (client, url) = (
        app.client.clone(),
        format!("http://{}/v1/token/refresh", app.addr),
    );
    tokio::spawn(async move {
        let reply = client
            .post(url)
            .json(&body)
            .send()
            .await
            .expect("an answer");
        let status = reply.status();
        (status, reply.json().await.expect("a JSON body"))
    })
}

/// A refresh of `body` on a task of its own, its commit held by the test (see
/// [`commits_wait_on_the_test`]) until the returned transaction ends; returned once the commit
/// waits, with when the refresh was sent.
async fn a_refresh_held_at_its_commit(
    app: &TestApp,
    db: &sqlx::PgPool,
    body: Value,
) -> (
    sqlx::Transaction<'static, sqlx::Postgres>,
    tokio::task::JoinHandle<(StatusCode, Value)>,
    std::time::Instant,
) {
    commits_wait_on_the_test(db).await;
    let held = held_commits(db).await;
    let sent = std::time::Instant::now();
    let refreshed = refresh_meanwhile(app, body);
    eventually(Duration::from_secs(5), "the commit waiting", || async {
        waiting_on_a_lock(db).await == 1
    })
    .await;
    (held, refreshed, sent)
}

/// A refresh whose commit is sent in time waits for its answer, even past the time its
/// statements had, and tells the client what it came to. Before, the whole refresh was cut at
/// 9 s, the commit with it: the client heard 503 while the commit landed, and with no reuse
/// grace its retry then revoked the session.
#[tokio::test]
async fn a_refresh_whose_commit_is_slow_answers_with_its_tokens() {
    let (app, body) = signed_in_with_no_reuse_grace().await;
    let db = app.db().await;
    let (held, refreshed, started) = a_refresh_held_at_its_commit(&app, &db, body).await;
    // Past the 9 s the refresh as a whole once had, within the router's 10 s; time itself is
    // what this test needs.
    tokio::time::sleep(Duration::from_millis(9_100).saturating_sub(started.elapsed())).await;
    held.rollback().await.expect("the commit let go");
    let (status, session) = refreshed.await.expect("the request");
    assert_eq!(
        status,
        StatusCode::OK,
        "after {:?}: {session}",
        started.elapsed()
    );
    let next = json!({ "refresh_token": session["refresh_token"] });
    let reply = app.post("/v1/token/refresh", next).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
}

/// A commit whose connection broke while it was still under way is waited for: PostgreSQL says
/// "in progress" until it lands, then the client gets its new pair. Looking for the new token
/// at once, as a first version did, found nothing and answered 503 for a rotation that then
/// landed.
#[tokio::test]
async fn a_refresh_whose_commit_lands_after_its_connection_broke_answers_with_its_tokens() {
    let (postgres, app, database, db) =
        one_connection_through_a_proxy(Spawn::default().var("REFRESH_REUSE_GRACE_SECS", 0)).await;
    let session = app.sign_in(PHONE).await;
    let body = json!({ "refresh_token": session["refresh_token"] });
    let (held, refreshed, _) = a_refresh_held_at_its_commit(&app, &db, body).await;
    postgres.cut_connections();
    // The api asks after its commit on a new connection, and hears "in progress".
    eventually(Duration::from_secs(5), "the api asking after its commit", || async {
        let asked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'SELECT pg_xact_status%'",
        )
        .fetch_one(&db)
        .await
        .expect("pg_stat_activity");
        asked > 0
    })
    .await;
    held.rollback().await.expect("the commit let go");
    let (status, session) = refreshed.await.expect("the request");
    assert_eq!(status, StatusCode::OK, "{session}");
    let next = json!({ "refresh_token": session["refresh_token"] });
    let reply = app.post("/v1/token/refresh", next).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    drop(app);
    db.close().await;
    drop_database(&database).await;
}

/// A commit that failed with its connection (its backend ended while committing) is not taken
/// for one that landed: PostgreSQL says it was aborted, the client hears 503, the token still
/// works, and the day's count is given back.
#[tokio::test]
async fn a_refresh_whose_commit_was_cut_short_rotates_nothing() {
    let (app, body) = signed_in_with_no_reuse_grace().await;
    let db = app.db().await;
    let (held, refreshed, _) = a_refresh_held_at_its_commit(&app, &db, body.clone()).await;
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .execute(&db)
    .await
    .expect("the committing backend ended");
    held.rollback().await.expect("the lock released");
    let (status, problem) = refreshed.await.expect("the request");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    let day = app.refresh_day().await;
    eventually(Duration::from_secs(5), "the count given back", || async {
        app.limit_count(&day).await == Some(0)
    })
    .await;
    let reply = app.post("/v1/token/refresh", body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
}

/// A commit that has not answered by the end of the request's time (a stalled synchronous
/// standby) is the one case left: the client hears 503, and the warning says the commit may have
/// landed, where a refresh rolled back says nothing of the kind.
#[tokio::test]
async fn a_refresh_whose_commit_outlasts_the_request_says_it_may_have_landed() {
    let (app, body) = signed_in_with_no_reuse_grace().await;
    let db = app.db().await;
    commits_wait_on_the_test(&db).await;
    let held = held_commits(&db).await;
    let (status, problem) = refresh_meanwhile(&app, body).await.expect("the request");
    held.rollback().await.expect("the commit let go");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    let request_id = problem["request_id"].as_str().expect("a request id");
    let logs = crate::helpers::captured_logs();
    assert!(
        logs.lines()
            .any(|line| line.contains(request_id) && line.contains("may have landed")),
        "no warning for {request_id}"
    );
    // It most likely landed: it stays counted against the day.
    assert_eq!(app.limit_count(&app.refresh_day().await).await, Some(1));
}

/// A refresh whose commit landed but whose answer was lost with the connection looks for its new
/// token, finds it, and answers with the pair. Before, it answered 503 for a rotation that had
/// happened, and with no reuse grace the client's retry revoked the session.
#[tokio::test]
async fn a_refresh_whose_commit_lost_its_answer_finds_it_landed() {
    let (postgres, app, database, db) =
        one_connection_through_a_proxy(Spawn::default().var("REFRESH_REUSE_GRACE_SECS", 0)).await;
    let session = app.sign_in(PHONE).await;
    let body = json!({ "refresh_token": session["refresh_token"] });
    let (held, refreshed, _) = a_refresh_held_at_its_commit(&app, &db, body).await;
    postgres.hold_replies();
    held.rollback().await.expect("the commit let go");
    eventually(Duration::from_secs(5), "the rotation stored", || async {
        let rotated: i64 =
            sqlx::query_scalar("SELECT count(*) FROM tokens WHERE rotated_at IS NOT NULL")
                .fetch_one(&db)
                .await
                .expect("count");
        rotated == 1
    })
    .await;
    postgres.cut_connections();
    postgres.release_replies();
    let (status, session) = refreshed.await.expect("the request");
    assert_eq!(status, StatusCode::OK, "{session}");
    // It rotated, so it stays counted against the day.
    assert_eq!(app.limit_count(&refresh_day_in(&db).await).await, Some(1));
    let next = json!({ "refresh_token": session["refresh_token"] });
    let reply = app.post("/v1/token/refresh", next).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    drop(app);
    db.close().await;
    drop_database(&database).await;
}

/// A rotation that waited for its session's lock starts its reuse grace when it happens: the
/// client's retry straight after it is within the grace, though the refresh began longer ago
/// than the grace. Stamped with the transaction's start, as before, the token looked rotated 3 s
/// ago, and the retry revoked the session.
#[tokio::test]
async fn a_rotation_that_waited_on_a_lock_starts_its_grace_when_it_happens() {
    let app = spawn_with(
        Spawn::default()
            .var("DATABASE_STATEMENT_TIMEOUT_MS", 30_000)
            .var("REFRESH_REUSE_GRACE_SECS", 2),
    )
    .await;
    let session = app.sign_in(PHONE).await;
    let body = json!({ "refresh_token": session["refresh_token"] });
    let db = app.db().await;
    let row = locked(&app, "SELECT id FROM sessions FOR UPDATE").await;
    let refreshed = refresh_meanwhile(&app, body.clone());
    eventually(Duration::from_secs(5), "the rotation waiting", || async {
        waiting_on_a_lock(&db).await == 1
    })
    .await;
    // Longer than the grace; time itself is what this test needs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    row.rollback().await.expect("the row's lock released");
    let (status, first) = refreshed.await.expect("the request");
    assert_eq!(status, StatusCode::OK, "{first}");
    let retry = app.post("/v1/token/refresh", body).await;
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.body);
    // Both pairs work: the session was not revoked.
    let next = json!({ "refresh_token": first["refresh_token"] });
    let reply = app.post("/v1/token/refresh", next).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
}

/// `DATABASE_STATEMENT_TIMEOUT_MS=0` leaves PostgreSQL's own `statement_timeout` (set here on the
/// database, as behind PgBouncer it would be on the role): a sign-in stuck behind a lock answers
/// 503 at the server's 700 ms, where an api that set 0 itself would wait for the lock.
#[tokio::test]
async fn with_no_statement_timeout_of_its_own_the_api_keeps_the_servers() {
    let app = spawn_app().await;
    let code = app.code_for(PHONE).await;
    let db = app.db().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{}\" SET statement_timeout = '700ms'",
        app.database
    )))
    .execute(&db)
    .await
    .expect("the server's timeout, for new connections");
    let second = spawn_with(
        Spawn::default()
            .var("DATABASE_URL", servers().database_url(&app.database))
            .var("NAMESPACE", &app.namespace)
            .var("DATABASE_STATEMENT_TIMEOUT_MS", 0),
    )
    .await;
    let lock = locked(&app, "LOCK TABLE users IN SHARE MODE").await;
    let started = std::time::Instant::now();
    second
        .verify(PHONE, &code)
        .await
        .assert_problem(503, "unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "held to the server's 700 ms, not the lock: {:?}",
        started.elapsed()
    );
    lock.rollback().await.expect("the lock released");
    // The code was put back: it still signs in.
    let reply = second.verify(PHONE, &code).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
}

/// A code put back after a sign-in stuck behind a lock does not come back over a newer code the
/// user requested and tried meanwhile. Before, the older code was put back first, the newer one
/// then could not be (a code existed), and the user's latest SMS answered 401.
#[tokio::test]
async fn a_code_put_back_never_replaces_a_newer_one_used_meanwhile() {
    // Time enough for the newer code's sign-in to begin while the older one's still waits.
    let app = spawn_with(
        Spawn::default()
            .var("OTP_RESEND_SECS", 0)
            .var("DATABASE_STATEMENT_TIMEOUT_MS", 6_000),
    )
    .await;
    let older = app.code_for(PHONE).await;
    let phone = shared::PhoneNumber::parse(PHONE).expect("E.164");
    let current = shared::otp_keys::current_code(&app.namespace, &phone);
    let lock = locked(&app, "LOCK TABLE users IN SHARE MODE").await;
    let older_answered = AtomicBool::new(false);
    let meanwhile = async {
        eventually(
            Duration::from_secs(5),
            "the older code consumed",
            || async {
                let exists: bool = redis::cmd("EXISTS")
                    .arg(&current)
                    .query_async(&mut app.redis().await)
                    .await
                    .expect("EXISTS");
                !exists
            },
        )
        .await;
        let newer = app.code_for(PHONE).await;
        assert!(
            !older_answered.load(Ordering::SeqCst),
            "the older sign-in still waits"
        );
        (app.verify(PHONE, &newer).await, newer)
    };
    let first = async {
        let answer = app.verify(PHONE, &older).await;
        older_answered.store(true, Ordering::SeqCst);
        answer
    };
    let (first, (second, newer)) = tokio::join!(first, meanwhile);
    first.assert_problem(503, "unavailable");
    second.assert_problem(503, "unavailable");
    lock.rollback().await.expect("the lock released");
    app.verify(PHONE, &older)
        .await
        .assert_problem(401, "invalid_otp");
    let session = app.verify(PHONE, &newer).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
}

/// A replayed refresh token revokes its session, and a logout or a logout-all ends theirs, even
/// when the sessions' tokens cannot be deleted within the statement timeout (here they are locked; in production a
/// session with very many rows): the tokens are dead once the session is revoked, and the purge
/// deletes them later. Before, the failed delete rolled the revocation back: 503, and the thief's
/// tokens kept working.
#[tokio::test]
async fn a_revocation_holds_when_its_tokens_cannot_be_deleted_in_time() {
    let app = spawn_with(
        Spawn::default()
            .var("DATABASE_STATEMENT_TIMEOUT_MS", 500)
            .var("REFRESH_REUSE_GRACE_SECS", 0),
    )
    .await;
    let owner = app.sign_in(PHONE).await;
    let stolen = owner["refresh_token"].as_str().unwrap().to_owned();
    let refresh = |token: String| app.post("/v1/token/refresh", json!({ "refresh_token": token }));
    let thief = refresh(stolen.clone()).await;
    assert_eq!(thief.status, StatusCode::OK, "{}", thief.body);
    let thief_access = thief.body["access_token"].as_str().unwrap().to_owned();
    let other = app.sign_in_again(PHONE).await;
    let other_access = other["access_token"].as_str().unwrap().to_owned();
    let third = app.sign_in_again(PHONE).await;
    let third_access = third["access_token"].as_str().unwrap().to_owned();

    let lock = locked(&app, "LOCK TABLE tokens IN SHARE MODE").await;
    // The owner's app presents the stolen, since rotated, token.
    refresh(stolen)
        .await
        .assert_problem(401, "invalid_refresh_token");
    let logout = |access: &str, body: Value| {
        app.send(
            app.client
                .post(app.url("/v1/logout"))
                .bearer_auth(access)
                .json(&body),
        )
    };
    for (access, body) in [
        (&other_access, json!({})),
        (&third_access, json!({"all": true})),
    ] {
        let reply = logout(access, body).await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.body);
    }
    for access in [&thief_access, &other_access, &third_access] {
        app.get_authed("/v1/me", access)
            .await
            .assert_problem(401, "unauthorized");
    }
    lock.rollback().await.expect("the lock released");
    app.get_authed("/v1/me", &thief_access)
        .await
        .assert_problem(401, "unauthorized");
}

/// The purge of ended sessions is not held to the requests' statement timeout: a purge batch
/// that must wait (here on a lock; in a large deployment, scanning `sessions`) finishes, where
/// before it was cancelled at the timeout and tried again only ten minutes later, on every run.
/// A second api on the same database, started while the lock is held, does the purge at start.
#[tokio::test]
async fn the_purge_is_not_held_to_the_requests_statement_timeout() {
    let app = spawn_app().await;
    let session = app.sign_in(PHONE).await;
    let user_id = session["user"]["id"].as_str().unwrap().to_owned();
    let db = app.db().await;
    sqlx::query(
        "UPDATE sessions SET revoked_at = now() - interval '2 days' WHERE user_id::text = $1",
    )
    .bind(&user_id)
    .execute(&db)
    .await
    .expect("a session revoked two days ago");
    let lock = locked(&app, "LOCK TABLE sessions IN SHARE MODE").await;
    let _purger = spawn_with(Spawn {
        wait_ready: false,
        ..Spawn::default()
            .var("DATABASE_URL", servers().database_url(&app.database))
            .var("DATABASE_STATEMENT_TIMEOUT_MS", 500)
    })
    .await;
    eventually(
        Duration::from_secs(15),
        "the purge waiting on the lock past the requests' timeout",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'DELETE FROM sessions%' AND now() - query_start > interval '1 second'",
            )
            .fetch_one(&db)
            .await
            .expect("pg_stat_activity");
            waiting == 1
        },
    )
    .await;
    lock.rollback().await.expect("the lock released");
    eventually(
        Duration::from_secs(10),
        "the ended session purged",
        || async {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_id::text = $1")
                    .bind(&user_id)
                    .fetch_one(&db)
                    .await
                    .expect("a count");
            left == 0
        },
    )
    .await;
}
