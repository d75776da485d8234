//! The `sms-worker` program stopped by SIGTERM, which finishes what is in flight, and by
//! SIGKILL, after which another worker takes over.

use shared::QueueType;
use tests::fake_sms::{Faults, InjectedResponse, Rule};
use tests::stack::free_port;
use tests::wait::eventually;

use crate::harness::{Harness, WAIT, phone, with_harness};

/// Publishes an event for each of `count` new numbers: the numbers.
async fn request_many(h: &Harness, count: usize) -> Vec<String> {
    let numbers: Vec<String> = (0..count).map(|_| phone()).collect();
    for to in &numbers {
        h.request_sms(to).await;
    }
    numbers
}

#[tokio::test]
async fn sigterm_with_sends_in_flight_loses_nothing() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults::latency(1_500));
        let numbers = request_many(&h, 12).await;
        let mut worker = h.start_worker_process(&[("WORKER_CONCURRENCY", "4")]).await;
        eventually(WAIT, "sends in flight", || async {
            h.fake.requests(None).len() >= 4
        })
        .await;

        worker.terminate();
        let exit = worker.wait(WAIT).await;
        assert_eq!(exit.code(), Some(0), "exit 0 on SIGTERM");

        // The in-flight sends finished and were acknowledged; the rest went back to the queue.
        let sent_before = h.fake.requests(None);
        assert!(
            sent_before.iter().all(|r| r.responded_at.is_some()),
            "in-flight sends finished"
        );
        assert_eq!(
            h.queued().await as usize,
            numbers.len() - sent_before.len(),
            "everything not sent is back in the queue"
        );

        h.fake.set_faults(Faults::default());
        let worker = h.start_worker(&[]).await;
        for to in &numbers {
            h.wait_for_messages(to, 1).await;
        }
        worker.stop().await;
        for to in &numbers {
            assert_eq!(
                h.fake.messages(Some(to)).len(),
                1,
                "exactly one SMS to {to}"
            );
        }
        assert_eq!(h.queued().await, 0);
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

#[tokio::test]
async fn a_worker_killed_mid_send_has_its_messages_redelivered() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults::latency(3_000));
        let numbers = request_many(&h, 3).await;
        let mut killed = h.start_worker_process(&[]).await;
        eventually(WAIT, "all three sends in flight", || async {
            h.fake.requests(None).len() == 3
        })
        .await;
        killed.kill().await;

        h.fake.set_faults(Faults::default());
        let worker = h.start_worker(&[]).await;
        for to in &numbers {
            // The killed worker's request reached the provider before it died, so, as with
            // Twilio, that SMS may already be on its way; the new worker cannot know and sends
            // again once the dead worker's claim has lapsed (SMS_CLAIM_LEASE_MS): at least once.
            h.wait_for_messages(to, 2).await;
        }
        worker.stop().await;
        assert_eq!(h.queued().await, 0, "all acknowledged");
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

/// Acknowledgements go out in batches (`basic.ack` with `multiple`), but never wait for a
/// delivery still being worked on: a message in backoff at the front of the channel does not
/// hold back the acks of the ten that finished after it. Killed then, the worker leaves only
/// that one message to be redelivered.
#[tokio::test]
async fn acks_do_not_wait_for_an_earlier_delivery_still_in_backoff() {
    with_harness(QueueType::Quorum, |h| async move {
        let stuck = phone();
        h.fake.set_faults(Faults {
            rules: vec![Rule {
                to: stuck.clone(),
                response: InjectedResponse::status(503),
            }],
            ..Faults::default()
        });
        h.request_sms(&stuck).await; // the first delivery on the channel
        let numbers = request_many(&h, 10).await;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut worker = h
            .start_worker_process(&[("WORKER_ADDR", addr.as_str())])
            .await;
        for to in &numbers {
            h.wait_for_messages(to, 1).await;
        }
        let acked = || async {
            let metrics = match h.http.get(format!("http://{addr}/metrics")).send().await {
                Ok(reply) => reply.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            metrics
                .lines()
                .find_map(|line| line.strip_prefix("sms_acked_total "))
                .and_then(|value| value.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        eventually(WAIT, "the ten finished deliveries acknowledged", || async {
            acked().await >= 10.0
        })
        .await;
        assert!(
            !h.fake.requests(Some(&stuck)).is_empty(),
            "the first message is still being retried"
        );
        assert_eq!(
            acked().await,
            10.0,
            "the one in backoff is not acknowledged"
        );

        worker.kill().await;
        eventually(WAIT, "the message in backoff back in the queue", || async {
            h.queued().await >= 1
        })
        .await;
        assert_eq!(h.queued().await, 1, "only the one that was not finished");
    })
    .await;
}
