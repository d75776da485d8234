//! Dead letters: what cannot be sent goes to the dead-letter queue with the reason in its
//! headers and without its code, after one call for a permanent error and after the backoff for
//! a lasting one.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use shared::QueueType;
use tests::fake_sms::{Faults, InjectedResponse, Rule};
use time::OffsetDateTime;

use crate::harness::{CODE_VALIDITY, event, phone, with_harness};

#[tokio::test]
async fn dead_letters_permanent_errors_after_one_call() {
    with_harness(QueueType::Classic, |h| async move {
        let unsubscribed = phone();
        // A number Twilio says is invalid (21211), and one whose owner unsubscribed (21610).
        let invalid = phone();
        h.fake.set_faults(Faults {
            rules: vec![
                Rule {
                    to: unsubscribed.clone(),
                    response: InjectedResponse::twilio_error(400, 21610),
                },
                Rule {
                    to: invalid.clone(),
                    response: InjectedResponse::twilio_error(400, 21211),
                },
            ],
            ..Faults::default()
        });
        let worker = h.start_worker(&[]).await;
        let invalid_event = h.request_sms(&invalid).await;
        let dead = h.wait_for_dead_letters(1).await;
        h.request_sms(&unsubscribed).await;
        let dead_after = h.wait_for_dead_letters(2).await;

        assert_eq!(h.fake.requests(Some(&invalid)).len(), 1, "exactly one call");
        assert_eq!(
            h.fake.requests(Some(&unsubscribed)).len(),
            1,
            "exactly one call"
        );
        assert!(h.fake.messages(None).is_empty());

        let letter = &dead[0];
        assert_eq!(
            letter.header_str("x-error-kind").as_deref(),
            Some("permanent")
        );
        assert_eq!(letter.header_int("x-provider-status"), Some(400));
        assert_eq!(letter.header_int("x-provider-code"), Some(21211));
        assert_eq!(letter.header_int("x-attempts"), Some(1));
        assert_eq!(
            letter.header_str("x-request-id"),
            Some(invalid_event.request_id.clone())
        );
        let failed_at = letter.header_str("x-failed-at").unwrap();
        OffsetDateTime::parse(&failed_at, &time::format_description::well_known::Rfc3339).unwrap();
        let error = letter.header_str("x-error").unwrap();
        assert!(
            error.contains("21211") || error.contains("Invalid"),
            "{error}"
        );
        let properties = &letter.properties;
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(
            properties.expiration(),
            &None,
            "a dead letter must not expire with the OTP"
        );
        assert_eq!(
            properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned()),
            Some(invalid_event.event_id.to_string())
        );

        let json: serde_json::Value = serde_json::from_slice(&letter.body).unwrap();
        assert_eq!(json["otp"], serde_json::Value::Null);
        assert_eq!(json["event_id"], invalid_event.event_id.to_string());
        let code = invalid_event.otp.as_deref().unwrap();
        assert!(
            !String::from_utf8_lossy(&letter.body).contains(code),
            "the code never stays readable"
        );

        let unsubscribed_dead = dead_after
            .iter()
            .find(|letter| letter.header_int("x-provider-code") == Some(21610))
            .expect("the 21610 dead letter");
        let error = unsubscribed_dead.header_str("x-error").unwrap();
        assert!(
            !error.contains(&unsubscribed[1..]),
            "the number is masked: {error}"
        );

        worker.stop().await;
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

#[tokio::test]
async fn dead_letters_after_backoff_when_the_provider_keeps_failing() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            always: Some(InjectedResponse::status(503)),
            ..Faults::default()
        });
        let worker = h
            .start_worker(&[
                ("SMS_RETRY_MIN_DELAY_MS", "100"),
                ("SMS_RETRY_MAX_DELAY_MS", "10000"),
                ("RETRY_MAX_ELAPSED_SECS", "3"),
            ])
            .await;
        let to = phone();
        let started = Instant::now();
        h.request_sms(&to).await;
        let dead = h.wait_for_dead_letters(1).await;
        let elapsed = started.elapsed();

        let letter = &dead[0];
        assert_eq!(
            letter.header_str("x-error-kind").as_deref(),
            Some("retries_exhausted")
        );
        assert_eq!(letter.header_int("x-provider-status"), Some(503));
        let calls = h.fake.requests(Some(&to)).len();
        assert!(calls >= 3, "{calls} calls");
        assert_eq!(
            letter.header_int("x-attempts"),
            Some(i64::try_from(calls).unwrap())
        );
        assert!(
            elapsed < Duration::from_secs(6),
            "gave up after {elapsed:?}"
        );

        // Exponential with jitter: each delay is in [d, 2d) and d doubles, so the gaps grow.
        let gaps = h.gaps(&to);
        assert!(gaps[0] >= Duration::from_millis(100), "{gaps:?}");
        for pair in gaps.windows(2) {
            assert!(pair[1] > pair[0], "gaps grow: {gaps:?}");
        }
        worker.stop().await;
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

#[tokio::test]
async fn dead_letters_expired_and_invalid_events_without_sending() {
    with_harness(QueueType::Classic, |h| async move {
        let worker = h.start_worker(&[]).await;
        let to = phone();
        // Expired already; published without an expiration, so the worker (not the broker)
        // sees it, as with a message that waited in the queue across a worker outage.
        let mut expired = event(&to, CODE_VALIDITY);
        expired.expires_at = OffsetDateTime::now_utc() - time::Duration::seconds(5);
        h.publish_without_expiration(&expired).await;
        let dead = h.wait_for_dead_letters(1).await;
        let letter = &dead[0];
        assert_eq!(
            letter.header_str("x-error-kind").as_deref(),
            Some("expired")
        );
        assert_eq!(letter.header_int("x-attempts"), Some(0));
        let json: serde_json::Value = serde_json::from_slice(&letter.body).unwrap();
        assert_eq!(json["otp"], serde_json::Value::Null);

        let garbage = b"{\"version\":1,\"phone_number\":\"+14155550100\",\"otp\":\"654321\"";
        h.publish_with(
            garbage,
            BasicProperties::default().with_delivery_mode(shared::amqp::PERSISTENT),
        )
        .await;
        let dead = h.wait_for_dead_letters(2).await;
        let letter = dead
            .iter()
            .find(|letter| letter.header_str("x-error-kind").as_deref() == Some("invalid_message"))
            .expect("an invalid_message dead letter");
        assert_eq!(
            letter.body.as_slice(),
            garbage.as_slice(),
            "kept as it came"
        );
        let error = letter.header_str("x-error").unwrap();
        assert!(
            !error.contains("654321") && !error.contains("4155550100"),
            "{error}"
        );

        assert!(h.fake.requests(None).is_empty(), "nothing was sent");
        worker.stop().await;
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

#[tokio::test]
async fn bad_credentials_are_a_permanent_failure() {
    with_harness(QueueType::Classic, |h| async move {
        let worker = h
            .start_worker(&[("TWILIO_AUTH_TOKEN", "wrong-token")])
            .await;
        let to = phone();
        h.request_sms(&to).await;
        let dead = h.wait_for_dead_letters(1).await;
        assert_eq!(
            dead[0].header_str("x-error-kind").as_deref(),
            Some("permanent")
        );
        assert_eq!(dead[0].header_int("x-provider-status"), Some(401));
        assert_eq!(dead[0].header_int("x-provider-code"), Some(20003));
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);
        worker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn only_a_code_and_an_e164_number_are_ever_sent() {
    with_harness(QueueType::Classic, |h| async move {
        let worker = h.start_worker(&[]).await;
        // Whatever is in `otp` would go out under our sender ID.
        let mut phishing = event(&phone(), CODE_VALIDITY);
        phishing.otp = Some("000000. Your account is locked; confirm at https://evil.example/x".into());
        h.publish(&phishing).await;
        // A real code beside a number that is not E.164.
        let code = "424242";
        let body = format!(
            r#"{{"version":1,"event_id":"{}","phone_number":"+1234","otp":"{code}","expires_at":"2099-01-01T00:00:00Z","requested_at":"2026-01-01T00:00:00Z","request_id":"r"}}"#,
            uuid::Uuid::new_v4()
        );
        h.publish_with(body.as_bytes(), BasicProperties::default().with_delivery_mode(2))
            .await;
        let letters = h.wait_for_dead_letters(2).await;
        worker.stop().await;
        assert!(h.fake.requests(None).is_empty(), "nothing was sent");
        for letter in &letters {
            assert_eq!(
                letter.header_str("x-error-kind").as_deref(),
                Some("invalid_message")
            );
            let text = String::from_utf8_lossy(&letter.body);
            assert!(!text.contains(code), "no readable code: {text}");
        }
    })
    .await;
}

/// A provider (or whatever answers in its place) that echoes the message it was sent in its
/// refusal, whole or cut short: the digits of its text are masked before it reaches the dead
/// letter, the log or the timeline.
#[tokio::test]
async fn a_refusal_that_echoes_the_code_leaves_it_out_of_the_dead_letter() {
    with_harness(QueueType::Classic, |h| async move {
        // One refusal quotes the message whole, the other cut short.
        let (whole, cut) = (phone(), phone());
        let events = [event(&whole, CODE_VALIDITY), event(&cut, CODE_VALIDITY)];
        let code = |i: usize| events[i].otp.clone().expect("a code");
        let refusal = |to: &str, quoted: String| Rule {
            to: to.to_owned(),
            response: InjectedResponse {
                message: Some(format!(
                    "the body 'Your sign-in code is {quoted}' was refused"
                )),
                ..InjectedResponse::twilio_error(400, 21211)
            },
        };
        h.fake.set_faults(Faults {
            rules: vec![
                refusal(&whole, code(0)),
                refusal(&cut, code(1)[..4].to_owned()),
            ],
            ..Faults::default()
        });
        let worker = h.start_worker(&[]).await;
        for event in &events {
            h.publish(event).await;
        }
        let dead = h.wait_for_dead_letters(2).await;
        for letter in &dead {
            let error = letter.header_str("x-error").expect("the reason");
            assert!(error.contains("was refused"), "{error}");
            for i in 0..2 {
                assert!(
                    !error.contains(&code(i)[..4]),
                    "the code reached the dead letter: {error}"
                );
            }
        }
        // The whole code: four digits could be part of a timestamp there.
        for (i, to) in [&whole, &cut].into_iter().enumerate() {
            assert!(
                !h.trace(to, &[]).await.contains(&code(i)),
                "the code reached the timeline"
            );
        }
        worker.stop().await;
    })
    .await;
}
