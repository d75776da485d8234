//! A provider that does not answer in time may still have sent the SMS: such a send gets one
//! more attempt at most (on the next provider where there is one) and never the retry loop, and
//! an event that ends without a clear answer is recorded as sent, not dead-lettered.

use shared::QueueType;
use tests::fake_sms::{Faults, SmsProvider};

use crate::harness::{WAIT, phone, with_harness};

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
        for to in &numbers {
            h.request_sms(to).await;
        }
        tests::wait::eventually(WAIT, "every event settled", || async {
            h.queued().await == 0
                && numbers
                    .iter()
                    .all(|to| !h.fake.requests(Some(to)).is_empty())
                && h.metrics(&worker).await.contains("sms_ambiguous_total 3")
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
