//! RabbitMQ going away, failing over or raising an alarm under a worker: it says so on
//! `/readyz`, loses nothing, stores every dead letter once, and carries on when the broker is
//! back. Each test puts a TCP proxy of its own between the worker and the broker, and cuts it or
//! acts out an alarm. (Redis: `redis_outages.rs`.)

use std::time::Duration;

use shared::QueueType;
use tests::program::Program;
use tests::proxy::TcpProxy;
use tests::servers::servers;
use tests::wait::eventually;

use crate::harness::{CODE_VALIDITY, Harness, WAIT, event, phone, with_harness};

#[tokio::test]
async fn keeps_running_through_a_rabbitmq_outage() {
    with_harness(QueueType::Classic, |h| async move {
        let (broker, amqp_url) = TcpProxy::in_front_of(&servers().rabbitmq).await;
        let worker = h.start_worker(&[("AMQP_URL", &amqp_url)]).await;

        broker.go_down();
        worker.wait_unready_for(&h.http, "rabbitmq").await;
        let to = phone();
        h.request_sms(&to).await;

        broker.come_back();
        // It reconnects, re-declares and consumes again.
        worker.wait_ready(&h.http).await;
        h.wait_for_messages(&to, 1).await;
        worker.stop().await;
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

/// RabbitMQ, during a memory or disk alarm, stops reading from a connection at its first
/// publish. The worker's dead letters go out on a connection of their own, so dead letters in an
/// alarm hold up only themselves: the deliveries behind them, more than the prefetch has room
/// for, are still sent and acknowledged. (On one shared connection the acks stopped with the
/// first dead letter, and the worker stalled at its prefetch until the alarm cleared.) A dead
/// letter whose connection stays blocked is acknowledged as dead-lettered, its copy stored when
/// the alarm ends: given back to the queue, it would go to the provider again and leave one more
/// copy each time. What the broker dead-lettered itself waits in its queue instead.
#[tokio::test]
async fn dead_letters_during_a_broker_alarm_are_stored_once_and_hold_up_no_other_send() {
    with_harness(QueueType::Classic, |h| async move {
        let (broker, amqp_url) = broker_that_can_raise_an_alarm().await;
        let invalid = h.invalid_numbers(2);
        let worker = h
            .start_worker(&[("AMQP_URL", &amqp_url), ("WORKER_CONCURRENCY", "3")])
            .await;

        broker.block_like_an_alarm();
        for to in &invalid {
            h.request_sms(to).await;
        }
        h.wait_for_metric(&worker, "sms_amqp_connection_blocked 1")
            .await;
        let others: Vec<String> = (0..6).map(|_| phone()).collect();
        for to in &others {
            h.request_sms(to).await;
        }
        for to in &others {
            h.wait_for_messages(to, 1).await;
        }
        // Both originals are acknowledged as held by the alarm once their connection has stayed
        // blocked for a second, well before the dead letters' 10 s confirm timeout (a slot each
        // until then).
        eventually(
            Duration::from_secs(5),
            "both dead letters to be held by the alarm",
            || async {
                let metrics = h.metrics(&worker).await;
                metrics
                    .lines()
                    .any(|l| l == "sms_dead_letters_held_total 2")
            },
        )
        .await;

        // A broker dead letter (an event that expired in the queue) is not forwarded while the
        // connection is blocked: held in the worker, a restart would lose it; in its queue, the
        // broker keeps it. The worker takes it (none is left ready) and waits.
        h.put_among_broker_dead_letters(&event(&phone(), CODE_VALIDITY))
            .await;
        eventually(
            Duration::from_secs(10),
            "the worker to take the broker dead letter",
            || async { h.held_by_the_broker().await == 0 },
        )
        .await;
        // The alarm goes on past the 1 s after which a copy on a blocked connection counts as
        // held: a scenario, not a wait for a condition (done right, nothing shows meanwhile).
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            h.metrics(&worker)
                .await
                .lines()
                .any(|l| l == "sms_dead_letters_held_total 2"),
            "the broker dead letter was not put in the worker's memory"
        );

        broker.unblock();
        h.wait_for_dead_lettered(3).await;
        h.wait_for_metric(&worker, "sms_amqp_connection_blocked 0")
            .await;
        worker.stop().await;
        assert_eq!(h.queued().await, 0);
        assert_eq!(h.held_by_the_broker().await, 0);
        assert_eq!(
            h.dead_lettered().await,
            3,
            "one dead letter each, no copies"
        );
        for to in &invalid {
            assert_eq!(h.fake.requests(Some(to)).len(), 1, "one provider call each");
        }
        for to in &others {
            assert_eq!(h.fake.messages(Some(to)).len(), 1, "one SMS to each");
        }
    })
    .await;
}

/// An alarm holds at most `SMS_DEAD_LETTERS_HELD_MAX` dead-letter copies in a worker's memory.
/// Past that, a dead letter waits for the alarm to end with its original unacknowledged (a slot
/// of the prefetch), and is stored then: a long alarm with many failed sends slows the worker
/// down instead of filling its memory with copies a restart would lose.
#[tokio::test]
async fn past_the_most_held_a_dead_letter_waits_unacknowledged_for_the_alarm_to_end() {
    with_harness(QueueType::Classic, |h| async move {
        // A short lease: the 3 s below outlast it several times over.
        let (broker, mut worker, [first, second], metrics_url) =
            a_dead_letter_waiting_for_room(&h, &[("SMS_CLAIM_LEASE_MS", "1000")]).await;
        let gauge_says = async |line: &str| metrics_say(&h, &metrics_url, line).await;
        let held = |worker: &Program| {
            worker
                .logs()
                .matches("is stored when the alarm ends")
                .count()
        };
        // The alarm goes on past the 1 s after which a copy counts as held: a scenario, not a
        // wait for a condition (done right, nothing shows meanwhile).
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            held(&worker),
            1,
            "a second copy was held past the most allowed"
        );
        assert_eq!(
            h.dead_lettered().await,
            0,
            "nothing stored during the alarm"
        );
        assert_eq!(
            gauge_says("sms_dead_letters_held 1").await,
            Some(true),
            "one copy held now"
        );
        assert_eq!(
            gauge_says("sms_dead_letters_waiting_for_room 1").await,
            Some(true),
            "one dead letter waiting for room now"
        );
        assert_eq!(
            claims_held(&h).await,
            1,
            "the waiting dead letter keeps its claim, so no other copy of its event can send"
        );

        broker.unblock();
        h.wait_for_dead_lettered(2).await;
        eventually(
            Duration::from_secs(10),
            "the gauge to fall to 0 once the alarm is over",
            || async { gauge_says("sms_dead_letters_held 0").await == Some(true) },
        )
        .await;
        assert_eq!(
            gauge_says("sms_dead_letters_waiting_for_room 0").await,
            Some(true),
            "the dead letter that waited went on"
        );
        worker.terminate();
        worker.wait(Duration::from_secs(20)).await;
        assert_eq!(held(&worker), 1, "the second copy was never held");
        assert_eq!(h.queued().await, 0, "the waiting original was acknowledged");
        assert_eq!(
            h.dead_lettered().await,
            2,
            "one dead letter each, no copies"
        );
        for to in [&first, &second] {
            assert_eq!(h.fake.requests(Some(to)).len(), 1, "one provider call each");
        }
    })
    .await;
}

/// RabbitMQ's own dead letters wait out a short alarm in their queue, then are held like the
/// others, up to the same most: past it, one is handed back to the broker's queue (and taken
/// again a few seconds later) instead of joining the copies in the worker's memory, and is
/// forwarded once the alarm ends.
#[tokio::test]
async fn past_the_most_held_a_broker_dead_letter_stays_in_the_broker_during_the_alarm() {
    with_harness(QueueType::Classic, |h| async move {
        let (broker, mut worker, _, metrics_url) = a_dead_letter_waiting_for_room(&h, &[]).await;
        h.put_among_broker_dead_letters(&event(&phone(), CODE_VALIDITY))
            .await;
        // Past the 10 s a broker dead letter waits for an alarm to end before it is forwarded:
        // a scenario, not a wait for a condition (done right, nothing shows meanwhile).
        tokio::time::sleep(Duration::from_secs(13)).await;
        assert!(
            !worker
                .logs()
                .contains("this broker dead letter is stored when the alarm ends"),
            "a broker dead letter was held past the most allowed"
        );
        assert_eq!(
            metrics_say(&h, &metrics_url, "sms_dead_letters_held 1").await,
            Some(true),
            "still one copy held"
        );
        assert_eq!(
            h.dead_lettered().await,
            0,
            "nothing stored during the alarm"
        );

        broker.unblock();
        h.wait_for_dead_lettered(3).await;
        worker.terminate();
        worker.wait(Duration::from_secs(20)).await;
        assert_eq!(h.dead_lettered().await, 3, "each stored once");
        assert_eq!(h.held_by_the_broker().await, 0);
    })
    .await;
}

/// A reconnect during an alarm, with the most copies already held: the blocked dead-letter
/// connection is kept with them, and the next dead letter waits for room although the new
/// connection is not blocked yet (it would otherwise start a fresh batch of held copies). When
/// the alarm ends, all are stored once, the kept connection is closed, and the counts fall to 0.
#[tokio::test]
async fn a_reconnect_during_an_alarm_keeps_the_held_copies_and_their_limit() {
    with_harness(QueueType::Classic, |h| async move {
        let (broker, mut worker, metrics_url) = two_copies_held_then_a_reconnect(&h).await;

        let third = h.invalid_number();
        h.request_sms(&third).await;
        eventually(
            Duration::from_secs(15),
            "the third dead letter to wait for room",
            || async {
                metrics_say(&h, &metrics_url, "sms_dead_letters_waiting_for_room 1").await
                    == Some(true)
            },
        )
        .await;
        assert_eq!(
            worker
                .logs()
                .matches("is stored when the alarm ends")
                .count(),
            2,
            "no copy held past the most allowed"
        );

        broker.unblock();
        h.wait_for_dead_lettered(3).await;
        eventually(
            Duration::from_secs(10),
            "the kept connection to be closed and the counts to fall to 0",
            || async {
                broker.connections_open() == 2
                    && metrics_say(&h, &metrics_url, "sms_dead_letters_held 0").await == Some(true)
                    && metrics_say(&h, &metrics_url, "sms_dead_letters_waiting_for_room 0").await
                        == Some(true)
            },
        )
        .await;
        worker.terminate();
        worker.wait(Duration::from_secs(20)).await;
        assert_eq!(h.dead_lettered().await, 3, "each stored once");
        assert_eq!(h.fake.requests(None).len(), 3, "one provider call each");
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

/// A dead-letter connection kept through a reconnect and then lost before the alarm ends takes
/// its copies with it: that is logged, and the held count starts again, so that the next dead
/// letter is held rather than waiting for room that copies no longer in memory took.
#[tokio::test]
async fn a_kept_connection_lost_in_the_alarm_is_logged_and_frees_its_room() {
    with_harness(QueueType::Classic, |h| async move {
        let (broker, mut worker, metrics_url) = two_copies_held_then_a_reconnect(&h).await;

        broker.cut_blocked();
        eventually(
            Duration::from_secs(15),
            "the loss to be logged and the count to start again",
            || async {
                worker.logs().contains("was lost before its alarm ended")
                    && metrics_say(&h, &metrics_url, "sms_dead_letters_held 0").await == Some(true)
            },
        )
        .await;
        h.request_sms(&h.invalid_number()).await;
        eventually(
            Duration::from_secs(15),
            "the third copy to be held",
            || async {
                worker
                    .logs()
                    .matches("is stored when the alarm ends")
                    .count()
                    == 3
            },
        )
        .await;

        broker.unblock();
        h.wait_for_dead_lettered(1).await;
        worker.terminate();
        worker.wait(Duration::from_secs(20)).await;
        assert_eq!(
            h.dead_lettered().await,
            1,
            "the third stored; the two on the lost connection lost, as logged"
        );
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

/// A worker that loses its consuming connection during an alarm (as when the broker's consumer
/// timeout ends a consumer) keeps the blocked dead-letter connection through the reconnect, with
/// the copies held there. Told to stop, it waits for the alarm to end for that connection too
/// (its new one holds nothing), so the copies are stored; and the old connection is closed.
#[tokio::test]
async fn a_worker_stopped_after_a_reconnect_in_an_alarm_still_stores_the_copies_held_before_it() {
    with_harness(QueueType::Classic, |h| async move {
        let (broker, amqp_url) = broker_that_can_raise_an_alarm().await;
        let mut worker = h
            .start_worker_process(&[("AMQP_URL", amqp_url.as_str())])
            .await;
        two_copies_held_by_an_alarm(&h, &broker, &worker).await;

        reconnect_keeping_the_blocked_connection(&broker, &worker).await;
        stop_then_end_the_alarm(&mut worker, &broker).await;

        assert_eq!(
            h.dead_lettered().await,
            2,
            "the held copies were stored: {}",
            worker.logs()
        );
        assert_eq!(h.fake.requests(None).len(), 2, "one provider call each");
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

/// A dead letter waiting for room (above) keeps its original unacknowledged: a worker told to
/// stop meanwhile does not wait for the alarm on its account, and the original goes back to the
/// queue, for a worker to try again once the alarm is over.
#[tokio::test]
async fn a_stopping_worker_hands_a_dead_letter_waiting_for_room_back_to_the_queue() {
    with_harness(QueueType::Classic, |h| async move {
        let (broker, mut worker, _, _) =
            a_dead_letter_waiting_for_room(&h, &[("SHUTDOWN_GRACE_SECS", "2")]).await;
        assert_eq!(h.queued().await, 0, "the waiting original is the worker's");

        worker.terminate();
        worker.wait(Duration::from_secs(20)).await;
        assert!(
            worker
                .logs()
                .contains("the worker began to stop (or the delivery's channel closed)"),
            "the waiting dead letter gave up as the worker began to stop, not when it was cut off: {}",
            worker.logs()
        );
        eventually(
            Duration::from_secs(10),
            "the waiting original to be back in the queue",
            || async { h.queued().await == 1 },
        )
        .await;
        broker.unblock();
    })
    .await;
}

/// A copy of an event that waits for another copy's claim stops waiting when its connection
/// breaks: the broker takes the delivery back and hands it out again, and that delivery waits
/// instead. Before, the stale copy polled Redis every 100 ms until the holder finished, up to
/// minutes, for an acknowledgement it could no longer send.
#[tokio::test]
async fn a_copy_waiting_for_another_stops_when_its_connection_breaks() {
    with_harness(QueueType::Classic, |h| async move {
        let (broker, amqp_url) = TcpProxy::in_front_of(&servers().rabbitmq).await;
        // A process: its log is its own.
        let mut worker = h.start_worker_process(&[("AMQP_URL", &amqp_url)]).await;
        let to = phone();
        let event = event(&to, CODE_VALIDITY);
        // Another copy holds the event's claim, and keeps it for the whole test.
        let claim = shared::send_ledger::key(&h.ns, event.event_id);
        let held = format!("{}another-copy", shared::send_ledger::SENDING_PREFIX);
        let set = |value: &str| {
            redis::cmd("SET")
                .arg(&claim)
                .arg(value)
                .arg("PX")
                .arg(60_000)
                .to_owned()
        };
        let () = set(&held)
            .query_async(&mut h.redis().await)
            .await
            .expect("SET");
        h.publish(&event).await;
        let waiting = |copies: usize| {
            let worker = &worker;
            move || async move {
                worker
                    .logs()
                    .matches("another copy of this event is being sent; waiting")
                    .count()
                    >= copies
            }
        };
        eventually(WAIT, "the copy to wait", waiting(1)).await;

        broker.cut_connections();
        eventually(
            WAIT,
            "the copy handed out again to wait in turn",
            waiting(2),
        )
        .await;
        eventually(WAIT, "the first copy to stop waiting", || async {
            worker
                .logs()
                .contains("this copy's channel closed while it waited for another copy")
        })
        .await;

        // The holder finishes: the waiting copy is acknowledged, and nothing was sent.
        let () = set(shared::send_ledger::SENT)
            .query_async(&mut h.redis().await)
            .await
            .expect("SET");
        eventually(
            WAIT,
            "the copy to be acknowledged as a duplicate",
            || async { worker.logs().contains("this event was already handled") },
        )
        .await;
        worker.terminate();
        worker.wait(WAIT).await;
        assert_eq!(h.queued().await, 0, "{}", worker.logs());
        assert_eq!(h.fake.requests(Some(&to)).len(), 0);
        // By the copy handed out again alone: the one taken back had stopped.
        let handled = worker
            .logs()
            .matches("this event was already handled")
            .count();
        assert_eq!(handled, 1, "{}", worker.logs());
    })
    .await;
}

/// A dead letter held by an alarm was acknowledged: its copy exists only in the worker, unwritten
/// on the blocked connection. A worker told to stop then waits, within its grace period, for the
/// alarm to end, so that the copy is stored; ended at once, it lost it.
#[tokio::test]
async fn a_worker_stopped_during_an_alarm_waits_for_it_to_end_to_store_its_held_dead_letters() {
    with_harness(QueueType::Classic, |h| async move {
        let (broker, amqp_url) = broker_that_can_raise_an_alarm().await;
        // A process: what it holds in memory ends with it.
        let mut worker = h.start_worker_process(&[("AMQP_URL", &amqp_url)]).await;

        two_copies_held_by_an_alarm(&h, &broker, &worker).await;
        stop_then_end_the_alarm(&mut worker, &broker).await;

        assert_eq!(
            h.dead_lettered().await,
            2,
            "the held copies were stored: {}",
            worker.logs()
        );
        assert!(
            worker.logs().contains("the held dead letters went out"),
            "{}",
            worker.logs()
        );
    })
    .await;
}

/// `AMQP_URL` lists a cluster's nodes: when the node the worker consumes from dies, it moves
/// to the next at once and keeps sending.
#[tokio::test]
async fn moves_to_the_next_broker_node_when_its_node_dies() {
    with_harness(QueueType::Quorum, |h| async move {
        let (first, first_url) = TcpProxy::in_front_of(&servers().rabbitmq).await;
        let (_second, second_url) = TcpProxy::in_front_of(&servers().rabbitmq).await;
        let nodes = format!("{first_url},{second_url}");
        let worker = h.start_worker(&[("AMQP_URL", nodes.as_str())]).await;
        let before = phone();
        h.request_sms(&before).await;
        h.wait_for_messages(&before, 1).await;

        first.go_down();
        let after = phone();
        h.request_sms(&after).await;
        h.wait_for_messages(&after, 1).await;
        worker.stop().await;
        assert_eq!(h.fake.requests(Some(&after)).len(), 1, "one SMS");
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

/// With several nodes in `AMQP_URL` a new quorum queue gets a replica on each
/// (`x-quorum-initial-group-size`); a queue made before, with one node listed, is kept as it is,
/// since RabbitMQ refuses to redeclare a queue with another count.
#[tokio::test]
async fn a_queue_made_with_one_node_is_kept_when_more_are_listed() {
    with_harness(QueueType::Quorum, |h| async move {
        // The harness declared the queues as a one-node api does.
        let url = tests::servers::servers().rabbitmq.url().to_owned();
        let nodes = format!("{url},{url},{url}");
        let worker = h.start_worker(&[("AMQP_URL", nodes.as_str())]).await;
        let to = phone();
        h.request_sms(&to).await;
        h.wait_for_messages(&to, 1).await;
        worker.stop().await;
        assert_eq!(h.queued().await, 0);
    })
    .await;
}

/// A worker process allowed one dead letter held by an alarm, during an alarm: the first of two
/// numbers the provider refuses has its copy held, the second waits for room. Returns the
/// broker's proxy (blocked), the worker, the two numbers and the worker's `/metrics` URL.
async fn a_dead_letter_waiting_for_room(
    h: &Harness,
    overrides: &[(&str, &str)],
) -> (TcpProxy, Program, [String; 2], String) {
    let (broker, amqp_url) = broker_that_can_raise_an_alarm().await;
    // A process: its logs are its own (an in-process worker's counters are shared by every
    // test's worker).
    let addr = format!("127.0.0.1:{}", tests::ports::free_port());
    let mut vars = vec![
        ("AMQP_URL", amqp_url.as_str()),
        ("SMS_DEAD_LETTERS_HELD_MAX", "1"),
        ("WORKER_ADDR", addr.as_str()),
    ];
    vars.extend_from_slice(overrides);
    let worker = h.start_worker_process(&vars).await;
    let [first, second] = h.invalid_numbers(2).try_into().expect("two numbers");

    broker.block_like_an_alarm();
    h.request_sms(&first).await;
    eventually(
        Duration::from_secs(15),
        "the first copy to be held",
        || async { worker.logs().contains("is stored when the alarm ends") },
    )
    .await;
    h.request_sms(&second).await;
    eventually(
        Duration::from_secs(15),
        "the second dead letter to wait for the alarm",
        || async {
            worker
                .logs()
                .contains("this one waits for the alarm to end")
        },
    )
    .await;
    (
        broker,
        worker,
        [first, second],
        format!("http://{addr}/metrics"),
    )
}

/// Raises the alarm and has the worker dead-letter two numbers. The first copy is written (and
/// held unread by the broker); once the worker knows the connection is blocked, the second
/// stays in its own buffers. Returns once both originals are acknowledged.
async fn two_copies_held_by_an_alarm(h: &Harness, broker: &TcpProxy, worker: &Program) {
    broker.block_like_an_alarm();
    let [first, second] = h.invalid_numbers(2).try_into().expect("two numbers");
    h.request_sms(&first).await;
    eventually(
        Duration::from_secs(15),
        "the worker to hear of the block",
        || async { worker.logs().contains("RabbitMQ blocked publishing") },
    )
    .await;
    h.request_sms(&second).await;
    eventually(
        Duration::from_secs(15),
        "both dead letters to be held by the alarm",
        || async {
            worker
                .logs()
                .matches("is stored when the alarm ends")
                .count()
                == 2
        },
    )
    .await;
}

/// A worker process allowed two held copies, behind a proxy acting out an alarm: both are held
/// (see [`two_copies_held_by_an_alarm`]), then the worker reconnects, keeping the blocked
/// connection. Returns the proxy (the alarm on), the worker and its `/metrics` URL.
async fn two_copies_held_then_a_reconnect(h: &Harness) -> (TcpProxy, Program, String) {
    let (broker, amqp_url) = broker_that_can_raise_an_alarm().await;
    let addr = format!("127.0.0.1:{}", tests::ports::free_port());
    let worker = h
        .start_worker_process(&[
            ("AMQP_URL", amqp_url.as_str()),
            ("SMS_DEAD_LETTERS_HELD_MAX", "2"),
            ("WORKER_ADDR", addr.as_str()),
        ])
        .await;
    two_copies_held_by_an_alarm(h, &broker, &worker).await;
    reconnect_keeping_the_blocked_connection(&broker, &worker).await;
    (broker, worker, format!("http://{addr}/metrics"))
}

/// Cuts the worker's consuming connection (not the blocked one) and waits for it to reconnect:
/// the blocked dead-letter connection is kept beside the new two.
async fn reconnect_keeping_the_blocked_connection(broker: &TcpProxy, worker: &Program) {
    broker.cut_unblocked();
    eventually(
        Duration::from_secs(20),
        "the worker to reconnect",
        || async {
            worker
                .logs()
                .matches("connected to RabbitMQ; consuming")
                .count()
                == 2
        },
    )
    .await;
    assert_eq!(
        broker.connections_open(),
        3,
        "the blocked dead-letter connection is kept beside the new two"
    );
}

/// Tells the worker to stop, ends the alarm once it has begun to (without the wait for the
/// alarm, it is gone by then), and waits for it to exit.
async fn stop_then_end_the_alarm(worker: &mut Program, broker: &TcpProxy) {
    worker.terminate();
    eventually(
        Duration::from_secs(10),
        "the worker to begin to stop",
        || async { worker.logs().contains("stopping: no new messages") },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.unblock();
    worker.wait(Duration::from_secs(20)).await;
}

/// How many events of this test's namespace a worker holds the send ledger's claim on.
async fn claims_held(h: &Harness) -> usize {
    let mut redis = h.redis().await;
    let pattern = shared::send_ledger::key(&h.topology.namespace, uuid::Uuid::nil())
        .replace(&uuid::Uuid::nil().to_string(), "*");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut redis)
        .await
        .expect("KEYS");
    let mut held = 0;
    for key in keys {
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap_or(None);
        if value.is_some_and(|v| v.starts_with(shared::send_ledger::SENDING_PREFIX)) {
            held += 1;
        }
    }
    held
}

/// Whether the worker's `/metrics` at `url` has the line `line` (`None`: it did not answer).
async fn metrics_say(h: &Harness, url: &str, line: &str) -> Option<bool> {
    let metrics = h.http.get(url).send().await.ok()?.text().await.ok()?;
    Some(metrics.lines().any(|l| l == line))
}

/// A proxy in front of the broker, to act out its alarms, and the `AMQP_URL` through it. The
/// real broker is in no alarm, so it still expects the worker's heartbeats, which the proxy holds
/// with the rest: a long heartbeat keeps it from closing the connection on a slow machine.
async fn broker_that_can_raise_an_alarm() -> (TcpProxy, String) {
    let (broker, amqp_url) = TcpProxy::in_front_of(&servers().rabbitmq).await;
    let separator = if amqp_url.contains('?') { '&' } else { '?' };
    (broker, format!("{amqp_url}{separator}heartbeat=60"))
}
