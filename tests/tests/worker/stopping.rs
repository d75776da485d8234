//! The end of a stop's grace period: a send without an answer from a provider goes back to the
//! queue, one whose request a provider has may have sent its SMS and ends as sent-unconfirmed,
//! and one past the provider's answer is recorded and acknowledged.

use shared::{OtpRequested, QueueType};
use tests::fake_sms::{Faults, InjectedResponse, SmsProvider, TokenPolicy};
use tests::proxy::TcpProxy;
use tests::servers::servers;
use tests::wait::eventually;

use crate::harness::{
    CODE_VALIDITY, Harness, RunningWorker, WAIT, event, pairs, phone, with_harness,
};

/// An SMS a provider accepts just before the stop's grace period ends, whose record a stalled
/// Redis holds past that end, is still acknowledged: cut off with the sends still under way, its
/// message went back to the queue, for a copy to send it again once the claim lapsed.
#[tokio::test]
async fn an_sms_accepted_as_the_grace_period_ends_is_acknowledged() {
    with_harness(QueueType::Classic, |h| async move {
        // The provider accepts about 1.5 s into the 2 s grace, and the record's try waits 2 s
        // for its answer, past the end.
        let (redis, to, logs) = stop_with_redis_stalled_mid_call(&h, 1_500, &[]).await;
        assert!(
            logs.contains("SMS sent"),
            "no answer before the stop:\n{logs}"
        );
        assert!(
            logs.contains("grace period over"),
            "done before the grace ended:\n{logs}"
        );
        assert!(!logs.contains("provider call unanswered"), "{logs}");
        assert_eq!(h.queued().await, 0, "the SMS accepted was not acknowledged");
        assert_eq!(h.fake.messages(Some(&to)).len(), 1);
        assert_eq!(h.dead_lettered().await, 0);
        redis.release_replies();
    })
    .await;
}

/// Has fake-sms answer after `latency_ms`, and a worker process with a 2 s grace period (and
/// `overrides`), its Redis behind a proxy, take an event for a new number. Once the provider
/// has the call, Redis stalls (no answer comes back) and the worker is told to stop. Returns
/// once it has exited, with the proxy (to release), the number and the worker's log.
async fn stop_with_redis_stalled_mid_call(
    h: &Harness,
    latency_ms: u64,
    overrides: &[(&str, &str)],
) -> (TcpProxy, String, String) {
    h.fake.set_faults(Faults::latency(latency_ms));
    let (redis, redis_url) = TcpProxy::in_front_of(&servers().redis).await;
    let mut settings = vec![
        ("REDIS_URL", redis_url.as_str()),
        ("SHUTDOWN_GRACE_SECS", "2"),
        ("LOG_FORMAT", "json"),
    ];
    settings.extend_from_slice(overrides);
    let mut worker = h.start_worker_process(&settings).await;
    let to = phone();
    h.publish(&event(&to, CODE_VALIDITY)).await;
    h.wait_for_a_call(&to).await;
    redis.hold_replies();
    worker.terminate();
    assert!(worker.wait(WAIT).await.success(), "{}", worker.logs());
    (redis, to, worker.logs())
}

/// A provider call still under way when the grace period ends may have sent the SMS: the event
/// ends as sent-unconfirmed, recorded and acknowledged, as after any call without an answer,
/// rather than going back to the queue for a copy to send once the claim lapses.
#[tokio::test]
async fn a_call_under_way_as_the_grace_period_ends_ends_as_sent_unconfirmed() {
    with_harness(QueueType::Classic, |h| async move {
        // No answer within the grace and the 2 s a call under way gets after it.
        h.fake.set_faults(Faults::latency(8_000));
        let mut worker = h
            .start_worker_process(&[("SHUTDOWN_GRACE_SECS", "1"), ("LOG_FORMAT", "json")])
            .await;
        let to = phone();
        let event = event(&to, CODE_VALIDITY);
        h.publish(&event).await;
        h.wait_for_a_call(&to).await;
        worker.terminate();
        assert!(worker.wait(WAIT).await.success(), "{}", worker.logs());
        // Counted in `sms_ambiguous_total` as the stop's doing, not the provider's.
        let logs = worker.logs();
        assert!(logs.contains(r#""cause":"cut_at_stop""#), "{logs}");
        assert_eq!(h.queued().await, 0, "the event went back to the queue");
        assert_eq!(
            h.ledger_record(&event).await.as_deref(),
            Some(shared::send_ledger::SENT)
        );
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);
        assert_eq!(h.dead_lettered().await, 0);
        // The number's timeline names the provider that may have sent it.
        let trace = h.trace(&to, &[]).await;
        assert!(trace.contains("tried twilio: ambiguous"), "{trace}");
        assert!(trace.contains("ended: sent_unconfirmed"), "{trace}");
    })
    .await;
}

/// A call under way when the grace period ends, whose answer comes a second later: its event
/// ends as that answer says (sent), not as sent-unconfirmed.
#[tokio::test]
async fn a_call_answered_just_after_the_grace_period_ends_as_sent() {
    with_harness(QueueType::Classic, |h| async move {
        // The answer comes 2.5 s after the call; the grace ends about 1 s after it, and the
        // 2 s a call under way then gets end about 3 s after it.
        h.fake.set_faults(Faults::latency(2_500));
        let mut worker = h
            .start_worker_process(&[("SHUTDOWN_GRACE_SECS", "1"), ("LOG_FORMAT", "json")])
            .await;
        let to = phone();
        let event = event(&to, CODE_VALIDITY);
        h.publish(&event).await;
        h.wait_for_a_call(&to).await;
        worker.terminate();
        assert!(worker.wait(WAIT).await.success(), "{}", worker.logs());
        let logs = worker.logs();
        let grace_over = logs.find("grace period over");
        let sent = logs.find("SMS sent");
        assert!(
            grace_over.zip(sent).is_some_and(|(over, sent)| over < sent),
            "not answered after the grace ended:\n{logs}"
        );
        assert!(!logs.contains("provider call unanswered"), "{logs}");
        assert_eq!(h.queued().await, 0);
        assert_eq!(
            h.ledger_record(&event).await.as_deref(),
            Some(shared::send_ledger::SENT)
        );
    })
    .await;
}

/// A call under way when the grace period ends, refused in the 2 s it then has (Twilio's
/// credentials): the event could go to Infobip at once, but no call starts once the grace is
/// over, so it goes back to the queue, claim released, for another worker to send.
#[tokio::test]
async fn no_call_starts_after_the_grace_period_even_to_fail_over() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            latency_ms: 1_500,
            always: Some(InjectedResponse::twilio_error(401, 20003)),
            ..Faults::default()
        });
        let mut overrides = h.failover();
        overrides.push(("SHUTDOWN_GRACE_SECS".to_owned(), "1".to_owned()));
        let worker = h.start_worker(&pairs(&overrides)).await;
        let to = phone();
        let event = event(&to, CODE_VALIDITY);
        h.publish(&event).await;
        h.wait_for_a_call(&to).await;
        worker.stop().await;
        eventually(WAIT, "the event to be back in the queue", || async {
            h.queued().await == 1
        })
        .await;
        assert_eq!(
            h.fake.requests(Some(&to)).len(),
            1,
            "a call started after the grace period"
        );
        assert_eq!(
            h.ledger_record(&event).await,
            None,
            "the claim was not released"
        );
    })
    .await;
}

/// A call that got no answer (it timed out) just before the grace period ended, its event still
/// waiting on Redis to count the failure toward the provider's breaker when it ends: the SMS may
/// have gone, so the event is not handed back either.
#[tokio::test]
async fn a_call_that_timed_out_as_the_grace_period_ends_is_not_handed_back() {
    with_harness(QueueType::Classic, |h| async move {
        // The call times out 2 s after it started; the breaker's write then waits 2 s for a
        // Redis that does not answer, and the grace ends about 3 s after the stop, meanwhile.
        let settings = [("SEND_TIMEOUT_SECS", "2"), ("SHUTDOWN_GRACE_SECS", "3")];
        let (redis, to, logs) = stop_with_redis_stalled_mid_call(&h, 6_000, &settings).await;
        assert!(
            logs.contains("no provider confirmed the SMS, but it may have been sent"),
            "{logs}"
        );
        // The call had ended, unanswered, before the stop's grace did: the provider's doing.
        assert!(logs.contains(r#""cause":"unanswered""#), "{logs}");
        assert_eq!(h.queued().await, 0, "the event went back to the queue");
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);
        assert_eq!(h.dead_lettered().await, 0);
        redis.release_replies();
    })
    .await;
}

/// A send still waiting for Infobip's access token when the grace period ends has sent nothing:
/// it releases its claim and goes back to the queue, for another worker to send at once, rather
/// than end as sent-unconfirmed and leave its user without a code.
#[tokio::test]
async fn a_send_still_fetching_its_token_as_the_grace_period_ends_goes_back_to_the_queue() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_token_policy(TokenPolicy {
            latency_ms: 4_000,
            ..TokenPolicy::default()
        });
        let worker = infobip_worker(&h).await;
        let to = phone();
        let event = event(&to, CODE_VALIDITY);
        h.publish(&event).await;
        stop_during_a_token_fetch(&h, worker, &event).await;
        assert!(h.fake.requests(Some(&to)).is_empty());
    })
    .await;
}

/// Infobip refuses the worker's token (401) and a new one is slow to come when the grace period
/// ends: the refused request sent nothing, so the event goes back to the queue too.
#[tokio::test]
async fn a_send_refetching_a_refused_token_as_the_grace_period_ends_goes_back_to_the_queue() {
    with_harness(QueueType::Classic, |h| async move {
        let worker = infobip_worker_with_a_stale_token(&h).await;
        h.fake.set_token_policy(TokenPolicy {
            latency_ms: 4_000,
            ..TokenPolicy::default()
        });
        let to = phone();
        let event = event(&to, CODE_VALIDITY);
        h.publish(&event).await;
        stop_during_a_token_fetch(&h, worker, &event).await;
        assert_eq!(h.fake.requests(Some(&to)).len(), 1, "one refused request");
        assert!(h.fake.messages(Some(&to)).is_empty());
    })
    .await;
}

/// Infobip refuses the worker's token (401) in the 2 s a call under way gets after the grace
/// period: Infobip's client would fetch a new token and post again, but no request starts once
/// the grace is over, so the event goes back to the queue.
#[tokio::test]
async fn a_token_refused_after_the_grace_period_is_not_tried_again() {
    with_harness(QueueType::Classic, |h| async move {
        let worker = infobip_worker_with_a_stale_token(&h).await;
        // The 401 comes 2 s after the call: about a second after the 1 s grace ends, and a
        // second before the 2 s a call under way then gets are over.
        h.fake
            .set_faults_for(SmsProvider::Infobip, Faults::latency(2_000));
        let to = phone();
        let event = event(&to, CODE_VALIDITY);
        h.publish(&event).await;
        h.wait_for_a_call(&to).await;
        worker.stop().await;
        expect_it_back_in_the_queue(&h, &event).await;
        assert_eq!(
            h.fake.requests(Some(&to)).len(),
            1,
            "a request posted again after the grace period"
        );
    })
    .await;
}

/// A worker sending through Infobip alone, with OAuth, with a 1 s grace period.
async fn infobip_worker(h: &Harness) -> RunningWorker {
    let mut overrides = h.failover();
    overrides.push(("SMS_PROVIDERS".to_owned(), "infobip".to_owned()));
    overrides.push(("SHUTDOWN_GRACE_SECS".to_owned(), "1".to_owned()));
    h.start_worker(&pairs(&overrides)).await
}

/// [`infobip_worker`], holding a token (a first SMS got it) that Infobip has since forgotten:
/// its next request is refused (401).
async fn infobip_worker_with_a_stale_token(h: &Harness) -> RunningWorker {
    let worker = infobip_worker(h).await;
    let first = phone();
    h.publish(&event(&first, CODE_VALIDITY)).await;
    h.wait_for_messages(&first, 1).await;
    h.fake.expire_tokens();
    worker
}

/// Stops `worker` once a token fetch is under way, and checks that `event` went back to the
/// queue, neither sent nor claimed.
async fn stop_during_a_token_fetch(h: &Harness, worker: RunningWorker, event: &OtpRequested) {
    eventually(WAIT, "a token fetch to be under way", || async {
        h.fake.token_calls_in_flight() > 0
    })
    .await;
    worker.stop().await;
    expect_it_back_in_the_queue(h, event).await;
}

/// Waits for `event` to be back in the queue, and checks that it is neither recorded nor
/// claimed.
async fn expect_it_back_in_the_queue(h: &Harness, event: &OtpRequested) {
    eventually(WAIT, "the event to be back in the queue", || async {
        h.queued().await == 1
    })
    .await;
    assert_eq!(
        h.ledger_record(event).await,
        None,
        "the claim was not released, or the event recorded"
    );
}
