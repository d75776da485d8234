//! Sessions: a logout cannot race a rotation, rotation retires the old access token, refresh is
//! rate limited and ends with the session, and a retried refresh does not sign the user out.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::wait::eventually;

use crate::helpers::{
    PHONE, Reply, Spawn, TestApp, captured_logs, metric_value, spawn_app, spawn_with,
};

fn token(session: &Value, name: &str) -> String {
    session[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} in {session}"))
        .to_owned()
}

async fn refresh(app: &TestApp, refresh_token: &str) -> Reply {
    app.post(
        "/v1/token/refresh",
        json!({ "refresh_token": refresh_token }),
    )
    .await
}

/// A refresh that must succeed: the new session body.
async fn rotate(app: &TestApp, refresh_token: &str) -> Value {
    let reply = refresh(app, refresh_token).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body
}

async fn me(app: &TestApp, access: &str) -> StatusCode {
    app.get_authed("/v1/me", access).await.status
}

/// Every refresh and access token of `session` is refused.
async fn assert_signed_out(app: &TestApp, session: &Value) {
    app.get_authed("/v1/me", &token(session, "access_token"))
        .await
        .assert_problem(401, "unauthorized");
    refresh(app, &token(session, "refresh_token"))
        .await
        .assert_problem(401, "invalid_refresh_token");
}

async fn scalar(db: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(db)
        .await
        .expect("a count")
}

/// Starts a refresh that stalls while inserting its new pair (a trigger sleeps 1 s), logs out
/// while it holds the session, and checks that nothing of the session is left alive.
async fn logout_during_a_rotation(logout_body: Option<Value>) {
    let app = spawn_app().await;
    let session = app.sign_in(PHONE).await;
    let db = app.db().await;
    sqlx::query(
        "CREATE FUNCTION slow_refresh() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$ LANGUAGE plpgsql",
    )
    .execute(&db)
    .await
    .expect("the function is created");
    sqlx::query(
        "CREATE TRIGGER slow_refresh BEFORE INSERT ON tokens FOR EACH ROW WHEN (NEW.scope = 'refresh') EXECUTE FUNCTION slow_refresh()",
    )
    .execute(&db)
    .await
    .expect("the trigger is created");

    let refresh_token = token(&session, "refresh_token");
    let rotation = refresh(&app, &refresh_token);
    let logout = async {
        eventually(Duration::from_secs(10), "the refresh in its insert", || async {
            let sleeping: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'",
            )
            .fetch_one(&db)
            .await
            .ok()?;
            (sleeping > 0).then_some(())
        })
        .await;
        let mut request = app
            .client
            .post(app.url("/v1/logout"))
            .bearer_auth(token(&session, "access_token"));
        if let Some(body) = &logout_body {
            request = request.json(body);
        }
        app.send(request).await
    };
    let (rotated, logout) = tokio::join!(rotation, logout);
    assert_eq!(logout.status, StatusCode::NO_CONTENT, "{}", logout.body);
    if rotated.status == StatusCode::OK {
        // The pair the refresh inserted while the logout waited is revoked with the rest.
        assert_signed_out(&app, &rotated.body).await;
    } else {
        rotated.assert_problem(401, "invalid_refresh_token");
    }
    assert_signed_out(&app, &session).await;
    let live = scalar(
        &db,
        "SELECT count(*) FROM tokens t JOIN sessions s ON s.id = t.family_id WHERE s.revoked_at IS NULL",
    )
    .await;
    assert_eq!(live, 0, "tokens of a live session");
    assert_eq!(scalar(&db, "SELECT count(*) FROM tokens").await, 0);
}

#[tokio::test]
async fn a_logout_during_a_rotation_revokes_the_pair_it_inserts() {
    logout_during_a_rotation(None).await;
}

#[tokio::test]
async fn a_logout_everywhere_during_a_rotation_revokes_the_pair_it_inserts() {
    logout_during_a_rotation(Some(json!({ "all": true }))).await;
}

/// `(access tokens, live refresh tokens, rotated refresh tokens)` of the user's sessions.
async fn token_rows(app: &TestApp, user_id: &str) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE scope = 'authentication'),
                count(*) FILTER (WHERE scope = 'refresh' AND rotated_at IS NULL),
                count(*) FILTER (WHERE scope = 'refresh' AND rotated_at IS NOT NULL)
         FROM tokens WHERE user_id::text = $1",
    )
    .bind(user_id)
    .fetch_one(&app.db().await)
    .await
    .expect("token rows")
}

/// Starts the user's sessions' next refresh rate window.
const NEW_WINDOW: &str = "UPDATE sessions SET refresh_window_started_at = now() - interval '2 minutes' WHERE user_id::text = $1";

/// Runs `sql`, whose `$1` is the user's id as text; `what` says what it does, if it fails.
async fn for_user(db: &sqlx::PgPool, user_id: &str, sql: &'static str, what: &str) {
    sqlx::query(sql)
        .bind(user_id)
        .execute(db)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[tokio::test]
async fn twenty_five_refreshes_leave_one_live_pair_and_keep_the_rotated_refresh_tokens() {
    let app = spawn_with(Spawn::default().var("REFRESH_PER_SESSION_PER_MINUTE", 100)).await;
    let mut session = app.sign_in(PHONE).await;
    let user_id = session["user"]["id"].as_str().unwrap().to_owned();
    let mut access_tokens = vec![token(&session, "access_token")];
    for _ in 0..25 {
        session = rotate(&app, &token(&session, "refresh_token")).await;
        access_tokens.push(token(&session, "access_token"));
    }
    let (latest, retired) = access_tokens.split_last().unwrap();
    assert_eq!(me(&app, latest).await, StatusCode::OK);
    for old in retired {
        app.get_authed("/v1/me", old)
            .await
            .assert_problem(401, "unauthorized");
    }
    // The rotated refresh tokens stay, so that any of them presented again is a replay
    // (tokens.rs).
    assert_eq!(token_rows(&app, &user_id).await, (1, 1, 25));
}

/// A session keeps its rows bounded: the newest 3,000 rotated refresh tokens, the older ones
/// deleted once a day old. Within the day none goes, so a thief cannot push the owner's copy
/// out by refreshing. The rotations past the first are written straight into the table: 3,000
/// refreshes would make a slow test of a bound that only counts rows.
#[tokio::test]
async fn a_session_keeps_at_most_three_thousand_rotated_refresh_tokens_a_day_old() {
    let app = spawn_app().await;
    let first = app.sign_in(PHONE).await;
    let user_id = first["user"]["id"].as_str().unwrap().to_owned();
    let owners_copy = token(&first, "refresh_token");
    let mut session = rotate(&app, &owners_copy).await;
    let db = app.db().await;
    // The owner's copy, rotated first, then a thief's 3,002 rotations.
    for_user(&db, &user_id, "UPDATE tokens SET rotated_at = now() - interval '2 hours' WHERE rotated_at IS NOT NULL AND user_id::text = $1", "the owner's copy rotated first").await;
    sqlx::query(
        "INSERT INTO tokens (hash, user_id, expiry, scope, family_id, pair_id, rotated_at)
         SELECT sha256(convert_to(gen_random_uuid()::text, 'UTF8')), user_id,
                now() + interval '30 days', 'refresh', id, gen_random_uuid(),
                now() - interval '1 hour' + make_interval(secs => i)
         FROM sessions, generate_series(1, 3002) AS i
         WHERE user_id::text = $1",
    )
    .bind(&user_id)
    .execute(&db)
    .await
    .expect("3,002 rotations");
    // Rotated within the day, none goes, however many.
    for_user(&db, &user_id, NEW_WINDOW, "a new window").await;
    session = rotate(&app, &token(&session, "refresh_token")).await;
    assert_eq!(token_rows(&app, &user_id).await, (1, 1, 3_004));
    for_user(&db, &user_id, "UPDATE tokens SET rotated_at = rotated_at - interval '25 hours' WHERE rotated_at IS NOT NULL AND user_id::text = $1", "the rotations made a day old").await;
    // Within the session's rate window, a refresh trims nothing: a trim reads all of the
    // session's rotated tokens, so it runs at most once a window.
    for_user(
        &db,
        &user_id,
        "UPDATE sessions SET refresh_window_started_at = now() WHERE user_id::text = $1",
        "a window just started",
    )
    .await;
    session = rotate(&app, &token(&session, "refresh_token")).await;
    assert_eq!(token_rows(&app, &user_id).await, (1, 1, 3_005));
    // The next window's first refresh deletes the oldest past the newest 3,000, the owner's
    // copy first: presenting it now revokes nothing.
    for_user(&db, &user_id, NEW_WINDOW, "a new window").await;
    session = rotate(&app, &token(&session, "refresh_token")).await;
    assert_eq!(token_rows(&app, &user_id).await, (1, 1, 3_000));
    refresh(&app, &owners_copy)
        .await
        .assert_problem(401, "invalid_refresh_token");
    assert_eq!(
        me(&app, &token(&session, "access_token")).await,
        StatusCode::OK
    );
}

/// Refreshes retried within the reuse grace each leave a live pair; past the newest 100 live
/// refresh tokens, the next window's first refresh retires the oldest as rotated (their access
/// tokens deleted), so presenting one revokes the session. Before, a thief alternating rotations
/// and grace refreshes piled up live tokens for the refresh lifetime, which every trim and a
/// revocation then read.
#[tokio::test]
async fn a_session_keeps_at_most_a_hundred_live_refresh_tokens() {
    let app = spawn_with(
        Spawn::default()
            .var("REFRESH_PER_SESSION_PER_MINUTE", 10_000)
            .var("REFRESH_PER_SESSION_PER_DAY", 100_000)
            .var("REFRESH_REUSE_GRACE_SECS", 300),
    )
    .await;
    let first = app.sign_in(PHONE).await;
    let user_id = first["user"]["id"].as_str().unwrap().to_owned();
    let rotated = token(&first, "refresh_token");
    let session = rotate(&app, &rotated).await;
    let db = app.db().await;
    // No window starts during the loop, however slow the machine.
    for_user(&db, &user_id, "UPDATE sessions SET refresh_window_started_at = now() + interval '1 hour' WHERE user_id::text = $1", "the window held open").await;
    let mut retried = Vec::new();
    for _ in 0..104 {
        retried.push(rotate(&app, &rotated).await);
    }
    // The first rotation's pair and the 104 retries' pairs, all live.
    assert_eq!(token_rows(&app, &user_id).await, (105, 105, 1));
    for_user(&db, &user_id, "UPDATE sessions SET refresh_window_started_at = now() - interval '2 minutes' WHERE user_id::text = $1", "the window over").await;
    let newest = rotate(&app, &token(&retried[103], "refresh_token")).await;
    // 105 live before: the 5 oldest are retired, the newest is rotated, and a new pair comes.
    assert_eq!(token_rows(&app, &user_id).await, (100, 100, 7));
    assert_eq!(
        me(&app, &token(&session, "access_token")).await,
        StatusCode::UNAUTHORIZED,
        "the oldest live pair was retired"
    );
    assert_eq!(
        me(&app, &token(&retried[4], "access_token")).await,
        StatusCode::OK
    );
    assert_eq!(
        me(&app, &token(&newest, "access_token")).await,
        StatusCode::OK
    );
    // Whoever held the oldest (say, the owner, pushed out by a thief's newer ones) presents it:
    // a replay, and the whole session ends.
    refresh(&app, &token(&session, "refresh_token"))
        .await
        .assert_problem(401, "invalid_refresh_token");
    assert_signed_out(&app, &newest).await;
}

#[tokio::test]
async fn a_session_refreshing_too_often_is_rate_limited() {
    let app = spawn_with(Spawn::default().var("REFRESH_PER_SESSION_PER_MINUTE", 3)).await;
    let mut session = app.sign_in(PHONE).await;
    for _ in 0..3 {
        session = rotate(&app, &token(&session, "refresh_token")).await;
    }
    let refused = refresh(&app, &token(&session, "refresh_token")).await;
    refused.assert_problem(429, "rate_limited");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    // Another sign-in of the same user has a budget of its own.
    let other = app.sign_in_again(PHONE).await;
    rotate(&app, &token(&other, "refresh_token")).await;
}

/// A session refreshes at most `REFRESH_PER_SESSION_PER_DAY` times a day, refreshes retried
/// within the reuse grace included. Past that, a session with two holders is revoked: a thief who
/// forked it within the grace (two chains, neither ever replaying) is signed out with the owner.
/// Refreshes refused for another reason do not count.
#[tokio::test]
async fn a_session_refreshing_past_its_daily_cap_is_revoked() {
    let app = spawn_with(
        Spawn::default()
            .var("REFRESH_PER_SESSION_PER_MINUTE", 3)
            .var("REFRESH_PER_SESSION_PER_DAY", 4),
    )
    .await;
    let first = app.sign_in(PHONE).await;
    // The owner's chain and a thief's, forked within the grace.
    let owner = rotate(&app, &token(&first, "refresh_token")).await;
    let thief = rotate(&app, &token(&first, "refresh_token")).await;
    let thief = rotate(&app, &token(&thief, "refresh_token")).await;
    // The minute's limit refuses the fourth, which does not count against the day.
    refresh(&app, &token(&thief, "refresh_token"))
        .await
        .assert_problem(429, "rate_limited");
    let db = app.db().await;
    let user_id = first["user"]["id"].as_str().unwrap().to_owned();
    for_user(&db, &user_id, NEW_WINDOW, "a new window").await;
    let owner = rotate(&app, &token(&owner, "refresh_token")).await;
    assert_eq!(
        me(&app, &token(&thief, "access_token")).await,
        StatusCode::OK
    );
    // The fifth of the day revokes the session: both chains are signed out, and no token of it
    // is left.
    let over_cap = r#"token_refreshes_total{outcome="over_daily_cap"}"#;
    let before = metric_value(&app.metrics().await, over_cap);
    refresh(&app, &token(&thief, "refresh_token"))
        .await
        .assert_problem(401, "invalid_refresh_token");
    assert_signed_out(&app, &owner).await;
    assert_signed_out(&app, &thief).await;
    assert_eq!(token_rows(&app, &user_id).await, (0, 0, 0));
    let revoked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sessions WHERE user_id::text = $1 AND revoked_at IS NOT NULL",
    )
    .bind(&user_id)
    .fetch_one(&db)
    .await
    .expect("the session");
    assert_eq!(revoked, 1);
    // Other tests in this process revoke sessions too: the warning names this one.
    let session_id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM sessions WHERE user_id::text = $1")
            .bind(&user_id)
            .fetch_one(&db)
            .await
            .expect("the session");
    let logs = captured_logs();
    assert!(
        logs.lines()
            .any(|line| line.contains("used up its refreshes of the day")
                && line.contains(&session_id.to_string())),
        "the warning names the session"
    );
    assert!(metric_value(&app.metrics().await, over_cap) >= before + 1.0);
    // Another sign-in of the same user has a day of its own.
    let other = app.sign_in_again(PHONE).await;
    rotate(&app, &token(&other, "refresh_token")).await;
}

/// One client alone at its daily cap is slowed, not signed out: `429` naming the limit, its
/// refresh token unrotated and still good once the sliding day frees a refresh. The pair its own
/// retry within the grace left behind does not make it two holders. A rotated token presented at
/// the cap (a replay) still revokes the session.
#[tokio::test]
async fn one_client_at_its_daily_cap_waits_and_a_replay_there_still_revokes() {
    let app = spawn_with(Spawn::default().var("REFRESH_PER_SESSION_PER_DAY", 2)).await;
    let first = app.sign_in(PHONE).await;
    let user_id = first["user"]["id"].as_str().unwrap().to_owned();
    // A refresh whose answer was lost, and the client's retry within the grace: the first pair
    // stays live, unused.
    rotate(&app, &token(&first, "refresh_token")).await;
    let mut session = rotate(&app, &token(&first, "refresh_token")).await;
    let throttled = r#"token_refreshes_total{outcome="daily_cap"}"#;
    let before = metric_value(&app.metrics().await, throttled);
    let refused = refresh(&app, &token(&session, "refresh_token")).await;
    refused.assert_problem(429, "rate_limited");
    assert!(
        refused.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("REFRESH_PER_SESSION_PER_DAY")),
        "{}",
        refused.body
    );
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after > 60, "Retry-After {retry_after}");
    assert!(metric_value(&app.metrics().await, throttled) >= before + 1.0);
    // At the cap, a token that can no longer be used answers as below it, revoking nothing.
    let db = app.db().await;
    const EXPIRE: &str = "UPDATE tokens SET expiry = expiry - interval '60 days' WHERE scope = 'refresh' AND user_id::text = $1";
    const UNEXPIRE: &str = "UPDATE tokens SET expiry = expiry + interval '60 days' WHERE scope = 'refresh' AND user_id::text = $1";
    for_user(&db, &user_id, EXPIRE, "the refresh tokens expired").await;
    refresh(&app, &token(&session, "refresh_token"))
        .await
        .assert_problem(401, "invalid_refresh_token");
    for_user(&db, &user_id, UNEXPIRE, "the refresh tokens back").await;
    assert_eq!(
        me(&app, &token(&session, "access_token")).await,
        StatusCode::OK
    );
    assert_eq!(
        me(&app, &token(&session, "access_token")).await,
        StatusCode::OK
    );
    // The day frees its refreshes: the same token, never rotated, refreshes.
    let session_id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM sessions WHERE user_id::text = $1")
            .bind(&user_id)
            .fetch_one(&app.db().await)
            .await
            .expect("the session");
    let day = format!("{}:limit:session:{{{session_id}}}:refreshes", app.namespace);
    let () = redis::cmd("DEL")
        .arg(&day)
        .query_async(&mut app.redis().await)
        .await
        .expect("the day over");
    let rotated = token(&session, "refresh_token");
    session = rotate(&app, &rotated).await;
    session = rotate(&app, &token(&session, "refresh_token")).await;
    // At the cap again, a replay of a rotated token (past the grace) revokes the session.
    for_user(
        &db,
        &user_id,
        "UPDATE tokens SET rotated_at = rotated_at - interval '1 minute' WHERE rotated_at IS NOT NULL AND user_id::text = $1",
        "the rotations past the grace",
    )
    .await;
    refresh(&app, &rotated)
        .await
        .assert_problem(401, "invalid_refresh_token");
    assert_signed_out(&app, &session).await;
}

#[tokio::test]
async fn a_session_cannot_be_refreshed_past_its_maximum_lifetime() {
    let app = spawn_with(Spawn::default().var("SESSION_MAX_LIFETIME_SECS", 60)).await;
    let session = app.sign_in(PHONE).await;
    for field in ["expires_in", "refresh_expires_in"] {
        let secs = session[field].as_u64().unwrap();
        assert!((1..=60).contains(&secs), "{field} {secs}");
    }
    let rotated = rotate(&app, &token(&session, "refresh_token")).await;
    assert!(rotated["refresh_expires_in"].as_u64().unwrap() <= 60);

    let db = app.db().await;
    sqlx::query("UPDATE sessions SET expires_at = now() - interval '1 second'")
        .execute(&db)
        .await
        .unwrap();
    refresh(&app, &token(&rotated, "refresh_token"))
        .await
        .assert_problem(401, "invalid_refresh_token");
}

#[tokio::test]
async fn a_retried_refresh_within_the_grace_keeps_both_pairs_working() {
    let app = spawn_app().await;
    let session = app.sign_in(PHONE).await;
    let first = rotate(&app, &token(&session, "refresh_token")).await;
    // The answer was lost; the client presents the same refresh token again.
    let second = rotate(&app, &token(&session, "refresh_token")).await;
    assert_ne!(
        token(&first, "access_token"),
        token(&second, "access_token")
    );
    assert_eq!(first["user"]["id"], second["user"]["id"]);
    for pair in [&first, &second] {
        assert_eq!(me(&app, &token(pair, "access_token")).await, StatusCode::OK);
    }
    for pair in [&first, &second] {
        rotate(&app, &token(pair, "refresh_token")).await;
    }
    let db = app.db().await;
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM sessions WHERE revoked_at IS NOT NULL"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn a_rotated_refresh_token_replayed_after_the_grace_revokes_the_session() {
    let app = spawn_with(Spawn::default().var("REFRESH_REUSE_GRACE_SECS", 2)).await;
    let session = app.sign_in(PHONE).await;
    let first = rotate(&app, &token(&session, "refresh_token")).await;
    let rotated_at = Instant::now();
    let second = rotate(&app, &token(&session, "refresh_token")).await;

    // Waiting out the configured grace is the point of the test.
    tokio::time::sleep(Duration::from_millis(2_500).saturating_sub(rotated_at.elapsed())).await;
    refresh(&app, &token(&session, "refresh_token"))
        .await
        .assert_problem(401, "invalid_refresh_token");
    for pair in [&first, &second] {
        assert_signed_out(&app, pair).await;
    }
    let db = app.db().await;
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM sessions WHERE revoked_at IS NOT NULL"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn with_no_grace_a_replayed_refresh_token_revokes_the_session_at_once() {
    let app = spawn_with(Spawn::default().var("REFRESH_REUSE_GRACE_SECS", 0)).await;
    let session = app.sign_in(PHONE).await;
    let rotated = rotate(&app, &token(&session, "refresh_token")).await;
    refresh(&app, &token(&session, "refresh_token"))
        .await
        .assert_problem(401, "invalid_refresh_token");
    assert_signed_out(&app, &rotated).await;
    let db = app.db().await;
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM sessions WHERE revoked_at IS NOT NULL"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn deleting_a_user_deletes_every_session_and_token_of_it() {
    let app = spawn_app().await;
    let first = app.sign_in(PHONE).await;
    let second = app.sign_in_again(PHONE).await;
    rotate(&app, &token(&second, "refresh_token")).await;
    let db = app.db().await;
    assert!(scalar(&db, "SELECT count(*) FROM tokens").await >= 4);

    // What an operator's erasure does: tokens go with their sessions, whatever references
    // `users` directly.
    sqlx::query("DELETE FROM users")
        .execute(&db)
        .await
        .expect("delete the user");

    assert_eq!(scalar(&db, "SELECT count(*) FROM sessions").await, 0);
    assert_eq!(scalar(&db, "SELECT count(*) FROM tokens").await, 0);
    assert_signed_out(&app, &first).await;
}

#[tokio::test]
async fn a_token_signs_in_the_user_of_its_session_whatever_its_own_row_says() {
    let app = spawn_app().await;
    let alice = app.sign_in(PHONE).await;
    let bob = app.sign_in("+14155550199").await;
    let db = app.db().await;
    // A row that disagrees with its session (no code writes one): the session decides.
    sqlx::query("UPDATE tokens SET user_id = $1::uuid")
        .bind(bob["user"]["id"].as_str().expect("bob's id"))
        .execute(&db)
        .await
        .expect("rewrite the rows");

    let reply = app
        .get_authed("/v1/me", &token(&alice, "access_token"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["phone_number"], alice["user"]["phone_number"]);
    let rotated = rotate(&app, &token(&alice, "refresh_token")).await;
    assert_eq!(rotated["user"]["id"], alice["user"]["id"]);
}
