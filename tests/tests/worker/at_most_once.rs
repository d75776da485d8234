//! At most one SMS per event: copies of an event, at once or later, give one provider call.

use std::time::Duration;

use shared::{OtpRequested, QueueType};
use tests::fake_sms::Faults;
use tests::program::Program;
use tests::proxy::TcpProxy;
use tests::servers::servers;
use tests::wait::eventually;

use crate::harness::{CODE_VALIDITY, Harness, WAIT, event, phone, with_harness};

#[tokio::test]
async fn the_same_event_published_twice_gives_one_sms() {
    with_harness(QueueType::Classic, |h| async move {
        // Slow sends, so both copies are in flight at once.
        h.fake.set_faults(Faults::latency(300));
        // A process, so that its log is its own.
        let mut worker = h.start_worker_process(&[]).await;
        let to = phone();
        let event = event(&to, CODE_VALIDITY);
        h.publish(&event).await;
        h.publish(&event).await;
        h.wait_for_messages(&to, 1).await;
        // A third copy, well after the first was sent.
        eventually(WAIT, "the first send to be answered", || async {
            h.fake
                .requests(Some(&to))
                .iter()
                .all(|r| r.responded_at.is_some())
        })
        .await;
        h.publish(&event).await;
        // Stop only once the worker has handled both later copies: a copy it has received but
        // not yet started goes back to the queue when it stops, which the assertions below
        // would see. (An empty queue is not enough: a copy can sit in the worker's prefetch.)
        eventually(WAIT, "both later copies to be skipped", || async {
            worker
                .logs()
                .matches("this event was already handled")
                .count()
                >= 2
        })
        .await;
        worker.terminate();
        worker.wait(WAIT).await;

        assert_eq!(
            h.fake.requests(Some(&to)).len(),
            1,
            "one call for three copies"
        );
        assert_eq!(h.queued().await, 0, "every copy was acknowledged");
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

/// An event the api withdrew (its publish was neither confirmed nor refused, and the request was
/// answered 503 with its limit slots given back) gets no SMS: the worker acknowledges it. The
/// next event for the same number is sent as usual.
#[tokio::test]
async fn an_event_the_api_withdrew_is_acknowledged_without_an_sms() {
    with_harness(QueueType::Classic, |h| async move {
        let mut worker = h.start_worker_process(&[]).await;
        let to = phone();
        let withdrawn = event(&to, CODE_VALIDITY);
        h.withdraw(&withdrawn).await;
        h.publish(&withdrawn).await;
        let next = event(&to, CODE_VALIDITY);
        h.publish(&next).await;
        h.wait_for_messages(&to, 1).await;
        eventually(WAIT, "the withdrawn event to be acknowledged", || async {
            worker.logs().contains("the api withdrew this event")
        })
        .await;
        worker.terminate();
        worker.wait(WAIT).await;

        // The operator sees why no SMS went.
        let out = h.trace(&to, &[]).await;
        assert!(
            out.contains(&format!("event {}", withdrawn.event_id)),
            "{out}"
        );
        assert!(out.contains("ended: withdrawn"), "{out}");

        let sent = h.fake.messages(Some(&to));
        assert_eq!(sent.len(), 1, "one SMS, for the event not withdrawn");
        assert!(sent[0].body.contains(next.otp.as_deref().expect("a code")));
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);
        assert_eq!(h.queued().await, 0, "both events were acknowledged");
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

/// A send whose claim was lost while it went out, and which the api withdrew meanwhile (here the
/// withdrawal replaces the claim mid-send, as after a lapsed lease), is reported as an error
/// when it is recorded: the user got a code that will not work.
#[tokio::test]
async fn a_send_that_replaces_a_withdrawal_is_reported() {
    with_harness(QueueType::Classic, |h| async move {
        // Long enough for the withdrawal below to land while the send is under way, on a busy
        // machine too.
        h.fake.set_faults(Faults::latency(4_000));
        let mut worker = h.start_worker_process(&[]).await;
        let to = phone();
        let event = event(&to, CODE_VALIDITY);
        h.publish(&event).await;
        eventually(WAIT, "the send to be under way", || async {
            !h.fake.requests(Some(&to)).is_empty()
        })
        .await;
        h.withdraw(&event).await;
        h.wait_for_messages(&to, 1).await;
        eventually(WAIT, "the worker to report the send", || async {
            worker
                .logs()
                .contains("sent an event the api had withdrawn")
        })
        .await;
        worker.terminate();
        worker.wait(WAIT).await;
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

/// Redis going away while the provider takes the SMS: the `sent` record is written in the
/// background once Redis is back, rather than dropped after a few quick tries. A copy of the
/// event published once the claim has long lapsed then finds it sent.
#[tokio::test]
async fn a_send_recorded_once_redis_is_back_keeps_a_later_copy_from_a_second_sms() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults::latency(1_000));
        let (redis, redis_url) = TcpProxy::in_front_of(&servers().redis).await;
        let worker = h.start_worker(&[("REDIS_URL", &redis_url)]).await;
        let to = phone();
        let event = event(&to, CODE_VALIDITY);
        h.publish(&event).await;
        h.wait_for_a_call(&to).await;
        // The provider accepts a second after the call, with Redis away; by the time Redis is
        // back, the claim's 1 s lease has lapsed.
        redis.go_down();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(h.ledger_record(&event).await, None, "the claim lapsed");
        redis.come_back();
        eventually(WAIT, "the send to be recorded", || async {
            h.ledger_record(&event).await.as_deref() == Some(shared::send_ledger::SENT)
        })
        .await;

        h.publish(&event).await;
        // An observation window: a copy still unhandled would go back to the queue at the stop.
        tokio::time::sleep(Duration::from_secs(1)).await;
        worker.stop().await;
        assert_eq!(h.fake.messages(Some(&to)).len(), 1, "two SMS for one event");
        assert_eq!(h.queued().await, 0);
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

/// A worker process (its own metrics and JSON log, its `WORKER_ADDR` returned) whose Redis, behind
/// a proxy, goes away while the provider takes an SMS that lives `ttl`: the send is acked and
/// its record waits in the background. Returns once the worker says so.
async fn a_sent_record_waiting(
    h: &Harness,
    ttl: Duration,
) -> (TcpProxy, Program, String, OtpRequested) {
    h.fake.set_faults(Faults::latency(1_000));
    let (redis, redis_url) = TcpProxy::in_front_of(&servers().redis).await;
    let addr = format!("127.0.0.1:{}", tests::ports::free_port());
    let worker = h
        .start_worker_process(&[
            ("REDIS_URL", &redis_url),
            ("LOG_FORMAT", "json"),
            ("WORKER_ADDR", &addr),
        ])
        .await;
    let to = phone();
    let event = event(&to, ttl);
    h.publish(&event).await;
    h.wait_for_a_call(&to).await;
    redis.go_down();
    eventually(WAIT, "the record to wait in the background", || async {
        worker.logs().contains("trying again in the background")
    })
    .await;
    (redis, worker, addr, event)
}

/// The lines of the `/metrics` of the worker process on `addr`.
async fn metrics_of(h: &Harness, addr: &str) -> Vec<String> {
    h.metrics_at(addr)
        .await
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A worker that stops while a sent record still waits for Redis says so: the message was
/// acknowledged with the send, and the record, and the guard it gives against a second copy of
/// the event, end with the process.
#[tokio::test]
async fn a_worker_stopping_with_a_sent_record_still_waiting_says_so() {
    with_harness(QueueType::Classic, |h| async move {
        let (_redis, mut worker, worker_addr, event) =
            a_sent_record_waiting(&h, CODE_VALIDITY).await;
        let to = event.phone_number.as_str();
        let metrics = metrics_of(&h, &worker_addr).await;
        assert!(
            metrics.iter().any(|l| l == "sms_sent_records_waiting 1"),
            "{metrics:?}"
        );
        // At 0 before the first is given up, so that an alert on its increase sees that one.
        let none_expired = r#"sms_sent_records_given_up_total{reason="expired"} 0"#;
        assert!(metrics.iter().any(|l| l == none_expired), "{metrics:?}");
        worker.terminate();
        worker.wait(WAIT).await;

        let logs = worker.logs();
        let stopping = logs
            .lines()
            .find(|line| line.contains("stopping with sent SMS whose record"))
            .unwrap_or_else(|| panic!("no word of the record left behind:\n{logs}"));
        assert!(stopping.contains(r#""records":1"#), "{stopping}");
        assert_eq!(
            h.queued().await,
            0,
            "the message was acknowledged with the send"
        );
        assert_eq!(h.fake.messages(Some(to)).len(), 1);
    })
    .await;
}

/// A record whose Redis comes back while the worker stops lands before the worker exits: the
/// stop waits a few seconds for such records (a Redis failover during a rolling restart).
#[tokio::test]
async fn a_sent_record_whose_redis_comes_back_during_the_stop_lands_before_the_exit() {
    with_harness(QueueType::Classic, |h| async move {
        let (redis, mut worker, _, event) = a_sent_record_waiting(&h, CODE_VALIDITY).await;
        worker.terminate();
        // Redis back only once the stop waits for the record: before, the record's own tries
        // could land it with no stop waiting at all.
        eventually(WAIT, "the stop to wait for the record", || async {
            worker
                .logs()
                .contains("waiting for sent records Redis has not taken yet")
        })
        .await;
        redis.come_back();
        assert!(worker.wait(WAIT).await.success(), "{}", worker.logs());
        assert_eq!(
            h.ledger_record(&event).await.as_deref(),
            Some(shared::send_ledger::SENT),
            "the record did not land before the worker exited"
        );
        let logs = worker.logs();
        assert!(
            !logs.contains("stopping with sent SMS whose record"),
            "{logs}"
        );
    })
    .await;
}

/// A record whose code expires before Redis comes back is given up, logged and counted, which
/// is what `SmsSendsUnrecorded` alerts on.
#[tokio::test]
async fn a_sent_record_whose_code_expires_first_is_counted_as_given_up() {
    with_harness(QueueType::Classic, |h| async move {
        // The SMS goes out with about two seconds of its code left.
        let (_redis, mut worker, worker_addr, _) =
            a_sent_record_waiting(&h, Duration::from_secs(3)).await;
        let expired = r#"sms_sent_records_given_up_total{reason="expired"} 1"#;
        eventually(WAIT, "the record to be given up", || async {
            metrics_of(&h, &worker_addr)
                .await
                .iter()
                .any(|l| l == expired)
        })
        .await;
        assert!(
            metrics_of(&h, &worker_addr)
                .await
                .iter()
                .any(|l| l == "sms_sent_records_waiting 0"),
            "the record still counted as waiting"
        );
        // The log is written by a thread of its own, so it may lag the counter.
        eventually(WAIT, "the log to give the reason", || async {
            worker
                .logs()
                .contains("the code expired before Redis answered")
        })
        .await;
        worker.terminate();
        worker.wait(WAIT).await;
    })
    .await;
}
