//! The `sms-worker` program stopped by SIGTERM, which finishes what is in flight, and by
//! SIGKILL, after which another worker takes over.

use shared::QueueType;
use tests::fake_sms::Faults;
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
