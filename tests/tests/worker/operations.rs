//! What an operator uses: `sms-worker dlq list|purge` (in-process and as the program), and
//! `/healthz`, `/readyz` and `/metrics`.

use shared::fraud_guard::{FraudGuard, FraudGuardPolicy};
use shared::redis_connection::RedisConnection;
use shared::{CommonConfig, Env, QueueType};
use sms_worker::dead_letter;
use tests::program::Program;

use tests::wait::eventually;

use crate::harness::{CODE_VALIDITY, Harness, WAIT, event, pairs, phone, with_harness};

/// Runs `sms-worker dlq ARGS` as an operator does: its stdout, once it succeeded.
async fn dlq_command(h: &Harness, args: &[&str]) -> String {
    let args: Vec<&str> = ["dlq"].iter().chain(args).copied().collect();
    let mut program = Program::start_workspace("sms-worker", &args, h.env()).await;
    let status = program.wait(WAIT).await;
    assert!(status.success(), "{}", program.logs());
    program.stdout()
}

/// The listed entry that `source` (`broker` or `worker`) dead-lettered.
fn entry_from<'a>(listing: &'a dead_letter::Listing, source: &str) -> &'a dead_letter::Entry {
    listing
        .entries
        .iter()
        .find(|e| e.source == source)
        .unwrap_or_else(|| panic!("the {source}'s entry"))
}

#[tokio::test]
async fn dlq_list_shows_entries_and_leaves_them_in_place() {
    with_harness(QueueType::Quorum, |h| async move {
        // A native dead letter: expired in the queue before any worker ran. RabbitMQ keeps it,
        // code included, in the holding queue until a worker moves it on without the code.
        let stale_to = phone();
        let stale = event(&stale_to, CODE_VALIDITY);
        h.publish_with(
            &serde_json::to_vec(&stale).unwrap(),
            shared::amqp::event_properties(&stale, 1),
        )
        .await;
        eventually(
            WAIT,
            "the broker to dead-letter the stale event",
            || async { h.held_by_the_broker().await == 1 },
        )
        .await;
        assert_eq!(
            h.dead_lettered().await,
            0,
            "nothing readable reaches the DLQ"
        );

        // A worker dead letter: Twilio says the number is invalid.
        let invalid = h.invalid_number();
        let worker = h.start_worker(&[]).await;
        h.request_sms(&invalid).await;
        let letters = h.wait_for_dead_letters(2).await;
        worker.stop().await;
        assert_eq!(
            h.held_by_the_broker().await,
            0,
            "the worker drained the holding queue"
        );
        let code = stale.otp.as_deref().unwrap();
        for letter in &letters {
            let body: serde_json::Value = serde_json::from_slice(&letter.body).unwrap();
            assert_eq!(body["otp"], serde_json::Value::Null, "{body}");
            assert!(!String::from_utf8_lossy(&letter.body).contains(code));
        }

        let common = CommonConfig::from_env(&Env::from_pairs(h.env())).unwrap();
        // More looks than RabbitMQ 4's default quorum delivery limit (20): none may drop an entry.
        for _ in 0..25 {
            // A look hands the entries back once its channel is closed, a quorum queue through
            // its log: the next look must not start before they are ready again.
            h.wait_for_dead_lettered(2).await;
            let listing = dead_letter::list(&common, 10).await.unwrap();
            assert_eq!(listing.total, 2);
            assert_eq!(listing.entries.len(), 2);
        }
        h.wait_for_dead_lettered(2).await;
        let listing = dead_letter::list(&common, 10).await.unwrap();
        let broker = entry_from(&listing, "broker");
        assert_eq!(broker.error_kind, "expired");
        assert_eq!(
            broker.event_id.as_deref(),
            Some(stale.event_id.to_string().as_str())
        );
        assert_eq!(
            broker.phone_number.as_deref(),
            Some(shared::mask_phone(&stale_to).as_str())
        );
        let ours = entry_from(&listing, "worker");
        assert_eq!(ours.error_kind, "permanent");
        assert_eq!(ours.provider_code, Some(21211));
        assert_eq!(ours.attempts, Some(1));
        h.wait_for_dead_lettered(2).await;
        assert_eq!(
            dead_letter::list(&common, 1).await.unwrap().entries.len(),
            1,
            "--limit"
        );

        // The binary, as an operator runs it.
        h.wait_for_dead_lettered(2).await;
        let stdout = dlq_command(&h, &["list", "--json"]).await;
        let lines: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{stdout}");
        assert!(
            !stdout.contains(stale.otp.as_deref().unwrap()),
            "no code is shown"
        );
        assert!(!stdout.contains(&stale_to), "numbers are masked");
        h.wait_for_dead_lettered(2).await;
        let table = dlq_command(&h, &["list"]).await;
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 3, "a header and two entries:\n{table}");
        assert!(
            rows[0].starts_with("FAILED AT") && rows[0].contains("REQUEST"),
            "{table}"
        );
        assert!(
            table.contains(&stale.request_id),
            "the request id is shown:\n{table}"
        );

        h.wait_for_dead_lettered(2).await;
        assert_eq!(h.dead_lettered().await, 2, "listing removed nothing");

        // Without --yes and without a "yes" typed, nothing is purged.
        let mut unconfirmed =
            Program::start_workspace("sms-worker", &["dlq", "purge"], h.env()).await;
        assert!(!unconfirmed.wait(WAIT).await.success());
        assert!(
            unconfirmed.logs().contains("Delete 2 entries"),
            "{}",
            unconfirmed.logs()
        );
        assert_eq!(h.dead_lettered().await, 2);

        let purged = Program::start_workspace("sms-worker", &["dlq", "purge", "--yes"], h.env());
        let mut purged = purged.await;
        assert!(purged.wait(WAIT).await.success(), "{}", purged.logs());
        assert!(
            purged.logs().contains("purged 2 entries"),
            "{}",
            purged.logs()
        );
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

#[tokio::test]
async fn reports_readiness_and_metrics() {
    with_harness(QueueType::Classic, |h| async move {
        let worker = h.start_worker(&[]).await;
        let base = format!("http://{}", worker.addr);
        let health = h.http.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
        let to = phone();
        h.request_sms(&to).await;
        h.wait_for_messages(&to, 1).await;
        let metrics = h
            .http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for name in [
            "sms_sends_total{outcome=\"sent\"}",
            "sms_provider_request_duration_seconds_bucket",
            "sms_in_flight",
            // At 0 from the start, for the alert on its increase.
            "sms_provider_answers_cut_total{provider=\"twilio\"}",
        ] {
            assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
        }
        for family in metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = family.split(' ').next().unwrap_or_default();
            assert!(
                metrics.contains(&format!("# HELP {name} ")),
                "{name} has no HELP:\n{metrics}"
            );
        }

        // The dead-letter queue's depth, as a gauge.
        h.publish_with(b"not an event", lapin::BasicProperties::default())
            .await;
        h.wait_for_dead_lettered(1).await;
        let gauge = format!(
            "sms_queue_depth{{queue=\"{}\"}} 1",
            h.topology.dead_letter_queue()
        );
        eventually(WAIT, &gauge, || async {
            let metrics = h.http.get(format!("{base}/metrics")).send().await;
            match metrics {
                Ok(response) => response.text().await.unwrap_or_default().contains(&gauge),
                Err(_) => false,
            }
        })
        .await;
        worker.stop().await;
    })
    .await;
}

/// A worker asks the fraud guard before a resend with its own settings, so one left in `monitor`
/// beside an api in `enforce` would pay for resends the api refuses: it compares its settings
/// with the ones the api notes in Redis and says when they differ (the gauge, and a warning).
#[tokio::test]
async fn a_worker_says_when_its_fraud_guard_settings_are_not_the_apis() {
    with_harness(QueueType::Classic, |h| async move {
        let guard = FraudGuard::new(&h.ns);
        let config = h.config(&[]);
        let redis = || RedisConnection::new(&config.common.redis).expect("Redis");
        let settings = |mode: &str| {
            FraudGuardPolicy::from_env(&Env::from_pairs([("OTP_FRAUD_GUARD", mode)]))
                .expect("the guard's settings")
        };
        // A process each: the gauge is a process's own.
        let watch = async |api_mode: &str| {
            // Only this api's note: as if the others had stopped more than 5 minutes ago.
            let () = redis::cmd("DEL")
                .arg(format!("{}:fraud_guard:{{settings}}", h.ns))
                .query_async(&mut redis())
                .await
                .expect("DEL");
            guard
                .announce_settings(redis(), &settings(api_mode))
                .await
                .expect("the api's note");
            let mut env = h.receipts();
            let addr = format!("127.0.0.1:{}", tests::ports::free_port());
            env.push(("WORKER_ADDR".to_owned(), addr.clone()));
            let worker = h.start_worker_process(&pairs(&env)).await;
            let metrics = format!("http://{addr}/metrics");
            let gauge = eventually(WAIT, "the settings compared", || async {
                let text = h.http.get(&metrics).send().await.ok()?.text().await.ok()?;
                text.lines()
                    .find_map(|l| l.strip_prefix("sms_fraud_guard_settings_differ "))
                    .map(str::to_owned)
            })
            .await;
            (worker, gauge)
        };
        // The worker runs the default, `monitor`.
        let (mut differs, gauge) = watch("enforce").await;
        assert_eq!(gauge, "1");
        differs.terminate();
        differs.wait(WAIT).await;
        assert!(
            differs.logs().contains("are not the api's"),
            "{}",
            differs.logs()
        );
        let (mut agrees, gauge) = watch("monitor").await;
        assert_eq!(gauge, "0");
        agrees.terminate();
        agrees.wait(WAIT).await;
    })
    .await;
}

/// A timeline's key name is a hash of its number, keyed by `WORKER_SEAL_KEY` when there is one:
/// without it, anyone who reads Redis can hash a range of numbers and see which were sent codes.
/// A worker sending real SMS without the key says so at start.
#[tokio::test]
async fn a_worker_sending_sms_without_a_seal_key_warns_that_its_timelines_give_numbers_away() {
    with_harness(QueueType::Classic, |h| async move {
        let warning = "WORKER_SEAL_KEY is not set";
        for (seal_key, warned) in [(None, true), (Some(crate::harness::SEAL_KEY), false)] {
            let addr = format!("127.0.0.1:{}", tests::ports::free_port());
            let mut env = vec![("WORKER_ADDR", addr.as_str())];
            env.extend(seal_key.map(|key| ("WORKER_SEAL_KEY", key)));
            let mut worker = h.start_worker_process(&env).await;
            let ready = format!("http://{addr}/readyz");
            eventually(WAIT, "the worker to be ready", || async {
                matches!(h.http.get(&ready).send().await, Ok(r) if r.status().is_success())
            })
            .await;
            worker.terminate();
            worker.wait(WAIT).await;
            assert_eq!(worker.logs().contains(warning), warned, "{}", worker.logs());
        }
    })
    .await;
}
