//! Redis going away or stalling under a worker: it says so on `/readyz`, sends nothing it
//! cannot check for duplicates, starts no provider call on a claim Redis can no longer renew,
//! and carries on when Redis is back. Each test puts a TCP proxy of its own between the worker
//! and Redis, and cuts it (or holds its replies).

use std::time::Duration;

use shared::{OtpRequested, QueueType};
use tests::fake_sms::{Faults, InjectedResponse};
use tests::proxy::TcpProxy;
use tests::servers::servers;
use tests::wait::eventually;

use crate::harness::{CODE_VALIDITY, Harness, RunningWorker, WAIT, event, phone, with_harness};

#[tokio::test]
async fn without_redis_nothing_is_sent_blindly() {
    with_harness(QueueType::Classic, |h| async move {
        let worker = h
            .spawn_worker(&[
                // Nothing listens there.
                ("REDIS_URL", "redis://127.0.0.1:1"),
                ("RETRY_MAX_ELAPSED_SECS", "2"),
            ])
            .await;
        worker.wait_unready_for(&h.http, "redis").await;

        h.request_sms(&phone()).await;
        let dead = h.wait_for_dead_letters(1).await;
        assert_eq!(
            dead[0].header_str("x-error-kind").as_deref(),
            Some("retries_exhausted")
        );
        assert!(dead[0].header_str("x-error").unwrap().contains("Redis"));
        assert!(
            h.fake.requests(None).is_empty(),
            "no SMS without the duplicate check"
        );

        worker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn keeps_running_through_a_redis_outage() {
    with_harness(QueueType::Classic, |h| async move {
        let (redis, redis_url) = TcpProxy::in_front_of(&servers().redis).await;
        let worker = h
            .start_worker(&[("REDIS_URL", &redis_url), ("SMS_RETRY_MAX_DELAY_MS", "500")])
            .await;

        redis.go_down();
        worker.wait_unready_for(&h.http, "redis").await;
        let to = phone();
        h.request_sms(&to).await;
        // An observation window, not synchronisation: nothing may be sent while the duplicate
        // check cannot run.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            h.fake.requests(None).is_empty(),
            "sent without the duplicate check"
        );

        redis.come_back();
        h.wait_for_messages(&to, 1).await;
        worker.wait_ready(&h.http).await;
        worker.stop().await;
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);
        assert_eq!(h.queued().await, 0);
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

/// A worker reaching Redis through a proxy, retrying `event` (published `copies` times) against a
/// provider that asks for a retry every time: it calls about every 100 ms, and the harness's
/// claim lease is 1 s. Returns once it has called three times.
async fn retrying_through_a_redis_proxy(
    h: &Harness,
    event: &OtpRequested,
    copies: usize,
    overrides: &[(&str, &str)],
) -> (TcpProxy, RunningWorker) {
    let (redis, redis_url) = TcpProxy::in_front_of(&servers().redis).await;
    h.fake.set_faults(Faults {
        always: Some(InjectedResponse::status(503)),
        ..Faults::default()
    });
    let mut vars = vec![
        ("REDIS_URL", redis_url.as_str()),
        ("SMS_RETRY_MAX_DELAY_MS", "100"),
        ("PROVIDER_BREAKER_FAILURES", "10000"),
    ];
    vars.extend_from_slice(overrides);
    let worker = h.start_worker(&vars).await;
    for _ in 0..copies {
        h.publish(event).await;
    }
    let to = event.phone_number.as_str();
    eventually(WAIT, "the worker to be retrying", || async {
        h.fake.requests(Some(to)).len() >= 3
    })
    .await;
    (redis, worker)
}

/// Redis going away while a worker retries a send: once its claim has gone unrenewed for a
/// while, the claim may lapse in Redis and another copy of the event take it, so the worker
/// calls the provider no more. The event waits for Redis, is claimed again with the duplicate
/// check, and is sent once Redis is back.
#[tokio::test]
async fn a_claim_that_cannot_be_renewed_stops_the_calls_to_the_provider() {
    with_harness(QueueType::Classic, |h| async move {
        calls_stop_while_redis_is_away(&h, TcpProxy::go_down, TcpProxy::come_back).await;
    })
    .await;
}

/// The same with a Redis that stalls rather than goes down: its commands still run, the claim's
/// renewals included, but no answer comes back, and each command times out.
#[tokio::test]
async fn a_stalled_redis_stops_the_calls_to_the_provider_too() {
    with_harness(QueueType::Classic, |h| async move {
        calls_stop_while_redis_is_away(&h, TcpProxy::hold_replies, TcpProxy::release_replies).await;
    })
    .await;
}

/// A worker retrying a send loses Redis (`go_away`): it must call the provider no more until
/// Redis is back (`come_back`), then send the event once.
async fn calls_stop_while_redis_is_away(
    h: &Harness,
    go_away: fn(&TcpProxy),
    come_back: fn(&TcpProxy),
) {
    let to = phone();
    let (redis, worker) =
        retrying_through_a_redis_proxy(h, &event(&to, CODE_VALIDITY), 1, &[]).await;

    go_away(&redis);
    // Within two thirds of a lease (plus a Redis command's timeout, for a stall) the worker
    // stops calling.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_no_call_over(
        h,
        &to,
        Duration::from_millis(1_500),
        "called the provider without a claim it could be sure of",
    )
    .await;

    h.fake.set_faults(Faults::default());
    come_back(&redis);
    h.wait_for_messages(&to, 1).await;
    worker.stop().await;
    assert_eq!(h.fake.messages(Some(&to)).len(), 1);
    assert_eq!(h.queued().await, 0);
    assert_eq!(h.dead_lettered().await, 0);
}

/// A claim in doubt keeps its delivery: the event waits in the worker for Redis, within its
/// retry budget, rather than going back to the queue, where each return would count toward a
/// quorum queue's delivery limit and start its budget and its count of attempts again.
#[tokio::test]
async fn a_claim_in_doubt_keeps_its_delivery_and_its_count_of_attempts() {
    with_harness(QueueType::Quorum, |h| async move {
        let to = phone();
        let (redis, worker) = retrying_through_a_redis_proxy(
            &h,
            &event(&to, CODE_VALIDITY),
            1,
            &[("RETRY_MAX_ELAPSED_SECS", "5")],
        )
        .await;

        // The claim falls in doubt once two thirds of the 1 s lease go unrenewed: the calls stop
        // (an observation window, as in the test above). The provider keeps asking for retries
        // until the budget runs out.
        redis.go_down();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_no_call_over(
            &h,
            &to,
            Duration::from_secs(1),
            "the claim never fell in doubt",
        )
        .await;
        redis.come_back();
        let letters = h.wait_for_dead_letters(1).await;
        worker.stop().await;

        let calls = h.fake.requests(Some(&to)).len();
        assert_eq!(
            letters[0].header_int("x-attempts"),
            i64::try_from(calls).ok(),
            "the dead letter does not count the calls made before the claim fell in doubt"
        );
        assert_eq!(letters.len(), 1);
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

/// What the lease check is for: two copies of one event (a publish retried after a lost
/// confirm), one on a worker that loses Redis while it retries the provider. Its claim lapses
/// and the other worker takes the event over; the first must not send it too.
#[tokio::test]
async fn a_worker_cut_off_from_redis_leaves_the_event_to_the_copy_that_takes_its_claim_over() {
    with_harness(QueueType::Classic, |h| async move {
        let to = phone();
        // One delivery at a time: the second copy waits in the queue for the other worker.
        let (redis, cut_off) = retrying_through_a_redis_proxy(
            &h,
            &event(&to, CODE_VALIDITY),
            2,
            &[("WORKER_CONCURRENCY", "1")],
        )
        .await;

        redis.go_down();
        // A scenario: the claim lapses in Redis a lease (1 s) after its last renewal; the
        // provider starts accepting only after that.
        tokio::time::sleep(Duration::from_secs(2)).await;
        h.fake.set_faults(Faults::default());
        let other = h
            .start_worker(&[("PROVIDER_BREAKER_FAILURES", "10000")])
            .await;
        h.wait_for_messages(&to, 1).await;
        // An observation window: a first worker still calling (every half second or so, with
        // its Redis calls failing) would send the event again.
        tokio::time::sleep(Duration::from_secs(2)).await;

        // Redis back, the copy the first worker holds finds the event sent; stopped first, it
        // would hand the copy back, and the other worker find it sent.
        redis.come_back();
        cut_off.stop().await;
        eventually(WAIT, "both copies to be taken", || async {
            h.queued().await == 0
        })
        .await;
        assert_eq!(h.fake.messages(Some(&to)).len(), 1, "two SMS for one event");
        assert_eq!(h.dead_lettered().await, 0);
        other.stop().await;
    })
    .await;
}

/// An observation window, not synchronisation: a worker still retrying (a call every 100 ms or
/// so) would call `to` within `window`.
async fn assert_no_call_over(h: &Harness, to: &str, window: Duration, failure: &str) {
    let calls = h.fake.requests(Some(to)).len();
    tokio::time::sleep(window).await;
    assert_eq!(h.fake.requests(Some(to)).len(), calls, "{failure}");
}
