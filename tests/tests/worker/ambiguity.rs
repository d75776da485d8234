//! A provider that does not answer in time may still have sent the SMS: such a send gets one
//! more attempt at most (on the next provider where there is one) and never the retry loop, and
//! an event that ends without a clear answer is recorded as sent, not dead-lettered.

use std::time::Duration;

use shared::{OtpRequested, QueueType};
use tests::fake_sms::{Faults, InjectedResponse, Rule, SmsProvider};
use tests::proxy::TcpProxy;
use tests::servers::servers;
use tests::wait::eventually;

use crate::harness::{CODE_VALIDITY, Harness, WAIT, event, pairs, phone, with_harness};

#[tokio::test]
async fn a_slow_provider_gets_at_most_two_calls_per_event() {
    with_harness(QueueType::Classic, |h| async move {
        // The reproduction: answers take 1.5 s and the worker waits 1 s, so each call times out
        // after the provider accepted the message.
        h.fake.set_faults(Faults::latency(1_500));
        let worker = h
            .start_worker(&[("SEND_TIMEOUT_SECS", "1"), ("RETRY_MAX_ELAPSED_SECS", "60")])
            .await;
        let numbers: Vec<String> = (0..3).map(|_| phone()).collect();
        let mut events = Vec::new();
        for to in &numbers {
            events.push(h.request_sms(to).await);
        }
        // By the ledger, not `sms_ambiguous_total`: the in-process workers of the tests running
        // alongside share one metrics recorder.
        eventually(WAIT, "every event ended as sent-unconfirmed", || async {
            let mut all_sent = h.queued().await == 0;
            for event in &events {
                all_sent &=
                    h.ledger_record(event).await.as_deref() == Some(shared::send_ledger::SENT);
            }
            all_sent
        })
        .await;
        worker.stop().await;
        for to in &numbers {
            let calls = h.fake.requests(Some(to)).len();
            assert!((1..=2).contains(&calls), "{calls} calls to {to}");
        }
        assert_eq!(
            h.dead_lettered().await,
            0,
            "sent-unconfirmed is not a failure"
        );
        assert_eq!(h.queued().await, 0, "every event acknowledged");
    })
    .await;
}

#[tokio::test]
async fn an_event_its_provider_left_unanswered_is_counted_as_such_not_as_cut_at_a_stop() {
    with_harness(QueueType::Classic, |h| async move {
        // Answers far past the 1 s timeout, so that a busy machine cannot see one in time.
        h.fake.set_faults(Faults::latency(4_000));
        // A process: its metrics are its own, not shared with the tests running alongside.
        let addr = format!("127.0.0.1:{}", tests::ports::free_port());
        let mut worker = h
            .start_worker_process(&[("SEND_TIMEOUT_SECS", "1"), ("WORKER_ADDR", &addr)])
            .await;
        let event = h.request_sms(&phone()).await;
        eventually(WAIT, "the event to end as sent-unconfirmed", || async {
            h.ledger_record(&event).await.as_deref() == Some(shared::send_ledger::SENT)
        })
        .await;
        let metrics = h.metrics_at(&addr).await;
        let count = |cause: &str| {
            let series = format!("sms_ambiguous_total{{cause=\"{cause}\"}} ");
            metrics
                .lines()
                .find_map(|line| line.strip_prefix(&series))
                .map(str::to_owned)
        };
        assert_eq!(count("unanswered").as_deref(), Some("1"), "{metrics}");
        assert_eq!(count("cut_at_stop").as_deref(), Some("0"), "{metrics}");
        worker.terminate();
        worker.wait(WAIT).await;
    })
    .await;
}

#[tokio::test]
async fn after_an_ambiguous_call_the_next_provider_gets_the_one_more_attempt() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults::latency(1_500));
        let mut overrides = h.failover();
        overrides.push(("SEND_TIMEOUT_SECS".to_owned(), "1".to_owned()));
        let overrides: Vec<(&str, &str)> = overrides
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let worker = h.start_worker(&overrides).await;
        let to = phone();
        h.request_sms(&to).await;
        h.wait_for_messages(&to, 2).await;
        worker.stop().await;
        assert_eq!(h.fake.requests_via(SmsProvider::Twilio, Some(&to)).len(), 1);
        assert_eq!(
            h.fake.requests_via(SmsProvider::Infobip, Some(&to)).len(),
            1
        );
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

/// An idempotent Infobip whose breaker the unanswered call opened for a moment (shorter than a
/// backoff may last) is waited for: the repeat then goes through its probe, and the event ends
/// sent, confirmed.
#[tokio::test]
async fn an_idempotent_infobip_whose_breaker_opened_for_a_moment_is_waited_for() {
    with_harness(QueueType::Classic, |h| async move {
        let (to, overrides) = one_unanswered_send(
            &h,
            &[
                ("PROVIDER_BREAKER_FAILURES", "1"),
                ("PROVIDER_BREAKER_COOLDOWN_SECS", "2"),
            ],
            Some((1, Faults::default())),
        )
        .await;
        assert_only_infobip_called(&h, &to, 2);
        let trace = h.trace(&to, &pairs(&overrides)).await;
        assert!(trace.contains("ended: sent"), "{trace}");
        assert!(!trace.contains("sent_unconfirmed"), "confirmed: {trace}");
    })
    .await;
}

/// An idempotent Infobip that, asked again, wants a minute's wait (`Retry-After`) is not waited
/// for: the wait would hold the worker's slot, and the first call may have gone out. The event
/// ends sent-unconfirmed at once, still without Twilio.
#[tokio::test]
async fn an_idempotent_infobip_asking_for_a_long_wait_on_a_repeat_ends_the_event_at_once() {
    with_harness(QueueType::Classic, |h| async move {
        let (to, _) = one_unanswered_send(
            &h,
            &[
                ("SMS_RETRY_MAX_DELAY_MS", "200"),
                // Room for the wait within the budget: only an event that does not wait for it
                // ends within the wait for the end.
                ("RETRY_MAX_ELAPSED_SECS", "110"),
            ],
            Some((
                1,
                Faults {
                    responses: [InjectedResponse::status(429).retry_after(60)].into(),
                    ..Faults::default()
                },
            )),
        )
        .await;
        assert_only_infobip_called(&h, &to, 2);
    })
    .await;
}

/// A worker that dies while an idempotent Infobip holds its event (an unanswered call, noted in
/// the ledger) leaves it to a copy that repeats the call to Infobip too, waiting out Infobip's
/// breaker, rather than hand it to Twilio, which could send a second SMS.
#[tokio::test]
async fn a_copy_taking_over_from_a_dead_worker_keeps_the_event_with_an_idempotent_infobip() {
    with_harness(QueueType::Classic, |h| async move {
        let overrides = slow_idempotent_infobip(
            &h,
            &[
                ("PROVIDER_BREAKER_FAILURES", "1"),
                ("PROVIDER_BREAKER_COOLDOWN_SECS", "6"),
                // A breaker open for 6 s is waited out (longer than that would end the event).
                ("SMS_RETRY_MAX_DELAY_MS", "10000"),
                ("SMS_CLAIM_LEASE_MS", "1000"),
            ],
        );
        // A process, to die as a crash does.
        let mut dying = h.start_worker_process(&pairs(&overrides)).await;
        let to = phone();
        let event = h.request_sms(&to).await;
        let noted = format!(
            "{}:unanswered",
            shared::send_ledger::key(&h.ns, event.event_id)
        );
        eventually(WAIT, "the unanswered call noted in the ledger", || async {
            redis::cmd("EXISTS")
                .arg(&noted)
                .query_async::<bool>(&mut h.redis().await)
                .await
                .unwrap_or(false)
        })
        .await;
        dying.kill().await;
        h.fake
            .set_faults_for(SmsProvider::Infobip, Faults::default());

        let worker = h.start_worker(&pairs(&overrides)).await;
        assert_eq!(
            wait_for_the_end(&h, &event).await,
            shared::send_ledger::SENT
        );
        worker.stop().await;
        assert_only_infobip_called(&h, &to, 2);
        assert_eq!(h.fake.messages(Some(&to)).len(), 1, "one SMS");
    })
    .await;
}

/// Settings for `infobip,twilio` with `INFOBIP_IDEMPOTENT`, a 1 s send timeout and `extra`;
/// Infobip answers every call 3 s late until the test says otherwise.
fn slow_idempotent_infobip(h: &Harness, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    h.fake
        .set_faults_for(SmsProvider::Infobip, Faults::latency(3_000));
    let mut overrides = h.failover();
    let idempotent = [
        ("SMS_PROVIDERS", "infobip,twilio"),
        ("INFOBIP_IDEMPOTENT", "true"),
        ("SEND_TIMEOUT_SECS", "1"),
    ];
    overrides.extend(
        idempotent
            .iter()
            .chain(extra)
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
    );
    overrides
}

/// Sends one SMS with [`slow_idempotent_infobip`] and `extra`; once Infobip has had `calls`
/// calls (all answered too late), answers the next ones with `then`. Waits for the event to end,
/// as sent (after an unanswered call, never dead-lettered); its number and the settings.
async fn one_unanswered_send(
    h: &Harness,
    extra: &[(&str, &str)],
    then: Option<(usize, Faults)>,
) -> (String, Vec<(String, String)>) {
    let overrides = slow_idempotent_infobip(h, extra);
    let worker = h.start_worker(&pairs(&overrides)).await;
    let to = phone();
    let event = h.request_sms(&to).await;
    if let Some((calls, faults)) = then {
        eventually(WAIT, &format!("{calls} calls to Infobip"), || async {
            h.fake.requests_via(SmsProvider::Infobip, Some(&to)).len() == calls
        })
        .await;
        h.fake.set_faults_for(SmsProvider::Infobip, faults);
    }
    assert_eq!(wait_for_the_end(h, &event).await, shared::send_ledger::SENT);
    worker.stop().await;
    (to, overrides)
}

/// Infobip got `calls` requests for `to`, and Twilio none (it could have sent a second SMS).
fn assert_only_infobip_called(h: &Harness, to: &str, calls: usize) {
    assert_eq!(
        h.fake.requests_via(SmsProvider::Infobip, Some(to)).len(),
        calls
    );
    assert_eq!(h.fake.requests_via(SmsProvider::Twilio, Some(to)).len(), 0);
}

/// With `INFOBIP_IDEMPOTENT` (the account's idempotency enabled), an Infobip call left
/// unanswered is made again under the same message id, in the retry loop, and the event stays
/// with Infobip: here the repeat goes unanswered too, and the next is answered as a duplicate of
/// the message Infobip took (nothing sent twice). The event ends sent, confirmed, without a call
/// to Twilio, which could have sent a second SMS.
#[tokio::test]
async fn an_idempotent_infobip_is_asked_again_after_an_unanswered_call_and_keeps_the_event() {
    with_harness(QueueType::Classic, |h| async move {
        // Infobip takes the first call's message, and answers it, and the repeat, too late.
        let (to, overrides) = one_unanswered_send(
            &h,
            &[("SMS_RETRY_MAX_DELAY_MS", "200")],
            Some((2, Faults::default())),
        )
        .await;
        assert_only_infobip_called(&h, &to, 3);
        assert_eq!(h.fake.messages(Some(&to)).len(), 1, "one SMS");
        let trace = h.trace(&to, &pairs(&overrides)).await;
        assert!(trace.contains("ended: sent"), "{trace}");
        assert!(!trace.contains("sent_unconfirmed"), "confirmed: {trace}");
    })
    .await;
}

/// An idempotent Infobip that answers nothing in time gets two repeats, no more: each holds the
/// worker's slot for a whole send timeout, and should its idempotency not be on after all, each
/// would be one more paid SMS. The event then ends sent-unconfirmed, still without Twilio.
#[tokio::test]
async fn an_idempotent_infobip_that_never_answers_gets_two_repeats_then_the_event_ends() {
    with_harness(QueueType::Classic, |h| async move {
        let (to, overrides) = one_unanswered_send(
            &h,
            &[
                ("SMS_RETRY_MAX_DELAY_MS", "200"),
                ("RETRY_MAX_ELAPSED_SECS", "20"),
            ],
            None,
        )
        .await;
        assert_only_infobip_called(&h, &to, 3);
        let trace = h.trace(&to, &pairs(&overrides)).await;
        assert!(trace.contains("ended: sent_unconfirmed"), "{trace}");
    })
    .await;
}

/// An idempotent Infobip whose breaker the unanswered call opened takes no repeat: the event
/// ends sent-unconfirmed at once (its first call may have gone out), rather than hold the
/// worker's slot until the breaker or the minute-long budget ends.
#[tokio::test]
async fn an_idempotent_infobip_whose_breaker_opened_ends_the_event_at_once() {
    with_harness(QueueType::Classic, |h| async move {
        let (to, _) = one_unanswered_send(
            &h,
            &[
                ("PROVIDER_BREAKER_FAILURES", "1"),
                ("PROVIDER_BREAKER_COOLDOWN_SECS", "120"),
                // Far past the wait for the end: only an event that does not wait for the
                // breaker ends within it.
                ("RETRY_MAX_ELAPSED_SECS", "110"),
            ],
            None,
        )
        .await;
        assert_only_infobip_called(&h, &to, 1);
    })
    .await;
}

/// Waits until the ledger says how `event` ended, `sent` or `dead`, and says which.
async fn wait_for_the_end(h: &Harness, event: &OtpRequested) -> String {
    eventually(WAIT, "the event to end", || async {
        matches!(
            h.ledger_record(event).await.as_deref(),
            Some(shared::send_ledger::SENT | shared::send_ledger::DEAD)
        )
    })
    .await;
    h.ledger_record(event).await.unwrap_or_default()
}

/// One provider, whose breaker (shared by every worker, through Redis) the ambiguous call opens
/// for `cooldown_secs`: the one more attempt has to wait for it, and the wait ends before the
/// breaker lets anything through. Calls take 1.5 s and the worker waits 1 s.
fn breaker_opened_by_one_slow_call(
    h: &Harness,
    cooldown_secs: &'static str,
    retry_for_secs: &'static str,
) -> [(&'static str, &'static str); 5] {
    h.fake.set_faults(Faults::latency(1_500));
    [
        ("SEND_TIMEOUT_SECS", "1"),
        ("PROVIDER_BREAKER_FAILURES", "1"),
        ("PROVIDER_BREAKER_COOLDOWN_SECS", cooldown_secs),
        ("SMS_RETRY_MAX_DELAY_MS", "200"),
        ("RETRY_MAX_ELAPSED_SECS", retry_for_secs),
    ]
}

/// The retry budget runs out while the breaker is open: no dead letter, which an operator might
/// send on, and no second call.
#[tokio::test]
async fn an_ambiguous_call_whose_one_more_attempt_runs_out_of_time_ends_as_sent() {
    with_harness(QueueType::Classic, |h| async move {
        let worker = h
            .start_worker(&breaker_opened_by_one_slow_call(&h, "600", "2"))
            .await;
        let to = phone();
        let event = h.request_sms(&to).await;
        let ended = wait_for_the_end(&h, &event).await;
        worker.stop().await;
        assert_eq!(
            ended.as_str(),
            shared::send_ledger::SENT,
            "the SMS may have gone: recorded as sent"
        );
        assert_eq!(
            h.dead_lettered().await,
            0,
            "dead-lettered after the SMS may have gone"
        );
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);
    })
    .await;
}

/// The worker stops while it waits: the event is not handed to another worker, which would send
/// it again once the breaker lets it.
#[tokio::test]
async fn an_ambiguous_call_whose_worker_stops_before_the_one_more_attempt_ends_as_sent() {
    with_harness(QueueType::Classic, |h| async move {
        // The breaker lets a probe through a second after it opens: to the next worker.
        let stopped = h
            .start_worker(&breaker_opened_by_one_slow_call(&h, "1", "120"))
            .await;
        let to = phone();
        let event = h.request_sms(&to).await;
        h.wait_for_a_call(&to).await;
        // The stop lets the call end (ambiguous) and the breaker open; the wait ends at once.
        stopped.stop().await;
        assert_eq!(h.queued().await, 0, "acknowledged during the stop's drain");
        assert_eq!(
            h.ledger_record(&event).await.as_deref(),
            Some(shared::send_ledger::SENT)
        );
        h.fake.set_faults(Faults::default());
        // Handed on, the event would be claimed by the next worker and sent once the breaker
        // lets a probe through: recorded as sent only then.
        let next = h.start_worker(&[]).await;
        eventually(WAIT, "the event to end as sent", || async {
            h.queued().await == 0
                && h.ledger_record(&event).await.as_deref() == Some(shared::send_ledger::SENT)
        })
        .await;
        next.stop().await;
        assert_eq!(h.queued().await, 0, "the event was acknowledged");
        assert_eq!(
            h.fake.requests(Some(&to)).len(),
            1,
            "a second call after an ambiguous one"
        );
    })
    .await;
}

/// A refusal after an ambiguous call says nothing of the first call (Infobip calls any 400 the
/// recipient's): the event ends as sent-unconfirmed, not dead-lettered.
#[tokio::test]
async fn a_refusal_after_an_ambiguous_call_ends_as_sent_not_dead_lettered() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults::latency(1_500));
        let to = phone();
        h.fake.set_faults_for(
            SmsProvider::Infobip,
            Faults {
                rules: vec![Rule {
                    to: to.clone(),
                    response: InjectedResponse::status(400),
                }],
                ..Faults::default()
            },
        );
        let mut overrides = h.failover();
        overrides.push(("SEND_TIMEOUT_SECS".to_owned(), "1".to_owned()));
        let worker = h.start_worker(&pairs(&overrides)).await;
        let event = h.request_sms(&to).await;
        let ended = wait_for_the_end(&h, &event).await;
        worker.stop().await;
        assert_eq!(
            h.fake.requests_via(SmsProvider::Infobip, Some(&to)).len(),
            1,
            "Infobip had the one more attempt"
        );
        assert_eq!(
            ended.as_str(),
            shared::send_ledger::SENT,
            "the first SMS may have gone: recorded as sent"
        );
        assert_eq!(h.dead_lettered().await, 0);
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

/// Redis going away between an ambiguous call and its one more attempt: the claim falls in
/// doubt, and the event ends as sent-unconfirmed rather than wait for Redis and be claimed
/// again, which would call the provider a second time for an SMS that may be on the phone.
#[tokio::test]
async fn an_ambiguous_call_whose_claim_falls_in_doubt_ends_as_sent() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults::latency(2_500));
        let (redis, redis_url) = TcpProxy::in_front_of(&servers().redis).await;
        let worker = h
            .start_worker(&[("REDIS_URL", &redis_url), ("SEND_TIMEOUT_SECS", "2")])
            .await;
        let to = phone();
        h.publish(&event(&to, CODE_VALIDITY)).await;
        h.wait_for_a_call(&to).await;
        // The call times out two seconds after it started, and the 1 s lease, unrenewed since
        // Redis went (up to 1.3 s after the call started), is then in doubt. An observation
        // window, then a stop with Redis still away: an event still waiting for Redis to be
        // claimed again would go back to the queue.
        redis.go_down();
        tokio::time::sleep(Duration::from_secs(4)).await;
        worker.stop().await;
        assert_eq!(h.queued().await, 0, "the event was not acknowledged");
        assert_eq!(
            h.fake.requests(Some(&to)).len(),
            1,
            "a second call after an ambiguous one"
        );
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}
