//! Providers in failover order: a breaker that opens on provider-side failures and sends the
//! traffic to the next provider, a half-open probe that brings it back or is given back when its
//! send says nothing of the provider, recipient failures that neither fail over nor count, and
//! dead letters that name every provider tried.

use std::time::Duration;

use shared::QueueType;
use tests::fake_sms::{Faults, InjectedResponse, Rule, SmsProvider};
use tests::wait::eventually;

use crate::harness::{Harness, RunningWorker, WAIT, pairs, phone, with_harness};

/// When the provider's shared breaker stops being open (Redis ms; 0 when closed).
async fn breaker_open_until(h: &Harness, provider: &str) -> i64 {
    let mut redis = redis::Client::open(tests::servers::servers().redis.url())
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    let key = format!("{ns}:breaker:{{{ns}:{provider}}}", ns = h.ns);
    let open_until: Option<i64> = redis::cmd("HGET")
        .arg(key)
        .arg("o")
        .query_async(&mut redis)
        .await
        .expect("HGET");
    open_until.unwrap_or(0)
}

/// Which provider carried the SMS of an event for a new number, once it has arrived.
async fn carrier_of_a_new_number(h: &Harness) -> Option<SmsProvider> {
    let to = phone();
    h.request_sms(&to).await;
    h.wait_for_messages(&to, 1).await;
    carrier(h, &to)
}

/// Which provider carried the one message to `to`.
fn carrier(h: &Harness, to: &str) -> Option<SmsProvider> {
    h.fake.messages(Some(to)).first().map(|m| m.provider)
}

/// The statuses `provider` answered the sends to `to`, in order.
fn statuses_via(h: &Harness, provider: SmsProvider, to: &str) -> Vec<u16> {
    h.fake
        .requests_via(provider, Some(to))
        .iter()
        .map(|r| r.status)
        .collect()
}

/// Twilio answers 500 to everything from now on. Returns the overrides of a worker with Twilio
/// then Infobip whose breaker opens at the third failure and cools down for `cooldown_secs`.
fn twilio_failing(h: &Harness, cooldown_secs: &str) -> Vec<(String, String)> {
    h.fake.set_faults(Faults {
        always: Some(InjectedResponse::status(500)),
        ..Faults::default()
    });
    let mut overrides = h.failover();
    overrides.extend(
        [
            ("PROVIDER_BREAKER_FAILURES", "3"),
            ("PROVIDER_BREAKER_WINDOW_SECS", "30"),
            ("PROVIDER_BREAKER_COOLDOWN_SECS", cooldown_secs),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned())),
    );
    overrides
}

#[tokio::test]
async fn a_failing_provider_is_bypassed_once_its_breaker_opens_and_returns_after_the_cooldown() {
    with_harness(QueueType::Classic, |h| async move {
        let overrides = twilio_failing(&h, "2");
        let worker = h.start_worker(&pairs(&overrides)).await;

        // Before the breaker opens, events retry on Twilio; all of them still get through.
        let early: Vec<String> = (0..4).map(|_| phone()).collect();
        for to in &early {
            h.request_sms(to).await;
        }
        for to in &early {
            h.wait_for_messages(to, 1).await;
            assert_eq!(carrier(&h, to), Some(SmsProvider::Infobip), "{to}");
        }
        // Open now: new events go straight to Infobip, without a call to Twilio.
        let calls_to_twilio = h.fake.requests_via(SmsProvider::Twilio, None).len();
        for _ in 0..5 {
            let to = phone();
            let started = std::time::Instant::now();
            h.request_sms(&to).await;
            h.wait_for_messages(&to, 1).await;
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(1),
                "took {took:?} with the breaker open"
            );
            assert_eq!(carrier(&h, &to), Some(SmsProvider::Infobip));
        }
        assert_eq!(
            h.fake.requests_via(SmsProvider::Twilio, None).len(),
            calls_to_twilio,
            "no call to Twilio while its breaker is open"
        );
        // The breaker is open in Redis, where every worker reads it.
        assert!(
            breaker_open_until(&h, "twilio").await > 0,
            "Twilio's breaker is open"
        );

        // Twilio recovers: after the cooldown one probe goes through and traffic returns.
        h.fake.set_faults(Faults::default());
        eventually(WAIT, "traffic back on Twilio", || async {
            carrier_of_a_new_number(&h).await == Some(SmsProvider::Twilio)
        })
        .await;
        assert_eq!(carrier_of_a_new_number(&h).await, Some(SmsProvider::Twilio));
        worker.stop().await;
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

#[tokio::test]
async fn refused_credentials_move_the_send_to_the_next_provider_at_once() {
    with_harness(QueueType::Classic, |h| async move {
        let mut overrides = h.failover();
        overrides.push(("TWILIO_AUTH_TOKEN".to_owned(), "wrong-token".to_owned()));
        let worker = h.start_worker(&pairs(&overrides)).await;
        let to = phone();
        h.request_sms(&to).await;
        h.wait_for_messages(&to, 1).await;
        assert_eq!(carrier(&h, &to), Some(SmsProvider::Infobip));
        let twilio = statuses_via(&h, SmsProvider::Twilio, &to);
        assert_eq!(twilio, [401], "one call to Twilio, refused");
        worker.stop().await;
    })
    .await;
}

/// A provider that asks for minutes (`Retry-After: 300`, past any event's budget) hands the
/// event to the next provider at once. Before, the event was dead-lettered after that one call,
/// while Infobip could have sent it, until enough such answers opened Twilio's breaker.
#[tokio::test]
async fn a_provider_asking_for_minutes_hands_the_event_to_the_next() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            always: Some(InjectedResponse::status(429).retry_after(300)),
            ..Faults::default()
        });
        let worker = h.start_worker(&pairs(&h.failover())).await;
        let to = phone();
        h.request_sms(&to).await;
        h.wait_for_messages(&to, 1).await;
        assert_eq!(carrier(&h, &to), Some(SmsProvider::Infobip));
        let twilio = statuses_via(&h, SmsProvider::Twilio, &to);
        assert_eq!(twilio, [429], "one call to Twilio, which asked for minutes");
        worker.stop().await;
    })
    .await;
}

/// A 502 may come from an edge after the provider took the request: its `Retry-After` is not
/// heeded, and a wait past the budget does not hand the event to another provider (no id keeps
/// two providers from both sending). It is retried on the same provider, as any 5xx, until its
/// budget ends. (Only an opened breaker moves it, as for any failure; set out of reach here.)
#[tokio::test]
async fn a_bad_gateway_asking_for_minutes_is_not_handed_to_the_next_provider() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            always: Some(InjectedResponse::status(502).retry_after(300)),
            ..Faults::default()
        });
        let mut overrides = h.failover();
        overrides.extend(
            [
                ("RETRY_MAX_ELAPSED_SECS", "2"),
                ("PROVIDER_BREAKER_FAILURES", "50"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned())),
        );
        let worker = h.start_worker(&pairs(&overrides)).await;
        let to = phone();
        h.request_sms(&to).await;
        let dead = h.wait_for_dead_letters(1).await;
        assert_eq!(
            dead[0].header_str("x-error-kind").as_deref(),
            Some("retries_exhausted")
        );
        let twilio = statuses_via(&h, SmsProvider::Twilio, &to);
        assert!(
            twilio.len() > 1 && twilio.iter().all(|s| *s == 502),
            "{twilio:?}"
        );
        assert!(statuses_via(&h, SmsProvider::Infobip, &to).is_empty());
        worker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn recipient_errors_neither_fail_over_nor_open_a_breaker() {
    with_harness(QueueType::Classic, |h| async move {
        let unsubscribed = phone();
        h.fake.set_faults(Faults {
            rules: vec![Rule {
                to: unsubscribed.clone(),
                response: InjectedResponse::twilio_error(400, 21610),
            }],
            ..Faults::default()
        });
        let mut overrides = h.failover();
        overrides.push(("PROVIDER_BREAKER_FAILURES".to_owned(), "2".to_owned()));
        let worker = h.start_worker(&pairs(&overrides)).await;
        for _ in 0..3 {
            h.request_sms(&unsubscribed).await;
        }
        let letters = h.wait_for_dead_letters(3).await;
        for letter in &letters {
            assert_eq!(
                letter.header_str("x-error-kind").as_deref(),
                Some("permanent")
            );
            assert_eq!(letter.header_int("x-provider-code"), Some(21610));
            assert_eq!(
                letter.header_str("x-providers").as_deref(),
                Some("twilio:400:21610")
            );
        }
        assert!(h.fake.requests_via(SmsProvider::Infobip, None).is_empty());
        // The breaker stayed closed: the next number goes through Twilio.
        assert_eq!(carrier_of_a_new_number(&h).await, Some(SmsProvider::Twilio));
        worker.stop().await;
    })
    .await;
}

/// Twilio answers every send with `refusal`; `sends` numbers are sent to one after the other,
/// with a breaker that opens at the second provider-side failure. Returns the statuses of the
/// calls Twilio took, once every SMS has arrived through Infobip.
async fn sends_while_twilio_refuses(
    h: &Harness,
    refusal: InjectedResponse,
    sends: usize,
) -> Vec<u16> {
    h.fake.set_faults(Faults {
        always: Some(refusal),
        ..Faults::default()
    });
    let mut overrides = h.failover();
    overrides.extend(
        [
            ("PROVIDER_BREAKER_FAILURES", "2"),
            ("PROVIDER_BREAKER_WINDOW_SECS", "3600"),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned())),
    );
    let worker = h.start_worker(&pairs(&overrides)).await;
    for _ in 0..sends {
        let to = phone();
        h.request_sms(&to).await;
        h.wait_for_messages(&to, 1).await;
        assert_eq!(carrier(h, &to), Some(SmsProvider::Infobip), "{to}");
    }
    worker.stop().await;
    assert_eq!(h.dead_lettered().await, 0);
    h.fake
        .requests_via(SmsProvider::Twilio, None)
        .iter()
        .map(|r| r.status)
        .collect()
}

#[tokio::test]
async fn a_refusal_of_our_sender_fails_over_and_counts_against_the_provider() {
    with_harness(QueueType::Classic, |h| async move {
        // 21212: the `From` is not a valid number. No requester can cause it.
        let refusal = InjectedResponse::twilio_error(400, 21212);
        let twilio = sends_while_twilio_refuses(&h, refusal, 4).await;
        // The breaker opens at the second refusal, or at the third when the two fall either
        // side of the end of a breaker window (aligned to the clock; the first then counts for
        // less than a whole failure); the sends after it skip Twilio.
        assert!(
            matches!(twilio.as_slice(), [400, 400] | [400, 400, 400]),
            "Twilio's calls: {twilio:?}"
        );
        assert!(breaker_open_until(&h, "twilio").await > 0);
    })
    .await;
}

#[tokio::test]
async fn a_refusal_the_worker_cannot_place_fails_over_and_counts_against_no_one() {
    with_harness(QueueType::Classic, |h| async move {
        // A code the worker does not know: it may be the number's, which the requester chose.
        let refusal = InjectedResponse::twilio_error(400, 63_999);
        let twilio = sends_while_twilio_refuses(&h, refusal, 4).await;
        assert_eq!(twilio, [400; 4], "every send tried Twilio first");
        assert_eq!(breaker_open_until(&h, "twilio").await, 0);
    })
    .await;
}

/// Requests an SMS for a new number and waits for its dead letter, which must be permanent and
/// name the provider calls `providers` (`name:status:code`, in order). Returns its attempts.
async fn permanent_dead_letter_after(h: &Harness, providers: &str) -> Option<i64> {
    h.request_sms(&phone()).await;
    let letters = h.wait_for_dead_letters(1).await;
    let letter = &letters[0];
    assert_eq!(
        letter.header_str("x-error-kind").as_deref(),
        Some("permanent")
    );
    assert_eq!(letter.header_str("x-providers").as_deref(), Some(providers));
    letter.header_int("x-attempts")
}

/// Where the deployment asks for it, a refusal the worker cannot place is dead-lettered instead
/// of paid for again at the next provider.
#[tokio::test]
async fn a_refusal_the_worker_cannot_place_is_dead_lettered_where_asked() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            always: Some(InjectedResponse::twilio_error(400, 63_999)),
            ..Faults::default()
        });
        let mut overrides = h.failover();
        overrides.push(("SMS_UNRECOGNISED_REFUSALS".into(), "dead_letter".into()));
        let worker = h.start_worker(&pairs(&overrides)).await;
        let attempts = permanent_dead_letter_after(&h, "twilio:400:63999").await;
        assert_eq!(attempts, Some(1));
        worker.stop().await;
        assert!(h.fake.requests_via(SmsProvider::Infobip, None).is_empty());
        assert!(h.fake.messages(None).is_empty());
        assert_eq!(breaker_open_until(&h, "twilio").await, 0);
    })
    .await;
}

#[tokio::test]
async fn when_every_provider_refuses_the_dead_letter_names_each() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            always: Some(InjectedResponse::twilio_error(401, 20003)),
            ..Faults::default()
        });
        h.fake.set_faults_for(
            SmsProvider::Infobip,
            Faults {
                always: Some(InjectedResponse::status(403)),
                ..Faults::default()
            },
        );
        let worker = h.start_worker(&pairs(&h.failover())).await;
        let attempts = permanent_dead_letter_after(&h, "twilio:401:20003,infobip:403:403").await;
        assert_eq!(attempts, Some(2));
        worker.stop().await;
    })
    .await;
}

/// A worker with Twilio then Infobip whose Twilio breaker has opened (three 500s in a row; a 1 s
/// cooldown), Twilio's faults cleared again. Returns the worker and its overrides.
async fn with_twilios_breaker_open(h: &Harness) -> (RunningWorker, Vec<(String, String)>) {
    let overrides = twilio_failing(h, "1");
    let worker = h.start_worker(&pairs(&overrides)).await;
    // It retries on Twilio until the third failure opens the breaker, then goes to Infobip.
    assert_eq!(carrier_of_a_new_number(h).await, Some(SmsProvider::Infobip));
    assert!(
        breaker_open_until(h, "twilio").await > 0,
        "Twilio's breaker did not open"
    );
    h.fake.set_faults(Faults::default());
    (worker, overrides)
}

/// Waits until the provider's breaker is half-open: its cooldown over, by Redis's clock.
async fn wait_for_half_open(h: &Harness, provider: &str) {
    eventually(WAIT, "the breaker's cooldown to end", || async {
        let (secs, micros): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut h.redis().await)
            .await
            .expect("TIME");
        let open_until = breaker_open_until(h, provider).await;
        open_until > 0 && open_until <= secs * 1_000 + micros / 1_000
    })
    .await;
}

/// A half-open breaker's probe refused for its recipient says nothing of the provider: the
/// requester chose the number, and an SMS-pumping attacker, who sends most of the traffic, would
/// otherwise close the breaker of a provider still failing everyone else. The probe is given back
/// at once, so the next send probes (kept instead, the provider was left out for the probe's
/// 30 s lease, and with one provider every send waited).
#[tokio::test]
async fn a_probe_refused_for_its_recipient_is_given_back_without_closing_the_breaker() {
    with_harness(QueueType::Classic, |h| async move {
        let (worker, _) = with_twilios_breaker_open(&h).await;
        // Twilio still fails everyone, and refuses the attacker's invalid number.
        let invalid = phone();
        h.fake.set_faults(Faults {
            always: Some(InjectedResponse::status(500)),
            rules: vec![Rule {
                to: invalid.clone(),
                response: InjectedResponse::twilio_error(400, 21211),
            }],
            ..Faults::default()
        });
        wait_for_half_open(&h, "twilio").await;
        h.request_sms(&invalid).await;
        h.wait_for_dead_letters(1).await;
        assert_eq!(
            h.fake
                .requests_via(SmsProvider::Twilio, Some(&invalid))
                .len(),
            1,
            "the probe did not go to Twilio"
        );
        assert!(
            breaker_open_until(&h, "twilio").await > 0,
            "the attacker's number closed the breaker"
        );
        // Twilio recovers: the next send takes the probe given back, and closes the breaker.
        h.fake.set_faults(Faults::default());
        assert_eq!(
            carrier_of_a_new_number(&h).await,
            Some(SmsProvider::Twilio),
            "the probe was not given back"
        );
        // The SMS reaches fake-sms before the worker has Twilio's answer and records it.
        eventually(WAIT, "the breaker closed by the probe", || async {
            breaker_open_until(&h, "twilio").await == 0
        })
        .await;
        worker.stop().await;
    })
    .await;
}

/// A probe whose call is cut short by a stop's grace period (ending sent-unconfirmed) has no
/// answer to judge the provider by: it is given back at once, and the next send, on another
/// worker, takes it.
#[tokio::test]
async fn a_probe_cut_short_by_a_stop_is_given_back_at_once() {
    with_harness(QueueType::Classic, |h| async move {
        let (opener, overrides) = with_twilios_breaker_open(&h).await;
        opener.stop().await;
        // Twilio's answer comes after the grace period and the 2 s a call under way gets.
        h.fake.set_faults(Faults::latency(8_000));
        wait_for_half_open(&h, "twilio").await;
        let mut stopping = overrides.clone();
        stopping.push(("SHUTDOWN_GRACE_SECS".to_owned(), "1".to_owned()));
        let first = h.start_worker(&pairs(&stopping)).await;
        let probed = phone();
        h.request_sms(&probed).await;
        h.wait_for_a_call(&probed).await;
        first.stop().await;
        assert_eq!(
            h.fake
                .requests_via(SmsProvider::Twilio, Some(&probed))
                .len(),
            1,
            "the probe did not go to Twilio"
        );
        h.fake.set_faults(Faults::default());
        let second = h.start_worker(&pairs(&overrides)).await;
        assert_eq!(
            carrier_of_a_new_number(&h).await,
            Some(SmsProvider::Twilio),
            "the probe was not given back"
        );
        second.stop().await;
    })
    .await;
}
