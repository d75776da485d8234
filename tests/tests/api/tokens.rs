//! Refresh rotation with reuse detection, logout and logout-all.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{PHONE, Spawn, TestApp, count, spawn_app, spawn_with};

fn token(session: &Value, name: &str) -> String {
    session[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} in {session}"))
        .to_owned()
}

async fn refresh(app: &TestApp, refresh_token: &str) -> crate::helpers::Reply {
    app.post(
        "/v1/token/refresh",
        json!({ "refresh_token": refresh_token }),
    )
    .await
}

async fn logout(app: &TestApp, access: &str, body: Option<Value>) -> crate::helpers::Reply {
    let mut request = app.client.post(app.url("/v1/logout")).bearer_auth(access);
    if let Some(body) = body {
        request = request.json(&body);
    }
    app.send(request).await
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    // No reuse grace: the replay below revokes at once (the grace has tests of its own).
    let app = spawn_with(Spawn::default().var("REFRESH_REUSE_GRACE_SECS", 0)).await;
    let first = app.sign_in(PHONE).await;
    let rotated = refresh(&app, &token(&first, "refresh_token")).await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.body);
    assert_eq!(rotated.body["token_type"], "Bearer");
    assert_eq!(rotated.body["new_user"], false);
    assert_eq!(rotated.body["user"]["id"], first["user"]["id"]);
    let new_access = token(&rotated.body, "access_token");
    let new_refresh = token(&rotated.body, "refresh_token");
    assert_ne!(new_refresh, token(&first, "refresh_token"));
    assert_eq!(
        app.get_authed("/v1/me", &new_access).await.status,
        StatusCode::OK
    );

    // Replaying the rotated token: refused, and everything issued from it is revoked.
    refresh(&app, &token(&first, "refresh_token"))
        .await
        .assert_problem(401, "invalid_refresh_token");
    refresh(&app, &new_refresh)
        .await
        .assert_problem(401, "invalid_refresh_token");
    app.get_authed("/v1/me", &new_access)
        .await
        .assert_problem(401, "unauthorized");
    app.get_authed("/v1/me", &token(&first, "access_token"))
        .await
        .assert_problem(401, "unauthorized");
}

/// A thief who refreshes a stolen token twice must not make the owner's copy an unknown token:
/// the owner presenting it still revokes the sign-in, the thief's tokens with it.
#[tokio::test]
async fn a_token_replayed_after_two_later_rotations_still_revokes_the_family() {
    let app = spawn_with(Spawn::default().var("REFRESH_REUSE_GRACE_SECS", 0)).await;
    let owners = app.sign_in(PHONE).await;
    let stolen = token(&owners, "refresh_token");
    let second = refresh(&app, &stolen).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.body);
    let third = refresh(&app, &token(&second.body, "refresh_token")).await;
    assert_eq!(third.status, StatusCode::OK, "{}", third.body);
    let thiefs_access = token(&third.body, "access_token");
    assert_eq!(
        app.get_authed("/v1/me", &thiefs_access).await.status,
        StatusCode::OK
    );

    // The owner's app, its access token gone, refreshes with the token it holds.
    refresh(&app, &stolen)
        .await
        .assert_problem(401, "invalid_refresh_token");
    app.get_authed("/v1/me", &thiefs_access)
        .await
        .assert_problem(401, "unauthorized");
    refresh(&app, &token(&third.body, "refresh_token"))
        .await
        .assert_problem(401, "invalid_refresh_token");
}

#[tokio::test]
async fn unknown_and_access_tokens_are_not_refresh_tokens() {
    let app = spawn_app().await;
    let session = app.sign_in(PHONE).await;
    refresh(&app, &token(&session, "access_token"))
        .await
        .assert_problem(401, "invalid_refresh_token");
    refresh(&app, "AAAAAAAAAAAAAAAAAAAAAAAAAA")
        .await
        .assert_problem(401, "invalid_refresh_token");
    refresh(&app, "not-a-token")
        .await
        .assert_problem(401, "invalid_refresh_token");
    // The real one still works.
    assert_eq!(
        refresh(&app, &token(&session, "refresh_token"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn concurrent_refreshes_of_one_token_never_yield_two_live_sessions() {
    // Without the reuse grace only one concurrent rotation can win (with it, the others get
    // pairs of the same session: see sessions.rs).
    let app = spawn_with(Spawn::default().var("REFRESH_REUSE_GRACE_SECS", 0)).await;
    let session = app.sign_in(PHONE).await;
    let refresh_token = token(&session, "refresh_token");
    let replies =
        futures_util::future::join_all((0..5).map(|_| refresh(&app, &refresh_token))).await;
    assert!(
        count(&replies, StatusCode::OK) <= 1,
        "at most one rotation wins"
    );
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::OK || r.status == StatusCode::UNAUTHORIZED)
    );
}

#[tokio::test]
async fn logout_revokes_this_session_only() {
    let app = spawn_app().await;
    let one = app.sign_in(PHONE).await;
    let two = app.sign_in_again(PHONE).await;
    let reply = logout(&app, &token(&one, "access_token"), None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    app.get_authed("/v1/me", &token(&one, "access_token"))
        .await
        .assert_problem(401, "unauthorized");
    refresh(&app, &token(&one, "refresh_token"))
        .await
        .assert_problem(401, "invalid_refresh_token");
    assert_eq!(
        app.get_authed("/v1/me", &token(&two, "access_token"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn logout_all_revokes_every_session() {
    let app = spawn_app().await;
    let one = app.sign_in(PHONE).await;
    let two = app.sign_in_again(PHONE).await;
    let reply = logout(
        &app,
        &token(&two, "access_token"),
        Some(json!({ "all": true })),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    for session in [&one, &two] {
        app.get_authed("/v1/me", &token(session, "access_token"))
            .await
            .assert_problem(401, "unauthorized");
        refresh(&app, &token(session, "refresh_token"))
            .await
            .assert_problem(401, "invalid_refresh_token");
    }
}

#[tokio::test]
async fn logout_refuses_a_malformed_body() {
    let app = spawn_app().await;
    let session = app.sign_in(PHONE).await;
    let access = token(&session, "access_token");
    let reply = app
        .send(
            app.client
                .post(app.url("/v1/logout"))
                .bearer_auth(&access)
                .header("content-type", "application/json")
                .body("{"),
        )
        .await;
    reply.assert_problem(400, "invalid_request");
    let reply = logout(&app, &access, Some(json!({ "all": "yes" }))).await;
    reply.assert_problem(400, "invalid_request");
    assert_eq!(
        app.get_authed("/v1/me", &access).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn expired_access_tokens_are_refused() {
    let app = crate::helpers::spawn_with(
        crate::helpers::Spawn::default().var("ACCESS_TOKEN_TTL_SECS", 1),
    )
    .await;
    let session = app.sign_in(PHONE).await;
    let access = token(&session, "access_token");
    let db = app.db().await;
    // Age the token instead of waiting for it.
    sqlx::query(
        "UPDATE tokens SET expiry = now() - interval '1 second' WHERE scope = 'authentication'",
    )
    .execute(&db)
    .await
    .unwrap();
    app.get_authed("/v1/me", &access)
        .await
        .assert_problem(401, "unauthorized");
}
