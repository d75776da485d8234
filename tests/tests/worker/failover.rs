//! Providers in failover order: a breaker that opens on provider-side failures and sends the
//! traffic to the next provider, a half-open probe that brings it back, recipient failures that
//! neither fail over nor count, and dead letters that name every provider tried.

use std::time::Duration;

use shared::QueueType;
use tests::fake_sms::{Faults, InjectedResponse, Rule, SmsProvider};
use tests::wait::eventually;

use crate::harness::{Harness, WAIT, pairs, phone, with_harness};

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

/// Which provider carried the one message to `to`.
fn carrier(h: &Harness, to: &str) -> Option<SmsProvider> {
    h.fake.messages(Some(to)).first().map(|m| m.provider)
}

#[tokio::test]
async fn a_failing_provider_is_bypassed_once_its_breaker_opens_and_returns_after_the_cooldown() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            always: Some(InjectedResponse::status(500)),
            ..Faults::default()
        });
        let mut overrides = h.failover();
        overrides.extend(
            [
                ("PROVIDER_BREAKER_FAILURES", "3"),
                ("PROVIDER_BREAKER_WINDOW_SECS", "30"),
                ("PROVIDER_BREAKER_COOLDOWN_SECS", "2"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned())),
        );
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
            let to = phone();
            h.request_sms(&to).await;
            h.wait_for_messages(&to, 1).await;
            carrier(&h, &to) == Some(SmsProvider::Twilio)
        })
        .await;
        let to = phone();
        h.request_sms(&to).await;
        h.wait_for_messages(&to, 1).await;
        assert_eq!(carrier(&h, &to), Some(SmsProvider::Twilio));
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
        let twilio: Vec<u16> = h
            .fake
            .requests_via(SmsProvider::Twilio, Some(&to))
            .iter()
            .map(|r| r.status)
            .collect();
        assert_eq!(twilio, [401], "one call to Twilio, refused");
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
        let to = phone();
        h.request_sms(&to).await;
        h.wait_for_messages(&to, 1).await;
        assert_eq!(carrier(&h, &to), Some(SmsProvider::Twilio));
        worker.stop().await;
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
        h.request_sms(&phone()).await;
        let letters = h.wait_for_dead_letters(1).await;
        let letter = &letters[0];
        assert_eq!(
            letter.header_str("x-error-kind").as_deref(),
            Some("permanent")
        );
        assert_eq!(
            letter.header_str("x-providers").as_deref(),
            Some("twilio:401:20003,infobip:403:403")
        );
        assert_eq!(letter.header_int("x-attempts"), Some(2));
        worker.stop().await;
    })
    .await;
}
