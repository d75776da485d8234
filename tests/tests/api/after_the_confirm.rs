//! What follows the broker's confirm. The confirm decides a request: from then on its SMS goes,
//! whatever the api answers, so the request is accepted; making its code current is a Redis step
//! after that point, which Redis can fail (`api::signin::promotion`). Each test holds the
//! broker's answer back through a proxy until it has done something to Redis.

use std::time::Duration;

use reqwest::StatusCode;
use shared::OtpRequested;
use tests::proxy::TcpProxy;
use tests::servers::servers;

use crate::helpers::{
    PHONE, Reply, Spawn, TestApp, captured_logs, metric_value, signs_in_a_new_user_within_15_s,
    spawn_with,
};

/// The api, reaching the broker (and Redis, given `redis`) through proxies, with its queue
/// reader connected: a reader that connected only once a confirm is held would have to connect,
/// consume and get the event before the api's 2 s confirm timeout.
async fn app_through(broker: &TcpProxy, redis: Option<&TcpProxy>, spawn: Spawn) -> TestApp {
    let mut spawn = spawn.var("AMQP_URL", servers().rabbitmq.url_via(broker.addr()));
    if let Some(redis) = redis {
        spawn = spawn.var("REDIS_URL", servers().redis.url_via(redis.addr()));
    }
    let app = spawn_with(spawn).await;
    assert_eq!(
        app.request_otp("+14155550101").await.status,
        StatusCode::ACCEPTED
    );
    app.next_delivery("+14155550101").await;
    app
}

/// Requests a code for [`PHONE`] whose confirm reaches the api only once `meanwhile` has run:
/// the broker stores the event, `meanwhile` gets it, and then the broker's answer goes through.
async fn request_confirmed_after<T>(
    app: &TestApp,
    broker: &TcpProxy,
    meanwhile: impl AsyncFnOnce(OtpRequested) -> T,
) -> (Reply, T) {
    broker.hold_replies();
    let then_confirm = async {
        let (event, _) = app.next_delivery(PHONE).await;
        let done = meanwhile(event).await;
        broker.release_replies();
        done
    };
    tokio::join!(app.request_otp(PHONE), then_confirm)
}

/// Redis going away just after the confirm (a failover) must not turn the request into a 503,
/// which would leave the user an SMS whose code never becomes valid and their number held to its
/// resend gap. The request is accepted while Redis is still away, and its code works once Redis
/// is back.
#[tokio::test]
async fn redis_lost_just_after_the_confirm_still_accepts_and_the_code_works_once_it_is_back() {
    let (broker, redis) = (proxy_to_broker().await, proxy_to_redis().await);
    let app = app_through(&broker, Some(&redis), Spawn::default()).await;

    let (reply, event) = request_confirmed_after(&app, &broker, async |event| {
        redis.go_down();
        event
    })
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    let code = event.otp.clone().expect("the event carries the code");
    assert!(
        logged_for(&event, "did not make its code current in time"),
        "the promotion is left to the background, with a warning"
    );
    app.verify(PHONE, &code)
        .await
        .assert_problem(503, "unavailable");

    redis.come_back();
    signs_in_a_new_user_within_15_s(
        &app,
        &code,
        "the confirmed code to become current once Redis is back",
    )
    .await;
}

/// An api stopping while a confirmed code waits for Redis gives it a few seconds: Redis back
/// within them, the code is current before the process ends (the runtime would drop the retry).
#[tokio::test]
async fn a_stopping_api_waits_briefly_for_codes_redis_has_yet_to_make_current() {
    let (broker, redis) = (proxy_to_broker().await, proxy_to_redis().await);
    let mut app = app_through(&broker, Some(&redis), Spawn::default()).await;
    let (reply, event) = request_confirmed_after(&app, &broker, async |event| {
        redis.go_down();
        event
    })
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);

    // Redis comes back half a second into the shutdown: a scenario, not a wait.
    let redis_back_soon = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis.come_back();
    };
    tokio::join!(app.stop(), redis_back_soon);
    let current = shared::otp_keys::current_code(&app.namespace, &event.phone_number);
    assert_eq!(
        event_of_code(&app, &current).await,
        Some(event.event_id.to_string()),
        "current before the api ended"
    );
}

/// A pending code that is gone when its confirm comes (a Redis failover that lost the master's
/// last writes, a restart) cannot be made current. The request is still accepted, since its SMS
/// goes, but the code will not work: counted and logged as lost, never passed off as replaced by
/// a newer code. The counters of such rare failures are there at 0 before the first one.
#[tokio::test]
async fn a_pending_code_lost_before_its_confirm_is_counted_as_never_valid() {
    let broker = proxy_to_broker().await;
    let app = app_through(&broker, None, Spawn::default()).await;
    let metrics = app.metrics().await;
    for reason in ["lost", "expired", "abandoned"] {
        let series = format!(r#"otp_codes_never_valid_total{{reason="{reason}"}} "#);
        assert!(metrics.contains(&series), "{series}is exported before any");
    }
    assert!(metrics.contains("\notp_promotions_deferred_total "));
    assert!(metrics.contains("\notp_promotions_at_sign_in_total "));
    let lost = async || {
        metric_value(
            &app.metrics().await,
            r#"otp_codes_never_valid_total{reason="lost"}"#,
        )
    };
    let lost_before = lost().await;

    let (reply, event) = request_confirmed_after(&app, &broker, async |event| {
        let mut redis = app.redis().await;
        let pending = shared::otp_keys::pending_code(&app.namespace, &event.phone_number);
        let deleted: i64 = redis::cmd("DEL")
            .arg(&pending)
            .query_async(&mut redis)
            .await
            .expect("DEL");
        assert_eq!(deleted, 1, "the code was pending until the confirm");
        event
    })
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    let lost_after = lost().await;
    assert!(
        lost_after > lost_before,
        "counted as lost: {lost_before} -> {lost_after}"
    );
    assert!(
        logged_for(&event, "its pending code is gone"),
        "logged as lost"
    );
    app.verify(PHONE, event.otp.as_deref().expect("a code"))
        .await
        .assert_problem(401, "invalid_otp");
}

/// A code whose confirm comes after a newer request's code for the same phone was made current
/// (here by a second api replica, while the first one's confirm was held) was replaced, not
/// lost: the newer code is the one that counts, and no alert may say a user got a dead code.
#[tokio::test]
async fn a_code_confirmed_after_a_newer_one_became_current_is_replaced_not_lost() {
    let broker = proxy_to_broker().await;
    let no_gap = Spawn::default().var("OTP_RESEND_SECS", 0);
    let first = app_through(&broker, None, no_gap).await;
    let second = spawn_with(
        Spawn::default()
            .var("NAMESPACE", &first.namespace)
            .var("OTP_RESEND_SECS", 0),
    )
    .await;

    let (reply, (older, newer)) = request_confirmed_after(&first, &broker, async |older| {
        assert_eq!(second.request_otp(PHONE).await.status, StatusCode::ACCEPTED);
        let (newer, _) = first.next_delivery(PHONE).await;
        (older, newer)
    })
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    assert!(logged_for(&older, "a newer code replaced this one"));
    assert!(
        !logged_for(&older, "its pending code is gone"),
        "a replaced code is not lost"
    );
    first
        .verify(PHONE, older.otp.as_deref().expect("a code"))
        .await
        .assert_problem(401, "invalid_otp");
    let reply = first
        .verify(PHONE, newer.otp.as_deref().expect("a code"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
}

/// A sign-in made current a pending code while its confirm was still held, which only a sent
/// SMS allows: a code whose SMS has not gone (no record in the send ledger yet, a worker's claim,
/// or dead-lettered) is left pending and does not work; once sent, it works once, though not for
/// a guess bound to another code. When the confirm then reaches the api, its promotion finds the
/// code used, not lost.
#[tokio::test]
async fn a_pending_code_works_at_sign_in_only_once_its_sms_went_and_is_then_not_counted_as_lost() {
    let broker = proxy_to_broker().await;
    let app = app_through(&broker, None, Spawn::default()).await;
    let other = spawn_with(Spawn::default().var("NAMESPACE", &app.namespace)).await;

    let (reply, event) = request_confirmed_after(&app, &broker, async |event| {
        let code = event.otp.clone().expect("a code");
        let pending = shared::otp_keys::pending_code(&app.namespace, &event.phone_number);
        other
            .verify(PHONE, &code)
            .await
            .assert_problem(401, "invalid_otp");
        // A claim (its worker may still give it up) and a dead letter: no SMS went.
        for record in ["sending:0af3", shared::send_ledger::DEAD] {
            record_in_the_send_ledger(&app, &event, record).await;
            other
                .verify(PHONE, &code)
                .await
                .assert_problem(401, "invalid_otp");
        }
        assert_eq!(
            event_of_code(&app, &pending).await,
            Some(event.event_id.to_string()),
            "left pending while its SMS has not gone"
        );

        record_in_the_send_ledger(&app, &event, shared::send_ledger::SENT).await;
        // A made-up challenge_id cannot be the pending code's: the sign-in does not look into
        // the ledger for it (which would have made the code current) and checks nothing.
        other
            .verify_bound(PHONE, &code, "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
            .await
            .assert_problem(401, "invalid_otp");
        assert_eq!(
            event_of_code(&app, &pending).await,
            Some(event.event_id.to_string()),
            "a guess bound to another code made the pending code current"
        );
        let reply = other.verify(PHONE, &code).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        other
            .verify(PHONE, &code)
            .await
            .assert_problem(401, "invalid_otp");
        event
    })
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    assert!(
        !logged_for(&event, "its pending code is gone"),
        "a code used before its promotion answered is not lost"
    );
}

/// What the worker writes in its send ledger for `event` (`shared::send_ledger`): these tests
/// take the events off the queue themselves, in the worker's place.
async fn record_in_the_send_ledger(app: &TestApp, event: &OtpRequested, record: &str) {
    let mut redis = app.redis().await;
    let key = shared::send_ledger::key(&app.namespace, event.event_id);
    let () = redis::cmd("SET")
        .arg(key)
        .arg(record)
        .arg("EX")
        .arg(600)
        .query_async(&mut redis)
        .await
        .expect("SET");
}

/// The event of the code hash at `key` (`shared::otp_keys`), if there is one.
async fn event_of_code(app: &TestApp, key: &str) -> Option<String> {
    let mut redis = app.redis().await;
    redis::cmd("HGET")
        .arg(key)
        .arg(shared::otp_keys::EVENT_FIELD)
        .query_async(&mut redis)
        .await
        .expect("HGET")
}

async fn proxy_to_broker() -> TcpProxy {
    TcpProxy::in_front_of(&servers().rabbitmq).await.0
}

async fn proxy_to_redis() -> TcpProxy {
    TcpProxy::in_front_of(&servers().redis).await.0
}

/// Whether the api logged `what` for `event`. By event id: the counters are shared by every
/// test's api in this process, the event ids are not.
fn logged_for(event: &OtpRequested, what: &str) -> bool {
    let id = event.event_id.to_string();
    captured_logs()
        .lines()
        .any(|line| line.contains(what) && line.contains(&id))
}
