//! Sending: what reaches Twilio, with which credentials and sender, and retries that end in a
//! send.

use std::time::{Duration, Instant};

use shared::QueueType;
use tests::fake_sms::{Faults, InjectedResponse};
use tests::servers::servers;
use tests::wait::eventually;

use crate::harness::{CODE_VALIDITY, WAIT, event, phone, with_harness};

#[tokio::test]
async fn writes_in_the_events_language_and_ends_with_the_android_app_hash() {
    with_harness(QueueType::Classic, |h| async move {
        let _worker = h
            .start_worker(&[
                ("SMS_TEMPLATE_ES", "Tu código de {app} es {code}."),
                ("SMS_TEMPLATE_PT_BR", "Seu código do {app}: {code}"),
                ("APP_NAME", "Acme"),
                ("WEBOTP_DOMAIN", "acme.example"),
                ("ANDROID_APP_HASH", "FA+9qCX9VSu"),
            ])
            .await;
        let cases = [
            (Some("es-MX"), "Tu código de Acme es {code}."),
            (Some("pt-BR"), "Seu código do Acme: {code}"),
            (
                Some("fr"),
                "Your Acme code is {code}. It expires in 5 minutes.",
            ),
            (None, "Your Acme code is {code}. It expires in 5 minutes."),
        ];
        for (locale, text) in cases {
            let to = phone();
            let event = event(&to, CODE_VALIDITY).in_locale(locale.map(str::to_owned));
            h.publish(&event).await;
            h.wait_for_messages(&to, 1).await;
            let code = event.otp.as_deref().unwrap();
            let expected = format!(
                "{}\n\n@acme.example #{code} FA+9qCX9VSu",
                text.replace("{code}", code)
            );
            assert_eq!(h.fake.messages(Some(&to))[0].body, expected, "{locale:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn sends_the_sms_and_acknowledges_the_event() {
    with_harness(QueueType::Classic, |h| async move {
        let worker = h.start_worker(&[("WEBOTP_DOMAIN", "example.com")]).await;
        let to = phone();
        let event = h.request_sms(&to).await;
        h.wait_for_messages(&to, 1).await;

        let sms = &h.fake.messages(Some(&to))[0];
        let code = event.otp.as_deref().unwrap();
        assert_eq!(
            sms.body,
            format!(
                "Your sign-in code is {code}. It expires in 5 minutes.\n\n@example.com #{code}"
            )
        );
        assert_eq!(sms.from.as_deref(), Some("+15005550006"));
        let validity = sms.validity_period.unwrap();
        assert!((290..=300).contains(&validity), "ValidityPeriod {validity}");
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);

        // The send is remembered until the OTP expires plus the margin, not longer.
        let mut redis = redis::Client::open(servers().redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let key = format!("{}:sms:{{{}}}", h.topology.namespace, event.event_id);
        let (value, ttl_ms): (String, i64) = redis::pipe()
            .get(&key)
            .pttl(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(value, "sent");
        assert!(
            (3_500_000..=3_900_000).contains(&ttl_ms),
            "record TTL {ttl_ms} ms"
        );

        worker.stop().await;
        // Stopped, so nothing is unacknowledged any more: the queue would show a returned event.
        assert_eq!(h.queued().await, 0);
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

#[tokio::test]
async fn sends_with_an_api_key_and_a_messaging_service_on_quorum_queues() {
    with_harness(QueueType::Quorum, |h| async move {
        let fake = h.fake.config();
        let worker = h
            .start_worker(&[
                ("TWILIO_API_KEY_SID", &fake.api_key_sid),
                ("TWILIO_API_KEY_SECRET", &fake.api_key_secret),
                ("TWILIO_FROM", ""),
                (
                    "TWILIO_MESSAGING_SERVICE_SID",
                    "MG0123456789abcdef0123456789abcdef",
                ),
            ])
            .await;
        let to = phone();
        h.publish(&event(&to, Duration::from_secs(120))).await;
        h.wait_for_messages(&to, 1).await;
        let sms = &h.fake.messages(Some(&to))[0];
        assert_eq!(sms.from, None);
        assert_eq!(
            sms.messaging_service_sid.as_deref(),
            Some("MG0123456789abcdef0123456789abcdef")
        );
        assert!(sms.body.contains("It expires in 2 minutes"), "{}", sms.body);
        worker.stop().await;
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

#[tokio::test]
async fn retries_5xx_then_succeeds() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            responses: [InjectedResponse::status(503), InjectedResponse::status(500)].into(),
            ..Faults::default()
        });
        let worker = h.start_worker(&[]).await;
        let to = phone();
        h.request_sms(&to).await;
        h.wait_for_messages(&to, 1).await;

        assert_eq!(h.fake.statuses(Some(&to)), [503, 500, 201]);
        assert_eq!(h.fake.messages(Some(&to)).len(), 1);
        worker.stop().await;
        assert_eq!(h.dead_lettered().await, 0);
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

/// A provider whose answer never seems to end: 1 GiB of whitespace after the JSON, sent at
/// 6.4 MB/s, or a byte every 100 ms. The worker reads the start, which holds the whole answer,
/// and goes on: the send is recorded within seconds, not after minutes, and neither sent twice
/// nor turned ambiguous. An error answer padded the same way is sorted by its status.
#[tokio::test]
async fn an_answer_that_does_not_end_is_read_only_up_to_a_limit_of_size_and_time() {
    with_harness(QueueType::Classic, |h| async move {
        // Read whole, each answer would take minutes, past this timeout.
        let worker = h.start_worker(&[("SEND_TIMEOUT_SECS", "60")]).await;
        let redis = h.redis().await;
        // A 503 is retried by its status alone; a 400 for an invalid number would be
        // dead-lettered, but its reason (Twilio's code) is in the part of the answer not read in
        // time, so it is retried too rather than blamed on the recipient.
        for (trickles, refusal) in [
            (false, InjectedResponse::status(503)),
            (true, InjectedResponse::status(503)),
            (true, InjectedResponse::twilio_error(400, 21211)),
        ] {
            let refused_with = refusal.status;
            h.fake.set_faults(Faults {
                responses: [refusal].into(),
                answer_padding_bytes: 1 << 30,
                answer_padding_trickles: trickles,
                ..Faults::default()
            });
            let to = phone();
            let event = h.request_sms(&to).await;
            let key = shared::send_ledger::key(&h.topology.namespace, event.event_id);
            eventually(WAIT, "the send recorded as sent", || {
                let mut redis = redis.clone();
                let key = key.clone();
                async move {
                    let value: Option<String> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut redis)
                        .await
                        .expect("GET");
                    value.as_deref() == Some(shared::send_ledger::SENT)
                }
            })
            .await;
            assert_eq!(
                h.fake.statuses(Some(&to)),
                [refused_with, 201],
                "the refusal retried, the 201 taken as sent (trickles: {trickles})"
            );
            assert_eq!(h.fake.messages(Some(&to)).len(), 1);
            // The SID in the answer's start was read: the number's timeline names the message.
            let sid = h.fake.messages(Some(&to))[0].sid.clone();
            eventually(WAIT, "the timeline to name the message", || async {
                h.trace(&to, &[]).await.contains(&sid)
            })
            .await;
        }
        worker.stop().await;
        assert_eq!(h.dead_lettered().await, 0);
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

#[tokio::test]
async fn honours_retry_after_on_429() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            responses: [InjectedResponse::status(429).retry_after(2)].into(),
            ..Faults::default()
        });
        // The backoff alone would retry after 50 to 100 ms.
        let worker = h.start_worker(&[]).await;
        let to = phone();
        h.request_sms(&to).await;
        h.wait_for_messages(&to, 1).await;

        let requests = h.fake.requests(Some(&to));
        assert_eq!(
            requests.iter().map(|r| r.status).collect::<Vec<_>>(),
            [429, 201]
        );
        let gap = h.gaps(&to)[0];
        assert!(
            gap >= Duration::from_millis(1_950),
            "retried after {gap:?}, before Retry-After"
        );
        assert!(gap < Duration::from_secs(5), "retried after {gap:?}");
        worker.stop().await;
    })
    .await;
}

/// A `Retry-After` no clock can add (whatever answers in the provider's stead may send it) ends
/// the event as any wait past the code's life does; before, the send's task panicked, and each
/// redelivered copy met the same answer.
#[tokio::test]
async fn a_retry_after_past_any_budget_ends_the_retries_without_a_panic() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            always: Some(InjectedResponse::status(429).retry_after(u64::MAX)),
            ..Faults::default()
        });
        let worker = h.start_worker(&[]).await;
        let to = phone();
        h.request_sms(&to).await;
        let dead = h.wait_for_dead_letters(1).await;
        assert_eq!(
            dead[0].header_str("x-error-kind").as_deref(),
            Some("expired")
        );
        assert_eq!(
            h.fake.statuses(Some(&to)),
            [429],
            "one call, never redelivered"
        );
        worker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn twenty_slow_sends_run_concurrently() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults::latency(500));
        let worker = h.start_worker(&[("WORKER_CONCURRENCY", "20")]).await;
        let events: Vec<_> = (0..20).map(|_| event(&phone(), CODE_VALIDITY)).collect();

        let started = Instant::now();
        for event in &events {
            h.publish(event).await;
        }
        eventually(WAIT, "20 answered sends", || async {
            let requests = h.fake.requests(None);
            requests.len() == 20
                && requests
                    .iter()
                    .all(|r| r.status == 201 && r.responded_at.is_some())
        })
        .await;
        let elapsed = started.elapsed();
        // One at a time would take 10 s.
        assert!(elapsed < Duration::from_millis(2_500), "took {elapsed:?}");
        worker.stop().await;
        assert_eq!(h.fake.messages(None).len(), 20);
        assert_eq!(h.queued().await, 0);
    })
    .await;
}
